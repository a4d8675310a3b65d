#!/usr/bin/env bash
# One GPU session's checks in at most 9 minutes on one H100/H200, correctness first (docs/gpu-check.md).
#
#   bash bench/gpu_check.sh              on the GPU machine (results in $OUT, default bench/results)
#   bash bench/gpu_check.sh --dry-run    on a CPU: every stage in a cheap form (tests/test_gpu_check.py)
#
# Stages, each under its own time limit (cut further to what is left of GPU_CHECK_BUDGET_S, default 540 s):
#   environment                                               30 s
#   offline install (pip --no-deps --no-index -e .)           60 s   GPU_CHECK_INSTALL=0 skips it
#   self-check (python -m fused_kernels)                      60 s
#   probes, CUDA_LAUNCH_BLOCKING=1, one process each:        grid 120 s, fp64 60 s, sdpa_views 45 s
#   GPU configurations + shipped tiles (both archs)          180 s   pytest -n 8 --timeout 120 -v --tb=line
#   GPU-marked tests (pytest -m gpu)                         150 s
#   compute-sanitizer --tool memcheck on the small probe      90 s   skipped on gVisor / without the tool
#   benchmark (python -m bench --only attention --only norm) 150 s   with what is left, 75 s kept for:
#   train vit, 100 steps                                      75 s   if 60 s are left
# A failing or timed-out stage is recorded and the next one runs. Everything lands in $OUT, 7 files at most:
#   gpu_check.log   every stage's full output;   gpu_check.json   environment + stage results
#   bench.json  summary.md  attention.png  attention_shapes.png  norms.png   (the benchmark)
# Exit status 1 if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (expected --dry-run or --help)" >&2; exit 2 ;;
    esac
done

OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
JSON="$OUT/gpu_check.json"
: >"$LOG"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
RESERVE=10                                   # seconds kept for the summary
WORK="$(mktemp -d)"                          # scratch (stage outputs, the training run): not part of $OUT
trap 'rm -rf "$WORK"' EXIT
# The project is importable from the checkout even when the install fails (no network there).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY" = 0 ]; then
    # Compiled kernels, never the interpreter: TRITON_INTERPRET=1 left over from a CPU session would make every
    # "GPU" result an interpreter result. (tests/conftest.py turns it on without a GPU unless it is set: 0.)
    export TRITON_INTERPRET=0
fi
start=$SECONDS
failed=()
stages=()                                    # JSON objects, one per stage

say() { echo "$*" | tee -a "$LOG"; }
json_str() {   # a JSON string of $1, in bash alone (the stage results are written even when Python is broken)
    local s
    s=$(printf '%s' "$1" | tr -d '\000-\010\013-\037' | tr '\t\n' '  ')
    s=${s//\\/\\\\}
    printf '"%s"' "${s//\"/\\\"}"
}
record() {   # record NAME STATUS SECONDS LIMIT RC DETAIL
    stages+=("{\"stage\": $(json_str "$1"), \"status\": \"$2\", \"seconds\": $3, \"limit_s\": $4, \"exit\": $5, \"detail\": $(json_str "$6")}")
    write_json
}
write_json() {
    local joined
    joined=$(IFS=,; echo "${stages[*]-}")
    printf '{"dry_run": %s, "budget_s": %s, "elapsed_s": %s, "environment": %s, "stages": [%s]}\n' \
        "$([ "$DRY" = 1 ] && echo true || echo false)" "$BUDGET" "$((SECONDS - start))" "${ENV_JSON:-null}" \
        "$joined" >"$JSON"
}
left() { echo $((BUDGET - RESERVE - (SECONDS - start))); }

# run NAME LIMIT CMD...: CMD with a time limit of min(LIMIT, what is left), its output into the log (the last
# lines also to the terminal); records passed / failed / timed out. Environment assignments go before CMD
# through `env`.
run() {
    local name=$1 limit=$2 t0 rc status
    shift 2
    local avail
    avail=$(left)
    if [ "$avail" -lt 10 ]; then
        say "-- $name: skipped, ${avail} s left of the ${BUDGET} s budget"
        record "$name" skipped 0 0 0 "no time left"
        return 0
    fi
    [ "$limit" -gt "$avail" ] && limit=$avail
    say ""
    say "== $name (t=$((SECONDS - start)) s, limit ${limit} s): $*"
    t0=$SECONDS
    timeout -k 10 "$limit" "$@" >"$WORK/stage.out" 2>&1
    rc=$?
    cat "$WORK/stage.out" >>"$LOG"
    tail -n 3 "$WORK/stage.out"
    if [ "$rc" -eq 0 ]; then
        status=passed
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status=timeout
    else
        status=failed
    fi
    say "-- $name: $status (exit $rc) in $((SECONDS - t0)) s"
    if [ "$status" != passed ]; then
        failed+=("$name ($status, exit $rc)")
    fi
    record "$name" "$status" $((SECONDS - t0)) "$limit" "$rc" "$(tail -n 1 "$WORK/stage.out" | cut -c1-300)"
}
skip() {   # skip NAME REASON
    say ""
    say "-- $1: skipped: $2"
    record "$1" skipped 0 0 0 "$2"
}

# ------------------------------------------------------------------------------------------------ environment
say "== environment (t=0 s)$([ "$DRY" = 1 ] && echo ', dry run: cheap forms of every stage on this machine')"
{
    date -u
    uname -a
    timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv \
        || echo "nvidia-smi: not available"
} 2>&1 | tee -a "$LOG"
ENV_JSON=$(timeout 30 "$PY" - <<'PY' 2>>"$LOG"
import importlib, json, os, platform
env = {"python": platform.python_version(), "kernel": platform.release(), "machine": platform.machine()}
for mod in ("torch", "triton", "numpy", "transformers", "xdist", "pytest_timeout"):
    try:
        env[mod] = getattr(importlib.import_module(mod), "__version__", "installed")
    except Exception as exc:
        env[mod] = f"missing ({type(exc).__name__})"
import torch
env["cuda"] = torch.version.cuda
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
               memory_gib=round(p.total_memory / 2**30, 1), l2_mib=getattr(p, "L2_cache_size", 0) >> 20)
else:
    env["gpu"] = None
print(json.dumps(env))
PY
)
[ -n "$ENV_JSON" ] || ENV_JSON=null
say "$ENV_JSON"
has_gpu=$(echo "$ENV_JSON" | "$PY" -c 'import json, sys; print(int(bool((json.load(sys.stdin) or {}).get("gpu"))))' \
          2>/dev/null || echo 0)
if [ "$DRY" = 0 ] && [ "$has_gpu" != 1 ]; then
    say "WARNING: no CUDA device: the GPU stages below will fail (bash bench/gpu_check.sh --dry-run on a CPU)"
fi
gvisor=0
if (dmesg 2>/dev/null | grep -qi gvisor) || grep -qi gvisor /proc/version 2>/dev/null; then gvisor=1; fi
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer \
            2>/dev/null | head -n 1)
say "gVisor: $gvisor; compute-sanitizer: ${sanitizer:-not found}"
if [ "$ENV_JSON" = null ]; then
    failed+=("environment (the Python block failed: see the log)")
    record environment failed $((SECONDS - start)) 30 1 "the Python block failed"
else
    record environment passed $((SECONDS - start)) 30 0 "see gpu_check.json environment"
fi

# --------------------------------------------------------------------------------------------- installation
if [ "$DRY" = 1 ]; then
    skip install "dry run (would run: $PY -m pip install -q --no-deps --no-build-isolation --no-index -e .)"
elif [ "${GPU_CHECK_INSTALL:-1}" = 1 ]; then
    run install 60 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
else
    skip install "GPU_CHECK_INSTALL=0"
fi
run import 30 "$PY" -c "import fused_kernels, transformer, bench; print('import ok:', fused_kernels.__file__)"

# ----------------------------------------------------------------------------------------------- correctness
if [ "$DRY" = 1 ]; then
    run self-check 60 "$PY" -m fused_kernels --help
else
    run self-check 60 "$PY" -m fused_kernels
fi

probe_flags=()
[ "$DRY" = 1 ] && probe_flags=(--dry-run)
run "probe grid" 120 env CUDA_LAUNCH_BLOCKING=1 "$PY" bench/gpu_probes.py ${probe_flags[@]+"${probe_flags[@]}"} grid
run "probe fp64" 60 env CUDA_LAUNCH_BLOCKING=1 "$PY" bench/gpu_probes.py ${probe_flags[@]+"${probe_flags[@]}"} fp64
run "probe sdpa_views" 45 env CUDA_LAUNCH_BLOCKING=1 "$PY" bench/gpu_probes.py ${probe_flags[@]+"${probe_flags[@]}"} sdpa_views

pytest_flags=(-v --tb=line -rfE -p no:cacheprovider)
if [ "$DRY" = 1 ]; then
    pytest_flags+=(--collect-only -q)
elif "$PY" -c "import xdist" 2>/dev/null; then
    pytest_flags+=(-n "${GPU_CHECK_WORKERS:-8}")       # parallel Triton compiles; one GPU shared fine
fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    pytest_flags+=(--timeout 120)                        # a hung test fails alone, not the stage
fi
run "tests: GPU configurations" 180 "$PY" -m pytest tests/test_attention_gpu_configs.py \
    tests/test_attention_shipped.py tests/test_grid_limits.py tests/test_fp64_bool_mask.py "${pytest_flags[@]}"
run "tests: -m gpu" 150 "$PY" -m pytest tests -m gpu "${pytest_flags[@]}"

if [ "$gvisor" = 1 ]; then
    skip compute-sanitizer "gVisor (the sanitizer cannot attach there)"
elif [ -z "$sanitizer" ] || [ "$DRY" = 1 ]; then
    # Without the tool (or on a CPU), the sanitizer's workload alone: every kernel once.
    [ "$DRY" = 0 ] && say "compute-sanitizer not found: running its workload without it"
    run "small probe (compute-sanitizer workload)" 90 env CUDA_LAUNCH_BLOCKING=1 "$PY" bench/gpu_probes.py \
        ${probe_flags[@]+"${probe_flags[@]}"} small
else
    # One allocation per tensor (no caching allocator), so that an out-of-bounds access leaves its buffer.
    run compute-sanitizer 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 \
        --print-limit 20 "$PY" bench/gpu_probes.py small
fi

# -------------------------------------------------------------------------------------------------- speed
train_reserve=75
bench_budget=$(( $(left) - train_reserve - 30 ))       # 30 s: the benchmark's own start, table and plots
[ "$bench_budget" -gt 120 ] && bench_budget=120
if [ "$DRY" = 1 ]; then
    run benchmark 150 "$PY" -m bench --only norm --no-plots --budget-s 2 --out "$OUT"
elif [ "$bench_budget" -ge 20 ]; then
    run benchmark $((bench_budget + 30)) "$PY" -m bench --only attention --only norm --out "$OUT" --budget-s "$bench_budget"
else
    skip benchmark "$(left) s left"
fi
if [ "$DRY" = 1 ]; then
    run "train vit" 60 "$PY" -m transformer train vit --help
elif [ "$(left)" -ge 60 ]; then
    run "train vit" "$train_reserve" "$PY" -m transformer train vit --steps 100 --out "$WORK/vit" --no-progress
else
    skip "train vit" "$(left) s left"
fi

# ------------------------------------------------------------------------------------------------ summary
files=$(find "$OUT" -type f | wc -l)
say ""
say "== done in $((SECONDS - start)) s of the ${BUDGET} s budget; $files files in $OUT"
if [ "$files" -gt 8 ]; then
    failed+=("output ($files files in $OUT, the device tool brings back 8)")
fi
"$PY" - "$JSON" <<'PY' | tee -a "$LOG"
import json, sys
report = json.load(open(sys.argv[1]))
for s in report["stages"]:
    print(f"  {s['stage']:<44} {s['status']:<8} {s['seconds']:>4} s  {s['detail'][:70]}")
PY
write_json
if [ ${#failed[@]} -gt 0 ]; then
    printf '!! failed: %s\n' "${failed[@]}" | tee -a "$LOG"
    exit 1
fi
say "all stages passed; results in $OUT"
