"""Tests of dcm.bitpack, the LSB-first bit packing of 1..8-bit codes (packing id 1)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcm import bitpack
from dcm.bitpack import pack, packed_size, unpack
from dcm.errors import PayloadError, UsageError

LENGTHS = [0, 1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1001]


def reference_pack(codes, bits: int) -> bytes:
    """The spec's definition, bit by bit: code i bit j is stream bit p = i*bits + j,
    which is bit p % 8 (0 = least significant) of byte p // 8."""
    out = bytearray(packed_size(len(codes), bits))
    for i, code in enumerate(codes):
        for j in range(bits):
            if (int(code) >> j) & 1:
                p = i * bits + j
                out[p // 8] |= 1 << (p % 8)
    return bytes(out)


def random_codes(rng, count, bits):
    return rng.integers(0, 1 << bits, count, dtype=np.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", LENGTHS)
def test_roundtrip_every_width(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    codes = random_codes(rng, count, bits)
    data = pack(codes, bits)
    assert isinstance(data, bytes)
    assert len(data) == packed_size(count, bits) == (count * bits + 7) // 8
    assert data == reference_pack(codes, bits)
    back = unpack(data, count, bits)
    assert back.dtype == np.uint8 and back.shape == (count,)
    np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_roundtrip_long_odd_length(bits):
    rng = np.random.default_rng(bits)
    codes = random_codes(rng, 1000003, bits)
    data = pack(codes, bits)
    assert len(data) == packed_size(1000003, bits)
    # The spec's bit positions, checked on a few codes of the long stream.
    for i in (0, 1, 499_999, 1000002):
        value = 0
        for j in range(bits):
            p = i * bits + j
            value |= ((data[p // 8] >> (p % 8)) & 1) << j
        assert value == codes[i]
    np.testing.assert_array_equal(unpack(data, 1000003, bits), codes)


@pytest.mark.parametrize("bits", [3, 7])
def test_roundtrip_across_chunks(bits, monkeypatch):
    """Chunked packing and unpacking concatenate exactly (small chunks, odd lengths)."""
    monkeypatch.setattr(bitpack, "_CHUNK", 16)
    rng = np.random.default_rng(7)
    for count in (15, 16, 17, 31, 32, 33, 100):
        codes = random_codes(rng, count, bits)
        data = pack(codes, bits)
        assert data == reference_pack(codes, bits)
        np.testing.assert_array_equal(unpack(data, count, bits), codes)


def test_worked_example():
    # 3-bit codes [5, 3, 7, 0, 6, 1, 2]: code i bit j sits at stream bit p = 3i + j,
    # which is bit p % 8 (LSB first) of byte p // 8.
    #   code 0 = 5 = 0b101 -> stream bits 0..2  = 1,0,1
    #   code 1 = 3 = 0b011 -> stream bits 3..5  = 1,1,0
    #   code 2 = 7 = 0b111 -> stream bits 6..8  = 1,1,1
    #   code 3 = 0 = 0b000 -> stream bits 9..11 = 0,0,0
    #   code 4 = 6 = 0b110 -> stream bits 12..14 = 0,1,1
    #   code 5 = 1 = 0b001 -> stream bits 15..17 = 1,0,0
    #   code 6 = 2 = 0b010 -> stream bits 18..20 = 0,1,0
    # byte 0 = stream bits 0..7  = 1,0,1,1,1,0,1,1 (bit 0 first) = 0b11011101 = 0xdd
    # byte 1 = stream bits 8..15 = 1,0,0,0,0,1,1,1                = 0b11100001 = 0xe1
    # byte 2 = stream bits 16..20 = 0,0,0,1,0, then 3 zero padding bits = 0b00001000 = 0x08
    codes = [5, 3, 7, 0, 6, 1, 2]
    assert pack(np.array(codes), 3) == bytes.fromhex("dde108")
    assert reference_pack(codes, 3) == bytes.fromhex("dde108")
    np.testing.assert_array_equal(unpack(bytes.fromhex("dde108"), 7, 3), codes)


def test_accepts_any_integer_array_and_buffer():
    codes = np.array([[1, 0], [3, 2]], dtype=np.int64)
    data = pack(codes, 2)
    assert data == bytes([0b10_11_00_01])
    np.testing.assert_array_equal(unpack(bytearray(data), 4, 2), [1, 0, 3, 2])
    np.testing.assert_array_equal(unpack(memoryview(data), 4, 2), [1, 0, 3, 2])
    assert pack([], 5) == b""


@pytest.mark.parametrize("bits", range(1, 8))
def test_nonzero_padding_rejected(bits):
    count = 1  # one code: 8 - bits padding bits in the only byte
    codes = np.array([(1 << bits) - 1], dtype=np.uint8)
    data = bytearray(pack(codes, bits))
    for pad_bit in range(bits, 8):
        bad = bytearray(data)
        bad[-1] |= 1 << pad_bit
        with pytest.raises(PayloadError, match="padding"):
            unpack(bytes(bad), count, bits)


def test_nonzero_padding_rejected_long_stream():
    codes = np.full(11, 5, dtype=np.uint8)  # 33 bits: 7 padding bits in byte 4
    data = bytearray(pack(codes, 3))
    assert len(data) == 5 and data[-1] >> 1 == 0
    data[-1] |= 0x80
    with pytest.raises(PayloadError):
        unpack(bytes(data), 11, 3)


@pytest.mark.parametrize("bits", range(1, 9))
def test_wrong_length_rejected(bits):
    codes = random_codes(np.random.default_rng(0), 13, bits)
    data = pack(codes, bits)
    with pytest.raises(PayloadError):
        unpack(data[:-1], 13, bits)
    with pytest.raises(PayloadError):
        unpack(data + b"\x00", 13, bits)
    with pytest.raises(PayloadError):
        unpack(b"", 1, bits)
    with pytest.raises(PayloadError):
        unpack(b"\x00", 0, bits)


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_out_of_range_rejected(bits):
    with pytest.raises(UsageError):
        pack(np.array([0, 1 << bits], dtype=np.int64), bits)
    with pytest.raises(UsageError):
        pack(np.array([0, -1], dtype=np.int64), bits)
    with pytest.raises(UsageError):
        pack(np.array([2**40], dtype=np.uint64), bits)


def test_non_integer_codes_rejected():
    # 0.5 would otherwise be silently truncated to 0.
    with pytest.raises(UsageError):
        pack(np.array([0.5, 1.0]), 1)
    with pytest.raises(UsageError):
        pack(np.array([1.0, 2.0]), 3)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, "3", None])
def test_bad_bit_width_rejected(bits):
    with pytest.raises(UsageError):
        pack(np.zeros(4, dtype=np.uint8), bits)
    with pytest.raises(UsageError):
        unpack(b"\x00", 1, bits)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8).flatmap(
    lambda bits: st.tuples(st.just(bits), st.lists(st.integers(0, (1 << bits) - 1), max_size=70))))
def test_property_roundtrip(case):
    bits, codes = case
    data = pack(np.array(codes, dtype=np.int64), bits)
    assert data == reference_pack(codes, bits)
    assert len(data) == packed_size(len(codes), bits)
    assert unpack(data, len(codes), bits).tolist() == codes


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.binary(max_size=40))
def test_property_unpack_is_strict(bits, data):
    """Any byte string either unpacks to codes that pack back to it exactly, or is rejected."""
    count = len(data) * 8 // bits
    for n in {count, count - 1, count + 1}:
        if n < 0:
            continue
        try:
            codes = unpack(data, n, bits)
        except PayloadError:
            continue
        assert pack(codes, bits) == data
