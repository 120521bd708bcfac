#!/usr/bin/env bash
# Idempotent set-up of a fresh machine for dcm.
#
# 1. torch==2.13.0 first: on this kind of machine pip takes the CPU build from
#    local disk; a bare `torch` requirement would pull a multi-GB CUDA build.
# 2. the project itself, editable, with the runtime, Hugging Face, Ray and test extras
#    (the Ray tests start a local cluster: Ray installs from its wheel, no build).
# 3. a check that every required module imports (scripts/check_imports.py).
#
# Re-running it is cheap: pip only checks what is already there.
# PYTHON=/path/to/python bash scripts/setup.sh picks another interpreter.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
export PIP_ROOT_USER_ACTION=ignore  # pip warns about root otherwise; CI runs as root
PIP=("$PYTHON" -m pip install --quiet --progress-bar off)

echo "setup: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON")"

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.__version__.split("+")[0] == "2.13.0" else 1)' 2>/dev/null; then
    echo "setup: torch 2.13.0 already installed"
else
    echo "setup: installing torch==2.13.0 (CPU build)"
    "${PIP[@]}" "torch==2.13.0"
fi

echo "setup: installing dcm (editable) with extras [runtime,hf,ray,test]"
"${PIP[@]}" -e ".[runtime,hf,ray,test]"

# 3. every required module must import (torch, triton, transformers, ...): a missing
#    one fails here, not as tests that skip later.
"$PYTHON" scripts/check_imports.py
