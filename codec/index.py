"""The msgpack index: strict decoding and schema checks (spec section "Index").

The index is untrusted input.  Decoding rejects duplicate map keys, non-string
map keys, ext types, trailing bytes and nesting deeper than the limit; the
schema check then rejects missing or mistyped keys and unknown keys (a map may
carry an ``ext`` map, which readers ignore: that is where optional additions of
later minor versions go).  Errors name the path of the offending value, e.g.
``tensors[3].blobs[0].offset``.
"""

from __future__ import annotations

import msgpack

from .constants import (
    MAX_ATTACHMENT_BYTES,
    MAX_ATTACHMENT_NAME_BYTES,
    MAX_ATTACHMENTS,
    MAX_BLOBS_PER_RECORD,
    MAX_CREATOR_BYTES,
    MAX_DTYPE_NAME_BYTES,
    MAX_METHOD_NAME_BYTES,
    MAX_DIMS,
    MAX_MSGPACK_DEPTH,
    MAX_NAME_BYTES,
    MAX_TENSORS,
)
from .errors import DuplicateKeyError, IndexSchemaError, LimitError

U64_MAX = 2**64 - 1


# --- msgpack ----------------------------------------------------------------------


def _pairs_to_dict(pairs):
    result = {}
    for key, value in pairs:
        if not isinstance(key, str):  # strict_map_key still lets bin keys through
            raise IndexSchemaError(f"index: map key {key!r} is not a string")
        if key in result:
            raise DuplicateKeyError(f"index: duplicate map key {key!r}")
        result[key] = value
    return result


def _reject_ext(code, data):
    raise IndexSchemaError(f"index: msgpack ext type {code} is not allowed")


_SCALARS = (str, bytes, int, float, bool, type(None))


def _depth(obj) -> int:
    """Nesting depth of maps/arrays (a scalar is 0), without recursion.

    Also rejects values of any other type: msgpack decodes ext type -1
    (timestamp) itself, without calling ``ext_hook``.
    """
    deepest, stack = 0, [(obj, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        elif isinstance(node, _SCALARS):
            continue
        else:
            raise IndexSchemaError(f"index: msgpack ext type -1 (timestamp) is not allowed, got {node!r}")
        deepest = max(deepest, level + 1)
        stack.extend((child, level + 1) for child in children)
    return deepest


def unpack_index(data: bytes) -> dict:
    """Decode index bytes strictly; return the top-level map (schema not yet checked)."""
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_pairs_to_dict,
            ext_hook=_reject_ext,
            timestamp=0,
        )
    except (DuplicateKeyError, IndexSchemaError):
        raise
    except msgpack.exceptions.StackError:
        raise LimitError(f"index: msgpack nesting deeper than {MAX_MSGPACK_DEPTH}") from None
    except msgpack.exceptions.ExtraData:
        raise IndexSchemaError("index: bytes after the msgpack object") from None
    except (ValueError, TypeError, UnicodeDecodeError, msgpack.exceptions.UnpackException) as exc:
        raise IndexSchemaError(f"index: not valid msgpack ({exc})") from None
    if _depth(obj) > MAX_MSGPACK_DEPTH:
        raise LimitError(f"index: msgpack nesting deeper than {MAX_MSGPACK_DEPTH}")
    if not isinstance(obj, dict):
        raise IndexSchemaError("index: the top-level object must be a map")
    return obj


def pack_index(index: dict) -> bytes:
    return msgpack.packb(index, use_bin_type=True)


def packed_len(obj) -> int:
    """Bytes ``obj`` takes in msgpack (a record's share of the index)."""
    return len(msgpack.packb(obj, use_bin_type=True))


# --- value checks -----------------------------------------------------------------


def _fail(where, what):
    raise IndexSchemaError(f"index: {where}: {what}")


def uint(value, where, maximum=U64_MAX):
    if type(value) is not int or value < 0:
        _fail(where, f"expected an unsigned integer, got {value!r}")
    if value > maximum:
        raise LimitError(f"index: {where}: {value} exceeds the limit {maximum}")
    return value


def text(value, where, max_bytes=MAX_NAME_BYTES):
    if not isinstance(value, str):
        _fail(where, f"expected a string, got {type(value).__name__}")
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise LimitError(f"index: {where}: string longer than {max_bytes} bytes")
    if not value or "\x00" in value:
        _fail(where, "string must be non-empty and contain no NUL")
    return value


def binary(value, where, size):
    if not isinstance(value, bytes) or len(value) != size:
        _fail(where, f"expected {size} bytes of binary")
    return value


def boolean(value, where):
    if not isinstance(value, bool):
        _fail(where, f"expected a boolean, got {value!r}")
    return value


def mapping(value, where):
    if not isinstance(value, dict):
        _fail(where, f"expected a map, got {type(value).__name__}")
    return value


def array(value, where, max_len):
    if not isinstance(value, list):
        _fail(where, f"expected an array, got {type(value).__name__}")
    if len(value) > max_len:
        raise LimitError(f"index: {where}: {len(value)} entries exceed the limit {max_len}")
    return value


def str_map(value, where):
    """A map of strings to strings (checkpoint metadata)."""
    for key, item in mapping(value, where).items():
        if not isinstance(item, str):
            _fail(f"{where}.{key}", "expected a string")
    return value


def shape(value, where):
    dims = array(value, where, MAX_DIMS)
    return tuple(uint(d, f"{where}[{i}]", 2**48) for i, d in enumerate(dims))


def check_keys(obj, where, required, optional=()):
    """Reject missing required keys and unknown keys (``ext`` is always allowed)."""
    mapping(obj, where)
    for key in required:
        if key not in obj:
            _fail(where, f"missing required key {key!r}")
    allowed = set(required) | set(optional) | {"ext"}
    for key in obj:
        if key not in allowed:
            _fail(where, f"unknown key {key!r}")
    if "ext" in obj:
        mapping(obj["ext"], f"{where}.ext")


# --- the schema ------------------------------------------------------------------

TOP_REQUIRED = ("format", "creator", "method", "base", "tensors")
TOP_OPTIONAL = ("attachments", "checkpoint_metadata")
RECORD_REQUIRED = ("name", "kind", "dtype", "shape", "params", "blobs")
RECORD_OPTIONAL = ("base",)
BLOB_KEYS = ("offset", "length", "encoding", "raw_length", "crc32")
BASE_REF_KEYS = ("dtype", "shape", "sha256")


def check_blob(blob, where):
    check_keys(blob, where, BLOB_KEYS)
    for key in ("offset", "length", "encoding", "raw_length"):
        uint(blob[key], f"{where}.{key}")
    uint(blob["crc32"], f"{where}.crc32", 2**32 - 1)


def check_base_ref(ref, where):
    check_keys(ref, where, BASE_REF_KEYS)
    text(ref["dtype"], f"{where}.dtype", MAX_DTYPE_NAME_BYTES)
    shape(ref["shape"], f"{where}.shape")
    binary(ref["sha256"], f"{where}.sha256", 32)


def check_record(rec, where):
    check_keys(rec, where, RECORD_REQUIRED, RECORD_OPTIONAL)
    text(rec["name"], f"{where}.name")
    uint(rec["kind"], f"{where}.kind", 2**32 - 1)
    text(rec["dtype"], f"{where}.dtype", MAX_DTYPE_NAME_BYTES)
    shape(rec["shape"], f"{where}.shape")
    mapping(rec["params"], f"{where}.params")
    for i, blob in enumerate(array(rec["blobs"], f"{where}.blobs", MAX_BLOBS_PER_RECORD)):
        check_blob(blob, f"{where}.blobs[{i}]")
    if "base" in rec:
        check_base_ref(rec["base"], f"{where}.base")


def check_index(index: dict) -> dict:
    """Check the whole schema (record kinds' own params are checked by records.py)."""
    check_keys(index, "index", TOP_REQUIRED, TOP_OPTIONAL)
    fmt = array(index["format"], "format", 2)
    if len(fmt) != 2:
        _fail("format", "expected [major, minor]")
    uint(fmt[0], "format[0]", 0xFFFF)
    uint(fmt[1], "format[1]", 0xFFFF)
    text(index["creator"], "creator", MAX_CREATOR_BYTES)
    check_keys(index["method"], "method", ("name", "params"))
    text(index["method"]["name"], "method.name", MAX_METHOD_NAME_BYTES)
    mapping(index["method"]["params"], "method.params")
    check_keys(index["base"], "base", ("digest",))
    binary(index["base"]["digest"], "base.digest", 32)
    names = set()
    for i, rec in enumerate(array(index["tensors"], "tensors", MAX_TENSORS)):
        check_record(rec, f"tensors[{i}]")
        if rec["name"] in names:
            raise DuplicateKeyError(f"index: tensors[{i}]: duplicate tensor name {rec['name']!r}")
        names.add(rec["name"])
    seen = set()
    for i, att in enumerate(array(index.get("attachments", []), "attachments", MAX_ATTACHMENTS)):
        check_keys(att, f"attachments[{i}]", ("name", "blob"))
        text(att["name"], f"attachments[{i}].name", MAX_ATTACHMENT_NAME_BYTES)
        check_blob(att["blob"], f"attachments[{i}].blob")
        uint(att["blob"]["raw_length"], f"attachments[{i}].blob.raw_length", MAX_ATTACHMENT_BYTES)
        if att["name"] in seen:
            raise DuplicateKeyError(f"index: attachments[{i}]: duplicate name {att['name']!r}")
        seen.add(att["name"])
    if "checkpoint_metadata" in index:
        str_map(index["checkpoint_metadata"], "checkpoint_metadata")
    return index
