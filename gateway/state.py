"""Files the gateway keeps between runs: where they live and how they are written.

The state directory holds the blocked-ids snapshot (`gateway.store.snapshot`) and a
generated admin token. `state.dir` in the config names it; left unset it is
`$XDG_STATE_HOME/devicegate`, else `~/.local/state/devicegate`; `false` keeps no files.
Every file is written whole or not at all (a temporary file beside it, fsync, rename), so
a crash mid-write leaves the previous version, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

APP_DIR = "devicegate"
# File-name characters a host name keeps; anything else (an IPv6 address's colons, a zone's
# "%") becomes "_".
_NAME_UNSAFE = re.compile(r"[^a-z0-9.-]")


def state_dir(configured: str | Literal[False] | None, env: Mapping[str, str]) -> Path | None:
    """The directory state files go to, or None when the configuration keeps none."""
    if configured is False:
        return None
    if configured:
        return Path(configured).expanduser()
    base = env.get("XDG_STATE_HOME")
    if base and Path(base).is_absolute():
        return Path(base) / APP_DIR
    home = env.get("HOME")
    if not home:
        return None
    return Path(home) / ".local" / "state" / APP_DIR


def admin_token_file(
    configured: str | Literal[False] | None, host: str, port: int, env: Mapping[str, str]
) -> Path | None:
    """Where the generated admin token of the admin listener at host:port is kept, or None
    when the configuration keeps no state files.

    `gateway run` writes it, `gateway devices` reads it: one name per listener, so two
    gateways sharing a state directory do not overwrite each other's token.
    """
    directory = state_dir(configured, env)
    if directory is None:
        return None
    name = _NAME_UNSAFE.sub("_", host.strip("[]").lower())
    return directory / f"admin-token-{name}-{port}"


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data` in one step, readable by the owner only (by default).

    Raises OSError when the directory cannot be made or written.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(scratch, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        raise
    # The rename itself is durable once the directory is synced.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
