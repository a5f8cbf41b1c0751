"""The interactive attention explorer: one self-contained HTML file (no network, no server) that shows, for any
query position of any image, where every attention layer looks.

The maps of every query position are computed here (each block's `attention_maps`), quantised to 8 bits per map
(value / the map's maximum, the maximum kept as a float) and embedded with the images; the page's JavaScript draws the
map of the query under the mouse. A size budget keeps files under 3 MB: where all queries would exceed it (64x64 maps
at 128 px), queries are kept on a coarser grid (every s-th cell) and the page says so. The page's view is also chosen by
its URL fragment: `attention.html#layer=G_attn16&image=2&query=5,7` (query in feature-map cells).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from PIL import Image
from torch import nn

from sagan.data.images import to_uint8
from sagan.models import attention_shares
from sagan.visualization.figures import capture_attention_inputs, map_names

PAGE_BUDGET = 3 * 2**20  # bytes of one page file: images, maps (base64: 4 bytes per 3) and the page itself


@dataclass
class LayerMaps:
    """Every (kept) query's attention map of one layer over a set of images.

    maps: (B, QH, QW, KH, KW) softmax rows, for queries at cells (offset + i * stride, offset + j * stride) of the
    layer's H x W feature map; images: which of the page's images the B rows belong to.
    """

    name: str
    height: int
    width: int
    gamma: float
    share: float  # ||gamma f(x)|| / ||x|| over the page's images: the attention branch's share of the layer's output
    maps: torch.Tensor
    images: list[int]
    stride: int = 1

    @property
    def offset(self) -> int:
        return self.stride // 2

    def kept(self) -> torch.Tensor:
        """The maps of the queries on the stride grid: (B, QH', QW', KH, KW)."""
        s, o = self.stride, self.offset
        return self.maps[:, o::s, o::s]

    def nbytes(self) -> int:
        return self.kept()[..., 0, 0].numel() * (self.maps.shape[-2] * self.maps.shape[-1] + 4)


@torch.no_grad()
def layer_maps(model: nn.Module, run: Callable[[], object], prefix: str, images: list[int]) -> list[LayerMaps]:
    """The maps of every query of every attention layer of `model` while `run()` processes the page's `images`
    (indices), in eval mode (no spectral-norm update, running BatchNorm statistics), leaving the mode as it was."""
    was_training = model.training
    model.eval()  # also while the maps are computed: in train mode their convs would move spectral norm's u and v
    try:
        inputs = capture_attention_inputs(model, run)
        shares = attention_shares(model, run)
        layers = dict(model.named_modules())
        out = []
        for name, features in inputs.items():
            block = layers[name]
            H, W = features.shape[-2:]
            for head, short in enumerate(map_names(name, block)):
                maps = block.attention_maps(features.float(), head=head).float().cpu()  # (B, H*W, KH, KW)
                maps = maps.reshape(maps.shape[0], H, W, *maps.shape[-2:])
                out.append(LayerMaps(f"{prefix}_{short}", H, W, float(block.gamma), float(shares[name]), maps, list(images)))
    finally:
        model.train(was_training)
    return out


def fit_budget(layers: Sequence[LayerMaps], budget: int) -> None:
    """Double the query stride of the largest layer until all maps fit `budget` bytes (before base64)."""
    while sum(layer.nbytes() for layer in layers) > budget:
        largest = max(layers, key=LayerMaps.nbytes)
        if largest.stride >= min(largest.height, largest.width):
            break
        largest.stride *= 2


def quantise(maps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(..., KH, KW) maps -> uint8 maps scaled to each map's maximum, and the maxima (float32): map = q / 255 * max."""
    peak = maps.amax(dim=(-2, -1)).clamp_min(1e-12)
    q = (maps / peak[..., None, None] * 255).round().clamp(0, 255).to(torch.uint8)
    return q.numpy(), peak.float().numpy()


def dequantise(q: np.ndarray, peak: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) / 255 * peak[..., None, None]


def png_data_url(image: torch.Tensor) -> str:
    """A uint8 (3, H, W) image as an inline PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def page_html(images: list[tuple[torch.Tensor, str]], layers: Sequence[LayerMaps], *, title: str) -> str:
    """The page: `images` as (uint8 (3, R, R), caption) pairs, the layers' maps quantised, with queries on a grid
    coarse enough for the file to stay under `PAGE_BUDGET`."""
    pictures = [{"src": png_data_url(image), "caption": caption} for image, caption in images]
    template = resources.files("sagan.visualization").joinpath("explorer.html").read_text()
    left = PAGE_BUDGET - len(template) - sum(len(p["src"]) + 64 for p in pictures) - 4096  # 4 KB: the layers' records
    fit_budget(layers, budget=max(left, 0) * 3 // 4)
    records = []
    for layer in layers:
        q, peak = quantise(layer.kept())
        records.append({
            "name": layer.name, "height": layer.height, "width": layer.width, "gamma": layer.gamma, "share": layer.share,
            "stride": layer.stride, "offset": layer.offset, "images": layer.images,
            "queries": list(q.shape[1:3]), "keys": list(q.shape[3:5]),
            "maps": base64.b64encode(q.tobytes()).decode(), "peaks": base64.b64encode(peak.tobytes()).decode(),
        })  # fmt: skip
    data = {
        "title": title,
        "resolution": int(images[0][0].shape[-1]) if images else 0,
        "images": pictures,
        "layers": records,
    }
    # JSON inside <script>: "</" must not appear literally, or the browser would end the script there.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return template.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def explorer_page(
    G: nn.Module,
    D: nn.Module | None,
    *,
    z: torch.Tensor,
    y: torch.Tensor | None,
    real: torch.Tensor | None,
    y_real: torch.Tensor | None,
    title: str,
) -> str:
    """The page for G on the samples of `z` (and labels `y`), and D on those samples and on `real` images (in [-1, 1],
    with labels `y_real`; None: generated images only). G as it is: in eval mode with its running or standing
    statistics. D None (a checkpoint imported without one): G's layers only."""
    with torch.no_grad():
        was_training = G.training
        G.eval()
        fake = G(z, y)
        G.train(was_training)
    images = [(image, f"generated {i}") for i, image in enumerate(to_uint8(fake).cpu())]
    layers = layer_maps(G, lambda: G(z, y), "G", list(range(len(z))))
    if D is None:
        return page_html(images, layers, title=title)
    d_images, d_labels = fake, y
    if real is not None:
        images += [(image, f"real {i}") for i, image in enumerate(to_uint8(real).cpu())]
        d_images = torch.cat([fake, real.to(fake.device, fake.dtype)])
        d_labels = None if y is None else torch.cat([y, y_real.to(y.device)])
    layers += layer_maps(D, lambda: D(d_images, d_labels), "D", list(range(len(d_images))))
    return page_html(images, layers, title=title)
