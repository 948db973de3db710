"""deploy/, validated offline: every kustomization rendered by kustomize and each object checked
against the Kubernetes schemas (kubernetes-validate) or its CRD's (KEDA's ScaledObject, the
Prometheus Operator's ServiceMonitor: tests/unit/crds, from their Go modules); the alert rules'
and the Grafana dashboard's expressions parsed (promql-parser) and checked against the metrics the
worker really exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

import worker.metrics  # noqa: F401 - registers every metric the worker exports

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = sorted(p.parent for p in KUBERNETES.rglob("kustomization.yaml"))
CRDS = Path(__file__).parent / "crds"
KUBERNETES_VERSION = "1.33.0"
PARTITIONS = 6  # the topic the examples name has six partitions


def kustomize() -> str:
    found = os.environ.get("KUSTOMIZE") or shutil.which("kustomize")
    built = ROOT / ".tools" / "bin" / "kustomize"  # `make tools` builds it where Go is
    if found is None and built.exists():
        found = str(built)
    if found is None:
        if shutil.which("go"):  # it can be built here: a missing one is a broken build, not a skip
            pytest.fail(f"no kustomize at {built}: `make tools` builds it (see .tools-build.log)")
        pytest.skip("no kustomize, and no Go to build it with (`make tools`)")
    return found


def render(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kustomize(), "build", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the openAPIV3Schema of each vendored CRD's served versions."""
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def check(obj: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in schemas:
        jsonschema.validate(obj, _closed(schemas[key]))
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def _closed(schema: Any) -> Any:
    """The CRD's schema with unknown fields refused, as the API server prunes and `kubectl apply
    --validate=strict` refuses them (a misspelt field would otherwise pass)."""
    if isinstance(schema, dict):
        closed = {k: _closed(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
        open_ended = "additionalProperties" in closed or schema.get("x-kubernetes-preserve-unknown-fields")
        if closed.get("type") == "object" and "properties" in closed and not open_ended:
            closed["additionalProperties"] = False
        return closed
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_each_kustomization_renders_and_every_object_is_valid(directory: Path) -> None:
    objects = render(directory)
    schemas = crd_schemas()
    for obj in objects:
        check(obj, schemas)
    kinds = {o["kind"] for o in objects}
    assert {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service"} <= kinds, kinds
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"livenessProbe", "readinessProbe", "startupProbe", "resources"} <= container.keys()
    config = next(o for o in objects if o["kind"] == "ConfigMap")["data"]
    grace = float(config.get("SHUTDOWN_GRACE_SECONDS", "30"))
    assert pod["terminationGracePeriodSeconds"] > grace + 5, "SIGKILL would cut the drain short"
    scaled = [o for o in objects if o["kind"] == "ScaledObject"]
    if scaled:
        assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
        assert all(s["spec"]["maxReplicaCount"] <= PARTITIONS for s in scaled), "more members than partitions"
    else:
        assert deployment["spec"].get("replicas", 1) <= PARTITIONS


def test_a_misspelt_field_is_caught() -> None:
    # The checks above can fail: a field the schema does not know is refused.
    objects = render(KUBERNETES / "overlays" / "keda-lag")
    scaled = next(o for o in objects if o["kind"] == "ScaledObject")
    scaled["spec"]["maxReplicaCont"] = 6
    with pytest.raises(jsonschema.ValidationError):
        check(scaled, crd_schemas())
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        check(deployment, crd_schemas())


def exported() -> set[str]:
    """Every series name the worker exports (counters with _total, histograms with their parts)."""
    names = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("ingest_"):
            continue
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_{part}" for part in ("bucket", "sum", "count")}
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (it must parse)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if type(node).__name__ == "VectorSelector" and node.name:
            names.add(node.name)
        for attribute in ("expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attribute, None)
            if child is not None and not isinstance(child, str | int | float):
                walk(child)
        for child in getattr(node, "args", None) or ():
            walk(child)

    walk(promql_parser.parse(expr.replace("$__rate_interval", "5m")))
    return names


def alert_rules() -> Iterator[dict[str, Any]]:
    document = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    for group in document["groups"]:
        assert group["name"] and group["rules"]
        yield from group["rules"]


def test_the_alert_rules_parse_and_watch_metrics_the_worker_exports() -> None:
    rules = list(alert_rules())
    recorded = {r["record"] for r in rules if "record" in r}
    known = exported() | recorded
    alerts = [r for r in rules if "alert" in r]
    assert alerts and len(alerts) + len(recorded) == len(rules)
    for rule in rules:
        name = rule.get("alert") or rule.get("record")
        if "record" in rule:
            assert set(rule) <= {"record", "expr", "labels"}, rule
            assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["record"]), rule
        else:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
            assert re.fullmatch(r"\d+[smh]", str(rule.get("for", "0s"))), rule
            assert "summary" in rule.get("annotations", {}), rule
        used = {n for n in metric_names(rule["expr"]) if n.startswith("ingest")}
        assert used, f"{name} watches none of the worker's metrics"
        assert used <= known, f"{name} names metrics the worker does not export: {used - known}"


def test_the_dashboard_shows_every_metric_and_only_those() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "ingest-worker.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    used = set().union(*(metric_names(e) for e in exprs))
    known = exported()
    assert used <= known, f"the dashboard names metrics the worker does not export: {sorted(used - known)}"
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in known}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families <= shown, f"metrics no panel shows: {sorted(families - shown)}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
