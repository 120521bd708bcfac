"""``dcm.info``: what a .dcm file holds and where its bytes go (nothing is decoded).

``info(path)`` returns plain JSON-able types (bytes as hex); ``format_info``
renders them as a table.  Every string that comes from the file (tensor and
attachment names, creator, method params, metadata) is escaped before it goes
to a terminal: a hostile file must not be able to move the cursor, retitle the
window or hide lines (like ``gguf-dump`` does).
"""

from __future__ import annotations

import os
from fractions import Fraction

from . import dtypes
from .constants import HEADER_SIZE, KIND_NAMES, Encoding, Kind
from .reader import DcmFile
from .records import coded_params, inner, is_lossy

# --- plain types and terminal safety -----------------------------------------------


def plain(obj):
    """``obj`` with bytes as hex, tuples as lists and map keys as strings (for JSON)."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def sanitize(text, *, escape_backslash: bool = True) -> str:
    """``text`` with control and other non-printable characters written as escapes.

    Backslashes are doubled (unless ``escape_backslash`` is false, for text such
    as error messages whose names are already repr()-escaped) so that an escape
    in the output is never ambiguous with a name that spells one out.
    """
    text = str(text)
    out = []
    for ch in text:
        if ch == "\\" and escape_backslash:
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)


def one_in(ratio) -> str | None:
    """0.0625 -> '1/16.0' (how many times smaller); above 1, '1.25x'."""
    if ratio is None:
        return None
    if ratio <= 0:
        return "1/inf"
    if ratio > 1:  # larger than the reference: "1/0.1" would read badly
        return f"{ratio:.2f}x"
    inverse = 1 / ratio
    return f"1/{inverse:.2f}" if inverse < 10 else f"1/{inverse:.1f}"


def _encoding(number: int) -> str:
    try:
        return Encoding(number).name.lower()
    except ValueError:
        return f"encoding-{number}"


def _bits(total_bytes: int, params: int):
    return 8 * total_bytes / params if params else None


def _budget_bits(ratio):
    """16 x the ratio a lossy method was asked for (its params' "ratio", e.g. "1/16"), or None."""
    try:
        value = Fraction(str(ratio))
    except (ValueError, ZeroDivisionError):
        return None
    return float(16 * value) if 0 < value <= 1 else None


# --- the facts -------------------------------------------------------------------


def padding_before(dcm: DcmFile) -> dict[int, int]:
    """Alignment padding in front of each payload, keyed by payload offset.

    Payloads are laid out in offset order from the data section's start; the gap before one
    is the padding its alignment cost, so it is charged to the payload's owner.
    """
    spans = sorted({(b["offset"], b["length"]) for rec in dcm.records() for b in rec.blobs}
                   | {(a["blob"]["offset"], a["blob"]["length"]) for a in dcm.index.get("attachments", [])})
    gaps, end = {}, 0  # offsets count from the data section's start
    for offset, length in spans:
        gaps[offset] = max(offset - end, 0)
        end = max(end, offset + length)
    return gaps


def info(path) -> dict:
    """Sizes, kinds and metadata of a .dcm file, as plain types (see module docstring)."""
    with DcmFile(path) as dcm:
        file_bytes = os.path.getsize(dcm.path)
        header = dcm.header
        records, kinds = [], {}
        rec_payload = rec_index = params = ft_bytes = 0
        lossy = {"records": 0, "params": 0, "payload_bytes": 0, "index_bytes": 0, "padding_bytes": 0}
        gaps = padding_before(dcm)
        for rec in dcm.records():
            removed = rec.kind == Kind.REMOVED
            n = 0 if removed else rec.numel
            pad = sum(gaps[b["offset"]] for b in rec.blobs)
            entry = dcm.index_entry(rec.name)
            row = {
                "name": rec.name,
                "kind": rec.kind_name,
                "inner": KIND_NAMES.get(entry["params"]["inner"]) if rec.kind == Kind.ADAPTED else None,
                "dtype": rec.dtype,
                "shape": list(rec.shape),
                "params": n,
                "blobs": len(rec.blobs),
                "payload_bytes": rec.payload_bytes,
                "index_bytes": rec.index_bytes,
                "total_bytes": rec.total_bytes,
                "padding_bytes": pad,
                "bits_per_param": _bits(rec.total_bytes, n),
            }
            records.append(row)
            if is_lossy(entry):  # an adapted record: its inner record's rows and blobs
                coded = inner(entry)["blobs"] if rec.kind == Kind.ADAPTED else rec.blobs
                for key, value in (("records", 1), ("params", coded_params(entry)),
                                   ("payload_bytes", sum(b["length"] for b in coded)),
                                   ("index_bytes", rec.index_bytes),
                                   ("padding_bytes", sum(gaps[b["offset"]] for b in coded))):
                    lossy[key] += value
            k = kinds.setdefault(rec.kind_name, {"records": 0, "params": 0, "payload_bytes": 0,
                                                 "index_bytes": 0, "total_bytes": 0})
            k["records"] += 1
            k["params"] += n
            k["payload_bytes"] += rec.payload_bytes
            k["index_bytes"] += rec.index_bytes
            k["total_bytes"] += rec.total_bytes
            rec_payload += rec.payload_bytes
            rec_index += rec.index_bytes
            params += n
            if not removed:
                ft_bytes += n * dtypes.dtype(rec.dtype).itemsize
        for k in kinds.values():
            k["bits_per_param"] = _bits(k["total_bytes"], k["params"])
        lossy["bytes"] = lossy["payload_bytes"] + lossy["index_bytes"] + lossy["padding_bytes"]
        lossy["bits_per_param"] = _bits(lossy["bytes"], lossy["params"])
        # Kinds in registry order, then any others.
        order = [KIND_NAMES[k] for k in Kind if KIND_NAMES[k] in kinds]
        by_kind = {name: kinds[name] for name in order + sorted(set(kinds) - set(order))}

        attachments = []
        for att in dcm.index.get("attachments", []):
            blob = att["blob"]
            attachments.append({"name": att["name"], "raw_bytes": blob["raw_length"],
                                "stored_bytes": blob["length"], "encoding": _encoding(blob["encoding"])})
        att_stored = sum(a["stored_bytes"] for a in attachments)
        index_other = header.index_length - rec_index
        padding = file_bytes - HEADER_SIZE - header.index_length - rec_payload - att_stored
        meta = dcm.metadata()
        ratio16 = file_bytes / (2 * params) if params else None
        lossy["coded_fraction"] = lossy["params"] / params if params else None
        lossy["budget_bits_per_param"] = _budget_bits(meta["params"].get("ratio"))
        lossy["ratio"] = meta["params"].get("ratio")
        ratio_ft = file_bytes / ft_bytes if ft_bytes else None
        return plain({
            "path": str(dcm.path),
            "header": {
                "version": meta["format"],
                "alignment": header.alignment,
                "required_flags": header.required_flags,
                "optional_flags": header.optional_flags,
                "header_bytes": HEADER_SIZE,
                "index_bytes": header.index_length,
                "data_start": header.data_start,
                "file_length": header.file_length,
            },
            "method": {"name": meta["method"], "params": meta["params"]},
            "choices": _choices(meta["params"], by_kind),
            "encodings": _encodings(dcm),
            "creator": meta["creator"],
            "base_digest": meta["base_digest"],
            "checkpoint_metadata": meta["checkpoint_metadata"],
            "records": records,
            "attachments": attachments,
            "by_kind": by_kind,
            "totals": {
                "file_bytes": file_bytes,
                "records": len(records),
                "tensors": sum(1 for r in records if r["kind"] != KIND_NAMES[Kind.REMOVED]),
                "params": params,
                "finetune_bytes": ft_bytes,
                "record_payload_bytes": rec_payload,
                "record_index_bytes": rec_index,
                "record_total_bytes": rec_payload + rec_index,
                "attachments": len(attachments),
                "attachment_stored_bytes": att_stored,
                "attachment_raw_bytes": sum(a["raw_bytes"] for a in attachments),
                "header_bytes": HEADER_SIZE,
                "index_other_bytes": index_other,  # method, base digest, attachment entries...
                "padding_bytes": padding,
                "bits_per_param": _bits(file_bytes, params),
                # The lossy records alone, every byte they cost (index entry, payload, the padding
                # before it): what a method's --ratio budgets.
                "compressed": lossy,
                "ratio_vs_dense16": ratio16,
                "ratio_vs_dense16_str": one_in(ratio16),
                "ratio_vs_finetune": ratio_ft,
                "ratio_vs_finetune_str": one_in(ratio_ft),
            },
        })


# --- rendering ---------------------------------------------------------------------


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _fmt_bits(b) -> str:
    return "-" if b is None else f"{b:.3f}"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _choices(params: dict, by_kind: dict) -> dict | None:
    """How a quantizing method chose its codes (quantizer, grids, rotation), from method.params and the
    records: None for a method that quantizes nothing."""
    if "quantizer" not in params and "lowrank-rotated" not in by_kind:
        return None
    return {"quantizer": params.get("quantizer"), "clip": params.get("clip"), "rotation": params.get("rotation"),
            "alloc": params.get("alloc"),
            "rotated_records": by_kind.get("lowrank-rotated", {}).get("records", 0)}


def _encodings(dcm) -> dict:
    """Blobs per encoding (records and attachments): count, stored and raw bytes."""
    out = {}
    blobs = [b for rec in dcm.records() for b in rec.blobs] + [a["blob"] for a in dcm.index.get("attachments", [])]
    for blob in blobs:
        e = out.setdefault(_encoding(blob["encoding"]), {"blobs": 0, "stored_bytes": 0, "raw_bytes": 0})
        e["blobs"] += 1
        e["stored_bytes"] += blob["length"]
        e["raw_bytes"] += blob["raw_length"]
    return out
def _param_text(value) -> str:
    """A method param for the one-line summary: a long list (gptq_tensors) as its count and first items."""
    if isinstance(value, list) and len(value) > 3:
        return f"[{', '.join(sanitize(v) for v in value[:2])}, ... {len(value)} in all]"
    return sanitize(value)


def format_info(d: dict) -> str:
    """A readable report of ``info()``'s dict; strings from the file are escaped."""
    s = sanitize
    h, t, m = d["header"], d["totals"], d["method"]
    params = ", ".join(f"{s(k)}={_param_text(v)}" for k, v in m["params"].items())
    lines = [
        f"file:        {s(d['path'])}",
        f"format:      {h['version']}  alignment {h['alignment']}  index {h['index_bytes']} B  "
        f"data at {h['data_start']}  flags {h['required_flags']:#x}/{h['optional_flags']:#x}",
        f"method:      {s(m['name'])}" + (f" ({params})" if params else ""),
        f"creator:     {s(d['creator'])}",
        f"base digest: {d['base_digest']}",
    ]
    c = d.get("choices")
    if c:
        lines.append(f"choices:     quantizer {s(c['quantizer'] or '-')}, grids {s(c['clip'] or 'minmax')}, "
                     f"rotation {s(c['rotation'] or 'none')} ({c['rotated_records']} lowrank-rotated records), "
                     f"allocation {s(c['alloc'] or '-')}")
    if d.get("encodings"):
        lines.append("blobs:       " + ", ".join(f"{name} {e['blobs']} ({e['stored_bytes']} of {e['raw_bytes']} B)"
                                                for name, e in d["encodings"].items()))
    if d["checkpoint_metadata"]:
        meta = ", ".join(f"{s(k)}={s(v)}" for k, v in d["checkpoint_metadata"].items())
        lines.append(f"metadata:    {meta}")
    lines.append("")
    rows = [[s(r["name"]), r["kind"] + (f"({r['inner']})" if r.get("inner") else ""), r["dtype"], "x".join(map(str, r["shape"])) or "scalar",
             str(r["params"]), str(r["payload_bytes"]), str(r["index_bytes"]), str(r["total_bytes"]),
             _fmt_bits(r["bits_per_param"])] for r in d["records"]]
    lines += _table(["tensor", "kind", "dtype", "shape", "params", "payload", "index", "total", "bits/param"],
                    rows, {4, 5, 6, 7, 8})
    if d["attachments"]:
        lines.append("")
        rows = [[s(a["name"]), str(a["raw_bytes"]), str(a["stored_bytes"])] for a in d["attachments"]]
        lines += _table(["attachment", "raw", "stored"], rows, {1, 2})
    lines.append("")
    rows = [[kind, str(k["records"]), str(k["params"]), str(k["payload_bytes"]), str(k["index_bytes"]),
             str(k["total_bytes"]), _fmt_bits(k["bits_per_param"])] for kind, k in d["by_kind"].items()]
    lines += _table(["kind", "records", "params", "payload", "index", "total", "bits/param"],
                    rows, {1, 2, 3, 4, 5, 6})
    lines += [
        "",
        f"records:           {t['records']} ({t['tensors']} tensors in the fine-tune)",
        f"params:            {t['params']}",
        f"file bytes:        {t['file_bytes']} ({_size(t['file_bytes'])}) = header {t['header_bytes']}"
        f" + index {h['index_bytes']} (records {t['record_index_bytes']}, other {t['index_other_bytes']})"
        f" + payloads {t['record_payload_bytes']} + attachments {t['attachment_stored_bytes']}"
        f" + padding {t['padding_bytes']}",
        f"bits per param:    {_fmt_bits(t['bits_per_param'])}",
    ]
    c = t["compressed"]
    if c["records"]:
        lines.append(f"compressed:        {c['records']} tensors, {c['params']} params in {c['bytes']} B"
                     f" (index {c['index_bytes']} + payload {c['payload_bytes']} + padding {c['padding_bytes']})"
                     f" = {_fmt_bits(c['bits_per_param'])} bits/param")
    if c["records"] or c["budget_bits_per_param"] is not None:
        budget = c["budget_bits_per_param"]
        lines.append(f"coded:             {_pct(c['coded_fraction'])} of the params by {s(m['name'])}; whole file "
                     f"{_fmt_bits(t['bits_per_param'])} bits/param"
                     + (f", budget {budget:.3f} (ratio {s(c['ratio'])})" if budget is not None else ""))
    lines += [
        f"vs 16-bit dense:   {_ratio(t['ratio_vs_dense16'], t['ratio_vs_dense16_str'])}",
        f"vs fine-tune:      {_ratio(t['ratio_vs_finetune'], t['ratio_vs_finetune_str'])}"
        f" ({t['finetune_bytes']} B of tensors)",
    ]
    checked = d.get("payloads_checked")
    if checked:
        lines.append(f"payloads:          all {checked['blobs']} checked ({checked['bytes']} B): checksums match, "
                     f"every payload decodes")
    else:
        lines.append("payloads:          not checked (`dcm info --check` or `dcm verify` reads them all)")
    return "\n".join(lines)


def _pct(fraction) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def _ratio(value, text) -> str:
    return "-" if value is None else f"{value:.4f} ({text})"
