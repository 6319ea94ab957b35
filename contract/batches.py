"""Batch records in Redis: what the producer enqueued and what each task reported.

Any machine with the Redis URL can read a batch back (``producer status/report``); the key
layout is in ``contract.keys``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from config.expansion import ExpandResult
from config.jobs import BatchMeta, CleanupResult, SyncJob, SyncResult, TaskState
from contract import keys
from contract.redis_client import redis_client

# HSET unless the field already holds a successful result; a written result's task id goes on the
# batch's done list (KEYS[2]), which the live view reads from where it left off.
_KEEP_SUCCESS = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local st = cjson.decode(cur)['status']
  if st == 'synced' or st == 'up_to_date' then return 0 end
end
redis.call('RPUSH', KEYS[2], ARGV[1])
return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
"""


@dataclass(frozen=True)
class BatchSnapshot:
    meta: BatchMeta
    results: dict[str, SyncResult]
    progress: dict[str, int]
    states: dict[str, TaskState]
    cleanups: dict[str, CleanupResult]
    history: dict[str, SyncResult]
    expected: dict[str, int]
    added: dict[str, SyncJob] = field(default_factory=dict)
    expansions: dict[str, ExpandResult] = field(default_factory=dict)

    @property
    def jobs(self) -> list[tuple[str, SyncJob]]:
        """Every current sync task of the batch: the listed ones, then those expansions added, by line."""
        grown = sorted(self.added.items(), key=lambda kv: (kv[1].line, kv[1].source))
        return [*zip(self.meta.task_ids, self.meta.jobs, strict=True), *grown]

    @property
    def expanding(self) -> int:
        """Expansion tasks still to report."""
        return sum(e not in self.expansions for e in self.meta.expansion_ids)

    @property
    def done(self) -> bool:
        # By id, not by count: a stray duplicate under a foreign task id must not end the batch early.
        return self.expanding == 0 and all(t in self.results for t, _ in self.jobs)

    def done_among(self, task_ids: list[str]) -> bool:
        return all(t in self.results for t in task_ids)


@dataclass(frozen=True)
class Tally:
    """What the live view polls: results recorded; per unfinished task its state, and bytes
    moved and expected. Its size follows the tasks in flight, not the batch's."""

    results: int
    moved: dict[str, int]
    expected: dict[str, int]
    states: dict[str, TaskState]
    # Expansions reported and jobs they added: the batch grows while these change.
    expanded: int = 0
    added: int = 0
    # Length of the done list: results written so far (a replaced failure counts again).
    done: int = 0


class BatchStore:
    def __init__(self, client: redis.Redis[bytes], ttl: int) -> None:
        self.r = client
        self.ttl = ttl

    @classmethod
    def from_url(cls, url: str, ttl: int, *, ride_out: float = 0.0) -> BatchStore:
        """``ride_out``: seconds to keep retrying through a Redis outage (workers: a restart must
        not turn a finished copy into a lost outcome); 0 fails fast, as the producer wants."""
        return cls(redis_client(url, ride_out=ride_out), ttl)

    def close(self) -> None:
        self.r.close()

    def create(self, meta: BatchMeta) -> None:
        with self.r.pipeline() as p:
            p.set(keys.batch(meta.batch_id, "meta"), meta.model_dump_json(), ex=self.ttl)
            p.zadd(keys.BATCH_INDEX, {meta.batch_id: meta.created_at})
            p.execute()

    def start_round(self, meta: BatchMeta, replaced: list[SyncResult]) -> None:
        """Record a ``producer retry``: the new task ids in ``meta``, and the failed results they
        replace moved to the batch's history (so the live tally counts only current tasks)."""
        b = meta.batch_id
        old = [r.task_id for r in replaced]
        with self.r.pipeline() as p:
            p.set(keys.batch(b, "meta"), meta.model_dump_json(), ex=self.ttl)
            if old:
                p.hset(keys.batch(b, "history"), mapping={r.task_id: r.model_dump_json() for r in replaced})
                p.expire(keys.batch(b, "history"), self.ttl)
                for part in ("results", "progress", "expected", "state"):
                    p.hdel(keys.batch(b, part), *old)
            p.execute()

    def replace_added(self, batch_id: str, replaced: dict[str, tuple[str, SyncJob]]) -> None:
        """Old task id -> (new id, job) for expansion-added jobs ``producer retry`` sends again."""
        if not replaced:
            return
        key = keys.batch(batch_id, "added")
        with self.r.pipeline() as p:
            p.hdel(key, *replaced)
            p.hset(key, mapping={new: job.model_dump_json() for new, job in replaced.values()})
            p.expire(key, self.ttl)
            p.execute()

    def reset_expansions(self, batch_id: str, expansion_ids: list[str]) -> None:
        """Forget the outcomes of expansions about to run again (``producer retry``)."""
        if expansion_ids:
            with self.r.pipeline() as p:
                p.hdel(keys.batch(batch_id, "expanded"), *expansion_ids)
                p.hdel(keys.batch(batch_id, "state"), *expansion_ids)
                p.execute()

    def add_jobs(self, batch_id: str, jobs: list[tuple[str, SyncJob]]) -> list[tuple[str, SyncJob]]:
        """Add an expansion's jobs to the batch; returns those it should publish: new ones, and its
        own from an earlier delivery (which may have died before publishing). A task another line
        added first is that line's to publish."""
        if not jobs:
            return []
        key = keys.batch(batch_id, "added")
        with self.r.pipeline() as p:
            for task_id, job in jobs:
                p.hsetnx(key, task_id, job.model_dump_json())
            p.expire(key, self.ttl)
            fresh = p.execute()[:-1]
        taken = [tid for (tid, _), new in zip(jobs, fresh, strict=True) if not new]
        owners = dict(zip(taken, self.r.hmget(key, taken), strict=True)) if taken else {}
        return [(tid, job) for (tid, job), new in zip(jobs, fresh, strict=True)
                if new or _line_of(owners.get(tid)) == job.line]

    def record_expansion(self, result: ExpandResult) -> None:
        with self.r.pipeline() as p:
            p.hset(keys.batch(result.batch_id, "expanded"), result.task_id, result.model_dump_json())
            p.expire(keys.batch(result.batch_id, "expanded"), self.ttl)
            p.hdel(keys.batch(result.batch_id, "state"), result.task_id)
            p.execute()

    def meta(self, batch_id: str) -> BatchMeta | None:
        raw = self.r.get(keys.batch(batch_id, "meta"))
        return BatchMeta.model_validate_json(raw) if raw else None

    def record_result(self, result: SyncResult) -> None:
        """Record a task's outcome; a success already recorded for it stays (first success wins), so a
        second delivery of the task ("already up to date", or a late failure) cannot overwrite it."""
        b = result.batch_id
        with self.r.pipeline() as p:
            # Defaults left out: a third less Redis memory per image, read back the same.
            p.eval(_KEEP_SUCCESS, 2, keys.batch(b, "results"), keys.batch(b, "done"), result.task_id,
                   result.model_dump_json(exclude_defaults=True))
            # The result holds the bytes now: what the live view polls shrinks as tasks finish.
            p.hdel(keys.batch(b, "state"), result.task_id)
            p.hdel(keys.batch(b, "progress"), result.task_id)
            p.hdel(keys.batch(b, "expected"), result.task_id)
            for part in ("results", "done"):
                p.expire(keys.batch(b, part), self.ttl)
            p.execute()

    def record_state(self, batch_id: str, task_id: str, state: TaskState) -> None:
        with self.r.pipeline() as p:
            p.hset(keys.batch(batch_id, "state"), task_id, state.model_dump_json(exclude_defaults=True))
            p.expire(keys.batch(batch_id, "state"), self.ttl)
            p.execute()

    def set_progress(self, batch_id: str, task_id: str, nbytes: int, expected: int | None = None) -> None:
        parts = [("progress", nbytes)] + ([("expected", expected)] if expected is not None else [])
        with self.r.pipeline() as p:
            for part, value in parts:
                p.hset(keys.batch(batch_id, part), task_id, value)
                p.expire(keys.batch(batch_id, part), self.ttl)
            p.execute()

    def record_cleanup(self, batch_id: str, task_id: str, result: CleanupResult) -> None:
        with self.r.pipeline() as p:
            p.hset(keys.batch(batch_id, "cleanups"), task_id, result.model_dump_json())
            p.expire(keys.batch(batch_id, "cleanups"), self.ttl)
            p.execute()

    def snapshot(self, batch_id: str, meta: BatchMeta | None = None) -> BatchSnapshot | None:
        meta = meta or self.meta(batch_id)
        if meta is None:
            return None
        with self.r.pipeline() as p:
            for part in ("results", "progress", "state", "cleanups", "history", "expected", "added", "expanded"):
                p.hgetall(keys.batch(batch_id, part))
            results, progress, states, cleanups, history, expected, added, expanded = p.execute()
        return BatchSnapshot(
            meta=meta,
            results={k.decode(): SyncResult.model_validate_json(v) for k, v in results.items()},
            progress=_ints(progress),
            states={k.decode(): TaskState.model_validate_json(v) for k, v in states.items()},
            cleanups={k.decode(): CleanupResult.model_validate_json(v) for k, v in cleanups.items()},
            history={k.decode(): SyncResult.model_validate_json(v) for k, v in history.items()},
            expected=_ints(expected),
            added={k.decode(): SyncJob.model_validate_json(v) for k, v in added.items()},
            expansions={k.decode(): ExpandResult.model_validate_json(v) for k, v in expanded.items()},
        )

    def tally(self, batch_id: str) -> Tally:
        """Cheap enough to ask several times a second: no result is read or parsed."""
        with self.r.pipeline() as p:
            p.hlen(keys.batch(batch_id, "results"))
            p.hgetall(keys.batch(batch_id, "progress"))
            p.hgetall(keys.batch(batch_id, "expected"))
            p.hgetall(keys.batch(batch_id, "state"))
            p.hlen(keys.batch(batch_id, "expanded"))
            p.hlen(keys.batch(batch_id, "added"))
            p.llen(keys.batch(batch_id, "done"))
            count, moved, expected, states, expanded, added, done = p.execute()
        return Tally(int(count), _ints(moved), _ints(expected),
                     {k.decode(): TaskState.model_validate_json(v) for k, v in states.items()}, int(expanded),
                     int(added), int(done))

    def results_since(self, batch_id: str, offset: int) -> tuple[dict[str, SyncResult | None], int]:
        """Results written since position ``offset`` of the done list (None: replaced by a
        ``producer retry``), and the position to ask from next time: what arrived, not the batch."""
        ids = [t.decode() for t in self.r.lrange(keys.batch(batch_id, "done"), offset, -1)]
        if not ids:
            return {}, offset
        unique = list(dict.fromkeys(ids))
        raw = self.r.hmget(keys.batch(batch_id, "results"), unique)
        return ({t: SyncResult.model_validate_json(v) if v else None for t, v in zip(unique, raw, strict=True)},
                offset + len(ids))

    def recent(self, limit: int = 20) -> list[str]:
        return [b.decode() for b in self.r.zrevrange(keys.BATCH_INDEX, 0, limit - 1)]

    def created_since(self, since: float) -> list[str]:
        return [b.decode() for b in self.r.zrangebyscore(keys.BATCH_INDEX, since, "+inf")]

    def result_counts(self, batch_ids: list[str]) -> list[int]:
        """How many tasks of each batch have an outcome, in one round trip."""
        with self.r.pipeline() as p:
            for b in batch_ids:
                p.hlen(keys.batch(b, "results"))
            return [int(n) for n in p.execute()]


def _ints(raw: dict[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}


def _line_of(raw: bytes | None) -> int | None:
    return SyncJob.model_validate_json(raw).line if raw else None
