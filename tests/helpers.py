"""Helpers shared by several test files.

Randomized tests take the `seed` fixture (import `seed_fixture` from here to get it): a fresh
seed each run, or the one in the environment variable DEPTHCUT_TEST_SEED, so that a failure can
be replayed. The seed is printed (pytest shows it with a failure's captured output, or for every
test with `-rA`) and is part of every failure message: "seed 123: replay with
DEPTHCUT_TEST_SEED=123". Replay one test with
`DEPTHCUT_TEST_SEED=123 python -m pytest tests/test_fold.py::test_name`. The fixture also seeds
torch's global generator for the test (restored afterwards), so models initialized from it are
replayed too.
"""

from __future__ import annotations

import copy
import os
import pickle
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from depthcut.untrained import randomize_batchnorm  # noqa: F401 - the tests import it from here

SEED_VARIABLE = "DEPTHCUT_TEST_SEED"


@dataclass(frozen=True)
class Seed:
    """One test's seed; str() says how to replay it."""

    value: int

    def __str__(self) -> str:
        return f"seed {self.value}: replay with {SEED_VARIABLE}={self.value}"

    def random(self) -> random.Random:
        return random.Random(self.value)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.value)


def draw_seed() -> Seed:
    """$DEPTHCUT_TEST_SEED if set, else a fresh random seed."""
    text = os.environ.get(SEED_VARIABLE, "").strip()
    return Seed(int(text) if text else random.SystemRandom().randrange(2**31))


@pytest.fixture(name="seed")
def seed_fixture() -> Iterator[Seed]:
    """A replayable seed (see the module docstring); torch's global generator is seeded with it
    for the duration of the test."""
    drawn = draw_seed()
    print(f"random test {drawn}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(drawn.value)
        yield drawn


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, context: object = "", *,
                   rel: float = 1e-5) -> None:
    """`actual` equals `expected` elementwise to within `rel` of expected's largest magnitude
    (float32 rounding of a float64 merge), via torch.testing.assert_close; `context` (a Seed,
    a trial, ...) is appended to the failure message."""
    scale = float(expected.abs().max()) or 1.0

    def message(text: str) -> str:
        return f"{text}\n{context}"

    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=message)


def relative_deviation(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return float((actual - expected).abs().max() / expected.abs().max())


def border_reference(model: nn.Module, merges: list) -> nn.Module | None:
    """A copy of `model` computing what fold's border-approximate merges compute, layer by layer.

    A merged conv A∘B reads the zero-padded input of A with padding p_A + p_B s_A: where B read
    zero padding, the merge reads A evaluated beyond the border of A's output (its bias and the
    edge pixels), and no zeros. In each chain of convolutions merged approximately (`merges`:
    a FoldReport's), the first conv therefore gets the merged padding and the others none.
    None when a chain also holds a parallel or bias merge (a skip or a constant would have to
    be extended too).
    """
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    order = {name: index for index, name in enumerate(modules)}
    taken = [(m.rule, set(m.replaces), m.exact) for m in merges if m.taken]
    chains = [(index, names) for index, (_, names, exact) in enumerate(taken) if not exact]
    for index, chain in chains:
        if any(chain < other for _, other in chains):
            continue  # a later merge extended this chain
        if any(rule != "sequential" and names <= chain for rule, names, _ in taken[:index]):
            return None  # merged before, so inside the chain
        convs = sorted((n for n in chain if isinstance(modules.get(n), nn.Conv2d)),
                       key=order.__getitem__)
        padding = (0, 0)
        for name in reversed(convs):
            conv = modules[name]
            padding = tuple(p + s * t for p, s, t in zip(conv.padding, conv.stride, padding,
                                                         strict=True))
            conv.padding = (0, 0)
        modules[convs[0]].padding = padding
    return reference


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models on shared cores: one intra-op thread is far faster than two fighting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_splits():
    """Splits of 64 random 1x8x8 images in 2 classes (16 test), for quick method runs."""
    from depthcut.data import ImageDataset, make_splits

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (64,), generator=generator)
    images = torch.randint(0, 255, (64, 1, 8, 8), generator=generator, dtype=torch.uint8)
    dataset = ImageDataset(
        name="tiny", train_inputs=images, train_labels=labels, test_inputs=images[:16],
        test_labels=labels[:16], classes=["a", "b"], mean=(0.5,), std=(0.25,), crop_padding=1,
        flip=False)
    return make_splits(dataset, val_fraction=0.25, batch_size=16, eval_batch_size=32, seed=0)


def write_fake_cifar10(root: Path, train: int = 160, test: int = 60) -> Path:
    """torchvision's pickle layout with random pixels, so the real loader path is exercised."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_batch = train // 5
    for index in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / f"data_batch_{index}").write_bytes(pickle.dumps(batch))
    batch = {b"data": rng.integers(0, 256, (test, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, test).tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return root


def run_depthcut(*args: str, die_at: str | None = None) -> subprocess.CompletedProcess:
    """`python -m depthcut ARGS` in a subprocess, one thread; `die_at` sets the kill point
    (DEPTHCUT_DIE_AT, see depthcut/faults.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DEPTHCUT_DIE_AT", None)
    if die_at:
        env["DEPTHCUT_DIE_AT"] = die_at
    return subprocess.run([sys.executable, "-m", "depthcut", *args], env=env,
                          capture_output=True, text=True, timeout=300)


# The smallest run the CLI tests share: a ResNet-18 x0.0625, one epoch, one stage, on CPU.
TINY_RUN = ["--width", "0.0625", "--epochs", "1", "--finetune-epochs", "1", "--max-stages", "1",
            "--batch-size", "32", "--device", "cpu", "--no-progress"]


def tiny_world(base: Path) -> dict:
    """A fake CIFAR-10 in `base`/data, a finished tiny EASIER run in `base`/run (for its
    checkpoints), and a file where a folder belongs (`base`/afile)."""
    from depthcut.cli import main

    root = write_fake_cifar10(base / "data")
    run = base / "run"
    assert main(["easier", "--dataset", "cifar10", "--data-root", str(root), "--out", str(run),
                 *TINY_RUN]) == 0
    (base / "afile").write_text("not a folder")
    return {"root": root, "run": run, "base": base}


def easier_args(world: dict, *extra: str, out: str = "out", data: Path | None = None
                ) -> list[str]:
    """`depthcut easier` arguments for a tiny run on `world`'s data into `world`/`out`."""
    data = data if data is not None else world["root"]
    return ["easier", "--dataset", "cifar10", "--data-root", str(data), "--out",
            str(world["base"] / out), *TINY_RUN, *extra]


class MacsTimer:
    """A timer without noise for tests (registered by the `macs_timer` fixture as "test-macs"):
    1 us per call, 0.1 us per leaf module called (depthcut's own private helpers aside: the
    wrappers that cut and feed segments) and 1 ns per multiply-add; `calls` counts the modules
    it prepared."""

    name = "test-macs"

    def __init__(self) -> None:
        self.calls = 0

    def prepare(self, model, example):
        from depthcut.cost import count_macs

        self.calls += 1
        leaves = []

        def count(module, inputs, output):
            if not list(module.children()) and not type(module).__name__.startswith("_"):
                leaves.append(module)

        handle = torch.nn.modules.module.register_module_forward_hook(count)
        try:
            macs = count_macs(model, example)
        finally:
            handle.remove()
        seconds = 1e-6 + 1e-7 * len(leaves) + macs * 1e-9

        def call():
            return model(example)

        call.seconds = seconds
        return call

    def measure(self, call, device, repeats: int = 15, warmup: int = 3) -> float:
        return call.seconds

    def seconds(self, model, example, repeats: int = 15, warmup: int = 3) -> float:
        return self.measure(self.prepare(model, example), example.device)


@pytest.fixture(name="macs_timer")
def macs_timer_fixture() -> Iterator[MacsTimer]:
    """The noiseless `MacsTimer`, registered while the test runs."""
    from depthcut.cost import TIMERS, Timer, register_timer

    class Registered(MacsTimer, Timer):
        pass

    timer = register_timer(Registered())
    yield timer
    del TIMERS[timer.name]
