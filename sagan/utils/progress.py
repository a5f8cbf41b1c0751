"""Progress of long loops (training steps, images through the Inception network): a tqdm bar on a terminal, plain log
lines otherwise (batch jobs, CI, files)."""

from __future__ import annotations

import datetime
import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("sagan")


class Progress:
    """Shows `what done/total` (and `note`), images/s, extra values (losses) and the ETA on each `update`."""

    def __init__(self, *, what: str, total: int, start: int = 0, images_per_item: int = 1, note: str = "") -> None:
        self.what, self.total, self.images_per_item, self.note = what, total, images_per_item, note
        self.last_done, self.last_time = start, time.perf_counter()
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, unit=what.split()[-1], dynamic_ncols=True, leave=False) if tty else None

    def update(self, done: int, extra: dict[str, float] | None = None) -> float:
        """Report progress at `done` items; returns images/s since the previous update."""
        now = time.perf_counter()
        items_per_s = (done - self.last_done) / max(now - self.last_time, 1e-9)
        images_per_s = items_per_s * self.images_per_item
        eta = datetime.timedelta(seconds=round((self.total - done) / max(items_per_s, 1e-9)))
        values = " ".join(f"{k} {v:.4f}" for k, v in (extra or {}).items())
        if self.bar is not None:
            self.bar.update(done - self.last_done)
            self.bar.set_postfix_str(f"{images_per_s:.1f} img/s {values}".strip())
        else:
            parts = (f"{self.what} {done}/{self.total}{self.note}", f"{images_per_s:.1f} img/s", values, f"eta {eta}")
            log.info(" | ".join(part for part in parts if part))
        self.last_done, self.last_time = done, now
        return images_per_s

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
