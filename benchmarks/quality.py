#!/usr/bin/env python3
"""Function-space quality of compressed fine-tunes: how much of the fine-tune survives.

Weight errors say little about what a user sees, so this benchmark measures
the compressed model's *outputs*.  On a fixed set of English sentences it
embeds with three kinds of model (transformers ``AutoModel``, the fine-tune's
tokenizer, mean pooling over the attention mask, fp32):

- ``e_base``: the base model;
- ``e_ft``: the fine-tune;
- ``e_c``: the fine-tune decoded from a compressed .dcm file.

and reports the share of the base→fine-tune distance that the compressed
model recovers::

    gain = 1 − mean_i ‖e_c,i − e_ft,i‖ / mean_i ‖e_base,i − e_ft,i‖

1.0 means the outputs of the fine-tune are reproduced exactly; 0.0 means the
compressed model is no closer to the fine-tune than the base is.

Sentences: the first lines of the docstrings of public functions and classes
of a fixed list of standard-library modules (parsed with ``ast``, never
imported; complete sentences of 30..160 characters, sorted, deduplicated,
evenly sampled).  The GPTQ rows calibrate on a different text, the topic
pages of ``pydoc_data.topics``, so the evaluation text is never seen during
encoding.

Rows, for each ``--ratios`` value (file sizes always come from ``dcm.info``);
every row is a file that ``dcm.encode`` wrote at that ratio:

- ``rtn``:     Delta-CoMe, the paper's fixed 8/3/2-bit recipe and min–max grids, round-to-nearest;
- ``gptq``:    the same recipe, quantized with GPTQ on the calibration statistics;
- ``rd``:      rate–distortion bit allocation over the whole file, min–max grids, round-to-nearest
  (data-free), each blob in the smallest of raw, zstd and rANS;
- ``rd-zstd``: the same with no rANS blob (``entropy=False``): the entropy-coding ablation;
- ``rd-mse``:  each quantization group's grid clipped for least squared error (``clip="mse"``);
- ``rd-rot``:  the singular vectors stored rotated (``rotation="hadamard"``, lowrank-rotated records);
- ``rd-gptq``, ``rd-gptq-zstd``, ``rd-gptq-mse``, ``rd-gptq-rot``: the same four, quantized with GPTQ
  (the clip search weighted by the input Hessian's diagonal);
- ``default``: ``delta-come`` with no option (what a user gets);
- ``impart``:  ImPart, sparse singular vectors in float16;
- ``impart-qt``, ``impart-qt-gptq``: ImPart-Qt, the sparse vectors quantized 8/3/2 (RTN, GPTQ);
- ``impart-qt-rd``, ``impart-qt-rd-gptq``: the same with the budget shared by rate–distortion (``--alloc rd``);
- ``lowrank``: the top-k singular triplets in float16;
- ``dare``:    random drop with rescale, survivors in float16;
- ``bitdelta``: sign bits and a scale per row (the rows with the largest scales, under a ratio);
- ``lossless`` (plumbing check): the lossless method; gain 1, error 0.

After the table, two comparisons: whether ImPart at ratio r reaches the gain
of DARE and low-rank at 2r (the ImPart paper's claim), and ImPart-Qt against
Delta-CoMe at the same ratio (the bytes of both files are in the lines).

Columns: file bytes; bits per parameter of the whole file; bits per parameter
of the coded tensors only (the lossy records; for a file without any, the
2-D float matrices a lossy method would code); the mean relative Frobenius
error ‖Δ̂ − Δ‖ / ‖Δ‖ over those tensors (fp64); the gain; the seconds ``dcm.encode``
took, and those of the whole row (encode, decode, embed).

    python benchmarks/quality.py                                   # every row, 1/8 .. 1/64
    python benchmarks/quality.py --rows lossless --ratios 1/16     # plumbing only
    python benchmarks/quality.py --rows impart dare lowrank --json out/quality/rows.json
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import dcm
import numpy as np
from dcm.checkpoint import Checkpoint
from dcm.dtypes import to_float32
from dcm.errors import DcmError, UsageError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE = ROOT / "data" / "real" / "base"
DEFAULT_FT = ROOT / "data" / "real" / "finetune"
EXACT_KINDS = {"dense-delta", "full", "removed"}  # every other record kind is lossy
BATCH, MAX_LENGTH = 32, 128
CALIB_TOKENS, CALIB_SEQ_LEN = 65536, 128

# Fixed so the sentence set only changes with the Python version's own sources.
STDLIB_MODULES = (
    "argparse", "base64", "calendar", "collections", "configparser", "contextlib", "csv",
    "dataclasses", "datetime", "difflib", "email.message", "email.utils", "enum", "fractions",
    "ftplib", "functools", "gzip", "heapq", "http.client", "imaplib", "inspect", "ipaddress",
    "logging", "mailbox", "ntpath", "optparse", "pathlib", "pickle", "platform", "poplib",
    "posixpath", "queue", "random", "shutil", "smtplib", "socket", "socketserver", "ssl",
    "statistics", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "traceback",
    "turtle", "typing", "unittest.case", "urllib.parse", "urllib.request", "weakref", "zipfile",
)


# --- texts --------------------------------------------------------------------------


def _module_source(module: str) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = stdlib / (module.replace(".", "/") + ".py")
    return path if path.exists() else stdlib / module.replace(".", "/") / "__init__.py"


def _is_sentence(line: str) -> bool:
    # A first line that ends mid-sentence (a wrapped summary) reads badly: keep whole ones.
    return 30 <= len(line) <= 160 and line[0].isupper() and line.endswith(".") and " " in line


def stdlib_sentences(count: int) -> list[str]:
    """``count`` docstring first lines of STDLIB_MODULES, evenly spread over the sorted set."""
    found = set()
    for module in STDLIB_MODULES:
        tree = ast.parse(_module_source(module).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and not node.name.startswith("_") and (doc := ast.get_docstring(node)):
                line = doc.strip().splitlines()[0].strip()
                if _is_sentence(line):
                    found.add(line)
    pool = sorted(found)
    if len(pool) < count:
        raise SystemExit(f"only {len(pool)} stdlib sentences found, {count} asked for")
    return [pool[i * len(pool) // count] for i in range(count)]


def write_calibration_text(path: Path) -> Path:
    """The pydoc topic pages, one after the other (a text the evaluation never uses)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


# --- embeddings ---------------------------------------------------------------------


def tokenize(tokenizer, sentences: list[str]) -> list[dict]:
    return [tokenizer(sentences[i:i + BATCH], padding=True, truncation=True, max_length=MAX_LENGTH,
                      return_tensors="pt") for i in range(0, len(sentences), BATCH)]


def load_model(model_dir):
    import torch
    import transformers

    return transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()


def embed(model, batches: list[dict]) -> np.ndarray:
    """Mean of the last hidden states over the real tokens (sentence-transformers style), fp64."""
    import torch

    out = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).double().numpy())
    return np.concatenate(out)


def mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b, axis=1).mean())


# --- the shared state of one run ------------------------------------------------------


@dataclass
class Row:
    label: str
    ratio: str
    file_bytes: int
    bits_per_param: float
    bits_per_param_coded: float | None
    coded_tensors: int
    rel_error: float | None
    gain: float
    seconds: float
    encode_seconds: float
    call: str
    note: str = ""


@dataclass
class Run:
    base: Path
    ft: Path
    out: Path
    batches: list
    e_ft: np.ndarray
    baseline: float  # mean ‖e_base − e_ft‖
    calib_tokens: int
    keep: bool
    files: dict = field(default_factory=dict)  # (label, ratio) -> encoded path
    encode_seconds: dict = field(default_factory=dict)  # (label, ratio) -> seconds dcm.encode took
    stats: Path | None = None

    def gain(self, e_c: np.ndarray) -> float:
        return 1 - mean_distance(e_c, self.e_ft) / self.baseline


def calibration_stats(run: Run) -> Path:
    """The fine-tune's calibration statistics, computed once and reused while the text is unchanged.

    The fine-tune's layer inputs are the ones whose outputs the compressed
    model must keep.
    """
    from dcm.calibrate import calibrate, load_stats

    if run.stats is not None:
        return run.stats
    text = write_calibration_text(run.out / "calibration.txt")
    path = run.out / "calibration.safetensors"
    digest = hashlib.sha256(text.read_bytes()).hexdigest()
    try:
        meta = load_stats(path).metadata
        fresh = meta.get("text_sha256") == digest and meta.get("tokens") == str(run.calib_tokens) \
            and meta.get("model") == run.ft.resolve().name
    except DcmError:
        fresh = False
    if not fresh:
        started = time.perf_counter()
        report = calibrate(run.ft, text, path, max_tokens=run.calib_tokens, seq_len=CALIB_SEQ_LEN,
                           overwrite=True, progress=sys.stderr.isatty())
        print(f"  calibrated {run.ft} on {report.tokens} tokens of {text.name}: "
              f"{report.layers} tensors in {time.perf_counter() - started:.1f} s")
    run.stats = path
    return path


# --- measuring a file ------------------------------------------------------------------


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


def encode(run: Run, label: str, method: str, ratio: str | None, options: dict) -> tuple[Path, str]:
    """The encoded file of a row (cached within the run) and the call that made it."""
    path = run.out / f"{_slug(label)}-{_slug(ratio or 'none')}.dcm"
    kwargs = {"method": method, "overwrite": True}
    if ratio is not None:
        kwargs["ratio"] = ratio
    options = dict(options)
    if "entropy" in options:  # an argument of encode, not a method option
        kwargs["entropy"] = options.pop("entropy")
    if options:
        if "options" not in inspect.signature(dcm.encode).parameters:
            raise UsageError(f"method {method!r}: this dcm.encode takes no options yet")
        kwargs["options"] = options
    call = f"dcm.encode(base, ft, {path.name!r}, " + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    if (label, ratio) not in run.files:
        started = time.perf_counter()
        dcm.encode(run.base, run.ft, path, **kwargs)
        run.files[(label, ratio)] = path
        run.encode_seconds[(label, ratio)] = time.perf_counter() - started
    return run.files[(label, ratio)], call


def coded_records(info: dict) -> list[dict]:
    """The records a lossy method coded; for a file with none, the 2-D float matrices."""
    lossy = [r for r in info["records"] if r["kind"] not in EXACT_KINDS]
    if lossy:
        return lossy
    return [r for r in info["records"] if r["kind"] != "removed" and len(r["shape"]) == 2
            and r["dtype"] in ("F32", "F16", "BF16")]


def _floats(ckpt: Checkpoint, name: str) -> np.ndarray:
    return to_float32(ckpt.read(name), ckpt.info(name).dtype).astype(np.float64)


def relative_errors(run: Run, decoded: Path, names: list[str]) -> float | None:
    """Mean over ``names`` of ‖W_decoded − W_ft‖ / ‖W_ft − W_base‖ (= ‖Δ̂ − Δ‖ / ‖Δ‖), fp64."""
    errors = []
    with Checkpoint(run.base) as base, Checkpoint(run.ft) as ft, Checkpoint(decoded) as dec:
        for name in names:
            w_ft = _floats(ft, name)
            delta = np.linalg.norm(w_ft - _floats(base, name))
            if delta > 0:
                errors.append(np.linalg.norm(_floats(dec, name) - w_ft) / delta)
    return float(np.mean(errors)) if errors else None


def _bits_coded(records: list[dict]) -> float | None:
    """Bits per parameter of ``records``: index entries, payloads and the padding before them."""
    params = sum(r["params"] for r in records)
    spent = sum(r["total_bytes"] + r.get("padding_bytes", 0) for r in records)
    return 8 * spent / params if params else None


def file_row(run: Run, label: str, method: str, ratio: str | None, options: dict) -> Row:
    """Encode, decode, measure sizes with dcm.info, the weight error and the gain."""
    started = time.perf_counter()
    path, call = encode(run, label, method, ratio, options)
    info = dcm.info(path)
    coded = coded_records(info)
    with tempfile.TemporaryDirectory(dir=run.out, prefix="decoded-") as tmp:
        decoded = Path(tmp) / "model"
        dcm.decode(path, run.base, decoded, overwrite=True)
        rel = relative_errors(run, decoded, [r["name"] for r in coded])
        gain = run.gain(embed(load_model(decoded), run.batches))
        if run.keep:
            shutil.copytree(decoded, run.out / f"{path.stem}.decoded", dirs_exist_ok=True)
    totals = info["totals"]
    return Row(label, ratio or "-", totals["file_bytes"], totals["bits_per_param"], _bits_coded(coded),
               len(coded), rel, gain, time.perf_counter() - started, run.encode_seconds[(label, ratio)], call)


# --- the rows ------------------------------------------------------------------------------

# label -> (method, options, calibrated): every row is a file written by dcm.encode.  The delta-come
# rows spell out each choice (allocation, grids) so that each step of issue 18 has an ablation row.
METHOD_ROWS = {
    "rtn": ("delta-come recipe", "delta-come", {"alloc": "recipe"}, False),  # the paper: recipe, min-max
    "gptq": ("delta-come recipe+gptq", "delta-come", {"alloc": "recipe"}, True),
    "rd-zstd": ("delta-come rd zstd only", "delta-come", {"alloc": "rd", "entropy": False}, False),
    "rd": ("delta-come rd", "delta-come", {"alloc": "rd"}, False),
    "rd-mse": ("delta-come rd mse-clip", "delta-come", {"alloc": "rd", "clip": "mse"}, False),
    "rd-rot": ("delta-come rd rotated", "delta-come", {"alloc": "rd", "rotation": "hadamard"}, False),
    "rd-gptq-zstd": ("delta-come rd+gptq zstd only", "delta-come", {"alloc": "rd", "entropy": False}, True),
    "rd-gptq": ("delta-come rd+gptq", "delta-come", {"alloc": "rd"}, True),
    "rd-gptq-mse": ("delta-come rd+gptq mse-clip", "delta-come", {"alloc": "rd", "clip": "mse"}, True),
    "rd-gptq-rot": ("delta-come rd+gptq rotated", "delta-come", {"alloc": "rd", "rotation": "hadamard"}, True),
    "default": ("delta-come default", "delta-come", {}, False),
    "impart": ("impart", "impart", {}, False),
    "impart-qt": ("impart-qt rtn", "impart-qt", {"alloc": "recipe"}, False),  # the paper: shares by size
    "impart-qt-gptq": ("impart-qt gptq", "impart-qt", {"alloc": "recipe"}, True),
    "impart-qt-rd": ("impart-qt rd", "impart-qt", {"alloc": "rd"}, False),
    "impart-qt-rd-gptq": ("impart-qt rd+gptq", "impart-qt", {"alloc": "rd"}, True),
    "lowrank": ("lowrank fp16", "lowrank", {}, False),
    "dare": ("dare", "dare", {}, False),
    "bitdelta": ("bitdelta", "bitdelta", {}, False),
}


def method_row(key: str):
    label, method, options, calibrated = METHOD_ROWS[key]

    def row(run: Run, ratio: str) -> Row:
        opts = dict(options)
        if calibrated:
            opts["calibration"] = str(calibration_stats(run))
        return file_row(run, label, method, ratio, opts)
    return row


def row_lossless(run: Run, ratio: str) -> Row:
    return file_row(run, "lossless", "lossless", None, {})


ROWS = {**{key: method_row(key) for key in METHOD_ROWS}, "lossless": row_lossless}
RATIO_FREE = {"lossless"}  # run once, whatever --ratios says


# --- output --------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    headers = ["row", "ratio", "file bytes", "bits/param", "bits/param coded", "tensors",
               "rel err", "gain", "encode s", "seconds"]
    cells = [[r.label, r.ratio, str(r.file_bytes), _fmt(r.bits_per_param, ".4f"),
              _fmt(r.bits_per_param_coded, ".4f"), str(r.coded_tensors), _fmt(r.rel_error, ".4f"),
              _fmt(r.gain, ".4f"), f"{r.encode_seconds:.1f}", f"{r.seconds:.1f}"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def _ratio_value(text: str) -> Fraction | None:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def compare(rows: list[Row]) -> list[str]:
    """The two claims the table answers: ImPart at 2x the ratio vs DARE and low-rank; ImPart-Qt vs Delta-CoMe."""
    gain = {(r.label, _ratio_value(r.ratio)): r for r in rows}
    lines = []
    for (label, ratio), row in sorted(gain.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 0))):
        if label != "impart" or ratio is None:
            continue
        for other in ("dare", "lowrank fp16"):
            ref = gain.get((other, ratio * 2))
            if ref is not None:
                verdict = "reaches" if row.gain >= ref.gain else "does not reach"
                lines.append(f"impart at {row.ratio} (gain {row.gain:.4f}) {verdict} {other} at 2x the ratio, "
                             f"{ref.ratio} (gain {ref.gain:.4f})")
    for (label, ratio), row in sorted(gain.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 0))):
        if not label.startswith("impart-qt"):
            continue
        ref_label = "delta-come recipe+gptq" if label.endswith("gptq") else "delta-come recipe"
        ref = gain.get((ref_label, ratio))
        if ref is not None:
            lines.append(f"{label} at {row.ratio}: gain {row.gain:.4f} in {row.file_bytes} bytes; "
                         f"{ref_label}: {ref.gain:.4f} in {ref.file_bytes} bytes ({row.gain - ref.gain:+.4f})")
    return lines


def _environment() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "dcm": dcm.__version__}


# --- main ----------------------------------------------------------------------------------


def ensure_pair(base: Path, ft: Path) -> None:
    """Fetch the default real pair when it is missing; any other missing model is an error."""
    if base.is_dir() and ft.is_dir():
        return
    if (base, ft) == (DEFAULT_BASE, DEFAULT_FT):
        print("real pair missing: running scripts/fetch_real_pair.py", flush=True)
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_real_pair.py")],
                              check=False)
        if done.returncode == 0 and base.is_dir() and ft.is_dir():
            return
    raise SystemExit(f"model pair not found: {base} and {ft} must be model directories "
                     "(for the default pair run: python scripts/fetch_real_pair.py)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", nargs="+", default=["1/8", "1/16", "1/32", "1/64"])
    p.add_argument("--rows", nargs="+", default=[k for k in ROWS if k != "lossless"], choices=sorted(ROWS))
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "quality")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--base", type=Path, default=DEFAULT_BASE)
    p.add_argument("--finetune", type=Path, default=DEFAULT_FT)
    p.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS)
    p.add_argument("--keep", action="store_true", help="keep the decoded checkpoints under --out")
    args = p.parse_args(argv)
    if args.sentences < 1:
        p.error("--sentences must be positive")
    return args


def prepare(args) -> Run:
    from transformers import AutoTokenizer

    ensure_pair(args.base, args.finetune)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.finetune)
    batches = tokenize(tokenizer, stdlib_sentences(args.sentences))
    e_base, e_ft = embed(load_model(args.base), batches), embed(load_model(args.finetune), batches)
    return Run(args.base, args.finetune, args.out, batches, e_ft, mean_distance(e_base, e_ft),
               args.calib_tokens, args.keep)


def main(argv=None) -> int:
    args = parse_args(argv)
    print("$ " + shlex.join(["python", *sys.argv]) if argv is None else f"$ quality.main({argv!r})")
    started = time.perf_counter()
    run = prepare(args)
    print(f"{args.sentences} sentences; baseline mean ‖e_base − e_ft‖ = {run.baseline:.6f}")
    rows, failures = [], []
    for name in args.rows:
        for ratio in ([None] if name in RATIO_FREE else args.ratios):
            try:
                row = ROWS[name](run, ratio)
            except DcmError as e:
                failures.append(f"[{name} {ratio or '-'}] {type(e).__name__}: {e}")
                print(f"{failures[-1]} (row skipped)", flush=True)
                continue
            rows.append(row)
            print(f"[{row.label} {row.ratio}] {row.call}: gain {row.gain:.4f}, {row.seconds:.1f} s",
                  flush=True)
    print()
    print(format_table(rows))
    comparisons = compare(rows)
    if comparisons:
        print("\n" + "\n".join(comparisons))
    print(f"\nbaseline distance mean‖e_base − e_ft‖ = {run.baseline:.6f}; "
          f"total {time.perf_counter() - started:.1f} s")
    if args.json:
        report = {"command": shlex.join(["python", *sys.argv]), **_environment(),
                  "base": str(args.base), "finetune": str(args.finetune), "sentences": args.sentences,
                  "baseline_distance": run.baseline, "rows": [asdict(r) for r in rows],
                  "failures": failures}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
