"""The torch backend: the kernels' math in plain torch ops, from the same packed bytes.

The packed bytes stay the only copy.  Per delta: t = x·V̂ᵀ, t ·= S, y += t·Û, group
by group.  For 1–4 tokens it works on the bytes through lookup tables (below,
``shrink_lut`` / ``expand_lut``; sign records likewise: y[a] = Σ_c T_c[byte(a, c)]);
above, or where vectors do not start on bytes, it unpacks the codes and
dequantizes in float32 exactly as the spec writes it, x̂ = (q − z)·s, then
multiplies.
"""

from __future__ import annotations

import torch

from .layer import LayerPack, Segments
from .packed import FLOAT16_BITS, FLOAT32_BITS

LUT_MAX_TOKENS = 4  # above, unpacking once and one matmul is cheaper than a table pass per token
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).float()  # (256, 8)


def unpack(data: torch.Tensor, offset: int, count: int, bits: int) -> torch.Tensor:
    """``count`` codes of ``bits`` bits, LSB-first from byte ``offset`` (spec "Bit packing"), as int32."""
    nbytes = (count * bits + 7) // 8
    raw = data[offset:offset + nbytes].to(torch.int32)
    if bits == 8:
        return raw
    if 8 % bits == 0:  # whole codes per byte
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=data.device)
        return ((raw.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]
    # 8 codes fill ``bits`` bytes exactly: join them into one 64-bit word, then cut.
    pad = -nbytes % bits
    raw = torch.nn.functional.pad(raw, (0, pad)).to(torch.int64).reshape(-1, bits)
    word = (raw << (8 * torch.arange(bits, device=data.device))).sum(dim=1)
    shifts = bits * torch.arange(8, device=data.device)
    return ((word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count].to(torch.int32)


def _view(data: torch.Tensor, offset: int, count: int, dtype) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    return data[offset:offset + count * size].view(dtype)


def dequantize(data, codes: int, scales: int, zeros: int, count: int, length: int, bits: int,
               group_size: int) -> torch.Tensor:
    """(count, length) float32 vectors of one factor of one bit group."""
    if bits == FLOAT16_BITS:
        return _view(data, codes, count * length, torch.float16).float().reshape(count, length)
    if bits == FLOAT32_BITS:
        return _view(data, codes, count * length, torch.float32).reshape(count, length)
    groups = -(-length // group_size)
    q = unpack(data, codes, count * length, bits).reshape(count, length).float()
    s = _view(data, scales, count * groups, torch.float16).float().reshape(count, groups)
    z = unpack(data, zeros, count * groups, bits).reshape(count, groups).float()
    which = torch.arange(length, device=data.device) // group_size
    return (q - z[:, which]) * s[:, which]


def factor_delta(pack: LayerPack, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Û (k, m), S (k,), V̂ (k, n)) of delta d, float32."""
    m, n = pack.shape
    us, vs = [], []
    for row in pack.rows(d):
        _, start, count, bits, gsz, vc, vsc, vz, uc, usc, uz, s_at = row
        vs.append(dequantize(pack.data, vc, vsc, vz, count, n, bits, gsz))
        us.append(dequantize(pack.data, uc, usc, uz, count, m, bits, gsz))
    rank = pack.factors[d].rank
    s = _view(pack.data, s_at, rank, torch.float32)
    u, v = torch.cat(us), torch.cat(vs)
    v_rot, u_rot = pack.rotations.get(d, (None, None))  # lowrank-rotated: the stored vectors are R·v, R·u
    return (u if u_rot is None else u_rot.unrotate(u)), s, (v if v_rot is None else v_rot.unrotate(v))


def _with_tokens(recs: dict, seg: Segments):
    """(delta, record, first row, end row) of each delta in ``recs`` that has tokens in the batch."""
    for d, rec in recs.items():
        lo, hi = seg.span(d)
        if lo < hi:
            yield d, rec, lo, hi


def _factors(pack: LayerPack, x: torch.Tensor, seg: Segments, acc: torch.Tensor):
    m, n = pack.shape
    for d, rec, lo, hi in _with_tokens(pack.factors, seg):
        xs = x[lo:hi].float()
        rows = pack.rows(d)
        s = _view(pack.data, rows[0][11], rec.rank, torch.float32)
        t = torch.empty(hi - lo, rec.rank, device=x.device)
        few = hi - lo <= LUT_MAX_TOKENS
        for _, start, count, bits, gsz, vc, vsc, vz, *_rest in rows:
            if few and _lut_fits(n, bits, gsz):
                t[:, start:start + count] = shrink_lut(pack.data, vc, vsc, vz, count, n, bits, gsz, xs)
            else:
                t[:, start:start + count] = xs @ dequantize(pack.data, vc, vsc, vz, count, n, bits, gsz).T
        t *= s
        for _, start, count, bits, gsz, _vc, _vs, _vz, uc, usc, uz, _s in rows:
            if few and _lut_fits(m, bits, gsz):
                acc[lo:hi] += expand_lut(pack.data, uc, usc, uz, count, m, bits, gsz, t[:, start:start + count])
            else:
                acc[lo:hi] += t[:, start:start + count] @ dequantize(pack.data, uc, usc, uz, count, m, bits, gsz)


# --- few tokens: straight from the bytes, through lookup tables -------------------------------
#
# A dot product with packed codes is linear in the stream's bits: Σ_j x_j·q_j =
# Σ_p bit_p · x[p // bits] · 2^(p % bits).  When every vector and every quantization
# group starts on a byte (length·bits and group_size·bits multiples of 8), byte c of
# any vector holds the same 8 stream bits, so one table T_c[v] (256 values) per byte
# column gives that byte's share for all vectors at once: a shrink is a gather-sum
# (``embedding_bag``) over the packed bytes, and an expand the transposed scatter-add
# (a histogram of byte values per column, weighted by t·S·scale).  No code is unpacked.


def _lut_fits(length: int, bits: int, group_size: int) -> bool:
    return bits <= 8 and (length * bits) % 8 == 0 and (group_size * bits) % 8 == 0


def _bit_weights(length: int, bits: int, device):
    """(element of each stream bit, its place value 2^(p % bits)) for one vector's bits."""
    p = torch.arange(length * bits, device=device)
    return p // bits, (2.0 ** (p % bits)).float()


def _groups_of(data, scales, zeros, count, length, bits, group_size):
    groups = -(-length // group_size)
    s = _view(data, scales, count * groups, torch.float16).float().reshape(count, groups)
    z = unpack(data, zeros, count * groups, bits).reshape(count, groups).float()
    return groups, s, z


def _byte_index(data, codes, count, cols) -> torch.Tensor:
    """Flat table index of every packed byte: 256·column + byte value (int32: half the traffic of int64)."""
    raw = data[codes:codes + count * cols].view(count, cols).to(torch.int32)
    return (raw + 256 * torch.arange(cols, device=data.device, dtype=torch.int32)).reshape(-1)


def shrink_lut(data, codes, scales, zeros, count, length, bits, group_size, x) -> torch.Tensor:
    """(tokens, count): x · V̂ᵀ for one factor of one bit group, from its packed bytes."""
    cols = length * bits // 8
    groups, s, z = _groups_of(data, scales, zeros, count, length, bits, group_size)
    byte_bits = _BYTE_BITS.to(x.device)
    index = _byte_index(data, codes, count, cols)
    starts = torch.arange(groups, device=x.device, dtype=torch.int32) * (group_size * bits // 8)
    offsets = (torch.arange(count, device=x.device, dtype=torch.int32)[:, None] * cols + starts).reshape(-1)
    element, place = _bit_weights(length, bits, x.device)
    pad = groups * group_size - length
    x_groups = torch.nn.functional.pad(x, (0, pad)).reshape(x.shape[0], groups, group_size).sum(2)
    out = torch.empty(x.shape[0], count, device=x.device)
    for r in range(x.shape[0]):
        table = (x[r][element] * place).reshape(cols, 8) @ byte_bits.T  # (cols, 256)
        partial = torch.nn.functional.embedding_bag(index, table.reshape(-1, 1), offsets, mode="sum")
        out[r] = (s * (partial.reshape(count, groups) - z * x_groups[r])).sum(1)
    return out


def expand_lut(data, codes, scales, zeros, count, length, bits, group_size, t) -> torch.Tensor:
    """(tokens, length): t · Û for one factor of one bit group, from its packed bytes."""
    cols = length * bits // 8
    groups, s, z = _groups_of(data, scales, zeros, count, length, bits, group_size)
    byte_bits = _BYTE_BITS.to(t.device)
    index = _byte_index(data, codes, count, cols)
    group_bytes = group_size * bits // 8
    per_group = torch.full((groups,), group_bytes, device=t.device)
    per_group[-1] = cols - (groups - 1) * group_bytes  # a shorter last group
    element_group = torch.arange(length, device=t.device) // group_size
    place = 2.0 ** torch.arange(bits, device=t.device).float()
    out = torch.empty(t.shape[0], length, device=t.device)
    for r in range(t.shape[0]):
        weight = t[r][:, None] * s  # (count, groups): what one unit of code adds
        by_byte = weight.repeat_interleave(per_group, dim=1).reshape(-1)
        hist = torch.zeros(cols * 256, device=t.device).index_add_(0, index, by_byte)
        bit_sums = (hist.reshape(cols, 256) @ byte_bits).reshape(length, bits)
        out[r] = bit_sums @ place - (weight * z).sum(0)[element_group]
    return out


def _signs(pack: LayerPack, x: torch.Tensor, seg: Segments, acc: torch.Tensor):
    m, n = pack.shape
    for d, _rec, lo, hi in _with_tokens(pack.sign_recs, seg):
        _, at, signs_at, rowmap_at, per_row = pack.signs[d].tolist()
        scales = _view(pack.data, at, m if per_row else 1, torch.float32).expand(m)
        rowmap = _view(pack.data, rowmap_at, m, torch.int32)
        coded = torch.nonzero(rowmap >= 0).reshape(-1)
        if coded.numel() == 0:
            continue
        xs = x[lo:hi].float()
        rows = coded.numel()
        if n % 8 == 0 and hi - lo <= LUT_MAX_TOKENS:  # lookup tables over bytes: no bit is expanded
            bytes_ = pack.data[signs_at:signs_at + rows * n // 8].reshape(rows, n // 8).long()
            tables = xs.reshape(hi - lo, n // 8, 8) @ _BYTE_BITS.to(x.device).T  # (T, n/8, 256)
            chunk = torch.arange(n // 8, device=x.device) * 256
            positive = tables.reshape(hi - lo, -1)[:, (bytes_ + chunk).reshape(-1)].reshape(hi - lo, rows, -1).sum(2)
        else:
            bits = unpack(pack.data, signs_at, rows * n, 1).reshape(rows, n).float()
            positive = xs @ bits.T
        # Σ x·(2·bit − 1) = 2·(Σ over set bits) − Σ x
        acc[lo:hi, coded] += (2 * positive - xs.sum(1, keepdim=True)) * scales[coded]


def apply(pack: LayerPack, x: torch.Tensor, seg: Segments, y: torch.Tensor) -> None:
    """y += x·Δ̂_dᵀ for the tokens of every delta d (x, y sorted by delta)."""
    acc = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    _factors(pack, x, seg, acc)
    _signs(pack, x, seg, acc)
    for _d, delta, lo, hi in _with_tokens(pack.dense, seg):
        acc[lo:hi] += x[lo:hi].float() @ delta.T
    y += acc.to(y.dtype)
