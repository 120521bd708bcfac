"""``--device``: the torch numerics a GPU runs, checked on the CPU against the numpy reference, and the
CUDA encode against the CPU one (skipped without a CUDA device)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import write_checkpoint

import dcm
from dcm import compute, quant
from dcm.methods import accel, gptq

torch = pytest.importorskip("torch")
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: no CUDA device here (scripts/gpu_check.sh runs these on a GPU machine)")


def _x(rng, rows, n):
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[0] = 0  # an all-zero row: zero scales
    x[1, ::3] = 0
    if rows > 2:
        x[2] *= 1e-30  # subnormal-scale groups
    return x


@pytest.mark.parametrize("bits", [2, 3, 4, 8, "mixed"])
@pytest.mark.parametrize("n, group_size", [(128, 128), (300, 128), (77, 16), (5, 1)])
def test_torch_rtn_gives_the_numpy_bits(bits, n, group_size):
    rng = np.random.default_rng(n * 7 + group_size)
    x = _x(rng, 12, n)
    b = rng.choice([2, 3, 8], size=12) if bits == "mixed" else bits
    want = quant.rtn(x, b, group_size)
    got = accel.rtn_torch(x, b, group_size, device="cpu")
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape
        assert w.tobytes() == g.tobytes()
    np.testing.assert_array_equal(accel.dequantize_torch(*got, group_size, device="cpu"),
                                  quant.dequantize(*want, group_size))


def _hessian(rng, n):
    x = rng.standard_normal((4 * n, n)) * np.linspace(0.1, 2, n)
    h = x.T @ x / len(x)
    h[3, :] = h[:, 3] = 0  # an input that never fires
    return h


def _output_error(w, h, codes, scales, zeros, group_size):
    d = quant.dequantize(codes, scales, zeros, group_size) - w
    return float(np.einsum("ij,jk,ik->", d, h, d))


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_gptq_rows_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    w, h = rng.standard_normal((24, 200)), _hessian(rng, 200)
    bits = rng.choice([2, 3, 8], size=24)
    w[:, 3] = 0
    want = gptq.quantize_rows(w, h, bits, 64)
    got = accel.gptq_rows_torch(w, h, bits, 64, device="cpu")
    assert np.mean(want[0] == got[0]) > 0.99  # sums in another order: a few codes may flip
    e_want, e_got = (_output_error(w, h, *q, 64) for q in (want, got))
    assert abs(e_got - e_want) <= 0.01 * e_want


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_gptq_columns_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    u, h = rng.standard_normal((40, 150)), _hessian(rng, 40)
    h[3, 3] = 1.0
    bits = np.sort(rng.choice([2, 3, 8], size=40))[::-1]
    want = gptq.quantize_columns(u, h, bits, 32)
    got = accel.gptq_columns_torch(u, h, bits, 32, device="cpu")
    assert np.mean(want[0] == got[0]) > 0.99
    def err(q):
        d = quant.dequantize(*q, 32) - u
        return float(np.einsum("im,ij,jm->", d, h, d))
    assert abs(err(got) - err(want)) <= 0.01 * err(want)


# --- the GPU code path end to end, on the CPU ----------------------------------------------------


def _pair(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    base, ft = {}, {}
    for name, (m, n) in {"a.weight": (96, 64), "b.weight": (40, 120), "c.weight": (256, 48)}.items():
        w = (0.05 * rng.standard_normal((m, n))).astype(np.float32)
        k = min(m, n)
        u, v = np.linalg.qr(rng.standard_normal((m, k)))[0], np.linalg.qr(rng.standard_normal((n, k)))[0]
        base[name], ft[name] = ("F32", w), ("F32", w + ((u * (0.01 / np.arange(1, k + 1))) @ v.T).astype(np.float32))
    return write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "ft", ft)


def _stats(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    tensors = {n: _hessian(rng, k).astype(np.float32) for n, k in (("a.weight", 64), ("b.weight", 120),
                                                                   ("c.weight", 48))}
    path = tmp_path / "stats.safetensors"
    save_file(tensors, str(path), metadata={"format": "dcm-calibration", "version": "1", "tokens": "512"})
    return str(path)


def _coded_error(path, base_dir, ft_dir) -> float:
    from dcm.checkpoint import Checkpoint

    e2 = r2 = 0.0
    with dcm.open(path) as f, Checkpoint(base_dir) as b, Checkpoint(ft_dir) as ft:
        for rec in f.records():
            base = b.read(rec.name).astype(np.float64)
            d, g = ft.read(rec.name) - base, f.tensor(rec.name, b.read(rec.name)) - base
            e2, r2 = e2 + float(((g - d) ** 2).sum()), r2 + float((d ** 2).sum())
    return (e2 / r2) ** 0.5


def _budget_ok(path, ratio=Fraction(1, 8)):
    """Every lossy record's bytes (index entry, blob, padding) within the ratio of its parameters."""
    from test_deltacome import lossy_bytes

    total, params, _ = lossy_bytes(path)
    return 8 * total <= ratio * 16 * params


@pytest.mark.parametrize("options", [{}, {"svd": "randomized"}, {"alloc": "rd"}])
def test_gpu_code_path_on_the_cpu_gives_the_cpu_bytes(tmp_path, monkeypatch, options):
    """With the accelerated dispatch forced on (torch, device "cpu"), round-to-nearest encodes are the
    very bytes of the numpy path: the SVD is the same torch code, and torch RTN is bit-exact."""
    pair = _pair(tmp_path)
    dcm.encode(*pair, tmp_path / "cpu.dcm", method="delta-come", ratio="1/8", options=options)
    monkeypatch.setattr(compute, "is_accelerated", lambda: True)
    dcm.encode(*pair, tmp_path / "torch.dcm", method="delta-come", ratio="1/8", options=options)
    assert (tmp_path / "torch.dcm").read_bytes() == (tmp_path / "cpu.dcm").read_bytes()


def test_gpu_gptq_path_on_the_cpu_is_close(tmp_path, monkeypatch):
    pair, stats = _pair(tmp_path), _stats(tmp_path)
    dcm.encode(*pair, tmp_path / "cpu.dcm", method="delta-come", ratio="1/8", options={"calibration": stats})
    monkeypatch.setattr(compute, "is_accelerated", lambda: True)
    dcm.encode(*pair, tmp_path / "torch.dcm", method="delta-come", ratio="1/8", options={"calibration": stats})
    assert _budget_ok(tmp_path / "torch.dcm")
    e_cpu, e_torch = (_coded_error(tmp_path / p, *pair) for p in ("cpu.dcm", "torch.dcm"))
    assert abs(e_torch - e_cpu) <= 0.02 * e_cpu


# --- CUDA --------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("options", [{}, {"svd": "randomized"}, {"alloc": "rd"}, {"calibration": "STATS"}])
def test_cuda_encode_is_close_to_the_cpu_one(tmp_path, options):
    """Same records, within the same budget, an error within 2 % of the CPU encode's."""
    pair = _pair(tmp_path)
    if options.get("calibration"):
        options = {"calibration": _stats(tmp_path)}
    for device in ("cpu", "cuda"):
        dcm.encode(*pair, tmp_path / f"{device}.dcm", method="delta-come", ratio="1/8", options=options,
                   device=device)
    with dcm.open(tmp_path / "cpu.dcm") as a, dcm.open(tmp_path / "cuda.dcm") as b:
        assert [(r.name, r.kind_name) for r in a.records()] == [(r.name, r.kind_name) for r in b.records()]
        assert a.metadata()["params"] == b.metadata()["params"]
    assert _budget_ok(tmp_path / "cuda.dcm")
    e_cpu, e_gpu = (_coded_error(tmp_path / p, *pair) for p in ("cpu.dcm", "cuda.dcm"))
    assert abs(e_gpu - e_cpu) <= 0.02 * e_cpu


@needs_cuda
def test_cuda_encode_is_deterministic(tmp_path):
    pair = _pair(tmp_path)
    for name in ("a", "b"):
        dcm.encode(*pair, tmp_path / f"{name}.dcm", method="delta-come", ratio="1/8", options={"alloc": "rd"},
                   device="cuda", threads=2)
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()


@needs_cuda
def test_cuda_torch_ops_match_the_cpu(tmp_path):
    rng = np.random.default_rng(0)
    x = _x(rng, 16, 300)
    for want, got in zip(quant.rtn(x, 3, 128), accel.rtn_torch(x, 3, 128, device="cuda")):
        assert want.tobytes() == got.tobytes()
    w, h = rng.standard_normal((16, 128)), _hessian(rng, 128)
    want, got = gptq.quantize_rows(w, h, np.full(16, 3), 64), accel.gptq_rows_torch(w, h, np.full(16, 3), 64,
                                                                                     device="cuda")
    assert np.mean(want[0] == got[0]) > 0.99


def test_device_is_not_recorded(tmp_path):
    """Where the numerics ran is not part of the method's params (the file says how, not where)."""
    pair = _pair(tmp_path)
    dcm.encode(*pair, tmp_path / "x.dcm", method="delta-come", ratio="1/8", device="cpu")
    with dcm.open(tmp_path / "x.dcm") as f:
        assert "device" not in f.metadata()["params"]
    assert Path(tmp_path / "x.dcm").stat().st_size > 0
