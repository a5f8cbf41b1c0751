"""What training draws every `logger.image_every` steps: sample grids, attention figures and the attention explorer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from sagan.utils.atomic_files import atomic_write, write_png
from sagan.visualization.explorer import explorer_page
from sagan.data.images import to_float
from sagan.visualization.figures import generate, render_attention, save_grid


class Snapshots:
    """Sample grids (G and G_ema on a fixed z), attention figures (G_ema on its samples, D on fixed real images) and
    the attention explorer page (G_ema on its samples, D on those and the real images), written under the run
    directory: samples/step_XXXXXXX[_G].png, attention/step_XXXXXXX_<layer>.png, attention/step_XXXXXXX.html, each
    written whole or not at all (a full disk raises DiskFull).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        z: torch.Tensor,
        y: torch.Tensor | None,
        real: torch.Tensor,
        y_real: torch.Tensor | None,
        queries: Sequence[tuple[int, int]],
        attn_images: int,
        score: Callable[[torch.Tensor], float] | None = None,
        title: str = "sagan",
    ) -> None:
        self.run_dir, self.z, self.y, self.title = run_dir, z, y, title
        self.real, self.y_real = to_float(real), y_real
        self.queries, self.n = queries, attn_images
        self.score = score  # a dataset's own quality score of samples (the demo's mirror consistency)

    def write(self, step: int, G: nn.Module, G_ema: nn.Module, D: nn.Module) -> tuple[dict[str, Path], dict[str, float]]:
        """Write this step's images; returns {W&B key: path} and the sample score (if the dataset has one)."""
        name = f"step_{step:07d}"
        paths = {"samples/G_ema": self.run_dir / "samples" / f"{name}.png", "samples/G": self.run_dir / "samples" / f"{name}_G.png"}
        samples = generate(G_ema, self.z, self.y)
        save_grid(samples, paths["samples/G_ema"])
        save_grid(generate(G, self.z, self.y), paths["samples/G"])

        n, y = self.n, None if self.y is None else self.y[: self.n]
        y_real = None if self.y_real is None else self.y_real[:n]
        figures = render_attention(G_ema, lambda: G_ema(self.z[:n], y), samples[:n], self.queries, "G")
        figures |= render_attention(D, lambda: D(self.real[:n], y_real), self.real[:n], self.queries, "D")
        for key, figure in figures.items():
            paths[f"attention/{key}"] = self.run_dir / "attention" / f"{name}_{key}.png"
            write_png(paths[f"attention/{key}"], figure)
        if figures:
            title = f"{self.title}, step {step}: G_ema on its samples, D on them and on real images"
            page = explorer_page(G_ema, D, z=self.z[:n], y=y, real=self.real[:n], y_real=y_real, title=title)
            paths["attention/explorer"] = self.run_dir / "attention" / f"{name}.html"
            atomic_write(paths["attention/explorer"], page)
        scores = {} if self.score is None else {"score/mirror_consistency": self.score(samples)}
        return paths, scores
