"""Devices, seeding and the global RNG states a checkpoint restores."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """'auto' is the GPU when there is one, else the CPU; anything else is taken as a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}': use device=auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA GPU is visible: use device=cpu or device=auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain containers, so they load with weights_only=True."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"]}},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    key = np_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**np_state, "state": {"key": key, "pos": np_state["state"]["pos"]}})
    random.setstate(state["python"])


def resolve_perf(perf: Any, device: torch.device) -> dict[str, Any]:
    """The speed options for `device`: config values, with null / "auto" resolved; sets the global CUDA flags."""
    fast_bf16 = device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    precision = ("bf16" if fast_bf16 else "fp32") if perf.precision == "auto" else perf.precision
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = perf.tf32
        torch.backends.cudnn.benchmark = perf.cudnn_benchmark
    return {
        "precision": precision,
        "channels_last": precision == "bf16" if perf.channels_last is None else perf.channels_last,
        "fused_adam": device.type == "cuda" if perf.fused_adam is None else perf.fused_adam,
        "compile": perf.compile,
    }
