"""``python -m workers``: start a worker, Flower, beat, a one-off cleanup, or a health probe on this node."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Any

import redis
from pydantic import ValidationError

from config.reference import host_is_loopback
from config.schedules import Schedule
from config.settings import FerrySettings, describe_validation_error
from contract.broker import SCHEDULE_QUEUE, SYNC_QUEUE, node_queue
from workers import runtime
from workers.app import configure
from workers.beat import ScheduleError, load_schedules, run_beat
from workers.broker_clients import reuse_channel_clients
from workers.engine.keychain import docker_config_file
from workers.metrics import Recorder
from workers.presence import ONLINE_WINDOW, Presence, make_presence_step
from workers.upkeep import make_upkeep_step

USAGE_ERROR = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Flower's task list: what ran (name, args), how it ended (result or exception), where and when.
FLOWER_COLUMNS = "name,state,args,result,exception,retries,received,runtime,worker,uuid"


def _fail(msg: str) -> int:
    print(f"ferry workers: error: {msg}", file=sys.stderr)
    return USAGE_ERROR


def load_settings(overrides: dict[str, Any]) -> FerrySettings:
    return FerrySettings(**{k: v for k, v in overrides.items() if v is not None})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workers", description="Run a ferry worker on this machine.")
    p.add_argument("--node", help="this node's name (default: FERRY_NODE or the host name)")
    p.add_argument("--concurrency", type=int, help="images copied at once by this worker (FERRY_CONCURRENCY)")
    p.add_argument("--autoscale", help="MAX,MIN pool processes scaled by load (FERRY_AUTOSCALE); "
                   "replaces --concurrency")
    p.add_argument("--pool", choices=["prefork", "threads"],
                   help="prefork: a process per image in flight; threads: --concurrency images in one "
                   "process (FERRY_POOL, default prefork)")
    p.add_argument("--engine", help="default engine for this node's cleanup: registry or docker")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (FERRY_METRICS_PORT)")
    p.add_argument("--loglevel", default=os.environ.get("FERRY_LOGLEVEL", "INFO"))
    sub = p.add_subparsers(dest="command")
    sub.add_parser("worker", help="run a worker (the default)")
    fl = sub.add_parser("flower", help="run Flower on the same broker")
    fl.add_argument("--address", default="127.0.0.1")
    fl.add_argument("--port", type=int, default=5555)
    fl.add_argument("--basic-auth", default=os.environ.get("FERRY_FLOWER_BASIC_AUTH"),
                    help="user:password (required unless Flower listens on loopback)")
    sub.add_parser("cleanup", help="apply this node's disk policy once and print what was freed")
    sub.add_parser("beat", help="run the schedules of FERRY_SCHEDULES and FERRY_SCHEDULE_FILE "
                   "(several beats may run: each run fires once)")
    hc = sub.add_parser("health", help="exit 0 when the broker answers (container and pod probes)")
    hc.add_argument("--worker", action="store_true",
                    help="also require a worker of this node (FERRY_NODE) to have reported in recently")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.concurrency is not None and args.concurrency < 1:
        return _fail(f"--concurrency must be a positive number, got {args.concurrency}")
    if args.loglevel.upper() not in LOG_LEVELS:
        return _fail(f"--loglevel (FERRY_LOGLEVEL) must be one of {', '.join(LOG_LEVELS)}, got {args.loglevel!r}")
    try:
        settings = load_settings({"node": args.node, "concurrency": args.concurrency, "engine": args.engine,
                                  "autoscale": args.autoscale, "metrics_port": args.metrics_port,
                                  "pool": args.pool})
    except ValidationError as e:
        return _fail(describe_validation_error(e))
    try:
        docker_config_file(settings.docker_config)
        # Every CA bundle and client certificate read now: a bad path is input, not a failed image.
        runtime.tls_policy(settings).check()
    except ValueError as e:
        return _fail(str(e))
    if args.command == "cleanup":
        runtime.configure(settings)
        print(runtime.run_cleanup(settings.engine, [], None).model_dump_json(indent=2))
        return 0
    if settings.broker_url is None:
        return _fail("FERRY_BROKER_URL is not set (e.g. redis://:password@redis-host:6379/0)")
    if args.command == "health":
        return _health(settings.broker_url.get_secret_value(), settings.node if args.worker else None)
    if settings.autoscale and settings.pool != "prefork":
        return _fail("--autoscale (FERRY_AUTOSCALE) scales pool processes: it needs --pool prefork")
    schedules: list[Schedule] = []
    if args.command == "beat":
        try:
            schedules = load_schedules(settings)
        except ScheduleError as e:
            return _fail(str(e))
        if not schedules:
            return _fail("no schedules: set FERRY_SCHEDULES (JSON) or FERRY_SCHEDULE_FILE (TOML)")
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.loglevel.upper() != "DEBUG":
        # httpx logs every request at INFO: thousands of lines that bury the outcomes.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    app = configure(settings)
    if args.command == "flower":
        return _flower(app, args)
    if args.command == "beat":
        run_beat(app, schedules, settings, args.loglevel.upper())
        return 0
    _keep_tasks_through_reconnects()
    reuse_channel_clients()
    recorder: Recorder | None = None
    if settings.metrics_port is not None:
        from workers.metrics import endpoint  # imports prometheus_client: only when metrics are on

        try:
            recorder = endpoint.start(settings)
        except OSError as e:
            return _fail(f"cannot serve metrics on {settings.metrics_address}:{settings.metrics_port} "
                         f"(FERRY_METRICS_PORT): {e.strerror or e}")
    runtime.configure(settings, recorder)
    app.steps["consumer"].add(make_upkeep_step(runtime.upkeep_config(settings)))
    app.steps["consumer"].add(make_presence_step(settings.broker_url.get_secret_value()))
    runtime.preload()
    pool = ["--autoscale", settings.autoscale] if settings.autoscale else \
        ["--concurrency", str(settings.concurrency)]
    app.worker_main([
        "worker",
        "--hostname", f"{settings.node}@%h",
        "--pool", settings.pool, *pool,
        "--queues", f"{SYNC_QUEUE},{node_queue(settings.node)},{SCHEDULE_QUEUE}",
        "--loglevel", args.loglevel.upper(),
        "--without-gossip", "--without-mingle",
    ])
    return 0


def _health(broker_url: str, node: str | None) -> int:
    """0 when the broker answers a PING and, for ``node``, one of its workers reported in within
    the presence window (a worker whose event loop hangs stops reporting); 1 otherwise, with why."""
    presence = Presence.from_url(broker_url)
    try:
        presence.client.ping()
        if node is not None and node not in presence.online_nodes():
            print(f"ferry health: no worker of node {node!r} reported in within {ONLINE_WINDOW:.0f} s",
                  file=sys.stderr)
            return 1
    except redis.RedisError as e:
        # The error names host and port, never the password.
        print(f"ferry health: broker unreachable: {e}", file=sys.stderr)
        return 1
    finally:
        presence.close()
    print("ok")
    return 0


def _keep_tasks_through_reconnects() -> None:
    """Celery warns on every broker reconnect that it will start cancelling running tasks in 6.0.
    ferry sets worker_cancel_long_running_tasks_on_connection_loss=False on purpose: a copy in
    flight finishes and its outcome write rides out the outage, where a cancelled one would wait
    for the visibility timeout (hours) to run again. The choice is explicit, so the notice is noise.

    Celery's logging setup turns every CPendingDeprecationWarning on ("always"), so the filter
    goes in after it, once the worker is set up."""
    from celery.exceptions import CPendingDeprecationWarning
    from celery.signals import celeryd_after_setup

    def ignore_notice(**_: object) -> None:
        warnings.filterwarnings("ignore", category=CPendingDeprecationWarning,
                                message=r"\s*In Celery 5\.1 we introduced an optional breaking change")

    celeryd_after_setup.connect(ignore_notice, weak=False)


def _flower(app: Any, args: argparse.Namespace) -> int:
    if not host_is_loopback(args.address) and not args.basic_auth:
        return _fail("Flower on a non-loopback address needs --basic-auth user:password (FERRY_FLOWER_BASIC_AUTH)")
    argv = ["flower", f"--address={args.address}", f"--port={args.port}", f"--tasks_columns={FLOWER_COLUMNS}"]
    if args.basic_auth:
        argv.append(f"--basic-auth={args.basic_auth}")
    # Workers send task events only while watched. Flower asks every 5 s, first 5 s after it starts:
    # ask now, so the tasks of its first seconds show too.
    app.control.enable_events()
    app.start(argv)
    return 0
