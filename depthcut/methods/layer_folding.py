"""Layer Folding baseline (Ben Dror et al., BMVC 2022; METHODS section 5).

Every site's activation act becomes f(x) = alpha x + (1 - alpha) act(x) with a trainable slope
alpha per site (initialised at 0, clipped to >= 0 after every step), trained with the auxiliary
loss lambda sum_l |1 - alpha_l^2| that pulls slopes towards 1 (linear). Then the k sites with
alpha closest to 1 (k given, to compare at equal depth) or every site with alpha >= threshold
are linearized, the others get their original activation back, and the model is finetuned.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from depthcut.data import DataSplits
from depthcut.errors import ConfigError
from depthcut.methods import MethodSpec, register
from depthcut.options import Option
from depthcut.sites import find_sites, linearize, replace_module
from depthcut.stages import (
    FINETUNE_OPTIONS,
    FINETUNE_PRESETS,
    Method,
    MethodResult,
    StageRecord,
    StageRun,
    run_stages,
)
from depthcut.train import TrainConfig
from depthcut.transfer import TRANSFER_PRESETS


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
            raise ConfigError(f"k (sites to linearize) must be >= 0, got {self.k}")
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.lam < 0:
            raise ConfigError(f"lambda must be >= 0, got {self.lam}")


def choose_by_slope(alphas: dict[str, float], k: int | None, threshold: float) -> list[str]:
    """The k sites with alpha closest to 1 (ties: forward order), or all with alpha >= threshold."""
    if k is None:
        return [site for site, alpha in alphas.items() if alpha >= threshold]
    ranked = sorted(alphas, key=lambda site: (abs(1 - alphas[site]), list(alphas).index(site)))
    return ranked[:k]


class LayerFolding(Method):
    """One stage: slopes trained, the most linear sites linearized, the rest restored."""

    name = "layer_folding"

    def __init__(self, config: LayerFoldingConfig) -> None:
        self.config = config
        self.finetune = config.finetune
        k = config.k
        self.rule = (f"linearize the {k} sites with slope closest to 1" if k is not None
                     else f"linearize sites with slope >= {config.threshold}")
        choice = f"k={k}" if k is not None else f"alpha >= {config.threshold}"
        self.done = f"one stage ({choice})"

    def stop_before(self, run: StageRun) -> str | None:
        return self.done if run.last.stage > run.dense.stage else None

    def training(self, stage: int) -> str:
        return "finetune"

    def epochs(self) -> int:
        return self.config.slope_training.epochs + self.config.finetune.epochs

    def change(self, run: StageRun) -> dict:
        model, config = run.model, self.config
        sites = find_sites(model)
        if config.k is not None and config.k > len(sites):
            raise ConfigError(f"k={config.k} is more than the {len(sites)} sites left in the model")
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

        run.train(config.slope_training, "slopes", extra_loss=penalty, after_step=clip)
        alphas = {site: float(wrapper.alpha.detach()) for site, wrapper in wrappers.items()}
        chosen = choose_by_slope(alphas, config.k, config.threshold)
        for site in sites:
            replace_module(model, site, originals[site])
        linearize(model, chosen)
        linearized = list(run.last.linearized) + chosen
        return {"sites_linearized": len(linearized), "linearized": linearized, "chosen": chosen,
                "alphas": alphas, "entropy": {}}

    def stop_after(self, run: StageRun, record: StageRecord) -> str | None:
        return self.done


def layer_folding(model: nn.Module, splits: DataSplits, config: LayerFoldingConfig,
                  **kwargs) -> MethodResult:
    """Train slopes, linearize the most linear sites, restore the rest, finetune: one stage
    (see `run_stages` for the keyword arguments). A resumed run that had finished its stage
    redoes nothing."""
    return run_stages(LayerFolding(config), model, splits, **kwargs)


K = Option("lf_k", "linearize the k sites with slope closest to 1 (default: threshold; in "
           "compare: EASIER's answer count)", path="k", flags=("--k",), argparse={"type": int})
OPTIONS = (
    K,
    Option("threshold", "without k: linearize sites with slope >= this (default 0.9)",
           argparse={"type": float}),
    Option("lam", "weight of the slope loss sum |1 - alpha^2| (default 0.25)",
           argparse={"type": float}),
    Option("slope_epochs", "epochs training the slopes (quick: 3; paper: 160)",
           path="slope_training.epochs", argparse={"type": int}),
    Option("slope_lr", "learning rate while training slopes (default: preset)",
           path="slope_training.lr", argparse={"type": float}),
)


def _describe(result: MethodResult) -> str:
    slopes = ", ".join(f"{site} {alpha:.2f}" for site, alpha in result.answer["alphas"].items())
    return f"\nSlopes: {slopes}"


def _with_depth(config: LayerFoldingConfig, sites: int) -> LayerFoldingConfig:
    """In a comparison without a k of its own: as many sites as the depth reference removed."""
    return replace(config, k=sites) if config.k is None else config


SPEC = register(MethodSpec(
    name="layer_folding", config=LayerFoldingConfig, runner=layer_folding, label="Layer Folding",
    help="Layer Folding baseline (trained slopes)", options=OPTIONS,
    compare_options=(K.with_flags("--lf-k"), *OPTIONS[1:]), training_options=FINETUNE_OPTIONS,
    presets={"quick": {"slope_epochs": 3, "slope_lr": 0.02, **FINETUNE_PRESETS["quick"]},
             "paper": {"slope_epochs": 160, "slope_lr": None, **FINETUNE_PRESETS["paper"]},
             # the slopes train as long as the dense model, as under paper
             **{name: {"slope_epochs": values["epochs"], "slope_lr": None,
                       **FINETUNE_PRESETS[name]} for name, values in TRANSFER_PRESETS.items()}},
    record_fields={"alphas": "entropy"}, with_depth=_with_depth, describe=_describe, order=50))
