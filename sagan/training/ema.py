"""G_ema, the exponential moving average of G's weights (BigGAN-style), and its BatchNorm statistics."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sagan.config import EMA_BN
from sagan.training.standing_stats import is_bn_statistic, standing_statistics
from sagan.training.sync_batchnorm import use_plain_batchnorm
from sagan.utils.errors import UserError


class EmaGenerator:
    """G_ema <- decay * G_ema + (1 - decay) * G after `start` steps, a copy of G before. Buffers (BatchNorm statistics,
    spectral-norm u and v) are copied, never averaged: averaged u/v vectors shrink and under-estimate sigma.

    Its BatchNorm statistics (`bn`): "copy" takes G's running statistics at every update; "standing" re-estimates them
    from G_ema itself (`ready`) over `bn_batches` batches of `bn_batch_size`, so the update copies only the other
    buffers.
    """

    def __init__(
        self, G: nn.Module, *, decay: float, start: int, bn: str, bn_batches: int, bn_batch_size: int, seed: int
    ) -> None:
        if bn not in EMA_BN:
            raise UserError(f"unknown optim.ema_bn '{bn}': choose one of {', '.join(EMA_BN)}")
        # Plain BatchNorms also when G's are synchronised: standing statistics are computed by whichever rank needs
        # them, alone.
        self.G = copy.deepcopy(G).eval().requires_grad_(False)
        use_plain_batchnorm(self.G)
        self.decay, self.start, self.bn, self.bn_batches, self.bn_batch_size, self.seed = (
            decay, start, bn, bn_batches, bn_batch_size, seed,
        )  # fmt: skip
        self._buffers = [(name, b) for name, b in self.G.named_buffers() if bn == "copy" or not is_bn_statistic(name)]
        self._stats_step = -1  # the step whose weights the standing statistics belong to

    @torch.no_grad()
    def update(self, G: nn.Module, step: int) -> None:
        """After G step `step`."""
        ema_params, params = list(self.G.parameters()), list(G.parameters())
        if step <= self.start:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1 - self.decay)
        if self._buffers:  # none without spectral norm in G (model.g_sn=false) and with standing statistics
            G_buffers = dict(G.named_buffers())
            torch._foreach_copy_([b for _, b in self._buffers], [G_buffers[n] for n, _ in self._buffers])

    def ready(self, step: int) -> nn.Module:
        """G_ema, ready to draw samples, FID or figures, and to be saved: in eval mode, and with standing statistics of
        its weights at `step` (computed once per step, when first asked for)."""
        if self.bn == "standing" and self._stats_step != step:
            standing_statistics(self.G, batches=self.bn_batches, batch_size=self.bn_batch_size, seed=self.seed)
            self._stats_step = step
        return self.G.eval()

    def load_state_dict(self, state: dict[str, torch.Tensor], step: int) -> None:
        """G_ema's weights and buffers as a checkpoint of `step` holds them (its statistics belong to those weights)."""
        self.G.load_state_dict(state)
        self._stats_step = step
