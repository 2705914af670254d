"""Layer Folding baseline (Ben Dror et al., BMVC 2022; METHODS section 5).

Every site's activation act becomes f(x) = alpha x + (1 - alpha) act(x) with a trainable slope
alpha per site (initialised at 0, clipped to >= 0 after every step), trained with the auxiliary
loss lambda sum_l |1 - alpha_l^2| that pulls slopes towards 1 (linear). Then the k sites with
alpha closest to 1 (k given, to compare at equal depth) or every site with alpha >= threshold
are linearized, the others get their original activation back, and the model is finetuned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from depthcut.data import DataSplits
from depthcut.methods.easier import MethodResult
from depthcut.sites import find_sites, linearize, replace_module
from depthcut.train import Checkpointing, TrainConfig, evaluate, train


class SlopedActivation(nn.Module):
    """alpha x + (1 - alpha) act(x): alpha = 0 is the original activation, alpha = 1 is linear."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        # act(x) may work in place (ReLU(inplace=True)): keep x intact for the linear part.
        return self.alpha * x + (1 - self.alpha) * self.activation(x.clone())


@dataclass
class LayerFoldingConfig:
    k: int | None = None  # linearize the k sites with alpha closest to 1 ...
    threshold: float = 0.9  # ... or, when k is None, every site with alpha >= threshold
    lam: float = 0.25  # weight of the auxiliary loss sum |1 - alpha^2|
    slope_training: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 0:
            raise ValueError(f"k (sites to linearize) must be >= 0, got {self.k}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.lam < 0:
            raise ValueError(f"lambda must be >= 0, got {self.lam}")


LayerFoldingResult = MethodResult


def choose_by_slope(alphas: dict[str, float], k: int | None, threshold: float) -> list[str]:
    """The k sites with alpha closest to 1 (ties: forward order), or all with alpha >= threshold."""
    if k is None:
        return [site for site, alpha in alphas.items() if alpha >= threshold]
    ranked = sorted(alphas, key=lambda site: (abs(1 - alphas[site]), list(alphas).index(site)))
    return ranked[:k]


def layer_folding(model: nn.Module, splits: DataSplits, config: LayerFoldingConfig, *,
                  dense_record: dict, history: Sequence[dict] = (), on_stage=None,
                  progress: bool = True,
                  snapshots: Callable[[str], Checkpointing] | None = None) -> LayerFoldingResult:
    """Train slopes, linearize the most linear sites, restore the rest, finetune; one stage.

    With its stage in `history` (a resumed run that had finished it), nothing is redone.
    """
    rule = f"k={config.k}" if config.k is not None else f"alpha >= {config.threshold}"
    if history:
        return LayerFoldingResult(records=[dense_record, *history], answer=history[-1],
                                  stop_reason=f"one stage ({rule})", model=model)
    start = time.perf_counter()
    sites = find_sites(model)
    if config.k is not None and config.k > len(sites):
        raise ValueError(f"k={config.k} is more than the {len(sites)} sites left in the model")
    originals = {site: model.get_submodule(site) for site in sites}
    wrappers = {site: SlopedActivation(originals[site]) for site in sites}
    device = next(model.parameters()).device
    for site, wrapper in wrappers.items():
        replace_module(model, site, wrapper.to(device))
    slopes = [wrapper.alpha for wrapper in wrappers.values()]

    def penalty() -> Tensor:
        return config.lam * sum((1 - alpha**2).abs() for alpha in slopes)

    def clip() -> None:
        with torch.no_grad():
            for alpha in slopes:
                alpha.clamp_(min=0.0)

    train(model, splits.train, config.slope_training, progress=progress, desc="slopes",
          extra_loss=penalty, after_step=clip,
          checkpointing=snapshots("slopes") if snapshots else None)
    alphas = {site: float(wrapper.alpha.detach()) for site, wrapper in wrappers.items()}
    chosen = choose_by_slope(alphas, config.k, config.threshold)
    for site in sites:
        replace_module(model, site, originals[site])
    linearize(model, chosen)
    fit = train(model, splits.train, config.finetune, progress=progress, desc="finetune",
                checkpointing=snapshots("finetune") if snapshots else None)
    linearized = list(dense_record.get("linearized", [])) + chosen
    val_top1 = evaluate(model, splits.val) if splits.val is not None else None
    epochs = config.slope_training.epochs + config.finetune.epochs
    record = {
        "method": "layer_folding",
        "stage": dense_record["stage"] + 1,
        "sites_total": dense_record["sites_total"],
        "sites_linearized": len(linearized),
        "linearized": linearized,
        "chosen": chosen,
        "alphas": alphas,
        "entropy": {},
        "val_top1": val_top1,
        "test_top1": evaluate(model, splits.test),
        "drop": (dense_record["val_top1"] - val_top1
                 if val_top1 is not None and dense_record.get("val_top1") is not None else None),
        "within_delta": True,  # one stage: it is the answer by construction
        "epochs": epochs,
        "total_epochs": dense_record.get("total_epochs", 0) + epochs,
        "train_loss": fit.epochs[-1].loss if fit.epochs else None,
        "seconds": time.perf_counter() - start,
    }
    if on_stage is not None:
        on_stage(record, model)
    return LayerFoldingResult(records=[dense_record, record], answer=record,
                              stop_reason=f"one stage ({rule})", model=model)
