"""Runtime benchmark: a linear layer plus packed deltas, against the ways one could serve them otherwise.

Layers of 4096×4096 and 11008×4096 (out × in) with delta-come records at a true
1/16 (1 bit per parameter of a 16-bit model: the recipe 2×8-bit, 32×3-bit, then
2-bit vectors, until codes + scales + zero points + S + index entry fill
m·n/8 bytes).  Codes are random (speed does not depend on them).  For each
number of deltas K and tokens per delta T (batch K·T, tokens grouped by delta):

- ``base``:      the base layer alone, y = x·Wᵀ
- ``packed``:    base + every delta from its packed bytes (``dcm.runtime``), one
                 launch per stage for all K deltas (Triton on CUDA; on the CPU the
                 torch backend; ``--backends`` picks)
- ``deq+fact``:  the fair baseline: base + per delta, dequantize Û, S, V̂ from the
                 same bytes (every call: nothing is kept but the packed bytes) and
                 multiply in factored form, y += ((x·V̂ᵀ)·diag(S))·Û, as the
                 packed path itself does above 4 tokens on the CPU
- ``deq+dense``: base + per delta, dequantize and form the full m×n Δ̂ = Ûᵀ·S·V̂,
                 then x·Δ̂ᵀ (what a naive server does; ``--deq-dense-max-deltas`` limits it)
- ``dense``:     base + per delta x·Δᵀ with Δ stored dense (16-bit on CUDA, float32
                 on the CPU): fast, but K dense copies of the layer in memory
- ``rotated``:   ``packed`` with the same records read as ``lowrank-rotated`` (spec
                 10.14, both sides rotated): the cost of rotating each token's input
                 (x·R_Vᵀ) and the delta's output (·R_U) with the fast Walsh–Hadamard
                 transform around the same kernels (``--no-rotated`` leaves it out)

Every column of a row is timed the same way: one warm-up call each, then
``--repeats`` rounds that call every column once in turn (so load on a shared
machine hits them alike), and the median per column.  It prints those medians,
what the delta adds to the base, the bytes each path must read (weights, packed
or dense deltas, activations) and the bandwidth that implies.  Run it on a GPU
with ``python benchmarks/runtime.py``; on the CPU the default is the same shapes
with fewer repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dcm import lowrank, quant  # noqa: E402
from dcm.methods import deltacome  # noqa: E402
from dcm.lowrank import Factor  # noqa: E402
from dcm.runtime import LayerPack, Segments, packed, rotation, torch_backend  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096))


def one_sixteenth_groups(shape):
    """Recipe groups of a true 1/16 record: index entry + blob ≤ m·n/8 bytes."""
    m, n = shape
    return deltacome.recipe_groups("model.layers.0.mlp.up_proj.weight", "BF16", shape, deltacome.DEFAULT_RECIPE,
                                   128, m * n // 8, min(shape))


def random_record(shape, groups, rng):
    m, n = shape
    s = np.sort(rng.random(groups[-1].stop).astype(np.float32))[::-1] * 0.1
    factors = []
    for g in groups:
        pair = []
        for length in (n, m):
            ng = quant.group_count(length, g.group_size)
            pair.append(Factor(rng.integers(0, 1 << g.bits, (g.count, length), dtype=np.uint8),
                               (rng.random((g.count, ng)) * 0.01 + 1e-3).astype(np.float16),
                               rng.integers(0, 1 << g.bits, (g.count, ng), dtype=np.uint8)))
        factors.append(tuple(pair))
    return packed.mixed_record(shape, groups, lowrank.pack_blob(shape, groups, s, factors))


def timer(device):
    """A function that times one call of ``fn`` in seconds (CUDA events on a GPU)."""
    if device.type == "cuda":
        def once(fn):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop) / 1e3
    else:
        def once(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return once


def measure_columns(columns: dict, repeats: int, once) -> dict:
    """Median seconds of each column: a warm-up call each, then ``repeats`` interleaved rounds."""
    for fn in columns.values():
        once(fn)
    times = {name: [] for name in columns}
    for _ in range(repeats):
        for name, fn in columns.items():
            times[name].append(once(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_shape(shape, deltas_list, tokens_list, backends, device, dtype, repeats, rng, deq_dense_max=None,
                rotated=True):
    m, n = shape
    groups = one_sixteenth_groups(shape)
    kmax = max(deltas_list)
    recs = [random_record(shape, groups, rng) for _ in range(kmax)]
    weight = (torch.randn(m, n, device=device) * 0.02).to(dtype)
    dense_dtype = torch.float16 if device.type == "cuda" else torch.float32
    dense = [torch.randn(m, n, device=device).to(dense_dtype) * 1e-3 for _ in range(kmax)]
    once = timer(device)
    apply_fns = {"torch": torch_backend.apply}
    if "triton" in backends:
        from dcm.runtime import triton_backend
        apply_fns["triton"] = triton_backend.apply
    rows = []
    delta_bytes = len(recs[0].blob) + 64  # + the index entry, roughly
    print(f"\n{m}x{n}: rank {groups[-1].stop}, groups {[g.as_param()[:3] for g in groups]}, "
          f"{len(recs[0].blob)} packed bytes per delta ({8 * len(recs[0].blob) / (m * n):.3f} bits/param), "
          f"dense 16-bit delta {2 * m * n} bytes", flush=True)
    rotated_recs = [dataclasses.replace(r, kind=packed.Kind.LOWRANK_ROTATED, rotation=(1, 1, 1000 + i))
                    for i, r in enumerate(recs)]
    for k in deltas_list:
        pack = LayerPack(shape, recs[:k], device)
        pack_rot = LayerPack(shape, rotated_recs[:k], device) if rotated else None
        for t in tokens_list:
            ids = torch.arange(k, device=device).repeat_interleave(t)
            seg = Segments.of(ids, k)
            x = torch.randn(k * t, n, device=device).to(dtype)
            columns = {"base": lambda: torch.nn.functional.linear(x, weight)}
            for name in backends:
                def run(fn=apply_fns[name]):
                    y = torch.nn.functional.linear(x, weight)
                    fn(pack, x, seg, y)
                    return y
                columns[f"packed_{name}"] = run
                if rotated:
                    def run_rot(fn=apply_fns[name]):
                        y = torch.nn.functional.linear(x, weight)
                        rotation.apply(fn, pack_rot, x, seg, y)
                        return y
                    columns[f"rotated_{name}"] = run_rot

            def deq_fact():
                y = torch.nn.functional.linear(x, weight)
                for d in range(k):
                    u, s, v = torch_backend.factor_delta(pack, d)  # (rank, m), (rank,), (rank, n) float32
                    xs = x[d * t:(d + 1) * t].float()
                    y[d * t:(d + 1) * t] += (((xs @ v.T) * s) @ u).to(y.dtype)
                return y

            def deq_dense():
                y = torch.nn.functional.linear(x, weight)
                for d in range(k):
                    u, s, v = torch_backend.factor_delta(pack, d)
                    full = (u.T * s) @ v
                    y[d * t:(d + 1) * t] += (x[d * t:(d + 1) * t].float() @ full.T).to(y.dtype)
                return y

            def dense_delta():
                y = torch.nn.functional.linear(x, weight)
                for d in range(k):
                    y[d * t:(d + 1) * t] += x[d * t:(d + 1) * t].to(dense_dtype) @ dense[d].T
            columns["deq_fact"] = deq_fact
            if deq_dense_max is None or k <= deq_dense_max:
                columns["deq_dense"] = deq_dense
            columns["dense"] = dense_delta
            check_same_output(columns, [c for c in columns if c.startswith(("packed", "deq"))], f"{m}x{n} K={k} T={t}")
            row = {"shape": f"{m}x{n}", "deltas": k, "tokens": t, "repeats": repeats}
            row.update({f"{name}_s": sec for name, sec in measure_columns(columns, repeats, once).items()})
            act = x.numel() * x.element_size() + k * t * m * weight.element_size()
            row["base_bytes"] = m * n * weight.element_size() + act
            row["packed_bytes"] = row["base_bytes"] + k * delta_bytes
            row["dense_bytes"] = row["base_bytes"] + k * m * n * dense[0].element_size()
            rows.append(row)
            show(row, backends)
    return rows


def check_same_output(columns, names, where):
    """The packed paths and the baselines compute the same y (the benchmark compares like with like)."""
    outs = {name: columns[name]().double() for name in names}
    ref = outs["deq_fact"]
    scale = ref.abs().max().item() or 1.0
    for name, y in outs.items():
        err = (y - ref).abs().max().item() / scale
        if not err < 1e-2:
            raise SystemExit(f"runtime benchmark: {name} differs from deq+fact by {err:.3g} of the largest "
                             f"output at {where}")


def show(row, backends):
    base = row["base_s"]
    parts = [f"{row['shape']:>10} K={row['deltas']:<2} T={row['tokens']:<3} base {base * 1e3:8.3f} ms"]
    for name in backends:
        s = row[f"packed_{name}_s"]
        parts.append(f"packed[{name}] {s * 1e3:8.3f} ms (+{100 * (s - base) / base:6.1f}%, "
                     f"{row['packed_bytes'] / s / 1e9:6.1f} GB/s)")
        if f"rotated_{name}_s" in row:
            r = row[f"rotated_{name}_s"]
            parts.append(f"rotated[{name}] {r * 1e3:8.3f} ms ({r / s:5.2f}x packed)")
    parts.append(f"deq+fact {row['deq_fact_s'] * 1e3:8.2f} ms")
    if "deq_dense_s" in row:
        parts.append(f"deq+dense {row['deq_dense_s'] * 1e3:8.2f} ms")
    parts.append(f"dense {row['dense_s'] * 1e3:8.3f} ms ({row['dense_bytes'] / row['dense_s'] / 1e9:6.1f} GB/s)")
    print(" | ".join(parts), flush=True)


def summary(rows, backends):
    print("\nTargets")
    by = {(r["shape"], r["deltas"], r["tokens"]): r for r in rows}
    for name in backends:
        key = f"packed_{name}_s"
        for r in rows:
            if r["deltas"] == 1 and r["tokens"] == 1:
                print(f"  {r['shape']} [{name}] 1 delta, 1 token: the delta adds "
                      f"{100 * (r[key] - r['base_s']) / r['base_s']:.1f}% to the base layer (H100 target <= 15%); "
                      f"packed / dense delta = {r[key] / r['dense_s']:.2f} (CPU target < 1)")
            many, one = by.get((r["shape"], 16, 1)), by.get((r["shape"], 1, 16))
            if r["deltas"] == 1 and r["tokens"] == 1 and many and one:
                print(f"  {r['shape']} [{name}] 16 deltas x 1 token / 1 delta x 16 tokens = "
                      f"{many[key] / one[key]:.2f} (target <= 2)")
        speedups = [r["deq_fact_s"] / r[key] for r in rows]
        print(f"  [{name}] deq+fact / packed: {min(speedups):.2f} .. {max(speedups):.2f} "
              f"(the packed path's speed-up over dequantizing every call, factored)")
        speedups = [r["deq_dense_s"] / r[key] for r in rows if "deq_dense_s" in r]
        if speedups:
            print(f"  [{name}] deq+dense / packed: {min(speedups):.2f} .. {max(speedups):.2f}")
        ratios = [r[f"rotated_{name}_s"] / r[key] for r in rows if f"rotated_{name}_s" in r]
        if ratios:
            print(f"  [{name}] rotated / packed: {min(ratios):.2f} .. {max(ratios):.2f} (median "
                  f"{statistics.median(ratios):.2f}): what the Hadamard rotations of lowrank-rotated records cost")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=",".join(f"{m}x{n}" for m, n in SHAPES))
    ap.add_argument("--tokens", default="1,4,16,64")
    ap.add_argument("--deltas", default="1,4,16")
    ap.add_argument("--backends", default=None, help="comma list of torch,triton (default: triton on CUDA, "
                                                     "torch on both)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--deq-dense-max-deltas", type=int, default=None, metavar="K",
                    help="time the deq+dense column (the slowest) only for up to K deltas (0: never)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice); "
                    "on a shared machine 1 thread keeps OpenMP barriers out of the figures")
    ap.add_argument("--no-rotated", action="store_true", help="leave out the rotated column")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = (args.backends or ("triton,torch" if device.type == "cuda" else "torch")).split(",")
    repeats = args.repeats or (50 if device.type == "cuda" else 5)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; activations and base weights {dtype}; median of {repeats} interleaved rounds "
          f"per column", flush=True)
    rows = []
    for text in args.shapes.split(","):
        m, n = (int(v) for v in text.split("x"))
        rows += bench_shape((m, n), [int(v) for v in args.deltas.split(",")], [int(v) for v in args.tokens.split(",")],
                            backends, device, dtype, repeats, rng, deq_dense_max=args.deq_dense_max_deltas,
                            rotated=not args.no_rotated)
    summary(rows, backends)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
