import importlib
import json
import os
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from conftest import WEIGHTS, run_command, run_copy, symmetric_fid
from sagan.checkpoint import load_checkpoint
from sagan.data.dataset_base import DatasetError
from sagan.cli import parse_args
from sagan.evaluation.evaluate import evaluate
from sagan.evaluation.request import FidArgs
from sagan.evaluation.inception import Inception
from sagan.evaluation.metrics import (
    MetricsError,
    Protocol,
    check_request,
    classifier_missing,
    compute_metrics,
    inception_score_allowed,
    kid_subset,
    report,
)
from sagan.evaluation.reference_files import load_reference_file
from sagan.evaluation.reference_stats import Reference, ReferenceStatsError
from sagan.training.loop import train
from sagan.utils.errors import UserError

TRAIN_ZIP, TEST_ZIP = os.environ.get("SAGAN_CIFAR10_ZIP"), os.environ.get("SAGAN_CIFAR10_TEST_ZIP")


def closed_form_fid(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), written out with numpy and scipy."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def test_fid_of_the_engine_matches_the_closed_form_on_known_gaussians():
    rng = np.random.default_rng(0)
    d = 8
    a = rng.normal(0.0, 1.0, size=(4000, d))
    b = rng.normal(0.5, 2.0, size=(4000, d)) @ rng.normal(size=(d, d)) / 3
    stats = [fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b)]
    fid = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert fid == pytest.approx(closed_form_fid(a, b), rel=1e-6)
    # And against the population value for two isotropic Gaussians: d * (0.5^2) + d * (1 + 4 - 2 * 2).
    c = rng.normal(0.5, 2.0, size=(200_000, d))
    stats_c = fid_features_to_statistics(torch.from_numpy(c))
    stats_a = fid_features_to_statistics(torch.from_numpy(rng.normal(0.0, 1.0, size=(200_000, d))))
    population = fid_statistics_to_metric(stats_a, stats_c, verbose=False)["frechet_inception_distance"]
    assert population == pytest.approx(d * 0.25 + d * 1.0, rel=0.02)


@pytest.mark.parametrize("n", [20, 400])  # rank-deficient covariances (fewer images than dimensions), and full rank
def test_the_stand_in_fid_formula_is_torch_fidelitys(n):
    """tests/conftest.py's symmetric_fid, which the stand-in evaluations use, gives torch-fidelity's FID."""
    rng = np.random.default_rng(n)
    a = rng.normal(0.0, 1.0, size=(n, 64))
    b = rng.normal(0.3, 1.5, size=(n, 64)) @ rng.normal(size=(64, 64)) / 8
    a[:, 48:], b[:, 56:] = 0.0, 2.0  # dimensions that do not vary: in one set, in both (where only the means differ)
    stats = [fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b)]
    ours = symmetric_fid(*stats)["frechet_inception_distance"]
    assert ours == pytest.approx(fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"], rel=1e-6)


def zero_classifier_weights(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, path)
    return str(path)


def test_inception_score_is_skipped_with_an_all_zero_classifier(tmp_path, caplog):
    weights = zero_classifier_weights(tmp_path)
    assert classifier_missing(weights)
    torch.save({"fc.weight": torch.ones(2, 2)}, tmp_path / "real.pth")
    assert not classifier_missing(str(tmp_path / "real.pth")) and not classifier_missing(None)
    assert not inception_score_allowed(True, weights) and "IS skipped" in caplog.text and "all zeros" in caplog.text
    assert inception_score_allowed(True, str(tmp_path / "real.pth")) and not inception_score_allowed(False, None)
    images_only = Reference("r", np.zeros(2048), np.eye(2048), 40)
    with pytest.raises(MetricsError, match="no metric asked for"):  # IS was the only metric, and it is skipped
        check_request(fid=False, isc=False, kid=False, prc=False, n=10, reference=images_only, kid_subset_size=None)


def test_kid_subsets_are_smaller_than_the_sets_and_spread_shown_only_then():
    assert kid_subset(50_000, 10_000, None) == 1000  # the usual protocol
    assert kid_subset(500, 800, None) == 250  # half the smaller set: subsets differ, so the spread means something
    with pytest.raises(MetricsError, match="at most the smaller set"):
        kid_subset(500, 800, 600)
    rng = torch.Generator().manual_seed(0)
    ref_features = torch.randn(40, 2048, generator=rng)
    reference = Reference("r", np.zeros(2048), np.eye(2048), 40, ref_features)
    gen = torch.randn(40, 2048, generator=rng) + 0.5
    halves = compute_metrics(gen, None, reference, fid=False, kid=True)
    whole = compute_metrics(gen, None, reference, fid=False, kid=True, kid_subset_size=40)
    assert halves["kid_std"] > 0 and "kid_std" not in whole  # every subset of 40 is the whole set: no spread to show
    protocol = Protocol(num_samples=40, reference="r", reference_images=40, resolution=32)
    assert "±" in report(halves, protocol) and "±" not in report(whole, protocol)


def test_requests_that_cannot_be_computed_are_refused_before_any_image_is_made():
    stats_only = Reference("stats.npz", np.zeros(2048), np.eye(2048), None, is_file=True)
    common = dict(fid=True, isc=False, n=500, kid_subset_size=None)
    with pytest.raises(MetricsError, match="KID needs the reference images' features.*stats.npz.*kid=true"):
        check_request(kid=True, prc=False, reference=stats_only, **common)
    with pytest.raises(MetricsError, match="precision/recall needs"):
        check_request(kid=False, prc=True, reference=stats_only, **common)
    images = Reference("folder", None, None, 300)  # what a rank other than 0 holds: the count, not the statistics
    check_request(kid=True, prc=True, reference=images, **common)
    with pytest.raises(MetricsError, match="at most the smaller set"):
        check_request(kid=True, prc=False, reference=images, fid=True, isc=False, n=500, kid_subset_size=400)


def test_inception_runs_without_tf32_and_training_flags_come_back():
    """TF32 (on for training) is off while the Inception network runs, and restored afterwards."""
    seen = []

    def network(images):  # stands in for torch-fidelity's network: records the flags it runs under
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return (torch.zeros(len(images), 2048),)

    inception = Inception.__new__(Inception)
    inception.net, inception.device, inception.logits = network, torch.device("cpu"), False
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as resolve_perf leaves them
    try:
        pool, _ = inception(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
        assert seen == [(False, False)] and pool.shape == (2, 2048)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def write_images(folder, n, size, seed=0):
    folder.mkdir(parents=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def fid_args(*argv):
    return parse_args(FidArgs, list(argv))


def test_cli_errors_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    write_images(tmp_path / "gen", 2, 32, seed=1)
    with pytest.raises(MetricsError, match="nothing to do: give ckpt="):
        evaluate(fid_args(f"ref={tmp_path / 'gen'}"))
    with pytest.raises(MetricsError, match="not both"):
        evaluate(fid_args(f"ckpt={tmp_path / 'x.pt'}", f"gen={tmp_path / 'gen'}", f"ref={tmp_path / 'gen'}"))
    with pytest.raises(UserError, match="no images found"):
        evaluate(fid_args(f"gen={tmp_path / 'empty'}", f"ref={tmp_path / 'gen'}", "isc=false"))
    with pytest.raises(DatasetError, match="neither an existing folder or .zip nor a known dataset .*, demo, .npz statistics, train"):
        evaluate(fid_args(f"gen={tmp_path / 'gen'}", "ref=imagenet-train", "isc=false"))
    with pytest.raises(MetricsError, match="ref=train means the data a checkpoint trained on"):
        evaluate(fid_args(f"gen={tmp_path / 'gen'}", "ref=train", "isc=false"))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="truncated or corrupt"):
        evaluate(fid_args(f"ckpt={tmp_path / 'bad.pt'}", f"ref={tmp_path / 'gen'}", "isc=false"))


@pytest.mark.parametrize("content, message", [
    ({"mu": np.zeros(2048)}, "has no sigma"),
    ({"mu": np.zeros(64), "sigma": np.eye(64)}, r"holds mu \(64,\) and sigma \(64, 64\)"),
])  # fmt: skip
def test_statistics_files_without_mu_and_sigma_or_of_another_size_are_refused(tmp_path, content, message):
    np.savez(tmp_path / "stats.npz", **content)
    with pytest.raises(ReferenceStatsError, match=message):
        load_reference_file(tmp_path / "stats.npz")


def test_a_bad_statistics_file_is_one_line_and_a_non_zero_exit(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "stats.npz", m=np.zeros(3))
    write_images(tmp_path / "gen", 2, 32)
    code, _, stderr = run_command("fid", [f"gen={tmp_path / 'gen'}", f"ref={tmp_path / 'stats.npz'}", "isc=false"], monkeypatch, capsys)
    assert code == 1
    assert stderr.startswith("error: statistics file") and "has no mu or sigma" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize("module, keys", [
    ("sagan.fid", ["ckpt", "ref", "save_ref", "metrics.inception_weights", "metrics.kid_subset_size"]),
    ("sagan.sample", ["ckpt", "n", "class", "truncation"]),
    ("sagan.attention", ["ckpt", "query", "ema"]),
])  # fmt: skip
def test_every_command_explains_itself_with_help(module, keys, capsys, monkeypatch):
    command = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exit_:
        command.main()
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert command.__doc__.strip().splitlines()[0] in text and "ckpt=outputs/run/checkpoints/last.pt" in text  # examples
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    for key in keys:
        assert key in rows and len(rows[key].split()) >= 3, (key, rows.get(key))  # name, default, meaning
    assert "true" in rows["ema"] and "True" not in rows["ema"]  # booleans as users type them


def test_fid_of_a_set_against_itself_is_zero(tmp_path, stand_in_inception):
    write_images(tmp_path / "a", 24, 32)
    args = ["isc=true", f"metrics.inception_weights={zero_classifier_weights(tmp_path)}", f"metrics.cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'm.json'}"]
    result = evaluate(fid_args(f"gen={tmp_path / 'a'}", f"ref={tmp_path / 'a'}", *args))
    assert abs(result["metrics"]["fid"]) < 1e-6  # the stand-in's rounding: 2e-8; 10 of the 24 images: about 0.5
    assert result["isc_skipped"] and "is" not in result["metrics"]  # weights without a classifier: no IS
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["protocol"]["num_samples"] == 24 and written["protocol"]["feature_extractor"] == "inception-v3-compat"


def test_inception_score_alone_with_an_all_zero_classifier_is_refused_saying_why(tmp_path):
    write_images(tmp_path / "a", 4, 32)
    weights = zero_classifier_weights(tmp_path)
    with pytest.raises(MetricsError, match=r"IS refused: the classifier in .* is all zeros .* always be 1\.0"):
        evaluate(fid_args(f"gen={tmp_path / 'a'}", f"ref={tmp_path / 'a'}", "isc=true", "fid=false", f"metrics.inception_weights={weights}"))


def test_conditional_checkpoint_evaluates_and_reference_statistics_are_cached(tmp_path, tiny_cfg, stand_in_inception):
    train(tiny_cfg("train.steps=1", "model.conditional=true"), tmp_path / "run")
    write_images(tmp_path / "ref", 20, 32)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    args = [f"ckpt={ckpt}", f"ref={tmp_path / 'ref'}", "n=20", "isc=false", f"metrics.cache_dir={tmp_path / 'cache'}"]
    first = evaluate(fid_args(*args))
    assert first["metrics"]["fid"] > 0 and (tmp_path / "run" / "metrics.json").is_file()
    assert not first["reference_cached"] and len(list((tmp_path / "cache").iterdir())) == 1
    again = evaluate(fid_args(*args))
    assert again["reference_cached"]  # the second evaluation computed no reference statistics
    assert again["metrics"]["fid"] == pytest.approx(first["metrics"]["fid"], rel=1e-6)  # same seed, same samples


def test_in_training_fid_equals_sagan_fid_of_the_checkpoint_with_the_cached_reference(tmp_path, tiny_cfg, caplog, stand_in_inception):
    """The one evaluation path: FID logged at step 2 equals `sagan-fid ckpt=<step 2> ref=train` with the same n,
    reference subset and seed, and sagan-fid reads the statistics training cached."""
    cache = f"metrics.cache_dir={tmp_path / 'cache'}"
    cfg = tiny_cfg("train.steps=2", "train.ckpt_every=2", "eval.every=2", "eval.num_samples=20", "eval.ref_images=16",
                   "train.seed=3", cache)  # fmt: skip
    train(cfg, tmp_path / "run")
    logged = next(json.loads(r)["metrics/fid"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "metrics/fid" in r)
    caplog.set_level("INFO", logger="sagan")
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002.pt"
    # ref=train takes the run's reference subset (eval.ref_images, drawn with train.seed); the samples' seed is ours.
    result = evaluate(fid_args(f"ckpt={ckpt}", "ref=train", "n=20", f"seed={cfg.train.seed}", "isc=false", cache))
    assert result["reference_cached"] and "reference statistics of train: cached in" in caplog.text
    assert abs(result["metrics"]["fid"] - logged) < 1e-4, (result["metrics"]["fid"], logged)
    assert "generated images 20/20 |" in caplog.text and "img/s" in caplog.text  # progress is shown


def test_statistics_file_gives_the_fid_of_its_images_and_smaller_references_are_resized(tmp_path, capsys, stand_in_inception):
    write_images(tmp_path / "ref", 24, 28)  # 28 px references for 32 px generated images: resized like training data
    write_images(tmp_path / "gen", 24, 32, seed=1)
    common = [f"gen={tmp_path / 'gen'}", "isc=false", f"metrics.cache_dir={tmp_path / 'cache'}"]
    folder = evaluate(fid_args(*common, f"ref={tmp_path / 'ref'}", f"save_ref={tmp_path / 'ref.npz'}", f"out={tmp_path / 'a.json'}"))
    assert folder["protocol"]["notes"] == ["reference resized from 28 px"]
    assert "reference resized from 28 px" in capsys.readouterr().out
    stats = evaluate(fid_args(*common, f"ref={tmp_path / 'ref.npz'}", f"out={tmp_path / 'b.json'}"))
    assert abs(stats["metrics"]["fid"] - folder["metrics"]["fid"]) < 1e-4
    assert stats["protocol"]["reference_images"] == 24 and f"24 reference images ({tmp_path / 'ref.npz'})" in capsys.readouterr().out
    with pytest.raises(MetricsError, match="KID needs the reference images' features"):
        evaluate(fid_args(*common, f"ref={tmp_path / 'ref.npz'}", "kid=true"))


@pytest.mark.slow
@pytest.mark.skipif(None in (WEIGHTS, TRAIN_ZIP, TEST_ZIP), reason="needs the offline CIFAR-10 zips and FID weights")
def test_cifar10_train_vs_test_and_untrained_generator(tmp_path, trained, capsys):
    """The real network on real data: FID(test, train) on 200 + 200 images of the JPEG CIFAR-10 copy is far below the
    FID of an untrained G against the same 200 training images (cached: computed once)."""
    common = ["ref_n=200", "n=200", "isc=false", f"metrics.inception_weights={WEIGHTS}", f"metrics.cache_dir={tmp_path / 'cache'}"]
    start = time.perf_counter()
    real = evaluate(fid_args(f"gen={TEST_ZIP}", f"ref={TRAIN_ZIP}", *common, f"out={tmp_path / 'real.json'}"))
    seconds = time.perf_counter() - start
    fake = evaluate(fid_args(f"ckpt={trained['uncond']}", f"ref={TRAIN_ZIP}", *common, f"out={tmp_path / 'fake.json'}"))
    with capsys.disabled():
        print(f"\nFID(CIFAR-10 test 200, train 200) = {real['metrics']['fid']:.2f} in {seconds:.0f} s; untrained G: {fake['metrics']['fid']:.1f}")
    assert fake["reference_cached"]
    assert 80 < real["metrics"]["fid"] < 200  # 124.9 here (2026-12-06): 200 images a side bias FID far above 50k's ~3
    assert fake["metrics"]["fid"] > 2 * real["metrics"]["fid"]


def test_evaluation_during_training_keeps_the_best_checkpoint(tmp_path, tiny_cfg, stand_in_inception):
    overrides = ["train.steps=2", "train.ckpt_every=100", "eval.every=1", "eval.num_samples=8", "eval.ref_images=8",
                 f"metrics.inception_weights={zero_classifier_weights(tmp_path)}", f"metrics.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    train(tiny_cfg(*overrides), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fids = [(row["step"], row["metrics/fid"]) for row in rows if "metrics/fid" in row]
    assert [step for step, _ in fids] == [1, 2] and all(f > 0 for _, f in fids)
    assert not any("metrics/is" in row for row in rows)  # weights without a classifier cannot give IS: skipped
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["best_fid"] == min(f for _, f in fids)
    assert best["trainer"]["step"] == min(fids, key=lambda sf: sf[1])[0]


def write_class_folders(root, names, n, size):
    for k, name in enumerate(names):
        write_images(root / name, n, size, seed=10 + k)


def test_intra_fid_is_each_class_sampled_and_scored_on_its_own(tmp_path, trained, capsys, stand_in_inception):
    """intra=true gives class k the FID of `sagan-sample class=k seed=<seed+k>` against that class's folder, and
    their mean: the same numbers through another path (PNG files and sagan-fid gen=)."""
    from sagan.sample import SampleArgs, sample

    ckpt = trained["cond"]
    names = ["circle", "square", "triangle"]  # the demo's 3 classes (folder order: sorted names)
    write_class_folders(tmp_path / "ref", names, 6, 32)
    common = ["isc=false", f"metrics.cache_dir={tmp_path / 'cache'}"]
    result = evaluate(fid_args(f"ckpt={ckpt}", f"ref={tmp_path / 'ref'}", "n=9", "seed=4", "intra=true", f"out={tmp_path / 'i.json'}", *common))
    classes = result["classes"]
    assert list(classes) == names and all(c["samples"] == 3 and c["reference_images"] == 6 for c in classes.values())
    assert result["metrics"]["intra_fid"] == pytest.approx(sum(c["fid"] for c in classes.values()) / 3)
    assert "intra-FID: 3 samples per class against that class's images" in result["protocol"]["notes"]
    printed = capsys.readouterr().out
    assert f"intra-FID  {result['metrics']['intra_fid']:.4f}" in printed  # in the table, and class by class
    assert f"| square | {classes['square']['fid']:.3f} |" in printed and "| intra-FID (mean) |" in printed
    for k, name in enumerate(names):
        sample(parse_args(SampleArgs, [f"ckpt={ckpt}", "n=3", f"class_={k}", f"seed={4 + k}", f"out={tmp_path / name}"]))
        alone = evaluate(fid_args(f"gen={tmp_path / name}", f"ref={tmp_path / 'ref' / name}", f"out={tmp_path / 'm.json'}", *common))
        assert alone["metrics"]["fid"] == pytest.approx(classes[name]["fid"], rel=1e-4), name


def test_truncation_curve_rows_are_the_single_truncation_evaluations(tmp_path, trained, capsys, stand_in_inception):
    from sagan.fid import truncation_list

    ckpt = run_copy(trained["uncond"], tmp_path)  # the curve's files are written beside it
    write_images(tmp_path / "ref", 10, 32)
    common = [f"ckpt={ckpt}", f"ref={tmp_path / 'ref'}", "n=10", "isc=false", f"metrics.cache_dir={tmp_path / 'cache'}"]
    curve = evaluate(fid_args(*common, "truncation=[0.5,2.0]"))
    printed = capsys.readouterr().out
    assert [row["truncation"] for row in curve["truncation"]] == [0.5, 2.0] and "metrics" not in curve
    assert "| truncation | FID |" in printed and "| 0.5 |" in printed
    assert Image.open(tmp_path / "run" / "truncation.png").size[0] > 300
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["truncation"][1]["truncation"] == 2.0
    one = evaluate(fid_args(*common, truncation_list("truncation=0.5")))
    assert one["metrics"]["fid"] == pytest.approx(curve["truncation"][0]["metrics"]["fid"], rel=1e-6)
    assert "z truncated to [-0.5, 0.5]" in one["protocol"]["notes"]
    assert curve["truncation"][0]["metrics"]["fid"] != pytest.approx(curve["truncation"][1]["metrics"]["fid"], rel=1e-3)


def test_intra_fid_refuses_what_it_cannot_compute_in_one_line(tmp_path, trained):
    uncond, cond = trained["uncond"], trained["cond"]
    write_images(tmp_path / "flat", 4, 32)
    write_class_folders(tmp_path / "two", ["a", "b"], 2, 32)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    cases = [
        ([f"ckpt={uncond}", f"ref={tmp_path / 'two'}"], "needs a class-conditional generator"),
        ([f"ckpt={cond}", f"ref={tmp_path / 'flat'}"], "needs reference images with labels"),
        ([f"ckpt={cond}", f"ref={tmp_path / 'two'}"], "the generator has 3 classes, the reference"),
        ([f"ckpt={cond}", f"ref={tmp_path / 'stats.npz'}"], "is a statistics file of the whole set"),
        ([f"gen={tmp_path / 'flat'}", f"ref={tmp_path / 'two'}"], "give ckpt=, not gen="),
    ]
    for argv, message in cases:
        with pytest.raises(MetricsError, match=message) as error:
            evaluate(fid_args(*argv, "intra=true", "isc=false", f"metrics.cache_dir={tmp_path / 'cache'}"))
        assert "\n" not in str(error.value)
