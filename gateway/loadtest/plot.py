"""The latency-over-time PNG, drawn with matplotlib's Agg backend (imported only here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIN_INTERVAL_S = 0.5


def plot_available() -> bool:
    """True when matplotlib can be imported (the `loadtest` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(report: dict[str, Any], path: str | Path) -> None:
    """Draw p50, p99 and max latency and the answer rate per interval of a report, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file only
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    # A run's last interval is often a sliver (the drain): its rate would be noise.
    timeline = [p for p in report["timeline"] if p["seconds"] >= MIN_INTERVAL_S]
    timeline = timeline or report["timeline"]
    t = [p["t"] for p in timeline]
    fig = Figure(figsize=(10, 5), dpi=100)
    ax = fig.add_subplot()
    for key, label in (("max_us", "max"), ("p99_us", "p99"), ("p50_us", "p50")):
        ax.plot(t, [p[key] / 1000 for p in timeline], marker=".", label=label)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(f"latency, ms (from the {report['latency_from']} send time)")
    if any(p["max_us"] > 0 for p in timeline):
        ax.set_yscale("log")  # p50 and max are often orders of magnitude apart
        # Plain numbers (LogFormatter thins the minor labels itself), not 5x10^0.
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    rate_ax = ax.twinx()
    rate_ax.plot(t, [p["per_second"] for p in timeline], color="grey", linestyle="--")
    rate_ax.set_ylim(bottom=0)
    rate_ax.set_ylabel("answers per second (dashed)")
    ax.legend(loc="upper left")
    ax.set_title(f"{report['target']}: {report['mode']} loop, {report['devices']} devices")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
