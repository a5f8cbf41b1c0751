"""Run by test_ddp.py under `torchrun --nproc_per_node=2`: train a few steps and check after every step that all ranks
hold the same G, D and G_ema (parameters and buffers, bit for bit) and different real batches.

Usage: torchrun --nproc_per_node=N tests/ddp_worker.py STEPS GRAD_ACCUM [compile]
Prints one line "rank R: ok after S steps" per rank, or exits non-zero with what differed.
"""

import sys

import torch
import torch.distributed as dist

from sagan.data.batch_stream import BatchStream
from sagan.data.demo import MirrorShapes
from sagan.utils.processes import init_distributed, leave_distributed
from sagan.models import build_models
from sagan.training.step import Trainer
from conftest import TINY, compose_config


def flat_state(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter and floating-point buffer of `module`, as one float64 vector."""
    tensors = [p.detach() for p in module.parameters()] + [b for b in module.buffers() if b.is_floating_point()]
    return torch.cat([t.double().reshape(-1) for t in tensors])


def main() -> None:
    steps, grad_accum, compile = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["compile"]
    cfg = compose_config(*TINY, "model.conditional=true")
    world, device = init_distributed("cpu", timeout_min=2)
    torch.manual_seed(world.rank)  # different initial weights per rank: DDP must start them all from rank 0's
    G, D = build_models(cfg.model, num_classes=3)
    trainer = Trainer(
        G, D, lr_g=2e-4, lr_d=4e-4, ema_start=0, seed=0, world=world, grad_accum=grad_accum, device=device, compile=compile
    )
    dataset = MirrorShapes(size=64, resolution=32, seed=0)
    stream = BatchStream(dataset, batch_size=8 // world.size, seed=0, rank=world.rank, world_size=world.size, hflip=True)

    first, _ = next(BatchStream(dataset, batch_size=8 // world.size, seed=0, rank=world.rank, world_size=world.size))
    batches = [torch.empty_like(first) for _ in range(world.size)]
    dist.all_gather(batches, first)
    if any(torch.equal(batches[0], other) for other in batches[1:]):
        sys.exit(f"rank {world.rank}: two ranks got the same real images")

    for step in range(1, steps + 1):
        trainer.train_step(stream)
        for name, net in (("G", trainer.G), ("D", trainer.D), ("G_ema", trainer.G_ema)):
            mine = flat_state(net)
            everyone = [torch.empty_like(mine) for _ in range(world.size)]
            dist.all_gather(everyone, mine)
            if not all(torch.equal(mine, other) for other in everyone):
                sys.exit(f"rank {world.rank}: {name} differs between ranks after step {step}")
    print(f"rank {world.rank}: ok after {steps} steps")
    del trainer  # its DDP wrappers hold the process group
    leave_distributed(world)


if __name__ == "__main__":
    main()
