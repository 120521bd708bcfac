"""The skip policy (tests/skip_policy.py): a skip for a reason off the allow-list fails the run.

Each case runs pytest in a subprocess on a few tiny test files whose conftest
imports the policy's hooks exactly as tests/conftest.py does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import skip_policy

TESTS = Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from skip_policy import (pytest_collectreport, pytest_runtest_logreport, pytest_sessionfinish,  # noqa: F401
                         pytest_terminal_summary)
"""

FILES = {
    "module_skip": "import pytest\npytest.importorskip('dcm_no_such_module')\n\ndef test_never():\n    pass\n",
    "test_skip": "import pytest\n\ndef test_skips():\n    pytest.skip('the real pair is not in data/real')\n",
    "cuda_skip": "import pytest\n\n@pytest.mark.skipif(True, reason='needs CUDA (a GPU-only check)')\n"
                 "def test_gpu():\n    pass\n",
    "passes": "def test_ok():\n    assert True\n",
    "fails": "def test_bad():\n    assert False\n",
}


def run_pytest(tmp_path, names, escape=False):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for name in names:
        (tmp_path / f"test_{name}.py").write_text(FILES[name])
    env = {k: v for k, v in os.environ.items() if k != skip_policy.ESCAPE}
    if escape:
        env[skip_policy.ESCAPE] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_module_that_skips_fails_the_run(tmp_path):
    rc, out = run_pytest(tmp_path, ["module_skip", "passes"])
    assert rc == 1, out
    assert "skips not on the allow-list" in out and "dcm_no_such_module" in out


def test_a_test_that_skips_fails_the_run(tmp_path):
    rc, out = run_pytest(tmp_path, ["test_skip", "passes", "cuda_skip"])
    assert rc == 1, out
    assert "test_skip.py::test_skips: the real pair is not in data/real" in out
    assert "test_gpu" not in out.split("skips not on the allow-list")[1]  # the allowed one is not listed


def test_allowed_reasons_pass(tmp_path):
    rc, out = run_pytest(tmp_path, ["cuda_skip", "passes"])
    assert rc == 0, out
    assert "1 passed, 1 skipped" in out and "allow-list" not in out


def test_escape_hatch_reports_without_failing(tmp_path):
    rc, out = run_pytest(tmp_path, ["module_skip", "passes"], escape=True)
    assert rc == 0, out
    assert "dcm_no_such_module" in out and f"{skip_policy.ESCAPE}=1" in out


def test_failures_keep_their_exit_code(tmp_path):
    rc, out = run_pytest(tmp_path, ["module_skip", "fails"])
    assert rc == 1 and "1 failed" in out, out


def test_allow_list_is_documented():
    readme = (TESTS.parent / "README.md").read_text(encoding="utf-8")
    for reason in skip_policy.ALLOWED_SKIPS:
        assert f"`{reason}`" in readme, reason


def test_the_suite_runs_under_the_policy():
    """tests/conftest.py carries the policy's hooks (so `python -m pytest -q`, CI's command, enforces it)."""
    import conftest

    for hook in ("pytest_collectreport", "pytest_runtest_logreport", "pytest_sessionfinish",
                 "pytest_terminal_summary"):
        assert getattr(conftest, hook, None) is getattr(skip_policy, hook), hook
