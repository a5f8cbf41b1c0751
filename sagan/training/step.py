"""One GAN training step (n_dis D steps, one G step, the EMA update) and the state a checkpoint needs to continue it
exactly. The optimizers (sagan.training.optimizers), G_ema (sagan.training.ema) and the NaN watch
(sagan.training.divergence) are their own rooms; this one runs the networks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sagan.config import PRECISIONS
from sagan.data.images import to_float
from sagan.training.diffaugment import DiffAugment
from sagan.training.divergence import NonFiniteWatch
from sagan.training.ema import EmaGenerator
from sagan.training.losses import get_losses
from sagan.training.optimizers import Optimizers
from sagan.training.power_iteration import power_iteration_paused
from sagan.training.standing_stats import bn_statistics_paused
from sagan.utils.processes import SINGLE, World, broadcast_buffers
from sagan.utils.errors import UserError

log = logging.getLogger("sagan")


# The autocast dtype of each reduced precision (sagan.config.PRECISIONS); fp32 runs without autocast.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# What train_step returns, on the device: the losses (D's of its last step), D's mean logit on the real and on the
# fake images and the fraction of real ones it scores positive (2x it - 1 is StyleGAN2-ADA's overfitting heuristic
# r_t), each the mean over the step's D steps, and the gradient norms of D (mean over its steps) and G.
STEP_VALUES = ("d_loss", "g_loss", "d_real", "d_fake", "d_real_positive", "grad_norm_d", "grad_norm_g")


def grad_norm(net: nn.Module) -> torch.Tensor:
    """The L2 norm of all of a network's gradients, on the device."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(net.parameters()).device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class Trainer:
    """G, D, G_ema, both Adam optimizers and the latent RNG: everything one step touches and a checkpoint holds.

    Knows nothing about configs, files or logging; sagan.training.run drives it.
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
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")
        if grad_accum < 1:
            raise UserError(f"train.grad_accum must be >= 1, got {grad_accum}")
        if d_calls not in (1, 2):
            raise UserError(f"optim.d_calls must be 1 or 2, got {d_calls}")
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.G = G.to(self.device, memory_format=self.memory_format)
        self.D = D.to(self.device, memory_format=self.memory_format)
        self.d_trainable = [p for p in self.D.parameters() if p.requires_grad]  # all but frozen blocks (train.freeze_d)
        self.opt = Optimizers(
            self.G, self.D, lr_g=lr_g, lr_d=lr_d, betas=betas, eps=eps, fused=fused_adam,
            loss_scaling=precision == "fp16", device_type=self.device.type,
        )  # fmt: skip
        # bf16 or fp16 autocast for the G and D forwards (fp16 with loss scaling); weights, optimizer, spectral norm,
        # D's head and the losses stay fp32.
        self.autocast = dict(
            device_type=self.device.type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision in AUTOCAST_DTYPES
        )
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
        # After DDP gave every rank rank 0's weights.
        self.ema = EmaGenerator(
            self.G, decay=ema_decay, start=ema_start, bn=ema_bn, bn_batches=ema_bn_batches,
            bn_batch_size=ema_bn_batch_size, seed=seed,
        )  # fmt: skip
        self.G_ema = self.ema.G
        self.d_loss_fn, self.g_loss_fn = get_losses(loss)
        self.n_dis, self.grad_accum = n_dis, grad_accum
        # The step's mechanics (see OptimConfig): the official code's by default, StudioGAN's with 2, True, False.
        self.d_calls, self.d_sn_in_g_step, self.g_bn_stats_in_d_step = d_calls, d_sn_in_g_step, g_bn_stats_in_d_step
        # Latents and fake labels come from their own generator, saved in checkpoints, so resume is exact. Every rank
        # draws the latents of the whole global batch and takes its own slice: the run draws the same latents
        # whatever the number of ranks, so its checkpoints resume on any number of them.
        self.seed = seed
        self.rng = torch.Generator(self.device).manual_seed(seed)
        # DiffAugment of everything D sees (data.augment), or None; its random stream is checkpointed too.
        self.augment = augment
        self.step = 0  # G steps done
        self.watch = NonFiniteWatch(self.device)

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
        self.opt.d.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        outputs = torch.zeros(3, device=self.device)
        self.last_real, self.last_real_labels = real, y_real  # what monitoring shows D at a log step
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
            self.opt.backward("D", loss)
            total += loss.detach()
            outputs += torch.stack([real_logits.mean(), fake_logits.mean(), (real_logits > 0).float().mean()]).detach()
        self.d_outputs = outputs / self.grad_accum  # D's mean logit on real and fake, and the share of reals it passes
        self.opt.unscale("D")
        self.grad_norm_d = grad_norm(self.D)
        self.opt.step("D")
        return total

    def g_step(self, batch_size: int) -> torch.Tensor:
        """One G update through a frozen D, as the official code does it: D's parameters get no gradients (they still
        pass gradients on to G) and D's spectral norm uses its current u and v, without a power iteration (the
        official code builds this D call with update_collection=NO_OPS), so D's u moves once per D update.
        With `d_sn_in_g_step` D's power iteration runs here too, as in StudioGAN."""
        z, y = self.sample_latents(batch_size)
        self.opt.g.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for p in self.d_trainable:
            p.requires_grad_(False)
        try:
            with contextlib.nullcontext() if self.d_sn_in_g_step else power_iteration_paused(self.D):
                for z_m, y_m in self.micro_batches(z, y):
                    with torch.autocast(**self.autocast):
                        fake = self.G_train(z_m, y_m)
                        if self.augment is not None:  # differentiable: G's gradients pass through it
                            fake = self.augment(fake.to(torch.promote_types(fake.dtype, torch.float32)))  # >= fp32, as in the D step
                        logits = self.D_fast(fake, y_m)
                    loss = self.g_loss_fn(logits) / self.grad_accum
                    self.opt.backward("G", loss)
                    total += loss.detach()
        finally:
            for p in self.d_trainable:
                p.requires_grad_(True)
        self.opt.unscale("G")
        self.grad_norm_g = grad_norm(self.G)
        self.opt.step("G")
        return total

    def _g_bn_statistics(self) -> contextlib.AbstractContextManager:
        """Where the D step's G forward runs: G's BatchNorm running statistics updated, or (StudioGAN) left alone."""
        return contextlib.nullcontext() if self.g_bn_stats_in_d_step else bn_statistics_paused(self.G)

    def ema_generator(self) -> nn.Module:
        """G_ema as it is now, ready to sample, evaluate and save (see EmaGenerator.ready)."""
        return self.ema.ready(self.step)

    def train_step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """n_dis D steps on fresh real batches, one G step, one EMA update. STEP_VALUES stay on the device (no sync).

        `batches` yields this rank's share of each global batch; with several ranks the returned values are the means
        over all of them.

        Real labels are used only by a class-conditional model; an unconditional one ignores them.
        """
        self.G.train(), self.D.train()
        d_outputs, d_norms = torch.zeros(3, device=self.device), torch.zeros((), device=self.device)
        for _ in range(self.n_dis):
            images, labels = next(batches)
            d_loss = self.d_step(to_float(images), labels if self.G.num_classes else None)
            d_outputs, d_norms = d_outputs + self.d_outputs, d_norms + self.grad_norm_d
        g_loss = self.g_step(images.shape[0])
        self.step += 1
        # DDP sends rank 0's buffers (BN statistics, SN u and v) at the start of each forward; the forwards after that
        # updated them on each rank: send them again, so every rank ends the step with the same state.
        broadcast_buffers([self.G, self.D], self.world)
        self.ema.update(self.G, self.step)
        values = torch.cat([torch.stack([d_loss, g_loss]), d_outputs / self.n_dis, (d_norms / self.n_dis)[None], self.grad_norm_g[None]])
        if self.world.size > 1:  # the global batch's values, so every rank sees (and acts on) the same ones
            dist.all_reduce(values)
            values /= self.world.size
        self.watch.record(self.step, values[:2])
        return dict(zip(STEP_VALUES, values.unbind()))

    def nonfinite(self) -> str | None:
        """What went NaN/Inf since the last check (losses, or G/D parameters), or None. Syncs with the device."""
        return self.watch.check({"G": self.G, "D": self.D}, self.step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.ema_generator().state_dict(),
            **self.opt.state_dict(),
            "rng": self.rng.get_state(),
            "rng_device": self.device.type,
            "step": self.step,
            **({"augment": self.augment.state_dict()} if self.augment is not None else {}),
        }

    def load_weights(self, nets: dict[str, Any]) -> None:
        """G, D and G_ema from another run's state (fine-tuning): the weights and buffers only, at this trainer's step."""
        self.G.load_state_dict(nets["G"])
        self.D.load_state_dict(nets["D"])
        self.G_ema.load_state_dict(nets["G_ema"])

    def load_state_dict(self, state: dict[str, Any], *, written_lr_d: float | None = None) -> None:
        """Continue from `state`: weights, Adam's moments, the step and the latent stream from the checkpoint; the
        optimizer settings from this trainer's arguments (see Optimizers.load_state_dict)."""
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.step = state["step"]
        self.ema.load_state_dict(state["G_ema"], self.step)
        self.opt.load_state_dict(state, written_lr_d=written_lr_d)
        if self.augment is not None and "augment" in state:
            self.augment.load_state_dict(state["augment"], step=self.step)
        if state["rng_device"] == self.device.type:
            self.rng.set_state(state["rng"])
        else:  # CPU and CUDA generators have different states: continue with a fresh, still seeded, latent stream
            self.rng.manual_seed(self.seed * 1_000_003 + self.step)
            log.warning(
                f"checkpoint was written on {state['rng_device']}, this run is on {self.device.type}: training "
                "continues with a new latent stream, so it is not bit-identical to an uninterrupted run"
            )
