"""The demo site's manifest is checked against an independent crawl of the written HTML
(stdlib html.parser + urljoin + the crawler's canonicalisation), then served by nginx."""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
from streamcrawl.core.urls import InvalidURL, canonicalize
from streamcrawl.demo.nginx import NGINX, NginxError, NginxSite
from streamcrawl.demo.site import SiteManifest, content_path, generate_site

PAGES = 300
PORT = 18080  # only written into the HTML; the nginx tests use a free port
needs_nginx = pytest.mark.skipif(not Path(NGINX).exists(), reason=f"{NGINX} is not installed")


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_title = tag == "title"
        href = dict(attrs).get("href")
        if tag == "a" and href is not None:
            self.hrefs.append(href)

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def _parse(file: Path) -> _Anchors:
    parser = _Anchors()
    parser.feed(file.read_text(encoding="utf-8"))
    return parser


def _redirect_rules(root: Path) -> dict[str, str]:
    rule = re.compile(r"location = (\S+) \{ return 301 (\S+); \}")
    text = (root / "redirects.conf").read_text(encoding="utf-8")
    return {match[1]: match[2] for match in rule.finditer(text)}


@dataclass
class _Crawl:
    depth: dict[str, int] = field(default_factory=dict)
    pages: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    redirects: dict[str, str] = field(default_factory=dict)
    offsite: set[str] = field(default_factory=set)
    ignored: set[str] = field(default_factory=set)


def _crawl_files(root: Path, port: int) -> _Crawl:
    """0-1 BFS over the files: a link costs one level, following a redirect none."""
    origin = f"http://127.0.0.1:{port}"
    rules = {origin + path: target for path, target in _redirect_rules(root).items()}
    crawl = _Crawl(depth={origin + "/": 0})
    queue = deque([origin + "/"])
    while queue:
        url = queue.popleft()
        level = crawl.depth[url]
        if url in rules:
            crawl.redirects[url] = target = canonicalize(rules[url])
            if crawl.depth.get(target, level + 1) > level:
                crawl.depth[target] = level
                queue.appendleft(target)
            continue
        path = urlsplit(url).path
        file = root / "www" / ("index.html" if path == "/" else path.lstrip("/"))
        if not file.is_file():
            crawl.missing.add(url)
            continue
        crawl.pages.add(url)
        for href in _parse(file).hrefs:
            try:
                link = canonicalize(urljoin(url, href))
            except InvalidURL:
                crawl.ignored.add(href)
                continue
            if not link.startswith(origin + "/"):
                crawl.offsite.add(link)
            elif crawl.depth.get(link, level + 2) > level + 1:
                crawl.depth[link] = level + 1
                queue.append(link)
    return crawl


@pytest.fixture(scope="module")
def site_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def manifest(site_root: Path) -> SiteManifest:
    return generate_site(site_root, pages=PAGES, port=PORT)


@pytest.fixture(scope="module")
def crawl(site_root: Path, manifest: SiteManifest) -> _Crawl:
    return _crawl_files(site_root, PORT)


def test_manifest_matches_a_crawl_of_the_written_html(
    manifest: SiteManifest, crawl: _Crawl
) -> None:
    assert manifest.pages == crawl.pages
    assert manifest.missing == crawl.missing
    assert manifest.redirects == crawl.redirects
    assert manifest.offsite == crawl.offsite
    assert manifest.max_depth == max(crawl.depth.values())
    assert manifest.entry_url == manifest.base_url == f"http://127.0.0.1:{PORT}/"


def test_every_content_page_is_reachable_within_depth_four(
    manifest: SiteManifest, crawl: _Crawl
) -> None:
    origin = f"http://127.0.0.1:{PORT}"
    expected = {origin + "/"} | {origin + content_path(n) for n in range(PAGES)}
    assert manifest.pages == expected
    assert max(crawl.depth[url] for url in manifest.pages) <= 4
    assert manifest.max_depth <= 4
    assert manifest.missing and all("/missing/" in url for url in manifest.missing)
    assert len(manifest.redirects) >= 10
    assert set(manifest.redirects.values()) <= manifest.pages | set(manifest.redirects)


def test_pages_have_a_title_text_and_five_to_fifteen_links(site_root: Path) -> None:
    for number in range(PAGES):
        file = site_root / "www" / content_path(number).lstrip("/")
        parsed = _parse(file)
        assert parsed.title
        assert 5 <= len(parsed.hrefs) <= 15, file
        assert file.read_text(encoding="utf-8").count("<p>") >= 2


def test_links_use_many_spellings_of_one_page(site_root: Path, crawl: _Crawl) -> None:
    origin = f"http://127.0.0.1:{PORT}"
    hrefs = [href for file in (site_root / "www").rglob("*.html") for href in _parse(file).hrefs]
    patterns = {
        "same directory": r"^p\d+\.html$",
        "dot slash": r"^\./",
        "parent directory": r"^\.\./s\d+/p\d+\.html$",
        "root-relative": r"^/s\d+/p\d+\.html$",
        "absolute": "^" + re.escape(origin) + "/",
        "upper-case scheme": "^HTTP://",
        "fragment": "#",
        "dot segments": r"^/s\d+/\.\./",
        "single dot": r"/\./",
        "redirect": r"^/r/",
        "missing": r"^/missing/",
        "offsite": r"^https?://(offsite\.example|example\.org)/",
    }
    for name, pattern in patterns.items():
        assert any(re.search(pattern, href) for href in hrefs), name
    assert not any("?" in href for href in hrefs)
    assert crawl.ignored == {"mailto:webmaster@example.org", "javascript:void(0)"}
    by_target: dict[str, set[str]] = {}
    for file in (site_root / "www" / "s1").glob("*.html"):
        base = origin + "/s1/" + file.name
        for href in _parse(file).hrefs:
            if href.startswith(("mailto:", "javascript:")):
                continue
            by_target.setdefault(canonicalize(urljoin(base, href)), set()).add(href)
    assert max(len(spellings) for spellings in by_target.values()) >= 3


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_writes_identical_files(tmp_path: Path) -> None:
    first = generate_site(tmp_path / "a", pages=120, seed=3, port=PORT)
    second = generate_site(tmp_path / "b", pages=120, seed=3, port=PORT)
    other = generate_site(tmp_path / "c", pages=120, seed=4, port=PORT)
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")
    assert _snapshot(tmp_path / "a") != _snapshot(tmp_path / "c")
    assert first == second
    assert first.pages == other.pages  # the seed moves links around, never pages


def test_manifest_survives_json(manifest: SiteManifest, tmp_path: Path) -> None:
    saved = tmp_path / "manifest.json"
    saved.write_text(manifest.to_json())
    assert SiteManifest.from_json(saved.read_text()) == manifest


def test_a_site_needs_a_page(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_site(tmp_path, pages=0, port=PORT)


# -- served by nginx ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # surface the 301 as an HTTPError instead of following it


_OPENER = urllib.request.build_opener(_NoRedirects)
_AGENT = "demo-site-test/1.0"


def _get(url: str) -> tuple[int, str, str]:
    """Status, Location header and body of one request, without following redirects."""
    request = urllib.request.Request(url, headers={"User-Agent": _AGENT})
    try:
        with _OPENER.open(request, timeout=5) as response:
            return response.status, "", response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers.get("Location", ""), ""


@dataclass
class _Served:
    nginx: NginxSite
    manifest: SiteManifest


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Served]:
    root = tmp_path_factory.mktemp("served")
    port = _free_port()
    manifest = generate_site(root, pages=100, port=port)
    with NginxSite(root, port) as nginx:
        yield _Served(nginx, manifest)


@needs_nginx
def test_nginx_serves_pages_404s_and_redirects(served: _Served) -> None:
    base = served.manifest.base_url.rstrip("/")
    started = time.time()
    status, _, body = _get(base + "/s1/p1.html")
    assert status == 200 and "<title>" in body
    assert _get(base + "/")[0] == 200
    assert _get(base + "/missing/1.html")[0] == 404
    for source, target in served.manifest.redirects.items():
        assert _get(source)[:2] == (301, target)

    entries = served.nginx.access_log_entries()
    by_path = {entry.path: entry for entry in entries if entry.user_agent == _AGENT}
    assert by_path["/s1/p1.html"].status == 200
    assert by_path["/s1/p1.html"].bytes > 0
    assert by_path["/missing/1.html"].status == 404
    redirect = urlsplit(next(iter(served.manifest.redirects))).path
    assert by_path[redirect].status == 301
    assert all(entry.method == "GET" for entry in by_path.values())
    assert all(started - 1 <= entry.ts <= time.time() + 1 for entry in by_path.values())
    assert all(entry.user_agent == _AGENT for entry in entries), "readiness probes leak"


@needs_nginx
def test_a_taken_port_is_a_clear_error(served: _Served, tmp_path: Path) -> None:
    generate_site(tmp_path, pages=5, port=served.nginx.port)
    with pytest.raises(NginxError, match="in use"):
        NginxSite(tmp_path, served.nginx.port).start()


@needs_nginx
def test_explicit_start_and_stop(tmp_path: Path) -> None:
    port = _free_port()
    generate_site(tmp_path, pages=5, port=port)
    nginx = NginxSite(tmp_path, port).start()
    try:
        assert _get(f"http://127.0.0.1:{port}/s0/p0.html")[0] == 200
    finally:
        nginx.stop()
    with pytest.raises(urllib.error.URLError):
        _get(f"http://127.0.0.1:{port}/")
    nginx.stop()  # idempotent
    assert not (tmp_path / "nginx.pid").exists()  # nginx removed it: a clean shutdown
