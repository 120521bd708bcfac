"""Decoder-only LLMs of seven Hugging Face families through codec, calibration and runtime.

The models are tiny but really trained (``tiny_llms.py``: Llama GQA untied and
tied, Qwen2 with q/k/v biases, Mistral, Gemma MQA tied, Phi-3 fused qkv and
gate_up, GPT-2 with Conv1D layers and a tied lm_head), fine-tuned twice, saved
as HF directories in float32 and bfloat16 (and a sharded fp32 base).  For every
family: lossless is bit-exact with identical logits; each lossy method stays
within its budget and its decoded logits move towards the fine-tune's;
``patch_model`` (every hold mode) computes the decoded model's logits;
``patch_model_multi`` with two fine-tunes and the base in one batch gives each
sequence its own model's logits; ``generate()`` with a KV cache through patched
and multi-patched models gives the decoded models' tokens.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import dcm
from dcm.checkpoint import Checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dcm.runtime import DeltaLinear, MultiDeltaLinear, patch_model, patch_model_multi  # noqa: E402

import tiny_llms  # noqa: E402
from tiny_llms import FAMILIES, TIED, model_dir  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SEQ = 24
# Float32 sums in another order than the decoded model's (x·W + x·Δ̂ᵀ against x·(W + Δ̂)ᵀ).
LOGIT_ATOL = 2e-4


# --- helpers ------------------------------------------------------------------------------------


def load(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def ids(n=3, seq=SEQ, seed=0):
    return torch.tensor(tiny_llms.token_ids(n, seq, seed=seed))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def unrounded(base_path, path, dtype=torch.float32):
    """The base plus the Δ̂ of each lossy record of a linear layer's weight added in float32, not rounded
    to the file's dtype (what a packed delta computes); other records decoded.  For files of bf16
    tensors, where the decoded checkpoint rounds W + Δ̂ to bf16 and a packed delta does not."""
    model = load(base_path, dtype)
    state = model.state_dict()
    linear = {f"{name}.weight" for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    tied = {name for name in linear if len(tied_names(model, name)) > 1}
    with dcm.open(path) as f, Checkpoint(base_path) as base, torch.no_grad():
        for rec in f.records():
            if rec.kind == dcm.constants.Kind.REMOVED:
                continue
            # a lossy record (an adapted one around a lossy kind too: its Δ̂ against the base as held)
            if dcm.records.is_lossy(f.index_entry(rec.name)) and rec.name in linear - tied:
                value = torch.from_numpy(f.stored_delta(rec.name)) + state[rec.name].float()
            else:
                array = f.tensor(rec.name, base.read(rec.name) if rec.name in base else None)
                value = torch.from_numpy(dcm.dtypes.to_float32(array, rec.dtype))
            state[rec.name].copy_(value)
    return model


def tied_names(model, name) -> list:
    """Every name of the model's tensor ``name`` (more than one when tied)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    return [n for n, t in tensors.items() if t is tensors[name]]


class Files:
    """Encoded and decoded files of one family, made once per test session."""

    def __init__(self, root):
        self.root = root
        self._done = {}

    def encode(self, family, label, ft="ft1", base="base", ft_dtype="float32", base_dtype="float32", **kwargs):
        key = ("enc", family, label)
        if key not in self._done:
            out = self.root / f"{family}-{label}.dcm"
            report = dcm.encode(model_dir(family, base, base_dtype), model_dir(family, ft, ft_dtype), out, **kwargs)
            self._done[key] = (out, report)
        return self._done[key][0]

    def report(self, family, label):
        return self._done[("enc", family, label)][1]

    def decode(self, family, label, base="base", base_dtype="float32"):
        key = ("dec", family, label)
        if key not in self._done:
            out = self.root / f"{family}-{label}-decoded"
            dcm.decode(self._done[("enc", family, label)][0], model_dir(family, base, base_dtype), out)
            self._done[key] = out
        return self._done[key]


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    return Files(tmp_path_factory.mktemp("llm-files"))


def delta_come(files, family, role="ft1"):
    label = f"{role}-delta-come"
    files.encode(family, label, ft=role, method="delta-come", ratio="1/16")
    return files._done[("enc", family, label)][0], files.decode(family, label)


def lossless(files, family, role="ft1"):
    label = f"{role}-lossless"
    files.encode(family, label, ft=role)
    return files._done[("enc", family, label)][0], files.decode(family, label)


# --- item 1: several deltas on a tied-embedding model ------------------------------------------------


@pytest.mark.parametrize("family", sorted(TIED))
def test_multi_tied_lm_head_follows_each_delta(files, family):
    """lm_head shares embed_tokens' parameter: with several deltas it must use each delta's matrix."""
    (p1, d1), (p2, d2) = lossless(files, family, "ft1"), lossless(files, family, "ft2")
    model = load(model_dir(family))
    handle = patch_model_multi(model, [p1, p2], backend="torch")
    x = ids(2)
    with handle.use(torch.tensor([0, 1])):
        got = logits(model, x)
    for row, decoded in enumerate((d1, d2)):
        want = logits(load(decoded), x[row:row + 1])
        assert max_diff(got[row:row + 1], want) < LOGIT_ATOL, (family, row)


# --- item 2: GPT-2's Conv1D served packed --------------------------------------------------------------


def test_gpt2_conv1d_layers_stay_packed(files):
    path, decoded = delta_come(files, "gpt2")
    model = patch_model(load(model_dir("gpt2")), path, backend="torch")
    wrapped = [m for m in model.modules() if isinstance(m, DeltaLinear)]
    conv1d = [m for m in load(model_dir("gpt2")).modules() if type(m).__name__ == "Conv1D"]
    assert len(wrapped) == len(conv1d) == 4 * tiny_llms.LAYERS  # c_attn, c_proj, c_fc, mlp.c_proj
    assert all(m.transposed for m in wrapped)
    x = ids()
    assert max_diff(logits(model, x), logits(load(decoded), x)) < LOGIT_ATOL


def test_gpt2_conv1d_multi(files):
    (p1, d1), (p2, d2) = delta_come(files, "gpt2", "ft1"), delta_come(files, "gpt2", "ft2")
    model = load(model_dir("gpt2"))
    handle = patch_model_multi(model, [p1, p2], backend="torch")
    assert sum(isinstance(m, MultiDeltaLinear) for m in model.modules()) >= 4 * tiny_llms.LAYERS
    x = ids(3)
    which = torch.tensor([1, 0, 1])
    with handle.use(which):
        got = logits(model, x)
    for row, d in enumerate(which.tolist()):
        want = logits(load((d1, d2)[d]), x[row:row + 1])
        assert max_diff(got[row:row + 1], want) < LOGIT_ATOL, row


# --- item 3: a base loaded in another dtype than its checkpoint -----------------------------------------


@pytest.mark.parametrize("label", ["lossless", "delta-come"])
def test_bf16_checkpoint_loaded_in_float32(files, label):
    """The bf16 base held in float32 is cast back exactly: checked, and patched as the decoded model."""
    kwargs = {} if label == "lossless" else {"method": "delta-come", "ratio": "1/16"}
    path = files.encode("llama", f"bf16-{label}", ft_dtype="bfloat16", base_dtype="bfloat16", **kwargs)
    decoded = files.decode("llama", f"bf16-{label}", base_dtype="bfloat16")
    base = model_dir("llama", "base", "bfloat16")
    x = ids()
    model = patch_model(load(base, torch.float32), path, backend="torch")
    assert max_diff(logits(model, x), logits(unrounded(base, path), x)) < LOGIT_ATOL
    merged = patch_model(load(base, torch.float32), path, backend="torch", hold="merged")
    assert torch.equal(logits(merged, x), logits(load(decoded, torch.float32), x))
    with pytest.raises(dcm.errors.WrongBaseError):  # still checked: another model's bf16 weights
        patch_model(load(model_dir("llama", "ft2", "bfloat16"), torch.float32), path, backend="torch")


def test_float32_checkpoint_loaded_in_bfloat16(files):
    """fp32 bytes cannot be recovered from a bf16 model: checking refuses clearly; unchecked, the file
    applies to the base as held, and the model computes the decoded model (loaded in bf16) up to the
    rounding bf16 put on the base."""
    x = ids()
    for (path, decoded), hold in ((delta_come(files, "llama"), "packed"), (delta_come(files, "llama"), "merged"),
                                  (lossless(files, "llama"), "packed")):
        model = load(model_dir("llama"), torch.bfloat16)
        if hold == "packed":
            patch_model(model, path, backend="torch", check_base=False)
        else:
            patch_model(model, path, backend="torch", check_base=False, hold=hold)
        with pytest.raises(dcm.errors.UsageError, match="check_base=False"):
            patch_model(load(model_dir("llama"), torch.bfloat16), path, backend="torch")
        want = logits(load(decoded, torch.bfloat16), x)
        exact = logits(load(decoded), x)
        got = logits(model, x)
        # the base rounded to bf16 before the delta is added: about as far from the decoded model in bf16
        # as that model is from itself in float32
        assert max_diff(got, want) <= 2 * max_diff(want, exact), hold
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9, hold


# --- item 4: a fine-tune saved in another dtype than its base ---------------------------------------


def file_kinds(path) -> dict:
    """{(kind, inner kind or None): records}."""
    out: dict = {}
    for row in dcm.info(path)["records"]:
        key = (row["kind"], row["inner"])
        out[key] = out.get(key, 0) + 1
    return out


@pytest.mark.parametrize("base_dtype,ft_dtype", [("float32", "bfloat16"), ("bfloat16", "float32")])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_finetune_of_another_dtype_is_coded_as_a_delta(files, family, base_dtype, ft_dtype):
    """Every tensor is an adapted record against the base cast to the fine-tune's dtype: lossless is
    bit-exact for the fine-tune's bytes; delta-come codes every matrix within budget, and its file is about
    the size of a same-dtype pair's (it was 10.5x / 24.7x larger, every tensor stored whole)."""
    label = f"{base_dtype}-{ft_dtype}"
    kw = dict(base_dtype=base_dtype, ft_dtype=ft_dtype)
    exact = files.encode(family, f"{label}-lossless", **kw)
    assert set(file_kinds(exact)) == {("adapted", "dense-delta")}
    decoded = files.decode(family, f"{label}-lossless", base_dtype=base_dtype)
    assert hf_tensors(decoded) == hf_tensors(model_dir(family, "ft1", ft_dtype))
    x = ids()
    assert torch.equal(logits(load(decoded), x), logits(load(model_dir(family, "ft1", ft_dtype)), x))

    lossy = files.encode(family, f"{label}-delta-come", method="delta-come", ratio=RATIO, **kw)
    same = files.encode(family, f"{ft_dtype}-{ft_dtype}-delta-come", method="delta-come", ratio=RATIO,
                        base_dtype=ft_dtype, ft_dtype=ft_dtype)
    assert ("adapted", "lowrank-mixed") in file_kinds(lossy) and ("full", None) not in file_kinds(lossy)
    assert dcm.info(lossy)["totals"]["compressed"]["bits_per_param"] <= 16 * 1 / 16 + 1e-9
    assert files.report(family, f"{label}-delta-come").coverage.coded_tensors == matrices(model_dir(family))
    size, same_size = os.path.getsize(lossy), os.path.getsize(same)
    print(family, label, "delta-come bytes", size, "same-dtype pair", same_size)
    assert size < 1.25 * same_size
    ft, base = logits(load(model_dir(family, "ft1", ft_dtype)), x), logits(load(model_dir(family, "base", base_dtype)), x)
    assert gain(logits(load(files.decode(family, f"{label}-delta-come", base_dtype=base_dtype)), x), base, ft) > 0.5


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_finetune_of_another_dtype_patched(files, family):
    """A bf16 fine-tune of an fp32 base served on the fp32 base: merged is the decoded model exactly; packed
    and factors add the inner Δ̂ to the base as held; multi serves it beside a same-dtype delta."""
    kw = dict(base_dtype="float32", ft_dtype="bfloat16")
    path = files.encode(family, "float32-bfloat16-delta-come", method="delta-come", ratio=RATIO, **kw)
    decoded = files.decode(family, "float32-bfloat16-delta-come")
    x = ids()
    merged = patch_model(load(model_dir(family)), path, backend="torch", hold="merged")
    assert torch.equal(logits(merged, x), logits(load(decoded), x))
    want = logits(unrounded(model_dir(family), path), x)
    for hold in ("packed", "factors"):
        model = patch_model(load(model_dir(family)), path, backend="torch", hold=hold)
        assert sum(isinstance(m, DeltaLinear) for m in model.modules()) >= 4 * tiny_llms.LAYERS, hold
        assert max_diff(logits(model, x), want) < LOGIT_ATOL, hold
    other, other_decoded = delta_come(files, family, "ft2")
    model = load(model_dir(family))
    handle = patch_model_multi(model, [path, other, None], backend="torch")
    which = torch.tensor([0, 1, 2])
    with handle.use(which):
        got = logits(model, x)
    assert max_diff(got[:1], want[:1]) < LOGIT_ATOL
    assert max_diff(got[1:2], logits(load(other_decoded), x[1:2])) < LOGIT_ATOL
    assert max_diff(got[2:], logits(load(model_dir(family)), x[2:])) < LOGIT_ATOL


# --- item 5: a resized vocabulary ---------------------------------------------------------------------


def vocab_ids(family, n=2, seq=SEQ):
    """Held-out ft1 text through the resized tokenizer: the added tokens occur."""
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir(family, "ft1-vocab"))
    out = torch.tensor(tok(tiny_llms.corpus("ft1")[-20_000:])["input_ids"][:n * seq]).reshape(n, seq)
    assert int(out.max()) >= tiny_llms.VOCAB  # new tokens in the input
    return out


def grown_rows(family) -> int:
    with Checkpoint(model_dir(family, "ft1-vocab")) as ckpt:
        return max(ckpt.info(n).shape[0] for n in ckpt.names() if len(ckpt.info(n).shape) == 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_resized_vocabulary_codec(files, family):
    """embed_tokens / lm_head with more rows: adapted records (the shared rows' delta, the new rows whole);
    lossless bit-exact; delta-come codes them within budget, its file close to the same-vocabulary one's
    (it was 11.5x larger)."""
    exact = files.encode(family, "vocab-lossless", ft="ft1-vocab")
    kinds = file_kinds(exact)
    assert ("full", None) not in kinds and kinds[("adapted", "dense-delta")] == (1 if family in TIED else 2)
    decoded = files.decode(family, "vocab-lossless")
    assert hf_tensors(decoded) == hf_tensors(model_dir(family, "ft1-vocab"))
    lossy = files.encode(family, "vocab-delta-come", ft="ft1-vocab", method="delta-come", ratio=RATIO)
    assert ("full", None) not in file_kinds(lossy)
    assert dcm.info(lossy)["totals"]["compressed"]["bits_per_param"] <= 16 * 1 / 16 + 1e-9
    same, _ = delta_come(files, family)
    size, same_size = os.path.getsize(lossy), os.path.getsize(same)
    print(family, "resized-vocabulary delta-come bytes", size, "same vocabulary", same_size)
    assert size < 1.5 * same_size
    x = vocab_ids(family)
    ft = logits(load(model_dir(family, "ft1-vocab")), x)
    got = logits(load(files.decode(family, "vocab-delta-come")), x)
    assert float((got - ft).norm() / ft.norm()) < 0.5


@pytest.mark.parametrize("family", ["llama", "llama-tied", "gpt2", "gemma"])
@pytest.mark.parametrize("label", ["lossless", "delta-come"])
def test_resized_vocabulary_patched(files, family, label):
    """patch_model grows the embedding and lm_head (ties kept) of the base as loaded, or fills a base the
    user resized; each hold mode computes the decoded model, generate() included; multi refuses clearly."""
    kwargs = {} if label == "lossless" else {"method": "delta-come", "ratio": RATIO}
    path = files.encode(family, f"vocab-{label}", ft="ft1-vocab", **kwargs)
    decoded = load(files.decode(family, f"vocab-{label}"))
    rows = grown_rows(family)
    x = vocab_ids(family)
    want = logits(decoded, x)
    for hold in ("packed", "factors", "merged"):
        model = patch_model(load(model_dir(family)), path, backend="torch", hold=hold)
        assert model.get_input_embeddings().weight.shape[0] == rows, hold
        assert model.get_output_embeddings().weight.shape[0] == rows if hold == "merged" or label == "lossless" \
            or family in TIED else model.get_output_embeddings().base.weight.shape[0] == rows, hold
        assert model.config.vocab_size == rows
        if family in TIED:
            emb = model.get_input_embeddings().weight
            assert model.get_output_embeddings().weight is emb, hold
        assert max_diff(logits(model, x), want) < LOGIT_ATOL, hold
    resized = load(model_dir(family))
    resized.resize_token_embeddings(rows, mean_resizing=False)
    patch_model(resized, path, backend="torch")
    assert max_diff(logits(resized, x), want) < LOGIT_ATOL
    prompt = x[:1, :12]
    assert same_generation(generate(resized, prompt, 8), decoded, prompt, 8)
    with pytest.raises(dcm.errors.UsageError, match="resized vocabulary"):
        patch_model_multi(load(model_dir(family)), [path, None], backend="torch")


# --- hold modes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("hold", ["packed", "factors", "merged"])
def test_hold_modes_compute_the_decoded_model(files, hold):
    path, decoded = delta_come(files, "llama")
    model = patch_model(load(model_dir("llama")), path, backend="torch", hold=hold)
    wrapped = [m for m in model.modules() if isinstance(m, DeltaLinear)]
    assert (len(wrapped) > 0) == (hold != "merged")
    assert all(m.hold == hold for m in wrapped)
    x = ids()
    want_model = load(decoded)
    if hold == "merged":  # the decoded weights themselves
        for (name, got), (_, want) in zip(model.state_dict().items(), want_model.state_dict().items()):
            assert torch.equal(got, want), name
    assert max_diff(logits(model, x), logits(want_model, x)) < LOGIT_ATOL


def test_multi_factors_hold_and_merged_refused(files):
    (p1, d1), (p2, d2) = delta_come(files, "qwen2", "ft1"), delta_come(files, "qwen2", "ft2")
    model = load(model_dir("qwen2"))
    with pytest.raises(dcm.errors.UsageError, match="merged"):
        patch_model_multi(model, [p1, p2], hold="merged")
    handle = patch_model_multi(model, [p1, p2], backend="torch", hold="factors")
    x = ids(2)
    with handle.use(torch.tensor([1, 0])):
        got = logits(model, x)
    assert max_diff(got[:1], logits(load(d2), x[:1])) < LOGIT_ATOL
    assert max_diff(got[1:], logits(load(d1), x[1:])) < LOGIT_ATOL


def test_hold_is_checked():
    model = load(model_dir("llama"))
    with pytest.raises(dcm.errors.UsageError, match="hold must be one of"):
        patch_model(model, "unused.dcm", hold="dense")


# --- every family: codec ----------------------------------------------------------------------------

LOSSY = ("delta-come", "impart-qt", "impart", "lowrank", "dare", "bitdelta")
RATIO = "1/16"


def hf_tensors(path) -> dict:
    with Checkpoint(path) as ckpt:
        return {name: (ckpt.info(name).dtype, ckpt.read(name).tobytes()) for name in ckpt.names()}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_lossless_is_bit_exact(files, family):
    path, decoded = lossless(files, family)
    assert hf_tensors(decoded) == hf_tensors(model_dir(family, "ft1"))
    x = ids()
    assert torch.equal(logits(load(decoded), x), logits(load(model_dir(family, "ft1")), x))
    with dcm.open(path) as f:
        assert {r.kind_name for r in f.records()} <= {"dense-delta"}


def gain(got, base, ft) -> float:
    """1 − ‖got − ft‖ / ‖base − ft‖ over logits: 1 is the fine-tune, 0 the base."""
    return 1.0 - float((got - ft).norm() / (base - ft).norm())


# The least gain of the decoded logits at 1/16 each method must reach on every family: about half of the
# lowest measured over the seven (benchmarks/llm_families.py; README, Measured).  DARE at 1/16 keeps ~3 % of
# the delta's elements, each scaled ×32: its logits may end farther from the fine-tune's than the base's
# (measured −0.09 on llama-tied), so it is only held to not wrecking the model.
MIN_GAIN = {"delta-come": 0.4, "impart-qt": 0.35, "impart": 0.2, "lowrank": 0.25, "bitdelta": 0.3, "dare": -0.3}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_lossy_methods_within_budget(files, family):
    """Each lossy method codes every matrix within its budget, and its decoded logits move towards the
    fine-tune's (gain over held-out text)."""
    x = ids()
    ft, base = logits(load(model_dir(family, "ft1")), x), logits(load(model_dir(family)), x)
    gains = {}
    for method in LOSSY:
        label = f"ft1-{method}"
        path = files.encode(family, label, method=method, ratio=RATIO)
        info = dcm.info(path)
        compressed = info["totals"]["compressed"]
        assert compressed["bits_per_param"] <= 16 * 1 / 16 + 1e-9, (method, compressed)
        cov = files.report(family, label).coverage
        assert cov.coded_tensors == matrices(model_dir(family, "ft1")), (method, cov.uncoded)
        gains[method] = gain(logits(load(files.decode(family, label)), x), base, ft)
    print(family, {m: round(g, 4) for m, g in gains.items()})
    for method, g in gains.items():
        assert g >= MIN_GAIN[method], (family, method, g)


def matrices(path) -> int:
    """2-D float tensors of a checkpoint: what a lossy method codes."""
    with Checkpoint(path) as ckpt:
        return sum(len(ckpt.info(n).shape) == 2 and ckpt.info(n).dtype in ("F32", "BF16", "F16")
                   for n in ckpt.names())


# --- every family: runtime --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hold", ["packed", "factors"])
def test_family_patch_model_equals_decoded(files, family, hold):
    path, decoded = delta_come(files, family)
    model = patch_model(load(model_dir(family)), path, backend="torch", hold=hold)
    assert sum(isinstance(m, DeltaLinear) for m in model.modules()) >= 4 * tiny_llms.LAYERS
    x = ids()
    assert max_diff(logits(model, x), logits(load(decoded), x)) < LOGIT_ATOL


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_family_patch_model_triton_interpreter(files, family):
    path, decoded = delta_come(files, family)
    model = patch_model(load(model_dir(family)), path, backend="triton")
    x = ids(1, 8)
    assert max_diff(logits(model, x), logits(load(decoded), x)) < LOGIT_ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_family_multi_two_finetunes_and_the_base(files, family):
    (p1, d1), (p2, d2) = delta_come(files, family, "ft1"), delta_come(files, family, "ft2")
    model = load(model_dir(family))
    handle = patch_model_multi(model, [p1, p2, None], backend="torch")
    x = ids(4)
    which = torch.tensor([2, 0, 1, 0])
    with handle.use(which):
        got = logits(model, x)
    references = [load(d1), load(d2), load(model_dir(family))]
    for row, d in enumerate(which.tolist()):
        assert max_diff(got[row:row + 1], logits(references[d], x[row:row + 1])) < LOGIT_ATOL, (family, row, d)


def same_generation(got, want_model, prompt, new_tokens):
    """Greedy tokens equal the reference's, or differ first where the reference's top two logits tie
    within the float32 noise of a patched model."""
    with torch.no_grad():
        out = want_model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                  output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    want = out.sequences
    if torch.equal(got, want):
        return True
    step = int((got != want).any(0).nonzero()[0]) - prompt.shape[1]
    top2 = out.scores[step].float().topk(2, dim=-1).values
    return bool(((top2[:, 0] - top2[:, 1]) < 10 * LOGIT_ATOL).any())


def generate(model, prompt, new_tokens):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_generate_with_kv_cache(files, family):
    """generate() through a patched model and through a multi-patched one (per-sequence deltas, KV cache)."""
    (p1, d1), (p2, d2) = delta_come(files, family, "ft1"), delta_come(files, family, "ft2")
    prompt, new = ids(3, 12, seed=5), 10
    single = patch_model(load(model_dir(family)), p1, backend="torch")
    assert same_generation(generate(single, prompt[:1], new), load(d1), prompt[:1], new)
    model = load(model_dir(family))
    handle = patch_model_multi(model, [p1, p2, None], backend="torch")
    which = torch.tensor([1, 2, 0])
    with handle.use(which):
        got = generate(model, prompt, new)
    references = [load(d1), load(d2), load(model_dir(family))]
    for row, d in enumerate(which.tolist()):
        assert same_generation(got[row:row + 1], references[d], prompt[row:row + 1], new), (family, row, d)


# --- item 6: calibration of causal LMs --------------------------------------------------------------


@pytest.fixture(scope="session")
def calibration_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "text.txt"
    path.write_text(tiny_llms.corpus("ft1", 60_000), encoding="utf-8")
    return path


def calibrate(family, text, out):
    from dcm.calibrate import calibrate as run, load_stats

    run(model_dir(family), text, out, max_tokens=4096, seq_len=64, batch_size=8)
    return load_stats(out)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_calibrate_gives_every_coded_matrix_statistics(tmp_path, calibration_text, family):
    """Loaded with its head: lm_head has a Hessian; GPT-2's Conv1D layers have theirs (over their first
    axis, listed as transposed); a tied embedding has the lm_head's; an untied one its row frequencies."""
    stats = calibrate(family, calibration_text, tmp_path / "stats.safetensors")
    with Checkpoint(model_dir(family)) as ckpt:
        coded = {n: ckpt.info(n).shape for n in ckpt.names() if len(ckpt.info(n).shape) == 2}
    model = load(model_dir(family))
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    tied = {n for n in embeddings if model.get_output_embeddings().weight is model.get_submodule(n[:-7]).weight}
    for name, shape in coded.items():
        if name in embeddings and name not in tied:
            assert stats.row_frequencies(name).shape == (shape[0],), name
            continue
        h = stats.hessian(name)
        axis = 0 if family == "gpt2" and name not in embeddings else 1
        assert h is not None and h.shape == (shape[axis], shape[axis]), name
        assert (name in stats.transposed) == (axis == 0), name
    if family not in TIED:
        assert "lm_head.weight" in coded and stats.hessian("lm_head.weight") is not None


def output_error(delta_hat, delta, h, axis) -> float:
    """E‖x·Δ̂ − x·Δ‖² under the input Hessian h (inputs along ``axis`` of the stored matrix)."""
    e = (delta_hat - delta).astype(np.float64)
    e = e if axis == 0 else e.T  # (inputs, outputs)
    return float(np.einsum("ij,ik,kj->", e, h, e))


@pytest.mark.parametrize("method", ["delta-come", "impart-qt"])
def test_gptq_on_gpt2_conv1d_uses_the_input_side(tmp_path, calibration_text, files, method):
    """Conv1D matrices are GPTQ'd against the Hessian of their first axis: lower output error than plain
    rounding; the file lists every GPTQ'd matrix."""
    stats = calibrate("gpt2", calibration_text, tmp_path / "stats.safetensors")
    # impart-qt's shares by size: rd leaves some matrices a few very sparse vectors, where GPTQ has little
    # to improve (median ratio 0.94 there against 0.9 here), which would measure the allocation, not the side.
    options = {"alloc": "recipe"} if method == "impart-qt" else {}
    rtn = files.encode("gpt2", f"ft1-{method}-{options}", method=method, ratio=RATIO, options=options)
    gptq = tmp_path / "gptq.dcm"
    dcm.encode(model_dir("gpt2"), model_dir("gpt2", "ft1"), gptq, method=method, ratio=RATIO,
               options={**options, "calibration": str(tmp_path / "stats.safetensors")})
    conv = [n for n in stats.transposed]
    assert len(conv) == 4 * tiny_llms.LAYERS
    with dcm.open(gptq) as f_gptq, dcm.open(rtn) as f_rtn, Checkpoint(model_dir("gpt2")) as base, \
            Checkpoint(model_dir("gpt2", "ft1")) as ft:
        params = f_gptq.metadata()["params"]
        assert params["quantizer"] == "gptq" and set(conv) <= set(params["gptq_tensors"])
        ratios = []
        for name in conv:
            delta = dcm.dtypes.to_float32(ft.read(name), "F32") - dcm.dtypes.to_float32(base.read(name), "F32")
            h = stats.hessian(name)
            ratios.append(output_error(f_gptq.stored_delta(name), delta, h, 0)
                          / output_error(f_rtn.stored_delta(name), delta, h, 0))
    assert np.median(ratios) < 0.9, ratios


def test_gptq_without_statistics_warns_per_matrix_or_refuses(tmp_path, calibration_text):
    from safetensors.numpy import load_file, save_file

    from dcm.calibrate import load_stats

    stats = calibrate("llama", calibration_text, tmp_path / "stats.safetensors")
    tensors = load_file(tmp_path / "stats.safetensors")
    dropped = "model.layers.1.mlp.down_proj.weight"
    del tensors[dropped]
    save_file(tensors, tmp_path / "partial.safetensors", metadata=stats.metadata)
    load_stats(tmp_path / "partial.safetensors")
    out = tmp_path / "partial.dcm"
    with pytest.warns(dcm.errors.DcmWarning, match=f"no calibration statistics for 2 of .*{dropped}"):
        dcm.encode(model_dir("llama"), model_dir("llama", "ft1"), out, method="delta-come", ratio=RATIO,
                   options={"calibration": str(tmp_path / "partial.safetensors")})
    with dcm.open(out) as f:
        gptqd = f.metadata()["params"]["gptq_tensors"]
    assert dropped not in gptqd and "model.embed_tokens.weight" not in gptqd and "lm_head.weight" in gptqd
    other = calibrate("gpt2", calibration_text, tmp_path / "gpt2.safetensors")
    assert other.names()
    with pytest.raises(dcm.errors.UsageError, match="no input Hessian for any"):
        dcm.encode(model_dir("llama"), model_dir("llama", "ft1"), tmp_path / "other.dcm", method="delta-come",
                   ratio=RATIO, options={"calibration": str(tmp_path / "gpt2.safetensors")})


# --- item 7: one shard of a sharded checkpoint -------------------------------------------------------


def test_one_shard_of_a_sharded_base_is_refused(tmp_path, files):
    """A shard file is refused, naming its directory; the directory itself is the whole checkpoint."""
    import subprocess
    import sys

    sharded = model_dir("llama", "base", sharded=True)
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2
    with pytest.raises(dcm.errors.UsageError, match=f"one of {len(shards)} shards of the checkpoint in .*{sharded.name}"):
        dcm.encode(shards[0], model_dir("llama", "ft1"), tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
    proc = subprocess.run([sys.executable, "-m", "dcm", "encode", str(shards[1]), str(model_dir("llama", "ft1")),
                           "-o", str(tmp_path / "y.dcm")], capture_output=True, text=True)
    assert proc.returncode == 2 and f"pass the directory {sharded}" in proc.stderr, proc.stderr
    dcm.encode(sharded, model_dir("llama", "ft1"), tmp_path / "z.dcm")  # the directory: every tensor coded
    with dcm.open(tmp_path / "z.dcm") as f:
        assert {r.kind_name for r in f.records()} == {"dense-delta"}
    dcm.decode(tmp_path / "z.dcm", sharded, tmp_path / "decoded")
    assert hf_tensors(tmp_path / "decoded") == hf_tensors(model_dir("llama", "ft1"))
