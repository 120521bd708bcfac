"""Which part of a packed delta one tensor-parallel rank computes, and computing it.

A delta Δ̂ = Û·diag(S)·V̂ᵀ of a weight W (m out × n in) is kept whole on every rank:
packed deltas are small next to the base shard, and a quantization group of Û or V̂
does not end where a shard does, so cutting the bytes would mean re-packing.  What
differs per rank is which rows and columns of x·Δ̂ᵀ it owns:

- column-parallel layers (``ColumnParallelLinear``, fused ``qkv_proj`` / ``gate_up_proj``)
  split the *outputs* m: the rank owns some rows of Û's side.  It computes x·Δ̂ᵀ for the
  full m and keeps its rows (``rows``);
- row-parallel layers (``RowParallelLinear``: ``o_proj``, ``down_proj``) split the *inputs*
  n: the rank holds x[:, cols] only.  Its share x[:, cols]·V̂[:, cols]ᵀ·S·Û is computed by
  placing x in its columns of a zero input of width n; the layer's all-reduce, which
  follows ``apply``, sums the ranks' shares into x·Δ̂ᵀ (the delta is linear in x);
- a fused layer holds several records (q, k, v), each one a ``ShardPlan`` at its offset
  in the layer's output.

The cost of doing it this way is the full shrink (and for column-parallel the full
expand) on every rank: TP-fold redundant delta work, correct by construction.  A
kernel taking the output range would remove it; the plan's ``rows`` are what it needs.
Rows and columns are index tensors (None: all), so that vLLM's layouts (GQA heads
replicated over ranks, a fused checkpoint tensor split in three) are all one case.

``kernel_for`` picks the kernel (the runtime's Triton or torch backend); nothing here
imports vLLM, so the main suite checks the shares without it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from dcm.errors import UsageError

BACKENDS = ("auto", "torch", "triton")


@dataclass
class ShardPlan:
    """Where one record's x·Δ̂ᵀ goes in a layer's output on this rank."""

    offset: int  # first output column of the layer's (per-rank) output that this record feeds
    rows: torch.Tensor | None  # rows of the record's m that this rank owns, in order (None: all m)
    cols: torch.Tensor | None  # columns of the record's n that this rank's input holds (None: all n)

    def width(self, m: int) -> int:
        return m if self.rows is None else int(self.rows.numel())


def _span(start: int, size: int) -> torch.Tensor:
    return torch.arange(start, start + size, dtype=torch.int64)


def column_rows(full: int, tp_rank: int, tp_size: int, replicas: int = 1) -> torch.Tensor | None:
    """Rows of a column-parallel weight of ``full`` outputs held by ``tp_rank``; ``replicas``
    ranks share one slice (vLLM's KV heads when tp_size exceeds their count)."""
    if tp_size == 1:
        return None
    parts = tp_size // replicas
    if full % parts:
        raise ValueError(f"{full} outputs do not split evenly over {parts} ranks")
    size = full // parts
    return _span((tp_rank // replicas) * size, size)


def row_cols(full: int, tp_rank: int, tp_size: int) -> torch.Tensor | None:
    """Columns (inputs) of a row-parallel weight of ``full`` inputs held by ``tp_rank``."""
    if tp_size == 1:
        return None
    if full % tp_size:
        raise ValueError(f"{full} inputs do not split evenly over {tp_size} ranks")
    size = full // tp_size
    return _span(tp_rank * size, size)


def apply_planned(kernel, pack, plan: ShardPlan, x: torch.Tensor, y: torch.Tensor, segments) -> None:
    """y[:, plan.offset : plan.offset + width] += this rank's share of x·Δ̂ᵀ (x, y: 2-D, tokens first)."""
    m, n = pack.shape
    out = y[:, plan.offset:plan.offset + plan.width(m)]
    if plan.cols is not None:
        full_x = x.new_zeros((x.shape[0], n))
        full_x[:, plan.cols.to(x.device)] = x
        x = full_x
    if plan.rows is None:
        kernel(pack, x, segments, out)
        return
    full = torch.zeros((x.shape[0], m), dtype=torch.float32, device=y.device)
    kernel(pack, x, segments, full)
    out += full[:, plan.rows.to(y.device)].to(out.dtype)


def kernel_for(backend: str, device: torch.device):
    """dcm's y += x·Δ̂ᵀ for one layer: Triton on CUDA, the torch backend elsewhere ("auto"); the
    runtime's rotation wrapper around it serves lowrank-rotated records (activations rotated,
    the stored bytes as they are).  A row-parallel share is computed on a zero-padded
    full-width input (``apply_planned``), so the rotation sees the layer's whole input."""
    if backend not in BACKENDS:
        raise UsageError(f"dcm backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("the triton backend needs a CUDA device, or TRITON_INTERPRET=1 on the CPU")
        from dcm.runtime import triton_backend as backend_module
    else:
        from dcm.runtime import torch_backend as backend_module
    from dcm.runtime import rotation

    return functools.partial(rotation.apply, backend_module.apply)
