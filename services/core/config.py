"""All configuration, read from ``STREAMCRAWL_*`` environment variables.

This module is the one place settings are defined; ``docs`` in the README is
generated from :data:`SETTINGS_DOC` so the two cannot drift.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .messages import MAX_ATTEMPTS
from .topics import DEFAULT_TOPIC_PREFIX, MAX_MESSAGE_BYTES
from .urls import DEFAULT_SESSION_PARAMS

PREFIX = "STREAMCRAWL_"
KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
# A body travels zlib-compressed (incompressible data grows a little) and base64-encoded
# (4/3) on crawl.fetched, next to up to 200 headers of 8 KiB: this keeps the largest
# body inside the topic's message limit.
MAX_BODY_CAP = (MAX_MESSAGE_BYTES - 2 * 1024 * 1024) * 3 // 4


def _split(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    """Runtime settings shared by every service; each field maps to ``STREAMCRAWL_<NAME>``."""

    kafka_bootstrap: str = field(
        default="127.0.0.1:19092", metadata={"doc": "Kafka bootstrap servers, comma separated."}
    )
    # Kafka security: every client (stages, CLI, lag, KEDA's view) is built from these in
    # core/kafka.py. The password is read from a file, never from the environment.
    kafka_security_protocol: str = field(
        default="PLAINTEXT",
        metadata={"doc": "Kafka security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."},
    )
    kafka_sasl_mechanism: str = field(
        default="SCRAM-SHA-512",
        metadata={
            "doc": "SASL mechanism for SASL_* protocols: SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN."
        },
    )
    kafka_sasl_username: str = field(
        default="", metadata={"doc": "SASL user name (SASL_* protocols)."}
    )
    kafka_sasl_password_file: str = field(
        default="",
        metadata={
            "doc": "File holding the SASL password (a mounted Secret); read when a client is "
            "made, never logged."
        },
    )
    kafka_ssl_cafile: str = field(
        default="",
        metadata={
            "doc": "PEM file of the CA that signed the brokers' certificates (SSL, SASL_SSL). "
            "Empty: the system's CAs."
        },
    )
    topic_prefix: str = field(
        default=DEFAULT_TOPIC_PREFIX,
        metadata={"doc": "Prefix of every topic name (crawl.seeds, crawl.fetch, ...)."},
    )
    mongo_uri: str = field(
        default="mongodb://127.0.0.1:27027/",
        metadata={"doc": "MongoDB connection string used by the sink."},
    )
    mongo_password_file: str = field(
        default="",
        metadata={
            "doc": "File holding the MongoDB password, merged into MONGO_URI (which names the "
            "user: mongodb://USER@host/?authSource=DB); never logged."
        },
    )
    mongo_database: str = field(default="streamcrawl", metadata={"doc": "MongoDB database."})
    mongo_collection: str = field(
        default="pages",
        metadata={
            "doc": "MongoDB collection of the pages. Beside it, <collection>_status holds "
            "a small document per page: what a revisit needs (validators, digest, schedule)."
        },
    )
    user_agent: str = field(
        default="streamcrawl/0.1 (+https://github.com/streamcrawl/streamcrawl)",
        metadata={"doc": "User-Agent sent with every request; keep a contact URL in it."},
    )
    allow_domains: tuple[str, ...] = field(
        default=(),
        metadata={
            "doc": "Default crawl scope (comma separated registrable domains or hosts). "
            "Empty: each seed's own host."
        },
    )
    max_depth: int = field(default=5, metadata={"doc": "Default maximum link depth from a seed."})
    max_pages: int = field(
        default=0, metadata={"doc": "Default maximum pages admitted per crawl id (0: unlimited)."}
    )
    max_url_length: int = field(default=2048, metadata={"doc": "Longer URLs are dropped."})
    allow_networks: tuple[str, ...] = field(
        default=(),
        metadata={
            "doc": "Private/loopback networks the fetcher may reach (CIDR, comma separated). "
            "Empty: only public addresses."
        },
    )
    fetch_concurrency: int = field(
        default=512, metadata={"doc": "Requests in flight per fetcher process."}
    )
    fetch_per_host_concurrency: int = field(
        default=2, metadata={"doc": "Requests in flight per host per fetcher process."}
    )
    fetch_timeout: float = field(default=30.0, metadata={"doc": "Total seconds per request."})
    fetch_connect_timeout: float = field(default=10.0, metadata={"doc": "Connect timeout, s."})
    fetch_read_timeout: float = field(
        default=15.0, metadata={"doc": "Seconds allowed between two chunks of a body."}
    )
    max_body_bytes: int = field(
        default=2 * 1024 * 1024,
        metadata={
            "doc": "Body cap: the bytes received are cut here while streaming, and a "
            "compressed body is inflated to at most this many bytes; a larger body is cut "
            "and marked truncated. At most 4.5 MiB, the topic limit."
        },
    )
    dns_cache_ttl: int = field(default=300, metadata={"doc": "Seconds DNS answers are cached."})
    crawl_delay: float = field(
        default=1.0,
        metadata={
            "doc": "Minimum seconds between the starts of two requests to one host; the "
            "larger of this and the host's robots.txt Crawl-delay applies."
        },
    )
    host_delays: tuple[str, ...] = field(
        default=(),
        metadata={
            "doc": "Per-host minimum delays overriding CRAWL_DELAY: `host[:port]=seconds,...`."
        },
    )
    max_crawl_delay: float = field(
        default=30.0, metadata={"doc": "Cap on any per-host delay, Crawl-delay included."}
    )
    robots_ttl: float = field(
        default=3600.0, metadata={"doc": "Seconds a host's robots.txt is cached."}
    )
    robots_retry: float = field(
        default=30.0,
        metadata={
            "doc": "After robots.txt answers 5xx or times out, the host counts as disallowed "
            "for this many seconds; its URLs wait in crawl.retry."
        },
    )
    retry_max_attempts: int = field(
        default=4,
        metadata={
            "doc": "Attempts per URL (timeouts, connection errors, 429, 5xx); then crawl.dlq."
        },
    )
    retry_base_delay: float = field(
        default=2.0, metadata={"doc": "First retry backoff, s; doubles per attempt, full jitter."}
    )
    retry_max_delay: float = field(
        default=600.0, metadata={"doc": "Cap on a retry backoff and on an honoured Retry-After, s."}
    )
    host_queue_horizon: float = field(
        default=30.0,
        metadata={
            "doc": "A fetcher holds a host's URLs in memory only if they can start within this "
            "many seconds; later ones wait in crawl.retry, so one slow host never fills memory."
        },
    )
    fetch_max_pending: int = field(
        default=10_000,
        metadata={"doc": "URLs a fetcher process holds waiting for their host's turn."},
    )
    delay_max_held: int = field(
        default=50_000,
        metadata={"doc": "Retries the delay service holds in memory until they are due."},
    )
    pause_recheck: float = field(
        default=5.0,
        metadata={
            "doc": "A URL of a paused crawl waits in crawl.retry this many seconds, then is "
            "checked again (so a resumed crawl goes on within about this long)."
        },
    )
    proxies: tuple[str, ...] = field(
        default=(),
        metadata={"doc": "Optional proxy pool (http://host:port, comma separated), one per host."},
    )
    proxy_cooldown: float = field(
        default=60.0, metadata={"doc": "Seconds a failing proxy is left out of the pool."}
    )
    max_pages_per_host: int = field(
        default=0,
        metadata={"doc": "Maximum pages admitted per host per crawl id (0: unlimited)."},
    )
    max_path_repeats: int = field(
        default=2,
        metadata={"doc": "URLs with one path segment repeated more often than this are dropped."},
    )
    max_calendar_pages: int = field(
        default=200,
        metadata={
            "doc": "Maximum URLs per host and crawl with the same date-shaped pattern "
            "(an endless calendar is cut there)."
        },
    )
    session_params: tuple[str, ...] = field(
        default=DEFAULT_SESSION_PARAMS,
        metadata={"doc": "Query parameters (and ;params) stripped from URLs as session ids."},
    )
    frontier_recent_urls: int = field(
        default=100_000,
        metadata={
            "doc": "Links the frontier remembers having sent to dedup, so a link repeated on "
            "many pages (navigation) is one message, not one per page (0: off)."
        },
    )
    state_dir: str = field(
        default="",
        metadata={
            "doc": "Directory where dedup keeps a snapshot of each partition's filter and the "
            "crawl.fetch offset it covers, so a restart replays only what came after. "
            "Empty: no snapshots (a start replays all of crawl.fetch)."
        },
    )
    dedup_snapshot_interval: float = field(
        default=30.0,
        metadata={"doc": "Seconds between two snapshots of a changed dedup partition."},
    )
    bloom_capacity: int = field(
        default=1_000_000,
        metadata={"doc": "Initial Bloom filter capacity per partition (it grows as needed)."},
    )
    bloom_error_rate: float = field(
        default=1e-6, metadata={"doc": "Target false-positive rate of the dedup Bloom filters."}
    )
    batch_size: int = field(default=500, metadata={"doc": "Records per consumer batch."})
    instance_id: str = field(
        default="",
        metadata={
            "doc": "Static group membership (`group.instance.id`): a name unique in the stage's "
            "group that a restarted process reuses, so it takes its partitions straight back "
            "instead of waiting for the session timeout. Kubernetes: the pod name; `crawl`: "
            "prefix, stage and slot. Empty: dynamic membership."
        },
    )
    shutdown_grace: float = field(
        default=20.0,
        metadata={
            "doc": "Seconds a stage has after SIGTERM to finish or hand back its work, commit and "
            "leave its group; past it, it exits anyway (the next owner re-reads what was not "
            "committed). Keep it below the pod's terminationGracePeriodSeconds."
        },
    )
    poison_attempts: int = field(
        default=3,
        metadata={
            "doc": "Times a record whose processing raises is tried before it goes to crawl.dlq "
            "(outages of Kafka or the database are waited out instead, never dead-lettered)."
        },
    )
    metrics_port: int = field(
        default=0, metadata={"doc": "Port for /metrics, /healthz, /readyz (0: disabled)."}
    )
    log_level: str = field(default="INFO", metadata={"doc": "Python log level."})
    warc_dir: str = field(
        default="",
        metadata={
            "doc": "Directory of the warc stage's WARC files. Empty: `<STATE_DIR>/warc`, or "
            "`./warc` without a STATE_DIR."
        },
    )
    warc_max_bytes: int = field(
        default=1_000_000_000,
        metadata={
            "doc": "A WARC file is completed (renamed from `.open`) and a new one begun once it "
            "holds this many bytes, at the next batch."
        },
    )
    warc_splice_bodies: bool = field(
        default=True,
        metadata={
            "doc": "The warc stage archives each body in the deflate blocks the fetcher made "
            "for crawl.fetched (zlib level 1) instead of compressing it again at level 6: on "
            "HTML half its CPU per page, for files about 25 % larger (`bench/warc_write.py`). "
            "false: every record compressed at level 6."
        },
    )
    warc_revisit_cache: int = field(
        default=100_000,
        metadata={
            "doc": "Payload digests the warc stage remembers (most recent first, saved at a "
            "clean stop and loaded at the next start, else read back from its newest files) "
            "to write a `revisit` record instead of a payload seen before (0: always the full "
            "response)."
        },
    )
    revisit_initial: float = field(
        default=86400.0,
        metadata={
            "doc": "Seconds from a page's first visit to its first scheduled revisit "
            "(`next_visit`; kept within REVISIT_MIN and REVISIT_MAX)."
        },
    )
    revisit_min: float = field(
        default=3600.0,
        metadata={"doc": "Shortest revisit interval, s: a page that keeps changing stays here."},
    )
    revisit_max: float = field(
        default=30 * 86400.0,
        metadata={"doc": "Longest revisit interval, s: a page that never changes ends here."},
    )
    revisit_shrink: float = field(
        default=0.5,
        metadata={"doc": "A revisit that found the page changed multiplies its interval by this."},
    )
    revisit_grow: float = field(
        default=1.5,
        metadata={
            "doc": "A revisit that found the page unchanged (a 304, or the stored digest) "
            "multiplies its interval by this."
        },
    )
    schedule_enabled: int = field(
        default=0,
        metadata={
            "doc": "1: the scheduler stage queues each stored page's revisit when its "
            "next_visit comes (continuous crawling); 0: it runs idle. "
            "`streamcrawl schedule` queues them either way."
        },
    )
    schedule_batch: int = field(
        default=1000,
        metadata={"doc": "Due pages the scheduler stage reads and queues at a time."},
    )
    schedule_per_host: int = field(
        default=100,
        metadata={
            "doc": "Due pages of one host the scheduler queues per batch (the rest wait "
            "for the next batch; per-host politeness applies in the fetcher as always)."
        },
    )
    schedule_lease: float = field(
        default=3600.0,
        metadata={
            "doc": "Seconds a page the scheduler queued waits for its visit: one not visited "
            "by then (its revisit lost) is due again, for a new due time."
        },
    )
    schedule_poll: float = field(
        default=5.0,
        metadata={"doc": "Seconds the scheduler stage waits when no page is due."},
    )
    stats_port: int = field(
        default=6066,
        metadata={
            "doc": "Port of the stats stage's HTTP API (/crawls, /crawls/ID, "
            "/crawls/ID/hosts, /metrics)."
        },
    )
    stats_url: str = field(
        default="",
        metadata={
            "doc": "Where `streamcrawl status` reads the stats stage. "
            "Empty: http://127.0.0.1:STATS_PORT."
        },
    )
    stats_replication: int = field(
        default=1,
        metadata={"doc": "Replication factor of the stats stage's changelog topics."},
    )
    stats_linger_ms: int = field(
        default=50,
        metadata={
            "doc": "Milliseconds the stats stage's producer holds table writes to send them "
            "together (every write is a changelog record; 0: each goes out at once)."
        },
    )

    @property
    def mongo_status_collection(self) -> str:
        """The collection of status documents beside the pages' (see the sink)."""
        return f"{self.mongo_collection}_status"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = source.get(PREFIX + spec.name.upper())
            if raw is None:
                continue
            values[spec.name] = _coerce(spec.name, raw, spec.type)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for network in self.allow_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"{PREFIX}ALLOW_NETWORKS: {network!r} is not a network") from exc
        if not 0 < self.bloom_error_rate < 1:
            raise ValueError(f"{PREFIX}BLOOM_ERROR_RATE must be between 0 and 1")
        if self.fetch_concurrency < 1 or self.fetch_per_host_concurrency < 1:
            raise ValueError("fetch concurrency settings must be >= 1")
        if self.max_body_bytes > MAX_BODY_CAP:
            raise ValueError(
                f"{PREFIX}MAX_BODY_BYTES={self.max_body_bytes} does not fit in a crawl.fetched "
                f"message (at most {MAX_BODY_CAP}: the topic limit after base64 and headers)"
            )
        if not 1 <= self.retry_max_attempts <= MAX_ATTEMPTS:
            # A retry's attempt count travels in crawl.retry, whose type caps it.
            raise ValueError(f"{PREFIX}RETRY_MAX_ATTEMPTS must be between 1 and {MAX_ATTEMPTS}")
        if self.poison_attempts < 1:
            raise ValueError(f"{PREFIX}POISON_ATTEMPTS must be >= 1")
        if self.pause_recheck <= 0:
            raise ValueError(f"{PREFIX}PAUSE_RECHECK must be > 0")
        if self.shutdown_grace <= 0:
            raise ValueError(f"{PREFIX}SHUTDOWN_GRACE must be > 0")
        if not 0 < self.revisit_min <= self.revisit_max:
            raise ValueError(f"{PREFIX}REVISIT_MIN must be > 0 and <= {PREFIX}REVISIT_MAX")
        if not 0 < self.revisit_shrink <= 1 <= self.revisit_grow:
            raise ValueError(f"{PREFIX}REVISIT_SHRINK must be in (0, 1], REVISIT_GROW >= 1")
        if (
            min(self.schedule_batch, self.schedule_per_host) < 1
            or min(self.schedule_poll, self.schedule_lease) <= 0
        ):
            raise ValueError(f"{PREFIX}SCHEDULE_BATCH, _PER_HOST, _POLL and _LEASE must be > 0")
        self.host_delay_map()
        self._check_kafka_security()

    def _check_kafka_security(self) -> None:
        protocol, mechanism = self.kafka_security_protocol, self.kafka_sasl_mechanism
        if protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise ValueError(
                f"{PREFIX}KAFKA_SECURITY_PROTOCOL={protocol!r}: expected one of "
                + ", ".join(KAFKA_SECURITY_PROTOCOLS)
            )
        if not protocol.startswith("SASL_"):
            return
        if mechanism not in KAFKA_SASL_MECHANISMS:
            raise ValueError(
                f"{PREFIX}KAFKA_SASL_MECHANISM={mechanism!r}: expected one of "
                + ", ".join(KAFKA_SASL_MECHANISMS)
            )

    def host_delay_map(self) -> dict[str, float]:
        """``HOST_DELAYS`` parsed: host[:port] -> minimum delay in seconds."""
        delays: dict[str, float] = {}
        for item in self.host_delays:
            host, _, seconds = item.rpartition("=")
            try:
                delays[host.strip().lower()] = float(seconds)
            except ValueError as exc:
                raise ValueError(f"{PREFIX}HOST_DELAYS: {item!r} is not host=seconds") from exc
            if not host.strip():
                raise ValueError(f"{PREFIX}HOST_DELAYS: {item!r} is not host=seconds")
        return delays

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables, for child processes."""
        env = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            text = ",".join(value) if isinstance(value, tuple) else str(value)
            env[PREFIX + spec.name.upper()] = text
        return env


def _coerce(name: str, raw: str, kind: Any) -> Any:
    kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    try:
        if kind_name.startswith("tuple"):
            return _split(raw)
        if kind_name == "int":
            return int(raw)
        if kind_name == "float":
            return float(raw)
        if kind_name == "bool":
            return _boolean(raw)
    except ValueError as exc:
        raise ValueError(f"{PREFIX}{name.upper()}={raw!r}: expected {kind_name}") from exc
    return raw


def _boolean(raw: str) -> bool:
    word = raw.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def settings_doc() -> str:
    """A Markdown table of every setting, its default and meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    defaults = Settings()
    for spec in fields(Settings):
        value = getattr(defaults, spec.name)
        shown = ",".join(value) if isinstance(value, tuple) else str(value)
        rows.append(f"| `{PREFIX}{spec.name.upper()}` | `{shown}` | {spec.metadata['doc']} |")
    return "\n".join(rows)
