"""Every budgeted lossy method against what it achieves: budgets counted from the file, error bounds.

One pair of three matrices (a rank-12 delta plus noise, 256×192, 192×320, 128×128,
F32) encoded by every method at two ratios.  Per method and ratio:

- **Budget** (``lossy_cost``: index entries, stored blobs and the padding before
  them, read from the file with ``struct``/``msgpack`` alone): at most r·16 bits
  per coded parameter, and at least ``MIN_SPENT`` (95 %) of that.  The second
  half makes the first sensitive: an encoder that believes its budget 6 % larger
  than it is spends ≥ 0.95 × 1.06 > 1 budget here and fails.  (Bitdelta plans on
  raw sizes, then zstd shrinks its scales: it is held to both on raw bytes.)
- **Error** (‖Δ̂ − Δ‖ / ‖Δ‖ over the three matrices, Δ̂ from the decoded tensors):
  at most ``bound(MEASURED)``, the error measured when these tests were written
  with margin: 1.5×, but never more than halfway to 1.0, the error of a decode
  equal to the base.  So a decode equal to the base, or an encoder whose error
  grew by half, fails.  Where the method has an exact expectation it is checked
  too: ``lowrank`` is the truncated SVD at its rank (float16 rounding aside),
  DARE is unbiased with the error its drop rate predicts, BitDelta's coded rows
  are sign(Δ)·mean|Δ| exactly.
- **Scale** (g = ⟨Δ̂, Δ⟩ / ‖Δ̂‖², the factor that would best rescale Δ̂): within
  0.05 of what was measured (1 for ``lowrank`` and BitDelta, whose scales are
  least-squares; below 1 where quantization or sparsification adds noise).  A
  Δ̂ off by a constant factor fails here even when its error stays under the
  bound.
- **Singular values**: the SVD-based methods store the top k singular values of
  Δ (read by the reference decoder), so a record that loses or rescales some
  fails, whether or not its error shows it (vectors past the delta's rank 12
  carry only noise here).

DARE's error exceeds 1 by design (noise of p/(1 − p) times the delta's energy),
so its bound rejects the base through the projection ⟨Δ̂, Δ⟩ / ‖Δ‖² ≈ 1 instead.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import dcm
from dcm.constants import Kind

import spec_oracle
from conftest import write_checkpoint
from test_sparse_methods import LOSSY, lossy_cost, read_file

SHAPES = {"a.weight": (256, 192), "b.weight": (192, 320), "c.weight": (128, 128)}
METHODS = {  # label: (method, options)
    "delta-come": ("delta-come", {}),  # rd allocation, min-max grids, blobs zstd or rANS
    "delta-come-mse": ("delta-come", {"clip": "mse"}),  # MSE-clipped grids
    "delta-come-rotated": ("delta-come", {"rotation": "hadamard"}),  # lowrank-rotated records
    "delta-come-recipe": ("delta-come", {"alloc": "recipe"}),  # the paper's recipe and min-max grids
    "impart": ("impart", {}),
    "impart-qt": ("impart-qt", {}),  # the paper's shares by size
    "impart-qt-rd": ("impart-qt", {"alloc": "rd"}),  # each matrix's budget by rate-distortion
    "lowrank": ("lowrank", {}),
    "dare": ("dare", {}),
    "bitdelta": ("bitdelta", {}),
}
# Bitdelta takes about 1.06 bits per parameter whole: below 1/16 the budget binds.
RATIOS = {label: ("1/16", "1/24") if label == "bitdelta" else ("1/8", "1/16") for label in METHODS}
CASES = [(label, ratio) for label in METHODS for ratio in RATIOS[label]]
MIN_SPENT = 0.95

# (relative error, scale g) over the three matrices, measured on this pair (dcm 0.1.0, numpy 2.4,
# torch 2.13 CPU); DARE's scale is 1 − p by design and is checked against that instead.
MEASURED = {
    ("delta-come", "1/8"): (0.0321, 1.0000), ("delta-come", "1/16"): (0.1277, 1.0000),
    ("delta-come-mse", "1/8"): (0.0314, 1.0000), ("delta-come-mse", "1/16"): (0.0718, 1.0001),
    ("delta-come-rotated", "1/8"): (0.0321, 0.9998), ("delta-come-rotated", "1/16"): (0.0718, 0.9999),
    ("delta-come-recipe", "1/8"): (0.2594, 0.9353), ("delta-come-recipe", "1/16"): (0.2601, 0.9356),
    ("impart", "1/8"): (0.4508, 0.8396), ("impart", "1/16"): (0.6093, 0.8853),
    # rd loses at 1/8 here (0.314 vs 0.286): three matrices of one spectrum leave it nothing to move, and its
    # error model is an expectation; on the real pair it gains 0.004-0.03 of gain (README, Measured).
    ("impart-qt-rd", "1/8"): (0.3140, 0.9110), ("impart-qt-rd", "1/16"): (0.4650, 0.8215),
    ("impart-qt", "1/8"): (0.2853, 0.9248), ("impart-qt", "1/16"): (0.4665, 0.8203),
    ("lowrank", "1/8"): (0.1533, 1.0000), ("lowrank", "1/16"): (0.5498, 1.0000),
    ("dare", "1/8"): (2.5851, None), ("dare", "1/16"): (3.8541, None),
    ("bitdelta", "1/16"): (0.6536, 1.0000), ("bitdelta", "1/24"): (0.7737, 1.0000),
}
SVD_METHODS = ("delta-come", "delta-come-mse", "delta-come-rotated", "delta-come-recipe", "impart", "impart-qt",
               "impart-qt-rd", "lowrank")


def bound(measured: float) -> float:
    """1.5× the measured error, capped halfway between it and 1.0 (a decode equal to the base)."""
    return min(1.5 * measured, (1 + measured) / 2)


def pair_tensors(seed=0):
    rng = np.random.default_rng(seed)
    base, ft = {}, {}
    for name, (m, n) in SHAPES.items():
        w = rng.standard_normal((m, n)).astype(np.float32)
        low = rng.standard_normal((m, 12)) @ rng.standard_normal((12, n)) * 0.02
        delta = (low + 0.003 * rng.standard_normal((m, n))).astype(np.float32)
        base[name], ft[name] = w, (w + delta).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    base["a.bias"], ft["a.bias"] = bias, bias + np.float32(0.01)
    return base, ft


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    base, ft = pair_tensors()
    write_checkpoint(root / "base", {n: ("F32", a) for n, a in base.items()})
    write_checkpoint(root / "ft", {n: ("F32", a) for n, a in ft.items()})
    return root, base, ft


@pytest.fixture(scope="module")
def encoded(pair):
    """``get(label, ratio)``: (path, {name: Δ̂ float64 from the decoded tensor}, {name: record}), encoded once."""
    root, base, _ = pair
    cache = {}

    def get(label, ratio):
        if (label, ratio) not in cache:
            method, options = METHODS[label]
            path = root / f"{label}-{ratio.replace('/', '_')}.dcm"
            dcm.encode(root / "base", root / "ft", path, method=method, ratio=ratio, options=options)
            with dcm.open(path) as f:
                deltas = {n: f.tensor(n, base[n]).astype(np.float64) - base[n] for n in SHAPES}
                records = {n: f.record(n) for n in SHAPES}
            cache[label, ratio] = path, deltas, records
        return cache[label, ratio]
    return get


def true_deltas(pair):
    _, base, ft = pair
    return {n: ft[n].astype(np.float64) - base[n] for n in SHAPES}


def relative_error(got: dict, want: dict) -> float:
    num = sum(float(((got[n] - want[n]) ** 2).sum()) for n in want)
    return math.sqrt(num / sum(float((want[n] ** 2).sum()) for n in want))


def svd_tail(delta: np.ndarray, k: int) -> float:
    """‖Δ − Δ_k‖ / ‖Δ‖ of the best rank-k approximation (Eckart–Young)."""
    s = np.linalg.svd(delta, compute_uv=False)
    return math.sqrt(float((s[k:] ** 2).sum() / (s ** 2).sum()))


def raw_cost(path) -> int:
    """Like ``lossy_cost``, but each blob at its raw (uncompressed) length."""
    _, index, _, _ = read_file(path)
    stored, _ = lossy_cost(path)
    lossy = [r for r in index["tensors"] if r["kind"] in LOSSY]
    return stored + sum(b["raw_length"] - b["length"] for r in lossy for b in r["blobs"])


# --- budgets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("label, ratio", CASES)
def test_budget_counted_from_the_file(encoded, label, ratio):
    path, _, records = encoded(label, ratio)
    spent, params = lossy_cost(path)
    assert params == sum(m * n for m, n in SHAPES.values())
    assert all(r.kind in LOSSY for r in records.values())
    budget = int(eval(ratio) * 16 * params) // 8  # noqa: S307 - a literal fraction
    if label == "bitdelta":  # planned on raw sizes (zstd then shrinks the zero scales of rows not coded)
        spent = raw_cost(path)
    assert spent <= budget, (label, ratio, spent, budget)
    assert spent >= MIN_SPENT * budget, (label, ratio, spent / budget)


SWEEP = {  # methods whose budget is spent in steps (vectors, rows): every ratio's leftover is different
    "lowrank": [f"1/{d}" for d in (5, 6, 7, 9, 10, 12, 14, 20)],
    "delta-come": [f"1/{d}" for d in (5, 7, 12, 24)],
    "delta-come-recipe": [f"1/{d}" for d in (5, 7, 12, 24)],
    "bitdelta": [f"1/{d}" for d in (17, 18, 20, 22, 26, 30, 32, 40)],
}


@pytest.mark.parametrize("label", list(SWEEP))
def test_budget_over_a_sweep_of_ratios(pair, label):
    """Within budget at every ratio, whatever the step size leaves over (the last matrix has no later
    one to absorb an overspend)."""
    root, _, _ = pair
    method, options = METHODS[label]
    for ratio in SWEEP[label]:
        path = root / f"sweep-{label}.dcm"
        dcm.encode(root / "base", root / "ft", path, method=method, ratio=ratio, options=options, overwrite=True)
        spent, params = lossy_cost(path) if label != "bitdelta" else (raw_cost(path), lossy_cost(path)[1])
        assert spent <= int(eval(ratio) * 16 * params) // 8, (label, ratio, spent)  # noqa: S307


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("label, ratio", [c for c in CASES if c[0] != "dare"])
def test_error_within_what_the_method_achieves(pair, encoded, label, ratio):
    _, got, records = encoded(label, ratio)
    want = true_deltas(pair)
    err = relative_error(got, want)
    measured_err, measured_scale = MEASURED[label, ratio]
    limit = bound(measured_err)
    assert limit < 1  # so a decode equal to the base (error 1.0) fails
    assert err <= limit, (label, ratio, err, measured_err)
    scale = sum(float((got[n] * want[n]).sum()) for n in want) / sum(float((got[n] ** 2).sum()) for n in want)
    assert abs(scale - measured_scale) <= 0.05, (label, ratio, scale, measured_scale)
    for name, rec in records.items():  # a rank-k Δ̂ is never better than the truncated SVD
        rank = rec.params.get("rank", rec.params["groups"][-1][1] if rec.params.get("groups") else None)
        if rank is not None:
            assert relative_error({name: got[name]}, {name: want[name]}) >= svd_tail(want[name], rank) - 1e-9


@pytest.mark.parametrize("label, ratio", [c for c in CASES if c[0] in SVD_METHODS])
def test_singular_values_are_the_deltas(pair, encoded, label, ratio):
    """S in the file (by the reference decoder) is Δ's top k singular values, in float32.

    ``rd`` stores its vectors widest first, and may skip one whose bytes buy less
    than a later one's: there every stored S is one of Δ's singular values."""
    path, _, _ = encoded(label, ratio)
    want = true_deltas(pair)
    for name, t in spec_oracle.dcmref.decode(str(path)).tensors.items():
        if name not in want:
            continue
        m, n = t.shape
        factors = np.frombuffer(t.factors, dtype="<f4").astype(np.float64)
        k = factors.size // (1 + m + n)
        sigma = np.linalg.svd(want[name], compute_uv=False)
        assert k >= 1, name
        if label in ("delta-come", "delta-come-mse", "delta-come-rotated"):
            nearest = np.abs(factors[:k, None] - sigma[None, :]).min(axis=1)
            assert (nearest <= 1e-5 * sigma[0]).all(), (name, nearest.max())
            assert np.unique(np.argmin(np.abs(factors[:k, None] - sigma[None, :]), axis=1)).size == k, name
        else:
            np.testing.assert_allclose(factors[:k], sigma[:k], rtol=0, atol=1e-5 * sigma[0], err_msg=name)


@pytest.mark.parametrize("ratio", RATIOS["lowrank"])
def test_lowrank_is_the_truncated_svd(pair, encoded, ratio):
    """Per matrix: the error of the best rank-k approximation, plus float16 rounding of U and V only."""
    _, got, records = encoded("lowrank", ratio)
    want = true_deltas(pair)
    for name, rec in records.items():
        k = rec.params["rank"]
        assert k >= 1
        err = relative_error({name: got[name]}, {name: want[name]})
        tail = svd_tail(want[name], k)
        assert tail - 1e-9 <= err <= tail + 2e-3, (name, k, err, tail)


@pytest.mark.parametrize("ratio", RATIOS["dare"])
def test_dare_is_unbiased_with_the_predicted_error(pair, encoded, ratio):
    """E[Δ̂] = Δ: ⟨Δ̂, Δ⟩/‖Δ‖² within 5 standard deviations of 1; the error is √(Σ Δ²·p/(1−p)) / ‖Δ‖."""
    _, got, records = encoded("dare", ratio)
    want = true_deltas(pair)
    energy = sum(float((d ** 2).sum()) for d in want.values())
    projection = sum(float((got[n] * want[n]).sum()) for n in want) / energy
    variance = predicted = 0.0
    for name, rec in records.items():
        assert rec.kind == Kind.SPARSE
        p = rec.params["drop"] / 2**32 if rec.params["mask"] == 1 else 1 - np.count_nonzero(got[name]) / got[name].size
        variance += float((want[name] ** 4).sum()) * p / (1 - p)
        predicted += float((want[name] ** 2).sum()) * p / (1 - p)
    sd = math.sqrt(variance) / energy
    assert sd < 0.05  # tight enough that the base (projection 0) or a missing rescale (1 − p) fails
    assert abs(projection - 1) <= 5 * sd, (projection, sd)
    err = relative_error(got, want)
    assert abs(err / math.sqrt(predicted / energy) - 1) <= 0.05, (err, math.sqrt(predicted / energy))
    assert err <= 1.5 * MEASURED["dare", ratio][0]


@pytest.mark.parametrize("ratio", RATIOS["bitdelta"])
def test_bitdelta_rows_are_signs_times_mean_abs(pair, encoded, ratio):
    """Coded rows decode to sign(Δ)·mean|Δ| of the row, exactly; the others to 0; the largest scales first."""
    _, got, _ = encoded("bitdelta", ratio)
    _, base, _ = pair
    coded_rows = 0
    for name, delta in true_deltas(pair).items():
        alpha = np.abs(delta).mean(axis=1)
        coded = np.abs(got[name]).max(axis=1) > 0
        expected = np.where(delta >= 0, alpha[:, None], -alpha[:, None]) * coded[:, None]
        tolerance = 4 * np.finfo(np.float32).eps * (np.abs(base[name]).max() + alpha.max())  # W = base + Δ̂ in F32
        np.testing.assert_allclose(got[name], expected, rtol=0, atol=tolerance, err_msg=name)
        if coded.any() and (~coded).any():
            assert alpha[coded].min() >= alpha[~coded].max() * (1 - 1e-6), name
        coded_rows += int(coded.sum())
    assert 0 < coded_rows < sum(m for m, _ in SHAPES.values())  # the budget binds: some rows, not all
