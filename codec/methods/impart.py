"""ImPart (Yang et al. 2025): singular vectors sparsified by importance, written as ``sparse-lowrank``.

Per selected matrix, Δ = W_ft − W_base in float32 and its SVD Δ = Σ sᵢ·uᵢ·vᵢᵀ
(singular values in decreasing order).  The schedule, for a mean sparsity γ:

0. The knob is the overall sparsity α over all r = min(m, n) vectors; with
   β_eff = min(β, α), the kept vectors' mean sparsity is γ = (α − β_eff)/(1 − β_eff).
1. The bottom ⌊β_eff·r⌋ vectors are dropped (``beta``, 0.6), and any below
   the float32 noise floor of the SVD: k₀ remain.
2. Importance tᵢ = sᵢ^C (``power`` C, 0.5); each kept vector gets the
   sparsity pᵢ = γ·(1 − tᵢ/t₀), so the top vector is kept whole.
3. Those pᵢ average less than γ; so, from the tail, vectors are dropped
   (p = 1) while the mean of p over the k₀ vectors is below γ: k vectors remain.
4. Element j of uᵢ and of vᵢ is dropped at random with probability pᵢ (the
   hash mask of ``masks.py``: drop threshold round(pᵢ·2^32), no bits stored),
   and the kept elements are rescaled by 1/(1 − pᵢ), with pᵢ the threshold's
   exact share, so that E[ûᵢ·v̂ᵢᵀ] = uᵢ·vᵢᵀ.
5. α is the smallest value whose record fits the matrix's share of the file's
   byte budget (bisection on the expected size, then refined on the exact
   stored size: ``budget.fit``).

Kept elements are stored as float16 (``impart``) or quantized with
Delta-CoMe's bit groups, 8 bits for the first 2 vectors, 3 for the next 32,
2 for the rest (``impart-qt``), in quantization groups of 128 consecutive kept
elements of a vector: dropped elements are never coded, so they stay exactly
zero.  With calibration statistics the quantization is GPTQ on the masked
factors (``gptq.quantize_rows_masked``, ``gptq.quantize_columns_masked``).

``alloc="rd"`` (impart-qt; the default stays ``"recipe"``, the paper's shares
by size: rd gains on the real BERT pair but loses on the tiny decoder LLMs,
README, Measured) shares the file's budget over the matrices by
rate–distortion: each matrix's SVD is measured at a grid of
α (the expected record bytes, and the expected squared error: the dropped
vectors' energy, and for a kept vector sᵢ²·((1 + εᵤ)(1 + εᵥ)/(1 − pᵢ)² − 1),
the random drop's variance grown by the relative error ε of its grid's
round-to-nearest, measured), and one slope λ picks every matrix's α
(``RdCurve``, ``allocate_curves``).  Within a matrix the schedule above is
unchanged; its budget is then fitted as always.

``mask="auto"`` also prices an explicit bitmask of the same positions and
keeps the cheaper record (the hash costs 4 bytes a vector; a bitmask one bit
an element, less once compressed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import dtypes, masks, sections, sparse_lowrank
from ..calibrate import HessianCache, open_stats, plan_gptq
from ..constants import Kind, MaskEncoding, Packing
from ..errors import UsageError
from ..lowrank import BitGroup
from ..sparse_lowrank import FLOAT_BITS, Payload, Values
from . import accel, budget, gptq
from .base import BudgetedMethod, TensorPlan
from .baselines import _mask_option
from .deltacome import DEFAULT_RECIPE, parse_recipe, recipe_text
from .svd import Svd, SvdCache, exact_svd, rank_cap

BISECT_STEPS = 40  # bisection steps on γ: far below one element of any matrix here
ALLOCS = ("recipe", "rd")  # recipe: shares by size (the paper), as under delta-come
RD_GRID = 129  # overall sparsities α priced per matrix under rd: 0, 1/128, ..., 1
LAMBDA_STEPS = 100  # bisection steps on the slope λ (in log space)
LOG_LAMBDA_RANGE = 80.0
SVD_CACHE_BYTES = 2**30  # SVDs kept between measuring and coding under rd (per process)


def sparsities(s: np.ndarray, shape, alpha: float, beta: float, power: float) -> np.ndarray:
    """pᵢ of the vectors kept for overall sparsity ``alpha`` (the steps above; k = the result's size).

    β_eff = min(β, α) and γ = (α − β_eff)/(1 − β_eff): the mean sparsity of the
    k₀ vectors that step 1 keeps, so that α is the sparsity over all r vectors.
    """
    r = min(shape)
    beta = min(beta, alpha)
    k0 = min(rank_cap(s, shape), r - math.floor(beta * r))
    if k0 <= 0 or alpha >= 1:
        return np.zeros(0)
    gamma = (alpha - beta) / (1 - beta)
    t = s[:k0].astype(np.float64) ** power
    p = gamma * (1 - t / t[0])
    total = np.cumsum(p)
    for k in range(k0, 0, -1):  # the dropped tail counts as p = 1
        if (total[k - 1] + (k0 - k)) / k0 >= gamma - 1e-12:
            return p[:k]
    return p[:0]


@dataclass
class RdCurve:
    """One matrix under rd: expected record bytes and squared error at each α of the grid."""

    name: str
    cost: np.ndarray  # (RD_GRID,) bytes, non-increasing in α
    dist: np.ndarray  # (RD_GRID,)


def expected_distortion(s: np.ndarray, p: np.ndarray, eps_u: np.ndarray, eps_v: np.ndarray) -> float:
    """E‖Δ̂ − Δ‖² of the kept vectors' sparsities ``p`` (the rest dropped), relative RTN errors ε.

    A kept vector's elements survive with probability 1 − p and are scaled by
    1/(1 − p), so E[ûᵢv̂ᵢᵀ] = uᵢvᵢᵀ and E‖ûᵢ‖² = (1 + εᵤ)/(1 − p) with the
    grid's error on top; the masks of u and v are independent.
    """
    k = p.size
    s2 = s.astype(np.float64) ** 2
    kept = s2[:k] * ((1 + eps_u[:k]) * (1 + eps_v[:k]) / (1 - p) ** 2 - 1)
    return float(kept.sum() + s2[k:].sum())


def allocate_curves(curves: list[RdCurve], total: int) -> list[int]:
    """Each curve's grid index minimising Σ dist + λ·Σ cost for the smallest λ whose Σ cost fits ``total``.

    The last grid point (α = 1, the empty record) always fits: prepare checked it.
    """
    def choose(lam):
        return [int(np.argmin(c.dist + lam * c.cost)) for c in curves]

    def spent(choice):
        return sum(int(c.cost[i]) for c, i in zip(curves, choice))

    if spent(choose(0.0)) <= total:
        return choose(0.0)
    lo, hi = -LOG_LAMBDA_RANGE, LOG_LAMBDA_RANGE  # squared errors per byte, e^±80: any float32 delta's
    if spent(choose(math.exp(hi))) > total:
        return [len(c.cost) - 1 for c in curves]
    for _ in range(LAMBDA_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spent(choose(math.exp(mid))) <= total else (mid, hi)
    return choose(math.exp(hi))


class ImPart(BudgetedMethod):
    name = "impart"

    def __init__(self, ratio=None, include=None, exclude=None, zstd_level: int | None = None, *, seed: int = 0,
                 beta: float = 0.6, power: float = 0.5, mask: str = "auto"):
        super().__init__(ratio, include, exclude, zstd_level, seed)
        if not 0 <= beta < 1:
            raise UsageError(f"beta must be in [0, 1), got {beta!r}")
        if not power > 0:
            raise UsageError(f"power must be positive, got {power!r}")
        self.beta, self.power, self.mask = float(beta), float(power), _mask_option(mask)

    def get_config(self) -> dict:
        return {**super().get_config(), "beta": self.beta, "power": self.power, "mask": self.mask,
                "values": self._values_config(), "svd": "exact"}

    def _values_config(self):
        return "F16"

    # --- what a record holds ---------------------------------------------------------

    def groups(self, k: int) -> list[BitGroup]:
        return [BitGroup(0, k, FLOAT_BITS, 0)] if k else []

    def _params(self, mask: int, seed: int, groups) -> dict:
        return {"packing": int(Packing.LSB_FIRST), "mask": int(mask), "seed": seed,
                "groups": [g.as_param() for g in groups]}

    def empty_cost(self, info) -> int:
        return budget.record_cost(info.name, Kind.SPARSE_LOWRANK, info.dtype, info.shape,
                                  self._params(MaskEncoding.HASH, 2**64 - 1, []), [])

    def estimate(self, name, dtype_name, shape, p: np.ndarray) -> int:
        """The record's cost with the expected kept counts (hash mask, raw sizes)."""
        m, n = shape
        groups = self.groups(p.size)
        if not groups:
            return budget.record_cost(name, Kind.SPARSE_LOWRANK, dtype_name, shape,
                                      self._params(MaskEncoding.HASH, 2**64 - 1, []), [])
        v_counts, u_counts = np.round((1 - p) * n).astype(np.int64), np.round((1 - p) * m).astype(np.int64)
        size = sections.size(sparse_lowrank.layout(shape, groups, MaskEncoding.HASH, v_counts, u_counts))
        return budget.record_cost(name, Kind.SPARSE_LOWRANK, dtype_name, shape,
                                  self._params(MaskEncoding.HASH, 2**64 - 1, groups), [size])

    # --- coding ----------------------------------------------------------------------

    def code(self, name, dtype_name, shape, delta, limit):
        svd = self._svd(name, delta)
        seed = masks.record_seed(self.seed, name)

        def p_of(alpha):
            return sparsities(svd.s, shape, alpha, self.beta, self.power)

        def knob_for(target):  # the smallest overall sparsity α whose expected record fits ``target``
            if self.estimate(name, dtype_name, shape, p_of(0.0)) <= target:
                return 0.0
            lo, hi = 0.0, 1.0
            for _ in range(BISECT_STEPS):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if self.estimate(name, dtype_name, shape, p_of(mid)) <= target else (mid, hi)
            return hi

        def build(alpha):
            return self.build(name, dtype_name, shape, svd, p_of(alpha), seed, alpha)
        return budget.fit(build, knob_for, limit, lambda: build(1.0))

    def _svd(self, name, delta) -> Svd:
        return exact_svd(delta)

    def build(self, name, dtype_name, shape, svd: Svd, p: np.ndarray, seed: int, alpha: float):
        k = p.size
        groups = self.groups(k)
        if not k:
            params = self._params(MaskEncoding.HASH, seed, [])
            return budget.coded(name, Kind.SPARSE_LOWRANK, dtype_name, shape, params, [], self.zstd_level,
                                info={"rank": 0, "alpha": alpha}, entropy=self.entropy)
        drops = np.array([masks.drop_threshold(x) for x in p], dtype=np.uint32)
        v_keep, u_keep = sparse_lowrank.hash_keep(seed, drops, shape)
        rescale = (1 / (1 - drops.astype(np.float64) / 2**32)).astype(np.float32)[:, None]
        v, u = svd.v[:k] * rescale, svd.u[:k] * rescale
        values = self.quantize(name, shape, groups, svd.s[:k], v, u, v_keep, u_keep)
        payload = Payload(svd.s[:k].astype(np.float32), drops, v_keep, u_keep, values)
        options = []
        if self.mask in ("auto", "hash"):
            options.append((MaskEncoding.HASH, seed))
        if self.mask in ("auto", "bitmask"):
            options.append((MaskEncoding.BITMASK, 0))
        records = []
        for mask, mask_seed in options:
            raw = sparse_lowrank.pack_blob(shape, groups, mask, payload)
            records.append(budget.coded(
                name, Kind.SPARSE_LOWRANK, dtype_name, shape, self._params(mask, mask_seed, groups), [raw],
                self.zstd_level, info={"rank": k, "alpha": alpha, "mask": int(mask),
                                       "kept": int(v_keep.sum() + u_keep.sum())}, entropy=self.entropy))
        return min(records, key=lambda c: c.cost)

    def quantize(self, name, shape, groups, s, v, u, v_keep, u_keep) -> list:
        """Per bit group, the (V, U) ``Values`` of the kept elements: float16 here."""
        return [(Values(v[g.start:g.stop][v_keep[g.start:g.stop]].astype(np.float16)),
                 Values(u[g.start:g.stop][u_keep[g.start:g.stop]].astype(np.float16))) for g in groups]


class ImPartQt(ImPart):
    name = "impart-qt"

    def __init__(self, ratio=None, include=None, exclude=None, zstd_level: int | None = None, *, seed: int = 0,
                 beta: float = 0.6, power: float = 0.5, mask: str = "auto", recipe=DEFAULT_RECIPE,
                 group_size: int = 128, calibration=None, damp: float = 0.01, alloc: str = "recipe"):
        super().__init__(ratio, include, exclude, zstd_level, seed=seed, beta=beta, power=power, mask=mask)
        if not isinstance(group_size, int) or not 1 <= group_size <= 65536:
            raise UsageError(f"group size must be an integer in 1..65536, got {group_size!r}")
        if alloc not in ALLOCS:
            raise UsageError(f"impart-qt's alloc must be one of {', '.join(ALLOCS)}, got {alloc!r}")
        self.alloc = alloc
        self.cache = SvdCache(SVD_CACHE_BYTES)  # rd: SVDs measured, kept for coding
        self.recipe, self.group_size, self.damp = parse_recipe(recipe), group_size, float(damp)
        self.stats = open_stats(calibration)
        self._hessians = HessianCache(self.stats)
        self.gptq_tensors: list[str] = []  # with calibration: the matrices that have statistics (planned)

    def prepare(self, tensors) -> None:
        if self.stats is not None:
            self.gptq_tensors = plan_gptq(self._hessians, tensors, self.name)
        super().prepare(tensors)

    def get_config(self) -> dict:
        config = {**super().get_config(), "recipe": recipe_text(self.recipe), "group_size": self.group_size,
                  "quantizer": "gptq" if self.stats else "rtn"}
        config["alloc"] = self.alloc  # files of earlier versions have none: their shares were by size
        if self.stats:
            config.update({"damp": self.damp, "calibration_tokens": self.stats.tokens,
                           "calibration_sha256": self.stats.sha256, "gptq_tensors": list(self.gptq_tensors)})
        return config

    def _values_config(self):
        return "quantized"

    # --- rd: the budget shared by rate-distortion -------------------------------------

    @property
    def measures(self) -> bool:
        return self.alloc == "rd"

    def measure(self, name, ft, base, dtype_name) -> RdCurve:
        """Expected bytes and squared error over the α grid (weights metric; the SVD is kept for coding)."""
        shape = ft.shape
        svd = exact_svd(dtypes.float32_delta(ft, base, dtype_name))
        r = rank_cap(svd.s, shape)
        widths = np.array([g.bits for g in self.groups(r) for _ in range(g.count)], dtype=np.int64)
        eps_u, eps_v = (_rtn_error(x[:r], widths, self.group_size) for x in (svd.u, svd.v))
        costs, dists = [], []
        for alpha in np.linspace(0.0, 1.0, RD_GRID):
            p = sparsities(svd.s, shape, float(alpha), self.beta, self.power)
            costs.append(self.estimate(name, dtype_name, shape, p))
            dists.append(expected_distortion(svd.s, p, eps_u, eps_v))
        self.cache.put(name, svd)
        return RdCurve(name, np.array(costs, dtype=np.float64), np.array(dists))

    def allocate(self, tensors, measures) -> dict[str, TensorPlan]:
        if self.alloc != "rd" or self.budget is None:
            return super().allocate(tensors, measures)
        curves = [measures[t.name] for t in tensors]
        chosen = allocate_curves(curves, self.budget.total)
        costs = {c.name: int(c.cost[i]) for c, i in zip(curves, chosen)}
        # What the choice left over is shared by size: records come out smaller than their raw
        # estimate once compressed, and the fit spends each one's share on a lower α.
        shares = budget.share_budgets(tensors, self.budget.total - sum(costs.values()), lambda t: 0)
        return {t.name: TensorPlan(budget=costs[t.name] + shares[t.name]) for t in tensors}

    def _svd(self, name, delta) -> Svd:
        cached = self.cache.pop(name) if self.alloc == "rd" else None
        return cached if cached is not None else exact_svd(delta)

    def groups(self, k: int) -> list[BitGroup]:
        """The recipe's bit groups over the k kept vectors (the last count stretches to k)."""
        out, start = [], 0
        for bits, count in self.recipe:
            stop = k if count is None else min(k, start + count)
            if stop > start:
                out.append(BitGroup(start, stop, bits, self.group_size))
            start = stop
        if start < k:  # a recipe whose counts all end early: the rest at its last width
            out.append(BitGroup(start, k, self.recipe[-1][0], self.group_size))
        return out

    def quantize(self, name, shape, groups, s, v, u, v_keep, u_keep) -> list:
        h, axis = self._hessians.sided(name, shape)
        if h is None:
            return [(sparse_lowrank.quantize_rtn(v[g.start:g.stop][v_keep[g.start:g.stop]],
                                                 v_keep[g.start:g.stop].sum(axis=1), g),
                     sparse_lowrank.quantize_rtn(u[g.start:g.stop][u_keep[g.start:g.stop]],
                                                 u_keep[g.start:g.stop].sum(axis=1), g)) for g in groups]
        bits = np.concatenate([[g.bits] * g.count for g in groups])
        if axis == 0:  # a weight stored in × out (Conv1D): U runs along the inputs, so the roles swap
            u_vals, v_vals = self._gptq(u, u_keep, v, v_keep, s, h, bits)
        else:
            v_vals, u_vals = self._gptq(v, v_keep, u, u_keep, s, h, bits)
        return [(_slice_values(v_vals, v_keep, g), _slice_values(u_vals, u_keep, g)) for g in groups]

    def _gptq(self, inputs, in_keep, outputs, out_keep, s, h, bits):
        """GPTQ of the kept input-side elements against ``h``, then of the output side against the
        Hessian of x·(input side)ᵀ·diag(S)."""
        in_vals, in_hat = gptq.quantize_rows_masked(inputs, in_keep, h, bits, self.group_size, self.damp)
        out_vals, _ = gptq.quantize_columns_masked(outputs, out_keep, gptq.u_hessian(in_hat, s, h), bits,
                                                   self.group_size, self.damp)
        return in_vals, out_vals

    def calibrated(self, name, shape) -> bool:
        """Whether this matrix is quantized with GPTQ (the statistics hold its input Hessian)."""
        return self._hessians.available(name, shape)


def _rtn_error(x: np.ndarray, widths: np.ndarray, group_size: int) -> np.ndarray:
    """Per row of ``x``, ‖RTN(x) − x‖² / ‖x‖² at its width (min–max grids, as the record's)."""
    if not x.shape[0]:
        return np.zeros(0)
    err = x - accel.dequantize(*accel.rtn(x, widths, group_size), group_size)
    norm = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    return np.einsum("ij,ij->i", err, err, dtype=np.float64) / np.maximum(norm, np.finfo(np.float64).tiny)


def _slice_values(per_vector: list, keep: np.ndarray, group: BitGroup) -> Values:
    """One bit group's ``Values`` from per-vector (codes, scales, zeros)."""
    rows = per_vector[group.start:group.stop]
    return Values(np.concatenate([r[0] for r in rows]).astype(np.uint8),
                  np.concatenate([r[1] for r in rows]), np.concatenate([r[2] for r in rows]).astype(np.uint8))
