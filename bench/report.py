"""The benchmark's tables, rendered from the results dict that is also written as JSON."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

from measure import SCRIPT_COMMANDS


def short_version(text: str | None, pattern: str) -> str:
    """`nginx version: nginx/1.22.1` -> `1.22.1`."""
    found = re.search(pattern, text or "")
    return found.group(1) if found else "-"


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    if abs(us) >= 10_000:
        return f"{us / 1000:,.1f} ms"
    if abs(us) >= 1000:
        return f"{us / 1000:,.2f} ms"
    return f"{us:,.0f} us"


def fmt_n(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned first column, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def report(results: dict[str, Any]) -> str:
    """The human-readable tables, from whatever `results` holds so far."""
    opts = SimpleNamespace(**results["settings"])
    info = results["machine"]
    figures = results["targets"]
    nginx = short_version(info["nginx"], r"nginx/(\S+)")
    wrk = short_version(info["wrk"], r"wrk (\S+)")
    redis_v = short_version(info["redis"], r"v=(\S+)")
    parts = [
        f"devicegate bench, started {results['started']}: {info['usable_cpus']} CPUs "
        f"({info['cpu_model']}), {info['python']}, gateway "
        f"{info.get('gateway_build', 'plain Python')}, commit {info['commit']}",
        f"nginx {nginx}, wrk {wrk}, redis {redis_v}, "
        f"uvloop {info['packages'].get('uvloop', '-')}; load {results['settings']['load_tool']} "
        f"-c{opts.connections} over {opts.devices:,} device ids, {opts.duration:g} s runs, "
        f"medians of {opts.rounds} interleaved round(s)",
    ]
    lua = info.get("openresty_peer")
    if lua:
        parts.append(
            f"openresty peer: {lua['lua_module']}, {lua['redis_client']}, "
            f"keys {results['settings']['openresty_peer']['key_prefix']}* in the same redis-server"
        )
    parts.append("")
    range_col = opts.rounds > 1
    rows = []
    for f in figures.values():
        m = f["load"]
        row = [f["label"], fmt_n(m["rps"])]
        if range_col:
            row.append(f"{m['rps_min']:,.0f}-{m['rps_max']:,.0f}")
        row += [fmt_us(m["p50_us"]), fmt_us(m["p99_us"]), fmt_us(m["cpu_us_per_req"])]
        row += [fmt_n(m["errors"])]
        rows.append(row)
    head = [f"c{opts.connections}", "req/s", *(["range"] if range_col else [])]
    head += ["p50", "p99", "CPU/req", "errors"]
    parts += [table(head, rows), ""]

    added = results["latency_added_c1"]
    rows = []
    for key, f in figures.items():
        m = f["latency_c1"]
        plus = added.get(key)
        rows.append(
            [
                f["label"],
                fmt_us(m["p50_us"]),
                fmt_us(m["p99_us"]),
                fmt_us(plus["p50_us"]) if plus else "",
                fmt_us(plus["p99_us"]) if plus else "",
            ]
        )
    parts += [table(["c1 (one connection)", "p50", "p99", "+p50", "+p99"], rows)]
    parts += ["(+: latency added over the upstream alone)", ""]

    rows = []
    for key, run in results.get("open_loop", {}).items():
        for side in ("upstream", "gateway"):
            m = run.get(side, {})
            label = figures[key]["label"] if side == "gateway" else "  upstream alone, same rate"
            if "error" in m or not m:
                rows.append([label, fmt_n(run["rate"]), m.get("error", "not run"), "", "", "", ""])
                continue
            rows.append(
                [
                    label,
                    fmt_n(run["rate"]),
                    fmt_us(m["p50_us"]),
                    fmt_us(m["p99_us"]),
                    fmt_us(m["p999_us"]),
                    fmt_us(m["max_us"]),
                    f"{m['late_share']:.1%}",
                ]
            )
    if rows:
        head = ["open loop, half the c64 rate", "req/s", "p50", "p99", "p99.9", "max", "late"]
        parts += [table(head, rows)]
        parts += [
            "(gateway loadtest --rate: latency from when each request was due; late: requests",
            " the generator itself sent over 1 ms late, its own share of the latency)",
            "",
        ]

    rows = []
    for f in figures.values():
        m = f["load"]
        if m["redis_commands_per_req"] is None:
            continue
        others = [
            (name, calls)
            for name, calls in m["rounds"][-1]["redis_by_command"].items()
            if name not in SCRIPT_COMMANDS
        ]
        top = sorted(others, key=lambda kv: -kv[1])[:3]
        rows.append(
            [
                f["label"],
                fmt_us(m["redis_cpu_us_per_req"]),
                fmt_n(m["redis_script_calls_per_req"], 3),
                fmt_n(m["redis_commands_per_req"], 2),
                ", ".join(f"{name} {calls:.2f}" for name, calls in top) or "-",
            ]
        )
    if rows:
        head = ["Redis, per request", "CPU", "script calls", "commands", "top other commands"]
        parts += [table(head, rows)]
        parts += ["(commands include those run inside the script; see docs/bench.md)", ""]

    rows = []
    peer = figures.get("openresty-peer")
    lines = []
    for key, r in results["ratios"].items():
        row = [
            figures[key]["label"],
            "-" if r["vs_nginx_proxy"] is None else f"{r['vs_nginx_proxy']:.1%}",
            f"{r['vs_upstream_alone']:.1%}",
        ]
        if peer:
            vs_peer = r.get("vs_openresty_peer")
            row.append("" if vs_peer is None else f"{vs_peer:.2f}x")
            cpu = r.get("cpu_per_req_vs_openresty_peer")
            if vs_peer is not None and key.startswith("gateway-") and key != "gateway-memory":
                lines.append(
                    f"{figures[key]['label']} / openresty peer: {vs_peer:.2f}x req/s"
                    + ("" if cpu is None else f", {cpu:.2f}x CPU per request")
                )
        rows.append(row)
    if rows:
        head = ["throughput ratio", "vs nginx proxy", "vs upstream alone"]
        head += ["vs openresty peer"] if peer else []
        parts += [table(head, rows), *lines, ""]

    sc = results.get("scale")
    if sc:
        rows = []
        for step in sc["steps"]:
            rss = [v / 2**20 for v in step["rss_bytes"].values()]
            shown = [f"{v:.1f}" for v in rss]
            if len(shown) > 1:
                shown[0] += " (leader)"
            rows.append(
                [
                    f"{step['devices']:,}" + ("" if step.get("complete", True) else " (partial)"),
                    " ".join(shown),
                    f"{max(rss):.1f}" if rss else "-",
                    f"{step['redis_used_memory'] / 2**20:,.1f}",
                    fmt_n(step.get("redis_bytes_per_device")),
                    fmt_n(step.get("redis_keys_per_device"), 2),
                    fmt_n(step.get("devices_per_s")),
                ]
            )
        head = ["devices registered", "RSS per process MB", "max MB", "Redis MB", "B/device"]
        head += ["keys/device", "devices/s"]
        parts += [f"gateway with {sc['workers']} worker(s) on Redis, devices sent through it:"]
        parts += [table(head, rows), ""]
    for note in results["notes"]:
        parts.append(f"note: {note}")
    if "error" in results:
        parts.append(f"INCOMPLETE: the run stopped early ({results['error'].splitlines()[0]})")
    return "\n".join(parts).rstrip()
