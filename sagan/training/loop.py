"""The training run: `train(cfg, run_dir)` takes the run directory's lock, then one loop trains and does what is due
after each step (`due_at`: log, draw, evaluate, checkpoint, stop), readable on one screen. `sagan-train`
(sagan/train.py) calls `train`.

Under torchrun every process runs this: they train together; rank 0 alone writes files (checkpoints, images, logs)
while the others wait for it where they must. Evaluation generates its samples and runs the Inception network on all
ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sagan.checkpoint import find_latest, load_checkpoint
from sagan.config import check_config
from sagan.evaluation.inception import Abandoned
from sagan.training.monitoring import LossSums
from sagan.training.preemption import StopRequest
from sagan.training.run import Run
from sagan.training.run_lock import RunLock, RunLocked
from sagan.training.run_lock import acquire as acquire_run_dir
from sagan.utils.atomic_files import DiskFull
from sagan.utils.processes import StopVote, World, broadcast_object, init_distributed, leave_distributed, world_from_env

log = logging.getLogger("sagan")


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train (or continue training) per `cfg`, writing everything under `run_dir`. Returns the final losses (and the
    last sample scores). Under torchrun every process calls this, and rank 0's `run_dir` is used."""
    check_config(cfg, world_from_env().size)
    world, device = init_distributed(cfg.device, cfg.dist.timeout_min)
    try:
        return train_in(cfg, broadcast_object(run_dir, world), world, device)  # rank 0's run directory
    finally:
        leave_distributed(world)  # on every exit, errors included: a group left to interpreter exit can abort it


def train_in(cfg: DictConfig, run_dir: Path, world: World, device: torch.device) -> dict[str, Any]:
    """`train` once the processes have joined: the run directory's lock held for the run, then the loop, or nothing
    when the run has finished already."""
    lock = hold_run_dir(run_dir, world) if cfg.train.lock else None
    try:
        finished = broadcast_object(finished_step(cfg, run_dir) if world.main else None, world)
        if finished is not None:
            log.info(f"{run_dir} finished already (step {finished} of train.steps={cfg.train.steps}): nothing to do")
            return {"step": finished}
        return training_loop(cfg, run_dir, world, device)
    except DiskFull as full:
        latest = find_latest(run_dir / "checkpoints")
        then = f"free some space, then continue with the same command plus hydra.run.dir={run_dir} train.resume=auto"
        raise full.then(then + (f" (from {latest}, which is whole)" if latest else "")) from None
    finally:
        if lock is not None:
            lock.release()


def hold_run_dir(run_dir: Path, world: World) -> RunLock | None:
    """Rank 0 locks the run directory for the run (sagan.training.run_lock); when it cannot, every rank stops with its error."""
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
    """n_dis D steps and one G step per step to `train.steps`; after each, what `due_at` says is due."""
    run = Run(cfg, run_dir, world, device)
    trainer = run.trainer
    scores = run.images(0) if trainer.step == 0 else {}  # what the untrained generator draws
    losses, last = LossSums(), {}
    vote = StopVote(world)  # every rank stops at the same step, after the same checkpoint
    with StopRequest() as stop:

        def stop_agreed() -> bool:  # asked on every rank, as often on each: between steps and evaluation batches
            return vote.poll(stop.signal is not None)

        while trainer.step < cfg.train.steps:
            losses.add(trainer.train_step(run.stream))
            step = trainer.step
            stopping = stop_agreed()
            due = due_at(step, cfg, stopping=stopping, evaluating=run.evaluator is not None)
            problem = trainer.nonfinite() if due.finite_check else None
            if problem is not None:
                run.rollback(problem)
                losses = LossSums()
                continue
            if due.log:
                last = losses.means()
                losses = LossSums()
                run.log_step(step, last)
            if due.images:
                scores = run.images(step)
            try:
                improved = run.evaluate(step, abandon=stop_agreed) if due.evaluate else False
            except Abandoned:  # a stop request during the evaluation (minutes at scale): its checkpoint now instead
                improved, stopping = False, True
            if due.checkpoint or improved or stopping:
                run.checkpoint(best=improved)
            if stopping:
                run.stopped(step, stop.signal)
                break
    vote.close()
    run.finish()
    return {"step": trainer.step, **last, **scores}


@dataclass(frozen=True)
class Due:
    """What is due after a step, decided here and nowhere else."""

    log: bool  # the progress line and the logged scalars (logger.log_every, and the last step)
    images: bool  # sample grids, attention figures and the explorer (logger.image_every)
    evaluate: bool  # FID (eval.every)
    checkpoint: bool  # train.ckpt_every, the last step, and a stop request
    # NaN/Inf: when the host reads from the device anyway (a log), always before a checkpoint, and before an evaluation
    # (a stop request during it turns it into a checkpoint; and the FID of NaN images means nothing)
    finite_check: bool


def due_at(step: int, cfg: DictConfig, *, stopping: bool, evaluating: bool) -> Due:
    """When stopping, only the checkpoint: the launcher's grace period (torchrun: 30 s) may be short. (A stop request
    that comes during an evaluation abandons it: `training_loop`.)"""
    last = cfg.train.steps

    def every(n: int) -> bool:
        return step % n == 0 or step == last

    log, checkpoint = every(cfg.logger.log_every), every(cfg.train.ckpt_every) or stopping
    evaluate = evaluating and every(cfg.eval.every) and not stopping
    return Due(
        log=log,
        images=every(cfg.logger.image_every) and not stopping,
        evaluate=evaluate,
        checkpoint=checkpoint,
        finite_check=log or checkpoint or evaluate,
    )


def finished_step(cfg: DictConfig, run_dir: Path) -> int | None:
    """With train.resume=auto, the step of the run directory's last checkpoint when it has all train.steps (a re-run
    sweep skips the runs that finished), else None."""
    if cfg.train.resume != "auto" or not (run_dir / "checkpoints" / "last.pt").exists():
        return None
    step = load_checkpoint(run_dir / "checkpoints" / "last.pt")["trainer"]["step"]
    return step if step >= cfg.train.steps else None


