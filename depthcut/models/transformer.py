"""The sequence transformer for text datasets (token ids in; Table 4 has no lr for it)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from depthcut.models.attention import init_transformer_weights, merge_heads, split_heads
from depthcut.models.parts import architecture_family, make_activation
from depthcut.models.registry import register_family

MASKED_SCORE = -1e4  # attention score of a padding key (fits float16 and bfloat16 too)


class SelfAttention(nn.Module):
    """Plain multi-head self-attention over (B, T, C) tokens, scores written out."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, padded: Tensor | None = None) -> Tensor:
        """`padded`: bool (B, 1, 1, T), True at padding keys, which then get no attention: their
        score becomes `MASKED_SCORE` (finite, so a row of padding only stays finite; exp of it
        underflows to 0 next to any real score)."""
        q, k, v = split_heads(self.qkv(x), self.heads)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if padded is not None:
            scores = scores.masked_fill(padded, MASKED_SCORE)
        return self.proj(merge_heads(scores.softmax(dim=-1) @ v))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + fc2(act(fc1(LN(x)))) (one site)."""

    def __init__(self, dim: int, heads: int, activation: str, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor, padded: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), padded)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TransformerEncoder(nn.Module):
    """Sequence classifier: token + learned position embeddings, pre-norm blocks, mean pool.

    Input: (batch, seq) int64 token ids with seq <= max_len. One site per block (its MLP
    activation, GELU by default); its input is (B, T, 4C), so entropy is counted per hidden
    feature over every token. `in_channels` is accepted for the common ModelSpec interface and
    ignored. Width scales the model dim (128 * width, rounded to a multiple of the heads).

    Padding: with `pad_id` set (text datasets: 0), tokens equal to it are padding. They get no
    attention (as keys) and are left out of the mean pooling, with tensor ops only (a mask
    `tokens == pad_id`, no data-dependent branch), so the model traces and folds as before;
    `depthcut.entropy.count_states` reads the same `pad_id` attribute and counts a site's
    states over the real tokens only. `pad_id=None` (default): every token is real.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        activation: str = "gelu",
        vocab_size: int = 1000,
        max_len: int = 64,
        depth: int = 4,
        heads: int = 4,
        dim: int = 128,
        pad_id: int | None = None,
    ) -> None:
        super().__init__()
        del in_channels  # token ids have no channels
        self.pad_id = pad_id
        dim = heads * max(1, round(dim * width / heads))
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(1, max_len, dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, activation) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position[:, : tokens.shape[1]]
        if self.pad_id is None:
            return self.head(self.norm(self.blocks(x)).mean(dim=1))
        padded = tokens == self.pad_id  # (B, T)
        for block in self.blocks:
            x = block(x, padded[:, None, None, :])
        keep = (~padded).unsqueeze(-1).type_as(x)  # (B, T, 1)
        pooled = (self.norm(x) * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


register_family(architecture_family("transformer", TransformerEncoder, reads_tokens=True))
