"""Image conversion shared by datasets, samplers and figures: PIL images to uint8 tensors, and the [-1, 1] range of
G's tanh to uint8 and back."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range of G's tanh."""
    return images.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float [-1, 1] (generator output) -> uint8 [0, 255], rounded."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def pil_to_tensor(img: Image.Image, *, resolution: int) -> torch.Tensor:
    """Any-mode PIL image -> RGB, center-cropped to a square, resized (bicubic) -> (3, resolution, resolution) uint8."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
        # 16-bit greyscale: convert("RGB") clips at 255, which would turn most pixels white; keep the high byte.
        img = Image.fromarray((np.asarray(img, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8))
    img = img.convert("RGB")  # L, LA, P, RGBA (alpha dropped), CMYK, ... -> RGB
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        # PIL's bicubic filter widens with the scale factor when downsampling, so it is antialiased.
        img = img.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)
