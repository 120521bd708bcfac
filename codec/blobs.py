"""Blob encodings (spec section "Blobs"): raw, one zstd frame with its content size, or a rANS stream.

Decoding never trusts the stored bytes: a zstd frame header or a rANS header
must declare exactly the raw length the index records before anything is
allocated, the frame must be the only thing in the blob, and the CRC-32 of the
stored bytes is checked first.

The writer stores each blob in the smallest of its encodings: raw, zstd (at
the level asked for) and, with ``entropy`` and where the native coder is
installed (``rans.py``), rANS.  zstd wins where its matches find repeats (a
byte plane of mostly zeros); an order-0 entropy coder wins on noisy planes
and on the codes of quantized vectors, whose symbols are skewed but not
repeated.
"""

from __future__ import annotations

import zlib

import zstandard

from . import rans
from .constants import Encoding
from .errors import PayloadChecksumError, PayloadError, UnknownKindError

# zstd's own default limit (2**27 bytes): frames asking for a bigger window are refused.
MAX_WINDOW_BYTES = 1 << 27
# A zstd block decodes to at most 128 KiB and takes at least 4 stored bytes (an RLE
# block: 3-byte header + 1 byte), so no frame expands by more than 32768 : 1.
_MAX_BLOCK_BYTES = 128 * 1024


def max_zstd_output(stored_length: int) -> int:
    """An upper bound on what a zstd frame of ``stored_length`` bytes can decode to."""
    return (stored_length // 4 + 1) * _MAX_BLOCK_BYTES


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def encode(raw, level: int, entropy: bool = True) -> tuple[int, bytes]:
    """The smallest of raw, zstd (``level``; None: no compression) and, with ``entropy``, rANS:
    (encoding, stored bytes).  Ties keep the earlier of raw, zstd, rANS."""
    raw = memoryview(raw).cast("B")
    best = (Encoding.RAW, raw)
    if level is not None and len(raw) > 0:
        packed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
        if len(packed) < len(best[1]):
            best = (Encoding.ZSTD, packed)
        if entropy:
            coded = rans.compress(raw)
            if coded is not None and len(coded) < len(best[1]):
                best = (Encoding.RANS, coded)
    return best[0], bytes(best[1])


def decode(stored, blob: dict, where: str, exact: bool = False) -> bytes:
    """Check and decode one blob's stored bytes into its raw bytes.  ``exact`` (a verifier) also
    checks what a reader may skip: the end of a rANS stream (spec 8.2)."""
    if crc32(stored) != blob["crc32"]:
        raise PayloadChecksumError(f"{where}: payload CRC-32 mismatch")
    encoding, raw_length = blob["encoding"], blob["raw_length"]
    if encoding == Encoding.RAW:
        if len(stored) != raw_length:
            raise PayloadError(f"{where}: raw blob of {len(stored)} bytes, record says {raw_length}")
        return stored
    if encoding == Encoding.ZSTD:
        return _decode_zstd(stored, raw_length, where)
    if encoding == Encoding.RANS:
        return rans.decode(stored, raw_length, where, exact=exact)
    raise UnknownKindError(f"{where}: unknown blob encoding {encoding}")


def _decode_zstd(stored, raw_length: int, where: str) -> bytes:
    try:
        params = zstandard.get_frame_parameters(stored)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"{where}: not a zstd frame ({exc})") from None
    if params.content_size != raw_length:
        # Also catches frames without a content size (reported as 0 or -1 by zstd).
        raise PayloadError(
            f"{where}: zstd frame declares {params.content_size} bytes, record says {raw_length}"
        )
    # Rules 3 and 4 from the header: the one-shot decompressor below does not
    # apply max_window_size to a frame whose content size is known.
    if params.window_size > MAX_WINDOW_BYTES:
        raise PayloadError(f"{where}: zstd frame asks for a {params.window_size}-byte window, "
                           f"more than {MAX_WINDOW_BYTES}")
    if params.dict_id:
        raise PayloadError(f"{where}: zstd frame needs dictionary {params.dict_id}")
    if raw_length > max_zstd_output(len(stored)):
        # Checked before decompressing: zstandard allocates the declared size up front.
        raise PayloadError(f"{where}: a zstd frame of {len(stored)} bytes cannot hold {raw_length} bytes")
    try:
        out = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES).decompress(
            stored, max_output_size=raw_length, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise PayloadError(f"{where}: zstd frame does not decode ({exc})") from None
    if len(out) != raw_length:
        raise PayloadError(f"{where}: zstd frame gave {len(out)} bytes, record says {raw_length}")
    return out
