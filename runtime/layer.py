"""The deltas of one linear layer, for K fine-tunes at once, as tensors the kernels index.

``LayerPack`` holds every delta's packed bytes in one uint8 buffer (each record's
blob at a 16-byte boundary) and small int64 tables of offsets into it:

- ``groups`` (G, 12): one row per bit group of every factor record, in delta order:
  ``delta, start, count, bits, group_size, V codes, V scales, V zeros, U codes,
  U scales, U zeros, S`` (byte offsets into the buffer; S is the record's blob start).
- ``delta_groups`` (K, 2): each delta's rows [first, last) of ``groups``.
- ``signs`` (K, 5): ``present, scales, signs, row map, per_row`` of each sign record.
- ``dense``: {delta: (m, n) float32 Δ̂} for records computed as a dense matrix.

Tokens come sorted by delta (``Segments``): delta d owns rows [start_d, end_d) of
the batch, and each stage is one launch over all deltas (the Punica/S-LoRA pattern).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packed import DenseRecord, FactorRecord, SignRecord

GROUP_COLUMNS = ("delta", "start", "count", "bits", "group_size", "v_codes", "v_scales", "v_zeros",
                 "u_codes", "u_scales", "u_zeros", "s")
BLOB_ALIGN = 16


@dataclass
class Segments:
    """A batch's tokens grouped by delta: ``order`` sorts them, ``bounds`` (K, 2) int32 holds each range."""

    order: torch.Tensor | None  # None: already in order (a single delta)
    inverse: torch.Tensor | None
    bounds: torch.Tensor  # (K, 2) int64 [start, end)
    counts: list  # tokens per delta (host ints)

    def span(self, d: int) -> tuple[int, int]:
        """Rows [start, end) of delta d in the sorted batch (host ints: no device sync)."""
        end = sum(self.counts[:d + 1])
        return end - self.counts[d], end

    @property
    def max_tokens(self) -> int:
        return max(self.counts) if self.counts else 0

    @staticmethod
    def of(delta_ids: torch.Tensor, num_deltas: int) -> "Segments":
        ids = delta_ids.reshape(-1).to(torch.int64)
        counts = torch.bincount(ids, minlength=num_deltas)
        if counts.numel() > num_deltas:
            raise IndexError(f"delta id {int(ids.max())} out of range for {num_deltas} deltas")
        ends = torch.cumsum(counts, 0)
        bounds = torch.stack([ends - counts, ends], dim=1)
        order = torch.argsort(ids, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return Segments(order, inverse, bounds, counts.tolist())

    @staticmethod
    def single(tokens: int, device) -> "Segments":
        return Segments(None, None, torch.tensor([[0, tokens]], dtype=torch.int64, device=device), [tokens])


class LayerPack:
    """Packed deltas of one (m, n) weight for deltas 0..K-1 (None: that delta leaves it unchanged)."""

    def __init__(self, shape, recs: list, device="cpu"):
        self.shape = tuple(shape)
        self.num_deltas = len(recs)
        for r in recs:
            if r is not None and tuple(r.shape) != self.shape:
                raise ValueError(f"delta of shape {list(r.shape)} for a layer of shape {list(self.shape)}")
        self.factors = {d: r for d, r in enumerate(recs) if isinstance(r, FactorRecord) and r.rank}
        self.sign_recs = {d: r for d, r in enumerate(recs) if isinstance(r, SignRecord)}
        self.dense = {d: torch.from_numpy(r.delta).to(device) for d, r in enumerate(recs)
                      if isinstance(r, DenseRecord)}
        self._build(device)

    def _build(self, device):
        chunks, offset, starts = [], 0, {}
        for key, rec in [(("f", d), r) for d, r in self.factors.items()] + \
                        [(("s", d), r) for d, r in self.sign_recs.items()]:
            starts[key] = offset
            pad = -len(rec.blob) % BLOB_ALIGN
            chunks.append(rec.blob + bytes(pad))
            offset += len(rec.blob) + pad
        data = b"".join(chunks) or bytes(BLOB_ALIGN)
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        rows, spans = [], []
        for d in range(self.num_deltas):
            first = len(rows)
            rec = self.factors.get(d)
            for g in (rec.groups if rec else []):
                at = starts[("f", d)]
                rows.append([d, g.start, g.count, g.bits, g.group_size, at + g.v_codes, at + g.v_scales,
                             at + g.v_zeros, at + g.u_codes, at + g.u_scales, at + g.u_zeros, at])
            spans.append([first, len(rows)])
        self.groups = torch.tensor(rows or [[0] * len(GROUP_COLUMNS)], dtype=torch.int64, device=device)
        self.group_rows = rows
        self.spans = spans
        self.delta_groups = torch.tensor(spans, dtype=torch.int64, device=device)
        self.max_rank = max([r.rank for r in self.factors.values()], default=0)
        signs = []
        for d in range(self.num_deltas):
            rec = self.sign_recs.get(d)
            at = starts.get(("s", d), 0)
            signs.append([1, at, at + rec.signs, at + rec.rowmap, int(rec.per_row)] if rec else [0, 0, 0, 0, 0])
        self.signs = torch.tensor(signs, dtype=torch.int64, device=device)
        self._work = {}

    def rows(self, d: int) -> list:
        """Delta d's rows of the group table, as host lists."""
        first, last = self.spans[d]
        return self.group_rows[first:last]

    def work(self, block_v: int) -> torch.Tensor:
        """(W, 2) int64 rows (group, first vector) of the shrink stage's programs, for ``block_v``."""
        if block_v not in self._work:
            rows = [[gi, v0] for gi, row in enumerate(self.group_rows) for v0 in range(0, row[2], block_v)]
            self._work[block_v] = torch.tensor(rows or [[0, 0]], dtype=torch.int64, device=self.data.device)[:len(rows)]
        return self._work[block_v]

    @property
    def nbytes(self) -> int:
        """Bytes this layer's deltas keep in memory (packed buffer, tables, dense matrices)."""
        tables = sum(t.numel() * t.element_size() for t in (self.groups, self.delta_groups, self.signs))
        return self.data.numel() + tables + sum(t.numel() * t.element_size() for t in self.dense.values())

    def to(self, device) -> "LayerPack":
        for name in ("data", "groups", "delta_groups", "signs"):
            setattr(self, name, getattr(self, name).to(device))
        self.dense = {d: t.to(device) for d, t in self.dense.items()}
        self._work = {}
        return self
