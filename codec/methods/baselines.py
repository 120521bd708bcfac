"""The baselines a user compares against, each writing its own record kind, each within the byte budget.

- ``bitdelta`` (Liu et al. 2024): sign(Δ) times a scale per row (or one per
  matrix); the training-free scale mean|Δ| is the one that minimises the
  squared error for fixed signs.  Its size is fixed, about 1 bit per
  parameter: a ratio below what the signs take is refused.
- ``lowrank``: the top-k singular triplets of Δ, vectors in float16, S in
  float32; k as large as the budget allows.
- ``dare`` (Yu et al. 2024): each element of Δ dropped at random, the kept
  ones rescaled by 1/(1 − p) (the rescale is part of the method) and stored as
  float16; p as small as the budget allows.  The mask is regenerated from a
  hash (``masks.py``) and costs no bytes.
"""

from __future__ import annotations

import numpy as np

from .. import baseline_payloads, dtypes, masks, sections
from ..checkpoint import TensorInfo
from ..constants import Kind, MaskEncoding, Packing, SignScales
from ..errors import UsageError
from . import budget
from .base import BudgetedMethod, TensorPlan
from .svd import exact_svd, rank_cap

MASK_CHOICES = ("auto", "hash", "bitmask")


class BitDelta(BudgetedMethod):
    """Sign bits and mean|Δ| scales; under a ratio, the rows with the largest scales (file-wide)."""

    name = "bitdelta"
    carries_leftover = False  # its size is the rows chosen, file-wide, in allocate
    default_ratio = None  # by default every row; with a ratio, only as many rows as it pays for

    def __init__(self, ratio=None, include=None, exclude=None, zstd_level: int | None = None, *, scales: str = "row"):
        super().__init__(ratio, include, exclude, zstd_level)
        if scales not in ("row", "matrix"):
            raise UsageError(f"scales must be 'row' or 'matrix', got {scales!r}")
        self.scales = SignScales.ROW if scales == "row" else SignScales.MATRIX
        self.room = 0  # bytes for sign rows once every record's fixed part is paid (prepare)

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("seed")
        return {**config, "scales": self.scales.name.lower(), "scale": "mean-abs"}

    def _params(self) -> dict:
        return {"packing": int(Packing.LSB_FIRST), "scales": int(self.scales)}

    def _cost(self, name, dtype_name, shape, rows: int) -> int:
        size = sections.size(baseline_payloads.sign_layout(shape, self.scales, rows))
        return budget.record_cost(name, Kind.SIGN, dtype_name, shape, self._params(), [size])

    def empty_cost(self, info) -> int:
        return self._cost(info.name, info.dtype, info.shape, 0)

    def row_scales(self, delta) -> np.ndarray:
        """mean|Δ| per row, or the matrix's mean|Δ| repeated (m,): the least-squares scale of fixed signs."""
        magnitude = np.abs(delta, dtype=np.float64)
        if self.scales == SignScales.ROW:
            return magnitude.mean(axis=1)
        return np.full(delta.shape[0], magnitude.mean())

    @property
    def measures(self) -> bool:
        return self.ratio is not None

    def prepare(self, tensors) -> None:
        if self.ratio is None:
            return
        total = budget.total_budget(self.ratio, tensors)
        fixed = sum(self.empty_cost(t) + 1 for t in tensors)  # +1: the last byte of each bit stream
        if fixed > total:
            raise UsageError(f"bitdelta at ratio {self.ratio}: the {len(tensors)} matrices need at least {fixed} "
                             f"bytes, the budget is {total}; raise the ratio or --exclude small tensors")
        self.room = total - fixed

    def measure(self, name, ft, base, dtype_name) -> np.ndarray:
        delta = dtypes.float32_delta(ft, base, dtype_name)
        return self.row_scales(delta)

    def allocate(self, tensors, measures) -> dict[str, TensorPlan]:
        """Under a ratio: the rows to code, file-wide, largest scale first.

        Coding row a with scale α lowers the squared error by n·α² and costs n bits,
        so the best rows per byte are those of the largest α, whatever their matrix
        (a matrix's rows go together with one scale per matrix).
        """
        if self.ratio is None:
            return {}
        units = []  # (scale, bytes, matrix, first row, rows)
        for i, t in enumerate(tensors):
            alpha = measures[t.name]
            m, n = t.shape
            if self.scales == SignScales.ROW:
                units += [(a, n / 8, i, r, 1) for r, a in enumerate(alpha)]
            else:
                units.append((alpha[0], m * n / 8, i, 0, m))
        units.sort(key=lambda u: -u[0])
        left = self.room
        chosen = {t.name: np.zeros(t.shape[0], dtype=bool) for t in tensors}
        for alpha, nbytes, i, first, rows in units:
            if alpha == 0:
                break
            if nbytes > left:
                continue
            left -= nbytes
            chosen[tensors[i].name][first:first + rows] = True
        return {name: TensorPlan(data=rows) for name, rows in chosen.items()}

    def encode_tensor(self, name, ft, base, dtype_name, plan=None):
        delta = dtypes.float32_delta(ft, base, dtype_name)
        scales = self.row_scales(delta).astype(np.float32)
        if plan is not None and plan.data is not None:
            scales[~plan.data] = 0
        if self.scales == SignScales.MATRIX:
            scales = scales[:1]
        raw = baseline_payloads.pack_sign(ft.shape, self.scales, scales, delta >= 0)
        return Kind.SIGN, self._params(), [raw]


class LowRank(BudgetedMethod):
    name = "lowrank"

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("seed")
        return {**config, "values": "F16", "svd": "exact"}

    def empty_cost(self, info) -> int:
        return budget.record_cost(info.name, Kind.LOWRANK, info.dtype, info.shape, {"rank": 0}, [])

    def _estimate(self, info_name, dtype_name, shape, k) -> int:
        size = sections.size(baseline_payloads.lowrank_layout(shape, k))
        return budget.record_cost(info_name, Kind.LOWRANK, dtype_name, shape, {"rank": k}, [size] if k else [])

    def code(self, name, dtype_name, shape, delta, limit):
        svd = exact_svd(delta)
        cap = rank_cap(svd.s, shape)

        def knob_for(target):  # the largest rank whose raw record fits ``target``
            lo, hi = 0, cap
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if self._estimate(name, dtype_name, shape, mid) <= target else (lo, mid - 1)
            return lo

        def build(k):
            raws = [baseline_payloads.pack_lowrank(shape, svd.s[:k], svd.u[:k], svd.v[:k])] if k else []
            return budget.coded(name, Kind.LOWRANK, dtype_name, shape, {"rank": k}, raws, self.zstd_level,
                                info={"rank": k}, entropy=self.entropy)
        return budget.fit(build, knob_for, limit, lambda: build(0))


def _mask_option(mask: str) -> str:
    if mask not in MASK_CHOICES:
        raise UsageError(f"mask must be one of {', '.join(MASK_CHOICES)}, got {mask!r}")
    return mask


class Dare(BudgetedMethod):
    name = "dare"

    def __init__(self, ratio=None, include=None, exclude=None, zstd_level: int | None = None, *, seed: int = 0,
                 mask: str = "auto"):
        super().__init__(ratio, include, exclude, zstd_level, seed)
        self.mask = _mask_option(mask)

    def get_config(self) -> dict:
        return {**super().get_config(), "mask": self.mask, "values": "F16", "rescale": "1/(1-p)"}

    def _params(self, mask: int, seed: int, drop: int) -> dict:
        return {"packing": int(Packing.LSB_FIRST), "mask": int(mask), "seed": seed, "drop": drop}

    def empty_cost(self, info) -> int:  # everything dropped: the hash mask, no values
        params = self._params(MaskEncoding.HASH, 2**64 - 1, masks.DROP_ALL)
        return budget.record_cost(info.name, Kind.SPARSE, info.dtype, info.shape, params, [0])

    def code(self, name, dtype_name, shape, delta, limit):
        flat = delta.reshape(-1)
        count = flat.size
        seed = masks.record_seed(self.seed, name)
        draws = masks.uniform32(seed, np.arange(count, dtype=np.uint64))
        overhead = self.empty_cost(TensorInfo(name, dtype_name, tuple(shape), delta.nbytes))

        def knob_for(target):  # kept elements: 2 bytes each (and a bit each with a bitmask)
            per = 2 + (1 / 8 if self.mask == "bitmask" else 0)
            return int(min(max((target - overhead) // per, 0), count))

        def build(kept):
            drop = _threshold_keeping(draws, kept)
            keep = draws >= np.uint64(drop)
            values = flat[keep] / np.float32(1 - drop / 2**32) if drop < masks.DROP_ALL else flat[:0]
            if not np.isfinite(values.astype(np.float16)).all():
                raise UsageError(f"{name}: a rescaled delta value exceeds the float16 range")
            options = []
            if self.mask in ("auto", "hash"):
                raw = baseline_payloads.pack_sparse(count, MaskEncoding.HASH, keep, values)
                options.append((self._params(MaskEncoding.HASH, seed, drop), raw))
            if self.mask in ("auto", "bitmask"):
                raw = baseline_payloads.pack_sparse(count, MaskEncoding.BITMASK, keep, values)
                options.append((self._params(MaskEncoding.BITMASK, 0, 0), raw))
            records = [budget.coded(name, Kind.SPARSE, dtype_name, shape, p, [raw], self.zstd_level,
                                    info={"kept": int(keep.sum()), "drop": drop / 2**32, "mask": p["mask"]},
                                    entropy=self.entropy)
                       for p, raw in options]
            return min(records, key=lambda c: c.cost)
        return budget.fit(build, knob_for, limit, lambda: build(0))


def _threshold_keeping(draws: np.ndarray, kept: int) -> int:
    """The smallest drop threshold that keeps at most ``kept`` elements (those with draw ≥ threshold)."""
    count = draws.size
    if kept >= count:
        return 0
    if kept <= 0:
        return masks.DROP_ALL
    drop = int(np.partition(draws, count - kept)[count - kept])  # kept draws are >= this one
    while np.count_nonzero(draws >= np.uint64(drop)) > kept:  # ties at the threshold
        drop += 1
    return drop
