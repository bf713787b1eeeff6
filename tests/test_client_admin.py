"""Admin and AsyncAdmin against a real broker on loopback: every method, and the error classes.

Records and group state are set up with the plain gRPC stubs, so these tests depend on the
admin client only.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import grpc
import pytest

from stream._pb import broker_pb2, broker_pb2_grpc, groups_pb2, groups_pb2_grpc, types_pb2
from stream._serve import RunningBroker
from stream.client._admin import (
    Admin,
    AsyncAdmin,
    GroupListing,
    OffsetChange,
    OffsetInfo,
    PartitionInfo,
)
from stream.client._base import (
    AlreadyExistsError,
    GroupError,
    InvalidArgumentError,
    NotFoundError,
    RiverlogError,
    TopicPartition,
    UnavailableError,
)


def produce(channel: grpc.Channel, topic: str, partition: int, timestamps_ms: list[int]) -> None:
    """One record per timestamp, values v0, v1, ..."""
    records = [
        types_pb2.Record(value=b"v%d" % i, timestamp_ms=ts) for i, ts in enumerate(timestamps_ms)
    ]
    entry = broker_pb2.PartitionProduce(topic=topic, partition=partition, records=records)
    broker_pb2_grpc.BrokerStub(channel).Produce(broker_pb2.ProduceRequest(partitions=[entry]))


def commit(channel: grpc.Channel, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Commit for a group without members (member "" at epoch -1), as a tool does."""
    groups_pb2_grpc.GroupsStub(channel).CommitOffsets(
        groups_pb2.CommitOffsetsRequest(
            member=types_pb2.GroupMember(group_id=group, member_id="", member_epoch=-1),
            offsets=[
                groups_pb2.OffsetToCommit(topic=topic, partition=p, offset=o)
                for p, o in offsets.items()
            ],
        )
    )


def join(channel: grpc.Channel, group: str, topic: str) -> groups_pb2.HeartbeatResponse:
    answer: groups_pb2.HeartbeatResponse = groups_pb2_grpc.GroupsStub(channel).Heartbeat(
        groups_pb2.HeartbeatRequest(
            group_id=group,
            member_id="",
            member_epoch=0,
            subscription=groups_pb2.Subscription(topics=[topic]),
        )
    )
    return answer


@pytest.fixture
def admin(running_broker: RunningBroker) -> Iterator[Admin]:
    with Admin(running_broker.address) as a:
        yield a


def test_topics_create_list_describe_grow_delete(admin: Admin, channel: grpc.Channel) -> None:
    info = admin.create_topic("orders", 2, {"retention_ms": "60000"})
    assert info.name == "orders"
    assert len(info.topic_id) > 0
    assert info.config == {"retention_ms": "60000"}
    assert [p.partition for p in info.partitions] == [0, 1]
    admin.create_topic("audit")
    assert admin.list_topics() == [("audit", 1), ("orders", 2)]

    produce(channel, "orders", 1, [1000, 2000, 3000])
    described = admin.describe_topic("orders")
    assert described.topic_id == info.topic_id
    p1 = described.partitions[1]
    assert (p1.log_start_offset, p1.log_end_offset, p1.segment_count) == (0, 3, 1)
    assert p1.size_bytes > 0
    assert described.partitions[0] == PartitionInfo(0, 0, 0, 0, 1)

    grown = admin.add_partitions("orders", 4)
    assert [p.partition for p in grown.partitions] == [0, 1, 2, 3]
    assert grown.partitions[1] == p1

    admin.delete_topic("audit")
    assert admin.list_topics() == [("orders", 4)]


def test_list_offsets(admin: Admin, channel: grpc.Channel) -> None:
    admin.create_topic("t")
    produce(channel, "t", 0, [1000, 2000, 3000])
    assert admin.list_offsets("t", 0, "earliest") == OffsetInfo(0, 0, 3)
    assert admin.list_offsets("t", 0, "latest") == OffsetInfo(3, 0, 3)
    assert admin.list_offsets("t", 0, 1500) == OffsetInfo(1, 0, 3)
    assert admin.list_offsets("t", 0, 3000) == OffsetInfo(2, 0, 3)
    # No record at or after the time: no offset (the log end is still reported).
    assert admin.list_offsets("t", 0, 3001) == OffsetInfo(None, 0, 3)
    with pytest.raises(NotFoundError):
        admin.list_offsets("t", 7, "latest")
    with pytest.raises(NotFoundError):
        admin.list_offsets("nope", 0, "earliest")
    with pytest.raises(InvalidArgumentError, match="spec must be"):
        admin.list_offsets("t", 0, "middle")  # type: ignore[arg-type]


def test_topic_errors_map_to_their_classes(admin: Admin) -> None:
    admin.create_topic("t", 2)
    with pytest.raises(AlreadyExistsError, match="already exists") as exists:
        admin.create_topic("t")
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(NotFoundError, match="nope"):
        admin.describe_topic("nope")
    with pytest.raises(NotFoundError):
        admin.delete_topic("nope")
    with pytest.raises(NotFoundError):
        admin.add_partitions("nope", 3)
    with pytest.raises(InvalidArgumentError, match="bad name"):
        admin.create_topic("bad name")
    with pytest.raises(InvalidArgumentError):
        admin.create_topic("u", 0)
    with pytest.raises(InvalidArgumentError):
        admin.create_topic("u", 1, {"no_such_setting": "1"})
    with pytest.raises(InvalidArgumentError, match="only grow"):
        admin.add_partitions("t", 1)
    # Every one of them is a RiverlogError.
    with pytest.raises(RiverlogError):
        admin.describe_topic("nope")


def test_groups_list_describe_reset_delete(admin: Admin, channel: grpc.Channel) -> None:
    admin.create_topic("t", 2)
    produce(channel, "t", 0, [1000, 2000, 3000, 4000])
    produce(channel, "t", 1, [1000, 2000])
    assert admin.list_groups() == []
    commit(channel, "g", "t", {0: 1})

    assert admin.list_groups() == [GroupListing("g", "empty", 0)]
    d = admin.describe_group("g")
    assert (d.group_id, d.state, d.members) == ("g", "empty", [])
    lags = {(p.partition, p.committed_offset, p.log_end_offset, p.lag) for p in d.partitions}
    assert lags == {(0, 1, 4, 3), (1, None, 2, 2)}
    assert d.total_lag == 5

    dry = admin.reset_offsets("g", "t", to_earliest=True, dry_run=True)
    assert dry == [OffsetChange(0, 1, 0), OffsetChange(1, None, 0)]
    assert admin.describe_group("g").total_lag == 5  # nothing applied
    assert admin.reset_offsets("g", "t", to_latest=True, partitions=[1]) == [
        OffsetChange(1, None, 2)
    ]
    assert admin.reset_offsets("g", "t", to_offset=2, partitions=[0]) == [OffsetChange(0, 1, 2)]
    assert admin.reset_offsets("g", "t", shift_by=-1, partitions=[0]) == [OffsetChange(0, 2, 1)]
    assert admin.reset_offsets("g", "t", to_timestamp_ms=2500) == [
        OffsetChange(0, 1, 2),
        OffsetChange(1, 2, 2),  # no record at or after the time: the log end
    ]
    assert admin.describe_group("g").total_lag == 2

    admin.delete_group("g")
    assert admin.list_groups() == []
    with pytest.raises(GroupError) as unknown:
        admin.describe_group("g")
    assert unknown.value.name == "UNKNOWN_GROUP"
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(GroupError, match="unknown group"):
        admin.delete_group("g")


def test_group_with_a_member(admin: Admin, channel: grpc.Channel) -> None:
    admin.create_topic("t", 2)
    joined = join(channel, "g", "t")
    d = admin.describe_group("g")
    assert d.state != "empty"
    assert d.group_epoch >= 1
    (member,) = d.members
    assert member.member_id == joined.member_id
    assert member.topics == ["t"]
    assert member.pattern is None
    assert member.instance_id is None
    assert sorted(member.assignment) == [TopicPartition("t", 0), TopicPartition("t", 1)]
    assert admin.list_groups() == [GroupListing("g", d.state, 1)]
    # Offsets of a group with members are its members' business.
    with pytest.raises(GroupError) as not_empty:
        admin.reset_offsets("g", "t", to_earliest=True)
    assert not_empty.value.name == "GROUP_NOT_EMPTY"
    assert not_empty.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(GroupError) as not_empty:
        admin.delete_group("g")
    assert not_empty.value.name == "GROUP_NOT_EMPTY"


def test_reset_offsets_needs_exactly_one_target(admin: Admin) -> None:
    # Checked before any call: the topic need not exist.
    with pytest.raises(InvalidArgumentError, match="got 0: none"):
        admin.reset_offsets("g", "t")
    with pytest.raises(InvalidArgumentError, match="got 2: to_earliest, to_offset"):
        admin.reset_offsets("g", "t", to_earliest=True, to_offset=0)
    with pytest.raises(NotFoundError):
        admin.reset_offsets("g", "nope", to_offset=0)


def test_unreachable_broker_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on `port` now: the call fails at once, retriable.
    with Admin(f"127.0.0.1:{port}") as admin, pytest.raises(UnavailableError) as error:
        admin.list_topics()
    assert error.value.retriable


def test_server_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RIVERLOG_SERVER", "127.0.0.1:1")
    with Admin() as admin:
        assert admin.server == "127.0.0.1:1"
    with Admin("127.0.0.1:2") as admin:
        assert admin.server == "127.0.0.1:2"


def test_close_is_idempotent(running_broker: RunningBroker) -> None:
    admin = Admin(running_broker.address)
    assert admin.list_topics() == []
    admin.close()
    admin.close()


def test_async_admin(running_broker: RunningBroker, channel: grpc.Channel) -> None:
    async def scenario() -> None:
        async with AsyncAdmin(running_broker.address) as admin:
            info = await admin.create_topic("t", 2, {"segment_bytes": "1048576"})
            assert info.config == {"segment_bytes": "1048576"}
            assert await admin.list_topics() == [("t", 2)]
            produce(channel, "t", 0, [1000, 2000])
            assert (await admin.describe_topic("t")).partitions[0].log_end_offset == 2
            assert len((await admin.add_partitions("t", 3)).partitions) == 3
            assert await admin.list_offsets("t", 0, 2000) == OffsetInfo(1, 0, 2)

            commit(channel, "g", "t", {0: 0})
            assert await admin.list_groups() == [GroupListing("g", "empty", 0)]
            assert (await admin.describe_group("g")).total_lag == 2
            changes = await admin.reset_offsets("g", "t", to_latest=True, partitions=[0])
            assert changes == [OffsetChange(0, 0, 2)]
            await admin.delete_group("g")
            await admin.delete_topic("t")
            assert await admin.list_topics() == []

            with pytest.raises(NotFoundError):
                await admin.describe_topic("t")
            await admin.create_topic("u")
            with pytest.raises(AlreadyExistsError):
                await admin.create_topic("u")
            with pytest.raises(GroupError) as unknown:
                await admin.describe_group("g")
            assert unknown.value.name == "UNKNOWN_GROUP"
            with pytest.raises(InvalidArgumentError):
                await admin.add_partitions("u", 0)

    asyncio.run(scenario())
