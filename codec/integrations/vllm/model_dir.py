"""``dcm export vllm X.dcm --base BASE -o DIR``: a model directory vLLM opens as the fine-tune (route 1).

DIR holds symbolic links to the base's safetensors weights (never copies), a link to
the .dcm file, the fine-tune's side files carried in the .dcm (config, tokenizer...;
the base's where the .dcm carries none), and a ``config.json`` whose
``quantization_config`` selects the ``dcm`` quantization method::

    "quantization_config": {"quant_method": "dcm", "dcm_file": "X.dcm", "backend": "auto", ...}

``LLM(model=DIR)`` and the OpenAI server then serve the fine-tune: base matmuls by
vLLM, linear deltas from the packed records, everything else decoded at load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import dcm
from dcm.checkpoint import Checkpoint
from dcm.decode import check_base_names
from dcm.errors import UsageError

from .deltas import PACKED_KINDS
from .lora import why_unexpressible
from .outdir import export_dir, link, weight_files

CONFIG = "config.json"


@dataclass
class VllmExport:
    path: str
    linked: list  # base weight files linked
    packed: int  # linear layers' records of a packed kind (kept packed where a vLLM linear layer claims them)
    folded: int  # records decoded into base tensors at load
    method: str


def quantization_config(dcm_name: str, method: str, backend: str) -> dict:
    return {"quant_method": "dcm", "dcm_file": dcm_name, "backend": backend, "dcm_method": method}


def export_vllm(path, base, out_dir, *, overwrite: bool = False, backend: str = "auto") -> VllmExport:
    """Write the route-1 model directory for the .dcm file ``path`` and its base model directory."""
    if backend not in ("auto", "torch", "triton"):
        raise UsageError(f"backend must be auto, torch or triton, got {backend!r}")
    base_dir = Path(base)
    if not base_dir.is_dir():
        raise UsageError(f"{base}: vLLM opens model directories; give the base's directory (with config.json)")
    with dcm.open(path) as f, Checkpoint(base_dir) as ckpt:
        check_base_names(f, ckpt)  # names, dtypes, shapes; the hashes are checked as vLLM loads
        attachments = {name: f.attachment(name) for name in f.attachments()}
        base_side = {rel: ckpt.read_attachment(rel) for rel in ckpt.attachments() if rel not in attachments}
        records = list(f.records())
        method = f.metadata()["method"]
    config_bytes = attachments.get(CONFIG, base_side.get(CONFIG))
    if config_bytes is None:
        raise UsageError(f"neither {path} nor {base} has a {CONFIG}: vLLM needs the model's configuration")
    try:
        config = json.loads(config_bytes)
    except ValueError as e:
        raise UsageError(f"the fine-tune's {CONFIG} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise UsageError(f"the fine-tune's {CONFIG} is not a JSON object")
    if config.get("quantization_config"):
        raise UsageError(f"the model's {CONFIG} already has a quantization_config "
                         f"({config['quantization_config'].get('quant_method', '?')}); dcm serves unquantized bases")
    dcm_name = Path(path).name if Path(path).suffix == ".dcm" else Path(path).name + ".dcm"
    config["quantization_config"] = quantization_config(dcm_name, method, backend)
    linked = weight_files(base_dir)
    with export_dir(out_dir, {".dcm file": path, "base": base}, overwrite, "export") as tmp:
        for name in linked:
            link(base_dir / name, tmp / name)
        link(Path(path), tmp / dcm_name)
        for rel, data in {**base_side, **attachments}.items():
            if rel == CONFIG:
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    packed = sum(1 for r in records if r.kind in PACKED_KINDS and why_unexpressible(r) is None)
    return VllmExport(str(out_dir), linked, packed, len(records) - packed, method)
