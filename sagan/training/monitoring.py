"""What a run reports about itself between checkpoints: the step's values (losses, D's outputs on real and fake
images, gradient norms) summed on the device between two logs, and the scalars logged with them (learning rates,
every attention gamma and the attention branch's share of its layer's output, every spectral-norm sigma), with a
warning for an attention layer that never switched on. One host sync per log for all of them."""

from __future__ import annotations

import logging

import torch
from torch import nn

from sagan.models import attention_gammas, attention_shares, spectral_sigmas
from sagan.training.step import Trainer

log = logging.getLogger("sagan")


# The W&B and metrics.jsonl names of Trainer.train_step's values (sagan.training.step.STEP_VALUES).
LOGGED = {
    "d_loss": "loss/d", "g_loss": "loss/g", "d_real": "D/real", "d_fake": "D/fake", "d_real_positive": "D/real_positive",
    "grad_norm_d": "grad_norm/D", "grad_norm_g": "grad_norm/G",
}  # fmt: skip


# Values a step may lack: a step that fp16 loss scaling skips (its gradients overflowed, nothing was updated) has an
# inf or NaN gradient norm, which is not the norm of any update; their means are over the steps that made one.
UPDATE_VALUES = ("grad_norm_d", "grad_norm_g")


class LossSums:
    """The step's values summed on the device between two logs (no host sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor | int] = {}

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            counted: torch.Tensor | int = 1
            if k in UPDATE_VALUES:
                counted = torch.isfinite(v)
                v = torch.where(counted, v, 0.0)
            self.sums[k] = self.sums.get(k, 0) + v
            self.counts[k] = self.counts.get(k, 0) + counted

    def means(self) -> dict[str, float]:
        """Each value's mean; NaN for an update value no step of the window had."""
        return {k: (v / self.counts[k]).item() for k, v in self.sums.items()}


def training_scalars(trainer: Trainer, G_inputs: tuple[torch.Tensor, torch.Tensor | None]) -> dict[str, float]:
    """Learning rates, every attention gamma and share and every spectral-norm sigma of G and D (one host sync for
    all). The shares are G's on `G_inputs` (z, y) and D's on the last real batch it trained on."""
    named: dict[str, torch.Tensor] = {}
    G, D = trainer.G, trainer.D
    runs = {"G": lambda: G(*G_inputs), "D": lambda: D(trainer.last_real, trainer.last_real_labels)}
    for net_name, net in (("G", G), ("D", D)):
        named |= {f"gamma/{net_name}/{k.removeprefix('blocks.')}": v for k, v in attention_gammas(net).items()}
        named |= {f"attn_share/{net_name}/{k.removeprefix('blocks.')}": v for k, v in attention_shares(net, runs[net_name]).items()}
        named |= {f"sigma/{net_name}/{k}": v for k, v in spectral_sigmas(net).items()}
    values = torch.stack(list(named.values())).tolist() if named else []
    lrs = {"lr/g": trainer.opt.g.param_groups[0]["lr"], "lr/d": trainer.opt.d.param_groups[0]["lr"]}
    return {**lrs, **dict(zip(named, values))}


def warn_dead_attention(scalars: dict[str, float], step: int, after: int, warned: set[str]) -> set[str]:
    """Warn once per layer whose gamma is still exactly 0 after `after` steps: Adam moves any parameter that ever got
    a non-zero gradient, so its gradient has always been zero and the attention block never switched on."""
    dead = {k for k, v in scalars.items() if k.startswith("gamma/") and v == 0.0} if step >= after else set()
    for key in sorted(dead - warned):
        log.warning(
            f"{key} is still exactly 0 after {step} steps: its gradient has always been zero, so this attention "
            "layer never switched on (is its output used, and is its gamma in the optimizer?)"
        )
    return dead


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
