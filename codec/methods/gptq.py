"""GPTQ for the factors of a low-rank delta (Frantar et al. 2022, adapted to bit groups).

The delta's contribution to a layer's output is y = x·Δᵀ = ((x·Vᵀ)·diag(S))·Uᵀ
for vector-major factors V (k, n) and U (k, m).  GPTQ quantizes one input
dimension at a time and spreads each rounding error over the dimensions not yet
quantized, weighted by the inverse of the input Hessian H = E[xᵀx]:

- V (``quantize_rows``): the "layer" is Vᵀ with input x, so its columns are the
  n elements of every vector at once; each vector (row) has its own bit width,
  and quantization groups run along the row, as GPTQ's usual group size does.
- U (``quantize_columns``): the "layer" is U with input t = x·V̂ᵀ·diag(S), whose
  Hessian is diag(S)·V̂·H·V̂ᵀ·diag(S); its columns are whole singular vectors,
  quantized in order (8-bit ones first), groups running along each vector.

No act-order: the column order is fixed (V: natural, U: the file's order).
"""

from __future__ import annotations

import numpy as np

from .. import quant


def _minmax(x, bits, group_size, weights=None):
    return quant.fit(x, bits, group_size)


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp·mean(diag H): GPTQ's error weights."""
    h = np.array(h, dtype=np.float64)
    n = h.shape[0]
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    lam = damp * float(np.mean(np.diag(h)))
    h[np.diag_indices(n)] += lam
    while True:  # a Hessian from few tokens may be singular even with damping: damp more
        try:
            return _upper_inverse_factor(h)
        except np.linalg.LinAlgError:
            h[np.diag_indices(n)] += max(lam, 1e-8)
            lam *= 10


def _upper_inverse_factor(h: np.ndarray) -> np.ndarray:
    """chol((H)⁻¹)ᵀ, upper; LinAlgError if H is not positive definite.  torch's LAPACK when present
    (several times faster than numpy's on the matrices here), numpy otherwise."""
    try:
        import torch
    except ImportError:
        inv = np.linalg.inv(np.linalg.cholesky(h))
        return np.linalg.cholesky(inv.T @ inv).T
    low, info = torch.linalg.cholesky_ex(torch.from_numpy(h))
    if info.item() == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
        if info.item() == 0:
            return upper.numpy()
    raise np.linalg.LinAlgError("not positive definite")


def damped(h: np.ndarray, damp: float) -> np.ndarray:
    h = np.array(h, dtype=np.float64)
    h[np.diag_indices(h.shape[0])] += damp * float(np.mean(np.diag(h))) + 1e-12
    return h


def quantize_rows(w: np.ndarray, h: np.ndarray, bits: np.ndarray, group_size: int, damp: float = 0.01,
                  fit=None):
    """GPTQ of w (rows, n) against input Hessian h (n, n); ``bits`` per row.

    Returns (codes (rows, n), scales (rows, groups), zeros (rows, groups)).
    Blocks are one quantization group wide, so each group's scale is fitted on
    values that already carry all earlier groups' error feedback.  ``fit`` is a
    quantizer's ``fit(x, bits, group_size, weights)`` (``quantizers.py``; default
    min–max); it is given the diagonal of h over the group, so a clip search
    weighs each input's error by how much that input fires.
    """
    fit = fit or _minmax
    w = np.array(w, dtype=np.float64)
    rows, n = w.shape
    hdiag = np.diag(h)
    dead = hdiag <= 0
    w[:, dead] = 0  # inputs that never fire: any value is as good as 0
    hinv = _inverse_cholesky(h, damp)
    ng = quant.group_count(n, group_size)
    codes = np.empty((rows, n), dtype=np.uint8)
    scales = np.empty((rows, ng), dtype=quant.SCALE_DTYPE)
    zeros = np.empty((rows, ng), dtype=np.uint8)
    for gi, i1 in enumerate(range(0, n, group_size)):
        i2 = min(i1 + group_size, n)
        block = w[:, i1:i2].copy()
        err = np.zeros_like(block)
        scale, zero = fit(block, bits, i2 - i1, hdiag[i1:i2])
        scales[:, gi], zeros[:, gi] = scale[:, 0], zero[:, 0]
        for j in range(i2 - i1):
            col = block[:, j:j + 1]
            q = quant.quantize(col, scale, zero, bits, 1)
            codes[:, i1 + j] = q[:, 0]
            e = (col - quant.dequantize(q, scale, zero, 1)) / hinv[i1 + j, i1 + j]
            block[:, j + 1:] -= e @ hinv[i1 + j:i1 + j + 1, i1 + j + 1:i2]
            err[:, j:j + 1] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return codes, scales, zeros


def quantize_columns(w: np.ndarray, h: np.ndarray, bits: np.ndarray, group_size: int,
                     damp: float = 0.01, block: int = 64, fit=None):
    """GPTQ of the vectors of u (k, m) (columns of the layer Uᵀ) against h (k, k); ``bits`` per vector.

    Returns (codes (k, m), scales (k, groups), zeros (k, groups)).  ``fit`` as in
    ``quantize_rows``, unweighted: the m elements of a vector are output
    dimensions, which the error reaches alike.
    """
    fit = fit or _minmax
    w = np.array(w, dtype=np.float64)
    k, m = w.shape
    hinv = _inverse_cholesky(h, damp)
    ng = quant.group_count(m, group_size)
    codes = np.empty((k, m), dtype=np.uint8)
    scales = np.empty((k, ng), dtype=quant.SCALE_DTYPE)
    zeros = np.empty((k, ng), dtype=np.uint8)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        err = np.zeros((i2 - i1, m))
        for i in range(i1, i2):
            vec = w[i:i + 1]
            scale, zero = fit(vec, bits[i], group_size, None)
            q = quant.quantize(vec, scale, zero, bits[i], group_size)
            codes[i], scales[i], zeros[i] = q[0], scale[0], zero[0]
            e = (vec - quant.dequantize(q, scale, zero, group_size)) / hinv[i, i]
            w[i + 1:i2] -= hinv[i, i + 1:i2, None] * e
            err[i - i1] = e[0]
        w[i2:] -= hinv[i1:i2, i2:].T @ err
    return codes, scales, zeros


def refit_u(delta: np.ndarray, v_hat: np.ndarray, s: np.ndarray, h: np.ndarray, damp: float = 0.01):
    """U (k, m) that best maps x·V̂ᵀ·diag(S) to x·Δᵀ under input Hessian h.

    Least squares E‖x·Δᵀ − x·V̂ᵀ·diag(S)·Uᵀ‖²: U absorbs the error of V̂ and the part
    of Δ the dropped vectors held, as far as the kept directions can.
    """
    a = v_hat.T.astype(np.float64) * s.astype(np.float64)  # (n, k)
    ha = h @ a
    gram = damped(a.T @ ha, damp)
    rhs = (delta.astype(np.float64) @ ha).T  # (k, m)
    return np.linalg.solve(gram, rhs)


def u_hessian(v_hat: np.ndarray, s: np.ndarray, h: np.ndarray) -> np.ndarray:
    """E[tᵀt] for t = x·V̂ᵀ·diag(S): the Hessian U is quantized against."""
    a = v_hat.T.astype(np.float64) * s.astype(np.float64)
    return a.T @ h @ a


# --- sparse factors (ImPart-Qt) -------------------------------------------------------
#
# Only kept elements are coded, in quantization groups of ``group_size``
# consecutive kept elements of a vector.  A dropped element is "quantized" to 0:
# whatever error feedback moved it to is error like any other, and is spread
# over what is not yet quantized.


def _fit_rows(values: np.ndarray, bits: np.ndarray):
    """(scales, zeros) of one quantization group per row of ``values`` (zero-padded rows)."""
    scale, zero = quant.fit(values, bits, values.shape[1])
    return scale[:, 0], zero[:, 0]


def quantize_rows_masked(w: np.ndarray, keep: np.ndarray, h: np.ndarray, bits: np.ndarray, group_size: int,
                         damp: float = 0.01, block: int = 128):
    """GPTQ of the kept elements of w (rows, n) against input Hessian h (n, n).

    Returns ([(codes, scales, zeros)] per row, dequantized w as a dense float32 array).
    A row's group is fitted when its first element comes up, on the current values
    of its ``group_size`` kept elements (those in later blocks not yet updated, as in GPTQ).
    """
    w = np.where(keep, w, 0).astype(np.float64)
    rows, n = w.shape
    w[:, np.diag(h) <= 0] = 0
    hinv = _inverse_cholesky(h, damp)
    position = np.cumsum(keep, axis=1) - 1  # compacted index of each kept element
    columns = [np.flatnonzero(keep[r]) for r in range(rows)]
    codes = [np.empty(c.size, dtype=np.uint8) for c in columns]
    scales = [[] for _ in range(rows)]
    zeros = [[] for _ in range(rows)]
    scale_now = np.zeros(rows, dtype=np.float32)
    zero_now = np.zeros(rows, dtype=np.float32)
    maxq = ((1 << bits.astype(np.int64)) - 1).astype(np.float32)
    out = np.zeros((rows, n), dtype=np.float32)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        err = np.zeros((rows, i2 - i1))
        for j in range(i1, i2):
            kept = keep[:, j]
            starts = np.flatnonzero(kept & (position[:, j] % group_size == 0))
            if starts.size:
                vals = np.zeros((starts.size, group_size))
                for t, r in enumerate(starts):
                    cols = columns[r][position[r, j]:position[r, j] + group_size]
                    vals[t, :cols.size] = w[r, cols]
                s_new, z_new = _fit_rows(vals, bits[starts])
                scale_now[starts], zero_now[starts] = s_new.astype(np.float32), z_new
                for t, r in enumerate(starts):
                    scales[r].append(s_new[t])
                    zeros[r].append(z_new[t])
            col = w[:, j]
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.where(scale_now > 0, np.round(col / scale_now) + zero_now, zero_now)
            q = np.clip(q, 0, maxq)
            deq = np.where(kept, (q.astype(np.float32) - zero_now) * scale_now, 0)
            for r in np.flatnonzero(kept):
                codes[r][position[r, j]] = q[r]
            out[:, j] = deq
            e = (col - deq) / hinv[j, j]
            w[:, j + 1:i2] -= e[:, None] * hinv[j, j + 1:i2]
            err[:, j - i1] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    result = [(codes[r], np.array(scales[r], dtype=quant.SCALE_DTYPE), np.array(zeros[r], dtype=np.uint8))
              for r in range(rows)]
    return result, out


def quantize_columns_masked(w: np.ndarray, keep: np.ndarray, h: np.ndarray, bits: np.ndarray, group_size: int,
                            damp: float = 0.01):
    """GPTQ of the kept elements of the vectors of u (k, m) against h (k, k), vector by vector.

    Returns ([(codes, scales, zeros)] per vector, dequantized u as a dense float32 array).
    """
    w = np.where(keep, w, 0).astype(np.float64)
    k, m = w.shape
    hinv = _inverse_cholesky(h, damp)
    out = np.zeros((k, m), dtype=np.float32)
    result = []
    for i in range(k):
        cols = np.flatnonzero(keep[i])
        count = cols.size
        ng = quant.group_count(count, group_size)
        padded = np.zeros((ng, group_size), dtype=np.float32)
        padded.reshape(-1)[:count] = w[i, cols]
        scale, zero = quant.fit(padded, int(bits[i]), group_size)
        q = quant.quantize(padded, scale, zero, int(bits[i]), group_size)
        deq = quant.dequantize(q, scale, zero, group_size).reshape(-1)[:count]
        out[i, cols] = deq
        result.append((q.reshape(-1)[:count].copy(), scale[:, 0].copy(), zero[:, 0].copy()))
        e = (w[i] - out[i]) / hinv[i, i]
        w[i + 1:] -= hinv[i, i + 1:, None] * e
    return result, out
