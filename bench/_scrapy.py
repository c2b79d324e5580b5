"""Scrapy baseline of ``bench/compare``, run as its own process.

    python bench/_scrapy.py ENTRY_URL CONCURRENCY

A CrawlSpider that follows every same-host link (LinkExtractor defaults, OffsiteMiddleware
on the entry's host), keeps no items, obeys robots.txt, with no delay, no autothrottle and no
HTTP cache. Prints one JSON line with Scrapy's own request and response counts.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import scrapy
from _loops import vmhwm_kib
from scrapy.crawler import CrawlerProcess
from scrapy.linkextractors import LinkExtractor
from scrapy.spiders import CrawlSpider, Rule

USER_AGENT = f"bench-scrapy/{scrapy.__version__}"


class SiteSpider(CrawlSpider):
    name = "site"
    rules = (Rule(LinkExtractor(), follow=True),)

    async def start(self) -> AsyncIterator[Any]:
        # Scrapy's default start request has dont_filter=True, so the dupe filter never
        # records the entry URL and fetches it a second time when a page links back to it.
        for url in self.start_urls:
            yield scrapy.Request(url)


def main() -> None:
    entry, concurrency = sys.argv[1], int(sys.argv[2])
    settings = {
        "CONCURRENT_REQUESTS": concurrency,  # the global cap (default 16) must not bind first
        "CONCURRENT_REQUESTS_PER_DOMAIN": concurrency,
        "DOWNLOAD_DELAY": 0,
        "RANDOMIZE_DOWNLOAD_DELAY": False,
        "AUTOTHROTTLE_ENABLED": False,
        "ROBOTSTXT_OBEY": True,
        "HTTPCACHE_ENABLED": False,
        "LOG_LEVEL": "WARNING",
        "USER_AGENT": USER_AGENT,
    }
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(SiteSpider)
    process.crawl(crawler, start_urls=[entry], allowed_domains=[urlsplit(entry).hostname])
    process.start()
    stats = crawler.stats.get_stats() if crawler.stats else {}
    print(
        json.dumps(
            {
                "requests": stats.get("downloader/request_count", 0),
                "responses": stats.get("downloader/response_count", 0),
                "status_200": stats.get("downloader/response_status_count/200", 0),
                "dupefilter_filtered": stats.get("dupefilter/filtered", 0),
                "offsite_filtered": stats.get("offsite/filtered", 0),
                "finish_reason": stats.get("finish_reason"),
                "vmhwm_kib": vmhwm_kib(),
            }
        )
    )


if __name__ == "__main__":
    main()
