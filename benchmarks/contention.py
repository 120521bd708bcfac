#!/usr/bin/env python3
"""Encode time with another process holding a core, against the same encode beside no such process.

Issue 14 item 10: an encode must not slow down by more than ~1.5x when another
process holds one of two cores (torch's default thread count used to turn 3 s
into 16-87 s there).  For each configuration this runs ``dcm encode`` (the
command-line tool, a fresh process each time) on the real pair, alternately
alone and beside a busy-loop child (one pure-Python ``while True``, which holds
one core), ``--repeats`` times each, and prints the median wall times and their
ratio.  Alternating keeps slow drifts of a shared machine out of the ratio;
the figures are wall times of whole commands (start-up included).

    python benchmarks/contention.py                       # data/real, 5 rounds
    python benchmarks/contention.py --configs rd --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "lossless": [],
    "recipe": ["--method", "delta-come", "--ratio", "1/16"],
    "rd": ["--method", "delta-come", "--ratio", "1/16", "--alloc", "rd"],
}


def dcm_command() -> list[str]:
    beside = Path(sys.executable).parent / "dcm"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "dcm"]


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=ROOT / "data/real/base")
    ap.add_argument("--finetune", type=Path, default=ROOT / "data/real/finetune")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of (alone, beside the busy child)")
    ap.add_argument("--threads", type=int, default=None, help="dcm encode --threads (default: the tool's)")
    args = ap.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    work = Path(tempfile.mkdtemp(prefix="dcm-contention-"))
    rows = []
    try:
        for name in names:
            cmd = dcm_command() + ["encode", str(args.base), str(args.finetune), "-o", str(work / "x.dcm"),
                                   "--overwrite", "-q", *CONFIGS[name]]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            timed(cmd)  # warm the page cache and the imports
            alone, beside = [], []
            for _ in range(args.repeats):
                alone.append(timed(cmd))
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    time.sleep(0.2)  # the child is running before the encode starts
                    beside.append(timed(cmd))
                finally:
                    busy.kill()
                    busy.wait()
            rows.append((name, statistics.median(alone), statistics.median(beside), alone, beside))
            print(f"{name}: alone {[round(t, 1) for t in alone]}, beside a busy core {[round(t, 1) for t in beside]}",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"\ndcm encode on {args.base.parent.name}, {args.repeats} rounds, medians; {os.cpu_count()} cores, "
          f"load average {load:.1f} at the end\n")
    print("| config | alone (s) | beside a busy core (s) | ratio |")
    print("|---|---:|---:|---:|")
    for name, a, b, _, _ in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
