"""Credentials read from files (mounted Kubernetes Secrets), and keeping them out of logs.

A secret is read where a client is made, never carried in the environment or the settings
(which child processes and ``/metrics`` never see as anything but a path). Every secret read
is remembered, and :class:`RedactingFilter` removes it, and the password part of any
connection URI, from every log line, exceptions included.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from urllib.parse import quote, unquote

from .config import PREFIX, Settings

MASK = "***"
_known: set[str] = set()
_lock = threading.Lock()
# scheme://user:password@ -> scheme://user:***@ (MongoDB, PostgreSQL, proxy URLs alike).
_URI_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):(?P<pw>[^@\s]*)@")


def read_secret(path: str, what: str) -> str:
    """The secret in ``path`` (one trailing newline dropped, as ``echo`` and Secrets write
    it); remembered so that log lines never show it. ValueError names ``what`` and the
    path, never the content."""
    try:
        secret = Path(path).read_text().removesuffix("\n")
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from exc
    if not secret:
        raise ValueError(f"{what}: {path} is empty")
    with _lock:
        _known.add(secret)
        _known.add(quote(secret, safe=""))
    return secret


def redact(text: str) -> str:
    """``text`` without any secret read so far, nor a password in a connection URI."""
    text = _URI_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_uri(uri: str) -> str:
    return redact(uri)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and traceback) with :func:`redact` before any
    handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Put a :class:`RedactingFilter` on every handler of ``logger`` (the root logger):
    filters on handlers see the records of every logger below it."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def mongo_client_uri(settings: Settings) -> str:
    """MONGO_URI with the password from MONGO_PASSWORD_FILE merged in (the URI names the
    user); MONGO_URI itself when no file is set. A password already in the URI is
    remembered for redaction too."""
    uri = settings.mongo_uri
    scheme, sep, rest = uri.partition("://")
    hosts_end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, tail = rest[:hosts_end], rest[hosts_end:]
    userinfo, at, hosts = authority.rpartition("@")
    if at and ":" in userinfo:
        with _lock:
            password = userinfo.split(":", 1)[1]
            _known.update({password, unquote(password)} - {""})
    if not settings.mongo_password_file:
        return uri
    user = userinfo.split(":", 1)[0] if at else ""
    if not sep or not user:
        raise ValueError(
            f"{PREFIX}MONGO_PASSWORD_FILE needs the user name in {PREFIX}MONGO_URI "
            "(mongodb://USER@host/?authSource=DB)"
        )
    password = read_secret(settings.mongo_password_file, f"{PREFIX}MONGO_PASSWORD_FILE")
    return f"{scheme}://{user}:{quote(password, safe='')}@{hosts}{tail}"
