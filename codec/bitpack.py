"""The bit-packing primitive every quantized record kind uses (packing id 1).

Codes of ``bits`` bits (1..8) form one stream: bit j of code i sits at stream bit
``p = i * bits + j``, which is bit ``p % 8`` (0 = least significant) of byte
``p // 8``.  The stream takes ``ceil(n * bits / 8)`` bytes and the unused high
bits of the last byte are zero.  Example (spec section "Bit packing"): 3-bit
codes [5, 3, 7, 0, 6, 1, 2] pack to bytes dd e1 08.
"""

from __future__ import annotations

import numpy as np

from .errors import PayloadError, UsageError

_CHUNK = 1 << 20  # codes per step, to keep the n*bits bit matrix small


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise UsageError(f"bit width must be an integer in 1..8, got {bits!r}")


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned codes (any integer array, each < 2**bits) LSB-first."""
    _check_bits(bits)
    codes = np.asarray(codes).reshape(-1)
    if codes.size and codes.dtype.kind not in "biu":
        raise UsageError(f"codes must be integers, got an array of {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise UsageError(f"codes do not fit in {bits} bits")
    count = codes.size
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    # Whole bytes at a time: 8 // bits codes make one byte when bits divides 8, else
    # 8 codes make ``bits`` bytes, the low ones of a little-endian 64-bit word.
    in_bytes = 8 % bits == 0
    per = 8 // bits if in_bytes else 8
    padded = np.zeros(-(-count // per) * per, dtype=np.uint8 if in_bytes else np.dtype("<u8"))
    padded[:count] = codes
    lanes = padded.reshape(-1, per)
    word = lanes[:, 0].copy()
    for j in range(1, per):
        word |= lanes[:, j] << word.dtype.type(j * bits)
    if in_bytes:
        return word.tobytes()
    return word.view(np.uint8).reshape(-1, 8)[:, :bits].tobytes()[:packed_size(count, bits)]


def unpack(data, count: int, bits: int) -> np.ndarray:
    """Unpack ``count`` codes of ``bits`` bits; the length and padding bits must be exact."""
    _check_bits(bits)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != packed_size(count, bits):
        raise PayloadError(
            f"packed {bits}-bit stream of {count} codes must be "
            f"{packed_size(count, bits)} bytes, got {buf.size}"
        )
    if bits == 8:
        return buf.copy()
    tail_bits = (count * bits) % 8
    if tail_bits and buf[-1] >> tail_bits:
        raise PayloadError("padding bits after the last packed code are not zero")
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint8)
    out = np.empty(count, dtype=np.uint8)
    for start in range(0, count, _CHUNK):
        stop = min(start + _CHUNK, count)
        first, last = start * bits // 8, packed_size(stop, bits)
        bitstream = np.unpackbits(buf[first:last], bitorder="little")
        bitmat = bitstream[: (stop - start) * bits].reshape(-1, bits)
        out[start:stop] = bitmat @ weights
    return out
