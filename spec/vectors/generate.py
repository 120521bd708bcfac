"""Write the conformance vectors of spec section 19, byte for byte.

    python spec/vectors/generate.py            # (re)write spec/vectors/
    python spec/vectors/generate.py --check    # exit 1 if a committed file differs or is missing

Everything comes from fixed seeds and integer arithmetic: tensor values are
built from a SplitMix64 stream so that every float is exactly representable,
and zstd frames are written here by hand (raw and RLE blocks; one compressed
frame is a constant made once by libzstd), so no library version changes a
byte.  The container is assembled here as well, not by ``dcm``'s writer, so
that the faulty vectors can break any rule.  Payloads of the lossy kinds are
packed with ``dcm``'s packers; the expected codes and factors are computed
here from the values the generator chose, and ``spec/reference/`` decodes
the same files independently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import msgpack
import numpy as np

from dcm import dtypes, errors, lowrank, masks, sparse_lowrank
from dcm.baseline_payloads import pack_lowrank, pack_sign, pack_sparse
from dcm.lowrank import BitGroup, Factor
from dcm.sparse_lowrank import Payload, Values

ROOT = Path(__file__).resolve().parent
MAGIC = b"\x89DCM\r\n\x1a\n"
HEADER = struct.Struct("<8sHHIIIQQ20sI")
CREATOR = "dcm conformance vectors 1"
NP_DTYPE = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "U8": "<u1", "I32": "<i4"}
KIND_NAMES = {1: "dense-delta", 2: "full", 3: "removed", 4: "lowrank-mixed", 5: "sparse-lowrank", 6: "sign",
              7: "lowrank", 8: "sparse", 9: "adapted", 10: "lowrank-rotated"}


# --- deterministic numbers --------------------------------------------------------------------


class Stream:
    """SplitMix64 outputs 0, 1, 2, ... of a seed: the generator's only source of randomness."""

    def __init__(self, seed: int):
        self.seed, self.counter = seed, 0

    def u32(self, count: int) -> np.ndarray:
        out = masks.uniform32(self.seed, np.arange(self.counter, self.counter + count, dtype=np.uint64))
        self.counter += count
        return out.astype(np.int64)

    def ints(self, count: int, low: int, high: int) -> np.ndarray:
        """``count`` integers in [low, high)."""
        return low + self.u32(count) % (high - low)

    def floats(self, shape, dtype: str, scale_bits: int = 6) -> np.ndarray:
        """Values k / 2^scale_bits with |k| < 128: exact in every float dtype (BF16 as bit patterns)."""
        count = int(np.prod(shape, dtype=np.int64))
        values = (self.ints(count, -127, 128) / 2.0**scale_bits).astype(np.float32).reshape(shape)
        return storage(values, dtype)


def storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values (exact in ``dtype``) as the dtype's storage array."""
    if dtype == "BF16":
        return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype("<u2")
    return np.asarray(values).astype(NP_DTYPE[dtype])


def as_float64(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return array.astype(np.float64)


def sha(data) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


# --- zstd frames, by hand (RFC 8878) ------------------------------------------------------------

# A frame made once by libzstd 1.5.7 (level 19, content checksum) whose content is
# bytes(range(32)) * 4 + bytes(64): a frame with a compressed block and a checksum.
LIBZSTD_FRAME = bytes.fromhex(
    "28b52ffd24c06501001402000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f0002"
    "007325011f937a0205b0bbc3")
LIBZSTD_CONTENT = bytes(range(32)) * 4 + bytes(64)


FCS_FLAG = {1: 0, 2: 1, 4: 2, 8: 3}  # Frame_Content_Size field bytes -> Frame_Content_Size_Flag
DID_FLAG = {1: 1, 2: 2, 4: 3}  # Dictionary_ID field bytes -> Dictionary_ID_Flag


def zstd_frame(raw: bytes, *, content_size: int | None = -1, window_log: int | None = None, rle: bool = False,
               dict_id: int | None = None, fcs_bytes: int = 8, did_bytes: int = 2, window_mantissa: int = 0,
               extra_bits: int = 0) -> bytes:
    """One frame of raw (or RLE, when the content is one repeated byte) blocks (RFC 8878 3.1.1).

    ``content_size``: -1 for len(raw), None to leave Frame_Content_Size out,
    or a number to declare (a lie, for faulty vectors).  ``window_log`` None
    makes a single-segment frame (no Window_Descriptor).  ``fcs_bytes``: the
    Frame_Content_Size field's size (1 only in a single-segment frame; 2 stores
    the size minus 256); ``did_bytes``: the Dictionary_ID field's size when
    ``dict_id`` is given; ``extra_bits``: bits OR-ed into the
    Frame_Header_Descriptor (0x10 the unused bit, 0x08 the reserved bit).
    """
    declared = len(raw) if content_size == -1 else content_size
    single = window_log is None and declared is not None
    if declared is None:
        fcs_flag, fcs = 0, b""
    else:
        fcs_flag = FCS_FLAG[fcs_bytes]
        fcs = (declared - (256 if fcs_bytes == 2 else 0)).to_bytes(fcs_bytes, "little")
    did_flag, did = (0, b"") if dict_id is None else (DID_FLAG[did_bytes], dict_id.to_bytes(did_bytes, "little"))
    head = bytes([(fcs_flag << 6) | (single << 5) | extra_bits | did_flag])
    window = b"" if single else bytes([(window_log - 10) << 3 | window_mantissa])
    block = 131072 if window_log is None else min(131072, 1 << window_log)
    return b"\x28\xb5\x2f\xfd" + head + window + did + fcs + _blocks(raw, rle, block)


def zero_frame(size: int) -> bytes:
    """A single-segment frame of ``size`` zero bytes in RLE blocks, built without holding them."""
    blocks, left = [], size
    while left:
        chunk = min(131072, left)
        left -= chunk
        blocks.append((int(left == 0) | 1 << 1 | chunk << 3).to_bytes(3, "little") + b"\0")
    return b"\x28\xb5\x2f\xfd" + bytes([3 << 6 | 1 << 5]) + struct.pack("<Q", size) + b"".join(blocks)


def _blocks(raw: bytes, rle: bool, size: int) -> bytes:
    """Raw blocks, or RLE blocks where ``rle`` and a chunk is one repeated byte."""
    chunks = [raw[i:i + size] for i in range(0, len(raw), size)] or [b""]
    out = b""
    for i, chunk in enumerate(chunks):
        last = int(i == len(chunks) - 1)
        if rle and chunk and chunk == chunk[:1] * len(chunk):
            out += (last | 1 << 1 | len(chunk) << 3).to_bytes(3, "little") + chunk[:1]
        else:
            out += (last | len(chunk) << 3).to_bytes(3, "little") + chunk
    return out


# --- rANS streams, by hand (spec 8.2) ------------------------------------------------------------

# A stream made once by libhtscodecs 1.3.0 (rans_compress_to_4x16, order 0, 32 states) of
# HTSCODECS_CONTENT: the library's own frequency normalisation, and renormalisation words.
HTSCODECS_CONTENT = bytes((i * i + 3 * i) % 7 for i in range(2000))
HTSCODECS_STREAM = bytes.fromhex(
    "048f500003040100844c822484498447f431d60307eaad03c7e6630371788203b2619203935d6a03ef5ccc03f431d603"
    "07eaad03c7e6630371788203b2619203935d6a03ef5ccc03f431d60307eaad03a7e5f800c3ca1401bc001a01c30d0d01"
    "9fbf7b00cfa3000142880601a7e5f800c3ca1401bc001a01c30d0d019fbf7b00cfa3000142880601a7e5f800c3ca1401"
    "7699042a33a360ae2dbff8237699042a33a360ae2dbff8237699042a33a360ae2dbff8237699042a33a360ae2dbff823"
    "7699042a33a31d9e1d9e1d9e1d9e1d9e8d3b78dc91d0264b61e5f718db528d3b78dc91d0264b61e5f718db528d3b78dc"
    "91d0264b61e5f718db528d3b78dc91d0264b61e5f718db528d3b78dc91d0264b2dbf2dbf2dbf2dbf12bd6fa3a19aa8a5"
    "52a2f9cc12bd6fa3a19aa8a552a2f9cc12bd6fa3a19aa8a552a2f9cc12bd6fa3a19aa8a552a2f9cc12bd6fa3a19aa8a5"
    "de9cfa18de9cfa18de9cfa18de9cfa18de9cf34360aea48bee66c516f34360aea48bee66c516f34360aea48bee66c516"
    "f34360aea48bee66c516f34360aea48bf6d08caa5be5d9884c02d5bbb2bcf6d08caa5be5d9884c02d5bbb2bcf6d08caa"
    "5be5d9884c02d5bbb2bcf6d08caa5be5d9884c02d5bbb2bcf6d08caa5be5d988022459ac379f98506a2b448632090224"
    "59ac379f98506a2b44863209022459ac379f98506a2b44863209022459ac379f98506a2b44863209022459ac379f9850"
    "3c1b32698a53245e10dff8003c1b32698a53245e10dff8003c1b32698a53245e10dff8003c1b32698a53245e10dff800"
    "3c1b32698a53ac6eac6eac6eac6eac6e")


def uint7(value: int) -> bytes:
    """8.2's uint7: 7-bit groups, most significant first, bit 7 set on all but the last byte."""
    groups = []
    while True:
        groups.append(value & 0x7F)
        value >>= 7
        if not value:
            break
    groups.reverse()
    return bytes([g | 0x80 for g in groups[:-1]] + [groups[-1]])


def rans_symbols(present) -> bytes:
    """The symbol list of 8.2: a symbol whose predecessor occurs is followed by a run count."""
    out, run = [], 0
    for j in range(256):
        if j not in present:
            continue
        if run:
            run -= 1
            continue
        out.append(j)
        if j and j - 1 in present:
            r = j + 1
            while r < 256 and r in present:
                r += 1
            run = r - (j + 1)
            out.append(run)
    return bytes(out + [0])


def rans_frequencies(raw: bytes) -> dict:
    """Counts scaled to a power-of-two total (the smallest ≥ len(raw), at most 4096), each ≥ 1."""
    counts = np.bincount(np.frombuffer(raw, np.uint8), minlength=256)
    total = min(4096, 1 << max(0, (len(raw) - 1).bit_length()))
    freqs = {int(sym): max(1, int(c) * total // len(raw)) for sym, c in enumerate(counts) if c}
    top = max(freqs, key=lambda sym: (counts[sym], -sym))
    freqs[top] += total - sum(freqs.values())
    assert freqs[top] >= 1 and sum(freqs.values()) == total
    return freqs


def rans_stream(raw: bytes, lanes: int = 32, freqs: dict | None = None) -> bytes:
    """An order-0 rANS stream of ``raw`` (8.2): encoded backwards from states 2^15, one word at most
    per symbol, words in the order the decoder reads them."""
    freqs = rans_frequencies(raw) if freqs is None else freqs
    total = sum(freqs.values())
    scaled = {sym: f * (4096 // total) for sym, f in freqs.items()}
    cum, acc = {}, 0
    for sym in sorted(scaled):
        cum[sym], acc = acc, acc + scaled[sym]
    x, words = [1 << 15] * lanes, []
    for i in reversed(range(len(raw))):
        j, f = i % lanes, scaled[raw[i]]
        if x[j] >= (1 << 19) * f:
            words.append(x[j] & 0xFFFF)
            x[j] >>= 16
        x[j] = ((x[j] // f) << 12) + x[j] % f + cum[raw[i]]
    words.reverse()
    return (bytes([0x04 if lanes == 32 else 0x00]) + uint7(len(raw)) + rans_symbols(set(freqs))
            + b"".join(uint7(freqs[sym]) for sym in sorted(freqs)) + struct.pack(f"<{lanes}I", *x)
            + struct.pack(f"<{len(words)}H", *words))


def rans(raw: bytes, lanes: int = 32, freqs: dict | None = None) -> Blob:
    return Blob(raw, rans_stream(raw, lanes, freqs), coding=2)


# --- records and the container ----------------------------------------------------------------


@dataclass
class Blob:
    raw: bytes
    stored: bytes | None = None  # None: stored raw; else the stored bytes (a zstd frame, or a rANS stream)
    raw_length: int | None = None  # declared instead of len(raw) (a frame too large to hold its content)
    coding: int | None = None  # the encoding when it is not what ``stored`` implies (2: rans)

    @property
    def encoding(self) -> int:
        if self.coding is not None:
            return self.coding
        return 0 if self.stored is None else 1


def zstd(raw: bytes, **kw) -> Blob:
    return Blob(raw, zstd_frame(raw, **kw))


@dataclass
class Record:
    name: str
    kind: int
    dtype: str
    shape: tuple
    params: dict
    blobs: list
    base: np.ndarray | None = None  # the base tensor (storage array), None when the base lacks the name
    base_dtype: str | None = None
    expected: dict | None = None  # codes, factors, delta (float64) or exact tensor


@dataclass
class File:
    records: list
    attachments: list = field(default_factory=list)  # (name, Blob)
    alignment: int = 64
    minor: int = 2
    metadata: dict | None = None
    top_ext: dict | None = None


def base_ref(rec: Record) -> dict:
    return {"dtype": rec.base_dtype or rec.dtype, "shape": list(rec.base.shape),
            "sha256": hashlib.sha256(rec.base.tobytes()).digest()}


def base_digest(records) -> bytes:
    h = hashlib.sha256()
    for rec in records:
        if rec.base is not None:
            h.update(rec.name.encode() + b"\0" + base_ref(rec)["sha256"])
    return h.digest()


def blob_entry(blob: Blob, offset: int) -> dict:
    stored = blob.raw if blob.stored is None else blob.stored
    raw_length = len(blob.raw) if blob.raw_length is None else blob.raw_length
    return {"offset": offset, "length": len(stored), "encoding": blob.encoding, "raw_length": raw_length,
            "crc32": zlib.crc32(stored)}


def index_of(f: File) -> tuple[dict, list[bytes]]:
    """The index map and the stored bytes of every blob in file order."""
    stored, end = [], 0
    entries = []

    def place(blob: Blob) -> dict:
        nonlocal end
        offset = -(-end // f.alignment) * f.alignment
        entry = blob_entry(blob, offset)
        stored.append((offset, blob.raw if blob.stored is None else blob.stored))
        end = offset + entry["length"]
        return entry

    for rec in f.records:
        entry = {"name": rec.name, "kind": rec.kind, "dtype": rec.dtype, "shape": list(rec.shape),
                 "params": rec.params, "blobs": [place(b) for b in rec.blobs]}
        if rec.base is not None:
            entry["base"] = base_ref(rec)
        entries.append(entry)
    index = {"format": [1, f.minor], "creator": CREATOR,
             "method": {"name": "conformance", "params": {}},
             "base": {"digest": base_digest(f.records)}, "tensors": entries}
    if f.attachments:
        index["attachments"] = [{"name": name, "blob": place(blob)} for name, blob in f.attachments]
    if f.metadata is not None:
        index["checkpoint_metadata"] = f.metadata
    if f.top_ext is not None:
        index["ext"] = f.top_ext
    return index, stored


@dataclass
class Edits:
    """How a faulty vector departs from its valid source; each step is optional."""

    index: Callable[[dict], None] | None = None  # edit the index map (after offsets and CRCs)
    index_bytes: Callable[[bytes], bytes] | None = None  # edit the packed index
    header: Callable[[dict], None] | None = None  # edit header fields (then the CRC is recomputed)
    data: Callable[[bytearray, int], None] | None = None  # edit the data section (bytearray, data start)
    final: Callable[[bytes], bytes] | None = None  # edit the finished file (no CRC recomputed)


def assemble(f: File, edits: Edits = Edits()) -> bytes:
    index, stored = index_of(f)
    if edits.index:
        edits.index(index)
    index_bytes = msgpack.packb(index, use_bin_type=True)
    if edits.index_bytes:
        index_bytes = edits.index_bytes(index_bytes)
    data_start = -(-(64 + len(index_bytes)) // f.alignment) * f.alignment
    data = bytearray()
    for offset, raw in stored:
        data += bytes(offset - len(data)) + raw
    if not stored:
        data_start = 64 + len(index_bytes)
    if edits.data:
        edits.data(data, data_start)
    head = {"magic": MAGIC, "major": 1, "minor": f.minor, "required": 0, "optional": 0, "alignment": f.alignment,
            "index_length": len(index_bytes), "file_length": data_start + len(data), "reserved": bytes(20)}
    if edits.header:
        edits.header(head)
    fields = HEADER.pack(*head.values(), 0)[:60]
    out = fields + struct.pack("<I", zlib.crc32(fields + index_bytes)) + index_bytes
    out += bytes(data_start - len(out)) + bytes(data)
    return edits.final(out) if edits.final else out


# --- safetensors bases -------------------------------------------------------------------------


def safetensors_bytes(tensors: dict) -> bytes:
    """A safetensors file of (dtype, storage array) in the given order."""
    header, offset, body = {}, 0, b""
    for name, (dtype, array) in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        offset, body = offset + len(raw), body + raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def base_file(f: File) -> bytes:
    return safetensors_bytes({r.name: (r.base_dtype or r.dtype, r.base) for r in f.records if r.base is not None})


# --- records of each kind, with what a decoder must get from them ---------------------------------


def maybe_zstd(raw: bytes, compress: bool) -> Blob:
    return zstd(raw) if compress else Blob(raw)


def dense_array_blobs(values: np.ndarray, layout: int, compress: bool) -> list:
    """The dense array in ``plain`` (one blob) or ``byte-planes`` (one blob per byte) layout (10.2)."""
    raw = np.ascontiguousarray(values).reshape(-1)
    if layout == 0:
        return [maybe_zstd(raw.tobytes(), compress)]
    planes = raw.view(np.uint8).reshape(-1, raw.dtype.itemsize)
    return [maybe_zstd(planes[:, k].tobytes(), compress) for k in range(raw.dtype.itemsize)]


def dense_delta(name, dtype, base, ft, *, layout=0, compress=False) -> Record:
    bits = 8 * base.dtype.itemsize
    top = (1 << bits) - 1
    f, b = dtypes.unsigned_view(ft).astype(object), dtypes.unsigned_view(base).astype(object)
    d = (f - b) & top
    codes = np.array(((d << 1) ^ (0 - (d >> (bits - 1)))) & top, dtype=f"<u{bits // 8}").reshape(ft.shape)
    return Record(name, 1, dtype, ft.shape, {"transform": 1, "layout": layout},
                  dense_array_blobs(codes, layout, compress), base,
                  expected={"codes": codes.tobytes(), "count": codes.size, "tensor": ft})


def full(name, dtype, ft, *, base=None, base_dtype=None, layout=0, compress=False) -> Record:
    return Record(name, 2, dtype, ft.shape, {"layout": layout}, dense_array_blobs(ft, layout, compress), base,
                  base_dtype, expected={"codes": ft.tobytes(), "count": ft.size, "tensor": ft})


def removed(name, dtype, base) -> Record:
    return Record(name, 3, dtype, base.shape, {}, [], base, expected={})


def product(u: np.ndarray, s: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σᵢ ûᵢ sᵢ v̂ᵢᵀ in float64 and the tolerance of spec 10.7, both (m, n)."""
    terms = (u.T.astype(np.float64)[:, None, :] * s.astype(np.float64)) * v.T.astype(np.float64)[None, :, :]
    k = s.size
    return terms.sum(axis=2), (k + 2) * 2.0**-23 * np.abs(terms).sum(axis=2)


def lossy(rec: Record, codes: bytes, count: int, factors: np.ndarray, delta, bound) -> Record:
    rec.expected = {"codes": codes, "count": count, "factors": np.asarray(factors, "<f4").tobytes(),
                    "factor_count": int(np.asarray(factors).size), "delta": delta, "bound": bound}
    return rec


def random_scales(rng: Stream, count: int) -> np.ndarray:
    """float16 scales ±k/1024, k in 1..255, negative ones included (spec 10.7 allows them)."""
    k = rng.ints(count, 1, 256) * np.where(rng.ints(count, 0, 8) == 0, -1, 1)
    return (k / 1024.0).astype("<f2")


def quantized(rng: Stream, vectors: int, length: int, bits: int, group_size: int) -> Factor:
    ng = -(-length // group_size)
    codes = rng.ints(vectors * length, 0, 1 << bits).astype(np.uint8).reshape(vectors, length)
    zeros = rng.ints(vectors * ng, 0, 1 << bits).astype(np.uint8).reshape(vectors, ng)
    return Factor(codes, random_scales(rng, vectors * ng).reshape(vectors, ng), zeros)


def dequantized(f: Factor, group_size: int) -> np.ndarray:
    """(q − z)·s in float32, per spec 10.7."""
    per_element = np.arange(f.codes.shape[1]) // group_size
    return (f.codes.astype(np.float32) - f.zeros[:, per_element].astype(np.float32)) \
        * f.scales[:, per_element].astype(np.float32)


def singular_values(rng: Stream, k: int) -> np.ndarray:
    return (rng.ints(k, 1, 4096) / 256.0).astype("<f4")[::-1].copy() if k else np.zeros(0, "<f4")


def lowrank_mixed(rng: Stream, name, dtype, base, groups, *, compress=False) -> Record:
    m, n = base.shape
    groups = [BitGroup(*g) for g in groups]
    s = singular_values(rng, groups[-1].stop if groups else 0)
    pairs = [(quantized(rng, g.count, n, g.bits, g.group_size), quantized(rng, g.count, m, g.bits, g.group_size))
             for g in groups]
    return lowrank_mixed_record(name, dtype, base, groups, s, pairs, compress=compress)


def lowrank_mixed_record(name, dtype, base, groups, s, pairs, *, compress=False) -> Record:
    m, n = base.shape
    k = s.size
    u, v, codes = np.zeros((k, m), np.float32), np.zeros((k, n), np.float32), b""
    for g, (fv, fu) in zip(groups, pairs):
        v[g.start:g.stop], u[g.start:g.stop] = dequantized(fv, g.group_size), dequantized(fu, g.group_size)
        codes += b"".join(a.astype(np.uint8).tobytes() for a in (fv.codes, fv.zeros, fu.codes, fu.zeros))
    params = {"packing": 1, "groups": [g.as_param() for g in groups]}
    blobs = [maybe_zstd(lowrank.pack_blob(base.shape, groups, s, pairs), compress)] if groups else []
    rec = Record(name, 4, dtype, base.shape, params, blobs, base)
    return lossy(rec, codes, len(codes), np.concatenate([s, v.ravel(), u.ravel()]), *product(u, s, v))


def hadamard_back(z: np.ndarray, seed: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """10.14's Rᵀ·ẑ of each row in float64, by its formula (H_b[p, q] = (−1)^popcount(p AND q)), and
    the magnitudes (1/√b)·Σ|ẑ| over each element's block that the tolerance uses."""
    k, length = z.shape
    b = length & -length
    c0 = 0 if side == "V" else 1 << 32
    d = np.where(masks.uniform32(seed, np.arange(length, dtype=np.uint64) + np.uint64(c0)) >= 2**31, -1.0, 1.0)
    h = np.array([[(-1.0) ** bin(p & q).count("1") for q in range(b)] for p in range(b)])
    blocks = z.astype(np.float64).reshape(k, length // b, b)
    back = (blocks @ h.T / np.sqrt(b)).reshape(k, length) * d
    magnitude = np.repeat(np.abs(blocks).sum(axis=2) / np.sqrt(b), b, axis=1)
    return back, magnitude


def lowrank_rotated(rng: Stream, name, dtype, base, groups, *, v_rotation: int, u_rotation: int, seed: int,
                    compress=False) -> Record:
    """A lowrank-rotated record (10.14): the stored vectors are random codes, as for lowrank-mixed."""
    m, n = base.shape
    groups = [BitGroup(*g) for g in groups]
    s = singular_values(rng, groups[-1].stop if groups else 0)
    pairs = [(quantized(rng, g.count, n, g.bits, g.group_size), quantized(rng, g.count, m, g.bits, g.group_size))
             for g in groups]
    k = s.size
    zu, zv, codes = np.zeros((k, m), np.float32), np.zeros((k, n), np.float32), b""
    for g, (fv, fu) in zip(groups, pairs):
        zv[g.start:g.stop], zu[g.start:g.stop] = dequantized(fv, g.group_size), dequantized(fu, g.group_size)
        codes += b"".join(a.astype(np.uint8).tobytes() for a in (fv.codes, fv.zeros, fu.codes, fu.zeros))
    params = {"packing": 1, "v_rotation": v_rotation, "u_rotation": u_rotation, "seed": seed,
              "groups": [g.as_param() for g in groups]}
    blobs = [maybe_zstd(lowrank.pack_blob(base.shape, groups, s, pairs), compress)] if groups else []
    rec = Record(name, 10, dtype, base.shape, params, blobs, base)
    v, v_mag = hadamard_back(zv, seed, "V") if v_rotation else (zv.astype(np.float64), np.abs(zv))
    u, u_mag = hadamard_back(zu, seed, "U") if u_rotation else (zu.astype(np.float64), np.abs(zu))
    beta = sum((length & -length) + 2 for length, rot in ((m, u_rotation), (n, v_rotation)) if rot)
    s64 = s.astype(np.float64)
    delta = (u.T * s64) @ v
    bound = (k + 2 + beta) * 2.0**-23 * ((u_mag.T * np.abs(s64)) @ v_mag)
    return lossy(rec, codes, len(codes), np.concatenate([s, zv.ravel(), zu.ravel()]), delta, bound)


def sparse_values(rng: Stream, g: BitGroup, keep: np.ndarray) -> tuple[Values, np.ndarray, bytes]:
    """(Values, dense float32 vectors, codes) of one side of one bit group."""
    counts = keep.sum(axis=1)
    dense = np.zeros(keep.shape, np.float32)
    if g.bits == 16:
        vals = storage(rng.ints(int(counts.sum()), -127, 128) / 64.0, "F16")
        dense[keep] = vals.astype(np.float32)
        return Values(vals), dense, b""
    qg = int((-(-counts // g.group_size)).sum())
    codes = rng.ints(int(counts.sum()), 0, 1 << g.bits).astype(np.uint8)
    zeros = rng.ints(qg, 0, 1 << g.bits).astype(np.uint8)
    scales = random_scales(rng, qg)
    gid = sparse_lowrank.group_ids(counts, g.group_size)
    dense[keep] = (codes.astype(np.float32) - zeros[gid].astype(np.float32)) * scales[gid].astype(np.float32)
    return Values(codes, scales, zeros), dense, codes.tobytes() + zeros.tobytes()


def sparse_lowrank_rec(rng: Stream, name, dtype, base, groups, *, mask, seed=0, drops=None,
                       keep_share=0.5, compress=False) -> Record:
    m, n = base.shape
    groups = [BitGroup(*g) for g in groups]
    k = groups[-1].stop if groups else 0
    s = singular_values(rng, k)
    if mask == 1:
        drops = np.asarray(drops, dtype="<u4")
        v_keep, u_keep = sparse_lowrank.hash_keep(seed, drops, base.shape)
    else:
        limit = int(keep_share * 2**32)
        v_keep = rng.u32(k * n).reshape(k, n) < limit
        u_keep = rng.u32(k * m).reshape(k, m) < limit
    u, v = np.zeros((k, m), np.float32), np.zeros((k, n), np.float32)
    values, codes = [], v_keep.astype(np.uint8).tobytes() + u_keep.astype(np.uint8).tobytes()
    for g in groups:
        vv, v[g.start:g.stop], vc = sparse_values(rng, g, v_keep[g.start:g.stop])
        uv, u[g.start:g.stop], uc = sparse_values(rng, g, u_keep[g.start:g.stop])
        values.append((vv, uv))
        codes += vc + uc
    params = {"packing": 1, "mask": mask, "seed": seed, "groups": [g.as_param() for g in groups]}
    blobs = []
    if groups:
        payload = Payload(s, drops if mask == 1 else None, v_keep, u_keep, values)
        blobs = [maybe_zstd(sparse_lowrank.pack_blob(base.shape, groups, mask, payload), compress)]
    rec = Record(name, 5, dtype, base.shape, params, blobs, base)
    return lossy(rec, codes, len(codes), np.concatenate([s, v.ravel(), u.ravel()]), *product(u, s, v))


def exact_additive(rec: Record, codes: bytes, factors: np.ndarray, delta: np.ndarray) -> Record:
    """Kinds 6 and 8: Δ̂ is exact in float32, so the rebuilt tensor is exact too."""
    base32 = as_float64(rec.base, rec.dtype).astype(np.float32)
    rebuilt = dtypes.from_float32(base32 + delta.astype(np.float32), rec.dtype)
    rec.expected = {"codes": codes, "count": len(codes), "factors": np.asarray(factors, "<f4").tobytes(),
                    "factor_count": int(np.asarray(factors).size), "tensor": rebuilt}
    return rec


def sign_rec(rng: Stream, name, dtype, base, *, per_row: bool, zero_rows=(), compress=False) -> Record:
    m, n = base.shape
    scales = (rng.ints(m if per_row else 1, 1, 512) / 4096.0).astype("<f4")
    for row in zero_rows:
        scales[row] = 0.0
    positive = rng.ints(m * n, 0, 2).astype(np.uint8).reshape(m, n)
    return sign_record(name, dtype, base, scales, positive, per_row=per_row, compress=compress)


def sign_record(name, dtype, base, scales, positive, *, per_row: bool, compress=False) -> Record:
    """A sign record of the given float32 ``scales`` and sign bits ``positive`` (m, n)."""
    m, n = base.shape
    scales, positive = np.asarray(scales, "<f4"), np.asarray(positive, np.uint8)
    alpha = scales if per_row else np.repeat(scales, m)
    coded = alpha != 0  # a scale of +0 or -0 codes no row (10.10)
    blob = pack_sign(base.shape, int(per_row), scales, positive)
    signed = np.where(positive.astype(bool), alpha[:, None], -alpha[:, None])
    delta = np.where(coded[:, None], signed, np.float32(0))  # +0, never -0, in a row not coded
    rec = Record(name, 6, dtype, base.shape, {"packing": 1, "scales": int(per_row)},
                 [maybe_zstd(blob, compress)], base)
    return exact_additive(rec, positive[coded].tobytes(), alpha, delta.astype(np.float32))


def lowrank_rec(rng: Stream, name, dtype, base, rank: int, *, compress=False) -> Record:
    m, n = base.shape
    s = singular_values(rng, rank)
    u = storage(rng.ints(rank * m, -127, 128).reshape(rank, m) / 128.0, "F16")
    v = storage(rng.ints(rank * n, -127, 128).reshape(rank, n) / 128.0, "F16")
    blobs = [maybe_zstd(pack_lowrank(base.shape, s, u, v), compress)] if rank else []
    rec = Record(name, 7, dtype, base.shape, {"rank": rank}, blobs, base)
    u32, v32 = u.astype(np.float32), v.astype(np.float32)
    return lossy(rec, None, 0, np.concatenate([s, v32.ravel(), u32.ravel()]), *product(u32, s, v32))


def sparse_rec(rng: Stream, name, dtype, base, *, mask, seed=0, drop=0, keep_share=0.5, compress=False) -> Record:
    count = base.size
    if mask == 1:
        keep = masks.kept_flat(seed, count, drop)
    else:
        keep = rng.u32(count) < int(keep_share * 2**32)
    values = storage(rng.ints(int(keep.sum()), -127, 128) / 256.0, "F16")
    return sparse_record(name, dtype, base, keep, values, mask=mask, seed=seed, drop=drop, compress=compress)


def sparse_record(name, dtype, base, keep, values, *, mask, seed=0, drop=0, compress=False) -> Record:
    """A sparse record keeping the elements ``keep`` (bool, C order) with float16 ``values``."""
    count = base.size
    delta = np.zeros(count, np.float32)
    delta[keep] = values.astype(np.float32)
    blob = pack_sparse(count, mask, keep, values)
    rec = Record(name, 8, dtype, base.shape, {"packing": 1, "mask": mask, "seed": seed, "drop": drop},
                 [maybe_zstd(blob, compress)], base)
    return exact_additive(rec, keep.astype(np.uint8).tobytes(), delta, delta.reshape(base.shape))


# --- the valid and uncommon vectors ----------------------------------------------------------------


def nudged(rng: Stream, base: np.ndarray, spread: int = 3) -> np.ndarray:
    """The base with small changes of its bit patterns: a fine-tune as dense-delta sees one."""
    patterns = dtypes.unsigned_view(base)
    bits = patterns.astype(np.int64) + rng.ints(base.size, -spread, spread + 1).reshape(base.shape)
    return (bits % (1 << (8 * base.dtype.itemsize))).astype(patterns.dtype).view(base.dtype)


def lossless(small: bool = False) -> File:
    """Every exact kind; ``small`` leaves out the two byte-planes tensors (the faulty vectors' source)."""
    rng = Stream(1)
    w = rng.floats((4, 6), "F16")
    emb = rng.floats((64, 40), "BF16")
    big = rng.floats((33, 32), "F32")
    ids = np.arange(10, dtype=np.uint8) * 7
    records = [dense_delta("w", "F16", w, nudged(rng, w)),
               dense_delta("emb", "BF16", emb, nudged(rng, emb), layout=1, compress=True),
               dense_delta("big", "F32", big, nudged(rng, big, 1 << 20), layout=1),
               dense_delta("ids", "U8", ids, nudged(rng, ids)),
               full("head", "F32", rng.floats((3, 5), "F32")),
               full("pos", "I64", np.arange(7, dtype="<i8") - 3, base=np.arange(5, dtype="<i4"), base_dtype="I32"),
               removed("gone", "I32", np.arange(9, dtype="<i4"))]
    if small:
        records = [r for r in records if r.name not in ("emb", "big")]
    attachments = [("config.json", Blob(b'{"model_type": "toy"}\n')),
                   ("tokenizer/vocab.txt", zstd(b"a\nb\nc\n" * 20))]
    return File(records, attachments, minor=0, metadata={"format": "pt"})


def small() -> File:
    return lossless(small=True)


def lowrank_mixed_file() -> File:
    rng = Stream(2)
    records = [lowrank_mixed(rng, "a", "F16", rng.floats((24, 40), "F16"), [[0, 2, 8, 16], [2, 6, 3, 16],
                                                                             [6, 10, 2, 16]]),
               lowrank_mixed(rng, "b", "BF16", rng.floats((40, 24), "BF16"),
                             [[0, 1, 7, 5], [1, 3, 5, 24], [3, 4, 6, 128]], compress=True),
               lowrank_mixed(rng, "c", "F32", rng.floats((16, 16), "F32"), [[0, 4, 4, 16]]),
               full("bias", "F32", rng.floats((24,), "F32"), base=rng.floats((24,), "F32"))]
    return File(records, minor=1)


def sparse_lowrank_hash() -> File:
    rng = Stream(3)
    records = [sparse_lowrank_rec(rng, "a", "F16", rng.floats((24, 40), "F16"), [[0, 2, 16, 0], [2, 5, 4, 8]],
                                  mask=1, seed=0x0123456789ABCDEF,
                                  drops=[0, 0x40000000, 0x80000000, 0xC0000000, 0x20000000]),
               sparse_lowrank_rec(rng, "b", "BF16", rng.floats((20, 12), "BF16"), [[0, 3, 3, 4]], mask=1, seed=7,
                                  drops=[0x10000000, 0x70000000, 0xFFFFFFFF], compress=True)]
    return File(records)


def sparse_lowrank_bitmask() -> File:
    rng = Stream(4)
    return File([sparse_lowrank_rec(rng, "a", "F32", rng.floats((12, 30), "F32"), [[0, 1, 16, 0], [1, 4, 2, 7]],
                                    mask=2, keep_share=0.6)])


def sign_file() -> File:
    rng = Stream(5)
    return File([sign_rec(rng, "rows", "F32", rng.floats((8, 20), "F32"), per_row=True, zero_rows=(2, 5)),
                 sign_rec(rng, "matrix", "BF16", rng.floats((6, 9), "BF16"), per_row=False, compress=True)])


def lowrank_file() -> File:
    rng = Stream(6)
    return File([lowrank_rec(rng, "a", "F16", rng.floats((20, 12), "F16"), 3),
                 lowrank_rec(rng, "b", "BF16", rng.floats((9, 30), "BF16"), 1, compress=True)])


def sparse_file() -> File:
    rng = Stream(7)
    return File([sparse_rec(rng, "hash", "F32", rng.floats((10, 10), "F32"), mask=1, seed=42, drop=0x9999999A),
                 sparse_rec(rng, "bitmask", "F16", rng.floats((3, 4, 5), "F16"), mask=2, keep_share=0.3),
                 sparse_rec(rng, "zstd", "BF16", rng.floats((50,), "BF16"), mask=1, seed=2**64 - 1,
                            drop=0x40000000, compress=True)])


def rank_zero() -> File:
    rng = Stream(8)
    return File([lowrank_mixed(rng, "mixed", "F16", rng.floats((4, 5), "F16"), []),
                 sparse_lowrank_rec(rng, "sparse", "BF16", rng.floats((3, 2), "BF16"), [], mask=1, drops=[]),
                 lowrank_rec(rng, "plain", "F32", rng.floats((2, 7), "F32"), 0),
                 sign_rec(rng, "sign", "F16", rng.floats((5, 17), "F16"), per_row=False, zero_rows=(0,))])


def one_element() -> File:
    rng = Stream(9)
    scalar = rng.floats((), "F16")
    return File([dense_delta("scalar", "F16", scalar, nudged(rng, scalar)),
                 full("one", "F32", rng.floats((1,), "F32")),
                 lowrank_mixed(rng, "mixed", "F32", rng.floats((1, 1), "F32"), [[0, 1, 8, 1]]),
                 sparse_lowrank_rec(rng, "slr", "F16", rng.floats((1, 1), "F16"), [[0, 1, 16, 0]], mask=2,
                                    keep_share=1.0),
                 sparse_rec(rng, "sparse", "BF16", rng.floats((), "BF16"), mask=1, seed=3, drop=0),
                 sign_rec(rng, "sign", "F32", rng.floats((1, 1), "F32"), per_row=True),
                 lowrank_rec(rng, "lowrank", "F16", rng.floats((1, 1), "F16"), 1)])


def widths() -> File:
    rng = Stream(10)
    groups = [[0, 1, 8, 1], [1, 2, 7, 3], [2, 3, 6, 36], [3, 4, 5, 65536], [4, 5, 4, 5], [5, 6, 3, 7],
              [6, 8, 2, 9], [8, 12, 1, 128]]
    return File([lowrank_mixed(rng, "w", "F16", rng.floats((20, 36), "F16"), groups),
                 sparse_lowrank_rec(rng, "s", "F32", rng.floats((10, 14), "F32"),
                                    [[0, 1, 8, 3], [1, 2, 1, 65536], [2, 3, 16, 0]], mask=2, keep_share=0.5)],
                minor=2)


def empty_attachments() -> File:
    rng = Stream(11)
    w = rng.floats((3, 3), "F32")
    return File([dense_delta("w", "F32", w, nudged(rng, w))],
                [("empty.txt", Blob(b"")), ("dir/data.bin", Blob(bytes(range(100)))), ("last-empty", Blob(b""))],
                minor=0)


def encodings() -> File:
    """Every way a blob may be stored: raw, zstd raw blocks, RLE, a window descriptor, libzstd's frame."""
    rng = Stream(12)
    a, b = rng.floats((40, 16), "F32"), rng.floats((8, 8), "F16")
    rec_a = dense_delta("planes", "F32", a, nudged(rng, a), layout=1)
    rec_a.blobs = [Blob(rec_a.blobs[0].raw), zstd(rec_a.blobs[1].raw), zstd(rec_a.blobs[2].raw, rle=True),
                   zstd(rec_a.blobs[3].raw, window_log=10, rle=True)]
    rec_b = dense_delta("same", "F16", b, b, compress=False)
    rec_b.blobs = [zstd(rec_b.blobs[0].raw, rle=True)]  # all codes 0: one RLE block
    big = bytes(200000)
    return File([rec_a, rec_b], [("libzstd.bin", Blob(LIBZSTD_CONTENT, LIBZSTD_FRAME)),
                                 ("two-blocks.bin", zstd(big, rle=True))], minor=0)


def aligned(alignment: int, seed: int, attachments: bool) -> Callable[[], File]:
    def build() -> File:
        rng = Stream(seed)
        w = rng.floats((2, 3), "F16")
        return File([dense_delta("w", "F16", w, nudged(rng, w)), full("b", "F32", rng.floats((65,), "F32"))],
                    [("note.txt", Blob(b"x"))] if attachments else [], alignment=alignment, minor=0)
    return build


def empty_tensors() -> File:
    empty = np.zeros((0,), "<f4")
    return File([dense_delta("plain", "F32", empty, empty),
                 dense_delta("planes", "F32", empty, empty, layout=1),
                 full("new", "F16", np.zeros((3, 0), "<f2")),
                 removed("gone", "I64", np.zeros((0, 2), "<i8"))], minor=0)


def no_records() -> File:
    return File([], minor=0)


def unicode_names() -> File:
    rng = Stream(13)
    w = rng.floats((2, 2), "BF16")
    return File([dense_delta("层.权重", "BF16", w, nudged(rng, w)), full("emoji 🙂", "U8", np.arange(3, dtype="<u1")),
                 removed("ü", "F16", rng.floats((2,), "F16"))], [("docs/résumé.md", Blob("é".encode()))], minor=0)


def sparse_extremes() -> File:
    rng = Stream(14)
    return File([sparse_rec(rng, "keep-all", "F32", rng.floats((4, 4), "F32"), mask=1, seed=5, drop=0),
                 sparse_rec(rng, "drop-all", "F16", rng.floats((4, 4), "F16"), mask=1, seed=5, drop=2**32),
                 sparse_lowrank_rec(rng, "drop-most", "F32", rng.floats((6, 6), "F32"), [[0, 2, 4, 2]], mask=1,
                                    seed=9, drops=[0xFFFFFFFF, 0]),
                 sparse_rec(rng, "empty-last-section", "F32", rng.floats((4,), "F32"), mask=2, keep_share=0.0)])


def long_forms(obj) -> bytes:
    """msgpack with the longest form of every value (readers MUST accept them all, spec 6.1)."""
    if isinstance(obj, bool) or obj is None:
        return msgpack.packb(obj)
    if isinstance(obj, int):
        return b"\xcf" + struct.pack(">Q", obj) if obj >= 0 else b"\xd3" + struct.pack(">q", obj)
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, str):
        data = obj.encode()
        return b"\xdb" + struct.pack(">I", len(data)) + data
    if isinstance(obj, bytes):
        return b"\xc6" + struct.pack(">I", len(obj)) + obj
    if isinstance(obj, list):
        return b"\xdd" + struct.pack(">I", len(obj)) + b"".join(long_forms(x) for x in obj)
    items = list(obj.items())[::-1]  # key order carries no meaning
    return b"\xdf" + struct.pack(">I", len(items)) + b"".join(long_forms(k) + long_forms(v) for k, v in items)


def long_msgpack() -> tuple[File, Edits]:
    rng = Stream(15)
    w = rng.floats((3, 4), "F16")
    f = File([dense_delta("w", "F16", w, nudged(rng, w)),
              lowrank_mixed(rng, "m", "F32", rng.floats((5, 6), "F32"), [[0, 2, 3, 4]])],
             minor=1, top_ext={"x-free": {"float": 1.5, "nil": None, "flag": True, "list": [1, -2, b"\x00"]}})

    def add_ext(index):
        index["tensors"][0]["ext"] = {"x-note": "ignored"}
        index["tensors"][0]["blobs"][0]["ext"] = {}
        index["method"]["params"] = {"anything": [1.25, None]}

    return f, Edits(index=add_ext, index_bytes=lambda b: long_forms(msgpack.unpackb(b, raw=False)))


def optional_flags() -> tuple[File, Edits]:
    rng = Stream(16)
    w = rng.floats((2, 2), "F32")
    return File([dense_delta("w", "F32", w, nudged(rng, w))], minor=0), \
        Edits(header=lambda h: h.update(optional=0xFFFFFFFF))


def spec_example() -> File:
    """The lowrank-mixed example of spec 10.7: F16 [2, 3], one 3-bit group of rank 1."""
    base = np.array([[1, 2, 3], [4, 5, 6]], "<f2")
    v = Factor(np.array([[5, 1, 7]], np.uint8), np.array([[0.125, 0.25]], "<f2"), np.array([[3, 0]], np.uint8))
    u = Factor(np.array([[6, 2]], np.uint8), np.array([[0.5]], "<f2"), np.array([[4]], np.uint8))
    rec = lowrank_mixed_record("w", "F16", base, [BitGroup(0, 1, 3, 2)], np.array([2.0], "<f4"), [(v, u)])
    return File([rec], minor=1)


# --- the faulty vectors ---------------------------------------------------------------------------


def with_blob(record: int, edit: Callable[[bytes], bytes], source: Callable[[], File] = spec_example):
    """A source file whose record's first blob has edited raw bytes (stored raw)."""
    def build() -> File:
        f = source()
        f.records[record].blobs[0] = Blob(edit(f.records[record].blobs[0].raw))
        return f
    return build


def poke(offset: int, value: int) -> Callable[[bytes], bytes]:
    return lambda raw: raw[:offset] + bytes([value]) + raw[offset + 1:]


def set_in(path: tuple, value) -> Callable[[dict], None]:
    """Edit the index at ``path`` (keys and list positions)."""
    def edit(index):
        node = index
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def header(**fields) -> Edits:
    return Edits(header=lambda h: h.update(fields))


def final(fn) -> Edits:
    return Edits(final=fn)


def dense_with_stored(stored: bytes, raw_length: int = 16) -> Callable[[], File]:
    """A dense-delta F32 [4] record whose one blob holds ``stored`` as a zstd frame."""
    def build() -> File:
        base = np.arange(4, dtype="<f4")
        rec = dense_delta("w", "F32", base, base)
        rec.blobs = [Blob(bytes(raw_length), stored)]
        return File([rec], minor=0)
    return build


def deep(depth: int):
    node: object = 0
    for _ in range(depth):
        node = [node]
    return node


def replace_bytes(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        assert data.count(old) == 1, old
        return data.replace(old, new)
    return edit


def renamed_twice() -> File:
    f = small()
    f.records[1].name = "w"  # two records named 'w'
    return f


def removed_with_blob() -> File:
    f = small()
    f.records[4].blobs = [Blob(b"x")]
    return f


def without_base_ref() -> File:
    f = spec_example()
    f.records[0].base = None
    return f


def many_groups() -> File:
    base = np.zeros((2, 70), "<f2")
    return File([lowrank_mixed(Stream(20), "w", "F16", base, [[i, i + 1, 1, 1] for i in range(2)])], minor=1)


def group_edit(groups) -> Callable[[dict], None]:
    return set_in(("tensors", 0, "params", "groups"), groups)


def bad_base(change: Callable[[dict], None]) -> Callable[[], bytes]:
    """The base of ``small`` with one change: for the wrong-base vectors."""
    def build() -> bytes:
        f = small()
        tensors = {r.name: (r.base_dtype or r.dtype, r.base) for r in f.records if r.base is not None}
        change(tensors)
        return safetensors_bytes(tensors)
    return build


def _tweak_value(tensors):
    dtype, array = tensors["w"]
    array = array.copy()
    array[3, 4] += np.float16(1)
    tensors["w"] = (dtype, array)


@dataclass
class ValidVector:
    """A valid or uncommon vector: ``build`` gives its File (or its File and Edits)."""

    name: str
    tier: str  # valid or uncommon
    build: Callable
    section: str
    minor: int  # the lowest minor version whose reader must decode it
    description: str


@dataclass
class FaultyVector:
    """A faulty vector: ``source`` changed by ``edits`` breaks one rule of ``section``."""

    name: str
    source: Callable[[], File]
    edits: Edits
    section: str
    error: str  # the name of the dcm error class; the manifest gives its code too (spec 15)
    description: str
    mode: str = "reader"  # the procedure of spec 19.3 that must reject it: reader or verifier
    base: Callable[[], bytes] | None = None  # the base to run with (a fault of the base), else none


VALID = [
    # name, tier, builder, section, min minor, description
    ("lossless", "valid", lossless, "10.4", 0,
     "dense-delta in F16, BF16 (byte-planes, zstd), F32 (byte-planes), U8; full records with and without a base "
     "reference (another dtype and shape); removed; two attachments; checkpoint metadata"),
    ("small", "valid", small, "10.4", 0,
     "dense-delta in F16 and U8, full records with and without a base reference, removed, two attachments: "
     "the source of most faulty vectors"),
    ("lowrank-mixed", "valid", lowrank_mixed_file, "10.7", 1,
     "lowrank-mixed in F16, BF16 (zstd) and F32; widths 2 to 8; quantization groups that do not divide the "
     "vectors; negative scales; a full record beside them"),
    ("spec-example", "valid", spec_example, "10.7", 1, "the worked example of section 10.7"),
    ("sparse-lowrank-hash", "valid", sparse_lowrank_hash, "10.9", 2,
     "sparse-lowrank with the hash mask: float16 and 4-bit groups, drop thresholds up to 2^32 - 1, zstd"),
    ("sparse-lowrank-bitmask", "valid", sparse_lowrank_bitmask, "10.9", 2,
     "sparse-lowrank with a stored bitmask: a float16 group and a 2-bit group of quantization groups of 7"),
    ("sign", "valid", sign_file, "10.10", 2, "sign with a scale per row (two rows of scale 0) and per matrix"),
    ("lowrank", "valid", lowrank_file, "10.11", 2, "lowrank of rank 3 (F16) and rank 1 (BF16, zstd)"),
    ("sparse", "valid", sparse_file, "10.12", 2,
     "sparse with the hash mask (F32; BF16 with seed 2^64 - 1, zstd) and a bitmask (a 3-D F16 tensor)"),
    ("rank-zero", "uncommon", rank_zero, "10.7", 2,
     "rank 0: lowrank-mixed and sparse-lowrank with no groups, lowrank of rank 0 (no blobs), sign with its one "
     "scale 0 (no sign bits)"),
    ("one-element", "uncommon", one_element, "10.2", 2,
     "one-element tensors of every kind: shape [] and [1], matrices [1, 1]"),
    ("widths-1-to-8", "uncommon", widths, "11", 2,
     "lowrank-mixed with every width from 8 down to 1 in one record, quantization groups of 1 and of 65536; "
     "sparse-lowrank with 8-bit, 1-bit and float16 groups"),
    ("empty-attachments", "uncommon", empty_attachments, "13", 0,
     "attachments of 0 bytes in the middle and at the end of the file"),
    ("encodings", "uncommon", encodings, "8", 0,
     "raw blobs; zstd frames of raw blocks, RLE blocks, with a window descriptor, of two blocks, and libzstd's "
     "frame with a compressed block and a content checksum"),
    ("alignment-max", "uncommon", aligned(65536, 17, False), "7", 0, "the largest alignment, 65536: two blobs"),
    ("alignment-min", "uncommon", aligned(8, 18, True), "7", 0, "the smallest alignment, 8"),
    ("empty-tensors", "uncommon", empty_tensors, "10.2", 0,
     "tensors of 0 elements: dense-delta plain and byte-planes (empty blobs), full [3, 0], removed [0, 2]"),
    ("no-records", "uncommon", no_records, "7", 0, "no records and no attachments: the file ends after the index"),
    ("unicode-names", "uncommon", unicode_names, "12", 0, "tensor and attachment names beyond ASCII"),
    ("sparse-extremes", "uncommon", sparse_extremes, "10.8", 2,
     "drop thresholds 0 (keep all) and 2^32 (drop all) of sparse; 2^32 - 1 of sparse-lowrank; a bitmask sparse "
     "record that keeps nothing (an empty last section, placed at the next multiple of 4)"),
    ("msgpack-long-forms", "uncommon", long_msgpack, "6.1", 1,
     "an index written with the longest msgpack form of every value, keys in reverse order, ext maps on a "
     "record and a blob, free-form method params with floats and nil"),
    ("optional-flags", "uncommon", optional_flags, "5", 0, "every optional flag bit set: readers ignore them"),
]

# name, source builder, edits, section, error, description (faulty vectors)
FAULTY = [
    ("bad-magic", small, final(lambda d: b"\x89DCN" + d[4:]), "3.1", "BadMagicError", "the magic's 4th byte"),
    ("shorter-than-magic", small, final(lambda d: d[:7]), "3.3", "BadMagicError", "a 7-byte file"),
    ("text-mode-transfer", small, final(lambda d: d[:4] + b"\n" + d[6:]), "3.1", "BadMagicError",
     "CR LF turned into LF by a text-mode transfer"),
    ("truncated-header", small, final(lambda d: d[:40]), "3.3", "TruncatedError", "40 bytes of header only"),
    ("newer-major", small, header(major=2), "4", "UnsupportedVersionError", "major version 2"),
    ("unknown-required-flag", small, header(required=1), "5", "UnknownFlagError", "required flag bit 0 set"),
    ("reserved-nonzero", small, header(reserved=b"\x01" + bytes(19)), "3.3", "FormatError",
     "a reserved header byte is 1"),
    ("alignment-not-power-of-two", small, header(alignment=48), "3.3", "LayoutError", "alignment 48"),
    ("alignment-too-small", small, header(alignment=4), "14", "LayoutError", "alignment 4"),
    ("index-too-large", small, header(index_length=2**26 + 1), "14", "LimitError",
     "index_length of 64 MiB + 1"),
    ("truncated", small, final(lambda d: d[:-10]), "3.3", "TruncatedError", "the last 10 bytes cut off"),
    ("trailing-bytes", small, final(lambda d: d + b"\0"), "3.3", "TrailingDataError", "one byte appended"),
    ("index-past-end", small, Edits(header=lambda h: h.update(index_length=h["file_length"])), "3.3",
     "TruncatedError", "index_length reaches past file_length"),
    ("header-checksum", small, final(lambda d: d[:60] + bytes([d[60] ^ 1]) + d[61:]), "3.2",
     "HeaderChecksumError", "one bit of header_crc32 flipped"),
    ("index-bit-flip", small, final(lambda d: d[:100] + bytes([d[100] ^ 4]) + d[101:]), "3.2",
     "HeaderChecksumError", "one bit of the index flipped"),
    ("payload-checksum", small, Edits(data=lambda data, start: data.__setitem__(3, data[3] ^ 0x10)), "8",
     "PayloadChecksumError", "one bit of the first blob flipped"),
    ("overlapping-payloads", small, Edits(index=set_in(("tensors", 1, "blobs", 0, "offset"), 0)), "7",
     "LayoutError", "the second blob at offset 0, over the first"),
    ("offset-out-of-bounds", small, Edits(index=set_in(("tensors", 0, "blobs", 0, "offset"), 2**40)), "7",
     "LayoutError", "a blob at offset 2^40"),
    ("misaligned-offset", small, Edits(index=set_in(("tensors", 1, "blobs", 0, "offset"), 65)), "7",
     "LayoutError", "a blob at offset 65 with alignment 64"),
    ("gap-after-last-blob", small, Edits(data=lambda data, start: data.extend(bytes(64))), "7", "LayoutError",
     "64 bytes after the last blob, counted in file_length"),
    FaultyVector("nonzero-padding", small, Edits(data=lambda data, start: data.__setitem__(60, 1)), "7",
                 "LayoutError", "a padding byte between the first two blobs is 1 (a reader MAY ignore padding)",
                 mode="verifier"),
    ("dims-overflow", small, Edits(index=set_in(("tensors", 0, "shape"), [2**32, 2**32, 2**32])), "14",
     "LimitError", "shape [2^32, 2^32, 2^32]: each dimension fits, the product (2^96) does not"),
    ("dim-too-large", small, Edits(index=set_in(("tensors", 2, "shape"), [2**48 + 1])), "14", "LimitError",
     "a dimension of 2^48 + 1"),
    ("too-many-dims", small, Edits(index=set_in(("tensors", 2, "shape"), [1] * 9)), "14", "LimitError",
     "a shape of 9 dimensions"),
    ("dense-length-short", with_blob(0, lambda raw: raw[:-1], small), Edits(), "10.2", "PayloadError",
     "a plain dense-delta blob of n·w − 1 bytes"),
    ("lowrank-length-long", with_blob(0, lambda raw: raw + bytes(4)), Edits(), "10.7", "PayloadError",
     "a lowrank-mixed blob 4 bytes longer than its groups give"),
    ("raw-length-differs", small, Edits(index=set_in(("tensors", 0, "blobs", 0, "raw_length"), 47)), "8",
     "PayloadError", "a raw blob whose raw_length is not its length"),
    ("duplicate-msgpack-key", lambda: replace(small(), top_ext={"x-a": 1, "x-b": 2}),
     Edits(index_bytes=replace_bytes(b"x-b", b"x-a")), "6.2", "DuplicateKeyError", "a map with the key 'x-a' twice"),
    ("duplicate-record-name", renamed_twice, Edits(), "6.6", "DuplicateKeyError", "two records named 'w'"),
    ("unknown-kind", small, Edits(index=set_in(("tensors", 0, "kind"), 99)), "10", "UnknownKindError",
     "record kind 99"),
    ("unknown-packing", spec_example, Edits(index=set_in(("tensors", 0, "params", "packing"), 2)), "11",
     "UnknownKindError", "packing 2 in a lowrank-mixed record"),
    ("unknown-encoding", small, Edits(index=set_in(("tensors", 0, "blobs", 0, "encoding"), 7)), "8",
     "UnknownKindError", "blob encoding 7"),
    ("unknown-dtype", small, Edits(index=set_in(("tensors", 2, "dtype"), "F12")), "9", "UnknownKindError",
     "dtype 'F12'"),
    ("unknown-layout", small, Edits(index=set_in(("tensors", 0, "params", "layout"), 2)), "10.2",
     "UnknownKindError", "layout 2"),
    ("msgpack-too-deep", lambda: replace(small(), top_ext={"x-deep": deep(15)}), Edits(), "6.2", "LimitError",
     "an index of depth 17 (an ext value 15 arrays deep)"),
    ("msgpack-ext-type", lambda: replace(small(), top_ext={"x": msgpack.ExtType(5, b"!")}), Edits(), "6.2",
     "IndexSchemaError", "an ext value (type 5) in an ext map"),
    ("msgpack-timestamp", lambda: replace(small(), top_ext={"x": msgpack.Timestamp(0, 0)}), Edits(),
     "6.2", "IndexSchemaError", "a timestamp (ext type -1) in an ext map"),
    ("invalid-utf8", small, Edits(index_bytes=replace_bytes(b"vectors 1", b"vectors\xc0\xaf")), "6.2",
     "IndexSchemaError", "an overlong UTF-8 form in the creator"),
    ("non-string-key", lambda: replace(small(), top_ext={1: 2}), Edits(), "6.2", "IndexSchemaError",
     "an integer map key"),
    ("index-not-a-map", small, Edits(index_bytes=lambda b: b"\x91" + b), "6.2", "IndexSchemaError",
     "the index map inside an array"),
    ("index-trailing-bytes", small, Edits(index_bytes=lambda b: b + b"\xc0"), "6.2", "IndexSchemaError",
     "a nil after the index map"),
    ("missing-key", small, Edits(index=lambda i: i.pop("creator")), "6.5", "IndexSchemaError",
     "no 'creator'"),
    ("unknown-key", small, Edits(index=set_in(("tensors", 0, "colour"), 1)), "6.4", "IndexSchemaError",
     "a record key 'colour'"),
    ("bool-as-int", small, Edits(index=set_in(("tensors", 0, "kind"), True)), "6.3", "IndexSchemaError",
     "a record kind true"),
    ("negative-offset", small, Edits(index=set_in(("tensors", 0, "blobs", 0, "offset"), -1)), "6.3",
     "IndexSchemaError", "a blob offset -1"),
    ("empty-name", small, Edits(index=set_in(("tensors", 2, "name"), "")), "6.3", "IndexSchemaError",
     "an empty tensor name"),
    ("name-too-long", small, Edits(index=set_in(("tensors", 2, "name"), "n" * 513)), "14", "LimitError",
     "a tensor name of 513 bytes"),
    ("format-mismatch", small, Edits(index=set_in(("format",), [1, 1])), "6.5", "FormatError",
     "index format [1, 1] in a file of header version 1.0"),
    ("base-digest-mismatch", small, Edits(index=set_in(("base", "digest"), bytes(32))), "12", "FormatError",
     "a base digest of zeros"),
    ("missing-base-reference", without_base_ref, Edits(), "10.7", "IndexSchemaError",
     "a lowrank-mixed record without its base reference"),
    ("base-shape-differs", small, Edits(index=set_in(("tensors", 0, "base", "shape"), [6, 4])), "10.4",
     "PayloadError", "a dense-delta record whose base reference has another shape"),
    ("removed-with-blob", removed_with_blob, Edits(), "10.6", "PayloadError", "a removed record with a blob"),
    ("zstd-bomb", dense_with_stored(zstd_frame(bytes(1 << 24), rle=True)), Edits(), "8", "PayloadError",
     "a 16-byte record whose zstd frame declares and holds 16 MiB of zeros (a decompression bomb)"),
    ("zstd-no-content-size", dense_with_stored(zstd_frame(bytes(16), content_size=None, window_log=10)), Edits(),
     "8", "PayloadError", "a zstd frame without Frame_Content_Size"),
    ("zstd-content-size-lies", dense_with_stored(zstd_frame(bytes(32), content_size=16)), Edits(), "8",
     "PayloadError", "a zstd frame declaring 16 bytes that holds 32"),
    ("zstd-trailing-frame", dense_with_stored(zstd_frame(bytes(16)) + zstd_frame(b"")), Edits(), "8",
     "PayloadError", "a second zstd frame after the first"),
    ("zstd-skippable-frame", dense_with_stored(b"\x50\x2a\x4d\x18" + struct.pack("<I", 16) + bytes(16)), Edits(),
     "8", "PayloadError", "a skippable frame"),
    ("zstd-window-too-large", dense_with_stored(zstd_frame(bytes(16), window_log=28)), Edits(), "8",
     "PayloadError", "a zstd frame with a window of 2^28 bytes"),
    ("zstd-dictionary", dense_with_stored(zstd_frame(bytes(16), dict_id=1)), Edits(), "8", "PayloadError",
     "a zstd frame that needs dictionary 1"),
    ("padding-bits", with_blob(0, poke(5, 0x81)), Edits(), "11", "PayloadError",
     "a nonzero padding bit after the V codes of the 10.7 example"),
    ("section-padding", with_blob(0, poke(6, 1)), Edits(), "10.7", "PayloadError",
     "a nonzero byte between two sections of the 10.7 example"),
    ("s-not-finite", with_blob(0, replace_bytes(b"\x00\x00\x00\x40", b"\x00\x00\xc0\x7f")), Edits(), "10.7",
     "PayloadError", "S is a NaN"),
    ("scale-not-finite", with_blob(0, replace_bytes(b"\x00\x30\x00\x34", b"\x00\x7c\x00\x34")), Edits(), "10.7",
     "PayloadError", "a scale is +infinity"),
    ("group-bits-9", spec_example, Edits(index=group_edit([[0, 1, 9, 2]])), "10.7", "PayloadError",
     "a bit group of 9 bits"),
    ("group-rank-above-min", spec_example, Edits(index=group_edit([[0, 3, 3, 2]])), "10.7", "PayloadError",
     "rank 3 for a [2, 3] matrix"),
    ("group-not-contiguous", spec_example, Edits(index=group_edit([[0, 1, 3, 2], [2, 3, 3, 2]])), "10.7",
     "PayloadError", "a bit group that does not start where the previous one stops"),
    ("group-malformed", spec_example, Edits(index=group_edit([[0, 1, 3]])), "10.7", "IndexSchemaError",
     "a bit group of three ints"),
    ("too-many-groups", many_groups, Edits(index=group_edit([[i, i + 1, 1, 1] for i in range(65)])), "14",
     "LimitError", "65 bit groups"),
    ("sparse-bitmask-with-seed", lambda: File([sparse_rec(Stream(21), "w", "F32", np.zeros(8, "<f4"), mask=2)]),
     Edits(index=set_in(("tensors", 0, "params", "seed"), 5)), "10.12", "PayloadError",
     "a sparse record with a bitmask and seed 5"),
    ("sparse-negative-seed", lambda: File([sparse_rec(Stream(26), "w", "F32", np.zeros(8, "<f4"), mask=1)]),
     Edits(index=set_in(("tensors", 0, "params", "seed"), -1)), "10.1", "PayloadError",
     "a sparse record with seed -1: a quantity out of range"),
    ("sparse-drop-above-range", lambda: File([sparse_rec(Stream(27), "w", "F32", np.zeros(8, "<f4"), mask=1)]),
     Edits(index=set_in(("tensors", 0, "params", "drop"), 2**32 + 1)), "10.1", "PayloadError",
     "a sparse record with drop 2^32 + 1: a quantity out of range"),
    ("sparse-lowrank-negative-seed", lambda: File([sparse_lowrank_rec(
        Stream(28), "w", "F16", np.zeros((4, 5), "<f2"), [[0, 1, 16, 0]], mask=1, seed=3, drops=[0])]),
     Edits(index=set_in(("tensors", 0, "params", "seed"), -3)), "10.9", "PayloadError",
     "a sparse-lowrank record with seed -3"),
    ("lowrank-negative-rank", lambda: File([lowrank_rec(Stream(29), "w", "F16", np.zeros((2, 3), "<f2"), 0)]),
     Edits(index=set_in(("tensors", 0, "params", "rank"), -1)), "10.11", "PayloadError",
     "lowrank rank -1"),
    ("sparse-length-differs", with_blob(0, lambda raw: raw + bytes(4), lambda: File([sparse_rec(
        Stream(22), "w", "F32", np.zeros(16, "<f4"), mask=1, seed=1, drop=2**31)])), Edits(), "10.12",
     "PayloadError", "a sparse blob of more values than the mask keeps"),
    ("sign-length-differs", with_blob(0, lambda raw: raw[:-4], lambda: File([sign_rec(
        Stream(23), "w", "F16", np.zeros((4, 40), "<f2"), per_row=True, zero_rows=(1,))])), Edits(), "10.10",
     "PayloadError", "a sign blob missing the last coded row's bits"),
    ("lowrank-rank-too-large", lambda: File([lowrank_rec(Stream(24), "w", "F16", np.zeros((2, 3), "<f2"), 2)]),
     Edits(index=set_in(("tensors", 0, "params", "rank"), 3)), "10.11", "PayloadError",
     "lowrank rank 3 for a [2, 3] matrix"),
    ("lowrank-not-finite", with_blob(0, lambda raw: raw[:4] + b"\x00\x7e" + raw[6:], lambda: File([lowrank_rec(
        Stream(25), "w", "F16", np.zeros((2, 3), "<f2"), 1)])), Edits(), "10.11", "PayloadError",
     "a float16 NaN in V"),
    ("unsafe-attachment-name", small, Edits(index=set_in(("attachments", 0, "name"), "../config.json")), "13",
     "FormatError", "an attachment named '../config.json'"),
    ("attachment-too-large", small, Edits(index=set_in(("attachments", 1, "blob", "raw_length"), 2**24 + 1)),
     "14", "LimitError", "an attachment of 16 MiB + 1 raw bytes"),
    FaultyVector("wrong-base", small, Edits(), "12", "WrongBaseError",
                 "a base whose tensor 'w' differs in one element", base=bad_base(_tweak_value)),
    FaultyVector("wrong-base-missing", small, Edits(), "12", "WrongBaseError", "a base without the tensor 'gone'",
                 base=bad_base(lambda t: t.pop("gone"))),
    FaultyVector("wrong-base-extra", small, Edits(), "12", "WrongBaseError", "a base with a tensor no record names",
                 base=bad_base(lambda t: t.update(extra=("F32", np.zeros(2, "<f4"))))),
]


# --- vector families -------------------------------------------------------------------------------
#
# A family is a function returning its vectors (ValidVector and FaultyVector entries);
# build_all writes every family of FAMILIES.  A new part of the spec brings its
# vectors as a new family, one function and one line in FAMILIES, so that families
# written in parallel merge without touching each other.


def core_vectors() -> list:
    """Every kind, encoding and layout, and one faulty vector per rule of the first vectors."""
    return [ValidVector(*v) for v in VALID] + [v if isinstance(v, FaultyVector) else FaultyVector(*v)
                                               for v in FAULTY]


def edit_all(*edits: Callable[[dict], None]) -> Callable[[dict], None]:
    def edit(index):
        for one in edits:
            one(index)
    return edit


def pop_in(path: tuple) -> Callable[[dict], None]:
    """Remove the key at ``path`` from the index."""
    def edit(index):
        node = index
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


def poke_or(offset: int, bits: int) -> Callable[[bytes], bytes]:
    return lambda raw: raw[:offset] + bytes([raw[offset] | bits]) + raw[offset + 1:]


def splice(offset: int, data: bytes) -> Callable[[bytes], bytes]:
    return lambda raw: raw[:offset] + data + raw[offset + len(data):]


def without_base(source: Callable[[], File], record: int = 0) -> Callable[[], File]:
    """``source`` with no base reference on one record (the base digest follows)."""
    def build() -> File:
        f = source()
        f.records[record].base = None
        return f
    return build


def with_blobs(source: Callable[[], File], blobs: Callable[[list], list], record: int = 0) -> Callable[[], File]:
    """``source`` with one record's list of blobs replaced."""
    def build() -> File:
        f = source()
        f.records[record].blobs = blobs(f.records[record].blobs)
        return f
    return build


def record_edit(key: str, value, record: int = 0, also_base: bool = False) -> Callable[[dict], None]:
    """Set a record's key (and, with ``also_base``, the same key of its base reference)."""
    edits = [set_in(("tensors", record, key), value)]
    if also_base:
        edits.append(set_in(("tensors", record, "base", key), value))
    return edit_all(*edits)


def param(key: str, value, record: int = 0) -> Callable[[dict], None]:
    return set_in(("tensors", record, "params", key), value)


# --- the rounding of rebuilt tensors (spec 10.7: to float32 first, then to the dtype, nearest-even)


def f16_rounding() -> File:
    """Sums float32(base) + Δ̂ that fall between two values of F16 or BF16."""
    ulp = 2.0**-10  # F16's unit in the last place on [1, 2)
    row = [1.0, -1.0, 1 + ulp, -(1 + ulp), 2 - ulp, -(2 - ulp), 0.5, 1024.0]
    base = storage(np.array([row] * 6, np.float32), "F16")
    # 0.75 ulp (not a tie), half an ulp (a tie: to even), and half an ulp + 2^-34, which
    # float32 rounds to exactly half an ulp: the sum is a tie only after the first rounding.
    scales = np.repeat(np.array([3 * 2.0**-12, 2.0**-11, 2.0**-11 + 2.0**-34], "<f4"), 2)
    away = (np.array(row) >= 0).astype(np.uint8)  # bit 1 adds +α: away from zero for the positive elements
    sign = sign_record("sign-f16", "F16", base, scales, np.array([away, 1 - away] * 3), per_row=True)
    sparse_base = storage(np.array(row * 2, np.float32), "F16")
    values = storage(np.array([3 * 2.0**-12, -3 * 2.0**-12, 2.0**-11, -(2.0**-11)] * 4, np.float32), "F16")
    sparse = sparse_record("sparse-f16", "F16", sparse_base, np.ones(16, bool), values, mask=2)
    bulp = 2.0**-7  # BF16's unit in the last place on [1, 2)
    brow = [1.0, -1.0, 1 + bulp, -(1 + bulp)]
    bf16 = sign_record("sign-bf16", "BF16", storage(np.array([brow] * 2, np.float32), "BF16"),
                       np.array([3 * 2.0**-9, 2.0**-8], "<f4"), np.array([[1, 0, 1, 0]] * 2), per_row=True)
    return File([sign, sparse, bf16])


def rounding_vectors() -> list:
    return [ValidVector(
        "f16-rounding", "valid", f16_rounding, "10.7", 2,
        "sign and sparse records in F16 (and sign in BF16) whose float32 sums fall between two values of the "
        "dtype: 0.75 of a unit in the last place, exact ties (to even), a carry into the exponent, and sums that "
        "become ties only once rounded to float32 (round to float32 first, then to the dtype)")]


# --- rules at the edges: −0 scales, drop thresholds equal to the hash, the two bitmask sections -----


def sign_negative_zero() -> File:
    rng = Stream(31)
    base = rng.floats((4, 8), "F32")
    base[1, :2] = base[2, 0] = -0.0  # −0 + Δ̂ = −0 + (+0) = +0 in a row that is not coded
    rows = sign_record("rows", "F32", base, np.array([0.5, -0.0, 0.0, -0.25], "<f4"),
                       rng.ints(32, 0, 2).reshape(4, 8), per_row=True)
    base = rng.floats((3, 3), "BF16")
    base[0, 0] = 0x8000  # BF16 −0
    matrix = sign_record("matrix", "BF16", base, np.array([-0.0], "<f4"), rng.ints(9, 0, 2).reshape(3, 3),
                         per_row=False)
    return File([rows, matrix])


def hash_value(seed: int, counter: int) -> int:
    return int(masks.uniform32(seed, np.array([counter], np.uint64))[0])


def drop_equals_hash() -> File:
    rng = Stream(32)
    seed = 0x5EED
    sparse = sparse_rec(rng, "sparse", "F32", rng.floats((16,), "F32"), mask=1, seed=seed,
                        drop=hash_value(seed, 5))
    assert sparse.expected["codes"][5] == 1  # r(seed, 5) = drop: kept
    seed = 77
    drops = [hash_value(seed, masks.vector_counter(0, masks.SIDE_V) + 2),
             hash_value(seed, masks.vector_counter(1, masks.SIDE_U) + 3)]
    slr = sparse_lowrank_rec(rng, "sparse-lowrank", "F16", rng.floats((6, 8), "F16"), [[0, 2, 16, 0]], mask=1,
                             seed=seed, drops=drops)
    return File([sparse, slr])


def mask_sections() -> File:
    """k = 3, n = 5, m = 4: the V mask is 15 bits (2 bytes at offset 12), the U mask starts at 16."""
    rng = Stream(33)
    rec = sparse_lowrank_rec(rng, "w", "F32", rng.floats((4, 5), "F32"), [[0, 1, 16, 0], [1, 3, 3, 2]], mask=2,
                             keep_share=0.6)
    v_count = rec.expected["codes"][:15]
    secs = sparse_lowrank.layout((4, 5), [BitGroup(*g) for g in rec.params["groups"]], 2,
                                 np.frombuffer(v_count, np.uint8).reshape(3, 5).sum(axis=1),
                                 np.frombuffer(rec.expected["codes"][15:27], np.uint8).reshape(3, 4).sum(axis=1))
    assert [(x.name, x.offset, x.nbytes) for x in secs[1:3]] == [("V.mask", 12, 2), ("U.mask", 16, 2)]
    return File([rec])


def edge_rule_vectors() -> list:
    return [
        ValidVector("sparse-lowrank-mask-sections", "valid", mask_sections, "10.9", 2,
                    "sparse-lowrank with a bitmask whose V mask (15 bits, 2 bytes at offset 12) ends inside a byte "
                    "and 2 bytes before a multiple of 4: the U mask is its own section at offset 16, not a "
                    "continuation of the V mask's bit stream nor at the next byte"),
        ValidVector("sign-negative-zero", "uncommon", sign_negative_zero, "10.10", 2,
                    "sign with row scales +0 and −0 (both rows not coded: no sign bits) over base elements −0 "
                    "(rebuilt as +0), and one matrix scale −0 (no sign bits at all)"),
        ValidVector("drop-equals-hash", "uncommon", drop_equals_hash, "10.8", 2,
                    "sparse and sparse-lowrank hash masks whose drop threshold equals r(seed, c) of one element: "
                    "that element is kept (dropped only when r < drop)"),
    ]


# --- one rule for params (10.1) and the order of the open-time checks ------------------------------


def sparse_small() -> File:
    return File([sparse_rec(Stream(44), "w", "F16", Stream(45).floats((4, 4), "F16"), mask=1, seed=5, drop=2**31)])


def sparse_bitmask_small() -> File:
    return File([sparse_rec(Stream(46), "w", "F32", Stream(47).floats((11,), "F32"), mask=2, keep_share=0.5)])


def sign_small() -> File:
    return File([sign_rec(Stream(42), "w", "F16", Stream(43).floats((3, 10), "F16"), per_row=True, zero_rows=(1,))])


def lowrank_small() -> File:
    return File([lowrank_rec(Stream(48), "w", "BF16", Stream(49).floats((3, 4), "BF16"), 2)])


def slr_hash_small() -> File:
    """Vector 0 (a float16 group) keeps at least one V element: its values start at offset 16."""
    rec = sparse_lowrank_rec(Stream(40), "w", "F16", Stream(41).floats((4, 5), "F16"), [[0, 1, 16, 0], [1, 2, 4, 2]],
                             mask=1, seed=9, drops=[0x40000000, 0x80000000])
    assert rec.expected["codes"][:5].count(1) >= 1
    return File([rec])


def slr_bitmask_small() -> File:
    """k = 2, n = 5, m = 3: S at 0 (8 bytes), the V mask at 8 (2 bytes, 6 padding bits), the U mask at 12."""
    return File([sparse_lowrank_rec(Stream(50), "w", "F32", Stream(51).floats((3, 5), "F32"), [[0, 2, 2, 3]],
                                    mask=2, keep_share=0.5)])


def slr_rank_zero() -> File:
    return File([sparse_lowrank_rec(Stream(52), "w", "F16", np.zeros((2, 1), "<f2"), [], mask=1, drops=[])])


def param_rule_vectors() -> list:
    def f(name, source, edit, section, error, description):
        return FaultyVector(name, source, Edits(index=edit) if callable(edit) else edit, section, error, description)
    huge = 2**32 + 1
    return [
        # a registry number the reader does not know, or the kind does not accept: UnknownKindError
        f("transform-none", small, param("transform", 0), "10.1", "UnknownKindError",
          "a dense-delta record with transform 0 (none), a registry number no kind of 1.2 accepts"),
        f("sign-scales-unknown", sign_small, param("scales", 2), "10.1", "UnknownKindError",
          "a sign record with scales 2, a registry number unknown to 1.2"),
        f("sparse-mask-unknown", sparse_small, param("mask", 3), "10.1", "UnknownKindError",
          "a sparse record with mask 3, a registry number unknown to 1.2"),
        # a quantity out of range: PayloadError
        f("group-size-zero", spec_example, group_edit([[0, 1, 3, 0]]), "10.1", "PayloadError",
          "a lowrank-mixed bit group with group_size 0: a quantity out of range"),
        # the type of a param before its value, params in the order of the kind's table
        f("param-type", slr_hash_small, param("seed", True), "10.1", "IndexSchemaError",
          "a sparse-lowrank seed that is a bool, not an int"),
        f("lowrank-rank-not-int", lowrank_small, param("rank", 1.5), "10.1", "IndexSchemaError",
          "a lowrank rank that is a float"),
        f("order-param-value-before-next-type", slr_hash_small, edit_all(param("packing", 2), param("seed", "x")),
          "10.1", "UnknownKindError",
          "sparse-lowrank packing 2 and seed 'x': packing's value is checked before seed's type"),
        # dtype and shape, then the base reference, then params, then blobs (10.1 step 5), for every kind
        f("order-base-before-params", without_base(small), param("layout", 7), "10.1", "IndexSchemaError",
          "a dense-delta record without its base reference and with layout 7: the base reference first"),
        f("order-removed-base-before-blobs", without_base(removed_with_blob, 4), Edits(), "10.1",
          "IndexSchemaError", "a removed record without its base reference and with a blob"),
        f("order-dtype-before-base", without_base(sign_small), record_edit("dtype", "I8"), "10.1", "PayloadError",
          "a sign record of dtype I8 without a base reference: the dtype first"),
        f("order-shape-before-base", slr_rank_zero,
          edit_all(record_edit("shape", [huge, 1]), pop_in(("tensors", 0, "base"))), "10.1", "LimitError",
          "a sparse-lowrank record of shape [2^32 + 1, 1] without a base reference: the shape first"),
        # errors the text did not name before
        f("removed-with-params", small, param("layout", 0, 4), "10.6", "IndexSchemaError",
          "a removed record whose params are {layout: 0}, not empty"),
        f("sha256-short", small, set_in(("tensors", 0, "base", "sha256"), bytes(31)), "6.3", "IndexSchemaError",
          "a base reference's sha256 of 31 bytes"),
        f("digest-long", small, set_in(("base", "digest"), bytes(33)), "6.3", "IndexSchemaError",
          "a base digest of 33 bytes"),
        f("metadata-not-text", small, set_in(("checkpoint_metadata",), {"format": 1}), "6.5", "IndexSchemaError",
          "checkpoint_metadata whose value is an int"),
    ]


# --- the open-time and payload rules of kinds 5–8 ---------------------------------------------------


def kind_5_8_vectors() -> list:
    def f(name, source, edit, section, error, description):
        return FaultyVector(name, source, Edits(index=edit) if callable(edit) else edit, section, error, description)
    huge = 2**32 + 1
    more = lambda blobs: blobs + [Blob(b"")]  # noqa: E731
    return [
        # sparse-lowrank (10.9)
        f("sparse-lowrank-dtype", slr_hash_small, record_edit("dtype", "I32", also_base=True), "10.9",
          "PayloadError", "a sparse-lowrank record of dtype I32"),
        f("sparse-lowrank-one-dimension", slr_hash_small, record_edit("shape", [20], also_base=True), "10.9",
          "PayloadError", "a sparse-lowrank record of shape [20]"),
        f("sparse-lowrank-vector-too-long", slr_rank_zero, record_edit("shape", [huge, 1], also_base=True),
          "10.9", "LimitError", "a sparse-lowrank record of shape [2^32 + 1, 1]"),
        f("sparse-lowrank-missing-base", without_base(slr_hash_small), Edits(), "10.9", "IndexSchemaError",
          "a sparse-lowrank record without its base reference"),
        f("sparse-lowrank-base-dtype", slr_hash_small, set_in(("tensors", 0, "base", "dtype"), "BF16"), "10.9",
          "PayloadError", "a sparse-lowrank F16 record whose base reference is BF16"),
        f("sparse-lowrank-missing-param", slr_hash_small, pop_in(("tensors", 0, "params", "seed")), "10.9",
          "IndexSchemaError", "sparse-lowrank params without seed"),
        f("sparse-lowrank-unknown-packing", slr_hash_small, param("packing", 2), "10.9", "UnknownKindError",
          "sparse-lowrank packing 2"),
        f("sparse-lowrank-unknown-mask", slr_hash_small, param("mask", 3), "10.9", "UnknownKindError",
          "sparse-lowrank mask 3"),
        f("sparse-lowrank-bitmask-with-seed", slr_bitmask_small, param("seed", 1), "10.9", "PayloadError",
          "a sparse-lowrank record with a bitmask and seed 1"),
        f("sparse-lowrank-float-group-size", slr_hash_small, group_edit([[0, 1, 16, 4], [1, 2, 4, 2]]), "10.9",
          "PayloadError", "a float16 bit group (bits 16) with group_size 4"),
        f("sparse-lowrank-rank-zero-blob", with_blobs(slr_rank_zero, lambda b: [Blob(bytes(4))]), Edits(), "10.9",
          "PayloadError", "a sparse-lowrank record of rank 0 with a blob"),
        f("sparse-lowrank-length-above", with_blob(0, lambda raw: raw + bytes(4096), slr_hash_small), Edits(),
          "10.9", "PayloadError", "a sparse-lowrank blob longer than with every element kept"),
        f("sparse-lowrank-length-inexact", with_blob(0, lambda raw: raw + bytes(4), slr_hash_small), Edits(),
          "10.9", "PayloadError", "a sparse-lowrank blob 4 bytes longer than its mask gives, within the bounds"),
        f("sparse-lowrank-mask-padding", with_blob(0, poke_or(9, 0x80), slr_bitmask_small), Edits(), "11",
          "PayloadError", "a nonzero padding bit after the V mask of a sparse-lowrank record"),
        f("sparse-lowrank-section-padding", with_blob(0, poke(10, 1), slr_bitmask_small), Edits(), "10.9",
          "PayloadError", "a nonzero byte between the V mask and the U mask"),
        f("sparse-lowrank-not-finite", with_blob(0, splice(16, b"\x00\x7c"), slr_hash_small), Edits(), "10.9",
          "PayloadError", "a float16 +infinity among the V values"),
        # sign (10.10)
        f("sign-dtype", sign_small, record_edit("dtype", "F64", also_base=True), "10.10", "PayloadError",
          "a sign record of dtype F64"),
        f("sign-three-dimensions", sign_small, record_edit("shape", [3, 5, 2], also_base=True), "10.10",
          "PayloadError", "a sign record of shape [3, 5, 2]"),
        f("sign-missing-base", without_base(sign_small), Edits(), "10.10", "IndexSchemaError",
          "a sign record without its base reference"),
        f("sign-unknown-packing", sign_small, param("packing", 0), "10.10", "UnknownKindError",
          "sign packing 0"),
        f("sign-extra-param", sign_small, param("rank", 1), "10.10", "IndexSchemaError",
          "a sign record with a param 'rank'"),
        f("sign-no-blob", with_blobs(sign_small, lambda b: []), Edits(), "10.10", "PayloadError",
          "a sign record without its blob"),
        f("sign-length-below", with_blob(0, lambda raw: raw[:8], sign_small), Edits(), "10.10", "PayloadError",
          "a sign blob shorter than its 3 row scales"),
        f("sign-scale-not-finite", with_blob(0, splice(0, b"\x00\x00\xc0\x7f"), sign_small), Edits(), "10.10",
          "PayloadError", "a sign row scale that is a NaN"),
        f("sign-padding-bits", with_blob(0, poke_or(14, 0x80), sign_small), Edits(), "11", "PayloadError",
          "a nonzero padding bit after 20 sign bits"),
        # lowrank (10.11)
        f("lowrank-base-dtype", lowrank_small, set_in(("tensors", 0, "base", "dtype"), "F16"), "10.11",
          "PayloadError", "a lowrank BF16 record whose base reference is F16"),
        f("lowrank-extra-param", lowrank_small, param("packing", 1), "10.11", "IndexSchemaError",
          "a lowrank record with a param 'packing'"),
        f("lowrank-length-differs", with_blob(0, lambda raw: raw + bytes(4), lowrank_small), Edits(), "10.11",
          "PayloadError", "a lowrank blob 4 bytes longer than its rank gives"),
        f("lowrank-rank-zero-blob", lowrank_small, param("rank", 0), "10.11", "PayloadError",
          "a lowrank record of rank 0 with a blob"),
        f("lowrank-s-not-finite", with_blob(0, splice(0, b"\x00\x00\x80\x7f"), lowrank_small), Edits(), "10.11",
          "PayloadError", "a lowrank S value that is +infinity"),
        # sparse (10.12)
        f("sparse-dtype", sparse_small, record_edit("dtype", "U16", also_base=True), "10.12", "PayloadError",
          "a sparse record of dtype U16"),
        f("sparse-missing-base", without_base(sparse_small), Edits(), "10.12", "IndexSchemaError",
          "a sparse record without its base reference"),
        f("sparse-bitmask-with-drop", sparse_bitmask_small, param("drop", 5), "10.12", "PayloadError",
          "a sparse record with a bitmask and drop 5"),
        f("sparse-two-blobs", with_blobs(sparse_small, more), Edits(), "10.12", "PayloadError",
          "a sparse record with two blobs"),
        f("sparse-length-above", with_blob(0, lambda raw: raw + bytes(64), sparse_small), Edits(), "10.12",
          "PayloadError", "a sparse blob longer than with every element kept"),
        f("sparse-not-finite", with_blob(0, splice(0, b"\x00\x7e"), sparse_small), Edits(), "10.12",
          "PayloadError", "a sparse value that is a float16 NaN"),
        f("sparse-mask-padding", with_blob(0, poke_or(1, 0x80), sparse_bitmask_small), Edits(), "11",
          "PayloadError", "a nonzero padding bit after the 11 bits of a sparse bitmask"),
    ]


# --- the index: arity, limits and types the first vectors left out ----------------------------------


def index_vectors() -> list:
    def f(name, edit, section, error, description, source=small):
        return FaultyVector(name, source, Edits(index=edit), section, error, description)
    return [
        f("format-one-item", set_in(("format",), [1]), "6.5", "IndexSchemaError", "format [1]"),
        f("format-three-items", set_in(("format",), [1, 0, 0]), "6.3", "LimitError",
          "format [1, 0, 0]: an array(2) of 3 items"),
        f("format-minor-too-large", set_in(("format",), [1, 65536]), "14", "LimitError", "format [1, 65536]"),
        f("format-not-int", set_in(("format",), ["1", 0]), "6.5", "IndexSchemaError", "format ['1', 0]"),
        f("kind-too-large", record_edit("kind", 2**32), "14", "LimitError", "record kind 2^32"),
        f("crc-too-large", set_in(("tensors", 0, "blobs", 0, "crc32"), 2**32), "14", "LimitError",
          "a blob crc32 of 2^32"),
        f("creator-too-long", set_in(("creator",), "c" * 257), "14", "LimitError", "a creator of 257 bytes"),
        f("method-name-too-long", set_in(("method", "name"), "m" * 65), "14", "LimitError",
          "a method name of 65 bytes"),
        f("dtype-name-too-long", record_edit("dtype", "F" * 17, 2), "14", "LimitError",
          "a dtype name of 17 bytes"),
        f("name-with-nul", record_edit("name", "he\0ad", 2), "6.3", "IndexSchemaError",
          "a tensor name containing U+0000"),
        f("ext-not-a-map", record_edit("ext", 1), "6.4", "IndexSchemaError", "a record whose ext is an int"),
        f("method-params-missing", pop_in(("method", "params")), "6.5", "IndexSchemaError",
          "a method without params"),
        f("tensors-not-array", set_in(("tensors",), {}), "6.5", "IndexSchemaError", "tensors that is a map"),
    ]


# --- attachment names (13) -----------------------------------------------------------------------------


def attachment_vectors() -> list:
    def named(name, value, description, error="FormatError", section="13", which=0):
        return FaultyVector(name, small, Edits(index=set_in(("attachments", which, "name"), value)), section,
                            error, description)
    return [
        named("attachment-backslash", "dir\\config.json", "an attachment name with a backslash"),
        named("attachment-absolute", "/config.json", "an attachment name that begins with '/'"),
        named("attachment-drive-letter", "C:config.json", "an attachment name that begins with a drive letter"),
        named("attachment-empty-component", "tokenizer//vocab.txt", "an attachment name with '//'", which=1),
        named("attachment-trailing-slash", "config.json/", "an attachment name that ends with '/'"),
        named("attachment-dot-component", "./config.json", "an attachment name with a '.' component"),
        named("attachment-weights", "model.safetensors", "an attachment named model.safetensors"),
        named("attachment-weights-index", "model.safetensors.index.json",
              "an attachment named model.safetensors.index.json"),
        named("attachment-nested-weights", "extra/more.safetensors", "an attachment name ending in .safetensors"),
        named("attachment-inside-another", "tokenizer", "attachments 'tokenizer' and 'tokenizer/vocab.txt'"),
        named("attachment-duplicate", "tokenizer/vocab.txt", "two attachments named 'tokenizer/vocab.txt'",
              "DuplicateKeyError", "6.9"),
        named("attachment-name-too-long", "a" * 256, "an attachment name of 256 bytes", "LimitError", "14"),
        named("attachment-name-nul", "config\0.json", "an attachment name containing U+0000", "IndexSchemaError",
              "6.3"),
    ]


# --- zstd frame headers field by field (8.1) -----------------------------------------------------------


FRAME_CONTENT = bytes(range(256)) * 300  # 76800 bytes, not one repeated byte: raw blocks


def zstd_header_fields() -> File:
    """Attachments whose frames use every form of the header fields that section 8.1 reads."""
    rng = Stream(34)
    w = rng.floats((2, 2), "F16")
    frames = [
        ("fcs-1-byte.bin", FRAME_CONTENT[:200], {"fcs_bytes": 1}),
        ("fcs-2-bytes.bin", FRAME_CONTENT[:300], {"fcs_bytes": 2}),  # stored as 300 − 256 = 44
        ("fcs-2-bytes-max.bin", FRAME_CONTENT[:65791], {"fcs_bytes": 2}),  # 65535 + 256
        ("fcs-4-bytes.bin", FRAME_CONTENT[:70000], {"fcs_bytes": 4}),
        ("dictionary-id-zero.bin", FRAME_CONTENT[:100], {"dict_id": 0, "did_bytes": 1}),
        ("unused-bit.bin", FRAME_CONTENT[:100], {"extra_bits": 0x10}),
        ("window-mantissa.bin", FRAME_CONTENT, {"window_log": 26, "window_mantissa": 7}),  # 2^26 + 7·2^23
        ("window-largest.bin", FRAME_CONTENT[:1000], {"window_log": 27}),  # exactly 2^27
    ]
    attachments = [(name, Blob(raw, zstd_frame(raw, **kw))) for name, raw, kw in frames]
    return File([dense_delta("w", "F16", w, nudged(rng, w))], attachments, minor=0)


def big_full_zero_frame() -> File:
    """A U8 [2^27 + 8] full record whose single-segment frame's window (its content size) is too large."""
    size = 2**27 + 8
    rec = Record("big", 2, "U8", (size,), {"layout": 0}, [Blob(b"", zero_frame(size), raw_length=size)])
    return File([rec], minor=0)


def zstd_vectors() -> list:
    raw = bytes(16)
    return [
        ValidVector("zstd-header-fields", "uncommon", zstd_header_fields, "8.1", 0,
                    "zstd frames with a 1-byte (single segment), 2-byte (content size − 256) and 4-byte "
                    "Frame_Content_Size, a Dictionary_ID field holding 0, the unused header bit set, a window "
                    "descriptor with a mantissa (2^26 + 7·2^23 bytes) and one of exactly 2^27 bytes"),
        FaultyVector("zstd-reserved-bit", dense_with_stored(zstd_frame(raw, extra_bits=0x08)), Edits(), "8.1",
                     "PayloadError", "a zstd frame header with the reserved bit set"),
        FaultyVector("zstd-window-mantissa", dense_with_stored(zstd_frame(raw, window_log=27, window_mantissa=1)),
                     Edits(), "8.1", "PayloadError",
                     "a zstd window descriptor of 2^27 + 2^24 bytes (exponent 17, mantissa 1)"),
        FaultyVector("zstd-single-segment-window", big_full_zero_frame, Edits(), "8.1", "PayloadError",
                     "a single-segment zstd frame whose window, its content size 2^27 + 8, exceeds 2^27 (4 KiB of "
                     "RLE blocks for a U8 [2^27 + 8] full record)"),
        FaultyVector("zstd-content-size-offset", dense_with_stored(zstd_frame(raw, content_size=16 + 256,
                                                                             fcs_bytes=2)),
                     Edits(), "8.1", "PayloadError",
                     "a 2-byte Frame_Content_Size field holding 16, which means 272 bytes, for a 16-byte blob"),
    ]


# --- kind 9, adapted (10.13): a base of another dtype, or with fewer rows ---------------------------

CAST_NAN = {"F32": 0x7FC00000, "F16": 0x7E00, "BF16": 0x7FC0}


def cast(base: np.ndarray, base_dtype: str, dtype: str) -> np.ndarray:
    """The adapted base of 10.13 step 1: widened to float32, rounded to ``dtype``, NaNs as the cast NaN."""
    if base_dtype == dtype:
        return base
    wide = dtypes.to_float32(base, base_dtype)
    out = dtypes.from_float32(wide, dtype).copy()
    bits = out.view(f"<u{out.dtype.itemsize}")
    bits[np.isnan(wide)] = CAST_NAN[dtype]
    return out


def adapted(inner: Record, base: np.ndarray, base_dtype: str, new_rows: np.ndarray | None = None, *,
            layout: int = 0, compress: bool = False) -> Record:
    """An adapted record around ``inner`` (built against ``cast(base, ...)``), then ``new_rows`` whole."""
    blobs, shape = list(inner.blobs), tuple(inner.shape)
    if new_rows is not None:
        blobs += dense_array_blobs(new_rows, layout, compress)
        shape = (shape[0] + new_rows.shape[0], *shape[1:])
    e = inner.expected
    expected = {"codes": e["codes"], "count": e["count"]}
    if "factors" in e:
        expected.update(factors=e["factors"], factor_count=e["factor_count"])
    rows = np.zeros((0, *shape[1:]), inner.base.dtype) if new_rows is None else new_rows
    if "tensor" in e:
        expected["tensor"] = np.concatenate([np.asarray(e["tensor"]).reshape(inner.shape), rows])
    else:
        values = as_float64(inner.base, inner.dtype) + e["delta"]
        atol = e["bound"] + ulp(np.abs(values) + e["bound"], inner.dtype)
        expected["values"] = np.concatenate([values, as_float64(rows, inner.dtype)])
        expected["atol"] = np.concatenate([atol, np.zeros(rows.shape)])
    params = {"inner": inner.kind, "layout": layout, "inner_params": inner.params}
    return Record(inner.name, 9, inner.dtype, shape, params, blobs, base, base_dtype, expected=expected)


def adapted_example() -> File:
    """The example of spec 10.13: BF16 [3, 2] against an F32 base [2, 2]."""
    base = np.array([[1.0, 0.1], [-2.0, 3.0]], "<f4")
    ft = storage(np.array([[1.0078125, 0.10009765625], [-1.9921875, 3.0]], np.float32), "BF16")
    inner = dense_delta("w", "BF16", cast(base, "F32", "BF16"), ft)
    return File([adapted(inner, base, "F32", storage(np.array([[0.5, -0.5]], np.float32), "BF16"))], minor=3)


def adapted_file() -> File:
    rng = Stream(40)
    records = []
    # cast F32 -> BF16 (a bf16 fine-tune of an fp32 base), lowrank-mixed inside
    base = rng.floats((12, 16), "F32", scale_bits=9)
    inner = lowrank_mixed(rng, "cast-lowrank", "BF16", cast(base, "F32", "BF16"), [[0, 2, 4, 8]])
    records.append(adapted(inner, base, "F32"))
    # cast BF16 -> F32 and growth: dense-delta in byte-planes (zstd), new rows in byte-planes
    base = rng.floats((6, 5), "BF16")
    grown = rng.floats((9, 5), "F32", scale_bits=11)
    inner = dense_delta("embed", "F32", cast(base, "BF16", "F32"), grown[:6], layout=1, compress=True)
    records.append(adapted(inner, base, "BF16", grown[6:], layout=1, compress=True))
    # growth alone (F16), sign inside, the new row zstd
    base = rng.floats((5, 8), "F16")
    inner = sign_rec(rng, "head", "F16", base, per_row=True)
    records.append(adapted(inner, base, "F16", rng.floats((2, 8), "F16"), compress=True))
    # cast F16 -> BF16, sparse (hash mask) inside
    base = rng.floats((4, 6), "F16")
    inner = sparse_rec(rng, "norm", "BF16", cast(base, "F16", "BF16"), mask=1, seed=9, drop=0x60000000)
    records.append(adapted(inner, base, "F16"))
    # a 1-D tensor grown by 3 elements, same dtype, dense-delta
    base = rng.floats((5,), "F32")
    inner = dense_delta("bias", "F32", base, nudged(rng, base))
    records.append(adapted(inner, base, "F32", rng.floats((3,), "F32")))
    return File(records, minor=3)


def adapted_edges() -> File:
    rng = Stream(41)
    # NaNs of any sign and payload, values beyond F16's range, subnormals: cast F32 -> F16, dense-delta inside
    base = storage(np.array([1.0, np.inf, -np.inf, 1e30, -1e30, 2.0**-20, -(2.0**-25), 0.0, -0.0, 1.0], np.float32),
                   "F32")
    base.view("<u4")[[0, 9]] = [0xFFC00001, 0x7F800123]  # a negative quiet NaN, a signalling NaN
    casted = cast(base, "F32", "F16")
    ft = nudged(rng, casted, 2)
    ft.view("<u2")[0] = 0x3C00  # the fine-tune need not keep the NaN
    records = [adapted(dense_delta("nan-cast", "F16", casted, ft), base, "F32")]
    # growth around a lowrank of rank 0 (no inner blob): the new rows' w blobs are all the record's
    base = rng.floats((3, 4), "BF16")
    inner = lowrank_rec(rng, "rank-zero", "BF16", base, 0)
    records.append(adapted(inner, base, "BF16", rng.floats((2, 4), "BF16"), layout=1))
    # a BF16 NaN cast to F32 (widening keeps every value, the NaN becomes the cast NaN)
    base = rng.floats((2, 2), "BF16")
    base[0, 1] = 0xFFC1
    casted = cast(base, "BF16", "F32")
    records.append(adapted(dense_delta("nan-widen", "F32", casted, nudged(rng, casted)), base, "BF16"))
    return File(records, minor=3)


def adapted_small() -> File:
    """The source of the faulty vectors: F32 -> BF16 with 2 new rows in byte-planes (blobs: 1 + 2)."""
    rng = Stream(42)
    base = rng.floats((3, 4), "F32")
    grown = rng.floats((5, 4), "BF16")
    inner = dense_delta("w", "BF16", cast(base, "F32", "BF16"), grown[:3])
    return File([adapted(inner, base, "F32", grown[3:], layout=1)], minor=3)


def adapted_lowrank_small() -> File:
    rng = Stream(43)
    base = rng.floats((6, 8), "F16")
    inner = lowrank_mixed(rng, "w", "BF16", cast(base, "F16", "BF16"), [[0, 1, 4, 8]])
    return File([adapted(inner, base, "F16")], minor=3)


def adapted_vectors() -> list:
    def f(name, source, edit, error, description):
        return FaultyVector(name, source, Edits(index=edit) if callable(edit) else edit, "10.13", error,
                            description)
    inner_param = lambda key, value: set_in(("tensors", 0, "params", "inner_params", key), value)  # noqa: E731
    return [
        ValidVector("adapted-example", "valid", adapted_example, "10.13", 3, "the worked example of section 10.13"),
        ValidVector("adapted", "valid", adapted_file, "10.13", 3,
                    "adapted records: F32 -> BF16 around lowrank-mixed; BF16 -> F32 with 3 new rows around "
                    "dense-delta (byte-planes, zstd); F16 grown by 2 rows around sign; F16 -> BF16 around sparse; "
                    "a 1-D F32 tensor grown by 3 elements"),
        ValidVector("adapted-edges", "uncommon", adapted_edges, "10.13", 3,
                    "the cast NaN: F32 NaNs of both signs and any payload, infinities, values beyond F16's range "
                    "and subnormals cast to F16; a BF16 NaN widened to F32; new rows after an inner record with "
                    "no blob (lowrank of rank 0)"),
        f("adapted-missing-base", without_base(adapted_small), Edits(), "IndexSchemaError",
          "an adapted record without its base reference"),
        f("adapted-same-as-base", adapted_small, edit_all(set_in(("tensors", 0, "base", "dtype"), "BF16"),
                                                          set_in(("tensors", 0, "base", "shape"), [5, 4])),
          "PayloadError", "an adapted record whose base reference has its dtype and shape"),
        f("adapted-cast-integer", adapted_small, set_in(("tensors", 0, "base", "dtype"), "I32"), "PayloadError",
          "an adapted BF16 record against an I32 base"),
        f("adapted-fewer-rows", adapted_small, set_in(("tensors", 0, "base", "shape"), [6, 4]), "PayloadError",
          "an adapted record of 5 rows against a base of 6"),
        f("adapted-other-dimension", adapted_small, set_in(("tensors", 0, "base", "shape"), [3, 5]),
          "PayloadError", "an adapted record [5, 4] against a base [3, 5]"),
        f("adapted-nested", adapted_small, param("inner", 9), "UnknownKindError", "an adapted record with inner 9"),
        f("adapted-inner-full", adapted_small, param("inner", 2), "UnknownKindError",
          "an adapted record with inner 2 (full, which reads no base)"),
        f("adapted-inner-not-int", adapted_small, param("inner", "1"), "IndexSchemaError",
          "an adapted record whose inner is a string"),
        f("adapted-unknown-layout", adapted_small, param("layout", 2), "UnknownKindError",
          "an adapted record with layout 2"),
        f("adapted-inner-params-not-map", adapted_small, param("inner_params", [1, 0]), "IndexSchemaError",
          "an adapted record whose inner_params is an array"),
        f("adapted-missing-inner-params", adapted_small, pop_in(("tensors", 0, "params", "inner_params")),
          "IndexSchemaError", "an adapted record without inner_params"),
        f("adapted-extra-param", adapted_small, param("ext", {}), "IndexSchemaError",
          "an adapted record with a param 'ext'"),
        f("adapted-too-few-blobs", with_blobs(adapted_small, lambda b: b[:1]), Edits(), "PayloadError",
          "an adapted record with 1 blob where its new rows alone need 2"),
        f("adapted-inner-blob-missing", with_blobs(adapted_small, lambda b: b[1:]), Edits(), "PayloadError",
          "an adapted record with the new rows' 2 blobs and no blob for its dense-delta"),
        f("adapted-new-rows-length", with_blobs(adapted_small, lambda b: b[:2] + [Blob(b[2].raw + b"\0")]),
          Edits(), "PayloadError", "an adapted record whose last new-row plane is 1 byte too long"),
        f("adapted-inner-transform", adapted_small, inner_param("transform", 0), "UnknownKindError",
          "an adapted record around a dense-delta of transform 0"),
        f("adapted-inner-groups", adapted_lowrank_small, inner_param("groups", [[0, 1, 9, 8]]), "PayloadError",
          "an adapted record around a lowrank-mixed group of 9 bits"),
        f("adapted-inner-length", with_blob(0, lambda raw: raw + bytes(4), adapted_lowrank_small), Edits(),
          "PayloadError", "an adapted record whose lowrank-mixed blob is 4 bytes too long"),
    ]


# --- version 1.3: the rans encoding (8.2) and lowrank-rotated (10.14) ---------------------------


def rans_blobs() -> File:
    """Byte planes, a lowrank-mixed blob and an attachment stored as rANS streams of 32 and 4 states."""
    rng = Stream(70)
    a = rng.floats((64, 16), "F32")
    rec_a = dense_delta("planes", "F32", a, nudged(rng, a), layout=1)
    rec_a.blobs = [rans(b.raw, 32 if k % 2 == 0 else 4) for k, b in enumerate(rec_a.blobs)]
    rec_b = lowrank_mixed(rng, "mixed", "F16", rng.floats((24, 40), "F16"), [[0, 2, 8, 16], [2, 6, 2, 16]])
    rec_b.blobs = [rans(rec_b.blobs[0].raw, 32)]
    text = b"rans attachment: " + bytes(rng.ints(300, 97, 101).astype(np.uint8))
    return File([rec_a, rec_b], [("notes.txt", rans(text, 4))], minor=3)


def rans_example() -> File:
    """Spec 8.2's example: the 6 bytes 01 01 01 02 01 03 of a U8 full record, 4 states, f = 4, 2, 2."""
    raw = bytes([1, 1, 1, 2, 1, 3])
    rec = full("bytes", "U8", np.frombuffer(raw, np.uint8).copy())
    rec.blobs = [rans(raw, 4, {1: 4, 2: 2, 3: 2})]
    assert rec.blobs[0].stored.hex() == "00060102010004020200000200001404000000010000080200"  # as the spec shows
    return File([rec], minor=3)


def rans_edges() -> File:
    """One-symbol streams (0 alone, 255 alone, frequency total 1), fewer symbols than 32 states, a run
    of symbols up to 255, a 2-byte size, and a stream of libhtscodecs."""
    raws = {"zeros": bytes(40), "ff": b"\xff" * 9, "short": bytes([3, 4, 5, 250, 3]),
            "run": bytes(range(240, 256)) * 3, "long": bytes((i * 7) % 5 for i in range(300))}
    records = []
    for i, (name, raw) in enumerate(raws.items()):
        rec = full(name, "U8", np.frombuffer(raw, np.uint8).copy())
        freqs = {raw[0]: 1} if len(set(raw)) == 1 and name == "zeros" else None
        rec.blobs = [rans(raw, 32 if i % 2 == 0 else 4, freqs)]
        records.append(rec)
    lib = full("htscodecs", "U8", np.frombuffer(HTSCODECS_CONTENT, np.uint8).copy())
    lib.blobs = [Blob(HTSCODECS_CONTENT, HTSCODECS_STREAM, coding=2)]
    return File(records + [lib], minor=3)


def rans_with(stream: bytes, raw: bytes = bytes([1, 1, 1, 2, 1, 3])) -> Callable[[], File]:
    """A U8 full record whose one blob is ``stream`` as a rans blob of ``raw``."""
    def build() -> File:
        rec = full("bytes", "U8", np.frombuffer(raw, np.uint8).copy())
        rec.blobs = [Blob(raw, stream, coding=2)]
        return File([rec], minor=3)
    return build


def rans_vectors() -> list:
    example = rans_stream(bytes([1, 1, 1, 2, 1, 3]), 4, {1: 4, 2: 2, 3: 2})  # 00 06 | 01 02 01 00 | 04 02 02 | x
    raw300 = bytes((i * 7) % 5 for i in range(300))
    worded = rans_stream(raw300, 4)  # reads words: a stream to cut short
    assert len(worded) > 1 + 2 + len(rans_symbols(set(raw300))) + 5 + 4 * 4  # it has words after its states

    def f(name, stream, description, mode="reader", raw=bytes([1, 1, 1, 2, 1, 3])):
        return FaultyVector(name, rans_with(stream, raw), Edits(), "8.2", "PayloadError", description, mode)
    states = 1 + 1 + 4 + 3  # where the example's states start
    return [
        ValidVector("rans-blobs", "valid", rans_blobs, "8.2", 3,
                    "rans blobs of 32 and 4 states: the byte planes of an F32 dense-delta, a lowrank-mixed blob "
                    "and an attachment"),
        ValidVector("rans-example", "uncommon", rans_example, "8.2", 3,
                    "the example of spec 8.2: 6 bytes, 4 states, frequencies 4, 2, 2 (total 8)"),
        ValidVector("rans-edges", "uncommon", rans_edges, "8.2", 3,
                    "rans streams of one symbol (0 alone with total 1, 255 alone), 5 symbols with 32 states, a run "
                    "of symbols up to 255, a 2-byte size, and a stream written by libhtscodecs"),
        f("rans-flags-order-1", b"\x01" + example[1:], "rans flags 0x01 (order 1)"),
        f("rans-flags-stripe", b"\x0c" + example[1:], "rans flags 0x0c (32 states, striped)"),
        f("rans-size-mismatch", example[:1] + b"\x07" + example[2:], "a rans size of 7 for a 6-byte blob"),
        f("rans-size-long-form", example[:1] + b"\x80\x06" + example[2:], "a rans size 80 06 (not the shortest)"),
        f("rans-symbol-run-past-255", example[:2] + b"\xfe\xff\x05\x00" + example[6:],
          "a rans symbol list whose run passes 255"),
        f("rans-frequency-zero", example[:6] + b"\x04\x02\x00" + example[9:], "a rans frequency of 0"),
        f("rans-frequency-total", example[:6] + b"\x04\x02\x01" + example[9:],
          "rans frequencies totalling 7 (not a power of two)"),
        f("rans-frequency-total-above", example[:6] + uint7(8188) + b"\x02\x02" + example[9:],
          "rans frequencies totalling 8192 (above 4096)"),
        f("rans-state-low", example[:states] + struct.pack("<I", 0x7FFF) + example[states + 4:],
          "a rans state below 2^15"),
        f("rans-state-high", example[:states] + struct.pack("<I", 0x80000000) + example[states + 4:],
          "a rans state of 2^31"),
        f("rans-states-truncated", example[:states + 10], "a rans stream that ends inside its states"),
        f("rans-missing-word", worded[:-2], "a rans stream that ends before the word its last symbols need",
          "verifier", raw300),
        f("rans-trailing-bytes", example + b"\x00\x00", "two bytes after the end of a rans stream", "verifier"),
        f("rans-state-end", example[:states + 8] + struct.pack("<I", 0x10001) + example[states + 12:],
          "a rans stream whose third state ends at 2^15 + 1 (it decodes the same bytes)", "verifier"),
    ]


def lowrank_rotated_file() -> File:
    rng = Stream(80)
    records = [lowrank_rotated(rng, "a", "F16", rng.floats((16, 24), "F16"), [[0, 2, 8, 8], [2, 5, 3, 8]],
                               v_rotation=1, u_rotation=1, seed=0x0123456789ABCDEF),
               lowrank_rotated(rng, "b", "BF16", rng.floats((12, 32), "BF16"), [[0, 3, 4, 16]],
                               v_rotation=1, u_rotation=0, seed=5, compress=True),
               lowrank_rotated(rng, "c", "F32", rng.floats((8, 8), "F32"), [[0, 1, 8, 8], [1, 3, 2, 4]],
                               v_rotation=0, u_rotation=1, seed=2**63)]
    return File(records, minor=3)


def lowrank_rotated_edges() -> File:
    rng = Stream(81)
    records = [lowrank_rotated(rng, "rank0", "F32", rng.floats((4, 4), "F32"), [], v_rotation=1, u_rotation=1,
                               seed=1),
               lowrank_rotated(rng, "odd", "F16", rng.floats((6, 5), "F16"), [[0, 2, 3, 5]],
                               v_rotation=1, u_rotation=1, seed=2**64 - 1),
               lowrank_rotated(rng, "plain", "F32", rng.floats((4, 8), "F32"), [[0, 1, 2, 8]],
                               v_rotation=0, u_rotation=0, seed=0)]
    return File(records, minor=3)


def rotated_small() -> File:
    return File([lowrank_rotated(Stream(82), "w", "F32", Stream(83).floats((8, 4), "F32"), [[0, 2, 4, 4]],
                                 v_rotation=1, u_rotation=1, seed=3)], minor=3)


def rotation_vectors() -> list:
    def f(name, edit, error, description, source=rotated_small):
        return FaultyVector(name, source, Edits(index=edit) if callable(edit) else edit, "10.14", error,
                            description)
    return [
        ValidVector("lowrank-rotated", "valid", lowrank_rotated_file, "10.14", 3,
                    "lowrank-rotated records: both sides rotated (F16, blocks of 8 and 16), V alone (BF16, zstd), "
                    "U alone (F32)"),
        ValidVector("lowrank-rotated-edges", "uncommon", lowrank_rotated_edges, "10.14", 3,
                    "lowrank-rotated of rank 0, of odd and short lengths (blocks of 1 and 2) with seed 2^64 − 1, and "
                    "with both rotations none"),
        f("lowrank-rotated-unknown-rotation", param("v_rotation", 2), "UnknownKindError", "v_rotation 2"),
        f("lowrank-rotated-u-rotation-type", param("u_rotation", True), "IndexSchemaError",
          "u_rotation true (a bool, not an int)"),
        f("lowrank-rotated-unknown-packing", param("packing", 2), "UnknownKindError", "lowrank-rotated packing 2"),
        f("lowrank-rotated-negative-seed", param("seed", -1), "PayloadError", "a lowrank-rotated seed of −1"),
        f("lowrank-rotated-missing-seed", pop_in(("tensors", 0, "params", "seed")), "IndexSchemaError",
          "lowrank-rotated params without seed"),
        f("lowrank-rotated-one-dimension", record_edit("shape", [32], also_base=True), "PayloadError",
          "a lowrank-rotated record of shape [32]"),
        f("lowrank-rotated-length", Edits(), "PayloadError", "a lowrank-rotated blob 4 bytes longer than its groups "
          "need", with_blob(0, lambda raw: raw + bytes(4), rotated_small)),
        f("lowrank-rotated-order", edit_all(param("v_rotation", 7), param("seed", -1)), "UnknownKindError",
          "v_rotation 7 and seed −1: the params are checked in the order of the table"),
    ]


FAMILIES = (core_vectors, rounding_vectors, edge_rule_vectors, param_rule_vectors, kind_5_8_vectors,
            index_vectors, attachment_vectors, zstd_vectors, adapted_vectors, rans_vectors, rotation_vectors)


# --- expected results (spec 19.2) and the manifest (19.1) -----------------------------------------

PRECISION = {"F32": (24, -126), "F16": (11, -14), "BF16": (8, -126)}  # significand bits, smallest exponent


def ulp(magnitude: np.ndarray, dtype: str) -> np.ndarray:
    """The gap between consecutive values of ``dtype`` at each magnitude (19.2)."""
    bits, emin = PRECISION[dtype]
    _, exp = np.frexp(magnitude)  # magnitude = f·2^exp with 0.5 ≤ f < 1, so floor(log2) = exp − 1
    exponent = np.maximum(np.where(magnitude > 0, exp - 1, emin), emin)
    return np.ldexp(1.0, exponent - bits + 1)


def digest(data: bytes | None, count: int) -> dict | None:
    return None if data is None else {"count": int(count), "sha256": sha(data)}


def tensor_expected(rec: Record) -> dict:
    out = {"kind": KIND_NAMES[rec.kind], "dtype": rec.dtype, "shape": list(rec.shape),
           "codes": None, "factors": None, "sha256": None, "values": None, "atol": None}
    e = rec.expected
    if rec.kind == 3:
        return out
    out["codes"] = digest(e["codes"], e["count"])
    if "factors" in e:
        out["factors"] = digest(e["factors"], e["factor_count"])
    if "tensor" in e:
        out["sha256"] = sha(np.ascontiguousarray(e["tensor"]).tobytes())
        return out
    if "values" in e:  # an adapted record: computed against its adapted base, new rows appended
        out["values"], out["atol"] = e["values"].ravel().tolist(), e["atol"].ravel().tolist()
        return out
    values = as_float64(rec.base, rec.dtype) + e["delta"]
    atol = e["bound"] + ulp(np.abs(values) + e["bound"], rec.dtype)
    out["values"], out["atol"] = values.ravel().tolist(), atol.ravel().tolist()
    return out


def expected_of(f: File, data: bytes) -> dict:
    return {"sha256": sha(data), "tensors": {r.name: tensor_expected(r) for r in f.records},
            "attachments": {name: sha(blob.raw) for name, blob in f.attachments}}


def to_json(obj) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode()


def all_vectors() -> list:
    vectors = [v for family in FAMILIES for v in family()]
    names = [v.name for v in vectors]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    return vectors


def build_all() -> dict[str, bytes]:
    """Every file under spec/vectors/ (except this script), by relative path."""
    files, manifest = {}, []
    vectors = all_vectors()
    for v in (v for v in vectors if isinstance(v, ValidVector)):
        made = v.build()
        f, edits = made if isinstance(made, tuple) else (made, Edits())
        data = assemble(f, edits)
        folder = f"{v.tier}/{v.name}"
        files[f"{folder}/vector.dcm"] = data
        files[f"{folder}/base.safetensors"] = base_file(f)
        files[f"{folder}/expected.json"] = to_json(expected_of(f, data))
        manifest.append({"path": f"{folder}/vector.dcm", "tier": v.tier, "min_version": [1, v.minor],
                         "section": v.section, "description": v.description, "base": f"{folder}/base.safetensors",
                         "expected": f"{folder}/expected.json", "error": None, "code": None, "mode": None,
                         "needs_base": False})
    for v in (v for v in vectors if isinstance(v, FaultyVector)):
        f = v.source()
        files[f"faulty/{v.name}.dcm"] = assemble(f, v.edits)
        base = None
        if v.base is not None:
            base = f"faulty/{v.name}.base.safetensors"
            files[base] = v.base()
        manifest.append({"path": f"faulty/{v.name}.dcm", "tier": "faulty", "min_version": [1, f.minor],
                         "section": v.section, "description": v.description, "base": base, "expected": None,
                         "error": v.error, "code": getattr(errors, v.error).code, "mode": v.mode,
                         "needs_base": v.base is not None})
    files["index.json"] = to_json({"format": "dcm conformance vectors", "spec": "spec/dcm-format.md section 19",
                                   "generator": "spec/vectors/generate.py", "vectors": manifest})
    return files


def on_disk() -> set[str]:
    return {str(p.relative_to(ROOT)) for tier in ("valid", "uncommon", "faulty") if (ROOT / tier).exists()
            for p in (ROOT / tier).rglob("*") if p.is_file()} | ({"index.json"} & {p.name for p in ROOT.iterdir()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = parser.parse_args(argv)
    files = build_all()
    if args.check:
        differ = sorted(p for p, data in files.items() if not (ROOT / p).is_file() or (ROOT / p).read_bytes() != data)
        extra = sorted(on_disk() - set(files))
        for p in differ:
            print(f"differs or missing: spec/vectors/{p}")
        for p in extra:
            print(f"not generated: spec/vectors/{p}")
        print(f"{len(files)} files, {len(differ)} differ, {len(extra)} extra")
        return 1 if differ or extra else 0
    for p in on_disk() - set(files):
        (ROOT / p).unlink()
    for p, data in files.items():
        (ROOT / p).parent.mkdir(parents=True, exist_ok=True)
        (ROOT / p).write_bytes(data)
    print(f"wrote {len(files)} files under {ROOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
