"""Print parameter counts and forward GFLOP per image (1 multiply-add = 2 FLOP) of every model preset.

    python scripts/model_stats.py [model.conditional=true] [any other model override]

Conditional models are counted with 1000 classes (ImageNet): class-conditional BN adds 2 x width parameters per
class and BN layer to G.
"""

from __future__ import annotations

import sys
from importlib import resources

from hydra import compose, initialize_config_module

from sagan.models.stats import model_stats
from sagan.models import build_models


def main(overrides: list[str]) -> None:
    presets = sorted(p.name.removesuffix(".yaml") for p in resources.files("sagan.conf").joinpath("model").iterdir())
    print(f"{'preset':<12} {'res':>4} {'G params':>10} {'D params':>10} {'G GFLOP':>9} {'D GFLOP':>9}")
    with initialize_config_module(config_module="sagan.conf", version_base="1.3"):
        for name in sorted(presets, key=lambda n: (n.startswith("studiogan"), int(n.removeprefix("studiogan").removeprefix("sagan")))):
            cfg = compose(config_name="config", overrides=[f"model={name}", *overrides])
            num_classes = 1000 if cfg.model.conditional else 0
            s = model_stats(*build_models(cfg.model, num_classes))
            print(
                f"{name:<12} {cfg.model.resolution:>4} {s['G_params_M']:>9.2f}M {s['D_params_M']:>9.2f}M "
                f"{s['G_gflop']:>9.2f} {s['D_gflop']:>9.2f}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
