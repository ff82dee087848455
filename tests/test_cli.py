"""The `gateway` command: check-config, the devices commands against a real admin API, run --demo.

`main` calls asyncio.run itself, so the devices commands run in a worker thread
(`asyncio.to_thread`) while the admin app they talk to is served on this test's loop.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from pytest_aiohttp import AiohttpServer

from gateway.admin import create_admin_app
from gateway.cli import main
from gateway.model import Bucket, DeviceIdentity
from gateway.state import admin_token_file
from gateway.store import Store
from tests.rig.clock import FakeClock
from tests.rig.system import REPO, TESTS_DIR, free_port

CONFIG = REPO / "config.yaml"
BAD_CONFIGS = TESTS_DIR / "configs"
TOKEN = "cli-admin-token-0123456789abcdef"
BUCKET = Bucket(rate=100.0, burst=100)
WAIT = 15.0  # seconds: the bound on every wait for a process or a line of output


def run_cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `gateway ARGV` run in-process with a clean environment."""
    out, err = io.StringIO(), io.StringIO()
    try:
        code = main(list(argv), env=env or {}, out=out, err=err)
    except SystemExit as exc:  # argparse refusing the arguments
        code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------- check-config


def test_check_config_accepts_the_repository_config() -> None:
    code, out, err = run_cli("check-config", "--config", str(CONFIG))
    assert (code, err) == (0, "")
    assert (
        out
        == f"config ok: {CONFIG}\nstore: embedded (memory://: one process, state lost on restart)\n"
    )


@pytest.mark.parametrize(
    ("url", "store"),
    [
        ("redis://:secret@cache:6380/2", "one Redis server: cache:6380/2"),
        ("unix:///run/redis.sock", "one Redis server: /run/redis.sock"),
        (
            "rediss+cluster://:secret@10.0.0.1:7000,10.0.0.2",
            "Redis Cluster over TLS, discovered from 10.0.0.1:7000, 10.0.0.2:6379",
        ),
        (
            "redis+sentinel://s1,s2:26380/devicegate?sentinel_password=secret",
            "the primary the sentinels s1:26379, s2:26380 name for 'devicegate', db 0",
        ),
    ],
)
def test_check_config_says_which_store_without_credentials(url: str, store: str) -> None:
    code, out, err = run_cli(
        "check-config", "--config", str(CONFIG), env={"GATEWAY_REDIS_URL": url}
    )
    assert (code, err) == (0, "")
    assert out.splitlines()[1] == f"store: {store}"
    assert "secret" not in out


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("burst_zero.yaml", "rate_limits.device.burst: must be between 1 and 1000000"),
        ("invalid_yaml.yaml", "invalid YAML"),
        ("not_a_mapping.yaml", "must be a mapping"),
    ],
)
def test_check_config_rejects_a_bad_file_with_exit_2_and_no_traceback(
    name: str, message: str
) -> None:
    path = BAD_CONFIGS / name
    code, out, err = run_cli("check-config", "--config", str(path))
    assert (code, out) == (2, "")
    assert err.startswith(f"gateway: config error: {path}: ")
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_check_config_names_a_missing_file() -> None:
    missing = str(BAD_CONFIGS / "no-such-file.yaml")
    code, _, err = run_cli("check-config", "--config", missing)
    assert (code, err) == (2, f"gateway: config error: {missing}: file not found\n")


def test_check_config_names_the_environment_variable_that_set_a_bad_value() -> None:
    code, _, err = run_cli(
        "check-config", "--config", str(CONFIG), env={"GATEWAY_LISTEN": "nowhere"}
    )
    assert code == 2
    assert "server.listen" in err and "(from GATEWAY_LISTEN)" in err


def test_python_dash_m_gateway_exits_2_on_a_bad_config() -> None:
    bad = BAD_CONFIGS / "burst_zero.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_clean_env(),
        timeout=WAIT,
    )
    assert proc.returncode == 2
    assert "rate_limits.device.burst: must be between 1 and 1000000" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- devices ...


@pytest.fixture
async def admin_url(aiohttp_server: AiohttpServer, clock: FakeClock) -> AsyncIterator[str]:
    """A real admin app on a free loopback port over a memory store with two devices."""
    store = Store.memory(clock=clock)
    await store.start()
    await store.enforce(
        DeviceIdentity(
            "tablet-1",
            application="FieldApp",
            application_version="2.4.1",
            manufacturer="Samsung",
            model="Galaxy Tab",
        ),
        "127.0.0.1",
        BUCKET,
        upload=True,
    )
    clock.advance(60_000)
    await store.enforce(DeviceIdentity("phone-2", os="iOS"), "127.0.0.1", BUCKET, upload=False)
    server = await aiohttp_server(create_admin_app(store, TOKEN))
    yield str(server.make_url("")).rstrip("/")
    await store.close()


async def devices(admin_url: str, *argv: str, json: bool = False) -> tuple[int, str, str]:
    """`gateway devices [--json] ARGV` against the admin API, run off this loop."""
    args = ["devices", "--config", str(CONFIG), "--admin-url", admin_url, "--token", TOKEN]
    if json:
        args.append("--json")
    return await asyncio.to_thread(run_cli, *args, *argv)


async def devices_json(admin_url: str, *argv: str) -> Any:
    code, out, err = await devices(admin_url, *argv, json=True)
    assert (code, err) == (0, ""), err
    return orjson.loads(out)


async def test_devices_list_as_a_table_and_as_json(admin_url: str) -> None:
    code, out, err = await devices(admin_url, "list")
    assert (code, err) == (0, "")
    header, first, second, count = out.splitlines()
    assert header.split() == ["ID", "NAME", "APPLICATION", "DEVICE", "LAST", "ACTIVITY", "(UTC)",
                              "STATUS"]  # fmt: skip
    # Most recent activity first; no name set shows "-".
    assert first.split() == ["phone-2", "-", "-", "-", "2026-11-03", "23:25:19", "active"]
    assert second.split() == [
        "tablet-1", "-", "FieldApp", "2.4.1", "Samsung", "Galaxy", "Tab",
        "2026-11-03", "23:24:19", "active",
    ]  # fmt: skip
    assert count == "2 of 2 devices"

    listed = await devices_json(admin_url, "list")
    assert listed["total"] == 2
    assert [d["id"] for d in listed["devices"]] == ["phone-2", "tablet-1"]
    assert listed["devices"][1]["last_data_upload"] == "2026-11-03T23:24:19.787Z"

    filtered = await devices_json(admin_url, "list", "--name", "TAB")
    assert [d["id"] for d in filtered["devices"]] == ["tablet-1"]


async def test_devices_show_as_a_table_and_as_json(admin_url: str) -> None:
    code, out, err = await devices(admin_url, "show", "tablet-1")
    assert (code, err) == (0, "")
    rows = dict(line.split(None, 1) for line in out.splitlines() if "  " in line)
    assert rows["Identifier"].strip() == "tablet-1"
    assert rows["Application"].strip() == "FieldApp 2.4.1"
    assert rows["Status"].strip() == "active"
    assert "First seen        2026-11-03 23:24:19.787" in out
    assert "Requests          1 (0 denied)" in out

    shown = await devices_json(admin_url, "show", "tablet-1")
    assert shown["id"] == "tablet-1" and shown["request_count"] == 1
    assert shown["first_seen"] == "2026-11-03T23:24:19.787Z"


async def test_devices_block_and_unblock(admin_url: str) -> None:
    code, out, err = await devices(admin_url, "block", "phone-2")
    assert (code, err) == (0, "")
    assert re.search(r"^Status +blocked$", out, re.M), out
    only = await devices_json(admin_url, "list", "--blocked", "only")
    assert [d["id"] for d in only["devices"]] == ["phone-2"]
    hidden = await devices_json(admin_url, "list", "--blocked", "hide")
    assert [d["id"] for d in hidden["devices"]] == ["tablet-1"]

    again = await devices_json(admin_url, "block", "phone-2")  # idempotent
    assert again["blocked"] is True and again["blocked_at"] == "2026-11-03T23:25:19.787Z"

    unblocked = await devices_json(admin_url, "unblock", "phone-2")
    assert unblocked["blocked"] is False and unblocked["blocked_at"] is None
    code, out, _ = await devices(admin_url, "unblock", "phone-2")
    assert code == 0 and re.search(r"^Status +active$", out, re.M)
    assert (await devices_json(admin_url, "list", "--blocked", "only"))["total"] == 0

    # An id never seen can be blocked in advance.
    pre = await devices_json(admin_url, "block", "stolen-9")
    assert pre["blocked"] is True and pre["request_count"] == 0


async def test_devices_rename_and_clear(admin_url: str) -> None:
    code, out, err = await devices(admin_url, "rename", "phone-2", "Warehouse scanner")
    assert (code, err) == (0, "")
    assert re.search(r"^Name +Warehouse scanner$", out, re.M), out
    found = await devices_json(admin_url, "list", "--name", "warehouse")
    assert [(d["id"], d["name"]) for d in found["devices"]] == [("phone-2", "Warehouse scanner")]
    code, out, _ = await devices(admin_url, "list")
    assert "Warehouse scanner" in out

    cleared = await devices_json(admin_url, "rename", "phone-2", "")
    assert cleared["name"] is None and cleared["display_name"] == "phone-2"


async def test_devices_show_unknown_id_exits_1_with_the_reason(admin_url: str) -> None:
    code, out, err = await devices(admin_url, "show", "nope")
    assert (code, out) == (1, "")
    assert err == "gateway: Admin API: Device not found (HTTP 404 on GET /devices/nope)\n"


async def test_devices_without_a_token_exits_1(admin_url: str) -> None:
    # The repository config has no admin.token, and the environment is empty.
    code, out, err = await asyncio.to_thread(
        run_cli, "devices", "--config", str(CONFIG), "--admin-url", admin_url, "list"
    )
    assert (code, out) == (1, "")
    assert err == (
        "gateway: no admin token: pass --token, set GATEWAY_ADMIN_TOKEN or admin.token "
        "in the config\n"
    )
    # The environment variable is enough.
    code, out, _ = await asyncio.to_thread(
        run_cli,
        "devices", "--config", str(CONFIG), "--admin-url", admin_url, "list",
        env={"GATEWAY_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    assert code == 0 and out.endswith("2 of 2 devices\n")


async def test_devices_reads_the_token_a_running_gateway_generated(
    admin_url: str, tmp_path: Path
) -> None:
    # What `gateway run` without a token writes for the listener of the config used.
    env = {"XDG_STATE_HOME": str(tmp_path)}
    saved = admin_token_file(None, "127.0.0.1", 8081, env)
    assert saved is not None
    argv = ("devices", "--config", str(CONFIG), "--admin-url", admin_url, "list")
    code, out, err = await asyncio.to_thread(run_cli, *argv, env=env)
    assert (code, out) == (1, "")
    assert err == (
        "gateway: no admin token: pass --token, set GATEWAY_ADMIN_TOKEN or admin.token in the "
        f"config (no generated token in {saved})\n"
    )
    saved.parent.mkdir(parents=True)
    saved.write_text(TOKEN + "\n")
    code, out, err = await asyncio.to_thread(run_cli, *argv, env=env)
    assert (code, err) == (0, "") and out.endswith("2 of 2 devices\n")
    # A token given explicitly wins over the file.
    code, _, err = await asyncio.to_thread(
        run_cli, *argv, "--token", "wrong-token-0123456789", env=env
    )
    assert code == 1 and "Invalid admin token" in err


async def test_devices_with_a_wrong_token_exits_1(admin_url: str) -> None:
    code, out, err = await asyncio.to_thread(
        run_cli,
        "devices", "--config", str(CONFIG), "--admin-url", admin_url,
        "--token", "wrong-token-0123456789", "list",
    )  # fmt: skip
    assert (code, out) == (1, "")
    assert err.startswith("gateway: Admin API: Invalid admin token; check the admin token")
    assert "HTTP 401" in err


async def test_devices_against_an_unreachable_admin_exits_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, out, err = await devices(url, "list")
    assert (code, out) == (1, "")
    assert err.startswith(f"gateway: Cannot reach the admin API at {url}: "), err
    assert err.count("\n") == 1 and "Traceback" not in err


async def test_devices_options_are_accepted_after_the_action(admin_url: str) -> None:
    code, out, err = await asyncio.to_thread(
        run_cli, "devices", "list", "--json", "--admin-url", admin_url, "--token", TOKEN
    )
    assert (code, err) == (0, ""), err
    assert orjson.loads(out)["total"] == 2


# ---------------------------------------------------------------- run --demo


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without GATEWAY_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


async def _read_demo_lines(stream: asyncio.StreamReader) -> list[str]:
    """stdout lines up to the one that names the admin token (the last of the curl lines)."""
    lines: list[str] = []
    while True:
        raw = await stream.readline()
        if not raw:
            raise AssertionError(f"stdout closed before the curl lines: {lines}")
        lines.append(raw.decode())
        if "admin token:" in lines[-1]:
            return lines


def test_run_without_a_token_or_a_state_dir_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"server: {{listen: '127.0.0.1:{free_port()}'}}\n"
        f"admin: {{listen: '127.0.0.1:{free_port()}'}}\n"
        "state: {dir: false}\n"
    )
    proc = subprocess.run(  # stderr is a pipe, not a terminal: the token could go nowhere
        [sys.executable, "-m", "gateway", "run", "--config", str(config), "--workers", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_clean_env(),
        timeout=WAIT,
    )
    assert (proc.returncode, proc.stdout) == (1, "")
    last = proc.stderr.splitlines()[-1]
    assert last == (
        "gateway: cannot start: no admin token configured, and nowhere to keep a generated "
        "one (state.dir is false; stderr is not a terminal): set admin.token (or "
        "GATEWAY_ADMIN_TOKEN) or state.dir"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
async def test_run_demo_end_to_end(tmp_path: Path) -> None:
    public_port, admin_port = free_port(), free_port()
    state = tmp_path / "state"
    env = _clean_env(
        GATEWAY_LISTEN=f"127.0.0.1:{public_port}",
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
        GATEWAY_REDIS_URL="memory://",
        GATEWAY_STATE_DIR=str(state),
    )
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--demo", "--config", str(CONFIG),
            stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=REPO, env=env,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        try:
            lines = await asyncio.wait_for(_read_demo_lines(proc.stdout), WAIT)
        except TimeoutError:
            pytest.fail(f"no curl lines within {WAIT} s; stderr: {stderr_path.read_text()}")
        text = "".join(lines)
        token_match = re.search(r"Authorization: Bearer ([^']+)'", text)
        assert token_match is not None, text
        token = token_match.group(1)
        assert f"admin token: {token})" in text
        device_line = next(line for line in lines if "curl -i" in line)
        headers = dict(re.findall(r"-H '([^:]+): ([^']*)'", device_line))
        assert headers["X-Device-Id"] == "demo-phone-1"
        url = device_line.split()[-1]
        assert url == f"http://127.0.0.1:{public_port}/api/data"
        admin = f"http://127.0.0.1:{admin_port}"
        auth = {"Authorization": f"Bearer {token}"}

        timeout = aiohttp.ClientTimeout(total=WAIT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(url, headers=headers) as resp:
                assert resp.status == 200
                echoed = orjson.loads(await resp.read())
            assert echoed["path"] == "/api/data"
            assert ["X-Device-Id", "demo-phone-1"] in echoed["headers"]
            async with http.get(f"{admin}/devices/demo-phone-1", headers=auth) as resp:
                assert resp.status == 200
                shown = orjson.loads(await resp.read())["result"]
            assert (shown["application"], shown["model"]) == ("FieldApp", "Galaxy S24")
            async with http.post(f"{admin}/devices/demo-phone-1/block", headers=auth) as resp:
                assert resp.status == 200
            # Bound to loopback: a rebound name in Host is refused, even with the token.
            rebound = {**auth, "Host": f"rebound.example:{admin_port}"}
            async with http.get(f"{admin}/devices/demo-phone-1", headers=rebound) as resp:
                assert resp.status == 403
            async with http.get(url, headers=headers) as resp:
                assert resp.status == 403
                assert orjson.loads(await resp.read()) == {
                    "status": False,
                    "result": "Access denied: device is blocked",
                }

        # The generated token: in a private file that `gateway devices` reads, in no log line.
        saved = state / f"admin-token-127.0.0.1-{admin_port}"
        assert saved.read_text() == token + "\n"
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600
        cli_env = {
            "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
            "GATEWAY_STATE_DIR": str(state),
        }
        code, out, err = await asyncio.to_thread(
            run_cli, "devices", "--json", "show", "demo-phone-1", env=cli_env
        )
        assert (code, err) == (0, "") and orjson.loads(out)["blocked"] is True

        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), WAIT)
        errors = stderr_path.read_text()
        assert code == 0, errors
        assert "Traceback" not in errors
        assert token not in errors
        # JSON log lines; the CLI's own notes ("memory:// store: running 1 worker") are text.
        logged = [orjson.loads(line) for line in errors.splitlines() if line.startswith("{")]
        assert any(
            entry["level"] == "warning" and entry.get("admin_token_file") == str(saved)
            for entry in logged
        ), errors
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
