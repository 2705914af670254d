"""The user's weights file (`--weights FILE`): reading it, checking it against the model
strictly, and loading it, with an optional fresh classifier (`--reset-head`).

A weights file is a state_dict saved with `torch.save`, a dict holding one under
"state_dict", "model", "model_state_dict" or "module" (training checkpoints; a depthcut
checkpoint too), or a `.safetensors` file where the safetensors package is installed. A
"module." prefix on every key (DataParallel / DDP) is dropped. Loading is strict, like torch's
`load_state_dict(strict=True)`: every missing, unexpected or shape-mismatched key is reported in
one message. The classifier is found without knowing the model: the tensors whose shape changes
with the class count (the model built for n and for n + 1 classes). With `reset_head`, a
classifier whose shape does not fit the dataset keeps its fresh initialisation (as Hugging
Face's `ignore_mismatched_sizes`); every other tensor must still fit.

`check_before_data` builds the model for the shape a dataset's spec promises and checks the
file against it, so a wrong model file or weights file is reported before any data is decoded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from depthcut.data import dataset_spec
from depthcut.errors import ConfigError
from depthcut.models import ModelInputError, ModelSpec, takes_image_size

STATE_KEYS = ("state_dict", "model", "model_state_dict", "module")  # where checkpoints keep it
SHOWN = 4  # keys named per kind of problem in the message
GUESSED_CLASSES = 10  # the class count a model is first built for when the dataset does not fix it


class WeightsError(ConfigError):
    """A weights file that cannot be read or does not fit the model."""


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The state_dict in the weights file `path` (see the module's docstring for the forms)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"--weights {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise WeightsError(
                f"--weights {path} is a safetensors file and the safetensors package is not "
                "installed here: pip install safetensors, or save the state_dict with "
                "torch.save(model.state_dict(), 'weights.pt')") from error
        try:
            return load_file(str(path))
        except Exception as error:  # noqa: BLE001 - any failure means a bad file
            raise WeightsError(f"--weights {path} is not a readable safetensors file "
                               f"({type(error).__name__}: {error})") from error
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise WeightsError(
            f"--weights {path} cannot be read as tensors by torch.load(weights_only=True) "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Save the model's state_dict, not the model: torch.save(model.state_dict(), "
            "'weights.pt')") from error
    return _strip_prefix(_find_state_dict(payload, path))


def _is_state_dict(value: object) -> bool:
    return (isinstance(value, Mapping) and bool(value)
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()))


def _find_state_dict(payload: object, path: Path) -> dict[str, Tensor]:
    if _is_state_dict(payload):
        return dict(payload)
    if isinstance(payload, Mapping):
        for key in STATE_KEYS:
            if _is_state_dict(payload.get(key)):
                return dict(payload[key])
        keys = ", ".join(map(str, list(payload)[:8]))
        raise WeightsError(f"--weights {path} holds a dict of {keys} and no state_dict (a dict "
                           f"of tensors, alone or under {' / '.join(STATE_KEYS)})")
    raise WeightsError(f"--weights {path} holds a {type(payload).__name__}, not a state_dict "
                       "(a dict of parameter names to tensors)")


def _strip_prefix(state: dict[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """A DataParallel / DDP state_dict's keys without their "module." prefix."""
    if all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return state


@dataclass
class Fit:
    """How a state_dict fits a model: keys only the model has, keys only the file has, and
    keys whose shapes differ (key, file's shape, model's shape)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)


def compare(state: Mapping[str, Tensor], model: nn.Module, *, shapes: bool = True,
            skip: Sequence[str] = ()) -> Fit:
    """The fit of `state` to `model`'s state_dict; `skip`: keys whose shapes are not compared
    (the classifier, when the class count is not known yet)."""
    own = model.state_dict()
    fit = Fit(missing=[k for k in own if k not in state],
              unexpected=[k for k in state if k not in own])
    if shapes:
        fit.mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                          if k in state and k not in skip and state[k].shape != own[k].shape]
    return fit


def classifier_keys(model: nn.Module, spec: ModelSpec) -> list[str]:
    """The state keys whose shape depends on the class count (`model` is `spec` built): the
    head, found by building the model for one more class. None where the model ignores it."""
    with torch.random.fork_rng(devices=[]):
        other = dataclasses.replace(spec, num_classes=spec.num_classes + 1).build()
    wider = other.state_dict()
    return [key for key, value in model.state_dict().items()
            if key in wider and wider[key].shape != value.shape]


def _shape(shape: tuple) -> str:
    return f"[{', '.join(map(str, shape))}]"


def _listed(items: Sequence[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return f"{', '.join(items[:SHOWN])}{more}"


def describe(fit: Fit, path: str | Path, model: str, head: Sequence[str], classes: int | None
             ) -> str:
    """One paragraph naming what does not fit, and what to do."""
    parts = []
    if fit.missing:
        parts.append(f"{len(fit.missing)} missing key(s) (in the model, not in the file): "
                     f"{_listed(fit.missing)}")
    if fit.unexpected:
        parts.append(f"{len(fit.unexpected)} unexpected key(s) (in the file, not in the model): "
                     f"{_listed(fit.unexpected)}")
    if fit.mismatched:
        shapes = [f"{k} (file {_shape(a)}, model {_shape(b)})" for k, a, b in fit.mismatched]
        parts.append(f"{len(shapes)} shape mismatch(es): {_listed(shapes)}")
    text = (f"--weights {path} does not fit model {model} (loaded strictly): "
            f"{'; '.join(parts)}.")
    head_only = (bool(fit.mismatched) and not fit.missing and not fit.unexpected
                 and {k for k, _, _ in fit.mismatched} <= set(head))
    if head_only:
        text += (f" The classifier ({', '.join(head)}) is sized for the dataset's {classes} "
                 "classes: pass --reset-head to start it afresh.")
    else:
        text += (" Check that the weights were saved from this model (its state_dict(), built "
                 "with the same options after the name).")
    return text


def load_weights(model: nn.Module, spec: ModelSpec, state: Mapping[str, Tensor],
                 path: str | Path, *, reset_head: bool = False) -> list[str]:
    """Load `state` into `model` (built from `spec`) strictly; with `reset_head`, the classifier
    keeps its fresh initialisation, whether or not the file's would fit (a transfer between two
    tasks of the same class count must not reuse the source's head). Returns the keys left
    fresh."""
    head = classifier_keys(model, spec)
    fit = compare(state, model)
    reset = list(head) if reset_head else []
    if reset:  # the whole classifier (weight and bias) starts afresh together
        fit.mismatched = [m for m in fit.mismatched if m[0] not in head]
        fit.missing = [k for k in fit.missing if k not in head]
    if fit.missing or fit.unexpected or fit.mismatched:
        raise WeightsError(describe(fit, path, spec.name, head, spec.num_classes))
    model.load_state_dict({k: v for k, v in state.items() if k not in reset}, strict=False)
    return reset


def check_before_data(model: str, width: float, activation: str | None, dataset: str,
                      weights: str | None, reset_head: bool) -> dict[str, Tensor] | None:
    """Build `model` for the input `dataset`'s spec promises and check the weights file
    against it, before any data is decoded; returns the file's state_dict (None: no file).

    Where the dataset's files decide its image shape or class count, the model is built for
    3x32x32 images of 10 classes: a failure that only says the input does not fit, and the
    shapes of the file's tensors, then wait for the check after decoding."""
    spec_of_data = dataset_spec(dataset)
    if spec_of_data.kind != "images":  # a text model is sized by its vocabulary: checked
        return read_weights(weights) if weights else None  # once the texts are read
    shape, classes = spec_of_data.sample_shape, spec_of_data.num_classes
    size = shape[-1] if shape and takes_image_size(model) else None
    spec = ModelSpec(name=model, num_classes=classes or GUESSED_CLASSES,
                     in_channels=shape[0] if shape else 3, width=width,
                     activation=activation, image_size=size)
    try:
        with torch.random.fork_rng(devices=[]):
            built = spec.build()
    except ModelInputError:
        if shape is not None and classes is not None:
            raise
        return read_weights(weights) if weights else None
    if not weights:
        return None
    state = read_weights(weights)
    head = classifier_keys(built, spec)
    fit = compare(state, built, shapes=shape is not None,
                  skip=head if classes is None or reset_head else ())
    if fit.missing or fit.unexpected or fit.mismatched:
        raise WeightsError(describe(fit, weights, model, head, classes))
    return state
