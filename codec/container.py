"""The .dcm container: fixed header, msgpack index, aligned payloads.

File = 64-byte header | index (msgpack) | zero padding to the alignment |
data section.  Blob offsets are relative to the data section, which starts at
``align_up(64 + index_length)``: the writer streams payloads to a side file
before it knows how long the index will be, then assembles the final file (a
kernel-side copy) and renames it into place, so an interrupted write never
leaves a partial output.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import threading
from dataclasses import dataclass

from . import blobs
from .constants import (
    DEFAULT_ALIGNMENT,
    Encoding,
    HEADER_CRC_OFFSET,
    HEADER_SIZE,
    KNOWN_REQUIRED_FLAGS,
    MAGIC,
    MAX_ALIGNMENT,
    MAX_INDEX_BYTES,
    MIN_ALIGNMENT,
    VERSION_MAJOR,
)
from .errors import (
    BadMagicError,
    ClosedFileError,
    FormatError,
    HeaderChecksumError,
    InputChangedError,
    InputError,
    LayoutError,
    LimitError,
    PayloadError,
    TrailingDataError,
    TruncatedError,
    UnknownFlagError,
    UnknownKindError,
    UnsupportedVersionError,
)
from .outputs import Output
from .sniff import what_file_is

_MAP_READS_FROM = 1 << 20  # bytes: larger reads go to an anonymous memory map

# magic, major, minor, required flags, optional flags, alignment, index length,
# file length, 20 reserved bytes, CRC-32 (spec section "Header").
HEADER = struct.Struct("<8sHHIIIQQ20sI")
assert HEADER.size == HEADER_SIZE


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class Header:
    major: int
    minor: int
    required_flags: int
    optional_flags: int
    alignment: int
    index_length: int
    file_length: int

    @property
    def data_start(self) -> int:
        return align_up(HEADER_SIZE + self.index_length, self.alignment)

    def pack(self, index_bytes: bytes) -> bytes:
        fields = (MAGIC, self.major, self.minor, self.required_flags, self.optional_flags,
                  self.alignment, self.index_length, self.file_length, bytes(20))
        head = HEADER.pack(*fields, 0)[:HEADER_CRC_OFFSET]
        crc = blobs.crc32(head + index_bytes)
        return head + struct.pack("<I", crc)


def parse_header(raw: bytes, actual_size: int) -> Header:
    """Check the fixed header in the order the spec gives; the CRC is checked later, with the index."""
    if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        raise BadMagicError("not a .dcm file: bad magic bytes")
    if len(raw) < HEADER_SIZE:
        raise TruncatedError(f"file is {actual_size} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, major, minor, req, opt, alignment, index_len, file_len, reserved, _ = HEADER.unpack(raw)
    if major != VERSION_MAJOR:
        raise UnsupportedVersionError(
            f"file is format version {major}.{minor}; this reader implements {VERSION_MAJOR}.x"
        )
    if req & ~KNOWN_REQUIRED_FLAGS:
        raise UnknownFlagError(f"unknown required flag bits 0x{req & ~KNOWN_REQUIRED_FLAGS:08x}")
    if reserved != bytes(20):
        raise FormatError("header bytes 40..59 are reserved and must be zero")
    if alignment & (alignment - 1) or not MIN_ALIGNMENT <= alignment <= MAX_ALIGNMENT:
        raise LayoutError(f"alignment {alignment} is not a power of two in {MIN_ALIGNMENT}..{MAX_ALIGNMENT}")
    if index_len > MAX_INDEX_BYTES:
        raise LimitError(f"index of {index_len} bytes exceeds the limit {MAX_INDEX_BYTES}")
    if actual_size < file_len:
        raise TruncatedError(f"file is {actual_size} bytes, its header says {file_len}")
    if actual_size > file_len:
        raise TrailingDataError(f"file is {actual_size} bytes, {actual_size - file_len} after the declared end")
    if HEADER_SIZE + index_len > file_len:
        raise TruncatedError(f"index of {index_len} bytes runs past the end of the file")
    return Header(major, minor, req, opt, alignment, index_len, file_len)


def check_header_crc(raw_header: bytes, index_bytes: bytes) -> None:
    stored = struct.unpack_from("<I", raw_header, HEADER_CRC_OFFSET)[0]
    if blobs.crc32(raw_header[:HEADER_CRC_OFFSET] + index_bytes) != stored:
        raise HeaderChecksumError("CRC-32 over the header and the index does not match")


def iter_blobs(index: dict):
    """Every blob in file order, with a name for error messages."""
    for i, rec in enumerate(index["tensors"]):
        for j, blob in enumerate(rec["blobs"]):
            yield f"tensor {rec['name']!r} blob {j}", blob
    for att in index.get("attachments", []):
        yield f"attachment {att['name']!r}", att["blob"]


def check_layout(index: dict, header: Header) -> None:
    """Blobs are aligned, in order, packed (offset = previous end rounded up) and end the file."""
    end, any_blob = 0, False
    for where, blob in iter_blobs(index):
        expected = align_up(end, header.alignment)
        if blob["offset"] != expected:
            raise LayoutError(f"{where}: offset {blob['offset']}, expected {expected} "
                              f"(aligned, in order, no gaps or overlaps)")
        end = blob["offset"] + blob["length"]
        if header.data_start + end > header.file_length:
            raise LayoutError(f"{where}: payload ends at {header.data_start + end}, past the "
                              f"file's end {header.file_length}")
        any_blob = True
    file_end = header.data_start + end if any_blob else HEADER_SIZE + header.index_length
    if file_end != header.file_length:
        raise LayoutError(f"payloads end at {file_end}, the file at {header.file_length}")
    for where, blob in iter_blobs(index):  # what the index alone tells of each blob
        if blob["encoding"] not in set(Encoding):
            raise UnknownKindError(f"{where}: unknown blob encoding {blob['encoding']}")
        if blob["encoding"] == Encoding.RAW and blob["length"] != blob["raw_length"]:
            raise PayloadError(f"{where}: raw blob of {blob['length']} bytes, record says {blob['raw_length']}")


# --- writing ----------------------------------------------------------------------


class ContainerWriter:
    """Streams blobs to a side file, then writes header + index + blobs atomically.

    Use as a context manager; ``finish(index)`` completes the file, leaving the
    exception path to remove every temporary file.  ``inputs`` ({role: path})
    are the files the output must never be or replace (see :mod:`dcm.outputs`).
    """

    def __init__(self, path, *, zstd_level: int | None = 3, alignment: int = DEFAULT_ALIGNMENT,
                 overwrite: bool = False, inputs=None):
        self.output = Output(path, kind="file", inputs=inputs, overwrite=overwrite)
        self.path = self.output.given
        self.zstd_level = zstd_level
        self.alignment = alignment
        fd, self._payload_path = self.output.temp_file("payload")
        self._payload = os.fdopen(fd, "w+b")
        self._end = 0

    def add_blob(self, raw, *, compress: bool = True) -> dict:
        """Append one blob (zstd when that is smaller); return its index entry."""
        raw = memoryview(raw).cast("B")
        encoding, stored = blobs.encode(raw, self.zstd_level if compress else None)
        return self._append(int(encoding), stored, len(raw), blobs.crc32(stored))

    def add_stored(self, blob) -> dict:
        """Append a blob a worker already encoded (``jobs.StoredBlob``); return its index entry."""
        return self._append(blob.encoding, blob.data, blob.raw_length, blob.crc32)

    def _append(self, encoding: int, stored, raw_length: int, crc: int) -> dict:
        offset = align_up(self._end, self.alignment)
        with self.output.errors():
            self._payload.write(bytes(offset - self._end))
            self._payload.write(stored)
        self._end = offset + len(stored)
        return {"offset": offset, "length": len(stored), "encoding": encoding,
                "raw_length": raw_length, "crc32": crc}

    @property
    def payload_bytes(self) -> int:
        """Bytes of the data section so far (what ``finish`` copies)."""
        return self._end

    def file_length(self, index: dict, index_bytes: bytes) -> int:
        """The size ``finish(index, index_bytes)`` will give the file."""
        if not any(True for _ in iter_blobs(index)):
            return HEADER_SIZE + len(index_bytes)
        return align_up(HEADER_SIZE + len(index_bytes), self.alignment) + self._end

    def finish(self, index: dict, index_bytes: bytes, progress=None) -> int:
        """Assemble the file; returns its size in bytes.  ``progress(n)`` is told of each n bytes copied."""
        if len(index_bytes) > MAX_INDEX_BYTES:
            raise LimitError(f"index of {len(index_bytes)} bytes exceeds the limit {MAX_INDEX_BYTES}")
        any_blob = any(True for _ in iter_blobs(index))
        data_start = align_up(HEADER_SIZE + len(index_bytes), self.alignment)
        file_length = self.file_length(index, index_bytes)
        major, minor = index["format"]
        header = Header(major, minor, 0, 0, self.alignment, len(index_bytes), file_length)
        with self.output.errors():
            self._payload.flush()
            fd, tmp_path = self.output.temp_file("out")
        try:
            with self.output.errors():
                os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
                with os.fdopen(fd, "wb") as out:
                    out.write(header.pack(index_bytes))
                    out.write(index_bytes)
                    if any_blob:
                        out.write(bytes(data_start - HEADER_SIZE - len(index_bytes)))
                        out.flush()
                        _copy_file(self._payload_path, out, self._end, progress)
            self.output.place(tmp_path)
        except BaseException:
            _unlink(tmp_path)
            raise
        return file_length

    def close(self):
        try:
            self._payload.close()
        except OSError:  # a failed flush (disk full): the file is removed all the same
            pass
        finally:
            _unlink(self._payload_path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_COPY_STEP = 1 << 28  # bytes per copy_file_range call: progress between calls


def _copy_file(src_path: str, dst, length: int, progress=None) -> None:
    """Append ``length`` bytes of src to dst, in the kernel where it can."""
    progress = progress or (lambda n: None)
    with open(src_path, "rb") as src:
        copied = 0
        try:
            while copied < length:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(length - copied, _COPY_STEP))
                if n == 0:
                    break
                copied += n
                progress(n)
        except (OSError, AttributeError):
            src.seek(copied)
            dst.seek(0, os.SEEK_END)
            while copied < length:
                chunk = src.read(min(1 << 24, length - copied))
                if not chunk:
                    break
                dst.write(chunk)
                copied += len(chunk)
                progress(len(chunk))
    if copied != length:
        raise OSError(f"short copy of payloads: {copied} of {length} bytes")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- reading ----------------------------------------------------------------------


class ContainerFile:
    """A .dcm file opened for reading, with its checked header.

    Read with ``pread`` into fresh buffers, not memory-mapped: a mapped file
    that is truncated or rewritten while it is read kills the process with
    SIGBUS, where a read returns short or different bytes that dcm reports.
    Every read also checks that the file's size and modification time are
    still those it had when opened (InputChangedError), and a closed file
    raises ClosedFileError, also when one thread closes it while others read
    (the descriptor is closed only when the last read returns).
    """

    def __init__(self, path):
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise InputError(f"a .dcm path must be a str or os.PathLike, got {type(path).__name__}")
        self.path = os.fsdecode(os.fspath(path))
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise InputError(f"{self.path}: cannot open: {e.strerror}") from e
        self._fd, self._users, self._closed = fd, 0, False
        self._lock = threading.Lock()
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise InputError(f"{self.path}: is a directory, not a .dcm file")
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{self.path}: is not a regular file (dcm reads .dcm files by offset)")
            self._stamp = (st.st_size, st.st_mtime_ns)
            raw_header = self.read(0, min(HEADER_SIZE, st.st_size))
            if raw_header[: len(MAGIC)] != MAGIC:
                raise BadMagicError(f"not a .dcm file: {what_file_is(raw_header, self.path)}")
            self.header = parse_header(raw_header, st.st_size)
        except BaseException:
            self.close()
            raise
        self.raw_header = raw_header

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; the file must not have changed since it was opened."""
        with self._lock:
            if self._closed:
                raise ClosedFileError(f"{self.path}: the file is closed")
            self._users += 1
            fd = self._fd
        try:
            self._check_unchanged(fd)
            # A large read goes to an anonymous map, given back to the system as soon as it is
            # dropped (a malloc'ed buffer of that size can stay resident in a fragmented heap).
            buf = bytearray(length) if length < _MAP_READS_FROM else mmap.mmap(-1, length)
            view, got = memoryview(buf), 0
            while got < length:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n <= 0:
                    raise InputChangedError(f"{self.path}: the file changed while dcm was reading it "
                                            f"(it ends before byte {offset + length})")
                got += n
            self._check_unchanged(fd)
            return bytes(buf) if length < _MAP_READS_FROM else view
        except OSError as e:
            raise InputError(f"{self.path}: cannot read: {e.strerror}") from e
        finally:
            with self._lock:
                self._users -= 1
                if self._closed and self._users == 0 and self._fd is not None:
                    os.close(self._fd)
                    self._fd = None

    def _check_unchanged(self, fd: int) -> None:
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise InputChangedError(
                f"{self.path}: the file changed while dcm was reading it (size {self._stamp[0]} -> "
                f"{st.st_size} bytes, or modified); replace a file by renaming a new one into place")

    def index_bytes(self) -> bytes:
        return bytes(self.read(HEADER_SIZE, self.header.index_length))

    def stored(self, blob: dict):
        """The stored bytes of a blob, read fresh (bytes, or a memoryview of a private map when large)."""
        return self.read(self.header.data_start + blob["offset"], blob["length"])

    def padding_is_zero(self, index: dict) -> bool:
        """Padding between index and data and between blobs must be zero (verify checks it)."""
        end = HEADER_SIZE + self.header.index_length
        for _, blob in iter_blobs(index):
            start = self.header.data_start + blob["offset"]
            if start > end and any(self.read(end, start - end)):
                return False
            end = start + blob["length"]
        return True

    def close(self):
        """Idempotent; reads in flight in other threads finish first, later ones raise ClosedFileError."""
        with self._lock:
            self._closed = True
            if self._users == 0 and self._fd is not None:
                os.close(self._fd)
                self._fd = None
