"""StudioGAN's resnet layers under sagan's names: a state dict taken apart key by key (`Keys`), its blocks in order,
and each kind of layer moved across (convs and linears with their spectral-norm vectors, BatchNorms, self-attention,
the three layouts of its class-conditional BatchNorm)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sagan.checkpoint import CheckpointError

SN_KEYS = (".weight_orig", ".weight_u", ".weight_v")


class Keys:
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


def blocks(keys: Keys, block_key: str) -> list[tuple[int, str]]:
    """StudioGAN's `blocks.{i}.0` entries in order, each a residual block (one with `block_key`) or an attention."""
    indices = sorted({int(k.split(".")[1]) for k in keys.state if re.match(r"blocks\.\d+\.0\.", k)})
    if indices != list(range(len(indices))) or not indices:
        raise keys.error("its blocks are not numbered 0, 1, 2, ...")
    kinds = []
    for i in indices:
        prefix = f"blocks.{i}.0"
        if any(keys.has(f"{prefix}.{block_key}{s}") for s in (*SN_KEYS, ".weight")):
            kinds.append((i, "block"))
        elif any(keys.has(f"{prefix}.conv1x1_theta{s}") for s in (*SN_KEYS, ".weight")):
            kinds.append((i, "attention"))
        else:
            raise keys.error(f"its {prefix} is neither a residual block nor a self-attention block")
    return kinds


def move(keys: Keys, theirs: str, ours: str, out: dict[str, torch.Tensor], sn: bool) -> torch.Tensor:
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


def move_bn(keys: Keys, theirs: str, ours: str, out: dict[str, torch.Tensor], affine: bool) -> None:
    for name in ("running_mean", "running_var", "num_batches_tracked", *(("weight", "bias") if affine else ())):
        out[f"{ours}.{name}"] = keys.take(f"{theirs}.{name}")


def move_attention(keys: Keys, theirs: str, ours: str, out: dict[str, torch.Tensor], sn: bool) -> int:
    """A StudioGAN SelfAttention as sagan's SelfAttention2d (theta, phi, g, attn convs; sigma is gamma); its width."""
    for mine, their in (("query", "theta"), ("key", "phi"), ("value", "g"), ("out", "attn")):
        move(keys, f"{theirs}.conv1x1_{their}", f"{ours}.{mine}", out, sn)
    sigma = keys.take(f"{theirs}.sigma")
    out[f"{ours}.gamma"] = sigma.reshape(())
    return out[f"{ours}.out.parametrizations.weight.original" if sn else f"{ours}.out.weight"].shape[0]


def sn_weight(keys: Keys, prefix: str) -> torch.Tensor:
    """The weight a spectrally normalised StudioGAN layer uses in eval mode, W / (u^T W v) with its stored u, v, in
    float64."""
    weight = keys.take(f"{prefix}.weight_orig").double()
    u, v = keys.take(f"{prefix}.weight_u").double(), keys.take(f"{prefix}.weight_v").double()
    return weight / torch.dot(u, weight.flatten(1) @ v)


def conditional_bn(keys: Keys, theirs: str, ours: str, out: dict[str, torch.Tensor], layout: str, sn: bool) -> None:
    """One class-conditional BatchNorm's gain and bias in sagan's form (see the module docstring for the layouts)."""
    move_bn(keys, f"{theirs}.bn", f"{ours}.bn", out, affine=False)
    for mine, their in (("gain", "embed0"), ("bias", "embed1")) if layout == "embed" else (("gain", "gain"), ("bias", "bias")):
        if layout == "linear":
            move(keys, f"{theirs}.{their}", f"{ours}.{mine}", out, sn)
        elif layout == "embed" and sn:  # an SN embedding (classes, C) is the SN linear E^T with u and v swapped
            out[f"{ours}.{mine}.parametrizations.weight.original"] = keys.take(f"{theirs}.{their}.weight_orig").t().contiguous()
            out[f"{ours}.{mine}.parametrizations.weight.0._u"] = keys.take(f"{theirs}.{their}.weight_v")
            out[f"{ours}.{mine}.parametrizations.weight.0._v"] = keys.take(f"{theirs}.{their}.weight_u")
        elif layout == "embed":
            out[f"{ours}.{mine}.weight"] = keys.take(f"{theirs}.{their}.weight").t().contiguous()
        else:  # shared: W S^T per class, as a table (classes, C) of the gain (1 + ...) and of the bias
            weight = sn_weight(keys, f"{theirs}.{their}") if sn else keys.take(f"{theirs}.{their}.weight").double()
            table = (weight @ keys.peek("shared.weight").double().t()).t()
            out[f"{ours}.{mine}"] = (table + (1.0 if mine == "gain" else 0.0)).float()
