"""The user's own model, weights and checkpoints: `--model file.py:factory` and
`package.module:factory`, `--weights` loaded strictly (one message, before any data is decoded),
`--reset-head`, `--weights-trained`, and `import-model` for entropy, fold and --dense-checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import write_fake_cifar10
from torch import nn

from depthcut.cli import main
from depthcut.errors import ConfigError
from depthcut.experiment import ExperimentConfig, prepare
from depthcut.models import ModelSpec, canonical_name
from depthcut.run import load_checkpoint
from depthcut.sites import find_sites
from depthcut.weights import WeightsError, check_before_data, read_weights

REPO = Path(__file__).resolve().parents[1]

MYNET = '''
import torch.nn.functional as F
from torch import nn


class MyNet(nn.Module):
    """Six layers: four convolutions (a residual add, one functional ReLU), pool, classifier."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.conv4 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.act4 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(x)))
        x = F.relu(self.conv3(y)) + x
        x = self.act4(self.conv4(x))
        return self.fc(self.pool(x).flatten(1))


def broken(num_classes):
    raise RuntimeError("no GPU, no model")


def not_a_model():
    return 3


def fixed_head(classes=7):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, classes))
'''

NETS = '''
from torch import nn


def make(num_classes, in_channels, hidden=8):
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes))
'''


def _user_module(tmp_path: Path) -> dict:
    namespace: dict = {}
    exec(compile(MYNET, str(tmp_path / "mynet.py"), "exec"), namespace)  # noqa: S102
    return namespace


@pytest.fixture
def user_files(tmp_path: Path) -> Path:
    """mynet.py, its state_dict (sd.pt, 10 classes; sd5.pt, 5 classes), fake CIFAR-10 data."""
    (tmp_path / "mynet.py").write_text(MYNET)
    namespace = _user_module(tmp_path)
    torch.manual_seed(0)
    torch.save(namespace["MyNet"]().state_dict(), tmp_path / "sd.pt")
    torch.save(namespace["MyNet"](num_classes=5).state_dict(), tmp_path / "sd5.pt")
    write_fake_cifar10(tmp_path / "data", train=80, test=30)
    return tmp_path


def depthcut_in(cwd: Path, *args: str, pythonpath: Path | None = None
                ) -> subprocess.CompletedProcess:
    """`python -m depthcut ARGS` run in folder `cwd` (this worktree's depthcut first)."""
    paths = [str(REPO), *([str(pythonpath)] if pythonpath else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}
    env.pop("DEPTHCUT_DIE_AT", None)
    return subprocess.run([sys.executable, "-m", "depthcut", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


FAST = ("--dataset", "cifar10", "--data-root", "data", "--cache-dir", "cache", "--device",
        "cpu", "--no-progress", "--max-stages", "1", "--finetune-epochs", "1",
        "--batch-size", "32")


def test_user_file_model_with_trained_weights_runs_end_to_end(user_files):
    ran = depthcut_in(user_files, "easier", "--model", "mynet.py:MyNet", "--weights", "sd.pt",
                      "--weights-trained", *FAST, "--out", "run")
    assert ran.returncode == 0, ran.stderr
    records = [json.loads(line) for line in (user_files / "run" / "records.jsonl").open()]
    assert [r["stage"] for r in records] == [0, 1]
    assert records[0]["epochs"] == 0 and records[0]["sites_total"] == 4  # F.relu is a site
    config = json.loads((user_files / "run" / "config.json").read_text())
    assert config["experiment"]["model"] == f"{user_files / 'mynet.py'}:MyNet"
    assert config["experiment"]["weights"] == str(user_files / "sd.pt")
    dense, info = load_checkpoint(user_files / "run" / "checkpoints" / "stage_00.pt")
    saved = torch.load(user_files / "sd.pt")
    assert all(torch.equal(dense.state_dict()[k], v) for k, v in saved.items())
    assert info["spec"].width == 1.0  # a width multiplier means nothing to the user's model
    # The checkpoint rebuilds the model from another folder (the file's absolute path).
    elsewhere = user_files / "elsewhere"
    elsewhere.mkdir()
    counted = depthcut_in(elsewhere, "entropy", "--checkpoint",
                          "../run/checkpoints/stage_01.pt", "--samples", "20",
                          "--data-root", "../data", "--cache-dir", "../cache",
                          "--no-progress")
    assert counted.returncode == 0, counted.stderr
    assert "1 site(s) linearized" in counted.stdout and "| act4 | 16 |" in counted.stdout


@pytest.mark.parametrize(("change", "said"), [
    ("rename", ["1 missing key(s) (in the model, not in the file): conv2.weight",
                "1 unexpected key(s) (in the file, not in the model): conv2.kernel"]),
    ("reshape", ["1 shape mismatch(es): conv3.weight (file [8, 8, 1, 1], model [8, 8, 3, 3])"]),
])
def test_weights_that_do_not_fit_are_one_paragraph_before_any_data(user_files, capsys, change,
                                                                    said):
    state = torch.load(user_files / "sd.pt")
    if change == "rename":
        state["conv2.kernel"] = state.pop("conv2.weight")
    else:
        state["conv3.weight"] = torch.zeros(8, 8, 1, 1)
    torch.save(state, user_files / "bad.pt")
    code = main(["easier", "--model", str(user_files / "mynet.py:MyNet"), "--weights",
                 str(user_files / "bad.pt"), "--dataset", "cifar10", "--data-root",
                 str(user_files / "no-such-folder"), "--out", str(user_files / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"depthcut easier: error: --weights {user_files / 'bad.pt'} does not "
                          f"fit model {user_files / 'mynet.py'}:MyNet (loaded strictly): ")
    assert err.count("\n") == 1 and all(text in err for text in said), err
    assert "not found" not in err and not (user_files / "run").exists()


def test_a_head_that_does_not_fit_needs_reset_head(user_files, capsys):
    flags = ["--model", str(user_files / "mynet.py:MyNet"), "--weights",
             str(user_files / "sd5.pt"), "--dataset", "cifar10", "--out", str(user_files / "r")]
    assert main(["easier", *flags, "--data-root", str(user_files / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert ("fc.weight (file [5, 16], model [10, 16]), fc.bias (file [5], model [10]). The "
            "classifier (fc.weight, fc.bias) is sized for the dataset's 10 classes: pass "
            "--reset-head to start it afresh.") in err
    config = ExperimentConfig(model=str(user_files / "mynet.py:MyNet"),
                              weights=str(user_files / "sd5.pt"), reset_head=True,
                              dataset="cifar10", data_root=str(user_files / "data"),
                              cache_dir=str(user_files / "cache"), device="cpu",
                              progress=False)
    prepared = prepare(config)
    assert prepared.reset_keys == ["fc.weight", "fc.bias"]
    loaded, saved = prepared.initial_model.state_dict(), torch.load(user_files / "sd5.pt")
    assert loaded["fc.weight"].shape == (10, 16)
    assert all(torch.equal(loaded[k], v) for k, v in saved.items() if not k.startswith("fc."))
    with pytest.raises(ConfigError, match="drop --weights-trained"):
        prepare(dataclasses.replace(config, weights_trained=True))
    # A head that would fit (the same class count) starts afresh too: a transfer between two
    # 10-class tasks must not keep the source's classifier.
    saved = {k: v + 1.0 if k.startswith("fc.") else v
             for k, v in torch.load(user_files / "sd.pt").items()}  # a trained source head
    torch.save(saved, user_files / "sd_source.pt")
    prepared = prepare(dataclasses.replace(config, weights=str(user_files / "sd_source.pt")))
    assert prepared.reset_keys == ["fc.weight", "fc.bias"]
    loaded = prepared.initial_model.state_dict()
    assert not torch.equal(loaded["fc.weight"], saved["fc.weight"])
    assert all(torch.equal(loaded[k], v) for k, v in saved.items() if not k.startswith("fc."))


def test_package_module_factory_imports_to_a_checkpoint_for_entropy_fold_and_runs(tmp_path):
    package = tmp_path / "code" / "mynets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(NETS))
    write_fake_cifar10(tmp_path / "data", train=80, test=30)
    sys.path.insert(0, str(tmp_path / "code"))
    try:
        model = ModelSpec(name="mynets.nets:make:hidden=6", num_classes=10).build()
    finally:
        sys.path.remove(str(tmp_path / "code"))
    assert model[0].out_channels == 6 and len(find_sites(model)) == 2
    torch.save({"epoch": 9, "state_dict": {f"module.{k}": v
                                           for k, v in model.state_dict().items()}},
               tmp_path / "trained.pt")  # a DDP training checkpoint
    imported = depthcut_in(tmp_path, "import-model", "--model", "mynets.nets:make:hidden=6",
                           "--weights", "trained.pt", "--dataset", "cifar10", "--data-root",
                           "data", "--cache-dir", "cache", "--out", "ckpt/mine.pt",
                           "--no-progress", pythonpath=tmp_path / "code")
    assert imported.returncode == 0, imported.stderr
    assert "Checkpoint saved to ckpt/mine.pt" in imported.stdout
    for command in (["entropy", "--checkpoint", "ckpt/mine.pt", "--samples", "20"],
                    ["fold", "--checkpoint", "ckpt/mine.pt", "--out", "folded.pt"]):
        done = depthcut_in(tmp_path, *command, "--cache-dir", "cache", "--no-progress",
                           pythonpath=tmp_path / "code")
        assert done.returncode == 0, done.stderr
    ran = depthcut_in(tmp_path, "easier", "--model", "mynets.nets:make:hidden=6",
                      "--dense-checkpoint", "ckpt/mine.pt", *FAST, "--out", "run",
                      pythonpath=tmp_path / "code")
    assert ran.returncode == 0, ran.stderr
    assert json.loads((tmp_path / "run" / "records.jsonl").open().readline())["epochs"] == 0


def test_a_plain_state_dict_as_dense_checkpoint_says_how_to_convert_it(user_files, capsys):
    assert main(["entropy", "--checkpoint", str(user_files / "sd.pt")]) == 2
    err = capsys.readouterr().err
    assert "is not a depthcut checkpoint" in err and "depthcut import-model" in err


@pytest.mark.parametrize(("name", "said"), [
    ("nope.py:MyNet", "the model file {root}/nope.py does not exist"),
    ("mynet.py:MyNot", "{root}/mynet.py has no 'MyNot' (it defines MyNet, broken, fixed_head, "
                       "not_a_model)"),
    ("mynet.py:broken", "broken(num_classes=10) from {root}/mynet.py raised RuntimeError: no "
                        "GPU, no model"),
    ("mynet.py:not_a_model", "not_a_model() returned a int, not a torch.nn.Module"),
    ("mynet.py:MyNet:num_classes=3", "depthcut passes num_classes itself"),
    ("mynet.py:MyNet:width=", "cannot read the options 'width='"),
    ("mynet.py:fixed_head", "the factory takes no num_classes parameter and its model gives 7 "
                            "outputs per input, the dataset has 10 classes"),
    ("no_such_pkg.nets:make", "no module 'no_such_pkg.nets' on the Python path"),
])
def test_user_model_errors_name_the_file_and_the_problem(user_files, name, said):
    with pytest.raises(ConfigError) as error:
        ModelSpec(name=canonical_name(str(user_files / name)) if ".py" in name else name
                  ).build()
    assert said.format(root=user_files) in str(error.value)


def test_a_word_before_a_colon_that_is_no_module_is_an_unknown_model():
    with pytest.raises(ConfigError, match="unknown model 'tim:resnet18'.*file.py:FACTORY"):
        ModelSpec(name="tim:resnet18").build()


def test_weights_files_in_their_usual_forms(tmp_path):
    state = {"a.weight": torch.ones(2), "a.bias": torch.zeros(2)}
    for payload in (state, {"model": state}, {"model_state_dict": state, "step": 3},
                    {f"module.{k}": v for k, v in state.items()}):
        torch.save(payload, tmp_path / "w.pt")
        assert read_weights(tmp_path / "w.pt").keys() == state.keys()
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")
    with pytest.raises(WeightsError, match="Save the model's state_dict, not the model"):
        read_weights(tmp_path / "pickled.pt")
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "nothing.pt")
    with pytest.raises(WeightsError, match="holds a dict of epoch, lr and no state_dict"):
        read_weights(tmp_path / "nothing.pt")
    with pytest.raises(WeightsError, match="does not exist"):
        read_weights(tmp_path / "missing.pt")


def test_safetensors_files_need_the_package(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\0" * 16)
    try:
        import safetensors  # noqa: F401
    except ImportError:
        with pytest.raises(WeightsError, match="pip install safetensors"):
            read_weights(tmp_path / "w.safetensors")
    else:
        with pytest.raises(WeightsError, match="not a readable safetensors file"):
            read_weights(tmp_path / "w.safetensors")


def test_depthcut_models_take_weights_too(tmp_path):
    model = ModelSpec(name="resnet18", width=0.25, num_classes=10).build()
    torch.save(model.state_dict(), tmp_path / "r.pt")
    state = check_before_data("resnet18", 0.25, None, "cifar10", str(tmp_path / "r.pt"), False)
    assert state.keys() == model.state_dict().keys()
    with pytest.raises(WeightsError, match=r"shape mismatch\(es\): conv1.weight"):
        check_before_data("resnet18", 0.5, None, "cifar10", str(tmp_path / "r.pt"), False)


def test_weights_settings_that_contradict_each_other(user_files):
    base = {"model": "resnet18", "dataset": "cifar10", "data_root": str(user_files / "nowhere")}
    for values, said in (({"weights_trained": True}, "need --weights FILE"),
                         ({"reset_head": True}, "need --weights FILE"),
                         ({"weights": "w.pt", "dense_checkpoint": "c.pt"},
                          "choose one of --weights and --dense-checkpoint")):
        with pytest.raises(ConfigError, match=said):
            prepare(ExperimentConfig(**base, **values))
