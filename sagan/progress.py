"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise (batch jobs, CI, files)."""

from __future__ import annotations

import datetime
import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("sagan")


class Progress:
    """Shows step, images/s, losses and ETA. `update` is called every `log_every` steps with host floats."""

    def __init__(self, *, start: int, total: int, images_per_step: int) -> None:
        self.total, self.images_per_step = total, images_per_step
        self.last_step, self.last_time = start, time.perf_counter()
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True) if sys.stderr.isatty() else None

    def update(self, step: int, scalars: dict[str, float]) -> float:
        """Report progress at `step`; returns images/s since the previous update."""
        now = time.perf_counter()
        steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
        images_per_s = steps_per_s * self.images_per_step
        eta = datetime.timedelta(seconds=round((self.total - step) / max(steps_per_s, 1e-9)))
        losses = " ".join(f"{k} {v:.4f}" for k, v in scalars.items())
        if self.bar is not None:
            self.bar.update(step - self.last_step)
            self.bar.set_postfix_str(f"{images_per_s:.1f} img/s {losses}")
        else:
            log.info(f"step {step}/{self.total} | {images_per_s:.1f} img/s | {losses} | eta {eta}")
        self.last_step, self.last_time = step, now
        return images_per_s

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
