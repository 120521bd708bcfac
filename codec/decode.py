"""``dcm.decode``: a .dcm file + its base -> the fine-tune's checkpoint directory."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from . import dtypes, records
from .checkpoint import Checkpoint, CheckpointWriter, TensorInfo, TensorStream, check_relpath
from .constants import Kind
from .errors import WrongBaseError
from .reader import DcmFile, check_base_digest, check_base_shape

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # what transformers writes by default


@dataclass
class DecodeReport:
    path: str
    tensors: int
    bytes_written: int
    attachments: int
    seconds: float
    lossy_tensors: int = 0  # records a lossy method coded: those tensors approximate the fine-tune's
    method: str = "lossless"


def check_base_names(dcm: DcmFile, base: Checkpoint) -> None:
    """The base must hold exactly the tensors the file references, with their dtypes and shapes."""
    refs = {r.name: r.base for r in dcm.records() if r.base is not None}
    for name, ref in refs.items():
        if name not in base:
            raise WrongBaseError(f"wrong base: tensor {name!r} is missing from the base")
        info = base.info(name)
        if info.dtype != ref["dtype"]:
            raise WrongBaseError(f"wrong base: tensor {name!r} is {info.dtype} in the base, "
                                 f"the file expects {ref['dtype']}")
        if tuple(info.shape) != tuple(ref["shape"]):
            raise WrongBaseError(f"wrong base: tensor {name!r} has shape {list(info.shape)} in the base, "
                                 f"the file expects {list(ref['shape'])}")
    for name in base.names():
        if name not in refs:
            raise WrongBaseError(f"wrong base: the base has tensor {name!r}, unknown to the file")


def check_removed(dcm: DcmFile, base: Checkpoint) -> None:
    """Tensors the fine-tune dropped are part of the base fingerprint too."""
    for rec in dcm.records():
        if rec.kind == Kind.REMOVED:
            rebuild(dcm, base, rec.name)


def rebuild(dcm: DcmFile, base: Checkpoint, name: str):
    """One fine-tuned tensor (None for ``removed``), checked against the base it was encoded against.

    The base tensor is never held whole: a delta streams it in chunks into the
    decoded array, hashing it on the way, and only then is the digest compared,
    so a wrong base raises WrongBaseError after the work but before any output
    is committed.  Memory: the decoded tensor plus one decompressed blob.
    """
    rec = dcm.record(name)
    if rec.base is None:
        return dcm.tensor_from(name)
    info = base.info(name)
    check_base_shape(rec, info.shape, dtypes.dtype(info.dtype).itemsize, info.dtype)
    if not records.KINDS[rec.kind].needs_base:  # a full or removed record: check the base alone
        check_base_digest(rec, base.sha256(name))
        return dcm.tensor_from(name)
    stream = TensorStream(base, name, sha256=True)
    array = dcm.tensor_from(name, stream)
    check_base_digest(rec, stream.digest())
    return array


def decode(path, base, out_dir, *, overwrite: bool = False, progress: bool = False,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> DecodeReport:
    started = time.perf_counter()
    with DcmFile(path) as dcm, Checkpoint(base) as base_ckpt:
        check_base_names(dcm, base_ckpt)
        kept = [r for r in dcm.records() if r.kind != Kind.REMOVED]
        plan = [TensorInfo(r.name, r.dtype, tuple(r.shape), r.numel * dtypes.dtype(r.dtype).itemsize)
                for r in kept]
        total = sum(t.nbytes for t in plan)
        metadata = dcm.index.get("checkpoint_metadata") or None
        inputs = {".dcm file": path, "base": base}
        with CheckpointWriter(out_dir, plan, metadata=metadata, max_shard_bytes=max_shard_bytes,
                              overwrite=overwrite, inputs=inputs) as writer, \
                tqdm(total=total, unit="B", unit_scale=True, desc="decode", disable=not progress) as bar:
            for info in plan:
                writer.write(info.name, rebuild(dcm, base_ckpt, info.name))
                bar.update(info.nbytes)
            check_removed(dcm, base_ckpt)
            for name in dcm.attachments():
                writer.write_attachment(check_relpath(name), dcm.attachment(name))
            writer.commit()
        lossy = sum(1 for r in kept if records.is_lossy(dcm.index_entry(r.name)))
        method = dcm.index["method"]["name"]
    return DecodeReport(str(out_dir), len(plan), total, len(dcm.attachments()),
                        time.perf_counter() - started, lossy, method)
