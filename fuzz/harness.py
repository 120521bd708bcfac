"""What the fuzzers and the sweep tests run on one input: a full decode by ``dcm``.

``decode_everything(path)`` opens the file with ``dcm.open``, decodes every
record and attachment, and checks that each result has the size the index
declares.  Records that need a base are decoded against an all-zero base of
the referenced dtype and shape with the base check off: the payload decoding
is what is under test.  The only exception it lets through is a ``DcmError``;
anything else (or a size that does not match) is a bug.

A record whose decoded size would pass ``MAX_DECODE_BYTES`` is not decoded:
low-rank kinds legitimately declare matrices far larger than their payload
(a rank-1 record of 1-bit codes describes an m x n matrix in about (m + n)/8
bytes), and a reader sizes its output from the index before reading any
payload (spec section 14), so memory is bounded by the declared sizes, which
the fuzzer's inputs are free to make huge.

``fix_checksums(data)`` recomputes the payload and header CRC-32s of a
mutated file, so that mutations reach the checks behind the checksums.
"""

from __future__ import annotations

import hashlib

import msgpack
import numpy as np

import dcm
from dcm import blobs, container, dtypes, index
from dcm.constants import HEADER_CRC_OFFSET, HEADER_SIZE
from dcm.errors import DcmError


MAX_DECODE_BYTES = 64 << 20


def decode_everything(path) -> dict:
    """{record name: sha256 of the decoded tensor (None for removed)} and the attachments' sha256."""
    out = {}
    with dcm.open(path) as f:
        for rec in f.records():
            if rec.numel * 8 > MAX_DECODE_BYTES:  # a float32 delta and the output
                out[rec.name] = "not decoded: too large"
                continue
            base = None
            if rec.base is not None:
                storage = dtypes.dtype(rec.base["dtype"]).storage
                base = np.zeros(rec.base["shape"], dtype=storage)
            tensor = f.tensor(rec.name, base, check_base=False)
            if tensor is None:
                out[rec.name] = None
                continue
            assert tensor.shape == rec.shape, (rec.name, tensor.shape, rec.shape)
            assert tensor.dtype.itemsize == dtypes.dtype(rec.dtype).itemsize, rec.name
            out[rec.name] = hashlib.sha256(np.ascontiguousarray(tensor).tobytes()).hexdigest()
        for att in f.index.get("attachments", []):
            data = f.attachment(att["name"])
            assert len(data) == att["blob"]["raw_length"], att["name"]
            out["attachment:" + att["name"]] = hashlib.sha256(data).hexdigest()
    return out


def fix_checksums(data: bytes) -> bytes:
    """Recompute the payload and header CRCs (unchanged when the index cannot be parsed)."""
    try:
        header = container.parse_header(data[:HEADER_SIZE], len(data))
        raw_index = data[HEADER_SIZE: HEADER_SIZE + header.index_length]
        idx = index.check_index(index.unpack_index(raw_index))
        for _, blob in container.iter_blobs(idx):
            start = header.data_start + blob["offset"]
            blob["crc32"] = blobs.crc32(data[start: start + blob["length"]])
        new_index = msgpack.packb(idx, use_bin_type=True)
    except (DcmError, TypeError, ValueError, OverflowError):
        return data
    if len(new_index) != header.index_length:
        return data  # a repacked index of another length would move the payloads
    head = bytearray(data[:HEADER_SIZE])
    crc = blobs.crc32(bytes(head[:HEADER_CRC_OFFSET]) + new_index)
    head[HEADER_CRC_OFFSET:HEADER_SIZE] = crc.to_bytes(4, "little")
    return bytes(head) + new_index + data[HEADER_SIZE + header.index_length:]


def fix_header_crc(data: bytes) -> bytes:
    """Recompute only the header CRC (over whatever index length the header gives)."""
    if len(data) < HEADER_SIZE:
        return data
    length = int.from_bytes(data[24:32], "little")
    crc = blobs.crc32(data[:HEADER_CRC_OFFSET] + data[HEADER_SIZE: HEADER_SIZE + length])
    return data[:HEADER_CRC_OFFSET] + crc.to_bytes(4, "little") + data[HEADER_SIZE:]


def run_one(path, data: bytes) -> dict | None:
    """Write ``data`` to ``path`` and decode it: the result, or None when a DcmError rejected it."""
    with open(path, "wb") as fh:
        fh.write(data)
    try:
        return decode_everything(path)
    except DcmError:
        return None
