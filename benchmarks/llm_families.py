#!/usr/bin/env python3
"""Decoder-only families × checks: what tests/test_llm_families.py asserts, as measured numbers.

For each tiny family of ``tests/tiny_llms.py`` (really trained; built once and
cached outside the repository), on 3 held-out sequences of 24 tokens:

- ``lossless``: file bytes / fine-tune bytes, and whether the decoded checkpoint
  is bit-exact with identical logits;
- ``gain <method>``: 1 − ‖logits − ft‖ / ‖base − ft‖ of the decoded model at 1/16
  (1: the fine-tune, 0: the base), and delta-come's bits per coded parameter;
- ``packed`` / ``factors``: max |logit difference| of ``patch_model`` against the
  decoded model (torch backend); ``multi``: of ``patch_model_multi`` with two
  fine-tunes and the base in one batch (worst row); ``generate``: greedy tokens
  through the multi-patched model equal to each decoded model's (rows of 3);
- ``bf16 ft``: delta-come bytes of a bf16 fine-tune of the fp32 base over those of
  the fp32 pair (``adapted`` records; stored whole before, ~10x);
- ``vocab``: delta-come bytes of the resized-vocabulary fine-tune over the
  same-vocabulary one's.

    nice -n 10 python benchmarks/llm_families.py [FAMILY ...]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import dcm  # noqa: E402
import tiny_llms  # noqa: E402
from dcm.checkpoint import Checkpoint  # noqa: E402
from dcm.runtime import patch_model, patch_model_multi  # noqa: E402

METHODS = ("delta-come", "impart-qt", "impart", "lowrank", "dare", "bitdelta")
RATIO = "1/16"


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def tensors(path) -> dict:
    with Checkpoint(path) as ckpt:
        return {n: (ckpt.info(n).dtype, ckpt.read(n).tobytes()) for n in ckpt.names()}


def size(path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def family_row(family: str, work: Path) -> list[str]:
    md = tiny_llms.model_dir
    x = torch.tensor(tiny_llms.token_ids(3, 24))

    def coded(label, ft=md(family, "ft1"), base=md(family), **kw):
        out = work / f"{family}-{label}.dcm"
        dcm.encode(base, ft, out, **kw)
        dec = work / f"{family}-{label}"
        dcm.decode(out, base, dec)
        return out, dec

    exact, dec = coded("lossless")
    bit_exact = tensors(dec) == tensors(md(family, "ft1")) and torch.equal(
        logits(load(dec), x), logits(load(md(family, "ft1")), x))
    ft, base = logits(load(md(family, "ft1")), x), logits(load(md(family)), x)
    row = [family, f"{exact.stat().st_size / size(md(family, 'ft1')):.3f} {'exact' if bit_exact else 'DIFFERS'}"]
    files = {}
    for method in METHODS:
        path, dec = coded(method, method=method, ratio=RATIO)
        files[method] = (path, dec)
        g = 1 - float((logits(load(dec), x) - ft).norm() / (base - ft).norm())
        row.append(f"{g:.3f}")
    row.append(f"{dcm.info(files['delta-come'][0])['totals']['compressed']['bits_per_param']:.3f}")
    (p1, d1) = files["delta-come"]
    p2, d2 = coded("ft2", ft=md(family, "ft2"), method="delta-come", ratio=RATIO)
    want1 = logits(load(d1), x)
    for hold in ("packed", "factors"):
        row.append(f"{float((logits(patch_model(load(md(family)), p1, backend='torch', hold=hold), x) - want1).abs().max()):.1e}")
    model = load(md(family))
    handle = patch_model_multi(model, [p1, p2, None], backend="torch")
    refs = [load(d1), load(d2), load(md(family))]
    which = [1, 2, 0]
    with handle.use(torch.tensor(which)):
        got = logits(model, x)
    row.append(f"{max(float((got[i:i + 1] - logits(refs[d], x[i:i + 1])).abs().max()) for i, d in enumerate(which)):.1e}")
    prompt = x[:, :12]
    with handle.use(torch.tensor(which)), torch.no_grad():
        out = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    same = 0
    for i, d in enumerate(which):
        with torch.no_grad():
            want = refs[d].generate(prompt[i:i + 1], max_new_tokens=10, do_sample=False, use_cache=True,
                                    pad_token_id=0)
        same += int(torch.equal(out[i:i + 1], want))
    row.append(f"{same}/3")
    bf16, _ = coded("bf16-ft", ft=md(family, "ft1", "bfloat16"), method="delta-come", ratio=RATIO)
    bf16_pair, _ = coded("bf16-pair", ft=md(family, "ft1", "bfloat16"), base=md(family, "base", "bfloat16"),
                         method="delta-come", ratio=RATIO)
    row.append(f"{bf16.stat().st_size / bf16_pair.stat().st_size:.2f}")
    vocab, _ = coded("vocab", ft=md(family, "ft1-vocab"), method="delta-come", ratio=RATIO)
    row.append(f"{vocab.stat().st_size / p1.stat().st_size:.2f}")
    return row


def main(argv=None) -> int:
    families = (argv if argv is not None else sys.argv[1:]) or list(tiny_llms.FAMILIES)
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    head = ["family", "lossless", *(f"gain {m}" for m in METHODS), "d-c bits/p", "packed", "factors", "multi",
            "generate", "bf16 ft", "vocab"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            rows.append(family_row(family, Path(tmp)))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
