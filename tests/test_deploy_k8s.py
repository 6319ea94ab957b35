"""deploy/k8s: rendered by kustomize, every object validated against the Kubernetes schemas
(kubernetes-validate) and KEDA's published CRD schemas, then checked against ferry itself: queue name,
settings, health probes, image, secrets and the references between objects."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from config.settings import FerrySettings
from contract.broker import SYNC_QUEUE
from tests.support.workers import ROOT

pytestmark = pytest.mark.deploy

K8S = ROOT / "deploy" / "k8s"
# The Kubernetes version the manifests are validated against (kubernetes-validate bundles its schemas).
KUBERNETES_VERSION = "1.32.0"
KEDA_SCHEMAS = ROOT / "tests" / "data" / "keda"
KEDA_KINDS = {"ScaledObject": "scaledobjects", "TriggerAuthentication": "triggerauthentications"}
FERRY_IMAGE = "registry.example.com/ferry:0.1.0"
HEALTH = ["python", "-m", "workers", "health"]
# Settings the entry points read themselves, beside FerrySettings' fields.
CLI_ENV = set(re.findall(r'environ\.get\("(FERRY_[A-Z_]+)"', (ROOT / "workers" / "cli.py").read_text()))

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    # As a user does: a copy of the base with secrets.env made from the example.
    work = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, work)
    (work / "secrets.env").write_text((K8S / "secrets.env.example").read_text())
    r = subprocess.run([kubectl, "kustomize", str(work)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def ferry_containers(objs: list[Obj]) -> list[tuple[str, Obj]]:
    out = []
    for o in objs:
        spec = o.get("spec", {}).get("template", {}).get("spec", {})
        out += [(o["metadata"]["name"], c) for c in spec.get("containers", []) if "ferry" in c["image"]]
    return out


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would silently prune (structural schemas drop unknown fields): typos."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        for k, v in value.items():
            if k not in schema["properties"]:
                out.append(f"{path}.{k}")
            else:
                out += unknown_fields(v, schema["properties"][k], f"{path}.{k}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for k, v in value.items():
            out += unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")
    elif isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def test_every_object_is_valid_for_kubernetes_and_keda(rendered: list[Obj]) -> None:
    kinds = sorted(o["kind"] for o in rendered)
    assert kinds == sorted(["Namespace", "Service", "Service", "StatefulSet", "Deployment", "Deployment",
                            "Deployment", "PodDisruptionBudget", "ConfigMap", "ConfigMap", "Secret",
                            "ScaledObject", "TriggerAuthentication", "NetworkPolicy"])
    for o in rendered:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] in KEDA_KINDS:
            schema = json.loads((KEDA_SCHEMAS / f"{KEDA_KINDS[o['kind']]}.schema.json").read_text())
            assert o["apiVersion"] == schema["x-api-version"], name
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in jsonschema.Draft7Validator(schema).iter_errors(o)]
            assert errors == [], name
            assert unknown_fields(o["spec"], schema["properties"]["spec"], "spec") == [], name
        else:
            try:
                kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{name}: {e.path}: {e.message}") from None


def test_the_schema_check_catches_a_mistake(rendered: list[Obj]) -> None:
    """The validators above are not vacuous: a misspelt field and a wrong type fail."""
    scaled = json.loads(json.dumps(one(rendered, "ScaledObject", "ferry-worker")))
    scaled["spec"]["minReplicaCount"] = "one"
    scaled["spec"]["triggers"][0]["metdata"] = {}
    schema = json.loads((KEDA_SCHEMAS / "scaledobjects.schema.json").read_text())
    assert list(jsonschema.Draft7Validator(schema).iter_errors(scaled))
    assert unknown_fields(scaled["spec"], schema["properties"]["spec"], "spec") == ["spec.triggers[0].metdata"]
    worker = json.loads(json.dumps(one(rendered, "Deployment", "ferry-worker")))
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 3600
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSION, strict=True)


def setting_exists(env_name: str) -> bool:
    if env_name in CLI_ENV:
        return True
    parts = env_name.removeprefix("FERRY_").lower().split("__")
    model: type[BaseModel] = FerrySettings
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(parts) - 1:
            sub = field.annotation
            if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
                return False
            model = sub
    return True


def test_ferry_containers_use_real_settings_one_image_and_the_health_probe(rendered: list[Obj]) -> None:
    containers = ferry_containers(rendered)
    assert sorted(n for n, _ in containers) == ["ferry-beat", "ferry-flower", "ferry-worker"]
    secret = one(rendered, "Secret", "ferry-secrets")
    for owner, c in containers:
        assert c["image"] == FERRY_IMAGE, owner
        assert c["args"][0] == "workers", owner  # the image's entrypoint is `python -m`
        for env in c["env"]:
            if env["name"].startswith("FERRY_"):
                assert setting_exists(env["name"]), f"{owner}: {env['name']} is no ferry setting"
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "ferry-secrets" and ref["key"] in secret["data"], f"{owner}: {ref}"
        names = {e["name"] for e in c["env"]}
        assert "FERRY_BROKER_URL" in names, owner
        assert c["readinessProbe"]["exec"]["command"] == HEALTH, owner
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, owner
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, owner
    assert not setting_exists("FERRY_CACHE__NO_SUCH") and not setting_exists("FERRY_NO_SUCH")
    worker = dict(containers)["ferry-worker"]
    assert worker["livenessProbe"]["exec"]["command"] == [*HEALTH, "--worker"]
    assert worker["startupProbe"]["exec"]["command"] == [*HEALTH, "--worker"]
    flower = dict(containers)["ferry-flower"]
    assert any(e["name"] == "FERRY_FLOWER_BASIC_AUTH" and "secretKeyRef" in e.get("valueFrom", {})
               for e in flower["env"])


def test_workers_shut_down_warm_and_scale_on_the_ferry_queue(rendered: list[Obj]) -> None:
    deploy = one(rendered, "Deployment", "ferry-worker")
    pod = deploy["spec"]["template"]
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    # Longer than a slow copy, shorter than the visibility timeout after which a killed copy runs again.
    assert 1800 <= grace < FerrySettings().visibility_timeout
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["FERRY_BROKER_URL"] == "redis://:$(REDIS_PASSWORD)@ferry-redis:6379/0"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == env["FERRY_METRICS_PORT"]
    assert {p["containerPort"] for p in c["ports"]} == {int(env["FERRY_METRICS_PORT"])}

    scaled = one(rendered, "ScaledObject", "ferry-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] >= 1  # someone must consume node and schedule queues
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == SYNC_QUEUE
    assert trigger["metadata"]["listLength"] == env["FERRY_CONCURRENCY"]
    redis_svc = one(rendered, "Service", "ferry-redis")
    host, port = trigger["metadata"]["address"].rsplit(":", 1)
    assert host == f"ferry-redis.{redis_svc['metadata']['namespace']}.svc.cluster.local"
    assert int(port) == redis_svc["spec"]["ports"][0]["port"]
    auth = one(rendered, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password"
    assert ref["key"] in one(rendered, "Secret", ref["name"])["data"]

    pdb = one(rendered, "PodDisruptionBudget", "ferry-worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_redis_keeps_every_task_and_beat_runs_once(rendered: list[Obj]) -> None:
    conf = one(rendered, "ConfigMap", "ferry-redis-config")["data"]["redis.conf"]
    assert conf == (ROOT / "deploy" / "redis.conf").read_text()  # one Redis configuration, two copies
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#"))
    assert settings["appendonly"] == "yes" and settings["maxmemory-policy"] == "noeviction"
    sts = one(rendered, "StatefulSet", "ferry-redis")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert "--include /tmp/auth.conf" in c["args"][0] and "$REDIS_PASSWORD" in c["args"][0]
    assert any(e["name"] == "REDIS_PASSWORD" and e["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
               for e in c["env"])
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]
    policy = one(rendered, "NetworkPolicy", "ferry-redis")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= \
        sts["spec"]["template"]["metadata"]["labels"].items()
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for name in ("ferry-worker", "ferry-flower", "ferry-beat"):
        labels = one(rendered, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert allowed.items() <= labels.items(), name

    beat = one(rendered, "Deployment", "ferry-beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
