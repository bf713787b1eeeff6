"""The broker core: topics -> partitions -> PartitionLog, produce / fetch / subscribe semantics.

No gRPC here: methods take and return plain values and raise the storage error hierarchy
plus the few errors below, so the core is tested without a socket and the servicer only
translates. Threads: any number of callers at once. Appends to one partition are serialised
by its log; topic changes by the broker's lock. Readers waiting for data (long-poll fetch,
subscribe) register an event on each partition they watch and are woken by the append that
makes data available -- no sleep-polling.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from storage import (
    AppendResult,
    BatchHeader,
    Catalog,
    LimitExceededError,
    LogClosedError,
    LogConfig,
    NewRecord,
    OffsetOutOfRangeError,
    PartitionLog,
    StorageError,
    UnknownTopicError,
    encode_batch,
)
from storage import (
    TopicMeta as _TopicMeta,
)

from ._partitioner import partition_for_key
from ._producer_ids import NAME_EXPIRY_MS_DEFAULT, ProducerIds

log = logging.getLogger("riverlog.broker")

KiB = 1024
MiB = 1024 * KiB
# Fetch and subscribe budgets: what one response may carry, and what a request may ask for.
FETCH_BYTES_DEFAULT = 1 * MiB
FETCH_BYTES_MAX = 64 * MiB
# The longest a long-poll fetch may wait; a client wanting longer asks again.
FETCH_WAIT_MS_MAX = 30_000
# Partitions named in one fetch, produce or list-offsets request.
REQUEST_PARTITIONS_MAX = 4096
# Records in one convenience-path produce entry (the fast path is bounded by batch bytes).
RECORDS_PER_REQUEST_MAX = 100_000
# Concurrent Subscribe streams by default; each holds a server thread and at most one
# response in flight. The server keeps workers - subscribers_max threads for other calls.
SUBSCRIBERS_MAX = 48
# How often a waiting subscriber wakes to check that its caller is still there.
SUBSCRIBE_IDLE_CHECK_S = 0.5


class BrokerError(StorageError):
    """Errors the broker adds to the storage hierarchy."""


class UnknownPartitionError(UnknownTopicError):
    def __init__(self, topic: str, partition: int, partitions: int) -> None:
        super().__init__(
            f"topic {topic!r} has no partition {partition}; it has partitions 0..{partitions - 1}"
        )


class ShuttingDownError(BrokerError):
    """The broker is stopping and takes no new work."""


class InvalidRequestError(BrokerError):
    """A request that is well-formed bytes but asks for something meaningless."""


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    data_dir: Path = Path("riverlog-data")
    # Defaults for every partition log; topics override them one by one.
    log: LogConfig = field(default_factory=LogConfig)
    # Create a topic on first produce to it (off: a typo should be an error, not a topic).
    auto_create_topics: bool = False
    auto_create_partitions: int = 1
    # How often the background worker applies retention (and fsync `interval`).
    retention_check_interval_ms: int = 60_000
    subscribers_max: int = SUBSCRIBERS_MAX
    # Named producers unused this long are forgotten (see _producer_ids.py).
    producer_name_expiry_ms: int = NAME_EXPIRY_MS_DEFAULT


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# ------------------------------------------------------------------ results
@dataclass(frozen=True, slots=True)
class PartitionInfo:
    partition: int
    log_start_offset: int
    log_end_offset: int
    size_bytes: int
    segment_count: int


@dataclass(frozen=True, slots=True)
class TopicInfo:
    name: str
    topic_id: str
    partitions: list[PartitionInfo]
    config: dict[str, str]


@dataclass(frozen=True, slots=True)
class ProduceResult:
    topic: str
    partition: int
    result: AppendResult | None = None
    error: StorageError | None = None


@dataclass(frozen=True, slots=True)
class FetchQuery:
    topic: str
    partition: int
    offset: int
    max_bytes: int = 0


@dataclass(frozen=True, slots=True)
class FetchResult:
    topic: str
    partition: int
    data: bytes | memoryview = b""
    next_offset: int = -1
    high_watermark: int = -1
    log_start_offset: int = -1
    error: StorageError | None = None


@dataclass(frozen=True, slots=True)
class OffsetQuery:
    topic: str
    partition: int
    spec: Literal["earliest", "latest", "timestamp"]
    timestamp_ms: int = 0


@dataclass(frozen=True, slots=True)
class OffsetResult:
    topic: str
    partition: int
    offset: int | None = None
    log_start_offset: int = -1
    log_end_offset: int = -1
    error: StorageError | None = None


StartSpec = tuple[Literal["earliest", "latest", "offset", "timestamp"], int]


@dataclass(frozen=True, slots=True)
class SubscribeChunk:
    topic: str
    partition: int
    data: bytes | memoryview
    next_offset: int
    high_watermark: int
    log_start_offset: int


# ------------------------------------------------------------------ partitions
class _Partition:
    """One partition's log plus the events of readers waiting for it to grow."""

    def __init__(self, topic: str, index: int, plog: PartitionLog) -> None:
        self.topic = topic
        self.index = index
        self.log = plog
        self._waiters: set[threading.Event] = set()
        self._waiters_lock = threading.Lock()

    def watch(self, event: threading.Event) -> None:
        with self._waiters_lock:
            self._waiters.add(event)

    def unwatch(self, event: threading.Event) -> None:
        with self._waiters_lock:
            self._waiters.discard(event)

    def notify(self) -> None:
        with self._waiters_lock:
            waiters, self._waiters = self._waiters, set()
        for event in waiters:
            event.set()


class _Topic:
    def __init__(self, meta: _TopicMeta, partitions: list[_Partition]) -> None:
        self.meta = meta
        self.partitions = partitions
        self.round_robin = itertools.count()


class Broker:
    def __init__(self, config: BrokerConfig, clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.config = config
        self._clock_ms = clock_ms
        self._lock = threading.RLock()
        self._catalog = Catalog.open(config.data_dir)
        self._producer_ids = ProducerIds(
            config.data_dir, clock_ms, name_expiry_ms=config.producer_name_expiry_ms
        )
        # Replaced whole (never mutated) under the lock, so readers need no lock.
        self._topics: dict[str, _Topic] = {}
        self._closing = False
        self._subscribers = 0
        self._subscribers_lock = threading.Lock()
        # Called with ("created" | "deleted" | "grown", topic) after a topic change.
        self._topic_listeners: list[Callable[[str, str], None]] = []
        try:
            for meta in self._catalog.list():
                self._topics[meta.name] = self._open_topic(meta, range(meta.partitions))
        except BaseException:
            self._close_logs(list(self._topics.values()))
            raise
        log.info("broker opened %s: %d topics", config.data_dir, len(self._topics))

    def _open_topic(self, meta: _TopicMeta, indexes: range, old: _Topic | None = None) -> _Topic:
        cfg = self._catalog.log_config(meta.name, self.config.log)
        partitions = list(old.partitions) if old else []
        for i in indexes:
            plog = PartitionLog.open(self._catalog.partition_dir(meta.name, i), cfg)
            partitions.append(_Partition(meta.name, i, plog))
        return _Topic(meta, partitions)

    # ------------------------------------------------------------------ admin
    def add_topic_listener(self, listener: Callable[[str, str], None]) -> None:
        self._topic_listeners.append(listener)

    def _topic_changed(self, event: str, name: str) -> None:
        for listener in self._topic_listeners:
            listener(event, name)

    def create_topic(
        self, name: str, partitions: int, config: Mapping[str, str] | None = None
    ) -> TopicInfo:
        with self._lock:
            self._check_running()
            meta = self._catalog.create_topic(name, partitions, dict(config or {}))
            try:
                topic = self._open_topic(meta, range(meta.partitions))
            except BaseException:
                self._catalog.delete_topic(name)
                raise
            self._topics = {**self._topics, name: topic}
            log.info("created topic %r with %d partitions", name, partitions)
            self._topic_changed("created", name)
            return self._describe(topic)

    def delete_topic(self, name: str) -> None:
        with self._lock:
            self._check_running()
            topic = self._topic(name)
            self._topics = {k: v for k, v in self._topics.items() if k != name}
            for p in topic.partitions:
                p.log.abandon()  # its files are about to go: no flush, no clean marker
            self._catalog.delete_topic(name)
            for p in topic.partitions:
                p.notify()  # waiting readers see the topic gone
            log.info("deleted topic %r", name)
            self._topic_changed("deleted", name)

    def add_partitions(self, name: str, total: int) -> TopicInfo:
        with self._lock:
            self._check_running()
            old = self._topic(name)
            meta = self._catalog.add_partitions(name, total)
            topic = self._open_topic(meta, range(len(old.partitions), meta.partitions), old)
            topic.round_robin = old.round_robin
            self._topics = {**self._topics, name: topic}
            self._topic_changed("grown", name)
            return self._describe(topic)

    def list_topics(self) -> list[tuple[str, int]]:
        return sorted((t.meta.name, len(t.partitions)) for t in self._topics.values())

    def describe_topic(self, name: str) -> TopicInfo:
        return self._describe(self._topic(name))

    def _describe(self, topic: _Topic) -> TopicInfo:
        infos = [
            PartitionInfo(
                p.index,
                p.log.log_start_offset,
                p.log.log_end_offset,
                p.log.size_bytes,
                p.log.segment_count,
            )
            for p in topic.partitions
        ]
        config = {k: "none" if v is None else str(v) for k, v in topic.meta.config.items()}
        return TopicInfo(topic.meta.name, topic.meta.topic_id, infos, config)

    # ------------------------------------------------------------------ lookup
    def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            raise UnknownTopicError(f"unknown topic {name!r}")
        return topic

    def _topic_for_produce(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is not None:
            return topic
        if not self.config.auto_create_topics:
            raise UnknownTopicError(
                f"unknown topic {name!r} (create it first; topic auto-creation is off)"
            )
        with self._lock:
            if name not in self._topics:
                self.create_topic(name, self.config.auto_create_partitions)
            return self._topics[name]

    def _partition(self, topic: str, index: int) -> _Partition:
        t = self._topic(topic)
        if not 0 <= index < len(t.partitions):
            raise UnknownPartitionError(topic, index, len(t.partitions))
        return t.partitions[index]

    def partition_count(self, topic: str) -> int:
        return len(self._topic(topic).partitions)

    # ------------------------------------------------------------------ produce
    def produce(
        self,
        topic: str,
        partition: int,
        payload: bytes,
        *,
        durable: bool = False,
        headers: list[BatchHeader] | None = None,
    ) -> AppendResult:
        """Append client-encoded batches. `durable`: fsync before returning (acks ALL).
        `headers`: what `check_produce` returned for this payload (it is not checked again).

        Idempotent batches (producer id >= 0) must carry an id this broker handed out, at its
        current epoch; a resent one is not appended again (`AppendResult.duplicate`).
        """
        self._check_running()
        t = self._topic_for_produce(topic)
        if not 0 <= partition < len(t.partitions):
            raise UnknownPartitionError(topic, partition, len(t.partitions))
        p = t.partitions[partition]
        now_ms = self._clock_ms()
        if headers is None:
            headers = p.log.check(payload)
        for header in headers:  # per batch
            if header.producer_id >= 0:
                self._producer_ids.check(header.producer_id, header.producer_epoch, now_ms)
        result = p.log.append(payload, now_ms, headers=headers)
        if durable:
            p.log.flush(now_ms)
        if not result.duplicate:
            p.notify()
        return result

    def init_producer(self, name: str = "") -> tuple[int, int]:
        """A producer id and epoch for idempotent produce (see _producer_ids.py)."""
        self._check_running()
        return self._producer_ids.init(name)

    def check_produce(
        self, topic: str, partition: int | None, payload: bytes = b""
    ) -> list[BatchHeader] | None:
        """Raise what `produce` would raise for this input (unknown topic or partition, corrupt
        or oversized batch), appending nothing: a request of several entries is validated
        whole before any entry is appended. No partition: only the topic is checked.
        Returns the payload's batch headers, for `produce(..., headers=...)`, so the batches
        are not checked (CRC32C) a second time."""
        self._check_running()
        t = self._topic_for_produce(topic)
        if partition is None:
            return None
        if not 0 <= partition < len(t.partitions):
            raise UnknownPartitionError(topic, partition, len(t.partitions))
        if payload:
            return t.partitions[partition].log.check(payload)
        return None

    def route_records(
        self, topic: str, partition: int | None, records: Sequence[NewRecord]
    ) -> dict[int, list[NewRecord]]:
        """Which partition each record goes to: the given one, else murmur2 of the key, else
        round-robin (one partition per request for the keyless records, as Kafka's sticky
        partitioner does per batch)."""
        if not records:
            raise InvalidRequestError("no records to produce")
        if len(records) > RECORDS_PER_REQUEST_MAX:
            raise LimitExceededError(
                f"{len(records)} records in one produce entry; the limit is "
                f"{RECORDS_PER_REQUEST_MAX}"
            )
        # Kafka's rule: a record timestamp is ms since the epoch, never negative. It also keeps
        # every timestamp delta of the encoded batch within the varlong's 64 bits.
        earliest_ms = min(record.timestamp_ms for record in records)
        if earliest_ms < 0:
            raise InvalidRequestError(
                f"record timestamp {earliest_ms} is negative: timestamps are ms since the Unix "
                "epoch (leave it out to get the broker's time)"
            )
        t = self._topic_for_produce(topic)
        count = len(t.partitions)
        if partition is not None:
            if not 0 <= partition < count:
                raise UnknownPartitionError(topic, partition, count)
            return {partition: list(records)}
        routed: dict[int, list[NewRecord]] = {}
        sticky = next(t.round_robin) % count
        for record in records:
            index = sticky if record.key is None else partition_for_key(record.key, count)
            routed.setdefault(index, []).append(record)
        return routed

    def produce_records(
        self,
        topic: str,
        partition: int | None,
        records: Sequence[NewRecord],
        *,
        durable: bool = False,
    ) -> list[ProduceResult]:
        """The convenience path: route records to partitions, encode one batch per partition
        (here, once, at the edge), append. Routing errors raise; append errors are per
        partition."""
        routed = self.route_records(topic, partition, records)
        out: list[ProduceResult] = []
        for index, chunk in routed.items():
            try:
                result = self.produce(topic, index, encode_batch(chunk), durable=durable)
                out.append(ProduceResult(topic, index, result))
            except StorageError as e:
                out.append(ProduceResult(topic, index, error=e))
        return out

    def now_ms(self) -> int:
        return self._clock_ms()

    # ------------------------------------------------------------------ fetch
    def read(
        self, query: FetchQuery, max_bytes: int, stop_offset: int | None = None
    ) -> FetchResult:
        """One partition's batches from `query.offset`, as a fetch or subscribe reads them."""
        try:
            p = self._partition(query.topic, query.partition)
            data, next_offset = p.log.read_batches(query.offset, max_bytes, stop_offset)
            return FetchResult(
                query.topic,
                query.partition,
                data,
                next_offset,
                p.log.log_end_offset,
                p.log.log_start_offset,
            )
        except StorageError as e:
            return FetchResult(query.topic, query.partition, error=e)

    def fetch(
        self,
        queries: Sequence[FetchQuery],
        *,
        max_wait_ms: int = 0,
        min_bytes: int = 1,
        max_bytes: int = FETCH_BYTES_DEFAULT,
        is_active: Callable[[], bool] = lambda: True,
    ) -> list[FetchResult]:
        """Read each partition within the budgets; wait up to `max_wait_ms` (woken by appends)
        until at least `min_bytes` are available in total."""
        _check_fetch_bounds(len(queries), max_wait_ms, max_bytes)
        budget = max_bytes or FETCH_BYTES_DEFAULT
        deadline = time.monotonic() + max_wait_ms / 1000
        while True:
            event = threading.Event()
            watched = self._watch(queries, event)
            try:
                results = self._read_all(queries, budget)
                total = sum(len(r.data) for r in results)
                errors = any(r.error is not None for r in results)
                remaining = deadline - time.monotonic()
                if total >= max(1, min_bytes) or errors or remaining <= 0 or self._closing:
                    return results
                if not is_active():
                    return results
                event.wait(min(remaining, SUBSCRIBE_IDLE_CHECK_S))
            finally:
                for p in watched:
                    p.unwatch(event)

    def _read_all(self, queries: Sequence[FetchQuery], budget: int) -> list[FetchResult]:
        results: list[FetchResult] = []
        remaining = budget
        for q in queries:
            if remaining <= 0:
                results.append(self._empty(q))
                continue
            want = min(q.max_bytes or budget, remaining)
            result = self.read(q, want)
            remaining -= len(result.data)
            results.append(result)
        return results

    def _empty(self, q: FetchQuery) -> FetchResult:
        try:
            p = self._partition(q.topic, q.partition)
        except StorageError as e:
            return FetchResult(q.topic, q.partition, error=e)
        return FetchResult(
            q.topic, q.partition, b"", q.offset, p.log.log_end_offset, p.log.log_start_offset
        )

    def _watch(self, queries: Sequence[FetchQuery], event: threading.Event) -> list[_Partition]:
        watched: list[_Partition] = []
        for q in queries:
            try:
                p = self._partition(q.topic, q.partition)
            except StorageError:
                continue
            p.watch(event)
            watched.append(p)
        return watched

    def watch(self, tps: Iterable[tuple[str, int]], event: threading.Event) -> Callable[[], None]:
        """Set `event` at the next append to any of these partitions (unknown ones are
        skipped); returns the function that stops watching. For readers outside `fetch`
        (share groups) that wait for data."""
        watched = self._watch([FetchQuery(t, p, 0) for t, p in tps], event)

        def stop() -> None:
            for p in watched:
                p.unwatch(event)

        return stop

    def log_offsets(self, topic: str, partition: int) -> tuple[int, int]:
        """(log start offset, log end offset) of one partition; UnknownTopicError."""
        p = self._partition(topic, partition)
        return p.log.log_start_offset, p.log.log_end_offset

    # ------------------------------------------------------------------ offsets
    def list_offsets(self, queries: Sequence[OffsetQuery]) -> list[OffsetResult]:
        if len(queries) > REQUEST_PARTITIONS_MAX:
            raise LimitExceededError(
                f"{len(queries)} partitions in one request; the limit is {REQUEST_PARTITIONS_MAX}"
            )
        out: list[OffsetResult] = []
        for q in queries:
            try:
                p = self._partition(q.topic, q.partition)
                start, end = p.log.log_start_offset, p.log.log_end_offset
                if q.spec == "earliest":
                    offset: int | None = start
                elif q.spec == "latest":
                    offset = end
                else:
                    offset = p.log.offset_for_timestamp(q.timestamp_ms)
                out.append(OffsetResult(q.topic, q.partition, offset, start, end))
            except StorageError as e:
                out.append(OffsetResult(q.topic, q.partition, error=e))
        return out

    # ------------------------------------------------------------------ subscribe
    def subscribe(
        self,
        topic: str,
        partitions: Sequence[int],
        start: StartSpec,
        *,
        stop_offset: int | None = None,
        stop_at_end: bool = False,
        max_bytes: int = FETCH_BYTES_DEFAULT,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Iterator[SubscribeChunk]:
        """Chunks of batches from each partition as the log grows, round-robin over the
        partitions that have data. Reads ahead by one chunk: the next read happens only
        when the caller asks for the next item. Ends when every partition reached its stop,
        when `is_active()` turns false, or when the broker shuts down."""
        t = self._topic(topic)
        indexes = list(partitions) or list(range(len(t.partitions)))
        if len(set(indexes)) != len(indexes):
            raise InvalidRequestError(f"partition listed twice in {indexes}")
        parts = [self._partition(topic, i) for i in indexes]
        budget = max_bytes or FETCH_BYTES_DEFAULT
        _check_fetch_bounds(len(parts), 0, budget)
        positions = [self._start_offset(p, start) for p in parts]
        stops: list[int | None] = [
            p.log.log_end_offset if stop_at_end else stop_offset for p in parts
        ]
        self._enter_subscriber()
        try:
            yield from self._follow(topic, parts, positions, stops, budget, is_active)
        finally:
            with self._subscribers_lock:
                self._subscribers -= 1

    def _enter_subscriber(self) -> None:
        with self._subscribers_lock:
            limit = self.config.subscribers_max
            if self._subscribers >= limit:
                raise LimitExceededError(
                    f"{self._subscribers} subscribe streams are open; the limit is {limit}"
                )
            self._subscribers += 1

    def _follow(
        self,
        topic: str,
        parts: list[_Partition],
        positions: list[int],
        stops: list[int | None],
        budget: int,
        is_active: Callable[[], bool],
    ) -> Iterator[SubscribeChunk]:
        while not self._closing and is_active():
            live = [i for i, s in enumerate(stops) if s is None or positions[i] < s]
            if not live:
                return
            event = threading.Event()
            for i in live:
                parts[i].watch(event)
            try:
                sent = False
                for i in live:
                    p = parts[i]
                    if positions[i] >= p.log.log_end_offset:
                        continue
                    try:
                        data, nxt = p.log.read_batches(positions[i], budget, stops[i])
                    except LogClosedError:
                        if self._topics.get(topic) is None or self._closing:
                            return
                        raise
                    if not data:
                        continue
                    positions[i] = nxt
                    sent = True
                    yield SubscribeChunk(
                        topic,
                        p.index,
                        data,
                        nxt,
                        p.log.log_end_offset,
                        p.log.log_start_offset,
                    )
                if not sent:
                    if self._topics.get(topic) is None:
                        raise UnknownTopicError(f"topic {topic!r} was deleted")
                    event.wait(SUBSCRIBE_IDLE_CHECK_S)
            finally:
                for i in live:
                    parts[i].unwatch(event)

    def _start_offset(self, p: _Partition, start: StartSpec) -> int:
        kind, value = start
        first, end = p.log.log_start_offset, p.log.log_end_offset
        if kind == "earliest":
            return first
        if kind == "latest":
            return end
        if kind == "offset":
            if not first <= value <= end:
                raise OffsetOutOfRangeError(value, first, end)
            return value
        found = p.log.offset_for_timestamp(value)
        return end if found is None else found

    # ------------------------------------------------------------------ background work
    def tick(self) -> None:
        """Periodic work: retention, fsync for logs with the `interval` policy, and expiry
        of idle producer ids."""
        self._each_log(
            lambda plog, now_ms: (
                plog.apply_retention(now_ms),
                plog.expire_producers(now_ms),
                plog.flush_if_due(now_ms),
            )
        )
        self._producer_ids.expire(self._clock_ms())

    def flush_due(self) -> None:
        """fsync the logs whose `interval` has passed."""
        self._each_log(lambda plog, now_ms: plog.flush_if_due(now_ms))

    def _each_log(self, work: Callable[[PartitionLog, int], object]) -> None:
        now_ms = self._clock_ms()
        for topic in list(self._topics.values()):
            for p in topic.partitions:
                try:
                    work(p.log, now_ms)
                except LogClosedError:
                    continue  # its topic was deleted meanwhile

    # ------------------------------------------------------------------ lifecycle
    def begin_shutdown(self) -> None:
        """Refuse new work and wake every waiting reader so it can return."""
        self._closing = True
        for topic in list(self._topics.values()):
            for p in topic.partitions:
                p.notify()

    def close(self) -> None:
        """Flush and close every log cleanly (clean-shutdown markers: no recovery scan next)."""
        with self._lock:
            self.begin_shutdown()
            topics, self._topics = list(self._topics.values()), {}
            self._close_logs(topics)
            log.info("broker closed cleanly")

    @staticmethod
    def _close_logs(topics: list[_Topic]) -> None:
        for topic in topics:
            for p in topic.partitions:
                p.log.close()

    def _check_running(self) -> None:
        if self._closing:
            raise ShuttingDownError("the broker is shutting down")


def _check_fetch_bounds(partitions: int, max_wait_ms: int, max_bytes: int) -> None:
    if partitions > REQUEST_PARTITIONS_MAX:
        raise LimitExceededError(
            f"{partitions} partitions in one request; the limit is {REQUEST_PARTITIONS_MAX}"
        )
    if not 0 <= max_wait_ms <= FETCH_WAIT_MS_MAX:
        raise InvalidRequestError(
            f"max_wait_ms must be in [0, {FETCH_WAIT_MS_MAX}], got {max_wait_ms}"
        )
    if not 0 <= max_bytes <= FETCH_BYTES_MAX:
        raise LimitExceededError(f"max_bytes must be in [0, {FETCH_BYTES_MAX}], got {max_bytes}")
