"""Spectral norm on the training side: steps that must not move the power-iteration vectors u and v."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from sagan.models.layers import SpectralNormFP32


@contextmanager
def power_iteration_paused(*modules: nn.Module) -> Iterator[None]:
    """Spectral norm without its power-iteration update inside the block (the current u and v still normalise).

    Gradient accumulation runs one forward per micro-batch; pausing the update after the first keeps one power
    iteration per optimizer step, as without accumulation.
    """
    layers = [m for module in modules for m in module.modules() if isinstance(m, SpectralNormFP32) and m.training]
    for m in layers:
        m.training = False
    try:
        yield
    finally:
        for m in layers:
            m.training = True
