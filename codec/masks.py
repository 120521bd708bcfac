"""Random drop masks that cost no bytes: regenerated from a counter-based hash (spec section 10.8).

Element c of a record's counter space is *dropped* when

    r(seed, c) = SplitMix64 output number c of ``seed``, top 32 bits  <  drop

where ``drop`` in [0, 2^32] is the drop threshold (drop probability drop / 2^32)::

    z = (seed + (c + 1) · 0x9e3779b97f4a7c15) mod 2^64
    z = (z XOR (z >> 30)) · 0xbf58476d1ce4e5b9 mod 2^64
    z = (z XOR (z >> 27)) · 0x94d049bb133111eb mod 2^64
    z =  z XOR (z >> 31)
    r = z >> 32

Every element is independent (a Bernoulli draw), so a decoder, or a GPU thread
holding one element, recomputes its own fate from (seed, c) alone: no mask
is stored, and nothing depends on the order elements are visited.

Counters: ``sparse`` (DARE) records number their elements in C order; the
singular vectors of a ``sparse-lowrank`` record use c = i·2^33 + side·2^32 + j
for element j of vector i, side 0 for V and 1 for U.
"""

from __future__ import annotations

import hashlib

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
DROP_ALL = 2**32  # the drop threshold of a sparse record that keeps nothing
DROP_MAX_U32 = 2**32 - 1  # the largest threshold a sparse-lowrank vector stores (uint32)
SIDE_V, SIDE_U = 0, 1
MAX_VECTOR_LENGTH = 2**32  # vector elements j must fit the counter's low 32 bits
MAX_VECTORS = 2**31


def uniform32(seed: int, counters: np.ndarray) -> np.ndarray:
    """r(seed, c) for every counter: the top 32 bits of SplitMix64 output c, as uint64."""
    with np.errstate(over="ignore"):
        z = (np.asarray(counters, dtype=np.uint64) + np.uint64(1)) * GOLDEN + np.uint64(seed)
        z ^= z >> np.uint64(30)
        z *= MIX1
        z ^= z >> np.uint64(27)
        z *= MIX2
        z ^= z >> np.uint64(31)
    return z >> np.uint64(32)


def drop_threshold(p: float, top: int = DROP_MAX_U32) -> int:
    """The threshold that drops a share ``p`` of elements in expectation (at most ``top``)."""
    return int(min(max(round(float(p) * 2**32), 0), top))


def drop_share(threshold: int) -> float:
    return threshold / 2**32


def kept_flat(seed: int, count: int, drop: int, start: int = 0) -> np.ndarray:
    """Keep mask (bool) of elements start .. start+count of a ``sparse`` record."""
    if drop == 0:
        return np.ones(count, dtype=bool)
    return uniform32(seed, np.arange(start, start + count, dtype=np.uint64)) >= np.uint64(drop)


def vector_counter(vector: int, side: int) -> int:
    return (vector << 33) | (side << 32)


def kept_vectors(seed: int, drops, length: int, side: int, first: int = 0) -> np.ndarray:
    """Keep masks (vectors, length) of vectors first, first+1, ... of one side of a sparse-lowrank record."""
    drops = np.asarray(drops, dtype=np.uint64)
    out = np.ones((drops.size, length), dtype=bool)
    j = np.arange(length, dtype=np.uint64)
    for r, drop in enumerate(drops):
        if drop:
            out[r] = uniform32(seed, j + np.uint64(vector_counter(first + r, side))) >= drop
    return out


def record_seed(file_seed: int, name: str) -> int:
    """A record's seed from the encoder's seed and the tensor name (the reference encoder's choice)."""
    return int.from_bytes(hashlib.sha256(f"dcm-mask:{file_seed}:{name}".encode()).digest()[:8], "little")
