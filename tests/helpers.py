"""Helpers shared by several test files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, so folding them is really
    tested; returns the model in eval mode."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.5)
    return model.eval()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models on shared cores: one intra-op thread is far faster than two fighting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
