"""What the kernels read: one record's packed bytes and a table of where each part lies.

A record that stores a delta of a linear layer's weight (shape (m, n): out, in)
is loaded into one of three *families*, by how it is computed:

- ``FactorRecord``: Δ̂ = Û·diag(S)·V̂ᵀ in bit groups.  ``lowrank-mixed`` keeps the
  file's blob byte for byte (codes LSB-first, vector-major; float16 scales; packed
  zero points; spec 10.7); ``lowrank`` keeps its blob too (one group of float16
  vectors, ``bits`` 16).  ``sparse-lowrank`` (ImPart) is *expanded once at load*:
  a kept element's place among the stored values is its rank among the kept
  elements of its vector, a prefix count over the mask that a GPU thread holding
  element j cannot get without a scan over 0..j (and quantization groups run over
  kept elements, so they too move with the mask).  Expanded, the mask is gone:
  float16 groups become dense float16 vectors (zeros where dropped, bit-exact),
  quantized groups dense float32 vectors of their (q − z)·s (exact); the cost is
  2 or 4 bytes per element of Û and V̂ instead of the packed values, and the
  kernels stay the two of the other factor kinds.
- ``SignRecord``: BitDelta, Δ̂[a, b] = ±scale[a]; the file's blob, plus a row map
  (int32 per row: its row among the coded rows, −1 for a row of scale 0).
- ``DenseRecord``: anything else (``sparse``/DARE, exact kinds): Δ̂ decoded once into
  a dense float32 matrix, which is what serving such a delta costs.

Every payload is checked when loaded (padding, lengths, finite floats, by the
codec's own readers), so the kernels never read bytes the spec rejects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from dcm import baseline_payloads, lowrank, sections, sparse_lowrank
from dcm.constants import Kind, SignScales
from dcm.errors import UsageError

FLOAT16_BITS = 16  # a group whose "codes" are float16 values (no scales, no zero points)
FLOAT32_BITS = 32  # ... float32 values (expanded sparse-lowrank groups that were quantized)
FACTOR_KINDS = (Kind.LOWRANK_MIXED, Kind.LOWRANK, Kind.SPARSE_LOWRANK, Kind.LOWRANK_ROTATED)


@dataclass(frozen=True)
class Group:
    """One bit group: vectors [start, start+count) of the record, byte offsets into its blob."""

    start: int
    count: int
    bits: int  # 1..8, or 16 for float16 vectors
    group_size: int  # quantization group along a vector (0 for float16)
    v_codes: int
    v_scales: int
    v_zeros: int
    u_codes: int
    u_scales: int
    u_zeros: int


@dataclass
class FactorRecord:
    shape: tuple  # (m, n) = (out_features, in_features)
    rank: int
    blob: bytes  # S (rank float32) at offset 0, then the groups' sections
    groups: list[Group]
    kind: int
    rotation: tuple | None = None  # lowrank-rotated: (v_rotation, u_rotation, seed); the blob holds R·v, R·u

    @property
    def nbytes(self) -> int:
        return len(self.blob)


@dataclass
class SignRecord:
    shape: tuple
    blob: bytes  # the file's blob, then the row map (int32 per row) at ``rowmap``
    per_row: bool
    signs: int  # byte offset of the sign bits
    rowmap: int  # byte offset of the row map
    kind: int = Kind.SIGN

    @property
    def nbytes(self) -> int:
        return len(self.blob)


@dataclass
class DenseRecord:
    shape: tuple
    delta: np.ndarray = field(repr=False)  # (m, n) float32
    kind: int = Kind.SPARSE

    @property
    def nbytes(self) -> int:
        return self.delta.nbytes


def _one_blob(dcm_file, rec) -> bytes:
    raws = dcm_file.raw_blobs(rec)
    return raws[0] if raws else b""


def _offset(secs, name: str) -> int:
    return next(s.offset for s in secs if s.name == name)


def _mixed(dcm_file, rec) -> FactorRecord:
    groups = lowrank.parse_groups(rec.params, tuple(rec.shape), rec.name)
    return mixed_record(tuple(rec.shape), groups, _one_blob(dcm_file, rec), rec.name)


def mixed_record(shape, groups: list, blob: bytes, where: str = "record") -> FactorRecord:
    """A ``lowrank-mixed`` blob with its bit groups (``lowrank.BitGroup``), checked, as the kernels read it."""
    if groups:
        lowrank.unpack_blob(blob, shape, groups, where)  # checks padding, lengths, finite scales
    secs = lowrank.sections(shape, groups)
    out = []
    for gi, g in enumerate(groups):
        at = {what: _offset(secs, f"g{gi}.{what}") for what in
              ("V.codes", "V.scales", "V.zeros", "U.codes", "U.scales", "U.zeros")}
        out.append(Group(g.start, g.count, g.bits, g.group_size, at["V.codes"], at["V.scales"],
                         at["V.zeros"], at["U.codes"], at["U.scales"], at["U.zeros"]))
    return FactorRecord(tuple(shape), groups[-1].stop if groups else 0, bytes(blob), out, Kind.LOWRANK_MIXED)


def _rotated(dcm_file, rec) -> FactorRecord:
    """A lowrank-rotated record: the lowrank-mixed blob of the rotated vectors, and how they were rotated
    (the runtime rotates activations instead: ``rotation.py``)."""
    from dcm.records import LowrankRotated

    groups = LowrankRotated.parse_params({"params": rec.params, "shape": list(rec.shape)}, rec.name)
    out = mixed_record(tuple(rec.shape), groups, _one_blob(dcm_file, rec), rec.name)
    p = rec.params
    out.kind, out.rotation = Kind.LOWRANK_ROTATED, (p["v_rotation"], p["u_rotation"], p["seed"])
    return out


def _lowrank(dcm_file, rec) -> FactorRecord:
    shape, rank = tuple(rec.shape), rec.params["rank"]
    blob = _one_blob(dcm_file, rec)
    if not rank:
        return FactorRecord(shape, 0, b"", [], rec.kind)
    baseline_payloads.lowrank_factors(blob, shape, rank, rec.name)  # checks layout and finite values
    secs = baseline_payloads.lowrank_layout(shape, rank)
    group = Group(0, rank, FLOAT16_BITS, 0, _offset(secs, "V"), 0, 0, _offset(secs, "U"), 0, 0)
    return FactorRecord(shape, rank, bytes(blob), [group], rec.kind)


def _sparse_lowrank(dcm_file, rec) -> FactorRecord:
    shape = tuple(rec.shape)
    mask, seed, groups = sparse_lowrank.parse_params(rec.params, shape, rec.name)
    if not groups:
        return FactorRecord(shape, 0, b"", [], rec.kind)
    payload = sparse_lowrank.unpack_blob(_one_blob(dcm_file, rec), shape, groups, mask, seed, rec.name)
    u, v = payload.factors(groups)
    return expanded_record(shape, groups, payload.s, u, v)


def expanded_record(shape, groups, s, u, v) -> FactorRecord:
    """Dense factors Û (k, m), V̂ (k, n) in bit groups: float16 groups stay float16 (exact),
    quantized ones become float32 (their values (q − z)·s are float32 in the spec)."""
    parts, data = [("S", len(s) * 4)], {"S": np.asarray(s, dtype="<f4").tobytes()}
    for gi, g in enumerate(groups):
        dt = np.dtype("<f2") if g.bits == FLOAT16_BITS else np.dtype("<f4")
        for side, values in (("V", v), ("U", u)):
            data[f"g{gi}.{side}"] = np.ascontiguousarray(values[g.start:g.stop], dtype=dt).tobytes()
            parts.append((f"g{gi}.{side}", len(data[f"g{gi}.{side}"])))
    secs = sections.layout(parts)
    out = [Group(g.start, g.count, FLOAT16_BITS if g.bits == FLOAT16_BITS else FLOAT32_BITS, 0,
                 _offset(secs, f"g{gi}.V"), 0, 0, _offset(secs, f"g{gi}.U"), 0, 0) for gi, g in enumerate(groups)]
    return FactorRecord(tuple(shape), groups[-1].stop, sections.join(secs, data), out, Kind.SPARSE_LOWRANK)


def _sign(dcm_file, rec) -> SignRecord:
    m, n = shape = tuple(rec.shape)
    blob = _one_blob(dcm_file, rec)
    baseline_payloads.sign_delta(blob, shape, rec.params["scales"], rec.name)  # full check of the blob
    per_row = rec.params["scales"] == SignScales.ROW
    scales = np.frombuffer(blob, dtype="<f4", count=m if per_row else 1)
    coded = np.broadcast_to(scales != 0, (m,)) if per_row else np.full(m, scales[0] != 0)
    rowmap = np.where(coded, np.cumsum(coded) - 1, -1).astype("<i4")
    secs = baseline_payloads.sign_layout(shape, rec.params["scales"], int(coded.sum()))
    at = -(-len(blob) // 4) * 4
    full = bytes(blob) + bytes(at - len(blob)) + rowmap.tobytes()
    return SignRecord(shape, full, per_row, _offset(secs, "signs"), at)


def transposed(rec):
    """The same delta for a layer that stores its weight transposed (GPT-2's ``Conv1D``: in × out).

    The kernels compute y += x·Δ̂ᵀ for a weight of shape (out, in).  A record of an
    (in, out) weight has Δ̂ = Û·diag(S)·V̂ᵀ with Û along the inputs and V̂ along the
    outputs, so Δ̂ᵀ = V̂·diag(S)·Ûᵀ: the same bytes with the roles of the factors
    swapped (the shrink reads Û, the expand V̂); nothing is copied.  A sign record
    (one scale per *input* row) has no such form and becomes a dense Δ̂ᵀ; a dense
    record is transposed.
    """
    if isinstance(rec, FactorRecord):
        if rec.rotation is not None:
            raise UsageError("a lowrank-rotated record cannot be transposed: load it with load_record(..., "
                             "transpose=True)")
        groups = [replace(g, v_codes=g.u_codes, v_scales=g.u_scales, v_zeros=g.u_zeros,
                          u_codes=g.v_codes, u_scales=g.v_scales, u_zeros=g.v_zeros) for g in rec.groups]
        return FactorRecord(tuple(rec.shape[::-1]), rec.rank, rec.blob, groups, rec.kind)
    if isinstance(rec, DenseRecord):
        return DenseRecord(tuple(rec.shape[::-1]), np.ascontiguousarray(rec.delta.T), rec.kind)
    raise UsageError(f"a {type(rec).__name__} cannot be transposed: load it with load_record(..., transpose=True)")


def load_record(dcm_file, name: str, base_weight: np.ndarray | None = None, *, transpose: bool = False):
    """The packed form of record ``name`` of an open file, for a linear layer's weight.

    ``base_weight`` (the base tensor as a storage array) is only needed for kinds
    that are not additive (dense-delta, full), which load as a dense Δ̂.
    ``transpose``: the record is of a weight stored in × out (``Conv1D``); the
    result is in the kernels' (out, in) orientation (see ``transposed``).
    """
    rec = dcm_file.record(name)
    if rec.kind == Kind.ADAPTED:
        # The inner record: the base's rows, coded against the base cast to the record's dtype (spec
        # 10.13). The layer adds its Δ̂ to the base as the model holds it; new rows are the caller's.
        rec = dcm_file.inner_record(name)
        if rec.kind not in (Kind.LOWRANK_MIXED, Kind.LOWRANK, Kind.SPARSE_LOWRANK, Kind.SIGN, Kind.SPARSE,
                            Kind.LOWRANK_ROTATED):
            raise UsageError(f"{dcm_file.path}: tensor {name!r}: an adapted {rec.kind_name} record stores no "
                             f"delta to serve: decode it")
    if len(rec.shape) != 2:
        raise UsageError(f"{dcm_file.path}: tensor {name!r} of shape {list(rec.shape)} is not a linear weight")
    loaders = {Kind.LOWRANK_MIXED: _mixed, Kind.LOWRANK: _lowrank, Kind.SPARSE_LOWRANK: _sparse_lowrank,
               Kind.SIGN: _sign, Kind.LOWRANK_ROTATED: _rotated}
    # A sign record (scales per input row) and a rotated one (its rotations belong to the sides of the
    # stored orientation) of an in × out weight load as a dense Δ̂ᵀ instead (see ``transposed``).
    dense_when_transposed = (Kind.SIGN, Kind.LOWRANK_ROTATED)
    if rec.kind in loaders and not (transpose and rec.kind in dense_when_transposed):
        out = loaders[rec.kind](dcm_file, rec)
    elif rec.kind in loaders or rec.kind == Kind.SPARSE:
        out = DenseRecord(tuple(rec.shape), dcm_file.stored_delta(name).reshape(rec.shape), rec.kind)
    elif base_weight is None:
        raise UsageError(f"tensor {name!r} ({rec.kind_name}) needs its base tensor to load as a delta")
    else:
        out = DenseRecord(tuple(rec.shape), dcm_file.delta(name, base_weight), rec.kind)
    return transposed(out) if transpose else out
