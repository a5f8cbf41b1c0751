"""Global self-attention blocks: the SAGAN block, as in the official code (`non_local.py`, `sn_non_local_block_sim`),
with optional heads, and the widespread simplified block; and `AttentionLayer`, what every attention variant is."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sagan.models.layers import apply_spectral_norm
from sagan.utils.errors import UserError


class AttentionLayer(nn.Module):
    """A layer G and D place after the block that makes a given feature-map size: y = x + gamma * f(x), with gamma a
    learnable scalar starting at exactly 0, so the network starts as if the layer were not there (paper, section 4).

    `map_heads` is how many spatial maps `attention_maps(x, queries, head)` can draw (0: none, as for a channel gate).
    """

    map_heads = 0

    def __init__(self, channels: int, *, divisor: int = 1) -> None:
        super().__init__()
        if channels % divisor:
            raise UserError(f"{type(self).__name__} needs a channel count divisible by {divisor}, got {channels}")
        self.channels = channels
        self.gamma = nn.Parameter(torch.zeros(()))

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise UserError(f"expected a (B, {self.channels}, H, W) feature map, got {tuple(x.shape)}")

    def check_head(self, head: int) -> None:
        if not 0 <= head < self.map_heads:
            raise UserError(f"{type(self).__name__} draws {self.map_heads} map(s) per query: head {head} does not exist")

    def attention_maps(
        self, x: torch.Tensor, queries: Sequence[tuple[int, int]] | None = None, head: int = 0
    ) -> torch.Tensor:
        """Maps for visualisation, (B, Q, h, w): for each (row, col) query position on the H x W feature map (None:
        every position, row-major), where head `head` of the layer draws from. Call in eval mode to leave the
        spectral-norm power iteration untouched."""
        _, _, H, W = x.shape
        queries = self.check_queries(queries, H, W)
        self.check_head(head)
        return self._maps(x, queries, head)

    def _maps(self, x: torch.Tensor, queries: list[tuple[int, int]], head: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} draws no maps")

    @staticmethod
    def check_queries(queries: Sequence[tuple[int, int]] | None, H: int, W: int) -> list[tuple[int, int]]:
        """(row, col) query positions on the H x W map; None means every position, row-major."""
        if queries is None:
            return [(r, c) for r in range(H) for c in range(W)]
        if any(not (0 <= r < H and 0 <= c < W) for r, c in queries):
            raise UserError(f"query positions must lie on the {H}x{W} feature map, got {list(queries)}")
        return list(queries)


class SelfAttention2d(AttentionLayer):
    """y = x + gamma * o(softmax(theta(x)^T phi(x)) g(x)), with gamma a learnable scalar starting at exactly 0.

    query (theta) and key (phi) are 1x1 convs to C/8, value (g) a 1x1 conv to C/2, keys and values are max-pooled
    `pool` x `pool` (2 in the official code: 4x fewer keys, 4x less memory), and the output conv (o) maps C/2 back to
    C. Scores are not scaled by 1/sqrt(d), unlike transformers. All convs are bias-free and, with `sn=True`,
    spectrally normalised. Networks pass `sn=False` and normalise every layer themselves after initialising them.

    `heads` > 1 splits the C/8 query/key and C/2 value widths into that many heads, each with its own softmax (and
    its own map); the weights are the same, so heads=1 is exactly the SAGAN block.
    """

    def __init__(self, channels: int, *, pool: int = 2, heads: int = 1, sn: bool = True) -> None:
        super().__init__(channels, divisor=8)
        if pool < 1:
            raise UserError(f"attention pool factor must be >= 1, got {pool}")
        if heads < 1 or (channels // 8) % heads:
            raise UserError(f"{heads} heads do not split the {channels // 8} query/key channels (C/8) evenly")
        self.pool, self.heads, self.map_heads = pool, heads, heads
        self.query = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.key = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.value = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.out = nn.Conv2d(channels // 2, channels, 1, bias=False)
        if sn:
            apply_spectral_norm(self)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> query (B, h, N, C/8h), key (B, h, N/p^2, C/8h), value (B, h, N/p^2, C/2h)."""
        self.check_input(x)
        if x.shape[2] % self.pool or x.shape[3] % self.pool:
            raise UserError(f"feature map {x.shape[2]}x{x.shape[3]} is not divisible by the pool factor {self.pool}")
        key, value = self.key(x), self.value(x)
        if self.pool > 1:
            key, value = F.max_pool2d(key, self.pool), F.max_pool2d(value, self.pool)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            # (B, C', H', W') -> (B, h, H'W', C'/h), contiguous: the fused kernels need a unit stride on the last dim,
            # and without one SDPA falls back to the math path that materialises the attention matrix.
            return t.view(t.shape[0], self.heads, t.shape[1] // self.heads, -1).transpose(2, 3).contiguous()

        return tokens(self.query(x)), tokens(key), tokens(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        query, key, value = self._project(x)
        # Queries and keys are zero-padded from C/8 to the value width C/2: q.k is unchanged, and equal head sizes
        # let SDPA use its flash kernels (CPU and GPU) instead of the math path that materialises the (N x N/p^2)
        # matrix. scale=1.0: no 1/sqrt(d), as in the official code.
        pad = (0, value.shape[-1] - query.shape[-1])
        o = F.scaled_dot_product_attention(F.pad(query, pad), F.pad(key, pad), value, scale=1.0)  # (B, h, N, C/2h)
        o = o.transpose(2, 3).reshape(B, C // 2, H, W)
        return x + self.gamma * self.out(o)

    def _maps(self, x: torch.Tensor, queries: list[tuple[int, int]], head: int) -> torch.Tensor:
        """(B, Q, H/p, W/p), each a softmax row summing to 1: how much query q attends to each (pooled) key location."""
        _, _, H, W = x.shape
        query, key, _ = self._project(x)
        index = torch.tensor([r * W + c for r, c in queries], device=x.device)
        attn = torch.softmax(query[:, head, index] @ key[:, head].transpose(1, 2), dim=-1)  # (B, Q, N/p^2)
        return attn.reshape(attn.shape[0], attn.shape[1], H // self.pool, W // self.pool)


class SimpleSelfAttention2d(AttentionLayer):
    """The simplification most PyTorch SAGANs write (fastai's `SelfAttention`): query and key 1x1 convs to C/8, the
    value a 1x1 conv to C, no pooling and no output conv: y = x + gamma * softmax(q^T k) v."""

    map_heads = 1

    def __init__(self, channels: int, *, sn: bool = True) -> None:
        super().__init__(channels, divisor=8)
        self.query = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.key = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.value = nn.Conv2d(channels, channels, 1, bias=False)
        if sn:
            apply_spectral_norm(self)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.check_input(x)
        tokens = lambda t: t.flatten(2).transpose(1, 2).contiguous().unsqueeze(1)  # noqa: E731  (B, 1, N, C')
        return tokens(self.query(x)), tokens(self.key(x)), tokens(self.value(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        query, key, value = self._project(x)
        pad = (0, C - query.shape[-1])  # as in SelfAttention2d: equal head sizes for the fused kernels
        o = F.scaled_dot_product_attention(F.pad(query, pad), F.pad(key, pad), value, scale=1.0)  # (B, 1, N, C)
        return x + self.gamma * o.squeeze(1).transpose(1, 2).reshape(B, C, H, W)

    def _maps(self, x: torch.Tensor, queries: list[tuple[int, int]], head: int) -> torch.Tensor:
        """(B, Q, H, W), each a softmax row summing to 1."""
        _, _, H, W = x.shape
        query, key, _ = self._project(x)
        index = torch.tensor([r * W + c for r, c in queries], device=x.device)
        attn = torch.softmax(query[:, 0, index] @ key[:, 0].transpose(1, 2), dim=-1)
        return attn.reshape(attn.shape[0], attn.shape[1], H, W)
