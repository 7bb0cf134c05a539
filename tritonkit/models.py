"""The seed tutorial's LeNet-style CNN, in plain torch.nn and on tritonkit's fused layers.

Both take (N, 3, 32, 32) images: conv 3->6 5x5, max-pool 2, conv 6->16 5x5, max-pool 2,
fc 400->120->84->10, ReLU after every layer but the last. They share parameter names, so either
loads the other's ``state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tritonkit.nn as tnn


class LeNet(torch.nn.Module):
    """The seed's network, exactly as the tutorial writes it (torch.nn layers, F.relu)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 5)
        self.pool = torch.nn.MaxPool2d(2, 2)
        self.conv2 = torch.nn.Conv2d(6, 16, 5)
        self.fc1 = torch.nn.Linear(16 * 5 * 5, 120)
        self.fc2 = torch.nn.Linear(120, 84)
        self.fc3 = torch.nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class TritonkitLeNet(torch.nn.Module):
    """The same network on ``tritonkit.nn``, with every ReLU fused into the layer before it."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = tnn.Conv2dReLU(3, 6, 5)
        self.pool = tnn.MaxPool2d(2, 2)
        self.conv2 = tnn.Conv2dReLU(6, 16, 5)
        self.fc1 = tnn.LinearReLU(16 * 5 * 5, 120)
        self.fc2 = tnn.LinearReLU(120, 84)
        self.fc3 = tnn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        x = torch.flatten(x, 1)
        return self.fc3(self.fc2(self.fc1(x)))
