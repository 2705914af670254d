"""Neuron-state entropy (METHODS section 2; EASIER eq. 3-7).

For every neuron (channel) of every rectifier site we count how often its pre-activation is
positive (ON) or negative (OFF) over a dataset; exact zeros are not counted. Counts are streamed
batch by batch, so memory is O(neurons) whatever the dataset size, and are turned into entropies
once at the end.

That is the papers' definition (variant "paper", the default). The authors' code computes
something else; those counting rules are offered under their own names, so that a result says
which one it used (see `count_states`):
- "easier-code": z >= 0 is ON (zeros count ON); per batch, p = fraction ON over the batch's
  samples and positions, layer entropy = mean neuron entropy; result = mean over batches.
- "egp-code": z > 0 is ON (zeros count OFF); per batch, mean neuron entropy over the "mixed"
  channels only (0 < p < 1), 0 for a batch with none; result = mean over batches, every batch
  weighing the same (EGP's code divides the sum by the number of batches).

Shared modules: a site module that runs at several places in one forward (ALBERT shares one
layer across its depth; timm's efficientvit calls one `kernel_func` on queries and keys) is one
site: every call's pre-activations are counted into the same neurons (a call is more samples of
them), because linearizing the module linearizes every place, so the decision is the module's.
The calls must agree on the neuron count; `SiteCounts.places` says how many there were, and a
warning names such sites. Where the forward traces, `models.unshare_activations` gives each
place its own module instead, which is finer.

Padding: a model that declares a padding token id (an int attribute `pad_id`, as
`depthcut.models.TransformerEncoder` built for a text dataset does) is given (N, T) token ids;
its padding positions are not text, so they are left out of every count: at a site whose input
is (N, T, ...) (the batch's own N and T, the neuron axis not 1), only the positions where the
input token is not `pad_id` are counted (their pre-activations are data too, and counting them
could make a site look constant, i.e. linear). A site without a token axis (after pooling) is
counted whole.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from depthcut.distributed import all_reduce_sum, world_size
from depthcut.errors import ConfigError
from depthcut.faults import die_at
from depthcut.layers import default_channel_dim
from depthcut.neuron_axis import neuron_axes
from depthcut.sites import SiteError, find_sites

# A float32 sum of +-1/0 values is exact while it stays below 2**24 in magnitude.
_FLOAT32_EXACT = 2**24

ENTROPY_VARIANTS = ("paper", "easier-code", "egp-code")


@dataclass
class SiteCounts:
    """How often each neuron of one site was ON (z > 0) and OFF (z < 0)."""

    n_on: torch.Tensor  # int64, one entry per neuron
    n_off: torch.Tensor
    places: int = 1  # calls of the site's module in one forward (shared module: > 1, pooled)

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


@dataclass
class BatchAveragedCounts(SiteCounts):
    """Counts of a code variant ("easier-code", "egp-code"), whose layer entropy is a mean of
    per-batch layer entropies and so cannot be recomputed from the totals.

    n_on / n_off are totals under the variant's rule for zeros (easier-code: z >= 0 is ON;
    egp-code: z > 0 is ON), so always_on / always_off and zero-entropy checks still apply;
    `neuron_entropy()` is the pooled per-neuron entropy of those totals.
    """

    variant: str = "easier-code"
    entropy_sum: float = 0.0  # sum over batches of the batch's layer entropy
    batches: int = 0  # batches in which the site ran

    def layer_entropy(self) -> float:
        return self.entropy_sum / self.batches if self.batches else math.nan


def neuron_entropy(n_on: torch.Tensor, n_off: torch.Tensor) -> torch.Tensor:
    """Binary entropy in bits of each neuron's ON/OFF frequencies; 0 for a neuron never counted."""
    total = (n_on + n_off).to(torch.float64)
    p_on = torch.where(total > 0, n_on.to(torch.float64) / total.clamp(min=1), 0.0)
    p_off = 1.0 - p_on

    def plogp(p: torch.Tensor) -> torch.Tensor:
        return torch.where(p > 0, p * torch.log2(p.clamp(min=1e-300)), 0.0)

    return -(plogp(p_on) + plogp(p_off))


def _channel_dim(z: torch.Tensor, override: int | None = None, name: str = "") -> int:
    """Neuron axis: dim 1 of (N, C, H, W) maps, the last dim of (N, C) and (N, T, C) tensors.

    A 3-D tensor can be (N, T, C) tokens or a Conv1d (N, C, L) map; only the caller knows, so
    `override` (the caller's channel_dim) picks the axis; the batch axis 0 cannot be it.
    """
    if override is None:
        return default_channel_dim(z.dim())
    if isinstance(override, bool) or not isinstance(override, int):
        raise ConfigError(f"channel_dim must be an int, got {override!r} for site {name!r}")
    dim = override + z.dim() if override < 0 else override
    if not 1 <= dim < z.dim():
        raise ConfigError(
            f"channel_dim={override} does not fit site {name!r}: its input has shape "
            f"{tuple(z.shape)}; the channel axis must be one of dims 1..{z.dim() - 1} "
            "(dim 0 is the batch)"
        )
    return dim


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


def per_neuron_sum(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every axis but `dim`, as 2-D or 3-D views that reduce along one axis.

    torch's reduction over several non-adjacent axes (dims 0, 2, 3 of a channels_last map) runs
    several times slower than the forward's convolution; viewed as (rows, C) when the neuron
    axis is innermost in memory (channels_last maps, (N, T, C) tokens), or as (N, C, rest) when
    the tensor is contiguous, the same sum costs a fraction of it."""
    channels = values.shape[dim]
    last = values.movedim(dim, -1)
    if last.is_contiguous():
        rows = last.reshape(-1, channels)
        if values.dtype in (torch.float32, torch.float64):
            # ones @ rows: a matrix product sums faster than a reduction on CPU, and exactly
            # (small integers, fewer than 2**24 rows in float32); never in autocast's bf16.
            with torch.autocast(values.device.type, enabled=False):
                return (values.new_ones(1, rows.shape[0]) @ rows).squeeze(0)
        return rows.sum(0, dtype=_sum_dtype(values))
    values = values.contiguous()
    grouped = values.reshape(math.prod(values.shape[:dim]), channels, -1)
    return grouped.sum(2, dtype=_sum_dtype(values)).sum(0)


def _sum_dtype(values: torch.Tensor) -> torch.dtype | None:
    """Booleans sum as int64 (as torch does by default); floats keep their dtype."""
    return torch.int64 if values.dtype == torch.bool else None


class _Scratch:
    """One reusable buffer for the sign tensors of every site in a counting pass: a fresh
    batch-sized tensor per site and batch costs page faults that, at small widths, rival the
    convolutions (sites run one after another, so one buffer, grown to the largest, serves all)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def like(self, z: torch.Tensor) -> torch.Tensor:
        n = z.numel()
        if (self.buffer is None or self.buffer.numel() < n or self.buffer.dtype != z.dtype
                or self.buffer.device != z.device):
            self.buffer = torch.empty(n, dtype=z.dtype, device=z.device)
        flat = self.buffer[:n]
        # The same strides as z (channels_last maps stay channels_last).
        return flat.as_strided(z.shape, z.stride()) if z.is_contiguous(
            memory_format=torch.channels_last) and z.dim() == 4 else flat.view(z.shape)


class _SignCounter:
    """Forward pre-hook that adds one site's sign counts, read before the op can run in place."""

    def __init__(self, name: str, variant: str = "paper", channel_dim: int | None = None,
                 scratch: _Scratch | None = None) -> None:
        self.name = name
        self.scratch = scratch or _Scratch()
        self.variant = variant
        self.channel_dim = channel_dim
        self.signed_sum: torch.Tensor | None = None  # sum of sign(z) = n_on - n_off
        self.nonzero: torch.Tensor | None = None  # sum of |sign(z)| = n_on + n_off
        # Code variants: float64 totals (exact to 2**53) and the sum of per-batch entropies.
        self.on: torch.Tensor | None = None
        self.off: torch.Tensor | None = None
        self.entropy_sum: torch.Tensor | None = None
        self.batches: torch.Tensor | None = None
        # This batch's code-variant counts, pooled over the module's calls until `end_batch`.
        self.batch_on: torch.Tensor | None = None
        self.batch_off: torch.Tensor | None = None
        self.calls = 0  # calls in the current forward
        self.places = 0  # the most calls in one forward (a shared module: more than 1)
        self.neurons: list[int] = []  # each call's neuron count in the current forward
        self.mask: torch.Tensor | None = None  # bool (N, T): the batch's real (non-pad) tokens

    def start_batch(self, mask: torch.Tensor | None) -> None:
        self.calls, self.neurons, self.mask = 0, [], mask

    def __call__(self, module: nn.Module, args: tuple) -> None:
        z = args[0].detach()
        dim = _channel_dim(z, self.channel_dim, self.name)
        self.calls += 1
        self.places = max(self.places, self.calls)
        self.neurons.append(int(z.shape[dim]))
        if len(set(self.neurons)) > 1:
            raise SiteError(
                f"site {self.name!r} runs at {self.calls} places in one forward with different "
                f"neuron counts ({', '.join(map(str, self.neurons))}): a shared module is one "
                "site only where its calls have the same neurons. Give each place its own "
                "module (depthcut.models.unshare_activations splits it where the forward "
                "traces)."
            )
        per_neuron = z.numel() // max(z.shape[dim], 1)
        mask = self._token_mask(z, dim)
        if mask is not None:
            per_neuron = int(mask.sum()) * (per_neuron // mask.numel())
        if self.variant != "paper":
            self._add_batch(z, dim, per_neuron, mask)
            return
        dtype = torch.float32 if per_neuron < _FLOAT32_EXACT else torch.float64
        if z.dtype == dtype:
            signs = torch.sign(z, out=self.scratch.like(z))
        else:
            signs = torch.sign(z).to(dtype)
        if mask is not None:  # padding positions count neither ON nor OFF
            signs = signs * mask.to(dtype)
        signed = per_neuron_sum(signs, dim).to(torch.float64)
        nonzero = per_neuron_sum(signs.abs_(), dim).to(torch.float64)
        if self.signed_sum is None:
            self.signed_sum, self.nonzero = signed, nonzero
        else:
            self.signed_sum += signed
            self.nonzero += nonzero

    def _token_mask(self, z: torch.Tensor, dim: int) -> torch.Tensor | None:
        """The batch's padding mask shaped to broadcast over `z`, where `z` has its token axis:
        (N, T, ...) with the batch's N and T and the neuron axis not 1; else None."""
        mask = self.mask
        if mask is None or z.dim() < 3 or dim == 1 or tuple(z.shape[:2]) != tuple(mask.shape):
            return None
        return mask.to(z.device).view(*mask.shape, *([1] * (z.dim() - 2)))

    def _add_batch(self, z: torch.Tensor, dim: int, per_neuron: int,
                   mask: torch.Tensor | None = None) -> None:
        """One comparison and one sum per site; the batch entropy stays on the device. Padding
        positions (`mask` False) count neither ON nor OFF."""
        if self.variant == "easier-code":
            negative = z < 0 if mask is None else (z < 0) & mask
            off = per_neuron_sum(negative, dim).to(torch.float64)  # zeros count ON
            on = per_neuron - off
        else:  # egp-code: heaviside(z, 0), zeros count OFF
            positive = z > 0 if mask is None else (z > 0) & mask
            on = per_neuron_sum(positive, dim).to(torch.float64)
            off = per_neuron - on
        if self.batch_on is None:
            self.batch_on, self.batch_off = on, off
        else:  # another call of a shared module: the same neurons, more samples
            self.batch_on = self.batch_on + on
            self.batch_off = self.batch_off + off

    def end_batch(self) -> None:
        """Close a code variant's batch: its layer entropy from the counts of every call."""
        if self.variant == "paper" or self.batch_on is None:
            return
        on, off = self.batch_on, self.batch_off
        self.batch_on = self.batch_off = None
        entropy = neuron_entropy(on, off)
        if self.variant == "easier-code":
            batch_h = entropy.mean()
        else:
            mixed = (on > 0) & (off > 0)
            batch_h = (entropy * mixed).sum() / mixed.sum().clamp(min=1)
        if self.on is None:
            self.on, self.off = on, off
            self.entropy_sum = batch_h
            self.batches = torch.ones((), dtype=torch.float64, device=on.device)
        else:
            self.on += on
            self.off += off
            self.entropy_sum += batch_h
            self.batches += 1

    def size(self) -> int:
        """Neurons counted so far on this rank; 0 if the site never ran."""
        tensor = self.signed_sum if self.variant == "paper" else self.on
        return 0 if tensor is None else int(tensor.numel())

    def counts(self) -> SiteCounts | None:
        if self.variant != "paper":
            if self.on is None:
                return None
            return BatchAveragedCounts(
                n_on=self.on.round().to(torch.int64).cpu(),
                n_off=self.off.round().to(torch.int64).cpu(),
                places=max(self.places, 1),
                variant=self.variant,
                entropy_sum=float(self.entropy_sum),
                batches=int(self.batches),
            )
        if self.signed_sum is None:
            return None
        n_on = ((self.nonzero + self.signed_sum) / 2).round().to(torch.int64).cpu()
        n_off = ((self.nonzero - self.signed_sum) / 2).round().to(torch.int64).cpu()
        return SiteCounts(n_on=n_on, n_off=n_off, places=max(self.places, 1))


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
    variant: str = "paper",
    channel_dim: int | Mapping[str, int] | None = None,
) -> dict[str, SiteCounts | None]:
    """Per-neuron ON/OFF counts for each site; None for a site the forward never reached.

    `mode`: the model runs in eval() mode by default; "train" uses BatchNorm batch statistics.
    Hooks are removed and every submodule's train/eval flag and buffer (BatchNorm running
    statistics) are restored afterwards.

    `variant` picks the counting rule (module docstring); `mode` and `batches` stay the
    caller's. "paper" gives `SiteCounts`; the code variants give `BatchAveragedCounts`, whose
    `layer_entropy()` is the variant's. "easier-code" is the EASIER authors' counting rule; their
    code counts in train() mode on augmented training batches during the last training epoch,
    while the weights still change; here the weights are frozen and the batches are one extra
    pass over whatever the caller passes (pass mode="train" and augmented batches to be closest).

    `channel_dim`: the neuron axis. By default each site's comes from the op that produced its
    pre-activation (`depthcut.neuron_axis`): channels (dim 1) after Conv1d/Conv2d/Conv3d and
    BatchNorm, the last dim after Linear and LayerNorm; where no producer is found, dim 1 of
    4-D and 5-D maps and the last dim otherwise. An int applies to every site, a mapping
    {site: dim} to the sites it names; an axis a site's input does not have raises ValueError.

    Padding: when `model.pad_id` is an int and a batch is integer (N, T) token ids, positions
    holding `pad_id` are left out of the counts (module docstring).
    """
    if mode not in ("eval", "train"):
        raise ConfigError(f"mode must be 'eval' or 'train', got {mode!r}")
    if variant not in ENTROPY_VARIANTS:
        raise ConfigError(
            f"variant must be one of {', '.join(map(repr, ENTROPY_VARIANTS))}, got {variant!r}"
        )
    names = list(sites) if sites is not None else find_sites(model)
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise SiteError(f"no such site in the model: {', '.join(missing)}")
    dims = _channel_dims(channel_dim, names)
    if len(dims) < len(names):  # the others: the axis their producing op gives
        found = neuron_axes(model, [name for name in names if name not in dims])
        dims |= {name: axis for name, axis in found.items() if axis is not None}
    device = _model_device(model)
    flags = {module: module.training for module in model.modules()}
    scratch = _Scratch()
    counters = {name: _SignCounter(name, variant, dims.get(name), scratch) for name in names}
    handles = [modules[name].register_forward_pre_hook(counters[name]) for name in names]
    pad_id = getattr(model, "pad_id", None)
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        pad_id = None
    # Train-mode forwards update BatchNorm running statistics: keep them to put them back.
    saved = [(b, b.clone()) for b in model.buffers()] if mode == "train" else []
    try:
        model.train(mode == "train")
        for index, inputs in enumerate(
            tqdm(_inputs(batches), desc="entropy", disable=not progress, leave=False)
        ):
            if max_batches is not None and index >= max_batches:
                break
            inputs = inputs.to(device, non_blocking=True)
            mask = padding_mask(inputs, pad_id)
            for counter in counters.values():
                counter.start_batch(mask)
            die_at("entropy-batch")
            model(inputs)
            for counter in counters.values():
                counter.end_batch()
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
        for buffer, value in saved:
            buffer.copy_(value)
    if world_size() > 1:
        _sum_over_ranks(list(counters.values()), device)
    _note_shared({name: counter.places for name, counter in counters.items()})
    return {name: counter.counts() for name, counter in counters.items()}


def _note_shared(places: Mapping[str, int]) -> None:
    """Warn once per call about sites whose module ran at several places in one forward."""
    shared = [f"{name} ({count} places)" for name, count in places.items() if count > 1]
    if shared:
        warnings.warn(
            f"shared site module(s): {', '.join(shared)}. Each is one site: its neuron counts "
            "pool every call, and linearizing it linearizes every place (where the forward "
            "traces, depthcut.models.unshare_activations gives each place its own module).",
            stacklevel=3,
        )


def padding_mask(inputs: torch.Tensor, pad_id: int | None) -> torch.Tensor | None:
    """bool (N, T), True at real tokens, for integer (N, T) token ids and a padding id; else
    None (images, or a model without padding)."""
    if pad_id is None or inputs.dim() != 2 or inputs.dtype.is_floating_point:
        return None
    return inputs != pad_id


def _channel_dims(
    channel_dim: int | Mapping[str, int] | None, names: list[str]
) -> dict[str, int]:
    """The caller's channel axis per site (absent: the default rule)."""
    if channel_dim is None:
        return {}
    if isinstance(channel_dim, Mapping):
        unknown = [name for name in channel_dim if name not in names]
        if unknown:
            raise ConfigError(
                f"channel_dim names sites that are not counted: {', '.join(map(repr, unknown))}"
            )
        dims = dict(channel_dim)
    else:
        dims = dict.fromkeys(names, channel_dim)
    for name, dim in dims.items():
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ConfigError(f"channel_dim must be an int, got {dim!r} for site {name!r}")
    return dims


def _sum_over_ranks(counters: list[_SignCounter], device: torch.device) -> None:
    """Add every rank's counts (each rank counted its shard), so all ranks see the totals.

    A site may be reached on some ranks only: the neuron counts are agreed on first (max), and
    ranks that never reached it contribute zeros. Code variants also add their per-batch
    entropy sums and batch counts, so the result is the mean over all ranks' batches.
    """
    sizes = torch.tensor([c.size() for c in counters], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)
    for counter, size in zip(counters, sizes.tolist(), strict=True):
        if size == 0:
            continue
        if counter.variant != "paper":
            _sum_batch_averaged(counter, size, device)
            continue
        if counter.signed_sum is None:
            counter.signed_sum = torch.zeros(size, dtype=torch.float64, device=device)
            counter.nonzero = torch.zeros(size, dtype=torch.float64, device=device)
        both = torch.stack([counter.signed_sum, counter.nonzero])
        all_reduce_sum(both)
        counter.signed_sum, counter.nonzero = both[0].clone(), both[1].clone()


def _sum_batch_averaged(counter: _SignCounter, size: int, device: torch.device) -> None:
    if counter.on is None:
        flat = torch.zeros(2 * size + 2, dtype=torch.float64, device=device)
    else:
        flat = torch.cat([counter.on, counter.off, counter.entropy_sum.view(1),
                          counter.batches.view(1)])
    all_reduce_sum(flat)
    counter.on, counter.off = flat[:size].clone(), flat[size : 2 * size].clone()
    counter.entropy_sum, counter.batches = flat[2 * size].clone(), flat[2 * size + 1].clone()


def layer_entropies(counts: dict[str, SiteCounts | None]) -> dict[str, float]:
    """Layer entropy per site (the counting variant's); NaN for a site that was never reached."""
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
