"""Encoder numerics on the device of ``compute.device()``: numpy on the CPU, torch on a GPU.

The numpy code (``quant.py``, ``gptq.py``) is the reference.  These torch
versions compute the same formulas: round-to-nearest quantization gives the
same bits as numpy for the same input (every step is one IEEE float32
operation: the float16 scale, the zero point, the codes); GPTQ sums in another
order, so its codes may differ in a few elements.  They take a ``device``
argument so that the CPU test runs exercise exactly what a GPU runs.
"""

from __future__ import annotations

import numpy as np

from .. import compute, quant
from . import gptq

_F16_MAX = float(np.finfo(np.float16).max)


def _on_gpu() -> str | None:
    return compute.device() if compute.is_accelerated() else None


# --- the dispatchers the methods call -------------------------------------------------


def rtn(x: np.ndarray, bits, group_size: int):
    device = _on_gpu()
    return quant.rtn(x, bits, group_size) if device is None else rtn_torch(x, bits, group_size, device)


def dequantize(codes, scale, zero, group_size: int) -> np.ndarray:
    device = _on_gpu()
    if device is None:
        return quant.dequantize(codes, scale, zero, group_size)
    return dequantize_torch(codes, scale, zero, group_size, device)


def gptq_rows(w, h, bits, group_size: int, damp: float):
    device = _on_gpu()
    if device is None:
        return gptq.quantize_rows(w, h, bits, group_size, damp)
    return gptq_rows_torch(w, h, bits, group_size, damp, device)


def gptq_columns(w, h, bits, group_size: int, damp: float):
    device = _on_gpu()
    if device is None:
        return gptq.quantize_columns(w, h, bits, group_size, damp)
    return gptq_columns_torch(w, h, bits, group_size, damp, device)


# --- round-to-nearest in torch -------------------------------------------------------------


def _grouped(torch, x, group_size: int):
    rows, n = x.shape
    groups = -(-n // group_size)
    pad = groups * group_size - n
    if pad:
        x = torch.cat([x, torch.zeros((rows, pad), dtype=x.dtype, device=x.device)], dim=1)
    return x.reshape(rows, groups, group_size)


def _maxq(torch, bits, rows: int, device):
    bits = torch.as_tensor(np.broadcast_to(np.asarray(bits, dtype=np.int64), (rows,)).copy(), device=device)
    return ((1 << bits) - 1).to(torch.float32)


def _fit(torch, x, bits, group_size: int):
    g = _grouped(torch, x, group_size)
    lo = torch.clamp(g.amin(dim=2), max=0)
    hi = torch.clamp(g.amax(dim=2), min=0)
    maxq = _maxq(torch, bits, g.shape[0], x.device)[:, None]
    scale = torch.clamp((hi - lo) / maxq, max=_F16_MAX).to(torch.float16)
    s = scale.to(torch.float32)
    zero = torch.where(s > 0, torch.round(-lo / s), torch.zeros_like(s))
    zero = torch.minimum(torch.clamp(zero, min=0), maxq).to(torch.uint8)
    return scale, zero


def _quantize(torch, x, scale, zero, bits, group_size: int):
    rows, n = x.shape
    s = scale.to(torch.float32)[:, :, None]
    z = zero.to(torch.float32)[:, :, None]
    q = torch.round(_grouped(torch, x, group_size) / s) + z
    q = torch.where(s > 0, q, z)
    maxq = _maxq(torch, bits, rows, x.device)[:, None, None]
    q = torch.minimum(torch.clamp(q, min=0), maxq)
    return q.to(torch.uint8).reshape(rows, -1)[:, :n]


def rtn_torch(x: np.ndarray, bits, group_size: int, device="cpu"):
    """``quant.rtn`` in torch on ``device``: (codes, scales, zeros) as numpy arrays, the same bits."""
    import torch

    t = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)
    scale, zero = _fit(torch, t, bits, group_size)
    codes = _quantize(torch, t, scale, zero, bits, group_size)
    return (np.ascontiguousarray(codes.cpu().numpy()), scale.cpu().numpy().astype(quant.SCALE_DTYPE),
            zero.cpu().numpy())


def dequantize_torch(codes, scale, zero, group_size: int, device="cpu") -> np.ndarray:
    import torch

    c = torch.as_tensor(np.ascontiguousarray(codes), device=device)
    rows, n = c.shape
    out = _grouped(torch, c.to(torch.float32), group_size)
    out = out - torch.as_tensor(zero, device=device).to(torch.float32)[:, :, None]
    out = out * torch.as_tensor(scale.astype(np.float32), device=device)[:, :, None]
    return np.ascontiguousarray(out.reshape(rows, -1)[:, :n].cpu().numpy())


# --- GPTQ in torch ---------------------------------------------------------------------------


def _inverse_cholesky(torch, h, damp: float):
    """``gptq._inverse_cholesky`` in torch: upper Cholesky factor of (H + λI)⁻¹."""
    h = h.clone()
    n = h.shape[0]
    idx = torch.arange(n, device=h.device)
    dead = torch.diagonal(h) <= 0
    h[idx[dead], idx[dead]] = 1.0
    lam = damp * float(torch.diagonal(h).mean())
    h[idx, idx] += lam
    while True:
        low, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if int(info) == 0:
                return upper
        h[idx, idx] += max(lam, 1e-8)
        lam *= 10


def gptq_rows_torch(w, h, bits, group_size: int, damp: float = 0.01, device="cpu"):
    """``gptq.quantize_rows`` in torch (float64) on ``device``."""
    import torch

    w = torch.as_tensor(np.asarray(w, dtype=np.float64), device=device).clone()
    ht = torch.as_tensor(np.asarray(h, dtype=np.float64), device=device)
    rows, n = w.shape
    w[:, torch.diagonal(ht) <= 0] = 0
    hinv = _inverse_cholesky(torch, ht, damp)
    ng = quant.group_count(n, group_size)
    codes = torch.empty((rows, n), dtype=torch.uint8, device=device)
    scales = torch.empty((rows, ng), dtype=torch.float16, device=device)
    zeros = torch.empty((rows, ng), dtype=torch.uint8, device=device)
    maxq = _maxq(torch, bits, rows, device)[:, None]
    for gi, i1 in enumerate(range(0, n, group_size)):
        i2 = min(i1 + group_size, n)
        block = w[:, i1:i2].clone()
        err = torch.zeros_like(block)
        scale, zero = _fit(torch, block.to(torch.float32), bits, i2 - i1)
        scales[:, gi], zeros[:, gi] = scale[:, 0], zero[:, 0]
        s, z = scale.to(torch.float32), zero.to(torch.float32)
        for j in range(i2 - i1):
            col = block[:, j:j + 1]
            q = torch.round(col.to(torch.float32) / s) + z
            q = torch.minimum(torch.clamp(torch.where(s > 0, q, z), min=0), maxq)
            codes[:, i1 + j] = q[:, 0].to(torch.uint8)
            e = (col - ((q - z) * s).to(torch.float64)) / hinv[i1 + j, i1 + j]
            block[:, j + 1:] -= e @ hinv[i1 + j:i1 + j + 1, i1 + j + 1:i2]
            err[:, j:j + 1] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return codes.cpu().numpy(), scales.cpu().numpy().astype(quant.SCALE_DTYPE), zeros.cpu().numpy()


def gptq_columns_torch(w, h, bits, group_size: int, damp: float = 0.01, device="cpu", block: int = 64):
    """``gptq.quantize_columns`` in torch (float64) on ``device``."""
    import torch

    w = torch.as_tensor(np.asarray(w, dtype=np.float64), device=device).clone()
    hinv = _inverse_cholesky(torch, torch.as_tensor(np.asarray(h, dtype=np.float64), device=device), damp)
    k, m = w.shape
    bits = np.broadcast_to(np.asarray(bits, dtype=np.int64), (k,))
    ng = quant.group_count(m, group_size)
    codes = torch.empty((k, m), dtype=torch.uint8, device=device)
    scales = torch.empty((k, ng), dtype=torch.float16, device=device)
    zeros = torch.empty((k, ng), dtype=torch.uint8, device=device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        err = torch.zeros((i2 - i1, m), dtype=torch.float64, device=device)
        for i in range(i1, i2):
            vec = w[i:i + 1].to(torch.float32)
            scale, zero = _fit(torch, vec, int(bits[i]), group_size)
            q = _quantize(torch, vec, scale, zero, int(bits[i]), group_size)
            codes[i], scales[i], zeros[i] = q[0], scale[0], zero[0]
            deq = (_grouped(torch, q.to(torch.float32), group_size) - zero.to(torch.float32)[:, :, None]) \
                * scale.to(torch.float32)[:, :, None]
            e = (w[i:i + 1] - deq.reshape(1, -1)[:, :m].to(torch.float64)) / hinv[i, i]
            w[i + 1:i2] -= hinv[i, i + 1:i2, None] * e
            err[i - i1] = e[0]
        w[i2:] -= hinv[i1:i2, i2:].T @ err
    return codes.cpu().numpy(), scales.cpu().numpy().astype(quant.SCALE_DTYPE), zeros.cpu().numpy()
