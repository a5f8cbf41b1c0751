"""The SAGAN self-attention block, as in the official code (`non_local.py`, `sn_non_local_block_sim`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sagan.models.layers import apply_spectral_norm


class SelfAttention2d(nn.Module):
    """y = x + gamma * o(softmax(theta(x)^T phi(x)) g(x)), with gamma a learnable scalar starting at exactly 0.

    query (theta) and key (phi) are 1x1 convs to C/8, value (g) a 1x1 conv to C/2, keys and values are max-pooled
    `pool` x `pool` (2 in the official code: 4x fewer keys, 4x less memory), and the output conv (o) maps C/2 back to
    C. Scores are not scaled by 1/sqrt(d), unlike transformers. All convs are bias-free and, with `sn=True`,
    spectrally normalised. Networks pass `sn=False` and normalise every layer themselves after initialising them.
    """

    def __init__(self, channels: int, *, pool: int = 2, sn: bool = True) -> None:
        super().__init__()
        if channels % 8:
            raise ValueError(f"self-attention needs a channel count divisible by 8, got {channels}")
        if pool < 1:
            raise ValueError(f"attention pool factor must be >= 1, got {pool}")
        self.channels = channels
        self.pool = pool
        self.query = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.key = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.value = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.out = nn.Conv2d(channels // 2, channels, 1, bias=False)
        # Starts at 0 so the block is the identity: the network first relies on local cues (paper, section 4).
        self.gamma = nn.Parameter(torch.zeros(()))
        if sn:
            apply_spectral_norm(self)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> query (B, 1, N, C/8), key (B, 1, N/p^2, C/8), value (B, 1, N/p^2, C/2)."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected a (B, {self.channels}, H, W) feature map, got {tuple(x.shape)}")
        if x.shape[2] % self.pool or x.shape[3] % self.pool:
            raise ValueError(f"feature map {x.shape[2]}x{x.shape[3]} is not divisible by the pool factor {self.pool}")
        key, value = self.key(x), self.value(x)
        if self.pool > 1:
            key, value = F.max_pool2d(key, self.pool), F.max_pool2d(value, self.pool)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            # (B, C', H', W') -> (B, 1, H'W', C'), contiguous: the fused kernels need a unit stride on the last dim,
            # and without one SDPA falls back to the math path that materialises the attention matrix.
            return t.flatten(2).transpose(1, 2).contiguous().unsqueeze(1)

        return tokens(self.query(x)), tokens(key), tokens(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        query, key, value = self._project(x)
        # Queries and keys are zero-padded from C/8 to the value width C/2: q.k is unchanged, and equal head sizes
        # let SDPA use its flash kernels (CPU and GPU) instead of the math path that materialises the (N x N/p^2)
        # matrix. scale=1.0: no 1/sqrt(d), as in the official code.
        pad = (0, value.shape[-1] - query.shape[-1])
        o = F.scaled_dot_product_attention(F.pad(query, pad), F.pad(key, pad), value, scale=1.0)  # (B, 1, N, C/2)
        o = o.squeeze(1).transpose(1, 2).reshape(B, C // 2, H, W)
        return x + self.gamma * self.out(o)

    def attention_maps(self, x: torch.Tensor, queries: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Explicit attention maps for visualisation: (B, Q, H/p, W/p), each map a softmax row summing to 1.

        `queries` are (row, col) positions on the H x W feature map; None means every position (Q = H*W, row-major).
        Map [b, q] says how much query position q attends to each (pooled) key location. Call in eval mode to leave
        the spectral-norm power iteration untouched.
        """
        _, _, H, W = x.shape
        query, key, _ = self._project(x)
        if queries is not None:
            if any(not (0 <= r < H and 0 <= c < W) for r, c in queries):
                raise ValueError(f"query positions must lie on the {H}x{W} feature map, got {list(queries)}")
            index = torch.tensor([r * W + c for r, c in queries], device=x.device)
            query = query[:, :, index]
        attn = torch.softmax(query.squeeze(1) @ key.squeeze(1).transpose(1, 2), dim=-1)  # (B, Q, N/p^2)
        return attn.reshape(attn.shape[0], attn.shape[1], H // self.pool, W // self.pool)
