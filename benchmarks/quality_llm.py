#!/usr/bin/env python3
"""Logit quality of compressed fine-tunes of tiny decoder-only LLMs, one row per family and method.

The real pair (``benchmarks/quality.py``) is one BERT; this checks that what
helps there helps on decoder-only LLMs of the major Hugging Face families too.
``tests/tiny_llms.py`` builds them (really trained: a base on some standard
library sources, a fine-tune ``ft1`` on others; cached outside the repository),
seven families: llama, llama-tied, qwen2, mistral, gemma, phi3, gpt2.

For each family, ratio and row, ``dcm.encode`` writes base → ft1 with the row's
method and options, ``dcm.decode`` rebuilds it, and on held-out token sequences
(the tail of ft1's text) the logits z of three models are compared:

- relative logit error ‖z_c − z_ft‖ / ‖z_base − z_ft‖ (Frobenius over every
  position and vocabulary entry): the share of the fine-tune's change of the
  logits that the compressed model misses (0 exact, 1 no better than the base);
- top-1 agreement: the share of positions whose most likely next token is the
  fine-tune's (the base's own agreement is printed per family for scale).

Rows are those of ``benchmarks/quality.py`` (same keys, same options), so a
step's ablation reads the same on both.  The means over the families close
each ratio.

    python benchmarks/quality_llm.py                                   # default rows, 1/16 and 1/32
    python benchmarks/quality_llm.py --families llama gpt2 --rows rd-minmax rd --ratios 1/16
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import dcm  # noqa: E402
import tiny_llms  # noqa: E402
from quality import METHOD_ROWS  # noqa: E402

DEFAULT_ROWS = ["rtn", "rd-zstd", "rd", "rd-mse", "rd-rot"]
SEQUENCES, SEQ_LEN = 16, 64


def logits(model_dir: Path, ids) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.double().numpy()


def measure(family: str, rows: list[str], ratios: list[str], ids, out: Path) -> list[dict]:
    base, ft = tiny_llms.model_dir(family, "base"), tiny_llms.model_dir(family, "ft1")
    z_base, z_ft = logits(base, ids), logits(ft, ids)
    change = float(np.linalg.norm(z_base - z_ft))
    top_ft = z_ft.argmax(-1)
    base_top1 = float((z_base.argmax(-1) == top_ft).mean())
    results = []
    for ratio in ratios:
        for key in rows:
            label, method, options, calibrated = METHOD_ROWS[key]
            if calibrated:
                raise SystemExit(f"row {key!r} needs calibration statistics; not supported here")
            path = out / f"{family}-{key}-{ratio.replace('/', '_')}.dcm"
            started = time.perf_counter()
            options = dict(options)
            entropy = options.pop("entropy", True)  # an argument of encode, not a method option
            dcm.encode(base, ft, path, method=method, ratio=ratio, options=options, overwrite=True, entropy=entropy)
            seconds = time.perf_counter() - started
            with tempfile.TemporaryDirectory(dir=out) as tmp:
                dcm.decode(path, base, Path(tmp) / "model", overwrite=True)
                z_c = logits(Path(tmp) / "model", ids)
            results.append({"family": family, "row": label, "ratio": ratio,
                            "file_bytes": dcm.info(path)["totals"]["file_bytes"],
                            "rel_logit_error": float(np.linalg.norm(z_c - z_ft)) / change,
                            "top1": float((z_c.argmax(-1) == top_ft).mean()), "base_top1": base_top1,
                            "encode_seconds": seconds})
            r = results[-1]
            print(f"[{family} {label} {ratio}] rel logit error {r['rel_logit_error']:.4f}, top-1 {r['top1']:.4f} "
                  f"(base {base_top1:.4f}), {r['file_bytes']} B, encode {seconds:.1f} s", flush=True)
    return results


def format_table(results: list[dict]) -> str:
    headers = ["family", "row", "ratio", "file bytes", "rel logit err", "top-1", "base top-1", "encode s"]
    cells = [[r["family"], r["row"], r["ratio"], str(r["file_bytes"]), f"{r['rel_logit_error']:.4f}",
              f"{r['top1']:.4f}", f"{r['base_top1']:.4f}", f"{r['encode_seconds']:.1f}"] for r in results]
    means = {}
    for r in results:
        means.setdefault((r["row"], r["ratio"]), []).append(r)
    for (row, ratio), rs in means.items():
        cells.append(["mean", row, ratio, str(round(np.mean([r["file_bytes"] for r in rs]))),
                      f"{np.mean([r['rel_logit_error'] for r in rs]):.4f}", f"{np.mean([r['top1'] for r in rs]):.4f}",
                      f"{np.mean([r['base_top1'] for r in rs]):.4f}",
                      f"{np.mean([r['encode_seconds'] for r in rs]):.1f}"])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=list(tiny_llms.FAMILIES), choices=tiny_llms.FAMILIES)
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                   choices=sorted(k for k, v in METHOD_ROWS.items() if not v[3]))
    p.add_argument("--ratios", nargs="+", default=["1/16", "1/32"])
    p.add_argument("--out", type=Path, default=ROOT / "out" / "quality_llm")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    print("$ " + shlex.join(["python", *sys.argv]))
    args.out.mkdir(parents=True, exist_ok=True)
    ids = tiny_llms.token_ids(SEQUENCES, SEQ_LEN)
    results = []
    for family in args.families:
        results += measure(family, args.rows, args.ratios, ids, args.out)
    print()
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": shlex.join(["python", *sys.argv]), "rows": results},
                                        indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
