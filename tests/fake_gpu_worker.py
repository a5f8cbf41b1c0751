"""One process of a torchrun group on a machine shown as having `sys.argv[1]` GPUs (tests/fake_gpu.py): it joins the
process group as `sagan-train` does and writes what happened, `rank R: set_device [I]: <outcome>`, to the file
rank<R>.txt in the folder `sys.argv[2]` (the ranks' printed lines could interleave).

PyTorch checks the device given to set_device and to init_process_group (an index, below the GPU count), then
builds NCCL's process group, which needs a real GPU: on this machine the farthest a process can get.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from fake_gpu import fake_gpus  # noqa: E402
from sagan.utils.processes import init_distributed  # noqa: E402

with fake_gpus(int(sys.argv[1])) as chosen:
    try:
        world, device = init_distributed("auto", timeout_min=1)
        outcome = f"joined on {device}"
    except Exception as error:  # the outcome is what the test reads
        outcome = f"{type(error).__name__}: {error}"
rank = os.environ["RANK"]
with open(os.path.join(sys.argv[2], f"rank{rank}.txt"), "w") as f:
    f.write(f"rank {rank}: set_device {chosen}: {outcome}")
