"""The run's report (pure): one JSON-ready dict, and the final table rendered from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from gateway.loadtest.enforcement import EnforcementResult
from gateway.loadtest.results import LATE_AFTER_S, Recorder
from gateway.loadtest.spec import LoadSpec, connection_limit

SCHEMA = "devicegate-loadtest/1"
LATENCY_KEYS = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9))
SATURATED_SHARE = 0.05  # more late sends than this: the generator could not keep its schedule


def build_report(
    spec: LoadSpec,
    devices: int,
    recorder: Recorder,
    elapsed: float,
    started_at: str,
    enforcement: EnforcementResult | None = None,
) -> dict[str, Any]:
    """Everything about a run as a JSON-ready dict; docs/loadtest.md documents the fields."""
    total = recorder.total
    pct = total.percentiles([p for _, p in LATENCY_KEYS])
    answered = recorder.completed
    return {
        "schema": SCHEMA,
        "started_at": started_at,
        "target": spec.target,
        "mode": "open" if spec.open_loop else "closed",
        "rate": spec.rate,
        "concurrency": spec.concurrency,
        "connections": connection_limit(spec),
        "devices": devices,
        "duration_s": spec.duration,
        "elapsed_s": round(elapsed, 3),
        "timeout_s": spec.timeout,
        "seed": spec.seed,
        "post_share": spec.post_share,
        "post_bytes": spec.post_bytes,
        "latency_from": "intended" if spec.open_loop else "sent",
        "requests": {
            "sent": recorder.sent,
            "answered": answered,
            "errors": recorder.failed,
            "per_second": round(answered / elapsed, 1) if elapsed > 0 else 0.0,
        },
        "latency_us": {
            "min": total.min(),
            "mean": round(total.mean(), 1),
            **{key: pct[p] for key, p in LATENCY_KEYS},
            "max": total.max(),
        },
        "generator": {
            "late_sends": recorder.late_sends,
            "late_after_us": round(LATE_AFTER_S * 1_000_000),
            "max_send_lag_us": round(recorder.max_send_lag * 1_000_000),
        },
        "status": {str(s): n for s, n in sorted(recorder.status.items())},
        "errors": dict(sorted(recorder.errors.items())),
        "timeline": [
            {
                "t": p.t,
                "seconds": round(p.seconds, 3),
                "responses": p.responses,
                "errors": p.errors,
                "per_second": round(p.per_second, 1),
                "p50_us": p.p50_us,
                "p99_us": p.p99_us,
                "max_us": p.max_us,
            }
            for p in recorder.timeline
        ],
        "enforcement": enforcement.as_json() if enforcement is not None else None,
    }


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """Write the report as indented JSON."""
    Path(path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")


def _ms(us: int | float) -> str:
    return f"{us / 1000:.3f} ms"


def render_table(report: dict[str, Any]) -> str:
    """The final table: throughput, latency percentiles, answers per status, errors, checks."""
    req = report["requests"]
    lat = report["latency_us"]
    load = (
        f"open loop at {report['rate']:g} req/s"
        if report["mode"] == "open"
        else f"closed loop at concurrency {report['concurrency']}"
    )
    rows = [
        ("target", report["target"]),
        ("load", f"{load}, {report['devices']} devices, {report['elapsed_s']:.2f} s"),
        ("requests", f"{req['sent']} sent, {req['answered']} answered, {req['errors']} errors"),
        ("throughput", f"{req['per_second']:.1f} req/s"),
        (f"latency (from {report['latency_from']})", ""),
        *[(f"  {k.replace('_', '.')}", _ms(lat[k])) for k in ("p50", "p90", "p99", "p99_9")],
        ("  max", _ms(lat["max"])),
        ("status", ""),
        *[(f"  {s}", str(n)) for s, n in report["status"].items()],
    ]
    if report["errors"]:
        rows += [("errors", ""), *[(f"  {k}", str(n)) for k, n in report["errors"].items()]]
    gen = report["generator"]
    if req["sent"] and gen["late_sends"] / req["sent"] > SATURATED_SHARE:
        rows.append(
            (
                "WARNING",
                f"the generator sent {gen['late_sends'] / req['sent']:.0%} of requests late "
                f"(up to {_ms(gen['max_send_lag_us'])}): it could not keep its schedule "
                "(saturated, or short of CPU) and the latencies include its own delay; "
                "lower --rate or run it on another machine",
            )
        )
    enf = report["enforcement"]
    if enf is not None:
        rows += [
            ("enforcement", "PASSED" if enf["passed"] else "FAILED"),
            ("  blocked devices", str(enf["blocked_devices"])),
            ("  blocked 2xx (must be 0)", str(enf["blocked_2xx"])),
            ("  bucket-checked devices", str(enf["checked_devices"])),
            ("  over their bucket", str(enf["over_limit_devices"])),
            ("  429 share (modelled)", f"{enf['share_429']:.1%} ({enf['modeled_share_429']:.1%})"),
        ]
        if enf["unknown_bucket_devices"]:
            rows.append(
                (
                    "  bucket unknown",
                    f"{enf['unknown_bucket_devices']} devices: pass --bucket-rate/--bucket-burst",
                )
            )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}".rstrip() for name, value in rows)
