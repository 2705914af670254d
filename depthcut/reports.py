"""Every table, plot and summary, built from run records only: a run's stage table and
summary, and the side-by-side comparison of finished runs (EASIER Table 1, Fig. 3, Table 3), so
`depthcut report RUN_DIR...` needs no training.

The one measurement a report may add is the cost of each stage folded (MACs and latency
on the current device, at the run's input shape), cached in the run directory as
`stage_costs.json`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from depthcut.cost import DEFAULT_TIMER, Timed, get_timer, medians, round_robin
from depthcut.data import display_name
from depthcut.entropy import SiteCounts
from depthcut.errors import ConfigError
from depthcut.measure import measure_stage
from depthcut.methods import MethodSpec, get_method
from depthcut.models import default_activation, match_family, takes_width
from depthcut.run import atomic_write_text, load_checkpoint, read_records, write_json
from depthcut.stages import answer_stage


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


STAGE_HEADERS = (
    "stage",
    "sites removed",
    "chosen (entropy, bits)",
    "val top-1",
    "test top-1",
    "val drop",
    "epochs",
    "time (s)",
)


def _chosen(record: Mapping) -> str:
    """EASIER: each chosen site with its entropy; pruning: each removed site and what it became
    (always ON: identity; always OFF: zero; constant per neuron: a per-channel scale)."""
    kinds = record.get("zero_entropy")
    if kinds is not None:
        labels = {"on": "always ON", "off": "always OFF", "mixed": "constant per neuron, scaled"}
        removed = [f"{name} ({labels.get(kinds[name], kinds[name])})"
                   for name in record.get("chosen", [])]
        removed += [f"{name} (always OFF, kept: layer collapse)"
                    for name in record.get("layer_collapse", [])]
        return ", ".join(removed) or "-"
    if "alphas" in record:
        return ", ".join(f"{name} (alpha {_fmt(record['alphas'].get(name), 3)})"
                         for name in record["chosen"])
    entropy = record.get("entropy") or {}
    return ", ".join(f"{name} ({_fmt(entropy.get(name), 3)})" for name in record["chosen"])


def stage_row(record: Mapping, with_sparsity: bool = False, with_balanced: bool = False
              ) -> list[str]:
    row = [
        str(record["stage"]),
        f"{record['sites_linearized']}/{record['sites_total']}",
        (_chosen(record) if record.get("chosen") is not None and record["stage"] > 0
         else "(dense)"),
        _fmt(record.get("val_top1")),
        _fmt(record.get("test_top1")),
        _fmt(record.get("drop")),
        str(record.get("epochs", "")),
        _fmt(record.get("seconds"), 0),
    ]
    if with_balanced:
        row[5:5] = [_fmt(record.get("val_balanced")), _fmt(record.get("test_balanced"))]
    if with_sparsity:
        sparsity = record.get("sparsity")
        row.insert(1, "0.0%" if sparsity is None else f"{100 * sparsity:.1f}%")
    return row


def stage_table(records: Sequence[Mapping], *, header: bool = True) -> str:
    """One Markdown row per stage; without header, only the rows (for printing as stages end).

    Pruning records (which carry "sparsity") get a sparsity column; records with balanced
    accuracy (mean per-class recall; every record since it was added) get val and test
    balanced columns.
    """
    with_sparsity = any("sparsity" in r for r in records)
    with_balanced = any("test_balanced" in r for r in records)
    headers = list(STAGE_HEADERS)
    if with_balanced:
        headers[5:5] = ["val balanced", "test balanced"]
    if with_sparsity:
        headers.insert(1, "sparsity")
        headers[3] = "removed (always ON/OFF, or scaled)"
    rows = [stage_row(r, with_sparsity, with_balanced) for r in records]
    table = markdown_table(headers, rows)
    return table if header else "\n".join(table.splitlines()[2:])


def summary_markdown(
    records: Sequence[Mapping],
    *,
    dataset: str,
    settings: Mapping,
    answer: Mapping,
    stop_reason: str,
    wall_seconds: float,
    rule: str,
    folded: Mapping | None = None,
) -> str:
    """The run's summary: which stage is the answer under the method's stop rule, the stage
    table, the folded answer and the settings."""
    dense = records[0]
    method = settings.get("method", "?")
    experiment = settings.get("experiment", {})
    removed = answer["linearized"] + answer.get("silenced", []) + answer.get("scaled", [])
    lines = [
        f"# {method.upper()} on {dataset}",
        "",
        f"Model: {_model_text(experiment)}, dataset: {dataset}, stop rule: {rule}.",
        "",
        f"**Answer: stage {answer['stage']}**, {answer['sites_linearized']} of "
        f"{answer['sites_total']} sites removed "
        f"({', '.join(removed) or 'none'})"
        f"{_sparsity(answer)}: val top-1 {_fmt(answer['val_top1'])}, "
        f"test top-1 {_fmt(answer['test_top1'])} (dense: val {_fmt(dense['val_top1'])}, "
        f"test {_fmt(dense['test_top1'])}){_balanced(answer, dense)}. "
        f"Checkpoint: `{answer.get('checkpoint', '-')}`.",
        "",
        f"Stopped because: {stop_reason}. Wall time: {wall_seconds / 60:.1f} min.",
        "",
        stage_table(records),
        "",
        *(folded_section(folded) if folded else []),
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def _model_text(experiment: Mapping) -> str:
    """"resnet18 (width x0.25, relu)": the width only where it scales the model, the
    activation the model really has (its own default when none was asked for)."""
    model = str(experiment.get("model"))
    activation = experiment.get("activation") or default_activation(model)
    scaled = match_family(model) is not None and takes_width(model)  # not a user's nn.Module
    details = [f"width x{experiment.get('width')}"] if scaled else []
    details.append(activation or "its own activations")
    return f"{model} ({', '.join(details)})"


def _balanced(answer: Mapping, dense: Mapping) -> str:
    if "test_balanced" not in answer:
        return ""
    return (f"; balanced accuracy: val {_fmt(answer.get('val_balanced'))}, test "
            f"{_fmt(answer.get('test_balanced'))} (dense: val {_fmt(dense.get('val_balanced'))}, "
            f"test {_fmt(dense.get('test_balanced'))})")


def _sparsity(record: Mapping) -> str:
    return f", sparsity {100 * record['sparsity']:.1f}%" if "sparsity" in record else ""


def folded_section(folded: Mapping) -> list[str]:
    """The answer stage folded (`depthcut.fold`): accuracy, cost and latency beside unfolded."""
    rows = [
        ["test top-1", _fmt(folded["top1_unfolded"]), _fmt(folded["top1_folded"])],
        ["multiply-adds per image", f"{folded['macs_unfolded']:,}", f"{folded['macs_folded']:,}"],
        ["parameters", f"{folded['params_unfolded']:,}", f"{folded['params_folded']:,}"],
        ["operators", folded["ops_unfolded"], folded["ops_folded"]],
        ["conv/linear ops on the longest path", folded["depth_unfolded"],
         folded["depth_folded"]],
        ["latency, batch 1 (ms, median)", _fmt(folded["latency_ms_batch1_unfolded"], 3),
         _fmt(folded["latency_ms_batch1_folded"], 3)],
    ]
    exact = "all merges exact" if folded["exact"] else "border-approximate merges present"
    return [
        f"## Answer stage folded (policy {folded['policy']})",
        "",
        markdown_table(["", "unfolded", "folded"], rows),
        "",
        f"Top-1 agreement {_fmt(folded['agreement'])}%, max |folded - unfolded| "
        f"{folded['max_abs_diff']:.3g} (relative {folded['relative_error']:.3g}; {exact}). "
        f"Folded model: `{folded.get('checkpoint', '-')}`.",
        "",
        *_against_dense(folded),
    ]


def _against_dense(folded: Mapping) -> list[str]:
    """Where the latency was measured, and the folded answer against the BN-folded dense model
    on the same backend (answers written before these were kept: nothing)."""
    if "latency_backend" not in folded:
        return []
    lines = f"Latency backend: {folded.get('latency_timer', folded['latency_backend'])}"
    dense_ms = folded.get("latency_ms_batch1_dense_folded")
    if dense_ms:
        lines += (f"; the BN-folded dense model takes {dense_ms:.3f} ms at batch 1 there: the "
                  f"folded answer is {folded['latency_ms_batch1_folded'] / dense_ms:.3f}x its "
                  f"latency and {folded['macs_folded'] / folded['macs_dense_folded']:.3f}x its "
                  "MACs")
    return [lines + ".", ""]


def entropy_table(counts: Mapping[str, SiteCounts | None]) -> str:
    """Per-site entropy with the share of always-ON and always-OFF neurons."""
    rows = []
    for index, (name, c) in enumerate(counts.items()):
        if c is None or c.neurons == 0:
            rows.append([index, name, "-", "never reached", "-", "-"])
            continue
        rows.append(
            [
                index,
                name,
                c.neurons,
                f"{c.layer_entropy():.4f}",
                f"{100 * float(c.always_on().float().mean()):.1f}",
                f"{100 * float(c.always_off().float().mean()):.1f}",
            ]
        )
    headers = ("#", "site", "neurons", "entropy (bits)", "always ON %", "always OFF %")
    return markdown_table(headers, rows)


# ---------------------------------------------------------------------------------------------
# Comparing runs

STAGE_COSTS = "stage_costs.json"


@dataclass
class Run:
    path: Path
    method: str
    config: dict
    records: list[dict]
    folded: dict | None = None
    stage_costs: dict = field(default_factory=dict)

    @property
    def spec(self) -> MethodSpec | None:
        """The registered method that wrote the run (None: a method unknown here)."""
        try:
            return get_method(self.method)
        except ConfigError:
            return None

    @property
    def label(self) -> str:
        spec = self.spec
        return spec.run_label(self.config.get(self.method, {})) if spec else self.method

    @property
    def is_reference(self) -> bool:
        """The fair-compute reference (dense trained longer), not a method."""
        return self.spec is not None and self.spec.reference

    @property
    def has_cost_table(self) -> bool:
        return self.spec is not None and self.spec.cost_table

    @property
    def answer(self) -> dict:
        return answer_stage(self.records)

    def experiment(self, key: str):
        value = self.config.get("experiment", {}).get(key)
        if key == "activation" and value is None:  # None: the architecture's own default
            value = default_activation(self.experiment("model"))
        return value


def load_run(path: str | Path) -> Run:
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{path} is not a depthcut run directory (no config.json)")
    config = json.loads(config_path.read_text())
    records = read_records(path)
    if not records:
        raise ConfigError(f"{path} holds no records yet: the run has not finished a stage")
    folded = path / "folded_answer.json"
    costs = path / STAGE_COSTS
    return Run(
        path=path,
        method=config.get("method", records[-1].get("method", "?")),
        config=config,
        records=records,
        folded=json.loads(folded.read_text()) if folded.is_file() else None,
        stage_costs=json.loads(costs.read_text()) if costs.is_file() else {},
    )


def check_compatible(runs: Sequence[Run]) -> None:
    """Refuse to put runs with different data or models in one table: the dataset (its key and,
    for an image folder, its true name), the input shape, the model, width and activation."""
    readers = {key: (lambda run, key=key: run.experiment(key))
               for key in ("dataset", "model", "width", "activation")}
    readers["dataset name"] = _dataset_name
    readers["input shape"] = lambda run: "x".join(map(str, run.config.get("input_shape", [])))
    for key, read in readers.items():
        values = {str(read(run)) for run in runs} - {""}  # "": a run too old to record it
        if len(values) > 1:
            detail = ", ".join(f"{run.path}: {read(run)}" for run in runs)
            raise ConfigError(
                f"cannot compare runs with different {key} ({detail}); a comparison needs the "
                "same dataset, input shape, model, width and activation in every run. Report "
                "each group of runs on its own."
            )


def measure_stage_costs(run: Run, progress: bool = True, rounds: int = 7,
                        timer: str = DEFAULT_TIMER) -> dict:
    """Fold every stage checkpoint of a run and time it, unfolded and folded, at batch 1 and
    128 on random inputs at the run's input shape, on `timer` (a `depthcut.cost` timer's name);
    cached in the run, with the backend and thread count it was timed on.

    The timing is round-robin: each of `rounds` rounds times every stage's two models once
    (batch 1: the median of 5 calls; batch 128: one call), and a stage's figure is the median
    over rounds, so a burst of load from another process spreads over all stages instead of
    landing on one. A cache missing any stage (or written before depth and exactness were
    kept, or on another backend or thread count) is measured again as a whole."""
    stages = [r for r in run.records if r.get("checkpoint")]
    timing, threads = get_timer(timer), torch.get_num_threads()

    def cached(cost: dict) -> bool:  # caches older than the backend were timed in eager
        return ("depth_folded" in cost and cost.get("latency_backend", "eager") == timing.name
                and cost.get("latency_threads", threads) == threads)

    if all(cached(run.stage_costs.get(str(r["stage"]), {})) for r in stages):
        return run.stage_costs
    costs: dict[str, dict] = {}
    models: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}
    inputs = None
    for record in stages:
        key = str(record["stage"])
        model, info = load_checkpoint(run.path / record["checkpoint"])
        # Runs written before config.json kept the input shape were timed at 32x32.
        shape = run.config.get("input_shape") or (info["spec"].in_channels, 32, 32)
        inputs = random_inputs(info["spec"], 128, shape)
        folded, measured = measure_stage(model, inputs, latency={})
        costs[key] = {name: measured[name] for name in (
            "macs_unfolded", "macs_folded", "depth_unfolded", "depth_folded", "exact",
            "relative_error", "bias_maps")}
        models[key] = (model.eval(), folded)
        if progress:
            print(f"{run.path}: stage {key} folded", flush=True)
    repeats = {1: 5, 128: 1}  # batch size -> calls per round
    calls = {(key, batch, form): Timed(timing, timing.prepare(module, inputs[:batch]),
                                       inputs.device, repeats[batch])
             for key, pair in models.items() for batch in repeats
             for form, module in zip(("unfolded", "folded"), pair, strict=True)}
    for (key, batch, form), seconds in medians(round_robin(calls, rounds)).items():
        costs[key][f"ms_batch{batch}_{form}"] = 1e3 * seconds
    for key in models:
        costs[key].update(latency_backend=timing.name, latency_threads=threads,
                          latency_timer=timing.describe())
    if progress:
        print(f"{run.path}: {len(models)} stages timed on {timing.describe()}, {rounds} rounds",
              flush=True)
    write_json(run.path / STAGE_COSTS, costs)
    run.stage_costs = costs
    return costs


def random_inputs(spec, batch: int, shape: Sequence[int]) -> torch.Tensor:
    """A batch to fold and time a model on: random images, or for a sequence model (its spec
    has a vocabulary) random non-padding token ids, every text at full length."""
    vocab = getattr(spec, "vocab_size", None)
    if vocab is not None:
        low = 0 if spec.pad_id is None else spec.pad_id + 1
        return torch.randint(low, vocab, (batch, *shape))
    return torch.randn(batch, *shape)


def _fair_reference(runs: Sequence[Run], total_epochs: int) -> float | None:
    """Test top-1 of the dense model trained for the same total epochs: the first stage of the
    dense-trained-longer run that has trained at least as long (its chunks are the finetune's
    length, so a method whose epochs fall between two chunks meets the longer-trained one);
    None when that run stopped short of it."""
    for run in runs:
        if not run.is_reference:
            continue
        fitting = [r for r in run.records if r.get("total_epochs", 0) >= total_epochs]
        if fitting:
            return fitting[0]["test_top1"]
    return None


def table1(runs: Sequence[Run]) -> tuple[list[str], list[list[str]], int | None]:
    """Per method: the answer stage, and top-1 at equal sites removed (the answer count of the
    depth reference, EASIER)."""
    methods = [run for run in runs if not run.is_reference]
    depth = [run for run in methods if run.spec is not None and run.spec.depth_reference]
    equal = depth[0].answer["sites_linearized"] if depth else None
    headers = ["method", "answer stage", "sites removed", "test top-1", "val top-1",
               "test balanced", "val balanced",
               "sparsity", "total epochs", "dense trained as long: test top-1",
               f"test top-1 at {equal} sites removed" if equal is not None else "-",
               "folded MMACs/image", "folded params", "folded latency b1 (ms)"]
    dense = methods[0].records[0] if methods else None
    rows = []
    if dense is not None:
        rows.append(["dense", "0", f"0/{dense['sites_total']}", _fmt(dense["test_top1"]),
                     _fmt(dense.get("val_top1")), _fmt(dense.get("test_balanced")),
                     _fmt(dense.get("val_balanced")), "-", str(dense.get("total_epochs", "-")),
                     "-", "-", "-", "-", "-"])
    for run in methods:
        answer = run.answer
        at_equal = [r for r in run.records if r["sites_linearized"] == equal]
        folded = run.folded or {}
        rows.append([
            run.label,
            str(answer["stage"]),
            f"{answer['sites_linearized']}/{answer['sites_total']}",
            _fmt(answer["test_top1"]),
            _fmt(answer.get("val_top1")),
            _fmt(answer.get("test_balanced")),
            _fmt(answer.get("val_balanced")),
            f"{100 * answer['sparsity']:.1f}%" if "sparsity" in answer else "-",
            str(answer.get("total_epochs", "-")),
            _fmt(_fair_reference(runs, answer.get("total_epochs", 0))),
            _fmt(at_equal[-1]["test_top1"]) if at_equal else "-",
            _fmt(folded["macs_folded"] / 1e6, 1) if "macs_folded" in folded else "-",
            f"{folded['params_folded']:,}" if "params_folded" in folded else "-",
            _fmt(folded.get("latency_ms_batch1_folded"), 3),
        ])
    return headers, rows, equal


def table3(run: Run) -> tuple[list[str], list[list[str]]]:
    """Per stage: MACs, conv/linear depth, exactness and latency (batch 1 and 128) unfolded and
    folded, and the folded figures as a ratio of stage 0 folded (the BN-folded dense model)."""
    headers = ["stage", "sites removed", "test top-1", "MMACs unfolded", "MMACs folded",
               "MACs vs dense", "depth unfolded", "depth folded", "fold exact (rel. error)",
               "ms b1 unfolded", "ms b1 folded", "b1 vs dense", "ms b128 unfolded",
               "ms b128 folded", "b128 vs dense", "latency backend"]
    dense = run.stage_costs.get(str(run.records[0]["stage"]), {}) if run.records else {}

    def ratio(cost: dict, key: str) -> str:
        if not dense.get(key) or cost.get(key) is None:
            return "-"
        return f"{cost[key] / dense[key]:.3f}x"

    rows = []
    for record in run.records:
        cost = run.stage_costs.get(str(record["stage"]), {})
        exact = "-"
        if "exact" in cost:
            exact = (f"{'yes' if cost['exact'] else 'border-approx.'} "
                     f"({cost['relative_error']:.1e})")
        rows.append([
            str(record["stage"]), f"{record['sites_linearized']}/{record['sites_total']}",
            _fmt(record["test_top1"]),
            _fmt(cost["macs_unfolded"] / 1e6, 1) if cost else "-",
            _fmt(cost["macs_folded"] / 1e6, 1) if cost else "-",
            ratio(cost, "macs_folded"),
            str(cost.get("depth_unfolded", "-")), str(cost.get("depth_folded", "-")), exact,
            _fmt(cost.get("ms_batch1_unfolded"), 3), _fmt(cost.get("ms_batch1_folded"), 3),
            ratio(cost, "ms_batch1_folded"),
            _fmt(cost.get("ms_batch128_unfolded"), 1), _fmt(cost.get("ms_batch128_folded"), 1),
            ratio(cost, "ms_batch128_folded"),
            _backend(cost),
        ])
    return headers, rows


def _backend(cost: Mapping) -> str:
    """The backend a stage was timed on and its threads (costs older than the backend were
    timed in eager, their thread count not kept); - where it was not timed."""
    if "ms_batch1_folded" not in cost:
        return "-"
    threads = cost.get("latency_threads")
    return cost.get("latency_backend", "eager") + (f", {threads} threads" if threads else "")


def latency_caption(run: Run) -> str:
    """Where a run's Table 3 latencies were measured, as its caption names it."""
    timed = [cost for cost in run.stage_costs.values() if "ms_batch1_folded" in cost]
    if not timed:
        return "not timed"
    return timed[0].get("latency_timer") or f"{_backend(timed[0])} (PyTorch)"


def _csv(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(headers)
    writer.writerows(rows)
    return buffer.getvalue()


def plot_accuracy_vs_sites(runs: Sequence[Run], path: Path) -> bool:
    """Fig. 3a: test top-1 against sites removed, one line per method, dense as a reference."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = [run for run in runs if not run.is_reference]
    for run in methods:
        xs = [r["sites_linearized"] for r in run.records]
        ys = [r["test_top1"] for r in run.records]
        ax.plot(xs, ys, marker="o", label=run.label)
    if methods:
        ax.axhline(methods[0].records[0]["test_top1"], color="gray", linestyle="--",
                   label="dense")
    ax.set_xlabel("sites removed")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{methods[0].experiment('model')} x{methods[0].experiment('width')} on "
                 f"{_dataset_name(methods[0])}" if methods else "")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_accuracy_vs_epochs(runs: Sequence[Run], path: Path) -> bool:
    """Test top-1 against total training epochs (dense training included), one line per method
    and the dense model trained on: the cost axis the papers leave out. Each method's answer is
    a star labelled with the sites it removed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in runs:
        xs = [r.get("total_epochs", 0) for r in run.records]
        ys = [r["test_top1"] for r in run.records]
        style = {"color": "gray", "linestyle": "--"} if run.is_reference else {}
        (line,) = ax.plot(xs, ys, marker=".", label=run.label, **style)
        if not run.is_reference:
            answer = run.answer
            ax.plot([answer.get("total_epochs", 0)], [answer["test_top1"]], marker="*",
                    markersize=13, color=line.get_color())
            ax.annotate(f"{answer['sites_linearized']}/{answer['sites_total']}",
                        (answer.get("total_epochs", 0), answer["test_top1"]),
                        textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel("total training epochs (dense training included)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{runs[0].experiment('model')} x{runs[0].experiment('width')} on "
                 f"{_dataset_name(runs[0])}; star: answer (sites removed)" if runs else "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_entropy_heatmap(run: Run, path: Path) -> bool:
    """Entropy of every site (rows) at every stage (columns), the chosen site marked."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stages = [r for r in run.records if r.get("entropy")]
    if not stages:
        return False
    sites: list[str] = []
    for record in stages:
        sites += [s for s in record["entropy"] if s not in sites]
    grid = np.full((len(sites), len(stages)), np.nan)
    for column, record in enumerate(stages):
        for row, site in enumerate(sites):
            value = record["entropy"].get(site)
            grid[row, column] = np.nan if value is None else value
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(stages), 1.2 + 0.3 * len(sites)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    for column, record in enumerate(stages):
        for site in record.get("chosen", []):
            if site in sites:
                ax.scatter(column, sites.index(site), marker="x", color="red", s=60)
    ax.set_xticks(range(len(stages)), [str(r["stage"]) for r in stages])
    ax.set_yticks(range(len(sites)), sites, fontsize=7)
    ax.set_xlabel("stage (x: site chosen)")
    ax.set_title(f"{run.label}: layer entropy (bits)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _dataset_name(run: Run) -> str:
    """The dataset's true name: recorded by the run (an image folder's folder name), else the
    registry's name for its key (runs written before the name was recorded)."""
    return run.config.get("dataset_name") or display_name(run.experiment("dataset"))


def build_report(run_dirs: Sequence[str | Path], out: str | Path, *, measure: bool = True,
                 progress: bool = True, latency_backend: str = DEFAULT_TIMER) -> Path:
    """Write the comparison of `run_dirs` into `out`: Markdown and CSV tables, PNG plots and
    `report.md`. With `measure`, the stages of every method that removes sites are folded and
    timed once on `latency_backend` (cached; timed again on another backend or thread count)."""
    start = time.perf_counter()
    runs = [load_run(path) for path in run_dirs]
    check_compatible(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    headers, rows, equal = table1(runs)
    atomic_write_text(out / "table1.md", markdown_table(headers, rows) + "\n")
    atomic_write_text(out / "table1.csv", _csv(headers, rows))
    costed = [run for run in runs if run.has_cost_table]
    lines = [f"# Comparison on {_dataset_name(runs[0])}", "",
             f"Model: {runs[0].experiment('model')} (width x{runs[0].experiment('width')}, "
             f"{runs[0].experiment('activation')}); runs: "
             + ", ".join(f"`{run.path}` ({run.label})" for run in runs) + ".", "",
             "## Methods at their answer stage (Table 1 style)", "",
             markdown_table(headers, rows), ""]
    if equal is not None:
        depth = next(run.label for run in runs if run.spec and run.spec.depth_reference)
        lines += [f"'At {equal} sites removed' is each method's stage with as many sites removed "
                  f"as {depth}'s answer (- where a method never had exactly that many).", ""]
    if any(run.is_reference for run in runs):
        lines += ["'Dense trained as long' is the dense model trained further (plain "
                  "finetunes, no site removed, no distillation) for at least as many total "
                  "epochs as that method's answer consumed (the first of its chunks that "
                  "reaches them), so gains from extra training are not credited to depth "
                  "reduction.", ""]
    for number, run in enumerate(costed):
        if measure:
            measure_stage_costs(run, progress=progress, timer=latency_backend)
        headers3, rows3 = table3(run)
        name = "table3" if number == 0 else f"table3_{run.path.name}"
        atomic_write_text(out / f"{name}.md", markdown_table(headers3, rows3) + "\n")
        atomic_write_text(out / f"{name}.csv", _csv(headers3, rows3))
        lines += [f"## {run.label}: cost per stage, folded (Table 3 style)", "",
                  "Each stage checkpoint folded with policy `macs`; depth = conv/linear ops on "
                  "the longest path; 'vs dense' = folded figure / stage 0 folded (the "
                  "BN-folded dense model, on the same backend); latency is the median on "
                  f"{latency_caption(run)}, batch 1 and 128, timed round-robin over the stages "
                  "in one run.", "",
                  markdown_table(headers3, rows3), ""]
    if plot_accuracy_vs_sites(runs, out / "accuracy_vs_sites.png"):
        lines += ["![test top-1 against sites removed](accuracy_vs_sites.png)", ""]
    if plot_accuracy_vs_epochs(runs, out / "accuracy_vs_epochs.png"):
        lines += ["![test top-1 against total training epochs](accuracy_vs_epochs.png)", ""]
    if costed and plot_entropy_heatmap(costed[0], out / "entropy_heatmap.png"):
        lines += ["![entropy per site and stage](entropy_heatmap.png)", ""]
    for run in runs:
        wall = run.records[-1].get("elapsed_s")
        settings = json.dumps(run.config.get(run.method, {}), sort_keys=True)
        lines.append(f"- {run.label}: {len(run.records) - 1} stage(s)"
                     + (f", {wall / 60:.1f} min" if wall else "") + f"; settings {settings}")
    lines += ["", f"Report built in {time.perf_counter() - start:.0f} s."]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"
