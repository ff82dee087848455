"""gateway.loops: which event loop a process runs on, chosen before it runs."""

from __future__ import annotations

import asyncio
import io

import pytest

from gateway import cli, loops
from gateway.errors import ConfigError

uvloop = pytest.importorskip("uvloop")  # the dev extra installs it: CI always has it

CASES = {
    "unset": ({}, "uvloop"),
    "auto": ({"DEVICEGATE_LOOP": "auto"}, "uvloop"),
    "empty": ({"DEVICEGATE_LOOP": ""}, "uvloop"),
    "asyncio": ({"DEVICEGATE_LOOP": "asyncio"}, "asyncio"),
    "asyncio_any_case": ({"DEVICEGATE_LOOP": " AsyncIO "}, "asyncio"),
    "uvloop": ({"DEVICEGATE_LOOP": "uvloop"}, "uvloop"),
}


@pytest.mark.parametrize(("env", "expected"), CASES.values(), ids=CASES.keys())
def test_loop_factory(env: dict[str, str], expected: str) -> None:
    factory = loops.loop_factory(env)
    assert loops.loop_name(factory) == expected
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop) == (expected == "uvloop")
    finally:
        loop.close()


def test_a_bad_choice_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        loops.loop_factory({"DEVICEGATE_LOOP": "trio"})
    assert str(caught.value) == (
        "environment: DEVICEGATE_LOOP: must be one of auto, uvloop, asyncio"
    )


def test_uvloop_asked_for_but_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loops, "_uvloop_factory", lambda: None)
    assert loops.loop_factory({}) is asyncio.new_event_loop  # auto falls back
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        loops.loop_factory({"DEVICEGATE_LOOP": "uvloop"})


def test_run_runs_on_the_chosen_loop_and_no_exception_is_being_handled() -> None:
    async def probe() -> tuple[str, object]:
        try:
            raise ValueError("probe")
        except ValueError as exc:
            return type(asyncio.get_running_loop()).__module__, exc.__context__

    for env, module in (({"DEVICEGATE_LOOP": "asyncio"}, "asyncio"), ({}, "uvloop")):
        where, context = loops.run(probe(), loops.loop_factory(env))
        assert where.split(".")[0] == module
        assert context is None  # nothing around the loop leaks into its exceptions


def test_gateway_run_refuses_a_bad_loop_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICEGATE_LOOP", "nope")
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    assert cli.main(["run"], env={}, out=io.StringIO(), err=err) == cli.EXIT_USAGE
    assert "DEVICEGATE_LOOP: must be one of auto, uvloop, asyncio" in err.getvalue()
