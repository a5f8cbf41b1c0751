import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import run_command
from sagan.cli import parse_args
from sagan.data.images import to_uint8
from sagan.evaluation.sampling import draw, interpolations, latents, slerp
from sagan.models import Generator
from sagan.sample import SampleArgs, sample
from sagan.utils.errors import UserError


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
    with pytest.raises(UserError, match=r"an index in \[0, 3\)"):
        draw(G, 5, seed=0, choice="3", truncation=None, batch=8)
    # Truncation bounds every latent: spy on the z the generator receives.
    seen = []
    G.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    draw(G, 50, seed=0, choice=None, truncation=0.5, batch=64)
    assert seen[0].abs().max() <= 0.5 and seen[0].std() > 0.1


def test_formats(trained, tmp_path):
    sample(args(f"ckpt={trained['cond']}", "n=5", f"out={tmp_path / 'png'}", "class_=all"))
    files = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert files == [f"{i:06d}.png" for i in range(5)] and Image.open(tmp_path / "png" / files[0]).size == (32, 32)
    sample(args(f"ckpt={trained['cond']}", "n=5", f"out={tmp_path / 'npz'}", "format=npz", "class_=1"))
    data = np.load(tmp_path / "npz" / "samples.npz")
    assert data["images"].shape == (5, 32, 32, 3) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [1] * 5
    # The PNG files hold exactly the npz pixels for the same seed and labels.
    sample(args(f"ckpt={trained['cond']}", "n=5", f"out={tmp_path / 'png1'}", "class_=1"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png1" / "000003.png")), data["images"][3])
    grid = sample(args(f"ckpt={trained['cond']}", "n=4", f"out={tmp_path / 'grid'}", "format=grid"))
    assert Image.open(grid).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    with pytest.raises(UserError, match="unknown format 'gif'"):
        sample(args(f"ckpt={trained['cond']}", "format=gif"))


def test_cli_class_argument(trained, tmp_path, monkeypatch, capsys):
    argv = [f"ckpt={trained['cond']}", "n=3", f"out={tmp_path}", "format=npz"]
    code, _, stderr = run_command("sample", [*argv, "class=2"], monkeypatch, capsys)
    assert code == 0, stderr
    assert np.load(tmp_path / "samples.npz")["labels"].tolist() == [2, 2, 2]
    code, _, stderr = run_command("sample", [*argv, "class=7"], monkeypatch, capsys)
    assert code == 1 and stderr.startswith("error: class must be 'all' or an index")


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


def test_slerp_keeps_to_the_sphere_between_its_ends():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    b = b / b.norm(dim=1, keepdim=True) * a.norm(dim=1, keepdim=True)  # same lengths: the path keeps that length
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert path.shape == (3, 5, 16)
    torch.testing.assert_close(path[:, 0], a)
    torch.testing.assert_close(path[:, -1], b)
    torch.testing.assert_close(path.norm(dim=2), a.norm(dim=1, keepdim=True).expand(3, 5))
    # Equal angular steps: the angle between neighbours is a quarter of the whole angle, each time.
    cos = F.cosine_similarity(path[:, :-1], path[:, 1:], dim=2)
    whole = torch.acos(F.cosine_similarity(a, b, dim=1))
    torch.testing.assert_close(torch.acos(cos.clamp(-1, 1)), (whole / 4)[:, None].expand(3, 4), atol=1e-4, rtol=1e-4)
    # Parallel latents: the straight line, no division by sin(0).
    line = slerp(a[:1], 2 * a[:1], torch.tensor([0.5]))
    torch.testing.assert_close(line[0, 0], 1.5 * a[0])


def near(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same uint8 images up to one level: other batch sizes may round the last float bit differently."""
    return (a.int() - b.int()).abs().max().item() <= 1


def test_interpolations_run_between_seeded_draws():
    G = Generator(z_dim=16, ch=4, resolution=32, attn_resolutions=(16,), num_classes=3).eval()
    rows = interpolations(G, 2, steps=4, seed=7, kind="latent", choice="1")
    assert rows.shape == (2, 4, 3, 32, 32) and rows.dtype == torch.uint8
    ends, _ = draw(G, 4, seed=7, choice="1")  # latents 0..3 of the seed: row i runs from 2i to 2i+1
    assert near(rows[:, 0], ends[0::2]) and near(rows[:, -1], ends[1::2])
    assert not torch.equal(rows[:, 1], rows[:, 0])
    # From one class to another at one latent: the ends are the hard-labelled images of two different classes.
    for p in G.parameters():  # away from the initial class tables (gains 1, biases 0), so classes differ
        p.data.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    across = interpolations(G, 3, steps=3, seed=2, kind="class")
    z, first = latents(3, G, seed=2)
    with torch.no_grad():
        by_class = [to_uint8(G(z, torch.full((3,), c))) for c in range(3)]
    for i in range(3):
        assert near(across[i, 0], by_class[first[i]][i]) and not near(across[i, 0], across[i, -1])
        assert any(near(across[i, -1], by_class[c][i]) for c in range(3) if c != first[i])
    with pytest.raises(UserError, match="interp=class needs a class-conditional generator"):
        interpolations(Generator(z_dim=16, ch=4, resolution=32, attn_resolutions=()).eval(), 1, steps=3, seed=0, kind="class")
    with pytest.raises(UserError, match="steps >= 2"):
        interpolations(G, 1, steps=1, seed=0)


def test_interp_format_writes_a_grid_and_a_looping_gif(trained, tmp_path):
    sample(args(f"ckpt={trained['cond']}", "n=3", "format=interp", "steps=5", f"out={tmp_path}", "interp=class"))
    assert Image.open(tmp_path / "interp.png").size == (5 * 32 + 6 * 2, 3 * 32 + 4 * 2)  # a row per interpolation
    gif = Image.open(tmp_path / "interp.gif")
    assert gif.n_frames == 2 * 5 - 2 and gif.info["loop"] == 0  # forth and back without repeating the ends
    assert gif.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 3 rows shown as a 2x2 grid
