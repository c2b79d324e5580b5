"""Crawler-trap defences: session ids, repeated path segments, calendars, host budgets."""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urljoin

import msgspec
import pytest
from streamcrawl.core.config import Settings
from streamcrawl.core.messages import Page, Scope
from streamcrawl.core.urls import (
    DEFAULT_SESSION_PARAMS,
    calendar_pattern,
    canonicalize,
    repeated_segments,
)
from streamcrawl.dedup.logic import Admission, CountMinSketch, PartitionFilter
from streamcrawl.frontier.logic import candidates_from_page, parse_seed

SETTINGS = Settings()
BASE = "http://127.0.0.1:8080"


# -- session ids ------------------------------------------------------------------------


def test_default_session_params_match_the_settings_default() -> None:
    assert Settings().session_params == DEFAULT_SESSION_PARAMS


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        (f"{BASE}/session/page.html?sid=abc123", f"{BASE}/session/page.html"),
        (f"{BASE}/a.html;jsessionid=ABC?x=1", f"{BASE}/a.html?x=1"),
        (f"{BASE}/a.html;JSESSIONID=ABC", f"{BASE}/a.html"),
        (f"{BASE}/a?PHPSESSID=1&b=2&SessionId=3", f"{BASE}/a?b=2"),
        (f"{BASE}/a?ASPSESSIONIDQQGGTRAB=XYZ&b=2", f"{BASE}/a?b=2"),
        (f"{BASE}/a?CFID=1&CFTOKEN=2&session_id=3&sessid=4", f"{BASE}/a"),
        (f"{BASE}/d;jsessionid=1;v=2/p.html", f"{BASE}/d;v=2/p.html"),
    ],
)
def test_session_ids_are_stripped(url: str, canonical: str) -> None:
    assert canonicalize(url) == canonical


@pytest.mark.parametrize(
    "url",
    [
        f"{BASE}/a?side=2&sidebar=1",  # names that merely start like a session id
        f"{BASE}/a?x=sid",  # a session name as a value
        f"{BASE}/a;v=2",  # another ;param
        f"{BASE}/sid/page.html",  # a path segment
    ],
)
def test_other_params_are_kept(url: str) -> None:
    assert canonicalize(url) == url


def test_session_params_are_configurable() -> None:
    assert canonicalize(f"{BASE}/a?token=1&sid=2", session_params=("Token",)) == (f"{BASE}/a?sid=2")
    assert canonicalize(f"{BASE}/a?sid=2", session_params=()) == f"{BASE}/a?sid=2"


def test_session_spellings_collapse_to_one_candidate() -> None:
    page = _page(
        [
            f"{BASE}/session/page.html?sid=abc",
            f"{BASE}/session/page.html?SID=def",
            f"{BASE}/session/other.html;jsessionid=0123",
            f"{BASE}/session/other.html;jsessionid=4567",
        ]
    )
    kept, drops = candidates_from_page(page, SETTINGS)
    assert drops == []
    assert sorted({c.url for c in kept}) == [
        f"{BASE}/session/other.html",
        f"{BASE}/session/page.html",
    ]
    seed = parse_seed(f"{BASE}/start?jsessionid=1".encode(), SETTINGS)
    assert seed.url == f"{BASE}/start"
    # The frontier uses the settings' list, not the module default.
    custom = replace(SETTINGS, session_params=("token",))
    (candidate,), _ = candidates_from_page(_page([f"{BASE}/p?token=1&sid=2"]), custom)
    assert candidate.url == f"{BASE}/p?sid=2"


# -- repeated path segments ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "count"),
    [
        ("/", 0),
        ("/a/b/c.html", 1),
        ("/2024/01/01/", 2),
        ("/loopdir/x/x/x/", 3),
        ("/a/b/a/b/a/b/", 3),
        ("/a/b/c/a/b/c/a/b/c/a/b/c", 4),
        ("/x//x///x", 3),  # empty segments are not counted
    ],
)
def test_repeated_segments_counts_the_most_frequent_segment(path: str, count: int) -> None:
    assert repeated_segments(BASE + path) == count


def _page(links: list[str], depth: int = 1) -> Page:
    return Page(
        url=f"{BASE}/dir/page.html",
        final_url=f"{BASE}/dir/page.html",
        host="127.0.0.1:8080",
        status=200,
        fetched_at=1.0,
        content_type="text/html",
        title=None,
        text="",
        canonical=None,
        content_hash=None,
        noindex=False,
        nofollow=False,
        crawl_id="c1",
        depth=depth,
        priority=5,
        scope=Scope(allow_domains=["127.0.0.1"], max_depth=50, max_pages=0),
        links=links,
        redirect_to=None,
        redirect_chain=[],
    )


def test_frontier_cuts_repeated_segments_and_keeps_normal_paths() -> None:
    assert SETTINGS.max_path_repeats == 2
    paths = [
        "/loopdir/x/x/x/",
        "/a/b/a/b/a/b/",
        "/loopdir/x/x/",
        "/2024/01/01/",
        "/docs/v1/api/v1/index.html",
        "/p/123.html",
    ]
    kept, drops = candidates_from_page(_page([BASE + path for path in paths]), SETTINGS)
    assert [c.url for c in kept] == [
        f"{BASE}/loopdir/x/x/",
        f"{BASE}/2024/01/01/",
        f"{BASE}/docs/v1/api/v1/index.html",
        f"{BASE}/p/123.html",
    ]
    assert [d.reason for d in drops] == ["repeated_path_segments"] * 2


def test_relative_link_loop_stops_after_the_limit() -> None:
    url, fetched = f"{BASE}/loopdir/x/", 0
    for _ in range(100):
        fetched += 1
        # The extractor resolves links against the page's URL.
        page = msgspec.structs.replace(_page([urljoin(url, "x/")]), url=url, final_url=url)
        kept, drops = candidates_from_page(page, SETTINGS)
        if not kept:
            assert [d.reason for d in drops] == ["repeated_path_segments"]
            break
        url = kept[0].url
    assert fetched == SETTINGS.max_path_repeats


def test_max_path_repeats_zero_turns_the_check_off() -> None:
    kept, _ = candidates_from_page(
        _page([f"{BASE}/x/x/x/x/x/"]), replace(SETTINGS, max_path_repeats=0)
    )
    assert len(kept) == 1


# -- calendar patterns ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "pattern"),
    [
        (f"{BASE}/calendar/2026/11", "127.0.0.1:8080/calendar/N/N"),
        (f"{BASE}/calendar/1999/1/31", "127.0.0.1:8080/calendar/N/N/N"),
        (f"{BASE}/calendar/2026", "127.0.0.1:8080/calendar/N"),
        (f"{BASE}/cal?month=11&year=2026", "127.0.0.1:8080/cal?month=N&year=N"),
        (f"{BASE}/cal?view=month&ym=202611", "127.0.0.1:8080/cal?view=month&ym=N"),
        (f"{BASE}/events/2026-11-23", "127.0.0.1:8080/events/N-N-N"),
        (f"{BASE}/events/2026-11.html", "127.0.0.1:8080/events/N-N.html"),
        (f"{BASE}/list?from=2026-11-01&page=3", "127.0.0.1:8080/list?from=N-N-N&page=3"),
        (f"{BASE}/2024/01/15/story-12345.html", "127.0.0.1:8080/N/N/N/story-12345.html"),
        ("http://Example.com/archive/2024/13", "example.com/archive/N/13"),  # 13: no month
    ],
)
def test_calendar_patterns(url: str, pattern: str) -> None:
    assert calendar_pattern(canonicalize(url)) == pattern


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/p/123.html",
        "/product/98765",
        "/product/123456789",
        "/item?id=98765&page=3",
        "/v2/users/42",
        "/release-1.2.3",
        "/a?month=may",  # a date key without a number
        "/n/20261",  # five digits: not a year
    ],
)
def test_ordinary_urls_have_no_calendar_pattern(path: str) -> None:
    assert calendar_pattern(BASE + path) is None


def test_calendar_pages_of_one_pattern_share_it_and_hosts_do_not() -> None:
    assert calendar_pattern(f"{BASE}/calendar/2026/11") == calendar_pattern(
        f"{BASE}/calendar/1907/2"
    )
    assert calendar_pattern(f"{BASE}/calendar/2026/11") != calendar_pattern(
        "http://127.0.0.1:9090/calendar/2026/11"
    )


# -- dedup-side limits ----------------------------------------------------------------------


def _admission(partitions: int = 1) -> Admission:
    admission = Admission()
    for partition in range(partitions):
        admission.filters[partition] = PartitionFilter(10_000, 1e-6)
    return admission


def _next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def test_endless_calendar_admits_exactly_max_calendar_pages() -> None:
    admission = _admission()
    limit = SETTINGS.max_calendar_pages
    year, month, verdicts = 2026, 11, []
    for _ in range(1000):
        verdicts.append(admission.decide(0, "c1", f"{BASE}/calendar/{year}/{month}", 0, 0, limit))
        year, month = _next_month(year, month)
    assert verdicts.count(None) == limit
    assert verdicts[:limit] == [None] * limit
    assert set(verdicts[limit:]) == {"calendar_trap"}
    # Other pages of the host, and the same calendar in another crawl, are unaffected.
    assert admission.decide(0, "c1", f"{BASE}/about.html", 0, 0, limit) is None
    assert admission.decide(0, "c2", f"{BASE}/calendar/2026/11", 0, 0, limit) is None
    # Without a limit the walk goes on.
    assert admission.decide(0, "c1", f"{BASE}/calendar/3000/1", 0, 0, 0) is None


def test_calendar_limit_counts_only_admitted_urls() -> None:
    admission = _admission()
    for _ in range(5):  # duplicates are not counted
        admission.decide(0, "c1", f"{BASE}/calendar/2026/1", 0, 0, 3)
    assert admission.decide(0, "c1", f"{BASE}/calendar/2026/2", 0, 0, 3) is None
    assert admission.decide(0, "c1", f"{BASE}/calendar/2026/3", 0, 0, 3) is None
    assert admission.decide(0, "c1", f"{BASE}/calendar/2026/4", 0, 0, 3) == "calendar_trap"


def test_max_pages_per_host_is_per_host_and_per_crawl() -> None:
    admission = _admission(2)
    n = 7

    def run(partition: int, crawl: str, host: str) -> list[str | None]:
        return [
            admission.decide(partition, crawl, f"http://{host}/p/{i}.html", 0, n) for i in range(20)
        ]

    first = run(0, "c1", "a.example")
    assert first == [None] * n + ["max_pages_per_host"] * (20 - n)
    assert run(0, "c2", "a.example").count(None) == n  # another crawl id
    assert run(0, "c1", "a.example:8080").count(None) == n  # another host (port)
    assert run(1, "c1", "b.example").count(None) == n  # another partition's host
    assert admission.decide(0, "c1", "http://a.example/p/0.html", 0, n) == "duplicate"
    assert admission.decide(0, "c1", "http://a.example/new.html", 0, 0) is None  # 0: no limit


def test_sketch_memory_is_fixed_whatever_is_counted() -> None:
    bloom = PartitionFilter(1000, 1e-3)
    size = bloom.counts.nbytes
    assert size == 4 * 2**16 * 4  # 1 MiB
    for n in range(100_000):
        bloom.counts.add(f"c1\x00host{n}.example")
    assert bloom.counts.nbytes == size
    # Each key was counted once: never an under-count, and at this load (100k keys in
    # 4 rows of 65536) an over-count of at most a couple, for a minority of keys.
    probes = [f"c1\x00host{n}.example" for n in range(0, 100_000, 97)]
    estimates = [bloom.counts.estimate(key) for key in probes]
    assert min(estimates) == 1
    assert max(estimates) <= 3
    assert sum(e > 1 for e in estimates) <= len(probes) // 5


def test_sketch_estimates_never_undercount_under_collisions() -> None:
    sketch = CountMinSketch(width=64, depth=2)  # tiny, so keys collide
    truth = {f"k{n}": n % 7 + 1 for n in range(500)}
    for key, count in truth.items():
        for _ in range(count):
            sketch.add(key)
    assert all(sketch.estimate(key) >= count for key, count in truth.items())
    assert any(sketch.estimate(key) > count for key, count in truth.items())
    assert sketch.nbytes == 64 * 2 * 4


def test_rebuild_with_remember_continues_the_counts() -> None:
    live = _admission()
    urls = [f"{BASE}/calendar/2026/{m}" for m in range(1, 13)]
    urls += [f"{BASE}/calendar/2027/{m}" for m in range(1, 13)]
    admitted = [u for u in urls if live.decide(0, "c1", u, 0, 30, 10) is None]
    assert len(admitted) == 10
    admitted += [
        u for u in (f"{BASE}/p{n}" for n in range(40)) if live.decide(0, "c1", u, 0, 30, 10) is None
    ]
    assert len(admitted) == 30
    # A new process replays crawl.fetch (the admitted URLs) into a fresh filter.
    rebuilt = _admission()
    for url in admitted:
        rebuilt.filters[0].remember("c1", url)
    bloom, replayed = live.filters[0], rebuilt.filters[0]
    assert replayed.host_pages("c1", f"{BASE}/x") == bloom.host_pages("c1", f"{BASE}/x") == 30
    pattern = "127.0.0.1:8080/calendar/N/N"
    assert replayed.pattern_pages("c1", pattern) == bloom.pattern_pages("c1", pattern) == 10
    assert rebuilt.decide(0, "c1", f"{BASE}/calendar/2030/1", 0, 0, 10) == "calendar_trap"
    assert rebuilt.decide(0, "c1", f"{BASE}/fresh.html", 0, 30) == "max_pages_per_host"
    assert rebuilt.decide(0, "c1", f"{BASE}/fresh.html", 0, 31) is None
    assert rebuilt.decide(0, "c1", f"{BASE}/other.html", 0, 31) == "max_pages_per_host"
