#!/usr/bin/env python3
"""Self-tests of dcmref against the worked examples of spec/dcm-format.md.

Run: python spec/reference/selftest.py   (exit status 0 when all pass)

Uses only the spec's text: the hex dump of §18 is parsed out of the spec
file itself; the examples of §10.7, §10.8, §10.12 and §11 are rebuilt here
with a tiny writer (msgpack packer + container assembly per §3 and §7).
"""

import hashlib
import json
import os
import re
import struct
import sys
import tempfile
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dcmref  # noqa: E402

SPEC = os.path.join(HERE, "..", "dcm-format.md")


# ------------------------------------------------------- a tiny writer

def pack(v):
    """Shortest-form msgpack of the value types the index uses."""
    if isinstance(v, bool):
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        if 0 <= v <= 0x7F:
            return bytes([v])
        for fmt, code, hi in ((">B", 0xCC, 1 << 8), (">H", 0xCD, 1 << 16),
                              (">I", 0xCE, 1 << 32), (">Q", 0xCF, 1 << 64)):
            if 0 <= v < hi:
                return bytes([code]) + struct.pack(fmt, v)
        raise ValueError(v)
    if isinstance(v, str):
        b = v.encode()
        return (bytes([0xA0 | len(b)]) if len(b) < 32 else b"\xd9" + bytes([len(b)])) + b
    if isinstance(v, bytes):
        return b"\xc4" + bytes([len(v)]) + v
    if isinstance(v, list):
        return bytes([0x90 | len(v)]) + b"".join(pack(x) for x in v)
    if isinstance(v, dict):
        return bytes([0x80 | len(v)]) + b"".join(pack(k) + pack(x) for k, x in v.items())
    raise TypeError(v)


def write_dcm(records, minor, base_tensors, attachments=(), align=64):
    """records: [(name, kind, dtype, shape, params, [raw blob bytes])]."""
    blobs, tensors, end, out_blobs = [], [], 0, []
    digest = hashlib.sha256()

    def blob(raw):
        nonlocal end
        off = dcmref.align_up(end, align)
        end = off + len(raw)
        out_blobs.append((off, raw))
        return {"offset": off, "length": len(raw), "encoding": 0,
                "raw_length": len(raw), "crc32": zlib.crc32(raw)}

    for name, kind, dtype, shape, params, raws in records:
        rec = {"name": name, "kind": kind, "dtype": dtype, "shape": list(shape),
               "params": params, "blobs": [blob(r) for r in raws]}
        if name in base_tensors:
            bd, bs, bb = base_tensors[name]
            sha = hashlib.sha256(bb).digest()
            rec["base"] = {"dtype": bd, "shape": list(bs), "sha256": sha}
            digest.update(name.encode() + b"\0" + sha)
        tensors.append(rec)
    atts = [{"name": n, "blob": blob(b)} for n, b in attachments]
    index = pack({"format": [1, minor], "creator": "selftest",
                  "method": {"name": "test", "params": {}},
                  "base": {"digest": digest.digest()}, "tensors": tensors,
                  "attachments": atts})
    d = dcmref.align_up(64 + len(index), align)
    flen = d + end if out_blobs else 64 + len(index)
    head = dcmref.MAGIC + struct.pack("<HHIIIQQ", 1, minor, 0, 0, align, len(index), flen)
    head += bytes(20)
    head += struct.pack("<I", zlib.crc32(head + index))
    body = bytearray(flen)
    body[:64] = head
    body[64:64 + len(index)] = index
    for off, raw in out_blobs:
        body[d + off:d + off + len(raw)] = raw
    return bytes(body)


def safetensors(tensors):
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def tmpfile(data, suffix):
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def decode_bytes(dcm, base=None):
    p = tmpfile(dcm, ".dcm")
    b = tmpfile(safetensors(base), ".safetensors") if base is not None else None
    try:
        return dcmref.decode(p, b)
    finally:
        os.unlink(p)
        if b:
            os.unlink(b)


def expect_error(cls, dcm, base=None):
    try:
        decode_bytes(dcm, base)
    except dcmref.DcmRefError as e:
        assert type(e) is cls, f"expected {cls.__name__}, got {type(e).__name__}: {e}"
        return
    raise AssertionError(f"expected {cls.__name__}, decoded fine")


# -------------------------------------------------------------- tests

def spec_hex_dump():
    text = open(SPEC, encoding="utf-8").read()
    block = re.search(r"```hex example-file\n(.*?)```", text, re.S).group(1)
    out = bytearray()
    for line in block.splitlines():
        off, rest = line.split(":", 1)
        assert int(off, 16) == len(out), line
        out += bytes.fromhex(rest.split("|")[0])
    return bytes(out)


def f16(values):
    return np.array(values, "<f2").tobytes()


def test_section18():
    data = spec_hex_dump()
    assert len(data) == 776
    base = {"w": ("F16", (2, 2), f16([1.0, -2.0, 0.5, 0.25])),
            "pos": ("I64", (3,), np.array([0, 1, 2], "<i8").tobytes())}
    out = decode_bytes(data, base)
    assert list(out.tensors) == ["w", "b", "pos"]
    w, b, pos = out.tensors["w"], out.tensors["b"], out.tensors["pos"]
    assert w.data == bytes.fromhex("013c00c0ff370434"), w.data.hex()
    assert w.codes == bytes.fromhex("0200000001000800")
    assert b.data == bytes.fromhex("0000003f0000c0bf") and b.kind == "full"
    assert pos.kind == "removed" and pos.data is None and pos.codes is None
    assert out.metadata == {"format": "pt"}
    # Without the base: dense-delta has no data, full has.
    out = decode_bytes(data)
    assert out.tensors["w"].data is None and out.tensors["b"].data is not None
    # A wrong base: pos differs in content only.
    bad = dict(base, pos=("I64", (3,), np.array([0, 1, 3], "<i8").tobytes()))
    expect_error(dcmref.WrongBaseError, data, bad)
    expect_error(dcmref.WrongBaseError, data, dict(base, extra=("U8", (1,), b"\0")))
    # Corruptions of the example file.
    flipped = bytearray(data)
    flipped[0x2C0] ^= 1
    expect_error(dcmref.PayloadChecksumError, bytes(flipped))
    flipped = bytearray(data)
    flipped[0x2C8] = 1
    expect_error(dcmref.LayoutError, bytes(flipped))
    flipped = bytearray(data)
    flipped[0x100] ^= 1
    expect_error(dcmref.HeaderChecksumError, bytes(flipped))
    expect_error(dcmref.TruncatedError, data[:-1])
    expect_error(dcmref.TrailingDataError, data + b"\0")
    expect_error(dcmref.BadMagicError, data[:7])


def test_hash():
    """§10.8 examples."""
    z0 = dcmref.mask_hash(0, [0])  # top bits of 0xe220a8397b1dcdaf
    assert int(z0[0]) == 0xE220A839
    seed = 0x0123456789ABCDEF
    c = [0, 1, 2, 3, 0xB00000007]
    r = dcmref.mask_hash(seed, c)
    assert [int(x) for x in r] == [0x157A3807, 0xD573529B, 0x2F90B72E, 0xA2D41933, 0x5D514F96]
    keep = dcmref.kept_by_hash(seed, c, 0x80000000)
    assert keep.tolist() == [False, True, False, True, False]


def test_bitpack():
    """§11 example and padding rule."""
    codes = dcmref.unpack_bits(bytes.fromhex("dde108"), 7, 3, "t")
    assert codes.tolist() == [5, 3, 7, 0, 6, 1, 2]
    for bad in ("dde128", "dde1"):
        try:
            dcmref.unpack_bits(bytes.fromhex(bad), 7, 3, "t")
        except dcmref.PayloadError:
            continue
        raise AssertionError(bad)


def test_rans_example():
    """§8.2's example stream, read from the spec's block: 6 bytes, 4 states, no words."""
    text = open(SPEC, encoding="utf-8").read()
    block = re.search(r"```text rans-example\n(.*?)```", text, re.S).group(1)
    stream = bytes.fromhex("".join(line[:20] for line in block.splitlines()))
    assert dcmref.unrans(stream, 6, "t") == bytes([1, 1, 1, 2, 1, 3])
    assert dcmref.read_uint7(bytes([0x81, 0x00]), 0, "t") == (128, 2)
    assert dcmref.read_uint7(bytes([0x87, 0x68]), 0, "t") == (1000, 2)
    for bad in (stream + b"\0\0", stream[:-4] + bytes([0, 8, 2, 1]), b"\x01" + stream[1:]):
        try:
            dcmref.unrans(bad, 6, "t")
        except dcmref.PayloadError:
            continue
        raise AssertionError(bad.hex())


def test_hadamard_example():
    """§10.14's example: seed 0x0123456789abcdef, V of length 4, stored (1, 0, 0, 0)."""
    got = dcmref.hadamard_back(np.array([[1.0, 0, 0, 0]]), 0x0123456789ABCDEF, "V")
    assert got.tolist() == [[0.5, -0.5, 0.5, -0.5]]


LOWRANK_BLOB = bytes.fromhex("00000040" "cd010000" "00300034" "03000000"
                             "16000000" "00380000" "04")


def test_lowrank_mixed():
    """§10.7 example: blob bytes, CRC, factors and the rebuilt tensor."""
    assert len(LOWRANK_BLOB) == 25 and zlib.crc32(LOWRANK_BLOB) == 0x3BE58521
    params = {"packing": 1, "groups": [[0, 1, 3, 2]]}
    assert pack(params) == bytes.fromhex(
        "82a77061636b696e6701a667726f7570739194000103 02".replace(" ", ""))
    base = {"x": ("F16", (2, 3), f16([1, 2, 3, 4, 5, 6]))}
    dcm = write_dcm([("x", 4, "F16", (2, 3), params, [LOWRANK_BLOB])], 1, base)
    t = decode_bytes(dcm, base).tensors["x"]
    assert t.data == bytes.fromhex("003e003e80460043804500 41".replace(" ", "")), t.data.hex()
    assert np.frombuffer(t.factors, "<f4").tolist() == [2.0, 0.25, -0.25, 1.75, 1.0, -1.0]
    assert list(t.codes) == [5, 1, 7, 3, 0, 6, 2, 4]
    # A nonzero byte between sections, a nonzero padding bit, a NaN scale.
    for pos, val in ((6, 1), (5, 0x03), (9, 0x7E)):
        bad = bytearray(LOWRANK_BLOB)
        bad[pos] = val
        expect_error(dcmref.PayloadError,
                     write_dcm([("x", 4, "F16", (2, 3), params, [bytes(bad)])], 1, base))
    # Open-time checks.
    expect_error(dcmref.PayloadError,
                 write_dcm([("x", 4, "F16", (2, 3), params, [LOWRANK_BLOB + b"\0"])], 1, base))
    expect_error(dcmref.UnknownKindError,
                 write_dcm([("x", 4, "F16", (2, 3), dict(params, packing=2),
                             [LOWRANK_BLOB])], 1, base))
    expect_error(dcmref.IndexSchemaError,
                 write_dcm([("x", 4, "F16", (2, 3), {"packing": 1, "groups": [[0, 1, 3]]},
                             [LOWRANK_BLOB])], 1, base))


def test_sparse():
    """§10.12 example."""
    base = {"x": ("F32", (4,), np.array([1, 2, 3, 4], "<f4").tobytes())}
    params = {"packing": 1, "mask": 1, "seed": 0x0123456789ABCDEF, "drop": 0x80000000}
    dcm = write_dcm([("x", 8, "F32", (4,), params, [bytes.fromhex("003800bc")])], 2, base)
    t = decode_bytes(dcm, base).tensors["x"]
    assert np.frombuffer(t.data, "<f4").tolist() == [1, 2.5, 3, 3]
    assert list(t.codes) == [0, 1, 0, 1]
    assert np.frombuffer(t.factors, "<f4").tolist() == [0, 0.5, 0, -1.0]
    # The same with a bitmask (0b1010 = 0x0a, then 3 zero bytes to align).
    params = {"packing": 1, "mask": 2, "seed": 0, "drop": 0}
    blob = bytes.fromhex("0a000000003800bc")
    t = decode_bytes(write_dcm([("x", 8, "F32", (4,), params, [blob])], 2, base),
                     base).tensors["x"]
    assert np.frombuffer(t.data, "<f4").tolist() == [1, 2.5, 3, 3]
    expect_error(dcmref.PayloadError,
                 write_dcm([("x", 8, "F32", (4,), dict(params, seed=1), [blob])], 2, base))


def test_empty_last_section():
    """Assumption (report item): an empty section is still placed at the next
    multiple of 4, so a bitmask `sparse` record with every element dropped
    has a blob of align_up(ceil(n / 8), 4) bytes, zero-padded."""
    base = {"x": ("F32", (4,), np.array([1, 2, 3, 4], "<f4").tobytes())}
    params = {"packing": 1, "mask": 2, "seed": 0, "drop": 0}
    t = decode_bytes(write_dcm([("x", 8, "F32", (4,), params, [bytes(4)])], 2, base),
                     base).tensors["x"]
    assert np.frombuffer(t.data, "<f4").tolist() == [1, 2, 3, 4]
    expect_error(dcmref.PayloadError,
                 write_dcm([("x", 8, "F32", (4,), params, [bytes(1)])], 2, base))


def test_sign():
    """§10.10 by hand: rows [+a, -a], one zero-scale row."""
    base = {"x": ("BF16", (3, 2), np.zeros(6, "<u2").tobytes())}
    scales = np.array([0.5, 0.0, -1.0], "<f4").tobytes()
    blob = scales + bytes([0b0101])  # rows 0 and 2 coded: bits 1,0,1,0
    dcm = write_dcm([("x", 6, "BF16", (3, 2), {"packing": 1, "scales": 1}, [blob])], 2, base)
    t = decode_bytes(dcm, base).tensors["x"]
    got = (np.frombuffer(t.data, "<u2").astype(np.uint32) << 16).view(np.float32)
    assert got.tolist() == [0.5, -0.5, 0, 0, -1.0, 1.0], got
    assert list(t.codes) == [1, 0, 1, 0]


def test_bf16_rounding():
    x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, np.nan, np.finfo(np.float32).max], np.float32)
    got = np.frombuffer(dcmref.from_float32("BF16", x), "<u2").tolist()
    assert got == [0x3F80, 0x3F80, 0x3F82, 0x7FC0, 0x7F80], [hex(g) for g in got]


def test_msgpack():
    u = dcmref.unpack_index
    assert u(bytes.fromhex("81a161cf0000000000000005")) == {"a": 5}
    assert u(bytes.fromhex("81a161d0fb")) == {"a": -5}
    cases = {"82a16105a16106": dcmref.DuplicateKeyError, "8105a16106": dcmref.IndexSchemaError,
             "81a161d40100": dcmref.IndexSchemaError, "81a161a2c0af": dcmref.IndexSchemaError,
             "81a161": dcmref.IndexSchemaError, "81a1610500": dcmref.IndexSchemaError,
             "9100": dcmref.IndexSchemaError, "c1": dcmref.IndexSchemaError}
    for hexs, cls in cases.items():
        try:
            u(bytes.fromhex(hexs))
        except dcmref.DcmRefError as e:
            assert type(e) is cls, (hexs, e)
            continue
        raise AssertionError(hexs)
    deep = "81a161" + "91" * 15 + "00"
    assert u(bytes.fromhex(deep))
    try:
        u(bytes.fromhex("81a161" + "91" * 16 + "00"))
    except dcmref.LimitError:
        pass
    else:
        raise AssertionError("depth 17 accepted")


def spec_table(marker):
    """Rows (cells, backticks stripped) of the spec's table after `<!-- registry: marker -->`."""
    text = open(SPEC, encoding="utf-8").read().split(f"<!-- registry: {marker} -->", 1)[1]
    rows = []
    for line in text.lstrip("\n").splitlines():
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("`", "") for c in line.strip().strip("|").split("|")])
    return rows[2:]


def test_error_codes():
    """§15: dcmref's error classes carry the codes, numbers, parents and exit codes of the table."""
    rows = spec_table("errors")
    assert rows, "no error table"
    for code, number, parent, exit_code, name, condition in rows:
        cls = getattr(dcmref, "DcmRefError" if name == "DcmError" else name, None)
        if cls is None:  # a decoder needs the file's conditions; the tool's own (outputs...) it may lack
            assert condition.startswith("Not a property of the file"), f"dcmref lacks {name}"
            continue
        assert (cls.code, cls.number, cls.exit_code) == (code, int(number), int(exit_code)), name
        if parent != "—":
            assert cls.__mro__[1].code == parent, name
    for cls in (c for c in vars(dcmref).values() if isinstance(c, type) and issubclass(c, dcmref.DcmRefError)):
        assert cls.code in {r[0] for r in rows} and cls.__dict__.get("code"), cls


def main():
    tests = [v for k, v in globals().items() if k.startswith("test_")]
    for t in tests:
        t()
        print(f"ok  {t.__name__}")
    print(f"{len(tests)} tests passed")


if __name__ == "__main__":
    main()
