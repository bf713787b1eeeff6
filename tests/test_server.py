"""The gRPC edge against a real server on loopback: every RPC, the status table, and fuzzing.

The server runs in this process (see conftest.py), so tests reach into the broker to check
what was appended and monkeypatch the storage layer to inject faults (disk full).
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import storage
from storage import NewRecord, PartitionLog, Record, decode_records, encode_batch
from storage import _catalog as storage_catalog
from storage import _segment as storage_segment
from stream import _broker
from stream._broker import Broker
from stream._partitioner import partition_for_key
from stream._pb import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc, types_pb2
from stream._serve import RunningBroker

Code = grpc.StatusCode
Start = broker_pb2.StartPosition
Query = broker_pb2.ListOffsetsRequest.Query
# Upper bound on any wait in this file.
WAIT_S = 10.0
# What a client may ever see from a request it got wrong; UNKNOWN and INTERNAL never.
CLIENT_ERRORS = {
    Code.OK,
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.OUT_OF_RANGE,
    Code.RESOURCE_EXHAUSTED,
    Code.ALREADY_EXISTS,
}


@pytest.fixture
def core(running_broker: RunningBroker) -> Broker:
    return running_broker.broker


@pytest.fixture
def stub(channel: grpc.Channel) -> broker_pb2_grpc.BrokerStub:
    return broker_pb2_grpc.BrokerStub(channel)


@pytest.fixture
def admin(channel: grpc.Channel) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(channel)


def as_call(error: grpc.RpcError) -> grpc.Call:
    """grpcio's errors are also Calls (code, details); its type stubs do not say so."""
    assert isinstance(error, grpc.Call)
    assert error.code() != Code.UNKNOWN, error.details()
    return error


def rpc_error(call: Callable[[], object]) -> grpc.Call:
    """The error `call` fails with (it must fail)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return as_call(info.value)


def wait_until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes (for state with no event)."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while time.monotonic() < deadline:
        if condition():
            return True
        pause.wait(0.01)
    return condition()


def batch(*values: bytes, ts: int = 1_000) -> bytes:
    return encode_batch([NewRecord(None, v, ts + i) for i, v in enumerate(values)])


def create(admin: admin_pb2_grpc.AdminStub, name: str, partitions: int = 1, **config: str) -> None:
    admin.CreateTopic(
        admin_pb2.CreateTopicRequest(name=name, partitions=partitions, config=config),
        timeout=WAIT_S,
    )


def produce_batch(
    stub: broker_pb2_grpc.BrokerStub,
    topic: str,
    partition: int,
    payload: bytes,
    acks: broker_pb2.Acks.ValueType = broker_pb2.ACKS_LEADER,
) -> broker_pb2.ProduceResponse:
    entry = broker_pb2.PartitionProduce(topic=topic, partition=partition, record_batch=payload)
    return stub.Produce(broker_pb2.ProduceRequest(partitions=[entry], acks=acks), timeout=WAIT_S)


def fetch_records(
    stub: broker_pb2_grpc.BrokerStub, topic: str, partition: int, offset: int = 0
) -> list[Record]:
    """Every record from `offset` to the log end, in as many fetches as it takes."""
    out: list[Record] = []
    for _ in range(1000):
        request = broker_pb2.FetchRequest(
            partitions=[broker_pb2.FetchPartition(topic=topic, partition=partition, offset=offset)]
        )
        [result] = stub.Fetch(request, timeout=WAIT_S).results
        if not result.record_batches:
            return out
        records = [r for r in decode_records(result.record_batches) if r.offset >= offset]
        out.extend(records)
        offset = records[-1].offset + 1
    raise AssertionError("fetch loop did not reach the log end")


def log_end(core: Broker, topic: str, partition: int = 0) -> int:
    return core.describe_topic(topic).partitions[partition].log_end_offset


# ---------------------------------------------------------------------------- admin
def test_admin_rpcs(admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub) -> None:
    created = admin.CreateTopic(
        admin_pb2.CreateTopicRequest(name="orders", partitions=3, config={"segment_bytes": "1024"}),
        timeout=WAIT_S,
    )
    assert created.name == "orders"
    assert len(created.topic_id) == 32
    assert dict(created.config) == {"segment_bytes": "1024"}
    assert [p.partition for p in created.partitions] == [0, 1, 2]
    assert all(p.segment_count == 1 and p.log_end_offset == 0 for p in created.partitions)
    create(admin, "audit")
    listed = admin.ListTopics(admin_pb2.ListTopicsRequest(), timeout=WAIT_S)
    assert [(t.name, t.partitions) for t in listed.topics] == [("audit", 1), ("orders", 3)]

    for _ in range(8):
        produce_batch(stub, "orders", 1, batch(b"v" * 300))
    described = admin.DescribeTopic(admin_pb2.DescribeTopicRequest(name="orders"), timeout=WAIT_S)
    assert described.topic_id == created.topic_id
    p1 = described.partitions[1]
    assert (p1.log_start_offset, p1.log_end_offset) == (0, 8)
    assert p1.size_bytes == 8 * len(batch(b"v" * 300))
    assert p1.segment_count >= 3  # 1 KiB segments hold two or three of these batches
    assert described.partitions[0].size_bytes == 0

    grown = admin.AddPartitions(admin_pb2.AddPartitionsRequest(name="orders", partitions=5))
    assert [p.partition for p in grown.partitions] == [0, 1, 2, 3, 4]
    assert grown.partitions[1].log_end_offset == 8
    err = rpc_error(
        lambda: admin.AddPartitions(admin_pb2.AddPartitionsRequest(name="orders", partitions=2))
    )
    assert err.code() == Code.INVALID_ARGUMENT
    assert "5" in (err.details() or "")

    admin.DeleteTopic(admin_pb2.DeleteTopicRequest(name="orders"), timeout=WAIT_S)
    listed = admin.ListTopics(admin_pb2.ListTopicsRequest(), timeout=WAIT_S)
    assert [t.name for t in listed.topics] == ["audit"]
    for call in (
        lambda: admin.DescribeTopic(admin_pb2.DescribeTopicRequest(name="orders")),
        lambda: admin.DeleteTopic(admin_pb2.DeleteTopicRequest(name="orders")),
        lambda: admin.AddPartitions(admin_pb2.AddPartitionsRequest(name="orders", partitions=9)),
    ):
        assert rpc_error(call).code() == Code.NOT_FOUND


# ---------------------------------------------------------------------------- produce
def test_produce_fast_path(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t", 2)
    before_ms = time.time_ns() // 1_000_000
    response = stub.Produce(
        broker_pb2.ProduceRequest(
            correlation_id=77,
            partitions=[
                broker_pb2.PartitionProduce(topic="t", partition=0, record_batch=batch(b"a", b"b")),
                broker_pb2.PartitionProduce(topic="t", partition=1, record_batch=batch(b"c")),
                broker_pb2.PartitionProduce(
                    topic="t", partition=0, record_batch=batch(b"d") + batch(b"e", b"f")
                ),
            ],
        ),
        timeout=WAIT_S,
    )
    assert response.correlation_id == 77
    got = [(r.topic, r.partition, r.base_offset, r.last_offset) for r in response.results]
    assert got == [("t", 0, 0, 1), ("t", 1, 0, 0), ("t", 0, 2, 4)]
    assert all(not r.HasField("error") or r.error.code == 0 for r in response.results)
    assert all(r.log_append_time_ms >= before_ms for r in response.results)
    records = fetch_records(stub, "t", 0)
    assert [(r.offset, r.value) for r in records] == list(enumerate([b"a", b"b", b"d", b"e", b"f"]))
    # acks NONE on the unary call: appended, but no offsets in the answer.
    quiet = produce_batch(stub, "t", 1, batch(b"q"), acks=broker_pb2.ACKS_NONE)
    assert (quiet.results[0].base_offset, quiet.results[0].last_offset) == (-1, -1)
    assert [r.value for r in fetch_records(stub, "t", 1)] == [b"c", b"q"]


def test_produce_convenience_path(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t", 4)
    before_ms = time.time_ns() // 1_000_000
    pinned = broker_pb2.PartitionProduce(
        topic="t",
        partition=2,
        records=[
            types_pb2.Record(
                key=b"k",
                value=b"v",
                timestamp_ms=123,
                headers=[
                    types_pb2.Header(key="h", value=b"hv"),
                    types_pb2.Header(key="null"),
                ],
            ),
            types_pb2.Record(value=b"no-key-no-time"),
            types_pb2.Record(key=b""),  # an empty key and a null value
        ],
    )
    [result] = stub.Produce(broker_pb2.ProduceRequest(partitions=[pinned]), timeout=WAIT_S).results
    after_ms = time.time_ns() // 1_000_000
    assert (result.partition, result.base_offset, result.last_offset) == (2, 0, 2)
    first, second, third = fetch_records(stub, "t", 2)
    assert (first.key, first.value, first.timestamp_ms) == (b"k", b"v", 123)
    assert list(first.headers) == [("h", b"hv"), ("null", None)]
    assert (second.key, second.value) == (None, b"no-key-no-time")
    assert before_ms <= second.timestamp_ms <= after_ms  # absent: the broker's time
    assert (third.key, third.value) == (b"", None)

    # No partition: keyed records by murmur2, the keyless ones of the entry to one partition.
    keys = [f"user-{i}".encode() for i in range(20)]
    keyed = broker_pb2.PartitionProduce(
        topic="t", records=[types_pb2.Record(key=k, value=k) for k in keys]
    )
    results = stub.Produce(broker_pb2.ProduceRequest(partitions=[keyed]), timeout=WAIT_S).results
    counts = {r.partition: r.last_offset - r.base_offset + 1 for r in results}
    expected: dict[int, int] = {}
    for k in keys:
        expected[partition_for_key(k, 4)] = expected.get(partition_for_key(k, 4), 0) + 1
    assert counts == expected
    for p in range(4):
        stored = [r.key for r in fetch_records(stub, "t", p) if r.key in keys]
        assert stored == [k for k in keys if partition_for_key(k, 4) == p]
    keyless = broker_pb2.PartitionProduce(
        topic="t", records=[types_pb2.Record(value=b"%d" % i) for i in range(5)]
    )
    [one] = stub.Produce(broker_pb2.ProduceRequest(partitions=[keyless]), timeout=WAIT_S).results
    assert one.last_offset - one.base_offset == 4


def test_produce_record_timestamps(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub, core: Broker
) -> None:
    create(admin, "t")
    extremes = [0, 2**63 - 1, 1, 2**62]  # deltas of either sign still fit a varlong
    entry = broker_pb2.PartitionProduce(
        topic="t", partition=0, records=[types_pb2.Record(timestamp_ms=ts) for ts in extremes]
    )
    stub.Produce(broker_pb2.ProduceRequest(partitions=[entry]), timeout=WAIT_S)
    assert [r.timestamp_ms for r in fetch_records(stub, "t", 0)] == extremes
    for bad in (-1, -(2**63)):
        records = [types_pb2.Record(timestamp_ms=2**63 - 1), types_pb2.Record(timestamp_ms=bad)]
        entry = broker_pb2.PartitionProduce(topic="t", partition=0, records=records)
        request = broker_pb2.ProduceRequest(partitions=[entry])
        err = rpc_error(lambda r=request: stub.Produce(r, timeout=WAIT_S))  # type: ignore[misc]
        assert err.code() == Code.INVALID_ARGUMENT
        assert f"timestamp {bad} is negative" in (err.details() or "")
    assert log_end(core, "t") == 4


def test_produce_request_shape_errors(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t")
    both = broker_pb2.PartitionProduce(
        topic="t", partition=0, record_batch=batch(b"x"), records=[types_pb2.Record()]
    )
    no_partition = broker_pb2.PartitionProduce(topic="t", record_batch=batch(b"x"))
    empty = broker_pb2.PartitionProduce(topic="t", partition=0)
    for entries in ([both], [no_partition], [empty], []):
        request = broker_pb2.ProduceRequest(partitions=entries)
        err = rpc_error(lambda r=request: stub.Produce(r, timeout=WAIT_S))  # type: ignore[misc]
        assert err.code() == Code.INVALID_ARGUMENT


def test_produce_stream_pipelines_in_order(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub, core: Broker
) -> None:
    create(admin, "t", 1)
    requests: list[broker_pb2.ProduceRequest] = []
    expected: list[tuple[int, int]] = []  # (correlation id, base offset or -1 for an error)
    offset = 0
    for i in range(200):
        quiet = i % 7 == 3
        failing = i in (50, 51, 120)
        entry = broker_pb2.PartitionProduce(
            topic="t", partition=9 if failing else 0, record_batch=batch(b"%d" % i)
        )
        acks = broker_pb2.ACKS_NONE if quiet else broker_pb2.ACKS_LEADER
        requests.append(
            broker_pb2.ProduceRequest(partitions=[entry], acks=acks, correlation_id=1000 + i)
        )
        if not quiet:
            expected.append((1000 + i, -1 if failing else offset))
        if not failing:
            offset += 1
    answers = list(stub.ProduceStream(iter(requests), timeout=30))
    got = [(a.correlation_id, a.results[0].base_offset) for a in answers]
    assert got == expected
    for a in answers:
        [result] = a.results
        if result.base_offset == -1:
            assert result.error.code == Code.NOT_FOUND.value[0]
            assert "partition 9" in result.error.message
        else:
            assert result.error.code == 0
            assert result.last_offset == result.base_offset
    assert log_end(core, "t") == offset
    values = [r.value for r in fetch_records(stub, "t", 0)]
    assert values == [b"%d" % i for i in range(200) if i not in (50, 51, 120)]


def test_produce_acks_all_fsyncs(
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    create(admin, "t")
    flushes: list[str] = []
    original = PartitionLog.flush

    def flush(self: PartitionLog, now_ms: int | None = None) -> None:
        flushes.append(self.directory)
        original(self, now_ms)

    monkeypatch.setattr(PartitionLog, "flush", flush)
    produce_batch(stub, "t", 0, batch(b"fast"))
    assert flushes == []
    response = produce_batch(stub, "t", 0, batch(b"durable"), acks=broker_pb2.ACKS_ALL)
    assert response.results[0].base_offset == 1
    assert len(flushes) == 1


# ---------------------------------------------------------------------------- fetch
def test_fetch_long_poll_wakes_over_the_wire(
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    monkeypatch: pytest.MonkeyPatch,
    reader_waiting: threading.Event,
) -> None:
    monkeypatch.setattr(_broker, "SUBSCRIBE_IDLE_CHECK_S", 60.0)
    create(admin, "t")
    request = broker_pb2.FetchRequest(
        partitions=[broker_pb2.FetchPartition(topic="t", partition=0, offset=0)],
        max_wait_ms=3000,
    )
    started = time.monotonic()
    future = stub.Fetch.future(request, timeout=WAIT_S)
    assert reader_waiting.wait(WAIT_S)
    produce_batch(stub, "t", 0, batch(b"wake"))
    [result] = future.result(timeout=WAIT_S).results
    assert time.monotonic() - started < 2.0  # woken, well before the 3 s wait
    assert [r.value for r in decode_records(result.record_batches)] == [b"wake"]
    assert (result.high_watermark, result.log_start_offset) == (1, 0)


def test_fetch_waits_out_max_wait_when_empty(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t")
    request = broker_pb2.FetchRequest(
        partitions=[broker_pb2.FetchPartition(topic="t", partition=0, offset=0)],
        max_wait_ms=100,
    )
    started = time.monotonic()
    [result] = stub.Fetch(request, timeout=WAIT_S).results
    assert 0.09 <= time.monotonic() - started < 2.0
    assert result.record_batches == b""
    assert result.high_watermark == 0


# ---------------------------------------------------------------------------- subscribe
def subscribe(
    stub: broker_pb2_grpc.BrokerStub, topic: str, **fields: Any
) -> list[broker_pb2.SubscribeResponse]:
    request = broker_pb2.SubscribeRequest(topic=topic, **fields)
    return list(stub.Subscribe(request, timeout=WAIT_S))


def offsets_from(chunks: list[broker_pb2.SubscribeResponse], start: int) -> list[int]:
    return [r.offset for c in chunks for r in decode_records(c.record_batches) if r.offset >= start]


def test_subscribe_start_kinds(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t", 2, segment_bytes="1024")
    for i in range(10):  # offsets 2i, 2i+1 at 5000 + 100i, 5001 + 100i
        produce_batch(stub, "t", 0, batch(b"%d" % i + b"." * 200, b"x", ts=5000 + 100 * i))
    produce_batch(stub, "t", 1, batch(b"other"))
    chunks = subscribe(stub, "t", start=Start(earliest=Start.Earliest()), stop_at_end=True)
    assert {c.partition for c in chunks} == {0, 1}
    assert offsets_from([c for c in chunks if c.partition == 0], 0) == list(range(20))
    last = [c for c in chunks if c.partition == 0][-1]
    assert (last.next_offset, last.high_watermark, last.log_start_offset) == (20, 20, 0)

    latest = subscribe(stub, "t", start=Start(latest=Start.Latest()), stop_at_end=True)
    assert latest == []  # ends at once: nothing after the end

    ranged = subscribe(stub, "t", partitions=[0], start=Start(offset=5), stop_offset=9)
    got = offsets_from(ranged, 5)
    assert [o for o in got if o < 9] == [5, 6, 7, 8]

    timed = subscribe(stub, "t", partitions=[0], start=Start(timestamp_ms=5301), stop_at_end=True)
    assert offsets_from(timed, 7) == list(range(7, 20))


def test_subscribe_live(
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    core: Broker,
    reader_waiting: threading.Event,
) -> None:
    create(admin, "t")
    produce_batch(stub, "t", 0, batch(b"before"))
    call = stub.Subscribe(
        broker_pb2.SubscribeRequest(topic="t", start=Start(latest=Start.Latest())), timeout=WAIT_S
    )
    assert reader_waiting.wait(WAIT_S)
    produce_batch(stub, "t", 0, batch(b"after"))
    chunk = next(call)
    assert (chunk.partition, chunk.next_offset, chunk.high_watermark) == (0, 2, 2)
    assert [r.value for r in decode_records(chunk.record_batches)] == [b"after"]
    call.cancel()
    assert wait_until(lambda: core._subscribers == 0)


def test_cancelled_subscribe_frees_its_slot(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub, core: Broker
) -> None:
    create(admin, "t")
    request = broker_pb2.SubscribeRequest(topic="t", start=Start(latest=Start.Latest()))
    calls = [stub.Subscribe(request, timeout=30) for _ in range(3)]
    assert wait_until(lambda: core._subscribers == 3)
    for call in calls:
        call.cancel()
    assert wait_until(lambda: core._subscribers == 0)
    # The server still serves, and subscribes again.
    produce_batch(stub, "t", 0, batch(b"x"))
    again = subscribe(stub, "t", start=Start(earliest=Start.Earliest()), stop_at_end=True)
    assert offsets_from(again, 0) == [0]


# ---------------------------------------------------------------------------- list offsets
def test_list_offsets(admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub) -> None:
    create(admin, "t", 2)
    produce_batch(stub, "t", 0, batch(b"a", b"b", ts=1000))
    produce_batch(stub, "t", 0, batch(b"c", ts=2000))
    response = stub.ListOffsets(
        broker_pb2.ListOffsetsRequest(
            queries=[
                Query(topic="t", partition=0, earliest=True),
                Query(topic="t", partition=0, latest=True),
                Query(topic="t", partition=0, timestamp_ms=1001),
                Query(topic="t", partition=0, timestamp_ms=1500),
                Query(topic="t", partition=0, timestamp_ms=9999),
                Query(topic="t", partition=1, latest=True),
                Query(topic="t", partition=5, latest=True),
            ]
        ),
        timeout=WAIT_S,
    )
    r = response.results
    assert [x.offset if x.HasField("offset") else None for x in r] == [0, 3, 1, 2, None, 0, None]
    assert [(x.log_start_offset, x.log_end_offset) for x in r[:5]] == [(0, 3)] * 5
    assert r[6].error.code == Code.NOT_FOUND.value[0]
    assert "partition 5" in r[6].error.message
    assert all(x.error.code == 0 for x in r[:6])
    # Every query failing fails the call; a query without a spec is refused.
    only_bad = broker_pb2.ListOffsetsRequest(
        queries=[Query(topic="nope", partition=0, latest=True)]
    )
    assert rpc_error(lambda: stub.ListOffsets(only_bad)).code() == Code.NOT_FOUND
    no_spec = broker_pb2.ListOffsetsRequest(queries=[Query(topic="t", partition=0)])
    assert rpc_error(lambda: stub.ListOffsets(no_spec)).code() == Code.INVALID_ARGUMENT


# ---------------------------------------------------------------------------- health, reflection
def test_health_check_serving(channel: grpc.Channel) -> None:
    health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' types omit its methods
    for service in ("", "riverlog.v1.Broker", "riverlog.v1.Admin"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_S)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(channel: grpc.Channel) -> None:
    reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # typed Incomplete
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    [response] = list(reflection.ServerReflectionInfo(iter([request]), timeout=WAIT_S))
    names = {s.name for s in response.list_services_response.service}
    assert {"riverlog.v1.Broker", "riverlog.v1.Admin", "grpc.health.v1.Health"} <= names


# ---------------------------------------------------------------------------- status table
def raw_status(channel: grpc.Channel, method: str, payload: bytes) -> tuple[Code, str]:
    """Call `method` with `payload` as the request bytes, no serializer in between."""
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
    try:
        call(payload, timeout=WAIT_S)
    except grpc.RpcError as e:
        err = as_call(e)
        return err.code(), err.details() or ""
    return Code.OK, ""


@pytest.mark.parametrize(
    "method",
    [
        "/riverlog.v1.Broker/Produce",
        "/riverlog.v1.Broker/Fetch",
        "/riverlog.v1.Broker/ListOffsets",
        "/riverlog.v1.Admin/CreateTopic",
        "/riverlog.v1.Admin/DescribeTopic",
    ],
)
@pytest.mark.parametrize("payload", [b"\xff", b"\x0a\xff\xff", b"\x0a\x05ab", b"\x0b"])
def test_undecodable_request_is_invalid_argument(
    channel: grpc.Channel, method: str, payload: bytes
) -> None:
    code, details = raw_status(channel, method, payload)
    assert code == Code.INVALID_ARGUMENT
    assert "undecodable" in details


def test_unknown_topic_and_partition_are_not_found(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t", 2)
    calls: list[Callable[[], object]] = [
        lambda: produce_batch(stub, "nope", 0, batch(b"x")),
        lambda: produce_batch(stub, "t", 2, batch(b"x")),
        lambda: stub.Produce(
            broker_pb2.ProduceRequest(
                partitions=[broker_pb2.PartitionProduce(topic="nope", records=[types_pb2.Record()])]
            )
        ),
        lambda: stub.Fetch(
            broker_pb2.FetchRequest(partitions=[broker_pb2.FetchPartition(topic="nope")])
        ),
        lambda: stub.Fetch(
            broker_pb2.FetchRequest(partitions=[broker_pb2.FetchPartition(topic="t", partition=-1)])
        ),
        lambda: subscribe(stub, "nope", start=Start(earliest=Start.Earliest())),
        lambda: subscribe(stub, "t", partitions=[3], start=Start(earliest=Start.Earliest())),
        lambda: admin.DescribeTopic(admin_pb2.DescribeTopicRequest(name="nope")),
    ]
    for call in calls:
        err = rpc_error(call)
        assert err.code() == Code.NOT_FOUND, err.details()


def test_bad_topic_requests(admin: admin_pb2_grpc.AdminStub) -> None:
    create(admin, "t")
    cases: list[tuple[admin_pb2.CreateTopicRequest, Code, str]] = [
        (admin_pb2.CreateTopicRequest(name="a/b", partitions=1), Code.INVALID_ARGUMENT, "a/b"),
        (admin_pb2.CreateTopicRequest(name="..", partitions=1), Code.INVALID_ARGUMENT, ".."),
        (admin_pb2.CreateTopicRequest(name="", partitions=1), Code.INVALID_ARGUMENT, "name"),
        (admin_pb2.CreateTopicRequest(name="x", partitions=0), Code.INVALID_ARGUMENT, "0"),
        (admin_pb2.CreateTopicRequest(name="x", partitions=-3), Code.INVALID_ARGUMENT, "-3"),
        (admin_pb2.CreateTopicRequest(name="x", partitions=1025), Code.RESOURCE_EXHAUSTED, "1024"),
        (
            admin_pb2.CreateTopicRequest(name="x", partitions=1, config={"bogus": "1"}),
            Code.INVALID_ARGUMENT,
            "bogus",
        ),
        (
            admin_pb2.CreateTopicRequest(name="x", partitions=1, config={"segment_bytes": "1"}),
            Code.INVALID_ARGUMENT,
            "segment_bytes",
        ),
        (
            admin_pb2.CreateTopicRequest(name="x", partitions=1, config={"fsync": "sometimes"}),
            Code.INVALID_ARGUMENT,
            "fsync",
        ),
        (admin_pb2.CreateTopicRequest(name="t", partitions=1), Code.ALREADY_EXISTS, "t"),
    ]
    for request, code, needle in cases:
        err = rpc_error(lambda r=request: admin.CreateTopic(r))  # type: ignore[misc]
        assert err.code() == code, (request, err.details())
        assert needle in (err.details() or "")
    listed = admin.ListTopics(admin_pb2.ListTopicsRequest())
    assert [t.name for t in listed.topics] == ["t"]


def _corrupt(payload: bytes, at: int, value: int) -> bytes:
    out = bytearray(payload)
    out[at] = value
    return bytes(out)


def test_corrupt_batch_is_invalid_argument_and_not_appended(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub, core: Broker
) -> None:
    create(admin, "t", 2)
    good = batch(b"hello", b"world")
    produce_batch(stub, "t", 0, good)
    cases = [
        (_corrupt(good, len(good) - 1, good[-1] ^ 0xFF), "CRC32C"),  # a flipped record byte
        (_corrupt(good, 16, 1), "magic"),  # magic 1 instead of 2
        (good[:-3], "truncated"),  # batch length says more than was sent
        (good[:40], "header"),  # not even a whole header
        (good + good[:30], "truncated"),  # a good batch, then a torn one: all or nothing
        (good[:8] + b"\x00\x00\x00\x05" + good[12:], "length"),  # batchLength below minimum
    ]
    for payload, needle in cases:
        err = rpc_error(lambda p=payload: produce_batch(stub, "t", 0, p))  # type: ignore[misc]
        assert err.code() == Code.INVALID_ARGUMENT
        assert needle in (err.details() or ""), err.details()
        assert log_end(core, "t") == 2
    # Several entries: one bad entry refuses the request, nothing of it is appended.
    mixed = broker_pb2.ProduceRequest(
        partitions=[
            broker_pb2.PartitionProduce(topic="t", partition=1, record_batch=good),
            broker_pb2.PartitionProduce(topic="t", partition=0, record_batch=cases[0][0]),
        ]
    )
    err = rpc_error(lambda: stub.Produce(mixed, timeout=WAIT_S))
    assert err.code() == Code.INVALID_ARGUMENT
    assert (log_end(core, "t", 0), log_end(core, "t", 1)) == (2, 0)


def test_multi_entry_produce_is_validated_whole(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub, core: Broker
) -> None:
    create(admin, "t", 2)
    create(admin, "small", batch_bytes_max="1024")
    good = broker_pb2.PartitionProduce(topic="t", partition=0, record_batch=batch(b"ok"))
    records = broker_pb2.PartitionProduce(
        topic="t", partition=1, records=[types_pb2.Record(value=b"r")]
    )
    bad_entries = [
        (broker_pb2.PartitionProduce(topic="t", partition=2, record_batch=batch(b"x")), "NOT"),
        (broker_pb2.PartitionProduce(topic="nope", records=[types_pb2.Record()]), "NOT"),
        (
            broker_pb2.PartitionProduce(
                topic="small", partition=0, record_batch=batch(b"x" * 2000)
            ),
            "RES",
        ),
    ]
    for bad, code in bad_entries:
        request = broker_pb2.ProduceRequest(partitions=[good, records, bad])
        err = rpc_error(lambda r=request: stub.Produce(r, timeout=WAIT_S))  # type: ignore[misc]
        assert err.code().name.startswith(code), err.details()
        assert [log_end(core, "t", p) for p in (0, 1)] == [0, 0]
        assert log_end(core, "small") == 0
    # All good: every entry appended, results in request order.
    ok = stub.Produce(broker_pb2.ProduceRequest(partitions=[good, records, good]), timeout=WAIT_S)
    assert [(r.partition, r.base_offset) for r in ok.results] == [(0, 0), (1, 0), (0, 1)]


def test_oversized_batch_is_resource_exhausted(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub, core: Broker
) -> None:
    create(admin, "small", batch_bytes_max="1024")
    produce_batch(stub, "small", 0, batch(b"s" * 500))
    err = rpc_error(lambda: produce_batch(stub, "small", 0, batch(b"b" * 2000)))
    assert err.code() == Code.RESOURCE_EXHAUSTED
    assert "batch_bytes_max 1024" in (err.details() or "")
    assert log_end(core, "small") == 1
    # The convenience path encodes one batch: the same limit applies.
    big = broker_pb2.PartitionProduce(
        topic="small", partition=0, records=[types_pb2.Record(value=b"c" * 2000)]
    )
    err = rpc_error(lambda: stub.Produce(broker_pb2.ProduceRequest(partitions=[big])))
    assert err.code() == Code.RESOURCE_EXHAUSTED
    assert log_end(core, "small") == 1


def test_disk_full_is_resource_exhausted_and_the_broker_keeps_serving(
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    core: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    create(admin, "t")
    produce_batch(stub, "t", 0, batch(b"before"))
    size_before = core.describe_topic("t").partitions[0].size_bytes

    def no_space(fd: int, buffers: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_segment.os, "pwritev", no_space)  # type: ignore[attr-defined]
    for _ in range(3):
        err = rpc_error(lambda: produce_batch(stub, "t", 0, batch(b"lost")))
        assert err.code() == Code.RESOURCE_EXHAUSTED
        assert "no space left on device" in (err.details() or "")
    described = core.describe_topic("t").partitions[0]
    assert (described.log_end_offset, described.size_bytes) == (1, size_before)
    monkeypatch.undo()
    assert produce_batch(stub, "t", 0, batch(b"after")).results[0].base_offset == 1
    assert [r.value for r in fetch_records(stub, "t", 0)] == [b"before", b"after"]


def test_fetch_out_of_range_names_both_bounds(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t")
    produce_batch(stub, "t", 0, batch(b"a", b"b", b"c"))
    request = broker_pb2.FetchRequest(
        partitions=[broker_pb2.FetchPartition(topic="t", partition=0, offset=42)],
        max_wait_ms=5000,
    )
    started = time.monotonic()
    err = rpc_error(lambda: stub.Fetch(request, timeout=WAIT_S))
    assert time.monotonic() - started < 2.0
    assert err.code() == Code.OUT_OF_RANGE
    details = err.details() or ""
    assert "42" in details
    assert "log start offset 0" in details
    assert "log end offset 3" in details
    err = rpc_error(lambda: subscribe(stub, "t", start=Start(offset=4)))
    assert err.code() == Code.OUT_OF_RANGE


def test_fetch_request_limits(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t")
    part = broker_pb2.FetchPartition(topic="t", partition=0)
    cases = [
        (broker_pb2.FetchRequest(), Code.INVALID_ARGUMENT),
        (broker_pb2.FetchRequest(partitions=[part], max_wait_ms=-1), Code.INVALID_ARGUMENT),
        (broker_pb2.FetchRequest(partitions=[part], max_wait_ms=30_001), Code.INVALID_ARGUMENT),
        (broker_pb2.FetchRequest(partitions=[part], max_bytes=-5), Code.RESOURCE_EXHAUSTED),
    ]
    for request, code in cases:
        assert rpc_error(lambda r=request: stub.Fetch(r)).code() == code  # type: ignore[misc]


def test_subscribe_without_start_is_invalid_argument(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub
) -> None:
    create(admin, "t")
    err = rpc_error(lambda: subscribe(stub, "t", stop_at_end=True))
    assert err.code() == Code.INVALID_ARGUMENT
    assert "start is required" in (err.details() or "")


def test_expired_deadline_on_long_poll(
    admin: admin_pb2_grpc.AdminStub, stub: broker_pb2_grpc.BrokerStub, core: Broker
) -> None:
    create(admin, "t")
    request = broker_pb2.FetchRequest(
        partitions=[broker_pb2.FetchPartition(topic="t", partition=0, offset=0)],
        max_wait_ms=5000,
    )
    started = time.monotonic()
    err = rpc_error(lambda: stub.Fetch(request, timeout=0.2))
    assert err.code() == Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0
    # The server notices the caller left and stops waiting for it.
    partition = core._topic("t").partitions[0]
    assert wait_until(lambda: not partition._waiters)
    assert produce_batch(stub, "t", 0, batch(b"x")).results[0].base_offset == 0
    assert [r.value for r in fetch_records(stub, "t", 0)] == [b"x"]


# ---------------------------------------------------------------------------- fuzz
UNARY_METHODS = [
    "/riverlog.v1.Broker/Produce",
    "/riverlog.v1.Broker/Fetch",
    "/riverlog.v1.Broker/ListOffsets",
    "/riverlog.v1.Admin/CreateTopic",
    "/riverlog.v1.Admin/DeleteTopic",
    "/riverlog.v1.Admin/ListTopics",
    "/riverlog.v1.Admin/DescribeTopic",
    "/riverlog.v1.Admin/AddPartitions",
]
FUZZ_TOPIC = "fuzz-target-topic"


@pytest.fixture
def fuzz_ready(
    admin: admin_pb2_grpc.AdminStub,
    stub: broker_pb2_grpc.BrokerStub,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[None]:
    # Arbitrary CreateTopic bytes may ask for up to 1024 partitions: keep each one cheap.
    monkeypatch.setattr(storage_catalog, "PARTITIONS_MAX", 4)
    create(admin, FUZZ_TOPIC, 2)
    produce_batch(stub, FUZZ_TOPIC, 0, batch(b"seed"))
    yield
    # Afterwards the broker still serves a valid produce and fetch.
    result = produce_batch(stub, FUZZ_TOPIC, 0, batch(b"after-fuzz")).results[0]
    assert result.base_offset >= 1
    assert fetch_records(stub, FUZZ_TOPIC, 0, result.base_offset)[0].value == b"after-fuzz"


@pytest.mark.parametrize("method", UNARY_METHODS)
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=st.binary(max_size=200))
def test_fuzz_arbitrary_request_bytes(
    channel: grpc.Channel, fuzz_ready: None, method: str, payload: bytes
) -> None:
    code, details = raw_status(channel, method, payload)
    assert code in CLIENT_ERRORS, (code, details)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=st.binary(max_size=300))
def test_fuzz_arbitrary_batch_bytes(
    channel: grpc.Channel, core: Broker, fuzz_ready: None, payload: bytes
) -> None:
    before = log_end(core, FUZZ_TOPIC, 1)
    entry = broker_pb2.PartitionProduce(topic=FUZZ_TOPIC, partition=1, record_batch=payload)
    request = broker_pb2.ProduceRequest(partitions=[entry])
    code, details = raw_status(channel, "/riverlog.v1.Broker/Produce", request.SerializeToString())
    if code == Code.OK:
        storage.split_batches(payload)  # accepted: it really is a valid batch
    else:
        assert code in (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED), details
        assert log_end(core, FUZZ_TOPIC, 1) == before


# Structured fuzzing: well-formed messages with arbitrary field values reach the broker's logic
# (random bytes mostly stop at the decoder).
# Each strategy leans towards values that exist (the fuzz topic, partitions 0 and 1, small
# offsets) so that requests get past the lookups, and keeps the extremes.
_int32 = st.one_of(st.integers(0, 1), st.integers(-2, 5), st.integers(-(2**31), 2**31 - 1))
_int64 = st.one_of(st.integers(0, 3), st.integers(-2, 5), st.integers(-(2**63), 2**63 - 1))
_topic = st.one_of(
    st.just(FUZZ_TOPIC),
    st.just(FUZZ_TOPIC),
    st.sampled_from(["nope", "", ".", "a/b"]),
    st.text(alphabet="ab.-_/é", max_size=4),
)
# Long valid waits would only slow the fuzz down; the bounds themselves are fuzzed.
_wait_ms = st.one_of(
    st.just(0), st.just(5), st.integers(-(2**31), -1), st.integers(30_001, 2**31 - 1)
)
_config_key = st.sampled_from(
    ["segment_bytes", "segment_ms", "retention_ms", "retention_bytes", "index_interval_bytes",
     "index_bytes_max", "fsync", "fsync_interval_ms", "batch_bytes_max", "bogus"]
)  # fmt: skip
_config_value = st.one_of(
    st.sampled_from(["none", "always", "interval", "1", "24", "61", "1024", "-1", "1_0", "9" * 30]),
    st.text(max_size=6),
)
_record = st.builds(
    types_pb2.Record,
    key=st.one_of(st.none(), st.binary(max_size=8)),
    value=st.one_of(st.none(), st.binary(max_size=8)),
    timestamp_ms=st.one_of(st.none(), _int64),
    headers=st.lists(
        st.builds(types_pb2.Header, key=st.text(max_size=4), value=st.binary(max_size=4)),
        max_size=2,
    ),
)
_batch_bytes = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda n: batch(*[b"f"] * n), st.integers(1, 3)),
)


@st.composite
def _partition_produce(draw: st.DrawFn) -> broker_pb2.PartitionProduce:
    entry = broker_pb2.PartitionProduce(topic=draw(_topic))
    if draw(st.booleans()):
        entry.partition = draw(_int32)
    carries = draw(st.sampled_from(["batch", "batch", "records", "records", "both", "neither"]))
    if carries in ("batch", "both"):
        entry.record_batch = draw(_batch_bytes)
    if carries in ("records", "both"):
        entry.records.extend(draw(st.lists(_record, max_size=3)))
    return entry


_requests = st.one_of(
    st.tuples(
        st.just("/riverlog.v1.Broker/Produce"),
        st.builds(
            broker_pb2.ProduceRequest,
            partitions=st.lists(_partition_produce(), max_size=2),
            acks=st.integers(0, 5),
            correlation_id=st.integers(0, 2**64 - 1),
        ),
    ),
    st.tuples(
        st.just("/riverlog.v1.Broker/Fetch"),
        st.builds(
            broker_pb2.FetchRequest,
            partitions=st.lists(
                st.builds(
                    broker_pb2.FetchPartition,
                    topic=_topic,
                    partition=_int32,
                    offset=_int64,
                    max_bytes=_int32,
                ),
                max_size=3,
            ),
            max_wait_ms=_wait_ms,
            min_bytes=_int32,
            max_bytes=_int32,
        ),
    ),
    st.tuples(
        st.just("/riverlog.v1.Broker/ListOffsets"),
        st.builds(
            broker_pb2.ListOffsetsRequest,
            queries=st.lists(
                st.one_of(
                    st.builds(Query, topic=_topic, partition=_int32, earliest=st.booleans()),
                    st.builds(Query, topic=_topic, partition=_int32, latest=st.booleans()),
                    st.builds(Query, topic=_topic, partition=_int32, timestamp_ms=_int64),
                    st.builds(Query, topic=_topic, partition=_int32),
                ),
                max_size=3,
            ),
        ),
    ),
    st.tuples(
        st.just("/riverlog.v1.Admin/CreateTopic"),
        st.builds(
            admin_pb2.CreateTopicRequest,
            name=_topic,
            partitions=_int32,
            config=st.dictionaries(_config_key, _config_value, max_size=3),
        ),
    ),
    st.tuples(
        st.just("/riverlog.v1.Admin/AddPartitions"),
        st.builds(admin_pb2.AddPartitionsRequest, name=_topic, partitions=_int32),
    ),
    st.tuples(
        st.just("/riverlog.v1.Admin/DescribeTopic"),
        st.builds(admin_pb2.DescribeTopicRequest, name=_topic),
    ),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(request=_requests)
def test_fuzz_structured_requests(
    channel: grpc.Channel, fuzz_ready: None, request: tuple[str, Any]
) -> None:
    method, message = request
    code, details = raw_status(channel, method, message.SerializeToString())
    event(f"{method.rsplit('/', 1)[1]}: {code.name}")
    assert code in CLIENT_ERRORS, (code, details)


_start = st.one_of(
    st.builds(Start, earliest=st.just(Start.Earliest())),
    st.builds(Start, latest=st.just(Start.Latest())),
    st.builds(Start, offset=_int64),
    st.builds(Start, timestamp_ms=_int64),
    st.just(Start()),
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    topic=_topic,
    partitions=st.lists(_int32, max_size=3),
    start=_start,
    stop_offset=st.one_of(st.none(), st.integers(-(2**63), 0)),
    max_bytes=_int32,
)
def test_fuzz_subscribe(
    stub: broker_pb2_grpc.BrokerStub,
    fuzz_ready: None,
    topic: str,
    partitions: list[int],
    start: broker_pb2.StartPosition,
    stop_offset: int | None,
    max_bytes: int,
) -> None:
    request = broker_pb2.SubscribeRequest(
        topic=topic, partitions=partitions, start=start, max_bytes=max_bytes
    )
    if stop_offset is None:
        request.stop_at_end = True  # a stream that ends by itself
    else:
        request.stop_offset = stop_offset
    try:
        list(stub.Subscribe(request, timeout=WAIT_S))
    except grpc.RpcError as e:
        err = as_call(e)
        event(err.code().name)
        assert err.code() in CLIENT_ERRORS, (err.code(), err.details())
    else:
        event("OK")
