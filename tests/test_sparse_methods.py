"""ImPart, ImPart-Qt and the baselines (spec 10.8–10.12): masks, payloads, budgets, the CLI.

Masks are regenerated here from the spec's hash definition with plain Python
integers, and files are read with ``struct``, ``msgpack`` and ``zstandard``
alone, so neither depends on the encoder's code path.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zstandard

import dcm
from dcm import baseline_payloads, masks, quant, sparse_lowrank
from dcm.methods import gptq
from dcm.cli import main
from dcm.constants import Kind, MaskEncoding, SignScales
from dcm.errors import DcmError, IndexSchemaError, PayloadError, UnknownKindError, UsageError
from dcm.methods.impart import sparsities
from dcm.lowrank import BitGroup
from dcm.records import KINDS
from dcm.sparse_lowrank import Payload, Values

import spec_oracle
from conftest import read_checkpoint as read_tensors
from conftest import storage, write_checkpoint


def read_checkpoint(path) -> dict:
    return {name: array for name, (_, array) in read_tensors(path).items()}

HEADER = struct.Struct("<8sHHIIIQQ20sI")
LOSSY = {4, 5, 6, 7, 8, 10}  # the lossy record kinds (10: lowrank-rotated)
M64 = 2**64


# --- the spec's hash, independently -----------------------------------------------------------


def spec_r(seed: int, counter: int) -> int:
    """r(seed, c) of spec 10.8 with Python integers."""
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) % M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M64
    z ^= z >> 31
    return z >> 32


def spec_kept(seed: int, counters, drop: int) -> np.ndarray:
    return np.array([spec_r(seed, c) >= drop for c in counters], dtype=bool)


def test_hash_matches_the_spec_examples():
    z0 = (0x9E3779B97F4A7C15) % M64  # SplitMix64 seeded with 0, output 0
    z0 = ((z0 ^ (z0 >> 30)) * 0xBF58476D1CE4E5B9) % M64
    z0 = ((z0 ^ (z0 >> 27)) * 0x94D049BB133111EB) % M64
    assert z0 ^ (z0 >> 31) == 0xE220A8397B1DCDAF
    seed = 0x0123456789ABCDEF
    expected = {0: 0x157A3807, 1: 0xD573529B, 2: 0x2F90B72E, 3: 0xA2D41933, 0xB00000007: 0x5D514F96}
    for c, r in expected.items():
        assert spec_r(seed, c) == r
        assert int(masks.uniform32(seed, np.array([c], dtype=np.uint64))[0]) == r
    spec = (Path(__file__).parent.parent / "spec" / "dcm-format.md").read_text(encoding="utf-8")
    for c, r in expected.items():
        assert f"| 0x{r:08x} |" in spec


def test_hash_agrees_on_random_seeds_and_counters(rng):
    for _ in range(5):
        seed = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        counters = rng.integers(0, 2**62, size=200, dtype=np.int64).astype(np.uint64)
        got = masks.uniform32(seed, counters)
        assert [int(x) for x in got] == [spec_r(seed, int(c)) for c in counters]


def test_drop_rule_extremes_and_rate():
    assert masks.kept_flat(7, 1000, 0).all()
    assert not masks.kept_flat(7, 1000, masks.DROP_ALL).any()
    kept = masks.kept_flat(7, 200_000, masks.drop_threshold(0.9))
    assert abs(kept.mean() - 0.1) < 0.005


# --- reading a file independently ------------------------------------------------------------


def read_file(path):
    raw = Path(path).read_bytes()
    _, major, minor, _, _, align, index_len, _, _, _ = HEADER.unpack(raw[:64])
    index = msgpack.unpackb(raw[64:64 + index_len], raw=False)
    data_start = -(-(64 + index_len) // align) * align
    return (major, minor), index, raw, data_start


def raw_blob(raw: bytes, data_start: int, blob: dict) -> bytes:
    stored = raw[data_start + blob["offset"]:data_start + blob["offset"] + blob["length"]]
    if blob["encoding"] == 1:
        return zstandard.ZstdDecompressor().decompress(stored, max_output_size=blob["raw_length"])
    if blob["encoding"] == 2:  # rans (spec 8.2), by the independent decoder
        return spec_oracle.dcmref.unrans(bytes(stored), blob["raw_length"], "blob")
    return stored


def lossy_cost(path) -> tuple[int, int]:
    """(bytes of the lossy records: index entries, stored blobs, padding before them; their parameters)."""
    _, index, _, _ = read_file(path)
    sequence = [(rec["name"], b) for rec in index["tensors"] for b in rec["blobs"]]
    sequence += [(None, att["blob"]) for att in index.get("attachments", [])]
    padding, end = {}, 0
    for owner, blob in sequence:
        padding[owner] = padding.get(owner, 0) + blob["offset"] - end
        end = blob["offset"] + blob["length"]
    total = params = 0
    for rec in index["tensors"]:
        if rec["kind"] in LOSSY:
            total += len(msgpack.packb(rec, use_bin_type=True)) + sum(b["length"] for b in rec["blobs"])
            total += padding.get(rec["name"], 0)
            params += math.prod(rec["shape"])
    return total, params


# --- a synthetic pair -------------------------------------------------------------------------


def pair_tensors(seed=0, dtype_name="F32"):
    rng = np.random.default_rng(seed)
    base, ft = {}, {}
    for name, (m, n) in {"a.weight": (96, 64), "b.weight": (64, 160), "c.weight": (48, 48)}.items():
        w = rng.standard_normal((m, n)).astype(np.float32)
        low = rng.standard_normal((m, 6)) @ rng.standard_normal((6, n)) * 0.02
        delta = (low + 0.003 * rng.standard_normal((m, n))).astype(np.float32)
        base[name], ft[name] = storage(dtype_name, w), storage(dtype_name, w + delta)
    bias = rng.standard_normal(64).astype(np.float32)
    base["a.bias"], ft["a.bias"] = storage(dtype_name, bias), storage(dtype_name, bias + 0.01)
    return base, ft


@pytest.fixture
def pair(tmp_path):
    base, ft = pair_tensors()
    write_checkpoint(tmp_path / "base", {n: ("F32", a) for n, a in base.items()})
    write_checkpoint(tmp_path / "ft", {n: ("F32", a) for n, a in ft.items()})
    return tmp_path / "base", tmp_path / "ft", base, ft


METHODS = ["impart", "impart-qt", "lowrank", "dare", "bitdelta"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", ["1/8", "1/16"])
def test_cli_encodes_within_budget_and_decodes(pair, tmp_path, method, ratio, capsys):
    base, ft, base_t, ft_t = pair
    out = tmp_path / f"{method}.dcm"
    assert main(["encode", str(base), str(ft), "-o", str(out), "--method", method, "--ratio", ratio, "-q"]) == 0
    (major, minor), index, _, _ = read_file(out)
    assert (major, minor) == (1, 2)
    kinds = {rec["name"]: rec["kind"] for rec in index["tensors"]}
    assert all(kinds[n] in LOSSY for n in ("a.weight", "b.weight", "c.weight"))
    assert kinds["a.bias"] == Kind.DENSE_DELTA
    spent, params = lossy_cost(out)
    assert spent <= params * 16 * float(eval(ratio)) / 8
    assert main(["verify", str(out), "--base", str(base), "-q"]) == 0
    assert main(["decode", str(out), "--base", str(base), "-o", str(tmp_path / "dec"), "-q"]) == 0
    got = read_checkpoint(tmp_path / "dec")
    np.testing.assert_array_equal(got["a.bias"], ft_t["a.bias"])
    names = ("a.weight", "b.weight", "c.weight")
    delta = {n: ft_t[n].astype(np.float64) - base_t[n] for n in names}
    coded = {n: got[n].astype(np.float64) - base_t[n] for n in names}
    energy = sum(float((d ** 2).sum()) for d in delta.values())
    err = math.sqrt(sum(float(((coded[n] - delta[n]) ** 2).sum()) for n in names) / energy)
    if method == "dare":  # noise by design (error ~ sqrt(p / (1 - p)) > 1), but unbiased: <Δ̂, Δ> ≈ ‖Δ‖²
        projection = sum(float((coded[n] * delta[n]).sum()) for n in names) / energy
        drop = {n: np.count_nonzero(coded[n] == 0) / coded[n].size for n in names}  # p, whatever the mask
        sd = math.sqrt(sum(float((delta[n] ** 4).sum()) * drop[n] / (1 - drop[n]) for n in names)) / energy
        assert sd < 0.2 and abs(projection - 1) <= 5 * sd, (projection, sd)  # the base (0) fails
        assert err <= 1.5 * CLI_MEASURED[method, ratio], err
    else:  # within 1.5x of what the method achieved here, and never halfway to the base's 1.0
        assert err <= min(1.5 * CLI_MEASURED[method, ratio], (1 + CLI_MEASURED[method, ratio]) / 2), err


# Relative error over the three matrices of ``pair`` measured when the bound above was set (the
# tighter per-method checks, budgets included, are in test_method_bounds.py).
CLI_MEASURED = {
    ("impart", "1/8"): 0.5025, ("impart", "1/16"): 0.7990,
    ("impart-qt", "1/8"): 0.3749, ("impart-qt", "1/16"): 0.5902,
    ("lowrank", "1/8"): 0.4169, ("lowrank", "1/16"): 0.7972,
    ("dare", "1/8"): 2.8092, ("dare", "1/16"): 15.0309,
    ("bitdelta", "1/8"): 0.5939, ("bitdelta", "1/16"): 0.8111,
}


@pytest.mark.parametrize("method", ["impart", "impart-qt", "lowrank", "dare"])
def test_more_bytes_less_error(pair, tmp_path, method):
    base, ft, base_t, ft_t = pair
    errors = []
    for ratio in ("1/32", "1/4"):
        out = tmp_path / f"{method}-{ratio.replace('/', '_')}.dcm"
        dcm.encode(base, ft, out, method=method, ratio=ratio)
        dcm.decode(out, base, tmp_path / f"dec-{ratio.replace('/', '_')}")
        got = read_checkpoint(tmp_path / f"dec-{ratio.replace('/', '_')}")
        errors.append(sum(np.linalg.norm(got[n].astype(np.float64) - ft_t[n]) for n in ("a.weight", "b.weight")))
    assert errors[1] < errors[0]


def test_ratio_too_small_for_the_index_entries_is_refused(pair, tmp_path):
    base, ft, _, _ = pair
    for method in ("impart", "dare", "lowrank", "bitdelta"):
        with pytest.raises(UsageError, match="raise the ratio"):
            dcm.encode(base, ft, tmp_path / "x.dcm", method=method, ratio="1/100000")
    assert not (tmp_path / "x.dcm").exists()


# --- masks regenerated from the spec ---------------------------------------------------------


def test_dare_positions_regenerate_from_the_spec_hash(pair, tmp_path):
    base, ft, base_t, ft_t = pair
    out = tmp_path / "dare.dcm"
    dcm.encode(base, ft, out, method="dare", ratio="1/8", options={"mask": "hash", "seed": 5})
    _, index, raw, start = read_file(out)
    dcm.decode(out, base, tmp_path / "dec")
    got = read_checkpoint(tmp_path / "dec")
    for rec in index["tensors"]:
        if rec["kind"] != Kind.SPARSE:
            continue
        p = rec["params"]
        assert p["mask"] == MaskEncoding.HASH and 0 < p["drop"] < 2**32
        count = math.prod(rec["shape"])
        kept = spec_kept(p["seed"], range(count), p["drop"])
        blob = raw_blob(raw, start, rec["blobs"][0])
        assert len(blob) == 2 * int(kept.sum())  # one float16 per kept element, nothing else
        values = np.frombuffer(blob, dtype="<f2").astype(np.float32)
        changed = (got[rec["name"]] != base_t[rec["name"]]).reshape(-1)
        assert not changed[~kept].any()  # dropped elements keep the base value exactly
        expected = base_t[rec["name"]].reshape(-1)[kept] + values
        np.testing.assert_array_equal(got[rec["name"]].reshape(-1)[kept], expected.astype(np.float32))
        # the rescale 1/(1 - p) is part of the method
        delta = (ft_t[rec["name"]].astype(np.float32) - base_t[rec["name"]]).reshape(-1)[kept]
        scale = 1 / (1 - p["drop"] / 2**32)
        np.testing.assert_allclose(values, (delta * scale).astype(np.float16), rtol=2e-3, atol=1e-7)


def test_impart_positions_regenerate_from_the_spec_hash(pair, tmp_path):
    base, ft, _, _ = pair
    out = tmp_path / "impart.dcm"
    dcm.encode(base, ft, out, method="impart", ratio="1/8", options={"mask": "hash", "seed": 9})
    _, index, raw, start = read_file(out)
    checked = 0
    for rec in index["tensors"]:
        if rec["kind"] != Kind.SPARSE_LOWRANK or not rec["params"]["groups"]:
            continue
        m, n = rec["shape"]
        groups = rec["params"]["groups"]
        k = groups[-1][1]
        seed = rec["params"]["seed"]
        blob = raw_blob(raw, start, rec["blobs"][0])
        drops = np.frombuffer(blob[4 * k:8 * k], dtype="<u4")
        v_keep = np.array([spec_kept(seed, [(i << 33) + j for j in range(n)], int(d)) for i, d in enumerate(drops)])
        u_keep = np.array([spec_kept(seed, [(i << 33) + (1 << 32) + j for j in range(m)], int(d))
                           for i, d in enumerate(drops)])
        payload = sparse_lowrank.unpack_blob(blob, (m, n), [BitGroup(*g) for g in groups], 1, seed, rec["name"])
        np.testing.assert_array_equal(payload.v_keep, v_keep)
        np.testing.assert_array_equal(payload.u_keep, u_keep)
        u, v = payload.factors([BitGroup(*g) for g in groups])
        assert not u[~u_keep].any() and not v[~v_keep].any()
        # float16 values only: after S and the drops, exactly 2 bytes per kept element (plus alignment)
        kept = int(v_keep.sum() + u_keep.sum())
        assert 8 * k + 2 * kept <= len(blob) <= 8 * k + 2 * kept + 3
        checked += 1
    assert checked >= 2


# --- payloads ------------------------------------------------------------------------------------


def test_sparse_example_of_the_spec():
    rec = {"name": "x", "kind": int(Kind.SPARSE), "dtype": "F32", "shape": [4],
           "params": {"packing": 1, "mask": 1, "seed": 0x0123456789ABCDEF, "drop": 0x80000000},
           "blobs": [{"raw_length": 4}], "base": {"dtype": "F32", "shape": [4]}}
    kind = KINDS[Kind.SPARSE]
    kind.validate(rec, "x")
    out = kind.decode(rec, [bytes.fromhex("003800bc")], np.array([1, 2, 3, 4], dtype=np.float32))
    np.testing.assert_array_equal(out, [1, 2.5, 3, 3])


def _sparse_lowrank_record(shape, groups, mask, seed, raw):
    return {"name": "w", "kind": int(Kind.SPARSE_LOWRANK), "dtype": "F32", "shape": list(shape),
            "params": {"packing": 1, "mask": mask, "seed": seed, "groups": [g.as_param() for g in groups]},
            "blobs": [{"raw_length": len(raw)}] if raw is not None else [],
            "base": {"dtype": "F32", "shape": list(shape)}}


@pytest.mark.parametrize("mask", [MaskEncoding.HASH, MaskEncoding.BITMASK])
def test_sparse_lowrank_roundtrip(rng, mask):
    shape = (37, 53)
    groups = [BitGroup(0, 2, 16, 0), BitGroup(2, 5, 3, 8), BitGroup(5, 9, 2, 16)]
    k = 9
    seed = 1234 if mask == MaskEncoding.HASH else 0
    drops = np.array([0] + [masks.drop_threshold(p) for p in np.linspace(0.1, 0.9, k - 1)], dtype=np.uint32)
    v_keep, u_keep = sparse_lowrank.hash_keep(1234, drops, shape)
    v = rng.standard_normal((k, shape[1])).astype(np.float32)
    u = rng.standard_normal((k, shape[0])).astype(np.float32)
    values = []
    for g in groups:
        pair = []
        for x, keep in ((v, v_keep), (u, u_keep)):
            rows = keep[g.start:g.stop]
            pair.append(sparse_lowrank.quantize_rtn(x[g.start:g.stop][rows], rows.sum(axis=1), g))
        values.append(tuple(pair))
    s = np.linspace(3, 1, k).astype(np.float32)
    payload = Payload(s, drops, v_keep, u_keep, values)
    raw = sparse_lowrank.pack_blob(shape, groups, mask, payload)
    rec = _sparse_lowrank_record(shape, groups, int(mask), seed, raw)
    KINDS[Kind.SPARSE_LOWRANK].validate(rec, "w")
    back = sparse_lowrank.unpack_blob(raw, shape, groups, int(mask), seed, "w")
    np.testing.assert_array_equal(back.v_keep, v_keep)
    np.testing.assert_array_equal(back.u_keep, u_keep)
    u_hat, v_hat = back.factors(groups)
    assert not u_hat[~u_keep].any() and not v_hat[~v_keep].any()
    # float16 groups are exact to float16, quantized ones within half a step of their grid
    np.testing.assert_array_equal(v_hat[:2][v_keep[:2]], v[:2][v_keep[:2]].astype(np.float16).astype(np.float32))
    assert np.abs(v_hat[2:5] - np.where(v_keep[2:5], v[2:5], 0)).max() < 1.0
    delta = KINDS[Kind.SPARSE_LOWRANK].delta(rec, [raw])
    np.testing.assert_allclose(delta, (u_hat.T * s) @ v_hat, rtol=1e-5, atol=1e-5)


def test_quantization_groups_run_over_kept_elements():
    counts = np.array([5, 0, 3])
    np.testing.assert_array_equal(sparse_lowrank.group_ids(counts, 2), [0, 0, 1, 1, 2, 3, 3, 4])
    vals = np.array([1, -1, 0.5, 0.25, 2, 3, -3, 1], dtype=np.float32)
    q = sparse_lowrank.quantize_rtn(vals, counts, BitGroup(0, 3, 8, 2))
    assert q.scales.size == 5 and q.zeros.size == 5 and q.values.size == 8
    np.testing.assert_allclose(q.dequantize(counts, 2), vals, atol=0.02)


@pytest.mark.parametrize("scales", [SignScales.ROW, SignScales.MATRIX])
def test_sign_payload(rng, scales):
    shape = (7, 13)
    positive = rng.random(shape) > 0.5
    alpha = np.array([0.5, 0, 2, 1, 0, 3, 4], dtype=np.float32) if scales == SignScales.ROW \
        else np.array([0.25], dtype=np.float32)
    raw = baseline_payloads.pack_sign(shape, scales, alpha, positive)
    coded = 5 if scales == SignScales.ROW else 7
    assert len(raw) == 4 * alpha.size + math.ceil(coded * 13 / 8)
    delta = baseline_payloads.sign_delta(raw, shape, scales, "w")
    col = np.broadcast_to(alpha.reshape(-1, 1), (7, 1))
    np.testing.assert_array_equal(delta, np.where(positive, col, -col))


def test_lowrank_payload(rng):
    shape, k = (11, 7), 3
    u, v, s = rng.standard_normal((k, 11)), rng.standard_normal((k, 7)), np.array([3, 2, 1.0])
    raw = baseline_payloads.pack_lowrank(shape, s, u, v)
    assert len(raw) == 12 + 2 * 7 * 3 + 2 + 2 * 11 * 3  # S, V, padding to 4, U
    got = baseline_payloads.lowrank_delta(raw, shape, k, "w")
    expected = (u.astype(np.float16).astype(np.float32).T * s) @ v.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# --- malformed records ----------------------------------------------------------------------------


def _check(rec, raws=None):
    kind = KINDS[rec["kind"]]
    kind.validate(rec, rec["name"])
    if raws is not None:
        kind.delta(rec, raws)


def _dare_record(**params):
    p = {"packing": 1, "mask": 1, "seed": 3, "drop": 2**31, **params}
    return {"name": "x", "kind": int(Kind.SPARSE), "dtype": "F32", "shape": [64], "params": p,
            "blobs": [{"raw_length": 2 * int(masks.kept_flat(p["seed"], 64, p["drop"]).sum())}],
            "base": {"dtype": "F32", "shape": [64]}}


@pytest.mark.parametrize("change, error", [
    ({"mask": 3}, UnknownKindError),
    ({"packing": 2}, UnknownKindError),
    ({"drop": 2**32 + 1}, PayloadError),  # a quantity out of range (spec 10.1)
    ({"seed": -1}, PayloadError),
    ({"mask": 2}, PayloadError),  # a bitmask with a seed and a drop
    ({"seed": "3"}, IndexSchemaError),
])
def test_sparse_params_rejected(change, error):
    rec = _dare_record()
    rec["params"].update(change)
    with pytest.raises(error):
        _check(rec)


def test_sparse_blob_lengths_rejected():
    rec = _dare_record()
    rec["blobs"] = [{"raw_length": 129}]  # more than every element kept
    with pytest.raises(PayloadError):
        _check(rec)
    rec = _dare_record()
    kept = rec["blobs"][0]["raw_length"]
    with pytest.raises(PayloadError, match="layout needs"):
        KINDS[Kind.SPARSE].delta(rec, [bytes(kept + 2)])  # within bounds at open, wrong for the mask
    with pytest.raises(PayloadError, match="not finite"):
        KINDS[Kind.SPARSE].delta(rec, [np.full(kept // 2, np.inf, dtype="<f2").tobytes()])


def test_sparse_lowrank_params_rejected(rng):
    shape = (8, 6)
    base = _sparse_lowrank_record(shape, [BitGroup(0, 2, 16, 0)], 1, 5, bytes(8 + 8 + 2 * 28))
    for change, error in [({"groups": [[0, 2, 16, 4]]}, PayloadError), ({"groups": [[0, 2, 9, 4]]}, PayloadError),
                          ({"groups": [[0, 7, 16, 0]]}, PayloadError), ({"mask": 2}, PayloadError),
                          ({"mask": 0}, UnknownKindError), ({"extra": 1}, IndexSchemaError)]:
        rec = {**base, "params": {**base["params"], **change}}
        with pytest.raises(error):
            _check(rec)
    rec = {**base, "blobs": [{"raw_length": 10**6}]}
    with pytest.raises(PayloadError):
        _check(rec)
    with pytest.raises(PayloadError):  # shorter than its own S and drops
        KINDS[Kind.SPARSE_LOWRANK].delta(base, [bytes(6)])


def test_sign_and_lowrank_rejected():
    sign = {"name": "s", "kind": int(Kind.SIGN), "dtype": "F16", "shape": [4, 8],
            "params": {"packing": 1, "scales": 2}, "blobs": [{"raw_length": 20}],
            "base": {"dtype": "F16", "shape": [4, 8]}}
    with pytest.raises(UnknownKindError):
        _check(sign)
    sign["params"]["scales"] = 1
    _check(sign)  # 16 bytes of scales + 4 bytes of signs: all rows coded
    bad = np.array([1, np.nan, 1, 1], dtype="<f4").tobytes() + bytes(4)
    with pytest.raises(PayloadError, match="not finite"):
        KINDS[Kind.SIGN].delta(sign, [bad])
    low = {"name": "l", "kind": int(Kind.LOWRANK), "dtype": "F32", "shape": [4, 8], "params": {"rank": 5},
           "blobs": [], "base": {"dtype": "F32", "shape": [4, 8]}}
    with pytest.raises(PayloadError):
        _check(low)
    low["params"] = {"rank": 1}
    with pytest.raises(PayloadError):  # rank 1 needs one blob of 4 + 16 + 8 bytes
        _check(low)
    low["blobs"] = [{"raw_length": 28}]
    _check(low)
    low["dtype"] = "I32"
    with pytest.raises(PayloadError):
        _check(low)


def test_corrupt_files_fail_cleanly(pair, tmp_path):
    """Flipping a byte of every lossy payload gives a DcmError, never a crash."""
    base, ft, _, _ = pair
    for method in ("impart-qt", "dare", "bitdelta"):
        out = tmp_path / f"{method}.dcm"
        dcm.encode(base, ft, out, method=method, ratio="1/8", zstd_level=1)
        _, index, raw, start = read_file(out)
        for rec in index["tensors"]:
            if rec["kind"] in LOSSY and rec["blobs"]:
                blob = rec["blobs"][0]
                bad = bytearray(raw)
                bad[start + blob["offset"]] ^= 0xFF
                path = tmp_path / "bad.dcm"
                path.write_bytes(bytes(bad))
                with pytest.raises(DcmError):
                    dcm.decode(path, base, tmp_path / "never")
                assert not (tmp_path / "never").exists()


# --- the methods --------------------------------------------------------------------------------


def test_impart_schedule():
    s = np.linspace(10, 0.1, 40)
    shape = (60, 40)
    assert sparsities(s, shape, 0.0, 0.6, 0.5).tolist() == [0.0] * 40  # α below β: nothing sparsified
    assert sparsities(s, shape, 1.0, 0.6, 0.5).size == 0
    p = sparsities(s, shape, 0.8, 0.6, 0.5)
    k0 = 40 - math.floor(0.6 * 40)
    gamma = (0.8 - 0.6) / 0.4
    assert p[0] == 0 and np.all(np.diff(p) >= 0) and p.size <= k0
    assert (p.sum() + (k0 - p.size)) / k0 >= gamma - 1e-9  # mean over the k0 with the dropped tail at 1
    full = gamma * (1 - (s[:k0] / s[0]) ** 0.5)
    if p.size < k0:  # the tail is dropped only while the mean is short of γ: one vector more falls short
        assert (full[:p.size + 1].sum() + (k0 - p.size - 1)) / k0 < gamma
    t = s[:k0] ** 0.5
    np.testing.assert_allclose(p, gamma * (1 - t / t[0])[:p.size])


def test_impart_is_unbiased_over_seeds(pair):
    """E[Δ̂] over masks is the rank-k product: the rescale 1/(1 − p) is applied."""
    from dcm.methods.impart import ImPart
    _, _, base_t, ft_t = pair
    delta = ft_t["b.weight"].astype(np.float32) - base_t["b.weight"]
    sums, runs, ref = 0, 60, None
    for seed in range(runs):
        method = ImPart(ratio="1/4", seed=seed, mask="hash")
        coded = method.code("b.weight", "F32", delta.shape, delta, 3000)
        assert coded.info["alpha"] > 0.6  # sparsified, so the masks differ with the seed
        rec = {"name": "b.weight", "kind": coded.kind, "dtype": "F32", "shape": list(delta.shape),
               "params": coded.params}
        sums = sums + KINDS[coded.kind].delta(rec, coded.raws)
        ref = coded.info["rank"]
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    target = (u[:, :ref] * s[:ref]) @ vt[:ref]
    mean_error = np.linalg.norm(sums / runs - target) / np.linalg.norm(target)
    one_error = np.linalg.norm(KINDS[coded.kind].delta(rec, coded.raws) - target) / np.linalg.norm(target)
    assert mean_error < one_error / 3


def test_masked_gptq_beats_rtn_and_keeps_zeros(rng):
    n, k = 96, 6
    mix = rng.standard_normal((n, n)) * 0.3 + np.eye(n)
    x = rng.standard_normal((2000, n)) @ mix
    h = x.T @ x / len(x)
    w = rng.standard_normal((k, n)).astype(np.float32)
    keep = rng.random((k, n)) > 0.4
    bits = np.array([3] * k)
    vals, w_hat = gptq.quantize_rows_masked(w, keep, h, bits, 16)
    assert not w_hat[~keep].any()
    target = np.where(keep, w, 0).astype(np.float64)
    rtn = np.zeros_like(w_hat)
    for r in range(k):
        q = sparse_lowrank.quantize_rtn(target[r][keep[r]].astype(np.float32), [keep[r].sum()], BitGroup(0, 1, 3, 16))
        rtn[r, keep[r]] = q.dequantize([keep[r].sum()], 16)
        codes, scales, zeros = vals[r]
        assert codes.size == keep[r].sum() and scales.size == math.ceil(keep[r].sum() / 16)
        deq = Values(codes, scales, zeros).dequantize([keep[r].sum()], 16)
        np.testing.assert_array_equal(deq, w_hat[r, keep[r]])

    def loss(a):
        d = a - target
        return np.einsum("ij,jk,ik->", d, h, d)
    assert loss(w_hat) < loss(rtn)
    u_vals, u_hat = gptq.quantize_columns_masked(w, keep, np.eye(k) + 0.1, bits, 16)
    assert not u_hat[~keep].any() and len(u_vals) == k


def test_impart_qt_with_calibration(pair, tmp_path):
    """GPTQ on masked factors: within budget, and a different file from round-to-nearest."""
    from safetensors.numpy import save_file
    base, ft, base_t, _ = pair
    rng = np.random.default_rng(3)
    stats = {}
    for name, t in base_t.items():
        if t.ndim == 2:
            x = rng.standard_normal((500, t.shape[1]))
            stats[name] = (x.T @ x / 500).astype(np.float32)
    path = tmp_path / "stats.safetensors"
    save_file(stats, str(path), metadata={"format": "dcm-calibration", "version": "1", "tokens": "500",
                                          "sequences": "4", "seq_len": "125", "model": "ft", "text_sha256": "0"})
    out = tmp_path / "q.dcm"
    dcm.encode(base, ft, out, method="impart-qt", ratio="1/8", options={"calibration": str(path)})
    spent, params = lossy_cost(out)
    assert spent <= params * 2 / 8
    _, index, _, _ = read_file(out)
    assert index["method"]["params"]["quantizer"] == "gptq"
    assert dcm.verify(out, base).base_checked  # raises on any defect


def test_bitdelta_scales_and_row_choice(pair, tmp_path):
    base, ft, base_t, ft_t = pair
    out = tmp_path / "b.dcm"
    dcm.encode(base, ft, out, method="bitdelta")  # no ratio: every row
    dcm.decode(out, base, tmp_path / "dec")
    got = read_checkpoint(tmp_path / "dec")
    delta = ft_t["a.weight"].astype(np.float64) - base_t["a.weight"]
    alpha = np.abs(delta).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(got["a.weight"] - base_t["a.weight"], np.where(delta >= 0, alpha, -alpha),
                               rtol=1e-5, atol=1e-5)
    out2 = tmp_path / "b32.dcm"
    dcm.encode(base, ft, out2, method="bitdelta", ratio="1/16")  # room for some rows only
    _, index, raw, start = read_file(out2)
    spent, params = lossy_cost(out2)
    assert spent <= params * 1 / 8
    some_coded = some_skipped = False
    for rec in index["tensors"]:
        if rec["kind"] == Kind.SIGN:
            m = rec["shape"][0]
            scales = np.frombuffer(raw_blob(raw, start, rec["blobs"][0])[:4 * m], dtype="<f4")
            d = ft_t[rec["name"]].astype(np.float64) - base_t[rec["name"]]
            alpha = np.abs(d).mean(axis=1)
            coded, skipped = alpha[scales > 0], alpha[scales == 0]
            some_coded |= coded.size > 0
            some_skipped |= skipped.size > 0
            if coded.size and skipped.size:  # rows of one matrix cost the same: the largest scales go first
                assert coded.min() >= skipped.max() * (1 - 1e-6)
    assert some_coded and some_skipped


def test_method_options_are_recorded(pair, tmp_path):
    base, ft, _, _ = pair
    out = tmp_path / "i.dcm"
    dcm.encode(base, ft, out, method="impart", ratio="1/16", options={"beta": 0.5, "power": 1.0, "seed": 4})
    _, index, _, _ = read_file(out)
    params = index["method"]["params"]
    assert (params["beta"], params["power"], params["seed"], params["ratio"]) == (0.5, 1.0, 4, "1/16")
    for bad in ({"beta": 1.5}, {"power": 0}, {"mask": "x"}, {"seed": -1}):
        with pytest.raises(UsageError):
            dcm.encode(base, ft, tmp_path / "bad.dcm", method="impart", ratio="1/16", options=bad)


# --- impart-qt --alloc rd ----------------------------------------------------------------------


def test_rd_curves_pick_the_best_choice_within_the_total():
    """allocate_curves against every combination of three small curves: within the total, and no
    combination that spends at most what its choice spends has a lower total error."""
    import itertools
    from dcm.methods.impart import RdCurve, allocate_curves
    rng = np.random.default_rng(5)
    curves = []
    for i in range(3):
        cost = np.sort(rng.integers(10, 400, 9))[::-1].astype(np.float64)
        cost[-1] = 5
        dist = np.sort(rng.random(9) * 100)  # more bytes, less error
        curves.append(RdCurve(f"m{i}", cost, dist))
    for total in (15, 200, 500, 900, 10_000):
        chosen = allocate_curves(curves, total)
        spent = sum(c.cost[i] for c, i in zip(curves, chosen))
        assert spent <= total
        # Everett: a choice that minimises D + λ·bytes is the best of all those spending no more than it
        best = min(sum(c.dist[i] for c, i in zip(curves, combo))
                   for combo in itertools.product(range(9), repeat=3)
                   if sum(c.cost[i] for c, i in zip(curves, combo)) <= spent)
        assert sum(c.dist[i] for c, i in zip(curves, chosen)) <= best + 1e-9
        if total >= sum(c.cost[0] for c in curves):
            assert chosen == [0, 0, 0]  # everything fits: the least error each
    assert allocate_curves(curves, 15) == [8, 8, 8]


def test_rd_expected_error_matches_the_masks_on_average(pair):
    """The error model rd allocates by (ImPart's float16 values: no grid error) against the mean squared
    error of records coded with 80 mask seeds."""
    from dcm.methods.impart import ImPart, expected_distortion
    from dcm.methods.svd import exact_svd
    _, _, base_t, ft_t = pair
    delta = ft_t["b.weight"].astype(np.float32) - base_t["b.weight"]
    svd = exact_svd(delta)
    p = sparsities(svd.s, delta.shape, 0.85, 0.6, 0.5)
    zeros = np.zeros(svd.s.size)
    expected = expected_distortion(svd.s, p, zeros, zeros)
    errors = []
    for seed in range(80):
        method = ImPart(ratio="1/4", seed=seed, mask="hash")
        coded = method.build("b.weight", "F32", delta.shape, svd, p, masks.record_seed(seed, "b.weight"), 0.85)
        rec = {"name": "b.weight", "kind": coded.kind, "dtype": "F32", "shape": list(delta.shape),
               "params": coded.params}
        errors.append(float(((KINDS[coded.kind].delta(rec, coded.raws) - delta) ** 2).sum()))
    assert abs(np.mean(errors) - expected) < 0.1 * expected, (np.mean(errors), expected)


def _mixed_pair(tmp_path):
    """Two matrices whose deltas are nearly low rank and one of noise: a share by size wastes bytes."""
    rng = np.random.default_rng(0)
    base, ft = {}, {}
    for name, (m, n), kind in [("a.weight", (96, 64), "low"), ("b.weight", (64, 160), "noise"),
                               ("c.weight", (128, 96), "low")]:
        w = rng.standard_normal((m, n)).astype(np.float32)
        if kind == "low":
            d = rng.standard_normal((m, 4)) @ rng.standard_normal((4, n)) * 0.02 + 0.001 * rng.standard_normal((m, n))
        else:
            d = 0.01 * rng.standard_normal((m, n))
        base[name], ft[name] = w, (w + d).astype(np.float32)
    write_checkpoint(tmp_path / "base", {n: ("F32", a) for n, a in base.items()})
    write_checkpoint(tmp_path / "ft", {n: ("F32", a) for n, a in ft.items()})
    return tmp_path / "base", tmp_path / "ft", base, ft


@pytest.mark.parametrize("ratio", ["1/8", "1/16"])
def test_impart_qt_rd_within_budget_and_better_than_shares_by_size(tmp_path, ratio):
    base_dir, ft_dir, base, ft = _mixed_pair(tmp_path)
    errors = {}
    for alloc in ("recipe", "rd"):
        out = tmp_path / f"{alloc}.dcm"
        dcm.encode(base_dir, ft_dir, out, method="impart-qt", ratio=ratio, options={"alloc": alloc})
        spent, params = lossy_cost(out)
        assert spent <= params * 16 * float(eval(ratio)) / 8
        _, index, _, _ = read_file(out)
        assert index["method"]["params"]["alloc"] == alloc
        dcm.decode(out, base_dir, tmp_path / f"dec-{alloc}")
        got = read_tensors(tmp_path / f"dec-{alloc}")
        num = sum(float(((got[n][1].astype(np.float64) - ft[n]) ** 2).sum()) for n in base)
        den = sum(float(((ft[n].astype(np.float64) - base[n]) ** 2).sum()) for n in base)
        errors[alloc] = math.sqrt(num / den)
    assert errors["rd"] < 0.9 * errors["recipe"], errors  # measured: 0.26 vs 0.35 (1/8), 0.38 vs 0.46 (1/16)
    serial = (tmp_path / "rd.dcm").read_bytes()
    dcm.encode(base_dir, ft_dir, tmp_path / "rd2.dcm", method="impart-qt", ratio=ratio, options={"alloc": "rd"},
               workers=2)
    assert (tmp_path / "rd2.dcm").read_bytes() == serial


def test_impart_qt_alloc_option_is_checked():
    with pytest.raises(UsageError, match="alloc"):
        dcm.methods.get_method("impart-qt", {"alloc": "share"}, ratio="1/16")
    with pytest.raises(UsageError, match="--alloc applies to delta-come and impart-qt, not impart"):
        dcm.methods.get_method("impart", {"alloc": "rd"}, ratio="1/16")
