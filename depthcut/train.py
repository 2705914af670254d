"""The one train / finetune / evaluate loop every method shares."""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from depthcut.distributed import is_main, world_size
from depthcut.errors import ConfigError
from depthcut.faults import die_at
from depthcut.options import Option

SCHEDULES = ("cosine", "multistep", "constant")
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class TrainConfig:
    """An optimizer (SGD with momentum by default) and a learning-rate schedule, stepped every
    iteration.

    `milestones` are epochs (as in the papers: 80/120 of 160) at which the multistep schedule
    multiplies the rate by `gamma`; the cosine schedule anneals to zero over `epochs`.
    `optimizer` "adam" or "adamw" (the transfer rows of EASIER Table 4 use Adam) ignore
    `momentum` and `nesterov`.
    """

    epochs: int = 10
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "cosine"
    milestones: tuple[int, ...] = (80, 120)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # False: no weight decay on 1-D parameters (BatchNorm/LayerNorm weights and biases), as is
    # usual for SGD. True: weight decay on every parameter, as the EASIER authors' code does.
    decay_norm_and_bias: bool = False
    # Knowledge distillation from the dense model's logits (Hinton et al.): the loss becomes
    # (1 - distill) * cross-entropy + distill * T^2 * KL(teacher_T || student_T), T the
    # temperature. 0 = off. Only trainings given a teacher use it (the methods' finetunes, whose
    # teacher is the run's dense model).
    distill: float = 0.0
    distill_temperature: float = 4.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                              f"{self.optimizer!r}")
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        self.milestones = tuple(int(m) for m in self.milestones)
        if not 0.0 <= self.distill <= 1.0:
            raise ConfigError(f"distill (the distillation loss's weight) must be in [0, 1], "
                              f"got {self.distill}")
        if not self.distill_temperature > 0:
            raise ConfigError(f"distill_temperature must be positive, got "
                              f"{self.distill_temperature}")

    def lr_factor(self, epoch_progress: float) -> float:
        """Multiplier of `lr` after `epoch_progress` epochs (fractional)."""
        if self.warmup_epochs > 0 and epoch_progress < self.warmup_epochs:
            return (epoch_progress + 1e-3) / self.warmup_epochs
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(epoch_progress / max(self.epochs, 1), 1.0)))
        if self.schedule == "multistep":
            return self.gamma ** sum(epoch_progress >= m for m in self.milestones)
        return 1.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EpochStats:
    epoch: int
    loss: float
    train_top1: float
    lr: float
    seconds: float
    val_top1: float | None = None


@dataclass
class TrainResult:
    epochs: list[EpochStats] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Checkpointing:
    """How `train` keeps an epoch-level snapshot so a killed run resumes mid-stage.

    `save(state)` is called after every epoch with the model, optimizer, epochs done, the
    training loader's epoch counter and the statistics so far; `load()` returns the last
    such state for this training call, or None to start from scratch.
    """

    save: Callable[[dict], None]
    load: Callable[[], dict | None]


def seed_everything(seed: int) -> None:
    """Seed every generator a run touches, so a run is reproducible on one machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    return resolved


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move the model; channels_last is measurably faster for convolutions on CPU here."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


# Settings of every training of a run (dense training, finetunes, slope training): the CLI's
# "training" group after the dense epochs and lr (depthcut.experiment).
TRAIN_OPTIONS: tuple[Option, ...] = (
    Option("optimizer", "sgd (default: momentum, nesterov), adam or adamw (betas 0.9, 0.999; "
           "--momentum and --nesterov ignored; weight decay: an L2 term for adam, decoupled "
           "for adamw); transfer-adam preset: adam", argparse={"choices": OPTIMIZERS}),
    Option("schedule", argparse={"choices": SCHEDULES}),
    Option("milestones", "multistep schedule: epochs at which lr is multiplied by gamma",
           argparse={"type": int, "nargs": "*"}),
    Option("gamma", argparse={"type": float}),
    Option("momentum", argparse={"type": float}),
    Option("nesterov", argparse={"action": argparse.BooleanOptionalAction}),
    Option("weight_decay", "quick: 5e-4; paper: 1e-4", argparse={"type": float}),
    Option("decay_norm_and_bias", "weight decay also on BatchNorm/LayerNorm weights and biases "
           "(paper preset: on, as the authors' code; quick: off)", flags=("--decay-norm-bias",),
           argparse={"action": argparse.BooleanOptionalAction}),
    Option("warmup_epochs", argparse={"type": float}),
)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """`config.optimizer`: SGD (momentum, nesterov), Adam (weight decay added to the gradient,
    as torch's Adam does) or AdamW (decoupled weight decay); torch's default betas and eps.
    Weight decay on every parameter when `config.decay_norm_and_bias` (one group); otherwise
    none on BatchNorm/bias parameters (1-D tensors), as is usual."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.decay_norm_and_bias:
        groups = [{"params": trainable, "weight_decay": config.weight_decay}]
    else:
        groups = [
            {"params": [p for p in trainable if p.dim() > 1],
             "weight_decay": config.weight_decay},
            {"params": [p for p in trainable if p.dim() <= 1], "weight_decay": 0.0},
        ]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
    )


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train(
    model: nn.Module,
    loader: Iterable,
    config: TrainConfig,
    *,
    val_loader: Iterable | None = None,
    progress: bool = True,
    desc: str = "train",
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    checkpointing: Checkpointing | None = None,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Train `model` in place for `config.epochs` epochs; returns per-epoch statistics.

    `extra_loss()` is added to the task loss (e.g. Layer Folding's slope penalty) and
    `after_step()` runs after every optimizer step (e.g. clipping a parameter). With a
    `teacher` and `config.distill` > 0 the task loss is distilled (`distillation_loss`); the
    teacher runs in eval mode without gradients.
    """
    if teacher is None or config.distill == 0:
        teacher = None
    else:
        teacher.eval()
    device = _device_of(model)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = max(len(loader), 1)  # type: ignore[arg-type]
    result = TrainResult()
    start = time.perf_counter()
    first_epoch = 0
    state = checkpointing.load() if checkpointing is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_epoch = state["epochs_done"]
        result.epochs = [EpochStats(**stats) for stats in state["stats"]]
        if hasattr(loader, "epoch"):
            loader.epoch = state["loader_epoch"]
    # Under torch.distributed the forward goes through DDP, which averages gradients over ranks
    # (and keeps buffers such as pruning masks equal to rank 0's).
    net: nn.Module = model
    if world_size() > 1:
        net = nn.parallel.DistributedDataParallel(model)
    progress = progress and is_main()
    for epoch in range(first_epoch, config.epochs):
        model.train()
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        bar = tqdm(
            loader,
            desc=f"{desc} {epoch + 1}/{config.epochs}",
            disable=not progress,
            leave=False,
            total=steps_per_epoch,
        )
        for step, (inputs, targets) in enumerate(bar):
            die_at("train-step")
            lr = config.lr * config.lr_factor(epoch + step / steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device)
            outputs = net(inputs)
            loss = F.cross_entropy(outputs, targets, label_smoothing=config.label_smoothing)
            if teacher is not None:
                with torch.no_grad():
                    teacher_outputs = teacher(inputs)
                loss = distillation_loss(loss, outputs, teacher_outputs, config.distill,
                                         config.distill_temperature)
            if extra_loss is not None:
                loss = loss + extra_loss()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{desc}: loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    "lower the learning rate."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            loss_sum += loss.detach() * targets.numel()
            correct += (outputs.argmax(1) == targets).sum()
            seen += targets.numel()
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4f}")
        stats = EpochStats(
            epoch=epoch + 1,
            loss=float(loss_sum) / max(seen, 1),
            train_top1=100.0 * float(correct) / max(seen, 1),
            lr=lr if seen else config.lr,
            seconds=time.perf_counter() - epoch_start,
        )
        if val_loader is not None:
            stats.val_top1 = evaluate(model, val_loader)
        result.epochs.append(stats)
        if checkpointing is not None and is_main():
            checkpointing.save({
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epochs_done": epoch + 1,
                "loader_epoch": getattr(loader, "epoch", None),
                "stats": [asdict(e) for e in result.epochs],
            })
        if progress:
            val = f", val top-1 {stats.val_top1:.2f}" if stats.val_top1 is not None else ""
            tqdm.write(
                f"{desc} epoch {stats.epoch}/{config.epochs}: loss {stats.loss:.3f}, "
                f"train top-1 {stats.train_top1:.2f}{val} ({stats.seconds:.0f} s)"
            )
    result.seconds = time.perf_counter() - start
    return result


def distillation_loss(task_loss: torch.Tensor, outputs: torch.Tensor, teacher_outputs: torch.Tensor,
                      weight: float, temperature: float) -> torch.Tensor:
    """(1 - weight) * task loss + weight * T^2 * KL(softmax(teacher/T) || softmax(outputs/T)):
    the T^2 keeps the soft term's gradients on the scale of the hard one's."""
    soft = F.kl_div(F.log_softmax(outputs.float() / temperature, dim=1),
                    F.log_softmax(teacher_outputs.float() / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return (1 - weight) * task_loss + weight * temperature**2 * soft


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, progress: bool = False,
             balanced: bool = False) -> float | tuple[float, float]:
    """Top-1 accuracy in percent; the model's train/eval flag is restored afterwards.

    With `balanced`, returns (top-1, balanced accuracy): the mean over the classes present in
    the split of each class's recall (correct / samples of that class), in percent, which
    weighs a rare class as much as a common one."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.int64)
    per_class = hits = None
    seen = 0
    try:
        for inputs, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
            outputs = model(inputs.to(device, non_blocking=True))
            targets = targets.to(device)
            right = outputs.argmax(1) == targets
            correct += right.sum()
            seen += targets.numel()
            if balanced:
                classes = outputs.shape[1]
                counts = torch.bincount(targets, minlength=classes)
                found = torch.bincount(targets[right], minlength=classes)
                per_class = counts if per_class is None else per_class + counts
                hits = found if hits is None else hits + found
    finally:
        model.train(was_training)
    if seen == 0:
        raise ConfigError("cannot evaluate on an empty split")
    top1 = 100.0 * float(correct) / seen
    if not balanced:
        return top1
    present = per_class > 0
    recall = hits[present].double() / per_class[present].double()
    return top1, 100.0 * float(recall.mean())
