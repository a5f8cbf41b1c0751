"""The SAGAN discriminator (official `discriminator.py`, generalised to 32-256 px) with a projection head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sagan.models.attention_types import build_attention
from sagan.models.generator import check_attn_resolutions
from sagan.models.layers import apply_spectral_norm, check_labels, init_weights
from sagan.utils.errors import UserError

# (width multiplier of `ch`, down-sample?) per block, from the input resolution down. 128 px is the paper's ImageNet
# discriminator (64..1024, 1024 for ch=64); 32 px is the CIFAR-10 ResNet of SNGAN/StudioGAN (constant 128 for ch=64,
# ending at 8x8); 64 and 256 follow BigGAN.
ARCH = {
    32: ((2, True), (2, True), (2, False), (2, False)),
    64: ((1, True), (2, True), (4, True), (8, True), (16, False)),
    128: ((1, True), (2, True), (4, True), (8, True), (16, True), (16, False)),
    256: ((1, True), (2, True), (4, True), (8, True), (8, True), (16, True), (16, False)),
}
D_SHORTCUTS = ("x", "relu")  # model.d_shortcut: what the blocks after the first feed their shortcut


class DBlock(nn.Module):
    """Residual down-block: [ReLU]-conv3x3-ReLU-conv3x3-[avgpool], with a 1x1-conv shortcut where shapes change.

    `first=True` is the official "optimised" first block: no ReLU on the input image, and always a shortcut conv.
    `shortcut_relu=True` feeds the shortcut relu(x) instead of x (the blocks after the first), as StudioGAN's code
    does: it keeps x and then applies an in-place ReLU to it, so its shortcut sees the rectified input.
    """

    def __init__(self, in_ch: int, out_ch: int, *, downsample: bool, first: bool = False, shortcut_relu: bool = False) -> None:
        super().__init__()
        self.downsample, self.first, self.shortcut_relu = downsample, first, shortcut_relu and not first
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if first or downsample or in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(a)))
        s = a if self.shortcut_relu else x
        if self.downsample:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        # Pooling before the 1x1 conv equals the official conv-then-pool (both linear), at a quarter of the cost.
        return h + (self.shortcut(s) if self.shortcut is not None else s)


class Discriminator(nn.Module):
    """Images (B, 3, resolution, resolution) [and labels y (B,)] -> logits (B,).

    Optimised first block, residual down-blocks, self-attention after the first block that produces each of
    `attn_resolutions`, ReLU, global sum pooling, SN-linear logit, plus the projection <embed(y), h> when
    class-conditional (Miyato & Koyama 2018). `shortcut="relu"` gives the blocks after the first StudioGAN's
    rectified shortcut (see DBlock); `sn_update` is the order of the power iteration (see apply_spectral_norm).
    """

    def __init__(
        self,
        *,
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
        shortcut: str = "x",
        sn_update: str = "uv",
    ) -> None:
        super().__init__()
        if shortcut not in D_SHORTCUTS:
            raise UserError(f"unknown model.d_shortcut '{shortcut}': choose one of {', '.join(D_SHORTCUTS)}")
        if resolution not in ARCH:
            raise UserError(f"unsupported discriminator resolution {resolution}: choose one of {sorted(ARCH)}")
        self.resolution, self.num_classes = resolution, num_classes
        sizes, size = [], resolution
        for _, downsample in ARCH[resolution]:
            size //= 2 if downsample else 1
            sizes.append(size)
        check_attn_resolutions(attn_resolutions, sizes, "the discriminator")

        self.blocks = nn.ModuleDict()
        in_ch, placed = 3, set()
        for i, ((mult, downsample), size) in enumerate(zip(ARCH[resolution], sizes)):
            self.blocks[f"block{i}"] = DBlock(
                in_ch, ch * mult, downsample=downsample, first=i == 0, shortcut_relu=shortcut == "relu"
            )
            in_ch = ch * mult
            if size in attn_resolutions and size not in placed:
                self.blocks[f"attn{size}"] = build_attention(
                    attn_type, in_ch, pool=attn_pool, heads=attn_heads, window=attn_window, sn=False
                )
                placed.add(size)
        self.linear = nn.Linear(in_ch, 1)
        self.embed = nn.Embedding(num_classes, in_ch) if num_classes > 0 else None

        init_weights(self, init)
        if sn:
            apply_spectral_norm(self, update=sn_update)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        r = self.resolution
        if x.ndim != 4 or x.shape[1:] != (3, r, r):
            raise UserError(f"expected images of shape (B, 3, {r}, {r}), got {tuple(x.shape)}")
        if y is not None and y.is_floating_point():
            raise UserError("D takes class indices (an int64 tensor), not class weights")
        check_labels(y, x.shape[0], self.num_classes, training=self.training)
        h = x
        for block in self.blocks.values():
            h = block(h)
        # The head runs in fp32 (or fp64) also under autocast: global sum pooling over up to 64x64 positions, then the
        # logit. The linear layer (one output) is written as a product and a sum, which autocast leaves in fp32, where
        # F.linear would round the logits to bf16 (3 significant digits).
        h = F.relu(h).to(torch.promote_types(h.dtype, torch.float32)).sum(dim=(2, 3))  # (B, C, H, W) -> (B, C)
        out = (h * self.linear.weight[0]).sum(dim=1) + self.linear.bias[0]
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(dim=1)
        return out
