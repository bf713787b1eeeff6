"""The broker core without sockets: topics, produce routing, long-poll fetch, offsets, subscribe,
retention and restart, with a fake clock (the fetch deadline is the only wall-clock time)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storage import (
    CorruptBatchError,
    InvalidConfigError,
    InvalidNameError,
    LimitExceededError,
    LogConfig,
    NewRecord,
    OffsetOutOfRangeError,
    Record,
    TopicExistsError,
    UnknownTopicError,
    decode_records,
    encode_batch,
)
from stream import _broker
from stream._broker import (
    Broker,
    BrokerConfig,
    FetchQuery,
    InvalidRequestError,
    OffsetQuery,
    ShuttingDownError,
    SubscribeChunk,
    UnknownPartitionError,
)
from stream._partitioner import partition_for_key

T0_MS = 1_700_000_000_000
# Upper bound on any wait in this file: a broken wake-up fails the test instead of hanging it.
WAIT_S = 5.0


class FakeClock:
    def __init__(self, now_ms: int = T0_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_broker(tmp_path: Path, clock: FakeClock) -> Iterator[Callable[..., Broker]]:
    """Brokers on `tmp_path / "data"`, closed at the end of the test."""
    opened: list[Broker] = []

    def make(**kwargs: object) -> Broker:
        config = BrokerConfig(data_dir=tmp_path / "data", **kwargs)  # type: ignore[arg-type]
        broker = Broker(config, clock_ms=clock)
        opened.append(broker)
        return broker

    yield make
    for b in opened:
        b.close()


@pytest.fixture
def broker(make_broker: Callable[..., Broker]) -> Broker:
    return make_broker()


def batch(*values: bytes, ts: int = T0_MS, key: bytes | None = None) -> bytes:
    return encode_batch([NewRecord(key, v, ts + i) for i, v in enumerate(values)])


def records_of(data: bytes | memoryview, from_offset: int = 0) -> list[Record]:
    """Decoded records at or after `from_offset` (a read starts with the batch holding it)."""
    return [r for r in decode_records(data) if r.offset >= from_offset]


def read_all(broker: Broker, topic: str, partition: int) -> list[Record]:
    out: list[Record] = []
    offset = 0
    end = broker.describe_topic(topic).partitions[partition].log_end_offset
    for _ in range(10_000):
        if offset >= end:
            break
        [result] = broker.fetch([FetchQuery(topic, partition, offset)])
        assert result.error is None
        out.extend(records_of(result.data, offset))
        offset = result.next_offset
    return out


# ---------------------------------------------------------------------------- admin
def test_create_list_describe_delete(broker: Broker) -> None:
    info = broker.create_topic("orders", 3, {"segment_bytes": "2048"})
    assert info.name == "orders"
    assert len(info.topic_id) == 32
    assert [p.partition for p in info.partitions] == [0, 1, 2]
    for p in info.partitions:
        assert (p.log_start_offset, p.log_end_offset, p.size_bytes, p.segment_count) == (
            0,
            0,
            0,
            1,
        )
    assert info.config == {"segment_bytes": "2048"}
    broker.create_topic("audit", 1)
    assert broker.list_topics() == [("audit", 1), ("orders", 3)]
    assert broker.describe_topic("orders") == info

    broker.delete_topic("orders")
    assert broker.list_topics() == [("audit", 1)]
    with pytest.raises(UnknownTopicError, match="orders"):
        broker.describe_topic("orders")
    with pytest.raises(UnknownTopicError):
        broker.delete_topic("orders")
    # The name is free again, with fresh, empty partitions.
    again = broker.create_topic("orders", 1)
    assert again.topic_id != info.topic_id
    assert again.partitions[0].log_end_offset == 0


def test_create_refuses_bad_input(broker: Broker) -> None:
    broker.create_topic("t", 1)
    with pytest.raises(TopicExistsError):
        broker.create_topic("t", 1)
    with pytest.raises(InvalidNameError):
        broker.create_topic("a/b", 1)
    with pytest.raises(InvalidNameError):
        broker.create_topic("..", 1)
    with pytest.raises(InvalidConfigError):
        broker.create_topic("zero", 0)
    with pytest.raises(LimitExceededError):
        broker.create_topic("huge", 1025)
    with pytest.raises(InvalidConfigError, match="no_such_setting"):
        broker.create_topic("cfg", 1, {"no_such_setting": "1"})
    with pytest.raises(InvalidConfigError, match="segment_bytes"):
        broker.create_topic("cfg", 1, {"segment_bytes": "lots"})
    assert broker.list_topics() == [("t", 1)]


def test_add_partitions_grows_and_never_shrinks(broker: Broker) -> None:
    broker.create_topic("t", 2)
    broker.produce("t", 1, batch(b"kept"))
    info = broker.add_partitions("t", 4)
    assert [p.partition for p in info.partitions] == [0, 1, 2, 3]
    assert info.partitions[1].log_end_offset == 1
    assert broker.produce("t", 3, batch(b"new")).base_offset == 0
    for total in (4, 3, 1):
        with pytest.raises(InvalidConfigError, match="only grow"):
            broker.add_partitions("t", total)
    with pytest.raises(UnknownTopicError):
        broker.add_partitions("nope", 5)
    assert broker.partition_count("t") == 4
    assert [r.value for r in read_all(broker, "t", 1)] == [b"kept"]


# ---------------------------------------------------------------------------- produce
def test_produce_fast_path_assigns_contiguous_offsets(broker: Broker, clock: FakeClock) -> None:
    broker.create_topic("t", 1)
    first = broker.produce("t", 0, batch(b"a", b"b", b"c"))
    assert (first.base_offset, first.last_offset, first.log_append_time_ms) == (0, 2, T0_MS)
    clock.advance(5)
    second = broker.produce("t", 0, batch(b"d", b"e"))
    assert (second.base_offset, second.last_offset, second.log_append_time_ms) == (
        3,
        4,
        T0_MS + 5,
    )
    # Several batches back to back in one payload: one append, offsets run on.
    third = broker.produce("t", 0, batch(b"f") + batch(b"g", b"h"))
    assert (third.base_offset, third.last_offset) == (5, 7)
    got = read_all(broker, "t", 0)
    assert [r.offset for r in got] == list(range(8))
    assert [r.value for r in got] == [b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"]


def test_produce_records_routes_keys_with_murmur2(broker: Broker) -> None:
    broker.create_topic("t", 4)
    keys = [f"key-{i}".encode() for i in range(40)]
    results = broker.produce_records("t", None, [NewRecord(k, k, T0_MS) for k in keys])
    assert all(r.error is None for r in results)
    assert sum(r.result.last_offset - r.result.base_offset + 1 for r in results if r.result) == 40
    for p in range(4):
        stored = [r.key for r in read_all(broker, "t", p)]
        assert stored == [k for k in keys if partition_for_key(k, 4) == p]


def test_produce_records_keyless_rotates_one_partition_per_call(broker: Broker) -> None:
    broker.create_topic("t", 3)
    chosen: list[int] = []
    for call in range(6):
        recs = [NewRecord(None, f"{call}-{i}".encode(), T0_MS) for i in range(5)]
        [result] = broker.produce_records("t", None, recs)
        assert result.result is not None
        assert result.result.last_offset - result.result.base_offset == 4
        chosen.append(result.partition)
    assert chosen == [(chosen[0] + i) % 3 for i in range(6)]
    # Keyed records still follow their key; the keyless ones of the call share one partition.
    mixed = [NewRecord(None, b"x", T0_MS), NewRecord(b"k", b"y", T0_MS)]
    mixed += [NewRecord(None, b"z", T0_MS)]
    results = {r.partition: r for r in broker.produce_records("t", None, mixed)}
    sticky = (chosen[0] + 6) % 3
    keyed = partition_for_key(b"k", 3)
    assert set(results) == {sticky, keyed}
    if sticky != keyed:
        res = results[sticky].result
        assert res is not None
        assert res.last_offset - res.base_offset == 1


def test_produce_records_with_explicit_partition(broker: Broker) -> None:
    broker.create_topic("t", 2)
    recs = [NewRecord(b"any-key", b"v", T0_MS), NewRecord(None, b"w", T0_MS)]
    [result] = broker.produce_records("t", 1, recs)
    assert result.partition == 1
    assert [r.value for r in read_all(broker, "t", 1)] == [b"v", b"w"]
    with pytest.raises(UnknownPartitionError):
        broker.produce_records("t", 2, recs)
    with pytest.raises(InvalidRequestError):
        broker.produce_records("t", None, [])
    with pytest.raises(InvalidRequestError, match="timestamp -5 is negative"):
        broker.produce_records(
            "t", 0, [NewRecord(None, b"v", 2**63 - 1), NewRecord(None, b"v", -5)]
        )


def test_unknown_topic_and_partition_with_auto_create_off(broker: Broker) -> None:
    with pytest.raises(UnknownTopicError, match="auto-creation is off") as exc:
        broker.produce("ghost", 0, batch(b"x"))
    assert not isinstance(exc.value, UnknownPartitionError)
    with pytest.raises(UnknownTopicError):
        broker.produce_records("ghost", None, [NewRecord(None, b"x", T0_MS)])
    broker.create_topic("t", 2)
    for p in (2, -1):
        with pytest.raises(UnknownPartitionError, match=r"partitions 0\.\.1"):
            broker.produce("t", p, batch(b"x"))
    [fetched] = broker.fetch([FetchQuery("t", 5, 0)])
    assert isinstance(fetched.error, UnknownPartitionError)
    [fetched] = broker.fetch([FetchQuery("ghost", 0, 0)])
    assert isinstance(fetched.error, UnknownTopicError)
    [offsets] = broker.list_offsets([OffsetQuery("ghost", 0, "latest")])
    assert isinstance(offsets.error, UnknownTopicError)
    with pytest.raises(UnknownTopicError):
        next(broker.subscribe("ghost", [], ("earliest", 0)))
    with pytest.raises(UnknownPartitionError):
        next(broker.subscribe("t", [3], ("earliest", 0)))
    assert broker.list_topics() == [("t", 2)]


def test_auto_create_on_produce(make_broker: Callable[..., Broker]) -> None:
    broker = make_broker(auto_create_topics=True, auto_create_partitions=3)
    assert broker.produce("fresh", 2, batch(b"x")).base_offset == 0
    assert broker.list_topics() == [("fresh", 3)]
    broker.produce_records("other", None, [NewRecord(None, b"y", T0_MS)])
    assert broker.list_topics() == [("fresh", 3), ("other", 3)]
    with pytest.raises(UnknownPartitionError):
        broker.produce("brand-new", 3, batch(b"x"))  # created, but has partitions 0..2
    # Reads never create topics.
    [fetched] = broker.fetch([FetchQuery("read-only", 0, 0)])
    assert isinstance(fetched.error, UnknownTopicError)
    assert "read-only" not in dict(broker.list_topics())


def test_check_produce_validates_without_appending(broker: Broker) -> None:
    broker.create_topic("t", 2, {"batch_bytes_max": "1024"})
    broker.check_produce("t", 1, batch(b"fine"))
    broker.check_produce("t", None)
    with pytest.raises(UnknownTopicError):
        broker.check_produce("nope", None)
    with pytest.raises(UnknownPartitionError):
        broker.check_produce("t", 2, batch(b"x"))
    with pytest.raises(CorruptBatchError, match="CRC32C"):
        broker.check_produce("t", 0, batch(b"x")[:-1] + b"!")
    with pytest.raises(LimitExceededError, match="batch_bytes_max 1024"):
        broker.check_produce("t", 0, batch(b"x" * 2000))
    assert [p.log_end_offset for p in broker.describe_topic("t").partitions] == [0, 0]


def test_produce_after_close_is_refused(broker: Broker) -> None:
    broker.create_topic("t", 1)
    broker.close()
    with pytest.raises(ShuttingDownError):
        broker.produce("t", 0, batch(b"x"))
    with pytest.raises(ShuttingDownError):
        broker.create_topic("u", 1)


# ---------------------------------------------------------------------------- fetch
def test_fetch_long_poll_wakes_on_append(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, reader_waiting: threading.Event
) -> None:
    # Without a wake-up the fetch would only notice the data at its deadline.
    monkeypatch.setattr(_broker, "SUBSCRIBE_IDLE_CHECK_S", 60.0)
    broker.create_topic("t", 1)
    appended_at: list[float] = []

    def append_when_watched() -> None:
        assert reader_waiting.wait(WAIT_S)
        appended_at.append(time.monotonic())
        broker.produce("t", 0, batch(b"hello"))

    appender = threading.Thread(target=append_when_watched)
    appender.start()
    started = time.monotonic()
    [result] = broker.fetch([FetchQuery("t", 0, 0)], max_wait_ms=2000)
    returned = time.monotonic()
    appender.join(WAIT_S)
    assert [r.value for r in records_of(result.data)] == [b"hello"]
    assert result.high_watermark == 1
    assert returned - appended_at[0] < 0.5
    assert returned - started < 1.5  # well before the 2 s deadline


def test_fetch_returns_empty_after_max_wait(broker: Broker) -> None:
    broker.create_topic("t", 1)
    started = time.monotonic()
    [result] = broker.fetch([FetchQuery("t", 0, 0)], max_wait_ms=100)
    elapsed = time.monotonic() - started
    assert result.error is None
    assert result.data == b""
    assert (result.next_offset, result.high_watermark, result.log_start_offset) == (0, 0, 0)
    assert 0.09 <= elapsed < 1.0


def test_fetch_min_bytes(broker: Broker) -> None:
    broker.create_topic("t", 1)
    broker.produce("t", 0, batch(b"x" * 100))
    # Enough data already: answered at once despite a long max_wait.
    started = time.monotonic()
    [result] = broker.fetch([FetchQuery("t", 0, 0)], max_wait_ms=5000, min_bytes=100)
    assert len(result.data) >= 100
    assert time.monotonic() - started < 1.0
    # Not enough: waits out max_wait, then answers with what there is.
    started = time.monotonic()
    [result] = broker.fetch([FetchQuery("t", 0, 0)], max_wait_ms=150, min_bytes=100_000)
    assert time.monotonic() - started >= 0.14
    assert [r.value for r in records_of(result.data)] == [b"x" * 100]


def test_fetch_min_bytes_counts_all_partitions(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, reader_waiting: threading.Event
) -> None:
    monkeypatch.setattr(_broker, "SUBSCRIBE_IDLE_CHECK_S", 60.0)
    broker.create_topic("t", 2)
    one = batch(b"y" * 200)
    broker.produce("t", 0, one)

    def append_second() -> None:
        assert reader_waiting.wait(WAIT_S)
        broker.produce("t", 1, one)

    appender = threading.Thread(target=append_second)
    appender.start()
    started = time.monotonic()
    results = broker.fetch(
        [FetchQuery("t", 0, 0), FetchQuery("t", 1, 0)],
        max_wait_ms=5000,
        min_bytes=2 * len(one),
    )
    appender.join(WAIT_S)
    assert [len(r.data) for r in results] == [len(one), len(one)]
    assert time.monotonic() - started < 2.0


def test_fetch_total_max_bytes_budget(broker: Broker) -> None:
    broker.create_topic("t", 3)
    one = batch(b"z" * 1000)
    size = len(one)
    for p in range(3):
        for _ in range(4):
            broker.produce("t", p, one)
    queries = [FetchQuery("t", p, 0) for p in range(3)]
    results = broker.fetch(queries, max_bytes=size * 5 // 2)
    # Partition 0 takes two whole batches, partition 1 the one batch that is always given,
    # and the budget is spent before partition 2.
    assert [len(r.data) for r in results] == [2 * size, size, 0]
    assert [r.next_offset for r in results] == [2, 1, 0]
    assert results[2].error is None
    assert results[2].high_watermark == 4
    # A per-partition budget narrows one partition only.
    per = [FetchQuery("t", 0, 0, max_bytes=size), FetchQuery("t", 1, 0)]
    results = broker.fetch(per, max_bytes=10 * size)
    assert [len(r.data) for r in results] == [size, 4 * size]
    # A budget smaller than one batch still returns that batch: a reader never stalls.
    [small] = broker.fetch([FetchQuery("t", 0, 1)], max_bytes=10)
    assert len(small.data) == size


def test_fetch_bounds_are_checked(broker: Broker) -> None:
    broker.create_topic("t", 1)
    q = [FetchQuery("t", 0, 0)]
    with pytest.raises(InvalidRequestError, match="max_wait_ms"):
        broker.fetch(q, max_wait_ms=-1)
    with pytest.raises(InvalidRequestError, match="max_wait_ms"):
        broker.fetch(q, max_wait_ms=30_001)
    with pytest.raises(LimitExceededError, match="max_bytes"):
        broker.fetch(q, max_bytes=64 * 1024 * 1024 + 1)
    with pytest.raises(LimitExceededError, match="partitions"):
        broker.fetch(q * 4097)


def test_fetch_offset_out_of_range(broker: Broker) -> None:
    broker.create_topic("t", 1)
    broker.produce("t", 0, batch(b"a", b"b", b"c"))
    started = time.monotonic()
    [result] = broker.fetch([FetchQuery("t", 0, 100)], max_wait_ms=5000)
    assert time.monotonic() - started < 1.0  # an error answers at once
    assert isinstance(result.error, OffsetOutOfRangeError)
    assert (result.error.offset, result.error.log_start_offset) == (100, 0)
    assert result.error.log_end_offset == 3
    assert "100" in str(result.error)
    [negative] = broker.fetch([FetchQuery("t", 0, -1)])
    assert isinstance(negative.error, OffsetOutOfRangeError)
    # The log end offset itself is in range: nothing yet, no error.
    [at_end] = broker.fetch([FetchQuery("t", 0, 3)])
    assert (at_end.error, at_end.data, at_end.high_watermark) == (None, b"", 3)
    # A read from the middle of a batch returns the whole batch holding the offset.
    [mid] = broker.fetch([FetchQuery("t", 0, 1)])
    assert [r.offset for r in decode_records(mid.data)] == [0, 1, 2]


# ---------------------------------------------------------------------------- offsets
def test_list_offsets(broker: Broker) -> None:
    broker.create_topic("t", 2)
    broker.produce("t", 0, batch(b"a", b"b", ts=1000))  # offsets 0, 1 at 1000, 1001
    broker.produce("t", 0, batch(b"c", ts=2000))  # offset 2
    broker.produce("t", 0, batch(b"d", b"e", ts=3000))  # offsets 3, 4
    queries = [
        OffsetQuery("t", 0, "earliest"),
        OffsetQuery("t", 0, "latest"),
        OffsetQuery("t", 0, "timestamp", 0),
        OffsetQuery("t", 0, "timestamp", 1001),
        OffsetQuery("t", 0, "timestamp", 1500),
        OffsetQuery("t", 0, "timestamp", 3001),
        OffsetQuery("t", 0, "timestamp", 3002),
        OffsetQuery("t", 1, "latest"),
        OffsetQuery("t", 7, "latest"),
    ]
    results = broker.list_offsets(queries)
    assert [r.offset for r in results] == [0, 5, 0, 1, 2, 4, None, 0, None]
    assert all((r.log_start_offset, r.log_end_offset) == (0, 5) for r in results[:7])
    assert isinstance(results[8].error, UnknownPartitionError)
    assert all(r.error is None for r in results[:8])


# ---------------------------------------------------------------------------- subscribe
@pytest.fixture(scope="module")
def rolled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Topic "s" (2 partitions, 2 KiB segments): 20 batches of 3 records each in partition 0,
    batch i at time 10_000 + 100 * i, so offsets 3i..3i+2; partition 1 holds one batch.
    Shared by the read-only subscribe tests below (rolling segments costs fsyncs)."""
    broker = Broker(BrokerConfig(data_dir=tmp_path_factory.mktemp("rolled")), clock_ms=FakeClock())
    broker.create_topic("s", 2, {"segment_bytes": "2048", "index_interval_bytes": "128"})
    for i in range(20):
        values = [f"{i}-{j}".encode() + b"." * 100 for j in range(3)]
        broker.produce("s", 0, batch(*values, ts=10_000 + 100 * i))
    broker.produce("s", 1, batch(b"p1", ts=10_000))
    assert broker.describe_topic("s").partitions[0].segment_count > 3
    yield broker
    broker.close()


def collect(chunks: Iterator[SubscribeChunk], limit: int = 10_000) -> list[SubscribeChunk]:
    out: list[SubscribeChunk] = []
    for chunk in chunks:
        out.append(chunk)
        assert len(out) < limit
    return out


def offsets_by_partition(
    chunks: list[SubscribeChunk], starts: dict[int, int]
) -> dict[int, list[int]]:
    """Offsets delivered per partition, records below the start skipped (and chained checked)."""
    out: dict[int, list[int]] = {}
    positions = dict(starts)
    for c in chunks:
        recs = decode_records(c.data)
        assert recs[0].offset <= positions[c.partition] <= recs[-1].offset
        assert c.next_offset == recs[-1].offset + 1
        out.setdefault(c.partition, []).extend(
            r.offset for r in recs if r.offset >= positions[c.partition]
        )
        positions[c.partition] = c.next_offset
    return out


def test_subscribe_earliest_to_end_across_rolls(rolled: Broker) -> None:
    chunks = collect(rolled.subscribe("s", [], ("earliest", 0), stop_at_end=True, max_bytes=512))
    assert offsets_by_partition(chunks, {0: 0, 1: 0}) == {0: list(range(60)), 1: [0]}
    assert all(c.high_watermark == (60 if c.partition == 0 else 1) for c in chunks)
    assert rolled._subscribers == 0


def test_subscribe_latest_with_stop_at_end_is_empty(rolled: Broker) -> None:
    assert collect(rolled.subscribe("s", [0, 1], ("latest", 0), stop_at_end=True)) == []


@pytest.mark.parametrize(("start", "stop"), [(0, 1), (4, 50), (29, 30), (50, 60), (7, 7)])
def test_subscribe_from_offset_to_stop_offset(rolled: Broker, start: int, stop: int) -> None:
    chunks = collect(rolled.subscribe("s", [0], ("offset", start), stop_offset=stop))
    got = offsets_by_partition(chunks, {0: start}).get(0, [])
    # Whole batches are sent: the last one may run past the stop; nothing starts at or after it.
    assert [o for o in got if o < stop] == list(range(start, stop))
    assert all(o < stop + 3 for o in got)


def test_subscribe_from_timestamp(rolled: Broker) -> None:
    # Batch 10 starts at 11_000 with offset 30; 11_001 is its second record.
    for ts, first in [(11_000, 30), (11_001, 31), (10_999, 30), (0, 0)]:
        chunks = collect(rolled.subscribe("s", [0], ("timestamp", ts), stop_at_end=True))
        got = offsets_by_partition(chunks, {0: first})[0]
        assert got == list(range(first, 60))
    # After the newest record: the log end, nothing until new data.
    assert collect(rolled.subscribe("s", [0], ("timestamp", 99_999), stop_at_end=True)) == []


def test_subscribe_bad_start_offset(rolled: Broker) -> None:
    for offset in (-1, 61, 10**12):
        with pytest.raises(OffsetOutOfRangeError, match=str(offset)):
            next(rolled.subscribe("s", [0], ("offset", offset)))
    with pytest.raises(InvalidRequestError, match="twice"):
        next(rolled.subscribe("s", [0, 0], ("earliest", 0)))
    assert rolled._subscribers == 0


def test_subscribe_live_receives_new_batch(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, reader_waiting: threading.Event
) -> None:
    monkeypatch.setattr(_broker, "SUBSCRIBE_IDLE_CHECK_S", 60.0)
    broker.create_topic("t", 2)
    broker.produce("t", 0, batch(b"old"))
    deadline = time.monotonic() + WAIT_S
    chunks = broker.subscribe("t", [], ("latest", 0), is_active=lambda: time.monotonic() < deadline)

    def produce_when_watched() -> None:
        assert reader_waiting.wait(WAIT_S)
        broker.produce("t", 1, batch(b"new"))

    producer = threading.Thread(target=produce_when_watched)
    producer.start()
    started = time.monotonic()
    chunk = next(chunks)
    producer.join(WAIT_S)
    assert time.monotonic() - started < 1.0
    assert (chunk.partition, chunk.next_offset, chunk.high_watermark) == (1, 1, 1)
    assert [r.value for r in decode_records(chunk.data)] == [b"new"]
    assert broker._subscribers == 1
    chunks.close()  # type: ignore[attr-defined]
    assert broker._subscribers == 0


def test_subscribers_max(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    broker.config = dataclasses.replace(broker.config, subscribers_max=2)
    broker.create_topic("t", 1)
    broker.produce("t", 0, batch(b"x"))
    first = broker.subscribe("t", [], ("earliest", 0))
    second = broker.subscribe("t", [], ("earliest", 0))
    next(first)
    next(second)
    assert broker._subscribers == 2
    with pytest.raises(LimitExceededError, match="limit is 2"):
        next(broker.subscribe("t", [], ("earliest", 0)))
    first.close()  # type: ignore[attr-defined]
    assert broker._subscribers == 1
    third = broker.subscribe("t", [], ("earliest", 0))
    assert next(third).next_offset == 1
    for gen in (second, third):
        gen.close()  # type: ignore[attr-defined]
    assert broker._subscribers == 0


def test_subscribe_ends_when_topic_is_deleted(broker: Broker) -> None:
    broker.create_topic("t", 1)
    broker.produce("t", 0, batch(b"x"))
    chunks = broker.subscribe("t", [], ("earliest", 0))
    next(chunks)
    broker.delete_topic("t")
    with pytest.raises(UnknownTopicError, match="deleted"):
        next(chunks)
    assert broker._subscribers == 0


def test_subscribe_ends_on_shutdown(broker: Broker) -> None:
    broker.create_topic("t", 1)
    chunks = broker.subscribe("t", [], ("latest", 0))
    done = threading.Event()
    got: list[SubscribeChunk] = []

    def consume() -> None:
        got.extend(chunks)
        done.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    # Whether or not the consumer is already waiting, shutdown must end its stream.
    broker.begin_shutdown()
    assert done.wait(WAIT_S)
    consumer.join(WAIT_S)
    assert got == []
    assert broker._subscribers == 0


# ---------------------------------------------------------------------------- retention, restart
def test_retention_by_time_on_tick(broker: Broker, clock: FakeClock) -> None:
    broker.create_topic("r", 1, {"segment_bytes": "1024", "retention_ms": "60000"})
    for i in range(20):
        broker.produce("r", 0, batch(b"v" * 200, ts=clock.now_ms + i))
    before = broker.describe_topic("r").partitions[0]
    assert before.segment_count > 3
    broker.tick()
    assert broker.describe_topic("r").partitions[0] == before  # nothing old enough yet
    clock.advance(61_000)
    broker.produce("r", 0, batch(b"fresh", ts=clock.now_ms))
    broker.tick()
    after = broker.describe_topic("r").partitions[0]
    # Only the active segment is left: its older batches and the fresh one.
    assert after.segment_count == 1
    assert 0 < after.log_start_offset <= 20
    assert after.log_end_offset == 21
    start = after.log_start_offset
    [gone] = broker.fetch([FetchQuery("r", 0, 0)])
    assert isinstance(gone.error, OffsetOutOfRangeError)
    [earliest] = broker.list_offsets([OffsetQuery("r", 0, "earliest")])
    assert earliest.offset == start
    [kept] = broker.fetch([FetchQuery("r", 0, start)])
    assert [r.offset for r in decode_records(kept.data)] == list(range(start, 21))
    assert decode_records(kept.data)[-1].value == b"fresh"


def test_retention_by_size_on_tick(broker: Broker) -> None:
    broker.create_topic("r", 1, {"segment_bytes": "1024", "retention_bytes": "2048"})
    for _ in range(30):
        broker.produce("r", 0, batch(b"v" * 200))
    broker.tick()
    info = broker.describe_topic("r").partitions[0]
    assert info.size_bytes <= 2048 + 1024
    assert info.log_start_offset > 0
    assert info.log_end_offset == 30


def test_close_and_reopen_keeps_data_without_recovery(
    make_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    first = make_broker(log=LogConfig(segment_bytes=1024))
    first.create_topic("t", 2, {"retention_ms": "none"})
    for i in range(12):
        first.produce("t", i % 2, batch(f"v{i}".encode() * 40))
    described = first.describe_topic("t")
    first.close()
    second = make_broker(log=LogConfig(segment_bytes=1024))
    assert second.describe_topic("t") == described
    for topic in second._topics.values():
        for p in topic.partitions:
            assert not p.log.recovered
            assert p.log.truncations == []
    values = [r.value for r in read_all(second, "t", 0)]
    assert values == [f"v{i}".encode() * 40 for i in range(0, 12, 2)]
    assert second.produce("t", 1, batch(b"more")).base_offset == 6
