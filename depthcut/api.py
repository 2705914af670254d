"""Every method on the model a user has: their `nn.Module`, their data, their training loop.

    import depthcut
    result = depthcut.easier(model, train_loader, val_loader, out="runs/mine")
    result.answer, result.answer_model, result.folded_model

`depthcut.<method>` exists for every registered method (`depthcut.methods.methods()`), all
with one shape: `run_on_model(method, model, train, val, ...)`. The model is taken as trained
(stage 0 is the model as given, evaluated); functional activations (`F.relu`) and activation
modules used in several places are converted into one module per place, keeping parameter
names, so the user's `state_dict` still loads into `result.answer_model`. Data are torch
`Dataset`s (batched and shuffled here, seeded) or the user's `DataLoader`s. Training is
depthcut's loop with the method's settings, or the user's own: `finetune(model, epochs)` and
`evaluate(model) -> score` (`depthcut.stages.TrainingHooks`). With `out`, the run directory is
the CLI's (config.json, records.jsonl, checkpoints, summary.md, the folded answer) and
`resume=True` goes on from it; without, a temporary folder holds the checkpoints.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from depthcut.errors import ConfigError
from depthcut.experiment import ExperimentConfig, Prepared, run_prepared
from depthcut.methods import MethodSpec, get_method
from depthcut.models.adapt import modularize_functional, unshare_activations
from depthcut.run import RunDir
from depthcut.settings import build_config, resolve
from depthcut.sites import find_sites
from depthcut.stages import MethodResult, TrainingHooks
from depthcut.train import prepare_model, resolve_device, seed_everything

Data = Dataset | DataLoader | Iterable


@dataclass
class OwnData:
    """Stands where a registered dataset's arrays stand: its name (summaries, reports)."""

    name: str


@dataclass
class OwnSplits:
    """The user's loaders in the shape the stage loop reads (`depthcut.data.DataSplits`):
    training batches, unaugmented training batches for entropy counting, validation and test."""

    dataset: OwnData
    train: Iterable
    train_eval: Iterable
    val: Iterable | None
    test: Iterable | None


def as_loader(data: Data | None, batch_size: int, *, shuffle: bool, seed: int
              ) -> Iterable | None:
    """A user's data as batches of (inputs, targets): a Dataset is batched here (shuffled with
    a seeded generator for training); a DataLoader or any iterable of batches is used as is."""
    if data is None or isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)
    if isinstance(data, Iterable):
        return data
    raise ConfigError(f"data must be a torch Dataset, a DataLoader or batches of (inputs, "
                      f"targets), got {type(data).__name__}")


def one_module_per_site(model: nn.Module) -> nn.Module:
    """`model` with one activation module per place: functional calls become modules and an
    activation module used twice is split (parameter names unchanged); as it is when it
    already has that shape."""
    converted = modularize_functional(unshare_activations(model))
    find_sites(converted)  # a model with no rectifier, or one that cannot be traced: say why
    return converted


def method_settings(spec: MethodSpec, config: object | None, preset: str,
                    settings: Mapping[str, Any] | None) -> object:
    """The method's config: `config` as given, or the `preset` with flat `settings` (the CLI's
    option names, e.g. {"delta": 0.5, "finetune_epochs": 2})."""
    if config is not None:
        if settings:
            raise ConfigError("give the method's settings as config=... or as settings=..., "
                              "not both")
        return spec.settings_or_defaults(config)
    return build_config(spec.config, resolve(preset, flags=dict(settings or {})))


def run_on_model(
    method: str | MethodSpec,
    model: nn.Module,
    train: Data,
    val: Data | None = None,
    *,
    test: Data | None = None,
    entropy_data: Data | None = None,
    config: object | None = None,
    preset: str = "quick",
    settings: Mapping[str, Any] | None = None,
    finetune: Callable[[nn.Module, int], object] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    name: str = "own data",
    batch_size: int = 128,
    device: str = "auto",
    metric: str = "top1",
    seed: int = 0,
    progress: bool = True,
) -> MethodResult:
    """Run `method` (a registered method's name) on a trained `model`.

    `train`, `val`, `test`: Datasets or DataLoaders of (inputs, targets). `val` feeds the stop
    rule (or give `evaluate`); without `test` no test score is recorded and the folded answer
    is checked on `val`. `entropy_data`: unaugmented batches to count neuron states on
    (default: `train` as given). `config` (the method's config dataclass) or `preset` +
    `settings` (flat settings by the CLI's option names) set the method. `finetune(model,
    epochs)` / `evaluate(model) -> score` replace depthcut's training / validation scoring.
    `out`: the run directory (default: a temporary one, removed at the end); `resume`: go on
    from the run in `out` (pass the same dense model). Returns the method's result with
    `answer_model` and `folded_model`.
    """
    spec = method if isinstance(method, MethodSpec) else get_method(method)
    if spec.reference:
        raise ConfigError(f"{spec.name} is the comparison's reference, not a method to run on "
                          "a model")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch nn.Module, got {type(model).__name__}")
    method_config = method_settings(spec, config, preset, settings)
    if val is None and evaluate is None:
        raise ConfigError(f"{spec.label}'s stop rule compares validation scores with the dense "
                          "model's: pass val= (a Dataset or DataLoader) or evaluate=")
    resolved = resolve_device(device)
    seed_everything(seed)
    dense = prepare_model(one_module_per_site(model), resolved, channels_last=False).eval()
    train_loader = as_loader(train, batch_size, shuffle=True, seed=seed)
    splits = OwnSplits(
        dataset=OwnData(name),
        train=train_loader,
        train_eval=as_loader(entropy_data, batch_size, shuffle=False, seed=seed) or train_loader,
        val=as_loader(val, batch_size, shuffle=False, seed=seed),
        test=as_loader(test, batch_size, shuffle=False, seed=seed))
    example = next(iter(splits.val or splits.train))
    inputs = example[0] if isinstance(example, (tuple, list)) else example
    experiment = ExperimentConfig(dataset=name, data_root=None, model=type(model).__name__,
                                  seed=seed, device=device, batch_size=batch_size,
                                  metric=metric, progress=progress, channels_last="off")
    prepared = Prepared(
        splits=splits, spec=None, device=resolved, dense_model=dense,
        dense_info={"spec": None, "linearized": [], "extra": {}},
        template=copy.deepcopy(dense).cpu(),
        hooks=TrainingHooks(finetune=finetune, evaluate=evaluate))
    extra = {"input_shape": list(inputs.shape[1:]),
             "own_model": {"class": f"{type(model).__module__}.{type(model).__qualname__}",
                           "finetune": _name_of(finetune), "evaluate": _name_of(evaluate)}}
    with tempfile.TemporaryDirectory(prefix="depthcut-run-") as scratch:
        run_dir = RunDir(out if out is not None else Path(scratch) / "run",
                         overwrite=overwrite, resume=resume)
        return run_prepared(experiment, spec, method_config, run_dir, prepared, extra,
                            resume=resume, run_start=time.perf_counter())


def _name_of(function: Callable | None) -> str | None:
    return None if function is None else getattr(function, "__qualname__", repr(function))


def method_function(name: str) -> Callable[..., MethodResult]:
    """`depthcut.<name>`: `run_on_model` bound to the method `name` (`easier`, `egp`, ...)."""
    spec = get_method(name)

    def run(model: nn.Module, train: Data, val: Data | None = None, **kwargs: Any
            ) -> MethodResult:
        return run_on_model(spec, model, train, val, **kwargs)

    run.__name__ = run.__qualname__ = spec.name
    run.__doc__ = (f"{spec.label} on your own model and data: "
                   f"`run_on_model({spec.name!r}, model, train, val, ...)`.\n\n"
                   + (run_on_model.__doc__ or ""))
    return run


__all__ = ["OwnSplits", "as_loader", "method_function", "one_module_per_site", "run_on_model"]
