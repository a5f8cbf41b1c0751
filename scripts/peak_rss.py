"""Run a sagan command module and print this process's peak resident memory when it ends (one line per process).

    python scripts/peak_rss.py sagan.train experiment=demo train.steps=1 eval.every=1 ...
    torchrun --nproc_per_node=2 scripts/peak_rss.py sagan.train device=cpu ...    # one line per rank

The figure is the kernel's high-water mark of the process's resident set (getrusage ru_maxrss), which includes the
Python interpreter, the models and the Inception network: compare runs that differ in one thing.
"""

from __future__ import annotations

import os
import resource
import runpy
import sys


def main() -> None:
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    try:
        runpy.run_module(module, run_name="__main__")
    finally:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        print(f"peak RSS rank {os.environ.get('RANK', 0)}: {peak_mib:.0f} MiB", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
