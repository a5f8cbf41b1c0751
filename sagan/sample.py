"""`sagan-sample ckpt=PATH [n=64] [out=DIR] [format=png|grid|npz] [seed=0] [class=3|all] [truncation=1.0]`

Images from a checkpoint's generator (G_ema by default). The same seed gives the same images. `class=3` draws only
class 3 of a class-conditional model, `class=all` cycles through the classes (image i has class i mod K), no
`class` draws uniform random labels. `truncation=t` samples z from a normal truncated to [-t, t] (the
BigGAN trade of variety for quality).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import MISSING
from PIL import Image

from sagan.checkpoint import load_checkpoint, networks_from_checkpoint
from sagan.cli import parse_args, run_cli
from sagan.data import to_float, to_uint8
from sagan.dist import resolve_device
from sagan.visualize import save_grid

FORMATS = ("png", "grid", "npz")


@dataclass
class SampleArgs:
    ckpt: str = MISSING
    n: int = 64
    out: str = "samples"
    format: str = "png"  # png: one file per image | grid: one grid.png | npz: samples.npz, uint8 NHWC + labels
    seed: int = 0
    class_: Optional[str] = None  # given on the command line as class=...: an index, "all", or none for random
    truncation: Optional[float] = None
    ema: bool = True
    batch: int = 256
    device: str = "auto"


def labels_for(n: int, num_classes: int, choice: str | None, generator: torch.Generator) -> torch.Tensor | None:
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


@torch.no_grad()
def draw(
    G: torch.nn.Module,
    n: int,
    *,
    seed: int,
    choice: str | None,
    truncation: float | None,
    batch: int,
    part: range | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images `part` (default: all) of n seeded samples (uint8, (len(part), 3, R, R), on the CPU) and their labels.

    A pure function of the seed and arguments: every latent and label of the n is drawn, so image i is the same
    whichever part is asked for and however it is batched.
    """
    generator = torch.Generator().manual_seed(seed)
    z = torch.empty(n, G.z_dim)
    if truncation is None:
        z.normal_(generator=generator)
    else:
        if truncation <= 0:
            raise ValueError(f"truncation must be > 0, got {truncation}")
        torch.nn.init.trunc_normal_(z, a=-truncation, b=truncation, generator=generator)
    y = labels_for(n, G.num_classes, choice, generator)
    part = range(n) if part is None else part
    device = next(G.parameters()).device
    images = torch.empty((len(part), 3, G.resolution, G.resolution), dtype=torch.uint8)
    for i in range(part.start, part.stop, batch):
        j = min(i + batch, part.stop)
        out = G(z[i:j].to(device), None if y is None else y[i:j].to(device))
        images[i - part.start : j - part.start] = to_uint8(out).cpu()
    return images, None if y is None else y[part.start : part.stop]


def sample(args: Any) -> Path:
    if args.format not in FORMATS:
        raise ValueError(f"unknown format '{args.format}': choose one of {', '.join(FORMATS)}")
    if args.n < 1:
        raise ValueError(f"n must be >= 1, got {args.n}")
    state = load_checkpoint(args.ckpt)
    G, _ = networks_from_checkpoint(state, ema=args.ema, device=resolve_device(args.device))
    images, labels = draw(G, args.n, seed=args.seed, choice=args.class_, truncation=args.truncation, batch=args.batch)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if args.format == "npz":
        path = out / "samples.npz"
        arrays = {"images": images.permute(0, 2, 3, 1).numpy()}  # NHWC, as TF-based metric code expects
        if labels is not None:
            arrays["labels"] = labels.numpy()
        np.savez(path, **arrays)
    elif args.format == "grid":
        path = out / "grid.png"
        save_grid(to_float(images), path)
    else:
        for i, image in enumerate(images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / f"{i:06d}.png")
        path = out
    print(f"{args.n} images from {args.ckpt} (step {state['trainer']['step']}) written to {path}")
    return path


def main() -> None:
    # `class` is a Python keyword, so the schema field is `class_`; users still type class=3.
    argv = [f"class_={a[len('class='):]}" if a.startswith("class=") else a for a in sys.argv[1:]]
    run_cli(lambda: sample(parse_args(SampleArgs, argv)))


if __name__ == "__main__":
    main()
