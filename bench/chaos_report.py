"""What a chaos scenario found: its checks (each a rule and what was observed), its figures,
and the table printed at the end of a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Check:
    """One pass/fail rule and what was observed."""

    rule: str
    passed: bool
    observed: str


@dataclass
class Outcome:
    """A scenario's result: it passes when it ran and every check passed."""

    name: str
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    lost_records: int | None = None
    max_added_ms: float | None = None
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # the scenario could not run to its end

    def check(self, rule: str, passed: bool, observed: object) -> None:
        self.checks.append(Check(rule, bool(passed), str(observed)))

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.passed for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data


def _statuses(statuses: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in statuses.items()) or "-"


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def render_table(outcomes: Sequence[Outcome]) -> str:
    """The run's summary: one row per scenario, then every failed check."""
    header = (
        "scenario",
        "requests",
        "outcomes by status",
        "lost records",
        "max added ms",
        "result",
    )
    rows = [
        (
            o.name,
            str(o.requests),
            _statuses(o.statuses),
            _cell(o.lost_records),
            _cell(o.max_added_ms),
            "pass" if o.passed else "FAIL",
        )
        for o in outcomes
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in (header, *rows)]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    for o in outcomes:
        if o.error is not None:
            lines.append(f"{o.name}: could not run: {o.error}")
        for c in o.checks:
            if not c.passed:
                lines.append(f"{o.name}: FAILED {c.rule}: {c.observed}")
    return "\n".join(lines)


def render_checks(outcome: Outcome) -> str:
    """Every check of one scenario, one line each, and its figures."""
    lines = [f"== {outcome.name}: {'pass' if outcome.passed else 'FAIL'}"]
    for c in outcome.checks:
        lines.append(f"  [{'ok' if c.passed else 'FAIL'}] {c.rule}: {c.observed}")
    for name, value in outcome.figures.items():
        lines.append(f"  {name}: {value}")
    if outcome.error is not None:
        lines.append(f"  error: {outcome.error}")
    return "\n".join(lines)
