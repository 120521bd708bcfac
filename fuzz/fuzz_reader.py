"""Coverage-guided fuzzing of the .dcm reader (atheris).

    pip install atheris
    python fuzz/make_corpus.py          # the seed corpus
    python fuzz/fuzz_reader.py -atheris_runs=100000 fuzz/corpus

The invariant: ``dcm.open`` plus a full decode of every record and attachment
either raises a ``DcmError`` or returns tensors whose sizes match the index.
Any other exception is a bug and stops the fuzzer.  Records that need a base
are decoded against an all-zero base of the referenced dtype and shape (the
base check is skipped: only the payload decoding is under test here).
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

import dcm
from dcm import dtypes
from dcm.errors import DcmError

_PATH = os.path.join(tempfile.mkdtemp(prefix="dcm-fuzz-"), "input.dcm")


def decode_everything(path: str) -> None:
    with dcm.open(path) as f:
        for rec in f.records():
            base = None
            if rec.base is not None:
                storage = dtypes.dtype(rec.base["dtype"]).storage
                base = np.zeros(rec.base["shape"], dtype=storage)
            out = f.tensor(rec.name, base, check_base=False)
            if out is not None:
                assert out.shape == rec.shape, (rec.name, out.shape, rec.shape)
                assert out.dtype.itemsize == dtypes.dtype(rec.dtype).itemsize
        for name in f.attachments():
            f.attachment(name)


def fix_checksums(data: bytes) -> bytes:
    """Recompute the payload and header CRCs so mutations reach the checks behind them."""
    import msgpack

    from dcm import blobs, container, index
    from dcm.constants import HEADER_CRC_OFFSET, HEADER_SIZE

    try:
        header = container.parse_header(data[:HEADER_SIZE], len(data))
        raw_index = data[HEADER_SIZE : HEADER_SIZE + header.index_length]
        idx = index.check_index(index.unpack_index(raw_index))
        for _, blob in container.iter_blobs(idx):
            start = header.data_start + blob["offset"]
            blob["crc32"] = blobs.crc32(data[start : start + blob["length"]])
        new_index = msgpack.packb(idx, use_bin_type=True)
    except (DcmError, TypeError, ValueError, OverflowError):
        return data
    if len(new_index) != header.index_length:
        return data  # a repacked index of another length would move the payloads
    head = bytearray(data[:HEADER_SIZE])
    crc = blobs.crc32(bytes(head[:HEADER_CRC_OFFSET]) + new_index)
    head[HEADER_CRC_OFFSET:HEADER_SIZE] = crc.to_bytes(4, "little")
    return bytes(head) + new_index + data[HEADER_SIZE + header.index_length :]


def test_one_input(data: bytes) -> None:
    # The last byte picks the mode, so the fuzzer learns to reach past the CRCs too.
    if data and data[-1] & 1:
        data = fix_checksums(data[:-1])
    with open(_PATH, "wb") as fh:
        fh.write(data)
    try:
        decode_everything(_PATH)
    except DcmError:
        pass


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
