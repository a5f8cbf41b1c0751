"""`sagan-import`: a PyTorch-StudioGAN run (its published SAGAN checkpoints) as a sagan checkpoint.

    sagan-import src=path/to/studiogan_run out=sagan_cifar10.pt                   # G, D and G_ema of the best step
                                                                                  # (of the current one without best)
    sagan-import src=path/to/model=G-best-weights-step=90000.pth out=g.pt          # that file, and D beside it
    sagan-import src=path/to/studiogan_run which=current out=last.pt               # the last saved step

The result is what `sagan-sample`, `sagan-fid` and `sagan-attention` take as `ckpt=` and what `sagan-train
train.init_from=...` starts a new run from. Resolution, widths, classes and attention positions are read from the
tensors; the files are loaded with weights_only=True (nothing in them runs). The networks are sagan's
`model=studiogan*` presets, which compute StudioGAN's function (README, "Pretrained SAGANs").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_module
from omegaconf import MISSING, OmegaConf

from sagan.utils.atomic_files import atomic_write
from sagan.checkpoint import model_record, serialize
from sagan.cli import parse_args, run_cli
from sagan.config import arg
from sagan.pretrained.studiogan import convert_run, model_overrides
from sagan.pretrained.studiogan_files import run_files
from sagan.utils.errors import UserError


@dataclass
class ImportArgs:
    src: str = arg(MISSING, "a StudioGAN run folder, or one of its model=G-...pth files")
    out: str = arg(MISSING, "the sagan checkpoint to write (.pt)")
    which: Optional[str] = arg(
        None, "best or current: which of the run's checkpoints; default best, or current when the run has no best "
        "(a file given as src says it itself)"
    )


def import_run(args: Any) -> Path:
    """Convert, check and write; returns the checkpoint's path. Nothing is written unless everything converted."""
    out = Path(args.out).expanduser()
    if out.suffix != ".pt":
        raise UserError(f"out={args.out} must name a .pt file")
    src = Path(args.src).expanduser()
    files, step, which = run_files(src, args.which)
    if args.which is None and src.is_dir() and which != "best":  # the default could not be followed: say so
        print(f"which=current: {src} holds no model=G-best-... file, so its current checkpoint is imported")
    imported = convert_run(files)
    overrides = model_overrides(imported.model)
    data = data_guess(imported.model)
    config = composed_config([*overrides, *data])
    record = model_record(config, imported.model["num_classes"])
    if {**record, "name": imported.model["name"]} != imported.model:  # a bug of ours, not of the input
        raise AssertionError(f"the overrides {overrides} do not give the imported model record")
    state = {
        "model": imported.model,
        "trainer": {**imported.nets, "step": step},
        "config": OmegaConf.to_container(config, resolve=True),
        "imported": imported.source,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, serialize(state))
    nets = ", ".join(net for net in ("G", "D", "G_ema") if net in files)
    print(f"{nets} of {files['G'].parent} (StudioGAN {which}, step {step}, {imported.source['cond_bn_layout']}) -> {out}")
    print(f"fine-tune it with: sagan-train {' '.join(overrides + data)} train.init_from={out}")
    return out


def data_guess(model: dict[str, Any]) -> list[str]:
    """The data a StudioGAN run most likely trained on (its checkpoints do not say): CIFAR-10/100 at 32 px."""
    if model["resolution"] == 32 and model["num_classes"] in (10, 100):
        return [f"data=cifar{model['num_classes']}"]
    return ["data=folder"]


def composed_config(overrides: list[str]) -> Any:
    with initialize_config_module(config_module="sagan.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def main() -> None:
    run_cli(lambda: import_run(parse_args(ImportArgs, sys.argv[1:], doc=__doc__)))


if __name__ == "__main__":
    main()
