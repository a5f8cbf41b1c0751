"""Peak memory of computing reference statistics (FID's mu and sigma) for 10,000 and 50,000 images, the old way and
the new, each measured in a fresh process.

    python scripts/reference_memory.py                          # 10,000 and 50,000 images, batches of 64
    python scripts/reference_memory.py --images 1000 200000 --batch-size 100

- before: what `dataset_reference` did until now, reproduced here: every pool feature kept ((N, 2048) float32), then
  torch-fidelity's `fid_features_to_statistics` of their float64 copy, then the cache written with the features.
- after: `dataset_reference` as it is (need_features=False): `FeatureMoments` summed batch by batch, cache without
  features.
- after, keeping features: `dataset_reference(need_features=True)`, what KID and precision/recall ask for.

The Inception network is replaced by a stub that returns random 2048-d float32 features per batch (the images are
3 x 8 x 8 zeros): the real network runs at about 8 images/s on a 2-core CPU, so 50,000 images would take hours, and its
own memory does not depend on the number of images. What is measured is what grows with it. Peak memory is the growth
of the process's resident set above its size when the measurement starts (the high-water mark VmHWM is reset through
/proc/self/clear_refs, Linux only), after a warm-up run of the same path on 256 images. Seconds are wall time on a
machine that may be busy, for orientation only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics

from sagan.evaluation.inception import Inception
from sagan.evaluation.reference_stats import dataset_reference
from sagan.utils.processes import SINGLE

METHODS = ("before", "after", "after, keeping features")
STUB_NOTE = "Inception replaced by a stub returning random 2048-d float32 features per batch (the real network: hours)"


class BlankImages(Dataset):
    """n black 8 x 8 images: the stub network does not look at them."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3, 8, 8, dtype=torch.uint8), 0

    def identity(self) -> tuple:
        return ("blank", self.n)


def stub_inception(seed: int) -> Inception:
    """The Inception wrapper around a stub network: random (B, 2048) float32 pool features for each batch."""
    generator = torch.Generator().manual_seed(seed)
    inception = Inception.__new__(Inception)
    inception.net = lambda images: (torch.rand(len(images), 2048, generator=generator),)
    inception.device, inception.logits = torch.device("cpu"), False
    return inception


def before(n: int, batch_size: int, cache: str) -> None:
    """The old path: all features into one (N, 2048) tensor, statistics through torch-fidelity, features cached."""
    inception = stub_inception(0)
    pool, done = torch.empty(n, 2048), 0
    for images, _ in DataLoader(BlankImages(n), batch_size=batch_size):
        pool[done : done + len(images)] = inception(images)[0]
        done += len(images)
    stats = fid_features_to_statistics(pool.double())
    mu, sigma = stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)
    np.savez(os.path.join(cache, "before.npz"), mu=mu, sigma=sigma, num_images=n, resolution=8, features=pool.numpy())


def after(n: int, batch_size: int, cache: str, need_features: bool = False) -> None:
    """The new path: `dataset_reference` itself, with the stub network."""
    dataset_reference(
        BlankImages(n), stub_inception(0), description="blank", resolution=8, limit=None, seed=0, weights=None,
        cache_root=cache, world=SINGLE, batch_size=batch_size, need_features=need_features,
    )  # fmt: skip


def run(method: str, n: int, batch_size: int, cache: str) -> None:
    if method == "before":
        before(n, batch_size, cache)
    else:
        after(n, batch_size, cache, need_features=method == "after, keeping features")


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(method: str, n: int, batch_size: int) -> dict:
    """Peak resident-set growth (MiB) and seconds of one method on n images, after a warm-up on 256."""
    with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as cache:
        run(method, 256, batch_size, warm)
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set size (VmHWM)
            f.write("5")
        baseline, start = status_kib("VmRSS"), time.perf_counter()
        run(method, n, batch_size, cache)
        seconds, peak = time.perf_counter() - start, status_kib("VmHWM")
    return {"method": method, "images": n, "peak_mib": (peak - baseline) / 1024, "seconds": seconds}


def measure_in_fresh_process(method: str, n: int, batch_size: int) -> dict:
    command = [sys.executable, __file__, "--one", json.dumps([method, n, batch_size])]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measuring {method} on {n} images failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    """Platform, CPU model, cores, memory and torch version."""
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    with open("/proc/meminfo") as f:
        memory_gib = int(next(line.split()[1] for line in f if line.startswith("MemTotal:"))) / 2**20
    return f"{platform.platform()}, {cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception batch (metrics.batch_size)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(*json.loads(args.one))))
        return
    print(f"command: python {' '.join(sys.argv)}\nmachine: {machine()}\ndate: {date.today().isoformat()}\n{STUB_NOTE}\n")
    print("| images | before MiB | after MiB | after, keeping features MiB | before s | after s | after, keeping features s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in args.images:
        rows = [measure_in_fresh_process(method, n, args.batch_size) for method in METHODS]
        memory = " | ".join(f"{r['peak_mib']:,.0f}" for r in rows)
        seconds = " | ".join(f"{r['seconds']:.1f}" for r in rows)
        print(f"| {n:,} | {memory} | {seconds} |", flush=True)


if __name__ == "__main__":
    main()
