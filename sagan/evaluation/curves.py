"""The truncation trade-off (BigGAN-PyTorch's and StudioGAN's users ask for it): the metrics at several truncations
of z, as a table and a plot."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from sagan.utils.atomic_files import atomic_write

SHOWN = (("fid", "FID"), ("intra_fid", "intra-FID"), ("is", "IS"), ("precision", "precision"), ("recall", "recall"))


def truncation_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per truncation (None: no truncation), a column per metric computed."""
    shown = [(key, name) for key, name in SHOWN if any(key in r["metrics"] for r in rows)]
    lines = ["| truncation | " + " | ".join(name for _, name in shown) + " |", "|---|" + "---|" * len(shown)]
    for r in rows:
        t = "none" if r["truncation"] is None else f"{r['truncation']:g}"
        lines.append(f"| {t} | " + " | ".join(f"{r['metrics'][k]:.3f}" if k in r["metrics"] else "-" for k, _ in shown) + " |")
    return "\n".join(lines)


def plot_truncation(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """FID (left axis) and IS or recall (right axis) against the truncation, as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    cut = [r for r in rows if r["truncation"] is not None]
    x = [r["truncation"] for r in cut]
    fig, left = plt.subplots(figsize=(6, 3.8), dpi=120)
    key = "fid" if "fid" in cut[0]["metrics"] else "intra_fid"
    left.plot(x, [r["metrics"][key] for r in cut], "o-", color="C0")
    left.set_xlabel("truncation t (z drawn from a normal truncated to [-t, t])")
    left.set_ylabel(dict(SHOWN)[key], color="C0")
    other = next((k for k in ("is", "recall", "precision") if k in cut[0]["metrics"]), None)
    if other is not None:
        right = left.twinx()
        right.plot(x, [r["metrics"][other] for r in cut], "s--", color="C1")
        right.set_ylabel(dict(SHOWN)[other], color="C1")
    left.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=7)
    left.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return path
