"""bench/million's site: every page is admitted at its tree depth whatever the timing, so a
crawl with the default max_depth must store exactly all of them.

The check crawls the written files with a simulated pipeline in adversarial orders: one
host means one crawl.discovered partition, which dedup reads first in, first out; admitted
pages are fetched and parsed in a random order, interleaved at random with dedup's reads.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import _tree_site
from _site import page_path

PAGES = 1500
MAX_DEPTH = 4
LINKS = 10
_HREF = re.compile(r'href="([^"]+)"')


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, _tree_site.TreeSite]:
    root = tmp_path_factory.mktemp("tree-site")
    info = _tree_site.generate(root, 8080, PAGES, LINKS, 2048, MAX_DEPTH)
    return root / "www", info


def _links(www: Path, number: int) -> list[int]:
    file = www / ("index.html" if number == 0 else page_path(number).lstrip("/"))
    found = []
    for href in _HREF.findall(file.read_text(encoding="utf-8")):
        target = _tree_site.page_number(href)
        assert target is not None and 0 <= target < PAGES, href
        found.append(target)
    return found


def _crawl(www: Path, rng: random.Random) -> dict[int, int]:
    """Page -> depth it was admitted at, with dedup's partition read in order and fetches
    completing in a random order."""
    partition: list[tuple[int, int]] = [(0, 0)]
    read = 0
    admitted: dict[int, int] = {}
    unfetched: list[int] = []
    while read < len(partition) or unfetched:
        if unfetched and (read == len(partition) or rng.random() < 0.5):
            page = unfetched.pop(rng.randrange(len(unfetched)))
            depth = admitted[page] + 1
            if depth <= MAX_DEPTH:  # the frontier drops links past max_depth
                partition.extend((target, depth) for target in _links(www, page))
        else:
            target, depth = partition[read]
            read += 1
            if target not in admitted:  # dedup: the first record of a URL wins
                admitted[target] = depth
                unfetched.append(target)
    return admitted


def test_every_page_is_admitted_at_its_tree_depth_in_any_order(
    site: tuple[Path, _tree_site.TreeSite],
) -> None:
    www, info = site
    assert info.depth == MAX_DEPTH - 1
    for seed in range(4):
        admitted = _crawl(www, random.Random(seed))
        assert len(admitted) == PAGES
        wrong = {n: d for n, d in admitted.items() if d != _tree_site.depth_of(n, info.fanout)}
        assert not wrong, f"seed {seed}: pages admitted deeper than their tree depth: {wrong}"


def test_pages_have_the_asked_links_and_size(site: tuple[Path, _tree_site.TreeSite]) -> None:
    www, info = site
    for number in (1, PAGES // 2, PAGES - 1):
        links = _links(www, number)
        children = list(_tree_site.children(number, info.fanout, PAGES))
        assert links[: len(children)] == children
        assert len(links) == max(LINKS, len(children))
    assert 1500 < info.html_bytes / PAGES < 3000


def test_fanout_fits_the_depth() -> None:
    assert _tree_site.fanout_for(1_000_000, 4) == 32
    assert _tree_site.depth_of(999_999, 32) == 4
    assert _tree_site.fanout_for(20_000, 4) == 12


def test_page_number_reads_logged_paths() -> None:
    assert _tree_site.page_number("/") == 0
    assert _tree_site.page_number("/p12/12345.html") == 12345
    assert _tree_site.page_number("/robots.txt") is None
    assert _tree_site.page_number("/p1/x.html") is None
