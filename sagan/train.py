"""`sagan-train`: build everything from the config, run the training loop, write checkpoints and samples."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import TensorDataset

from sagan.checkpoint import check_same_model, find_latest, load_checkpoint, remove_partial, save_checkpoint
from sagan.cli import run_cli
from sagan.config import check_config
from sagan.data import BatchStream, MirrorShapes, build_dataset, default_num_workers, describe_dataset, mirror_consistency
from sagan.dist import (
    StopVote,
    World,
    barrier,
    broadcast_object,
    gather_to_main,
    init_distributed,
    leave_distributed,
    rank_seed,
    resolve_perf,
    rng_state,
    seed_everything,
    set_rng_state,
    world_from_env,
)
from sagan.logging import RunLogger
from sagan.metrics import (
    ImagesOnly,
    cache_name,
    classifier_missing,
    compute_metrics,
    dataset_identity,
    default_cache_root,
    generate_share,
)
from sagan.models import attention_gammas, build_models, spectral_sigmas
from sagan.models.layers import use_sync_batchnorm
from sagan.progress import Progress
from sagan.preemption import StopRequest
from sagan.trainer import Diverged, Trainer
from sagan.visualize import DEFAULT_QUERIES, Snapshots, to_pixels

log = logging.getLogger("sagan")


def model_record(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    """What defines the architecture, stored in checkpoints and compared on resume."""
    return {**OmegaConf.to_container(cfg.model, resolve=True), "num_classes": num_classes}


def resume_path(resume: str | None, ckpt_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        return find_latest(ckpt_dir)
    return Path(resume).expanduser()


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train (or continue training) per `cfg`, writing everything under `run_dir`. Returns the final losses.

    Under torchrun every process calls this; they train together and rank 0's `run_dir` is used.
    """
    check_config(cfg, world_from_env().size)
    world, device = init_distributed(cfg.device, cfg.dist.timeout_min)
    result = Run(cfg, broadcast_object(run_dir, world), world, device).loop()
    leave_distributed(world)  # the Run, with its DDP wrappers, is gone by now
    return result


class Run:
    """One training run: what `train` builds from the config, and what it does between steps.

    Every rank trains; rank 0 alone writes files (checkpoints, images, logs) while the others wait for it where
    they must (before reading a checkpoint it wrote). Evaluation generates its samples on all ranks.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, world: World, device: torch.device) -> None:
        self.cfg, self.run_dir, self.world = cfg, run_dir, world
        seed_everything(cfg.train.seed)  # the same initial weights on every rank
        # GAN weights and activations drift into denormal floats, which make CPU steps several times slower.
        torch.set_flush_denormal(True)
        perf = resolve_perf(cfg.perf, device)
        dataset = self.dataset()
        if cfg.model.conditional and dataset.num_classes == 0:
            raise ValueError(f"model.conditional=true needs labelled data, but data '{cfg.data.name}' has no classes: set model.conditional=false")
        num_classes = dataset.num_classes if cfg.model.conditional else 0
        G, D = build_models(cfg.model, num_classes)
        if cfg.dist.sync_bn:
            use_sync_batchnorm(G)
        # The batch each of G's BatchNorms normalises over: G_ema's standing statistics use batches of that size.
        bn_batch = cfg.train.batch_size // cfg.train.grad_accum // (1 if cfg.dist.sync_bn else world.size)
        self.trainer = Trainer(
            G,
            D,
            loss=cfg.loss.name,
            lr_g=cfg.optim.lr_g,
            lr_d=cfg.optim.lr_d,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
            n_dis=cfg.optim.n_dis,
            ema_decay=cfg.optim.ema_decay,
            ema_start=cfg.optim.ema_start,
            ema_bn=cfg.optim.ema_bn,
            ema_bn_batches=cfg.optim.ema_bn_batches,
            ema_bn_batch_size=bn_batch,
            device=device,
            seed=cfg.train.seed,
            world=world,
            grad_accum=cfg.train.grad_accum,
            **perf,
        )
        seed_everything(rank_seed(cfg.train.seed, world.rank))  # anything random beyond latents and data differs per rank
        self.stream = BatchStream(
            dataset,
            batch_size=cfg.train.batch_size // world.size,
            seed=cfg.train.seed,
            device=device,
            hflip=cfg.data.hflip,
            rank=world.rank,
            world_size=world.size,
            in_memory=cfg.data.in_memory,
            num_workers=default_num_workers() if cfg.data.num_workers is None else cfg.data.num_workers,
        )
        self.ckpt_dir = run_dir / "checkpoints"
        self.model = model_record(cfg, num_classes)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.best_fid = math.inf  # of the evaluations so far; best.pt holds that model
        self.rollbacks = 0  # NaN rollbacks so far (checkpointed: the bound holds across resumes)
        self.evaluate = make_evaluator(cfg, self.trainer, dataset, device, world) if cfg.eval.every > 0 else None

        path = broadcast_object(resume_path(cfg.train.resume, self.ckpt_dir), world)  # rank 0's choice for all
        if path is not None:
            self.restore(path)
            log.info(f"resumed from {path} at step {self.trainer.step}")
        elif cfg.train.resume == "auto":
            log.info(f"no checkpoint in {self.ckpt_dir}: starting from scratch")
        self.snapshots, self.logger = None, None
        if world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial(self.ckpt_dir)
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
            self.snapshots, self.logger = self.outputs(dataset, num_classes, device)
            # Rows that an earlier attempt logged past the checkpoint this run continues from (all of them, when it
            # starts afresh) are logged again by this run.
            self.logger.drop_after(self.trainer.step if path is not None else -1)
        log.info(
            f"run directory: {run_dir.resolve()} | {world.size} process(es), device {device} | G {num_params(G)/1e6:.2f}M "
            f"D {num_params(D)/1e6:.2f}M parameters | {', '.join(f'{k} {v}' for k, v in perf.items())}"
        )
        log.info(f"data: {describe_dataset(dataset, cfg.data.name)}, {cfg.model.resolution} px")

    def dataset(self) -> Any:
        """The training set. Rank 0 builds it first (and downloads it, if asked), the others once it is there."""
        cfg, main = self.cfg, self.world.main
        if not main:
            barrier(self.world)  # paired with rank 0's barrier below
        dataset = build_dataset(
            cfg.data.name,
            root=cfg.data.root,
            resolution=cfg.model.resolution,
            download=cfg.data.download and main,
            labels=cfg.model.conditional,
            split=cfg.data.split,
            skip_bad=cfg.data.skip_bad,
            size=cfg.data.size,
            seed=cfg.train.seed,
        )
        if main:
            barrier(self.world)
        return dataset

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
            score=mirror_consistency if isinstance(dataset, MirrorShapes) else None,
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
        check_same_model(state["model"], self.model, path)
        if "lr_scale" not in state["trainer"]:  # written before the factor was kept: the learning rate tells it
            state["trainer"]["lr_scale"] = state["trainer"]["opt_d"]["param_groups"][0]["lr"] / state["config"]["optim"]["lr_d"]
        self.trainer.load_state_dict(state["trainer"])
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])  # rank 0's
        if not self.world.main:
            seed_everything(rank_seed(self.cfg.train.seed + self.trainer.step, self.world.rank))
        self.best_fid = state["best_fid"]
        self.rollbacks = state.get("rollbacks", 0)

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

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log_scalars(step, scalars)

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

    def loop(self) -> dict[str, Any]:
        """Train to `train.steps`, logging, drawing, evaluating and checkpointing on the way. Returns the last losses."""
        cfg, trainer = self.cfg, self.trainer
        steps, every = cfg.train.steps, cfg.logger.log_every
        progress = Progress(start=trainer.step, total=steps, images_per_step=cfg.train.batch_size * cfg.optim.n_dis) if self.world.main else None
        sums: dict[str, torch.Tensor] = {}
        count, last, warned = 0, {}, set()
        scores = self.images(0) if trainer.step == 0 else {}  # what the untrained generator draws
        vote = StopVote(self.world)
        with StopRequest() as stop:
            while trainer.step < steps:
                losses = trainer.train_step(self.stream)
                for k, v in losses.items():  # accumulated on the device: no host sync per step
                    sums[k] = sums.get(k, 0) + v
                count += 1
                step = trainer.step
                stopping = vote.poll(stop.signal is not None)  # every rank stops at the same step
                log_due = step % every == 0 or step == steps
                ckpt_due = step % cfg.train.ckpt_every == 0 or step == steps or stopping
                # NaN/Inf are checked when the host reads from the device anyway, and always before a checkpoint.
                problem = trainer.nonfinite() if log_due or ckpt_due else None
                if problem is not None:
                    self.rollback(problem)
                    sums, count = {}, 0
                    continue
                if log_due:
                    last = {k: (v / count).item() for k, v in sums.items()}
                    sums, count = {}, 0
                    if progress is not None:
                        images_per_s = progress.update(step, last)
                        scalars = training_scalars(trainer)
                        losses_out = {f"loss/{k.removesuffix('_loss')}": v for k, v in last.items()}
                        self.log_scalars(step, {**losses_out, "speed/images_per_s": images_per_s, **scalars})
                        warned |= warn_dead_attention(scalars, step, cfg.logger.gamma_warn_after, warned)
                # When stopping, only the checkpoint: the launcher's grace period (torchrun: 30 s) may be short.
                if (step % cfg.logger.image_every == 0 or step == steps) and not stopping:
                    scores = self.images(step)
                improved = False
                if self.evaluate is not None and (step % cfg.eval.every == 0 or step == steps) and not stopping:
                    metrics = self.evaluate()
                    self.log_scalars(step, {f"metrics/{k}": v for k, v in metrics.items()})
                    log.info(f"step {step}: {' '.join(f'{k} {v:.3f}' for k, v in metrics.items())} ({cfg.eval.num_samples} samples)")
                    improved = metrics["fid"] < self.best_fid
                    self.best_fid = min(self.best_fid, metrics["fid"])
                if ckpt_due or improved:
                    self.checkpoint(best=improved)
                if stopping:
                    if self.world.main:
                        log.warning(
                            f"stopped by {stop.signal or 'a signal to another rank'} at step {step} after writing "
                            f"{self.ckpt_dir / 'last.pt'}: resume with the same command plus hydra.run.dir={self.run_dir} "
                            "train.resume=auto"
                        )
                    break
        vote.close()
        if progress is not None:
            progress.close()
            self.logger.finish()
        return {"step": trainer.step, **last, **scores}


def make_evaluator(
    cfg: DictConfig, trainer: Trainer, dataset: Any, device: torch.device, world: World
) -> Callable[[], dict[str, float]]:
    """FID (and IS) of G_ema against the training images, with the reference statistics cached across runs.

    Every rank generates its share of the samples; rank 0 runs the Inception network and shares the result.
    """
    weights = cfg.metrics.inception_weights
    isc = cfg.eval.isc and not classifier_missing(weights)
    if cfg.eval.isc and not isc:
        log.warning(f"eval: IS skipped, the classifier in '{weights}' is all zeros (IS would always be 1.0); FID only")
    reference = ImagesOnly(dataset, limit=cfg.eval.ref_images, seed=cfg.train.seed)
    identity = (cfg.data.name, dataset_identity(cfg.data.root), cfg.data.split, cfg.data.size, cfg.train.seed)
    cache = cache_name(identity, cfg.model.resolution, cfg.eval.ref_images)

    def evaluate() -> dict[str, float]:
        share = generate_share(
            trainer.ema_generator(),
            cfg.eval.num_samples,
            seed=cfg.train.seed,
            rank=world.rank,
            world_size=world.size,
            batch_size=cfg.metrics.batch_size,
        )
        images = gather_to_main(share, world)
        metrics = None
        if world.main:
            metrics = compute_metrics(
                ImagesOnly(TensorDataset(images[: cfg.eval.num_samples])),
                reference,
                num_samples=cfg.eval.num_samples,
                reference_cache=cache,
                isc=isc,
                weights=weights,
                cache_root=cfg.metrics.cache_dir or default_cache_root(),
                batch_size=cfg.metrics.batch_size,
                seed=cfg.train.seed,
                device=device,
            )
        return broadcast_object(metrics, world)

    return evaluate


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


@hydra.main(version_base="1.3", config_path="pkg://sagan.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli(lambda: train(cfg, Path(HydraConfig.get().runtime.output_dir)))


def main() -> None:
    overrides = sys.argv[1:]
    if world_from_env().rank > 0:
        # Under torchrun, rank 0 owns the run directory (train() hands its path to the others): the other ranks
        # write no Hydra directory or log file of their own, and show only warnings and errors.
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    run_cli(_hydra_main, check_overrides=overrides)


if __name__ == "__main__":
    main()
