"""The deployment artefacts under deploy/: Kustomize base and overlay, KEDA objects,
Prometheus rules and config, Grafana dashboard.

No cluster is needed: core objects are validated against the Kubernetes OpenAPI
schemas bundled by kubernetes-validate, KEDA objects against the CRDs' own
``openAPIV3Schema`` (closed, so unknown fields fail as a structural schema would
prune them), rules and config with promtool.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from streamcrawl.core import metrics as metrics_module
from streamcrawl.core.config import PREFIX, Settings
from streamcrawl.core.topics import (
    FETCH,
    FETCHED,
    FETCHER_GROUP,
    GROUP_INPUTS,
    HOST_PARTITIONS,
    WARC_GROUP,
    topic_name,
)
from streamcrawl.registry import STAGE_NAMES
from streamcrawl.stats import gauges as stats_gauges
from streamcrawl.stats import logic as stats_logic

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "base"
OVERLAY = DEPLOY / "overlays" / "example"
KEDA_CRDS = REPO.parent / "shared" / "keda"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"

K8S_VERSION = "1.31"
IMAGE = "ghcr.io/streamcrawl/streamcrawl"
METRICS_PORT = 9400

Obj = dict[str, Any]

# ---------------------------------------------------------------------------
# A tiny Kustomize: resources (files, directories), namespace, images, and
# patches given as partial objects (merged like a JSON merge patch: mappings
# merge, lists are replaced, null deletes). Anything else is refused rather than
# ignored; test_loader_matches_kubectl_kustomize checks it against the real one.
# ---------------------------------------------------------------------------

CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "StorageClass",
    "PersistentVolume",
    "ClusterTriggerAuthentication",
}
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}


def _is_builtin(obj: Obj) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def _merge(target: Any, patch: Any, builtin: bool) -> Any:
    if not isinstance(patch, dict) or not isinstance(target, dict):
        if isinstance(patch, list) and builtin:
            # A strategic merge patch merges lists of built-in kinds by key; not modelled.
            raise NotImplementedError("list in a patch of a built-in kind")
        return copy.deepcopy(patch)
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif key in merged:
            merged[key] = _merge(merged[key], value, builtin)
        else:
            merged[key] = (
                _merge({}, value, builtin) if isinstance(value, dict) else copy.deepcopy(value)
            )
    return merged


def _load_docs(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _pod_containers(obj: Obj) -> Iterator[Obj]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def render(directory: Path) -> list[Obj]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_KEYS
    assert not unsupported, f"{directory}: the test loader does not implement {unsupported}"
    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects.extend(render(path) if path.is_dir() else _load_docs(path))
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) <= {"path", "patch"}, f"unsupported patch form {patch_entry}"
        patches = (
            _load_docs(directory / patch_entry["path"])
            if "path" in patch_entry
            else [yaml.safe_load(patch_entry["patch"])]
        )
        for patch in patches:
            matches = [i for i, obj in enumerate(objects) if _key(obj) == _key(patch)]
            assert len(matches) == 1, f"patch {_key(patch)} matches {len(matches)} objects"
            index = matches[0]
            patch_body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
            patch_body["metadata"] = {
                k: v for k, v in patch["metadata"].items() if k not in ("name", "namespace")
            }
            objects[index] = _merge(objects[index], patch_body, _is_builtin(objects[index]))
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = namespace
            elif obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in _pod_containers(obj):
                name = re.split(r"[@]|:(?=[^/:]*$)", container["image"])[0]
                if name != image["name"]:
                    continue
                new_name = image.get("newName", name)
                if "digest" in image:
                    container["image"] = f"{new_name}@{image['digest']}"
                else:
                    tag = image.get("newTag", container["image"][len(name) + 1 :] or "latest")
                    container["image"] = f"{new_name}:{tag}"
    keys = [(_key(obj), obj["metadata"].get("namespace")) for obj in objects]
    assert len(keys) == len(set(keys)), f"{directory}: duplicate objects"
    return objects


def by_key(objects: list[Obj]) -> dict[tuple[str, str], Obj]:
    return {_key(obj): obj for obj in objects}


RENDERED = {"base": BASE, "overlay": OVERLAY}


@pytest.fixture(scope="module", params=sorted(RENDERED))
def rendered(request: pytest.FixtureRequest) -> list[Obj]:
    return render(RENDERED[request.param])


# ---------------------------------------------------------------------------
# KEDA CRD schemas, closed
# ---------------------------------------------------------------------------


def close_schema(schema: Any) -> Any:
    """Every object schema with ``properties`` rejects unknown fields, as a structural
    schema prunes them in a cluster (unless it preserves unknown fields)."""
    if isinstance(schema, list):
        return [close_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {
        key: close_schema(value)
        if key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf")
        else value
        for key, value in schema.items()
    }
    if "properties" in schema:
        closed["properties"] = {
            name: close_schema(sub) for name, sub in schema["properties"].items()
        }
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            closed["additionalProperties"] = False
    return closed


def _crd_schemas() -> dict[tuple[str, str], Obj]:
    schemas = {}
    for path in sorted(KEDA_CRDS.glob("*.yaml")):
        for crd in _load_docs(path):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schemas[(f"{group}/{version['name']}", kind)] = close_schema(
                    version["schema"]["openAPIV3Schema"]
                )
    return schemas


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], Obj]:
    if not KEDA_CRDS.is_dir():
        pytest.skip(f"KEDA CRDs not found at {KEDA_CRDS} (the shared checkout beside the repo)")
    schemas = _crd_schemas()
    assert ("keda.sh/v1alpha1", "ScaledObject") in schemas
    return schemas


def validate_custom(obj: Obj, schemas: dict[tuple[str, str], Obj]) -> None:
    schema = schemas[(obj["apiVersion"], obj["kind"])]
    jsonschema.Draft7Validator(schema).validate(obj)


def scaled_object(objects: list[Obj]) -> Obj:
    found = [obj for obj in objects if obj["kind"] == "ScaledObject"]
    assert len(found) == 1
    return found[0]


def config_data(objects: list[Obj]) -> dict[str, str]:
    data: dict[str, str] = by_key(objects)[("ConfigMap", "streamcrawl-config")]["data"]
    return data


# ---------------------------------------------------------------------------
# Kubernetes objects
# ---------------------------------------------------------------------------


def test_every_object_is_valid(
    rendered: list[Obj], crd_schemas: dict[tuple[str, str], Obj]
) -> None:
    kinds = set()
    for obj in rendered:
        kinds.add(obj["kind"])
        if (obj["apiVersion"], obj["kind"]) in crd_schemas:
            validate_custom(obj, crd_schemas)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert kinds == {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ScaledObject",
        "TriggerAuthentication",
        "PersistentVolumeClaim",
    }


def test_bad_core_object_is_rejected() -> None:
    deployment = copy.deepcopy(by_key(render(BASE))[("Deployment", "frontier")])
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment["spec"]["replicas"] = "3"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    misspelt = copy.deepcopy(by_key(render(BASE))[("Deployment", "frontier")])
    misspelt["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRefs"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, K8S_VERSION, strict=True)


def test_misspelt_scaled_object_is_rejected(crd_schemas: dict[tuple[str, str], Obj]) -> None:
    good = scaled_object(render(BASE))
    validate_custom(good, crd_schemas)
    spec_typo = copy.deepcopy(good)
    spec_typo["spec"]["maxReplicas"] = spec_typo["spec"].pop("maxReplicaCount")
    trigger_typo = copy.deepcopy(good)
    trigger_typo["spec"]["triggers"][0]["authRef"] = trigger_typo["spec"]["triggers"][0].pop(
        "authenticationRef"
    )
    not_a_string = copy.deepcopy(good)
    not_a_string["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 100
    for bad in (spec_typo, trigger_typo, not_a_string):
        with pytest.raises(jsonschema.ValidationError):
            validate_custom(bad, crd_schemas)


def test_scaled_object_matches_the_topic_contract(rendered: list[Obj]) -> None:
    so = scaled_object(rendered)
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] == "fetcher"
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= HOST_PARTITIONS
    assert spec["pollingInterval"] == 15 and spec["cooldownPeriod"] == 120
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert all(isinstance(value, str) for value in meta.values())
    settings = Settings.from_env(config_data(rendered))
    assert meta["consumerGroup"] == FETCHER_GROUP
    assert FETCH in GROUP_INPUTS[FETCHER_GROUP]
    assert meta["topic"] == topic_name(settings.topic_prefix, FETCH) == topic_name("crawl.", FETCH)
    assert meta["bootstrapServers"] == settings.kafka_bootstrap
    assert meta["version"] and re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert int(meta["lagThreshold"]) == 100 and int(meta["activationLagThreshold"]) == 1
    assert meta["offsetResetPolicy"] == "earliest"
    # One host's backlog is one partition's: only partitions with lag may add replicas
    # (KEDA refuses this together with allowIdleConsumers).
    assert meta["limitToPartitionsWithLag"] == "true" and meta["allowIdleConsumers"] == "false"
    auth = by_key(rendered)[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    params = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert set(params) == {"sasl", "username", "password", "tls", "ca"}
    assert {ref["name"] for ref in params.values()} == {"kafka-credentials"}
    assert so["metadata"]["namespace"] == auth["metadata"]["namespace"]


def test_only_keda_scales_the_fetcher(rendered: list[Obj]) -> None:
    hpas = [obj for obj in rendered if obj["kind"] == "HorizontalPodAutoscaler"]
    assert [hpa["spec"]["scaleTargetRef"]["name"] for hpa in hpas] == ["parser"]
    (parser_hpa,) = hpas
    assert parser_hpa["apiVersion"] == "autoscaling/v2"
    assert parser_hpa["spec"]["maxReplicas"] <= HOST_PARTITIONS  # partitions of crawl.fetched
    assert FETCHED in GROUP_INPUTS["streamcrawl-parser"]
    assert parser_hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    deployments = by_key(rendered)
    # Autoscaled Deployments leave replicas to their autoscaler (apply would fight it).
    assert "replicas" not in deployments[("Deployment", "fetcher")]["spec"]
    assert "replicas" not in deployments[("Deployment", "parser")]["spec"]


def test_config_map_holds_known_settings(rendered: list[Obj]) -> None:
    data = config_data(rendered)
    known = {PREFIX + name.upper() for name in Settings.__dataclass_fields__}
    assert set(data) <= known, set(data) - known
    settings = Settings.from_env(data)
    assert settings.metrics_port == METRICS_PORT
    assert {"STREAMCRAWL_KAFKA_BOOTSTRAP", "STREAMCRAWL_MONGO_URI"} <= set(data)


def _effective(container: Obj, pod: Obj, field: str) -> Any:
    return container.get("securityContext", {}).get(
        field, pod.get("securityContext", {}).get(field)
    )


def test_deployments(rendered: list[Obj]) -> None:
    objects = by_key(rendered)
    deployments = {name: obj for (kind, name), obj in objects.items() if kind == "Deployment"}
    assert set(deployments) == set(STAGE_NAMES)
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"].startswith(IMAGE + ":")
        assert container["args"] == ["run", name]
        assert {"configMapRef": {"name": "streamcrawl-config"}} in container["envFrom"]
        # The stage's own shutdown deadline fits in the pod's grace period, and each pod
        # is a static group member named after itself.
        grace = Settings.from_env(config_data(rendered)).shutdown_grace
        assert grace + 5 <= pod["terminationGracePeriodSeconds"] == 30
        member = {
            "name": "STREAMCRAWL_INSTANCE_ID",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        }
        # stats is a faust worker (one replica, Recreate): faust has no static membership.
        assert (member in container["env"]) == (name != "stats")
        # security
        assert _effective(container, pod, "runAsNonRoot") is True
        assert _effective(container, pod, "runAsUser") == 10001
        assert _effective(container, pod, "seccompProfile") == {"type": "RuntimeDefault"}
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert not context.get("capabilities", {}).get("add")
        assert not context.get("privileged")
        # writable /tmp on a read-only root
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]]
        # probes on the named metrics port
        assert {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"} in container[
            "ports"
        ]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert "requests" in container["resources"] and "limits" in container["resources"]
        # selector matches the template, and a Service and a PDB select the same pods
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        service = objects[("Service", f"{name}-metrics")]
        assert service["spec"]["selector"] == selector
        (port,) = service["spec"]["ports"]
        assert port["name"] == "metrics" and port["port"] == METRICS_PORT
        assert port["targetPort"] in ("metrics", METRICS_PORT)
        annotations = service["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(METRICS_PORT)
        assert annotations["prometheus.io/path"] == "/metrics"
        pdb = objects[("PodDisruptionBudget", name)]
        assert pdb["spec"]["selector"]["matchLabels"] == selector
        # a single replica must stay evictable, or node drains hang
        assert "maxUnavailable" in pdb["spec"] or pdb["spec"]["minAvailable"] == 0


def test_warc_writes_to_its_claim(rendered: list[Obj]) -> None:
    objects = by_key(rendered)
    spec = objects[("Deployment", "warc")]["spec"]
    # One writer per ReadWriteOnce claim: no surge pod during a rollout.
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    claim = {volume["name"]: volume for volume in pod["volumes"]}["warc"]["persistentVolumeClaim"]
    assert env["STREAMCRAWL_WARC_DIR"] == mounts["warc"]
    pvc = objects[("PersistentVolumeClaim", claim["claimName"])]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    assert Settings.from_env({**config_data(rendered), **env}).warc_dir == mounts["warc"]
    assert GROUP_INPUTS[WARC_GROUP] == (FETCHED,)


def _mounted_files(pod: Obj, container: Obj) -> dict[str, tuple[str, str]]:
    """Path of each file a container sees from a Secret -> (Secret name, key)."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    files = {}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        assert mount.get("readOnly") is True
        for item in secret["items"]:
            files[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    return files


def test_stages_read_kafka_credentials_from_the_secret_keda_reads(rendered: list[Obj]) -> None:
    objects = by_key(rendered)
    settings = Settings.from_env(config_data(rendered))
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    auth = objects[("TriggerAuthentication", "kafka-auth")]
    keda_secrets = {ref["name"] for ref in auth["spec"]["secretTargetRef"]}
    (kafka_secret,) = keda_secrets
    # No credential is committed: the Secrets are made in the cluster (deploy/README.md).
    assert not [obj for obj in rendered if obj["kind"] == "Secret"]
    for name in STAGE_NAMES:
        pod = objects[("Deployment", name)]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        files = _mounted_files(pod, container)
        assert files[settings.kafka_sasl_password_file] == (kafka_secret, "password")
        assert files[settings.kafka_ssl_cafile] == (kafka_secret, "ca")
        env = {item["name"]: item for item in container.get("env", [])}
        user = env[PREFIX + "KAFKA_SASL_USERNAME"]["valueFrom"]["secretKeyRef"]
        assert user == {"name": kafka_secret, "key": "username"}
        # Passwords travel as files only, never as environment variables.
        assert not [
            item
            for item in container.get("env", [])
            if "PASSWORD" in item["name"] and not item["name"].endswith("_FILE")
        ]


def test_the_sink_reads_the_mongo_password_from_a_mounted_secret(rendered: list[Obj]) -> None:
    objects = by_key(rendered)
    pod = objects[("Deployment", "sink")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    path = env[PREFIX + "MONGO_PASSWORD_FILE"]
    assert _mounted_files(pod, container)[path] == ("mongo-credentials", "password")
    uri = config_data(rendered)[PREFIX + "MONGO_URI"]
    assert re.match(r"mongodb://[^:@/]+@", uri), "the URI names the user, without a password"


def test_fetcher_resources(rendered: list[Obj]) -> None:
    fetcher = by_key(rendered)[("Deployment", "fetcher")]
    resources = fetcher["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {
        "requests": {"cpu": "1", "memory": "512Mi"},
        "limits": {"cpu": "2", "memory": "1Gi"},
    }


def test_everything_in_one_namespace(rendered: list[Obj]) -> None:
    (namespace,) = [obj for obj in rendered if obj["kind"] == "Namespace"]
    name = namespace["metadata"]["name"]
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == name, _key(obj)


def test_overlay_changes() -> None:
    base, overlay = by_key(render(BASE)), by_key(render(OVERLAY))
    assert base.keys() - {("Namespace", "streamcrawl")} == overlay.keys() - {
        ("Namespace", "streamcrawl-example")
    }
    assert overlay[("Namespace", "streamcrawl-example")]
    assert (
        config_data(render(OVERLAY))["STREAMCRAWL_KAFKA_BOOTSTRAP"]
        != config_data(render(BASE))["STREAMCRAWL_KAFKA_BOOTSTRAP"]
    )
    assert scaled_object(render(OVERLAY))["spec"]["maxReplicaCount"] <= HOST_PARTITIONS


def test_loader_matches_kubectl_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the test loader is not cross-checked")
    for directory in RENDERED.values():
        result = subprocess.run(
            [kubectl, "kustomize", str(directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        real = {
            (_key(o), o["metadata"].get("namespace")): o
            for o in yaml.safe_load_all(result.stdout)
            if o
        }
        ours = {(_key(o), o["metadata"].get("namespace")): o for o in render(directory)}
        assert real == ours


def test_loader_refuses_list_patches_of_builtin_kinds() -> None:
    with pytest.raises(NotImplementedError):
        _merge(
            {"spec": {"containers": [{"name": "a"}]}},
            {"spec": {"containers": [{"name": "a", "image": "x"}]}},
            builtin=True,
        )


# ---------------------------------------------------------------------------
# Prometheus and Grafana
# ---------------------------------------------------------------------------


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return promtool


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def test_promtool_check_rules() -> None:
    result = _run(_promtool(), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config() -> None:
    result = _run(_promtool(), "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_service_on_the_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert {f"{name}:{METRICS_PORT}" for name in STAGE_NAMES} <= targets
    assert [Path(rule).name for rule in config["rule_files"]] == [ALERTS.name]


def _alert_rules() -> dict[str, Obj]:
    return {
        rule["alert"]: rule
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def _expected(name: str) -> dict[str, Any]:
    rule = _alert_rules()[name]
    return {"exp_labels": rule.get("labels", {}), "exp_annotations": rule.get("annotations", {})}


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool unit tests of the rules on synthetic series: each alert fires on the
    bad case and stays silent on the good one."""
    promtool = _promtool()
    lag = 'streamcrawl_consumer_lag{group="streamcrawl-fetcher",topic="crawl.fetch",partition="0"}'
    tests = [
        {  # lag grows, nothing stored: both alerts
            "interval": "1m",
            "input_series": [
                {"series": lag, "values": "0+10x60"},
                {"series": "streamcrawl_pages_stored_total", "values": "100x60"},
            ],
            "alert_rule_test": [
                {
                    "eval_time": "40m",
                    "alertname": "StreamcrawlFetchLagGrowing",
                    "exp_alerts": [_expected("StreamcrawlFetchLagGrowing")],
                },
                {
                    "eval_time": "40m",
                    "alertname": "StreamcrawlNoProgress",
                    "exp_alerts": [_expected("StreamcrawlNoProgress")],
                },
            ],
        },
        {  # steady lag, pages stored: neither
            "interval": "1m",
            "input_series": [
                {"series": lag, "values": "50x60"},
                {"series": "streamcrawl_pages_stored_total", "values": "0+30x60"},
            ],
            "alert_rule_test": [
                {"eval_time": "40m", "alertname": "StreamcrawlFetchLagGrowing", "exp_alerts": []},
                {"eval_time": "40m", "alertname": "StreamcrawlNoProgress", "exp_alerts": []},
            ],
        },
    ]
    for name in ("StreamcrawlFetchLagGrowing", "StreamcrawlNoProgress"):
        assert "{{" not in json.dumps(_expected(name)), f"{name}: templated annotations"
    spec = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests}
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(yaml.safe_dump(spec))
    result = _run(promtool, "test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def _core_metrics() -> dict[str, set[str]]:
    """Every series name streamcrawl.core.metrics exposes, with its label names."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "summary": ("_sum", "_count"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    exposed: dict[str, set[str]] = {}
    for value in vars(metrics_module).values():
        describe = getattr(value, "describe", None)
        if describe is None or not hasattr(value, "_labelnames"):
            continue
        for family in describe():
            for suffix in suffixes[family.type]:
                labels = set(value._labelnames) | ({"le"} if suffix == "_bucket" else set())
                exposed[family.name + suffix] = labels
    return exposed


def _stats_crawl_metrics() -> dict[str, set[str]]:
    """Every series the stats stage's crawl gauges expose, with their label names: what
    a real registry collects from ``crawl_gauges`` for a crawl that has every count."""
    crawl = stats_logic.CrawlTotals("c1")
    crawl.merge(
        {
            "c": {
                "discovered": 3,
                "stored": 2,
                "bytes": 10,
                "cancelled": 1,
                "failed:fetcher:gave_up": 1,
                "filtered:scope": 1,
            },
            "f": 1000.0,
            "l": 1010.0,
            "m": {"16": 2},
        }
    )

    class Collect(Collector):
        def collect(self) -> Iterator[Metric]:
            yield from stats_gauges.crawl_gauges({"c1": crawl}, 1020.0)

    registry = CollectorRegistry()
    registry.register(Collect())
    exposed: dict[str, set[str]] = {}
    for family in registry.collect():
        assert family.type == "gauge" and family.samples, family.name
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    return exposed


def _exposed_metrics() -> dict[str, set[str]]:
    """Every series name the code exposes (streamcrawl.core.metrics and the stats stage's
    crawl gauges), with its label names."""
    exposed = _core_metrics()
    crawl = _stats_crawl_metrics()
    assert not set(exposed) & set(crawl)
    return {**exposed, **crawl}


def test_exposed_metric_names_are_what_we_think() -> None:
    exposed = _exposed_metrics()
    assert "streamcrawl_pages_stored_total" in exposed
    assert "streamcrawl_fetch_duration_seconds_bucket" in exposed
    assert exposed["streamcrawl_consumer_lag"] == {"group", "topic", "partition"}
    assert exposed["streamcrawl_urls_cancelled_total"] == {"stage"}
    assert "streamcrawl_pages_stored" not in exposed
    assert exposed["streamcrawl_crawl_urls"] == {"crawl_id", "step"}
    assert exposed["streamcrawl_crawl_state"] == {"crawl_id", "state"}
    assert exposed["streamcrawl_crawl_failed"] == {"crawl_id", "stage", "reason"}
    for name in (
        "streamcrawl_crawl_bytes",
        "streamcrawl_crawl_pages_per_second",
        "streamcrawl_crawl_last_activity_seconds",
    ):
        assert exposed[name] == {"crawl_id"}
    # The crawl gauges are labelled by crawl id and small fixed sets, never a host.
    for name, labels in exposed.items():
        assert not labels & {"host", "url"}, name


def _dashboard() -> Obj:
    dashboard: Obj = json.loads(DASHBOARD.read_text())
    return dashboard


def _query_panels() -> list[Obj]:
    """The panels that query (rows only group them)."""
    return [panel for panel in _dashboard()["panels"] if panel["type"] != "row"]


def _variables() -> dict[str, Obj]:
    return {variable["name"]: variable for variable in _dashboard()["templating"]["list"]}


def _all_exprs() -> list[tuple[str, str]]:
    exprs = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in _query_panels()
        for target in panel["targets"]
    ]
    exprs += [
        (f"variable {name}", variable["query"])
        for name, variable in _variables().items()
        if variable["type"] == "query"
    ]
    exprs += [(f"alert {name}", rule["expr"]) for name, rule in _alert_rules().items()]
    return exprs


def _overlap(a: Obj, b: Obj) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def test_dashboard_panels() -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        if panel["type"] == "row":
            # An open row: the panels it groups are top-level panels below it.
            assert panel["title"] and panel["collapsed"] is False and panel["panels"] == []
            assert "targets" not in panel
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"]
    for index, panel in enumerate(panels):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for other in panels[index + 1 :]:
            assert not _overlap(panel["gridPos"], other["gridPos"]), (
                panel["title"],
                other["title"],
            )
    exprs = " ".join(expr for _, expr in _all_exprs())
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.95," in exprs
    assert 'kube_deployment_status_replicas{deployment="fetcher"}' in exprs
    assert ("Deployment", "fetcher") in by_key(render(BASE))


STATS_GAUGE = re.compile(r"\bstreamcrawl_crawl_[a-z0-9_]+")


def test_dashboard_crawl_variable() -> None:
    variables = _variables()
    crawl = variables["crawl_id"]
    assert crawl["type"] == "query"
    assert crawl["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    match = re.fullmatch(
        r"label_values\((streamcrawl_crawl_[a-z0-9_]+),\s*crawl_id\)", crawl["query"]
    )
    assert match, crawl["query"]
    assert crawl["definition"] == crawl["query"]
    assert "crawl_id" in _stats_crawl_metrics()[match.group(1)]
    assert crawl["multi"] is True and crawl["includeAll"] is True
    assert crawl["allValue"] == ".*"  # All: every crawl, also one newer than the list
    assert crawl["refresh"] in (1, 2)  # new crawls appear without editing the dashboard


def _per_crawl_panels() -> list[Obj]:
    """The panels of the per-crawl row: those below it."""
    panels = _dashboard()["panels"]
    (row,) = [panel for panel in panels if panel["type"] == "row" and "crawl" in panel["title"]]
    return [
        panel
        for panel in panels
        if panel["type"] != "row" and panel["gridPos"]["y"] > row["gridPos"]["y"]
    ]


def test_dashboard_per_crawl_view() -> None:
    per_crawl = _per_crawl_panels()
    assert len(per_crawl) >= 6
    crawl_gauges = set(_stats_crawl_metrics())
    for panel in _query_panels():
        exprs = [target["expr"] for target in panel["targets"]]
        if panel not in per_crawl:  # the crawl gauges are shown per crawl only
            assert not any(STATS_GAUGE.search(expr) for expr in exprs), panel["title"]
            continue
        for target in panel["targets"]:
            expr = target["expr"]
            selectors = re.findall(r"\b(streamcrawl_[a-z0-9_]+)(\{[^}]*\})?", expr)
            assert selectors, f"{panel['title']}: no streamcrawl metric"
            for name, selector in selectors:
                # Only the stats stage's crawl gauges carry crawl_id.
                assert name in crawl_gauges, f"{panel['title']}: {name} has no crawl_id"
                assert 'crawl_id=~"$crawl_id"' in selector, f"{panel['title']}: {expr}"
            # Each crawl stays its own series (or table row).
            by = re.findall(r"\bby\s*\(([^)]*)\)", expr)
            assert by and all("crawl_id" in clause for clause in by), expr
            if target.get("format") == "table":
                assert target["instant"] is True
            else:
                assert "{{crawl_id}}" in target["legendFormat"], panel["title"]
    exprs = " ".join(target["expr"] for panel in per_crawl for target in panel["targets"])
    for step in ("discovered", "fetched", "stored", "filtered", "cancelled", "failed"):
        assert re.search(rf'step=~?"[^"]*\b{step}\b', exprs), step
    assert {
        "streamcrawl_crawl_urls",
        "streamcrawl_crawl_pages_per_second",
        "streamcrawl_crawl_bytes",
        "streamcrawl_crawl_state",
        "streamcrawl_crawl_failed",
        "streamcrawl_crawl_last_activity_seconds",
    } <= set(STATS_GAUGE.findall(exprs))
    # the state table shows the state that is 1, joined with the other columns by crawl
    (table,) = [panel for panel in per_crawl if panel["type"] == "table"]
    assert any(
        "streamcrawl_crawl_state" in target["expr"] and target["expr"].endswith("== 1")
        for target in table["targets"]
    )
    joins = [t for t in table["transformations"] if t["id"] == "joinByField"]
    assert joins and joins[0]["options"]["byField"] == "crawl_id"


def _two_crawls_series() -> list[Obj]:
    """promtool input series: the stats stage's crawl gauges for a running crawl "shop"
    and an idle crawl "blog" (both with a failure), as crawl_gauges exports them; the
    byte totals grow, the rest stays."""
    now = 10_000.0
    totals = stats_logic.crawl_totals(
        [
            (
                stats_logic.crawl_key(crawl_id, "crawl.events", 0),
                {
                    "o": 0,
                    "c": {"discovered": 5, "stored": 3, "bytes": 100, "cancelled": 1},
                    "f": now - 300,
                    "l": last,
                    "m": {str(int(now // 60) - 1): 3},
                },
            )
            for crawl_id, last in (("shop", now - 5), ("blog", now - 100))
        ]
        + [
            (
                stats_logic.crawl_key(crawl_id, "crawl.dlq", 0),
                {"o": 0, "c": {"failed:fetcher:gave_up": 1}},
            )
            for crawl_id in ("shop", "blog")
        ]
    )
    series = []
    for family in stats_gauges.crawl_gauges(totals, now):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            grow = "+100" if sample.name == "streamcrawl_crawl_bytes" else "+0"
            series.append(
                {"series": f"{sample.name}{{{labels}}}", "values": f"{sample.value:g}{grow}x30"}
            )
    return series


def test_per_crawl_queries_select_the_chosen_crawls(tmp_path: Path) -> None:
    """Every per-crawl query, with $crawl_id one crawl and then All (.*), evaluated by
    promtool on the crawl gauges of two crawls: it parses and returns series of exactly
    the crawls chosen; the state table's query returns each crawl's one state."""
    promtool = _promtool()
    exprs = [target["expr"] for panel in _per_crawl_panels() for target in panel["targets"]]
    tests = []
    for chosen, crawls in (("shop", 1), (_variables()["crawl_id"]["allValue"], 2)):
        for expr in exprs:
            query = expr.replace("$crawl_id", chosen).replace("$__rate_interval", "5m")
            tests.append(
                {
                    "expr": f"count(count by (crawl_id) ({query}))",
                    "eval_time": "20m",
                    "exp_samples": [{"labels": "{}", "value": crawls}],
                }
            )
    (state_query,) = [expr for expr in exprs if "streamcrawl_crawl_state" in expr]
    tests.append(
        {
            "expr": state_query.replace("$crawl_id", ".*"),
            "eval_time": "20m",
            "exp_samples": [
                {"labels": '{crawl_id="blog", state="idle"}', "value": 1},
                {"labels": '{crawl_id="shop", state="running"}', "value": 1},
            ],
        }
    )
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": _two_crawls_series(), "promql_expr_test": tests}
        ],
    }
    test_file = tmp_path / "per_crawl_test.yml"
    test_file.write_text(yaml.safe_dump(spec))
    result = _run(promtool, "test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promql_uses_only_existing_metrics_and_labels() -> None:
    exposed = _exposed_metrics()
    groups = set(GROUP_INPUTS)
    scrape_labels = {"job", "instance", "service"}
    used = set()
    for where, expr in _all_exprs():
        for name in re.findall(r"\bstreamcrawl_[a-z0-9_]+", expr):
            used.add(name)
            assert name in exposed, f"{where}: {name} is not exposed by streamcrawl"
        for name, selector in re.findall(r"\b(streamcrawl_[a-z0-9_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", selector):
                assert label in exposed[name] | scrape_labels, f"{where}: {name} has no {label}"
        names = re.findall(r"\b(streamcrawl_[a-z0-9_]+)", expr)
        if names and "kube_" not in expr:  # aggregation labels must exist on some series
            available = scrape_labels.union(*(exposed[name] for name in names))
            for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
                for label in filter(None, (item.strip() for item in clause.split(","))):
                    assert label in available, f"{where}: no series has label {label}"
        for group in re.findall(r'\bgroup\s*=\s*"([^"]+)"', expr):
            assert group in groups, f"{where}: unknown consumer group {group}"
    assert {
        "streamcrawl_consumer_lag",
        "streamcrawl_dlq_records_total",
        "streamcrawl_fetch_requests_total",
        "streamcrawl_pages_stored_total",
        "streamcrawl_fetch_duration_seconds_bucket",
    } <= used


def test_grafana_provisioning() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "streamcrawl.yml").read_text())
    assert providers["providers"][0]["options"]["path"]
