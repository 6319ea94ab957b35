"""Batch records in Redis: what the producer enqueued and what each task reported.

Any machine with the Redis URL can read a batch back (``producer status/report``).
Keys (all expire after the result TTL):
  ferry:batch:<id>:meta      BatchMeta JSON
  ferry:batch:<id>:results   hash task_id -> SyncResult JSON (final outcome only)
  ferry:batch:<id>:history   hash task_id -> SyncResult JSON of a failed task ``producer retry`` replaced
  ferry:batch:<id>:progress  hash task_id -> bytes moved so far
  ferry:batch:<id>:expected  hash task_id -> bytes the task will move in all, once its manifests are known
  ferry:batch:<id>:state     hash task_id -> TaskState JSON (running, or waiting to retry) until the result
  ferry:batch:<id>:cleanups  hash cleanup task_id -> CleanupResult JSON
  ferry:batches              sorted set of batch ids by creation time
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from config.jobs import BatchMeta, CleanupResult, SyncResult, TaskState

PREFIX = "ferry:batch:"
INDEX = "ferry:batches"


# HSET unless the field already holds a successful result.
_KEEP_SUCCESS = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local st = cjson.decode(cur)['status']
  if st == 'synced' or st == 'up_to_date' then return 0 end
end
return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
"""


def _key(batch_id: str, part: str) -> str:
    return f"{PREFIX}{batch_id}:{part}"


@dataclass(frozen=True)
class BatchSnapshot:
    meta: BatchMeta
    results: dict[str, SyncResult]
    progress: dict[str, int]
    states: dict[str, TaskState]
    cleanups: dict[str, CleanupResult]
    history: dict[str, SyncResult]
    expected: dict[str, int]

    @property
    def done(self) -> bool:
        # By id, not by count: a stray duplicate under a foreign task id must not end the batch early.
        return all(t in self.results for t in self.meta.task_ids)

    def done_among(self, task_ids: list[str]) -> bool:
        return all(t in self.results for t in task_ids)


@dataclass(frozen=True)
class Tally:
    """What the live view polls: results recorded; per unfinished task its state, and bytes
    moved and expected."""

    results: int
    moved: dict[str, int]
    expected: dict[str, int]
    states: dict[str, TaskState]


class BatchStore:
    def __init__(self, client: redis.Redis[bytes], ttl: int) -> None:
        self.r = client
        self.ttl = ttl

    @classmethod
    def from_url(cls, url: str, ttl: int, *, ride_out: float = 0.0) -> BatchStore:
        """``ride_out``: seconds to keep retrying through a Redis outage (workers: a restart must
        not turn a finished copy into a lost outcome); 0 fails fast, as the producer wants."""
        if ride_out <= 0:
            return cls(redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10,
                                            health_check_interval=10, retry_on_timeout=True), ttl)
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.2), retries=int(ride_out / 2) + 4)
        return cls(redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10,
                                        health_check_interval=10, retry=retry,
                                        retry_on_error=[RedisConnectionError, RedisTimeoutError]), ttl)

    def close(self) -> None:
        self.r.close()

    def create(self, meta: BatchMeta) -> None:
        with self.r.pipeline() as p:
            p.set(_key(meta.batch_id, "meta"), meta.model_dump_json(), ex=self.ttl)
            p.zadd(INDEX, {meta.batch_id: meta.created_at})
            p.execute()

    def start_round(self, meta: BatchMeta, replaced: list[SyncResult]) -> None:
        """Record a ``producer retry``: the new task ids in ``meta``, and the failed results they
        replace moved to the batch's history (so the live tally counts only current tasks)."""
        b = meta.batch_id
        old = [r.task_id for r in replaced]
        with self.r.pipeline() as p:
            p.set(_key(b, "meta"), meta.model_dump_json(), ex=self.ttl)
            if old:
                p.hset(_key(b, "history"), mapping={r.task_id: r.model_dump_json() for r in replaced})
                p.expire(_key(b, "history"), self.ttl)
                for part in ("results", "progress", "expected", "state"):
                    p.hdel(_key(b, part), *old)
            p.execute()

    def meta(self, batch_id: str) -> BatchMeta | None:
        raw = self.r.get(_key(batch_id, "meta"))
        return BatchMeta.model_validate_json(raw) if raw else None

    def record_result(self, result: SyncResult) -> None:
        """Record a task's outcome; a success already recorded for it stays (first success wins), so a
        second delivery of the task ("already up to date", or a late failure) cannot overwrite it."""
        b = result.batch_id
        with self.r.pipeline() as p:
            p.eval(_KEEP_SUCCESS, 1, _key(b, "results"), result.task_id, result.model_dump_json())
            p.hdel(_key(b, "state"), result.task_id)
            for part in ("results", "progress", "state"):
                p.expire(_key(b, part), self.ttl)
            p.execute()

    def record_state(self, batch_id: str, task_id: str, state: TaskState) -> None:
        with self.r.pipeline() as p:
            p.hset(_key(batch_id, "state"), task_id, state.model_dump_json(exclude_defaults=True))
            p.expire(_key(batch_id, "state"), self.ttl)
            p.execute()

    def set_progress(self, batch_id: str, task_id: str, nbytes: int, expected: int | None = None) -> None:
        parts = [("progress", nbytes)] + ([("expected", expected)] if expected is not None else [])
        with self.r.pipeline() as p:
            for part, value in parts:
                p.hset(_key(batch_id, part), task_id, value)
                p.expire(_key(batch_id, part), self.ttl)
            p.execute()

    def record_cleanup(self, batch_id: str, task_id: str, result: CleanupResult) -> None:
        with self.r.pipeline() as p:
            p.hset(_key(batch_id, "cleanups"), task_id, result.model_dump_json())
            p.expire(_key(batch_id, "cleanups"), self.ttl)
            p.execute()

    def snapshot(self, batch_id: str, meta: BatchMeta | None = None) -> BatchSnapshot | None:
        meta = meta or self.meta(batch_id)
        if meta is None:
            return None
        with self.r.pipeline() as p:
            for part in ("results", "progress", "state", "cleanups", "history", "expected"):
                p.hgetall(_key(batch_id, part))
            results, progress, states, cleanups, history, expected = p.execute()
        return BatchSnapshot(
            meta=meta,
            results={k.decode(): SyncResult.model_validate_json(v) for k, v in results.items()},
            progress=_ints(progress),
            states={k.decode(): TaskState.model_validate_json(v) for k, v in states.items()},
            cleanups={k.decode(): CleanupResult.model_validate_json(v) for k, v in cleanups.items()},
            history={k.decode(): SyncResult.model_validate_json(v) for k, v in history.items()},
            expected=_ints(expected),
        )

    def tally(self, batch_id: str) -> Tally:
        """Cheap enough to ask several times a second: no result is read or parsed."""
        with self.r.pipeline() as p:
            p.hlen(_key(batch_id, "results"))
            p.hgetall(_key(batch_id, "progress"))
            p.hgetall(_key(batch_id, "expected"))
            p.hgetall(_key(batch_id, "state"))
            count, moved, expected, states = p.execute()
        return Tally(int(count), _ints(moved), _ints(expected),
                     {k.decode(): TaskState.model_validate_json(v) for k, v in states.items()})

    def recent(self, limit: int = 20) -> list[str]:
        return [b.decode() for b in self.r.zrevrange(INDEX, 0, limit - 1)]


def _ints(raw: dict[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}
