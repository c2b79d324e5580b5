"""Serve a generated site with Debian's nginx on 127.0.0.1, logging every request."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

_LOG_FORMAT = (
    "'$msec\\t$request_method\\t$request_uri\\t$status\\t$body_bytes_sent\\t$http_user_agent'"
)


class NginxError(RuntimeError):
    """nginx is missing, the port is taken, or it did not start."""


@dataclass(frozen=True)
class AccessEntry:
    ts: float
    method: str
    path: str
    status: int
    bytes: int
    user_agent: str


def _nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        raise NginxError("nginx is not installed (apt-get install nginx-light)")
    return found


class NginxSite:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    def _config(self) -> str:
        temp = self.root / "tmp"
        user = "user root root;\n" if os.geteuid() == 0 else ""
        redirects = self.root / "redirects.conf"
        include = f"include {redirects};" if redirects.exists() else ""
        temps = "".join(
            f"{kind}_temp_path {temp / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return (
            f"{user}worker_processes 1;\ndaemon off;\npid {self.root / 'nginx.pid'};\n"
            f"error_log {self.root / 'error.log'} warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            f"log_format crawl {_LOG_FORMAT};\naccess_log {self.access_log} crawl;\n{temps}"
            "types { text/html html; text/plain txt; application/xml xml; }\n"
            "default_type application/octet-stream;\nkeepalive_requests 100000;\n"
            f"server {{\nlisten 127.0.0.1:{self.port};\nroot {self.root / 'www'};\n"
            f"absolute_redirect off;\nindex index.html;\n{include}\n}}\n}}\n"
        )

    def start(self) -> NginxSite:
        binary = _nginx_binary()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError as exc:
                raise NginxError(f"port {self.port} is taken") from exc
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        config = self.root / "nginx.conf"
        config.write_text(self._config())
        self._process = subprocess.Popen(
            [binary, "-p", str(self.root), "-c", str(config), "-e", str(self.root / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._wait_listening()
        return self

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                error = self._process.stderr.read().decode() if self._process.stderr else ""
                raise NginxError(f"nginx exited: {error.strip()[:300]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise NginxError(f"nginx did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGQUIT)  # graceful: finish requests, flush logs
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def access_log_entries(self) -> list[AccessEntry]:
        entries = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) == 6:
                entries.append(
                    AccessEntry(
                        float(parts[0]), parts[1], parts[2], int(parts[3]), int(parts[4]), parts[5]
                    )
                )
        return entries

    def __enter__(self) -> NginxSite:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
