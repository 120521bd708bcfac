#!/usr/bin/env python3
"""Encode at LLM scale: a Llama-2-7B-shaped pair through every encoder configuration, projected to 32 layers
and to Llama-2-70B shapes.

1. Writes a synthetic pair with the tensor names, shapes and dtype (bf16) of
   Llama-2-7B (4096 hidden, 11008 FFN, 32000 vocab, untied lm_head), ``--layers``
   of its 32 decoder layers, sharded like the hub (~5 GB shards and
   ``model.safetensors.index.json``), tensor by tensor (one in memory).  The
   fine-tune's delta looks like a full fine-tune's, not noise: per matrix a
   decaying singular spectrum s_i ∝ i^-α (α drawn in [0.6, 1.0], 1024
   directions) plus a dense part holding a quarter of its energy, with
   ‖Δ‖/‖W‖ drawn log-uniformly in [0.5 %, 2 %]; in the embedding, 5 % of the
   rows (the tokens seen in training) get updates and the rest only decay
   (-1e-4·W, mostly below bf16's resolution); norms move by about 1 %.  The
   pair is kept under ``--workdir`` and reused by later runs (``--keep``).
2. Encodes it with each configuration (``--configs``): ``lossless``;
   delta-come at 1/16 with the paper's recipe or ``--alloc rd``, each with the
   exact and the randomized SVD.  Each encode runs in a fresh process (its
   workers below it) while this one samples the resident memory of the whole
   process tree; CPU time is the tree's (``wait4``: the encode and the workers it
   reaped).
3. Decodes every tensor of the file against the base and compares it with the
   fine-tune: bit for bit for lossless, the relative error ‖Δ̂ − Δ‖/‖Δ‖ over the
   coded matrices for the lossy ones.
4. Prints a table: wall and CPU time, peak RSS (largest process, and the sum
   over the tree), file size, bits per parameter, seconds per layer, error,
   lossless MB/s of fine-tune per core, and projections.

Projections come from the measured time of each tensor's job (planning and
coding, which ``dcm.encode`` reports): 32 layers = this run + the missing
layers at the measured per-layer job time over the concurrency; Llama-2-70B
(80 layers, 8192 hidden, 28672 FFN, GQA k/v of 1024 rows) scales each 7B
tensor's time by the work of its algorithm: m·n for lossless, m·n·min(m, n)
for an exact SVD, m·n·q for a randomized one (q the sketch rank the budget
asks for; an exact SVD where the sketch would be too large).  They assume the
per-tensor work dominates and the jobs pack the workers; read them as
estimates, not measurements.

    python benchmarks/scale.py --layers 1                  # CI: lossless + recipe/randomized (~10 min on 2 cores)
    python benchmarks/scale.py --layers 2 --configs all --workers 2
    python benchmarks/scale.py --layers 32 --configs recipe-randomized --workers 2 \\
        --workdir /var/tmp/dcm-scale --keep                # the full 7B (45 GB of disk, hours)

Disk: the pair takes 2 × (0.93 + 0.40·layers) GB (27 GB at 32 layers); each
encode's file is removed once measured, and while it is written the writer
holds it twice (a payload file, then the file), at most 2 × 7 GB (lossless).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GENERATOR_VERSION = 1  # bump when the synthetic pair changes: a reused workdir is regenerated
SHARD_BYTES = 5 * 10**9  # the hub's "5GB"

LLAMA_7B = {"layers": 32, "hidden": 4096, "ffn": 11008, "vocab": 32000, "kv": 4096}
LLAMA_70B = {"layers": 80, "hidden": 8192, "ffn": 28672, "vocab": 32000, "kv": 1024}

CONFIGS = {
    "lossless": {"method": "lossless"},
    "recipe-exact": {"method": "delta-come", "ratio": "1/16", "options": {"alloc": "recipe", "svd": "exact"}},
    "recipe-randomized": {"method": "delta-come", "ratio": "1/16", "options": {"alloc": "recipe", "svd": "randomized"}},
    "rd-exact": {"method": "delta-come", "ratio": "1/16", "options": {"alloc": "rd", "svd": "exact"}},
    "rd-randomized": {"method": "delta-come", "ratio": "1/16", "options": {"alloc": "rd", "svd": "randomized"}},
}
DEFAULT_CONFIGS = "lossless,recipe-randomized"


# --- the architecture ------------------------------------------------------------------


def tensors(arch: dict, layers: int) -> list[tuple[str, tuple, str]]:
    """(name, shape, role) of a Llama checkpoint in the hub's order."""
    h, f, v, kv = arch["hidden"], arch["ffn"], arch["vocab"], arch["kv"]
    out = [("model.embed_tokens.weight", (v, h), "embed")]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h), "q"), (p + "self_attn.k_proj.weight", (kv, h), "k"),
                (p + "self_attn.v_proj.weight", (kv, h), "v"), (p + "self_attn.o_proj.weight", (h, h), "o"),
                (p + "mlp.gate_proj.weight", (f, h), "gate"), (p + "mlp.up_proj.weight", (f, h), "up"),
                (p + "mlp.down_proj.weight", (h, f), "down"),
                (p + "input_layernorm.weight", (h,), "norm"), (p + "post_attention_layernorm.weight", (h,), "norm")]
    out += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (v, h), "lm_head")]
    return out


def config_json(arch: dict, layers: int) -> bytes:
    return json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": arch["hidden"],
        "intermediate_size": arch["ffn"], "num_hidden_layers": layers, "num_attention_heads": arch["hidden"] // 128,
        "num_key_value_heads": arch["kv"] // 128, "vocab_size": arch["vocab"], "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    }, indent=2).encode() + b"\n"


# --- the synthetic pair ------------------------------------------------------------------


def _generator(name: str, seed: int):
    import torch
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8],
                                                        "little") >> 1)


def _orthonormal(torch, rows: int, cols: int, gen):
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen))[0]


def make_tensors(name: str, shape: tuple, role: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(base, fine-tune) of one tensor as float32 arrays (rounded to bf16 by the writer's caller)."""
    import torch

    gen = _generator(name, seed)
    if role == "norm":
        base = 1 + 0.05 * torch.randn(shape, generator=gen)
        return base.numpy(), (base + 0.01 * base.abs() * torch.randn(shape, generator=gen)).numpy()
    base = 0.02 * torch.randn(shape, generator=gen)
    rel = math.exp(torch.empty(1).uniform_(math.log(0.005), math.log(0.02), generator=gen).item())
    m, n = shape
    if role == "embed":  # rows of the tokens seen in training move; the rest only decay
        delta = -1e-4 * base
        seen = torch.randperm(m, generator=gen)[: m // 20]
        rows = torch.randn(len(seen), n, generator=gen)
        rows *= rel * base.norm() / rows.norm()
        delta[seen] += rows
    else:  # a decaying spectrum over 1024 directions plus a dense quarter of the energy
        r = min(1024, m, n)
        alpha = torch.empty(1).uniform_(0.6, 1.0, generator=gen).item()
        s = torch.arange(1, r + 1, dtype=torch.float32) ** -alpha
        low = (_orthonormal(torch, m, r, gen) * s) @ _orthonormal(torch, n, r, gen).T
        dense = torch.randn(m, n, generator=gen)
        delta = low * (0.75 ** 0.5 / low.norm()) + dense * (0.25 ** 0.5 / dense.norm())
        delta *= rel * base.norm()
    return base.numpy(), (base + delta).numpy()


def write_pair(root: Path, layers: int, seed: int, arch: dict = LLAMA_7B) -> tuple[Path, Path]:
    """The pair under root/base and root/finetune, reused when a complete one of these settings is there."""
    from dcm.checkpoint import CheckpointWriter, TensorInfo
    from dcm.dtypes import from_float32

    stamp = root / "pair.json"
    settings = {"version": GENERATOR_VERSION, "layers": layers, "seed": seed, "arch": arch}
    base_dir, ft_dir = root / "base", root / "finetune"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return base_dir, ft_dir
    for d in (base_dir, ft_dir, stamp):
        if d.is_dir():
            shutil.rmtree(d)
        elif d.exists():
            d.unlink()
    root.mkdir(parents=True, exist_ok=True)
    plan = tensors(arch, layers)
    infos = [TensorInfo(n, "BF16", s, math.prod(s) * 2) for n, s, _ in plan]
    meta = {"format": "pt"}
    started = time.perf_counter()
    with CheckpointWriter(base_dir, infos, meta, max_shard_bytes=SHARD_BYTES) as bw, \
            CheckpointWriter(ft_dir, infos, meta, max_shard_bytes=SHARD_BYTES) as fw:
        for i, (name, shape, role) in enumerate(plan):
            base, ft = make_tensors(name, shape, role, seed)
            bw.write(name, from_float32(base, "BF16"))
            fw.write(name, from_float32(ft, "BF16"))
            print(f"\rscale: writing the pair: {i + 1}/{len(plan)} tensors, {time.perf_counter() - started:.0f} s",
                  end="", file=sys.stderr, flush=True)
        for w in (bw, fw):
            w.write_attachment("config.json", config_json(arch, layers))
    print(file=sys.stderr)
    stamp.write_text(json.dumps(settings))
    return base_dir, ft_dir


# --- one encode, in a child process ------------------------------------------------------


def child_encode(spec: dict) -> dict:
    """Runs in the child: one dcm.encode; prints its report as JSON."""
    import dcm

    executor = None
    if spec.get("ray"):
        from dcm.distributed.ray import RayExecutor
        executor = RayExecutor(None if spec["ray"] == "local" else spec["ray"], inputs=spec.get("ray_inputs", "shared"),
                               init={"num_cpus": spec["workers"] or 2} if spec["ray"] == "local" else None)
    cfg = CONFIGS[spec["config"]]
    report = dcm.encode(spec["base"], spec["finetune"], spec["out"], method=cfg["method"], ratio=cfg.get("ratio"),
                        options=cfg.get("options"), overwrite=True, threads=spec.get("threads"),
                        workers=spec.get("workers") if not spec.get("ray") else None, executor=executor,
                        device=spec.get("device"), max_memory=spec.get("max_memory"))
    return {"file_bytes": report.file_bytes, "seconds": report.seconds, "timings": report.timings,
            "recoded": report.recoded, "params": report.params}


def _tree_rss(root_pid: int) -> tuple[int, int]:
    """(sum, largest) resident bytes of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * page
        except (OSError, IndexError, ValueError):
            continue
    total, largest, todo = 0, 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        largest = max(largest, rss.get(pid, 0))
        todo += children.get(pid, [])
    return total, largest


def run_encode(spec: dict) -> dict:
    """One encode in a fresh process: its report, wall and CPU seconds, peak RSS (largest process, tree sum)."""
    cmd = [sys.executable, __file__, "_encode", json.dumps(spec)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = [0, 0]  # the tree's sum, the largest process
    done = threading.Event()

    def sample():
        while not done.wait(0.25):
            total, largest = _tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], total), max(peak[1], largest)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"scale: encode {spec['config']} failed (exit {proc.returncode}): {shlex.join(cmd)}")
    report = json.loads(out.strip().splitlines()[-1])
    # ru_maxrss is the largest process's peak (sampling may miss a short one); this process generates
    # nothing big, so a child's pre-exec copy of it does not inflate the figure.
    report.update(wall=wall, cpu=usage.ru_utime + usage.ru_stime, rss_max=usage.ru_maxrss * 1024,
                  rss_sum=max(peak[0], usage.ru_maxrss * 1024))
    return report


# --- decoding and checking ---------------------------------------------------------------


def check_file(path: Path, base_dir: Path, ft_dir: Path, lossless: bool) -> dict:
    """Decode every tensor against the base: bit-exact (lossless) or the relative error of the coded deltas."""
    import dcm
    from dcm.checkpoint import Checkpoint
    from dcm.dtypes import to_float32

    started = time.perf_counter()
    err2 = ref2 = 0.0
    with dcm.open(path) as f, Checkpoint(base_dir) as base, Checkpoint(ft_dir) as ft:
        for rec in f.records():
            if rec.kind_name == "removed":
                continue
            got = f.tensor(rec.name, base.read(rec.name))
            want = ft.read(rec.name)
            if lossless or rec.kind_name == "dense-delta":
                if got.tobytes() != want.tobytes():
                    raise SystemExit(f"scale: {path}: tensor {rec.name} does not decode to the fine-tune")
                continue
            b = to_float32(base.read(rec.name), "BF16").astype(np.float64)
            d_true = to_float32(want, "BF16") - b
            d_got = to_float32(got, "BF16") - b
            err2 += float(np.sum((d_got - d_true) ** 2))
            ref2 += float(np.sum(d_true ** 2))
    return {"decode_s": time.perf_counter() - started, "rel_err": (err2 / ref2) ** 0.5 if ref2 else 0.0}


# --- projections -----------------------------------------------------------------------


def _work(config: str, shape: tuple) -> float:
    """Relative work of one tensor's job under ``config`` (see the module's docstring)."""
    m, n = (shape[0], 1) if len(shape) == 1 else shape
    if config == "lossless" or len(shape) == 1:
        return m * n
    if config.endswith("randomized"):
        from dcm.methods.deltacome import DeltaCoMe
        method = DeltaCoMe(ratio="1/16", svd="randomized")
        budget = int(method.ratio * 16 * m * n) // 8
        q = method._rank_hint("x", "BF16", (m, n), budget) + method.oversample
        if "rd" in config:  # rd sketches what twice the even share buys at the narrowest width
            from dcm.methods import allocate
            q = int(2 * budget // allocate.vector_bytes((m, n), 2, 128)) + method.oversample
        if q < min(m, n) // 2:
            return m * n * q
    return m * n * min(m, n)


def _role_seconds(report: dict, layers: int) -> dict[str, float]:
    """Mean job seconds (measure + code) per tensor role."""
    by_role: dict[str, list[float]] = {}
    for name, shape, role in tensors(LLAMA_7B, layers):
        t = report["timings"].get(f"code:{name}", 0.0) + report["timings"].get(f"measure:{name}", 0.0)
        by_role.setdefault(role, []).append(t)
    return {role: sum(ts) / len(ts) for role, ts in by_role.items()}


def project(config: str, report: dict, layers: int, concurrency: int) -> dict:
    role_s = _role_seconds(report, layers)
    shapes7 = {role: shape for _, shape, role in tensors(LLAMA_7B, 1)}
    layer_s = sum(role_s[r] * (2 if r == "norm" else 1) for r in ("q", "k", "v", "o", "gate", "up", "down", "norm"))
    wall32 = report["wall"] + (32 - layers) * layer_s / concurrency
    jobs70 = 0.0
    for _, shape, role in tensors(LLAMA_70B, LLAMA_70B["layers"]):
        jobs70 += role_s[role] * _work(config, shape) / _work(config, shapes7[role])
    fixed = max(report["wall"] - sum(v for k, v in report["timings"].items() if ":" in k) / concurrency, 0.0)
    return {"layer_job_s": layer_s, "wall32": wall32, "wall70": fixed + jobs70 / concurrency}


# --- the table -----------------------------------------------------------------------------


def fmt_time(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def print_table(rows, args, concurrency, ft_bytes, params, file=None):
    from dcm.compute import usable_cores

    file = file or sys.stdout
    where = "Ray" if args.ray else f"{args.workers} workers" if args.workers else f"{concurrency} threads"
    print(f"\nLlama-2-7B-shaped pair, {args.layers} of 32 layers, bf16; {where} on {usable_cores()} cores; "
          f"projections assume the same concurrency ({concurrency})\n", file=file)
    head = ("config", "wall", "CPU", "RSS max", "RSS sum", "file MB", "bits/p", "job s/layer", "rel err",
            "MB/s/core", "recoded", "32 layers", "70B")
    lines = [head]
    for r in rows:
        mbps = ft_bytes / 1e6 / r["cpu"] if r["config"] == "lossless" and r["cpu"] else None
        lines.append((r["config"], fmt_time(r["wall"]), fmt_time(r["cpu"]), f"{r['rss_max'] / 2**30:.2f} GiB",
                      f"{r['rss_sum'] / 2**30:.2f} GiB", f"{r['file_bytes'] / 1e6:.1f}",
                      f"{8 * r['file_bytes'] / params:.3f}", f"{r['layer_job_s']:.1f}",
                      "exact" if r["config"] == "lossless" and "rel_err" in r else
                      f"{r['rel_err']:.4f}" if "rel_err" in r else "-",
                      f"{mbps:.0f}" if mbps else "-", str(r.get("recoded", 0)), fmt_time(r["wall32"]),
                      fmt_time(r["wall70"])))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("  ".join(str(c).rjust(w) if j else str(c).ljust(w) for j, (c, w) in enumerate(zip(line, widths))),
              file=file)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=file)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "_encode":
        print(json.dumps(child_encode(json.loads(sys.argv[2]))))
        return 0
    if len(sys.argv) > 2 and sys.argv[1] == "_generate":
        spec = json.loads(sys.argv[2])
        write_pair(Path(spec["root"]), spec["layers"], spec["seed"])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1, help="decoder layers of the pair (1..32, default 1)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help=f"comma list of {', '.join(CONFIGS)}, or all (default: {DEFAULT_CONFIGS})")
    ap.add_argument("--workers", type=int, default=None, help="dcm encode --workers N")
    ap.add_argument("--threads", type=int, default=None, help="dcm encode --threads N (without --workers)")
    ap.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                    help="encode through Ray (alone: a local cluster of --workers CPUs)")
    ap.add_argument("--device", default=None, help="dcm encode --device (cpu, cuda)")
    ap.add_argument("--max-memory", type=int, default=None, metavar="BYTES", help="dcm encode --max-memory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="where the pair and files go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the pair for later runs (with --workdir)")
    ap.add_argument("--no-check", action="store_true", help="skip decoding and checking the files")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    if not 1 <= args.layers <= 32:
        ap.error("--layers must be in 1..32")
    names = list(CONFIGS) if args.configs == "all" else [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")

    from dcm.parallel import default_threads

    concurrency = args.workers or args.threads or default_threads()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dcm-scale-"))
    root = workdir / f"llama7b-{args.layers}L"
    try:
        t0 = time.perf_counter()
        # In a child: its gigabytes of torch buffers never sit in this process, which forks the encodes.
        spec = {"root": str(root), "layers": args.layers, "seed": args.seed}
        subprocess.run([sys.executable, __file__, "_generate", json.dumps(spec)], check=True)
        base_dir, ft_dir = root / "base", root / "finetune"
        gen_s = time.perf_counter() - t0
        ft_bytes = sum(p.stat().st_size for p in ft_dir.glob("*.safetensors"))
        params = sum(math.prod(s) for _, s, _ in tensors(LLAMA_7B, args.layers))
        print(f"pair: {args.layers} layers, {params / 1e9:.2f} B params, {ft_bytes / 1e9:.2f} GB per checkpoint, "
              f"{len(list(ft_dir.glob('*.safetensors')))} shards; ready in {gen_s:.0f} s")
        rows = []
        for name in names:
            out = root / f"{name}.dcm"
            spec = {"config": name, "base": str(base_dir), "finetune": str(ft_dir), "out": str(out),
                    "workers": args.workers, "threads": args.threads, "ray": args.ray, "device": args.device,
                    "max_memory": args.max_memory}
            print(f"encode {name} ...", file=sys.stderr, flush=True)
            report = run_encode(spec)
            if not args.no_check:
                report.update(check_file(out, base_dir, ft_dir, name == "lossless"))
            out.unlink(missing_ok=True)
            report.update(project(name, report, args.layers, concurrency))
            report["config"] = name
            rows.append(report)
            if args.json:  # after each configuration: a long run that stops keeps what it measured
                args.json.write_text(json.dumps({"layers": args.layers, "concurrency": concurrency, "rows": rows},
                                                indent=1))
            print_table(rows[-1:], args, concurrency, ft_bytes, params, file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)

    print_table(rows, args, concurrency, ft_bytes, params)
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
