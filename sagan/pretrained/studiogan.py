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

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sagan.checkpoint import CheckpointError
from sagan.config import ModelConfig
from sagan.models import build_models
from sagan.models.discriminator import ARCH
from sagan.models.generator import WIDTHS
from sagan.pretrained.studiogan_files import plain, read_file, sha256
from sagan.pretrained.studiogan_layers import SN_KEYS, Keys, blocks, conditional_bn, move, move_attention, move_bn


@dataclass
class Imported:
    """The converted networks and what is known of where they came from."""

    model: dict[str, Any]  # sagan's model record (ModelConfig fields and num_classes)
    nets: dict[str, dict[str, torch.Tensor]]  # G, D (if the run has one), G_ema: sagan state dicts
    source: dict[str, Any] = field(default_factory=dict)


def convert_generator(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """A StudioGAN resnet generator's state dict as sagan's: (model settings it implies, state dict, cBN layout)."""
    keys = Keys(state, "G", path)
    sn = keys.has("linear0.weight_orig")
    if not (sn or keys.has("linear0.weight")) or not any(keys.has(f"conv2d5{s}") for s in (*SN_KEYS, ".weight")):
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
    move(keys, "linear0", "linear", out, sn)
    widths, attn, size = [first], [], 4
    for i, kind in blocks(keys, "conv2d1"):
        theirs = f"blocks.{i}.0"
        if kind == "attention":
            ours = f"blocks.attn{size}"
            if move_attention(keys, theirs, ours, out, sn) != widths[-1]:
                raise keys.error(f"its attention after the {size}x{size} block does not have that block's width")
            attn.append(size)
            continue
        b = len(widths) - 1
        weight = move(keys, f"{theirs}.conv2d1", f"blocks.block{b}.conv1", out, sn)
        if weight.shape[1] != widths[-1]:
            raise keys.error(f"its block {b} takes {weight.shape[1]} channels after {widths[-1]}")
        move(keys, f"{theirs}.conv2d2", f"blocks.block{b}.conv2", out, sn)
        move(keys, f"{theirs}.conv2d0", f"blocks.block{b}.shortcut", out, sn)
        for bn in ("bn1", "bn2"):
            if layout == "none":
                move_bn(keys, f"{theirs}.{bn}", f"blocks.block{b}.{bn}.bn", out, affine=True)
            else:
                conditional_bn(keys, f"{theirs}.{bn}", f"blocks.block{b}.{bn}", out, layout, sn)
        widths.append(weight.shape[0])
        size *= 2
    if layout == "shared":
        keys.take("shared.weight")
    move_bn(keys, "bn4", "out_bn", out, affine=True)
    move(keys, "conv2d5", "out_conv", out, sn)
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
    keys = Keys(state, "D", path)
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
    for i, kind in blocks(keys, "conv2d1"):
        theirs = f"blocks.{i}.0"
        if kind == "attention":
            size = sizes[len(widths) - 1]
            if sizes.index(size) != len(widths) - 1:
                raise keys.error(
                    f"its attention follows block {len(widths) - 1}, the second to make {size}x{size} maps; sagan "
                    "places attention after the first block of a size"
                )
            if move_attention(keys, theirs, f"blocks.attn{size}", out, sn) != widths[-1]:
                raise keys.error(f"its attention after block {len(widths) - 1} does not have that block's width")
            attn.append(size)
            continue
        b = len(widths)
        weight = move(keys, f"{theirs}.conv2d1", f"blocks.block{b}.conv1", out, sn)
        move(keys, f"{theirs}.conv2d2", f"blocks.block{b}.conv2", out, sn)
        if any(keys.has(f"{theirs}.conv2d0{s}") for s in (*SN_KEYS, ".weight")):
            move(keys, f"{theirs}.conv2d0", f"blocks.block{b}.shortcut", out, sn)
        widths.append(weight.shape[0])
    move(keys, "linear1", "linear", out, sn)
    num_classes = 0
    if any(keys.has(f"embedding{s}") for s in (*SN_KEYS, ".weight")):
        num_classes = move(keys, "embedding", "embed", out, sn).shape[0]
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
