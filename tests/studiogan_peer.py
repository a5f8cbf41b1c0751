"""PyTorch-StudioGAN's own code, built beside sagan: for the differential tests (tests/test_studiogan.py) and
scripts/studiogan_differences.py.

`SAGAN_STUDIOGAN_SRC` names StudioGAN's src/ folder (in this workplace ../shared/peers/studiogan/src, which `.ci/run`
sets; elsewhere `git clone https://github.com/POSTECH-CVLab/PyTorch-StudioGAN` and point it at src/). Unset, the tests
that need StudioGAN are skipped; set to any other folder, they fail (`require`). Its networks, configs, losses,
optimizers, checkpoint names and training step are StudioGAN's own, used as they are. Nothing of StudioGAN is
installed: the modules it imports for what a SAGAN never uses (its metrics, StyleGAN's compiled ops, plotting, t-SNE,
W&B) and third-party packages that are not installed are replaced by empty stand-ins before its code is imported (a
stand-in's every attribute is a no-op class, enough for `from x import y` at the top of a file).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ENV = "SAGAN_STUDIOGAN_SRC"
# StudioGAN's modules that only evaluation, StyleGAN or other GANs' augmentations need (some compile CUDA code).
_UNUSED_OWN = ("metrics", "utils.style_ops.conv2d_gradfix", "utils.style_ops.upfirdn2d", "utils.ada_aug", "utils.simclr_aug")
# Packages its files import at the top for plotting, t-SNE, truncated normals or progress bars: stood in for when
# they are not installed (only while StudioGAN's modules are imported; nothing else sees the stand-ins).
_OPTIONAL = ("seaborn", "sklearn", "scipy", "tqdm", "kornia", "timm", "h5py", "pkg_resources")
# What the differential tests run: its config, networks, helpers, sampling, losses and training step.
_MODULES = ("config", "utils.misc", "utils.ops", "utils.sample", "utils.losses", "models.model", "models.resnet", "worker")


SKIP = f"StudioGAN's src/ not found: set {ENV}"


class WrongSource(ValueError):
    """SAGAN_STUDIOGAN_SRC is set to something that is not StudioGAN's src/ folder."""


def source() -> Path | None:
    """StudioGAN's src/ folder as SAGAN_STUDIOGAN_SRC names it; None when the variable is unset (or empty). Set to
    anything else it raises WrongSource: a typo must fail, not turn the differential tests into skips."""
    path = os.environ.get(ENV)
    if not path:
        return None
    src = Path(path)
    if (src / "models" / "resnet.py").is_file() and (src / "configs").is_dir():
        return src
    hint = f" (did you mean {src / 'src'}?)" if (src / "src" / "models" / "resnet.py").is_file() else ""
    raise WrongSource(
        f"{ENV}={path} is not PyTorch-StudioGAN's src/ folder: expected models/resnet.py and configs/ in it{hint}; "
        f"point it at src/ of a clone of https://github.com/POSTECH-CVLab/PyTorch-StudioGAN, or unset it to skip "
        f"the tests that need StudioGAN"
    )


def require() -> Path:
    """For a test: StudioGAN's src/. The test is skipped when SAGAN_STUDIOGAN_SRC is unset and fails (one line that
    names the variable and what it must name) when it is set to anything else."""
    import pytest

    try:
        src, wrong = source(), None
    except WrongSource as e:
        src, wrong = None, str(e)
    if wrong:
        pytest.fail(wrong, pytrace=False)  # outside the except: one line, without the chained WrongSource
    if src is None:
        pytest.skip(SKIP)
    return src


class _StandIn(types.ModuleType):
    """An empty module: every attribute is a class that accepts anything and does nothing."""

    __path__: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: None})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        hit = any(fullname == n or fullname.startswith(n + ".") for n in self.names)
        return importlib.machinery.ModuleSpec(fullname, self) if hit else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StandIn(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


_installed: Path | None = None


def install(src: Path) -> None:
    """Import StudioGAN's modules as its main.py sees them (src on sys.path, `utils` and `models` its own)."""
    global _installed
    if _installed is not None:
        assert _installed == src, f"StudioGAN already installed from {_installed}"
        return
    sys.path.insert(0, str(src))
    for package in ("utils", "models"):  # namespace packages in StudioGAN; no other `utils` may shadow them
        module = types.ModuleType(package)
        module.__path__ = [str(src / package)]
        sys.modules[package] = module
    missing = {name for name in _OPTIONAL if importlib.util.find_spec(name) is None}
    finder = _StandInFinder(set(_UNUSED_OWN) | missing)
    sys.meta_path.insert(0, finder)
    try:
        for name in _MODULES:
            importlib.import_module(name)
    finally:
        sys.meta_path.remove(finder)
    _installed = src


def configurations(src: Path, config: str, **changes: Any) -> Any:
    """StudioGAN's Configurations of src/configs/<config> (e.g. "CIFAR10/SAGAN.yaml"), with `changes` as
    {"DATA.num_classes": 200, ...}, and the run options main.py sets by default (fp32, one process, no freezeD)."""
    install(src)
    config_module = importlib.import_module("config")
    cfgs = config_module.Configurations(str(src / "configs" / config))
    for key, value in changes.items():
        group, name = key.split(".")
        setattr(getattr(cfgs, group), name, value)
    for name, value in dict(mixed_precision=False, freezeD=-1, distributed_data_parallel=False, synchronized_bn=False,
                            empty_cache=False, langevin_sampling=False).items():  # fmt: skip
        setattr(cfgs.RUN, name, value)
    cfgs.define_modules()  # again, after the changes
    cfgs.define_losses()
    cfgs.AUG.series_augment = importlib.import_module("utils.misc").identity  # no augmentation (define_augments)
    return cfgs


def networks(cfgs: Any) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module | None]:
    """G, D (and G_ema when the config keeps one) built by StudioGAN's load_generator_discriminator, and the
    optimizers its config defines (cfgs.OPTIMIZATION.g_optimizer / d_optimizer)."""
    model = importlib.import_module("models.model")
    G, _, _, D, G_ema, *_ = model.load_generator_discriminator(
        cfgs.DATA, cfgs.OPTIMIZATION, cfgs.MODEL, cfgs.STYLEGAN, cfgs.MODULES, cfgs.RUN, device="cpu", logger=None
    )
    cfgs.define_optimizer(G, D)
    return G, D, G_ema


def save_run(folder: Path, G: torch.nn.Module, D: torch.nn.Module, G_ema: torch.nn.Module | None, cfgs: Any, *,
             step: int, best_fid: Any) -> None:  # fmt: skip
    """Write the files StudioGAN's WORKER.save writes for a best step (model=G/D/G_ema-best-weights-step=N.pth),
    through its own misc.save_model, with the states it puts in them."""
    misc = importlib.import_module("utils.misc")
    folder.mkdir(parents=True, exist_ok=True)
    misc.make_GAN_untrainable(G, G_ema, D)
    opt = cfgs.OPTIMIZATION
    misc.save_model(model="G", when="best", step=step, ckpt_dir=str(folder),
                    states={"state_dict": G.state_dict(), "optimizer": opt.g_optimizer.state_dict()})  # fmt: skip
    d_states = {"state_dict": D.state_dict(), "optimizer": opt.d_optimizer.state_dict(), "seed": 82624,
                "run_name": "SAGAN-train-test", "step": step, "epoch": 1, "topk": "initialize", "aa_p": 0.0,
                "best_step": step, "best_fid": best_fid, "best_fid_ckpt": str(folder),
                "lecam_emas": importlib.import_module("utils.ops").LeCamEMA().__dict__}  # fmt: skip
    misc.save_model(model="D", when="best", step=step, ckpt_dir=str(folder), states=d_states)
    if G_ema is not None:
        misc.save_model(model="G_ema", when="best", step=step, ckpt_dir=str(folder), states={"state_dict": G_ema.state_dict()})


class Step:
    """StudioGAN's training step: its WORKER.train_discriminator and train_generator, run on a WORKER that holds only
    what those two methods read (OPTIMIZATION.d_updates_per_step is the config's: set it to 1 for one D step). The
    real batch and the (z, labels) each draws come from the caller, through `sample_data_basket` and
    utils.sample.sample_zy (the function its steps draw latents with)."""

    def __init__(self, cfgs: Any, G: torch.nn.Module, D: torch.nn.Module) -> None:
        self.sample = importlib.import_module("utils.sample")
        w = object.__new__(importlib.import_module("worker").WORKER)
        w.cfgs, w.Gen, w.Dis, w.Gen_ema, w.Gen_mapping, w.Gen_synthesis = cfgs, G, D, None, None, None
        for group in ("DATA", "MODEL", "LOSS", "STYLEGAN", "OPTIMIZATION", "AUG", "RUN", "MISC"):
            setattr(w, group, getattr(cfgs, group))
        w.is_stylegan, w.DDP, w.local_rank, w.adc_fake, w.topk = False, False, "cpu", False, "initialize"
        w.blur_init_sigma = cfgs.STYLEGAN.blur_init_sigma
        self.worker = w

    def d_step(self, real: torch.Tensor, y_real: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> float:
        """One D step (train_discriminator) on real images in [-1, 1] and their labels, against G(z, y); its loss."""
        self.worker.sample_data_basket = lambda: ((real,), (y_real,))
        with self._latents(z, y):
            _, loss = self.worker.train_discriminator(current_step=0)
        return loss.item()

    def g_step(self, z: torch.Tensor, y: torch.Tensor) -> float:
        """One G step (train_generator) on G(z, y); its loss."""
        with self._latents(z, y):
            return self.worker.train_generator(current_step=0).item()

    @contextlib.contextmanager
    def _latents(self, z: torch.Tensor, y: torch.Tensor) -> Iterator[None]:
        original = self.sample.sample_zy
        self.sample.sample_zy = lambda **kwargs: (z.clone(), y.clone(), None)
        try:
            yield
        finally:
            self.sample.sample_zy = original


@torch.no_grad()
def move_away(G: torch.nn.Module, D: torch.nn.Module, *, seed: int) -> None:
    """Weights as training leaves them, not as they start: every weight scaled and shifted at random (so spectral norms
    are not 1), attention's sigma non-zero, BatchNorm statistics of a few train-mode batches, u and v of a few power
    iterations, then the weights moved again (so u and v are not converged and the next power iteration matters)."""
    g = torch.Generator().manual_seed(seed)
    for net in (G, D):
        for name, p in net.named_parameters():
            if name.endswith("sigma"):
                p.uniform_(0.5, 1.5, generator=g)
            else:
                p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g)).add_(0.02 * torch.randn(p.shape, generator=g))
    G.train(), D.train()
    for _ in range(3):
        z = torch.randn(8, G.z_dim, generator=g)
        y = torch.randint(G.num_classes, (8,), generator=g)
        D(G(z, y), y)
    for net in (G, D):
        for name, p in net.named_parameters():
            if not name.endswith("sigma"):
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    G.eval(), D.eval()


@torch.no_grad()
def settle_power_iterations(net: torch.nn.Module, iterations: int = 50) -> None:
    """Run the spectral-norm power iterations until u and v have settled on the current weights (a trained model's
    are one small weight change behind), leaving everything else as it is."""
    hook_type = importlib.import_module("torch.nn.utils.spectral_norm").SpectralNorm  # the hook behind spectral_norm()
    for m in net.modules():
        if hasattr(m, "weight_orig"):
            hook = next(h for h in m._forward_pre_hooks.values() if isinstance(h, hook_type))
            for _ in range(iterations):
                hook.compute_weight(m, do_power_iteration=True)


def grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's state dict with every parameter replaced by its gradient (buffers by zeros): converted by
    sagan.pretrained.studiogan like a state dict, it lines up with sagan's parameters."""
    return {
        k: v.grad if isinstance(v, torch.nn.Parameter) and v.grad is not None else torch.zeros_like(v)
        for k, v in net.state_dict(keep_vars=True).items()
    }


class EmbeddingConditionalBatchNorm(torch.nn.Module):
    """StudioGAN's class-conditional BatchNorm as it was to 2022-01-25 (src/utils/ops.py before commit 43b43f1, the
    layout of its 2020-21 checkpoints): bn(x) * (1 + embed0(y)) + embed1(y), embed0 and embed1 spectrally normalised
    (classes, C) embeddings. Built from a current one so that it computes the same function: embed = W^T, with the
    power iteration's u and v swapped. Its forward takes the one-hot labels today's generator passes."""

    def __init__(self, current: torch.nn.Module) -> None:
        super().__init__()
        self.bn = current.bn
        for name, linear in (("embed0", current.gain), ("embed1", current.bias)):
            embed = torch.nn.utils.spectral_norm(torch.nn.Embedding(*linear.weight_orig.shape[::-1]), eps=1e-6)
            with torch.no_grad():
                embed.weight_orig.copy_(linear.weight_orig.t())
                embed.weight_u.copy_(linear.weight_v)
                embed.weight_v.copy_(linear.weight_u)
            setattr(self, name, embed)

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        y = onehot.argmax(1)
        gain = (1 + self.embed0(y))[:, :, None, None]
        return self.bn(x) * gain + self.embed1(y)[:, :, None, None]


class SharedConditionalBatchNorm(torch.nn.Module):
    """StudioGAN's resnet class-conditional BatchNorm from 2022-01-25 to 2022-03-06 (commit 43b43f1): the generator
    holds a plain embedding `shared` (classes, z_dim) and every BatchNorm computes bn(x) * (1 + gain(shared(y))) +
    bias(shared(y)) with spectrally normalised linears z_dim -> C. A new function (random weights), not today's."""

    def __init__(self, current: torch.nn.Module, shared: torch.nn.Embedding, seed: int) -> None:
        super().__init__()
        self.bn, self.shared = current.bn, [shared]  # in a list: `shared` is the generator's, not a submodule here
        channels, z_dim = current.gain.weight_orig.shape[0], shared.weight.shape[1]
        g = torch.Generator().manual_seed(seed)
        for name in ("gain", "bias"):
            linear = torch.nn.utils.spectral_norm(torch.nn.Linear(z_dim, channels, bias=False), eps=1e-6)
            with torch.no_grad():
                linear.weight_orig.copy_(torch.randn(channels, z_dim, generator=g) * 0.1)
                linear.weight_u.copy_(torch.nn.functional.normalize(torch.randn(channels, generator=g), dim=0))
                linear.weight_v.copy_(torch.nn.functional.normalize(torch.randn(z_dim, generator=g), dim=0))
            setattr(self, name, linear)

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        e = self.shared[0](onehot.argmax(1))
        return self.bn(x) * (1 + self.gain(e))[:, :, None, None] + self.bias(e)[:, :, None, None]


def with_layout(G: torch.nn.Module, layout: str, *, seed: int = 0) -> torch.nn.Module:
    """A copy of StudioGAN's generator G whose conditional BatchNorms have an earlier layout ("embed" or "shared"), in
    eval mode; its state dict has the keys StudioGAN saved in that layout."""
    G = copy.deepcopy(G)
    ops = importlib.import_module("utils.ops")
    if layout == "shared":
        G.shared = torch.nn.Embedding(G.num_classes, G.z_dim)
        torch.nn.init.normal_(G.shared.weight, std=0.05, generator=torch.Generator().manual_seed(seed))
    for block in G.modules():
        for name, child in list(block.named_children()):
            if isinstance(child, ops.ConditionalBatchNorm2d):
                new = EmbeddingConditionalBatchNorm(child) if layout == "embed" else SharedConditionalBatchNorm(child, G.shared, seed)
                setattr(block, name, new)
                seed += 1
    return G.eval()
