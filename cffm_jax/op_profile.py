"""Where a compiled program's time goes: XLA's per-operation trace, by kind of operation and by part of the model.

:func:`profile` runs a program once under ``jax.profiler``, reads the trace back (``jax.profiler.ProfileData``) and
matches each executed operation (a "thunk": one HLO instruction, often a fusion of many) with its instruction in the
program's optimised HLO (``compiled.as_text()``). From the HLO it knows

* the operation's matrix-product FLOPs (its ``dot`` and ``convolution`` instructions, inside fusions too), so the
  products' achieved GFLOP/s can be set against the machine's matrix-multiply peak: the benchmark's "heavy parts";
* its kind (:data:`CATEGORIES`);
* the part of the model it comes from: the Flax module path (or ``jax.named_scope``) in the instruction's
  ``op_name`` metadata, e.g. ``backbone/block1_0``, and whether it belongs to the backward pass. An instruction
  without metadata (XLA made it) takes that of its nearest named operand; "(no module)" is what is left.

An operation's time is its share of the run's wall time: while it is in flight it shares each instant equally with
the other operations in flight (XLA:CPU runs independent operations side by side on its threads), so the times add
up to the wall time in which something ran (``busy_s``), and a product's GFLOP/s is comparable with the machine's
matrix-multiply peak on all its cores. Control-flow instructions (``while``, ``conditional``, ``call``) are not
counted: the operations of their bodies are, each time they run.

In flight is not the same as computing: when all cores are busy (XLA's threads run operations side by side and
share out the large ones), an operation may wait for a core, and its share then includes the wait; a small copy
that shows tens of milliseconds is such a case. Tracing slows a run somewhat (~10% for a training step of 3,500
operations on a 2-core CPU). The shares, not the absolute times, are the point.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import math
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

CATEGORIES = {
    "products": "matrix products and convolutions (and what XLA fused into them)",
    "elementwise": "elementwise fusions (activations, normalisation arithmetic, optimizer updates)",
    "reductions": "reductions (softmax and normalisation statistics, gradient sums, argmax)",
    "gathers": "gathers, scatters and dynamic slices",
    "data movement": "copies, transposes, concatenations, pads, slices",
    "other": "everything else (sorts, custom calls, collectives)",
}
CONTROL = frozenset({"while", "conditional", "call"})
_MOVEMENT = frozenset(
    "copy transpose bitcast reshape broadcast slice concatenate pad reverse parameter constant tuple "
    "get-tuple-element iota".split()
)
_GATHER = frozenset({"gather", "scatter", "dynamic-slice", "dynamic-update-slice"})
_REDUCE = frozenset({"reduce", "reduce-window", "select-and-scatter"})
_OTHER = frozenset({"sort", "custom-call", "all-reduce", "all-gather", "reduce-scatter", "all-to-all"})
# op_name components that are transformations or jax-internal calls, not parts of the model.
_NOT_SCOPES = frozenset({"while", "body", "cond", "closed_call", "checkpoint", "remat", "scan", "pjit", "core_call"})
_SCOPE_NAME = re.compile(r"[A-Za-z_][\w.]*")
# A scope inside transformations, as the forward and backward passes name it: jvp(loss), transpose(jvp(CFFM)).
_TRANSFORMED = re.compile(r"(?:(?:jvp|transpose|vmap|remat|checkpoint)\()+([A-Za-z_][\w.]*)\)+")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([^\s(]+)")


@dataclasses.dataclass
class Instruction:
    """One HLO instruction of an optimised program."""

    name: str
    opcode: str
    dims: tuple[int, ...] | None  # None for a tuple shape
    operands: tuple[str, ...]
    attrs: str
    op_name: str = ""
    called: tuple[str, ...] = ()  # computations it calls (fusion bodies, loop bodies, reducers)


@dataclasses.dataclass
class Operation:
    """What the profile needs to know of an instruction that runs as one thunk."""

    category: str
    flops: float  # matrix-product FLOPs per execution
    scope: str  # model part, e.g. "backbone/block1_0"; "(no module)" if the op_name has none
    backward: bool
    op_name: str = ""  # the jax source of the instruction (its own op_name metadata, or its operand's)


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes ``text[start]`` (an opening parenthesis)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _dims(shape: str) -> tuple[int, ...] | None:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    if m is None:
        return None
    return tuple(int(d) for d in m.group(1).split(",") if d)


def parse_instruction(line: str) -> Instruction | None:
    """An instruction line of HLO text -> :class:`Instruction` (None for any other line)."""
    m = _INSTRUCTION.match(line)
    if m is None:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):  # a tuple shape
        end = _matching(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren]
    end = _matching(rest, paren)
    operands = tuple(re.findall(r"%([^\s,()]+)", rest[paren:end]))
    attrs = rest[end:]
    op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', attrs)
    called = re.findall(r"(?:calls|to_apply|body|condition)=%([^\s,{}]+)", attrs)
    return Instruction(
        m.group(1),
        opcode,
        None if shape.startswith("(") else _dims(shape),
        operands,
        attrs,
        op_name.group(1) if op_name else "",
        tuple(dict.fromkeys(called)),
    )


def _product_flops(ins: Instruction, shapes: dict[str, tuple[int, ...] | None]) -> float:
    """FLOPs of a ``dot`` or ``convolution`` (2 per multiply-add); 0 for anything else."""
    if ins.opcode not in ("dot", "convolution") or ins.dims is None or len(ins.operands) < 2:
        return 0.0
    out = math.prod(ins.dims)
    if ins.opcode == "dot":
        lhs = shapes.get(ins.operands[0])
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        if lhs is None or contracting is None:
            return 0.0
        return 2.0 * out * math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d)
    # Each output element sums over the kernel's spatial and input-feature extent: the kernel's size over its
    # output features (grouped convolutions included: the kernel's input features are those of one group); taps
    # on padding count.
    rhs = shapes.get(ins.operands[1])
    labels = re.search(r"dim_labels=[^_]+_([^-]+)->", ins.attrs)
    if rhs is None or labels is None or "o" not in labels.group(1):
        return 0.0
    flops = 2.0 * out * math.prod(rhs) / rhs[labels.group(1).index("o")]
    # An input-dilated convolution (the gradient of a strided one) multiplies by the zeros dilation inserts only on
    # paper: of a window's taps, about one in the dilation factor meets an input element.
    lhs_dilate = re.search(r"lhs_dilate=([\dx]+)", ins.attrs)
    return flops / math.prod(int(d) for d in lhs_dilate.group(1).split("x")) if lhs_dilate else flops


def split_op_name(op_name: str) -> list[str]:
    """``op_name`` metadata split at the slashes that are not inside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(op_name):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "/" and depth == 0:
            parts.append(op_name[start:i])
            start = i + 1
    parts.append(op_name[start:])
    return parts


def scope_of(op_name: str, depth: int = 2) -> tuple[str, bool]:
    """(model part, backward?) of an instruction's ``op_name``: its first ``depth`` module (or named-scope)
    names below the root module, e.g. ``jit(train_step)/transpose(jvp(CFFM))/backbone/block1_0/attn/dot_general``
    and ``jit(run)/CFFM.encode_frames/backbone/block1_0/attn/dot_general`` -> ``backbone/block1_0``, backward True
    for the first. A Flax method's suffix (``decode_head.decode_clip``) is dropped."""
    parts = split_op_name(op_name)
    backward = any(p.startswith("transpose(") for p in parts)
    names: list[str] = []
    for part in parts[1:-1]:  # the first is the jitted function, the last the primitive
        transformed = _TRANSFORMED.fullmatch(part)
        if transformed:
            part = transformed.group(1)
        elif not _SCOPE_NAME.fullmatch(part) or part in _NOT_SCOPES:
            continue
        name = part.split(".")[0]
        if not names and name[:1].isupper():  # the root module (its class name): the whole model
            continue
        if not names or names[-1] != name:
            names.append(name)
    return ("/".join(names[:depth]) or "(no module)"), backward


class Program:
    """The instructions of one optimised HLO module (``compiled.as_text()``)."""

    def __init__(self, text: str):
        header = re.match(r"HloModule\s+([^\s,]+)", text)
        self.module = header.group(1) if header else ""
        self.computations: dict[str, list[Instruction]] = {}
        self.instructions: dict[str, Instruction] = {}
        current: list[Instruction] | None = None
        for line in text.splitlines():
            if line.rstrip().endswith("{") and not line.startswith(" "):
                m = _COMPUTATION.match(line)
                current = self.computations.setdefault(m.group(1), []) if m else None
                continue
            ins = parse_instruction(line)
            if ins is not None and current is not None:
                current.append(ins)
                self.instructions[ins.name] = ins
        shapes = {name: ins.dims for name, ins in self.instructions.items()}
        self._own_flops = {name: _product_flops(ins, shapes) for name, ins in self.instructions.items()}
        self._contents: dict[str, tuple[float, frozenset[str]]] = {}
        self._operations: dict[tuple[str, int], Operation | None] = {}

    def _computation(self, name: str) -> tuple[float, frozenset[str]]:
        """(product FLOPs, opcodes) of a called computation, nested calls included (memoised)."""
        if name not in self._contents:
            self._contents[name] = (0.0, frozenset())  # guards against cycles
            flops, opcodes = 0.0, set()
            for ins in self.computations.get(name, ()):
                f, ops = self._inside(ins)
                flops, opcodes = flops + f, opcodes | ops
            self._contents[name] = (flops, frozenset(opcodes))
        return self._contents[name]

    def _inside(self, ins: Instruction) -> tuple[float, frozenset[str]]:
        flops, opcodes = self._own_flops[ins.name], {ins.opcode}
        if ins.opcode not in CONTROL:  # a fusion's body, a reducer
            for c in ins.called:
                f, ops = self._computation(c)
                flops, opcodes = flops + f, opcodes | ops
        return flops, frozenset(opcodes)

    def operation(self, name: str, depth: int = 2) -> Operation | None:
        """The :class:`Operation` of instruction ``name``; None for control flow and unknown names (memoised)."""
        if (name, depth) not in self._operations:
            self._operations[(name, depth)] = self._operation(name, depth)
        return self._operations[(name, depth)]

    def _operation(self, name: str, depth: int) -> Operation | None:
        ins = self.instructions.get(name)
        if ins is None or ins.opcode in CONTROL:
            return None
        flops, opcodes = self._inside(ins)
        opcodes = opcodes - {"fusion"}
        if flops > 0:
            category = "products"
        elif opcodes & _OTHER:
            category = "other"
        elif opcodes & _GATHER:
            category = "gathers"
        elif opcodes & _REDUCE:
            category = "reductions"
        elif opcodes <= _MOVEMENT:
            category = "data movement"
        else:
            category = "elementwise"
        op_name = ins.op_name or self._operands_op_name(ins)
        scope, backward = scope_of(op_name, depth)
        return Operation(category, flops, scope, backward, op_name)

    def _operands_op_name(self, ins: Instruction, levels: int = 3) -> str:
        """The ``op_name`` of the nearest named instruction among ``ins``'s operands (breadth first, ``levels``
        deep): fusions that XLA makes (e.g. its YNNPACK library fusions) often carry no metadata of their own."""
        frontier = [ins]
        for _ in range(levels):
            frontier = [self.instructions[o] for i in frontier for o in i.operands if o in self.instructions]
            named = [i.op_name for i in frontier if i.op_name]
            if named:
                return named[0]
        return ""


def trace_events(run: Callable[[], Any]) -> tuple[list[tuple[str, str, int, int]], float]:
    """Runs ``run()`` once under ``jax.profiler`` -> ([(HLO module, HLO op, start ns, end ns) per executed
    operation], wall s).

    An operation that XLA:CPU runs asynchronously (e.g. an Eigen matrix product handed to the intra-op thread
    pool) returns before it is done; the trace marks its completion with an ``end: <op>`` event joined to it by a
    flow id, and that is taken as its end.
    """
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python function events: not needed, and they slow the run
    options.enable_hlo_proto = False
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, profiler_options=options):
            start = time.perf_counter()
            jax.block_until_ready(run())
            wall = time.perf_counter() - start
        files = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no trace under {tmp}")
        data = jax.profiler.ProfileData.from_file(files[0])
    ops, ends = [], {}
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                if "hlo_op" in stats and "hlo_module" in stats:
                    module, op = str(stats["hlo_module"]), str(stats["hlo_op"])
                    ops.append((module, op, ev.start_ns, ev.end_ns, stats.get("_p")))
                elif ev.name.startswith("end: ") and "_c" in stats:
                    ends[stats["_c"]] = ev.end_ns
    events = [
        (module, op, int(begin), int(max(end, ends.get(flow, end)) if flow is not None else end))
        for module, op, begin, end, flow in ops
    ]
    return events, wall


def attribute(intervals: Sequence[tuple[Any, int, int]]) -> tuple[dict[Any, float], float]:
    """Wall time shared out among overlapping intervals ``(key, start ns, end ns)``: at each instant the operations
    in flight split it equally -> (seconds per key, seconds with at least one in flight).

    The shares add up to the busy wall time, so a product's FLOPs over its share compare with the machine's
    (all-core) matmul peak, also when two operations run side by side on different cores.
    """
    bounds = sorted(
        [(begin, 1, i) for i, (_, begin, _) in enumerate(intervals)]
        + [(end, 0, i) for i, (_, _, end) in enumerate(intervals)]
    )
    shares: dict[Any, float] = collections.defaultdict(float)
    active: set[int] = set()
    busy, last = 0.0, None
    for t, is_start, i in bounds:
        if active and last is not None and t > last:
            dt = (t - last) * 1e-9
            busy += dt
            for j in active:
                shares[intervals[j][0]] += dt / len(active)
        last = t
        if is_start:
            active.add(i)
        else:
            active.discard(i)
    return dict(shares), busy


def _rate(flops: float, seconds: float) -> float | None:
    return flops / seconds / 1e9 if flops and seconds > 0 else None


def summarize(
    programs: Sequence[Program],
    traces: Sequence[tuple[Iterable[tuple[str, str, int, int]], float]],
    top: int = 15,
    depth: int = 2,
) -> dict[str, Any]:
    """Traces of runs of ``programs`` (:func:`trace_events`' results) -> the JSON-ready breakdown (see
    :func:`profile`); an operation's time is its median over the runs."""
    by_module = {p.module: p for p in programs}
    runs: dict[tuple[str, str], int] = {}
    per_run: list[dict[tuple[str, str], float]] = []
    for events, _ in traces:
        counts: dict[tuple[str, str], int] = collections.Counter()
        intervals = []
        for module, op, begin, end in events:
            program = by_module.get(module)
            if program is None or program.operation(op, depth) is None:  # another program, control flow
                continue
            counts[(module, op)] += 1
            intervals.append(((module, op), begin, end))
        runs = {**counts, **runs}  # executions per run: the first trace's
        per_run.append(attribute(intervals)[0])
    seconds = {key: statistics.median(shares.get(key, 0.0) for shares in per_run) for key in runs}
    busy = sum(seconds.values())
    categories = {c: {"s": 0.0, "gflop": 0.0} for c in CATEGORIES}
    scopes: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"s": 0.0, "gflop": 0.0})
    rows = []
    for (module, op), n in runs.items():
        operation = by_module[module].operation(op, depth)
        gflop, s = operation.flops * n / 1e9, seconds[(module, op)]
        scope = operation.scope + (" (backward)" if operation.backward else "")
        for group in (categories[operation.category], scopes[scope]):
            group["s"] += s
            group["gflop"] += gflop
        rows.append(
            {
                "op": op,
                "module": module,
                "category": operation.category,
                "scope": scope,
                "runs": n,
                "s": s,
                "gflop": gflop,
                "gflops_per_s": _rate(gflop * 1e9, s),
                "op_name": operation.op_name,
            }
        )
    for group in (*categories.values(), *scopes.values()):
        group["share"] = group["s"] / busy if busy else None
        group["gflops_per_s"] = _rate(group["gflop"] * 1e9, group["s"])
    scope_rows = sorted(({"scope": name, **v} for name, v in scopes.items()), key=lambda r: -r["s"])
    rows.sort(key=lambda r: -r["s"])
    return {
        "runs": len(traces),
        "wall_s": statistics.median(wall for _, wall in traces),
        "busy_s": busy,
        "operations": len(rows),
        "categories": categories,
        "scopes": scope_rows,
        "top": rows[:top],
    }


def profile(
    run: Callable[[], Any], executables: Sequence[Any], runs: int = 3, top: int = 15, depth: int = 2
) -> dict[str, Any]:
    """Runs ``run()`` (which runs ``executables``, compiled jax programs) ``runs`` times under the profiler ->
    breakdown. A run's time per operation is its share of the wall time (:func:`attribute`); the breakdown takes
    each operation's median over the runs (one run on a shared machine can catch a stall).

    Returns ``runs``, ``wall_s`` (the median profiled run), ``busy_s`` (the operations' times summed: the wall
    time with an operation in flight), ``categories`` (seconds, share of ``busy_s``, matrix-product GFLOP and
    GFLOP/s per kind of operation, :data:`CATEGORIES`), ``scopes`` (the same per model part, the slowest first;
    ``depth`` module names) and ``top`` (the ``top`` slowest operations, each with its ``op_name``: the jax
    operation it comes from, e.g. ``jit(train_step)/transpose(jvp(CFFM))/backbone/block1_1/attn/.../dot_general``).
    """
    programs = [Program(e.as_text()) for e in executables]
    traces = [trace_events(run) for _ in range(runs)]
    return summarize(programs, traces, top=top, depth=depth)
