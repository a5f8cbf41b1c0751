"""The GPU tier: `pytest -m gpu` on a machine with CUDA (skipped, with the reason, without one).

What only a GPU exercises: bf16 steps of the real presets on SDPA's fused kernels, spectral norm under CUDA autocast,
fused Adam across a resume, torch.compile, and data kept on the GPU.
"""

import copy

import pytest
import torch

from conftest import compose_config
from sagan.data.batch_stream import BatchStream
from sagan.data.demo import MirrorShapes
from sagan.models import SelfAttention2d, build_models
from sagan.models.layers import apply_spectral_norm
from sagan.training.step import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


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


def test_attention_backward_runs_on_the_memory_efficient_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = SelfAttention2d(64).cuda()
    x = torch.randn(2, 64, 32, 32, device="cuda", requires_grad=True)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        block(x).sum().backward()
    assert x.grad is not None


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


def test_compiled_step():
    trainer = trainer_for("sagan32", compile=True)
    batches = real_batches(32, 8)
    for _ in range(2):
        losses = trainer.train_step(batches)
    assert all(torch.isfinite(v) for v in losses.values())


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


def test_evaluation_during_training_equals_sagan_fid_on_the_gpu(tmp_path):
    """On CUDA training turns TF32 on and trains G_ema channels_last; evaluation must still match `sagan-fid`."""
    import json
    import os

    from sagan.cli import parse_args
    from sagan.evaluation.evaluate import evaluate
    from sagan.evaluation.request import FidArgs
    from sagan.training.loop import train

    weights = os.environ.get("SAGAN_FID_WEIGHTS")
    if not weights:
        pytest.skip("needs the offline FID Inception weights (SAGAN_FID_WEIGHTS)")
    cache = f"metrics.cache_dir={tmp_path / 'cache'}"
    cfg = compose_config("experiment=demo", "model.g_ch=8", "model.d_ch=8", "data.size=64", "train.batch_size=8",
                         "train.steps=2", "train.ckpt_every=2", "eval.every=2", "eval.num_samples=20",
                         "eval.ref_images=16", "logger.mode=disabled", "device=cuda", f"metrics.inception_weights={weights}", cache)  # fmt: skip
    train(cfg, tmp_path / "run")
    logged = next(json.loads(r)["metrics/fid"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "metrics/fid" in r)
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002.pt"
    args = [f"ckpt={ckpt}", "ref=train", "n=20", "seed=0", "isc=false", "device=cuda", f"metrics.inception_weights={weights}", cache]
    assert abs(evaluate(parse_args(FidArgs, args))["metrics"]["fid"] - logged) < 1e-4


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
