"""The drain rule of ``crawl``: no lag at two polls in a row and no record added between."""

from __future__ import annotations

from aiokafka import TopicPartition
from streamcrawl.crawl.watch import Progress, _drained_between, _poll_wait

PAGES = TopicPartition("crawl.pages", 0)
FETCH = TopicPartition("crawl.fetch", 1)


def _poll(lag: int, pages_end: int, fetch_end: int = 7) -> Progress:
    return Progress(lag_total=lag, ends={PAGES: pages_end, FETCH: fetch_end})


def test_two_quiet_polls_with_the_same_end_offsets_mean_drained() -> None:
    assert _drained_between(_poll(0, 10), _poll(0, 10))


def test_a_record_added_between_polls_means_work_in_flight() -> None:
    # Every group had committed everything both times, but a stage published in between.
    assert not _drained_between(_poll(0, 10), _poll(0, 11))
    assert not _drained_between(_poll(0, 10, 7), _poll(0, 10, 8))


def test_lag_at_either_poll_means_work_in_flight() -> None:
    assert not _drained_between(_poll(1, 10), _poll(0, 10))
    assert not _drained_between(_poll(0, 10), _poll(2, 10))


def test_a_poll_without_lag_is_confirmed_sooner() -> None:
    assert _poll_wait(None, 0.25, 0.05) == 0.25
    assert _poll_wait(_poll(3, 10), 0.25, 0.05) == 0.25
    assert _poll_wait(_poll(0, 10), 0.25, 0.05) == 0.05
    assert _poll_wait(_poll(0, 10), 0.02, 0.05) == 0.02  # never slower than the interval
