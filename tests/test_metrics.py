import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from sagan.cli import parse_args
from sagan.fid import FidArgs, evaluate
from sagan.metrics import GeneratorSamples, ImagesOnly, MetricsError, classifier_missing, compute_metrics
from sagan.models import Generator

WEIGHTS = os.environ.get("SAGAN_FID_WEIGHTS")
needs_weights = pytest.mark.skipif(WEIGHTS is None, reason="needs SAGAN_FID_WEIGHTS (offline FID Inception weights)")
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


def zero_classifier_weights(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, path)
    return str(path)


def test_inception_score_is_refused_with_an_all_zero_classifier(tmp_path):
    weights = zero_classifier_weights(tmp_path)
    assert classifier_missing(weights)
    torch.save({"fc.weight": torch.ones(2, 2)}, tmp_path / "real.pth")
    assert not classifier_missing(str(tmp_path / "real.pth")) and not classifier_missing(None)
    images = ImagesOnly([(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)] * 4)
    with pytest.raises(MetricsError, match="Inception Score refused.*all zeros"):
        compute_metrics(images, images, num_samples=4, reference_cache=None, isc=True, fid=False, weights=weights)


def test_kid_needs_enough_samples():
    images = ImagesOnly([(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)] * 10)
    with pytest.raises(MetricsError, match="KID needs at least kid_subset_size=1000 images"):
        compute_metrics(images, images, num_samples=10, reference_cache=None, isc=False, kid=True)


def test_inception_runs_without_tf32_and_training_flags_come_back(monkeypatch):
    """TF32 (on for training) is off while torch-fidelity runs, and restored afterwards."""
    import torch_fidelity

    seen = {}

    def fake_metrics(**kwargs):
        seen["flags"] = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        return {"frechet_inception_distance": 1.0}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", fake_metrics)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as resolve_perf leaves them
    try:
        images = ImagesOnly([(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)] * 4)
        assert compute_metrics(images, images, num_samples=4, reference_cache=None, isc=False) == {"fid": 1.0}
        assert seen["flags"] == (False, False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_conditional_generator_draws_its_own_labels():
    G = Generator(z_dim=16, ch=4, resolution=32, attn_resolutions=(), num_classes=5).eval()
    wrapped = GeneratorSamples(G, seed=0)
    assert wrapped.num_classes == 0  # torch-fidelity never draws labels (its np.int call would crash)
    images = wrapped(torch.randn(6, 16))
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 32, 32)


def write_images(folder, n, size, seed=0):
    folder.mkdir(parents=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def fid_args(*argv):
    return parse_args(FidArgs, list(argv))


def test_cli_errors_are_clear(tmp_path, tiny_cfg):
    (tmp_path / "empty").mkdir()
    write_images(tmp_path / "small", 2, 16)
    write_images(tmp_path / "gen", 2, 32, seed=1)
    with pytest.raises(MetricsError, match="exactly one of ckpt"):
        evaluate(fid_args(f"ref={tmp_path / 'small'}"))
    with pytest.raises(ValueError, match="no images found"):
        evaluate(fid_args(f"gen={tmp_path / 'empty'}", f"ref={tmp_path / 'small'}", "isc=false"))
    with pytest.raises(MetricsError, match="16x16, smaller than the 32x32 generated images"):
        evaluate(fid_args(f"gen={tmp_path / 'gen'}", f"ref={tmp_path / 'small'}", "isc=false"))
    with pytest.raises(MetricsError, match="neither an existing folder/.zip nor a known dataset"):
        evaluate(fid_args(f"gen={tmp_path / 'gen'}", "ref=imagenet-train", "isc=false"))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        evaluate(fid_args(f"ckpt={tmp_path / 'bad.pt'}", f"ref={tmp_path / 'gen'}", "isc=false"))


@needs_weights
def test_fid_of_a_set_against_itself_is_zero(tmp_path):
    write_images(tmp_path / "a", 24, 32)
    args = ["isc=true", f"metrics.inception_weights={WEIGHTS}", f"metrics.cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'm.json'}"]
    result = evaluate(fid_args(f"gen={tmp_path / 'a'}", f"ref={tmp_path / 'a'}", *args))
    assert abs(result["metrics"]["fid"]) < 1e-2
    assert result["is_refused"].startswith("IS refused") and "is" not in result["metrics"]  # shared weights: no IS
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["protocol"]["num_samples"] == 24 and written["protocol"]["feature_extractor"] == "inception-v3-compat"


@needs_weights
def test_conditional_checkpoint_evaluates_and_reference_statistics_are_cached(tmp_path, tiny_cfg):
    from sagan.train import train

    train(tiny_cfg("train.steps=1", "model.conditional=true"), tmp_path / "run")
    write_images(tmp_path / "ref", 20, 32)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    args = [f"ckpt={ckpt}", f"ref={tmp_path / 'ref'}", "n=20", "isc=false", f"metrics.inception_weights={WEIGHTS}", f"metrics.cache_dir={tmp_path / 'cache'}"]
    first = evaluate(fid_args(*args))
    assert first["metrics"]["fid"] > 0 and (tmp_path / "run" / "metrics.json").is_file()
    assert any((tmp_path / "cache").rglob("*"))  # reference statistics were cached
    again = evaluate(fid_args(*args))
    assert again["metrics"]["fid"] == pytest.approx(first["metrics"]["fid"], rel=1e-6)  # same seed, same samples


@pytest.mark.slow
@pytest.mark.skipif(None in (WEIGHTS, TRAIN_ZIP, TEST_ZIP), reason="needs the offline CIFAR-10 zips and FID weights")
def test_cifar10_train_vs_test_and_untrained_generator(tmp_path, tiny_cfg, capsys):
    """FID(train, test) on 500 + 500 images of the JPEG CIFAR-10 copy is small; an untrained G is far worse."""
    from sagan.train import train

    common = ["ref_n=500", "isc=false", f"metrics.inception_weights={WEIGHTS}", f"metrics.cache_dir={tmp_path / 'cache'}"]
    start = time.perf_counter()
    real = evaluate(fid_args(f"gen={TEST_ZIP}", "n=500", f"ref={TRAIN_ZIP}", *common, f"out={tmp_path / 'real.json'}"))
    seconds = time.perf_counter() - start
    train(tiny_cfg("train.steps=1", "model.g_ch=8"), tmp_path / "run")
    fake = evaluate(fid_args(f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", f"ref={TRAIN_ZIP}", "n=500", *common))
    with capsys.disabled():
        print(f"\nFID(CIFAR-10 test, train 500) = {real['metrics']['fid']:.2f} in {seconds:.0f} s; untrained G: {fake['metrics']['fid']:.1f}")
    assert 50 < real["metrics"]["fid"] < 100  # measured 75.5: 500 images per side bias FID far above the ~3 of 50k
    assert fake["metrics"]["fid"] > 200


@needs_weights
def test_evaluation_during_training_keeps_the_best_checkpoint(tmp_path, tiny_cfg):
    from sagan.checkpoint import load_checkpoint
    from sagan.train import train

    overrides = ["train.steps=2", "train.ckpt_every=100", "eval.every=1", "eval.num_samples=8", "eval.ref_images=8",
                 f"metrics.inception_weights={WEIGHTS}", f"metrics.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    train(tiny_cfg(*overrides), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fids = [(row["step"], row["metrics/fid"]) for row in rows if "metrics/fid" in row]
    assert [step for step, _ in fids] == [1, 2] and all(f > 0 for _, f in fids)
    assert not any("metrics/is" in row for row in rows)  # the offline weights cannot give IS: skipped
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["best_fid"] == min(f for _, f in fids)
    assert best["trainer"]["step"] == min(fids, key=lambda sf: sf[1])[0]
