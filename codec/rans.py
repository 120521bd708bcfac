"""The ``rans`` blob encoding (spec section 8.2): an order-0 rANS stream with 4 or 32 interleaved states.

The stream is the "rANS Nx16" format of htscodecs (the CRAM 3.1 codecs) with
two allowed flags bytes: order 0 with 4 or 32 states, and no striping,
packing, run-length or stored size omission.  Encoding and fast decoding are done by htscodecs'
native coder (``libhtscodecs``, loaded with ctypes: Debian's ``libhtscodecs2``;
its 32-state decoder runs at several hundred MB/s on one core here); a numpy
decoder that follows the spec step by step stands in where the library is
missing, and checks what the library's decoder does not: that the stream ends
exactly where the last symbol's renormalisation ends, with every state back at
its initial value (a verifier's checks, spec 8.2).

The header (flags, size, frequency table, initial states) is always checked
here, before the library sees a byte or anything is allocated.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

from .errors import PayloadError

FLAGS = 0x04  # order 0, 32 states (N32): what the encoder asks the library for
LANES = {0x00: 4, 0x04: 32}  # the flags bytes the format allows, and their number of states
TF_SHIFT = 12
TOTFREQ = 1 << TF_SHIFT
RANS_L = 1 << 15  # lower bound of a state, and every state's value at both ends of the stream
STATE_MAX = 1 << 31  # states are below this
MAX_RAW = 2**31 - 2  # the library's sizes are C ints


# --- the native coder -------------------------------------------------------------------------


def _load():
    for name in (ctypes.util.find_library("htscodecs"), "libhtscodecs.so.2", "libhtscodecs.so"):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.rans_compress_to_4x16.restype = ctypes.c_void_p
        # Inputs go by address (c_void_p): the caller's buffer as it is, never a copy of it.
        lib.rans_compress_to_4x16.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p,
                                              ctypes.POINTER(ctypes.c_uint), ctypes.c_int]
        lib.rans_compress_bound_4x16.restype = ctypes.c_uint
        lib.rans_compress_bound_4x16.argtypes = [ctypes.c_uint, ctypes.c_int]
        lib.rans_uncompress_to_4x16.restype = ctypes.c_void_p
        lib.rans_uncompress_to_4x16.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_char_p,
                                                ctypes.POINTER(ctypes.c_uint)]
        return lib
    return None


_LIB = _load()


def available() -> bool:
    """Whether the native coder is here (the encoder writes ``rans`` blobs only then)."""
    return _LIB is not None


def compress(raw) -> bytes | None:
    """The rans stream of ``raw`` (bytes-like), or None when the native coder is missing or
    ``raw`` is empty or too long for it."""
    # No copy of the input, one of the output: a worker encoding a tensor's byte planes holds
    # the raw plane, the library's buffer (its bound: a little over the plane's size; numpy's is
    # not zero-filled first) and the stream, not three copies of the plane.
    src = np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8)
    if _LIB is None or not 0 < src.size <= MAX_RAW:
        return None
    cap = _LIB.rans_compress_bound_4x16(src.size, FLAGS)
    out = np.empty(cap, dtype=np.uint8)
    size = ctypes.c_uint(cap)
    if not _LIB.rans_compress_to_4x16(src.ctypes.data, src.size, out.ctypes.data, ctypes.byref(size), FLAGS):
        return None
    stored = out[:min(size.value, cap)].tobytes()
    del out
    # The library may fall back to 4 states on short inputs (flags 0x00), and stores data it
    # cannot shrink as is (flag 0x20): that is the raw encoding's job.
    return stored if stored[:1] and stored[0] in LANES else None


# --- the header -------------------------------------------------------------------------------


class Header:
    """The parsed front of a stream: frequencies, cumulative frequencies, states, where data starts."""

    def __init__(self, lanes: int, freqs: np.ndarray, states: np.ndarray, data_start: int):
        self.lanes = lanes
        self.freqs = freqs  # (256,) normalised to TOTFREQ
        self.cum = np.concatenate([[0], np.cumsum(freqs)]).astype(np.int64)  # (257,)
        self.states = states  # (32,) int64
        self.data_start = data_start


def _uint7(stored, pos: int, where: str, what: str) -> tuple[int, int]:
    """A uint7 (big-endian groups of 7 bits, high bit = more) at ``pos``: (value, next position)."""
    value = 0
    for i in range(5):
        if pos + i >= len(stored):
            raise PayloadError(f"{where}: rans stream ends inside its {what}")
        byte = stored[pos + i]
        if i == 0 and byte == 0x80:
            raise PayloadError(f"{where}: rans {what} has a leading zero group (not the shortest form)")
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos + i + 1
    raise PayloadError(f"{where}: rans {what} is longer than 5 bytes")


def parse_header(stored, raw_length: int, where: str) -> Header:
    """Check and parse flags, size, frequency table and states (spec 8.2 rules 1 to 5)."""
    if len(stored) < 1 or stored[0] not in LANES:
        got = "nothing" if len(stored) < 1 else f"0x{stored[0]:02x}"
        raise PayloadError(f"{where}: rans stream flags are {got}, the format allows only 0x00 and 0x04")
    lanes = LANES[stored[0]]
    size, pos = _uint7(stored, 1, where, "size")
    if size != raw_length:
        raise PayloadError(f"{where}: rans stream declares {size} bytes, record says {raw_length}")
    if not 1 <= raw_length <= MAX_RAW:
        raise PayloadError(f"{where}: a rans blob holds 1 to {MAX_RAW} raw bytes, not {raw_length}")
    present, pos = _alphabet(stored, pos, where)
    freqs = np.zeros(256, dtype=np.int64)
    for sym in np.flatnonzero(present):
        freqs[sym], pos = _uint7(stored, pos, where, f"frequency of symbol {sym}")
        if freqs[sym] == 0:
            raise PayloadError(f"{where}: rans frequency of symbol {sym} is 0")
    total = int(freqs.sum())
    if total > TOTFREQ or total & (total - 1):
        raise PayloadError(f"{where}: rans frequencies total {total}, not a power of two up to {TOTFREQ}")
    freqs <<= (TOTFREQ // total).bit_length() - 1
    if pos + 4 * lanes > len(stored):
        raise PayloadError(f"{where}: rans stream ends inside its {lanes} states")
    states = np.frombuffer(bytes(stored[pos:pos + 4 * lanes]), dtype="<u4").astype(np.int64)
    if (states < RANS_L).any() or (states >= STATE_MAX).any():
        raise PayloadError(f"{where}: a rans state is outside [{RANS_L}, {STATE_MAX})")
    return Header(lanes, freqs, states, pos + 4 * lanes)


def _alphabet(stored, pos: int, where: str) -> tuple[np.ndarray, int]:
    """The symbols present: a list ending with a 0 byte; a symbol followed by its successor
    starts a run whose length (further consecutive symbols) is the next byte."""
    present = np.zeros(256, dtype=bool)

    def byte_at(p):
        if p >= len(stored):
            raise PayloadError(f"{where}: rans stream ends inside its symbol list")
        return stored[p]

    sym, pos, run = byte_at(pos), pos + 1, 0
    while True:
        present[sym] = True
        if run:
            run -= 1
            sym += 1
            if sym > 255:
                raise PayloadError(f"{where}: rans symbol run passes 255")
        else:
            nxt = byte_at(pos)
            pos += 1
            if nxt == sym + 1:
                sym, run, pos = nxt, byte_at(pos), pos + 1
            else:
                sym = nxt
                if sym == 0:
                    return present, pos


# --- decoding ---------------------------------------------------------------------------------


def decode(stored, raw_length: int, where: str, exact: bool = False) -> bytes:
    """The raw bytes of a rans stream.  The header is always checked.

    ``exact`` (a verifier) also checks the stream's end (spec 8.2 rules 6 and 7),
    which the native decoder does not: when the native encoder, given the decoded
    bytes, writes the stored stream again byte for byte, the stream is one of its
    own, and those end exactly where the rules say (a property the tests check);
    any other stream is decoded again in numpy, with the checks (slow: well
    under 1 MB/s).  A missing native coder means the numpy decoder throughout.
    """
    head = parse_header(stored, raw_length, where)
    if _LIB is None:
        return decode_exact(stored, raw_length, head, where)
    out = bytearray(raw_length)  # the library writes straight into it: one copy of the raw bytes in memory
    size = ctypes.c_uint(raw_length)
    data = np.frombuffer(memoryview(stored).cast("B"), dtype=np.uint8)  # read in place
    target = (ctypes.c_char * raw_length).from_buffer(out)
    if not _LIB.rans_uncompress_to_4x16(data.ctypes.data, data.size, target, ctypes.byref(size)) \
            or size.value != raw_length:
        raise PayloadError(f"{where}: rans stream does not decode")
    del target  # releases the export, so ``out`` may be resized or freed by its owner
    if exact and compress(out) != memoryview(stored).cast("B"):  # compared in place: no copy of the stream
        return decode_exact(stored, raw_length, head, where)
    return out


def decode_exact(stored, raw_length: int, head: Header, where: str) -> bytes:
    """Spec 8.2's decoding procedure, 32 lanes at a time, with the end-of-stream checks."""
    data = np.frombuffer(bytes(stored), dtype=np.uint8)
    symbol = np.repeat(np.arange(256, dtype=np.int64), head.freqs)  # slot f -> its symbol
    freqs, cum = head.freqs, head.cum
    r = head.states.copy()
    pos = head.data_start
    out = np.empty(raw_length, dtype=np.uint8)
    for start in range(0, raw_length, head.lanes):
        lanes = min(head.lanes, raw_length - start)
        x = r[:lanes]
        slot = x & (TOTFREQ - 1)
        s = symbol[slot]
        out[start:start + lanes] = s
        x = freqs[s] * (x >> TF_SHIFT) + slot - cum[s]
        need = np.flatnonzero(x < RANS_L)
        if need.size:
            end = pos + 2 * need.size
            if end > data.size:
                raise PayloadError(f"{where}: rans stream ends before its last symbol")
            words = data[pos:end].astype(np.int64)
            x[need] = (x[need] << 16) | words[0::2] | (words[1::2] << 8)
            pos = end
        r[:lanes] = x
    if pos != data.size:
        raise PayloadError(f"{where}: {data.size - pos} bytes follow the end of the rans stream")
    if (r != RANS_L).any():
        raise PayloadError(f"{where}: rans states do not end at {RANS_L}")
    return out.tobytes()
