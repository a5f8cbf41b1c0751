"""Images per second the input pipeline delivers to the training step, and the rate a GPU would need.

    python scripts/input_benchmark.py                                  # 1,024 JPEGs of 500x375, 32 and 128 px, 1 and 2 workers
    python scripts/input_benchmark.py --images 4096 --workers 1 2 4 8 --json input.json

What is measured is the training path itself: `BatchStream` (the seeded sampler, DataLoader workers decoding and
cropping/resizing, horizontal flips) over three sources of the same images:

- jpeg folder: a class-folder tree of ImageNet-sized JPEGs (generated here: smooth colour fields with edges and grain,
  500x375, quality 90, about the size of ImageNet's photos), decoded at full size and resized on every epoch;
- prepared zip: the same images after `sagan-prepare` (PNGs at the training resolution, read from one zip);
- in memory: `data.in_memory=true` (decoded once into one tensor; batches are indexing).

Batches of 64, after two warm-up batches (worker start-up); the files sit in the page cache (a second epoch). Beside
it, the rate a GPU needs: real images per step (the batch, 1 D step per G step as in the paper) times the steps per
second a GPU runs at a fraction of its dense bf16 peak, from the model's FLOP count (sagan.models.stats:
4 G + 9 D forward FLOP per real image for a D step and a G step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sagan.data.batch_stream import BatchStream
from sagan.data.datasets import build_dataset
from sagan.data.preparation import prepare

GPUS = {"H100 SXM": 989.0, "A100": 312.0}  # dense bf16 TFLOP/s, the vendors' figures (no sparsity)
BATCH = 64


def write_jpegs(root: Path, n: int, size: tuple[int, int] = (500, 375), classes: int = 10) -> float:
    """n photo-like JPEGs in `classes` folders; returns their mean size in KiB."""
    rng = np.random.default_rng(0)
    w, h = size
    total = 0
    for i in range(n):
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        y, x = np.mgrid[0:h, 0:w]
        edges = 60 * (np.sin(x / rng.uniform(3, 30)) > 0)[..., None] * (np.cos(y / rng.uniform(3, 30)) > 0)[..., None]
        grain = rng.normal(0, 12, (h, w, 3))
        image = np.clip(field + edges + grain, 0, 255).astype(np.uint8)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(image).save(path, quality=90)
        total += path.stat().st_size
    return total / n / 1024


def delivered(dataset, *, workers: int, in_memory: bool, batches: int) -> float:
    """Images/s BatchStream hands to the step, over `batches` batches after two warm-up ones."""
    stream = iter(BatchStream(dataset, batch_size=BATCH, seed=0, hflip=True, in_memory=in_memory, num_workers=workers))
    for _ in range(2):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * BATCH / (time.perf_counter() - start)


def needed_rates(fraction: float) -> list[dict]:
    """Real images/s a GPU consumes at `fraction` of its bf16 peak, for the paper's 32 and 128 px models."""
    from hydra import compose, initialize_config_module

    from sagan.models import build_models
    from sagan.models.stats import model_stats

    rows = []
    with initialize_config_module(config_module="sagan.conf", version_base="1.3"):
        for preset, resolution in (("sagan32", 32), ("sagan128", 128)):
            stats = model_stats(*build_models(compose(config_name="config", overrides=[f"model={preset}"]).model, 0))
            gflop = 4 * stats["G_gflop"] + 9 * stats["D_gflop"]
            for gpu, peak in GPUS.items():
                rows.append({"model": preset, "resolution": resolution, "gpu": gpu, "gflop_per_image": gflop,
                             "images_per_s": fraction * peak * 1e3 / gflop})  # fmt: skip
    return rows


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, default=24, help="timed batches per measurement")
    parser.add_argument("--fraction", type=float, default=0.3, help="fraction of the GPU's bf16 peak the step reaches")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only collates and copies; the workers do the work
    machine = f"{cpu_model()}, {len(os.sched_getaffinity(0))} CPUs"
    results = {"date": str(date.today()), "machine": machine, "torch": torch.__version__, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpeg"
        start = time.perf_counter()
        results["jpeg_kib"] = write_jpegs(folder, args.images)
        print(f"{args.images} JPEGs of 500x375 ({results['jpeg_kib']:.0f} KiB each) written in {time.perf_counter() - start:.0f} s")
        for resolution in args.resolutions:
            jpegs = build_dataset("folder", root=str(folder), resolution=resolution)
            zipped = Path(tmp) / f"prepared{resolution}.zip"
            start = time.perf_counter()
            prepare(jpegs, zipped, job={"resolution": resolution}, workers=max(args.workers), skip_bad=False)
            seconds = time.perf_counter() - start
            results["rows"].append({"source": "sagan-prepare itself", "resolution": resolution,
                                    "workers": max(args.workers), "images_per_s": args.images / seconds})  # fmt: skip
            prepared = build_dataset("folder", root=str(zipped), resolution=resolution)
            for workers in args.workers:
                for source, dataset in (("jpeg folder", jpegs), ("prepared zip", prepared)):
                    rate = delivered(dataset, workers=workers, in_memory=False, batches=args.batches)
                    results["rows"].append({"source": source, "resolution": resolution, "workers": workers, "images_per_s": rate})
            rate = delivered(prepared, workers=0, in_memory=True, batches=args.batches)
            results["rows"].append({"source": "in memory", "resolution": resolution, "workers": 0, "images_per_s": rate})
    results["needed"] = needed_rates(args.fraction)
    results["fraction"] = args.fraction
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def report(results: dict) -> None:
    print(f"\n{results['date']}, {results['machine']}, torch {results['torch']}; batch {BATCH}")
    print(f"{'source':<22} {'px':>4} {'workers':>7} {'img/s':>9}")
    for r in results["rows"]:
        print(f"{r['source']:<22} {r['resolution']:>4} {r['workers']:>7} {r['images_per_s']:>9.0f}")
    print(f"\nwhat a GPU consumes at {results['fraction']:.0%} of its dense bf16 peak (1 D step per G step)")
    print(f"{'model':<9} {'GPU':<9} {'GFLOP/img':>9} {'img/s':>9}")
    for r in results["needed"]:
        print(f"{r['model']:<9} {r['gpu']:<9} {r['gflop_per_image']:>9.1f} {r['images_per_s']:>9.0f}")


if __name__ == "__main__":
    main()
