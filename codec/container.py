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
import struct
import tempfile
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
    FormatError,
    HeaderChecksumError,
    LayoutError,
    LimitError,
    OutputExistsError,
    PayloadError,
    TrailingDataError,
    TruncatedError,
    UnknownFlagError,
    UnknownKindError,
    UnsupportedVersionError,
    UsageError,
)

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
    exception path to remove every temporary file.
    """

    def __init__(self, path, *, zstd_level: int | None = 3, alignment: int = DEFAULT_ALIGNMENT,
                 overwrite: bool = False):
        self.path = os.fspath(path)
        if os.path.exists(self.path) and not overwrite:
            raise OutputExistsError(f"{self.path} exists (pass overwrite to replace it)")
        self.zstd_level = zstd_level
        self.alignment = alignment
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise UsageError(f"output directory {folder} does not exist")
        self._payload = tempfile.NamedTemporaryFile(dir=folder, prefix=".dcm-payload-", delete=False)
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
        self._payload.write(bytes(offset - self._end))
        self._payload.write(stored)
        self._end = offset + len(stored)
        return {"offset": offset, "length": len(stored), "encoding": encoding,
                "raw_length": raw_length, "crc32": crc}

    @property
    def payload_bytes(self) -> int:
        """Bytes of the data section so far (what ``finish`` copies)."""
        return self._end

    def finish(self, index: dict, index_bytes: bytes, progress=None) -> int:
        """Assemble the file; returns its size in bytes.  ``progress(n)`` is told of each n bytes copied."""
        if len(index_bytes) > MAX_INDEX_BYTES:
            raise LimitError(f"index of {len(index_bytes)} bytes exceeds the limit {MAX_INDEX_BYTES}")
        self._payload.flush()
        any_blob = any(True for _ in iter_blobs(index))
        data_start = align_up(HEADER_SIZE + len(index_bytes), self.alignment)
        file_length = data_start + self._end if any_blob else HEADER_SIZE + len(index_bytes)
        major, minor = index["format"]
        header = Header(major, minor, 0, 0, self.alignment, len(index_bytes), file_length)
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=".dcm-out-")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
            with os.fdopen(fd, "wb") as out:
                out.write(header.pack(index_bytes))
                out.write(index_bytes)
                if any_blob:
                    out.write(bytes(data_start - HEADER_SIZE - len(index_bytes)))
                    out.flush()
                    _copy_file(self._payload.name, out, self._end, progress)
            os.replace(tmp_path, self.path)
        except BaseException:
            _unlink(tmp_path)
            raise
        return file_length

    def close(self):
        self._payload.close()
        _unlink(self._payload.name)

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


class MappedFile:
    """A read-only memory map of a whole .dcm file, with its checked header."""

    def __init__(self, path):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw_header = f.read(HEADER_SIZE)
            self.header = parse_header(raw_header, size)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.raw_header = raw_header

    def index_bytes(self) -> bytes:
        return self._map[HEADER_SIZE : HEADER_SIZE + self.header.index_length]

    def stored(self, blob: dict) -> memoryview:
        """The stored bytes of a blob (a view into the map, nothing copied)."""
        start = self.header.data_start + blob["offset"]
        return memoryview(self._map)[start : start + blob["length"]]

    def padding_is_zero(self, index: dict) -> bool:
        """Padding between index and data and between blobs must be zero (verify checks it)."""
        view, end = memoryview(self._map), HEADER_SIZE + self.header.index_length
        for _, blob in iter_blobs(index):
            start = self.header.data_start + blob["offset"]
            if any(view[end:start]):
                return False
            end = start + blob["length"]
        return True

    def release(self, blob: dict) -> None:
        """Drop a blob's pages from this process (keeps decode RSS near one tensor)."""
        start = (self.header.data_start + blob["offset"]) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self.header.data_start + blob["offset"] + blob["length"]
        if stop > start and hasattr(self._map, "madvise"):
            try:
                self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)
            except (OSError, ValueError):
                pass

    def close(self):
        try:
            self._map.close()
        except BufferError:
            # A caller still holds a view of a raw payload; the map goes with it.
            pass
