"""``dcm export vllm`` and ``dcm export lora``: what they print (the work is in model_dir and lora)."""

from __future__ import annotations

from dcm.info import sanitize


def run(args, say, warn) -> int:
    if args.target == "vllm":
        return _vllm(args, say)
    return _lora(args, say, warn)


def _vllm(args, say) -> int:
    from .model_dir import export_vllm

    r = export_vllm(args.input, args.base, args.output, overwrite=args.overwrite, backend=args.backend)
    say(args, f"wrote {sanitize(r.path)}: vLLM model directory of a {sanitize(r.method)} fine-tune, "
              f"{len(r.linked)} base weight files linked, {r.packed} linear deltas served packed, "
              f"{r.folded} other records decoded into the base weights at load")
    say(args, f"  serve it: LLM(model={r.path!r}) or python -m vllm.entrypoints.openai.api_server --model {r.path}")
    return 0


def _lora(args, say, warn) -> int:
    from .lora import adapter_bytes, export_lora

    r = export_lora(args.input, args.base, args.output, max_rank=args.max_rank, overwrite=args.overwrite)
    ranks = sorted({m.rank for m in r.modules})
    say(args, f"wrote {sanitize(r.path)}: LoRA adapter, {len(r.modules)} modules, ranks {ranks[0]}..{ranks[-1]} "
              f"(serve with --max-lora-rank >= {r.max_rank}), {adapter_bytes(r.path)} bytes, scaling 1 per module")
    cut = r.truncated()
    if cut:
        worst = max(cut, key=lambda m: m.error)
        say(args, f"  --max-rank {args.max_rank} truncated {len(cut)} modules; relative error "
                  f"||D - D_r||/||D|| up to {worst.error:.4g} ({sanitize(worst.module)}, rank "
                  f"{worst.source_rank} -> {worst.rank})")
        for m in cut:
            say(args, f"    {sanitize(m.module)}: rank {m.source_rank} -> {m.rank}, error {m.error:.4g}")
    if r.unexpressible:
        warn(f"{len(r.unexpressible)} records are not in the adapter (LoRA cannot express them); a server "
             f"using it computes the base's tensors there:")
        by_reason: dict = {}
        for name, why in r.unexpressible:
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            shown = ", ".join(sanitize(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            warn(f"  {why}: {shown}")
    return 0
