"""dcm.verify: whole-file checks, with and without the base; dcm.info's accounting."""

from __future__ import annotations

import numpy as np
import pytest

import dcm
from conftest import write_checkpoint
from dcm.constants import HEADER_SIZE
from dcm.errors import LayoutError, PayloadChecksumError, TruncatedError, WrongBaseError
from dcm.info import format_info, sanitize


def pair_tensors(seed: int = 7):
    """Base and fine-tune: F32 / BF16 / I64 deltas, one base-only, one fine-tune-only tensor."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    w_ft = w.copy()
    w_ft[1] += np.float32(2e-3)
    bf = (rng.standard_normal(12).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    bf_ft = bf.copy()
    bf_ft[[0, 7]] += 3
    ids = np.arange(4, dtype=np.int64) * 1000
    base = {"w": ("F32", w), "bf": ("BF16", bf), "ids": ("I64", ids),
            "only_base": ("F32", np.ones(3, np.float32))}
    ft = {"w": ("F32", w_ft), "bf": ("BF16", bf_ft), "ids": ("I64", ids + 1),
          "only_ft": ("F32", np.zeros(40, np.float32))}
    return base, ft


ATTACHMENTS = {"config.json": b'{"model_type": "tiny"}\n'}


@pytest.fixture
def encoded(tmp_path):
    base, ft = pair_tensors()
    base_dir = write_checkpoint(tmp_path / "base", base)
    ft_dir = write_checkpoint(tmp_path / "ft", ft, attachments=ATTACHMENTS)
    out = tmp_path / "x.dcm"
    dcm.encode(base_dir, ft_dir, out)
    return out, base_dir, base, ft


def _blob_positions(path):
    """(absolute start, length, name) of every blob in the file."""
    with dcm.open(path) as f:
        start = f.header.data_start
        out = [(start + b["offset"], b["length"], r.name) for r in f.records() for b in r.blobs]
        out += [(start + a["blob"]["offset"], a["blob"]["length"], a["name"])
                for a in f.index.get("attachments", [])]
        index_end = HEADER_SIZE + f.header.index_length
    return out, index_end


def _flip(path, pos):
    data = bytearray(path.read_bytes())
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_without_base(encoded):
    out, *_ = encoded
    report = dcm.verify(out)
    d = dcm.info(out)
    assert report.records_checked == 5
    assert report.attachments_checked == 1
    assert report.blobs_checked == sum(r["blobs"] for r in d["records"]) + 1
    assert report.bytes_checked == d["totals"]["record_payload_bytes"] + d["totals"]["attachment_stored_bytes"]
    assert report.base_checked is False
    assert report.seconds >= 0


def test_verify_with_base(encoded):
    out, base_dir, *_ = encoded
    report = dcm.verify(out, base=base_dir)
    assert report.base_checked is True
    assert report.records_checked == 5
    # A single .safetensors file works as the base too.
    assert dcm.verify(out, base=base_dir / "model.safetensors").base_checked


def test_verify_wrong_base_names_tensor(encoded, tmp_path):
    out, _, base, _ = encoded
    bad = dict(base)
    w = base["w"][1].copy()
    w[2, 2] += 1
    bad["w"] = ("F32", w)
    with pytest.raises(WrongBaseError, match="'w'"):
        dcm.verify(out, base=write_checkpoint(tmp_path / "bad", bad))


def test_verify_wrong_removed_tensor_in_base(encoded, tmp_path):
    out, _, base, _ = encoded
    bad = dict(base)
    bad["only_base"] = ("F32", np.full(3, 2, np.float32))
    with pytest.raises(WrongBaseError, match="only_base"):
        dcm.verify(out, base=write_checkpoint(tmp_path / "bad", bad))


def test_verify_base_missing_or_extra_tensor(encoded, tmp_path):
    out, _, base, _ = encoded
    missing = {k: v for k, v in base.items() if k != "ids"}
    with pytest.raises(WrongBaseError, match="ids"):
        dcm.verify(out, base=write_checkpoint(tmp_path / "missing", missing))
    extra = dict(base, surplus=("I8", np.zeros(2, np.int8)))
    with pytest.raises(WrongBaseError, match="surplus"):
        dcm.verify(out, base=write_checkpoint(tmp_path / "extra", extra))


@pytest.mark.parametrize("which", ["w", "only_ft", "config.json"])
def test_verify_detects_corrupt_payload(encoded, which):
    out, *_ = encoded
    blobs, _ = _blob_positions(out)
    start, length, _ = next(b for b in blobs if b[2] == which and b[1] > 0)
    _flip(out, start + length // 2)
    dcm.info(out)  # payloads are not read to describe the file
    with pytest.raises(PayloadChecksumError, match=repr(which)):
        dcm.verify(out)


def test_verify_rejects_nonzero_padding(encoded):
    out, *_ = encoded
    blobs, index_end = _blob_positions(out)
    gaps = [(index_end, blobs[0][0])] + [(a[0] + a[1], b[0]) for a, b in zip(blobs, blobs[1:])]
    gap = next((lo, hi) for lo, hi in gaps if hi > lo)
    _flip(out, gap[0])
    dcm.info(out)  # the structure is intact...
    with pytest.raises(LayoutError, match="padding"):
        dcm.verify(out)  # ...but verify insists on zero padding


def test_verify_truncated(encoded):
    out, *_ = encoded
    out.write_bytes(out.read_bytes()[:-1])
    with pytest.raises(TruncatedError):
        dcm.verify(out)


def test_info_accounting(encoded):
    out, _, _, ft = encoded
    d = dcm.info(out)
    t = d["totals"]
    file_bytes = out.stat().st_size
    assert t["file_bytes"] == file_bytes
    assert t["records"] == len(d["records"]) == 5
    params = sum(np.asarray(a).size for _, a in ft.values())
    assert t["params"] == params
    assert t["bits_per_param"] == pytest.approx(8 * file_bytes / params)
    assert t["ratio_vs_dense16"] == pytest.approx(file_bytes / (2 * params))
    ft_bytes = sum(np.asarray(a).nbytes for _, a in ft.values())
    assert t["finetune_bytes"] == ft_bytes
    assert t["ratio_vs_finetune"] == pytest.approx(file_bytes / ft_bytes)
    assert sum(r["total_bytes"] for r in d["records"]) <= file_bytes
    assert (t["header_bytes"] + d["header"]["index_bytes"] + t["record_payload_bytes"]
            + t["attachment_stored_bytes"] + t["padding_bytes"]) == file_bytes
    assert t["record_index_bytes"] + t["index_other_bytes"] == d["header"]["index_bytes"]
    assert t["padding_bytes"] >= 0 and t["index_other_bytes"] > 0
    kinds = {r["name"]: r["kind"] for r in d["records"]}
    assert kinds == {"w": "dense-delta", "bf": "dense-delta", "ids": "dense-delta",
                     "only_ft": "full", "only_base": "removed"}
    removed = next(r for r in d["records"] if r["kind"] == "removed")
    assert removed["params"] == 0 and removed["bits_per_param"] is None
    for r in d["records"]:
        assert r["total_bytes"] == r["payload_bytes"] + r["index_bytes"]
        if r["params"]:
            assert r["bits_per_param"] == pytest.approx(8 * r["total_bytes"] / r["params"])
    assert sum(k["total_bytes"] for k in d["by_kind"].values()) == t["record_total_bytes"]
    assert sum(k["params"] for k in d["by_kind"].values()) == params
    assert d["attachments"] == [{"name": "config.json", "raw_bytes": len(ATTACHMENTS["config.json"]),
                                 "stored_bytes": len(ATTACHMENTS["config.json"]), "encoding": "raw"}]
    assert len(d["base_digest"]) == 64 and d["method"]["name"] == "lossless"
    text = format_info(d)
    for name in kinds:
        assert name in text
    assert str(file_bytes) in text


def test_sanitize():
    assert sanitize("a.weight") == "a.weight"
    assert sanitize("x\x1b]0;pwned\x07y") == "x\\x1b]0;pwned\\x07y"
    assert sanitize("rtl\u202eevil") == "rtl\\u202eevil"
    assert sanitize("back\\slash\n") == "back\\\\slash\\x0a"
    assert sanitize("ünïcode ok") == "ünïcode ok"


def test_hostile_names_are_escaped(tmp_path):
    name = "evil\x1b[2J\x1b]0;title\x07\u202e"
    base = {name: ("F32", np.zeros(2, np.float32))}
    ft = {name: ("F32", np.ones(2, np.float32))}
    out = tmp_path / "e.dcm"
    dcm.encode(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "f", ft), out)
    d = dcm.info(out)
    assert d["records"][0]["name"] == name  # the library gives the real name...
    text = format_info(d)
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text  # ...the table does not
    assert "evil\\x1b[2J" in text


def test_info_and_verify_without_parameters(tmp_path):
    base = {"a": ("F32", np.zeros(3, np.float32))}
    out = tmp_path / "n.dcm"
    base_dir = write_checkpoint(tmp_path / "b", base)
    dcm.encode(base_dir, write_checkpoint(tmp_path / "f", {}), out)
    t = dcm.info(out)["totals"]
    assert t["params"] == 0 and t["records"] == 1 and t["tensors"] == 0
    assert t["bits_per_param"] is None and t["ratio_vs_dense16"] is None and t["ratio_vs_finetune_str"] is None
    assert "bits per param:    -" in format_info(dcm.info(out))
    report = dcm.verify(out, base=base_dir)
    assert report.records_checked == 1 and report.blobs_checked == 0 and report.base_checked
