"""torch modules that serve .dcm deltas on one copy of the base model (inference only).

- ``DeltaLinear(base_linear, record)``: y = base(x) + x·Δ̂ᵀ.
- ``patch_model(model, path, hold=...)``: every linear weight stored as a lossy delta
  becomes a ``DeltaLinear`` (or, with ``hold="merged"``, is decoded into the weight);
  every other tensor of the file (biases, norms, embeddings, exact records) is
  decoded against the model's own tensor and written into it, so the patched model
  computes what the decoded checkpoint computes.
- ``patch_model_multi(model, paths)`` → ``MultiDelta``: K deltas at once; linear layers
  become ``MultiDeltaLinear`` (one launch per stage for all deltas), token-wise
  modules whose parameters differ between deltas (embeddings, norms, a tied lm_head)
  hold one parameter set per delta; ``with handle.use(delta_ids): model(...)`` picks the
  delta of each sequence (ids of shape (batch,)) or of each token (shape (batch, seq)).

Linear layers are ``nn.Linear`` (weight out × in) and transformers' ``Conv1D`` (GPT-2:
weight in × out; its records are served with the factors' roles swapped).

How a delta is held (``hold``):

- ``"packed"``: the file's bytes (least memory); the backend's kernels compute x·Δ̂ᵀ
  from them on every call.
- ``"factors"``: V̂ and Û·diag(S) dequantized once, in the model's dtype: two small
  GEMMs per call (k·(m + n) elements per layer instead of the packed bytes).
- ``"merged"`` (``patch_model`` only): W + Δ̂ decoded into the weight: the dense
  model's speed and memory; one delta per model.

Tied parameters (an lm_head that is the embedding matrix) are patched consistently:
``patch_model`` decodes such a tensor into the shared parameter, ``patch_model_multi``
serves every module that holds it per delta.

A base loaded in another dtype than its checkpoint's: the model's tensor is cast
back to the checkpoint's dtype and checked against the file; that gives the
checkpoint's bytes when the model's dtype is wider (a bf16 checkpoint loaded in
float32).  When it is narrower (a float32 checkpoint loaded in bfloat16) the
bytes are lost, unless every value fitted: the base cannot be checked
(``check_base=True`` refuses, naming the tensor; ``check_base=False`` applies the
file to the base as the model holds it, cast back, so the patched model carries
about the rounding the model's dtype already put on the base).  Patched weights
are computed in the checkpoint's dtype, then cast to the model's.

A fine-tune of another dtype than its base, or with a grown vocabulary, is stored
as ``adapted`` records (spec 10.13): an inner record against the base cast to the
fine-tune's dtype, then the new rows.  A layer serves the inner record's Δ̂ on the
base as the model holds it (so a packed layer differs from the decoded checkpoint
by the rounding of the base to the fine-tune's dtype: ``hold="merged"`` gives the
decoded weights exactly).  For more rows, ``patch_model`` grows the model's
embedding and lm_head (and what is tied to them, and ``config.vocab_size``), or
takes a model the user resized already; ``patch_model_multi`` refuses such files
(one vocabulary per model), naming the tensor.

Backends: ``"triton"`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``), ``"torch"``
(the same math in torch ops), ``"auto"``: triton on CUDA, torch elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import torch
from torch import nn

import dcm
from dcm import records
from dcm.constants import Kind
from dcm.errors import UsageError, WrongBaseError
from dcm.reader import DcmFile, check_base_tensor, tensor_sha256

from . import packed, rotation, torch_backend
from .factors import LayerFactors
from .layer import LayerPack, Segments

PACKED_KINDS = (Kind.LOWRANK_MIXED, Kind.SPARSE_LOWRANK, Kind.SIGN, Kind.LOWRANK, Kind.LOWRANK_ROTATED)
BACKENDS = ("auto", "torch", "triton")
HOLDS = ("packed", "factors", "merged")
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _apply_fn(backend: str, device: torch.device):
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("the triton backend needs a CUDA device, or TRITON_INTERPRET=1 on the CPU")
        from . import triton_backend  # imported late: Triton reads TRITON_INTERPRET at import
        return functools.partial(rotation.apply, triton_backend.apply)
    return functools.partial(rotation.apply, torch_backend.apply)


def _check_hold(hold: str, allowed=HOLDS) -> None:
    if hold not in allowed:
        raise UsageError(f"hold must be one of {', '.join(allowed)}, got {hold!r}")


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and kin): y = x·W + b with W stored in × out."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == module.nf)


def linear_geometry(module: nn.Module) -> tuple[int, int, bool] | None:
    """(out_features, in_features, weight stored transposed) of a linear layer; None for other modules."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    if _is_conv1d(module):
        return module.nf, module.weight.shape[0], True
    return None


def _holder(shape, recs, hold: str, weight: torch.Tensor):
    if hold == "factors":
        return LayerFactors(shape, recs, weight.device, dtype=weight.dtype)
    return LayerPack(shape, recs, weight.device)


class DeltaLinear(nn.Module):
    """A base linear layer (``nn.Linear`` or ``Conv1D``) plus one delta of its weight.

    ``record`` (from ``packed.load_record``, in the (out, in) orientation: pass
    ``transpose=True`` there for a ``Conv1D``), or a ``LayerPack`` / ``LayerFactors``.
    ``hold``: "packed" (the bytes, computed by ``backend``) or "factors" (see the module).
    ``rows``: the delta covers the first ``rows`` outputs only (a grown lm_head's base rows).
    """

    def __init__(self, base_linear: nn.Module, record, backend: str = "auto", *, hold: str = "packed",
                 rows: int | None = None):
        super().__init__()
        geometry = linear_geometry(base_linear)
        if geometry is None:
            raise UsageError(f"DeltaLinear wraps an nn.Linear or a Conv1D, not a {type(base_linear).__name__}")
        _check_hold(hold, ("packed", "factors"))
        self.base, self.backend, self.hold = base_linear, backend, hold
        self.out_features, self.in_features, self.transposed = geometry
        self.rows = self.out_features if rows is None else rows
        if isinstance(record, (LayerPack, LayerFactors)):
            self.pack = record
        else:
            self.pack = _holder((self.rows, self.in_features), [record], hold, base_linear.weight)
        self._kernel = _apply_fn(backend, base_linear.weight.device)

    def forward(self, x):
        y = self.base(x)
        pack = self.pack
        if isinstance(pack, LayerFactors) and pack.rest is None:  # two GEMMs, no reshaping
            if pack.factors:
                v, us = pack.factors[0]
                delta = torch.nn.functional.linear(torch.nn.functional.linear(x.to(v.dtype), v), us).to(y.dtype)
                if self.rows == self.out_features:
                    y = y + delta
                else:
                    y[..., :self.rows] += delta
            return y
        flat_x = x.reshape(-1, x.shape[-1]).contiguous()
        flat_y = y.view(-1, y.shape[-1])[:, :self.rows]
        seg = Segments.single(flat_x.shape[0], x.device)
        with torch.no_grad():
            if isinstance(pack, LayerFactors):
                pack.apply(flat_x, seg, flat_y, self._kernel)
            else:
                self._kernel(pack, flat_x, seg, flat_y)
        return y

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() reach modules through _apply: move the held delta along with the base.
        super()._apply(fn, *args, **kwargs)
        if hasattr(self, "pack"):
            self.pack.to(self.base.weight.device)
            self._kernel = _apply_fn(self.backend, self.base.weight.device)
        return self

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, delta {self.pack.nbytes} bytes held {self.hold}, "
                f"backend {self.backend}")


class MultiDelta:
    """K deltas patched into one model; ``use(delta_ids)`` says which delta each sequence or token takes."""

    def __init__(self, paths):
        self.paths = [None if p is None else str(p) for p in paths]  # None: the base itself
        self.num_deltas = len(self.paths)
        self._ids = None
        self._segments = {}

    @contextlib.contextmanager
    def use(self, delta_ids):
        """Run the model with ``delta_ids``: shape (batch,) per sequence, or (batch, seq) per token."""
        self.set_delta_ids(delta_ids)
        try:
            yield self
        finally:
            self.set_delta_ids(None)

    def set_delta_ids(self, delta_ids):
        if delta_ids is not None:
            delta_ids = torch.as_tensor(delta_ids, dtype=torch.int64)
            if delta_ids.numel() and (int(delta_ids.min()) < 0 or int(delta_ids.max()) >= self.num_deltas):
                raise UsageError(f"delta ids must be in 0..{self.num_deltas - 1}")
        self._ids, self._segments = delta_ids, {}

    def sequences(self) -> int | None:
        """The batch size when ids were given one per sequence (a 1-D tensor), else None."""
        return int(self._ids.numel()) if self._ids is not None and self._ids.dim() == 1 else None

    def token_ids(self, leading: tuple, device) -> torch.Tensor:
        """One delta id per token of an input whose leading (non-feature) shape is ``leading``."""
        if self._ids is None:
            raise UsageError("no delta ids: run the model inside `with handle.use(delta_ids):`")
        tokens = int(np.prod(leading, dtype=np.int64))
        ids = self._ids.to(device)
        if ids.numel() == tokens:
            return ids.reshape(-1)
        if len(leading) >= 1 and ids.numel() == leading[0]:
            return ids.repeat_interleave(tokens // max(leading[0], 1))
        raise UsageError(f"{ids.numel()} delta ids for an input of leading shape {list(leading)}: "
                         f"give one per sequence or one per token")

    def segments(self, leading: tuple, device) -> Segments:
        key = (tuple(leading), str(device))
        if key not in self._segments:
            self._segments[key] = Segments.of(self.token_ids(leading, device), self.num_deltas)
        return self._segments[key]


class MultiDeltaLinear(nn.Module):
    """A base linear layer plus one delta per fine-tune (weight packed or as factors; bias as a dense difference)."""

    def __init__(self, base_linear: nn.Module, pack, bias_deltas: list, handle: MultiDelta,
                 backend: str = "auto"):
        super().__init__()
        self.base, self.pack, self.handle, self.backend = base_linear, pack, handle, backend
        self.bias_deltas = bias_deltas  # per delta: (out,) float32 tensor or None
        self._kernel = _apply_fn(backend, base_linear.weight.device)

    def forward(self, x):
        leading = tuple(x.shape[:-1])
        seg = self.handle.segments(leading, x.device)
        flat = x.reshape(-1, x.shape[-1])
        xs = flat[seg.order].contiguous()
        y = self.base(xs)
        with torch.no_grad():
            start = 0
            for d, count in enumerate(seg.counts):
                if count and self.bias_deltas[d] is not None:
                    y[start:start + count] += self.bias_deltas[d].to(y.dtype)
                start += count
            if isinstance(self.pack, LayerFactors):
                self.pack.apply(xs, seg, y, self._kernel)
            else:
                self._kernel(self.pack, xs, seg, y)
        return y[seg.inverse].reshape(*leading, -1)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if hasattr(self, "pack"):
            device = self.base.weight.device
            self.pack.to(device)
            self.bias_deltas = [None if b is None else b.to(device) for b in self.bias_deltas]
            self._kernel = _apply_fn(self.backend, device)
        return self


class PerDelta(nn.Module):
    """A token-wise module (embedding, norm) with one parameter set per delta, chosen per token."""

    def __init__(self, module: nn.Module, params: list, handle: MultiDelta):
        super().__init__()
        self.module, self.handle = module, handle
        self.params = params  # per delta: {attribute: tensor} replacing the module's own

    def forward(self, x):
        is_ids = not torch.is_floating_point(x)
        batch = self.handle.sequences()
        if batch and x.dim() >= 2 and x.shape[0] == 1 and batch > 1:
            x = x.expand(batch, *x.shape[1:])  # an input shared by every sequence (BERT's position ids)
        leading = tuple(x.shape) if is_ids else tuple(x.shape[:-1])
        ids = self.handle.token_ids(leading, x.device)
        flat = x.reshape(-1) if is_ids else x.reshape(-1, x.shape[-1])
        out = None
        for d in torch.unique(ids).tolist():
            rows = torch.nonzero(ids == d).reshape(-1)
            part = torch.func.functional_call(self.module, self.params[d] or {}, (flat[rows],))
            if out is None:
                out = part.new_empty((flat.shape[0],) + tuple(part.shape[1:]))
            out[rows] = part
        return out.reshape(*leading, *out.shape[1:])


# --- patching ---------------------------------------------------------------------------


def _storage(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as the codec's storage array (BF16 as uint16 bit patterns)."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _from_storage(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    if dtype_name == "BF16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _model_tensors(model: nn.Module) -> dict:
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def _aliases(tensors: dict) -> dict:
    """{name: every name of the same tensor}: tied weights (lm_head = embed_tokens) share one."""
    by_id: dict = {}
    for name, tensor in tensors.items():
        by_id.setdefault(id(tensor), []).append(name)
    return {name: by_id[id(tensor)] for name, tensor in tensors.items()}


def match_names(file_names, model_names) -> dict:
    """{file tensor name: model tensor name}: equal, or equal after a prefix on either side ("bert.")."""
    model_names = list(model_names)
    out = {}
    for name in file_names:
        if name in model_names:
            out[name] = name
            continue
        hits = [m for m in model_names if m.endswith("." + name) or name.endswith("." + m)]
        if len(hits) != 1:
            why = "no tensor" if not hits else f"{len(hits)} tensors ({', '.join(hits[:3])})"
            raise UsageError(f"file tensor {name!r} matches {why} of the model")
        out[name] = hits[0]
    return out


def _owner(model: nn.Module, target: str):
    """(parent module name, module, attribute) of a tensor's dotted name."""
    module_name, _, attr = target.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, (DeltaLinear, MultiDeltaLinear)):  # patched already: its tensors are the base's
        module = module.base
    return module_name, module, attr


def _set_tensor(module: nn.Module, attr: str, value: torch.Tensor, where: str) -> None:
    current = getattr(module, attr)
    if tuple(current.shape) != tuple(value.shape):
        raise UsageError(f"{where}: the file's tensor has shape {list(value.shape)}, "
                         f"the model's {list(current.shape)}")
    with torch.no_grad():
        current.copy_(value.to(current.dtype))


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _open(path_or_handle):
    if isinstance(path_or_handle, DcmFile):
        return contextlib.nullcontext(path_or_handle)
    return dcm.open(path_or_handle)


# --- the base as the model holds it ----------------------------------------------------------


# Loading a checkpoint of the first dtype into the second keeps every value: casting back gives its bytes.
_WIDENING = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float64),
             (torch.float16, torch.float64), (torch.float32, torch.float64)}


def _base_array(rec, tensor: torch.Tensor) -> tuple[np.ndarray, bool]:
    """(the model's tensor as a storage array of the dtype the file's base reference names, whether
    those are the checkpoint's bytes for certain).

    A model may hold its base in another dtype than its checkpoint's (loaded with
    another ``dtype``).  Cast back, it gives the checkpoint's bytes when the load
    widened (a bf16 checkpoint held in float32); when it narrowed (a float32
    checkpoint held in bfloat16) it gives them only if every value happened to fit.
    """
    want = rec.base["dtype"] if rec.base else rec.dtype
    want_torch = _TORCH_DTYPES.get(want)
    if want_torch == tensor.dtype:
        return _storage(tensor), True
    if want_torch is None or not tensor.is_floating_point():
        raise WrongBaseError(f"wrong base: tensor {rec.name!r} is {tensor.dtype} in the model, "
                             f"the file expects {want}")
    return _storage(tensor.detach().cpu().to(want_torch)), (want_torch, tensor.dtype) in _WIDENING


def _checked_base(f: DcmFile, rec, tensor: torch.Tensor, check_base: bool) -> np.ndarray:
    """The base in the checkpoint's dtype (``_base_array``), checked against the file's reference
    when ``check_base`` (WrongBaseError; a narrowed base that no longer holds the checkpoint's
    bytes cannot be checked: UsageError)."""
    base, certain = _base_array(rec, tensor)
    if not check_base or rec.base is None:
        return base
    if certain:
        check_base_tensor(rec, base)
    elif tensor_sha256(base) != rec.base["sha256"]:  # narrowed: right only if every value fitted
        raise UsageError(f"{f.path}: tensor {rec.name!r}: the model holds the base as {tensor.dtype}, "
                         f"narrower than the {rec.base['dtype']} the file was encoded against, so it "
                         f"cannot be checked against the file; load the base in {rec.base['dtype']}, "
                         f"or pass check_base=False to apply the file to the base as the model holds it")
    return base


def _fine_tuned(f: DcmFile, rec, tensor: torch.Tensor, check_base: bool) -> torch.Tensor:
    """The fine-tuned tensor of ``rec``, decoded against the model's own tensor (in the file's dtype).

    A base held narrower than its checkpoint (unchecked) is decoded against as the
    model holds it, cast back: the result then carries about the rounding the
    model's dtype put on the base.
    """
    kind = records.KINDS[rec.kind]
    base = _checked_base(f, rec, tensor, check_base)
    if not kind.needs_base:
        return _from_storage(f.tensor(rec.name), rec.dtype)
    return _from_storage(f.tensor(rec.name, base, check_base=False), rec.dtype)


def _as_model_tensor(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(device=like.device, dtype=like.dtype)


# --- adapted records (spec 10.13): a fine-tune of another dtype, or with more rows ------------------


def _served_kind(rec) -> int:
    """The kind whose Δ̂ a layer would serve: an adapted record's inner kind, else the record's."""
    return rec.params["inner"] if rec.kind == Kind.ADAPTED else rec.kind


def _grown_rows(rec) -> int | None:
    """The base's row count when ``rec`` adds rows to its base tensor (a resized vocabulary), else None."""
    if rec.kind == Kind.ADAPTED and rec.base and tuple(rec.base["shape"]) != tuple(rec.shape):
        return int(rec.base["shape"][0])
    return None


def _grow(model: nn.Module, tensors: dict, aliases: dict, target: str, shape, where: str) -> torch.Tensor:
    """Give the model's tensor ``target``, and every tensor tied to it, the file's (larger) ``shape``.

    A new parameter replaces the old one in every module that holds it (ties kept),
    its first rows the old values; an embedding's ``num_embeddings``, a linear layer's
    ``out_features`` and the model's ``config.vocab_size`` (when it counted these rows)
    follow.  Returns the new tensor.
    """
    old = tensors[target]
    rows = int(old.shape[0])
    if tuple(old.shape[1:]) != tuple(shape[1:]) or shape[0] < rows:
        raise UsageError(f"{where}: the file's tensor has shape {list(shape)}, the model's {list(old.shape)}")
    with torch.no_grad():
        data = torch.cat([old.detach(), old.new_zeros((shape[0] - rows, *shape[1:]))])
    new = nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else data
    for name in aliases[target]:
        _, module, attr = _owner(model, name)
        if isinstance(new, nn.Parameter):
            setattr(module, attr, new)
        else:
            module.register_buffer(attr, new)
        if isinstance(module, nn.Embedding) and attr == "weight":
            module.num_embeddings = shape[0]
        elif isinstance(module, nn.Linear) and attr == "weight":
            module.out_features = shape[0]
        elif _is_conv1d(module) and attr == "bias":
            module.nf = shape[0]
        tensors[name] = new
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None) == rows:
        config.vocab_size = shape[0]
    return new


def _grown_linear(f: DcmFile, rec, module: nn.Module) -> None:
    """Write an adapted record's new rows into a grown linear layer's weight (the base rows stay the
    model's: the layer's delta covers them)."""
    rows = _grown_rows(rec)
    new_rows = _from_storage(f.new_rows(rec.name), rec.dtype).reshape(-1, *rec.shape[1:])
    with torch.no_grad():
        module.weight[rows:].copy_(new_rows.to(module.weight.dtype))


# --- one delta ------------------------------------------------------------------------------


def patch_model(model: nn.Module, path_or_handle, *, backend: str = "auto", check_base: bool = True,
                hold: str = "packed") -> nn.Module:
    """Apply a .dcm file to ``model`` (its base) in place; returns the model.

    With ``hold="packed"`` (default) or ``"factors"``, linear weights (``nn.Linear``,
    ``Conv1D``) stored as a lossy delta (lowrank-mixed, sparse-lowrank, sign, lowrank)
    become ``DeltaLinear`` modules holding the delta that way; every other record is
    decoded and written into the model's tensor, and so is every record with
    ``hold="merged"``.  A tensor tied to another (lm_head = embed_tokens) is always
    decoded into the shared parameter.  With ``check_base`` every base tensor is
    hashed and compared with the file's reference (WrongBaseError).  A file whose
    tensors have more rows than the base (a resized vocabulary) grows the model's
    tensors, or fills the new rows of a model already resized to its size.
    """
    _check_hold(hold)
    with _open(path_or_handle) as f:
        tensors = _model_tensors(model)
        aliases = _aliases(tensors)
        recs = [r for r in f.records() if r.kind != Kind.REMOVED]
        names = match_names([r.name for r in recs], tensors)
        written: dict = {}  # the names of a tied tensor -> (record name, value written into it)
        bases: dict = {}  # the names of a grown tensor -> the base tensor it replaced (for its other records)
        for rec in recs:
            target = names[rec.name]
            module_name, module, attr = _owner(model, target)
            group = tuple(sorted(aliases[target]))
            tensor = bases.get(group, tensors[target])
            geometry = linear_geometry(module)
            tied = len(aliases[target]) > 1
            grown = _grown_rows(rec)
            resized = grown is not None and tensor.shape[0] == rec.shape[0]  # the user resized the model already
            if resized:  # its first rows are the base's (the rest are the user's: the file's replace them)
                tensor = tensor[:grown].detach().clone()  # kept: this file's records overwrite the model's
            if (geometry and attr == "weight" and _served_kind(rec) in PACKED_KINDS and hold != "merged"
                    and not tied and not (grown and geometry[2])):
                if isinstance(model.get_submodule(module_name), DeltaLinear):
                    raise UsageError(f"{target}: the model already carries a delta")
                _checked_base(f, rec, tensor, check_base)
                loaded = packed.load_record(f, rec.name, transpose=geometry[2])
                if grown:  # a grown lm_head: the base rows get the delta, the new rows the file's values
                    bases[group] = tensor
                    if not resized:
                        _grow(model, tensors, aliases, target, rec.shape, f"{f.path}: {rec.name}")
                    _grown_linear(f, rec, module)
                if not (isinstance(loaded, packed.FactorRecord) and loaded.rank == 0):  # rank 0: Δ̂ = 0
                    _replace(model, module_name, DeltaLinear(module, loaded, backend, hold=hold, rows=grown))
                continue
            value = _fine_tuned(f, rec, tensor, check_base)
            if tied and group in written:  # a second record of one tied tensor: it must agree
                other, previous = written[group]
                if not torch.equal(previous, value):
                    raise UsageError(f"{f.path}: tensors {other!r} and {rec.name!r} are one tied tensor in the "
                                     f"model, but the file rebuilds them differently")
                continue
            written[group] = (rec.name, value)
            if grown:
                bases[group] = tensor
            if grown and not resized:  # a resized vocabulary: the model's embedding / lm_head (and ties) grow
                _grow(model, tensors, aliases, target, tuple(value.shape), f"{f.path}: {rec.name}")
                module_name, module, attr = _owner(model, target)
            _set_tensor(module, attr, value, f"{f.path}: {rec.name}")
    return model


# --- several deltas -------------------------------------------------------------------------


def _token_wise(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("RMSNorm")


def patch_model_multi(model: nn.Module, paths, *, backend: str = "auto", check_base: bool = True,
                      hold: str = "packed") -> MultiDelta:
    """Patch K .dcm files of the same base into ``model`` at once; returns the ``MultiDelta`` handle.

    ``paths``: .dcm paths (or open files); ``None`` stands for the base itself, so that
    base and fine-tunes share one batch.  ``hold``: "packed" or "factors" (see the module); "merged" cannot serve several deltas.
    A tensor tied to others (lm_head = embed_tokens) changes in every module that holds it.
    """
    if hold == "merged":
        raise UsageError("hold='merged' writes one delta into the weights: it cannot serve several deltas "
                         "(use 'packed' or 'factors')")
    _check_hold(hold, ("packed", "factors"))
    handle = MultiDelta(paths)
    tensors = _model_tensors(model)
    aliases = _aliases(tensors)
    per_target: dict = {}  # model tensor name -> [(file, record) per delta, or None]
    with contextlib.ExitStack() as stack:
        files = [None if p is None else stack.enter_context(_open(p)) for p in paths]
        for d, f in enumerate(files):
            if f is None:  # the base itself: every module keeps its own tensors for these sequences
                continue
            recs = [r for r in f.records() if r.kind != Kind.REMOVED]
            for rec in recs:
                if _grown_rows(rec) is not None:
                    raise UsageError(f"{f.path}: tensor {rec.name!r} has {rec.shape[0]} rows, the base "
                                     f"{_grown_rows(rec)} (a resized vocabulary): patch_model_multi serves deltas "
                                     f"of the base's shapes only; serve this file alone with patch_model, which "
                                     f"resizes the model")
            for name, target in match_names([r.name for r in recs], tensors).items():
                for alias in aliases[target]:  # a tied tensor changes in every module that holds it
                    slot = per_target.setdefault(alias, [None] * len(files))
                    if slot[d] is not None:
                        raise UsageError(f"{f.path}: tensors {slot[d][1].name!r} and {name!r} are one tied "
                                         f"tensor in the model: give it one record")
                    slot[d] = (f, f.record(name))
        by_module: dict = {}
        for target, entries in per_target.items():
            module_name, module, attr = _owner(model, target)
            by_module.setdefault(module_name, (module, {}))[1][attr] = entries
        values: dict = {}  # (delta, record name) -> decoded tensor, shared by the modules of a tied tensor
        for module_name, (module, attrs) in by_module.items():
            geometry = linear_geometry(module)
            if geometry and "weight" in attrs:
                tied = len(aliases[f"{module_name}.weight"]) > 1
                _replace(model, module_name, _multi_linear(module, geometry, attrs, handle, backend, check_base,
                                                           hold, tied))
            elif _token_wise(module) or geometry:
                params = []
                for d in range(len(files)):
                    params.append({})
                    for attr, entries in attrs.items():
                        if entries[d] is not None:
                            f, rec = entries[d]
                            like = getattr(module, attr)
                            key = (d, rec.name)
                            if key not in values:
                                values[key] = _as_model_tensor(_fine_tuned(f, rec, like, check_base), like)
                            params[d][attr] = values[key]
                _replace(model, module_name, PerDelta(module, params, handle))
            else:
                raise UsageError(f"module {module_name!r} ({type(module).__name__}) changes between deltas "
                                 f"and is not token-wise: it cannot be served per delta")
    return handle


def _multi_linear(module: nn.Module, geometry, attrs: dict, handle: MultiDelta, backend: str, check_base: bool,
                  hold: str, tied: bool = False):
    """``tied``: the weight is also another module's (an lm_head that is the embedding): its delta is the
    decoded tensor's, as the other module's value is (a stored Δ̂ would skip the rounding to the dtype)."""
    out_features, in_features, transposed = geometry
    extra = set(attrs) - {"weight", "bias"}
    if extra:
        raise UsageError(f"linear layer tensors {sorted(extra)} cannot be served per delta")
    recs, biases = [], []
    weight = module.weight
    for entry in attrs["weight"]:
        if entry is None:
            recs.append(None)
            continue
        f, rec = entry
        _checked_base(f, rec, weight, check_base)
        if not tied and (_served_kind(rec) in PACKED_KINDS or _served_kind(rec) == Kind.SPARSE):  # the stored Δ̂
            recs.append(packed.load_record(f, rec.name, transpose=transposed))
            continue
        delta = (_fine_tuned(f, rec, weight, False).float() - weight.detach().float().cpu()).numpy()
        dense = packed.DenseRecord(tuple(delta.shape), delta, rec.kind)
        recs.append(packed.transposed(dense) if transposed else dense)
    for entry in attrs.get("bias", [None] * len(recs)):
        if entry is None:
            biases.append(None)
            continue
        f, rec = entry
        value = _fine_tuned(f, rec, module.bias, check_base).float()
        biases.append((value - module.bias.detach().float().cpu()).to(weight.device))
    pack = _holder((out_features, in_features), recs, hold, weight)
    return MultiDeltaLinear(module, pack, biases, handle, backend)
