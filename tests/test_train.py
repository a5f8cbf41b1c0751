import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY, compose_config, run_command
from sagan.checkpoint import load_checkpoint
from sagan.data.batch_stream import BatchStream
from sagan.data.demo import MirrorShapes
from sagan.models import build_models
from sagan.training.loop import train
from sagan.training.run import Run
from sagan.training.step import Trainer
from sagan.utils.processes import SINGLE
from sagan.utils.errors import UserError

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(experiment):
    cfg = compose_config(f"experiment={experiment}", "model.g_ch=8", "model.d_ch=8")
    assert cfg.experiment == experiment
    G, D = build_models(cfg.model, num_classes=3 if cfg.model.conditional else 0)
    assert G.resolution == D.resolution == cfg.model.resolution


def test_cifar10_recipes_are_the_paper_and_studiogan():
    paper = compose_config("experiment=cifar10").optim
    assert (paper.lr_g, paper.lr_d, paper.beta1, paper.beta2, paper.n_dis) == (1e-4, 4e-4, 0.0, 0.9, 1)
    studio = compose_config("experiment=cifar10_studiogan")
    o = studio.optim
    assert (o.lr_g, o.lr_d, o.beta1, o.beta2, o.eps, o.n_dis) == (2e-4, 2e-4, 0.5, 0.999, 1e-6, 5)
    assert (o.ema_decay, o.ema_bn, studio.model.init, studio.train.batch_size) == (0.0, "copy", "orthogonal", 64)
    assert (studio.model.name, o.d_calls, o.d_sn_in_g_step, o.g_bn_stats_in_d_step) == ("studiogan32", 2, True, False)


def test_no_ema_recipe_evaluates_g_itself():
    """ema_decay=0 with ema_bn=copy (the StudioGAN recipe): G_ema is exactly G, running statistics included."""
    cfg = compose_config(*TINY, "optim.ema_decay=0", "optim.ema_bn=copy", "optim.ema_start=0")
    G, D = build_models(cfg.model, num_classes=0)
    trainer = Trainer(G, D, ema_decay=0.0, ema_start=0, ema_bn="copy")
    stream = BatchStream(MirrorShapes(size=16, resolution=32, labels=False), batch_size=8, seed=0)
    for _ in range(2):
        trainer.train_step(stream)
    G_state, ema_state = trainer.G.state_dict(), trainer.ema_generator().state_dict()
    assert all(torch.equal(G_state[k], v) for k, v in ema_state.items())


@pytest.mark.parametrize("model", ["sagan32", "sagan64", "sagan128", "sagan256", "studiogan32", "studiogan64", "studiogan128"])
def test_every_model_preset_composes(model):
    cfg = compose_config(f"model={model}")
    assert cfg.model.name == model and cfg.model.resolution == int(model.removeprefix("studiogan").removeprefix("sagan"))
    G, D = build_models(compose_config(f"model={model}", "model.g_ch=8", "model.d_ch=8").model, num_classes=3)
    assert G.resolution == D.resolution == cfg.model.resolution


def test_smoke_run_writes_checkpoint_and_samples(tiny_cfg, tmp_path):
    result = train(tiny_cfg("train.steps=3", "logger.image_every=2"), tmp_path)
    assert result["step"] == 3
    assert math.isfinite(result["d_loss"]) and math.isfinite(result["g_loss"])
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "checkpoints" / "step_0000003.pt").is_file()
    assert (tmp_path / "config.yaml").is_file()
    grids = sorted(p.name for p in (tmp_path / "samples").glob("step_???????.png"))  # G_ema grids
    assert grids == ["step_0000000.png", "step_0000002.png", "step_0000003.png"]
    assert (tmp_path / "samples" / "step_0000003_G.png").is_file()
    assert 0 <= result["score/mirror_consistency"] <= 1  # the demo data reports its score
    assert Image.open(tmp_path / "samples" / grids[0]).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2x2 grid, padding 2
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["trainer"]["step"] == 3 and state["config"]["train"]["steps"] == 3


@pytest.mark.slow
def test_compiled_run_trains_like_the_eager_one(tiny_cfg, tmp_path):
    """perf.compile=true on the CPU, through the config: two steps (about a minute of compilation) that agree with
    eager PyTorch up to the rounding of fused kernels."""
    common = ["train.steps=2", "perf.precision=fp32", "logger.image_every=100"]
    train(tiny_cfg(*common), tmp_path / "eager")
    train(tiny_cfg(*common, "perf.compile=true"), tmp_path / "compiled")
    eager, compiled = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt")["trainer"] for r in ("eager", "compiled"))
    assert compiled["step"] == 2
    for k, v in eager["D"].items():
        torch.testing.assert_close(compiled["D"][k], v, rtol=1e-3, atol=1e-4, msg=k)


def test_keep_last_prunes_step_checkpoints(tiny_cfg, tmp_path):
    train(tiny_cfg("train.steps=4", "train.ckpt_every=1", "train.keep_last=2"), tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.pt", "step_0000003.pt", "step_0000004.pt"]


def assert_same_state(a: dict, b: dict, where: str = "") -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        if isinstance(a[k], dict):
            assert_same_state(a[k], b[k], f"{where}.{k}")
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{where}.{k} differs"
        else:
            assert a[k] == b[k], f"{where}.{k} differs"


@pytest.mark.parametrize(
    "extra",
    [
        ["model.conditional=true", "optim.n_dis=2"],  # in-memory data, labels, two D steps per G step
        ["data.in_memory=false", "data.hflip=true"],  # DataLoader path with flips
    ],
    ids=["in_memory_conditional", "dataloader_hflip"],
)
def test_resume_is_exact(tiny_cfg, tmp_path, extra):
    """N steps, stop, resume for N more == 2N steps straight, bit for bit (G, D, G_ema, optimizers, RNG)."""
    # EMA averages across the restart; 32 images = 4 batches per epoch, so both variants restart mid-epoch.
    common = ["optim.ema_start=2", "optim.ema_decay=0.9", "data.size=32", *extra]
    train(tiny_cfg("train.steps=6", *common), tmp_path / "straight")
    train(tiny_cfg("train.steps=3", *common), tmp_path / "split")
    train(tiny_cfg("train.steps=6", "train.resume=auto", *common), tmp_path / "split")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert straight["trainer"]["step"] == split["trainer"]["step"] == 6
    assert straight["data"] == split["data"]
    assert_same_state(straight["trainer"], split["trainer"])
    # Sanity: the state did move, so the comparison is not between two untouched models.
    first = load_checkpoint(tmp_path / "split" / "checkpoints" / "step_0000003.pt")
    assert not torch.equal(first["trainer"]["G"]["linear.bias"], split["trainer"]["G"]["linear.bias"])


def test_resume_from_path_and_auto_without_checkpoint(tiny_cfg, tmp_path):
    train(tiny_cfg("train.steps=2"), tmp_path / "a")
    result = train(tiny_cfg("train.steps=3", f"train.resume={tmp_path / 'a' / 'checkpoints' / 'step_0000002.pt'}"), tmp_path / "b")
    assert result["step"] == 3
    assert train(tiny_cfg("train.steps=1", "train.resume=auto"), tmp_path / "c")["step"] == 1


def test_resume_obeys_the_current_optimizer_settings(tiny_cfg, tmp_path, caplog):
    train(tiny_cfg("train.steps=2"), tmp_path)
    caplog.set_level("INFO", logger="sagan")
    train(tiny_cfg("train.steps=3", "train.resume=auto", "optim.lr_d=2e-4", "optim.beta2=0.99", "optim.eps=1e-6"), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["trainer"]
    d, g = state["opt_d"]["param_groups"][0], state["opt_g"]["param_groups"][0]
    assert d["lr"] == 2e-4 and g["lr"] == 2e-4  # the demo's lr_g is 2e-4 too
    assert tuple(d["betas"]) == tuple(g["betas"]) == (0.0, 0.99) and d["eps"] == g["eps"] == 1e-6
    assert "D lr 0.0004 -> 0.0002" in caplog.text and "G betas (0.0, 0.9) -> (0.0, 0.99)" in caplog.text
    assert "G lr" not in caplog.text  # unchanged settings are not reported


def test_metrics_log_has_no_duplicate_steps_after_a_resume(tiny_cfg, tmp_path):
    import json

    train(tiny_cfg("train.steps=3", "train.ckpt_every=2"), tmp_path)  # checkpoints at 2 and 3, rows for 0..3
    # Continue from step 2 (as after a crash between the checkpoint and the end): step 3 is trained and logged again.
    train(tiny_cfg("train.steps=4", f"train.resume={tmp_path / 'checkpoints' / 'step_0000002.pt'}"), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["step"] for r in rows if "loss/d" in r]
    assert losses == [1, 2, 3, 4]


def test_run_log_names_the_data(tiny_cfg, tmp_path, caplog):
    caplog.set_level("INFO", logger="sagan")
    train(tiny_cfg("train.steps=1"), tmp_path)
    assert "data: demo (generated mirror-symmetric shapes), 64 images, unlabeled, 32 px" in caplog.text


def test_resume_with_another_architecture_names_the_difference(tiny_cfg, tmp_path):
    train(tiny_cfg("train.steps=1"), tmp_path)
    with pytest.raises(UserError, match=r"another architecture: model.g_ch: 4 in the checkpoint, 8 now"):
        train(tiny_cfg("train.steps=2", "train.resume=auto", "model.g_ch=8"), tmp_path)


def test_conditional_needs_labels(tiny_cfg, tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(8):
        Image.new("RGB", (40, 40), (i * 30, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    with pytest.raises(UserError, match="model.conditional=true needs labelled data"):
        train(tiny_cfg("data=folder", f"data.root={tmp_path / 'imgs'}", "data.size=null", "model.conditional=true"), tmp_path / "run")


def test_freeze_d_fine_tunes_with_d_first_blocks_fixed(tiny_cfg, tmp_path):
    train(tiny_cfg("train.steps=2"), tmp_path / "source")
    source = tmp_path / "source" / "checkpoints" / "last.pt"
    given = load_checkpoint(source)["trainer"]
    start = given["D"]
    # The new run starts at step 0 from exactly the given G, D and G_ema, with fresh optimizers.
    run = Run(tiny_cfg(f"train.init_from={source}", "train.freeze_d=2"), tmp_path / "ft0", SINGLE, torch.device("cpu"))
    assert run.trainer.step == 0 and not run.trainer.opt.d.state
    for name, net in (("G", run.trainer.G), ("D", run.trainer.D), ("G_ema", run.trainer.G_ema)):
        assert all(torch.equal(v, given[name][k]) for k, v in net.state_dict().items()), name
    train(tiny_cfg("train.steps=3", f"train.init_from={source}", "train.freeze_d=2"), tmp_path / "ft")
    tuned = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.pt")["trainer"]["D"]
    # The demo's D: block0, attn16 (after block0, at 16x16), block1, block2, block3, then the head. With k=2, block0,
    # the attention layer after it and block1 keep their weights; their spectral-norm u still follows them.
    frozen = ("blocks.block0.", "blocks.attn16.", "blocks.block1.")
    weights = [k for k in start if not k.endswith(("_u", "_v"))]
    kept = {k for k in weights if torch.equal(start[k], tuned[k])}
    assert {k for k in weights if k.startswith(frozen)} <= kept
    assert any(k.startswith("blocks.block2.") for k in weights) and not any(k.startswith(("blocks.block2.", "blocks.block3.", "linear")) for k in kept)
    with pytest.raises(UserError, match="train.freeze_d=5, but this D has 4 blocks: choose 0 to 4"):
        train(tiny_cfg("train.steps=1", f"train.init_from={source}", "train.freeze_d=5"), tmp_path / "ft5")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.freeze_d=-1", "train.freeze_d must be >= 0"),
        ("train.freeze_d=1", "set train.init_from=<checkpoint>"),
        ("train.batch_size=0", "train.batch_size must be > 0"),
        ("optim.lr_d=-1", "learning rates must be > 0"),
        ("model.g_attn=[64]", "the generator has no feature map of size [64]"),
    ],
)
def test_impossible_values_fail_before_work(tiny_cfg, tmp_path, override, message):
    with pytest.raises(UserError) as error:
        train(tiny_cfg(override), tmp_path)
    assert message in str(error.value)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["optim.lr_dd=1e-4"], "lr_dd"),
        (["data=folder"], "data.root"),
        (["data=folder", "data.root=/no/such/folder"], "/no/such/folder"),
        (["model=sagan48"], "sagan48"),
        (["train.steps=abc"], "could not be converted to Integer"),
        (["train.batch_size=0"], "train.batch_size must be > 0"),
    ],
    ids=["misspelt_key", "missing_root", "nonexistent_root", "unknown_preset", "wrong_type", "impossible_value"],
)
def test_cli_bad_input_is_one_line(tmp_path, args, needle, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_command("train", [*args, "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], stderr


@pytest.mark.slow
def test_cli_trains_into_hydra_run_dir(tmp_path):
    """The console script itself, in its own process: Hydra writes its record into the named run directory."""
    args = [
        "experiment=demo", "model.g_ch=4", "model.d_ch=4", "data.size=16",
        "train.batch_size=4", "train.steps=2", "logger.num_samples=4", "logger.mode=disabled",
    ]  # fmt: skip
    command = [str(Path(sys.executable).parent / "sagan-train"), *args, f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "run" / "samples" / "step_0000002.png").is_file()
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
