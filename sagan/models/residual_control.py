"""The paper's control for self-attention (Zhang et al. 2019, table 1): a residual block at the same place."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sagan.models.attention import AttentionLayer
from sagan.models.layers import apply_spectral_norm


class ResidualControl2d(AttentionLayer):
    """y = x + gamma * conv1x1(relu(conv3x3(relu(x)))), a bottleneck of width C/8.

    1.25 C^2 weights (9/8 + 1/8), exactly as many as the SAGAN block (C/8 + C/8 + C/2 + C/2 per input channel), so
    the comparison is attention against the same capacity spent on local convolutions. The gamma starts at 0 as in
    the attention layers.
    """

    def __init__(self, channels: int, *, sn: bool = True) -> None:
        super().__init__(channels, divisor=8)
        self.conv1 = nn.Conv2d(channels, channels // 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels // 8, channels, 1, bias=False)
        if sn:
            apply_spectral_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return x + self.gamma * self.conv2(F.relu(self.conv1(F.relu(x))))
