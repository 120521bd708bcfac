#!/usr/bin/env python3
"""Encode speed of ``delta-come``: a whole ``dcm.encode`` against one SVD of the same delta.

An SVD of Δ is the one step Delta-CoMe cannot skip, so the yardstick of the
encoder is ``torch.linalg.svd`` of the same matrix, timed in the same run:
everything else an encode does (reading both checkpoints, Δ in float32,
hashing the base, planning, quantizing, bit-packing, zstd, writing the file)
should add little to it.  This benchmark:

1. writes a synthetic pair under a temporary directory (or ``--workdir``): a
   base ``--size`` × ``--size`` matrix (``--dtype``, N(0, 0.02²)) and its
   fine-tune, base + Δ with Δ = U·diag(s)·Vᵀ, U and V random orthogonal and a
   long-tailed spectrum s_i ∝ i^-``--decay`` (Δ's RMS is ``--delta-scale`` times
   the base's); rounding the fine-tune to ``--dtype`` adds a noise floor,
   as in real checkpoints;
2. times, alternating within each of ``--repeats`` rounds: ``torch.linalg.svd``
   of Δ in float32 (``full_matrices=False``), then ``dcm.encode`` of the pair
   (end to end, the file on disk) with ``svd=exact`` and ``svd=randomized`` at
   each ``--ratios`` value;
3. decodes each file once and measures its relative Frobenius error
   ‖Δ̂ − Δ‖ / ‖Δ‖ (Δ̂ = decoded fine-tune − base, Δ = fine-tune − base, fp64).

Columns: median seconds; "x SVD", the median over rounds of the encode's time
divided by the SVD's time of the same round (a paired ratio: load that drifts
during the run hits both sides); file bytes; bits per parameter of the file;
vectors kept (k); the relative error, and for ``randomized`` its increase over
``exact`` at the same ratio (the quality cost).  ``--max-ratio`` makes the run
fail when an exact encode takes longer than that many SVDs.

    python benchmarks/encode_speed.py                        # 4096 x 4096, 3 rounds
    python benchmarks/encode_speed.py --size 512 --repeats 1 --json out/encode_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import dcm
import numpy as np
from dcm.checkpoint import Checkpoint, CheckpointWriter, TensorInfo
from dcm.dtypes import from_float32, to_float32

NAME = "model.layers.0.mlp.down_proj.weight"
DTYPES = {"bf16": "BF16", "fp16": "F16"}
MODES = ("exact", "randomized")


# --- the synthetic pair ------------------------------------------------------------


def spectrum(size: int, decay: float) -> np.ndarray:
    """s_i = i^-decay, i = 1..size (float64)."""
    return np.arange(1, size + 1, dtype=np.float64) ** -decay


def generate(workdir: Path, size: int, dtype: str, decay: float, delta_scale: float,
             seed: int) -> tuple[Path, Path]:
    """Write the model directories base/ and finetune/ (one ``size`` x ``size`` matrix) in workdir."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(size, size, generator=gen) * 0.02
    u = torch.linalg.qr(torch.randn(size, size, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(size, size, generator=gen))[0]
    delta = (u * torch.from_numpy(spectrum(size, decay)).float()) @ v.T
    delta *= delta_scale * base.norm() / delta.norm()
    info = [TensorInfo(NAME, dtype, (size, size), size * size * 2)]
    paths = []
    for label, values in (("base", base), ("finetune", base + delta)):
        path = workdir / label
        with CheckpointWriter(path, info, overwrite=True) as w:
            w.write(NAME, from_float32(values.numpy(), dtype))
        paths.append(path)
    return tuple(paths)


def true_delta(base: Path, ft: Path) -> tuple[np.ndarray, np.ndarray]:
    """(Δ = float32(ft) − float32(base), the base's storage array), as the encoder sees them."""
    with Checkpoint(base) as b, Checkpoint(ft) as f:
        dtype = b.info(NAME).dtype
        base_array = b.read(NAME)
        return to_float32(f.read(NAME), dtype) - to_float32(base_array, dtype), base_array


# --- measuring -----------------------------------------------------------------------


@dataclass
class Row:
    label: str
    svd: str  # "-" for the reference SVD
    ratio: str
    seconds: float  # median over rounds
    seconds_all: list
    x_svd: float  # median over rounds of seconds / the round's SVD seconds
    file_bytes: int | None = None
    bits_per_param: float | None = None
    rank: int | None = None
    rel_error: float | None = None
    error_cost: float | None = None  # rel_error − rel_error of exact at this ratio


def warm_up() -> None:
    """First calls into torch's linear algebra load and initialize it: keep that out of round 1."""
    import torch

    a = torch.randn(64, 64)
    torch.linalg.svd(a, full_matrices=False)
    torch.linalg.qr(a)
    a @ a


def time_svd(delta) -> float:
    import torch

    t = torch.from_numpy(delta)
    started = time.perf_counter()
    torch.linalg.svd(t, full_matrices=False)
    return time.perf_counter() - started


def time_encode(base: Path, ft: Path, out: Path, ratio: str, svd: str) -> float:
    started = time.perf_counter()
    dcm.encode(base, ft, out, method="delta-come", ratio=ratio, options={"svd": svd}, overwrite=True)
    return time.perf_counter() - started


def file_quality(path: Path, delta: np.ndarray, base_array: np.ndarray) -> tuple[int, int, float]:
    """(file bytes, vectors kept, ‖Δ̂ − Δ‖ / ‖Δ‖ of the decoded fine-tune)."""
    with dcm.open(path) as f:
        groups = f.record(NAME).params["groups"]
        decoded = f.delta(NAME, base_array).astype(np.float64)
    rel = float(np.linalg.norm(decoded - delta) / np.linalg.norm(delta.astype(np.float64)))
    return path.stat().st_size, groups[-1][1] if groups else 0, rel


def run(args, workdir: Path) -> list[Row]:
    started = time.perf_counter()
    base, ft = generate(workdir, args.size, DTYPES[args.dtype], args.decay, args.delta_scale, args.seed)
    delta, base_array = true_delta(base, ft)
    print(f"pair: {args.dtype} {args.size} x {args.size}, s_i ∝ i^-{args.decay:g}, "
          f"‖Δ‖/‖W‖ = {args.delta_scale:g}; generated in {time.perf_counter() - started:.1f} s", flush=True)
    warm_up()
    jobs = [(ratio, mode) for ratio in args.ratios for mode in args.svd]
    svd_times, enc_times = [], {job: [] for job in jobs}
    files = {job: workdir / f"{job[1]}-{job[0].replace('/', '_')}.dcm" for job in jobs}
    for r in range(args.repeats):
        svd_times.append(time_svd(delta))
        print(f"round {r + 1}/{args.repeats}: torch.linalg.svd {svd_times[-1]:.2f} s", flush=True)
        for job in jobs:
            enc_times[job].append(time_encode(base, ft, files[job], *job))
            print(f"round {r + 1}/{args.repeats}: encode {job[1]} {job[0]} {enc_times[job][-1]:.2f} s "
                  f"({enc_times[job][-1] / svd_times[-1]:.3f} x SVD)", flush=True)
    params = args.size * args.size
    rows = [Row("torch.linalg.svd", "-", "-", statistics.median(svd_times), svd_times, 1.0)]
    exact_error = {}
    for job in jobs:
        ratio, mode = job
        times = enc_times[job]
        size, rank, rel = file_quality(files[job], delta, base_array)
        if mode == "exact":
            exact_error[ratio] = rel
        rows.append(Row("dcm.encode delta-come", mode, ratio, statistics.median(times), times,
                        statistics.median(t / s for t, s in zip(times, svd_times)),
                        size, 8 * size / params, rank, rel))
    for row in rows[1:]:
        if row.svd != "exact" and row.ratio in exact_error:
            row.error_cost = row.rel_error - exact_error[row.ratio]
    return rows


# --- output --------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    headers = ["step", "svd", "ratio", "seconds", "x SVD", "file bytes", "bits/param", "k",
               "rel err", "err - exact"]
    cells = [[r.label, r.svd, r.ratio, f"{r.seconds:.2f}", f"{r.x_svd:.3f}", _fmt(r.file_bytes, "d"),
              _fmt(r.bits_per_param, ".4f"), _fmt(r.rank, "d"), _fmt(r.rel_error, ".4f"),
              _fmt(r.error_cost, "+.4f")] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def _environment() -> dict:
    import os

    import torch

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "dcm": dcm.__version__,
            "machine": platform.machine()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="rows = columns of the matrix (default 4096)")
    p.add_argument("--ratios", nargs="+", default=["1/16", "1/32"],
                   help="delta-come ratios (space- or comma-separated; default 1/16 1/32)")
    p.add_argument("--svd", nargs="+", choices=MODES, default=list(MODES), help="encoder SVD modes to time")
    p.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported (default 3)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--decay", type=float, default=0.8, help="s_i ∝ i^-decay (default 0.8)")
    p.add_argument("--delta-scale", type=float, default=0.05, help="‖Δ‖ / ‖W_base‖ (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--max-ratio", type=float,
                   help="exit 1 if an exact encode takes more than this many SVDs (e.g. 1.25)")
    p.add_argument("--workdir", type=Path, help="keep the pair and the files here (default: a temporary dir)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    args.ratios = [r for item in args.ratios for r in item.split(",") if r]
    if args.size < 2 or args.repeats < 1:
        p.error("--size must be at least 2 and --repeats at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print("$ " + shlex.join(["python", *sys.argv]) if argv is None else f"$ encode_speed.main({argv!r})")
    env = _environment()
    print(f"torch {env['torch']} ({env['torch_threads']} threads, {env['cpus']} CPUs), numpy {env['numpy']}")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir, cleanup = args.workdir, None
    else:
        workdir = cleanup = Path(tempfile.mkdtemp(prefix="dcm-encode-speed-"))
    try:
        rows = run(args, workdir)
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
    print()
    print(format_table(rows))
    slow = [r for r in rows if r.svd == "exact" and args.max_ratio is not None and r.x_svd > args.max_ratio]
    if args.json:
        report = {"command": shlex.join(["python", *sys.argv]), **env, "size": args.size,
                  "dtype": args.dtype, "decay": args.decay, "delta_scale": args.delta_scale,
                  "repeats": args.repeats, "seed": args.seed, "rows": [asdict(r) for r in rows]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for r in slow:
        print(f"encode_speed: FAIL: exact encode at {r.ratio} took {r.x_svd:.3f} x the SVD "
              f"> {args.max_ratio:g}", file=sys.stderr)
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
