"""Deltas of one linear weight held as dequantized factors (``hold="factors"``).

Its own module: it dequantizes with the torch backend (the spec's (q − z)·s in
float32, once), which itself reads ``layer``'s tables.
"""

from __future__ import annotations

import torch

from . import torch_backend
from .layer import LayerPack, Segments
from .packed import FactorRecord


class LayerFactors:
    """Deltas of one (m, n) weight held as dequantized factors in the model's dtype (``hold="factors"``).

    Each factor record becomes V̂ (k, n) and Û·diag(S) (m, k): two small GEMMs per
    call, y += (x·V̂ᵀ)·(Û·diag(S))ᵀ, at the speed of the host's BLAS, for
    k·(m + n) elements of the model's dtype (the packed bytes are dropped).
    Records with no factors (sign, dense) stay in a ``LayerPack`` (``rest``),
    computed by the backend's kernels.
    """

    def __init__(self, shape, recs: list, device="cpu", dtype=None):
        self.shape = tuple(shape)
        self.num_deltas = len(recs)
        dtype = dtype or torch.float32
        factor_recs = [r if isinstance(r, FactorRecord) and r.rank else None for r in recs]
        pack = LayerPack(shape, factor_recs, "cpu")
        self.factors = {}
        for d in pack.factors:
            u, s, v = torch_backend.factor_delta(pack, d)
            self.factors[d] = (v.to(device=device, dtype=dtype).contiguous(),
                               (u.T * s).to(device=device, dtype=dtype).contiguous())
        rest = [None if isinstance(r, FactorRecord) else r for r in recs]
        self.rest = LayerPack(shape, rest, device) if any(r is not None for r in rest) else None

    def apply(self, x: torch.Tensor, seg: Segments, y: torch.Tensor, kernel) -> None:
        """y += x·Δ̂_dᵀ for the tokens of every delta d (x, y sorted by delta); ``kernel`` computes ``rest``."""
        for d, (v, us) in self.factors.items():
            lo, hi = seg.span(d)
            if lo < hi:
                t = torch.nn.functional.linear(x[lo:hi].to(v.dtype), v)
                y[lo:hi] += torch.nn.functional.linear(t, us).to(y.dtype)
        if self.rest is not None:
            kernel(self.rest, x, seg, y)

    @property
    def nbytes(self) -> int:
        held = sum(t.numel() * t.element_size() for pair in self.factors.values() for t in pair)
        return held + (self.rest.nbytes if self.rest is not None else 0)

    def to(self, device) -> "LayerFactors":
        self.factors = {d: (v.to(device), us.to(device)) for d, (v, us) in self.factors.items()}
        if self.rest is not None:
            self.rest.to(device)
        return self
