"""SAGAN networks: generator, discriminator, the self-attention block, and read-outs for logging."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sagan.models.attention import AttentionLayer, SelfAttention2d
from sagan.models.discriminator import Discriminator
from sagan.models.generator import Generator
from sagan.models.layers import spectral_sigmas

__all__ = [
    "AttentionLayer",
    "Discriminator",
    "Generator",
    "SelfAttention2d",
    "attention_gammas",
    "attention_shares",
    "build_models",
    "spectral_sigmas",
]


def build_models(model: Any, num_classes: int) -> tuple[Generator, Discriminator]:
    """G and D from a model config (conf/model/*.yaml, or the `model` record of a checkpoint)."""
    common = dict(
        resolution=model.resolution, num_classes=num_classes, attn_pool=model.attn_pool, attn_type=model.attn_type,
        attn_heads=model.attn_heads, attn_window=model.attn_window, init=model.init, sn_update=model.sn_update,
    )  # fmt: skip
    G = Generator(
        z_dim=model.z_dim,
        ch=model.g_ch,
        attn_resolutions=tuple(model.g_attn),
        sn=model.g_sn,
        bn_momentum=model.bn_momentum,
        bn_eps=model.bn_eps,
        cond_bn=model.cond_bn,
        widths=None if model.g_widths is None else tuple(model.g_widths),
        **common,
    )
    D = Discriminator(
        ch=model.d_ch, attn_resolutions=tuple(model.d_attn), sn=model.d_sn, shortcut=model.d_shortcut, **common
    )
    return G, D


def attention_gammas(module: nn.Module) -> dict[str, torch.Tensor]:
    """The gamma of every attention layer (any model.attn_type) in `module`, keyed by module name ('blocks.attn16')."""
    return {name: m.gamma.detach() for name, m in module.named_modules() if isinstance(m, AttentionLayer)}


@torch.no_grad()
def attention_shares(net: nn.Module, run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """For every attention layer of `net` while `run()` runs it (in eval mode: no spectral-norm update, running
    BatchNorm statistics), ||y - x|| / ||x|| with y = x + gamma f(x): the attention branch's share of the layer's output.
    Gamma alone hides the branch's scale: a small gamma can carry a large f(x). On the device, by module name."""
    found: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(
            lambda _m, args, out, name=name: found.__setitem__(name, (out - args[0]).float().norm() / args[0].float().norm())
        )
        for name, m in net.named_modules()
        if isinstance(m, AttentionLayer)
    ]
    was_training = net.training
    net.eval()
    try:
        run()
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return found
