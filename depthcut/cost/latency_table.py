"""A table of measured segment latencies, cached on disk: what `--choose dp` plans with.

Sites s_1..s_n in forward order, with sentinels s_0 (the model input) and s_{n+1} (its output).
Segment (i, j), i < j, is the part of the network after s_i up to and including s_j when the
sites strictly between them are linear and s_i, s_j stay nonlinear. A plan keeps sites
0 = a_0 < a_1 < ... < a_m = n+1, and its latency is estimated as the sum of its segments'
latencies (`plan_seconds`): exact for a chain run node by node, an approximation for branching
nets (a skip that crosses a segment border is timed as an input of the segment that reads it).

How a segment is timed (`_time_segment`): the traced model's nodes are sliced in forward order
from just after s_i to s_j (the slice is widened back to an earlier node when it reads more
than one value from before it, e.g. a residual skip, so that it has one input); the sites inside
are removed (linear); the slice is folded on its own (`depthcut.fold`, policy `form`: "macs",
the exact fold of least multiply-adds, or "shallow", every exact merge; `fastest_forms` takes
each segment in its faster form, as LayerMerge chooses how to merge each, from forms timed side
by side by `build_form_tables`); the folded graph is cut
again between s_i and s_j (kept sites stay call_module nodes; values from before the cut become
inputs, shapes from torch.fx ShapeProp); and that sub-module is timed by the backend's timer
(`depthcut.cost`) at the table's batch, its inputs packed into one flat tensor when there are
several (the Timer interface takes one example; views, so eager copies nothing). The time of
calling an empty module on the backend (`overhead`) is subtracted from each segment and added
once to a plan, so a plan of few segments is not credited with fewer calls than the whole
model makes.

The cache (`LatencyTable`, one JSON file: `latency_table` setting, else $DEPTHCUT_LATENCY_TABLE,
else ~/.cache/depthcut/latency/table.json) is keyed by a structural signature of the *unfolded*
slice (module types and reprs, call targets, wiring, batch-1 shapes; linear sites and no-ops
left out, so a site linearized at an earlier stage, an Identity now, reads the entry of the
same segment with that site linear inside) and the context (backend, batch, device, thread
count, torch version, merge form): weights do not enter, so identical repeated blocks share
entries, and a re-plan (next stage, a resumed run, another run of the same architecture)
neither folds nor times anything once the entries exist. A slice that does not fold
(FoldError) is timed as it is and its entry says "unfolded".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp
from tqdm.auto import tqdm

from depthcut.cost.timer import Timed, get_timer, medians, round_robin
from depthcut.errors import ConfigError
from depthcut.fold import FoldError, FoldPolicy, fold
from depthcut.graph import PASS_THROUGH, trace
from depthcut.masks import clone_model

TABLE_VARIABLE = "DEPTHCUT_LATENCY_TABLE"
DEFAULT_SPAN = 8  # most sites a segment may hold inside (bounds the table's size)
MERGE_FORMS = ("macs", "shallow", "all")  # fold policies a segment's merged form may come from
FOLD_BATCH = 2  # batch of the random input a slice is folded on (folding ignores the batch)

Segment = tuple[int, int]  # (i, j): positions in the sentinel list, 0 = input, n+1 = output


def default_table_path() -> Path:
    """$DEPTHCUT_LATENCY_TABLE, else ~/.cache/depthcut/latency/table.json."""
    given = os.environ.get(TABLE_VARIABLE)
    if given:
        return Path(given).expanduser()
    return Path.home() / ".cache" / "depthcut" / "latency" / "table.json"


@dataclass(frozen=True)
class TableContext:
    """Everything besides the segment that a time depends on: part of every key."""

    backend: str
    batch: int
    device: str = "cpu"
    threads: int = field(default_factory=torch.get_num_threads)
    torch: str = torch.__version__
    form: str = "macs"  # the fold policy a segment's merged form comes from

    def __post_init__(self) -> None:
        get_timer(self.backend)  # ConfigError for an unknown backend
        if self.form not in MERGE_FORMS:
            raise ConfigError(f"merge form must be one of {MERGE_FORMS}, got {self.form!r}")
        if self.batch < 1:
            raise ConfigError(f"latency batch must be >= 1, got {self.batch}")

    def key(self) -> str:
        return (f"{self.backend}|b{self.batch}|{self.device}|t{self.threads}|torch{self.torch}|"
                f"{self.form}")


class LatencyTable:
    """Seconds per key in a JSON file, read once and written back (atomically, merged with what
    another process wrote meanwhile) after new entries; `hits` and `misses` count lookups."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path).expanduser() if path else default_table_path()
        self.entries: dict[str, dict] = self._read()
        self.hits = self.misses = 0
        self._dirty = False

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise ConfigError(f"latency table {self.path} is unreadable ({error}): delete it "
                              "or give another --latency-table") from error
        return data.get("entries", {}) if isinstance(data, dict) else {}

    def get(self, key: str) -> float | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return float(entry["seconds"])

    def put(self, key: str, seconds: float, **about: object) -> None:
        self.entries[key] = {"seconds": seconds, **about}
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**self._read(), **self.entries}
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump({"format": 1, "entries": merged}, file, indent=0, sort_keys=True)
        os.replace(temporary, self.path)
        self.entries, self._dirty = merged, False


class _KeepAlive(nn.Module):
    """Returns its first argument; the others are values a slice must still compute for the
    nodes after it. A leaf for depthcut's tracer, so that folding keeps them."""

    depthcut_leaf = True

    def forward(self, first: Tensor, *others: Tensor) -> Tensor:
        return first


KEEP_ALIVE = "depthcut_keep_alive"


class _Unpack(nn.Module):
    """Runs a multi-input segment from one flat tensor (the Timer interface takes one example):
    each input is a contiguous view of it."""

    def __init__(self, segment: nn.Module, shapes: Sequence[torch.Size]) -> None:
        super().__init__()
        self.segment, self.shapes = segment, [tuple(s) for s in shapes]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]

    def forward(self, flat: Tensor) -> object:
        parts = flat.split(self.sizes)
        return self.segment(*(p.view(s) for p, s in zip(parts, self.shapes, strict=True)))


class _Empty(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


def _meta(node: torch.fx.Node) -> tuple[tuple[int, ...], torch.dtype] | None:
    meta = node.meta.get("tensor_meta")
    return (tuple(meta.shape), meta.dtype) if hasattr(meta, "shape") else None


def _with_batch(shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    return (batch, *shape[1:])


def _random(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def _cut(gm: torch.fx.GraphModule, region: list[torch.fx.Node], linear: set[str],
         output: torch.fx.Node | None) -> tuple[torch.fx.GraphModule, list[torch.fx.Node]]:
    """`region` (nodes of `gm` in order) as a GraphModule: values from before it become inputs
    (parameters read with get_attr are copied), sites named in `linear` are dropped (their
    input passes through), and it returns `output`'s value (None: the region's last node),
    keeping alive every region value that a node after it reads. Also the input nodes."""
    inside = set(region)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    inputs: list[torch.fx.Node] = []

    def value(node: torch.fx.Node) -> torch.fx.Node:
        if node not in env:
            if node.op == "get_attr":
                env[node] = graph.get_attr(node.target)
            else:
                inputs.append(node)
                env[node] = graph.placeholder(f"input_{len(inputs)}")
        return env[node]

    for node in region:  # placeholders first: a graph's inputs precede its ops
        for source in node.all_input_nodes:
            if source not in inside and source.op != "get_attr":
                value(source)
    for node in region:
        if node.op == "output":
            graph.output(torch.fx.node.map_arg(node.args[0], value))
            break
        if _passes_through(gm, node, linear):
            env[node] = value(node.args[0])
            continue
        env[node] = graph.node_copy(node, value)
    else:
        last = output if output is not None else region[-1]
        later = [n for n in region if n is not last and n.op != "get_attr"
                 and any(user not in inside for user in n.users)]
        if later:
            graph.output(graph.call_module(KEEP_ALIVE, (env[last], *(env[n] for n in later))))
        else:
            graph.output(env[last])
    if not inputs:  # a slice of constants: give it an input to be called with
        graph.placeholder("unused")
    graph.lint()
    root = {name: module for name, module in gm.named_modules()
            if any(n.op == "call_module" and n.target == name for n in graph.nodes)}
    root[KEEP_ALIVE] = _KeepAlive()
    root.update({str(n.target): _attribute(gm, str(n.target))
                 for n in graph.nodes if n.op == "get_attr"})
    return torch.fx.GraphModule(root, graph), inputs


def _passes_through(gm: nn.Module, node: torch.fx.Node, linear: set[str]) -> bool:
    """A linear site, or a module that returns its input (Identity, eval Dropout)."""
    return node.op == "call_module" and (
        node.target in linear or isinstance(gm.get_submodule(str(node.target)), PASS_THROUGH))


def _attribute(gm: nn.Module, target: str) -> object:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


class SegmentTimer:
    """The segments of one model (its current sites and the sentinels), keyed and timed.

    `model` is traced once on a CPU copy (ShapeProp at batch 1 on `sample`, one input); nothing
    of it changes."""

    def __init__(self, model: nn.Module, sample: Tensor, context: TableContext,
                 table: LatencyTable, sites: Sequence[str], repeats: int = 15,
                 warmup: int = 3) -> None:
        self.context, self.table, self.repeats, self.warmup = context, table, repeats, warmup
        self.sites = list(sites)
        self.sample = sample[:1].detach().cpu()
        with torch.random.fork_rng(devices=[]):
            self.gm = trace(clone_model(model).cpu().eval())
            with torch.no_grad():
                ShapeProp(self.gm).propagate(self.sample)
        self.nodes = list(self.gm.graph.nodes)
        self.position = {node: index for index, node in enumerate(self.nodes)}
        by_target = {}
        for node in self.nodes:
            if node.op == "call_module":
                by_target.setdefault(node.target, node)
        missing = [s for s in self.sites if s not in by_target]
        if missing:
            raise ConfigError(f"sites {missing} are not module calls of the traced model")
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        output = next(n for n in self.nodes if n.op == "output")
        self.boundary = [placeholders[-1], *(by_target[s] for s in self.sites), output]
        self.forms: dict[Segment, str] = {}  # the merged form each segment read was timed in

    # ----------------------------------------------------------------------------- structure
    def _slice(self, i: int, j: int) -> list[torch.fx.Node]:
        """Nodes after boundary i up to boundary j, widened back until one value enters."""
        end = self.position[self.boundary[j]]
        start = self.position[self.boundary[i]]
        while True:
            region = self.nodes[start + 1:end + 1]
            inside = set(region)
            entering = {source for node in region for source in node.all_input_nodes
                        if source not in inside and source.op != "get_attr"}
            if len(entering) <= 1:
                return region
            start = min(self.position[node] for node in entering)

    def modules(self, i: int, j: int) -> list[str]:
        """The modules segment (i, j) runs of its own (not widened back), sites left out: what
        a per-segment fold form applies to (`depthcut.fold.FormsPolicy`)."""
        start, end = self.position[self.boundary[i]], self.position[self.boundary[j]]
        sites = set(self.sites)
        return [str(n.target) for n in self.nodes[start + 1:end + 1]
                if n.op == "call_module" and n.target not in sites]

    def linear_between(self, i: int, j: int) -> set[str]:
        return set(self.sites[i:j - 1])  # boundary k is site k-1 of the list

    def signature(self, i: int, j: int) -> str:
        """A hash of slice (i, j)'s structure: what it computes and on what shapes, not the
        weights; identical blocks share it."""
        linear = self.linear_between(i, j)
        # Linear sites and no-ops (a site linearized earlier is an Identity) pass their input
        # through: left out, so both spellings of the same computation share an entry.
        dropped = {n for n in self._slice(i, j) if _passes_through(self.gm, n, linear)}
        region = [n for n in self._slice(i, j) if n not in dropped]
        index = {node: k for k, node in enumerate(region)}
        kept = {self.boundary[i], self.boundary[j]}
        modules = dict(self.gm.named_modules())

        def through(node: torch.fx.Node) -> torch.fx.Node:
            while node in dropped:
                node = node.args[0]
            return node

        def ref(arg: object) -> object:
            if isinstance(arg, torch.fx.Node):
                arg = through(arg)
                return f"%{index[arg]}" if arg in index else f"in:{_meta(arg)}"
            return repr(arg)

        def used_after(node: torch.fx.Node) -> bool:
            return any(used_after(user) if user in dropped else user not in index
                       for user in node.users)

        described = []
        for node in region:
            if node.op == "call_module":
                module = modules[node.target]
                what = [type(module).__qualname__, repr(module)]
                if node.target in self.sites:
                    what.append("kept-site" if node not in kept else "boundary-site")
            elif node.op == "get_attr":
                value = _attribute(self.gm, str(node.target))
                what = ["attr", type(value).__qualname__, str(tuple(getattr(value, "shape", ())))]
            else:
                target = node.target
                what = [getattr(target, "__module__", "") or "",
                        getattr(target, "__qualname__", str(target))]
            users_after = used_after(node)
            described.append([node.op, what,
                              repr(torch.fx.node.map_aggregate(node.args, ref)),
                              repr(torch.fx.node.map_aggregate(node.kwargs, ref)),
                              repr(_meta(node)), users_after])
        described.append(["ends", index.get(self.boundary[j])])
        text = json.dumps(described, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def key(self, i: int, j: int) -> str:
        return f"{self.context.key()}|{self.signature(i, j)}"

    # -------------------------------------------------------------------------------- timing
    def overhead(self) -> float:
        """Seconds of calling an empty module on the backend (cached like a segment)."""
        key = f"{self.context.key()}|overhead"
        seconds = self.table.get(key)
        if seconds is None:
            x = torch.zeros(self.context.batch, 1, device=self.context.device)
            seconds = self._timed(_Empty(), x)
            self.table.put(key, seconds, what="empty module call")
        return seconds

    def seconds(self, i: int, j: int) -> float:
        """Segment (i, j)'s time from the table, timed now on a miss (raw: overhead included)."""
        key = self.key(i, j)
        seconds = self.table.get(key)
        if seconds is None:
            seconds, form = self._time_segment(i, j)
            self.record(i, j, seconds, form)
        self.forms[(i, j)] = self.table.entries[key].get("merge", self.context.form)
        return seconds

    def record(self, i: int, j: int, seconds: float, form: str, **about: object) -> None:
        """Put segment (i, j)'s time into the table (replacing an entry of the same key)."""
        names = ["input", *self.sites, "output"]
        self.table.put(self.key(i, j), seconds, segment=f"{names[i]} -> {names[j]}",
                       linear=j - i - 1, merge=form, **about)
        self.forms[(i, j)] = form

    def _time_segment(self, i: int, j: int) -> tuple[float, str]:
        """Seconds of segment (i, j) in its merged form, and that form."""
        timed, form = self.prepare(i, j)
        return timed.timer.measure(timed.call, timed.device, self.repeats, self.warmup), form

    def prepare(self, i: int, j: int) -> tuple[Timed, str]:
        """Segment (i, j) in its merged form, ready to time, and that form: the context's fold
        policy, or "unfolded" where folding the slice fails (FoldError: the ops as they are,
        the inside sites removed)."""
        region = self._slice(i, j)
        sliced, entering = _cut(self.gm, region, self.linear_between(i, j), self.boundary[j])
        assert len(entering) <= 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if not entering:
                fold_input = torch.zeros(FOLD_BATCH, 1)
            elif entering[0].op == "placeholder":
                fold_input = self.sample.expand(FOLD_BATCH, *self.sample.shape[1:]).contiguous()
            else:
                shape, dtype = _meta(entering[0])
                fold_input = _random(_with_batch(shape, FOLD_BATCH), dtype, "cpu")
            form = self.context.form
            try:
                folded = fold(sliced, fold_input, form)
            except FoldError:
                folded, form = sliced, "unfolded"
            big = fold_input[:1].expand(self.context.batch, *fold_input.shape[1:]).contiguous()
            with torch.no_grad():
                ShapeProp(folded).propagate(big)
            timed, inputs = self._cut_folded(folded, i, j)
            device = self.context.device
            values = [_random(*_meta(node), device) if _meta(node) else torch.zeros(1)
                      for node in inputs] or [torch.zeros(1, device=device)]
            timed = timed.to(device).eval()
            if len(values) == 1:
                module, example = timed, values[0]
            else:
                module = _Unpack(timed, [v.shape for v in values])
                example = torch.cat([v.reshape(-1) for v in values])
            timer = get_timer(self.context.backend)
            return Timed(timer, timer.prepare(module, example), example.device), form

    def _timed(self, module: nn.Module, example: Tensor) -> float:
        return get_timer(self.context.backend).seconds(module, example, self.repeats,
                                                       self.warmup)

    def _cut_folded(self, folded: torch.fx.GraphModule, i: int, j: int
                    ) -> tuple[torch.fx.GraphModule, list[torch.fx.Node]]:
        """The folded slice cut between boundary i and boundary j (kept sites are still
        call_module nodes of the same names)."""
        nodes = list(folded.graph.nodes)
        first, last_site = self.boundary[i], self.boundary[j]
        # Site i is in the folded slice when the slice was widened back past it; else its value
        # entered as the slice's input and the cut starts after the placeholders.
        start = next((p for p, n in enumerate(nodes) if first.op == "call_module"
                      and n.op == "call_module" and n.target == first.target),
                     max(p for p, n in enumerate(nodes) if n.op == "placeholder"))
        if last_site.op == "output":
            end = next(p for p, n in enumerate(nodes) if n.op == "output")
            return _cut(folded, nodes[start + 1:end + 1], set(), None)
        # Everything after site i belongs to the segment, also a value the slice keeps alive
        # for later nodes that folding placed after site j.
        last = next(n for n in nodes if n.op == "call_module" and n.target == last_site.target)
        region = [n for n in nodes[start + 1:]
                  if n.op != "output" and not (n.op == "call_module" and n.target == KEEP_ALIVE)]
        return _cut(folded, region, set(), last)


def segments_within(n: int, span: int, allowed: Sequence[bool] | None = None
                    ) -> list[Segment]:
    """Every segment (i, j) over n sites with at most `span` sites inside, none of them
    one that must stay (`allowed[k]` False for site k+1: an unreached site)."""
    segments = []
    for i in range(n + 1):
        for j in range(i + 1, min(n + 1, i + span + 1) + 1):
            inside = range(i, j - 1)  # list indices of the sites strictly between
            if allowed is None or all(allowed[k] for k in inside):
                segments.append((i, j))
    return segments


@dataclass
class SegmentTable:
    """The latencies one plan reads: seconds per segment (overhead removed), the overhead,
    and what building it cost."""

    seconds: dict[Segment, float]
    overhead: float
    forms: dict[Segment, str] = field(default_factory=dict)  # a MERGE_FORMS name or "unfolded"
    modules: dict[Segment, list[str]] = field(default_factory=dict)  # SegmentTimer.modules
    hits: int = 0
    misses: int = 0
    build_seconds: float = 0.0

    def plan_seconds(self, kept: Sequence[int]) -> float:
        """The estimate for a plan keeping boundaries `kept` (0 and n+1 included)."""
        pairs = zip(kept, kept[1:], strict=False)
        return self.overhead + sum(self.seconds[pair] for pair in pairs)

    def to_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "overhead_s": self.overhead,
                "build_seconds": self.build_seconds}


SAVE_EVERY_SECONDS = 30.0  # how often a table being built is written out


SIDE_BY_SIDE_ROUNDS = 3  # rounds a segment's forms are timed round-robin in


def build_segment_table(model: nn.Module, sample: Tensor, context: TableContext,
                        table: LatencyTable, sites: Sequence[str] | None = None,
                        span: int = DEFAULT_SPAN, allowed: Sequence[bool] | None = None,
                        segments: Iterable[Segment] | None = None,
                        progress: bool = True, repeats: int = 15,
                        warmup: int = 3) -> SegmentTable:
    """Seconds of every segment of `model` (its `sites`, default all found) that a plan may use:
    from the table, timing the misses (a tqdm bar while it does), saved as it grows."""
    return build_form_tables(model, sample, context, table, sites, span, allowed, segments,
                             progress, repeats, warmup)[context.form]


def build_form_tables(model: nn.Module, sample: Tensor, context: TableContext,
                      table: LatencyTable, sites: Sequence[str] | None = None,
                      span: int = DEFAULT_SPAN, allowed: Sequence[bool] | None = None,
                      segments: Iterable[Segment] | None = None, progress: bool = True,
                      repeats: int = 15, warmup: int = 3, forms: Sequence[str] = ()
                      ) -> dict[str, SegmentTable]:
    """`build_segment_table` in each merge form of `forms` (default: the context's), one table
    per form. Forms are compared segment by segment, so a segment's forms are timed side by
    side (round-robin, `SIDE_BY_SIDE_ROUNDS`) unless the table holds them timed so together
    (`timed_with`): a form timed on another day against one timed now would compare the day,
    not the form."""
    from depthcut.sites import find_sites  # noqa: PLC0415 - only here

    sites = list(find_sites(model) if sites is None else sites)
    start = time.perf_counter()
    forms = tuple(forms) or (context.form,)
    timers = {form: SegmentTimer(model, sample, dataclasses.replace(context, form=form), table,
                                 sites, repeats, warmup) for form in forms}
    wanted = list(segments if segments is not None else
                  segments_within(len(sites), span, allowed))
    first = timers[forms[0]]
    timed = int(f"{first.context.key()}|overhead" not in table.entries)  # the call overhead
    overhead = first.overhead()
    seconds: dict[str, dict[Segment, float]] = {form: {} for form in forms}
    # With progress, a bar where stderr is a terminal (tqdm's None), so logs stay clean.
    bar = tqdm(wanted, desc=f"latency table ({context.backend}, batch {context.batch})",
               disable=None if progress else True, leave=False)
    saved = time.perf_counter()
    try:
        for segment in bar:
            if len(forms) > 1 and any(table.entries.get(t.key(*segment), {}).get("timed_with")
                                      != sorted(forms) for t in timers.values()):
                _time_side_by_side(timers, segment)
                timed += 1
            elif len(forms) == 1 and first.key(*segment) not in table.entries:
                timed += 1
            for form, timer in timers.items():
                seconds[form][segment] = max(timer.seconds(*segment) - overhead, 0.0)
            if time.perf_counter() - saved > SAVE_EVERY_SECONDS:  # a killed build keeps most
                table.save()
                saved = time.perf_counter()
    finally:
        table.save()
    modules = {segment: first.modules(*segment) for segment in wanted}
    elapsed = time.perf_counter() - start
    read = len(wanted) + 1 - timed  # lookups answered by the table (the overhead's too)
    return {form: SegmentTable(seconds[form], overhead, timers[form].forms, modules, read,
                               timed, elapsed) for form in forms}


def _time_side_by_side(timers: Mapping[str, SegmentTimer], segment: Segment) -> None:
    """Segment `segment` prepared in every form, timed round-robin, recorded in the table with
    the forms it was timed beside (`timed_with`: an entry timed alone is timed again)."""
    prepared = {form: timer.prepare(*segment) for form, timer in timers.items()}
    repeats = max(1, next(iter(timers.values())).repeats // SIDE_BY_SIDE_ROUNDS)
    calls = {form: timed._replace(repeats=repeats) for form, (timed, _) in prepared.items()}
    for form, seconds in medians(round_robin(calls, SIDE_BY_SIDE_ROUNDS)).items():
        timers[form].record(*segment, seconds, prepared[form][1], timed_with=sorted(timers))


FORM_MARGIN = 0.03  # another form replaces the first only when this much faster


def fastest_forms(tables: Sequence[SegmentTable], margin: float = FORM_MARGIN
                  ) -> SegmentTable:
    """One table from the same segments timed in several merge forms: each segment in its
    fastest form (LayerMerge's choice of how to merge each segment). The first table's form
    (the default, "macs") stays unless another is faster by more than `margin`: where both
    fold alike (no chain to merge differently) their times differ by noise alone. The overhead
    is the first table's (an empty call: the same in every form)."""
    first = tables[0]
    seconds, forms = {}, {}
    for segment in first.seconds:
        fastest = min(tables, key=lambda table: table.seconds[segment]
                      * (1.0 if table is first else 1.0 + margin))
        seconds[segment] = fastest.seconds[segment]
        forms[segment] = fastest.forms.get(segment, "macs")
    return SegmentTable(seconds, first.overhead, forms, first.modules, first.hits,
                        first.misses, max(t.build_seconds for t in tables))


def measured_ratio(model: nn.Module, reference: nn.Module, sample: Tensor,
                   context: TableContext, rounds: int = 5, repeats: int = 5,
                   policy: str | FoldPolicy | None = None) -> tuple[float, float, float]:
    """`model` against `reference`, each folded whole (`model` under `policy`, default the
    context's form; `reference` in the context's form) and timed on the
    backend at its batch, round-robin: `rounds` times each in turn, `repeats` calls each, the
    medians. Timed side by side so that a machine's drift falls on both. Returns (ratio,
    model seconds, reference seconds): what a plan's estimate is checked against."""
    timer = get_timer(context.backend)
    with torch.random.fork_rng(devices=[]):
        example = sample[:1].detach().cpu()
        small = example.expand(FOLD_BATCH, *example.shape[1:]).contiguous()
        big = example.expand(context.batch, *example.shape[1:]).contiguous().to(context.device)
        folded = {"planned": fold(model, small, policy or context.form),
                  "dense": fold(reference, small, context.form)}
        calls = {name: Timed(timer, timer.prepare(m.to(context.device), big), big.device,
                             repeats) for name, m in folded.items()}
        times = medians(round_robin(calls, rounds))
    return times["planned"] / times["dense"], times["planned"], times["dense"]
