"""Devices, processes, seeding and the global RNG states a checkpoint restores.

Several processes are started by `torchrun`, which tells each its place in environment variables (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT); `init_distributed` reads them and joins the process group: NCCL for CUDA
tensors, gloo for CPU tensors. Without them there is one process and no process group.
"""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from sagan.utils.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0  # index on this machine: the GPU it uses
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0


SINGLE = World()  # one process


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system has one, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def world_from_env() -> World:
    """The place torchrun gave this process (one process when not started by torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    return World(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)), size=size)


def init_distributed(device_name: str, timeout_min: float) -> tuple[World, torch.device]:
    """This process's World and training device, joining the process group when there are several processes.

    Each process takes the GPU of its local rank. `timeout_min` bounds how long the others wait for rank 0's
    checkpoint writes and FID computations before the run is declared hung.
    """
    world = world_from_env()
    device = resolve_device(device_name, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # also the GPU whose RNG state checkpoints keep
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(minutes=timeout_min),
            device_id=device if device.type == "cuda" else None,
        )
    return world, device


def leave_distributed(world: World) -> None:
    """Leave the process group at the end of training, once the DDP wrappers that hold it have been dropped.

    A group still held when the interpreter exits is torn down during finalization, where gloo can abort the process
    (SIGABRT after a run that succeeded, which torchrun reports as a failure).
    """
    if world.size > 1:
        gc.collect()  # wrappers caught in reference cycles
        dist.destroy_process_group()


def resolve_device(name: str, world: World = SINGLE) -> torch.device:
    """The device `device=` names: 'auto' is the GPU when there is one, else the CPU; anything else is a torch device
    name. A GPU always comes back with its index, as `torch.cuda.set_device`, NCCL and DDP need it: 'auto' and 'cuda'
    mean the GPU of this process's local rank among those it sees (with one GPU per process, as SLURM's
    --gpus-per-task gives, that one; with one process, cuda:0), 'cuda:N' GPU N of one process."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}': use device=auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible: use device=cpu or device=auto")
    count = torch.cuda.device_count()
    if device.index is None:
        return torch.device("cuda", world.local_rank % count)
    if world.size > 1:
        raise UserError(
            f"device={name} with {world.size} processes: use device=auto or device=cuda, each process then takes "
            "the GPU of its local rank (choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if device.index >= count:
        raise UserError(
            f"device={name}, but this process sees {count} GPU(s), cuda:0 to cuda:{count - 1}: choose one of them "
            "(CUDA_VISIBLE_DEVICES chooses which GPUs a process sees)"
        )
    return device


def rank_seed(seed: int, rank: int) -> int:
    """A seed for `rank`'s own random streams, derived from the run seed (rank 0 keeps the run seed)."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint32)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain containers, so they load with weights_only=True."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        # The current GPU's only: a run may resume with fewer GPUs visible to each process.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"]}},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np_state = state["numpy"]
    key = np_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**np_state, "state": {"key": key, "pos": np_state["state"]["pos"]}})
    random.setstate(state["python"])


def resolve_perf(perf: Any, device: torch.device) -> dict[str, Any]:
    """The speed options for `device`: config values, with null / "auto" resolved; sets the global CUDA flags."""
    precision = auto_precision(device) if perf.precision == "auto" else perf.precision
    if perf.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(
            "perf.precision=bf16, but this GPU has no native bf16 (GPUs before NVIDIA's Ampere, such as the V100 and "
            "T4, only emulate it): use perf.precision=fp16 (loss-scaled) or auto"
        )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = perf.tf32
        torch.backends.cudnn.benchmark = perf.cudnn_benchmark
    return {
        "precision": precision,
        "channels_last": precision != "fp32" if perf.channels_last is None else perf.channels_last,
        "fused_adam": device.type == "cuda" if perf.fused_adam is None else perf.fused_adam,
        "compile": perf.compile,
    }


def auto_precision(device: torch.device) -> str:
    """perf.precision=auto: bf16 autocast where the hardware computes in bf16 (GPUs from Ampere on, CPUs with
    AVX512-BF16 or AMX), fp16 autocast with loss scaling on older GPUs, else fp32. (`is_bf16_supported` would also
    count the emulated bf16 of older GPUs, which is slower than fp32.)"""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16"
    return "fp32"


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank (a small picklable value: a path, a few numbers)."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def rank_part(n: int, rank: int, world_size: int) -> range:
    """The contiguous part of n items that `rank` of `world_size` takes (the first ranks take one more if needed)."""
    share, extra = divmod(n, world_size)
    start = rank * share + min(rank, extra)
    return range(start, start + share + (rank < extra))


def gather_rows(tensor: torch.Tensor, world: World) -> torch.Tensor | None:
    """Every rank's rows of `tensor` (on the CPU; row counts may differ), concatenated in rank order on rank 0; None on
    the other ranks. For features: 2,048 floats per image travel, not the images."""
    if world.size == 1:
        return tensor
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world.size)]
    dist.all_gather(counts, torch.tensor([len(tensor)]))
    longest = max(int(c) for c in counts)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype)
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in range(world.size)] if world.main else None
    dist.gather(padded, parts, dst=0)
    return torch.cat([part[: int(c)] for part, c in zip(parts, counts)]) if world.main else None


@contextmanager
def main_rank_first(world: World) -> Iterator[None]:
    """Run the block on rank 0 first, then on the others: what it downloads or writes once is there for them."""
    if not world.main:
        barrier(world)
    yield
    if world.main:
        barrier(world)


def barrier(world: World) -> None:
    """Wait for every rank (for example, for rank 0 to finish writing a checkpoint)."""
    if world.size > 1:
        dist.barrier()


def broadcast_buffers(modules: list[torch.nn.Module], world: World) -> None:
    """Copy rank 0's buffers (BatchNorm statistics, spectral-norm u and v) to every rank, one message per dtype."""
    if world.size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for module in modules:
        for buffer in module.buffers():
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        torch._foreach_copy_(buffers, [t.view_as(b) for t, b in zip(flat.split([b.numel() for b in buffers]), buffers)])


class StopVote:
    """Agree across ranks on stopping (a signal may reach only some of them), without waiting on the network.

    Each step every rank calls `poll(wants_stop)`, which returns whether any rank wanted to stop at its previous call:
    the vote travels (gloo, on CPU) while the step runs. With one process it returns `wants_stop` at once.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.flag = torch.zeros(1, dtype=torch.int32)
        self.pending: dist.Work | None = None

    def poll(self, wants_stop: bool) -> bool:
        if self.world.size == 1:
            return wants_stop
        agreed = False
        if self.pending is not None:
            self.pending.wait()
            agreed = bool(self.flag.item())
        self.flag.fill_(int(wants_stop))
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, async_op=True)
        return agreed

    def close(self) -> None:
        """Wait for the last vote, so no rank leaves while a message to it is in flight."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
