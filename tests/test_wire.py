"""The task messages and sent events ferry writes without Celery are the ones Celery and kombu write:
each side sends the same task into a real Redis, and the two are read back and compared field by
field (ids, clocks, times and the sender's name aside). That a worker runs them is what every
end-to-end suite does."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import redis
from celery import Celery
from pydantic import SecretStr

from config import describe
from config.jobs import SyncJob
from config.settings import FerrySettings
from contract.broker import SYNC_QUEUE, SYNC_TASK, celery_config
from contract.dispatch import publish, task_id_for
from contract.wire import TaskMessage, TaskPublisher
from tests.support.redis import RedisServer

# Another database than 0: the event channel is named after it.
DB = 3
JOB = SyncJob(batch_id="b1", source="src.example/team/app:v1", destinations=["dst.example/team/app:v1"],
              platforms=["linux/amd64"], engine="registry", line=4)


def _decode(raw: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(raw)
    assert doc["properties"]["body_encoding"] == "base64"
    doc["body"] = json.loads(base64.b64decode(doc["body"]))
    return doc


def _celery(url: str) -> Celery:
    app = Celery("ferry-wire-test")
    app.conf.update(celery_config(FerrySettings(broker_url=SecretStr(url))))
    return app


def _client(server: RedisServer) -> redis.Redis[bytes]:
    return redis.Redis.from_url(f"{server.url[:-2]}/{DB}", socket_timeout=5)


def test_a_task_message_is_the_one_celery_sends(redis_server: RedisServer) -> None:
    url = f"{redis_server.url[:-2]}/{DB}"
    task_id = task_id_for(JOB.batch_id, JOB)
    name, args = describe.sync_task_name(JOB.source), describe.sync_task_args(JOB)
    app = _celery(url)
    with app.producer_or_acquire() as producer:
        app.send_task(SYNC_TASK, args=[JOB.model_dump(mode="json")], task_id=task_id, queue=SYNC_QUEUE,
                      producer=producer, argsrepr=args, shadow=name, ignore_result=True)
    with _client(redis_server) as r:
        theirs = _decode(r.rpop(SYNC_QUEUE) or b"")
        publish(TaskPublisher(r), [(task_id, JOB)])
        ours = _decode(r.rpop(SYNC_QUEUE) or b"")
        assert r.llen(SYNC_QUEUE) == 0
    assert ours["body"] == theirs["body"]
    assert ours["body"][0] == [JOB.model_dump(mode="json")]
    for key in ("content-encoding", "content-type"):
        assert ours[key] == theirs[key]
    origin = ours["headers"].pop("origin")
    assert origin.startswith("gen") and "@" in origin
    theirs["headers"].pop("origin")
    assert ours["headers"] == theirs["headers"]
    assert ours["headers"]["id"] == task_id and ours["headers"]["shadow"] == name
    # Celery names its own reply queue (unused: results go to the backend) and copies argsrepr here.
    for key in ("delivery_tag", "reply_to", "argsrepr"):
        ours["properties"].pop(key, None)
        theirs["properties"].pop(key, None)
    assert ours["properties"] == theirs["properties"]


def test_the_sent_event_is_the_one_celery_publishes(redis_server: RedisServer) -> None:
    url = f"{redis_server.url[:-2]}/{DB}"
    task_id = task_id_for(JOB.batch_id, JOB)
    m = TaskMessage(SYNC_TASK, task_id, [JOB.model_dump(mode="json")], describe.sync_task_name(JOB.source),
                    describe.sync_task_args(JOB))
    fields = {"uuid": task_id, "root_id": task_id, "parent_id": None, "name": m.shadow, "args": m.argsrepr,
              "kwargs": "{}", "retries": 0, "eta": None, "expires": None, "queue": SYNC_QUEUE, "exchange": "",
              "routing_key": SYNC_QUEUE}
    with _client(redis_server) as r, r.pubsub() as sub:
        sub.psubscribe("*")
        assert sub.get_message(timeout=5) is not None  # the subscription's confirmation
        app = _celery(url)
        with app.producer_or_acquire() as producer:
            app.events.Dispatcher(producer.connection, enabled=False).publish("task-sent", fields, producer)
        TaskPublisher(r).send([m], SYNC_QUEUE)
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            msg = sub.get_message(timeout=1)
            if msg is not None and msg["type"] == "pmessage":
                got.append({"channel": msg["channel"], **_decode(msg["data"])})
    assert len(got) == 2, got
    theirs, ours = got
    assert ours["channel"] == theirs["channel"] == f"/{DB}.celeryev/task.sent".encode()
    for doc in (ours, theirs):
        body = doc["body"]
        assert isinstance(body["timestamp"], float) and isinstance(body["clock"], int)
        for key in ("hostname", "pid", "clock", "timestamp"):
            body.pop(key)
        doc["headers"].pop("hostname")
        doc["properties"].pop("delivery_tag")
    assert ours == theirs
    assert ours["body"]["type"] == "task-sent" and ours["body"]["name"] == m.shadow
