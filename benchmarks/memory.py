#!/usr/bin/env python3
"""Peak memory of ``dcm encode``, ``decode`` and ``verify`` on a synthetic ~2 GB bf16 pair.

dcm promises to encode and decode one tensor at a time, so its peak resident
memory should stay near a few copies of the largest tensor, far below the size
of the checkpoint.  This benchmark:

1. writes a synthetic base checkpoint (bf16 matrices of 8192 columns, a few
   1-D norms, an f32 vector, an int64 buffer only the base has) and a fine-tune
   (the base's bf16 bit patterns nudged by a few units in the last place, plus
   a tensor only the fine-tune has) under ``--workdir``, tensor by tensor with
   ``dcm.checkpoint.CheckpointWriter`` so generation stays low-memory too;
2. runs ``dcm encode --threads 1``, ``dcm encode`` (the default: a tensor per core
   at once), ``dcm decode`` and ``dcm verify --base`` (the real
   command-line tool), each in a fresh process, and takes its peak RSS (the
   kernel's ru_maxrss of that one process, see ``measure``) and wall time;
3. checks the decoded checkpoint against the fine-tune, bit for bit;
4. prints a table and exits 1 if a step's peak exceeds its limit: the floor (an
   interpreter that imported dcm) + a slope × the largest tensor + a constant,
   per step (``STEP_LIMITS``), or ``--limit-mib`` (1024) in any case.  A step that
   holds one tensor more than it should, let alone the whole checkpoint, fails.

    python benchmarks/memory.py                 # ~2 GB, files removed afterwards
    python benchmarks/memory.py --size-gb 0.25 --keep
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dcm.checkpoint import Checkpoint, CheckpointWriter, TensorInfo
from dcm.parallel import default_threads

ROOT = Path(__file__).resolve().parent.parent
COLS = 8192
MAX_MATRIX_BYTES = 128 * 2**20  # one 8192 x 8192 bf16 matrix

# What each step may hold beyond the floor: (slope, constant MiB), the limit being
# floor + slope × largest tensor + constant.  Measured on the CI machine kind with
# --size-gb 0.5 (largest tensor L = 128 MiB), the peaks above the floor were:
#   encode --threads 1: 2.07 × L, 2.22 × L at 2 GiB  (the delta's byte planes, one plane compressed by zstd, and
#                                  the rANS coder's buffer of that plane's bound and its stream:
#                                  1.39 × L with --no-entropy)
#   decode:             1.51 × L  (the decoded tensor + one decompressed plane)
#   verify:             2.05 × L  (decode, plus re-encoding each rANS plane to check its end,
#                                  spec 8.2: the coder's buffer again)
# The limits add about 0.1 × L + 30 MiB to that: a step that holds one more tensor (at
# least 1.2 × L) fails.
# ``encode-1`` is ``dcm encode --threads 1``; ``encode`` is the default, which codes
# N tensors at once (N = dcm.parallel.default_threads(), one per core, at most 8), so
# it may hold N tensors' worth, plus results done before an earlier tensor's, which
# wait for their turn to be written: measured 3.4–4.1 × L with N = 2 (4.8 × L at 2 GiB),
# allowed N × 2.4 × L + 0.5 × L + 32 MiB.
STEP_LIMITS = {"encode-1": (2.4, 32.0), "encode": (2.4, 32.0), "decode": (1.6, 32.0), "verify": (2.2, 32.0)}
WAITING_RESULTS = 0.5  # × L: results of the default encode waiting for an earlier tensor's


def step_limit(step: str, floor_mib: float, largest_mib: float, threads: int = 1) -> float:
    """Peak RSS in MiB that ``step`` may reach with this floor and largest tensor (``encode``: with
    ``threads`` tensors coded at once)."""
    slope, constant = STEP_LIMITS[step]
    if step == "encode" and threads > 1:
        return floor_mib + threads * slope * largest_mib + WAITING_RESULTS * largest_mib + constant
    return floor_mib + slope * largest_mib + constant


# --- the synthetic pair ------------------------------------------------------------


def plan(size_bytes: int, matrix_bytes: int = MAX_MATRIX_BYTES) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Tensor lists of the base and the fine-tune, the base totalling ~size_bytes."""
    n = max(1, round(size_bytes / matrix_bytes))
    rows = max(1, round(size_bytes / n / (COLS * 2)))

    def t(name, dtype, shape):
        itemsize = {"BF16": 2, "F32": 4, "I64": 8}[dtype]
        return TensorInfo(name, dtype, tuple(shape), int(np.prod(shape)) * itemsize)

    shared = []
    for i in range(n):
        shared.append(t(f"layers.{i}.weight", "BF16", (rows, COLS)))
        shared.append(t(f"layers.{i}.norm.weight", "BF16", (COLS,)))
    shared.append(t("final_norm.bias", "F32", (COLS,)))
    base = shared + [t("position_ids", "I64", (1, 4096))]  # only in the base: a "removed" record
    ft = shared + [t("score.weight", "BF16", (16, COLS))]  # only in the fine-tune: a "full" record
    return base, ft


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns, rounding to nearest even."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def base_tensor(info: TensorInfo, rng: np.random.Generator) -> np.ndarray:
    count = int(np.prod(info.shape))
    if info.dtype == "I64":
        return np.arange(count, dtype=np.int64).reshape(info.shape)
    if info.dtype == "F32":
        return rng.standard_normal(count, dtype=np.float32).reshape(info.shape) * np.float32(0.01)
    out = np.empty(count, dtype=np.uint16)
    step = 1 << 23
    is_norm = len(info.shape) == 1
    for start in range(0, count, step):  # chunks: no float32 copy of the whole matrix
        chunk = rng.standard_normal(min(step, count - start), dtype=np.float32)
        chunk = 1 + 0.05 * chunk if is_norm else 0.02 * chunk
        out[start:start + len(chunk)] = bf16_bits(chunk)
    return out.reshape(info.shape)


def fine_tune_tensor(base: np.ndarray, dtype: str, rng: np.random.Generator) -> np.ndarray:
    """The base with its bf16 magnitudes moved by a few ULPs (sign kept, no NaN/Inf made)."""
    if dtype == "F32":
        return base + rng.standard_normal(base.shape, dtype=np.float32) * np.float32(1e-4)
    flat = base.reshape(-1)
    out = np.empty_like(flat)
    step = 1 << 23
    for start in range(0, flat.size, step):
        bits = flat[start:start + step].astype(np.int32)
        noise = np.rint(rng.standard_normal(bits.size, dtype=np.float32) * 1.5).astype(np.int32)
        magnitude = np.clip((bits & 0x7FFF) + noise, 0, 0x7F7F)
        out[start:start + step] = ((bits & 0x8000) | magnitude).astype(np.uint16)
    return out.reshape(base.shape)


def generate(workdir: Path, size_bytes: int, seed: int,
             matrix_bytes: int = MAX_MATRIX_BYTES) -> tuple[Path, Path]:
    base_dir, ft_dir = workdir / "base", workdir / "finetune"
    for d in (base_dir, ft_dir):
        if d.exists():
            shutil.rmtree(d)
    base_plan, ft_plan = plan(size_bytes, matrix_bytes)
    ft_names = {t.name for t in ft_plan}
    rng = np.random.default_rng(seed)
    with CheckpointWriter(base_dir, base_plan) as bw, CheckpointWriter(ft_dir, ft_plan) as fw:
        for info in base_plan:  # the shared tensors come first, in the same order in both
            base = base_tensor(info, rng)
            bw.write(info.name, base)
            if info.name in ft_names:
                fw.write(info.name, fine_tune_tensor(base, info.dtype, rng))
            del base
        for info in ft_plan:
            if info.name not in {t.name for t in base_plan}:
                fw.write(info.name, base_tensor(info, rng))
    for d in (base_dir, ft_dir):
        (d / "config.json").write_text('{"model_type": "synthetic", "note": "dcm memory benchmark"}\n')
    return base_dir, ft_dir


# --- measuring ---------------------------------------------------------------------


def dcm_command() -> list[str]:
    """The installed ``dcm`` console script (next to this interpreter), else ``python -m dcm``."""
    beside = Path(sys.executable).parent / "dcm"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("dcm")
    if found:
        return [found]
    return [sys.executable, "-m", "dcm"]


def steps(base_dir: Path, ft_dir: Path, dcm_file: Path, decoded: Path) -> list[tuple[str, list[str]]]:
    b, f, d, o = map(str, (base_dir, ft_dir, dcm_file, decoded))
    dcm = dcm_command()
    return [("encode-1", dcm + ["encode", b, f, "-o", d, "--threads", "1"]),
            ("encode", dcm + ["encode", b, f, "-o", d, "--overwrite"]),
            ("decode", dcm + ["decode", d, "--base", b, "-o", o]),
            ("verify", dcm + ["verify", d, "--base", b])]


# Linux charges a child, at exec, with the peak RSS of the process image it was forked
# (or vforked) from: measured straight from this process, which holds numpy and
# generated tensors, every child would "peak" at this process's own size.  A tiny
# launcher (python -I -S, ~10 MiB) forks and execs the command and reports the
# child's ru_maxrss from os.wait4 instead; a max, so its own few MiB do not add.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def measure(cmd: list[str], work: Path) -> tuple[float, float, int, str]:
    """Run ``cmd``; return (its peak RSS in MiB, seconds, exit status, output tail)."""
    report = work / ".maxrss"
    report.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(report), *cmd],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    output = proc.stdout.decode(errors="replace")[-3000:]
    try:
        maxrss = int(report.read_text())
    except (OSError, ValueError):
        return float("nan"), seconds, proc.returncode or 1, output
    finally:
        report.unlink(missing_ok=True)
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    peak_mib = maxrss / (2**20 if sys.platform == "darwin" else 1024)
    return peak_mib, seconds, proc.returncode, output


def idle_peak(work: Path) -> float:
    """Peak RSS of an interpreter that only imports dcm (the floor of any dcm command)."""
    peak, _, rc, _ = measure([sys.executable, "-c", "import dcm, dcm.cli"], work)
    if rc != 0:
        peak, _, rc, _ = measure([sys.executable, "-c", "import dcm"], work)
    return peak


def compare(ft_dir: Path, decoded_dir: Path) -> tuple[int, list[str]]:
    """Every tensor of the decoded checkpoint against the fine-tune, bytes compared."""
    bad = []
    with Checkpoint(ft_dir) as ft, Checkpoint(decoded_dir) as dec:
        if sorted(ft.names()) != sorted(dec.names()):
            bad.append(f"tensor names differ: {sorted(set(ft.names()) ^ set(dec.names()))}")
        for name in ft.names():
            if name not in dec:
                continue
            a, b = ft.read(name), dec.read(name)
            if ft.info(name) != dec.info(name) or a.tobytes() != b.tobytes():
                bad.append(name)
            del a, b
        return len(ft.names()), bad


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0,
                        help="size of the base checkpoint in GiB (default 2.0)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "membench",
                        help="where the checkpoints and the .dcm go (default out/membench)")
    parser.add_argument("--limit-mib", type=float, default=1024.0,
                        help="fail if a peak RSS exceeds this many MiB (default 1024)")
    parser.add_argument("--matrix-mib", type=float, default=128.0,
                        help="size of each bf16 matrix (rows x 8192) in MiB (default 128: 8192 x 8192)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines in order with stderr, also in CI logs
    if args.size_gb <= 0:
        parser.error("--size-gb must be positive")

    work = args.workdir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    dcm_file, decoded = work / "finetune.dcm", work / "decoded"
    try:
        print(f"membench: generating a {args.size_gb:g} GiB bf16 pair in {work}", flush=True)
        t0 = time.perf_counter()
        base_dir, ft_dir = generate(work, int(args.size_gb * 2**30), args.seed,
                                   int(args.matrix_mib * 2**20))
        print(f"membench: generated in {time.perf_counter() - t0:.1f} s", flush=True)
        for p in (dcm_file, decoded):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

        runs = {}
        for step, cmd in steps(base_dir, ft_dir, dcm_file, decoded):
            print(f"membench: {shlex.join(cmd)}", flush=True)
            peak, seconds, rc, out = measure(cmd, work)
            if rc != 0:
                print(out, file=sys.stderr)
                print(f"membench: FAIL: dcm {step} exited {rc}", file=sys.stderr)
                return 1
            runs[step] = (peak, seconds)

        count, bad = compare(ft_dir, decoded)
        floor = idle_peak(work)
        base_bytes, ft_bytes, dcm_bytes = du(base_dir), du(ft_dir), du(dcm_file)
        with Checkpoint(ft_dir) as ft:
            largest = max(ft.info(n).nbytes for n in ft.names())

        mib = 2**20
        with Checkpoint(ft_dir) as ft:
            params = sum(int(np.prod(ft.info(n).shape)) for n in ft.names())
        print()
        print(f"base checkpoint       {base_bytes / mib:9.1f} MiB")
        print(f"fine-tune checkpoint  {ft_bytes / mib:9.1f} MiB  ({count} tensors, {params:,} parameters, "
              f"largest tensor {largest / mib:.1f} MiB)")
        print(f".dcm file             {dcm_bytes / mib:9.1f} MiB  ({dcm_bytes / ft_bytes:.3f} of the fine-tune, "
              f"{8 * dcm_bytes / params:.2f} bits/param)")
        print(f"python + import dcm   {floor:9.1f} MiB  peak RSS: the floor of every dcm process")
        print()
        threads = default_threads()
        limits = {step: step_limit(step, floor, largest / mib, threads) for step in runs}
        print(f"encode-1: --threads 1; encode: the default, {threads} tensor(s) at once on this machine")
        print()
        print("| step | peak RSS (MiB) | (peak - floor) / largest tensor | limit (MiB) | seconds | MB/s of fine-tune |")
        print("|---|---:|---:|---:|---:|---:|")
        for step, (peak, seconds) in runs.items():
            print(f"| {step} | {peak:.1f} | {(peak - floor) * mib / largest:.2f} | {limits[step]:.1f} "
                  f"| {seconds:.1f} | {ft_bytes / 1e6 / seconds:.0f} |")
        print()
        status = 0
        if bad:
            print(f"membench: FAIL: {len(bad)} of {count} tensors differ: {bad[:5]}", file=sys.stderr)
            status = 1
        else:
            print(f"bit-exact: {count}/{count} tensors")
        for step, (peak, _) in runs.items():
            slope, constant = STEP_LIMITS[step]
            if not peak <= limits[step]:  # NaN (no report) fails too
                n = threads if step == "encode" else 1
                extra = f" + {WAITING_RESULTS:g} x largest" if n > 1 else ""
                print(f"membench: FAIL: {step} peak RSS {peak:.1f} MiB > {limits[step]:.1f} MiB = floor "
                      f"{floor:.1f} + {n} x {slope:g} x largest tensor {largest / mib:.1f}{extra} + "
                      f"{constant:g} MiB: it holds more than {n} tensor(s)' worth", file=sys.stderr)
                status = 1
            if not peak <= args.limit_mib:
                print(f"membench: FAIL: {step} peak RSS {peak:.1f} MiB > limit {args.limit_mib:g} MiB",
                      file=sys.stderr)
                status = 1
        if status == 0:
            print(f"membench: ok: every step within floor + slope x largest tensor + constant "
                  f"({', '.join(f'{s} {limits[s]:.0f}' for s in runs)} MiB) and {args.limit_mib:g} MiB")
        return status
    finally:
        if not args.keep:
            for p in (work / "base", work / "finetune", decoded, dcm_file):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.exists():
                    p.unlink()


if __name__ == "__main__":
    sys.exit(main())
