from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from streamcrawl.core.config import Settings
from streamcrawl.core.messages import Discovered, Page, Scope, Seed, SeedScope, encode
from streamcrawl.core.urls import InvalidURL, canonicalize, host_of, in_scope
from streamcrawl.frontier.logic import Rejected, candidates_from_page, parse_seed, seed_candidate

SETTINGS = Settings()


def valid_discovered(candidate: Discovered) -> None:
    """What goes on crawl.discovered reads back as the same message."""
    assert msgspec.json.decode(encode(candidate), type=Discovered) == candidate


@pytest.mark.parametrize(
    "spelling",
    [
        "http://127.0.0.1:8080/s1/p3.html",
        "HTTP://127.0.0.1:8080/s1/p3.html",
        "http://127.0.0.1:8080/s1/p3.html#section",
        "http://127.0.0.1:8080/s1/../s1/./p3.html",
        " http://127.0.0.1:8080/s1/p3.html ",
    ],
)
def test_spellings_of_one_page_canonicalise_alike(spelling: str) -> None:
    assert canonicalize(spelling) == "http://127.0.0.1:8080/s1/p3.html"


def test_canonical_form_details() -> None:
    assert canonicalize("https://EXAMPLE.com:443/a?b=2&a=1") == "https://example.com/a?a=1&b=2"
    assert canonicalize("http://example.com:80") == "http://example.com/"
    assert canonicalize("http://bücher.de/x y") == "http://xn--bcher-kva.de/x%20y"
    assert host_of("http://example.com:8080/x") == "example.com:8080"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", "empty_url"),
        ("ftp://example.com/", "unsupported_scheme"),
        ("javascript:alert(1)", "unsupported_scheme"),
        ("http:///nohost", "invalid_url"),
        ("http://exa\x00mple.com/", "invalid_url"),
        ("http://x.com/" + "a" * 3000, "url_too_long"),
        ("http://[::1/", "invalid_url"),
    ],
)
def test_invalid_urls_have_reasons(url: str, reason: str) -> None:
    with pytest.raises(InvalidURL) as caught:
        canonicalize(url)
    assert caught.value.reason == reason


def test_scope_matches_domain_and_subdomains_only() -> None:
    assert in_scope("http://example.com/", ["example.com"])
    assert in_scope("http://www.example.com/", ["example.com"])
    assert not in_scope("http://badexample.com/", ["example.com"])
    assert not in_scope("http://example.com.evil.org/", ["example.com"])


def test_plain_text_seed_defaults_to_its_own_host() -> None:
    candidate = parse_seed(b"HTTP://Example.com/start#top\n", SETTINGS, now=1.0)
    valid_discovered(candidate)
    assert candidate.url == "http://example.com/start"
    assert candidate.host == "example.com"
    assert candidate.scope == Scope(allow_domains=["example.com"], max_depth=5, max_pages=0)
    assert (candidate.depth, candidate.crawl_id) == (0, "default")
    assert candidate.discovered_at == 1.0


def test_json_seed_carries_crawl_id_priority_and_scope() -> None:
    seed = {
        "url": "http://a.example/",
        "crawl_id": "c1",
        "priority": 9,
        "meta": {"k": "v"},
        "scope": {"allow_domains": ["a.example", "b.example"], "max_depth": 2},
    }
    candidate = parse_seed(json.dumps(seed).encode(), SETTINGS, now=1.0)
    valid_discovered(candidate)
    assert (candidate.crawl_id, candidate.priority, candidate.meta) == (
        "c1",
        9,
        {"k": "v"},
    )
    assert candidate.scope.allow_domains == ["a.example", "b.example"]
    assert candidate.scope.max_depth == 2
    # The typed seed (as the frontier stage gets it from the runtime) gives the same.
    typed = Seed(
        url="http://a.example/",
        crawl_id="c1",
        priority=9,
        meta={"k": "v"},
        scope=SeedScope(allow_domains=["a.example", "b.example"], max_depth=2),
    )
    assert seed_candidate(typed, SETTINGS, now=1.0) == candidate


def test_seed_depth_zero_limit_is_kept_and_settings_fill_the_rest() -> None:
    candidate = seed_candidate(
        Seed(url="http://a.example/", depth=2, scope=SeedScope(max_depth=0, max_pages=7)),
        SETTINGS,
        now=1.0,
    )
    assert candidate.depth == 2
    assert candidate.scope == Scope(allow_domains=["a.example"], max_depth=0, max_pages=7)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"not a url", "invalid_url"),
        (b"notaurl", "unsupported_scheme"),
        (b"ftp://example.com/file", "unsupported_scheme"),
        (b"\xff\xfe\x00garbage\x80", "undecodable"),
        (b"", "empty_value"),
        (b'{"url": 42}', "schema_violation"),
        (b'{"url": "http://a.example/", "depth": "deep"}', "schema_violation"),
        (b'{"url": "http://a.example/", "unknown": 1}', "schema_violation"),
        (b'["http://a.example/"]', "schema_violation"),
        (b'{"url": "http://a.example/"', "invalid_json"),
        (
            b'{"url": "http://a.example/", "scope": {"allow_domains": ["b.example"]}}',
            "out_of_scope",
        ),
    ],
)
def test_malformed_seeds_are_rejected_with_a_reason(value: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        parse_seed(value, SETTINGS)
    assert caught.value.reason == reason


def _page(**changes: Any) -> Page:
    fields: dict[str, Any] = {
        "url": "http://a.example/dir/page.html",
        "final_url": "http://a.example/dir/page.html",
        "host": "a.example",
        "status": 200,
        "fetched_at": 1.0,
        "content_type": "text/html",
        "title": None,
        "text": "",
        "canonical": None,
        "content_hash": None,
        "noindex": False,
        "nofollow": False,
        "crawl_id": "c1",
        "depth": 1,
        "priority": 5,
        "scope": Scope(allow_domains=["a.example"], max_depth=3, max_pages=0),
        "links": [
            "http://a.example/x.html",
            "http://A.example/x.html#frag",
            "http://elsewhere.example/",
            "mailto:someone@a.example",
            "http://a.example/y.html",
        ],
        "redirect_to": None,
        "redirect_chain": [],
    }
    fields.update(changes)
    return Page(**fields)


def test_links_become_candidates_in_scope_one_level_deeper() -> None:
    kept, drops = candidates_from_page(_page(), SETTINGS, now=1.0)
    for candidate in kept:
        valid_discovered(candidate)
    assert [c.url for c in kept] == [
        "http://a.example/x.html",
        "http://a.example/x.html",
        "http://a.example/y.html",
    ]
    assert {c.depth for c in kept} == {2}
    assert {c.source for c in kept} == {"http://a.example/dir/page.html"}
    assert {(c.crawl_id, c.priority, c.discovered_at) for c in kept} == {("c1", 4, 1.0)}
    assert sorted(d.reason for d in drops) == ["out_of_scope", "unsupported_scheme"]


def test_depth_limit_drops_links() -> None:
    kept, drops = candidates_from_page(_page(depth=3), SETTINGS)
    assert kept == [] and len(drops) == 5


def test_redirect_target_keeps_depth_and_records_chain_and_loops_stop() -> None:
    page = _page(
        links=[],
        redirect_to="http://a.example/final.html",
        redirect_chain=["http://a.example/first.html"],
    )
    (candidate,), _ = candidates_from_page(page, SETTINGS)
    assert candidate.depth == 1
    assert candidate.redirect_chain == [
        "http://a.example/first.html",
        "http://a.example/dir/page.html",
    ]
    looping = _page(
        links=[],
        redirect_to="http://a.example/first.html",
        redirect_chain=["http://a.example/first.html"],
    )
    kept, drops = candidates_from_page(looping, SETTINGS)
    assert kept == [] and [d.reason for d in drops] == ["redirect_loop"]


def test_recently_sent_links_are_sent_once_in_bounded_memory() -> None:
    from streamcrawl.frontier.logic import RecentlySent

    recent = RecentlySent(capacity=3)
    assert recent.first_time("c", "http://a/1")
    assert not recent.first_time("c", "http://a/1")
    assert recent.first_time("other-crawl", "http://a/1")  # per crawl id
    for n in range(2, 8):
        assert recent.first_time("c", f"http://a/{n}")
        assert len(recent) <= 6
    # The oldest generation was forgotten: sending again is allowed (dedup still decides).
    assert recent.first_time("c", "http://a/1")
    assert not recent.first_time("c", "http://a/7")
    off = RecentlySent(capacity=0)
    assert off.first_time("c", "http://a/1") and off.first_time("c", "http://a/1")
