"""G's and D's Adam and their learning rates, in one place: the settings (learning rates, betas, eps, fused) always
come from the run's config, also on resume (a checkpoint gives only Adam's moments), and `scale` is the factor NaN
rollbacks have multiplied both learning rates by, kept in checkpoints so that it holds after a resume."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("sagan")


class Optimizers:
    """Adam for G (`g`) and for D (`d`), at base learning rates times `scale`."""

    def __init__(
        self, G: nn.Module, D: nn.Module, *, lr_g: float, lr_d: float, betas: tuple[float, float], eps: float, fused: bool
    ) -> None:
        self.lr = {"G": lr_g, "D": lr_d}
        # fused=None, not False, without fused Adam: torch then picks its multi-tensor (foreach) implementation.
        self.adam = {"betas": tuple(betas), "eps": eps, "fused": fused or None}
        self.scale = 1.0
        self.g = torch.optim.Adam(G.parameters(), lr=lr_g, **self.adam)
        self.d = torch.optim.Adam(D.parameters(), lr=lr_d, **self.adam)

    def by_name(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.g, "D": self.d}

    def set_scale(self, scale: float) -> None:
        """Train from now on with both learning rates times `scale` (what a NaN rollback does)."""
        self.scale = scale
        for name, opt in self.by_name().items():
            for group in opt.param_groups:
                group["lr"] = self.lr[name] * scale  # the expression a resume computes: bit-identical learning rates

    def state_dict(self) -> dict[str, Any]:
        return {"opt_g": self.g.state_dict(), "opt_d": self.d.state_dict(), "lr_scale": self.scale}

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
