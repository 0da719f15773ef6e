#!/usr/bin/env bash
# One-shot GPU check: build, the cuda-marked tests with compiled Triton and the CUDA extension, then the GPU
# benchmark tables at a few shapes; one JSON and one markdown report in the folder it prints.
#
#   bash benchmarks/gpu_check.sh [REPORT_DIR]      # default: $OUT/gpu_check if $OUT is set, else ./gpu_check_report
#
# Uses the Python that `python3` (or $PYTHON) names and the torch installed there: a GPU node brings its own CUDA
# build of torch, and nothing is downloaded. Python packages the node lacks (bm25s, tyro, ...) are installed from
# wheels in $MEM1_FAST_WHEELS (default ./.whl) when that folder exists. Steps are time-boxed to stay under about
# 8 minutes in all (MEM1_FAST_GPU_CHECK_TESTS_S, _BENCH_S). Without an NVIDIA GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none); nothing to check"
  exit 0
fi
PY="${PYTHON:-python3}"
report="${1:-${OUT:+$OUT/gpu_check}}"
report="${report:-$PWD/gpu_check_report}"
mkdir -p "$report"
log() { echo "gpu_check: $*" | tee -a "$report/steps.log"; }
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$report/gpu.txt"

# 1. install: missing Python packages from carried wheels, then the package itself (builds mem1_fast._C and, with
#    nvcc on a CUDA build of torch, mem1_fast._C_cuda for sm_80 / sm_90a)
wheels="${MEM1_FAST_WHEELS:-.whl}"
if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/mem1_fast_site "$wheels"/*.whl \
    >"$report/wheels.log" 2>&1 && export PYTHONPATH="/tmp/mem1_fast_site${PYTHONPATH:+:$PYTHONPATH}"
  log "wheels from $wheels: $(ls "$wheels"/*.whl | wc -l) ($(tail -n 1 "$report/wheels.log" 2>/dev/null))"
fi
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace >"$report/build.log" 2>&1
log "build_ext exit $? in $(( $(date +%s) - t0 )) s ($(grep -c "error" "$report/build.log") lines with 'error')"
"$PY" - <<'EOF' 2>&1 | tee "$report/versions.txt"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
from mem1_fast import _ext
print("mem1_fast._C_cuda:", "loaded" if _ext.load_cuda() else f"not loaded ({_ext.cuda_error()})")
EOF

# 2. the cuda-marked tests, Triton compiled (not interpreted)
files=$(grep -l "mark.cuda" tests/test_*.py)
t1=$(date +%s)
TRITON_INTERPRET=0 timeout "${MEM1_FAST_GPU_CHECK_TESTS_S:-240}" "$PY" -m pytest $files -m cuda -q -p no:cacheprovider \
  --continue-on-collection-errors --junitxml="$report/tests.xml" >"$report/tests.log" 2>&1
log "cuda tests exit $? in $(( $(date +%s) - t1 )) s: $(tail -n 1 "$report/tests.log")"

# 3. benchmark tables: state_attention (Triton, CUDA C++, FlexAttention, FlashAttention varlen / xformers when
#    installed, against SDPA with the dense mask) at 4 and 16 turns, both exact modes; logprob_entropy / ppo_loss
#    (against Liger, cut-cross-entropy, verl, torch when installed, and the bare LM-head matmul); paged_attention's
#    Triton decode (against attention over a contiguous KV cache)
t2=$(date +%s)
MEM1_FAST_BENCH_JSON="$report/bench_rows.json" TRITON_INTERPRET=0 timeout "${MEM1_FAST_GPU_CHECK_BENCH_S:-240}" \
  "$PY" -m pytest benchmarks/benchmark_state_attention.py benchmarks/benchmark_logprob_entropy.py \
  benchmarks/benchmark_paged_attention.py -q \
  -p no:cacheprovider -k "cuda and not 8turns" --benchmark-json="$report/pytest_benchmark.json" \
  >"$report/bench.log" 2>&1
log "benchmarks exit $? in $(( $(date +%s) - t2 )) s"

# 4. the report
"$PY" benchmarks/gpu_report.py "$report" && log "report: $report/report.md, $report/report.json ($(( $(date +%s) - t0 )) s in all)"
