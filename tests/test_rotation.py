"""Incoherence rotation (spec 10.14): the transform, the encoder's lowrank-rotated records, the runtime.

The conformance vectors check both decoders on lowrank-rotated files; here:
the rotation against the spec's formula, the encoder (which sides it rotates,
budgets, GPTQ in rotated coordinates) and the runtime, which rotates
activations instead of weights, on both backends.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dcm
from dcm import masks, rotation
from dcm.constants import Kind
from dcm.errors import UsageError
from dcm.methods import get_method
from dcm.runtime import LayerPack, Segments, load_record, patch_model
from dcm.runtime import rotation as runtime_rotation
from dcm.runtime import torch_backend

from conftest import write_checkpoint


def spec_unrotate(z: np.ndarray, seed: int, side: str) -> np.ndarray:
    """10.14's formula, element by element: d_j · (1/√b) · Σ_q H_b[p, q] · ẑ[t·b + q]."""
    length = z.shape[-1]
    b = length & -length
    c0 = 0 if side == "V" else 2**32
    r = masks.uniform32(seed, np.arange(length, dtype=np.uint64) + np.uint64(c0))
    out = np.zeros_like(z, dtype=np.float64)
    for j in range(length):
        t, p = divmod(j, b)
        d = -1.0 if r[j] >= 2**31 else 1.0
        out[..., j] = d / np.sqrt(b) * sum((-1) ** bin(p & q).count("1") * z[..., t * b + q] for q in range(b))
    return out


@pytest.mark.parametrize("length", [1, 5, 6, 24, 64, 96])
@pytest.mark.parametrize("side", ["V", "U"])
def test_rotation_is_the_spec_formula_and_orthogonal(length, side):
    rng = np.random.default_rng(length)
    z = rng.standard_normal((3, length))
    back = rotation.unrotate(z, 0x0123456789ABCDEF, side)
    np.testing.assert_allclose(back, spec_unrotate(z, 0x0123456789ABCDEF, side), atol=1e-12)
    np.testing.assert_allclose(rotation.rotate(back, 0x0123456789ABCDEF, side), z, atol=1e-12)
    np.testing.assert_allclose((back ** 2).sum(1), (z ** 2).sum(1))
    assert rotation.block_size(length) == length & -length


def test_spec_example():
    """10.14's example: seed 0x0123456789abcdef, V of length 4, ẑ = (1, 0, 0, 0)."""
    got = rotation.unrotate(np.array([[1.0, 0, 0, 0]]), 0x0123456789ABCDEF, "V")
    assert got.tolist() == [[0.5, -0.5, 0.5, -0.5]]


def test_hessian_in_rotated_coordinates():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 32))
    h = x.T @ x / 200
    xr = rotation.rotate(x, 9, "V")
    np.testing.assert_allclose(rotation.rotate_hessian(h, 9), xr.T @ xr / 200, atol=1e-10)


def _pair(tmp_path, shapes, seed=0):
    rng = np.random.default_rng(seed)
    base, ft = {}, {}
    for name, (m, n) in shapes.items():
        w = rng.standard_normal((m, n)).astype(np.float32)
        d = rng.standard_normal((m, 8)) @ rng.standard_normal((8, n)) * 0.01
        d[:, 3] *= 20  # an outlier input: what rotation spreads
        base[name], ft[name] = w, (w + d).astype(np.float32)
    write_checkpoint(tmp_path / "base", {n: ("F32", a) for n, a in base.items()})
    write_checkpoint(tmp_path / "ft", {n: ("F32", a) for n, a in ft.items()})
    return base, ft


def test_encoder_rotates_sides_with_long_blocks(tmp_path):
    base, ft = _pair(tmp_path, {"a": (64, 96), "odd": (50, 32), "short": (6, 10)})
    out = tmp_path / "x.dcm"
    dcm.encode(tmp_path / "base", tmp_path / "ft", out, method="delta-come", ratio="1/4",
               options={"rotation": "hadamard"})
    with dcm.open(out) as f:
        recs = {n: f.record(n) for n in base}
        errs = {n: np.linalg.norm(f.tensor(n, base[n]) - ft[n]) / np.linalg.norm(ft[n] - base[n]) for n in base}
    assert recs["a"].kind == Kind.LOWRANK_ROTATED and (recs["a"].params["v_rotation"], recs["a"].params["u_rotation"]) == (1, 1)
    assert recs["odd"].kind == Kind.LOWRANK_ROTATED and (recs["odd"].params["v_rotation"], recs["odd"].params["u_rotation"]) == (1, 0)
    assert recs["short"].kind == Kind.LOWRANK_MIXED  # blocks of 2: nothing worth rotating
    assert max(errs.values()) < 0.2, errs
    info = dcm.info(out)
    assert info["header"]["version"] == "1.3" and info["choices"]["rotation"] == "hadamard"
    assert info["choices"]["rotated_records"] == 2
    assert info["totals"]["compressed"]["bytes"] <= sum(m * n for m, n in ((64, 96), (50, 32), (6, 10))) * 2 // 4
    dcm.verify(out, tmp_path / "base")


def test_rotation_lowers_the_error_of_vectors_with_outliers():
    """The mechanism: unit vectors with one large element quantize far better rotated, min-max grids of
    3 and 4 bits (at 2 bits the unrotated grid's zeroing of the small elements costs less)."""
    from dcm import quant

    rng = np.random.default_rng(0)
    v = rng.standard_normal((32, 256)) * 0.02
    v[np.arange(32), rng.integers(0, 256, 32)] = 1.0  # one outlier per vector
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for bits in (3, 4):
        plain = v - quant.dequantize(*quant.rtn(v, bits, 128), 128)
        z = rotation.rotate(v, 5, "V")
        rotated = z - quant.dequantize(*quant.rtn(z, bits, 128), 128)  # the same norm unrotated
        assert (rotated ** 2).sum() < 0.5 * (plain ** 2).sum(), bits


def test_refit_and_rotation_do_not_combine():
    with pytest.raises(UsageError, match="rotation"):
        get_method("delta-come", {"rotation": "hadamard", "refit": True})
    with pytest.raises(UsageError, match="rotation must be"):
        get_method("delta-come", {"rotation": "givens"})


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_runtime_rotates_activations(tmp_path, backend):
    base, ft = _pair(tmp_path, {"a": (64, 96)})
    out = tmp_path / "x.dcm"
    dcm.encode(tmp_path / "base", tmp_path / "ft", out, method="delta-come", ratio="1/4",
               options={"rotation": "hadamard"})
    with dcm.open(out) as f:
        dhat = torch.from_numpy((f.tensor("a", base["a"]) - base["a"]).astype(np.float64))
        rec = load_record(f, "a")
    assert rec.rotation is not None
    pack = LayerPack((64, 96), [rec, None])
    x = torch.randn(7, 96)
    seg = Segments.of(torch.tensor([0, 0, 0, 1, 1, 0, 1]).sort().values, 2)
    y = torch.zeros(7, 64)
    if backend == "triton":
        from dcm.runtime import triton_backend
        kernel = triton_backend.apply
    else:
        kernel = torch_backend.apply
    runtime_rotation.apply(kernel, pack, x, seg, y)
    lo, hi = seg.span(0)
    want = x[lo:hi].double() @ dhat.T
    assert float((y[lo:hi].double() - want).abs().max()) < 1e-5 * float(want.abs().max())
    assert float(y[hi:].abs().max()) == 0  # the other delta leaves its tokens alone
    u, s, v = torch_backend.factor_delta(pack, 0)
    assert float(((u.T * s) @ v - dhat.float()).abs().max()) < 1e-5


def test_patched_model_matches_the_decoded_weights(tmp_path):
    base, ft = _pair(tmp_path, {"lin.weight": (64, 96)})
    out = tmp_path / "x.dcm"
    dcm.encode(tmp_path / "base", tmp_path / "ft", out, method="delta-come", ratio="1/4",
               options={"rotation": "hadamard"})
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(96, 64, bias=False))
    with torch.no_grad():
        model.lin.weight.copy_(torch.from_numpy(base["lin.weight"]))
    with dcm.open(out) as f:
        decoded = torch.from_numpy(f.tensor("lin.weight", base["lin.weight"]))
    patch_model(model, out, backend="torch")
    x = torch.randn(4, 96)
    want = x.double() @ decoded.double().T
    with torch.no_grad():
        assert float((model(x).double() - want).abs().max()) < 1e-4
