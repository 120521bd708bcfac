"""Asymmetric min–max quantization of vectors in groups (spec section "lowrank-mixed").

A matrix of shape (vectors, n) is quantized row by row; each row is cut into
groups of ``group_size`` consecutive elements (the last may be shorter) that
share one scale (float16) and one integer zero point (``bits`` bits):

    x̂ = (q − z) · s            q, z in [0, 2^bits − 1], computed in float32

The range of every group includes 0, so a zero element stays exactly zero
(which sparse methods rely on).  Dequantization is the normative part; how an
encoder picks s, z and q (round-to-nearest here, GPTQ in ``gptq.py``) is not.
"""

from __future__ import annotations

import math

import numpy as np

SCALE_DTYPE = np.dtype("<f2")
_F16_MAX = float(np.finfo(np.float16).max)


def group_count(n: int, group_size: int) -> int:
    return math.ceil(n / group_size)


def _grouped(x: np.ndarray, group_size: int) -> np.ndarray:
    """(rows, groups, group_size) view of x padded with zeros (zeros never widen a range that holds 0)."""
    rows, n = x.shape
    groups = group_count(n, group_size)
    pad = groups * group_size - n
    if pad:
        x = np.concatenate([x, np.zeros((rows, pad), dtype=x.dtype)], axis=1)
    return x.reshape(rows, groups, group_size)


def fit(x: np.ndarray, bits, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(scales as float16, zero points as uint8), each (rows, groups), for the values in x.

    ``bits`` is one width or one per row.  The scale is rounded to float16 first and
    the zero point chosen for that rounded scale, so the stored pair is what was used.
    """
    g = _grouped(np.asarray(x, dtype=np.float32), group_size)
    lo = np.minimum(g.min(axis=2), 0)
    hi = np.maximum(g.max(axis=2), 0)
    maxq = _maxq(bits, g.shape[0])[:, None]
    scale = np.minimum((hi - lo) / maxq, _F16_MAX).astype(SCALE_DTYPE)
    s = scale.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.where(s > 0, np.round(-lo / s), 0)
    return scale, np.clip(zero, 0, maxq).astype(np.uint8)


def _maxq(bits, rows: int) -> np.ndarray:
    bits = np.broadcast_to(np.asarray(bits, dtype=np.int64), (rows,))
    return ((1 << bits) - 1).astype(np.float32)


def quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits, group_size: int) -> np.ndarray:
    """Codes (uint8, same shape as x): round-to-nearest onto the grid of (scale, zero)."""
    x = np.asarray(x, dtype=np.float32)
    rows, n = x.shape
    s = scale.astype(np.float32)[:, :, None]  # broadcast over each group's elements
    z = zero.astype(np.float32)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.divide(_grouped(x, group_size), s)
        np.round(q, out=q)
        q += z
    np.copyto(q, z, where=~(s > 0))  # a zero scale (an all-zero group): every code is the zero point
    np.clip(q, 0, _maxq(bits, rows)[:, None, None], out=q)
    return np.ascontiguousarray(q.astype(np.uint8).reshape(rows, -1)[:, :n])


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int) -> np.ndarray:
    """x̂ = (q − z)·s in float32, exactly as the spec writes it."""
    rows, n = codes.shape
    out = _grouped(codes.astype(np.float32), group_size)
    out -= zero.astype(np.float32)[:, :, None]
    out *= scale.astype(np.float32)[:, :, None]
    return np.ascontiguousarray(out.reshape(rows, -1)[:, :n])


def rtn(x: np.ndarray, bits, group_size: int):
    """Round-to-nearest: (codes, scales, zeros) of x."""
    scale, zero = fit(x, bits, group_size)
    return quantize(x, scale, zero, bits, group_size), scale, zero
