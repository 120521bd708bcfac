#!/usr/bin/env python3
"""dcmref: an independent reader, verifier and decoder of the `.dcm` format.

Written from spec/dcm-format.md (version 1.3) alone, without the reference
package `dcm`.  Section numbers in comments ("§8") refer to that document.

    import dcmref
    result = dcmref.decode("file.dcm", base="base.safetensors")

Dependencies: the Python 3.11 standard library, numpy, and `zstandard` (only
to decompress a zstd frame whose header this module has already checked).
"""

import hashlib
import json
import struct
import sys
import zlib

import numpy as np
import zstandard

__all__ = ["decode", "Decoded", "TensorResult", "DcmRefError"]


# ---------------------------------------------------------------- §15 errors
#
# One class per error of §15, named as there; `code` and `number` are the
# language-neutral code of the error registry, which conformance compares.

class DcmRefError(Exception):
    """The spec's DcmError: base of every error below (exit code 1)."""
    code, number, exit_code = "E_DCM", 1, 1


class UsageError(DcmRefError):
    code, number, exit_code = "E_USAGE", 2, 2


class CheckpointError(DcmRefError):
    """§15: an input safetensors checkpoint (the base) is unusable."""
    code, number, exit_code = "E_CHECKPOINT", 4, 3


class FormatError(DcmRefError):
    code, number, exit_code = "E_FORMAT", 10, 3


class BadMagicError(FormatError):
    code, number = "E_BAD_MAGIC", 11


class UnsupportedVersionError(FormatError):
    code, number = "E_UNSUPPORTED_VERSION", 12


class UnknownFlagError(FormatError):
    code, number = "E_UNKNOWN_FLAG", 13


class TruncatedError(FormatError):
    code, number = "E_TRUNCATED", 14


class TrailingDataError(FormatError):
    code, number = "E_TRAILING_DATA", 15


class LayoutError(FormatError):
    code, number = "E_LAYOUT", 16


class IndexSchemaError(FormatError):
    code, number = "E_INDEX_SCHEMA", 17


class DuplicateKeyError(IndexSchemaError):
    code, number = "E_DUPLICATE_KEY", 18


class LimitError(FormatError):
    code, number = "E_LIMIT", 19


class UnknownKindError(FormatError):
    code, number = "E_UNKNOWN_KIND", 20


class PayloadError(FormatError):
    code, number = "E_PAYLOAD", 21


class ChecksumError(DcmRefError):
    code, number, exit_code = "E_CHECKSUM", 30, 4


class HeaderChecksumError(ChecksumError):
    code, number = "E_HEADER_CHECKSUM", 31


class PayloadChecksumError(ChecksumError):
    code, number = "E_PAYLOAD_CHECKSUM", 32


class WrongBaseError(DcmRefError):
    code, number, exit_code = "E_WRONG_BASE", 40, 5


# ------------------------------------------------------ constants (§3, §14)

MAGIC = b"\x89DCM\r\n\x1a\n"
MAX_INDEX_BYTES = 1 << 26
MAX_TENSORS = 1 << 20
MAX_ATTACHMENTS = 4096
MAX_NAME_BYTES = 512
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 48
MAX_DEPTH = 16
MAX_BLOBS_PER_RECORD = 4096
MAX_ATTACHMENT_BYTES = 1 << 24
MAX_WINDOW_BYTES = 1 << 27
MAX_BIT_GROUPS = 64
MAX_QUANT_GROUP_SIZE = 65536
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

# §9: dtype name -> element width in bytes.
DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4,
          "U64": 8, "I64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F16": 2,
          "BF16": 2, "F32": 4, "F64": 8}
LOSSY_DTYPES = ("F32", "F16", "BF16")

# §10 registry of kinds.
KINDS = {1: "dense-delta", 2: "full", 3: "removed", 4: "lowrank-mixed",
         5: "sparse-lowrank", 6: "sign", 7: "lowrank", 8: "sparse", 9: "adapted", 10: "lowrank-rotated"}
ADAPTED_INNER = (1, 4, 5, 6, 7, 8, 10)  # §10.13 param `inner`
CAST_NAN = {"F32": 0x7FC00000, "F16": 0x7E00, "BF16": 0x7FC0}  # §10.13 decoding step 1
ENC_RAW, ENC_ZSTD, ENC_RANS = 0, 1, 2   # §8, §8.2
ROT_NONE, ROT_HADAMARD = 0, 1     # §10.14
PLAIN, BYTE_PLANES = 0, 1         # §10.2
SUB_ZIGZAG = 1                    # §10.3
LSB_FIRST = 1                     # §11
MASK_HASH, MASK_BITMASK = 1, 2    # §10.9, §10.12


def align_up(x, a):
    """§1.3."""
    return (x + a - 1) // a * a


def ceil_div(x, y):
    return -(-x // y)


# ---------------------------------------------------- §6.1, §6.2 msgpack

class _Unpacker:
    """Strict decoder of the msgpack subset of §6.1 under rules D1-D7."""

    def __init__(self, buf):
        self.buf = buf
        self.pos = 0

    def take(self, n):
        if n > len(self.buf) - self.pos:
            raise IndexSchemaError("index: truncated msgpack object (D1)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n):
        return int.from_bytes(self.take(n), "big")

    def value(self, level):
        """Decode one value; `level` is the number of enclosing containers."""
        t = self.take(1)[0]
        if t <= 0x7F:
            return t
        if t >= 0xE0:
            return t - 0x100
        if t <= 0x8F:
            return self.map(t & 0x0F, level)
        if t <= 0x9F:
            return self.array(t & 0x0F, level)
        if t <= 0xBF:
            return self.text(t & 0x1F)
        return self.other(t, level)

    def other(self, t, level):
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if t in simple:
            return simple[t]
        if t in (0xC4, 0xC5, 0xC6):
            return bytes(self.take(self.uint(1 << (t - 0xC4))))
        if 0xC7 <= t <= 0xC9 or 0xD4 <= t <= 0xD8:
            raise IndexSchemaError("index: msgpack ext value (D2)")
        if t == 0xCA:
            return struct.unpack(">f", self.take(4))[0]
        if t == 0xCB:
            return struct.unpack(">d", self.take(8))[0]
        if 0xCC <= t <= 0xCF:
            return self.uint(1 << (t - 0xCC))
        if 0xD0 <= t <= 0xD3:
            return int.from_bytes(self.take(1 << (t - 0xD0)), "big", signed=True)
        if 0xD9 <= t <= 0xDB:
            return self.text(self.uint(1 << (t - 0xD9)))
        if t in (0xDC, 0xDD):
            return self.array(self.uint(2 if t == 0xDC else 4), level)
        if t in (0xDE, 0xDF):
            return self.map(self.uint(2 if t == 0xDE else 4), level)
        raise IndexSchemaError("index: malformed msgpack (byte 0xc1, D1)")

    def text(self, n):
        try:
            return bytes(self.take(n)).decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise IndexSchemaError("index: str is not valid UTF-8 (D3)") from None

    def enter(self, level):
        # D6, enforced while decoding: a container at nesting level L has
        # depth >= L, so refuse to open one deeper than MAX_DEPTH.
        if level + 1 > MAX_DEPTH:
            raise LimitError(f"index: msgpack nesting deeper than {MAX_DEPTH} (D6)")
        return level + 1

    def array(self, count, level):
        inner = self.enter(level)
        return [self.value(inner) for _ in range(count)]

    def map(self, count, level):
        inner = self.enter(level)
        out = {}
        for _ in range(count):
            key = self.key()
            if key in out:
                raise DuplicateKeyError(f"index: map repeats the key {key!r} (D5)")
            out[key] = self.value(inner)
        return out

    def key(self):
        t = self.buf[self.pos] if self.pos < len(self.buf) else None
        if t is None:
            raise IndexSchemaError("index: truncated msgpack object (D1)")
        if not (0xA0 <= t <= 0xBF or 0xD9 <= t <= 0xDB):
            raise IndexSchemaError("index: map key is not a str (D4)")
        return self.value(0)


def unpack_index(buf):
    """§6.2: exactly one msgpack map in `buf`."""
    unpacker = _Unpacker(bytes(buf))
    obj = unpacker.value(0)
    if unpacker.pos != len(unpacker.buf):
        raise IndexSchemaError("index: bytes after the msgpack object (D1)")
    if type(obj) is not dict:
        raise IndexSchemaError("index: not a msgpack map (D7)")
    return obj


# ------------------------------------------------------- §6.3 value types

def _is_int(v):
    return type(v) is int  # a bool is not an int (§6.1)


def s_uint(v, what, mx=U64_MAX):
    if not _is_int(v) or v < 0:
        raise IndexSchemaError(f"{what}: expected an unsigned int")
    if v > mx:
        raise LimitError(f"{what}: {v} exceeds {mx}")
    return v


def s_text(v, what, n):
    if type(v) is not str:
        raise IndexSchemaError(f"{what}: expected a str")
    if len(v.encode("utf-8")) > n:
        raise LimitError(f"{what}: longer than {n} bytes")
    if not v:
        raise IndexSchemaError(f"{what}: empty string")
    if "\0" in v:
        raise IndexSchemaError(f"{what}: contains U+0000")
    return v


def s_bytes(v, what, n):
    if type(v) is not bytes or len(v) != n:
        raise IndexSchemaError(f"{what}: expected bin of {n} bytes")
    return v


def s_map(v, what):
    if type(v) is not dict:
        raise IndexSchemaError(f"{what}: expected a map")
    return v


def s_array(v, what, n):
    if type(v) is not list:
        raise IndexSchemaError(f"{what}: expected an array")
    if len(v) > n:
        raise LimitError(f"{what}: more than {n} items")
    return v


def s_shape(v, what):
    s_array(v, what, MAX_DIMS)
    dims = tuple(s_uint(d, f"{what}[{i}]", MAX_ELEMENTS) for i, d in enumerate(v))
    if element_count(dims) > MAX_ELEMENTS:
        raise LimitError(f"{what}: more than 2^48 elements")
    return dims


def element_count(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def s_keys(m, what, required, optional=(), ext=True):
    """§6.4: schema map with exactly the listed keys (plus `ext`)."""
    s_map(m, what)
    for k in required:
        if k not in m:
            raise IndexSchemaError(f"{what}: missing key {k!r}")
    allowed = set(required) | set(optional) | ({"ext"} if ext else set())
    for k in m:
        if k not in allowed:
            raise IndexSchemaError(f"{what}: unknown key {k!r}")
    if ext and "ext" in m:
        s_map(m["ext"], f"{what}.ext")
    return m


# -------------------------------------------------- §6.5-6.9 index schema

class Blob:
    __slots__ = ("offset", "length", "encoding", "raw_length", "crc32", "where")

    def __init__(self, m, where):
        self.offset = m["offset"]
        self.length = m["length"]
        self.encoding = m["encoding"]
        self.raw_length = m["raw_length"]
        self.crc32 = m["crc32"]
        self.where = where


class BaseRef:
    __slots__ = ("dtype", "shape", "sha256")

    def __init__(self, dtype, shape, sha256):
        self.dtype, self.shape, self.sha256 = dtype, shape, sha256


class Record:
    __slots__ = ("name", "kind", "dtype", "shape", "params", "blobs", "base", "params_")

    @property
    def n(self):
        return element_count(self.shape)

    @property
    def what(self):
        return f"tensor {self.name!r}"


def check_blob(m, what):
    """§6.7."""
    s_keys(m, what, ("offset", "length", "encoding", "raw_length", "crc32"))
    for key in ("offset", "length", "encoding", "raw_length"):
        s_uint(m[key], f"{what}.{key}")
    s_uint(m["crc32"], f"{what}.crc32", U32_MAX)
    return Blob(m, what)


def check_record(m, i):
    """§6.6, §6.8."""
    what = f"tensors[{i}]"
    s_keys(m, what, ("name", "kind", "dtype", "shape", "params", "blobs"), ("base",))
    r = Record()
    r.name = s_text(m["name"], f"{what}.name", MAX_NAME_BYTES)
    what = f"tensor {r.name!r}"
    r.kind = s_uint(m["kind"], f"{what}: kind", U32_MAX)
    r.dtype = s_text(m["dtype"], f"{what}: dtype", 16)
    r.shape = s_shape(m["shape"], f"{what}: shape")
    r.params = s_map(m["params"], f"{what}: params")
    blobs = s_array(m["blobs"], f"{what}: blobs", MAX_BLOBS_PER_RECORD)
    r.blobs = [check_blob(b, f"{what} blob {j}") for j, b in enumerate(blobs)]
    r.base = None
    if "base" in m:
        b = s_keys(m["base"], f"{what}: base", ("dtype", "shape", "sha256"))
        r.base = BaseRef(s_text(b["dtype"], f"{what}: base.dtype", 16),
                         s_shape(b["shape"], f"{what}: base.shape"),
                         s_bytes(b["sha256"], f"{what}: base.sha256", 32))
    return r


def check_attachment(m, i):
    """§6.9, with the size limit of §13 (§16 step 5)."""
    what = f"attachments[{i}]"
    s_keys(m, what, ("name", "blob"))
    name = s_text(m["name"], f"{what}.name", 255)
    blob = check_blob(m["blob"], f"attachment {name!r} blob")
    if blob.raw_length > MAX_ATTACHMENT_BYTES:
        raise LimitError(f"attachment {name!r}: larger than 16 MiB")
    return name, blob


def check_unique(names, what):
    seen = set()
    for name in names:
        if name in seen:
            raise DuplicateKeyError(f"two {what} are named {name!r}")
        seen.add(name)


def check_index(idx):
    """§16 step 4 (and 5): the schema in the order of the tables of §6."""
    s_keys(idx, "index", ("format", "creator", "method", "base", "tensors"),
           ("attachments", "checkpoint_metadata"))
    fmt = s_array(idx["format"], "format", 2)
    if len(fmt) != 2:
        raise IndexSchemaError("format: expected 2 items")
    fmt = tuple(s_uint(v, "format", 65535) for v in fmt)
    s_text(idx["creator"], "creator", 256)
    method = s_keys(idx["method"], "method", ("name", "params"))
    s_text(method["name"], "method.name", 64)
    s_map(method["params"], "method.params")
    base = s_keys(idx["base"], "base", ("digest",))
    digest = s_bytes(base["digest"], "base.digest", 32)
    tensors = s_array(idx["tensors"], "tensors", MAX_TENSORS)
    records = [check_record(m, i) for i, m in enumerate(tensors)]
    check_unique([r.name for r in records], "records")
    atts = s_array(idx.get("attachments", []), "attachments", MAX_ATTACHMENTS)
    attachments = [check_attachment(m, i) for i, m in enumerate(atts)]
    check_unique([a[0] for a in attachments], "attachments")
    meta = idx.get("checkpoint_metadata")
    if meta is not None or "checkpoint_metadata" in idx:
        s_map(meta, "checkpoint_metadata")
        for k, v in meta.items():
            if type(v) is not str:
                raise IndexSchemaError(f"checkpoint_metadata[{k!r}]: not a str")
    return fmt, digest, records, attachments, meta


# ------------------------------------------------------------- §3 header

class Header:
    __slots__ = ("major", "minor", "alignment", "index_length", "file_length")


def parse_header(data):
    """§3.3 steps 1 to 10 (step 11, the CRC, is in open_file)."""
    if len(data) < 8 or data[:8] != MAGIC:
        raise BadMagicError("not a .dcm file (bad magic)")
    if len(data) < 64:
        raise TruncatedError("file shorter than the 64-byte header")
    h = Header()
    h.major, h.minor, required, _optional, h.alignment = struct.unpack_from("<HHIII", data, 8)
    h.index_length, h.file_length = struct.unpack_from("<QQ", data, 24)
    if h.major != 1:
        raise UnsupportedVersionError(f"major version {h.major} is not 1")
    if required != 0:
        raise UnknownFlagError(f"unknown required flags 0x{required:08x}")
    if any(data[40:60]):
        raise FormatError("reserved header bytes are not zero")
    a = h.alignment
    if a < 8 or a > 65536 or a & (a - 1):
        raise LayoutError(f"bad alignment {a}")
    if h.index_length > MAX_INDEX_BYTES:
        raise LimitError(f"index_length {h.index_length} exceeds 64 MiB")
    if len(data) < h.file_length:
        raise TruncatedError(f"file is {len(data)} bytes, header says {h.file_length}")
    if len(data) > h.file_length:
        raise TrailingDataError(f"file is {len(data)} bytes, header says {h.file_length}")
    if 64 + h.index_length > h.file_length:
        raise TruncatedError("index runs past the end of the file")
    return h


# ------------------------------------------------- §7 layout, §8 encodings

def blob_sequence(records, attachments):
    """§7: the blobs of every record in order, then of every attachment."""
    seq = [b for r in records for b in r.blobs]
    return seq + [blob for _, blob in attachments]


def check_layout(h, seq):
    """§7 packing rule (Python ints: no wrap-around, §1.5)."""
    d = align_up(64 + h.index_length, h.alignment)
    end = 0
    for b in seq:
        if b.offset != align_up(end, h.alignment):
            raise LayoutError(f"{b.where}: offset {b.offset}, expected {align_up(end, h.alignment)}")
        end = b.offset + b.length
        if d + end > h.file_length:
            raise LayoutError(f"{b.where}: runs past the end of the file")
    expected = d + end if seq else 64 + h.index_length
    if h.file_length != expected:
        raise LayoutError(f"file_length {h.file_length}, layout ends at {expected}")
    return d


def check_encodings(seq):
    """§8 / §16 step 7: what the index alone tells about each encoding."""
    for b in seq:
        if b.encoding not in (ENC_RAW, ENC_ZSTD, ENC_RANS):
            raise UnknownKindError(f"{b.where}: unknown encoding {b.encoding}")
        if b.encoding == ENC_RAW and b.length != b.raw_length:
            raise PayloadError(f"{b.where}: raw blob with length != raw_length")


def check_padding(data, h, d, seq):
    """§7 padding: every byte outside the index and the blobs is zero."""
    if not seq:
        return
    if any(data[64 + h.index_length:d]):
        raise LayoutError("nonzero padding after the index")
    end = 0
    for b in seq:
        if any(data[d + end:d + b.offset]):
            raise LayoutError(f"nonzero padding before {b.where}")
        end = b.offset + b.length


def zstd_frame_end(s, pos):
    """Walk the blocks of a frame (RFC 8878 §3.1.1.2); return its end."""
    while True:
        if pos + 3 > len(s):
            raise PayloadError("zstd: truncated frame")
        bh = int.from_bytes(s[pos:pos + 3], "little")
        btype, bsize = (bh >> 1) & 3, bh >> 3
        if btype == 3:
            raise PayloadError("zstd: reserved block type")
        pos += 3 + (1 if btype == 1 else bsize)
        if bh & 1:
            return pos


def zstd_header(s, raw_length, where):
    """§8 zstd rules 1-5 from the frame header (RFC 8878 §3.1.1)."""
    if len(s) < 5 or s[:4] != b"\x28\xb5\x2f\xfd":
        raise PayloadError(f"{where}: not a zstd frame")
    fhd = s[4]
    fcs_flag, single, checksum, did_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    if fhd & 0x08:
        raise PayloadError(f"{where}: zstd reserved bit set")
    pos, window = 5, None
    if not single:
        if len(s) < 6:
            raise PayloadError(f"{where}: truncated zstd header")
        exp, mant = s[5] >> 3, s[5] & 7
        window = (1 << (10 + exp)) + ((1 << (10 + exp)) >> 3) * mant
        pos = 6
    did_size = (0, 1, 2, 4)[did_flag]
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if pos + did_size + fcs_size > len(s):
        raise PayloadError(f"{where}: truncated zstd header")
    did = int.from_bytes(s[pos:pos + did_size], "little")
    pos += did_size
    if fcs_size == 0:
        raise PayloadError(f"{where}: zstd frame without Frame_Content_Size")
    fcs = int.from_bytes(s[pos:pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
    if fcs != raw_length:
        raise PayloadError(f"{where}: zstd content size {fcs} != raw_length {raw_length}")
    if (fcs if single else window) > MAX_WINDOW_BYTES:
        raise PayloadError(f"{where}: zstd window larger than 2^27")
    if did != 0:
        raise PayloadError(f"{where}: zstd dictionary id {did}")
    end = zstd_frame_end(s, pos + fcs_size) + 4 * checksum
    if end != len(s):
        raise PayloadError(f"{where}: bytes after the zstd frame")


def unzstd(s, raw_length, where):
    zstd_header(s, raw_length, where)
    if raw_length > (len(s) // 4 + 1) * 131072:  # the MAY of §8
        raise PayloadError(f"{where}: raw_length impossible for the frame size")
    try:
        d = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
        out = d.decompress(s, max_output_size=raw_length)
    except zstandard.ZstdError as e:
        raise PayloadError(f"{where}: zstd: {e}") from None
    if len(out) != raw_length:
        raise PayloadError(f"{where}: zstd output is {len(out)} bytes, not {raw_length}")
    return out


def read_blob(data, d, b):
    """§16 steps 11-13: CRC of the stored bytes first, then the encoding."""
    stored = data[d + b.offset:d + b.offset + b.length]
    if zlib.crc32(stored) & 0xFFFFFFFF != b.crc32:
        raise PayloadChecksumError(f"{b.where}: payload CRC-32 mismatch")
    if b.encoding == ENC_RAW:
        return bytes(stored)
    if b.encoding == ENC_RANS:
        return unrans(bytes(stored), b.raw_length, b.where)
    return unzstd(bytes(stored), b.raw_length, b.where)


# ------------------------------------------------------------ §8.2 rANS

def read_uint7(s, pos, what):
    """§8.2 uint7: 7-bit groups, most significant first, bit 7 = more; 1 to 5 bytes."""
    value = 0
    for i in range(5):
        if pos >= len(s):
            raise PayloadError(f"{what}: rans stream ends inside a uint7")
        c = s[pos]
        pos += 1
        if i == 0 and c == 0x80:
            raise PayloadError(f"{what}: uint7 not in its shortest form")
        value = (value << 7) | (c & 0x7F)
        if not c & 0x80:
            return value, pos
    raise PayloadError(f"{what}: uint7 longer than 5 bytes")


def unrans(s, raw_length, what):
    """§8.2: flags, size, symbols, frequencies, states, then the decoding loop and
    the end of the stream (this decoder always makes a verifier's checks)."""
    if not s or s[0] not in (0x00, 0x04):
        raise PayloadError(f"{what}: rans flags not 0x00 or 0x04")
    lanes = 32 if s[0] == 0x04 else 4
    n, pos = read_uint7(s, 1, what)
    if n != raw_length:
        raise PayloadError(f"{what}: rans size {n} != raw_length {raw_length}")
    if not 1 <= n <= 2**31 - 2:
        raise PayloadError(f"{what}: rans size {n} out of range")

    def byte():
        nonlocal pos
        if pos >= len(s):
            raise PayloadError(f"{what}: rans stream ends inside its symbol list")
        pos += 1
        return s[pos - 1]

    present = [False] * 256
    sym, run = byte(), 0
    while True:
        present[sym] = True
        if run > 0:
            run, sym = run - 1, sym + 1
            if sym > 255:
                raise PayloadError(f"{what}: rans symbol run past 255")
            continue
        nxt = byte()
        if nxt == sym + 1:
            sym, run = nxt, byte()
        elif nxt == 0:
            break
        else:
            sym = nxt
    freq = [0] * 256
    for sym in range(256):
        if present[sym]:
            freq[sym], pos = read_uint7(s, pos, what)
            if freq[sym] < 1:
                raise PayloadError(f"{what}: rans frequency 0")
    total = sum(freq)
    if total > 4096 or total & (total - 1):
        raise PayloadError(f"{what}: rans frequencies total {total}")
    freq = [f * (4096 // total) for f in freq]
    cum = [0] * 257
    for sym in range(256):
        cum[sym + 1] = cum[sym] + freq[sym]
    slot_symbol = bytearray(4096)
    for sym in range(256):
        slot_symbol[cum[sym]:cum[sym + 1]] = bytes([sym]) * freq[sym]
    if pos + 4 * lanes > len(s):
        raise PayloadError(f"{what}: rans stream ends inside its states")
    x = list(struct.unpack_from(f"<{lanes}I", s, pos))
    pos += 4 * lanes
    if any(not (1 << 15) <= v < (1 << 31) for v in x):
        raise PayloadError(f"{what}: rans state out of range")
    out = bytearray(n)
    for i in range(n):
        j = i % lanes
        k = x[j] & 4095
        sym = slot_symbol[k]
        out[i] = sym
        x[j] = freq[sym] * (x[j] >> 12) + k - cum[sym]
        if x[j] < (1 << 15):
            if pos + 2 > len(s):
                raise PayloadError(f"{what}: rans stream ends before its last symbol")
            x[j] = (x[j] << 16) + s[pos] + (s[pos + 1] << 8)
            pos += 2
    if pos != len(s):
        raise PayloadError(f"{what}: bytes after the end of the rans stream")
    if any(v != 1 << 15 for v in x):
        raise PayloadError(f"{what}: rans states do not end at 2^15")
    return bytes(out)


# ------------------------------------------------------ §11 bit packing

def unpack_bits(buf, count, bits, what):
    """§11 lsb-first: `count` codes of `bits` bits; checks length and padding."""
    if len(buf) != ceil_div(count * bits, 8):
        raise PayloadError(f"{what}: packed stream of wrong length")
    stream = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")
    if stream[count * bits:].any():
        raise PayloadError(f"{what}: nonzero padding bits")
    if count == 0:
        return np.zeros(0, np.uint8)
    cols = stream[:count * bits].reshape(count, bits).astype(np.uint32)
    return (cols << np.arange(bits, dtype=np.uint32)).sum(axis=1).astype(np.uint8)


# -------------------------------------------------- §10.7 section layout

def place_sections(sizes):
    """Each section at the next multiple of 4 (§10.7); returns offsets, end."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(align_up(end, 4))
        end = offsets[-1] + size
    return offsets, end


def split_sections(raw, sizes, what):
    """Exact length and zero bytes between sections (PayloadError)."""
    offsets, end = place_sections(sizes)
    if len(raw) != end:
        raise PayloadError(f"{what}: blob is {len(raw)} bytes, its sections make {end}")
    parts, prev = [], 0
    for off, size in zip(offsets, sizes):
        if any(raw[prev:off]):
            raise PayloadError(f"{what}: nonzero bytes between sections")
        parts.append(raw[off:off + size])
        prev = off + size
    return parts


def finite_f32(buf, what):
    a = np.frombuffer(buf, "<f4")
    if not np.isfinite(a).all():
        raise PayloadError(f"{what}: value that is not finite")
    return a


def finite_f16(buf, what):
    a = np.frombuffer(buf, "<f2")
    if not np.isfinite(a).all():
        raise PayloadError(f"{what}: value that is not finite")
    return a.astype(np.float32)


# ------------------------------------------------------- §10.8 the hash

def mask_hash(seed, counters):
    """r(seed, c): the top 32 bits of SplitMix64 output c (§10.8)."""
    c = np.asarray(counters, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (c + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(32)


def kept_by_hash(seed, counters, drop):
    """§10.8 rule: kept when r(seed, c) >= drop."""
    return mask_hash(seed, counters) >= np.uint64(drop)


# ------------------------------------------- §10.1 params and open checks

def check_params(r, table):
    """§10.1: exactly the keys of `table`; each an int unless listed as other.

    `table` is a list of (key, check) where check(value) validates the
    value and raises; keys are checked in table order, type then value."""
    s_keys(r.params, f"{r.what}: params", [k for k, _ in table], ext=False)
    for key, check in table:
        check(r.params[key])


def int_in(r, key, allowed):
    """A registry number (§10.1): one the kind does not accept is UnknownKindError."""
    def check(v):
        if not _is_int(v):
            raise IndexSchemaError(f"{r.what}: param {key!r} is not an int")
        if v not in allowed:
            raise UnknownKindError(f"{r.what}: param {key} = {v} not allowed")
    return check


def int_range(r, key, lo, hi):
    """A quantity (§10.1): a value outside [lo, hi] is PayloadError."""
    def check(v):
        if not _is_int(v):
            raise IndexSchemaError(f"{r.what}: param {key!r} is not an int")
        if not lo <= v <= hi:
            raise PayloadError(f"{r.what}: param {key} = {v} out of range")
    return check


def need_base_equal(r):
    """`base` REQUIRED (IndexSchemaError) with the record's dtype and shape (PayloadError)."""
    if r.base is None:
        raise IndexSchemaError(f"{r.what}: missing base reference")
    if r.base.dtype != r.dtype or r.base.shape != r.shape:
        raise PayloadError(f"{r.what}: base reference dtype/shape differ from the record")


def check_blob_count(r, count):
    if len(r.blobs) != count:
        raise PayloadError(f"{r.what}: {len(r.blobs)} blobs, expected {count}")


def check_dense_blobs(r):
    """§10.2: blob count and raw lengths of the layout."""
    w, n = DTYPES[r.dtype], r.n
    layout = r.params["layout"]
    check_blob_count(r, 1 if layout == PLAIN else w)
    want = n * w if layout == PLAIN else n
    for b in r.blobs:
        if b.raw_length != want:
            raise PayloadError(f"{b.where}: raw_length {b.raw_length}, expected {want}")


def open_dense_delta(r):
    """§10.4 (order of §10.1 step 5: base reference, params, blobs)."""
    need_base_equal(r)
    check_params(r, [("transform", int_in(r, "transform", (SUB_ZIGZAG,))),
                     ("layout", int_in(r, "layout", (PLAIN, BYTE_PLANES)))])
    check_dense_blobs(r)


def open_full(r):
    """§10.5."""
    check_params(r, [("layout", int_in(r, "layout", (PLAIN, BYTE_PLANES)))])
    check_dense_blobs(r)


def open_removed(r):
    """§10.6 (base reference, params: the empty map, no blob)."""
    need_base_equal(r)
    check_params(r, [])
    check_blob_count(r, 0)


def check_matrix(r, any_shape=False):
    """Kinds 4-8: F32/F16/BF16, and 2-D unless any_shape (PayloadError)."""
    if r.dtype not in LOSSY_DTYPES:
        raise PayloadError(f"{r.what}: dtype {r.dtype} not allowed for {KINDS[r.kind]}")
    if not any_shape and len(r.shape) != 2:
        raise PayloadError(f"{r.what}: {KINDS[r.kind]} needs a 2-D shape")


def check_groups(r, v, allow16):
    """§10.7 / §10.9 bit groups; returns [(start, stop, bits, group_size)]."""
    if type(v) is not list:
        raise IndexSchemaError(f"{r.what}: groups is not an array")
    if len(v) > MAX_BIT_GROUPS:
        raise LimitError(f"{r.what}: more than {MAX_BIT_GROUPS} bit groups")
    groups, prev = [], 0
    for g in v:
        if type(g) is not list or len(g) != 4 or not all(_is_int(x) for x in g):
            raise IndexSchemaError(f"{r.what}: bit group is not an array of four ints")
        start, stop, bits, gs = g
        if start != prev or stop <= start:
            raise PayloadError(f"{r.what}: bit groups not contiguous from 0")
        if allow16 and bits == 16:
            if gs != 0:
                raise PayloadError(f"{r.what}: 16-bit group needs group_size 0")
        elif not 1 <= bits <= 8 or not 1 <= gs <= MAX_QUANT_GROUP_SIZE:
            raise PayloadError(f"{r.what}: bad bits or group_size")
        groups.append((start, stop, bits, gs))
        prev = stop
    if prev > min(r.shape):
        raise PayloadError(f"{r.what}: rank {prev} exceeds min(m, n)")
    return groups


def check_lossy_blob(r, k, lo, hi):
    """Blob count (0 when k = 0, else 1) and raw_length within [lo, hi]."""
    check_blob_count(r, 0 if k == 0 else 1)
    if k and not lo <= r.blobs[0].raw_length <= hi:
        raise PayloadError(f"{r.what}: raw_length {r.blobs[0].raw_length} "
                           f"outside [{lo}, {hi}]")


def mixed_sizes(m, n, groups):
    """§10.7 sections of a lowrank-mixed blob."""
    k = groups[-1][1] if groups else 0
    sizes = [4 * k]
    for start, stop, bits, gs in groups:
        c = stop - start
        for length in (n, m):
            q = c * ceil_div(length, gs)
            sizes += [ceil_div(c * length * bits, 8), 2 * q, ceil_div(q * bits, 8)]
    return sizes


def open_lowrank_mixed(r):
    """§10.7, in the order of §16 step 8."""
    check_matrix(r)
    need_base_equal(r)
    r.params_ = {}
    check_params(r, [("packing", int_in(r, "packing", (LSB_FIRST,))),
                     ("groups", lambda v: r.params_.update(groups=check_groups(r, v, False)))])
    groups = r.params_["groups"]
    size = place_sections(mixed_sizes(*r.shape, groups))[1]
    check_lossy_blob(r, groups[-1][1] if groups else 0, size, size)


def open_lowrank_rotated(r):
    """§10.14: as §10.7, params packing, v_rotation, u_rotation, seed, groups."""
    check_matrix(r)
    need_base_equal(r)
    r.params_ = {}
    check_params(r, [("packing", int_in(r, "packing", (LSB_FIRST,))),
                     ("v_rotation", int_in(r, "v_rotation", (ROT_NONE, ROT_HADAMARD))),
                     ("u_rotation", int_in(r, "u_rotation", (ROT_NONE, ROT_HADAMARD))),
                     ("seed", int_range(r, "seed", 0, U64_MAX)),
                     ("groups", lambda v: r.params_.update(groups=check_groups(r, v, False)))])
    groups = r.params_["groups"]
    size = place_sections(mixed_sizes(*r.shape, groups))[1]
    check_lossy_blob(r, groups[-1][1] if groups else 0, size, size)


def sl_sizes(k, m, n, mask, groups, cv, cu):
    """§10.9 sections; cv, cu: kept counts per vector (arrays of length k)."""
    sizes = [4 * k]
    sizes += [4 * k] if mask == MASK_HASH else [ceil_div(k * n, 8), ceil_div(k * m, 8)]
    for start, stop, bits, gs in groups:
        for counts in (cv[start:stop], cu[start:stop]):
            kept = int(sum(counts))
            if bits == 16:
                sizes.append(2 * kept)
                continue
            q = int(sum(ceil_div(int(c), gs) for c in counts))
            sizes += [ceil_div(kept * bits, 8), 2 * q, ceil_div(q * bits, 8)]
    return sizes


def seed_check(r):
    """§10.1: `seed` is a quantity in [0, 2^64), 0 with mask 2 (PayloadError)."""
    def check(v):
        int_range(r, "seed", 0, U64_MAX)(v)
        if r.params["mask"] == MASK_BITMASK and v != 0:
            raise PayloadError(f"{r.what}: seed must be 0 with mask 2")
    return check


def open_sparse_lowrank(r):
    """§10.9."""
    check_matrix(r)
    if max(r.shape) > 1 << 32:
        raise LimitError(f"{r.what}: m or n above 2^32")
    need_base_equal(r)
    r.params_ = {}
    check_params(r, [("packing", int_in(r, "packing", (LSB_FIRST,))),
                     ("mask", int_in(r, "mask", (MASK_HASH, MASK_BITMASK))),
                     ("seed", seed_check(r)),
                     ("groups", lambda v: r.params_.update(groups=check_groups(r, v, True)))])
    groups = r.params_["groups"]
    k = groups[-1][1] if groups else 0
    (m, n), mask = r.shape, r.params["mask"]
    lo = place_sections(sl_sizes(k, m, n, mask, groups, [0] * k, [0] * k))[1]
    hi = place_sections(sl_sizes(k, m, n, mask, groups, [n] * k, [m] * k))[1]
    check_lossy_blob(r, k, lo, hi)


def sign_sizes(m, n, scales, coded_rows):
    return [4 * (m if scales == 1 else 1), ceil_div(coded_rows * n, 8)]


def open_sign(r):
    """§10.10."""
    check_matrix(r)
    need_base_equal(r)
    check_params(r, [("packing", int_in(r, "packing", (LSB_FIRST,))),
                     ("scales", int_in(r, "scales", (0, 1)))])
    (m, n), scales = r.shape, r.params["scales"]
    lo = place_sections(sign_sizes(m, n, scales, 0))[1]
    hi = place_sections(sign_sizes(m, n, scales, m))[1]
    check_blob_count(r, 1)
    if not lo <= r.blobs[0].raw_length <= hi:
        raise PayloadError(f"{r.what}: raw_length outside [{lo}, {hi}]")


def open_lowrank(r):
    """§10.11."""
    check_matrix(r)
    need_base_equal(r)
    (m, n) = r.shape
    check_params(r, [("rank", int_range(r, "rank", 0, min(m, n)))])
    k = r.params["rank"]
    size = place_sections([4 * k, 2 * k * n, 2 * k * m])[1]
    check_lossy_blob(r, k, size, size)


def sparse_sizes(n, mask, kept):
    return ([ceil_div(n, 8)] if mask == MASK_BITMASK else []) + [2 * kept]


def open_sparse(r):
    """§10.12."""
    check_matrix(r, any_shape=True)
    need_base_equal(r)

    def drop(v):
        int_range(r, "drop", 0, 1 << 32)(v)
        if r.params["mask"] == MASK_BITMASK and v != 0:
            raise PayloadError(f"{r.what}: drop must be 0 with mask 2")
    check_params(r, [("packing", int_in(r, "packing", (LSB_FIRST,))),
                     ("mask", int_in(r, "mask", (MASK_HASH, MASK_BITMASK))),
                     ("seed", seed_check(r)), ("drop", drop)])
    n, mask = r.n, r.params["mask"]
    lo = place_sections(sparse_sizes(n, mask, 0))[1]
    hi = place_sections(sparse_sizes(n, mask, n))[1]
    check_blob_count(r, 1)
    if not lo <= r.blobs[0].raw_length <= hi:
        raise PayloadError(f"{r.what}: raw_length outside [{lo}, {hi}]")


def adapted_new_blobs(r):
    """§10.13: b, the count of the new rows' blobs (0 without growth, else 1 or w by layout)."""
    if r.shape == r.base.shape:
        return 0
    return 1 if r.params["layout"] == PLAIN else DTYPES[r.dtype]


def adapted_inner(r):
    """§10.13: the inner record: the base's shape, the record's dtype, all blobs but the new rows'."""
    inner = Record()
    inner.name, inner.kind, inner.dtype = r.name, r.params["inner"], r.dtype
    inner.shape = r.base.shape
    inner.params = r.params["inner_params"]
    inner.blobs = r.blobs[:len(r.blobs) - adapted_new_blobs(r)]
    inner.base = BaseRef(r.dtype, r.base.shape, r.base.sha256)
    return inner


def adapted_new_rows(r):
    """§10.13: the new rows as a record of their own (dtype, shape, layout, their blobs)."""
    new = Record()
    new.name, new.kind, new.dtype = r.name, 2, r.dtype
    new.shape = (r.shape[0] - r.base.shape[0],) + tuple(r.shape[1:])
    new.params = {"layout": r.params["layout"]}
    new.blobs = r.blobs[len(r.blobs) - adapted_new_blobs(r):]
    return new


def open_adapted(r):
    """§10.13 open-time checks 1 to 3."""
    if r.base is None:
        raise IndexSchemaError(f"{r.what}: missing base reference")
    cast = r.base.dtype != r.dtype
    if cast and not (r.base.dtype in LOSSY_DTYPES and r.dtype in LOSSY_DTYPES):
        raise PayloadError(f"{r.what}: adapted cast {r.base.dtype} -> {r.dtype} not allowed")
    same = tuple(r.base.shape) == tuple(r.shape)
    grown = (len(r.shape) >= 1 and len(r.shape) == len(r.base.shape)
             and tuple(r.shape[1:]) == tuple(r.base.shape[1:]) and r.base.shape[0] < r.shape[0])
    if not (same or grown) or (same and not cast):
        raise PayloadError(f"{r.what}: adapted record against base {r.base.dtype}{list(r.base.shape)}: "
                           f"neither a cast nor growth along the first axis")

    def inner_params(v):
        if type(v) is not dict:
            raise IndexSchemaError(f"{r.what}: param 'inner_params' is not a map")

    check_params(r, [("inner", int_in(r, "inner", ADAPTED_INNER)),
                     ("layout", int_in(r, "layout", (PLAIN, BYTE_PLANES))),
                     ("inner_params", inner_params)])
    b = adapted_new_blobs(r)
    if len(r.blobs) < b:
        raise PayloadError(f"{r.what}: {len(r.blobs)} blobs, the new rows alone need {b}")
    r.params_ = adapted_inner(r)  # kept: its kind's open checks store what they parse on it
    OPENERS[r.params_.kind](r.params_)
    if b:
        new = adapted_new_rows(r)
        want = new.n * DTYPES[r.dtype] if r.params["layout"] == PLAIN else new.n
        for blob in new.blobs:
            if blob.raw_length != want:
                raise PayloadError(f"{blob.where}: raw_length {blob.raw_length}, expected {want}")


OPENERS = {1: open_dense_delta, 2: open_full, 3: open_removed, 4: open_lowrank_mixed,
           5: open_sparse_lowrank, 6: open_sign, 7: open_lowrank, 8: open_sparse, 9: open_adapted,
           10: open_lowrank_rotated}


def open_record(r):
    """§10.1 open-time checks, in order."""
    if r.kind not in KINDS:
        raise UnknownKindError(f"{r.what}: unknown kind {r.kind}")
    if r.dtype not in DTYPES:
        raise UnknownKindError(f"{r.what}: unknown dtype {r.dtype!r}")
    if r.n > MAX_ELEMENTS:
        raise LimitError(f"{r.what}: more than 2^48 elements")
    if r.base is not None and r.base.dtype not in DTYPES:
        raise UnknownKindError(f"{r.what}: unknown base dtype {r.base.dtype!r}")
    OPENERS[r.kind](r)


# ---------------------------------------------------- §12, §13 at open

def base_digest(records):
    """§12: sha256 over name ‖ 00 ‖ sha of the records with a base reference."""
    h = hashlib.sha256()
    for r in records:
        if r.base is not None:
            h.update(r.name.encode("utf-8") + b"\0" + r.base.sha256)
    return h.digest()


def check_attachment_name(name):
    """§13 path rules and weight-file names (FormatError)."""
    bad = ("\\" in name or name.startswith("/")
           or (len(name) >= 2 and name[0].isascii() and name[0].isalpha() and name[1] == ":")
           or any(c in ("", ".", "..") for c in name.split("/")))
    if bad:
        raise FormatError(f"attachment {name!r}: unsafe name")
    if name.endswith(".safetensors") or name == "model.safetensors.index.json":
        raise FormatError(f"attachment {name!r}: would overwrite the weights")


def check_attachment_names(names):
    for name in names:
        check_attachment_name(name)
    dirs = {name[:i] for name in names for i, c in enumerate(name) if c == "/"}
    for name in names:
        if name in dirs:
            raise FormatError(f"attachment {name!r} is also a directory of another")


# -------------------------------------------------------- opening a file

class DcmFile:
    """A file after the open-time checks of §16 steps 1 to 10."""

    def __init__(self, data):
        self.data = data
        h = self.header = parse_header(data)                       # step 1
        index = data[64:64 + h.index_length]
        crc = zlib.crc32(index, zlib.crc32(data[:60])) & 0xFFFFFFFF
        if crc != struct.unpack_from("<I", data, 60)[0]:           # step 2
            raise HeaderChecksumError("header CRC-32 mismatch")
        idx = unpack_index(index)                                  # step 3
        fmt, digest, self.records, self.attachments, self.metadata = check_index(idx)
        if fmt != (h.major, h.minor):                              # step 6
            raise FormatError(f"format {list(fmt)} differs from the header's version")
        self.blobs = blob_sequence(self.records, self.attachments)
        self.d = check_layout(h, self.blobs)                       # step 7
        check_encodings(self.blobs)
        for r in self.records:                                     # step 8
            open_record(r)
        if base_digest(self.records) != digest:                    # step 9
            raise FormatError("base.digest does not match the records")
        check_attachment_names([a for a, _ in self.attachments])   # step 10

    def read(self, blob):
        return read_blob(self.data, self.d, blob)


# ----------------------------------------------------- payload decoding

class Payload:
    """What a record's blobs decode to, before the base is involved."""

    def __init__(self, codes=None, factors=None, delta=None, exact=None):
        self.codes = codes        # bytes of §19.2, or None
        self.factors = factors    # float32 bytes of §19.2, or None
        self.delta = delta        # () -> Δ̂, n floats (kinds 4-8); lazy: only a rebuild needs it
        self.exact = exact        # dense array as bytes (kinds 1, 2)
        self.new_rows = b""       # kind 9: the new rows' bit patterns


def uint_dtype(w):
    return np.dtype(f"<u{w}")


def dense_array(r, raws):
    """§10.2: the n N-bit integers from plain or byte-planes blobs."""
    w = DTYPES[r.dtype]
    if r.params["layout"] == PLAIN or w == 1:
        return raws[0]
    planes = np.stack([np.frombuffer(p, np.uint8) for p in raws], axis=1)
    return planes.tobytes()  # element i's bytes k = plane k byte i: little-endian


def payload_dense(r, raws):
    codes = dense_array(r, raws)
    return Payload(codes=codes, exact=codes)


def payload_removed(r, raws):
    return Payload()


def low_rank_delta(s, u, v):
    """Δ̂ = Û·diag(S)·V̂ᵀ in float64 (§10.7 product), flattened."""
    if len(s) == 0:
        return np.zeros(u.shape[1] * v.shape[1])
    return ((u.astype(np.float64).T * s.astype(np.float64)) @ v.astype(np.float64)).ravel()


def dequant(q, z, s):
    """§10.7: (float32(q) − float32(z)) × float32(s), exact in float32."""
    return (q.astype(np.float32) - z.astype(np.float32)) * s.astype(np.float32)


def mixed_vectors(parts, c, length, bits, gs, what):
    """Codes, zero points and dequantized vectors of one side of a group."""
    g = ceil_div(length, gs)
    q = unpack_bits(parts[0], c * length, bits, what).reshape(c, length)
    scales = finite_f16(parts[1], what).reshape(c, g)
    z = unpack_bits(parts[2], c * g, bits, what).reshape(c, g)
    cols = np.arange(length) // gs
    vec = dequant(q, z[:, cols], scales[:, cols])
    return q, z, vec


def hadamard_back(z, seed, side):
    """§10.14 decoder direction Rᵀ·ẑ of each row of z, in float64: per block of b (the
    largest power of two dividing the length), d_j · (1/√b) · Σ_q H_b[p, q] · ẑ[q]."""
    k, length = z.shape
    b = length & -length
    c0 = 0 if side == "V" else 1 << 32
    d = np.where(mask_hash(seed, np.arange(length, dtype=np.uint64) + np.uint64(c0)) >= (1 << 31), -1.0, 1.0)
    p = np.arange(b)
    h = np.array([[(-1.0) ** bin(int(i) & int(j)).count("1") for j in p] for i in p]) if b <= 1024 else None
    blocks = z.astype(np.float64).reshape(k, length // b, b)
    if h is not None:
        y = blocks @ h.T
    else:  # larger blocks: the same sum by the fast transform (H_b = [[H, H], [H, −H]])
        y, half = blocks.copy(), 1
        while half < b:
            y = y.reshape(k, length // b, b // (2 * half), 2, half)
            y = np.concatenate([y[:, :, :, :1] + y[:, :, :, 1:], y[:, :, :, :1] - y[:, :, :, 1:]], axis=3)
            y, half = y.reshape(k, length // b, b), half * 2
    return (y / np.sqrt(b)).reshape(k, length) * d


def payload_lowrank_rotated(r, raws):
    """§10.14: the blob of §10.7; factors are the stored vectors, Δ̂ from the rotated-back ones."""
    payload = payload_lowrank_mixed(r, raws)
    groups = r.params_["groups"]
    m, n = r.shape
    k = groups[-1][1] if groups else 0
    if k == 0:
        return payload
    f = np.frombuffer(payload.factors, "<f4")
    s, zv, zu = f[:k], f[k:k + k * n].reshape(k, n), f[k + k * n:].reshape(k, m)
    p = r.params
    v = hadamard_back(zv, p["seed"], "V") if p["v_rotation"] == ROT_HADAMARD else zv
    u = hadamard_back(zu, p["seed"], "U") if p["u_rotation"] == ROT_HADAMARD else zu
    return Payload(payload.codes, payload.factors, lambda: low_rank_delta(s, u, v))


def payload_lowrank_mixed(r, raws):
    """§10.7 blob, §16 step 16.3 checks."""
    groups = r.params_["groups"]
    m, n = r.shape
    k = groups[-1][1] if groups else 0
    if k == 0:
        return Payload(b"", b"", lambda: np.zeros(m * n))
    parts = split_sections(raws[0], mixed_sizes(m, n, groups), r.what)
    s = finite_f32(parts[0], r.what)
    codes, vs, us, p = [], [], [], 1
    for start, stop, bits, gs in groups:
        c = stop - start
        qv, zv, v = mixed_vectors(parts[p:p + 3], c, n, bits, gs, r.what)
        qu, zu, u = mixed_vectors(parts[p + 3:p + 6], c, m, bits, gs, r.what)
        codes += [qv, zv, qu, zu]
        vs.append(v)
        us.append(u)
        p += 6
    v, u = np.concatenate(vs), np.concatenate(us)
    return lowrank_payload(codes, s, v, u)


def lowrank_payload(codes, s, v, u):
    factors = b"".join(a.astype("<f4").tobytes() for a in (s, v, u))
    code_bytes = None if codes is None else b"".join(c.astype(np.uint8).tobytes() for c in codes)
    return Payload(code_bytes, factors, lambda: low_rank_delta(s, u, v))


def sl_masks(r, raw, k):
    """§10.9 keep masks of V (k×n) and U (k×m) from the hash or the bitmask."""
    m, n = r.shape
    if r.params["mask"] == MASK_HASH:
        drops = np.frombuffer(raw[4 * k:8 * k], "<u4").astype(np.uint64)
        i = np.arange(k, dtype=np.uint64)[:, None] << np.uint64(33)
        kv = mask_hash(r.params["seed"], i + np.arange(n, dtype=np.uint64)) >= drops[:, None]
        ku = mask_hash(r.params["seed"], i + np.uint64(1 << 32)
                       + np.arange(m, dtype=np.uint64)) >= drops[:, None]
        return kv, ku
    off_u = align_up(4 * k + ceil_div(k * n, 8), 4)
    kv = np.unpackbits(np.frombuffer(raw[4 * k:], np.uint8), bitorder="little")[:k * n]
    ku = np.unpackbits(np.frombuffer(raw[off_u:], np.uint8), bitorder="little")[:k * m]
    return kv.reshape(k, n).astype(bool), ku.reshape(k, m).astype(bool)


def sl_values(parts, keep, bits, gs, what):
    """One side of a §10.9 bit group: value codes, zero points, vectors."""
    vec = np.zeros(keep.shape, np.float32)
    kept = int(keep.sum())
    if bits == 16:
        vec[keep] = finite_f16(parts[0], what)
        return [], vec
    q = unpack_bits(parts[0], kept, bits, what)
    per_vec = keep.sum(axis=1)
    qcount = -(-per_vec // gs)
    scales = finite_f16(parts[1], what)
    z = unpack_bits(parts[2], int(qcount.sum()), bits, what)
    rank_in_vec = (np.cumsum(keep, axis=1) - 1)[keep]          # t of each kept element
    first_q = np.repeat(np.concatenate([[0], np.cumsum(qcount)[:-1]]), per_vec)
    gid = first_q + rank_in_vec // gs
    vec[keep] = dequant(q, z[gid], scales[gid])
    return [q, z], vec


def payload_sparse_lowrank(r, raws):
    """§10.9."""
    groups = r.params_["groups"]
    m, n = r.shape
    k = groups[-1][1] if groups else 0
    if k == 0:
        return Payload(b"", b"", lambda: np.zeros(m * n))
    raw = raws[0]
    kv, ku = sl_masks(r, raw, k)
    sizes = sl_sizes(k, m, n, r.params["mask"], groups, kv.sum(axis=1), ku.sum(axis=1))
    parts = split_sections(raw, sizes, r.what)
    if r.params["mask"] == MASK_BITMASK:
        unpack_bits(parts[1], k * n, 1, r.what)
        unpack_bits(parts[2], k * m, 1, r.what)
    s = finite_f32(parts[0], r.what)
    codes = [kv.ravel(), ku.ravel()]
    vs, us, p = [], [], 2 if r.params["mask"] == MASK_HASH else 3
    for start, stop, bits, gs in groups:
        width = 1 if bits == 16 else 3
        cv, v = sl_values(parts[p:p + width], kv[start:stop], bits, gs, r.what)
        cu, u = sl_values(parts[p + width:p + 2 * width], ku[start:stop], bits, gs, r.what)
        codes += cv + cu
        vs.append(v)
        us.append(u)
        p += 2 * width
    return lowrank_payload(codes, s, np.concatenate(vs), np.concatenate(us))


def payload_sign(r, raws):
    """§10.10."""
    m, n = r.shape
    raw, per_row = raws[0], r.params["scales"] == 1
    nscales = m if per_row else 1
    stored = np.frombuffer(raw[:4 * nscales], "<f4")
    alpha = stored if per_row else np.repeat(stored, m)
    coded = alpha != 0
    parts = split_sections(raw, sign_sizes(m, n, r.params["scales"], int(coded.sum())), r.what)
    finite_f32(parts[0], r.what)
    bits = unpack_bits(parts[1], int(coded.sum()) * n, 1, r.what)

    def delta():  # ±α exact in float32, +0 in rows not coded
        out = np.zeros((m, n), np.float32)
        a = alpha[coded][:, None]
        out[coded] = np.where(bits.reshape(-1, n) == 1, a, -a)
        return out.ravel()
    return Payload(bits.tobytes(), alpha.astype("<f4").tobytes(), delta)


def payload_lowrank(r, raws):
    """§10.11."""
    m, n = r.shape
    k = r.params["rank"]
    if k == 0:
        return Payload(None, b"", lambda: np.zeros(m * n))
    parts = split_sections(raws[0], [4 * k, 2 * k * n, 2 * k * m], r.what)
    s = finite_f32(parts[0], r.what)
    v = finite_f16(parts[1], r.what).reshape(k, n)
    u = finite_f16(parts[2], r.what).reshape(k, m)
    return lowrank_payload(None, s, v, u)


def payload_sparse(r, raws):
    """§10.12."""
    n, raw, mask = r.n, raws[0], r.params["mask"]
    if mask == MASK_HASH:
        keep = kept_by_hash(r.params["seed"], np.arange(n, dtype=np.uint64), r.params["drop"])
    else:
        keep = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[:n].astype(bool)
    parts = split_sections(raw, sparse_sizes(n, mask, int(keep.sum())), r.what)
    if mask == MASK_BITMASK:
        unpack_bits(parts[0], n, 1, r.what)
    delta = np.zeros(n, np.float32)
    delta[keep] = finite_f16(parts[-1], r.what)
    return Payload(keep.astype(np.uint8).tobytes(), delta.astype("<f4").tobytes(), lambda: delta)


def payload_adapted(r, raws):
    """§10.13: the inner record's payload (its codes and factors), and the new rows' bit patterns."""
    b = adapted_new_blobs(r)
    inner = r.params_  # the inner record, as open_adapted checked it
    payload = PAYLOADS[inner.kind](inner, raws[:len(raws) - b])
    payload.new_rows = dense_array(adapted_new_rows(r), raws[len(raws) - b:]) if b else b""
    return payload


PAYLOADS = {1: payload_dense, 2: payload_dense, 3: payload_removed,
            4: payload_lowrank_mixed, 5: payload_sparse_lowrank, 6: payload_sign,
            7: payload_lowrank, 8: payload_sparse, 9: payload_adapted, 10: payload_lowrank_rotated}


# ------------------------------------------------------ §9 float rounding

def to_float32(dtype, raw):
    """Widen F32/F16/BF16 elements exactly to float32."""
    if dtype == "F32":
        return np.frombuffer(raw, "<f4")
    if dtype == "F16":
        return np.frombuffer(raw, "<f2").astype(np.float32)
    bits = np.frombuffer(raw, "<u2").astype(np.uint32) << np.uint32(16)
    return bits.view(np.float32)


def from_float32(dtype, x):
    """Round float32 to the dtype, nearest-even; BF16 NaN is 0x7FC0 (§10.7)."""
    x = np.asarray(x, np.float32)
    if dtype == "F32":
        return x.astype("<f4").tobytes()
    if dtype == "F16":
        with np.errstate(all="ignore"):
            return x.astype("<f2").tobytes()
    u = x.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
               >> np.uint32(16)).astype(np.uint16)
    rounded[np.isnan(x)] = 0x7FC0
    return rounded.astype("<u2").tobytes()


def adapted_base(r, base_raw):
    """§10.13 decoding step 1: the base cast to the record's dtype, a NaN as the cast NaN."""
    if r.base.dtype == r.dtype:
        return base_raw
    wide = to_float32(r.base.dtype, base_raw)
    out = np.frombuffer(from_float32(r.dtype, wide), uint_dtype(DTYPES[r.dtype])).copy()
    out[np.isnan(wide)] = CAST_NAN[r.dtype]
    return out.tobytes()


def rebuild(r, payload, base_raw):
    """§10: the fine-tuned tensor's bytes."""
    if r.kind == 9:  # §10.13 steps 2 and 3: the inner record against the adapted base, then new rows
        return rebuild(r.params_, payload, adapted_base(r, base_raw)) + payload.new_rows
    if r.kind == 2:
        return payload.exact
    if r.kind == 1:
        ut = uint_dtype(DTYPES[r.dtype])
        code = np.frombuffer(payload.exact, ut)
        d = (code >> ut.type(1)) ^ (np.zeros_like(code) - (code & ut.type(1)))
        return (np.frombuffer(base_raw, ut) + d).astype(ut).tobytes()
    with np.errstate(all="ignore"):  # IEEE binary32 sum: overflow to ±inf, NaN stays NaN
        delta = np.asarray(payload.delta()).astype(np.float32)
        return from_float32(r.dtype, to_float32(r.dtype, base_raw) + delta)


# ----------------------------------------------------- base checkpoints

class BaseCheckpoint:
    """One .safetensors file: {name: (dtype, shape, bytes)}."""

    def __init__(self, path):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UsageError(f"cannot read base {path}: {e}") from None
        self.tensors = parse_safetensors(data, path)


def parse_safetensors(data, path):
    if len(data) < 8:
        raise CheckpointError(f"{path}: not a safetensors file")
    hlen = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError):
        raise CheckpointError(f"{path}: bad safetensors header") from None
    if type(header) is not dict or 8 + hlen > len(data):
        raise CheckpointError(f"{path}: bad safetensors header")
    body, tensors = data[8 + hlen:], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: bad entry for {name!r}") from None
        if not 0 <= begin <= end <= len(body):
            raise CheckpointError(f"{path}: {name!r} outside the data")
        if dtype in DTYPES and end - begin != element_count(shape) * DTYPES[dtype]:
            raise CheckpointError(f"{path}: {name!r} has the wrong byte length")
        tensors[name] = (dtype, shape, body[begin:end])
    return tensors


def check_base_names(records, base):
    """§12 checks 1 and 2 (§16 step 14)."""
    referenced = set()
    for r in records:
        if r.base is None:
            continue
        referenced.add(r.name)
        if r.name not in base.tensors:
            raise WrongBaseError(f"tensor {r.name!r}: missing from the base")
        dtype, shape, _ = base.tensors[r.name]
        if dtype != r.base.dtype:
            raise WrongBaseError(f"tensor {r.name!r}: base dtype {dtype}, expected {r.base.dtype}")
        if shape != r.base.shape:
            raise WrongBaseError(f"tensor {r.name!r}: base shape {list(shape)}, "
                                 f"expected {list(r.base.shape)}")
    for name in base.tensors:
        if name not in referenced:
            raise WrongBaseError(f"tensor {name!r}: in the base but not referenced")


def base_tensor(r, base):
    """The base tensor's bytes after the sha256 check of §12."""
    raw = base.tensors[r.name][2]
    if hashlib.sha256(raw).digest() != r.base.sha256:
        raise WrongBaseError(f"tensor {r.name!r}: base content differs (sha256)")
    return raw


# -------------------------------------------------------------- results

class TensorResult:
    def __init__(self, r, payload, data):
        self.kind = KINDS[r.kind]
        self.inner = KINDS[r.params_.kind] if r.kind == 9 else None  # §10.13: an adapted record's inner kind
        self.dtype = r.dtype
        self.shape = tuple(r.shape)
        self.codes = payload.codes
        self.factors = payload.factors
        self.data = data

    def __repr__(self):
        return f"TensorResult({self.kind}, {self.dtype}, {list(self.shape)})"


class Decoded:
    def __init__(self, f):
        self.version = (f.header.major, f.header.minor)
        self.metadata = f.metadata
        self.tensors = {}
        self.attachments = {}


MODES = ("reader", "verifier")  # §19.3


def decode(path, base=None, mode="verifier"):
    """Open, check and (with `base`) decode a .dcm file; see README.md.

    `mode` is a procedure of §19.3: "reader" reads and checks every record and
    attachment as a decoder does; "verifier" also checks the padding (§7).
    Errors about the file's content name the file first (§15, informative)."""
    if mode not in MODES:
        raise UsageError(f"mode {mode!r} is not one of {MODES}")
    try:
        return _decode(path, base, mode == "verifier")
    except (FormatError, ChecksumError) as e:
        e.args = (f"{path}: {e}",)
        raise


def _decode(path, base, verifier):
    with open(path, "rb") as fh:
        data = fh.read()
    f = DcmFile(data)                                     # §16 steps 1-10
    if verifier:
        check_padding(data, f.header, f.d, f.blobs)       # §7, before any blob
    ck = BaseCheckpoint(base) if base is not None else None
    if ck is not None:
        check_base_names(f.records, ck)                   # step 14
    out = Decoded(f)
    for r in f.records:                                   # step 16, record by record
        if r.kind == 3:
            out.tensors[r.name] = TensorResult(r, Payload(), None)
            continue
        reads_base = ck is not None and r.base is not None
        base_raw = base_tensor(r, ck) if reads_base else None         # 16.1
        payload = PAYLOADS[r.kind](r, [f.read(b) for b in r.blobs])   # 16.2, 16.3
        out.tensors[r.name] = TensorResult(r, payload, tensor_data(r, payload, base_raw))
    for r in f.records:                                   # step 17
        if ck is not None and r.kind == 3:
            base_tensor(r, ck)
    out.attachments = {name: f.read(b) for name, b in f.attachments}  # step 18 (names: step 10)
    return out


def tensor_data(r, payload, base_raw):
    if r.kind == 3:
        return None
    if r.kind == 2:
        return payload.exact
    return None if base_raw is None else rebuild(r, payload, base_raw)


# ---------------------------------------------------------- command line

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        path, base, mode = parse_args(argv)
        result = decode(path, base, mode)
    except DcmRefError as e:
        print(f"{e.code} ({type(e).__name__}): {e}")
        return e.exit_code
    except OSError as e:
        print(f"UsageError: {e}")
        return UsageError.exit_code
    for name, t in result.tensors.items():
        digest = "-" if t.data is None else hashlib.sha256(t.data).hexdigest()
        print(f"{name}\t{t.kind}\t{t.dtype}\t{list(t.shape)}\t{digest}")
    return 0


def parse_args(argv):
    """FILE [--base BASE.safetensors] [--reader]: (path, base, mode)."""
    usage = "usage: dcmref.py FILE [--base BASE.safetensors] [--reader]"
    args, base, mode = list(argv), None, "verifier"
    if "--reader" in args:
        args.remove("--reader")
        mode = "reader"
    if "--base" in args:
        i = args.index("--base")
        if i + 1 >= len(args):
            raise UsageError(usage)
        base = args.pop(i + 1)
        args.pop(i)
    if len(args) != 1 or args[0].startswith("-"):
        raise UsageError(usage)
    return args[0], base, mode


if __name__ == "__main__":
    sys.exit(main())
