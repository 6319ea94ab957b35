"""A real Prometheus (Debian package ``prometheus``) on a free port, scraping given targets every second."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.procs import free_port, stop, wait_until

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "ferry.json"


def require(binary: str) -> str:
    """The binary's path; a missing one fails the test under CI and skips it elsewhere."""
    path = shutil.which(binary)
    if path is None:
        reason = f"{binary} is not installed (apt-get install prometheus); .ci/run installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@dataclass
class Prometheus:
    root: Path
    targets: list[str]
    rule_files: list[Path] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        binary = require("prometheus")
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": "ferry", "static_configs": [{"targets": self.targets}]}],
        }
        cfg = self.root / "prometheus.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        with open(self.root / "prometheus.log", "ab") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=log, start_new_session=True)
        wait_until(lambda: httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200, 60, "prometheus ready")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, timeout=20)
            self.proc = None

    def log(self) -> str:
        path = self.root / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {labels}, "value": [t, "v"]}, ...]."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data}"
        return list(data["result"])

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(expr)}

    def scalar(self, expr: str) -> float | None:
        """The value of a query answering one series (None when it answers none)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {result}"
        return float(result[0]["value"][1]) if result else None


# Grafana's variables, as Prometheus would see them once Grafana filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """Every query of the dashboard, Grafana's variables filled in."""
    doc = json.loads(path.read_text())
    exprs = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            exprs.append(expr)
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords, label
    names (in ``{}`` or ``by ()``), durations or strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[m.end():].lstrip()
        if rest.startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names
