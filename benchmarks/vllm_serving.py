#!/usr/bin/env python3
"""Serving .dcm fine-tunes in vLLM: throughput, per-token latency and memory of each route.

Runs in the vLLM venv (``bash scripts/vllm_env.sh``), on whatever platform vLLM finds
(the CPU here; a GPU where there is one), with the tiny trained models of
``tests/tiny_llms.py`` (or ``--base`` / ``--finetunes`` of your own):

- base: the base model alone (the floor);
- route 1: one fine-tune through ``dcm export vllm`` (linear deltas packed);
- route 2: N fine-tunes as LoRA adapters (``dcm export lora``) + base, one mixed batch;
- decoded x N: each fine-tune decoded (``dcm decode``) and served by its own engine,
  one after another (their times add up; their weights would all be resident at once).

Per configuration: per-token latency = median over ``--repeats`` of (time of one request
of ``--tokens`` new tokens) / tokens; throughput = generated tokens / time of a batch of
``--batch`` requests (median over repeats).  Memory is what each route keeps besides
the base: packed delta bytes (route 1), LoRA slot tensors (route 2: max_loras x max
rank, dense, in lora_dtype), or whole extra models (decoded).  Figures on a shared
machine are noisy: compare ratios within one run.

    ~/.cache/dcm/vllm-venv/bin/python benchmarks/vllm_serving.py --n 2
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(work: Path) -> None:
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TMPDIR=str(work / "tmp"),
                      VLLM_CACHE_ROOT=str(work / "vllm-cache"), VLLM_LOGGING_LEVEL="WARNING")
    tempfile.tempdir = None


def _finetunes(args, work: Path):
    """(base dir, [.dcm paths]) — N fine-tunes of one base: ft1/ft2 of the tiny model, coded by
    different methods when N > 2 (each file is a different fine-tune as far as serving goes)."""
    import dcm

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_llms

    if args.base:
        return Path(args.base), [Path(p) for p in args.finetunes]
    base = tiny_llms.model_dir(args.family)
    methods = ["delta-come", "lowrank", "impart-qt", "bitdelta"]
    out = []
    for i in range(args.n):
        role, method = ("ft1", "ft2")[i % 2], methods[(i // 2) % len(methods)]
        path = work / f"{role}-{method}.dcm"
        if not path.exists():
            dcm.encode(base, tiny_llms.model_dir(args.family, role), path, method=method, allow_uncoded=True)
        out.append(path)
    return base, out


def _engine(model, args, **kw):
    from vllm import LLM

    return LLM(model=str(model), dtype=args.dtype, max_model_len=128, enforce_eager=True,
               max_num_seqs=max(args.batch, 8), seed=0, **kw)


def _close(engine) -> None:
    try:
        engine.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    del engine
    gc.collect()


def _prompts(count: int, length: int = 16) -> list:
    return [[(17 * i + 5 * j) % 400 + 3 for j in range(length)] for i in range(count)]


def _time(engine, args, loras) -> tuple[float, float]:
    """(seconds per token of one request, generated tokens per second of a batch)."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=args.tokens, min_tokens=args.tokens, ignore_eos=True)
    engine.generate([{"prompt_token_ids": _prompts(1)[0]}], SamplingParams(max_tokens=2),
                    lora_request=loras[:1] if loras else None, use_tqdm=False)  # warm-up
    single, batch = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        engine.generate([{"prompt_token_ids": _prompts(1)[0]}], sp, lora_request=loras[:1] if loras else None,
                        use_tqdm=False)
        single.append((time.perf_counter() - t) / args.tokens)
        requests = [{"prompt_token_ids": p} for p in _prompts(args.batch)]
        t = time.perf_counter()
        engine.generate(requests, sp, lora_request=[loras[i % len(loras)] for i in range(args.batch)] if loras
                        else None, use_tqdm=False)
        batch.append(args.batch * args.tokens / (time.perf_counter() - t))
    return statistics.median(single), statistics.median(batch)


def _bytes_where(engine, what) -> int:
    return sum(engine.apply_model(what))


def _packed_bytes(model) -> int:
    return sum(pack.nbytes for m in model.modules() for pack, _ in getattr(m, "dcm_packs", ()))


def _lora_slot_bytes(model) -> int:
    import torch

    total = 0
    for m in model.modules():
        for name in ("lora_a_stacked", "lora_b_stacked"):
            stacked = getattr(m, name, None)
            for t in [stacked] if isinstance(stacked, torch.Tensor) else (stacked or ()):
                total += t.numel() * t.element_size()
    return total


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="llama", help="tiny model family (tests/tiny_llms.py)")
    p.add_argument("--base", help="a base model directory (with --finetunes)")
    p.add_argument("--finetunes", nargs="+", default=[], help=".dcm files of --base")
    p.add_argument("--n", type=int, default=2, help="fine-tunes served at once (default 2)")
    p.add_argument("--batch", type=int, default=8, help="requests per batch (default 8)")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per request (default 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--skip-decoded", action="store_true", help="leave out the N decoded engines")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="dcm-vllm-bench-"))
    _env(work)
    import dcm
    from dcm.integrations.vllm import export_lora, export_vllm

    base, files = _finetunes(args, work)
    if args.base:
        args.n = len(files)
    rows = []
    import torch
    from vllm.lora.request import LoRARequest

    base_bytes = _weights_bytes(base)
    platform = "GPU " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"platform: {platform}; base {base} ({base_bytes / 2**20:.1f} MiB of weights), {args.n} fine-tunes, "
          f"batch {args.batch} x {args.tokens} new tokens, dtype {args.dtype}, median of {args.repeats}",
          flush=True)

    engine = _engine(base, args)
    rows.append(("base only", *_time(engine, args, None), 0, "-"))
    _close(engine)

    served = work / "route1"
    export_vllm(files[0], base, served)
    engine = _engine(served, args)
    extra = _bytes_where(engine, _packed_bytes)
    rows.append(("route 1 (dcm quantization method), 1 fine-tune", *_time(engine, args, None), extra,
                 "packed deltas"))
    _close(engine)

    adapters, ranks = [], []
    for i, path in enumerate(files):
        report = export_lora(path, base, work / f"lora{i}")
        adapters.append(LoRARequest(f"ft{i}", i + 1, str(work / f"lora{i}")))
        ranks.append(report.max_rank)
    max_rank = next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= max(ranks))
    engine = _engine(base, args, enable_lora=True, max_loras=args.n + 1, max_lora_rank=max_rank)
    extra = _bytes_where(engine, _lora_slot_bytes)
    rows.append((f"route 2 (LoRA), {args.n} fine-tunes + base, mixed", *_time(engine, args, [None, *adapters]),
                 extra, f"slots {args.n + 1} x rank {max_rank}"))
    _close(engine)

    if not args.skip_decoded:
        lat, tput = [], []
        for i, path in enumerate(files):
            out = work / f"decoded{i}"
            dcm.decode(path, base, out)
            engine = _engine(out, args)
            one, many = _time(engine, args, None)
            _close(engine)
            lat.append(one)
            tput.append(many)
        # The N engines serve their shares one after another: N batches take the sum of their times.
        total = args.n * args.batch * args.tokens / sum(args.batch * args.tokens / t for t in tput)
        rows.append((f"decoded x {args.n}, one engine each", statistics.median(lat), total,
                     (args.n - 1) * base_bytes, f"{args.n} models resident"))

    print(f"\n{'configuration':<52} {'ms/token (1 req)':>16} {'tokens/s (batch)':>16} {'memory besides base':>20}")
    for name, one, many, extra, what in rows:
        print(f"{name:<52} {1000 * one:>16.1f} {many:>16.1f} {extra / 2**20:>12.2f} MiB ({what})")
    floor = rows[0][2]
    print("\nthroughput relative to the base alone: " +
          ", ".join(f"{name.split(',')[0]} {many / floor:.2f}x" for name, _, many, _, _ in rows[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
