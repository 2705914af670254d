"""A user's own network, as depthcut's "bring your own model" example loads it from this file:

    depthcut easier --model examples/mynet.py:MyNet --weights mynet.pt --weights-trained ...

Six conv/linear layers, one functional activation (`F.relu`) and a residual add: the shape of
model depthcut meets in the wild. Trained by `scripts/train_own_model.py` (plain PyTorch).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MyNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU()
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.act3 = nn.ReLU()
        self.conv4 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.act4 = nn.ReLU()
        self.conv5 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, bias=False)
        self.bn5 = nn.BatchNorm2d(4 * width)
        self.act5 = nn.ReLU()
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.stem(x)))
        x = x + self.act2(self.bn2(self.conv2(x)))  # a residual add
        x = self.act3(self.bn3(self.down(x)))
        x = x + self.act4(self.bn4(self.conv4(x)))
        x = self.act5(self.bn5(self.conv5(x)))
        return self.head(x.mean((2, 3)))
