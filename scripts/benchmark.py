"""Speed and memory of a SAGAN training step and of the attention block, compared within one run.

    python scripts/benchmark.py                       # CPU-sized defaults: sagan32, batch 64, attention at 32/64 px
    python scripts/benchmark.py --device cuda --attn-sizes 32 64 128 --attn-batch 32 --peak-tflops 989
    python scripts/benchmark.py --compile             # also time the torch.compile variant (minutes to compile)

Every figure comes from a fresh subprocess (so global switches and the peak-memory high-water mark start clean).
Prints a table and a JSON document (--json PATH also writes it). Ratios compare variants measured in this run:

- train step (1 D + 1 G step): "plain" = fp32, eager, no channels_last, no fused Adam, denormals not flushed (what
  a straightforward PyTorch loop does); "default" = what `sagan-train` uses on this device (perf.* = auto).
- attention block forward + backward: ours (`SelfAttention2d`, SDPA) vs the explicit (N x N/4) bmm + softmax form
  of the same maths that most PyTorch SAGAN implementations use.
Peak memory is torch.cuda.max_memory_allocated on GPU, and on CPU (Linux) the growth of the process's resident set
above its size when the measurement starts (the high-water mark is reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F

from sagan.models import SelfAttention2d
from sagan.models.stats import model_stats


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def start_peak(device: torch.device) -> int:
    """Reset the peak-memory high-water mark; returns the baseline to subtract."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak resident set size (VmHWM)
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_bytes(device: torch.device, baseline: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024 - baseline


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call of fn(), after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def explicit_attention(block: SelfAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The same block with the attention matrix written out (bmm + softmax), as other implementations do it."""
    B, C, H, W = x.shape
    theta = block.query(x).flatten(2)
    phi = F.max_pool2d(block.key(x), block.pool).flatten(2)
    g = F.max_pool2d(block.value(x), block.pool).flatten(2)
    beta = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)  # (B, N, N/4): the memory this costs
    return x + block.gamma * block.out(torch.bmm(g, beta.transpose(1, 2)).view(B, C // 2, H, W))


def measure_step(spec: dict) -> dict:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from sagan.config import PerfConfig
    from sagan.utils.processes import resolve_perf
    from sagan.models import build_models
    from sagan.training.step import Trainer

    device = torch.device(spec["device"])
    with initialize_config_module(config_module="sagan.conf", version_base="1.3"):
        model = compose(config_name="config", overrides=[f"model={spec['preset']}", *spec.get("overrides", [])]).model
    G, D = build_models(model, 0)
    stats = model_stats(G, D)
    if spec["variant"] == "plain":
        perf = {"precision": "fp32", "channels_last": False, "fused_adam": False, "compile": False}
    else:
        torch.set_flush_denormal(True)
        perf = resolve_perf(OmegaConf.structured(PerfConfig(compile=spec["variant"] == "compile")), device)
    trainer = Trainer(G, D, device=device, **perf)
    batch = spec["batch"]
    images = torch.randint(0, 256, (batch, 3, model.resolution, model.resolution), dtype=torch.uint8, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)

    def stream():
        while True:
            yield images, labels

    batches = stream()
    for _ in range(spec["warmup"]):  # compile, cuDNN autotuning, allocator warm-up, denormals settling
        trainer.train_step(batches)
    baseline = start_peak(device)
    seconds = timed(lambda: trainer.train_step(batches), device, spec["steps"])
    flop = batch * (4 * stats["G_gflop"] + 9 * stats["D_gflop"]) * 1e9  # D step: G fwd, D fwd+bwd on 2B; G step: G+D fwd+bwd
    return {**spec, **perf, "ms_per_step": seconds * 1e3, "steps_per_s": 1 / seconds, "images_per_s": batch / seconds,
            "peak_mib": peak_bytes(device, baseline) / 2**20, "tflop_per_step": flop / 1e12, "tflops": flop / seconds / 1e12}  # fmt: skip


def measure_attention(spec: dict) -> dict:
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    block = SelfAttention2d(spec["channels"]).to(device)
    x = torch.randn(spec["batch"], spec["channels"], spec["size"], spec["size"], device=device, requires_grad=True)
    forward = block if spec["variant"] == "ours" else (lambda t: explicit_attention(block, t))

    def step():
        forward(x).sum().backward()

    step()  # warm-up outside the peak window
    x.grad = None
    baseline = start_peak(device)
    seconds = timed(step, device, spec["repeats"])
    return {**spec, "ms": seconds * 1e3, "peak_mib": peak_bytes(device, baseline) / 2**20}


def run_one(spec: dict, timeout: float | None = None) -> dict:
    """Measure one spec in a fresh Python process (given up after `timeout` seconds)."""
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {**spec, "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="sagan32")
    parser.add_argument("--override", nargs="*", default=[], help="model overrides, e.g. model.g_ch=8 (default none)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 50 on GPU)")
    parser.add_argument("--compile", action="store_true", help="also measure perf.compile=true")
    parser.add_argument("--attn-sizes", type=int, nargs="+", default=None, help="feature-map sizes (CPU: 32 64)")
    parser.add_argument("--attn-batch", type=int, default=None, help="attention batch (default: 8 on CPU, 32 on GPU)")
    parser.add_argument("--attn-channels", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for utilisation")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 on CPU, 10 on GPU)")
    parser.add_argument("--spec-timeout", type=float, default=None, help="give up a measurement after this many seconds")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        spec = json.loads(args.one)
        print(json.dumps(measure_step(spec) if spec["kind"] == "step" else measure_attention(spec)))
        return

    gpu = args.device.startswith("cuda")
    steps = args.steps or (50 if gpu else 3)
    results = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if gpu else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "step": [],
        "attention": [],
    }
    variants = ["plain", "default"] + (["compile"] if args.compile else [])
    for variant in variants:
        spec = {"kind": "step", "variant": variant, "device": args.device, "preset": args.preset, "batch": args.batch,
                "overrides": args.override, "steps": steps, "warmup": (10 if gpu else 2) if args.warmup is None else args.warmup}  # fmt: skip
        results["step"].append(run_one(spec, args.spec_timeout))
    for size in args.attn_sizes or ([32, 64, 128] if gpu else [32, 64]):
        for variant in ("explicit", "ours"):
            spec = {"kind": "attention", "variant": variant, "device": args.device, "size": size,
                    "batch": args.attn_batch or (32 if gpu else 8), "channels": args.attn_channels,
                    "repeats": 20 if gpu or size <= 32 else 3}  # fmt: skip
            results["attention"].append(run_one(spec, args.spec_timeout))
    report(results, args.peak_tflops)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


def report(results: dict, peak_tflops: float | None) -> None:
    print(f"{results['device']} | torch {results['torch']} | {results['date']}")
    plain = next((r for r in results["step"] if r["variant"] == "plain" and "error" not in r), None)
    print(f"\n{'train step':<10} {'precision':<9} {'ms/step':>9} {'steps/s':>8} {'img/s':>8} {'peak MiB':>9} {'TFLOP/s':>8} {'vs plain':>8}")
    for r in results["step"]:
        if "error" in r:
            print(f"{r['variant']:<10} error: {r['error']}")
            continue
        r["speedup_vs_plain"] = plain["ms_per_step"] / r["ms_per_step"] if plain else None
        if peak_tflops:
            r["fraction_of_peak"] = r["tflops"] / peak_tflops
        print(f"{r['variant']:<10} {r['precision']:<9} {r['ms_per_step']:>9.1f} {r['steps_per_s']:>8.2f} {r['images_per_s']:>8.1f} "
              f"{r['peak_mib']:>9.0f} {r['tflops']:>8.3f} {r['speedup_vs_plain']:>7.2f}x")  # fmt: skip
    print(f"\n{'attention':<10} {'map':>7} {'explicit ms':>11} {'ours ms':>8} {'time ratio':>10} {'explicit MiB':>12} {'ours MiB':>9} {'memory ratio':>12}")
    by_size: dict[int, dict[str, dict]] = {}
    for r in results["attention"]:
        by_size.setdefault(r["size"], {})[r["variant"]] = r
    for size, pair in by_size.items():
        e, o = pair.get("explicit", {}), pair.get("ours", {})
        if "error" in e or "error" in o:
            print(f"{size}x{size}: error: {e.get('error') or o.get('error')}")
            continue
        o["time_ratio"], o["memory_ratio"] = o["ms"] / e["ms"], o["peak_mib"] / max(e["peak_mib"], 1e-9)
        print(f"{'':<10} {f'{size}x{size}':>7} {e['ms']:>11.1f} {o['ms']:>8.1f} {o['time_ratio']:>9.2f}x {e['peak_mib']:>12.0f} "
              f"{o['peak_mib']:>9.0f} {o['memory_ratio']:>11.2f}x")  # fmt: skip
    print()


if __name__ == "__main__":
    main()
