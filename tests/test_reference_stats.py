"""Reference statistics in constant memory: FID's mu and sigma summed batch by batch (FeatureMoments) equal
torch-fidelity's statistics of all the features, across processes too; no N x 2048 tensor exists unless features are
asked for; the cache keeps statistics only, and is computed again when features are asked for later."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch_fidelity.metric_fid import fid_features_to_statistics

from sagan.data.datasets import ImageSubset
from sagan.data.demo import MirrorShapes
from sagan.evaluation.inception import Inception
from sagan.evaluation.moments import FeatureMoments
from sagan.evaluation.reference_files import save_reference_file
from sagan.evaluation.reference_stats import cache_key, dataset_reference
from sagan.utils.atomic_files import DiskFull
from sagan.utils.processes import SINGLE, rank_part
from sagan.utils.errors import UserError
from conftest import WEIGHTS, needs_weights
from test_run_dir import FullDisk

EPS = np.finfo(np.float64).eps
D = 2048


def tolerance(features: torch.Tensor) -> tuple[float, float]:
    """How far two float64 computations of mu and sigma of `features` may differ when neither cancels large terms.

    A float64 sum of N terms is off by about sqrt(N) (at worst log2 N pairwise, N sequentially) ulps of its terms;
    at the sizes here (N <= 600: sqrt N < 25) 64 ulps bound it with margin. mu's terms are the features: 64 ulps of
    max |x|. sigma's error comes from the means (off by ulps of |x|) multiplied by the spread |x - mean| they centre,
    plus the scatter's own sum (ulps of spread^2, smaller): 64 ulps of max |x| times max |x - mean|. Summing raw
    x x^T loses ulps of |x|^2 instead, more than this allows for features of 1000 + noise (checked below).
    """
    x = features.double()
    size, spread = x.abs().max().item(), (x - x.mean(0)).abs().max().item()
    return 64 * EPS * size, 64 * EPS * size * spread


def assert_statistics_equal(mu, sigma, features: torch.Tensor) -> None:
    """mu and sigma equal torch-fidelity's statistics of all `features` within `tolerance`."""
    expected = fid_features_to_statistics(features.double())
    mu_tol, sigma_tol = tolerance(features)
    assert np.abs(mu - expected["mu"]).max() <= mu_tol
    assert np.abs(sigma - expected["sigma"]).max() <= sigma_tol


def offset_features(n: int, seed: int) -> torch.Tensor:
    """(n, 2048) float32 features like 1000 + noise: unequal scales per feature and a shared low-rank part, so the
    covariance has structure off the diagonal, far from 0 (where summing raw products loses digits)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, D, generator=g) * torch.rand(D, generator=g)
    shared = torch.randn(n, 4, generator=g) @ torch.randn(4, D, generator=g) / 4
    return 1000 + noise + shared


def moments_of(*batches: torch.Tensor) -> FeatureMoments:
    moments = FeatureMoments(D)
    for batch in batches:
        moments.update(batch)
    return moments


def test_moments_of_unequal_batches_equal_torch_fidelity_statistics_far_from_zero():
    features = offset_features(600, seed=0)
    sizes = [1, 7, 64, 300, 2, 226]  # a batch of one row has no scatter of its own: only the update moves it
    mu, sigma = moments_of(*features.split(sizes)).statistics()
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (D, D)
    assert_statistics_equal(mu, sigma, features)
    # The tolerance tells centred sums from raw products: sigma from sum(x x^T) - n mu mu^T, in float64, misses it.
    x = features.double()
    raw = (x.T @ x - len(x) * torch.outer(x.mean(0), x.mean(0))) / (len(x) - 1)
    expected = fid_features_to_statistics(x)["sigma"]
    assert np.abs(raw.numpy() - expected).max() > tolerance(features)[1]


def test_statistics_need_two_images():
    with pytest.raises(UserError, match="at least 2 images, got 1"):
        moments_of(offset_features(1, seed=1)).statistics()
    moments = moments_of(offset_features(5, seed=1), torch.empty(0, D))  # an empty batch changes nothing
    assert moments.count == 5


WORKER = """
import sys

import numpy as np
import torch
import torch.distributed as dist

from sagan.evaluation.moments import FeatureMoments
from sagan.utils.processes import World, rank_part

rank, store, features, out = int(sys.argv[1]), sys.argv[2], torch.from_numpy(np.load(sys.argv[3])), sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
part = rank_part(len(features), rank, 2)
moments = FeatureMoments(features.shape[1])
for batch in features[part.start : part.stop].split(3):
    moments.update(batch)
moments.all_reduce(World(rank=rank, size=2))
mu, sigma = moments.statistics()
np.savez(f"{out}{rank}.npz", mu=mu, sigma=sigma, count=moments.count)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_reduce_their_moments_to_the_statistics_of_all_rows(tmp_path):
    """All-reduce over gloo, as under torchrun: ranks with unequal parts and different means."""
    features = offset_features(11, seed=2)
    features[rank_part(11, 1, 2).start :] -= 3
    np.save(tmp_path / "features.npy", features.numpy())
    command = [sys.executable, "-c", WORKER]
    args = [str(tmp_path / "store"), str(tmp_path / "features.npy"), str(tmp_path / "rank")]
    workers = [subprocess.Popen([*command, str(rank), *args], stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err[-3000:]
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as saved:
            assert int(saved["count"]) == 11
            assert_statistics_equal(saved["mu"], saved["sigma"], features)


# Features exact in float32 whatever the batching: integer pixel sums (< 2^24) scaled by a power of two, plus 1000.
PIXEL_WEIGHTS = torch.randint(-1, 2, (3 * 8 * 8, D), generator=torch.Generator().manual_seed(3)).float()


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 8, 8) uint8 -> (B, 2048): what the fake network computes."""
    return 1000 + images.float().flatten(1) @ PIXEL_WEIGHTS / 256


def fake_inception(calls: list[int]) -> Inception:
    """The Inception wrapper with its network replaced by `pixel_features`; `calls` collects the batch sizes."""

    def network(images):
        calls.append(len(images))
        return (pixel_features(images),)

    inception = Inception.__new__(Inception)
    inception.net, inception.device, inception.logits = network, torch.device("cpu"), False
    return inception


def all_features(dataset, limit: int | None, seed: int) -> torch.Tensor:
    """The features of a reference subset in its order, in one batch, outside the code under test."""
    return pixel_features(torch.stack(list(ImageSubset(dataset, limit=limit, seed=seed))))


class TensorShapes(TorchFunctionMode):
    """Records the shape of every tensor a torch function returns while active (factories such as torch.empty too)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def reference_of(dataset, inception, cache, *, need_features, limit=None, seed=0, batch_size=4):
    return dataset_reference(
        dataset, inception, description="demo", resolution=8, limit=limit, seed=seed, weights=None,
        cache_root=str(cache), world=SINGLE, batch_size=batch_size, need_features=need_features,
    )  # fmt: skip


def test_statistics_without_features_never_hold_more_than_a_batch_of_features(tmp_path):
    dataset = MirrorShapes(size=13, resolution=8, seed=0, labels=False)
    calls: list[int] = []
    with TensorShapes() as seen:
        reference = reference_of(dataset, fake_inception(calls), tmp_path, need_features=False, batch_size=4)
    assert calls == [4, 4, 4, 1] and reference.features is None and not reference.cached
    rows = [shape[0] for shape in seen.shapes if len(shape) == 2 and shape[1] == D and shape != (D, D)]
    assert rows and max(rows) <= 4, sorted(set(rows))  # features of one batch at a time, never (13, 2048)
    assert_statistics_equal(reference.mu, reference.sigma, all_features(dataset, None, 0))


def test_cache_without_features_is_computed_again_when_features_are_asked_for(tmp_path, caplog):
    caplog.set_level("INFO", logger="sagan")
    dataset = MirrorShapes(size=13, resolution=8, seed=0, labels=False)
    expected = all_features(dataset, limit=10, seed=1)  # a seeded subset: the features come back in its order
    path = tmp_path / f"{cache_key(dataset, 8, 10, 1, None)}.npz"
    calls: list[int] = []
    inception = fake_inception(calls)

    first = reference_of(dataset, inception, tmp_path, need_features=False, limit=10, seed=1)
    with np.load(path) as saved:
        assert sorted(saved.files) == ["mu", "num_images", "resolution", "sigma"] and int(saved["num_images"]) == 10
    assert first.features is None and sum(calls) == 10

    second = reference_of(dataset, inception, tmp_path, need_features=True, limit=10, seed=1)
    assert not second.cached and sum(calls) == 20 and torch.equal(second.features, expected)
    assert "without features, which KID/precision-recall need" in caplog.text
    assert "keeping the 10 reference features for KID/precision-recall: 0.1 MiB" in caplog.text
    assert_statistics_equal(second.mu, second.sigma, expected)
    with np.load(path) as saved:
        assert np.array_equal(saved["features"], expected.numpy()) and np.array_equal(saved["sigma"], second.sigma)

    third = reference_of(dataset, inception, tmp_path, need_features=True, limit=10, seed=1)
    fourth = reference_of(dataset, inception, tmp_path, need_features=False, limit=10, seed=1)
    assert third.cached and fourth.cached and sum(calls) == 20  # both read the file: no image went through again
    assert torch.equal(third.features, expected) and fourth.features is None
    assert np.array_equal(fourth.mu, second.mu) and np.array_equal(fourth.sigma, second.sigma)


def test_an_unreadable_cache_file_is_computed_again_and_rewritten(tmp_path, caplog):
    dataset = MirrorShapes(size=6, resolution=8, seed=0, labels=False)
    path = tmp_path / f"{cache_key(dataset, 8, None, 0, None)}.npz"
    path.write_bytes(b"cut short by a full disk")
    calls: list[int] = []
    reference = reference_of(dataset, fake_inception(calls), tmp_path, need_features=False)
    assert not reference.cached and sum(calls) == 6 and "cannot be read" in caplog.text
    assert_statistics_equal(reference.mu, reference.sigma, all_features(dataset, None, 0))
    with np.load(path) as saved:  # rewritten whole
        assert np.array_equal(saved["mu"], reference.mu)


@needs_weights
def test_reference_of_the_real_network_has_the_statistics_of_its_features(tmp_path):
    """The real FID Inception, 12 demo images: the summed statistics equal torch-fidelity's of the kept features,
    which are those `Inception.features` gives for the same batches."""
    dataset = MirrorShapes(size=12, resolution=32, seed=0, labels=False)
    inception = Inception(weights=WEIGHTS, device=torch.device("cpu"))
    reference = dataset_reference(
        dataset, inception, description="demo", resolution=32, limit=None, seed=0, weights=WEIGHTS,
        cache_root=str(tmp_path), world=SINGLE, batch_size=5, need_features=True,
    )  # fmt: skip
    images = torch.stack(list(ImageSubset(dataset)))
    pool, _ = inception.features(images.split(5), total=12, what="reference images")
    assert reference.features.shape == (12, D) and torch.equal(reference.features, pool)
    assert_statistics_equal(reference.mu, reference.sigma, pool)


def test_a_full_disk_while_caching_warns_in_one_line_and_leaves_no_file(tmp_path, monkeypatch, caplog):
    """The statistics are computed: the evaluation goes on with them, the cache is left without a part of a file.
    A statistics file asked for (`save_ref=`) is another matter: the command stops with the same line."""
    dataset = MirrorShapes(size=6, resolution=8, seed=0, labels=False)
    path = tmp_path / "cache" / f"{cache_key(dataset, 8, None, 0, None)}.npz"
    disk = FullDisk(monkeypatch, "sagan-ref-")
    reference = reference_of(dataset, fake_inception([]), tmp_path / "cache", need_features=False)
    assert_statistics_equal(reference.mu, reference.sigma, all_features(dataset, None, 0))
    warning = next(r.getMessage() for r in caplog.records if "not cached" in r.getMessage())
    assert "\n" not in warning and f"no space left on the device writing {path}: it needs 32.0 MiB" in warning
    assert list(path.parent.iterdir()) == [] and disk.hits == 1  # no partial cache, no temporary file
    disk.name = "saved.npz"
    with pytest.raises(DiskFull, match=r"no space left on the device writing .*saved\.npz: it needs 32\.0 MiB"):
        save_reference_file(tmp_path / "saved.npz", reference)
    assert disk.hits == 2
    assert not any(p.name.endswith(".npz") or p.name.endswith(".tmp") for p in tmp_path.iterdir())
