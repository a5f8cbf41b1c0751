"""A generator as an ONNX file (torch.onnx's exporter, a dynamic batch axis, labels as an input for a conditional
model), checked with onnxruntime against PyTorch on the same seeded latents. The attention block exports as what it
computes, MatMul and Softmax over the pooled keys (scaled_dot_product_attention decomposed by the exporter)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sagan.evaluation.sampling import latents
from sagan.utils.atomic_files import atomic_write

NEEDED = ("onnx", "onnxscript", "onnxruntime")


def check_installed() -> None:
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"sagan-export needs {', '.join(missing)}: pip install -e '.[export]' (or pip install {' '.join(missing)})"
        )


def export_onnx(G: nn.Module, path: Path, *, max_batch: int = 4096) -> Path:
    """Write G (in eval mode, without parametrizations: sagan.serving.folded) to `path`: inputs `z` (B, z_dim) float32
    and, for a class-conditional G, `y` (B,) int64; output `images` (B, 3, R, R) in [-1, 1]; B from 1 to max_batch."""
    check_installed()
    z, y = latents(2, G, seed=0)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    inputs, names, shapes = (z,), ["z"], {"z": {0: batch}}
    if y is not None:
        inputs, names, shapes = (z, y), ["z", "y"], {"z": {0: batch}, "y": {0: batch}}
    program = torch.onnx.export(G, inputs, input_names=names, output_names=["images"], dynamic_shapes=shapes, dynamo=True)
    atomic_write(path, program.model_proto.SerializeToString())  # a failed export leaves an older file whole
    return path


def onnx_difference(path: Path, G: nn.Module, *, n: int, seed: int) -> tuple[float, float]:
    """The largest |difference| between onnxruntime's images and PyTorch's (fp32, eval mode) for n seeded latents
    (and labels), the check that the file computes G; and, for scale, the largest |difference| between PyTorch's fp32
    and fp64 images of the same latents (how far two correct fp32 computations may lie apart)."""
    check_installed()
    import onnxruntime

    z, y = latents(n, G, seed=seed)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"z": z.numpy()} if y is None else {"z": z.numpy(), "y": y.numpy()}
    (served,) = session.run(["images"], feed)
    with torch.no_grad():
        reference = G(z, y)
        exact = copy.deepcopy(G).double()(z.double(), y)
    return float(np.abs(served - reference.numpy()).max()), (reference.double() - exact).abs().max().item()
