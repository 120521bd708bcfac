"""The conformance vectors catch wrong decoders (spec issue 20): each decoder below
is ``spec/reference/dcmref.py`` with one rule of the spec misread, as an
implementer in another language might misread it, and must fail at least one
vector of ``spec/vectors/`` when run by the procedure of spec 19.3
(``spec/reference/run_vectors.py``).  Before these vectors, every one of them
passed the whole suite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "spec" / "reference"))
import dcmref  # noqa: E402
import run_vectors  # noqa: E402

MANIFEST = json.loads((ROOT / "spec" / "vectors" / "index.json").read_text())["vectors"]


def failing_vectors() -> list[str]:
    """The vectors the (patched) reference decoder gets wrong, by 19.3."""
    failed = []
    for v in MANIFEST:
        try:
            errs = run_vectors.run_faulty(v)[0] if v["tier"] == "faulty" else run_vectors.run_valid(v)
        except dcmref.DcmRefError:
            errs = ["rejected"]
        if errs:
            failed.append(v["path"])
    return failed


# --- the misreadings -------------------------------------------------------------------------------


def f16_truncated(mp):
    """10.7: F16 rounded toward zero instead of to nearest-even."""
    original = dcmref.from_float32

    def from_float32(dtype, x):
        if dtype != "F16":
            return original(dtype, x)
        x = np.asarray(x, np.float32)
        y = x.astype(np.float16)
        y = np.where(np.abs(y.astype(np.float32)) > np.abs(x), np.nextafter(y, np.float16(0)), y)
        return y.astype("<f2").tobytes()
    mp.setattr(dcmref, "from_float32", from_float32)


def one_rounding(mp):
    """10.7: the exact sum rounded to F16 once, not to float32 and then to F16."""
    original = dcmref.rebuild

    def rebuild(r, payload, base_raw):
        if r.kind not in (4, 5, 6, 7, 8, 10) or r.dtype != "F16":  # kind 9 recurses into this for its inner record
            return original(r, payload, base_raw)
        exact = dcmref.to_float32(r.dtype, base_raw).astype(np.float64) + np.asarray(payload.delta(), np.float64)
        return exact.astype("<f2").tobytes()
    mp.setattr(dcmref, "rebuild", rebuild)


def negative_zero_coded(mp):
    """10.10: a sign row whose scale is −0 taken for a coded row."""
    def payload_sign(r, raws):
        m, n = r.shape
        raw, per_row = raws[0], r.params["scales"] == 1
        stored = np.frombuffer(raw[:4 * (m if per_row else 1)], "<f4")
        alpha = stored if per_row else np.repeat(stored, m)
        coded = (alpha != 0) | np.signbit(alpha)
        parts = dcmref.split_sections(raw, dcmref.sign_sizes(m, n, r.params["scales"], int(coded.sum())), r.what)
        bits = dcmref.unpack_bits(parts[1], int(coded.sum()) * n, 1, r.what).reshape(-1, n)

        def delta():
            out = np.zeros((m, n), np.float32)
            out[coded] = np.where(bits == 1, alpha[coded][:, None], -alpha[coded][:, None])
            return out.ravel()
        return dcmref.Payload(bits.tobytes(), alpha.astype("<f4").tobytes(), delta)
    mp.setitem(dcmref.PAYLOADS, 6, payload_sign)


def dropped_at_threshold(mp):
    """10.8: an element dropped when r(seed, c) ≤ drop instead of r < drop."""
    mp.setattr(dcmref, "kept_by_hash", lambda seed, c, drop: dcmref.mask_hash(seed, c) > np.uint64(drop))
    original = dcmref.sl_masks

    def sl_masks(r, raw, k):
        kv, ku = original(r, raw, k)
        if r.params["mask"] == dcmref.MASK_HASH:
            m, n = r.shape
            drops = np.frombuffer(raw[4 * k:8 * k], "<u4").astype(np.uint64)[:, None]
            i = np.arange(k, dtype=np.uint64)[:, None] << np.uint64(33)
            kv &= dcmref.mask_hash(r.params["seed"], i + np.arange(n, dtype=np.uint64)) != drops
            ku &= dcmref.mask_hash(r.params["seed"], i + np.uint64(1 << 32) + np.arange(m, dtype=np.uint64)) != drops
        return kv, ku
    mp.setattr(dcmref, "sl_masks", sl_masks)


def u_mask_continues(mp):
    """10.9: the U mask read as the continuation of the V mask's bit stream."""
    original = dcmref.sl_masks

    def sl_masks(r, raw, k):
        if r.params["mask"] != dcmref.MASK_BITMASK:
            return original(r, raw, k)
        m, n = r.shape
        bits = np.unpackbits(np.frombuffer(raw[4 * k:], np.uint8), bitorder="little")
        return bits[:k * n].reshape(k, n).astype(bool), bits[k * n:k * (n + m)].reshape(k, m).astype(bool)
    mp.setattr(dcmref, "sl_masks", sl_masks)


def content_size_without_offset(mp):
    """8.1: a 2-byte Frame_Content_Size read without adding 256."""
    original = dcmref.zstd_header

    def zstd_header(s, raw_length, where):
        if len(s) > 4 and s[4] >> 6 == 1:  # a 2-byte field: compare what a reader without the offset sees
            raw_length += 256
        return original(s, raw_length, where)
    mp.setattr(dcmref, "zstd_header", zstd_header)


def quantity_unknown_kind(mp):
    """10.1: a quantity out of range reported as UnknownKindError (the old text of 10.12)."""
    original = dcmref.int_range

    def int_range(r, key, lo, hi):
        def check(v):
            try:
                original(r, key, lo, hi)(v)
            except dcmref.PayloadError as e:
                raise dcmref.UnknownKindError(str(e)) from None
        return check
    mp.setattr(dcmref, "int_range", int_range)


def params_before_base(mp):
    """10.1: a dense-delta record's params checked before its base reference (the old order)."""
    def open_dense_delta(r):
        dcmref.check_params(r, [("transform", dcmref.int_in(r, "transform", (dcmref.SUB_ZIGZAG,))),
                                ("layout", dcmref.int_in(r, "layout", (dcmref.PLAIN, dcmref.BYTE_PLANES)))])
        dcmref.need_base_equal(r)
        dcmref.check_dense_blobs(r)
    mp.setitem(dcmref.OPENERS, 1, open_dense_delta)


def padding_unchecked(mp):
    """7: a verifier that never checks the padding (what only the verifier procedure of 19.3 must do)."""
    mp.setattr(dcmref, "check_padding", lambda *args: None)


WRONG = [f16_truncated, one_rounding, negative_zero_coded, dropped_at_threshold, u_mask_continues,
         content_size_without_offset, quantity_unknown_kind, params_before_base, padding_unchecked]


def test_reference_decoder_passes_every_vector():
    assert failing_vectors() == []


@pytest.mark.parametrize("misreading", WRONG, ids=[f.__name__ for f in WRONG])
def test_wrong_decoder_fails_a_vector(misreading, monkeypatch):
    misreading(monkeypatch)
    assert failing_vectors(), f"a decoder that misreads {misreading.__doc__.strip()} passes every vector"
