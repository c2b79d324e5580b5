"""Serve a generated site with Debian's nginx on 127.0.0.1, logging every request."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

NGINX = "/usr/sbin/nginx"
# Tab-separated: nginx escapes control characters (a tab becomes \x09) in logged
# variables, so a field can never contain the separator.
_LOG_FORMAT = "\\t".join(
    ("$msec", "$request_method", "$request_uri", "$status", "$body_bytes_sent", "$http_user_agent")
)
# The readiness probe's requests are left out of access_log_entries(), so tests can
# count every request a crawler made.
_PROBE_AGENT = "streamcrawl-nginx-readiness-probe"
_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


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


def page_requests(entries: list[AccessEntry]) -> list[AccessEntry]:
    """The entries of pages: all but robots.txt (which each crawl asks for once)."""
    return [entry for entry in entries if entry.path != "/robots.txt"]


def nginx_binary() -> str:
    """Path of the nginx executable; raises NginxError when it is not installed."""
    found = NGINX if Path(NGINX).exists() else shutil.which("nginx")
    if found is None:
        raise NginxError("nginx is not installed (apt-get install -y nginx-light).")
    return found


def _check_port_free(port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise NginxError(f"Port 127.0.0.1:{port} is already in use.") from exc


def _answers_http(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        connection.request("HEAD", "/", headers={"User-Agent": _PROBE_AGENT})
        connection.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        connection.close()


def _parse_entry(line: str) -> AccessEntry | None:
    parts = line.split("\t")
    if len(parts) != 6:
        return None
    ts, method, path, status, size, agent = parts
    return AccessEntry(float(ts), method, path, int(status), int(size), agent)


class NginxSite:
    """nginx serving ``root/www`` on 127.0.0.1:``port``; config, logs and temp files
    all live under ``root``. Use as a context manager or call start()/stop()."""

    def __init__(self, root: Path, port: int, limit_rate: str | None = None) -> None:
        """``limit_rate``: nginx's per-connection send rate (``"1m"``: 1 MB/s), to serve
        as a site across a real network would, where a body costs transfer time."""
        self.root = root.resolve()
        self.port = port
        self.limit_rate = limit_rate
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    @property
    def error_log(self) -> Path:
        return self.root / "error.log"

    def _config(self) -> str:
        # As root, workers would drop to "nobody" and could not read a 0700 tmp dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        redirects = self.root / "redirects.conf"
        include = f"include {redirects};\n" if redirects.exists() else ""
        # Debian's build points temp paths at /var/lib/nginx; keep everything under root.
        temps = "".join(f"{kind}_temp_path {self.root / 'tmp' / kind};\n" for kind in _TEMP_KINDS)
        rate = f"limit_rate {self.limit_rate};\n" if self.limit_rate else ""
        return (
            f"{user}daemon off;\nmaster_process on;\nworker_processes 1;\n"
            f"pid {self.root / 'nginx.pid'};\nerror_log {self.error_log} warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            f"log_format crawl '{_LOG_FORMAT}';\naccess_log {self.access_log} crawl;\n{temps}"
            "types { text/html html; text/plain txt; application/xml xml; }\n"
            "default_type application/octet-stream;\nkeepalive_requests 100000;\n"
            f"server {{\nlisten 127.0.0.1:{self.port};\nroot {self.root / 'www'};\n"
            f"absolute_redirect off;\nindex index.html;\n{rate}{include}}}\n}}\n"
        )

    def start(self) -> NginxSite:
        """Start nginx and return once it answers HTTP; raises NginxError otherwise."""
        if self._process is not None and self._process.poll() is None:
            return self
        binary = nginx_binary()
        _check_port_free(self.port)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        config = self.root / "nginx.conf"
        config.write_text(self._config(), encoding="utf-8")
        # -e: nginx opens its error log before reading the config; keep it off /var/log.
        command = [binary, "-p", str(self.root), "-c", str(config), "-e", str(self.error_log)]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float = 10.0) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise NginxError(f"nginx exited at start: {self._startup_error()}.")
            if _answers_http(self.port):
                return
            time.sleep(0.05)
        raise NginxError(f"nginx did not answer HTTP on port {self.port} within {timeout:.0f}s.")

    def _startup_error(self) -> str:
        assert self._process is not None and self._process.stderr is not None
        text = self._process.stderr.read().decode(errors="replace").strip()
        if not text and self.error_log.exists():
            text = self.error_log.read_text(errors="replace").strip()
        last = text.splitlines()[-1] if text else "no error output"
        return last[:300]

    def stop(self) -> None:
        """Stop nginx gracefully (SIGQUIT lets the worker flush its log), then force it."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT)
            try:
                process.wait(10)
                graceful = True  # a quitting master waits for its workers
            except subprocess.TimeoutExpired:
                graceful = False
        else:
            graceful = False  # the master died on its own; its workers may linger
        if not graceful:
            # Master and workers share the new session's process group: kill them all.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def access_log_entries(self) -> list[AccessEntry]:
        """Every logged request, oldest first, without the readiness probes."""
        if not self.access_log.exists():
            return []
        lines = self.access_log.read_text(encoding="utf-8", errors="replace").splitlines()
        entries = (_parse_entry(line) for line in lines)
        return [e for e in entries if e is not None and e.user_agent != _PROBE_AGENT]

    def __enter__(self) -> NginxSite:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
