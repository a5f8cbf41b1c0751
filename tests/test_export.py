"""`sagan-export`: spectral norm folded without changing G, an ONNX file that computes G at any batch, and a check
against PyTorch that fails, in one line and writing nothing, when the graph computes something else: shown on a G
whose attention branch carries as much of its layer's output as its input does (two training steps leave it ~1e-4),
with the graph's attention broken three ways."""

import copy
import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import sagan.export
from conftest import run_command, run_copy
from sagan.checkpoint import load_checkpoint, networks_from_checkpoint, serialize
from sagan.cli import parse_args
from sagan.evaluation.sampling import latents
from sagan.export import ExportArgs, export
from sagan.models import attention_shares
from sagan.serving.folded import folded_generator
from sagan.utils.errors import UserError

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs the export extra (onnx, onnxscript, onnxruntime)",
)


def fp32_rounding(G: torch.nn.Module, z: torch.Tensor, y: torch.Tensor | None) -> float:
    """How far PyTorch's own fp32 images lie from its fp64 ones: the scale of rounding another runtime may differ by."""
    with torch.no_grad():
        return (G(z, y).double() - copy.deepcopy(G).double()(z.double(), y)).abs().max().item()


@pytest.mark.parametrize("kind", ["cond", "uncond"])
def test_folding_spectral_norm_keeps_the_function(trained, kind):
    state = load_checkpoint(trained[kind])
    folded = folded_generator(state, ema=True)
    G, _ = networks_from_checkpoint(state, ema=True, device=torch.device("cpu"))
    assert not any(hasattr(m, "parametrizations") for m in folded.modules())
    assert any(hasattr(m, "parametrizations") for m in G.modules())  # the original keeps its spectral norms
    z, y = latents(5, G, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(folded(z, y), G(z, y), rtol=0, atol=1e-6)


@needs_onnx
@pytest.mark.parametrize("kind", ["cond", "uncond"])
def test_onnx_file_computes_the_generator_at_any_batch(trained, kind, tmp_path):
    import onnxruntime

    out, difference = export(parse_args(ExportArgs, [f"ckpt={trained[kind]}", f"out={tmp_path / 'g.onnx'}", "check_n=3"]))
    state = load_checkpoint(trained[kind])
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
def test_onnx_graph_holds_the_attention_block(trained, tmp_path):
    import onnx

    out, _ = export(parse_args(ExportArgs, [f"ckpt={trained['cond']}", f"out={tmp_path / 'g.onnx'}", "check_n=1"]))
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"Softmax", "MatMul"} <= ops  # the attention block, as the maths it computes


def attention_heavy(ckpt: Path, out: Path, share: float = 1.0) -> float:
    """Write to `out` the checkpoint with G_ema's attention gamma set so that the branch carries `share` of its
    layer's output, ||gamma o|| / ||x||, on the export check's latents (16, seed 0): gamma is the knob, as the folded
    weights are W / sigma whatever the stored W. Returns the share measured at that gamma."""
    state = load_checkpoint(ckpt)
    weights = state["trainer"]["G_ema"]
    (gamma,) = [k for k in weights if k.endswith(".gamma")]

    def measured(value: float) -> float:
        weights[gamma] = torch.tensor(value)
        G = folded_generator(state, ema=True)
        z, y = latents(16, G, seed=0)
        return attention_shares(G, lambda: G(z, y))[gamma.removesuffix(".gamma")].item()

    measured_share = measured(share / measured(1.0))  # the share is linear in gamma: x does not depend on it
    out.write_bytes(serialize(state))
    return measured_share


def broken(model: bytes, how: str) -> bytes:
    """The exported model with its attention computed wrong (G has one attention layer: one Softmax)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = (proto := onnx.load_from_string(model)).graph
    (softmax,) = [n for n in graph.node if n.op_type == "Softmax"]
    (attend,) = [n for n in graph.node if n.op_type == "MatMul" and softmax.output[0] in n.input]  # softmax(.) @ v
    if how == "softmax_over_queries":  # normalised along the wrong axis
        (axis,) = softmax.attribute
        assert axis.name == "axis" and axis.i == -1
        axis.i = -2
        return proto.SerializeToString()
    # A Mul inserted on a tensor: the scores scaled by 1/sqrt(d) (the transformers' scaling SAGAN leaves out; d = 8, the
    # padded head width) or the attention's output halved.
    node, tensor, factor = {"scores_over_sqrt_d": (softmax, softmax.input[0], 1 / math.sqrt(8)),
                            "output_halved": (attend, attend.output[0], 0.5)}[how]  # fmt: skip
    graph.initializer.append(numpy_helper.from_array(np.array(factor, dtype=np.float32), "broken_factor"))
    if node is softmax:
        mul = helper.make_node("Mul", [tensor, "broken_factor"], ["broken"], name="broken_mul")
        softmax.input[0] = "broken"
        graph.node.insert(list(graph.node).index(softmax), mul)
    else:
        for n in graph.node:  # its readers read the scaled tensor instead
            n.input[:] = ["broken" if i == tensor else i for i in n.input]
        mul = helper.make_node("Mul", [tensor, "broken_factor"], ["broken"], name="broken_mul")
        graph.node.insert(list(graph.node).index(attend) + 1, mul)
    return proto.SerializeToString()


@pytest.fixture(scope="module")
def heavy(trained, tmp_path_factory):
    """The unconditional checkpoint with an attention branch as large as its input, its share, and its ONNX file
    written by a passing export (whose check's difference is returned too)."""
    folder = tmp_path_factory.mktemp("heavy")
    share = attention_heavy(trained["uncond"], folder / "heavy.pt")
    out, difference = export(parse_args(ExportArgs, [f"ckpt={folder / 'heavy.pt'}", f"out={folder / 'g.onnx'}"]))
    return folder / "heavy.pt", share, out, difference


@needs_onnx
def test_a_generator_whose_attention_matters_exports_and_passes_the_check(heavy):
    ckpt, share, out, difference = heavy
    assert 0.9 < share < 1.1  # ||gamma o|| / ||x||: the branch moves the layer's output as much as its input is
    G = folded_generator(load_checkpoint(ckpt), ema=True)
    assert out.is_file() and difference <= 10 * fp32_rounding(G, *latents(16, G, seed=0))


@needs_onnx
@pytest.mark.parametrize("how", ["softmax_over_queries", "scores_over_sqrt_d", "output_halved"])
def test_a_wrong_attention_graph_fails_the_export_in_one_line_and_writes_nothing(heavy, how, tmp_path, monkeypatch, capsys):
    ckpt, _, good, _ = heavy
    made = sagan.export.onnx_model
    monkeypatch.setattr(sagan.export, "onnx_model", lambda G, **kwargs: broken(made(G, **kwargs), how))
    # Over an earlier file: the command exits 1 with one line, and the earlier file stays as it was.
    out = tmp_path / "g.onnx"
    out.write_bytes(good.read_bytes())
    code, _, err = run_command("export", [f"ckpt={ckpt}", f"out={out}"], monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: the ONNX model does not compute G_ema of {ckpt}: onnxruntime against PyTorch on 16 ")
    assert f"nothing written ({out} left as it was)" in err, err
    difference, tolerance = (float(x) for x in re.search(r"largest difference (\S+), tolerance (\S+) ", err).groups())
    assert difference > 100 * tolerance, err  # caught by far, not at the edge of the tolerance
    assert out.read_bytes() == good.read_bytes()
    # Where no file was: none is written.
    out.unlink()
    with pytest.raises(UserError, match=r"does not compute G_ema .*; nothing written; please report it"):
        export(parse_args(ExportArgs, [f"ckpt={ckpt}", f"out={out}", "check_n=2"]))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_sagan_export_cli_writes_beside_the_run_and_fails_in_one_line(trained, tmp_path, monkeypatch, capsys):
    code, out, _ = run_command("export", ["--help"], monkeypatch, capsys)
    assert code == 0 and "sagan-export ckpt=" in out and "check_n" in out
    ckpt = run_copy(trained["uncond"], tmp_path)
    code, out, err = run_command("export", [f"ckpt={ckpt}", "check_n=2"], monkeypatch, capsys)
    written = tmp_path / "run" / "G_ema.onnx"  # beside the run's checkpoints/
    assert code == 0 and written.is_file() and f"{written}: G_ema of" in out, err
    code, _, err = run_command("export", [f"ckpt={tmp_path / 'none.pt'}"], monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1 and "none.pt" in err
    code, _, err = run_command("export", [f"ckpt={trained['cond']}", "format=tflite"], monkeypatch, capsys)
    assert code == 1 and "unknown format 'tflite'" in err

def test_sagan_export_without_the_export_extra_says_what_to_install_in_one_line(trained, tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    code, _, err = run_command("export", [f"ckpt={trained['uncond']}", f"out={tmp_path / 'g.onnx'}"], monkeypatch, capsys)
    assert (code, err) == (1, "error: sagan-export needs onnxruntime: pip install -e '.[export]' (or pip install onnxruntime)\n")
    assert not (tmp_path / "g.onnx").exists()
