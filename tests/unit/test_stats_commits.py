"""The stats worker commits an input offset only after the changelog records written
before it are acknowledged (faust's own flush before a commit does not make sure)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from streamcrawl.core.config import Settings
from streamcrawl.stats.app import ChangelogAcks, ChangelogWriteFailed, StatsApp


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_wait_ends_only_when_every_record_tracked_before_it_is_acknowledged() -> None:
    acks = ChangelogAcks()
    await asyncio.wait_for(acks.wait(), 1.0)  # nothing tracked: at once
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    acks.track(first)
    acks.track(second)
    waiting = asyncio.ensure_future(acks.wait())
    first.set_result("written")
    await settle()
    assert not waiting.done() and acks.pending == 1
    second.set_result("written")
    await asyncio.wait_for(waiting, 1.0)
    assert acks.pending == 0


async def test_a_failed_record_fails_this_wait_and_every_later_one() -> None:
    acks = ChangelogAcks()
    loop = asyncio.get_running_loop()
    failed, cancelled = loop.create_future(), loop.create_future()
    acks.track(failed)
    acks.track(cancelled)
    failed.set_exception(OSError("broker gone"))
    cancelled.cancel()
    with pytest.raises(ChangelogWriteFailed, match="broker gone"):
        await asyncio.wait_for(acks.wait(), 1.0)
    with pytest.raises(ChangelogWriteFailed):
        await asyncio.wait_for(acks.wait(), 1.0)  # until the worker starts again


@pytest.fixture(scope="module")
def stats() -> StatsApp:
    return StatsApp(Settings())


async def test_the_flush_before_a_commit_waits_for_a_table_change_still_unsent(
    stats: StatsApp,
) -> None:
    written: Any = stats.crawls.send_changelog(0, "crawl-a|crawl.events|0", {"offset": 7})
    assert stats.app.changelog_acks.pending == 1
    producer: Any = stats.app.producer
    # Taken from faust's buffer and not yet handed to the Kafka client: faust's flush
    # alone returns at once here (its buffer is empty), and the commit would go ahead.
    assert producer.buffer.pending.get_nowait().message.key is not None
    await producer.buffer.flush()
    flushing = asyncio.ensure_future(producer.flush())
    await settle()
    assert not flushing.done()
    written.set_result(None)  # the broker acknowledged it
    await asyncio.wait_for(flushing, 1.0)
    assert stats.app.changelog_acks.pending == 0
    both_tables = {stats.crawls.acks, stats.hosts.acks}
    assert both_tables == {stats.app.changelog_acks}


async def test_table_changes_are_written_once_per_key_with_the_latest_value_before_a_commit(
    stats: StatsApp,
) -> None:
    producer: Any = stats.app.producer
    for offset in range(5):  # five records applied to one key, one to another
        stats.hosts["crawl-a|example.org|crawl.fetched|0"] = {"o": offset, "c": {"fetched": 1}}
    stats.crawls["crawl-a|crawl.fetched|0"] = {"o": 4, "c": {"fetched": 5}}
    assert producer.buffer.size == 0 and stats.app.changelog_acks.pending == 0
    stats.app.write_changed()  # what the flush before a commit does first
    sent = [producer.buffer.pending.get_nowait() for _ in range(producer.buffer.size)]
    assert sorted(future.message.key for future in sent) == sorted(
        [b'"crawl-a|example.org|crawl.fetched|0"', b'"crawl-a|crawl.fetched|0"']
    )
    assert any(b'"o":4' in future.message.value.replace(b" ", b"") for future in sent)
    assert stats.app.changelog_acks.pending == 2
    flushing = asyncio.ensure_future(producer.flush())
    await settle()
    assert not flushing.done()  # the commit waits for the two records
    for future in sent:
        future.set_result(None)
    await asyncio.wait_for(flushing, 1.0)
    assert producer.buffer.size == 0  # nothing changed since: nothing more written
    assert stats.hosts["crawl-a|example.org|crawl.fetched|0"]["o"] == 4
