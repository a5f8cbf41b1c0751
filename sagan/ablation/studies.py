"""What `sagan-ablate` can run: the studies (their variants are conf/ablation/<study>-<variant>.yaml) and the scales
(the training recipe and the one evaluation protocol every run of a study is judged by)."""

from __future__ import annotations

from dataclasses import dataclass
from sagan.utils.errors import UserError

STUDIES = {
    # No attention, then attention at each feature-map size G and D share (paper, table 1; the sizes of the scale).
    "position": ("none", "feat8", "feat16", "feat32", "feat64"),
    # Every model.attn_type at the preset's attention places.
    "block": ("sagan", "multihead", "simple", "local", "se", "cbam", "residual"),
    "sn_g": ("sn", "no_sn"),  # spectral norm on G and D, or on D only
    "ttur": ("ttur", "equal_5d"),  # TTUR, or equal learning rates with 5 D steps per G step
    "augment": ("none", "diffaugment"),  # a tenth of the data, without and with DiffAugment
}


@dataclass(frozen=True)
class Scale:
    overrides: tuple[str, ...]  # sagan-train overrides: the recipe
    resolution: int
    n: int  # generated images per evaluation
    ref: str  # the reference, as sagan-fid's ref=
    ref_n: int | None  # reference images (a seeded subset); None: all
    curve: str  # the metrics.jsonl key plotted against training steps
    about: str


SCALES = {
    "demo": Scale(
        overrides=("experiment=demo",),
        resolution=32,
        n=200,
        ref="demo",
        ref_n=500,
        curve="score/mirror_consistency",
        about="the quick start's demo (experiment=demo: G and D width 16, the mirror-symmetric shapes, 2,800 steps of "
        "batch 16): about 3.5 minutes per run on 2 CPU cores",
    ),
    "cifar10": Scale(
        overrides=("experiment=cifar10", "eval.every=5000", "eval.num_samples=10000"),
        resolution=32,
        n=10_000,
        ref="train",
        ref_n=None,
        curve="metrics/fid",
        about="the paper's recipe on CIFAR-10 (experiment=cifar10, 100k steps): a GPU per run",
    ),
    "imagenet128": Scale(
        overrides=("experiment=imagenet128", "eval.every=10000", "eval.num_samples=10000"),
        resolution=128,
        n=10_000,
        ref="train",
        ref_n=None,
        curve="metrics/fid",
        about="the paper's ImageNet 128 px setting (experiment=imagenet128): several GPUs per run",
    ),
}


# Studies whose runs must be judged against other images than the scale's reference: a run on a fraction of the data
# is compared with held-out images, not with the images it could have memorised (DiffAugment's protocol).
REFERENCES = {("augment", "cifar10"): ("cifar10-test", None)}


def protocol(study: str, scale: str) -> tuple[int, str, int | None]:
    """(generated images, reference, reference images or None for all) of the evaluation of `study` at `scale`."""
    s = SCALES[scale]
    ref, ref_n = REFERENCES.get((study, scale), (s.ref, s.ref_n))
    return s.n, ref, ref_n


def variants(study: str, scale: str) -> list[str]:
    """The variants of `study` at `scale`: attention positions are the feature-map sizes both G and D have."""
    if study not in STUDIES:
        raise UserError(f"unknown study '{study}': choose one of {', '.join(STUDIES)}")
    if scale not in SCALES:
        raise UserError(f"unknown scale '{scale}': choose one of {', '.join(SCALES)}")
    names = STUDIES[study]
    if study == "position":  # D's largest feature map is half the image
        names = tuple(v for v in names if v == "none" or int(v.removeprefix("feat")) < SCALES[scale].resolution)
    return list(names)
