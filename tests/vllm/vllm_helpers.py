"""What the vLLM tests share: fine-tunes as .dcm files, engines, and the comparison with transformers.

The reference of every check is the fine-tune as ``dcm decode`` rebuilds it, loaded
by transformers in fp32: vLLM's greedy tokens must be the reference's argmax at every
step (teacher-forced on vLLM's own tokens, so the first difference is seen where it
happens), and each of vLLM's top-k logprobs must be within ``TOLERANCE`` of the
reference's log-softmax for the same token.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

import dcm
import tiny_llms

TOLERANCE = 1e-4
TOP_K = 5
NEW_TOKENS = 6
RESULTS: list = []  # (case, sequences, tokens, same tokens, max logprob difference), printed at the end


def prompts(n: int = 3, seq: int = 12) -> list[list[int]]:
    return tiny_llms.token_ids(n, seq, seed=3)


def sampling():
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True,
                          logprobs=TOP_K)


def encoded(work: Path, family: str, role: str, method: str, **options) -> Path:
    """``role`` of ``family`` (fp32) encoded against its base with ``method`` (cached for the session)."""
    tag = "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    out = work / f"{family}-{role}-{method}{'-' + tag if tag else ''}.dcm"
    if not out.exists():
        dcm.encode(tiny_llms.model_dir(family), tiny_llms.model_dir(family, role), out, method=method,
                   options=options or None, allow_uncoded=True)
    return out


def decoded(path: Path) -> Path:
    """``dcm decode`` of a .dcm file made by ``encoded`` (next to it)."""
    out = path.with_suffix(".decoded")
    if not out.exists():
        dcm.decode(path, base_of(path), out)
    return out


def base_of(path: Path) -> Path:
    family = next(f for f in sorted(tiny_llms.FAMILIES, key=len, reverse=True) if path.name.startswith(f + "-"))
    return tiny_llms.model_dir(family)


def sharded_copy(src: Path, out: Path, parts: int = 4) -> Path:
    """``src`` (a one-file checkpoint) saved again in ``parts`` shards with an index, as save_pretrained
    writes a big model: the same tensors, bit for bit, with the other files copied.

    (tiny_llms' own sharded base is saved after the model went through bfloat16, so its
    tensors are not the fp32 base's.)
    """
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    if (out / "model.safetensors.index.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    weight_map, total = {}, 0
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::parts]}
        save_file(part, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for other in src.iterdir():
        if other.is_file() and not other.name.endswith(".safetensors"):
            shutil.copy(other, tmp / other.name)
    tmp.rename(out)
    return out


def llm(model, **kwargs):
    from vllm import LLM

    args = dict(model=str(model), dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=16,
                seed=0)
    args.update(kwargs)
    return LLM(**args)


def close(engine) -> None:
    """Shut an in-process engine down so that the next one can start in this process."""
    try:
        engine.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001  (best effort: the process keeps going either way)
        pass
    del engine
    gc.collect()


def hf_model(path, overrides: Path | None = None, names=None):
    """transformers' model of ``path`` (fp32, eval); with ``overrides`` (a decoded fine-tune), its
    tensors ``names`` replace the model's (the part of a fine-tune that a LoRA adapter carries)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if overrides is not None:
        own = model.state_dict()
        for file in sorted(Path(overrides).glob("*.safetensors")):
            for name, tensor in load_file(file).items():
                if name in names:
                    own[name].copy_(tensor)
    return model


def compare(case: str, model, token_prompts, completions) -> float:
    """Assert vLLM's completions (token ids, [{token: logprob}] per step) match ``model``; the max diff."""
    worst, same_all, tokens = 0.0, True, 0
    for prompt, (ids, logprobs) in zip(token_prompts, completions):
        full = torch.tensor([list(prompt) + list(ids)])
        with torch.no_grad():
            ref = torch.log_softmax(model(full).logits[0].double(), dim=-1)
        steps = ref[len(prompt) - 1:len(prompt) - 1 + len(ids)]
        same = steps.argmax(-1).tolist() == list(ids)
        same_all &= same
        tokens += len(ids)
        for step, top in zip(steps, logprobs):
            for token, value in top.items():
                worst = max(worst, abs(value - float(step[token])))
    RESULTS.append((case, len(token_prompts), tokens, same_all, worst))
    assert same_all, f"{case}: vLLM's greedy tokens differ from the decoded model's"
    assert worst <= TOLERANCE, f"{case}: logprobs differ by {worst:.3g} > {TOLERANCE}"
    return worst


def completions(outputs) -> list:
    """(token ids, [{token: logprob}]) of each vLLM RequestOutput."""
    return [(list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outputs]
