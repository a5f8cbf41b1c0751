"""Every command the README and the pages under docs/ show in their code blocks runs here, as written, with four substitutions: `ckpt=` is a
tiny checkpoint trained for the test, numbers of images are capped at 64, the offline Inception weights are added
where they exist, and `sagan-import`'s `src=` is a small StudioGAN run written by StudioGAN's own code (with
SAGAN_STUDIOGAN_SRC; skipped without it). `sagan-train` and `sagan-ablate` commands are composed (their configs are
checked, nothing trains); `sagan-fid` commands whose images need a download or a path of the user's are parsed (keys
and types checked) instead of run, and so are `sagan-prepare` commands whose source is not the demo. Their Python blocks run as they are, in a folder where `cifar10_sagan.pt` is the
tiny checkpoint."""

import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

import studiogan_parity as parity
import studiogan_peer as peer
from conftest import compose_config
from sagan.ablate import AblateArgs, split_argv
from sagan.ablation.studies import SCALES, variants
from sagan.attention import AttentionArgs, render_checkpoint
from sagan.checkpoint import load_checkpoint
from sagan.cli import check_composes, parse_args
from sagan.evaluation.evaluate import evaluate
from sagan.evaluation.request import FidArgs
from sagan.export import ExportArgs, export
from sagan.fid import truncation_list
from sagan.import_weights import ImportArgs, import_run
from sagan.prepare import PrepareArgs, prepare_dataset
from sagan.sample import SampleArgs, sample
from sagan.training.loop import train

README = Path(__file__).parents[1] / "README.md"
PAGES = [README, *sorted((README.parent / "docs").glob("*.md"))]
COMMAND_NAMES = ("sagan-train", "sagan-sample", "sagan-attention", "sagan-fid", "sagan-ablate", "sagan-import", "sagan-export", "sagan-prepare")
WEIGHTS = os.environ.get("SAGAN_FID_WEIGHTS")


def readme_commands() -> list[list[str]]:
    """The sagan commands of the README's bash blocks (continued lines joined, comments dropped), as argv lists; a
    `torchrun ... -m sagan.X` line counts as the command sagan-X."""
    commands = []
    blocks = [block for page in PAGES for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "-m" in words and words[0] in ("torchrun", "srun") and words[words.index("-m") + 1].startswith("sagan."):
                words = ["sagan-" + words[words.index("-m") + 1].split(".")[1], *words[words.index("-m") + 2 :]]
            if words and words[0] in COMMAND_NAMES:
                commands.append(words)
    return commands


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def studiogan_run(tmp_path_factory) -> Path:
    """A small StudioGAN CIFAR-10 SAGAN run folder (widths 32 and 16), as StudioGAN's own code saves one."""
    if peer.source() is None:
        pytest.skip(f"StudioGAN's src/ not found: set {peer.ENV}")
    cfgs, G, D, _ = parity.studiogan(peer.source(), **{"MODEL.g_conv_dim": 8, "MODEL.d_conv_dim": 8})
    folder = tmp_path_factory.mktemp("studiogan") / "run"
    peer.save_run(folder, G, D, None, cfgs, step=1000, best_fid=np.float64(20.0))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("readme") / "run"
    overrides = ["experiment=demo", "model.g_ch=4", "model.d_ch=4", "data.size=32", "train.batch_size=8",
                 "train.steps=1", "logger.num_samples=4", "logger.attn_images=1", "logger.mode=disabled",
                 "model.conditional=true"]  # fmt: skip  (conditional: the README samples class=all)
    train(compose_config(*overrides), run)
    return run / "checkpoints" / "last.pt"


def test_the_readme_shows_every_command():
    shown = {words[0] for words in COMMANDS}
    assert shown == set(COMMAND_NAMES) and len(COMMANDS) >= 20


def substituted(args: list[str], ckpt: Path) -> list[str]:
    out = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "ckpt":
            value = str(ckpt)
        elif key in ("n", "ref_n"):
            value = str(min(int(value), 64))
        out.append(f"{key}={value}")
    return out


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w)[:90] for w in COMMANDS])
def test_readme_command_runs(words, checkpoint, tmp_path, monkeypatch, request):
    command, args = words[0], words[1:]
    monkeypatch.chdir(tmp_path)  # outputs named in the README (out=..., samples/) land here
    if command == "sagan-train":
        if any(a.startswith("-") for a in args):  # a Hydra sweep (-m): Hydra checks it itself, per job
            assert "-m" in args
            return
        check_composes([a for a in args if not a.startswith("hydra")])
        return
    if command == "sagan-ablate":  # its keys parsed, and every run's sagan-train config composed (nothing trains)
        own, train_overrides = split_argv(args)
        parsed = parse_args(AblateArgs, own)
        scale = SCALES[parsed.scale]
        for variant in variants(parsed.study, parsed.scale):
            check_composes([*scale.overrides, f"+ablation={parsed.study}-{variant}", *train_overrides])
        return
    if command == "sagan-import":
        run = request.getfixturevalue("studiogan_run")
        out = import_run(parse_args(ImportArgs, [f"src={run}" if a.startswith("src=") else a for a in args]))
        assert out.is_file() and load_checkpoint(out)["imported"]["from"] == "PyTorch-StudioGAN"
        return
    if command == "sagan-prepare":  # run when its source is here (the demo), else its keys parsed
        parsed = parse_args(PrepareArgs, args)
        if parsed.src == "demo":
            assert prepare_dataset(parsed).images == 10_000 and Path(parsed.out).is_file()
        return
    args = substituted(args, checkpoint)
    if command == "sagan-sample":
        assert sample(parse_args(SampleArgs, [a.replace("class=", "class_=", 1) for a in args])).exists()
    elif command == "sagan-attention":
        assert all(p.is_file() for p in render_checkpoint(parse_args(AttentionArgs, args)))
    elif command == "sagan-export":
        out, difference = export(parse_args(ExportArgs, args))
        assert out.is_file() and difference < 1e-4
    else:
        args = [truncation_list(a) for a in args]
        parsed = parse_args(FidArgs, args)
        local = parsed.ref in ("demo", "train") and parsed.gen is None and parsed.ckpt is not None
        if local and WEIGHTS:
            extra = [f"metrics.inception_weights={WEIGHTS}", f"metrics.cache_dir={tmp_path / 'cache'}", "isc=false", "prc=false"]
            result = evaluate(parse_args(FidArgs, [*args, *extra]))
            assert all(row["metrics"]["fid"] > 0 for row in result.get("truncation", [result]))


PYTHON_BLOCKS = [block for page in PAGES for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=[block.splitlines()[0][:60] for block in PYTHON_BLOCKS])
def test_readme_python_runs(code, checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(checkpoint, tmp_path / "cifar10_sagan.pt")
    exec(compile(code, "README.md", "exec"), {})


LINK = re.compile(r"\]\(([^)#\s]*)(#[^)\s]*)?\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {"#" + re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_between_pages_resolve(page):
    """Every relative link of the README and the pages names a file that exists, and an anchor that a heading makes."""
    for target, anchor in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {target} does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.name}: {target}{anchor} names no heading of {path.name}"
