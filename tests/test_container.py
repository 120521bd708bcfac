"""Tests of the .dcm container against damaged and hostile files.

A small valid file is made with ``dcm.encode``; the tests then change its bytes
(or re-pack a modified index with a valid CRC, see :func:`rewrite`) and check
that ``dcm.open`` / reading / ``dcm.decode`` raise the documented DcmError
subclass, and never anything else.
"""

from __future__ import annotations

import copy
import itertools
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import SMALL_ATTACHMENTS, small_pair_tensors, storage, write_checkpoint

import dcm
from dcm.constants import HEADER_SIZE, MAGIC, MAX_INDEX_BYTES, Kind
from dcm.container import HEADER, align_up, iter_blobs
from dcm.errors import (
    BadMagicError,
    DcmError,
    DuplicateKeyError,
    FormatError,
    HeaderChecksumError,
    IndexSchemaError,
    LayoutError,
    LimitError,
    OutputExistsError,
    PayloadChecksumError,
    PayloadError,
    TrailingDataError,
    TruncatedError,
    UnknownFlagError,
    UnknownKindError,
    UnsupportedVersionError,
    WrongBaseError,
)
from dcm.index import pack_index, unpack_index

FIELDS = ("magic", "major", "minor", "required", "optional", "alignment", "index_length",
          "file_length", "reserved", "crc")


# --- helpers: take a file apart and put it back together ---------------------------


def read_parts(path) -> tuple[dict, dict, bytes]:
    """(header fields, decoded index, data section bytes) of a .dcm file."""
    raw = Path(path).read_bytes()
    header = dict(zip(FIELDS, HEADER.unpack(raw[:HEADER_SIZE])))
    index_length = header["index_length"]
    index = unpack_index(raw[HEADER_SIZE : HEADER_SIZE + index_length])
    data_start = align_up(HEADER_SIZE + index_length, header["alignment"])
    return header, index, raw[data_start:]


def assemble(index, data: bytes, *, magic=MAGIC, major=1, minor=0, required=0, optional=0,
             alignment=64, reserved=bytes(20), file_length=None, pad_to=None) -> bytes:
    """A whole file: header with a correct CRC, the packed index, padding, ``data``."""
    index_bytes = pack_index(index)
    pad_to = pad_to or alignment
    body = index_bytes
    if data:
        body += bytes(align_up(HEADER_SIZE + len(index_bytes), pad_to) - HEADER_SIZE - len(index_bytes))
        body += data
    if file_length is None:
        file_length = HEADER_SIZE + len(body)
    head = HEADER.pack(magic, major, minor, required, optional, alignment, len(index_bytes),
                       file_length, reserved, 0)[:60]
    return head + struct.pack("<I", zlib.crc32(head + index_bytes)) + body


def rewrite(path, mutate_index=None, **header_fields) -> None:
    """Re-pack the file's index after ``mutate_index(index)`` (which may also return a
    new index), recomputing index length, data start, file length and CRC; the payload
    bytes keep their offsets relative to the data section."""
    header, index, data = read_parts(path)
    if mutate_index is not None:
        index = mutate_index(index) or index
    header_fields.setdefault("alignment", header["alignment"])
    Path(path).write_bytes(assemble(index, data, **header_fields))


def blob_list(index) -> list[dict]:
    return [blob for _, blob in iter_blobs(index)]


def repack(index, stored: list[bytes], alignment=64) -> bytes:
    """A data section holding ``stored`` (one per blob, in file order); fixes the index entries."""
    out = bytearray()
    for blob, data in zip(blob_list(index), stored, strict=True):
        offset = align_up(len(out), alignment)
        out += bytes(offset - len(out)) + data
        blob.update(offset=offset, length=len(data), crc32=zlib.crc32(data))
    return bytes(out)


def replace_blob(path, pick, new_stored: bytes, **fields) -> None:
    """Replace the stored bytes of the blob ``pick(index)`` (and set ``fields`` on its entry)."""
    header, index, data = read_parts(path)
    stored = [data[b["offset"] : b["offset"] + b["length"]] for b in blob_list(index)]
    target = pick(index)
    i = next(k for k, b in enumerate(blob_list(index)) if b is target)
    stored[i] = new_stored
    data = repack(index, stored)
    target.update(fields)
    Path(path).write_bytes(assemble(index, data))


def tensor_record(index, name) -> dict:
    return next(r for r in index["tensors"] if r["name"] == name)


def base_arrays(base) -> dict:
    return {name: array for name, (_, array) in base.items()}


def read_everything(path, base: dict):
    """Open and decode every tensor and attachment: a comparable snapshot of the file."""
    with dcm.open(path) as f:
        tensors = {}
        for name in f.keys():
            array = f.tensor(name, base.get(name))
            tensors[name] = (f.record(name).dtype, array.shape, array.tobytes())
        attachments = {name: f.attachment(name) for name in f.attachments()}
        return tensors, attachments, f.metadata(), [r.name for r in f.records()]


def open_error(path) -> DcmError:
    with pytest.raises(DcmError) as info:
        dcm.open(path).close()
    return info.value


def flip(path, offset: int, mask: int = 0x01) -> None:
    raw = bytearray(Path(path).read_bytes())
    raw[offset] ^= mask
    Path(path).write_bytes(bytes(raw))


def patch_header(path, fix_crc=True, **fields) -> None:
    """Change header fields in place; with ``fix_crc`` the CRC is recomputed."""
    raw = bytearray(Path(path).read_bytes())
    values = dict(zip(FIELDS, HEADER.unpack(raw[:HEADER_SIZE])))
    values.update(fields)
    raw[:HEADER_SIZE] = HEADER.pack(*(values[k] for k in FIELDS))
    if fix_crc:
        crc = zlib.crc32(bytes(raw[:60]) + bytes(raw[HEADER_SIZE : HEADER_SIZE + values["index_length"]]))
        raw[60:64] = struct.pack("<I", crc)
    Path(path).write_bytes(bytes(raw))


@pytest.fixture
def path(small_dcm):
    return small_dcm[0]


@pytest.fixture
def base(small_dcm):
    return base_arrays(small_dcm[2])


# --- the valid file ------------------------------------------------------------------


def test_valid_file_layout(path, base):
    raw = path.read_bytes()
    header, index, data = read_parts(path)
    assert header["magic"] == MAGIC and (header["major"], header["minor"]) == (1, 0)
    assert header["required"] == header["optional"] == 0
    assert header["alignment"] == 64 and header["reserved"] == bytes(20)
    assert header["file_length"] == len(raw)
    assert header["crc"] == zlib.crc32(raw[:60] + raw[64 : 64 + header["index_length"]])
    data_start = align_up(64 + header["index_length"], 64)
    assert raw[64 + header["index_length"] : data_start] == bytes(data_start - 64 - header["index_length"])
    end = 0
    for blob in blob_list(index):
        assert blob["offset"] == align_up(end, 64)
        assert raw[data_start + end : data_start + blob["offset"]] == bytes(blob["offset"] - end)
        end = blob["offset"] + blob["length"]
        assert blob["crc32"] == zlib.crc32(data[blob["offset"] : end])
    assert data_start + end == len(raw)
    encodings = {b["encoding"] for b in blob_list(index)}
    assert encodings == {0, 1}  # the small pair has raw and zstd blobs
    with dcm.open(path) as f:
        assert f.padding_is_zero()
    # rewrite() with no change reproduces the file byte for byte
    rewrite(path)
    assert path.read_bytes() == raw
    read_everything(path, base)


def test_smaller_alignment_is_valid(path, base):
    expected = read_everything(path, base)
    header, index, data = read_parts(path)
    stored = [data[b["offset"] : b["offset"] + b["length"]] for b in blob_list(index)]
    path.write_bytes(assemble(index, repack(index, stored, 8), alignment=8))
    assert read_everything(path, base) == expected
    assert path.stat().st_size < len(assemble(index, data))


# --- header ----------------------------------------------------------------------


@pytest.mark.parametrize("i", range(8))
def test_bad_magic(path, i):
    flip(path, i, 0x20)
    assert type(open_error(path)) is BadMagicError


@pytest.mark.parametrize("content", [b"", b"\x89", b"\x89DCM\r\n\x1a", b"PK\x03\x04" + bytes(100),
                                     b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "])
def test_not_a_dcm_file(tmp_path, content):
    p = tmp_path / "x.dcm"
    p.write_bytes(content)
    assert isinstance(open_error(p), BadMagicError)


@pytest.mark.parametrize("major", [0, 2, 0xFFFF])
def test_unsupported_major_version(path, major):
    patch_header(path, major=major)
    err = open_error(path)
    assert type(err) is UnsupportedVersionError and str(major) in str(err)


def test_newer_minor_version_opens(path, base):
    expected = read_everything(path, base)

    def bump(index):
        index["format"] = [1, 7]
    rewrite(path, bump, minor=7)
    assert read_everything(path, base)[:2] == expected[:2]
    with dcm.open(path) as f:
        assert f.metadata()["format"] == "1.7"


def test_index_format_must_match_header(path):
    rewrite(path, lambda ix: ix.__setitem__("format", [1, 1]))
    assert type(open_error(path)) is FormatError


@pytest.mark.parametrize("bit", range(32))
def test_unknown_required_flag(path, bit):
    patch_header(path, required=1 << bit)
    assert type(open_error(path)) is UnknownFlagError


@pytest.mark.parametrize("flags", [1, 0x80, 0x8000_0000, 0xFFFF_FFFF])
def test_unknown_optional_flags_are_ignored(path, base, flags):
    expected = read_everything(path, base)
    patch_header(path, optional=flags)
    assert read_everything(path, base) == expected


def test_flag_change_without_crc_fix_is_caught(path):
    patch_header(path, fix_crc=False, optional=1)
    assert type(open_error(path)) is HeaderChecksumError


@pytest.mark.parametrize("i", range(20))
def test_reserved_bytes_must_be_zero(path, i):
    reserved = bytearray(20)
    reserved[i] = 0x01
    patch_header(path, reserved=bytes(reserved))
    assert type(open_error(path)) is FormatError


@pytest.mark.parametrize("alignment", [0, 1, 3, 4, 48, 100, 2**17, 2**31])
def test_bad_alignment(path, alignment):
    patch_header(path, alignment=alignment)
    assert type(open_error(path)) is LayoutError


def test_alignment_other_than_the_layout(path):
    patch_header(path, alignment=128)  # valid value, but blob 1 sits at 64
    assert type(open_error(path)) is LayoutError
    rewrite(path, alignment=128)  # data section moves: still blob offsets misaligned
    assert type(open_error(path)) is LayoutError


def test_index_length_over_limit(path):
    patch_header(path, fix_crc=False, index_length=MAX_INDEX_BYTES + 1)
    assert type(open_error(path)) is LimitError
    patch_header(path, fix_crc=False, index_length=2**64 - 1)
    assert type(open_error(path)) is LimitError


def test_index_length_changed(path):
    size = path.stat().st_size
    length = read_parts(path)[0]["index_length"]
    for delta in (-1, 1, 64):
        p2 = path.with_name(f"d{delta}.dcm")
        p2.write_bytes(path.read_bytes())
        patch_header(p2, fix_crc=False, index_length=length + delta)
        assert isinstance(open_error(p2), (HeaderChecksumError, TruncatedError, FormatError))
    patch_header(path, fix_crc=False, index_length=size)
    assert type(open_error(path)) is TruncatedError


@pytest.mark.parametrize("where", ["index", "crc"])
def test_header_checksum(path, where):
    index_length = read_parts(path)[0]["index_length"]
    offsets = range(64, 64 + index_length, max(1, index_length // 50)) if where == "index" else range(60, 64)
    original = path.read_bytes()
    for offset in offsets:
        path.write_bytes(original)
        flip(path, offset, 0x10)
        assert type(open_error(path)) is HeaderChecksumError, offset


def test_minor_version_change_without_crc_fix(path):
    patch_header(path, fix_crc=False, minor=1)
    assert type(open_error(path)) is HeaderChecksumError


# --- payloads ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.weight", "b.bias", "same", "new", "zeros"])
def test_payload_flip_detected_on_read(path, base, name):
    _, index, _ = read_parts(path)
    rec = tensor_record(index, name)
    data_start = align_up(64 + read_parts(path)[0]["index_length"], 64)
    blob = rec["blobs"][-1]
    flip(path, data_start + blob["offset"] + blob["length"] - 1, 0x40)
    with dcm.open(path) as f:  # opening does not read payloads
        others = [n for n in f.keys() if n != name]
        for other in others:
            f.tensor(other, base.get(other))
        with pytest.raises(PayloadChecksumError, match=repr(name)):
            f.tensor(name, base.get(name))


def test_attachment_flip_detected(path):
    header, index, _ = read_parts(path)
    blob = index["attachments"][1]["blob"]
    flip(path, align_up(64 + header["index_length"], 64) + blob["offset"])
    with dcm.open(path) as f:
        assert f.attachment("1_Pooling/config.json") == SMALL_ATTACHMENTS["1_Pooling/config.json"]
        with pytest.raises(PayloadChecksumError, match="config.json"):
            f.attachment("config.json")


def test_nonzero_padding_is_reported_not_fatal(path, base):
    expected = read_everything(path, base)
    header, index, _ = read_parts(path)
    blob = index["tensors"][0]["blobs"][0]
    flip(path, align_up(64 + header["index_length"], 64) + blob["offset"] + blob["length"])
    assert read_everything(path, base) == expected
    with dcm.open(path) as f:
        assert not f.padding_is_zero()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_rejected_file_is_closed(path):
    """A file rejected after mapping (here: bad CRC) releases its map and descriptor,
    even while the caller keeps the exception (and so its traceback) alive."""
    flip(path, 64)
    before = len(os.listdir("/proc/self/fd"))
    kept = [open_error(path) for _ in range(20)]
    assert all(type(e) is HeaderChecksumError for e in kept)
    assert len(os.listdir("/proc/self/fd")) < before + 5


# --- truncation and trailing data ------------------------------------------------------


def truncation_points(size: int, index_end: int, data_start: int) -> list[int]:
    near_end = [size - k for k in (1, 2, 3, 7, 8, 17, 63, 64, 65, 100)]
    return sorted({*range(0, 201), index_end - 1, index_end, data_start - 1, data_start, data_start + 1,
                   *near_end} - {size})


def test_truncation(path, tmp_path):
    raw = path.read_bytes()
    header = read_parts(path)[0]
    index_end = 64 + header["index_length"]
    cut = tmp_path / "cut.dcm"
    for n in truncation_points(len(raw), index_end, align_up(index_end, 64)):
        cut.write_bytes(raw[:n])
        err = open_error(cut)
        expected = BadMagicError if n < len(MAGIC) else TruncatedError
        assert type(err) is expected, (n, err)


def test_truncation_with_consistent_header(path, tmp_path):
    """Cut the file and also shrink the declared file length (CRC still valid): the
    index or the payloads then run past the end."""
    raw = path.read_bytes()
    header = read_parts(path)[0]
    index_end = 64 + header["index_length"]
    cut = tmp_path / "cut.dcm"
    for n in truncation_points(len(raw), index_end, align_up(index_end, 64)):
        if n < 64:
            continue
        cut.write_bytes(raw[:n])
        patch_header(cut, fix_crc=n >= index_end, file_length=n)
        err = open_error(cut)
        if n < index_end:
            assert type(err) is TruncatedError, (n, err)
        else:
            assert type(err) is LayoutError, (n, err)


@pytest.mark.parametrize("extra", [b"\x00", bytes(64), b"garbage", MAGIC])
def test_trailing_data(path, extra):
    with open(path, "ab") as f:
        f.write(extra)
    err = open_error(path)
    assert type(err) is TrailingDataError and str(len(extra)) in str(err)


def test_trailing_data_declared_in_header(path):
    """Extra bytes the header counts are not a blob: a layout error."""
    with open(path, "ab") as f:
        f.write(bytes(64))
    patch_header(path, file_length=path.stat().st_size)
    assert type(open_error(path)) is LayoutError


# --- layout faults (index re-packed with a valid CRC) ---------------------------------


def set_blob(select, **fields):
    def mutate(index):
        select(index).update(fields)
    return mutate


def first_blob(index):
    return [blob for _, blob in iter_blobs(index)][0]


def second_blob(index):
    return [blob for _, blob in iter_blobs(index)][1]


def last_blob(index):
    return index["attachments"][-1]["blob"]


@pytest.mark.parametrize("mutate", [
    lambda ix: second_blob(ix).update(offset=first_blob(ix)["offset"]),  # overlap
    lambda ix: second_blob(ix).update(offset=second_blob(ix)["offset"] - 1),  # overlap, misaligned
    lambda ix: second_blob(ix).update(offset=second_blob(ix)["offset"] + 1),  # misaligned
    lambda ix: second_blob(ix).update(offset=second_blob(ix)["offset"] + 8),  # misaligned
    lambda ix: second_blob(ix).update(offset=second_blob(ix)["offset"] + 64),  # gap
    lambda ix: first_blob(ix).update(length=first_blob(ix)["length"] + 64),  # runs into the next
    lambda ix: first_blob(ix).update(offset=64),  # out of order
    lambda ix: last_blob(ix).update(offset=10**6),  # beyond the file
    lambda ix: last_blob(ix).update(offset=2**64 - 64),  # far beyond
    lambda ix: last_blob(ix).update(length=last_blob(ix)["length"] + 1),  # past the end
    lambda ix: last_blob(ix).update(length=2**64 - 1),
    lambda ix: last_blob(ix).update(length=last_blob(ix)["length"] - 1),  # file goes on after
    lambda ix: ix["tensors"].reverse(),  # records out of file order
    lambda ix: ix["attachments"].reverse(),
    lambda ix: ix.pop("attachments") and None,  # payload bytes nobody owns
])
def test_layout_faults(path, mutate):
    rewrite(path, mutate)
    err = open_error(path)
    assert type(err) is LayoutError, err


def test_layout_error_names_the_blob(path):
    rewrite(path, lambda ix: second_blob(ix).update(offset=3))
    err = open_error(path)
    where = [w for w, _ in iter_blobs(read_parts(path)[1])][1]  # e.g. "tensor 'b.bias' blob 0"
    assert where in str(err) and str(path) in str(err)


def test_raw_length_inconsistent_with_shape(path):
    rewrite(path, set_blob(first_blob, raw_length=first_blob(read_parts(path)[1])["raw_length"] + 1))
    assert type(open_error(path)) is PayloadError


def test_blob_count_inconsistent_with_dtype(path):
    def drop(index):
        rec = tensor_record(index, "new")  # I8: one plane
        rec["blobs"].append(dict(rec["blobs"][0]))
    rewrite(path, drop)
    assert isinstance(open_error(path), (PayloadError, LayoutError))


@pytest.mark.parametrize("kind", [0, 11, 99, 2**32 - 1])
def test_unknown_record_kind(path, kind):
    rewrite(path, lambda ix: ix["tensors"][0].update(kind=kind))
    err = open_error(path)
    assert type(err) is UnknownKindError and str(kind) in str(err)


@pytest.mark.parametrize("field,value", [
    ("dtype", "F4"), ("dtype", "f32"),
    ("params", {"transform": 9, "layout": 1}),
    ("params", {"transform": 1, "layout": 9}),
])
def test_unknown_registry_numbers(path, field, value):
    def mutate(index):
        rec = tensor_record(index, "a.weight")
        rec[field] = value
        if field == "dtype":
            rec["base"]["dtype"] = value
    rewrite(path, mutate)
    assert type(open_error(path)) is UnknownKindError


@pytest.mark.parametrize("params", [{"layout": 1}, {"transform": 1, "layout": 1, "x": 0},
                                    {"transform": True, "layout": 1}])
def test_bad_kind_params(path, params):
    rewrite(path, lambda ix: tensor_record(ix, "a.weight").update(params=params))
    assert type(open_error(path)) is IndexSchemaError


def test_dense_delta_needs_a_matching_base_ref(path):
    p2 = path.with_name("p2.dcm")
    p2.write_bytes(path.read_bytes())
    rewrite(path, lambda ix: tensor_record(ix, "a.weight").pop("base"))
    assert type(open_error(path)) is IndexSchemaError
    rewrite(p2, lambda ix: tensor_record(ix, "a.weight")["base"].update(shape=[16]))
    assert type(open_error(p2)) is PayloadError


def test_removed_record_checks(path):
    p2 = path.with_name("p2.dcm")
    p2.write_bytes(path.read_bytes())
    rewrite(path, lambda ix: tensor_record(ix, "gone").pop("base"))
    assert type(open_error(path)) is IndexSchemaError
    rewrite(p2, lambda ix: tensor_record(ix, "gone")["base"].update(dtype="F32"))
    assert type(open_error(p2)) is PayloadError


def test_duplicate_tensor_names(path):
    rewrite(path, lambda ix: tensor_record(ix, "new").update(name="a.weight"))
    assert type(open_error(path)) is DuplicateKeyError


def test_base_digest_must_match_refs(path):
    rewrite(path, lambda ix: ix["base"].update(digest=bytes(32)))
    assert type(open_error(path)) is FormatError
    rewrite(path, lambda ix: tensor_record(ix, "gone")["base"].update(sha256=bytes(32)))
    assert type(open_error(path)) is FormatError


def test_unknown_encoding_fails_at_open(path, base):
    rewrite(path, lambda ix: tensor_record(ix, "new")["blobs"][0].update(encoding=7))
    with pytest.raises(UnknownKindError, match="encoding 7"):
        dcm.open(path)  # the index alone tells, so the file is refused at open


# --- zstd frames -----------------------------------------------------------------


def zstd_frame(data: bytes, content_size=True) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(data)


def zeros_blob(index):
    return tensor_record(index, "zeros")["blobs"][0]  # zero bytes, stored as zstd


def test_zeros_blob_is_zstd(path):
    assert zeros_blob(read_parts(path)[1])["encoding"] == 1


@pytest.mark.parametrize("stored", [
    zstd_frame(bytes(63)),  # declares 63 bytes, the record says 64
    zstd_frame(bytes(65)),
    zstd_frame(bytes(64), content_size=False),  # no content size at all
    zstd_frame(bytes(64)) + zstd_frame(b""),  # a second frame after the first
    zstd_frame(bytes(64)) + b"\x00",  # junk after the frame
    zstd_frame(bytes(64))[:-1],  # frame cut short
    bytes(17),  # not a frame
    b"",
    bytes.fromhex("28b52ffd2040") + bytes(11),  # a frame header then garbage
])
def test_bad_zstd_frame(path, stored):
    replace_blob(path, zeros_blob, stored)
    with dcm.open(path) as f:
        f.tensor("new")
        with pytest.raises(PayloadError, match="zeros"):
            f.tensor("zeros")


def test_zstd_frame_lying_about_its_size(path):
    frame = bytearray(zstd_frame(bytes(63)))
    assert frame[5] == 63  # single-segment frame: 1-byte frame content size
    frame[5] = 64
    assert zstandard.get_frame_parameters(bytes(frame)).content_size == 64
    replace_blob(path, zeros_blob, bytes(frame))
    with dcm.open(path) as f, pytest.raises(PayloadError):
        f.tensor("zeros")


def test_valid_replacement_frame_decodes(path):
    """replace_blob itself keeps files valid: a different but correct frame reads fine."""
    with dcm.open(path) as f:
        size = f.record("zeros").blobs[0]["raw_length"]
    frame = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(bytes(size))
    replace_blob(path, zeros_blob, frame)
    with dcm.open(path) as f:
        assert not f.tensor("zeros").any()


def rle_frame(content_size: int) -> bytes:
    """A tiny, hand-made zstd frame declaring ``content_size`` bytes (8-byte size field)
    and holding one RLE block of 8 zero bytes."""
    block = 1 | (1 << 1) | (8 << 3)  # last block, type RLE, 8 bytes
    return (b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", content_size)
            + struct.pack("<I", block)[:3] + b"\x00")


def test_rle_frame_helper():
    assert zstandard.ZstdDecompressor().decompress(rle_frame(8)) == bytes(8)


@pytest.mark.parametrize("size", [2**30, 2**40, 2**50])
def test_zstd_bomb_attachment(path, size):
    """A frame declaring a huge size is refused before anything is allocated."""
    replace_blob(path, lambda ix: ix["attachments"][0]["blob"], rle_frame(size), encoding=1,
                 raw_length=size)
    with pytest.raises(LimitError, match="attachments"):
        dcm.open(path)  # over MAX_ATTACHMENT_BYTES: refused before any read


def test_zstd_bomb_tensor(path):
    size = 2**40

    def huge(index):
        rec = tensor_record(index, "new")
        rec["shape"] = [2**20, 2**20]
        return rec["blobs"][0]
    replace_blob(path, huge, rle_frame(size), encoding=1, raw_length=size)
    with dcm.open(path) as f:
        assert f.record("new").numel == size
        with pytest.raises(PayloadError, match="'new'"):
            f.tensor("new")


def test_attachment_raw_length_mismatch(path):
    def pick(index):
        return index["attachments"][1]["blob"]
    p2 = path.with_name("p2.dcm")
    p2.write_bytes(path.read_bytes())
    replace_blob(path, pick, zstd_frame(b"x" * 100), encoding=1, raw_length=99)
    with dcm.open(path) as f, pytest.raises(PayloadError, match="config.json"):
        f.attachment("config.json")
    rewrite(p2, lambda ix: pick(ix).update(raw_length=pick(ix)["raw_length"] + 1))  # raw blob
    with pytest.raises(PayloadError, match="config.json"):
        dcm.open(p2)


# --- wrong base ------------------------------------------------------------------


def modified_base(tmp_path, name, change, tag="wrong"):
    base, _ = small_pair_tensors()
    base = dict(base)
    change(base)
    return write_checkpoint(tmp_path / f"base-{tag}-{name}", base)


def bump(name):
    def change(base):
        dt, array = base[name]
        array = array.copy()
        array.reshape(-1).view(np.uint8)[0] ^= 1
        base[name] = (dt, array)
    return change


@pytest.mark.parametrize("name", ["a.weight", "b.bias", "same"])
def test_wrong_base_values(small_dcm, tmp_path, name):
    path = small_dcm[0]
    wrong = modified_base(tmp_path, name, bump(name))
    out = tmp_path / "out"
    with pytest.raises(WrongBaseError) as info:
        dcm.decode(path, wrong, out)
    assert repr(name) in str(info.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_wrong_base_names_the_first_mismatch(small_dcm, tmp_path):
    path = small_dcm[0]

    def change(base):
        bump("same")(base)
        bump("b.bias")(base)
    wrong = modified_base(tmp_path, "two", change)
    with pytest.raises(WrongBaseError) as info:
        dcm.decode(path, wrong, tmp_path / "out")
    assert "'b.bias'" in str(info.value) and "'same'" not in str(info.value)


@pytest.mark.parametrize("case", ["missing", "extra", "dtype", "shape"])
def test_wrong_base_structure(small_dcm, tmp_path, case):
    path = small_dcm[0]
    changes = {
        "missing": lambda b: b.pop("gone"),
        "extra": lambda b: b.__setitem__("intruder", ("F32", np.zeros(2, np.float32))),
        "dtype": lambda b: b.__setitem__("same", ("U32", b["same"][1].view(np.uint32))),
        "shape": lambda b: b.__setitem__("a.weight", ("F32", b["a.weight"][1].reshape(2, 8))),
    }
    named = {"missing": "gone", "extra": "intruder", "dtype": "same", "shape": "a.weight"}[case]
    wrong = modified_base(tmp_path, case, changes[case])
    with pytest.raises(WrongBaseError, match=repr(named)):
        dcm.decode(path, wrong, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_base_in_tensor_api(path, base):
    with dcm.open(path) as f:
        wrong = base["a.weight"].copy()
        wrong[0, 0] += 1
        with pytest.raises(WrongBaseError, match="a.weight"):
            f.tensor("a.weight", wrong)
        with pytest.raises(WrongBaseError, match="a.weight"):
            f.tensor("a.weight", base["a.weight"].reshape(16))
        # Skipping the check gives a wrong tensor, as documented; it must not crash.
        assert f.tensor("a.weight", wrong, check_base=False).shape == (4, 4)


# --- the whole file, one bit at a time -----------------------------------------------


def sweep_pair(tmp_path):
    base = {
        "w": ("F16", np.array([0.5, -1.0, 2.0], dtype=np.float16)),
        "gone": ("U8", np.array([1, 2], dtype=np.uint8)),
    }
    ft = {
        "w": ("F16", np.array([0.5, -1.5, 2.0], dtype=np.float16)),
        "n": ("BF16", storage("BF16", [1.0, -3.0])),
        "z": ("F32", np.zeros(32, dtype=np.float32)),
    }
    base_dir = write_checkpoint(tmp_path / "sb", base)
    ft_dir = write_checkpoint(tmp_path / "sf", ft, attachments={"c.json": b"{}"})
    out = tmp_path / "sweep.dcm"
    dcm.encode(base_dir, ft_dir, out)
    return out, base_arrays(base)


def test_single_bit_flip_sweep(tmp_path):
    path, base = sweep_pair(tmp_path)
    original = path.read_bytes()
    assert len(original) < 4096
    expected = read_everything(path, base)
    header, index, _ = read_parts(path)
    index_end = 64 + header["index_length"]
    data_start = align_up(index_end, 64)
    assert {b["encoding"] for b in blob_list(index)} == {0, 1}
    # Bytes a reader may ignore: zero padding (and optional flags, which the CRC covers).
    ignorable = set(range(index_end, data_start)) | set(range(16, 20))
    end = 0
    for blob in blob_list(index):
        ignorable |= set(range(data_start + end, data_start + blob["offset"]))
        end = blob["offset"] + blob["length"]
    assert data_start + end == len(original)

    target = tmp_path / "flipped.dcm"
    target.write_bytes(original)
    fd = os.open(target, os.O_RDWR)
    silent, undetected, crashes = [], [], []
    for offset, bit in itertools.product(range(len(original)), range(8)):
        # One byte rewritten in place: much cheaper than writing the file each time.
        os.pwrite(fd, bytes([original[offset] ^ (1 << bit)]), offset)
        try:
            got = read_everything(target, base)
        except DcmError:
            got = None
        except Exception as exc:  # noqa: BLE001
            crashes.append((offset, bit, repr(exc)))
            got = None
        if got is not None:
            if got != expected:
                silent.append((offset, bit))
            elif offset not in ignorable:
                undetected.append((offset, bit))
            else:
                with dcm.open(target) as f:  # verify-style checks still see the change
                    assert f.padding_is_zero() == (offset in range(16, 20)), offset
        os.pwrite(fd, original[offset : offset + 1], offset)
    os.close(fd)
    assert target.read_bytes() == original
    assert crashes == []
    assert silent == [], f"{len(silent)} silent mis-decodes"
    assert undetected == []


# --- hostile indexes with a valid CRC: only DcmErrors ---------------------------------


@pytest.fixture(scope="module")
def fuzz_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    base, ft = small_pair_tensors()
    base_dir = write_checkpoint(folder / "base", base)
    ft_dir = write_checkpoint(folder / "ft", ft, attachments=SMALL_ATTACHMENTS)
    dcm.encode(base_dir, ft_dir, folder / "src.dcm")
    _, index, data = read_parts(folder / "src.dcm")
    return folder, base_dir, base_arrays(base), index, data


def index_paths(obj, prefix=()):
    if prefix:
        yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from index_paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from index_paths(value, (*prefix, i))


HOSTILE_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 7, 63, 64, 65, 2**32, 2**48, 2**63, 2**64 - 1, -1, True, None, 1.5,
                     "", "F32", "BF16", "../evil", "model.safetensors", "__metadata__", "a/b",
                     b"", bytes(32), [], [0], [2**24, 2**24], {}, {"layout": 0}]),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=8),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hostile_index_values_raise_only_dcm_errors(fuzz_source, data):
    folder, base_dir, base, index, payload = fuzz_source
    index = copy.deepcopy(index)
    paths = list(index_paths(index))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = index
        try:
            for key in path[:-1]:
                node = node[key]
            if isinstance(node, dict) and data.draw(st.booleans()):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = data.draw(HOSTILE_VALUES)
        except (KeyError, IndexError, TypeError):
            pass  # the path went away with an earlier change
    target = folder / "hostile.dcm"
    target.write_bytes(assemble(index, payload))
    out = folder / "hostile-out"
    try:
        read_everything(target, base)
        dcm.decode(target, base_dir, out, overwrite=True)
    except DcmError:
        pass


# --- writing ------------------------------------------------------------------------


def test_output_exists(small_pair, tmp_path):
    base_dir, ft_dir, _, _ = small_pair
    out = tmp_path / "o.dcm"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        dcm.encode(base_dir, ft_dir, out)
    assert out.read_bytes() == b"keep me"
    dcm.encode(base_dir, ft_dir, out, overwrite=True)
    assert out.read_bytes()[:8] == MAGIC


def test_kind_numbers_are_fixed():
    assert (Kind.DENSE_DELTA, Kind.FULL, Kind.REMOVED) == (1, 2, 3)


@pytest.mark.parametrize("bad_name", ["../evil", "model.safetensors", "model.safetensors.index.json",
                                      "/abs", "a\\b", "x//y"])
def test_unsafe_attachment_name_is_refused_at_open(path, bad_name):
    rewrite(path, lambda ix: ix["attachments"][0].update(name=bad_name))
    assert type(open_error(path)) is FormatError


def test_attachment_inside_another_attachment_is_refused_at_open(path):
    def nest(index):
        first, second = index["attachments"][0], index["attachments"][1]
        second["name"] = first["name"] + "/inner"
    rewrite(path, nest)
    err = open_error(path)
    assert type(err) is FormatError and "inside attachment" in str(err)
