"""Pure parts of fault handling: which errors are outages, how a poison record's reason
is named, batch memory that is written only once a batch succeeded, static member ids,
the shutdown deadline, and the new settings."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
)
from bson.errors import InvalidDocument
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
)
from streamcrawl.core.config import Settings
from streamcrawl.core.membership import consumer_options, remove_static_member
from streamcrawl.core.poison import OutputTooLarge, attempts_of, is_outage, poison_reason
from streamcrawl.core.shutdown import Deadline, run_until_deadline
from streamcrawl.crawl.processes import instance_id
from streamcrawl.dedup.logic import Admission, PartitionFilter
from streamcrawl.frontier.logic import RecentlySent

POISON_URL = "http://%E2%80%8B0user:pass@%E3%80%82[::1"  # an unbalanced "[" in the host


@pytest.mark.parametrize(
    "error",
    [
        KafkaConnectionError("down"),
        NotLeaderForPartitionError(),
        ServerSelectionTimeoutError("no server"),
        AutoReconnect("closed"),
        NotPrimaryError("stepped down"),
        ConnectionRefusedError(),
        TimeoutError(),
        OperationFailure("not authorized on streamcrawl", code=13),
    ],
)
def test_outages_are_waited_out(error: Exception) -> None:
    assert is_outage(error)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("Invalid IPv6 URL"),
        KeyError("nModified"),
        InvalidDocument("NUL"),
        BulkWriteError({"writeErrors": [{"index": 0, "code": 2}]}),
        OperationFailure("refused"),
        OperationFailure("invalid key", code=2),
        MessageSizeTooLargeError(),
        OutputTooLarge("9 MB"),
    ],
)
def test_record_errors_are_not_outages(error: Exception) -> None:
    assert not is_outage(error)


def test_a_poison_reason_names_the_exception_in_the_dlq_reason_alphabet() -> None:
    assert poison_reason(BulkWriteError({})) == "raised_bulk_write_error"
    assert poison_reason(ValueError()) == "raised_value_error"
    assert poison_reason(OutputTooLarge()) == "raised_output_too_large"


async def test_attempts_are_bounded_and_outages_are_not_counted() -> None:
    calls: list[str] = []

    async def flaky() -> str:
        calls.append("x")
        if len(calls) == 1:
            raise AutoReconnect("blip")  # waited out, not an attempt
        raise ValueError("bad record")

    result = await attempts_of("test", flaky, attempts=3)
    assert isinstance(result, ValueError) and len(calls) == 4


def test_a_failed_frontier_batch_leaves_no_link_marked_as_sent() -> None:
    recent = RecentlySent(capacity=100)
    batch = recent.batch()
    assert batch.first_time("c", "http://a/1")
    assert not batch.first_time("c", "http://a/1")  # repeated within the batch: sent once
    # The batch raised here: nothing was applied, so a second run sends the link again.
    again = recent.batch()
    assert again.first_time("c", "http://a/1")
    again.apply()
    assert not recent.batch().first_time("c", "http://a/1")
    assert RecentlySent(capacity=0).batch().first_time("c", "x")  # off: always sent


def test_a_failed_dedup_batch_leaves_the_filters_untouched() -> None:
    admission = Admission()
    admission.filters[0] = PartitionFilter(1000, 1e-6)
    batch = admission.batch()
    assert batch.decide(0, "c", "http://a.example/1", max_pages=0) is None
    with pytest.raises(ValueError, match="Invalid IPv6 URL"):
        batch.decide(0, "c", POISON_URL, max_pages=0)
    # Not applied: /1 is still new for the record-by-record run.
    assert admission.decide(0, "c", "http://a.example/1", max_pages=0) is None
    assert admission.decide(0, "c", "http://a.example/1", max_pages=0) == "duplicate"


def test_a_dedup_batch_counts_its_own_admissions_before_applying_them() -> None:
    admission = Admission()
    admission.filters[0] = PartitionFilter(1000, 1e-6)
    batch = admission.batch()
    verdicts = [
        batch.decide(0, "c", f"http://a.example/{n}", max_pages=0, max_pages_per_host=2)
        for n in (1, 1, 2, 3)
    ]
    assert verdicts == [None, "duplicate", None, "max_pages_per_host"]
    budget = admission.batch()
    assert [budget.decide(0, "d", f"http://b.example/{n}", max_pages=1) for n in (1, 2)] == [
        None,
        "max_pages",
    ]
    batch.apply()
    assert admission.filters[0].admitted["c"] == 2


def test_static_member_ids() -> None:
    assert consumer_options(Settings()) == {}
    assert consumer_options(Settings(instance_id="fetcher-7c9f")) == {
        "group_instance_id": "fetcher-7c9f"
    }
    env = {"STREAMCRAWL_TOPIC_PREFIX": "t1."}
    assert instance_id(env, "fetcher-2") == "t1.fetcher-2"
    assert instance_id({}, "sink") == "crawl.sink"


def test_fault_settings_are_validated() -> None:
    settings = Settings.from_env({})
    assert (settings.poison_attempts, settings.shutdown_grace, settings.instance_id) == (
        3,
        20.0,
        "",
    )
    with pytest.raises(ValueError, match="POISON_ATTEMPTS"):
        Settings.from_env({"STREAMCRAWL_POISON_ATTEMPTS": "0"})
    with pytest.raises(ValueError, match="SHUTDOWN_GRACE"):
        Settings.from_env({"STREAMCRAWL_SHUTDOWN_GRACE": "0"})


async def test_a_loop_that_does_not_stop_is_cut_at_the_deadline() -> None:
    stop = asyncio.Event()
    committed: list[bool] = []

    async def stubborn() -> None:
        await asyncio.sleep(3600)

    async def last_commit() -> None:
        committed.append(True)

    loop = asyncio.get_running_loop()
    stop.set()
    started = loop.time()
    await run_until_deadline("test", stubborn(), stop, Deadline(2.0), last_commit)
    # Cut at the deadline less its reserve (a quarter of the grace), then committed.
    assert 1.0 < loop.time() - started < 2.0
    assert committed == [True]


async def test_leaving_the_group_with_the_broker_down_gives_up_in_time() -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:1", instance_id="fetcher-x")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await remove_static_member(settings, "streamcrawl-fetcher", timeout=1.0)
    assert loop.time() - started < 3.0
