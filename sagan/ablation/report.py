"""A study's results from its run directories: `results.md` (one row per variant: mean +- std over seeds, steps,
wall-clock; each variant against the first, with the difference, its 95% confidence interval and two-sided p-values;
then every run) and `results.png` (the scale's curve against training steps, one colour per variant)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from scipy import stats

# What the table shows of a run's evaluation (eval.json) and log (metrics.jsonl), and how.
COLUMNS = (("fid", "FID", 1.0, 2), ("kid", "KID x 10^3", 1e3, 2))


@dataclass
class RunResult:
    variant: str
    seed: int
    run_dir: Path
    steps: int = 0  # the step of its last checkpoint
    finished: bool = False
    metrics: dict[str, float] = field(default_factory=dict)  # of the final evaluation (eval.json)
    protocol: dict | None = None
    train_s: float | None = None  # training wall-clock, summed over resumes
    curve: list[tuple[int, float]] = field(default_factory=list)
    mirror: float | None = None  # the demo's score of G_ema at the last checkpoint (eval.json)


def read_run(variant: str, seed: int, run_dir: Path, curve_key: str, steps: int, finished: bool) -> RunResult:
    result = RunResult(variant, seed, run_dir, steps=steps, finished=finished)
    log = run_dir / "metrics.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row a killed process left half-written
                continue
            if curve_key in row:
                result.curve.append((row["step"], row[curve_key]))
            if "time/train_s" in row:
                result.train_s = row["time/train_s"]
    saved = read_json(run_dir / "eval.json")
    if saved.get("asked", {}).get("step") == steps:  # an evaluation of the checkpoint the run has now
        result.metrics, result.protocol = saved["metrics"], saved["protocol"]
    if saved.get("mirror", {}).get("asked", {}).get("step") == steps:
        result.mirror = saved["mirror"]["value"]
    return result


def read_json(path: Path) -> dict:
    """A JSON file's object; {} when it is missing or unreadable (then it is written again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """'mean +- std (n)' with the sample standard deviation; '-' without values."""
    values = [v * scale for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 run)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def write_report(out: Path, results: list[RunResult], *, title: str, about: list[str], curve_key: str) -> list[Path]:
    """results.md and results.png in `out`; returns their paths."""
    variants = list(dict.fromkeys(r.variant for r in results))
    demo = any(r.mirror is not None for r in results)
    head = ["variant", "runs done", "steps", *[name for _, name, _, _ in COLUMNS]]
    head += ["mirror consistency"] if demo else []
    head += ["training min / run"]
    rows = []
    for variant in variants:
        done = [r for r in results if r.variant == variant and r.finished and math.isfinite(r.metrics.get("fid", math.nan))]
        ours = [r for r in results if r.variant == variant]
        row = [variant, f"{len(done)} of {len(ours)}", ", ".join(sorted({str(r.steps) for r in done})) or "-"]
        row += [spread([r.metrics.get(key) for r in done], scale, digits) for key, _, scale, digits in COLUMNS]
        row += [spread([r.mirror for r in done], digits=3)] if demo else []
        row += [spread([r.train_s / 60 for r in done if r.train_s is not None], digits=1)]
        rows.append(row)
    per_run = [["run", "FID", "KID x 10^3", *(["mirror"] if demo else []), "training s", "directory"]]
    for r in results:
        kid = r.metrics.get("kid")
        per_run.append([
            f"{r.variant} seed {r.seed}",
            f"{r.metrics['fid']:.2f}" if "fid" in r.metrics else ("unfinished" if not r.finished else "not evaluated"),
            f"{kid * 1e3:.2f}" if kid is not None else "-",
            *([f"{r.mirror:.3f}" if r.mirror is not None else "-"] if demo else []),
            f"{r.train_s:.0f}" if r.train_s is not None else "-",
            r.run_dir.name,
        ])  # fmt: skip
    lines = [f"# {title}", "", *about, "", markdown_table([head, *rows]), ""]
    against = comparisons(results, variants, demo)
    if len(against) > 1:
        lines += [f"Each variant against {variants[0]}, over the finished runs: the difference of the means, its 95%",
                  "confidence interval and p-value by Welch's t-test, and the Mann-Whitney U test's p-value (two-sided):",
                  "", markdown_table(against), ""]  # fmt: skip
    lines += ["Every run:", "", markdown_table(per_run), ""]
    md = out / "results.md"
    md.write_text("\n".join(lines))
    if not any(r.curve for r in results):  # e.g. no mirror score off the demo data, no in-training FID
        return [md]
    png = out / "results.png"
    plot_curves(results, variants, curve_key, title, png)
    return [md, png]


def comparisons(results: list[RunResult], variants: list[str], demo: bool) -> list[list[str]]:
    """A table of every variant against the first (the study's reference): per metric with at least two finished runs
    on each side, the difference of the means, its Welch 95% confidence interval, Welch's and Mann-Whitney's p."""
    measures = [(key, name, scale, digits) for key, name, scale, digits in COLUMNS]
    measures += [("mirror", "mirror consistency", 1.0, 3)] if demo else []

    def values(variant: str, key: str) -> list[float]:
        done = [r for r in results if r.variant == variant and r.finished]
        found = [r.mirror if key == "mirror" else r.metrics.get(key) for r in done]
        return [v for v in found if v is not None and math.isfinite(v)]

    rows = [["variant", "measure", "difference", "95% interval", "Welch p", "Mann-Whitney p", "runs"]]
    for variant in variants[1:]:
        for key, name, scale, digits in measures:
            a = [v * scale for v in values(variants[0], key)]
            b = [v * scale for v in values(variant, key)]
            if len(a) < 2 or len(b) < 2:
                continue
            welch = stats.ttest_ind(b, a, equal_var=False)
            ci = welch.confidence_interval(0.95)
            u = stats.mannwhitneyu(b, a, alternative="two-sided")
            rows.append([
                variant, name, f"{statistics.mean(b) - statistics.mean(a):+.{digits}f}",
                f"{ci.low:+.{digits}f} to {ci.high:+.{digits}f}", f"{welch.pvalue:.3f}", f"{u.pvalue:.3f}",
                f"{len(b)} and {len(a)}",
            ])  # fmt: skip
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def plot_curves(results: list[RunResult], variants: list[str], key: str, title: str, path: Path) -> None:
    """The curve of every run (thin) and each variant's mean over its seeds (thick), against training steps."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, variant in enumerate(variants):
        colour = f"C{i % 10}"
        curves = [dict(r.curve) for r in results if r.variant == variant and r.curve]
        for curve in curves:
            ax.plot(list(curve), list(curve.values()), color=colour, alpha=0.3, linewidth=0.8)
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if steps:
            ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], color=colour, linewidth=2,
                    label=f"{variant} ({len(curves)} runs)")  # fmt: skip
    ax.set_xlabel("training step (G updates)")
    ax.set_ylabel(key)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
