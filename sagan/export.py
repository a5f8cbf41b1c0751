"""`sagan-export`: a checkpoint's generator for serving, as an ONNX file, checked against PyTorch.

    sagan-export ckpt=outputs/run/checkpoints/last.pt format=onnx                 # -> outputs/run/G_ema.onnx
    sagan-export ckpt=outputs/run/checkpoints/last.pt format=onnx ema=false out=g.onnx

G_ema (or G) with spectral norm folded into plain weights, BatchNorm in eval mode, attention included (as MatMul and
Softmax), a dynamic batch axis, and the labels as an input `y` for a class-conditional model. Before writing, the
command runs the model with onnxruntime on seeded latents against PyTorch's images: beyond the tolerance (10x PyTorch's
own fp32-against-fp64 difference, at least 1e-5) it stops with an error and writes nothing.
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
from sagan.serving.onnx_export import TOLERANCE_FLOOR, TOLERANCE_ROUNDINGS, onnx_difference, onnx_model, onnx_tolerance
from sagan.utils.atomic_files import atomic_write
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
    """Export, check against PyTorch, then write the file; returns its path and the largest |onnxruntime - PyTorch|
    of the check. A model beyond the check's tolerance raises UserError and writes nothing."""
    if args.format not in FORMATS:
        raise UserError(f"unknown format '{args.format}': choose one of {', '.join(FORMATS)}")
    if args.check_n < 1:
        raise UserError(f"check_n must be >= 1, got {args.check_n}")
    state = load_checkpoint(args.ckpt)
    net = "G_ema" if args.ema else "G"
    out = Path(args.out) if args.out else run_dir_of(args.ckpt) / f"{net}.onnx"
    model = onnx_model(folded_generator(state, ema=args.ema), max_batch=args.max_batch)
    reference, _ = networks_from_checkpoint(state, ema=args.ema, device=torch.device("cpu"))
    difference, rounding = onnx_difference(model, reference, n=args.check_n, seed=args.seed)
    tolerance = onnx_tolerance(rounding)
    checked = (f"onnxruntime against PyTorch on {args.check_n} images: largest difference {difference:.2e}, tolerance "
               f"{tolerance:.2e} ({TOLERANCE_ROUNDINGS}x PyTorch's fp32-against-fp64 difference {rounding:.2e}, at least "
               f"{TOLERANCE_FLOOR:.0e})")  # fmt: skip
    if not difference <= tolerance:  # (a NaN fails too)
        raise UserError(f"the ONNX model does not compute {net} of {args.ckpt}: {checked}; nothing written"
                        f"{f' ({out} left as it was)' if out.exists() else ''}; please report it with your torch, "
                        f"onnx and onnxruntime versions")  # fmt: skip
    atomic_write(out, model)  # a failed write leaves an older file whole
    print(f"{out}: {net} of {args.ckpt} (step {state['trainer']['step']}); {checked}")
    return out, difference


def main() -> None:
    run_cli(lambda: export(parse_args(ExportArgs, sys.argv[1:], doc=__doc__)))


if __name__ == "__main__":
    main()
