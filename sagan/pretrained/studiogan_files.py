"""StudioGAN's checkpoint files: which files make a run (G, D, G_ema at a step of `best` or `current`), read with
`weights_only=True`, and what to record of them (SHA-256, plain numbers)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sagan.checkpoint import CheckpointError, load_weights_only

WHICH = ("best", "current")
NETWORKS = ("G", "D", "G_ema")
_FILE = re.compile(r"^model=(G|D|G_ema)-(best|current)-weights-step=(\d+)\.pth$")
# What StudioGAN's D files hold besides tensors: its best FID is a numpy float64. Numpy scalars and dtypes are data
# (a dtype and raw bytes); allowed under both numpy module paths (numpy 1 wrote numpy.core, numpy 2 numpy._core).
_scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
_NUMPY_SCALARS = [
    (np.dtype, "numpy.dtype"),
    (_scalar, "numpy.core.multiarray.scalar"),
    (_scalar, "numpy._core.multiarray.scalar"),
    *(type(np.dtype(kind)) for kind in ("bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64")),
]
def run_files(src: Path, which: str | None) -> tuple[dict[str, Path], int, str]:
    """The G, D and G_ema files of a StudioGAN run (a folder, or one `model=...pth` file and the others beside it) at
    `which` (best or current), their step and the kind taken. G is required; D and G_ema are taken when they are
    there. `which` None takes best, or current when the folder holds no best G (a run saved before its first
    evaluation, or a download of its last step alone)."""
    if which is not None and which not in WHICH:
        raise CheckpointError(f"which={which} is not a StudioGAN checkpoint kind: choose best or current")
    if src.is_file():
        match = _FILE.match(src.name)
        if match is None:
            raise CheckpointError(
                f"'{src}' is not named like a StudioGAN checkpoint (model=G-best-weights-step=N.pth): pass a run folder "
                "or one of its model=... files"
            )
        folder, which, step = src.parent, match.group(2), int(match.group(3))
    elif src.is_dir():
        folder, step = src, None
    else:
        raise CheckpointError(f"'{src}' does not exist: pass a StudioGAN run folder or a model=G-...pth file")
    found = {kind: {} for kind in WHICH}  # kind -> network -> [(step, path)]
    for path in sorted(folder.iterdir()):
        match = _FILE.match(path.name)
        if match and (step is None or int(match.group(3)) == step):
            found[match.group(2)].setdefault(match.group(1), []).append((int(match.group(3)), path))
    if which is None:
        which = "current" if "G" not in found["best"] and "G" in found["current"] else "best"
    found = found[which]
    if "G" not in found:
        raise CheckpointError(
            f"no StudioGAN generator in '{folder}': expected model=G-{which}-weights-step=N.pth "
            f"({'which=best or which=current picks the kind' if src.is_dir() else 'beside the file given'})"
        )
    step = max(found["G"])[0]
    files = {net: dict(entries)[step] for net, entries in found.items() if step in dict(entries)}
    return files, step, which


def read_file(path: Path) -> dict[str, Any]:
    """A StudioGAN checkpoint file loaded with `weights_only=True` (tensors, plain containers and numpy scalars):
    anything else is refused without running it."""
    payload = load_weights_only(
        path, holds="StudioGAN checkpoints hold tensors, plain containers and numpy numbers, so this file is not one",
        corrupt=f"'{path}'", fix="download it again", allowed=tuple(_NUMPY_SCALARS),
    )  # fmt: skip
    state = payload.get("state_dict") if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' has no 'state_dict' of tensors: it is not a StudioGAN model checkpoint")
    # Runs saved from DataParallel before StudioGAN peeled its models carry a "module." prefix.
    payload["state_dict"] = {k.removeprefix("module."): v for k, v in state.items()}
    return payload


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plain(value: Any) -> Any:
    """A numpy number as a Python one (sagan checkpoints hold plain types only)."""
    return value.item() if isinstance(value, np.generic) else value
