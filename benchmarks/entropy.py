#!/usr/bin/env python3
"""Lossless file size and encode time with and without the ``rans`` blob encoding (spec 8.2).

On a model pair (default: the real pair of ``data/real``), in fp32 as it ships
and in a bfloat16 cast of both models, ``dcm.encode`` writes the lossless file
four ways:

- ``zstd-3``:        zstd at level 3, no rANS (``entropy=False``): dcm before issue 18;
- ``zstd-3+rans``:   each blob the smallest of raw, zstd level 3 and rANS;
- ``default``:       ``dcm encode`` with no option: byte planes at zstd level 1, each blob the
                     smallest of raw, zstd and rANS;
- ``zstd-19``:       zstd at level 19, no rANS: the size to approach.

For each it prints the file bytes, the size relative to ``zstd-19``, the encode
seconds (median of ``--repeats`` runs, interleaved so that load on a shared
machine hits every row alike) and the blobs each encoding won; then the decode
seconds of the zstd-3+rans file against the zstd-3 one (``dcm.decode``, same
interleaving).  The issue's target: zstd-3+rans within 1.5 % of zstd-19's size
at zstd-3's encode speed.

    python benchmarks/entropy.py                     # real pair, fp32 and bf16
    python benchmarks/entropy.py --dtypes bf16 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dcm  # noqa: E402
from dcm import rans  # noqa: E402
from dcm.checkpoint import Checkpoint  # noqa: E402

# row -> (zstd level, entropy): None is dcm's default levels (3 for packed codes, 1 for byte planes)
ROWS = {"zstd-3": (3, False), "zstd-3+rans": (3, True), "default": (None, True), "zstd-19": (19, False)}


def bf16_copy(src: Path, dst: Path) -> Path:
    """A bfloat16 cast of every float32 tensor of ``src`` (nearest-even), other tensors as they are."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    with Checkpoint(src) as ckpt:
        for name in ckpt.names():
            t = torch.from_numpy(np.array(ckpt.read(name)))
            tensors[name] = t.to(torch.bfloat16) if t.dtype == torch.float32 else t
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(base: Path, ft: Path, out: Path, repeats: int) -> dict:
    paths = {row: out / f"{row}.dcm" for row in ROWS}
    times = {row: [] for row in ROWS}
    for _ in range(repeats):
        for row, (level, entropy) in ROWS.items():
            times[row].append(timed(lambda: dcm.encode(base, ft, paths[row], zstd_level=level, entropy=entropy,
                                                       overwrite=True)))
    decode = {row: [] for row in ("zstd-3", "zstd-3+rans")}
    for _ in range(repeats):
        for row in decode:
            with tempfile.TemporaryDirectory(dir=out) as tmp:
                decode[row].append(timed(lambda: dcm.decode(paths[row], base, Path(tmp) / "m")))
    result = {}
    for row in ROWS:
        info = dcm.info(paths[row])
        result[row] = {"file_bytes": info["totals"]["file_bytes"], "encode_s": statistics.median(times[row]),
                       "encodings": {k: v["blobs"] for k, v in info["encodings"].items()},
                       "version": info["header"]["version"]}
    for row, t in decode.items():
        result[row]["decode_s"] = statistics.median(t)
    return result


def show(dtype: str, result: dict) -> None:
    ref = result["zstd-19"]["file_bytes"]
    print(f"\n{dtype}")
    print(f"  {'row':<12} {'file bytes':>12} {'vs zstd-19':>10} {'encode s':>9} {'decode s':>9}  blobs won")
    for row, r in result.items():
        dec = f"{r['decode_s']:9.2f}" if "decode_s" in r else f"{'-':>9}"
        won = ", ".join(f"{k} {v}" for k, v in r["encodings"].items())
        print(f"  {row:<12} {r['file_bytes']:>12} {100 * (r['file_bytes'] / ref - 1):+9.2f}% "
              f"{r['encode_s']:9.2f} {dec}  {won} (format {r['version']})")
    z3, ent = result["zstd-3"], result["zstd-3+rans"]
    print(f"  rans saves {100 * (1 - ent['file_bytes'] / z3['file_bytes']):.2f}% of the zstd-3 file, "
          f"encode time x{ent['encode_s'] / z3['encode_s']:.2f}, decode time x{ent['decode_s'] / z3['decode_s']:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=ROOT / "data" / "real" / "base")
    p.add_argument("--finetune", type=Path, default=ROOT / "data" / "real" / "finetune")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "entropy")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    print("$ " + shlex.join(["python", *sys.argv]))
    if not rans.available():
        raise SystemExit("the native rANS coder (libhtscodecs) is not installed: bash scripts/setup.sh")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {}
    for dtype in args.dtypes:
        base, ft = args.base, args.finetune
        if dtype == "bf16":
            base = bf16_copy(args.base, args.out / "bf16-base")
            ft = bf16_copy(args.finetune, args.out / "bf16-finetune")
        report[dtype] = measure(base, ft, args.out, args.repeats)
        show(dtype, report[dtype])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
