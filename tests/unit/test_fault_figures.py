"""The fault suite's arithmetic: restart-to-commit times, stalls and the report table."""

from __future__ import annotations

from streamcrawl.core.config import Settings
from streamcrawl.core.topics import FETCHER_GROUP, SINK_GROUP

from ..support.faults import CommitSampler, FaultFigures, table


def sampler(points: list[tuple[float, int, int]]) -> CommitSampler:
    """Samples of (time, sink commits, fetcher commits)."""
    result = CommitSampler(Settings.from_env({}))
    result.samples = [(t, {SINK_GROUP: sink, FETCHER_GROUP: fetch}) for t, sink, fetch in points]
    return result


def test_first_commit_after_a_restart_counts_from_the_last_sample_before_it() -> None:
    samples = sampler([(0, 10, 5), (1, 20, 5), (2, 20, 5), (3, 20, 5), (4, 25, 5), (5, 25, 9)])
    assert samples.first_commit_after(2.5) == 1.5
    assert samples.first_commit_after(2.5, FETCHER_GROUP) == 2.5
    assert samples.first_commit_after(5.5) is None  # nothing stored after it


def test_longest_stall_is_the_longest_time_between_two_advances() -> None:
    samples = sampler([(0, 0, 0), (1, 5, 0), (2, 5, 0), (6, 9, 0), (7, 12, 0), (8, 12, 0)])
    assert samples.longest_stall() == 5.0
    assert samples.longest_stall(FETCHER_GROUP) == 0.0  # never advanced


def test_the_table_has_a_row_per_fault_with_its_figures() -> None:
    figures = FaultFigures(
        fault="sigkill-fetcher",
        expected=10,
        stored=10,
        duplicated=0,
        lost=0,
        refetched=3,
        refetched_paths=3,
        refetch_bound=40,
        unexplained_refetches=0,
        restart_to_stored_s=0.04,
        restart_to_resumed_s=30.26,
        longest_stall_s=31.0,
        dlq=4,
        failing_requests=13,
        dlq_unexpected=0,
        dlq_missing=0,
        pages_topic_missing=0,
        exited=[],
        crawl_s=64.8,
    )
    header, rule, row = table([figures])
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    titles = [cell.strip() for cell in header.strip("|").split("|")]
    assert dict(zip(titles, cells, strict=True)) == {
        "fault": "sigkill-fetcher",
        "expected": "10",
        "stored": "10",
        "dup": "0",
        "lost": "0",
        "refetched": "3",
        "bound": "40",
        "restart->stored s": "0.0",
        "restart->resumed s": "30.3",
        "stall s": "31.0",
        "dlq": "4",
        "500 reqs": "13",
        "exited": "none",
        "crawl s": "64.8",
    }
    assert set(rule) == {"|", "-"}
