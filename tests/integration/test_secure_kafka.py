"""A secured cluster, as `streamcrawl stack up --secure` makes it: SASL/SCRAM-SHA-512 over TLS
to Kafka (CA and broker certificate from keytool, SCRAM users added at format), and FerretDB
with its (experimental, SQLite) SCRAM authentication holding the pages. The pipeline crawls
end to end with both credentials read from files; a wrong password and a plaintext client
are refused with one line; neither password appears in logs, /metrics, DLQ records or
--help output."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import make_reader, stop_consumer
from streamcrawl.core.topics import TOPIC_SPECS
from streamcrawl.crawl.seeds import produce_seeds
from streamcrawl.crawl.watch import PipelineWatch
from streamcrawl.demo.nginx import NginxSite
from streamcrawl.demo.site import generate_site
from streamcrawl.localstack.provision import ensure_ferretdb
from streamcrawl.localstack.stack import LocalStack, StackConfig, mongo_answers

from ..conftest import free_port, isolated_settings
from ..support.crawling import assert_stored_once, crawl_site, stored_documents

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
SITE_PAGES = 120
MONGO_USER = "crawler"
MONGO_PASSWORD = "mongo-Pw-7f3c1e9a2b"  # distinctive, so a leak is found by search
AUTH_DB = "streamcrawl"


@dataclass(frozen=True)
class Secured:
    stack: LocalStack
    kafka_password: str
    mongo_password_file: Path
    mongo_port: int

    def settings(self, **extra: str) -> Settings:
        """Isolated settings on the secured stack, pages stored with MongoDB credentials."""
        env = self.stack.config.security_env()
        base = isolated_settings(self.stack.config, **extra).as_env()
        base.update(env)
        base["STREAMCRAWL_MONGO_URI"] = (
            f"mongodb://{MONGO_USER}@127.0.0.1:{self.mongo_port}/?authSource={AUTH_DB}"
        )
        base["STREAMCRAWL_MONGO_PASSWORD_FILE"] = str(self.mongo_password_file)
        return Settings.from_env(base)

    @property
    def secrets(self) -> tuple[str, str]:
        return self.kafka_password, MONGO_PASSWORD


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("secure")
    config = StackConfig(
        data_dir=root / "stack",
        kafka_port=free_port(),
        controller_port=free_port(),
        mongo_port=free_port(),
        kafka_heap=os.environ.get("STREAMCRAWL_TEST_KAFKA_HEAP", "512m"),
        secure=True,
    )
    stack = LocalStack(config)
    password_file = root / "mongo.password"
    password_file.write_text(MONGO_PASSWORD + "\n")
    password_file.chmod(0o600)
    mongo_port = free_port()
    ferretdb = None
    try:
        stack.up(timeout=300)
        ferretdb = _start_authenticating_ferretdb(root / "ferretdb", mongo_port)
        kafka_password = Path(config.security_env()["STREAMCRAWL_KAFKA_SASL_PASSWORD_FILE"])
        yield Secured(stack, kafka_password.read_text().strip(), password_file, mongo_port)
    finally:
        if ferretdb is not None:
            ferretdb.send_signal(signal.SIGTERM)
            ferretdb.wait(30)
        stack.down(purge=True)


def _start_authenticating_ferretdb(directory: Path, port: int) -> subprocess.Popen[bytes]:
    """FerretDB 1.24 with its new (SCRAM) authentication on SQLite, one user made at setup:
    the SQLite backend has no users of its own, so this is the only way it checks any."""
    for sub in ("data", "state"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    with open(directory / "ferretdb.log", "ab") as log:
        process = subprocess.Popen(
            [
                str(ensure_ferretdb()),
                "--handler=sqlite",
                f"--sqlite-url=file:{directory / 'data'}/",
                f"--listen-addr=127.0.0.1:{port}",
                f"--state-dir={directory / 'state'}",
                "--telemetry=disable",
                "--debug-addr=-",
                "--log-level=warn",
                "--test-enable-new-auth",
                f"--setup-database={AUTH_DB}",
                f"--setup-username={MONGO_USER}",
                # FerretDB takes the setup password only as a flag or an environment variable:
                # the environment keeps it out of `ps`.
            ],
            env={**os.environ, "FERRETDB_SETUP_PASSWORD": MONGO_PASSWORD},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    uri = f"mongodb://{MONGO_USER}:{MONGO_PASSWORD}@127.0.0.1:{port}/?authSource={AUTH_DB}"
    deadline = time.monotonic() + 60
    while not mongo_answers(uri, 2.0):
        assert process.poll() is None, (directory / "ferretdb.log").read_text()[-500:]
        assert time.monotonic() < deadline, "FerretDB did not answer"
        time.sleep(0.3)
    return process


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamcrawl.cli", *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_no_secret(secured: Secured, text: str, where: str) -> None:
    for secret in secured.secrets:
        assert secret not in text, f"a password appears in {where}"


async def _dlq_values(settings: Settings) -> list[bytes]:
    from aiokafka import TopicPartition

    reader = make_reader(settings, enable_auto_commit=False)
    await reader.start()
    try:
        topic = settings.topic_prefix + "dlq"
        count = next(spec.partitions for spec in TOPIC_SPECS if spec.suffix == "dlq")
        partitions = [TopicPartition(topic, number) for number in range(count)]
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        ends = await reader.end_offsets(partitions)
        values: list[bytes] = []
        while [tp for tp in partitions if await reader.position(tp) < ends[tp]]:
            batch = await reader.getmany(timeout_ms=1000)
            values += [record.value or b"" for records in batch.values() for record in records]
        return values
    finally:
        await stop_consumer(reader)


async def test_pipeline_crawls_over_sasl_ssl_and_no_secret_leaks(
    secured: Secured, tmp_path: Path
) -> None:
    port = free_port()
    manifest = generate_site(tmp_path / "site", pages=SITE_PAGES, port=port)
    settings = secured.settings(
        max_depth="1000", crawl_delay="0", fetch_per_host_concurrency="16", log_level="DEBUG"
    )
    assert "STREAMCRAWL_KAFKA_SASL_PASSWORD_FILE" in settings.as_env()
    _assert_no_secret(secured, json.dumps(settings.as_env()), "the stages' environment")

    async def send_a_bad_seed(watch: PipelineWatch) -> None:
        # A dead letter carries its original payload: it must not carry a credential.
        await produce_seeds(settings, [b"not a url at all"])

    with NginxSite(tmp_path / "site", port):
        await crawl_site(settings, tmp_path / "logs", manifest, during=send_a_bad_seed)

    assert_stored_once(manifest, await stored_documents(settings, _mongo_uri(secured)))
    logs = {p.name: p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log")}
    assert len(logs) >= 6
    # The stages really spoke SASL to Kafka (aiokafka says so once per connection).
    assert all("Authenticated as streamcrawl via SCRAM-SHA-512" in text for text in logs.values())
    for name, text in logs.items():
        _assert_no_secret(secured, text, name)
    dead = await _dlq_values(settings)
    assert any(b"not a url at all" in value for value in dead)
    for value in dead:
        _assert_no_secret(secured, value.decode(errors="replace"), "crawl.dlq")


def _mongo_uri(secured: Secured) -> str:
    return (
        f"mongodb://{MONGO_USER}:{MONGO_PASSWORD}@127.0.0.1:{secured.mongo_port}/"
        f"?authSource={AUTH_DB}"
    )


async def test_metrics_of_a_secured_stage_hold_no_secret(secured: Secured, tmp_path: Path) -> None:
    settings = secured.settings()
    metrics_port = free_port()
    env = {**settings.as_env(), "STREAMCRAWL_METRICS_PORT": str(metrics_port)}
    log_file = tmp_path / "sink.log"
    with open(log_file, "wb") as out:
        stage = subprocess.Popen(
            [sys.executable, "-m", "streamcrawl.cli", "run", "sink"],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        body = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{metrics_port}"
                with urllib.request.urlopen(url + "/readyz", timeout=3) as ready:
                    if ready.status == 200:
                        with urllib.request.urlopen(url + "/metrics", timeout=3) as page:
                            body = page.read().decode()
                        break
            except OSError:
                pass
            await asyncio.sleep(0.5)
        assert "streamcrawl_" in body, log_file.read_text()[-2000:]
        _assert_no_secret(secured, body, "/metrics")
    finally:
        stage.send_signal(signal.SIGTERM)
        stage.wait(60)
    _assert_no_secret(secured, log_file.read_text(), "the sink's log")


@pytest.mark.parametrize(
    "command", [("run", "frontier"), ("lag",), ("seed", "http://127.0.0.1/"), ("topics", "create")]
)
@pytest.mark.parametrize("mistake", ["wrong password", "plaintext client"])
def test_wrong_password_and_plaintext_are_refused_in_one_line(
    secured: Secured, tmp_path: Path, command: tuple[str, ...], mistake: str
) -> None:
    env = secured.settings().as_env()
    if mistake == "wrong password":
        wrong = tmp_path / "wrong.password"
        wrong.write_text("not-the-password\n")
        env["STREAMCRAWL_KAFKA_SASL_PASSWORD_FILE"] = str(wrong)
        expected = "authentication failed: wrong user name or password"
    else:
        env["STREAMCRAWL_KAFKA_SECURITY_PROTOCOL"] = "PLAINTEXT"
        expected = "the broker closed the connection"
    result = _cli(env, *command)
    assert result.returncode == 2, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("streamcrawl: error: Kafka refused"), output
    assert expected in errors[0]
    _assert_no_secret(secured, output, f"{' '.join(command)} output")


def test_help_output_holds_no_secret(secured: Secured) -> None:
    env = secured.settings().as_env()
    for args in (
        ("--help",),
        ("run", "sink", "--help"),
        ("crawl", "--help"),
        ("lag", "--help"),
        ("seed", "--help"),
        ("stack", "up", "--help"),
    ):
        result = _cli(env, *args)
        assert result.returncode == 0 and "usage:" in result.stdout
        _assert_no_secret(secured, result.stdout + result.stderr, " ".join(args))


def test_a_wrong_mongo_password_stops_the_sink_with_one_line(
    secured: Secured, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong-mongo.password"
    wrong.write_text("not-the-mongo-password\n")
    env = {**secured.settings().as_env(), "STREAMCRAWL_MONGO_PASSWORD_FILE": str(wrong)}
    result = _cli(env, "run", "sink")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert errors == [
        "streamcrawl: error: MongoDB refused the sink (Authentication failed.): check the user "
        "in STREAMCRAWL_MONGO_URI and STREAMCRAWL_MONGO_PASSWORD_FILE"
    ], output
    assert "not-the-mongo-password" not in output
    _assert_no_secret(secured, output, "the sink's output")
