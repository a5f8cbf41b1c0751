"""One GAN training step (n_dis D steps, one G step, EMA) and the state a checkpoint needs to continue it exactly."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sagan.data import to_float
from sagan.losses import get_losses

log = logging.getLogger("sagan")


class Diverged(RuntimeError):
    """Training produced NaN or Inf; the message names what, when, and the last good checkpoint."""


class Trainer:
    """G, D, G_ema, both Adam optimizers and the latent RNG: everything one step touches and a checkpoint holds.

    Knows nothing about configs, files or logging; `train.py` drives it.
    """

    def __init__(
        self,
        G: nn.Module,
        D: nn.Module,
        *,
        loss: str = "hinge",
        lr_g: float = 1e-4,
        lr_d: float = 4e-4,
        betas: tuple[float, float] = (0.0, 0.9),
        n_dis: int = 1,
        ema_decay: float = 0.9999,
        ema_start: int = 1000,
        device: torch.device | str = "cpu",
        seed: int = 0,
        precision: str = "fp32",
        channels_last: bool = False,
        fused_adam: bool = False,
        compile: bool = False,
    ) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision '{precision}': use fp32 or bf16")
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.G = G.to(self.device, memory_format=self.memory_format)
        self.D = D.to(self.device, memory_format=self.memory_format)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=lr_g, betas=betas, fused=fused_adam or None)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=betas, fused=fused_adam or None)
        # bf16 autocast for the G and D forwards; weights, optimizer, spectral norm and losses stay fp32.
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        # Compiled views of the same modules (same parameters): the step runs through them, checkpoints use G and D.
        self.G_step, self.D_step = (torch.compile(self.G), torch.compile(self.D)) if compile else (self.G, self.D)
        self.d_loss_fn, self.g_loss_fn = get_losses(loss)
        self.n_dis, self.ema_decay, self.ema_start = n_dis, ema_decay, ema_start
        # Latents and fake labels come from their own generator, saved in checkpoints, so resume is exact.
        self.seed = seed
        self.rng = torch.Generator(self.device).manual_seed(seed)
        self.step = 0  # G steps done
        # The first step at which each loss was NaN/Inf (-1: never), kept on the device and read only by
        # `nonfinite()`: checking every step would cost a host sync per step.
        self.first_bad = torch.full((2,), -1, dtype=torch.long, device=self.device)

    def sample_latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(n, self.G.z_dim, generator=self.rng, device=self.device)
        if self.G.num_classes == 0:
            return z, None
        return z, torch.randint(self.G.num_classes, (n,), generator=self.rng, device=self.device)

    def d_step(self, real: torch.Tensor, y_real: torch.Tensor | None) -> torch.Tensor:
        z, y_fake = self.sample_latents(real.shape[0])
        with torch.no_grad(), torch.autocast(**self.autocast):
            fake = self.G_step(z, y_fake).float()
        # Real and fake in one forward: one spectral-norm power iteration per D step, as the official code does.
        y = None if y_real is None else torch.cat([y_real, y_fake])
        images = torch.cat([real, fake]).contiguous(memory_format=self.memory_format)
        with torch.autocast(**self.autocast):
            logits = self.D_step(images, y)
        loss = self.d_loss_fn(*logits.float().chunk(2))
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return loss.detach()

    def g_step(self, batch_size: int) -> torch.Tensor:
        z, y = self.sample_latents(batch_size)
        with torch.autocast(**self.autocast):
            logits = self.D_step(self.G_step(z, y), y)
        loss = self.g_loss_fn(logits.float())
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        return loss.detach()

    @torch.no_grad()
    def ema_update(self) -> None:
        """G_ema <- decay * G_ema + (1 - decay) * G after `ema_start` steps, a copy of G before.

        Buffers (BatchNorm statistics, spectral-norm u and v) are copied, never averaged: averaged u/v vectors shrink
        and under-estimate sigma.
        """
        ema_params, params = list(self.G_ema.parameters()), list(self.G.parameters())
        if self.step <= self.ema_start:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1 - self.ema_decay)
        torch._foreach_copy_(list(self.G_ema.buffers()), list(self.G.buffers()))

    def train_step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """n_dis D steps on fresh real batches, one G step, one EMA update. Losses stay on the device (no sync).

        Real labels are used only by a class-conditional model; an unconditional one ignores them.
        """
        self.G.train(), self.D.train()
        for _ in range(self.n_dis):
            images, labels = next(batches)
            d_loss = self.d_step(to_float(images), labels if self.G.num_classes else None)
        g_loss = self.g_step(images.shape[0])
        self.step += 1
        self.ema_update()
        bad = ~torch.isfinite(torch.stack([d_loss, g_loss]))
        self.first_bad = torch.where(bad & (self.first_bad < 0), self.step, self.first_bad)
        return {"d_loss": d_loss, "g_loss": g_loss}

    def nonfinite(self) -> str | None:
        """What went NaN/Inf since the last check (losses, or G/D parameters), or None. Syncs with the device."""
        first = self.first_bad.tolist()
        self.first_bad.fill_(-1)
        bad = [f"{name} (first at step {step})" for name, step in zip(("d_loss", "g_loss"), first) if step >= 0]
        for name, net in (("G", self.G), ("D", self.D)):
            norms = torch._foreach_norm(list(net.parameters()))
            if not bool(torch.isfinite(torch.stack(norms)).all()):
                bad.append(f"{name} parameters (at step {self.step})")
        return f"non-finite {', '.join(bad)}" if bad else None

    def scale_lr(self, factor: float) -> None:
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] *= factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng": self.rng.get_state(),
            "rng_device": self.device.type,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.step = state["step"]
        if state["rng_device"] == self.device.type:
            self.rng.set_state(state["rng"])
        else:  # CPU and CUDA generators have different states: continue with a fresh, still seeded, latent stream
            self.rng.manual_seed(self.seed * 1_000_003 + self.step)
            log.warning(
                f"checkpoint was written on {state['rng_device']}, this run is on {self.device.type}: training "
                "continues with a new latent stream, so it is not bit-identical to an uninterrupted run"
            )
