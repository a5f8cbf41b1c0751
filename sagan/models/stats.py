"""Parameter counts and forward FLOPs, for choosing a preset and for utilisation figures in benchmarks."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from sagan.models.discriminator import Discriminator
from sagan.models.generator import Generator


@torch.no_grad()
def model_stats(G: Generator, D: Discriminator) -> dict[str, float]:
    """Parameters (millions) and forward GFLOP per image of G and D (a multiply-add counts as 2 FLOP)."""
    modes = G.training, D.training
    G.eval(), D.eval()  # no power iteration, BN in inference mode: counting leaves the models untouched
    device = next(G.parameters()).device
    z = torch.zeros(2, G.z_dim, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device) if G.num_classes else None
    with FlopCounterMode(display=False) as g_flops:
        x = G(z, y)
    with FlopCounterMode(display=False) as d_flops:
        D(x, y)
    G.train(modes[0]), D.train(modes[1])
    return {
        "G_params_M": sum(p.numel() for p in G.parameters()) / 1e6,
        "D_params_M": sum(p.numel() for p in D.parameters()) / 1e6,
        "G_gflop": g_flops.get_total_flops() / 2 / 1e9,
        "D_gflop": d_flops.get_total_flops() / 2 / 1e9,
    }
