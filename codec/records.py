"""Record kinds: how each tensor of the fine-tune is stored and rebuilt.

One small class per kind (spec section "Record kinds"), registered by its
number.  A kind checks its own params and blob sizes against the record's
shape and dtype (``validate``: cheap, at open time, nothing read), turns arrays
into raw blob bytes (``encode``), and rebuilds the fine-tuned tensor from raw
blob bytes and, where it needs one, the base tensor (``decode``).
"""

from __future__ import annotations

import math

import numpy as np

from . import dtypes
from .constants import MAX_ELEMENTS, KIND_NAMES, Kind, Layout, Transform
from .errors import IndexSchemaError, LimitError, PayloadError, UnknownKindError


def element_count(shape, where: str) -> int:
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise LimitError(f"{where}: {count} elements exceed the limit {MAX_ELEMENTS}")
    return count


# --- byte planes and the delta transform -------------------------------------


def split_planes(values: np.ndarray) -> list[np.ndarray]:
    """Byte k of every element, k = 0 the least significant (little-endian)."""
    width = values.dtype.itemsize
    as_bytes = np.ascontiguousarray(values).reshape(-1).view(np.uint8).reshape(-1, width)
    return [np.ascontiguousarray(as_bytes[:, k]) for k in range(width)]


def merge_planes(planes: list[bytes], width: int) -> np.ndarray:
    """Inverse of split_planes: unsigned integers of ``width`` bytes."""
    count = len(planes[0]) if planes else 0
    as_bytes = np.empty((count, width), dtype=np.uint8)
    for k, plane in enumerate(planes):
        as_bytes[:, k] = np.frombuffer(plane, dtype=np.uint8)
    return as_bytes.reshape(-1).view(f"<u{width}")


def zigzag_sub(ft_bits: np.ndarray, base_bits: np.ndarray) -> np.ndarray:
    """zigzag((ft - base) mod 2^n) on unsigned n-bit patterns: small differences, small codes."""
    diff = ft_bits - base_bits  # numpy unsigned arithmetic wraps modulo 2^n
    sign = diff >> np.array(diff.dtype.itemsize * 8 - 1, dtype=diff.dtype)
    return (diff << np.array(1, dtype=diff.dtype)) ^ (np.zeros_like(sign) - sign)


def zigzag_add(codes: np.ndarray, base_bits: np.ndarray) -> np.ndarray:
    """Inverse of zigzag_sub: the fine-tune's bit patterns."""
    one = np.array(1, dtype=codes.dtype)
    diff = (codes >> one) ^ (np.zeros_like(codes) - (codes & one))
    return base_bits + diff


# --- kinds ----------------------------------------------------------------------


class RecordKind:
    number: int
    needs_base: bool = False

    @property
    def name(self) -> str:
        return KIND_NAMES[self.number]

    def validate(self, rec: dict, where: str) -> None:
        raise NotImplementedError

    def decode(self, rec: dict, raws: list[bytes], base: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


def _check_params(rec, where, allowed: dict):
    """``allowed`` maps each required param to its set of legal values."""
    params = rec["params"]
    for key in params:
        if key not in allowed:
            raise IndexSchemaError(f"index: {where}.params: unknown key {key!r}")
    for key, legal in allowed.items():
        if key not in params:
            raise IndexSchemaError(f"index: {where}.params: missing required key {key!r}")
        if type(params[key]) is not int:
            raise IndexSchemaError(f"index: {where}.params.{key}: expected an integer")
        if params[key] not in legal:
            raise UnknownKindError(f"{where}.params.{key}: unknown value {params[key]}")


def _check_dense_blobs(rec, where, layout: int):
    """Blob count and raw lengths of a dense array in ``layout``."""
    dt = dtypes.dtype(rec["dtype"])
    count = element_count(rec["shape"], where)
    if layout == Layout.PLAIN:
        expected = [count * dt.itemsize]
    else:
        expected = [count] * dt.itemsize
    got = [b["raw_length"] for b in rec["blobs"]]
    if got != expected:
        raise PayloadError(
            f"{where}: {rec['dtype']}{list(rec['shape'])} in layout {layout} needs blobs of "
            f"raw lengths {expected}, record has {got}"
        )


def _dense_raws(values: np.ndarray, layout: int) -> list[bytes]:
    if layout == Layout.PLAIN:
        return [np.ascontiguousarray(values).tobytes()]
    return [plane.tobytes() for plane in split_planes(values)]


def _dense_values(raws, rec, layout: int) -> np.ndarray:
    """Unsigned bit patterns of the record's elements from its raw blobs."""
    width = dtypes.dtype(rec["dtype"]).itemsize
    if layout == Layout.PLAIN:
        return np.frombuffer(raws[0], dtype=f"<u{width}").copy()
    return merge_planes(raws, width)


def _storage(bits: np.ndarray, rec) -> np.ndarray:
    dt = dtypes.dtype(rec["dtype"])
    return bits.view(dt.storage).reshape(rec["shape"])


class DenseDelta(RecordKind):
    """Exact delta: zigzag of the bit-pattern difference, split into byte planes."""

    number = Kind.DENSE_DELTA
    needs_base = True

    @staticmethod
    def encode(ft: np.ndarray, base: np.ndarray) -> tuple[dict, list[bytes]]:
        codes = zigzag_sub(dtypes.unsigned_view(ft.reshape(-1)), dtypes.unsigned_view(base.reshape(-1)))
        layout = Layout.BYTE_PLANES if ft.dtype.itemsize > 1 else Layout.PLAIN
        return {"transform": int(Transform.SUB_ZIGZAG), "layout": int(layout)}, _dense_raws(codes, layout)

    def validate(self, rec, where):
        _check_params(rec, where, {"transform": {Transform.SUB_ZIGZAG}, "layout": set(Layout)})
        base = rec.get("base")
        if base is None:
            raise IndexSchemaError(f"index: {where}: a dense-delta record needs a base reference")
        if base["dtype"] != rec["dtype"] or tuple(base["shape"]) != tuple(rec["shape"]):
            raise PayloadError(f"{where}: dense-delta base and fine-tune must share dtype and shape")
        _check_dense_blobs(rec, where, rec["params"]["layout"])

    def decode(self, rec, raws, base):
        codes = _dense_values(raws, rec, rec["params"]["layout"])
        return _storage(zigzag_add(codes, dtypes.unsigned_view(base.reshape(-1))), rec)


class Full(RecordKind):
    """The fine-tuned tensor stored whole (no base tensor of that name, dtype or shape)."""

    number = Kind.FULL

    @staticmethod
    def encode(ft: np.ndarray) -> tuple[dict, list[bytes]]:
        layout = Layout.BYTE_PLANES if ft.dtype.itemsize > 1 else Layout.PLAIN
        return {"layout": int(layout)}, _dense_raws(dtypes.unsigned_view(ft.reshape(-1)), layout)

    def validate(self, rec, where):
        _check_params(rec, where, {"layout": set(Layout)})
        _check_dense_blobs(rec, where, rec["params"]["layout"])

    def decode(self, rec, raws, base):
        return _storage(_dense_values(raws, rec, rec["params"]["layout"]), rec)


class Removed(RecordKind):
    """A base tensor the fine-tune lacks: no payload, decodes to nothing."""

    number = Kind.REMOVED

    def validate(self, rec, where):
        _check_params(rec, where, {})
        if rec["blobs"]:
            raise PayloadError(f"{where}: a removed record has no blobs")
        base = rec.get("base")
        if base is None:
            raise IndexSchemaError(f"index: {where}: a removed record needs a base reference")
        if base["dtype"] != rec["dtype"] or tuple(base["shape"]) != tuple(rec["shape"]):
            raise PayloadError(f"{where}: a removed record repeats its base tensor's dtype and shape")

    def decode(self, rec, raws, base):
        return None


KINDS: dict[int, RecordKind] = {k.number: k for k in (DenseDelta(), Full(), Removed())}


def kind_of(rec: dict, where: str) -> RecordKind:
    try:
        return KINDS[rec["kind"]]
    except KeyError:
        raise UnknownKindError(f"{where}: unknown record kind {rec['kind']}") from None


def validate(rec: dict, where: str) -> RecordKind:
    """Kind-level checks of one schema-checked record; returns its kind."""
    kind = kind_of(rec, where)
    dtypes.dtype(rec["dtype"])
    element_count(rec["shape"], where)
    if "base" in rec:
        dtypes.dtype(rec["base"]["dtype"])
    kind.validate(rec, where)
    return kind
