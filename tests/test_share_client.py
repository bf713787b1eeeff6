"""The share-group client (stream/client/_share.py) and request/reply over topics
(stream/client/_reqreply.py).

First the pure parts (ranges of acknowledgements, picking the acquired records out of a fetch
answer, local checks), then against a real broker on loopback: what a user relies on is that
every record is handed to one member at a time, comes back when released (or when its holder
leaves), never when rejected or acknowledged, that refusals are reported, and that a request
gets its reply. Test data goes in through the Broker and Admin stubs, never through the client
under test.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from storage import NewRecord, encode_batch
from stream import (
    AckFailure,
    DeadlineExceededError,
    InvalidArgumentError,
    Record,
    Requester,
    Responder,
    ShareConsumer,
    ShareRecord,
)
from stream._pb import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    share_pb2,
    share_pb2_grpc,
)
from stream._serve import RunningBroker
from stream.aio import AsyncRequester, AsyncResponder, AsyncShareConsumer
from stream.client._reqreply import CORRELATION_ID_HEADER, REPLY_TO_HEADER, header
from stream.client._share import (
    ACCEPT,
    ACK_RANGE_OFFSETS_MAX,
    REJECT,
    RELEASE,
    _Ack,
    coalesce,
    select_acquired,
)

# Upper bound on every wait in this file.
WAIT_S = 10.0
# The shortest lock the broker allows.
LOCK_MS_MIN = 1_000
T0_MS = 1_700_000_000_000


# ---------------------------------------------------------------------------- helpers
@pytest.fixture
def admin(channel: grpc.Channel) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(channel)


@pytest.fixture
def stub(channel: grpc.Channel) -> broker_pb2_grpc.BrokerStub:
    return broker_pb2_grpc.BrokerStub(channel)


@pytest.fixture
def share(channel: grpc.Channel) -> share_pb2_grpc.ShareStub:
    return share_pb2_grpc.ShareStub(channel)


@pytest.fixture
def server(running_broker: RunningBroker) -> str:
    return running_broker.address


@pytest.fixture
def consumers() -> Iterator[list[ShareConsumer]]:
    """Consumers a test made; closed at the end whatever happened."""
    made: list[ShareConsumer] = []
    yield made
    for c in made:
        c.close()


def create(admin: admin_pb2_grpc.AdminStub, name: str, partitions: int) -> None:
    request = admin_pb2.CreateTopicRequest(name=name, partitions=partitions)
    admin.CreateTopic(request, timeout=WAIT_S)


def value_of(partition: int, offset: int) -> bytes:
    return f"p{partition}-o{offset}".encode()


def produce(stub: broker_pb2_grpc.BrokerStub, topic: str, partition: int, count: int) -> None:
    """`count` records in one batch: value value_of(partition, offset), key the offset (the
    caller keeps offsets dense from 0)."""
    answer = stub.ListOffsets(
        broker_pb2.ListOffsetsRequest(
            queries=[
                broker_pb2.ListOffsetsRequest.Query(topic=topic, partition=partition, latest=True)
            ]
        ),
        timeout=WAIT_S,
    )
    first = answer.results[0].offset
    batch = encode_batch(
        [
            NewRecord(str(o).encode(), value_of(partition, o), T0_MS + o)
            for o in range(first, first + count)
        ]
    )
    entry = broker_pb2.PartitionProduce(topic=topic, partition=partition, record_batch=batch)
    result = stub.Produce(broker_pb2.ProduceRequest(partitions=[entry]), timeout=WAIT_S).results[0]
    assert result.error.code == 0, result.error.message


def poll_until(
    consumer: ShareConsumer, n: int, max_records: int | None = None
) -> list[ShareRecord]:
    """Poll until `n` records came; fail after WAIT_S."""
    got: list[ShareRecord] = []
    deadline = time.monotonic() + WAIT_S
    while len(got) < n:
        assert time.monotonic() < deadline, f"gave up after {len(got)} of {n} records"
        got += consumer.poll(timeout_ms=200, max_records=max_records)
    return got


def keys(records: list[ShareRecord]) -> set[tuple[int, int]]:
    return {(r.partition, r.offset) for r in records}


def describe(share: share_pb2_grpc.ShareStub, group: str) -> share_pb2.DescribeShareGroupResponse:
    return share.DescribeShareGroup(
        share_pb2.DescribeShareGroupRequest(group_id=group), timeout=WAIT_S
    )


def wait_for_members(share: share_pb2_grpc.ShareStub, group: str, n: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            if len(describe(share, group).members) == n:
                return
        except grpc.RpcError as e:
            if not (isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.NOT_FOUND):
                raise
        assert time.monotonic() < deadline, f"group {group} never had {n} members"
        time.sleep(0.01)


# ---------------------------------------------------------------------------- pure parts
def test_coalesce_merges_consecutive_offsets_of_one_kind() -> None:
    pending = {
        ("t", 0, 5): (ACCEPT, ""),
        ("t", 0, 3): (ACCEPT, ""),
        ("t", 0, 4): (ACCEPT, ""),
        ("t", 0, 6): (RELEASE, "boom"),
        ("t", 0, 7): (RELEASE, "boom"),
        ("t", 0, 8): (RELEASE, "other"),
        ("t", 0, 10): (RELEASE, "other"),  # a gap
        ("t", 1, 11): (REJECT, ""),
        ("u", 0, 12): (REJECT, ""),
    }
    assert coalesce(pending) == [
        _Ack("t", 0, 3, 5, ACCEPT, ""),
        _Ack("t", 0, 6, 7, RELEASE, "boom"),
        _Ack("t", 0, 8, 8, RELEASE, "other"),
        _Ack("t", 0, 10, 10, RELEASE, "other"),
        _Ack("t", 1, 11, 11, REJECT, ""),
        _Ack("u", 0, 12, 12, REJECT, ""),
    ]
    assert coalesce({}) == []


def test_coalesce_caps_ranges_at_the_broker_limit() -> None:
    n = 2 * ACK_RANGE_OFFSETS_MAX + 1
    ranges = coalesce({("t", 0, o): (ACCEPT, "") for o in range(n)})
    assert [(a.first_offset, a.last_offset) for a in ranges] == [
        (0, ACK_RANGE_OFFSETS_MAX - 1),
        (ACK_RANGE_OFFSETS_MAX, 2 * ACK_RANGE_OFFSETS_MAX - 1),
        (2 * ACK_RANGE_OFFSETS_MAX, 2 * ACK_RANGE_OFFSETS_MAX),
    ]


def test_select_acquired_keeps_only_offsets_in_the_ranges() -> None:
    records = [Record("t", 0, o, T0_MS, None, b"%d" % o) for o in range(10)]
    got = select_acquired(records, [(7, 8, 3), (2, 4, 1)])
    assert [(r.offset, r.delivery_count) for r in got] == [(2, 1), (3, 1), (4, 1), (7, 3), (8, 3)]
    assert got[0] == ShareRecord("t", 0, 2, T0_MS, None, b"2", (), 1)
    assert select_acquired(records, []) == []


@pytest.mark.parametrize(
    "options",
    [
        {"group": ""},
        {"topics": []},
        {"topics": "t"},
        {"lock_ms": 999},
        {"max_delivery_attempts": 0},
        {"start": "middle"},
        {"max_records": 10_001},
        {"session_timeout_ms": 500},
        {"max_wait_ms": 30_001},
        {"retry_backoff_ms": -1},
    ],
)
def test_options_are_checked(options: dict[str, object]) -> None:
    settings: dict[str, object] = {"group": "g", "topics": ["t"], **options}
    with pytest.raises(InvalidArgumentError):
        AsyncShareConsumer("127.0.0.1:1", **settings)  # type: ignore[arg-type]


def test_acknowledging_a_record_never_handed_out_raises_locally() -> None:
    consumer = AsyncShareConsumer("127.0.0.1:1", group="g", topics=["t"])
    record = ShareRecord("t", 0, 0, T0_MS, None, b"x")
    for method in (consumer.ack, consumer.release, consumer.reject):
        with pytest.raises(InvalidArgumentError, match="not held"):
            method(record)
    with pytest.raises(InvalidArgumentError, match="1024"):
        consumer.release(record, "x" * 1025)


def test_without_a_broker_poll_waits_out_its_timeout() -> None:
    consumer = ShareConsumer("127.0.0.1:1", group="g", topics=["t"])  # nothing listens there
    started = time.monotonic()
    try:
        assert consumer.poll(timeout_ms=300) == []  # joining fails UNAVAILABLE: retried
        assert 0.3 <= time.monotonic() - started < 2
        assert consumer.member_id == ""
        assert consumer.commit() == []
    finally:
        consumer.close()
    assert time.monotonic() - started < 3


# ---------------------------------------------------------------------------- share groups
def test_join_and_consume_a_two_partition_topic(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    share: share_pb2_grpc.ShareStub,
    consumers: list[ShareConsumer],
) -> None:
    create(admin, "orders", 2)
    for p in range(2):
        produce(stub, "orders", p, 10)
    consumer = ShareConsumer(
        server, group="g", topics=["orders"], start="earliest", lock_ms=5_000, max_wait_ms=200
    )
    consumers.append(consumer)
    got = poll_until(consumer, 20)
    assert keys(got) == {(p, o) for p in range(2) for o in range(10)}
    assert len(got) == 20
    for r in got:
        assert (r.topic, r.value, r.key) == (
            "orders",
            value_of(r.partition, r.offset),
            b"%d" % r.offset,
        )
        assert r.timestamp_ms == T0_MS + r.offset
        assert r.delivery_count == 1
    config = consumer.config
    assert config is not None
    assert (config.lock_ms, config.start) == (5_000, "earliest")
    assert consumer.member_id
    for r in got:
        consumer.ack(r)
    assert consumer.commit() == []
    state = describe(share, "g")
    assert [m.member_id for m in state.members] == [consumer.member_id]
    assert state.total_lag == 0


def test_release_comes_back_and_reject_never_does(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    consumers: list[ShareConsumer],
) -> None:
    create(admin, "jobs", 1)
    produce(stub, "jobs", 0, 3)
    consumer = ShareConsumer(
        server, group="g", topics=["jobs"], start="earliest", retry_backoff_ms=0, max_wait_ms=200
    )
    consumers.append(consumer)
    first = sorted(poll_until(consumer, 3))
    consumer.release(first[0], "try again")
    consumer.reject(first[1], "poison")
    consumer.ack(first[2])
    again = poll_until(consumer, 1)
    assert [(r.offset, r.delivery_count) for r in again] == [(0, 2)]
    consumer.ack(again[0])
    assert consumer.poll(timeout_ms=300) == []
    assert consumer.take_ack_failures() == []


def test_auto_ack_accepts_what_the_previous_poll_returned(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    share: share_pb2_grpc.ShareStub,
    consumers: list[ShareConsumer],
) -> None:
    create(admin, "jobs", 1)
    produce(stub, "jobs", 0, 4)
    consumer = ShareConsumer(
        server,
        group="g",
        topics=["jobs"],
        start="earliest",
        retry_backoff_ms=0,
        auto_ack=True,
        max_wait_ms=100,
    )
    consumers.append(consumer)
    got = sorted(poll_until(consumer, 4))
    consumer.release(got[3], "not this one")  # explicit acknowledgements win
    again = poll_until(consumer, 1)  # accepts offsets 0-2, and offset 3 comes back
    assert [(r.offset, r.delivery_count) for r in again] == [(3, 2)]
    assert describe(share, "g").total_lag == 1
    assert consumer.commit() == []  # accepts offset 3 too
    assert describe(share, "g").total_lag == 0
    with pytest.raises(InvalidArgumentError):
        consumer.ack(again[0])  # already accepted


def test_two_members_never_hold_the_same_record(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    consumers: list[ShareConsumer],
) -> None:
    create(admin, "work", 2)
    for p in range(2):
        produce(stub, "work", p, 100)
    pair = [
        ShareConsumer(server, group="g", topics=["work"], start="earliest", max_wait_ms=50)
        for _ in range(2)
    ]
    consumers.extend(pair)
    held: list[list[ShareRecord]] = [[], []]
    deadline = time.monotonic() + WAIT_S
    while sum(map(len, held)) < 200:  # nothing acknowledged: every record is held by one
        assert time.monotonic() < deadline, f"only {sum(map(len, held))} of 200 handed out"
        for i, c in enumerate(pair):
            held[i] += c.poll(timeout_ms=50, max_records=15)
    assert all(held), "both members got records"
    assert len(keys(held[0]) | keys(held[1])) == 200
    assert not keys(held[0]) & keys(held[1])
    for c, records in zip(pair, held, strict=True):
        for r in records:
            c.ack(r)
        assert c.commit() == []
    assert all(c.poll(timeout_ms=100) == [] for c in pair)


def test_acknowledging_twice_or_an_unknown_record_raises(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    consumers: list[ShareConsumer],
) -> None:
    create(admin, "jobs", 1)
    produce(stub, "jobs", 0, 1)
    consumer = ShareConsumer(server, group="g", topics=["jobs"], start="earliest")
    consumers.append(consumer)
    (record,) = poll_until(consumer, 1)
    with pytest.raises(InvalidArgumentError, match="not held"):
        consumer.ack(record._replace(offset=1))
    with pytest.raises(InvalidArgumentError, match="not held"):
        consumer.ack(record._replace(topic="other"))
    consumer.ack(record)
    with pytest.raises(InvalidArgumentError, match="already accepted"):
        consumer.reject(record)
    assert consumer.commit() == []
    with pytest.raises(InvalidArgumentError, match="not held"):
        consumer.ack(record)  # sent: no longer held


def test_a_closed_member_releases_its_records_to_another(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    consumers: list[ShareConsumer],
) -> None:
    create(admin, "jobs", 2)
    for p in range(2):
        produce(stub, "jobs", p, 5)
    options = {"group": "g", "topics": ["jobs"], "start": "earliest", "retry_backoff_ms": 0}
    first = ShareConsumer(server, **options)  # type: ignore[arg-type]
    second = ShareConsumer(server, **options)  # type: ignore[arg-type]
    consumers.extend([first, second])
    taken = poll_until(first, 10)
    first.ack(taken[0])
    first.close()  # sends the ack, then leaves: the other nine are released
    with pytest.raises(Exception, match="closed"):
        first.poll()
    got = poll_until(second, 9)
    assert keys(got) == keys(taken[1:])
    assert {r.delivery_count for r in got} == {2}


def test_refusals_of_expired_locks_are_reported(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    consumers: list[ShareConsumer],
) -> None:
    create(admin, "slow", 1)
    produce(stub, "slow", 0, 2)
    consumer = ShareConsumer(
        server,
        group="g",
        topics=["slow"],
        start="earliest",
        lock_ms=LOCK_MS_MIN,
        retry_backoff_ms=60_000,  # expired records do not come back during the test
        max_wait_ms=100,
    )
    consumers.append(consumer)
    got = sorted(poll_until(consumer, 2))
    time.sleep(LOCK_MS_MIN / 1000 + 0.1)
    consumer.ack(got[0])
    (failure,) = consumer.commit()
    assert failure == AckFailure("slow", 0, 0, 0, "LOCK_EXPIRED", failure.message)
    consumer.ack(got[1])  # sent with the next poll: the refusal is kept for later
    assert consumer.poll(timeout_ms=0) == []
    (failure,) = consumer.take_ack_failures()
    assert (failure.first_offset, failure.last_offset, failure.name) == (1, 1, "LOCK_EXPIRED")
    assert consumer.take_ack_failures() == []


def test_a_member_the_broker_forgot_rejoins_and_its_acks_fail(
    server: str,
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    share: share_pb2_grpc.ShareStub,
    consumers: list[ShareConsumer],
) -> None:
    create(admin, "jobs", 1)
    produce(stub, "jobs", 0, 2)
    consumer = ShareConsumer(
        server, group="g", topics=["jobs"], start="earliest", retry_backoff_ms=0, max_wait_ms=100
    )
    consumers.append(consumer)
    got = sorted(poll_until(consumer, 2))
    old = consumer.member_id
    share.ShareLeave(share_pb2.ShareLeaveRequest(group_id="g", member_id=old), timeout=WAIT_S)
    consumer.ack(got[0])  # queued under the old membership
    again = sorted(poll_until(consumer, 2))  # refused UNKNOWN_MEMBER, rejoined, fetched again
    assert consumer.member_id not in ("", old)
    assert [(r.offset, r.delivery_count) for r in again] == [(0, 2), (1, 2)]
    (failure,) = consumer.take_ack_failures()
    assert (failure.first_offset, failure.name) == (0, "UNKNOWN_MEMBER")
    with pytest.raises(InvalidArgumentError, match="handed out again"):
        consumer.ack(got[1])  # handed out under the old member id (and again since)
    for r in again:
        consumer.ack(r)
    assert consumer.commit() == []


# ---------------------------------------------------------------------------- request/reply
def test_request_reply_round_trip(
    server: str, admin: admin_pb2_grpc.AdminStub, share: share_pb2_grpc.ShareStub
) -> None:
    create(admin, "requests", 2)
    seen: list[ShareRecord] = []

    def handler(record: ShareRecord) -> bytes:
        seen.append(record)
        return b"echo " + (record.value or b"")

    with (
        Responder(server, topic="requests", group="responders", handler=handler) as responder,
        Requester(server, topic="requests", reply_topic="replies", timeout_s=5.0) as requester,
    ):
        handled: list[int] = []
        serving = threading.Thread(
            target=lambda: handled.append(responder.serve(max_requests=3, timeout_s=WAIT_S))
        )
        serving.start()
        try:
            wait_for_members(share, "responders", 1)  # a new group starts at the log end
            for i in range(3):
                reply = requester.request(b"r%d" % i, headers=[("h", b"v")])
                assert reply.value == b"echo r%d" % i
                assert reply.topic == "replies"
                assert header(reply, CORRELATION_ID_HEADER) == reply.key
            assert requester.outstanding == 0
        finally:
            serving.join(WAIT_S)
        assert handled == [3]
    request = seen[0]
    assert header(request, REPLY_TO_HEADER) == b"replies"
    assert header(request, "h") == b"v"
    assert describe(share, "responders").total_lag == 0


def test_a_failing_handler_releases_the_request(
    server: str, admin: admin_pb2_grpc.AdminStub, share: share_pb2_grpc.ShareStub
) -> None:
    create(admin, "requests", 1)
    deliveries: list[int] = []

    async def handler(record: ShareRecord) -> bytes:
        deliveries.append(record.delivery_count)
        if record.delivery_count == 1:
            raise ValueError("first delivery fails")
        return b"ok"

    async def run() -> Record:
        async with (
            AsyncResponder(server, topic="requests", group="r", handler=handler) as responder,
            AsyncRequester(server, topic="requests", reply_topic="replies") as requester,
        ):
            serving = asyncio.ensure_future(responder.serve(max_requests=2, timeout_s=WAIT_S))
            await asyncio.to_thread(wait_for_members, share, "r", 1)
            reply = await requester.request(b"x", timeout_s=WAIT_S)
            assert await serving == 2
            assert responder.take_ack_failures() == []
            return reply

    reply = asyncio.run(asyncio.wait_for(run(), WAIT_S))
    assert reply.value == b"ok"
    assert deliveries == [1, 2]  # released after the failure, then answered


def test_a_request_without_a_reply_times_out(server: str, admin: admin_pb2_grpc.AdminStub) -> None:
    create(admin, "requests", 1)
    with Requester(server, topic="requests", reply_topic="replies", timeout_s=0.3) as requester:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="no reply"):
            requester.request(b"anyone?")
        assert 0.3 <= time.monotonic() - started < 2
        with pytest.raises(DeadlineExceededError):
            requester.request(b"anyone?", timeout_s=0.1)
        assert requester.outstanding == 0
        with pytest.raises(InvalidArgumentError):
            requester.request(b"x", headers=[(REPLY_TO_HEADER, b"elsewhere")])
