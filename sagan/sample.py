"""`sagan-sample`: images from a checkpoint's generator (G_ema by default), as PNG files, one grid or an .npz.

    sagan-sample ckpt=outputs/run/checkpoints/last.pt n=64 out=samples                # 64 PNG files
    sagan-sample ckpt=outputs/run/checkpoints/last.pt n=100 format=grid class=all     # one grid, classes in turn
    sagan-sample ckpt=outputs/run/checkpoints/last.pt n=50000 format=npz seed=1       # uint8 NHWC + labels
    sagan-sample ckpt=outputs/run/checkpoints/last.pt n=8 format=interp steps=12      # interp.png and interp.gif

The same seed gives the same images (and `sagan-fid` with that seed evaluates exactly these). `class=3` draws only
class 3 of a class-conditional model, `class=all` cycles through the classes (image i has class i mod K), no `class`
draws uniform random labels. `truncation=t` samples z from a normal truncated to [-t, t] (the BigGAN trade of
variety for quality). `format=interp` draws n interpolations of `steps` images: between two seeded latents along the
sphere (`interp=latent`), or, for a class-conditional model, from one class to another at a fixed latent
(`interp=class`); a grid (one row per interpolation) and an animated GIF going back and forth.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import MISSING
from PIL import Image

from sagan.checkpoint import load_checkpoint, networks_from_checkpoint
from sagan.cli import parse_args, run_cli
from sagan.config import arg
from sagan.utils.processes import resolve_device
from sagan.data.images import to_float
from sagan.evaluation.sampling import draw, interpolations
from sagan.visualization.figures import save_grid, save_interpolations
from sagan.utils.errors import UserError

FORMATS = ("png", "grid", "npz", "interp")


@dataclass
class SampleArgs:
    ckpt: str = arg(MISSING, "a checkpoint written by sagan-train")
    n: int = arg(64, "number of images")
    out: str = arg("samples", "output folder")
    format: str = arg("png", "png: one file per image | grid: one grid.png | npz: samples.npz, uint8 NHWC + labels | interp")
    steps: int = arg(8, "interp: images per interpolation")
    interp: str = arg("latent", "interp: latent (slerp between two latents) | class (between two classes, one latent)")
    seed: int = arg(0, "seed of the latents (and labels)")
    class_: Optional[str] = arg(None, "a class index, all (in turn), or unset for uniform random classes")
    truncation: Optional[float] = arg(None, "sample z from a normal truncated to [-t, t]")
    ema: bool = arg(True, "G_ema (false: the raw G)")
    batch: int = arg(256, "images per generator batch")
    device: str = arg("auto", "auto (GPU when there is one), cpu, cuda, cuda:N")


def sample(args: Any) -> Path:
    if args.format not in FORMATS:
        raise UserError(f"unknown format '{args.format}': choose one of {', '.join(FORMATS)}")
    if args.n < 1:
        raise UserError(f"n must be >= 1, got {args.n}")
    state = load_checkpoint(args.ckpt)
    G, _ = networks_from_checkpoint(state, ema=args.ema, device=resolve_device(args.device))
    out = Path(args.out).expanduser()
    if args.format == "interp":
        rows = interpolations(G, args.n, steps=args.steps, seed=args.seed, kind=args.interp, choice=args.class_, batch=args.batch)
        paths = save_interpolations(rows, out)
        print(f"{args.n} {args.interp} interpolations of {args.steps} images from {args.ckpt} written to {', '.join(map(str, paths))}")
        return out
    images, labels = draw(G, args.n, seed=args.seed, choice=args.class_, truncation=args.truncation, batch=args.batch)
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
    run_cli(lambda: sample(parse_args(SampleArgs, argv, doc=__doc__)))


if __name__ == "__main__":
    main()
