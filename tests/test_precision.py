"""perf.precision: bf16 and fp16 autocast steps against the fp32 step, fp16's loss scaling (its skipped steps, its state
in checkpoints, a resume that changes precision), and what `auto` picks on each kind of GPU."""

import copy
import logging
import math

import pytest
import torch
from torch import nn

from conftest import compose_config
from sagan.models import SelfAttention2d, build_models
from sagan.training.monitoring import LossSums
from sagan.training.step import Trainer
from sagan.utils.errors import UserError
from sagan.utils.processes import resolve_perf

EPS = {"bf16": torch.finfo(torch.bfloat16).eps, "fp16": torch.finfo(torch.float16).eps}
GPU = torch.device("cuda", 0)  # a device object only: resolve_perf reads its type, no GPU is touched


def trainer(precision: str, loss_scale: float | None = None, **kw) -> Trainer:
    """The tiny demo model in `precision`, the same weights for every precision; `loss_scale` sets fp16's scale."""
    torch.manual_seed(0)
    G, D = build_models(compose_config("experiment=demo", "model.g_ch=8", "model.d_ch=8").model, 0)
    t = Trainer(G, D, precision=precision, ema_start=0, **kw)
    if loss_scale is not None:
        for scaler in t.opt.scalers.values():
            scaler.load_state_dict({**scaler.state_dict(), "scale": loss_scale})
    return t


def gradients(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().double() for p in net.parameters() if p.grad is not None])


def lowered_layers(*nets: nn.Module) -> int:
    """The layers autocast runs in the low precision: convolutions, linears, and attention's two matrix products."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) + 2 * isinstance(m, SelfAttention2d) for n in nets for m in n.modules())


def real_batch() -> torch.Tensor:
    return torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("step", ["D", "G"])
def test_a_reduced_precision_step_agrees_with_the_fp32_step(precision, step):
    """One D step (or one G step) from the same weights and latents: losses and gradients within the derived bounds.

    The bounds: autocast rounds the inputs and weights of each lowered layer (relative error up to eps of the dtype
    each), and spectral normalisation makes every layer 1-Lipschitz, so to first order the relative errors of the
    layers add up. A loss has passed the L lowered layers of G and D once, forward: L * eps. A gradient has passed
    them forward and then backward, where the products run in the low precision too: 2 L * eps. fp16 runs at a loss
    scale of 2^10, so gradients that were not unscaled before the step would be off by 1024x.
    """
    results = {}
    for p in ("fp32", precision):
        t = trainer(p, loss_scale=2.0**10 if p == "fp16" else None)
        loss = t.d_step(real_batch(), None) if step == "D" else t.g_step(8)
        results[p] = float(loss), gradients(t.D if step == "D" else t.G)
    bound = lowered_layers(t.G, t.D) * EPS[precision]  # forward; twice that for a gradient
    (loss32, grad32), (loss, grad) = results["fp32"], results[precision]
    loss_error = abs(loss - loss32) / abs(loss32)
    grad_error = float((grad - grad32).norm() / grad32.norm())
    assert 0 < grad_error <= 2 * bound, (grad_error, 2 * bound)  # > 0: autocast did run in the low precision
    assert loss_error <= bound, (loss_error, bound)


def test_fp16_skips_a_step_whose_gradients_overflow_and_lowers_its_scale():
    t = trainer("fp16", loss_scale=2.0**100)  # every fp16 gradient overflows
    before_D, before_G = copy.deepcopy(t.D.state_dict()), [p.detach().clone() for p in t.G.parameters()]
    t.d_step(real_batch(), None)
    weights = [k for k in before_D if k.endswith(("original", "gamma", "bias"))]
    assert all(torch.equal(t.D.state_dict()[k], before_D[k]) for k in weights)  # the step was skipped ...
    assert t.opt.scalers["D"].get_scale() == 2.0**99  # ... and the scale halved
    assert t.opt.scalers["G"].get_scale() == 2.0**100  # G's scale is its own
    t.opt.scalers["D"].load_state_dict({**t.opt.scalers["D"].state_dict(), "scale": 2.0**10})
    t.d_step(real_batch(), None)
    assert not all(torch.equal(t.D.state_dict()[k], before_D[k]) for k in weights)  # a scale that fits: D moved
    assert all(torch.equal(p, q) for p, q in zip(t.G.parameters(), before_G))  # G's weights wait for a G step


def test_a_skipped_fp16_step_is_left_out_of_the_logged_gradient_norms():
    """A skipped step's norm is inf (its overflowed gradients): the logged norm is the mean of the steps that updated,
    and NaN for a log window in which none did; losses average over every step."""
    batch = (torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    t = trainer("fp16", loss_scale=2.0**100)
    skipped = t.train_step(iter([batch]))
    assert not torch.isfinite(skipped["grad_norm_d"]) and not torch.isfinite(skipped["grad_norm_g"])
    for scaler in t.opt.scalers.values():
        scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**10})
    made = t.train_step(iter([batch]))
    sums, alone = LossSums(), LossSums()
    for values in (skipped, made):
        sums.add(values)
    alone.add(skipped)
    means = sums.means()
    for name in ("grad_norm_d", "grad_norm_g"):
        assert torch.isfinite(made[name]) and made[name] > 0
        assert means[name] == pytest.approx(made[name].item()) and math.isnan(alone.means()[name])
    assert means["d_loss"] == pytest.approx((skipped["d_loss"] + made["d_loss"]).item() / 2)


def test_the_loss_scale_is_checkpointed_and_a_resume_may_change_precision(caplog):
    source = trainer("fp16", loss_scale=2.0**12)
    source.train_step(iter([(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.zeros(8, dtype=torch.long))] * 2))
    state = source.state_dict()
    saved = state["loss_scale"]["D"]["scale"]
    assert saved == source.opt.scalers["D"].get_scale() == 2.0**12  # the set scale, not GradScaler's initial one

    same = trainer("fp16")
    same.load_state_dict(state)
    assert same.opt.state_dict()["loss_scale"] == state["loss_scale"]  # fp16 -> fp16: the scales continue

    to_fp32 = trainer("fp32")
    to_fp32.load_state_dict(state)
    assert to_fp32.opt.state_dict()["loss_scale"] == {"G": {}, "D": {}}  # fp16 -> fp32: dropped

    with caplog.at_level(logging.INFO, logger="sagan"):
        to_fp16 = trainer("fp16")
        to_fp16.load_state_dict(to_fp32.state_dict())  # fp32 -> fp16: GradScaler's initial scale, said so
    assert to_fp16.opt.scalers["D"].get_scale() == torch.amp.GradScaler("cpu").get_scale()
    assert "fp16 loss scale starts at" in caplog.text


def perf(**values):
    return compose_config(*(f"perf.{k}={v}" for k, v in values.items())).perf


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_a_gpu_is_bf16_only_where_the_gpu_computes_in_it(native_bf16, expected, monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(including_emulation) or native_bf16)
    chosen = resolve_perf(perf(precision="auto", tf32="false"), GPU)
    assert chosen["precision"] == expected and chosen["channels_last"] and chosen["fused_adam"]
    assert asked and not any(asked)  # emulated bf16 (V100, T4) does not count: it is slower than fp32 there


def test_bf16_asked_for_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(UserError, match="no native bf16.*perf.precision=fp16"):
        resolve_perf(perf(precision="bf16"), GPU)


def test_the_tf32_and_cudnn_flags_follow_the_config_on_a_gpu_and_full_precision_restores_them(monkeypatch):
    from sagan.utils.full_precision import full_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    try:
        resolve_perf(perf(tf32="true", cudnn_benchmark="true"), GPU)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
        with full_precision():  # FID's features: true fp32
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        resolve_perf(perf(tf32="false", cudnn_benchmark="false"), GPU)
        assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32 or torch.backends.cudnn.benchmark)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved
