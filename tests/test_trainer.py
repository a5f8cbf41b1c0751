import pytest
import torch
import torch.nn.functional as F

from sagan.data.images import to_float
from sagan.models import Discriminator, Generator
from sagan.training.step import STEP_VALUES, Trainer


def batches(n: int = 4):
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.zeros(n, dtype=torch.long)


def tiny_trainer(**kw) -> Trainer:
    torch.manual_seed(0)
    G = Generator(z_dim=16, ch=4, resolution=32, attn_resolutions=(16,))
    D = Discriminator(ch=4, resolution=32, attn_resolutions=(16,))
    return Trainer(G, D, **kw)


def bn_statistic(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


@pytest.mark.parametrize("ema_bn", ["copy", "standing"])
def test_ema_copies_before_start_then_averages_parameters_and_copies_buffers(ema_bn):
    trainer = tiny_trainer(ema_start=1, ema_decay=0.9, ema_bn=ema_bn)
    stream = batches()
    trainer.train_step(stream)  # step 0 -> 1: before ema_start, G_ema is a copy of G
    for a, b in zip(trainer.G_ema.parameters(), trainer.G.parameters()):
        assert torch.equal(a, b)
    before = [p.clone() for p in trainer.G_ema.parameters()]
    trainer.train_step(stream)  # averaging from now on
    for old, ema, new in zip(before, trainer.G_ema.parameters(), trainer.G.parameters()):
        torch.testing.assert_close(ema, 0.9 * old + 0.1 * new)
    # Spectral-norm u and v are copied, never averaged; BatchNorm statistics are copied only with ema_bn=copy.
    buffers = dict(trainer.G.named_buffers())
    assert any(name.endswith("_u") for name in buffers)
    for name, value in trainer.ema_generator().named_buffers():
        if bn_statistic(name) and ema_bn == "standing":
            assert not torch.equal(value, buffers[name]), name
        else:
            assert torch.equal(value, buffers[name]), name


def test_train_step_updates_both_networks_and_returns_device_losses():
    trainer = tiny_trainer(n_dis=2)
    g0 = [p.clone() for p in trainer.G.parameters()]
    d0 = [p.clone() for p in trainer.D.parameters()]
    losses = trainer.train_step(batches())
    assert set(losses) == set(STEP_VALUES) and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    assert trainer.step == 1
    assert any(not torch.equal(a, b) for a, b in zip(g0, trainer.G.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, trainer.D.parameters()))
    assert trainer.opt.d.state[next(iter(trainer.D.parameters()))]["step"] == 2  # n_dis D steps


def test_step_diagnostics_are_d_outputs_and_gradient_norms_of_the_step():
    trainer = tiny_trainer(n_dis=1)
    d_outputs = []
    hook = trainer.D.register_forward_hook(lambda module, args, out: d_outputs.append(out.detach().clone()))
    values = trainer.train_step(batches())
    hook.remove()
    real, fake = d_outputs[0].chunk(2)  # the D step's one forward: real then fake; the G step's forward comes after
    torch.testing.assert_close(values["d_real"], real.mean())
    torch.testing.assert_close(values["d_fake"], fake.mean())
    torch.testing.assert_close(values["d_real_positive"], (real > 0).float().mean())
    # D's gradients stay from its step (the G step gives D's parameters none), G's from the G step.
    for name, net in (("grad_norm_d", trainer.D), ("grad_norm_g", trainer.G)):
        expected = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]).norm()
        torch.testing.assert_close(values[name], expected)
    assert values["grad_norm_d"] > 0 and values["grad_norm_g"] > 0


def test_resume_on_another_device_type_continues_with_a_seeded_stream(caplog):
    trainer = tiny_trainer()
    trainer.train_step(batches())
    state = trainer.state_dict()
    state["rng_device"] = "cuda"  # as if written on a GPU
    other = tiny_trainer()
    other.load_state_dict(state)
    assert other.step == 1 and "not bit-identical" in caplog.text


def test_bf16_channels_last_step_keeps_fp32_state():
    trainer = tiny_trainer(precision="bf16", channels_last=True)
    losses = trainer.train_step(batches())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    conv = trainer.G.blocks.block0.conv1
    assert conv.parametrizations.weight.original.dtype == torch.float32
    assert conv.parametrizations.weight.original.is_contiguous(memory_format=torch.channels_last)
    assert trainer.opt.g.state[conv.parametrizations.weight.original]["exp_avg"].dtype == torch.float32


def test_perf_auto_resolution():
    from omegaconf import OmegaConf

    from sagan.config import PerfConfig
    from sagan.utils.processes import resolve_perf

    auto = resolve_perf(OmegaConf.structured(PerfConfig()), torch.device("cpu"))
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert auto == {"precision": "bf16" if native_bf16 else "fp32", "channels_last": native_bf16, "fused_adam": False, "compile": False}
    forced = resolve_perf(OmegaConf.structured(PerfConfig(precision="fp32", fused_adam=True)), torch.device("cpu"))
    assert forced["precision"] == "fp32" and not forced["channels_last"] and forced["fused_adam"]


def sn_vectors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in net.named_buffers() if name.endswith(("_u", "_v"))}


def test_g_step_trains_through_a_frozen_discriminator():
    """The official G step: no gradients on D's parameters, no power iteration in D; G still gets gradients."""
    trainer = tiny_trainer()
    trainer.train_step(batches())  # D's Adam state and u/v exist
    D = trainer.D
    for p in D.parameters():
        p.grad = None
    u_before = sn_vectors(D)
    g_before = [p.clone() for p in trainer.G.parameters()]
    trainer.g_step(4)
    assert all(p.grad is None for p in D.parameters())
    assert all(p.requires_grad for p in D.parameters())  # unfrozen again for the next D step
    assert all(torch.equal(u_before[k], v) for k, v in sn_vectors(D).items())
    assert any(not torch.equal(a, b) for a, b in zip(g_before, trainer.G.parameters()))


def test_d_step_runs_exactly_one_power_iteration():
    """D's u after a D step is one power iteration from the u before it, on the weights before the update."""
    trainer = tiny_trainer()
    stream = batches()
    trainer.train_step(stream)
    layer = trainer.D.blocks.block1.conv1.parametrizations.weight
    sn = layer[0]
    v0, w0 = sn._v.clone(), sn._reshape_weight_to_matrix(layer.original.detach().clone())
    images, _ = next(stream)
    trainer.d_step(to_float(images), None)

    def iteration(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # PyTorch's order: u from v, then v from u
        u = F.normalize(w0 @ v, dim=0, eps=sn.eps)
        return u, F.normalize(w0.T @ u, dim=0, eps=sn.eps)

    u1, v1 = iteration(v0)
    torch.testing.assert_close(sn._u, u1)
    torch.testing.assert_close(sn._v, v1)
    u2, _ = iteration(v1)
    assert not torch.allclose(u1, u2, atol=1e-4, rtol=0)  # a second iteration would be visible


@pytest.mark.parametrize("num_classes", [0, 3])
def test_bf16_autocast_keeps_generator_bf16_and_logits_fp32(num_classes):
    """Under autocast, G's BatchNorms (conditional ones too) stay in bf16, and D's head computes the logits in fp32:
    they equal an fp32 recomputation of the head from the features it received."""
    from sagan.models.layers import GeneratorBatchNorm2d

    torch.manual_seed(0)
    G = Generator(z_dim=16, ch=4, resolution=32, attn_resolutions=(16,), num_classes=num_classes)
    D = Discriminator(ch=4, resolution=32, attn_resolutions=(16,), num_classes=num_classes)
    dtypes, features = [], {}
    for m in G.modules():
        if isinstance(m, (GeneratorBatchNorm2d, torch.nn.BatchNorm2d)):
            m.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    last = list(D.blocks.values())[-1]
    last.register_forward_hook(lambda m, args, out: features.__setitem__("h", out))
    y = torch.tensor([0, 1, 2, 1]) if num_classes else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = D(G(torch.randn(4, 16), y), y)
    assert dtypes and all(d == torch.bfloat16 for d in dtypes), dtypes
    assert logits.dtype == torch.float32
    h = F.relu(features["h"].float()).sum(dim=(2, 3))
    expected = h @ D.linear.weight[0] + D.linear.bias[0]
    if num_classes:
        expected = expected + (D.embed(y) * h).sum(dim=1)
    torch.testing.assert_close(logits, expected.detach(), rtol=1e-5, atol=1e-5)


def test_standing_statistics_belong_to_g_ema_and_sampling_is_repeatable():
    trainer = tiny_trainer(ema_start=0, ema_decay=0.5, ema_bn="standing", ema_bn_batches=4, ema_bn_batch_size=4)
    stream = batches()
    for _ in range(3):
        trainer.train_step(stream)
    G_ema = trainer.ema_generator()
    ema_stats = {k: v for k, v in G_ema.named_buffers() if k.endswith("running_mean")}
    g_stats = dict(trainer.G.named_buffers())
    assert ema_stats and all(not torch.allclose(v, g_stats[k]) for k, v in ema_stats.items())
    u_before = sn_vectors(G_ema)
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    first = G_ema(z)
    assert torch.equal(trainer.ema_generator()(z), first)  # same step: not recomputed, same images
    assert all(torch.equal(u_before[k], v) for k, v in sn_vectors(G_ema).items())  # no power iteration
    # The statistics are a function of G_ema's weights: recomputed from scratch they are the same.
    trainer.ema._stats_step = -1
    assert torch.equal(trainer.ema_generator()(z), first)
    # Checkpoints keep them: a trainer loaded from the state draws the same images without recomputing them.
    other = tiny_trainer(ema_bn="standing", ema_bn_batches=4, ema_bn_batch_size=4)
    other.load_state_dict(trainer.state_dict())
    assert all(torch.equal(other.G_ema.get_buffer(k), v) for k, v in ema_stats.items())
    assert torch.equal(other.ema_generator()(z), first)




def test_a_generator_without_spectral_norm_trains_and_averages():
    """model.g_sn=false (the paper's ablation): G has no buffers to copy into G_ema besides BatchNorm statistics."""
    torch.manual_seed(0)
    G = Generator(z_dim=16, ch=4, resolution=32, attn_resolutions=(16,), sn=False)
    D = Discriminator(ch=4, resolution=32, attn_resolutions=(16,))
    trainer = Trainer(G, D, ema_start=0, ema_decay=0.5, ema_bn="standing")
    before = [p.clone() for p in trainer.G_ema.parameters()]
    stream = batches()
    trainer.train_step(stream)
    trainer.train_step(stream)
    for old, ema, new in zip(before, trainer.G_ema.parameters(), trainer.G.parameters()):
        assert not torch.equal(ema, old) and not torch.equal(ema, new)
