"""Shared fixtures: real registries, generated images; under CI=true a skip is a failure."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Fixtures that live beside the service they start.
from tests.support.deploy_image import deploy_dockerd, ferry_images  # noqa: F401
from tests.support.dockerd import dockerd  # noqa: F401
from tests.support.faultproxy import make_fault_proxy  # noqa: F401
from tests.support.images import Pusher
from tests.support.redis import redis_server, redis_session  # noqa: F401
from tests.support.registry import Registry
from tests.support.skips import pytest_runtest_makereport, pytest_terminal_summary  # noqa: F401  (hooks)


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
