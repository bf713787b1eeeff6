"""The consumer client (stream/client/_consumer.py) against a real broker on loopback.

What a user relies on: every record of an assigned partition, in order, from where they
asked (beginning, end, an offset, a time, the committed offset, or the reset policy); commits
that a new member of the group resumes after; a group that splits partitions so each record
is consumed by exactly one member, including across a member's departure; pause, lag and
callbacks that do what they say; memory bounded by buffer_bytes_max whatever the backlog;
close() that leaves the group. Test data goes in through the Broker and Admin stubs, never
through the client under test.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from storage import NewRecord, encode_batch
from stream._pb import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    groups_pb2,
    groups_pb2_grpc,
)
from stream._serve import RunningBroker
from stream.client._base import (
    GroupError,
    InvalidArgumentError,
    OffsetOutOfRangeError,
    Record,
    TopicPartition,
)
from stream.client._consumer import AsyncConsumer, Consumer

# Upper bound on every wait in this file.
WAIT_S = 10.0
# Short poll waits while two consumers take turns in one thread.
TURN_MS = 50
# Regular heartbeats every 2 s (a third of it); hand-overs go faster (heartbeat_now, 100 ms).
SESSION_TIMEOUT_MS = 6_000
T0_MS = 1_700_000_000_000
MiB = 1024 * 1024


# ---------------------------------------------------------------------------- helpers
@pytest.fixture
def admin(channel: grpc.Channel) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(channel)


@pytest.fixture
def stub(channel: grpc.Channel) -> broker_pb2_grpc.BrokerStub:
    return broker_pb2_grpc.BrokerStub(channel)


@pytest.fixture
def groups(channel: grpc.Channel) -> groups_pb2_grpc.GroupsStub:
    return groups_pb2_grpc.GroupsStub(channel)


@pytest.fixture
def server(running_broker: RunningBroker) -> str:
    return running_broker.address


def create(admin: admin_pb2_grpc.AdminStub, name: str, partitions: int, **config: str) -> None:
    request = admin_pb2.CreateTopicRequest(name=name, partitions=partitions, config=config)
    admin.CreateTopic(request, timeout=WAIT_S)


def value_of(partition: int, offset: int) -> bytes:
    return f"p{partition}-o{offset}".encode()


def produce(
    stub: broker_pb2_grpc.BrokerStub,
    topic: str,
    partition: int,
    first: int,
    count: int,
    *,
    per_batch: int = 100,
    value_bytes: int = 0,
) -> int:
    """Records `first` .. `first + count - 1` of a partition (the caller keeps offsets dense):
    value `value_of(partition, offset)` (padded to `value_bytes`), timestamp T0_MS + 10 *
    offset, `per_batch` records per batch. Returns the largest batch's size in bytes."""
    largest = 0
    for start in range(first, first + count, per_batch):
        stop = min(start + per_batch, first + count)
        batch = encode_batch(
            [
                NewRecord(
                    str(o).encode(), value_of(partition, o).ljust(value_bytes, b"."), T0_MS + 10 * o
                )
                for o in range(start, stop)
            ]
        )
        entry = broker_pb2.PartitionProduce(topic=topic, partition=partition, record_batch=batch)
        answer = stub.Produce(broker_pb2.ProduceRequest(partitions=[entry]), timeout=WAIT_S)
        result = answer.results[0]
        assert result.error.code == 0, result.error.message
        assert result.base_offset == start, "the test's offsets drifted from the log's"
        largest = max(largest, len(batch))
    return largest


def poll_until(
    consumer: Consumer, done: Callable[[list[Record]], bool], *, max_records: int | None = None
) -> list[Record]:
    """Poll until `done(all records so far)`; fail after WAIT_S."""
    got: list[Record] = []
    deadline = time.monotonic() + WAIT_S
    while not done(got):
        assert time.monotonic() < deadline, f"gave up after {len(got)} records"
        got += consumer.poll(timeout_ms=100, max_records=max_records)
    return got


def count(n: int) -> Callable[[list[Record]], bool]:
    return lambda got: len(got) >= n


def offsets(records: list[Record], partition: int) -> list[int]:
    return [r.offset for r in records if r.partition == partition]


def check_records(records: list[Record]) -> None:
    for r in records:
        assert r.value is not None
        assert r.value.startswith(value_of(r.partition, r.offset)), r
        assert r.key == str(r.offset).encode()
        assert r.timestamp_ms == T0_MS + 10 * r.offset


def describe(groups: groups_pb2_grpc.GroupsStub, group: str) -> groups_pb2.DescribeGroupResponse:
    return groups.DescribeGroup(groups_pb2.DescribeGroupRequest(group_id=group), timeout=WAIT_S)


def members(groups: groups_pb2_grpc.GroupsStub, group: str) -> int:
    """How many members the group has (0 also when the broker forgot it: no members and no
    committed offsets)."""
    try:
        return len(describe(groups, group).members)
    except grpc.RpcError as e:
        if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.NOT_FOUND:
            return 0
        raise


def committed(groups: groups_pb2_grpc.GroupsStub, group: str) -> dict[int, int]:
    answer = groups.FetchOffsets(groups_pb2.FetchOffsetsRequest(group_id=group), timeout=WAIT_S)
    return {c.partition: c.offset for c in answer.offsets if c.HasField("offset")}


@pytest.fixture
def consumers() -> Iterator[list[Consumer]]:
    """Consumers a test made; closed at the end whatever happened."""
    made: list[Consumer] = []
    yield made
    for c in made:
        c.close()


# ---------------------------------------------------------------------------- reading
def test_assign_and_seek_to_beginning_read_everything_in_order(
    server: str, admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t", 3)
    for p in range(3):
        produce(stub, "t", p, 0, 700, per_batch=70 + p)  # crosses 64 KiB segments
    with Consumer(server) as consumer:
        consumer.assign([TopicPartition("t", p) for p in range(3)])
        assert consumer.assignment() == {TopicPartition("t", p) for p in range(3)}
        consumer.seek_to_beginning()
        got = poll_until(consumer, count(2100))
        assert len(got) == 2100
        check_records(got)
        for p in range(3):
            assert offsets(got, p) == list(range(700)), f"partition {p}"
            assert consumer.position(("t", p)) == 700
        assert consumer.poll(timeout_ms=50) == []


def test_reset_earliest_and_topics_without_a_group(
    server: str, admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t", 2)
    for p in range(2):
        produce(stub, "t", p, 0, 30)
    with Consumer(server, topics=["t"], auto_offset_reset="earliest") as consumer:
        got = poll_until(consumer, count(60))
        assert consumer.assignment() == {TopicPartition("t", 0), TopicPartition("t", 1)}
        assert sorted(offsets(got, 0)) == sorted(offsets(got, 1)) == list(range(30))
        with pytest.raises(InvalidArgumentError, match="without topics"):
            consumer.assign([TopicPartition("t", 0)])
        with pytest.raises(InvalidArgumentError, match="needs a group"):
            consumer.commit()


def test_reset_latest_reads_only_new_records(
    server: str, admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t", 1)
    produce(stub, "t", 0, 0, 40)
    with Consumer(server) as consumer:  # "latest" is the default
        consumer.assign([TopicPartition("t", 0)])
        assert consumer.poll(timeout_ms=100) == []
        assert consumer.position(("t", 0)) == 40
        produce(stub, "t", 0, 40, 5)
        got = poll_until(consumer, count(5))
        assert offsets(got, 0) == [40, 41, 42, 43, 44]


def test_reset_error_raises_until_seek(
    server: str, admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t", 1)
    produce(stub, "t", 0, 0, 20)
    with Consumer(server, auto_offset_reset="error") as consumer:
        tp = TopicPartition("t", 0)
        consumer.assign([tp])
        with pytest.raises(OffsetOutOfRangeError, match="t-0 has no committed offset"):
            consumer.poll(timeout_ms=100)
        with pytest.raises(OffsetOutOfRangeError):
            consumer.poll(timeout_ms=100)  # still: nothing was fixed
        consumer.seek(tp, 15)
        assert offsets(poll_until(consumer, count(5)), 0) == [15, 16, 17, 18, 19]
        # A position outside the log: the error names the numbers.
        consumer.seek(tp, 500)
        with pytest.raises(OffsetOutOfRangeError, match=r"offset 500 is outside the log \[0, 20\]"):
            poll_until(consumer, lambda _got: False)


def test_out_of_range_position_resets_per_policy(
    server: str, admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t", 1)
    produce(stub, "t", 0, 0, 20)
    with Consumer(server, auto_offset_reset="earliest") as consumer:
        tp = TopicPartition("t", 0)
        consumer.assign([tp])
        consumer.seek(tp, 999)
        assert offsets(poll_until(consumer, count(20)), 0) == list(range(20))


def test_seek_and_seek_to_timestamp(
    server: str, admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t", 1)
    produce(stub, "t", 0, 0, 50, per_batch=10)
    tp = TopicPartition("t", 0)
    with Consumer(server) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 7)  # in the middle of a batch: records before it are skipped
        assert offsets(poll_until(consumer, count(43)), 0) == list(range(7, 50))
        consumer.seek_to_timestamp(T0_MS + 10 * 33)
        assert consumer.position(tp) == 33
        assert poll_until(consumer, count(1), max_records=1)[0].offset == 33
        consumer.seek_to_timestamp(T0_MS + 10 * 20 + 5)  # between records 20 and 21
        assert consumer.position(tp) == 21
        consumer.seek_to_timestamp(T0_MS + 10**9)  # after every record: the log end
        assert consumer.position(tp) == 50
        assert consumer.poll(timeout_ms=100) == []
        consumer.seek_to_beginning()
        assert consumer.position(tp) == 0
        consumer.seek_to_end()
        assert consumer.position(tp) == 50
        with pytest.raises(InvalidArgumentError, match="t-3 is not assigned"):
            consumer.seek(TopicPartition("t", 3), 0)
        with pytest.raises(InvalidArgumentError, match="offset for t-0"):
            consumer.seek(tp, -1)


def test_pause_and_resume(
    server: str, admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t", 2)
    for p in range(2):
        produce(stub, "t", p, 0, 100)
    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    with Consumer(server, auto_offset_reset="earliest") as consumer:
        consumer.assign([p0, p1])
        first = poll_until(consumer, count(1), max_records=10)  # some of either, maybe both
        consumer.pause([p0])
        assert consumer.paused() == {p0}
        got = poll_until(consumer, lambda g: len(offsets(first + g, 1)) >= 100)
        assert offsets(got, 0) == [], "a paused partition's records were returned"
        assert consumer.poll(timeout_ms=200) == []
        consumer.resume([p0])
        rest = poll_until(consumer, lambda g: len(offsets(first + g, 0)) >= 100)
        # Nothing skipped or repeated across the pause (its buffered records were dropped).
        assert offsets(first + got + rest, 0) == list(range(100))
        assert offsets(first + got + rest, 1) == list(range(100))


def test_lag(
    server: str, admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t", 2)
    produce(stub, "t", 0, 0, 100)
    produce(stub, "t", 1, 0, 40)
    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    with Consumer(server, auto_offset_reset="earliest") as consumer:
        consumer.assign([p0, p1])
        assert consumer.lag() == {p0: 100, p1: 40}
        got = poll_until(consumer, lambda g: len(offsets(g, 0)) >= 30, max_records=10)
        assert consumer.lag()[p0] == 100 - len(offsets(got, 0))
        poll_until(consumer, count(140 - len(got)))
        assert consumer.lag() == {p0: 0, p1: 0}
        produce(stub, "t", 1, 40, 7)
        assert consumer.lag()[p1] == 7


def test_buffer_stays_bounded_whatever_the_backlog(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """~20 MiB of backlog, a 1 MiB buffer: the buffer never holds more than the bound plus
    one fetch answer's overshoot (one batch, ~115 KiB here), polled or not."""
    create(admin, "t", 2, segment_bytes=str(16 * MiB))  # few segment rolls: a quick setup
    per_partition = 100_000
    batch_bytes = max(
        produce(stub, "t", p, 0, per_partition, per_batch=1000, value_bytes=100) for p in range(2)
    )
    bound = 1 * MiB
    sizes: list[int] = []  # the buffer's size after each fetch answer went in
    original = AsyncConsumer._decode

    def observed(self: AsyncConsumer, *args: Any) -> None:
        original(self, *args)
        sizes.append(self.buffered_bytes)

    monkeypatch.setattr(AsyncConsumer, "_decode", observed)
    with Consumer(server, auto_offset_reset="earliest", buffer_bytes_max=bound) as consumer:
        consumer.assign([TopicPartition("t", p) for p in range(2)])
        got = poll_until(consumer, count(1))
        time.sleep(0.3)  # a consumer that does not poll: the fetch task must stop
        assert consumer.buffered_bytes <= bound + batch_bytes
        total = len(got)
        deadline = time.monotonic() + WAIT_S
        while total < 2 * per_partition:
            assert time.monotonic() < deadline, f"{total} records"
            total += len(consumer.poll(timeout_ms=100, max_records=5000))
        assert total == 2 * per_partition
    assert max(sizes) <= bound + batch_bytes, f"peak {max(sizes)} bytes buffered"


# ---------------------------------------------------------------------------- iteration
def test_iteration_and_break_lose_nothing(
    server: str, admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t", 1)
    produce(stub, "t", 0, 0, 300)
    tp = TopicPartition("t", 0)
    with Consumer(server, group="it", auto_offset_reset="earliest") as consumer:
        consumer.assign([tp])
        seen: list[int] = []
        for record in consumer:
            seen.append(record.offset)
            if record.offset == 120:
                consumer.commit()  # covers what was yielded, not the whole batch
                assert consumer.position(tp) == 121
                break
        assert seen == list(range(121))
        rest = consumer.poll(timeout_ms=0, max_records=50)  # what the loop left comes first
        assert [r.offset for r in rest] == list(range(121, 171))
        rest += poll_until(consumer, count(129))
        assert [r.offset for r in rest] == list(range(121, 300))
    assert committed_of(server, "it") == {0: 300}  # close committed the rest


def committed_of(server: str, group: str) -> dict[int, int]:
    with grpc.insecure_channel(server) as channel:
        return committed(groups_pb2_grpc.GroupsStub(channel), group)


# ---------------------------------------------------------------------------- groups
def test_manual_assignment_commits_for_an_empty_group(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    groups: groups_pb2_grpc.GroupsStub,
) -> None:
    create(admin, "t", 1)
    produce(stub, "t", 0, 0, 50)
    tp = TopicPartition("t", 0)
    with Consumer(server, group="manual", enable_auto_commit=False) as consumer:
        consumer.assign([tp])
        consumer.seek_to_beginning()
        poll_until(consumer, count(20), max_records=20)
        consumer.commit()
        assert committed(groups, "manual") == {0: 20}
        consumer.commit({tp: 33})
        assert committed(groups, "manual") == {0: 33}
    with Consumer(server, group="manual") as again:
        again.assign([tp])  # starts at the group's committed offset
        assert offsets(poll_until(again, count(17)), 0) == list(range(33, 50))


def test_commit_then_a_new_member_resumes_after_it(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    groups: groups_pb2_grpc.GroupsStub,
) -> None:
    create(admin, "t", 1)
    produce(stub, "t", 0, 0, 100)

    def member(*, enable_auto_commit: bool) -> Consumer:
        return Consumer(
            server,
            group="g",
            topics=["t"],
            auto_offset_reset="earliest",
            enable_auto_commit=enable_auto_commit,
            session_timeout_ms=SESSION_TIMEOUT_MS,
        )

    with member(enable_auto_commit=False) as first:
        got = poll_until(first, count(30), max_records=30)
        assert offsets(got, 0)[:30] == list(range(30))
        first.commit({TopicPartition("t", 0): 30})
        assert committed(groups, "g") == {0: 30}
    with member(enable_auto_commit=True) as second:
        got = poll_until(second, count(70))
        assert offsets(got, 0) == list(range(30, 100))


def test_two_members_split_partitions_and_one_takes_over_on_close(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    groups: groups_pb2_grpc.GroupsStub,
    consumers: list[Consumer],
) -> None:
    partitions = 4
    create(admin, "split", partitions)
    everything = {TopicPartition("split", p) for p in range(partitions)}
    seen: dict[str, list[Record]] = {"a": [], "b": []}
    assigned: dict[str, list[list[TopicPartition]]] = {"a": [], "b": []}
    revoked: dict[str, list[list[TopicPartition]]] = {"a": [], "b": []}

    def member(name: str) -> Consumer:
        consumer = Consumer(
            server,
            group="split-group",
            topics=["split"],
            auto_offset_reset="earliest",
            session_timeout_ms=SESSION_TIMEOUT_MS,
            fetch_max_wait_ms=100,
            on_assign=assigned[name].append,
            on_revoke=revoked[name].append,
        )
        consumers.append(consumer)
        return consumer

    def turns(members: dict[str, Consumer], done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done():
            assert time.monotonic() < deadline, f"gave up: {describe(groups, 'split-group')}"
            for name, consumer in members.items():
                seen[name] += consumer.poll(timeout_ms=TURN_MS)

    def total() -> int:
        return len(seen["a"]) + len(seen["b"])

    next_offset = 0

    def produce_round(n: int) -> None:
        nonlocal next_offset
        for p in range(partitions):
            produce(stub, "split", p, next_offset, n)
        next_offset += n

    produce_round(50)
    a = member("a")
    turns({"a": a}, lambda: total() >= 200)
    assert a.assignment() == everything
    assert assigned["a"] == [sorted(everything)]

    b = member("b")
    turns({"a": a, "b": b}, lambda: bool(b.assignment()) and len(a.assignment()) == 2)
    assert a.assignment() | b.assignment() == everything
    assert not a.assignment() & b.assignment()
    assert revoked["a"] == [sorted(b.assignment())]
    produce_round(50)
    turns({"a": a, "b": b}, lambda: total() >= 400)
    for name, consumer in (("a", a), ("b", b)):
        later = {r.partition for r in seen[name] if r.offset >= 50}
        assert later == {tp.partition for tp in consumer.assignment()}, name

    a.close()  # commits, leaves: b takes over from a's commits
    turns({"b": b}, lambda: b.assignment() == everything)
    produce_round(50)
    turns({"b": b}, lambda: total() >= 600)
    b.close()

    counts = Counter((r.partition, r.offset) for r in seen["a"] + seen["b"])
    assert set(counts.values()) == {1}, "a record was consumed twice"
    assert set(counts) == {(p, o) for p in range(partitions) for o in range(150)}
    assert {r.partition for r in seen["b"] if r.offset >= 100} == set(range(partitions))
    check_records(seen["a"] + seen["b"])
    assert committed(groups, "split-group") == dict.fromkeys(range(partitions), 150)
    assert not describe(groups, "split-group").members


def test_close_leaves_the_group(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    groups: groups_pb2_grpc.GroupsStub,
) -> None:
    create(admin, "t", 2)
    produce(stub, "t", 0, 0, 10)
    revoked: list[list[TopicPartition]] = []
    consumer = Consumer(
        server,
        group="leaving",
        topics=["t"],
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        on_revoke=revoked.append,
    )
    try:
        poll_until(consumer, count(10))
        assert len(describe(groups, "leaving").members) == 1
    finally:
        consumer.close()
    assert consumer.closed
    assert revoked == [[TopicPartition("t", 0), TopicPartition("t", 1)]]
    answer = describe(groups, "leaving")
    assert not answer.members
    assert {p.partition: p.committed_offset for p in answer.partitions} == {0: 10, 1: 0}
    consumer.close()  # twice is fine


def test_a_member_that_stops_polling_leaves_and_rejoins(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    groups: groups_pb2_grpc.GroupsStub,
) -> None:
    """max_poll_interval_ms: slow progress through an iteration is progress; no poll for
    that long and the member leaves, and rejoins at its next poll."""
    create(admin, "t", 1)
    produce(stub, "t", 0, 0, 10, per_batch=10)  # one batch: one poll hands out all ten
    revoked: list[list[TopicPartition]] = []
    with Consumer(
        server,
        group="idle",
        topics=["t"],
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        max_poll_interval_ms=400,
        on_revoke=revoked.append,
    ) as consumer:
        for record in consumer:  # ~1 s in all, well over 400 ms, at 100 ms a record
            time.sleep(0.1)
            if record.offset == 9:
                break
        assert members(groups, "idle") == 1
        assert revoked == []
        deadline = time.monotonic() + WAIT_S
        while members(groups, "idle"):  # no poll and no iteration: it leaves on its own
            assert time.monotonic() < deadline
            time.sleep(0.05)
        produce(stub, "t", 0, 10, 5)
        # The next poll reports the lost partition and rejoins. Nothing was committed (the
        # records of a poll are committed at the next one), so all come again: at least once.
        got = poll_until(consumer, lambda g: 14 in offsets(g, 0))
        assert revoked == [[TopicPartition("t", 0)]]
        assert offsets(got, 0) == list(range(15))
        assert members(groups, "idle") == 1


def test_a_member_the_broker_forgot_rejoins(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    groups: groups_pb2_grpc.GroupsStub,
) -> None:
    """UNKNOWN_MEMBER (expired, or removed as here): the partitions are reported lost, the
    consumer rejoins and goes on from the group's committed offsets."""
    create(admin, "t", 1)
    produce(stub, "t", 0, 0, 50)
    tp = TopicPartition("t", 0)
    events: list[tuple[str, list[TopicPartition]]] = []
    with Consumer(
        server,
        group="forgot",
        topics=["t"],
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        on_assign=lambda tps: events.append(("assign", tps)),
        on_revoke=lambda tps: events.append(("revoke", tps)),
    ) as consumer:
        poll_until(consumer, count(50))
        consumer.commit()
        (member,) = describe(groups, "forgot").members
        leave = groups_pb2.LeaveGroupRequest(
            group_id="forgot", member_id=member.member_id, member_epoch=member.member_epoch
        )
        groups.LeaveGroup(leave, timeout=WAIT_S)
        assert poll_until(consumer, lambda _got: len(events) == 3) == []
        assert events == [("assign", [tp]), ("revoke", [tp]), ("assign", [tp])]
        produce(stub, "t", 0, 50, 10)
        assert offsets(poll_until(consumer, count(10)), 0) == list(range(50, 60))
        (again,) = describe(groups, "forgot").members
        assert again.member_id != member.member_id


def test_fenced_commit_is_retried_with_the_new_epoch(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    groups: groups_pb2_grpc.GroupsStub,
) -> None:
    """A commit at a stale epoch (the member's assignment changed since) is refused
    FENCED_MEMBER; the consumer heartbeats and commits again with the new epoch."""
    create(admin, "t", 1)
    produce(stub, "t", 0, 0, 10)

    async def run() -> None:
        async with AsyncConsumer(
            server,
            group="fence",
            topics=["t"],
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=SESSION_TIMEOUT_MS,
        ) as consumer:
            got: list[Record] = []
            while len(got) < 10:
                got += await consumer.poll(timeout_ms=100)
            consumer._epoch -= 1  # as if an answer with a new epoch had not arrived yet
            await consumer.commit()
            assert consumer._epoch > 0

    asyncio.run(asyncio.wait_for(run(), WAIT_S))
    assert committed(groups, "fence") == {0: 10}


def test_group_refusals_surface_as_group_errors(
    server: str, admin: admin_pb2_grpc.AdminStub
) -> None:
    create(admin, "t", 1)
    with Consumer(server, group="busy", topics=["t"], session_timeout_ms=SESSION_TIMEOUT_MS) as m:
        m.poll(timeout_ms=100)
        with Consumer(server, group="busy") as manual:
            manual.assign([TopicPartition("t", 0)])
            with pytest.raises(GroupError) as info:
                manual.commit({TopicPartition("t", 0): 0})
            assert info.value.name == "GROUP_NOT_EMPTY"


def test_options_are_checked() -> None:
    with pytest.raises(InvalidArgumentError, match="auto_offset_reset"):
        AsyncConsumer(auto_offset_reset="smallest")
    with pytest.raises(InvalidArgumentError, match="not both"):
        AsyncConsumer(topics=["a"], pattern="a.*")
    with pytest.raises(InvalidArgumentError, match="list of names"):
        AsyncConsumer(topics="abc")
    with pytest.raises(InvalidArgumentError, match="fetch_max_wait_ms"):
        AsyncConsumer(fetch_max_wait_ms=60_000)
    with pytest.raises(InvalidArgumentError, match="bad pattern"):
        AsyncConsumer(group="g", pattern="(")


# ---------------------------------------------------------------------------- asyncio
def test_async_flavour(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    groups: groups_pb2_grpc.GroupsStub,
) -> None:
    create(admin, "a", 3)
    for p in range(3):
        produce(stub, "a", p, 0, 40)
    events: list[tuple[str, list[TopicPartition]]] = []

    async def run() -> list[Record]:
        async with AsyncConsumer(
            server,
            group="async",
            pattern="a",
            auto_offset_reset="earliest",
            session_timeout_ms=SESSION_TIMEOUT_MS,
            on_assign=lambda tps: events.append(("assign", tps)),
            on_revoke=lambda tps: events.append(("revoke", tps)),
        ) as consumer:
            got: list[Record] = []
            async for record in consumer:
                got.append(record)
                if len(got) == 120:
                    break
            await consumer.commit_async()
            assert await consumer.lag() == dict.fromkeys(consumer.assignment(), 0)
            return got

    got = asyncio.run(asyncio.wait_for(run(), WAIT_S))
    for p in range(3):
        assert offsets(got, p) == list(range(40))
    everything = [TopicPartition("a", p) for p in range(3)]
    assert events == [("assign", everything), ("revoke", everything)]
    assert committed(groups, "async") == dict.fromkeys(range(3), 40)
    assert not describe(groups, "async").members
