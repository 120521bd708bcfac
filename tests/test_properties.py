"""Property tests: random fine-tunes through every method and ratio, then both decoders.

For random shapes, dtypes, methods and ratios, ``dcm encode`` -> ``dcm decode``
must give back every tensor with its name, dtype and shape; tensors a lossy
method does not touch (not 2-D, or exact kinds) come back bit for bit; the
decoded tensors equal what ``DcmFile.tensor`` rebuilds; and the independent
reference decoder reads the same codes and factors, bit for bit, and rebuilds
the same tensors within rounding.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import dcm
from conftest import random_storage, read_checkpoint, write_checkpoint
from dcm import dtypes
from dcm.errors import UsageError
from dcm.verify import verify
from test_vectors import decode_with_dcm, decode_with_reference

METHODS = ["lossless", "delta-come", "impart", "impart-qt", "lowrank", "dare", "bitdelta"]
LOSSY_KINDS = {"lowrank-mixed", "sparse-lowrank", "sign", "lowrank", "sparse"}

tensor = st.tuples(st.sampled_from(["F32", "F16", "BF16"]),
                   st.one_of(st.tuples(st.integers(1, 96), st.integers(1, 96)), st.tuples(st.integers(1, 20))))


def perturbed(rng, dt: str, array: np.ndarray) -> np.ndarray:
    values = dtypes.to_float32(array, dt) + rng.standard_normal(array.shape).astype(np.float32) * 0.01
    return dtypes.from_float32(values, dt)


def as_f64(data: bytes, dt: str) -> np.ndarray:
    return dtypes.to_float32(np.frombuffer(data, dtype=dtypes.dtype(dt).storage), dt).astype(np.float64)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(tensor, min_size=1, max_size=4), st.sampled_from(METHODS),
       st.sampled_from(["1/4", "1/8", "1/16", "1/32"]), st.integers(0, 2**32 - 1))
def test_encode_decode_round_trip(tensors, method, ratio, seed):
    rng = np.random.default_rng(seed)
    base, ft = {}, {}
    for i, (dt, shape) in enumerate(tensors):
        b = dtypes.from_float32(rng.standard_normal(shape).astype(np.float32), dt)
        base[f"t{i}"], ft[f"t{i}"] = (dt, b), (dt, perturbed(rng, dt, b))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_checkpoint(tmp / "base", base)
        write_checkpoint(tmp / "ft", ft)
        try:
            dcm.encode(tmp / "base", tmp / "ft", tmp / "x.dcm", method=method,
                       ratio=None if method == "lossless" else ratio)
        except UsageError as e:  # a budget too small for the matrices' index entries: refused, clearly
            assert "raise the ratio" in str(e)
            event("budget too small")
            return
        verify(tmp / "x.dcm", tmp / "base")
        dcm.decode(tmp / "x.dcm", tmp / "base", tmp / "out")
        decoded = read_checkpoint(tmp / "out")
        ours, _ = decode_with_dcm(tmp / "x.dcm", tmp / "base" / "model.safetensors")
        theirs, _ = decode_with_reference(tmp / "x.dcm", tmp / "base" / "model.safetensors")
        with dcm.open(tmp / "x.dcm") as f:
            kinds = {r.name: r.kind_name for r in f.records()}
    assert set(decoded) == set(ft)
    for name, (dt, array) in ft.items():
        got_dt, got = decoded[name]
        assert (got_dt, got.shape) == (dt, array.shape)
        assert got.tobytes() == ours[name][2]  # decode == DcmFile.tensor
        if kinds[name] not in LOSSY_KINDS:
            assert got.tobytes() == array.tobytes(), name  # exact kinds are exact
        codes, factors, data = theirs[name]
        assert (codes, factors) == ours[name][:2], name  # bit for bit
        mine, other = as_f64(ours[name][2], dt), as_f64(data, dt)
        step = np.abs(mine) * {"F32": 2.0**-22, "F16": 2.0**-9, "BF16": 2.0**-6}[dt] + 1e-6
        assert (np.abs(mine - other) <= step).all(), name  # the same tensor within a rounding step


@given(rows=st.integers(1, 40), cols=st.integers(1, 40), chunk=st.integers(1, 64),
       dt=st.sampled_from(["F32", "F16", "BF16"]), fortran=st.booleans(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_float32_delta_in_slices_is_the_whole_subtraction(rows, cols, chunk, dt, fortran, seed):
    """The base is widened a slice at a time (memory); the result must not depend on the slicing or layout."""
    rng = np.random.default_rng(seed)
    ft, base = (dtypes.from_float32(rng.standard_normal((rows, cols)).astype(np.float32), dt) for _ in range(2))
    if fortran:
        ft, base = np.asfortranarray(ft), np.asfortranarray(base)
    whole = dtypes.to_float32(ft, dt) - dtypes.to_float32(base, dt)
    saved = dtypes.DELTA_CHUNK_ELEMENTS
    dtypes.DELTA_CHUNK_ELEMENTS = chunk
    try:
        got = dtypes.float32_delta(ft, base, dt)
    finally:
        dtypes.DELTA_CHUNK_ELEMENTS = saved
    assert got.dtype == np.float32 and got.shape == whole.shape
    assert np.array_equal(got, whole)
