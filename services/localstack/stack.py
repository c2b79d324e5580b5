"""Start, reuse and stop a local Kafka broker and MongoDB-wire server, without Docker.

Each server is a child process in its own session whose PID is recorded in
``<data dir>/stack.json``. A PID is only trusted while ``/proc/PID/cmdline``
still names this stack's data directory, so ``down`` never signals a stranger
that inherited a recycled PID.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

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

_LOG4J = """status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
"""


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
class StackConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    cache_dir: Path = field(default_factory=default_cache_dir)
    kafka_port: int = 19092
    controller_port: int = 19093
    mongo_port: int = 27027
    kafka_heap: str = "512m"

    @classmethod
    def from_env(cls) -> StackConfig:
        kafka_port = _env_int("STREAMCRAWL_STACK_KAFKA_PORT", 19092)
        return cls(
            kafka_port=kafka_port,
            controller_port=_env_int("STREAMCRAWL_STACK_CONTROLLER_PORT", kafka_port + 1),
            mongo_port=_env_int("STREAMCRAWL_STACK_MONGO_PORT", 27027),
            kafka_heap=os.environ.get("STREAMCRAWL_STACK_KAFKA_HEAP", "512m"),
        )

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def mongo_uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.mongo_port}/"

    def connection_env(self) -> dict[str, str]:
        return {
            "STREAMCRAWL_KAFKA_BOOTSTRAP": self.bootstrap,
            "STREAMCRAWL_MONGO_URI": self.mongo_uri,
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
    """The two servers of the local stack, managed by PID."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self._kafka_dir = config.data_dir / "kafka"
        self._mongo_dir = config.data_dir / "mongo"
        self._state_file = config.data_dir / "stack.json"

    # ---- public API -------------------------------------------------------

    def up(self, timeout: float = 120.0) -> None:
        """Start what is not running (reusing what is) and wait until both answer. Two
        ``up`` calls on one data directory wait for each other (the second reuses)."""
        kafka = ensure_kafka(self.config.cache_dir)
        ferretdb = ensure_ferretdb(self.config.cache_dir)
        with exclusive(self.config.data_dir / ".stack.lock"):
            self._up(kafka, ferretdb, timeout)

    def _up(self, kafka: KafkaDistribution, ferretdb: Path, timeout: float) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        if not self._alive(state.get("kafka")):
            self._check_free("Kafka", "STREAMCRAWL_STACK_KAFKA_PORT", self.config.kafka_port)
            self._check_free(
                "the Kafka controller",
                "STREAMCRAWL_STACK_CONTROLLER_PORT",
                self.config.controller_port,
            )
            state["kafka"] = self._start_kafka(kafka.classpath)
        if not self._alive(state.get("mongo")):
            self._check_free("FerretDB", "STREAMCRAWL_STACK_MONGO_PORT", self.config.mongo_port)
            state["mongo"] = self._start_ferretdb(ferretdb)
        self._save_state(state)
        deadline = time.monotonic() + timeout
        self._wait(
            "Kafka",
            state["kafka"],
            self._kafka_dir / "server.log",
            kafka_answers,
            self.config.bootstrap,
            deadline,
        )
        self._wait(
            "FerretDB",
            state["mongo"],
            self._mongo_dir / "ferretdb.log",
            mongo_answers,
            self.config.mongo_uri,
            deadline,
        )

    def down(self, purge: bool = False, timeout: float = 30.0) -> list[str]:
        """Stop exactly the processes this stack started; return their names."""
        state = self._load_state()
        stopped = []
        for name, record in state.items():
            if self._alive(record):
                _terminate(record.pid, timeout)
                stopped.append(name)
        self._state_file.unlink(missing_ok=True)
        if purge:
            shutil.rmtree(self.config.data_dir, ignore_errors=True)
        return stopped

    def status(self) -> list[ComponentStatus]:
        state = self._load_state()
        result = []
        for name, version, port, probe, target in (
            ("kafka", KAFKA_VERSION, self.config.kafka_port, kafka_answers, self.config.bootstrap),
            (
                "mongo",
                f"FerretDB {FERRETDB_VERSION}",
                self.config.mongo_port,
                mongo_answers,
                self.config.mongo_uri,
            ),
        ):
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

    def _start_kafka(self, classpath: str) -> ProcessRecord:
        kafka_dir = self._kafka_dir
        (kafka_dir / "data").mkdir(parents=True, exist_ok=True)
        properties = kafka_dir / "server.properties"
        properties.write_text(self._kafka_properties())
        log4j = kafka_dir / "log4j2.properties"
        log4j.write_text(_LOG4J.format(log_file=kafka_dir / "server.log"))
        java = shutil.which("java")
        if java is None:
            raise ProvisionError("'java' is not installed; Kafka needs Java 17")
        jvm = [
            java,
            f"-Xmx{self.config.kafka_heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            classpath,
        ]
        if not (kafka_dir / "data" / "meta.properties").exists():
            cluster_id = new_cluster_id()
            subprocess.run(
                [
                    *jvm,
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(properties),
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
        pid = _spawn([*jvm, "kafka.Kafka", str(properties)], kafka_dir / "stdout.log")
        return ProcessRecord(pid=pid, port=self.config.kafka_port, started_at=time.time())

    def _kafka_properties(self) -> str:
        c = self.config
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{c.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{c.kafka_port},"
            f"CONTROLLER://127.0.0.1:{c.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{c.kafka_port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self._kafka_dir / "data"),
            "num.partitions": "3",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "message.max.bytes": str(16 * 1024 * 1024),
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

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
        log_file: Path,
        probe: Callable[[str, float], bool],
        target: str,
        deadline: float,
    ) -> None:
        while time.monotonic() < deadline:
            if not self._alive(record):
                raise StackError(f"{name} exited during start-up: {_tail(log_file)}")
            if probe(target, 3.0):
                return
            time.sleep(0.5)
        raise StackError(f"{name} did not answer on {target} in time: {_tail(log_file)}")

    def _alive(self, record: ProcessRecord | None) -> bool:
        if record is None:
            return False
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


def _spawn(cmd: list[str], log_file: Path) -> int:
    with open(log_file, "ab") as out:
        process = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return process.pid


def _terminate(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _exists(pid):
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


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


def kafka_answers(bootstrap: str, timeout: float) -> bool:
    """True when the broker answers a metadata request with itself in the cluster."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        try:
            await asyncio.wait_for(admin.start(), timeout)
            cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
            return bool(cluster.get("brokers"))
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
