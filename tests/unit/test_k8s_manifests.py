"""The Kubernetes manifests of docs/operations.md are valid and agree with each
other and with worker_core's configuration, so the page cannot rot.

Kubernetes objects are validated against the Kubernetes schemas that
``kubernetes-validate`` ships (strict: unknown fields fail); KEDA objects are not
in those schemas, so the fields KEDA's ScaledObject and PostgreSQL scaler require
are checked here. No cluster is needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from worker_core import WorkerConfig

DOC = Path(__file__).parents[2] / "docs" / "operations.md"
K8S_VERSION = "1.30.0"


def manifests() -> list[dict[str, Any]]:
    """Every YAML object of the page, in order."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def one(kind: str) -> dict[str, Any]:
    found = [m for m in manifests() if m.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {DOC.name}, found {len(found)}"
    return found[0]


def container() -> dict[str, Any]:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env() -> dict[str, Any]:
    return {e["name"]: e for e in container()["env"]}


def test_the_page_has_every_manifest() -> None:
    kinds = sorted(m["kind"] for m in manifests())
    assert kinds == ["Deployment", "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication"]


@pytest.mark.parametrize("kind", ["Deployment", "PodDisruptionBudget"])
def test_kubernetes_objects_match_the_schemas(kind: str) -> None:
    kubernetes_validate.validate(one(kind), K8S_VERSION, strict=True)


def test_the_schema_check_is_strict() -> None:
    deployment = one("Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_deployment_selector_probes_and_grace_period() -> None:
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # minAvailable would block every drain of a Deployment scaled to one replica.
    assert "maxUnavailable" in pdb["spec"] and "minAvailable" not in pdb["spec"]

    c, variables = container(), env()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": int(variables["WORKER_CORE_HEALTH__HTTP_PORT"]["value"])}
    assert variables["WORKER_CORE_HEALTH__HTTP_HOST"]["value"] == "0.0.0.0"
    probes = {
        name: c[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert {p["port"] for p in probes.values()} == {"health"}
    # Liveness must not depend on the database (an outage would restart every pod).
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    shutdown = float(variables["WORKER_CORE_QUEUE__SHUTDOWN_TIMEOUT"]["value"])
    assert grace >= shutdown + 10, "SIGKILL must not cut the graceful stop short"


def test_container_environment_is_a_valid_worker_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every WORKER_CORE_* variable is a real setting with a valid value."""
    for name, item in env().items():
        assert name.startswith("WORKER_CORE_"), name
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"]
            value = "postgresql://worker:secret@db.internal:5432/app"  # the secret's shape
        else:
            value = item["value"]
            assert isinstance(value, str), f"{name}: env values must be strings in YAML"
        monkeypatch.setenv(name, value)
    config = WorkerConfig(logging={"format": "json"})
    assert config.environment == "production"
    assert config.queue.name == "documents"
    assert config.health.http_port == 8080
    assert config.database.listen_dsn is not None


# -- KEDA ----------------------------------------------------------------------------
SCALED_OBJECT_SPEC = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
    "triggers",
}  # fmt: skip
TRIGGER_FIELDS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
# The PostgreSQL scaler: a query and a target, and a connection: a whole connection
# string (from the container's environment or a TriggerAuthentication) or its parts.
POSTGRES_METADATA = {
    "query", "targetQueryValue", "activationTargetQueryValue", "connectionFromEnv", "host",
    "port", "userName", "dbName", "sslmode", "passwordFromEnv", "metricName",
}  # fmt: skip


def test_keda_scaled_object_has_what_keda_requires() -> None:
    scaled = one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC, set(spec) - SCALED_OBJECT_SPEC
    assert spec["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    for key in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec.get(key, 0), int) and spec.get(key, 0) >= 0, key
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    triggers = spec["triggers"]
    assert triggers, "a ScaledObject needs at least one trigger"
    for trigger in triggers:
        assert set(trigger) <= TRIGGER_FIELDS, set(trigger) - TRIGGER_FIELDS
        assert trigger["type"] == "postgresql"
        check_postgresql_trigger(trigger)


def check_postgresql_trigger(trigger: dict[str, Any]) -> None:
    meta = trigger["metadata"]
    assert set(meta) <= POSTGRES_METADATA, set(meta) - POSTGRES_METADATA
    # KEDA reads trigger metadata as map[string]string: a bare YAML number fails.
    assert all(isinstance(v, str) for v in meta.values()), meta
    assert meta["query"].strip().upper().startswith("SELECT")
    assert float(meta["targetQueryValue"]) > 0
    float(meta.get("activationTargetQueryValue", "0"))
    # A connection: a connection string, or host + port + user + database (+ password).
    auth = trigger.get("authenticationRef")
    params: set[str] = set()
    if auth is not None:
        target = one(auth.get("kind", "TriggerAuthentication"))
        assert target["metadata"]["name"] == auth["name"]
        refs = target["spec"]["secretTargetRef"]
        assert all({"parameter", "name", "key"} <= set(ref) for ref in refs)
        params = {ref["parameter"] for ref in refs}
        assert params <= {"connection", "password"}, params
    if "connectionFromEnv" in meta:
        assert meta["connectionFromEnv"] in env(), "the variable must exist in the container"
    elif "connection" not in params:
        assert {"host", "port", "userName", "dbName"} <= set(meta)
        assert "password" in params or "passwordFromEnv" in meta


def test_keda_query_watches_the_workers_queue() -> None:
    query = one("ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    queue = env()["WORKER_CORE_QUEUE__NAME"]["value"]
    assert f"queue = '{queue}'" in query
    assert "worker_core.jobs" in query  # the default database.schema
