"""Which URLs a crawl may fetch, pure: the one place a target becomes a candidate.

The frontier applies it to every link and redirect target; the fetcher to the sitemaps a
robots.txt lists. Each decision is a candidate or a :class:`Drop` with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .config import Settings
from .messages import Discovered, Kind, Scope
from .urls import InvalidURL, canonicalize, host_of, in_scope, repeated_segments

MAX_REDIRECT_HOPS = 10


@dataclass(frozen=True)
class Drop:
    """A candidate left out on purpose (scope, depth, traps): counted, not dead-lettered."""

    reason: str


def canonical_url(url: str, settings: Settings) -> str:
    """The one spelling of ``url`` under these settings (raises :class:`InvalidURL`)."""
    return _canonical(url, settings.max_url_length, settings.session_params)


# Canonicalising costs ~40-70 us a URL (w3lib), and a site's pages repeat the same links
# (navigation, footers): the frontier sees each of them once per page. Bounded, so memory is.
@lru_cache(maxsize=1 << 16)
def _canonical(url: str, max_length: int, session_params: tuple[str, ...]) -> str:
    return canonicalize(url, max_length, session_params)


@dataclass(frozen=True)
class Origin:
    """What a candidate inherits from the page (or robots.txt) that led to it."""

    crawl_id: str
    scope: Scope
    priority: int
    source: str
    redirect_chain: tuple[str, ...] = ()


def scoped_candidate(
    target: str,
    origin: Origin,
    depth: int,
    settings: Settings,
    now: float,
    kind: Kind = "page",
) -> Discovered | Drop:
    try:
        url = canonical_url(target, settings)
    except InvalidURL as exc:
        return Drop(exc.reason)
    return candidate_for(url, origin, depth, settings, now, kind)


def candidate_for(
    url: str,
    origin: Origin,
    depth: int,
    settings: Settings,
    now: float,
    kind: Kind = "page",
) -> Discovered | Drop:
    """:func:`scoped_candidate` for a URL already in canonical form."""
    if not in_scope(url, origin.scope.allow_domains):
        return Drop("out_of_scope")
    # A relative-link loop (/x/x/x/, /a/b/a/b/a/b/); 0 turns the check off.
    if settings.max_path_repeats and repeated_segments(url) > settings.max_path_repeats:
        return Drop("repeated_path_segments")
    if url in origin.redirect_chain:
        return Drop("redirect_loop")
    if len(origin.redirect_chain) > MAX_REDIRECT_HOPS:
        return Drop("too_many_redirects")
    return Discovered(
        url=url,
        host=host_of(url),
        crawl_id=origin.crawl_id,
        depth=depth,
        priority=origin.priority,
        source=origin.source,
        scope=origin.scope,
        redirect_chain=list(origin.redirect_chain),
        discovered_at=now,
        kind=kind,
    )
