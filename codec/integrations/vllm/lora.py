"""``dcm export lora X.dcm --base BASE -o DIR [--max-rank R]``: a PEFT LoRA adapter (route 2).

vLLM's multi-LoRA serves many adapters of one base in one batch, chosen per request.
A .dcm record of a linear layer's weight becomes that module's LoRA pair, with
y += x·Aᵀ·Bᵀ·scaling and scaling = lora_alpha / r made exactly 1 per module
(``rank_pattern`` and ``alpha_pattern`` give every module r = alpha = its own rank):

- factor records (lowrank-mixed, lowrank, sparse-lowrank, lowrank-rotated; Δ̂ = Û·diag(S)·V̂ᵀ):
  A = V̂ (k × in), B = Ûᵀ·diag(S) (out × k), the dequantized factors as they are;
- every other lossy record (BitDelta's signs, DARE's sparse Δ̂, any additive kind whose
  factors are not stored as they are): the SVD of its Δ̂ as ``dcm decode`` computes it, at
  its numerical rank (up to min(out, in): a dense delta costs a dense adapter).

``max_rank`` truncates each module to its best rank-R approximation (an SVD of Δ̂,
computed from the factors), and the relative error ‖Δ̂ − Δ̂_R‖_F / ‖Δ̂‖_F it causes is
reported per module.  Records LoRA cannot express — norms, biases, embeddings and the
lm_head (vLLM's LoRA has no module for them), and exact records (dense-delta, full) —
are left out and listed in the report: the adapter serves base + the linear deltas.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import dcm
from dcm import records
from dcm.checkpoint import Checkpoint
from dcm.constants import Kind
from dcm.decode import check_base_names
from dcm.errors import UsageError

from .outdir import export_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Û, S, V̂ read from the packed record (a rotated record's vectors rotated back by the runtime)
FACTOR_KINDS = (Kind.LOWRANK_MIXED, Kind.LOWRANK, Kind.SPARSE_LOWRANK, Kind.LOWRANK_ROTATED)
EMBEDDING_PARTS = ("embed_tokens", "embed_positions", "wte", "wpe", "lm_head", "embed_out", "word_embeddings")
PEFT_PREFIX = "base_model.model."


@dataclass
class ModuleFactors:
    module: str  # the model's module name (the record's name without ".weight")
    rank: int
    error: float  # relative Frobenius error of the truncation (0.0: exact)
    source_rank: int  # rank before truncation


@dataclass
class LoraExport:
    path: str
    modules: list = field(default_factory=list)  # ModuleFactors
    unexpressible: list = field(default_factory=list)  # (record name, why)
    max_rank: int = 0

    def truncated(self) -> list:
        return [m for m in self.modules if m.rank < m.source_rank]


def why_unexpressible(rec) -> str | None:
    """Why LoRA cannot carry a record (None: it can)."""
    if rec.kind == Kind.REMOVED:
        return "removed tensor"
    module, _, leaf = rec.name.rpartition(".")
    last = module.rpartition(".")[2]
    if len(rec.shape) != 2 or leaf != "weight":
        return "bias" if leaf == "bias" else "not a linear weight (norm or other tensor)"
    if last in EMBEDDING_PARTS or any(p in module for p in ("embed", "wte", "wpe")):
        return "embedding or lm_head (no LoRA module for it in vLLM)"
    kind = _coded_kind(rec)
    if not isinstance(records.KINDS.get(kind), records.AdditiveKind):
        return f"exact record ({records.KIND_NAMES.get(kind, kind)}): stored exactly, not as a low-rank delta"
    return None


def _coded_kind(rec) -> int:
    """The kind that holds a record's delta: an adapted record's (a fine-tune saved in another dtype)
    inner kind, else its own."""
    return rec.params["inner"] if rec.kind == Kind.ADAPTED else rec.kind


def _check_no_growth(f, path) -> None:
    """Refuse a fine-tune whose tensors grew (a resized vocabulary): an adapter on the base keeps the
    base's vocabulary, so the new tokens' rows would be lost without a word."""
    grown = [r for r in f.records() if r.kind == Kind.ADAPTED and tuple(r.shape) != tuple(r.base["shape"])]
    if grown:
        r = grown[0]
        raise UsageError(f"{path}: tensor {r.name!r} has {r.shape[0]} rows against the base's "
                         f"{r.base['shape'][0]} (a vocabulary grown in fine-tuning; {len(grown)} such "
                         f"tensor(s)): a LoRA adapter cannot add them to the base; serve it with `dcm export vllm`")


def _factors(f, rec):
    """(B (out × k), A (k × in)) float64 with B·A = Δ̂ of a record LoRA can carry."""
    if _coded_kind(rec) in FACTOR_KINDS:
        from dcm.runtime import packed, torch_backend
        from dcm.runtime.layer import LayerPack

        loaded = packed.load_record(f, rec.name)
        if loaded.rank == 0:
            return np.zeros((rec.shape[0], 0)), np.zeros((0, rec.shape[1]))
        u, s, v = torch_backend.factor_delta(LayerPack(rec.shape, [loaded]), 0)
        return (u.double().numpy().T * s.double().numpy()), v.double().numpy()
    delta = f.stored_delta(rec.name).astype(np.float64)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    keep = int(np.sum(s > (s[0] if s.size else 0) * 1e-7))  # float32 Δ̂: the rest is rounding noise
    return u[:, :keep] * s[:keep], vt[:keep]


def truncate(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Best rank-``rank`` approximation of B·A (an SVD through QR of the thin factors) and its
    relative Frobenius error."""
    if b.shape[1] <= rank:
        return b, a, 0.0
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    total = float(np.sum(s ** 2))
    error = float(np.sqrt(np.sum(s[rank:] ** 2) / total)) if total > 0 else 0.0
    return (qb @ u[:, :rank]) * s[:rank], vt[:rank] @ qa.T, error


def export_lora(path, base, out_dir, *, max_rank: int | None = None, overwrite: bool = False) -> LoraExport:
    """Write the PEFT LoRA adapter of the .dcm file ``path`` (a fine-tune of ``base``) to ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise UsageError(f"--max-rank must be a positive integer, got {max_rank!r}")
    report = LoraExport(str(out_dir))
    tensors, ranks = {}, {}
    with dcm.open(path) as f:
        with Checkpoint(base) as ckpt:
            check_base_names(f, ckpt)
        _check_no_growth(f, path)
        for rec in f.records():
            why = why_unexpressible(rec)
            if why is not None:
                report.unexpressible.append((rec.name, why))
                continue
            b, a = _factors(f, rec)
            source = b.shape[1]
            error = 0.0
            if max_rank is not None:
                b, a, error = truncate(b, a, max_rank)
            if b.shape[1] == 0:
                continue  # Δ̂ = 0: nothing to add
            module = rec.name[:-len(".weight")]
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
            ranks[module] = b.shape[1]
            report.modules.append(ModuleFactors(module, b.shape[1], error, source))
    if not ranks:
        raise UsageError(f"{path}: no record LoRA can express (its linear weights are stored exactly or not "
                         f"at all); encode with a lossy method, or serve it with `dcm export vllm`")
    report.max_rank = max(ranks.values())
    config = adapter_config(ranks, str(base))
    with export_dir(out_dir, {".dcm file": path, "base": base}, overwrite, "lora") as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return report


def adapter_config(ranks: dict, base: str) -> dict:
    """PEFT's LoraConfig as JSON, with r = lora_alpha per module (scaling exactly 1)."""
    top = max(ranks.values())
    pattern = {re.escape(module): rank for module, rank in sorted(ranks.items())}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": top, "lora_alpha": top, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted({m.rpartition(".")[2] for m in ranks}),
        "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }


def adapter_bytes(adapter_dir) -> int:
    return Path(adapter_dir, ADAPTER_WEIGHTS).stat().st_size
