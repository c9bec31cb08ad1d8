#!/usr/bin/env bash
# The project's test command (CPU machines): the CPU tier, then the Triton interpreter tier in a process of its
# own (TRITON_INTERPRET is read when kernels are decorated, and it breaks compile/opcheck tests), where the
# backend policy defaults to the kernels, so that a test that forgets to ask for them still runs them.
# On a machine with a GPU, run `pytest tests -m "not interpret"` (or bench/gpu_check.sh) for the GPU tier.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest tests fastseg3d --doctest-modules -m "not interpret and not gpu" -q -p no:cacheprovider "$@"
FASTSEG3D_BACKEND=triton TRITON_INTERPRET=1 python3 -m pytest tests -m interpret -q -p no:cacheprovider "$@"
