#!/usr/bin/env bash
# One-shot GPU suite: build the extension, run the GPU tests, benchmark, write JSON + logs
# (OUTDIR gets suite_results.tar.gz and copies of the main files: see finish below).
#   bash benchmarks/gpu_suite.sh OUTDIR
# Optional: wheels in .whl/ are installed to /tmp/site first (the Inf-CL row needs
# `pip download --no-deps -d .whl inf-cl==1.2.1` beforehand, carried to the GPU machine); FASTCL_COMMIT names the
# commit in the results when the copy has no .git; BENCH_ARGS replaces the benchmark's options (default: skip
# Inf-CL at N=131072, about 6.4 s a call, measured at b463cd9); SUITE_QUICK=1 shrinks the benchmarks; SUITE_NO_TABLE=1 skips
# the triton-vs-cuda dispatch-table measurement (TABLE_ARGS passes options to it); SUITE_STEPS picks steps
# (comma list of build,tests,bench,table,masking,ring,losses,tuning,sanitize, run in that order; default all but table,
# tuning and sanitize, which keeps one call under 10 minutes), e.g. SUITE_STEPS=table,tuning for a second call on the
# same warm machine.
# SUITE_BUDGET_S (default 520) caps the whole call: each step runs under `timeout` with what is left, and a
# step that finds under 15 s left is skipped, so the call ends with its results on disk instead of being
# killed from outside (the benchmark scripts write their JSON as they go).  SUITE_TESTS_S (default 200) caps
# the GPU tests on their own (over 300 of them, many never run on a GPU), so they cannot starve the benchmarks;
# their log names each test as it ends, and SUITE_STEPS=tests with a larger cap finishes them in a later call.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$OUT"
# Everything is written to WORK; at exit the call's $OUT gets suite_results.tar.gz (all of it) and
# copies of the main files, at most 8 files in all (the limit on what a lent machine sends back).
WORK=${SUITE_WORK:-$(mktemp -d /tmp/fastcl_suite.XXXXXX)}
mkdir -p "$WORK"
finish() {
  tar czf "$OUT/suite_results.tar.gz" -C "$WORK" . 2>/dev/null
  for f in gpu.txt gpu_tests.log clip_bench.json masking_gpu.json dispatch_table.py tuning_bench.json; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
  done
}
trap finish EXIT
trap 'exit 143' TERM INT  # a stop from outside still packs what is there
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export FASTCL_COMMIT=${FASTCL_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
start=$(date +%s)
stamp() { echo "[suite +$(( $(date +%s) - start ))s] $*"; }
SUITE_BUDGET_S=${SUITE_BUDGET_S:-520}
[[ "$SUITE_BUDGET_S" =~ ^[0-9]+$ ]] || { echo "SUITE_BUDGET_S must be a whole number of seconds, got '$SUITE_BUDGET_S'" >&2; exit 2; }
SUITE_TESTS_S=${SUITE_TESTS_S:-200}
[[ "$SUITE_TESTS_S" =~ ^[0-9]+$ ]] || { echo "SUITE_TESTS_S must be a whole number of seconds, got '$SUITE_TESTS_S'" >&2; exit 2; }
budgeted() {  # run "$@" with the time left in SUITE_BUDGET_S, and at most STEP_CAP_S when that is set
  local left=$(( SUITE_BUDGET_S - ($(date +%s) - start) ))
  if (( left < 15 )); then stamp "skipped, SUITE_BUDGET_S=${SUITE_BUDGET_S} spent: $*"; return 124; fi
  if [[ -n "${STEP_CAP_S:-}" ]] && (( STEP_CAP_S < left )); then left=$STEP_CAP_S; fi
  timeout --kill-after=5 "$left" "$@"
}
want() { [[ ",${SUITE_STEPS:-build,tests,bench,masking,ring,losses}," == *",$1,"* ]]; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$WORK/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$WORK/gpu.txt"
# Where the extension build will look for the CUDA toolkit (setup.py's _toolkit_home when CUDA_HOME is unset).
echo "nvcc: $(command -v nvcc || echo none) CUDA_HOME=${CUDA_HOME:-unset}" | tee -a "$WORK/gpu.txt"
# Whether cuBLAS can add a bf16 product into an fp32 out= (the strip backwards' Gk); if not,
# fastcl.ops.strips.mm_f32_into warns and goes through an fp32 temporary.
python3 - <<'PY' 2>&1 | tee -a "$WORK/gpu.txt"
import torch
a = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
out = torch.zeros(64, 64, device="cuda")
for name, call in (("mm", lambda: torch.mm(a, a.T, out_dtype=torch.float32, out=out)),
                   ("addmm", lambda: torch.addmm(out, a, a.T, out_dtype=torch.float32, out=out))):
    try:
        call()
        print(f"{name} bf16 -> fp32 out=: ok")
    except Exception as exc:
        print(f"{name} bf16 -> fp32 out=: {type(exc).__name__}: {str(exc)[:160]}")
PY

if want build; then
stamp "1. build"
pipe=(python3 -m pip install --no-build-isolation --no-deps --no-index -e .)
# SUITE_NO_EXT=1 installs the Python package only (the triton paths need no compiled code).
[ "${SUITE_NO_EXT:-0}" = "1" ] && export FASTCL_NO_EXT=1
if ! budgeted "${pipe[@]}" >"$WORK/build.log" 2>&1; then
  stamp "build with CUDA sources failed (tail of log below); retrying CPU-only extension"
  tail -25 "$WORK/build.log"
  FASTCL_NO_CUDA=1 budgeted "${pipe[@]}" >>"$WORK/build.log" 2>&1 || stamp "CPU extension build failed too"
fi
fi
python3 -c "import fastcl; from fastcl import _ext; print('extension:', _ext.extension_available(), 'cuda kernels:', _ext.extension_has_cuda())"

if want tests; then
stamp "2. GPU tests"
# test_gpu.py's hundreds of option-matrix tests run last, so the cap cuts those, not the few
# tests of each other file (host syncs, compile, masking, the loss family).
FASTCL_TESTS_LAST=${FASTCL_TESTS_LAST:-test_gpu.py} STEP_CAP_S=$SUITE_TESTS_S budgeted python3 -m pytest -v -m gpu -p no:cacheprovider --durations=15 ${SUITE_TESTS:-tests} \
  --junitxml="$WORK/gpu_tests.xml" >"$WORK/gpu_tests.log" 2>&1
code=$?
echo "gpu tests exit code: $code$( ((code == 124)) && echo " (stopped at SUITE_TESTS_S=$SUITE_TESTS_S; the log lists the tests that ended)")"
tail -15 "$WORK/gpu_tests.log"
fi

if want bench; then
stamp "3. benchmarks"
if [ "${SUITE_QUICK:-0}" = "1" ]; then
  budgeted python3 benchmarks/gpu_bench.py --ns 8192,32768 --rep-ms 200 --config-sweep "" --json "$WORK/clip_bench.json" 2>&1 \
    | tee "$WORK/bench.log" | tail -30
else
  budgeted python3 benchmarks/gpu_bench.py ${BENCH_ARGS:---skip infcl@131072 --rep-ms 250} --json "$WORK/clip_bench.json" 2>&1 \
    | tee "$WORK/bench.log" | tail -30
fi
fi
if want table; then
stamp "3b. triton vs cuda over a shape grid: the dispatch table (adopt it by copying $OUT/dispatch_table.py to fastcl/ops/)"
if [ "${SUITE_NO_TABLE:-0}" != "1" ] && python3 -c "from fastcl._ext import extension_has_cuda as h; raise SystemExit(0 if h() else 1)"; then
  if [ "${SUITE_QUICK:-0}" = "1" ]; then
    table_args="--table-ns 8192,32768 --table-ds 256,768 --table-dtypes bfloat16"
  else
    table_args=${TABLE_ARGS:-}
  fi
  budgeted python3 benchmarks/gpu_bench.py --dispatch-table "$WORK/dispatch_table.py" --rep-ms 100 $table_args 2>&1 \
    | tee "$WORK/dispatch_table.log" | grep -E '^\{|Error' | tail -40
else
  echo "skipped (SUITE_NO_TABLE=1, or fastcl._C has no CUDA kernels)"
fi
fi
if want masking; then
stamp "4. masking"
budgeted python3 benchmarks/bench_masking.py --device cuda --json "$WORK/masking_gpu.json" 2>&1 | tail -20
fi
if want ring; then
stamp "5. ring code path, world size 1"
budgeted python3 benchmarks/dist_ring_vs_gather.py --world-size 1 --device cuda --json "$WORK/dist_ring_ws1.json" 2>&1 | tail -6
fi

if want losses; then
stamp "6. loss family on the GPU: clip, ntxent, supcon, siglip, dcl vs naive (fastcl bench)"
budgeted python3 -m fastcl bench --device cuda --cases clip,ntxent,supcon,siglip,dcl --sizes 8192,32768 --dim 256 --out "$WORK/losses" 2>&1 | tail -25
# Above D=256 the sigmoid loss takes the Triton strip mode (kernels/sigmoid_pair.py).
budgeted python3 -m fastcl bench --device cuda --cases siglip --sizes 8192,32768 --dim 768 --out "$WORK/losses_d768" 2>&1 | tail -8
fi


if want tuning; then
stamp "7. opt-in Triton tuning: autotuned LSE kernels, shared exp (breakdown rows), launch-shape sweep, masking tile sweep"
budgeted python3 benchmarks/gpu_bench.py --ns "" --mode-check "" --exp-check 32768:768 --breakdown 32768:768 --tuning-rows \
  --config-sweep 32768:768 --sweep-shapes all --sweep-exp exact,shared --profile "" --json "$WORK/tuning_bench.json" 2>&1 | tee "$WORK/tuning.log" | tail -20
budgeted python3 benchmarks/bench_masking.py --device cuda --sweep --json "$WORK/masking_sweep.json" 2>&1 | tail -12
fi
if want sanitize; then
stamp "8. opt-in compute-sanitizer over the CUDA kernels' GPU tests (what the CPU emulation cannot see)"
san=$(command -v compute-sanitizer || true)
[ -z "$san" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ] && san="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
if [ -n "$san" ]; then
  # No caching allocator, so memcheck sees each tensor's own bounds.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  for tool in memcheck racecheck synccheck; do
    budgeted "$san" --tool "$tool" --error-exitcode 9 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
      -k "epilogue" >"$WORK/sanitize_$tool.log" 2>&1
    echo "$tool exit code: $? (9: the tool found errors; see sanitize_$tool.log in the tarball)"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$WORK/sanitize_$tool.log" | tail -3
  done
  budgeted "$san" --tool memcheck --error-exitcode 9 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_masking.py \
    -k "(gpu_vector_and_fallback or gpu_index_kernel) and cuda" >"$WORK/sanitize_masking.log" 2>&1
  echo "masking memcheck exit code: $?"
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
else
  echo "skipped: no compute-sanitizer on PATH or in CUDA_HOME"
fi
fi
stamp "done"
