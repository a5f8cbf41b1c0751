"""`sagan-attention`: the attention maps of every attention layer of a checkpoint: G_ema on its own samples, D on
those samples and on real images of the data the run trained on.

    sagan-attention ckpt=outputs/run/checkpoints/last.pt format=html out=explorer    # explorer/attention.html
    sagan-attention ckpt=outputs/run/checkpoints/last.pt                     # -> outputs/run/attention/G_attn16.png ...
    sagan-attention ckpt=outputs/run/checkpoints/last.pt query=[[0.5,0.2],[16,28]]   # below 1 a fraction, else a pixel

format=html writes one self-contained page (no network) to explore every query position of every layer: open it in
any browser, point at a pixel; `attention.html#layer=G_attn16&image=2&query=5,7` opens a given view. format=png
writes one figure per layer for a few query points (`query`). The samples are those `sagan-sample seed=...` draws.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import MISSING

from sagan.checkpoint import load_checkpoint, networks_from_checkpoint, run_dir_of
from sagan.cli import parse_args, run_cli
from sagan.visualization.explorer import explorer_page
from sagan.config import arg
from sagan.data.dataset_base import DatasetError
from sagan.data.datasets import training_dataset
from sagan.utils.processes import resolve_device
from sagan.data.images import to_float
from sagan.evaluation.sampling import latents
from sagan.visualization.figures import DEFAULT_QUERIES, generate, render_attention, to_pixels
from sagan.utils.errors import UserError


@dataclass
class AttentionArgs:
    ckpt: str = arg(MISSING, "a checkpoint written by sagan-train")
    format: str = arg("png", "png: a figure per layer for the query points | html: the interactive explorer page")
    n: int = arg(8, "generated images (and as many real ones for D)")
    query: Optional[list[list[Any]]] = arg(None, "png: query points (row, col), below 1 a fraction of the image, else a pixel")
    real: bool = arg(True, "also show D on real images of the run's training data (when it can be read here)")
    out: Optional[str] = arg(None, "output folder; default attention/ beside the checkpoint's checkpoints/ folder")
    seed: int = arg(0, "seed of the samples")
    ema: bool = arg(True, "G_ema (false: the raw G)")
    device: str = arg("auto", "auto (GPU when there is one), cpu, cuda, cuda:N")


def render_checkpoint(args: Any) -> list[Path]:
    """Write the figures (format=png) or the page (format=html) of a checkpoint; returns the files written."""
    if args.format not in ("png", "html"):
        raise UserError(f"unknown format '{args.format}': choose png or html")
    state = load_checkpoint(args.ckpt)
    device = resolve_device(args.device)
    G, D = networks_from_checkpoint(state, ema=args.ema, device=device)
    out = Path(args.out) if args.out else run_dir_of(args.ckpt) / "attention"
    out.mkdir(parents=True, exist_ok=True)
    z, y = latents(args.n, G, seed=args.seed)  # the first n images `sagan-sample seed=...` draws
    z, y = z.to(device), None if y is None else y.to(device)
    if args.format == "html":
        real, y_real = real_images(state, args.n, G.num_classes, device) if args.real and D is not None else (None, None)
        title = f"{args.ckpt} (step {state['trainer']['step']}): {'G_ema' if args.ema else 'G'} on its samples" + (
            "" if D is None else ", D on them" + (" and on real images" if real is not None else "")
        )
        path = out / "attention.html"
        path.write_text(explorer_page(G, D, z=z, y=y, real=real, y_real=y_real, title=title))
        print(path)
        return [path]
    images = generate(G, z, y)
    queries = to_pixels(args.query or DEFAULT_QUERIES, G.resolution)
    figures = render_attention(G, lambda: G(z, y), images, queries, "G")
    if D is not None:
        figures |= render_attention(D, lambda: D(images, y), images, queries, "D")
    if not figures:
        raise UserError(
            f"'{args.ckpt}' has no attention maps to draw: model.g_attn and model.d_attn are empty, or its "
            f"model.attn_type ('{state['model'].get('attn_type', 'sagan')}') has none (se, residual)"
        )
    paths = []
    for key, figure in figures.items():
        paths.append(out / f"{key}.png")
        figure.save(paths[-1])
        print(paths[-1])
    return paths


def real_images(state: dict, n: int, num_classes: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """n images (in [-1, 1]) and labels of the data the checkpoint trained on, spread over it; (None, None) with a
    warning when that data cannot be read here."""
    try:
        dataset = training_dataset(state["config"], resolution=state["model"]["resolution"], labels=num_classes > 0)
    except DatasetError as err:
        print(f"warning: D is shown on generated images only: the training data cannot be read here ({err})", file=sys.stderr)
        return None, None
    picks = [dataset[i * len(dataset) // n] for i in range(min(n, len(dataset)))]
    images = to_float(torch.stack([image for image, _ in picks])).to(device)
    labels = torch.tensor([label for _, label in picks], device=device) if num_classes else None
    return images, labels


def main() -> None:
    run_cli(lambda: render_checkpoint(parse_args(AttentionArgs, sys.argv[1:], doc=__doc__)))


if __name__ == "__main__":
    main()
