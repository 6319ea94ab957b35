"""Shared fixtures: real registries, generated images; under CI=true a skip is a failure."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

# Fixtures that live beside the service they start.
from tests.support.dockerd import dockerd  # noqa: F401
from tests.support.faultproxy import make_fault_proxy  # noqa: F401
from tests.support.images import Pusher
from tests.support.redis import redis_server, redis_session  # noqa: F401
from tests.support.registry import Registry


@pytest.fixture
def make_registry(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    started: list[Registry] = []

    def make(name: str = "reg", **kw: object) -> Registry:
        reg = Registry(root=tmp_path / f"{name}-{len(started)}", **kw)  # type: ignore[arg-type]
        started.append(reg.start())
        return reg

    yield make
    for reg in started:
        reg.stop()


@pytest.fixture
def src(make_registry: Callable[..., Registry]) -> Registry:
    return make_registry("src")


@pytest.fixture
def dst(make_registry: Callable[..., Registry]) -> Registry:
    return make_registry("dst")


@pytest.fixture
def src_pusher(src: Registry) -> Iterator[Pusher]:
    p = Pusher(src.url)
    yield p
    p.client.close()



# A suite that cannot get its component (dockerd not startable, not root, a binary missing) skips on a
# developer's machine, loudly; under CI=true it fails with the reason, so CI never passes by skipping.
IN_CI = os.environ.get("CI", "").lower() == "true"


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"CI=true: this suite could not run, and CI must not pass by skipping it: " \
                          f"{_skip_reason(report).removeprefix('Skipped: ')}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons = sorted({_skip_reason(r).removeprefix("Skipped: ") for r in skipped})
    terminalreporter.section("components missing", sep="!", red=True, bold=True)
    terminalreporter.write_line(f"{len(skipped)} test(s) SKIPPED because they could not get a component "
                                "(under CI=true these fail):", red=True, bold=True)
    for reason in reasons:
        terminalreporter.write_line(f"  - {reason}", red=True)
