"""The GPU tier: `pytest -m gpu` on a machine with CUDA (skipped, with the reason, without one).

The product on the GPU, each command through its command line (`python -m sagan.<command>`, as torchrun starts
them): sagan-train with device=auto and its resume, sagan-sample, sagan-attention, sagan-export, sagan-fid (with
SAGAN_FID_WEIGHTS, else random Inception weights), and a two-process NCCL run when two GPUs are visible. Then what only a GPU exercises: bf16 and fp16
steps of the real presets on SDPA's fused kernels, spectral norm under CUDA autocast, fused Adam across a resume,
torch.compile, data kept on the GPU, checkpoints moving between CPU and GPU, labels out of range in eval mode.
scripts/gpu_check.sh runs this tier on a lent GPU machine.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_config
from sagan.data.batch_stream import BatchStream
from sagan.data.demo import MirrorShapes
from sagan.models import SelfAttention2d, build_models
from sagan.models.layers import apply_spectral_norm
from sagan.checkpoint import load_checkpoint
from sagan.training.step import Trainer
from sagan.utils.errors import UserError
from sagan.utils.processes import auto_precision

# SAGAN_GPU_REHEARSAL=1 (scripts/gpu_check.sh --rehearse) runs the command-line tests on a CPU, device=auto then
# meaning the CPU: their command lines, fixtures and checks are tried before a GPU session. The others need CUDA.
REHEARSAL = os.environ.get("SAGAN_GPU_REHEARSAL") == "1" and not torch.cuda.is_available()
pytestmark = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
commands_on_gpu = pytest.mark.skipif(not (torch.cuda.is_available() or REHEARSAL), reason="needs a CUDA GPU")

DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # what device=auto means here
AUTO_PRECISION = auto_precision(DEVICE)  # bf16 where the GPU computes in it, else fp16 (tests/test_precision.py)
# The tiny demo run of the command-line tests, with the default device=auto and perf.precision=auto.
RUN = [a for a in TINY if a != "logger.log_every=1"] + ["logger.log_every=2", "train.ckpt_every=2", "data.num_workers=2"]


def command(name: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    """`python -m sagan.<name> args` in `cwd` (the way torchrun starts sagan-train); its stderr and stdout. Fails the
    test, with the output, unless it exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", f"sagan.{name}", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    output = result.stderr + result.stdout
    assert result.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> str:
    """SAGAN_FID_WEIGHTS; else, as on a lent GPU machine (the 87 MB of weights do not travel), a randomly initialised
    network in torch-fidelity's layout: evaluation runs on the GPU as with the real weights, its numbers mean nothing."""
    if os.environ.get("SAGAN_FID_WEIGHTS"):
        return os.environ["SAGAN_FID_WEIGHTS"]
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None):  # fmt: skip
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> Path:
    """`sagan-train` on the GPU with device=auto: 4 steps, then a resume to 6 in loss-scaled fp16 (a resume may change
    precision; fp16 is what older GPUs train in); the run directory."""
    run = tmp_path_factory.mktemp("gpu") / "run"
    first = command("train", *RUN, "train.steps=4", f"hydra.run.dir={run}", cwd=run.parent)
    assert f"device {DEVICE}" in first and f"precision {AUTO_PRECISION}" in first, first[-3000:]
    again = command("train", *RUN, "train.steps=6", "train.resume=auto", "perf.precision=fp16", f"hydra.run.dir={run}",
                    cwd=run.parent)  # fmt: skip
    assert "resumed from" in again and "at step 4" in again and "precision fp16" in again, again[-3000:]
    return run


@commands_on_gpu
def test_sagan_train_on_the_gpu_with_device_auto_and_its_resume(gpu_run):
    state = load_checkpoint(gpu_run / "checkpoints" / "last.pt")
    assert state["trainer"]["step"] == 6 and state["trainer"]["rng_device"] == DEVICE.type
    assert (state["rng"]["cuda"] is not None) == (DEVICE.type == "cuda")  # the GPU's global RNG state is kept
    assert state["trainer"]["loss_scale"]["D"]["scale"] > 0  # the fp16 steps' loss scales
    assert (gpu_run / "samples").is_dir() and any((gpu_run / "attention").iterdir())


@needs_gpu
def test_a_cpu_checkpoint_resumes_on_the_gpu(tmp_path):
    run = tmp_path / "run"
    command("train", *RUN, "train.steps=2", "device=cpu", "perf.precision=fp32", f"hydra.run.dir={run}", cwd=tmp_path)
    out = command("train", *RUN, "train.steps=4", "train.resume=auto", f"hydra.run.dir={run}", cwd=tmp_path)
    assert "checkpoint was written on cpu, this run is on cuda" in out
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 4


@commands_on_gpu
def test_sagan_sample_on_the_gpu(gpu_run, tmp_path):
    command("sample", f"ckpt={gpu_run / 'checkpoints' / 'last.pt'}", "n=8", f"out={tmp_path / 's'}", cwd=tmp_path)
    assert len(list((tmp_path / "s").glob("*.png"))) == 8


@commands_on_gpu
def test_sagan_attention_on_the_gpu(gpu_run, tmp_path):
    ckpt = gpu_run / "checkpoints" / "last.pt"
    command("attention", f"ckpt={ckpt}", f"out={tmp_path / 'png'}", cwd=tmp_path)
    command("attention", f"ckpt={ckpt}", "format=html", f"out={tmp_path / 'html'}", cwd=tmp_path)
    assert any((tmp_path / "png").glob("G_*.png")) and (tmp_path / "html" / "attention.html").is_file()


@commands_on_gpu
def test_sagan_export_of_a_gpu_checkpoint(gpu_run, tmp_path):
    pytest.importorskip("onnxruntime")
    out = command("export", f"ckpt={gpu_run / 'checkpoints' / 'last.pt'}", f"out={tmp_path / 'g.onnx'}", cwd=tmp_path)
    assert (tmp_path / "g.onnx").is_file() and "largest difference" in out


@commands_on_gpu
def test_sagan_fid_on_the_gpu(gpu_run, inception_weights, tmp_path):
    weights = inception_weights
    out = command("fid", f"ckpt={gpu_run / 'checkpoints' / 'last.pt'}", "ref=demo", "n=16", "ref_n=16", "isc=false",
                  f"metrics.inception_weights={weights}", f"metrics.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)  # fmt: skip
    assert "FID" in out and "metrics.json" in out


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_sagan_train_on_two_gpus_through_torchrun_with_nccl(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sagan.train",
         *RUN, "train.steps=4", f"hydra.run.dir={run}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, (result.stderr + result.stdout)[-4000:]
    assert "2 process(es), device cuda:0" in result.stderr + result.stdout
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 4


@needs_gpu
def test_labels_out_of_range_on_the_gpu_are_one_line_not_a_device_side_assert():
    torch.manual_seed(0)
    G, D = build_models(compose_config("experiment=demo", "model.g_ch=4", "model.d_ch=4").model, num_classes=3)
    G, D = G.cuda().eval(), D.cuda().eval()
    z = torch.randn(2, G.z_dim, device="cuda")
    with pytest.raises(UserError, match=r"labels must lie in \[0, 3\)"):
        G(z, torch.tensor([0, 3], device="cuda"))
    with pytest.raises(UserError, match=r"labels must lie in \[0, 3\)"):
        D(torch.zeros(2, 3, 32, 32, device="cuda"), torch.tensor([0, 3], device="cuda"))
    assert torch.isfinite(G(z, torch.tensor([0, 2], device="cuda"))).all()  # the CUDA context is intact


@needs_gpu
def test_standing_statistics_of_g_ema_on_the_gpu():
    from sagan.training.standing_stats import standing_statistics

    torch.manual_seed(0)
    G, _ = build_models(compose_config("experiment=demo", "model.g_ch=4", "model.d_ch=4").model, num_classes=3)
    G = G.cuda()
    standing_statistics(G, batches=2, batch_size=8, seed=0)
    assert all(torch.isfinite(b).all() and b.is_cuda for b in G.buffers())


def trainer_for(preset: str, **kw) -> Trainer:
    torch.manual_seed(0)
    model = compose_config(f"model={preset}").model
    G, D = build_models(model, num_classes=10)
    return Trainer(G, D, device="cuda", **{"precision": "bf16", "channels_last": True, "fused_adam": True, **kw})


def real_batches(resolution: int, batch: int):
    generator = torch.Generator(device="cuda").manual_seed(0)
    while True:
        images = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, device="cuda", generator=generator)
        yield images, torch.randint(10, (batch,), device="cuda", generator=generator)


@needs_gpu
@pytest.mark.parametrize("preset", ["sagan32", "sagan64", "sagan128", "sagan256"])
def test_bf16_step_of_every_preset_runs_on_fused_attention_kernels(preset):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    trainer = trainer_for(preset)
    resolution = trainer.G.resolution
    # With the math backend excluded SDPA raises instead of silently materialising the attention matrix.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        losses = trainer.train_step(real_batches(resolution, 8))
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    assert trainer.step == 1


@needs_gpu
def test_spectral_norm_stays_fp32_under_cuda_autocast():
    conv = torch.nn.Conv2d(64, 64, 3).cuda()
    apply_spectral_norm(conv)
    twin = copy.deepcopy(conv)  # same weight, same u and v
    with torch.autocast("cuda", dtype=torch.bfloat16):
        inside = conv.weight
    outside = twin.weight
    assert inside.dtype == torch.float32
    assert torch.equal(inside, outside)  # the power iteration did not run in bf16 (CUDA autocast would run torch.mv in bf16)
    assert torch.equal(conv.parametrizations.weight[0]._u, twin.parametrizations.weight[0]._u)


@needs_gpu
def test_attention_backward_runs_on_the_memory_efficient_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = SelfAttention2d(64).cuda()
    x = torch.randn(2, 64, 32, 32, device="cuda", requires_grad=True)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        block(x).sum().backward()
    assert x.grad is not None


@needs_gpu
@pytest.mark.parametrize("fused_before, fused_after", [(True, False), (False, True)])
def test_resume_switches_fused_adam_either_way(fused_before, fused_after):
    before = trainer_for("sagan32", fused_adam=fused_before)
    batches = real_batches(32, 8)
    before.train_step(batches)
    state = before.state_dict()
    after = trainer_for("sagan32", fused_adam=fused_after)
    after.load_state_dict(state)
    assert all(bool(g["fused"]) == fused_after for g in after.opt.g.param_groups + after.opt.d.param_groups)
    after.train_step(batches)  # fused Adam needs its step counters on the GPU: a failed load would raise here
    assert after.step == 2


@needs_gpu
def test_compiled_step():
    trainer = trainer_for("sagan32", compile=True)
    batches = real_batches(32, 8)
    for _ in range(2):
        losses = trainer.train_step(batches)
    assert all(torch.isfinite(v) for v in losses.values())


@needs_gpu
def test_gpu_resident_data_feeds_the_step():
    dataset = MirrorShapes(size=64, resolution=32, seed=0, labels=True)
    stream = BatchStream(dataset, batch_size=8, seed=0, device="cuda", in_memory=True, hflip=True)
    images, labels = next(stream)
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.uint8
    torch.manual_seed(0)
    model = compose_config("model=sagan32", "model.g_ch=8", "model.d_ch=8").model
    G, D = build_models(model, num_classes=dataset.num_classes)
    trainer = Trainer(G, D, device="cuda", precision="bf16", channels_last=True, fused_adam=True)
    trainer.train_step(stream)
    assert trainer.step == 1


@needs_gpu
def test_evaluation_during_training_equals_sagan_fid_on_the_gpu(inception_weights, tmp_path):
    """On CUDA training turns TF32 on and trains G_ema channels_last; evaluation must still match `sagan-fid`."""
    import json

    from sagan.cli import parse_args
    from sagan.evaluation.evaluate import evaluate
    from sagan.evaluation.request import FidArgs
    from sagan.training.loop import train

    weights = inception_weights
    cache = f"metrics.cache_dir={tmp_path / 'cache'}"
    cfg = compose_config("experiment=demo", "model.g_ch=8", "model.d_ch=8", "data.size=64", "train.batch_size=8",
                         "train.steps=2", "train.ckpt_every=2", "eval.every=2", "eval.num_samples=20",
                         "eval.ref_images=16", "logger.mode=disabled", "device=cuda", f"metrics.inception_weights={weights}", cache)  # fmt: skip
    train(cfg, tmp_path / "run")
    logged = next(json.loads(r)["metrics/fid"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "metrics/fid" in r)
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002.pt"
    args = [f"ckpt={ckpt}", "ref=train", "n=20", "seed=0", "isc=false", "device=cuda", f"metrics.inception_weights={weights}", cache]
    assert abs(evaluate(parse_args(FidArgs, args))["metrics"]["fid"] - logged) < 1e-4


@needs_gpu
@pytest.mark.parametrize("kind", ["multihead", "simple", "local", "se", "cbam", "residual"])
def test_every_attention_type_trains_a_bf16_step_with_diffaugment(kind):
    """Each model.attn_type in the CIFAR preset, with DiffAugment drawing on the GPU: a finite step that moves gamma."""
    from sagan.training.diffaugment import DiffAugment

    torch.manual_seed(0)
    model = compose_config("model=sagan32", f"model.attn_type={kind}", f"model.attn_heads={2 if kind == 'multihead' else 1}").model
    G, D = build_models(model, num_classes=10)
    augment = DiffAugment(["color", "translation", "cutout"], device=torch.device("cuda"), seed=0)
    trainer = Trainer(G, D, device="cuda", precision="bf16", channels_last=True, fused_adam=True, augment=augment)
    losses = trainer.train_step(real_batches(32, 16))
    assert all(torch.isfinite(v) for v in losses.values()) and trainer.nonfinite() is None
    assert trainer.G.blocks.attn16.gamma.item() != 0 and trainer.D.blocks.attn16.gamma.item() != 0
