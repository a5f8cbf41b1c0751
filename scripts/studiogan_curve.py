"""The FID of the G_ema snapshots a GPU session brought back (scripts/gpu_session.py), beside StudioGAN's published
curve: a table (Markdown, printed), a plot and a JSON file.

    python scripts/studiogan_curve.py --snapshots /work/.device/<files_at> --ref path/to/cifar10-test-jpg.zip \\
        --log path/to/studiogan/logs/CIFAR10/SAGAN-train-2020_09_18_23_34_49.log \\
        --weights path/to/inception-fid-pool3-nofc.pth --out docs/gpu_fid_curve.png

Each snapshot's parts (`G_ema_step<N>.pt.part<k>`) are joined into one checkpoint, whose FID `sagan-fid` computes:
`n` samples (default 10,000) against every image of `--ref`, StudioGAN's 2020 protocol (10k generated images
against the CIFAR-10 test set). StudioGAN's figures are the log's "FID score (Step: N, Using test moments)" lines.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from sagan.cli import parse_args
from sagan.evaluation.evaluate import evaluate
from sagan.evaluation.request import FidArgs

PART = re.compile(r"G_ema_step(\d+)\.pt\.part(\d+)$")
STUDIOGAN_FID = re.compile(r"FID score \(Step: (\d+), Using test moments\): ([0-9.]+)")


def join_snapshots(folder: Path, into: Path) -> dict[int, Path]:
    """Every snapshot in `folder`, its parts joined in order into `into`/G_ema_step<N>.pt: {step: path}."""
    parts: dict[int, dict[int, Path]] = {}
    for path in folder.iterdir():
        match = PART.match(path.name)
        if match:
            parts.setdefault(int(match[1]), {})[int(match[2])] = path
    joined = {}
    for step, pieces in sorted(parts.items()):
        if sorted(pieces) != list(range(len(pieces))):
            raise SystemExit(f"snapshot of step {step} is missing parts: it has {sorted(pieces)}")
        path = into / f"G_ema_step{step:06d}.pt"
        path.write_bytes(b"".join(pieces[k].read_bytes() for k in sorted(pieces)))
        joined[step] = path
    return joined


def studiogan_curve(log: Path) -> dict[int, float]:
    """StudioGAN's FID against the test moments at each evaluated step of its training log."""
    return {int(step): float(fid) for step, fid in STUDIOGAN_FID.findall(log.read_text())}


def table(rows: list[dict]) -> str:
    lines = ["| step | sagan FID | StudioGAN FID (published log) | sagan - StudioGAN |", "| --- | --- | --- | --- |"]
    for r in rows:
        theirs = "-" if r["studiogan"] is None else f"{r['studiogan']:.1f}"
        diff = "-" if r["studiogan"] is None else f"{r['sagan'] - r['studiogan']:+.1f}"
        lines.append(f"| {r['step']:,} | {r['sagan']:.1f} | {theirs} | {diff} |")
    return "\n".join(lines)


def plot(rows: list[dict], published: dict[int, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    last = max(r["step"] for r in rows)
    shown = {s: f for s, f in published.items() if s <= max(last, 10_000)}
    ax.plot(list(shown), list(shown.values()), "o-", label="StudioGAN's published log")
    ax.plot([r["step"] for r in rows], [r["sagan"] for r in rows], "s-", label="sagan (experiment=cifar10_studiogan)")
    ax.set(xlabel="G steps", ylabel="FID (10k vs CIFAR-10 test)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", type=Path, required=True, help="the folder the session's files came back to")
    parser.add_argument("--ref", required=True, help="CIFAR-10's test images (folder, zip or cifar10-test)")
    parser.add_argument("--log", type=Path, required=True, help="StudioGAN's CIFAR-10 SAGAN training log")
    parser.add_argument("--weights", default=None, help="local FID Inception weights (default: torch-fidelity downloads)")
    parser.add_argument("--n", type=int, default=10_000, help="generated images per snapshot")
    parser.add_argument("--ref-n", type=int, default=None, help="reference images (default: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("gpu_fid_curve.png"), help="the plot; the JSON goes beside it")
    args = parser.parse_args()
    work = args.out.parent / (args.out.stem + "_snapshots")
    work.mkdir(parents=True, exist_ok=True)
    snapshots = join_snapshots(args.snapshots, work)
    if not snapshots:
        raise SystemExit(f"no G_ema_step<N>.pt.part<k> files in {args.snapshots}")
    published = studiogan_curve(args.log)
    rows = []
    for step, ckpt in snapshots.items():
        request = [f"ckpt={ckpt}", f"ref={args.ref}", f"n={args.n}", "isc=false", "seed=0", f"device={args.device}",
                   f"out={work / f'metrics_step{step:06d}.json'}"]  # fmt: skip
        request += [f"ref_n={args.ref_n}"] if args.ref_n else []
        request += [f"metrics.inception_weights={args.weights}"] if args.weights else []
        result = evaluate(parse_args(FidArgs, request))
        rows.append({"step": step, "sagan": result["metrics"]["fid"], "studiogan": published.get(step),
                     "protocol": result["protocol"]})  # fmt: skip
    print(table(rows))
    plot(rows, published, args.out, f"CIFAR-10 SAGAN, {args.n:,} samples")
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "studiogan": published}, indent=2) + "\n")
    print(f"plot: {args.out}, figures: {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
