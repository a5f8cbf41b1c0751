"""The run logger: Weights & Biases (offline by default, so no account is needed) plus local copies.

Scalars go to W&B and to `metrics.jsonl` in the run directory (one JSON object per logging step), images to W&B and
as PNG files, so a run can be read without any dashboard. Only rank 0 creates one.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

from sagan.utils.atomic_files import atomic_write, space_for
from sagan.utils.errors import UserError

log = logging.getLogger("sagan")

MODES = ("offline", "online", "disabled")


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        mode: str = "offline",
        project: str = "sagan",
        entity: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        if mode not in MODES:
            raise UserError(f"unknown logger.mode '{mode}': choose one of {', '.join(MODES)}")
        self.run_dir = run_dir
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.wandb = None
        if mode == "disabled":
            return
        import wandb  # imported here: a disabled logger does not pay for it

        # One W&B run per run directory: a resumed training run continues the same W&B run.
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        atomic_write(id_file, run_id)
        self.wandb = wandb.init(
            project=project,
            entity=entity,
            name=name,
            tags=list(tags or []),
            config=config,
            dir=str(run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
        )
        if mode == "offline":
            log.info(f"W&B offline run in {self.wandb.dir}: upload with `wandb sync {Path(self.wandb.dir).parent}`")

    def drop_after(self, step: int) -> None:
        """Remove the rows of `metrics.jsonl` logged after `step`: a run that continues from the checkpoint of `step`
        (a resume, a NaN rollback) logs those steps again. W&B keeps what it has (it cannot log a step twice)."""
        path = self.run_dir / "metrics.jsonl"
        rows = path.read_text().splitlines(keepends=True)
        kept = [row for row in rows if _step_of(row) is not None and _step_of(row) <= step]
        if len(kept) != len(rows):
            self.metrics.close()
            atomic_write(path, "".join(kept).encode())
            self.metrics = open(path, "a")

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """One row of metrics.jsonl (a full disk raises DiskFull; a row it cut short is dropped on resume) and W&B."""
        row = json.dumps({"step": step, **scalars}) + "\n"
        with space_for(self.run_dir / "metrics.jsonl", len(row)):
            self.metrics.write(row)
            self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        """Files already written to the run directory, under W&B keys: PNG images as images, HTML pages (the attention
        explorer) as HTML panels."""
        if self.wandb is not None:
            import wandb

            media = {
                key: wandb.Html(path.read_text(), inject=False) if path.suffix == ".html" else wandb.Image(Image.open(path), caption=path.name)
                for key, path in images.items()
            }
            self.wandb.log(media, step=step)

    def finish(self) -> None:
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


def _step_of(row: str) -> int | None:
    """The step of a metrics.jsonl row, or None for a row that a killed process left half-written."""
    try:
        return int(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):
        return None
