"""DiffAugment: each operation does what the paper says, gradients pass through, training uses it where it should,
resumes stay exact, and data.fraction picks one fixed subset."""

import pytest
import torch

from sagan.checkpoint import load_checkpoint
from sagan.data.datasets import DataFraction, build_dataset
from sagan.training.diffaugment import DiffAugment, brightness, contrast, cutout, saturation, translation
from sagan.models import Discriminator, Generator
from sagan.training.step import Trainer
from sagan.training.loop import train
from sagan.utils.errors import UserError


def constant(value: float):
    """A stand-in for the random source that always draws `value`."""
    return lambda batch, *shape: torch.full((batch, *shape), value)


def seeded(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda batch, *shape: torch.rand(batch, *shape, generator=g)


def test_colour_operations_stay_within_the_papers_ranges():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    # The extremes of each draw: brightness -0.5 / +0.5, saturation x0 / x2, contrast x0.5 / x1.5.
    assert torch.allclose(brightness(x, constant(0.0)), x - 0.5) and torch.allclose(brightness(x, constant(1.0)), x + 0.5)
    grey = x.mean(dim=1, keepdim=True).expand_as(x)
    assert torch.allclose(saturation(x, constant(0.0)), grey)
    assert torch.allclose(saturation(x, constant(1.0)), 2 * x - grey, atol=1e-6)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(contrast(x, constant(0.0)), (x - mean) * 0.5 + mean, atol=1e-6)
    assert torch.allclose(contrast(x, constant(1.0)), (x - mean) * 1.5 + mean, atol=1e-6)
    # Random draws, recovered per image: every factor lies in its range, and they differ between images.
    shift = (brightness(x, seeded(1)) - x)[:, 0, 0, 0]
    assert shift.min() >= -0.5 and shift.max() < 0.5 and shift.std() > 0.2
    factor = ((saturation(x, seeded(2)) - grey) / (x - grey))[:, 0, 0, 0]
    assert factor.min() >= -1e-4 and factor.max() < 2 + 1e-4 and factor.std() > 0.4
    factor = ((contrast(x, seeded(3)) - mean) / (x - mean))[:, 0, 0, 0]
    assert factor.min() >= 0.5 - 1e-4 and factor.max() < 1.5 + 1e-4


def test_translation_shifts_by_whole_pixels_with_zero_fill():
    x = torch.rand(200, 3, 32, 32) + 1  # no zeros of its own
    out = translation(x, seeded(4))
    reach, seen = 4, set()  # 1/8 of 32 pixels
    for image, moved in zip(x, out):
        found = []
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                expected = torch.zeros_like(image)
                ys, xs = slice(max(dy, 0), 32 + min(dy, 0)), slice(max(dx, 0), 32 + min(dx, 0))
                ys0, xs0 = slice(max(-dy, 0), 32 + min(-dy, 0)), slice(max(-dx, 0), 32 + min(-dx, 0))
                expected[:, ys, xs] = image[:, ys0, xs0]
                if torch.equal(moved, expected):
                    found.append((dy, dx))
        assert len(found) == 1
        seen.add(found[0])
    assert len(seen) > 40  # of the 81 possible shifts: they are drawn per image
    assert {dy for dy, _ in seen} == set(range(-reach, reach + 1))


def test_cutout_zeroes_a_square_of_half_the_side():
    x = torch.ones(300, 3, 32, 32)
    out = cutout(x, seeded(5))
    sides = []
    for image in out:
        zero = image[0] == 0
        assert torch.equal(zero, image[1] == 0) and torch.equal(zero, image[2] == 0)  # all channels alike
        rows, cols = zero.any(dim=1).nonzero().flatten(), zero.any(dim=0).nonzero().flatten()
        assert 0 < len(rows) <= 16 and 0 < len(cols) <= 16
        assert zero.sum() == len(rows) * len(cols)  # one axis-aligned rectangle ...
        assert torch.equal(rows, torch.arange(rows[0], rows[-1] + 1))
        inner_r = 0 < rows[0] and rows[-1] < 31
        inner_c = 0 < cols[0] and cols[-1] < 31
        if inner_r and inner_c:  # ... that is the whole 16x16 square where it does not touch the border
            sides.append((len(rows), len(cols)))
    assert sides and set(sides) == {(16, 16)}
    assert torch.equal(x, torch.ones_like(x))  # the input is left alone


def test_gradients_pass_through_every_operation():
    x = (torch.rand(8, 3, 32, 32) * 2 - 1).requires_grad_()
    augment = DiffAugment(["color", "translation", "cutout"], device=torch.device("cpu"), seed=0)
    out = augment(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).float().mean() > 0.3
    assert not torch.equal(out.detach(), x.detach())


def tiny_trainer(augment: DiffAugment | None) -> Trainer:
    torch.manual_seed(0)
    G = Generator(z_dim=16, ch=4, resolution=32, attn_resolutions=())
    D = Discriminator(ch=4, resolution=32, attn_resolutions=())
    return Trainer(G, D, ema_start=0, augment=augment)


def d_inputs(trainer: Trainer, real: torch.Tensor) -> torch.Tensor:
    seen = []
    hook = trainer.D.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        trainer.d_step(real, None)
    finally:
        hook.remove()
    return seen[0]


def test_off_d_sees_the_real_images_unchanged_on_it_sees_them_augmented():
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(d_inputs(tiny_trainer(None), real)[:4], real)
    augment = DiffAugment(["translation", "cutout"], device=torch.device("cpu"), seed=0)
    seen = d_inputs(tiny_trainer(augment), real)[:4]
    assert not torch.equal(seen, real) and (seen == 0).any()


def test_g_learns_through_the_augmentation():
    augment = DiffAugment(["color", "translation", "cutout"], device=torch.device("cpu"), seed=0)
    trainer = tiny_trainer(augment)
    calls = []
    original = augment.__call__
    trainer.augment = lambda x: calls.append(x.requires_grad) or original(x)
    trainer.g_step(4)
    assert calls == [True]  # the G step augments G's images, with their graph
    grads = [p.grad for p in trainer.G.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_resume_is_exact_with_augmentation(tiny_cfg, tmp_path):
    common = ["data.augment=diffaugment", "optim.ema_start=2", "data.size=32"]
    train(tiny_cfg("train.steps=4", *common), tmp_path / "straight")
    train(tiny_cfg("train.steps=2", *common), tmp_path / "split")
    train(tiny_cfg("train.steps=4", "train.resume=auto", *common), tmp_path / "split")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["trainer"]
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["trainer"]
    assert torch.equal(straight["augment"]["rng"], split["augment"]["rng"])
    for name in straight["D"]:
        assert torch.equal(straight["D"][name], split["D"][name]), name
    plain = load_checkpoint(tmp_path / "split" / "checkpoints" / "step_0000002.pt")["trainer"]
    assert not torch.equal(plain["augment"]["rng"], split["augment"]["rng"])  # the stream moved on
    train(tiny_cfg("train.steps=4", "data.size=32", "optim.ema_start=2"), tmp_path / "off")
    off = load_checkpoint(tmp_path / "off" / "checkpoints" / "last.pt")["trainer"]
    assert "augment" not in off and not torch.equal(off["D"]["linear.bias"], straight["D"]["linear.bias"])


def test_data_fraction_is_one_fixed_subset_with_labels():
    whole = build_dataset("demo", root=None, resolution=32, size=200, seed=0, labels=True)
    tenth, again = DataFraction(whole, 0.1), DataFraction(whole, 0.1)
    assert len(tenth) == 20 and tenth.indices == again.indices and len(set(tenth.indices)) == 20
    assert tenth.indices != list(range(20))  # a random subset, not the first images
    image, label = tenth[3]
    assert torch.equal(image, whole[tenth.indices[3]][0]) and label == whole[tenth.indices[3]][1]
    assert tenth.num_classes == whole.num_classes > 0
    assert "a seeded 0.1 of it: 20 of 200 images" in tenth.describe("demo")
    with pytest.raises(UserError, match=r"data.fraction must be in \(0, 1\]"):
        DataFraction(whole, 0)


def test_training_on_a_fraction_logs_it(tiny_cfg, tmp_path, caplog):
    caplog.set_level("INFO", logger="sagan")
    train(tiny_cfg("train.steps=1", "data.fraction=0.25"), tmp_path)
    assert "16 of 64 images" in caplog.text


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.augment=ada", "unknown data.augment 'ada'"),
        ("data.augment_policy=[color,flip]", "is not a non-empty list of color, translation, cutout"),
        ("data.fraction=1.5", r"data.fraction must be in \(0, 1\]"),
    ],
)
def test_bad_augment_settings_fail_clearly(tiny_cfg, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        train(tiny_cfg("train.steps=1", override), tmp_path)


def test_every_rank_augments_its_own_rows_of_one_draw():
    """Two ranks with the same seed draw for both halves of the batch and use their own: together they augment the
    whole batch exactly as one process does, and each keeps the same random state."""
    from sagan.utils.processes import World

    x = torch.rand(8, 3, 16, 16) * 2 - 1
    one = DiffAugment(["color", "translation", "cutout"], device=torch.device("cpu"), seed=3)
    ranks = [DiffAugment(["color", "translation", "cutout"], device=torch.device("cpu"), seed=3, world=World(rank=r, size=2)) for r in (0, 1)]
    whole = one(x)
    halves = [augment(x[4 * r : 4 * r + 4]) for r, augment in enumerate(ranks)]
    assert torch.equal(torch.cat(halves), whole)
    assert torch.equal(ranks[0].rng.get_state(), ranks[1].rng.get_state())
