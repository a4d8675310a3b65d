#!/usr/bin/env bash
# One GPU session's checks in about 8 minutes on one H100/H200, install included
# (runbook: shared/ENGINEERING.md section 5; device notes: METHOD.md). Run: bash bench/gpu_check.sh
#
#   stage                                  time limit
#   environment + offline install          ~15 s + 45 s
#   self-check (python -m fused_kernels)         45 s
#   GPU test suite (pytest -m gpu):        150 s
#     bf16/fp16 correctness at realistic sizes, determinism
#   python -m bench --quick                220 s (measurement budget 170 s, then table and plots)
#
# Each stage runs under `timeout`, and every stage writes as it goes, so the script ends in about
# 8 minutes whatever happens and leaves what it has in $OUT (default bench/results):
#   gpu_check.log  everything printed (environment, self-check, test log, benchmark log, summary)
#   bench.json     one record per measurement;  summary.md  ours vs the best other provider
#   attention.png  attention_shapes.png  norms.png  models.png
# Seven files: the device tool brings back at most eight.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
PY="${PYTHON:-python3}"
# The project is importable from the checkout even when the install below fails (no network there).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Compiled kernels, never the interpreter: TRITON_INTERPRET=1 left over from a CPU session would make
# every "GPU" number an interpreter number.
unset TRITON_INTERPRET
start=$SECONDS
failed=()
stage() { echo; echo "== $1 (t=$((SECONDS - start)) s)" | tee -a "$LOG"; }
# run NAME LIMIT CMD...: CMD under a time limit, output to the terminal and the log; record failures.
run() {
    local name=$1 limit=$2 rc
    shift 2
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        failed+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ", time limit ${limit}s"))")
        echo "!! $name: exit $rc" | tee -a "$LOG"
    fi
}

stage "environment"
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || echo "no nvidia-smi"
    "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), "sm", f"{p.major}{p.minor}", "SMs", p.multi_processor_count,
          "L2 MiB", getattr(p, "L2_cache_size", 0) >> 20, "memory GiB", p.total_memory >> 30)
else:
    print("WARNING: no CUDA device: the tests below skip and the benchmark runs its CPU harness check")
PY
} 2>&1 | tee -a "$LOG"
if [ "${GPU_CHECK_INSTALL:-1}" = 1 ]; then     # GPU_CHECK_INSTALL=0: leave the environment alone
    run "install" 45 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
"$PY" -c "import fused_kernels, transformer, bench; print('import ok:', fused_kernels.__file__)" 2>&1 | tee -a "$LOG"

stage "self-check: every kernel against its float64 reference"
run "self-check" 45 "$PY" -m fused_kernels

stage "GPU test suite (marker gpu)"
# tests/conftest.py turns the interpreter on unless TRITON_INTERPRET is already set: set it to 0.
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4)     # parallel Triton compiles; the GPU is shared fine
TRITON_INTERPRET=0 run "gpu tests" 150 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider -rfE --maxfail=20 \
    "${xdist[@]}"

stage "benchmarks: python -m bench --quick"
run "bench" 220 "$PY" -m bench --quick --out "$OUT" --budget-s 170

stage "done in $((SECONDS - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
    printf '!! failed: %s\n' "${failed[@]}" | tee -a "$LOG"
    exit 1
fi
echo "all stages passed; results in $OUT" | tee -a "$LOG"
