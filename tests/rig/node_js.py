"""The admin page's ES modules run under node, as a browser runs them (tests of the page)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest

WAIT = 15.0  # bounds one node run


def static_module(name: str) -> bytes:
    """The source of one of the page's modules as the package ships it (`paths.js`, ...)."""
    return (resources.files("gateway.admin") / "static" / name).read_bytes()


def run_modules(work: Path, modules: Mapping[str, bytes], main: str, data: Any) -> Any:
    """Run `main`, an ES module that may `import ... from "./NAME"` each of `modules` (name ->
    source) and reads `input`; it must `print()` one JSON value, which is returned.

    The modules are written as `.mjs` (node reads a plain `.js` file as CommonJS) and the
    imports in `main` are pointed at them; `data` reaches `main` as `input`, parsed JSON.
    Without node the test fails: the page's code is not tested otherwise.
    """
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node is not installed; the admin page's ES modules are tested by running them "
            "in node (apt-get install nodejs: Node 18 or later)"
        )
    for name, source in modules.items():
        (work / _mjs(name)).write_bytes(source)
        main = main.replace(f'"./{name}"', f'"./{_mjs(name)}"')
    prelude = (
        'import { readFileSync } from "node:fs";\n'
        'const input = JSON.parse(readFileSync(0, "utf8"));\n'
        "const print = (value) => process.stdout.write(JSON.stringify(value));\n"
    )
    script = work / "main.mjs"
    script.write_text(prelude + main)
    done = subprocess.run(
        [node, str(script)],
        input=orjson.dumps(data),
        capture_output=True,
        cwd=work,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return orjson.loads(done.stdout)


def _mjs(name: str) -> str:
    return name.removesuffix(".js") + ".mjs"
