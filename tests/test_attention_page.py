"""The attention explorer page: the maps it embeds, its size budget, and what a real browser draws from it."""

import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from sagan.visualization.explorer import PAGE_BUDGET, dequantise, explorer_page, layer_maps
from sagan.models import Discriminator, Generator, SelfAttention2d, attention_shares

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def page_data(page: str) -> dict:
    payload = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    return json.loads(payload.replace("<\\/", "</"))


def layer_arrays(record: dict) -> np.ndarray:
    """A layer's embedded maps, de-quantised: (B, QH, QW, KH, KW)."""
    shape = (len(record["images"]), *record["queries"], *record["keys"])
    q = np.frombuffer(base64.b64decode(record["maps"]), dtype=np.uint8).reshape(shape)
    peak = np.frombuffer(base64.b64decode(record["peaks"]), dtype=np.float32).reshape(shape[:3])
    return dequantise(q, peak)


def peaky_networks(resolution: int = 32, attn: tuple[int, ...] = (16,)) -> tuple[Generator, Discriminator]:
    """Small G and D whose attention maps have clear peaks (query/key weights scaled up; no spectral norm, which would
    divide the scale out again), and non-zero gammas."""
    torch.manual_seed(0)
    G = Generator(z_dim=16, ch=8, resolution=resolution, attn_resolutions=attn, sn=False)
    D = Discriminator(ch=32, resolution=resolution, attn_resolutions=attn, sn=False)  # 8-d queries: varied maps
    for block in [m for net in (G, D) for m in net.modules() if isinstance(m, SelfAttention2d)]:
        with torch.no_grad():
            block.query.weight.mul_(6)
            block.key.weight.mul_(6)
            block.gamma.fill_(0.25)
    return G, D


def test_embedded_maps_match_attention_maps_to_one_255th():
    G, D = peaky_networks()
    z, real = torch.randn(3, 16), torch.rand(2, 3, 32, 32) * 2 - 1
    data = page_data(explorer_page(G, D, z=z, y=None, real=real, y_real=None, title="t"))
    assert [r["name"] for r in data["layers"]] == ["G_attn16", "D_attn16"]
    assert len(data["images"]) == 5 and data["layers"][1]["images"] == [0, 1, 2, 3, 4]  # D: generated, then real
    G.eval(), D.eval()
    with torch.no_grad():
        fake = G(z)
    for record, (net, run) in zip(data["layers"], [(G, lambda: G(z)), (D, lambda: D(torch.cat([fake, real])))]):
        (expected,) = layer_maps(net, run, record["name"][0], record["images"])
        truth = expected.kept().numpy()
        assert record["stride"] == 1 and truth.shape[1:3] == (16, 16)  # 32 px: every query fits the budget
        embedded = layer_arrays(record)
        assert np.abs(embedded - truth).max() <= 1 / 255
        assert np.abs(embedded - truth).max() > 0  # quantised, not copied
        np.testing.assert_allclose(truth.sum(axis=(-2, -1)), 1, atol=1e-5)  # softmax rows
        share = attention_shares(net, run)["blocks.attn16"].item()  # beside the gamma: the branch's share
        assert record["gamma"] == 0.25 and share > 0 and record["share"] == pytest.approx(share, rel=1e-6)


def test_large_maps_keep_queries_on_a_coarser_grid_within_the_budget():
    """128 px with attention at 64x64 (1024 keys per query): every query of 8 + 8 images would be 64 MB."""
    G, D = peaky_networks(resolution=128, attn=(64,))
    real = torch.rand(8, 3, 128, 128) * 2 - 1
    page = explorer_page(G, D, z=torch.randn(8, 16), y=None, real=real, y_real=None, title="t")
    data = page_data(page)
    assert len(page.encode()) <= PAGE_BUDGET
    assert all(r["stride"] > 1 and r["queries"][0] == 64 // r["stride"] for r in data["layers"])
    assert max(r["stride"] for r in data["layers"]) <= 8  # as fine a grid as the budget allows, not coarser
    assert "queries on every" in page  # the page says so (its script writes the note)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_a_browser_draws_the_map_the_fragment_asks_for(tmp_path):
    """Headless Chromium opens the page with a fragment; the peak of the map it shows is the peak of that layer's
    attention map for that image and query, computed here."""
    G, D = peaky_networks()
    z, real = torch.randn(3, 16), torch.rand(2, 3, 32, 32) * 2 - 1
    page = tmp_path / "attention.html"
    page.write_text(explorer_page(G, D, z=z, y=None, real=real, y_real=None, title="browser test"))
    G.eval(), D.eval()
    with torch.no_grad():
        fake = G(z)
    (maps,) = layer_maps(D, lambda: D(torch.cat([fake, real])), "D", list(range(5)))
    # A query whose map has one clear peak (the top two cells apart by far more than the 8-bit quantisation), a peak
    # that the maps a page would show by mistake do not share (a neighbouring or transposed query, another image).
    peaks = maps.maps.flatten(-2).argmax(-1)  # (B, H, W)
    top2 = maps.maps.flatten(-2).topk(2).values
    gaps = (top2[..., 0] - top2[..., 1]) / top2[..., 0]

    def distinct(b: int, r: int, c: int) -> bool:
        wrong = [(b, c, r), (b, r, c - 1), (b, r, c + 1), (b, r - 1, c), (b, r + 1, c), (b - 1, r, c), (b + 1, r, c)]
        inside = [w for w in wrong if w != (b, r, c) and 0 <= w[0] < 5 and 0 <= w[1] < 16 and 0 <= w[2] < 16]
        return all(peaks[w] != peaks[b, r, c] for w in inside)

    candidates = [(float(gaps[b, r, c]), b, r, c) for b in range(1, 4) for r in range(16) for c in range(16) if distinct(b, r, c)]
    assert candidates, "no query tells a wrong map apart: make the test's maps more varied"
    _, image, row, col = max(candidates)
    peak = divmod(int(peaks[image, row, col]), maps.maps.shape[-1])
    url = f"{page.as_uri()}#layer=D_attn16&image={image}&query={row},{col}"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000"]  # fmt: skip
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    shown = re.search(r'<div id="attention-map"([^>]*)>', dom)
    assert shown, dom[:2000]
    attributes = dict(re.findall(r'data-(\w+)="([^"]*)"', shown.group(1)))
    assert attributes["layer"] == "D_attn16" and attributes["image"] == str(image)
    assert attributes["query"] == f"{row},{col}"
    assert attributes["peak"] == f"{peak[0]},{peak[1]}"
    assert re.search(r"D_attn16: 16x16 map, gamma \+0\.2500, share \d\.\d{3}", dom)
    screenshot = tmp_path / "attention.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1200,900", f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")


def test_drawing_the_page_leaves_the_networks_as_they_were():
    """Training networks (train mode) come back with the same weights, spectral-norm vectors and BatchNorm statistics:
    drawing a page mid-run must not change the run (exact resume depends on it)."""
    torch.manual_seed(0)
    G = Generator(z_dim=16, ch=8, resolution=32, attn_resolutions=(16,)).train()
    D = Discriminator(ch=8, resolution=32, attn_resolutions=(16,)).train()
    before = [{k: v.clone() for k, v in net.state_dict().items()} for net in (G, D)]
    explorer_page(G, D, z=torch.randn(2, 16), y=None, real=torch.rand(2, 3, 32, 32) * 2 - 1, y_real=None, title="t")
    assert G.training and D.training
    for net, saved in zip((G, D), before):
        assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
