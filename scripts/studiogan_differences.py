"""What each difference between sagan and PyTorch-StudioGAN changes, measured against StudioGAN's own code.

    SAGAN_STUDIOGAN_SRC=path/to/PyTorch-StudioGAN/src python scripts/studiogan_differences.py [--batch 64]

StudioGAN's CIFAR-10 SAGAN (its networks, config, optimizers and worker step, built by tests/studiogan_peer.py) gets
weights moved away from their init (tests/studiogan_peer.move_away), is saved as StudioGAN saves it and imported by
`sagan-import`. Then sagan with `experiment=cifar10_studiogan`'s settings, and with each of them back at sagan's
default in turn, is compared with StudioGAN: images and D logits (eval mode), and one D step and one G step from the
same state, batch, z and labels. Each figure is the largest |difference| relative to its tensor's scale, and (in
brackets) how many times that is the rounding tolerance, 10x sagan's own fp32-vs-fp64 difference: above 1x is a real
difference. Prints Markdown tables (README, "Differences from StudioGAN").
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import studiogan_parity as parity  # noqa: E402
import studiogan_peer as peer  # noqa: E402
from sagan.checkpoint import load_checkpoint  # noqa: E402
from sagan.models import build_models  # noqa: E402
from sagan.training.step import Trainer  # noqa: E402

# (difference, the setting that is StudioGAN's, the change back to sagan's default, where it shows)
SETTINGS = [
    ("D's shortcut after its first block", "model.d_shortcut=relu", {"model": {"d_shortcut": "x"}}, "network"),
    ("G's BatchNorm epsilon", "model.bn_eps=1e-4", {"model": {"bn_eps": 1e-5}}, "network"),
    ("power-iteration order", "model.sn_update=vu", {"model": {"sn_update": "uv"}}, "step"),
    ("D calls per D step", "optim.d_calls=2", {"d_calls": 1}, "step"),
    ("D's power iteration in the G step", "optim.d_sn_in_g_step=true", {"d_sn_in_g_step": False}, "step"),
    ("G's BatchNorm statistics in the D step", "optim.g_bn_stats_in_d_step=false", {"g_bn_stats_in_d_step": True}, "step"),
    ("bf16 autocast (perf.precision=auto on a GPU or a bf16 CPU)", "perf.precision=fp32", {"precision": "bf16"}, "step"),
]


def row(name: str, gaps: dict[str, parity.Gap]) -> str:
    worst = max(gaps, key=lambda k: gaps[k].ratio)
    return f"| {name} | " + " | ".join(f"{g.relative:.1e} ({g.ratio:.2g}x)" for g in gaps.values()) + f" | {worst} |"


def table(header: list[str]) -> str:
    return "| sagan | " + " | ".join(header) + " | largest |\n|" + " --- |" * (len(header) + 2)


def as_tables(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `cond_bn=linear` G's state with its conditional BatchNorms as per-class tables of the same function (eval
    mode): gain = 1 + (W_g / sigma)^T, bias = (W_b / sigma)^T with the stored u and v."""
    out = {}
    for key, value in state.items():
        if ".gain.parametrizations" in key or ".bias.parametrizations" in key:
            if key.endswith("original"):
                prefix = key.removesuffix(".parametrizations.weight.original")
                u, v = state[f"{prefix}.parametrizations.weight.0._u"], state[f"{prefix}.parametrizations.weight.0._v"]
                table = (value / torch.dot(u, value @ v)).t().contiguous()
                out[prefix] = table + 1 if prefix.endswith("gain") else table
        else:
            out[key] = value
    return out


@torch.no_grad()
def images(G: torch.nn.Module, n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return G.eval()(torch.randn(n, G.z_dim, generator=g), torch.randint(G.num_classes, (n,), generator=g))


def cond_bn_after_a_g_step(setup: tuple) -> tuple[float, float]:
    """Images of G after one G step from StudioGAN's state, sagan's `cond_bn=tables` (the same function before the
    step) and `cond_bn=linear` against StudioGAN's: the largest |difference| of each (images in [-1, 1])."""
    ckpt, draws, theirs = setup
    record = load_checkpoint(ckpt)["model"]
    linear = OmegaConf.create(record)
    reference, _ = build_models(linear, record["num_classes"])
    reference.load_state_dict(theirs["G"])  # StudioGAN's G after its step, as sagan's network (the same function)
    result = []
    for form, state in (("tables", as_tables(theirs["G_after_d"])), ("linear", theirs["G_after_d"])):
        G, D = build_models(OmegaConf.create({**record, "cond_bn": form}), record["num_classes"])
        G.load_state_dict(state), D.load_state_dict(theirs["D"])
        trainer = Trainer(G, D, **parity.STUDIOGAN_STEP)
        trainer.G.train(), trainer.D.train()
        parity.sagan_g_step(trainer, draws["z_g"], draws["y_g"])
        result.append((images(trainer.G) - images(reference)).abs().max().item())
    return result[0], result[1]


def first_sigma_estimates(src: Path) -> tuple[list[float], list[float]]:
    """Per layer of a new G: the first train-mode forward's sigma estimate over the true largest singular value, for
    StudioGAN (u, v random, no warm-up) and sagan (15 power iterations when a layer is built)."""
    torch.manual_seed(0)
    G, _, _ = peer.networks(peer.configurations(src, parity.CIFAR))
    theirs = []
    for m in G.modules():
        if hasattr(m, "weight_orig"):
            w = m.weight_orig.detach().flatten(1)
            v = torch.nn.functional.normalize(w.t() @ m.weight_u, dim=0)  # the hook's iteration: v, then u
            u = torch.nn.functional.normalize(w @ v, dim=0)
            theirs.append((u @ w @ v / torch.linalg.matrix_norm(w, 2)).item())
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "studiogan32.yaml")
    ours_G, _ = build_models(OmegaConf.merge(OmegaConf.structured(importlib.import_module("sagan.config").ModelConfig), cfg), 10)
    ours = []
    for module in ours_G.modules():
        if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
            sn, w = module.parametrizations.weight[0], module.parametrizations.weight.original.detach().flatten(1)
            v = torch.nn.functional.normalize(w.t() @ sn._u, dim=0)
            u = torch.nn.functional.normalize(w @ v, dim=0)
            ours.append((u @ w @ v / torch.linalg.matrix_norm(w, 2)).item())
    return theirs, ours


def compare(src: Path, folder: Path, batch: int, converged: bool) -> None:
    """The tables for one state of StudioGAN's moved weights."""
    setup = parity.studiogan_steps(src, folder, batch=batch, converged=converged)
    ckpt = setup[0]
    _, G, D, _ = parity.studiogan(src, converged=converged)  # the same weights (same seeds): StudioGAN's, eval mode

    print("\nNetworks in eval mode:\n")
    print(table(["images", "D logits, real images", "D logits, generated images"]))
    print(row("with all of StudioGAN's settings", parity.forward_gaps(G, D, *parity.sagan_networks(ckpt), resolution=32)))
    for name, setting, change, where in SETTINGS:
        if where == "network":
            nets = parity.sagan_networks(ckpt, **change["model"])
            print(row(f"{name}: sagan's default, not `{setting}`", parity.forward_gaps(G, D, *nets, resolution=32)))
    sampling = copy.deepcopy(G)
    importlib.import_module("utils.misc").make_GAN_untrainable(sampling, None, copy.deepcopy(D))
    gaps = parity.forward_gaps(sampling, D, *parity.sagan_networks(ckpt), resolution=32)
    print(row("StudioGAN sampling its way (make_GAN_untrainable: SN layers in train mode)", gaps))

    print("\nOne D step, then one G step from StudioGAN's state after its D step:\n")
    gaps = {**parity.d_step_gaps(setup), **parity.g_step_gaps(setup)}
    print(table(list(gaps)))
    print(row("with all of StudioGAN's settings", gaps))
    for name, setting, change, _ in SETTINGS:
        gaps = {**parity.d_step_gaps(setup, **change), **parity.g_step_gaps(setup, **change)}
        print(row(f"{name}: sagan's default, not `{setting}`", gaps))

    tables, linear = cond_bn_after_a_g_step(setup)
    print(f"\nConditional BatchNorm as per-class tables (model.cond_bn=tables; the same function before the step): "
          f"images after one G step differ from StudioGAN's by {tables:.2g} (with model.cond_bn=linear: {linear:.2g})\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="images per step (StudioGAN's CIFAR-10 recipe: 64)")
    args = ap.parse_args()
    src = peer.source()
    if src is None:
        sys.exit(f"set {peer.ENV} to StudioGAN's src/ folder (git clone https://github.com/POSTECH-CVLab/PyTorch-StudioGAN)")
    start = time.time()
    print(f"StudioGAN {src} | torch {torch.__version__} | {torch.get_num_threads()} threads | batch {args.batch} | "
          f"{time.strftime('%Y-%m-%d')}")  # fmt: skip
    for converged in (False, True):
        state = "u, v settled (as in a trained model)" if converged else "u, v one weight change behind (the test's)"
        print(f"## Moved weights, {state}\n")
        with tempfile.TemporaryDirectory() as tmp:
            compare(src, Path(tmp), args.batch, converged)

    theirs, ours = first_sigma_estimates(src)
    print("\nA new run's first sigma estimates, over the true largest singular value, per layer of G:")
    print(f"- StudioGAN (u, v random, no warm-up): {min(theirs):.3f} to {max(theirs):.3f} over {len(theirs)} layers")
    print(f"- sagan (15 power iterations when a layer is built): {min(ours):.3f} to {max(ours):.3f} over {len(ours)} layers")
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
