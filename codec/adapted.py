"""Encoding tensors whose base differs in dtype or rows: the ``adapted`` record (spec 10.13).

A fine-tune saved in another float dtype than its base (trained in float32,
shipped in bfloat16), or with more rows than its base (tokens added before
fine-tuning: a longer embedding and lm_head), is coded against the *adapted
base*: the base tensor cast to the fine-tune's dtype.  The base's rows get any
record kind that reads a base (the method's lossy kind when it selects that
matrix, else an exact ``dense-delta``); the rows the base lacks are stored
whole.  ``records.Adapted`` reads such records; this module makes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checkpoint import TensorInfo
from .constants import DEFAULT_ALIGNMENT, Kind, Layout
from .index import packed_len
from .records import Adapted, DenseDelta, adaptable, cast

WORST_OFFSET = 2**64 - 1


@dataclass(frozen=True)
class InnerInfo(TensorInfo):
    """What a lossy method plans for an adapted tensor: the base's rows in the fine-tune's dtype.

    ``overhead``: the index bytes the adapted wrapper adds to the inner record's entry,
    which the method's file budget reserves (``methods.budget.total_budget``).
    """

    overhead: int = 0


def applies(ft_info, base_info) -> bool:
    """Whether ``ft_info``'s tensor is coded as an ``adapted`` record against ``base_info``'s."""
    return base_info is not None and (ft_info.dtype, tuple(ft_info.shape)) != (base_info.dtype, tuple(base_info.shape)) \
        and adaptable(base_info.dtype, base_info.shape, ft_info.dtype, ft_info.shape)


def inner_info(ft_info, base_info) -> InnerInfo:
    """The matrix a method codes for an adapted tensor: the base's shape, the fine-tune's dtype."""
    shape = tuple(base_info.shape)
    itemsize = ft_info.nbytes // max(int(np.prod(ft_info.shape, dtype=np.int64)), 1)
    return InnerInfo(ft_info.name, ft_info.dtype, shape, int(np.prod(shape, dtype=np.int64)) * itemsize,
                     overhead=wrapper_overhead(ft_info, base_info))


def split(ft: np.ndarray, base: np.ndarray, ft_dtype: str, base_dtype: str):
    """(the fine-tune's rows the base has, the adapted base, the new rows or None): storage arrays."""
    rows = base.shape[0] if base.ndim else None
    shared = ft if rows is None or rows == ft.shape[0] else ft[:rows]
    new = None if rows is None or rows == ft.shape[0] else ft[rows:]
    return shared, cast(base, base_dtype, ft_dtype), new


def encode(method, name: str, ft: np.ndarray, base: np.ndarray, ft_dtype: str, base_dtype: str,
           plan=None) -> tuple:
    """(Kind.ADAPTED, params, raws) of a fine-tuned tensor against a base of another dtype or fewer rows;
    ``plan``: the method's plan of the inner matrix (``coverage.planned`` lists it as an ``InnerInfo``)."""
    shared, adapted_base, new = split(ft, base, ft_dtype, base_dtype)
    coded = None
    if method.wants_tensor(name, ft_dtype, shared.shape):
        coded = method.encode_tensor(name, shared, adapted_base, ft_dtype, plan)
    if coded is None:
        coded = (Kind.DENSE_DELTA, *DenseDelta.encode(shared, adapted_base))
    kind, params, raws = coded
    params, raws = Adapted.encode(kind, params, raws, new)
    return Kind.ADAPTED, params, raws


def wrapper_overhead(ft_info, base_info) -> int:
    """Index bytes an adapted record's entry takes beyond its inner record's (an upper bound).

    The new rows' blobs are exact storage, not the method's: their entries are
    counted here all the same (a few dozen bytes), since they sit in the record's
    index entry, which ``dcm info`` charges to the lossy records.
    """
    width = ft_info.nbytes // max(int(np.prod(ft_info.shape, dtype=np.int64)), 1)
    new_rows = ft_info.shape[0] - base_info.shape[0] if ft_info.shape else 0
    new_blobs = 0 if not new_rows else (1 if new_rows * width * int(np.prod(ft_info.shape[1:], dtype=np.int64))
                                       < 4096 else width)
    blob = {"offset": WORST_OFFSET, "length": WORST_OFFSET, "encoding": 1, "raw_length": WORST_OFFSET,
            "crc32": 2**32 - 1}
    inner_params = {"k": 0}
    plain = {"name": ft_info.name, "kind": 4, "dtype": ft_info.dtype, "shape": list(base_info.shape),
             "params": inner_params, "blobs": [blob],
             "base": {"dtype": ft_info.dtype, "shape": list(base_info.shape), "sha256": bytes(32)}}
    wrapped = {"name": ft_info.name, "kind": int(Kind.ADAPTED), "dtype": ft_info.dtype, "shape": list(ft_info.shape),
               "params": {"inner": 4, "layout": int(Layout.BYTE_PLANES), "inner_params": inner_params},
               "blobs": [blob] * (1 + new_blobs),
               "base": {"dtype": base_info.dtype, "shape": list(base_info.shape), "sha256": bytes(32)}}
    # + the padding before the new rows' blobs, and a few bytes for msgpack headers that may widen
    return packed_len(wrapped) - packed_len(plain) + (DEFAULT_ALIGNMENT - 1) * new_blobs + 8
