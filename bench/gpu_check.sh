#!/usr/bin/env bash
# One GPU session's checks, about 8 minutes on one H100/H200 (runbook: shared/ENGINEERING.md section 5).
# Results go to $OUT (or bench/results/ when unset): GPU test log, aot table, bandwidth JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
stamp="${gpu}_$(date +%Y%m%d)"
{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    > "$OUT/env_$stamp.txt" 2>&1
echo "== self-check" && timeout 120 python -m kernels | tee "$OUT/selfcheck_$stamp.txt"
echo "== GPU tests" && timeout 240 python -m pytest tests -m gpu -q -x -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu_tests_$stamp.txt" | tail -15
echo "== bandwidth" && timeout 180 python -m bench.memory_bound --quick --out "$OUT" 2>&1 \
    | tee "$OUT/memory_bound_$stamp.txt"
