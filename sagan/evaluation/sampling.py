"""The one seeded sampler: `sagan-sample`, `sagan-fid`, in-training evaluation and figures all draw through it, so the
same checkpoint, seed, count and class choice give the same images everywhere (and so the same FID)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from sagan.data.images import to_uint8
from sagan.utils.full_precision import full_precision


def labels_for(n: int, num_classes: int, choice: str | None, generator: torch.Generator) -> torch.Tensor | None:
    """The labels of n samples: None for an unconditional G; `choice` None draws uniform random classes, "all" cycles
    through them (sample i has class i mod K), an index gives that class to all."""
    if num_classes == 0:
        if choice is not None:
            raise ValueError(f"class={choice} given, but this generator is unconditional")
        return None
    if choice is None:
        return torch.randint(num_classes, (n,), generator=generator)
    if choice == "all":
        return torch.arange(n) % num_classes
    if not choice.isdigit() or int(choice) >= num_classes:
        raise ValueError(f"class must be 'all' or an index in [0, {num_classes}), got '{choice}'")
    return torch.full((n,), int(choice))


def latents(
    n: int, G: nn.Module, *, seed: int, choice: str | None = None, truncation: float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The n seeded latents (n, z_dim) of G, from N(0, I) or truncated to [-truncation, truncation], and their labels.

    Latents and labels come from two generators, each drawing in order, so latent and label i are the same for any
    n > i: the first images of a larger sample are the images of a smaller one.
    """
    generator = torch.Generator().manual_seed(seed)
    if truncation is None:
        z = torch.empty(n, G.z_dim).normal_(generator=generator)
    else:
        if truncation <= 0:
            raise ValueError(f"truncation must be > 0, got {truncation}")
        # Inverse CDF of uniform draws (in order, unlike torch's trunc_normal_, whose draws depend on n).
        low = 0.5 * (1 + math.erf(-truncation / math.sqrt(2)))
        p = low + torch.rand(n, G.z_dim, generator=generator, dtype=torch.float64) * (1 - 2 * low)
        z = (math.sqrt(2) * torch.erfinv(2 * p - 1)).clamp(-truncation, truncation).float()
    label_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1, dtype=np.uint64)[0])
    return z, labels_for(n, G.num_classes, choice, torch.Generator().manual_seed(label_seed))


def draw_batches(
    G: nn.Module,
    n: int,
    *,
    seed: int,
    choice: str | None = None,
    truncation: float | None = None,
    batch: int = 256,
    part: range | None = None,
) -> Iterator[torch.Tensor]:
    """Images `part` (default: all) of n seeded samples of G as it is (call it in eval mode), `batch` at a time:
    uint8 (B, 3, R, R) on the CPU.

    A pure function of the seed and arguments: all n latents and labels are drawn, so image i is the same whichever
    part is asked for and however it is batched.
    """
    z, y = latents(n, G, seed=seed, choice=choice, truncation=truncation)
    return _generate(G, z, y, range(n) if part is None else part, batch)


def draw(
    G: nn.Module,
    n: int,
    *,
    seed: int,
    choice: str | None = None,
    truncation: float | None = None,
    batch: int = 256,
    part: range | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`draw_batches` in one tensor, uint8 (len(part), 3, R, R), and the labels of those images (None if
    unconditional)."""
    z, y = latents(n, G, seed=seed, choice=choice, truncation=truncation)
    part = range(n) if part is None else part
    images = torch.empty((len(part), 3, G.resolution, G.resolution), dtype=torch.uint8)
    start = 0
    for chunk in _generate(G, z, y, part, batch):
        images[start : start + len(chunk)] = chunk
        start += len(chunk)
    return images, None if y is None else y[part.start : part.stop]


@torch.no_grad()
def _generate(G: nn.Module, z: torch.Tensor, y: torch.Tensor | None, part: range, batch: int) -> Iterator[torch.Tensor]:
    """In true fp32 (TF32 off): a sampling command and training's evaluation (which turned TF32 on) draw the same."""
    device = next(G.parameters()).device
    for i in range(part.start, part.stop, batch):
        j = min(i + batch, part.stop)
        with full_precision():
            images = G(z[i:j].to(device), None if y is None else y[i:j].to(device))
        yield to_uint8(images).cpu()
