"""Page extraction: charsets, links, robots signals, text, hashing and hostile input."""

from __future__ import annotations

import random
import time

import pytest
from streamcrawl.parser.extract import (
    MAX_LINKS_TOTAL_CHARS,
    MAX_NESTING,
    ExtractedPage,
    decode_body,
    extract_page,
    is_html,
)

URL = "https://example.com/dir/page.html"


def page(html: str, url: str = URL, robots_header: str | None = None) -> ExtractedPage:
    return extract_page(html.encode(), url, "text/html; charset=utf-8", robots_header)


def links_of(body_html: str, url: str = URL) -> list[str]:
    links: list[str] = page(f"<html><body>{body_html}</body></html>", url).links
    return links


# --- is_html ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "start", "expected"),
    [
        ("text/html", b"", True),
        ("TEXT/HTML; charset=utf-8", b"", True),
        ("application/xhtml+xml", b"", True),
        ("application/json", b"<html>", False),
        ("image/png", b"\x89PNG", False),
        (None, b"  <!DOCTYPE html><html>", True),
        (None, b"\n<HTML lang=en>", True),
        (None, b"%PDF-1.7", False),
        (None, b"x" * 2000 + b"<html>", False),
        ("", b"<!doctype html>", True),
    ],
)
def test_is_html(header: str | None, start: bytes, expected: bool) -> None:
    assert is_html(header, start) is expected


# --- charsets ---------------------------------------------------------------------------

RUSSIAN = "Привет, мир! Это тестовая страница на русском языке."
JAPANESE = "日本語のテキストです。これはテストページです。東京は日本の首都です。"


def test_meta_charset_wins_over_a_wrong_utf8_header() -> None:
    html = f'<html><head><meta charset="windows-1251"><title>{RUSSIAN[:6]}</title></head>'
    body = f"{html}<body><p>{RUSSIAN}</p></body></html>".encode("cp1251")
    result = extract_page(body, URL, "text/html; charset=utf-8")
    assert result.charset == "cp1251"
    assert result.title == "Привет"
    assert result.text == RUSSIAN


def test_http_equiv_content_type_meta_is_honoured() -> None:
    head = '<meta http-equiv="Content-Type" content="text/html; charset=koi8-r">'
    body = f"<html><head>{head}</head><body>{RUSSIAN}</body></html>".encode("koi8-r")
    text, charset = decode_body(body, None)
    assert charset == "koi8-r"
    assert RUSSIAN in text


def test_undeclared_shift_jis_is_detected() -> None:
    html = f"<html><head><title>テスト</title></head><body><p>{JAPANESE * 20}</p></body></html>"
    result = extract_page(html.encode("shift_jis"), URL, "text/html")
    assert result.charset in ("shift_jis", "cp932")
    assert result.title == "テスト"
    assert result.text == JAPANESE * 20


@pytest.mark.parametrize(
    ("bom", "encoding", "expected"),
    [
        (b"\xef\xbb\xbf", "utf-8", "utf-8"),
        (b"\xff\xfe", "utf-16-le", "utf-16-le"),
        (b"\xfe\xff", "utf-16-be", "utf-16-be"),
    ],
)
def test_bom_wins_over_header_and_meta(bom: bytes, encoding: str, expected: str) -> None:
    html = f'<html><head><meta charset="iso-8859-5"></head><body>{RUSSIAN}</body></html>'
    text, charset = decode_body(bom + html.encode(encoding), "text/html; charset=shift_jis")
    assert charset == expected
    assert text.startswith("<html>")  # the BOM itself is not text
    assert RUSSIAN in text


def test_latin1_header_decodes_as_windows_1252() -> None:
    # 0x93/0x94 are curly quotes in windows-1252, which is what "latin-1" pages mean.
    body = "<p>Café «crème» déjà</p>".encode("latin-1") + b"\x93quoted\x94 \x81"
    text, charset = decode_body(body, "text/html; charset=ISO-8859-1")
    assert charset == "cp1252"
    assert text == "<p>Café «crème» déjà</p>\u201cquoted\u201d \x81"


def test_unknown_or_failing_declarations_fall_back_to_detection() -> None:
    body = f"<html><body>{RUSSIAN * 10}</body></html>".encode()
    assert decode_body(body, "text/html; charset=no-such-codec") == (body.decode(), "utf-8")
    cp1251 = f"<html><body>{RUSSIAN * 10}</body></html>".encode("cp1251")
    text, charset = decode_body(cp1251, "text/html; charset=utf-8")
    assert charset is not None
    assert RUSSIAN in text


def test_meta_claiming_utf16_is_read_as_utf8() -> None:
    body = '<meta charset="utf-16"><p>naïve</p>'.encode()
    assert decode_body(body, None) == ('<meta charset="utf-16"><p>naïve</p>', "utf-8")


def test_undecodable_bytes_never_raise() -> None:
    text, charset = decode_body(b"\xff\xfe\xfd" * 10 + b"\x00\x81", "text/html; charset=utf-8")
    assert isinstance(text, str)
    assert charset is not None


# --- links ------------------------------------------------------------------------------


def test_links_resolve_relative_absolute_and_protocol_relative() -> None:
    assert links_of(
        '<a href="other.html">1</a><a href="/root">2</a><a href="../up?q=1">3</a>'
        '<a href="https://a.example/x">4</a><a href="//cdn.example/y">5</a>'
        '<a href="  http://b.example/  ">6</a><area href="map.html">'
    ) == [
        "https://example.com/dir/other.html",
        "https://example.com/root",
        "https://example.com/up?q=1",
        "https://a.example/x",
        "https://cdn.example/y",
        "http://b.example/",
        "https://example.com/dir/map.html",
    ]


def test_base_href_is_used_for_links_and_canonical() -> None:
    html = (
        '<html><head><base href="https://static.example/base/">'
        '<link rel="canonical" href="canon"></head>'
        '<body><a href="a">a</a><a href="/b">b</a></body></html>'
    )
    result = page(html)
    assert result.links == ["https://static.example/base/a", "https://static.example/b"]
    assert result.canonical == "https://static.example/base/canon"


def test_relative_base_href_resolves_against_the_page_url() -> None:
    assert page('<base href="/sub/"><a href="x">x</a>').links == ["https://example.com/sub/x"]


def test_non_http_base_href_is_ignored() -> None:
    assert page('<base href="javascript:void(0)"><a href="x">x</a>').links == [
        "https://example.com/dir/x"
    ]


def test_fragments_are_removed_and_links_deduplicated_in_order() -> None:
    assert links_of(
        '<a href="/b#top">1</a><a href="/a">2</a><a href="/b#bottom">3</a>'
        '<a href="#only-fragment">4</a><a href="/a">5</a>'
    ) == ["https://example.com/b", "https://example.com/a"]


def test_non_http_and_empty_hrefs_are_skipped() -> None:
    result = page(
        '<a href="javascript:alert(1)">j</a><a href="JavaScript:x">J</a>'
        '<a href="mailto:a@b.c">m</a><a href="tel:+123">t</a><a href="data:text/html,hi">d</a>'
        '<a href="">e</a><a href="   ">s</a><a>none</a><a href="ftp://f.example/">f</a>'
        '<a href="http://[::1">bad</a><a href="https://ok.example/">ok</a>'
    )
    assert result.links == ["https://ok.example/"]
    assert result.nofollow_links == 0


def test_rel_nofollow_links_are_withheld_and_counted() -> None:
    result = page(
        '<a href="/a" rel="nofollow">1</a><a href="/b" rel="ugc NoFollow">2</a>'
        '<a href="/c" rel="noopener">3</a><a href="/d">4</a>'
    )
    assert result.links == ["https://example.com/c", "https://example.com/d"]
    assert result.nofollow_links == 2
    assert result.nofollow is False


def test_link_cap() -> None:
    html = "".join(f'<a href="/p{i}">{i}</a>' for i in range(100))
    result = extract_page(html.encode(), URL, "text/html", max_links=10)
    assert result.links == [f"https://example.com/p{i}" for i in range(10)]
    default = page("".join(f'<a href="/p{i}">{i}</a>' for i in range(6000)))
    assert len(default.links) == 5000


def test_overlong_links_are_dropped() -> None:
    assert links_of(f'<a href="/{"x" * 5000}">long</a><a href="/short">s</a>') == [
        "https://example.com/short"
    ]


def test_links_together_stay_under_their_total_cap() -> None:
    """A long <base href> turns 5000 short hrefs into 10 MB of links, more than crawl.pages
    holds: links are kept, in order, only while their total length fits the cap."""
    base = f"https://example.com/{'b' * 2000}"
    html = f'<base href="{base}">' + "".join(f"<a href=?{n}>x</a>" for n in range(5000))
    links = page(html).links
    assert links == [f"{base}?{n}" for n in range(len(links))]
    assert sum(map(len, links)) <= MAX_LINKS_TOTAL_CHARS < sum(map(len, links)) + len(base) + 6


def test_links_with_control_characters_are_dropped() -> None:
    assert links_of('<a href="/a\x01b">x</a><a href="/ok">ok</a>') == ["https://example.com/ok"]


# --- robots, canonical, language, title ------------------------------------------------


def test_meta_robots_noindex_nofollow() -> None:
    result = page(
        '<html><head><meta name="ROBOTS" content="NoIndex, NOFOLLOW"></head>'
        '<body><a href="/a">a</a><a href="/b" rel="nofollow">b</a></body></html>'
    )
    assert result.noindex is True
    assert result.nofollow is True
    assert result.links == []
    assert result.nofollow_links == 2


def test_meta_robots_none_and_our_agent_name() -> None:
    assert page('<meta name="robots" content="none">').noindex is True
    ours = page('<meta name="streamcrawl" content="noindex"><a href="/a">a</a>')
    assert (ours.noindex, ours.nofollow, ours.links) == (True, False, ["https://example.com/a"])
    other = page('<meta name="googlebot" content="noindex, nofollow">')
    assert (other.noindex, other.nofollow) == (False, False)


@pytest.mark.parametrize(
    ("header", "noindex", "nofollow"),
    [
        ("noindex", True, False),
        ("NOFOLLOW", False, True),
        ("none", True, True),
        ("googlebot: noindex, nofollow", False, False),
        ("streamcrawl: noindex", True, False),
        ("unavailable_after: 2030-01-01, nofollow", False, True),
        ("", False, False),
    ],
)
def test_x_robots_tag_header(header: str, noindex: bool, nofollow: bool) -> None:
    result = page('<a href="/a">a</a>', robots_header=header)
    assert (result.noindex, result.nofollow) == (noindex, nofollow)
    assert result.links == ([] if nofollow else ["https://example.com/a"])


def test_canonical_title_and_language() -> None:
    result = page(
        '<html lang="de-CH"><head><title>\n  Der   Titel \t</title>'
        '<link rel="alternate" href="/alt"><link rel="Canonical" href="/canon#frag">'
        "</head><body><svg><title>icon</title></svg>Text</body></html>"
    )
    assert result.title == "Der Titel"
    assert result.canonical == "https://example.com/canon"
    assert result.language == "de-CH"


def test_missing_signals_are_none() -> None:
    result = page("<p>just text</p>")
    assert (result.title, result.canonical, result.language) == (None, None, None)
    assert (result.noindex, result.nofollow, result.charset) == (False, False, "utf-8")


# --- text and hashing -------------------------------------------------------------------


def test_script_style_noscript_template_text_is_excluded() -> None:
    result = page(
        "<html><head><title>T</title><style>.a{color:red}</style></head><body>"
        "<script>var secret = 1;</script>visible<style>p{}</style><noscript>enable js"
        "</noscript><template><p>tmpl</p></template><!-- comment --> text</body></html>"
    )
    assert result.text == "visible text"


def test_whitespace_is_collapsed_and_blocks_separate_words() -> None:
    result = page(
        "<body>\n  <h1>Head\tline</h1><p>Hel<b>lo</b>\u00a0 <i>wor</i>ld</p>"
        "<ul><li>one</li><li>two</li></ul>a<br>b<table><tr><td>c</td><td>d</td></tr></table>"
        "</body>"
    )
    assert result.text == "Head line Hello world one two a b c d"


def test_blocks_are_found_by_their_element_whatever_the_markup_says() -> None:
    """Upper-case tags are the same elements; a stray <td> outside a table makes none (so
    it separates nothing); blocks nested in a block or inside inline elements still do."""
    result = page("<body>a<DIV>b</DIV>c<span>d</span>e<Li>f<td>g<b><p>h</p></b>i</body>")
    assert result.text == "a b cde fg h i"


def test_text_cap() -> None:
    result = extract_page(("<p>word</p>" * 1000).encode(), URL, None, max_text_chars=22)
    assert result.text == "word word word word wo"


def test_content_hash_ignores_markup_whitespace() -> None:
    compact = page("<html><body><div><p>Alpha beta.</p><p>Gamma.</p></div></body></html>")
    spaced = page(
        "<html>\n<head>\n</head>\n<body>\n  <div class='x'>\n    <p>\n      Alpha\n      beta.\n"
        "    </p>\n    <p>Gamma.</p>\n  </div>\n  <script>changed()</script>\n</body>\n</html>"
    )
    assert compact.text == spaced.text == "Alpha beta. Gamma."
    assert compact.content_hash == spaced.content_hash
    assert len(compact.content_hash) == 64


def test_content_hash_changes_with_content() -> None:
    one = page("<p>Alpha beta.</p>")
    other = page("<p>Alpha beta!</p>")
    assert one.content_hash != other.content_hash


# --- hostile input ----------------------------------------------------------------------


def _finishes_quickly(body: bytes, seconds: float = 5.0) -> ExtractedPage:
    started = time.perf_counter()
    result = extract_page(body, URL, None, robots_header="x" * 10_000)
    assert time.perf_counter() - started < seconds
    assert len(result.text) <= 200_000
    assert len(result.links) <= 5000
    return result


def test_random_megabyte_does_not_raise() -> None:
    noise = random.Random(1234).randbytes(1 << 20)
    _finishes_quickly(noise)
    _finishes_quickly(b"<html><head><meta charset=utf-8></head>" + noise)


def test_deep_nesting_does_not_raise() -> None:
    _finishes_quickly(b"<div>" * 100_000 + b"x" + b"</div>" * 100_000)
    _finishes_quickly(b"<span><section>" * 50_000 + b"<p>x" * 50_000)
    _finishes_quickly(b"<table><tr><td>" * 50_000)
    # Below the cap the document is parsed whole.
    shallow = b"<div>" * (MAX_NESTING - 10) + b"<a href='/deep'>deep text</a>"
    shallow_result = _finishes_quickly(shallow + b"<p>x</p>" * 20_000)
    assert shallow_result.links == ["https://example.com/deep"]
    assert shallow_result.text.startswith("deep text x x")


def test_huge_attributes_do_not_raise() -> None:
    five_mb = 5 * 1024 * 1024
    result = _finishes_quickly(
        b'<html lang="'
        + b"e" * five_mb
        + b'"><head><title>'
        + b"t" * five_mb
        + b'</title></head><body><a href="/'
        + b"a" * five_mb
        + b'">x</a><div title="'
        + b"<" * five_mb
        + b'">y</div>'
        + b'<a href="/ok">ok</a></body></html>',
        seconds=10.0,
    )
    assert result.links == ["https://example.com/ok"]
    assert result.title is not None and len(result.title) <= 1000
    assert result.language is not None and len(result.language) <= 35


def test_broken_markup_does_not_raise() -> None:
    samples = [
        b"",
        b"<",
        b"<<<<>>>>",
        b"<a" * 200_000,
        b"\x00" * 100_000,
        b"</html></body><body><html>" * 10_000,
        b"<p>a<b>b<i>c</p></b></i><table><td>x<tr></table></a></div>" * 5_000,
        b"<!-- never closed" + b"<a href='/x'>" * 1000,
        b"<script>" + b"</scr" * 100_000,
        b"<meta charset='\xff\xfe'><a href='http://\xff\xfe/'>x</a>",
        b'<a href="http://[::1]:99999999/">p</a><a href="http://%zz/">q</a>',
        b"<svg><math><title><a href='/s'>" * 5_000,
    ]
    for body in samples:
        _finishes_quickly(body)
    assert extract_page(b"", URL, None).text == ""


def test_nesting_cap_cuts_before_the_first_tag_past_the_limit() -> None:
    from streamcrawl.parser.extract import _cap_nesting

    flat = "<p>x</p><br>" * 6000  # void and self-closing tags never deepen the tree
    closed = "<div><span>y</span></div>" * 100  # opened and closed again
    html = flat + closed + "<DIV>" * MAX_NESTING + "<section>cut here" + "</div>" * 10
    assert _cap_nesting(html) == flat + closed + "<DIV>" * MAX_NESTING
    assert _cap_nesting(html.replace("<section>", "</DIV><section>")) == html.replace(
        "<section>", "</DIV><section>"
    )
