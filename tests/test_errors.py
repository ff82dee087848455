"""gateway.errors: the tree in the docstring is the tree of classes, and each class is raised."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from gateway import errors

GATEWAY = Path(errors.__file__).resolve().parent
CLASSES: dict[str, type[BaseException]] = {
    name: obj
    for name, obj in vars(errors).items()
    if isinstance(obj, type)
    and issubclass(obj, BaseException)
    and obj.__module__ == errors.__name__
}
# A tree line: the glyphs, a class name, then (usually) its description.
_LINE = re.compile(r"^(?P<indent>[ │├└─]*?)(?:[├└]── )?(?P<name>[A-Z]\w+)(?:\s|$)")


def _drawn() -> dict[str, tuple[str | None, str]]:
    """Class -> (parent, its text in the tree) as the module docstring draws them."""
    doc = errors.__doc__ or ""
    tree = doc.split("\n\n")[1]
    found: dict[str, tuple[str | None, str]] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, class)
    last = ""
    for line in tree.splitlines():
        body = line[4:]
        match = _LINE.match(body)
        if match is None or match.group("name") not in CLASSES:
            found[last] = (found[last][0], found[last][1] + " " + body.strip(" │"))
            continue  # a description carried over
        column = match.start("name")
        while stack and stack[-1][0] >= column:
            stack.pop()
        parent = stack[-1][1] if stack else None
        last = match.group("name")
        found[last] = (parent, body[match.end("name") :].strip())
        stack.append((column, last))
    return found


def test_the_docstring_draws_every_class_under_its_base() -> None:
    drawn = _drawn()
    assert set(drawn) == set(CLASSES)
    for name, cls in CLASSES.items():
        base = cls.__base__
        expected = base.__name__ if base is not None and base.__name__ in CLASSES else None
        assert drawn[name][0] == expected, name


def _raised_names(path: Path) -> set[str]:
    """Classes of gateway.errors that the module at `path` constructs (raises, or builds to
    raise or to hand to a future): only names bound by an import from gateway.errors, so a
    class of the same name defined in the module itself does not count."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bound: dict[str, str] = {}
    module_aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "gateway.errors":
            for alias in node.names:
                bound[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module == "gateway":
            module_aliases |= {a.asname or a.name for a in node.names if a.name == "errors"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bound.pop(node.name, None)  # shadowed by a class of the module's own
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in bound:
            found.add(bound[func.id])
        elif (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id in module_aliases
        ):
            found.add(func.attr)
    return found


RAISED: set[str] = set().union(*(_raised_names(p) for p in GATEWAY.rglob("*.py")))


@pytest.mark.parametrize("name", list(CLASSES))
def test_every_class_is_raised_somewhere(name: str) -> None:
    cls = CLASSES[name]
    if name in RAISED:
        return
    # A base raised only through its subclasses: the tree must say so, and one must be raised.
    assert "raised only through its subclass" in _drawn()[name][1], name
    assert any(issubclass(CLASSES[n], cls) for n in RAISED), name


def test_request_refused_carries_its_answer() -> None:
    refused = errors.RequestRefused(431, "Request header fields too large")
    assert (refused.status, refused.reason, str(refused)) == (
        431,
        "Request header fields too large",
        "Request header fields too large",
    )
