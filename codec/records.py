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

from . import baseline_payloads, dtypes, lowrank, masks, rotation, sections, sparse_lowrank
from .constants import (CAST_DTYPES, INNER_KINDS, LOSSY_KINDS, MAX_ELEMENTS, KIND_NAMES, Kind, Layout, MaskEncoding,
                        Packing, Rotation, SignScales, Transform)
from .errors import IndexSchemaError, LimitError, PayloadError, UnknownKindError


def element_count(shape, where: str) -> int:
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise LimitError(f"{where}: {count} elements exceed the limit {MAX_ELEMENTS}")
    return count


# --- byte planes and the delta transform -------------------------------------


# Elements per step: transforms run in chunks to keep memory near one tensor.  A chunk
# and its temporaries (a few times 512 KiB for bf16) stay in a core's L2 cache: on
# the CI machine this runs ~2x faster than steps of 1M elements.
_CHUNK = 1 << 18


def _chunks(count: int):
    for start in range(0, count, _CHUNK):
        yield slice(start, min(start + _CHUNK, count))


def as_reader(tensor):
    """(read, count, width) of a tensor given as an array or as a stream.

    Kinds encode from, and decode against, either an in-memory array or a
    stream such as ``checkpoint.TensorStream`` (``numel``, ``itemsize``, and
    ``stream(part)`` giving the flattened elements in slice ``part``, asked for
    once each, in order), so the codec can hold a chunk of a tensor, not all of it.
    """
    if isinstance(tensor, np.ndarray):
        flat = tensor.reshape(-1)
        return (lambda part: flat[part]), flat.size, flat.dtype.itemsize
    return tensor, tensor.numel, tensor.itemsize


def zigzag_sub(ft_bits: np.ndarray, base_bits: np.ndarray) -> np.ndarray:
    """zigzag((ft - base) mod 2^n) on unsigned n-bit patterns: small differences, small codes."""
    diff = ft_bits - base_bits  # numpy unsigned arithmetic wraps modulo 2^n
    sign = diff >> np.array(diff.dtype.itemsize * 8 - 1, dtype=diff.dtype)
    diff <<= np.array(1, dtype=diff.dtype)
    np.subtract(np.array(0, dtype=sign.dtype), sign, out=sign)  # 0 or all ones
    diff ^= sign
    return diff


def zigzag_add(codes: np.ndarray, base_bits: np.ndarray) -> np.ndarray:
    """Inverse of zigzag_sub: the fine-tune's bit patterns."""
    one = np.array(1, dtype=codes.dtype)
    low = codes & one
    np.subtract(np.array(0, dtype=low.dtype), low, out=low)
    diff = codes >> one
    diff ^= low
    diff += base_bits
    return diff


def to_layout(values, count: int, width: int, layout: int) -> list[np.ndarray]:
    """Raw blobs of ``count`` unsigned elements; ``values(slice)`` gives each chunk.

    Byte planes: blob k holds byte k of every element, k = 0 the least significant.
    """
    if layout == Layout.PLAIN:
        out = np.empty(count, dtype=f"<u{width}")
        for part in _chunks(count):
            out[part] = values(part)
        return [out]
    planes = np.empty((width, count), dtype=np.uint8)
    for part in _chunks(count):
        planes[:, part] = values(part).view(np.uint8).reshape(-1, width).T
    return list(planes)


def from_layout(raws, count: int, width: int, layout: int) -> np.ndarray:
    """Inverse of to_layout: a fresh, writable array of unsigned elements.

    ``raws`` is any iterable of the blobs; each is dropped once merged, so with a
    lazy one (``DcmFile.iter_raw_blobs``) one plane at a time lives beside the result.
    """
    raws = iter(raws)
    if layout == Layout.PLAIN:
        return np.frombuffer(next(raws), dtype=f"<u{width}").copy()
    as_bytes = np.empty((count, width), dtype=np.uint8)
    for k in range(width):
        # No name binds the plane (a loop variable, enumerate's reused tuple), so it is
        # freed right after this line, before the next one is decompressed.
        as_bytes[:, k] = np.frombuffer(next(raws), dtype=np.uint8)
    return as_bytes.reshape(-1).view(f"<u{width}")


# --- kinds ----------------------------------------------------------------------


class RecordKind:
    number: int
    needs_base: bool = False

    @property
    def name(self) -> str:
        return KIND_NAMES[self.number]

    def validate(self, rec: dict, where: str) -> None:
        raise NotImplementedError

    def check_payload(self, rec: dict, raws) -> None:
        """Check what the payload alone can show (no base): by default, that every blob decodes."""
        for _ in map(len, raws):  # one blob alive at a time
            pass

    def decode(self, rec: dict, raws, base) -> np.ndarray | None:
        """The fine-tuned tensor from the record's raw blobs (any iterable, see ``from_layout``)
        and, where the kind needs it, the base: an array or a stream (see ``as_reader``)."""
        raise NotImplementedError


def _check_params(rec, where, registry: dict, quantities: dict | None = None):
    """The params of spec 10.1: exactly the listed keys, each an int, checked in order.

    ``registry`` maps each param whose value is a registry number to the numbers
    the kind accepts (another is UnknownKindError: a later version may define it);
    ``quantities`` maps each param that is a quantity to its range (a value outside
    is PayloadError: no version can make it valid).  Registry params come first in
    every kind's table.
    """
    params, quantities = rec["params"], quantities or {}
    for key in params:
        if key not in registry and key not in quantities:
            raise IndexSchemaError(f"index: {where}.params: unknown key {key!r}")
    for key in (*registry, *quantities):
        if key not in params:
            raise IndexSchemaError(f"index: {where}.params: missing required key {key!r}")
    for key, legal in (*registry.items(), *quantities.items()):
        if type(params[key]) is not int:
            raise IndexSchemaError(f"index: {where}.params.{key}: expected an integer")
        if params[key] not in legal:
            error = UnknownKindError if key in registry else PayloadError
            raise error(f"{where}.params.{key}: {'unknown' if key in registry else 'out-of-range'} "
                        f"value {params[key]}")


def _check_same_base(rec, where, kind_name: str):
    """The base reference a kind requires, with the record's dtype and shape."""
    base = rec.get("base")
    if base is None:
        raise IndexSchemaError(f"index: {where}: a {kind_name} record needs a base reference")
    if base["dtype"] != rec["dtype"] or tuple(base["shape"]) != tuple(rec["shape"]):
        raise PayloadError(f"{where}: {kind_name} base reference and record must share dtype and shape")


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


# Tensors below this many bytes are stored in one plain blob: splitting them
# into byte planes saves nothing and costs a blob entry and its padding per byte.
PLANES_MIN_BYTES = 4096


def _layout_for(count: int, width: int) -> int:
    # Byte planes let zstd see the near-constant high bytes of small deltas apart from noisy low ones.
    if width > 1 and count * width >= PLANES_MIN_BYTES:
        return Layout.BYTE_PLANES
    return Layout.PLAIN


def _dense_values(raws, rec, layout: int) -> np.ndarray:
    """Unsigned bit patterns of the record's elements from its raw blobs."""
    width = dtypes.dtype(rec["dtype"]).itemsize
    return from_layout(raws, element_count(rec["shape"], rec["name"]), width, layout)


def _storage(bits: np.ndarray, rec) -> np.ndarray:
    dt = dtypes.dtype(rec["dtype"])
    return bits.view(dt.storage).reshape(rec["shape"])


class DenseDelta(RecordKind):
    """Exact delta: zigzag of the bit-pattern difference, split into byte planes."""

    number = Kind.DENSE_DELTA
    needs_base = True

    @staticmethod
    def encode(ft, base) -> tuple[dict, list[np.ndarray]]:
        """(params, raw blobs) of ``ft`` against ``base``: arrays or streams (see ``as_reader``)."""
        (read_ft, count, width), (read_base, _, _) = as_reader(ft), as_reader(base)
        layout = _layout_for(count, width)

        def codes(part):
            ft_bits, base_bits = dtypes.unsigned_view(read_ft(part)), dtypes.unsigned_view(read_base(part))
            return zigzag_sub(ft_bits, base_bits)
        raws = to_layout(codes, count, width, layout)
        return {"transform": int(Transform.SUB_ZIGZAG), "layout": int(layout)}, raws

    def validate(self, rec, where):  # spec 10.1 step 5: base reference, params, blobs
        _check_same_base(rec, where, self.name)
        _check_params(rec, where, {"transform": {Transform.SUB_ZIGZAG}, "layout": set(Layout)})
        _check_dense_blobs(rec, where, rec["params"]["layout"])

    def decode(self, rec, raws, base):
        values = _dense_values(raws, rec, rec["params"]["layout"])
        read_base = as_reader(base)[0]
        for part in _chunks(values.size):  # in place: no second tensor-sized array
            values[part] = zigzag_add(values[part], dtypes.unsigned_view(read_base(part)))
        return _storage(values, rec)


class Full(RecordKind):
    """The fine-tuned tensor stored whole (no base tensor of that name, dtype or shape)."""

    number = Kind.FULL

    @staticmethod
    def encode(ft) -> tuple[dict, list[np.ndarray]]:
        """(params, raw blobs) of ``ft``: an array or a stream (see ``as_reader``)."""
        read_ft, count, width = as_reader(ft)
        layout = _layout_for(count, width)
        values = lambda part: dtypes.unsigned_view(read_ft(part))  # noqa: E731
        return {"layout": int(layout)}, to_layout(values, count, width, layout)

    def validate(self, rec, where):
        _check_params(rec, where, {"layout": set(Layout)})
        _check_dense_blobs(rec, where, rec["params"]["layout"])

    def decode(self, rec, raws, base):
        return _storage(_dense_values(raws, rec, rec["params"]["layout"]), rec)


class Removed(RecordKind):
    """A base tensor the fine-tune lacks: no payload, decodes to nothing."""

    number = Kind.REMOVED

    def validate(self, rec, where):  # spec 10.1 step 5: base reference, params, blobs
        _check_same_base(rec, where, self.name)
        _check_params(rec, where, {})
        if rec["blobs"]:
            raise PayloadError(f"{where}: a removed record has no blobs")

    def decode(self, rec, raws, base):
        return None


class AdditiveKind(RecordKind):
    """A kind that stores an approximate Δ̂ of a float matrix: W = round_dtype(float32(W_base) + Δ̂)."""

    needs_base = True
    two_dimensional = True

    def _check_record(self, rec, where):
        """Dtype, shape and base reference: what every additive kind requires (spec 10.1 step 5)."""
        if rec["dtype"] not in lowrank.DTYPES or (self.two_dimensional and len(rec["shape"]) != 2):
            what = "2-D matrix" if self.two_dimensional else "tensor"
            raise PayloadError(f"{where}: a {self.name} record is a {what} of "
                               f"{'/'.join(lowrank.DTYPES)}, not {rec['dtype']}{list(rec['shape'])}")
        self._check_shape(rec, where)
        _check_same_base(rec, where, self.name)

    def _check_shape(self, rec, where) -> None:
        """Limits a kind puts on the shape beyond its dimensions (none by default)."""

    @staticmethod
    def _check_lengths(rec, where, expected: list, low=None):
        """Raw lengths equal ``expected``; or, with ``low``, one blob of length within [low, expected]."""
        got = [b["raw_length"] for b in rec["blobs"]]
        if low is None and got == expected:
            return
        if low is not None and len(got) == len(expected) == 1 and low <= got[0] <= expected[0]:
            return
        want = expected if low is None else f"one blob of {low}..{expected[0]} bytes"
        raise PayloadError(f"{where}: {rec['name']!r} with params {rec['params']} needs raw lengths "
                           f"{want}, record has {got}")

    def delta(self, rec, raws) -> np.ndarray:
        """Δ̂ as float32 in the record's shape, from its raw blobs."""
        raise NotImplementedError

    def check_payload(self, rec, raws) -> None:
        """The blob's layout and values (zero padding, finite floats), without the base."""
        self.delta(rec, raws)

    def decode(self, rec, raws, base):
        delta = self.delta(rec, raws)
        read_base, count, _ = as_reader(base)
        delta += dtypes.to_float32(read_base(slice(0, count)), rec["dtype"]).reshape(delta.shape)
        return dtypes.from_float32(delta, rec["dtype"])


def _one_raw(raws) -> bytes | None:
    raws = list(raws)
    return raws[0] if raws else None


class LowrankMixed(AdditiveKind):
    """W_base + Û·diag(S)·V̂ᵀ: singular vectors quantized in bit groups (``lowrank.py``)."""

    number = Kind.LOWRANK_MIXED

    @staticmethod
    def encode(shape, groups, s, factors) -> tuple[dict, list[bytes]]:
        params = {"packing": int(Packing.LSB_FIRST), "groups": [g.as_param() for g in groups]}
        return params, ([lowrank.pack_blob(shape, groups, s, factors)] if groups else [])

    def validate(self, rec, where):
        self._check_record(rec, where)
        groups = lowrank.parse_groups(rec["params"], rec["shape"], where)
        self._check_lengths(rec, where, [lowrank.blob_size(rec["shape"], groups)] if groups else [])

    def delta(self, rec, raws) -> np.ndarray:
        shape = tuple(rec["shape"])
        groups = lowrank.parse_groups(rec["params"], shape, rec["name"])
        raw = _one_raw(raws)
        if not groups:
            return np.zeros(shape, dtype=np.float32)
        s, factors = lowrank.unpack_blob(raw, shape, groups, rec["name"])
        return lowrank.delta(shape, groups, s, factors)


class LowrankRotated(LowrankMixed):
    """lowrank-mixed whose stored vectors are R·v and R·u (``rotation.py``): Δ̂ = Rₘᵀ·Ẑᵤᵀ·diag(S)·Ẑᵥ·Rₙ."""

    number = Kind.LOWRANK_ROTATED
    ROTATION_KEYS = ("packing", "v_rotation", "u_rotation", "seed")

    @staticmethod
    def encode(shape, groups, s, factors, v_rotation: int, u_rotation: int, seed: int):
        params, raws = LowrankMixed.encode(shape, groups, s, factors)
        return {"packing": params["packing"], "v_rotation": int(v_rotation), "u_rotation": int(u_rotation),
                "seed": int(seed), "groups": params["groups"]}, raws

    @classmethod
    def parse_params(cls, rec, where) -> list:
        """The bit groups, after the params of spec 10.14 in the order of its table."""
        params = rec["params"]
        expected = {*cls.ROTATION_KEYS, "groups"}
        if set(params) != expected:
            unknown = sorted(set(params) - expected)
            raise IndexSchemaError(f"index: {where}.params: " + (f"unknown key {unknown[0]!r}" if unknown else
                                   f"missing required key {sorted(expected - set(params))[0]!r}"))
        scalar = {**rec, "params": {k: params[k] for k in cls.ROTATION_KEYS}}
        _check_params(scalar, where, {"packing": {Packing.LSB_FIRST}, "v_rotation": set(Rotation),
                                      "u_rotation": set(Rotation)}, {"seed": range(2**64)})
        return lowrank.parse_group_list(params["groups"], rec["shape"], where)

    def validate(self, rec, where):
        self._check_record(rec, where)
        groups = self.parse_params(rec, where)
        self._check_lengths(rec, where, [lowrank.blob_size(rec["shape"], groups)] if groups else [])

    def factors(self, rec, raws):
        """(Û (k, m), S, V̂ (k, n)) in float32, unrotated; and the stored (rotated) ones."""
        shape = tuple(rec["shape"])
        groups = self.parse_params(rec, rec["name"])
        raw = _one_raw(raws)
        if not groups:
            empty = (np.zeros((0, shape[0]), np.float32), np.zeros(0, np.float32), np.zeros((0, shape[1]), np.float32))
            return empty, empty
        s, factors = lowrank.unpack_blob(raw, shape, groups, rec["name"])
        zu, s, zv = lowrank.dequantized_factors(shape, groups, s, factors)
        p = rec["params"]
        u = rotation.unrotate(zu, p["seed"], "U") if p["u_rotation"] == Rotation.HADAMARD else zu
        v = rotation.unrotate(zv, p["seed"], "V") if p["v_rotation"] == Rotation.HADAMARD else zv
        return (u, s, v), (zu, s, zv)

    def delta(self, rec, raws) -> np.ndarray:
        (u, s, v), _ = self.factors(rec, raws)
        return (u.T * s) @ v


class SparseLowrank(AdditiveKind):
    """W_base + Û·diag(S)·V̂ᵀ with sparse singular vectors (ImPart; ``sparse_lowrank.py``)."""

    number = Kind.SPARSE_LOWRANK

    def _check_shape(self, rec, where):
        if max(rec["shape"]) > masks.MAX_VECTOR_LENGTH:  # vector elements j must fit the counter's 32 bits
            raise LimitError(f"{where}: vectors of {max(rec['shape'])} elements exceed the limit "
                             f"{masks.MAX_VECTOR_LENGTH}")

    def validate(self, rec, where):
        self._check_record(rec, where)
        mask, _, groups = sparse_lowrank.parse_params(rec["params"], rec["shape"], where)
        if not groups:
            self._check_lengths(rec, where, [])
            return
        low, high = sparse_lowrank.size_bounds(rec["shape"], groups, mask)
        self._check_lengths(rec, where, [high], low=low)

    def delta(self, rec, raws) -> np.ndarray:
        shape = tuple(rec["shape"])
        mask, seed, groups = sparse_lowrank.parse_params(rec["params"], shape, rec["name"])
        raw = _one_raw(raws)
        if not groups:
            return np.zeros(shape, dtype=np.float32)
        return sparse_lowrank.unpack_blob(raw, shape, groups, mask, seed, rec["name"]).delta(groups)


class Sign(AdditiveKind):
    """W_base + scale·sign(Δ) per row or per matrix (BitDelta)."""

    number = Kind.SIGN

    def validate(self, rec, where):
        self._check_record(rec, where)
        _check_params(rec, where, {"packing": {Packing.LSB_FIRST}, "scales": set(SignScales)})
        low, high = (sections.size(baseline_payloads.sign_layout(rec["shape"], rec["params"]["scales"], rows))
                     for rows in (0, rec["shape"][0]))
        self._check_lengths(rec, where, [high], low=low)

    def delta(self, rec, raws) -> np.ndarray:
        return baseline_payloads.sign_delta(_one_raw(raws), tuple(rec["shape"]), rec["params"]["scales"],
                                            rec["name"])


class Lowrank(AdditiveKind):
    """W_base + Û·diag(S)·V̂ᵀ, the top singular vectors in float16."""

    number = Kind.LOWRANK

    def validate(self, rec, where):
        self._check_record(rec, where)
        params = rec["params"]
        if set(params) != {"rank"}:
            raise IndexSchemaError(f"index: {where}.params: expected exactly the key 'rank'")
        if type(params["rank"]) is not int:
            raise IndexSchemaError(f"index: {where}.params.rank: expected an integer")
        if not 0 <= params["rank"] <= min(rec["shape"]):
            raise PayloadError(f"{where}: rank {params['rank']} not in 0..min(shape) = {min(rec['shape'])}")
        size = sections.size(baseline_payloads.lowrank_layout(rec["shape"], params["rank"]))
        self._check_lengths(rec, where, [size] if params["rank"] else [])

    def delta(self, rec, raws) -> np.ndarray:
        shape, rank = tuple(rec["shape"]), rec["params"]["rank"]
        raw = _one_raw(raws)
        if not rank:
            return np.zeros(shape, dtype=np.float32)
        return baseline_payloads.lowrank_delta(raw, shape, rank, rec["name"])


class Sparse(AdditiveKind):
    """W_base + the kept elements of Δ, rescaled by the encoder (DARE)."""

    number = Kind.SPARSE
    two_dimensional = False

    def validate(self, rec, where):
        self._check_record(rec, where)
        params = rec["params"]
        _check_params(rec, where, {"packing": {Packing.LSB_FIRST}, "mask": set(MaskEncoding)},
                      {"seed": range(2**64), "drop": range(masks.DROP_ALL + 1)})
        if params["mask"] == MaskEncoding.BITMASK and (params["seed"] or params["drop"]):
            raise PayloadError(f"{where}: a sparse record with a bitmask has seed 0 and drop 0")
        count = element_count(rec["shape"], where)
        low, high = (sections.size(baseline_payloads.sparse_layout(count, params["mask"], kept))
                     for kept in (0, count))
        self._check_lengths(rec, where, [high], low=low)

    def delta(self, rec, raws) -> np.ndarray:
        p = rec["params"]
        return baseline_payloads.sparse_delta(_one_raw(raws), tuple(rec["shape"]), p["mask"], p["seed"],
                                              p["drop"], rec["name"])


class Adapted(RecordKind):
    """An inner record against the base cast to the record's dtype, then the new rows whole (spec 10.13).

    For a fine-tune saved in another float dtype than its base, and for a tensor that
    grew along its first axis (a resized vocabulary): the inner record (any kind that
    reads the base) covers the base's rows, coded against the *adapted base*; the
    rows the base lacks follow as a dense array.
    """

    number = Kind.ADAPTED
    needs_base = True

    @staticmethod
    def encode(inner_kind: int, inner_params: dict, inner_raws: list, new_rows=None) -> tuple[dict, list]:
        """(params, raw blobs): the inner record's, then the new rows' dense array (a storage array)."""
        raws = list(inner_raws)
        layout = Layout.PLAIN
        if new_rows is not None and new_rows.size:
            layout = _layout_for(new_rows.size, new_rows.dtype.itemsize)
            raws += to_layout(lambda part: dtypes.unsigned_view(new_rows.reshape(-1)[part]), new_rows.size,
                              new_rows.dtype.itemsize, layout)
        return {"inner": int(inner_kind), "layout": int(layout), "inner_params": inner_params}, raws

    def validate(self, rec, where):  # spec 10.13: base reference, params, then blobs with the inner record's checks
        base = rec.get("base")
        if base is None:
            raise IndexSchemaError(f"index: {where}: an adapted record needs a base reference")
        check_adaptation(base["dtype"], base["shape"], rec["dtype"], rec["shape"], where)
        params = rec["params"]
        for key in params:
            if key not in ("inner", "layout", "inner_params"):
                raise IndexSchemaError(f"index: {where}.params: unknown key {key!r}")
        for key in ("inner", "layout", "inner_params"):
            if key not in params:
                raise IndexSchemaError(f"index: {where}.params: missing required key {key!r}")
        for key, legal in (("inner", set(INNER_KINDS)), ("layout", set(Layout))):
            if type(params[key]) is not int:
                raise IndexSchemaError(f"index: {where}.params.{key}: expected an integer")
            if params[key] not in legal:
                raise UnknownKindError(f"{where}.params.{key}: unknown value {params[key]}")
        if not isinstance(params["inner_params"], dict):
            raise IndexSchemaError(f"index: {where}.params.inner_params: expected a map")
        new = new_row_blobs(rec)
        if len(rec["blobs"]) < new:
            raise PayloadError(f"{where}: an adapted record with new rows in layout {params['layout']} has at "
                               f"least {new} blobs, this one {len(rec['blobs'])}")
        KINDS[params["inner"]].validate(inner(rec), f"{where} (inner {KIND_NAMES[params['inner']]} record)")
        if new:
            _check_dense_blobs(new_rows_record(rec), where, params["layout"])

    def _split(self, rec, raws) -> tuple[list, list]:
        raws = list(raws)
        cut = len(raws) - new_row_blobs(rec)
        return raws[:cut], raws[cut:]

    def check_payload(self, rec, raws) -> None:
        inner_raws, new_raws = self._split(rec, raws)
        KINDS[rec["params"]["inner"]].check_payload(inner(rec), inner_raws)

    def adapted_base(self, rec, base) -> np.ndarray:
        """The base tensor's rows cast to the record's dtype (spec 10.13 decoding step 1)."""
        read_base, count, _ = as_reader(base)
        values = read_base(slice(0, count)).reshape(rec["base"]["shape"])
        return cast(values, rec["base"]["dtype"], rec["dtype"])

    def decode(self, rec, raws, base):
        inner_raws, new_raws = self._split(rec, raws)
        rows = KINDS[rec["params"]["inner"]].decode(inner(rec), inner_raws, self.adapted_base(rec, base))
        if not new_raws:
            return rows.reshape(rec["shape"])
        new = new_rows_record(rec)
        values = _storage(_dense_values(new_raws, new, rec["params"]["layout"]), new)
        return np.concatenate([rows.reshape(inner(rec)["shape"]), values], axis=0)


def check_adaptation(base_dtype: str, base_shape, dtype: str, shape, where: str) -> None:
    """How an adapted record may differ from its base (spec 10.13): a cast between F32/F16/BF16, more
    rows along the first axis, or both, and nothing else (PayloadError)."""
    cast_ok = base_dtype == dtype or (base_dtype in CAST_DTYPES and dtype in CAST_DTYPES)
    base_shape, shape = tuple(base_shape), tuple(shape)
    same = base_shape == shape
    grown = (len(shape) >= 1 and len(base_shape) == len(shape) and base_shape[1:] == shape[1:]
             and base_shape[0] < shape[0])
    if not cast_ok or not (same or grown) or (same and base_dtype == dtype):
        raise PayloadError(f"{where}: an adapted record casts between {'/'.join(CAST_DTYPES)} or adds rows "
                           f"along the first axis: {dtype}{list(shape)} against a base of "
                           f"{base_dtype}{list(base_shape)}")


def adaptable(base_dtype: str, base_shape, dtype: str, shape) -> bool:
    """Whether an ``adapted`` record can code a tensor of ``dtype``/``shape`` against this base tensor."""
    try:
        check_adaptation(base_dtype, base_shape, dtype, shape, "")
    except PayloadError:
        return False
    return True


# The NaN an adapted base holds where the base has any NaN (spec 10.13 step 1): one bit pattern per
# dtype, so that the cast, and a dense-delta against it, are bit-exact on every platform.
CAST_NAN = {"F32": np.uint32(0x7FC00000), "F16": np.uint16(0x7E00), "BF16": np.uint16(0x7FC0)}


def cast(values: np.ndarray, from_dtype: str, to_dtype: str) -> np.ndarray:
    """Storage array of ``from_dtype`` elements cast to ``to_dtype``: widened exactly to float32, then
    rounded to nearest-even (spec 10.13 step 1, 10.7's rebuilding step 3), a NaN becoming the
    dtype's ``CAST_NAN``; unchanged if the same."""
    if from_dtype == to_dtype:
        return values
    wide = dtypes.to_float32(values, from_dtype)
    out = dtypes.from_float32(wide, to_dtype)
    nan = np.isnan(wide)
    if nan.any():
        out = out.copy() if not out.flags.writeable else out
        out.view(CAST_NAN[to_dtype].dtype)[nan] = CAST_NAN[to_dtype]
    return out


def inner(rec: dict) -> dict:
    """The inner record of an adapted record (spec 10.13): the base's shape, the record's dtype, its
    blobs but the new rows'; a base reference of that dtype and shape (its sha256 is never used)."""
    shape = list(rec["base"]["shape"])
    blobs = rec["blobs"][:len(rec["blobs"]) - new_row_blobs(rec)]
    return {"name": rec["name"], "kind": rec["params"]["inner"], "dtype": rec["dtype"], "shape": shape,
            "params": rec["params"]["inner_params"], "blobs": blobs,
            "base": {"dtype": rec["dtype"], "shape": shape, "sha256": rec["base"]["sha256"]}}


def new_rows_record(rec: dict) -> dict:
    """The new rows of an adapted record as a dense array's record (dtype, shape, its blobs)."""
    rows = rec["shape"][0] - rec["base"]["shape"][0] if rec["shape"] else 0
    cut = len(rec["blobs"]) - new_row_blobs(rec)
    return {"name": rec["name"], "dtype": rec["dtype"], "shape": [rows, *rec["shape"][1:]],
            "blobs": rec["blobs"][cut:]}


def new_row_blobs(rec: dict) -> int:
    """How many blobs the new rows of an adapted record take: 0 without growth, else 1 or w by layout."""
    if not rec["shape"] or rec["shape"][0] == rec["base"]["shape"][0]:
        return 0
    return 1 if rec["params"]["layout"] == Layout.PLAIN else dtypes.dtype(rec["dtype"]).itemsize


def coded_kind(rec: dict) -> int:
    """The kind that codes a record's values: an adapted record's inner kind, else its own."""
    if rec["kind"] == Kind.ADAPTED and isinstance(rec.get("params"), dict):
        return rec["params"].get("inner", rec["kind"])
    return rec["kind"]


def is_lossy(rec: dict) -> bool:
    """Whether the record only approximates the fine-tune's tensor (kinds 4–8, or adapted around one)."""
    return coded_kind(rec) in LOSSY_KINDS


def coded_params(rec: dict) -> int:
    """Elements a lossy method coded in the record: an adapted record's inner rows, else all."""
    if rec["kind"] == Kind.ADAPTED:
        return math.prod(rec["base"]["shape"])
    return math.prod(rec["shape"])


KINDS: dict[int, RecordKind] = {k.number: k for k in (DenseDelta(), Full(), Removed(), LowrankMixed(), SparseLowrank(),
                                                      Sign(), Lowrank(), Sparse(), Adapted(), LowrankRotated())}


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
