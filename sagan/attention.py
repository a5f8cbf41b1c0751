"""`sagan-attention`: attention maps of every attention layer of a checkpoint, as PNG files (one per layer): G on its
own samples, D on the same samples.

    sagan-attention ckpt=outputs/run/checkpoints/last.pt                      # -> outputs/run/attention/G_attn16.png ...
    sagan-attention ckpt=outputs/run/checkpoints/last.pt n=8 out=maps seed=3
    sagan-attention ckpt=outputs/run/checkpoints/last.pt query=[[0.5,0.2],[16,28]]   # below 1 a fraction, else a pixel
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from sagan.checkpoint import load_checkpoint, networks_from_checkpoint
from sagan.cli import parse_args, run_cli
from sagan.config import arg
from sagan.dist import resolve_device
from sagan.sampling import latents
from sagan.visualize import DEFAULT_QUERIES, generate, render_attention, to_pixels


@dataclass
class AttentionArgs:
    ckpt: str = arg(MISSING, "a checkpoint written by sagan-train")
    n: int = arg(8, "images (rows per figure)")
    query: Optional[list[list[float]]] = arg(None, "query points (row, col): below 1 a fraction of the image, else a pixel")
    out: Optional[str] = arg(None, "output folder; default attention/ beside the checkpoint's checkpoints/ folder")
    seed: int = arg(0, "seed of the samples")
    ema: bool = arg(True, "G_ema (false: the raw G)")
    device: str = arg("auto", "auto (GPU when there is one), cpu, cuda, cuda:N")


def render_checkpoint(args: Any) -> list[Path]:
    state = load_checkpoint(args.ckpt)
    device = resolve_device(args.device)
    G, D = networks_from_checkpoint(state, ema=args.ema, device=device)
    out = Path(args.out) if args.out else Path(args.ckpt).expanduser().resolve().parent.parent / "attention"
    out.mkdir(parents=True, exist_ok=True)
    z, y = latents(args.n, G, seed=args.seed)  # the first n images `sagan-sample seed=...` draws
    z, y = z.to(device), None if y is None else y.to(device)
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
    run_cli(lambda: render_checkpoint(parse_args(AttentionArgs, sys.argv[1:], doc=__doc__)))


if __name__ == "__main__":
    main()
