"""The SAGAN generator (official `generator.py`, generalised to 32-256 px)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sagan.models.attention_types import build_attention
from sagan.models.layers import GeneratorBatchNorm2d, apply_spectral_norm, check_labels, init_weights
from sagan.utils.errors import UserError

# Width multipliers of `ch` at 4x4, 8x8, ..., resolution. 128 px is the paper's ImageNet generator (1024..64 for
# ch=64); 32 px is the CIFAR-10 ResNet of SNGAN/StudioGAN (constant 256 for ch=64); 64 and 256 follow BigGAN.
WIDTHS = {
    32: (4, 4, 4, 4),
    64: (16, 16, 8, 4, 2),
    128: (16, 16, 8, 4, 2, 1),
    256: (16, 16, 8, 8, 4, 2, 1),
}


def check_attn_resolutions(attn_resolutions: Sequence[int], available: Sequence[int], network: str) -> None:
    unknown = sorted(set(attn_resolutions) - set(available))
    if unknown:
        raise UserError(
            f"{network} has no feature map of size {unknown}: attention resolutions must be among {sorted(set(available))}"
        )


class GBlock(nn.Module):
    """Residual up-block: BN-ReLU-up-conv3x3-BN-ReLU-conv3x3, with an up-sampled 1x1-conv shortcut. `bn` holds the
    keyword arguments of its two GeneratorBatchNorm2d (momentum, eps, form)."""

    def __init__(self, in_ch: int, out_ch: int, num_classes: int, *, bn: dict[str, Any]) -> None:
        super().__init__()
        self.bn1 = GeneratorBatchNorm2d(in_ch, num_classes, **bn)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.bn2 = GeneratorBatchNorm2d(out_ch, num_classes, **bn)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        # 1x1 conv then nearest up-sampling equals the official up-then-conv, at a quarter of the cost.
        return h + F.interpolate(self.shortcut(x), scale_factor=2, mode="nearest")


class Generator(nn.Module):
    """z (B, z_dim) [and class labels y (B,)] -> images (B, 3, resolution, resolution) in [-1, 1].

    SN-linear to a 4x4 map, one residual up-block per doubling, self-attention (an `attn_type` layer, see
    sagan.models.attention_types) after the block that produces each of `attn_resolutions`, then BN-ReLU-conv3x3-tanh. `sn=False` runs the paper's "no SN on G" ablation.

    `bn_momentum` is PyTorch's BatchNorm momentum for the running statistics (0.1, PyTorch's and BigGAN's default);
    the official TF code decays them much more slowly (momentum 0.001 in the conditional BNs, 0.0001 in the last BN).
    `bn_eps` is every BatchNorm's epsilon (PyTorch's 1e-5; StudioGAN 1e-4), `cond_bn` the form of the class-conditional
    BatchNorm (see GeneratorBatchNorm2d), `sn_update` the order of the power iteration (see apply_spectral_norm).
    `widths` overrides the width multipliers of `ch` at 4x4, 8x8, ..., resolution (default WIDTHS[resolution]).
    """

    def __init__(
        self,
        *,
        z_dim: int = 128,
        ch: int = 64,
        resolution: int = 32,
        attn_resolutions: Sequence[int] = (16,),
        num_classes: int = 0,
        attn_pool: int = 2,
        attn_type: str = "sagan",
        attn_heads: int = 1,
        attn_window: int = 7,
        sn: bool = True,
        init: str = "xavier",
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        cond_bn: str = "tables",
        sn_update: str = "uv",
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if resolution not in WIDTHS:
            raise UserError(f"unsupported generator resolution {resolution}: choose one of {sorted(WIDTHS)}")
        multipliers = WIDTHS[resolution] if widths is None else tuple(widths)
        if len(multipliers) != len(WIDTHS[resolution]) or min(multipliers) < 1:
            raise UserError(
                f"model.g_widths must give {len(WIDTHS[resolution])} positive width multipliers (4x4 to "
                f"{resolution}x{resolution}) at {resolution} px, got {list(multipliers)}"
            )
        widths = [ch * m for m in multipliers]
        sizes = [4 * 2**i for i in range(1, len(widths))]
        check_attn_resolutions(attn_resolutions, sizes, "the generator")
        self.z_dim, self.resolution, self.num_classes = z_dim, resolution, num_classes

        self.linear = nn.Linear(z_dim, widths[0] * 4 * 4)
        bn = dict(momentum=bn_momentum, eps=bn_eps, form=cond_bn)
        self.blocks = nn.ModuleDict()
        for i, (in_ch, out_ch, size) in enumerate(zip(widths[:-1], widths[1:], sizes)):
            self.blocks[f"block{i}"] = GBlock(in_ch, out_ch, num_classes, bn=bn)
            if size in attn_resolutions:
                self.blocks[f"attn{size}"] = build_attention(
                    attn_type, out_ch, pool=attn_pool, heads=attn_heads, window=attn_window, sn=False
                )
        # The official code ends with an unconditional BN, also in the class-conditional generator.
        self.out_bn = nn.BatchNorm2d(widths[-1], momentum=bn_momentum, eps=bn_eps)
        self.out_conv = nn.Conv2d(widths[-1], 3, 3, padding=1)

        init_weights(self, init)
        if sn:
            apply_spectral_norm(self, update=sn_update)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise UserError(f"expected z of shape (B, {self.z_dim}), got {tuple(z.shape)}")
        check_labels(y, z.shape[0], self.num_classes, training=self.training)
        h = self.linear(z).view(z.shape[0], -1, 4, 4)  # (B, z_dim) -> (B, C, 4, 4)
        for block in self.blocks.values():
            h = block(h, y) if isinstance(block, GBlock) else block(h)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))
