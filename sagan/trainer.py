"""One GAN training step (n_dis D steps, one G step, EMA) and the state a checkpoint needs to continue it exactly."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sagan.diffaugment import DiffAugment
from sagan.images import to_float
from sagan.dist import SINGLE, World, broadcast_buffers
from sagan.losses import get_losses
from sagan.power_iteration import power_iteration_paused
from sagan.sync_batchnorm import use_plain_batchnorm
from sagan.standing_stats import bn_statistics_paused, is_bn_statistic, standing_statistics

log = logging.getLogger("sagan")

EMA_BN = ("standing", "copy")  # where G_ema's BatchNorm statistics come from (see `Trainer.ema_generator`)


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
        eps: float = 1e-8,
        n_dis: int = 1,
        d_calls: int = 1,
        d_sn_in_g_step: bool = False,
        g_bn_stats_in_d_step: bool = True,
        ema_decay: float = 0.9999,
        ema_start: int = 1000,
        ema_bn: str = "standing",
        ema_bn_batches: int = 16,
        ema_bn_batch_size: int = 64,
        device: torch.device | str = "cpu",
        seed: int = 0,
        world: World = SINGLE,
        grad_accum: int = 1,
        precision: str = "fp32",
        channels_last: bool = False,
        fused_adam: bool = False,
        compile: bool = False,
        augment: DiffAugment | None = None,
    ) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision '{precision}': use fp32 or bf16")
        if grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {grad_accum}")
        if ema_bn not in EMA_BN:
            raise ValueError(f"unknown optim.ema_bn '{ema_bn}': choose one of {', '.join(EMA_BN)}")
        if d_calls not in (1, 2):
            raise ValueError(f"optim.d_calls must be 1 or 2, got {d_calls}")
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.G = G.to(self.device, memory_format=self.memory_format)
        self.D = D.to(self.device, memory_format=self.memory_format)
        # The optimizer settings come from the arguments, also on resume (`load_state_dict` keeps only the moments);
        # `lr_scale` is what NaN rollbacks have multiplied the learning rates by so far.
        self.lr = {"G": lr_g, "D": lr_d}
        # fused=None, not False, without fused Adam: torch then picks its multi-tensor (foreach) implementation.
        self.adam = {"betas": tuple(betas), "eps": eps, "fused": fused_adam or None}
        self.lr_scale = 1.0
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=lr_g, **self.adam)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=lr_d, **self.adam)
        # bf16 autocast for the G and D forwards; weights, optimizer, spectral norm and losses stay fp32.
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        # Views of the same modules (same parameters) that the step runs through; checkpoints use G and D.
        # G_fast / D_fast: compiled or not. G_train / D_train: the network being trained in a step, wrapped in DDP
        # with several processes, so its gradients are averaged over ranks. The other network runs unwrapped: the
        # fakes D trains on need no gradients, and D's gradients in a G step are thrown away.
        self.G_fast, self.D_fast = (torch.compile(self.G), torch.compile(self.D)) if compile else (self.G, self.D)
        self.world = world
        if world.size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.G_train, self.D_train = DDP(self.G_fast, device_ids=ids), DDP(self.D_fast, device_ids=ids)
        else:
            self.G_train, self.D_train = self.G_fast, self.D_fast
        # After DDP gave every rank rank 0's weights. G_ema's BatchNorms are plain ones also when G's are synchronised:
        # its standing statistics are computed by whichever rank needs them, alone.
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        use_plain_batchnorm(self.G_ema)
        self.d_loss_fn, self.g_loss_fn = get_losses(loss)
        self.n_dis, self.ema_decay, self.ema_start, self.grad_accum = n_dis, ema_decay, ema_start, grad_accum
        # The step's mechanics (see OptimConfig): the official code's by default, StudioGAN's with 2, True, False.
        self.d_calls, self.d_sn_in_g_step, self.g_bn_stats_in_d_step = d_calls, d_sn_in_g_step, g_bn_stats_in_d_step
        # G_ema's BatchNorm statistics: "copy" takes G's running statistics at every EMA update; "standing"
        # re-estimates them from G_ema itself (`ema_generator`), so the EMA update copies only the other buffers.
        self.ema_bn, self.ema_bn_batches, self.ema_bn_batch_size = ema_bn, ema_bn_batches, ema_bn_batch_size
        self._ema_buffers = [
            (name, buffer) for name, buffer in self.G_ema.named_buffers() if ema_bn == "copy" or not is_bn_statistic(name)
        ]
        self._ema_stats_step = -1  # the step whose weights G_ema's standing statistics belong to
        # Latents and fake labels come from their own generator, saved in checkpoints, so resume is exact. Every rank
        # draws the latents of the whole global batch and takes its own slice: the run draws the same latents
        # whatever the number of ranks, so its checkpoints resume on any number of them.
        self.seed = seed
        self.rng = torch.Generator(self.device).manual_seed(seed)
        # DiffAugment of everything D sees (data.augment), or None; its random stream is checkpointed too.
        self.augment = augment
        self.step = 0  # G steps done
        # The first step at which each loss was NaN/Inf (-1: never), kept on the device and read only by
        # `nonfinite()`: checking every step would cost a host sync per step.
        self.first_bad = torch.full((2,), -1, dtype=torch.long, device=self.device)

    def sample_latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's `n` latents (and fake labels): its slice of the global batch of n * world.size."""
        total = n * self.world.size
        z = torch.randn(total, self.G.z_dim, generator=self.rng, device=self.device)
        y = torch.randint(self.G.num_classes, (total,), generator=self.rng, device=self.device) if self.G.num_classes else None
        mine = slice(self.world.rank * n, (self.world.rank + 1) * n)
        return z[mine], None if y is None else y[mine]

    def micro_batches(self, *tensors: torch.Tensor | None) -> Iterator[tuple[torch.Tensor | None, ...]]:
        """The batch as `grad_accum` micro-batches, each yielded in its context: gradients are averaged over ranks only
        after the last one's backward, and spectral norm's power iteration runs only in the first one's forwards."""
        chunks = [t.chunk(self.grad_accum) if t is not None else [None] * self.grad_accum for t in tensors]
        for i, micro in enumerate(zip(*chunks)):
            last = i == self.grad_accum - 1
            with contextlib.ExitStack() as stack:
                if i > 0:
                    stack.enter_context(power_iteration_paused(self.G, self.D))
                if not last and self.world.size > 1:
                    stack.enter_context(self.G_train.no_sync())
                    stack.enter_context(self.D_train.no_sync())
                yield micro

    def d_step(self, real: torch.Tensor, y_real: torch.Tensor | None) -> torch.Tensor:
        z, y_fake = self.sample_latents(real.shape[0])
        self.opt_d.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for real_m, y_real_m, z_m, y_fake_m in self.micro_batches(real, y_real, z, y_fake):
            with torch.no_grad(), torch.autocast(**self.autocast), self._g_bn_statistics():
                fake = self.G_fast(z_m, y_fake_m).to(real_m.dtype)  # bf16 under autocast: as the real images
            if self.augment is not None:  # the same policy for both, each image with its own draws
                real_m, fake = self.augment(real_m), self.augment(fake)
            with torch.autocast(**self.autocast):
                if self.d_calls == 1:
                    # Real and fake in one forward: one spectral-norm power iteration per D step, as the official code.
                    y = None if y_real_m is None else torch.cat([y_real_m, y_fake_m])
                    images = torch.cat([real_m, fake]).contiguous(memory_format=self.memory_format)
                    real_logits, fake_logits = self.D_train(images, y).chunk(2)  # D's head is fp32 (or fp64)
                else:  # StudioGAN: real, then fake, each forward with its own power iteration
                    real_logits = self.D_train(real_m.contiguous(memory_format=self.memory_format), y_real_m)
                    fake_logits = self.D_train(fake.contiguous(memory_format=self.memory_format), y_fake_m)
            loss = self.d_loss_fn(real_logits, fake_logits) / self.grad_accum
            loss.backward()
            total += loss.detach()
        self.opt_d.step()
        return total

    def g_step(self, batch_size: int) -> torch.Tensor:
        """One G update through a frozen D, as the official code does it: D's parameters get no gradients (they still
        pass gradients on to G) and D's spectral norm uses its current u and v, without a power iteration (the
        official code builds this D call with update_collection=NO_OPS), so D's u moves once per D update.
        With `d_sn_in_g_step` D's power iteration runs here too, as in StudioGAN."""
        z, y = self.sample_latents(batch_size)
        self.opt_g.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        self.D.requires_grad_(False)
        try:
            with contextlib.nullcontext() if self.d_sn_in_g_step else power_iteration_paused(self.D):
                for z_m, y_m in self.micro_batches(z, y):
                    with torch.autocast(**self.autocast):
                        fake = self.G_train(z_m, y_m)
                        if self.augment is not None:  # differentiable: G's gradients pass through it
                            fake = self.augment(fake.to(torch.promote_types(fake.dtype, torch.float32)))  # >= fp32, as in the D step
                        logits = self.D_fast(fake, y_m)
                    loss = self.g_loss_fn(logits) / self.grad_accum
                    loss.backward()
                    total += loss.detach()
        finally:
            self.D.requires_grad_(True)
        self.opt_g.step()
        return total

    def _g_bn_statistics(self) -> contextlib.AbstractContextManager:
        """Where the D step's G forward runs: G's BatchNorm running statistics updated, or (StudioGAN) left alone."""
        return contextlib.nullcontext() if self.g_bn_stats_in_d_step else bn_statistics_paused(self.G)

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
        if self._ema_buffers:  # none without spectral norm in G (model.g_sn=false) and with standing statistics
            G_buffers = dict(self.G.named_buffers())
            torch._foreach_copy_([b for _, b in self._ema_buffers], [G_buffers[n] for n, _ in self._ema_buffers])

    def ema_generator(self) -> nn.Module:
        """G_ema, ready to draw samples, FID or figures, and to be saved: in eval mode, and with `ema_bn="standing"`
        with standing BatchNorm statistics of its current weights (computed once per step, when first asked for)."""
        if self.ema_bn == "standing" and self._ema_stats_step != self.step:
            standing_statistics(
                self.G_ema,
                batches=self.ema_bn_batches,
                batch_size=self.ema_bn_batch_size,
                seed=self.seed,
            )
            self._ema_stats_step = self.step
        return self.G_ema.eval()

    def train_step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """n_dis D steps on fresh real batches, one G step, one EMA update. Losses stay on the device (no sync).

        `batches` yields this rank's share of each global batch; with several ranks the returned losses are the means
        over all of them.

        Real labels are used only by a class-conditional model; an unconditional one ignores them.
        """
        self.G.train(), self.D.train()
        for _ in range(self.n_dis):
            images, labels = next(batches)
            d_loss = self.d_step(to_float(images), labels if self.G.num_classes else None)
        g_loss = self.g_step(images.shape[0])
        self.step += 1
        # DDP sends rank 0's buffers (BN statistics, SN u and v) at the start of each forward; the forwards after that
        # updated them on each rank: send them again, so every rank ends the step with the same state.
        broadcast_buffers([self.G, self.D], self.world)
        self.ema_update()
        losses = torch.stack([d_loss, g_loss])
        if self.world.size > 1:  # the global batch's losses, so every rank sees (and acts on) the same values
            dist.all_reduce(losses)
            losses /= self.world.size
        d_loss, g_loss = losses.unbind()
        bad = ~torch.isfinite(losses)
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

    def set_lr_scale(self, scale: float) -> None:
        """Train from now on with both learning rates times `scale` (NaN rollbacks lower it); kept in checkpoints."""
        self.lr_scale = scale
        for name, opt in (("G", self.opt_g), ("D", self.opt_d)):
            for group in opt.param_groups:
                group["lr"] = self.lr[name] * scale  # the expression a resume computes: bit-identical learning rates

    def state_dict(self) -> dict[str, Any]:
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.ema_generator().state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng": self.rng.get_state(),
            "rng_device": self.device.type,
            "step": self.step,
            "lr_scale": self.lr_scale,
            **({"augment": self.augment.state_dict()} if self.augment is not None else {}),
        }

    def load_weights(self, nets: dict[str, Any]) -> None:
        """G, D and G_ema from another run's state (fine-tuning): the weights and buffers only, at this trainer's step."""
        self.G.load_state_dict(nets["G"])
        self.D.load_state_dict(nets["D"])
        self.G_ema.load_state_dict(nets["G_ema"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: weights, Adam's moments, the step and the latent stream from the checkpoint; the
        optimizer settings (learning rates, betas, eps, fused) from this trainer's arguments, times the checkpoint's
        rollback factor. Settings that differ from the checkpoint's are logged."""
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.lr_scale = state.get("lr_scale", 1.0)
        changed = self._load_optimizer("G", self.opt_g, state["opt_g"]) + self._load_optimizer("D", self.opt_d, state["opt_d"])
        if changed:
            log.info(f"optimizer settings from the current config, not the checkpoint: {'; '.join(changed)}")
        self.step = state["step"]
        if self.augment is not None and "augment" in state:
            self.augment.load_state_dict(state["augment"], step=self.step)
        self._ema_stats_step = self.step  # the checkpoint's G_ema statistics belong to its weights
        if state["rng_device"] == self.device.type:
            self.rng.set_state(state["rng"])
        else:  # CPU and CUDA generators have different states: continue with a fresh, still seeded, latent stream
            self.rng.manual_seed(self.seed * 1_000_003 + self.step)
            log.warning(
                f"checkpoint was written on {state['rng_device']}, this run is on {self.device.type}: training "
                "continues with a new latent stream, so it is not bit-identical to an uninterrupted run"
            )

    def _load_optimizer(self, name: str, opt: torch.optim.Optimizer, saved: dict[str, Any]) -> list[str]:
        """Load Adam's state with this trainer's settings in place of the saved ones; returns what differed."""
        current = {"lr": self.lr[name] * self.lr_scale, **self.adam}
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
        opt.load_state_dict({**saved, "param_groups": groups})
        return sorted(set(changed))
