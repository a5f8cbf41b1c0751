import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import run_command
from sagan.attention import AttentionArgs, render_checkpoint
from sagan.cli import parse_args
from sagan.config import LoggerConfig
from sagan.models import Discriminator, Generator
from sagan.training.loop import train
from sagan.training.monitoring import warn_dead_attention
from sagan.visualization.figures import DEFAULT_QUERIES, colormap, overlay, render_attention, to_pixels
from sagan.utils.errors import UserError


def test_offline_run_logs_images_and_gamma_history(tiny_cfg, tmp_path):
    train(tiny_cfg("logger.mode=offline", "train.steps=2", "logger.image_every=2", "model.d_attn=[8,16]"), tmp_path)
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    media = {p.relative_to(run / "files" / "media" / "images").as_posix().rsplit("_", 2)[0] for p in run.rglob("*.png")}
    assert media == {"samples/G", "samples/G_ema", "attention/G_attn16", "attention/D_attn16", "attention/D_attn8"}
    # The attention explorer as an HTML panel, the same page as the file in the run directory.
    pages = sorted(run.rglob("*.html"))
    assert {p.relative_to(run / "files" / "media" / "html").as_posix().rsplit("_", 2)[0] for p in pages} == {"attention/explorer"}
    assert len(pages) == 2 and 'id="attention-map"' in pages[-1].read_text()  # steps 0 and 2
    assert pages[-1].read_text() == (tmp_path / "attention" / "step_0000002.html").read_text()
    # The .wandb file is W&B's binary record log (no public reader in wandb 0.31); history keys sit in it as strings.
    history = (run / f"run-{run.name.rsplit('-', 1)[1]}.wandb").read_bytes()
    for key in ("gamma/G/attn16", "gamma/D/attn16", "gamma/D/attn8", "loss/d", "sigma/D/linear"):
        assert key.encode() in history, key
    # The same scalars, readable without W&B.
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scalars = [row for row in rows if "loss/d" in row]
    assert [row["step"] for row in scalars] == [1, 2]
    assert {"gamma/G/attn16", "gamma/D/attn16", "gamma/D/attn8"} <= set(scalars[-1]) and scalars[-1]["lr/d"] == 4e-4
    diagnostics = {"D/real", "D/fake", "D/real_positive", "grad_norm/D", "grad_norm/G", "attn_share/G/attn16", "attn_share/D/attn8"}
    assert diagnostics <= set(scalars[-1]) and 0 <= scalars[-1]["D/real_positive"] <= 1
    assert scalars[-1]["grad_norm/D"] > 0 and scalars[-1]["attn_share/D/attn8"] >= 0
    # The script that plots them from metrics.jsonl alone.
    script = [sys.executable, "scripts/plot_diagnostics.py", str(tmp_path), "--out", str(tmp_path / "d.png")]
    printed = subprocess.run(script, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout
    assert "D/real_positive: step 1 " in printed and "attn_share/G/attn16" in printed
    assert Image.open(tmp_path / "d.png").size[0] > 1000
    assert [row["step"] for row in rows if "score/mirror_consistency" in row] == [0, 2]


def test_disabled_logger_writes_only_files(tiny_cfg, tmp_path):
    train(tiny_cfg("train.steps=2", "logger.image_every=1"), tmp_path)  # tiny_cfg has logger.mode=disabled
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_id.txt").exists()
    names = sorted(p.name for p in (tmp_path / "attention").iterdir())
    assert names == sorted([f"step_000000{s}{kind}" for s in range(3) for kind in ("_D_attn16.png", "_G_attn16.png", ".html")])
    assert (tmp_path / "samples" / "step_0000001_G.png").is_file()


def test_unknown_logger_mode(tiny_cfg, tmp_path):
    with pytest.raises(UserError, match="unknown logger.mode 'onlne'"):
        train(tiny_cfg("logger.mode=onlne"), tmp_path)


@pytest.mark.parametrize("resolution, attn", [(32, (16,)), (64, (32, 16))])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_attention_figures_for_every_layer(resolution, attn, num_classes):
    torch.manual_seed(0)
    G = Generator(z_dim=16, ch=8, resolution=resolution, attn_resolutions=attn, num_classes=num_classes)
    D = Discriminator(ch=8, resolution=resolution, attn_resolutions=attn, num_classes=num_classes)
    z, y = torch.randn(2, 16), (torch.tensor([0, 2]) if num_classes else None)
    images = G.eval()(z, y)
    queries = to_pixels(DEFAULT_QUERIES, resolution)
    G.train()
    figures = render_attention(G, lambda: G(z, y), images, queries, "G")
    figures |= render_attention(D, lambda: D(images, y), images, queries, "D")
    assert set(figures) == {f"{net}_attn{a}" for net in "GD" for a in attn}
    assert G.training and D.training  # put back as they were
    for figure in figures.values():
        assert figure.size == ((len(queries) + 1) * 96, 2 * 96 + 16)  # image + one map per query, a row per image


def test_overlay_shows_where_attention_goes():
    image = torch.zeros(3, 8, 8)
    heat = torch.full((4, 4), 0.2 / 15)
    heat[1, 3] = 0.8  # most weight on one key cell
    out = overlay(image, heat, 32)
    brightness = out.sum(0)
    assert brightness[4:12, 24:32].mean() > 4 * brightness[20:, :16].mean()  # the hot cell is bright, the rest dim
    flat = overlay(image, torch.full((4, 4), 1 / 16), 32)
    assert flat.sum(0).max() < 0.6 * out.sum(0).max()  # a flat map stays dim instead of saturating
    assert torch.equal(colormap(torch.tensor([0.0])), torch.zeros(3, 1))


def test_query_points_in_fractions_or_pixels():
    assert to_pixels([(0.5, 0.25), (3, 31)], 32) == [(16, 8), (3, 31)]
    # From a config, pixel 1 arrives as the float 1.0: still pixel 1, not the fraction 1.
    cfg = OmegaConf.structured(LoggerConfig(attn_queries=[[1, 5], [0.5, 0.5]]))
    assert to_pixels(cfg.attn_queries, 32) == [(1, 5), (16, 16)]
    with pytest.raises(UserError, match="outside the 32x32 image"):
        to_pixels([(40, 2)], 32)


def test_dead_attention_warns_once(caplog):
    scalars = {"gamma/G/attn16": 0.0, "gamma/D/attn16": 0.01}
    with caplog.at_level(logging.WARNING, logger="sagan"):
        assert warn_dead_attention(scalars, step=10, after=20, warned=set()) == set()
        warned = warn_dead_attention(scalars, step=20, after=20, warned=set())
        warn_dead_attention(scalars, step=30, after=20, warned=warned)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("gamma/G/attn16 is still exactly 0 after 20 steps")


def test_sagan_attention_from_checkpoint(tiny_cfg, tmp_path):
    train(tiny_cfg("train.steps=1", "model.conditional=true", "model.g_attn=[8,16]"), tmp_path / "run")
    args = parse_args(AttentionArgs, [f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", "n=3", f"out={tmp_path / 'maps'}"])
    paths = render_checkpoint(args)
    assert sorted(p.name for p in paths) == ["D_attn16.png", "G_attn16.png", "G_attn8.png"]
    assert Image.open(paths[0]).size == (5 * 96, 3 * 96 + 16)


@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"not a checkpoint", "truncated or corrupt")])
def test_sagan_attention_fails_clearly(tmp_path, content, message, monkeypatch, capsys):
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    code, _, stderr = run_command("attention", [f"ckpt={path}"], monkeypatch, capsys)
    assert code == 1
    assert stderr.startswith("error: ") and message in stderr and len(stderr.splitlines()) == 1


def test_sagan_attention_rejects_foreign_checkpoint(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a sagan checkpoint"):
        render_checkpoint(parse_args(AttentionArgs, [f"ckpt={tmp_path / 'foreign.pt'}"]))
