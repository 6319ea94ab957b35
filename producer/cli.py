"""``python -m producer``: enqueue a list of images, watch a batch, report on it, retry its failures.

Exit codes: 0 all images synced or up to date, 1 some failed, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import redis
from pydantic import SecretStr, ValidationError

from config import describe
from config.jobs import SyncJob
from config.reference import InvalidReference
from config.settings import FerrySettings, describe_validation_error
from producer.listfile import ListFileError
from producer.standalone import Stopped

if TYPE_CHECKING:  # imported lazily at run time, so the tasks are published before these load
    from rich.console import Console

    from config.jobs import BatchMeta
    from contract.batches import BatchSnapshot, BatchStore
    from contract.wire import TaskPublisher
    from producer.report import Summary

USAGE = 2


def escape(text: str) -> str:
    """User and registry text passes through rich.markup.escape: "[...]" in it would be read as markup."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


class _LazyConsole:
    """A rich Console made on first use: rich is a noticeable part of a short command's start-up, and
    ``enqueue`` has published its tasks by the time it first prints."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def _real(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real(), name)

    def __enter__(self) -> Console:  # looked up on the type, not through __getattr__
        return self._real().__enter__()

    def __exit__(self, *exc: object) -> None:
        self._real().__exit__(*exc)


class UsageError(Exception):
    """Bad input: reported in one clear message, exit code 2, nothing enqueued."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m producer", description="Mirror a list of container images.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("enqueue", help="enqueue one sync task per image of LIST")
    e.add_argument("list", help="image list file (one image per line), or a skopeo sync YAML file (.yaml/.yml)")
    e.add_argument("--target", action="append", default=[],
                   help="destination REGISTRY[/NAMESPACE]; repeat for several (FERRY_TARGETS)")
    e.add_argument("--flatten", action="store_true", help="map to TARGET/NAMESPACE/<last path element>")
    e.add_argument("--engine", choices=["registry", "docker"], help="transfer engine (FERRY_ENGINE)")
    e.add_argument("--wait", action="store_true", help="show progress and a summary; exit 1 if any failed")
    e.add_argument("--json", metavar="FILE", help="write the final report as JSON (with --wait)")
    e.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    e.add_argument("--dry-run", action="store_true",
                   help="check every image (HEADs and manifest reads) and report what would happen; write nothing")
    e.add_argument("--prune", action="store_true",
                   help="delete tags a selector line no longer selects from the repositories it fills")
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
    out = cast("Console", _LazyConsole(highlight=False))
    err = cast("Console", _LazyConsole(stderr=True, highlight=False))
    try:
        settings = _settings(args)
        return int(COMMANDS[args.command](args, settings, out, err))
    except UsageError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        return USAGE
    except Stopped as e:
        err.print(f"stopped by {e}", soft_wrap=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        err.print("interrupted", soft_wrap=True)
        return 128 + signal.SIGINT


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
    from producer.enqueue import enqueue, new_batch_id, plan_batch

    data = _read_list(args.list)
    targets_raw = args.target or settings.targets
    batch_id = new_batch_id()
    try:
        jobs, expansions, warnings = plan_batch(
            batch_id, data, targets_raw, flatten=args.flatten, engine=settings.engine, referrers=settings.referrers,
            list_file=args.list, dry_run=args.dry_run, prune=args.prune)
    except ListFileError as e:
        for le in e.errors:
            err.print(f"[red]{escape(args.list)}:{le.line}:[/] {escape(le.reason)}: {escape(le.text)}", soft_wrap=True)
        raise UsageError(f"{len(e.errors)} invalid line(s) in {args.list}; nothing was enqueued") from None
    except InvalidReference as e:
        raise UsageError(f"bad --target: {e}") from None
    for w in warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)
    standalone = settings.broker_url is None
    if standalone and not args.wait:
        raise UsageError("FERRY_BROKER_URL is not set: set it to enqueue to a cluster, "
                         "or add --wait to run standalone on this machine")
    with _broker(settings, err) as settings:
        publisher, store = _connect(settings)
        try:
            meta = enqueue(publisher, store, batch_id, args.list, targets_raw, jobs, expansions, dry_run=args.dry_run,
                           prune=args.prune)
            grows = f" and {len(expansions)} selector line(s) to expand" if expansions else ""
            what = "dry run: " if args.dry_run else ""
            err.print(f"batch [bold]{batch_id}[/]: {what}{len(jobs)} image(s){grows} enqueued", soft_wrap=True)
            if not args.wait:
                out.print(batch_id)
                return 0
            # The local worker stops with this command: its cleanups must land before it does.
            return _wait_and_report(store, meta, args, out, err, cleanups=standalone, publisher=publisher)
        finally:
            store.close()


@contextmanager
def _local_worker_errors() -> Iterator[None]:
    """A local worker that refuses its settings (exit 2) is bad input, reported as such."""
    from producer.standalone import LocalWorkerFailed

    try:
        yield
    except LocalWorkerFailed as e:
        if e.code == USAGE:
            raise UsageError(str(e)) from None
        raise RuntimeError(f"the local worker exited with code {e.code}: {e}") from None


@contextmanager
def _broker(settings: FerrySettings, err: Console) -> Iterator[FerrySettings]:
    if settings.broker_url is not None:
        yield settings
        return
    from producer.standalone import local_cluster

    with _local_worker_errors(), local_cluster(workers=1, concurrency=settings.concurrency) as url:
        err.print(f"standalone: started a local Redis and a worker with {settings.concurrency} "
                  "processes for this run (set FERRY_BROKER_URL to use a cluster)", soft_wrap=True)
        yield settings.model_copy(update={"broker_url": SecretStr(url)})


def _connect(settings: FerrySettings) -> tuple[TaskPublisher, BatchStore]:
    from contract.batches import BatchStore
    from contract.redis_client import redis_client
    from contract.wire import TaskPublisher

    assert settings.broker_url is not None
    broker = settings.broker_url.get_secret_value()
    url = settings.result_url.get_secret_value() if settings.result_url else broker
    store = BatchStore.from_url(url, settings.result_ttl)
    publisher = TaskPublisher(store.r if url == broker else redis_client(broker))
    for where, client in {url: store.r, broker: publisher.r}.items():  # one check when they are one Redis
        try:
            client.ping()
        except redis.RedisError as e:
            store.close()
            raise UsageError(f"cannot reach the broker at {_safe_url(where)}: {e}") from None
    return publisher, store


def _safe_url(url: str) -> str:
    from urllib.parse import urlsplit

    p = urlsplit(url)
    host = p.hostname or ""
    return f"{p.scheme}://{host}" + (f":{p.port}" if p.port else "")


def _wait_and_report(store: BatchStore, meta: BatchMeta, args: argparse.Namespace, out: Console, err: Console,
                     task_ids: list[str] | None = None, title: str | None = None, cleanups: bool = False,
                     publisher: TaskPublisher | None = None) -> int:
    """Watch ``task_ids`` (default: the whole batch) and sum up their own bytes, time and rate; with
    ``cleanups``, wait for the cleanups their results name too. With ``publisher``, tasks whose messages the
    broker lost are sent again."""
    from contract.broker import SYNC_QUEUE
    from contract.dispatch import publish
    from contract.messages import LostMessages
    from producer.progress import wait_for_batch, wait_for_cleanups
    from producer.report import as_json, render, summarize

    def resend(lost: list[str]) -> None:
        snap = store.snapshot(meta.batch_id, meta)
        jobs = dict(zip(meta.task_ids, meta.jobs, strict=True)) | (dict(snap.jobs) if snap else {})
        assert publisher is not None
        publish(publisher, [(t, jobs[t]) for t in lost if t in jobs])

    started = time.monotonic()
    # The whole batch (task_ids None) grows while its selector lines are expanded.
    snap = wait_for_batch(store, meta, err, task_ids=task_ids, timeout=args.timeout,
                          lost=LostMessages(publisher.r, [SYNC_QUEUE]) if publisher is not None else None,
                          resend=resend if publisher is not None else None)
    elapsed = time.monotonic() - started
    if cleanups:
        left = None if args.timeout is None else max(0.0, args.timeout - elapsed)
        snap = wait_for_cleanups(store, snap, err, timeout=left)
    summary = summarize(snap, task_ids=task_ids, elapsed=elapsed)
    # Each failure was printed as it happened: the summary counts them without repeating the reasons.
    render(out, snap, summary, title=title, failures_shown=True)
    if task_ids is not None:
        whole = summarize(snap)
        out.print(f"batch {meta.batch_id} now: {_counts(whole)}", highlight=False, soft_wrap=True)
    if args.json:
        _write_json(args.json, as_json(snap, summary))
    return summary.exit_code


def _counts(s: Summary) -> str:
    parts = [f"{s.synced} synced", f"{s.up_to_date} up to date", f"{s.failed} failed"]
    parts += [f"{s.pending} unfinished"] if s.pending else []
    return ", ".join(parts) + f" of {s.total}"


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


def _snapshot(settings: FerrySettings, batch: str) -> tuple[TaskPublisher, BatchStore, BatchSnapshot]:
    publisher, store = _connect(_require_broker(settings))
    snap = store.snapshot(batch)
    if snap is None:
        store.close()
        raise UsageError(f"no batch {batch!r} in Redis (unknown, or older than the result TTL)")
    return publisher, store, snap


def cmd_status(args: argparse.Namespace, settings: FerrySettings, out: Console, err: Console) -> int:
    from producer.report import summarize

    _, store, snap = _snapshot(settings, args.batch)
    store.close()
    summary = summarize(snap)
    meta = snap.meta
    jobs = dict(snap.jobs)
    for e, ej in zip(meta.expansion_ids, meta.expansions, strict=True):
        # A selector line being listed shows as its repository, like an image.
        jobs[e] = SyncJob(batch_id=ej.batch_id, source=f"{ej.source} (listing tags)", destinations=ej.destinations,
                          line=ej.line)
    unfinished = [t for t, _ in snap.jobs if t not in snap.results]
    unfinished += [e for e in meta.expansion_ids if e not in snap.expansions]
    running = [t for t in unfinished if t in snap.states and not snap.states[t].retrying]
    retrying = [t for t in unfinished if t in snap.states and snap.states[t].retrying]
    queued = len(unfinished) - len(running) - len(retrying)
    moved = summary.bytes + sum(snap.progress.get(t, 0) for t in unfinished)
    if args.json:
        _write_json(args.json, {
            "batch_id": meta.batch_id, "total": summary.total, "done": summary.total - summary.pending,
            "synced": summary.synced, "up_to_date": summary.up_to_date, "failed": summary.failed,
            "running": len(running), "retrying": len(retrying), "expanding": summary.expanding,
            "queued": queued, "bytes_moved": moved,
            "cleanups_done": summary.cleanups_done, "cleanups_expected": summary.cleanups_expected,
            "freed_bytes": summary.freed_bytes,
            "failed_images": [{"line": r.line, "source": r.source, "error": r.error} for r in summary.failures],
            "retrying_images": [{"line": jobs[t].line, "source": jobs[t].source, **snap.states[t].model_dump()}
                                for t in retrying],
        })
        return _status_code(snap, summary)
    head = (f"batch [bold]{meta.batch_id}[/] ({escape(Path(meta.list_file).name)}, enqueued "
            f"{describe.date_time(meta.created_at)}): {summary.total - summary.pending} of {summary.total} done")
    parts = [f"{summary.synced} synced", f"{summary.up_to_date} up to date", f"{summary.failed} failed"]
    parts += [f"{len(running)} running"] if running else []
    parts += [f"{len(retrying)} retrying"] if retrying else []
    parts += [f"{queued} queued"] if queued else []
    parts += [f"{summary.expanding} selector line(s) listing tags"] if summary.expanding else []
    parts += [f"{describe.human_bytes(moved)} moved"]
    # Cleanups land after their syncs: shown as they do.
    parts += [f"{summary.cleanups_done} of {summary.cleanups_expected} cleanups done, "
              f"{describe.human_bytes(summary.freed_bytes)} freed"] if summary.cleanups_expected else []
    out.print(head + " · " + " · ".join(parts), soft_wrap=True)
    now = time.time()
    for t in running:
        out.print("  " + escape(describe.running_line(jobs[t].line, jobs[t].source, snap.states[t])), soft_wrap=True)
    for t in retrying:
        line = describe.retry_line(jobs[t].line, jobs[t].source, snap.states[t], now, at=True)
        out.print("  [yellow]" + escape(line) + "[/]", soft_wrap=True, highlight=False)
    for r in summary.failures:
        out.print("  [red]" + escape(describe.failure_line(r)) + "[/]", soft_wrap=True, highlight=False)
    return _status_code(snap, summary)


def _status_code(snap: BatchSnapshot, summary: Summary) -> int:
    return 0 if snap.done and summary.failed == 0 else 1


def cmd_report(args: argparse.Namespace, settings: FerrySettings, out: Console, err: Console) -> int:
    from producer.report import as_json, render, summarize

    _, store, snap = _snapshot(settings, args.batch)
    store.close()
    summary = summarize(snap)
    if args.json:
        _write_json(args.json, as_json(snap, summary))
    if args.json != "-":
        render(out, snap, summary, details=True)
    return summary.exit_code


def cmd_retry(args: argparse.Namespace, settings: FerrySettings, out: Console, err: Console) -> int:
    """Send the failed images again under new task ids: the failed attempts stay in Flower's history
    and in the batch's, and the new run's figures are its own."""
    from config.jobs import RetryRound
    from contract.dispatch import publish, publish_expansions, task_id_for

    publisher, store, snap = _snapshot(settings, args.batch)
    try:
        meta = snap.meta

        def failed_(t: str) -> bool:
            return t in snap.results and snap.results[t].status == "failed"

        failed = [i for i, t in enumerate(meta.task_ids) if failed_(t)]
        # Images selector lines added, and selector lines whose tags could not be listed.
        added = [(t, j) for t, j in snap.added.items() if failed_(t)]
        unlisted = [(e, j) for e, j in zip(meta.expansion_ids, meta.expansions, strict=True)
                    if e in snap.expansions and snap.expansions[e].status == "failed"]
        if not failed and not added and not unlisted:
            err.print(f"batch {args.batch}: no failed images to retry")
            return 0
        number = len(meta.rounds) + 1
        ids = list(meta.task_ids)
        for i in failed:
            ids[i] = task_id_for(meta.batch_id, meta.jobs[i], retry=number)
        renamed = {t: (task_id_for(meta.batch_id, j, retry=number), j) for t, j in added}
        replaced = {ids[i]: meta.task_ids[i] for i in failed} | {new: old for old, (new, _) in renamed.items()}
        round_ = RetryRound(started_at=time.time(), replaced=replaced)
        new_meta = meta.model_copy(update={"task_ids": ids, "rounds": [*meta.rounds, round_]})
        store.start_round(new_meta, [snap.results[old] for old in replaced.values()])
        store.replace_added(meta.batch_id, renamed)
        store.reset_expansions(meta.batch_id, [e for e, _ in unlisted])
        publish_expansions(publisher, unlisted)
        again = [(ids[i], meta.jobs[i]) for i in failed] + list(renamed.values())
        publish(publisher, again)
        lines = f" and {len(unlisted)} selector line(s)" if unlisted else ""
        err.print(f"batch [bold]{args.batch}[/]: {len(again)} failed image(s){lines} enqueued again")
        if not args.wait:
            return 0
        # Selector lines listed again add images of their own: then watch the whole batch.
        return _wait_and_report(store, new_meta, args, out, err, publisher=publisher,
                                task_ids=None if unlisted else [t for t, _ in again],
                                title=f"batch {args.batch}: retry of {len(again)} image(s){lines}")
    finally:
        store.close()


def cmd_batches(args: argparse.Namespace, settings: FerrySettings, out: Console, err: Console) -> int:
    from rich.table import Table

    from producer.report import summarize

    _, store = _connect(_require_broker(settings))
    try:
        table = Table(show_header=True, header_style="bold", box=None)
        table.add_column("batch", no_wrap=True)
        table.add_column("started", no_wrap=True)
        table.add_column("list", overflow="fold")
        table.add_column("images", justify="right")
        table.add_column("outcome")
        for batch_id in store.recent():
            snap = store.snapshot(batch_id)
            if snap is None:  # its records expired; the index entry outlives them
                continue
            s = summarize(snap)
            table.add_row(batch_id, describe.date_time(snap.meta.created_at), escape(Path(snap.meta.list_file).name),
                          str(s.total), _outcome(snap, s))
    finally:
        store.close()
    out.print(table)
    return 0


def _outcome(snap: BatchSnapshot, s: Summary) -> str:
    if s.pending:
        text = f"[yellow]running[/]: {s.total - s.pending} of {s.total} done"
        text += f", [red]{s.failed} failed[/]" if s.failed else ""
    else:
        parts = [f"{n} {what}" for n, what in ((s.synced, "synced"), (s.up_to_date, "up to date")) if n]
        parts += [f"[red]{s.failed} failed[/]"] if s.failed else []
        text = ("[red]failed[/]: " if s.failed else "[green]ok[/]: ") + ", ".join(parts)
    rounds = len(snap.meta.rounds)
    return text + (f" (retried {describe.times(rounds)})" if rounds else "")


COMMANDS = {"enqueue": cmd_enqueue, "status": cmd_status, "report": cmd_report, "retry": cmd_retry,
            "batches": cmd_batches}
