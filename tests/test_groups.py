"""Consumer groups over the wire: riverlog.v1.Groups and group-scoped Fetch on loopback.

What a member relies on: joining covers every partition; a second member gets its share by
incremental hand-over, never with a partition in two assignments at once; commits and
group-scoped fetches are fenced by member epoch and ownership; a member that leaves or falls
silent for its session timeout loses its partitions; committed offsets survive a restart.
What an operator relies on: describe (state, members, lag), list, delete and reset, the last
two refused while the group has members. Every refusal carries its status and, for the group
protocol, its "riverlog-error" name (proto/riverlog/v1/groups.proto); nothing answers UNKNOWN
or INTERNAL.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import NewRecord, decode_records, encode_batch
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

Code = grpc.StatusCode
Part = tuple[str, int]
# Upper bound on any RPC and any wait in this file.
WAIT_S = 10.0
ERROR_KEY = "riverlog-error"
# A client's mistakes never come back as these.
SERVER_FAULTS = {Code.UNKNOWN, Code.INTERNAL}
# stream/groups/_coordinator.py: the smallest session timeout, and the heartbeat interval a
# member is asked for while a hand-over is in progress.
SESSION_TIMEOUT_MS_MIN = 1_000
RECONCILE_HEARTBEAT_INTERVAL_MS = 100
# stream/groups/_offsets.py METADATA_BYTES_MAX (Kafka's offset.metadata.max.bytes).
METADATA_BYTES_MAX = 4096


# ---------------------------------------------------------------------------- helpers
@pytest.fixture
def groups(channel: grpc.Channel) -> groups_pb2_grpc.GroupsStub:
    return groups_pb2_grpc.GroupsStub(channel)


@pytest.fixture
def stub(channel: grpc.Channel) -> broker_pb2_grpc.BrokerStub:
    return broker_pb2_grpc.BrokerStub(channel)


@pytest.fixture
def admin(channel: grpc.Channel) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(channel)


def rpc_error(call: Callable[[], object]) -> grpc.Call:
    """The error `call` fails with (it must fail, and not with a server fault)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert isinstance(error, grpc.Call)  # grpcio's errors are Calls; its stubs do not say so
    assert error.code() not in SERVER_FAULTS, error.details()
    return error


def error_name(error: grpc.Call) -> str | None:
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_KEY:
            return value if isinstance(value, str) else value.decode()
    return None


def expect(call: Callable[[], object], code: Code, name: str | None = None) -> str:
    """`call` fails with `code` and riverlog-error `name` (None: no name); its details."""
    error = rpc_error(call)
    details = error.details() or ""
    assert error.code() == code, details
    assert error_name(error) == name, details
    return details


def create(admin: admin_pb2_grpc.AdminStub, name: str, partitions: int) -> None:
    request = admin_pb2.CreateTopicRequest(name=name, partitions=partitions)
    admin.CreateTopic(request, timeout=WAIT_S)


def produce(
    stub: broker_pb2_grpc.BrokerStub, topic: str, partition: int, count: int, ts: int = 1_000
) -> None:
    """`count` records with timestamps ts, ts + 10, ... into one partition, as one batch."""
    batch = encode_batch([NewRecord(None, f"r{i}".encode(), ts + 10 * i) for i in range(count)])
    entry = broker_pb2.PartitionProduce(topic=topic, partition=partition, record_batch=batch)
    response = stub.Produce(broker_pb2.ProduceRequest(partitions=[entry]), timeout=WAIT_S)
    assert response.results[0].error.code == 0, response.results[0].error.message


def parts(items: Iterable[types_pb2.TopicPartitions]) -> frozenset[Part]:
    return frozenset((tp.topic, p) for tp in items for p in tp.partitions)


def grouped(items: Iterable[Part]) -> list[types_pb2.TopicPartitions]:
    by_topic: dict[str, list[int]] = {}
    for topic, p in sorted(items):
        by_topic.setdefault(topic, []).append(p)
    return [types_pb2.TopicPartitions(topic=t, partitions=ps) for t, ps in by_topic.items()]


def every(topic: str, count: int) -> frozenset[Part]:
    return frozenset((topic, p) for p in range(count))


@dataclass
class Member:
    """A well-behaved member: it works exactly what its last answer assigned, and reports
    that as `owned` in its next heartbeat (so it lets go of revoked partitions at once)."""

    groups: groups_pb2_grpc.GroupsStub
    group_id: str
    topics: tuple[str, ...] = ()
    pattern: str | None = None
    session_timeout_ms: int = 0
    member_id: str = ""
    epoch: int = 0
    owned: frozenset[Part] = frozenset()
    pending: frozenset[Part] = frozenset()
    answers: list[groups_pb2.HeartbeatResponse] = field(default_factory=list)
    # time.monotonic() when the last answer came: the broker heard the member before this.
    answered_s: float = 0.0

    def heartbeat(self) -> groups_pb2.HeartbeatResponse:
        request = groups_pb2.HeartbeatRequest(
            group_id=self.group_id,
            member_id=self.member_id,
            member_epoch=self.epoch,
            session_timeout_ms=self.session_timeout_ms,
        )
        if not self.member_id:
            request.subscription.topics.extend(self.topics)
            if self.pattern is not None:
                request.subscription.pattern = self.pattern
        else:
            request.owned.topics.extend(grouped(self.owned))
        answer = self.groups.Heartbeat(request, timeout=WAIT_S)
        self.member_id, self.epoch = answer.member_id, answer.member_epoch
        self.owned, self.pending = parts(answer.assignment), parts(answer.pending)
        self.answers.append(answer)
        self.answered_s = time.monotonic()
        return answer

    def as_member(self, epoch: int | None = None) -> types_pb2.GroupMember:
        return types_pb2.GroupMember(
            group_id=self.group_id,
            member_id=self.member_id,
            member_epoch=self.epoch if epoch is None else epoch,
        )

    def commit(self, offsets: dict[Part, int], epoch: int | None = None) -> None:
        commit(self.groups, self.as_member(epoch), offsets)

    def leave(self) -> None:
        request = groups_pb2.LeaveGroupRequest(
            group_id=self.group_id, member_id=self.member_id, member_epoch=self.epoch
        )
        self.groups.LeaveGroup(request, timeout=WAIT_S)


def commit(
    groups: groups_pb2_grpc.GroupsStub,
    member: types_pb2.GroupMember,
    offsets: dict[Part, int],
    metadata: str = "",
) -> None:
    request = groups_pb2.CommitOffsetsRequest(
        member=member,
        offsets=[
            groups_pb2.OffsetToCommit(topic=t, partition=p, offset=o, metadata=metadata)
            for (t, p), o in offsets.items()
        ],
    )
    groups.CommitOffsets(request, timeout=WAIT_S)


def tool(group_id: str) -> types_pb2.GroupMember:
    """The committer of a group without members (a tool, a manually assigned consumer)."""
    return types_pb2.GroupMember(group_id=group_id, member_id="", member_epoch=-1)


def fetch_offsets(
    groups: groups_pb2_grpc.GroupsStub, group_id: str, wanted: Iterable[Part] = ()
) -> dict[Part, int | None]:
    request = groups_pb2.FetchOffsetsRequest(group_id=group_id, partitions=grouped(wanted))
    answer = groups.FetchOffsets(request, timeout=WAIT_S)
    return {
        (o.topic, o.partition): o.offset if o.HasField("offset") else None for o in answer.offsets
    }


def describe(groups: groups_pb2_grpc.GroupsStub, group_id: str) -> groups_pb2.DescribeGroupResponse:
    return groups.DescribeGroup(groups_pb2.DescribeGroupRequest(group_id=group_id), timeout=WAIT_S)


def check_exclusive(info: groups_pb2.DescribeGroupResponse) -> dict[Part, str]:
    """No partition is in two members' assignments; partition -> owner, as described."""
    owner: dict[Part, str] = {}
    for m in info.members:
        for tp in parts(m.assignment):
            assert tp not in owner, f"{tp} assigned to {owner[tp]} and {m.member_id}"
            owner[tp] = m.member_id
    members = {m.member_id for m in info.members}
    for p in info.partitions:
        # A partition in an assignment is worked by its member; one being handed over is
        # still worked by the member giving it back (in no assignment until it lets go).
        tp = (p.topic, p.partition)
        assert p.member_id == owner[tp] if tp in owner else p.member_id in members | {""}, p
    return owner


def converge(members: list[Member], wanted: frozenset[Part], rounds_max: int = 10) -> int:
    """Heartbeat the members in turn until they work `wanted` between them, evenly, with
    nothing pending, checking exclusivity on both sides after every heartbeat. Rounds taken."""
    groups, group_id = members[0].groups, members[0].group_id
    for rounds in range(1, rounds_max + 1):
        for m in members:
            m.heartbeat()
            seen: set[Part] = set()
            for other in members:
                assert not seen & other.owned, "a partition is worked by two members"
                seen |= other.owned
            check_exclusive(describe(groups, group_id))
        sizes = sorted(len(m.owned) for m in members)
        covered = frozenset().union(*(m.owned for m in members))
        if covered == wanted and sizes[-1] - sizes[0] <= 1 and not any(m.pending for m in members):
            return rounds
    raise AssertionError(f"no convergence in {rounds_max} rounds: {[m.owned for m in members]}")


def fetch_as(
    stub: broker_pb2_grpc.BrokerStub, member: types_pb2.GroupMember | None, wanted: list[Part]
) -> broker_pb2.FetchResponse:
    request = broker_pb2.FetchRequest(
        partitions=[broker_pb2.FetchPartition(topic=t, partition=p, offset=0) for t, p in wanted]
    )
    if member is not None:
        request.member.CopyFrom(member)
    return stub.Fetch(request, timeout=WAIT_S)


# ---------------------------------------------------------------------------- membership
def test_join_assigns_every_partition(
    admin: admin_pb2_grpc.AdminStub, groups: groups_pb2_grpc.GroupsStub
) -> None:
    create(admin, "orders", 4)
    member = Member(groups, "g", ("orders",))
    answer = member.heartbeat()
    assert answer.member_id
    assert answer.member_epoch > 0
    assert member.owned == every("orders", 4)
    assert not member.pending
    # Default session timeout 45 s: a third of it, capped at 5 s.
    assert answer.heartbeat_interval_ms == 5_000

    info = describe(groups, "g")
    assert info.state == "stable"
    assert [m.member_id for m in info.members] == [member.member_id]
    assert check_exclusive(info) == dict.fromkeys(every("orders", 4), member.member_id)
    assert list(info.members[0].subscription.topics) == ["orders"]

    # A heartbeat that reports what it works changes nothing.
    epoch = member.epoch
    member.heartbeat()
    assert (member.owned, member.epoch) == (every("orders", 4), epoch)


def test_pattern_subscription_follows_new_topics(
    admin: admin_pb2_grpc.AdminStub, groups: groups_pb2_grpc.GroupsStub
) -> None:
    create(admin, "logs-a", 2)
    create(admin, "logs-b", 1)
    create(admin, "other", 1)
    member = Member(groups, "g", pattern=r"logs-.*")
    member.heartbeat()
    assert member.owned == every("logs-a", 2) | every("logs-b", 1)
    create(admin, "logs-c", 2)
    member.heartbeat()
    assert member.owned == every("logs-a", 2) | every("logs-b", 1) | every("logs-c", 2)


def test_second_member_gets_its_share_by_hand_over(
    admin: admin_pb2_grpc.AdminStub, groups: groups_pb2_grpc.GroupsStub
) -> None:
    create(admin, "orders", 6)
    a = Member(groups, "g", ("orders",))
    a.heartbeat()
    first_epoch = a.epoch
    b = Member(groups, "g", ("orders",))
    answer = b.heartbeat()
    # b's share is pending until a lets go of it; b is asked to heartbeat fast meanwhile.
    assert not b.owned
    assert len(b.pending) == 3
    assert answer.heartbeat_interval_ms == RECONCILE_HEARTBEAT_INTERVAL_MS
    info = describe(groups, "g")
    assert info.state == "reconciling"
    check_exclusive(info)

    rounds = converge([a, b], every("orders", 6))
    assert rounds <= 2
    assert len(a.owned) == len(b.owned) == 3
    assert a.epoch != first_epoch  # giving partitions back changed a's epoch
    info = describe(groups, "g")
    assert info.state == "stable"
    assert check_exclusive(info) == {
        **dict.fromkeys(a.owned, a.member_id),
        **dict.fromkeys(b.owned, b.member_id),
    }


def test_leave_moves_partitions_at_once(
    admin: admin_pb2_grpc.AdminStub, groups: groups_pb2_grpc.GroupsStub
) -> None:
    create(admin, "orders", 4)
    a, b = Member(groups, "g", ("orders",)), Member(groups, "g", ("orders",))
    a.heartbeat()
    b.heartbeat()
    converge([a, b], every("orders", 4))
    a_had = a.owned

    stale = a.epoch - 1
    expect(
        lambda: groups.LeaveGroup(
            groups_pb2.LeaveGroupRequest(group_id="g", member_id=a.member_id, member_epoch=stale),
            timeout=WAIT_S,
        ),
        Code.ABORTED,
        "FENCED_MEMBER",
    )
    a.leave()
    info = describe(groups, "g")
    assert [m.member_id for m in info.members] == [b.member_id]
    assert parts(info.members[0].pending) == a_had
    b.heartbeat()  # no session timeout to wait for: a is gone
    assert b.owned == every("orders", 4)
    assert describe(groups, "g").state == "stable"
    expect(a.heartbeat, Code.FAILED_PRECONDITION, "UNKNOWN_MEMBER")
    expect(a.leave, Code.FAILED_PRECONDITION, "UNKNOWN_MEMBER")


def test_silent_member_loses_its_partitions_after_its_session_timeout(
    admin: admin_pb2_grpc.AdminStub, groups: groups_pb2_grpc.GroupsStub
) -> None:
    create(admin, "orders", 4)
    quiet = Member(groups, "g", ("orders",), session_timeout_ms=SESSION_TIMEOUT_MS_MIN)
    # The survivor's own session is longer, so a slow test thread cannot expire it too.
    alive = Member(groups, "g", ("orders",), session_timeout_ms=3 * SESSION_TIMEOUT_MS_MIN)
    quiet.heartbeat()
    alive.heartbeat()
    converge([quiet, alive], every("orders", 4))
    assert quiet.answers[-1].heartbeat_interval_ms == SESSION_TIMEOUT_MS_MIN // 3
    silent_since = quiet.answered_s
    deadline = silent_since + SESSION_TIMEOUT_MS_MIN / 1000 + 5.0
    gone_after_s: float | None = None
    while time.monotonic() < deadline:
        answer = alive.heartbeat()
        members = [m.member_id for m in describe(groups, "g").members]
        if gone_after_s is None and quiet.member_id not in members:
            gone_after_s = time.monotonic() - silent_since
        if alive.owned == every("orders", 4):
            break
        time.sleep(answer.heartbeat_interval_ms / 1000)
    assert gone_after_s is not None, "the silent member was never removed"
    # Not before its session timeout (less the answer's way back, under a loaded machine).
    assert gone_after_s >= 0.5 * SESSION_TIMEOUT_MS_MIN / 1000
    assert alive.owned == every("orders", 4)
    assert describe(groups, "g").state == "stable"
    expect(quiet.heartbeat, Code.FAILED_PRECONDITION, "UNKNOWN_MEMBER")
    # Rejoining is a fresh membership that gets its share back by hand-over.
    quiet.member_id, quiet.epoch, quiet.owned = "", 0, frozenset()
    quiet.heartbeat()
    converge([quiet, alive], every("orders", 4))


# ---------------------------------------------------------------------------- offsets
def test_commit_and_fetch_offsets_round_trip(
    admin: admin_pb2_grpc.AdminStub, groups: groups_pb2_grpc.GroupsStub
) -> None:
    create(admin, "orders", 3)
    member = Member(groups, "g", ("orders",))
    member.heartbeat()
    before_ms = int(time.time() * 1000)
    request = groups_pb2.CommitOffsetsRequest(
        member=member.as_member(),
        offsets=[
            groups_pb2.OffsetToCommit(topic="orders", partition=0, offset=5, metadata="at 5"),
            groups_pb2.OffsetToCommit(topic="orders", partition=1, offset=7, metadata="é" * 2048),
        ],
    )
    groups.CommitOffsets(request, timeout=WAIT_S)
    after_ms = int(time.time() * 1000)

    wanted = groups_pb2.FetchOffsetsRequest(group_id="g", partitions=grouped(every("orders", 3)))
    answer = groups.FetchOffsets(wanted, timeout=WAIT_S)
    got = {o.partition: o for o in answer.offsets}
    assert sorted(got) == [0, 1, 2]
    assert (got[0].offset, got[0].metadata) == (5, "at 5")
    assert (got[1].offset, got[1].metadata) == (7, "é" * 2048)  # exactly 4,096 bytes
    assert not got[2].HasField("offset")
    for p in (0, 1):
        assert before_ms - 1000 <= got[p].commit_time_ms <= after_ms + 1000

    # Empty: every partition the group committed. A new commit replaces the old one.
    assert fetch_offsets(groups, "g") == {("orders", 0): 5, ("orders", 1): 7}
    member.commit({("orders", 0): 9})
    assert fetch_offsets(groups, "g") == {("orders", 0): 9, ("orders", 1): 7}


def test_commits_are_fenced_by_epoch_membership_and_ownership(
    admin: admin_pb2_grpc.AdminStub, groups: groups_pb2_grpc.GroupsStub
) -> None:
    create(admin, "orders", 4)
    create(admin, "audit", 1)
    a = Member(groups, "g", ("orders",))
    a.heartbeat()
    joined_epoch = a.epoch
    b = Member(groups, "g", ("orders",))
    b.heartbeat()
    converge([a, b], every("orders", 4))
    assert a.epoch != joined_epoch
    mine, theirs = min(a.owned), min(b.owned)

    expect(lambda: a.commit({mine: 1}, epoch=joined_epoch), Code.ABORTED, "FENCED_MEMBER")
    expect(
        lambda: commit(groups, types_pb2.GroupMember(group_id="g", member_id="x"), {mine: 1}),
        Code.FAILED_PRECONDITION,
        "UNKNOWN_MEMBER",
    )
    expect(
        lambda: commit(groups, types_pb2.GroupMember(group_id="h", member_id="x"), {mine: 1}),
        Code.FAILED_PRECONDITION,
        "UNKNOWN_MEMBER",
    )
    # It moved to b: a may not commit it (a partition of a topic a is not subscribed to, neither).
    details = expect(lambda: a.commit({theirs: 1}), Code.PERMISSION_DENIED, "NOT_OWNED")
    assert b.member_id in details
    expect(lambda: a.commit({("audit", 0): 1}), Code.PERMISSION_DENIED, "NOT_OWNED")
    # A group with members takes commits from its members only.
    expect(
        lambda: commit(groups, tool("g"), {mine: 1}), Code.FAILED_PRECONDITION, "GROUP_NOT_EMPTY"
    )
    # An epoch the member does not hold is fenced on a heartbeat as well (the one just before
    # its current epoch is let through once: its answer may have been lost).
    stale = Member(groups, "g", ("orders",), member_id=a.member_id, epoch=a.epoch + 1000)
    expect(stale.heartbeat, Code.ABORTED, "FENCED_MEMBER")
    expect(
        Member(groups, "g", ("orders",), member_id="nobody", epoch=3).heartbeat,
        Code.FAILED_PRECONDITION,
        "UNKNOWN_MEMBER",
    )

    # Nothing refused was stored; the owners' commits are.
    assert fetch_offsets(groups, "g") == {}
    a.commit({mine: 2})
    b.commit({theirs: 3})
    assert fetch_offsets(groups, "g") == {mine: 2, theirs: 3}
    # A group without members takes commits from tools (member "" and epoch -1).
    commit(groups, tool("offline"), {mine: 4})
    assert fetch_offsets(groups, "offline") == {mine: 4}


def test_group_scoped_fetch_needs_the_owner(
    admin: admin_pb2_grpc.AdminStub,
    groups: groups_pb2_grpc.GroupsStub,
    stub: broker_pb2_grpc.BrokerStub,
) -> None:
    create(admin, "orders", 2)
    for p in range(2):
        produce(stub, "orders", p, 3)
    a = Member(groups, "g", ("orders",))
    a.heartbeat()
    b = Member(groups, "g", ("orders",))
    b.heartbeat()
    converge([a, b], every("orders", 2))
    (mine,), (theirs,) = a.owned, b.owned

    expect(lambda: fetch_as(stub, a.as_member(), [theirs]), Code.PERMISSION_DENIED, "NOT_OWNED")
    expect(
        lambda: fetch_as(stub, a.as_member(), [mine, theirs]), Code.PERMISSION_DENIED, "NOT_OWNED"
    )
    expect(
        lambda: fetch_as(stub, a.as_member(a.epoch + 100), [mine]), Code.ABORTED, "FENCED_MEMBER"
    )
    stranger = types_pb2.GroupMember(group_id="g", member_id="x", member_epoch=1)
    expect(lambda: fetch_as(stub, stranger, [mine]), Code.FAILED_PRECONDITION, "UNKNOWN_MEMBER")

    (result,) = fetch_as(stub, a.as_member(), [mine]).results
    assert result.error.code == 0
    assert [r.value for r in decode_records(result.record_batches)] == [b"r0", b"r1", b"r2"]
    # Without `member` a fetch is not group-scoped: anyone may read anything.
    assert len(fetch_as(stub, None, [mine, theirs]).results) == 2


# ---------------------------------------------------------------------------- admin
def test_describe_group_shows_members_assignment_and_lag(
    admin: admin_pb2_grpc.AdminStub,
    groups: groups_pb2_grpc.GroupsStub,
    stub: broker_pb2_grpc.BrokerStub,
) -> None:
    create(admin, "orders", 3)
    produced, committed = 10, 3
    produce(stub, "orders", 0, produced)
    produce(stub, "orders", 1, 4)
    member = Member(groups, "g", ("orders",))
    member.heartbeat()
    before_ms = int(time.time() * 1000)
    member.commit({("orders", 0): committed, ("orders", 1): 4})

    info = describe(groups, "g")
    assert (info.group_id, info.state) == ("g", "stable")
    assert info.group_epoch > 0
    (m,) = info.members
    assert (m.member_id, m.member_epoch) == (member.member_id, member.epoch)
    assert parts(m.assignment) == every("orders", 3)
    assert not m.pending
    assert not m.HasField("instance_id")
    assert abs(m.last_heartbeat_ms - before_ms) < 10_000
    rows = {p.partition: p for p in info.partitions}
    assert sorted(rows) == [0, 1, 2]
    assert rows[0].committed_offset == committed
    assert (rows[0].log_start_offset, rows[0].log_end_offset) == (0, produced)
    assert rows[0].lag == produced - committed
    assert (rows[1].committed_offset, rows[1].log_end_offset, rows[1].lag) == (4, 4, 0)
    assert not rows[2].HasField("committed_offset")
    assert (rows[2].log_end_offset, rows[2].lag) == (0, 0)
    assert {p.member_id for p in info.partitions} == {member.member_id}
    assert info.total_lag == produced - committed

    # Without a commit the lag counts from the log start offset.
    produce(stub, "orders", 2, 5)
    info = describe(groups, "g")
    assert [p.lag for p in info.partitions] == [produced - committed, 0, 5]
    assert info.total_lag == produced - committed + 5

    # After the last member leaves the offsets remain: an empty group, nobody working.
    member.leave()
    info = describe(groups, "g")
    assert (info.state, list(info.members)) == ("empty", [])
    assert {p.member_id for p in info.partitions} == {""}
    assert info.total_lag == produced - committed + 5

    expect(lambda: describe(groups, "nope"), Code.NOT_FOUND, "UNKNOWN_GROUP")


def test_list_groups(admin: admin_pb2_grpc.AdminStub, groups: groups_pb2_grpc.GroupsStub) -> None:
    create(admin, "orders", 2)
    assert list(groups.ListGroups(groups_pb2.ListGroupsRequest(), timeout=WAIT_S).groups) == []
    a, b = Member(groups, "live", ("orders",)), Member(groups, "live", ("orders",))
    a.heartbeat()
    b.heartbeat()
    converge([a, b], every("orders", 2))
    commit(groups, tool("archived"), {("orders", 0): 1})
    listed = groups.ListGroups(groups_pb2.ListGroupsRequest(), timeout=WAIT_S).groups
    assert [(g.group_id, g.state, g.members) for g in listed] == [
        ("archived", "empty", 0),
        ("live", "stable", 2),
    ]


def test_delete_group_only_without_members(
    admin: admin_pb2_grpc.AdminStub, groups: groups_pb2_grpc.GroupsStub
) -> None:
    create(admin, "orders", 2)
    member = Member(groups, "g", ("orders",))
    member.heartbeat()
    member.commit({("orders", 0): 3, ("orders", 1): 4})

    def delete() -> None:
        groups.DeleteGroup(groups_pb2.DeleteGroupRequest(group_id="g"), timeout=WAIT_S)

    expect(delete, Code.FAILED_PRECONDITION, "GROUP_NOT_EMPTY")
    assert fetch_offsets(groups, "g") == {("orders", 0): 3, ("orders", 1): 4}
    member.leave()
    delete()
    assert fetch_offsets(groups, "g", every("orders", 2)) == dict.fromkeys(every("orders", 2))
    expect(lambda: fetch_offsets(groups, "g"), Code.NOT_FOUND, "UNKNOWN_GROUP")
    expect(lambda: describe(groups, "g"), Code.NOT_FOUND, "UNKNOWN_GROUP")
    assert list(groups.ListGroups(groups_pb2.ListGroupsRequest(), timeout=WAIT_S).groups) == []
    expect(delete, Code.NOT_FOUND, "UNKNOWN_GROUP")


def test_reset_offsets_every_kind_dry_run_then_applied(
    admin: admin_pb2_grpc.AdminStub,
    groups: groups_pb2_grpc.GroupsStub,
    stub: broker_pb2_grpc.BrokerStub,
) -> None:
    create(admin, "orders", 3)
    for p in range(3):
        produce(stub, "orders", p, 10, ts=1_000)  # timestamps 1000, 1010, ..., 1090
    all_three = every("orders", 3)
    # p0 and p1 committed, p2 never.
    commit(groups, tool("g"), {("orders", 0): 5, ("orders", 1): 2})
    start: dict[Part, int | None] = {("orders", 0): 5, ("orders", 1): 2, ("orders", 2): None}

    def reset(dry_run: bool, partitions: list[int], **to: Any) -> dict[int, tuple[int | None, int]]:
        request = groups_pb2.ResetOffsetsRequest(
            group_id="g", topic="orders", partitions=partitions, dry_run=dry_run, **to
        )
        answer = groups.ResetOffsets(request, timeout=WAIT_S)
        assert answer.applied is not dry_run
        return {
            c.partition: (
                c.previous_offset if c.HasField("previous_offset") else None,
                c.new_offset,
            )
            for c in answer.changes
        }

    # (the reset, partitions, the expected new offsets of p0, p1, p2 from the state before)
    cases: list[tuple[dict[str, Any], list[int], dict[int, int]]] = [
        ({"earliest": True}, [], {0: 0, 1: 0, 2: 0}),
        ({"latest": True}, [], {0: 10, 1: 10, 2: 10}),
        ({"offset": 4}, [1], {1: 4}),
        ({"offset": 99}, [0, 2], {0: 10, 2: 10}),  # clamped to the log end
        ({"timestamp_ms": 1_035}, [], {0: 4, 1: 4, 2: 4}),  # first record at or after 1035
        ({"timestamp_ms": 5_000}, [0], {0: 10}),  # none that late: the log end
        ({"shift_by": -3}, [], {0: 7, 1: 1, 2: 1}),
        ({"shift_by": -3}, [], {0: 4, 1: 0, 2: 0}),  # clamped to the log start
        ({"shift_by": 7}, [1], {1: 7}),
        ({"shift_by": 100}, [], {0: 10, 1: 10, 2: 10}),  # clamped to the log end
    ]
    state = dict(start)
    for to, partitions, expected in cases:
        previous = {p: state[("orders", p)] for p in expected}
        want = {p: (previous[p], new) for p, new in expected.items()}
        assert reset(True, partitions, **to) == want, to
        assert fetch_offsets(groups, "g", all_three) == state, f"dry run {to} changed offsets"
        assert reset(False, partitions, **to) == want, to
        state.update({("orders", p): new for p, new in expected.items()})
        assert fetch_offsets(groups, "g", all_three) == state, to

    member = Member(groups, "g", ("orders",))
    member.heartbeat()
    expect(lambda: reset(False, [], earliest=True), Code.FAILED_PRECONDITION, "GROUP_NOT_EMPTY")
    assert fetch_offsets(groups, "g", all_three) == state
    member.leave()
    expect(lambda: reset(False, []), Code.INVALID_ARGUMENT)  # reset to what?
    expect(lambda: reset(False, [3], earliest=True), Code.NOT_FOUND)
    request = groups_pb2.ResetOffsetsRequest(group_id="g", topic="nope", earliest=True)
    expect(lambda: groups.ResetOffsets(request, timeout=WAIT_S), Code.NOT_FOUND)


# ---------------------------------------------------------------------------- restart
@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[[], RunningBroker]]:
    """Starts brokers on one data directory (one at a time); every one is stopped at the end."""
    started: list[RunningBroker] = []

    def start() -> RunningBroker:
        config = ServeConfig(
            broker=BrokerConfig(data_dir=tmp_path / "data"),
            listen="127.0.0.1:0",
            workers=16,
            shutdown_grace_s=1.0,
        )
        running = RunningBroker(config)
        running.start()
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.stop()  # idempotent


def test_committed_offsets_survive_a_restart(
    start_broker: Callable[[], RunningBroker],
) -> None:
    first = start_broker()
    with grpc.insecure_channel(first.address) as channel:
        groups = groups_pb2_grpc.GroupsStub(channel)
        create(admin_pb2_grpc.AdminStub(channel), "orders", 2)
        member = Member(groups, "g", ("orders",))
        member.heartbeat()
        commit(groups, member.as_member(), {("orders", 0): 3}, metadata="zero")
        commit(groups, member.as_member(), {("orders", 1): 8}, metadata="one")
        commit(groups, tool("gone"), {("orders", 0): 1})
        groups.DeleteGroup(groups_pb2.DeleteGroupRequest(group_id="gone"), timeout=WAIT_S)
        request = groups_pb2.FetchOffsetsRequest(group_id="g")
        before = groups.FetchOffsets(request, timeout=WAIT_S)
    first.stop()

    second = start_broker()
    with grpc.insecure_channel(second.address) as channel:
        groups = groups_pb2_grpc.GroupsStub(channel)
        after = groups.FetchOffsets(request, timeout=WAIT_S)
        assert after == before
        assert [(o.offset, o.metadata) for o in after.offsets] == [(3, "zero"), (8, "one")]
        expect(lambda: fetch_offsets(groups, "gone"), Code.NOT_FOUND, "UNKNOWN_GROUP")
        # Membership is not durable: the old member rejoins and finds its offsets.
        member.groups = groups
        expect(member.heartbeat, Code.FAILED_PRECONDITION, "UNKNOWN_MEMBER")
        member.member_id, member.epoch = "", 0
        member.heartbeat()
        assert member.owned == every("orders", 2)
        assert [p.committed_offset for p in describe(groups, "g").partitions] == [3, 8]


# ---------------------------------------------------------------------------- bad input
def test_bad_membership_requests_are_invalid_argument(
    admin: admin_pb2_grpc.AdminStub, groups: groups_pb2_grpc.GroupsStub
) -> None:
    create(admin, "orders", 1)
    orders = groups_pb2.Subscription(topics=["orders"])

    def join(**fields: Any) -> None:
        request = groups_pb2.HeartbeatRequest(**{"group_id": "g", "subscription": orders, **fields})
        groups.Heartbeat(request, timeout=WAIT_S)

    bad_joins: list[dict[str, Any]] = [
        {"group_id": ""},
        {"group_id": "a group"},
        {"group_id": "g" * 250},
        {"group_id": "naïve"},
        {"subscription": None},  # joining needs a subscription
        {"subscription": groups_pb2.Subscription()},
        {"subscription": groups_pb2.Subscription(pattern="(")},
        {"subscription": groups_pb2.Subscription(pattern="x" * 1001)},
        {"subscription": groups_pb2.Subscription(topics=["orders"], pattern="o.*")},
        {"session_timeout_ms": SESSION_TIMEOUT_MS_MIN - 1},
        {"session_timeout_ms": 300_001},
        {"session_timeout_ms": -5},
        {"rebalance_timeout_ms": -1},
        {"instance_id": ""},
    ]
    for bad in bad_joins:
        expect(functools.partial(join, **bad), Code.INVALID_ARGUMENT)
    assert list(groups.ListGroups(groups_pb2.ListGroupsRequest(), timeout=WAIT_S).groups) == []
    join(group_id="g" * 249, session_timeout_ms=SESSION_TIMEOUT_MS_MIN)  # the limits themselves


def test_bad_commits(admin: admin_pb2_grpc.AdminStub, groups: groups_pb2_grpc.GroupsStub) -> None:
    create(admin, "orders", 2)
    member = Member(groups, "g", ("orders",))
    member.heartbeat()
    me = member.as_member()
    too_long = "é" * (METADATA_BYTES_MAX // 2) + "x"  # 4,097 bytes of UTF-8
    details = expect(
        lambda: commit(groups, me, {("orders", 0): 1}, metadata=too_long),
        Code.RESOURCE_EXHAUSTED,
    )
    assert "4097" in details
    assert "4096" in details
    expect(lambda: commit(groups, me, {}), Code.INVALID_ARGUMENT)
    expect(lambda: commit(groups, me, {("orders", 0): -1}), Code.INVALID_ARGUMENT)
    expect(lambda: commit(groups, me, {("orders", 2): 1}), Code.NOT_FOUND)
    expect(lambda: commit(groups, me, {("nope", 0): 1}), Code.NOT_FOUND)
    expect(lambda: commit(groups, tool("a group"), {("orders", 0): 1}), Code.INVALID_ARGUMENT)
    expect(lambda: commit(groups, tool(""), {("orders", 0): 1}), Code.INVALID_ARGUMENT)
    assert fetch_offsets(groups, "g") == {}
    assert list(groups.ListGroups(groups_pb2.ListGroupsRequest(), timeout=WAIT_S).groups) == [
        groups_pb2.ListGroupsResponse.Group(group_id="g", state="stable", members=1)
    ]


@pytest.mark.parametrize(
    "method",
    [
        "Heartbeat",
        "LeaveGroup",
        "CommitOffsets",
        "FetchOffsets",
        "ListGroups",
        "DescribeGroup",
        "DeleteGroup",
        "ResetOffsets",
    ],
)
def test_undecodable_request_is_invalid_argument(channel: grpc.Channel, method: str) -> None:
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        f"/riverlog.v1.Groups/{method}"
    )
    details = expect(
        lambda: call(b"\xff\xff\xff\xff garbage", timeout=WAIT_S), Code.INVALID_ARGUMENT
    )
    assert "undecodable" in details


# Whatever a client sends, the answer is a success or one of these; never UNKNOWN/INTERNAL.
CLIENT_ERRORS = {
    Code.OK,
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.RESOURCE_EXHAUSTED,
    Code.FAILED_PRECONDITION,
    Code.ABORTED,
    Code.PERMISSION_DENIED,
    Code.OUT_OF_RANGE,
}
_names = st.sampled_from(["g", "orders", "", "a b", "x" * 250, "(", ".*"])
_ints = st.sampled_from([-(2**31), -1, 0, 1, 2, 999, 1000, 2**31 - 1])


@st.composite
def _group_calls(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["heartbeat", "commit", "reset", "fetch", "leave"]))
    member = types_pb2.GroupMember(
        group_id=draw(_names), member_id=draw(_names), member_epoch=draw(_ints)
    )
    tps = [types_pb2.TopicPartitions(topic=draw(_names), partitions=draw(st.lists(_ints)))]
    if kind == "heartbeat":
        sub = groups_pb2.Subscription(topics=draw(st.lists(_names, max_size=2)))
        if draw(st.booleans()):
            sub.pattern = draw(_names)
        return kind, groups_pb2.HeartbeatRequest(
            group_id=member.group_id,
            member_id=draw(st.sampled_from(["", member.member_id])),
            member_epoch=draw(st.sampled_from([0, member.member_epoch])),
            subscription=sub,
            owned=groups_pb2.Owned(topics=tps),
            session_timeout_ms=draw(_ints),
            rebalance_timeout_ms=draw(_ints),
        )
    if kind == "commit":
        offsets = [
            groups_pb2.OffsetToCommit(
                topic=draw(_names),
                partition=draw(_ints),
                offset=draw(st.sampled_from([-1, 0, 5, 2**63 - 1])),
                metadata=draw(st.sampled_from(["", "m", "x" * 5000])),
            )
            for _ in range(draw(st.integers(0, 2)))
        ]
        return kind, groups_pb2.CommitOffsetsRequest(member=member, offsets=offsets)
    if kind == "reset":
        request = groups_pb2.ResetOffsetsRequest(
            group_id=member.group_id,
            topic=draw(_names),
            partitions=draw(st.lists(_ints, max_size=2)),
            dry_run=draw(st.booleans()),
        )
        to = draw(st.sampled_from(["earliest", "latest", "timestamp_ms", "offset", "shift_by"]))
        setattr(request, to, True if to in {"earliest", "latest"} else draw(_ints))
        return kind, request
    if kind == "fetch":
        return kind, broker_pb2.FetchRequest(
            partitions=[
                broker_pb2.FetchPartition(topic=draw(_names), partition=draw(_ints), offset=0)
            ],
            member=member,
        )
    return kind, groups_pb2.LeaveGroupRequest(
        group_id=member.group_id, member_id=member.member_id, member_epoch=member.member_epoch
    )


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(calls=st.lists(_group_calls(), min_size=1, max_size=5))
def test_fuzz_group_requests_get_client_errors_only(
    admin: admin_pb2_grpc.AdminStub,
    groups: groups_pb2_grpc.GroupsStub,
    stub: broker_pb2_grpc.BrokerStub,
    calls: list[tuple[str, Any]],
) -> None:
    if "orders" not in {t.name for t in admin.ListTopics(admin_pb2.ListTopicsRequest()).topics}:
        create(admin, "orders", 2)
    send: dict[str, Callable[..., Any]] = {
        "heartbeat": groups.Heartbeat,
        "commit": groups.CommitOffsets,
        "reset": groups.ResetOffsets,
        "fetch": stub.Fetch,
        "leave": groups.LeaveGroup,
    }
    outcomes: list[tuple[grpc.StatusCode, str, str, Any]] = []
    for kind, request in calls:
        try:
            send[kind](request, timeout=WAIT_S)
        except grpc.RpcError as e:
            assert isinstance(e, grpc.Call)  # noqa: PT017 (grpcio's errors are Calls)
            outcomes.append((e.code(), e.details() or "", kind, request))
    for code, details, kind, request in outcomes:
        assert code in CLIENT_ERRORS, (code, details, kind, request)
    # The broker still answers describes of whatever the calls created.
    for g in groups.ListGroups(groups_pb2.ListGroupsRequest(), timeout=WAIT_S).groups:
        describe(groups, g.group_id)


def test_group_fetch_answers_say_when_to_heartbeat(
    admin: admin_pb2_grpc.AdminStub, groups: groups_pb2_grpc.GroupsStub, channel: grpc.Channel
) -> None:
    """A stable member learns of a join from its next group-scoped fetch, not from a
    heartbeat up to 5 s away; once it has heartbeated its way to the new target, the flag
    clears."""
    stub = broker_pb2_grpc.BrokerStub(channel)
    create(admin, "orders", 4)
    a = Member(groups, "g", ("orders",))
    a.heartbeat()
    assert not fetch_as(stub, a.as_member(), sorted(a.owned)).heartbeat_now
    b = Member(groups, "g", ("orders",))
    b.heartbeat()
    assert fetch_as(stub, a.as_member(), sorted(a.owned)).heartbeat_now
    converge([a, b], every("orders", 4))
    assert not fetch_as(stub, a.as_member(), sorted(a.owned)).heartbeat_now
    assert not fetch_as(stub, b.as_member(), sorted(b.owned)).heartbeat_now
