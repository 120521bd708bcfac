"""Tests of dcm.checkpoint: hand-written safetensors reading and streaming writing,
cross-checked against the safetensors library."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from dcm.checkpoint import (
    INDEX_FILE,
    MAX_ATTACHMENT_BYTES,
    Checkpoint,
    CheckpointWriter,
    TensorInfo,
    TensorStream,
    check_relpath,
)
from dcm.errors import CheckpointError, FormatError, OutputExistsError, UnsafeOutputError, UsageError
from dcm.outputs import MARKER
from dcm.reader import tensor_sha256

RNG = np.random.default_rng(0)


def sample_tensors() -> dict[str, tuple[str, np.ndarray]]:
    """name -> (dtype, storage array); covers odd cases: 0-d, empty, bool, bf16."""
    return {
        "w.f32": ("F32", RNG.standard_normal((3, 5)).astype(np.float32)),
        "w.f16": ("F16", RNG.standard_normal(7).astype(np.float16)),
        "w.bf16": ("BF16", RNG.integers(0, 2**16, (4, 2), dtype=np.uint16)),
        "ids": ("I64", np.arange(-3, 6, dtype=np.int64).reshape(3, 3)),
        "mask": ("BOOL", np.array([True, False, True])),
        "scalar": ("F32", np.array(2.5, dtype=np.float32)),
        "empty": ("F32", np.zeros((0, 4), dtype=np.float32)),
        "fp8": ("F8_E4M3", RNG.integers(0, 256, 6, dtype=np.uint8)),
    }


def infos_of(tensors) -> list[TensorInfo]:
    return [TensorInfo(n, dt, a.shape, a.nbytes) for n, (dt, a) in tensors.items()]


def write_all(out, tensors, **kw) -> None:
    with CheckpointWriter(out, infos_of(tensors), **kw) as w:
        for name, (_, a) in tensors.items():
            w.write(name, a)


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()


# --- writing, then reading back --------------------------------------------------


def test_roundtrip_single_file(tmp_path):
    tensors = sample_tensors()
    out = tmp_path / "model"
    write_all(out, tensors, metadata={"who": "test"})
    assert sorted(os.listdir(out)) == [MARKER, "model.safetensors"]
    with Checkpoint(out) as ck:
        assert ck.names() == list(tensors)
        assert len(ck) == len(tensors) and "w.f32" in ck and "nope" not in ck
        assert ck.metadata == {"who": "test", "format": "pt"}
        for name, (dt, a) in tensors.items():
            info = ck.info(name)
            assert (info.dtype, info.shape, info.nbytes) == (dt, a.shape, a.nbytes)
            got = ck.read(name)
            assert got.dtype.itemsize == a.dtype.itemsize and same_bytes(got, a)


def test_header_is_aligned_and_matches_library(tmp_path):
    tensors = sample_tensors()
    write_all(tmp_path / "m", tensors)
    raw = (tmp_path / "m" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    numeric = {k: v for k, v in tensors.items() if v[0] not in ("BF16", "F8_E4M3")}
    ours = {k: v[1] for k, v in numeric.items()}
    # The library sorts tensors differently, so compare contents, not files.
    theirs = safetensors.numpy.load(safetensors.numpy.save(ours))
    assert all(same_bytes(theirs[k], ours[k]) for k in ours)


def test_library_reads_our_output(tmp_path):
    tensors = {k: v for k, v in sample_tensors().items() if k != "fp8"}
    write_all(tmp_path / "m", tensors)
    path = str(tmp_path / "m" / "model.safetensors")
    with safetensors.safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        for name, (dt, a) in tensors.items():
            if dt != "BF16":  # numpy has no bf16
                assert same_bytes(f.get_tensor(name), a)
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    loaded = load_file(path)
    bf16 = tensors["w.bf16"][1]
    assert loaded["w.bf16"].dtype == torch.bfloat16
    assert same_bytes(loaded["w.bf16"].view(torch.int16).numpy().view(np.uint16), bf16)


def test_sharded_roundtrip(tmp_path):
    tensors = sample_tensors()
    out = tmp_path / "sharded"
    write_all(out, tensors, max_shard_bytes=40)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and INDEX_FILE in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for _, a in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for shard in shards:
        size = sum(tensors[n][1].nbytes for n, s in index["weight_map"].items() if s == shard)
        big = any(tensors[n][1].nbytes > 40 for n, s in index["weight_map"].items() if s == shard)
        assert size <= 40 or big
        names = _names_in(out / shard)
        if not names & {"w.bf16", "fp8"}:  # numpy cannot load those dtypes
            loaded = safetensors.numpy.load_file(str(out / shard))
            assert all(same_bytes(loaded[n], tensors[n][1]) for n in names)
    with Checkpoint(out) as ck:
        assert ck.names() == list(tensors)
        assert all(same_bytes(ck.read(n), a) for n, (_, a) in tensors.items())


def _names_in(path) -> set[str]:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return set(json.loads(path.read_bytes()[8 : 8 + n])) - {"__metadata__"}


def test_oversized_tensor_gets_own_shard(tmp_path):
    tensors = {
        "a": ("U8", np.ones(4, np.uint8)),
        "big": ("U8", np.ones(100, np.uint8)),
        "b": ("U8", np.ones(4, np.uint8)),
    }
    write_all(tmp_path / "m", tensors, max_shard_bytes=10)
    wmap = json.loads((tmp_path / "m" / INDEX_FILE).read_text())["weight_map"]
    assert len(set(wmap.values())) == 3


def test_read_library_written_file(tmp_path):
    arrays = {
        "z": np.arange(10, dtype=np.float64),
        "a": RNG.standard_normal((2, 3)).astype(np.float32),
        "m": np.array([[1, 2], [3, 4]], dtype=np.int32),
        "e": np.zeros((0,), dtype=np.int16),
        "s": np.array(7, dtype=np.uint8),
    }
    path = tmp_path / "lib.safetensors"
    safetensors.numpy.save_file(arrays, str(path), metadata={"k": "v"})
    with Checkpoint(path) as ck:
        assert sorted(ck.names()) == sorted(arrays)
        assert ck.metadata == {"k": "v"}
        assert all(same_bytes(ck.read(n), a) for n, a in arrays.items())
        assert ck.attachments() == []


def test_empty_checkpoint(tmp_path):
    with CheckpointWriter(tmp_path / "m", []):
        pass
    with Checkpoint(tmp_path / "m") as ck:
        assert ck.names() == []
    assert safetensors.numpy.load_file(str(tmp_path / "m" / "model.safetensors")) == {}


# --- writer misuse and atomicity --------------------------------------------------


def test_writer_rejects_misuse(tmp_path):
    tensors = sample_tensors()
    with pytest.raises(UsageError):  # exception inside `with` aborts the writer
        with CheckpointWriter(tmp_path / "m", infos_of(tensors)) as w:
            with pytest.raises(UsageError, match="out of order"):
                w.write("w.f16", tensors["w.f16"][1])
            with pytest.raises(UsageError):
                w.write("w.f32", tensors["w.f32"][1].T)  # wrong shape
            with pytest.raises(UsageError):
                w.write("w.f32", tensors["w.f32"][1].astype(np.float64))  # wrong width
            with pytest.raises(UsageError):
                w.write("w.f32", np.empty((3, 5), dtype=object))
            w.write("w.f32", tensors["w.f32"][1])
            w.commit()  # not all written
    assert os.listdir(tmp_path) == []


def test_big_endian_input_is_stored_little_endian(tmp_path):
    a = np.arange(6, dtype=">i4").reshape(2, 3)
    write_all(tmp_path / "m", {"a": ("I32", a)})
    with Checkpoint(tmp_path / "m") as ck:
        assert np.array_equal(ck.read("a"), a)


def test_exception_inside_with_leaves_nothing(tmp_path):
    tensors = sample_tensors()
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "m", infos_of(tensors), max_shard_bytes=40) as w:
            w.write("w.f32", tensors["w.f32"][1])
            w.write_attachment("config.json", b"{}")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_abort_leaves_nothing(tmp_path):
    w = CheckpointWriter(tmp_path / "m", infos_of(sample_tensors()))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_existing_output(tmp_path):
    tensors = {"x": ("I32", np.arange(3, dtype=np.int32))}
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        CheckpointWriter(out, infos_of(tensors))
    with pytest.raises(UnsafeOutputError, match="did not write"):  # not a directory dcm wrote
        CheckpointWriter(out, infos_of(tensors), overwrite=True)
    (out / "old.txt").unlink()
    out.rmdir()
    write_all(out, tensors)
    write_all(out, tensors, overwrite=True)
    assert sorted(os.listdir(out)) == [MARKER, "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["m"]  # old copy removed too
    empty = tmp_path / "e"
    empty.mkdir()
    write_all(empty, tensors)
    assert sorted(os.listdir(empty)) == [MARKER, "model.safetensors"]


def test_write_attachments(tmp_path):
    tensors = {"x": ("I32", np.arange(3, dtype=np.int32))}
    with CheckpointWriter(tmp_path / "m", infos_of(tensors)) as w:
        w.write("x", tensors["x"][1])
        w.write_attachment("1_Pooling/config.json", b'{"a": 1}')
        for bad in ("../evil", "/abs", "model.safetensors"):
            with pytest.raises((FormatError, UsageError)):
                w.write_attachment(bad, b"")
    assert (tmp_path / "m" / "1_Pooling" / "config.json").read_bytes() == b'{"a": 1}'
    with Checkpoint(tmp_path / "m") as ck:
        assert ck.attachments() == ["1_Pooling/config.json"]


# --- attachments -------------------------------------------------------------------


def test_attachments_listing(tmp_path):
    d = tmp_path / "m"
    write_all(d, {"x": ("U8", np.zeros(2, np.uint8))})
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text("{}")
    (d / ".hidden").write_text("x")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("x")
    (d / "pytorch_model.bin").write_bytes(b"x")
    (d / "huge.txt").write_bytes(b"\0" * (MAX_ATTACHMENT_BYTES + 1))
    outside = tmp_path / "secret"
    outside.write_text("key")
    os.symlink(outside, d / "link.txt")
    os.symlink(d / "config.json", d / "inside.json")
    with Checkpoint(d) as ck:
        assert ck.attachments() == ["1_Pooling/config.json", "config.json", "inside.json", "tokenizer.json"]
        skipped = dict(ck.skipped_attachments())
        assert set(skipped) == {"huge.txt", "link.txt", "pytorch_model.bin"}
        assert ck.read_attachment("1_Pooling/config.json") == b"{}"
        with pytest.raises(CheckpointError):
            ck.read_attachment("link.txt")


def test_hub_cache_links_are_followed(tmp_path):
    repo = tmp_path / "models--x"
    snap = repo / "snapshots" / "abc"
    snap.parent.mkdir(parents=True)
    write_all(snap, {"x": ("U8", np.zeros(2, np.uint8))})
    (repo / "blobs").mkdir()
    (repo / "blobs" / "123").write_text("{}")
    os.symlink("../../blobs/123", snap / "config.json")
    with Checkpoint(snap) as ck:
        assert ck.attachments() == ["config.json"]


@pytest.mark.parametrize(
    "bad",
    ["", "/etc/passwd", "a/../b", "..", "./a", "a//b", "a/", "a\\b", "C:/x", "c:x", "a\0b", "x" * 256],
)
def test_check_relpath_rejects(bad):
    with pytest.raises(FormatError):
        check_relpath(bad)


@pytest.mark.parametrize("good", ["config.json", "1_Pooling/config.json", "a/b.c/d", "é.txt"])
def test_check_relpath_accepts(good):
    assert check_relpath(good) == good


# --- malformed input -----------------------------------------------------------------


def raw_file(path, header, data=b"", n=None) -> None:
    """A safetensors file with a hand-made header (dict or raw bytes)."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if n is None else n) + body + data)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "header,data,n,match",
    [
        (b"", b"", None, "JSON"),
        (b"{}", b"", 200 * 2**20, "exceeds"),
        (b"{}", b"", 10, "exceeds"),
        (b"{not json", b"", None, "JSON"),
        (b'{"a":' + json.dumps(entry()).encode() + b',"a":' + json.dumps(entry()).encode() + b"}",
         b"\0" * 8, None, "duplicate"),
        (b"[]", b"", None, "object"),
        ({"a": entry(), "b": entry(offsets=(4, 12))}, b"\0" * 12, None, "overlaps"),
        ({"a": entry(offsets=(0, 8))}, b"\0" * 4, None, "outside"),
        ({"a": entry(shape=(3,))}, b"\0" * 8, None, "expected"),
        ({"a": entry(dtype="F4")}, b"\0" * 8, None, "unknown dtype"),
        ({"a": entry(shape=(-1,), offsets=(0, 0))}, b"", None, "shape"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "keys"),
        ({"__metadata__": {"a": 1}}, b"", None, "metadata"),
    ],
)
def test_malformed_headers(tmp_path, header, data, n, match):
    path = tmp_path / "bad.safetensors"
    raw_file(path, header, data, n)
    with pytest.raises(CheckpointError, match=match) as exc:
        Checkpoint(path)
    assert "bad.safetensors" in str(exc.value)


def test_truncated_prefix(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(tmp_path / "t.safetensors")


def test_error_names_tensor(tmp_path):
    raw_file(tmp_path / "x.safetensors", {"layer.0.w": entry(dtype="NOPE")}, b"\0" * 8)
    with pytest.raises(CheckpointError, match="layer.0.w"):
        Checkpoint(tmp_path / "x.safetensors")


def test_unknown_tensor_name(tmp_path):
    write_all(tmp_path / "m", {"x": ("U8", np.zeros(2, np.uint8))})
    with Checkpoint(tmp_path / "m") as ck, pytest.raises(CheckpointError, match="nope"):
        ck.info("nope")


def test_directory_without_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        Checkpoint(tmp_path)


def _sharded_dir(tmp_path, weight_map):
    d = tmp_path / "s"
    d.mkdir(parents=True)
    raw_file(d / "a.safetensors", {"x": entry()}, b"\0" * 8)
    raw_file(d / "b.safetensors", {"y": entry()}, b"\0" * 8)
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_sharded_index_checks(tmp_path):
    with Checkpoint(_sharded_dir(tmp_path / "ok", {"x": "a.safetensors", "y": "b.safetensors"})) as ck:
        assert ck.names() == ["x", "y"]
    cases = {
        "bad_name": ({"x": "../a.safetensors", "y": "b.safetensors"}, "plain file name"),
        "missing": ({"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"}, "missing"),
        "wrong_shard": ({"x": "b.safetensors", "y": "b.safetensors"}, "missing"),
        "no_file": ({"x": "a.safetensors", "y": "c.safetensors"}, "c.safetensors"),
    }
    for sub, (wmap, match) in cases.items():
        with pytest.raises(CheckpointError, match=match):
            Checkpoint(_sharded_dir(tmp_path / sub, wmap))


def test_unlisted_tensor_in_shard(tmp_path):
    d = _sharded_dir(tmp_path, {"x": "a.safetensors", "y": "b.safetensors"})
    raw_file(d / "b.safetensors", {"y": entry(), "w": entry(offsets=(8, 16))}, b"\0" * 16)
    with pytest.raises(CheckpointError, match="'w' is not mapped"):
        Checkpoint(d)


def test_file_outside_index_is_not_a_shard(tmp_path):
    with Checkpoint(_sharded_dir(tmp_path, {"x": "a.safetensors"})) as ck:
        assert ck.names() == ["x"]
        assert [p for p, _ in ck.skipped_attachments()] == ["b.safetensors"]


def test_tensor_in_two_shards(tmp_path):
    d = _sharded_dir(tmp_path, {"x": "a.safetensors", "y": "b.safetensors"})
    raw_file(d / "b.safetensors", {"y": entry(), "x": entry(offsets=(8, 16))}, b"\0" * 16)
    with pytest.raises(CheckpointError, match="'x'"):
        Checkpoint(d)


# --- reading in chunks (what encode and decode stream through) --------------------


def test_read_elements_slices_the_flattened_tensor(tmp_path):
    tensors = sample_tensors()
    write_all(tmp_path / "m", tensors)
    with Checkpoint(tmp_path / "m") as ck:
        for name, (_, a) in tensors.items():
            flat = a.reshape(-1)
            half = flat.size // 2
            for start, count in [(0, flat.size), (0, 0), (flat.size, 0), (half, flat.size - half)]:
                got = ck.read_elements(name, start, count)
                assert got.shape == (count,) and got.dtype.itemsize == a.dtype.itemsize
                assert got.tobytes() == flat[start:start + count].tobytes()


@pytest.mark.parametrize("start, count", [(-1, 1), (0, 16), (15, 1), (16, 0), (0, -1), (1.0, 1)])
def test_read_elements_is_bounds_checked(tmp_path, start, count):
    write_all(tmp_path / "m", {"a": ("F32", np.zeros((3, 5), np.float32))})
    with Checkpoint(tmp_path / "m") as ck, pytest.raises(UsageError, match="'a'"):
        ck.read_elements("a", start, count)


def test_tensor_stream_hashes_what_it_reads(tmp_path):
    tensors = sample_tensors()
    write_all(tmp_path / "m", tensors)
    with Checkpoint(tmp_path / "m") as ck:
        for name, (_, a) in tensors.items():
            assert ck.sha256(name) == tensor_sha256(a)
        stream = TensorStream(ck, "w.f32", sha256=True)
        assert stream.numel == 15 and stream.itemsize == 4
        with pytest.raises(UsageError, match="0 of 15"):
            stream.digest()  # nothing read yet
        stream(slice(0, 4))
        with pytest.raises(UsageError, match="expected 4"):
            stream(slice(5, 9))  # a gap would hash the wrong bytes
        stream(slice(4, 15))
        assert stream.digest() == tensor_sha256(tensors["w.f32"][1])
