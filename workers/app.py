"""The workers' Celery application. Configured by entry points with ``configure``; tasks import ``app``."""

from __future__ import annotations

from celery import Celery

from config.settings import FerrySettings
from contract.broker import celery_config

app = Celery("ferry", include=["workers.tasks"])


def configure(settings: FerrySettings) -> Celery:
    app.conf.update(celery_config(settings))
    return app
