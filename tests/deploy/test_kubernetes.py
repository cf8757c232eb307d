"""The Kubernetes manifests (deploy/kubernetes), rendered and checked offline (issue 21).

``kubectl kustomize`` renders the base, both overlays and the prometheus-adapter rules.
Every object is validated against Kubernetes' own schemas (kubernetes-validate), the custom
resources (ServiceMonitor, PrometheusRule, ScaledObject) against their CRDs' schemas
(compiled into the @kubernetes-models npm packages, run by node), and checkov finds nothing
that is not skipped with a reason. The invariants a reviewer would check by eye are
asserted: the grace period outlasts the drain, the probes' paths, a locked-down security
context on every container, no secret value anywhere, a pinned image in production.

The autoscalers' PromQL: ``autoscaler_queries()`` renders prometheus-adapter's templates
(and takes KEDA's queries as they are) into plain expressions, which promtool evaluates here
on made-up series and tests/deploy/test_prometheus.py against a real Prometheus.

Each tool is looked for and its tests skipped, with the reason, where it is missing:
kubectl (with kustomize v5), kubernetes-validate (importable, or its command in
SLUICE_KUBERNETES_VALIDATE), node and the npm packages @kubernetes-models/prometheus-operator
and @kubernetes-models/keda (in SLUICE_CRD_MODELS/node_modules), checkov (SLUICE_CHECKOV or
on PATH), promtool (Debian: prometheus).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
RULES = ROOT / "deploy" / "monitoring" / "rules.yaml"
ADAPTER_CONFIG = KUBERNETES / "prometheus-adapter" / "config.yaml"
SCALED_OBJECT = KUBERNETES / "components" / "keda" / "scaledobject.yaml"
PROMETHEUS_RULE = KUBERNETES / "components" / "monitoring" / "prometheusrule.yaml"
RENDERINGS = {
    "base": KUBERNETES / "base",
    "production": KUBERNETES / "overlays" / "production",
    "keda": KUBERNETES / "overlays" / "keda",
    "prometheus-adapter": KUBERNETES / "prometheus-adapter",
}
APPLICATIONS = ["base", "production", "keda"]
OVERLAYS = ["production", "keda"]
NAMESPACE = "sluice"
# The labels the ServiceMonitor gives a pod's series (besides job="sluice", the Service's
# name), which the autoscalers' queries select by. A Prometheus scraping Sluice outside
# Kubernetes puts them on its target (static_configs labels) to run autoscaler_queries().
TARGET_LABELS = {"namespace": NAMESPACE, "pod": "sluice-0"}
# Oldest and newest Kubernetes the manifests are checked against.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
# checkov checks that fail only because the base is namespace-less and has no
# NetworkPolicy by design: every overlay sets the namespace and adds the policies.
BASE_ONLY_SKIPS = ["CKV_K8S_21", "CKV2_K8S_6"]


# ------------------------------------------------------------------------------------------
# The autoscalers' queries, as plain PromQL.

_TEMPLATE = re.compile(r"<<\s*\.(\w+)\s*>>")


def named_autoscaler_queries(
    namespace: str = NAMESPACE, pods: tuple[str, ...] = ("sluice-0",)
) -> dict[str, str]:
    """Every query an autoscaler runs, by where it comes from: prometheus-adapter's
    ``seriesQuery`` (``adapter:<metric>:series``) and ``metricsQuery`` filled in as the
    adapter does for an HPA asking about ``pods`` (``adapter:<metric>``), and each KEDA
    prometheus trigger's query (``keda:<trigger>``) in ``namespace``."""
    queries = {}
    for rule in yaml.safe_load(ADAPTER_CONFIG.read_text())["rules"]:
        metric = rule["name"]["as"]
        series_query = rule["seriesQuery"].strip()
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", series_query)
        assert series is not None, series_query
        values = {
            "Series": series.group(0),
            "LabelMatchers": f'namespace="{namespace}",pod=~"{"|".join(pods)}"',
            "GroupBy": "pod",
        }
        queries[f"adapter:{metric}:series"] = series_query
        queries[f"adapter:{metric}"] = _fill(" ".join(rule["metricsQuery"].split()), values)
    for trigger in yaml.safe_load(SCALED_OBJECT.read_text())["spec"]["triggers"]:
        if trigger["type"] == "prometheus":
            query = " ".join(trigger["metadata"]["query"].split())
            query = query.replace(f'namespace="{NAMESPACE}"', f'namespace="{namespace}"')
            queries[f"keda:{trigger['name']}"] = query
    return queries


def _fill(template: str, values: dict[str, str]) -> str:
    """prometheus-adapter's Go template, as far as its rules use it: <<.Name>> fields."""
    return _TEMPLATE.sub(lambda match: values[match.group(1)], template)


def autoscaler_queries(
    namespace: str = NAMESPACE, pods: tuple[str, ...] = ("sluice-0",)
) -> list[str]:
    """The autoscalers' queries as plain PromQL (see named_autoscaler_queries). Each returns
    a number for every pod (the adapter's) or one for the namespace (KEDA's) wherever the
    pods' series carry TARGET_LABELS and job="sluice"."""
    return list(dict.fromkeys(named_autoscaler_queries(namespace, pods).values()))


# ------------------------------------------------------------------------------------------
# Rendering.


def tool(name: str, env: str | None = None, hint: str = "") -> str:
    path = os.environ.get(env or "") or shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed{hint}")
    return path


@functools.cache
def _render(name: str) -> str:
    result = subprocess.run(
        [tool("kubectl", hint=" (kubectl kustomize renders the manifests)"), "kustomize",
         str(RENDERINGS[name])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_render(name)) if doc]


def of_kind(name: str, kind: str) -> list[dict[str, Any]]:
    return [obj for obj in rendered(name) if obj["kind"] == kind]


def the(name: str, kind: str, object_name: str = "sluice") -> dict[str, Any]:
    found = [obj for obj in of_kind(name, kind) if obj["metadata"]["name"] == object_name]
    assert len(found) == 1, (name, kind, object_name)
    return found[0]


def pod_specs(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in rendered(name):
        if obj["kind"] in ("Deployment", "Job"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", ()), *pod["containers"]]


def server_container(name: str) -> dict[str, Any]:
    spec = the(name, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "sluice")


def sluice_config(name: str) -> dict[str, Any]:
    config = yaml.safe_load(the(name, "ConfigMap", "sluice-config")["data"]["sluice.yaml"])
    assert isinstance(config, dict)
    return config


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item for item in container.get("env", ())}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# ------------------------------------------------------------------------------------------
# Rendering and schemas.

EXPECTED_KINDS = {
    "base": {"ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "Job"},
    "production": {"ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
                   "Job", "Namespace", "HorizontalPodAutoscaler", "ServiceMonitor",
                   "PrometheusRule", "NetworkPolicy"},
    "keda": {"ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "Job",
             "Namespace", "ScaledObject", "ServiceMonitor", "PrometheusRule", "NetworkPolicy"},
    "prometheus-adapter": {"ConfigMap"},
}  # fmt: skip


@pytest.mark.parametrize("name", RENDERINGS)
def test_renders_the_expected_objects(name: str) -> None:
    assert {obj["kind"] for obj in rendered(name)} == EXPECTED_KINDS[name]
    namespaces = {obj["metadata"].get("namespace") for obj in rendered(name)
                  if obj["kind"] != "Namespace"}  # fmt: skip
    expected = {"base": {None}, "prometheus-adapter": {"monitoring"}}.get(name, {NAMESPACE})
    assert namespaces == expected


def _kubernetes_validator() -> Any:
    try:
        import kubernetes_validate  # type: ignore[import-not-found]
    except ImportError:
        command = os.environ.get("SLUICE_KUBERNETES_VALIDATE")
        if not command:
            pytest.skip("kubernetes-validate is not installed (PyPI: kubernetes-validate)")

        def run(name: str, version: str) -> list[str]:
            result = subprocess.run(
                [command, "--strict", "--quiet", "-k", version, "-"],
                input=_render(name), capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            return [line for line in result.stdout.splitlines() if line.startswith("ERROR")]

        return run

    def validate(name: str, version: str) -> list[str]:
        errors = []
        for obj in rendered(name):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                # Only custom resources have no schema here (the CRD test checks them).
                assert obj["kind"] in CRD_MODELS, obj["kind"]
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")
        return errors

    return validate


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", RENDERINGS)
def test_every_object_fits_the_kubernetes_schema(name: str, version: str) -> None:
    assert _kubernetes_validator()(name, version) == []


CRD_MODELS = {
    "ServiceMonitor": "prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js",
    "PrometheusRule": "prometheus-operator/monitoring.coreos.com/v1/PrometheusRule.js",
    "ScaledObject": "keda/keda.sh/v1alpha1/ScaledObject.js",
}
# Reads [{kind, path, object}] on stdin, prints the errors of each object's CRD schema.
CRD_VALIDATOR = """
const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const errors = [];
for (const item of input) {
  const module = await import(item.path);
  try { new module[item.kind](item.object).validate(); }
  catch (e) { errors.push(`${item.kind}/${item.object.metadata.name}: ${e.message}`); }
}
console.log(JSON.stringify(errors));
"""


@pytest.mark.parametrize("name", OVERLAYS)
def test_custom_resources_fit_their_crd_schemas(name: str, tmp_path: Path) -> None:
    node = tool("node", hint=" (node runs the CRD schemas of @kubernetes-models)")
    models = Path(os.environ.get("SLUICE_CRD_MODELS", "/nonexistent")) / "node_modules"
    if not (models / "@kubernetes-models" / "keda").is_dir():
        pytest.skip(
            "set SLUICE_CRD_MODELS to a folder where `npm install "
            "@kubernetes-models/prometheus-operator@6 @kubernetes-models/keda@2` ran"
        )
    items = [
        {"kind": obj["kind"], "object": obj,
         "path": (models / "@kubernetes-models" / CRD_MODELS[obj["kind"]]).as_uri()}
        for obj in rendered(name) if obj["kind"] in CRD_MODELS
    ]  # fmt: skip
    custom = {"ServiceMonitor", "PrometheusRule"} | ({"ScaledObject"} if name == "keda" else set())
    assert {item["kind"] for item in items} == custom
    script = tmp_path / "validate.mjs"
    script.write_text(
        "import { createRequire } from 'module'; const require = createRequire(import.meta.url);"
        + CRD_VALIDATOR
    )
    result = subprocess.run(
        [node, str(script)], input=json.dumps(items), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", RENDERINGS)
def test_checkov_fails_nothing_and_every_skip_has_a_reason(name: str, tmp_path: Path) -> None:
    checkov = tool("checkov", "SLUICE_CHECKOV", " (PyPI: checkov, in a virtualenv of its own)")
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(_render(name))
    command = [checkov, "-f", str(manifest), "--framework", "kubernetes", "--skip-download",
               "-o", "json"]  # fmt: skip
    if name == "base":
        command += ["--skip-check", ",".join(BASE_ONLY_SKIPS)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 0
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert failed == []
    unexplained = [
        (c["check_id"], c["resource"])
        for c in report["results"]["skipped_checks"]
        if len(c["check_result"].get("suppress_comment", "")) < 20
    ]
    assert unexplained == []


# ------------------------------------------------------------------------------------------
# Invariants.


@pytest.mark.parametrize("name", APPLICATIONS)
def test_the_grace_period_outlasts_the_drain(name: str) -> None:
    server = sluice_config(name)["server"]
    pod = the(name, "Deployment")["spec"]["template"]["spec"]
    drain = float(server["drain_delay"]) + float(server["drain_timeout"])
    # A margin for the lifespan's shutdown (closing pools, the last usage write).
    assert pod["terminationGracePeriodSeconds"] >= drain + 20
    assert server["drain_delay"] > 0  # kube-proxy and ingresses need time to stop routing


@pytest.mark.parametrize("name", APPLICATIONS)
def test_the_probes_ask_the_right_endpoints_on_the_served_ports(name: str) -> None:
    server = sluice_config(name)["server"]
    container = server_container(name)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": server["port"], "metrics": server["metrics_port"]}
    paths = {probe: container[probe]["httpGet"]["path"]
             for probe in ("startupProbe", "livenessProbe", "readinessProbe")}  # fmt: skip
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                     "readinessProbe": "/readyz"}  # fmt: skip
    assert all(container[probe]["httpGet"]["port"] == "http" for probe in paths)
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # the model loads
    service = the(name, "Service")
    assert {port["targetPort"] for port in service["spec"]["ports"]} == set(ports)


@pytest.mark.parametrize("name", APPLICATIONS)
def test_every_container_runs_locked_down(name: str) -> None:
    for where, pod in pod_specs(name):
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in containers(pod):
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, (where, container["name"])
            assert context["runAsUser"] == 10001, (where, container["name"])
            assert context["readOnlyRootFilesystem"] is True, (where, container["name"])
            assert context["allowPrivilegeEscalation"] is False, (where, container["name"])
            assert context["capabilities"] == {"drop": ["ALL"]}, (where, container["name"])
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert "memory" in container["resources"]["limits"], (where, container["name"])
            assert "cpu" in container["resources"]["requests"], (where, container["name"])
            # The read-only root leaves data_dir and TMPDIR to volumes.
            mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
            assert {"/var/lib/sluice", "/tmp"} <= mounts, (where, container["name"])
    assert the(name, "ServiceAccount")["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", APPLICATIONS)
def test_the_config_is_mounted_as_a_directory_so_that_updates_arrive(name: str) -> None:
    deployment = the(name, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for container in containers(deployment["spec"]["template"]["spec"]):
        config_path = Path(env_of(container)["SLUICE_CONFIG"]["value"])
        mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
        assert "subPath" not in mount
        assert "subPathExpr" not in mount
        assert Path(mount["mountPath"]) == config_path.parent
        assert config_path.name in the(name, "ConfigMap", "sluice-config")["data"]
    assert volumes["config"]["configMap"]["name"] == "sluice-config"
    # A fixed name: an edit changes the mounted file instead of rolling every pod.
    assert sluice_config(name)["server"]["watch_config"] > 0


_SECRET_NAME = re.compile(r"(key|token|password|secret|_url)$", re.IGNORECASE)
_SECRET_LOOKING = [
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),  # API keys
    re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"),  # credentials in a URL
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def _references(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("file:", "os.environ/"))


def _settings_secrets(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if _SECRET_NAME.search(str(key)) and not isinstance(value, (dict, list)):
                yield f"{path}.{key}", value
            yield from _settings_secrets(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _settings_secrets(value, f"{path}[{index}]")


@pytest.mark.parametrize("name", RENDERINGS)
def test_no_secret_value_is_shipped(name: str) -> None:
    assert of_kind(name, "Secret") == []
    for pattern in _SECRET_LOOKING:
        assert pattern.search(_render(name)) is None, pattern.pattern
    for where, pod in pod_specs(name):
        for container in containers(pod):
            for item in container.get("env", ()):
                if _SECRET_NAME.search(item["name"]) and "value" in item:
                    assert _references(item["value"]), (where, item)
        for volume in pod["volumes"]:
            if "secret" in volume:
                assert set(volume["secret"]) <= {"secretName", "defaultMode", "items"}
    if name in APPLICATIONS:
        found = dict(_settings_secrets(sluice_config(name)))
        assert {".database_url", ".redis_url", ".auth.master_key"} <= set(found)
        assert {k: v for k, v in found.items() if not _references(v)} == {}


@pytest.mark.parametrize("name", OVERLAYS)
def test_production_pins_its_image(name: str) -> None:
    for where, pod in pod_specs(name):
        for container in containers(pod):
            image = container["image"]
            repository, _, tag = image.rpartition(":")
            assert "@sha256:" in image or (tag and tag != "latest" and "/" not in tag), image
            assert "/" in repository or "@" in image, f"{where}: no registry in {image}"


@pytest.mark.parametrize("name", APPLICATIONS)
def test_replicas_never_migrate_and_wait_for_the_job(name: str) -> None:
    pod = the(name, "Deployment")["spec"]["template"]["spec"]
    assert env_of(server_container(name))["SLUICE_MIGRATIONS"]["value"] == "require"
    (init,) = pod["initContainers"]
    assert init["args"][:2] == ["migrate", "--check"]
    assert "--wait" in init["args"]
    assert init["image"] == server_container(name)["image"]
    job = the(name, "Job", "sluice-migrate")
    spec = job["spec"]
    (migrate,) = spec["template"]["spec"]["containers"]
    assert migrate["args"][0] == "migrate"
    assert "--check" not in migrate["args"]
    assert migrate["image"] == init["image"]
    assert spec["backoffLimit"] <= 2
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "PreSync"
    # A PreSync hook runs before the application's other objects exist: it may need none.
    assert "serviceAccountName" not in spec["template"]["spec"]
    assert all("configMap" not in v for v in spec["template"]["spec"]["volumes"])
    # The Job reads the same database URL as the replicas.
    url = env_of(migrate)["SLUICE_DATABASE_URL"]["value"]
    assert url == sluice_config(name)["database_url"]


@pytest.mark.parametrize("name", APPLICATIONS)
def test_selectors_pick_the_servers_and_not_the_migrations(name: str) -> None:
    deployment = the(name, "Deployment")
    servers = deployment["spec"]["template"]["metadata"]["labels"]
    migrations = the(name, "Job", "sluice-migrate")["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": the(name, "Service")["spec"]["selector"],
        "PodDisruptionBudget": the(name, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    for constraint in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        selectors[constraint["topologyKey"]] = constraint["labelSelector"]["matchLabels"]
    for policy in of_kind(name, "NetworkPolicy"):
        if policy["metadata"]["name"] == "sluice":
            selectors["NetworkPolicy"] = policy["spec"]["podSelector"]["matchLabels"]
    assert {k: v for k, v in selectors.items() if not selects(v, servers)} == {}
    assert {k: v for k, v in selectors.items() if selects(v, migrations)} == {}
    for monitor in of_kind(name, "ServiceMonitor"):
        service = the(name, "Service")
        assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        ports = {port["name"] for port in service["spec"]["ports"]}
        assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} == {"metrics"}
        assert "metrics" in ports


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_autoscaler_owns_the_replica_count(name: str) -> None:
    assert "replicas" not in the(name, "Deployment")["spec"]
    adapter_metrics = {rule["name"]["as"] for rule in
                       yaml.safe_load(ADAPTER_CONFIG.read_text())["rules"]}  # fmt: skip
    if name == "production":
        (hpa,) = of_kind(name, "HorizontalPodAutoscaler")
        spec = hpa["spec"]
        bounds = spec["minReplicas"], spec["maxReplicas"]
        pods_metrics = {m["pods"]["metric"]["name"] for m in spec["metrics"] if m["type"] == "Pods"}
        assert pods_metrics == adapter_metrics
        behavior = spec["behavior"]
    else:
        assert of_kind(name, "HorizontalPodAutoscaler") == []
        (scaled,) = of_kind(name, "ScaledObject")
        spec = scaled["spec"]
        bounds = spec["minReplicaCount"], spec["maxReplicaCount"]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        for trigger in spec["triggers"]:
            if trigger["type"] == "prometheus":
                assert trigger["metricType"] == "AverageValue"
                assert float(trigger["metadata"]["threshold"]) > 0
        # The same behaviour as the HPA of the production overlay.
        assert behavior == the("production", "HorizontalPodAutoscaler")["spec"]["behavior"]
    assert 3 <= bounds[0] < bounds[1]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    # Every pod drains before the next goes: the PDB lets one go at a time.
    assert the(name, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_the_prometheus_rule_wraps_the_monitoring_rules() -> None:
    wrapped = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert wrapped["spec"] == yaml.safe_load(RULES.read_text()), (
        "run: python deploy/kubernetes/components/monitoring/make_prometheusrule.py"
    )
    assert the("production", "PrometheusRule")["spec"] == wrapped["spec"]


def test_the_config_file_is_valid_sluice_settings() -> None:
    from sluice.settings import ServerSettings, load_settings

    if "watch_config" not in ServerSettings.model_fields:
        pytest.skip("server.watch_config is not in this tree's settings yet")
    settings = load_settings(KUBERNETES / "base" / "sluice.yaml")
    assert settings.server.host == "0.0.0.0"
    assert settings.server.metrics_port is not None


# ------------------------------------------------------------------------------------------
# The autoscalers' queries, evaluated by promtool on made-up series.

_SERIES = {
    'sluice_in_flight_requests{job="sluice",namespace="sluice",pod="sluice-0"}': 10,
    'sluice_in_flight_requests{job="sluice",namespace="sluice",pod="sluice-1"}': 4,
    # Another namespace's Sluice: never counted.
    'sluice_in_flight_requests{job="sluice",namespace="other",pod="sluice-0"}': 99,
    # The embedded model's queue of sluice-0, per worker; sluice-1 has no embedded model.
    'sluice_engine_queue_depth{job="sluice",namespace="sluice",pod="sluice-0",pid="1"}': 1,
    'sluice_engine_queue_depth{job="sluice",namespace="sluice",pod="sluice-0",pid="2"}': 2,
}
_EXPECTED = {
    "adapter:sluice_in_flight_per_pod:series": {
        'sluice_in_flight_requests{job="sluice",namespace="sluice",pod="sluice-0"}': 10,
        'sluice_in_flight_requests{job="sluice",namespace="sluice",pod="sluice-1"}': 4,
        'sluice_in_flight_requests{job="sluice",namespace="other",pod="sluice-0"}': 99,
    },
    "adapter:sluice_in_flight_per_pod": {'{pod="sluice-0"}': 10, '{pod="sluice-1"}': 4},
    "adapter:sluice_engine_queue_per_pod": {'{pod="sluice-0"}': 3, '{pod="sluice-1"}': 0},
    "keda:in-flight": {"{}": 14},
    "keda:engine-queue": {"{}": 3},
}
_EXPECTED["adapter:sluice_engine_queue_per_pod:series"] = _EXPECTED[
    "adapter:sluice_in_flight_per_pod:series"
]


def test_the_autoscaler_queries_are_plain_promql() -> None:
    queries = named_autoscaler_queries(pods=("sluice-0", "sluice-1"))
    assert set(queries) == set(_EXPECTED)  # a new query needs its expectation here
    assert not [q for q in queries.values() if "<<" in q or ">>" in q]
    # prometheus-adapter finds pods by these labels (the ServiceMonitor's).
    for rule in yaml.safe_load(ADAPTER_CONFIG.read_text())["rules"]:
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        assert 'namespace!=""' in rule["seriesQuery"]
        assert 'pod!=""' in rule["seriesQuery"]
        assert re.fullmatch(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
    assert set(autoscaler_queries()) == set(named_autoscaler_queries().values())


def test_promtool_evaluates_the_autoscaler_queries(tmp_path: Path) -> None:
    promtool = tool("promtool", hint=" (Debian: apt-get install -y prometheus)")
    queries = named_autoscaler_queries(pods=("sluice-0", "sluice-1"))

    def samples(expected: dict[str, float]) -> list[dict[str, Any]]:
        return [{"labels": labels, "value": value} for labels, value in expected.items()]

    no_engine = {k: v for k, v in _SERIES.items() if "engine" not in k}
    tests = [
        {"interval": "15s",
         "input_series": [{"series": s, "values": f"{v}x4"} for s, v in _SERIES.items()],
         "promql_expr_test": [{"expr": queries[key], "eval_time": "30s",
                               "exp_samples": samples(_EXPECTED[key])} for key in queries]},
        # No embedded model anywhere: its queue reads 0 per pod, never nothing.
        {"interval": "15s",
         "input_series": [{"series": s, "values": f"{v}x4"} for s, v in no_engine.items()],
         "promql_expr_test": [
             {"expr": queries["adapter:sluice_engine_queue_per_pod"], "eval_time": "30s",
              "exp_samples": samples({'{pod="sluice-0"}': 0, '{pod="sluice-1"}': 0})},
             {"expr": queries["keda:engine-queue"], "eval_time": "30s",
              "exp_samples": samples({"{}": 0})}]},
    ]  # fmt: skip
    (tmp_path / "rules.yaml").write_text("groups: []\n")
    test_file = tmp_path / "autoscaler-test.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": tests}))
    result = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
