"""torch modules that serve .dcm deltas on one copy of the base model (inference only).

- ``DeltaLinear(base_linear, record)``: y = base(x) + x·Δ̂ᵀ, Δ̂ kept packed.
- ``patch_model(model, path)``: every linear weight stored as a lossy delta becomes a
  ``DeltaLinear``; every other tensor of the file (biases, norms, embeddings, exact
  records) is decoded against the model's own tensor and written into it, so the
  patched model computes what the decoded checkpoint computes.
- ``patch_model_multi(model, paths)`` → ``MultiDelta``: K deltas at once; linear layers
  become ``MultiDeltaLinear`` (one launch per stage for all deltas), token-wise
  modules whose parameters differ between deltas (embeddings, norms) hold one
  parameter set per delta; ``with handle.use(delta_ids): model(...)`` picks the delta
  of each sequence (ids of shape (batch,)) or of each token (shape (batch, seq)).

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
from dcm.reader import DcmFile, check_base_tensor

from . import packed, rotation, torch_backend
from .layer import LayerPack, Segments

PACKED_KINDS = (Kind.LOWRANK_MIXED, Kind.SPARSE_LOWRANK, Kind.SIGN, Kind.LOWRANK, Kind.LOWRANK_ROTATED)
BACKENDS = ("auto", "torch", "triton")
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


class DeltaLinear(nn.Module):
    """A base ``nn.Linear`` plus one packed delta of its weight."""

    def __init__(self, base_linear: nn.Linear, record, backend: str = "auto"):
        super().__init__()
        self.base = base_linear
        shape = (base_linear.out_features, base_linear.in_features)
        self.pack = record if isinstance(record, LayerPack) else LayerPack(shape, [record],
                                                                           base_linear.weight.device)
        self.backend = backend
        self._kernel = _apply_fn(backend, base_linear.weight.device)

    def forward(self, x):
        y = self.base(x)
        flat_x = x.reshape(-1, x.shape[-1]).contiguous()
        flat_y = y.view(-1, y.shape[-1])
        with torch.no_grad():
            self._kernel(self.pack, flat_x, Segments.single(flat_x.shape[0], x.device), flat_y)
        return y

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() reach modules through _apply: move the packed bytes along with the base.
        super()._apply(fn, *args, **kwargs)
        if hasattr(self, "pack"):
            self.pack.to(self.base.weight.device)
            self._kernel = _apply_fn(self.backend, self.base.weight.device)
        return self

    def extra_repr(self) -> str:
        return (f"{self.base.in_features} -> {self.base.out_features}, delta {self.pack.nbytes} bytes, "
                f"backend {self.backend}")


class MultiDelta:
    """K deltas patched into one model; ``use(delta_ids)`` says which delta each sequence or token takes."""

    def __init__(self, paths):
        self.paths = [str(p) for p in paths]
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
    """A base ``nn.Linear`` plus one delta per fine-tune (weight packed; bias as a dense difference)."""

    def __init__(self, base_linear: nn.Linear, pack: LayerPack, bias_deltas: list, handle: MultiDelta,
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


def _decoded(f: DcmFile, rec, tensor: torch.Tensor, check_base: bool) -> np.ndarray:
    """The fine-tuned tensor of ``rec``, decoded against the model's own tensor."""
    kind = records.KINDS[rec.kind]
    if not kind.needs_base:
        if check_base and rec.base is not None:
            check_base_tensor(rec, _storage(tensor))
        return f.tensor(rec.name)
    base = _base_storage(rec, tensor)
    return f.tensor(rec.name, base, check_base=check_base)


def _base_storage(rec, tensor: torch.Tensor) -> np.ndarray:
    want = rec.base["dtype"] if rec.base else rec.dtype
    if _TORCH_DTYPES.get(want) != tensor.dtype:
        raise WrongBaseError(f"wrong base: tensor {rec.name!r} is {tensor.dtype} in the model, "
                             f"the file expects {want}")
    return _storage(tensor)


def patch_model(model: nn.Module, path_or_handle, *, backend: str = "auto", check_base: bool = True) -> nn.Module:
    """Apply a .dcm file to ``model`` (its base) in place; returns the model.

    Linear weights stored as a lossy delta (lowrank-mixed, sparse-lowrank, sign,
    lowrank) stay packed in a ``DeltaLinear``; every other record is decoded and
    written into the model's tensor.  With ``check_base`` every base tensor is
    hashed and compared with the file's reference (WrongBaseError).
    """
    with _open(path_or_handle) as f:
        tensors = _model_tensors(model)
        recs = [r for r in f.records() if r.kind != Kind.REMOVED]
        names = match_names([r.name for r in recs], tensors)
        for rec in recs:
            target = names[rec.name]
            module_name, module, attr = _owner(model, target)
            tensor = tensors[target]
            if isinstance(module, (nn.Linear, DeltaLinear)) and attr == "weight" and rec.kind in PACKED_KINDS:
                base_linear = module.base if isinstance(module, DeltaLinear) else module
                if isinstance(module, DeltaLinear):
                    raise UsageError(f"{target}: the model already carries a delta")
                if check_base:
                    check_base_tensor(f.record(rec.name), _base_storage(rec, tensor))
                loaded = packed.load_record(f, rec.name)
                if not (isinstance(loaded, packed.FactorRecord) and loaded.rank == 0):  # rank 0: Δ̂ = 0
                    _replace(model, module_name, DeltaLinear(base_linear, loaded, backend))
                continue
            value = _from_storage(_decoded(f, rec, tensor, check_base), rec.dtype)
            _set_tensor(module, attr, value, f"{f.path}: {rec.name}")
    return model


def _token_wise(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("RMSNorm")


def patch_model_multi(model: nn.Module, paths, *, backend: str = "auto", check_base: bool = True) -> MultiDelta:
    """Patch K .dcm files of the same base into ``model`` at once; returns the ``MultiDelta`` handle."""
    handle = MultiDelta(paths)
    tensors = _model_tensors(model)
    per_target: dict = {}  # model tensor name -> [value per delta or None]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(dcm.open(p)) for p in paths]
        for d, f in enumerate(files):
            recs = [r for r in f.records() if r.kind != Kind.REMOVED]
            for name, target in match_names([r.name for r in recs], tensors).items():
                per_target.setdefault(target, [None] * len(files))[d] = (f, f.record(name))
        by_module: dict = {}
        for target, entries in per_target.items():
            module_name, module, attr = _owner(model, target)
            by_module.setdefault(module_name, (module, {}))[1][attr] = entries
        for module_name, (module, attrs) in by_module.items():
            if isinstance(module, nn.Linear) and "weight" in attrs:
                _replace(model, module_name, _multi_linear(module, attrs, handle, backend, check_base))
            elif _token_wise(module) or isinstance(module, nn.Linear):
                params = [{attr: _from_storage(_decoded(e[d][0], e[d][1], getattr(module, attr), check_base),
                                               e[d][1].dtype).to(getattr(module, attr).device)
                           for attr, e in attrs.items() if e[d] is not None} for d in range(len(files))]
                _replace(model, module_name, PerDelta(module, params, handle))
            else:
                raise UsageError(f"module {module_name!r} ({type(module).__name__}) changes between deltas "
                                 f"and is not token-wise: it cannot be served per delta")
    return handle


def _multi_linear(module: nn.Linear, attrs: dict, handle: MultiDelta, backend: str, check_base: bool):
    recs, biases = [], []
    for entry in attrs["weight"]:
        if entry is None:
            recs.append(None)
            continue
        f, rec = entry
        base = _base_storage(rec, module.weight)
        if check_base and rec.base is not None:
            check_base_tensor(rec, base)
        recs.append(packed.load_record(f, rec.name, base))
    for entry in attrs.get("bias", [None] * len(recs)):
        if entry is None:
            biases.append(None)
            continue
        f, rec = entry
        value = _from_storage(_decoded(f, rec, module.bias, check_base), rec.dtype).float()
        biases.append((value - module.bias.detach().float().cpu()).to(module.weight.device))
    extra = set(attrs) - {"weight", "bias"}
    if extra:
        raise UsageError(f"linear layer tensors {sorted(extra)} cannot be served per delta")
    pack = LayerPack((module.out_features, module.in_features), recs, module.weight.device)
    return MultiDeltaLinear(module, pack, biases, handle, backend)
