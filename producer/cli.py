"""``python -m producer``: enqueue a list of images, watch a batch, report on it, retry its failures.

Exit codes: 0 all images synced or up to date, 1 some failed, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from pydantic import SecretStr, ValidationError
from rich.console import Console
from rich.markup import escape

from config.reference import ReferenceError
from config.settings import FerrySettings, describe_validation_error
from producer.listfile import ListFileError, parse_list
from producer.mapping import Target, map_destinations
from producer.report import as_json, render, summarize

if TYPE_CHECKING:  # imported lazily at run time, so bad input is reported before Celery loads
    from celery import Celery

    from config.jobs import BatchMeta
    from workers.batches import BatchSnapshot, BatchStore

USAGE = 2
# User and registry text passes through rich.markup.escape: "[...]" in it would be read as markup.


class UsageError(Exception):
    """Bad input: reported in one clear message, exit code 2, nothing enqueued."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m producer", description="Mirror a list of container images.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("enqueue", help="enqueue one sync task per image of LIST")
    e.add_argument("list", help="image list file (one image per line)")
    e.add_argument("--target", action="append", default=[],
                   help="destination REGISTRY[/NAMESPACE]; repeat for several (FERRY_TARGETS)")
    e.add_argument("--flatten", action="store_true", help="map to TARGET/NAMESPACE/<last path element>")
    e.add_argument("--engine", choices=["registry", "docker"], help="transfer engine (FERRY_ENGINE)")
    e.add_argument("--wait", action="store_true", help="show progress and a summary; exit 1 if any failed")
    e.add_argument("--json", metavar="FILE", help="write the final report as JSON (with --wait)")
    e.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    for name, help_ in (("status", "progress of a batch"), ("report", "results of a batch")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("batch")
        s.add_argument("--json", metavar="FILE", help="write JSON to FILE ('-' for stdout)")
    r = sub.add_parser("retry", help="re-enqueue only the failed images of a batch")
    r.add_argument("batch")
    r.add_argument("--wait", action="store_true")
    r.add_argument("--json", metavar="FILE")
    r.add_argument("--timeout", type=float)
    sub.add_parser("batches", help="list recent batches")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    try:
        settings = _settings(args)
        return int(COMMANDS[args.command](args, settings, out, err))
    except UsageError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        return USAGE


def _settings(args: argparse.Namespace) -> FerrySettings:
    overrides: dict[str, Any] = {}
    if getattr(args, "engine", None):
        overrides["engine"] = args.engine
    try:
        return FerrySettings(**overrides)
    except ValidationError as e:
        raise UsageError(describe_validation_error(e)) from None


def _read_list(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read list file {path}: {e.strerror}") from None


def cmd_enqueue(args: argparse.Namespace, settings: FerrySettings, out: Console, err: Console) -> int:
    from producer.enqueue import build_jobs, enqueue, new_batch_id

    data = _read_list(args.list)
    targets_raw = args.target or settings.targets
    try:
        parsed = parse_list(data)
        targets = [Target.parse(t) for t in targets_raw]
        mapped = map_destinations(parsed.entries, targets, flatten=args.flatten)
    except ListFileError as e:
        for le in e.errors:
            err.print(f"[red]{escape(args.list)}:{le.line}:[/] {escape(le.reason)}: {escape(le.text)}", soft_wrap=True)
        raise UsageError(f"{len(e.errors)} invalid line(s) in {args.list}; nothing was enqueued") from None
    except ReferenceError as e:
        raise UsageError(f"bad --target: {e}") from None
    for w in parsed.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)
    batch_id = new_batch_id()
    jobs = build_jobs(batch_id, mapped, settings.engine)
    if settings.broker_url is None and not args.wait:
        raise UsageError("FERRY_BROKER_URL is not set: set it to enqueue to a cluster, "
                         "or add --wait to run standalone on this machine")
    with _broker(settings, err) as settings:
        app, store = _connect(settings)
        try:
            meta = enqueue(app, store, batch_id, args.list, targets_raw, jobs)
            err.print(f"batch [bold]{batch_id}[/]: {len(jobs)} image(s) enqueued", soft_wrap=True)
            if not args.wait:
                out.print(batch_id)
                return 0
            return _wait_and_report(store, meta, args, out, err)
        finally:
            store.close()


@contextmanager
def _broker(settings: FerrySettings, err: Console) -> Iterator[FerrySettings]:
    if settings.broker_url is not None:
        yield settings
        return
    from producer.standalone import local_cluster

    with local_cluster(workers=1, concurrency=settings.concurrency) as url:
        err.print(f"standalone: started a local Redis and a worker with {settings.concurrency} "
                  "processes for this run (set FERRY_BROKER_URL to use a cluster)", soft_wrap=True)
        yield settings.model_copy(update={"broker_url": SecretStr(url)})


def _connect(settings: FerrySettings) -> tuple[Celery, BatchStore]:
    from workers.app import configure
    from workers.batches import BatchStore

    assert settings.broker_url is not None
    url = (settings.result_url or settings.broker_url).get_secret_value()
    store = BatchStore.from_url(url, settings.result_ttl)
    try:
        store.r.ping()
    except redis.RedisError as e:
        store.close()
        raise UsageError(f"cannot reach the broker at {_safe_url(url)}: {e}") from None
    return configure(settings), store


def _safe_url(url: str) -> str:
    from urllib.parse import urlsplit

    p = urlsplit(url)
    host = p.hostname or ""
    return f"{p.scheme}://{host}" + (f":{p.port}" if p.port else "")


def _wait_and_report(store: BatchStore, meta: BatchMeta, args: argparse.Namespace, out: Console, err: Console) -> int:
    import time

    from producer.progress import wait_for_batch

    started = time.monotonic()
    snap = wait_for_batch(store, meta, err, timeout=args.timeout)
    summary = summarize(snap, elapsed=time.monotonic() - started)
    render(out, snap, summary)
    if args.json:
        _write_json(args.json, as_json(snap, summary))
    return summary.exit_code


def _write_json(dest: str, doc: dict[str, Any]) -> None:
    text = json.dumps(doc, indent=2)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")


def _require_broker(settings: FerrySettings) -> FerrySettings:
    if settings.broker_url is None:
        raise UsageError("FERRY_BROKER_URL is not set: batches live in the cluster's Redis")
    return settings


def _snapshot(settings: FerrySettings, batch: str) -> tuple[Celery, BatchStore, BatchSnapshot]:
    app, store = _connect(_require_broker(settings))
    snap = store.snapshot(batch)
    if snap is None:
        store.close()
        raise UsageError(f"no batch {batch!r} in Redis (unknown, or older than the result TTL)")
    return app, store, snap


def cmd_status(args: argparse.Namespace, settings: FerrySettings, out: Console, err: Console) -> int:
    _, store, snap = _snapshot(settings, args.batch)
    store.close()
    summary = summarize(snap)
    running = {t: s for t, s in snap.states.items() if t not in snap.results}
    doc = {"batch_id": args.batch, "total": summary.total, "done": len(snap.results), "synced": summary.synced,
           "up_to_date": summary.up_to_date, "failed": summary.failed, "running": len(running),
           "bytes_moved": sum(snap.progress.values())}
    if args.json:
        _write_json(args.json, doc)
    else:
        out.print("  ".join(f"{k}={v}" for k, v in doc.items()))
        jobs = dict(zip(snap.meta.task_ids, snap.meta.jobs, strict=True))
        for t, state in running.items():
            out.print(f"  {escape(jobs[t].source)}: {escape(state)}", soft_wrap=True)
    return 0 if snap.done and summary.failed == 0 else 1


def cmd_report(args: argparse.Namespace, settings: FerrySettings, out: Console, err: Console) -> int:
    _, store, snap = _snapshot(settings, args.batch)
    store.close()
    summary = summarize(snap)
    if args.json:
        _write_json(args.json, as_json(snap, summary))
    if args.json != "-":
        render(out, snap, summary, details=True)
    return summary.exit_code


def cmd_retry(args: argparse.Namespace, settings: FerrySettings, out: Console, err: Console) -> int:
    from producer.enqueue import publish

    app, store, snap = _snapshot(settings, args.batch)
    try:
        failed = [(t, j) for t, j in zip(snap.meta.task_ids, snap.meta.jobs, strict=True)
                  if t in snap.results and snap.results[t].status == "failed"]
        if not failed:
            err.print(f"batch {args.batch}: no failed images to retry")
            return 0
        store.reset_outcomes(args.batch, [t for t, _ in failed])
        publish(app, failed)
        err.print(f"batch [bold]{args.batch}[/]: {len(failed)} failed image(s) enqueued again")
        if not args.wait:
            return 0
        return _wait_and_report(store, snap.meta, args, out, err)
    finally:
        store.close()


def cmd_batches(args: argparse.Namespace, settings: FerrySettings, out: Console, err: Console) -> int:
    _, store = _connect(_require_broker(settings))
    try:
        for b in store.recent():
            out.print(b)
    finally:
        store.close()
    return 0


COMMANDS = {"enqueue": cmd_enqueue, "status": cmd_status, "report": cmd_report, "retry": cmd_retry,
            "batches": cmd_batches}
