"""Delta-CoMe (Ping et al. 2024): mixed-precision singular vectors, with honest byte accounting.

Per selected matrix: Δ = W_ft − W_base in float32, its SVD, and the singular
vectors split into bit groups stored as a ``lowrank-mixed`` record.

The budget is every byte the records put in the file: ``--ratio r`` gives the
selected tensors together at most r·16 bits per parameter, counting each
record's index entry, its blob, and the alignment padding before the blob.

Allocation (``alloc``):
- ``recipe`` (the paper; with its min–max grids, ``alloc="recipe"`` reproduces
  it): each matrix gets a share of the budget in proportion to its size (a
  floor for tiny ones, which would not fit otherwise), spent in recipe order: 2 vectors at 8 bit, 32 at 3 bit, then 2-bit vectors until the
  share is spent.  The share buys *stored* bytes: when zstd shrinks the blob
  (a word-embedding delta lives in the few rows of the tokens seen in
  training), the saving buys more vectors; what a matrix cannot spend (its
  delta has fewer vectors than its share buys) is shared over the matrices
  after it (``budget.Ledger``: the encoder's, so that matrices can be coded in
  parallel and the file stays the same).
- ``rd`` (the default): rate–distortion over the whole file (``allocate.py``):
  every vector of every matrix gets a width in {0, 2, 3, 4, 8} (or the ``widths``
  given) by Lagrangian relaxation on error per stored byte, then a greedy top-up.
  Stored bytes are estimated per width (a compressed blob's fixed cost and its
  bytes per vector, from two blobs); the plan leaves ``RD_HEADROOM`` for blobs
  that mix widths, and a record that still overruns narrows the vectors whose
  narrowing costs the least error per byte (never simply its last vectors: a
  rank-1 record a few bytes over would lose everything).
  The SVDs and per-vector measurements run per matrix (in the encoder's
  workers); only the measurements come back for the allocation.  Measured on
  the real pair it beats the recipe at equal bytes at every ratio (gain 0.9882
  against 0.9776 at 1/16, data-free), hence the default.

The error ``rd`` minimises is the weight error ‖Δ̂ − Δ‖²_F summed over the
file (``metric="weights"``).  Weighting each matrix by its calibration
Hessian (``metric="outputs"``, the layer-output error) was measured worse on
the real BERT pair (gain 0.980 against 0.989 at 1/16): a layer's output error
reaches the model's output through LayerNorms that rescale each layer
differently, so raw output errors of different layers are not comparable,
while inputs normalized by LayerNorm make the weight error a fair proxy.

Quantization grids (``clip``, ``quantizers.py``): ``minmax`` (the paper's, the
default) or ``mse``, which clips each quantization group's range to the ratio
with the least squared error (weighted by the input Hessian's diagonal under
GPTQ).  ``mse`` lowers the weight error at every width (×0.54 at 2 bits) but
measured worse in function space on the real pair (gain 0.9868 against
0.9882 at 1/16 data-free, 0.9898 against 0.9904 with GPTQ): the clipped
elements are a vector's largest, whose error the model's outputs feel most,
and clipped codes are flatter, so they compress less and buy fewer vectors.

Rotation (``rotation="hadamard"``): the singular vectors are stored rotated by
a seeded randomized Hadamard transform (``lowrank-rotated`` records, spec
10.14) on each side whose Hadamard blocks hold at least 16 elements, so an
outlier element spreads over its block before the grid is fitted.  Measured on
the real pair within ±0.001 of the unrotated gain (1/16 to 1/64, with and
without GPTQ), so it is an option, not the default.

Quantization: round-to-nearest, or GPTQ (``gptq.py``) when calibration
statistics give the matrix's input Hessian: V first, against the layer input
x, then U against the Hessian of x·V̂ᵀ·diag(S).  ``refit=True`` first refits
U by least squares to absorb V̂'s error and the dropped vectors; it fits the
calibration text too closely (gain 0.987 against 0.991 without, at 1/16), so
it is off by default.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from .. import blobs, dtypes, lowrank, quant
from ..calibrate import HessianCache, open_stats, plan_gptq
from ..constants import DEFAULT_ALIGNMENT, MAX_BIT_GROUPS, Kind, Packing, Rotation
from ..errors import UsageError
from ..lowrank import BitGroup, Factor
from ..rotation import block_size, rotate, rotate_hessian
from ..records import LowrankMixed, LowrankRotated
from . import accel, allocate, budget, gptq
from .allocate import groups_from_widths
from .base import Method, TensorPlan
from .quantizers import DEFAULT_CLIP, get_quantizer
from .svd import Svd, SvdCache, exact_svd, randomized_svd, rank_cap

DEFAULT_RECIPE = ((8, 2), (3, 32), (2, None))
ROTATIONS = ("none", "hadamard")
MIN_ROTATION_BLOCK = 16  # elements per Hadamard block below which a side is stored unrotated
DEFAULT_WIDTHS = (2, 3, 4, 8)
SVD_CACHE_BYTES = 2**30  # factors kept between measuring and encoding under ``rd`` (per process)
# rd plans this share of the budget (less the empty records) short and gives it back as headroom:
# planning estimates each record's stored bytes from one blob per width, and a blob mixing widths
# compresses worse (median 1.4 %, at most 2.2 % over the estimate on the real BERT pair at 1/16).
# A record still over its budget narrows its cheapest vectors (``_fit_rd``).
RD_HEADROOM = 0.015
# Tries at spending what zstd saved on a matrix's own blob (stopping once within GROW_MIN_SLACK): a
# word-embedding delta whose codes shrink 2-3x needs ~6; with 4 it left 12 % of its share, which the
# encoder's ledger then passes on, re-coding every matrix after it.
GROW_STEPS = 8
GROW_MIN_SLACK = 0.005  # ... while more than this share of its budget is left


def parse_recipe(text) -> tuple:
    """``8:2,3:32,2`` -> ((8, 2), (3, 32), (2, None)): bits:count, the last count optional."""
    if not isinstance(text, str):
        return tuple((int(b), None if c is None else int(c)) for b, c in text)
    out = []
    parts = [p.strip() for p in text.split(",") if p.strip()]
    for i, part in enumerate(parts):
        bits, _, count = part.partition(":")
        try:
            b = int(bits)
            c = int(count) if count else None
        except ValueError:
            raise UsageError(f"recipe item {part!r} is not BITS:COUNT") from None
        if not 1 <= b <= 8 or (c is not None and c < 0) or (c is None and i != len(parts) - 1):
            raise UsageError(f"recipe item {part!r}: bits in 1..8, a count >= 0 "
                             f"(only the last item may omit it)")
        out.append((b, c))
    if not out:
        raise UsageError("empty recipe")
    if len(out) > MAX_BIT_GROUPS:
        raise UsageError(f"a recipe of {len(out)} items: a record holds at most {MAX_BIT_GROUPS} bit groups")
    return tuple(out)


def recipe_text(recipe) -> str:
    return ",".join(f"{b}" if c is None else f"{b}:{c}" for b, c in recipe)


# --- byte accounting ------------------------------------------------------------------


def record_cost(name: str, dtype_name: str, shape, groups: list[BitGroup],
                alignment: int = DEFAULT_ALIGNMENT, stored: int | None = None, rotation=None) -> int:
    """Upper bound of the bytes a lowrank-mixed record puts in the file.

    Its index entry (with the widest offset, length and CRC msgpack can take), its
    blob (``stored`` bytes once encoded; before, the raw size, since zstd is kept
    only when smaller) and the padding that may precede it.  ``rotation``:
    (v_rotation, u_rotation, seed) of a lowrank-rotated record, whose params are longer.
    """
    raw = lowrank.blob_size(shape, groups)
    params = {"packing": int(Packing.LSB_FIRST), "groups": [g.as_param() for g in groups]}
    kind = Kind.LOWRANK_MIXED
    if rotation is not None:
        kind = Kind.LOWRANK_ROTATED
        params = LowrankRotated.encode(shape, [], [], [], *rotation)[0] | {"groups": params["groups"]}
    return budget.record_cost(name, kind, dtype_name, shape, params, [raw] if groups else [],
                              None if stored is None or not groups else [stored], alignment)


def recipe_groups(name, dtype_name, shape, recipe, group_size, budget: int, rank_cap: int, cost=record_cost):
    """The recipe's bit groups that fit in ``budget`` bytes (each stage filled by bisection)."""
    groups: list[BitGroup] = []
    start = 0
    for bits, count in recipe:
        room = rank_cap - start
        hi = room if count is None else min(count, room)
        if hi <= 0:
            break

        def fits(c):
            trial = groups + [BitGroup(start, start + c, bits, group_size)] if c else groups
            return cost(name, dtype_name, shape, trial) <= budget
        lo = 0
        while lo < hi:  # largest c in [0, hi] that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        if lo:
            groups.append(BitGroup(start, start + lo, bits, group_size))
            start += lo
        if count is None or lo < count:
            break
    return groups


# --- the factors --------------------------------------------------------------------


# --- the method -------------------------------------------------------------------------


@dataclass
class Coded:
    """One matrix's record as it will be written, and its cost in the file (record_cost, stored)."""

    groups: list
    params: dict
    raws: list
    cost: int
    kind: int = Kind.LOWRANK_MIXED


@dataclass(frozen=True)
class RdPlan:
    """``rd``'s choice for one matrix: the kept vectors (SVD indices, widest first) and their widths,
    with what planning measured of them: bytes per vector at each option (0 first) and the
    error of each kept vector at each option."""

    order: np.ndarray  # (kept,) SVD indices
    widths: np.ndarray  # (kept,)
    options: np.ndarray  # (options,) widths, 0 first
    cost: np.ndarray  # (options,) estimated stored bytes of one vector
    dist: np.ndarray  # (kept, options)

    def narrowed(self, widths: np.ndarray, excess: int) -> np.ndarray:
        """``widths`` with single steps down (a width to the next narrower option, the narrowest to 0)
        of the least added error per byte saved, until the estimated saving covers ``excess``."""
        widths = widths.copy()
        at = np.searchsorted(self.options, widths)
        saved, rows = 0.0, np.arange(widths.size)
        while saved < excess and at.any():
            down = np.maximum(at - 1, 0)
            price = (self.dist[rows, down] - self.dist[rows, at]) / np.maximum(self.cost[at] - self.cost[down], 1e-9)
            price[at == 0] = np.inf
            i = int(np.argmin(price))
            saved += self.cost[at[i]] - self.cost[down[i]]
            at[i] = down[i]
        widths[:] = self.options[at]
        return widths


class DeltaCoMe(Method):
    name = "delta-come"
    takes_ratio = True
    carries_leftover = True  # what a matrix could not spend goes to the matrices after it (encode's Ledger)

    def __init__(self, ratio="1/16", include=None, exclude=None, zstd_level: int | None = None, *,
                 alloc: str | None = None, svd: str = "exact", calibration=None, recipe=None,
                 widths=DEFAULT_WIDTHS, group_size: int = 128, damp: float = 0.01, refit: bool = False,
                 metric: str = "weights", clip: str | None = None, rotation: str = "none",
                 oversample: int = 16, power_iters: int = 2, seed: int = 0):
        super().__init__(ratio if ratio is not None else "1/16", include, exclude, zstd_level)
        if alloc is None:  # rd, unless a recipe was asked for
            alloc = "rd" if recipe is None else "recipe"
        if alloc not in ("recipe", "rd"):
            raise UsageError(f"alloc must be 'recipe' or 'rd', got {alloc!r}")
        if alloc == "rd" and recipe is not None:
            raise UsageError("a recipe applies to alloc 'recipe', not 'rd'")
        if metric not in ("weights", "outputs"):
            raise UsageError(f"metric must be 'weights' or 'outputs', got {metric!r}")
        self.metric = metric
        if svd not in ("exact", "randomized"):
            raise UsageError(f"svd must be 'exact' or 'randomized', got {svd!r}")
        if not isinstance(group_size, int) or not 1 <= group_size <= 65536:
            raise UsageError(f"group size must be an integer in 1..65536, got {group_size!r}")
        self.alloc, self.svd, self.group_size = alloc, svd, group_size
        if clip is None:  # the recipe alone is the paper's method, min-max grids included
            clip = "minmax" if alloc == "recipe" else DEFAULT_CLIP
        self.quantizer = get_quantizer(clip)
        if rotation not in ROTATIONS:
            raise UsageError(f"rotation must be one of {', '.join(ROTATIONS)}, got {rotation!r}")
        if rotation != "none" and refit:
            raise UsageError("refit and rotation do not combine (the refit solves for U in unrotated coordinates)")
        self.rotation = rotation
        self.recipe = parse_recipe(DEFAULT_RECIPE if recipe is None else recipe)
        if isinstance(widths, str):  # "2,3,4,8" as well as (2, 3, 4, 8)
            widths = [w for w in widths.replace(",", " ").split()]
        self.widths = tuple(sorted({int(w) for w in widths}))
        if not self.widths or not all(1 <= w <= 8 for w in self.widths):
            raise UsageError(f"widths must be bit widths in 1..8, got {widths!r}")
        self.damp, self.refit = float(damp), bool(refit)
        self.oversample, self.power_iters, self.seed = int(oversample), int(power_iters), int(seed)
        self.stats = open_stats(calibration)
        self._hessians = HessianCache(self.stats)
        self._rotated_h = (None, None)  # (name, R·H·Rᵀ) of the last matrix asked for (read as one tuple)
        self.total = 0  # the file's budget (prepare)
        self.budgets: dict[str, int] = {}  # recipe: each matrix's share (prepare)
        self.hints: dict[str, int] = {}  # rd with a randomized SVD: the rank each matrix's sketch finds
        self.gptq_tensors: list[str] = []  # with calibration: the matrices that have statistics (planned)
        self.cache = SvdCache(SVD_CACHE_BYTES)  # factors kept between measuring and encoding under ``rd``

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"alloc": self.alloc, "svd": self.svd, "group_size": self.group_size,
                       "quantizer": "gptq" if self.stats else "rtn", **self.quantizer.get_config(),
                       "rotation": self.rotation})
        if self.alloc == "recipe":
            config["recipe"] = recipe_text(self.recipe)
        else:
            config.update({"widths": list(self.widths), "metric": self.metric})
        if self.svd == "randomized":
            config.update({"oversample": self.oversample, "power_iters": self.power_iters, "seed": self.seed})
        if self.stats:
            config.update({"damp": self.damp, "refit_u": self.refit, "calibration_tokens": self.stats.tokens,
                           "calibration_sha256": self.stats.sha256, "gptq_tensors": list(self.gptq_tensors)})
        return config

    def wants_tensor(self, name, dtype_name, shape) -> bool:
        return dtype_name in lowrank.DTYPES and self.selection.selects(name, dtype_name, shape)

    # --- planning ------------------------------------------------------------------------

    def total_budget(self, tensors) -> int:
        return budget.total_budget(self.ratio, tensors)

    @property
    def measures(self) -> bool:
        return self.alloc == "rd"

    def holds_with_more_budget(self, plan, params) -> bool:
        # rd codes its planned widths, narrowing vectors only when they overrun the budget: a record
        # that kept every planned width is what any larger budget gives.  The recipe grows with its budget.
        if self.alloc != "rd" or plan is None or plan.data is None:
            return False
        planned = [g.as_param() for g in groups_from_widths(plan.data.widths, self.group_size)]
        return [list(g) for g in params.get("groups") or []] == planned

    def working_bytes(self, info) -> int:
        # Both tensors, Δ (and a float32 copy of the base while it is made), and the SVD: LAPACK's copy
        # of Δ, U, Vᵀ, its workspace and the numpy copies (float32); measured in tests/test_parallel.py.
        return 2 * info.nbytes + 7 * 4 * math.prod(info.shape) + 4 * min(info.shape) ** 2

    def prepare(self, tensors) -> None:
        """Share the file's budget over ``tensors`` (TensorInfo of every matrix this method will encode)."""
        if self.stats is not None:
            self.gptq_tensors = plan_gptq(self._hessians, tensors, self.name)
        self.total = total = self.total_budget(tensors)
        empty = {t.name: self.cost(t.name, t.dtype, t.shape, []) for t in tensors}
        if sum(empty.values()) > total:
            raise UsageError(f"ratio {self.ratio}: {total} bytes cannot hold even the index entries "
                             f"({sum(empty.values())} bytes) of {len(tensors)} matrices; "
                             f"raise the ratio or --exclude small tensors")
        if self.alloc == "rd":
            params = sum(math.prod(t.shape) for t in tensors)
            if self.svd == "randomized":  # vectors at the narrowest width that twice the even share buys
                for t in tensors:
                    share = 2 * total * math.prod(t.shape) / params
                    self.hints[t.name] = min(int(share // allocate.vector_bytes(t.shape, self.widths[0],
                                                                                self.group_size)), min(t.shape))
            return
        top_bits, top_count = self.recipe[0]

        def floor(t):  # room for the recipe's first group, so a tiny matrix still gets its top vectors
            first = min(top_count if top_count is not None else 1, min(t.shape))
            group = [BitGroup(0, first, top_bits, self.group_size)] if first else []
            return self.cost(t.name, t.dtype, t.shape, group)
        self.budgets = budget.share_budgets(tensors, total, floor)
        if sum(self.budgets.values()) > total:  # the floors alone overspend: fall back to empty records
            self.budgets = budget.share_budgets(tensors, total, lambda t: empty[t.name])

    def measure(self, name, ft, base, dtype_name) -> allocate.Candidates:
        """``rd``: every vector's bytes and error at each width (the SVD is kept for encoding if it fits)."""
        svd = self.factorize(name, ft, base, dtype_name, rank_hint=self.hints.get(name))
        u_side, v_side = self._metric(name, ft.shape)
        candidates = allocate.Candidates.measure(
            name, dtype_name, ft.shape, self._rotated(name, ft.shape, svd), self.widths, self.group_size,
            u_side, v_side, self.zstd_level, self.quantizer, self.entropy)
        self.cache.put((name, self.hints.get(name)), svd)
        return candidates

    def allocate(self, tensors, measures) -> dict[str, TensorPlan]:
        if self.alloc != "rd":
            return {t.name: TensorPlan(budget=self.budgets[t.name]) for t in tensors}
        candidates = [measures[t.name] for t in tensors]
        empty = {c.name: self.cost(c.name, c.dtype, c.shape, []) for c in candidates}
        reserve = int(RD_HEADROOM * (self.total - sum(empty.values())))
        chosen = allocate.allocate(candidates, self.total - reserve, self.cost, self.group_size)
        plans, costs = {}, {}
        for c, widths in zip(candidates, chosen):
            keep = _widest_first(widths)
            plans[c.name] = RdPlan(keep, widths[keep], c.widths, c.cost, c.dist[keep])
            costs[c.name] = allocate.estimated_cost(c, widths, self.cost, self.group_size)
        # What the allocation left (the headroom, and the last bytes no vector fits) goes back to the
        # records in proportion to their estimated blobs, the scale of the estimates' error.
        blob = {name: cost - empty[name] for name, cost in costs.items()}
        left, spent = self.total - sum(costs.values()), max(sum(blob.values()), 1)
        return {t.name: TensorPlan(budget=costs[t.name] + left * blob[t.name] // spent, data=plans[t.name])
                for t in tensors}

    def _metric(self, name, shape):
        """(output-side, input-side) weights of the error: None (identity) or the input Hessian."""
        if self.metric == "weights":
            return None, None
        h, axis = self._hessian(name, shape)  # rotated like the vectors the fit measures
        return (h, None) if axis == 0 else (None, h)

    # --- encoding ------------------------------------------------------------------------

    def factorize(self, name, ft, base, dtype_name, rank_hint, delta=None) -> Svd:
        """The SVD of Δ (``delta`` when the caller has it already), from the cache when measured."""
        cached = self.cache.pop((name, rank_hint))
        if cached is not None:
            return cached
        if delta is None:
            delta = dtypes.float32_delta(ft, base, dtype_name)
        if self.svd == "randomized" and rank_hint is not None:
            seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{name}".encode()).digest()[:8], "little")
            return randomized_svd(delta, rank_hint, self.oversample, self.power_iters, seed)
        return exact_svd(delta)

    def encode_tensor(self, name, ft, base, dtype_name, plan: TensorPlan | None = None):
        shape = ft.shape
        if plan is None:  # not planned (a direct call): this matrix alone at the ratio
            if self.alloc == "rd":
                raise UsageError("delta-come with alloc='rd' codes a matrix only as planned over the file")
            plan = TensorPlan(budget=int(self.ratio * 16 * math.prod(shape)) // 8)
        delta = None  # only the U refit reads Δ itself
        if self.refit and self._hessians.sided(name, shape)[0] is not None:
            delta = dtypes.float32_delta(ft, base, dtype_name)
        if self.alloc == "rd":
            key = (name, self.hints.get(name))
            factors = self.factorize(name, ft, base, dtype_name, key[1], delta)
            svd = self._rotated(name, shape, factors)
            order = plan.data.order
            svd = Svd(svd.u[order], svd.s[order], svd.v[order])
            coded = self._fit_rd(name, dtype_name, shape, svd, plan.data, delta, plan.budget)
            if not self.holds_with_more_budget(plan, coded.params):
                # Vectors were narrowed or dropped to fit: the encoder codes this matrix again should an earlier
                # one leave bytes over, and the SVD is most of that work.
                self.cache.put(key, factors)
        else:
            hint = self._rank_hint(name, dtype_name, shape, plan.budget)
            svd = self._rotated(name, shape, self.factorize(name, ft, base, dtype_name, hint, delta))
            coded = self._fit_recipe(name, dtype_name, shape, svd, delta, plan.budget)
        return coded.kind, coded.params, coded.raws

    def _coded(self, name, dtype_name, shape, svd, groups, delta, quantized=None) -> Coded:
        """The record of ``groups`` and what it will cost stored (after zstd, as the writer will).

        ``quantized`` (from ``_quantize_all``) covers at least ``groups``: it is sliced, not redone.
        """
        if quantized is None:
            quantized = self._quantize_all(name, shape, svd, groups, delta)
        s, factors = _sliced(quantized, groups)
        rotation = self._rotation(name, shape)
        if rotation is None:
            kind, (params, raws) = Kind.LOWRANK_MIXED, LowrankMixed.encode(shape, groups, s, factors)
        else:
            kind, (params, raws) = Kind.LOWRANK_ROTATED, LowrankRotated.encode(shape, groups, s, factors, *rotation)
        stored = len(blobs.encode(raws[0], self.zstd_level, self.entropy)[1]) if raws else None
        return Coded(groups, params, raws, self.cost(name, dtype_name, shape, groups, stored=stored), kind)

    def _fit_recipe(self, name, dtype_name, shape, svd, delta, budget) -> Coded:
        """The recipe's groups filled until the *stored* record meets ``budget``.

        The raw size is an upper bound, so the first fit always holds; when zstd
        shrinks the blob (codes of a vector that is zero over many rows, as in a
        word-embedding delta), the saving buys more vectors, up to GROW_STEPS tries.
        """
        cap = rank_cap(svd.s, shape)
        groups = recipe_groups(name, dtype_name, shape, self.recipe, self.group_size, budget, cap, self.cost)
        best = self._coded(name, dtype_name, shape, svd, groups, delta)
        lo, hi = self.cost(name, dtype_name, shape, groups), math.inf  # raw budgets that fit / do not
        for _ in range(GROW_STEPS):
            slack = budget - best.cost
            if slack < GROW_MIN_SLACK * budget or not groups:
                break
            shrink = best.cost / self.cost(name, dtype_name, shape, best.groups)
            trial_budget = min(lo + int(slack / shrink), (lo + hi) // 2 if hi < math.inf else math.inf)
            trial = recipe_groups(name, dtype_name, shape, self.recipe, self.group_size, trial_budget, cap,
                                  self.cost)
            if trial == best.groups:
                break
            coded = self._coded(name, dtype_name, shape, svd, trial, delta)
            if coded.cost <= budget:
                best, lo = coded, trial_budget
            else:
                hi = trial_budget
        return best

    def _fit_rd(self, name, dtype_name, shape, svd, plan: RdPlan, delta, budget) -> Coded:
        """The planned widths; should the stored record overrun ``budget``, vectors give way.

        Planning estimates stored sizes from one blob per width; a record mixing
        widths compresses a little worse (zstd fits one literal table to the whole
        blob), so a record may come out over its plan despite the headroom.  The vectors that
        give way are those whose narrowing (or, at the narrowest width, dropping)
        costs the least error per byte saved, the price the allocation itself
        used.  Dropping the last vectors instead would empty a rank-1 record
        (BERT's token-type embeddings) a few bytes over its budget.
        """
        widths = plan.widths.copy()
        while True:
            keep = _widest_first(widths)
            groups = groups_from_widths(widths[keep], self.group_size)
            coded = self._coded(name, dtype_name, shape, Svd(svd.u[keep], svd.s[keep], svd.v[keep]), groups,
                                delta)
            if coded.cost <= budget or not keep.size:
                return coded
            widths = plan.narrowed(widths, coded.cost - budget)

    def _rank_hint(self, name, dtype_name, shape, budget) -> int:
        """Most vectors the recipe could keep in ``budget``: what a randomized SVD must find.

        Counted at raw sizes with a quarter more room: the fit spends what zstd saves
        on the blob on more vectors (on the 2-bit codes of a dense delta, about 1/6).
        """
        groups = recipe_groups(name, dtype_name, shape, self.recipe, self.group_size, budget * 5 // 4, min(shape),
                               self.cost)
        return sum(g.count for g in groups)

    def quantize(self, name, shape, svd: Svd, groups, delta):
        """(S, [(V, U) factors]) of the kept vectors: GPTQ where a Hessian is known, else RTN."""
        return _sliced(self._quantize_all(name, shape, svd, groups, delta), groups)

    def _quantize_all(self, name, shape, svd: Svd, groups, delta) -> tuple:
        """(S, V (codes, scales, zeros), U (codes, scales, zeros)) of the vectors ``groups`` cover.

        Any prefix of the result (same widths) is what quantizing that prefix alone
        would give, but for GPTQ's refitted U, which absorbed the vectors after it:
        dropping a few tail vectors needs no second pass.
        """
        k = groups[-1].stop if groups else 0
        s = svd.s[:k].astype(np.float32)
        if not k:
            return s, None, None
        bits = np.concatenate([[g.bits] * g.count for g in groups]).astype(np.int64)
        h, axis = self._hessian(name, shape)
        rtn = self.quantizer.rtn
        if h is None:
            return s, rtn(svd.v[:k], bits, self.group_size), rtn(svd.u[:k], bits, self.group_size)
        if axis == 0:  # a weight stored in × out (Conv1D): U runs along the inputs, so the roles swap
            u, v = self._gptq(svd.u[:k], svd.v[:k], s, None if delta is None else delta.T, h, bits)
            return s, v, u
        v, u = self._gptq(svd.v[:k], svd.u[:k], s, delta, h, bits)
        return s, v, u

    def _gptq(self, inputs, outputs, s, delta, h, bits) -> tuple:
        """GPTQ of the input-side vectors against ``h``, then of the output side against the Hessian
        of x·(input side)ᵀ·diag(S) (refitted first to absorb the input side's error, with ``refit``)."""
        if self.quantizer.name == "minmax":  # min-max grids: GPTQ on the device when there is one
            rows, columns = accel.gptq_rows, accel.gptq_columns
        else:  # other grids: numpy GPTQ with the quantizer's fit (the CPU's)
            fit = self.quantizer.fit
            rows = lambda *a: gptq.quantize_rows(*a, fit=fit)  # noqa: E731
            columns = lambda *a: gptq.quantize_columns(*a, fit=fit)  # noqa: E731
        q_in = rows(inputs, h, bits, self.group_size, self.damp)
        in_hat = quant.dequantize(*q_in, self.group_size)
        target = gptq.refit_u(delta, in_hat, s, h, self.damp) if self.refit else outputs
        q_out = columns(target, gptq.u_hessian(in_hat, s, h), bits, self.group_size, self.damp)
        return q_in, q_out

    def calibrated(self, name, shape) -> bool:
        """Whether this matrix is quantized with GPTQ (the statistics hold its input Hessian)."""
        return self._hessians.available(name, shape)

    def _hessian(self, name, shape) -> tuple:
        """(the matrix's input Hessian from the calibration statistics, read once per matrix, or None;
        the axis of its inputs): in rotated coordinates (R·H·Rᵀ) when the record rotates its input side."""
        h, axis = self._hessians.sided(name, shape)
        rotation = self._rotation(name, shape)
        side = "V" if axis == 1 else "U"
        if h is None or rotation is None or rotation[0 if side == "V" else 1] != Rotation.HADAMARD:
            return h, axis
        cached = self._rotated_h  # one read: encoder threads share this method
        if cached[0] == name:
            return cached[1], axis
        h = rotate_hessian(h, rotation[2], side)
        self._rotated_h = (name, h)
        return h, axis

    # --- rotation ------------------------------------------------------------------------

    def _rotation(self, name, shape):
        """(v_rotation, u_rotation, seed) of the matrix's lowrank-rotated record, or None (lowrank-mixed).

        A side is rotated when its Hadamard blocks hold at least MIN_ROTATION_BLOCK
        elements (a shorter block spreads an outlier over too few neighbours to help).
        """
        if self.rotation == "none":
            return None
        m, n = shape
        v = Rotation.HADAMARD if block_size(n) >= MIN_ROTATION_BLOCK else Rotation.NONE
        u = Rotation.HADAMARD if block_size(m) >= MIN_ROTATION_BLOCK else Rotation.NONE
        if v == u == Rotation.NONE:
            return None
        seed = int.from_bytes(hashlib.sha256(f"dcm-rotation:{self.seed}:{name}".encode()).digest()[:8], "little")
        return int(v), int(u), seed

    def _rotated(self, name, shape, svd: Svd) -> Svd:
        """The SVD with the vectors the record stores: R·v and R·u on the rotated sides."""
        rotation = self._rotation(name, shape)
        if rotation is None:
            return svd
        v_rot, u_rot, seed = rotation
        return Svd(rotate(svd.u, seed, "U") if u_rot else svd.u, svd.s,
                   rotate(svd.v, seed, "V") if v_rot else svd.v)

    def cost(self, name, dtype_name, shape, groups, alignment: int = DEFAULT_ALIGNMENT, stored=None) -> int:
        """``record_cost`` of the matrix's record (lowrank-rotated params when it rotates)."""
        return record_cost(name, dtype_name, shape, groups, alignment, stored, self._rotation(name, shape))


def _widest_first(widths: np.ndarray) -> np.ndarray:
    """Indices of the vectors with a width > 0, widest first, then in SVD order: a record's layout."""
    order = np.lexsort((np.arange(widths.size), -widths))
    return order[widths[order] > 0]


def _sliced(quantized, groups):
    """(S, [(V, U) Factor pairs]) of ``groups``, a prefix of the vectors in ``quantized``."""
    s, v, u = quantized
    k = groups[-1].stop if groups else 0
    return s[:k], [(Factor(*(a[g.start:g.stop] for a in v)), Factor(*(a[g.start:g.stop] for a in u)))
                   for g in groups]
