"""URL canonicalisation and crawl scope: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

from w3lib.url import canonicalize_url

from .errors import ReasonedError

ALLOWED_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class InvalidURL(ReasonedError):
    """A string that is not a fetchable http(s) URL; the message is the reason."""


def canonicalize(url: str, max_length: int = 2048) -> str:
    """One spelling per resource: lower-case scheme and host, no default port, no
    fragment, dot-segments resolved, query arguments sorted, percent-encoding normalised.

    Raises :class:`InvalidURL` (with a machine-readable ``reason``) otherwise.
    """
    text = url.strip()
    if not text:
        raise InvalidURL("empty_url", "the URL is empty")
    if len(text) > max_length:
        raise InvalidURL("url_too_long", f"{len(text)} characters > {max_length}")
    if any(ord(char) < 32 for char in text):
        raise InvalidURL("invalid_url", "control characters in the URL")
    try:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise InvalidURL(
                "unsupported_scheme", f"scheme {scheme or '(none)'!r} in {text[:200]!r}"
            )
        if not parts.hostname:
            raise InvalidURL("invalid_url", f"no host in {text[:200]!r}")
        port = parts.port
        canonical = canonicalize_url(text)
    except InvalidURL:
        raise
    except ValueError as exc:
        raise InvalidURL("invalid_url", f"{exc} in {text[:200]!r}") from exc
    result = urlsplit(canonical)
    host = (result.hostname or "").rstrip(".")
    netloc = host if ":" not in host else f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    return urlunsplit((scheme, netloc, result.path or "/", result.query, ""))


def host_of(url: str) -> str:
    """The partitioning key of a canonical URL: host plus any non-default port."""
    return urlsplit(url).netloc


def hostname_of(url: str) -> str:
    return urlsplit(url).hostname or ""


def in_scope(url: str, allow_domains: Iterable[str]) -> bool:
    """True when the URL's host is one of ``allow_domains`` or a subdomain of one."""
    hostname = hostname_of(url)
    for domain in allow_domains:
        domain = domain.lower().lstrip(".")
        if hostname == domain or hostname.endswith("." + domain):
            return True
    return False
