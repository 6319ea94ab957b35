"""The error hierarchy against a real registry's answers, and the retry policy's timing."""

from __future__ import annotations

import email.utils
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.registry import Registry
from workers.engine.errors import (
    DigestMismatch,
    NotFound,
    RateLimited,
    RegistryError,
    ServerError,
    TransportError,
    Unauthorized,
    error_from_response,
    parse_retry_after,
)
from workers.engine.lanes import Lane
from workers.engine.retry import RetryPolicy, watching


def test_registry_answers_become_typed_actionable_errors(src: Registry) -> None:
    with httpx.Client(base_url=src.url) as c:
        r = c.get("/v2/library/nginx/manifests/1.99")
        err = error_from_response(r, reference="docker.io/library/nginx:1.99")
        assert isinstance(err, NotFound)
        assert err.status == 404 and err.codes == ["MANIFEST_UNKNOWN"] and not err.temporary
        assert str(err) == "docker.io/library/nginx:1.99: manifest unknown"
        assert err.url is not None and err.url.endswith("/v2/library/nginx/manifests/1.99")

        # Committing an upload under a digest its bytes do not have is refused as a mismatch.
        loc = c.post("/v2/x/blobs/uploads/").headers["Location"]
        bad = "sha256:" + "0" * 64
        r = c.put(httpx.URL(loc).copy_merge_params({"digest": bad}), content=b"hello")
        err = error_from_response(r)
        assert isinstance(err, DigestMismatch) and "DIGEST_INVALID" in err.codes and not err.temporary


def test_status_codes_without_json_bodies() -> None:
    req = httpx.Request("GET", "https://r.example/v2/a/manifests/b?_state=secret")
    err = error_from_response(httpx.Response(503, request=req, text="<html>busy</html>"))
    assert isinstance(err, ServerError) and err.temporary and err.code == "ServerError"
    assert err.url == "https://r.example/v2/a/manifests/b"  # upload state tokens never kept
    err = error_from_response(httpx.Response(401, request=req))
    assert isinstance(err, Unauthorized) and not err.temporary
    assert not error_from_response(httpx.Response(501, request=req)).temporary
    rl = error_from_response(httpx.Response(429, request=req, headers={"Retry-After": "7"},
                             json={"errors": [{"code": "TOOMANYREQUESTS", "message": "Slow down"}]}))
    assert isinstance(rl, RateLimited) and rl.retry_after == 7 and rl.temporary
    assert rl.message == "slow down"


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = time.time()
    assert parse_retry_after("12") == 12
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_retry_policy_retries_only_temporary_errors() -> None:
    slept: list[float] = []
    policy = RetryPolicy(attempts=4, base_delay=1, max_delay=3, sleep=slept.append, rand=lambda: 1.0)
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise TransportError("connection reset")
        return "ok"

    assert policy.call(flaky) == "ok"
    assert slept == [1, 2, 3]  # exponential, capped at max_delay

    def missing() -> None:
        raise NotFound("gone")

    slept.clear()
    with pytest.raises(NotFound):
        policy.call(missing)
    assert slept == []

    def always() -> None:
        raise ServerError("down")

    with pytest.raises(ServerError):
        policy.call(always)
    assert len(slept) == 3  # four attempts in all

    # Retry-After wins over backoff, but is capped.
    assert policy.delay(1, RateLimited("x", retry_after=45)) == 45
    assert policy.delay(1, RateLimited("x", retry_after=600)) == 60
    jittered = RetryPolicy(base_delay=1, max_delay=8)
    assert all(0 <= jittered.delay(4) <= 8 for _ in range(50))
    assert RegistryError("x", reference="a/b:c").with_reference("z").reference == "a/b:c"


class _Heard:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int]] = []

    def retrying(self, what: str, failure: int, attempts: int, pause: float, error: RegistryError) -> None:
        self.events.append(("retrying", what, failure))

    def recovered(self, what: str) -> None:
        self.events.append(("recovered", what, 0))


def test_a_watch_hears_the_retries_of_its_copy_even_from_the_engines_pool() -> None:
    policy = RetryPolicy(attempts=3, base_delay=0, max_delay=0)
    failures = {"a": 1, "b": 0}

    def request(name: str) -> str:
        if failures[name]:
            failures[name] -= 1
            raise TransportError("connection reset")
        return name

    heard, elsewhere = _Heard(), _Heard()
    with ThreadPoolExecutor(max_workers=2) as threads:
        pool = Lane(threads, 2)  # how the engine hands a copy's requests to its pool
        with watching(heard):
            assert pool.submit(policy.call, lambda: request("a"), what="GET a").result() == "a"
            assert policy.call(lambda: request("b"), what="GET b") == "b"  # no retry: nothing to hear
        failures["a"] = 1
        with watching(elsewhere):
            pool.submit(policy.call, lambda: request("a"), what="GET a").result()
        failures["a"] = 1
        pool.submit(policy.call, lambda: request("a"), what="GET a").result()  # watched by no one
    assert heard.events == [("retrying", "GET a", 1), ("recovered", "GET a", 0)]
    assert elsewhere.events == heard.events
