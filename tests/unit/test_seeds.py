"""The one seed builder behind ``streamcrawl seed`` and ``streamcrawl crawl``."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest
from streamcrawl.cli import build_parser
from streamcrawl.core.config import Settings
from streamcrawl.core.messages import Seed, SeedScope, decoder
from streamcrawl.crawl.local import CrawlRequest, crawl_stages
from streamcrawl.crawl.seeds import SeedOptions, build_seed, seed_payloads
from streamcrawl.registry import STAGE_NAMES

URL = "https://example.com/"


def decoded(payload: bytes) -> Seed:
    return decoder(Seed).decode(payload)


def seed_command_payloads(*argv: str) -> list[bytes]:
    """What ``streamcrawl seed ARGV`` would produce, without a broker."""
    args = build_parser().parse_args(["seed", *argv])
    options = SeedOptions(
        crawl_id=args.crawl_id,
        priority=args.priority,
        max_depth=args.max_depth,
        max_pages=args.max_pages,
        allow_domains=tuple(args.allow_domain),
    )
    return seed_payloads(args.urls, options)


def test_without_options_seeds_are_plain_text() -> None:
    assert seed_payloads([URL, "http://b.example/x"]) == [URL.encode(), b"http://b.example/x"]
    assert seed_payloads([URL], SeedOptions()) == [URL.encode()]
    assert SeedOptions().plain and SeedOptions().scope() is None


@pytest.mark.parametrize(
    ("options", "scope"),
    [
        (SeedOptions(max_depth=0), SeedScope(max_depth=0)),
        (SeedOptions(max_pages=0), SeedScope(max_pages=0)),
        (SeedOptions(max_depth=3, max_pages=10), SeedScope(max_depth=3, max_pages=10)),
        (SeedOptions(allow_domains=("a.example",)), SeedScope(allow_domains=["a.example"])),
        (SeedOptions(crawl_id="c1"), None),
        (SeedOptions(priority=0), None),
    ],
)
def test_any_option_makes_a_json_seed(options: SeedOptions, scope: SeedScope | None) -> None:
    (payload,) = seed_payloads([URL], options)
    seed = decoded(payload)
    assert seed.url == URL
    assert seed.scope == scope
    assert not options.plain


def test_zero_limits_are_kept_on_the_wire() -> None:
    (payload,) = seed_payloads([URL], SeedOptions(max_depth=0, max_pages=0, priority=0))
    wire: dict[str, Any] = msgspec.json.decode(payload)
    assert wire == {"url": URL, "priority": 0, "scope": {"max_depth": 0, "max_pages": 0}}


def test_every_field_reaches_the_seed() -> None:
    options = SeedOptions(
        crawl_id="crawl-1",
        priority=2,
        max_depth=4,
        max_pages=50,
        allow_domains=("a.example", "b.example"),
    )
    assert build_seed(URL, options) == Seed(
        url=URL,
        crawl_id="crawl-1",
        priority=2,
        scope=SeedScope(allow_domains=["a.example", "b.example"], max_depth=4, max_pages=50),
    )


@pytest.mark.parametrize(
    "options",
    [
        SeedOptions(priority=10),
        SeedOptions(max_depth=-1),
        SeedOptions(crawl_id="has space"),
        SeedOptions(crawl_id=""),
        SeedOptions(allow_domains=("",)),
    ],
)
def test_options_that_break_the_contract_are_refused(options: SeedOptions) -> None:
    with pytest.raises(ValueError, match=re.escape(f"seed {URL!r}")):
        seed_payloads([URL], options)


def test_seed_command_keeps_max_depth_zero() -> None:
    (payload,) = seed_command_payloads(URL, "--max-depth", "0")
    assert decoded(payload).scope == SeedScope(max_depth=0)
    (payload,) = seed_command_payloads(URL, "--max-pages", "0", "--priority", "0")
    seed = decoded(payload)
    assert (seed.priority, seed.scope) == (0, SeedScope(max_pages=0))


def test_seed_command_without_options_sends_plain_text() -> None:
    assert seed_command_payloads(URL, "http://b.example/") == [URL.encode(), b"http://b.example/"]


def test_seed_command_with_every_option() -> None:
    (payload,) = seed_command_payloads(
        URL, "--crawl-id", "c", "--priority", "7", "--max-pages", "9", "--allow-domain", "x.org"
    )
    assert decoded(payload) == Seed(
        url=URL,
        crawl_id="c",
        priority=7,
        scope=SeedScope(allow_domains=["x.org"], max_pages=9),
    )


def test_crawl_request_seeds_share_its_crawl_id_and_scope() -> None:
    request = CrawlRequest(
        urls=(URL, "http://b.example/"), max_depth=0, allow_domains=("b.example",)
    )
    seeds = [decoded(payload) for payload in request.seed_values()]
    assert [seed.url for seed in seeds] == list(request.urls)
    assert {seed.crawl_id for seed in seeds} == {request.crawl_id}
    assert all(
        seed.scope == SeedScope(allow_domains=["b.example"], max_depth=0, max_pages=0)
        for seed in seeds
    )


def test_a_crawl_runs_the_scheduler_only_while_continuous_crawling_is_on() -> None:
    off = crawl_stages(Settings())
    assert "scheduler" not in off and set(off) == set(STAGE_NAMES) - {"scheduler"}
    assert crawl_stages(Settings(schedule_enabled=1)) == list(STAGE_NAMES)
