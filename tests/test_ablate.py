"""sagan-ablate: the studies' variants, the table's arithmetic, and a tiny study end to end (train, skip, resume,
evaluate, rebuild)."""

import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from scipy import stats

from conftest import run_command
from sagan.ablate import split_argv
from sagan.ablation.report import RunResult, write_report
from sagan.ablation.studies import variants
from sagan.checkpoint import load_checkpoint, networks_from_checkpoint
from sagan.data.demo import mirror_consistency
from sagan.evaluation.sampling import draw
from sagan.utils.errors import UserError

CONF = Path(__file__).resolve().parent.parent / "conf" / "ablation"


def test_position_study_places_attention_where_g_and_d_both_have_the_size():
    assert variants("position", "demo") == ["none", "feat8", "feat16"]
    assert variants("position", "imagenet128") == ["none", "feat8", "feat16", "feat32", "feat64"]
    with pytest.raises(UserError, match="unknown study 'positions'"):
        variants("positions", "demo")
    with pytest.raises(UserError, match="unknown scale 'cifar'"):
        variants("position", "cifar")


@pytest.mark.parametrize("study", ["position", "block", "sn_g", "ttur", "augment"])
def test_every_variant_has_a_config_that_composes(study):
    from conftest import compose_config

    for variant in variants(study, "imagenet128"):
        assert (CONF / f"{study}-{variant}.yaml").exists()
        cfg = compose_config("experiment=demo", f"+ablation={study}-{variant}")
        if study == "block":
            assert cfg.model.attn_type == variant and cfg.model.attn_heads == (2 if variant == "multihead" else 1)
        if study == "sn_g":
            assert cfg.model.g_sn == (variant == "sn") and cfg.model.d_sn
        if study == "ttur":
            assert (cfg.optim.lr_d, cfg.optim.n_dis) == ((4e-4, 1) if variant == "ttur" else (1e-4, 5))
        if study == "augment":
            assert cfg.data.fraction == 0.1 and cfg.data.augment == variant
        if study == "position":
            expected = [] if variant == "none" else [int(variant.removeprefix("feat"))]
            assert list(cfg.model.g_attn) == list(cfg.model.d_attn) == expected


def test_own_arguments_and_training_overrides_are_told_apart():
    own, train = split_argv(["study=block", "seeds=2", "metrics.cache_dir=/c", "model.g_ch=8", "hydra/launcher=x", "rebuild=true"])
    assert own == ["study=block", "seeds=2", "metrics.cache_dir=/c", "rebuild=true"]
    assert train == ["model.g_ch=8", "hydra/launcher=x"]


def test_table_rows_are_means_and_sample_stds_over_finished_runs(tmp_path):
    fids = {"a": [10.0, 14.0, 15.0], "b": [30.0, 31.0]}
    results = [
        RunResult(v, s, tmp_path / f"{v}{s}", steps=100, finished=True, metrics={"fid": f, "kid": f / 1000},
                  train_s=60.0 * (s + 1), curve=[(0, 0.0), (100, f)], mirror=f / 100)
        for v, values in fids.items() for s, f in enumerate(values)
    ]  # fmt: skip
    results.append(RunResult("b", 2, tmp_path / "b2", steps=40))  # unfinished: listed, not averaged
    md, png = write_report(tmp_path, results, title="t", about=["about"], curve_key="score")
    text = md.read_text()
    tables = text.split("Each variant against")[0] + text.split("Every run:")[1]  # the variants' rows, every run's
    rows = {line.split(" | ")[0].strip("| "): line for line in tables.splitlines() if line.startswith("| ")}
    a, b = fids["a"], fids["b"]
    assert f"{statistics.mean(a):.2f} ± {statistics.stdev(a):.2f}" in rows["a"]
    assert f"{statistics.mean(b):.2f} ± {statistics.stdev(b):.2f}" in rows["b"] and "2 of 3" in rows["b"]
    assert f"{statistics.mean(x / 100 for x in a):.3f}" in rows["a"]  # mirror consistency
    assert f"{statistics.mean([1.0, 2.0, 3.0]):.1f} ± {statistics.stdev([1.0, 2.0, 3.0]):.1f}" in rows["a"]  # minutes
    assert "unfinished" in rows["b seed 2"]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    # b against a, the first variant: the difference, Welch's interval and p, Mann-Whitney's p, as scipy computes them.
    welch = stats.ttest_ind(b, a, equal_var=False)
    interval = welch.confidence_interval(0.95)
    fid_row = next(line for line in md.read_text().splitlines() if line.startswith("| b | FID |"))
    assert f"| {statistics.mean(b) - statistics.mean(a):+.2f} | {interval.low:+.2f} to {interval.high:+.2f} |" in fid_row
    assert f"| {welch.pvalue:.3f} | {stats.mannwhitneyu(b, a, alternative='two-sided').pvalue:.3f} | 2 and 3 |" in fid_row
    assert "| b | mirror consistency |" in md.read_text()


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def study_runner(tmp_path: Path, monkeypatch, capfd):
    """`sagan-ablate` of a tiny sn_g study, in this process (its training runs are sagan-train processes, as always),
    evaluated on the stand-in Inception network: call it with more arguments, get its Result."""

    def ablate(*args: str) -> Result:
        argv = [
            "study=sn_g", "scale=demo", "seeds=1", f"out={tmp_path / 'study'}", "n=12", "ref_n=12",
            f"metrics.cache_dir={tmp_path / 'cache'}", "model.g_ch=4", "model.d_ch=4", "data.size=64",
            "train.batch_size=8", "logger.mode=disabled", "logger.num_samples=4", "logger.attn_images=2", "mirror_n=16", *args,
        ]  # fmt: skip
        return Result(*run_command("ablate", argv, monkeypatch, capfd))

    return ablate


@pytest.mark.slow
def test_a_tiny_study_trains_evaluates_continues_and_rebuilds(tmp_path, monkeypatch, capfd, stand_in_inception):
    monkeypatch.chdir(tmp_path)
    ablate, study = study_runner(tmp_path, monkeypatch, capfd), tmp_path / "study"
    first = ablate("train.steps=2", "variants=[sn,no_sn]")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 variants x 1 seeds = 2 runs, 0 finished" in first.stdout
    table = (study / "results.md").read_text()
    assert "`sagan-ablate study=sn_g scale=demo seeds=1 variants=[sn,no_sn] model.g_ch=4 " in table  # re-runnable
    rows = [line for line in table.splitlines() if line.startswith(("| sn |", "| no_sn |"))]
    assert len(rows) == 2 and all("1 of 1" in row for row in rows)
    for run, row in zip(("sn_g-sn_s0", "sn_g-no_sn_s0"), rows):
        saved = json.loads((study / run / "eval.json").read_text())
        assert saved["protocol"]["num_samples"] == 12 and saved["metrics"]["kid"] == saved["metrics"]["kid"]
        # The demo's score, of mirror_n samples of G_ema at the last checkpoint, in eval.json and the table.
        state = load_checkpoint(study / run / "checkpoints" / "last.pt")
        G, _ = networks_from_checkpoint(state, ema=True, device=torch.device("cpu"))
        expected = mirror_consistency(draw(G, 16, seed=0)[0])
        assert saved["mirror"]["asked"]["n"] == 16 and saved["mirror"]["value"] == pytest.approx(expected, abs=1e-6)
        assert f" {expected:.3f} " in row
    assert (study / "results.png").exists()
    written = {run: (study / run / "eval.json").stat().st_mtime_ns for run in ("sn_g-sn_s0", "sn_g-no_sn_s0")}

    again = ablate("train.steps=2")  # same study: nothing to train, nothing to evaluate
    assert again.returncode == 0 and "2 runs, 2 finished" in again.stdout and "warning" not in again.stdout
    assert all((study / run / "eval.json").stat().st_mtime_ns == ns for run, ns in written.items())
    other = ablate("train.steps=2", "optim.lr_d=1e-3", "rebuild=true")  # other settings: named, kept
    assert "sn_g-sn_s0 was trained with other settings (optim.lr_d)" in other.stdout and "2 finished" in other.stdout
    assert "running:" not in again.stdout and "evaluating" not in again.stdout

    shutil.rmtree(study / "sn_g-no_sn_s0" / "checkpoints")  # one run lost: only its variant is launched again
    partial = ablate("train.steps=2")
    assert partial.returncode == 0 and "2 runs, 1 finished" in partial.stdout
    assert "+ablation=sn_g-no_sn train.seed=0 " in partial.stdout and "evaluating 2/2: sn_g-no_sn_s0" in partial.stdout

    longer = ablate("train.steps=3")  # more steps: every run continues from its checkpoint
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "2 runs, 0 finished" in longer.stdout and "2 of 2 runs finished" in longer.stdout
    assert "resumed from" in (study / "sn_g-sn_s0" / "train.log").read_text()
    table = (study / "results.md").read_text()
    assert "| sn | 1 of 1 | 3 |" in table and "| no_sn | 1 of 1 | 3 |" in table

    (study / "sn_g-sn_s0" / "eval.json").unlink()
    rebuilt = ablate("train.steps=3", "rebuild=true")
    assert rebuilt.returncode == 0 and "evaluating 1/2: sn_g-sn_s0" in rebuilt.stdout
    assert "running:" not in rebuilt.stdout and (study / "sn_g-sn_s0" / "eval.json").exists()

    # A run trained on other data than the demo's has no mirror score: null in eval.json, "-" in its table row.
    ckpt = study / "sn_g-no_sn_s0" / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt)
    state["config"]["data"]["name"] = "cifar10"
    torch.save(state, ckpt)  # a new checkpoint file: evaluated again
    off_demo = ablate("train.steps=3", "rebuild=true")
    assert off_demo.returncode == 0 and "evaluating 2/2: sn_g-no_sn_s0" in off_demo.stdout
    assert json.loads((study / "sn_g-no_sn_s0" / "eval.json").read_text())["mirror"]["value"] is None
    row = next(line for line in (study / "results.md").read_text().splitlines() if line.startswith("| no_sn seed 0 |"))
    assert row.split(" | ")[3] == "-"  # run, FID, KID, mirror


def test_unknown_variants_are_refused_before_any_work(tmp_path):
    from sagan.ablate import AblateArgs
    from sagan.ablation.runner import ablate
    from sagan.cli import parse_args

    args = parse_args(AblateArgs, ["study=sn_g", "variants=[sn,nope]", f"out={tmp_path / 'study'}"])
    with pytest.raises(UserError, match=r"sn_g at scale demo has no variant \['nope'\]: choose among \['sn', 'no_sn'\]"):
        ablate(args, [])
    assert not (tmp_path / "study").exists()


def test_help_lists_the_keys_and_examples(capsys, monkeypatch):
    import sagan.ablate

    monkeypatch.setattr(sys, "argv", ["sagan-ablate", "--help"])
    with pytest.raises(SystemExit) as exit_:
        sagan.ablate.main()
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "sagan-ablate study=position scale=demo seeds=3" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ")}
    assert rows["study"][1] == "position" and rows["seeds"][1] == "3" and rows["rebuild"][1] == "false"
    assert {"scale", "variants", "n", "ref", "ref_n", "eval_device", "metrics.inception_weights"} <= set(rows)


def test_settings_that_differ_are_named():
    from sagan.ablation.runner import differences

    a = {"model": {"g_ch": 16, "g_attn": [16]}, "optim": {"lr_d": 4e-4}}
    b = {"model": {"g_ch": 8, "g_attn": [16]}, "optim": {"lr_d": 4e-4, "eps": 1e-8}}
    assert differences(a, b) == ["model.g_ch", "optim.eps"]
