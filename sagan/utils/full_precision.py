"""Full fp32 precision where numbers must not depend on the speed settings training uses (TF32)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def full_precision() -> Iterator[None]:
    """TF32 off (CUDA matmuls and convolutions in true fp32) inside the block, as before it afterwards: training turns
    it on for speed, but the features FID compares must match the reference implementation's."""
    # The allow_tf32 flags, as in `resolve_perf`: torch refuses reads of one API's flags after writes through the
    # other (fp32_precision), and torch.compile reads them through the old one.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
