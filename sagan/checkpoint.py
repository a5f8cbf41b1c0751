"""Checkpoints: atomic writes, loading that never runs code, finding the one to resume from."""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sagan.utils.atomic_files import atomic_write
from sagan.config import ModelConfig
from sagan.models import Discriminator, Generator, build_models
from sagan.utils.errors import UserError

FORMAT = "sagan-checkpoint-v1"
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: missing, unsafe, corrupt or from another architecture."""


def save_checkpoint(state: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int, best: bool = False) -> Path:
    """Write `step_XXXXXXX.pt` and `last.pt` (same bytes, serialised once), keeping the newest `keep_last` step files;
    with `best=True` also `best.pt`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    data = serialize(state)
    if keep_last > 0:
        atomic_write(ckpt_dir / f"step_{step:07d}.pt", data)
        for old in sorted(step_files(ckpt_dir))[:-keep_last]:
            old.unlink()
    if best:
        atomic_write(ckpt_dir / "best.pt", data)
    last = ckpt_dir / "last.pt"
    atomic_write(last, data)
    return last


def serialize(state: dict[str, Any]) -> bytes:
    """A checkpoint's bytes: `state` with the format marker, as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    return buffer.getvalue()


def model_record(cfg: Any, num_classes: int) -> dict[str, Any]:
    """What defines the architecture, stored in checkpoints and compared on resume."""
    return {**OmegaConf.to_container(cfg.model, resolve=True), "num_classes": num_classes}


def remove_partial(ckpt_dir: Path) -> None:
    """Delete temporary files that a killed run left half-written (never a finished checkpoint)."""
    for tmp in ckpt_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def step_files(ckpt_dir: Path) -> list[Path]:
    return [p for p in ckpt_dir.glob("step_*.pt") if _STEP_FILE.search(p.name)]


def find_latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint `train.resume=auto` continues: last.pt, else the highest step file, else None."""
    if (ckpt_dir / "last.pt").is_file():
        return ckpt_dir / "last.pt"
    steps = step_files(ckpt_dir)
    return max(steps, key=lambda p: int(_STEP_FILE.search(p.name).group(1))) if steps else None


def load_weights_only(path: Path, *, holds: str, corrupt: str, fix: str, allowed: tuple = ()) -> Any:
    """`torch.load` on the CPU with `weights_only=True` (and the extra types `allowed`): never runs code. A file that
    would is refused, and a truncated or corrupt one reported, each in one line: "<holds> or has been tampered with",
    "<corrupt> is truncated or corrupt (...): <fix>"."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch explains at length; the line naming what was refused is the one that matters.
        detail = next((line for line in str(e).splitlines() if "unsupported" in line.lower()), "unsupported content")
        raise CheckpointError(f"refused to load '{path}': {detail.strip()} {holds} or has been tampered with") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{corrupt} is truncated or corrupt ({reason}): {fix}") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with `weights_only=True`: tensors and plain containers only, never code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist: pass the path of a .pt file written by sagan-train")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut-off one loses its central directory
        raise CheckpointError(f"checkpoint '{path}' is truncated or corrupt (not a complete PyTorch archive): use an earlier checkpoint")
    state = load_weights_only(
        path, holds="Sagan checkpoints hold only tensors and plain containers, so this file is not one of ours",
        corrupt=f"checkpoint '{path}'", fix="use an earlier checkpoint",
    )  # fmt: skip
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a sagan checkpoint (no '{FORMAT}' marker)")
    return state


def model_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model record, completed with the defaults of settings added since it was written (each added
    setting defaults to the behaviour the code had before it existed)."""
    return {**asdict(ModelConfig()), **saved}


def check_same_model(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Fail with the differing keys, not a wall of state-dict names, when a checkpoint's model config differs."""
    saved = model_settings(saved)
    # A renamed preset with the same values is the same model; the init scheme does not matter to loaded weights.
    keys = sorted((set(saved) | set(current)) - {"name", "init"})
    diffs = [f"model.{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint '{path}' is from another architecture: {'; '.join(diffs)}")


def networks_from_checkpoint(
    state: dict[str, Any], *, ema: bool, device: torch.device
) -> tuple[Generator, Discriminator | None]:
    """G_ema (or G with `ema=False`) and D of a loaded checkpoint, rebuilt from the model settings it records, in
    eval mode on `device`. D is None for an imported checkpoint whose source had no D."""
    model = OmegaConf.create(model_settings(state["model"]))
    G, D = build_models(model, model.num_classes)
    G.load_state_dict(state["trainer"]["G_ema" if ema else "G"])
    if "D" not in state["trainer"]:
        return G.to(device).eval(), None
    D.load_state_dict(state["trainer"]["D"])
    return G.to(device).eval(), D.to(device).eval()


NETWORKS = ("G_ema", "G", "D")


def load_network(path: str | Path, net: str = "G_ema") -> Generator | Discriminator:
    """One network of a sagan checkpoint (trained or imported), in eval mode on the CPU: `G(z, y)` draws images in
    [-1, 1] from z of shape (B, G.z_dim) and labels in [0, G.num_classes) (None when G.num_classes is 0)."""
    if net not in NETWORKS:
        raise UserError(f"net='{net}' is not in a sagan checkpoint: choose one of {', '.join(NETWORKS)}")
    state = load_checkpoint(path)
    G, D = networks_from_checkpoint(state, ema=net == "G_ema", device=torch.device("cpu"))
    if net != "D":
        return G
    if D is None:
        raise CheckpointError(f"'{path}' holds no D (it was imported from a generator alone)")
    return D


def run_dir_of(ckpt: str | Path) -> Path:
    """The run directory a checkpoint belongs to (the parent of its checkpoints/ folder), or the folder it lies in."""
    path = Path(ckpt).expanduser().resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent
