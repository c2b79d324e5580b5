"""The sink's decisions, pure: which ``_id`` a page is stored under, its document, and
which failed writes are duplicates (replace them) or refusals (dead-letter them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import bson
from bson.errors import InvalidDocument
from pymongo.errors import BulkWriteError

from ..core.config import Settings
from ..core.messages import Page, Tally, to_dict
from ..core.schedule import schedule_fields
from ..core.scope import canonical_url
from ..core.urls import InvalidURL, host_of

DUPLICATE_KEY = 11000


def storage_id(page: Page, settings: Settings) -> str:
    """The ``_id`` a page is stored under: the canonical form (under the same settings as
    the frontier's) of the rel=canonical URL it declares, when that is on the page's own
    host and the page is a 2xx answer (not a redirect); otherwise its own URL.

    So ``/a?x=1`` and ``/a`` that both declare ``/a`` share one document. A canonical on
    another host is a claim this crawl cannot check (and would let one site overwrite
    another's documents), so it is ignored.
    """
    declared = page.canonical
    if not declared or page.redirect_to or not 200 <= page.status < 300:
        return page.url
    try:
        canonical = canonical_url(declared, settings)
    except InvalidURL:
        return page.url
    return canonical if host_of(canonical) == host_of(page.url) else page.url


def document_for(page: Page, stored_at: float, settings: Settings) -> dict[str, Any]:
    return document_under(storage_id(page, settings), page, stored_at)


def document_under(document_id: str, page: Page, stored_at: float) -> dict[str, Any]:
    """The page document of ``page`` under an ``_id`` already worked out by
    :func:`storage_id`: the content as stored, with the validators and digest of the
    response that brought it (``etag``, ``last_modified``, ``content_hash``) and
    ``stored_at``. What only travels (``revisit``, ``unchanged``) is left out. When the
    URL was last checked and when it is due again live on its status document
    (:func:`written_status`), which a revisit moves without rewriting the page."""
    fields = to_dict(page)
    fields.pop("revisit", None)
    fields.pop("unchanged", None)
    return {"_id": document_id, **fields, "stored_at": stored_at}


def written_status(
    document: dict[str, Any], page: Page, stored_at: float, settings: Settings | None = None
) -> dict[str, Any]:
    """The status document of a page document just written: its fields of
    :data:`STATUS_FIELDS`, ``checked_at`` (now) and, with ``settings``, the adaptive
    schedule: ``revisit_interval`` and ``next_visit`` (a new page gets the initial
    interval, a changed one a shorter interval)."""
    status = status_document(document)
    status["checked_at"] = stored_at
    if settings is not None:
        changed = content_changed(page)
        status.update(schedule_fields(previous_interval(page), changed, stored_at, settings))
    return status


def content_changed(page: Page) -> bool:
    """Whether a rewritten page counts as changed for the schedule: its digest differs from
    the stored one. A redirect or an error page answered again as before (no digest either
    time) is not a change, so it is not revisited ever more often."""
    return page.revisit is None or page.content_hash != page.revisit.digest


def previous_interval(page: Page) -> float | None:
    """The revisit interval the page had before this visit (None: a first visit)."""
    return page.revisit.interval if page.revisit is not None else None


def checked_id(page: Page, settings: Settings) -> str:
    """The ``_id`` of the stored document an unchanged page confirms: the one the revisit
    was made for, else where the page would be stored."""
    if page.revisit is not None and page.revisit.stored_id:
        return page.revisit.stored_id
    return storage_id(page, settings)


def check_update(page: Page, checked_at: float, settings: Settings | None = None) -> dict[str, Any]:
    """The ``$set`` that records an unchanged page on its status document: ``checked_at``,
    and the validators the server sent now (a touched file has a new ETag over the same
    content, which the next revisit should send). The content is left as it is. With
    ``settings``, the adaptive schedule too: the interval grows (a 304 and a 200 with the
    stored digest are both unchanged; a missing Last-Modified plays no part)."""
    fields: dict[str, Any] = {"checked_at": checked_at}
    if page.status != 304:
        fields["etag"] = page.etag
        fields["last_modified"] = page.last_modified
    if settings is not None:
        fields.update(schedule_fields(previous_interval(page), False, checked_at, settings))
    return fields


# What a revisit needs of a stored page (``recrawl`` reads these, not the page with its
# text and links): the crawl.discovered fields, the validators and digest, and the schedule
# (which only status documents carry; pages stored before them may have it too).
STATUS_FIELDS = (
    "url",
    "host",
    "crawl_id",
    "depth",
    "priority",
    "scope",
    "kind",
    "meta",
    "etag",
    "last_modified",
    "content_hash",
    "stored_at",
    "checked_at",
    "revisit_interval",
    "next_visit",
)


def status_document(document: dict[str, Any]) -> dict[str, Any]:
    """A status document from a stored page document: same ``_id``, the fields of
    :data:`STATUS_FIELDS` it has."""
    status = {"_id": document["_id"]}
    status.update({name: document[name] for name in STATUS_FIELDS if name in document})
    return status


def split_unchanged(pages: list[Page], latest: dict[str, int]) -> tuple[dict[str, int], list[int]]:
    """The latest pages to write in full (by ``_id``) and the positions of the unchanged
    ones, whose status documents only get ``checked_at``."""
    changed = {_id: index for _id, index in latest.items() if not pages[index].unchanged}
    return changed, [index for index in latest.values() if pages[index].unchanged]


def latest_documents(pages: list[Page], settings: Settings) -> dict[str, int]:
    """The pages to write, by ``_id``, as positions in ``pages``: the last version of a URL
    in a batch wins, and then the last page stored under one ``_id`` (spellings of a page
    that declare one canonical)."""
    by_url = {page.url: index for index, page in enumerate(pages)}
    return {storage_id(pages[index], settings): index for index in by_url.values()}


def refusal_reason(document: Any) -> str | None:
    """Why a MongoDB-wire server would refuse this document, for the one refusal seen in
    practice that can be told before writing: a field name that starts with ``$`` (a
    seed's ``meta`` can carry one; FerretDB refuses it, and MongoDB before 5.0). The sink
    deletes a stored page before writing its new version, so it must not delete for a
    version that will be refused."""
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and key.startswith("$"):
                    return f"field name {key!r} starts with '$' (refused before writing)"
                pending.append(item)
        elif isinstance(value, list):
            pending.extend(value)
    return None


def classify_failures(error: BulkWriteError) -> tuple[set[int], dict[int, str]]:
    """Positions that failed only because the URL exists, and positions the database
    rejected for good (a document-level write error is not cured by retrying)."""
    duplicates: set[int] = set()
    rejected: dict[int, str] = {}
    for failure in error.details.get("writeErrors", []):
        index = int(failure["index"])
        if failure.get("code") == DUPLICATE_KEY:
            duplicates.add(index)
        else:
            rejected[index] = f"code {failure.get('code')}: {failure.get('errmsg', '')[:500]}"
    return duplicates, rejected


class _Read(Protocol):
    """What :func:`stored_tallies` needs of a received page (its record's partition and
    offset, and the page)."""

    @property
    def record(self) -> Any: ...

    @property
    def message(self) -> Any: ...


def stored_tallies(
    batch: Sequence[_Read], written: list[int], stored_at: float, unchanged: Sequence[int] = ()
) -> list[Tally]:
    """One crawl.events record per crawl id and crawl.pages partition of the batch: the
    offsets read (``read``) and the offsets whose page was written (``offsets``; a page
    superseded in its batch by a later version, or refused by the database, is read but
    not written)."""
    wrote = set(written)
    same = set(unchanged)
    read: dict[tuple[str, int], list[int]] = {}
    stored: dict[tuple[str, int], list[int]] = {}
    checked: dict[tuple[str, int], int] = {}
    for index, item in enumerate(batch):
        key = (item.message.crawl_id, item.record.partition)
        read.setdefault(key, []).append(item.record.offset)
        if index in wrote:
            stored.setdefault(key, []).append(item.record.offset)
        if index in same:
            checked[key] = checked.get(key, 0) + 1
    return [
        Tally(
            stage="sink",
            crawl_id=crawl_id,
            at=stored_at,
            counts={"unchanged": checked[crawl_id, partition]}
            if (crawl_id, partition) in checked
            else {},
            partition=partition,
            offsets=sorted(stored.get((crawl_id, partition), [])),
            read=sorted(offsets),
        )
        for (crawl_id, partition), offsets in read.items()
    ]


def unencodable(documents: list[dict[str, Any]]) -> dict[int, str]:
    """Positions of the documents BSON cannot hold (a NUL in a key, an integer past 64
    bits), with why; pymongo refuses a whole batch for one of them."""
    refused: dict[int, str] = {}
    for index, document in enumerate(documents):
        try:
            bson.encode(document)
        except (InvalidDocument, OverflowError) as exc:
            refused[index] = f"not encodable as BSON: {str(exc)[:500]}"
    return refused
