"""Bad input for every topic, as a faulty producer would write it, each record with the
outcome a demanding user expects of the stage(s) reading it.

A record is either dead-lettered (``dlq``: the reason each reading stage must give) or
processed: valid but unusual records (IPv6 literals, IDN hosts, a record just under the
topic's size limit) must come out downstream like any other (``outputs``: URLs expected
there), and a valid URL left out on purpose is counted (``filtered``), never silently
dropped. Nothing may crash a stage or hold up its partition.
``tests/integration/test_bad_input.py`` produces each corpus between good records and
checks all of it.
"""

from __future__ import annotations

import base64
import json
import random
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgspec
from streamcrawl.core.messages import (
    Discovered,
    Fetch,
    Fetched,
    Page,
    Retry,
    Scope,
    Timings,
    fetch_from,
    retry_from,
)

# The stages reading each topic (by suffix), and what they write.
READERS: dict[str, tuple[str, ...]] = {
    "seeds": ("frontier",),
    "discovered": ("dedup",),
    "fetch": ("fetcher",),
    "retry": ("delay",),
    "fetched": ("parser",),
    "pages": ("frontier", "sink"),
}

# Larger records are produced with aiokafka (kcat's default message.max.bytes is 1,000,000).
KCAT_MAX_BYTES = 900_000
# How far under a topic's max.message.bytes the near-limit records are: room for the record
# batch's header and the key.
LIMIT_MARGIN = 1024
CRAWL_ID = "bad-input"


@dataclass(frozen=True)
class Case:
    """One record of a corpus and what must become of it."""

    name: str
    value: bytes | None
    dlq: dict[str, str] = field(default_factory=dict)
    """Stage -> the reason it must dead-letter the record with. Other readers process it."""
    outputs: tuple[str, ...] = ()
    """URLs that must appear downstream (an output topic, or MongoDB for the sink)."""
    filtered: dict[str, int] = field(default_factory=dict)
    """Reason -> how many URLs of the record the frontier must count as filtered."""
    key: bytes | None = None

    @property
    def kcat(self) -> bool:
        """Produced with kcat, as a user would, unless it needs what kcat is not given here:
        an empty or null value (kcat skips an empty file), a key, or a size past kcat's
        default limit."""
        return bool(self.value) and self.key is None and len(self.value or b"") <= KCAT_MAX_BYTES


# -- valid messages ------------------------------------------------------------------------------


def _netloc(url: str) -> str:
    return url.split("/", 3)[2]


def _hostname(url: str) -> str:
    netloc = _netloc(url)
    if netloc.startswith("["):
        return netloc[1 : netloc.index("]")]
    return netloc.rsplit(":", 1)[0]


def _scope(url: str) -> Scope:
    return Scope(allow_domains=[_hostname(url)], max_depth=3, max_pages=0)


def discovered(url: str) -> Discovered:
    return Discovered(
        url=url,
        host=_netloc(url),
        crawl_id=CRAWL_ID,
        depth=1,
        priority=5,
        scope=_scope(url),
        discovered_at=1.0,
    )


def fetch(url: str) -> Fetch:
    return fetch_from(discovered(url), 2.0)


def retry(url: str, due_at: float = 0.0) -> Retry:
    """A retry already due (released at once)."""
    return retry_from(fetch(url), due_at, "http_503")


def fetched(url: str, html: bytes = b"<html><title>t</title><p>hello</p></html>") -> Fetched:
    return Fetched(
        url=url,
        final_url=url,
        host=_netloc(url),
        crawl_id=CRAWL_ID,
        depth=1,
        scope=_scope(url),
        status=200,
        headers={"content-type": "text/html; charset=utf-8"},
        content_type="text/html; charset=utf-8",
        body=zlib.compress(html),
        body_bytes=len(html),
        truncated=False,
        fetched_at=3.0,
        timings=Timings(total_s=0.01),
    )


def page(url: str, links: list[str] | None = None, **changes: Any) -> Page:
    fields: dict[str, Any] = {
        "url": url,
        "final_url": url,
        "host": _netloc(url),
        "status": 200,
        "fetched_at": 3.0,
        "content_type": "text/html",
        "title": "t",
        "text": "text",
        "links": links or [],
        "canonical": None,
        "content_hash": None,
        "depth": 0,
        "crawl_id": CRAWL_ID,
        "scope": _scope(url),
        "redirect_chain": [],
        "redirect_to": None,
        "noindex": False,
        "nofollow": False,
    }
    fields.update(changes)
    return Page(**fields)


def message(topic: str, url: str) -> dict[str, Any]:
    """A valid message of ``topic`` for ``url``, as a dict a case may break."""
    builders = {
        "discovered": discovered,
        "fetch": fetch,
        "retry": retry,
        "fetched": fetched,
        "pages": page,
    }
    built: dict[str, Any] = msgspec.to_builtins(builders[topic](url))
    return built


def good_value(topic: str, url: str) -> bytes:
    """A good record of ``topic`` for ``url``: what the pipeline itself would write."""
    if topic == "seeds":
        return url.encode()
    return to_json(message(topic, url))


def to_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def padded(value: dict[str, Any], size: int) -> bytes:
    """``value`` as JSON of exactly ``size`` bytes, padded with whitespace: still valid."""
    text = to_json(value)
    assert len(text) <= size
    return b"{" + b" " * (size - len(text)) + text[1:]


def filled(value: dict[str, Any], size: int, path: tuple[str, ...]) -> bytes:
    """``value`` as JSON of exactly ``size`` bytes, the string at ``path`` grown to fill it."""
    target = value
    for name in path[:-1]:
        target = target[name]
    target[path[-1]] = ""
    room = size - len(to_json(value))
    target[path[-1]] = "x" * room
    text = to_json(value)
    assert len(text) == size
    return text


def garbage(seed: int, size: int) -> bytes:
    """Random bytes that are certainly not UTF-8 (a 0xFF byte never is)."""
    data = bytearray(random.Random(seed).randbytes(size))
    data[0] = 0xFF
    return bytes(data)


def nested(depth: int) -> bytes:
    """Valid JSON nested ``depth`` arrays deep."""
    return b'{"url": "http://good.example/", "meta": {"a": ' + b"[" * depth + b"]" * depth + b"}}"


# -- the corpora ---------------------------------------------------------------------------------


def corpus(topic: str, limit: int, base: str = "http://good.example") -> list[Case]:
    """The bad (and valid but unusual) records of ``topic``, whose max.message.bytes is
    ``limit``; ``base`` is the origin of the records that must be processed."""
    if topic == "seeds":
        return seeds_corpus(limit)
    cases = _common(topic, base) + _near_limit(topic, limit, base)
    return cases + _SPECIFIC[topic](base)


def _dlq(topic: str, reason: str) -> dict[str, str]:
    return dict.fromkeys(READERS[topic], reason)


def _common(topic: str, base: str) -> list[Case]:
    """What every JSON topic gets: broken bytes, broken JSON, wrong types, bad URLs."""
    template = message(topic, f"{base}/template")
    host = template["host"]

    def dlq(reason: str) -> dict[str, str]:
        return _dlq(topic, reason)

    def changed(**fields: Any) -> bytes:
        return to_json({**template, **fields})

    without_url = {name: value for name, value in template.items() if name != "url"}
    text = to_json(template)
    return [
        Case("not json", b"not a url", dlq("invalid_json")),
        Case("a plain url", f"{base}/plain".encode(), dlq("invalid_json")),
        Case("invalid utf-8", text.replace(b"/template", b"/\xc3\x28", 1), dlq("invalid_json")),
        Case("binary garbage", garbage(1, 512), dlq("invalid_json")),
        Case("empty value", b"", dlq("empty_value")),
        Case("null value (tombstone)", None, dlq("empty_value"), key=b"tombstone"),
        Case("json null", b"null", dlq("schema_violation")),
        Case("json array", b"[1, 2]", dlq("schema_violation")),
        Case("truncated json", text[: len(text) // 2], dlq("invalid_json")),
        Case("lone surrogate", text.replace(b"/template", b"/\\ud800", 1), dlq("invalid_json")),
        Case("nested 5000 deep", nested(5000), dlq("invalid_json")),
        Case("url a number", changed(url=12), dlq("schema_violation")),
        Case("url missing", to_json(without_url), dlq("schema_violation")),
        Case("unknown field", changed(surprise=1), dlq("schema_violation")),
        Case("depth negative", changed(depth=-1), dlq("schema_violation")),
        Case("depth a string", changed(depth="1"), dlq("schema_violation")),
        Case("javascript url", changed(url="javascript:alert(1)"), dlq("unsupported_scheme")),
        Case("mailto url", changed(url=f"mailto:a@{host}"), dlq("unsupported_scheme")),
        Case("file url", changed(url="file:///etc/passwd"), dlq("unsupported_scheme")),
        Case("data url", changed(url="data:text/html,<b>x</b>"), dlq("unsupported_scheme")),
        Case("unknown scheme", changed(url=f"gopher://{host}/"), dlq("unsupported_scheme")),
        Case("not a url", changed(url="not a url"), dlq("unsupported_scheme")),
        Case("no host", changed(url="http:///path"), dlq("invalid_url")),
        Case("broken ipv6", changed(url="http://[::1/x", host="[::1"), dlq("invalid_url")),
        Case("host mismatch", changed(url="http://other.example/x"), dlq("host_mismatch")),
        Case("100 KB url", changed(url=f"{base}/{'a' * 100_000}"), dlq("schema_violation")),
        Case("meta too large", changed(meta={"k": "x" * 100_000}), dlq("meta_too_large")),
    ]


def _near_limit(topic: str, limit: int, base: str) -> list[Case]:
    """A valid record just under the topic's limit (processed), and an invalid one of that
    size (dead-lettered, its payload cut so the letter fits crawl.dlq)."""
    size = limit - LIMIT_MARGIN
    url = f"{base}/near-limit"
    value = message(topic, url)
    if topic == "pages":
        valid = filled(value, size, ("text",))  # a page with that much text
    elif topic == "fetched":
        value["headers"]["x-huge"] = ""
        valid = filled(value, size, ("headers", "x-huge"))  # a response with huge headers
    else:
        valid = padded(value, size)  # no field of these types may be that large
    invalid = filled({"url": ""}, size, ("url",))
    return [
        Case("valid, near the size limit", valid, outputs=(url,)),
        Case("invalid, near the size limit", invalid, _dlq(topic, "schema_violation")),
    ]


def _discovered_cases(base: str) -> list[Case]:
    ipv6, idn = "http://[2001:db8::1]:8080/v6", "http://xn--bcher-kva.example/idn"
    return [
        Case("ipv6 literal", good_value("discovered", ipv6), outputs=(ipv6,)),
        Case("idn host", good_value("discovered", idn), outputs=(idn,)),
    ]


def _fetch_cases(base: str) -> list[Case]:
    metadata = "http://169.254.169.254/latest/meta-data/"
    ipv6 = "http://[2001:db8::1]:8080/v6"
    return [
        # Valid URLs the fetcher must refuse to reach, visibly.
        Case("metadata address", good_value("fetch", metadata), {"fetcher": "forbidden_address"}),
        Case("ipv6 literal", good_value("fetch", ipv6), {"fetcher": "forbidden_address"}),
        Case(
            "attempt past the cap",
            to_json({**message("fetch", f"{base}/a"), "attempt": 101}),
            {"fetcher": "schema_violation"},
        ),
    ]


def _retry_cases(base: str) -> list[Case]:
    template = message("retry", f"{base}/due")
    ipv6, idn = "http://[2001:db8::1]:8080/v6", "http://xn--bcher-kva.example/idn"
    return [
        Case("ipv6 literal", good_value("retry", ipv6), outputs=(ipv6,)),
        Case("idn host", good_value("retry", idn), outputs=(idn,)),
        Case("due in 1e300 s", to_json({**template, "due_at": 1e300}), {"delay": "due_too_far"}),
        Case(
            "due_at a string",
            to_json({**template, "due_at": "soon"}),
            {"delay": "schema_violation"},
        ),
        Case(
            "due_at missing",
            to_json({k: v for k, v in template.items() if k != "due_at"}),
            {"delay": "schema_violation"},
        ),
        Case(
            "bad retry reason",
            to_json({**template, "retry_reason": "Bad Reason!"}),
            {"delay": "schema_violation"},
        ),
    ]


def _fetched_cases(base: str) -> list[Case]:
    def with_body(name: str, body: bytes, **fields: Any) -> bytes:
        value = message("fetched", f"{base}/{name}")
        value.update(body=base64.b64encode(body).decode(), **fields)
        return to_json(value)

    # A long <base href> makes each short href a 2 KB link: 80 KB of HTML, 10 MB of links.
    many_links = (
        f'<base href="{base}/{"l" * 2000}">' + "".join(f"<a href=?{n}>x</a>" for n in range(5000))
    ).encode()
    bomb = zlib.compress(b"\0" * (3 * 1024 * 1024), 9)  # over the 2 MiB default body cap
    html_garbage = garbage(3, 4096)
    return [
        Case("body not zlib", with_body("corrupt", b"not zlib"), {"parser": "corrupt_body"}),
        Case(
            "body not base64",
            to_json({**message("fetched", f"{base}/b64"), "body": "!!"}),
            {"parser": "schema_violation"},
        ),
        Case("zlib bomb", with_body("bomb", bomb), {"parser": "body_too_large"}),
        Case(
            "status 999",
            to_json({**message("fetched", f"{base}/s"), "status": 999}),
            {"parser": "schema_violation"},
        ),
        Case(
            "header value a number",
            to_json({**message("fetched", f"{base}/h"), "headers": {"x": 1}}),
            {"parser": "schema_violation"},
        ),
        # 5000 links of 2 KB: the page they make must still fit crawl.pages.
        Case(
            "5000 long links",
            with_body("links", zlib.compress(many_links)),
            outputs=(f"{base}/links",),
        ),
        Case(
            "binary garbage as html",
            with_body("garbage", zlib.compress(html_garbage)),
            outputs=(f"{base}/garbage",),
        ),
        Case(
            "redirect to javascript:",
            with_body(
                "redirect",
                zlib.compress(b""),
                status=302,
                headers={"location": "javascript:alert(1)"},
            ),
            outputs=(f"{base}/redirect",),
        ),
        Case(
            "garbage sitemap",
            with_body("sitemap", zlib.compress(html_garbage), kind="sitemap"),
            outputs=(f"{base}/sitemap",),
        ),
    ]


def _pages_cases(base: str) -> list[Case]:
    def with_meta(name: str, meta: dict[str, Any]) -> bytes:
        return to_json({**message("pages", f"{base}/{name}"), "meta": meta})

    refused = {"sink": "rejected_by_database"}
    links = [
        f"{base}/in-scope-1",
        f"{base}/in-scope-2?b=2&a=1",
        "javascript:alert(1)",
        "mailto:a@good.example",
        "file:///etc/passwd",
        "data:text/html,x",
        "gopher://good.example/",
        "not a url",
        "http://[2001:db8::1]/v6",
        "http://bücher.example/idn",
        "http://other.example/out",
        f"{base}/{'a' * 5000}",
        "http://a..example/",
        f"{base}/x/x/x/x",
    ]
    in_scope = (f"{base}/in-scope-1", f"{base}/in-scope-2?a=1&b=2")
    return [
        Case("nul in a meta key", with_meta("nul", {"a\u0000b": 1}), refused),
        Case("int past 64 bits in meta", with_meta("bigint", {"n": 2**70}), refused),
        Case("$-key in meta", with_meta("dollar", {"$where": "1"}), refused),
        Case(
            "meta objects nested 50 deep",
            with_meta("deep", json.loads('{"a": ' * 50 + "1" + "}" * 50)),
            outputs=(f"{base}/deep",),
        ),
        # FerretDB 1.24 stores no array inside an array (MongoDB does): the database's
        # refusal is a dead letter like any other.
        Case("nested arrays in meta", with_meta("arrays", {"a": [[1]]}), refused),
        Case(
            "links of every kind",
            to_json(message("pages", f"{base}/links") | {"links": links}),
            outputs=(f"{base}/links", *in_scope),
            filtered={
                "unsupported_scheme": 6,
                "out_of_scope": 3,
                "url_too_long": 1,
                "invalid_host": 1,
                "repeated_path_segments": 1,
            },
        ),
    ]


_SPECIFIC = {
    "discovered": _discovered_cases,
    "fetch": _fetch_cases,
    "retry": _retry_cases,
    "fetched": _fetched_cases,
    "pages": _pages_cases,
}


def seeds_corpus(limit: int) -> list[Case]:
    def dlq(reason: str) -> dict[str, str]:
        return _dlq("seeds", reason)

    def json_seed(**fields: Any) -> bytes:
        return to_json(fields)

    big_url = "http://good.example/" + "a" * 100_000
    return [
        Case("not a url", b"not a url", dlq("invalid_url")),
        Case("javascript", b"javascript:alert(1)", dlq("unsupported_scheme")),
        Case("mailto", b"mailto:a@good.example", dlq("unsupported_scheme")),
        Case("file", b"file:///etc/passwd", dlq("unsupported_scheme")),
        Case("data", b"data:text/html,hi", dlq("unsupported_scheme")),
        Case("unknown scheme", b"gopher://good.example/", dlq("unsupported_scheme")),
        Case("no scheme", b"good.example/x", dlq("unsupported_scheme")),
        Case(
            "ipv6 literal", b"http://[2001:db8::1]:8080/a", outputs=("http://[2001:db8::1]:8080/a",)
        ),
        Case("ipv6 loopback", b"http://[::1]/", outputs=("http://[::1]/",)),
        Case(
            "ipv6 literal, bracketed scope",
            json_seed(url="http://[2001:db8::2]/s", scope={"allow_domains": ["[2001:DB8::2]"]}),
            outputs=("http://[2001:db8::2]/s",),
        ),
        Case("broken ipv6", b"http://[::1/", dlq("invalid_url")),
        Case(
            "idn host",
            "http://bücher.example/straße".encode(),
            outputs=("http://xn--bcher-kva.example/stra%C3%9Fe",),
        ),
        Case(
            "idn host, unicode scope",
            json_seed(url="http://bücher.example/b", scope={"allow_domains": ["Bücher.example"]}),
            outputs=("http://xn--bcher-kva.example/b",),
        ),
        Case(
            "upper-case scheme and host",
            b"HTTP://GOOD.Example/Up",
            outputs=("http://good.example/Up",),
        ),
        Case("empty label", b"http://a..example/", dlq("invalid_host")),
        Case("hex ipv4 host", b"http://0x7f.1/", dlq("invalid_host")),
        Case("zero-width space host", "http://\u200b.example/".encode(), dlq("invalid_host")),
        Case("100 KB url", big_url.encode(), dlq("too_large")),
        Case("60 KB url", big_url[:60_000].encode(), dlq("url_too_long")),
        Case("100 KB url as json", json_seed(url=big_url), dlq("too_large")),
        Case("invalid utf-8", b"http://good.example/\xc3\x28", dlq("undecodable")),
        Case("binary garbage", garbage(2, 512), dlq("undecodable")),
        Case("nul in the url", b"http://good.example/\x00", dlq("invalid_url")),
        Case("empty value", b"", dlq("empty_value")),
        Case("whitespace only", b" \n\t ", dlq("empty_value")),
        Case("null value (tombstone)", None, dlq("empty_value"), key=b"tombstone"),
        Case("json missing url", b"{}", dlq("schema_violation")),
        Case("json url a number", b'{"url": 1}', dlq("schema_violation")),
        Case(
            "json unknown field",
            json_seed(url="http://good.example/", x=1),
            dlq("schema_violation"),
        ),
        Case("json array", b"[1, 2]", dlq("schema_violation")),
        Case("json string", b'"http://good.example/"', dlq("schema_violation")),
        Case("json truncated", b'{"url": "http://good.ex', dlq("invalid_json")),
        Case("json nested 5000 deep", nested(5000), dlq("invalid_json")),
        Case(
            "priority out of range",
            json_seed(url="http://good.example/", priority=10),
            dlq("schema_violation"),
        ),
        Case(
            "bad crawl id",
            json_seed(url="http://good.example/", crawl_id="a b"),
            dlq("schema_violation"),
        ),
        Case(
            "bad scope domain",
            json_seed(url="http://good.example/", scope={"allow_domains": ["a b"]}),
            dlq("invalid_scope"),
        ),
        Case(
            "out of scope",
            json_seed(url="http://good.example/", scope={"allow_domains": ["other.example"]}),
            dlq("out_of_scope"),
        ),
        Case(
            "with a long key",
            b"http://good.example/keyed",
            key=b"k" * 10_000,
            outputs=("http://good.example/keyed",),
        ),
        Case(
            "near the size limit",
            b"http://good.example/" + b"a" * (limit - LIMIT_MARGIN - 20),
            dlq("too_large"),
        ),
    ]
