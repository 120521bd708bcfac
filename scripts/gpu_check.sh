#!/usr/bin/env bash
# Every check that needs a GPU, in one command, in under 8 minutes on an H100/H200-class machine:
#
#   1. the runtime's kernel tests compiled for the GPU (DCM_TEST_GPU=1: Triton compiled, not interpreted)
#      and the encoder's --device cuda tests (tests/test_device.py);
#   2. the runtime benchmark (packed deltas against dequantize+matmul and dense deltas);
#   3. the encode benchmark on the GPU: a Llama-2-7B-shaped pair of 2 layers, delta-come 1/16 with the
#      exact and the randomized SVD (--device cuda), with its projection to 32 layers (target: exact
#      SVD, 7B, <= 3 minutes).
#
#   bash scripts/gpu_check.sh            # in the repository, after scripts/setup.sh (or an equivalent
#                                        # environment with a CUDA build of torch)
#   OUT=/path bash scripts/gpu_check.sh  # also keep the JSON figures and logs there
#
# Each step has its own time limit, so one that hangs cannot eat the others' time; the script goes on
# after a failure and exits non-zero at the end if any step failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DCM_TEST_GPU=1
PYTHON="${PYTHON:-python}"
failed=()

step() {  # step NAME SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit} s)"
    local started=$SECONDS
    if timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
        echo "== $name: ok in $((SECONDS - started)) s"
    else
        echo "== $name: FAILED after $((SECONDS - started)) s (log: $OUT/$name.log)"
        failed+=("$name")
    fi
}

"$PYTHON" - <<'PY' || { echo "gpu_check: torch sees no CUDA device"; exit 2; }
import sys, torch
if not torch.cuda.is_available():
    sys.exit(1)
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

step kernel-tests 150 "$PYTHON" -m pytest -q -x tests/test_runtime.py tests/test_device.py
step runtime-benchmark 90 "$PYTHON" benchmarks/runtime.py --device cuda --repeats 20 --json "$OUT/runtime.json"
step encode-benchmark 240 "$PYTHON" benchmarks/scale.py --layers 2 --configs recipe-exact,recipe-randomized \
    --device cuda --threads 4 --workdir "$OUT/scale" --json "$OUT/scale.json"

echo "gpu_check: figures and logs in $OUT"
if ((${#failed[@]})); then
    echo "gpu_check: failed: ${failed[*]}"
    exit 1
fi
echo "gpu_check: all passed"
