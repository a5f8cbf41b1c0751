"""A generator as an ONNX file (torch.onnx's exporter, a dynamic batch axis, labels as an input for a conditional
model), checked with onnxruntime against PyTorch on the same seeded latents before it is written. The attention block
exports as what it computes, MatMul and Softmax over the pooled keys (scaled_dot_product_attention decomposed by the
exporter)."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import torch
from torch import nn

from sagan.evaluation.sampling import latents
from sagan.utils.errors import UserError

NEEDED = ("onnx", "onnxscript", "onnxruntime")


class MissingExtra(UserError, ModuleNotFoundError):
    """The export extra is not installed: one line saying what to install."""


def check_installed() -> None:
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtra(
            f"sagan-export needs {', '.join(missing)}: pip install -e '.[export]' (or pip install {' '.join(missing)})"
        )


# The check's tolerance: TOLERANCE_ROUNDINGS times PyTorch's own fp32 rounding (its fp32 images against fp64 ones),
# at least TOLERANCE_FLOOR. onnxruntime's kernels round differently (other summation orders, their own exp and tanh):
# two correct fp32 computations lie about one rounding apart (measured 0.6x and 1.2x, docs/serving.md), and 10x leaves
# room for that. The floor keeps a model whose rounding happens to be tiny from failing on kernel noise; 1e-5 is under
# a 700th of one 8-bit level of an image in [-1, 1] (2/255), so nothing that passes can change an image one can see.
TOLERANCE_ROUNDINGS = 10
TOLERANCE_FLOOR = 1e-5


def onnx_tolerance(rounding: float) -> float:
    """The largest |onnxruntime - PyTorch| the check accepts, given PyTorch's fp32-against-fp64 difference."""
    return max(TOLERANCE_ROUNDINGS * rounding, TOLERANCE_FLOOR)


def onnx_model(G: nn.Module, *, max_batch: int = 4096) -> bytes:
    """G (in eval mode, without parametrizations: sagan.serving.folded) as an ONNX model's bytes: inputs `z` (B, z_dim)
    float32 and, for a class-conditional G, `y` (B,) int64; output `images` (B, 3, R, R) in [-1, 1]; B from 1 to
    max_batch."""
    check_installed()
    z, y = latents(2, G, seed=0)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    inputs, names, shapes = (z,), ["z"], {"z": {0: batch}}
    if y is not None:
        inputs, names, shapes = (z, y), ["z", "y"], {"z": {0: batch}, "y": {0: batch}}
    program = torch.onnx.export(G, inputs, input_names=names, output_names=["images"], dynamic_shapes=shapes, dynamo=True)
    return program.model_proto.SerializeToString()


def onnx_difference(model: bytes, G: nn.Module, *, n: int, seed: int) -> tuple[float, float]:
    """The largest |difference| between onnxruntime's images (of the model's bytes) and PyTorch's (fp32,
    eval mode) for n seeded latents (and labels), the check that the model computes G; and, for scale, the largest
    |difference| between PyTorch's fp32 and fp64 images of the same latents (how far two correct fp32 computations may
    lie apart)."""
    check_installed()
    import onnxruntime

    z, y = latents(n, G, seed=seed)
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    feed = {"z": z.numpy()} if y is None else {"z": z.numpy(), "y": y.numpy()}
    (served,) = session.run(["images"], feed)
    with torch.no_grad():
        reference = G(z, y)
        exact = copy.deepcopy(G).double()(z.double(), y)
    return float(np.abs(served - reference.numpy()).max()), (reference.double() - exact).abs().max().item()
