"""What the attention models (swin-t, transformer) share: weight init and head reshapes."""

from __future__ import annotations

from torch import Tensor, nn


def init_transformer_weights(module: nn.Module) -> None:
    """Truncated-normal(0.02) linears and embeddings, unit LayerNorms: the usual ViT/Swin start."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)



def split_heads(x: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, T, 3C) from a qkv linear -> q, k, v each (B, heads, T, C / heads); no shape reads."""
    qkv = x.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(x: Tensor) -> Tensor:
    """(B, heads, T, C / heads) -> (B, T, C)."""
    return x.transpose(1, 2).flatten(2)


