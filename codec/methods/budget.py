"""Byte budgets of lossy methods: what a record costs in the file, and a file's budget shared over matrices.

``--ratio r`` gives the coded matrices together at most r·16 bits per
parameter, counting every byte their records add to the file: the index
entry, the stored blob, and the alignment padding before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import blobs
from ..constants import DEFAULT_ALIGNMENT
from ..index import packed_len

WORST_OFFSET = 2**64 - 1  # the widest msgpack integer: an index entry never grows past this estimate


def record_cost(name: str, kind: int, dtype_name: str, shape, params: dict, raw_lengths,
                stored=None, alignment: int = DEFAULT_ALIGNMENT) -> int:
    """Upper bound of the bytes a lossy record puts in the file.

    Its index entry (with the widest offset and CRC msgpack can take), each blob
    (``stored`` bytes once encoded; before, its raw length, since zstd is kept only
    when smaller) and the padding that may precede each blob.
    """
    raw_lengths = list(raw_lengths)
    stored = raw_lengths if stored is None else list(stored)
    entry = {"name": name, "kind": int(kind), "dtype": dtype_name, "shape": list(shape), "params": params,
             "blobs": [{"offset": WORST_OFFSET, "length": s, "encoding": 1, "raw_length": r, "crc32": 2**32 - 1}
                       for r, s in zip(raw_lengths, stored)],
             "base": {"dtype": dtype_name, "shape": list(shape), "sha256": bytes(32)}}
    return packed_len(entry) + sum(stored) + (alignment - 1) * len(raw_lengths)


@dataclass
class Coded:
    """One matrix's record as it will be written, and its cost in the file (``record_cost``, stored)."""

    kind: int
    params: dict
    raws: list
    cost: int
    info: dict | None = None  # what the method chose, for tests and benchmarks (rank, sparsity...)


def coded(name, kind, dtype_name, shape, params, raws, zstd_level: int, info=None, entropy: bool = True) -> Coded:
    """A record and its exact cost once the writer stores its blobs."""
    stored = [stored_length(r, zstd_level, entropy) for r in raws]
    return Coded(kind, params, raws, record_cost(name, kind, dtype_name, shape, params,
                                                 [len(r) for r in raws], stored), info)


def stored_length(raw: bytes, zstd_level: int, entropy: bool = True) -> int:
    """Bytes the writer will store for ``raw`` (zstd or rANS when smaller)."""
    return len(blobs.encode(raw, zstd_level, entropy)[1])


def total_budget(ratio, tensors) -> int:
    """⌊2·ratio·P⌋ bytes for the P parameters of ``tensors``, less what their records' wrappers take
    (``overhead`` of an ``adapted.InnerInfo``: the index bytes around an inner record)."""
    params = sum(math.prod(t.shape) for t in tensors)
    return int(ratio * 16 * params) // 8 - sum(getattr(t, "overhead", 0) for t in tensors)


def share_budgets(tensors, total: int, floor) -> dict[str, int]:
    """Split ``total`` bytes over tensors by size; a tensor whose share is below ``floor(t)`` gets the floor.

    Water-filling: fixing a floor lowers everyone else's share, so repeat until stable.
    """
    fixed: dict[str, int] = {}
    while True:
        free = [t for t in tensors if t.name not in fixed]
        left = total - sum(fixed.values())
        count = sum(math.prod(t.shape) for t in free)
        shares = {t.name: left * math.prod(t.shape) // count if count else 0 for t in free}
        low = {t.name: floor(t) for t in free if shares[t.name] < floor(t)}
        if not low:
            return {**fixed, **shares}
        fixed.update(low)


class FileBudget:
    """A file's budget shared over its matrices by size (a floor for tiny ones)."""

    def __init__(self, ratio, tensors, floor):
        self.total = total_budget(ratio, tensors)
        self.shares = share_budgets(tensors, self.total, floor) if tensors else {}

    def overspent(self) -> bool:
        return sum(self.shares.values()) > self.total


CARRY_MIN_SHARE = 0.02  # a matrix leaving at least this share of its budget unspent passes it on


class Ledger:
    """Bytes that matrices could not spend, passed on to the matrices after them in file order.

    A matrix whose record takes less than its budget (its delta has a lower rank
    than the budget pays for; zstd shrank a blob it cannot grow further) leaves
    the rest to the matrices after it, shared by size.  Only leftovers of at
    least ``CARRY_MIN_SHARE`` of the budget travel: the slack every fit leaves
    (a fraction of one vector) stays unspent, so that a matrix's budget almost
    always is its planned share, known before any matrix is coded, and tensors
    can be coded in parallel, speculatively: ``budget(name)`` once every earlier
    matrix is ``settle``-d is the one budget the file may use for it, whatever
    ran in parallel, so the bytes never depend on how many workers there were.
    """

    def __init__(self, plans: dict[str, int], order: list[str], numel: dict[str, int]):
        self.plans = dict(plans)  # name -> planned budget
        self.position = {}
        names = [n for n in order if n in self.plans]
        for i, name in enumerate(names):
            self.position[name] = i
        self.numel = [numel[n] for n in names]
        self.after = [0] * len(names)  # parameters of the planned matrices after position i
        for i in range(len(names) - 2, -1, -1):
            self.after[i] = self.after[i + 1] + self.numel[i + 1]
        self.events: list[tuple[int, int]] = []  # (position, bytes left) of matrices settled with a leftover

    def budget(self, name: str) -> int:
        """The planned budget plus this matrix's part of every leftover settled so far before it."""
        j = self.position[name]
        extra = sum(left * self.numel[j] // self.after[i] for i, left in self.events if i < j)
        return self.plans[name] + extra

    def settle(self, name: str, budget: int, cost: int) -> bool:
        """Record what ``name`` spent of ``budget``; True when its leftover goes to later matrices."""
        i = self.position[name]
        left = budget - cost
        if left < max(CARRY_MIN_SHARE * budget, 1) or self.after[i] == 0:
            return False
        self.events.append((i, left))
        return True


GROW_TRIES = 5  # builds per matrix: the first from estimated sizes, the rest spend what zstd saved
CLOSE_ENOUGH = 0.005  # stop once less than this share of the budget is left


def fit(build, knob_for, budget: int, smallest):
    """The best record (most bytes within ``budget``) over a few builds.

    ``knob_for(target)`` gives the method's setting (rank, kept count, sparsity)
    whose *estimated* record cost is at most ``target`` bytes; ``build(knob)``
    makes the record and measures its exact stored cost (a ``.cost``
    attribute).  Estimates miss in both directions (zstd shrinks blobs, random
    masks keep a few more or fewer elements than expected), so the target is
    rescaled by budget/cost after each build.  ``smallest()`` builds the
    cheapest record, which the file's plan guarantees fits.
    """
    target, best, last = float(budget), None, None
    for _ in range(GROW_TRIES):
        knob = knob_for(int(target))
        if knob == last:  # the estimate no longer moves (a rank or density at its limit)
            break
        coded, last = build(knob), knob
        if coded.cost <= budget:
            if best is None or coded.cost > best.cost:
                best = coded
            if budget - coded.cost <= CLOSE_ENOUGH * budget:
                break
        if coded.cost == 0:
            break
        target *= budget / coded.cost if coded.cost <= budget else budget / coded.cost * (1 - CLOSE_ENOUGH)
    return best if best is not None else smallest()
