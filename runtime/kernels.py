"""Triton kernels that compute y += x·Δ̂ᵀ from the packed bytes (see ``layer.py`` for the tables).

Codes are read from the file's own layout: code i of a ``bits``-bit stream
starts at bit p = i·bits, inside the 16 bits of bytes p//8 and p//8 + 1 (bits ≤ 8,
so a code never spans three bytes).  Two byte loads, a shift by p % 8 < 8 and a
mask: every width 1..8 the spec allows, 3, 5, 6 and 7 included, with no shift
of 32 or more (undefined on the GPU, sign-filling in the interpreter).  Scales
are float16 and zero points ``bits``-bit codes, per (vector, quantization group);
a value is dequantized in registers as (q − z)·s, in float32.

Stages, each one launch for all deltas of a layer (tokens sorted by delta):
- ``shrink``: t[tok, i] = Σ_j x[tok, j]·V̂[i, j], split over j (split-K) with
  float32 atomic adds; one program per (bit group, block of vectors, split).
- ``expand``: y[tok, a] += Σ_i t[tok, i]·S[i]·Û[i, a]; one program per (delta, block
  of outputs), looping over that delta's groups; no atomics.
- ``signs``: y[tok, a] += scale[a]·Σ_j x[tok, j]·(2·bit[a, j] − 1) for BitDelta.

``USE_DOT`` picks ``tl.dot`` on (16 × block) tiles; without it, a GEMV for 1–4 tokens
(broadcast products and ``tl.sum``), which wastes no rows on a single token.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _code(data, offset, index, bits, valid):
    """Codes number ``index`` (int64 tensor) of the ``bits``-bit stream at byte ``offset``."""
    p = index * bits
    at = offset + (p >> 3)
    shift = (p & 7).to(tl.int32)
    lo = tl.load(data + at, mask=valid, other=0).to(tl.int32)
    hi = tl.load(data + at + 1, mask=valid & (shift + bits > 8), other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> shift) & ((1 << bits) - 1)


@triton.jit
def _factor_tile(data, codes, scales, zeros, bits, group_size, vector, element, length, valid):
    """Dequantized values (float32) of ``vector`` × ``element`` of one factor of one bit group."""
    if bits == 16:  # float16 vectors (lowrank records, expanded sparse-lowrank)
        ptr = (data + codes).to(tl.pointer_type(tl.float16))
        value = tl.load(ptr + vector * length + element, mask=valid, other=0.0).to(tl.float32)
    elif bits == 32:  # float32 vectors (expanded sparse-lowrank groups that were quantized)
        ptr = (data + codes).to(tl.pointer_type(tl.float32))
        value = tl.load(ptr + vector * length + element, mask=valid, other=0.0)
    else:
        q = _code(data, codes, vector * length + element, bits, valid)
        groups = (length + group_size - 1) // group_size
        which = vector * groups + element // group_size
        s = tl.load((data + scales).to(tl.pointer_type(tl.float16)) + which, mask=valid, other=0.0)
        z = _code(data, zeros, which, bits, valid)
        value = (q - z).to(tl.float32) * s.to(tl.float32)
    return value


@triton.jit
def _group(row, side: tl.constexpr):
    """(start, count, bits, group_size, codes, scales, zeros) of a group-table row; side 0 = V, 1 = U."""
    at = row + 5 + 3 * side
    return (tl.load(row + 1), tl.load(row + 2), tl.load(row + 3).to(tl.int32), tl.load(row + 4),
            tl.load(at), tl.load(at + 1), tl.load(at + 2))


@triton.jit
def shrink_kernel(x, t, data, groups, work, bounds, n, x_stride, t_stride, n_per_split,
                  BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr,
                  USE_DOT: tl.constexpr):
    w = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.load(work + 2 * w)
    first = tl.load(work + 2 * w + 1)
    row = groups + 12 * g
    d = tl.load(row)
    start, count, bits, group_size, codes, scales, zeros = _group(row, 0)
    lo = tl.load(bounds + 2 * d)
    hi = tl.load(bounds + 2 * d + 1)
    vec = first + tl.arange(0, BLOCK_V).to(tl.int64)
    vec_ok = vec < count
    n_lo = split * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, n)
    for m0 in range(lo, hi, BLOCK_M):
        tok = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        tok_ok = tok < hi
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            j_ok = j < n_hi
            v = _factor_tile(data, codes, scales, zeros, bits, group_size, vec[:, None], j[None, :], n,
                             vec_ok[:, None] & j_ok[None, :])
            xt = tl.load(x + tok[:, None] * x_stride + j[None, :], mask=tok_ok[:, None] & j_ok[None, :],
                         other=0.0).to(tl.float32)
            if USE_DOT:
                acc += tl.dot(xt, tl.trans(v))
            else:
                acc += tl.sum(xt[:, None, :] * v[None, :, :], axis=2)
        tl.atomic_add(t + tok[:, None] * t_stride + (start + vec)[None, :], acc,
                      mask=tok_ok[:, None] & vec_ok[None, :])


@triton.jit
def expand_kernel(t, y, data, groups, delta_groups, bounds, m, t_stride, y_stride,
                  BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_A: tl.constexpr,
                  USE_DOT: tl.constexpr):
    d = tl.program_id(0)
    out = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A).to(tl.int64)
    out_ok = out < m
    lo = tl.load(bounds + 2 * d)
    hi = tl.load(bounds + 2 * d + 1)
    g_first = tl.load(delta_groups + 2 * d)
    g_last = tl.load(delta_groups + 2 * d + 1)
    for m0 in range(lo, hi, BLOCK_M):
        tok = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        tok_ok = tok < hi
        acc = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)
        for g in range(g_first, g_last):
            row = groups + 12 * g
            start, count, bits, group_size, codes, scales, zeros = _group(row, 1)
            s_ptr = (data + tl.load(row + 11)).to(tl.pointer_type(tl.float32))
            for v0 in range(0, count, BLOCK_V):
                vec = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
                vec_ok = vec < count
                s = tl.load(s_ptr + start + vec, mask=vec_ok, other=0.0)
                tt = tl.load(t + tok[:, None] * t_stride + (start + vec)[None, :],
                             mask=tok_ok[:, None] & vec_ok[None, :], other=0.0) * s[None, :]
                u = _factor_tile(data, codes, scales, zeros, bits, group_size, vec[:, None], out[None, :], m,
                                 vec_ok[:, None] & out_ok[None, :])
                if USE_DOT:
                    acc += tl.dot(tt, u)
                else:
                    acc += tl.sum(tt[:, :, None] * u[None, :, :], axis=1)
        ptr = y + tok[:, None] * y_stride + out[None, :]
        ok = tok_ok[:, None] & out_ok[None, :]
        tl.store(ptr, (tl.load(ptr, mask=ok, other=0.0).to(tl.float32) + acc).to(y.dtype.element_ty), mask=ok)


@triton.jit
def sign_kernel(x, y, data, signs, bounds, n, m, x_stride, y_stride,
                BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr):
    d = tl.program_id(0)
    out = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A).to(tl.int64)
    out_ok = out < m
    row = signs + 5 * d
    present = tl.load(row)
    scales = (data + tl.load(row + 1)).to(tl.pointer_type(tl.float32))
    bits_at = tl.load(row + 2)
    rowmap = (data + tl.load(row + 3)).to(tl.pointer_type(tl.int32))
    per_row = tl.load(row + 4)
    lo = tl.load(bounds + 2 * d)
    hi = tl.where(present != 0, tl.load(bounds + 2 * d + 1), lo)  # no sign record: nothing to add
    coded = tl.load(rowmap + out, mask=out < m * present, other=-1).to(tl.int64)  # present: 0 or 1
    scale = tl.load(scales + out * per_row, mask=out_ok & (coded >= 0), other=0.0)
    for m0 in range(lo, hi, BLOCK_M):
        tok = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        tok_ok = tok < hi
        acc = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)
        for n0 in range(0, n, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            j_ok = j < n
            ok = (coded >= 0)[:, None] & j_ok[None, :]
            bit = coded[:, None] * n + j[None, :]
            byte = tl.load(data + bits_at + (bit >> 3), mask=ok, other=0).to(tl.int32)
            sign = tl.where(ok, ((byte >> (bit & 7).to(tl.int32)) & 1) * 2 - 1, 0).to(tl.float32)
            xt = tl.load(x + tok[:, None] * x_stride + j[None, :], mask=tok_ok[:, None] & j_ok[None, :],
                         other=0.0).to(tl.float32)
            if USE_DOT:
                acc += tl.dot(xt, tl.trans(sign))
            else:
                acc += tl.sum(xt[:, None, :] * sign[None, :, :], axis=2)
        ptr = y + tok[:, None] * y_stride + out[None, :]
        ok = tok_ok[:, None] & out_ok[None, :]
        acc = acc * scale[None, :]
        tl.store(ptr, (tl.load(ptr, mask=ok, other=0.0).to(tl.float32) + acc).to(y.dtype.element_ty), mask=ok)
