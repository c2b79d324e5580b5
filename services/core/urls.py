"""URL canonicalisation and crawl scope: pure functions, no I/O."""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from w3lib.url import canonicalize_url

from .errors import ReasonedError

ALLOWED_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Query and ``;path`` parameters that carry a session id, not content: the default of
# ``Settings.session_params``; callers with settings pass ``settings.session_params``.
DEFAULT_SESSION_PARAMS: tuple[str, ...] = (
    "jsessionid",
    "phpsessid",
    "sid",
    "sessionid",
    "session_id",
    "sessid",
    "aspsessionid",
    "cfid",
    "cftoken",
)
# IIS names its cookie-less session parameter ASPSESSIONID<8 random letters>: a prefix.
_PREFIX_SESSION_PARAMS = ("aspsessionid",)


class InvalidURL(ReasonedError):
    """A string that is not a fetchable http(s) URL; the message is the reason."""


def canonicalize(
    url: str, max_length: int = 2048, session_params: Iterable[str] = DEFAULT_SESSION_PARAMS
) -> str:
    """One spelling per resource: lower-case scheme and host, no default port, no
    fragment, dot-segments resolved, query arguments sorted, percent-encoding normalised,
    session ids (query parameters and ``;name=value`` path parameters whose name, in
    lower case, is one of ``session_params``; ``aspsessionid`` also as a prefix) removed.

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
        canonical = canonicalize_url(
            _strip_session_ids(text, parts, _session_names(session_params))
        )
    except InvalidURL:
        raise
    except ValueError as exc:
        raise InvalidURL("invalid_url", f"{exc} in {text[:200]!r}") from exc
    result = urlsplit(canonical)
    host = (result.hostname or "").rstrip(".")
    if not valid_host(host):
        raise InvalidURL("invalid_host", f"host {host[:200]!r} in {text[:200]!r}")
    netloc = host if ":" not in host else f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    return urlunsplit((scheme, netloc, result.path or "/", result.query, ""))


# A DNS name after IDNA encoding: labels of letters, digits, '-' and '_' (seen in real
# hostnames), 1-63 characters each, 253 in all.
_HOSTNAME = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}")


def valid_host(host: str) -> bool:
    """An IP address, or a DNS name whose last label is not a number: browsers read
    ``0x7f.1`` or ``256.1`` as (invalid) IPv4 addresses, so no crawler should guess."""
    if ":" in host or host[-1:].isdigit():
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            if ":" in host:
                return False
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        return False
    return not host.rsplit(".", 1)[-1].isdigit()


def canonical_domain(domain: str) -> str:
    """A scope domain (``allow_domains``) in the form canonical URLs have: lower case,
    IDNA-encoded, without a leading or trailing dot. Raises :class:`InvalidURL`."""
    name = domain.strip().strip(".")
    try:  # an IP address, bracketed or not, as canonical URLs write it (without brackets)
        return ipaddress.ip_address(name.removeprefix("[").removesuffix("]")).compressed
    except ValueError:
        return urlsplit(canonicalize(f"http://{name}/")).hostname or ""


@lru_cache(maxsize=32)
def _session_names_cached(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(name.strip().lower() for name in names if name.strip())


def _session_names(names: Iterable[str]) -> frozenset[str]:
    return _session_names_cached(tuple(names))


def _is_session_param(name: str, session_names: frozenset[str]) -> bool:
    lowered = unquote(name).strip().lower()
    if lowered in session_names:
        return True
    return any(
        lowered.startswith(prefix) for prefix in _PREFIX_SESSION_PARAMS if prefix in session_names
    )


def _strip_session_ids(text: str, parts: SplitResult, session_names: frozenset[str]) -> str:
    """``text`` (split as ``parts``) without its session-id query and path parameters."""
    path = parts.path
    if ";" in path:
        segments = []
        for segment in path.split("/"):
            base, *params = segment.split(";")
            kept = [p for p in params if not _is_session_param(p.split("=", 1)[0], session_names)]
            segments.append(";".join([base, *kept]))
        path = "/".join(segments)
    query = parts.query
    if query:
        query = "&".join(
            arg
            for arg in query.split("&")
            if not _is_session_param(arg.split("=", 1)[0], session_names)
        )
    if path == parts.path and query == parts.query:
        return text
    return urlunsplit((parts.scheme, parts.netloc, path, query, parts.fragment))


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


def repeated_segments(url: str) -> int:
    """How often the most frequent non-empty path segment occurs in ``url``'s path.

    A relative-link loop grows a path by repeating one segment (``/loopdir/x/x/x/``) or a
    sequence of them (``/a/b/a/b/a/b/``); a sequence repeated k times has each of its
    segments k times, so this one count catches both. It counts occurrences anywhere in
    the path, not just adjacent ones: ``/2024/01/01/`` counts 2 (kept with the default
    limit of 2), while a real path with one segment three times (``/1/2/1/1/``,
    ``/en/a/en/b/en/``) counts 3 and is cut too, a false positive accepted as rare.
    """
    counts = Counter(segment for segment in urlsplit(url).path.split("/") if segment)
    return max(counts.values(), default=0)


# A year 1900-2199 standing alone (a whole path segment or query value).
_YEAR = re.compile(r"(?:19|20|21)\d\d")
_MONTH = re.compile(r"0?[1-9]|1[0-2]")
_DAY = re.compile(r"0?[1-9]|[12]\d|3[01]")
# yyyy-mm or yyyy-mm-dd anywhere in a segment or value, not inside a longer number.
_ISO_DATE = re.compile(
    r"(?<!\d)(?:19|20|21)\d\d-(?:0?[1-9]|1[0-2])(?:-(?:0?[1-9]|[12]\d|3[01]))?(?!\d)"
)
_DIGITS = re.compile(r"\d+")
# Query keys whose numeric values are dates or parts of one.
_DATE_KEYS = frozenset({"year", "month", "day", "date", "ym", "ymd", "cal", "week"})
# Cheap necessary conditions, so most URLs skip the exact parse (dedup runs it per URL).
_YEAR_HINT = re.compile(r"(?:19|20|21)\d\d")
_DATE_KEY_HINTS = tuple(f"{key}=" for key in sorted(_DATE_KEYS))


def _might_be_dated(url: str) -> bool:
    if _YEAR_HINT.search(url):
        return True
    if "=" not in url:
        return False
    lowered = url.lower()
    return any(hint in lowered for hint in _DATE_KEY_HINTS)


def _templated(match: re.Match[str]) -> str:
    return _DIGITS.sub("N", match.group(0))


def _calendar_path(path: str) -> tuple[str, bool]:
    segments = path.split("/")
    found = False
    i = 0
    while i < len(segments):
        if _YEAR.fullmatch(segments[i]):
            found = True
            segments[i] = "N"
            # Month and day segments right after a year are part of the date.
            for part in (_MONTH, _DAY):
                if i + 1 < len(segments) and part.fullmatch(segments[i + 1]):
                    i += 1
                    segments[i] = "N"
                else:
                    break
        else:
            replaced, count = _ISO_DATE.subn(_templated, segments[i])
            if count:
                found = True
                segments[i] = replaced
        i += 1
    return "/".join(segments), found


def _calendar_query(query: str) -> tuple[str, bool]:
    found = False
    args = []
    for arg in query.split("&"):
        key, sep, value = arg.partition("=")
        if value and (
            (unquote(key).lower() in _DATE_KEYS and value.isdigit()) or _YEAR.fullmatch(value)
        ):
            found = True
            value = "N"
        else:
            value, count = _ISO_DATE.subn(_templated, value)
            found = found or bool(count)
        args.append(f"{key}{sep}{value}")
    return "&".join(args), found


def calendar_pattern(url: str) -> str | None:
    """The date-shaped template of ``url`` (``host/calendar/N/N``), or None if it has none.

    Date-shaped: a year 1900-2199 as a whole path segment (with the month and day
    segments that follow it), ``yyyy-mm`` or ``yyyy-mm-dd`` inside a segment or query
    value, a query value that is a year, or a numeric value of a query key such as
    ``year``, ``month``, ``day``, ``date``, ``ym``, ``cal``. Only those date parts become
    ``N``; every other character is kept, so two pages share a template only when they
    differ in their dates alone (an endless calendar), while dated articles with their
    own slugs or ids (``/2024/01/15/story-123.html``) each get their own. The host is
    part of the template. A number that happens to be a year (``/product/2000``) is
    taken for one: such a template covers at most 300 values.
    """
    if not _might_be_dated(url):
        return None
    parts = urlsplit(url)
    path, in_path = _calendar_path(parts.path)
    query, in_query = _calendar_query(parts.query) if parts.query else ("", False)
    if not (in_path or in_query):
        return None
    return f"{parts.netloc}{path}" + (f"?{query}" if query else "")
