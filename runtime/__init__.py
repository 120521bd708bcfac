"""dcm.runtime: compute directly from packed .dcm storage (torch + Triton).

The kernels and modules arrive with the runtime issue; importing this package
needs torch, reading a .dcm file (``import dcm``) never does.
"""
