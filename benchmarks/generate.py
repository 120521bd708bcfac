#!/usr/bin/env python3
"""Generation through a patched model: per-token latency and memory of each hold mode.

A Llama-shaped model (default: hidden 2048, FFN 5632, 8 layers, 32 heads with 4
key/value heads, vocabulary 32000: TinyLlama's shape with 8 of its 22 layers),
random base weights N(0, 0.02²), and a fine-tune that adds to every matrix a
delta of long-tailed spectrum (s_i ∝ i^-0.8, ‖Δ‖ = ``--delta-scale``·‖W‖) and
to every norm a small change.  The pair is encoded with ``delta-come`` at
``--ratio`` (default 1/16, randomized SVD) and decoded; then, in one process:

- ``decoded``: the decoded checkpoint loaded with transformers (the yardstick);
- ``packed``:  the base patched with ``hold="packed"`` (the file's bytes; the
  torch backend on the CPU, Triton on CUDA);
- ``factors``: ``hold="factors"`` (V̂ and Û·diag(S) dequantized once, in the
  model's dtype: two small GEMMs per layer);
- ``merged``:  ``hold="merged"`` (W + Δ̂ decoded into the weights).

Each model prefills a ``--prompt``-token prompt, then decodes ``--tokens`` tokens
one at a time with its KV cache (greedy, the model's own argmax).  One round
runs every model once, in turn, so load on a shared machine hits them alike;
a model's per-token time in a round is the median of its steps, and the table
gives the median over ``--rounds`` rounds, and "× decoded" the median over
rounds of the ratio to the decoded model's time in the same round.  Memory is
what each model holds: its parameters and buffers plus the deltas its
``DeltaLinear`` modules keep (``nbytes``), and the process's peak RSS at the end.
Before timing, every model's logits on the prompt are compared with the decoded
model's.

    nice -n 10 python benchmarks/generate.py                 # the default shape, CPU, 1 thread
    python benchmarks/generate.py --device cuda --dtype bf16  # on a GPU
    python benchmarks/generate.py --hidden 256 --ffn 512 --layers 2 --vocab 1000 --tokens 4 --rounds 2

The pair, file and decoded checkpoint are kept in ``--workdir`` (default
out/bench-generate/<shape>) and reused by later runs of the same shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dcm  # noqa: E402
from dcm.runtime import DeltaLinear, patch_model  # noqa: E402

MODES = ("decoded", "packed", "factors", "merged")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def config(args):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
        initializer_range=0.02, tie_word_embeddings=False)


def shape_key(args) -> str:
    return (f"h{args.hidden}-f{args.ffn}-l{args.layers}-a{args.heads}-kv{args.kv_heads}-v{args.vocab}-"
            f"{args.dtype}-d{args.delta_scale}-r{args.ratio.replace('/', '_')}-s{args.seed}")


# --- the pair, the file, the decoded checkpoint --------------------------------------------------


def spectrum_delta(shape, decay: float, scale: float, norm: float, gen) -> torch.Tensor:
    """Δ = U·diag(s)·Vᵀ with Gaussian U, V and s_i ∝ i^-decay, scaled to ‖Δ‖ = scale·norm."""
    m, n = shape
    r = min(m, n)
    u = torch.randn(m, r, generator=gen) / m ** 0.5
    v = torch.randn(n, r, generator=gen) / n ** 0.5
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -decay
    delta = (u * s) @ v.T
    return delta * (scale * norm / delta.norm())


def build(args, workdir: Path) -> dict:
    """Write base/, finetune/, delta.dcm and decoded/ in ``workdir`` (once per shape); their paths."""
    import transformers

    paths = {"base": workdir / "base", "finetune": workdir / "finetune", "file": workdir / "delta.dcm",
             "decoded": workdir / "decoded"}
    stamp = workdir / "done.json"
    if stamp.exists():
        return {**paths, **json.loads(stamp.read_text())}
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    started = time.perf_counter()
    model = transformers.LlamaForCausalLM(config(args)).eval()
    model.to(dtype).save_pretrained(paths["base"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.float()
            if p.dim() == 2:
                w += spectrum_delta(tuple(p.shape), 0.8, args.delta_scale, float(w.norm()), gen)
            else:
                w += 0.01 * torch.randn(p.shape, generator=gen)
            p.copy_(w.to(p.dtype))
    model.save_pretrained(paths["finetune"])
    del model
    built = time.perf_counter() - started
    started = time.perf_counter()
    report = dcm.encode(paths["base"], paths["finetune"], paths["file"], method="delta-come", ratio=args.ratio,
                        options={"svd": "randomized"})
    encoded = time.perf_counter() - started
    dcm.decode(paths["file"], paths["base"], paths["decoded"])
    shutil.rmtree(paths["finetune"])  # not needed any more: the decoded checkpoint is the yardstick
    info = {"build_s": built, "encode_s": encoded, "file_bytes": report.file_bytes,
            "coded_bits": report.coverage.coded_bits, "params": report.params}
    stamp.write_text(json.dumps(info))
    return {**paths, **info}


# --- the models --------------------------------------------------------------------------------


def held_bytes(model) -> int:
    """Parameters and buffers (each storage once) plus the deltas DeltaLinear modules keep."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total + sum(m.pack.nbytes for m in model.modules() if isinstance(m, DeltaLinear))


def load_models(paths, modes, device, dtype, backend):
    import transformers

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().to(device)

    models = {}
    for mode in modes:
        started = time.perf_counter()
        if mode == "decoded":
            model = load(paths["decoded"])
        else:
            model = patch_model(load(paths["base"]), paths["file"], backend=backend, hold=mode)
        models[mode] = (model, time.perf_counter() - started)
    return models


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_steps(model, prompt, tokens: int, device) -> list[float]:
    """Seconds of each of ``tokens`` decode steps after a prefill of ``prompt`` (KV cache, greedy)."""
    out = model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(tokens):
        sync(device)
        started = time.perf_counter()
        out = model(input_ids=token, use_cache=True, **{CACHE_ARG: _cache(out)})
        sync(device)
        times.append(time.perf_counter() - started)
        token = out.logits[:, -1:].argmax(-1)
    return times


def _cache_arg() -> str:
    """transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns)."""
    import inspect

    import transformers

    return "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters \
        else "past_key_values"


CACHE_ARG = _cache_arg()


def _cache(out):
    return getattr(out, "cache", None) or out.past_key_values


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--ratio", default="1/16")
    ap.add_argument("--delta-scale", type=float, default=0.02, help="‖Δ‖ / ‖W‖ of each matrix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto", help="of the packed mode: auto, torch, triton")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per model and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared machine)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)

    modes = args.modes.split(",")
    if "decoded" not in modes or set(modes) - set(MODES):
        ap.error(f"--modes: a subset of {','.join(MODES)} that includes decoded")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    workdir = args.workdir or Path(__file__).resolve().parent.parent / "out" / "bench-generate" / shape_key(args)
    paths = build(args, workdir)
    models = load_models(paths, modes, device, dtype, args.backend)

    gen = torch.Generator().manual_seed(args.seed + 2)
    prompt = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=gen).to(device)
    with torch.no_grad():
        want = models["decoded"][0](input_ids=prompt).logits.float()
        diffs = {mode: float((m(input_ids=prompt).logits.float() - want).abs().max()) for mode, (m, _) in
                 models.items()}
    per_round = {mode: [] for mode in modes}
    for mode, (model, _) in models.items():  # warm-up
        decode_steps(model, prompt, 2, device)
    for _ in range(args.rounds):
        for mode, (model, _) in models.items():
            per_round[mode].append(statistics.median(decode_steps(model, prompt, args.tokens, device)))
    rows = []
    for mode in modes:
        model, load_s = models[mode]
        ratios = [t / d for t, d in zip(per_round[mode], per_round["decoded"])]
        rows.append({"mode": mode, "ms_per_token": 1e3 * statistics.median(per_round[mode]),
                     "x_decoded": statistics.median(ratios), "held_bytes": held_bytes(model),
                     "delta_bytes": sum(m.pack.nbytes for m in model.modules() if isinstance(m, DeltaLinear)),
                     "load_s": load_s, "max_logit_diff": diffs[mode]})
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    cfg = config(args)
    params = sum(p.numel() for p in models["decoded"][0].parameters())
    print(f"generate: Llama-shaped, hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, {cfg.num_hidden_layers} "
          f"layers, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, vocabulary "
          f"{cfg.vocab_size}: {params / 1e6:.1f}M parameters, {args.dtype}")
    print(f"delta: delta-come at {args.ratio} (randomized SVD), {paths['file_bytes']:,} bytes, "
          f"{paths['coded_bits']:.3f} bits per coded parameter; encode {paths['encode_s']:.1f} s")
    print(f"device {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads() if device.type == 'cpu' else '-'}, batch {args.batch}, "
          f"prompt {args.prompt}, {args.tokens} decode steps x {args.rounds} rounds (medians)")
    print()
    print("| hold | ms per token | × decoded | held MiB | of which delta MiB | patch/load s | max |logit diff| |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['ms_per_token']:.1f} | {r['x_decoded']:.2f} | {r['held_bytes'] / 2**20:,.0f} | "
              f"{r['delta_bytes'] / 2**20:,.1f} | {r['load_s']:.1f} | {r['max_logit_diff']:.2e} |")
    print(f"\npeak RSS of the process (all {len(modes)} models held at once): {peak_rss / 2**30:.2f} GiB")
    factors = next((r for r in rows if r["mode"] == "factors"), None)
    if factors is not None and device.type == "cpu" and args.batch == 1:
        verdict = "met" if factors["x_decoded"] <= 1.5 else "NOT met"
        print(f"target (CPU, batch 1): factors within 1.5x of decoded: {factors['x_decoded']:.2f}x, {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "peak_rss": peak_rss, "pair": {k: v for k, v in paths.items()
                                                                        if not isinstance(v, Path)}}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
