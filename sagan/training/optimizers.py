"""G's and D's Adam, their learning rates and their loss scaling, in one place: the settings (learning rates, betas,
eps, fused) always come from the run's config, also on resume (a checkpoint gives only Adam's moments), and `scale` is
the factor NaN rollbacks have multiplied both learning rates by, kept in checkpoints so that it holds after a resume.

With fp16 autocast (perf.precision=fp16, GPUs without bf16) each network's loss is scaled before its backward, so
that small fp16 gradients do not flush to zero, and its step is skipped when a gradient overflowed (the scale then
halves; it doubles after 2,000 steps without overflow): one GradScaler per network, as G and D step separately. In
any other precision the scalers are disabled and change nothing."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("sagan")


class Optimizers:
    """Adam for G (`g`) and for D (`d`), at base learning rates times `scale`."""

    def __init__(
        self,
        G: nn.Module,
        D: nn.Module,
        *,
        lr_g: float,
        lr_d: float,
        betas: tuple[float, float],
        eps: float,
        fused: bool,
        loss_scaling: bool,
        device_type: str,
    ) -> None:
        self.lr = {"G": lr_g, "D": lr_d}
        # fused=None, not False, without fused Adam: torch then picks its multi-tensor (foreach) implementation.
        self.adam = {"betas": tuple(betas), "eps": eps, "fused": fused or None}
        self.scale = 1.0
        self.g = torch.optim.Adam(G.parameters(), lr=lr_g, **self.adam)
        self.d = torch.optim.Adam(D.parameters(), lr=lr_d, **self.adam)
        self.scalers = {name: torch.amp.GradScaler(device_type, enabled=loss_scaling) for name in ("G", "D")}

    def by_name(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.g, "D": self.d}

    def backward(self, name: str, loss: torch.Tensor) -> None:
        """Gradients of `loss` for network `name`'s parameters (of the loss times the loss scale, with fp16)."""
        self.scalers[name].scale(loss).backward()

    def unscale(self, name: str) -> None:
        """Divide `name`'s gradients by the loss scale (once, before its step), so that they can be measured."""
        self.scalers[name].unscale_(self.by_name()[name])

    def step(self, name: str) -> None:
        """Update network `name` (skipped after a gradient overflow with fp16) and adapt its loss scale."""
        self.scalers[name].step(self.by_name()[name])
        self.scalers[name].update()

    def set_scale(self, scale: float) -> None:
        """Train from now on with both learning rates times `scale` (what a NaN rollback does)."""
        self.scale = scale
        for name, opt in self.by_name().items():
            for group in opt.param_groups:
                group["lr"] = self.lr[name] * scale  # the expression a resume computes: bit-identical learning rates

    def state_dict(self) -> dict[str, Any]:
        return {
            "opt_g": self.g.state_dict(),
            "opt_d": self.d.state_dict(),
            "lr_scale": self.scale,
            "loss_scale": {name: scaler.state_dict() for name, scaler in self.scalers.items()},  # {} unless fp16
        }

    def load_state_dict(self, state: dict[str, Any], *, written_lr_d: float | None = None) -> None:
        """Adam's moments from `state` (a trainer's checkpoint state) with this run's settings and the checkpoint's
        scale; logs the settings that differ from the checkpoint's. `written_lr_d`: the D learning rate the
        checkpoint's run was configured with, which tells the scale of a checkpoint written before it was kept."""
        if "lr_scale" in state:
            self.scale = state["lr_scale"]
        else:  # an older checkpoint: its D learning rate over the configured one
            self.scale = state["opt_d"]["param_groups"][0]["lr"] / written_lr_d if written_lr_d else 1.0
        changed = []
        for name, key in (("G", "opt_g"), ("D", "opt_d")):
            changed += self._load(name, state[key])
        if changed:
            log.info(f"optimizer settings from the current config, not the checkpoint: {'; '.join(changed)}")
        self._load_loss_scales(state.get("loss_scale", {}))

    def _load_loss_scales(self, saved: dict[str, dict[str, Any]]) -> None:
        """The loss scales of an fp16 run continue where it stopped; a run that switches to fp16 on resume starts
        from GradScaler's initial scale, and one that leaves fp16 drops them (a checkpoint may change precision)."""
        for name, scaler in self.scalers.items():
            if not scaler.is_enabled():
                continue
            if saved.get(name):
                scaler.load_state_dict(saved[name])
            else:
                log.info(f"{name}'s fp16 loss scale starts at {scaler.get_scale():g}: the checkpoint was not trained in fp16")

    def _load(self, name: str, saved: dict[str, Any]) -> list[str]:
        """Load one Adam's state with the current settings in place of the saved ones; returns what differed."""
        current = {"lr": self.lr[name] * self.scale, **self.adam}
        changed, groups = [], []
        for group in saved["param_groups"]:
            for key, value in current.items():
                before = group.get(key)
                if key == "betas":
                    before = tuple(before)
                if (bool(before) != bool(value)) if key == "fused" else (before != value):
                    changed.append(f"{name} {key} {before} -> {value}")
            groups.append({**group, **current})
        # Loaded with the current settings, so that fused Adam finds its step counters where it needs them.
        self.by_name()[name].load_state_dict({**saved, "param_groups": groups})
        return sorted(set(changed))
