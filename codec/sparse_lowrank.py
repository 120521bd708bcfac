"""The payload of a ``sparse-lowrank`` record (ImPart): sparse singular vectors (spec 10.9).

A record of shape (m, n) stores k singular triplets whose vectors keep only
some of their elements.  Element j of v_i (or u_i) is kept or dropped by the
record's *mask*: ``hash`` (mask 1) regenerates it from the record's seed and a
per-vector drop threshold (``masks.py``: no bits stored); ``bitmask`` (mask 2)
stores one bit per element.  Only kept elements are stored, vector-major and
in ascending j, either as float16 (a bit group of ``bits`` 16) or quantized
(``bits`` 1..8) in quantization groups of ``group_size`` consecutive *kept*
elements of one vector, each with a float16 scale and a ``bits``-bit zero point.

params = {"packing": 1, "mask": 1 | 2, "seed": u64, "groups": [[start, stop, bits, group_size], ...]}

Blob sections (each at a multiple of 4 bytes, zeros between):

    S                     k float32
    drops (mask 1)        k uint32: vector i's drop threshold, for u_i and v_i alike
    V mask, U mask (2)    k·n and k·m 1-bit codes, 1 = kept
    for each group:       V values, [V scales, V zeros], U values, [U scales, U zeros]

    Δ̂ = Û·diag(S)·V̂ᵀ       W = round_dtype(float32(W_base) + Δ̂)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import bitpack, masks, quant, sections
from .constants import MaskEncoding, Packing
from .errors import IndexSchemaError, PayloadError, UnknownKindError
from .lowrank import BitGroup, parse_group_list

FLOAT_BITS = 16  # a bit group of float16 values rather than codes
VALUE_DTYPE = np.dtype("<f2")
S_DTYPE = np.dtype("<f4")
DROP_DTYPE = np.dtype("<u4")
SIDES = (("V", 1, masks.SIDE_V), ("U", 0, masks.SIDE_U))  # (name, axis of shape giving its length, hash side)


def is_float(group: BitGroup) -> bool:
    return group.bits == FLOAT_BITS


# --- params -------------------------------------------------------------------------


def parse_params(params: dict, shape, where: str) -> tuple[int, int, list[BitGroup]]:
    """(mask encoding, seed, bit groups) of a record's params, checked against its shape."""
    if set(params) != {"packing", "mask", "seed", "groups"}:
        raise IndexSchemaError(f"index: {where}.params: expected exactly the keys 'packing', 'mask', 'seed', 'groups'")
    # Spec 10.1: each param in the order of the kind's table, its type before its value.
    for key, legal in (("packing", {Packing.LSB_FIRST}), ("mask", set(MaskEncoding))):
        if type(params[key]) is not int:
            raise IndexSchemaError(f"index: {where}.params.{key}: expected an integer")
        if params[key] not in legal:  # a registry number: a later version may define it
            raise UnknownKindError(f"{where}.params.{key}: unknown value {params[key]}")
    if type(params["seed"]) is not int:
        raise IndexSchemaError(f"index: {where}.params.seed: expected an integer")
    if not 0 <= params["seed"] < 2**64 or (params["mask"] == MaskEncoding.BITMASK and params["seed"] != 0):
        raise PayloadError(f"{where}.params.seed: {params['seed']} must be in [0, 2^64), and 0 with a bitmask")
    groups = parse_group_list(params["groups"], shape, where, float_bits=FLOAT_BITS)
    return params["mask"], params["seed"], groups


# --- sections -----------------------------------------------------------------------


def _value_parts(group: BitGroup, counts: np.ndarray, side: str, gi: int):
    kept = int(counts.sum())
    if is_float(group):
        return [(f"g{gi}.{side}.values", kept * VALUE_DTYPE.itemsize)]
    qgroups = int(quant_groups(counts, group.group_size).sum())
    return [(f"g{gi}.{side}.values", bitpack.packed_size(kept, group.bits)),
            (f"g{gi}.{side}.scales", qgroups * quant.SCALE_DTYPE.itemsize),
            (f"g{gi}.{side}.zeros", bitpack.packed_size(qgroups, group.bits))]


def layout(shape, groups, mask: int, v_counts, u_counts) -> list:
    """The blob's sections, given the kept elements of each vector (``v_counts``, ``u_counts``)."""
    m, n = shape
    k = groups[-1].stop if groups else 0
    parts = [("S", k * S_DTYPE.itemsize)]
    if mask == MaskEncoding.HASH:
        parts.append(("drops", k * DROP_DTYPE.itemsize))
    else:
        parts += [("V.mask", bitpack.packed_size(k * n, 1)), ("U.mask", bitpack.packed_size(k * m, 1))]
    for gi, g in enumerate(groups):
        for side, counts in (("V", v_counts), ("U", u_counts)):
            parts += _value_parts(g, np.asarray(counts[g.start:g.stop]), side, gi)
    return sections.layout(parts)


def size_bounds(shape, groups, mask: int) -> tuple[int, int]:
    """The smallest and largest raw blob any mask can give (nothing kept, everything kept)."""
    if not groups:
        return 0, 0
    k = groups[-1].stop
    none = layout(shape, groups, mask, np.zeros(k, np.int64), np.zeros(k, np.int64))
    full = layout(shape, groups, mask, np.full(k, shape[1]), np.full(k, shape[0]))
    return sections.size(none), sections.size(full)


def quant_groups(counts, group_size: int) -> np.ndarray:
    return -(-np.asarray(counts, dtype=np.int64) // group_size)


def group_ids(counts, group_size: int) -> np.ndarray:
    """For each kept element (vector-major), the index of its quantization group."""
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(quant_groups(counts, group_size))[:-1]]).astype(np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    vector = np.repeat(np.arange(counts.size), counts)
    position = np.arange(int(counts.sum())) - first[vector]
    return starts[vector] + position // group_size


# --- values ---------------------------------------------------------------------------


@dataclass
class Values:
    """The kept elements of one side of one bit group: float16 ``values``, or codes with scales and zeros."""

    values: np.ndarray  # (kept,) float16, or uint8 codes
    scales: np.ndarray | None = None  # (quantization groups,) float16
    zeros: np.ndarray | None = None  # (quantization groups,) uint8

    def dequantize(self, counts, group_size: int) -> np.ndarray:
        if self.scales is None:
            return self.values.astype(np.float32)
        gid = group_ids(counts, group_size)
        out = self.values.astype(np.float32)
        out -= self.zeros.astype(np.float32)[gid]
        out *= self.scales.astype(np.float32)[gid]
        return out


def quantize_rtn(kept_values: np.ndarray, counts, group: BitGroup) -> Values:
    """Round-to-nearest of the kept elements in quantization groups of consecutive kept elements."""
    if is_float(group):
        return Values(kept_values.astype(VALUE_DTYPE))
    gid = group_ids(counts, group.group_size)
    total = int(quant_groups(counts, group.group_size).sum())
    padded = np.zeros((total, group.group_size), dtype=np.float32)
    slot = _slots(counts, group.group_size)
    padded[gid, slot] = kept_values
    scale, zero = quant.fit(padded, group.bits, group.group_size)
    codes = quant.quantize(padded, scale, zero, group.bits, group.group_size)
    return Values(codes[gid, slot], scale[:, 0], zero[:, 0])


def _slots(counts, group_size: int) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    vector = np.repeat(np.arange(counts.size), counts)
    return (np.arange(int(counts.sum())) - first[vector]) % group_size


# --- the blob -----------------------------------------------------------------------------


@dataclass
class Payload:
    """Everything a sparse-lowrank blob holds, per bit group a (V, U) pair of ``Values``."""

    s: np.ndarray  # (k,) float32
    drops: np.ndarray | None  # (k,) uint32 with the hash mask
    v_keep: np.ndarray  # (k, n) bool
    u_keep: np.ndarray  # (k, m) bool
    values: list  # [(Values, Values)] per group

    def factors(self, groups) -> tuple[np.ndarray, np.ndarray]:
        """(Û (k, m), V̂ (k, n)) dense float32, zeros where elements were dropped."""
        k = self.s.size
        u = np.zeros(self.u_keep.shape, dtype=np.float32)
        v = np.zeros(self.v_keep.shape, dtype=np.float32)
        for g, (vv, uv) in zip(groups, self.values):
            for dense, keep, vals in ((v, self.v_keep, vv), (u, self.u_keep, uv)):
                rows = keep[g.start:g.stop]
                block = np.zeros(rows.shape, dtype=np.float32)
                block[rows] = vals.dequantize(rows.sum(axis=1), g.group_size)
                dense[g.start:g.stop] = block
        assert u.shape[0] == v.shape[0] == k
        return u, v

    def delta(self, groups) -> np.ndarray:
        u, v = self.factors(groups)
        return (u.T * self.s) @ v


def hash_keep(seed: int, drops, shape) -> tuple[np.ndarray, np.ndarray]:
    """(V keep (k, n), U keep (k, m)) of the hash mask."""
    m, n = shape
    return (masks.kept_vectors(seed, drops, n, masks.SIDE_V), masks.kept_vectors(seed, drops, m, masks.SIDE_U))


def pack_blob(shape, groups, mask: int, payload: Payload) -> bytes:
    v_counts, u_counts = payload.v_keep.sum(axis=1), payload.u_keep.sum(axis=1)
    secs = layout(shape, groups, mask, v_counts, u_counts)
    data = {"S": np.asarray(payload.s, dtype=S_DTYPE).tobytes()}
    if mask == MaskEncoding.HASH:
        data["drops"] = np.asarray(payload.drops, dtype=DROP_DTYPE).tobytes()
    else:
        data["V.mask"] = bitpack.pack(payload.v_keep.reshape(-1).astype(np.uint8), 1)
        data["U.mask"] = bitpack.pack(payload.u_keep.reshape(-1).astype(np.uint8), 1)
    for gi, (g, pair) in enumerate(zip(groups, payload.values)):
        for side, vals in zip("VU", pair):
            if is_float(g):
                data[f"g{gi}.{side}.values"] = np.asarray(vals.values, dtype=VALUE_DTYPE).tobytes()
            else:
                data[f"g{gi}.{side}.values"] = bitpack.pack(vals.values, g.bits)
                data[f"g{gi}.{side}.scales"] = np.asarray(vals.scales, dtype=quant.SCALE_DTYPE).tobytes()
                data[f"g{gi}.{side}.zeros"] = bitpack.pack(vals.zeros, g.bits)
    return sections.join(secs, data)


def _prefix(raw, mask: int, shape, k: int, where: str) -> dict:
    """The sections before the values (S and the mask), which fix the rest of the layout."""
    m, n = shape
    head = [("S", k * S_DTYPE.itemsize)]
    head += [("drops", k * DROP_DTYPE.itemsize)] if mask == MaskEncoding.HASH else \
        [("V.mask", bitpack.packed_size(k * n, 1)), ("U.mask", bitpack.packed_size(k * m, 1))]
    secs = sections.layout(head)
    if len(raw) < sections.size(secs):
        raise PayloadError(f"{where}: blob of {len(raw)} bytes is shorter than its S and mask sections")
    return sections.split(memoryview(raw)[:sections.size(secs)], secs, where)


def unpack_blob(raw, shape, groups, mask: int, seed: int, where: str) -> Payload:
    """The payload from a raw blob: masks regenerated or read, then every section checked."""
    m, n = shape
    k = groups[-1].stop
    head = _prefix(raw, mask, shape, k, where)
    s = np.frombuffer(head["S"], dtype=S_DTYPE).astype(np.float32)
    if not np.isfinite(s).all():
        raise PayloadError(f"{where}: S holds a value that is not finite")
    drops = None
    if mask == MaskEncoding.HASH:
        drops = np.frombuffer(head["drops"], dtype=DROP_DTYPE).copy()
        v_keep, u_keep = hash_keep(seed, drops, shape)
    else:
        v_keep = bitpack.unpack(head["V.mask"], k * n, 1).reshape(k, n).astype(bool)
        u_keep = bitpack.unpack(head["U.mask"], k * m, 1).reshape(k, m).astype(bool)
    v_counts, u_counts = v_keep.sum(axis=1), u_keep.sum(axis=1)
    parts = sections.split(raw, layout(shape, groups, mask, v_counts, u_counts), where)
    values = []
    for gi, g in enumerate(groups):
        pair = []
        for side, counts in (("V", v_counts), ("U", u_counts)):
            kept = int(counts[g.start:g.stop].sum())
            if is_float(g):
                vals = np.frombuffer(parts[f"g{gi}.{side}.values"], dtype=VALUE_DTYPE).copy()
                if not np.isfinite(vals).all():
                    raise PayloadError(f"{where}: group {gi} {side} values hold a value that is not finite")
                pair.append(Values(vals))
                continue
            qg = int(quant_groups(counts[g.start:g.stop], g.group_size).sum())
            scales = np.frombuffer(parts[f"g{gi}.{side}.scales"], dtype=quant.SCALE_DTYPE).copy()
            if not np.isfinite(scales).all():
                raise PayloadError(f"{where}: group {gi} {side} scales hold a value that is not finite")
            pair.append(Values(bitpack.unpack(parts[f"g{gi}.{side}.values"], kept, g.bits), scales,
                               bitpack.unpack(parts[f"g{gi}.{side}.zeros"], qg, g.bits)))
        values.append(tuple(pair))
    return Payload(s, drops, v_keep, u_keep, values)
