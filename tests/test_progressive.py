"""Progressive linearization: the blend, the distilled finetune, and the search (a stage beyond
delta is undone, the step halves, a resumed run goes on from the accepted weights)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from depthcut import stages
from depthcut.experiment import ExperimentConfig, resume_run, run_method
from depthcut.methods.progressive import Blend, ProgressiveConfig
from depthcut.run import read_records
from depthcut.sites import find_sites
from depthcut.train import TrainConfig, distillation_loss, train
from tests.helpers import write_fake_cifar10


def test_blend_goes_from_the_activation_to_the_identity():
    x = torch.linspace(-2, 2, 9)
    blend = Blend(nn.ReLU(inplace=True), ramp_steps=4)
    assert torch.equal(blend.eval()(x.clone()), F.relu(x))  # t = 0 before any training step
    blend.train()
    blend(x.clone())
    blend(x.clone())  # two training forwards: t = 2/4
    blend.eval()
    assert float(blend.t) == 0.5
    assert torch.allclose(blend(x.clone()), 0.5 * F.relu(x) + 0.5 * x)
    blend.train()
    for _ in range(5):
        blend(x.clone())
    assert float(blend.t) == 1.0 and torch.equal(blend.eval()(x.clone()), x)
    assert int(blend.state_dict()["steps"]) == 7  # the ramp survives an epoch snapshot


def test_distillation_loss_follows_its_formula():
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    task = torch.tensor(1.3)
    assert distillation_loss(task, student, teacher, 0.0, 4.0) == task
    temperature = 2.0
    p = F.softmax(teacher / temperature, dim=1)
    kl = (p * (p.log() - F.log_softmax(student / temperature, dim=1))).sum(1).mean()
    expected = 0.7 * task + 0.3 * temperature**2 * kl
    assert torch.allclose(distillation_loss(task, student, teacher, 0.3, temperature), expected)
    same = distillation_loss(task, teacher, teacher, 0.5, temperature)
    assert torch.allclose(same, 0.5 * task)  # nothing to learn from an identical teacher


def test_a_distilled_training_moves_the_student_to_the_teacher():
    torch.manual_seed(0)
    inputs, targets = torch.randn(64, 6), torch.randint(0, 3, (64,))
    teacher, student = nn.Linear(6, 3), nn.Linear(6, 3)
    loader = [(inputs[i:i + 16], targets[i:i + 16]) for i in range(0, 64, 16)]

    def gap() -> float:
        with torch.no_grad():
            return F.kl_div(F.log_softmax(student(inputs), 1), F.log_softmax(teacher(inputs), 1),
                            reduction="batchmean", log_target=True).item()

    before = gap()
    config = TrainConfig(epochs=20, lr=0.1, weight_decay=0, distill=1.0, distill_temperature=1.0)
    train(student, loader, config, progress=False, teacher=teacher)
    assert gap() < 0.1 * before
    with pytest.raises(Exception, match="distill"):
        TrainConfig(distill=1.5)


def linear_sites(model: nn.Module, total: int = 17) -> int:
    return total - len(find_sites(model))


def scripted_evaluate(model, loader, *, progress=False, balanced=False):
    """Validation and test scores by the number of linear sites: 50 with at most one, else 40
    (so two sites are beyond delta 1 and one is within)."""
    score = 50.0 if linear_sites(model) <= 1 else 40.0
    return (score, score) if balanced else score


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(stages, "evaluate", scripted_evaluate)  # every stage, dense included


def config(root) -> tuple[ExperimentConfig, ProgressiveConfig]:
    dense = TrainConfig(epochs=1, lr=0.05)
    return (ExperimentConfig(dataset="cifar10", data_root=str(root), width=0.0625, dense=dense,
                             batch_size=32, device="cpu", progress=False),
            ProgressiveConfig(first_step=2, finetune=TrainConfig(epochs=1, lr=0.01)))


def test_a_stage_beyond_delta_is_undone_and_the_step_halves(tmp_path, scripted):
    root = write_fake_cifar10(tmp_path / "data")
    experiment_config, method = config(root)
    result = run_method(experiment_config, "progressive", method, tmp_path / "run")
    records = result.records
    assert [len(r.chosen) for r in records[1:]] == [2, 1, 1]
    assert [r.within_delta for r in records[1:]] == [False, True, False]
    # Stage 2 starts again from the dense weights: the same entropies, so the first of stage
    # 1's pair; stage 3 builds on stage 2 (two sites linear again, one too many).
    assert records[2].entropy == records[1].entropy
    assert records[2].linearized == records[1].chosen[:1]
    assert records[3].linearized[:1] == records[2].linearized
    assert [r.get("next_step") for r in records[1:]] == [1, 1, 0]
    assert [r.get("continue_from") for r in records[1:]] == [0, None, 2]
    assert result.answer["stage"] == 2 and "delta 1.0" in result.stop_reason
    assert records[3].total_epochs == records[0].total_epochs + 3  # undone stages cost too


def test_a_run_resumed_after_an_undone_stage_goes_on_from_the_accepted_weights(
        tmp_path, scripted):
    root = write_fake_cifar10(tmp_path / "data")
    experiment_config, method = config(root)
    reference = tmp_path / "reference"
    run_method(experiment_config, "progressive", method, reference)
    stopped = tmp_path / "stopped"
    run_method(experiment_config, "progressive", ProgressiveConfig(
        first_step=2, max_stages=1, finetune=method.finetune), stopped)
    assert [r["within_delta"] for r in read_records(stopped)] == [True, False]
    settings = json.loads((stopped / "config.json").read_text())
    settings["progressive"]["max_stages"] = None  # as if it had been killed after stage 1
    (stopped / "config.json").write_text(json.dumps(settings))
    resume_run(stopped, progress=False)
    timing = {"seconds", "elapsed_s"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in read_records(stopped)]
    assert strip == [{k: v for k, v in r.items() if k not in timing}
                     for r in read_records(reference)]
    for stage in (2, 3):
        got = torch.load(stopped / f"checkpoints/stage_{stage:02d}.pt", weights_only=True)
        want = torch.load(reference / f"checkpoints/stage_{stage:02d}.pt", weights_only=True)
        for key, tensor in want["state_dict"].items():
            assert torch.equal(got["state_dict"][key], tensor), (stage, key)


def test_progressive_settings_are_checked():
    for bad in ({"first_step": 0}, {"blend": 0.0}, {"max_sites": 0}, {"delta": math.nan}):
        with pytest.raises(Exception, match=next(iter(bad))):
            ProgressiveConfig(**bad)
