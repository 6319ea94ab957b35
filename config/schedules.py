"""Schedules: a list mirrored again and again, every N seconds or on a cron expression.

A schedule comes from ``FERRY_SCHEDULES`` (JSON) or a TOML file (``FERRY_SCHEDULE_FILE``)::

    [[schedule]]
    name = "nightly"
    list = "/etc/ferry/images.txt"         # or: lines = ["nginx:1.27", "--platform=linux/arm64 redis:7"]
    targets = ["harbor.example.com/mirror"]
    cron = "0 2 * * *"                     # or: every = 3600 (seconds)
    flatten = false
    engine = "registry"
    referrers = true
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from config.cron import Cron, CronError

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class Schedule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    # Batches it fires are named ``<name>-<UTC time of the run>``.
    name: str
    list_file: Annotated[str | None, Field(alias="list")] = None
    lines: list[str] | None = None
    targets: list[str] = Field(default_factory=list)
    every: PositiveInt | None = None
    cron: str | None = None
    flatten: bool = False
    engine: Literal["registry", "docker"] | None = None
    referrers: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"schedule name {v!r} must be lowercase letters, digits, '.', '_' or '-' "
                             "(at most 63, starting with a letter or digit)")
        return v

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                Cron.parse(v)
            except CronError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _one_of_each(self) -> Schedule:
        if (self.list_file is None) == (self.lines is None):
            raise ValueError(f"schedule {self.name!r} needs one of 'list' (a list file) or 'lines'")
        if (self.every is None) == (self.cron is None):
            raise ValueError(f"schedule {self.name!r} needs one of 'every' (seconds) or 'cron'")
        return self

    def latest_run(self, now: float) -> float | None:
        """The time of the latest run at or before ``now`` (epoch seconds). Runs of ``every``
        are counted from the epoch, so every beat process agrees on them."""
        if self.every is not None:
            return float(math.floor(now / self.every) * self.every)
        assert self.cron is not None
        at = Cron.parse(self.cron).latest(datetime.fromtimestamp(now, UTC))
        return at.timestamp() if at else None


class ScheduleFiring(BaseModel):
    """The payload beat sends for one run of a schedule: everything a worker needs to enqueue it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    run_at: float
    list_file: str
    data: str
    targets: list[str]
    flatten: bool = False
    engine: Literal["registry", "docker"] = "registry"
    referrers: bool = True

    @property
    def batch_id(self) -> str:
        return f"{self.name}-{datetime.fromtimestamp(self.run_at, UTC):%Y%m%d-%H%M%S}"
