"""Attention maps drawn over images: for a few query points, where each attention layer looks.

For a query pixel j, row j of the softmax (official code: beta[j, :]) reshaped to the pooled key grid says how much
the layer draws on each location when producing j. We upsample it to the image, colour it and overlay it, and mark
the query point.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torchvision.utils import make_grid, save_image

from sagan.utils.atomic_files import atomic_write, write_png
from sagan.models import AttentionLayer
from sagan.utils.errors import UserError

# Query points as fractions (row, col) of the image: a left/right pair at two heights, so a user sees whether a point
# looks at its mirror position (the demo) or at related parts of the object.
DEFAULT_QUERIES = ((0.3, 0.25), (0.3, 0.75), (0.7, 0.25), (0.7, 0.75))
# A distinct marker colour per query point (the first column shows them all on the plain image).
MARKERS = ((0, 255, 255), (0, 255, 0), (255, 0, 255), (255, 255, 255), (255, 128, 0), (0, 128, 255))
# Colour map stops, dark to bright (black, purple, red, yellow, white): low attention stays dark.
_STOPS = torch.tensor([[0.0, 0.0, 0.0], [0.35, 0.0, 0.55], [0.9, 0.15, 0.1], [1.0, 0.85, 0.1], [1.0, 1.0, 1.0]])


def capture_attention_inputs(model: nn.Module, run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Call `run()` and return the input of every attention layer of `model` that draws maps, by module name."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, m in model.named_modules()
        if isinstance(m, AttentionLayer) and m.map_heads > 0
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return inputs


def map_names(module_name: str, block: AttentionLayer) -> list[str]:
    """The names of a layer's maps: 'attn16', or 'attn16_h0', 'attn16_h1', ... for a layer with several heads."""
    short = module_name.split(".")[-1]
    return [short] if block.map_heads == 1 else [f"{short}_h{h}" for h in range(block.map_heads)]


def colormap(t: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1], any shape S -> RGB in [0, 1], shape (3, *S)."""
    x = t.clamp(0, 1) * (len(_STOPS) - 1)
    i = x.floor().long().clamp(max=len(_STOPS) - 2)
    w = (x - i).unsqueeze(-1)
    rgb = _STOPS[i] * (1 - w) + _STOPS[i + 1] * w
    return rgb.movedim(-1, 0)


def to_pixels(queries: Sequence[Sequence[float]], resolution: int) -> list[tuple[int, int]]:
    """Query points (row, col) -> pixels on the image. A coordinate below 1 is a fraction of the image size, one of
    1 or more a pixel index (configs store both as floats, so the value, not the type, decides)."""
    pixels = []
    for q in queries:
        if len(q) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in q):
            raise UserError(f"a query point is two numbers (row, col), got {list(q)}")
        row, col = (round(v * (resolution - 1)) if 0 <= v < 1 else int(v) for v in q)
        if not (0 <= row < resolution and 0 <= col < resolution):
            raise UserError(f"query point {list(q)} lies outside the {resolution}x{resolution} image")
        pixels.append((row, col))
    return pixels


def overlay(image: torch.Tensor, heat: torch.Tensor, size: int) -> torch.Tensor:
    """Image (3, R, R) in [0, 1] and one attention map (h, w) -> (3, size, size) heat map over a dimmed image."""
    image = F.interpolate(image[None], size=(size, size), mode="nearest")[0]
    # Each map is scaled to its own peak (where, not how much), but the peak counts as at least 4x the uniform
    # weight, so a flat map (attention that does not look anywhere in particular) stays dim instead of saturating.
    peak = heat.max().clamp_min(4 / heat.numel())
    heat = F.interpolate(heat[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0] / peak
    return 0.4 * image + 0.6 * colormap(heat)


def _mark(draw: ImageDraw.ImageDraw, x: int, y: int, colour: tuple[int, int, int], r: int) -> None:
    draw.line((x - r, y, x + r, y), fill=(0, 0, 0), width=3)
    draw.line((x, y - r, x, y + r), fill=(0, 0, 0), width=3)
    draw.line((x - r, y, x + r, y), fill=colour, width=1)
    draw.line((x, y - r, x, y + r), fill=colour, width=1)


@torch.no_grad()
def attention_figure(
    block: AttentionLayer,
    features: torch.Tensor,
    images: torch.Tensor,
    queries: Sequence[tuple[int, int]],
    title: str,
    cell: int = 96,
    head: int = 0,
) -> Image.Image:
    """One figure for one attention layer: a row per image; the image with all query points, then one heat map per
    query point. `features` is the layer's input (B, C, H, W), `images` the matching images (B, 3, R, R) in [-1, 1]
    and `queries` pixel (row, col) positions on the images."""
    resolution, (H, W) = images.shape[-1], features.shape[-2:]
    on_map = [(r * H // resolution, c * W // resolution) for r, c in queries]
    maps = block.attention_maps(features.float(), on_map, head=head).float().cpu()  # (B, Q, h, w)
    images = ((images.float().cpu() + 1) / 2).clamp(0, 1)
    B, Q = maps.shape[:2]
    header = 16
    figure = Image.new("RGB", ((Q + 1) * cell, B * cell + header), (24, 24, 24))
    draw = ImageDraw.Draw(figure)
    draw.text((4, 2), title, fill=(230, 230, 230), font=ImageFont.load_default())
    to_pil = lambda t: Image.fromarray((t.permute(1, 2, 0) * 255).round().byte().numpy())  # noqa: E731
    scale = cell / resolution
    for b in range(B):
        y0 = header + b * cell
        figure.paste(to_pil(F.interpolate(images[b][None], size=(cell, cell), mode="nearest")[0]), (0, y0))
        for q, (r, c) in enumerate(queries):
            colour = MARKERS[q % len(MARKERS)]
            figure.paste(to_pil(overlay(images[b], maps[b, q], cell)), ((q + 1) * cell, y0))
            px, py = int((c + 0.5) * scale), int((r + 0.5) * scale)
            _mark(draw, px, y0 + py, colour, max(3, cell // 16))
            _mark(draw, (q + 1) * cell + px, y0 + py, colour, max(3, cell // 16))
    return figure


def render_attention(
    model: nn.Module,
    run: Callable[[], object],
    images: torch.Tensor,
    queries: Sequence[tuple[int, int]],
    prefix: str,
) -> dict[str, Image.Image]:
    """Figures for every attention layer of `model` while `run()` processes `images`, keyed '<prefix>_<layer>'."""
    was_training = model.training
    model.eval()  # no spectral-norm power iteration, BN in inference mode: the maps do not change the model
    try:
        inputs = capture_attention_inputs(model, run)
        layers = dict(model.named_modules())
        figures = {}
        for name, features in inputs.items():
            block = layers[name]
            H, W = features.shape[-2:]
            for head, short in enumerate(map_names(name, block)):
                title = f"{prefix} {short}: {H}x{W} map, gamma {block.gamma.item():+.4f}"
                figures[f"{prefix}_{short}"] = attention_figure(block, features, images, queries, title, head=head)
    finally:
        model.train(was_training)
    return figures


def save_grid(images: torch.Tensor, path: Path) -> None:
    """Images in [-1, 1] as one square-ish grid, a PNG file written atomically."""
    buffer = io.BytesIO()
    save_image(images, buffer, format="png", nrow=math.ceil(len(images) ** 0.5), normalize=True, value_range=(-1, 1))
    atomic_write(path, buffer.getvalue())


def save_interpolations(rows: torch.Tensor, out: Path, *, frame_ms: int = 120) -> list[Path]:
    """Interpolations uint8 (n, steps, 3, R, R) as `interp.png` (one row per interpolation) and `interp.gif` (frame t:
    every row's image t, as a grid; forth and back, looping)."""
    n, steps = rows.shape[:2]
    grid = make_grid(rows.reshape(n * steps, *rows.shape[2:]), nrow=steps, padding=2)
    frames = [make_grid(rows[:, t], nrow=math.ceil(n**0.5), padding=2) for t in range(steps)]
    frames += frames[-2:0:-1]  # back again, without repeating the ends
    pictures = [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in frames]
    write_png(out / "interp.png", Image.fromarray(grid.permute(1, 2, 0).numpy()))
    gif = io.BytesIO()
    pictures[0].save(gif, format="GIF", save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0)
    atomic_write(out / "interp.gif", gif.getvalue())
    return [out / "interp.png", out / "interp.gif"]


@torch.no_grad()
def generate(G: nn.Module, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """G(z, y) in eval mode (running BN statistics, no spectral-norm update), leaving G's mode as it was."""
    was_training = G.training
    G.eval()
    try:
        return G(z, y)
    finally:
        G.train(was_training)
