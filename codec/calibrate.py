"""Calibration statistics for GPTQ-style quantization of deltas.

``calibrate`` runs a Hugging Face model over a text file and records, per
weight tensor of the checkpoint:

- for every linear layer (``nn.Linear``, and transformers' ``Conv1D`` of GPT-2,
  whose weight is stored in × out): the mean Hessian ``H/N = Σ xᵀx / N`` of its
  inputs ``x`` (float32, ``in × in``), accumulated in float64 over the ``N``
  token rows that are not padding;
- for every ``nn.Embedding``: how often each row was looked up (a float32
  vector of frequencies summing to 1), over the same tokens; but an embedding
  matrix tied to a linear layer (an lm_head that is ``embed_tokens``) gets that
  layer's input Hessian instead, which is what its quantization can use.

A causal LM is loaded with its head (``AutoModelForCausalLM``), so ``lm_head``
gets statistics too.  Everything goes into one safetensors file, named by the
checkpoint's tensor names, with ``format=dcm-calibration`` metadata; the
metadata key ``transposed`` (a JSON list) names the Hessians of weights stored
in × out, whose inputs run along their first axis (version 2 of the file).  ``load_stats`` reads such a
file back with numpy alone (no torch), validating it as untrusted input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError, InputError, UsageError
from .outputs import Output

FORMAT = "dcm-calibration"
VERSION = "2"  # 2: the "transposed" key (Conv1D); version 1 files read as having none
READ_VERSIONS = ("1", "2")
# Relative asymmetry a stored Hessian may have: it is written symmetric, then rounded to fp32.
_SYMMETRY_RTOL = 1e-5


@dataclass
class CalibrationReport:
    path: str
    tokens: int  # non-padding tokens that went through the model
    sequences: int
    layers: int  # tensors written: linears and embeddings
    seconds: float


# --- the text -----------------------------------------------------------------------


def read_paragraphs(text_file) -> list[str]:
    """Non-empty paragraphs (blank-line separated, whitespace collapsed), in file order."""
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{text_file}: cannot read the calibration text: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{text_file}: the calibration text is not UTF-8: {e}") from e
    blocks = re.split(r"\n\s*\n", text)
    return [p for p in (" ".join(b.split()) for b in blocks) if p]


def token_sequences(tokenizer, paragraphs, seq_len: int, max_tokens: int) -> list[list[int]]:
    """Token ids of each paragraph (truncated to ``seq_len``) until ``max_tokens`` are taken.

    The last sequence is cut to the remaining budget, so the count is exact and
    does not depend on the batch size.
    """
    sequences, total = [], 0
    for paragraph in paragraphs:
        ids = tokenizer(paragraph, truncation=True, max_length=seq_len)["input_ids"]
        ids = ids[: max_tokens - total]
        if ids:
            sequences.append(list(ids))
            total += len(ids)
        if total >= max_tokens:
            break
    return sequences


def _batches(sequences, batch_size: int, pad_id: int):
    """(input_ids, attention_mask) tensors, right-padded, of sequences of similar lengths.

    Sorting by length only saves the compute spent on padding: padded rows are
    masked out of the statistics anyway.  Right padding keeps the positions of
    real tokens independent of the batch (left padding would shift them for
    models that number positions from 0).
    """
    import torch

    sequences = sorted(sequences, key=len)  # stable: deterministic order
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        yield ids, mask


# --- the statistics -------------------------------------------------------------------


class _Collector:
    """Forward pre-hooks that accumulate the statistics of one model."""

    def __init__(self, model, names: dict[str, str]):
        import torch

        self.mask = None  # bool mask of the real tokens of the current batch, (B, T)
        self._memo = {}  # id(input) -> (input, xᵀx, rows) within the current batch
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.handles = []
        self.transposed: set[str] = set()  # weights stored in × out (Conv1D): the Hessian is of axis 0
        linear = {name for module_name, name in names.items() if _is_linear(model.get_submodule(module_name))}
        for module_name, module in model.named_modules(remove_duplicate=False):
            tensor_name = names.get(module_name)
            if tensor_name is None:
                continue
            if _is_linear(module):
                hook = self._linear_hook(tensor_name)
                if not isinstance(module, torch.nn.Linear):
                    self.transposed.add(tensor_name)
            elif isinstance(module, torch.nn.Embedding) and tensor_name not in linear:
                hook = self._embedding_hook(tensor_name, module.num_embeddings)
            else:  # a tied embedding: the linear layer that shares its matrix gives the statistics
                continue
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _real_rows(self, x, feature_dims: int):
        """The rows of ``x`` that belong to real tokens.

        Inputs laid out like the tokens (B, T, ...) are masked; inputs broadcast
        over the batch (position ids of shape (1, T)) are expanded first; any
        other layout (the pooler's one CLS row per sequence) has no padding rows.
        """
        import torch

        lead = x.shape[: x.dim() - feature_dims]
        if len(lead) == self.mask.dim():
            try:
                full = torch.broadcast_to(x, tuple(self.mask.shape) + tuple(x.shape[len(lead):]))
                return full[self.mask]
            except RuntimeError:
                pass
        return x.reshape((-1,) + tuple(x.shape[len(lead):]))

    def start_batch(self, mask) -> None:
        self.mask = mask.bool()
        self._memo = {}

    def _xtx(self, x):
        """(xᵀx in float64 over the real rows, row count), once per input tensor and batch.

        Linears fed the same tensor (query, key and value) share the product.
        The memo holds the tensor itself, so its id cannot be reused by another.
        """
        import torch

        hit = self._memo.get(id(x))
        if hit is None or hit[0] is not x:
            rows = self._real_rows(x.detach(), 1).to(torch.float64)
            hit = self._memo[id(x)] = (x, rows.T @ rows, rows.shape[0])
        return hit[1], hit[2]

    def _linear_hook(self, name: str):
        import torch

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            xtx, count = self._xtx(x)
            if name not in self.hessians:
                self.hessians[name] = torch.zeros_like(xtx)
                self.rows[name] = 0
            self.hessians[name] += xtx
            self.rows[name] += count

        return hook

    def _embedding_hook(self, name: str, num_embeddings: int):
        import torch

        def hook(module, args, kwargs):
            ids = args[0] if args else kwargs["input"]
            real = self._real_rows(ids.detach(), 0).reshape(-1)
            counts = torch.bincount(real, minlength=num_embeddings).to(torch.float64)
            self.counts[name] = self.counts.get(name, 0) + counts

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def tensors(self) -> dict[str, np.ndarray]:
        out = {}
        for name, h in self.hessians.items():
            mean = (h + h.T) / (2 * max(self.rows[name], 1))  # exactly symmetric before rounding
            out[name] = mean.numpy().astype(np.float32)
        for name, counts in self.counts.items():
            out[name] = (counts / max(float(counts.sum()), 1.0)).numpy().astype(np.float32)
        return out


def _is_linear(module) -> bool:
    """``nn.Linear``, or transformers' ``Conv1D`` (y = x·W + b, W stored in × out)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == module.nf)


def module_tensor_names(model, checkpoint_names) -> dict[str, str]:
    """Module name -> the checkpoint's name of its weight, for modules that have one.

    Checkpoints saved from a model with a head prefix their tensors with the
    base model's prefix (``bert.``) while ``AutoModel`` loads the bare base
    model, or the other way round: both spellings are tried.  A weight tied to
    another module's (an lm_head that is the embedding matrix, which the
    checkpoint stores once) takes the checkpoint's name of the shared tensor.
    """
    known = set(checkpoint_names)
    prefix = getattr(model, "base_model_prefix", "") or ""

    def checkpoint_name(module_name):
        candidates = [f"{module_name}.weight"]
        if prefix:
            candidates.append(f"{prefix}.{module_name}.weight")
            if module_name.startswith(prefix + "."):
                candidates.append(f"{module_name[len(prefix) + 1:]}.weight")
        return next((c for c in candidates if c in known), None)

    names, by_tensor, holders = {}, {}, []
    for module_name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if not module_name or weight is None:
            continue
        match = checkpoint_name(module_name)
        if match is not None:
            names[module_name] = match
            by_tensor.setdefault(id(weight), match)
        else:
            holders.append((module_name, weight))
    for module_name, weight in holders:  # tied: named after the module the checkpoint stores it under
        if id(weight) in by_tensor:
            names[module_name] = by_tensor[id(weight)]
    return names


# --- writing ------------------------------------------------------------------------


def _check_args(max_tokens, seq_len, batch_size) -> None:
    for label, value, low in (("max_tokens", max_tokens, 1), ("seq_len", seq_len, 2),
                              ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UsageError(f"{label} must be an integer >= {low}, got {value!r}")


def _write_atomically(output: Output, tensors: dict, metadata: dict[str, str]) -> None:
    """Temp file beside the output, then the checked rename: readers never see a partial file."""
    from safetensors.numpy import save_file

    fd, tmp = output.temp_file("write")
    os.close(fd)
    try:
        with output.errors():
            save_file(tensors, tmp, metadata=metadata)
        output.place(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _import_torch_transformers():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise UsageError(f"calibration needs torch and transformers ({e}); "
                         "install the 'hf' and 'runtime' extras: pip install 'dcm[hf,runtime]'") from None
    return torch, transformers


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                    "spiece.model", "sentencepiece.bpe.model")


def _load_tokenizer(model_dir, transformers):
    folder = Path(model_dir)
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir}: the model has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                              f"calibration needs one to turn the text into tokens: copy the tokenizer "
                              f"files of the base model into the directory")
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer: {e}") from e


def _is_causal_lm(model_dir) -> bool:
    """The checkpoint's config names a causal LM class (``LlamaForCausalLM``, ``GPT2LMHeadModel``...)."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(archs, list) and any(isinstance(a, str) and (a.endswith("ForCausalLM") or a.endswith("LMHeadModel"))
                                           for a in archs)


def _load_model(model_dir, transformers, torch):
    """The model with its head when it is a causal LM (lm_head is a coded matrix too), else the bare model."""
    auto = transformers.AutoModelForCausalLM if _is_causal_lm(model_dir) else transformers.AutoModel
    try:
        return auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{model_dir}: cannot load the model: {e}") from e


@contextlib.contextmanager
def _transformers_progress(transformers, progress: bool):
    """transformers' own progress bars follow ours (a terminal only, never with -q or in a pipe), then as before."""
    log = transformers.utils.logging
    was = log.is_progress_bar_enabled()
    (log.enable_progress_bar if progress else log.disable_progress_bar)()
    try:
        yield
    finally:
        (log.enable_progress_bar if was else log.disable_progress_bar)()


def _pad_id(tokenizer) -> int:
    # Decoder tokenizers often have no pad token; masked rows are never counted anyway.
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token_id is not None:
            return int(token_id)
    return 0


def calibrate(model_dir, text_file, out, *, max_tokens: int = 65536, seq_len: int = 128,
              batch_size: int = 16, overwrite: bool = False, progress: bool = False) -> CalibrationReport:
    """Write the calibration statistics of ``model_dir`` on ``text_file`` to ``out``."""
    started = time.perf_counter()
    _check_args(max_tokens, seq_len, batch_size)
    # Everything that can fail cheaply fails before the model loads: the output, the text, the tokenizer.
    output = Output(out, kind="file", inputs={"model": model_dir, "text file": text_file}, overwrite=overwrite)
    paragraphs = read_paragraphs(text_file)
    torch, transformers = _import_torch_transformers()
    with _transformers_progress(transformers, progress):
        return _calibrate(model_dir, text_file, output, paragraphs, torch, transformers, started,
                          max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, progress=progress)


def _calibrate(model_dir, text_file, output, paragraphs, torch, transformers, started, *, max_tokens, seq_len,
               batch_size, progress) -> CalibrationReport:
    from tqdm import tqdm

    from .checkpoint import Checkpoint

    with Checkpoint(model_dir) as ckpt:
        checkpoint_names = ckpt.names()
    tokenizer = _load_tokenizer(model_dir, transformers)
    sequences = token_sequences(tokenizer, paragraphs, seq_len, max_tokens)
    if not sequences:
        raise UsageError(f"{text_file}: no text to calibrate on")
    model = _load_model(model_dir, transformers, torch)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and max(map(len, sequences)) > positions:
        raise UsageError(f"--seq-len {seq_len} exceeds the {positions} positions of the model {model_dir}")
    collector = _Collector(model, module_tensor_names(model, checkpoint_names))
    try:
        batches = _batches(sequences, batch_size, _pad_id(tokenizer))
        total = -(-len(sequences) // batch_size)
        with torch.no_grad():
            for ids, mask in tqdm(batches, total=total, desc="calibrate", disable=not progress):
                collector.start_batch(mask)
                model(input_ids=ids, attention_mask=mask)
        collector.start_batch(mask)  # drop the last batch's memo
    finally:
        collector.remove()
    tensors = collector.tensors()
    tokens = sum(map(len, sequences))
    metadata = {"format": FORMAT, "version": VERSION, "tokens": str(tokens),
                "sequences": str(len(sequences)), "seq_len": str(seq_len),
                "model": Path(model_dir).resolve().name, "text_sha256": _sha256(text_file),
                "transposed": json.dumps(sorted(collector.transposed & set(tensors)))}
    _write_atomically(output, tensors, metadata)
    return CalibrationReport(output.given, tokens, len(sequences), len(tensors),
                             time.perf_counter() - started)


def _sha256(path) -> str:
    # Lets a caller tell whether cached statistics came from the same text.
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- reading ------------------------------------------------------------------------


class CalibrationStats:
    """A calibration file opened with numpy; tensors are read (and checked) when asked for."""

    def __init__(self, path, metadata: dict[str, str], shapes: dict[str, tuple[int, ...]],
                 transposed: frozenset = frozenset()):
        self.path = Path(path)
        self.metadata = metadata
        self._shapes = shapes
        self.tokens = int(metadata["tokens"])
        self.transposed = transposed  # Hessians of weights stored in × out (their inputs: axis 0)

    def names(self) -> list[str]:
        return sorted(self._shapes)

    def __contains__(self, name) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple | None:
        return self._shapes.get(name)

    def hessian(self, name: str) -> np.ndarray | None:
        """The mean input Hessian of a linear's weight (float64, in × in), or None."""
        if len(self._shapes.get(name, ())) != 2:
            return None
        h = self._read(name)
        scale = max(float(np.abs(h).max(initial=0.0)), np.finfo(np.float64).tiny)
        if np.abs(h - h.T).max(initial=0.0) > _SYMMETRY_RTOL * scale or (np.diag(h) < 0).any():
            raise CheckpointError(f"{self.path}: tensor {name!r}: Hessian is not symmetric "
                                  "with a non-negative diagonal")
        return h

    def row_frequencies(self, name: str) -> np.ndarray | None:
        """How often each row of an embedding was looked up (float64, sums to 1), or None."""
        if len(self._shapes.get(name, ())) != 1:
            return None
        freq = self._read(name)
        if (freq < 0).any():
            raise CheckpointError(f"{self.path}: tensor {name!r}: negative row frequencies")
        return freq

    def _read(self, name: str) -> np.ndarray:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="numpy") as f:
                array = f.get_tensor(name).astype(np.float64)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.path}: tensor {name!r}: cannot read: {e}") from None
        if not np.isfinite(array).all():
            raise CheckpointError(f"{self.path}: tensor {name!r}: not finite")
        return array


def _check_stats_metadata(path, metadata) -> dict[str, str]:
    meta = dict(metadata or {})
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a calibration file (format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    if meta.get("version") not in READ_VERSIONS:
        raise CheckpointError(f"{path}: calibration version {meta.get('version')!r} is not one of "
                              f"{', '.join(READ_VERSIONS)}")
    if not re.fullmatch(r"[0-9]{1,18}", meta.get("tokens", "")):
        raise CheckpointError(f"{path}: metadata 'tokens' {meta.get('tokens')!r} is not a count")
    return meta


def _check_entry(path, name: str, dtype: str, shape) -> tuple[int, ...]:
    shape = tuple(shape)
    if dtype != "F32":
        raise CheckpointError(f"{path}: tensor {name!r}: dtype {dtype}, expected F32")
    if len(shape) == 2 and shape[0] != shape[1]:
        raise CheckpointError(f"{path}: tensor {name!r}: Hessian of shape {list(shape)} is not square")
    if len(shape) not in (1, 2):
        raise CheckpointError(f"{path}: tensor {name!r}: shape {list(shape)} is neither 1-D nor 2-D")
    return shape


def load_stats(path) -> CalibrationStats:
    """Open a calibration file: checks its metadata and every tensor's dtype and shape.

    Values are read lazily (a large model's Hessians do not all fit in memory)
    and checked for finiteness and symmetry when read.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata, names = f.metadata(), f.keys()
            entries = [(name, f.get_slice(name)) for name in names]
            entries = [(name, s.get_dtype(), s.get_shape()) for name, s in entries]
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None
    meta = _check_stats_metadata(path, metadata)
    shapes = {name: _check_entry(path, name, dtype, shape) for name, dtype, shape in entries}
    return CalibrationStats(path, meta, shapes, _transposed(path, meta, shapes))


def _transposed(path, meta: dict, shapes: dict) -> frozenset:
    """The names the metadata key ``transposed`` lists: each a Hessian (2-D) of the file."""
    text = meta.get("transposed", "[]")
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: metadata 'transposed' is not a JSON list of tensor names")
    for name in names:
        if len(shapes.get(name, ())) != 2:
            raise CheckpointError(f"{path}: metadata 'transposed' names {name!r}, which is not a Hessian of the file")
    return frozenset(names)


def open_stats(path) -> CalibrationStats | None:
    """``load_stats`` plus the file's SHA-256 (``.sha256``, recorded in the method's params); None for None."""
    if path is None:
        return None
    stats = load_stats(path)
    with open(path, "rb") as f:
        stats.sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return stats


class HessianCache:
    """Input Hessians of one matrix at a time: a method asks for the same one several times in a row.

    Safe when tensors are coded in parallel threads (the name and its Hessian are
    replaced together); a copy sent to a worker process starts empty.
    """

    def __init__(self, stats: CalibrationStats | None):
        self.stats, self._entry = stats, (None, None)

    def get(self, name: str, shape):
        """The (n, n) Hessian of matrix ``name`` of ``shape`` (m, n) over its second axis, or None."""
        h, axis = self.sided(name, shape)
        return h if axis == 1 else None

    def sided(self, name: str, shape) -> tuple:
        """(Hessian, axis of the inputs): axis 1 for an ``nn.Linear`` weight (out × in), axis 0 for a
        weight stored in × out (``Conv1D``); (None, None) without statistics of that size."""
        if self.stats is None:
            return None, None
        cached, value = self._entry
        if cached != name:
            h = self.stats.hessian(name)
            axis = 0 if name in self.stats.transposed else 1
            fits = h is not None and h.shape == (shape[axis], shape[axis])
            value = (h, axis) if fits else (None, None)
            self._entry = (name, value)
        return value

    def __getstate__(self):
        return {"stats": self.stats}

    def __setstate__(self, state):
        self.__init__(state["stats"])

    def available(self, name: str, shape) -> bool:
        """Whether the statistics hold a Hessian for this matrix (its shape only: nothing is read)."""
        if self.stats is None:
            return False
        axis = 0 if name in self.stats.transposed else 1
        return self.stats.shape(name) == (shape[axis], shape[axis])


def plan_gptq(hessians: HessianCache, tensors, method: str) -> list[str]:
    """The names of the matrices ``tensors`` (TensorInfo) that will be quantized with GPTQ.

    Calibration was asked for: a matrix the statistics have no input Hessian for
    (an embedding, a layer of another model, a file from an older dcm that missed
    GPT-2's Conv1D layers) is quantized by plain rounding, which the user is told,
    naming the matrices; when none has statistics the encode is refused.
    """
    import warnings

    from .errors import DcmWarning

    names = [t.name for t in tensors if hessians.available(t.name, t.shape)]
    missing = [t.name for t in tensors if t.name not in set(names)]
    if tensors and not names:
        raise UsageError(f"{hessians.stats.path}: the calibration statistics hold no input Hessian for any of the "
                         f"{len(tensors)} matrices {method} codes (e.g. {tensors[0].name!r}): they are not this "
                         f"model's, or were made before dcm calibrated this kind of layer; run dcm calibrate again")
    if missing:
        shown = ", ".join(missing[:4]) + (f", ... ({len(missing)} in all)" if len(missing) > 4 else "")
        warnings.warn(DcmWarning(f"{method}: no calibration statistics for {len(missing)} of {len(tensors)} "
                                 f"matrices, quantized by rounding instead of GPTQ: {shown}"), stacklevel=2)
    return names
