"""dcm.runtime: Triton kernels (under TRITON_INTERPRET=1 here) and the torch backend against float64.

Every record kind the runtime serves, every bit width 1..8, float16 groups,
GEMV (1–4 tokens) and tl.dot (more) paths, both tile configurations, several
deltas in one batch, and the modules that patch a torch model.  The reference
is independent of the codec's decoder (``spec_oracle.py``): Δ̂ dequantized
from the spec's formulas with numpy, or by the reference decoder
``spec/reference/dcmref.py``, in float64, y = x·Δ̂ᵀ; patched models are
compared with models rebuilt by both the codec and the reference decoder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import dcm
from dcm import lowrank, quant
from dcm.lowrank import BitGroup, Factor

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dcm.runtime import LayerPack, Segments, load_record, packed, patch_model, patch_model_multi  # noqa: E402
from dcm.runtime import torch_backend, triton_backend  # noqa: E402
from dcm.runtime.triton_backend import GPU_BLOCKS, INTERPRETER_BLOCKS  # noqa: E402

from conftest import write_checkpoint  # noqa: E402
import spec_oracle  # noqa: E402

DEVICE = "cuda" if os.environ.get("DCM_TEST_GPU") == "1" else "cpu"
TOKENS = (1, 3, 20)  # GEMV of 1 row, GEMV of 4 rows (one masked), tl.dot tiles of 16 (one partial)
BLOCKS = {"gpu-tiles": GPU_BLOCKS, "interpreter-tiles": INTERPRETER_BLOCKS}
# float32 sums in another order than the float64 reference; on a GPU tl.dot of float32 is TF32.
REL_TOL = 5e-3 if DEVICE == "cuda" else 2e-5


def run(backend, pack, x, seg, blocks=None):
    y = torch.zeros(x.shape[0], pack.shape[0], device=x.device)
    if backend == "triton":
        triton_backend.apply(pack, x, seg, y, blocks)
    else:
        torch_backend.apply(pack, x, seg, y)
    return y


def assert_close(got, want, what):
    got = got.double().cpu().numpy()
    scale = max(np.abs(want).max(), 1e-30)
    err = np.abs(got - want).max() / scale
    assert err < REL_TOL, f"{what}: max error {err:.3g} of the largest output"


def check_all_paths(pack, reference: np.ndarray, rng, what: str):
    """Both backends, every token count and, for Triton, both tile sets, against x·Δ̂ᵀ in float64."""
    m, n = pack.shape
    for tokens in TOKENS:
        x = torch.from_numpy(rng.standard_normal((tokens, n)).astype(np.float32)).to(DEVICE)
        want = x.double().cpu().numpy() @ reference.T
        seg = Segments.single(tokens, DEVICE)
        assert_close(run("torch", pack, x, seg), want, f"{what}, torch, {tokens} tokens")
        for name, blocks in BLOCKS.items():
            assert_close(run("triton", pack, x, seg, blocks), want, f"{what}, triton {name}, {tokens} tokens")


# --- lowrank-mixed: every width, odd group sizes, lengths that are not multiples ------------------


def mixed_blob(rng, shape, groups):
    m, n = shape
    s = np.sort(rng.random(groups[-1].stop).astype(np.float32))[::-1] * 2 + 0.1
    factors = []
    for g in groups:
        pair = []
        for length in (n, m):
            codes, scales, zeros = quant.rtn(rng.standard_normal((g.count, length)).astype(np.float32),
                                             g.bits, g.group_size)
            pair.append(Factor(codes, scales, zeros))
        factors.append(tuple(pair))
    blob = lowrank.pack_blob(shape, groups, s, factors)
    return blob, spec_oracle.mixed_delta(shape, groups, blob)  # Δ̂ from the blob by the spec, not the codec


def test_the_oracle_reads_the_spec_example():
    """spec 10.7's worked example: 25 bytes, Δ̂ = [[0.5, −0.5, 3.5], [−0.5, 0.5, −3.5]]."""
    blob = bytes.fromhex("00000040" "cd01" "0000" "00300034" "03" "000000" "16" "000000" "0038" "0000" "04")
    np.testing.assert_array_equal(spec_oracle.mixed_delta((2, 3), [(0, 1, 3, 2)], blob),
                                  [[0.5, -0.5, 3.5], [-0.5, 0.5, -3.5]])
    spec = (Path(__file__).resolve().parent.parent / "spec" / "dcm-format.md").read_text(encoding="utf-8")
    assert "cd 01" in spec and "00 30 00 34" in spec  # the bytes above are the spec's


@pytest.mark.parametrize("bits", range(1, 9))
def test_lowrank_mixed_every_bit_width(rng, bits):
    shape = (90, 133)  # neither a multiple of the tiles nor of the quantization groups
    groups = [BitGroup(0, 3, bits, 32), BitGroup(3, 20, bits, 50)]
    blob, delta = mixed_blob(rng, shape, groups)
    pack = LayerPack(shape, [packed.mixed_record(shape, groups, blob)], DEVICE)
    check_all_paths(pack, delta.astype(np.float64), rng, f"{bits}-bit")


def test_lowrank_mixed_recipe_groups_and_rank_one(rng):
    shape = (200, 72)
    groups = [BitGroup(0, 2, 8, 128), BitGroup(2, 34, 3, 128), BitGroup(34, 41, 2, 128), BitGroup(41, 42, 1, 7)]
    blob, delta = mixed_blob(rng, shape, groups)
    check_all_paths(LayerPack(shape, [packed.mixed_record(shape, groups, blob)], DEVICE),
                    delta.astype(np.float64), rng, "8/3/2/1 recipe")
    groups = [BitGroup(0, 1, 5, 1)]  # one vector, a scale per element
    blob, delta = mixed_blob(rng, (17, 9), groups)
    check_all_paths(LayerPack((17, 9), [packed.mixed_record((17, 9), groups, blob)], DEVICE),
                    delta.astype(np.float64), rng, "rank 1, group size 1")


# --- the torch backend's lookup tables (1–4 tokens) and quantization groups off byte boundaries ------
#
# The lookup-table path needs every vector and every quantization group to start on a byte
# (length·bits and group_size·bits multiples of 8).  Below: vectors that start on bytes with
# groups that do not (a group's scale then changes inside a byte), which must take the
# unpacking path, and groups on bytes with a shorter last group, which take the tables.

UNALIGNED_GROUPS = [  # (bits, two group sizes, shape): m·bits and n·bits multiples of 8, group_size·bits not
    (1, (3, 5), (24, 64)), (2, (6, 3), (44, 100)), (3, (12, 5), (40, 64)), (5, (7, 3), (48, 64)),
    (6, (10, 3), (28, 36)), (7, (9, 4), (40, 64)),
]
ALIGNED_GROUPS = [  # group_size·bits a multiple of 8, and a last group shorter than the others
    (2, 4, (36, 52)), (3, 24, (64, 40)), (4, 6, (50, 34)), (6, 4, (28, 44)), (8, 5, (23, 17)),
]


def few_token_paths(pack, reference, rng, what):
    """Both backends at 1–4 tokens (the torch backend's lookup-table regime) against x·Δ̂ᵀ in float64."""
    m, n = pack.shape
    for tokens in range(1, torch_backend.LUT_MAX_TOKENS + 1):
        x = torch.from_numpy(rng.standard_normal((tokens, n)).astype(np.float32)).to(DEVICE)
        want = x.double().cpu().numpy() @ reference.T
        seg = Segments.single(tokens, DEVICE)
        assert_close(run("torch", pack, x, seg), want, f"{what}, torch, {tokens} tokens")
        assert_close(run("triton", pack, x, seg, INTERPRETER_BLOCKS), want, f"{what}, triton, {tokens} tokens")


class LutSpy:
    """Counts the torch backend's lookup-table calls (shrink, expand)."""

    def __init__(self, monkeypatch):
        self.calls = {"shrink_lut": 0, "expand_lut": 0}
        for name in self.calls:
            monkeypatch.setattr(torch_backend, name, self._wrap(name, getattr(torch_backend, name)))

    def _wrap(self, name, fn):
        def spy(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)
        return spy


@pytest.mark.parametrize("bits, sizes, shape", UNALIGNED_GROUPS)
def test_few_tokens_with_groups_off_byte_boundaries(rng, monkeypatch, bits, sizes, shape):
    groups = [BitGroup(0, 3, bits, sizes[0]), BitGroup(3, 7, bits, sizes[1])]
    blob, delta = mixed_blob(rng, shape, groups)
    spy = LutSpy(monkeypatch)
    few_token_paths(LayerPack(shape, [packed.mixed_record(shape, groups, blob)], DEVICE), delta, rng,
                    f"{bits}-bit, groups of {sizes}")
    assert spy.calls == {"shrink_lut": 0, "expand_lut": 0}  # a group's scale changes inside a byte: no tables


@pytest.mark.parametrize("bits, group_size, shape", ALIGNED_GROUPS)
def test_few_tokens_through_lookup_tables(rng, monkeypatch, bits, group_size, shape):
    groups = [BitGroup(0, 2, bits, group_size), BitGroup(2, 5, bits, 2 * group_size)]
    blob, delta = mixed_blob(rng, shape, groups)
    spy = LutSpy(monkeypatch)
    few_token_paths(LayerPack(shape, [packed.mixed_record(shape, groups, blob)], DEVICE), delta, rng,
                    f"{bits}-bit, groups of {group_size}")
    assert spy.calls["shrink_lut"] > 0 and spy.calls["expand_lut"] > 0


def test_few_tokens_mixing_table_and_unpacked_groups(rng, monkeypatch):
    """One record whose bit groups go different ways: 8-bit (tables), 3-bit in groups of 12 (unpacked:
    36 bits), 3-bit in groups of 8 (tables: 3 bytes), 2-bit in groups of 5 (unpacked)."""
    shape = (48, 80)
    groups = [BitGroup(0, 2, 8, 128), BitGroup(2, 6, 3, 12), BitGroup(6, 9, 3, 8), BitGroup(9, 15, 2, 5)]
    blob, delta = mixed_blob(rng, shape, groups)
    spy = LutSpy(monkeypatch)
    few_token_paths(LayerPack(shape, [packed.mixed_record(shape, groups, blob)], DEVICE), delta, rng, "mixed")
    tables = 2 * torch_backend.LUT_MAX_TOKENS  # the two byte-aligned groups, at each of 1..4 tokens
    assert spy.calls == {"shrink_lut": tables, "expand_lut": tables}


def test_kernels_read_the_files_bytes_unchanged(rng):
    shape = (40, 56)
    groups = [BitGroup(0, 4, 3, 16)]
    blob, _ = mixed_blob(rng, shape, groups)
    rec = packed.mixed_record(shape, groups, blob)
    pack = LayerPack(shape, [rec], DEVICE)
    assert rec.blob == blob
    assert bytes(pack.data.cpu().numpy()[:len(blob)]) == blob


# --- every kind, from files the encoder wrote ---------------------------------------------------

SHAPES = {"layer.q.weight": (96, 160), "layer.o.weight": (130, 72)}

METHODS = {
    "delta-come": ("delta-come", "1/4", {"recipe": "8:2,7:2,6:2,5:2,4:2,3:3,1:2,2", "group_size": 48}),
    "delta-come-rd": ("delta-come", "1/8", {"alloc": "rd"}),
    "impart-hash": ("impart", "1/4", {"mask": "hash"}),
    "impart-bitmask": ("impart", "1/4", {"mask": "bitmask"}),
    "impart-qt": ("impart-qt", "1/8", {"mask": "hash", "group_size": 32}),
    "lowrank": ("lowrank", "1/8", {}),
    "bitdelta-rows": ("bitdelta", "1/32", {}),  # under a ratio: some rows of scale 0, not stored
    "bitdelta-matrix": ("bitdelta", None, {"scales": "matrix"}),
    "dare": ("dare", "1/8", {}),
}
KIND_OF = {"delta-come": 4, "delta-come-rd": 4, "impart-hash": 5, "impart-bitmask": 5, "impart-qt": 5,
           "lowrank": 7, "bitdelta-rows": 6, "bitdelta-matrix": 6, "dare": 8}


def synthetic_pair(root: Path, seed: int = 0):
    """A base and a fine-tune of two linear weights (a low-rank-ish delta plus noise) and a bias."""
    rng = np.random.default_rng(seed)
    base, ft = {}, {}
    for name, (m, n) in SHAPES.items():
        w = rng.standard_normal((m, n)).astype(np.float32) * 0.05
        delta = (rng.standard_normal((m, 12)) @ rng.standard_normal((12, n)) * 2e-3
                 + rng.standard_normal((m, n)) * 2e-4).astype(np.float32)
        base[name], ft[name] = ("F32", w), ("F32", w + delta)
    b = rng.standard_normal(96).astype(np.float32)
    base["layer.q.bias"], ft["layer.q.bias"] = ("F32", b), ("F32", b + 1e-3)
    return write_checkpoint(root / "base", base), write_checkpoint(root / "ft", ft)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    base_dir, ft_dir = synthetic_pair(root)
    files = {}
    for label, (method, ratio, options) in METHODS.items():
        files[label] = root / f"{label}.dcm"
        dcm.encode(base_dir, ft_dir, files[label], method=method, ratio=ratio, options=options)
    files["lossless"] = root / "lossless.dcm"
    dcm.encode(base_dir, ft_dir, files["lossless"])
    return base_dir, ft_dir, files


@pytest.mark.parametrize("label", list(METHODS))
def test_every_kind_from_a_file(encoded, rng, label):
    """Each kind against Δ̂ from the reference decoder (spec 19.2 factors), not the codec's."""
    _, _, files = encoded
    oracle = spec_oracle.file_deltas(files[label])
    with dcm.open(files[label]) as f:
        kinds = set()
        for name in SHAPES:
            rec = f.record(name)
            kinds.add(rec.kind)
            pack = LayerPack(rec.shape, [load_record(f, name)], DEVICE)
            assert np.abs(oracle[name]).max() > 0, name  # a delta to check against, not zeros
            check_all_paths(pack, oracle[name], rng, f"{label} {name}")
    assert kinds == {KIND_OF[label]}


def test_all_bit_widths_reach_the_kernels_from_a_file(encoded):
    with dcm.open(encoded[2]["delta-come"]) as f:
        widths = {g[2] for name in SHAPES for g in f.record(name).params["groups"]}
    assert widths == set(range(1, 9))


def test_bitdelta_file_has_rows_without_bits(encoded):
    with dcm.open(encoded[2]["bitdelta-rows"]) as f:
        rec = load_record(f, "layer.q.weight")
    rowmap = np.frombuffer(rec.blob, dtype="<i4", offset=rec.rowmap, count=rec.shape[0])
    assert (rowmap < 0).any() and (rowmap >= 0).any()


# --- many deltas in one batch ------------------------------------------------------------------


@pytest.mark.parametrize("tokens_per_delta", [1, 7])
def test_many_deltas_in_one_launch(encoded, rng, tokens_per_delta):
    """Deltas of every family on one layer (and one that leaves it unchanged), tokens interleaved."""
    _, _, files = encoded
    labels = ["delta-come", "impart-qt", "bitdelta-rows", "lowrank", "dare", None, "delta-come-rd"]
    name = "layer.o.weight"
    recs, refs = [], []
    for label in labels:
        if label is None:
            recs.append(None)
            refs.append(np.zeros(SHAPES[name]))
            continue
        with dcm.open(files[label]) as f:
            recs.append(load_record(f, name))
        refs.append(spec_oracle.file_deltas(files[label])[name])
    pack = LayerPack(SHAPES[name], recs, DEVICE)
    ids = np.repeat(np.arange(len(labels)), tokens_per_delta)
    ids = ids[rng.permutation(ids.size)]
    ids[ids == 3] = 1  # one delta gets no tokens at all
    x = torch.from_numpy(rng.standard_normal((ids.size, SHAPES[name][1])).astype(np.float32)).to(DEVICE)
    want = np.stack([x[i].double().cpu().numpy() @ refs[d].T for i, d in enumerate(ids)])
    seg = Segments.of(torch.from_numpy(ids).to(DEVICE), len(labels))
    xs = x[seg.order].contiguous()
    for backend, blocks in (("torch", None), ("triton", GPU_BLOCKS), ("triton", INTERPRETER_BLOCKS)):
        y = run(backend, pack, xs, seg, blocks)[seg.inverse]
        assert_close(y, want, f"{backend} {blocks}, {tokens_per_delta} tokens per delta")


def test_segments_group_tokens_by_delta():
    seg = Segments.of(torch.tensor([2, 0, 2, 1, 0]), 4)
    assert seg.counts == [2, 1, 2, 0]
    assert seg.bounds.tolist() == [[0, 2], [2, 3], [3, 5], [5, 5]]
    assert seg.order.tolist() == [1, 4, 3, 0, 2]
    assert seg.inverse[seg.order].tolist() == list(range(5))


# --- modules on a small torch model ------------------------------------------------------------


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Module()
        self.layer.q = torch.nn.Linear(160, 96)
        self.layer.o = torch.nn.Linear(72, 130, bias=False)

    def forward(self, a, b):
        return self.layer.q(a), self.layer.o(b)


def model_from(directory) -> TwoLayers:
    from conftest import read_checkpoint

    return model_of({name: array for name, (_, array) in read_checkpoint(directory).items()})


def model_of(tensors: dict) -> TwoLayers:
    model = TwoLayers()
    with torch.no_grad():
        for name, array in tensors.items():
            model.get_parameter(name).copy_(torch.from_numpy(np.asarray(array)))
    return model.eval()


def reference_model(path, base_dir) -> TwoLayers:
    """The fine-tune as the reference decoder rebuilds it from the file and the base (F32 tensors)."""
    out = spec_oracle.dcmref.decode(str(path), base=str(base_dir / "model.safetensors"))
    return model_of({name: np.frombuffer(t.data, dtype="<f4").reshape(t.shape).copy() for name, t in out.tensors.items()})


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("label", ["delta-come", "impart-qt", "bitdelta-rows", "lowrank", "dare", "lossless"])
def test_patch_model_computes_the_decoded_checkpoint(encoded, tmp_path, rng, backend, label):
    base_dir, _, files = encoded
    dcm.decode(files[label], base_dir, tmp_path / "decoded")
    want_model = model_from(tmp_path / "decoded")
    model = patch_model(model_from(base_dir), files[label], backend=backend)
    a = torch.from_numpy(rng.standard_normal((2, 3, 160)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((5, 72)).astype(np.float32))
    with torch.no_grad():  # against the codec's decode and the reference decoder's
        for want_model_ in (want_model, reference_model(files[label], base_dir)):
            for got, want in zip(model(a, b), want_model_(a, b)):
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
    packed_kinds = label not in ("dare", "lossless")
    assert isinstance(model.layer.q, dcm.runtime.DeltaLinear) == packed_kinds
    if packed_kinds:  # the bias was decoded into the base layer
        assert torch.equal(model.layer.q.base.bias, want_model.layer.q.bias)


def test_patch_model_refuses_another_base(encoded):
    from dcm.errors import WrongBaseError

    base_dir, ft_dir, files = encoded
    with pytest.raises(WrongBaseError):
        patch_model(model_from(ft_dir), files["delta-come"])


def test_patch_model_multi_serves_each_sequence_its_delta(encoded, tmp_path, rng):
    base_dir, _, files = encoded
    labels = ["delta-come", "bitdelta-rows", "lossless", "impart-hash"]
    models = []
    for label in labels:
        dcm.decode(files[label], base_dir, tmp_path / label)
        models.append(model_from(tmp_path / label))
    model = model_from(base_dir)
    handle = patch_model_multi(model, [files[label] for label in labels], backend="triton")
    ids = torch.tensor([2, 0, 3, 0, 1])
    a = torch.from_numpy(rng.standard_normal((5, 4, 160)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((5, 72)).astype(np.float32))
    with torch.no_grad(), handle.use(ids):
        got_a, got_b = model(a, b)
    for i, d in enumerate(ids.tolist()):
        with torch.no_grad():
            want_a, want_b = models[d](a[i:i + 1], b[i:i + 1])
        assert torch.allclose(got_a[i:i + 1], want_a, rtol=1e-4, atol=1e-5), (labels[d], i)
        assert torch.allclose(got_b[i:i + 1], want_b, rtol=1e-4, atol=1e-5), (labels[d], i)
    with pytest.raises(dcm.DcmError):
        model(a, b)  # no delta ids given


# --- the real pair: BERT patched with a delta-come file -----------------------------------------

REAL = Path(__file__).resolve().parent.parent / "data" / "real"


@pytest.fixture(scope="module")
def real_delta(tmp_path_factory):
    if not (REAL / "base" / "model.safetensors").exists():
        pytest.skip("the real pair is not in data/real (python scripts/fetch_real_pair.py)")
    root = tmp_path_factory.mktemp("real")
    path = root / "delta-come-1-16.dcm"
    dcm.encode(REAL / "base", REAL / "finetune", path, method="delta-come", ratio="1/16")
    dcm.decode(path, REAL / "base", root / "decoded")
    return path, root / "decoded"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_real_bert_patched_matches_the_decoded_checkpoint(real_delta, backend):
    transformers = pytest.importorskip("transformers")
    path, decoded = real_delta
    want_model = transformers.AutoModel.from_pretrained(decoded).eval()
    model = transformers.AutoModel.from_pretrained(REAL / "base").eval()
    patch_model(model, path, backend=backend)
    linears = [m for m in model.modules() if isinstance(m, dcm.runtime.DeltaLinear)]
    assert len(linears) == 36  # q, k, v, attention output, intermediate, output of 6 layers
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 1997, 1996, 2448, 102, 0],
                        [101, 7592, 2088, 999, 102, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = want_model(input_ids=ids, attention_mask=mask).last_hidden_state
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-5, rel
    assert torch.allclose(got, want, atol=1e-4)


@pytest.fixture(scope="module")
def real_deltas(tmp_path_factory, real_delta):
    """Three deltas of the real base: delta-come at 1/16 and 1/32, and lossless, each also decoded."""
    path16, decoded16 = real_delta
    root = tmp_path_factory.mktemp("real-multi")
    out = [(path16, decoded16)]
    for label, kwargs in (("delta-come-1-32", {"method": "delta-come", "ratio": "1/32"}), ("lossless", {})):
        dcm.encode(REAL / "base", REAL / "finetune", root / f"{label}.dcm", **kwargs)
        dcm.decode(root / f"{label}.dcm", REAL / "base", root / label)
        out.append((root / f"{label}.dcm", root / label))
    return out


@pytest.mark.slow
def test_real_bert_serves_three_deltas_in_one_batch(real_deltas):
    """Embeddings, norms and every linear layer per sequence; each row equals its own decoded model."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(REAL / "base").eval()
    handle = patch_model_multi(model, [p for p, _ in real_deltas], backend="torch")
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 2088, 999, 102, 0],
                        [101, 2748, 3899, 2003, 102, 0], [101, 1996, 2448, 102, 0, 0]])
    mask = (ids != 0).long()
    which = torch.tensor([2, 0, 1, 0])
    with torch.no_grad(), handle.use(which):
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    for d, (_, decoded) in enumerate(real_deltas):
        want_model = transformers.AutoModel.from_pretrained(decoded).eval()
        rows = torch.nonzero(which == d).reshape(-1)
        with torch.no_grad():
            want = want_model(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state
        assert torch.allclose(got[rows], want, atol=1e-4), (d, (got[rows] - want).abs().max())


def test_runtime_benchmark_prints_its_table(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "runtime.py"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--shapes", "128x256", "--tokens", "1,5",
                          "--deltas", "1,2", "--repeats", "1", "--backends", "torch,triton", "--deq-dense-max-deltas", "1",
                          "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("packed[triton]") == 4 and "Targets" in out.stdout
    import json

    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {(r["deltas"], r["tokens"]) for r in rows} == {(1, 1), (1, 5), (2, 1), (2, 5)}
    assert all(r["packed_triton_s"] > 0 and r["packed_bytes"] < r["dense_bytes"] for r in rows)
    columns = ("base_s", "packed_torch_s", "packed_triton_s", "deq_fact_s", "dense_s")
    assert all(r[c] > 0 for r in rows for c in columns) and {r["repeats"] for r in rows} == {1}
    assert all((r.get("deq_dense_s", 0) > 0) == (r["deltas"] == 1) for r in rows)  # --deq-dense-max-deltas 1
    assert "deq+fact / packed" in out.stdout


def test_runtime_benchmark_times_every_column_alike():
    """One warm-up call per column, then rounds that call every column once, in turn; medians."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "runtime.py"
    spec = importlib.util.spec_from_file_location("_dcm_runtime_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    columns = {name: (lambda name=name: calls.append(name)) for name in ("base", "packed_torch", "deq_fact", "dense")}
    clock = iter(range(1, 10**6))
    medians = bench.measure_columns(columns, 5, lambda fn: (fn(), next(clock))[1])
    names = list(columns)
    assert calls == names + names * 5  # warm-up, then 5 interleaved rounds
    assert list(medians) == names and all(m > 0 for m in medians.values())
    assert medians == {n: 4 + 4 * 2 + i + 1 for i, n in enumerate(names)}  # the 3rd of 5 timed calls each
