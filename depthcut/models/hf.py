"""Hugging Face transformers as a family: `hf:MODEL_TYPE[:config options]` builds
`AutoModelForSequenceClassification` from `AutoConfig.for_model(MODEL_TYPE, **options)`
(random init, no download), wrapped to read token ids (N, T) and return logits (positions
0..T-1; an attention mask from the config's `pad_token_id`), or, for the vision types (ViT,
DeiT, ...), `AutoModelForImageClassification` reading images. E.g. `hf:bert:hidden_size=64,
num_hidden_layers=2,num_attention_heads=2,intermediate_size=256,vocab_size=1000,
max_position_embeddings=64`, `hf:vit:hidden_size=64,num_hidden_layers=2,num_attention_heads=2,
intermediate_size=128,patch_size=8`.

At build time transformers' activation modules become the torch modules they compute
(`GELUActivation` calls F.gelu: `sites.modularize_leaves` makes it an `nn.GELU`, a site that
hooks and `linearize` reach; GPT-2's NewGELU formula: `torch_activations`) and GPT-2's `Conv1D`
the `nn.Linear` it computes. transformers 5.x forwards do not trace with
torch.fx (mask building compares traced shapes; layers pass `**kwargs` and unpack tuples), so
`find_sites` lists the sites in registration order (forward order for these models) and `fold`
captures the forward with torch.export (`depthcut.fold.exported`): the MLP (dense -> GELU ->
dense) of a layer whose GELU is linear becomes one Linear.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from depthcut.errors import ConfigError
from depthcut.models.library import Library, describe_options, register_library
from depthcut.sites import is_rectifier, replace_module


class HFSequenceClassifier(nn.Module):
    """A transformers sequence classifier read as depthcut reads models: token ids (N, T) in,
    logits out. Position ids 0..T-1 and token types 0 (where the model has token types) are
    made here. Padding: with `pad_id` (the config's `pad_token_id`, an int) the model gets the
    attention mask `tokens != pad_id`, so padding is never attended to, and entropy counting
    (`depthcut.entropy`, which reads `pad_id`) leaves padded positions out; without one every
    token is attended to."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.token_types = bool(getattr(model.config, "type_vocab_size", 0))
        pad_id = getattr(model.config, "pad_token_id", None)
        self.pad_id = pad_id if isinstance(pad_id, int) and not isinstance(pad_id, bool) else None

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        extra = {"token_type_ids": torch.zeros_like(tokens)} if self.token_types else {}
        if self.pad_id is not None:
            extra["attention_mask"] = (tokens != self.pad_id).long()
        return self.model(input_ids=tokens, position_ids=positions, **extra).logits


class HFImageClassifier(nn.Module):
    """A transformers image classifier (ViT and kin): images (N, C, H, W) in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=images).logits


# transformers' activation modules that write a torch activation out as a formula, by class
# name: each is put back as that torch module, so it is a site (`find_sites`) that hooks and
# `linearize` reach. NewGELU (GPT-2) and FastGELU compute the tanh approximation by hand:
# nn.GELU("tanh") is the same function (within float rounding), swapped once, at build time.
# Those that call a functional rectifier (`GELUActivation` calls F.gelu) become modules by the
# general rule (`sites.modularize_leaves`, from `build_external`).
_TORCH_ACTIVATIONS = {
    "NewGELUActivation": lambda: nn.GELU(approximate="tanh"),
    "FastGELUActivation": lambda: nn.GELU(approximate="tanh"),
}


def _from_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def torch_activations(model: nn.Module) -> list[str]:
    """Replace transformers' activation modules by the torch modules they compute, in place
    (`_TORCH_ACTIVATIONS`); one module per place, as transformers builds them. Returns the
    names replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        make = _TORCH_ACTIVATIONS.get(type(module).__name__)
        if make is not None and _from_transformers(module):
            replace_module(model, name, make())
            replaced.append(name)
    return replaced


def linear_conv1d(model: nn.Module) -> list[str]:
    """Replace transformers' `Conv1D` (GPT-2's projections: `addmm(bias, x, weight)` with the
    weight stored (in, out)) by the `nn.Linear` it computes, in place, so the fold reads it as a
    linear op. Returns the names replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Conv1D" and _from_transformers(module):
            weight = module.weight.detach()
            linear = nn.Linear(weight.shape[0], weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(weight.t())
                linear.bias.copy_(module.bias.detach())
            replace_module(model, name, linear.to(weight.device))
            replaced.append(name)
    return replaced


def mark_attention_leaves(model: nn.Module) -> list[str]:
    """Mark each innermost transformers attention module (class name with "Attention", no such
    module inside, no rectifier inside) `depthcut_leaf`: traced as one call. Returns names."""
    def attention(module: nn.Module) -> bool:
        return ("Attention" in type(module).__name__
                and type(module).__module__.startswith("transformers."))

    marked = []
    for name, module in model.named_modules():
        inner = list(module.modules())[1:]
        if (attention(module) and not any(attention(m) for m in inner)
                and not any(is_rectifier(m) for m in inner)):
            module.depthcut_leaf = True
            marked.append(name)
    return marked


def reads_images(architecture: str) -> bool:
    """Whether transformers' model type `architecture` reads images (its config has an image
    size and channels: ViT, DeiT, ...) rather than token ids."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(architecture)
    except (KeyError, ValueError):
        return False
    return hasattr(config, "image_size") and hasattr(config, "num_channels")


def adapt(model: nn.Module) -> nn.Module:
    """transformers' model made readable by depthcut, in place: activations as torch modules
    (sites), GPT-2's Conv1D as nn.Linear, attention marked a leaf for torch.fx's partial
    reads. `fold` captures the whole forward with torch.export (`depthcut.fold.exported`)."""
    torch_activations(model)
    linear_conv1d(model)
    mark_attention_leaves(model)
    return model


def create(architecture: str, num_classes: int, in_channels: int, options: dict) -> nn.Module:
    """A randomly initialised classifier of model type `architecture`: a sequence classifier
    reading token ids (`in_channels` ignored), or an image classifier of `in_channels`
    channels for the vision types (`reads_images`; the image size is the `image_size`
    option)."""
    from transformers import (
        AutoConfig,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    images = reads_images(architecture)
    kind = "an image" if images else "a sequence"
    try:
        if images:
            config = AutoConfig.for_model(architecture, num_labels=num_classes,
                                          num_channels=in_channels, **options)
            model = AutoModelForImageClassification.from_config(config)
        else:
            config = AutoConfig.for_model(architecture, num_labels=num_classes, **options)
            model = AutoModelForSequenceClassification.from_config(config)
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise ConfigError(f"transformers cannot build {kind} classifier {architecture!r} "
                          f"with {describe_options(options) or 'no options'} "
                          f"({type(error).__name__}: {error})") from error
    adapt(model)
    return HFImageClassifier(model) if images else HFSequenceClassifier(model)


def token_options(vocab_size: int, max_len: int, pad_id: int | None) -> dict:
    """A text dataset's vocabulary, length and padding id as config options (`--model
    hf:bert` on fortunes-lang): the attention mask comes from `pad_token_id`."""
    return {"vocab_size": vocab_size, "max_position_embeddings": max_len,
            "pad_token_id": pad_id}


register_library(Library(name="hf", package="transformers", create=create,
                         image_size_argument="image_size", reads_images=reads_images,
                         token_options=token_options))
