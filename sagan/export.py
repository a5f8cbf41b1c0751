"""`sagan-export`: a checkpoint's generator for serving, as an ONNX file, checked against PyTorch.

    sagan-export ckpt=outputs/run/checkpoints/last.pt format=onnx                 # -> outputs/run/G_ema.onnx
    sagan-export ckpt=outputs/run/checkpoints/last.pt format=onnx ema=false out=g.onnx

G_ema (or G) with spectral norm folded into plain weights, BatchNorm in eval mode, attention included (as MatMul and
Softmax), a dynamic batch axis, and the labels as an input `y` for a class-conditional model. The command runs the
file with onnxruntime on seeded latents and prints the largest difference from PyTorch's images.
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
from sagan.config import arg
from sagan.serving.folded import folded_generator
from sagan.serving.onnx_export import export_onnx, onnx_difference
from sagan.utils.errors import UserError

FORMATS = ("onnx",)


@dataclass
class ExportArgs:
    ckpt: str = arg(MISSING, "a sagan checkpoint (trained or imported)")
    format: str = arg("onnx", "onnx")
    out: Optional[str] = arg(None, "the file to write; default G_ema.onnx (G.onnx) beside the run's checkpoints/")
    ema: bool = arg(True, "G_ema (false: the raw G)")
    check_n: int = arg(16, "images of the check against PyTorch")
    seed: int = arg(0, "seed of the check's latents")
    max_batch: int = arg(4096, "the largest batch the file accepts")


def export(args: Any) -> tuple[Path, float]:
    """Write the file, check it; returns its path and the largest |onnxruntime - PyTorch| of the check."""
    if args.format not in FORMATS:
        raise UserError(f"unknown format '{args.format}': choose one of {', '.join(FORMATS)}")
    if args.check_n < 1:
        raise UserError(f"check_n must be >= 1, got {args.check_n}")
    state = load_checkpoint(args.ckpt)
    out = Path(args.out) if args.out else run_dir_of(args.ckpt) / f"{'G_ema' if args.ema else 'G'}.onnx"
    export_onnx(folded_generator(state, ema=args.ema), out, max_batch=args.max_batch)
    reference, _ = networks_from_checkpoint(state, ema=args.ema, device=torch.device("cpu"))
    difference, rounding = onnx_difference(out, reference, n=args.check_n, seed=args.seed)
    print(f"{out}: {'G_ema' if args.ema else 'G'} of {args.ckpt} (step {state['trainer']['step']}); "
          f"onnxruntime against PyTorch on {args.check_n} images: largest difference {difference:.2e} "
          f"(PyTorch fp32 against fp64: {rounding:.2e})")  # fmt: skip
    return out, difference


def main() -> None:
    run_cli(lambda: export(parse_args(ExportArgs, sys.argv[1:], doc=__doc__)))


if __name__ == "__main__":
    main()
