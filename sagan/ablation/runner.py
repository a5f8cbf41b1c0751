"""What `sagan-ablate` does: run a study's variants and seeds as one Hydra multirun of sagan-train (so a launcher
plugin, e.g. SLURM's, runs them unchanged), evaluate every finished run with the scale's one protocol (and, on the
demo data, its mirror consistency), and write the report (sagan.ablation.report)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sagan.ablation.report import read_json, read_run, write_report
from sagan.ablation.studies import SCALES, protocol, variants
from sagan.checkpoint import CheckpointError, load_checkpoint, networks_from_checkpoint
from sagan.data.demo import mirror_consistency
from sagan.evaluation.evaluate import evaluate
from sagan.evaluation.request import FidArgs
from sagan.evaluation.sampling import draw
from sagan.utils.atomic_files import atomic_write
from sagan.utils.processes import resolve_device
from sagan.utils.errors import UserError


def run_dir(out: Path, study: str, variant: str, seed: int) -> Path:
    return out / f"{study}-{variant}_s{seed}"


# The config sections that decide what a run trains: a finished run trained with others is reported.
COMPARED = ("model", "data", "loss", "optim")


def checkpoint_state(directory: Path) -> tuple[int, dict | None]:
    """The step of the run's last checkpoint and the config it was trained with; (0, None) before its first."""
    last = directory / "checkpoints" / "last.pt"
    try:
        state = load_checkpoint(last) if last.exists() else None
    except CheckpointError:
        state = None
    return (state["trainer"]["step"], state["config"]) if state else (0, None)


def checkpoint_step(directory: Path) -> int:
    return checkpoint_state(directory)[0]


def requested_config(overrides: list[str]) -> dict:
    """The config these sagan-train overrides compose (Hydra's own settings left out)."""
    with initialize_config_module(config_module="sagan.conf", version_base="1.3"):
        keep = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
        return OmegaConf.to_container(compose(config_name="config", overrides=keep), resolve=True)


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += differences(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(f"{prefix}{key}")
    return keys


def ablate(args: Any, train_overrides: list[str]) -> list[Path]:
    """Run, evaluate and report the study `args` (sagan.ablate.AblateArgs) names; returns the report's files."""
    names = variants(args.study, args.scale)
    if args.variants is not None:
        unknown = sorted(set(args.variants) - set(names))
        if unknown:
            raise UserError(f"{args.study} at scale {args.scale} has no variant {unknown}: choose among {names}")
        names = [v for v in names if v in args.variants]
    scale = SCALES[args.scale]
    out = Path(args.out or f"ablations/{args.study}-{args.scale}").expanduser().resolve()
    runs = [(v, s) for v in names for s in range(args.seeds)]
    if args.seeds < 1:
        raise UserError(f"seeds must be >= 1, got {args.seeds}")
    if args.mirror_n < 2:
        raise UserError(f"mirror_n must be >= 2 (the score compares images of a batch), got {args.mirror_n}")

    asked = {v: requested_config([*scale.overrides, f"+ablation={args.study}-{v}", *train_overrides]) for v in names}
    warned: set[tuple[str, int]] = set()

    def finished() -> dict[tuple[str, int], int]:
        """The runs whose last checkpoint is at the steps asked for now, and that step."""
        done = {}
        for v, s in runs:
            step, config = checkpoint_state(run_dir(out, args.study, v, s))
            if config is None or step < asked[v]["train"]["steps"]:
                continue
            done[(v, s)] = step
            changed = differences({k: config.get(k, {}) for k in COMPARED}, {k: asked[v][k] for k in COMPARED})
            if changed and (v, s) not in warned:
                warned.add((v, s))
                print(f"warning: {run_dir(out, args.study, v, s).name} was trained with other settings "
                      f"({', '.join(changed)}): kept as it is; delete its directory to train it again")  # fmt: skip
        return done

    done = finished()
    print(
        f"{args.study} at scale {args.scale}: {len(names)} variants x {args.seeds} seeds = {len(runs)} runs, "
        f"{len(done)} finished; in {out}"
    )
    failed = False
    if len(done) < len(runs) and not args.rebuild:
        weights = [f"metrics.{k}={v}" for k, v in OmegaConf.to_container(args.metrics).items() if v is not None]
        # One sweep over the variants and seeds that have unfinished runs (a finished run in it returns at once).
        todo_variants = [v for v in names if any((v, s) not in done for s in range(args.seeds))]
        todo_seeds = [s for s in range(args.seeds) if any((v, s) not in done for v in names)]
        command = [
            sys.executable, "-m", "sagan.train", "--multirun", *scale.overrides,
            f"+ablation={','.join(f'{args.study}-{v}' for v in todo_variants)}",
            f"train.seed={','.join(str(s) for s in todo_seeds)}",
            "train.resume=auto", f"hydra.sweep.dir={out}",
            "hydra.sweep.subdir=${hydra.runtime.choices.ablation}_s${train.seed}",
            *weights, *train_overrides,
        ]  # fmt: skip
        print("running:", " ".join(command[2:]), flush=True)
        failed = subprocess.run(command).returncode != 0
        done = finished()
        print(f"{len(done)} of {len(runs)} runs finished")

    n, ref, ref_n = protocol(args.study, args.scale)
    n, ref = args.n or n, args.ref or ref
    ref_n = args.ref_n if args.ref_n is not None else (ref_n if args.ref is None else None)  # another ref: all
    results = []
    for i, (v, s) in enumerate(runs):
        directory = run_dir(out, args.study, v, s)
        if (v, s) in done:
            label = f"{len(results) + 1}/{len(runs)}"
            evaluate_run(directory, args, n=n, ref=ref, ref_n=ref_n, step=done[(v, s)], label=label)
        step = done.get((v, s), checkpoint_step(directory))
        results.append(read_run(v, s, directory, scale.curve, step, (v, s) in done))
    out.mkdir(parents=True, exist_ok=True)
    about = [
        f"Command: `sagan-ablate study={args.study} scale={args.scale} seeds={args.seeds}"
        + (f" variants=[{','.join(args.variants)}]" if args.variants is not None else "")
        + "".join(f" {a}" for a in train_overrides) + "`",
        f"Scale: {scale.about}. Training overrides: `{' '.join(scale.overrides)}`.",
        f"Evaluation of each run's last checkpoint (G_ema): FID and KID of {n} samples (seed 0) against {ref}"
        + (f" ({ref_n} images)" if ref_n else "") + "; mean ± sample std over the seeds that finished.",
        f"Plot: `{scale.curve}` against training steps (results.png), where the runs logged it.",
    ]  # fmt: skip
    if any(r.mirror is not None for r in results):
        about.insert(-1, f"Mirror consistency (runs on the demo data): of {args.mirror_n} samples (seed 0) of the same G_ema.")
    paths = write_report(out, results, title=f"sagan-ablate {args.study} at scale {args.scale}", about=about, curve_key=scale.curve)
    for p in paths:
        print(p)
    if failed:
        raise ChildProcessError(f"some runs of the study failed: see their logs under {out}; run the command again to continue")
    return paths


def evaluate_run(
    directory: Path, args: Any, *, n: int, ref: str, ref_n: int | None, step: int, label: str
) -> None:
    """FID and KID of the run's last checkpoint into eval.json (sagan-fid's metrics.json beside it), and for a run on
    the demo data its mirror consistency; each unless eval.json holds it for this protocol and this checkpoint file."""
    out, ckpt = directory / "eval.json", directory / "checkpoints" / "last.pt"
    metrics = OmegaConf.to_container(args.metrics)
    stat = ckpt.stat()
    checkpoint = {"step": step, "ckpt": [stat.st_size, stat.st_mtime_ns]}
    asked = {"n": n, "ref": ref, "ref_n": ref_n, "metrics": metrics, **checkpoint}
    record = read_json(out)
    written = dict(record)
    if record.get("asked") != asked:
        print(f"evaluating {label}: {directory.name}", flush=True)
        fid_args = OmegaConf.merge(
            OmegaConf.structured(FidArgs),
            {"ckpt": str(ckpt), "ref": ref, "n": n, "ref_n": ref_n, "kid": True, "isc": False, "seed": 0,
             "device": args.eval_device, "out": str(directory / "metrics.json"), "metrics": metrics},
        )  # fmt: skip
        started = time.monotonic()
        result = evaluate(fid_args)
        record = {**result, "asked": asked, "eval_s": time.monotonic() - started}
    mirror_asked = {"n": args.mirror_n, "seed": 0, **checkpoint}
    if record.get("mirror", {}).get("asked") != mirror_asked:
        state = load_checkpoint(ckpt)
        value = None  # the score means nothing off the demo data
        if state["config"]["data"]["name"] == "demo":
            G, _ = networks_from_checkpoint(state, ema=True, device=resolve_device(args.eval_device))
            value = mirror_consistency(draw(G, args.mirror_n, seed=0)[0])
        record["mirror"] = {"asked": mirror_asked, "value": value}
    if record != written:
        atomic_write(out, (json.dumps(record, indent=2) + "\n").encode())
