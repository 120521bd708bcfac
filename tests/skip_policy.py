"""The suite's skip policy: a test may skip only for a reason on the allow-list below.

``bash scripts/setup.sh`` installs everything the suite needs (and checks that it
imports), and CI fetches the real pair before the tests, so on a machine set up
that way a skipped test means something is missing: a module whose tests all
skip (no triton: every runtime test) would otherwise pass CI unseen.  Any skip
whose reason does not start with an allowed prefix makes the run fail (exit 1),
listing the test and its reason; the other outcomes are unchanged.

Set ``DCM_ALLOW_SKIPS=1`` to turn the failure into a warning (a partial
environment on purpose, e.g. a machine without the real pair); CI never sets it.
The hooks are imported by ``tests/conftest.py``; ``tests/test_skip_policy.py``
checks them.
"""

from __future__ import annotations

import os

import pytest

# Reason prefix -> why such a skip is fine on a CI machine (2 cores, no GPU).  Keep it short:
# every entry is a test that never runs in CI.  README "Tests" lists the same entries.
ALLOWED_SKIPS = {
    "needs CUDA": "GPU-only checks; CI machines have no GPU (the kernels run under TRITON_INTERPRET=1 there)",
}
ESCAPE = "DCM_ALLOW_SKIPS"

_skipped: list[tuple[str, str]] = []  # (test or module id, reason)


def skip_reason(report) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def allowed(reason: str) -> bool:
    return reason.startswith(tuple(ALLOWED_SKIPS))


def pytest_collectreport(report):
    if report.skipped:  # a whole module: pytest.importorskip or pytest.skip(allow_module_level=True)
        _skipped.append((report.nodeid or str(report.fspath), skip_reason(report)))


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append((report.nodeid, skip_reason(report)))


def unexpected_skips() -> list[tuple[str, str]]:
    return [(what, reason) for what, reason in _skipped if not allowed(reason)]


def pytest_sessionfinish(session, exitstatus):
    if unexpected_skips() and os.environ.get(ESCAPE) != "1" \
            and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    bad = unexpected_skips()
    if not bad:
        return
    escaped = os.environ.get(ESCAPE) == "1"
    terminalreporter.section("skips not on the allow-list (tests/skip_policy.py)", red=not escaped,
                             yellow=escaped)
    for what, reason in bad:
        terminalreporter.line(f"{what}: {reason}")
    allow = ", ".join(repr(p) for p in ALLOWED_SKIPS)
    if escaped:
        terminalreporter.line(f"{ESCAPE}=1: reported, not failed (allowed reasons: {allow})")
    else:
        terminalreporter.line(f"FAILED: {len(bad)} skip(s) for reasons other than {allow}; run "
                              f"`bash scripts/setup.sh` (and `python scripts/fetch_real_pair.py`), or set "
                              f"{ESCAPE}=1 on a partial environment")
