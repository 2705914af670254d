"""The user's own model as a family: `--model path/to/file.py:factory[:key=value,...]` or
`--model package.module:factory[:key=value,...]`.

The factory (a function or a class) is called with the options after the second colon (Python
literals, read as for timm's: `mynet.py:MyNet:depth=6,dropout=0.1`) and, where its signature
names them, `num_classes` (the dataset's class count), `in_channels` (the images' channels)
and `image_size` (their side). It returns an `nn.Module`. Its shared activation modules are
split and its functional activations (`F.relu`, `torch.relu`, ...) made modules
(`adapt.unshare_activations`, `adapt.modularize_functional`): the parameter names stay those of
the user's model, so its own state_dict still loads. The model is then run once on zeros of the
data's shape.

A file is recorded by its absolute path (`canonical`), so a checkpoint rebuilds the model from
any folder (as long as the file stays there); a module must be importable (on PYTHONPATH).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from depthcut.errors import ConfigError
from depthcut.models.adapt import (
    ModelInputError,
    check_runs,
    modularize_functional,
    unshare_activations,
)
from depthcut.models.library import DEFAULT_IMAGE_SIZE, parse_options
from depthcut.models.registry import ModelFamily, ModelSpec, register_family
from depthcut.sites import SiteError

_IDENTIFIERS = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
FILE_NAME = re.compile(rf"^(?P<source>.+\.py):(?P<factory>{_IDENTIFIERS})(?::(?P<options>.*))?$")
MODULE_NAME = re.compile(rf"^(?P<source>{_IDENTIFIERS}):(?P<factory>{_IDENTIFIERS})"
                         r"(?::(?P<options>.*))?$")
# What depthcut passes itself, from the data, when the factory's signature names it.
DATA_ARGUMENTS = ("num_classes", "in_channels", "image_size")
USAGE = "path/to/file.py:FACTORY or package.module:FACTORY"
_LOADED: dict[Path, tuple[float, types.ModuleType]] = {}  # model files by path: (mtime, module)


def split_name(name: str) -> tuple[str, str, str] | None:
    """(source, factory, options text) of a user model's name; None if it is not one."""
    found = FILE_NAME.match(name) or MODULE_NAME.match(name)
    if found is None:
        return None
    return found["source"], found["factory"], found["options"] or ""


def accepts(name: str) -> bool:
    """A file, a dotted module path, or a plain module name that can be found: a plain word
    before a colon that is no module (`toy:small`) is an unknown model, not a missing module."""
    parts = split_name(name)
    if parts is None:
        return False
    source = parts[0]
    if source.endswith(".py") or "." in source:
        return True
    try:
        return importlib.util.find_spec(source) is not None
    except (ImportError, ValueError):
        return False


def canonical(name: str) -> str:
    """The name with a model file's path made absolute (a module's name stays as it is)."""
    source, _, rest = name.partition(".py:")
    if not rest or split_name(name) is None:
        return name
    return f"{Path(source + '.py').expanduser().resolve()}:{rest}"


def _load_file(path: Path, name: str) -> types.ModuleType:
    """Run the model file once (again if it changed); its folder is importable meanwhile, so
    it may import its neighbours."""
    if not path.is_file():
        raise ConfigError(f"--model {name}: the model file {path} does not exist")
    mtime = path.stat().st_mtime
    if path in _LOADED and _LOADED[path][0] == mtime:
        return _LOADED[path][1]
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_depthcut_user_model_{digest}_{stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - whatever the user's file raises
        sys.modules.pop(module_name, None)
        raise ConfigError(f"--model {name}: running the model file {path} raised "
                          f"{type(error).__name__}: {error}") from error
    finally:
        sys.path.remove(str(path.parent))
    _LOADED[path] = (mtime, module)
    return module


def _import_module(source: str, name: str) -> types.ModuleType:
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as error:
        if error.name and (source == error.name or source.startswith(f"{error.name}.")):
            raise ConfigError(
                f"--model {name}: no module {source!r} on the Python path (add its folder to "
                "PYTHONPATH; `python -m depthcut` also finds modules in the current folder), "
                "or give the file: --model path/to/file.py:FACTORY") from error
        raise ConfigError(f"--model {name}: importing {source} raised ModuleNotFoundError: "
                          f"{error}") from error
    except Exception as error:  # noqa: BLE001 - whatever the user's module raises
        raise ConfigError(f"--model {name}: importing {source} raised "
                          f"{type(error).__name__}: {error}") from error


def load_factory(name: str) -> tuple[Callable[..., nn.Module], str, dict]:
    """(factory, where it is, options) for a user model's name; ConfigError naming the file or
    module and what is wrong."""
    source, attribute, text = split_name(name)
    if source.endswith(".py"):
        path = Path(source).expanduser().resolve()
        module, where = _load_file(path, name), str(path)
    else:
        module, where = _import_module(source, name), source
    factory: object = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            defined = sorted(key for key, value in vars(module).items()
                             if callable(value) and not key.startswith("_")
                             and getattr(value, "__module__", None) == module.__name__)
            raise ConfigError(f"--model {name}: {where} has no {attribute!r} (it defines "
                              f"{', '.join(defined) or 'no functions or classes'})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"--model {name}: {attribute} in {where} is a "
                          f"{type(factory).__name__}, not a function or class")
    options = parse_options(name, text)
    reserved = sorted(set(DATA_ARGUMENTS) & set(options))
    if reserved:
        raise ConfigError(f"--model {name}: depthcut passes {', '.join(reserved)} itself, from "
                          "the dataset; drop them from the options")
    return factory, where, options


def data_arguments(factory: Callable, spec: ModelSpec) -> dict:
    """The data's class count, channels and image side, for the parameters the factory names."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C extension: nothing can be told
        return {}
    values = {"num_classes": spec.num_classes, "in_channels": spec.in_channels,
              "image_size": spec.image_size or DEFAULT_IMAGE_SIZE}
    return {key: value for key, value in values.items() if key in parameters}


def build_user_model(spec: ModelSpec) -> nn.Module:
    """Call the factory, make its activations one module per site, check it takes the data."""
    name = spec.name
    factory, where, options = load_factory(name)
    arguments = {**options, **data_arguments(factory, spec)}
    call = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    try:
        model = factory(**arguments)
    except Exception as error:  # noqa: BLE001 - whatever the user's factory raises
        raise ConfigError(f"--model {name}: {factory.__name__}({call}) from {where} raised "
                          f"{type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {name}: {factory.__name__}({call}) returned a "
                          f"{type(model).__name__}, not a torch.nn.Module")
    try:
        model = modularize_functional(unshare_activations(model))
    except SiteError as error:
        raise ConfigError(f"--model {name}: {error}") from error
    size = spec.image_size or DEFAULT_IMAGE_SIZE
    example = torch.zeros(2, spec.in_channels, size, size)
    check_runs(model, name, example)
    if "num_classes" not in arguments:
        _check_outputs(model, name, example, spec.num_classes)
    return model


def _check_outputs(model: nn.Module, name: str, example: torch.Tensor, classes: int) -> None:
    """A factory that takes no num_classes must give the dataset's class count itself."""
    training = model.training
    model.eval()
    with torch.no_grad():
        outputs = model(example)
    model.train(training)
    width = outputs.shape[-1] if isinstance(outputs, torch.Tensor) else None
    if width != classes:
        raise ModelInputError(
            f"--model {name}: the factory takes no num_classes parameter and its model gives "
            f"{width} outputs per input, the dataset has {classes} classes: add a num_classes "
            "parameter to the factory (depthcut passes the dataset's) or build the head to fit")


register_family(ModelFamily(name="user", build=build_user_model, accepts=accepts,
                            canonical=canonical, takes_image_size=True, takes_width=False,
                            usage=USAGE))
