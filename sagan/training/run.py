"""The run the loop works with: its parts (sagan.training.assembly), where it starts (a resume, another run's weights,
or nothing), and what it does at the loop's request (log, draw, evaluate, checkpoint, roll back, stop), with the state
a checkpoint keeps besides the trainer's (best FID, rollbacks, wall-clock). Rank 0 alone writes files; the other
ranks wait for it where they must."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sagan.checkpoint import CheckpointError, check_same_model, find_latest, load_checkpoint, model_record, save_checkpoint
from sagan.evaluation.inception import Abandoned
from sagan.training.assembly import assemble, open_outputs
from sagan.training.divergence import Diverged
from sagan.training.monitoring import LOGGED, num_params, training_scalars, warn_dead_attention
from sagan.utils.processes import World, barrier, broadcast_object, rank_seed, rng_state, seed_everything, set_rng_state

log = logging.getLogger("sagan")


class Run:
    def __init__(self, cfg: DictConfig, run_dir: Path, world: World, device: torch.device) -> None:
        self.cfg, self.run_dir, self.world = cfg, run_dir, world
        parts = assemble(cfg, world, device)
        self.trainer, self.stream, self.evaluator = parts.trainer, parts.stream, parts.evaluator
        self.ckpt_dir = run_dir / "checkpoints"
        self.model = model_record(cfg, parts.num_classes)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.best_fid = math.inf  # of the evaluations so far; best.pt holds that model
        self.rollbacks = 0  # NaN rollbacks so far (checkpointed: the bound holds across resumes)
        self.train_s, self.clock = 0.0, time.monotonic()  # wall-clock of the run: before this process, and its start
        resumed = self.begin()
        self.snapshots, self.logger, self.progress = None, None, None
        if world.main:
            self.snapshots, self.logger, self.progress = open_outputs(
                cfg, run_dir, parts, device=device, continues_at=self.trainer.step if resumed else None
            )
        G, D = self.trainer.G, self.trainer.D
        log.info(
            f"run directory: {run_dir.resolve()} | {world.size} process(es), device {device} | G {num_params(G) / 1e6:.2f}M "
            f"D {num_params(D) / 1e6:.2f}M parameters | {', '.join(f'{k} {v}' for k, v in parts.perf.items())}"
        )
        log.info(f"data: {parts.dataset.describe(cfg.data.name)}, {cfg.model.resolution} px")
        self.warned: set[str] = set()  # attention layers already reported as never switched on

    def begin(self) -> bool:
        """Where the run starts: its own newest checkpoint (train.resume), another run's weights (train.init_from),
        or nothing. Returns whether it resumed."""
        cfg = self.cfg
        path = broadcast_object(resume_path(cfg.train.resume, self.ckpt_dir), self.world)  # rank 0's choice for all
        if path is not None:
            self.restore(path)
            log.info(f"resumed from {path} at step {self.trainer.step}")
            return True
        if cfg.train.init_from is not None:
            self.start_from(Path(cfg.train.init_from).expanduser())
        elif cfg.train.resume == "auto":
            log.info(f"no checkpoint in {self.ckpt_dir}: starting from scratch")
        return False

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint (written by any number of ranks: the global batch and position are kept)."""
        state = load_checkpoint(path)
        if "imported" in state:
            raise CheckpointError(
                f"{path} is imported (sagan-import): it has no optimizer state or data position to resume; start a new "
                f"run from it with train.init_from={path}"
            )
        check_same_model(state["model"], self.model, path)
        self.trainer.load_state_dict(state["trainer"], written_lr_d=state["config"]["optim"]["lr_d"])
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])  # rank 0's
        if not self.world.main:
            seed_everything(rank_seed(self.cfg.train.seed + self.trainer.step, self.world.rank))
        self.best_fid = state["best_fid"]
        self.rollbacks = state.get("rollbacks", 0)
        self.train_s, self.clock = state.get("train_s", 0.0), time.monotonic()

    def start_from(self, path: Path) -> None:
        """A new run (step 0, fresh optimizers, this config's data) from the weights of another run's or an imported
        checkpoint. A resumed run continues from its own checkpoints instead (train.resume)."""
        state = load_checkpoint(path)
        check_same_model(state["model"], self.model, path)
        if "D" not in state["trainer"]:
            raise CheckpointError(
                f"train.init_from={path} holds no D (imported from a generator alone): import the run with its D file"
            )
        self.trainer.load_weights(state["trainer"])
        log.info(f"new run from the G, D and G_ema of {path} (its step {state['trainer']['step']})")

    def checkpoint(self, best: bool = False) -> None:
        """Rank 0 writes; every rank returns once the file is complete."""
        if self.world.main:
            state = {
                "trainer": self.trainer.state_dict(),
                "data": self.stream.state_dict(),
                "rng": rng_state(),
                "model": self.model,
                "config": self.config,
                "best_fid": self.best_fid,
                "rollbacks": self.rollbacks,
                "train_s": self.elapsed(),
            }
            save_checkpoint(state, self.ckpt_dir, self.trainer.step, self.cfg.train.keep_last, best=best)
        barrier(self.world)

    def images(self, step: int) -> dict[str, float]:
        """Sample grids and attention figures (rank 0; the others go on)."""
        if self.snapshots is None:
            return {}
        paths, scores = self.snapshots.write(step, self.trainer.G, self.trainer.ema_generator(), self.trainer.D)
        self.logger.log_images(step, paths)
        if scores:
            self.logger.log_scalars(step, scores)
            log.info(f"step {step}: {' '.join(f'{k} {v:.3f}' for k, v in scores.items())}")
        return scores

    def log_step(self, step: int, values: dict[str, float]) -> None:
        """Progress line, and the step's values (losses, D's outputs, gradient norms), learning rates, gammas, attention
        shares, sigmas and images/s to W&B and metrics.jsonl (rank 0)."""
        if self.progress is None:
            return
        images_per_s = self.progress.update(step, {k: values[k] for k in ("d_loss", "g_loss")})
        scalars = training_scalars(self.trainer, (self.snapshots.z, self.snapshots.y))
        named = {LOGGED[k]: v for k, v in values.items()}
        timing = {"speed/images_per_s": images_per_s, "time/train_s": self.elapsed()}
        self.logger.log_scalars(step, {**named, **timing, **scalars})
        self.warned |= warn_dead_attention(scalars, step, self.cfg.logger.gamma_warn_after, self.warned)

    def elapsed(self) -> float:
        """Seconds this run has spent so far, over all its resumes (up to each one's checkpoint)."""
        return self.train_s + time.monotonic() - self.clock

    def evaluate(self, step: int, *, abandon: Callable[[], bool]) -> bool:
        """FID (and IS) of G_ema now, logged; returns whether FID improved on the best so far. Gives up (Abandoned)
        between two batches when the agreed check `abandon` says so: nothing is logged or kept of it, as if it had not
        been due (a resumed run evaluates at its next eval.every step)."""
        try:
            metrics = self.evaluator(self.trainer.ema_generator(), abandon=abandon)
        except Abandoned as where:
            log.warning(f"step {step}: evaluation abandoned at {where} for the stop request: no FID for this step")
            raise
        if self.logger is not None:
            self.logger.log_scalars(step, {f"metrics/{k}": v for k, v in metrics.items()})
        log.info(
            f"step {step}: {' '.join(f'{k} {v:.3f}' for k, v in metrics.items())} ({self.cfg.eval.num_samples} samples)"
        )
        improved = metrics["fid"] < self.best_fid
        self.best_fid = min(self.best_fid, metrics["fid"])
        return improved

    def rollback(self, problem: str) -> None:
        """Back to the last good checkpoint with lower learning rates, or stop (Diverged) when that is not allowed."""
        cfg = self.cfg
        good = broadcast_object(find_latest(self.ckpt_dir), self.world)
        rollbacks = self.rollbacks
        if rollbacks >= cfg.train.nan_rollbacks or good is None:
            raise Diverged(
                f"{problem}, seen at step {self.trainer.step}: stopped without writing a checkpoint; the last good one "
                f"is {good or 'none'}. Lower optim.lr_g / optim.lr_d, or set train.nan_rollbacks=N to roll back"
            )
        scale = self.trainer.opt.scale  # several rollbacks to the same checkpoint compound
        self.restore(good)
        self.rollbacks = rollbacks + 1
        self.trainer.opt.set_scale(scale * cfg.train.nan_lr_factor)
        if self.logger is not None:
            self.logger.drop_after(self.trainer.step)
        log.warning(
            f"{problem}: rolled back to {good} (step {self.trainer.step}), learning rates x{cfg.train.nan_lr_factor} "
            f"(rollback {self.rollbacks} of {cfg.train.nan_rollbacks})"
        )

    def stopped(self, step: int, signal: str | None) -> None:
        if self.world.main:
            log.warning(
                f"stopped by {signal or 'a signal to another rank'} at step {step} after writing "
                f"{self.ckpt_dir / 'last.pt'}: resume with the same command plus hydra.run.dir={self.run_dir} "
                "train.resume=auto"
            )

    def finish(self) -> None:
        if self.world.main:
            self.progress.close()
            self.logger.finish()


def resume_path(resume: str | None, ckpt_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        return find_latest(ckpt_dir)
    return Path(resume).expanduser()
