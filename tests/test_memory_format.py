"""The memory-format rule keeps training off oneDNN's broken channels_last strided 1x1 kernel.

The gradient test runs depthcut's own preparation and training loop in a subprocess with
ONEDNN_MAX_CPU_ISA=AVX2, so an AVX-512 machine runs the AVX2 kernels that have the bug (there,
channels_last gives weight gradients off by up to 99% with two threads and a crash with one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from depthcut.memory_format import choose_memory_format, normalize_setting, risky_convs
from tests.helpers import write_fake_cifar10

CPU = torch.device("cpu")


def shortcut_model(in_channels: int, kernel: int = 1, stride: int = 2) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, in_channels, 3, padding=1),
                         nn.Conv2d(in_channels, 32, kernel, stride))


@pytest.mark.parametrize(("channels", "kernel", "stride", "risky"), [
    (4, 1, 2, True), (15, 1, 2, True), (16, 1, 2, False), (4, 3, 2, False), (4, 1, 1, False),
])
def test_risky_convs_are_strided_1x1_with_few_input_channels(channels, kernel, stride, risky):
    assert risky_convs(shortcut_model(channels, kernel, stride)) == (["1"] if risky else [])


def test_auto_chooses_contiguous_only_where_needed():
    risky, safe = shortcut_model(4), shortcut_model(16)
    assert not choose_memory_format(risky, CPU, "auto").channels_last
    assert choose_memory_format(safe, CPU, "auto").channels_last
    assert not choose_memory_format(safe, torch.device("cuda"), "auto").channels_last
    assert not choose_memory_format(safe, CPU, "off").channels_last
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_memory_format(safe, CPU, "on").channels_last  # no warning: safe
    with pytest.warns(RuntimeWarning, match="issue 6035"):
        assert choose_memory_format(risky, CPU, "on").channels_last
    assert normalize_setting(None) == "auto" and normalize_setting(True) == "on"
    assert normalize_setting(False) == "off"
    with pytest.raises(ValueError, match="auto, on, off"):
        normalize_setting("yes")


GRADIENTS = textwrap.dedent("""
    import sys, torch
    from depthcut.experiment import ExperimentConfig, prepare
    from depthcut.train import TrainConfig, prepare_model, seed_everything, train
    root, setting, out = sys.argv[1:4]
    config = ExperimentConfig(dataset="cifar10", data_root=root, model="resnet18", width=0.0625,
                              batch_size=32, device="cpu", channels_last=setting, progress=False)
    prepared = prepare(config)
    seed_everything(0)
    model = prepare_model(prepared.spec.build(), prepared.device, prepared.channels_last)
    steps = []
    def keep():
        steps.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None and p.dim() == 4})
    train(model, prepared.splits.train, TrainConfig(epochs=1, lr=0.05), progress=False,
          after_step=keep)
    torch.save({"channels_last": prepared.channels_last,
                "reason": prepared.memory_format.reason, "steps": steps}, out)
""")


def train_gradients(root, setting: str, out) -> dict:
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", GRADIENTS, str(root), setting, str(out)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(out, weights_only=False)


def test_training_gradients_match_the_contiguous_format(tmp_path):
    """ResNet-18 x0.0625 has 1x1 stride-2 shortcuts with 4 and 8 input channels."""
    root = write_fake_cifar10(tmp_path / "data")
    auto = train_gradients(root, "auto", tmp_path / "auto.pt")
    reference = train_gradients(root, "off", tmp_path / "off.pt")
    assert auto["channels_last"] is False, auto["reason"]
    assert len(auto["steps"]) == len(reference["steps"]) == 4
    for step, (got, expected) in enumerate(zip(auto["steps"], reference["steps"], strict=True)):
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name, s=step: f"step {s} {n}: {m}")
