#!/usr/bin/env bash
# The project's test command (CPU machines): the CPU tier, then the Triton interpreter tier in a process of its
# own (TRITON_INTERPRET is read when kernels are decorated, and it breaks compile/opcheck tests), where the
# backend policy defaults to the kernels, so that a test that forgets to ask for them still runs them.
# On a machine with a GPU, run `pytest tests -m gpu` (or bench/gpu_check.sh) for the GPU tier.
set -euo pipefail
cd "$(dirname "$0")/.."
# With arguments (a -k filter, a file) one tier may select nothing, pytest's exit code 5: not a failure then,
# unless neither tier selects a test. Without arguments 5 fails as any other error.
nargs=$#
empty=0
tier() { "$@" || { rc=$?; [ "$rc" -eq 5 ] && [ "$nargs" -gt 0 ] || exit "$rc"; empty=$((empty + 1)); }; }
# Each tier over pytest-xdist workers, one a core up to 4 (a worker holds torch and a compiled network or two: more
# would cost memory for little): the interpreter runs one program at a time on one core, and the CPU tier's tests
# are mostly Python-bound. On the 2-core CI machine this takes the tiers from 11 and 12 minutes to 7 and 6.
workers=$(nproc 2>/dev/null || echo 2)
workers=$(( workers < 4 ? workers : 4 ))
tier python3 -m pytest tests fastseg3d --doctest-modules -m "not interpret and not gpu" -q -p no:cacheprovider \
  -n "$workers" "$@"
tier env FASTSEG3D_BACKEND=triton TRITON_INTERPRET=1 python3 -m pytest tests -m interpret -q -p no:cacheprovider \
  -n "$workers" "$@"
[ "$empty" -lt 2 ] || { echo "tests/run.sh: no test selected in either tier" >&2; exit 5; }
