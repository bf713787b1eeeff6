"""Requests from an abusive client, for tests/reliability/test_rel_abuse.py: every RPC of
riverlog.v1.Broker, Admin and Groups called with raw bytes, the statuses a client may see,
and hypothesis strategies that build malformed requests from the protobuf classes.

A request is sent as bytes through a channel with no serializers, so undecodable bytes reach
the server as they are. Streaming calls are bounded: ProduceStream sends a short list,
Subscribe reads at most a few messages under a short deadline.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError, Message
from hypothesis import strategies as st

from storage import NewRecord, encode_batch
from stream._pb import admin_pb2, broker_pb2, groups_pb2, types_pb2

Code = grpc.StatusCode
KiB = 1024
MiB = 1024 * KiB

# What a client may ever see from a request it got wrong (README "Statuses"): never UNKNOWN,
# never INTERNAL (that is a bug or a corrupt log), never UNAVAILABLE (the broker is not
# shutting down here).
DOCUMENTED = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.ALREADY_EXISTS,
        Code.OUT_OF_RANGE,
        Code.RESOURCE_EXHAUSTED,
        Code.FAILED_PRECONDITION,
        Code.ABORTED,
        Code.PERMISSION_DENIED,
    }
)
# Only for calls that may wait by design (a subscription, a long poll): the client's own
# deadline ends them.
WAITING = frozenset({Code.DEADLINE_EXCEEDED})
DOCUMENTED_VALUES = frozenset(c.value[0] for c in DOCUMENTED)


@dataclass(frozen=True)
class Method:
    path: str
    kind: str  # unary | server_stream | stream
    request: type[Message]
    response: type[Message]


def _methods() -> dict[str, Method]:
    out: dict[str, Method] = {}
    broker = {
        "Produce": ("unary", broker_pb2.ProduceRequest, broker_pb2.ProduceResponse),
        "ProduceStream": ("stream", broker_pb2.ProduceRequest, broker_pb2.ProduceResponse),
        "Fetch": ("unary", broker_pb2.FetchRequest, broker_pb2.FetchResponse),
        "Subscribe": ("server_stream", broker_pb2.SubscribeRequest, broker_pb2.SubscribeResponse),
        "ListOffsets": ("unary", broker_pb2.ListOffsetsRequest, broker_pb2.ListOffsetsResponse),
        "InitProducer": (
            "unary",
            broker_pb2.InitProducerRequest,
            broker_pb2.InitProducerResponse,
        ),
    }
    admin = {
        "CreateTopic": ("unary", admin_pb2.CreateTopicRequest, admin_pb2.TopicDescription),
        "DeleteTopic": ("unary", admin_pb2.DeleteTopicRequest, admin_pb2.DeleteTopicResponse),
        "ListTopics": ("unary", admin_pb2.ListTopicsRequest, admin_pb2.ListTopicsResponse),
        "DescribeTopic": ("unary", admin_pb2.DescribeTopicRequest, admin_pb2.TopicDescription),
        "AddPartitions": ("unary", admin_pb2.AddPartitionsRequest, admin_pb2.TopicDescription),
    }
    groups = {
        "Heartbeat": ("unary", groups_pb2.HeartbeatRequest, groups_pb2.HeartbeatResponse),
        "LeaveGroup": ("unary", groups_pb2.LeaveGroupRequest, groups_pb2.LeaveGroupResponse),
        "CommitOffsets": (
            "unary",
            groups_pb2.CommitOffsetsRequest,
            groups_pb2.CommitOffsetsResponse,
        ),
        "FetchOffsets": ("unary", groups_pb2.FetchOffsetsRequest, groups_pb2.FetchOffsetsResponse),
        "ListGroups": ("unary", groups_pb2.ListGroupsRequest, groups_pb2.ListGroupsResponse),
        "DescribeGroup": (
            "unary",
            groups_pb2.DescribeGroupRequest,
            groups_pb2.DescribeGroupResponse,
        ),
        "DeleteGroup": ("unary", groups_pb2.DeleteGroupRequest, groups_pb2.DeleteGroupResponse),
        "ResetOffsets": ("unary", groups_pb2.ResetOffsetsRequest, groups_pb2.ResetOffsetsResponse),
    }
    for service, table in (("Broker", broker), ("Admin", admin), ("Groups", groups)):
        for name, (kind, request, response) in table.items():
            out[name] = Method(f"/riverlog.v1.{service}/{name}", kind, request, response)
    return out


METHODS = _methods()
# Every RPC of the three services, checked against the generated descriptors in the test.
SERVICES = {
    "riverlog.v1.Broker": broker_pb2.DESCRIPTOR.services_by_name["Broker"],
    "riverlog.v1.Admin": admin_pb2.DESCRIPTOR.services_by_name["Admin"],
    "riverlog.v1.Groups": groups_pb2.DESCRIPTOR.services_by_name["Groups"],
}
# A call's deadline; a Subscribe's, and how many of its messages are read before cancelling.
CALL_TIMEOUT_S = 10.0
SUBSCRIBE_TIMEOUT_S = 1.0
SUBSCRIBE_MESSAGES_MAX = 4


@dataclass
class Outcome:
    """What a call ended with: its status, details, and the answers it got (parsed)."""

    code: Code
    details: str
    answers: list[Message] = field(default_factory=list)


def invoke(channel: grpc.Channel, method: Method, request: bytes | list[bytes]) -> Outcome:
    """Call `method` with raw request bytes (a list of them for ProduceStream)."""
    answers: list[Message] = []
    try:
        if method.kind == "unary":
            assert isinstance(request, bytes)
            unary: grpc.UnaryUnaryMultiCallable[Any, Any] = channel.unary_unary(method.path)
            answers.append(_parse(method, unary(request, timeout=CALL_TIMEOUT_S)))
        elif method.kind == "stream":
            raws = request if isinstance(request, list) else [request]
            bidi: grpc.StreamStreamMultiCallable[Any, Any] = channel.stream_stream(method.path)
            answers.extend(_parse(method, r) for r in bidi(iter(raws), timeout=CALL_TIMEOUT_S))
        else:
            assert isinstance(request, bytes)
            server_stream: grpc.UnaryStreamMultiCallable[Any, Any] = channel.unary_stream(
                method.path
            )
            call = server_stream(request, timeout=SUBSCRIBE_TIMEOUT_S)
            try:
                answers.extend(
                    _parse(method, raw) for raw in itertools.islice(call, SUBSCRIBE_MESSAGES_MAX)
                )
            finally:
                call.cancel()
            if len(answers) == SUBSCRIBE_MESSAGES_MAX:
                return Outcome(Code.OK, "", answers)  # cancelled by us after enough messages
    except grpc.RpcError as e:
        if not isinstance(e, grpc.Call):
            raise
        return Outcome(e.code(), e.details() or "", answers)
    return Outcome(Code.OK, "", answers)


def _parse(method: Method, raw: bytes) -> Message:
    try:
        return method.response.FromString(raw)
    except DecodeError as e:
        raise AssertionError(f"{method.path} answered bytes that are no {method.response}") from e


def partition_errors(message: Message) -> Iterator[types_pb2.PartitionError]:
    """Every PartitionError set anywhere inside `message`."""
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        values = value if descriptor.is_repeated else [value]
        for item in values:
            if not isinstance(item, Message):
                continue  # a map of scalars
            if isinstance(item, types_pb2.PartitionError):
                yield item
            else:
                yield from partition_errors(item)


def problems(outcome: Outcome, may_wait: bool = False) -> list[str]:
    """Why `outcome` breaks the status contract; empty when it keeps it."""
    out = []
    allowed = DOCUMENTED | WAITING if may_wait else DOCUMENTED
    if outcome.code not in allowed:
        out.append(f"status {outcome.code.name}: {outcome.details}")
    out.extend(
        f"per-partition error code {error.code}: {error.message}"
        for answer in outcome.answers
        for error in partition_errors(answer)
        if error.code not in DOCUMENTED_VALUES
    )
    return out


# ---------------------------------------------------------------------------- batches
NOW_MS = 1_700_000_000_000


def valid_batch(values: int = 2) -> bytes:
    return encode_batch([NewRecord(None, f"v{i}".encode(), NOW_MS + i) for i in range(values)])


def patched(batch: bytes, at: int, data: bytes) -> bytes:
    return batch[:at] + data + batch[at + len(data) :]


# ---------------------------------------------------------------------------- strategies
# Names: the seeded topic "t", topics the run may create and delete ("h0".."h3"), and names
# no topic may have. Only h* topics are ever created, and with few partitions, so the run's
# disk and file use stay small.
TOPICS_CREATABLE = ("h0", "h1", "h2", "h3")
BAD_NAMES = (
    "",
    ".",
    "..",
    "a/b",
    "../etc",
    "x" * 250,
    "naïve",
    "t\x00",
    "__consumer_offsets",
    " t",
)
names = st.one_of(
    st.sampled_from(("t", "t", "nope", *TOPICS_CREATABLE, *BAD_NAMES)),
    st.text(max_size=12),
)
group_ids = st.one_of(
    st.sampled_from(("g", "g0", "g1", "", "bad group", "x" * 250, "g\x00")),
    st.text(max_size=8),
)
int32s = st.one_of(
    st.sampled_from((0, 1, 2, -1, 2**31 - 1, -(2**31), 1024, 1025, 4096, 4097, 30_000, 30_001)),
    st.integers(-(2**31), 2**31 - 1),
)
int64s = st.one_of(
    st.sampled_from((0, 1, -1, 2**63 - 1, -(2**63), 2**31, NOW_MS)),
    st.integers(-(2**63), 2**63 - 1),
)
# Small partition counts only where they would be created; the limits are in the table.
partition_counts = st.sampled_from((-1, 0, 1, 2, 3, 1025, 2**31 - 1))
# Long-poll waits that end at once or are refused: the run must not sit in waits.
waits = st.sampled_from((0, 1, 5, -1, 30_001, 2**31 - 1, -(2**31)))
# Patterns whose matching is linear (see the table for the catastrophic kind).
patterns = st.sampled_from(("t", "h.*", ".*", "(", "[", "x" * 1001, "a{2}", ""))
batches = st.one_of(
    st.just(valid_batch()),
    st.builds(
        lambda at, bit: patched(valid_batch(), at, bytes([valid_batch()[at] ^ (1 << bit)])),
        st.integers(0, len(valid_batch()) - 1),
        st.integers(0, 7),
    ),
    st.builds(lambda n: valid_batch()[:n], st.integers(0, len(valid_batch()) - 1)),
    st.binary(max_size=120),
    st.builds(lambda k: valid_batch() * k, st.integers(2, 3)),
)
records = st.builds(
    lambda key, value, ts, headers: types_pb2.Record(
        key=key, value=value, timestamp_ms=ts, headers=headers
    ),
    st.none() | st.binary(max_size=8),
    st.none() | st.binary(max_size=16),
    st.none() | int64s,
    st.lists(
        st.builds(
            lambda k, v: types_pb2.Header(key=k, value=v),
            st.text(max_size=4),
            st.binary(max_size=4),
        ),
        max_size=2,
    ),
)


@st.composite
def produce_requests(draw: st.DrawFn) -> broker_pb2.ProduceRequest:
    entries = []
    for _ in range(draw(st.integers(0, 3))):
        entry = broker_pb2.PartitionProduce(topic=draw(names))
        if draw(st.booleans()):
            entry.partition = draw(st.sampled_from((0, 1, -1, 2, 2**31 - 1)) | int32s)
        shape = draw(st.sampled_from(("batch", "records", "both", "none")))
        if shape in ("batch", "both"):
            entry.record_batch = draw(batches)
        if shape in ("records", "both"):
            entry.records.extend(draw(st.lists(records, min_size=1, max_size=3)))
        entries.append(entry)
    acks = draw(st.sampled_from((0, 1, 2, 3, 99, -1)))
    return broker_pb2.ProduceRequest(
        partitions=entries,
        acks=cast(broker_pb2.Acks.ValueType, acks),
        correlation_id=draw(st.integers(0, 2**64 - 1)),
    )


@st.composite
def fetch_requests(draw: st.DrawFn) -> broker_pb2.FetchRequest:
    parts = [
        broker_pb2.FetchPartition(
            topic=draw(names),
            partition=draw(int32s),
            offset=draw(int64s),
            max_bytes=draw(int32s),
        )
        for _ in range(draw(st.integers(0, 3)))
    ]
    request = broker_pb2.FetchRequest(
        partitions=parts,
        max_wait_ms=draw(waits),
        min_bytes=draw(int32s),
        max_bytes=draw(int32s),
    )
    if draw(st.booleans()):
        request.member.CopyFrom(
            types_pb2.GroupMember(
                group_id=draw(group_ids),
                member_id=draw(st.text(max_size=8)),
                member_epoch=draw(int32s),
            )
        )
    return request


@st.composite
def subscribe_requests(draw: st.DrawFn) -> broker_pb2.SubscribeRequest:
    request = broker_pb2.SubscribeRequest(
        topic=draw(names),
        partitions=draw(st.lists(int32s, max_size=3)),
        max_bytes=draw(int32s),
        stop_at_end=True,  # a live subscription would wait: the run must not
    )
    start = draw(st.sampled_from(("earliest", "latest", "offset", "timestamp", "none")))
    if start == "earliest":
        request.start.earliest.SetInParent()
    elif start == "latest":
        request.start.latest.SetInParent()
    elif start == "offset":
        request.start.offset = draw(int64s)
    elif start == "timestamp":
        request.start.timestamp_ms = draw(int64s)
    return request


@st.composite
def list_offsets_requests(draw: st.DrawFn) -> broker_pb2.ListOffsetsRequest:
    queries = []
    for _ in range(draw(st.integers(0, 3))):
        query = broker_pb2.ListOffsetsRequest.Query(topic=draw(names), partition=draw(int32s))
        spec = draw(st.sampled_from(("earliest", "latest", "timestamp", "none")))
        if spec == "earliest":
            query.earliest = draw(st.booleans())
        elif spec == "latest":
            query.latest = draw(st.booleans())
        elif spec == "timestamp":
            query.timestamp_ms = draw(int64s)
        queries.append(query)
    return broker_pb2.ListOffsetsRequest(queries=queries)


def _topic_partitions(draw: st.DrawFn) -> list[types_pb2.TopicPartitions]:
    return [
        types_pb2.TopicPartitions(topic=draw(names), partitions=draw(st.lists(int32s, max_size=3)))
        for _ in range(draw(st.integers(0, 2)))
    ]


@st.composite
def heartbeat_requests(draw: st.DrawFn) -> groups_pb2.HeartbeatRequest:
    request = groups_pb2.HeartbeatRequest(
        group_id=draw(group_ids),
        member_id=draw(st.sampled_from(("",)) | st.text(max_size=8)),
        member_epoch=draw(int32s),
        session_timeout_ms=draw(st.sampled_from((0, 999, 1000, 45_000, 300_001, -1))),
        rebalance_timeout_ms=draw(st.sampled_from((0, 1, 600_000, 600_001, -1))),
    )
    if draw(st.booleans()):
        request.instance_id = draw(st.sampled_from(("i", "", "x" * 250)) | st.text(max_size=6))
    subscription = draw(st.sampled_from(("topics", "pattern", "both", "empty", "none")))
    if subscription in ("topics", "both"):
        request.subscription.topics.extend(draw(st.lists(names, max_size=3)))
    if subscription in ("pattern", "both"):
        request.subscription.pattern = draw(patterns)
    if subscription == "empty":
        request.subscription.SetInParent()
    if draw(st.booleans()):
        request.owned.topics.extend(_topic_partitions(draw))
    return request


@st.composite
def commit_requests(draw: st.DrawFn) -> groups_pb2.CommitOffsetsRequest:
    request = groups_pb2.CommitOffsetsRequest(
        offsets=[
            groups_pb2.OffsetToCommit(
                topic=draw(names),
                partition=draw(int32s),
                offset=draw(int64s),
                metadata=draw(st.sampled_from(("", "m", "x" * 4097))),
            )
            for _ in range(draw(st.integers(0, 3)))
        ]
    )
    if draw(st.booleans()):
        request.member.CopyFrom(
            types_pb2.GroupMember(
                group_id=draw(group_ids),
                member_id=draw(st.text(max_size=8)),
                member_epoch=draw(int32s),
            )
        )
    return request


@st.composite
def reset_requests(draw: st.DrawFn) -> groups_pb2.ResetOffsetsRequest:
    request = groups_pb2.ResetOffsetsRequest(
        group_id=draw(group_ids),
        topic=draw(names),
        partitions=draw(st.lists(int32s, max_size=3)),
        dry_run=draw(st.booleans()),
    )
    to = draw(st.sampled_from(("earliest", "latest", "timestamp", "offset", "shift", "none")))
    if to == "earliest":
        request.earliest = draw(st.booleans())
    elif to == "latest":
        request.latest = draw(st.booleans())
    elif to == "timestamp":
        request.timestamp_ms = draw(int64s)
    elif to == "offset":
        request.offset = draw(int64s)
    elif to == "shift":
        request.shift_by = draw(int64s)
    return request


def _configs(draw: st.DrawFn) -> dict[str, str]:
    keys = st.sampled_from(("segment_bytes", "retention_ms", "fsync", "index_bytes_max", "bogus"))
    values = st.sampled_from(("4096", "-1", "abc", "none", "always", "9" * 30, ""))
    return draw(st.dictionaries(keys, values, max_size=2))


STRUCTURED: dict[str, st.SearchStrategy[Message]] = {
    "Produce": produce_requests(),
    "ProduceStream": produce_requests(),
    "Fetch": fetch_requests(),
    "Subscribe": subscribe_requests(),
    "ListOffsets": list_offsets_requests(),
    "InitProducer": st.builds(
        lambda n: broker_pb2.InitProducerRequest(producer_name=n),
        st.sampled_from(("", "p", "bad name", "x" * 250)) | st.text(max_size=8),
    ),
    "CreateTopic": st.builds(
        lambda name, n, config: admin_pb2.CreateTopicRequest(
            name=name, partitions=n, config=config
        ),
        st.sampled_from((*TOPICS_CREATABLE, "t", *BAD_NAMES)),
        partition_counts,
        st.composite(_configs)(),
    ),
    "DeleteTopic": st.builds(
        lambda name: admin_pb2.DeleteTopicRequest(name=name),
        st.sampled_from((*TOPICS_CREATABLE, "nope", *BAD_NAMES)) | st.text(max_size=8),
    ),
    "ListTopics": st.just(admin_pb2.ListTopicsRequest()),
    "DescribeTopic": st.builds(lambda name: admin_pb2.DescribeTopicRequest(name=name), names),
    "AddPartitions": st.builds(
        lambda name, n: admin_pb2.AddPartitionsRequest(name=name, partitions=n),
        st.sampled_from((*TOPICS_CREATABLE, "t", "nope", *BAD_NAMES)),
        st.sampled_from((-1, 0, 1, 2, 4, 1025, 2**31 - 1)),
    ),
    "Heartbeat": heartbeat_requests(),
    "LeaveGroup": st.builds(
        lambda g, m, e: groups_pb2.LeaveGroupRequest(group_id=g, member_id=m, member_epoch=e),
        group_ids,
        st.text(max_size=8),
        int32s,
    ),
    "CommitOffsets": commit_requests(),
    "FetchOffsets": st.composite(
        lambda draw: groups_pb2.FetchOffsetsRequest(
            group_id=draw(group_ids), partitions=_topic_partitions(draw)
        )
    )(),
    "ListGroups": st.just(groups_pb2.ListGroupsRequest()),
    "DescribeGroup": st.builds(lambda g: groups_pb2.DescribeGroupRequest(group_id=g), group_ids),
    "DeleteGroup": st.builds(
        lambda g: groups_pb2.DeleteGroupRequest(group_id=g),
        st.sampled_from(("g0", "g1", "nope", "", "x" * 250)) | st.text(max_size=6),
    ),
    "ResetOffsets": reset_requests(),
}


def _mutate(raw: bytes, how: str, at: int, bit: int) -> bytes:
    if how == "truncate" and raw:
        return raw[: at % len(raw)]
    if how == "flip" and raw:
        i = at % len(raw)
        return raw[:i] + bytes([raw[i] ^ (1 << bit)]) + raw[i + 1 :]
    if how == "append":
        return raw + bytes([at % 256, bit])
    return raw


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes | list[bytes]]:
    """(method name, request bytes): raw bytes one time in four, else a structured request,
    serialized and sometimes truncated, bit-flipped or extended."""
    name = draw(st.sampled_from(sorted(METHODS)))
    count = draw(st.integers(1, 3)) if METHODS[name].kind == "stream" else 1
    raws = []
    for _ in range(count):
        if draw(st.integers(0, 3)) == 0:
            raw = draw(st.binary(max_size=64))
        else:
            raw = draw(STRUCTURED[name]).SerializeToString()
            how = draw(st.sampled_from(("none", "none", "none", "truncate", "flip", "append")))
            raw = _mutate(raw, how, draw(st.integers(0, 2**16)), draw(st.integers(0, 7)))
        raws.append(raw)
    return name, raws if METHODS[name].kind == "stream" else raws[0]
