#!/usr/bin/env bash
# One run on a machine with a GPU: install what is missing, run the GPU test tier and the benchmarks, and write
# logs, rows (JSON lines), tables and plots under $OUT (default: ./gpu_out), all within BUDGET seconds (default
# 570: a device call is limited to 10 minutes). $OUT ends with three files: info.txt, bench_table.txt and
# gpu_check.tgz (everything, results/ included), since a device call brings back only a few files.
# A copy of the tree without .git does not know its commit: pass it as FASTSEG3D_COMMIT=<sha>.
#   bash bench/gpu_check.sh                     # tests, then the target rows, profile and cube search in what is left
#   PLAN=full SKIP_TESTS=1 bash bench/gpu_check.sh               # then every shape, dtype and mode of every case
#   SKIP_TESTS=1 BENCH_CASES="missu dsd_unet" bash bench/gpu_check.sh
#   BENCH_ARGS="--dtype bf16 --providers all" CASE_LIMIT=240 BENCH_CASES=segformer3d bash bench/gpu_check.sh
#   LARGEST_CUBE_MODELS="segformer3d mobileutr" LARGEST_CUBE_LIMIT=200 SKIP_TESTS=1 BENCH_CASES= bash ...
#   BENCH_CASES= LARGEST_CUBE_MODELS= HOST_PROFILE_MODELS= TEST_TIMEOUT=540 bash bench/gpu_check.sh  # tests only
#   TUNE_OPS="dwconv3d kl_distill attention" TUNE_LIMIT=60 SKIP_TESTS=1 BENCH_CASES= bash ...  # plan sweeps
#   TESTS_PASSED=gpu_results.txt BENCH_CASES= ... bash bench/gpu_check.sh   # a cut tier: the tests not yet passed
# PLAN=targets (the default) measures first what the issues set targets on, so that one short GPU session
# yields them: per case the shapes, dtypes and modes of TARGET_ARGS below (BENCH_ARGS is appended and wins).
# PLAN=full runs each case's whole matrix. Each case runs in its own process and time box (the limits below, or
# CASE_LIMIT for all; cut to what is left of BUDGET), so one slow peer (max-autotune) cannot starve the others;
# rows are written as they are measured. What a box or the budget did not reach is listed at the end: run again
# with BENCH_CASES (and SKIP_TESTS=1). The end of the report checks the issues' targets on the rows on disk.
# Wheels in $WHEELS (default .whl/) are installed only for packages the image lacks (monai, nibabel, xformers,
# liger_kernel, ...); torch and triton come with the image (WHEEL_SITE: where they install, default /tmp/site).
# SKIP_INSTALL=1 leaves the project's install as it is. TEST_WORKERS (default 12) pytest-xdist workers,
# TEST_CASE_TIMEOUT (default 150) seconds for one test.
# Exit status: 0 all done and passed; 1 a test, step or report failed; 2 a setting is wrong (nothing ran);
# 3 the test tier was cut by its box (or had no time left), nothing failed.
set -uo pipefail
START=$SECONDS
BUDGET="${BUDGET:-570}"
OUT="${OUT:-$PWD/gpu_out}"
WHEELS="${WHEELS:-.whl}"
SITE="${WHEEL_SITE:-/tmp/site}"  # where carried wheels install (the image's site-packages stay as they are)
# whole seconds only (bash arithmetic): "5m" would end the tier's or a loop's arithmetic and skip it silently
for var in BUDGET TEST_TIMEOUT TEST_CASE_TIMEOUT CASE_LIMIT LARGEST_CUBE_LIMIT LARGEST_CUBE_MAX_SIDE HOST_PROFILE_LIMIT \
           TUNE_LIMIT WARM_LIMIT; do
  value="${!var-}"
  # no leading zero either: bash would read 090 as octal and fail, or 0400 as 256
  if [ -n "$value" ] && ! [[ "$value" =~ ^(0|[1-9][0-9]*)$ ]]; then
    echo "gpu_check: $var=$value must be a whole number (of seconds, or of voxels for LARGEST_CUBE_MAX_SIDE)"; exit 2
  fi
done
# TEST_WORKERS is pytest-xdist's -n: a count (divided into the cores below) or its own "auto"/"logical"
if [ -n "${TEST_WORKERS-}" ] && ! [[ "$TEST_WORKERS" =~ ^(0|[1-9][0-9]*|auto|logical)$ ]]; then
  echo "gpu_check: TEST_WORKERS=$TEST_WORKERS must be a whole number, auto or logical"; exit 2
fi
if [ -n "${TESTS_PASSED:-}" ] && [ "${SKIP_TESTS:-0}" = 0 ] && [ ! -f "$TESTS_PASSED" ]; then
  echo "TESTS_PASSED=$TESTS_PASSED: no such file (copy the returned gpu_results.txt into the tree)"; exit 2
fi
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET - (SECONDS - START) )); }
# what follows the last step: the report, the targets, the cache report and the archive
TAIL=30

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  missing=()
  for wheel in "$WHEELS"/*.whl; do
    dist="$(basename "$wheel" | cut -d- -f1)"
    python3 -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null || missing+=("$wheel")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    # one wheel at a time: a wheel the image refuses (a platform tag) does not keep the others out
    for wheel in "${missing[@]}"; do
      if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$wheel"; then
        echo "installed from $WHEELS: ${wheel##*/}"
      else
        echo "could not install from $WHEELS: ${wheel##*/}"
      fi
    done
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
if [ "${SKIP_INSTALL:-0}" = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || {
    echo "install failed"; cat "$OUT/install.log"; exit 1; }
fi
# Kernels compiled beforehand without a GPU (bench/warm_cache.py), carried as a tarball: the network-scale tests
# and the target plan find them in Triton's cache instead of compiling them one after another in the box.
# WARM_PLAN="gpu_tests targets" compiles what is still missing here first, on every core at once.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/fastseg3d-triton-cache}"
# the ptxas version is part of every key: Triton's own for the whole run, as the tarball was built (a process that
# compiled with torch.compile would otherwise move to torch's for the rest of its life); the variable is
# TRITON_PTXAS_PATH in Triton 3.6, TRITON_PTXAS_BLACKWELL_PATH where newer Tritons compile sm_90 with that one
read -r ptxas_var ptxas_path < <(python3 -c "from bench.warm_cache import ptxas, ptxas_variable
print(ptxas_variable(), ptxas())" 2>/dev/null) || true
if [ -n "${ptxas_var:-}" ] && [ -z "${!ptxas_var:-}" ] && [ -x "${ptxas_path:-}" ]; then
  export "$ptxas_var=$ptxas_path"
fi
CACHE_TARBALL="${TRITON_CACHE_TARBALL:-.triton-cache.tgz}"
if [ -f "$CACHE_TARBALL" ]; then
  python3 -m bench.warm_cache --install "$CACHE_TARBALL" --dir "$TRITON_CACHE_DIR" \
    || echo "could not install the carried Triton cache $CACHE_TARBALL"
fi
if [ -n "${WARM_PLAN:-}" ]; then
  read -ra warm_plan <<< "$WARM_PLAN"
  # within the budget, leaving the tier a minute at the least
  warm_box=$(( $(left) - TAIL - 60 < ${WARM_LIMIT:-150} ? $(left) - TAIL - 60 : ${WARM_LIMIT:-150} ))
  if [ "$warm_box" -ge 10 ]; then
    timeout -k 10 "$warm_box" python3 -m bench.warm_cache --plan "${warm_plan[@]}" --cache-dir "$TRITON_CACHE_DIR" \
      || echo "warm_cache: failed or cut by its ${warm_box} s box"
  fi
fi
FASTSEG3D_COMMIT="${FASTSEG3D_COMMIT:-$(python3 -c "from bench.utils import git_commit; print(git_commit())" \
  2>/dev/null || echo unknown)}"
export FASTSEG3D_COMMIT
# bench.targets reads the newest commit's rows only: rows of "unknown" would not join another call's
[ "$FASTSEG3D_COMMIT" = unknown ] && echo "WARNING: commit unknown (a tree without .git): pass FASTSEG3D_COMMIT=<sha>"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch as t; print('torch', t.__version__, t.version.cuda, 'cudnn', t.backends.cudnn.version())"
  python3 -c "import importlib.util as u; print('optional:', *[m for m in ('monai', 'xformers', 'liger_kernel') if u.find_spec(m)])"
  echo "commit $FASTSEG3D_COMMIT"
  python3 -m fastseg3d info
} > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"

status=0
tier_cut=0
not_run=()
# the tier's box keeps the tail's time back, so that a tier taking all it may still leaves its results archived
t=$(( $(left) - TAIL < ${TEST_TIMEOUT:-300} ? $(left) - TAIL : ${TEST_TIMEOUT:-300} ))
if [ "${SKIP_TESTS:-0}" = 0 ] && [ "$t" -lt 30 ]; then
  echo "GPU tier: not run, ${t} s left of BUDGET=${BUDGET}s after the setup"; tier_cut=1
elif [ "${SKIP_TESTS:-0}" = 0 ]; then
  # Most of the GPU tier's time is Triton compiling a few hundred specialisations on one core: spread the tests
  # over processes (pytest-xdist is in the GPU image) so the compiles run side by side.
  # -v names each test as it ends, so a log cut by the box still says what passed and failed; a test file that
  # cannot be imported for want of an optional package does not stop the others.
  # each failure's traceback is written as the test ends (tests/conftest.py): a box that closes first leaves no
  # summary
  export FASTSEG3D_FAILURE_LOG="$OUT/gpu_failures.log"
  : > "$FASTSEG3D_FAILURE_LOG"
  # one line per test as it ends ("passed <node id>"); TESTS_PASSED=<an earlier run's gpu_results.txt, in the
  # tree> leaves out the tests that passed there, and the new file starts with them, so it stays the whole record
  export FASTSEG3D_RESULTS_LOG="$OUT/gpu_results.txt"
  if [ -n "${TESTS_PASSED:-}" ]; then
    # a copy (of its own: two runs on one machine must not share it), as TESTS_PASSED may name the log itself
    FASTSEG3D_SKIP_PASSED=$(mktemp)
    export FASTSEG3D_SKIP_PASSED
    cp "$TESTS_PASSED" "$FASTSEG3D_SKIP_PASSED"
    cat "$FASTSEG3D_SKIP_PASSED" > "$FASTSEG3D_RESULTS_LOG"
  else
    : > "$FASTSEG3D_RESULTS_LOG"
  fi
  # "<s since start> <worker> <s taken> <node id>" per test as it ends: where a cut tier spent its box
  export FASTSEG3D_DURATIONS_LOG="$OUT/gpu_durations.txt"
  : > "$FASTSEG3D_DURATIONS_LOG"
  extra=()
  workers="${TEST_WORKERS:-12}"
  if python3 -c "import xdist" 2>/dev/null; then
    extra+=(-n "$workers")
    # (load scheduling, xdist's default, hands tests out in the collection's order: the conftest puts what only a
    # GPU checks first)
    # each worker's ATen CPU work on its share of the cores, not every core's thread in every worker (a count
    # only: "auto" and 0 are left to xdist)
    case "$workers" in
      ''|0|*[!0-9]*) ;;
      *) saved_omp="${OMP_NUM_THREADS-unset}"
         export OMP_NUM_THREADS=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 )) ;;
    esac
  fi
  python3 -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout "${TEST_CASE_TIMEOUT:-150}")
  # the slowest tests at the end (where the tier completes): what to split or trim when it outgrows its box
  # -k: a tier that outlives SIGTERM (a worker stuck in a CUDA call) is killed within the tail's time
  timeout -k 15 "$t" python3 -m pytest tests -m gpu -v -rfE -p no:cacheprovider --continue-on-collection-errors \
    --durations=30 --durations-min=5 "${extra[@]}" > "$OUT/gpu_tests.log" 2>&1
  rc=$?
  # 124 (its box closed) or 137 would read as the whole call timing out to the caller: a cut tier ends the script
  # with 3 (where nothing failed), a killed one with 1
  # pytest's own codes would read as this script's (3: cut, 2: a wrong setting): 1 for all but "no tests" left
  # after TESTS_PASSED (5: every test had passed)
  if [ "$rc" -eq 124 ]; then echo "GPU tier: cut by its ${t} s box"; tier_cut=1;
  elif [ "$rc" -gt 128 ]; then echo "GPU tier: killed by signal $(( rc - 128 ))"; status=1;
  elif [ "$rc" -eq 5 ] && [ -n "${TESTS_PASSED:-}" ]; then echo "GPU tier: every test had passed in $TESTS_PASSED";
  elif [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 1 ] || echo "GPU tier: pytest exited $rc (2 interrupted, 3 internal error, 4 usage, 5 no tests)"
    status=1
  fi
  tail -n 25 "$OUT/gpu_tests.log"
  # the last line of each test decides; a test not listed did not end within the box
  # (node ids may hold blanks: the id is the line after its first word)
  awk '{o = $1; sub(/^[^ ]+ /, ""); last[$0] = o} END {for (t in last) n[last[t]]++; printf "GPU tier so far:";
       for (o in n) printf " %d %s", n[o], o; print ""}' \
    "$FASTSEG3D_RESULTS_LOG"
  echo "slowest tests (s taken, worker, s since start):"
  sort -k3 -nr "$FASTSEG3D_DURATIONS_LOG" | head -n 12 | awk '{id = $0; for (i = 0; i < 3; i++) sub(/^[^ ]+ /, "", id)
    printf "  %6s %-5s %6s  %s\n", $3, $2, $1, id}'
  if [ -n "${saved_omp+set}" ]; then  # saved_omp is "" where OMP_NUM_THREADS was set empty
    if [ "$saved_omp" = unset ]; then unset OMP_NUM_THREADS; else export OMP_NUM_THREADS="$saved_omp"; fi
  fi
  if [ -s "$FASTSEG3D_FAILURE_LOG" ]; then
    echo "failures ($FASTSEG3D_FAILURE_LOG, first lines):"; grep -E "^=== |^E " "$FASTSEG3D_FAILURE_LOG" | head -n 40
  fi
fi

# seconds per case (the models' compiled providers compile whole networks)
PLAN="${PLAN:-targets}"
declare -A TARGET_ARGS=()
if [ "$PLAN" = targets ]; then
  declare -A LIMIT=(
    [dwconv3d]=45 [attention]=30 [attention_block]=35 [kl_distill]=25 [channel_kl]=20 [selfreg]=20
    [segformer3d]=210 [mobileutr]=25 [mobileutrl]=25 [missu]=25 [dsd_unet]=20 [selfreg_unet]=20 [dice_ce]=10
    [group_norm_act]=15 [upsample_sum]=10 [layer_norm]=15 [unetr]=25 [mednext]=25
  )
  # the shapes, dtypes, modes and peers the targets are stated on (bench/targets.py; shape labels: python -m
  # bench.run --list); a measurement that has started runs to its end, so no compile the targets do not read
  TARGET_ARGS=(
    [dwconv3d]="--dtype bf16 --modes fwd,fwd+bwd --providers fastseg3d,torch?(*) --shapes 2x32x128^3*,*ncdhw?k7,*ncdhw?k9"
    [attention]="--dtype bf16,fp32 --modes fwd,fwd+bwd --shapes stage1@128^3*,stage2@128^3*"
    [attention_block]="--dtype bf16 --modes fwd+bwd --providers fastseg3d,torch-sdpa,torch.compile --shapes stage1@128^3*,stage2@128^3*,stage1@256^3*"
    [kl_distill]="--dtype bf16 --modes fwd+bwd --providers fastseg3d,torch --shapes *deconv?heads,*interp?heads"
    [channel_kl]="--dtype bf16 --modes fwd+bwd"
    [selfreg]="--dtype bf16 --modes fwd+bwd"
    [dice_ce]="--dtype bf16 --modes fwd+bwd"
    [group_norm_act]="--dtype bf16 --modes fwd,fwd+bwd --providers fastseg3d,torch"
    [upsample_sum]="--dtype bf16 --modes fwd,fwd+bwd --providers fastseg3d,torch"
    [layer_norm]="--dtype bf16 --modes fwd,fwd+bwd --providers fastseg3d,torch"
    [segformer3d]="--dtype bf16 --modes train_step --providers fastseg3d,plain,plain+torch.compile,*cuda-graph,fastseg3d+torch.compile --shapes *128^3"
    [mobileutr]="--dtype bf16 --modes train_step --shapes *96^3"
    [mobileutrl]="--dtype bf16 --modes train_step --shapes *96^3"
    [missu]="--dtype bf16 --modes train_step --shapes *128^3"
    [dsd_unet]="--dtype bf16 --modes train_step --shapes *128^3"
    [selfreg_unet]="--dtype bf16 --modes train_step --shapes *128^3"
    [unetr]="--dtype bf16 --modes train_step --providers fastseg3d,plain"
    [mednext]="--dtype bf16 --modes train_step --providers fastseg3d,plain --shapes *128^3"
  )
else
  declare -A LIMIT=(
    [dwconv3d]=50 [attention]=35 [attention_block]=35 [kl_distill]=30 [channel_kl]=20 [selfreg]=25
    [segformer3d]=45 [mobileutr]=35 [mobileutrl]=35 [missu]=35 [dsd_unet]=30 [selfreg_unet]=30 [dice_ce]=15
    [group_norm_act]=15 [upsample_sum]=15 [layer_norm]=20 [unetr]=35 [mednext]=35
  )
fi
python3 -c "import monai" 2>/dev/null || echo "monai is missing (carry its wheel): unetr and mednext will skip"
python3 -c "import einops" 2>/dev/null || echo "einops is missing (carry its wheel): unetr and the SABlock tests will skip"
CUBE_MODELS="${LARGEST_CUBE_MODELS-segformer3d}"
# the search runs under bf16 autocast (LARGEST_CUBE_DTYPE), the dtype the target is stated in
CUBE_LIMIT="${LARGEST_CUBE_LIMIT:-90}"
# on the 141 GB H200 plain SegFormer3D trained up to 736^3 and the fused one at 512^3 peaked at 19.6 GB (memory
# predicts about 970^3): the bound sits above that, so the ratio to plain is measured rather than bounded
CUBE_MAX_SIDE="${LARGEST_CUBE_MAX_SIDE:-1280}"
# cProfile of the fused eager step (bench/host_profile.py): on the H200 session's host it was launch-bound
PROFILE_MODELS="${HOST_PROFILE_MODELS-segformer3d}"
PROFILE_LIMIT="${HOST_PROFILE_LIMIT:-40}"
# launch-plan sweeps (bench/tune.py), one box per op, only where asked: TUNE_OPS="dwconv3d kl_distill attention"
TUNE_OPS="${TUNE_OPS-}"
TUNE_LIMIT="${TUNE_LIMIT:-60}"
n_tune=$(wc -w <<< "$TUNE_OPS")
# the sweeps, searches, profiles and the report
RESERVE=$(( n_tune * TUNE_LIMIT + ${CUBE_MODELS:+CUBE_LIMIT} + ${PROFILE_MODELS:+PROFILE_LIMIT} + TAIL ))
if [ "$PLAN" = targets ]; then
  # the cases with targets first, SegFormer3D's (whose compiled peers compile whole training graphs) leading; the
  # others run in what is left
  DEFAULT_CASES="segformer3d dwconv3d attention attention_block kl_distill"
  DEFAULT_CASES+=" channel_kl selfreg mobileutr missu dsd_unet selfreg_unet dice_ce group_norm_act upsample_sum"
  DEFAULT_CASES+=" mobileutrl"
  DEFAULT_CASES+=" layer_norm unetr mednext"
else
  DEFAULT_CASES="dwconv3d attention attention_block kl_distill channel_kl selfreg dice_ce group_norm_act upsample_sum"
  DEFAULT_CASES+=" layer_norm"
  DEFAULT_CASES+=" segformer3d mobileutr mobileutrl missu dsd_unet selfreg_unet unetr mednext"
fi
for case in ${BENCH_CASES-$DEFAULT_CASES}; do
  # split on blanks, no glob expansion ('*compile*' reaches bench.run); BENCH_ARGS last, so it wins
  read -ra bench_args <<< "${TARGET_ARGS[$case]:-} ${BENCH_ARGS:-}"
  limit="${CASE_LIMIT:-${LIMIT[$case]:-45}}"
  avail=$(( $(left) - RESERVE ))
  if [ "$avail" -lt 15 ]; then not_run+=("$case"); continue; fi
  t=$(( avail < limit ? avail : limit ))
  # --time-limit (counted from after the imports) stops new measurements well before the box closes, so the last
  # one can end within it (half of a short box)
  timeout "$t" python3 -m bench.run --case "$case" --out "$OUT/results" --time-limit $(( t >= 30 ? t - 15 : t / 2 )) \
    "${bench_args[@]}" >> "$OUT/bench.log" 2>&1 || { echo "bench $case failed or was killed at its ${t} s box"; status=1; }
done

for op in $TUNE_OPS; do
  t=$(( $(left) - TAIL < TUNE_LIMIT ? $(left) - TAIL : TUNE_LIMIT ))
  if [ "$t" -lt 20 ]; then not_run+=("tune:$op"); continue; fi
  # --time-limit stops new candidates; the JSON is written after each shape
  timeout "$t" python3 -m bench.tune "$op" --time-limit $(( t - 10 )) --out "$OUT/results/tune_$op.json" \
    > "$OUT/results/tune_$op.txt" 2>> "$OUT/bench.log"
  rc=$?
  # 124: cut by its box, even where it ended cleanly on the SIGTERM (rows written as measured)
  if [ "$rc" -eq 124 ]; then echo "tune $op: cut by its ${t} s box (rows written)";
  elif [ "$rc" -ne 0 ]; then echo "tune $op failed ($rc)"; status=1; fi
  cat "$OUT/results/tune_$op.txt"
done

for model in $PROFILE_MODELS; do
  t=$(( $(left) - TAIL < PROFILE_LIMIT ? $(left) - TAIL : PROFILE_LIMIT ))
  if [ "$t" -lt 20 ]; then not_run+=("host_profile:$model"); continue; fi
  timeout "$t" python3 -m bench.host_profile "$model" --out "$OUT/results/host_profile_$model.txt" \
    > /dev/null 2>> "$OUT/bench.log"
  rc=$?
  if [ "$rc" -eq 124 ]; then echo "host_profile $model: cut by its ${t} s box";
  elif [ "$rc" -ne 0 ]; then echo "host_profile $model failed ($rc)"; status=1; fi
  head -n 1 "$OUT/results/host_profile_$model.txt" 2>/dev/null
done

if [ -n "$CUBE_MODELS" ]; then
  t=$(( $(left) - TAIL < CUBE_LIMIT ? $(left) - TAIL : CUBE_LIMIT ))
  if [ "$t" -ge 20 ]; then
    models=(); for m in $CUBE_MODELS; do models+=(--model "$m"); done
    timeout "$t" python3 -m bench.largest_cube "${models[@]}" --max-side "$CUBE_MAX_SIDE" --out "$OUT/results" \
      --dtype "${LARGEST_CUBE_DTYPE:-bf16}" \
      --time-limit $(( t - 15 )) \
      > "$OUT/largest_cube.txt" 2>> "$OUT/bench.log"
    rc=$?
    # 124: its box closed; the search under way wrote its row (SIGTERM), which is the designed ending
    if [ "$rc" -eq 124 ]; then echo "largest_cube: cut by its ${t} s box (rows written)";
    elif [ "$rc" -ne 0 ]; then echo "largest_cube failed ($rc)"; status=1; fi
    cat "$OUT/largest_cube.txt"
  else
    not_run+=("largest_cube")
  fi
fi

# tables and plots from every row on disk, so a case stopped by its box still shows what it measured
python3 -m bench.run --report --out "$OUT/results" --plot > "$OUT/bench_table.txt" 2>> "$OUT/bench.log" \
  || echo "bench.run --report failed or found no rows (bench.log)"
python3 -m bench.targets --out "$OUT/results" > "$OUT/results/targets.txt" 2>> "$OUT/bench.log" \
  || { echo "bench.targets failed (bench.log)"; status=1; }
cp "$OUT/info.txt" "$OUT/results/"
cat "$OUT/results/targets.txt" >> "$OUT/bench_table.txt"
cat "$OUT/bench_table.txt"
grep -E "skipped|time limit|out of memory|Error|falls back|left out|set aside" "$OUT/bench.log" | tail -n 30
if [ ${#not_run[@]} -gt 0 ]; then
  cases=()
  for c in "${not_run[@]}"; do case "$c" in largest_cube|host_profile:*|tune:*) ;; *) cases+=("$c") ;; esac; done
  echo "not run within BUDGET=${BUDGET}s: ${not_run[*]} (cases: run again with SKIP_TESTS=1 BENCH_CASES=\"${cases[*]}\")"
fi

# which kernels this run compiled itself (not carried): what the next tarball's plan should add
python3 -m bench.warm_cache --report "$TRITON_CACHE_DIR" > "$OUT/triton_cache.txt" 2>&1 && head -n 1 "$OUT/triton_cache.txt"

# a device call brings back a few files only: everything goes into one archive beside the two summaries
# (built outside $OUT, which it archives: in a folder of its own, so that two runs on one machine do not share it)
archive_dir=$(mktemp -d)
tar -czf "$archive_dir/gpu_check.tgz" -C "$OUT" --exclude=gpu_check.tgz . && mv "$archive_dir/gpu_check.tgz" "$OUT/" \
  && find "$OUT" -mindepth 1 -maxdepth 1 ! -name info.txt ! -name bench_table.txt ! -name gpu_check.tgz \
    -exec rm -rf {} +
rm -rf "$archive_dir"
echo "gpu_check: $(( SECONDS - START )) s"
if [ "$status" -eq 0 ] && [ "$tier_cut" -eq 1 ]; then exit 3; fi
exit $status
