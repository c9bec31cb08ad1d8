#!/usr/bin/env bash
# One run on a machine with a GPU: install what is missing, run the GPU test tier and the benchmarks, and
# write logs, rows (JSON lines), tables and plots under $OUT (default: ./gpu_out).
#   bash bench/gpu_check.sh                                   # tests, then every case
#   SKIP_TESTS=1 BENCH_CASES="segformer3d" bash bench/gpu_check.sh
#   BENCH_ARGS="--dtype bf16" bash bench/gpu_check.sh
# A device call is limited to 10 minutes: split the cases over two calls if one does not fit.
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1

# Carried wheels (monai, nibabel, ...) go to a private site dir; torch and triton come with the image.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || {
  echo "install failed"; cat "$OUT/install.log"; exit 1; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('cudnn', torch.backends.cudnn.version())"
  git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
  python3 -m fastseg3d info
} > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"

status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests -m gpu -q -p no:cacheprovider \
    > "$OUT/gpu_tests.log" 2>&1 || status=$?
  tail -n 25 "$OUT/gpu_tests.log"
fi

# Each case in its own process and time box, so one slow peer (max-autotune) cannot starve the others.
for case in ${BENCH_CASES:-dwconv3d attention attention_block kl_distill channel_kl selfreg segformer3d}; do
  timeout "${BENCH_TIMEOUT:-90}" python3 -m bench.run --case "$case" --out "$OUT/results" --plot ${BENCH_ARGS:-} \
    >> "$OUT/bench_table.txt" 2>> "$OUT/bench.log" || { echo "bench $case failed or timed out"; status=1; }
done
cat "$OUT/bench_table.txt"
tail -n 20 "$OUT/bench.log"
exit $status
