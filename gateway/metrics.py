"""Process counters, exposed in Prometheus text format on the admin listener (pure)."""

from __future__ import annotations

from collections import Counter


class Metrics:
    """Counters the data plane bumps per request; cheap enough for the hot path."""

    __slots__ = ("decisions", "statuses", "store_failures")

    def __init__(self) -> None:
        self.decisions: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.store_failures = 0

    def observe(self, decision: str, status: int) -> None:
        """Count one finished request."""
        self.decisions[decision] += 1
        self.statuses[status] += 1

    def render(self) -> str:
        """The counters in the Prometheus text exposition format."""
        lines = [
            "# HELP devicegate_requests_total Requests on the public listener by decision.",
            "# TYPE devicegate_requests_total counter",
            *(
                f'devicegate_requests_total{{decision="{d}"}} {n}'
                for d, n in sorted(self.decisions.items())
            ),
            "# HELP devicegate_responses_total Responses on the public listener by status.",
            "# TYPE devicegate_responses_total counter",
            *(
                f'devicegate_responses_total{{status="{s}"}} {n}'
                for s, n in sorted(self.statuses.items())
            ),
            "# HELP devicegate_store_failures_total Store calls that failed or timed out.",
            "# TYPE devicegate_store_failures_total counter",
            f"devicegate_store_failures_total {self.store_failures}",
        ]
        return "\n".join(lines) + "\n"
