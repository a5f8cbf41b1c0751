"""BatchNorm statistics that belong to a generator's own weights ("standing statistics", BigGAN's term).

G_ema's weights are an average over thousands of steps; G's running statistics describe G's current weights, not
that average. Standing statistics are re-estimated by running G_ema itself in train mode over a number of latent
batches and taking the plain average of the batch statistics, then frozen (eval mode) for sampling.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sagan.training.power_iteration import power_iteration_paused


@torch.no_grad()
def standing_statistics(G: nn.Module, *, batches: int, batch_size: int, seed: int) -> None:
    """Replace the running mean and variance of every BatchNorm in G by their average over `batches` batches of
    `batch_size` seeded latents (and uniform labels), leaving G in eval mode.

    A pure function of G's weights and the arguments: the latents come from their own generator (no global RNG is
    touched), and the spectral-norm vectors and the weights are left as they are.
    """
    norms = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
    device = next(G.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    G.train()
    try:
        with power_iteration_paused(G):
            for _ in range(batches):
                z = torch.randn(batch_size, G.z_dim, generator=generator)
                y = torch.randint(G.num_classes, (batch_size,), generator=generator) if G.num_classes else None
                G(z.to(device), None if y is None else y.to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        G.eval()


@contextmanager
def bn_statistics_paused(G: nn.Module) -> Iterator[None]:
    """G's BatchNorms normalise with batch statistics inside the block but leave their running statistics (and
    counters) as they are: StudioGAN's D step runs G this way."""
    norms = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def is_bn_statistic(buffer_name: str) -> bool:
    """Whether a buffer (by its name in a state dict) is a BatchNorm running statistic."""
    return buffer_name.endswith(("running_mean", "running_var", "num_batches_tracked"))
