"""sagan against PyTorch-StudioGAN's own code (tests/studiogan_peer.py builds it from SAGAN_STUDIOGAN_SRC, which
.ci/run sets; these tests are skipped without it and fail when it names another folder): its SAGAN networks with
weights moved away from their init, saved as StudioGAN saves them in each key layout it has released, imported by
`sagan-import`, compute the same images and D logits; one D step and one G step of `experiment=cifar10_studiogan` equal
its worker's steps.

Tolerances are derived in each test from rounding alone: 10x the difference between sagan's network (or step) in
fp32 and the same in fp64, tensor by tensor."""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import sagan
import studiogan_parity as parity
import studiogan_peer as peer
from conftest import compose_config, run_command
from sagan.checkpoint import CheckpointError, load_checkpoint, model_record, serialize
from sagan.config import ModelConfig, OptimConfig
from sagan.utils.processes import SINGLE
from sagan.import_weights import ImportArgs, import_run
from sagan.models import build_models
from sagan.models.discriminator import DBlock
from sagan.models.layers import GeneratorBatchNorm2d, SpectralNormFP32, apply_spectral_norm
from sagan.pretrained.studiogan_files import sha256
from sagan.training.run import Run
from sagan.utils.errors import UserError

try:
    SRC = peer.source()
except peer.WrongSource:
    SRC = None  # every test that needs it fails, naming the variable (needs_studiogan)


@pytest.fixture
def studiogan_src() -> Path:
    """StudioGAN's src/: the test is skipped when SAGAN_STUDIOGAN_SRC is unset, fails when it names another folder."""
    return peer.require()


needs_studiogan = pytest.mark.usefixtures("studiogan_src")
# StudioGAN's SAGAN configs at the three sizes it published: CIFAR-10 32 px, Tiny-ImageNet 64 px (its 2021 run: the
# 64 px config with 200 classes; today's src/configs has the same network as Baby_ImageNet), ImageNet 128 px.
CONFIGS = {
    32: (parity.CIFAR, {}),
    64: ("Baby_ImageNet/SAGAN.yaml", {"DATA.name": "Tiny_ImageNet", "DATA.num_classes": 200}),
    128: ("ImageNet/SAGAN-256.yaml", {}),
}


def test_sagan_defaults_are_the_official_codes():
    """The StudioGAN settings are opt-in: by default G's BatchNorms have eps 1e-5 and per-class tables, D's shortcut
    takes x (not relu(x)), the power iteration is PyTorch's (u first), and the step is the official one."""
    m, o = ModelConfig(), OptimConfig()
    assert (m.bn_eps, m.cond_bn, m.d_shortcut, m.sn_update, m.g_widths) == (1e-5, "tables", "x", "uv", None)
    assert (o.d_calls, o.d_sn_in_g_step, o.g_bn_stats_in_d_step) == (1, False, True)
    cfg = compose_config("experiment=cifar10")
    G, D = build_models(cfg.model, num_classes=10)
    bns = [m for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bn.eps == 1e-5 for bn in bns)
    assert all(isinstance(m.gain, torch.nn.Parameter) for m in G.modules() if isinstance(m, GeneratorBatchNorm2d))
    assert all(type(m) is SpectralNormFP32 for m in G.modules() if isinstance(m, SpectralNormFP32))
    # A block with an identity shortcut adds x itself: on an all-negative input relu(x) would be 0.
    block = next(b for b in D.modules() if isinstance(b, DBlock) and b.shortcut is None)
    x = -torch.rand(2, block.conv1.in_channels, 8, 8) - 1
    with torch.no_grad():
        main = block.conv2(torch.relu(block.conv1(torch.relu(x))))
        assert torch.allclose(block(x) - main, x, atol=1e-5)
    studio = compose_config("experiment=cifar10_studiogan")
    assert (studio.model.bn_eps, studio.model.cond_bn, studio.model.d_shortcut, studio.model.sn_update) == (
        1e-4, "linear", "relu", "vu")  # fmt: skip
    assert (studio.optim.d_calls, studio.optim.d_sn_in_g_step, studio.optim.g_bn_stats_in_d_step) == (2, True, False)


def test_v_first_power_iteration_is_the_hooks():
    """model.sn_update=vu runs PyTorch's old spectral_norm hook's power iteration: the same u, v and outputs, step
    after step, from the same u and v (and the default, u first, does not)."""
    torch.manual_seed(0)
    hooked = torch.nn.utils.spectral_norm(torch.nn.Linear(6, 5), eps=1e-12)
    x = torch.randn(3, 6)
    for update, same in (("vu", True), ("uv", False)):
        ours = torch.nn.Linear(6, 5)
        ours.weight.data.copy_(hooked.weight_orig.data), ours.bias.data.copy_(hooked.bias.data)
        apply_spectral_norm(ours, update=update)
        sn = ours.parametrizations.weight[0]
        reference = copy.deepcopy(hooked)
        sn._u.copy_(reference.weight_u), sn._v.copy_(reference.weight_v)
        steps = []  # each forward (train mode) runs one power iteration: outputs, u and v compared after every one
        for _ in range(3):
            outputs = torch.allclose(ours(x), reference(x), atol=1e-6)
            steps.append(outputs and torch.allclose(sn._u, reference.weight_u, atol=1e-6)
                         and torch.allclose(sn._v, reference.weight_v, atol=1e-6))  # fmt: skip
        assert steps == [same] * 3, (update, steps)


def test_a_wrong_studiogan_src_fails_naming_the_variable_and_an_unset_one_skips(tmp_path, monkeypatch):
    """A SAGAN_STUDIOGAN_SRC that names another folder (here StudioGAN's clone instead of its src/) fails in one line
    that names the variable and what it must name: a typo must not turn this suite into skips."""
    clone = tmp_path / "PyTorch-StudioGAN"
    (clone / "src" / "models").mkdir(parents=True)
    (clone / "src" / "configs").mkdir()
    (clone / "src" / "models" / "resnet.py").touch()

    def outcome() -> tuple[str, str]:  # what peer.require() does to a test: caught here, a skip cannot skip this one
        try:
            return "returned", str(peer.require())
        except (pytest.fail.Exception, pytest.skip.Exception) as e:
            return type(e).__name__, str(e)

    monkeypatch.setenv(peer.ENV, str(clone))
    kind, message = outcome()
    assert kind == "Failed", (kind, message)
    assert "\n" not in message and message.startswith(f"{peer.ENV}={clone} is not PyTorch-StudioGAN's src/ folder")
    assert "expected models/resnet.py and configs/ in it" in message and f"did you mean {clone / 'src'}?" in message
    with pytest.raises(peer.WrongSource):
        peer.source()
    monkeypatch.setenv(peer.ENV, str(clone / "src"))
    assert outcome() == ("returned", str(clone / "src"))
    monkeypatch.delenv(peer.ENV)
    assert peer.source() is None and outcome() == ("Skipped", f"StudioGAN's src/ not found: set {peer.ENV}")


@pytest.mark.slow
def test_the_suite_fails_on_a_wrong_studiogan_src_and_skips_without_one(tmp_path):
    """Through pytest itself: a test that needs StudioGAN errors (not skips) with a wrong folder, skips without one."""
    test = f"{Path(__file__).name}::test_a_run_with_g_ema_imports_all_three"
    outcomes = {}
    for name, value in (("wrong", str(tmp_path)), ("unset", None)):
        env = {k: v for k, v in os.environ.items() if k != peer.ENV} | ({peer.ENV: value} if value else {})
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test],
                                cwd=Path(__file__).parent, env=env, capture_output=True, text=True)  # fmt: skip
        outcomes[name] = (result.returncode, result.stdout)
    code, out = outcomes["wrong"]
    assert code == 1 and "1 error" in out and "skipped" not in out, out
    assert f"{peer.ENV}={tmp_path} is not PyTorch-StudioGAN's src/ folder" in out, out
    code, out = outcomes["unset"]
    assert code == 0 and "1 skipped" in out and f"StudioGAN's src/ not found: set {peer.ENV}" in out, out


# --- StudioGAN's networks, saved and imported --------------------------------------------------------------------


def assert_same_function(theirs_G, theirs_D, ckpt: Path, resolution: int, ema: bool = False) -> None:
    """sagan's networks of `ckpt` draw StudioGAN's images and give its D logits (both in eval mode), to rounding."""
    G, D = sagan.load(ckpt, net="G_ema" if ema else "G"), sagan.load(ckpt, net="D")
    gaps = parity.forward_gaps(theirs_G, theirs_D, G, D, resolution=resolution)
    assert all(g.tolerance < 1e-3 for g in gaps.values()), gaps  # a tolerance that small means something
    assert not parity.beyond(gaps)


@needs_studiogan
@pytest.mark.parametrize("layout", ["linear", "embed", "shared"])
def test_every_released_layout_imports_as_studiogans_function(layout, tmp_path):
    cfgs, G, D, _ = parity.studiogan(SRC)
    if layout != "linear":
        G = peer.with_layout(G, layout)
    peer.save_run(tmp_path / "run", G, D, None, cfgs, step=90000, best_fid=np.float64(14.009))
    G.eval(), D.eval()  # StudioGAN saves in its own evaluation mode (spectral norm layers in train mode)
    state = parity.imported(tmp_path / "run", tmp_path / "sagan.pt")
    assert_same_function(G, D, tmp_path / "sagan.pt", 32)
    source = state["imported"]
    assert source["step"] == state["trainer"]["step"] == 90000 and source["best_fid"] == pytest.approx(14.009)
    assert type(source["best_fid"]) is float  # numpy's float64 is not kept: the checkpoint holds plain types
    assert source["sha256"]["G"] == sha256(tmp_path / "run" / "model=G-best-weights-step=90000.pth")
    assert source["cond_bn_layout"].startswith({"linear": "gain/bias", "embed": "embed0", "shared": "shared"}[layout])
    assert state["model"]["cond_bn"] == ("tables" if layout == "shared" else "linear")


@needs_studiogan
def test_a_run_with_g_ema_imports_all_three(tmp_path):
    cfgs, G, D, G_ema = parity.studiogan(SRC, **{"MODEL.apply_g_ema": True})
    peer.save_run(tmp_path / "run", G, D, G_ema, cfgs, step=500, best_fid=np.float64(30.0))
    G.eval(), D.eval(), G_ema.eval()
    state = parity.imported(tmp_path / "run", tmp_path / "sagan.pt")
    assert state["imported"]["G_ema"] == "the run's own"
    assert_same_function(G, D, tmp_path / "sagan.pt", 32)
    assert_same_function(G_ema, D, tmp_path / "sagan.pt", 32, ema=True)
    with torch.no_grad():  # G and G_ema are different networks here
        z = torch.randn(2, 128)
        y = torch.zeros(2, dtype=torch.long)
        assert (sagan.load(tmp_path / "sagan.pt", net="G")(z, y) - sagan.load(tmp_path / "sagan.pt")(z, y)).abs().max() > 1e-3


@needs_studiogan
@pytest.mark.slow
@pytest.mark.parametrize("resolution", sorted(CONFIGS))
def test_studiogans_sagan_configs_import(resolution, tmp_path):
    config, changes = CONFIGS[resolution]
    cfgs, G, D, _ = parity.studiogan(SRC, config, **changes)
    peer.save_run(tmp_path / "run", G, D, None, cfgs, step=1000, best_fid=np.float64(50.0))
    G.eval(), D.eval()
    state = parity.imported(tmp_path / "run", tmp_path / "sagan.pt")
    assert_same_function(G, D, tmp_path / "sagan.pt", resolution)
    # The record is the size's preset (conf/model/studiogan<size>.yaml), so `model=studiogan<size>` fine-tunes it.
    preset = compose_config(f"model=studiogan{resolution}", "model.conditional=true")
    assert state["model"] == model_record(preset, cfgs.DATA.num_classes)
    assert sum(p.numel() for p in sagan.load(tmp_path / "sagan.pt", net="G").parameters()) == sum(p.numel() for p in G.parameters())


# --- one D step and one G step ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def step_setup(tmp_path_factory):
    return parity.studiogan_steps(peer.require(), tmp_path_factory.mktemp("step"), batch=8)


@needs_studiogan
def test_one_d_step_equals_studiogans(step_setup):
    assert not parity.beyond(parity.d_step_gaps(step_setup))


@needs_studiogan
def test_one_g_step_equals_studiogans(step_setup):
    assert not parity.beyond(parity.g_step_gaps(step_setup))


@needs_studiogan
@pytest.mark.parametrize(
    "changes, step",
    [
        ({"d_calls": 1}, "d"),
        ({"model": {"sn_update": "uv"}}, "d"),
        ({"g_bn_stats_in_d_step": True}, "d"),
        ({"d_sn_in_g_step": False}, "g"),
        ({"model": {"d_shortcut": "x"}}, "d"),
    ],
    ids=["one_d_call", "u_first_power_iteration", "g_bn_statistics_in_d_step", "d_frozen_in_g_step", "d_shortcut_x"],
)
def test_each_studiogan_mechanic_is_needed(step_setup, changes, step):
    """With any one of them back at sagan's default, the step differs from StudioGAN's beyond rounding."""
    gaps = (parity.d_step_gaps if step == "d" else parity.g_step_gaps)(step_setup, **changes)
    assert parity.beyond(gaps), f"{changes} made no difference"


# --- the command: errors, the other commands, fine-tuning -----------------------------------------------------------


@needs_studiogan
def test_import_errors_are_one_line_and_write_nothing(tmp_path):
    cfgs, G, D, _ = parity.studiogan(SRC, **{"MODEL.g_conv_dim": 8, "MODEL.d_conv_dim": 8})
    peer.save_run(tmp_path / "run", G, D, None, cfgs, step=10, best_fid=np.float64(9.0))
    out = tmp_path / "out.pt"

    def refused(src: Path, match: str, **args) -> None:
        with pytest.raises(CheckpointError, match=match):
            import_run(OmegaConf.structured(ImportArgs(src=str(src), out=str(out), **args)))
        assert not out.exists()

    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", r"no StudioGAN generator in .*model=G-best-weights-step=N\.pth")
    refused(tmp_path / "run", r"no StudioGAN generator .*model=G-current", which="current")
    g_file = tmp_path / "run" / "model=G-best-weights-step=10.pth"
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / g_file.name).write_bytes(g_file.read_bytes()[: g_file.stat().st_size // 2])
    refused(tmp_path / "cut", "truncated or corrupt")
    # StudioGAN's own BigGAN (its big_resnet backbone): the same file names, another network.
    big_cfgs = peer.configurations(SRC, "CIFAR10/BigGAN.yaml", **{"MODEL.g_conv_dim": 8, "MODEL.d_conv_dim": 8})
    big_G, big_D, _ = peer.networks(big_cfgs)
    peer.save_run(tmp_path / "biggan", big_G, big_D, None, big_cfgs, step=10, best_fid=np.float64(9.0))
    refused(tmp_path / "biggan", r"unknown architecture .*big_resnet \(BigGAN\)")
    # A file that would run code when unpickled is refused without running it.
    marker = tmp_path / "ran"
    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / g_file.name, "wb") as f:
        torch.save({"state_dict": {}, "x": Exploit(str(marker))}, f)
    refused(tmp_path / "evil", "refused to load")
    assert not marker.exists()


class Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@needs_studiogan
def test_readme_import_command_and_the_other_commands_take_the_result(tmp_path, monkeypatch, capsys):
    cfgs, G, D, _ = parity.studiogan(SRC, **{"MODEL.g_conv_dim": 8, "MODEL.d_conv_dim": 8})
    peer.save_run(tmp_path / "run", G, D, None, cfgs, step=10, best_fid=np.float64(9.0))
    monkeypatch.chdir(tmp_path)

    def run(command: str, *args: str) -> str:
        code, out, err = run_command(command, list(args), monkeypatch, capsys)
        assert code == 0, err
        return out

    printed = run("import", f"src={tmp_path / 'run'}", "out=cifar10_sagan.pt")
    assert "train.init_from=cifar10_sagan.pt" in printed
    run("import", f"src={tmp_path / 'run' / 'model=G-best-weights-step=10.pth'}", "out=from_file.pt")
    assert load_checkpoint(tmp_path / "from_file.pt")["trainer"].keys() == {"G", "D", "G_ema", "step"}
    run("sample", "ckpt=cifar10_sagan.pt", "n=4", "format=grid", "class=all", "out=samples")
    assert (tmp_path / "samples" / "grid.png").is_file()
    run("attention", "ckpt=cifar10_sagan.pt", "format=html", "n=2", "real=false", "out=explorer")
    assert (tmp_path / "explorer" / "attention.html").stat().st_size > 1000
    code, _, err = run_command("import", ["src=nowhere", "out=x.pt"], monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1 and "does not exist" in err


@needs_studiogan
def test_fine_tuning_starts_from_the_imported_weights(tmp_path):
    cfgs, G, D, _ = parity.studiogan(SRC, **{"MODEL.g_conv_dim": 4, "MODEL.d_conv_dim": 4, "DATA.num_classes": 3})
    peer.save_run(tmp_path / "run", G, D, None, cfgs, step=10, best_fid=np.float64(9.0))
    state = parity.imported(tmp_path / "run", tmp_path / "sagan.pt")
    common = ["model=studiogan32", "model.g_ch=4", "model.d_ch=4", "model.conditional=true", "data=demo", "data.size=16",
              "train.batch_size=4", "logger.mode=disabled", f"train.init_from={tmp_path / 'sagan.pt'}", "device=cpu"]  # fmt: skip
    run = Run(compose_config(*common), tmp_path / "ft", SINGLE, torch.device("cpu"))
    assert run.trainer.step == 0
    for name, module in (("G", run.trainer.G), ("D", run.trainer.D), ("G_ema", run.trainer.G_ema)):
        assert all(torch.equal(v, state["trainer"][name][k]) for k, v in module.state_dict().items()), name
    with pytest.raises(CheckpointError, match=r"another architecture: model.g_ch: 4 in the checkpoint, 8 now"):
        Run(compose_config(*common, "model.g_ch=8"), tmp_path / "ft2", SINGLE, torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"is imported .* no optimizer state .* train.init_from="):
        Run(compose_config(*common, f"train.resume={tmp_path / 'sagan.pt'}"), tmp_path / "ft3", SINGLE, torch.device("cpu"))


def test_a_generator_only_import_has_no_d(tmp_path):
    """sagan.load gives G and G_ema of a checkpoint without D, and says so for D; fine-tuning needs D."""
    cfg = compose_config("model=studiogan32", "model.g_ch=4", "model.d_ch=4")
    G, _ = build_models(cfg.model, num_classes=0)
    state = {"model": model_record(cfg, 0), "trainer": {"G": G.state_dict(), "G_ema": G.state_dict(), "step": 3},
             "config": OmegaConf.to_container(cfg)}  # fmt: skip
    (tmp_path / "g.pt").write_bytes(serialize(state))
    G2 = sagan.load(tmp_path / "g.pt")
    assert not G2.training and G2.z_dim == 128 and G2.num_classes == 0
    with torch.no_grad():
        assert G2(torch.zeros(1, 128)).shape == (1, 3, 32, 32)
    with pytest.raises(CheckpointError, match="holds no D"):
        sagan.load(tmp_path / "g.pt", net="D")
    with pytest.raises(UserError, match="net='E' is not in a sagan checkpoint"):
        sagan.load(tmp_path / "g.pt", net="E")
    with pytest.raises(CheckpointError, match="holds no D"):
        Run(compose_config("model=studiogan32", "model.g_ch=4", "model.d_ch=4", "data=demo", "data.size=16",
                           "train.batch_size=4", "logger.mode=disabled", f"train.init_from={tmp_path / 'g.pt'}", "device=cpu"),
            tmp_path / "ft", SINGLE, torch.device("cpu"))  # fmt: skip


def test_sagan_import_explains_itself_with_help(capsys, monkeypatch):
    from sagan import import_weights

    monkeypatch.setattr(sys, "argv", ["sagan-import", "--help"])
    with pytest.raises(SystemExit) as exit_:
        import_weights.main()
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert import_weights.__doc__.strip().splitlines()[0] in text and "sagan-import src=" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert {"src", "out", "which"} <= set(rows) and "best" in rows["which"]


def worker_save(folder: Path, G, D, cfgs, *, step: int, is_best: bool) -> None:
    """StudioGAN's own WORKER.save on a worker that holds what it reads: `is_best=False` writes the run's current
    checkpoint alone (what a run has before its first evaluation), True the best one and a current copy of it."""
    worker = object.__new__(importlib.import_module("worker").WORKER)
    folder.mkdir(parents=True, exist_ok=True)
    worker.Gen, worker.Dis, worker.Gen_ema, worker.OPTIMIZATION = G, D, None, cfgs.OPTIMIZATION
    worker.RUN, worker.run_name = SimpleNamespace(ckpt_dir=str(folder), seed=0), "SAGAN-train-test"
    worker.epoch_counter, worker.topk, worker.aa_p, worker.best_step, worker.best_fid = 1, "initialize", 0.0, 0, None
    worker.lecam_ema, worker.global_rank, worker.logger = importlib.import_module("utils.ops").LeCamEMA(), 0, None
    worker.save(step=step, is_best=is_best)


@needs_studiogan
def test_a_run_with_one_kind_of_checkpoint_imports_that_kind_and_says_so(tmp_path, capsys):
    cfgs, G, D, _ = parity.studiogan(SRC, **{"MODEL.g_conv_dim": 8, "MODEL.d_conv_dim": 8})
    current, both, best = tmp_path / "current", tmp_path / "both", tmp_path / "best"
    worker_save(current, G, D, cfgs, step=20, is_best=False)
    assert sorted(p.name.split("-")[1] for p in current.iterdir()) == ["current", "current"]  # D and G
    state = parity.imported(current, tmp_path / "current.pt")
    assert state["trainer"]["step"] == 20 and state["imported"]["files"]["G"] == "model=G-current-weights-step=20.pth"
    printed = capsys.readouterr().out
    assert f"which=current: {current} holds no model=G-best-... file" in printed and "(StudioGAN current, step 20" in printed
    # Both kinds: best, the default. A kind asked for and absent stays an error.
    worker_save(both, G, D, cfgs, step=10, is_best=True)
    worker_save(both, G, D, cfgs, step=20, is_best=False)
    assert parity.imported(both, tmp_path / "both.pt")["trainer"]["step"] == 10
    assert parity.imported(both, tmp_path / "both.pt", which="current")["trainer"]["step"] == 20
    printed = capsys.readouterr().out
    assert "which=current:" not in printed and "(StudioGAN best, step 10" in printed
    with pytest.raises(CheckpointError, match=r"no StudioGAN generator .*model=G-best-weights-step=N\.pth"):
        parity.imported(current, tmp_path / "x.pt", which="best")
    peer.save_run(best, G, D, None, cfgs, step=30, best_fid=np.float64(9.0))  # best alone
    assert parity.imported(best, tmp_path / "best.pt")["trainer"]["step"] == 30
    assert "(StudioGAN best, step 30" in capsys.readouterr().out
