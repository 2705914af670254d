"""Models from libraries as depthcut models: `--model torchvision:resnet18`, `timm:...`, and
(Python API) Hugging Face encoders, `hf:bert`. Each library is one file (`torchvision.py`,
`timm.py`, `hf.py`) that says how it creates a model; naming, options, image sizes, weights,
sites and the build-time check are shared here and in `adapt`.

Optional: no library is required (and torchvision 0.28 does not import beside the CPU build of
torch 2.13 on this project's machines). A model is built randomly initialised (nothing is
downloaded), its classifier sized for the dataset, its activations made one module per site
(`adapt`). A local weights file can be loaded.

Image size. A model whose builder takes the image size (timm's `img_size`: ViT, DeiT, Swin,
MLP-Mixer, ...; torchvision's `image_size`: its ViTs) is built for the dataset's size (32 unless
told otherwise), keeping its own stem and patch size. Any other model (the CNNs) is built as the
library defines it and its stem adapted to small inputs: the first convolution becomes 3x3
stride 1, as in the papers' CIFAR models, where the model still runs so (tresnet's first
convolution follows a space-to-depth step, fastvit's stem has branches whose strides must agree:
their own stems are kept, with a warning). The model is then run once on a batch of zeros of
that size, so a model that cannot take it is refused with a `ConfigError` at build time, not
with a library's traceback during training.

Builder options follow the name after a second colon, as Python keyword arguments:
`timm:vit_tiny_patch16_224:patch_size=4` (a CIFAR-style ViT: a 32x32 image is 8x8 patches of
4x4 pixels, not 2x2 patches of 16x16), `timm:resnet18:drop_rate=0.1`. They are part of the
model's name, so a checkpoint rebuilds the same model. An option the builder sets itself
(timm's `mixer_s16_224` and torchvision's `vit_b_16` fix `patch_size`) is refused by name.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from depthcut.errors import ConfigError
from depthcut.models.adapt import (
    adapt_stem,
    check_runs,
    load_fitting_weights,
    modularize_functional,
    unshare_activations,
)
from depthcut.models.registry import ModelFamily, ModelSpec, register_family

DEFAULT_IMAGE_SIZE = 32  # what the papers' CIFAR models and the adapted stems are built for
# Builder arguments depthcut sets itself (classifier size, input channels, no download).
RESERVED_OPTIONS = frozenset({"num_classes", "in_chans", "pretrained", "weights",
                              "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                              "num_labels"})
CHECK_TOKENS = 8  # sequence length of the build-time check of a model reading token ids


@dataclass(frozen=True)
class Library:
    """What differs between libraries: `create(architecture, num_classes, in_channels,
    options)` builds a randomly initialised model (raising ImportError when the package is
    missing); `image_size_argument` is the builders' keyword for the image size (None: the
    models read token ids); `reads_images(architecture)` tells the two apart where a library
    has both (transformers: ViT reads images, BERT token ids; None: `image_size_argument`
    decides); `package` is what to install; `usage` how help names it."""

    name: str
    package: str
    create: Callable[[str, int, int, dict], nn.Module]
    image_size_argument: str | None = None
    usage: str | None = None
    reads_images: Callable[[str], bool] | None = None
    # The builder options a model reading token ids takes from a text dataset: (vocabulary
    # size, sequence length, padding id) -> options (the user's own options win).
    token_options: Callable[[int, int, int | None], dict] | None = None

    def takes_images(self, architecture: str) -> bool:
        if self.image_size_argument is None:
            return False
        return self.reads_images is None or self.reads_images(architecture)


LIBRARIES: dict[str, Library] = {}


def register_library(library: Library) -> ModelFamily:
    """Register `library` and its model family (every name `library.name:...`)."""
    family = register_family(ModelFamily(name=library.name, build=build_from_spec,
                                         prefix=f"{library.name}:", takes_image_size=True,
                                         usage=library.usage))
    LIBRARIES[library.name] = library
    return family


def parse_name(name: str) -> tuple[str, str, dict]:
    """`library:architecture[:key=value, ...]` -> (library, architecture, builder options).

    Values are Python literals (`4`, `0.1`, `True`, `(32, 32)`); a bare word is a string."""
    library, _, rest = name.partition(":")
    architecture, _, text = rest.partition(":")
    if library not in LIBRARIES or not architecture:
        raise ConfigError(f"--model {name}: expected torchvision:NAME, timm:NAME or hf:TYPE "
                          "(optionally followed by :key=value,...)")
    options = parse_options(name, text)
    reserved = sorted(RESERVED_OPTIONS & set(options))
    if reserved:
        raise ConfigError(f"--model {name}: depthcut sets {', '.join(reserved)} itself (the "
                          "classifier and input channels from the dataset, random init; a local "
                          "weights file loads with --weights FILE)")
    return library, architecture, options


def parse_options(name: str, text: str) -> dict:
    """Builder options `key=value, ...` after a model's name -> a dict. Values are Python
    literals (`4`, `0.1`, `True`, `(32, 32)`); a bare word is a string."""
    options: dict = {}
    if not text:
        return options
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args or any(
                k.arg is None for k in call.keywords):
            raise SyntaxError("only key=value pairs")
        for keyword in call.keywords:
            value = keyword.value
            options[keyword.arg] = (value.id if isinstance(value, ast.Name)
                                    else ast.literal_eval(value))
    except (SyntaxError, ValueError) as error:
        raise ConfigError(f"--model {name}: cannot read the options {text!r} as "
                          f"key=value,... of Python literals ({error})") from error
    return options


def missing_package(name: str, package: str, error: ImportError) -> ConfigError:
    return ConfigError(
        f"--model {name} needs the optional package {package}, which cannot be imported "
        f"here ({type(error).__name__}: {error}). PyPI's torchvision does not import beside "
        "the CPU build torch 2.13.0 that setup.sh installs, so use a separate environment: "
        "python3 -m venv venv-zoo && venv-zoo/bin/pip install torch==2.14.1 torchvision==0.29.1 "
        "timm==1.0.31 transformers && venv-zoo/bin/pip install --no-deps -e . "
        "(about 5.5 GB; docs/python-api.md)."
    )


def describe_options(options: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in options.items())


def create_sized(name: str, library: Library, architecture: str, num_classes: int,
                 in_channels: int, image_size: int, options: dict) -> tuple[nn.Module, bool]:
    """(model, whether its builder took the image size). A builder that does not know the
    image-size argument raises TypeError naming it: such a model is built without it."""
    argument = library.image_size_argument
    tried = {argument: image_size, **options}
    rng = torch.get_rng_state()
    try:
        try:
            return library.create(architecture, num_classes, in_channels, tried), True
        except TypeError as error:
            if argument not in str(error) or argument in options:
                raise
        torch.set_rng_state(rng)  # the same random init as a model built without the try
        tried = options
        return library.create(architecture, num_classes, in_channels, options), False
    except ImportError as error:
        raise missing_package(name, library.package, error) from error
    except (KeyError, ValueError, RuntimeError) as error:
        raise ConfigError(f"{library.name} has no model {architecture!r} ({error})") from error
    except (TypeError, AssertionError) as error:
        fixed = option_fixed_by_builder(error, options)
        if fixed is not None:
            raise ConfigError(
                f"--model {name}: {library.name}'s builder of {architecture!r} sets {fixed} "
                f"itself, so the option {fixed}={options[fixed]!r} cannot change it: leave it "
                f"out (the model keeps the {fixed} its name stands for) or choose a model "
                f"whose builder takes {fixed} as an option") from error
        raise ConfigError(f"{library.name} cannot build {architecture!r} with "
                          f"{describe_options(tried) or 'no options'} ({type(error).__name__}: "
                          f"{error})") from error


def option_fixed_by_builder(error: Exception, options: dict) -> str | None:
    """The user's option that the builder also passes itself (`got multiple values for keyword
    argument 'patch_size'`: timm's `mixer_s16_224`, torchvision's `vit_b_16` fix their patch
    size), or None. Such an option cannot be merged into the builder's own values without
    reaching into the library's private constructors, so it is refused by name instead."""
    found = re.search(r"got multiple values for (?:keyword )?argument '(\w+)'", str(error))
    return found.group(1) if found and found.group(1) in options else None


def reads_tokens(name: str) -> bool:
    """Whether the library model `name` reads token ids (a text dataset's), not images."""
    library_name, _, rest = name.partition(":")
    library = LIBRARIES.get(library_name)
    return (library is not None and library.token_options is not None
            and not library.takes_images(rest.partition(":")[0]))


def build_external(name: str, num_classes: int, in_channels: int,
                   weights: str | None = None, image_size: int | None = None,
                   defaults: dict | None = None) -> nn.Module:
    """`name` (library:architecture[:options]) built for `num_classes` classes of
    `in_channels` x `image_size` x `image_size` images (default 32x32; a model reading token
    ids ignores in_channels and refuses an image size), random init (or the shape-matching
    tensors of a local `weights` file), shared activations split, functional ones made
    modules, checked to run."""
    library_name, architecture, options = parse_name(name)
    options = {**(defaults or {}), **options}
    library = LIBRARIES[library_name]
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if not library.takes_images(architecture):
        if image_size is not None:
            raise ConfigError(f"--model {name} reads token ids, not {image_size}x{image_size} "
                              "images: use it on a text dataset")
        try:
            model, sized = library.create(architecture, num_classes, in_channels, options), True
        except ImportError as error:
            raise missing_package(name, library.package, error) from error
        example = torch.zeros(2, CHECK_TOKENS, dtype=torch.long)
    else:
        model, sized = create_sized(name, library, architecture, num_classes, in_channels,
                                    size, options)
        example = torch.zeros(2, in_channels, size, size)
    if weights:
        load_fitting_weights(model, weights)
    if not sized:
        model = adapt_stem(model, in_channels, example, f"--model {name}")
    model = modularize_functional(unshare_activations(model))
    check_runs(model, name, example)
    return model


def build_from_spec(spec: ModelSpec) -> nn.Module:
    """A library family's builder: the spec's classes, channels and image size (width and
    activation are the library's own)."""
    library = LIBRARIES[spec.name.partition(":")[0]]
    defaults = (library.token_options(spec.vocab_size, spec.max_len, spec.pad_id)
                if library.token_options is not None and spec.vocab_size is not None else None)
    return build_external(spec.name, spec.num_classes, spec.in_channels,
                          image_size=spec.image_size, defaults=defaults)
