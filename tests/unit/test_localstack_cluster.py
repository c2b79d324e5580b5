"""The local stack's cluster and secured modes as configuration (no server started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamcrawl.core.topics import replication_for
from streamcrawl.localstack.stack import LocalStack, StackConfig, StackError


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_replication_is_three_with_min_insync_two_where_brokers_allow() -> None:
    assert [replication_for(n) for n in (0, 1, 2, 3, 5)] == [
        (1, 1),
        (1, 1),
        (2, 1),
        (3, 2),
        (3, 2),
    ]


def test_three_nodes_take_the_next_port_pairs_and_form_one_quorum(tmp_path: Path) -> None:
    config = StackConfig(data_dir=tmp_path, kafka_port=30000, controller_port=30001, brokers=3)
    nodes = config.kafka_nodes()
    assert [(n.name, n.port, n.controller_port) for n in nodes] == [
        ("kafka", 30000, 30001),
        ("kafka-2", 30002, 30003),
        ("kafka-3", 30004, 30005),
    ]
    assert config.bootstrap == "127.0.0.1:30000,127.0.0.1:30002,127.0.0.1:30004"
    stack = LocalStack(config)
    second = _properties(stack._kafka_properties(nodes[1]))
    assert second["node.id"] == "2"
    assert second["controller.quorum.voters"] == (
        "1@127.0.0.1:30001,2@127.0.0.1:30003,3@127.0.0.1:30005"
    )
    assert second["log.dirs"] == str(tmp_path / "kafka-2" / "data")
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor"):
        assert second[key] == "3"
    assert second["min.insync.replicas"] == second["transaction.state.log.min.isr"] == "2"


def test_one_broker_keeps_single_replica_settings(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(data_dir=tmp_path))
    assert stack.config.broker_count == 1
    only = _properties(stack._kafka_properties(stack.config.kafka_nodes()[0]))
    assert only["offsets.topic.replication.factor"] == "1"
    assert only["min.insync.replicas"] == "1"
    assert only["listeners"].startswith("PLAINTEXT://")
    assert stack.config.security_env() == {}


def test_a_data_dir_remembers_its_cluster_and_refuses_another(tmp_path: Path) -> None:
    (tmp_path / "kafka-cluster.json").write_text(
        json.dumps({"brokers": 3, "cluster_id": "x", "secure": True})
    )
    remembered = LocalStack(StackConfig(data_dir=tmp_path))
    assert remembered.config.broker_count == 3 and remembered.config.secure
    assert remembered.config.security_env()["STREAMCRAWL_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    with pytest.raises(
        StackError, match="holds a 3-broker Kafka cluster; start it with --brokers 3"
    ):
        LocalStack(StackConfig(data_dir=tmp_path, brokers=1)).up()
    with pytest.raises(StackError, match="holds a secured Kafka cluster"):
        LocalStack(StackConfig(data_dir=tmp_path, brokers=3, secure=False)).up()


def test_secured_nodes_listen_with_sasl_ssl_and_keep_the_controller_on_loopback(
    tmp_path: Path,
) -> None:
    config = StackConfig(data_dir=tmp_path, kafka_port=30000, controller_port=30001, secure=True)
    security = config.security_dir
    security.mkdir()
    for name in ("store.password", "broker.password", "streamcrawl.password"):
        (security / name).write_text(f"{name}-value\n")
    settings = _properties(LocalStack(config)._kafka_properties(config.kafka_nodes()[0]))
    assert settings["listeners"] == "SASL_SSL://127.0.0.1:30000,CONTROLLER://127.0.0.1:30001"
    assert settings["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT"
    assert settings["inter.broker.listener.name"] == "SASL_SSL"
    assert settings["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert (
        'password="broker.password-value"'
        in (settings["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"])
    )
    env = config.security_env()
    assert env["STREAMCRAWL_KAFKA_SASL_PASSWORD_FILE"] == str(security / "streamcrawl.password")
    assert env["STREAMCRAWL_KAFKA_SSL_CAFILE"] == str(security / "ca.pem")
