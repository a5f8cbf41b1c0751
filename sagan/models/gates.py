"""Channel and spatial gates: squeeze-and-excitation (Hu et al. 2018) and CBAM (Woo et al. 2018), in the gated
residual form every attention layer here takes: y = x + gamma * gated(x), gamma starting at 0."""

from __future__ import annotations

import torch
from torch import nn

from sagan.models.attention import AttentionLayer
from sagan.models.layers import apply_spectral_norm

REDUCTION = 16  # hidden width C/16 of the channel MLP, as in both papers


def channel_mlp(channels: int) -> nn.Sequential:
    """C -> C/16 -> C as 1x1 convs (so spectral norm treats them like every other conv)."""
    hidden = max(channels // REDUCTION, 1)
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False)
    )


class SqueezeExcite2d(AttentionLayer):
    """y = x + gamma * x * sigmoid(mlp(mean over positions of x)): a per-channel gate, no spatial map."""

    def __init__(self, channels: int, *, sn: bool = True) -> None:
        super().__init__(channels)
        self.mlp = channel_mlp(channels)
        if sn:
            apply_spectral_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        gate = torch.sigmoid(self.mlp(x.mean(dim=(2, 3), keepdim=True)))
        return x + self.gamma * (x * gate)


class CBAM2d(AttentionLayer):
    """y = x + gamma * spatial(channel(x)). The channel gate is SE's MLP on both the mean and the max over positions;
    the spatial gate a 7x7 conv over the mean and max over channels. The spatial gate is the layer's map: where it
    lets features through, the same for every query position."""

    map_heads = 1

    def __init__(self, channels: int, *, sn: bool = True) -> None:
        super().__init__(channels)
        self.mlp = channel_mlp(channels)
        self.spatial = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        if sn:
            apply_spectral_norm(self)

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The channel-gated features (B, C, H, W) and the spatial gate (B, 1, H, W)."""
        self.check_input(x)
        pooled = self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True))
        h = x * torch.sigmoid(pooled)
        gate = torch.sigmoid(self.spatial(torch.cat([h.mean(dim=1, keepdim=True), h.amax(dim=1, keepdim=True)], 1)))
        return h, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self._gates(x)
        return x + self.gamma * (h * gate)

    def _maps(self, x: torch.Tensor, queries: list[tuple[int, int]], head: int) -> torch.Tensor:
        """(B, Q, H, W): the spatial gate, once per query (it does not depend on the query)."""
        _, gate = self._gates(x)
        return gate.expand(-1, len(queries), -1, -1)
