"""Fast checks of benchmarks/scale.py's parts: the Llama shapes, the synthetic deltas, the projections."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("_dcm_scale_benchmark", ROOT / "benchmarks/scale.py")
scale = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = scale
spec.loader.exec_module(scale)


def test_llama_shapes():
    t7 = scale.tensors(scale.LLAMA_7B, 32)
    assert len(t7) == 2 + 32 * 9 + 1
    assert sum(np.prod(s) for _, s, _ in t7) == 6_738_415_616  # Llama-2-7B's parameter count
    names = [n for n, _, _ in t7]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    assert dict((n, s) for n, s, _ in t7)["model.layers.31.mlp.down_proj.weight"] == (4096, 11008)
    t70 = scale.tensors(scale.LLAMA_70B, 80)
    assert sum(np.prod(s) for _, s, _ in t70) == 68_976_648_192  # Llama-2-70B's
    assert dict((n, s) for n, s, _ in t70)["model.layers.0.self_attn.k_proj.weight"] == (1024, 8192)


@pytest.mark.parametrize("role, shape", [("q", (512, 384)), ("down", (256, 700)), ("embed", (2000, 64)),
                                         ("norm", (384,))])
def test_synthetic_delta_looks_like_a_fine_tune(role, shape):
    base, ft = scale.make_tensors("x", shape, role, seed=0)
    delta = ft.astype(np.float64) - base
    rel = np.linalg.norm(delta) / np.linalg.norm(base)
    assert 0.004 <= rel <= 0.021 if role != "norm" else rel < 0.02
    if role in ("q", "down"):
        s = np.linalg.svd(delta, compute_uv=False)
        top = (s[: len(s) // 10] ** 2).sum() / (s ** 2).sum()
        assert 0.5 < top < 0.9  # a long tail, neither noise (~0.1) nor low rank (~1)
    if role == "embed":
        moved = np.linalg.norm(delta, axis=1) > 1e-3 * np.linalg.norm(base, axis=1)
        assert 0.03 < moved.mean() < 0.07  # the rows of the tokens seen in training
    assert (ft == scale.make_tensors("x", shape, role, seed=0)[1]).all()  # seeded


def test_work_model_and_projection():
    assert scale._work("lossless", (8192, 8192)) == 4 * scale._work("lossless", (4096, 4096))
    assert scale._work("recipe-exact", (8192, 8192)) == 8 * scale._work("recipe-exact", (4096, 4096))
    assert scale._work("recipe-randomized", (4096, 4096)) < scale._work("recipe-exact", (4096, 4096))
    timings = {f"code:{n}": 1.0 for n, _, _ in scale.tensors(scale.LLAMA_7B, 2)}
    report = {"wall": 20.0, "timings": timings}
    p = scale.project("lossless", report, 2, 2)
    assert p["layer_job_s"] == 9.0  # 7 matrices and 2 norms, a second each
    assert p["wall32"] == pytest.approx(20 + 30 * 9 / 2)
    assert p["wall70"] > p["wall32"]


def test_scale_help_runs():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/scale.py"), "--help"], capture_output=True,
                          text=True, check=True)
    assert "--layers" in done.stdout and "Llama-2-7B" in done.stdout


def test_gpu_check_parses_and_refuses_without_cuda():
    subprocess.run(["bash", "-n", str(ROOT / "scripts/gpu_check.sh")], check=True)
    # No device visible, also on a GPU machine (where the script would otherwise run its checks).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 2 and "no CUDA device" in done.stdout


def test_each_config_runs_the_allocation_its_name_says():
    """delta-come's default allocation is rd: a recipe row must ask for the recipe (it once ran rd)."""
    from dcm import methods
    for name, cfg in scale.CONFIGS.items():
        if cfg["method"] != "delta-come":
            continue
        method = methods.get_method(cfg["method"], cfg.get("options"), ratio=cfg["ratio"])
        alloc, svd = name.split("-")
        assert (method.alloc, method.svd) == (alloc, svd), name
