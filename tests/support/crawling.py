"""A small crawl of a generated site through every stage, for tests that change what is
under the pipeline (a broker lost, a secured cluster) rather than the pipeline itself."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from streamcrawl.core.config import Settings
from streamcrawl.crawl.local import running_pipeline
from streamcrawl.crawl.seeds import produce_seeds
from streamcrawl.crawl.watch import PipelineWatch, watch_until_drained
from streamcrawl.demo.site import SiteManifest

from .crawl import stored_documents

__all__ = ["assert_stored_once", "crawl_site", "stored_documents"]

# Called once the crawl is under way, with the progress watch (to wait for a point in the
# crawl) -- where a test breaks something.
Interruption = Callable[[PipelineWatch], Awaitable[None]]


async def crawl_site(
    settings: Settings,
    log_dir: Path,
    manifest: SiteManifest,
    during: Interruption | None = None,
    timeout: float = 600,
) -> None:
    """Crawl ``manifest``'s site from its entry URL (seeded with the pipeline's own
    producer) until every consumer group has committed everything."""
    async with running_pipeline(settings, log_dir) as (stages, watch):
        await produce_seeds(settings, [manifest.entry_url.encode()])
        if during is not None:
            await during(watch)
        await watch_until_drained(watch, stages, io.StringIO(), timeout=timeout)


def assert_stored_once(manifest: SiteManifest, documents: list[dict[str, Any]]) -> None:
    """Every URL of the site has exactly one document, with the status it should have."""
    urls = Counter(doc["url"] for doc in documents)
    assert [url for url, n in urls.items() if n > 1] == []
    ok = {doc["url"] for doc in documents if doc["status"] == 200}
    assert ok == manifest.pages, (
        f"missing {sorted(manifest.pages - ok)[:5]}, extra {sorted(ok - manifest.pages)[:5]}"
    )
    assert {doc["url"] for doc in documents if doc["status"] == 404} == manifest.missing
    assert {
        doc["url"]: doc["redirect_to"] for doc in documents if doc["status"] == 301
    } == manifest.redirects
