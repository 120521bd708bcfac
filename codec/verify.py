"""``dcm.verify``: check a whole .dcm file, payloads included, one tensor at a time.

Opening the file runs every structural check (header, index CRC, schema,
limits, layout, base digest).  verify then checks that all padding is zero,
CRC-checks and decodes every blob of every record and attachment, and decodes
every record that needs no base.  Given the base, it also checks each base
tensor against its reference and decodes every record fully, as ``decode``
does: the base streamed in chunks, so memory peaks at one decoded tensor plus
one decompressed blob (1.5x the largest tensor for 2-byte dtypes); without a
base, at one decompressed blob.  The first error is raised, as the DcmError
subclass that names it (the CLI maps it to its exit code).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from . import dtypes, records
from .checkpoint import Checkpoint
from .constants import Kind
from .decode import check_base_names, rebuild
from .errors import LayoutError, PayloadError
from .reader import DcmFile, Record


@dataclass
class VerifyReport:
    path: str
    records_checked: int
    blobs_checked: int  # record and attachment blobs, CRC-checked and decoded
    bytes_checked: int  # stored payload bytes read
    attachments_checked: int
    base_checked: bool  # every record was decoded against a base that matches its references
    seconds: float

    def summary(self) -> str:
        base = "base checked" if self.base_checked else "base not checked"
        return (f"{self.records_checked} records, {self.attachments_checked} attachments, "
                f"{self.blobs_checked} blobs, {self.bytes_checked} bytes checked, {base}, "
                f"{self.seconds:.2f} s")


def _check_tensor(rec: Record, array) -> None:
    """The decoded array has the record's shape and element width (a decoder bug or a bad file)."""
    if rec.kind == Kind.REMOVED:
        if array is not None:
            raise PayloadError(f"tensor {rec.name!r}: a removed record decoded to data")
        return
    width = dtypes.dtype(rec.dtype).itemsize
    if not isinstance(array, np.ndarray) or tuple(array.shape) != rec.shape or array.dtype.itemsize != width:
        got = "nothing" if array is None else f"{array.dtype}{list(array.shape)}"
        raise PayloadError(f"tensor {rec.name!r}: decoded to {got}, the record says "
                           f"{rec.dtype}{list(rec.shape)}")


def verify(path, base=None, progress: bool = False) -> VerifyReport:
    """Check ``path`` fully; with ``base`` (model dir or .safetensors), decode against it too."""
    started = time.perf_counter()
    with DcmFile(path) as dcm:
        dcm.exact_blobs = True  # the end of every rANS stream too (spec 8.2, a verifier's checks)
        if not dcm.padding_is_zero():
            raise LayoutError(f"{dcm.path}: padding bytes between index and payloads or between "
                              f"payloads are not zero")
        recs = dcm.records()
        atts = dcm.index.get("attachments", [])
        total = sum(r.payload_bytes for r in recs) + sum(a["blob"]["length"] for a in atts)
        blob_count = byte_count = 0
        base_ckpt = Checkpoint(base) if base is not None else None
        try:
            if base_ckpt is not None:
                check_base_names(dcm, base_ckpt)
            with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
                for rec in recs:
                    _verify_record(dcm, rec, base_ckpt)
                    blob_count += len(rec.blobs)
                    byte_count += rec.payload_bytes
                    bar.update(rec.payload_bytes)
                for att in atts:
                    dcm.attachment(att["name"])  # CRC, frame and raw length checked on decoding
                    blob_count += 1
                    byte_count += att["blob"]["length"]
                    bar.update(att["blob"]["length"])
        finally:
            if base_ckpt is not None:
                base_ckpt.close()
        return VerifyReport(str(dcm.path), len(recs), blob_count, byte_count, len(atts),
                            base_ckpt is not None, time.perf_counter() - started)


def _verify_record(dcm: DcmFile, rec: Record, base_ckpt: Checkpoint | None) -> None:
    if base_ckpt is not None and rec.base is not None:
        _check_tensor(rec, rebuild(dcm, base_ckpt, rec.name))  # as decode does it, base streamed
    elif records.KINDS[rec.kind].needs_base:  # open() rejected unknown kinds
        dcm.check_payload(rec.name)  # no base: CRCs, frames, sizes and what the kind checks alone
    else:
        _check_tensor(rec, dcm.tensor_from(rec.name))
