"""dcm.integrations.vllm: serve .dcm fine-tunes in vLLM, as a plugin (no fork of vLLM).

- Route 1, one fine-tune per engine, linear deltas kept packed: ``export_vllm`` (``dcm
  export vllm``) writes a model directory whose ``config.json`` selects the quantization
  method ``dcm`` (``quant.DcmConfig``): vLLM's matmul for the base weight plus
  y += x·Δ̂ᵀ from the packed records with dcm's kernels.
- Route 2, many fine-tunes per engine, chosen per request: ``export_lora`` (``dcm export
  lora``) writes a PEFT LoRA adapter vLLM's multi-LoRA serves; ``resolver.DcmLoRAResolver``
  serves a directory of .dcm files by name, converting each once into a cache.

vLLM finds the plugin through the ``vllm.general_plugins`` entry point
(``plugin.register``).  This package imports without vLLM (the exports need numpy,
safetensors and, for LoRA factors, torch); the modules that subclass vLLM's classes
(``quant``, ``resolver``, ``cpu_lora_fix``) import it.
"""

from .lora import LoraExport, export_lora
from .model_dir import VllmExport, export_vllm

__all__ = ["export_vllm", "export_lora", "VllmExport", "LoraExport"]
