"""What a fold reports (`FoldReport`: costs before and after, deviation, every merge considered)
and `compare_outputs`, the top-1 comparison of the folded model with the unfolded one."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from depthcut.errors import ConfigError
from depthcut.fold.policy import Merge

# A folded float32 model whose largest deviation from the float64 truth, relative to the
# output's largest value, is below this (or a few times the unfolded float32 model's own) is
# within float32 rounding; a float64 fold must come within FLOAT64_TOLERANCE.
FLOAT32_TOLERANCE = 1e-4
FLOAT64_TOLERANCE = 1e-9


@dataclass
class FoldReport:
    """The record of one fold: operators, multiply-adds, parameters and depth before and after,
    how far the folded model's output is from the unfolded one's, and every merge considered."""

    policy: str
    ops_before: int
    ops_after: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    depth_before: int
    depth_after: int
    max_abs_diff: float
    relative_error: float
    merges: list[Merge] = field(default_factory=list)
    removed_branches: list[str] = field(default_factory=list)
    agreement: float | None = None
    top1_unfolded: float | None = None
    top1_folded: float | None = None
    # The per-sample input shape the model was folded at, e.g. [3, 32, 32]; the ops holding a
    # bias map (`layers.BiasMapConv2d`) hold it for this size only and refuse any other.
    input_size: list[int] | None = None
    bias_maps: list[str] = field(default_factory=list)
    # Against a float64 evaluation of the unfolded model (relative to its largest output): the
    # folded model's error and the unfolded float32 model's own (its float32 rounding). In a
    # badly conditioned model the second can be large while the fold is exact. When the first
    # is above what rounding explains, a float64 copy is folded too: its error is the fold's.
    float64_error: float | None = None
    float32_noise: float | None = None
    float64_fold_error: float | None = None
    float64_note: str = ""
    # A forward torch.fx cannot trace is folded part by part (`depthcut.fold.parts`): what
    # stayed as it was, "name (why)"; operators and depth then count the traced parts only.
    unfolded_parts: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when every merge taken is exact (the fold must then agree to float32 rounding)."""
        return all(m.exact for m in self.merges if m.taken)

    @property
    def rounding_bound(self) -> float:
        """The float64 error float32 rounding explains: a few times the unfolded model's own,
        and at least FLOAT32_TOLERANCE."""
        return max(FLOAT32_TOLERANCE, 4.0 * (self.float32_noise or 0.0))

    @property
    def agrees_in_float64(self) -> bool | None:
        """Whether the fold computes the unfolded model's function up to float32 rounding,
        judged against float64 (None: no float64 evaluation)."""
        if self.float64_error is None:
            return None
        if self.float64_fold_error is not None:
            return self.float64_fold_error <= FLOAT64_TOLERANCE
        return self.float64_error <= self.rounding_bound

    def to_dict(self) -> dict:
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
                if f.name != "merges"}
        data["merges"] = [m.to_dict() for m in self.merges]
        return {f.name: data[f.name] for f in fields(self)} | {
            "exact": self.exact, "agrees_in_float64": self.agrees_in_float64}

    def markdown(self) -> str:
        """The report as a Markdown table plus the list of merges."""
        rows = [
            ("operators", self.ops_before, self.ops_after),
            ("multiply-adds", f"{self.macs_before:,}", f"{self.macs_after:,}"),
            ("parameters", f"{self.params_before:,}", f"{self.params_after:,}"),
            ("conv/linear ops on the longest path", self.depth_before, self.depth_after),
        ]
        lines = [f"Fold report (policy {self.policy})", "",
                 "| | unfolded | folded |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {before} | {after} |" for name, before, after in rows]
        if self.top1_unfolded is not None:
            lines.append(f"| test top-1 | {self.top1_unfolded:.2f} | {self.top1_folded:.2f} |")
        lines.append("")
        kind = "all merges exact" if self.exact else "border-approximate merges present"
        lines.append(f"max |folded - unfolded| = {self.max_abs_diff:.3g} (relative "
                     f"{self.relative_error:.3g}; {kind})")
        lines += self._float64_lines()
        if self.agreement is not None:
            lines.append(f"top-1 agreement with the unfolded model: {self.agreement:.2f}%")
        if self.unfolded_parts:
            lines.append(f"folded part by part (operators and depth: the traced parts); left "
                         f"unfolded: {'; '.join(self.unfolded_parts)}")
        if self.removed_branches:
            lines.append(f"branches removed (always-OFF sites): "
                         f"{', '.join(self.removed_branches)}")
        if self.input_size is not None:
            size = "x".join(map(str, self.input_size))
            if self.bias_maps:
                lines.append(
                    f"folded at input size {size}: {len(self.bias_maps)} op(s) carry a bias map "
                    f"({', '.join(self.bias_maps)}) that holds for this input size only; the "
                    "folded model refuses inputs of another size (fold again for them)")
            else:
                lines.append(f"folded at input size {size} (no bias map: any input size works)")
        taken = [m for m in self.merges if m.taken]
        declined = [m for m in self.merges if not m.taken]
        lines += ["", f"merges taken ({len(taken)}):"]
        lines += [f"- {m.rule}: {' + '.join(m.replaces)} "
                  f"({'exact' if m.exact else 'border-approximate'}; MACs {m.macs_before:,} -> "
                  f"{m.macs_after:,}{_timing(m)}{'; ' + m.reason if m.reason else ''})"
                  for m in taken]
        if declined:
            lines += ["", f"merges declined ({len(declined)}):"]
            lines += [f"- {m.rule}: {' + '.join(m.replaces)} ({m.reason})" for m in declined]
        return "\n".join(lines)


    def _float64_lines(self) -> list[str]:
        if self.float64_error is None:
            return [f"({self.float64_note})"] if self.float64_note else []
        line = (f"against the unfolded model evaluated in float64: folded relative error "
                f"{self.float64_error:.3g}, unfolded float32 {self.float32_noise:.3g} (float32 "
                "rounding of the unfolded model alone)")
        if self.float64_fold_error is not None:
            line += f"; the same fold in float64: relative error {self.float64_fold_error:.3g}"
        if self.agrees_in_float64:
            line += "; the fold is exact up to float32 rounding"
        elif self.exact:
            line += "; NOT explained by float32 rounding: please report this model"
        return [line]


def _timing(merge: Merge) -> str:
    if merge.seconds_before is None:
        return ""
    return f"; {merge.seconds_before * 1e3:.3f} -> {merge.seconds_after * 1e3:.3f} ms"


def compare_outputs(unfolded: nn.Module, folded: nn.Module,
                    batches: Iterable) -> dict[str, float | None]:
    """Top-1 agreement (and top-1 of each when targets come with the batches) over `batches`."""
    agree = correct_unfolded = correct_folded = seen = 0
    has_targets = True
    device = next(iter(folded.buffers()), next(iter(folded.parameters()), None))
    with torch.no_grad():
        for batch in batches:
            inputs, targets = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (
                batch, None)
            if device is not None:
                inputs = inputs.to(device.device)
            p_unfolded = unfolded(inputs).argmax(-1)
            p_folded = folded(inputs).argmax(-1)
            agree += int((p_unfolded == p_folded).sum())
            seen += len(p_folded)
            if targets is None:
                has_targets = False
            else:
                targets = targets.to(p_folded.device)
                correct_unfolded += int((p_unfolded == targets).sum())
                correct_folded += int((p_folded == targets).sum())
    if seen == 0:
        raise ConfigError("compare_outputs got no batches")
    result = {"agreement": 100.0 * agree / seen, "top1_unfolded": None, "top1_folded": None}
    if has_targets:
        result["top1_unfolded"] = 100.0 * correct_unfolded / seen
        result["top1_folded"] = 100.0 * correct_folded / seen
    return result
