"""bench/chaos works: one short scenario (Redis SIGKILLed for 2 s under load, on_error: open)
runs against a real gateway subprocess, redis-server and upstream, exits 0, prints its table
row as a pass and writes its JSON report.

The scenario's own rules (no 5xx, blocked devices 403, enforcement back within 2 s, no record
lost) are what make it pass; this test proves the script runs them end to end in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
LIMIT = 60.0  # seconds: the run takes ~12 s on an idle machine


def test_chaos_runs_one_short_scenario_and_reports_a_pass(tmp_path: Path) -> None:
    report = tmp_path / "chaos.json"
    argv = [sys.executable, str(REPO / "bench" / "chaos.py"), "--only", "redis-kill-open",
            "--seconds", "2", "--rate", "100", "--output", str(report)]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=LIMIT)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    rows = [line.split() for line in done.stdout.splitlines()]
    row = next((r for r in rows if r and r[0] == "redis-kill-open" and len(r) >= 4), None)
    assert row is not None and row[-1] == "pass", output
    assert int(row[1]) > 0, row  # requests were sent
    data = json.loads(report.read_text())
    (scenario,) = data["scenarios"]
    assert scenario["name"] == "redis-kill-open" and scenario["passed"] is True
    assert scenario["lost_records"] == 0
    assert scenario["checks"] and all(c["passed"] for c in scenario["checks"])
    assert scenario["statuses"].get("403", 0) > 0  # the blocked devices were refused
    assert not any(key.startswith("5") for key in scenario["statuses"]), scenario["statuses"]
