"""`gateway devices`: find a running gateway's admin API and token, make one call, print it.

The call goes through gateway.admin_client; the answer is printed as a table, one record,
or with `--json` as JSON. Every failure comes out as AdminClientError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import orjson

from gateway.admin_client import AdminClient, render_device, render_table
from gateway.config import Settings
from gateway.errors import AdminClientError
from gateway.state import admin_token_file

Action = Literal["list", "show", "block", "unblock", "rename"]


@dataclass(frozen=True, slots=True)
class DevicesCommand:
    """One `gateway devices` action, as parsed from the command line."""

    action: Action
    device_id: str | None = None  # show, block, unblock, rename
    name: str | None = None  # list: the name filter; rename: the new name ("" clears it)
    blocked: str = "all"
    page: int = 1
    amount: int = 20
    as_json: bool = False
    token: str | None = None  # --token
    admin_url: str | None = None  # --admin-url


def admin_url(settings: Settings) -> str:
    """The admin API's base URL on this host, from admin.listen."""
    host = settings.admin.listen.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.admin.listen.port}"


def read_token(path: Path) -> str | None:
    """The token a running gateway generated and saved, None when it saved none."""
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminClientError(f"cannot read the admin token file {path}: {exc}") from exc


def run(command: DevicesCommand, settings: Settings, env: Mapping[str, str], out: TextIO) -> None:
    """Make the call and print its answer to `out`."""
    token = command.token or env.get("GATEWAY_ADMIN_TOKEN") or settings.admin.token
    listen = settings.admin.listen
    saved = admin_token_file(settings.state.dir, listen.host, listen.port, env)
    if not token and saved is not None:
        token = read_token(saved)
    if not token:
        where = f" (no generated token in {saved})" if saved is not None else ""
        raise AdminClientError(
            "no admin token: pass --token, set GATEWAY_ADMIN_TOKEN or admin.token in the "
            f"config{where}"
        )
    url = command.admin_url or admin_url(settings)
    result, total = asyncio.run(_call(command, url, token))
    if command.as_json:
        payload = {"devices": result, "total": total} if total is not None else result
        out.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif total is not None:
        out.write(render_table(result, total) + "\n")
    else:
        out.write(render_device(result) + "\n")


async def _call(command: DevicesCommand, url: str, token: str) -> tuple[Any, int | None]:
    """The action's answer, and the total for a list (None otherwise)."""
    client = AdminClient(url, token)
    try:
        if command.action == "list":
            if command.page < 1 or not 1 <= command.amount <= 1000:
                raise AdminClientError("--page must be >= 1 and --amount 1..1000")
            devices, total = await client.list_devices(
                command.name, command.blocked, command.page, command.amount
            )
            return devices, total
        assert command.device_id is not None  # every other action names one device
        if command.action == "show":
            return await client.get_device(command.device_id), None
        if command.action == "block":
            return await client.block(command.device_id), None
        if command.action == "unblock":
            return await client.unblock(command.device_id), None
        return await client.rename(command.device_id, command.name or None), None
    finally:
        await client.close()
