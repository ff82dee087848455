"""gateway.app.admin_token: a generated admin token is saved to a private file or shown on a
terminal, never logged; with neither possible the gateway refuses to start."""

from __future__ import annotations

import io
import logging
import stat
from pathlib import Path

import pytest

from gateway.app import admin_token
from gateway.config import Settings, parse_config
from gateway.errors import AdminTokenError
from gateway.logs import JsonFormatter
from gateway.state import admin_token_file

CONFIGURED = "configured-admin-token-0123456789"
FIX = "set admin.token (or GATEWAY_ADMIN_TOKEN) or state.dir"


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def settings(text: str = "") -> Settings:
    return parse_config(text, "test.yaml", {})


def log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every captured record as the JSON log line it becomes (fields included)."""
    formatter = JsonFormatter()
    return [formatter.format(record) for record in caplog.records]


@pytest.fixture(autouse=True)
def _capture_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway")


def test_a_configured_token_is_used_as_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path)}
    chosen = settings(f"admin: {{token: {CONFIGURED}, listen: '0.0.0.0:8081'}}")
    assert admin_token(chosen, env=env, stderr=io.StringIO()) == CONFIGURED
    assert not (tmp_path / "devicegate").exists()
    assert caplog.records == []  # no generated-token warning, not even bound to 0.0.0.0


def test_a_generated_token_is_saved_privately_and_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path)}
    stderr = Terminal()  # a terminal, even: the file is the place once it can be written
    token = admin_token(settings(), env=env, stderr=stderr)
    path = tmp_path / "devicegate" / "admin-token-127.0.0.1-8081"
    assert admin_token_file(None, "127.0.0.1", 8081, env) == path
    assert path.read_text() == token + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 43  # 32 random bytes, URL-safe base64
    lines = log_lines(caplog)
    assert lines and all(token not in line for line in lines)
    assert any(str(path) in line and '"level":"warning"' in line for line in lines)
    assert stderr.getvalue() == ""


def test_each_run_writes_a_new_token(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path)}
    first = admin_token(settings(), env=env)
    second = admin_token(settings(), env=env)
    assert first != second
    assert (tmp_path / "devicegate" / "admin-token-127.0.0.1-8081").read_text() == second + "\n"


# admin.listen -> the token file's name: one per listener, IPv6 made file-name safe.
FILE_NAMES = {
    "ipv4": ("127.0.0.1:8081", "admin-token-127.0.0.1-8081"),
    "ipv6": ("[::1]:9000", "admin-token-__1-9000"),
    "ipv6-long": ("[2001:DB8::1]:443", "admin-token-2001_db8__1-443"),
    "name": ("Admin.Example:8081", "admin-token-admin.example-8081"),
    "wildcard": ("0.0.0.0:1", "admin-token-0.0.0.0-1"),
}


@pytest.mark.parametrize(("listen", "name"), FILE_NAMES.values(), ids=FILE_NAMES.keys())
def test_the_token_file_is_named_after_the_listener(tmp_path: Path, listen: str, name: str) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path)}
    token = admin_token(settings(f"admin: {{listen: '{listen}'}}"), env=env)
    assert [p.name for p in (tmp_path / "devicegate").iterdir()] == [name]
    assert (tmp_path / "devicegate" / name).read_text() == token + "\n"


def test_without_a_state_dir_a_terminal_is_shown_the_token_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stderr = Terminal()
    token = admin_token(settings("state: {dir: false}"), env={}, stderr=stderr)
    assert stderr.getvalue() == (
        f"gateway: generated admin token for this run (not saved: state.dir is false):\n  {token}\n"
    )
    lines = log_lines(caplog)
    assert lines and all(token not in line for line in lines)


def test_a_failed_write_falls_back_to_the_terminal(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    stderr = Terminal()
    token = admin_token(settings(f"state: {{dir: '{blocker}'}}"), env={}, stderr=stderr)
    first, second = stderr.getvalue().splitlines()
    assert first.startswith(
        f"gateway: generated admin token for this run (not saved: cannot write {blocker}/"
    )
    assert second == f"  {token}"


# No file and no terminal: the gateway refuses to start, naming the cause and the fix.
REFUSALS: dict[str, tuple[str, dict[str, str], str]] = {
    "state-dir-false": ("state: {dir: false}", {}, "state.dir is false"),
    "no-home": ("", {}, "no state directory: state.dir, XDG_STATE_HOME and HOME are unset"),
    # {tmp}/file is a regular file, so no directory can be made under it.
    "unwritable": ("state: {dir: '{tmp}/file/state'}", {}, "cannot write {tmp}/file/state/"),
}


@pytest.mark.parametrize(("config", "env", "cause"), REFUSALS.values(), ids=REFUSALS.keys())
def test_with_neither_a_file_nor_a_terminal_it_refuses_to_start(
    tmp_path: Path, config: str, env: dict[str, str], cause: str
) -> None:
    (tmp_path / "file").write_text("")
    config, cause = config.replace("{tmp}", str(tmp_path)), cause.replace("{tmp}", str(tmp_path))
    with pytest.raises(AdminTokenError) as caught:
        admin_token(settings(config), env=env, stderr=io.StringIO())
    message = str(caught.value)
    assert message.startswith("no admin token configured, and nowhere to keep a generated one (")
    assert cause in message and message.endswith(FIX)


# admin.listen with a generated token -> whether start-up warns that it is not loopback.
BINDINGS = {
    "ipv4-loopback": ("127.0.0.1:8081", False),
    "ipv4-loopback-block": ("127.9.8.7:8081", False),
    "ipv6-loopback": ("[::1]:8081", False),
    "localhost": ("localhost:8081", False),
    "ipv4-wildcard": ("0.0.0.0:8081", True),
    "ipv6-wildcard": ("[::]:8081", True),
    "private-address": ("10.0.0.5:8081", True),
    "a-name": ("admin.internal:8081", True),
}


@pytest.mark.parametrize(("listen", "warns"), BINDINGS.values(), ids=BINDINGS.keys())
def test_a_generated_token_on_a_non_loopback_listener_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, listen: str, warns: bool
) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path)}
    admin_token(settings(f"admin: {{listen: '{listen}'}}"), env=env)
    warned = [
        r for r in caplog.records if r.levelno == logging.WARNING and "non-loopback" in r.message
    ]
    assert len(warned) == int(warns)
