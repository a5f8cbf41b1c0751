"""G_ema with G's running BatchNorm statistics ("copy") vs standing statistics of its own, on the same checkpoint.

    python scripts/ema_bn_statistics.py CKPT [CKPT ...] [--n 500] [--weights PATH]

For each checkpoint of a demo run: FID (n generated vs n demo images, the protocol of the README's quick start) and
mirror consistency of n samples, for G_ema with the running statistics of the checkpoint's G and for G_ema with the
standing statistics the checkpoint holds (a run with optim.ema_bn=standing, the default). One checkpoint holds both:
G_ema's weights do not depend on where its statistics come from. Prints a table, then mean and std over checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch

from sagan.checkpoint import load_checkpoint, networks_from_checkpoint
from sagan.data.demo import MirrorShapes, mirror_consistency
from sagan.utils.processes import SINGLE
from sagan.evaluation.inception import Inception
from sagan.evaluation.metrics import evaluate_generator
from sagan.evaluation.reference_stats import dataset_reference
from sagan.evaluation.sampling import draw
from sagan.training.standing_stats import is_bn_statistic


def variants(state: dict) -> dict[str, torch.nn.Module]:
    """G_ema as the checkpoint holds it (standing statistics), and with the running statistics of the checkpoint's G."""
    standing, _ = networks_from_checkpoint(state, ema=True, device=torch.device("cpu"))
    copied = copy.deepcopy(standing)
    G_state = state["trainer"]["G"]
    for name, buffer in copied.named_buffers():
        if is_bn_statistic(name):
            buffer.copy_(G_state[name])
    return {"copy": copied.eval(), "standing": standing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpts", nargs="+")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--weights", default=None, help="local FID Inception weights (offline)")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    inception = Inception(weights=args.weights, device=cpu)
    results: dict[str, list[tuple[float, float]]] = {"copy": [], "standing": []}
    print(f"{'checkpoint':<60} {'statistics':<9} {'FID':>8} {'mirror':>7}")
    with tempfile.TemporaryDirectory() as cache:
        demo = MirrorShapes(size=10_000, resolution=32, seed=0, labels=False)  # `sagan-fid ref=demo ref_n=N`
        reference = dataset_reference(
            demo, inception, description="demo", resolution=32, limit=args.n, seed=0, weights=args.weights, cache_root=cache,
            world=SINGLE, batch_size=100,
        )
        for path in args.ckpts:
            state = load_checkpoint(path)
            for name, G in variants(state).items():
                fid = evaluate_generator(G, reference, inception, n=args.n, seed=0, batch_size=100, world=SINGLE)["fid"]
                images, _ = draw(G, args.n, seed=0)
                mirror = mirror_consistency(images)
                results[name].append((fid, mirror))
                print(f"{path:<60} {name:<9} {fid:>8.2f} {mirror:>7.3f}", flush=True)
    for name, rows in results.items():
        fids, mirrors = [r[0] for r in rows], [r[1] for r in rows]
        spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        print(f"{name:<9} FID {statistics.mean(fids):.2f} ± {spread(fids):.2f}, mirror {statistics.mean(mirrors):.3f} ± "
              f"{spread(mirrors):.3f} over {len(rows)} checkpoint(s)")  # fmt: skip


if __name__ == "__main__":
    main()
