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
from omegaconf import MISSING, OmegaConf

from sagan.checkpoint import load_checkpoint
from sagan.cli import run_cli
from sagan.dist import resolve_device
from sagan.models import Discriminator, Generator
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


def parse_args(schema: type, argv: list[str]) -> Any:
    """key=value arguments checked against a dataclass: unknown keys and wrong types fail with one line."""
    return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(argv))


def load_networks(state: dict[str, Any], ema: bool, device: torch.device) -> tuple[Generator, Discriminator]:
    """G (or G_ema) and D of a checkpoint, rebuilt from the model settings it records."""
    from sagan.train import build_models  # the same builder training used

    model = OmegaConf.create(state["model"])
    G, D = build_models(model, model.num_classes)
    G.load_state_dict(state["trainer"]["G_ema" if ema else "G"])
    D.load_state_dict(state["trainer"]["D"])
    return G.to(device).eval(), D.to(device).eval()


def render_checkpoint(args: Any) -> list[Path]:
    state = load_checkpoint(args.ckpt)
    device = resolve_device(args.device)
    G, D = load_networks(state, args.ema, device)
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
