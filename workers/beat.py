"""Celery beat for schedules, with its state in Redis, so any number of beat processes can run.

Every run of a schedule is a point in time (``every`` runs counted from the epoch, cron runs on
their minute), so all beat processes name the same runs. Before sending a run, a beat claims it
in Redis in one atomic step (it must be later than the last run claimed): another beat, or this
one restarted, finds it taken. A beat that dies between claim and send leaves the run claimed
but unsent; whichever beat sees it so for ``REPAIR_AFTER`` seconds sends it, and the worker side
fires a run once however often it arrives. A run missed while no beat ran fires once when one
starts (only the latest: no burst after an outage); a new schedule first fires at its next run.
"""

from __future__ import annotations

import logging
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.beat import Scheduler
from pydantic import ValidationError

from config.reference import InvalidReference
from config.schedules import Schedule, ScheduleFiring
from config.settings import FerrySettings, describe_validation_error
from contract import keys
from contract.broker import SCHEDULE_QUEUE, SCHEDULE_TASK
from producer.enqueue import plan_batch
from producer.listfile import ListFileError
from workers.schedules import when

log = logging.getLogger("ferry.beat")

# A claimed run still unsent after this long is sent by whichever beat sees it.
REPAIR_AFTER = 10.0
# Longest sleep between ticks (cron runs wake beat on the minute anyway).
MAX_INTERVAL = 5.0

# KEYS[1] the schedule's hash; ARGV: run time, now. 1 = claimed here; 0 = not due or taken.
_CLAIM = """
local cur = redis.call('HGET', KEYS[1], 'run')
if not cur then
  redis.call('HSET', KEYS[1], 'run', ARGV[1], 'sent', ARGV[1], 'claimed_at', ARGV[2])
  return 0
end
if tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'run', ARGV[1], 'claimed_at', ARGV[2])
return 1
"""
# KEYS[1] the schedule's hash; ARGV[1] a run time now sent. Never moves back.
_SENT = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'sent') or '0')
if cur < tonumber(ARGV[1]) then redis.call('HSET', KEYS[1], 'sent', ARGV[1]) end
return 1
"""


class ScheduleError(Exception):
    """A schedule that cannot run: reported in one line, exit code 2."""


def load_schedules(settings: FerrySettings) -> list[Schedule]:
    """``FERRY_SCHEDULES`` and the ``[[schedule]]`` tables of ``FERRY_SCHEDULE_FILE``, each
    checked as a run would use it (its list read and parsed, its targets valid)."""
    schedules = list(settings.schedules)
    if settings.schedule_file:
        schedules += _from_file(Path(settings.schedule_file))
    names = [s.name for s in schedules]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ScheduleError(f"schedule name(s) used twice: {', '.join(twice)}")
    for s in schedules:
        firing = firing_for(s, 0.0, settings)
        try:
            plan_batch("check", firing.data.encode(), firing.targets, flatten=s.flatten, engine=firing.engine,
                       list_file=firing.list_file)
        except ListFileError as e:
            raise ScheduleError(f"schedule {s.name}: {firing.list_file}: " + "; ".join(map(str, e.errors))) from None
        except InvalidReference as e:
            raise ScheduleError(f"schedule {s.name}: bad target: {e}") from None
    return schedules


def _from_file(path: Path) -> list[Schedule]:
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise ScheduleError(f"cannot read schedule file {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ScheduleError(f"schedule file {path} is not valid TOML: {e}") from None
    unknown = sorted(set(doc) - {"schedule"})
    if unknown:
        raise ScheduleError(f"schedule file {path}: unknown table(s) {', '.join(unknown)}; use [[schedule]]")
    tables = doc.get("schedule", [])
    if not isinstance(tables, list):
        raise ScheduleError(f"schedule file {path}: write each schedule as a [[schedule]] table")
    try:
        return [Schedule.model_validate(t) for t in tables]
    except ValidationError as e:
        raise ScheduleError(f"schedule file {path}: " + describe_validation_error(e).removeprefix("invalid setting ")
                            .replace("FERRY_", "")) from None


def firing_for(s: Schedule, run_at: float, settings: FerrySettings) -> ScheduleFiring:
    """The payload of one run; reads the schedule's list file now (raises ScheduleError)."""
    if s.list_file is not None:
        try:
            data = Path(s.list_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ScheduleError(f"schedule {s.name}: cannot read list file {s.list_file}: {e}") from None
        label = s.list_file
    else:
        data, label = "\n".join(s.lines or []) + "\n", f"schedule {s.name} (inline)"
    return ScheduleFiring(name=s.name, run_at=run_at, list_file=label, data=data,
                          targets=s.targets or settings.targets, flatten=s.flatten,
                          engine=s.engine or settings.engine, referrers=s.referrers and settings.referrers)


class ScheduleBeat(Scheduler):  # type: ignore[misc]
    """The beat scheduler: ``app.conf.ferry_schedules`` and ``ferry_settings`` say what to run."""

    def setup_schedule(self) -> None:
        self.schedules: Sequence[Schedule] = self.app.conf.ferry_schedules
        self.settings: FerrySettings = self.app.conf.ferry_settings
        self.redis = redis.Redis.from_url(self.app.conf.result_backend, socket_timeout=10, socket_connect_timeout=10,
                                          health_check_interval=10, retry_on_timeout=True)
        self._claim = self.redis.register_script(_CLAIM)
        self._sent = self.redis.register_script(_SENT)
        for s in self.schedules:
            log.info("schedule %s: %s", s.name, f"every {s.every} s" if s.every else f"cron {s.cron!r} (UTC)")

    def tick(self, *args: Any, **kwargs: Any) -> float:
        now = time.time()
        waits = [float(self.max_interval)]
        for s in self.schedules:
            try:
                self._tick(s, now)
            except redis.RedisError as e:
                log.warning("schedule %s: Redis unreachable (%s); trying again", s.name, e)
            waits.append(((s.latest_run(now) or now) + s.every - now) if s.every else 60 - now % 60)
        return max(0.05, min(waits))

    def _tick(self, s: Schedule, now: float) -> None:
        run = s.latest_run(now)
        key = keys.schedule(s.name)
        if run is not None and self._claim(keys=[key], args=[repr(run), repr(now)]):
            self._send(s, run)
            return
        claimed, sent, claimed_at = (float(v) if v else 0.0 for v in self.redis.hmget(key, "run", "sent", "claimed_at"))
        if claimed > sent and now - claimed_at > REPAIR_AFTER:
            log.warning("schedule %s: the run at %s was claimed %.0f s ago but never sent; sending it",
                        s.name, when(claimed), now - claimed_at)
            self._send(s, claimed)

    def _send(self, s: Schedule, run: float) -> None:
        key = keys.schedule(s.name)
        try:
            firing = firing_for(s, run, self.settings)
        except ScheduleError as e:
            log.error("%s; the run at %s is skipped", e, when(run))
        else:
            self.app.send_task(SCHEDULE_TASK, args=[firing.model_dump(mode="json")], queue=SCHEDULE_QUEUE,
                               argsrepr=f"[{s.name} @ {when(run)}]", shadow=f"schedule {s.name}")
            log.info("schedule %s: sent the run at %s", s.name, when(run))
        self._sent(keys=[key], args=[repr(run)])


def run_beat(app: Celery, schedules: list[Schedule], settings: FerrySettings, loglevel: str) -> None:
    app.conf.update(ferry_schedules=schedules, ferry_settings=settings)
    app.Beat(scheduler=ScheduleBeat, max_interval=MAX_INTERVAL, loglevel=loglevel, quiet=True).run()
