"""No silent skips: the pytest hooks behind it (a plugin of its own, so a test can load it alone).

A suite that cannot get its component (dockerd not startable, not root, a binary missing) skips on a
developer's machine, loudly; under CI=true it fails with the reason, so CI never passes by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    text = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"CI=true: this suite could not run, and CI must not pass by skipping it: " \
                          f"{_skip_reason(report)}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons = sorted({_skip_reason(r) for r in skipped})
    terminalreporter.section("components missing", sep="!", red=True, bold=True)
    terminalreporter.write_line(f"{len(skipped)} test(s) SKIPPED because they could not get a component "
                                "(under CI=true these fail):", red=True, bold=True)
    for reason in reasons:
        terminalreporter.write_line(f"  - {reason}", red=True)
