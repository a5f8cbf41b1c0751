"""Every command the README and the pages under docs/ show in their code blocks is checked here, as written, with
four substitutions: `ckpt=` is the session's tiny checkpoint (tests/conftest.py), numbers of images are capped at
64, the Inception network is the stand-in of tests/conftest.py (the real network's numbers are tested in
tests/test_metrics.py and tests/test_reference_stats.py), and `sagan-import`'s `src=` is a small StudioGAN run written by
StudioGAN's own code (with SAGAN_STUDIOGAN_SRC; skipped without it, failed when it names another folder).

A command that really runs passes: `sagan-sample`, `sagan-attention`, `sagan-export`, `sagan-import`, `sagan-prepare`
of the demo, and `sagan-fid` on local images (ref=demo or train). Every other command is
checked without running and then reported as skipped, its reason saying what was checked instead (`pytest -rs`):
`sagan-train` is composed (its config built, nothing trains), a Hydra sweep (`-m`) has every job's config composed
(the launcher's hydra.* settings are Hydra's to check), `sagan-ablate` has its keys parsed and every run's config
composed, and `sagan-fid` commands whose images need a download or a path of the user's, and
`sagan-prepare` commands whose source is not the demo, have their keys and types parsed. A failing check fails the
test, skip or not. The pages' Python blocks run as they are, in a folder where `cifar10_sagan.pt` is the tiny
checkpoint."""

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

import studiogan_parity as parity
import studiogan_peer as peer
from conftest import run_copy
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

README = Path(__file__).parents[1] / "README.md"
PAGES = [README, *sorted((README.parent / "docs").glob("*.md"))]
COMMAND_NAMES = ("sagan-train", "sagan-sample", "sagan-attention", "sagan-fid", "sagan-ablate", "sagan-import", "sagan-export", "sagan-prepare")


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
            if words and words[0] in COMMAND_NAMES and words not in commands:  # a command two pages show: once
                commands.append(words)
    return commands


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def studiogan_run(tmp_path_factory) -> Path:
    """A small StudioGAN CIFAR-10 SAGAN run folder (widths 32 and 16), as StudioGAN's own code saves one."""
    cfgs, G, D, _ = parity.studiogan(peer.require(), **{"MODEL.g_conv_dim": 8, "MODEL.d_conv_dim": 8})
    folder = tmp_path_factory.mktemp("studiogan") / "run"
    peer.save_run(folder, G, D, None, cfgs, step=1000, best_fid=np.float64(20.0))
    return folder


@pytest.fixture
def checkpoint(trained, tmp_path) -> Path:
    """The session's tiny conditional checkpoint (the README samples class=all), copied: commands write beside it."""
    return run_copy(trained["cond"], tmp_path)


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


def hydra_key(arg: str) -> bool:
    """A Hydra setting (hydra.run.dir=..., hydra/launcher=...): Hydra's to check, not sagan's config."""
    return arg.split("=")[0].lstrip("+~").startswith("hydra")


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The overrides of every job a `sagan-train -m ...` sweep launches (Hydra's own sweeper expands `a=1,2`), Hydra's
    settings left out."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    ours = [a for a in args if not a.startswith("-") and not hydra_key(a)]
    overrides = OverridesParser.create().parse_overrides(ours)
    return [job for batch in BasicSweeper.split_arguments(overrides, max_batch_size=None) for job in batch]


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w)[:90] for w in COMMANDS])
def test_readme_command_runs(words, checkpoint, tmp_path, monkeypatch, request):
    command, args = words[0], words[1:]
    monkeypatch.chdir(tmp_path)  # outputs named in the README (out=..., samples/) land here
    if command == "sagan-train":
        if any(a.startswith("-") for a in args):  # a Hydra sweep
            assert args[0] == "-m", args
            jobs = sweep_jobs(args)
            for job in jobs:
                check_composes(job)
            assert len(jobs) > 1, jobs
            pytest.skip(f"sweep composed, not launched: its {len(jobs)} jobs' configs composed; Hydra's own settings "
                        f"({', '.join(a.split('=')[0] for a in args if hydra_key(a))}) are not checked")  # fmt: skip
        check_composes([a for a in args if not hydra_key(a)])
        pytest.skip("composed, not run: the config these overrides build was composed; nothing trained")
    if command == "sagan-ablate":  # its keys parsed, and every run's sagan-train config composed (nothing trains)
        own, train_overrides = split_argv(args)
        parsed = parse_args(AblateArgs, own)
        scale = SCALES[parsed.scale]
        runs = variants(parsed.study, parsed.scale)
        for variant in runs:
            check_composes([*scale.overrides, f"+ablation={parsed.study}-{variant}", *train_overrides])
        pytest.skip(f"composed, not run: its keys parsed and the configs of its {len(runs)} variants composed; "
                    "nothing trained")  # fmt: skip
    if command == "sagan-import":
        run = request.getfixturevalue("studiogan_run")
        out = import_run(parse_args(ImportArgs, [f"src={run}" if a.startswith("src=") else a for a in args]))
        assert out.is_file() and load_checkpoint(out)["imported"]["from"] == "PyTorch-StudioGAN"
        return
    if command == "sagan-prepare":  # run when its source is here (the demo), else its keys parsed
        parsed = parse_args(PrepareArgs, args)
        if parsed.src != "demo":
            pytest.skip(f"parsed, not run: its keys and types checked; src={parsed.src} is the user's data")
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
        assert command == "sagan-fid", command
        args = [truncation_list(a) for a in args]
        parsed = parse_args(FidArgs, args)
        local = parsed.ref in ("demo", "train") and parsed.gen is None and parsed.ckpt is not None
        if not local:
            pytest.skip(f"parsed, not run: its keys and types checked; ref={parsed.ref}"
                        f"{'' if parsed.gen is None else f' gen={parsed.gen}'} needs a download or the user's files")  # fmt: skip
        request.getfixturevalue("stand_in_inception")
        extra = [f"metrics.cache_dir={tmp_path / 'cache'}", "isc=false", "prc=false"]
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
