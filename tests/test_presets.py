"""Presets (paper = EASIER Table 4 per architecture), --print-config, and the settings flags."""

import json

import pytest
import torch
from torch import nn

from depthcut.cli import build_parser, main, resolve_settings
from depthcut.methods.easier import EasierConfig
from depthcut.methods.rounds import PruningConfig
from depthcut.settings import build_config, defaults, experiment_config, presets
from depthcut.train import TrainConfig, make_optimizer

DEFAULTS, PRESETS = defaults(), presets()


def _easier_config(settings: dict) -> EasierConfig:
    return build_config(EasierConfig, settings)


def _pruning_config(settings: dict) -> PruningConfig:
    return build_config(PruningConfig, settings)


def _train_config(settings: dict, epochs: int, lr: float) -> TrainConfig:
    return build_config(TrainConfig, settings, epochs=epochs, lr=lr)


def printed_config(capsys, *argv: str) -> dict:
    assert main([*argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def settings_of(*argv: str) -> dict:
    return resolve_settings(build_parser().parse_args([*argv, "--out", "unused"]))


def test_paper_preset_follows_table_4_for_swin_t(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = printed_config(capsys, "easier", "--preset", "paper", "--model", "swin-t",
                              "--data-root", str(tmp_path / "no-such-data"))
    assert settings["lr"] == 0.001 and settings["weight_decay"] == 1e-4
    assert settings["decay_norm_and_bias"] is True
    assert settings["finetune_lr"] == 0.001 and settings["slope_lr"] == 0.001
    assert settings["milestones"] == [80, 120] and settings["epochs"] == 160
    assert list(tmp_path.iterdir()) == []  # nothing written, no data needed, no --out


@pytest.mark.parametrize("model, lr", [("resnet18", 0.1), ("mobilenetv2", 0.1),
                                       ("vgg16", 0.01), ("swin-t", 0.001),
                                       ("transformer", 0.1)])
def test_paper_learning_rate_per_architecture(model, lr):
    settings = settings_of("easier", "--preset", "paper", "--model", model)
    assert settings["lr"] == settings["finetune_lr"] == settings["slope_lr"] == lr


def test_explicit_lr_wins_over_the_paper_rate(capsys):
    settings = printed_config(capsys, "easier", "--preset", "paper", "--model", "vgg16",
                              "--lr", "0.05")
    assert settings["lr"] == settings["finetune_lr"] == 0.05
    settings = printed_config(capsys, "easier", "--preset", "paper", "--model", "vgg16",
                              "--finetune-lr", "0.003")
    assert (settings["lr"], settings["finetune_lr"]) == (0.01, 0.003)


def test_config_file_lr_wins_and_null_means_table_4(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lr": 0.02}))
    assert settings_of("easier", "--preset", "paper", "--config", str(config))["lr"] == 0.02
    config.write_text(json.dumps({"lr": None, "model": "vgg16"}))
    assert settings_of("easier", "--config", str(config))["lr"] == 0.01


def test_quick_preset_shows_no_decay_on_norm_and_bias(capsys):
    assert PRESETS["quick"]["decay_norm_and_bias"] is False
    settings = printed_config(capsys, "easier")
    assert settings["decay_norm_and_bias"] is False and settings["lr"] == 0.1
    assert settings["weight_decay"] == 5e-4


def test_decay_norm_bias_flag_overrides_the_preset():
    assert settings_of("easier", "--decay-norm-bias")["decay_norm_and_bias"] is True
    paper = settings_of("easier", "--preset", "paper", "--no-decay-norm-bias")
    assert paper["decay_norm_and_bias"] is False
    train = _train_config(paper, 3, 0.1)
    assert train.decay_norm_and_bias is False and train.weight_decay == 1e-4
    assert _train_config(settings_of("easier", "--preset", "paper"), 3, 0.1).decay_norm_and_bias


@pytest.mark.parametrize("command", ["easier", "nepenthe", "egp", "imp", "layer-folding",
                                     "compare"])
def test_every_method_command_prints_its_config(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = printed_config(capsys, command, "--preset", "paper", "--model", "vgg16")
    assert settings["lr"] == 0.01 and settings["model"] == "vgg16"
    assert set(settings) == set(DEFAULTS) | set(PRESETS["paper"])
    assert list(tmp_path.iterdir()) == []


def test_printed_config_is_a_valid_config_file(capsys, tmp_path):
    settings = printed_config(capsys, "nepenthe", "--preset", "paper", "--model", "swin-t")
    config = tmp_path / "c.json"
    config.write_text(json.dumps(settings))
    assert printed_config(capsys, "nepenthe", "--config", str(config)) == settings


def test_print_config_reports_bad_values(capsys):
    assert main(["easier", "--delta", "-1", "--print-config"]) == 2
    assert "delta" in capsys.readouterr().err


def conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4, 2))


def test_make_optimizer_decays_every_parameter_when_asked():
    model = conv_bn()
    optimizer = make_optimizer(model, TrainConfig(weight_decay=1e-4, decay_norm_and_bias=True))
    assert len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 1e-4
    ids = {id(p) for p in group["params"]}
    assert {id(model[0].bias), id(model[1].weight), id(model[1].bias)} <= ids
    assert ids == {id(p) for p in model.parameters()}


def test_make_optimizer_default_spares_norm_and_bias():
    model = conv_bn()
    assert TrainConfig().decay_norm_and_bias is False
    decay, no_decay = make_optimizer(model, TrainConfig(weight_decay=1e-4)).param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[3].bias)}


def test_train_config_without_the_new_field_still_loads():
    saved = TrainConfig(epochs=2).to_dict()
    del saved["decay_norm_and_bias"]  # a config.json written before the field existed
    assert TrainConfig(**saved).decay_norm_and_bias is False


def test_decay_on_every_parameter_shrinks_batchnorm_weight():
    model = conv_bn()
    for flag, changed in ((False, False), (True, True)):
        model[1].weight.data.fill_(1.0)
        optimizer = make_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.5, momentum=0.0,
                                                      decay_norm_and_bias=flag))
        optimizer.zero_grad()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        assert (model[1].weight.data < 1.0).all().item() is changed


def test_channels_last_choices():
    assert DEFAULTS["channels_last"] == "auto"
    assert settings_of("easier")["channels_last"] == "auto"
    for value in ("on", "off", "auto"):
        assert settings_of("easier", "--channels-last", value)["channels_last"] == value
    assert settings_of("easier", "--no-channels-last")["channels_last"] == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["easier", "--channels-last", "yes", "--out", "x"])
    settings = settings_of("easier", "--channels-last", "off")
    assert experiment_config(settings, progress=False).channels_last == "off"


def test_legacy_boolean_channels_last_in_config_file(tmp_path):
    config = tmp_path / "c.json"
    for value, expected in ((True, "on"), (False, "off"), (None, "auto")):
        config.write_text(json.dumps({"channels_last": value}))
        assert settings_of("easier", "--config", str(config))["channels_last"] == expected


def test_entropy_variant_and_reallocate_flags():
    assert (DEFAULTS["entropy_variant"], DEFAULTS["reallocate"]) == ("paper", "fixed")
    for variant in ("paper", "easier-code", "egp-code"):
        settings = settings_of("easier", "--entropy-variant", variant)
        assert _easier_config(settings).entropy_variant == variant
        for command in ("nepenthe", "egp", "imp"):
            settings = settings_of(command, "--entropy-variant", variant)
            assert _pruning_config(settings).entropy_variant == variant
    for command in ("nepenthe", "egp", "compare"):
        settings = settings_of(command, "--reallocate", "recompute")
        assert _pruning_config(settings).reallocate == "recompute"
    compare = settings_of("compare", "--entropy-variant", "egp-code")
    assert _easier_config(compare).entropy_variant == "egp-code"
    assert _pruning_config(compare).entropy_variant == "egp-code"
    assert _pruning_config(settings_of("egp")).reallocate == "fixed"
    with pytest.raises(SystemExit):  # IMP allocates by magnitude: nothing to re-allocate
        build_parser().parse_args(["imp", "--reallocate", "recompute", "--out", "x"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["layer-folding", "--entropy-variant", "paper", "--out", "x"])


def test_new_keys_may_come_from_a_config_file(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"entropy_variant": "easier-code", "reallocate": "recompute",
                                  "channels_last": "on", "decay_norm_and_bias": True}))
    settings = settings_of("nepenthe", "--config", str(config))
    assert (settings["entropy_variant"], settings["reallocate"], settings["channels_last"],
            settings["decay_norm_and_bias"]) == ("easier-code", "recompute", "on", True)


def test_entropy_mode_help_does_not_claim_the_authors_code(capsys):
    with pytest.raises(SystemExit):
        main(["easier", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "BatchNorm batch statistics" in text and "train = the EASIER" not in text
    assert "--entropy-variant" in text and "--print-config" in text
    assert "--decay-norm-bias" in text and "{on,off,auto}" in text
