"""Encoding across machines.  ``dcm.distributed.ray``: tensors coded as Ray tasks (the ``dcm[ray]`` extra).

Nothing here is imported by the core: ``import dcm`` works without Ray.
"""
