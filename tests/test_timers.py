"""The latency backends: every timer is registered (also without its package or device) and
refuses clearly where it cannot run; onnxruntime times the exported model and catches a wrong
export; compile times the compiled one; `--latency-backend` reaches the fold command, the payoff
cost, the folded answer and the report's Table 3.

The end-to-end tests time on a fake backend whose time is a function of the ops in the module,
so what they check is decided by the test, not by the machine. No test asserts a time.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from depthcut import export
from depthcut.cli import build_parser, main
from depthcut.cost import TIMERS, Timer, get_timer, register_timer
from depthcut.errors import ConfigError
from depthcut.experiment import ExperimentConfig
from depthcut.fold import fold
from depthcut.methods.easier import EasierConfig
from depthcut.scorers import scorer_for
from depthcut.settings import build_config, experiment_config, resolve
from tests.helpers import TINY_RUN, one_thread, write_fake_cifar10  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ("eager", "onnxruntime", "compile", "cuda")
FAKE = "test-ops"


def conv_bn() -> tuple[nn.Module, Tensor]:
    """conv -> BN (statistics off their defaults) -> ReLU -> linear head, and a batch of 2."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0, generator=g)
        model[1].running_mean.uniform_(-1.0, 1.0, generator=g)
    return model, torch.randn(2, 3, 8, 8, generator=g)


def ops_in(module: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) for m in module.modules())


class OpsTimer(Timer):
    """Times nothing: a module takes 1 ms per conv, linear or BatchNorm; records the batch
    sizes it was given."""

    name = FAKE

    def __init__(self) -> None:
        self.batches: list[int] = []

    def prepare(self, model: nn.Module, example: Tensor) -> Callable[[], object]:
        self.batches.append(example.shape[0])
        seconds = 1e-3 * ops_in(model)
        return lambda: seconds

    def measure(self, call: Callable[[], object], device: torch.device, repeats: int = 15,
                warmup: int = 3) -> float:
        return float(call())


@pytest.fixture(scope="module")
def registered_fake() -> Iterator[OpsTimer]:
    """The fake backend, registered for this file's tests (so that the CLI lists it)."""
    timer = register_timer(OpsTimer())
    yield timer  # type: ignore[misc]
    TIMERS.pop(FAKE, None)


@pytest.fixture
def fake_timer(registered_fake: OpsTimer) -> OpsTimer:
    """The fake backend with no batches recorded yet."""
    registered_fake.batches.clear()
    return registered_fake


# Registration and refusals.


def test_every_backend_is_registered_and_listed_by_the_cli() -> None:
    assert tuple(TIMERS)[:len(BACKENDS)] == BACKENDS
    for name in BACKENDS:
        assert get_timer(name).name == name and name in get_timer(name).describe()
    parser = build_parser()
    for command in (["easier", "--out", "x"], ["compare", "--out", "x"],
                    ["report", "r", "--out", "x"], ["fold", "--checkpoint", "c", "--out", "f"]):
        for name in BACKENDS:
            args = parser.parse_args([*command, "--latency-backend", name])
            assert args.latency_backend == name
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "r", "--out", "x", "--latency-backend", "nope"])


def test_one_key_sets_the_experiment_and_the_choice_backend() -> None:
    settings = resolve("quick", flags={"latency_backend": "onnxruntime", "latency_batch": 128})
    assert experiment_config(settings).latency_backend == "onnxruntime"
    easier = build_config(EasierConfig, settings)
    assert (easier.latency_backend, easier.latency_batch) == ("onnxruntime", 128)
    with pytest.raises(ConfigError, match="unknown timer 'tpu'"):
        ExperimentConfig(latency_backend="tpu")


def test_onnxruntime_without_its_packages_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    model, x = conv_bn()
    with pytest.raises(ConfigError, match=r"pip install 'depthcut\[onnx\]'"):
        get_timer("onnxruntime").seconds(model, x)
    assert "not installed" in get_timer("onnxruntime").describe()


def test_onnxruntime_refuses_a_bare_callable() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with pytest.raises(ConfigError, match="exports an nn.Module"):
        get_timer("onnxruntime").prepare(lambda x: x + 1, torch.randn(1, 3))


def test_cuda_without_a_gpu_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, x = conv_bn()
    with pytest.raises(ConfigError, match="CUDA GPU and PyTorch sees none"):
        get_timer("cuda").seconds(model, x)
    with pytest.raises(ConfigError, match="choose another --latency-backend"):
        get_timer("cuda").measure(lambda: None, torch.device("cpu"))


def test_compile_failure_is_refused_clearly(monkeypatch) -> None:
    def broken(*args, **kwargs):
        def call(*inner, **inner_kwargs):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    model, x = conv_bn()
    with pytest.raises(ConfigError, match="could not compile Sequential here: RuntimeError: no "
                       "C\\+\\+ compiler found; choose another --latency-backend"):
        get_timer("compile").prepare(model, x)


# Timing on the real backends.


def test_onnxruntime_times_a_folded_model_it_checked() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, x = conv_bn()
    folded = fold(model, x)
    timer = get_timer("onnxruntime")
    call = timer.prepare(folded, x)
    [output] = call()
    torch.testing.assert_close(torch.from_numpy(output), folded(x), rtol=1e-4, atol=1e-4)
    seconds = timer.measure(call, x.device, repeats=3, warmup=1)
    assert math.isfinite(seconds) and seconds > 0
    assert f"{torch.get_num_threads()} threads" in timer.describe()
    assert not folded.training  # exported in eval mode, and left as it was


def test_onnxruntime_catches_a_wrong_export(monkeypatch) -> None:
    """An exporter that writes another function (the weights changed) is caught before any
    timing: the session's output is checked against PyTorch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    real = export.export_onnx

    def wrong_export(model, example, path, **kwargs):
        other = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in other.parameters():
                parameter.add_(1.0)
        return real(other, example, path, **kwargs)

    monkeypatch.setattr(export, "export_onnx", wrong_export)
    model, x = conv_bn()
    with pytest.raises(export.ExportError, match=r"export of \w+ does not reproduce "
                       "PyTorch .*differs from PyTorch by"):
        get_timer("onnxruntime").prepare(fold(model, x), x)


def test_compile_times_a_tiny_model() -> None:
    model, x = conv_bn()
    timer = get_timer("compile")
    try:
        call = timer.prepare(model, x)
    except ConfigError as refusal:  # no working inductor toolchain here
        pytest.skip(str(refusal))
    with torch.no_grad():  # as timed (another grad mode would compile again)
        torch.testing.assert_close(call(), model(x))
    seconds = timer.measure(call, x.device, repeats=3, warmup=1)
    assert math.isfinite(seconds) and seconds > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_events_time_a_copy_on_the_gpu() -> None:
    model, x = conv_bn()
    timer = get_timer("cuda")
    call = timer.prepare(model, x)
    assert call().device.type == "cuda" and next(model.parameters()).device.type == "cpu"
    seconds = timer.measure(call, x.device, repeats=3, warmup=1)
    assert math.isfinite(seconds) and seconds > 0
    assert torch.cuda.get_device_name() in timer.describe()


# --latency-backend end to end, on the fake backend.


def test_payoff_latency_cost_times_on_the_configs_backend_and_batch(fake_timer) -> None:
    from tests.test_payoff import BIG, one_stage

    record, _, _ = one_stage(choose="payoff", payoff_cost="latency", latency_backend=FAKE,
                             latency_batch=5)
    assert fake_timer.batches and set(fake_timer.batches) == {5}
    # One op fewer once BIG's block folds into one convolution: a saving, as the fake sees it.
    assert record["payoff"][BIG] > 0
    scorer = scorer_for(EasierConfig(choose="payoff", payoff_cost="latency",
                                     latency_backend=FAKE, latency_batch=5))
    assert (scorer.latency_backend, scorer.latency_batch) == (FAKE, 5)


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory, registered_fake: OpsTimer) -> Path:
    """A tiny EASIER run (two stages) whose folded answer was timed on the fake backend."""
    base = tmp_path_factory.mktemp("timed")
    root = write_fake_cifar10(base / "data")
    run = base / "run"
    assert main(["easier", "--dataset", "cifar10", "--data-root", str(root), "--out", str(run),
                 *TINY_RUN, "--latency-backend", FAKE]) == 0
    (run / "threads_at_run.txt").write_text(str(torch.get_num_threads()))
    return run


def test_the_folded_answer_is_timed_on_the_backend_beside_the_folded_dense_model(timed_run):
    folded = json.loads((timed_run / "folded_answer.json").read_text())
    assert folded["latency_backend"] == FAKE
    # the run's thread count (another test's fixture may change it before this one reads it)
    assert folded["latency_threads"] == int((timed_run / "threads_at_run.txt").read_text())
    # 1 ms per op: whole milliseconds, the BatchNorms gone once folded, the folded dense model
    # timed too (with the answer's linear site unfolded, at least as many ops).
    times = [folded[f"latency_ms_batch1_{form}"] for form in ("unfolded", "folded",
                                                               "dense_folded")]
    assert all(float(ms).is_integer() for ms in times), times
    assert times[0] > times[2] >= times[1] > 0
    assert folded["macs_dense_folded"] >= folded["macs_folded"]
    summary = (timed_run / "summary.md").read_text()
    assert f"Latency backend: {FAKE}" in summary and "the BN-folded dense model takes" in summary


def test_report_times_table3_on_the_backend_and_retimes_on_another(timed_run, fake_timer,
                                                                    tmp_path):
    def table3(backend: str) -> list[dict]:
        assert main(["report", str(timed_run), "--out", str(tmp_path / backend),
                     "--latency-backend", backend, "--no-progress"]) == 0
        with open(tmp_path / backend / "table3.csv") as handle:
            return list(csv.DictReader(handle))

    stages = table3(FAKE)
    threads = torch.get_num_threads()
    assert {s["latency backend"] for s in stages} == {f"{FAKE}, {threads} threads"}
    assert stages[0]["b1 vs dense"] == "1.000x" and stages[0]["b128 vs dense"] == "1.000x"
    assert set(fake_timer.batches) == {1, 128}
    assert float(stages[0]["ms b1 folded"]) < float(stages[0]["ms b1 unfolded"])
    report = (tmp_path / FAKE / "report.md").read_text()
    assert f"latency is the median on {FAKE} (PyTorch" in report
    timed = len(fake_timer.batches)
    assert table3(FAKE) == stages and len(fake_timer.batches) == timed  # cached
    eager = table3("eager")  # another backend: timed again
    assert {s["latency backend"] for s in eager} == {f"eager, {threads} threads"}
    assert len(fake_timer.batches) == timed
    table3(FAKE)
    assert len(fake_timer.batches) == 2 * timed


def test_fold_command_times_merges_on_the_backend(timed_run, fake_timer, tmp_path,
                                                  capsys) -> None:
    assert main(["fold", "--checkpoint", str(timed_run / "checkpoints" / "stage_01.pt"),
                 "--out", str(tmp_path / "f.pt"), "--policy", "latency",
                 "--latency-backend", FAKE, "--samples", "8", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "Fold report (policy latency)" in text and f"Merges timed on {FAKE}" in text
    assert fake_timer.batches and set(fake_timer.batches) == {8}


class TwoOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x + 1


class FakeSession:
    """An onnxruntime session stand-in that returns the given arrays."""

    def __init__(self, *outputs: torch.Tensor) -> None:
        self.outputs = [o.numpy() for o in outputs]

    def get_inputs(self):
        return [type("Input", (), {"name": "x"})()]

    def run(self, names, feeds):
        return self.outputs


def test_the_export_check_compares_every_output_not_only_the_first() -> None:
    x = torch.randn(2, 3)
    assert export.check_onnx_session(FakeSession(x * 2, x + 1), TwoOutputs(), x) == 0.0
    with pytest.raises(export.ExportError, match="output 1 differs from PyTorch by 1"):
        export.check_onnx_session(FakeSession(x * 2, x + 2), TwoOutputs(), x)
    with pytest.raises(export.ExportError, match="output 0 has shape"):
        export.check_onnx_session(FakeSession(x[:1] * 2, x + 1), TwoOutputs(), x)
