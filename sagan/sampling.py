"""The one seeded sampler: `sagan-sample`, `sagan-fid`, in-training evaluation and figures all draw through it, so the
same checkpoint, seed, count and class choice give the same images everywhere (and so the same FID)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from sagan.images import to_uint8


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


def rank_part(n: int, rank: int, world_size: int) -> range:
    """The contiguous part of n items that `rank` of `world_size` takes (the first ranks take one more if needed)."""
    share, extra = divmod(n, world_size)
    start = rank * share + min(rank, extra)
    return range(start, start + share + (rank < extra))


def latents(
    n: int, G: nn.Module, *, seed: int, choice: str | None = None, truncation: float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The n seeded latents (n, z_dim) of G, from N(0, I) or truncated to [-truncation, truncation], and their labels."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.empty(n, G.z_dim)
    if truncation is None:
        z.normal_(generator=generator)
    else:
        if truncation <= 0:
            raise ValueError(f"truncation must be > 0, got {truncation}")
        torch.nn.init.trunc_normal_(z, a=-truncation, b=truncation, generator=generator)
    return z, labels_for(n, G.num_classes, choice, generator)


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
    device = next(G.parameters()).device
    for i in range(part.start, part.stop, batch):
        j = min(i + batch, part.stop)
        yield to_uint8(G(z[i:j].to(device), None if y is None else y[i:j].to(device))).cpu()
