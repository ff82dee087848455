"""The machine under the tests: the repository's paths, free loopback ports, child pids."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Final

TESTS_DIR: Final = Path(__file__).resolve().parent.parent
REPO: Final = TESTS_DIR.parent


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid` (a supervisor's workers)."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]
