"""deploy/: Kubernetes manifests, the compose file, the Dockerfile and the Grafana dashboard, checked offline."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyOptions
from dockerfile_parse import DockerfileParser
from prometheus_client import REGISTRY

import gateway.metrics  # noqa: F401  (registers the gateway's metrics)
from gateway.policy import load, parse

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_is_valid_kubernetes(path: Path) -> None:
    for doc in docs(path):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_validator_catches_mistakes() -> None:
    doc = docs(K8S / "base" / "gateway-deployment.yaml")[0]
    bad = copy.deepcopy(doc)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_kustomizations_reference_every_file_and_only_existing_ones() -> None:
    referenced: set[Path] = set()
    for k in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(k.read_text())
        for entry in spec.get("resources", []) + spec.get("components", []):
            target = (k.parent / entry).resolve()
            assert target.exists(), f"{k}: {entry} does not exist"
            if target.is_file():
                referenced.add(target)
    assert {p.resolve() for p in MANIFESTS} == referenced


def test_gateway_deployment_contract() -> None:
    dep = docs(K8S / "base" / "gateway-deployment.yaml")[0]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"]["cpu"] and pod["terminationGracePeriodSeconds"] >= 180
    assert "--watch" in c["args"]  # the ConfigMap policy is picked up without restarts
    mount = next(m for m in c["volumeMounts"] if m["name"] == "policy")
    assert "subPath" not in mount  # subPath mounts never see ConfigMap updates
    env = {e["name"]: e for e in c["env"]}
    assert env["GATEWAY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "gateway-admin"
    # Prometheus scrapes the metrics listener (the serving port has no /metrics), on the pod's address
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"]) == env["GATEWAY_METRICS_PORT"]["value"]
    assert ports["metrics"] != ports["http"] and env["GATEWAY_METRICS_HOST"]["value"] == "0.0.0.0"
    svc = docs(K8S / "base" / "gateway-service.yaml")[0]
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]  # metrics never behind the Service
    kinds = {d["kind"] for p in MANIFESTS for d in docs(p)}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
        "StatefulSet",
    } <= kinds


def test_workers_ask_for_gpus_and_are_reachable_one_by_one() -> None:
    for tier in ("small", "frontier"):
        dep, svc = docs(K8S / "components" / "vllm" / f"vllm-{tier}.yaml")
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        assert svc["spec"]["clusterIP"] == "None" and svc["metadata"]["name"] == tier  # headless
        sim_dep, sim_svc = docs(K8S / "components" / "sim" / f"sim-{tier}.yaml")
        assert "nvidia.com/gpu" not in json.dumps(sim_dep)
        assert sim_svc["metadata"]["name"] == tier


def test_redis_is_persistent() -> None:
    _, sts = docs(K8S / "base" / "redis.yaml")
    assert "--appendonly" in sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]


def test_the_configmap_policy_is_the_deploy_policy_and_valid() -> None:
    cm = docs(K8S / "base" / "gateway-policy.yaml")[0]
    assert cm["data"]["policy.yaml"] == (DEPLOY / "policy.yaml").read_text()
    parse(cm["data"]["policy.yaml"], "configmap")
    load(DEPLOY / "policy.yaml")


def interpolated(text: str) -> str:
    """What docker compose does before validating: ${VAR:-default} becomes the default when unset."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: m.group(2) or "", text)


def test_compose_file_follows_the_compose_specification() -> None:
    compose = PyOptions(apply_merge=True).from_yaml(interpolated((DEPLOY / "compose.yaml").read_text()))
    compose.validate()
    spec = compose.to_dict()["services"]
    assert spec["gateway"]["deploy"]["replicas"] == 2
    assert spec["gateway"]["environment"]["GATEWAY_METRICS_HOST"] == "0.0.0.0"  # reachable on the compose network
    assert "ports" not in spec["gateway"]  # ... and only there
    assert "--appendonly" in spec["redis"]["command"]
    gpu = spec["vllm-small"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert spec["vllm-small"]["profiles"] == ["gpu"] and spec["sim-small"]["profiles"] == ["sim"]
    assert spec["sim-small"]["entrypoint"] == ["python", "-m", "workers.sim"]
    with pytest.raises(ValueError, match="expected u64"):
        PyOptions(apply_merge=True).from_yaml("services:\n  a:\n    image: x\n    deploy: {replicas: two}\n")


def test_dockerfile_is_slim_non_root_and_serves() -> None:
    df = DockerfileParser(path=str(DEPLOY / "Dockerfile"))
    stages: list[list[dict[str, Any]]] = []
    for instr in df.structure:
        if instr["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instr)
    final = stages[-1]
    by = {i["instruction"]: i["value"] for i in final}
    assert "slim" in by["FROM"]
    assert by["USER"] not in ("root", "0")
    assert json.loads(by["ENTRYPOINT"]) == ["gateway", "serve"]
    assert "/healthz" in by["HEALTHCHECK"]
    runs = " ".join(i["value"] for i in final if i["instruction"] == "RUN")
    assert not re.search(r"\b(gcc|g\+\+|build-essential|apt-get install)\b", runs)


def exported_names() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("gateway_"):
            continue
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "topk", "count", "max", "le", "without", "avg"}


def test_every_dashboard_expression_names_an_exported_metric() -> None:
    dash = json.loads((DEPLOY / "grafana" / "gateway-dashboard.json").read_text())
    exported = exported_names()
    assert {"gateway_requests_total", "gateway_cost_usd_total", "gateway_policy_info"} <= exported
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    for expr in exprs:
        bare = re.sub(r"\{[^}]*\}|\[[^]]*\]|\"[^\"]*\"", "", expr)
        used = {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare) if w not in PROMQL_WORDS}
        labels = {
            "tier",
            "tenant",
            "status",
            "scope",
            "limit",
            "from_tier",
            "to_tier",
            "worker",
            "revision",
            "phase",
            "reason",
        }
        metrics = used - labels
        assert metrics, expr
        assert metrics <= exported, f"{expr}: {metrics - exported}"


def test_the_redis_cluster_option_replaces_redis_and_puts_the_gateway_in_cluster_mode() -> None:
    component = K8S / "components" / "redis-cluster"
    spec = yaml.safe_load((component / "kustomization.yaml").read_text())
    patches = [yaml.safe_load(p["patch"]) for p in spec["patches"]]
    gateway = next(p for p in patches if p["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GATEWAY_REDIS_MODE"] == "cluster" and env["GATEWAY_REDIS_URL"].startswith("redis://redis-cluster:")
    assert env["GATEWAY_LEDGER_WAIT_REPLICAS"] == "1"
    assert {(p["kind"], p["metadata"]["name"]) for p in patches if p.get("$patch") == "delete"} == {
        ("StatefulSet", "redis"),
        ("Service", "redis"),
    }
    service, sts, job = docs(component / "redis-cluster.yaml")
    assert service["spec"]["clusterIP"] == "None" and sts["spec"]["replicas"] == 6
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--cluster-enabled") + 1] == "yes" and "--appendonly" in args
    assert "--cluster-replicas 1" in job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    overlay = yaml.safe_load((K8S / "overlays" / "sim-cluster" / "kustomization.yaml").read_text())
    assert "../../components/redis-cluster" in overlay["components"]
