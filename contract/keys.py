"""Every Redis key ferry writes, in one place (Celery's and kombu's own keys aside).

Batches (producer and tasks; all expire after the result TTL):
  ferry:batch:<id>:meta       BatchMeta JSON
  ferry:batch:<id>:results    hash task_id -> SyncResult JSON (final outcome only)
  ferry:batch:<id>:done       list of task ids in the order their results were written (the live view's cursor)
  ferry:batch:<id>:history    hash task_id -> SyncResult JSON of a failed task ``producer retry`` replaced
  ferry:batch:<id>:added      hash task_id -> SyncJob JSON (jobs expansion tasks added)
  ferry:batch:<id>:expanded   hash expansion task_id -> ExpandResult JSON
  ferry:batch:<id>:progress   hash task_id -> bytes moved so far, until the result
  ferry:batch:<id>:expected   hash task_id -> bytes the task will move in all, once its manifests are known,
                              until the result
  ferry:batch:<id>:state      hash task_id -> TaskState JSON (running, or waiting to retry) until the result
  ferry:batch:<id>:cleanups   hash cleanup task_id -> CleanupResult JSON
  ferry:batches               sorted set of batch ids by creation time

Workers and their metrics:
  ferry:workers               sorted set worker (node@host) -> when it last reported in
  ferry:metrics:cluster       which worker's endpoint exports the cluster gauges (a short lease)

Schedules (beat and workers; see workers/beat.py and workers/schedules.py):
  ferry:schedule:<name>                  hash: run, sent, claimed_at (beat); batch, fired_at, fired,
                                         skipped, skipped_at, error (workers)
  ferry:schedule:<name>:run:<run time>   the task id that fired that run (expires with batches)
  ferry:schedule:<name>:history          the latest runs, newest first: "<run time> fired <batch>",
                                         "<run time> skipped (<batch> still running)" or "<run time> invalid: …"

Cluster coordination (workers) lives under ``ferry:coord:``.
"""

from __future__ import annotations

PREFIX = "ferry"
BATCH_PREFIX = f"{PREFIX}:batch"
BATCH_INDEX = f"{PREFIX}:batches"
COORD_PREFIX = f"{PREFIX}:coord"
WORKERS = f"{PREFIX}:workers"
METRICS_LEASE = f"{PREFIX}:metrics:cluster"
SCHEDULE_PREFIX = f"{PREFIX}:schedule"


def batch(batch_id: str, part: str) -> str:
    return f"{BATCH_PREFIX}:{batch_id}:{part}"


# -- schedules


def schedule(name: str) -> str:
    return f"{SCHEDULE_PREFIX}:{name}"


def schedule_run(name: str, run_at: float) -> str:
    return f"{SCHEDULE_PREFIX}:{name}:run:{run_at:.0f}"


def schedule_history(name: str) -> str:
    return f"{SCHEDULE_PREFIX}:{name}:history"


# -- coordination


def ledger(registry: str, digest: str) -> str:
    """Sorted set: repository -> when it was last seen holding ``digest`` (ms)."""
    return f"{COORD_PREFIX}:ledger:{registry}:{digest}"


def blob_lease(registry: str, digest: str) -> str:
    return f"{COORD_PREFIX}:lease:blob:{registry}:{digest}"


def manifest_lease(registry: str, repository: str, reference: str) -> str:
    return f"{COORD_PREFIX}:lease:manifest:{registry}/{repository}:{reference}"


def done(lease_key: str) -> str:
    """Set when the holder of ``lease_key`` finished successfully; waiters then skip the work."""
    return f"{lease_key}:done"


def bucket(registry: str) -> str:
    """Hash: the request token bucket of a registry (tokens, last refill in ms)."""
    return f"{COORD_PREFIX}:bucket:{registry}"


def slots(registry: str) -> str:
    """Sorted set: request slot id -> expiry (ms) — requests in flight to a registry."""
    return f"{COORD_PREFIX}:slots:{registry}"


def pause(registry: str, credential: int) -> str:
    """Epoch ms until which no request may go to ``registry`` with that credential."""
    return f"{COORD_PREFIX}:pause:{registry}:{credential}"


def credential(registry: str) -> str:
    """Index of the credential every worker uses for ``registry`` right now."""
    return f"{COORD_PREFIX}:credential:{registry}"
