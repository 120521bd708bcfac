"""Singular value decompositions of a delta, in torch when it is installed (faster), else numpy.

The torch code is the same on the CPU and on a GPU (``compute.device()``): the
CPU runs exercise what a GPU runs.  Factors come back as numpy float32 arrays.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from .. import compute


@dataclass
class Svd:
    u: np.ndarray  # (k, m) vector-major, float32
    s: np.ndarray  # (k,)
    v: np.ndarray  # (k, n)

    @property
    def nbytes(self) -> int:
        return self.u.nbytes + self.s.nbytes + self.v.nbytes


def _torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def _numpy(t) -> np.ndarray:
    return np.ascontiguousarray(t.cpu().numpy())


def _torch_svd(torch, a):
    """(u (k, m), s, v (k, n)) of a torch matrix, factored in its wide orientation.

    LAPACK returns one factor whole-width and vector-major (Vᵀ); factoring the wide
    orientation makes that the large one, so only the small factor is transposed:
    for a tall matrix (an embedding) that saves a copy of its size.
    """
    m, n = a.shape
    if m > n:
        x, s, yh = torch.linalg.svd(a.T, full_matrices=False)  # Δᵀ = X·S·Yᵀ: U = Y, V = X
        return yh, s, x.T
    x, s, yh = torch.linalg.svd(a, full_matrices=False)
    return x.T, s, yh


def exact_svd(delta: np.ndarray) -> Svd:
    torch = _torch()
    if torch is None:
        u, s, vh = np.linalg.svd(delta, full_matrices=False)
        return Svd(np.ascontiguousarray(u.T), s, vh)
    a = torch.from_numpy(np.ascontiguousarray(delta)).to(compute.device())
    u, s, v = _torch_svd(torch, a)
    del a
    return Svd(_numpy(u), _numpy(s), _numpy(v))


def randomized_svd(delta: np.ndarray, rank: int, oversample: int, power_iters: int, seed: int) -> Svd:
    """Halko et al.: a rank+oversample sketch with power iterations, then an exact SVD of the sketch.

    The random test matrix comes from numpy's seeded generator on the CPU, so every
    device starts from the same sketch.
    """
    m, n = delta.shape
    q = min(rank + oversample, m, n)
    if q >= min(m, n) // 2:
        return exact_svd(delta)  # a sketch that large saves nothing
    omega = np.random.default_rng(seed).standard_normal((n, q)).astype(np.float32)
    torch = _torch()
    if torch is None:
        return _randomized_numpy(delta, omega, power_iters)
    dev = compute.device()
    a = torch.from_numpy(np.ascontiguousarray(delta)).to(dev)
    basis = torch.linalg.qr(a @ torch.from_numpy(omega).to(dev))[0]
    for _ in range(power_iters):
        basis = torch.linalg.qr(a.T @ basis)[0]
        basis = torch.linalg.qr(a @ basis)[0]
    bt = a.T @ basis  # Bᵀ = Δᵀ·Q (n, q) = X·S·Yᵀ, so Δ ≈ (Q·Y)·S·Xᵀ
    del a
    x, s, y = _torch_svd(torch, bt)  # vector-major: x = Xᵀ (q, n), y = Yᵀ (q, q)
    return Svd(_numpy(y @ basis.T), _numpy(s), _numpy(x))


def _randomized_numpy(a: np.ndarray, omega: np.ndarray, power_iters: int) -> Svd:
    def orthonormal(x):
        return np.linalg.qr(x)[0]
    basis = orthonormal(a @ omega)
    for _ in range(power_iters):
        basis = orthonormal(a.T @ basis)
        basis = orthonormal(a @ basis)
    small = exact_svd(np.ascontiguousarray(a.T @ basis))
    return Svd(np.ascontiguousarray(small.v @ basis.T), small.s, small.u)


def rank_cap(s: np.ndarray, shape) -> int:
    """Vectors worth storing: singular values above the float32 noise floor of the SVD."""
    if not s.size or s[0] <= 0:
        return 0
    return int(np.count_nonzero(s > s[0] * max(shape) * np.finfo(np.float32).eps))


class SvdCache:
    """Factors kept between two uses of the same SVD, up to ``limit`` bytes; safe across threads.

    Only a time saving: an SVD recomputed with the same inputs gives the same bits
    (``compute.single_threaded``), so a hit or a miss never changes a file.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._items: dict = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key, svd: Svd) -> None:
        with self._lock:
            if key not in self._items and self._bytes + svd.nbytes <= self.limit:
                self._items[key] = svd
                self._bytes += svd.nbytes

    def pop(self, key) -> Svd | None:
        with self._lock:
            svd = self._items.pop(key, None)
            if svd is not None:
                self._bytes -= svd.nbytes
            return svd

    def __getstate__(self):  # a copy sent to another process starts empty
        return {"limit": self.limit}

    def __setstate__(self, state):
        self.__init__(state["limit"])
