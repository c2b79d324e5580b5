"""The public Kafka contract: topic names, partition counts and consumer groups."""

from __future__ import annotations

from dataclasses import dataclass

# crawl.discovered and crawl.fetch MUST have the same partition count: dedup
# writes each admitted URL to the fetch partition with the number of the
# discovered partition it came from, so crawl.fetch partition p is the exact
# changelog of dedup's Bloom filter for partition p.
HOST_PARTITIONS = 12

# Large bodies travel on crawl.fetched; the topic limit must exceed the body cap
# after compression and base64 (4/3) plus headers.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class TopicSpec:
    suffix: str
    partitions: int
    config: tuple[tuple[str, str], ...] = ()


TOPIC_SPECS: tuple[TopicSpec, ...] = (
    TopicSpec("seeds", 3),
    TopicSpec("discovered", HOST_PARTITIONS),
    TopicSpec("fetch", HOST_PARTITIONS),
    # Retries and URLs whose host is busy wait here; keyed by host like crawl.fetch,
    # so partition p goes back to crawl.fetch partition p.
    TopicSpec("retry", HOST_PARTITIONS),
    TopicSpec("fetched", HOST_PARTITIONS, (("max.message.bytes", str(MAX_MESSAGE_BYTES)),)),
    TopicSpec("pages", HOST_PARTITIONS, (("max.message.bytes", str(MAX_MESSAGE_BYTES)),)),
    TopicSpec("dlq", 3, (("max.message.bytes", str(MAX_MESSAGE_BYTES)),)),
    # Stages' per-batch counts for the stats stage (keyed by crawl id). As many
    # partitions as the host-keyed topics: stats' tables are partitioned like its inputs.
    TopicSpec("events", HOST_PARTITIONS),
    # Each crawl's state (active, paused, cancelled), keyed by crawl id: compacted, so the
    # last command of every crawl is kept for good and a stage that starts reads them all.
    TopicSpec(
        "control",
        3,
        (("cleanup.policy", "compact"), ("min.compaction.lag.ms", "0"), ("segment.ms", "3600000")),
    ),
)

SEEDS, DISCOVERED, FETCH, RETRY, FETCHED, PAGES, DLQ, EVENTS, CONTROL = (
    spec.suffix for spec in TOPIC_SPECS
)

# Consumer groups, one per service. KEDA watches FETCHER_GROUP on crawl.fetch.
FRONTIER_GROUP = "streamcrawl-frontier"
DEDUP_GROUP = "streamcrawl-dedup"
FETCHER_GROUP = "streamcrawl-fetcher"
DELAY_GROUP = "streamcrawl-delay"
PARSER_GROUP = "streamcrawl-parser"
SINK_GROUP = "streamcrawl-sink"
# The archive reads crawl.fetched in a group of its own: it adds no work to the parser and
# is scaled, stopped or replayed on its own.
WARC_GROUP = "streamcrawl-warc"
# The stats stage (a faust app): its application id, so its consumer group and the
# prefix of its changelog topics.
STATS_GROUP = "streamcrawl-stats"

DEFAULT_TOPIC_PREFIX = "crawl."


def group_id(topic_prefix: str, group: str) -> str:
    """The consumer group id of ``group`` in the pipeline whose topics carry ``topic_prefix``.

    Pipelines with different prefixes on one cluster must not share a group: a stage of
    one would join the other's group, rebalance it and take partitions of topics it does
    not read. The default prefix keeps the plain names (KEDA's ScaledObject names them).
    """
    if topic_prefix == DEFAULT_TOPIC_PREFIX:
        return group
    return f"{group}-{topic_prefix.rstrip('.')}"


# Which group reads which topics: the pipeline in one table.
GROUP_INPUTS: dict[str, tuple[str, ...]] = {
    FRONTIER_GROUP: (SEEDS, PAGES),
    DEDUP_GROUP: (DISCOVERED,),
    FETCHER_GROUP: (FETCH,),
    DELAY_GROUP: (RETRY,),
    PARSER_GROUP: (FETCHED,),
    SINK_GROUP: (PAGES,),
    WARC_GROUP: (FETCHED,),
}

# What the stats stage (a faust app, outside the drain check) counts from: when its group
# has committed all of it, its numbers are final.
STATS_INPUTS: tuple[str, ...] = (EVENTS, FETCHED, RETRY, DLQ)


def topic_name(prefix: str, suffix: str) -> str:
    return f"{prefix}{suffix}"


# Replicas per partition: three where the cluster has them (one broker may be lost for
# good), never more than the cluster has, one on a single-broker stack.
MAX_REPLICATION = 3


def replication_for(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for a cluster of ``brokers``: with three
    replicas a write (acks=all) needs two, so one broker may be lost without stopping
    producers; with fewer replicas losing one would, so one in-sync replica suffices."""
    replicas = max(1, min(MAX_REPLICATION, brokers))
    return replicas, 2 if replicas >= 3 else 1
