"""`randomize_batchnorm`: what makes a fold check on an untrained model test its BatchNorms."""

from __future__ import annotations

import torch
from torch import nn

from depthcut.untrained import randomize_batchnorm


def test_batchnorms_get_seeded_statistics_and_affine_terms_in_eval_mode():
    def model():
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(),
                             nn.BatchNorm1d(4 * 9), nn.BatchNorm1d(2, affine=False),
                             nn.BatchNorm1d(3, track_running_stats=False)).train()

    first = randomize_batchnorm(model(), torch.Generator().manual_seed(1))
    again = randomize_batchnorm(model(), torch.Generator().manual_seed(1))
    assert not first.training
    bn2d, bn1d, plain, untracked = first[1], first[3], first[4], first[5]
    for bn in (bn2d, bn1d):
        assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert ((bn.running_var >= 0.5) & (bn.running_var < 1.5)).all()
        assert ((bn.weight >= 0.5) & (bn.weight < 1.5)).all()
        assert not torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert not torch.equal(plain.running_mean, torch.zeros(2))  # no affine terms: stats only
    assert untracked.running_mean is None and torch.equal(untracked.weight, torch.ones(3))
    for index in (1, 3, 4):  # the same generator seed, the same draws (the conv is unseeded)
        for a, b in zip(first[index].state_dict().values(), again[index].state_dict().values(),
                        strict=True):
            assert torch.equal(a, b)


def test_shift_scales_the_mean_and_bias():
    wide = randomize_batchnorm(nn.BatchNorm1d(64), torch.Generator().manual_seed(0), shift=1.0)
    narrow = randomize_batchnorm(nn.BatchNorm1d(64), torch.Generator().manual_seed(0), shift=0.1)
    assert torch.allclose(narrow.running_mean * 10, wide.running_mean)
    assert torch.allclose(narrow.bias * 10, wide.bias)
