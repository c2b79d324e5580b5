"""MongoDB-wire servers for the sink benchmarks: FerretDB 1.24 on SQLite (the project's
build, or another binary given by path) or on a private PostgreSQL cluster (Debian's
PostgreSQL, initdb'd into a temporary directory)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pymongo import MongoClient
from sink_writes import free_port
from streamcrawl.localstack.provision import ensure_ferretdb

# Variants of the sqlite backend with SQLite settings in the URL (FerretDB passes them on).
SQLITE_PRAGMAS = {
    "sqlite-normal": "_pragma=synchronous(normal)",
    "sqlite-cache": "_pragma=cache_size(-65536)",
    "sqlite-normal-cache": "_pragma=synchronous(normal)&_pragma=cache_size(-65536)",
}
STOCK_FERRETDB = Path.home() / ".cache" / "streamcrawl" / "ferretdb-v1.24.2" / "ferretdb"


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise SystemExit(f"{name} not found: apt-get install postgresql")


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the ``postgres`` system user then."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextmanager
def postgresql(root: Path) -> Iterator[str]:
    """A private PostgreSQL cluster under ``root``; yields FerretDB's --postgresql-url."""
    data = root / "pgdata"
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        for parent in root.parents[: len(root.parents) - 1]:
            if parent.stat().st_uid == 0 and parent.stat().st_mode & 0o005 != 0o005:
                parent.chmod(parent.stat().st_mode | 0o005)  # mkdtemp's 0700 shuts it out
    subprocess.run(
        _as_postgres(
            [_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        ),
        check=True,
        capture_output=True,
    )
    port = free_port()
    subprocess.run(
        _as_postgres(
            [
                _pg_bin("pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "postgres.log"),
                "-w",
                "-o",
                f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c shared_buffers=256MB",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            _as_postgres(
                [
                    _pg_bin("createdb"),
                    "-h",
                    str(root),
                    "-p",
                    str(port),
                    "-U",
                    "postgres",
                    "ferretdb",
                ]
            ),
            check=True,
            capture_output=True,
        )
        yield f"postgres://postgres@127.0.0.1:{port}/ferretdb"
    finally:
        subprocess.run(
            _as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            check=False,
            capture_output=True,
        )


@contextmanager
def ferretdb(backend: str, root: Path) -> Iterator[MongoClient[dict[str, object]]]:
    """FerretDB with ``backend`` (sqlite, sqlite-stock, postgresql) on a free port."""
    port = free_port()
    common = [
        f"--listen-addr=127.0.0.1:{port}",
        "--telemetry=disable",
        f"--state-dir={root}",
        "--debug-addr=-",
        "--log-level=error",
    ]
    with _backend_flags(backend, root) as (binary, flags):
        server = subprocess.Popen([binary, *flags, *common])
        client: MongoClient[dict[str, object]] = MongoClient(
            f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=30000
        )
        try:
            client.admin.command("ping")
            yield client
        finally:
            client.close()
            server.terminate()
            server.wait()


@contextmanager
def _backend_flags(backend: str, root: Path) -> Iterator[tuple[str, list[str]]]:
    (root / "data").mkdir(parents=True, exist_ok=True)
    sqlite = ["--handler=sqlite", f"--sqlite-url=file:{root / 'data'}/"]
    if backend == "sqlite":
        yield str(ensure_ferretdb()), sqlite
    elif backend in SQLITE_PRAGMAS:
        url = f"--sqlite-url=file:{root / 'data'}/?{SQLITE_PRAGMAS[backend]}"
        yield str(ensure_ferretdb()), ["--handler=sqlite", url]
    elif backend == "sqlite-stock":
        if not STOCK_FERRETDB.exists():
            raise SystemExit(f"no stock FerretDB build at {STOCK_FERRETDB}")
        yield str(STOCK_FERRETDB), sqlite
    elif backend == "postgresql":
        with postgresql(root / "pg") as url:
            yield str(ensure_ferretdb()), ["--handler=postgresql", f"--postgresql-url={url}"]
    else:
        raise SystemExit(f"unknown backend {backend!r}")
