"""Human-readable tables and summaries, built from run records only."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from depthcut.entropy import SiteCounts


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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
    """EASIER: each chosen site with its entropy; pruning: each removed site, ON or OFF."""
    kinds = record.get("zero_entropy")
    if kinds is not None:
        removed = [f"{name} ({'always ' + kinds[name].upper()})"
                   for name in record.get("chosen", [])]
        removed += [f"{name} (always OFF, kept: layer collapse)"
                    for name in record.get("layer_collapse", [])]
        return ", ".join(removed) or "-"
    if "alphas" in record:
        return ", ".join(f"{name} (alpha {_fmt(record['alphas'].get(name), 3)})"
                         for name in record["chosen"])
    entropy = record.get("entropy") or {}
    return ", ".join(f"{name} ({_fmt(entropy.get(name), 3)})" for name in record["chosen"])


def stage_row(record: Mapping, with_sparsity: bool = False) -> list[str]:
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
    if with_sparsity:
        sparsity = record.get("sparsity")
        row.insert(1, "0.0%" if sparsity is None else f"{100 * sparsity:.1f}%")
    return row


def stage_table(records: Sequence[Mapping], *, header: bool = True) -> str:
    """One Markdown row per stage; without header, only the rows (for printing as stages end).

    Pruning records (which carry "sparsity") get a sparsity column.
    """
    with_sparsity = any("sparsity" in r for r in records)
    headers = list(STAGE_HEADERS)
    if with_sparsity:
        headers.insert(1, "sparsity")
        headers[3] = "removed (always ON/OFF)"
    table = markdown_table(headers, [stage_row(r, with_sparsity) for r in records])
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
    lines = [
        f"# {method.upper()} on {dataset}",
        "",
        f"Model: {experiment.get('model')} (width x{experiment.get('width')}, "
        f"{experiment.get('activation')}), dataset: {dataset}, stop rule: {rule}.",
        "",
        f"**Answer: stage {answer['stage']}**, {answer['sites_linearized']} of "
        f"{answer['sites_total']} sites removed "
        f"({', '.join(answer['linearized'] + answer.get('silenced', [])) or 'none'})"
        f"{_sparsity(answer)}: val top-1 {_fmt(answer['val_top1'])}, "
        f"test top-1 {_fmt(answer['test_top1'])} (dense: val {_fmt(dense['val_top1'])}, "
        f"test {_fmt(dense['test_top1'])}). Checkpoint: `{answer.get('checkpoint', '-')}`.",
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
        f"Top-1 agreement {folded['agreement']:.2f}%, max |folded - unfolded| "
        f"{folded['max_abs_diff']:.3g} (relative {folded['relative_error']:.3g}; {exact}). "
        f"Folded model: `{folded.get('checkpoint', '-')}`.",
        "",
    ]


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
