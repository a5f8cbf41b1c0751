"""`sagan-ablate`: a named study at a named scale in one command. The runs are one Hydra multirun of sagan-train (so a
launcher plugin, e.g. SLURM's, runs them unchanged); every finished run is evaluated with the scale's one protocol;
results.md (mean ± std over seeds per variant) and results.png (the scale's curve against steps) summarise them.

    sagan-ablate study=position scale=demo seeds=3                  # -> ablations/position-demo/results.md
    sagan-ablate study=block scale=demo seeds=3 logger.mode=disabled  # other key=value go to every sagan-train run
    sagan-ablate study=position scale=imagenet128 hydra/launcher=submitit_slurm   # on a SLURM cluster
    sagan-ablate study=position scale=demo rebuild=true             # no training: evaluate what finished, redo the table

Studies: position (no attention, then attention at each feature-map size), block (every model.attn_type), sn_g
(spectral norm on G or not), ttur (TTUR or equal learning rates with 5 D steps), augment (a tenth of the data without
and with DiffAugment). Scales: demo (CPU minutes per run), cifar10 and imagenet128 (GPUs: the paper's settings).
Running the same command again continues the study: finished runs are skipped, interrupted ones resume from their last
checkpoint (train.resume=auto).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from typing import Optional

from sagan.ablation.runner import ablate
from sagan.cli import parse_args, run_cli
from sagan.config import MetricsConfig, arg


@dataclass
class AblateArgs:
    study: str = arg("position", "position | block | sn_g | ttur | augment")
    scale: str = arg("demo", "demo | cifar10 | imagenet128: the recipe and the evaluation protocol")
    seeds: int = arg(3, "runs per variant (train.seed = 0, 1, ...)")
    variants: Optional[list[str]] = arg(None, "only these variants, e.g. [none,feat16] (a study split over machines)")
    out: Optional[str] = arg(None, "the study's folder; default ablations/<study>-<scale>")
    n: Optional[int] = arg(None, "generated images per evaluation; default the scale's")
    ref: Optional[str] = arg(None, "reference of the evaluation, as sagan-fid's ref=; default the scale's")
    ref_n: Optional[int] = arg(None, "reference images (a seeded subset); default the scale's, or all of another ref")
    rebuild: bool = arg(False, "train nothing: evaluate the finished runs not yet evaluated and rewrite the table")
    mirror_n: int = arg(2048, "generated images of the demo's mirror consistency, for runs on the demo data")
    eval_device: str = arg("auto", "device of the evaluations (device= goes to the training runs)")
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our own key=value arguments, and the rest (sagan-train overrides, Hydra's included)."""
    ours = {f.name for f in fields(AblateArgs)}
    own, train = [], []
    for a in argv:
        key = a.split("=", 1)[0].split(".", 1)[0]
        (own if key in ours or a in ("--help", "-h") else train).append(a)
    return own, train


def main() -> None:
    def run() -> None:
        own, train_overrides = split_argv(sys.argv[1:])
        ablate(parse_args(AblateArgs, own, doc=__doc__), train_overrides)

    run_cli(run, log_to_stderr=True)


if __name__ == "__main__":
    main()
