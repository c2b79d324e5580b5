"""Frontier rules, pure: seeds and extracted links in, in-scope canonical candidates out."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from ..core.config import Settings
from ..core.errors import ReasonedError
from ..core.schemas import SchemaError, validate
from ..core.urls import (
    InvalidURL,
    canonicalize,
    host_of,
    hostname_of,
    in_scope,
    repeated_segments,
)

DEFAULT_CRAWL_ID = "default"
DEFAULT_PRIORITY = 5
_MAX_SEED_BYTES = 64 * 1024
_WHITESPACE = re.compile(rb"\s")


class Rejected(ReasonedError):
    """A seed or candidate that cannot enter the crawl; ``reason`` is machine-readable."""


@dataclass(frozen=True)
class Drop:
    """A candidate left out on purpose (scope, depth): counted, not dead-lettered."""

    reason: str


def parse_seed(value: bytes | None, settings: Settings, now: float | None = None) -> dict[str, Any]:
    """A seed value (plain-text URL or JSON object) as a ``discovered`` candidate."""
    seed = _seed_document(value)
    try:
        validate("seed", seed)
    except SchemaError as exc:
        raise Rejected("schema_violation", str(exc)) from exc
    url = _canonical(seed["url"], settings)
    given_scope = seed.get("scope", {})
    scope = {
        "allow_domains": list(
            given_scope.get("allow_domains") or settings.allow_domains or [hostname_of(url)]
        ),
        "max_depth": given_scope.get("max_depth", settings.max_depth),
        "max_pages": given_scope.get("max_pages", settings.max_pages),
    }
    if not in_scope(url, scope["allow_domains"]):
        raise Rejected("out_of_scope", f"{url} is outside {scope['allow_domains']}")
    candidate = {
        "url": url,
        "host": host_of(url),
        "crawl_id": seed.get("crawl_id", DEFAULT_CRAWL_ID),
        "depth": seed.get("depth", 0),
        "priority": seed.get("priority", DEFAULT_PRIORITY),
        "source": None,
        "scope": scope,
        "redirect_chain": [],
        "discovered_at": time.time() if now is None else now,
    }
    if "meta" in seed:
        candidate["meta"] = seed["meta"]
    return candidate


def _seed_document(value: bytes | None) -> dict[str, Any]:
    if not value:
        raise Rejected("empty_value", "the seed is empty")
    if len(value) > _MAX_SEED_BYTES:
        raise Rejected("too_large", f"{len(value)} bytes > {_MAX_SEED_BYTES}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("undecodable", f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    stripped = text.strip()
    if stripped.startswith(("{", "[", '"')):
        try:
            document = json.loads(stripped)
        except ValueError as exc:
            raise Rejected("invalid_json", str(exc)[:300]) from exc
        if not isinstance(document, dict):
            raise Rejected(
                "schema_violation", f"expected a JSON object, got {type(document).__name__}"
            )
        return document
    if _WHITESPACE.search(stripped.encode()):
        raise Rejected("invalid_url", f"a plain-text seed is one URL, got {stripped[:200]!r}")
    return {"url": stripped}


def _canonical(url: str, settings: Settings) -> str:
    try:
        return canonicalize(url, settings.max_url_length, settings.session_params)
    except InvalidURL as exc:
        raise Rejected(exc.reason, str(exc)) from exc


def candidates_from_page(
    page: dict[str, Any], settings: Settings, now: float | None = None
) -> tuple[list[dict[str, Any]], list[Drop]]:
    """The in-scope candidates a parsed page leads to: its links, or its redirect target.

    A sitemap's links are pages one level deeper than the sitemap; the sitemaps it lists
    keep its depth (an index does not make its children deeper) and are candidates of
    kind "sitemap", as is the target of a sitemap's redirect. Page candidates carry no
    kind (the schema's default, "page").
    """
    stamp = time.time() if now is None else now
    scope = page["scope"]
    redirect_to = page.get("redirect_to")
    sitemap = page.get("kind") == "sitemap"
    # (targets, their depth, their kind when not a page)
    groups: list[tuple[list[str], int, str | None]]
    if redirect_to:
        # A redirect hop keeps the depth of the link that led to it.
        chain = [*page.get("redirect_chain", []), page["url"]]
        groups = [([redirect_to], page["depth"], "sitemap" if sitemap else None)]
    else:
        chain, groups = [], [(page["links"], page["depth"] + 1, None)]
        if sitemap:
            groups.append((page.get("sitemaps", []), page["depth"], "sitemap"))
    kept: list[dict[str, Any]] = []
    drops: list[Drop] = []
    for targets, depth, kind in groups:
        if depth > scope["max_depth"]:
            drops.extend([Drop("max_depth")] * len(targets))
            continue
        for target in targets:
            outcome = _link_candidate(target, page, scope, depth, chain, settings, stamp)
            if isinstance(outcome, Drop):
                drops.append(outcome)
            else:
                if kind is not None:
                    outcome["kind"] = kind
                kept.append(outcome)
    return kept, drops


def _link_candidate(
    target: str,
    page: dict[str, Any],
    scope: dict[str, Any],
    depth: int,
    chain: list[str],
    settings: Settings,
    now: float,
) -> dict[str, Any] | Drop:
    try:
        url = canonicalize(target, settings.max_url_length, settings.session_params)
    except InvalidURL as exc:
        return Drop(exc.reason)
    if not in_scope(url, scope["allow_domains"]):
        return Drop("out_of_scope")
    # A relative-link loop (/x/x/x/, /a/b/a/b/a/b/); 0 turns the check off.
    if settings.max_path_repeats and repeated_segments(url) > settings.max_path_repeats:
        return Drop("repeated_path_segments")
    if url in chain:
        return Drop("redirect_loop")
    if len(chain) > 10:
        return Drop("too_many_redirects")
    return {
        "url": url,
        "host": host_of(url),
        "crawl_id": page["crawl_id"],
        "depth": depth,
        "priority": max(0, page.get("priority", DEFAULT_PRIORITY) - 1),
        "source": page["url"],
        "scope": scope,
        "redirect_chain": chain,
        "discovered_at": now,
    }
