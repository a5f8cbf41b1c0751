"""What `sagan-fid`'s `ref=` and `gen=` name: a statistics file, or images (a folder or zip, a torchvision dataset,
the demo, the run's own training data) prepared at the generator's resolution as training images are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from sagan.data.datasets import named_dataset, training_dataset
from sagan.data.folders import ImageFolder
from sagan.evaluation.metrics import MetricsError
from sagan.evaluation.reference_files import load_reference_file
from sagan.evaluation.reference_stats import Reference


def reference_source(
    args: Any, resolution: int | None, state: dict | None
) -> tuple[Dataset | Reference, int, list[str], int | None, int]:
    """What `ref` names: a statistics file (loaded), or reference images prepared at `resolution` (their own size when
    nothing is generated); the resolution, the protocol's notes, and the subset (size, seed) of the images.

    `ref=train` takes the run's own evaluation subset (eval.ref_images drawn with train.seed) unless ref_n is given,
    so that it evaluates exactly as training did.
    """
    if Path(args.ref).suffix == ".npz":
        if args.save_ref is not None:
            raise MetricsError(f"ref={args.ref} is a statistics file already: save_ref= saves the statistics of images")
        reference = load_reference_file(args.ref)
        made_at = reference.resolution
        notes = (
            [f"reference statistics made at {made_at} px"] if made_at and resolution and made_at != resolution else []
        )
        return reference, resolution or made_at or 0, notes, None, args.seed
    limit, subset_seed = args.ref_n, args.seed
    if args.ref == "train" and state is not None:
        config = state["config"]
        limit = args.ref_n if args.ref_n is not None else config["eval"]["ref_images"]
        subset_seed = config["train"]["seed"]
    common = dict(data_root=args.data_root, download=args.download, state=state, labels=False)
    dataset = reference_dataset(args.ref, resolution=resolution or 32, **common)
    side = dataset.native_side()
    notes = [f"reference resized from {side} px"] if side is not None and resolution and side != resolution else []
    if resolution is None:  # statistics only, at the reference's own size
        resolution = side or 32
        dataset = reference_dataset(args.ref, resolution=resolution, **common)
    return dataset, resolution, notes, limit, subset_seed


def reference_dataset(
    ref: str, *, resolution: int, data_root: str, download: bool, state: dict | None, labels: bool
) -> Dataset:
    """The reference images of `ref` (not a statistics file), prepared at `resolution` as training images are, with
    their labels when asked (and when they have some)."""
    if ref == "train":
        if state is None:
            raise MetricsError("ref=train means the data a checkpoint trained on: give ckpt=<checkpoint>")
        return training_dataset(state["config"], resolution=resolution, labels=labels)
    return named_dataset(
        ref, resolution=resolution, data_root=data_root, download=download, labels=labels, also=".npz statistics, train"
    )


def generated_resolution(gen: str) -> int:
    """The (square) size of the first generated image in a folder / zip."""
    folder = ImageFolder(Path(gen).expanduser(), resolution=1, labels=False)
    width, height = folder.native_size(0)
    if width != height:
        raise MetricsError(f"generated images must be square, the first in '{gen}' is {width}x{height}")
    return width
