"""Tiny decoder-only LLMs of the major Hugging Face families, really trained, cached on disk.

No model can be downloaded here, so each family is built from its transformers
config class, trained a little (AdamW) on text that ships with Python, and
fine-tuned twice on other text, as a user's full fine-tunes would be:

- ``base``: trained from random init on the standard library's sources a–m;
- ``ft1`` / ``ft2``: the base trained further on other modules' text;
- ``ft1-vocab``: the base with ``ADDED_TOKENS`` new tokens (its vocabulary resized:
  ``embed_tokens`` and ``lm_head`` get more rows, the tokenizer the new tokens),
  trained further on the ft1 text, where the new tokens occur.

Every role is saved as a Hugging Face model directory with a locally trained
byte-level BPE tokenizer, in float32 and bfloat16 (the bf16 copies are casts of
the trained fp32 weights, as training in fp32 and shipping bf16 does), and the
fp32 base once more as a sharded checkpoint (index + several files).

The cache lives outside the repository (``$DCM_TEST_CACHE``, default
``~/.cache/dcm-tests``) under a key that hashes this file and the versions of
torch and transformers: edits rebuild, and concurrent builders (several test
runs at once) wait on a lock and build once.

    from tiny_llms import model_dir, FAMILIES
    path = model_dir("llama", "ft1", dtype="bfloat16")

``python tests/tiny_llms.py [FAMILY ...]`` builds (or finds) them and prints the paths.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

VOCAB = 512
HIDDEN = 128
FFN = 256
LAYERS = 2
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
SEQ = 64
BATCH = 8
STEPS = {"base": 150, "ft1": 60, "ft2": 60, "ft1-vocab": 40}
LR = {"base": 3e-3, "ft1": 1e-3, "ft2": 1e-3, "ft1-vocab": 1e-3}
ROLES = ("base", "ft1", "ft2")
VOCAB_ROLES = ("ft1-vocab",)  # fine-tunes whose vocabulary grew (resized embeddings and lm_head)
# Frequent words of the ft1 text, added as whole tokens by the resized-vocabulary fine-tune.
ADDED_TOKENS = ("self", "return", "None", "def ", "import", "raise", "elif", "True", "False", "string",
                "value", "result", "path", "name", "class ", "lambda")
DTYPES = ("float32", "bfloat16")
SHARD_SIZE = "100KB"  # splits the fp32 base (~1 MB) into several shards


def _config(family: str):
    """The family's config: small, but each family's distinguishing structure kept."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, max_position_embeddings=256, initializer_range=0.08)
    if family == "llama":  # GQA, untied lm_head
        return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "llama-tied":  # GQA, lm_head tied to embed_tokens
        return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "qwen2":  # q/k/v biases; tied, as the small Qwen2 models are
        return tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "mistral":  # GQA, sliding window longer than the sequences
        return tf.MistralConfig(**common, num_key_value_heads=2, head_dim=HEAD_DIM, sliding_window=128,
                                tie_word_embeddings=False)
    if family == "gemma":  # MQA, tied, embeddings scaled by sqrt(hidden)
        return tf.GemmaConfig(**common, num_key_value_heads=1, head_dim=HEAD_DIM, tie_word_embeddings=True,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**common, num_key_value_heads=2, tie_word_embeddings=False,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":  # Conv1D layers (weight stored in x out), lm_head tied to wte
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=HEADS,
                             n_positions=256, initializer_range=0.08, tie_word_embeddings=True,
                             bos_token_id=1, eos_token_id=2)
    raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


FAMILIES = ("llama", "llama-tied", "qwen2", "mistral", "gemma", "phi3", "gpt2")
TIED = {"llama-tied", "qwen2", "gemma", "gpt2"}


# --- text and tokenizer --------------------------------------------------------------


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus(role: str, max_chars: int = 400_000) -> str:
    """Python sources of the standard library, split by the module's first letter per role."""
    letters = {"base": "abcdefghijklm", "ft1": "nopqrs", "ft1-vocab": "nopqrs", "ft2": "tuvwxyz"}[role]
    parts, size = [], 0
    for path in sorted(_stdlib().glob("*.py")):
        if path.name[0].lower() not in letters:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


def _train_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus("base", 200_000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return fast


def _batches(tokenizer, role: str, steps: int, seed: int):
    import torch

    ids = torch.tensor(tokenizer(corpus(role))["input_ids"], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - SEQ - 1, (BATCH,), generator=gen)
        yield torch.stack([ids[s:s + SEQ] for s in starts.tolist()])


# --- training and saving ------------------------------------------------------------------


def _train(model, tokenizer, role: str, seed: int) -> list[float]:
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR[role], weight_decay=0.01)
    losses = []
    for batch in _batches(tokenizer, role, STEPS[role], seed):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    model.eval()
    return losses


def _save(model, tokenizer, out: Path, dtype: str, sharded: bool = False) -> None:
    import torch

    model = model.to(getattr(torch, dtype))
    model.config.torch_dtype = dtype
    model.save_pretrained(out, safe_serialization=True, **({"max_shard_size": SHARD_SIZE} if sharded else {}))
    tokenizer.save_pretrained(out)
    model.to(torch.float32)


def _build_family(family: str, out: Path) -> None:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    tokenizer = _train_tokenizer(out / "_tokenizer")
    model = transformers.AutoModelForCausalLM.from_config(_config(family))
    log = {"base": _train(model, tokenizer, "base", seed=1)}
    for dtype in DTYPES:
        _save(model, tokenizer, out / _name("base", dtype), dtype)
    _save(model, tokenizer, out / _name("base", "float32", sharded=True), "float32", sharded=True)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, role in enumerate(ROLES[1:], start=2):
        model.load_state_dict(base_state)
        log[role] = _train(model, tokenizer, role, seed=i)
        for dtype in DTYPES:
            _save(model, tokenizer, out / _name(role, dtype), dtype)
    model.load_state_dict(base_state)
    tokenizer.add_tokens(list(ADDED_TOKENS))  # as a user adds tokens before fine-tuning
    model.resize_token_embeddings(len(tokenizer))  # new rows: the mean of the old ones (transformers' default)
    log["ft1-vocab"] = _train(model, tokenizer, "ft1-vocab", seed=len(ROLES) + 1)
    for dtype in DTYPES:
        _save(model, tokenizer, out / _name("ft1-vocab", dtype), dtype)
    (out / "losses.txt").write_text("".join(f"{r}: {v[0]:.3f} -> {v[-1]:.3f}\n" for r, v in log.items()))
    shutil.rmtree(out / "_tokenizer")


def _name(role: str, dtype: str, sharded: bool = False) -> str:
    return f"{role}-{'f32' if dtype == 'float32' else 'bf16'}{'-sharded' if sharded else ''}"


# --- the cache ------------------------------------------------------------------------------


def cache_root() -> Path:
    import torch
    import transformers

    key = hashlib.sha256(Path(__file__).read_bytes() + f"{torch.__version__}|{transformers.__version__}".encode())
    root = Path(os.environ.get("DCM_TEST_CACHE") or Path.home() / ".cache" / "dcm-tests")
    return root / f"tiny-llms-{key.hexdigest()[:16]}"


def family_dir(family: str) -> Path:
    """The folder of every role and dtype of ``family``, built on first use (under a lock)."""
    _config(family)  # unknown families fail before any lock or build
    root = cache_root()
    done = root / family
    if done.is_dir():
        return done
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{family}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_dir():
            started = time.perf_counter()
            tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=root))
            try:
                _build_family(family, tmp)
                tmp.rename(done)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            print(f"tiny_llms: built {family} in {time.perf_counter() - started:.1f} s -> {done}", file=sys.stderr)
    return done


def model_dir(family: str, role: str = "base", dtype: str = "float32", sharded: bool = False) -> Path:
    """A saved model directory: ``role`` in base/ft1/ft2/ft1-vocab, ``dtype`` float32/bfloat16;
    ``sharded`` exists for the fp32 base only."""
    if role not in ROLES + VOCAB_ROLES or dtype not in DTYPES or (sharded and (role, dtype) != ("base", "float32")):
        raise ValueError(f"no tiny model {family}/{_name(role, dtype, sharded)}")
    return family_dir(family) / _name(role, dtype, sharded)


def token_ids(n: int, seq: int, seed: int = 0, role: str = "ft1") -> "list[list[int]]":
    """``n`` sequences of ``seq`` token ids of held-out text (the tail of ``role``'s corpus)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir(FAMILIES[0]))
    ids = tok(corpus(role)[-40_000:])["input_ids"]
    step = max(1, (len(ids) - seq) // max(n, 1))
    return [ids[(seed + i * step) % (len(ids) - seq):][:seq] for i in range(n)]


if __name__ == "__main__":
    for fam in sys.argv[1:] or FAMILIES:
        print(family_dir(fam))
