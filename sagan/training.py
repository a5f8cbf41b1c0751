"""The training run: `train(cfg, run_dir)` builds everything from the config, then one loop trains, logs, draws,
evaluates and checkpoints (`training_loop`, readable on one screen). `sagan-train` (sagan/train.py) calls `train`.

Under torchrun every process runs this: they train together; rank 0 alone writes files (checkpoints, images, logs)
while the others wait for it where they must. Evaluation generates its samples on all ranks.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sagan.atomic_files import DiskFull, atomic_write
from sagan.batch_stream import BatchStream, default_num_workers
from sagan.checkpoint import (
    CheckpointError,
    check_same_model,
    find_latest,
    load_checkpoint,
    model_record,
    remove_partial,
    save_checkpoint,
)
from sagan.config import check_config
from sagan.datasets import build_dataset, describe_dataset, with_fraction
from sagan.demo_data import MirrorShapes, mirror_consistency
from sagan.diffaugment import DiffAugment
from sagan.dist import (
    StopVote,
    World,
    barrier,
    broadcast_object,
    init_distributed,
    leave_distributed,
    main_rank_first,
    rank_seed,
    resolve_perf,
    rng_state,
    seed_everything,
    set_rng_state,
    world_from_env,
)
from sagan.inception import Inception
from sagan.metrics import evaluate_generator, inception_score_allowed
from sagan.models import attention_gammas, build_models, spectral_sigmas
from sagan.preemption import StopRequest
from sagan.progress import Progress
from sagan.reference_stats import Reference, dataset_reference, default_cache_root
from sagan.run_lock import RunLock, RunLocked
from sagan.run_lock import acquire as acquire_run_dir
from sagan.run_logger import RunLogger
from sagan.sync_batchnorm import use_sync_batchnorm
from sagan.trainer import Diverged, Trainer
from sagan.snapshots import Snapshots
from sagan.visualize import DEFAULT_QUERIES, to_pixels

log = logging.getLogger("sagan")


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train (or continue training) per `cfg`, writing everything under `run_dir`. Returns the final losses (and the
    last sample scores). Under torchrun every process calls this, and rank 0's `run_dir` is used."""
    check_config(cfg, world_from_env().size)
    world, device = init_distributed(cfg.device, cfg.dist.timeout_min)
    run_dir = broadcast_object(run_dir, world)  # rank 0's
    lock = hold_run_dir(run_dir, world) if cfg.train.lock else None
    try:
        finished = broadcast_object(finished_step(cfg, run_dir) if world.main else None, world)
        if finished is not None:
            log.info(f"{run_dir} finished already (step {finished} of train.steps={cfg.train.steps}): nothing to do")
            result = {"step": finished}
        else:
            result = training_loop(cfg, run_dir, world, device)
    except DiskFull as full:
        latest = find_latest(run_dir / "checkpoints")
        then = f"free some space, then continue with the same command plus hydra.run.dir={run_dir} train.resume=auto"
        raise full.then(then + (f" (from {latest}, which is whole)" if latest else "")) from None
    finally:
        if lock is not None:
            lock.release()
    leave_distributed(world)  # the loop's Run, with its DDP wrappers, is gone by now
    return result


def hold_run_dir(run_dir: Path, world: World) -> RunLock | None:
    """Rank 0 locks the run directory for the run (sagan.run_lock); when it cannot, every rank stops with its error."""
    lock, problem = None, None
    if world.main:
        try:
            lock = acquire_run_dir(run_dir)
        except RunLocked as e:
            problem = str(e)
    problem = broadcast_object(problem, world)
    if problem is not None:
        raise RunLocked(problem)
    return lock


def training_loop(cfg: DictConfig, run_dir: Path, world: World, device: torch.device) -> dict[str, Any]:
    """n_dis D steps and one G step per step to `train.steps`; every so many steps: log, draw, evaluate, checkpoint."""
    run = Run(cfg, run_dir, world, device)
    trainer, steps = run.trainer, cfg.train.steps
    scores = run.images(0) if trainer.step == 0 else {}  # what the untrained generator draws
    losses, last = LossSums(), {}
    vote = StopVote(world)  # every rank stops at the same step, after the same checkpoint
    with StopRequest() as stop:
        while trainer.step < steps:
            losses.add(trainer.train_step(run.stream))
            step = trainer.step
            stopping = vote.poll(stop.signal is not None)
            log_due, ckpt_due = (
                due(step, cfg.logger.log_every, steps),
                due(step, cfg.train.ckpt_every, steps) or stopping,
            )
            # NaN/Inf are checked when the host reads from the device anyway, and always before a checkpoint.
            problem = trainer.nonfinite() if log_due or ckpt_due else None
            if problem is not None:
                run.rollback(problem)
                losses = LossSums()
                continue
            if log_due:
                last = losses.means()
                losses = LossSums()
                run.log_step(step, last)
            # When stopping, only the checkpoint: the launcher's grace period (torchrun: 30 s) may be short.
            if due(step, cfg.logger.image_every, steps) and not stopping:
                scores = run.images(step)
            improved = (
                run.evaluate(step)
                if run.evaluator is not None and due(step, cfg.eval.every, steps) and not stopping
                else False
            )
            if ckpt_due or improved:
                run.checkpoint(best=improved)
            if stopping:
                run.stopped(step, stop.signal)
                break
    vote.close()
    run.finish()
    return {"step": trainer.step, **last, **scores}


def finished_step(cfg: DictConfig, run_dir: Path) -> int | None:
    """With train.resume=auto, the step of the run directory's last checkpoint when it has all train.steps (a re-run
    sweep skips the runs that finished), else None."""
    if cfg.train.resume != "auto" or not (run_dir / "checkpoints" / "last.pt").exists():
        return None
    step = load_checkpoint(run_dir / "checkpoints" / "last.pt")["trainer"]["step"]
    return step if step >= cfg.train.steps else None


def due(step: int, every: int, last: int) -> bool:
    """Whether work done every `every` steps (and at the last step) is due at `step`."""
    return step % every == 0 or step == last


class LossSums:
    """Losses summed on the device between two logs (no host sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: (v / self.count).item() for k, v in self.sums.items()}


class Run:
    """What the loop works with, built from the config: the trainer, the data stream, the evaluator and rank 0's
    writers, and the state a checkpoint keeps besides the trainer's (best FID, rollbacks)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, world: World, device: torch.device) -> None:
        self.cfg, self.run_dir, self.world = cfg, run_dir, world
        seed_everything(cfg.train.seed)  # the same initial weights on every rank
        # GAN weights and activations drift into denormal floats, which make CPU steps several times slower.
        torch.set_flush_denormal(True)
        perf = resolve_perf(cfg.perf, device)
        dataset = training_data(cfg, world)
        if cfg.model.conditional and dataset.num_classes == 0:
            raise ValueError(
                f"model.conditional=true needs labelled data, but data '{cfg.data.name}' has no classes: set model.conditional=false"
            )
        num_classes = dataset.num_classes if cfg.model.conditional else 0
        self.trainer = build_trainer(cfg, num_classes, world, device, perf)
        seed_everything(
            rank_seed(cfg.train.seed, world.rank)
        )  # anything random beyond latents and data differs per rank
        num_workers = default_num_workers() if cfg.data.num_workers is None else cfg.data.num_workers
        self.stream = BatchStream(
            dataset, batch_size=cfg.train.batch_size // world.size, seed=cfg.train.seed, device=device, hflip=cfg.data.hflip,
            rank=world.rank, world_size=world.size, in_memory=cfg.data.in_memory, num_workers=num_workers,
        )  # fmt: skip
        self.ckpt_dir = run_dir / "checkpoints"
        self.model = model_record(cfg, num_classes)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.best_fid = math.inf  # of the evaluations so far; best.pt holds that model
        self.rollbacks = 0  # NaN rollbacks so far (checkpointed: the bound holds across resumes)
        self.train_s, self.clock = 0.0, time.monotonic()  # wall-clock of the run: before this process, and its start
        self.evaluator = (
            Evaluator(cfg, self.trainer, dataset, device, world, num_workers) if cfg.eval.every > 0 else None
        )

        path = broadcast_object(resume_path(cfg.train.resume, self.ckpt_dir), world)  # rank 0's choice for all
        if path is not None:
            self.restore(path)
            log.info(f"resumed from {path} at step {self.trainer.step}")
        elif cfg.train.init_from is not None:
            self.start_from(Path(cfg.train.init_from).expanduser())
        elif cfg.train.resume == "auto":
            log.info(f"no checkpoint in {self.ckpt_dir}: starting from scratch")
        self.snapshots, self.logger, self.progress = None, None, None
        if world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial(self.ckpt_dir)
            atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            self.snapshots, self.logger = self.outputs(dataset, num_classes, device)
            # Rows that an earlier attempt logged past the checkpoint this run continues from (all of them, when it
            # starts afresh) are logged again by this run.
            self.logger.drop_after(self.trainer.step if path is not None else -1)
            images_per_step = cfg.train.batch_size * cfg.optim.n_dis
            self.progress = Progress(
                what="step", start=self.trainer.step, total=cfg.train.steps, images_per_item=images_per_step
            )
        G, D = self.trainer.G, self.trainer.D
        log.info(
            f"run directory: {run_dir.resolve()} | {world.size} process(es), device {device} | G {num_params(G) / 1e6:.2f}M "
            f"D {num_params(D) / 1e6:.2f}M parameters | {', '.join(f'{k} {v}' for k, v in perf.items())}"
        )
        log.info(f"data: {describe_dataset(dataset, cfg.data.name)}, {cfg.model.resolution} px")
        self.warned: set[str] = set()  # attention layers already reported as never switched on

    def outputs(self, dataset: Any, num_classes: int, device: torch.device) -> tuple[Snapshots, RunLogger]:
        """Rank 0's writers: sample grids and attention figures on fixed inputs, and the W&B / metrics.jsonl logger."""
        cfg = self.cfg
        # Fixed inputs, from their own seed, so every sample grid and attention figure of a run shows the same z.
        fixed = torch.Generator().manual_seed(cfg.train.seed + 1)
        n = cfg.logger.num_samples
        real = [dataset[i] for i in range(min(cfg.logger.attn_images, len(dataset)))]
        snapshots = Snapshots(
            self.run_dir,
            z=torch.randn(n, cfg.model.z_dim, generator=fixed).to(device),
            y=(torch.arange(n) % num_classes).to(device) if num_classes else None,
            real=torch.stack([image for image, _ in real]).to(device),
            y_real=torch.tensor([label for _, label in real], device=device) if num_classes else None,
            queries=to_pixels(cfg.logger.attn_queries or DEFAULT_QUERIES, cfg.model.resolution),
            attn_images=cfg.logger.attn_images,
            score=mirror_consistency if isinstance(getattr(dataset, "dataset", dataset), MirrorShapes) else None,
            title=f"{cfg.experiment or cfg.model.name} ({self.run_dir.name})",
        )
        logger = RunLogger(
            self.run_dir,
            mode=cfg.logger.mode,
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            name=cfg.logger.name or f"{cfg.experiment or cfg.model.name}-{self.run_dir.name}",
            tags=list(cfg.logger.tags),
            config=self.config,
        )
        return snapshots, logger

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint (written by any number of ranks: the global batch and position are kept)."""
        state = load_checkpoint(path)
        if "imported" in state:
            raise CheckpointError(
                f"{path} is imported (sagan-import): it has no optimizer state or data position to resume; start a new "
                f"run from it with train.init_from={path}"
            )
        check_same_model(state["model"], self.model, path)
        if "lr_scale" not in state["trainer"]:  # written before the factor was kept: the learning rate tells it
            state["trainer"]["lr_scale"] = (
                state["trainer"]["opt_d"]["param_groups"][0]["lr"] / state["config"]["optim"]["lr_d"]
            )
        self.trainer.load_state_dict(state["trainer"])
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

    def log_step(self, step: int, losses: dict[str, float]) -> None:
        """Progress line, and losses, learning rates, gammas, sigmas and images/s to W&B and metrics.jsonl (rank 0)."""
        if self.progress is None:
            return
        images_per_s = self.progress.update(step, losses)
        scalars = training_scalars(self.trainer)
        named = {f"loss/{k.removesuffix('_loss')}": v for k, v in losses.items()}
        timing = {"speed/images_per_s": images_per_s, "time/train_s": self.elapsed()}
        self.logger.log_scalars(step, {**named, **timing, **scalars})
        self.warned |= warn_dead_attention(scalars, step, self.cfg.logger.gamma_warn_after, self.warned)

    def elapsed(self) -> float:
        """Seconds this run has spent so far, over all its resumes (up to each one's checkpoint)."""
        return self.train_s + time.monotonic() - self.clock

    def evaluate(self, step: int) -> bool:
        """FID (and IS) of G_ema now, logged; returns whether FID improved on the best so far."""
        metrics = self.evaluator()
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
        scale = self.trainer.lr_scale  # several rollbacks to the same checkpoint compound
        self.restore(good)
        self.rollbacks = rollbacks + 1
        self.trainer.set_lr_scale(scale * cfg.train.nan_lr_factor)
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


def training_data(cfg: DictConfig, world: World) -> Any:
    """The training set. Rank 0 builds it first (and downloads it, if asked), the others once it is there."""
    with main_rank_first(world):
        dataset = build_dataset(
            cfg.data.name,
            root=cfg.data.root,
            resolution=cfg.model.resolution,
            download=cfg.data.download and world.main,
            labels=cfg.model.conditional,
            split=cfg.data.split,
            skip_bad=cfg.data.skip_bad,
            size=cfg.data.size,
            seed=cfg.train.seed,
        )
    return with_fraction(dataset, cfg.data.fraction)


def build_trainer(
    cfg: DictConfig, num_classes: int, world: World, device: torch.device, perf: dict[str, Any]
) -> Trainer:
    G, D = build_models(cfg.model, num_classes)
    if cfg.dist.sync_bn:
        use_sync_batchnorm(G)
    # The batch each of G's BatchNorms normalises over: G_ema's standing statistics use batches of that size.
    bn_batch = cfg.train.batch_size // cfg.train.grad_accum // (1 if cfg.dist.sync_bn else world.size)
    return Trainer(
        G,
        D,
        loss=cfg.loss.name,
        lr_g=cfg.optim.lr_g,
        lr_d=cfg.optim.lr_d,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        n_dis=cfg.optim.n_dis,
        d_calls=cfg.optim.d_calls,
        d_sn_in_g_step=cfg.optim.d_sn_in_g_step,
        g_bn_stats_in_d_step=cfg.optim.g_bn_stats_in_d_step,
        ema_decay=cfg.optim.ema_decay,
        ema_start=cfg.optim.ema_start,
        ema_bn=cfg.optim.ema_bn,
        ema_bn_batches=cfg.optim.ema_bn_batches,
        ema_bn_batch_size=bn_batch,
        device=device,
        seed=cfg.train.seed,
        world=world,
        grad_accum=cfg.train.grad_accum,
        augment=DiffAugment(cfg.data.augment_policy, device=device, seed=cfg.train.seed, world=world)
        if cfg.data.augment == "diffaugment"
        else None,
        **perf,
    )


def resume_path(resume: str | None, ckpt_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        return find_latest(ckpt_dir)
    return Path(resume).expanduser()


class Evaluator:
    """FID (and IS) of G_ema's samples against the training images (`sagan-fid ref=train` evaluates the same way),
    with the reference statistics from the shared cache. The Inception network and the reference are prepared at the
    first evaluation; every rank generates and runs Inception on its part of the samples."""

    def __init__(
        self, cfg: DictConfig, trainer: Trainer, dataset: Any, device: torch.device, world: World, num_workers: int
    ) -> None:
        self.cfg, self.trainer, self.dataset, self.device, self.world, self.num_workers = (
            cfg,
            trainer,
            dataset,
            device,
            world,
            num_workers,
        )
        self.isc = inception_score_allowed(cfg.eval.isc, cfg.metrics.inception_weights)
        self.inception: Inception | None = None
        self.reference: Reference | None = None

    def __call__(self) -> dict[str, float]:
        cfg, world = self.cfg, self.world
        weights = cfg.metrics.inception_weights
        if self.inception is None:
            with main_rank_first(
                world
            ):  # rank 0 downloads the Inception weights (if it must) before the others read them
                self.inception = Inception(weights=weights, device=self.device, logits=self.isc)
            self.reference = dataset_reference(
                self.dataset, self.inception, description="train", resolution=cfg.model.resolution,
                limit=cfg.eval.ref_images, seed=cfg.train.seed, weights=weights,
                cache_root=cfg.metrics.cache_dir or default_cache_root(), world=world, batch_size=cfg.metrics.batch_size,
                num_workers=self.num_workers,
            )  # fmt: skip
        # A copy in the default memory format: G_ema trains channels_last (perf.channels_last), which rounds some
        # convolutions differently, and `sagan-fid` evaluates the checkpoint in the default format.
        G = copy.deepcopy(self.trainer.ema_generator()).to(memory_format=torch.contiguous_format)
        return evaluate_generator(
            G, self.reference, self.inception, n=cfg.eval.num_samples, seed=cfg.train.seed,
            batch_size=cfg.metrics.batch_size, world=world, fid=True, isc=self.isc,
        )  # fmt: skip


def training_scalars(trainer: Trainer) -> dict[str, float]:
    """Learning rates, every attention gamma and every spectral-norm sigma of G and D (one host sync for all)."""
    named: dict[str, torch.Tensor] = {}
    for net_name, net in (("G", trainer.G), ("D", trainer.D)):
        named |= {f"gamma/{net_name}/{k.removeprefix('blocks.')}": v for k, v in attention_gammas(net).items()}
        named |= {f"sigma/{net_name}/{k}": v for k, v in spectral_sigmas(net).items()}
    values = torch.stack(list(named.values())).tolist() if named else []
    lrs = {"lr/g": trainer.opt_g.param_groups[0]["lr"], "lr/d": trainer.opt_d.param_groups[0]["lr"]}
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


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
