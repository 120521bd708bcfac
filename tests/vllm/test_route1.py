"""Route 1: ``dcm export vllm`` + the ``dcm`` quantization method, one fine-tune per engine.

Each lossy method's fine-tune is served from its packed records (linear layers) and
its other records folded at load, and must compute what ``dcm decode`` + transformers
compute.  The engines are checked to really hold packed deltas (a route that folded
everything would pass the comparison too, without testing the kernels).
"""

from __future__ import annotations

import json

import pytest

import tiny_llms
from vllm_helpers import (close, compare, completions, decoded, encoded, hf_model, llm, prompts, sampling,
                          sharded_copy)

import dcm
from dcm.integrations.vllm import export_vllm

# Every lossy method; the kinds its linear records get, and whether the engine keeps them packed.
METHODS = {
    "delta-come": True,  # lowrank-mixed
    "impart": True,  # sparse-lowrank, float16 values
    "impart-qt": True,  # sparse-lowrank, quantized
    "lowrank": True,  # lowrank (float16 factors)
    "bitdelta": True,  # sign
    "dare": False,  # sparse: folded into the base weights at load (exact, no extra memory)
}


def packed_records(engine) -> int:
    """Packed deltas the engine's linear layers compute with (0: everything was folded)."""
    counts = engine.apply_model(lambda model: sum(len(getattr(m, "dcm_packs", ())) for m in model.modules()))
    return sum(counts)


def serve_and_compare(work, family: str, method: str, case: str, token_prompts, base=None, tag: str = "",
                      **options):
    path = encoded(work, family, "ft1", method, **options)
    out = work / f"{path.stem}{tag}.vllm"
    if not out.exists():
        export_vllm(path, base or tiny_llms.model_dir(family), out)
    engine = llm(out)
    try:
        outputs = engine.generate([{"prompt_token_ids": p} for p in token_prompts], sampling())
        packs = packed_records(engine)
    finally:
        close(engine)
    compare(case, hf_model(decoded(path)), token_prompts, completions(outputs))
    return packs


def nonzero_projections(path) -> int:
    """Projection records of a file whose Δ̂ is not 0 (a method may give a matrix no vector at all:
    such a record has nothing to compute and is not packed)."""
    with dcm.open(path) as f:
        return sum(1 for r in f.records() if r.name.endswith("_proj.weight") and f.stored_delta(r.name).any())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_route1_matches_decoded(work, method):
    packs = serve_and_compare(work, "llama", method, f"route 1, llama, {method}", prompts())
    if METHODS[method]:
        # 2 layers x 7 projections (q, k, v as three records of the fused qkv_proj; gate, up), but those
        # a method gave no vector
        want = nonzero_projections(encoded(work, "llama", "ft1", method))
        assert want >= 12, f"{method}: only {want} of 14 projections carry a delta"
        assert packs == want, f"{method}: {packs} packed deltas in the engine, expected every projection's ({want})"
    else:
        assert packs == 0


def test_route1_tied_embeddings_and_biases(work):
    """Qwen2: q/k/v biases (folded into the fused qkv bias, by shard), lm_head tied to the
    embedding (whose delta is folded once and serves both)."""
    assert tiny_llms.TIED >= {"qwen2"}
    packs = serve_and_compare(work, "qwen2", "delta-come", "route 1, qwen2 (tied, biases), delta-come", prompts())
    assert packs == 14


def test_route1_sharded_base(work):
    """A base saved in shards (index + files): every shard linked, vLLM reads them through the index."""
    base = sharded_copy(tiny_llms.model_dir("llama"), work / "llama-base-sharded")
    packs = serve_and_compare(work, "llama", "delta-come", "route 1, llama, sharded base, delta-come", prompts(2),
                              base=base, tag="-sharded")
    assert packs == 14
    served = work / "llama-ft1-delta-come-sharded.vllm"
    assert sorted(p.name for p in served.glob("*.safetensors*")) == sorted(p.name for p in base.glob("*.safetensors*"))
    assert all((served / p.name).is_symlink() for p in base.glob("*.safetensors"))


def test_export_dir_links_base(work):
    path = encoded(work, "llama", "ft1", "delta-come")
    out = work / "links.vllm"
    export_vllm(path, tiny_llms.model_dir("llama"), out)
    assert (out / "model.safetensors").is_symlink()
    assert (out / path.name).is_symlink()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "dcm"
    assert config["quantization_config"]["dcm_file"] == path.name


def test_route1_rotated_records(work):
    """delta-come with rotation (format 1.3, lowrank-rotated records): served packed, the
    activations rotated around dcm's kernels."""
    import dcm

    path = encoded(work, "llama", "ft1", "delta-come", rotation="hadamard")
    with dcm.open(path) as f:
        assert sum(r.kind_name == "lowrank-rotated" for r in f.records()) > 0
    packs = serve_and_compare(work, "llama", "delta-come", "route 1, llama, delta-come rotated", prompts(),
                              tag="-rotated", rotation="hadamard")
    assert packs == 14
