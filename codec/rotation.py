"""Seeded randomized Hadamard rotations of singular vectors (spec section 10.14, ``lowrank-rotated``).

A vector of length L is cut into blocks of b elements, b the largest power of
two that divides L; each element j is multiplied by a random sign d_j and each
block by the normalized Sylvester–Hadamard matrix H_b / √b:

    R x  = (H_b / √b) · (d ⊙ x)        per block        (rotate: the encoder)
    Rᵀ z = d ⊙ ((H_b / √b) · z)        per block        (unrotate: a decoder)

d_j = −1 when the top bit of r(seed, c0 + j) is set (the hash of 10.8), +1
otherwise, with c0 = 0 for the V side and 2^32 for the U side.  R costs no byte:
a decoder regenerates it from the record's seed and the vector's length.

Rotating spreads an outlier of a vector over its whole block, so that the
groups of a min–max or clipped grid hold fewer extreme values.  H_b is applied
with the fast Walsh–Hadamard transform, O(b log b) per block (the runtime does
the same to activations: x·Rᵀ before the shrink, Rᵀ after the expand).
"""

from __future__ import annotations

import numpy as np

from .masks import uniform32

SIDE_COUNTER = {"V": 0, "U": 2**32}
SIGN_BIT = np.uint64(2**31)


def block_size(length: int) -> int:
    """b: the largest power of two dividing ``length`` (1 for an odd length)."""
    return length & -length if length > 0 else 1


def signs(seed: int, length: int, side: str) -> np.ndarray:
    """d_j for j < length on ``side`` ("V" or "U"), as float32 ±1."""
    r = uniform32(seed, np.arange(length, dtype=np.uint64) + np.uint64(SIDE_COUNTER[side]))
    return np.where(r >= SIGN_BIT, np.float32(-1), np.float32(1))


def fwht(x: np.ndarray, block: int) -> np.ndarray:
    """H_b · x on each block of ``block`` elements along the last axis (unnormalized, in place
    on a copy): butterflies of half-width 1, 2, 4, ..., block/2, in that order."""
    y = np.array(x, copy=True)
    lead, n = y.shape[:-1], y.shape[-1]
    h = 1
    while h < block:
        v = y.reshape(*lead, n // (2 * h), 2, h)
        a = v[..., 0, :].copy()
        v[..., 0, :] += v[..., 1, :]
        v[..., 1, :] = a - v[..., 1, :]
        h *= 2
    return y


def rotate(x: np.ndarray, seed: int, side: str) -> np.ndarray:
    """R x for each row of x (the encoder's direction), in x's float dtype."""
    n = x.shape[-1]
    b = block_size(n)
    d = signs(seed, n, side).astype(x.dtype)
    return fwht(x * d, b) * x.dtype.type(1 / np.sqrt(b))


def unrotate(z: np.ndarray, seed: int, side: str) -> np.ndarray:
    """Rᵀ z for each row of z (a decoder's direction), in z's float dtype."""
    n = z.shape[-1]
    b = block_size(n)
    d = signs(seed, n, side).astype(z.dtype)
    return fwht(z, b) * z.dtype.type(1 / np.sqrt(b)) * d


def rotate_hessian(h: np.ndarray, seed: int, side: str = "V") -> np.ndarray:
    """R·H·Rᵀ: the input Hessian in rotated coordinates (inputs rotate like the elements of the side
    that runs along them: V's for an out × in weight, U's for a weight stored in × out)."""
    h = np.asarray(h, dtype=np.float64)
    return rotate(rotate(h, seed, side).T.copy(), seed, side).T.copy()
