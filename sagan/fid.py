"""`sagan-fid`: FID / IS / KID / precision-recall the way papers report them, with the protocol beside every number.

    sagan-fid ckpt=outputs/run/checkpoints/last.pt ref=cifar10-train n=50000      # G_ema vs the training set
    sagan-fid ckpt=outputs/run/checkpoints/last.pt ref=train n=10000 kid=true    # vs the data the run trained on
    sagan-fid gen=path/to/generated ref=path/to/real.zip isc=false                # two folders / zips of images
    sagan-fid ref=cifar10-train save_ref=cifar10_train.npz                        # write reference statistics
    sagan-fid ckpt=outputs/run/checkpoints/last.pt ref=cifar10_train.npz          # FID against a statistics file
    sagan-fid ckpt=outputs/run/checkpoints/last.pt ref=cifar10-test intra=true    # intra-FID: class by class
    sagan-fid ckpt=outputs/run/checkpoints/last.pt ref=train truncation=[0.5,1,2]  # the truncation trade-off curve

`ref` is a folder or .zip of images, a torchvision dataset as <name>-<split> (cifar10-train, cifar10-test,
cifar100-train, stl10-unlabeled, celeba-train, ...) under `data_root`, `demo` (the generated demo images), `train`
(the data the checkpoint trained on, as in-training evaluation uses it) or a .npz statistics file (`mu`, `sigma`).
Reference images are centre-cropped and resized to the generator's resolution, as training images are.
"""

from __future__ import annotations

import sys

from sagan.cli import parse_args, run_cli
from sagan.evaluation.evaluate import evaluate
from sagan.evaluation.request import FidArgs
from sagan.utils.processes import init_distributed, leave_distributed


def truncation_list(arg: str) -> str:
    """`truncation=0.5` as the one-element list `truncation=[0.5]` (the key takes one value or a list)."""
    key, _, value = arg.partition("=")
    return f"truncation=[{value}]" if key == "truncation" and value and not value.startswith("[") else arg


def main() -> None:
    def run() -> None:
        args = parse_args(FidArgs, [truncation_list(a) for a in sys.argv[1:]], doc=__doc__)
        world, device = init_distributed(args.device, timeout_min=60)  # one process, or every rank torchrun started
        try:
            evaluate(args, world, device)
        finally:
            leave_distributed(world)

    run_cli(run, log_to_stderr=True)


if __name__ == "__main__":
    main()
