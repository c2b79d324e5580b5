"""Start, reuse and stop a local Kafka broker and MongoDB-wire server, without Docker.

Each server is a child process in its own session whose PID is recorded in
``<data dir>/stack.json``. A PID is only trusted while ``/proc/PID/cmdline``
still names this stack's data directory, so ``down`` never signals a stranger
that inherited a recycled PID.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..core.topics import replication_for
from .provision import (
    FERRETDB_VERSION,
    KAFKA_VERSION,
    KafkaDistribution,
    ProvisionError,
    default_cache_dir,
    ensure_ferretdb,
    ensure_kafka,
    exclusive,
)

log = logging.getLogger(__name__)

# SCRAM users of a secured stack: the brokers' own (inter-broker) and the pipeline's.
BROKER_USER = "broker"
CLIENT_USER = "streamcrawl"

_LOG4J = """status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
"""


class SilentExit(RuntimeError):
    """A server process that exited during start-up without writing a line anywhere."""


class StackError(RuntimeError):
    """A one-line, user-facing reason the stack cannot start."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise StackError(f"{name}={raw!r} is not a port number") from exc


def default_data_dir() -> Path:
    override = os.environ.get("STREAMCRAWL_STACK_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "streamcrawl" / "stack"


@dataclass(frozen=True)
class KafkaNode:
    """One Kafka server of the stack: its node id, ports and (when running) PID."""

    node_id: int
    name: str
    port: int
    controller_port: int
    pid: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class StackConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    cache_dir: Path = field(default_factory=default_cache_dir)
    kafka_port: int = 19092
    controller_port: int = 19093
    mongo_port: int = 27027
    kafka_heap: str = "512m"
    # The local broker compiles with C1 only: in crawls of 5,000 to 20,000 pages, C2's
    # compiler threads cost more CPU than its faster code saves (bench/RESULTS.md "Kafka's
    # JIT"). A long-lived broker may prefer C2: STREAMCRAWL_STACK_KAFKA_JVM_OPTIONS="".
    kafka_jvm_options: tuple[str, ...] = ("-XX:TieredStopAtLevel=1",)
    # None: as many as the data directory's cluster was formatted with, else one.
    brokers: int | None = None
    # (client, controller) ports of nodes 2..n; by default the next pairs after node 1's.
    extra_kafka_ports: tuple[tuple[int, int], ...] = ()
    # SASL_SSL (SCRAM-SHA-512 over TLS) clients; None: as the data directory's cluster was made.
    secure: bool | None = None

    @classmethod
    def from_env(cls) -> StackConfig:
        kafka_port = _env_int("STREAMCRAWL_STACK_KAFKA_PORT", 19092)
        brokers = os.environ.get("STREAMCRAWL_STACK_BROKERS")
        return cls(
            kafka_port=kafka_port,
            controller_port=_env_int("STREAMCRAWL_STACK_CONTROLLER_PORT", kafka_port + 1),
            mongo_port=_env_int("STREAMCRAWL_STACK_MONGO_PORT", 27027),
            kafka_heap=os.environ.get("STREAMCRAWL_STACK_KAFKA_HEAP", "512m"),
            kafka_jvm_options=tuple(
                os.environ.get(
                    "STREAMCRAWL_STACK_KAFKA_JVM_OPTIONS", " ".join(cls.kafka_jvm_options)
                ).split()
            ),
            brokers=_env_int("STREAMCRAWL_STACK_BROKERS", 1) if brokers else None,
        )

    @property
    def broker_count(self) -> int:
        return self.brokers or 1

    def kafka_nodes(self) -> list[KafkaNode]:
        """Every Kafka server of the stack; node 1 keeps the single-broker names and ports."""
        nodes = [KafkaNode(1, "kafka", self.kafka_port, self.controller_port)]
        for node_id in range(2, self.broker_count + 1):
            index = node_id - 2
            if index < len(self.extra_kafka_ports):
                port, controller = self.extra_kafka_ports[index]
            else:
                step = 2 * (node_id - 1)
                port, controller = self.kafka_port + step, self.controller_port + step
            nodes.append(KafkaNode(node_id, f"kafka-{node_id}", port, controller))
        return nodes

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.kafka_nodes())

    @property
    def mongo_uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.mongo_port}/"

    @property
    def security_dir(self) -> Path:
        """CA, broker keystore and the 0600 password files of a secured stack."""
        return self.data_dir / "kafka-security"

    def security_env(self) -> dict[str, str]:
        """How a client reaches a secured stack (nothing for a plaintext one): the password
        stays in its file, only the path travels."""
        if not self.secure:
            return {}
        password_file = self.security_dir / f"{CLIENT_USER}.password"
        return {
            "STREAMCRAWL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "STREAMCRAWL_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "STREAMCRAWL_KAFKA_SASL_USERNAME": CLIENT_USER,
            "STREAMCRAWL_KAFKA_SASL_PASSWORD_FILE": str(password_file),
            "STREAMCRAWL_KAFKA_SSL_CAFILE": str(self.security_dir / "ca.pem"),
        }

    def connection_env(self) -> dict[str, str]:
        return {
            "STREAMCRAWL_KAFKA_BOOTSTRAP": self.bootstrap,
            "STREAMCRAWL_MONGO_URI": self.mongo_uri,
            **self.security_env(),
        }


@dataclass
class ProcessRecord:
    pid: int
    port: int
    started_at: float


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    version: str
    pid: int | None
    port: int
    running: bool
    answering: bool


class LocalStack:
    """The servers of the local stack, managed by PID: one Kafka node (or a cluster of
    combined broker+controller nodes) and the MongoDB-wire server."""

    def __init__(self, config: StackConfig) -> None:
        self._cluster_file = config.data_dir / "kafka-cluster.json"
        self._recorded = self._load_cluster()
        if config.brokers is None:
            recorded = self._recorded.get("brokers")
            config = replace(config, brokers=recorded if isinstance(recorded, int) else 1)
        if config.secure is None:
            config = replace(config, secure=bool(self._recorded.get("secure", False)))
        self.config = config
        self._kafka_dir = config.data_dir / "kafka"
        self._mongo_dir = config.data_dir / "mongo"
        self._state_file = config.data_dir / "stack.json"

    # ---- public API -------------------------------------------------------

    def up(self, timeout: float = 120.0) -> None:
        """Start what is not running (reusing what is) and wait until both answer. Two
        ``up`` calls on one data directory wait for each other (the second reuses)."""
        recorded = self._recorded.get("brokers")
        if recorded is not None and recorded != self.config.broker_count:
            raise StackError(
                f"{self.config.data_dir} holds a {recorded}-broker Kafka cluster; start it "
                f"with --brokers {recorded}, or remove it first (stack down --purge)"
            )
        made_secure = self._recorded.get("secure")
        if made_secure is not None and made_secure != self.config.secure:
            raise StackError(
                f"{self.config.data_dir} holds a {'secured' if made_secure else 'plaintext'} "
                f"Kafka cluster; start it {'with' if made_secure else 'without'} --secure, "
                "or remove it first (stack down --purge)"
            )
        kafka = ensure_kafka(self.config.cache_dir)
        ferretdb = ensure_ferretdb(self.config.cache_dir)
        with exclusive(self.config.data_dir / ".stack.lock"):
            self._up(kafka, ferretdb, timeout)

    def _up(self, kafka: KafkaDistribution, ferretdb: Path, timeout: float) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        stopped = [
            node for node in self.config.kafka_nodes() if not self._alive(state.get(node.name))
        ]
        for node in stopped:
            self._check_kafka_ports_free(node)
        if stopped and self.config.secure:
            self._make_security()
        for node in stopped:
            state[node.name] = self._start_kafka(kafka.classpath, node)
        if not self._alive(state.get("mongo")):
            self._check_free("FerretDB", "STREAMCRAWL_STACK_MONGO_PORT", self.config.mongo_port)
            state["mongo"] = self._start_ferretdb(ferretdb)
        self._save_state(state)
        deadline = time.monotonic() + timeout
        nodes = self.config.kafka_nodes()
        for node in nodes:
            name = "Kafka" if len(nodes) == 1 else f"Kafka node {node.node_id}"
            logs = [self._node_dir(node) / "server.log", self._node_dir(node) / "stdout.log"]
            probe = functools.partial(
                kafka_answers, brokers=len(nodes), security=self.config.security_env()
            )
            try:
                self._wait(name, state[node.name], logs, probe, node.bootstrap, deadline)
            except SilentExit as exc:
                # Seen on a loaded machine: a JVM gone within its first second, not a line
                # logged. Nothing says what to fix, so start it once more before giving up.
                log.warning("%s; starting it once more", exc)
                state[node.name] = self._start_kafka(kafka.classpath, node)
                self._save_state(state)
                try:
                    self._wait(name, state[node.name], logs, probe, node.bootstrap, deadline)
                except SilentExit as again:
                    raise StackError(str(again)) from again
        self._wait(
            "FerretDB",
            state["mongo"],
            [self._mongo_dir / "ferretdb.log"],
            mongo_answers,
            self.config.mongo_uri,
            deadline,
        )

    def down(self, purge: bool = False, timeout: float = 30.0) -> list[str]:
        """Stop exactly the processes this stack started; return their names."""
        state = self._load_state()
        running = {name: record for name, record in state.items() if self._alive(record)}
        # All at once: a cluster's nodes stopped one by one would leave the last ones
        # waiting for a controller quorum that is already gone.
        _terminate_all([record.pid for record in running.values()], timeout)
        self._state_file.unlink(missing_ok=True)
        if purge:
            shutil.rmtree(self.config.data_dir, ignore_errors=True)
        return list(running)

    def kafka_nodes(self) -> list[KafkaNode]:
        """The Kafka nodes with the PID of each one running (None where it is not), so a
        fault test can SIGKILL exactly one broker."""
        state = self._load_state()
        return [
            replace(node, pid=record.pid if record is not None and self._alive(record) else None)
            for node in self.config.kafka_nodes()
            for record in [state.get(node.name)]
        ]

    def status(self) -> list[ComponentStatus]:
        state = self._load_state()
        nodes = self.config.kafka_nodes()
        probe_kafka = functools.partial(kafka_answers, security=self.config.security_env())
        components: list[tuple[str, str, int, Callable[[str, float], bool], str]] = [
            (node.name, KAFKA_VERSION, node.port, probe_kafka, node.bootstrap) for node in nodes
        ]
        components.append(
            (
                "mongo",
                f"FerretDB {FERRETDB_VERSION}",
                self.config.mongo_port,
                mongo_answers,
                self.config.mongo_uri,
            )
        )
        result = []
        for name, version, port, probe, target in components:
            record = state.get(name)
            running = self._alive(record)
            result.append(
                ComponentStatus(
                    name=name,
                    version=version,
                    pid=record.pid if record and running else None,
                    port=port,
                    running=running,
                    answering=running and probe(target, 3.0),
                )
            )
        return result

    # ---- processes --------------------------------------------------------

    def _node_dir(self, node: KafkaNode) -> Path:
        return self._kafka_dir if node.node_id == 1 else self.config.data_dir / node.name

    def _check_kafka_ports_free(self, node: KafkaNode) -> None:
        if node.node_id == 1:
            self._check_free("Kafka", "STREAMCRAWL_STACK_KAFKA_PORT", node.port)
            self._check_free(
                "the Kafka controller", "STREAMCRAWL_STACK_CONTROLLER_PORT", node.controller_port
            )
            return
        for port in (node.port, node.controller_port):
            self._check_free(f"Kafka node {node.node_id}", "STREAMCRAWL_STACK_KAFKA_PORT", port)

    def _start_kafka(self, classpath: str, node: KafkaNode) -> ProcessRecord:
        kafka_dir = self._node_dir(node)
        (kafka_dir / "data").mkdir(parents=True, exist_ok=True)
        properties = kafka_dir / "server.properties"
        _write_private(properties, self._kafka_properties(node))
        log4j = kafka_dir / "log4j2.properties"
        log4j.write_text(_LOG4J.format(log_file=kafka_dir / "server.log"))
        java = shutil.which("java")
        if java is None:
            raise ProvisionError("'java' is not installed; Kafka needs Java 17")
        jvm = [
            java,
            f"-Xmx{self.config.kafka_heap}",
            "-Xms128m",
            # One broker of a 512 MB heap on a small machine: the serial collector spends
            # less CPU than G1's concurrent threads (bench/RESULTS.md: 2.2-2.5 against
            # 2.7-3.6 CPU-s per 1,000 pages, RSS 390 against 470-480 MiB).
            "-XX:+UseSerialGC",
            *self.config.kafka_jvm_options,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            classpath,
        ]
        if not (kafka_dir / "data" / "meta.properties").exists():
            self._format(jvm, properties)
        pid = _spawn([*jvm, "kafka.Kafka", str(properties)], kafka_dir / "stdout.log")
        return ProcessRecord(pid=pid, port=node.port, started_at=time.time())

    def _format(self, jvm: list[str], properties: Path) -> None:
        """Format a node's storage with the cluster's id (one id for every node)."""
        cluster_id = self._recorded.get("cluster_id")
        if cluster_id is None:
            cluster_id = new_cluster_id()
            self._recorded = {
                "brokers": self.config.broker_count,
                "cluster_id": cluster_id,
                "secure": bool(self.config.secure),
            }
            self._cluster_file.write_text(json.dumps(self._recorded, indent=2))
        # "--cluster-id=ID": an id may start with "-" (URL-safe base64).
        command = [*jvm, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}"]
        if self.config.secure:
            # SCRAM users live in the metadata log: added when the storage is formatted.
            for user in (BROKER_USER, CLIENT_USER):
                password = self._secret(f"{user}.password")
                command += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
        formatted = subprocess.run(
            [*command, "--config", str(properties)], capture_output=True, timeout=120
        )
        if formatted.returncode != 0:
            output = (formatted.stderr or formatted.stdout).decode(errors="replace").strip()
            last = output.splitlines()[-1] if output else "(no output)"
            raise StackError(f"formatting Kafka storage in {properties.parent} failed: {last}")

    def _kafka_properties(self, node: KafkaNode) -> str:
        nodes = self.config.kafka_nodes()
        replicas, min_insync = replication_for(len(nodes))
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            # A static quorum of every node: with three voters one may be lost for good.
            "controller.quorum.voters": ",".join(
                f"{other.node_id}@127.0.0.1:{other.controller_port}" for other in nodes
            ),
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},"
            f"CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self._node_dir(node) / "data"),
            "num.partitions": "3",
            # Topics made by the broker itself (offsets, transactions, share state) and any
            # created without explicit settings get the pipeline topics' replication.
            "default.replication.factor": str(replicas),
            "min.insync.replicas": str(min_insync),
            "offsets.topic.replication.factor": str(replicas),
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min_insync),
            "share.coordinator.state.topic.replication.factor": str(replicas),
            "share.coordinator.state.topic.min.isr": str(min_insync),
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "message.max.bytes": str(16 * 1024 * 1024),
            # The log cleaner zeroes its whole key map before each compaction, and the
            # stats changelogs are compacted every few seconds: 128 MiB (the default) cost
            # ~110 MiB of the broker's RSS and a quarter of its sampled Java time; 16 MiB
            # holds 600,000 keys a pass (bench/RESULTS.md "log cleaner").
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        }
        if self.config.secure:
            settings.update(self._secure_listeners(node))
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _secure_listeners(self, node: KafkaNode) -> dict[str, str]:
        """Clients and brokers on SASL_SSL (SCRAM-SHA-512 over TLS); the controllers keep a
        plaintext listener on loopback (a controller cannot authenticate with SCRAM, whose
        credentials it serves itself; in production, mTLS there)."""
        tls = self.config.security_dir
        store_password = self._secret("store.password")
        broker_password = self._secret(f"{BROKER_USER}.password")
        return {
            "listeners": f"SASL_SSL://127.0.0.1:{node.port},"
            f"CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"SASL_SSL://127.0.0.1:{node.port}",
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "SASL_SSL",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{BROKER_USER}" password="{broker_password}";'
            ),
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(tls / "broker.p12"),
            "ssl.keystore.password": store_password,
            "ssl.key.password": store_password,
            "ssl.truststore.type": "PKCS12",
            "ssl.truststore.location": str(tls / "truststore.p12"),
            "ssl.truststore.password": store_password,
        }

    def _secret(self, name: str) -> str:
        return (self.config.security_dir / name).read_text().strip()

    def _make_security(self) -> None:
        """Once per data directory: random passwords in 0600 files, a CA, and a broker
        certificate for 127.0.0.1/localhost signed by it (all with the JDK's keytool)."""
        tls = self.config.security_dir
        if (tls / "truststore.p12").exists():
            return
        tls.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in ("store.password", f"{BROKER_USER}.password", f"{CLIENT_USER}.password"):
            _write_private(tls / name, secrets.token_urlsafe(24) + "\n")
        make_certificates(tls, self._secret("store.password"))

    def _start_ferretdb(self, binary: Path) -> ProcessRecord:
        for sub in ("data", "state"):
            (self._mongo_dir / sub).mkdir(parents=True, exist_ok=True)
        pid = _spawn(
            [
                str(binary),
                "--handler=sqlite",
                f"--sqlite-url=file:{self._mongo_dir / 'data'}/",
                f"--listen-addr=127.0.0.1:{self.config.mongo_port}",
                f"--state-dir={self._mongo_dir / 'state'}",
                "--telemetry=disable",
                "--debug-addr=-",
                "--log-level=warn",
            ],
            self._mongo_dir / "ferretdb.log",
        )
        return ProcessRecord(pid=pid, port=self.config.mongo_port, started_at=time.time())

    def _wait(
        self,
        name: str,
        record: ProcessRecord,
        log_files: list[Path],
        probe: Callable[[str, float], bool],
        target: str,
        deadline: float,
    ) -> None:
        """Wait until the server answers; StackError (SilentExit where it wrote nothing
        in any of ``log_files``) when it exits first or does not answer in time."""
        while time.monotonic() < deadline:
            if not self._alive(record):
                tails = [_tail(path) for path in log_files]
                said = [tail for tail in tails if tail not in ("(empty log)", "(no log)")]
                what = f"{name} exited during start-up ({_exit_status(record.pid)})"
                if not said:
                    raise SilentExit(f"{what}: nothing in {', '.join(map(str, log_files))}")
                raise StackError(f"{what}: {' | '.join(said)}")
            if probe(target, 3.0):
                return
            time.sleep(0.5)
        last_lines = " | ".join(_tail(path) for path in log_files)
        raise StackError(f"{name} did not answer on {target} in time: {last_lines}")

    def _alive(self, record: ProcessRecord | None) -> bool:
        if record is None:
            return False
        spawned = _SPAWNED.get(record.pid)
        if spawned is not None:
            # Our own child: its exit status says it. (Its cmdline is ours until it execs,
            # so the check below would call a server that is still starting dead.)
            return spawned.poll() is None
        try:
            cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{record.pid}/stat").read_text()
        except OSError:
            return False
        zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
        return not zombie and str(self.config.data_dir).encode() in cmdline

    @staticmethod
    def _check_free(what: str, variable: str, port: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As the servers themselves do: a crashed server's TIME_WAIT sockets must not
            # make its port look taken; only a listener (or a bound socket) does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as exc:
                raise StackError(
                    f"port {port} for {what} is taken by another process; "
                    f"stop it or set {variable} to a free port"
                ) from exc

    # ---- state ------------------------------------------------------------

    def _load_cluster(self) -> dict[str, object]:
        """What the data directory's Kafka cluster was formatted with (broker count,
        cluster id); empty for a new directory or one made before clusters existed."""
        try:
            raw = json.loads(self._cluster_file.read_text())
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def _load_state(self) -> dict[str, ProcessRecord]:
        try:
            raw = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return {}
        return {name: ProcessRecord(**record) for name, record in raw.items()}

    def _save_state(self, state: dict[str, ProcessRecord]) -> None:
        temp = self._state_file.with_suffix(".tmp")
        temp.write_text(json.dumps({name: asdict(rec) for name, rec in state.items()}, indent=2))
        temp.replace(self._state_file)


def new_cluster_id() -> str:
    """A random KRaft cluster id. Never one starting with "-": the storage tool would read
    it as an option and refuse to format (Kafka's own Uuid.randomUuid redraws those too)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold passwords)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def make_certificates(tls: Path, password: str) -> None:
    """A CA (ca.p12, ca.pem for clients), the broker's key and CA-signed certificate for
    127.0.0.1 and localhost (broker.p12) and a truststore with the CA (truststore.p12)."""
    keytool = shutil.which("keytool")
    if keytool is None:
        raise ProvisionError("'keytool' is not installed; the secured stack needs a JDK")
    san = "SAN=ip:127.0.0.1,dns:localhost"
    store = ["-storetype", "PKCS12", "-storepass", password]
    steps = [
        ["-genkeypair", "-alias", "ca", "-keyalg", "RSA", "-keysize", "2048", "-validity",
         "3650", "-dname", "CN=streamcrawl local CA", "-ext", "bc:c", "-keystore", "ca.p12"],
        ["-exportcert", "-rfc", "-alias", "ca", "-keystore", "ca.p12", "-file", "ca.pem"],
        ["-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048", "-validity",
         "3650", "-dname", "CN=localhost", "-ext", san, "-keystore", "broker.p12"],
        ["-certreq", "-alias", "broker", "-keystore", "broker.p12", "-file", "broker.csr"],
        ["-gencert", "-rfc", "-alias", "ca", "-keystore", "ca.p12", "-infile", "broker.csr",
         "-outfile", "broker.pem", "-validity", "3650", "-ext", san,
         "-ext", "KU=digitalSignature,keyEncipherment", "-ext", "EKU=serverAuth,clientAuth"],
        ["-importcert", "-noprompt", "-alias", "ca", "-file", "ca.pem", "-keystore", "broker.p12"],
        ["-importcert", "-alias", "broker", "-file", "broker.pem", "-keystore", "broker.p12"],
        ["-importcert", "-noprompt", "-alias", "ca", "-file", "ca.pem",
         "-keystore", "truststore.p12"],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run(
            [keytool, *step, *store], cwd=tls, capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip().splitlines()
            raise StackError(f"keytool {step[0]} failed: {output[-1] if output else '?'}")


# The servers this process started, by pid: kept so that an exit status can be read (a
# dropped Popen is reaped by the subprocess module, and its status lost).
_SPAWNED: dict[int, subprocess.Popen[bytes]] = {}


def _spawn(cmd: list[str], log_file: Path) -> int:
    with open(log_file, "ab") as out:
        process = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _SPAWNED[process.pid] = process
    return process.pid


def _exit_status(pid: int) -> str:
    """How a server started by this process ended: its exit code or the signal."""
    process = _SPAWNED.get(pid)
    code = process.poll() if process is not None else None
    if code is None:
        return "exit status unknown"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _terminate_all(pids: list[int], timeout: float) -> None:
    """SIGTERM every process, wait up to ``timeout`` for them all, SIGKILL what is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_exists(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        if _exists(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        # A child of ours that exited stays a zombie until reaped.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:]) or "(empty log)"


def kafka_answers(
    bootstrap: str, timeout: float, brokers: int = 1, security: dict[str, str] | None = None
) -> bool:
    """True when the broker answers a metadata request naming at least ``brokers`` brokers
    (a cluster's topics can be created with full replication only once all have joined)."""
    from ..core.config import Settings
    from ..core.kafka import make_admin

    settings = Settings.from_env({**(security or {}), "STREAMCRAWL_KAFKA_BOOTSTRAP": bootstrap})

    async def probe() -> bool:
        admin = make_admin(settings, request_timeout_ms=2000)
        try:
            await asyncio.wait_for(admin.start(), timeout)
            cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
            return len(cluster.get("brokers") or []) >= brokers
        finally:
            await admin.close()

    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # refused connections are expected while it starts
    try:
        return asyncio.run(probe())
    except Exception:  # any failure to answer simply means "not yet"
        return False
    finally:
        quiet.setLevel(level)


def mongo_answers(uri: str, timeout: float) -> bool:
    """True when the server answers the ``ping`` command."""
    from pymongo import MongoClient

    client: MongoClient[dict[str, object]] = MongoClient(
        uri, serverSelectionTimeoutMS=int(timeout * 1000), connectTimeoutMS=int(timeout * 1000)
    )
    try:
        client.admin.command("ping")
        return True
    except Exception:  # any failure to answer simply means "not yet"
        return False
    finally:
        client.close()
