"""The demo dataset: synthetic mirror-symmetric shapes drawn by code, and the score that says how symmetric a
generator's samples are."""

from __future__ import annotations

import random

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from sagan.data.dataset_base import summary
from sagan.data.images import pil_to_tensor, to_float
from sagan.utils.errors import UserError

_PALETTE = ((235, 45, 45), (45, 205, 70), (55, 95, 245), (245, 220, 40))
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: antialiased edges


class MirrorShapes(Dataset):
    """Synthetic images that need long-range consistency: the right half is the exact mirror of the left half.

    Each image has one bold filled shape (circle, square or triangle: the label; 10-14 px at 32 px, scaled with the
    resolution) in one of four saturated colours, somewhere in the left half of a black image, and its mirror image
    in the right half, so a generator must repeat on the right what it drew on the left, half a picture away.
    Kept this simple so a small GAN learns it in minutes on a CPU. Images are drawn on demand from (seed, index):
    no files, any size, identical in every process.
    """

    classes = ["circle", "square", "triangle"]

    def __init__(self, *, size: int = 10_000, resolution: int = 32, seed: int = 0, labels: bool = True) -> None:
        if size < 1:
            raise UserError(f"the demo dataset needs at least 1 image, got size={size}")
        self.size = size
        self.resolution = resolution
        self.seed = seed
        self.num_classes = 3 if labels else 0
        if not labels:
            self.classes = []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} demo images")
        # A string seed is hashed (SHA-512) by random.Random: no collisions between (seed, index) pairs.
        rng = random.Random(f"mirror-shapes/{self.seed}/{index}")
        r, s = self.resolution, _SUPERSAMPLE
        canvas = Image.new("RGB", (r * s, r * s), (0, 0, 0))
        draw = ImageDraw.Draw(canvas)

        kind, colour = rng.randrange(3), rng.choice(_PALETTE)
        size = rng.uniform(10, 14) * r / 32  # 10-14 px at 32 px
        gap = r / 32  # 1 px at 32 px: keeps the shape from touching its mirror image across the axis
        cx = rng.uniform(size / 2, r / 2 - size / 2 - gap)
        cy = rng.uniform(size / 2, r - size / 2)
        x0, y0, x1, y1 = ((cx - size / 2) * s, (cy - size / 2) * s, (cx + size / 2) * s, (cy + size / 2) * s)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon(((cx * s, y0), (x0, y1), (x1, y1)), fill=colour)

        image = pil_to_tensor(canvas.resize((r, r), resample=Image.Resampling.BOX), resolution=r)
        half = r // 2
        image[:, :, r - half :] = image[:, :, :half].flip(-1)  # mirror after downsampling: exact to the last bit
        return image, kind if self.num_classes else 0

    @staticmethod
    def sample_score(images: torch.Tensor) -> float:
        """How well generated samples keep the demo's constraint: their mirror consistency (below)."""
        return mirror_consistency(images)

    def describe(self, name: str) -> str:
        return summary(self, "demo (generated mirror-symmetric shapes)")

    def identity(self) -> tuple:
        return ("demo", len(self), self.seed)

    def native_side(self) -> None:
        return None  # drawn at the resolution asked for

    def all_labels(self) -> list[int]:
        """The label of every image, without drawing any: the shape is the first draw of its seeded stream."""
        if self.num_classes == 0:
            return [0] * self.size
        return [random.Random(f"mirror-shapes/{self.seed}/{i}").randrange(3) for i in range(self.size)]


def mirror_consistency(images: torch.Tensor, eps: float = 1e-6) -> float:
    """How mirror-symmetric a batch is, relative to chance: 1 = exactly symmetric, about 0 = unrelated halves.

    d_self = mean |x - fliplr(x)| and d_other = mean |x - fliplr(x rolled by one along the batch)|, and the score is
    (d_other - d_self) / (d_other + eps) = 1 - (d_self + eps) / (d_other + eps). Comparing against other images
    of the same batch makes the score scale-free and keeps near-constant images (an untrained generator) near 0:
    their d_self is small, but so is d_other. eps on both sides makes an exactly constant batch score 0, not 1.

    images: (B, 3, H, W), uint8 or float in [-1, 1], B >= 2.
    """
    if images.ndim != 4 or images.shape[0] < 2:
        raise UserError(f"mirror_consistency needs a batch (B >= 2, C, H, W), got shape {tuple(images.shape)}")
    x = to_float(images) if images.dtype == torch.uint8 else images.float()
    mirrored = x.flip(-1)
    d_self = (x - mirrored).abs().mean()
    d_other = (x - mirrored.roll(1, dims=0)).abs().mean()
    return float((d_other - d_self) / (d_other + eps))
