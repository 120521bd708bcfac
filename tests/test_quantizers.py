"""The encoder's group quantizers (codec/methods/quantizers.py) and delta-come's defaults (issue 18).

MSE clipping searches each quantization group's clip ratio; it must never do
worse than min–max on the error it minimises (1.0 is among the ratios tried),
must weigh that error as told, and must store exactly the grid it chose.
"""

from __future__ import annotations

import numpy as np
import pytest

import dcm
from dcm import quant
from dcm.cli import main
from dcm.errors import UsageError
from dcm.methods import get_method, gptq
from dcm.methods.quantizers import MinMax, MseClip, get_quantizer

from conftest import write_checkpoint


def group_errors(x, codes, scales, zeros, group_size, weights=None):
    err = (quant.dequantize(codes, scales, zeros, group_size) - x) ** 2
    if weights is not None:
        err = err * weights
    rows, n = x.shape
    pad = -n % group_size
    return np.pad(err, ((0, 0), (0, pad))).reshape(rows, -1, group_size).sum(axis=2)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_mse_clip_never_worse_than_minmax_per_group(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((40, 300)).astype(np.float32) * np.exp(rng.standard_normal((40, 1)))
    x[:, 7] *= 8  # outliers: where clipping pays
    minmax = group_errors(x, *MinMax().rtn(x, bits, 64), 64)
    mse = group_errors(x, *MseClip().rtn(x, bits, 64), 64)
    assert (mse <= minmax * (1 + 1e-6) + 1e-12).all()
    if bits <= 4:
        assert mse.sum() < 0.95 * minmax.sum()


def test_minmax_is_the_papers_fit():
    x = np.random.default_rng(0).standard_normal((5, 100)).astype(np.float32)
    for got, want in zip(MinMax().fit(x, 3, 32), quant.fit(x, 3, 32)):
        np.testing.assert_array_equal(got, want)


def test_weights_steer_the_clip():
    """With all weight on one element the clip keeps that element exact-ish: its error under the weighted
    search is no more than under min-max, where the unweighted search may clip it."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 128)).astype(np.float32)
    x[:, 5] = 6.0  # the largest element of every row, the first an unweighted clip sacrifices
    w = np.full(128, 1e-6, dtype=np.float32)
    w[5] = 1.0
    plain = MseClip().rtn(x, 2, 128)
    weighted = MseClip().rtn(x, 2, 128, w)
    err = lambda q: np.abs(quant.dequantize(*q, 128)[:, 5] - x[:, 5]).mean()  # noqa: E731
    assert err(weighted) < err(plain)
    assert err(weighted) <= np.abs(quant.dequantize(*MinMax().rtn(x, 2, 128), 128)[:, 5] - x[:, 5]).mean() + 1e-6


def test_gptq_takes_a_quantizer():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 64))
    xs = rng.standard_normal((500, 64))
    h = xs.T @ xs / 500
    bits = np.full(6, 2)
    for quantizer in (MinMax(), MseClip()):
        codes, scales, zeros = gptq.quantize_rows(w, h, bits, 32, fit=quantizer.fit)
        assert codes.max() <= 3 and np.isfinite(scales.astype(np.float32)).all()
        codes, scales, zeros = gptq.quantize_columns(w, np.eye(6), bits, 32, fit=quantizer.fit)
        assert codes.max() <= 3


def test_unknown_clip_is_a_usage_error():
    with pytest.raises(UsageError, match="clip"):
        get_quantizer("absmax")
    with pytest.raises(UsageError, match="clip"):
        get_method("delta-come", {"clip": "absmax"})


def test_delta_come_defaults_to_rd_and_the_recipe_is_the_paper():
    c = get_method("delta-come").get_config()
    assert (c["alloc"], c["clip"], c["rotation"]) == ("rd", "minmax", "none")
    c = get_method("delta-come", {"alloc": "recipe"}).get_config()
    assert (c["alloc"], c["clip"], c["recipe"]) == ("recipe", "minmax", "8:2,3:32,2")
    c = get_method("delta-come", {"recipe": "8:1,2"}).get_config()
    assert c["alloc"] == "recipe"  # a recipe asked for is a recipe used
    with pytest.raises(UsageError, match="recipe"):
        get_method("delta-come", {"alloc": "rd", "recipe": "8:1,2"})


def test_cli_records_clip_and_rotation(tmp_path, capsys):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    d = (rng.standard_normal((64, 4)) @ rng.standard_normal((4, 64)) * 0.01).astype(np.float32)
    base = write_checkpoint(tmp_path / "base", {"w": ("F32", w)})
    ft = write_checkpoint(tmp_path / "ft", {"w": ("F32", w + d)})
    out = tmp_path / "x.dcm"
    assert main(["-q", "encode", str(base), str(ft), "-o", str(out), "--method", "delta-come", "--ratio", "1/4",
                 "--clip", "mse", "--rotation", "hadamard"]) == 0
    params = dcm.info(out)["method"]["params"]
    assert (params["alloc"], params["clip"], params["rotation"]) == ("rd", "mse", "hadamard")
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "choices:     quantizer rtn, grids mse, rotation hadamard (1 lowrank-rotated records)" in text
