"""One .dcm file applied to a model while vLLM loads it (route 1), without importing vLLM.

vLLM builds the model first, then streams the base checkpoint's tensors through the
model's weight loaders.  Every record of the file is handled in one of two ways:

- **kept packed**: the weight of a linear layer that the ``dcm`` quantization method
  serves, coded by a kind the runtime computes from its packed bytes (lowrank-mixed,
  sparse-lowrank, sign, lowrank, lowrank-rotated).  The layer *claims* it when it is built; at load the
  base tensor goes to vLLM unchanged, tagged with the record's name, and the layer's
  weight loader attaches the packed record (with the fused layer's ``shard_id``);
- **folded**: everything else (norms, biases, embeddings, an lm_head, exact records,
  DARE's sparse Δ̂, any linear weight no dcm layer claims): the base tensor is
  replaced in the stream by the fine-tuned tensor, decoded by dcm exactly as
  ``dcm decode`` writes it.

Every base tensor is checked against the file's reference (sha256) on the way: a wrong
base raises ``WrongBaseError``.  ``check_complete`` refuses a model in which some record
was neither folded nor attached (the model renamed or transformed a tensor on its way,
e.g. GPT-2's transposed Conv1D weights), so a delta is never silently dropped.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

import dcm
from dcm.constants import Kind
from dcm.errors import UsageError
from dcm.reader import check_base_tensor

PACKED_KINDS = (Kind.LOWRANK_MIXED, Kind.SPARSE_LOWRANK, Kind.SIGN, Kind.LOWRANK, Kind.LOWRANK_ROTATED)
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
SEEN = "_dcm_seen"  # attribute on a streamed tensor: already folded or tagged (nested loaders)
RECORD = "_dcm_record"  # attribute on a streamed base tensor: the packed record it carries


def storage(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as dcm's storage array (BF16 as uint16 bit patterns)."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_storage(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    array = np.ascontiguousarray(array)
    if dtype_name == "BF16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def weight_names(prefix: str, packed_modules: dict) -> list[tuple[str, object]]:
    """(checkpoint weight name, shard id) that a vLLM linear layer named ``prefix`` loads.

    A fused layer (``qkv_proj`` in a model whose ``packed_modules_mapping`` lists
    ``q_proj, k_proj, v_proj``) loads one tensor per part; a checkpoint may also hold it
    already fused (Phi-3), shard None.
    """
    parent, _, last = prefix.rpartition(".")
    names = [(f"{prefix}.weight", None)]
    for i, part in enumerate(packed_modules.get(last, ())):
        shard = "qkv"[i] if last.endswith("qkv_proj") and len(packed_modules[last]) == 3 else i
        names.append((f"{parent}.{part}.weight" if parent else f"{part}.weight", shard))
    return names


class ModelDeltas:
    """The records of one .dcm file and what became of each while a model loaded."""

    def __init__(self, path, check_base: bool = True):
        self.path = str(path)
        self.file = dcm.open(path)
        self.check_base = check_base
        self.records = {r.name: r for r in self.file.records()}
        removed = [n for n, r in self.records.items() if r.kind == Kind.REMOVED]
        if removed:
            raise UsageError(f"{self.path}: the fine-tune removes base tensors ({', '.join(removed[:3])}); "
                             f"vLLM cannot serve it as a delta of the base, decode it instead")
        self.claimed: dict[str, str] = {}  # record name -> vLLM layer prefix
        self.folded: set[str] = set()
        self.attached: set[str] = set()
        self._lock = threading.Lock()

    # --- names -----------------------------------------------------------------------

    def find(self, name: str) -> str | None:
        """The record for a checkpoint or model tensor name: equal, or equal after a leading
        prefix on either side (``model.`` kept by one, stripped by the other); None if none or
        ambiguous."""
        if name in self.records:
            return name
        hits = [r for r in self.records if r.endswith("." + name) or name.endswith("." + r)]
        return hits[0] if len(hits) == 1 else None

    def claim(self, prefix: str, packed_modules: dict, shape_of) -> dict:
        """Records a linear layer named ``prefix`` will keep packed: {record: shard id}.

        ``shape_of(shard)`` gives the (out, in) shape the layer expects for a shard's full
        (unsharded) weight, or None where it cannot tell; a record of another shape is left
        to be folded (correct, just not packed).
        """
        out = {}
        for name, shard in weight_names(prefix, packed_modules):
            rec_name = self.find(name)
            if rec_name is None:
                continue
            rec = self.records[rec_name]
            if rec.kind not in PACKED_KINDS:
                continue
            want = shape_of(shard)
            if want is not None and tuple(want) != tuple(rec.shape):
                continue
            out[rec_name] = shard
            self.claimed[rec_name] = prefix
        return out

    # --- the weight stream -------------------------------------------------------------

    def fold(self, weights):
        """The checkpoint's (name, tensor) stream with every unclaimed record decoded into its tensor."""
        for name, tensor in weights:
            if getattr(tensor, SEEN, False) or not isinstance(tensor, torch.Tensor):
                yield name, tensor
                continue
            rec_name = self.find(name)
            if rec_name is None:
                yield name, tensor
                continue
            rec = self.records[rec_name]
            if rec_name in self.claimed:
                if self.check_base and rec.base is not None:
                    check_base_tensor(rec, storage(tensor))
                setattr(tensor, RECORD, rec_name)
                setattr(tensor, SEEN, True)
                yield name, tensor
                continue
            value = self._decoded(rec, tensor)
            setattr(value, SEEN, True)
            with self._lock:
                self.folded.add(rec_name)
            yield name, value

    def _decoded(self, rec, tensor: torch.Tensor) -> torch.Tensor:
        base = storage(tensor)
        if rec.base is not None and _TORCH.get(rec.base["dtype"]) not in (None, tensor.dtype):
            raise UsageError(f"{self.path}: tensor {rec.name!r} is {tensor.dtype} in the checkpoint vLLM "
                             f"loads, the file's base is {rec.base['dtype']}")
        if rec.kind == Kind.FULL:
            if self.check_base and rec.base is not None:
                check_base_tensor(rec, base)
            array = self.file.tensor(rec.name)
        else:
            array = self.file.tensor(rec.name, base, check_base=self.check_base)
        return from_storage(array, rec.dtype).reshape(rec.shape)

    # --- after loading -------------------------------------------------------------------

    def attach(self, rec_name: str) -> None:
        with self._lock:
            self.attached.add(rec_name)

    def check_complete(self) -> None:
        """Every record folded into a base tensor or attached to its layer, else UsageError."""
        done = self.folded | self.attached
        missing = [n for n in self.records if n not in done]
        if not missing:
            return
        claimed = [n for n in missing if n in self.claimed]
        why = ("the model transformed or renamed these tensors while loading them (GPT-2's Conv1D "
               "weights are transposed, for one), so their packed deltas never reached their layers"
               if claimed else "vLLM never loaded these tensors of the base checkpoint")
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UsageError(f"{self.path}: {len(missing)} records were not applied ({shown}): {why}; "
                         f"serve this model with route 2 (`dcm export lora`) or decode it")

    def close(self) -> None:
        self.file.close()
