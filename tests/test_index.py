"""Tests of dcm.index: strict msgpack decoding and the index schema."""

from __future__ import annotations

import copy

import msgpack
import pytest

import dcm
from dcm.constants import MAX_BLOBS_PER_RECORD, MAX_DIMS, MAX_MSGPACK_DEPTH, MAX_NAME_BYTES
from dcm.errors import DcmError, DuplicateKeyError, FormatError, IndexSchemaError, LimitError
from dcm.index import (
    BASE_REF_KEYS,
    BLOB_KEYS,
    RECORD_REQUIRED,
    TOP_REQUIRED,
    check_index,
    pack_index,
    unpack_index,
)

SHA = bytes(range(32))


def blob(offset=0, length=4, raw_length=4, encoding=0, crc32=0):
    return {"offset": offset, "length": length, "encoding": encoding, "raw_length": raw_length,
            "crc32": crc32}


def valid_index() -> dict:
    """A schema-valid index (payloads and kinds are not the schema's business)."""
    return {
        "format": [1, 0],
        "creator": "test",
        "method": {"name": "lossless", "params": {"zstd_level": 3, "selection": {"include": ["*"]}}},
        "base": {"digest": SHA},
        "tensors": [
            {"name": "w", "kind": 1, "dtype": "F32", "shape": [2, 2],
             "params": {"transform": 1, "layout": 1},
             "blobs": [blob(0), blob(64), blob(128), blob(192)],
             "base": {"dtype": "F32", "shape": [2, 2], "sha256": SHA}},
            {"name": "gone", "kind": 3, "dtype": "F16", "shape": [], "params": {}, "blobs": [],
             "base": {"dtype": "F16", "shape": [], "sha256": SHA}},
        ],
        "attachments": [{"name": "1_Pooling/config.json", "blob": blob(256, 10, 10)}],
        "checkpoint_metadata": {"format": "pt"},
    }


def roundtrip(index):
    return check_index(unpack_index(pack_index(index)))


def test_valid_index_roundtrips():
    index = valid_index()
    assert roundtrip(index) == index


def test_encoded_index_passes(small_dcm):
    path = small_dcm[0]
    with dcm.open(path) as f:
        index = f.index
    assert roundtrip(copy.deepcopy(index)) == index


def test_optional_top_keys_may_be_absent():
    index = valid_index()
    del index["attachments"], index["checkpoint_metadata"]
    roundtrip(index)
    index["tensors"][1].pop("base")  # schema-wise optional (kinds require it)
    roundtrip(index)


# --- strict msgpack -------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"\x82\xa1a\x01\xa1a\x02",  # {"a": 1, "a": 2}
    b"\x81\xa1m\x82\xa1x\x01\xa1x\x01",  # nested: {"m": {"x": 1, "x": 1}}
    b"\x81\xa1l\x91\x82\xa1k\xc0\xa1k\xc0",  # inside an array: {"l": [{"k": nil, "k": nil}]}
])
def test_duplicate_keys_rejected(data):
    with pytest.raises(DuplicateKeyError, match="duplicate"):
        unpack_index(data)


@pytest.mark.parametrize("data", [
    b"\x81\x01\x02",  # int key
    b"\x81\xc4\x01a\x02",  # bin key b"a"
    b"\x81\xa1m\x81\xc4\x01a\x02",  # nested bin key
    b"\x81\xc0\x01",  # nil key
    b"\x81\xc3\x01",  # bool key
    b"\x81\xcb" + bytes(8) + b"\x01",  # float key
    b"\x81\x90\x01",  # array key
    b"\x81\x80\x01",  # map key
])
def test_non_string_keys_rejected(data):
    with pytest.raises(IndexSchemaError):
        unpack_index(data)


def test_bin_key_in_metadata_rejected():
    index = valid_index()
    index["checkpoint_metadata"] = {b"format": "pt"}
    with pytest.raises(IndexSchemaError):
        unpack_index(pack_index(index))


@pytest.mark.parametrize("data", [
    b"\x81\xa1a\xd4\x05\x00",  # fixext1, type 5
    b"\x81\xa1a\xc7\x00\x01",  # ext8, empty, type 1
    b"\x81\xa1a\xd4\x80\x00",  # fixext1, type -128
    b"\x81\xa1a\xd6\xff\x00\x00\x00\x00",  # timestamp 32 (ext -1), decoded by msgpack itself
    b"\x81\xa1a\xd7\xff" + bytes(8),  # timestamp 64
    b"\x81\xa1a\xc7\x0c\xff" + bytes(12),  # timestamp 96
])
def test_ext_types_rejected(data):
    with pytest.raises(IndexSchemaError, match="ext"):
        unpack_index(data)


def test_malformed_timestamp_rejected():
    with pytest.raises(IndexSchemaError):
        unpack_index(b"\x81\xa1a\xd5\xff\x00\x00")  # ext -1 of 2 bytes


def test_ext_rejected_inside_valid_index():
    index = valid_index()
    index["method"]["params"]["when"] = msgpack.Timestamp(0)
    data = msgpack.packb(index, use_bin_type=True)
    with pytest.raises(IndexSchemaError):
        unpack_index(data)


@pytest.mark.parametrize("extra", [b"\x00", b"\x80", b"\xc0\xc0", b"\xa1"])
def test_trailing_bytes_rejected(extra):
    with pytest.raises(IndexSchemaError, match="after"):
        unpack_index(pack_index(valid_index()) + extra)


@pytest.mark.parametrize("data", [b"", b"\x82\xa1a", b"\xc1", b"\xdf\xff\xff\xff\xff", b"\x81\xa5ab"])
def test_invalid_msgpack_rejected(data):
    with pytest.raises(IndexSchemaError):
        unpack_index(data)


@pytest.mark.parametrize("data", [b"\x90", b"\xc0", b"\x01", b"\xa1a", b"\xc4\x00"])
def test_top_level_must_be_a_map(data):
    with pytest.raises(IndexSchemaError, match="top-level"):
        unpack_index(data)


def nested(depth: int, opener: bytes = b"\x91") -> bytes:
    """{"a": [[...[0]...]]} with ``depth`` levels of containers in all (the map included)."""
    return b"\x81\xa1a" + opener * (depth - 1) + b"\x00"


def test_nesting_limit():
    assert unpack_index(nested(MAX_MSGPACK_DEPTH))
    with pytest.raises(LimitError):
        unpack_index(nested(MAX_MSGPACK_DEPTH + 1))
    with pytest.raises(LimitError):
        unpack_index(nested(MAX_MSGPACK_DEPTH + 1, b"\x81\xa1k"))


@pytest.mark.parametrize("depth", [100, 1000, 1100, 10000, 100000])
@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k"])
def test_very_deep_nesting_is_a_limit_error(depth, opener):
    with pytest.raises(LimitError):
        unpack_index(nested(depth, opener))


@pytest.mark.parametrize("data", [
    b"\x81\xa1a\xa2\xff\xfe",  # invalid value
    b"\x81\xa2\xff\xfe\x01",  # invalid key
    b"\x81\xa1a\xa3\xed\xa0\x80",  # an encoded surrogate (not UTF-8)
    b"\x81\xa1a\xa2\xc0\x80",  # overlong NUL
])
def test_invalid_utf8_rejected(data):
    with pytest.raises(IndexSchemaError):
        unpack_index(data)


# --- the schema -----------------------------------------------------------------


def expect(exc, mutate):
    index = valid_index()
    mutate(index)
    with pytest.raises(exc) as info:
        check_index(index)
    assert isinstance(info.value, FormatError)
    return info.value


@pytest.mark.parametrize("key", TOP_REQUIRED)
def test_missing_top_key(key):
    err = expect(IndexSchemaError, lambda ix: ix.pop(key))
    assert key in str(err)


@pytest.mark.parametrize("key", RECORD_REQUIRED)
def test_missing_record_key(key):
    err = expect(IndexSchemaError, lambda ix: ix["tensors"][0].pop(key))
    assert "tensors[0]" in str(err) and key in str(err)


@pytest.mark.parametrize("key", BLOB_KEYS)
def test_missing_blob_key(key):
    err = expect(IndexSchemaError, lambda ix: ix["tensors"][0]["blobs"][2].pop(key))
    assert "tensors[0].blobs[2]" in str(err)
    expect(IndexSchemaError, lambda ix: ix["attachments"][0]["blob"].pop(key))


@pytest.mark.parametrize("key", BASE_REF_KEYS)
def test_missing_base_ref_key(key):
    expect(IndexSchemaError, lambda ix: ix["tensors"][0]["base"].pop(key))


@pytest.mark.parametrize("where", [
    lambda ix: ix,
    lambda ix: ix["method"],
    lambda ix: ix["base"],
    lambda ix: ix["tensors"][0],
    lambda ix: ix["tensors"][0]["blobs"][0],
    lambda ix: ix["tensors"][0]["base"],
    lambda ix: ix["attachments"][0],
    lambda ix: ix["attachments"][0]["blob"],
])
def test_unknown_keys_rejected_ext_allowed(where):
    err = expect(IndexSchemaError, lambda ix: where(ix).__setitem__("surprise", 1))
    assert "surprise" in str(err)
    # An "ext" map is allowed anywhere and its content ignored...
    index = valid_index()
    where(index)["ext"] = {"later": [1, 2, {"x": b"y"}], "surprise": None}
    assert check_index(index) is index
    assert roundtrip(index) == index
    # ...but it must be a map.
    expect(IndexSchemaError, lambda ix: where(ix).__setitem__("ext", [1]))


def test_missing_top_key_method_params():
    expect(IndexSchemaError, lambda ix: ix["method"].pop("params"))
    expect(IndexSchemaError, lambda ix: ix["base"].pop("digest"))
    expect(IndexSchemaError, lambda ix: ix["attachments"][0].pop("name"))
    expect(IndexSchemaError, lambda ix: ix["attachments"][0].pop("blob"))


def _set(path, value):
    def mutate(ix):
        node = ix
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


@pytest.mark.parametrize("path,value", [
    (("format",), "1.0"),
    (("format",), [1]),
    (("format",), [1, "0"]),
    (("format",), [1, -1]),
    (("creator",), 5),
    (("creator",), b"x"),
    (("creator",), ""),
    (("method",), "lossless"),
    (("method", "name"), None),
    (("method", "params"), []),
    (("base",), SHA),
    (("base", "digest"), SHA[:31]),
    (("base", "digest"), SHA.hex()),
    (("tensors",), {}),
    (("tensors", 0), ["w"]),
    (("tensors", 0, "name"), b"w"),
    (("tensors", 0, "name"), ""),
    (("tensors", 0, "name"), "a\x00b"),
    (("tensors", 0, "kind"), -1),
    (("tensors", 0, "kind"), True),
    (("tensors", 0, "kind"), 1.0),
    (("tensors", 0, "kind"), "1"),
    (("tensors", 0, "dtype"), 3),
    (("tensors", 0, "shape"), 4),
    (("tensors", 0, "shape"), [2, -2]),
    (("tensors", 0, "shape"), [2, 2.0]),
    (("tensors", 0, "shape"), [2, None]),
    (("tensors", 0, "params"), [1, 1]),
    (("tensors", 0, "blobs"), {}),
    (("tensors", 0, "blobs", 0), [0, 4, 0, 4, 0]),
    (("tensors", 0, "blobs", 0, "offset"), -64),
    (("tensors", 0, "blobs", 0, "length"), "4"),
    (("tensors", 0, "blobs", 0, "crc32"), False),
    (("tensors", 0, "base"), SHA),
    (("tensors", 0, "base", "sha256"), SHA[:16]),
    (("tensors", 0, "base", "shape"), "2x2"),
    (("attachments",), {"config.json": {}}),
    (("attachments", 0, "name"), 1),
    (("attachments", 0, "name"), ""),
    (("attachments", 0, "blob"), 0),
    (("checkpoint_metadata",), [("format", "pt")]),
    (("checkpoint_metadata", "format"), 1),
    (("checkpoint_metadata", "format"), None),
])
def test_wrong_types_rejected(path, value):
    err = expect(FormatError, _set(path, value))
    assert isinstance(err, (IndexSchemaError, LimitError)), err


@pytest.mark.parametrize("path,value", [
    (("format",), [1, 0, 0]),
    (("format", 0), 0x10000),
    (("tensors", 0, "shape"), [1] * (MAX_DIMS + 1)),
    (("tensors", 0, "base", "shape"), [1] * (MAX_DIMS + 1)),
    (("tensors", 0, "shape", 0), 2**48 + 1),
    (("tensors", 0, "blobs", 0, "crc32"), 2**32),
    (("tensors", 0, "blobs", 0, "offset"), 2**64),
    (("tensors", 0, "kind"), 2**32),
    (("tensors", 0, "name"), "n" * (MAX_NAME_BYTES + 1)),
    (("tensors", 0, "name"), "é" * (MAX_NAME_BYTES // 2 + 1)),  # 2 bytes each: counts bytes
    (("tensors", 0, "dtype"), "F" * 17),
    (("creator",), "c" * 257),
    (("method", "name"), "m" * 65),
    (("attachments", 0, "name"), "a" * 256),
])
def test_limits(path, value):
    expect(LimitError, _set(path, value))


def test_limits_accept_the_maximum():
    index = valid_index()
    index["tensors"][0]["shape"] = [1] * MAX_DIMS
    index["tensors"][0]["name"] = "n" * MAX_NAME_BYTES
    index["tensors"][1]["name"] = "é" * (MAX_NAME_BYTES // 2)
    index["tensors"][0]["shape"][0] = 2**48
    check_index(index)


def test_too_many_blobs():
    expect(LimitError, _set(("tensors", 0, "blobs"), [blob()] * (MAX_BLOBS_PER_RECORD + 1)))


def test_duplicate_tensor_names():
    def mutate(ix):
        ix["tensors"][1]["name"] = "w"
    err = expect(DuplicateKeyError, mutate)
    assert "'w'" in str(err) and "tensors[1]" in str(err)


def test_duplicate_attachment_names():
    def mutate(ix):
        ix["attachments"].append(copy.deepcopy(ix["attachments"][0]))
    expect(DuplicateKeyError, mutate)


def test_errors_name_the_path():
    err = expect(IndexSchemaError, _set(("tensors", 1, "blobs"), [blob(), {"offset": 0}]))
    assert "tensors[1].blobs[1]" in str(err)
    err = expect(LimitError, _set(("tensors", 0, "shape", 1), 2**49))
    assert "tensors[0].shape[1]" in str(err)


def test_all_errors_are_dcm_errors():
    assert issubclass(IndexSchemaError, DcmError) and issubclass(LimitError, DcmError)
