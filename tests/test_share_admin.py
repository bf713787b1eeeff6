"""Share-group administration against a real broker on loopback: the Admin and AsyncAdmin
methods, then `riverlog share-groups` black-box (each run `python -m stream.cli ...` in a
subprocess; we read its stdout, stderr and exit code).

Share-group state is set up with the plain Share stub (join by heartbeat, acquire by fetch,
acknowledge), records with the plain Broker stub, so these tests depend on the admin client
and the command only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from stream import cli
from stream._pb import broker_pb2, broker_pb2_grpc, share_pb2, share_pb2_grpc, types_pb2
from stream._serve import RunningBroker
from stream.client._admin import (
    Admin,
    AsyncAdmin,
    OffsetChange,
    ShareGroupConfig,
    ShareGroupListing,
    SharePartitionState,
)
from stream.client._base import GroupError, InvalidArgumentError, NotFoundError

# Bounds each command: a hung command fails its test instead of stalling the suite.
COMMAND_TIMEOUT_S = 30.0
# Settings the tests create their groups with: from the log start, and locks and backoffs
# long enough that nothing expires or comes back while a test looks.
GROUP_CONFIG = share_pb2.ShareGroupConfig(
    start="earliest", lock_ms=600_000, retry_backoff_ms=600_000, retry_backoff_max_ms=600_000
)
CREATED = ShareGroupConfig(
    lock_ms=600_000,
    max_delivery_attempts=5,
    dead_letter_topic="",
    start="earliest",
    retry_backoff_ms=600_000,
    retry_backoff_max_ms=600_000,
)
ACCEPT, RELEASE, REJECT = share_pb2.ACCEPT, share_pb2.RELEASE, share_pb2.REJECT


# ---------------------------------------------------------------------------- raw protocol
def produce(channel: grpc.Channel, topic: str, partition: int, count: int) -> None:
    """`count` records with values v0, v1, ... and timestamps 1000, 2000, ... ms."""
    records = [
        types_pb2.Record(value=b"v%d" % i, timestamp_ms=1000 * (i + 1)) for i in range(count)
    ]
    entry = broker_pb2.PartitionProduce(topic=topic, partition=partition, records=records)
    broker_pb2_grpc.BrokerStub(channel).Produce(broker_pb2.ProduceRequest(partitions=[entry]))


def join(channel: grpc.Channel, group: str, *topics: str) -> str:
    """A new member of `group` (created with GROUP_CONFIG when it is new); its member id."""
    answer: share_pb2.ShareHeartbeatResponse = share_pb2_grpc.ShareStub(channel).ShareHeartbeat(
        share_pb2.ShareHeartbeatRequest(group_id=group, topics=list(topics), config=GROUP_CONFIG)
    )
    return answer.member_id


def leave(channel: grpc.Channel, group: str, member: str) -> None:
    share_pb2_grpc.ShareStub(channel).ShareLeave(
        share_pb2.ShareLeaveRequest(group_id=group, member_id=member)
    )


def acquire(channel: grpc.Channel, group: str, member: str, count: int) -> list[tuple[int, int]]:
    """Acquire `count` records (waiting for them); (partition, offset) of each."""
    answer: share_pb2.ShareFetchResponse = share_pb2_grpc.ShareStub(channel).ShareFetch(
        share_pb2.ShareFetchRequest(
            group_id=group, member_id=member, max_records=count, max_wait_ms=5000
        )
    )
    held = sorted(
        (p.partition, offset)
        for p in answer.partitions
        for r in p.acquired
        for offset in range(r.first_offset, r.last_offset + 1)
    )
    assert len(held) == count, held
    return held


def acknowledge(
    channel: grpc.Channel,
    group: str,
    member: str,
    topic: str,
    acks: dict[int, share_pb2.AckType.ValueType],
) -> None:
    """Acknowledge offsets of partition 0 of `topic`: {offset: ACCEPT | RELEASE | REJECT}."""
    answer: share_pb2.ShareAcknowledgeResponse = share_pb2_grpc.ShareStub(channel).ShareAcknowledge(
        share_pb2.ShareAcknowledgeRequest(
            group_id=group,
            member_id=member,
            acks=[
                share_pb2.Acknowledgement(
                    topic=topic, partition=0, first_offset=o, last_offset=o, type=kind
                )
                for o, kind in acks.items()
            ],
        )
    )
    assert list(answer.refused) == []


def busy_group(channel: grpc.Channel, group: str, topic: str) -> str:
    """Group `group` on a 5-record `topic` (1 partition) in a state with a bit of everything:
    offsets 0 and 3 accepted, 1 rejected (archived), 2 released (waiting out its backoff),
    4 still held by the member returned."""
    produce(channel, topic, 0, 5)
    member = join(channel, group, topic)
    assert acquire(channel, group, member, 5) == [(0, o) for o in range(5)]
    acknowledge(channel, group, member, topic, {0: ACCEPT, 1: REJECT, 2: RELEASE, 3: ACCEPT})
    return member


# Of busy_group: the start passed 0 and 1; 2..4 are in the window; lag 5 - 2 - 1 (done: 3).
BUSY_PARTITION = SharePartitionState(
    topic="t",
    partition=0,
    start_offset=2,
    end_offset=5,
    log_end_offset=5,
    available=0,
    acquired=1,
    delayed=1,
    done=1,
    lag=2,
    archived_total=1,
)


@pytest.fixture
def admin(running_broker: RunningBroker) -> Iterator[Admin]:
    with Admin(running_broker.address) as a:
        a.create_topic("t")
        yield a


# ---------------------------------------------------------------------------- Admin
def test_list_and_describe(admin: Admin, channel: grpc.Channel) -> None:
    assert admin.list_share_groups() == []
    started_ms = time.time_ns() // 1_000_000
    member = busy_group(channel, "sg", "t")
    assert admin.list_share_groups() == [ShareGroupListing("sg", 1)]

    d = admin.describe_share_group("sg")
    assert (d.group_id, d.config) == ("sg", CREATED)
    (m,) = d.members
    assert (m.member_id, m.topics, m.acquired) == (member, ["t"], 1)
    assert started_ms - 1000 <= m.last_heartbeat_ms <= time.time_ns() // 1_000_000 + 1000
    assert d.partitions == [BUSY_PARTITION]
    assert d.total_lag == 2

    # Leaving releases the member's record (offset 4): it waits out its retry backoff too.
    leave(channel, "sg", member)
    assert admin.list_share_groups() == [ShareGroupListing("sg", 0)]
    d = admin.describe_share_group("sg")
    assert d.members == []
    (p,) = d.partitions
    assert (p.available, p.acquired, p.delayed, p.lag) == (0, 0, 2, 2)


def test_alter(admin: Admin, channel: grpc.Channel) -> None:
    join(channel, "sg", "t")  # settings may change while the group has members
    altered = admin.alter_share_group("sg", lock_ms=5000, dead_letter_topic="dlq", start="latest")
    assert altered == ShareGroupConfig(
        lock_ms=5000,
        max_delivery_attempts=5,
        dead_letter_topic="dlq",
        start="latest",
        retry_backoff_ms=600_000,
        retry_backoff_max_ms=600_000,
    )
    assert admin.describe_share_group("sg").config == altered
    # Only what is given changes; "" names no dead-letter topic.
    again = admin.alter_share_group(
        "sg", max_delivery_attempts=1, dead_letter_topic="", retry_backoff_ms=0
    )
    assert again == ShareGroupConfig(5000, 1, "", "latest", 0, 600_000)


@pytest.mark.parametrize(
    "settings",
    [
        {"lock_ms": 999},
        {"lock_ms": 3_600_001},
        {"max_delivery_attempts": 0},
        {"max_delivery_attempts": 101},
        {"start": "middle"},
        {"retry_backoff_ms": -1},
        {"retry_backoff_max_ms": 3_600_001},
        {"dead_letter_topic": "bad name"},
    ],
)
def test_alter_refuses_bad_settings(
    admin: Admin, channel: grpc.Channel, settings: dict[str, Any]
) -> None:
    join(channel, "sg", "t")
    with pytest.raises(InvalidArgumentError) as refused:
        admin.alter_share_group("sg", **settings)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert admin.describe_share_group("sg").config == CREATED  # nothing changed


def test_values_protobuf_cannot_carry_are_refused_before_any_call(admin: Admin) -> None:
    with pytest.raises(InvalidArgumentError, match="alter_share_group"):
        admin.alter_share_group("nobody", lock_ms=2**40)
    with pytest.raises(InvalidArgumentError, match="reset_share_offsets"):
        admin.reset_share_offsets("nobody", "t", to_earliest=True, partitions=[2**40])


def test_reset(admin: Admin, channel: grpc.Channel) -> None:
    member = busy_group(channel, "sg", "t")
    leave(channel, "sg", member)

    assert admin.reset_share_offsets("sg", "t", to_earliest=True, dry_run=True) == [
        OffsetChange(0, 2, 0)
    ]
    assert admin.describe_share_group("sg").partitions[0].start_offset == 2  # nothing applied
    assert admin.reset_share_offsets("sg", "t", to_offset=4, partitions=[0]) == [
        OffsetChange(0, 2, 4)
    ]
    # The window is cleared, the archived count too.
    (p,) = admin.describe_share_group("sg").partitions
    assert p == SharePartitionState("t", 0, 4, 4, 5, 0, 0, 0, 0, 1, 0)
    assert admin.reset_share_offsets("sg", "t", to_timestamp_ms=2500) == [
        OffsetChange(0, 4, 2)  # the first record at or after 2.5 s (offset 2, at 3 s)
    ]
    assert admin.reset_share_offsets("sg", "t", to_latest=True) == [OffsetChange(0, 2, 5)]
    assert admin.describe_share_group("sg").total_lag == 0


def test_reset_needs_exactly_one_target(admin: Admin) -> None:
    # Checked before any call: the group need not exist.
    with pytest.raises(InvalidArgumentError, match="got 0: none"):
        admin.reset_share_offsets("nobody", "t")
    with pytest.raises(InvalidArgumentError, match="got 2: to_latest, to_offset"):
        admin.reset_share_offsets("nobody", "t", to_latest=True, to_offset=0)


def test_delete(admin: Admin, channel: grpc.Channel) -> None:
    leave(channel, "sg", busy_group(channel, "sg", "t"))
    join(channel, "other", "t")
    admin.delete_share_group("sg")
    assert admin.list_share_groups() == [ShareGroupListing("other", 1)]
    # A new group of the same name starts afresh.
    member = join(channel, "sg", "t")
    assert acquire(channel, "sg", member, 5) == [(0, o) for o in range(5)]


def test_refusals(admin: Admin, channel: grpc.Channel) -> None:
    calls: dict[str, Callable[[], object]] = {
        "describe": lambda: admin.describe_share_group("nobody"),
        "alter": lambda: admin.alter_share_group("nobody", lock_ms=5000),
        "delete": lambda: admin.delete_share_group("nobody"),
    }
    for what, call in calls.items():
        with pytest.raises(GroupError) as unknown:
            call()
        assert (unknown.value.name, unknown.value.code) == (
            "UNKNOWN_GROUP",
            grpc.StatusCode.NOT_FOUND,
        ), what
        assert "nobody" in str(unknown.value), what

    # Reset and delete want a group without members.
    join(channel, "sg", "t")
    calls = {
        "reset": lambda: admin.reset_share_offsets("sg", "t", to_earliest=True),
        "delete": lambda: admin.delete_share_group("sg"),
    }
    for what, call in calls.items():
        with pytest.raises(GroupError) as not_empty:
            call()
        assert (not_empty.value.name, not_empty.value.code) == (
            "GROUP_NOT_EMPTY",
            grpc.StatusCode.FAILED_PRECONDITION,
        ), what
    assert admin.list_share_groups() == [ShareGroupListing("sg", 1)]
    with pytest.raises(NotFoundError):
        admin.reset_share_offsets("sg", "nope", to_earliest=True)


def test_async_admin(running_broker: RunningBroker, channel: grpc.Channel) -> None:
    async def scenario() -> None:
        async with AsyncAdmin(running_broker.address) as admin:
            await admin.create_topic("t")
            member = busy_group(channel, "sg", "t")
            assert await admin.list_share_groups() == [ShareGroupListing("sg", 1)]
            d = await admin.describe_share_group("sg")
            assert d.members[0].acquired == 1
            assert d.partitions == [BUSY_PARTITION]
            assert (await admin.alter_share_group("sg", lock_ms=2000)).lock_ms == 2000
            leave(channel, "sg", member)
            changes = await admin.reset_share_offsets("sg", "t", to_earliest=True)
            assert changes == [OffsetChange(0, 2, 0)]
            await admin.delete_share_group("sg")
            assert await admin.list_share_groups() == []
            with pytest.raises(GroupError) as unknown:
                await admin.describe_share_group("sg")
            assert unknown.value.name == "UNKNOWN_GROUP"

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- the command
class ShareGroups:
    """`riverlog share-groups ARGS --server SERVER`: through `cli.main` in this process (what
    the process runs, in milliseconds) or, with `process=True`, as a whole process, black-box:
    each subcommand runs once that way."""

    def __init__(self, server: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.server = server
        self.capsys = capsys

    def run(self, *args: str, process: bool = False) -> tuple[int, str, str]:
        """(exit code, stdout, stderr)."""
        if process:
            done = riverlog("share-groups", *args, server=self.server)
            return done.returncode, done.stdout, done.stderr
        code = cli.main(["share-groups", *args, "--server", self.server])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def ok(self, *args: str, process: bool = False) -> str:
        code, out, err = self.run(*args, process=process)
        assert (code, err) == (0, ""), args
        return out

    def ok_json(self, *args: str, process: bool = False) -> Any:
        return json.loads(self.ok(*args, "--json", process=process))


def riverlog(*args: str, server: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "RIVERLOG_SERVER"}
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", *args, "--server", server],
        capture_output=True,
        text=True,
        env=environment,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


@pytest.fixture
def share_groups(admin: Admin, capsys: pytest.CaptureFixture[str]) -> ShareGroups:
    return ShareGroups(admin.server, capsys)


def test_command_list_and_describe(share_groups: ShareGroups, channel: grpc.Channel) -> None:
    assert share_groups.ok("list") == "GROUP  MEMBERS\n"
    member = busy_group(channel, "sg", "t")
    assert share_groups.ok("list", process=True).splitlines() == [
        "GROUP  MEMBERS",
        "sg           1",
    ]
    assert share_groups.ok_json("list") == [{"group_id": "sg", "members": 1}]

    lines = share_groups.ok("describe", "sg").splitlines()
    assert lines[:10] == [
        "share group              sg",
        "lock ms                  600000",
        "max delivery attempts    5",
        "dead-letter topic        -",
        "start                    earliest",
        "retry backoff ms         600000",
        "retry backoff max ms     600000",
        "members                  1",
        "total lag                2",
        "",
    ]
    assert lines[10:13] == [
        "TOPIC  PARTITION  START  END  LOG_END  AVAILABLE  ACQUIRED  DELAYED  DONE  LAG  ARCHIVED",
        "t              0      2    5        5          0         1        1     1    2         1",
        "",
    ]
    assert lines[13].split() == ["MEMBER", "TOPICS", "ACQUIRED", "LAST_HEARTBEAT"]
    member_id, topics, acquired, heartbeat = lines[14].split()
    assert (member_id, topics, acquired) == (member, "t", "1")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", heartbeat), heartbeat
    assert len(lines) == 15

    d = share_groups.ok_json("describe", "sg", process=True)
    assert d["config"] == {
        "lock_ms": 600_000,
        "max_delivery_attempts": 5,
        "dead_letter_topic": "",
        "start": "earliest",
        "retry_backoff_ms": 600_000,
        "retry_backoff_max_ms": 600_000,
    }
    (m,) = d["members"]
    assert (m["member_id"], m["topics"], m["acquired"]) == (member, ["t"], 1)
    assert isinstance(m["last_heartbeat_ms"], int)
    assert d["partitions"] == [
        {
            "topic": "t",
            "partition": 0,
            "start_offset": 2,
            "end_offset": 5,
            "log_end_offset": 5,
            "available": 0,
            "acquired": 1,
            "delayed": 1,
            "done": 1,
            "lag": 2,
            "archived_total": 1,
        }
    ]
    assert d["total_lag"] == 2


def test_command_alter(share_groups: ShareGroups, admin: Admin, channel: grpc.Channel) -> None:
    join(channel, "sg", "t")
    out = share_groups.ok(
        "alter",
        "sg",
        "--lock-ms",
        "5000",
        "--dead-letter-topic",
        "dlq",
        "--start",
        "latest",
        process=True,
    )
    assert out.splitlines() == [
        "altered share group 'sg'",
        "lock ms                  5000",
        "max delivery attempts    5",
        "dead-letter topic        dlq",
        "start                    latest",
        "retry backoff ms         600000",
        "retry backoff max ms     600000",
    ]
    altered = share_groups.ok_json(
        "alter",
        "sg",
        "--max-delivery-attempts",
        "2",
        "--retry-backoff-ms",
        "10",
        "--retry-backoff-max-ms",
        "20",
    )
    assert altered == {
        "lock_ms": 5000,
        "max_delivery_attempts": 2,
        "dead_letter_topic": "dlq",
        "start": "latest",
        "retry_backoff_ms": 10,
        "retry_backoff_max_ms": 20,
    }
    config = admin.describe_share_group("sg").config
    assert config == ShareGroupConfig(5000, 2, "dlq", "latest", 10, 20)


def test_command_reset_and_delete(
    share_groups: ShareGroups, admin: Admin, channel: grpc.Channel
) -> None:
    leave(channel, "sg", busy_group(channel, "sg", "t"))
    dry = share_groups.ok(
        "reset-offsets", "sg", "--topic", "t", "--to-earliest", "--dry-run", process=True
    )
    assert dry.splitlines() == [
        "PARTITION  PREVIOUS  NEW",
        "        0         2    0",
        "dry run: nothing changed (run without --dry-run to apply)",
    ]
    applied = share_groups.ok_json(
        "reset-offsets",
        "sg",
        "--topic",
        "t",
        "--to-timestamp",
        "1970-01-01T00:00:04Z",
        "--partition",
        "0",
    )
    assert applied == {
        "group_id": "sg",
        "topic": "t",
        "applied": True,
        "changes": [{"partition": 0, "previous": 2, "new": 3}],
    }
    out = share_groups.ok("reset-offsets", "sg", "--topic", "t", "--to-offset", "1")
    assert out.splitlines()[-1] == "reset 1 partition(s) of topic 't'"
    assert admin.describe_share_group("sg").partitions[0].start_offset == 1

    assert share_groups.ok("delete", "sg", process=True) == "deleted share group 'sg'\n"
    leave(channel, "other", join(channel, "other", "t"))
    assert share_groups.ok_json("delete", "other") == {"deleted": "other"}
    assert share_groups.ok_json("list") == []


def test_command_errors_exit_1(share_groups: ShareGroups, channel: grpc.Channel) -> None:
    join(channel, "busy", "t")
    code, out, err = share_groups.run("describe", "nobody", process=True)
    assert (code, out, err) == (1, "", "riverlog: unknown share group 'nobody'\n")
    cases = [
        (["delete", "nobody"], "riverlog: unknown share group 'nobody'\n"),
        (["alter", "nobody", "--lock-ms", "5000"], "riverlog: unknown share group 'nobody'\n"),
        (["alter", "busy", "--lock-ms", "10"], "riverlog: lock_ms"),
        (["alter", "busy", "--lock-ms", "99999999999"], "riverlog: alter_share_group: "),
        (["delete", "busy"], "riverlog: share group 'busy' has members"),
        (["reset-offsets", "busy", "--topic", "t", "--to-latest"], "riverlog: share group 'busy'"),
    ]
    for args, message in cases:
        code, out, err = share_groups.run(*args)
        assert (code, out) == (1, ""), args
        assert err.startswith(message), (args, err)
    assert share_groups.ok_json("list") == [{"group_id": "busy", "members": 1}]


SHARE_USAGE_ERRORS = [
    ["share-groups"],
    ["share-groups", "frobnicate"],
    ["share-groups", "describe"],
    ["share-groups", "alter", "sg"],
    ["share-groups", "alter", "sg", "--start", "middle"],
    ["share-groups", "alter", "sg", "--lock-ms", "soon"],
    ["share-groups", "reset-offsets", "sg", "--topic", "t"],
    ["share-groups", "reset-offsets", "sg", "--to-earliest"],
    ["share-groups", "reset-offsets", "sg", "--topic", "t", "--shift-by", "1"],
    ["share-groups", "reset-offsets", "sg", "--topic", "t", "--to-earliest", "--to-latest"],
]


def test_usage_error_exits_2() -> None:
    # One as a whole process (nothing listens on port 1: refused before any connection)...
    done = riverlog("share-groups", "alter", "sg", server="127.0.0.1:1")
    assert done.returncode == 2, done.stderr
    assert "usage: riverlog share-groups alter" in done.stderr
    assert "nothing to alter" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args", SHARE_USAGE_ERRORS)
def test_usage_errors_in_process(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # ... and all of them through main(), which is what the process runs (and faster).
    with pytest.raises(SystemExit) as exit_:
        cli.main([*args, "--server", "127.0.0.1:1"])
    assert exit_.value.code == 2
    assert "usage: riverlog" in capsys.readouterr().err
