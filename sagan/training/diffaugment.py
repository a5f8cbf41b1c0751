"""DiffAugment (Zhao et al., NeurIPS 2020): random, differentiable augmentations of every image D sees, real and
generated, in the D step and in the G step, so D cannot memorise a small training set and G's gradients pass
through the augmentation. The paper's three operations and parameters, on images in [-1, 1]:

- color: brightness + U[-0.5, 0.5), then saturation x U[0, 2) (around each pixel's channel mean), then contrast
  x U[0.5, 1.5) (around the image's mean), each drawn per image;
- translation: a shift of up to 1/8 of the image side (whole pixels, each axis drawn per image), zero fill;
- cutout: a square of half the image side set to 0, its centre drawn per image (clipped at the borders).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sagan.config import check_policy
from sagan.utils.processes import SINGLE, World

TRANSLATION_RATIO = 1 / 8
CUTOUT_RATIO = 1 / 2

# A source of uniform draws: (batch, *shape) -> U[0, 1) of that shape, one row per image.
Uniform = Callable[..., torch.Tensor]


def brightness(x: torch.Tensor, uniform: Uniform) -> torch.Tensor:
    return x + (uniform(x.shape[0], 1, 1, 1).to(x.dtype) - 0.5)


def saturation(x: torch.Tensor, uniform: Uniform) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (uniform(x.shape[0], 1, 1, 1).to(x.dtype) * 2) + mean


def contrast(x: torch.Tensor, uniform: Uniform) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (uniform(x.shape[0], 1, 1, 1).to(x.dtype) + 0.5) + mean


def color(x: torch.Tensor, uniform: Uniform) -> torch.Tensor:
    return contrast(saturation(brightness(x, uniform), uniform), uniform)


def whole_offsets(uniform: Uniform, batch: int, count: int) -> torch.Tensor:
    """Integers 0 .. count-1, uniformly, one per image: (batch,) int64."""
    return (uniform(batch) * count).long().clamp(max=count - 1)


def translation(x: torch.Tensor, uniform: Uniform) -> torch.Tensor:
    """Each image moved by (dy, dx) whole pixels, |d| <= 1/8 of the side; what moves in is 0."""
    B, C, H, W = x.shape
    out = x
    for dim, size in ((2, H), (3, W)):
        reach = int(size * TRANSLATION_RATIO + 0.5)
        shift = whole_offsets(uniform, B, 2 * reach + 1) - reach  # (B,) in [-reach, reach]
        source = torch.arange(size, device=x.device)[None, :] - shift[:, None]  # (B, size): where each pixel comes from
        inside = (source >= 0) & (source < size)
        shape = (B, 1, size, 1) if dim == 2 else (B, 1, 1, size)
        index = source.clamp(0, size - 1).view(shape).expand(B, C, H, W)
        out = out.gather(dim, index) * inside.view(shape).to(x.dtype)
    return out


def cutout(x: torch.Tensor, uniform: Uniform) -> torch.Tensor:
    """Each image with a square of half its side set to 0 (the part of it inside the image)."""
    B, _, H, W = x.shape
    keep = torch.ones(B, 1, H, W, dtype=torch.bool, device=x.device)
    inside = []
    for size in (H, W):
        side = int(size * CUTOUT_RATIO + 0.5)
        start = whole_offsets(uniform, B, size + (1 - side % 2)) - side // 2  # (B,): first row / column of the square
        pixels = torch.arange(size, device=x.device)[None, :]
        inside.append((pixels >= start[:, None]) & (pixels < start[:, None] + side))  # (B, size)
    keep &= ~(inside[0][:, None, :, None] & inside[1][:, None, None, :])
    return x * keep.to(x.dtype)


OPERATIONS = {"color": color, "translation": translation, "cutout": cutout}


class DiffAugment:
    """augment(images) -> images with the policy's operations applied, each image with its own random draws.

    The draws come from this object's generator (on `device`), whose state checkpoints keep, so a resumed run
    augments exactly as an uninterrupted one. Under torchrun every rank draws for the whole (micro-)batch of all
    ranks and uses its own rows, so all ranks keep one generator state (rank 0's, in checkpoints) and a run augments
    the same on any number of ranks with the same micro-batches per rank (train.grad_accum).
    """

    def __init__(self, policy: Sequence[str], *, device: torch.device, seed: int, world: World = SINGLE) -> None:
        check_policy(policy)
        self.policy = list(policy)
        self.world = world
        self.device = torch.device(device)
        self.seed = seed + 0x5A6A  # apart from the latent stream's seed
        self.rng = torch.Generator(self.device).manual_seed(self.seed)

    def _uniform(self, batch: int, *shape: int) -> torch.Tensor:
        draws = torch.rand(batch * self.world.size, *shape, generator=self.rng, device=self.device)
        return draws[self.world.rank * batch : (self.world.rank + 1) * batch]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.policy:
            x = OPERATIONS[name](x, self._uniform)
        return x

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state(), "device": self.device.type}

    def load_state_dict(self, state: dict, step: int) -> None:
        if state["device"] == self.device.type:
            self.rng.set_state(state["rng"])
        else:  # CPU and CUDA generators have different states: a new stream for this step on (the trainer warns)
            self.rng.manual_seed(self.seed * 1_000_003 + step)
