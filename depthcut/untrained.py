"""An untrained model made a real test of folding: a freshly built BatchNorm (mean 0, variance 1,
weight 1, bias 0) folds into its neighbour as the identity would, so a fold check on random
weights would not see a wrong BatchNorm merge. Tests, the zoo and the benchmarks randomize them
first, with this one function."""

from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, generator: torch.Generator,
                        shift: float = 0.5) -> nn.Module:
    """Give every BatchNorm that tracks statistics a random running mean (normal, sd `shift`)
    and variance (uniform in [0.5, 1.5)), and random affine terms where it has them (weight
    uniform in [0.5, 1.5), bias normal with sd `shift`), drawn from `generator` in module
    order; returns `model` in eval mode (the statistics are what eval mode folds)."""
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if module.running_mean is None:
            continue
        n = module.num_features
        module.running_mean.copy_(torch.randn(n, generator=generator) * shift)
        module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
        if module.weight is not None:
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * shift)
    return model.eval()
