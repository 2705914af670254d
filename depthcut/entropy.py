"""Neuron-state entropy (METHODS section 2; EASIER eq. 3-7).

For every neuron (channel) of every rectifier site we count how often its pre-activation is
positive (ON) or negative (OFF) over a dataset; exact zeros are not counted. Counts are streamed
batch by batch, so memory is O(neurons) whatever the dataset size, and are turned into entropies
once at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from depthcut.distributed import all_reduce_sum, world_size
from depthcut.faults import die_at
from depthcut.sites import SiteError, find_sites

# A float32 sum of +-1/0 values is exact while it stays below 2**24 in magnitude.
_FLOAT32_EXACT = 2**24


@dataclass
class SiteCounts:
    """How often each neuron of one site was ON (z > 0) and OFF (z < 0)."""

    n_on: torch.Tensor  # int64, one entry per neuron
    n_off: torch.Tensor

    @property
    def neurons(self) -> int:
        return int(self.n_on.numel())

    def neuron_entropy(self) -> torch.Tensor:
        return neuron_entropy(self.n_on, self.n_off)

    def layer_entropy(self) -> float:
        """Mean neuron entropy in bits (eq. 7)."""
        return float(self.neuron_entropy().mean())

    def always_on(self) -> torch.Tensor:
        """Neurons that were never OFF and ON at least once (linear: absorbable)."""
        return (self.n_off == 0) & (self.n_on > 0)

    def always_off(self) -> torch.Tensor:
        """Neurons that were never ON (a ReLU outputs zero for them)."""
        return self.n_on == 0


def neuron_entropy(n_on: torch.Tensor, n_off: torch.Tensor) -> torch.Tensor:
    """Binary entropy in bits of each neuron's ON/OFF frequencies; 0 for a neuron never counted."""
    total = (n_on + n_off).to(torch.float64)
    p_on = torch.where(total > 0, n_on.to(torch.float64) / total.clamp(min=1), 0.0)
    p_off = 1.0 - p_on

    def plogp(p: torch.Tensor) -> torch.Tensor:
        return torch.where(p > 0, p * torch.log2(p.clamp(min=1e-300)), 0.0)

    return -(plogp(p_on) + plogp(p_off))


def _channel_dim(z: torch.Tensor) -> int:
    """Neuron axis: dim 1 of (N, C, H, W) maps, the last dim of (N, C) and (N, T, C) tensors."""
    return 1 if z.dim() >= 4 else z.dim() - 1


def _inputs(batches: Iterable) -> Iterator[torch.Tensor]:
    for item in batches:
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
            yield item[0]
        else:
            raise TypeError(
                "batches must yield input tensors or (input, target) pairs; got "
                f"{type(item).__name__}"
            )


class _SignCounter:
    """Forward pre-hook that adds one site's sign counts, read before the op can run in place."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.signed_sum: torch.Tensor | None = None  # sum of sign(z) = n_on - n_off
        self.nonzero: torch.Tensor | None = None  # sum of |sign(z)| = n_on + n_off
        self.called = False

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.called:
            raise SiteError(
                f"site {self.name!r} ran twice in one forward: give each place its own module."
            )
        self.called = True
        z = args[0].detach()
        dim = _channel_dim(z)
        dims = [d for d in range(z.dim()) if d != dim]
        per_neuron = z.numel() // max(z.shape[dim], 1)
        dtype = torch.float32 if per_neuron < _FLOAT32_EXACT else torch.float64
        signs = torch.sign(z).to(dtype)
        signed = signs.sum(dim=dims).to(torch.float64)
        nonzero = signs.abs_().sum(dim=dims).to(torch.float64)
        if self.signed_sum is None:
            self.signed_sum, self.nonzero = signed, nonzero
        else:
            self.signed_sum += signed
            self.nonzero += nonzero

    def counts(self) -> SiteCounts | None:
        if self.signed_sum is None:
            return None
        n_on = ((self.nonzero + self.signed_sum) / 2).round().to(torch.int64).cpu()
        n_off = ((self.nonzero - self.signed_sum) / 2).round().to(torch.int64).cpu()
        return SiteCounts(n_on=n_on, n_off=n_off)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def count_states(
    model: nn.Module,
    batches: Iterable,
    sites: Sequence[str] | None = None,
    *,
    mode: str = "eval",
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, SiteCounts | None]:
    """Per-neuron ON/OFF counts for each site; None for a site the forward never reached.

    The model runs in eval() mode by default (`mode="train"` reproduces the EASIER authors'
    variant); hooks are removed and every submodule's train/eval flag and buffer (BatchNorm
    running statistics) are restored afterwards.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    names = list(sites) if sites is not None else find_sites(model)
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise SiteError(f"no such site in the model: {', '.join(missing)}")
    device = _model_device(model)
    flags = {module: module.training for module in model.modules()}
    counters = {name: _SignCounter(name) for name in names}
    handles = [modules[name].register_forward_pre_hook(counters[name]) for name in names]
    # Train-mode forwards update BatchNorm running statistics: keep them to put them back.
    saved = [(b, b.clone()) for b in model.buffers()] if mode == "train" else []
    try:
        model.train(mode == "train")
        for index, inputs in enumerate(
            tqdm(_inputs(batches), desc="entropy", disable=not progress, leave=False)
        ):
            if max_batches is not None and index >= max_batches:
                break
            for counter in counters.values():
                counter.called = False
            die_at("entropy-batch")
            model(inputs.to(device, non_blocking=True))
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
        for buffer, value in saved:
            buffer.copy_(value)
    if world_size() > 1:
        _sum_over_ranks(list(counters.values()), device)
    return {name: counter.counts() for name, counter in counters.items()}


def _sum_over_ranks(counters: list[_SignCounter], device: torch.device) -> None:
    """Add every rank's counts (each rank counted its shard), so all ranks see the totals.

    A site may be reached on some ranks only: the neuron counts are agreed on first (max), and
    ranks that never reached it contribute zeros.
    """
    sizes = torch.tensor([0 if c.signed_sum is None else c.signed_sum.numel() for c in counters],
                         dtype=torch.int64, device=device)
    torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)
    for counter, size in zip(counters, sizes.tolist(), strict=True):
        if size == 0:
            continue
        if counter.signed_sum is None:
            counter.signed_sum = torch.zeros(size, dtype=torch.float64, device=device)
            counter.nonzero = torch.zeros(size, dtype=torch.float64, device=device)
        both = torch.stack([counter.signed_sum, counter.nonzero])
        all_reduce_sum(both)
        counter.signed_sum, counter.nonzero = both[0].clone(), both[1].clone()


def layer_entropies(counts: dict[str, SiteCounts | None]) -> dict[str, float]:
    """Layer entropy per site; NaN for a site that was never reached (no evidence either way)."""
    return {
        name: (c.layer_entropy() if c is not None and c.neurons else math.nan)
        for name, c in counts.items()
    }


def measure_entropy(
    model: nn.Module,
    batches: Iterable,
    sites: Sequence[str] | None = None,
    **kwargs,
) -> dict[str, float]:
    """Layer entropy in bits for each rectifier site (all sites found by `find_sites` by default).

    `batches` yields input tensors or (input, target) pairs. See `count_states` for options.
    """
    return layer_entropies(count_states(model, batches, sites, **kwargs))
