"""NaN and Inf in training, all in one place: the first step each loss went non-finite is kept on the device (no host
sync per step), checked together with the networks' parameters when the host reads from the device anyway (at log
and checkpoint steps); what to do then (stop, or roll back) is the run's (sagan.training.run.Run.rollback)."""

from __future__ import annotations

import torch
from torch import nn

from sagan.utils.errors import UserError


class Diverged(UserError, RuntimeError):
    """Training produced NaN or Inf; the message names what, when, and the last good checkpoint."""


class NonFiniteWatch:
    """The first step at which the D and G losses were NaN or Inf (-1: not since the last check), on the device."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((2,), -1, dtype=torch.long, device=device)

    def record(self, step: int, losses: torch.Tensor) -> None:
        """After a step: (d_loss, g_loss) of `step`, with no host sync."""
        bad = ~torch.isfinite(losses)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def check(self, networks: dict[str, nn.Module], step: int) -> str | None:
        """What went NaN/Inf since the last check (the losses, or the networks' parameters now), or None. Syncs."""
        first = self.first_bad.tolist()
        self.first_bad.fill_(-1)
        bad = [f"{name} (first at step {s})" for name, s in zip(("d_loss", "g_loss"), first) if s >= 0]
        for name, net in networks.items():
            norms = torch._foreach_norm(list(net.parameters()))
            if not bool(torch.isfinite(torch.stack(norms)).all()):
                bad.append(f"{name} parameters (at step {step})")
        return f"non-finite {', '.join(bad)}" if bad else None
