"""``dcm.open``: a lazy reader of .dcm files (no torch needed).

Opening checks everything that can be checked without touching payloads:
header, index CRC, schema, limits, layout, each record's kind and sizes, and
the base digest.  Payloads are read, CRC-checked and decoded only when a
tensor is asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np

from . import blobs, dtypes, records
from .constants import KIND_NAMES, Kind
from .checkpoint import INDEX_FILE, check_relpath
from .container import ContainerFile, check_header_crc, check_layout
from .errors import ChecksumError, FormatError, UsageError, WrongBaseError
from .index import check_index, packed_len, unpack_index


@dataclass(frozen=True)
class Record:
    """One tensor record of the index, as read."""

    name: str
    kind: int
    dtype: str
    shape: tuple
    params: dict
    blobs: tuple
    base: dict | None
    index_bytes: int  # bytes its entry takes in the msgpack index

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, f"kind-{self.kind}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def payload_bytes(self) -> int:
        return sum(b["length"] for b in self.blobs)

    @property
    def total_bytes(self) -> int:
        """Every byte the record puts in the file: payloads plus its index entry."""
        return self.payload_bytes + self.index_bytes


@contextlib.contextmanager
def naming(path):
    """Prefix errors about a file's content with the file's path."""
    try:
        yield
    except (FormatError, ChecksumError) as exc:
        prefix = f"{os.fspath(path)}: "
        if exc.args and not str(exc.args[0]).startswith(prefix):
            exc.args = (prefix + str(exc.args[0]),) + exc.args[1:]
        raise


def check_attachment_name(name: str) -> str:
    """A safe relative path that cannot overwrite the decoded weights."""
    check_relpath(name)
    if name.endswith(".safetensors") or name == INDEX_FILE:
        raise FormatError(f"attachment name {name!r} would overwrite the decoded weights")
    return name


def check_attachment_tree(names) -> None:
    """No attachment may be a directory of another (``a`` and ``a/b``): both cannot be written."""
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                raise FormatError(f"attachment {name!r} lies inside attachment {'/'.join(parts[:i])!r}")


def base_digest(refs) -> bytes:
    """sha256 over (name, 0x00, tensor sha256) of each base reference, in record order."""
    h = hashlib.sha256()
    for name, sha in refs:
        h.update(name.encode("utf-8") + b"\x00" + sha)
    return h.digest()


def tensor_sha256(array: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).digest()


def check_base_tensor(rec: Record, base: np.ndarray, base_dtype: str | None = None) -> None:
    """Raise WrongBaseError unless ``base`` is the tensor ``rec`` was encoded against."""
    if rec.base is None:
        return
    width = dtypes.dtype(rec.base["dtype"]).itemsize
    if base_dtype is None and base.dtype.itemsize != width:
        raise WrongBaseError(f"wrong base: tensor {rec.name!r} is a {base.dtype} array in the base, "
                             f"the file expects {rec.base['dtype']} ({width}-byte elements)")
    check_base_shape(rec, base.shape, base.dtype.itemsize, base_dtype)
    check_base_digest(rec, tensor_sha256(base))


def check_base_shape(rec: Record, shape, itemsize: int, base_dtype: str | None = None) -> None:
    """The cheap part of check_base_tensor: dtype (when known), shape and element width."""
    ref = rec.base
    if base_dtype is not None and base_dtype != ref["dtype"]:
        raise WrongBaseError(f"wrong base: tensor {rec.name!r} is {base_dtype} in the base, "
                             f"the file expects {ref['dtype']}")
    if tuple(shape) != tuple(ref["shape"]):
        raise WrongBaseError(f"wrong base: tensor {rec.name!r} has shape {list(shape)} in the base, "
                             f"the file expects {list(ref['shape'])}")
    width = dtypes.dtype(ref["dtype"]).itemsize
    if itemsize != width:
        raise WrongBaseError(f"wrong base: tensor {rec.name!r} has {itemsize}-byte elements in the base, "
                             f"the file expects {ref['dtype']} ({width}-byte elements)")


def check_base_digest(rec: Record, sha256: bytes) -> None:
    """The base tensor's sha256 (however it was computed) must be the one the record references."""
    if sha256 != rec.base["sha256"]:
        raise WrongBaseError(f"wrong base: tensor {rec.name!r} differs from the base the file was encoded against")


def _check_array(name: str, base) -> None:
    if base is not None and not isinstance(base, np.ndarray):
        raise UsageError(f"tensor {name!r}: the base must be a numpy array of the base tensor's storage "
                         f"dtype (as Checkpoint.read gives), got {type(base).__name__}")


class DcmFile:
    """An open .dcm file.  Use ``dcm.open(path)``, preferably as a context manager."""

    # A verifier sets this: blobs are then decoded with the checks a reader may skip (spec 8.2).
    exact_blobs = False

    def __init__(self, path):
        with naming(path):
            self._file = ContainerFile(path)
            try:
                self._load()
            except BaseException:
                self._file.close()  # do not keep the map (and its file descriptor) of a rejected file
                raise

    def _load(self):
        self.path = self._file.path
        self.header = self._file.header
        index_bytes = self._file.index_bytes()
        check_header_crc(self._file.raw_header, index_bytes)
        self.index = check_index(unpack_index(index_bytes))
        if tuple(self.index["format"]) != (self.header.major, self.header.minor):
            raise FormatError(f"index format {self.index['format']} differs from the header's "
                              f"version {self.header.major}.{self.header.minor}")
        check_layout(self.index, self.header)
        self._records, self._raw = {}, {}
        for i, raw in enumerate(self.index["tensors"]):
            self._raw[raw["name"]] = raw
            records.validate(raw, f"tensors[{i}] ({raw['name']!r})")
            self._records[raw["name"]] = Record(
                raw["name"], raw["kind"], raw["dtype"], tuple(raw["shape"]), raw["params"],
                tuple(raw["blobs"]), raw.get("base"), packed_len(raw))
        refs = [(r.name, r.base["sha256"]) for r in self._records.values() if r.base is not None]
        if base_digest(refs) != self.index["base"]["digest"]:
            raise FormatError("base.digest does not match the records' base references")
        self._attachments = {}
        for att in self.index.get("attachments", []):
            self._attachments[check_attachment_name(att["name"])] = att["blob"]
        check_attachment_tree(self._attachments)

    # --- what the file holds ------------------------------------------------------

    def keys(self) -> list[str]:
        """Names of the fine-tune's tensors (records of kind ``removed`` excluded)."""
        return [n for n, r in self._records.items() if r.kind != Kind.REMOVED]

    def records(self) -> list[Record]:
        """Every record, ``removed`` ones included, in file order."""
        return list(self._records.values())

    def record(self, name: str) -> Record:
        try:
            return self._records[name]
        except KeyError:
            raise UsageError(f"{self.path}: no tensor named {name!r}") from None

    def metadata(self) -> dict:
        """How the file was made: version, creator, method and its parameters, base digest."""
        return {
            "format": f"{self.header.major}.{self.header.minor}",
            "creator": self.index["creator"],
            "method": self.index["method"]["name"],
            "params": self.index["method"]["params"],
            "base_digest": self.index["base"]["digest"].hex(),
            "checkpoint_metadata": self.index.get("checkpoint_metadata", {}),
        }

    def attachments(self) -> list[str]:
        return list(self._attachments)

    def attachment(self, name: str) -> bytes:
        try:
            blob = self._attachments[name]
        except KeyError:
            raise UsageError(f"{self.path}: no attachment named {name!r}") from None
        with naming(self.path):
            return bytes(blobs.decode(self._file.stored(blob), blob, f"attachment {name!r}", self.exact_blobs))

    # --- payloads -----------------------------------------------------------------

    def raw_blobs(self, rec: Record) -> list[bytes]:
        """The record's blobs, CRC-checked and decoded (copies: the map's pages are released)."""
        return list(self.iter_raw_blobs(rec))

    def iter_raw_blobs(self, rec: Record):
        """As raw_blobs, one blob at a time: a consumer that drops each holds one, not all."""
        for j, blob in enumerate(rec.blobs):
            # No local names the blob: a suspended generator would keep it alive.
            yield self._raw_blob(rec, j, blob)

    def _raw_blob(self, rec: Record, j: int, blob: dict) -> bytes:
        with naming(self.path):
            raw = blobs.decode(self._file.stored(blob), blob, f"tensor {rec.name!r} blob {j}", self.exact_blobs)
        # A raw-encoded blob may be a view: the caller gets bytes of its own (a decoded rANS blob
        # already is: a bytearray nobody else holds, not copied again).
        return raw if isinstance(raw, bytearray) else bytes(raw)

    def tensor(self, name: str, base: np.ndarray | None = None, *, check_base: bool = True) -> np.ndarray | None:
        """The fine-tuned tensor, as a storage array (BF16 as uint16); None for ``removed``."""
        rec = self.record(name)
        _check_array(name, base)
        if check_base and base is not None and records.KINDS[rec.kind].needs_base:
            check_base_tensor(rec, base)
        return self.tensor_from(name, base)  # refuses a missing base

    def tensor_from(self, name: str, base=None) -> np.ndarray | None:
        """As ``tensor`` without the base check; ``base`` may also be a stream.

        A stream (``checkpoint.TensorStream``, see ``records.as_reader``) is read
        in chunks, once, in order: the base is never held whole, and the stream can
        hash it on the way for the caller to check afterwards (``decode.rebuild``).
        The record's blobs are decompressed one at a time as they are merged.
        """
        rec = self.record(name)
        kind = records.KINDS[rec.kind]
        if kind.needs_base and base is None:
            raise UsageError(f"tensor {name!r} ({rec.kind_name}) needs its base tensor")
        return kind.decode(self._raw[name], self.iter_raw_blobs(rec), base if kind.needs_base else None)

    def check_payload(self, name: str) -> None:
        """Check a record's blobs as far as possible without its base (CRCs, frames, sizes, layout)."""
        rec = self.record(name)
        records.KINDS[rec.kind].check_payload(self._raw[name], self.iter_raw_blobs(rec))

    def stored_delta(self, name: str) -> np.ndarray:
        """Δ̂ of a lossy record (kinds that add an approximate delta to the base), float32, no base needed.

        For an ``adapted`` record around such a kind: the inner record's Δ̂, of the base's shape,
        against the adapted base (spec 10.13)."""
        rec = self.record(name)
        if rec.kind == Kind.ADAPTED:
            rec = self.inner_record(name)
        kind = records.KINDS[rec.kind]
        if not isinstance(kind, records.AdditiveKind):
            raise UsageError(f"tensor {name!r}: a {rec.kind_name} record stores no approximate delta")
        return kind.delta(self._raw_of(rec), self.iter_raw_blobs(rec))

    def index_entry(self, name: str) -> dict:
        """The record's entry of the index, as read (checked)."""
        self.record(name)
        return self._raw[name]

    def inner_record(self, name: str) -> Record:
        """The inner record of an ``adapted`` record (spec 10.13): its kind, params, blobs, the base's shape."""
        rec = self.record(name)
        if rec.kind != Kind.ADAPTED:
            raise UsageError(f"tensor {name!r}: a {rec.kind_name} record has no inner record")
        raw = records.inner(self._raw[name])
        return Record(raw["name"], raw["kind"], raw["dtype"], tuple(raw["shape"]), raw["params"],
                      tuple(raw["blobs"]), raw["base"], 0)

    def new_rows(self, name: str) -> np.ndarray | None:
        """The rows an ``adapted`` record adds to its base tensor (a storage array), or None."""
        rec = self.record(name)
        if rec.kind != Kind.ADAPTED or not records.new_row_blobs(self._raw[name]):
            return None
        new = records.new_rows_record(self._raw[name])
        blobs = (self._raw_blob(rec, len(rec.blobs) - len(new["blobs"]) + j, b) for j, b in enumerate(new["blobs"]))
        return records._storage(records._dense_values(blobs, new, rec.params["layout"]), new)

    def _raw_of(self, rec: Record) -> dict:
        """The index entry of a record, or of an inner record, as the kinds read it."""
        raw = self._raw[rec.name]
        return raw if raw["kind"] == rec.kind else records.inner(raw)

    def delta(self, name: str, base: np.ndarray | None = None) -> np.ndarray:
        """Δ = W_ft − W_base as float32 values (exact kinds need ``base`` to compute it)."""
        rec = self.record(name)
        if rec.kind == Kind.REMOVED or not dtypes.dtype(rec.dtype).is_float:
            raise UsageError(f"tensor {name!r}: no float delta for a {rec.kind_name} {rec.dtype} record")
        if base is None:
            raise UsageError(f"tensor {name!r} ({rec.kind_name}) needs its base tensor for a delta")
        _check_array(name, base)
        ft = self.tensor(name, base)  # checks the base of a dense-delta record (WrongBaseError)
        if tuple(base.shape) != rec.shape:  # a full record may replace a base of another shape
            raise UsageError(f"tensor {name!r}: base shape {list(base.shape)} differs from the "
                             f"fine-tune's {list(rec.shape)}, no element-wise delta")
        f64 = lambda a, dt: dtypes.to_float32(a, dt).astype(np.float64)  # noqa: E731
        return (f64(ft, rec.dtype) - f64(base, rec.base["dtype"] if rec.base else rec.dtype)).astype(np.float32)

    def padding_is_zero(self) -> bool:
        return self._file.padding_is_zero(self.index)

    def stored(self, blob: dict) -> bytes:
        return self._file.stored(blob)

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<dcm file {self.path!r}: {len(self._records)} records, method {self.index['method']['name']}>"


def open(path) -> DcmFile:  # noqa: A001  (like safetensors' safe_open / builtins.open)
    """Open a .dcm file lazily; raises a DcmError subclass if it breaks the spec."""
    return DcmFile(path)
