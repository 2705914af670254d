"""`--optimizer sgd|adam|adamw` (sgd unchanged step for step) and the transfer presets, checked
against EASIER Table 4's transfer rows."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from depthcut.cli import build_parser, main, resolve_settings
from depthcut.errors import ConfigError
from depthcut.experiment import ExperimentConfig
from depthcut.methods.easier import EasierConfig
from depthcut.methods.layer_folding import LayerFoldingConfig
from depthcut.methods.rounds import PruningConfig
from depthcut.settings import build_config, experiment_config
from depthcut.train import TrainConfig, make_optimizer, train


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def with_gradients(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    return model


def stepped(config: TrainConfig, steps: int = 2) -> list[torch.Tensor]:
    """The parameters after `steps` steps of `make_optimizer`, on the same gradients."""
    model = with_gradients(small_model())
    optimizer = make_optimizer(model, config)
    for _ in range(steps):
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def sgd_before_the_optimizer_setting(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """`make_optimizer` as it was before `optimizer` existed (the reference for sgd)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.decay_norm_and_bias:
        groups = [{"params": trainable, "weight_decay": config.weight_decay}]
    else:
        groups = [{"params": [p for p in trainable if p.dim() > 1],
                   "weight_decay": config.weight_decay},
                  {"params": [p for p in trainable if p.dim() <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0)


@pytest.mark.parametrize("decay_all", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_is_unchanged_step_for_step(decay_all, nesterov):
    config = TrainConfig(lr=0.1, weight_decay=5e-4, nesterov=nesterov,
                         decay_norm_and_bias=decay_all)
    assert config.optimizer == "sgd"
    reference = with_gradients(small_model())
    optimizer = sgd_before_the_optimizer_setting(reference, config)
    for _ in range(2):
        optimizer.step()
    for ours, theirs in zip(stepped(config), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_adam_and_adamw_step_otherwise_than_sgd():
    base = small_model()
    start = [p.detach().clone() for p in base.parameters()]
    after = {name: stepped(TrainConfig(lr=1e-3, weight_decay=0.0, optimizer=name), steps=1)
             for name in ("sgd", "adam", "adamw")}
    assert not all(torch.equal(a, s) for a, s in zip(after["adam"], after["sgd"], strict=True))
    # Adam's first step is lr times the gradient's sign (m / sqrt(v) = g / |g|), whatever |g|.
    model = with_gradients(small_model())
    for before, now, grad in zip(start, after["adam"], (p.grad for p in model.parameters()),
                                 strict=True):
        torch.testing.assert_close(before - now, 1e-3 * grad.sign(), rtol=1e-4, atol=1e-7)
    for adam, adamw in zip(after["adam"], after["adamw"], strict=True):  # no decay: the same
        torch.testing.assert_close(adam, adamw)


def test_adamw_decouples_weight_decay_and_adam_adds_it_to_the_gradient():
    """With zero gradients, AdamW only shrinks each weight by lr * wd of itself; Adam sees the
    decay as the gradient wd * w and steps lr against its sign, whatever its size."""
    lr, wd = 0.01, 0.1
    for name in ("adam", "adamw"):
        model = small_model()
        weight = model[0].weight
        before = weight.detach().clone()
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        make_optimizer(model, TrainConfig(lr=lr, weight_decay=wd, optimizer=name)).step()
        if name == "adamw":
            torch.testing.assert_close(weight.detach(), before * (1 - lr * wd))
        else:
            torch.testing.assert_close(weight.detach(), before - lr * before.sign(), rtol=1e-4,
                                       atol=1e-6)
        assert torch.equal(model[1].weight.detach(), torch.ones(8))  # no decay on norms


def test_adam_ignores_momentum_and_nesterov():
    optimizer = make_optimizer(small_model(), TrainConfig(optimizer="adam", momentum=0.5,
                                                          nesterov=True))
    assert isinstance(optimizer, torch.optim.Adam)
    assert all(group["betas"] == (0.9, 0.999) and "momentum" not in group
               for group in optimizer.param_groups)
    assert isinstance(make_optimizer(small_model(), TrainConfig(optimizer="adamw")),
                      torch.optim.AdamW)
    with pytest.raises(ConfigError, match="optimizer must be one of sgd, adam, adamw"):
        TrainConfig(optimizer="lion")


def test_training_with_adam_learns():
    torch.manual_seed(0)
    inputs = torch.randn(64, 4)
    targets = (inputs[:, 0] > 0).long()
    batches = [(inputs[i : i + 16], targets[i : i + 16]) for i in range(0, 64, 16)]
    model = small_model()
    result = train(model, batches, TrainConfig(epochs=5, lr=0.01, optimizer="adam",
                                               schedule="constant"), progress=False)
    assert result.epochs[-1].loss < result.epochs[0].loss


def test_optimizer_setting_reaches_every_training():
    settings = resolve_settings(build_parser().parse_args(
        ["compare", "--optimizer", "adamw", "--out", "x"]))
    trainings = [experiment_config(settings).dense,
                 build_config(EasierConfig, settings).finetune,
                 build_config(PruningConfig, settings).finetune,
                 build_config(LayerFoldingConfig, settings).slope_training]
    assert {t.optimizer for t in trainings} == {"adamw"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["easier", "--optimizer", "rmsprop", "--out", "x"])


# --- the transfer presets -------------------------------------------------------------------

# EASIER Table 4 (appendix A): every model, the same row per dataset group.
TABLE_4 = {
    # Flowers-102, DTD, Aircraft: 50 epochs, batch 16, Adam, lr 1e-4, weight decay 0
    "transfer-adam": {"epochs": 50, "batch_size": 16, "optimizer": "adam", "lr": 1e-4,
                      "weight_decay": 0.0, "schedule": "constant"},
    # PACS, VLCS: 30 epochs, batch 16, SGD momentum 0.9, lr 1e-3, milestone 24, drop 0.1,
    # weight decay 5e-4
    "transfer-sgd": {"epochs": 30, "batch_size": 16, "optimizer": "sgd", "momentum": 0.9,
                     "lr": 1e-3, "schedule": "multistep", "milestones": [24], "gamma": 0.1,
                     "weight_decay": 5e-4},
}


def printed(capsys, *argv: str) -> dict:
    assert main([*argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("preset", TABLE_4)
@pytest.mark.parametrize("model", ["resnet18", "vgg16", "swin-t"])
def test_transfer_presets_follow_table_4(preset, model, capsys):
    settings = printed(capsys, "compare", "--preset", preset, "--model", model)
    row = TABLE_4[preset]
    assert {key: settings[key] for key in row} == row  # the same for every model
    epochs = row["epochs"]
    assert settings["finetune_epochs"] == settings["slope_epochs"] == epochs
    assert settings["finetune_lr"] == settings["slope_lr"] == row["lr"]
    assert settings["max_stages"] is None and settings["rounds"] is None
    assert settings["progressive_epochs"] == epochs // 4 and settings["width"] == 1.0


@pytest.mark.parametrize("command", ["easier", "nepenthe", "egp", "imp", "layer-folding",
                                     "progressive"])
def test_every_method_takes_the_transfer_presets(command, capsys):
    for preset in TABLE_4:
        settings = printed(capsys, command, "--preset", preset)
        assert settings["optimizer"] == TABLE_4[preset]["optimizer"]


def test_transfer_preset_configs_and_flags_winning(capsys):
    settings = resolve_settings(build_parser().parse_args(
        ["easier", "--preset", "transfer-adam", "--out", "x"]))
    experiment = experiment_config(settings)
    finetune = build_config(EasierConfig, settings).finetune
    assert isinstance(experiment, ExperimentConfig) and experiment.batch_size == 16
    for training, epochs in ((experiment.dense, 50), (finetune, 50)):
        assert (training.optimizer, training.lr, training.epochs, training.weight_decay,
                training.schedule) == ("adam", 1e-4, epochs, 0.0, "constant")
    flags = printed(capsys, "easier", "--preset", "transfer-sgd", "--lr", "0.01",
                    "--optimizer", "adamw")
    assert (flags["lr"], flags["finetune_lr"], flags["optimizer"]) == (0.01, 0.01, "adamw")
