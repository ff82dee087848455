"""bench/chaos works: two short scenarios run against real processes, exit 0, print their
table row as a pass and write their JSON report.

- redis-kill-open: Redis SIGKILLed for 2 s under load (on_error: open), a redis-server and
  a gateway subprocess.
- cluster-failover: on a 3+3 Redis Cluster (tests/rig/redis_cluster.py), the primary serving
  the most devices SIGKILLed under load, its replica promoted, the old primary restarted.

The scenarios' own rules (no 5xx, blocked devices 403, enforcement back within 2 s, no record
or acknowledged block lost) are what make them pass; these tests prove the script runs them
end to end in CI.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
LIMIT = 60.0  # seconds: redis-kill-open takes ~12 s on an idle machine
CLUSTER_LIMIT = 120.0  # seconds: cluster-failover takes ~17 s on an idle machine
STOP_GRACE = 30.0  # seconds bench/chaos gets to stop what it started after a SIGTERM


def run_chaos(scenario: str, report: Path, limit: float) -> tuple[str, dict[str, Any]]:
    """bench/chaos.py --only <scenario> --seconds 2 --rate 100; asserts it passed and its
    table row says so; returns its output and the scenario's JSON. Past `limit` it gets
    SIGTERM (it stops its processes and engines, as on Ctrl-C) and the test fails."""
    argv = [sys.executable, str(REPO / "bench" / "chaos.py"), "--only", scenario,
            "--seconds", "2", "--rate", "100", "--output", str(report)]  # fmt: skip
    with subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                stdout, stderr = proc.communicate(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            pytest.fail(f"{scenario} did not finish within {limit} s:\n{stdout}{stderr}")
    output = stdout + stderr
    assert proc.returncode == 0, output
    rows = [line.split() for line in stdout.splitlines()]
    row = next((r for r in rows if r and r[0] == scenario and len(r) >= 4), None)
    assert row is not None and row[-1] == "pass", output
    assert int(row[1]) > 0, row  # requests were sent
    data = json.loads(report.read_text())
    (result,) = data["scenarios"]
    assert result["name"] == scenario and result["passed"] is True
    assert result["lost_records"] == 0
    assert result["checks"] and all(c["passed"] for c in result["checks"])
    assert result["statuses"].get("403", 0) > 0  # the blocked devices were refused
    assert not any(key.startswith("5") for key in result["statuses"]), result["statuses"]
    return output, result


def test_chaos_runs_one_short_scenario_and_reports_a_pass(tmp_path: Path) -> None:
    run_chaos("redis-kill-open", tmp_path / "chaos.json", LIMIT)


@pytest.mark.timeout(CLUSTER_LIMIT + STOP_GRACE + 30)
def test_chaos_cluster_failover_passes(tmp_path: Path) -> None:
    _, result = run_chaos("cluster-failover", tmp_path / "chaos.json", CLUSTER_LIMIT)
    rules = " | ".join(c["rule"] for c in result["checks"])
    for promise in ("enforcement back within 2 s of the promotion", "no acknowledged block lost",
                    "no gateway process exited", "0 gateway-made 5xx"):  # fmt: skip
        assert promise in rules, rules
    figures = result["figures"]
    assert 0 < figures["failover (s, kill to promotion seen by every node)"] < 20, figures
    assert figures["seconds to enforcement after the promotion"] < 2, figures
