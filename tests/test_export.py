import copy
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import compose_config
from sagan.checkpoint import load_checkpoint, networks_from_checkpoint
from sagan.cli import parse_args
from sagan.evaluation.sampling import latents
from sagan.export import ExportArgs, export
from sagan.serving.folded import folded_generator
from sagan.training.loop import train

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs the export extra (onnx, onnxscript, onnxruntime)",
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny conditional and a tiny unconditional run, both with an attention layer in G, trained 2 steps."""
    out = {}
    for name, extra in (("cond", ["model.conditional=true"]), ("uncond", [])):
        run = tmp_path_factory.mktemp(name)
        overrides = ["experiment=demo", "model.g_ch=4", "model.d_ch=4", "data.size=16", "train.batch_size=4",
                     "train.steps=2", "logger.num_samples=4", "logger.attn_images=1", "logger.mode=disabled", *extra]  # fmt: skip
        train(compose_config(*overrides), run)
        out[name] = run / "checkpoints" / "last.pt"
    return out


def fp32_rounding(G: torch.nn.Module, z: torch.Tensor, y: torch.Tensor | None) -> float:
    """How far PyTorch's own fp32 images lie from its fp64 ones: the scale of rounding another runtime may differ by."""
    with torch.no_grad():
        return (G(z, y).double() - copy.deepcopy(G).double()(z.double(), y)).abs().max().item()


@pytest.mark.parametrize("kind", ["cond", "uncond"])
def test_folding_spectral_norm_keeps_the_function(checkpoints, kind):
    state = load_checkpoint(checkpoints[kind])
    folded = folded_generator(state, ema=True)
    G, _ = networks_from_checkpoint(state, ema=True, device=torch.device("cpu"))
    assert not any(hasattr(m, "parametrizations") for m in folded.modules())
    assert any(hasattr(m, "parametrizations") for m in G.modules())  # the original keeps its spectral norms
    z, y = latents(5, G, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(folded(z, y), G(z, y), rtol=0, atol=1e-6)


@needs_onnx
@pytest.mark.parametrize("kind", ["cond", "uncond"])
def test_onnx_file_computes_the_generator_at_any_batch(checkpoints, kind, tmp_path):
    import onnxruntime

    out, difference = export(parse_args(ExportArgs, [f"ckpt={checkpoints[kind]}", f"out={tmp_path / 'g.onnx'}", "check_n=3"]))
    state = load_checkpoint(checkpoints[kind])
    folded = folded_generator(state, ema=True)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == (["z", "y"] if kind == "cond" else ["z"])
    for n in (1, 5):  # a dynamic batch axis: other sizes than the export's
        z, y = latents(n, folded, seed=n)
        feed = {"z": z.numpy(), **({"y": y.numpy()} if y is not None else {})}
        (images,) = session.run(["images"], feed)
        with torch.no_grad():
            expected = folded(z, y).numpy()
        assert images.shape == (n, 3, 32, 32)
        tolerance = 10 * fp32_rounding(folded, z, y)
        assert 0 < tolerance < 1e-3 and np.abs(images - expected).max() <= tolerance, (np.abs(images - expected).max(), tolerance)
    assert difference <= 10 * fp32_rounding(folded, *latents(3, folded, seed=0))


@needs_onnx
def test_onnx_graph_holds_the_attention_block(checkpoints, tmp_path):
    import onnx

    out, _ = export(parse_args(ExportArgs, [f"ckpt={checkpoints['cond']}", f"out={tmp_path / 'g.onnx'}", "check_n=1"]))
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"Softmax", "MatMul"} <= ops  # the attention block, as the maths it computes


@pytest.mark.slow
def test_sagan_export_cli_writes_beside_the_run_and_fails_in_one_line(checkpoints, tmp_path):
    bin_dir = f"{sys.prefix}/bin"
    result = subprocess.run([f"{bin_dir}/sagan-export", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "sagan-export ckpt=" in result.stdout and "check_n" in result.stdout
    result = subprocess.run([f"{bin_dir}/sagan-export", f"ckpt={checkpoints['uncond']}", "check_n=2"], capture_output=True, text=True)
    written = checkpoints["uncond"].parent.parent / "G_ema.onnx"  # beside the run's checkpoints/
    assert result.returncode == 0 and written.is_file() and f"{written}: G_ema of" in result.stdout
    bad = subprocess.run([f"{bin_dir}/sagan-export", f"ckpt={tmp_path / 'none.pt'}"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "none.pt" in bad.stderr
    bad = subprocess.run([f"{bin_dir}/sagan-export", f"ckpt={checkpoints['cond']}", "format=tflite"], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown format 'tflite'" in bad.stderr
