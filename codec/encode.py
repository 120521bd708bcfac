"""``dcm.encode``: base + fine-tune checkpoints -> one .dcm file, one tensor at a time."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from tqdm import tqdm

from . import adapted, coverage, methods
from ._version import __version__
from .checkpoint import Checkpoint, TensorStream
from .constants import KIND_MINOR, VERSION_MAJOR, Kind
from .container import ContainerWriter
from .coverage import Coverage
from .errors import CoverageError
from .index import check_index, pack_index
from .reader import base_digest, tensor_sha256
from .records import DenseDelta, Full


@dataclass
class EncodeReport:
    path: str
    file_bytes: int
    records: int
    params: int  # elements of the fine-tune's tensors
    finetune_bytes: int  # the fine-tune's own tensor bytes
    seconds: float
    coverage: Coverage | None = None  # what a lossy method coded, and why not the rest

    @property
    def bits_per_param(self) -> float:
        return 8 * self.file_bytes / max(self.params, 1)


def _base_ref(info, sha: bytes) -> dict:
    return {"dtype": info.dtype, "shape": list(info.shape), "sha256": sha}


class _Encoder:
    def __init__(self, base: Checkpoint, ft: Checkpoint, writer: ContainerWriter, method, bar):
        self.base, self.ft, self.writer, self.method, self.bar = base, ft, writer, method, bar
        self.records = []

    def record(self, name, kind, info, params, raws, base_ref):
        rec = {"name": name, "kind": int(kind), "dtype": info.dtype, "shape": list(info.shape),
               "params": params, "blobs": [self.writer.add_blob(raw) for raw in raws]}
        if base_ref is not None:
            rec["base"] = base_ref
        self.records.append(rec)

    def finetune_tensor(self, name):
        info = self.ft.info(name)
        base_ref = None
        if name not in self.base:
            kind, params, raws = Kind.FULL, *self._full(name)
        else:
            base_info = self.base.info(name)
            kind, params, raws, sha = self._against_base(name, info, base_info)
            base_ref = _base_ref(base_info, sha)
        self.record(name, kind, info, params, raws, base_ref)
        self.bar.update(info.nbytes)

    def _full(self, name):
        return Full.encode(TensorStream(self.ft, name))

    def _against_base(self, name, info, base_info):
        """(kind, params, raws, sha256 of the base tensor), holding neither tensor whole.

        Both tensors are streamed in chunks straight into the raw blobs, the base
        hashed on the way: memory stays near the blobs, one tensor's size.
        """
        if (base_info.dtype, base_info.shape) != (info.dtype, info.shape):
            if adapted.applies(info, base_info):  # another float dtype, more rows: against the adapted base
                ft, base = self.ft.read(name), self.base.read(name)
                return (*adapted.encode(self.method, name, ft, base, info.dtype, base_info.dtype), tensor_sha256(base))
            # Shapes or dtypes differ otherwise: no delta to take.
            return (Kind.FULL, *self._full(name), self.base.sha256(name))
        if self.method.wants_tensor(name, info.dtype, info.shape):
            return self._lossy(name, info)
        ft, base = TensorStream(self.ft, name), TensorStream(self.base, name, sha256=True)
        params, raws = DenseDelta.encode(ft, base)
        return Kind.DENSE_DELTA, params, raws, base.digest()

    def _lossy(self, name, info):
        """A tensor the method wants: its hook takes both tensors whole (lossless wants none)."""
        ft, base = self.ft.read(name), self.base.read(name)
        sha = tensor_sha256(base)
        lossy = self.method.encode_tensor(name, ft, base, info.dtype)
        if lossy is not None:
            return (*lossy, sha)
        return (Kind.DENSE_DELTA, *DenseDelta.encode(ft, base), sha)

    def removed_tensor(self, name):
        info = self.base.info(name)
        ref = _base_ref(info, self.base.sha256(name))
        self.record(name, Kind.REMOVED, info, {}, [], ref)

    def attachments(self):
        out = []
        # Checkpoint lists only files within MAX_ATTACHMENT_BYTES and refuses one that grew since.
        for relpath in self.ft.attachments():
            out.append({"name": relpath, "blob": self.writer.add_blob(self.ft.read_attachment(relpath))})
        return out


def _planned(profile, base: Checkpoint, ft: Checkpoint) -> list:
    """TensorInfo of the tensors the method will code (same dtype and shape in both, selected; for an
    adapted tensor, its inner record's matrix)."""
    return coverage.planned(profile, base, ft)


def _pair(base: Checkpoint, ft: Checkpoint, name: str) -> tuple:
    """(fine-tune, base) arrays of a planned matrix, as the method will be given them."""
    ft_array, base_array = ft.read(name), base.read(name)
    ft_info, base_info = ft.info(name), base.info(name)
    if adapted.applies(ft_info, base_info):
        shared, adapted_base, _ = adapted.split(ft_array, base_array, ft_info.dtype, base_info.dtype)
        return shared, adapted_base
    return ft_array, base_array


def _kinds(rec: dict) -> tuple:
    """The kinds a record uses: its own, and an adapted record's inner kind (the file's version covers both)."""
    return (rec["kind"], rec["params"]["inner"]) if rec["kind"] == Kind.ADAPTED else (rec["kind"],)


def _check_coverage(cov: Coverage) -> None:
    problems = cov.problems()
    if problems:
        lines = problems + [f"  {line}" for line in cov.reason_lines()]
        raise CoverageError("\n".join(lines) + "\nnothing was written; --allow-uncoded (allow_uncoded=True) "
                                                "writes such a file anyway")


def encode(base, finetune, out, *, method="lossless", ratio=None, include=None, exclude=None,
           options: dict | None = None, zstd_level: int = 3, overwrite: bool = False,
           progress: bool = False, creator: str | None = None, allow_uncoded: bool = True) -> EncodeReport:
    """Encode ``finetune`` against ``base`` (HF model dirs or .safetensors files) into ``out``.

    ``options`` are the method's own (e.g. delta-come: alloc, svd, calibration, recipe).
    ``include`` / ``exclude``: a glob or a list of globs.  The report's ``coverage``
    says what a lossy method coded; with ``allow_uncoded=False`` (the CLI's
    default) a lossy encode that codes no tensor, or whose file takes more than
    twice its budget, raises CoverageError and writes nothing.
    """
    started = time.perf_counter()
    profile = methods.get_method(method, options, ratio=ratio, include=include, exclude=exclude,
                                 zstd_level=zstd_level)
    inputs = {"base": base, "fine-tune": finetune, "calibration file": (options or {}).get("calibration")}
    with Checkpoint(base) as base_ckpt, Checkpoint(finetune) as ft_ckpt, \
            ContainerWriter(out, zstd_level=zstd_level, overwrite=overwrite, inputs=inputs) as writer:
        profile.plan(_planned(profile, base_ckpt, ft_ckpt), lambda name: _pair(base_ckpt, ft_ckpt, name))
        total = sum(ft_ckpt.info(n).nbytes for n in ft_ckpt.names())
        with tqdm(total=total, unit="B", unit_scale=True, desc="encode", disable=not progress) as bar:
            enc = _Encoder(base_ckpt, ft_ckpt, writer, profile, bar)
            for name in ft_ckpt.names():
                enc.finetune_tensor(name)
            for name in base_ckpt.names():
                if name not in ft_ckpt:
                    enc.removed_tensor(name)
        config = profile.get_config()
        if profile.selection.include or profile.selection.exclude:
            config["selection"] = profile.selection.get_config()
        refs = [(r["name"], r["base"]["sha256"]) for r in enc.records if "base" in r]
        index = {
            "format": [VERSION_MAJOR, max([0] + [KIND_MINOR[k] for r in enc.records for k in _kinds(r)])],
            "creator": creator or f"dcm {__version__}",
            "method": {"name": profile.name, "params": config},
            "base": {"digest": base_digest(refs)},
            "tensors": enc.records,
            "attachments": enc.attachments(),
        }
        if ft_ckpt.metadata:
            index["checkpoint_metadata"] = dict(ft_ckpt.metadata)
        check_index(index)
        index_bytes = pack_index(index)
        cov = coverage.measure(profile, base_ckpt, ft_ckpt, index, writer.file_length(index, index_bytes))
        if not allow_uncoded:
            _check_coverage(cov)
        file_bytes = writer.finish(index, index_bytes)
        kept = [r for r in enc.records if r["kind"] != Kind.REMOVED]
        params = sum(math.prod(r["shape"]) for r in kept)
    return EncodeReport(str(out), file_bytes, len(enc.records), params, total,
                        time.perf_counter() - started, cov)
