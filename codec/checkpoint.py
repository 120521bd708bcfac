"""Reading and streaming writing of Hugging Face safetensors checkpoints.

Done by hand rather than with the ``safetensors`` library because numpy has no
bf16 / fp8 (the library refuses them with ``framework="numpy"``) and the library
can only write a whole in-memory dict at once.  Tensors travel as numpy arrays of
their *storage* dtype (see :mod:`dcm.dtypes`).

Reading uses ``os.preadv`` into fresh buffers instead of mmap: callers measure
peak RSS, and mapped file pages would count in it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import dtypes, sniff
from ._version import __version__
from .constants import MAX_ATTACHMENT_BYTES, MAX_ATTACHMENT_NAME_BYTES
from .errors import CheckpointError, DcmError, FormatError, InputChangedError, UsageError
from .outputs import MARKER, Output, write_marker

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
MAX_RELPATH_BYTES = MAX_ATTACHMENT_NAME_BYTES
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Weight formats we never carry as attachments: the codec stores the weights itself.
_WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".ot",
)
_TENSOR_KEYS = {"dtype", "shape", "data_offsets"}
# What transformers' Trainer saves beside a model: not part of it, never carried.
TRAINING_STATE = "training state, not part of the model"
_TRAINING_FILE = re.compile(r"optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth"
                            r"|training_args\.bin|pytorch_model_fsdp(_\d+)?\.bin")
_TRAINER_DIR = re.compile(r"(checkpoint|global_step)-?\d+")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    # Where the bytes are; excluded from ==, so infos of two checkpoints compare by content.
    _path: str = field(default="", repr=False, compare=False)
    _offset: int = field(default=0, repr=False, compare=False)


# --- helpers ---------------------------------------------------------------------


def _no_duplicates(pairs):
    """object_pairs_hook: JSON allows repeated keys, a hostile file could hide a tensor."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _load_json(data: bytes, where: str):
    try:
        return json.loads(
            data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
        )
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid JSON: {e}") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _stamp(st) -> tuple[int, int, int]:
    """What tells that a file changed: its size, modification time and inode."""
    return st.st_size, st.st_mtime_ns, st.st_ino


def _is_weight_file(name: str) -> bool:
    # Also e.g. pytorch_model.bin.index.json: an index of weights we do not carry.
    stem = name[: -len(".index.json")] if name.endswith(".index.json") else name
    return stem.endswith(_WEIGHT_SUFFIXES)


def check_relpath(relpath: str) -> str:
    """Validate an attachment path from an untrusted file; return it unchanged.

    Rejects anything that could escape the output directory or mean different
    files on different systems (backslashes, drive letters, '.', '..').
    """
    if not isinstance(relpath, str) or not relpath:
        raise FormatError(f"attachment path {relpath!r} is empty or not a string")
    try:
        size = len(relpath.encode("utf-8"))
    except UnicodeEncodeError:
        raise FormatError(f"attachment path {relpath!r} is not valid UTF-8") from None
    if size > MAX_RELPATH_BYTES:
        raise FormatError(f"attachment path {relpath!r} is longer than {MAX_RELPATH_BYTES} bytes")
    if "\\" in relpath or "\0" in relpath:
        raise FormatError(f"attachment path {relpath!r} contains a backslash or NUL")
    if relpath.startswith("/") or re.match(r"[A-Za-z]:", relpath):
        raise FormatError(f"attachment path {relpath!r} is absolute")
    if any(part in ("", ".", "..") for part in relpath.split("/")):
        raise FormatError(f"attachment path {relpath!r} has an empty, '.' or '..' component")
    return relpath


# --- reading ---------------------------------------------------------------------


def _parse_header(path: Path) -> tuple[dict[str, str], list[TensorInfo]]:
    """Metadata and tensors (sorted by data offset) of one safetensors file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(sniff.HEAD_BYTES)
            hint = sniff.not_a_checkpoint(head, path.name)
            if hint:
                raise CheckpointError(f"{path}: {hint}")
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated: {size} bytes, no header length")
            (n,) = struct.unpack("<Q", head[:8])
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(f"{path}: not a safetensors file: header length {n} exceeds "
                                      f"limits or file size {size}")
            f.seek(8)
            raw = f.read(n)
    except IsADirectoryError as e:
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors file") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    header = _load_json(raw, f"{path}: header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = _check_metadata(header.pop("__metadata__", {}), path)
    data_start, data_size = 8 + n, size - 8 - n
    infos = [_check_entry(name, e, path, data_start, data_size) for name, e in header.items()]
    infos.sort(key=lambda t: t._offset)  # stable: ties (empty tensors) keep header order
    _check_no_overlap(infos, path)
    return metadata, infos


def _check_metadata(meta, path: Path) -> dict[str, str]:
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    return meta


def _check_entry(name: str, entry, path: Path, data_start: int, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
        raise CheckpointError(f"{where}: entry must have exactly the keys {sorted(_TENSOR_KEYS)}")
    try:
        dt = dtypes.dtype(entry["dtype"])
    except DcmError:
        raise CheckpointError(f"{where}: unknown dtype {entry['dtype']!r}") from None
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not two ints")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(f"{where}: data_offsets {offsets} outside data of {data_size} bytes")
    nbytes = math.prod(shape) * dt.itemsize
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: {end - begin} bytes for {dt.name}{shape} ({nbytes} expected)")
    return TensorInfo(name, dt.name, tuple(shape), nbytes, str(path), data_start + begin)


def _check_no_overlap(infos: list[TensorInfo], path: Path) -> None:
    prev_end, prev_name = 0, None
    for t in infos:
        if t.nbytes == 0:  # an empty range overlaps nothing
            continue
        if t._offset < prev_end:
            raise CheckpointError(f"{path}: tensor {t.name!r} overlaps tensor {prev_name!r}")
        prev_end, prev_name = t._offset + t.nbytes, t.name


def _read_index(path: Path) -> tuple[dict[str, str], list[str]]:
    """The weight_map and the sorted shard file names of an index; checks the names."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    index = _load_json(raw, str(path))
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise CheckpointError(f"{path}: no weight_map object of strings")
    for shard in set(wmap.values()):
        # Shard names come from the file: keep them inside the model directory.
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard or "\0" in shard:
            raise CheckpointError(f"{path}: shard file name {shard!r} is not a plain file name")
    return wmap, sorted(set(wmap.values()))


def _refuse_a_shard(path: Path) -> None:
    """A file that the index beside it lists as a shard is a part of a checkpoint, not a checkpoint.

    Read alone it would silently leave out the other shards' tensors (an encode
    would store most of the fine-tune whole, a decode would find the base short).
    """
    index_path = path.parent / INDEX_FILE
    if not index_path.is_file():
        return
    try:
        wmap, shards = _read_index(index_path)
    except CheckpointError:
        return  # not an index we can read: the file may well be a checkpoint of its own
    if path.name in shards and len(shards) > 1:
        raise UsageError(f"{path} is one of {len(shards)} shards of the checkpoint in {path.parent} "
                         f"({INDEX_FILE} lists it): pass the directory {path.parent} to use the whole checkpoint")


class Checkpoint:
    """A safetensors checkpoint: a model directory (single or sharded) or one file (not a shard)."""

    def __init__(self, path):
        if not isinstance(path, (str, os.PathLike)):
            raise UsageError(f"a checkpoint is a path (str or os.PathLike) to a model directory or "
                             f".safetensors file, got {type(path).__name__} {path!r:.80}")
        self.path = Path(path)
        self._infos: dict[str, TensorInfo] = {}
        self._fds: dict[str, int] = {}
        self._stamps: dict[str, tuple] = {}  # (size, mtime) of each weight file when its header was read
        self._metadata: dict[str, str] = {}
        self._own_files: set[str] = set()  # weight files that make up this checkpoint
        self._attachments: dict[str, Path] | None = None
        self._skipped: list[tuple[str, str]] = []
        self.notes: list[str] = []  # what a user should know about how the directory was read
        if self.path.is_dir():
            self._open_dir()
        elif self.path.is_file():
            _refuse_a_shard(self.path)
            self._metadata, infos = _parse_header(self.path)
            self._add(infos)
        else:
            raise CheckpointError(f"{self.path}: no such checkpoint file or directory")

    def _open_dir(self) -> None:
        # transformers prefers the single file when both layouts are present.
        if (self.path / SINGLE_FILE).is_file():
            self._metadata, infos = _parse_header(self.path / SINGLE_FILE)
            self._add(infos)
            self._own_files = {SINGLE_FILE}
            if (self.path / INDEX_FILE).is_file():
                self.notes.append(f"{self.path}: using the weights in {SINGLE_FILE}; {INDEX_FILE} and "
                                  f"its shards are ignored (as transformers does)")
        elif (self.path / INDEX_FILE).is_file():
            self._open_sharded(self.path / INDEX_FILE)
        else:
            try:
                names = os.listdir(self.path)
            except OSError:
                names = []
            why = sniff.pickle_only_directory(names) or f"directory has neither {SINGLE_FILE} nor {INDEX_FILE}"
            raise CheckpointError(f"{self.path}: {why}")

    def _open_sharded(self, index_path: Path) -> None:
        wmap, shards = _read_index(index_path)
        self._own_files = {INDEX_FILE, *shards}
        for i, shard in enumerate(shards):
            meta, infos = _parse_header(self.path / shard)
            if i == 0:
                self._metadata = meta
            for t in infos:
                if wmap.get(t.name) != shard:
                    raise CheckpointError(
                        f"{self.path / shard}: tensor {t.name!r} is not mapped to this shard in {index_path}"
                    )
            self._add(infos)
        for name, shard in wmap.items():
            if name not in self._infos:
                raise CheckpointError(f"{index_path}: tensor {name!r} is missing from shard {shard}")

    def _add(self, infos: list[TensorInfo]) -> None:
        for t in infos:
            if t.name in self._infos:
                raise CheckpointError(f"{t._path}: tensor {t.name!r} also in {self._infos[t.name]._path}")
            self._infos[t.name] = t
            if t._path not in self._stamps:
                self._stamps[t._path] = _stamp(os.stat(t._path))

    # --- tensors ---

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def __contains__(self, name) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def read(self, name: str) -> np.ndarray:
        """The tensor's bytes as a fresh array of its storage dtype and shape."""
        t = self.info(name)
        buf = self._pread(t, 0, t.nbytes)
        return buf.view(dtypes.dtype(t.dtype).storage).reshape(t.shape)

    def read_elements(self, name: str, start: int, count: int) -> np.ndarray:
        """Elements [start, start + count) of the flattened tensor, as a fresh 1-D storage array.

        Lets the codec stream a tensor in chunks instead of holding it whole.
        """
        t = self.info(name)
        numel = math.prod(t.shape)
        if not (_is_int(start) and _is_int(count) and 0 <= start and 0 <= count and start + count <= numel):
            raise UsageError(f"tensor {name!r}: {count} elements from {start} lie outside its {numel}")
        dt = dtypes.dtype(t.dtype)
        return self._pread(t, start * dt.itemsize, count * dt.itemsize).view(dt.storage)

    def sha256(self, name: str) -> bytes:
        """sha256 of the tensor's bytes (as ``reader.tensor_sha256`` of ``read(name)``), in chunks."""
        stream = TensorStream(self, name, sha256=True)
        for start in range(0, stream.numel, STREAM_CHUNK):
            stream(slice(start, min(start + STREAM_CHUNK, stream.numel)))
        return stream.digest()

    def _pread(self, t: TensorInfo, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` bytes of tensor ``t`` from ``offset`` into a fresh uint8 array."""
        buf = np.empty(nbytes, dtype=np.uint8)
        fd = self._fd(t._path)
        view, pos = memoryview(buf), 0
        try:
            while pos < nbytes:
                got = os.preadv(fd, [view[pos:]], t._offset + offset + pos)
                if got <= 0:
                    raise InputChangedError(f"{t._path}: tensor {t.name!r}: the file was truncated "
                                            f"while dcm was reading it")
                pos += got
            changed = _stamp(os.fstat(fd)) != self._stamps[t._path]
        except OSError as e:
            raise CheckpointError(f"{t._path}: tensor {t.name!r}: cannot read: {e.strerror or e}") from e
        if changed:
            raise InputChangedError(f"{t._path}: the file changed while dcm was reading it; "
                                    f"replace a file by renaming a new one into place")
        return buf

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open: {e.strerror or e}") from e
            if _stamp(os.fstat(fd)) != self._stamps[path]:
                os.close(fd)
                raise InputChangedError(f"{path}: the file changed while dcm was reading it (after its header)")
            self._fds[path] = fd
        return self._fds[path]

    # --- attachments ---

    def attachments(self) -> list[str]:
        """Relative POSIX paths of the small side files (config, tokenizer...), sorted."""
        return sorted(self._scan_attachments())

    def skipped_attachments(self) -> list[tuple[str, str]]:
        """(relpath, reason) of side files not carried: too large, weights, unsafe links."""
        self._scan_attachments()
        return list(self._skipped)

    def read_attachment(self, relpath: str) -> bytes:
        found = self._scan_attachments().get(relpath)
        if found is None:
            raise CheckpointError(f"{self.path}: no attachment {relpath!r}")
        try:
            data = found.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{found}: cannot read: {e.strerror or e}") from e
        if len(data) > MAX_ATTACHMENT_BYTES:  # it grew since the scan
            raise CheckpointError(f"{found}: larger than {MAX_ATTACHMENT_BYTES} bytes")
        return data

    def _scan_attachments(self) -> dict[str, Path]:
        if self._attachments is None:
            self._attachments, self._skipped = {}, []
            if self.path.is_dir():
                self._walk(self.path, "")
            self._skipped.sort()
        return self._attachments

    def _walk(self, directory: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.name.startswith("."):  # .git, .cache, .gitattributes: not model files
                continue
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                if _TRAINER_DIR.fullmatch(entry.name):  # a Trainer's checkpoint-500/: a whole copy
                    self._skipped.append((rel + "/", TRAINING_STATE))
                    continue
                self._walk(Path(entry.path), rel + "/")
            elif not (prefix == "" and entry.name in self._own_files):
                self._consider(Path(entry.path), rel)

    def _consider(self, path: Path, rel: str) -> None:
        reason = self._skip_reason(path, rel)
        if reason:
            self._skipped.append((rel, reason))
        else:
            self._attachments[rel] = path

    def _skip_reason(self, path: Path, rel: str) -> str | None:
        if _TRAINING_FILE.fullmatch(path.name):
            return TRAINING_STATE
        if _is_weight_file(path.name):
            return "weight file not read (dcm reads the checkpoint's safetensors weights)"
        try:
            check_relpath(rel)
        except FormatError:
            return "file name not portable"
        if path.is_symlink() and not self._safe_link(path):
            return "symbolic link to outside the model directory"
        try:
            st = path.stat()
        except OSError:
            return "dangling symbolic link or unreadable"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size > MAX_ATTACHMENT_BYTES:
            return f"larger than {MAX_ATTACHMENT_BYTES} bytes"
        return None

    def _safe_link(self, path: Path) -> bool:
        """A link may point inside the model dir, or into the HF hub cache's blobs/.

        Hub snapshots (``models--x/snapshots/<rev>/``) are all links to
        ``models--x/blobs/``; links elsewhere could smuggle e.g. a private key
        into a file that gets shared.
        """
        target = path.resolve()
        root = self.path.resolve()
        allowed = [root]
        if root.parent.name == "snapshots":
            allowed.append(root.parent.parent / "blobs")
        return any(target.is_relative_to(a) for a in allowed)

    # --- lifetime ---

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


STREAM_CHUNK = 1 << 18  # elements per read when a tensor is only hashed (as records._CHUNK)


class TensorStream:
    """One tensor of a checkpoint, read part by part in order, optionally hashed on the way.

    The codec passes it where a whole array used to go (``stream(slice)`` gives
    that part's elements), so encode and decode hold a chunk of the tensor, not
    all of it; with ``sha256=True`` the same single pass also yields the digest
    that the .dcm file records for a base tensor.
    """

    def __init__(self, ckpt: Checkpoint, name: str, *, sha256: bool = False):
        self.ckpt, self.name = ckpt, name
        info = ckpt.info(name)
        self.numel, self.itemsize = math.prod(info.shape), dtypes.dtype(info.dtype).itemsize
        self._hash = hashlib.sha256() if sha256 else None
        self._pos = 0  # elements read so far

    def __call__(self, part: slice) -> np.ndarray:
        # Hashing needs the bytes in order: a skipped or repeated part would give a wrong digest.
        if part.start != self._pos:
            raise UsageError(f"tensor {self.name!r}: read at element {part.start}, expected {self._pos}")
        chunk = self.ckpt.read_elements(self.name, part.start, part.stop - part.start)
        if self._hash is not None:
            self._hash.update(chunk.view(np.uint8))
        self._pos = part.stop
        return chunk

    def digest(self) -> bytes:
        """sha256 of the whole tensor's bytes; every element must have been read."""
        if self._hash is None or self._pos != self.numel:
            raise UsageError(f"tensor {self.name!r}: no digest: {self._pos} of {self.numel} elements hashed")
        return self._hash.digest()


# --- writing ---------------------------------------------------------------------


@dataclass
class _Shard:
    file_name: str
    tensors: list  # the TensorInfo-like objects, in write order
    header: bytes  # 8-byte length + padded JSON
    data_bytes: int


def _plan_shards(tensors: list, max_shard_bytes: int) -> list[list]:
    """Greedy split in the given order; an oversized tensor gets its own shard."""
    groups, size = [[]], 0
    for t in tensors:
        n = _nbytes(t)
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += n
    return groups


def _nbytes(t) -> int:
    return math.prod(t.shape) * dtypes.dtype(t.dtype).itemsize


def _encode_header(tensors: list, metadata: dict[str, str]) -> bytes:
    header, pos = {"__metadata__": metadata}, 0
    for t in tensors:
        n = _nbytes(t)
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # Like the safetensors library: pad with spaces so the data starts 8-aligned.
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise UsageError(f"safetensors header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    return struct.pack("<Q", len(raw)) + raw


def _check_tensor_list(tensors: list) -> None:
    seen = set()
    for t in tensors:
        if not isinstance(t.name, str) or not t.name or t.name == "__metadata__" or t.name in seen:
            raise UsageError(f"tensor name {t.name!r} is empty, reserved or repeated")
        seen.add(t.name)
        if t.dtype not in dtypes.DTYPES:
            raise UsageError(f"tensor {t.name!r}: unknown dtype {t.dtype!r}")
        if not all(_is_int(d) and d >= 0 for d in t.shape):
            raise UsageError(f"tensor {t.name!r}: bad shape {tuple(t.shape)!r}")


class CheckpointWriter:
    """Streams a HF checkpoint directory; it appears at ``out_dir`` only on commit().

    Everything goes to a hidden temporary sibling directory (same filesystem, so
    the final rename is atomic); an exception or abort() removes it, so there is
    never a partial output.  Leaving the ``with`` block normally commits.  The
    directory gets a marker file (``outputs.MARKER``) listing what dcm wrote,
    which is what lets ``overwrite`` replace it later; ``inputs`` ({role: path})
    are what the output must never be, hold or replace (see :mod:`dcm.outputs`).
    """

    def __init__(self, out_dir, tensors: list, metadata: dict[str, str] | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False, inputs=None):
        self.overwrite = overwrite
        _check_tensor_list(tensors)
        if not _is_int(max_shard_bytes) or max_shard_bytes < 1:
            raise UsageError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
        meta = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise UsageError("checkpoint metadata must map strings to strings")
        meta.setdefault("format", "pt")  # transformers refuses files without it
        self._shards = self._make_shards(tensors, meta, max_shard_bytes)
        self._order = [(s, t) for s in self._shards for t in s.tensors]
        self._next = 0  # index into _order of the next tensor to write
        self._file = None
        self._attachments: set[str] = set()
        self._done = True  # until the temporary exists: abort() has nothing to remove
        self.output = Output(out_dir, kind="dir", inputs=inputs, overwrite=overwrite)  # before writing gigabytes
        self.out_dir = Path(self.output.path)
        self._tmp = Path(self.output.temp_dir("write"))
        self._done = False
        with self.output.errors():
            mask = os.umask(0)
            os.umask(mask)
            self._tmp.chmod(0o777 & ~mask)  # mkdtemp makes 0700; the output gets the usual mode

    @staticmethod
    def _make_shards(tensors, meta, max_shard_bytes) -> list[_Shard]:
        groups = _plan_shards(tensors, max_shard_bytes)
        k = len(groups)
        shards = []
        for i, group in enumerate(groups, 1):
            name = SINGLE_FILE if k == 1 else f"model-{i:05d}-of-{k:05d}.safetensors"
            data = sum(map(_nbytes, group))
            shards.append(_Shard(name, group, _encode_header(group, meta), data))
        return shards

    # --- writing ---

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next tensor's bytes now; tensors must come in the planned order."""
        self._check_open()
        if self._next >= len(self._order):
            raise UsageError(f"tensor {name!r}: all {len(self._order)} tensors already written")
        shard, t = self._order[self._next]
        if name != t.name:
            raise UsageError(f"tensor {name!r} written out of order: expected {t.name!r}")
        data = self._as_bytes(t, array)
        with self.output.errors():
            if self._file is None:
                self._file = open(self._tmp / shard.file_name, "xb")
                self._file.write(shard.header)
            self._file.write(data)
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] is not shard:
            self._finish_shard(shard)

    @staticmethod
    def _as_bytes(t, array) -> memoryview:
        array = np.asarray(array)
        itemsize = dtypes.dtype(t.dtype).itemsize
        ok_kind = array.dtype.kind in "biuf"  # not object/str arrays of a matching width
        if not ok_kind or tuple(array.shape) != tuple(t.shape) or array.dtype.itemsize != itemsize:
            raise UsageError(
                f"tensor {t.name!r}: got {array.dtype}{tuple(array.shape)}, "
                f"expected {t.dtype}{tuple(t.shape)} ({itemsize}-byte elements)"
            )
        # safetensors is little-endian; ascontiguousarray copies only when it must.
        flat = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1)
        return memoryview(flat).cast("B")

    def _finish_shard(self, shard: _Shard) -> None:
        f, self._file = self._file, None
        with self.output.errors():
            end = f.tell()
            f.close()
        if end != len(shard.header) + shard.data_bytes:  # a bug, not bad input
            raise AssertionError(f"{shard.file_name}: wrote {end} bytes, planned otherwise")

    def write_attachment(self, relpath: str, data: bytes) -> None:
        """Write a side file (config.json, tokenizer...) into the output directory."""
        self._check_open()
        check_relpath(relpath)
        weights = {s.file_name for s in self._shards} | {INDEX_FILE}
        if relpath in weights or relpath in self._attachments:
            raise UsageError(f"attachment {relpath!r} clashes with a weight file or earlier attachment")
        if relpath == MARKER or any(relpath.startswith(a + "/") or a.startswith(relpath + "/")
                                    for a in self._attachments):
            raise UsageError(f"attachment {relpath!r} clashes with dcm's marker or another attachment's folder")
        target = self._tmp / relpath
        with self.output.errors():
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as f:
                f.write(data)
        self._attachments.add(relpath)

    # --- finishing ---

    def commit(self) -> None:
        """Check that every tensor was written, then move the directory into place."""
        if self._done:
            return
        try:
            if self._next != len(self._order):
                raise UsageError(f"tensor {self._order[self._next][1].name!r} was never written")
            with self.output.errors():
                if len(self._shards) > 1:
                    self._write_index()
                if not self._order:  # no tensors: still write a valid, empty model file
                    (self._tmp / SINGLE_FILE).write_bytes(self._shards[0].header)
                files = [s.file_name for s in self._shards] + ([INDEX_FILE] if len(self._shards) > 1 else [])
                write_marker(self._tmp, files + sorted(self._attachments), f"dcm {__version__}")
            self.output.place(str(self._tmp))
        except BaseException:
            self.abort()
            raise
        self._done = True

    def _write_index(self) -> None:
        index = {
            "metadata": {"total_size": sum(s.data_bytes for s in self._shards)},
            "weight_map": {t.name: s.file_name for s, t in self._order},
        }
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"  # as transformers writes it
        (self._tmp / INDEX_FILE).write_text(text, encoding="utf-8")

    def abort(self) -> None:
        """Discard everything written; idempotent."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # a failed flush (disk full): the file goes away with the directory
                pass
            self._file = None
        if not self._done:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._done = True

    def _check_open(self) -> None:
        if self._done:
            raise UsageError(f"{self.out_dir}: writer already committed or aborted")

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
