import pytest
import torch

from sagan.models import Discriminator, Generator
from sagan.trainer import Trainer


def batches(n: int = 4):
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.zeros(n, dtype=torch.long)


def tiny_trainer(**kw) -> Trainer:
    torch.manual_seed(0)
    G = Generator(z_dim=16, ch=4, resolution=32, attn_resolutions=(16,))
    D = Discriminator(ch=4, resolution=32, attn_resolutions=(16,))
    return Trainer(G, D, **kw)


def test_ema_copies_before_start_then_averages_parameters_and_copies_buffers():
    trainer = tiny_trainer(ema_start=1, ema_decay=0.9)
    stream = batches()
    trainer.train_step(stream)  # step 0 -> 1: before ema_start, G_ema is a copy of G
    for a, b in zip(trainer.G_ema.state_dict().values(), trainer.G.state_dict().values()):
        assert torch.equal(a, b)
    before = [p.clone() for p in trainer.G_ema.parameters()]
    trainer.train_step(stream)  # averaging from now on
    for old, ema, new in zip(before, trainer.G_ema.parameters(), trainer.G.parameters()):
        torch.testing.assert_close(ema, 0.9 * old + 0.1 * new)
    # Buffers (BN running stats, spectral-norm u and v) are copied, not averaged.
    buffers = dict(trainer.G.named_buffers())
    assert any(name.endswith("_u") for name in buffers)
    for name, value in trainer.G_ema.named_buffers():
        assert torch.equal(value, buffers[name]), name


def test_train_step_updates_both_networks_and_returns_device_losses():
    trainer = tiny_trainer(n_dis=2)
    g0 = [p.clone() for p in trainer.G.parameters()]
    d0 = [p.clone() for p in trainer.D.parameters()]
    losses = trainer.train_step(batches())
    assert set(losses) == {"d_loss", "g_loss"} and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    assert trainer.step == 1
    assert any(not torch.equal(a, b) for a, b in zip(g0, trainer.G.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, trainer.D.parameters()))
    assert trainer.opt_d.state[next(iter(trainer.D.parameters()))]["step"] == 2  # n_dis D steps


def test_resume_on_another_device_type_continues_with_a_seeded_stream(caplog):
    trainer = tiny_trainer()
    trainer.train_step(batches())
    state = trainer.state_dict()
    state["rng_device"] = "cuda"  # as if written on a GPU
    other = tiny_trainer()
    other.load_state_dict(state)
    assert other.step == 1 and "not bit-identical" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast runs torch.mv in bf16, CPU autocast does not")
def test_spectral_norm_stays_fp32_under_bf16_autocast():
    import copy

    from sagan.models.layers import apply_spectral_norm

    conv = torch.nn.Conv2d(64, 64, 3).cuda()
    apply_spectral_norm(conv)
    twin = copy.deepcopy(conv)  # same weight, same u and v
    with torch.autocast("cuda", dtype=torch.bfloat16):
        inside = conv.weight
    outside = twin.weight
    assert inside.dtype == torch.float32
    assert torch.equal(inside, outside)  # the power iteration did not run in bf16
    assert torch.equal(conv.parametrizations.weight[0]._u, twin.parametrizations.weight[0]._u)


def test_bf16_channels_last_step_keeps_fp32_state():
    trainer = tiny_trainer(precision="bf16", channels_last=True)
    losses = trainer.train_step(batches())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    conv = trainer.G.blocks.block0.conv1
    assert conv.parametrizations.weight.original.dtype == torch.float32
    assert conv.parametrizations.weight.original.is_contiguous(memory_format=torch.channels_last)
    assert trainer.opt_g.state[conv.parametrizations.weight.original]["exp_avg"].dtype == torch.float32


def test_perf_auto_resolution():
    from omegaconf import OmegaConf

    from sagan.config import PerfConfig
    from sagan.dist import resolve_perf

    auto = resolve_perf(OmegaConf.structured(PerfConfig()), torch.device("cpu"))
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert auto == {"precision": "bf16" if native_bf16 else "fp32", "channels_last": native_bf16, "fused_adam": False, "compile": False}
    forced = resolve_perf(OmegaConf.structured(PerfConfig(precision="fp32", fused_adam=True)), torch.device("cpu"))
    assert forced["precision"] == "fp32" and not forced["channels_last"] and forced["fused_adam"]
