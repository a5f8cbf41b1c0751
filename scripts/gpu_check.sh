#!/usr/bin/env bash
# The prepared GPU session (scripts/gpu_session.py; docs/benchmarks.md, "GPU"): at most 8 minutes on a lent GPU
# machine, with nothing from outside. What comes back is written to $OUT (or gpu_check_out/ where OUT is unset).
#
#   bash scripts/gpu_prepare.sh              # here, once: the wheels and CIFAR-10 that travel (.whl/, .device_data/)
#   bash scripts/gpu_check.sh                # there (the device tool: carry .whl and .device_data)
#   bash scripts/gpu_check.sh --rehearse     # here: the same phases at tiny sizes on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
# The GPU machine has torch but not hydra-core, omegaconf, antlr4 or torch-fidelity: install the carried wheels.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# Without an install, the configs (conf/, installed as sagan.conf) are reached through a link.
python3 -c "import sagan.conf" 2>/dev/null || ln -sfn ../conf sagan/conf
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 scripts/gpu_session.py --out "$out" "$@"
