"""What a file is, from its first bytes and its name: so a wrong input is named for what it is.

A ``config.json`` given as a checkpoint should say "a JSON file", not report
the safetensors header length its first 8 bytes happen to spell.
"""

from __future__ import annotations

import os
import struct

from .constants import MAGIC

HEAD_BYTES = 64  # enough for every signature below
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CONVERT = "pickle checkpoints (.bin, .pt) are not read: convert to safetensors " \
           "(transformers: save_pretrained(..., safe_serialization=True))"


def read_head(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(HEAD_BYTES)
    except OSError:
        return b""


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= 100 * 2**20 and head[8:9] == b"{"


def kind(head: bytes, name: str = "") -> str | None:
    """A short name for the file's format ("dcm", "safetensors", "pickle", "json"...), or None."""
    name = os.path.basename(str(name)).lower()
    if not head:
        return "empty"
    if head.startswith(MAGIC):
        return "dcm"
    if _looks_like_safetensors(head):
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
        return "pickle"
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if name.endswith(PICKLE_SUFFIXES):
        return "pickle"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return None


_NAMES = {
    "empty": "an empty file",
    "dcm": "a .dcm file",
    "safetensors": "a safetensors file",
    "pickle": "a pickle checkpoint (PyTorch .bin/.pt)",
    "gguf": "a GGUF file",
    "hdf5": "an HDF5 file (Keras .h5)",
    "json": "a JSON file",
}


def what_file_is(head: bytes, name: str = "") -> str:
    """'a safetensors file', 'a JSON file'... or 'bad magic bytes' when nothing is recognised."""
    found = kind(head, name)
    return f"bad magic bytes ({_NAMES[found]})" if found else "bad magic bytes"


def not_a_checkpoint(head: bytes, name: str = "") -> str | None:
    """Why a file given as a checkpoint is not a safetensors file, when its kind says it; else None."""
    found = kind(head, name)
    if found == "dcm":
        return "a .dcm file, not a checkpoint (give the model directory or its .safetensors file)"
    if found == "pickle":
        return _CONVERT
    if found == "json":
        return "a JSON file, not a checkpoint (give the model directory that holds it)"
    if found in ("gguf", "hdf5"):
        return f"{_NAMES[found]}, not a safetensors checkpoint"
    return None


def pickle_only_directory(names) -> str | None:
    """The message for a model directory that holds pickle weights but no safetensors."""
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES) or n.endswith(".bin.index.json"))
    if not pickles:
        return None
    return f"it holds {', '.join(pickles[:3])} but no safetensors weights: {_CONVERT}"
