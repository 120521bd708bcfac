"""encode -> decode is lossless, bit for bit, and the ``dcm.open`` reading API."""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    SMALL_ATTACHMENTS,
    assert_same_tensors,
    random_storage,
    read_attachments,
    read_checkpoint,
    storage,
    write_checkpoint,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcm
from dcm import checkpoint, container, dtypes, records
from dcm.checkpoint import INDEX_FILE, SINGLE_FILE
from dcm.constants import HEADER_SIZE
from dcm.errors import CheckpointError, OutputExistsError, UsageError, WrongBaseError

ALL_DTYPES = sorted(dtypes.DTYPES)
FLOATS = ["F16", "BF16", "F32", "F64"]


def roundtrip(tmp_path, base: dict, ft: dict, *, tag="rt", attachments=None, metadata=None,
              decode_kw=None, **encode_kw):
    """Encode ``ft`` against ``base``, decode it, and check the result is ``ft`` exactly."""
    base_dir = write_checkpoint(tmp_path / f"{tag}-base", base)
    ft_dir = write_checkpoint(tmp_path / f"{tag}-ft", ft, attachments=attachments, metadata=metadata)
    out = tmp_path / f"{tag}.dcm"
    report = dcm.encode(base_dir, ft_dir, out, **encode_kw)
    assert report.file_bytes == out.stat().st_size
    decoded = tmp_path / f"{tag}-decoded"
    dcm.decode(out, base_dir, decoded, **(decode_kw or {}))
    assert_same_tensors(read_checkpoint(decoded), ft)
    assert read_attachments(decoded) == (attachments or {})
    return out, base_dir, decoded


def kinds_of(path) -> dict:
    with dcm.open(path) as f:
        return {r.name: r.kind_name for r in f.records()}


def perturb(rng, array: np.ndarray, fraction=0.3) -> np.ndarray:
    """A copy with some elements' bit patterns replaced by random ones."""
    out = array.copy()
    flat = out.reshape(-1)
    if flat.size:
        mask = rng.random(flat.size) < fraction
        bits = dtypes.unsigned_view(flat)
        bits[mask] = rng.integers(0, 256, (mask.sum(), flat.dtype.itemsize), dtype=np.uint8).view(bits.dtype).reshape(-1)
    return out


# --- dtypes and values ------------------------------------------------------------


@pytest.mark.parametrize("dt", ALL_DTYPES)
def test_every_dtype(tmp_path, rng, dt):
    base_w = random_storage(rng, dt, (5, 7))
    ft_w = random_storage(rng, dt, (5, 7)) if dt == "BOOL" else perturb(rng, base_w)
    base = {"w": (dt, base_w), "v": (dt, random_storage(rng, dt, (3,)))}
    ft = {"w": (dt, ft_w), "v": (dt, base["v"][1].copy())}
    out, _, _ = roundtrip(tmp_path, base, ft)
    assert kinds_of(out) == {"w": "dense-delta", "v": "dense-delta"}


@pytest.mark.parametrize("dt", ["F32", "F16", "BF16", "F64"])
def test_small_float_changes(tmp_path, rng, dt):
    values = rng.standard_normal(300)
    base = {"w": (dt, storage(dt, values))}
    ft = {"w": (dt, storage(dt, values * (1 + 1e-3 * rng.standard_normal(300))))}
    roundtrip(tmp_path, base, ft)


def special_values(dt: str) -> np.ndarray:
    """NaNs (quiet, signalling, negative, odd payloads), infinities, signed zeros, subnormals."""
    if dt == "BF16":
        return np.array([0x7FC0, 0xFFC0, 0x7F81, 0x7FFF, 0x7F80, 0xFF80, 0x0000, 0x8000, 0x0001, 0x8001,
                         0x3F80, 0xBF80], dtype=np.uint16)
    ft = {"F16": np.float16, "F32": np.float32, "F64": np.float64}[dt]
    unsigned = dtypes.unsigned_view(np.zeros(1, ft)).dtype
    info = np.finfo(ft)
    vals = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, info.tiny, -info.tiny,
                     info.max, -info.max, 1.0, -1.0], dtype=ft)
    bits = vals.view(unsigned)
    exp_mask = bits[2]  # +inf: all exponent bits
    bits[0] = exp_mask | 1  # signalling NaN payload 1
    bits[1] = exp_mask | (exp_mask >> 1) | 5 | (bits[3] & ~exp_mask)  # negative quiet NaN with payload
    bits[6] = 1  # smallest subnormal
    return vals


@pytest.mark.parametrize("dt", FLOATS)
def test_special_values(tmp_path, dt):
    special = special_values(dt)
    n = special.size
    rolled = np.roll(special, 5)
    base = {"a": (dt, special), "b": (dt, rolled), "c": (dt, special)}
    # a: specials -> ordinary values; b: specials -> other specials; c: values -> specials
    ordinary = storage(dt, np.linspace(-3, 3, n)).astype(special.dtype)
    ft = {"a": (dt, ordinary), "b": (dt, special.copy()), "c": (dt, special[::-1].copy())}
    base["c"] = (dt, ordinary.copy())
    roundtrip(tmp_path, base, ft)


@pytest.mark.parametrize("dt", FLOATS + ["I8", "I32", "I64"])
def test_sign_flips(tmp_path, rng, dt):
    if dt in FLOATS:
        values = storage(dt, rng.standard_normal(64))
        sign = np.array(1 << (8 * values.dtype.itemsize - 1), dtype=dtypes.unsigned_view(values).dtype)
        flipped = (dtypes.unsigned_view(values) ^ sign).view(values.dtype)
    else:
        values = random_storage(rng, dt, (64,))
        flipped = -values  # wraps for the minimum, as integers do
    roundtrip(tmp_path, {"w": (dt, values)}, {"w": (dt, flipped)})


def test_extreme_integer_deltas(tmp_path):
    """The mod-2^n delta wraps: min <-> max in both directions."""
    tensors = {}
    for dt in ("U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"):
        info = np.iinfo(dtypes.dtype(dt).storage)
        tensors[dt] = np.array([info.min, info.max, 0, info.min, info.max], dtype=dtypes.dtype(dt).storage)
    base = {f"t.{dt}": (dt, a) for dt, a in tensors.items()}
    ft = {f"t.{dt}": (dt, a[::-1].copy()) for dt, a in tensors.items()}
    roundtrip(tmp_path, base, ft)


def test_scalars(tmp_path):
    base = {
        "s": ("F32", np.array(1.5, np.float32)),
        "s16": ("BF16", np.array(0x3F80, np.uint16)),
        "gone": ("I64", np.array(-7, np.int64)),
        "retyped": ("F32", np.array(2.0, np.float32)),
    }
    ft = {
        "s": ("F32", np.array(-1.5, np.float32)),
        "s16": ("BF16", np.array(0x3F80, np.uint16)),
        "new": ("BOOL", np.array(1, np.uint8)),
        "retyped": ("F16", np.array(2.0, np.float16)),
    }
    out, _, decoded = roundtrip(tmp_path, base, ft)
    # retyped: F32 to F16, a cast an adapted record codes against (spec 10.13)
    assert kinds_of(out) == {"s": "dense-delta", "s16": "dense-delta", "new": "full",
                             "retyped": "adapted", "gone": "removed"}
    assert read_checkpoint(decoded)["s"][1].shape == ()


def test_empty_tensors(tmp_path):
    base = {
        "e1": ("F32", np.zeros((0,), np.float32)),
        "e2": ("BF16", np.zeros((0, 4), np.uint16)),
        "gone": ("I8", np.zeros((2, 0, 3), np.int8)),
        "reshaped": ("F16", np.zeros((0, 3), np.float16)),
    }
    ft = {
        "e1": ("F32", np.zeros((0,), np.float32)),
        "e2": ("BF16", np.zeros((0, 4), np.uint16)),
        "new": ("U8", np.zeros((4, 0), np.uint8)),
        "reshaped": ("F16", np.zeros((3, 0), np.float16)),
        "x": ("F32", np.ones(3, np.float32)),
    }
    out, _, _ = roundtrip(tmp_path, base, ft)
    assert kinds_of(out) == {"e1": "dense-delta", "e2": "dense-delta", "new": "full",
                             "reshaped": "full", "x": "full", "gone": "removed"}


def test_only_empty_tensors(tmp_path):
    """Every blob is empty: the data section starts aligned and ends there."""
    base = {"e": ("F32", np.zeros((0, 2), np.float32))}
    out, _, _ = roundtrip(tmp_path, base, {"e": ("F32", np.zeros((0, 2), np.float32))})
    with dcm.open(out) as f:
        assert f.header.file_length == f.header.data_start
        assert all(b["length"] == 0 for r in f.records() for b in r.blobs)


def test_nothing_at_all(tmp_path):
    """No tensors, no attachments: no blobs, the file ends with its index."""
    out, _, decoded = roundtrip(tmp_path, {}, {})
    with dcm.open(out) as f:
        assert f.header.file_length == HEADER_SIZE + f.header.index_length
        assert f.keys() == [] and f.records() == [] and f.attachments() == []
    assert (decoded / SINGLE_FILE).is_file()


def test_kinds_for_changed_names_shapes_dtypes(tmp_path, rng):
    base = {
        "kept": ("F32", random_storage(rng, "F32", (3, 4))),
        "gone": ("BF16", random_storage(rng, "BF16", (5,))),
        "reshaped": ("F32", random_storage(rng, "F32", (3, 4))),
        "retyped": ("F32", random_storage(rng, "F32", (6,))),
        "rewidth": ("I32", random_storage(rng, "I32", (6,))),
    }
    ft = {
        "kept": ("F32", perturb(rng, base["kept"][1])),
        "added": ("I64", random_storage(rng, "I64", (2, 2))),
        "reshaped": ("F32", base["reshaped"][1].reshape(4, 3).copy()),
        "retyped": ("U32", base["retyped"][1].view(np.uint32).copy()),  # same bytes, other dtype
        "rewidth": ("I16", random_storage(rng, "I16", (6,))),
    }
    out, _, _ = roundtrip(tmp_path, base, ft)
    assert kinds_of(out) == {"kept": "dense-delta", "added": "full", "reshaped": "full",
                             "retyped": "full", "rewidth": "full", "gone": "removed"}
    with dcm.open(out) as f:
        assert f.record("added").base is None
        assert f.record("reshaped").base["shape"] == [3, 4]  # a full record keeps its base's ref
        assert f.record("gone").blobs == ()


def test_large_tensor_in_chunks(tmp_path, rng, monkeypatch):
    """Chunked transforms (small chunks forced) join up exactly, at odd sizes."""
    monkeypatch.setattr(records, "_CHUNK", 7, raising=False)
    base = {"w": ("F32", random_storage(rng, "F32", (101,))), "b": ("BF16", random_storage(rng, "BF16", (3, 11)))}
    ft = {"w": ("F32", perturb(rng, base["w"][1])), "b": ("BF16", perturb(rng, base["b"][1]))}
    roundtrip(tmp_path, base, ft)


def test_streamed_base_is_hashed_whole(tmp_path, rng, monkeypatch):
    """Encode and decode stream base tensors in chunks, hashing them on the way: a change
    in the last chunk alone is a wrong base, and the file is the one whole arrays give."""
    monkeypatch.setattr(records, "_CHUNK", 7, raising=False)
    monkeypatch.setattr(checkpoint, "STREAM_CHUNK", 5, raising=False)
    base = {"w": ("BF16", random_storage(rng, "BF16", (9, 11))), "gone": ("F32", random_storage(rng, "F32", (23,))),
            "reshaped": ("F32", random_storage(rng, "F32", (4, 6)))}
    ft = {"w": ("BF16", perturb(rng, base["w"][1])), "reshaped": ("F32", random_storage(rng, "F32", (6, 4)))}
    out, base_dir, _ = roundtrip(tmp_path, base, ft)
    with dcm.open(out) as f:
        params, raws = records.DenseDelta.encode(ft["w"][1], base["w"][1])
        assert [bytes(r) for r in raws] == f.raw_blobs(f.record("w"))
        assert f.record("w").params == params
    for name in base:
        wrong = dict(base)
        array = base[name][1].copy()
        array.reshape(-1).view(np.uint8)[-1] ^= 1
        wrong[name] = (base[name][0], array)
        with pytest.raises(WrongBaseError, match=repr(name)):
            dcm.decode(out, write_checkpoint(tmp_path / f"wrong-{name}", wrong), tmp_path / "out")
        assert not (tmp_path / "out").exists()


# --- checkpoints: shards, attachments, metadata --------------------------------------


def test_sharded_input_and_output(tmp_path, rng):
    base = {f"layer.{i}.w": ("F32", random_storage(rng, "F32", (4, 4))) for i in range(6)}
    ft = {name: (dt, perturb(rng, a)) for name, (dt, a) in base.items()}
    ft["extra"] = ("BF16", random_storage(rng, "BF16", (8,)))
    base_dir = write_checkpoint(tmp_path / "base", base, max_shard_bytes=100)
    ft_dir = write_checkpoint(tmp_path / "ft", ft, max_shard_bytes=150)
    assert (base_dir / INDEX_FILE).is_file() and (ft_dir / INDEX_FILE).is_file()
    out = tmp_path / "x.dcm"
    dcm.encode(base_dir, ft_dir, out)
    with dcm.open(out) as f:
        assert f.attachments() == []  # shards and their index are weights, not attachments
    single = tmp_path / "single"
    dcm.decode(out, base_dir, single)
    assert (single / SINGLE_FILE).is_file() and not (single / INDEX_FILE).exists()
    assert_same_tensors(read_checkpoint(single), ft)
    sharded = tmp_path / "sharded"
    dcm.decode(out, base_dir, sharded, max_shard_bytes=64)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) == 7 and (sharded / INDEX_FILE).is_file()
    assert_same_tensors(read_checkpoint(sharded), ft)
    # A sharded base and a single-file base hold the same tensors: either decodes.
    single_base = write_checkpoint(tmp_path / "base1", base)
    dcm.decode(out, single_base, tmp_path / "again")
    assert_same_tensors(read_checkpoint(tmp_path / "again"), ft)


def test_attachments_and_metadata(tmp_path, rng):
    base = {"w": ("F32", random_storage(rng, "F32", (3,)))}
    ft = {"w": ("F32", perturb(rng, base["w"][1]))}
    attachments = dict(SMALL_ATTACHMENTS)
    attachments["tokenizer.json"] = bytes(range(256)) * 40  # compressible, binary
    attachments["empty.txt"] = b""
    attachments["a/b/c/deep.txt"] = "ünïcödé\n".encode()
    metadata = {"format": "pt", "purpose": "test ✓"}
    out, _, decoded = roundtrip(tmp_path, base, ft, attachments=attachments, metadata=metadata)
    with dcm.open(out) as f:
        assert f.attachments() == sorted(attachments)
        for name, data in attachments.items():
            assert f.attachment(name) == data
        assert f.metadata()["checkpoint_metadata"] == metadata
        with pytest.raises(UsageError):
            f.attachment("missing.json")
    assert (decoded / "1_Pooling" / "config.json").read_bytes() == SMALL_ATTACHMENTS["1_Pooling/config.json"]
    from dcm.checkpoint import Checkpoint
    with Checkpoint(decoded) as ckpt:
        assert ckpt.metadata == metadata


# --- the reading API ----------------------------------------------------------------


def test_open_api(small_dcm):
    path, _, base, ft = small_dcm
    base_arrays = {n: a for n, (_, a) in base.items()}
    with dcm.open(path) as f:
        assert f.keys() == list(ft)  # the fine-tune's order; removed excluded
        recs = f.records()
        assert [r.name for r in recs] == [*ft, "gone"]
        assert [r.kind_name for r in recs] == ["dense-delta", "dense-delta", "dense-delta", "full",
                                               "full", "removed"]
        rec = f.record("a.weight")
        assert (rec.dtype, rec.shape, rec.numel) == ("F32", (4, 4), 16)
        assert rec.base["shape"] == [4, 4] and len(rec.base["sha256"]) == 32
        assert rec.payload_bytes == sum(b["length"] for b in rec.blobs)
        assert rec.total_bytes == rec.payload_bytes + rec.index_bytes and rec.index_bytes > 0
        assert f.record("gone").kind_name == "removed" and f.record("gone").payload_bytes == 0
        with pytest.raises(UsageError, match="nope"):
            f.record("nope")

        meta = f.metadata()
        assert meta["format"] == "1.0" and meta["method"] == "lossless"
        assert meta["creator"].startswith("dcm ") and meta["params"]["zstd_level"] == 3
        assert len(bytes.fromhex(meta["base_digest"])) == 32
        assert meta["checkpoint_metadata"] == {"format": "pt", "note": "tiny"}
        assert f.attachments() == sorted(SMALL_ATTACHMENTS)

        for name, (dt, expected) in ft.items():
            got = f.tensor(name, base_arrays.get(name))
            assert got.dtype == dtypes.dtype(dt).storage and got.shape == expected.shape
            assert got.tobytes() == expected.tobytes()
        assert f.tensor("gone") is None
        assert f.tensor("new").tobytes() == ft["new"][1].tobytes()  # full: no base needed
        with pytest.raises(UsageError, match="base"):
            f.tensor("a.weight")
        assert "small.dcm" in repr(f)


def test_delta_api(small_dcm):
    path, _, base, ft = small_dcm
    with dcm.open(path) as f:
        d = f.delta("a.weight", base["a.weight"][1])
        assert d.dtype == np.float32 and d.shape == (4, 4)
        np.testing.assert_allclose(d, ft["a.weight"][1] - base["a.weight"][1], rtol=1e-6, atol=1e-7)
        d = f.delta("b.bias", base["b.bias"][1])
        widen = lambda a: (a.astype(np.uint32) << 16).view(np.float32)  # noqa: E731
        np.testing.assert_allclose(d, widen(ft["b.bias"][1]) - widen(base["b.bias"][1]), rtol=1e-6)
        assert np.count_nonzero(d) == 2
        with pytest.raises(UsageError):
            f.delta("a.weight")  # needs the base
        with pytest.raises(UsageError):
            f.delta("same", base["same"][1])  # integers have no float delta
        with pytest.raises(UsageError):
            f.delta("gone", base["gone"][1])
        with pytest.raises(WrongBaseError):
            f.delta("a.weight", base["a.weight"][1].reshape(2, 8))  # a dense-delta's base is checked


def test_delta_of_full_records(tmp_path, rng):
    base = {"retyped": ("F16", storage("F16", [1.0, 2.0, 3.0])),
            "reshaped": ("F32", storage("F32", [1.0, 2.0, 3.0, 4.0]))}
    ft = {"retyped": ("F32", storage("F32", [1.5, 2.0, 2.0])),
          "reshaped": ("F32", storage("F32", [[1.0, 2.0], [3.0, 4.0]]))}
    out, _, _ = roundtrip(tmp_path, base, ft)
    with dcm.open(out) as f:
        np.testing.assert_array_equal(f.delta("retyped", base["retyped"][1]), [0.5, 0.0, -1.0])
        with pytest.raises(UsageError, match="shape"):
            f.delta("reshaped", base["reshaped"][1])  # no element-wise delta across shapes


def test_encode_is_deterministic(small_pair, tmp_path):
    base_dir, ft_dir, _, _ = small_pair
    dcm.encode(base_dir, ft_dir, tmp_path / "1.dcm")
    dcm.encode(base_dir, ft_dir, tmp_path / "2.dcm")
    assert (tmp_path / "1.dcm").read_bytes() == (tmp_path / "2.dcm").read_bytes()


def test_encode_report(small_pair, tmp_path):
    base_dir, ft_dir, _, ft = small_pair
    report = dcm.encode(base_dir, ft_dir, tmp_path / "r.dcm")
    assert report.records == len(ft) + 1
    assert report.params == sum(a.size for _, a in ft.values())
    assert report.finetune_bytes == sum(a.nbytes for _, a in ft.values())
    assert report.bits_per_param > 0


# --- failures leave nothing behind ---------------------------------------------------


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".dcm")


def test_invalid_finetune_leaves_nothing(small_pair, tmp_path):
    base_dir, _, _, _ = small_pair
    bad = tmp_path / "bad-ft"
    bad.mkdir()
    (bad / SINGLE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CheckpointError):
        dcm.encode(base_dir, bad, out_dir / "x.dcm")
    with pytest.raises(CheckpointError):
        dcm.encode(base_dir, tmp_path / "missing", out_dir / "x.dcm")
    assert leftovers(out_dir) == []


@pytest.mark.parametrize("where", ["tensor", "attachments", "finish"])
def test_failure_during_encode_leaves_nothing(small_pair, tmp_path, monkeypatch, where):
    base_dir, ft_dir, _, _ = small_pair
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def boom(*args, **kwargs):
        raise CheckpointError("injected failure")
    if where == "tensor":
        monkeypatch.setattr(records.Full, "encode", staticmethod(boom))
    elif where == "attachments":
        monkeypatch.setattr(importlib.import_module("dcm.checkpoint").Checkpoint, "read_attachment", boom)
    else:
        monkeypatch.setattr(container, "_copy_file", boom)
    with pytest.raises(CheckpointError, match="injected"):
        dcm.encode(base_dir, ft_dir, out_dir / "x.dcm")
    assert leftovers(out_dir) == []
    assert os.listdir(out_dir) == []


def test_interrupted_encode_leaves_nothing(small_pair, tmp_path, monkeypatch):
    base_dir, ft_dir, _, _ = small_pair

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(container, "_copy_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        dcm.encode(base_dir, ft_dir, tmp_path / "x.dcm")
    assert leftovers(tmp_path) == []


def test_output_exists(small_pair, tmp_path):
    base_dir, ft_dir, _, _ = small_pair
    out = tmp_path / "x.dcm"
    dcm.encode(base_dir, ft_dir, out)
    before = out.read_bytes()
    with pytest.raises(OutputExistsError):
        dcm.encode(base_dir, ft_dir, out)
    assert out.read_bytes() == before
    dcm.encode(base_dir, ft_dir, out, overwrite=True)
    assert out.read_bytes() == before
    decoded = tmp_path / "dec"
    dcm.decode(out, base_dir, decoded)
    with pytest.raises(OutputExistsError):
        dcm.decode(out, base_dir, decoded)
    dcm.decode(out, base_dir, decoded, overwrite=True)
    assert leftovers(tmp_path) == ["x.dcm"]


# --- property: random checkpoints round trip -----------------------------------------

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3)
entry = st.tuples(
    st.sampled_from(ALL_DTYPES),
    shapes,
    st.sampled_from(["both-same", "both-perturbed", "both-random", "base-only", "ft-only",
                     "other-dtype", "other-shape"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entry, max_size=5), st.integers(0, 2**32 - 1))
def test_property_lossless_roundtrip(entries, seed):
    rng = np.random.default_rng(seed)
    base, ft = {}, {}
    for i, (dt, shape, mode) in enumerate(entries):
        name = f"t{i}"
        b = random_storage(rng, dt, tuple(shape))
        if mode != "ft-only":
            base[name] = (dt, b)
        if mode == "base-only":
            continue
        if mode == "both-same":
            ft[name] = (dt, b.copy())
        elif mode == "both-perturbed":
            ft[name] = (dt, perturb(rng, b))
        elif mode == "other-dtype":
            other = "I16" if dt != "I16" else "F32"
            ft[name] = (other, random_storage(rng, other, tuple(shape)))
        elif mode == "other-shape":
            ft[name] = (dt, random_storage(rng, dt, (*shape, 2)))
        else:
            ft[name] = (dt, random_storage(rng, dt, tuple(shape)))
    with tempfile.TemporaryDirectory() as tmp:
        out, _, _ = roundtrip(Path(tmp), base, ft)
        expected_removed = {n for n in base if n not in ft}
        kinds = kinds_of(out)
        assert {n for n, k in kinds.items() if k == "removed"} == expected_removed
        for name, (dt, array) in ft.items():
            same = name in base and base[name][0] == dt and base[name][1].shape == array.shape
            assert kinds[name] == ("dense-delta" if same else "full")
