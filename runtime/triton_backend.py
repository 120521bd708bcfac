"""Launching the Triton kernels (``kernels.py``) for one layer: three launches at most, all deltas in each.

Block sizes: a GEMV for 1–4 tokens per delta (BLOCK_M the next power of two, no
``tl.dot``), ``tl.dot`` tiles of 16 tokens above.  The shrink stage splits the
reduction over n so that a layer's few hundred singular vectors still fill the
GPU at one token (the notes' split-K), adding its parts with float32 atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import kernels
from .layer import LayerPack, Segments

GEMV_MAX_TOKENS = 4


@dataclass(frozen=True)
class Blocks:
    """Tile sizes; ``target_programs``: shrink programs to aim at when splitting the reduction."""

    vectors: int = 16  # BLOCK_V: singular vectors per tile
    reduce: int = 64  # BLOCK_N with tl.dot (the GEMV path takes twice as many)
    outputs: int = 64  # BLOCK_A: output features per expand / signs program
    target_programs: int = 512  # a few per SM of an H100 (132 SMs)


GPU_BLOCKS = Blocks()
# The interpreter runs programs one after another, each op a numpy call: fewer, larger
# tiles are ~10x faster there.  Tests run both, since tile edges are where bugs hide.
INTERPRETER_BLOCKS = Blocks(vectors=64, reduce=256, outputs=256, target_programs=1)


def default_blocks(device) -> Blocks:
    return GPU_BLOCKS if torch.device(device).type == "cuda" else INTERPRETER_BLOCKS


def _rows(max_tokens: int) -> tuple[int, bool]:
    """(BLOCK_M, use tl.dot): a GEMV of the next power of two rows for 1–4 tokens, 16-row tiles above."""
    if max_tokens <= GEMV_MAX_TOKENS:
        return triton.next_power_of_2(max(max_tokens, 1)), False
    return 16, True


def apply(pack: LayerPack, x, seg: Segments, y, blocks: Blocks | None = None) -> None:
    """y += x·Δ̂_dᵀ for the tokens of every delta d (x, y: (tokens, features), sorted by delta)."""
    m, n = pack.shape
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y need contiguous rows")
    blocks = blocks or default_blocks(x.device)
    block_m, use_dot = _rows(seg.max_tokens)
    block_n = blocks.reduce if use_dot else 2 * blocks.reduce
    bounds = seg.bounds.to(device=x.device, dtype=pack.groups.dtype).contiguous()
    if pack.factors and seg.max_tokens:
        _factors(pack, x, bounds, y, blocks, block_m, block_n, use_dot)
    if pack.sign_recs and seg.max_tokens:
        grid = (pack.num_deltas, triton.cdiv(m, blocks.outputs))
        kernels.sign_kernel[grid](x, y, pack.data, pack.signs, bounds, n, m, x.stride(0), y.stride(0),
                                  BLOCK_M=block_m, BLOCK_A=blocks.outputs, BLOCK_N=block_n, USE_DOT=use_dot)
    for d, delta in pack.dense.items():
        lo, hi = seg.span(d)
        if lo < hi:
            y[lo:hi] += (x[lo:hi].to(delta.dtype) @ delta.T).to(y.dtype)


def _factors(pack, x, bounds, y, blocks, block_m, block_n, use_dot):
    m, n = pack.shape
    block_v = blocks.vectors
    work = pack.work(block_v)
    splits = max(1, min(triton.cdiv(n, block_n), triton.cdiv(blocks.target_programs, max(work.shape[0], 1))))
    per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, per_split)
    t = torch.zeros((x.shape[0], pack.max_rank), dtype=torch.float32, device=x.device)
    kernels.shrink_kernel[(work.shape[0], splits)](
        x, t, pack.data, pack.groups, work, bounds, n, x.stride(0), t.stride(0), per_split,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_N=block_n, USE_DOT=use_dot)
    kernels.expand_kernel[(pack.num_deltas, triton.cdiv(m, blocks.outputs))](
        t, y, pack.data, pack.groups, pack.delta_groups, bounds, m, t.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_A=blocks.outputs, USE_DOT=use_dot)
