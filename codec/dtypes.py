"""Tensor element types, named as safetensors names them.

dcm never converts a tensor's values to store it exactly: tensors travel as numpy
arrays of a *storage* dtype of the same width (bf16 and fp8 have no numpy dtype,
so they travel as uint16 / uint8 bit patterns).  ``to_float32`` turns a storage
array into values when a lossy method needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UnknownKindError


@dataclass(frozen=True)
class DType:
    name: str  # safetensors name, also the name stored in .dcm indexes
    storage: np.dtype  # numpy dtype holding the bytes (little-endian)
    is_float: bool

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize


def _d(name, storage, is_float):
    return DType(name, np.dtype(storage).newbyteorder("<"), is_float)


DTYPES = {
    d.name: d
    for d in (
        _d("BOOL", np.uint8, False),
        _d("U8", np.uint8, False),
        _d("I8", np.int8, False),
        _d("U16", np.uint16, False),
        _d("I16", np.int16, False),
        _d("U32", np.uint32, False),
        _d("I32", np.int32, False),
        _d("U64", np.uint64, False),
        _d("I64", np.int64, False),
        _d("F8_E4M3", np.uint8, True),
        _d("F8_E5M2", np.uint8, True),
        _d("F16", np.float16, True),
        _d("BF16", np.uint16, True),
        _d("F32", np.float32, True),
        _d("F64", np.float64, True),
    )
}


def dtype(name: str) -> DType:
    """Look up a dtype by its safetensors name; unknown names raise UnknownKindError."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise UnknownKindError(f"unknown tensor dtype {name!r}") from None


def unsigned_view(array: np.ndarray) -> np.ndarray:
    """The same bytes viewed as unsigned integers of the element's width."""
    return array.view(np.dtype(f"<u{array.dtype.itemsize}"))


def to_float32(array: np.ndarray, dtype_name: str) -> np.ndarray:
    """Values of a storage array as float32, in a new array (bf16 widened exactly; fp8 unsupported)."""
    if dtype_name == "BF16":
        out = array.astype(np.uint32)
        out <<= 16
        return out.view(np.float32)
    if dtype_name in ("F16", "F32", "F64"):
        return array.astype(np.float32)
    raise UnknownKindError(f"cannot take float values of dtype {dtype_name}")


DELTA_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 base at a time


def float32_delta(ft: np.ndarray, base: np.ndarray, dtype_name: str) -> np.ndarray:
    """ft - base in float32, in a new array: the base is widened a slice at a time.

    Widening it whole would hold a second float32 copy of the tensor (0.5 GB for a
    7B model's embedding) beside the result.
    """
    delta = np.ascontiguousarray(to_float32(ft, dtype_name))  # so that the flat view below is one
    flat, base_flat = delta.reshape(-1), base.reshape(-1)
    for start in range(0, flat.size, DELTA_CHUNK_ELEMENTS):
        stop = start + DELTA_CHUNK_ELEMENTS
        flat[start:stop] -= to_float32(base_flat[start:stop], dtype_name)
    return delta


def from_float32(values: np.ndarray, dtype_name: str) -> np.ndarray:
    """float32 values rounded to nearest-even into a storage array of ``dtype_name``."""
    values = np.asarray(values, dtype=np.float32)
    if dtype_name == "BF16":
        bits = values.view(np.uint32)
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
        # A NaN must stay a NaN: rounding could carry its payload into the infinity pattern.
        return np.where(np.isnan(values), np.uint16(0x7FC0), rounded.astype(np.uint16))
    if dtype_name in ("F16", "F32", "F64"):
        with np.errstate(over="ignore"):
            return values.astype(DTYPES[dtype_name].storage)
    raise UnknownKindError(f"cannot store float values as dtype {dtype_name}")
