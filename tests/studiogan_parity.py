"""sagan beside PyTorch-StudioGAN (tests/studiogan_peer.py builds StudioGAN): its networks with moved weights saved,
imported by `sagan-import`, and one D step and one G step run by both from the same state, compared tensor by tensor
against a tolerance derived from rounding alone (10x the difference between sagan in fp32 and sagan in fp64).
tests/test_studiogan.py asserts with it; scripts/studiogan_differences.py measures each difference with it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

import studiogan_peer as peer
from sagan.checkpoint import load_checkpoint
from sagan.import_weights import ImportArgs, import_run
from sagan.models import build_models
from sagan.pretrained.studiogan import convert_discriminator, convert_generator
from sagan.training.step import Trainer

CIFAR = "CIFAR10/SAGAN.yaml"


def studiogan(src: Path, config: str = CIFAR, *, converged: bool = False, **changes) -> tuple:
    """StudioGAN's networks of a config (and its changes) with weights moved away from their init (G_ema too), their
    power iterations one weight change behind (`converged`: run until u and v have settled, as in a trained model)."""
    cfgs = peer.configurations(src, config, **changes)
    torch.manual_seed(0)
    G, D, G_ema = peer.networks(cfgs)
    peer.move_away(G, D, seed=1)
    if G_ema is not None:
        peer.move_away(G_ema, copy.deepcopy(D), seed=2)
    if converged:
        for net in (G, D, G_ema):
            if net is not None:
                peer.settle_power_iterations(net)
    return cfgs, G, D, G_ema


def imported(folder: Path, out: Path, **args) -> dict:
    """`sagan-import src=folder out=out ...`; the checkpoint it wrote."""
    import_run(OmegaConf.structured(ImportArgs(src=str(folder), out=str(out), **args)))
    return load_checkpoint(out)


STUDIOGAN_STEP = dict(
    lr_g=2e-4, lr_d=2e-4, betas=(0.5, 0.999), eps=1e-6, n_dis=1, d_calls=2, d_sn_in_g_step=True, g_bn_stats_in_d_step=False,
    ema_decay=0.0, ema_bn="copy", precision="fp32",
)  # fmt: skip


def sagan_trainer(ckpt: Path, *, wide: bool = False, **changes) -> Trainer:
    """sagan's trainer with `experiment=cifar10_studiogan`'s step on the imported networks (`wide`: in fp64)."""
    state = load_checkpoint(ckpt)
    record = {**state["model"], **changes.pop("model", {})}
    G, D = build_models(OmegaConf.create(record), record["num_classes"])
    G.load_state_dict(state["trainer"]["G"]), D.load_state_dict(state["trainer"]["D"])
    if wide:
        G, D = G.double(), D.double()
    trainer = Trainer(G, D, **{**STUDIOGAN_STEP, **changes})
    trainer.G.train(), trainer.D.train()
    return trainer


def as_trainers(trainer: Trainer, *tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = next(trainer.G.parameters()).dtype
    return [t.to(dtype) if t.is_floating_point() else t for t in tensors]


def sagan_d_step(trainer: Trainer, real, y_real, z, y) -> float:
    real, z = as_trainers(trainer, real, z)
    trainer.sample_latents = lambda n: (z, y)
    return trainer.d_step(real, y_real).item()


def sagan_g_step(trainer: Trainer, z, y) -> float:
    (z,) = as_trainers(trainer, z)
    trainer.sample_latents = lambda n: (z, y)
    return trainer.g_step(len(z)).item()


@dataclass
class Gap:
    """How far sagan is from StudioGAN in one group of tensors (a network's gradients, its state after a step, ...):
    the largest |difference| relative to the group's largest value, and the largest |difference| / tolerance of a
    tensor, the tolerance being 10x sagan's own fp32 rounding there (|fp32 - fp64|), at least 10x float32's epsilon
    of the tensor's scale. A ratio above 1 is a difference beyond rounding."""

    relative: float
    ratio: float
    where: str
    tolerance: float  # the largest tolerance relative to its tensor's scale: a comparison only means something if small

    def __str__(self) -> str:
        return f"{self.relative:.2g} of the largest value ({self.ratio:.2g}x the tolerance, at {self.where})"


def gap(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> Gap:
    largest_diff = largest = ratio = tolerance = 0.0
    where = "-"
    for k, v in ours.items():
        v, scale = v.double(), v.double().abs().max().item()
        tol = 10 * max((v - exact[k].double()).abs().max().item(), 1.2e-7 * scale)
        diff = (v - theirs[k].double()).abs().max().item()
        r = diff / tol if tol > 0 else (0.0 if diff == 0 else float("inf"))
        if r > ratio:
            ratio, where = r, k
        largest_diff, largest = max(largest_diff, diff), max(largest, scale)
        tolerance = max(tolerance, tol / scale if scale > 0 else 0.0)
    return Gap(largest_diff / largest if largest > 0 else 0.0, ratio, where, tolerance)


def value_gap(ours: float, theirs: float, exact: float) -> Gap:
    return gap({"": torch.tensor(ours)}, {"": torch.tensor(theirs)}, {"": torch.tensor(exact)})


def beyond(gaps: dict[str, Gap]) -> list[str]:
    """The groups that differ beyond rounding."""
    return [f"{name}: {g}" for name, g in gaps.items() if g.ratio > 1]


def sagan_networks(ckpt: Path, **model_changes) -> tuple[torch.nn.Module, torch.nn.Module]:
    """G and D of an imported checkpoint, in eval mode, built with some model settings changed (to measure them)."""
    state = load_checkpoint(ckpt)
    record = {**state["model"], **model_changes}
    G, D = build_models(OmegaConf.create(record), record["num_classes"])
    G.load_state_dict(state["trainer"]["G"]), D.load_state_dict(state["trainer"]["D"])
    return G.eval(), D.eval()


@torch.no_grad()
def forward_gaps(theirs_G, theirs_D, G, D, *, resolution: int, n: int = 2) -> dict[str, Gap]:
    """sagan's G and D (eval mode) against StudioGAN's (eval mode) on the same z, labels and images."""
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(n, G.z_dim, generator=g), torch.randint(max(G.num_classes, 1), (n,), generator=g)
    y = y if G.num_classes else None
    real = torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1
    wide_G, wide_D = copy.deepcopy(G).double(), copy.deepcopy(D).double()
    fake = theirs_G(z, y, eval=True)
    gaps = {"images": gap({"x": G(z, y)}, {"x": fake}, {"x": wide_G(z.double(), y)})}
    for name, x in (("D logits, real images", real), ("D logits, generated images", fake)):
        theirs = theirs_D(x, y, eval=True)["adv_output"]
        gaps[name] = gap({"x": D(x, y)}, {"x": theirs}, {"x": wide_D(x.double(), y)})
    return gaps


def studiogan_steps(src: Path, folder: Path, *, batch: int, converged: bool = False) -> tuple[Path, dict, dict]:
    """StudioGAN's CIFAR-10 SAGAN (one D step per G step) with moved weights (see `studiogan`), imported into
    folder/sagan.pt; the batch and latents, and StudioGAN's losses, states and gradients after its D step and after its
    G step."""
    changes = {"OPTIMIZATION.batch_size": batch, "OPTIMIZATION.d_updates_per_step": 1}
    cfgs, G, D, _ = studiogan(src, converged=converged, **changes)
    peer.save_run(folder / "run", G, D, None, cfgs, step=1, best_fid=np.float64(1.0))
    ckpt = folder / "sagan.pt"
    imported(folder / "run", ckpt)
    cfgs.define_optimizer(G, D)  # fresh Adam, as sagan's trainer has
    g = torch.Generator().manual_seed(4)
    draws = dict(
        real=torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1, y_real=torch.randint(10, (batch,), generator=g),
        z_d=torch.randn(batch, 128, generator=g), y_d=torch.randint(10, (batch,), generator=g),
        z_g=torch.randn(batch, 128, generator=g), y_g=torch.randint(10, (batch,), generator=g),
    )  # fmt: skip
    step = peer.Step(cfgs, G, D)
    after = {}
    copied = lambda state: {k: v.clone() for k, v in state.items()}  # noqa: E731  (state dicts share the live tensors)
    after["d_loss"] = step.d_step(draws["real"], draws["y_real"], draws["z_d"], draws["y_d"])
    after["D_grad"] = copied(convert_discriminator(peer.grads(D), Path("D grads"), 32)[1])
    after["D"] = copied(convert_discriminator(D.state_dict(), Path("D"), 32)[1])
    after["G_after_d"] = copied(convert_generator(G.state_dict(), Path("G"))[1])
    after["g_loss"] = step.g_step(draws["z_g"], draws["y_g"])
    after["G_grad"] = copied(convert_generator(peer.grads(G), Path("G grads"))[1])
    after["G"] = copied(convert_generator(G.state_dict(), Path("G"))[1])
    after["D_after_g"] = copied(convert_discriminator(D.state_dict(), Path("D"), 32)[1])
    return ckpt, draws, after


def grads_of(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad for k, p in net.named_parameters()}


def d_step_gaps(setup: tuple, **changes) -> dict[str, Gap]:
    """One D step of sagan (with `changes` to its settings) from StudioGAN's state against StudioGAN's: the loss, D's
    gradients, D after the step (weights, u, v) and G after it (u, v and BatchNorm statistics its forward moves)."""
    ckpt, b, theirs = setup
    ours, exact = sagan_trainer(ckpt, **copy.deepcopy(changes)), sagan_trainer(ckpt, wide=True, **copy.deepcopy(changes))
    losses = [sagan_d_step(t, b["real"], b["y_real"], b["z_d"], b["y_d"]) for t in (ours, exact)]
    return {
        "D loss": value_gap(losses[0], theirs["d_loss"], losses[1]),
        "D gradients": gap(grads_of(ours.D), theirs["D_grad"], grads_of(exact.D)),
        "D after the D step": gap(ours.D.state_dict(), theirs["D"], exact.D.state_dict()),
        "G after the D step": gap(ours.G.state_dict(), theirs["G_after_d"], exact.G.state_dict()),
    }


def g_step_gaps(setup: tuple, **changes) -> dict[str, Gap]:
    """One G step of sagan from StudioGAN's state after its D step against StudioGAN's: the loss, G's gradients, G
    after the step, and D after it (its u and v, which its forward in the G step may move)."""
    ckpt, b, theirs = setup
    ours, exact = sagan_trainer(ckpt, **copy.deepcopy(changes)), sagan_trainer(ckpt, wide=True, **copy.deepcopy(changes))
    for t in (ours, exact):  # the state StudioGAN's G step started from
        t.D.load_state_dict(theirs["D"]), t.G.load_state_dict(theirs["G_after_d"])
    losses = [sagan_g_step(t, b["z_g"], b["y_g"]) for t in (ours, exact)]
    return {
        "G loss": value_gap(losses[0], theirs["g_loss"], losses[1]),
        "G gradients": gap(grads_of(ours.G), theirs["G_grad"], grads_of(exact.G)),
        "G after the G step": gap(ours.G.state_dict(), theirs["G"], exact.G.state_dict()),
        "D after the G step": gap(ours.D.state_dict(), theirs["D_after_g"], exact.D.state_dict()),
    }
