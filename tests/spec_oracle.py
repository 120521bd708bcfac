"""Δ̂ of a record from the spec alone: the runtime tests' oracle, independent of the codec's decoder.

Two routes, neither imports ``dcm``:

- ``mixed_delta``: a ``lowrank-mixed`` blob (spec 10.7) dequantized here with numpy
  from the spec's formulas: 4-byte-aligned sections (S, then per bit group V codes,
  scales, zero points, U codes, scales, zero points), LSB-first code streams
  (section 11), x̂ = (float32(q) − float32(z)) × float32(s), Δ̂ = Û·diag(S)·V̂ᵀ.
- ``file_deltas``: every lossy record of a file, through the independent reference
  decoder ``spec/reference/dcmref.py`` (written from the spec text) and its documented
  outputs, the codes and dequantized factors of spec 19.2: S, V̂, Û for the factor
  kinds, row scales plus sign bits for ``sign``, Δ̂ itself for ``sparse``.

A bug the codec and the runtime share (a section offset, a group-scale index, the
mask hash) makes both disagree with these.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "spec" / "reference"))
import dcmref  # noqa: E402

FACTOR_KINDS = ("lowrank-mixed", "sparse-lowrank", "lowrank")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def lsb_first(buf: bytes, count: int, bits: int) -> np.ndarray:
    """Section 11: code i is stream bits [i·bits, (i+1)·bits), bit p of the stream is bit p % 8 of byte p // 8."""
    stream = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[:count * bits]
    return (stream.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)


def mixed_delta(shape, groups, blob: bytes) -> np.ndarray:
    """Δ̂ (m, n) float64 of a lowrank-mixed blob with bit groups ``[(start, stop, bits, group_size), ...]``."""
    m, n = shape
    groups = [tuple(int(v) for v in (g.as_param() if hasattr(g, "as_param") else g)) for g in groups]
    k = groups[-1][1] if groups else 0
    at = 0

    def section(size: int) -> bytes:
        nonlocal at
        at = _ceil(at, 4) * 4  # each section starts at the next multiple of 4
        part = blob[at:at + size]
        assert len(part) == size, "blob shorter than its sections"
        at += size
        return part

    s = np.frombuffer(section(4 * k), dtype="<f4")
    factors = {"V": [], "U": []}
    for start, stop, bits, gsz in groups:
        c = stop - start
        for side, length in (("V", n), ("U", m)):
            ngroups = _ceil(length, gsz)
            q = lsb_first(section(_ceil(c * length * bits, 8)), c * length, bits).reshape(c, length)
            scales = np.frombuffer(section(2 * c * ngroups), dtype="<f2").astype(np.float32).reshape(c, ngroups)
            z = lsb_first(section(_ceil(c * ngroups * bits, 8)), c * ngroups, bits).reshape(c, ngroups)
            which = np.arange(length) // gsz  # element j's quantization group
            factors[side].append((q.astype(np.float32) - z[:, which].astype(np.float32)) * scales[:, which])
    assert at == len(blob), "blob longer than its sections"
    if not k:
        return np.zeros((m, n))
    v, u = (np.concatenate(factors[side]).astype(np.float64) for side in ("V", "U"))
    return (u.T * s.astype(np.float64)) @ v


def file_deltas(path) -> dict:
    """{name: Δ̂ (m, n) float64} of every lossy record of a .dcm file, by the reference decoder."""
    out = {}
    for name, t in dcmref.decode(str(path)).tensors.items():
        if t.kind not in (*FACTOR_KINDS, "sign", "sparse"):
            continue
        m, n = t.shape
        factors = np.frombuffer(t.factors, dtype="<f4").astype(np.float64)
        if t.kind in FACTOR_KINDS:
            k = factors.size // (1 + m + n)
            s, v, u = factors[:k], factors[k:k + k * n].reshape(k, n), factors[k + k * n:].reshape(k, m)
            out[name] = (u.T * s) @ v
        elif t.kind == "sign":  # 10.10: a set bit is +α of its row, a clear one −α; rows of α = 0 store none
            alpha = factors
            bits = np.frombuffer(t.codes, dtype=np.uint8).reshape(-1, n)
            delta = np.zeros((m, n))
            delta[alpha != 0] = np.where(bits == 1, 1.0, -1.0) * alpha[alpha != 0, None]
            out[name] = delta
        else:  # sparse: the factors are Δ̂ itself
            out[name] = factors.reshape(m, n)
    return out
