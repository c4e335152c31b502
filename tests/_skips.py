"""A pytest hook for continuous integration: under ``CI=true`` a test may skip only for want of
CUDA (a ``cuda``-marked test, or a reason naming CUDA or a GPU). Any other skip (a missing
folder, program or library) is turned into a failure, so that a clean clone is seen to run
every test but the CUDA ones.

Kept free of torch so that a plain pytest run can load it as a plugin (``-p _skips``)."""

from __future__ import annotations

import os
import re

import pytest

CUDA_WORDS = re.compile(r"\bCUDA\b|\bGPU\b", re.IGNORECASE)


def skip_reason(report: pytest.TestReport) -> str:
    """The reason pytest recorded for a skipped report."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def is_cuda_skip(item: pytest.Item, reason: str) -> bool:
    return item.get_closest_marker("cuda") is not None or bool(CUDA_WORDS.search(reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        if not is_cuda_skip(item, reason):
            report.outcome = "failed"
            report.longrepr = f"CI=true: only CUDA tests may skip, but this one skipped: {reason}"
