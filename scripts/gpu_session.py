"""The prepared GPU session: what one lent GPU machine runs in at most 8 minutes, writing what comes back into --out.

    bash scripts/gpu_check.sh                    # on the GPU machine (docs/benchmarks.md, "GPU", says how to send it)
    bash scripts/gpu_check.sh --rehearse         # the same phases at tiny sizes, on this CPU (tests/test_gpu_session.py)

Three phases, each with its own time budget, so that one that fails or runs long leaves the others their time:

1. A real CIFAR-10 run of `experiment=cifar10_studiogan` (StudioGAN's recipe and network) that keeps G_ema at steps
   2,000, 4,000 and 6,000 (the steps of StudioGAN's published log; three fit what a session brings back), each as
   `G_ema_step<N>.pt.part<k>` files: one checkpoint's bytes cut below the 16 MiB a returned file may have. At the end
   of its budget the run gets a SIGTERM and stops at a checkpoint, as on a cluster. On a CPU afterwards,
   scripts/studiogan_curve.py joins them, computes their FID (10k samples against the test set, StudioGAN's 2020
   protocol) and sets them beside StudioGAN's curve.
2. The GPU tier, `pytest -m gpu -v`: every command on the GPU through its command line, and what only a GPU runs.
3. scripts/benchmark.py for sagan32 and sagan128 at batch 64: default, plain fp32 and compiled steps/s, the share of
   the GPU's dense bf16 peak, and the attention block's memory at 64x64 against the explicit form.

The runs write into --work; their small outputs (logs, the tier's report, the benchmark's JSON, the run's metrics,
config and sample grids) go into one session.tar.gz in --out beside the snapshot parts: a session brings back at most
8 files, 64 MiB in all (three snapshots of 16.7 MiB each, and the archive).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PART_BYTES = 15 * 2**20  # below the 16 MiB a returned file may have
# Dense bf16 peak TFLOP/s by GPU name (NVIDIA's data sheets, SXM parts), for the share of peak a step reaches.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0}

# Phase settings: (full session on a GPU, rehearsal on a CPU). The rehearsal runs the same phases and code paths at
# tiny sizes, except torch.compile (minutes on a CPU; the test suite compiles elsewhere).
FULL = {
    "run_s": 200, "snapshot_every": 2000, "snapshots": 3, "run_overrides": ["data.in_memory=true"], "tier_s": 110,
    "bench_s": 160, "bench": ["--batch", "64", "--compile", "--attn-sizes", "64", "--attn-batch", "32", "--spec-timeout", "50"],
}  # fmt: skip
REHEARSAL = {
    "run_s": 240, "snapshot_every": 2, "snapshots": 2,
    "run_overrides": ["model.g_ch=4", "model.d_ch=4", "train.batch_size=8", "data.num_workers=0"],
    "tier_s": 300, "bench_s": 240, "bench": ["--batch", "2", "--steps", "1", "--attn-sizes", "16", "--attn-batch", "2",
                                             "--warmup", "1", "--override", "model.g_ch=4", "model.d_ch=4"],
}  # fmt: skip


def log(message: str) -> None:
    print(f"[gpu_session {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_phase(
    name: str, command: list[str], budget_s: float, work: Path, *, stop_first: bool = False, env: dict | None = None
) -> int | None:
    """Run `command` with its output in work/<name>.log; past `budget_s` it gets SIGTERM (with `stop_first`, 60 s
    to stop cleanly) and then SIGKILL. Returns the exit status, None when it had to be killed."""
    log(f"{name}: {' '.join(command)} (budget {budget_s:.0f} s)")
    with open(work / f"{name}.log", "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=work, start_new_session=True, env={**os.environ, **(env or {})}
        )
        try:
            return process.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            if stop_first:
                log(f"{name}: budget reached, SIGTERM (a checkpoint, then a normal exit)")
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    return process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            log(f"{name}: killed")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None
        finally:
            log(f"{name}: ended ({process.returncode})")


def cifar_run(settings: dict, data: Path, work: Path, out: Path) -> None:
    """Phase 1: train, then cut G_ema at every `snapshot_every` steps into parts in `out`."""
    every, count = settings["snapshot_every"], settings["snapshots"]
    run_dir = work / "cifar10_run"
    overrides = [
        "experiment=cifar10_studiogan", "data=folder", f"data.root={data}", f"train.steps={every * count}",
        f"train.ckpt_every={every}", f"train.keep_last={count + 1}", "logger.mode=disabled", f"logger.log_every={max(every // 20, 1)}",
        f"logger.image_every={every}", f"hydra.run.dir={run_dir}", *settings["run_overrides"],
    ]  # fmt: skip
    status = run_phase("cifar10_run", [sys.executable, "-m", "sagan.train", *overrides], settings["run_s"], work, stop_first=True)
    from sagan.checkpoint import load_checkpoint, serialize

    written = []
    for path in sorted((run_dir / "checkpoints").glob("step_*.pt")):
        state = load_checkpoint(path)
        step = state["trainer"]["step"]
        if step % every:
            continue  # where a SIGTERM stopped the run: not one of the published steps
        # A checkpoint that holds G_ema alone (with the model and config every command reads): sagan-fid takes it.
        light = {k: state[k] for k in ("model", "config")} | {"trainer": {"G_ema": state["trainer"]["G_ema"], "step": step}}
        data_bytes = serialize(light)
        for k, start in enumerate(range(0, len(data_bytes), PART_BYTES)):
            (out / f"G_ema_step{step:06d}.pt.part{k}").write_bytes(data_bytes[start : start + PART_BYTES])
        written.append(step)
    log(f"cifar10_run: exit {status}, G_ema snapshots at steps {written or 'none'} in {out}")


def gpu_tier(settings: dict, work: Path, rehearse: bool) -> None:
    """Phase 2: the GPU tier, with every test named in the log (-v) and the reasons of skips (-rs); rehearsed, its
    command-line tests run on the CPU (tests/test_gpu.py)."""
    command = [sys.executable, "-m", "pytest", str(REPO / "tests"), "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={work / 'gpu_tier.xml'}"]  # fmt: skip
    run_phase("gpu_tier", command, settings["tier_s"], work, env={"SAGAN_GPU_REHEARSAL": "1"} if rehearse else None)


def benchmark(settings: dict, work: Path) -> None:
    """Phase 3: sagan32 then sagan128, each in its own share of the budget."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if device == "cuda" and k in torch.cuda.get_device_name(0)), None)
    for preset in ("sagan32", "sagan128"):
        command = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--device", device, "--preset", preset,
                   *settings["bench"], "--json", str(work / f"benchmark_{preset}.json")]  # fmt: skip
        if peak:
            command += ["--peak-tflops", str(peak)]
        run_phase(f"benchmark_{preset}", command, settings["bench_s"] / 2, work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="what comes back: snapshot parts and session.tar.gz")
    parser.add_argument("--data", type=Path, default=None, help="CIFAR-10's training images (folder or zip)")
    parser.add_argument("--rehearse", action="store_true", help="the same phases at tiny sizes, on a CPU")
    parser.add_argument("--work", type=Path, default=None, help="the runs' own files (default: a new temporary folder)")
    parser.add_argument("--phases", nargs="+", default=["run", "tier", "bench"], choices=["run", "tier", "bench"])
    args = parser.parse_args()
    settings = REHEARSAL if args.rehearse else FULL
    if not args.rehearse and not torch.cuda.is_available():
        sys.exit("gpu_session: no CUDA GPU visible; on a CPU run it with --rehearse")
    data = args.data or Path(os.environ.get("SAGAN_CIFAR10_ZIP", REPO / ".device_data" / "cifar10-train-jpg.zip"))
    if "run" in args.phases and not data.exists():
        sys.exit(f"gpu_session: no CIFAR-10 images at {data}: pass --data or set SAGAN_CIFAR10_ZIP")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu_session_"))).resolve()  # not in --out: checkpoints are large
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    facts = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "torch": torch.__version__, "rehearsal": args.rehearse,
             "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "phases": args.phases}  # fmt: skip
    log(json.dumps(facts))
    if "run" in args.phases:
        cifar_run(settings, data.resolve(), work, out)
    if "tier" in args.phases:
        gpu_tier(settings, work, args.rehearse)
    if "bench" in args.phases:
        benchmark(settings, work)
    facts["seconds"] = round(time.monotonic() - started)
    (work / "session.json").write_text(json.dumps(facts, indent=2) + "\n")
    with tarfile.open(out / "session.tar.gz", "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            small = path.is_file() and path.suffix in (".log", ".json", ".jsonl", ".xml", ".png", ".yaml")
            if small and "checkpoints" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(work)))
    log(f"done in {facts['seconds']} s: {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))}")


if __name__ == "__main__":
    main()
