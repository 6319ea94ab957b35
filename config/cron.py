"""Cron expressions (``minute hour day-of-month month day-of-week``, in UTC) and their firing times.

Fields take ``*``, numbers, ranges ``a-b``, steps ``*/n`` and ``a-b/n``, lists ``a,b``, month and
weekday names (``jan``, ``mon``), 0 or 7 for Sunday, and the macros ``@hourly``, ``@daily``
(``@midnight``), ``@weekly``, ``@monthly`` and ``@yearly`` (``@annually``). As in Vixie cron, when
both day fields are restricted a day matching either one fires.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_MONTHS = {m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
                                        "dec"), start=1)}
_DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_NO_NAMES: dict[str, int] = {}
# (name, lowest, highest, names) per field.
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, _NO_NAMES), ("hour", 0, 23, _NO_NAMES), ("day of month", 1, 31, _NO_NAMES),
    ("month", 1, 12, _MONTHS), ("day of week", 0, 7, _DAYS))
# How far back a firing time is searched for: every valid expression fires within 8 years (29 February).
_HORIZON_DAYS = 8 * 366


class CronError(ValueError):
    pass


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, text: str) -> Cron:
        spec = _MACROS.get(text.strip().lower(), text)
        words = spec.split()
        if len(words) != 5:
            raise CronError(f"cron expression {text!r} needs 5 fields (minute hour day month weekday), "
                            f"got {len(words)}")
        try:
            sets = [_field(w, *f) for w, f in zip(words, _FIELDS, strict=True)]
        except CronError as e:
            raise CronError(f"cron expression {text!r}: {e}") from None
        weekdays = frozenset(d % 7 for d in sets[4])
        cron = cls(text, sets[0], sets[1], sets[2], sets[3], weekdays, words[2] == "*", words[4] == "*")
        if cron.latest(datetime(2000, 1, 1, tzinfo=UTC) + timedelta(days=_HORIZON_DAYS)) is None:
            raise CronError(f"cron expression {text!r} never fires")
        return cron

    def _day_matches(self, d: date) -> bool:
        if d.month not in self.months:
            return False
        in_month, in_week = d.day in self.days, (d.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def latest(self, at: datetime) -> datetime | None:
        """The last firing time at or before ``at`` (a UTC datetime), None if none in 8 years."""
        at = at.astimezone(UTC).replace(second=0, microsecond=0)
        day = at.date()
        for _ in range(_HORIZON_DAYS):
            if self._day_matches(day):
                today = day == at.date()
                for hour in sorted((h for h in self.hours if not today or h <= at.hour), reverse=True):
                    last_minute = at.minute if today and hour == at.hour else 59
                    minutes = [m for m in self.minutes if m <= last_minute]
                    if minutes:
                        return datetime(day.year, day.month, day.day, hour, max(minutes), tzinfo=UTC)
            day -= timedelta(days=1)
        return None


def _field(word: str, name: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    values: set[int] = set()
    for part in word.lower().split(","):
        body, slash, step_text = part.partition("/")
        step = _number(step_text, name, _NO_NAMES) if slash else 1
        if step < 1:
            raise CronError(f"bad {name} step in {word!r}")
        if body == "*":
            first, last = low, high
        elif "-" in body:
            a, _, b = body.partition("-")
            first, last = _number(a, name, names), _number(b, name, names)
        else:
            first = _number(body, name, names)
            last = high if slash else first
        if not low <= first <= last <= high:
            raise CronError(f"{name} {part!r} is outside {low}-{high}")
        values.update(range(first, last + 1, step))
    return frozenset(values)


def _number(text: str, name: str, names: dict[str, int]) -> int:
    if text in names:
        return names[text]
    if not text.isdigit():
        raise CronError(f"bad {name} {text!r}")
    return int(text)
