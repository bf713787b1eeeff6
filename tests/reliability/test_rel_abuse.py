"""Abusive clients: malformed requests to every RPC of riverlog.v1.Broker, Admin and Groups
over a real channel to an in-process server on loopback.

The contract (README "Statuses", stream/_rpc.py): bad input gets a documented status with a
message, never UNKNOWN and never INTERNAL; per-partition errors inside an answer carry
documented codes too; the broker keeps serving; calls leave no thread, subscriber slot or
waiter behind.

- a table of hand-picked malformed inputs, each with the status the docs give it;
- 10,000 hypothesis-generated requests (50,000 with --long): raw bytes, and requests built
  from the protobuf classes with edge values, sometimes truncated, bit-flipped or extended;
  then the threads are as before and the server still answers a health check and a
  produce;
- one client-supplied regex (a group subscription pattern) that a backtracking engine would
  match for hours against a long topic name: the coordinator (RE2) answers at once.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from rel_abuse_requests import (
    METHODS,
    SERVICES,
    Code,
    invoke,
    patched,
    problems,
    requests,
    valid_batch,
)

from storage import LogConfig, NewRecord, decode_records, encode_batch
from stream._broker import BrokerConfig
from stream._pb import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    groups_pb2,
    groups_pb2_grpc,
    types_pb2,
)
from stream._serve import RunningBroker, ServeConfig

KiB = 1024
MiB = 1024 * KiB
WORKERS = 32
SUBSCRIBERS_MAX = 16
# Small files: the run may create a few topics, and every segment preallocates its indexes.
LOG = LogConfig(segment_bytes=64 * KiB, index_interval_bytes=1024, index_bytes_max=64 * KiB)
EXAMPLES_SHORT = 10_000
EXAMPLES_LONG = 50_000
# Threads that end on their own (a sealed segment's background fsync) get this long.
SETTLE_S = 5.0
RPC_TIMEOUT_S = 10.0
NOW_MS = 1_700_000_000_000


# ---------------------------------------------------------------------------- the server
@dataclass(frozen=True)
class Member:
    group_id: str
    member_id: str
    epoch: int


@dataclass(frozen=True)
class Abused:
    running: RunningBroker
    channel: grpc.Channel
    member: Member  # of group "g", owning both partitions of "t"


def _join(channel: grpc.Channel, group: str) -> Member:
    groups = groups_pb2_grpc.GroupsStub(channel)
    request = groups_pb2.HeartbeatRequest(
        group_id=group, subscription=groups_pb2.Subscription(topics=["t"])
    )
    answer = groups.Heartbeat(request, timeout=RPC_TIMEOUT_S)
    for _ in range(50):  # the assignment comes within a heartbeat or two
        if answer.assignment:
            break
        time.sleep(0.02)
        request = groups_pb2.HeartbeatRequest(
            group_id=group, member_id=answer.member_id, member_epoch=answer.member_epoch
        )
        answer = groups.Heartbeat(request, timeout=RPC_TIMEOUT_S)
    assert [(tp.topic, list(tp.partitions)) for tp in answer.assignment] == [("t", [0, 1])]
    return Member(group, answer.member_id, answer.member_epoch)


@pytest.fixture(scope="module")
def abused(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Abused]:
    """A broker with topic "t" (2 partitions, 3 records each), group "g" with one member
    owning both, and group "g0" with committed offsets and no members."""
    data_dir: Path = tmp_path_factory.mktemp("abuse") / "data"
    running = RunningBroker(
        ServeConfig(
            broker=BrokerConfig(data_dir=data_dir, log=LOG, subscribers_max=SUBSCRIBERS_MAX),
            listen="127.0.0.1:0",
            workers=WORKERS,
            shutdown_grace_s=1.0,
        )
    )
    running.start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
            admin_pb2_grpc.AdminStub(channel).CreateTopic(
                admin_pb2.CreateTopicRequest(name="t", partitions=2), timeout=RPC_TIMEOUT_S
            )
            for p in (0, 1):
                _produce(channel, p, [b"a", b"b", b"c"])
            owner = _join(channel, "g0")
            groups = groups_pb2_grpc.GroupsStub(channel)
            groups.CommitOffsets(
                groups_pb2.CommitOffsetsRequest(
                    member=types_pb2.GroupMember(
                        group_id="g0", member_id=owner.member_id, member_epoch=owner.epoch
                    ),
                    offsets=[groups_pb2.OffsetToCommit(topic="t", partition=0, offset=1)],
                ),
                timeout=RPC_TIMEOUT_S,
            )
            groups.LeaveGroup(
                groups_pb2.LeaveGroupRequest(
                    group_id="g0", member_id=owner.member_id, member_epoch=owner.epoch
                ),
                timeout=RPC_TIMEOUT_S,
            )
            yield Abused(running, channel, _join(channel, "g"))
    finally:
        running.stop()


def _produce(channel: grpc.Channel, partition: int, values: list[bytes]) -> int:
    stub = broker_pb2_grpc.BrokerStub(channel)
    batch = encode_batch([NewRecord(None, v, NOW_MS) for v in values])
    answer = stub.Produce(
        broker_pb2.ProduceRequest(
            partitions=[
                broker_pb2.PartitionProduce(topic="t", partition=partition, record_batch=batch)
            ]
        ),
        timeout=RPC_TIMEOUT_S,
    )
    (result,) = answer.results
    assert result.error.code == 0, result.error.message
    return result.base_offset


def _still_serving(abused: Abused) -> None:
    """A health check, a produce and a fetch of what it appended."""
    health: Any = health_pb2_grpc.HealthStub(abused.channel)  # its stub types omit Check
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    value = f"still here {time.monotonic_ns()}".encode()
    offset = _produce(abused.channel, 0, [value])
    fetch = broker_pb2.FetchRequest(
        partitions=[broker_pb2.FetchPartition(topic="t", partition=0, offset=offset)]
    )
    stub = broker_pb2_grpc.BrokerStub(abused.channel)
    (result,) = stub.Fetch(fetch, timeout=RPC_TIMEOUT_S).results
    assert [r.value for r in decode_records(result.record_batches) if r.offset == offset] == [value]


def _other_threads() -> set[threading.Thread]:
    """Live threads other than the server's worker pool (which grows up to WORKERS)."""
    return {t for t in threading.enumerate() if not t.name.startswith("riverlog-rpc")}


def _nothing_left_behind(abused: Abused, before: set[threading.Thread]) -> None:
    """No thread beyond those before, no subscriber slot, no registered waiter."""
    broker = abused.running.broker
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        waiting = [
            (name, p.index)
            for name, topic in broker._topics.items()
            for p in topic.partitions
            if p._waiters
        ]
        if _other_threads() <= before and broker._subscribers == 0 and not waiting:
            break
        time.sleep(0.05)
    leaked = sorted(t.name for t in _other_threads() - before)
    assert leaked == [], f"threads left behind: {leaked}"
    assert broker._subscribers == 0
    assert waiting == [], f"waiters left on {waiting}"
    pool = [t for t in threading.enumerate() if t.name.startswith("riverlog-rpc")]
    assert len(pool) <= WORKERS


# ---------------------------------------------------------------------------- the table
Request = bytes | list[bytes] | Callable[[Member], bytes | list[bytes]]


@dataclass(frozen=True)
class Entry:
    label: str
    method: str
    request: Request
    expected: frozenset[Code]
    may_wait: bool = False


def _entry(label: str, method: str, request: object, *codes: Code) -> Entry:
    """A table row; `request` a protobuf message, raw bytes, or a function of the member."""
    raw: Request
    if callable(request):
        function = request

        def build(member: Member) -> bytes | list[bytes]:
            built = function(member)
            return built if isinstance(built, bytes) else built.SerializeToString()

        raw = build
    elif isinstance(request, bytes):
        raw = request
    elif isinstance(request, list):
        raw = [bytes(r) for r in request]
    else:
        assert hasattr(request, "SerializeToString")
        raw = request.SerializeToString()
    if METHODS[method].kind == "stream" and isinstance(raw, bytes):
        raw = [raw]
    return Entry(label, method, raw, frozenset(codes))


P = broker_pb2.PartitionProduce
INVALID, NOT_FOUND, EXHAUSTED = Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED
OUT_OF_RANGE, PRECONDITION = Code.OUT_OF_RANGE, Code.FAILED_PRECONDITION
GOOD = valid_batch()
GOOD_SIZE = len(GOOD)
# Byte positions in a batch header (storage/_batch.py: HEADER).
LENGTH_AT, MAGIC_AT, CRC_AT, ATTRIBUTES_AT, RECORD_COUNT_AT = 8, 16, 17, 21, 57


def _produce_request(*entries: P, acks: int = 0) -> broker_pb2.ProduceRequest:
    return broker_pb2.ProduceRequest(partitions=list(entries), acks=acks)  # type: ignore[arg-type]


def _batch_to(batch: bytes, partition: int | None = 0, topic: str = "t") -> P:
    entry = P(topic=topic, record_batch=batch)
    if partition is not None:
        entry.partition = partition
    return entry


def _fetch(offset: int = 0, partition: int = 0, topic: str = "t", **fields: int) -> bytes:
    request = broker_pb2.FetchRequest(
        partitions=[broker_pb2.FetchPartition(topic=topic, partition=partition, offset=offset)]
    )
    for name, value in fields.items():
        setattr(request, name, value)
    return request.SerializeToString()


def _subscribe(start: str | int | None = "earliest", **fields: object) -> bytes:
    """A SubscribeRequest for "t" that stops at the log end; `start` a position name, an
    offset, or None for no start at all."""
    request = broker_pb2.SubscribeRequest(topic="t", stop_at_end=True)
    if isinstance(start, int):
        request.start.offset = start
    elif start is not None:
        getattr(request.start, start).SetInParent()
    for key, value in fields.items():
        if key == "partitions":
            assert isinstance(value, list)
            request.partitions.extend(value)
        else:
            setattr(request, key, value)
    return request.SerializeToString()


def _member(m: Member, epoch_delta: int = 0, member_id: str | None = None) -> types_pb2.GroupMember:
    return types_pb2.GroupMember(
        group_id=m.group_id,
        member_id=m.member_id if member_id is None else member_id,
        member_epoch=m.epoch + epoch_delta,
    )


def _commit(m: Member, *offsets: tuple[str, int, int, str]) -> groups_pb2.CommitOffsetsRequest:
    return groups_pb2.CommitOffsetsRequest(
        member=_member(m),
        offsets=[
            groups_pb2.OffsetToCommit(topic=t, partition=p, offset=o, metadata=md)
            for t, p, o, md in offsets
        ],
    )


def _reencode_crc(batch: bytes) -> bytes:
    """`batch` with its CRC32C recomputed (so only the field changed before is wrong)."""
    from storage import crc32c

    crc = crc32c(batch[ATTRIBUTES_AT:])
    return patched(batch, CRC_AT, crc.to_bytes(4, "big"))


def _build_table() -> list[Entry]:
    undecodable = b"\xff\xff\xff\xff\x0f"
    truncated_field = b"\x0a\x40abc"  # field 1, length 64, three bytes present
    bad_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (a string everywhere here), not UTF-8
    table = [_entry(f"{name}: undecodable bytes", name, undecodable, INVALID) for name in METHODS]
    table += [
        _entry(f"{name}: truncated field", name, truncated_field, INVALID) for name in METHODS
    ]
    table += [
        _entry(f"{name}: string field not UTF-8", name, bad_utf8, INVALID)
        for name in METHODS
        if METHODS[name].request.DESCRIPTOR.fields_by_number.get(1) is not None
        and METHODS[name].request.DESCRIPTOR.fields_by_number[1].type == 9  # TYPE_STRING
    ]
    huge_batch = encode_batch([NewRecord(None, b"x" * (MiB + 1), NOW_MS)])
    many = GOOD * 513
    idempotent = encode_batch(
        [NewRecord(None, b"i", NOW_MS)], producer_id=123456, producer_epoch=0, base_sequence=0
    )
    negative_epoch = encode_batch(
        [NewRecord(None, b"i", NOW_MS)], producer_id=123456, producer_epoch=-5, base_sequence=0
    )
    table += [
        # ---------------------------------------------------------------- Produce
        _entry("Produce: no partitions", "Produce", _produce_request(), INVALID),
        _entry(
            "Produce: unknown topic",
            "Produce",
            _produce_request(_batch_to(GOOD, topic="nope")),
            NOT_FOUND,
        ),
        _entry(
            "Produce: bad topic name",
            "Produce",
            _produce_request(_batch_to(GOOD, topic="../x")),
            NOT_FOUND,
            INVALID,
        ),
        _entry(
            "Produce: negative partition",
            "Produce",
            _produce_request(_batch_to(GOOD, -1)),
            NOT_FOUND,
        ),
        _entry(
            "Produce: partition past the topic",
            "Produce",
            _produce_request(_batch_to(GOOD, 2**31 - 1)),
            NOT_FOUND,
        ),
        _entry(
            "Produce: bad CRC",
            "Produce",
            _produce_request(_batch_to(patched(GOOD, CRC_AT, b"\0\0\0\0"))),
            INVALID,
        ),
        _entry(
            "Produce: truncated batch", "Produce", _produce_request(_batch_to(GOOD[:-3])), INVALID
        ),
        _entry("Produce: header only", "Produce", _produce_request(_batch_to(GOOD[:61])), INVALID),
        _entry(
            "Produce: wrong magic",
            "Produce",
            _produce_request(_batch_to(patched(GOOD, MAGIC_AT, b"\x01"))),
            INVALID,
        ),
        _entry(
            "Produce: length past the bytes",
            "Produce",
            _produce_request(_batch_to(patched(GOOD, LENGTH_AT, b"\x7f\xff\xff\xff"))),
            INVALID,
        ),
        _entry(
            "Produce: negative length",
            "Produce",
            _produce_request(_batch_to(patched(GOOD, LENGTH_AT, b"\xff\xff\xff\xf0"))),
            INVALID,
        ),
        _entry(
            "Produce: record count does not match",
            "Produce",
            _produce_request(
                _batch_to(_reencode_crc(patched(GOOD, RECORD_COUNT_AT, b"\0\0\0\x09")))
            ),
            INVALID,
        ),
        _entry(
            "Produce: unknown codec",
            "Produce",
            _produce_request(_batch_to(_reencode_crc(patched(GOOD, ATTRIBUTES_AT, b"\0\x07")))),
            INVALID,
        ),
        _entry(
            "Produce: garbage batch", "Produce", _produce_request(_batch_to(b"\x00" * 100)), INVALID
        ),
        _entry(
            "Produce: valid batch plus trailing bytes",
            "Produce",
            _produce_request(_batch_to(GOOD + b"\x01\x02")),
            INVALID,
        ),
        _entry(
            "Produce: record_batch without a partition",
            "Produce",
            _produce_request(_batch_to(GOOD, None)),
            INVALID,
        ),
        _entry(
            "Produce: both records and record_batch",
            "Produce",
            _produce_request(
                P(topic="t", partition=0, record_batch=GOOD, records=[types_pb2.Record(value=b"v")])
            ),
            INVALID,
        ),
        _entry(
            "Produce: neither records nor record_batch",
            "Produce",
            _produce_request(P(topic="t", partition=0)),
            INVALID,
        ),
        _entry(
            "Produce: batch over batch_bytes_max",
            "Produce",
            _produce_request(_batch_to(huge_batch)),
            EXHAUSTED,
        ),
        _entry(
            "Produce: 513 batches in one entry",
            "Produce",
            _produce_request(_batch_to(many)),
            EXHAUSTED,
        ),
        _entry(
            "Produce: negative record timestamp",
            "Produce",
            _produce_request(
                P(topic="t", partition=0, records=[types_pb2.Record(value=b"v", timestamp_ms=-1)])
            ),
            INVALID,
        ),
        _entry(
            "Produce: 100,001 records in one entry",
            "Produce",
            _produce_request(P(topic="t", partition=0, records=[types_pb2.Record()] * 100_001)),
            EXHAUSTED,
        ),
        _entry(
            "Produce: producer id never issued",
            "Produce",
            _produce_request(_batch_to(idempotent)),
            PRECONDITION,
            INVALID,
            Code.ABORTED,
        ),
        _entry(
            "Produce: idempotent batch with a negative epoch",
            "Produce",
            _produce_request(_batch_to(negative_epoch)),
            INVALID,
        ),
        _entry(
            "Produce: two idempotent batches in one entry",
            "Produce",
            _produce_request(_batch_to(idempotent * 2)),
            INVALID,
        ),
        _entry(
            "Produce: one bad entry of two",
            "Produce",
            _produce_request(_batch_to(GOOD), _batch_to(GOOD[:-1], 1)),
            INVALID,
        ),
        _entry(
            "Produce: 4,097 entries (limit 4,096 partitions per request)",
            "Produce",
            _produce_request(*[_batch_to(GOOD)] * 4097),
            EXHAUSTED,
        ),
        # ---------------------------------------------------------------- ProduceStream
        _entry(
            "ProduceStream: bad batch answered, stream open",
            "ProduceStream",
            [
                _produce_request(_batch_to(GOOD[:-3])).SerializeToString(),
                _produce_request(_batch_to(GOOD)).SerializeToString(),
            ],
            Code.OK,
        ),
        _entry("ProduceStream: no partitions", "ProduceStream", _produce_request(), Code.OK),
        _entry(
            "ProduceStream: garbage after a good request",
            "ProduceStream",
            [_produce_request(_batch_to(GOOD)).SerializeToString(), undecodable],
            INVALID,
        ),
        # ---------------------------------------------------------------- Fetch
        _entry("Fetch: no partitions", "Fetch", broker_pb2.FetchRequest(), INVALID),
        _entry("Fetch: negative offset", "Fetch", _fetch(-1), OUT_OF_RANGE),
        _entry("Fetch: offset past the log end", "Fetch", _fetch(2**63 - 1), OUT_OF_RANGE),
        _entry("Fetch: negative partition", "Fetch", _fetch(partition=-1), NOT_FOUND),
        _entry("Fetch: unknown topic", "Fetch", _fetch(topic="nope"), NOT_FOUND),
        _entry("Fetch: bad topic name", "Fetch", _fetch(topic="a/../b"), NOT_FOUND, INVALID),
        _entry("Fetch: max_wait_ms -1", "Fetch", _fetch(max_wait_ms=-1), INVALID),
        _entry("Fetch: max_wait_ms 30,001", "Fetch", _fetch(max_wait_ms=30_001), INVALID),
        _entry("Fetch: max_bytes -1", "Fetch", _fetch(max_bytes=-1), INVALID, EXHAUSTED),
        _entry("Fetch: max_bytes 64 MiB + 1", "Fetch", _fetch(max_bytes=64 * MiB + 1), EXHAUSTED),
        _entry(
            "Fetch: partition max_bytes -5",
            "Fetch",
            broker_pb2.FetchRequest(
                partitions=[broker_pb2.FetchPartition(topic="t", partition=0, max_bytes=-5)]
            ),
            INVALID,
            EXHAUSTED,
        ),
        _entry(
            "Fetch: 4,097 partitions",
            "Fetch",
            broker_pb2.FetchRequest(partitions=[broker_pb2.FetchPartition(topic="t")] * 4097),
            EXHAUSTED,
        ),
        _entry("Fetch: negative min_bytes", "Fetch", _fetch(min_bytes=-1), Code.OK),
        _entry(
            "Fetch: member of an unknown group",
            "Fetch",
            broker_pb2.FetchRequest(
                partitions=[broker_pb2.FetchPartition(topic="t")],
                member=types_pb2.GroupMember(group_id="nope", member_id="m", member_epoch=1),
            ),
            PRECONDITION,
            NOT_FOUND,
        ),
        _entry(
            "Fetch: member with a stale epoch",
            "Fetch",
            lambda m: broker_pb2.FetchRequest(
                partitions=[broker_pb2.FetchPartition(topic="t")], member=_member(m, -1)
            ),
            Code.ABORTED,
        ),
        _entry(
            "Fetch: member, partition not owned",
            "Fetch",
            lambda m: broker_pb2.FetchRequest(
                partitions=[broker_pb2.FetchPartition(topic="nope")], member=_member(m)
            ),
            Code.PERMISSION_DENIED,
            NOT_FOUND,
        ),
        # ---------------------------------------------------------------- Subscribe
        _entry("Subscribe: no start", "Subscribe", _subscribe(None), INVALID),
        _entry("Subscribe: unknown topic", "Subscribe", _subscribe(topic="nope"), NOT_FOUND),
        _entry(
            "Subscribe: partition listed twice", "Subscribe", _subscribe(partitions=[0, 0]), INVALID
        ),
        _entry(
            "Subscribe: negative partition", "Subscribe", _subscribe(partitions=[-1]), NOT_FOUND
        ),
        _entry("Subscribe: negative start offset", "Subscribe", _subscribe(-1), OUT_OF_RANGE),
        _entry(
            "Subscribe: start offset past the end",
            "Subscribe",
            _subscribe(2**62),
            OUT_OF_RANGE,
        ),
        _entry(
            "Subscribe: max_bytes -1", "Subscribe", _subscribe(max_bytes=-1), INVALID, EXHAUSTED
        ),
        _entry(
            "Subscribe: max_bytes 64 MiB + 1",
            "Subscribe",
            _subscribe(max_bytes=64 * MiB + 1),
            EXHAUSTED,
        ),
        _entry(
            "Subscribe: 5,000 partitions",
            "Subscribe",
            _subscribe(partitions=list(range(5000))),
            NOT_FOUND,
            EXHAUSTED,
        ),
        _entry(
            "Subscribe: negative stop offset",
            "Subscribe",
            broker_pb2.SubscribeRequest(
                topic="t",
                start=broker_pb2.StartPosition(earliest=broker_pb2.StartPosition.Earliest()),
                stop_offset=-5,
            ),
            Code.OK,
        ),
        # ---------------------------------------------------------------- ListOffsets
        _entry(
            "ListOffsets: a query with no spec",
            "ListOffsets",
            broker_pb2.ListOffsetsRequest(queries=[broker_pb2.ListOffsetsRequest.Query(topic="t")]),
            INVALID,
        ),
        _entry(
            "ListOffsets: unknown topic",
            "ListOffsets",
            broker_pb2.ListOffsetsRequest(
                queries=[broker_pb2.ListOffsetsRequest.Query(topic="nope", earliest=True)]
            ),
            NOT_FOUND,
        ),
        _entry(
            "ListOffsets: negative partition",
            "ListOffsets",
            broker_pb2.ListOffsetsRequest(
                queries=[broker_pb2.ListOffsetsRequest.Query(topic="t", partition=-1, latest=True)]
            ),
            NOT_FOUND,
        ),
        _entry(
            "ListOffsets: 4,097 queries",
            "ListOffsets",
            broker_pb2.ListOffsetsRequest(
                queries=[broker_pb2.ListOffsetsRequest.Query(topic="t", latest=True)] * 4097
            ),
            EXHAUSTED,
        ),
        _entry(
            "ListOffsets: negative timestamp",
            "ListOffsets",
            broker_pb2.ListOffsetsRequest(
                queries=[broker_pb2.ListOffsetsRequest.Query(topic="t", timestamp_ms=-(2**63))]
            ),
            Code.OK,
        ),
        # ---------------------------------------------------------------- InitProducer
        _entry(
            "InitProducer: name with a space",
            "InitProducer",
            broker_pb2.InitProducerRequest(producer_name="a b"),
            INVALID,
        ),
        _entry(
            "InitProducer: name of 250 characters",
            "InitProducer",
            broker_pb2.InitProducerRequest(producer_name="p" * 250),
            INVALID,
        ),
        _entry(
            "InitProducer: a path as name",
            "InitProducer",
            broker_pb2.InitProducerRequest(producer_name="../p"),
            INVALID,
        ),
        # ---------------------------------------------------------------- Admin
        *[
            _entry(
                f"CreateTopic: name {name[:12]!r}",
                "CreateTopic",
                admin_pb2.CreateTopicRequest(name=name, partitions=1),
                INVALID,
            )
            for name in ("", ".", "..", "a/b", "x" * 250, "naïve", "__consumer_offsets", "t\x00")
        ],
        _entry(
            "CreateTopic: 0 partitions",
            "CreateTopic",
            admin_pb2.CreateTopicRequest(name="h9", partitions=0),
            INVALID,
        ),
        _entry(
            "CreateTopic: -1 partitions",
            "CreateTopic",
            admin_pb2.CreateTopicRequest(name="h9", partitions=-1),
            INVALID,
        ),
        _entry(
            "CreateTopic: 1,025 partitions",
            "CreateTopic",
            admin_pb2.CreateTopicRequest(name="h9", partitions=1025),
            INVALID,
            EXHAUSTED,
        ),
        _entry(
            "CreateTopic: unknown config key",
            "CreateTopic",
            admin_pb2.CreateTopicRequest(name="h9", partitions=1, config={"bogus": "1"}),
            INVALID,
        ),
        _entry(
            "CreateTopic: config value not a number",
            "CreateTopic",
            admin_pb2.CreateTopicRequest(name="h9", partitions=1, config={"segment_bytes": "abc"}),
            INVALID,
        ),
        _entry(
            "CreateTopic: segment_bytes below 1 KiB",
            "CreateTopic",
            admin_pb2.CreateTopicRequest(name="h9", partitions=1, config={"segment_bytes": "10"}),
            INVALID,
        ),
        _entry(
            "CreateTopic: fsync policy unknown",
            "CreateTopic",
            admin_pb2.CreateTopicRequest(name="h9", partitions=1, config={"fsync": "sometimes"}),
            INVALID,
        ),
        _entry(
            "CreateTopic: exists",
            "CreateTopic",
            admin_pb2.CreateTopicRequest(name="t", partitions=1),
            Code.ALREADY_EXISTS,
        ),
        _entry(
            "DeleteTopic: unknown",
            "DeleteTopic",
            admin_pb2.DeleteTopicRequest(name="nope"),
            NOT_FOUND,
        ),
        _entry(
            "DeleteTopic: a path",
            "DeleteTopic",
            admin_pb2.DeleteTopicRequest(name="../t"),
            NOT_FOUND,
            INVALID,
        ),
        _entry(
            "DeleteTopic: the internal topic",
            "DeleteTopic",
            admin_pb2.DeleteTopicRequest(name="__consumer_offsets"),
            NOT_FOUND,
            INVALID,
        ),
        _entry("ListTopics: unknown fields", "ListTopics", b"\x08\x01\x12\x03abc", Code.OK),
        _entry(
            "DescribeTopic: unknown",
            "DescribeTopic",
            admin_pb2.DescribeTopicRequest(name="nope"),
            NOT_FOUND,
        ),
        _entry(
            "AddPartitions: unknown",
            "AddPartitions",
            admin_pb2.AddPartitionsRequest(name="nope", partitions=3),
            NOT_FOUND,
        ),
        _entry(
            "AddPartitions: fewer",
            "AddPartitions",
            admin_pb2.AddPartitionsRequest(name="t", partitions=1),
            INVALID,
        ),
        _entry(
            "AddPartitions: negative",
            "AddPartitions",
            admin_pb2.AddPartitionsRequest(name="t", partitions=-1),
            INVALID,
        ),
        _entry(
            "AddPartitions: 1,025",
            "AddPartitions",
            admin_pb2.AddPartitionsRequest(name="t", partitions=1025),
            INVALID,
            EXHAUSTED,
        ),
        # ---------------------------------------------------------------- Groups
        _entry(
            "Heartbeat: empty group id",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(subscription=groups_pb2.Subscription(topics=["t"])),
            INVALID,
        ),
        _entry(
            "Heartbeat: bad group id",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(
                group_id="a b", subscription=groups_pb2.Subscription(topics=["t"])
            ),
            INVALID,
        ),
        _entry(
            "Heartbeat: join with no subscription",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(group_id="g1"),
            INVALID,
        ),
        _entry(
            "Heartbeat: join with an empty subscription",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(group_id="g1", subscription=groups_pb2.Subscription()),
            INVALID,
        ),
        _entry(
            "Heartbeat: topics and a pattern",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(
                group_id="g1", subscription=groups_pb2.Subscription(topics=["t"], pattern="t")
            ),
            INVALID,
        ),
        _entry(
            "Heartbeat: pattern that does not compile",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(
                group_id="g1", subscription=groups_pb2.Subscription(pattern="(")
            ),
            INVALID,
        ),
        _entry(
            "Heartbeat: pattern of 1,001 characters",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(
                group_id="g1", subscription=groups_pb2.Subscription(pattern="t" * 1001)
            ),
            INVALID,
        ),
        _entry(
            "Heartbeat: session timeout 999 ms",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(
                group_id="g1",
                subscription=groups_pb2.Subscription(topics=["t"]),
                session_timeout_ms=999,
            ),
            INVALID,
        ),
        _entry(
            "Heartbeat: session timeout 300,001 ms",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(
                group_id="g1",
                subscription=groups_pb2.Subscription(topics=["t"]),
                session_timeout_ms=300_001,
            ),
            INVALID,
        ),
        _entry(
            "Heartbeat: negative session timeout",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(
                group_id="g1",
                subscription=groups_pb2.Subscription(topics=["t"]),
                session_timeout_ms=-1,
            ),
            INVALID,
        ),
        _entry(
            "Heartbeat: rebalance timeout 600,001 ms",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(
                group_id="g1",
                subscription=groups_pb2.Subscription(topics=["t"]),
                rebalance_timeout_ms=600_001,
            ),
            INVALID,
        ),
        _entry(
            "Heartbeat: instance id of 250 characters",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(
                group_id="g1",
                instance_id="i" * 250,
                subscription=groups_pb2.Subscription(topics=["t"]),
            ),
            INVALID,
        ),
        _entry(
            "Heartbeat: unknown member",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(group_id="g", member_id="nobody", member_epoch=3),
            PRECONDITION,
        ),
        _entry(
            "Heartbeat: epoch from the future",
            "Heartbeat",
            lambda m: groups_pb2.HeartbeatRequest(
                group_id=m.group_id, member_id=m.member_id, member_epoch=m.epoch + 100
            ),
            Code.ABORTED,
            PRECONDITION,
        ),
        _entry(
            "Heartbeat: 10,001 subscribed topics",
            "Heartbeat",
            groups_pb2.HeartbeatRequest(
                group_id="g1",
                subscription=groups_pb2.Subscription(topics=[f"t{i}" for i in range(10_001)]),
            ),
            INVALID,
            EXHAUSTED,
        ),
        _entry(
            "LeaveGroup: unknown group",
            "LeaveGroup",
            groups_pb2.LeaveGroupRequest(group_id="nope", member_id="m", member_epoch=1),
            PRECONDITION,
            NOT_FOUND,
        ),
        _entry(
            "LeaveGroup: bad group id",
            "LeaveGroup",
            groups_pb2.LeaveGroupRequest(group_id="a b"),
            INVALID,
            NOT_FOUND,
            PRECONDITION,
        ),
        _entry(
            "CommitOffsets: no member",
            "CommitOffsets",
            groups_pb2.CommitOffsetsRequest(offsets=[groups_pb2.OffsetToCommit(topic="t")]),
            INVALID,
            PRECONDITION,
            NOT_FOUND,
        ),
        _entry("CommitOffsets: no offsets", "CommitOffsets", _commit, INVALID),
        _entry(
            "CommitOffsets: unknown member",
            "CommitOffsets",
            lambda m: groups_pb2.CommitOffsetsRequest(
                member=_member(m, member_id="nobody"),
                offsets=[groups_pb2.OffsetToCommit(topic="t")],
            ),
            PRECONDITION,
        ),
        _entry(
            "CommitOffsets: stale epoch",
            "CommitOffsets",
            lambda m: groups_pb2.CommitOffsetsRequest(
                member=_member(m, -1), offsets=[groups_pb2.OffsetToCommit(topic="t")]
            ),
            Code.ABORTED,
        ),
        _entry(
            "CommitOffsets: partition not owned",
            "CommitOffsets",
            lambda m: _commit(m, ("nope", 0, 1, "")),
            Code.PERMISSION_DENIED,
            NOT_FOUND,
        ),
        _entry(
            "CommitOffsets: negative partition",
            "CommitOffsets",
            lambda m: _commit(m, ("t", -1, 1, "")),
            Code.PERMISSION_DENIED,
            NOT_FOUND,
            INVALID,
        ),
        _entry(
            "CommitOffsets: negative offset",
            "CommitOffsets",
            lambda m: _commit(m, ("t", 0, -5, "")),
            INVALID,
            OUT_OF_RANGE,
        ),
        _entry(
            "CommitOffsets: metadata of 4,097 bytes",
            "CommitOffsets",
            lambda m: _commit(m, ("t", 0, 1, "x" * 4097)),
            INVALID,
            EXHAUSTED,
        ),
        _entry(
            "CommitOffsets: 10,001 offsets",
            "CommitOffsets",
            lambda m: _commit(m, *[("t", 0, 1, "")] * 10_001),
            EXHAUSTED,
        ),
        _entry(
            "FetchOffsets: unknown group",
            "FetchOffsets",
            groups_pb2.FetchOffsetsRequest(group_id="nope"),
            NOT_FOUND,
            Code.OK,
        ),
        _entry(
            "FetchOffsets: bad group id",
            "FetchOffsets",
            groups_pb2.FetchOffsetsRequest(group_id="a b"),
            INVALID,
            NOT_FOUND,
        ),
        _entry("ListGroups: unknown fields", "ListGroups", b"\x08\x01", Code.OK),
        _entry(
            "DescribeGroup: unknown",
            "DescribeGroup",
            groups_pb2.DescribeGroupRequest(group_id="nope"),
            NOT_FOUND,
        ),
        _entry(
            "DescribeGroup: bad group id",
            "DescribeGroup",
            groups_pb2.DescribeGroupRequest(group_id=""),
            INVALID,
            NOT_FOUND,
        ),
        _entry(
            "DeleteGroup: has members",
            "DeleteGroup",
            groups_pb2.DeleteGroupRequest(group_id="g"),
            PRECONDITION,
        ),
        _entry(
            "DeleteGroup: unknown",
            "DeleteGroup",
            groups_pb2.DeleteGroupRequest(group_id="nope"),
            NOT_FOUND,
        ),
        _entry(
            "ResetOffsets: no target",
            "ResetOffsets",
            groups_pb2.ResetOffsetsRequest(group_id="g0", topic="t"),
            INVALID,
        ),
        _entry(
            "ResetOffsets: has members",
            "ResetOffsets",
            groups_pb2.ResetOffsetsRequest(group_id="g", topic="t", earliest=True),
            PRECONDITION,
        ),
        _entry(
            "ResetOffsets: unknown topic",
            "ResetOffsets",
            groups_pb2.ResetOffsetsRequest(group_id="g0", topic="nope", earliest=True),
            NOT_FOUND,
        ),
        _entry(
            "ResetOffsets: negative partition",
            "ResetOffsets",
            groups_pb2.ResetOffsetsRequest(group_id="g0", topic="t", partitions=[-1], latest=True),
            NOT_FOUND,
        ),
        _entry(
            "ResetOffsets: offset past the end",
            "ResetOffsets",
            groups_pb2.ResetOffsetsRequest(
                group_id="g0", topic="t", offset=2**63 - 1, dry_run=True
            ),
            OUT_OF_RANGE,
            INVALID,
            Code.OK,
        ),
        _entry(
            "ResetOffsets: shift by -2**63",
            "ResetOffsets",
            groups_pb2.ResetOffsetsRequest(
                group_id="g0", topic="t", shift_by=-(2**63), dry_run=True
            ),
            Code.OK,
            OUT_OF_RANGE,
            INVALID,
        ),
        _entry(
            "ResetOffsets: shift by 2**63 - 1",
            "ResetOffsets",
            groups_pb2.ResetOffsetsRequest(
                group_id="g0", topic="t", shift_by=2**63 - 1, dry_run=True
            ),
            Code.OK,
            OUT_OF_RANGE,
            INVALID,
        ),
    ]
    return table


TABLE = _build_table()
# Rows that fail on a known bug, with the bug: xfail(strict) until it is fixed.
KNOWN_BUGS: dict[str, str] = {}


def test_the_table_covers_every_rpc() -> None:
    rpcs = {f"/{service}/{m.name}" for service, d in SERVICES.items() for m in d.methods}
    assert rpcs == {m.path for m in METHODS.values()}
    assert {e.method for e in TABLE} == set(METHODS)


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(
            e,
            id=e.label,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[e.label])]
            if e.label in KNOWN_BUGS
            else [],
        )
        for e in TABLE
    ],
)
def test_malformed_request_gets_its_documented_status(abused: Abused, entry: Entry) -> None:
    request = entry.request(abused.member) if callable(entry.request) else entry.request
    if METHODS[entry.method].kind == "stream" and isinstance(request, bytes):
        request = [request]
    outcome = invoke(abused.channel, METHODS[entry.method], request)
    assert problems(outcome, entry.may_wait) == []
    assert outcome.code in entry.expected, (
        f"{outcome.code.name} ({outcome.details}); documented: "
        f"{sorted(c.name for c in entry.expected)}"
    )
    if outcome.code != Code.OK:
        assert outcome.details, "an error status without a message a person can act on"
    if entry.label.startswith("ProduceStream: bad batch"):  # answered, and the stream open
        assert len(outcome.answers) == 2
        assert outcome.answers[0].results[0].error.code == INVALID.value[0]  # type: ignore[attr-defined]
        assert outcome.answers[1].results[0].error.code == 0  # type: ignore[attr-defined]


def test_after_the_table_the_server_still_serves(abused: Abused) -> None:
    _still_serving(abused)


# ---------------------------------------------------------------------------- hypothesis
@pytest.mark.slow
def test_generated_requests_get_documented_statuses_and_leave_nothing_behind(
    abused: Abused, seed: int, long_run: bool
) -> None:
    examples = EXAMPLES_LONG if long_run else EXAMPLES_SHORT
    _still_serving(abused)
    before = _other_threads()
    seen: collections.Counter[str] = collections.Counter()
    started = time.monotonic()

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )
    @given(requests())
    def one(request: tuple[str, bytes | list[bytes]]) -> None:
        name, raw = request
        outcome = invoke(abused.channel, METHODS[name], raw)
        seen[outcome.code.name] += 1
        found = problems(outcome, may_wait=name == "Subscribe")
        assert found == [], f"{name} {raw!r}: {found}"

    one()
    elapsed = time.monotonic() - started
    print(f"{sum(seen.values())} calls in {elapsed:.1f} s; statuses: {dict(seen.most_common())}")
    assert sum(seen.values()) >= examples
    _nothing_left_behind(abused, before)
    _still_serving(abused)


# ---------------------------------------------------------------------------- a regex
# Topic "a" * n and the pattern "(a+)+b": Python's re backtracks 2**n ways before it fails.
REDOS_TOPIC_CHARS = 26
REDOS_HEARTBEAT_S_MAX = 0.5


def test_a_subscription_pattern_cannot_stall_the_coordinator(abused: Abused) -> None:
    admin = admin_pb2_grpc.AdminStub(abused.channel)
    groups = groups_pb2_grpc.GroupsStub(abused.channel)
    name = "a" * REDOS_TOPIC_CHARS
    admin.CreateTopic(admin_pb2.CreateTopicRequest(name=name, partitions=1), timeout=RPC_TIMEOUT_S)
    try:
        started = time.monotonic()
        groups.Heartbeat(
            groups_pb2.HeartbeatRequest(
                group_id="redos", subscription=groups_pb2.Subscription(pattern="(a+)+b")
            ),
            timeout=RPC_TIMEOUT_S,
        )
        elapsed = time.monotonic() - started
        print(
            f"heartbeat with pattern (a+)+b beside a {len(name)}-character topic: {elapsed:.2f} s"
        )
        assert elapsed < REDOS_HEARTBEAT_S_MAX
    finally:
        admin.DeleteTopic(admin_pb2.DeleteTopicRequest(name=name), timeout=RPC_TIMEOUT_S)
