"""dcm.integrations.vllm without vLLM: the exports, the load-time fold, tensor-parallel plans.

vLLM itself runs in tests/vllm (its own venv); what is checked here needs only dcm,
numpy and torch: ``dcm export lora`` carries each linear delta exactly (B·A = Δ̂ of
the file, scaling 1), truncates with the error it reports, and lists what LoRA cannot
express; ``dcm export vllm`` links the base and writes the quantization config; the
fold that route 1 applies while vLLM streams the base decodes what ``dcm decode``
writes; and the per-rank shares of a packed delta add up to x·Δ̂ᵀ.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import dcm
from dcm.cli import main
from dcm.errors import UsageError, WrongBaseError

torch = pytest.importorskip("torch")

from dcm.integrations.vllm import export_lora, export_vllm  # noqa: E402
from dcm.integrations.vllm.deltas import RECORD, ModelDeltas, from_storage, weight_names  # noqa: E402
from dcm.integrations.vllm.lora import truncate  # noqa: E402
from dcm.integrations.vllm.sharding import ShardPlan, apply_planned, column_rows, kernel_for, row_cols  # noqa: E402
from dcm.runtime import packed  # noqa: E402
from dcm.runtime.layer import LayerPack, Segments  # noqa: E402

from conftest import read_checkpoint, write_checkpoint  # noqa: E402

HIDDEN, FFN, VOCAB = 64, 96, 80
RATIO = {"delta-come": "1/4", "lowrank": "1/4", "impart": "1/4"}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN}


def _llama_like(rng, scale=1.0):
    """Tensors named like a one-layer Llama (float32)."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "model.layers.0.input_layernorm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN),
              "model.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
              "model.layers.0.self_attn.k_proj.weight": (HIDDEN // 2, HIDDEN),
              "model.layers.0.self_attn.q_proj.bias": (HIDDEN,),
              "model.layers.0.mlp.up_proj.weight": (FFN, HIDDEN),
              "model.layers.0.mlp.down_proj.weight": (HIDDEN, FFN)}
    return {n: ("F32", (scale * rng.standard_normal(s)).astype(np.float32)) for n, s in shapes.items()}


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(7)
    base = _llama_like(rng)
    ft = {}
    for name, (dt, w) in base.items():
        delta = 0.02 * rng.standard_normal(w.shape).astype(np.float32)
        if w.ndim == 2:  # a fine-tune's delta: mostly low rank
            delta += 0.1 * np.outer(rng.standard_normal(w.shape[0]), rng.standard_normal(w.shape[1])).astype(np.float32)
        ft[name] = (dt, w + delta)
    attachments = {"config.json": json.dumps(CONFIG).encode(), "tokenizer.json": b"{}"}
    b = write_checkpoint(tmp_path / "base", base, attachments={"config.json": json.dumps(CONFIG).encode()})
    f = write_checkpoint(tmp_path / "ft", ft, attachments=attachments)
    return b, f, base, ft


def _encoded(tmp_path, pair, method, **kw):
    out = tmp_path / f"{method}.dcm"
    if method == "delta-come-rotated":  # format 1.3: lowrank-rotated records
        method, kw["options"] = "delta-come", {"rotation": "hadamard"}
    kw.setdefault("ratio", RATIO.get(method))
    dcm.encode(pair[0], pair[1], out, method=method, allow_uncoded=True, **kw)
    return out


# --- export lora ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["delta-come", "delta-come-rotated", "lowrank", "impart", "bitdelta", "dare"])
def test_lora_carries_each_linear_delta_exactly(tmp_path, pair, method):
    from safetensors.numpy import load_file

    path = _encoded(tmp_path, pair, method)
    report = export_lora(path, pair[0], tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    decoded = tmp_path / "decoded"
    dcm.decode(path, pair[0], decoded)
    ft_hat = read_checkpoint(decoded)
    with dcm.open(path) as f:
        coded = {r.name for r in f.records() if r.kind_name in ("lowrank-mixed", "lowrank", "sparse-lowrank",
                                                                  "sign", "sparse", "lowrank-rotated")}
        linear = {n for n in coded if n.endswith("_proj.weight") and f.stored_delta(n).any()}  # Δ̂ = 0: no module
    assert {m.module + ".weight" for m in report.modules} == linear
    for m in report.modules:
        a = tensors[f"base_model.model.{m.module}.lora_A.weight"].astype(np.float64)
        b = tensors[f"base_model.model.{m.module}.lora_B.weight"].astype(np.float64)
        assert a.shape[0] == b.shape[1] == m.rank == config["rank_pattern"][m.module.replace(".", r"\.")]
        assert config["alpha_pattern"][m.module.replace(".", r"\.")] == m.rank  # scaling alpha / r = 1
        name = m.module + ".weight"
        want = ft_hat[name][1].astype(np.float64) - pair[2][name][1].astype(np.float64)
        scale = np.abs(want).max()
        assert np.abs(b @ a - want).max() <= 2e-6 * max(scale, 1.0), name
    unexpressible = dict(report.unexpressible)
    assert set(unexpressible) >= {"model.layers.0.self_attn.q_proj.bias", "model.norm.weight",
                                  "model.embed_tokens.weight", "lm_head.weight"}
    assert "bias" in unexpressible["model.layers.0.self_attn.q_proj.bias"]
    assert not set(unexpressible) & linear


def _bf16(array):
    """float32 -> bf16 bit patterns (round to nearest even), as a fine-tune saved in bf16 holds them."""
    bits = array.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _adapted_pair(tmp_path, pair, grow: int):
    """The pair's fine-tune saved in BF16 (of the F32 base), its vocabulary grown by ``grow`` rows."""
    rng = np.random.default_rng(3)
    ft = {}
    for name, (_, w) in pair[3].items():
        if grow and name in ("model.embed_tokens.weight", "lm_head.weight"):
            w = np.concatenate([w, rng.standard_normal((grow, w.shape[1])).astype(np.float32)])
        ft[name] = ("BF16", _bf16(w))
    attachments = {"config.json": json.dumps(CONFIG).encode()}
    return write_checkpoint(tmp_path / f"ft-bf16-{grow}", ft, attachments=attachments), ft


def test_lora_of_a_finetune_saved_in_another_dtype(tmp_path, pair):
    """adapted records (a BF16 fine-tune of an F32 base) carry their inner record's delta into the adapter."""
    from safetensors.numpy import load_file

    ft_dir, _ = _adapted_pair(tmp_path, pair, grow=0)
    path = tmp_path / "cast.dcm"
    dcm.encode(pair[0], ft_dir, path, method="delta-come", ratio="1/4", allow_uncoded=True)
    with dcm.open(path) as f:
        kinds = {r.name: r.kind_name for r in f.records()}
        linear = {n for n, k in kinds.items() if n.endswith("_proj.weight") and k == "adapted"}
        want = {n: f.stored_delta(n).astype(np.float64) for n in linear}
    assert linear, kinds
    report = export_lora(path, pair[0], tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {m.module + ".weight" for m in report.modules} == {n for n in linear if want[n].any()}
    for m in report.modules:
        a = tensors[f"base_model.model.{m.module}.lora_A.weight"].astype(np.float64)
        b = tensors[f"base_model.model.{m.module}.lora_B.weight"].astype(np.float64)
        d = want[m.module + ".weight"]
        assert np.abs(b @ a - d).max() <= 2e-6 * max(np.abs(d).max(), 1.0), m.module


def test_lora_refuses_a_grown_vocabulary(tmp_path, pair):
    """An adapter on the base cannot add tokens: a resized vocabulary is refused, naming a tensor."""
    ft_dir, _ = _adapted_pair(tmp_path, pair, grow=3)
    path = tmp_path / "grown.dcm"
    dcm.encode(pair[0], ft_dir, path, method="delta-come", ratio="1/4", allow_uncoded=True)
    with pytest.raises(UsageError, match=rf"has {VOCAB + 3} rows against the base's {VOCAB}.*dcm export vllm"):
        export_lora(path, pair[0], tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_fold_decodes_adapted_records(tmp_path, pair):
    """Route 1 decodes an adapted record (cast, and grown rows) into the tensor vLLM loads, as dcm decode."""
    ft_dir, _ = _adapted_pair(tmp_path, pair, grow=3)
    path = tmp_path / "grown.dcm"
    dcm.encode(pair[0], ft_dir, path, method="delta-come", ratio="1/4", allow_uncoded=True)
    decoded = tmp_path / "decoded"
    dcm.decode(path, pair[0], decoded)
    want = read_checkpoint(decoded)
    deltas = ModelDeltas(path)
    out = dict(deltas.fold(_stream(pair[2])))
    for name, tensor in out.items():
        dt, array = want[name]
        assert tuple(tensor.shape) == array.shape, name
        assert np.array_equal(tensor.view(torch.int16).numpy().view(np.uint16) if dt == "BF16" else tensor.numpy(),
                              array), name
    deltas.check_complete()
    deltas.close()


def test_lora_max_rank_truncates_with_the_error_of_an_svd(tmp_path, pair):
    path = _encoded(tmp_path, pair, "lowrank", ratio="1/2")
    full = export_lora(path, pair[0], tmp_path / "full")
    cut = export_lora(path, pair[0], tmp_path / "cut", max_rank=2)
    assert all(m.rank <= 2 for m in cut.modules) and cut.truncated()
    from safetensors.numpy import load_file

    whole = load_file(tmp_path / "full" / "adapter_model.safetensors")
    for m in cut.truncated():
        key = f"base_model.model.{m.module}.lora_"
        delta = whole[key + "B.weight"].astype(np.float64) @ whole[key + "A.weight"].astype(np.float64)
        s = np.linalg.svd(delta, compute_uv=False)
        assert m.error == pytest.approx(np.sqrt(np.sum(s[2:] ** 2) / np.sum(s ** 2)), rel=1e-6)
    assert len(full.truncated()) == 0


def test_truncate_is_the_best_low_rank_approximation():
    rng = np.random.default_rng(0)
    b, a = rng.standard_normal((20, 6)), rng.standard_normal((6, 15))
    b2, a2, error = truncate(b, a, 3)
    u, s, vt = np.linalg.svd(b @ a, full_matrices=False)
    assert np.allclose(b2 @ a2, (u[:, :3] * s[:3]) @ vt[:3])
    assert error == pytest.approx(np.sqrt((s[3:] ** 2).sum() / (s ** 2).sum()))


def test_lora_of_a_lossless_file_is_refused(tmp_path, pair):
    path = _encoded(tmp_path, pair, "lossless")
    with pytest.raises(UsageError, match="no record LoRA can express"):
        export_lora(path, pair[0], tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_cli_export_lora_prints_truncation_and_unexpressible(tmp_path, pair, capsys):
    path = _encoded(tmp_path, pair, "lowrank", ratio="1/2")
    assert main(["export", "lora", str(path), "--base", str(pair[0]), "-o", str(tmp_path / "a"),
                 "--max-rank", "2"]) == 0
    out, err = capsys.readouterr()
    assert "--max-rank 2 truncated" in out and "relative error" in out
    assert "not in the adapter" in err and "model.norm.weight" in err
    assert main(["export", "lora", str(path), "--base", str(pair[0]), "-o", str(tmp_path / "a")]) == 2  # exists


# --- export vllm ------------------------------------------------------------------------------


def test_export_vllm_links_base_and_selects_dcm(tmp_path, pair):
    path = _encoded(tmp_path, pair, "delta-come")
    out = tmp_path / "served"
    assert main(["export", "vllm", str(path), "--base", str(pair[0]), "-o", str(out)]) == 0
    assert (out / "model.safetensors").is_symlink()
    assert (out / "model.safetensors").resolve() == (pair[0] / "model.safetensors").resolve()
    assert (out / "delta-come.dcm").resolve() == path.resolve()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["quantization_config"] == {"quant_method": "dcm", "dcm_file": "delta-come.dcm",
                                             "backend": "auto", "dcm_method": "delta-come"}
    assert (out / "tokenizer.json").read_bytes() == b"{}"  # the fine-tune's side files, from the .dcm
    with pytest.raises(dcm.errors.OutputExistsError):
        export_vllm(path, pair[0], out)
    export_vllm(path, pair[0], out, overwrite=True)


def test_export_vllm_refuses_a_wrong_base(tmp_path, pair):
    path = _encoded(tmp_path, pair, "delta-come")
    other = dict(pair[2])
    other["model.norm.weight"] = ("F32", np.zeros((HIDDEN + 1,), np.float32))
    wrong = write_checkpoint(tmp_path / "wrong", other, attachments={"config.json": b"{}"})
    with pytest.raises(WrongBaseError):
        export_vllm(path, wrong, tmp_path / "served")
    assert not (tmp_path / "served").exists()


# --- the fold at load (route 1) -----------------------------------------------------------------


def _stream(tensors):
    return [(name, from_storage(array, dt)) for name, (dt, array) in tensors.items()]


def test_fold_decodes_unclaimed_records_and_tags_claimed_ones(tmp_path, pair):
    path = _encoded(tmp_path, pair, "delta-come")
    decoded = tmp_path / "decoded"
    dcm.decode(path, pair[0], decoded)
    want = read_checkpoint(decoded)
    deltas = ModelDeltas(path)
    mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    claims = deltas.claim("model.layers.0.self_attn.qkv_proj", mapping,
                          lambda shard: {"q": (HIDDEN, HIDDEN), "k": (HIDDEN // 2, HIDDEN)}.get(shard))
    assert claims == {"model.layers.0.self_attn.q_proj.weight": "q", "model.layers.0.self_attn.k_proj.weight": "k"}
    out = dict(deltas.fold(_stream(pair[2])))
    for name, tensor in out.items():
        if name in claims:
            assert getattr(tensor, RECORD) == name
            assert np.array_equal(tensor.numpy(), pair[2][name][1])  # the base, to vLLM's matmul
        else:
            assert np.array_equal(tensor.numpy(), want[name][1]), name  # what dcm decode writes
    with pytest.raises(UsageError, match="2 records were not applied"):
        deltas.check_complete()  # the claimed records never reached a layer
    for name in claims:
        deltas.attach(name)
    deltas.check_complete()
    again = dict(deltas.fold(out.items()))  # a nested loader sees the stream again: nothing twice
    assert all(again[n] is out[n] for n in out)
    deltas.close()


def test_fold_refuses_a_wrong_base_tensor(tmp_path, pair):
    path = _encoded(tmp_path, pair, "delta-come")
    deltas = ModelDeltas(path)
    stream = _stream(pair[2])
    stream[1] = (stream[1][0], stream[1][1] + 1)
    with pytest.raises(WrongBaseError):
        list(deltas.fold(stream))
    deltas.close()


def test_weight_names_of_fused_layers():
    mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert weight_names("m.l.0.attn.qkv_proj", mapping) == [
        ("m.l.0.attn.qkv_proj.weight", None), ("m.l.0.attn.q_proj.weight", "q"),
        ("m.l.0.attn.k_proj.weight", "k"), ("m.l.0.attn.v_proj.weight", "v")]
    assert weight_names("m.mlp.gate_up_proj", mapping)[1:] == [("m.mlp.gate_proj.weight", 0),
                                                               ("m.mlp.up_proj.weight", 1)]
    assert weight_names("m.mlp.down_proj", mapping) == [("m.mlp.down_proj.weight", None)]


# --- tensor parallelism: each rank's share ------------------------------------------------------


KERNEL = kernel_for("auto", torch.device("cpu"))  # what route 1 computes with on a CPU


def test_kernel_for_refuses_unknown_backends():
    with pytest.raises(UsageError, match="backend"):
        kernel_for("cuda-graphs", torch.device("cpu"))


def _pack(tmp_path, pair, name="model.layers.0.mlp.up_proj.weight", method="delta-come"):
    path = _encoded(tmp_path, pair, method)
    with dcm.open(path) as f:
        if method == "delta-come-rotated":
            assert f.record(name).kind_name == "lowrank-rotated"
        rec = packed.load_record(f, name)
        return LayerPack(rec.shape, [rec]), f.stored_delta(name).astype(np.float64)


@pytest.mark.parametrize("method", ["delta-come", "delta-come-rotated"])
@pytest.mark.parametrize("tp", [2, 4])
def test_column_parallel_shares_concatenate_to_the_delta(tmp_path, pair, tp, method):
    pack, delta = _pack(tmp_path, pair, method=method)
    m, n = pack.shape
    x = torch.randn(3, n)
    parts = []
    for rank in range(tp):
        rows = column_rows(m, rank, tp)
        y = torch.zeros(3, 5 + m // tp)  # the record feeds columns 5.. of the rank's output
        apply_planned(KERNEL, pack, ShardPlan(5, rows, None), x, y, Segments.single(3, "cpu"))
        assert not y[:, :5].any()
        parts.append(y[:, 5:])
    assert np.allclose(torch.cat(parts, 1).double().numpy(), x.double().numpy() @ delta.T, atol=1e-5)


@pytest.mark.parametrize("method", ["delta-come", "delta-come-rotated"])
@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_shares_sum_to_the_delta(tmp_path, pair, tp, method):
    pack, delta = _pack(tmp_path, pair, "model.layers.0.mlp.down_proj.weight", method=method)
    m, n = pack.shape
    x = torch.randn(3, n)
    total = torch.zeros(3, m)
    for rank in range(tp):
        cols = row_cols(n, rank, tp)
        y = torch.zeros(3, m)
        apply_planned(KERNEL, pack, ShardPlan(0, None, cols), x[:, cols], y, Segments.single(3, "cpu"))
        total += y  # the layer's all-reduce
    assert np.allclose(total.double().numpy(), x.double().numpy() @ delta.T, atol=1e-5)


def test_replicated_kv_heads_share_rows():
    # 2 KV heads of 4 rows over 4 ranks: ranks 0, 1 hold head 0 and ranks 2, 3 head 1 (vLLM's replicas)
    got = [column_rows(8, rank, 4, replicas=2).tolist() for rank in range(4)]
    assert got == [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]]
    assert column_rows(8, 0, 1) is None and row_cols(8, 0, 1) is None
    with pytest.raises(ValueError):
        column_rows(6, 0, 4)


def test_route1_refuses_a_finetune_that_removes_tensors(tmp_path, pair):
    ft = {n: v for n, v in pair[3].items() if n != "model.norm.weight"}
    removed = write_checkpoint(tmp_path / "ft-removed", ft, attachments={"config.json": json.dumps(CONFIG).encode()})
    path = tmp_path / "removed.dcm"
    dcm.encode(pair[0], removed, path, method="delta-come", ratio="1/4", allow_uncoded=True)
    with pytest.raises(UsageError, match="removes base tensors.*model.norm.weight"):
        ModelDeltas(path)
