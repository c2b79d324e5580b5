"""docker-compose.yml: valid for docker-compose (no engine needed) and complete."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from streamcrawl.core.config import PREFIX, Settings
from streamcrawl.registry import STAGE_NAMES

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


def _run_compose(compose: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [compose, "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )


def _config() -> dict[str, Any]:
    """The file as docker-compose resolves it (anchors, merges), or as YAML without it."""
    compose = shutil.which("docker-compose")
    if compose is None:
        data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
        return data
    result = _run_compose(compose, "config")
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Any] = yaml.safe_load(result.stdout)
    return resolved


def test_compose_config_is_valid() -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    result = _run_compose(compose, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_services() -> None:
    services = _config()["services"]
    assert {"kafka", "mongo", "prometheus", "grafana", "topics", *STAGE_NAMES} <= set(services)
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["mongo"]["image"] == "mongo:8.0"
    assert services["topics"]["command"] == ["topics", "create"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    known = {PREFIX + name.upper() for name in Settings.__dataclass_fields__}
    for stage in STAGE_NAMES:
        service = services[stage]
        assert "build" in service, stage
        assert service["command"] == ["run", stage]
        env = service["environment"]
        assert set(env) <= known, set(env) - known
        assert env["STREAMCRAWL_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["STREAMCRAWL_MONGO_URI"] == "mongodb://mongo:27017/"
        assert str(env["STREAMCRAWL_METRICS_PORT"]) == "9400"
        Settings.from_env({key: str(value) for key, value in env.items()})
        depends = service["depends_on"]
        assert depends["kafka"]["condition"] == "service_healthy"
        assert depends["topics"]["condition"] == "service_completed_successfully"
    assert services["sink"]["depends_on"]["mongo"]["condition"] == "service_healthy"
    # The warc stage writes its files to a named volume, mounted where WARC_DIR points.
    warc = services["warc"]
    volumes = warc["volumes"]
    targets = [str(v["target"] if isinstance(v, dict) else v.split(":")[1]) for v in volumes]
    assert warc["environment"]["STREAMCRAWL_WARC_DIR"] in targets
    assert "warc-data" in _config()["volumes"]


def _published(port: Any) -> str:
    if isinstance(port, dict):  # docker-compose config's long form
        return str(port.get("published"))
    return str(port).split(":")[-2]


def test_kafka_listeners() -> None:
    kafka = _config()["services"]["kafka"]
    env = kafka["environment"]
    assert "broker" in env["KAFKA_PROCESS_ROLES"] and "controller" in env["KAFKA_PROCESS_ROLES"]
    advertised = env["KAFKA_ADVERTISED_LISTENERS"]
    assert "//kafka:9092" in advertised and ":9094" in advertised
    assert "9094" in [_published(port) for port in kafka["ports"]]
    assert len(env["CLUSTER_ID"]) == 22  # a base64url UUID


def test_monitoring_mounts() -> None:
    services = _config()["services"]
    prometheus_mounts = " ".join(str(v) for v in services["prometheus"]["volumes"])
    grafana_mounts = " ".join(str(v) for v in services["grafana"]["volumes"])
    assert "deploy/prometheus" in prometheus_mounts
    assert "deploy/grafana/provisioning" in grafana_mounts
    assert "dashboard.json" in grafana_mounts
