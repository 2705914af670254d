"""The fair-compute reference: the dense model trained further in chunks of the methods'
finetune schedule, no site removed, so extra training is not credited to depth reduction."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from depthcut.data import DataSplits
from depthcut.errors import ConfigError
from depthcut.methods import MethodSpec, register
from depthcut.stages import FINETUNE_OPTIONS, Method, MethodResult, StageRun, run_stages
from depthcut.train import TrainConfig


@dataclass
class DenseLongerConfig:
    finetune: TrainConfig = field(default_factory=TrainConfig)  # one chunk of training
    chunks: int = 1

    def __post_init__(self) -> None:
        if self.chunks < 1:
            raise ConfigError(f"chunks must be >= 1, got {self.chunks}")


class DenseLonger(Method):
    """Each stage only trains; stops after `chunks` stages."""

    name, rule = "dense_longer", "none (reference: no site removed)"

    def __init__(self, config: DenseLongerConfig) -> None:
        self.chunks = config.chunks
        self.finetune = config.finetune

    def stop_before(self, run: StageRun) -> str | None:
        return f"{self.chunks} chunks trained" if run.last.stage >= self.chunks else None

    def training(self, stage: int) -> str:
        return f"dense chunk {stage}"

    def change(self, run: StageRun) -> dict:
        linearized = list(run.dense.linearized)
        return {"sites_linearized": len(linearized), "linearized": linearized}


def dense_longer(model: nn.Module, splits: DataSplits, config: DenseLongerConfig,
                 **kwargs) -> MethodResult:
    """Train the dense model `config.chunks` more times (see `run_stages` for the keyword
    arguments), recording test top-1 after each."""
    return run_stages(DenseLonger(config), model, splits, **kwargs)


# The reference of every comparison: no command, no site removed, no cost table; its chunks are
# the methods' finetune (the shared finetune settings).
SPEC = register(MethodSpec(
    name="dense_longer", config=DenseLongerConfig, runner=dense_longer,
    label="dense, trained longer", training_options=FINETUNE_OPTIONS, cost_table=False,
    comparable=False, reference=True, order=90))
