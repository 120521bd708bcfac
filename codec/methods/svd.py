"""Singular value decompositions of a delta, in torch when it is installed (faster), else numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Svd:
    u: np.ndarray  # (k, m) vector-major, float32
    s: np.ndarray  # (k,)
    v: np.ndarray  # (k, n)


def _torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def exact_svd(delta: np.ndarray) -> Svd:
    torch = _torch()
    if torch is None:
        u, s, vh = np.linalg.svd(delta, full_matrices=False)
    else:
        u, s, vh = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(delta), full_matrices=False))
    return Svd(np.ascontiguousarray(u.T), s, vh)


def randomized_svd(delta: np.ndarray, rank: int, oversample: int, power_iters: int, seed: int) -> Svd:
    """Halko et al.: a rank+oversample sketch with power iterations, then an exact SVD of the sketch.

    The sketch B = Qᵀ·Δ is factored as its transpose Δᵀ·Q: LAPACK is several
    times faster on a tall matrix than on a wide one.
    """
    m, n = delta.shape
    q = min(rank + oversample, m, n)
    if q >= min(m, n) // 2:
        return exact_svd(delta)  # a sketch that large saves nothing
    torch = _torch()

    def orthonormal(x):  # the Q of x's QR: torch's is ~10x faster than numpy's here
        return np.linalg.qr(x)[0] if torch is None else torch.linalg.qr(torch.from_numpy(x))[0].numpy()

    rng = np.random.default_rng(seed)
    a = delta
    basis = orthonormal(a @ rng.standard_normal((n, q)).astype(np.float32))
    for _ in range(power_iters):
        basis = orthonormal(a.T @ basis)
        basis = orthonormal(a @ basis)
    small = exact_svd(np.ascontiguousarray(a.T @ basis))  # Bᵀ = X·S·Yᵀ, so Δ ≈ (Q·Y)·S·Xᵀ
    return Svd(np.ascontiguousarray(small.v @ basis.T), small.s, small.u)


def rank_cap(s: np.ndarray, shape) -> int:
    """Vectors worth storing: singular values above the float32 noise floor of the SVD."""
    if not s.size or s[0] <= 0:
        return 0
    return int(np.count_nonzero(s > s[0] * max(shape) * np.finfo(np.float32).eps))
