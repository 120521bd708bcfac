"""Rate–distortion allocation of bit widths to singular vectors across a whole file.

Each vector i of each matrix can be dropped (width 0) or kept at one of a few
widths b.  Its estimated error contribution is

    D_i(0) = s_i²·(u_iᵀ·A·u_i)·(v_iᵀ·B·v_i)
    D_i(b) = s_i²·(δv_iᵀ·B·δv_i·u_iᵀ·A·u_i + δu_iᵀ·A·δu_i·v_iᵀ·B·v_i)

where δu, δv are the round-to-nearest errors of the unit vectors at b bits
(measured, not modelled) and A, B weigh output and input directions: the
identity without calibration (Frobenius error), B = E[xᵀx] with it (the error
of the layer's output).  Bytes per vector are the codes, scales and zero points
it adds (4 more for its singular value).  The widths minimise Σ D under the
file's byte budget by Lagrangian relaxation: every vector takes the option
minimising D + λ·bytes, and λ is bisected until the exact record costs
(index entries and padding included) fit the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import blobs, lowrank, quant
from ..lowrank import BitGroup
from . import accel
from .svd import rank_cap


def weigh(x: np.ndarray, side) -> np.ndarray:
    """xᵢᵀ·M·xᵢ per row i, for M the identity (None), a diagonal (1-D) or a matrix (2-D)."""
    if side is None:
        return np.einsum("ij,ij->i", x, x, dtype=np.float64)
    if side.ndim == 1:
        return np.einsum("ij,ij,j->i", x, x, side, dtype=np.float64)
    x = x.astype(np.float64)
    return np.einsum("ij,ij->i", x @ side, x)  # one matrix product: einsum's three-operand loop is slow


def vector_bytes(shape, bits: int, group_size: int) -> float:
    """Bytes one vector adds to a bit group of ``bits``: U and V codes, scales, zeros, and S."""
    m, n = shape
    groups = quant.group_count(m, group_size) + quant.group_count(n, group_size)
    return bits * (m + n) / 8 + quant.SCALE_DTYPE.itemsize * groups + bits * groups / 8 + 4


def groups_from_widths(widths, group_size: int) -> list[BitGroup]:
    """Runs of equal widths (vectors already ordered) as bit groups; width 0 ends the rank."""
    groups, start = [], 0
    for i, b in enumerate(list(widths) + [0]):
        if i and (b != widths[i - 1] or b == 0):
            if widths[i - 1]:
                groups.append(BitGroup(start, i, int(widths[i - 1]), group_size))
            start = i
        if b == 0:
            break
    return groups


@dataclass
class Candidates:
    """The options of every vector of one matrix: bytes (options,) and distortion (vectors, options)."""

    name: str
    dtype: str
    shape: tuple
    widths: np.ndarray  # (options,) with 0 first
    cost: np.ndarray  # (options,) stored bytes one more vector adds
    dist: np.ndarray  # (vectors, options)
    fixed: np.ndarray | None = None  # (options,) stored bytes a blob of the width takes besides (None: 0)

    @classmethod
    def measure(cls, name, dtype, shape, svd, widths, group_size, u_side=None, v_side=None,
                zstd_level: int | None = None, quantizer=None, entropy: bool = True):
        """Measure every option; with ``zstd_level``, bytes are what the codes take once compressed.

        ``quantizer`` (``quantizers.py``; default min–max) is the one the record will use,
        so the errors are those of its grids.

        zstd matters where a factor is mostly zeros (a word-embedding delta lives in
        the rows of the tokens seen in training): its blob may shrink severalfold.
        The compressed share is measured on the blob of all vectors at each width.
        """
        k = rank_cap(svd.s, shape)
        options = np.array([0, *widths])
        if not k:
            return cls(name, dtype, tuple(shape), options,
                       np.array([0.0] + [vector_bytes(shape, b, group_size) for b in widths]),
                       np.zeros((0, len(options))))
        u, v = svd.u[:k], svd.v[:k]
        s2 = svd.s[:k].astype(np.float64) ** 2
        wu, wv = weigh(u, u_side), weigh(v, v_side)
        dist, cost, fixed = [s2 * wu * wv], [0.0], [0.0]
        rtn = accel.rtn if quantizer is None else quantizer.rtn
        for b in widths:
            qu, qv = rtn(u, b, group_size), rtn(v, b, group_size)
            du = u - accel.dequantize(*qu, group_size)
            dv = v - accel.dequantize(*qv, group_size)
            dist.append(s2 * (weigh(dv, v_side) * wu + weigh(du, u_side) * wv))
            share, overhead = _stored_model(shape, b, group_size, svd.s[:k], qv, qu, zstd_level, entropy)
            cost.append(vector_bytes(shape, b, group_size) * share)
            fixed.append(overhead)
        return cls(name, dtype, tuple(shape), options, np.array(cost), np.stack(dist, axis=1), np.array(fixed))

    def choose(self, lam: float) -> np.ndarray:
        """Each vector's width minimising D + λ·bytes."""
        if not len(self.dist):
            return np.zeros(0, dtype=np.int64)
        return self.widths[np.argmin(self.dist + lam * self.cost, axis=1)]


def _stored_model(shape, bits, group_size, s, qv, qu, zstd_level, entropy: bool = True) -> tuple[float, float]:
    """(stored bytes per raw byte of one more vector, stored bytes of the blob besides) at ``bits``.

    Measured on the blobs of all vectors and of the first half: a compressed blob
    pays a fixed cost (frame header, literal table) that a share taken from the
    large blob alone spreads thin, so a record of one or two vectors came out
    over its estimate (BERT's 2 x 384 token-type embeddings: 16 bytes at 1/32).
    """
    if zstd_level is None:
        return 1.0, 0.0

    def stored(count):
        group = [lowrank.BitGroup(0, count, bits, group_size)]
        factors = [(lowrank.Factor(*(a[:count] for a in qv)), lowrank.Factor(*(a[:count] for a in qu)))]
        raw = lowrank.pack_blob(shape, group, s[:count], factors)
        return len(raw), len(blobs.encode(raw, zstd_level, entropy)[1])

    raw_all, stored_all = stored(len(s))
    half = len(s) // 2
    if not half:
        return stored_all / raw_all, 0.0
    raw_half, stored_half = stored(half)
    share = min(max((stored_all - stored_half) / max(raw_all - raw_half, 1), 0.0), 1.0)
    return share, max(stored_all - share * raw_all, 0.0)


def estimated_cost(c: Candidates, widths, record_cost, group_size) -> int:
    """The record's bytes: exact without compression; with it, the raw blob scaled by the
    measured stored share of the kept vectors' widths, plus a compressed blob's fixed cost."""
    kept = np.sort(widths[widths > 0])[::-1]
    groups = groups_from_widths(kept, group_size)
    raw_cost = record_cost(c.name, c.dtype, c.shape, groups)
    if not kept.size:
        return raw_cost
    full = {int(b): vector_bytes(c.shape, int(b), group_size) for b in c.widths[1:]}
    by_width = dict(zip(c.widths.tolist(), c.cost.tolist()))
    overhead = 0.0 if c.fixed is None else float(max(c.fixed[np.searchsorted(c.widths, np.unique(kept))]))
    share = (overhead + sum(by_width[int(b)] for b in kept)) / sum(full[int(b)] for b in kept)
    blob = lowrank.blob_size(c.shape, groups)
    return raw_cost - blob + int(np.ceil(blob * min(share, 1.0)))


def allocate(candidates: list[Candidates], total: int, record_cost, group_size: int = 128,
             steps: int = 60) -> list[np.ndarray]:
    """Widths per matrix (in SVD order) whose records together take at most ``total`` bytes."""

    def spend(lam):
        chosen = [c.choose(lam) for c in candidates]
        return chosen, sum(estimated_cost(c, w, record_cost, group_size) for c, w in zip(candidates, chosen))

    # λ is an error-per-byte price: bracket it between free bytes and bytes too dear to buy any vector.
    top = max((float(c.dist[:, 0].max() / c.cost[1:].min()) for c in candidates if len(c.dist)), default=1.0)
    lo, hi = 0.0, 2 * top + 1e-30
    best, best_cost = spend(hi)
    if best_cost > total:
        raise ValueError("the budget cannot hold the matrices' empty records")
    chosen, cost = spend(lo)
    if cost <= total:
        return chosen
    lo = hi * 1e-18
    for _ in range(steps):  # the spend falls as λ rises: keep the cheapest λ that fits
        mid = (lo * hi) ** 0.5  # geometric: λ spans many orders of magnitude
        chosen, cost = spend(mid)
        if cost <= total:
            hi, best = mid, chosen
        else:
            lo = mid
    return top_up(candidates, best, total, record_cost, group_size)


def top_up(candidates, chosen, total: int, record_cost, group_size: int, moves: int = 4096):
    """Spend what the Lagrangian solution left: widen single vectors, best error drop per byte first.

    λ moves every vector at once, so near the budget one more step overshoots and
    the last bytes stay unspent; in a small file that can be a large share.
    """
    chosen = [w.copy() for w in chosen]
    costs = [estimated_cost(c, w, record_cost, group_size) for c, w in zip(candidates, chosen)]
    spent = sum(costs)
    for ci, i, width, was in _best_moves(candidates, chosen, moves):
        if chosen[ci][i] != was:  # this vector already moved
            continue
        chosen[ci][i] = width
        cost = estimated_cost(candidates[ci], chosen[ci], record_cost, group_size)
        if spent - costs[ci] + cost <= total:
            spent, costs[ci] = spent - costs[ci] + cost, cost
        else:
            chosen[ci][i] = was
    return chosen


def _best_moves(candidates, chosen, moves: int):
    """The ``moves`` widenings (matrix, vector, width, width now) of the largest error drop per byte.

    In numpy over every vector of every matrix (a 7B model has ~10⁶ of them), keeping only the
    best; ties are broken as a descending sort of (ratio, matrix, vector, width) would.
    """
    ratio, where = [], []
    for ci, (c, w) in enumerate(zip(candidates, chosen)):
        if not len(c.dist):
            continue
        now = np.searchsorted(c.widths, w)
        for j in range(1, len(c.widths)):
            gain = c.dist[np.arange(len(w)), now] - c.dist[:, j]
            extra = c.cost[j] - c.cost[now]
            ok = np.flatnonzero((j > now) & (gain > 0))
            ratio.append(gain[ok] / np.maximum(extra[ok], 1e-9))
            where.append(np.stack([np.full(ok.size, ci), ok, np.full(ok.size, c.widths[j]), w[ok]], axis=1))
    if not ratio:
        return []
    ratio, where = np.concatenate(ratio), np.concatenate(where).astype(np.int64)
    if ratio.size > moves:  # everything at least as good as the moves-th best (ties included)
        keep = ratio >= np.partition(ratio, ratio.size - moves)[ratio.size - moves]
        ratio, where = ratio[keep], where[keep]
    order = np.lexsort((-where[:, 2], -where[:, 1], -where[:, 0], -ratio))[:moves]
    return [tuple(int(v) for v in row) for row in where[order]]
