"""Schedule definitions and cron expressions: parsing, validation and the run times they name."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from config.cron import Cron, CronError
from config.schedules import Schedule, ScheduleFiring
from config.settings import FerrySettings
from tests.support.workers import ferry_env
from workers.beat import load_schedules
from workers.cli import main as workers_main


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("expr", "now", "latest"),
    [
        ("*/15 * * * *", "2024-03-13T10:37:20", "2024-03-13T10:30:00"),
        ("*/15 * * * *", "2024-03-13T10:30:00", "2024-03-13T10:30:00"),
        ("0 2 * * *", "2024-03-13T01:59:59", "2024-03-12T02:00:00"),
        ("5-10/2 8,20 * * *", "2024-03-13T20:08:00", "2024-03-13T20:07:00"),
        # Both day fields restricted: either one fires (Friday the 8th, not the 1st or 15th).
        ("30 4 1,15 * fri", "2024-03-10T12:00:00", "2024-03-08T04:30:00"),
        # One of them left open: both must hold (a Friday that is the 1st or 15th).
        ("30 4 1,15 * *", "2024-03-10T12:00:00", "2024-03-01T04:30:00"),
        ("@weekly", "2024-03-13T09:00:00", "2024-03-10T00:00:00"),
        ("0 0 * * 7", "2024-03-13T09:00:00", "2024-03-10T00:00:00"),
        ("0 9 * jan-mar MON-FRI", "2024-04-20T00:00:00", "2024-03-29T09:00:00"),
        ("0 0 29 2 *", "2025-06-01T00:00:00", "2024-02-29T00:00:00"),
        ("@hourly", "2024-03-13T10:00:59", "2024-03-13T10:00:00"),
    ],
)
def test_latest_run_of_a_cron_expression(expr: str, now: str, latest: str) -> None:
    assert Cron.parse(expr).latest(at(now)) == at(latest)


@pytest.mark.parametrize(
    ("expr", "reason"),
    [
        ("* * *", "needs 5 fields"),
        ("60 * * * *", "outside 0-59"),
        ("*/0 * * * *", "bad minute step"),
        ("a * * * *", "bad minute 'a'"),
        ("0 0 * * funday", "bad day of week"),
        ("10-5 * * * *", "outside"),
        ("0 0 31 2 *", "never fires"),
    ],
)
def test_bad_cron_expressions_say_why(expr: str, reason: str) -> None:
    with pytest.raises(CronError, match=reason):
        Cron.parse(expr)


def test_a_schedule_needs_one_list_and_one_timing() -> None:
    ok = Schedule.model_validate({"name": "nightly", "list": "/l.txt", "targets": ["r.example.com"],
                                  "cron": "0 2 * * *"})
    assert ok.list_file == "/l.txt" and ok.lines is None
    for bad, reason in [
        ({"name": "a", "list": "/l", "lines": ["x"], "every": 5}, "one of 'list'"),
        ({"name": "a", "every": 5}, "one of 'list'"),
        ({"name": "a", "lines": ["x"]}, "one of 'every'"),
        ({"name": "a", "lines": ["x"], "every": 5, "cron": "* * * * *"}, "one of 'every'"),
        ({"name": "Bad Name", "lines": ["x"], "every": 5}, "must be lowercase"),
        ({"name": "a", "lines": ["x"], "cron": "61 * * * *"}, "outside 0-59"),
        ({"name": "a", "lines": ["x"], "every": 0}, "greater than 0"),
        ({"name": "a", "lines": ["x"], "every": 5, "retries": 3}, "Extra inputs"),
    ]:
        with pytest.raises(ValidationError, match=reason):
            Schedule.model_validate(bad)


def test_runs_are_counted_from_the_epoch_so_every_beat_agrees() -> None:
    every5 = Schedule(name="s", lines=["nginx"], every=5)
    assert [every5.latest_run(t) for t in (1000.0, 1004.99, 1005.0)] == [1000.0, 1000.0, 1005.0]
    nightly = Schedule(name="n", lines=["nginx"], cron="0 2 * * *")
    assert nightly.latest_run(at("2024-03-13T03:00:00").timestamp()) == at("2024-03-13T02:00:00").timestamp()


def test_a_run_names_its_batch_after_the_schedule_and_its_time() -> None:
    firing = ScheduleFiring(name="nightly", run_at=at("2024-03-13T02:00:00").timestamp(), list_file="l.txt",
                            data="nginx\n", targets=["r.example.com"])
    assert firing.batch_id == "nightly-20240313-020000"


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "schedules.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "no schedules: set FERRY_SCHEDULES"),
    ({"FERRY_SCHEDULES": '[{"name": "n", "lines": ["nginx"], "cron": "0 25 * * *"}]'},
     "FERRY_SCHEDULES__0__CRON: cron expression '0 25 * * *': hour '25' is outside 0-23"),
    ({"FERRY_SCHEDULES": '[{"name": "n", "lines": ["nginx", "Bad:ref"], "every": 60}]'},
     "schedule n: schedule n (inline): LINE 2: bad source reference"),
    ({"FERRY_SCHEDULES": '[{"name": "n", "lines": ["nginx"], "every": 60}]'},
     "schedule n: schedule n (inline): LINE 1: no destination"),
    ({"FERRY_SCHEDULES": '[{"name": "n", "list": "/nonexistent/images.txt", "every": 60}]'},
     "schedule n: cannot read list file /nonexistent/images.txt"),
    ({"FERRY_SCHEDULES": '[{"name": "n", "lines": ["nginx"], "targets": ["r.example.com"], "every": 60}]',
      "FERRY_SCHEDULE_FILE": "[[schedule]]\nname = 'n'\nlines = ['redis']\ntargets = ['r.example.com']\nevery = 5\n"},
     "schedule name(s) used twice: n"),
    ({"FERRY_SCHEDULE_FILE": "[[schedule]]\nname = 'n'\nlines = ['redis']\n"}, "needs one of 'every'"),
    ({"FERRY_SCHEDULE_FILE": "[schedules]\nname = 'n'\n"}, "unknown table(s) schedules; use [[schedule]]"),
    ({"FERRY_SCHEDULE_FILE": "[[schedule]\n"}, "is not valid TOML"),
], ids=["none", "bad-cron", "bad-line", "no-target", "missing-list", "twice", "no-timing", "bad-table", "bad-toml"])
def test_beat_refuses_bad_schedules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                    env: dict[str, str], expected: str) -> None:
    if "FERRY_SCHEDULE_FILE" in env:
        env = {**env, "FERRY_SCHEDULE_FILE": _toml(tmp_path, env["FERRY_SCHEDULE_FILE"])}
    for k in [k for k in os.environ if k.startswith("FERRY_")]:
        monkeypatch.delenv(k)
    for k, v in ferry_env("redis://127.0.0.1:1/0", tmp_path, **env).items():
        monkeypatch.setenv(k, v)
    assert workers_main(["beat"]) == 2
    assert expected in capsys.readouterr().err


def test_the_example_schedule_file_is_valid(tmp_path: Path) -> None:
    deploy = Path(__file__).resolve().parents[1] / "deploy"
    text = (deploy / "schedules.toml").read_text()
    assert "/etc/ferry/lists/images.txt" in text  # where compose mounts deploy/lists
    path = _toml(tmp_path, text.replace("/etc/ferry/lists/", f"{deploy}/lists/"))
    settings = FerrySettings(_env_file=None, schedule_file=path)  # type: ignore[call-arg]
    assert [s.name for s in load_schedules(settings)] == ["nightly", "base-images"]
