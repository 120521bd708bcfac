"""The fast paths of the delta-come encoder: torch and numpy give the same factors and codes."""

from __future__ import annotations

import numpy as np
import pytest

from dcm import quant
from dcm.methods import svd
from dcm.methods.svd import exact_svd, randomized_svd


def long_tailed(rng, m, n, decay=0.8) -> np.ndarray:
    u = np.linalg.qr(rng.standard_normal((m, n)))[0]
    v = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return ((u * np.arange(1, n + 1) ** -decay) @ v.T).astype(np.float32)


def truncation_error(svd, a, k) -> float:
    return float(np.linalg.norm((svd.u[:k].T * svd.s[:k]) @ svd.v[:k] - a) / np.linalg.norm(a))


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_randomized_svd_backends(backend, monkeypatch):
    """With torch (QRs in torch) or without (numpy only): orthonormal factors, near-optimal rank k."""
    if backend == "torch":
        pytest.importorskip("torch")
    else:
        monkeypatch.setattr(svd, "_torch", lambda: None)
    a = long_tailed(np.random.default_rng(3), 320, 240)
    k = 40
    approx, exact = randomized_svd(a, k, oversample=16, power_iters=2, seed=1), exact_svd(a)
    q = len(approx.s)
    assert q == k + 16 and approx.u.shape == (q, 320) and approx.v.shape == (q, 240)
    assert all(x.dtype == np.float32 for x in (approx.u, approx.s, approx.v))
    assert approx.u.flags.c_contiguous
    np.testing.assert_allclose(approx.u @ approx.u.T, np.eye(q), atol=1e-4)
    np.testing.assert_allclose(approx.v @ approx.v.T, np.eye(q), atol=1e-4)
    assert np.all(np.diff(approx.s) <= 0)
    np.testing.assert_allclose(approx.s[:10], exact.s[:10], rtol=1e-3)
    assert truncation_error(approx, a, k) <= truncation_error(exact, a, k) * 1.03


def test_randomized_svd_backends_agree(monkeypatch):
    pytest.importorskip("torch")
    a = long_tailed(np.random.default_rng(4), 256, 200)
    with_torch = randomized_svd(a, 30, oversample=16, power_iters=2, seed=5)
    monkeypatch.setattr(svd, "_torch", lambda: None)
    without = randomized_svd(a, 30, oversample=16, power_iters=2, seed=5)
    np.testing.assert_allclose(with_torch.s, without.s, rtol=1e-4)
    # the same vectors, up to sign
    for x, y in ((with_torch.u[:20], without.u[:20]), (with_torch.v[:20], without.v[:20])):
        np.testing.assert_allclose(np.abs((x * y).sum(axis=1)), 1, atol=1e-3)


def reference_rtn(x, bits, group_size):
    """Round-to-nearest written element by element over repeated scales (the spec's formulas)."""
    x = np.asarray(x, dtype=np.float32)
    scale, zero = quant.fit(x, bits, group_size)
    n = x.shape[1]
    s = np.repeat(scale.astype(np.float32), group_size, axis=1)[:, :n]
    z = np.repeat(zero.astype(np.float32), group_size, axis=1)[:, :n]
    maxq = ((1 << np.broadcast_to(np.asarray(bits), (x.shape[0],))) - 1).astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.clip(np.where(s > 0, np.round(x / s) + z, z), 0, maxq).astype(np.uint8)
    return codes, scale, zero, (codes.astype(np.float32) - z) * s


@pytest.mark.parametrize("rows,n,group_size", [(5, 300, 128), (4, 256, 128), (3, 17, 1), (6, 100, 7), (2, 5, 64)])
def test_quantizer_matches_the_elementwise_formulas(rows, n, group_size):
    rng = np.random.default_rng(rows * n)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[0] = 0  # all-zero groups: scale 0, every code the zero point
    for bits in (2, 3, 8, np.array([8, 3] + [2] * (rows - 2))):
        codes, scale, zero = quant.rtn(x, bits, group_size)
        ref_codes, ref_scale, ref_zero, ref_hat = reference_rtn(x, bits, group_size)
        assert codes.shape == x.shape and codes.flags.c_contiguous
        np.testing.assert_array_equal(codes, ref_codes)
        np.testing.assert_array_equal(scale, ref_scale)
        np.testing.assert_array_equal(zero, ref_zero)
        hat = quant.dequantize(codes, scale, zero, group_size)
        assert hat.dtype == np.float32 and hat.flags.c_contiguous
        np.testing.assert_array_equal(hat, ref_hat)
    # a strided input (a transposed view) quantizes like its copy
    view = rng.standard_normal((n, rows)).astype(np.float32).T
    for got, want in zip(quant.rtn(view, 3, group_size), quant.rtn(view.copy(), 3, group_size)):
        np.testing.assert_array_equal(got, want)
