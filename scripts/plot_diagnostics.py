"""A run's diagnostics from its metrics.jsonl as one PNG, without W&B: losses, D's outputs on real and fake images
and the share of reals it passes, gradient norms, and every attention layer's gamma and share.

    python scripts/plot_diagnostics.py outputs/demo                  # -> outputs/demo/diagnostics.png
    python scripts/plot_diagnostics.py outputs/demo --out docs/demo_diagnostics.png

Also prints, for the first and last logged rows, the values each panel shows (for the closing notes of a run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("losses", ["loss/d", "loss/g"]),
    ("D's mean output", ["D/real", "D/fake"]),
    ("reals D scores > 0", ["D/real_positive"]),
    ("gradient norms", ["grad_norm/D", "grad_norm/G"]),
    ("attention gamma", "gamma/"),
    ("attention share ||gamma o|| / ||x||", "attn_share/"),
]


def rows_of(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss/d" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default <run_dir>/diagnostics.png)")
    args = parser.parse_args()
    rows = rows_of(args.run_dir)
    if not rows:
        raise SystemExit(f"error: {args.run_dir / 'metrics.jsonl'} has no logged steps")
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), dpi=110)
    for ax, (title, keys) in zip(axes.flat, PANELS):
        names = [k for k in rows[-1] if k.startswith(keys)] if isinstance(keys, str) else keys
        for key in names:
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points), label=key, linewidth=1)
            print(f"{key}: step {points[0][0]} {points[0][1]:.4g} -> step {points[-1][0]} {points[-1][1]:.4g}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{args.run_dir.name}: diagnostics from metrics.jsonl", fontsize=10)
    fig.tight_layout()
    out = args.out or args.run_dir / "diagnostics.png"
    fig.savefig(out)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
