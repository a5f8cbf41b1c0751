"""Stand-alone local self-attention (Ramachandran et al. 2019, "Stand-Alone Self-Attention in Vision Models"):
each position attends to a window x window neighbourhood around itself, with learned relative position embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sagan.models.attention import AttentionLayer
from sagan.models.layers import apply_spectral_norm
from sagan.utils.errors import UserError


class LocalSelfAttention2d(AttentionLayer):
    """y = x + gamma * o(sum over the window of softmax(q . (k + r)) v), gamma starting at 0.

    Query and key are 1x1 convs to C/8, value a 1x1 conv to C/2 and o maps C/2 back to C, as in the SAGAN block, so
    the two differ only in where they look: a `window` x `window` neighbourhood (zero-padded at the borders, where
    the missing positions get no weight) instead of the whole map. The relative position embedding r of a key is a
    learned row-offset vector (C/16 wide) joined to a learned column-offset vector (the other C/16): plain parameters,
    like BatchNorm gains, not spectrally normalised.
    """

    map_heads = 1

    def __init__(self, channels: int, *, window: int = 7, sn: bool = True) -> None:
        super().__init__(channels, divisor=8)
        if window < 1 or window % 2 == 0:
            raise UserError(f"model.attn_window must be an odd number >= 1, got {window}")
        self.window = window
        width = channels // 8
        self.query = nn.Conv2d(channels, width, 1, bias=False)
        self.key = nn.Conv2d(channels, width, 1, bias=False)
        self.value = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.out = nn.Conv2d(channels // 2, channels, 1, bias=False)
        self.rel_rows = nn.Parameter(torch.randn(width // 2, window) * width**-0.5)
        self.rel_cols = nn.Parameter(torch.randn(width - width // 2, window) * width**-0.5)
        if sn:
            apply_spectral_norm(self)

    def _neighbours(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C', H, W) -> (B, C', window^2, H*W): every position's window, zero outside the map."""
        B, C, H, W = t.shape
        return F.unfold(t, self.window, padding=self.window // 2).view(B, C, self.window**2, H * W)

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, window^2, H*W): for each position, a softmax over its window."""
        self.check_input(x)
        B, _, H, W = x.shape
        w = self.window
        rel = torch.cat(
            [self.rel_rows[:, :, None].expand(-1, w, w), self.rel_cols[:, None, :].expand(-1, w, w)]
        ).reshape(-1, w * w, 1)  # (C/8, window^2, 1): row offset and column offset of each window position
        query, key = self.query(x).flatten(2), self._neighbours(self.key(x))  # (B, C/8, H*W), (B, C/8, window^2, H*W)
        logits = torch.einsum("bcn,bcwn->bwn", query, key + rel.to(key.dtype))  # (B, window^2, H*W)
        inside = self._neighbours(torch.ones(1, 1, H, W, device=x.device))[0, 0] > 0  # (window^2, H*W)
        return torch.softmax(logits.float().masked_fill(~inside, float("-inf")), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        weights = self._weights(x)
        value = self._neighbours(self.value(x))  # (B, C/2, window^2, H*W)
        o = torch.einsum("bcwn,bwn->bcn", value, weights.to(value.dtype)).view(B, C // 2, H, W)
        return x + self.gamma * self.out(o)

    def _maps(self, x: torch.Tensor, queries: list[tuple[int, int]], head: int) -> torch.Tensor:
        """(B, Q, H, W): each query's window weights placed around it on the whole map (zero elsewhere)."""
        _, _, H, W = x.shape
        weights = self._weights(x)
        w, p = self.window, self.window // 2
        padded = weights.new_zeros(x.shape[0], len(queries), H + 2 * p, W + 2 * p)
        for i, (r, c) in enumerate(queries):
            padded[:, i, r : r + w, c : c + w] = weights[:, :, r * W + c].view(-1, w, w)
        return padded[:, :, p : p + H, p : p + W]
