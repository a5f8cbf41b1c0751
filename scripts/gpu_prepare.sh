#!/usr/bin/env bash
# What the GPU session needs from this machine, in the git-ignored folders the device tool carries: the wheels of the
# packages the GPU machine lacks (.whl/, the versions installed here) and CIFAR-10's training images (.device_data/).
#
#   bash scripts/gpu_prepare.sh [path/to/cifar10-train-jpg.zip]     # default: $SAGAN_CIFAR10_ZIP
set -euo pipefail
cd "$(dirname "$0")/.."
zip="${1:-${SAGAN_CIFAR10_ZIP:?give the CIFAR-10 zip or set SAGAN_CIFAR10_ZIP}}"
rm -rf .whl && mkdir -p .whl .device_data
pins=$(python3 -c "from importlib.metadata import version as v; print(' '.join(f'{n}=={v(n)}' for n in ('hydra-core', 'omegaconf', 'antlr4-python3-runtime', 'torch-fidelity')))")
python3 -m pip wheel -q --no-deps -w .whl $pins   # pure-Python wheels (antlr4 is built from its source)
cp "$zip" .device_data/cifar10-train-jpg.zip
du -ch .whl .device_data | tail -n 1
