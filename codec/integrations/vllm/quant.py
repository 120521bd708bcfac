"""Route 1: the vLLM quantization method ``dcm`` — one fine-tune, its linear deltas kept packed.

A model directory made by ``dcm export vllm`` says in its ``config.json``::

    "quantization_config": {"quant_method": "dcm", "dcm_file": "finetune.dcm", ...}

and vLLM builds the model with ``DcmConfig``.  Each linear layer gets ``DcmLinearMethod``:
vLLM's own unquantized matmul for the base weight (the same kernel as without dcm),
then y += x·Δ̂ᵀ from the packed records with dcm's runtime kernels (Triton on a GPU,
the torch backend on the CPU).  The other records are decoded into the base tensors as
vLLM streams them (``deltas.ModelDeltas.fold``), through the checkpoint weight mapper
that vLLM's ``AutoWeightsLoader`` takes from the quantization config.

``apply`` receives no request ids, so this route serves one fine-tune per engine; route
2 (LoRA) serves many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import torch

from vllm.model_executor.layers.linear import (LinearBase, MergedColumnParallelLinear, QKVParallelLinear,
                                               RowParallelLinear, UnquantizedLinearMethod,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.models.utils import WeightsMapper

from dcm.errors import UsageError
from dcm.runtime import packed
from dcm.runtime.layer import LayerPack, Segments

from .deltas import RECORD, ModelDeltas
from .sharding import BACKENDS, ShardPlan, column_rows, kernel_for, row_cols

QUANT_METHOD = "dcm"


# --- the layouts of vLLM's linear layers, per shard --------------------------------------------


@dataclass
class Shard:
    shard_id: Any
    full_rows: int  # outputs of the whole (unsharded) weight of this shard
    offset: int  # where this rank's rows start in the layer's output
    rows: torch.Tensor | None  # this rank's rows of the shard's full weight (None: all)


def shards(layer: LinearBase) -> list[Shard]:
    """Each logical weight of a layer: its full size and this rank's part of it."""
    rank, size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
    if isinstance(layer, QKVParallelLinear):
        sizes = [(layer.total_num_heads * layer.head_size, layer.num_heads * layer.head_size, 1),
                 (layer.total_num_kv_heads * layer.head_size, layer.num_kv_heads * layer.head_size,
                  layer.num_kv_head_replicas),
                 (layer.total_num_kv_heads * layer.v_head_size, layer.num_kv_heads * layer.v_head_size,
                  layer.num_kv_head_replicas)]
        ids = ["q", "k", "v"]
    elif isinstance(layer, MergedColumnParallelLinear):
        sizes = [(full, full // size, 1) for full in layer.output_sizes]
        ids = list(range(len(sizes)))
    elif isinstance(layer, RowParallelLinear):
        return [Shard(None, layer.output_size, 0, None)]
    else:  # ColumnParallelLinear, ReplicatedLinear
        per_rank = getattr(layer, "output_size_per_partition", layer.output_size)
        rows = None if per_rank == layer.output_size else column_rows(layer.output_size, rank, size)
        return [Shard(None, layer.output_size, 0, rows)]
    out, offset = [], 0
    for shard_id, (full, per_rank, replicas) in zip(ids, sizes):
        out.append(Shard(shard_id, full, offset, column_rows(full, rank, size, replicas)))
        offset += per_rank
    # The same weight stored fused in the checkpoint (Phi-3's qkv_proj): every shard's rows.
    starts = [sum(s.full_rows for s in out[:i]) for i in range(len(out))]
    fused_rows = None if size == 1 else torch.cat([
        (s.rows if s.rows is not None else torch.arange(s.full_rows)) + start for s, start in zip(out, starts)])
    return [Shard(None, sum(s.full_rows for s in out), 0, fused_rows)] + out


def input_cols(layer: LinearBase) -> torch.Tensor | None:
    if isinstance(layer, RowParallelLinear):
        return row_cols(layer.input_size, getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1))
    return None


# --- the config and the linear method ----------------------------------------------------------


@register_quantization_config(QUANT_METHOD)
class DcmConfig(QuantizationConfig):
    """``quantization_config`` of a model directory from ``dcm export vllm``."""

    def __init__(self, dcm_file: str, backend: str = "auto", check_base: bool = True):
        super().__init__()
        if backend not in BACKENDS:
            raise UsageError(f"dcm backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.dcm_file = dcm_file
        self.backend = backend
        self.check_base = check_base
        self._deltas: ModelDeltas | None = None

    def __repr__(self) -> str:
        return f"DcmConfig(dcm_file={self.dcm_file!r}, backend={self.backend!r})"

    @property
    def deltas(self) -> ModelDeltas:
        if self._deltas is None:  # opened in the process that builds the model (a worker)
            self._deltas = ModelDeltas(self.dcm_file, check_base=self.check_base)
        return self._deltas

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the kernels are plain Triton (and torch): any GPU vLLM runs on

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DcmConfig":
        path = config.get("dcm_file")
        if not isinstance(path, str) or not path:
            raise UsageError("quantization_config of quant_method 'dcm' needs 'dcm_file', the .dcm file's path")
        return cls(path, config.get("backend", "auto"), bool(config.get("check_base", True)))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        # vLLM calls this with the model's path before building it: a relative dcm_file
        # (what `dcm export vllm` writes) lies in the model directory, wherever it was moved.
        if not os.path.isabs(self.dcm_file) and os.path.isdir(model_name):
            self.dcm_file = os.path.join(model_name, self.dcm_file)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_deltas"] = None  # an open file does not travel to another process; reopened there
        return state

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            return DcmLinearMethod(self, prefix)
        return None  # embeddings, attention: vLLM's own; their records are folded at load

    def get_checkpoint_weight_mapper(self) -> WeightsMapper:
        # vLLM's AutoWeightsLoader merges this mapper into the one it applies to the
        # checkpoint's stream: the hook through which records are folded at load.
        return FoldingMapper(orig_to_new_suffix={".g_idx": None}, deltas=self.deltas)


@dataclass
class FoldingMapper(WeightsMapper):
    """A ``WeightsMapper`` that also decodes the .dcm records into the tensors it passes on.

    vLLM combines mappers with ``|``; this class keeps itself (and its ``deltas``) through
    that, on either side, so the model's own renames still apply after the fold.
    """

    deltas: ModelDeltas | None = None

    def _merged(self, left: WeightsMapper, right: WeightsMapper) -> "FoldingMapper":
        both = WeightsMapper.__or__(left, right)
        return FoldingMapper(**{f.name: getattr(both, f.name) for f in fields(WeightsMapper)}, deltas=self.deltas)

    def __or__(self, other: WeightsMapper) -> "FoldingMapper":
        return self._merged(self, other)

    def __ror__(self, other: WeightsMapper) -> "FoldingMapper":
        return self._merged(other, self)

    def apply(self, weights):
        return super().apply(self.deltas.fold(weights))


@register_weight_loader_v2_supported_method
class DcmLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear layer plus this layer's packed deltas (one per shard)."""

    def __init__(self, config: DcmConfig, prefix: str):
        super().__init__()
        self.config = config
        self.prefix = prefix

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        deltas = self.config.deltas
        layout = {s.shard_id: s for s in shards(layer)}
        claims = deltas.claim(self.prefix, self.config.packed_modules_mapping,
                              lambda sid: (layout[sid].full_rows, input_size) if sid in layout else None)
        layer.dcm_claims = claims  # record -> shard id
        layer.dcm_layout = layout
        layer.dcm_cols = input_cols(layer)
        layer.dcm_records = []  # (record name, shard id) attached while loading
        loader = extra_weight_attrs["weight_loader"]

        def weight_loader(param, loaded_weight, *args, **kwargs):
            rec_name = getattr(loaded_weight, RECORD, None)
            if rec_name is not None and rec_name in claims:
                shard_id = args[0] if args else next(iter(kwargs.values()), None)
                if shard_id != claims[rec_name] and not (shard_id is None and claims[rec_name] is None):
                    raise UsageError(f"{self.prefix}: record {rec_name!r} was loaded as shard {shard_id!r}, "
                                     f"dcm expected shard {claims[rec_name]!r}")
                layer.dcm_records.append((rec_name, claims[rec_name]))
                deltas.attach(rec_name)
            return loader(param, loaded_weight, *args, **kwargs)

        extra_weight_attrs["weight_loader"] = weight_loader
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **extra_weight_attrs)

    def process_weights_after_loading(self, layer) -> None:
        deltas = self.config.deltas
        deltas.check_complete()
        device = next((p.device for p in layer.parameters()), torch.device("cpu"))
        layer.dcm_packs = []
        for rec_name, shard_id in layer.dcm_records:
            shard = layer.dcm_layout[shard_id]
            rec = packed.load_record(deltas.file, rec_name)
            if isinstance(rec, packed.FactorRecord) and rec.rank == 0:
                continue  # Δ̂ = 0
            pack = LayerPack(rec.shape, [rec], device)
            layer.dcm_packs.append((pack, ShardPlan(shard.offset, shard.rows, layer.dcm_cols)))
        layer.dcm_kernel = kernel_for(self.config.backend, device)
        super().process_weights_after_loading(layer)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = super().apply(layer, x, bias)
        if not layer.dcm_packs:
            return y
        from .sharding import apply_planned

        flat_x = x.reshape(-1, x.shape[-1])
        flat_y = y.view(-1, y.shape[-1])
        segments = Segments.single(flat_x.shape[0], x.device)
        with torch.no_grad():
            for pack, plan in layer.dcm_packs:
                apply_planned(layer.dcm_kernel, pack, plan, flat_x, flat_y, segments)
        return y
