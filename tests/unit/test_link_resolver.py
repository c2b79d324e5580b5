"""LinkResolver's string-only path must agree with urljoin-based resolution everywhere."""

from __future__ import annotations

import random

import pytest
from streamcrawl.parser.extract import MAX_LINK_CHARS, LinkResolver, _absolute

BASES = [
    "http://example.com",
    "http://example.com/",
    "https://example.com/a/b/c.html",
    "http://127.0.0.1:8000/library/functions.html",
    "http://Example.COM:80/dir/",
    "http://example.com/a/b/?q=1",
    "http://example.com/a;params/b",
    "http://example.com/a//b/c",
    "http://user@example.com/x/y",
    "http://[::1]:8080/v6/page",
    "http://example.com/%7Euser/index.html",
    "http://example.com/a b/c",
]
PIECES = [
    "a",
    "b",
    "..",
    ".",
    "",
    "x.html",
    "%20",
    "?",
    "q=1",
    "#",
    "f",
    ";",
    ":",
    "//",
    "~",
    "é",
    " ",
    "\t",
    "http://",
    "https://",
    "HTTP://",
    "http:",
]


def _random_href(rng: random.Random) -> str:
    return "".join(
        rng.choice(PIECES) + rng.choice(["/", "", "/", "?", "#"]) for _ in range(rng.randint(1, 6))
    )


@pytest.mark.parametrize("base", BASES)
def test_resolver_agrees_with_urljoin_on_random_references(base: str) -> None:
    rng = random.Random(base)
    resolver = LinkResolver(base)
    for _ in range(3000):
        href = _random_href(rng)
        assert resolver.resolve(href) == _absolute(base, href), (base, href)


@pytest.mark.parametrize(
    "href",
    [
        "../library/functions.html#abs",
        "./",
        "..",
        "../../../../x",
        "/abs/../path/./x",
        "?only=query",
        "page?",
        "a//b",
        "//other.example/x",
        "mailto:x@example.com",
        "https://other.example/y",
        "https://other.example/a/../b/./c#frag",
        "http://other.example",
        "http://[::1/x",
        "https://" + "x" * MAX_LINK_CHARS,
        "x" * (MAX_LINK_CHARS + 1),
    ],
)
def test_resolver_agrees_with_urljoin_on_known_cases(href: str) -> None:
    base = "http://127.0.0.1:8000/library/functions.html"
    assert LinkResolver(base).resolve(href) == _absolute(base, href)


def test_plain_references_resolve_as_rfc3986_says() -> None:
    resolver = LinkResolver("http://h.example/a/b/c.html")
    assert resolver.resolve("../d.html#x") == "http://h.example/a/d.html"
    assert resolver.resolve("e/f?g=1") == "http://h.example/a/b/e/f?g=1"
    assert resolver.resolve("/root") == "http://h.example/root"


def test_resolutions_remembered_across_pages_never_leak_between_bases() -> None:
    """The resolved hrefs kept across pages (by base directory) give every base exactly
    what urljoin gives it, with pages of bases sharing a directory interleaved."""
    bases = [
        *BASES,
        "https://example.com/a/b/d.html",
        "https://example.com/a/b/c.html?x=1",
        "https://example.com/a/b/",
        "https://example.org/a/b/c.html",
    ]
    rng = random.Random(7)
    resolvers = {base: LinkResolver(base) for base in bases}
    for _ in range(20000):
        base = rng.choice(bases)
        href = _random_href(rng)
        assert resolvers[base].resolve(href) == _absolute(base, href), (base, href)
