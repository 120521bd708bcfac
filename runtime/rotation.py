"""Serving ``lowrank-rotated`` deltas (spec 10.14): the activations are rotated, never the weights.

A record stores Ẑ_V = V̂·R_Vᵀ and Ẑ_U = Û·R_Uᵀ (rows are the rotated vectors), so

    x·Δ̂ᵀ = x·V̂ᵀ·diag(S)·Û = R_Uᵀ-rotated( (R_V·x)·Ẑ_Vᵀ·diag(S)·Ẑ_U )

per token: rotate the layer's input once before the shrink (x·R_Vᵀ), run the
kernels on the stored bytes as for any ``lowrank-mixed`` record, and rotate the
delta's output back once after the expand (·R_U).  Each rotation is a sign flip
and a fast Walsh–Hadamard transform over blocks of b elements (log₂ b stages of
pairwise sums and differences): O(n log b) per token, against the O(n·k) of the
shrink itself.  Only the tokens of rotated deltas are touched; a delta's output
is rotated back in a float32 buffer of its own before it joins the base output.
"""

from __future__ import annotations

import math

import torch

from dcm import rotation as spec_rotation


class SideRotation:
    """R for one side (V: the input, length n; U: the output, length m) of one delta."""

    def __init__(self, length: int, seed: int, side: str, device="cpu"):
        self.block = spec_rotation.block_size(length)
        self.signs = torch.from_numpy(spec_rotation.signs(seed, length, side)).to(device)
        self.scale = 1.0 / math.sqrt(self.block)

    def to(self, device) -> "SideRotation":
        self.signs = self.signs.to(device)
        return self

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """R·x for each row of x (float32): signs, then H_b / √b per block."""
        return fwht(x * self.signs, self.block).mul_(self.scale)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """Rᵀ·y for each row of y (float32): H_b / √b per block, then signs."""
        return fwht(y, self.block).mul_(self.scale).mul_(self.signs)


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """H_b·x on each block of ``block`` elements of every row (unnormalized), on a new tensor."""
    rows, n = x.shape
    y = x.contiguous().clone()
    h = 1
    while h < block:
        v = y.view(rows, n // (2 * h), 2, h)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).view(rows, n)
        h *= 2
    return y


def apply(kernel, pack, x: torch.Tensor, seg, y: torch.Tensor) -> None:
    """``kernel(pack, x, seg, y)`` (y += x·Δ̂_dᵀ per delta) with the rotations of the pack's rotated deltas."""
    rotations = pack.rotations
    if not rotations:
        kernel(pack, x, seg, y)
        return
    spans = {d: seg.span(d) for d in rotations}
    spans = {d: (lo, hi) for d, (lo, hi) in spans.items() if lo < hi}
    if not spans:
        kernel(pack, x, seg, y)
        return
    x_in = x.float().clone()  # rotated rows in float32: no rounding of R·x back to x's dtype
    for d, (lo, hi) in spans.items():
        v_rot = rotations[d][0]
        if v_rot is not None:
            x_in[lo:hi] = v_rot.rotate(x_in[lo:hi])
    if not any(rotations[d][1] is not None for d in spans):
        kernel(pack, x_in, seg, y)
        return
    acc = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    kernel(pack, x_in, seg, acc)
    for d, (lo, hi) in spans.items():
        u_rot = rotations[d][1]
        if u_rot is not None:
            acc[lo:hi] = u_rot.unrotate(acc[lo:hi])
    y += acc.to(y.dtype)
