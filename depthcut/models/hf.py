"""Hugging Face encoders as a family (Python API): `hf:MODEL_TYPE[:config options]` builds
`AutoModelForSequenceClassification` from `AutoConfig.for_model(MODEL_TYPE, **options)` (random
init, no download), wrapped to read token ids (N, T) and return logits; positions 0..T-1, no
padding mask (every token is attended to).

Plain torch.fx cannot trace transformers' self-attention (it star-unpacks a traced shape), so
each innermost attention module is marked `depthcut_leaf` and traced as one call (`graph`): it
holds no rectifier site, and the MLPs around the sites (dense -> GELU -> dense) stay visible to
`find_sites`, entropy counting, `linearize` and `fold`. E.g. `hf:bert:hidden_size=64,
num_hidden_layers=2,num_attention_heads=2,intermediate_size=256,vocab_size=1000,
max_position_embeddings=64`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from depthcut.errors import ConfigError
from depthcut.models.library import Library, describe_options, register_library
from depthcut.sites import is_rectifier


class HFSequenceClassifier(nn.Module):
    """A transformers sequence classifier read as depthcut reads models: token ids (N, T) in,
    logits out. Position ids 0..T-1 and token types 0 (where the model has token types) are
    made here: transformers would slice and expand its buffers by traced sizes, which does not
    trace. No attention mask, so every token is attended to."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.token_types = bool(getattr(model.config, "type_vocab_size", 0))

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        types = {"token_type_ids": torch.zeros_like(tokens)} if self.token_types else {}
        return self.model(input_ids=tokens, position_ids=positions, **types).logits


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


def create(architecture: str, num_classes: int, in_channels: int, options: dict) -> nn.Module:
    """A randomly initialised sequence classifier of model type `architecture` (token ids in:
    `in_channels` is ignored)."""
    del in_channels
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.for_model(architecture, num_labels=num_classes, **options)
        model = AutoModelForSequenceClassification.from_config(config)
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise ConfigError(f"transformers cannot build a sequence classifier {architecture!r} "
                          f"with {describe_options(options) or 'no options'} "
                          f"({type(error).__name__}: {error})") from error
    mark_attention_leaves(model)
    return HFSequenceClassifier(model)


register_library(Library(name="hf", package="transformers", create=create))
