"""The ``lowrank-mixed`` record kind (spec 10.7) and its quantizer, checked against the spec.

Everything the spec makes normative is re-implemented here from its text, independently
of ``dcm.lowrank`` / ``dcm.quant`` / ``dcm.bitpack``:

- ``spec_layout``: the sections of the blob and their 4-byte aligned offsets;
- ``spec_unpack`` / ``spec_pack``: the LSB-first continuous bit stream (section 11), bit by bit;
- ``spec_parse``: a whole blob read with ``struct`` (S as '<f', scales as '<e');
- ``spec_dequantize``: x̂ = (float32(q) − float32(z)) × float32(s), computed exactly in
  float64 (|q − z| < 256 times an 11-bit significand is exact) and rounded once to float32;
- ``spec_product``: Δ̂ = Û·diag(S)·V̂ᵀ as correctly rounded float64 sums, and the spec's
  tolerance (k + 2)·2⁻²³·Σᵢ|ûᵢ[a]·sᵢ·v̂ᵢ[b]|;
- ``round_to``: the rebuild rounding (float32 sum, then nearest-even to F16 / BF16).

The library's results are compared with these bit for bit (factors) or within the
spec's tolerance (the product).
"""

from __future__ import annotations

import copy
import math
import struct
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcm
from dcm import lowrank, quant, records
from dcm.constants import MAX_BIT_GROUPS, MAX_QUANT_GROUP_SIZE, Kind
from dcm.errors import (
    DcmError,
    IndexSchemaError,
    LimitError,
    PayloadError,
    UnknownKindError,
)
from dcm.lowrank import BitGroup, Factor
from dcm.records import LowrankMixed

from conftest import storage, write_checkpoint

# --- the spec, written out independently ---------------------------------------------


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def spec_layout(shape, groups) -> tuple[list[tuple[str, int, int]], int]:
    """[(section name, offset, size)] of a lowrank-mixed blob, and the blob's length.

    Each section starts at the smallest multiple of 4 not before the previous one's end.
    """
    m, n = shape
    k = groups[-1][1] if groups else 0
    sizes = [("S", 4 * k)]
    for gi, (start, stop, bits, gs) in enumerate(groups):
        c = stop - start
        for factor, length in (("V", n), ("U", m)):
            count = c * ceil_div(length, gs)
            sizes += [(f"{gi}.{factor}.codes", ceil_div(c * length * bits, 8)),
                      (f"{gi}.{factor}.scales", 2 * count),
                      (f"{gi}.{factor}.zeros", ceil_div(count * bits, 8))]
    out, end = [], 0
    for name, size in sizes:
        offset = ceil_div(end, 4) * 4
        out.append((name, offset, size))
        end = offset + size
    return out, (end if groups else 0)


def spec_unpack(data: bytes, count: int, bits: int) -> list[int]:
    """Section 11: code i bit j is stream bit p = i·b + j, bit p mod 8 of byte ⌊p/8⌋."""
    assert len(data) == ceil_div(count * bits, 8)
    codes = []
    for i in range(count):
        code = 0
        for j in range(bits):
            p = i * bits + j
            code |= ((data[p // 8] >> (p % 8)) & 1) << j
        codes.append(code)
    for p in range(count * bits, 8 * len(data)):
        assert not (data[p // 8] >> (p % 8)) & 1, "nonzero padding bit"
    return codes


def spec_pack(codes, bits: int) -> bytes:
    out = bytearray(ceil_div(len(codes) * bits, 8))
    for i, code in enumerate(codes):
        for j in range(bits):
            if (int(code) >> j) & 1:
                p = i * bits + j
                out[p // 8] |= 1 << (p % 8)
    return bytes(out)


def spec_parse(raw: bytes, shape, groups) -> dict:
    """Every section of a blob, decoded with struct; padding between sections checked zero."""
    m, n = shape
    layout, end = spec_layout(shape, groups)
    assert len(raw) == end
    pos = 0
    for _, offset, size in layout:
        assert raw[pos:offset] == bytes(offset - pos), "nonzero section padding"
        pos = offset + size
    sec = {name: raw[offset:offset + size] for name, offset, size in layout}
    k = groups[-1][1] if groups else 0
    out = {"S": list(struct.unpack(f"<{k}f", sec["S"])), "groups": []}
    for gi, (start, stop, bits, gs) in enumerate(groups):
        c = stop - start
        parsed = {}
        for factor, length in (("V", n), ("U", m)):
            ng = ceil_div(length, gs)
            codes = spec_unpack(sec[f"{gi}.{factor}.codes"], c * length, bits)
            scales = struct.unpack(f"<{c * ng}e", sec[f"{gi}.{factor}.scales"])
            zeros = spec_unpack(sec[f"{gi}.{factor}.zeros"], c * ng, bits)
            # vector-major: element j of vector start+r is code r·length + j; its scale and
            # zero point are entry r·G(length) + ⌊j / group_size⌋.
            parsed[factor] = [[(codes[r * length + j], zeros[r * ng + j // gs], scales[r * ng + j // gs])
                               for j in range(length)] for r in range(c)]
        out["groups"].append(parsed)
    return out


def spec_dequantize(parsed: dict, shape, groups) -> tuple[np.ndarray, np.ndarray]:
    """(Û (k, m), V̂ (k, n)) as float32, by the spec's formula, exactly."""
    m, n = shape
    k = groups[-1][1] if groups else 0
    u = np.zeros((k, m), dtype=np.float32)
    v = np.zeros((k, n), dtype=np.float32)
    for (start, stop, _, _), g in zip(groups, parsed["groups"]):
        for target, factor in ((v, "V"), (u, "U")):
            for r, vector in enumerate(g[factor]):
                # float(q) − float(z) is exact; times an fp16 value it has at most 19
                # significant bits: exact in float64, so one rounding to float32.
                target[start + r] = np.array([(float(q) - float(z)) * float(s) for q, z, s in vector],
                                             dtype=np.float64).astype(np.float32)
    return u, v


def spec_product(u: np.ndarray, s, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Δ̂ to float64 accuracy, the spec's tolerance) for factors (k, m), (k, n)."""
    u64, s64, v64 = (np.asarray(a, dtype=np.float64) for a in (u, s, v))
    terms = (u64.T[:, None, :] * s64) * v64.T[None, :, :]  # (m, n, k): ûᵢ[a]·sᵢ·v̂ᵢ[b]
    k = len(s64)
    exact = np.array([[math.fsum(t) for t in row] for row in terms]).reshape(u.shape[1], v.shape[1])
    bound = (k + 2) * 2.0**-23 * np.abs(terms).sum(axis=2)
    return exact, bound + 2.0**-45 * np.abs(terms).sum(axis=2)  # room for float64's own rounding


def bf16_value(b16: np.ndarray) -> np.ndarray:
    """Float64 value of bfloat16 bit patterns; the infinity pattern counts as ±2^128 (the next
    step of the exponent), which is what nearest-even rounding compares against."""
    b16 = b16.astype(np.int64)
    sign = np.where(b16 >> 15, -1.0, 1.0)
    exp, frac = (b16 >> 7) & 0xFF, b16 & 0x7F
    mag = np.where(exp == 0, frac / 128.0 * 2.0**-126, (1 + frac / 128.0) * 2.0 ** (exp - 127.0))
    return sign * mag


def bf16_round(x32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, nearest-even, by comparing the two neighbours in float64."""
    x32 = np.asarray(x32, dtype=np.float32)
    bits = x32.view(np.uint32).astype(np.int64)
    down = bits >> 16  # truncation: the neighbour toward zero
    up = down + 1  # the neighbour away from zero (0x7F7F + 1 is infinity)
    x = x32.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        d_down, d_up = np.abs(x - bf16_value(down)), np.abs(bf16_value(up) - x)
        take_up = (d_up < d_down) | ((d_up == d_down) & ((down & 1) == 1))
    out = np.where(np.isinf(x32) | (bits & 0xFFFF == 0), down, np.where(take_up, up, down))
    out = np.where(np.isnan(x32), 0x7FC0, out)
    return out.astype(np.uint16)


def round_to(x64: np.ndarray, dtype_name: str) -> np.ndarray:
    """The real value x rounded to float32, then to ``dtype_name``, as float64 values."""
    x32 = np.asarray(x64, dtype=np.float64).astype(np.float32)
    if dtype_name == "F32":
        return x32.astype(np.float64)
    if dtype_name == "F16":
        with np.errstate(over="ignore"):
            return x32.astype(np.float64).astype(np.float16).astype(np.float64)
    return (bf16_round(x32).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def values_of(array: np.ndarray, dtype_name: str) -> np.ndarray:
    """Float64 values of a storage array."""
    if dtype_name == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return array.astype(np.float64)


# --- random payloads ---------------------------------------------------------------


def random_scales(rng, count: int) -> np.ndarray:
    """Finite fp16 scales of every sort: normal, subnormal, ±0, negative, large."""
    bits = rng.integers(0, 1 << 16, count, dtype=np.uint16)
    finite = (bits & 0x7C00) != 0x7C00
    bits = np.where(finite, bits, bits & 0xBFFF)  # exponent 11111 -> 01111: finite again
    return bits.view(np.float16)


def random_payload(rng, shape, groups):
    """(S, [(V, U) Factor pairs]) with random codes, zero points and scales of each group's width."""
    m, n = shape
    k = groups[-1].stop if groups else 0
    s = rng.standard_normal(k).astype(np.float32) * np.float32(10.0) ** rng.integers(-3, 3, k)
    factors = []
    for g in groups:
        pair = []
        for length in (n, m):
            ng = ceil_div(length, g.group_size)
            pair.append(Factor(rng.integers(0, 1 << g.bits, (g.count, length), dtype=np.uint8),
                               random_scales(rng, g.count * ng).reshape(g.count, ng),
                               rng.integers(0, 1 << g.bits, (g.count, ng), dtype=np.uint8)))
        factors.append(tuple(pair))
    return s, factors


def groups_of(params: list) -> list[BitGroup]:
    return [BitGroup(*g) for g in params]


def check_blob_against_spec(shape, groups, s, factors):
    """pack_blob's bytes read back by the spec parser, and unpack_blob's result, equal the inputs."""
    raw = lowrank.pack_blob(shape, groups, s, factors)
    _, end = spec_layout(shape, [g.as_param() for g in groups])
    assert len(raw) == end == lowrank.blob_size(shape, groups)
    parsed = spec_parse(raw, shape, [g.as_param() for g in groups])
    assert np.asarray(parsed["S"], dtype=np.float32).tobytes() == np.asarray(s, dtype="<f4").tobytes()
    for g, (fv, fu), spec_g in zip(groups, factors, parsed["groups"]):
        for f, spec_f in ((fv, spec_g["V"]), (fu, spec_g["U"])):
            codes = np.array([[q for q, _, _ in vec] for vec in spec_f], dtype=np.uint8).reshape(f.codes.shape)
            np.testing.assert_array_equal(codes, f.codes)
            gs = g.group_size
            zeros = np.array([[vec[j][1] for j in range(0, len(vec), gs)] for vec in spec_f],
                             dtype=np.uint8).reshape(f.zeros.shape)
            np.testing.assert_array_equal(zeros, f.zeros)
            scales = np.array([[vec[j][2] for j in range(0, len(vec), gs)] for vec in spec_f],
                              dtype=np.float16).reshape(f.scales.shape)
            assert scales.tobytes() == np.asarray(f.scales, dtype="<f2").tobytes()
    # and the library's reader gives back the same arrays
    s2, factors2 = lowrank.unpack_blob(raw, shape, groups, "t")
    assert s2.dtype == np.float32 and s2.tobytes() == np.asarray(s, dtype="<f4").tobytes()
    assert len(factors2) == len(groups)
    for (fv, fu), (gv, gu) in zip(factors, factors2):
        for a, b in ((fv, gv), (fu, gu)):
            np.testing.assert_array_equal(b.codes, a.codes)
            np.testing.assert_array_equal(b.zeros, a.zeros)
            assert b.scales.tobytes() == np.asarray(a.scales, dtype="<f2").tobytes()
    return raw, parsed


# --- the spec's own example ------------------------------------------------------------


def test_spec_unpacker_reads_the_spec_example():
    """Sanity of the independent unpacker: section 11's worked example, both ways."""
    data = bytes.fromhex("dde108")
    assert spec_unpack(data, 7, 3) == [5, 3, 7, 0, 6, 1, 2]
    assert spec_pack([5, 3, 7, 0, 6, 1, 2], 3) == data


def test_spec_layout_by_hand():
    """The layout helper on a case worked out by hand from section 10.7.

    shape (3, 5), one group [0, 1, 3, 2]: S 4 bytes at 0; V codes 1·5·3 = 15 bits -> 2 bytes at
    4; V scales G(5) = 3 -> 6 bytes at 8; V zeros 3·3 = 9 bits -> 2 bytes at 16; U codes
    3·3 = 9 bits -> 2 bytes at 20; U scales G(3) = 2 -> 4 bytes at 24; U zeros 6 bits -> 1 byte
    at 28.  Total 29.
    """
    layout, end = spec_layout((3, 5), [[0, 1, 3, 2]])
    assert [(o, s) for _, o, s in layout] == [(0, 4), (4, 2), (8, 6), (16, 2), (20, 2), (24, 4), (28, 1)]
    assert end == 29
    assert lowrank.blob_size((3, 5), [BitGroup(0, 1, 3, 2)]) == 29


# --- packing round trips ----------------------------------------------------------------

ODD_CASES = [
    ((7, 13), [[0, 3, None, 5]]),  # group size divides neither length
    ((13, 7), [[0, 1, None, 4], [1, 5, None, 3]]),
    ((1, 31), [[0, 1, None, 6]]),  # a 1×N matrix
    ((9, 1), [[0, 1, None, 2]]),  # an N×1 matrix
    ((5, 6), [[0, 5, None, 64]]),  # group larger than the vector, full rank
    ((6, 11), [[0, 1, None, 1], [1, 2, None, 11], [2, 6, None, 7]]),
]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape, template", ODD_CASES)
def test_pack_unpack_every_width(bits, shape, template):
    groups = groups_of([[a, b, bits if i % 2 == 0 else 9 - bits, gs]
                        for i, (a, b, _, gs) in enumerate(template)])
    rng = np.random.default_rng(bits * 97 + shape[0])
    s, factors = random_payload(rng, shape, groups)
    check_blob_against_spec(shape, groups, s, factors)


def test_codes_are_one_continuous_stream_per_section():
    """3-bit codes cross byte boundaries between vectors: no per-vector byte alignment."""
    shape, groups = (4, 3), [BitGroup(0, 2, 3, 8)]  # V: 2 vectors × 3 codes = 18 bits, 3 bytes
    v = Factor(np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8), np.ones((2, 1), np.float16),
               np.zeros((2, 1), np.uint8))
    u = Factor(np.zeros((2, 4), dtype=np.uint8), np.ones((2, 1), np.float16), np.zeros((2, 1), np.uint8))
    raw = lowrank.pack_blob(shape, groups, np.ones(2, np.float32), [(v, u)])
    layout, _ = spec_layout(shape, [g.as_param() for g in groups])
    name, offset, size = layout[1]
    assert name == "0.V.codes" and size == 3
    assert raw[offset:offset + size] == spec_pack([1, 2, 3, 4, 5, 6], 3)


@st.composite
def blob_cases(draw):
    m, n = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    k = draw(st.integers(0, min(m, n, 7)))
    cuts = sorted(draw(st.sets(st.integers(1, k - 1), max_size=3))) if k > 1 else []
    bounds = [0, *cuts, k] if k else []
    groups = [BitGroup(a, b, draw(st.integers(1, 8)), draw(st.integers(1, 25)))
              for a, b in zip(bounds, bounds[1:])]
    return (m, n), groups, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None)
@given(blob_cases())
def test_property_pack_unpack_and_dequantize(case):
    shape, groups, seed = case
    s, factors = random_payload(np.random.default_rng(seed), shape, groups)
    raw, parsed = check_blob_against_spec(shape, groups, s, factors)
    u_spec, v_spec = spec_dequantize(parsed, shape, [g.as_param() for g in groups])
    u, s_lib, v = lowrank.dequantized_factors(shape, groups, *lowrank.unpack_blob(raw, shape, groups, "t"))
    assert u.dtype == v.dtype == np.float32
    assert u.tobytes() == u_spec.tobytes() and v.tobytes() == v_spec.tobytes()  # bit for bit
    assert s_lib.tobytes() == np.asarray(s, dtype="<f4").tobytes()


def test_rank_zero_has_no_blob():
    shape = (5, 7)
    assert lowrank.blob_size(shape, []) == 0
    assert lowrank.pack_blob(shape, [], np.zeros(0, np.float32), []) == b""
    s, factors = lowrank.unpack_blob(b"", shape, [], "t")
    assert s.size == 0 and factors == []
    params, raws = LowrankMixed.encode(shape, [], np.zeros(0, np.float32), [])
    assert params == {"packing": 1, "groups": []} and raws == []
    with pytest.raises(PayloadError):
        lowrank.unpack_blob(b"\0\0\0\0", shape, [], "t")


# --- exact dequantization --------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_quant_dequantize_is_the_spec_formula(bits):
    rng = np.random.default_rng(bits)
    rows, n, gs = 5, 23, 6
    ng = ceil_div(n, gs)
    codes = rng.integers(0, 1 << bits, (rows, n), dtype=np.uint8)
    zeros = rng.integers(0, 1 << bits, (rows, ng), dtype=np.uint8)
    scales = random_scales(rng, rows * ng).reshape(rows, ng)
    got = quant.dequantize(codes, scales, zeros, gs)
    want = np.array([[(float(codes[r, j]) - float(zeros[r, j // gs])) * float(scales[r, j // gs])
                      for j in range(n)] for r in range(rows)]).astype(np.float32)
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [1, 5, 16, 1000])
def test_rtn_error_and_zero_preservation(bits, group_size):
    """Round-to-nearest: codes and zeros fit ``bits``, zero stays exactly zero, error ≲ s/2."""
    rng = np.random.default_rng(bits * 31 + group_size)
    x = rng.standard_normal((6, 37)).astype(np.float32)
    x[:, ::4] = 0.0
    x[3] = np.abs(x[3])  # a row of one sign: the range still includes 0
    codes, scales, zeros = quant.rtn(x, bits, group_size)
    ng = ceil_div(37, group_size)
    assert codes.shape == x.shape and codes.dtype == np.uint8
    assert scales.shape == zeros.shape == (6, ng)
    assert scales.dtype == np.float16 and zeros.dtype == np.uint8
    assert codes.max() < 1 << bits and zeros.max() < 1 << bits
    xh = quant.dequantize(codes, scales, zeros, group_size)
    assert (xh[:, ::4] == 0).all() and not np.signbit(xh[:, ::4]).any()
    s = np.repeat(scales.astype(np.float64), group_size, axis=1)[:, :37]
    maxq = (1 << bits) - 1
    # half a step, plus the fp16 rounding of the scale stretched over the whole grid
    assert (np.abs(xh - x) <= s * (0.5 + maxq * 2.0**-11) * (1 + 1e-6)).all()
    # per-row widths: the same rows quantized together at mixed widths match row by row
    widths = np.array([1, 2, 3, 4, 8, bits])
    mixed = quant.rtn(x, widths, group_size)
    for r, b in enumerate(widths):
        single = quant.rtn(x[r:r + 1], int(b), group_size)
        for a, c in zip(mixed, single):
            np.testing.assert_array_equal(a[r:r + 1], c)


# --- records: encode, delta, decode -------------------------------------------------------


def make_record(shape, dtype_name, groups, raws, base_shape=None, base_dtype=None) -> dict:
    params = {"packing": 1, "groups": [g.as_param() if isinstance(g, BitGroup) else list(g) for g in groups]}
    return {"name": "w", "kind": int(Kind.LOWRANK_MIXED), "dtype": dtype_name, "shape": list(shape),
            "params": params,
            "blobs": [{"offset": 0, "length": len(r), "encoding": 0, "raw_length": len(r), "crc32": zlib.crc32(r)}
                      for r in raws],
            "base": {"dtype": base_dtype or dtype_name, "shape": list(base_shape or shape), "sha256": bytes(32)}}


def quantized_record(rng, shape, groups):
    """A realistic record: unit-ish vectors quantized by RTN, decreasing S."""
    m, n = shape
    k = groups[-1].stop if groups else 0
    u = np.linalg.qr(rng.standard_normal((m, max(k, 1))))[0][:, :k].T
    v = np.linalg.qr(rng.standard_normal((n, max(k, 1))))[0][:, :k].T
    s = (0.05 * 0.7 ** np.arange(k)).astype(np.float32)
    factors = []
    for g in groups:
        fv = Factor(*quant.rtn(v[g.start:g.stop], g.bits, g.group_size))
        fu = Factor(*quant.rtn(u[g.start:g.stop], g.bits, g.group_size))
        factors.append((fv, fu))
    params, raws = LowrankMixed.encode(shape, groups, s, factors)
    return params, raws


@pytest.mark.parametrize("dtype_name", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("shape, groups", [
    ((12, 20), [[0, 2, 8, 7], [2, 6, 3, 7], [6, 10, 2, 7]]),
    ((33, 9), [[0, 9, 4, 128]]),
    ((1, 17), [[0, 1, 8, 5]]),
    ((40, 40), [[0, 1, 8, 3]] + [[i, i + 1, 1 + i % 8, 1 + i] for i in range(1, 40)]),  # k = 40
])
def test_decode_within_the_product_tolerance(dtype_name, shape, groups):
    rng = np.random.default_rng(len(groups) * 7 + shape[0])
    groups = groups_of(groups)
    params, raws = quantized_record(rng, shape, groups)
    assert params == {"packing": 1, "groups": [g.as_param() for g in groups]} and len(raws) == 1
    rec = make_record(shape, dtype_name, groups, raws)
    records.validate(rec, "t")

    # Δ̂ from the spec alone
    parsed = spec_parse(raws[0], shape, params["groups"])
    u, v = spec_dequantize(parsed, shape, params["groups"])
    s = np.asarray(parsed["S"], dtype=np.float32)
    exact, tol = spec_product(u, s, v)

    delta = LowrankMixed().delta(rec, raws)
    assert delta.dtype == np.float32 and delta.shape == shape
    assert (np.abs(delta.astype(np.float64) - exact) <= tol).all()

    base32 = rng.standard_normal(shape).astype(np.float32)
    base = storage(dtype_name, base32)  # the base's own storage (BF16 truncated from float32)
    out = LowrankMixed().decode(rec, raws, base)
    assert out.dtype == base.dtype and out.shape == shape
    # W = round(float32(W_base) + Δ̂) with Δ̂ anywhere inside the tolerance: rounding is monotone,
    # so W lies between the roundings of the two ends (float64 sums are exact enough).
    b = values_of(base, dtype_name)
    slack = 2.0**-40 * (np.abs(b) + np.abs(exact) + tol)
    lo, hi = round_to(b + exact - tol - slack, dtype_name), round_to(b + exact + tol + slack, dtype_name)
    got = values_of(out, dtype_name)
    assert ((lo <= got) & (got <= hi)).all()
    # and exactly the rounding of base + the library's own Δ̂ (the rebuild step alone)
    want = round_to(b + delta.astype(np.float64), dtype_name)
    np.testing.assert_array_equal(got, want)


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("dtype_name, big", [("F16", 65504.0), ("BF16", 3.3895313892515355e38),
                                             ("F32", 3.4028234663852886e38)])
def test_rebuild_overflow_nan_and_infinity(dtype_name, big):
    """A sum beyond the dtype's range becomes ±infinity; a NaN base stays NaN (BF16: 0x7FC0)."""
    shape = (2, 3)
    groups = [BitGroup(0, 1, 8, 4)]
    # û = [1, -1] · big/2 ... built exactly: codes 2 and 0 around zero point 1, scale 1.
    fv = Factor(np.array([[2, 2, 1]], np.uint8), np.array([[1.0]], np.float16), np.array([[1]], np.uint8))
    fu = Factor(np.array([[2, 0]], np.uint8), np.array([[1.0]], np.float16), np.array([[1]], np.uint8))
    s = np.array([big / 2], dtype=np.float32)  # Δ̂ = [[s, s, 0], [-s, -s, 0]]
    params, raws = LowrankMixed.encode(shape, groups, s, [(fv, fu)])
    rec = make_record(shape, dtype_name, groups, raws)
    base_vals = np.array([[big, np.nan, 1.0], [-big, np.inf, -np.inf]], dtype=np.float32)
    base = storage(dtype_name, base_vals)
    if dtype_name == "BF16":
        base[0, 1] = 0x7F81  # a signalling NaN with a payload
    out = values_of(LowrankMixed().decode(rec, raws, base), dtype_name)
    assert out[0, 0] == np.inf and out[1, 0] == -np.inf
    assert np.isnan(out[0, 1]) and out[1, 1] == np.inf
    assert out[0, 2] == 1.0 and out[1, 2] == -np.inf
    if dtype_name == "BF16":
        assert LowrankMixed().decode(rec, raws, base)[0, 1] == 0x7FC0


@pytest.mark.parametrize("dtype_name", ["F32", "F16", "BF16"])
def test_rank_zero_record_decodes_to_the_base(dtype_name):
    rng = np.random.default_rng(5)
    shape = (4, 6)
    rec = make_record(shape, dtype_name, [], [])
    records.validate(rec, "t")
    base = storage(dtype_name, rng.standard_normal(shape).astype(np.float32))
    assert not LowrankMixed().delta(rec, []).any()
    out = LowrankMixed().decode(rec, [], base)
    np.testing.assert_array_equal(values_of(out, dtype_name), round_to(values_of(base, dtype_name), dtype_name))


# --- validation -----------------------------------------------------------------------------


def valid_record(shape=(6, 9), dtype_name="F32", groups=((0, 2, 8, 4), (2, 5, 3, 4))):
    """A schema-valid record whose blob raw length comes from the spec's layout."""
    _, size = spec_layout(shape, [list(g) for g in groups])
    raws = [bytes(size)] if groups else []
    return make_record(shape, dtype_name, [list(g) for g in groups], raws)


def test_valid_records_pass():
    records.validate(valid_record(), "t")
    records.validate(valid_record(groups=()), "t")
    records.validate(valid_record(shape=(3, 5), groups=((0, 3, 1, MAX_QUANT_GROUP_SIZE),)), "t")  # rank = min
    records.validate(valid_record(shape=(70, 64), groups=tuple((i, i + 1, 2, 8) for i in range(MAX_BIT_GROUPS))),
                     "t")
    for dt in ("F16", "BF16"):
        records.validate(valid_record(dtype_name=dt), "t")


def fitted_blobs(shape, groups) -> list[dict]:
    """Blobs whose raw length follows the layout formula even for groups that break the rules
    (when the formula can be evaluated), so that only the rule on groups can reject them."""
    try:
        ok = all(isinstance(g, list) and len(g) == 4 and g[3] >= 1 and g[1] >= g[0] and g[2] >= 0
                 for g in groups)
    except TypeError:
        ok = False
    if not ok or not groups:
        return []
    _, size = spec_layout(shape, groups)
    return [{"offset": 0, "length": size, "encoding": 0, "raw_length": size, "crc32": 0}]


def _groups(value):
    def mutate(rec):
        rec["params"]["groups"] = value
        if isinstance(value, list):
            rec["blobs"] = fitted_blobs(rec["shape"], value)
    return mutate


def _set(path, value):
    def mutate(rec):
        target = rec
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _blobs(fn):
    def mutate(rec):
        rec["blobs"] = fn(rec["blobs"])
    return mutate


def _raw_length(delta):
    def mutate(rec):
        rec["blobs"][0]["raw_length"] += delta
        rec["blobs"][0]["length"] += delta
    return mutate


BAD_RECORDS = {
    "overlapping groups": (_groups([[0, 3, 8, 4], [2, 5, 3, 4]]), PayloadError),
    "out of order": (_groups([[2, 5, 3, 4], [0, 2, 8, 4]]), PayloadError),
    "gap between groups": (_groups([[0, 2, 8, 4], [3, 5, 3, 4]]), PayloadError),
    "first start not 0": (_groups([[1, 3, 8, 4]]), PayloadError),
    "empty group": (_groups([[0, 2, 8, 4], [2, 2, 3, 4]]), PayloadError),
    "stop before start": (_groups([[0, 2, 8, 4], [2, 1, 3, 4]]), PayloadError),
    "bits 0": (_groups([[0, 2, 0, 4]]), PayloadError),
    "bits 9": (_groups([[0, 2, 9, 4]]), PayloadError),
    "group size 0": (_groups([[0, 2, 8, 0]]), PayloadError),
    "group size over the limit": (_groups([[0, 2, 8, MAX_QUANT_GROUP_SIZE + 1]]), PayloadError),
    "negative group size": (_groups([[0, 2, 8, -4]]), PayloadError),
    "rank over min(shape)": (_groups([[0, 7, 2, 4]]), PayloadError),
    "too many groups": (_groups([[i, i + 1, 2, 4] for i in range(MAX_BIT_GROUPS + 1)]), LimitError),
    "group of three": (_groups([[0, 2, 8]]), IndexSchemaError),
    "group of five": (_groups([[0, 2, 8, 4, 0]]), IndexSchemaError),
    "group with a bool": (_groups([[0, 2, True, 4]]), IndexSchemaError),
    "group with a float": (_groups([[0, 2, 8, 4.0]]), IndexSchemaError),
    "group not an array": (_groups([7]), IndexSchemaError),
    "groups not an array": (_groups({"a": 1}), IndexSchemaError),
    "packing 0": (_set(["params", "packing"], 0), UnknownKindError),
    "packing 2": (_set(["params", "packing"], 2), UnknownKindError),
    "packing a bool": (_set(["params", "packing"], True), IndexSchemaError),
    "packing missing": (lambda rec: rec["params"].pop("packing"), IndexSchemaError),
    "groups missing": (lambda rec: rec["params"].pop("groups"), IndexSchemaError),
    "extra param": (_set(["params", "layout"], 0), IndexSchemaError),
    "blob one byte short": (_raw_length(-1), PayloadError),
    "blob one byte long": (_raw_length(+1), PayloadError),
    "no blob": (_blobs(lambda b: []), PayloadError),
    "two blobs": (_blobs(lambda b: b + [dict(b[0])]), PayloadError),
    "blob for rank 0": (lambda rec: rec["params"].update(groups=[]), PayloadError),
    "F64 matrix": (lambda rec: (rec.update(dtype="F64"), rec["base"].update(dtype="F64")), PayloadError),
    "I32 matrix": (lambda rec: (rec.update(dtype="I32"), rec["base"].update(dtype="I32")), PayloadError),
    "1-D shape": (lambda rec: (rec.update(shape=[54]), rec["base"].update(shape=[54])), PayloadError),
    "3-D shape": (lambda rec: (rec.update(shape=[6, 9, 1]), rec["base"].update(shape=[6, 9, 1])), PayloadError),
    "no base": (lambda rec: rec.pop("base"), IndexSchemaError),
    "base of another dtype": (_set(["base", "dtype"], "F16"), PayloadError),
    "base of another shape": (_set(["base", "shape"], [9, 6]), PayloadError),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_malformed_records_are_rejected(case):
    mutate, error = BAD_RECORDS[case]
    rec = valid_record()
    mutate(rec)
    with pytest.raises(error):
        records.validate(rec, "t")


def test_rank_bound_uses_the_smaller_dimension():
    for shape in ((3, 8), (8, 3)):
        records.validate(valid_record(shape=shape, groups=((0, 3, 2, 4),)), "t")
        with pytest.raises(PayloadError):
            records.validate(valid_record(shape=shape, groups=((0, 4, 2, 4),)), "t")


# --- payload checks (at read time) ------------------------------------------------------------


def _payload():
    shape = (5, 11)  # 11 and 5 codes of 3 bits: padding bits and padding bytes everywhere
    groups = [BitGroup(0, 1, 3, 4), BitGroup(1, 3, 5, 3)]
    s, factors = random_payload(np.random.default_rng(9), shape, groups)
    s = np.abs(s)
    for pair in factors:
        for f in pair:
            f.scales[:] = np.abs(f.scales.astype(np.float32)).astype(np.float16)
    return shape, groups, s, factors


def test_nonzero_padding_between_sections_is_rejected():
    shape, groups, s, factors = _payload()
    raw = lowrank.pack_blob(shape, groups, s, factors)
    layout, _ = spec_layout(shape, [g.as_param() for g in groups])
    gaps, pos = [], 0
    for _, offset, size in layout:
        gaps += range(pos, offset)
        pos = offset + size
    assert gaps, "the case must have padding bytes"
    for i in gaps:
        bad = bytearray(raw)
        bad[i] = 0x80
        with pytest.raises(PayloadError):
            lowrank.unpack_blob(bytes(bad), shape, groups, "t")


def test_nonzero_padding_bits_are_rejected():
    shape, groups, s, factors = _payload()
    raw = lowrank.pack_blob(shape, groups, s, factors)
    layout, _ = spec_layout(shape, [g.as_param() for g in groups])
    checked = 0
    for name, offset, size in layout:
        if name.endswith("codes") or name.endswith("zeros"):
            gi, factor, _ = name.split(".")
            g = groups[int(gi)]
            length = shape[1] if factor == "V" else shape[0]
            count = g.count * length if name.endswith("codes") else g.count * ceil_div(length, g.group_size)
            used = count * g.bits % 8
            if used:
                bad = bytearray(raw)
                bad[offset + size - 1] |= 1 << 7
                with pytest.raises(PayloadError):
                    lowrank.unpack_blob(bytes(bad), shape, groups, "t")
                checked += 1
    assert checked >= 4


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_s_or_scale_is_rejected(value):
    shape, groups, s, factors = _payload()
    bad_s = s.copy()
    bad_s[1] = value
    with pytest.raises(PayloadError):
        lowrank.unpack_blob(lowrank.pack_blob(shape, groups, bad_s, factors), shape, groups, "t")
    for gi in range(len(groups)):
        for side in range(2):
            bad = copy.deepcopy(factors)
            bad[gi][side].scales[0, -1] = value
            with pytest.raises(PayloadError):
                lowrank.unpack_blob(lowrank.pack_blob(shape, groups, s, bad), shape, groups, "t")


def test_negative_s_and_scales_are_allowed():
    shape, groups, s, factors = _payload()
    s = -s
    for pair in factors:
        for f in pair:
            f.scales[:] = -f.scales
    raw = lowrank.pack_blob(shape, groups, s, factors)
    s2, f2 = lowrank.unpack_blob(raw, shape, groups, "t")
    assert (s2 < 0).all() and (f2[0][0].scales.astype(np.float32) <= 0).all()


def test_wrong_blob_length_is_rejected():
    shape, groups, s, factors = _payload()
    raw = lowrank.pack_blob(shape, groups, s, factors)
    for bad in (raw[:-1], raw + b"\0", raw + bytes(4)):
        with pytest.raises(PayloadError):
            lowrank.unpack_blob(bad, shape, groups, "t")


# --- the same rules through a whole file ---------------------------------------------------

HEADER = struct.Struct("<8sHHIIIQQ20sI")  # spec section 3


def read_file(path):
    """(header fields, index, data section) of a .dcm file, read with struct and msgpack."""
    raw = Path(path).read_bytes()
    magic, major, minor, req, opt, align, index_len, file_len, reserved, crc = HEADER.unpack(raw[:64])
    index = msgpack.unpackb(raw[64:64 + index_len], raw=False)
    start = ceil_div(64 + index_len, align) * align
    return {"major": major, "minor": minor, "alignment": align, "index_length": index_len}, index, raw[start:]


def write_file(path, header, index, data: bytes):
    """A file from an index and its data section (offsets relative to it), with a valid CRC."""
    index_bytes = msgpack.packb(index, use_bin_type=True)
    align = header["alignment"]
    body = index_bytes
    if data:
        body += bytes(ceil_div(64 + len(index_bytes), align) * align - 64 - len(index_bytes)) + data
    head = HEADER.pack(b"\x89DCM\r\n\x1a\n", header["major"], header["minor"], 0, 0, align,
                       len(index_bytes), 64 + len(body), bytes(20), 0)[:60]
    Path(path).write_bytes(head + struct.pack("<I", zlib.crc32(head + index_bytes)) + body)


@pytest.fixture
def lowrank_file(tmp_path):
    """(path, base dir, base array) of a delta-come file whose single record is lowrank-mixed."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 16)).astype(np.float32)
    d = (rng.standard_normal((24, 3)) @ rng.standard_normal((3, 16)) * 0.01).astype(np.float32)
    base_dir = write_checkpoint(tmp_path / "base", {"w": ("F32", w)})
    ft_dir = write_checkpoint(tmp_path / "ft", {"w": ("F32", w + d)})
    out = tmp_path / "x.dcm"
    dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio="1/2",
               options={"recipe": "8:2,3:32,2", "group_size": 5})
    header, index, _ = read_file(out)
    assert (header["major"], header["minor"]) == (1, 1)
    assert index["tensors"][0]["kind"] == Kind.LOWRANK_MIXED and index["tensors"][0]["params"]["groups"]
    return out, base_dir, w


def test_file_roundtrip_helpers(lowrank_file, tmp_path):
    """Re-writing the file unchanged gives back the same bytes (the helpers are faithful)."""
    path, _, _ = lowrank_file
    header, index, data = read_file(path)
    copy_path = tmp_path / "copy.dcm"
    write_file(copy_path, header, index, data)
    assert copy_path.read_bytes() == path.read_bytes()


def _group_item(i, j, value):
    return lambda rec: rec["params"]["groups"][i].__setitem__(j, value)


FILE_BAD_RECORDS = {
    "bits 9": (_group_item(0, 2, 9), PayloadError),
    "bits 0": (_group_item(0, 2, 0), PayloadError),
    "group size 0": (_group_item(0, 3, 0), PayloadError),
    "group size 65537": (_group_item(0, 3, 65537), PayloadError),
    "overlapping groups": (_group_item(-1, 0, 1), PayloadError),
    "rank over min(shape)": (_group_item(-1, 1, 17), PayloadError),
    "packing 2": (lambda rec: rec["params"].__setitem__("packing", 2), UnknownKindError),
    "group of three": (lambda rec: rec["params"]["groups"][0].pop(), IndexSchemaError),
    "too many groups": (lambda rec: rec["params"].__setitem__("groups", [[i, i + 1, 2, 4] for i in range(65)]),
                        LimitError),
    "raw length one short": (lambda rec: rec["blobs"][0].__setitem__("raw_length", rec["blobs"][0]["raw_length"] - 1),
                             PayloadError),
    "no blob": (lambda rec: rec.__setitem__("blobs", []), PayloadError),
    "blob at rank 0": (lambda rec: rec["params"].__setitem__("groups", []), PayloadError),
    "F64 record": (lambda rec: (rec.__setitem__("dtype", "F64"), rec["base"].__setitem__("dtype", "F64")),
                   PayloadError),
    "no base": (lambda rec: rec.pop("base"), IndexSchemaError),
}


@pytest.mark.parametrize("case", list(FILE_BAD_RECORDS))
def test_file_with_a_malformed_record_is_rejected_at_open(lowrank_file, case):
    path, _, _ = lowrank_file
    header, index, data = read_file(path)
    mutate, error = FILE_BAD_RECORDS[case]
    mutate(index["tensors"][0])
    if "base" not in index["tensors"][0]:  # keep the base digest out of the picture
        index["base"]["digest"] = __import__("hashlib").sha256().digest()
    if not any(r["blobs"] for r in index["tensors"]) and not index.get("attachments"):
        data = b""  # no blob left: the file ends after the index
    write_file(path, header, index, data)
    with pytest.raises(error):
        dcm.open(path).close()


def _replace_payload(path, mutate_raw):
    """Rewrite the file's only blob as a raw blob of ``mutate_raw(raw bytes)``, CRC fixed."""
    header, index, data = read_file(path)
    rec = index["tensors"][0]
    with dcm.open(path) as f:
        raw = f.raw_blobs(f.record(rec["name"]))[0]
    new = mutate_raw(bytearray(raw))
    rec["blobs"][0].update(length=len(new), raw_length=len(new), encoding=0, crc32=zlib.crc32(new))
    write_file(path, header, index, bytes(new))


def _set_byte(i, value):
    def mutate(raw):
        raw[i] = value
        return bytes(raw)
    return mutate


def test_file_payload_checks_on_read(lowrank_file):
    path, _, w = lowrank_file
    _, index, _ = read_file(path)
    shape, groups = (24, 16), index["tensors"][0]["params"]["groups"]
    layout, _ = spec_layout(shape, groups)
    with dcm.open(path) as f:
        good = f.tensor("w", w)
    # S[0] = NaN: the file opens (nothing read yet) but the tensor is refused
    nan = struct.pack("<f", float("nan"))
    _replace_payload(path, lambda raw: bytes(nan + raw[4:]))
    with dcm.open(path) as f:
        with pytest.raises(PayloadError):
            f.tensor("w", w)
    with pytest.raises(PayloadError):  # verify finds it without the base too
        dcm.verify(path)
    # back to valid: same tensor as before (the rewrite helper does not change anything else)
    _replace_payload(path, lambda raw: bytes(struct.pack("<f", 1.0) + raw[4:]))
    with dcm.open(path) as f:
        assert f.tensor("w", w).shape == good.shape
    # a padding byte between two sections
    pos, gap = 0, None
    for _, offset, size in layout:
        if offset > pos:
            gap = pos
        pos = offset + size
    assert gap is not None
    dcm.verify(path)
    _replace_payload(path, _set_byte(gap, 1))
    with dcm.open(path) as f:
        with pytest.raises(PayloadError):
            f.tensor("w", w)
    with pytest.raises(PayloadError):
        dcm.verify(path)


@pytest.mark.parametrize("dtype_name", ["F32", "F16", "BF16"])
def test_file_decode_matches_the_spec(tmp_path, dtype_name):
    """Each decoded matrix of a delta-come file is the spec's rebuild of its blob, parsed here
    from the file's bytes (CRC, zstd, sections, codes, scales, zero points) independently."""
    rng = np.random.default_rng(8)
    shapes = {"a": (30, 17), "b": (9, 40)}
    base_t, ft_t = {}, {}
    for name, shape in shapes.items():
        w = rng.standard_normal(shape).astype(np.float32)
        d = rng.standard_normal((shape[0], 4)) @ rng.standard_normal((4, shape[1])) * 0.02
        base_t[name] = (dtype_name, storage(dtype_name, w))
        ft_t[name] = (dtype_name, storage(dtype_name, (w + d).astype(np.float32)))
    base_dir, ft_dir = write_checkpoint(tmp_path / "b", base_t), write_checkpoint(tmp_path / "f", ft_t)
    path = tmp_path / "x.dcm"
    dcm.encode(base_dir, ft_dir, path, method="delta-come", ratio="1/2", options={"group_size": 7})
    header, index, data = read_file(path)
    assert (header["major"], header["minor"]) == (1, 1)
    checked = 0
    for rec in index["tensors"]:
        assert rec["kind"] == Kind.LOWRANK_MIXED and rec["dtype"] == dtype_name
        shape, groups = tuple(rec["shape"]), rec["params"]["groups"]
        assert groups and all(g[3] == 7 for g in groups) and rec["params"]["packing"] == 1
        (blob,) = rec["blobs"]
        stored = data[blob["offset"]:blob["offset"] + blob["length"]]
        assert zlib.crc32(stored) == blob["crc32"]
        if blob["encoding"] == 1:
            import zstandard
            raw = zstandard.ZstdDecompressor().decompress(stored)
        elif blob["encoding"] == 2:  # rans (spec 8.2), by the independent decoder
            import spec_oracle
            raw = spec_oracle.dcmref.unrans(bytes(stored), blob["raw_length"], "blob")
        else:
            raw = stored
        assert len(raw) == blob["raw_length"] == spec_layout(shape, groups)[1]
        parsed = spec_parse(raw, shape, groups)
        u, v = spec_dequantize(parsed, shape, groups)
        exact, tol = spec_product(u, np.asarray(parsed["S"], np.float32), v)
        base = base_t[rec["name"]][1]
        with dcm.open(path) as f:
            got = values_of(f.tensor(rec["name"], base), dtype_name)
        b = values_of(base, dtype_name)
        slack = 2.0**-40 * (np.abs(b) + np.abs(exact) + tol)
        lo = round_to(b + exact - tol - slack, dtype_name)
        hi = round_to(b + exact + tol + slack, dtype_name)
        assert ((lo <= got) & (got <= hi)).all()
        # closer to the fine-tune than the base is (two of the four directions are kept)
        want = values_of(ft_t[rec["name"]][1], dtype_name)
        assert np.linalg.norm(got - want) < 0.9 * np.linalg.norm(want - b)
        checked += 1
    assert checked == 2


def test_dcm_errors_only_for_hostile_groups(lowrank_file):
    """Whatever the groups hold, opening raises a DcmError (never another exception)."""
    path, _, _ = lowrank_file
    header, index, data = read_file(path)
    for groups in ([[0, 2**63, 8, 4]], [[0, 1, 2**40, 4]], [[-1, 1, 8, 4]], [[0, 1, 8, 2**64 - 1]],
                   [[0, 1, 8, 4], None], [[]], "x", None, [[0, 1, 8, 4]] * 3):
        index["tensors"][0]["params"]["groups"] = groups
        write_file(path, header, index, data)
        with pytest.raises(DcmError):
            dcm.open(path).close()


# --- hypothesis: validation agrees with the spec's rule set ---------------------------------------


def spec_groups_ok(shape, groups) -> bool:
    """Section 10.7's conditions on groups (all four-int arrays, at most MAX_BIT_GROUPS)."""
    start = 0
    for g0, g1, bits, gs in groups:
        if g0 != start or g1 <= g0 or not 1 <= bits <= 8 or not 1 <= gs <= MAX_QUANT_GROUP_SIZE:
            return False
        start = g1
    return start <= min(shape)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(st.integers(1, 12), st.integers(1, 12)),
       st.lists(st.tuples(st.integers(-1, 13), st.integers(-1, 13), st.integers(-1, 10),
                          st.sampled_from([-1, 0, 1, 2, 5, 65536, 65537])), max_size=4))
def test_property_group_validation_matches_the_spec(shape, groups):
    groups = [list(g) for g in groups]
    ok = spec_groups_ok(shape, groups)
    rec = make_record(shape, "F16", groups, [])
    rec["blobs"] = fitted_blobs(shape, groups)
    if ok:
        records.validate(rec, "t")
    else:
        with pytest.raises(PayloadError):
            records.validate(rec, "t")
