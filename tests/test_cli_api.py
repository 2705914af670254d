"""The CLI's settings come from the config dataclasses, and it tells bad input from bugs."""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path

import pytest

import depthcut
from depthcut import cli, workflows
from depthcut.cli import build_parser, main
from depthcut.errors import ConfigError, DepthcutError
from depthcut.experiment import ExperimentConfig
from depthcut.methods.easier import EasierConfig
from depthcut.methods.layer_folding import LayerFoldingConfig
from depthcut.methods.rounds import PruningConfig
from depthcut.settings import build_config, defaults, experiment_config, fields_table, presets
from depthcut.train import TrainConfig

DEFAULTS, FIELDS, PRESETS = defaults(), fields_table(), presets()
CONFIGS = (ExperimentConfig, TrainConfig, EasierConfig, PruningConfig, LayerFoldingConfig)
# Dataclass fields no CLI setting maps to, on purpose.
NOT_SETTINGS = {
    (ExperimentConfig, "progress"),  # --no-progress, not a setting
    (TrainConfig, "label_smoothing"),  # the papers use none
    (PruningConfig, "remove_zero_entropy"),  # always on for the CLI's methods
}

# `depthcut easier --print-config` before the settings came from the dataclasses.
QUICK = {
    "activation": None, "amp": False, "batch_size": 128, "cache_dir": None,
    "channels_last": "auto", "data_root": "../shared/data", "dataset": "cifar10-jpeg",
    "decay_norm_and_bias": False, "delta": 1.0, "dense_checkpoint": None, "device": "auto",
    "entropy_mode": "eval", "entropy_variant": "paper", "epochs": 15, "finetune_epochs": 3,
    "finetune_lr": 0.02, "gamma": 0.1, "k": 1, "lam": 0.25, "lf_k": None, "lr": 0.1,
    "max_stages": 8,
    "methods": ["easier", "nepenthe", "egp", "imp", "layer-folding", "progressive"],
    "milestones": [80, 120], "model": "resnet18", "momentum": 0.9, "nesterov": True,
    "reallocate": "fixed", "rounds": 5, "schedule": "cosine", "seed": 0, "slope_epochs": 3,
    "slope_lr": 0.02, "temperature": 1.0, "theta": 0.99, "threshold": 0.9,
    "train_subset": None, "val_fraction": 0.1, "warmup_epochs": 0.0, "weight_decay": 0.0005,
    "width": 0.25, "zeta": 0.5,
    "choose": "entropy", "payoff_weight": 1.0, "payoff_cost": "macs", "choice_seed": 0,
    "latency_backend": "eager", "latency_budget": None, "latency_batch": 1,
    "dp_span": 8, "latency_table": None, "dp_importance": "entropy", "dp_verify": 4,
    "dp_merge": "macs",
    "metric": "top1",
    "distill": 0.0, "distill_temperature": 4.0, "progressive_epochs": 1, "first_step": 4,
    "max_sites": None, "blend": 0.5,
    "weights": None, "reset_head": False, "weights_trained": False,
    "optimizer": "sgd", "text_field": "text", "label_field": "label",
    "image_size": None, "skip_unreadable": False, "augment": None, "normalize": None,
}


def _value_at(instance: object, path: str) -> object:
    for name in path.split("."):
        instance = getattr(instance, name)
    return list(instance) if isinstance(instance, tuple) else instance


def _trainings(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if isinstance(getattr(cls(), f.name),
                                                                   TrainConfig)]


def test_every_setting_defaults_to_its_dataclass_fields():
    for key, targets in FIELDS.items():
        for cls, path in targets:
            places = [(cls(), path)]
            if cls is TrainConfig:  # a shared training setting: every training of every config
                places += [(c(), f"{t}.{path}") for c in CONFIGS for t in _trainings(c)]
            for instance, where in places:
                assert DEFAULTS[key] == _value_at(instance, where), (key, instance, where)


def test_every_dataclass_field_is_a_setting_or_left_out_on_purpose():
    mapped = {(cls, path.split(".")[0]) for targets in FIELDS.values() for cls, path in targets}
    mapped |= {(c, t) for c in CONFIGS for t in _trainings(c)}
    for cls in CONFIGS:
        for item in dataclasses.fields(cls):
            if cls is not TrainConfig and (cls, item.name) not in mapped:
                assert (cls, item.name) in NOT_SETTINGS, f"{cls.__name__}.{item.name}"
    trained = {path for targets in FIELDS.values() for cls, path in targets
               if cls is TrainConfig or "." in path}
    for item in dataclasses.fields(TrainConfig):
        assert (item.name in {p.split(".")[-1] for p in trained}
                or (TrainConfig, item.name) in NOT_SETTINGS), item.name


@pytest.mark.parametrize("command", ["easier", "nepenthe", "egp", "imp", "layer-folding",
                                     "compare"])
def test_quick_print_config_is_unchanged(command, capsys):
    assert main([command, "--print-config"]) == 0
    assert capsys.readouterr().out == json.dumps(QUICK, indent=2, sort_keys=True) + "\n"


def test_configs_are_built_from_the_settings_through_the_table():
    settings = cli.resolve_settings(build_parser().parse_args(
        ["compare", "--preset", "paper", "--model", "vgg16", "--momentum", "0.8",
         "--finetune-epochs", "4", "--slope-lr", "0.5", "--lf-k", "2", "--delta", "3",
         "--out", "x"]))
    experiment = experiment_config(settings, progress=False)
    assert (experiment.model, experiment.width, experiment.progress) == ("vgg16", 1.0, False)
    assert (experiment.dense.epochs, experiment.dense.lr) == (160, 0.01)
    assert experiment.dense.momentum == 0.8 and experiment.dense.milestones == (80, 120)
    easier = build_config(EasierConfig, settings)
    pruning = build_config(PruningConfig, settings)
    folding = build_config(LayerFoldingConfig, settings)
    assert easier.delta == pruning.delta == 3.0 and folding.k == 2
    for train in (easier.finetune, pruning.finetune, folding.finetune):
        assert (train.epochs, train.lr, train.momentum, train.schedule) == (
            4, 0.01, 0.8, "multistep")
    assert (folding.slope_training.epochs, folding.slope_training.lr) == (160, 0.5)
    assert folding.slope_training.decay_norm_and_bias is True


def test_presets_name_only_settings():
    for preset in PRESETS.values():
        assert set(preset) <= set(FIELDS)


def test_wrongly_typed_config_file_values_are_bad_input(tmp_path, capsys):
    config = tmp_path / "c.json"
    for values, message in (({"epochs": "ten"}, "epochs must be an integer, got 'ten'"),
                            ({"milestones": [1, "x"]}, "milestones must be a list of integers"),
                            ({"k": 1.5}, "k must be an integer"),
                            ({"amp": "yes"}, "amp must be true or false")):
        config.write_text(json.dumps(values))
        assert main(["easier", "--config", str(config), "--print-config"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    config.write_text(json.dumps({"lr": None, "finetune_lr": None, "width": 1, "max_stages": None,
                                  "channels_last": False, "methods": ["easier"]}))
    assert main(["compare", "--config", str(config), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["channels_last"] == "off"


def test_config_errors_are_value_errors():
    assert issubclass(ConfigError, DepthcutError) and issubclass(ConfigError, ValueError)


def test_a_bug_is_an_internal_error_with_its_traceback_in_a_file(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(workflows, "entropy_report", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["entropy", "--checkpoint", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    found = re.fullmatch(r"depthcut entropy: internal error: KeyError: 'boom' \(traceback "
                         r"written to (.+)\); please report it\n", err)
    assert found, err
    path = Path(found.group(1))
    assert path.parent == tmp_path and path.name.startswith("depthcut-traceback-")
    text = path.read_text()
    assert text.startswith("Traceback") and "in broken" in text and "KeyError: 'boom'" in text


def test_depthcut_errors_are_bad_input(tmp_path, capsys, monkeypatch):
    class NewError(DepthcutError):
        pass

    for error in (NewError("no such thing"), ConfigError("no such thing")):
        def raise_it(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(workflows, "fold_checkpoint", raise_it)
        assert main(["fold", "--checkpoint", "a.pt", "--out", str(tmp_path / "f.pt")]) == 2
        assert capsys.readouterr().err == "depthcut fold: error: no such thing\n"


def test_samples_must_be_positive(tmp_path, capsys):
    for argv in (["entropy", "--checkpoint", "none.pt"],
                 ["fold", "--checkpoint", "none.pt", "--out", str(tmp_path / "f.pt")],
                 ["heal", "--folded", "none.pt", "--out", str(tmp_path / "h.pt")]):
        assert main([*argv, "--samples", "0"]) == 2
        assert "--samples must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        depthcut.entropy_report("none.pt", samples=0)
    assert list(tmp_path.iterdir()) == []


def test_workflow_defaults_are_the_options_defaults():
    parser = build_parser()
    entropy = parser.parse_args(["entropy", "--checkpoint", "c.pt"])
    fold = parser.parse_args(["fold", "--checkpoint", "c.pt", "--out", "f.pt"])
    heal = parser.parse_args(["heal", "--folded", "f.pt", "--out", "h.pt"])
    assert (entropy.split, entropy.batch_size, entropy.device) == ("train", 512, "auto")
    assert (fold.policy, fold.batch_size, fold.device) == ("macs", 128, "cpu")
    assert (heal.epochs, heal.lr, heal.weight_decay, heal.seed, heal.batch_size,
            heal.device) == (1, 0.001, 5e-4, 0, 128, "cpu")
