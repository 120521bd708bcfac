"""The ``delta-come`` method: byte budget, allocation, GPTQ, SVD, options and CLI.

The budget is checked on the written file, read here with ``struct`` and ``msgpack`` alone:
for the lossy records, the msgpack bytes of their index entries, their stored blob bytes
and the alignment padding in front of each blob must add up to at most
``ratio · 16 bits`` per parameter of those records.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import tempfile
from fractions import Fraction
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcm
from dcm import lowrank, quant
from dcm.methods import allocate, budget, deltacome, gptq
from dcm.cli import main
from dcm.constants import Kind
from dcm.methods.base import TensorPlan
from dcm.methods.deltacome import DeltaCoMe, parse_recipe
from dcm.methods.svd import exact_svd, randomized_svd
from dcm.errors import DcmError, UsageError
from dcm.lowrank import BitGroup

from conftest import read_checkpoint, storage, write_checkpoint

HEADER = struct.Struct("<8sHHIIIQQ20sI")  # spec section 3
LOWRANK = int(Kind.LOWRANK_MIXED)
DTYPES = ("F32", "F16", "BF16")


# --- reading a file independently ----------------------------------------------------------


def read_file(path):
    """(header fields, index) of a .dcm file; the index re-packs to its exact bytes."""
    raw = Path(path).read_bytes()
    _, major, minor, _, _, align, index_len, file_len, _, _ = HEADER.unpack(raw[:64])
    index_bytes = raw[64:64 + index_len]
    index = msgpack.unpackb(index_bytes, raw=False)
    # msgpack writes shortest forms, so re-packing gives the writer's bytes: entry sizes are exact.
    assert msgpack.packb(index, use_bin_type=True) == index_bytes
    return {"major": major, "minor": minor, "alignment": align, "file_length": file_len}, index


def lossy_bytes(path) -> tuple[int, int, dict]:
    """(bytes of the lowrank-mixed records, their parameters, per-record bytes).

    Bytes are each record's msgpack index entry, its stored blobs and the padding that
    alignment put in front of each of its blobs (blob offsets are relative to the data section).
    """
    _, index = read_file(path)
    sequence = [(rec["name"], b) for rec in index["tensors"] for b in rec["blobs"]]
    sequence += [(None, att["blob"]) for att in index.get("attachments", [])]
    padding, end = {}, 0
    for owner, blob in sequence:
        assert blob["offset"] >= end
        padding[owner] = padding.get(owner, 0) + blob["offset"] - end
        end = blob["offset"] + blob["length"]
    total = params = 0
    per = {}
    for rec in index["tensors"]:
        if rec["kind"] != LOWRANK:
            continue
        cost = len(msgpack.packb(rec, use_bin_type=True)) + sum(b["length"] for b in rec["blobs"])
        cost += padding.get(rec["name"], 0)
        per[rec["name"]] = cost
        total += cost
        params += math.prod(rec["shape"])
    return total, params, per


def rank0_entry_bytes(name, dtype_name, shape) -> int:
    """Bytes of the index entry of a rank-0 lowrank-mixed record (no blob): the least a matrix costs."""
    rec = {"name": name, "kind": LOWRANK, "dtype": dtype_name, "shape": list(shape),
           "params": {"packing": 1, "groups": []}, "blobs": [],
           "base": {"dtype": dtype_name, "shape": list(shape), "sha256": bytes(32)}}
    return len(msgpack.packb(rec, use_bin_type=True))


def to_storage(values: np.ndarray, dtype_name: str) -> np.ndarray:
    return storage(dtype_name, np.asarray(values, dtype=np.float32))


def values(array: np.ndarray, dtype_name: str) -> np.ndarray:
    if dtype_name == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def lowrank_matrix(rng, m, n, s) -> np.ndarray:
    k = len(s)
    q1 = np.linalg.qr(rng.standard_normal((m, k)))[0]
    q2 = np.linalg.qr(rng.standard_normal((n, k)))[0]
    return (q1 * np.asarray(s)) @ q2.T


def make_pair(tmp, shapes: dict, *, seed=0, vectors=None, dtypes=None, spectra=None):
    """Base and fine-tune checkpoints of matrices with long-tailed deltas (and 1-D tensors)."""
    rng = np.random.default_rng(seed)
    base, ft, deltas = {}, {}, {}
    for name, (m, n) in shapes.items():
        dt = (dtypes or {}).get(name, "F32")
        k = min(m, n)
        s = (spectra or {}).get(name)
        if s is None:
            s = 0.05 / (1 + np.arange(k)) ** 1.2
        w = (0.05 * rng.standard_normal((m, n))).astype(np.float32)
        d = lowrank_matrix(rng, m, n, s)
        base[name] = (dt, to_storage(w, dt))
        ft[name] = (dt, to_storage(w + d, dt))
        deltas[name] = values(ft[name][1], dt).astype(np.float64) - values(base[name][1], dt)
    for name, length in (vectors or {}).items():
        b = rng.standard_normal(length).astype(np.float32)
        base[name] = ("F32", b)
        ft[name] = ("F32", b + np.float32(1e-3) * rng.standard_normal(length).astype(np.float32))
    tmp = Path(tmp)
    return write_checkpoint(tmp / "base", base), write_checkpoint(tmp / "ft", ft), base, ft, deltas


def frobenius_error(path, base, deltas) -> float:
    with dcm.open(path) as f:
        return sum(float(((f.delta(n, base[n][1]).astype(np.float64) - d) ** 2).sum()) for n, d in deltas.items())


def within_budget(path, ratio: Fraction):
    total, params, _ = lossy_bytes(path)
    assert 8 * total <= ratio * 16 * params, (total, params, ratio)
    return total, params


def write_stats(path, hessians: dict, tokens: int) -> Path:
    """A calibration file made by hand: one float32 mean Hessian per weight, dcm-calibration metadata."""
    from safetensors.numpy import save_file

    tensors = {}
    for name, h in hessians.items():
        h = np.asarray(h, dtype=np.float64)
        tensors[name] = ((h + h.T) / 2).astype(np.float32)
    save_file(tensors, str(path), metadata={"format": "dcm-calibration", "version": "1", "tokens": str(tokens)})
    return Path(path)


# --- recipe and options -------------------------------------------------------------------------


@pytest.mark.parametrize("text, recipe", [
    ("8:2,3:32,2", ((8, 2), (3, 32), (2, None))),
    ("4", ((4, None),)),
    (" 8:1 , 2:0 , 3 ", ((8, 1), (2, 0), (3, None))),
    ("1:5,8:7", ((1, 5), (8, 7))),
])
def test_parse_recipe(text, recipe):
    assert parse_recipe(text) == recipe
    assert parse_recipe(deltacome.recipe_text(recipe)) == recipe


@pytest.mark.parametrize("text", ["9:2", "0:2", "8:-1", "2,8:2", "", ",", "a:b", "8:x", "8:2:1", "3.5:2",
                                  "8:1," * 64 + "2"])  # 65 items: more bit groups than a record may hold
def test_parse_recipe_rejects(text):
    with pytest.raises(UsageError):
        parse_recipe(text)


@pytest.mark.parametrize("options", [
    {"alloc": "x"}, {"alloc": "RD"}, {"svd": "x"}, {"recipe": "9:2"}, {"recipe": "8:2,x"},
    {"group_size": 0}, {"group_size": 65537}, {"group_size": -1}, {"group_size": "16"}, {"group_size": 1.5},
    {"widths": (0, 2)}, {"widths": (9,)}, {"widths": ()}, {"no_such_option": 1},
])
def test_bad_options_raise_usage_errors(tmp_path, options):
    known = set(options) - {"no_such_option"}
    if known:
        with pytest.raises(UsageError):
            DeltaCoMe("1/16", **options)
    base_dir, ft_dir, *_ = make_pair(tmp_path, {"w": (8, 6)})
    with pytest.raises(UsageError):
        dcm.encode(base_dir, ft_dir, tmp_path / "x.dcm", method="delta-come", ratio="1/4", options=options)
    assert not (tmp_path / "x.dcm").exists()


@pytest.mark.parametrize("ratio", ["0", "2", "-1/16", "x"])
def test_bad_ratio(tmp_path, ratio):
    base_dir, ft_dir, *_ = make_pair(tmp_path, {"w": (8, 6)})
    with pytest.raises(UsageError):
        dcm.encode(base_dir, ft_dir, tmp_path / "x.dcm", method="delta-come", ratio=ratio)


def test_good_options_are_recorded():
    m = DeltaCoMe("1/8", alloc="rd", svd="randomized", group_size=65536, widths=(8, 2, 2))
    c = m.get_config()
    assert (c["ratio"], c["alloc"], c["svd"], c["group_size"], c["quantizer"]) == ("1/8", "rd", "randomized",
                                                                                     65536, "rtn")
    assert c["widths"] == [2, 8]
    c = DeltaCoMe("1/16", recipe="8:1,4:4,2", group_size=1).get_config()
    assert (c["alloc"], c["svd"], c["recipe"], c["group_size"]) == ("recipe", "exact", "8:1,4:4,2", 1)


# --- recipe layout --------------------------------------------------------------------------------


def record_groups(path) -> dict:
    _, index = read_file(path)
    return {r["name"]: r["params"]["groups"] for r in index["tensors"] if r["kind"] == LOWRANK}


def test_recipe_layout_with_room_to_spare(tmp_path):
    """At ratio 1 every vector fits: 2 at 8 bit, 32 at 3 bit, the rest at 2 bit, in that order."""
    base_dir, ft_dir, *_ = make_pair(tmp_path, {"w": (96, 80)})
    out = tmp_path / "x.dcm"
    dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio="1", options={"alloc": "recipe", "group_size": 16})
    assert record_groups(out) == {"w": [[0, 2, 8, 16], [2, 34, 3, 16], [34, 80, 2, 16]]}
    within_budget(out, Fraction(1))
    out2 = tmp_path / "y.dcm"
    dcm.encode(base_dir, ft_dir, out2, method="delta-come", ratio="1", options={"recipe": "8:1,4:4,2:10"})
    assert record_groups(out2) == {"w": [[0, 1, 8, 128], [1, 5, 4, 128], [5, 15, 2, 128]]}


def test_rank_stops_at_the_delta_rank(tmp_path):
    """A delta of rank 5 keeps 5 vectors, whatever the budget; an unchanged matrix keeps none."""
    rng = np.random.default_rng(1)
    w = np.zeros((40, 30), dtype=np.float32)
    d = lowrank_matrix(rng, 40, 30, [3.0, 2.0, 1.0, 0.5, 0.25]).astype(np.float32)
    same = rng.standard_normal((7, 9)).astype(np.float32)
    base_dir = write_checkpoint(tmp_path / "b", {"w": ("F32", w), "same": ("F32", same)})
    ft_dir = write_checkpoint(tmp_path / "f", {"w": ("F32", d), "same": ("F32", same.copy())})
    for alloc in ("recipe", "rd"):
        out = tmp_path / f"{alloc}.dcm"
        dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio="1/2", options={"alloc": alloc})
        groups = record_groups(out)
        assert groups["same"] == [], groups
        # the recipe has room for more; rate-distortion may stop earlier but never goes past 5
        assert groups["w"][-1][1] == 5 if alloc == "recipe" else 1 <= groups["w"][-1][1] <= 5, groups
        _, index = read_file(out)
        assert next(r for r in index["tensors"] if r["name"] == "same")["blobs"] == []
        with dcm.open(out) as f:
            assert f.tensor("same", same).tobytes() == same.tobytes()
            assert np.linalg.norm(f.delta("w", w) - d) < 0.2 * np.linalg.norm(d)


def test_recipe_groups_fill_the_budget():
    """The recipe's groups fit the budget, and one more vector would not."""
    shape, name = (64, 48), "m"
    recipe = ((8, 2), (3, 32), (2, None))
    for budget in (250, 400, 700, 1500, 3000, 6000):
        groups = deltacome.recipe_groups(name, "F16", shape, recipe, 16, budget, 48)
        cost = deltacome.record_cost(name, "F16", shape, groups)
        assert cost <= budget
        widths = [g.bits for g in groups for _ in range(g.count)]
        # the recipe's order: a prefix of 8, 8, 3 × 32, 2, 2, ...
        assert widths == ([8, 8] + [3] * 32 + [2] * 14)[:len(widths)]
        if len(widths) < 48:
            bigger = allocate.groups_from_widths(widths + [([8, 8] + [3] * 32 + [2] * 14)[len(widths)]], 16)
            assert deltacome.record_cost(name, "F16", shape, bigger) > budget


@pytest.mark.parametrize("widths, groups", [
    ([8, 8, 3, 3, 3, 2, 0, 0], [[0, 2, 8], [2, 5, 3], [5, 6, 2]]),
    ([2], [[0, 1, 2]]),
    ([0, 8], []),
    ([], []),
    ([4, 4, 4], [[0, 3, 4]]),
])
def test_groups_from_widths(widths, groups):
    got = allocate.groups_from_widths(widths, 32)
    assert [g.as_param() for g in got] == [g + [32] for g in groups]


class _T:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300), st.integers(0, 500)), min_size=1, max_size=6),
       st.integers(0, 200000))
def test_property_share_budgets(entries, total):
    tensors = [_T(f"t{i}", (m, n)) for i, (m, n, _) in enumerate(entries)]
    floors = {f"t{i}": f for i, (_, _, f) in enumerate(entries)}
    shares = budget.share_budgets(tensors, total, lambda t: floors[t.name])
    assert set(shares) == set(floors)
    if sum(floors.values()) <= total:
        assert sum(shares.values()) <= total
        assert all(shares[n] >= floors[n] for n in floors)
        # tensors above their floor share what is left in proportion to size (to one byte)
        free = [t for t in tensors if shares[t.name] > floors[t.name]]
        for a in free:
            for b in free:
                pa, pb = math.prod(a.shape), math.prod(b.shape)
                assert abs(shares[a.name] * pb - shares[b.name] * pa) <= pa + pb


# --- the byte budget ----------------------------------------------------------------------------

TINY_SHAPES = [(1, 9), (3, 5), (5, 3), (1, 1), (2, 33), (17, 1), (1, 64)]


@st.composite
def budget_cases(draw):
    shapes = draw(st.lists(st.sampled_from(TINY_SHAPES), max_size=2))
    shapes += draw(st.lists(st.tuples(st.integers(8, 160), st.integers(8, 160)), max_size=3))
    if not shapes:
        shapes = [draw(st.sampled_from(TINY_SHAPES))]
    dtypes = [draw(st.sampled_from(DTYPES)) for _ in shapes]
    vectors = draw(st.lists(st.integers(1, 40), max_size=2))
    ratio = Fraction(1, draw(st.integers(4, 64)))
    group_size = draw(st.sampled_from([None, 8, 16, 33, 128]))  # None: the default
    return shapes, dtypes, vectors, ratio, group_size, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget_cases())
def test_property_budget_is_never_exceeded(case):
    shapes, dtypes, vectors, ratio, group_size, seed = case
    names = [f"layers.{i}.weight" for i in range(len(shapes))]
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, ft_dir, base, ft, _ = make_pair(
            tmp, dict(zip(names, shapes)), seed=seed, dtypes=dict(zip(names, dtypes)),
            vectors={f"layers.{i}.bias": n for i, n in enumerate(vectors)})
        params = sum(m * n for m, n in shapes)
        least = sum(rank0_entry_bytes(nm, dt, sh) for nm, dt, sh in zip(names, dtypes, shapes))
        fits = 8 * least <= ratio * 16 * params
        for alloc in ("recipe", "rd"):
            out = Path(tmp) / f"{alloc}.dcm"
            options = {"alloc": alloc, **({"group_size": group_size} if group_size else {})}
            if not fits:  # not even the index entries fit: refused, nothing written
                with pytest.raises(UsageError):
                    dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio=ratio, options=options)
                assert not out.exists()
                continue
            dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio=ratio, options=options)
            total, lossy_params, per = lossy_bytes(out)
            assert lossy_params == params and sorted(per) == sorted(names)
            assert 8 * total <= ratio * 16 * params, (alloc, total, params)
            _, index = read_file(out)
            with dcm.open(out) as f:
                for rec in index["tensors"]:
                    if rec["name"] in names:
                        assert rec["kind"] == LOWRANK
                        if not rec["params"]["groups"]:
                            assert len(msgpack.packb(rec, use_bin_type=True)) == rank0_entry_bytes(
                                rec["name"], rec["dtype"], rec["shape"])
                    else:  # 1-D tensors stay exact
                        assert rec["kind"] == Kind.DENSE_DELTA
                        assert f.tensor(rec["name"], base[rec["name"]][1]).tobytes() == ft[rec["name"]][1].tobytes()


def test_budget_over_a_sweep_of_ratios(tmp_path):
    """Every ratio 1/4 .. 1/64 on one small checkpoint: refused exactly when the empty entries do not
    fit, else within budget (the sweep crosses that threshold, and budgets a few bytes apart)."""
    shapes = {"a": (3, 5), "b": (1, 64), "c": (40, 30), "d": (64, 48)}
    dtypes = {"a": "F16", "b": "BF16", "c": "F32", "d": "BF16"}
    base_dir, ft_dir, *_ = make_pair(tmp_path, shapes, dtypes=dtypes, vectors={"e": 9}, seed=11)
    params = sum(m * n for m, n in shapes.values())
    least = sum(rank0_entry_bytes(n, dtypes[n], s) for n, s in shapes.items())
    edge = 2 * params // least  # the last 1/den whose budget holds the empty entries
    outcomes = set()
    for den in sorted({*range(4, 65, 4), edge - 1, edge, edge + 1, 64} & set(range(4, 65))):
        ratio = Fraction(1, den)
        for alloc in ("recipe", "rd"):
            out = tmp_path / f"{den}-{alloc}.dcm"
            if 8 * least > ratio * 16 * params:
                with pytest.raises(UsageError):
                    dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio=ratio, options={"alloc": alloc})
                assert not out.exists()
                outcomes.add("refused")
            else:
                dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio=ratio, options={"alloc": alloc})
                within_budget(out, ratio)
                outcomes.add("written")
                out.unlink()
    assert outcomes == {"refused", "written"}


def test_too_small_a_ratio_is_a_usage_error(tmp_path):
    base_dir, ft_dir, *_ = make_pair(tmp_path, {"a": (3, 5), "b": (1, 9)})
    for alloc in ("recipe", "rd"):
        with pytest.raises(UsageError) as info:
            dcm.encode(base_dir, ft_dir, tmp_path / "x.dcm", method="delta-come", ratio="1/64",
                       options={"alloc": alloc})
        assert isinstance(info.value, DcmError)
        assert not (tmp_path / "x.dcm").exists()
    # excluding the tiny matrices makes it a file with no lossy record at all
    dcm.encode(base_dir, ft_dir, tmp_path / "x.dcm", method="delta-come", ratio="1/64", exclude=["*"])
    assert lossy_bytes(tmp_path / "x.dcm")[:2] == (0, 0)


def test_info_json_reports_the_lossy_bytes(tmp_path, capsys):
    """``dcm info --json`` totals.compressed: what --ratio budgets, as counted here from the file."""
    base_dir, ft_dir, *_ = make_pair(tmp_path, {"a": (40, 30), "b": (30, 50), "c": (24, 24)},
                                     vectors={"bias": 7})
    out = tmp_path / "x.dcm"
    dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio="1/2")
    assert main(["info", "--json", str(out)]) == 0
    c = json.loads(capsys.readouterr().out)["totals"]["compressed"]
    total, params, _ = lossy_bytes(out)
    _, index = read_file(out)
    lossy = [r for r in index["tensors"] if r["kind"] == LOWRANK]
    entries = sum(len(msgpack.packb(r, use_bin_type=True)) for r in lossy)
    payload = sum(b["length"] for r in lossy for b in r["blobs"])
    assert sum(1 for r in lossy if r["blobs"]) == 3  # three blobs in a row: alignment is paid
    assert total - entries - payload > 0
    assert (c["records"], c["params"]) == (3, params) and params == 40 * 30 + 30 * 50 + 24 * 24
    assert (c["index_bytes"], c["payload_bytes"]) == (entries, payload)
    assert (c["padding_bytes"], c["bytes"]) == (total - entries - payload, total)


# --- files: version, decode, verify, determinism -----------------------------------------------------


def test_minor_version(tmp_path):
    base_dir, ft_dir, base, ft, _ = make_pair(tmp_path, {"w": (24, 16)}, vectors={"b": 5})
    lossy, lossless, none = tmp_path / "lossy.dcm", tmp_path / "lossless.dcm", tmp_path / "none.dcm"
    dcm.encode(base_dir, ft_dir, lossy, method="delta-come", ratio="1/4")
    dcm.encode(base_dir, ft_dir, lossless)
    dcm.encode(base_dir, ft_dir, none, method="delta-come", ratio="1/4", exclude=["w"])
    for path, minor in ((lossy, 1), (lossless, 0), (none, 0)):
        header, index = read_file(path)
        assert (header["major"], header["minor"]) == (1, minor)
        assert index["format"] == [1, minor]
        kinds = {r["kind"] for r in index["tensors"]}
        assert (LOWRANK in kinds) == (minor == 1)
        with dcm.open(path) as f:
            assert f.metadata()["format"] == f"1.{minor}"


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_decode_and_verify(tmp_path, dtype_name):
    base_dir, ft_dir, base, ft, deltas = make_pair(tmp_path, {"w": (48, 40), "v": (9, 30)}, vectors={"b": 11},
                                                   dtypes={"w": dtype_name, "v": dtype_name})
    out = tmp_path / "x.dcm"
    dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio="1/4")
    within_budget(out, Fraction(1, 4))
    report = dcm.verify(out, base=base_dir)
    assert report is not None
    dcm.decode(out, base_dir, tmp_path / "dec")
    decoded = read_checkpoint(tmp_path / "dec")
    assert sorted(decoded) == sorted(ft)
    with dcm.open(out) as f:
        for name, (dt, array) in decoded.items():
            assert dt == ft[name][0] and array.shape == ft[name][1].shape
            assert array.tobytes() == f.tensor(name, base[name][1]).tobytes()
    assert decoded["b"][1].tobytes() == ft["b"][1].tobytes()
    for name in ("w", "v"):  # lossy, but close: most of the energy of a long-tailed delta is kept
        got = values(decoded[name][1], dtype_name).astype(np.float64) - values(base[name][1], dtype_name)
        assert np.linalg.norm(got - deltas[name]) < 0.5 * np.linalg.norm(deltas[name])


@pytest.mark.parametrize("options", [{}, {"alloc": "recipe"}, {"svd": "randomized"}, {"clip": "minmax"}])
def test_encoding_is_deterministic(tmp_path, options):
    base_dir, ft_dir, *_ = make_pair(tmp_path, {"w": (96, 80), "v": (30, 64)})
    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    for path in (a, b):
        dcm.encode(base_dir, ft_dir, path, method="delta-come", ratio="1/16", options=options)
    assert a.read_bytes() == b.read_bytes()


# --- allocation: rate-distortion vs recipe ------------------------------------------------------------


@pytest.mark.parametrize("ratio, seed, group_size", [
    ("1/4", 0, None), ("1/8", 1, None), ("1/16", 2, None), ("1/32", 3, None),
    ("1/4", 0, 16), ("1/8", 1, 8),
])
def test_rd_beats_or_ties_recipe(tmp_path, seed, ratio, group_size):
    """At the same budget, rate-distortion allocation has no more Frobenius error than the recipe."""
    shapes = {"fast": (96, 64), "flat": (64, 128), "mid": (80, 80), "tiny": (3, 5)}
    spectra = {"fast": 0.5 ** np.arange(64), "flat": 0.3 * np.linspace(1, 0.5, 64),
               "mid": 1 / (1 + np.arange(80)), "tiny": np.full(3, 0.1)}
    base_dir, ft_dir, base, _, deltas = make_pair(tmp_path, shapes, seed=seed, spectra=spectra)
    errors = {}
    for alloc in ("recipe", "rd"):
        out = tmp_path / f"{alloc}.dcm"
        options = {"alloc": alloc, **({"group_size": group_size} if group_size else {})}
        dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio=ratio, options=options)
        within_budget(out, Fraction(ratio))
        errors[alloc] = frobenius_error(out, base, deltas)
    assert errors["rd"] <= errors["recipe"] * (1 + 1e-9), errors


def test_rd_keeps_a_vector_when_one_fits(tmp_path):
    """One matrix at a ratio that holds a single low-bit vector: the recipe keeps it, rd must too."""
    base_dir, ft_dir, base, _, deltas = make_pair(tmp_path, {"w": (40, 32)})
    ratio = Fraction(1, 8)
    results = {}
    for label, options in (("recipe", {"recipe": "2:1"}), ("rd", {"alloc": "rd"})):
        out = tmp_path / f"{label}.dcm"
        dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio=ratio, options={**options, "group_size": 16})
        within_budget(out, ratio)
        results[label] = (record_groups(out)["w"], frobenius_error(out, base, deltas))
    assert results["recipe"][0] == [[0, 1, 2, 16]]  # one 2-bit vector fits the budget
    assert results["rd"][0], results
    assert results["rd"][1] <= results["recipe"][1] * (1 + 1e-9), results


def test_rd_beats_or_ties_recipe_at_a_tight_budget(tmp_path):
    names = {"l0.weight": (48, 64), "l1.weight": (40, 32)}
    base_dir, ft_dir, base, _, deltas = make_pair(
        tmp_path, names, spectra={n: 0.05 / (1 + np.arange(min(s))) for n, s in names.items()})
    errors = {}
    for alloc in ("recipe", "rd"):
        out = tmp_path / f"{alloc}.dcm"
        dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio="1/16",
                   options={"alloc": alloc, "group_size": 16})
        within_budget(out, Fraction(1, 16))
        errors[alloc] = frobenius_error(out, base, deltas)
    assert errors["rd"] <= errors["recipe"] * (1 + 1e-9), errors


def planned(ft, base, order, widths, group_size, widths_measured=deltacome.DEFAULT_WIDTHS):
    """An rd plan of ``widths`` for the vectors ``order`` of ft − base, with the measured costs and errors."""
    c = allocate.Candidates.measure("w", "F32", ft.shape, exact_svd(ft - base), widths_measured, group_size,
                                    zstd_level=3)
    return deltacome.RdPlan(np.asarray(order), np.asarray(widths), c.widths, c.cost, c.dist[order])


def test_rd_narrowing_takes_the_cheapest_error_per_byte_first():
    options, cost = np.array([0, 2, 3, 4, 8]), np.array([0.0, 10, 15, 20, 40])
    dist = np.array([[100.0, 4, 2, 1, 0.1],     # 3 -> 2 bits: +2 error for 5 bytes (0.4 a byte)
                     [100.0, 30, 10, 5, 0.1],   # 3 -> 2 bits: +20 for 5 bytes (4 a byte)
                     [1.0, 0.5, 0.3, 0.2, 0]])  # 2 -> 0: +0.5 for 10 bytes (0.05 a byte)
    plan = deltacome.RdPlan(np.arange(3), np.array([3, 3, 2]), options, cost, dist)
    assert plan.narrowed(plan.widths, 1).tolist() == [3, 3, 0]
    assert plan.narrowed(plan.widths, 12).tolist() == [2, 3, 0]
    assert plan.narrowed(plan.widths, 16).tolist() == [2, 2, 0]  # 4 a byte before 2 -> 0 at 9.6
    assert plan.narrowed(plan.widths, 10**6).tolist() == [0, 0, 0]  # at most everything
    assert plan.widths.tolist() == [3, 3, 2]  # the plan itself is left as it was


def test_rd_record_a_few_bytes_over_narrows_instead_of_emptying(tmp_path):
    """A rank-1 plan a few bytes over its budget (a tiny blob compresses worse than planning measured)
    is coded one width narrower, not dropped: BERT's token-type embeddings (2 x 384) lost their only
    vector that way and the real pair's gain fell from 0.988 to 0.982 at 1/16."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((2, 384)).astype(np.float32)
    ft = base + np.outer([1.0, -0.5], rng.standard_normal(384)).astype(np.float32)
    method = DeltaCoMe(ratio="1/16", alloc="rd", group_size=128)
    plan = planned(ft, base, [0], [3], 128)
    full = method.cost("w", "F32", (2, 384), allocate.groups_from_widths([3], 128))
    _, params, _ = method.encode_tensor("w", ft, base, "F32", TensorPlan(budget=full - 3, data=plan))
    assert params["groups"] == [[0, 1, 2, 128]]


def test_rd_plans_leave_headroom_within_the_file_budget(tmp_path):
    names = {"a": (48, 64), "b": (40, 32), "tiny": (2, 48)}
    base_dir, ft_dir, _, _, _ = make_pair(tmp_path, names)
    seen = {}
    real = DeltaCoMe.allocate

    def spy(self, tensors, measures):
        plans = real(self, tensors, measures)
        seen.update(total=self.total, plans=plans, measures=measures)
        return plans
    DeltaCoMe.allocate = spy
    try:
        dcm.encode(base_dir, ft_dir, tmp_path / "o.dcm", method="delta-come", ratio="1/8", options={"group_size": 16})
    finally:
        DeltaCoMe.allocate = real
    plans, method = seen["plans"], DeltaCoMe(group_size=16)
    assert sum(p.budget for p in plans.values()) <= seen["total"]
    for name, p in plans.items():
        c = seen["measures"][name]
        widths = np.zeros(len(c.dist), dtype=np.int64)
        widths[p.data.order] = p.data.widths
        estimate = allocate.estimated_cost(c, widths, method.cost, 16)
        assert p.budget >= estimate, (name, p.budget, estimate)


def test_rd_keeps_the_svd_of_a_record_that_dropped_vectors():
    """A record that dropped planned vectors to fit is coded again when an earlier matrix leaves bytes
    over: its SVD stays in the cache for that (one that kept every vector is never coded again)."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((48, 64)).astype(np.float32)
    ft = base + 0.01 * rng.standard_normal((48, 64)).astype(np.float32)
    method = DeltaCoMe(ratio="1/4", alloc="rd", group_size=16)
    order, widths = np.arange(20), np.full(20, 8)
    rd_plan = planned(ft, base, order, widths, 16)
    planned_cost = method.cost("w", "F32", (48, 64), allocate.groups_from_widths(widths, 16))
    for budget_bytes, kept_all in ((planned_cost * 2, True), (planned_cost // 3, False)):
        calls = []
        real = deltacome.exact_svd
        deltacome.exact_svd = lambda d: calls.append(1) or real(d)
        try:
            plan = TensorPlan(budget=budget_bytes, data=rd_plan)
            _, params, _ = method.encode_tensor("w", ft, base, "F32", plan)
            assert (params["groups"] == [[0, 20, 8, 16]]) == kept_all
            assert (method.cache.pop(("w", None)) is None) == kept_all
            method.encode_tensor("w", ft, base, "F32", plan)  # the factors cached above, or a second SVD
        finally:
            deltacome.exact_svd = real
        assert len(calls) == 2, (kept_all, calls)


# --- SVD ---------------------------------------------------------------------------------------------


def test_randomized_svd_is_close_to_exact():
    rng = np.random.default_rng(7)
    m, n, r = 200, 150, 10
    signal = lowrank_matrix(rng, m, n, np.geomspace(10, 1, r))
    a = (signal + 1e-3 * rng.standard_normal((m, n))).astype(np.float32)
    exact = exact_svd(a)
    approx = randomized_svd(a, r, oversample=16, power_iters=2, seed=3)
    k = len(approx.s)
    assert r <= k < min(m, n) // 2  # a real sketch, not the exact fallback
    assert approx.u.shape == (k, m) and approx.v.shape == (k, n)
    np.testing.assert_allclose(approx.s[:r], exact.s[:r], rtol=1e-4)
    # orthonormal vectors spanning the same dominant subspaces
    np.testing.assert_allclose(approx.u @ approx.u.T, np.eye(k), atol=1e-4)
    np.testing.assert_allclose(approx.v @ approx.v.T, np.eye(k), atol=1e-4)
    for x, y in ((approx.u[:r], exact.u[:r]), (approx.v[:r], exact.v[:r])):
        assert np.linalg.norm(x.T @ x - y.T @ y) < 1e-3
    rebuild = lambda svd: (svd.u[:r].T * svd.s[:r]) @ svd.v[:r]  # noqa: E731
    err_a, err_e = np.linalg.norm(rebuild(approx) - a), np.linalg.norm(rebuild(exact) - a)
    assert err_a <= err_e * 1.001
    # and different seeds agree on the signal
    other = randomized_svd(a, r, oversample=16, power_iters=2, seed=4)
    np.testing.assert_allclose(other.s[:r], approx.s[:r], rtol=1e-4)


def test_randomized_svd_in_the_encoder(tmp_path):
    shapes = {"w": (256, 192)}
    s = np.concatenate([np.geomspace(1, 0.1, 12), np.full(180, 1e-3)])
    base_dir, ft_dir, base, _, deltas = make_pair(tmp_path, shapes, spectra={"w": s}, seed=5)
    errors = {}
    for svd in ("exact", "randomized"):
        out = tmp_path / f"{svd}.dcm"
        dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio="1/32",
                   options={"svd": svd, "recipe": "8:2,3:32,2"})
        within_budget(out, Fraction(1, 32))
        errors[svd] = frobenius_error(out, base, deltas)
        with dcm.open(out) as f:
            assert f.metadata()["params"]["svd"] == svd
    assert errors["randomized"] <= errors["exact"] * 1.02, errors
    assert errors["exact"] < 0.1 * sum(float((d ** 2).sum()) for d in deltas.values())


# --- GPTQ vs round-to-nearest ------------------------------------------------------------------------


def correlated_inputs(rng, n):
    """x = z·L with L of strongly unequal singular values in random directions."""
    q1 = np.linalg.qr(rng.standard_normal((n, n)))[0]
    q2 = np.linalg.qr(rng.standard_normal((n, n)))[0]
    lmat = (q1 * np.logspace(1, -1, n)) @ q2
    return lambda rows: rng.standard_normal((rows, n)) @ lmat


def gptq_case(seed, m=48, n=64, rows=4096):
    rng = np.random.default_rng(seed)
    k = min(m, n)
    delta = lowrank_matrix(rng, m, n, 1.0 / (1 + np.arange(k))).astype(np.float32)
    sample = correlated_inputs(rng, n)
    x, x_test = sample(rows), sample(rows)  # fitting and held-out samples of one distribution
    return delta, x, x_test


GROUPS = [BitGroup(0, 4, 3, 16), BitGroup(4, 24, 2, 16)]
BITS = np.array([3] * 4 + [2] * 20)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_rows_beat_rtn_on_output_error(seed):
    delta, x, x_test = gptq_case(seed)
    h = x.T @ x / len(x)
    svd = exact_svd(delta)
    k = len(BITS)
    v, s = svd.v[:k], svd.s[:k]
    rtn = quant.dequantize(*quant.rtn(v, BITS, 16), 16)
    codes, scales, zeros = gptq.quantize_rows(v, h, BITS, 16)
    assert codes.shape == v.shape and codes.max() < 8 and scales.shape == zeros.shape == (k, 4)
    assert all(codes[i].max() < 1 << BITS[i] and zeros[i].max() < 1 << BITS[i] for i in range(k))
    g = quant.dequantize(codes, scales, zeros, 16)
    err = lambda vh: np.linalg.norm(x_test @ ((vh - v).T * s))  # noqa: E731
    assert err(g) < 0.8 * err(rtn)


@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_columns_beat_rtn_on_output_error(seed):
    delta, x, x_test = gptq_case(seed)
    h = x.T @ x / len(x)
    svd = exact_svd(delta)
    k = len(BITS)
    v_hat = quant.dequantize(*quant.rtn(svd.v[:k], BITS, 16), 16)
    s = svd.s[:k]
    hu = gptq.u_hessian(v_hat, s, h)
    u = svd.u[:k]
    rtn = quant.dequantize(*quant.rtn(u, BITS, 16), 16)
    g = quant.dequantize(*gptq.quantize_columns(u, hu, BITS, 16), 16)
    t = x_test @ (v_hat.T * s)  # the inputs U sees
    err = lambda uh: np.linalg.norm(t @ (uh - u))  # noqa: E731
    assert err(g) < err(rtn)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("refit", [True, False])
def test_deltacome_gptq_beats_rtn_at_the_same_groups(tmp_path, seed, refit):
    delta, x, x_test = gptq_case(seed)
    stats = write_stats(tmp_path / "stats.safetensors", {"w": x.T @ x / len(x)}, len(x))
    svd = exact_svd(delta)
    errors = {}
    for name, method in (("rtn", DeltaCoMe("1/4", group_size=16)),
                         ("gptq", DeltaCoMe("1/4", group_size=16, calibration=stats, refit=refit))):
        s, factors = method.quantize("w", delta.shape, svd, GROUPS, delta)
        assert len(s) == 24 and len(factors) == len(GROUPS)
        for g, (fv, fu) in zip(GROUPS, factors):
            assert fv.codes.shape == (g.count, 64) and fu.codes.shape == (g.count, 48)
            assert fv.codes.max() < 1 << g.bits and fu.codes.max() < 1 << g.bits
        d_hat = lowrank.delta(delta.shape, GROUPS, s, factors)
        errors[name] = np.linalg.norm(x_test @ (d_hat - delta).T)
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_calibrated_encode_beats_rtn_end_to_end(tmp_path):
    """A hand-made statistics file drives GPTQ through dcm.encode: lower output error on held-out inputs."""
    rng = np.random.default_rng(4)
    names = {"l0.weight": (48, 64), "l1.weight": (40, 32)}
    base_dir, ft_dir, base, _, deltas = make_pair(tmp_path, names, seed=4,
                                                  spectra={n: 0.05 / (1 + np.arange(min(s))) for n, s in names.items()})
    samplers = {n: correlated_inputs(rng, s[1]) for n, s in names.items()}
    xs = {n: f(4096) for n, f in samplers.items()}
    stats = write_stats(tmp_path / "stats.safetensors", {n: x.T @ x / len(x) for n, x in xs.items()}, 4096)
    held_out = {n: f(4096) for n, f in samplers.items()}
    errors = {}
    for label, options in (("rtn", {}), ("gptq", {"calibration": str(stats)})):
        for alloc in ("recipe", "rd"):
            out = tmp_path / f"{label}-{alloc}.dcm"
            dcm.encode(base_dir, ft_dir, out, method="delta-come", ratio="1/4",
                       options={**options, "alloc": alloc, "group_size": 16})
            within_budget(out, Fraction(1, 4))
            assert all(record_groups(out).values())  # vectors kept in every matrix: a real comparison
            with dcm.open(out) as f:
                params = f.metadata()["params"]
                errors[label, alloc] = sum(
                    np.linalg.norm(held_out[n] @ (f.delta(n, base[n][1]).astype(np.float64) - deltas[n]).T)
                    for n in names)
            assert params["quantizer"] == label
            if label == "gptq":
                assert params["calibration_tokens"] == 4096
                assert params["calibration_sha256"] == hashlib.sha256(stats.read_bytes()).hexdigest()
    for alloc in ("recipe", "rd"):
        assert errors["gptq", alloc] < errors["rtn", alloc], errors


# --- the command line ----------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_options_reach_the_method(tmp_path, capsys):
    base_dir, ft_dir, *_ = make_pair(tmp_path, {"w": (64, 48), "v": (20, 30)}, vectors={"b": 5})
    x = correlated_inputs(np.random.default_rng(0), 48)(512)
    stats = write_stats(tmp_path / "stats.safetensors", {"w": x.T @ x / len(x)}, 512)

    out = tmp_path / "a.dcm"
    code, _, err = run_cli(capsys, "-q", "encode", base_dir, ft_dir, "-o", out, "--method", "delta-come",
                           "--ratio", "1/4", "--alloc", "recipe", "--recipe", "8:1,4:4,2", "--group-size", "8")
    assert code == 0, err
    code, text, _ = run_cli(capsys, "info", "--json", out)
    assert code == 0
    info = json.loads(text)
    params = info["method"]["params"]
    assert info["method"]["name"] == "delta-come" and info["header"]["version"] == "1.1"
    assert (params["ratio"], params["alloc"], params["svd"], params["recipe"], params["group_size"],
            params["quantizer"]) == ("1/4", "recipe", "exact", "8:1,4:4,2", 8, "rtn")
    groups = record_groups(out)
    assert all(g[3] == 8 for gs in groups.values() for g in gs)
    assert groups["w"][0][:3] == [0, 1, 8] and groups["w"][1][:3] == [1, 5, 4]
    within_budget(out, Fraction(1, 4))

    out = tmp_path / "b.dcm"
    code, _, err = run_cli(capsys, "-q", "encode", base_dir, ft_dir, "-o", out, "--method", "delta-come",
                           "--ratio", "1/8", "--alloc", "rd", "--svd", "randomized", "--calibration", stats,
                           "--group-size", "16")
    assert code == 0, err
    code, text, _ = run_cli(capsys, "info", "--json", out)
    params = json.loads(text)["method"]["params"]
    assert (params["ratio"], params["alloc"], params["svd"], params["group_size"], params["quantizer"]) == \
        ("1/8", "rd", "randomized", 16, "gptq")
    assert params["calibration_sha256"] == hashlib.sha256(stats.read_bytes()).hexdigest()
    assert params["calibration_tokens"] == 512 and "recipe" not in params
    assert all(g[3] == 16 for gs in record_groups(out).values() for g in gs)
    within_budget(out, Fraction(1, 8))
    code, text, _ = run_cli(capsys, "verify", out, "--base", base_dir)
    assert code == 0


@pytest.mark.parametrize("flags, code", [
    (["--recipe", "9:2"], 2), (["--group-size", "0"], 2), (["--ratio", "1/100000"], 2),
])
def test_cli_bad_options_exit_codes(tmp_path, capsys, flags, code):
    base_dir, ft_dir, *_ = make_pair(tmp_path, {"w": (16, 12)})
    argv = ["encode", base_dir, ft_dir, "-o", tmp_path / "x.dcm", "--method", "delta-come"]
    if "--ratio" not in flags:
        argv += ["--ratio", "1/4"]
    got, _, err = run_cli(capsys, *argv, *flags)
    assert got == code, err
    assert not (tmp_path / "x.dcm").exists()


def test_cli_missing_calibration_file(tmp_path, capsys):
    base_dir, ft_dir, *_ = make_pair(tmp_path, {"w": (16, 12)})
    code, _, err = run_cli(capsys, "encode", base_dir, ft_dir, "-o", tmp_path / "x.dcm", "--method", "delta-come",
                           "--ratio", "1/4", "--calibration", tmp_path / "missing.safetensors")
    assert code not in (0, 1) and "missing.safetensors" in err
    assert not (tmp_path / "x.dcm").exists()


@pytest.mark.parametrize("flags", [["--alloc", "x"], ["--svd", "x"], ["--group-size", "x"]])
def test_cli_rejects_unknown_choices(tmp_path, capsys, flags):
    assert main(["encode", "b", "f", "-o", str(tmp_path / "x.dcm"), "--method", "delta-come", *flags]) == 2
    assert "invalid" in capsys.readouterr().err


def test_cli_calibrate_then_encode(tmp_path, capsys, monkeypatch):
    """``dcm calibrate`` on a tiny BERT, then ``dcm encode --calibration``: GPTQ recorded, budget kept."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    words = ["the", "a", "of", "to", "and", "is", "in", "it", "cat", "dog", "mat"]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "."])}
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=40)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(tmp_path / "base")
    transformers.BertTokenizer(vocab=vocab).save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p += 0.01 * torch.randn_like(p)
    model.save_pretrained(tmp_path / "ft")
    rng = np.random.default_rng(0)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words, 12)) + " ." for _ in range(20)), encoding="utf-8")

    stats = tmp_path / "stats.safetensors"
    code, _, err = run_cli(capsys, "-q", "calibrate", tmp_path / "base", text, "-o", stats, "--seq-len", "16")
    assert code == 0, err
    from dcm.calibrate import load_stats
    tokens = load_stats(stats).tokens
    out = tmp_path / "x.dcm"
    code, _, err = run_cli(capsys, "-q", "encode", tmp_path / "base", tmp_path / "ft", "-o", out,
                           "--method", "delta-come", "--ratio", "1/4", "--calibration", stats)
    assert code == 0, err
    code, text_out, _ = run_cli(capsys, "info", "--json", out)
    params = json.loads(text_out)["method"]["params"]
    assert params["quantizer"] == "gptq" and params["calibration_tokens"] == tokens > 0
    assert params["calibration_sha256"] == hashlib.sha256(stats.read_bytes()).hexdigest()
    within_budget(out, Fraction(1, 4))
    code, _, err = run_cli(capsys, "-q", "verify", out, "--base", tmp_path / "base")
    assert code == 0, err
