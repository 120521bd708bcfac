"""Runtime benchmark: a linear layer plus packed deltas, against the ways one could serve them otherwise.

Layers of 4096×4096 and 11008×4096 (out × in) with delta-come records at a true
1/16 (1 bit per parameter of a 16-bit model: the recipe 2×8-bit, 32×3-bit, then
2-bit vectors, until codes + scales + zero points + S + index entry fill
m·n/8 bytes).  Codes are random (speed does not depend on them).  For each
number of deltas K and tokens per delta T (batch K·T, tokens grouped by delta):

- ``base``:     the base layer alone, y = x·Wᵀ
- ``packed``:   base + every delta from its packed bytes (``dcm.runtime``), one
                launch per stage for all K deltas (Triton on CUDA; on the CPU the
                torch backend; ``--backends`` picks)
- ``deq+mm``:   base + per delta: dequantize Û, V̂ and form Δ̂ = Ûᵀ·S·V̂ in torch, then x·Δ̂ᵀ
- ``dense``:    base + per delta x·Δᵀ with Δ stored dense (16-bit on CUDA, float32 on the CPU)

It prints median times, what the delta adds to the base, the bytes each path
must read (weights, packed or dense deltas, activations) and the bandwidth that
implies.  Run it on a GPU with ``python benchmarks/runtime.py``; on the CPU the
default is the same shapes with fewer repeats.
"""

from __future__ import annotations

import argparse
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
from dcm.runtime import LayerPack, Segments, packed, torch_backend  # noqa: E402

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
    if device.type == "cuda":
        def measure(fn, repeats):
            fn()
            torch.cuda.synchronize()
            out = []
            for _ in range(repeats):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                torch.cuda.synchronize()
                out.append(start.elapsed_time(stop) / 1e3)
            return statistics.median(out)
    else:
        def measure(fn, repeats):
            fn()
            out = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return statistics.median(out)
    return measure


def bench_shape(shape, deltas_list, tokens_list, backends, device, dtype, repeats, rng):
    m, n = shape
    groups = one_sixteenth_groups(shape)
    kmax = max(deltas_list)
    recs = [random_record(shape, groups, rng) for _ in range(kmax)]
    weight = (torch.randn(m, n, device=device) * 0.02).to(dtype)
    dense_dtype = torch.float16 if device.type == "cuda" else torch.float32
    dense = [torch.randn(m, n, device=device).to(dense_dtype) * 1e-3 for _ in range(kmax)]
    measure = timer(device)
    apply_fns = {"torch": torch_backend.apply}
    if "triton" in backends:
        from dcm.runtime import triton_backend
        apply_fns["triton"] = triton_backend.apply
    rows = []
    delta_bytes = len(recs[0].blob) + 64  # + the index entry, roughly
    print(f"\n{m}x{n}: rank {groups[-1].stop}, groups {[g.as_param()[:3] for g in groups]}, "
          f"{len(recs[0].blob)} packed bytes per delta ({8 * len(recs[0].blob) / (m * n):.3f} bits/param), "
          f"dense 16-bit delta {2 * m * n} bytes", flush=True)
    for k in deltas_list:
        pack = LayerPack(shape, recs[:k], device)
        for t in tokens_list:
            ids = torch.arange(k, device=device).repeat_interleave(t)
            seg = Segments.of(ids, k)
            x = torch.randn(k * t, n, device=device).to(dtype)
            base = lambda: torch.nn.functional.linear(x, weight)  # noqa: E731
            row = {"shape": f"{m}x{n}", "deltas": k, "tokens": t, "base_s": measure(base, repeats)}
            for name in backends:
                def run(fn=apply_fns[name]):
                    y = base()
                    fn(pack, x, seg, y)
                row[f"packed_{name}_s"] = measure(run, repeats)

            def deq():
                y = base()
                for d in range(k):
                    u, s, v = torch_backend.factor_delta(pack, d)
                    full = (u.T * s) @ v
                    y[d * t:(d + 1) * t] += (x[d * t:(d + 1) * t].float() @ full.T).to(y.dtype)

            def dense_delta():
                y = base()
                for d in range(k):
                    y[d * t:(d + 1) * t] += x[d * t:(d + 1) * t].to(dense_dtype) @ dense[d].T
            row["deq_mm_s"] = measure(deq, max(1, repeats // 3))
            row["dense_s"] = measure(dense_delta, repeats)
            act = x.numel() * x.element_size() + k * t * m * weight.element_size()
            row["base_bytes"] = m * n * weight.element_size() + act
            row["packed_bytes"] = row["base_bytes"] + k * delta_bytes
            row["dense_bytes"] = row["base_bytes"] + k * m * n * dense[0].element_size()
            rows.append(row)
            show(row, backends)
    return rows


def show(row, backends):
    base = row["base_s"]
    parts = [f"{row['shape']:>10} K={row['deltas']:<2} T={row['tokens']:<3} base {base * 1e3:8.3f} ms"]
    for name in backends:
        s = row[f"packed_{name}_s"]
        parts.append(f"packed[{name}] {s * 1e3:8.3f} ms (+{100 * (s - base) / base:6.1f}%, "
                     f"{row['packed_bytes'] / s / 1e9:6.1f} GB/s)")
    parts.append(f"deq+mm {row['deq_mm_s'] * 1e3:8.2f} ms")
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=",".join(f"{m}x{n}" for m, n in SHAPES))
    ap.add_argument("--tokens", default="1,4,16,64")
    ap.add_argument("--deltas", default="1,4,16")
    ap.add_argument("--backends", default=None, help="comma list of torch,triton (default: triton on CUDA, "
                                                     "torch on both)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backends = (args.backends or ("triton,torch" if device.type == "cuda" else "torch")).split(",")
    repeats = args.repeats or (50 if device.type == "cuda" else 5)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; activations and base weights {dtype}; median of {repeats} runs")
    rows = []
    for text in args.shapes.split(","):
        m, n = (int(v) for v in text.split("x"))
        rows += bench_shape((m, n), [int(v) for v in args.deltas.split(",")], [int(v) for v in args.tokens.split(",")],
                            backends, device, dtype, repeats, rng)
    summary(rows, backends)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
