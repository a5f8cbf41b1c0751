"""PyTorch-StudioGAN checkpoints in sagan's networks: their files read without running any of their code, their
architecture told from the tensors, their G, D and G_ema converted to `model=studiogan*` networks that compute the
same function (`sagan-import`, sagan/import_weights.py, writes the result as a sagan checkpoint).

StudioGAN's SAGAN configs all use its `resnet` backbone. A run folder holds `model=G-{best|current}-weights-step=N.pth`
(`{"state_dict", "optimizer"}`), `model=D-...` (plus the step, best FID, seed, ...) and, for runs with an EMA,
`model=G_ema-...`. Its class-conditional BatchNorm has been saved in three layouts:

    embed0/embed1   (to 2022-01-25)  gain = 1 + E0[y], bias = E1[y], E0 and E1 (classes, C) spectrally normalised
                                     embeddings: W = E^T with u and v swapped is the same layer as a linear of one-hot y
    shared + gain   (to 2022-03-06)  gain = 1 + W_g S[y], bias = W_b S[y], S a plain (classes, z_dim) embedding shared
                                     by all layers, W_g and W_b spectrally normalised linears: folded into per-class tables
    gain/bias       (since)          gain = 1 + W_g onehot(y), bias = W_b onehot(y): sagan's `cond_bn=linear` as it is
"""

from __future__ import annotations

import hashlib
import math
import pickle
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from sagan.checkpoint import CheckpointError
from sagan.config import ModelConfig
from sagan.models import build_models
from sagan.models.discriminator import ARCH
from sagan.models.generator import WIDTHS

WHICH = ("best", "current")
NETWORKS = ("G", "D", "G_ema")
_FILE = re.compile(r"^model=(G|D|G_ema)-(best|current)-weights-step=(\d+)\.pth$")
# What StudioGAN's D files hold besides tensors: its best FID is a numpy float64. Numpy scalars and dtypes are data
# (a dtype and raw bytes); allowed under both numpy module paths (numpy 1 wrote numpy.core, numpy 2 numpy._core).
_scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
_NUMPY_SCALARS = [
    (np.dtype, "numpy.dtype"),
    (_scalar, "numpy.core.multiarray.scalar"),
    (_scalar, "numpy._core.multiarray.scalar"),
    *(type(np.dtype(kind)) for kind in ("bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64")),
]
_SN = (".weight_orig", ".weight_u", ".weight_v")


@dataclass
class Imported:
    """The converted networks and what is known of where they came from."""

    model: dict[str, Any]  # sagan's model record (ModelConfig fields and num_classes)
    nets: dict[str, dict[str, torch.Tensor]]  # G, D (if the run has one), G_ema: sagan state dicts
    source: dict[str, Any] = field(default_factory=dict)


def run_files(src: Path, which: str) -> tuple[dict[str, Path], int]:
    """The G, D and G_ema files of a StudioGAN run (a folder, or one `model=...pth` file and the others beside it) at
    `which` (best or current), and their step. G is required; D and G_ema are taken when they are there."""
    if which not in WHICH:
        raise CheckpointError(f"which={which} is not a StudioGAN checkpoint kind: choose best or current")
    if src.is_file():
        match = _FILE.match(src.name)
        if match is None:
            raise CheckpointError(
                f"'{src}' is not named like a StudioGAN checkpoint (model=G-best-weights-step=N.pth): pass a run folder "
                "or one of its model=... files"
            )
        folder, which, step = src.parent, match.group(2), int(match.group(3))
    elif src.is_dir():
        folder, step = src, None
    else:
        raise CheckpointError(f"'{src}' does not exist: pass a StudioGAN run folder or a model=G-...pth file")
    found = {}
    for path in sorted(folder.iterdir()):
        match = _FILE.match(path.name)
        if match and match.group(2) == which and (step is None or int(match.group(3)) == step):
            found.setdefault(match.group(1), []).append((int(match.group(3)), path))
    if "G" not in found:
        raise CheckpointError(
            f"no StudioGAN generator in '{folder}': expected model=G-{which}-weights-step=N.pth "
            f"({'which=best or which=current picks the kind' if src.is_dir() else 'beside the file given'})"
        )
    step = max(found["G"])[0]
    files = {net: dict(entries)[step] for net, entries in found.items() if step in dict(entries)}
    return files, step


def read_file(path: Path) -> dict[str, Any]:
    """A StudioGAN checkpoint file loaded with `weights_only=True` (tensors, plain containers and numpy scalars):
    anything else is refused without running it."""
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALARS):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line for line in str(e).splitlines() if "unsupported" in line.lower()), "unsupported content")
        raise CheckpointError(
            f"refused to load '{path}': {detail.strip()} StudioGAN checkpoints hold tensors, plain containers and "
            "numpy numbers, so this file is not one or has been tampered with"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"'{path}' is truncated or corrupt ({reason}): download it again") from None
    state = payload.get("state_dict") if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' has no 'state_dict' of tensors: it is not a StudioGAN model checkpoint")
    # Runs saved from DataParallel before StudioGAN peeled its models carry a "module." prefix.
    payload["state_dict"] = {k.removeprefix("module."): v for k, v in state.items()}
    return payload


class _Keys:
    """A StudioGAN state dict taken apart key by key; what is left at the end was not understood."""

    def __init__(self, state: dict[str, torch.Tensor], net: str, path: Path) -> None:
        self.state, self.left, self.net, self.path = state, set(state), net, path

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise self.error(f"it has no '{key}'")
        self.left.discard(key)
        return self.state[key]

    def peek(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise self.error(f"it has no '{key}'")
        return self.state[key]

    def error(self, why: str) -> CheckpointError:
        return CheckpointError(
            f"unknown architecture in '{self.path}' ({self.net}): {why}; sagan-import reads StudioGAN's resnet "
            "backbone (its SAGAN configs)"
        )

    def finish(self) -> None:
        if self.left:
            shown = ", ".join(sorted(self.left)[:4]) + (", ..." if len(self.left) > 4 else "")
            raise self.error(f"{len(self.left)} tensors that a SAGAN resnet does not have ({shown})")


def _blocks(keys: _Keys, block_key: str) -> list[tuple[int, str]]:
    """StudioGAN's `blocks.{i}.0` entries in order, each a residual block (one with `block_key`) or an attention."""
    indices = sorted({int(k.split(".")[1]) for k in keys.state if re.match(r"blocks\.\d+\.0\.", k)})
    if indices != list(range(len(indices))) or not indices:
        raise keys.error("its blocks are not numbered 0, 1, 2, ...")
    kinds = []
    for i in indices:
        prefix = f"blocks.{i}.0"
        if any(keys.has(f"{prefix}.{block_key}{s}") for s in (*_SN, ".weight")):
            kinds.append((i, "block"))
        elif any(keys.has(f"{prefix}.conv1x1_theta{s}") for s in (*_SN, ".weight")):
            kinds.append((i, "attention"))
        else:
            raise keys.error(f"its {prefix} is neither a residual block nor a self-attention block")
    return kinds


def _move(keys: _Keys, theirs: str, ours: str, out: dict[str, torch.Tensor], sn: bool) -> torch.Tensor:
    """One conv or linear layer (weight, spectral-norm vectors, bias) under sagan's name; returns the weight."""
    if sn:
        weight = out[f"{ours}.parametrizations.weight.original"] = keys.take(f"{theirs}.weight_orig")
        out[f"{ours}.parametrizations.weight.0._u"] = keys.take(f"{theirs}.weight_u")
        out[f"{ours}.parametrizations.weight.0._v"] = keys.take(f"{theirs}.weight_v")
    else:
        weight = out[f"{ours}.weight"] = keys.take(f"{theirs}.weight")
    if keys.has(f"{theirs}.bias"):
        out[f"{ours}.bias"] = keys.take(f"{theirs}.bias")
    return weight


def _move_bn(keys: _Keys, theirs: str, ours: str, out: dict[str, torch.Tensor], affine: bool) -> None:
    for name in ("running_mean", "running_var", "num_batches_tracked", *(("weight", "bias") if affine else ())):
        out[f"{ours}.{name}"] = keys.take(f"{theirs}.{name}")


def _move_attention(keys: _Keys, theirs: str, ours: str, out: dict[str, torch.Tensor], sn: bool) -> int:
    """A StudioGAN SelfAttention as sagan's SelfAttention2d (theta, phi, g, attn convs; sigma is gamma); its width."""
    for mine, their in (("query", "theta"), ("key", "phi"), ("value", "g"), ("out", "attn")):
        _move(keys, f"{theirs}.conv1x1_{their}", f"{ours}.{mine}", out, sn)
    sigma = keys.take(f"{theirs}.sigma")
    out[f"{ours}.gamma"] = sigma.reshape(())
    return out[f"{ours}.out.parametrizations.weight.original" if sn else f"{ours}.out.weight"].shape[0]


def _sn_weight(keys: _Keys, prefix: str) -> torch.Tensor:
    """The weight a spectrally normalised StudioGAN layer uses in eval mode, W / (u^T W v) with its stored u, v, in
    float64."""
    weight = keys.take(f"{prefix}.weight_orig").double()
    u, v = keys.take(f"{prefix}.weight_u").double(), keys.take(f"{prefix}.weight_v").double()
    return weight / torch.dot(u, weight.flatten(1) @ v)


def _conditional_bn(keys: _Keys, theirs: str, ours: str, out: dict[str, torch.Tensor], layout: str, sn: bool) -> None:
    """One class-conditional BatchNorm's gain and bias in sagan's form (see the module docstring for the layouts)."""
    _move_bn(keys, f"{theirs}.bn", f"{ours}.bn", out, affine=False)
    for mine, their in (("gain", "embed0"), ("bias", "embed1")) if layout == "embed" else (("gain", "gain"), ("bias", "bias")):
        if layout == "linear":
            _move(keys, f"{theirs}.{their}", f"{ours}.{mine}", out, sn)
        elif layout == "embed" and sn:  # an SN embedding (classes, C) is the SN linear E^T with u and v swapped
            out[f"{ours}.{mine}.parametrizations.weight.original"] = keys.take(f"{theirs}.{their}.weight_orig").t().contiguous()
            out[f"{ours}.{mine}.parametrizations.weight.0._u"] = keys.take(f"{theirs}.{their}.weight_v")
            out[f"{ours}.{mine}.parametrizations.weight.0._v"] = keys.take(f"{theirs}.{their}.weight_u")
        elif layout == "embed":
            out[f"{ours}.{mine}.weight"] = keys.take(f"{theirs}.{their}.weight").t().contiguous()
        else:  # shared: W S^T per class, as a table (classes, C) of the gain (1 + ...) and of the bias
            weight = _sn_weight(keys, f"{theirs}.{their}") if sn else keys.take(f"{theirs}.{their}.weight").double()
            table = (weight @ keys.peek("shared.weight").double().t()).t()
            out[f"{ours}.{mine}"] = (table + (1.0 if mine == "gain" else 0.0)).float()


def convert_generator(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """A StudioGAN resnet generator's state dict as sagan's: (model settings it implies, state dict, cBN layout)."""
    keys = _Keys(state, "G", path)
    sn = keys.has("linear0.weight_orig")
    if not (sn or keys.has("linear0.weight")) or not any(keys.has(f"conv2d5{s}") for s in (*_SN, ".weight")):
        raise keys.error("it has no linear0 and conv2d5 (the first and last layers of a resnet generator)")
    if keys.has("blocks.0.0.bn1.embed0.weight_orig") or keys.has("blocks.0.0.bn1.embed0.weight"):
        layout, num_classes = "embed", keys.peek(f"blocks.0.0.bn1.embed0.weight{'_orig' if sn else ''}").shape[0]
    elif keys.has("shared.weight"):
        layout, num_classes = "shared", keys.peek("shared.weight").shape[0]
    elif keys.has("blocks.0.0.bn1.gain.weight_orig") or keys.has("blocks.0.0.bn1.gain.weight"):
        layout, num_classes = "linear", keys.peek(f"blocks.0.0.bn1.gain.weight{'_orig' if sn else ''}").shape[1]
    elif keys.has("blocks.0.0.bn1.weight"):
        layout, num_classes = "none", 0
    else:
        raise keys.error("cannot tell how its BatchNorms are conditioned (no bn1.embed0, shared, bn1.gain or bn1.weight)")
    linear = keys.peek(f"linear0.weight{'_orig' if sn else ''}")
    z_dim, first = linear.shape[1], linear.shape[0] // 16
    if layout == "shared":
        shared_dim = keys.peek("shared.weight").shape[1]
        gain_in = keys.peek(f"blocks.0.0.bn1.gain.weight{'_orig' if sn else ''}").shape[1]
        if not shared_dim == gain_in == z_dim:
            raise keys.error(
                f"its generator feeds its BatchNorms a {gain_in}-d mix of a {shared_dim}-d class embedding and chunks "
                f"of z (z_dim {z_dim}): that is StudioGAN's big_resnet (BigGAN), not a SAGAN"
            )

    out: dict[str, torch.Tensor] = {}
    _move(keys, "linear0", "linear", out, sn)
    widths, attn, size = [first], [], 4
    for i, kind in _blocks(keys, "conv2d1"):
        theirs = f"blocks.{i}.0"
        if kind == "attention":
            ours = f"blocks.attn{size}"
            if _move_attention(keys, theirs, ours, out, sn) != widths[-1]:
                raise keys.error(f"its attention after the {size}x{size} block does not have that block's width")
            attn.append(size)
            continue
        b = len(widths) - 1
        weight = _move(keys, f"{theirs}.conv2d1", f"blocks.block{b}.conv1", out, sn)
        if weight.shape[1] != widths[-1]:
            raise keys.error(f"its block {b} takes {weight.shape[1]} channels after {widths[-1]}")
        _move(keys, f"{theirs}.conv2d2", f"blocks.block{b}.conv2", out, sn)
        _move(keys, f"{theirs}.conv2d0", f"blocks.block{b}.shortcut", out, sn)
        for bn in ("bn1", "bn2"):
            if layout == "none":
                _move_bn(keys, f"{theirs}.{bn}", f"blocks.block{b}.{bn}.bn", out, affine=True)
            else:
                _conditional_bn(keys, f"{theirs}.{bn}", f"blocks.block{b}.{bn}", out, layout, sn)
        widths.append(weight.shape[0])
        size *= 2
    if layout == "shared":
        keys.take("shared.weight")
    _move_bn(keys, "bn4", "out_bn", out, affine=True)
    _move(keys, "conv2d5", "out_conv", out, sn)
    keys.finish()
    if size not in WIDTHS:
        raise keys.error(f"its {len(widths) - 1} up-blocks make {size}x{size} images; sagan builds {sorted(WIDTHS)} px")
    # g_ch and multipliers: sagan's default widths at this size if they fit, else multipliers of the common divisor.
    default = list(WIDTHS[size])
    ch = widths[-1] // default[-1]
    multipliers = None if [ch * m for m in default] == widths else [w // math.gcd(*widths) for w in widths]
    ch = ch if multipliers is None else math.gcd(*widths)
    model = dict(
        resolution=size, z_dim=z_dim, g_ch=ch, g_widths=multipliers,
        g_attn=attn, g_sn=sn, cond_bn="tables" if layout == "shared" else "linear", conditional=num_classes > 0,
        num_classes=num_classes,
    )  # fmt: skip
    return model, out, layout


def convert_discriminator(
    state: dict[str, torch.Tensor], path: Path, resolution: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A StudioGAN resnet discriminator's state dict as sagan's: (model settings it implies, state dict)."""
    keys = _Keys(state, "D", path)
    sn = keys.has("linear1.weight_orig")
    if not (sn or keys.has("linear1.weight")):
        raise keys.error("it has no linear1 (the logit layer of a resnet discriminator)")
    if any(".bn0." in k or ".bn1." in k for k in keys.state):
        raise keys.error("its blocks have BatchNorm (StudioGAN's discriminator without spectral norm)")
    sizes, size = [], resolution
    for _, down in ARCH[resolution]:
        size //= 2 if down else 1
        sizes.append(size)
    out: dict[str, torch.Tensor] = {}
    widths, attn = [], []
    for i, kind in _blocks(keys, "conv2d1"):
        theirs = f"blocks.{i}.0"
        if kind == "attention":
            size = sizes[len(widths) - 1]
            if sizes.index(size) != len(widths) - 1:
                raise keys.error(
                    f"its attention follows block {len(widths) - 1}, the second to make {size}x{size} maps; sagan "
                    "places attention after the first block of a size"
                )
            if _move_attention(keys, theirs, f"blocks.attn{size}", out, sn) != widths[-1]:
                raise keys.error(f"its attention after block {len(widths) - 1} does not have that block's width")
            attn.append(size)
            continue
        b = len(widths)
        weight = _move(keys, f"{theirs}.conv2d1", f"blocks.block{b}.conv1", out, sn)
        _move(keys, f"{theirs}.conv2d2", f"blocks.block{b}.conv2", out, sn)
        if any(keys.has(f"{theirs}.conv2d0{s}") for s in (*_SN, ".weight")):
            _move(keys, f"{theirs}.conv2d0", f"blocks.block{b}.shortcut", out, sn)
        widths.append(weight.shape[0])
    _move(keys, "linear1", "linear", out, sn)
    num_classes = 0
    if any(keys.has(f"embedding{s}") for s in (*_SN, ".weight")):
        num_classes = _move(keys, "embedding", "embed", out, sn).shape[0]
    keys.finish()
    mults = [m for m, _ in ARCH[resolution]]
    if len(widths) != len(mults) or widths[0] % mults[0] or [widths[0] // mults[0] * m for m in mults] != widths:
        raise keys.error(f"its block widths {widths} are not those of sagan's {resolution} px discriminator")
    return dict(d_ch=widths[0] // mults[0], d_attn=attn, d_sn=sn, num_classes=num_classes), out


def convert_run(files: dict[str, Path]) -> Imported:
    """Read and convert a run's files (run_files); the result loads into sagan's `model=studiogan*` networks."""
    payloads = {net: read_file(path) for net, path in files.items()}
    model, G, layout = convert_generator(payloads["G"]["state_dict"], files["G"])
    nets = {"G": G}
    if "G_ema" in payloads:
        ema_model, nets["G_ema"], _ = convert_generator(payloads["G_ema"]["state_dict"], files["G_ema"])
        if ema_model != model:
            raise CheckpointError(f"'{files['G_ema']}' is another architecture than '{files['G']}'")
    else:  # StudioGAN's SAGAN runs keep no EMA: G itself is evaluated, as sagan's G_ema here
        nets["G_ema"] = G
    record = {**asdict(ModelConfig()), "name": preset_name(model["resolution"]), "init": "orthogonal", "bn_eps": 1e-4,
              "d_shortcut": "relu", "sn_update": "vu", **model}  # fmt: skip
    if "D" in payloads:
        d_model, nets["D"] = convert_discriminator(payloads["D"]["state_dict"], files["D"], model["resolution"])
        if d_model.pop("num_classes") != model["num_classes"]:
            raise CheckpointError(f"'{files['D']}' and '{files['G']}' are conditioned on different numbers of classes")
        record.update(d_model)
    else:  # D's settings are its preset's; there are no weights to build it from
        record.update({k: v for k, v in preset_model(model["resolution"]).items() if k.startswith("d_")})
    check_loads(record, nets)
    meta = payloads.get("D", {})
    source = {
        "from": "PyTorch-StudioGAN",
        "files": {net: path.name for net, path in files.items()},
        "sha256": {net: sha256(path) for net, path in files.items()},
        "cond_bn_layout": {"embed": "embed0/embed1 (to 2022-01-25)", "shared": "shared + gain/bias (to 2022-03-06)",
                           "linear": "gain/bias", "none": "unconditional"}[layout],  # fmt: skip
        "G_ema": "the run's own" if "G_ema" in files else "G (the run kept no EMA)",
        **{k: plain(meta[k]) for k in ("step", "best_step", "best_fid", "run_name", "seed") if k in meta},
    }
    return Imported(model=record, nets=nets, source=source)


def check_loads(record: dict[str, Any], nets: dict[str, dict[str, torch.Tensor]]) -> None:
    """Build sagan's networks from the record and load every converted state dict, strictly: a converter bug or an
    architecture it misread fails here, naming the tensors, before anything is written."""
    G, D = build_models(OmegaConf.create(record), record["num_classes"])
    for net, state in nets.items():
        module = D if net == "D" else G
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"the converted {net} does not fit sagan's network: {str(e).splitlines()[1].strip()}") from None


def preset_name(resolution: int) -> str:
    return f"studiogan{resolution}"


def preset_model(resolution: int) -> dict[str, Any]:
    """conf/model/studiogan<resolution>.yaml (the 32 px one for sizes without a preset), over the schema defaults."""
    name = preset_name(resolution) if resolution in (32, 64, 128) else "studiogan32"
    preset = OmegaConf.create(package_files("sagan.conf").joinpath("model", f"{name}.yaml").read_text())
    return {**asdict(ModelConfig()), **OmegaConf.to_container(preset)}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plain(value: Any) -> Any:
    """A numpy number as a Python one (sagan checkpoints hold plain types only)."""
    return value.item() if isinstance(value, np.generic) else value


def model_overrides(record: dict[str, Any]) -> list[str]:
    """The sagan-train overrides that give exactly this model record: its preset, then every setting that differs."""
    base = preset_model(record["resolution"])
    overrides = [f"model={base['name']}"]
    for key, value in record.items():
        if key not in ("name", "num_classes", "conditional") and base.get(key) != value:
            overrides.append(f"model.{key}={_override_value(value)}")
    if record["conditional"]:
        overrides.append("model.conditional=true")
    return overrides


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Iterable) and not isinstance(value, str):
        return "[" + ",".join(str(v) for v in value) + "]"
    return "null" if value is None else str(value)
