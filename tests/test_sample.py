import math
import numpy as np
import pytest
import torch
from PIL import Image

from sagan.cli import parse_args
from sagan.models import Generator
from sagan.sample import SampleArgs, sample
from sagan.evaluation.sampling import draw, latents


@pytest.fixture(scope="module")
def conditional_ckpt(tmp_path_factory):
    from conftest import compose_config
    from sagan.training.loop import train

    run = tmp_path_factory.mktemp("run")
    overrides = ["experiment=demo", "model.g_ch=4", "model.d_ch=4", "data.size=16", "train.batch_size=4",
                 "train.steps=1", "logger.num_samples=4", "logger.attn_images=1", "logger.mode=disabled",
                 "model.conditional=true"]  # fmt: skip
    train(compose_config(*overrides), run)
    return run / "checkpoints" / "last.pt"


def args(*argv):
    return parse_args(SampleArgs, list(argv))


def test_same_seed_same_images_other_seed_other_images():
    G = Generator(z_dim=16, ch=4, resolution=32, attn_resolutions=(16,), num_classes=3).eval()
    a, ya = draw(G, 10, seed=3, choice=None, truncation=None, batch=4)
    b, yb = draw(G, 10, seed=3, choice=None, truncation=None, batch=7)  # batching does not matter
    c, _ = draw(G, 10, seed=4, choice=None, truncation=None, batch=4)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == (10, 3, 32, 32)


def test_class_choices_and_truncation():
    G = Generator(z_dim=16, ch=4, resolution=32, attn_resolutions=(), num_classes=3).eval()
    assert draw(G, 5, seed=0, choice="2", truncation=None, batch=8)[1].tolist() == [2] * 5
    assert draw(G, 5, seed=0, choice="all", truncation=None, batch=8)[1].tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match=r"an index in \[0, 3\)"):
        draw(G, 5, seed=0, choice="3", truncation=None, batch=8)
    # Truncation bounds every latent: spy on the z the generator receives.
    seen = []
    G.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    draw(G, 50, seed=0, choice=None, truncation=0.5, batch=64)
    assert seen[0].abs().max() <= 0.5 and seen[0].std() > 0.1


def test_formats(conditional_ckpt, tmp_path):
    sample(args(f"ckpt={conditional_ckpt}", "n=5", f"out={tmp_path / 'png'}", "class_=all"))
    files = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert files == [f"{i:06d}.png" for i in range(5)] and Image.open(tmp_path / "png" / files[0]).size == (32, 32)
    sample(args(f"ckpt={conditional_ckpt}", "n=5", f"out={tmp_path / 'npz'}", "format=npz", "class_=1"))
    data = np.load(tmp_path / "npz" / "samples.npz")
    assert data["images"].shape == (5, 32, 32, 3) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [1] * 5
    # The PNG files hold exactly the npz pixels for the same seed and labels.
    sample(args(f"ckpt={conditional_ckpt}", "n=5", f"out={tmp_path / 'png1'}", "class_=1"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png1" / "000003.png")), data["images"][3])
    grid = sample(args(f"ckpt={conditional_ckpt}", "n=4", f"out={tmp_path / 'grid'}", "format=grid"))
    assert Image.open(grid).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    with pytest.raises(ValueError, match="unknown format 'gif'"):
        sample(args(f"ckpt={conditional_ckpt}", "format=gif"))


@pytest.mark.slow
def test_cli_class_argument(conditional_ckpt, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sagan.sample", f"ckpt={conditional_ckpt}", "n=3", f"out={tmp_path}", "class=2", "format=npz"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "samples.npz")["labels"].tolist() == [2, 2, 2]
    bad = subprocess.run([*cmd[:-2], "class=7"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: class must be 'all' or an index")


def test_the_first_images_of_a_larger_sample_are_the_images_of_a_smaller_one():
    """Latents and labels are drawn in order from their own generators: `sagan-sample n=8` shows the first 8 images
    `sagan-fid n=50000` evaluates, with the same classes."""
    G = Generator(z_dim=16, ch=4, resolution=32, attn_resolutions=(), num_classes=10).eval()
    small, y_small = draw(G, 8, seed=5)
    large, y_large = draw(G, 64, seed=5)
    assert torch.equal(small, large[:8]) and torch.equal(y_small, y_large[:8])
    z_small, _ = latents(8, G, seed=5, truncation=0.5)
    z_large, _ = latents(64, G, seed=5, truncation=0.5)
    assert torch.equal(z_small, z_large[:8])
    # Truncated N(0, 1) on [-0.5, 0.5]: inside the bounds, with the variance 1 - 2 t phi(t) / (2 Phi(t) - 1).
    z, _ = latents(4000, G, seed=1, truncation=0.5)
    t = 0.5
    phi, Phi = math.exp(-t * t / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(t / math.sqrt(2)))
    assert z.abs().max() <= t and abs(z.mean()) < 0.01
    assert z.var().item() == pytest.approx(1 - 2 * t * phi / (2 * Phi - 1), rel=0.02)
