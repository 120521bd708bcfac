"""Blobs made of sections that start at 4-byte boundaries, zero bytes between (spec 10.7, 10.9–10.12).

A kind lists its sections as (name, bytes) in order; ``layout`` places them,
``join`` writes a blob from their bytes, ``split`` reads them back, checking
the padding and the blob's length.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PayloadError

ALIGN = 4


def align4(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Section:
    name: str
    offset: int
    nbytes: int


def layout(parts) -> list[Section]:
    """Sections for ``parts``, an iterable of (name, nbytes), each at the next multiple of 4."""
    out, offset = [], 0
    for name, nbytes in parts:
        offset = align4(offset)
        out.append(Section(name, offset, nbytes))
        offset += nbytes
    return out


def size(secs: list[Section]) -> int:
    return secs[-1].offset + secs[-1].nbytes if secs else 0


def join(secs: list[Section], data: dict) -> bytes:
    out = bytearray(size(secs))
    for sec in secs:
        chunk = data[sec.name]
        if len(chunk) != sec.nbytes:
            raise AssertionError(f"section {sec.name}: {len(chunk)} bytes, layout says {sec.nbytes}")
        out[sec.offset:sec.offset + sec.nbytes] = chunk
    return bytes(out)


def split(raw, secs: list[Section], where: str) -> dict:
    """{name: memoryview} of every section; PayloadError on non-zero padding or a wrong length."""
    buf = memoryview(raw)
    end = 0
    for sec in secs:
        if any(buf[end:sec.offset]):
            raise PayloadError(f"{where}: padding before section {sec.name} is not zero")
        end = sec.offset + sec.nbytes
    if len(buf) != end:
        raise PayloadError(f"{where}: blob of {len(buf)} bytes, the layout needs {end}")
    return {sec.name: buf[sec.offset:sec.offset + sec.nbytes] for sec in secs}
