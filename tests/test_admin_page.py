"""The admin page's text module (static/text.js), run in node: characters that could hide,
reorder or fake what an operator reads become visible markers, the same set the CLI escapes."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from gateway.admin_client import _hidden
from tests.rig.node_js import run_modules, static_module

PARTS = """
import { displayParts, displayText } from "./text.js";
print(input.map((text) => [displayParts(text), displayText(text)]));
"""

# A value as stored -> the parts the page renders: plain text, or one escaped character
# ("U+XXXX", shown as a styled marker).
Parts = list[tuple[str, bool]]
CASES: dict[str, tuple[str, Parts]] = {
    "plain": ("Front door", [("Front door", False)]),
    "empty": ("", []),
    "right-to-left-override": (
        "evil\u202eboss",
        [("evil", False), ("U+202E", True), ("boss", False)],
    ),
    "terminal-escape": ("a\x1b[2J", [("a", False), ("U+001B", True), ("[2J", False)]),
    "newline-and-tab": ("\n\t", [("U+000A", True), ("U+0009", True)]),
    "c1-next-line": ("\x85", [("U+0085", True)]),
    "zero-width-space": ("pay\u200bpal", [("pay", False), ("U+200B", True), ("pal", False)]),
    "byte-order-mark": ("\ufeffx", [("U+FEFF", True), ("x", False)]),
    "left-to-right-mark": ("x\u200e", [("x", False), ("U+200E", True)]),
    "isolates": ("\u2068x\u2069", [("U+2068", True), ("x", False), ("U+2069", True)]),
    "line-separator": ("\u2028", [("U+2028", True)]),
    "paragraph-separator": ("\u2029", [("U+2029", True)]),
    "no-break-space": ("a\xa0b", [("a", False), ("U+00A0", True), ("b", False)]),
    "en-quad-space": ("\u2000", [("U+2000", True)]),
    "private-use": ("\ue000", [("U+E000", True)]),
    "private-use-astral-is-one-marker": ("\U00100000", [("U+100000", True)]),
    "plain-spaces-kept": ("a  b ", [("a  b ", False)]),
    "emoji-kept-whole": ("📱 ok", [("📱 ok", False)]),
    "combining-mark-kept": ("e\u0301", [("e\u0301", False)]),
    "markup-is-text": ('<b onclick="x">&amp;', [('<b onclick="x">&amp;', False)]),
}


@pytest.mark.parametrize(("text", "parts"), CASES.values(), ids=CASES.keys())
def test_display_parts(tmp_path: Path, text: str, parts: Parts) -> None:
    [(got, flat)] = run_modules(tmp_path, {"text.js": static_module("text.js")}, PARTS, [text])
    assert [(p["text"], p["escaped"]) for p in got] == parts
    # The tooltip's flat form: markers in angle brackets, as the CLI writes them.
    assert flat == "".join(f"<{t}>" if escaped else t for t, escaped in parts)


EVERY_CODE_POINT = """
import { displayParts } from "./text.js";
const hidden = [];
const unassigned = [];  // ranges [first, last] unassigned in node's Unicode version
const CN = /\\p{Cn}/u;
for (let code = 0; code <= 0x10ffff; code++) {
  if (code >= 0xd800 && code <= 0xdfff) continue;  // surrogates: not characters
  const ch = String.fromCodePoint(code);
  if (CN.test(ch)) {
    const last = unassigned[unassigned.length - 1];
    if (last && last[1] === code - 1) last[1] = code;
    else unassigned.push([code, code]);
  } else if (displayParts(ch)[0].escaped) {
    hidden.push(code);
  }
}
print({ hidden, unassigned });
"""


def test_the_page_and_the_cli_hide_the_same_characters(tmp_path: Path) -> None:
    found = run_modules(tmp_path, {"text.js": static_module("text.js")}, EVERY_CODE_POINT, None)
    node_unassigned = {c for first, last in found["unassigned"] for c in range(first, last + 1)}
    # Compared over the characters both Unicode versions (Python's, node's ICU) assign:
    # a character added in a later version is unassigned in the other one.
    both = [
        code
        for code in range(0x110000)
        if not 0xD800 <= code <= 0xDFFF
        and code not in node_unassigned
        and unicodedata.category(chr(code)) != "Cn"
    ]
    in_node = set(found["hidden"])
    differ = [f"U+{c:04X}" for c in both if (c in in_node) != _hidden(chr(c))]
    assert differ == []
    assert len(in_node) > 137_000  # private use planes, controls, format, spaces
