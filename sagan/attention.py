"""`sagan-attention ckpt=PATH [n=8] [query=[[0.3,0.25],[0.3,0.75]]] [out=DIR] [seed=0] [ema=true]`

Attention maps of every attention layer of a checkpoint, as PNG files (one per layer): G on its own samples, D on
the same samples.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import MISSING

from sagan.checkpoint import load_checkpoint, networks_from_checkpoint
from sagan.cli import parse_args, run_cli
from sagan.dist import resolve_device
from sagan.visualize import DEFAULT_QUERIES, generate, render_attention, to_pixels


@dataclass
class AttentionArgs:
    ckpt: str = MISSING  # a checkpoint written by sagan-train
    n: int = 8  # images (rows per figure)
    query: Optional[list[list[float]]] = None  # (row, col): < 1 a fraction of the image, >= 1 a pixel
    out: Optional[str] = None  # default: attention/ beside the checkpoint's checkpoints/ folder
    seed: int = 0
    ema: bool = True  # the EMA generator (false: the raw G)
    device: str = "auto"


def render_checkpoint(args: Any) -> list[Path]:
    state = load_checkpoint(args.ckpt)
    device = resolve_device(args.device)
    G, D = networks_from_checkpoint(state, ema=args.ema, device=device)
    out = Path(args.out) if args.out else Path(args.ckpt).expanduser().resolve().parent.parent / "attention"
    out.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.n, G.z_dim, generator=rng).to(device)
    y = (torch.arange(args.n) % G.num_classes).to(device) if G.num_classes else None
    images = generate(G, z, y)
    queries = to_pixels(args.query or DEFAULT_QUERIES, G.resolution)
    figures = render_attention(G, lambda: G(z, y), images, queries, "G")
    figures |= render_attention(D, lambda: D(images, y), images, queries, "D")
    if not figures:
        raise ValueError(f"'{args.ckpt}' has no attention layers (model.g_attn and model.d_attn are empty)")
    paths = []
    for key, figure in figures.items():
        paths.append(out / f"{key}.png")
        figure.save(paths[-1])
        print(paths[-1])
    return paths


def main() -> None:
    run_cli(lambda: render_checkpoint(parse_args(AttentionArgs, sys.argv[1:])))


if __name__ == "__main__":
    main()
