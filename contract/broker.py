"""How producer and workers meet on the broker: queue and task names, and the Celery settings both
sides load (serializers must match on both ends). Plain data: each side builds its own Celery app.

kombu keeps each queue as a Redis list named after it.
"""

from __future__ import annotations

from typing import Any

from config.settings import FerrySettings

SYNC_QUEUE = "ferry"
SYNC_TASK = "ferry.sync_image"
CLEANUP_TASK = "ferry.cleanup"
# A selector line: list a repository's tags and add one sync task per selected tag to the batch.
EXPAND_TASK = "ferry.expand_repository"
# Runs of schedules, sent by beat; every worker consumes this queue beside the shared one.
SCHEDULE_QUEUE = "ferry.schedules"
SCHEDULE_TASK = "ferry.schedule"


def node_queue(node: str) -> str:
    """The queue only the worker(s) of one node consume: chained cleanups land here."""
    return f"{SYNC_QUEUE}.node.{node}"


def celery_config(settings: FerrySettings) -> dict[str, Any]:
    if settings.broker_url is None:
        raise ValueError("FERRY_BROKER_URL is not set")
    broker = settings.broker_url.get_secret_value()
    backend = settings.result_url.get_secret_value() if settings.result_url else broker
    return {
        "broker_url": broker,
        "result_backend": backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.result_ttl,
        "result_extended": True,
        # Long jobs: ack after the work, one message at a time, redeliver if a worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            # kombu sweeps for abandoned (unacked) messages every interval x throttle seconds
            # (default 10 x 10); sweep every interval so a dead worker's task comes back soon after
            # the visibility timeout instead of up to 100 s later. One cheap ZRANGE per sweep.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 5)),
            "unacked_restore_throttle": 1,
            "socket_keepalive": True,
            "retry_on_timeout": True,
            "health_check_interval": 10,
        },
        # Ride out a Redis restart when storing a task's state or result, rather than failing the task
        # (whose message would then be acknowledged and lost): every backend operation retries, with
        # backoff capped at 10 s, for about a minute.
        "result_backend_transport_options": {"retry_policy": {"timeout": 60.0}, "health_check_interval": 10},
        "result_backend_always_retry": True,
        "result_backend_max_retries": 15,
        "redis_backend_health_check_interval": 10,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_default_queue": SYNC_QUEUE,
        "task_create_missing_queues": True,
        "task_track_started": True,
        # Off: Celery's sent event names the registered task, not what Flower should show (see
        # producer.enqueue.publish, which sends its own). Tasks a worker sends show once received.
        "task_send_sent_event": False,
        # Off until a monitor asks: Flower turns them on when it starts and every 5 s after (Celery's
        # enable_events control command), so a cluster nobody watches spends nothing on them.
        "worker_send_task_events": False,
        "worker_hijack_root_logger": False,
        "broker_heartbeat": 0,
    }
