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

from sagan.checkpoint import check_same_model, find_latest, load_checkpoint, remove_partial, save_checkpoint
from sagan.cli import run_cli
from sagan.config import check_config
from sagan.data import BatchStream, MirrorShapes, build_dataset, mirror_consistency
from sagan.dist import resolve_device, resolve_perf, rng_state, seed_everything, set_rng_state
from sagan.logging import RunLogger
from sagan.metrics import ImagesOnly, cache_name, classifier_missing, compute_metrics, dataset_identity, default_cache_root
from sagan.models import attention_gammas, build_models, spectral_sigmas
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
    """Train (or continue training) per `cfg`, writing everything under `run_dir`. Returns the final losses."""
    check_config(cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.train.seed)
    # GAN weights and activations drift into denormal floats, which make CPU steps several times slower.
    torch.set_flush_denormal(True)
    perf = resolve_perf(cfg.perf, device)

    dataset = build_dataset(
        cfg.data.name,
        root=cfg.data.root,
        resolution=cfg.model.resolution,
        download=cfg.data.download,
        labels=cfg.model.conditional,
        split=cfg.data.split,
        skip_bad=cfg.data.skip_bad,
        size=cfg.data.size,
        seed=cfg.train.seed,
    )
    if cfg.model.conditional and dataset.num_classes == 0:
        raise ValueError(f"model.conditional=true needs labelled data, but data '{cfg.data.name}' has no classes: set model.conditional=false")
    num_classes = dataset.num_classes if cfg.model.conditional else 0
    G, D = build_models(cfg.model, num_classes)
    trainer = Trainer(
        G,
        D,
        loss=cfg.loss.name,
        lr_g=cfg.optim.lr_g,
        lr_d=cfg.optim.lr_d,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        n_dis=cfg.optim.n_dis,
        ema_decay=cfg.optim.ema_decay,
        ema_start=cfg.optim.ema_start,
        device=device,
        seed=cfg.train.seed,
        **perf,
    )
    stream = BatchStream(
        dataset,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        device=device,
        hflip=cfg.data.hflip,
        in_memory=cfg.data.in_memory,
        num_workers=cfg.data.num_workers,
    )
    # Fixed inputs, from their own seed, so every sample grid and attention figure of a run shows the same z.
    fixed = torch.Generator().manual_seed(cfg.train.seed + 1)
    n = cfg.logger.num_samples
    z_fixed = torch.randn(n, cfg.model.z_dim, generator=fixed).to(device)
    y_fixed = (torch.arange(n) % num_classes).to(device) if num_classes else None
    real = [dataset[i] for i in range(min(cfg.logger.attn_images, len(dataset)))]
    queries = to_pixels(cfg.logger.attn_queries or DEFAULT_QUERIES, cfg.model.resolution)

    ckpt_dir = run_dir / "checkpoints"
    model = model_record(cfg, num_classes)
    path = resume_path(cfg.train.resume, ckpt_dir)

    def restore(path: Path) -> dict[str, Any]:
        state = load_checkpoint(path)
        check_same_model(state["model"], model, path)
        trainer.load_state_dict(state["trainer"])
        stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        return state

    best_fid = math.inf  # of the evaluations so far; best.pt holds that model
    if path is not None:
        best_fid = restore(path)["best_fid"]
        log.info(f"resumed from {path} at step {trainer.step}")
    elif cfg.train.resume == "auto":
        log.info(f"no checkpoint in {ckpt_dir}: starting from scratch")
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_partial(ckpt_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    log.info(
        f"run directory: {run_dir.resolve()} | device {device} | G {num_params(G)/1e6:.2f}M D {num_params(D)/1e6:.2f}M "
        f"parameters | {', '.join(f'{k} {v}' for k, v in perf.items())}"
    )

    snapshots = Snapshots(
        run_dir,
        z=z_fixed,
        y=y_fixed,
        real=torch.stack([image for image, _ in real]).to(device),
        y_real=torch.tensor([label for _, label in real], device=device) if num_classes else None,
        queries=queries,
        attn_images=cfg.logger.attn_images,
        score=mirror_consistency if isinstance(dataset, MirrorShapes) else None,
    )
    logger = RunLogger(
        run_dir,
        mode=cfg.logger.mode,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        name=cfg.logger.name or f"{cfg.experiment or cfg.model.name}-{run_dir.name}",
        tags=list(cfg.logger.tags),
        config=config,
    )

    def images(step: int) -> dict[str, float]:
        paths, scores = snapshots.write(step, trainer.G, trainer.G_ema, trainer.D)
        logger.log_images(step, paths)
        if scores:
            logger.log_scalars(step, scores)
            log.info(f"step {step}: {' '.join(f'{k} {v:.3f}' for k, v in scores.items())}")
        return scores

    evaluate = make_evaluator(cfg, trainer, dataset, device) if cfg.eval.every > 0 else None

    def checkpoint(best: bool = False) -> None:
        state = {
            "trainer": trainer.state_dict(),
            "data": stream.state_dict(),
            "rng": rng_state(),
            "model": model,
            "config": config,
            "best_fid": best_fid,
        }
        save_checkpoint(state, ckpt_dir, trainer.step, cfg.train.keep_last, best=best)

    steps, every = cfg.train.steps, cfg.logger.log_every
    progress = Progress(start=trainer.step, total=steps, images_per_step=cfg.train.batch_size * cfg.optim.n_dis)
    sums: dict[str, torch.Tensor] = {}
    count, last, warned, rollbacks = 0, {}, set(), 0
    scores = images(0) if trainer.step == 0 else {}  # what the untrained generator draws
    with StopRequest() as stop:
        while trainer.step < steps:
            losses = trainer.train_step(stream)
            for k, v in losses.items():  # accumulated on the device: no host sync per step
                sums[k] = sums.get(k, 0) + v
            count += 1
            step = trainer.step
            log_due = step % every == 0 or step == steps
            ckpt_due = step % cfg.train.ckpt_every == 0 or step == steps or stop.signal is not None
            # NaN/Inf are checked when the host reads from the device anyway, and always before a checkpoint.
            problem = trainer.nonfinite() if log_due or ckpt_due else None
            if problem is not None:
                good = find_latest(ckpt_dir)
                if rollbacks >= cfg.train.nan_rollbacks or good is None:
                    raise Diverged(
                        f"{problem}, seen at step {step}: stopped without writing a checkpoint; the last good one is "
                        f"{good or 'none'}. Lower optim.lr_g / optim.lr_d, or set train.nan_rollbacks=N to roll back"
                    )
                rollbacks += 1
                best_fid = restore(good)["best_fid"]
                trainer.scale_lr(cfg.train.nan_lr_factor)
                sums, count = {}, 0
                log.warning(
                    f"{problem}: rolled back to {good} (step {trainer.step}), learning rates x{cfg.train.nan_lr_factor} "
                    f"(rollback {rollbacks} of {cfg.train.nan_rollbacks})"
                )
                continue
            if log_due:
                last = {k: (v / count).item() for k, v in sums.items()}
                sums, count = {}, 0
                images_per_s = progress.update(step, last)
                scalars = training_scalars(trainer)
                losses_out = {f"loss/{k.removesuffix('_loss')}": v for k, v in last.items()}
                logger.log_scalars(step, {**losses_out, "speed/images_per_s": images_per_s, **scalars})
                warned |= warn_dead_attention(scalars, step, cfg.logger.gamma_warn_after, warned)
            if step % cfg.logger.image_every == 0 or step == steps:
                scores = images(step)
            improved = False
            if evaluate is not None and (step % cfg.eval.every == 0 or step == steps):
                metrics = evaluate()
                logger.log_scalars(step, {f"metrics/{k}": v for k, v in metrics.items()})
                log.info(f"step {step}: {' '.join(f'{k} {v:.3f}' for k, v in metrics.items())} ({cfg.eval.num_samples} samples)")
                improved = metrics["fid"] < best_fid
                best_fid = min(best_fid, metrics["fid"])
            if ckpt_due or improved:
                checkpoint(best=improved)
            if stop.signal is not None:
                log.warning(
                    f"stopped by {stop.signal} at step {step} after writing {ckpt_dir / 'last.pt'}: resume with the "
                    f"same command plus hydra.run.dir={run_dir} train.resume=auto"
                )
                break
    progress.close()
    logger.finish()
    return {"step": trainer.step, **last, **scores}


def make_evaluator(cfg: DictConfig, trainer: Trainer, dataset: Any, device: torch.device) -> Callable[[], dict[str, float]]:
    """FID (and IS) of G_ema against the training images, with the reference statistics cached across runs."""
    weights = cfg.metrics.inception_weights
    isc = cfg.eval.isc and not classifier_missing(weights)
    if cfg.eval.isc and not isc:
        log.warning(f"eval: IS skipped, the classifier in '{weights}' is all zeros (IS would always be 1.0); FID only")
    reference = ImagesOnly(dataset, limit=cfg.eval.ref_images, seed=cfg.train.seed)
    identity = (cfg.data.name, dataset_identity(cfg.data.root), cfg.data.split, cfg.data.size, cfg.train.seed)
    cache = cache_name(identity, cfg.model.resolution, cfg.eval.ref_images)

    def evaluate() -> dict[str, float]:
        return compute_metrics(
            trainer.G_ema,
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
    run_cli(_hydra_main, check_overrides=sys.argv[1:])


if __name__ == "__main__":
    main()
