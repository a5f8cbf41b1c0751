"""SAGAN networks: generator, discriminator, the self-attention block, and read-outs for logging."""

from __future__ import annotations

import torch
from torch import nn

from sagan.models.attention import SelfAttention2d
from sagan.models.discriminator import Discriminator
from sagan.models.generator import Generator
from sagan.models.layers import spectral_sigmas

__all__ = ["Discriminator", "Generator", "SelfAttention2d", "attention_gammas", "spectral_sigmas"]


def attention_gammas(module: nn.Module) -> dict[str, torch.Tensor]:
    """The gamma of every self-attention layer in `module`, keyed by module name (e.g. 'blocks.attn16')."""
    return {name: m.gamma.detach() for name, m in module.named_modules() if isinstance(m, SelfAttention2d)}
