"""Stop cleanly when the cluster asks: SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before they stop a job)
request a checkpoint at the next step boundary and a normal exit. An evaluation under way (minutes at scale) is
abandoned between two of its batches, on every rank together, and the checkpoint written then (sagan.training.loop).

Further signals change nothing: one request often arrives several times (SLURM signals every process of a job step
and torchrun forwards the SIGTERM it gets to its workers), and acting on a repeat would lose the checkpoint. Ctrl-C
(SIGINT) still stops at once, and the scheduler's SIGKILL ends a run that takes too long.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

log = logging.getLogger("sagan")

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class StopRequest:
    """Installs the handlers for as long as it is open (`with StopRequest() as stop: ... if stop.signal: ...`)."""

    def __init__(self) -> None:
        self.signal: str | None = None  # the name of the first signal received
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            log.warning(f"{name} received: already stopping (after {self.signal}) at the end of this step")
            return
        self.signal = name
        log.warning(f"{name} received: writing a checkpoint at the end of this step (or evaluation batch), then exiting")

    def __enter__(self) -> StopRequest:
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
