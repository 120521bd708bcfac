"""The conformance vectors of spec section 19, through both decoders.

- ``dcm`` (the reference implementation) and ``spec/reference/dcmref.py`` (a
  decoder written from the spec alone, which does not import ``dcm``) decode
  every valid and uncommon vector to the expected codes, factors and tensors;
- both reject every faulty vector with the manifest's error code (spec 15),
  running the procedure its ``mode`` names (spec 19.3: reader or verifier),
  and so does ``dcm verify`` (with ``--base`` for the wrong-base vectors);
- the generator rebuilds every vector byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dcm
from dcm import baseline_payloads, cli, dtypes, errors, lowrank, records, sparse_lowrank
from dcm.checkpoint import Checkpoint
from dcm.constants import Kind
from dcm.decode import check_base_names, check_removed, rebuild
from dcm.verify import verify

ROOT = Path(__file__).resolve().parents[1]
VECTORS_DIR = ROOT / "spec" / "vectors"
MANIFEST = json.loads((VECTORS_DIR / "index.json").read_text())["vectors"]
DECODABLE = [v for v in MANIFEST if v["tier"] != "faulty"]
FAULTY = [v for v in MANIFEST if v["tier"] == "faulty"]

sys.path.insert(0, str(ROOT / "spec" / "reference"))
import dcmref  # noqa: E402


def ids(vectors):
    return [v["path"] for v in vectors]


def sha(data) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


def load_expected(vector) -> dict:
    return json.loads((VECTORS_DIR / vector["expected"]).read_text())


# --- codes and factors (spec 19.2) from dcm's own decoders ----------------------------------------


def f32(*arrays) -> bytes:
    return b"".join(np.asarray(a, dtype="<f4").tobytes() for a in arrays)


def u8(*arrays) -> bytes:
    return b"".join(np.asarray(a).astype(np.uint8).tobytes() for a in arrays)


def lowrank_mixed_parts(rec, raws):
    groups = lowrank.parse_groups(rec.params, rec.shape, rec.name)
    if not groups:
        return b"", b""
    s, factors = lowrank.unpack_blob(raws[0], rec.shape, groups, rec.name)
    codes = b"".join(u8(fv.codes, fv.zeros, fu.codes, fu.zeros) for fv, fu in factors)
    u, s, v = lowrank.dequantized_factors(rec.shape, groups, s, factors)
    return codes, f32(s, v, u)


def lowrank_rotated_parts(rec, raws):
    """Codes as lowrank-mixed; factors are S and the stored (rotated) vectors, dequantized (19.2)."""
    if not rec.params["groups"]:
        return b"", b""
    groups = records.LowrankRotated.parse_params({"params": rec.params, "shape": list(rec.shape)}, rec.name)
    s, factors = lowrank.unpack_blob(raws[0], rec.shape, groups, rec.name)
    codes = b"".join(u8(fv.codes, fv.zeros, fu.codes, fu.zeros) for fv, fu in factors)
    zu, s, zv = lowrank.dequantized_factors(rec.shape, groups, s, factors)
    return codes, f32(s, zv, zu)


def sparse_lowrank_parts(rec, raws):
    mask, seed, groups = sparse_lowrank.parse_params(rec.params, rec.shape, rec.name)
    if not groups:
        return b"", b""
    p = sparse_lowrank.unpack_blob(raws[0], rec.shape, groups, mask, seed, rec.name)
    codes = u8(p.v_keep, p.u_keep) + b"".join(
        u8(vv.values, vv.zeros, uv.values, uv.zeros) for g, (vv, uv) in zip(groups, p.values)
        if not sparse_lowrank.is_float(g))
    u, v = p.factors(groups)
    return codes, f32(p.s, v, u)


def sign_parts(rec, raws):
    m = rec.shape[0]
    delta = baseline_payloads.sign_delta(raws[0], rec.shape, rec.params["scales"], rec.name)
    count = m if rec.params["scales"] else 1
    alpha = np.broadcast_to(np.frombuffer(raws[0][:4 * count], "<f4"), (m,))
    coded = alpha != 0
    return u8(delta[coded] == alpha[coded, None]), f32(alpha)


def lowrank_parts(rec, raws):
    rank = rec.params["rank"]
    if not rank:
        return None, b""
    s, u, v = baseline_payloads.lowrank_factors(raws[0], rec.shape, rank, rec.name)
    return None, f32(s, v, u)


def sparse_parts(rec, raws):
    p = rec.params
    count = int(np.prod(rec.shape, dtype=np.int64))
    keep = baseline_payloads.sparse_keep(count, p["mask"], p["seed"], p["drop"], raws[0], rec.name)
    delta = baseline_payloads.sparse_delta(raws[0], rec.shape, p["mask"], p["seed"], p["drop"], rec.name)
    return u8(keep), f32(delta)


def dense_parts(rec, raws):
    values = records._dense_values(raws, {"dtype": rec.dtype, "shape": list(rec.shape), "name": rec.name},
                                   rec.params["layout"])
    return values.tobytes(), None


PARTS = {Kind.DENSE_DELTA: dense_parts, Kind.FULL: dense_parts, Kind.LOWRANK_MIXED: lowrank_mixed_parts,
         Kind.SPARSE_LOWRANK: sparse_lowrank_parts, Kind.SIGN: sign_parts, Kind.LOWRANK: lowrank_parts,
         Kind.SPARSE: sparse_parts, Kind.LOWRANK_ROTATED: lowrank_rotated_parts}


def decode_with_dcm(path: Path, base: Path | None, mode: str = "verifier") -> dict:
    """{name: (codes, factors, tensor bytes or None)} and {attachment: bytes}, with dcm.

    ``mode`` is a procedure of spec 19.3: ``reader`` opens the file and reads every
    record and attachment as ``dcm.decode`` does (the base checked as in steps 14,
    16 and 17 when given); ``verifier`` runs ``dcm.verify`` first (padding included).
    """
    if mode == "verifier":
        verify(path, base)
    out = {}
    with (Checkpoint(base) if base is not None else contextlib.nullcontext()) as ckpt, dcm.open(path) as f:
        if ckpt is not None:
            check_base_names(f, ckpt)
        for rec in f.records():
            if rec.kind == Kind.REMOVED:
                out[rec.name] = (None, None, None)
                continue
            tensor = None
            if ckpt is not None:
                tensor = rebuild(f, ckpt, rec.name)
            elif not records.KINDS[rec.kind].needs_base:
                tensor = f.tensor_from(rec.name)
            coded = f.inner_record(rec.name) if rec.kind == Kind.ADAPTED else rec  # spec 10.13: the inner's
            codes, factors = PARTS[coded.kind](coded, f.raw_blobs(coded))
            out[rec.name] = (codes, factors, None if tensor is None else np.ascontiguousarray(tensor).tobytes())
        if ckpt is not None:
            check_removed(f, ckpt)
        attachments = {name: f.attachment(name) for name in f.attachments()}
    return out, attachments


def decode_with_reference(path: Path, base: Path | None, mode: str = "verifier") -> dict:
    result = dcmref.decode(str(path), None if base is None else str(base), mode)
    tensors = {name: (t.codes, t.factors, t.data) for name, t in result.tensors.items()}
    return tensors, dict(result.attachments)


DECODERS = {"dcm": decode_with_dcm, "reference": decode_with_reference}


# --- the checks -------------------------------------------------------------------------------------


def as_float64(data: bytes, dtype: str) -> np.ndarray:
    storage = np.frombuffer(data, dtype=dtypes.dtype(dtype).storage)
    return dtypes.to_float32(storage, dtype).astype(np.float64)


def check_tensor(name: str, want: dict, got: tuple) -> None:
    codes, factors, data = got
    for key, value in (("codes", codes), ("factors", factors)):
        if want[key] is None:
            assert value is None, f"{name}: {key} should be null"
        else:
            assert value is not None and sha(value) == want[key]["sha256"], f"{name}: {key} differ"
    if want["kind"] == "removed":
        assert data is None
    elif want["sha256"] is not None:
        assert sha(data) == want["sha256"], f"{name}: rebuilt tensor differs"
    else:
        x = as_float64(data, want["dtype"])
        error = np.abs(x - np.array(want["values"]))
        assert (error <= np.array(want["atol"])).all(), f"{name}: off by {error.max()} (atol {want['atol']})"


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("vector", DECODABLE, ids=ids(DECODABLE))
def test_decodable_vector(vector, decoder):
    path, base = VECTORS_DIR / vector["path"], VECTORS_DIR / vector["base"]
    expected = load_expected(vector)
    assert sha(path.read_bytes()) == expected["sha256"]
    tensors, attachments = DECODERS[decoder](path, base)
    assert list(tensors) == list(expected["tensors"])
    for name, want in expected["tensors"].items():
        check_tensor(name, want, tensors[name])
    assert {n: sha(b) for n, b in attachments.items()} == expected["attachments"]


@pytest.mark.parametrize("mode", ["reader", "verifier"])
@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("vector", DECODABLE, ids=ids(DECODABLE))
def test_decodable_vector_accepted_by_both_procedures(vector, decoder, mode):
    """Spec 19.3: with and without the base, in reader and verifier mode."""
    path, base = VECTORS_DIR / vector["path"], VECTORS_DIR / vector["base"]
    tensors, _ = DECODERS[decoder](path, None, mode)
    assert list(tensors) == list(load_expected(vector)["tensors"])
    DECODERS[decoder](path, base, mode)


@pytest.mark.parametrize("vector", DECODABLE, ids=ids(DECODABLE))
def test_verify_accepts_decodable_vector(vector):
    path, base = VECTORS_DIR / vector["path"], VECTORS_DIR / vector["base"]
    assert cli.main(["verify", str(path)]) == 0
    assert cli.main(["verify", str(path), "--base", str(base)]) == 0


def error_class(code: str) -> type:
    return errors.ERROR_CODES[code][1]


REJECTING = {"dcm": (decode_with_dcm, errors.DcmError), "reference": (decode_with_reference, dcmref.DcmRefError)}


@pytest.mark.parametrize("decoder", sorted(REJECTING))
@pytest.mark.parametrize("vector", FAULTY, ids=ids(FAULTY))
def test_decoder_rejects_faulty_vector(vector, decoder):
    decode, error = REJECTING[decoder]
    path = VECTORS_DIR / vector["path"]
    base = VECTORS_DIR / vector["base"] if vector["base"] else None
    with pytest.raises(error) as info:
        decode(path, base, vector["mode"])
    assert info.value.code == vector["code"], info.value
    if vector["needs_base"]:
        decode(path, None, vector["mode"])  # the file itself is fine


@pytest.mark.parametrize("vector", FAULTY, ids=ids(FAULTY))
def test_verify_command_rejects_faulty_vector(vector):
    path = VECTORS_DIR / vector["path"]
    code = error_class(vector["code"]).exit_code
    if vector["needs_base"]:
        assert cli.main(["verify", str(path)]) == 0
        assert cli.main(["verify", str(path), "--base", str(VECTORS_DIR / vector["base"])]) == code
    else:
        assert cli.main(["verify", str(path)]) == code


def test_manifest_is_complete():
    on_disk = {str(p.relative_to(VECTORS_DIR)) for p in VECTORS_DIR.rglob("*.dcm")}
    assert on_disk == {v["path"] for v in MANIFEST}
    assert {v["tier"] for v in MANIFEST} == {"valid", "uncommon", "faulty"}
    for v in MANIFEST:
        faulty = v["tier"] == "faulty"
        assert (v["expected"] is None) == faulty == (v["error"] is not None) == (v["code"] is not None)
        assert v["mode"] in (("reader", "verifier") if faulty else (None,))
        assert (v["base"] is not None) == (not faulty or v["needs_base"])
        if faulty:  # the class name is informative; the code is what conformance compares
            assert error_class(v["code"]).__name__ == v["error"]
    # every kind of the registry has a valid vector
    kinds = {t["kind"] for v in DECODABLE for t in load_expected(v)["tensors"].values()}
    assert kinds == {"dense-delta", "full", "removed", "lowrank-mixed", "sparse-lowrank", "sign", "lowrank", "sparse",
                     "lowrank-rotated", "adapted"}
    # every blob encoding of the registry is in a valid vector
    encodings = set()
    for v in DECODABLE:
        with dcm.open(VECTORS_DIR / v["path"]) as f:
            index = f.index
        encodings |= {b["encoding"] for r in index["tensors"] for b in r["blobs"]}
        encodings |= {a["blob"]["encoding"] for a in index.get("attachments", [])}
    assert encodings == {0, 1, 2}


def test_generator_reproduces_vectors():
    run = subprocess.run([sys.executable, str(VECTORS_DIR / "generate.py"), "--check"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_reference_decoder_runs_without_dcm():
    """spec/reference/ is independent: it works with ``dcm`` unimportable."""
    vector = VECTORS_DIR / "valid" / "lowrank-mixed"
    code = ("import sys; sys.modules['dcm'] = None; sys.path.insert(0, sys.argv[1]); import dcmref; "
            "r = dcmref.decode(sys.argv[2], sys.argv[3]); print(len(r.tensors))")
    run = subprocess.run([sys.executable, "-c", code, str(ROOT / "spec" / "reference"), str(vector / "vector.dcm"),
                          str(vector / "base.safetensors")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "4", run.stderr


def test_reference_decoder_selftest():
    """The reference decoder against the spec's worked examples (the section 18 dump is read from the spec)."""
    run = subprocess.run([sys.executable, str(ROOT / "spec" / "reference" / "selftest.py")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
