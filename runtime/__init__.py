"""dcm.runtime: compute directly from packed .dcm storage (torch + Triton).

``patch_model(model, "math.dcm")`` swaps the model's linear layers for
``DeltaLinear`` modules that keep the delta packed as in the file and add
x·Δ̂ᵀ to the base layer's output (``hold="factors"``: dequantized factors in the
model's dtype; ``hold="merged"``: decoded into the weights); ``patch_model_multi(model,
paths)`` serves many deltas of one base in one batch.  Backends: Triton kernels (CUDA,
or the CPU with ``TRITON_INTERPRET=1`` set before import) and plain torch ops (same math).
Reading a .dcm file (``import dcm``) never needs torch; this package does.
"""

from .factors import LayerFactors
from .layer import LayerPack, Segments
from .modules import (HOLDS, DeltaLinear, MultiDelta, MultiDeltaLinear, PerDelta, linear_geometry, match_names,
                      patch_model, patch_model_multi)
from .packed import DenseRecord, FactorRecord, SignRecord, load_record

__all__ = ["DeltaLinear", "MultiDelta", "MultiDeltaLinear", "PerDelta", "patch_model", "patch_model_multi", "HOLDS",
           "LayerPack", "LayerFactors", "Segments", "load_record", "FactorRecord", "SignRecord", "DenseRecord",
           "match_names", "linear_geometry"]
