"""Payloads of the baseline kinds (spec 10.10–10.12): ``sign`` (BitDelta), ``lowrank``, ``sparse`` (DARE).

Each is a short run of sections (``sections.py``); each decodes to Δ̂ in
float32, which the record adds to its base like ``lowrank-mixed`` does.

- sign, shape (m, n):   scales (1 or m float32), signs (n 1-bit codes per row whose scale is not 0)
                        Δ̂[a, b] = +scale[a] if the bit is 1 else −scale[a]   (scale[0] for one per matrix);
                        a row of scale 0 stores no bits and Δ̂ is 0 there
- lowrank, shape (m, n), rank k:
                        S (k float32), V (k·n float16), U (k·m float16), vector-major
                        Δ̂ = Û·diag(S)·V̂ᵀ
- sparse, n elements:   [mask (n 1-bit codes, C order), with the bitmask], values (float16 per kept element)
                        Δ̂ = the values at the kept elements in C order, 0 elsewhere
"""

from __future__ import annotations

import numpy as np

from . import bitpack, masks, sections
from .constants import MaskEncoding, SignScales
from .errors import PayloadError

F32 = np.dtype("<f4")
F16 = np.dtype("<f2")


def _finite(values: np.ndarray, what: str, where: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise PayloadError(f"{where}: {what} hold a value that is not finite")
    return values


# --- sign ---------------------------------------------------------------------------


def sign_layout(shape, scales: int, coded_rows: int) -> list:
    """Sections of a sign blob whose non-zero scales cover ``coded_rows`` rows (m with one scale)."""
    m, n = shape
    count = m if scales == SignScales.ROW else 1
    return sections.layout([("scales", count * F32.itemsize), ("signs", bitpack.packed_size(coded_rows * n, 1))])


def pack_sign(shape, scales_mode: int, scales: np.ndarray, positive: np.ndarray) -> bytes:
    """``positive`` (m, n): the sign bits; only the rows of a non-zero scale are stored."""
    rows = _coded_rows(shape, scales_mode, scales)
    return sections.join(sign_layout(shape, scales_mode, int(rows.sum())), {
        "scales": np.asarray(scales, dtype=F32).tobytes(),
        "signs": bitpack.pack(np.asarray(positive, dtype=np.uint8)[rows].reshape(-1), 1)})


def _coded_rows(shape, scales_mode, scales) -> np.ndarray:
    scales = np.asarray(scales, dtype=np.float32).reshape(-1)
    if scales_mode == SignScales.ROW:
        return scales != 0
    return np.full(shape[0], bool(scales[0] != 0))


def sign_delta(raw, shape, scales_mode: int, where: str) -> np.ndarray:
    m, n = shape
    count = m if scales_mode == SignScales.ROW else 1
    if len(raw) < count * F32.itemsize:
        raise PayloadError(f"{where}: blob of {len(raw)} bytes is shorter than its {count} scales")
    scales = _finite(np.frombuffer(memoryview(raw)[:count * F32.itemsize], dtype=F32).astype(np.float32),
                     "scales", where)
    rows = _coded_rows(shape, scales_mode, scales)
    parts = sections.split(raw, sign_layout(shape, scales_mode, int(rows.sum())), where)
    positive = bitpack.unpack(parts["signs"], int(rows.sum()) * n, 1).reshape(-1, n).astype(bool)
    out = np.zeros((m, n), dtype=np.float32)
    column = np.broadcast_to(scales.reshape(-1, 1), (m, 1))[rows]  # each coded row's scale
    out[rows] = np.where(positive, column, -column)
    return out


# --- lowrank ------------------------------------------------------------------------


def lowrank_layout(shape, rank: int) -> list:
    m, n = shape
    return sections.layout([("S", rank * F32.itemsize), ("V", rank * n * F16.itemsize),
                            ("U", rank * m * F16.itemsize)])


def pack_lowrank(shape, s, u, v) -> bytes:
    """``u`` (k, m) and ``v`` (k, n) vector-major."""
    return sections.join(lowrank_layout(shape, len(s)), {
        "S": np.asarray(s, dtype=F32).tobytes(), "V": np.asarray(v, dtype=F16).tobytes(),
        "U": np.asarray(u, dtype=F16).tobytes()})


def lowrank_factors(raw, shape, rank: int, where: str):
    """(S, Û (k, m), V̂ (k, n)) in float32."""
    m, n = shape
    parts = sections.split(raw, lowrank_layout(shape, rank), where)
    s = _finite(np.frombuffer(parts["S"], dtype=F32).astype(np.float32), "S", where)
    v = _finite(np.frombuffer(parts["V"], dtype=F16).reshape(rank, n).astype(np.float32), "V", where)
    u = _finite(np.frombuffer(parts["U"], dtype=F16).reshape(rank, m).astype(np.float32), "U", where)
    return s, u, v


def lowrank_delta(raw, shape, rank: int, where: str) -> np.ndarray:
    s, u, v = lowrank_factors(raw, shape, rank, where)
    return (u.T * s) @ v


# --- sparse ---------------------------------------------------------------------------


def sparse_layout(count: int, mask: int, kept: int) -> list:
    parts = [("mask", bitpack.packed_size(count, 1))] if mask == MaskEncoding.BITMASK else []
    return sections.layout(parts + [("values", kept * F16.itemsize)])


def sparse_keep(count: int, mask: int, seed: int, drop: int, raw=None, where: str = "") -> np.ndarray:
    """The keep mask (bool, C order): from the hash, or read from the blob's bitmask."""
    if mask == MaskEncoding.HASH:
        return masks.kept_flat(seed, count, drop)
    nbytes = bitpack.packed_size(count, 1)
    if len(raw) < nbytes:
        raise PayloadError(f"{where}: blob of {len(raw)} bytes is shorter than its {nbytes}-byte mask")
    return bitpack.unpack(memoryview(raw)[:nbytes], count, 1).astype(bool)


def pack_sparse(count: int, mask: int, keep: np.ndarray, values: np.ndarray) -> bytes:
    data = {"values": np.asarray(values, dtype=F16).tobytes()}
    if mask == MaskEncoding.BITMASK:
        data["mask"] = bitpack.pack(keep.astype(np.uint8), 1)
    return sections.join(sparse_layout(count, mask, int(keep.sum())), data)


def sparse_delta(raw, shape, mask: int, seed: int, drop: int, where: str) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    keep = sparse_keep(count, mask, seed, drop, raw, where)
    parts = sections.split(raw, sparse_layout(count, mask, int(keep.sum())), where)
    out = np.zeros(count, dtype=np.float32)
    out[keep] = _finite(np.frombuffer(parts["values"], dtype=F16).astype(np.float32), "values", where)
    return out.reshape(shape)
