"""How much of a fine-tune a lossy method actually coded, and why the rest was not.

A lossy encode can quietly code far less than asked: a bf16 fine-tune of an
fp32 base (no tensor pairs up), an ``--include`` that matches nothing, a base
of another architecture, a resized vocabulary.  ``uncoded_reason`` is the one
place that says why a tensor is not coded (extend it when the codec learns to
code a new case); ``measure`` sums it up after an encode, and ``problems``
says when the outcome is too far from what was asked to pass silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import adapted, dtypes, records
from .constants import Kind
from .index import packed_len
from .info import sanitize

# A lossy file more than this many times its budget (whole file, per parameter) is refused.
MAX_OVER_BUDGET = 2.0


def uncoded_reason(method, name: str, ft_info, base_info) -> str | None:
    """None if ``method`` will hand tensor ``name`` to its coder; else why not, in a few words.

    ``ft_info`` and ``base_info`` are the tensor's TensorInfo in the fine-tune
    and the base (None when the base lacks it).  The reason strings group the
    tensors in reports, so they name the cause, not the tensor.
    """
    if base_info is None:
        return "absent from the base"
    if adapted.applies(ft_info, base_info):  # coded against the base cast and cut to its rows (spec 10.13)
        ft_info = adapted.inner_info(ft_info, base_info)
    elif base_info.dtype != ft_info.dtype:
        return f"dtype differs ({ft_info.dtype} in the fine-tune, {base_info.dtype} in the base)"
    elif tuple(base_info.shape) != tuple(ft_info.shape):
        if len(ft_info.shape) == 2 and len(base_info.shape) == 2 and ft_info.shape[1] == base_info.shape[1]:
            return "fewer rows than the base (shrunk vocabulary?)"
        return "shape differs from the base"
    if method.wants_tensor(name, ft_info.dtype, ft_info.shape):
        return None
    if len(ft_info.shape) != 2 or not dtypes.dtype(ft_info.dtype).is_float:
        return "not a 2-D float matrix (stored exactly by design)"
    if not method.selection.selects(name, ft_info.dtype, ft_info.shape):
        return "not selected by --include / --exclude"
    return f"{ft_info.dtype} matrices are not coded by {method.name}"


def planned(method, base, ft) -> list:
    """TensorInfo of the fine-tune's tensors the method will code, in the fine-tune's order (for a tensor
    coded as an ``adapted`` record, its inner record's matrix: ``adapted.InnerInfo``)."""
    out = []
    for n in ft.names():
        ft_info, base_info = ft.info(n), base.info(n) if n in base else None
        if uncoded_reason(method, n, ft_info, base_info) is None:
            out.append(adapted.inner_info(ft_info, base_info) if adapted.applies(ft_info, base_info) else ft_info)
    return out


@dataclass
class Coverage:
    """What a lossy encode coded, what it cost, and what it left exact (reason -> [(name, params)])."""

    method: str
    lossy: bool
    ratio: str | None  # as asked, e.g. "1/16"
    budget_bits: float | None  # bits per parameter the ratio allows (16 x ratio)
    params: int  # the fine-tune's parameters
    coded_params: int
    coded_tensors: int
    tensors: int
    file_bits: float  # the whole file's bits per fine-tune parameter
    coded_bits: float | None  # the coded records' bits per coded parameter, as `dcm info` counts them
    uncoded: dict[str, list] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.coded_params / self.params if self.params else 0.0

    def problems(self) -> list[str]:
        """Why this outcome should not pass silently (empty when fine)."""
        if not self.lossy:
            return []
        out = []
        if self.coded_tensors == 0:
            out.append(f"{self.method} coded no tensor: every tensor was stored exactly")
        elif self.budget_bits and self.file_bits > MAX_OVER_BUDGET * self.budget_bits:
            out.append(f"the file takes {self.file_bits:.3f} bits per parameter, more than {MAX_OVER_BUDGET:g}x "
                       f"the budget of {self.budget_bits:.3f} (ratio {self.ratio}); "
                       f"{100 * self.fraction:.1f}% of the parameters were coded")
        return out

    def reason_lines(self) -> list[str]:
        """One line per reason: how many tensors and parameters, a few names (escaped for a terminal)."""
        lines = []
        for reason, items in sorted(self.uncoded.items(), key=lambda kv: -sum(n for _, n in kv[1])):
            params = sum(n for _, n in items)
            names = ", ".join(sanitize(name) for name, _ in items[:3]) + (", ..." if len(items) > 3 else "")
            lines.append(f"{len(items)} tensors, {params} params ({_pct(params, self.params)}): {reason} [{names}]")
        return lines

    def summary(self) -> str:
        if not self.lossy:
            return f"{self.file_bits:.3f} bits/param (lossless)"
        text = (f"coded by {self.method}: {_pct(self.coded_params, self.params)} of {self.params} params "
                f"({self.coded_tensors} of {self.tensors} tensors)")
        if self.coded_bits is not None:
            text += f", {self.coded_bits:.3f} bits/param as coded"
        text += f"; whole file {self.file_bits:.3f} bits/param"
        if self.budget_bits is not None:
            text += f", budget {self.budget_bits:.3f} (ratio {self.ratio})"
        return text

    def as_dict(self) -> dict:
        return {"method": self.method, "lossy": self.lossy, "ratio": self.ratio, "budget_bits": self.budget_bits,
                "params": self.params, "coded_params": self.coded_params, "coded_fraction": self.fraction,
                "coded_tensors": self.coded_tensors, "tensors": self.tensors, "file_bits": self.file_bits,
                "coded_bits": self.coded_bits,
                "uncoded": {r: [name for name, _ in items] for r, items in self.uncoded.items()}}


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def lossy_record_bytes(index: dict) -> tuple[int, int]:
    """(params, bytes) of the lossy records: index entries + payloads + the padding before each payload.

    The same count as ``dcm info``'s ``totals.compressed`` (what ``--ratio`` budgets).
    """
    spans = sorted({(b["offset"], b["length"]) for r in index["tensors"] for b in r["blobs"]}
                   | {(a["blob"]["offset"], a["blob"]["length"]) for a in index.get("attachments", [])})
    gaps, end = {}, 0
    for offset, length in spans:
        gaps[offset] = max(offset - end, 0)
        end = max(end, offset + length)
    params = total = 0
    for rec in index["tensors"]:
        if records.is_lossy(rec):  # an adapted record: its inner record's rows and blobs (new rows are exact)
            coded = records.inner(rec)["blobs"] if rec["kind"] == Kind.ADAPTED else rec["blobs"]
            params += records.coded_params(rec)
            total += packed_len(rec) + sum(b["length"] + gaps[b["offset"]] for b in coded)
    return params, total


def measure(method, base, ft, index: dict, file_bytes: int) -> Coverage:
    """The coverage of an encode from its index (records in fine-tune order) and the file's size."""
    lossy = method.codes_tensors()
    coded = {r["name"] for r in index["tensors"] if records.is_lossy(r)}
    kept = [r for r in index["tensors"] if r["kind"] != Kind.REMOVED]
    params = sum(math.prod(r["shape"]) for r in kept)
    uncoded: dict[str, list] = {}
    for r in kept:
        if r["name"] in coded:
            continue
        name = r["name"]
        reason = uncoded_reason(method, name, ft.info(name), base.info(name) if name in base else None)
        uncoded.setdefault(reason or f"kept exact by {method.name}", []).append((name, math.prod(r["shape"])))
    coded_params, coded_bytes = lossy_record_bytes(index)
    ratio = getattr(method, "ratio", None)
    return Coverage(
        method=method.name, lossy=lossy,
        ratio=None if ratio is None else f"{ratio.numerator}/{ratio.denominator}",
        budget_bits=None if ratio is None else float(16 * ratio),
        params=params, coded_params=coded_params, coded_tensors=len(coded), tensors=len(kept),
        file_bits=8 * file_bytes / params if params else 0.0,
        coded_bits=8 * coded_bytes / coded_params if coded_params else None,
        uncoded=uncoded if lossy else {})
