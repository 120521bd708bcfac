"""The ``rans`` blob encoding (spec 8.2): the native coder, the exact decoder, the writer's choice.

The conformance vectors (``spec/vectors``: valid/rans-blobs, uncommon/rans-*,
faulty/rans-*) check both decoders against the spec; these tests check what the
vectors cannot: that every stream the native coder writes ends exactly as the
spec requires (the verifier's shortcut rests on it), the numpy fallback, and
how the writer picks an encoding and counts it in budgets and versions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import dcm
from dcm import blobs, errors, rans
from dcm.cli import main
from dcm.constants import Encoding
from dcm.errors import PayloadError

import spec_oracle
import test_vectors as tv
from conftest import write_checkpoint


def distributions(seed=0):
    rng = np.random.default_rng(seed)
    yield "laplace", (np.clip(np.round(rng.laplace(0, 6, 50_000)), -127, 127) + 128).astype(np.uint8).tobytes()
    yield "two-bit codes", rng.choice(4, 20_000, p=[0.1, 0.4, 0.4, 0.1]).astype(np.uint8).tobytes()
    yield "mostly zero", (rng.random(30_000) < 0.02).astype(np.uint8).tobytes()
    yield "short", bytes([5, 5, 6, 5, 7, 5, 5, 5] * 40)
    yield "uniform", rng.integers(0, 256, 70_000, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("name, raw", list(distributions()))
def test_native_streams_end_where_the_spec_says(name, raw):
    """Every stream the native coder writes decodes exactly (numpy, with the end checks) and
    natively to the same bytes, and is what the independent decoder reads too."""
    stored = rans.compress(raw)
    if stored is None:  # incompressible (uniform bytes): the library stores them as they are
        assert name == "uniform"
        return
    assert stored[0] in (0x00, 0x04) and len(stored) < len(raw)
    head = rans.parse_header(stored, len(raw), name)
    assert rans.decode_exact(stored, len(raw), head, name) == raw
    assert rans.decode(stored, len(raw), name) == raw
    assert rans.decode(stored, len(raw), name, exact=True) == raw
    assert spec_oracle.dcmref.unrans(stored, len(raw), name) == raw


def test_exact_decoding_catches_a_bad_end():
    raw = bytes((i * 7) % 5 for i in range(3000))
    stored = rans.compress(raw)
    for bad in (stored + b"\0\0", stored[:-2]):
        with pytest.raises(PayloadError):
            rans.decode(bad, len(raw), "w", exact=True)


def test_header_is_checked_before_the_library_sees_it():
    stored = rans.compress(bytes((i * 7) % 5 for i in range(3000)))
    for bad, what in ((b"\x01" + stored[1:], "flags"), (stored[:1] + b"\x80" + stored[1:], "size"),
                      (stored[:5], "ends inside")):
        with pytest.raises(PayloadError, match=what):
            rans.decode(bad, 3000, "w")
    with pytest.raises(PayloadError, match="declares"):
        rans.decode(stored, 2999, "w")


def test_numpy_decoder_stands_in_for_a_missing_library(monkeypatch):
    raw = bytes((i * i) % 11 for i in range(2000))
    stored = rans.compress(raw)
    monkeypatch.setattr(rans, "_LIB", None)
    assert not rans.available() and rans.compress(raw) is None
    assert rans.decode(stored, len(raw), "w") == raw
    assert blobs.encode(raw, 3)[0] != Encoding.RANS  # nothing to write rans with


RANS_VECTORS = [v for v in tv.MANIFEST if Path(v["path"]).stem.startswith("rans-")
                or Path(v["path"]).parent.name.startswith("rans-")]
# (vector, procedure): valid ones in both procedures of spec 19.3, faulty ones in their own
RANS_CASES = [(v, m) for v in RANS_VECTORS for m in ((v["mode"],) if v["tier"] == "faulty" else ("reader", "verifier"))]


@pytest.mark.parametrize("vector, mode", RANS_CASES, ids=[f"{v['path']}-{m}" for v, m in RANS_CASES])
def test_numpy_decoder_alone_meets_the_rans_vectors(monkeypatch, vector, mode):
    """Without the native library (a machine where it is missing) dcm still reads every rans
    vector to the expected bytes and rejects every faulty one with its error code: the
    numpy decoder is a full decoder, not a helper of the native one."""
    monkeypatch.setattr(rans, "_LIB", None)
    assert not rans.available()
    path = tv.VECTORS_DIR / vector["path"]
    if vector["tier"] == "faulty":
        with pytest.raises(errors.DcmError) as info:
            tv.decode_with_dcm(path, None, mode)
        assert info.value.code == vector["code"], info.value
        return
    expected = tv.load_expected(vector)
    tensors, attachments = tv.decode_with_dcm(path, tv.VECTORS_DIR / vector["base"], mode)
    assert list(tensors) == list(expected["tensors"])
    for name, want in expected["tensors"].items():
        tv.check_tensor(name, want, tensors[name])
    assert {n: tv.sha(b) for n, b in attachments.items()} == expected["attachments"]


def test_writer_takes_the_smallest_encoding():
    rng = np.random.default_rng(3)
    noisy = rng.choice(4, 100_000, p=[0.05, 0.45, 0.45, 0.05]).astype(np.uint8).tobytes()
    encoding, stored = blobs.encode(noisy, 3)
    assert encoding == Encoding.RANS
    zstd_len = len(blobs.encode(noisy, 3, entropy=False)[1])
    assert blobs.encode(noisy, 3, entropy=False)[0] == Encoding.ZSTD and len(stored) < zstd_len
    assert blobs.encode(bytes(100_000), 3)[0] == Encoding.ZSTD  # repeats: zstd's matches win
    assert blobs.encode(b"", 3) == (Encoding.RAW, b"")


def _pair(tmp_path, dtype="F32"):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 192)).astype(np.float32)
    ft = w + (rng.standard_normal(w.shape) * 1e-3).astype(np.float32)
    base = write_checkpoint(tmp_path / "base", {"w": ("F32", w)})
    tuned = write_checkpoint(tmp_path / "ft", {"w": ("F32", ft)})
    return base, tuned, ft


def _encodings(path) -> set:
    with dcm.open(path) as f:
        return {b["encoding"] for r in f.records() for b in r.blobs}


def test_lossless_file_with_rans_blobs_is_version_1_3_and_exact(tmp_path):
    base, ft, want = _pair(tmp_path)
    out = tmp_path / "x.dcm"
    dcm.encode(base, ft, out)
    assert Encoding.RANS in _encodings(out)
    info = dcm.info(out)
    assert info["header"]["version"] == "1.3" and info["encodings"]["rans"]["blobs"] >= 1
    dcm.verify(out, base)
    got = spec_oracle.dcmref.decode(str(out), str(base / "model.safetensors")).tensors["w"]
    assert bytes(got.data) == want.tobytes()


def test_no_entropy_keeps_zstd_and_version_1_0(tmp_path, capsys):
    base, ft, _ = _pair(tmp_path)
    out = tmp_path / "x.dcm"
    assert main(["-q", "encode", str(base), str(ft), "-o", str(out), "--no-entropy"]) == 0
    assert Encoding.RANS not in _encodings(out)
    info = dcm.info(out)
    assert info["header"]["version"] == "1.0" and info["method"]["params"]["entropy"] is False
    assert main(["info", "--json", str(out)]) == 0
    assert "rans" not in json.loads(capsys.readouterr().out)["encodings"]


def test_budgets_count_rans_stored_sizes(tmp_path):
    """A lossy file with rans blobs stays within its budget, counted from the stored bytes."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((384, 384)).astype(np.float32)
    d = (rng.standard_normal((384, 40)) @ rng.standard_normal((40, 384)) * 1e-3).astype(np.float32)
    base = write_checkpoint(tmp_path / "base", {"w": ("F32", w)})
    ft = write_checkpoint(tmp_path / "ft", {"w": ("F32", w + d)})
    sizes = {}
    for entropy in (True, False):
        out = tmp_path / f"{entropy}.dcm"
        dcm.encode(base, ft, out, method="delta-come", ratio="1/16", entropy=entropy)
        c = dcm.info(out)["totals"]["compressed"]
        assert c["bytes"] <= 384 * 384 * 2 // 16, (entropy, c)
        with dcm.open(out) as f:
            sizes[entropy] = sum(g[1] - g[0] for g in f.record("w").params["groups"])
    assert sizes[True] >= sizes[False]  # saved bytes buy vectors, never lose them
