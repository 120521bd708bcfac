#!/usr/bin/env python3
"""Set-up's last step: every module dcm, its [runtime,hf,ray,test] extras and the test suite need must import.

A module that is installed but does not import (a broken wheel, a missing shared
library, another interpreter) would otherwise show up only as skipped tests, or
not at all.  Exit 1, naming every module that fails, with the error.

REQUIRED lists import names; tests/test_scripts.py checks that it covers the
distributions pyproject.toml declares for the extras setup.sh installs.
"""

from __future__ import annotations

import importlib
import os
import sys

# The Triton kernels compile nothing at import under the interpreter (the CPU machines' mode).
os.environ.setdefault("TRITON_INTERPRET", "1")

REQUIRED = [
    # dcm's own dependencies
    "numpy", "msgpack", "zstandard", "safetensors", "tqdm", "threadpoolctl",
    # [runtime]
    "torch", "triton",
    # [hf]
    "transformers",
    # [ray]
    "ray",
    # [test]
    "pytest", "hypothesis",
    # dcm itself, the runtime and its kernels (imports torch and triton for real)
    "dcm", "dcm.runtime", "dcm.runtime.triton_backend", "dcm.distributed.ray",
]


def main() -> int:
    failed, versions = [], {}
    for name in REQUIRED:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure to import is the finding
            failed.append(f"{name} ({type(exc).__name__}: {exc})")
            continue
        versions[name] = getattr(module, "__version__", None)
    if failed:
        for line in failed:
            print(f"setup: FAIL: cannot import {line}", file=sys.stderr)
        print(f"setup: FAIL: {len(failed)} of {len(REQUIRED)} required modules do not import", file=sys.stderr)
        return 1
    shown = ", ".join(f"{n} {versions[n]}" for n in ("dcm", "torch", "triton", "transformers", "numpy", "ray"))
    print(f"setup: ok: all {len(REQUIRED)} required modules import: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
