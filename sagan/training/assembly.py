"""A run's parts, built from its config: the training data, the trainer (networks, optimizers, G_ema), the batch
stream, the evaluator, and rank 0's writers (sample grids and attention figures, the W&B / metrics.jsonl logger,
the progress line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sagan.checkpoint import remove_partial
from sagan.data.batch_stream import BatchStream, default_num_workers
from sagan.data.datasets import build_dataset, with_fraction
from sagan.evaluation.in_training import TrainingEvaluator
from sagan.models import build_models
from sagan.training.diffaugment import DiffAugment
from sagan.training.run_logger import RunLogger
from sagan.training.step import Trainer
from sagan.training.sync_batchnorm import use_sync_batchnorm
from sagan.utils.atomic_files import atomic_write
from sagan.utils.processes import World, main_rank_first, rank_seed, resolve_perf, seed_everything
from sagan.utils.progress import Progress
from sagan.visualization.figures import DEFAULT_QUERIES, to_pixels
from sagan.visualization.snapshots import Snapshots
from sagan.utils.errors import UserError


@dataclass
class Parts:
    dataset: Any
    num_classes: int
    trainer: Trainer
    stream: BatchStream
    evaluator: TrainingEvaluator | None
    perf: dict[str, Any]


def assemble(cfg: DictConfig, world: World, device: torch.device) -> Parts:
    """Everything that trains, in the same state on every rank (the same initial weights, then per-rank seeds for
    anything random beyond the latents and the data)."""
    seed_everything(cfg.train.seed)
    # GAN weights and activations drift into denormal floats, which make CPU steps several times slower.
    torch.set_flush_denormal(True)
    perf = resolve_perf(cfg.perf, device)
    dataset = training_data(cfg, world)
    if cfg.model.conditional and dataset.num_classes == 0:
        raise UserError(
            f"model.conditional=true needs labelled data, but data '{cfg.data.name}' has no classes: set model.conditional=false"
        )
    num_classes = dataset.num_classes if cfg.model.conditional else 0
    trainer = build_trainer(cfg, num_classes, world, device, perf)
    seed_everything(rank_seed(cfg.train.seed, world.rank))
    num_workers = default_num_workers() if cfg.data.num_workers is None else cfg.data.num_workers
    stream = BatchStream(
        dataset, batch_size=cfg.train.batch_size // world.size, seed=cfg.train.seed, device=device, hflip=cfg.data.hflip,
        rank=world.rank, world_size=world.size, in_memory=cfg.data.in_memory, num_workers=num_workers,
    )  # fmt: skip
    evaluator = None
    if cfg.eval.every > 0:
        evaluator = TrainingEvaluator(
            dataset, resolution=cfg.model.resolution, num_samples=cfg.eval.num_samples, ref_images=cfg.eval.ref_images,
            seed=cfg.train.seed, isc=cfg.eval.isc, weights=cfg.metrics.inception_weights,
            cache_dir=cfg.metrics.cache_dir, batch_size=cfg.metrics.batch_size, num_workers=num_workers, device=device,
            world=world,
        )  # fmt: skip
    return Parts(dataset, num_classes, trainer, stream, evaluator, perf)


def training_data(cfg: DictConfig, world: World) -> Any:
    """The training set. Rank 0 builds it first (and downloads it, if asked), the others once it is there."""
    with main_rank_first(world):
        dataset = build_dataset(
            cfg.data.name, root=cfg.data.root, resolution=cfg.model.resolution, download=cfg.data.download and world.main,
            labels=cfg.model.conditional, split=cfg.data.split, skip_bad=cfg.data.skip_bad, size=cfg.data.size,
            seed=cfg.train.seed,
        )  # fmt: skip
    return with_fraction(dataset, cfg.data.fraction)


def build_trainer(cfg: DictConfig, num_classes: int, world: World, device: torch.device, perf: dict[str, Any]) -> Trainer:
    G, D = build_models(cfg.model, num_classes)
    freeze_d_blocks(D, cfg.train.freeze_d)  # before the trainer: its optimizer and DDP see which parameters train
    if cfg.dist.sync_bn:
        use_sync_batchnorm(G)
    # The batch each of G's BatchNorms normalises over: G_ema's standing statistics use batches of that size.
    bn_batch = cfg.train.batch_size // cfg.train.grad_accum // (1 if cfg.dist.sync_bn else world.size)
    o = cfg.optim
    augment = None
    if cfg.data.augment == "diffaugment":
        augment = DiffAugment(cfg.data.augment_policy, device=device, seed=cfg.train.seed, world=world)
    return Trainer(
        G, D, loss=cfg.loss.name, lr_g=o.lr_g, lr_d=o.lr_d, betas=(o.beta1, o.beta2), eps=o.eps, n_dis=o.n_dis,
        d_calls=o.d_calls, d_sn_in_g_step=o.d_sn_in_g_step, g_bn_stats_in_d_step=o.g_bn_stats_in_d_step,
        ema_decay=o.ema_decay, ema_start=o.ema_start, ema_bn=o.ema_bn, ema_bn_batches=o.ema_bn_batches,
        ema_bn_batch_size=bn_batch, device=device, seed=cfg.train.seed, world=world, grad_accum=cfg.train.grad_accum,
        augment=augment, **perf,
    )  # fmt: skip


def freeze_d_blocks(D: torch.nn.Module, k: int) -> list[str]:
    """FreezeD: D's first k residual blocks, and the attention layers among them, keep their weights (their
    spectral-norm u and v still follow those weights). Returns the names of the frozen entries of D.blocks."""
    names = list(D.blocks)
    blocks = [n for n in names if n.startswith("block")]
    if not 0 <= k <= len(blocks):
        raise UserError(f"train.freeze_d={k}, but this D has {len(blocks)} blocks: choose 0 to {len(blocks)}")
    frozen = names if k == len(blocks) else names[: names.index(blocks[k])]
    for name in frozen:
        D.blocks[name].requires_grad_(False)
    return frozen


def open_outputs(
    cfg: DictConfig, run_dir: Path, parts: Parts, *, device: torch.device, continues_at: int | None
) -> tuple[Snapshots, RunLogger, Progress]:
    """Rank 0's writers, in a run directory cleaned of what a killed run left half-written: sample grids and
    attention figures on fixed inputs, the W&B / metrics.jsonl logger (its rows after `continues_at`, the step the run
    continues from, dropped: they are logged again; all of them for a new run, None), and the progress line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_partial(run_dir / "checkpoints")
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    dataset, num_classes = parts.dataset, parts.num_classes
    # Fixed inputs, from their own seed, so every sample grid and attention figure of a run shows the same z.
    fixed = torch.Generator().manual_seed(cfg.train.seed + 1)
    n = cfg.logger.num_samples
    real = [dataset[i] for i in range(min(cfg.logger.attn_images, len(dataset)))]
    name = cfg.experiment or cfg.model.name
    snapshots = Snapshots(
        run_dir, z=torch.randn(n, cfg.model.z_dim, generator=fixed).to(device),
        y=(torch.arange(n) % num_classes).to(device) if num_classes else None,
        real=torch.stack([image for image, _ in real]).to(device),
        y_real=torch.tensor([label for _, label in real], device=device) if num_classes else None,
        queries=to_pixels(cfg.logger.attn_queries or DEFAULT_QUERIES, cfg.model.resolution),
        attn_images=cfg.logger.attn_images, score=dataset.sample_score, title=f"{name} ({run_dir.name})",
    )  # fmt: skip
    logger = RunLogger(
        run_dir, mode=cfg.logger.mode, project=cfg.logger.project, entity=cfg.logger.entity,
        name=cfg.logger.name or f"{name}-{run_dir.name}", tags=list(cfg.logger.tags),
        config=OmegaConf.to_container(cfg, resolve=True),
    )  # fmt: skip
    logger.drop_after(-1 if continues_at is None else continues_at)
    progress = Progress(
        what="step", start=parts.trainer.step, total=cfg.train.steps, images_per_item=cfg.train.batch_size * cfg.optim.n_dis
    )
    return snapshots, logger, progress
