"""This CPU-only machine shown as one with CUDA GPUs, as far as choosing a device looks, so that the paths only a GPU
takes meet PyTorch's own checks here.

Only what the machine lacks is patched: `torch.cuda.is_available` and `device_count` answer as on a machine with n
GPUs (`torch.accelerator` too, which `init_process_group` asks about its `device_id`); the driver call that
`torch.cuda.set_device` makes once its own argument checks have passed records the index instead; and the first CUDA
initialisation (the first tensor on a GPU) raises NoGPU. Code that reaches NoGPU has passed every check before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch


class NoGPU(Exception):
    """Raised where a GPU machine would initialise CUDA: everything before it ran as it would there."""


@contextmanager
def fake_gpus(n: int) -> Iterator[list[int]]:
    """Inside the block the machine shows `n` GPUs; yields the indices `torch.cuda.set_device` passed to the driver."""
    chosen: list[int] = []

    def no_gpu() -> None:
        raise NoGPU(f"the first CUDA initialisation (this machine has no GPU; it shows {n})")

    with ExitStack() as stack:
        patch = lambda target, name, value: stack.enter_context(mock.patch.object(target, name, value, create=True))  # noqa: E731
        patch(torch.cuda, "is_available", lambda: True)
        patch(torch.cuda, "device_count", lambda: n)
        patch(torch.cuda, "_lazy_init", no_gpu)
        patch(torch._C, "_cuda_setDevice", chosen.append)
        patch(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
        patch(torch.accelerator, "device_count", lambda: n)
        yield chosen
