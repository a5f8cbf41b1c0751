"""The one seeded sampler: `sagan-sample`, `sagan-fid`, in-training evaluation and figures all draw through it, so the
same checkpoint, seed, count and class choice give the same images everywhere (and so the same FID)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sagan.data.images import to_uint8
from sagan.utils.full_precision import full_precision
from sagan.utils.errors import UserError


def labels_for(n: int, num_classes: int, choice: str | None, generator: torch.Generator) -> torch.Tensor | None:
    """The labels of n samples: None for an unconditional G; `choice` None draws uniform random classes, "all" cycles
    through them (sample i has class i mod K), an index gives that class to all."""
    if num_classes == 0:
        if choice is not None:
            raise UserError(f"class={choice} given, but this generator is unconditional")
        return None
    if choice is None:
        return torch.randint(num_classes, (n,), generator=generator)
    if choice == "all":
        return torch.arange(n) % num_classes
    if not choice.isdigit() or int(choice) >= num_classes:
        raise UserError(f"class must be 'all' or an index in [0, {num_classes}), got '{choice}'")
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
            raise UserError(f"truncation must be > 0, got {truncation}")
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


INTERPOLATIONS = ("latent", "class")


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between the rows of a and b (B, D) at fractions t (T,): (B, T, D). Gaussian latents
    live near a sphere; a straight line between two of them passes through improbably short vectors."""
    a64, b64 = a.double(), b.double()
    cos = (F.normalize(a64, dim=1) * F.normalize(b64, dim=1)).sum(1).clamp(-1, 1)
    omega = torch.acos(cos)[:, None, None]  # (B, 1, 1)
    t = t.double()[None, :, None]  # (1, T, 1)
    sin = torch.sin(omega)
    safe = sin.abs() > 1e-6  # (nearly) parallel latents: a straight line is the same path
    wa = torch.where(safe, torch.sin((1 - t) * omega) / torch.where(safe, sin, 1), 1 - t)
    wb = torch.where(safe, torch.sin(t * omega) / torch.where(safe, sin, 1), t)
    return (wa * a64[:, None] + wb * b64[:, None]).to(a.dtype)


@torch.no_grad()
def interpolations(
    G: nn.Module, n: int, *, steps: int, seed: int, kind: str = "latent", choice: str | None = None, batch: int = 256
) -> torch.Tensor:
    """n seeded interpolations of `steps` images each, uint8 (n, steps, 3, R, R). `kind="latent"`: from latent 2i to
    latent 2i+1 of the seed, along the sphere (slerp), each row with the class `choice` picks (see labels_for);
    `kind="class"`: latent i of the seed, its class weights moving from one seeded class to another."""
    if kind not in INTERPOLATIONS:
        raise UserError(f"unknown interp '{kind}': choose one of {', '.join(INTERPOLATIONS)}")
    if steps < 2 or n < 1:
        raise UserError(f"an interpolation needs n >= 1 rows of steps >= 2 images, got n={n} steps={steps}")
    t = torch.linspace(0, 1, steps)
    if kind == "latent":
        z, y = latents(2 * n, G, seed=seed, choice=choice)
        z = slerp(z[0::2], z[1::2], t).reshape(n * steps, -1)
        y = None if y is None else y[0::2].repeat_interleave(steps)
    else:
        if G.num_classes < 2:
            raise UserError("interp=class needs a class-conditional generator with at least 2 classes")
        z, ends = latents(n, G, seed=seed)
        _, other = latents(n, G, seed=seed + 1)
        other = torch.where(other == ends, (ends + 1) % G.num_classes, other)  # two different classes per row
        onehot = F.one_hot(torch.stack([ends, other], 1), G.num_classes).float()  # (n, 2, K)
        y = ((1 - t)[None, :, None] * onehot[:, :1] + t[None, :, None] * onehot[:, 1:]).reshape(n * steps, -1)
        z = z.repeat_interleave(steps, dim=0)
    images = torch.cat(list(_generate(G, z, y, range(n * steps), batch)))
    return images.reshape(n, steps, *images.shape[1:])
