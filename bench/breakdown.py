"""Where a request's time goes: the gateway beside a bare proxy, phase by phase.

    PYTHONPATH=<tree with the compiled build> .venv/bin/python bench/breakdown.py [--target both]

docs/bench.md ("Where a request's time goes") has the figures and how to read them. Everything
runs on 127.0.0.1, on free ports, and is stopped at the end (also on Ctrl-C or an error): an
nginx upstream (bench/servers.py; bench/upstream.py without nginx), a redis-server, and the
targets, one at a time:

- `gateway`: `python -m gateway run --config <generated> --workers 1` (bench/servers.py's
  config: rate limits of a million per second, no access log, level warning), whatever
  `import gateway` finds for this interpreter (PYTHONPATH first): the build measured is
  printed, with its commit;
- `bare`: bench/bare_proxy.py, compiled with mypyc as the gateway's data plane is (unless
  --bare-plain), without Redis, and `bare+redis`: the same with one pipelined EVALSHA of
  `return 1` per request.

Each target is measured twice, by two fresh processes:

1. instructions: under `valgrind --tool=callgrind` with instrumentation off until it has
   served --warmup requests (every device is known, the pools are full); then an idle
   window (--idle seconds, the client's connections open) and a window of exactly
   --requests requests from a closed-loop client at --concurrency (the fleet's device
   headers, as bench/fleet.lua sends them, over --devices ids), each dumped on its own.
   Every function of the loaded window is put in a phase by PHASE_RULES (name patterns);
   a function that no rule names (CPython's, libc's, uvloop's internals) is charged to the
   phases of its callers, in proportion to the cost of the calls from each. Callgrind keeps
   --separate-callers callers of context per function, so a shared helper (a vectorcall,
   a transport write) is told apart by who called it. uvloop's read path serves every
   socket alike: it is split between the client, upstream and Redis sockets by the number
   of reads each protocol got. Work done by time and not by requests (timer callbacks,
   every step of a coroutine that is not compiled: the blocked-ids poll, the admin server)
   is "background", with whatever it calls: it is reported per second, not per request,
   as valgrind's slowness would multiply it per request some fifty times.
2. CPU time: the same target without valgrind under wrk (-t1, --connections, fleet.lua)
   for --seconds, --rounds times: user and system time of its process tree from /proc per
   request, the median round. The user time is split by the instruction shares of step 1
   (the background at the measured rate included); the system time (the kernel's socket
   work, which callgrind does not see) is a row of its own.

Prints the tables; writes bench/results/breakdown-<time>.json (--output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from bare_proxy import command, compile_proxy
from loadgen import PATH, Load, fleet_headers
from peers import start_bare, terminate_as_interrupt
from procs import (
    CLK_TCK,
    BenchError,
    Proc,
    Processes,
    free_port,
    run_bounded,
    tree,
    wait_until,
)
from report import table
from servers import RedisServer, gateway_env, start_gateway, start_upstream, which

REPO: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = REPO / "bench" / "results"
START_TIMEOUT: Final = 120.0  # seconds for a target under valgrind to answer
REPLY_TIMEOUT: Final = 60.0  # seconds one answer may take under valgrind
CONTROL_TIMEOUT: Final = 60.0  # seconds callgrind_control may take

# ---- phases -------------------------------------------------------------------------------

# (key, label), in the tables' order.
PHASES: Final = (
    ("read", "accept, read the client (uvloop)"),
    ("parse", "HTTP parse of the request (llhttp)"),
    ("identity", "identity: device headers, client address"),
    ("enforce", "enforce: verdict, script arguments, reply"),
    ("store", "store client: pack, write, read, replies, futures"),
    ("upstream_write", "upstream write: pool, request head"),
    ("upstream_read", "upstream read and parse (llhttp)"),
    ("client_write", "client write: response head, relay"),
    ("bookkeeping", "per-request objects: exchange, report"),
    ("logging", "logging and metrics"),
    ("loop", "event loop: tasks, handles, timers, epoll"),
    ("gc", "cyclic garbage collector"),
)
LABELS: Final = dict(PHASES)
BACKGROUND: Final = "background"  # time-driven work: reported per second, not per request
READS: Final = "reads"  # uvloop's read path: split between client, upstream and Redis reads
DEFAULT: Final = "loop"  # a function with no caller in the profile: the loop's own frames
# Functions that are system calls under valgrind but the vDSO's natively.
VDSO: Final = re.compile(r"^(?:__)?(?:clock_gettime|gettimeofday|time|getcpu)(?:@|$)")


def _gw(module: str, names: str) -> str:
    """A pattern for compiled (mypyc) functions of the gateway's `module`: CPyDef_,
    CPyPy_ (the Python-callable wrapper), CPyDunder_ (a coroutine's send) and generator
    classes all carry `<module>___<name>`."""
    return rf"(?:^|_|send)(?:{module})___(?:__mypyc_\w*?_)?(?:{names})"


def _bare(names: str) -> str:
    """The same for bench/bare_proxy.py (one module: mypyc names carry no module)."""
    return rf"^CPy[A-Za-z]*_(?:__mypyc_\w*?_)?(?:{names})"


# (phase, pattern), first match wins. A pattern is searched in the function's name, without
# callgrind's context (`f'caller'caller2...` -> `f`), unless it starts with "'": then in the
# whole, context included (the background rules: who called decides).
PHASE_RULES: Final[tuple[tuple[str, str], ...]] = (
    # A compiled class's GC slots: the collector runs them ("" leaves them to their callers).
    # Its dealloc stays with its module's phase: an object's phase pays for freeing it.
    ("", r"^(?:CPyDef_|\w+___)\w*[^_]_(?:traverse|clear)$"),
    # Time-driven work, whatever the load: the timers' callbacks (the deadline sweep, the
    # store's reply timer, sleeps) and every step of a coroutine that is not compiled (the
    # data plane's are): the blocked-ids poll, the pub/sub listener, the admin server.
    (BACKGROUND, r"'(?:[^']+')*?(?:uv__run_timers|__pyx_f_6uvloop_4loop___uvtimer_callback)"),
    (BACKGROUND, r"'^(?:PyGen_am_send|gen_send_ex|gen_throw|gen_iternext)'(?:[^']+'){0,2}"
                 r"task_step_impl(?:'|$)"),
    (BACKGROUND, _gw("plane", r"\w*_sweep\w*")),
    # accept, and the read path every socket shares (split afterwards: READS)
    ("read", _gw("connection", r"ClientConnection___(?:connection_made|__init__)$"
                 r"|ClientConnection$")),
    ("read", _bare(r"Client___(?:connection_made|__init__)$|Client$")),
    ("read", r"^(?:uv__server_io|uv_accept|uv__accept|__pyx_\w*_on_listen|__pyx_\w*TCPServer)"),
    (READS, r"^(?:uv__read|uv__stream_eof|__pyx_f_6uvloop_4loop___uv_stream_\w*on_read\w*)$"),
    (READS, r"^__pyx_\w*UVStream_\w*(?:_on_read|_on_eof)"),
    # the request head
    ("parse", _gw("connection", r"ClientConnection___(?:data_received|on_message_begin|on_url"
                  r"|on_header|on_headers_complete|on_body|on_message_complete"
                  r"|_check_partial_line|_refusal|eof_received)$")),
    ("parse", _bare(r"Client___(?:data_received|on_message_begin|on_url|on_header"
                    r"|on_headers_complete|on_body|on_message_complete)$")),
    ("identity", _gw("identity", r"\w+") + "|" + _gw("model", r"DeviceIdentity")),
    # the verdict and the one script call
    ("store", _gw("pipeline|cluster_scripts|slots", r"\w+")),
    ("store", _bare(r"Store___\w+|_StoreProtocol\w*|Client___stored$|\w+_Store_gen\w*")),
    ("enforce", _gw("enforce|enforce_script|ratelimit|keys|breaker|model|answers", r"\w+")),
    # the upstream
    ("upstream_write", _gw("exchange", r"Exchange____forward$|_forward_Exchange_\w+")),
    ("upstream_write", _gw("exchange", r"Exchange___(?:request_body|request_end)$")),
    ("upstream_write", _gw("upstream", r"UpstreamPool___acquire|acquire_UpstreamPool_\w+")),
    ("upstream_write", _gw("upstream", r"UpstreamConnection___write$")),
    ("upstream_write", _gw("wire", r"request_head|_named|_lookalike|connection_tokens|_tokens")),
    ("upstream_write", _gw("upload|body", r"\w+")),
    ("upstream_write", _bare(r"request_head$|Pool___(?:send|_open_and_send)$|Upstream___send$")),
    ("upstream_write", _bare(r"_open_and_send_Pool_gen\w*")),
    ("upstream_read", _gw("upstream", r"UpstreamConnection___\w+|UpstreamConnection$")),
    ("upstream_read", _gw("upstream", r"UpstreamPool___(?:release|_free|_lost|_retire)$")),
    ("upstream_read", _gw("exchange", r"Exchange___on_response_end$")),
    ("upstream_read", _bare(r"Upstream___\w+|Upstream$|Pool___release$")),
    # the answer
    ("client_write", _gw("exchange", r"Exchange___(?:on_response_head|on_response_body"
                         r"|on_upstream_flush|answer)$")),
    ("client_write", _gw("wire|envelope", r"\w+")),
    ("client_write", _gw("connection", r"ClientConnection___write$")),
    ("client_write", _gw("forwarding", r"Forwarding___date$")),
    ("client_write", _bare(r"response_head$|Client___(?:write|relay)$")),
    # logging and metrics (the access log is off in these runs: what is left is the check)
    ("logging", _gw("connection", r"Connections___log_exchange$") + "|" + _gw("metrics", r"\w+")),
    # the event loop: tasks, handles, timers
    ("loop", _gw("exchange", r"Exchange____(?:cancel_deadline|on_deadline)$")),
    ("loop", r"^(?:uv_run|uv__io_poll|uv__run_\w+|uv__io_cb|uv__async_\w+|uv_timer_\w+)$"),
    ("loop", r"^(?:epoll_wait|epoll_pwait|epoll_ctl)$"),
    ("loop", r"^__pyx_f_6uvloop_4loop_4Loop__(?:on_idle|run|_on_wake|_read_from_self)"),
    ("loop", r"^__pyx_\w*(?:6Handle__run|TimerHandle|call_soon|call_at|call_later|_call_soon)"),
    ("loop", r"^__pyx_\w*(?:cb_idle_callback|uvtimer_callback|cb_check|cb_prepare)"),
    ("loop", r"^(?:task_step|task_step_impl|task_wakeup|task_call_step_soon|task_new|enter_task"
             r"|leave_task|_asyncio_Task___init__|TaskObj_\w+|TaskStepMethWrapper\w*"
             r"|TaskWakeupMethWrapper\w*|task_step_handle_result_impl)$"),
    # per-request objects: the exchange and its report
    ("bookkeeping", _gw("exchange|report|flow|sides|connection", r"\w+")),
    ("bookkeeping", _bare(r"Client___\w+|Request\w*|Proxy\w*")),
    ("gc", r"^(?:gc_collect_main|gc_collect_with_callback|gc_collect_generations)$"),
)  # fmt: skip
# Whose reads the shared read path serves: (phase, protocol's data_received) pairs.
READERS: Final = (
    ("read", _gw("connection", r"ClientConnection___data_received$")),
    ("read", _bare(r"Client___data_received$")),
    ("upstream_read", _gw("upstream", r"UpstreamConnection___data_received$")),
    ("upstream_read", _bare(r"Upstream___data_received$")),
    ("store", _gw("pipeline", r"_Protocol___data_received$")),
    ("store", _bare(r"_StoreProtocol___data_received$")),
)
_RULES: Final = [
    (phase, p.startswith("'"), re.compile(p.removeprefix("'"))) for phase, p in PHASE_RULES
]
_READERS: Final = [(phase, re.compile(pattern)) for phase, pattern in READERS]


def rule_for(node_name: str) -> str | None:
    """The phase the first matching rule names ("": its callers'), None when none matches
    (`node_name`: callgrind's, context included)."""
    name = node_name.split("'", 1)[0]
    for phase, in_context, pattern in _RULES:
        if pattern.search(node_name if in_context else name):
            return phase
    return None


def phase_of(node_name: str) -> str | None:
    """The phase a rule puts a function in, or None: its callers' phases."""
    return rule_for(node_name) or None


# ---- callgrind's output -------------------------------------------------------------------

Node = tuple[str, str]  # (object file, function with its callers' context)
_NAME: Final = re.compile(r"\((\d+)\)(?: (.*))?$")


@dataclass
class Profile:
    """One callgrind dump: self cost per function-in-context and inclusive cost per call."""

    events: list[str]
    self_cost: dict[Node, list[int]] = field(default_factory=dict)
    calls: dict[tuple[Node, Node], list[int]] = field(default_factory=dict)  # [count, costs...]

    def total(self, event: str = "Ir") -> int:
        i = self.events.index(event)
        return sum(c[i] for c in self.self_cost.values())


def read_profile(path: Path) -> Profile:
    """Parse a callgrind output file (name compression, --dump-instr=no positions)."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fl": {}, "fn": {}}
    profile = Profile(events=[])
    width = 0
    ob = ""
    cob: str | None = None
    fn: Node = ("", "")
    cfn: Node | None = None
    call: tuple[Node, Node] | None = None

    def name(table: str, text: str) -> str:
        found = _NAME.match(text)
        if found is None:
            return text
        known = names[table]
        if found.group(2) is not None:
            known[found.group(1)] = found.group(2)
        return known.get(found.group(1), text)

    with path.open(errors="replace") as lines:
        for line in lines:
            head = line[:1]
            if not head or head == "\n":
                continue
            if head.isdigit() or head in "+-*":
                parts = line.split()
                costs = [int(x) for x in parts[1 : 1 + width]]
                costs += [0] * (width - len(costs))
                if call is not None:
                    slot = profile.calls[call]
                    for i, c in enumerate(costs):
                        slot[1 + i] += c
                    call = None
                else:
                    own = profile.self_cost.setdefault(fn, [0] * width)
                    for i, c in enumerate(costs):
                        own[i] += c
                continue
            key, _, value = line.rstrip("\n").partition("=")
            if key == "ob":
                ob = name("ob", value)
            elif key == "fn":
                fn = (ob, name("fn", value))
                cob = None
            elif key == "cob":
                cob = name("ob", value)
            elif key == "cfn":
                cfn = (cob if cob is not None else ob, name("fn", value))
                cob = None
            elif key == "calls" and cfn is not None:
                call = (fn, cfn)
                slot = profile.calls.setdefault(call, [0] * (width + 1))
                slot[0] += int(value.split()[0])
            elif key in ("fl", "fi", "fe", "cfi", "cfl"):
                name("fl", value)
            elif line.startswith("events:"):
                profile.events = line.split(":", 1)[1].split()
                width = len(profile.events)
    if not profile.events:
        raise BenchError(f"{path}: not a callgrind profile")
    return profile


def function(node: Node) -> str:
    """A node's function name without callgrind's context (`f'caller'caller2` -> `f`)."""
    return node[1].split("'", 1)[0]


def _propagate(
    incoming: dict[Node, list[tuple[Node, int]]],
    free: list[Node],
    value: dict[Node, dict[str, float]],
    weight_of: dict[Node, float] | None = None,
) -> None:
    """Give each `free` node its callers' mix of `value`, weighted by the inclusive cost of
    their calls to it (times `weight_of` the caller, when given); a fixed point, as calls
    form cycles. A node whose callers weigh nothing keeps its value."""
    for _ in range(500):
        change = 0.0
        for node in free:
            mixed: dict[str, float] = defaultdict(float)
            weight = 0.0
            for caller, cost in incoming[node]:
                w = cost * (1.0 if weight_of is None else weight_of[caller])
                weight += w
                for key, share in value[caller].items():
                    mixed[key] += share * w
            if weight <= 0:
                continue
            new = {key: v / weight for key, v in mixed.items() if v}
            old = value[node]
            for k in new.keys() | old.keys():
                change = max(change, abs(new.get(k, 0.0) - old.get(k, 0.0)))
            value[node] = new
        if change < 1e-9:
            return


def attribute(profile: Profile) -> dict[Node, dict[str, float]]:
    """Each node's cost shares by phase. First the background's share: 1 for what its rules
    name, else its callers' share, whatever other rule names the node (a compiled function
    the background calls is background there). Then the rest: the phase its rule names,
    else its callers' phases (their background share left out), weighted by the inclusive
    cost of their calls to it."""
    ir = profile.events.index("Ir") + 1
    incoming: dict[Node, list[tuple[Node, int]]] = defaultdict(list)
    for (caller, callee), slot in profile.calls.items():
        if caller != callee and slot[ir] > 0:
            incoming[callee].append((caller, slot[ir]))
    nodes = set(profile.self_cost) | set(incoming)
    rule = {node: phase_of(node[1]) for node in nodes}
    background = {node: {BACKGROUND: 1.0 if rule[node] == BACKGROUND else 0.0} for node in nodes}
    _propagate(incoming, [n for n in nodes if rule[n] != BACKGROUND and incoming.get(n)],
               background)  # fmt: skip
    foreground = {node: 1.0 - background[node].get(BACKGROUND, 0.0) for node in nodes}
    phases = {node: {rule[node] or DEFAULT: 1.0} for node in nodes}
    _propagate(incoming, [n for n in nodes if rule[n] is None and incoming.get(n)], phases,
               foreground)  # fmt: skip
    shares: dict[Node, dict[str, float]] = {}
    for node in nodes:
        bg = 1.0 - foreground[node]
        if rule[node] == BACKGROUND or bg >= 1.0:
            shares[node] = {BACKGROUND: 1.0}
            continue
        shares[node] = {phase: share * (1.0 - bg) for phase, share in phases[node].items()}
        if bg > 0:
            shares[node][BACKGROUND] = bg
    return shares


@dataclass
class Breakdown:
    """One target's instructions (and system calls) per request, by phase."""

    requests: int
    seconds: float  # the measured window's length
    ir: dict[str, float]  # per request, by phase
    syscalls: dict[str, float]  # per request, by phase (the vDSO's left out)
    syscalls_by_function: dict[str, float]  # per request
    background_ir_per_s: float  # in the measured window
    idle_ir_per_s: float  # everything, in the idle window
    calls_per_request: dict[str, float]
    phase_functions: dict[str, list[tuple[str, float]]]  # the costliest of each phase
    top_self: list[tuple[str, float]]
    top_own_self: list[tuple[str, float]]  # the gateway's or bare proxy's compiled functions
    top_inclusive: list[tuple[str, float]]
    unmapped: list[tuple[str, float]]  # compiled functions no rule names: their callers' phase


def breakdown(
    loaded: Profile, loaded_s: float, idle: Profile, idle_s: float, requests: int, top: int
) -> Breakdown:
    """The per-request breakdown of the measured window."""
    ir = loaded.events.index("Ir")
    sc = loaded.events.index("sysCount") if "sysCount" in loaded.events else None
    shares = attribute(loaded)
    costs: dict[str, float] = defaultdict(float)
    syscalls: dict[str, float] = defaultdict(float)
    by_function: dict[str, float] = defaultdict(float)
    in_phase: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    own_cost: dict[str, float] = defaultdict(float)  # per function, the background left out
    compiled_cost: dict[str, float] = defaultdict(float)  # the same, mypyc's functions
    unmapped: dict[str, float] = defaultdict(float)  # compiled functions no rule names
    for (caller, callee), slot in loaded.calls.items():
        name = function(callee)
        if name.startswith("CPyDef_") and function(caller) != name and rule_for(name) is None:
            unmapped[_display(callee)] += slot[1 + ir] * (1.0 - shares[callee].get(BACKGROUND, 0))
    for node, own in loaded.self_cost.items():
        name = function(node)
        vdso = VDSO.match(name) is not None
        for phase, share in shares[node].items():
            costs[phase] += own[ir] * share
            in_phase[phase][_display(node)] += own[ir] * share
            if sc is not None and not vdso:
                syscalls[phase] += own[sc] * share
        foreground = 1.0 - shares[node].get(BACKGROUND, 0.0)
        own_cost[_display(node)] += own[ir] * foreground
        if name.startswith(("CPyDef_", "CPyPy_", "CPyDunder_")) or "___" in name:
            compiled_cost[_display(node)] += own[ir] * foreground
        if sc is not None and own[sc] and not vdso:
            by_function[name] += own[sc] * foreground
    # The shared read path, split by the reads each kind of socket got.
    reads: dict[str, int] = defaultdict(int)
    for (caller, callee), slot in loaded.calls.items():
        name = function(callee)
        if not name.startswith("CPyDef_") or function(caller) == name:
            continue
        for phase, pattern in _READERS:
            if pattern.search(name):
                reads[phase] += slot[0]
                break
    all_reads = sum(reads.values())
    for split in (costs, syscalls):
        shared = split.pop(READS, 0.0)
        if not all_reads:
            split["read"] += shared
        for phase, n in reads.items():
            split[phase] += shared * n / all_reads
    shared_fns = in_phase.pop(READS, {})
    for phase, n in reads.items():
        for name, cost in shared_fns.items():
            in_phase[phase][name] += cost * n / all_reads
    background = costs.pop(BACKGROUND, 0.0)
    syscalls.pop(BACKGROUND, None)
    in_phase.pop(BACKGROUND, None)
    per = 1 / requests
    return Breakdown(
        requests=requests,
        seconds=loaded_s,
        ir={p: c * per for p, c in costs.items()},
        syscalls={p: c * per for p, c in syscalls.items()},
        syscalls_by_function={n: c * per for n, c in _top(by_function, 8)},
        background_ir_per_s=background / loaded_s,
        idle_ir_per_s=idle.total("Ir") / idle_s,
        calls_per_request={k: v * per for k, v in counted_calls(loaded, shares).items()},
        phase_functions={p: [(n, c * per) for n, c in _top(fns, 6)] for p, fns in in_phase.items()},
        top_self=[(n, c * per) for n, c in _top(own_cost, top)],
        top_own_self=[(n, c * per) for n, c in _top(compiled_cost, top)],
        top_inclusive=[(n, c * per) for n, c in top_inclusive(loaded, shares, top)],
        unmapped=[(n, c * per) for n, c in _top(unmapped, top) if c * per >= 1],
    )


# Calls counted per request, to read the figures by: loop iterations batch requests.
MARKERS: Final = {
    "loop iterations (epoll_pwait)": r"^epoll_p?wait$",
    "Redis writes (batches)": r"(?:pipeline___ScriptPipeline____flush|Store____flush)$",
    "client reads": r"(?:ClientConnection|Client)___data_received$",
    "upstream reads": r"(?:UpstreamConnection|Upstream)___data_received$",
    "Redis reads": r"(?:_Protocol|_StoreProtocol)___data_received$",
    "cyclic GC runs": r"^gc_collect_main$",
}


def counted_calls(profile: Profile, shares: dict[Node, dict[str, float]]) -> dict[str, float]:
    """How often each MARKERS function was called, outside the background work."""
    out: dict[str, float] = {}
    for label, pattern in MARKERS.items():
        found = re.compile(pattern)
        n = 0.0
        for (caller, callee), slot in profile.calls.items():
            name = function(callee)
            if name.startswith("CPyPy_") or not found.search(name):
                continue
            if found.search(function(caller)):
                continue
            n += slot[0] * (1.0 - shares.get(callee, {}).get(BACKGROUND, 0.0))
        out[label] = n
    return out


def _display(node: Node) -> str:
    """`exchange.Exchange.on_response_head` for mypyc's names, else the name as it is."""
    name = function(node)
    found = re.match(r"^CPy(?:Def|Py)_(\w+)$", name)
    if found:
        return found.group(1).replace("___", ".")
    return name


def top_inclusive(
    profile: Profile, shares: dict[Node, dict[str, float]], n: int
) -> list[tuple[str, float]]:
    """The gateway's or the bare proxy's own functions (compiled: CPyDef_) with the most
    instructions including their callees', counted on the calls into them from other
    functions (a recursive call is not counted twice)."""
    ir = profile.events.index("Ir") + 1
    inclusive: dict[str, float] = defaultdict(float)
    for (caller, callee), slot in profile.calls.items():
        name = function(callee)
        if not name.startswith("CPyDef_"):
            continue
        if function(caller) == name:
            continue
        foreground = 1.0 - shares.get(callee, {}).get(BACKGROUND, 0.0)
        inclusive[_display(callee)] += slot[ir] * foreground
    return _top(inclusive, n)


def _top(costs: dict[str, float], n: int) -> list[tuple[str, float]]:
    return sorted(costs.items(), key=lambda kv: -kv[1])[:n]


# ---- the load: exactly N requests, closed loop ---------------------------------------------


def fleet_requests(port: int, devices: int) -> list[bytes]:
    """The fleet's requests as fleet.lua builds them (wrk adds Host), built once."""
    out = []
    for i in range(devices):
        lines = [f"GET {PATH} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [f"{k}: {v}" for k, v in fleet_headers(i, "dev-").items()]
        out.append(("\r\n".join(lines) + "\r\n\r\n").encode())
    return out


async def _answer(reader: asyncio.StreamReader) -> int:
    """One answer's status; its body read by its Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    found = re.search(rb"(?im)^content-length:\s*(\d+)\r$", head)
    if found is None:
        raise BenchError(f"an answer without Content-Length: {head[:200]!r}")
    await reader.readexactly(int(found.group(1)))
    return status


class FleetClient:
    """`concurrency` keep-alive connections that stay open between batches of requests."""

    def __init__(self, port: int, concurrency: int, devices: int) -> None:
        self.port = port
        self.concurrency = concurrency
        self.requests = fleet_requests(port, devices)
        self.turn = 0
        self.streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.statuses: Counter[int] = Counter()

    async def open(self) -> None:
        for _ in range(self.concurrency):
            self.streams.append(
                await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 30)
            )

    async def send(self, total: int) -> Counter[int]:
        """Exactly `total` requests over the open connections; their statuses."""
        statuses: Counter[int] = Counter()
        left = total

        async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                request = self.requests[self.turn % len(self.requests)]
                self.turn += 1
                writer.write(request)
                statuses[await asyncio.wait_for(_answer(reader), REPLY_TIMEOUT)] += 1

        await asyncio.gather(*(one(r, w) for r, w in self.streams))
        self.statuses.update(statuses)
        return statuses

    def close(self) -> None:
        for _, writer in self.streams:
            writer.close()
        self.streams = []


# ---- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSpec:
    key: str  # gateway, bare, bare+redis
    label: str


TARGETS: Final = {
    "gateway": TargetSpec("gateway", "gateway, Redis, 1 worker"),
    "bare": TargetSpec("bare", "bare proxy"),
    "bare+redis": TargetSpec("bare+redis", "bare proxy + 1 EVALSHA"),
}


@dataclass
class Setup:
    """What every target's run shares."""

    procs: Processes
    python: str
    upstream_port: int
    store: RedisServer
    bare_argv: list[str]
    target_cpus: set[int] | None  # --pin: the target's CPU (everything else has the others)


def gateway_command(workdir: Path, name: str, python: str, valgrind: list[str]) -> Path:
    """A `gateway` command for bench/servers.py's start_gateway: `python -m gateway`, its
    `run` under `valgrind` when given (check-config is not)."""
    path = workdir / f"{name}.sh"
    run = shlex.join([*valgrind, python, "-m", "gateway"])
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = run ]; then exec {run} "$@"; fi\n'
        f'exec {shlex.join([python, "-m", "gateway"])} "$@"\n'
    )
    path.chmod(0o755)
    return path


def pin(root: int, cpus: set[int]) -> None:
    """Every thread of a process tree on `cpus` (threads it starts later inherit it)."""
    for pid in tree(root):
        try:
            tasks = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tasks:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass  # gone meanwhile


def start_target(
    setup: Setup, spec: TargetSpec, name: str, valgrind: list[str]
) -> tuple[Proc, int]:
    """One fresh target process (under `valgrind` when given), ready to serve, on its own
    CPU with --pin."""
    proc, port = _start_target(setup, spec, name, valgrind)
    if setup.target_cpus:
        pin(proc.pid, setup.target_cpus)
    return proc, port


def _start_target(
    setup: Setup, spec: TargetSpec, name: str, valgrind: list[str]
) -> tuple[Proc, int]:
    workdir = setup.procs.workdir
    if spec.key == "gateway":
        gw = start_gateway(
            setup.procs,
            gateway_command(workdir, name, setup.python, valgrind),
            name,
            upstream_port=setup.upstream_port,
            store_url=setup.store.url,
            workers=1,
            key_prefix=name,
        )
        return gw.proc, gw.port
    port = free_port()
    redis_url = setup.store.url if spec.key == "bare+redis" else None
    argv = command([*valgrind, *setup.bare_argv], port, setup.upstream_port, redis_url)
    return start_bare(setup.procs, name, argv, port, START_TIMEOUT), port


def _slug(key: str) -> str:
    return key.replace("+", "-")


def callgrind_control(proc: Proc, *args: str) -> None:
    code, out = run_bounded(["callgrind_control", *args, str(proc.pid)], CONTROL_TIMEOUT)
    if code != 0 or "OK" not in out:
        raise BenchError(f"callgrind_control {' '.join(args)} {proc.pid} failed:\n{out}")


def wait_for_file(proc: Proc, path: Path) -> None:
    """A dump is complete once callgrind wrote its totals line."""

    def done() -> bool:
        return path.exists() and b"\ntotals:" in path.read_bytes()[-4096:]

    wait_until(proc, f"callgrind's dump {path.name}", done, CONTROL_TIMEOUT)


@dataclass
class Options:
    targets: list[str]
    requests: int
    warmup: int
    idle: float
    concurrency: int
    devices: int
    separate_callers: int
    seconds: int
    rounds: int
    connections: int
    bare_plain: bool
    pin: bool
    skip_callgrind: bool
    skip_cpu: bool
    top: int
    output: Path | None
    keep_workdir: bool


def instructions(setup: Setup, spec: TargetSpec, opts: Options) -> Breakdown:
    """Step 1: the target under callgrind; its per-request breakdown."""
    out = setup.procs.workdir / f"{_slug(spec.key)}.callgrind"
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--dump-instr=no",
        "--collect-systime=yes",
        f"--separate-callers={opts.separate_callers}",
        f"--callgrind-out-file={out}",
    ]
    print(f"  {spec.label}: starting under callgrind ...", flush=True)
    proc, port = start_target(setup, spec, f"{_slug(spec.key)}-callgrind", valgrind)
    client = FleetClient(port, opts.concurrency, opts.devices)

    async def drive() -> tuple[float, float, Counter[int]]:
        await client.open()
        try:
            await client.send(opts.warmup)  # the fleet registered, pools filled
            await asyncio.sleep(1.0)
            callgrind_control(proc, "--instr=on")
            started = time.monotonic()
            await asyncio.sleep(opts.idle)
            callgrind_control(proc, "--dump=idle")
            idle_s = time.monotonic() - started
            started = time.monotonic()
            statuses = await client.send(opts.requests)
            callgrind_control(proc, "--dump=loaded")
            loaded_s = time.monotonic() - started
            callgrind_control(proc, "--instr=off")
            return idle_s, loaded_s, statuses
        finally:
            client.close()

    print(
        f"  {spec.label}: {opts.warmup:,} requests to warm up, {opts.idle:g} s idle, "
        f"{opts.requests:,} requests at c{opts.concurrency} ...",
        flush=True,
    )
    idle_s, loaded_s, statuses = asyncio.run(drive())
    bad = sum(n for s, n in statuses.items() if not 200 <= s < 300)
    if bad:
        raise BenchError(
            f"{spec.label}: {bad} of {opts.requests} answers were not 2xx: "
            f"{dict(statuses)}; its log:\n{proc.log_tail()}"
        )
    idle_file, loaded_file = Path(f"{out}.1"), Path(f"{out}.2")
    wait_for_file(proc, idle_file)
    wait_for_file(proc, loaded_file)
    setup.procs.stop(proc)
    print(
        f"  {spec.label}: {opts.requests / loaded_s:,.0f} req/s under callgrind; "
        "reading the profiles ...",
        flush=True,
    )
    return breakdown(
        read_profile(loaded_file), loaded_s, read_profile(idle_file), idle_s, opts.requests,
        opts.top,
    )  # fmt: skip


def cpu_times(root: int) -> tuple[float, float, int]:
    """(user, system) seconds of a process tree, with its reaped children's, and its
    context switches (a voluntary one is a wait for events: one wake-up of the loop)."""
    user = system = switches = 0
    for pid in tree(root):
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        user += int(fields[11]) + (int(fields[13]) if pid == root else 0)
        system += int(fields[12]) + (int(fields[14]) if pid == root else 0)
        found = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.MULTILINE)
        switches += int(found.group(1)) if found else 0
    return user / CLK_TCK, system / CLK_TCK, switches


@dataclass
class CpuRun:
    """One load run without valgrind: per request figures."""

    rps: float
    requests: int
    errors: int
    user_us: float
    system_us: float
    wakeups: float  # voluntary context switches of the target per request
    loadavg: float  # the machine's 1-minute load average as the round started


def cpu(setup: Setup, specs: list[TargetSpec], opts: Options, load: Load) -> dict[str, Any]:
    """Step 2: the targets without valgrind, all started, measured in turn round after round
    (whatever else the machine does then is spread over all of them); per target the median
    round (by CPU per request) and every round."""
    started: dict[str, tuple[TargetSpec, Proc, str]] = {}
    runs: dict[str, list[CpuRun]] = {}
    try:
        for spec in specs:
            proc, port = start_target(setup, spec, f"{_slug(spec.key)}-cpu", [])
            url = f"http://127.0.0.1:{port}"
            started[spec.key] = (spec, proc, url)
            runs[spec.key] = []
            load.run(url, opts.connections, 2)  # warm-up: the fleet registered, pools filled
        for r in range(opts.rounds):
            for key, (spec, proc, url) in started.items():
                time.sleep(0.5)
                loadavg = os.getloadavg()[0]
                u0, s0, w0 = cpu_times(proc.pid)
                result = load.run(url, opts.connections, opts.seconds)
                u1, s1, w1 = cpu_times(proc.pid)
                if not proc.alive() or result.requests == 0:
                    raise BenchError(f"{spec.label}: no answers; its log:\n{proc.log_tail()}")
                n = result.requests
                got = CpuRun(
                    rps=result.rps,
                    requests=n,
                    errors=result.non_2xx + result.socket_errors,
                    user_us=(u1 - u0) / n * 1e6,
                    system_us=(s1 - s0) / n * 1e6,
                    wakeups=(w1 - w0) / n,
                    loadavg=loadavg,
                )
                runs[key].append(got)
                print(
                    f"  round {r + 1}/{opts.rounds}, {spec.label}: {got.rps:,.0f} req/s, "
                    f"{got.user_us:.1f} us user + {got.system_us:.1f} us system per request",
                    flush=True,
                )
    finally:
        for _, proc, _ in started.values():
            setup.procs.stop(proc)
    out = {}
    for key, rounds in runs.items():
        totals = sorted(r.user_us + r.system_us for r in rounds)
        median = sorted(rounds, key=lambda r: r.user_us + r.system_us)[(len(rounds) - 1) // 2]
        out[key] = {
            **asdict(median),
            "total_us_min": totals[0],
            "total_us_max": totals[-1],
            "rounds": [asdict(r) for r in rounds],  # in the order they ran
        }
    return out


# ---- the report ------------------------------------------------------------------------------


def _cells(values: Iterable[float | None], digits: int = 0) -> list[str]:
    return ["-" if v is None else f"{v:,.{digits}f}" for v in values]


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _diffs(keys: list[str]) -> list[tuple[str, str, str]]:
    """(column, minuend, subtrahend): the gateway against each bare proxy measured."""
    out: list[tuple[str, str, str]] = []
    if "gateway" in keys:
        for bare in ("bare", "bare+redis"):
            if bare in keys:
                out.append((f"gateway - {TARGETS[bare].label}", "gateway", bare))
    return out


def render(results: dict[str, Any]) -> str:
    """The tables, from the results dict that is also written as JSON."""
    m, s = results["machine"], results["settings"]
    parts = [
        f"breakdown, started {results['started']}: Python {m['python']}, gateway "
        f"{m['gateway_build']} from {m['gateway_path']} (commit {m['commit']}), bare proxy "
        f"{m['bare_build']}, upstream {m.get('upstream', '-')}",
    ]
    keys = [k for k in TARGETS if k in results["targets"]]
    diffs = _diffs(keys)
    head = ["per request", *(TARGETS[k].label for k in keys), *(d[0] for d in diffs)]

    def row(
        label: str, values: dict[str, float | None], digits: int = 0, diff: bool = True
    ) -> list[str]:
        d = [_minus(values[a], values[b]) if diff else None for _, a, b in diffs]
        return [label, *_cells((values[k] for k in keys), digits), *_cells(d, digits)]

    cg = {k: results["targets"][k].get("callgrind") for k in keys}
    if any(cg.values()):
        parts += [
            "",
            f"instructions per request (callgrind, {s['requests']:,} requests at "
            f"c{s['concurrency']}; Ir):",
        ]
        rows = [
            row(label, {k: c["ir"].get(phase, 0.0) if c else None for k, c in cg.items()})
            for phase, label in PHASES
        ]
        rows.append(row("total", {k: sum(c["ir"].values()) if c else None for k, c in cg.items()}))
        rows.append(
            row(
                "system calls (the vDSO's left out)",
                {k: sum(c["syscalls"].values()) if c else None for k, c in cg.items()},
                2,
            )
        )
        parts.append(table(head, rows))
        for k, c in cg.items():
            if c:
                counts = ", ".join(f"{n} {v:.2f}" for n, v in c["calls_per_request"].items() if v)
                parts.append(
                    f"  {TARGETS[k].label}: {counts}; background {c['background_ir_per_s']:,.0f}"
                    f" Ir/s (idle: {c['idle_ir_per_s']:,.0f} Ir/s)"
                )
    cpu_of = {k: results["targets"][k].get("cpu") for k in keys}
    us = {k: results["targets"][k].get("us") for k in keys}
    if any(cpu_of.values()):
        parts += [
            "",
            f"CPU time per request, us ({s.get('load_tool', 'wrk')} -c{s['connections']}, "
            f"{s['seconds']} s, median of {s['rounds']} interleaved rounds: user time measured "
            "and split by the instruction shares above; system time measured):",
        ]
        rows = []
        for phase, label in [
            *PHASES,
            ("background", "background (per-second work, at this rate)"),
        ]:
            if any(us.values()):
                rows.append(row(label, {k: u.get(phase) if u else None for k, u in us.items()}, 1))
        for name, label in (
            ("user_us", "user time (measured)"),
            ("system_us", "kernel (system time: sockets, epoll)"),
        ):
            if name == "system_us" or not any(us.values()):
                rows.append(row(label, {k: c[name] if c else None for k, c in cpu_of.items()}, 1))
        rows.append(
            row(
                "total (measured)",
                {k: c["user_us"] + c["system_us"] if c else None for k, c in cpu_of.items()},
                1,
            )
        )
        rows.append(
            row(
                "  lowest round",
                {k: c["total_us_min"] if c else None for k, c in cpu_of.items()},
                1,
            )
        )
        rows.append(
            row(
                "  highest round",
                {k: c["total_us_max"] if c else None for k, c in cpu_of.items()},
                1,
            )
        )
        rows.append(
            row("req/s", {k: c["rps"] if c else None for k, c in cpu_of.items()}, diff=False)
        )
        rows.append(
            row(
                "wake-ups (voluntary context switches)",
                {k: c["wakeups"] if c else None for k, c in cpu_of.items()},
                2,
                diff=False,
            )
        )
        parts.append(table(head, rows))
    for k, c in cg.items():
        if not c:
            continue
        parts += ["", f"{TARGETS[k].label}: what each phase holds (Ir per request)"]
        for phase, _ in PHASES:
            fns = c["phase_functions"].get(phase)
            if fns:
                shown = ", ".join(f"{n} {v:,.0f}" for n, v in fns)
                parts.append(f"  {phase}: {shown}")
        parts += ["", f"{TARGETS[k].label}: functions with the most instructions of their own"]
        parts.append(table(["function", "Ir/req"], [[n, f"{v:,.0f}"] for n, v in c["top_self"]]))
        parts += ["", f"{TARGETS[k].label}: its own functions' own instructions"]
        parts.append(
            table(["function", "Ir/req"], [[n, f"{v:,.0f}"] for n, v in c["top_own_self"]])
        )
        parts += ["", f"{TARGETS[k].label}: its own functions, callees included"]
        parts.append(
            table(["function", "Ir/req"], [[n, f"{v:,.0f}"] for n, v in c["top_inclusive"]])
        )
        sysc = ", ".join(f"{n} {v:.2f}" for n, v in c["syscalls_by_function"].items())
        parts.append(f"system calls per request: {sysc}")
        if c["unmapped"]:
            shown = ", ".join(f"{n} {v:,.0f}" for n, v in c["unmapped"])
            parts.append(f"compiled functions no rule names (charged to their callers): {shown}")
    for note in results["notes"]:
        parts.append(f"note: {note}")
    if "error" in results:
        parts.append(f"INCOMPLETE: {results['error'].splitlines()[0]}")
    return "\n".join(parts)


def user_split(cg: dict[str, Any] | None, run: dict[str, Any]) -> dict[str, float] | None:
    """The measured user time per request split by the instruction shares, the background
    (its instructions per second over this rate) included; the system time as it is."""
    if cg is None:
        return None
    ir = dict(cg["ir"])
    ir["background"] = cg["background_ir_per_s"] / run["rps"] if run["rps"] else 0.0
    total = sum(ir.values())
    out = {p: run["user_us"] * v / total for p, v in ir.items()} if total else {}
    out["system"] = run["system_us"]
    return out


# ---- the run -------------------------------------------------------------------------------


def probe_gateway(python: str) -> dict[str, str]:
    """Which `gateway` the targets import, how it is built, and its commit."""
    code, out = run_bounded(
        [
            python,
            "-P",  # not the current directory first: a checkout there would shadow PYTHONPATH
            "-c",
            "import gateway, gateway.dataplane.exchange as e; "
            "print(gateway.__file__); print(e.__file__)",
        ],
        60,
        gateway_env(),
    )
    if code != 0:
        raise BenchError(f"`{python} -c 'import gateway'` fails:\n{out}")
    package, exchange = out.strip().splitlines()[-2:]
    tree_dir = Path(package).parent.parent
    commit = _git(tree_dir, "rev-parse", "--short", "HEAD")
    dirty = _git(tree_dir, "status", "--porcelain", "--", "gateway", "setup.py")
    return {
        "gateway_path": str(tree_dir),
        "gateway_build": "compiled (mypyc)" if exchange.endswith(".so") else "plain Python",
        "commit": f"{commit}{' (gateway/ modified)' if dirty else ''}" if commit else "unknown",
    }


def _git(where: Path, *args: str) -> str:
    try:
        code, out = run_bounded(["git", "-C", str(where), *args], 30)
    except BenchError:
        return ""
    return out.strip() if code == 0 else ""


def run(opts: Options, procs: Processes, results: dict[str, Any]) -> None:
    python = sys.executable
    if not opts.skip_callgrind and not (which("valgrind") and which("callgrind_control")):
        raise BenchError("valgrind is not installed (apt-get install valgrind), or --no-callgrind")
    redis_server = which("redis-server")
    if not redis_server:
        raise BenchError("redis-server is not installed (apt-get install redis-server)")
    probe = probe_gateway(python)
    results["machine"] = {
        "python": f"{sys.version.split()[0]} ({os.path.realpath(python)})",
        "nproc": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "valgrind": _first_line(["valgrind", "--version"]),
        **probe,
    }
    cpus = sorted(os.sched_getaffinity(0))
    target_cpus = None
    if opts.pin and len(cpus) >= 2:
        # The target alone on the last CPU; this process and all it starts (the upstream,
        # Redis, the load generator) on the others, so they never share the target's core.
        target_cpus = {cpus[-1]}
        os.sched_setaffinity(0, set(cpus[:-1]))
        results["settings"]["pinned"] = {"target": cpus[-1], "others": cpus[:-1]}
    elif opts.pin:
        results["notes"].append("one usable CPU: nothing pinned")
    bare_argv, bare_build = compile_proxy(procs.workdir / "bare", python, plain=opts.bare_plain)
    results["machine"]["bare_build"] = bare_build
    if bare_build != "compiled (mypyc)" and not opts.bare_plain:
        results["notes"].append(f"the bare proxy runs as plain Python: {bare_build}")
    print(
        f"gateway: {probe['gateway_build']} from {probe['gateway_path']}, commit "
        f"{probe['commit']}; bare proxy: {bare_build}",
        flush=True,
    )
    _, upstream_port, kind = start_upstream(procs, which("nginx"))
    results["machine"]["upstream"] = kind
    setup = Setup(
        procs, python, upstream_port, RedisServer(procs, redis_server), bare_argv, target_cpus
    )
    targets: dict[str, Any] = results["targets"]
    for key in opts.targets:
        targets[key] = {"label": TARGETS[key].label}
    if not opts.skip_callgrind:
        print("instructions (callgrind):", flush=True)
        for key in opts.targets:
            b = instructions(setup, TARGETS[key], opts)
            targets[key]["callgrind"] = b.__dict__
    if not opts.skip_cpu:
        print("CPU time:", flush=True)
        load = Load.choose(
            "auto", gateway_command(procs.workdir, "gateway", python, []), opts.devices
        )
        results["settings"]["load_tool"] = load.tool
        measured = cpu(setup, [TARGETS[key] for key in opts.targets], opts, load)
        for key, got in measured.items():
            targets[key]["cpu"] = got
            targets[key]["us"] = user_split(targets[key].get("callgrind"), got)


def _first_line(argv: list[str]) -> str | None:
    try:
        _, out = run_bounded(argv, 10)
    except BenchError:
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="bench/breakdown.py",
        description="Instructions and CPU time per request, phase by phase: the gateway "
        'beside a bare proxy (docs/bench.md, "Where a request\'s time goes").',
    )
    p.add_argument(
        "--target",
        choices=("bare", "gateway", "both"),
        default="both",
        help="bare: the bare proxy with and without its Redis call; both (default)",
    )
    p.add_argument(
        "--requests",
        type=int,
        default=20_000,
        help="requests in the measured callgrind window (20000)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        help="requests before it, not measured (default: twice --devices, so every device is "
        "known; fewer is refused)",
    )
    p.add_argument(
        "--idle", type=float, default=5.0, help="seconds of the idle window, reported (5)"
    )
    p.add_argument(
        "--concurrency", type=int, default=64, help="connections of the callgrind load (64)"
    )
    p.add_argument("--devices", type=int, default=1000, help="device ids in rotation (1000)")
    p.add_argument(
        "--separate-callers",
        type=int,
        default=8,
        help="callers of context callgrind keeps per function (8)",
    )
    p.add_argument("--seconds", type=int, default=5, help="seconds per CPU-time run (5)")
    p.add_argument(
        "--rounds", type=int, default=7, help="CPU-time runs per target, interleaved (7)"
    )
    p.add_argument(
        "--connections", type=int, default=64, help="connections of the CPU-time load (64)"
    )
    p.add_argument(
        "--bare-plain",
        action="store_true",
        help="run the bare proxy as plain Python, not compiled with mypyc",
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the target to a CPU of its own (default: pinned to the last usable "
        "CPU, everything else to the others)",
    )
    p.add_argument("--no-callgrind", action="store_true", help="CPU time only")
    p.add_argument("--no-cpu", action="store_true", help="instructions only")
    p.add_argument("--top", type=int, default=10, help="functions listed per target (10)")
    p.add_argument(
        "--output", type=Path, help="JSON file (default bench/results/breakdown-<time>.json)"
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep configs, logs, profiles")
    a = p.parse_args(argv)
    if min(a.requests, a.concurrency, a.devices, a.seconds, a.rounds, a.connections) < 1:
        p.error("--requests, --concurrency, --devices, --seconds, --rounds, --connections >= 1")
    warmup = 2 * a.devices if a.warmup is None else a.warmup
    if a.idle <= 0 or warmup < a.devices or a.separate_callers < 0:
        p.error("--idle must be > 0, --warmup >= --devices, --separate-callers >= 0")
    targets = {"bare": ["bare", "bare+redis"], "gateway": ["gateway"]}.get(
        a.target, ["gateway", "bare", "bare+redis"]
    )
    return Options(
        targets=targets,
        requests=a.requests,
        warmup=warmup,
        idle=a.idle,
        concurrency=a.concurrency,
        devices=a.devices,
        separate_callers=a.separate_callers,
        seconds=a.seconds,
        rounds=a.rounds,
        connections=a.connections,
        bare_plain=a.bare_plain,
        pin=not a.no_pin,
        skip_callgrind=a.no_callgrind,
        skip_cpu=a.no_cpu,
        top=a.top,
        output=a.output,
        keep_workdir=a.keep_workdir,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="devicegate-breakdown-"))
    workdir.chmod(0o755)  # nginx workers drop to `nobody` when started as root
    procs = Processes(workdir)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in opts.__dict__.items()},
        "targets": {},
        "notes": [],
    }
    code = 1
    try:
        with terminate_as_interrupt():
            run(opts, procs, results)
        code = 0
    except BenchError as exc:
        results["error"] = str(exc)
        print(f"\nbreakdown: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        results["error"] = "interrupted"
        print("\nbreakdown: interrupted; stopping everything", file=sys.stderr)
        code = 130
    finally:
        procs.stop_all()
    if "machine" in results:
        print(f"\n{render(results)}")
        path = opts.output or RESULTS / f"breakdown-{time.strftime('%Y%m%dT%H%M%S')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nresults: {path}")
    procs.clean_up(keep=bool(code) or opts.keep_workdir)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
