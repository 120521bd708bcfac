"""The payload of a ``lowrank-mixed`` record: S and quantized U, V in bit groups.

A record of shape (m, n) stores k singular triplets of its delta, cut into bit
groups: group g holds the vectors [start, stop) with codes of ``bits`` bits and
quantization groups of ``group_size`` elements along each vector (``quant.py``).
params = {"packing": 1, "groups": [[start, stop, bits, group_size], ...]}, contiguous from 0.

Its one blob is a run of sections, each starting at a multiple of 4 bytes from
the blob's start (zero bytes between):

    S                 k float32
    for each group:   V codes, V scales, V zeros, U codes, U scales, U zeros

Codes are vector-major (vector i's n elements of V, or m elements of U, then
vector i+1's) in one LSB-first stream of ``bits``-bit codes (``bitpack.py``);
scales are float16, (vectors, ceil(len/group_size)) row-major; zero points the
same count of ``bits``-bit codes, packed.  V first: a kernel computes x·V̂ first.

    Δ̂ = Û·diag(S)·V̂ᵀ       W = round_dtype(float32(W_base) + Δ̂)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import bitpack, quant
from .constants import MAX_BIT_GROUPS, MAX_QUANT_GROUP_SIZE, Packing
from .sections import Section, align4, join, split
from .errors import IndexSchemaError, LimitError, PayloadError, UnknownKindError

S_DTYPE = np.dtype("<f4")
DTYPES = ("F32", "F16", "BF16")  # dtypes a lowrank-mixed record may rebuild


@dataclass(frozen=True)
class BitGroup:
    start: int
    stop: int
    bits: int
    group_size: int

    @property
    def count(self) -> int:
        return self.stop - self.start

    def as_param(self) -> list[int]:
        return [self.start, self.stop, self.bits, self.group_size]


def _factor_sections(group: BitGroup, length: int) -> list[tuple[str, int]]:
    groups = group.count * quant.group_count(length, group.group_size)
    return [("codes", bitpack.packed_size(group.count * length, group.bits)),
            ("scales", groups * quant.SCALE_DTYPE.itemsize),
            ("zeros", bitpack.packed_size(groups, group.bits))]


def sections(shape, groups: list[BitGroup]) -> list[Section]:
    """Every section of the blob, in order, with its offset from the blob's start."""
    m, n = shape
    rank = groups[-1].stop if groups else 0
    out, offset = [Section("S", 0, rank * S_DTYPE.itemsize)], rank * S_DTYPE.itemsize
    for gi, g in enumerate(groups):
        for factor, length in (("V", n), ("U", m)):
            for what, nbytes in _factor_sections(g, length):
                offset = align4(offset)
                out.append(Section(f"g{gi}.{factor}.{what}", offset, nbytes))
                offset += nbytes
    return out


def blob_size(shape, groups: list[BitGroup]) -> int:
    """Raw bytes of the record's blob (0: a rank-0 record has no blob)."""
    if not groups:
        return 0
    last = sections(shape, groups)[-1]
    return last.offset + last.nbytes


# --- params ------------------------------------------------------------------------


def parse_groups(params: dict, shape, where: str) -> list[BitGroup]:
    """The bit groups of ``params``, checked against the record's shape."""
    if set(params) != {"packing", "groups"}:
        raise IndexSchemaError(f"index: {where}.params: expected exactly the keys 'packing' and 'groups'")
    if type(params["packing"]) is not int:
        raise IndexSchemaError(f"index: {where}.params.packing: expected an integer")
    if params["packing"] != Packing.LSB_FIRST:
        raise UnknownKindError(f"{where}.params.packing: unknown value {params['packing']}")
    return parse_group_list(params["groups"], shape, where)


def parse_group_list(raw, shape, where: str, float_bits: int | None = None) -> list[BitGroup]:
    """The bit groups of a record's ``groups`` param, checked against its shape.

    ``float_bits``: a width that means float values rather than codes (group_size 0),
    for kinds that allow it (sparse-lowrank's 16).
    """
    if not isinstance(raw, list):
        raise IndexSchemaError(f"index: {where}.params.groups: expected an array")
    if len(raw) > MAX_BIT_GROUPS:
        raise LimitError(f"{where}.params.groups: {len(raw)} bit groups exceed the limit {MAX_BIT_GROUPS}")
    groups, start = [], 0
    rank_max = min(shape) if len(shape) == 2 else 0
    for i, g in enumerate(raw):
        at = f"{where}.params.groups[{i}]"
        if not (isinstance(g, list) and len(g) == 4 and all(type(v) is int for v in g)):
            raise IndexSchemaError(f"index: {at}: expected [start, stop, bits, group_size] integers")
        group = BitGroup(*g)
        if group.start != start or group.stop <= group.start:
            raise PayloadError(f"{at}: groups must cover [0, rank) in order without gaps; "
                               f"expected start {start} and stop > start")
        if float_bits is not None and group.bits == float_bits:
            if group.group_size != 0:
                raise PayloadError(f"{at}: a group of {float_bits}-bit floats has group_size 0")
        elif not 1 <= group.bits <= 8:
            also = "" if float_bits is None else f" or {float_bits}"
            raise PayloadError(f"{at}: bits {group.bits} not in 1..8{also}")
        elif not 1 <= group.group_size <= MAX_QUANT_GROUP_SIZE:
            raise PayloadError(f"{at}: group_size {group.group_size} not in 1..{MAX_QUANT_GROUP_SIZE}")
        start = group.stop
        groups.append(group)
    if start > rank_max:
        raise PayloadError(f"{where}: rank {start} exceeds min(shape) = {rank_max}")
    return groups


# --- payload -----------------------------------------------------------------------


@dataclass
class Factor:
    """One quantized factor of one bit group: codes (vectors, length), scales, zeros."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray

    def dequantize(self, group_size: int) -> np.ndarray:
        return quant.dequantize(self.codes, self.scales, self.zeros, group_size)


def pack_blob(shape, groups: list[BitGroup], s: np.ndarray, factors: list[tuple[Factor, Factor]]) -> bytes:
    """The raw blob from S and, per group, its (V, U) factors."""
    parts = {"S": np.asarray(s, dtype=S_DTYPE).tobytes()}
    for gi, (g, pair) in enumerate(zip(groups, factors)):
        for name, f in zip("VU", pair):
            parts[f"g{gi}.{name}.codes"] = bitpack.pack(f.codes, g.bits)
            parts[f"g{gi}.{name}.scales"] = np.asarray(f.scales, dtype=quant.SCALE_DTYPE).tobytes()
            parts[f"g{gi}.{name}.zeros"] = bitpack.pack(f.zeros, g.bits)
    return join(sections(shape, groups), parts)


def unpack_blob(raw, shape, groups: list[BitGroup], where: str):
    """(S, [(V, U) Factor pairs]) from a raw blob; padding and values are checked."""
    m, n = shape
    by_name = split(raw, sections(shape, groups), where)
    s = np.frombuffer(by_name["S"], dtype=S_DTYPE).astype(np.float32)
    if not np.isfinite(s).all():
        raise PayloadError(f"{where}: S holds a value that is not finite")
    factors = []
    for gi, g in enumerate(groups):
        pair = []
        for name, length in (("V", n), ("U", m)):
            ng = quant.group_count(length, g.group_size)
            codes = bitpack.unpack(by_name[f"g{gi}.{name}.codes"], g.count * length, g.bits)
            scales = np.frombuffer(by_name[f"g{gi}.{name}.scales"], dtype=quant.SCALE_DTYPE)
            if not np.isfinite(scales).all():
                raise PayloadError(f"{where}: group {gi} {name} scales hold a value that is not finite")
            zeros = bitpack.unpack(by_name[f"g{gi}.{name}.zeros"], g.count * ng, g.bits)
            pair.append(Factor(codes.reshape(g.count, length), scales.reshape(g.count, ng),
                               zeros.reshape(g.count, ng)))
        factors.append(tuple(pair))
    return s, factors


def dequantized_factors(shape, groups, s, factors):
    """(Û as (k, m), S, V̂ as (k, n)) in float32: vector-major, bit-exact per the spec."""
    m, n = shape
    u = np.empty((len(s), m), dtype=np.float32)
    v = np.empty((len(s), n), dtype=np.float32)
    for g, (fv, fu) in zip(groups, factors):
        v[g.start:g.stop] = fv.dequantize(g.group_size)
        u[g.start:g.stop] = fu.dequantize(g.group_size)
    return u, s, v


def delta(shape, groups, s, factors) -> np.ndarray:
    """Δ̂ = Û·diag(S)·V̂ᵀ in float32 (the product within the spec's tolerance)."""
    u, s, v = dequantized_factors(shape, groups, s, factors)
    return (u.T * s) @ v
