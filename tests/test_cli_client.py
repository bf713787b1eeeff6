"""The client commands of `riverlog`, black-box: each run is `python -m stream.cli ...` in a
subprocess against a real broker on loopback; we read its stdout, stderr and exit code.

Group state is set up with the plain Groups stub (a commit by member "" at epoch -1, as for a
group without members), records with the plain Broker stub, except in the produce/consume
round trip, which goes through the Producer and Consumer classes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pty
import select
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from stream import cli
from stream._pb import broker_pb2, broker_pb2_grpc, groups_pb2, groups_pb2_grpc, types_pb2
from stream._serve import RunningBroker
from stream.cli import parse_time_ms

# Bounds each command: a hung command fails its test instead of stalling the suite.
COMMAND_TIMEOUT_S = 30.0


def riverlog(
    *args: str, server: str | None = None, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `riverlog ARGS [--server SERVER]`; RIVERLOG_SERVER is cleared unless `env` sets it."""
    environment = {k: v for k, v in os.environ.items() if k != "RIVERLOG_SERVER"}
    environment.update(env or {})
    command = [sys.executable, "-m", "stream.cli", *args]
    if server is not None:
        command += ["--server", server]
    return subprocess.run(
        command,
        input=stdin.decode(),
        capture_output=True,
        text=True,
        env=environment,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def ok(*args: str, server: str | None = None, stdin: bytes = b"") -> str:
    done = riverlog(*args, server=server, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return done.stdout


def ok_json(*args: str, server: str) -> Any:
    return json.loads(ok(*args, "--json", server=server))


def produce(
    channel: grpc.Channel, topic: str, partition: int, records: list[types_pb2.Record]
) -> None:
    entry = broker_pb2.PartitionProduce(topic=topic, partition=partition, records=records)
    broker_pb2_grpc.BrokerStub(channel).Produce(broker_pb2.ProduceRequest(partitions=[entry]))


def values(*texts: bytes) -> list[types_pb2.Record]:
    return [types_pb2.Record(value=t, timestamp_ms=1000 * (i + 1)) for i, t in enumerate(texts)]


def commit(channel: grpc.Channel, group: str, topic: str, offsets: dict[int, int]) -> None:
    groups_pb2_grpc.GroupsStub(channel).CommitOffsets(
        groups_pb2.CommitOffsetsRequest(
            member=types_pb2.GroupMember(group_id=group, member_id="", member_epoch=-1),
            offsets=[
                groups_pb2.OffsetToCommit(topic=topic, partition=p, offset=o)
                for p, o in offsets.items()
            ],
        )
    )


# ---------------------------------------------------------------------------- topics
def test_topics_as_tables(running_broker: RunningBroker) -> None:
    server = running_broker.address
    out = ok(
        "topics",
        "create",
        "orders",
        "--partitions",
        "3",
        "--config",
        "retention_ms=60000",
        server=server,
    )
    assert out == "created topic 'orders' with 3 partition(s)\n"
    ok("topics", "create", "audit", server=server)
    assert ok("topics", "list", server=server).splitlines() == [
        "TOPIC   PARTITIONS",
        "audit            1",
        "orders           3",
    ]
    described = ok("topics", "describe", "orders", server=server).splitlines()
    assert described[0] == "topic       orders"
    assert "config      retention_ms=60000" in described
    assert described[-4:] == [
        "PARTITION  LOG_START  LOG_END  SIZE_BYTES  SEGMENTS",
        "        0          0        0           0         1",
        "        1          0        0           0         1",
        "        2          0        0           0         1",
    ]
    out = ok("topics", "add-partitions", "orders", "5", server=server)
    assert out == "topic 'orders' now has 5 partitions\n"
    assert ok("topics", "delete", "audit", server=server) == "deleted topic 'audit'\n"
    assert "audit" not in ok("topics", "list", server=server)


def test_topics_as_json(running_broker: RunningBroker, channel: grpc.Channel) -> None:
    server = running_broker.address
    created = ok_json(
        "topics",
        "create",
        "t",
        "--partitions",
        "2",
        "--config",
        "fsync=always",
        "--config",
        "segment_bytes=1048576",
        server=server,
    )
    assert created["name"] == "t"
    assert created["config"] == {"fsync": "always", "segment_bytes": "1048576"}
    assert [p["partition"] for p in created["partitions"]] == [0, 1]
    assert ok_json("topics", "list", server=server) == [{"name": "t", "partitions": 2}]

    produce(channel, "t", 1, values(b"a", b"b", b"c"))
    described = ok_json("topics", "describe", "t", server=server)
    assert described["topic_id"] == created["topic_id"]
    p1 = described["partitions"][1]
    assert (p1["log_start_offset"], p1["log_end_offset"], p1["segment_count"]) == (0, 3, 1)
    assert p1["size_bytes"] > 0

    grown = ok_json("topics", "add-partitions", "t", "3", server=server)
    assert len(grown["partitions"]) == 3
    assert ok_json("topics", "delete", "t", server=server) == {"deleted": "t"}
    assert ok_json("topics", "list", server=server) == []


def test_server_from_the_environment(running_broker: RunningBroker) -> None:
    done = riverlog(
        "topics", "create", "t", "--json", env={"RIVERLOG_SERVER": running_broker.address}
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == "t"


def test_broker_errors_exit_1(running_broker: RunningBroker) -> None:
    server = running_broker.address
    ok("topics", "create", "t", server=server)
    cases = [
        (["topics", "describe", "nope"], "riverlog: unknown topic 'nope'"),
        (["topics", "delete", "nope"], "riverlog: unknown topic 'nope'"),
        (["topics", "create", "t"], "riverlog: topic 't' already exists"),
        (["topics", "create", "bad name"], "riverlog: invalid topic name 'bad name'"),
        (["topics", "create", "u", "--config", "nonsense=1"], "riverlog: "),
        (["topics", "add-partitions", "t", "1"], "riverlog: topic 't' has 1 partitions"),
        (["groups", "describe", "nobody"], "riverlog: unknown group 'nobody'"),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:  # independent commands: run them at once
        runs = list(pool.map(lambda case: riverlog(*case[0], server=server), cases))
    for (args, message), done in zip(cases, runs, strict=True):
        assert (done.returncode, done.stdout) == (1, ""), args
        assert done.stderr.startswith(message), (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_unreachable_broker_exits_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = riverlog("topics", "list", server=f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.startswith("riverlog: ")
    assert "Traceback" not in done.stderr


USAGE_ERRORS = [
    ["topics"],
    ["topics", "frobnicate"],
    ["topics", "create"],
    ["topics", "create", "t", "--partitions", "0"],
    ["topics", "create", "t", "--config", "no-equals-sign"],
    ["topics", "add-partitions", "t", "many"],
    ["groups", "reset-offsets", "g", "--topic", "t"],
    ["groups", "reset-offsets", "g", "--topic", "t", "--to-earliest", "--to-latest"],
    ["groups", "reset-offsets", "g", "--topic", "t", "--to-timestamp", "yesterday"],
    ["produce", "t", "--acks", "some"],
    ["consume", "t", "--from-beginning", "--offset", "3"],
    ["consume", "t", "--format", "xml"],
    ["consume", "t", "--group", "g", "--offset", "3"],
    ["consume", "t", "--max-messages", "0"],
]


def test_usage_errors_exit_2() -> None:
    # A few as whole processes (nothing listens on port 1: refused before any connection)...
    for args in (USAGE_ERRORS[0], USAGE_ERRORS[4], USAGE_ERRORS[12]):
        done = riverlog(*args, server="127.0.0.1:1")
        assert done.returncode == 2, (args, done.stderr)
        assert "usage: riverlog" in done.stderr, args
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args", USAGE_ERRORS)
def test_usage_errors_in_process(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # ... and all of them through main(), which is what the process runs (and faster).
    with pytest.raises(SystemExit) as exit_:
        cli.main([*args, "--server", "127.0.0.1:1"])
    assert exit_.value.code == 2
    assert "usage: riverlog" in capsys.readouterr().err


# ---------------------------------------------------------------------------- groups
def test_groups(running_broker: RunningBroker, channel: grpc.Channel) -> None:
    server = running_broker.address
    ok("topics", "create", "t", "--partitions", "2", server=server)
    produce(channel, "t", 0, values(b"a", b"b", b"c", b"d"))
    produce(channel, "t", 1, values(b"e", b"f"))
    assert ok_json("groups", "list", server=server) == []
    commit(channel, "g", "t", {0: 1})

    assert ok("groups", "list", server=server).splitlines() == [
        "GROUP  STATE  MEMBERS",
        "g      empty        0",
    ]
    assert ok_json("groups", "list", server=server) == [
        {"group_id": "g", "state": "empty", "members": 0}
    ]
    text = ok("groups", "describe", "g", server=server).splitlines()
    assert "total lag    5" in text
    assert text[-3:] == [
        "TOPIC  PARTITION  COMMITTED  LOG_START  LOG_END  LAG  MEMBER",
        "t              0          1          0        4    3  -",
        "t              1          -          0        2    2  -",
    ]
    described = ok_json("groups", "describe", "g", server=server)
    assert (described["state"], described["members"], described["total_lag"]) == ("empty", [], 5)
    assert [(p["partition"], p["committed_offset"], p["lag"]) for p in described["partitions"]] == [
        (0, 1, 3),
        (1, None, 2),
    ]

    dry = ok(
        "groups", "reset-offsets", "g", "--topic", "t", "--to-earliest", "--dry-run", server=server
    ).splitlines()
    assert dry == [
        "PARTITION  PREVIOUS  NEW",
        "        0         1    0",
        "        1         -    0",
        "dry run: nothing changed (run without --dry-run to apply)",
    ]
    dry_json = ok_json(
        "groups",
        "reset-offsets",
        "g",
        "--topic",
        "t",
        "--to-offset",
        "2",
        "--partition",
        "0",
        "--dry-run",
        server=server,
    )
    assert dry_json == {
        "group_id": "g",
        "topic": "t",
        "applied": False,
        "changes": [{"partition": 0, "previous": 1, "new": 2}],
    }
    assert ok_json("groups", "describe", "g", server=server)["total_lag"] == 5  # unchanged

    applied = ok_json(
        "groups",
        "reset-offsets",
        "g",
        "--topic",
        "t",
        "--to-timestamp",
        "1970-01-01T00:00:02Z",
        server=server,
    )
    assert applied["applied"] is True
    assert applied["changes"] == [
        {"partition": 0, "previous": 1, "new": 1},
        {"partition": 1, "previous": None, "new": 1},
    ]
    out = ok("groups", "reset-offsets", "g", "--topic", "t", "--shift-by", "-1", server=server)
    assert out.splitlines()[-1] == "reset 2 partition(s) of topic 't'"
    assert ok_json("groups", "describe", "g", server=server)["total_lag"] == 6

    assert ok("groups", "delete", "g", server=server) == "deleted group 'g'\n"
    assert ok_json("groups", "list", server=server) == []
    done = riverlog("groups", "delete", "g", server=server)
    assert (done.returncode, done.stderr) == (1, "riverlog: unknown group 'g'\n")


def test_reset_offsets_of_a_group_with_members_exits_1(
    running_broker: RunningBroker, channel: grpc.Channel
) -> None:
    server = running_broker.address
    ok("topics", "create", "t", server=server)
    groups_pb2_grpc.GroupsStub(channel).Heartbeat(
        groups_pb2.HeartbeatRequest(
            group_id="g", subscription=groups_pb2.Subscription(topics=["t"])
        )
    )
    described = ok("groups", "describe", "g", server=server)
    assert "members      1" in described
    member_header, member = described.splitlines()[-2:]
    assert member_header.split() == ["MEMBER", "INSTANCE", "EPOCH", "ASSIGNED", "PENDING"]
    assert member.split()[1:] == ["-", "1", "t:0", "-"]
    done = riverlog("groups", "reset-offsets", "g", "--topic", "t", "--to-latest", server=server)
    assert done.returncode == 1
    assert done.stderr.startswith("riverlog: group 'g' has members")


# ---------------------------------------------------------------------------- consume, produce
def test_consume_formats(running_broker: RunningBroker, channel: grpc.Channel) -> None:
    server = running_broker.address
    ok("topics", "create", "t", server=server)
    produce(
        channel,
        "t",
        0,
        [
            types_pb2.Record(
                key=b"k1",
                value=b"v1",
                timestamp_ms=1000,
                headers=[types_pb2.Header(key="h", value=b"x"), types_pb2.Header(key="n")],
            ),
            types_pb2.Record(value=b"\xff\x00tab\there", timestamp_ms=2000),
        ],
    )
    base = ["consume", "t", "--from-beginning", "--max-messages", "2", "--timeout-ms", "10000"]
    lines = [json.loads(line) for line in ok(*base, "--format", "json", server=server).splitlines()]
    assert lines == [
        {
            "topic": "t",
            "partition": 0,
            "offset": 0,
            "timestamp_ms": 1000,
            "key": "k1",
            "value": "v1",
            "headers": [{"key": "h", "value": "x"}, {"key": "n", "value": None}],
        },
        {
            "topic": "t",
            "partition": 0,
            "offset": 1,
            "timestamp_ms": 2000,
            "key": None,
            "value": {"base64": base64.b64encode(b"\xff\x00tab\there").decode()},
            "headers": [],
        },
    ]
    assert ok(*base, server=server).splitlines() == [
        "0\t0\tk1\tv1",
        "0\t1\t(null)\t\\xff\x00tab\\there",
    ]
    raw = subprocess.run(
        [sys.executable, "-m", "stream.cli", *base, "--format", "raw", "--server", server],
        capture_output=True,
        timeout=COMMAND_TIMEOUT_S,
        check=True,
    )
    assert raw.stdout == b"v1\n\xff\x00tab\there\n"
    # Start positions: an offset, a time (ms or ISO 8601), one partition.
    by_offset = ok(
        "consume",
        "t",
        "--offset",
        "1",
        "--max-messages",
        "1",
        "--timeout-ms",
        "10000",
        "--format",
        "json",
        server=server,
    )
    assert json.loads(by_offset)["offset"] == 1
    by_time = ok(
        "consume",
        "t",
        "--timestamp",
        "1970-01-01T00:00:01.500Z",
        "--partition",
        "0",
        "--max-messages",
        "1",
        "--timeout-ms",
        "10000",
        server=server,
    )
    assert by_time.startswith("0\t1\t")


def test_consume_stops_on_its_idle_timeout(
    running_broker: RunningBroker, channel: grpc.Channel
) -> None:
    server = running_broker.address
    ok("topics", "create", "t", server=server)
    produce(channel, "t", 0, values(b"a"))
    # Without --max-messages the idle time-out is the normal end.
    assert ok("consume", "t", "--from-beginning", "--timeout-ms", "300", server=server) == (
        "0\t0\t(null)\ta\n"
    )
    # From the log end (the default start) there is nothing new.
    assert ok("consume", "t", "--timeout-ms", "300", server=server) == ""
    # With --max-messages, running out of time before them is an error.
    done = riverlog(
        "consume",
        "t",
        "--from-beginning",
        "--max-messages",
        "2",
        "--timeout-ms",
        "300",
        server=server,
    )
    assert done.returncode == 1
    assert done.stdout == "0\t0\t(null)\ta\n"
    assert done.stderr == "riverlog: no record for 300 ms; printed 1 of 2\n"
    done = riverlog("consume", "nope", "--timeout-ms", "300", server=server)
    assert (done.returncode, done.stderr) == (1, "riverlog: unknown topic 'nope'\n")
    done = riverlog("consume", "t", "--partition", "3", "--timeout-ms", "300", server=server)
    assert (done.returncode, done.stderr) == (
        1,
        "riverlog: topic 't' has 1 partition(s), no partition 3\n",
    )


def test_produce_then_consume_round_trip(running_broker: RunningBroker) -> None:
    server = running_broker.address
    ok("topics", "create", "t", server=server)
    out = ok(
        "produce",
        "t",
        "--key-separator",
        ":",
        "--header",
        "source=cli",
        server=server,
        stdin=b"k1:v1\nk2:v2\n",
    )
    assert out == "2 record(s) acknowledged\n"
    consumed = ok(
        "consume",
        "t",
        "--from-beginning",
        "--max-messages",
        "2",
        "--format",
        "json",
        "--timeout-ms",
        "10000",
        server=server,
    )
    records = [json.loads(line) for line in consumed.splitlines()]
    assert [(r["partition"], r["offset"], r["key"], r["value"]) for r in records] == [
        (0, 0, "k1", "v1"),
        (0, 1, "k2", "v2"),
    ]
    assert records[0]["headers"] == [{"key": "source", "value": "cli"}]
    summary = ok(
        "produce",
        "t",
        "--json",
        "--acks",
        "all",
        "--compression",
        "zstd",
        "--partition",
        "0",
        server=server,
        stdin=b"a\nb\nc",
    )
    assert json.loads(summary) == {"acknowledged": 3, "failed": 0}
    assert (
        json.loads(ok("topics", "describe", "t", "--json", server=server))["partitions"][0][
            "log_end_offset"
        ]
        == 5
    )


def test_consume_as_a_group_commits_what_it_printed(running_broker: RunningBroker) -> None:
    server = running_broker.address
    ok("topics", "create", "t", server=server)
    ok("produce", "t", "--partition", "0", server=server, stdin=b"a\nb\nc\n")
    out = ok(
        "consume",
        "t",
        "--group",
        "g",
        "--from-beginning",
        "--max-messages",
        "2",
        "--timeout-ms",
        "10000",
        server=server,
    )
    assert out == "0\t0\t(null)\ta\n0\t1\t(null)\tb\n"
    described = json.loads(ok("groups", "describe", "g", "--json", server=server))
    assert [(p["committed_offset"], p["lag"]) for p in described["partitions"]] == [(2, 1)]


def test_produce_failures_exit_1(running_broker: RunningBroker) -> None:
    server = running_broker.address
    ok("topics", "create", "t", server=server)
    done = riverlog("produce", "t", "--key-separator", ":", server=server, stdin=b"k:v\nnokey\n")
    assert done.returncode == 1
    assert done.stdout == "1 record(s) acknowledged, 1 failed\n"
    assert done.stderr == "riverlog: line 2: no key separator ':'\n"
    done = riverlog("produce", "nope", server=server, stdin=b"a\n")
    assert done.returncode == 1
    assert "unknown topic 'nope'" in done.stderr


# ---------------------------------------------------------------------------- time parsing
@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("0", 0),
        ("1714564800123", 1714564800123),
        ("2024-05-01T12:00:00Z", 1714564800000),
        ("2024-05-01T12:00:00.123+00:00", 1714564800123),
        ("2024-05-01T14:00:00+02:00", 1714564800000),
    ],
)
def test_times_are_ms_or_iso_8601(text: str, ms: int) -> None:
    assert parse_time_ms(text) == ms


# ---------------------------------------------------------------------------- progress display
def test_no_progress_display_off_a_terminal(running_broker: RunningBroker) -> None:
    server = running_broker.address
    ok("topics", "create", "t", server=server)
    # stderr is a pipe here: not a line of progress, and `rich` is not even imported.
    script = (
        "import sys; from stream.cli import main; code = main(sys.argv[1:]); "
        "assert 'rich' not in sys.modules, 'rich was imported'; sys.exit(code)"
    )
    for args, stdin in [
        (["produce", "t"], "a\nb\n"),
        (["consume", "t", "--from-beginning", "--max-messages", "2", "--timeout-ms", "10000"], ""),
    ]:
        done = subprocess.run(
            [sys.executable, "-c", script, *args, "--server", server],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        assert (done.returncode, done.stderr) == (0, ""), args


def _read_all(fd: int) -> str:
    """Everything written to a pty so far: one read may return only the first write."""
    chunks: list[bytes] = []
    for _ in range(1000):
        ready, _w, _x = select.select([fd], [], [], 0.05)
        if not ready:
            break
        try:
            chunks.append(os.read(fd, 1 << 16))
        except OSError:  # EIO: the terminal side is closed and everything was read
            break
    return b"".join(chunks).decode(errors="replace")


def test_progress_display_on_a_terminal(
    running_broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = running_broker.address
    ok("topics", "create", "t", server=server)
    monkeypatch.setattr(cli, "PROGRESS_DELAY_S", 0.0)  # show it from the first record
    master, replica = pty.openpty()
    try:
        with open(replica, "w", encoding="utf-8") as terminal:
            monkeypatch.setattr(sys, "stderr", terminal)
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a\nbb\nccc\n")))
            assert cli.main(["produce", "t", "--server", server]) == 0
        shown = _read_all(master)
    finally:
        os.close(master)
    assert "sent 3 records" in shown
    assert "records/s" in shown
