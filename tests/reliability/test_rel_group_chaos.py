"""Group chaos: members and the broker killed with SIGKILL, again and again, while a consumer
group works through a pre-filled topic.

Three members (tests/reliability/rel_group_member.py: one stream.Consumer per process,
manual commit after each poll's records are processed) share a topic of six partitions. At
seeded moments of the run (fractions of the records processed) the test kills either a random
member (and starts a replacement at once) or the broker (and restarts it on the same port and
data directory); 7 kills in the short form, 30 with --long. A thread in the test describes the
group ten times a second. At the end the group must have processed and committed everything,
and the logs must show:

- committed offsets never go backwards: in the broker's answers over time, in the members'
  acknowledged commits in the order they were sent, and no answer below a commit acknowledged
  before it was asked (durable across broker kills);
- one owner per partition: no answer shows a partition in two members' assignments; and the
  times two processes worked one partition (from on_assign to on_revoke, or to the SIGKILL)
  never overlap, except around a broker kill, whose restart forgets the group (a member of the
  dead broker works the records it already polled until it learns it is gone; its commits are
  refused);
- every record processed at least once, and no anomaly in the history checker (poll skips or
  non-monotonic polls within one ownership, values at the wrong offsets);
- redelivery bounded by the last commit: a member that gets a partition starts at or after the
  last commit acknowledged before, and no further than the last one attempted before.
"""

from __future__ import annotations

import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple, Protocol

import grpc
import pytest
from history import History
from rel_broker import RPC_TIMEOUT_S, RestartableBroker, log_ranges

from storage import NewRecord, encode_batch
from stream import TopicPartition
from stream._pb import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    groups_pb2,
    groups_pb2_grpc,
)

pytestmark = pytest.mark.slow

MEMBER = Path(__file__).resolve().with_name("rel_group_member.py")
TOPIC = "chaos"
GROUP = "chaos-workers"
PARTITIONS = 6
MEMBERS = 3
RECORDS_PER_PARTITION = 3_000
RECORDS_PER_PARTITION_LONG = 10_000
MEMBER_KILLS = 4
BROKER_KILLS = 3
MEMBER_KILLS_LONG = 20
BROKER_KILLS_LONG = 10
# Kills happen once this fraction of the records was processed (seeded, uniform) ...
KILL_AT_FRACTION_MIN = 0.05
KILL_AT_FRACTION_MAX = 0.85
# ... and only once the group committed this many times since the last kill (it recovered).
RECOVERED_COMMITS = 10
BATCH_RECORDS = 500
# Per member: records per poll (one commit each) and work per record.
MAX_RECORDS = 50
WORK_US = 1_000
DESCRIBE_PERIOD_S = 0.1
# Bounds of the waits.
PROGRESS_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 60.0
MEMBER_EXIT_TIMEOUT_S = 20.0
MEMBER_MAX_SECONDS = 600
POLL_S = 0.05


# ---------------------------------------------------------------------------- member logs
class Assign(NamedTuple):
    ns: int
    member_id: str
    positions: dict[int, int]


class Revoke(NamedTuple):
    ns: int
    member_id: str
    partitions: tuple[int, ...]


class Processed(NamedTuple):
    ns: int
    member_id: str
    partition: int
    offset: int
    value: bytes


class Sent(NamedTuple):
    """A commit about to be sent: the broker may apply it whatever happens next."""

    ns: int
    member_id: str
    offsets: dict[int, int]


class Outcome(NamedTuple):
    """The answer to the last Sent of the same process."""

    ns: int
    acked: bool
    error: str


Event = Assign | Revoke | Processed | Sent | Outcome


class Commit(NamedTuple):
    """A Sent with its Outcome (done_ns -1 and not acknowledged: the process was killed)."""

    sent_ns: int
    done_ns: int
    member_id: str
    offsets: dict[int, int]
    acked: bool


def offsets_of(fields: list[str]) -> dict[int, int]:
    """{partition: offset} of "partition:offset" fields."""
    out = {}
    for x in fields:
        partition, offset = x.split(":")
        out[int(partition)] = int(offset)
    return out


def parse(line: str) -> Event:
    kind, *f = line.split()
    if kind == "A":
        return Assign(int(f[0]), f[1], offsets_of(f[3:]))
    if kind == "V":
        return Revoke(int(f[0]), f[1], tuple(map(int, f[3:])))
    if kind == "R":
        return Processed(int(f[0]), f[1], int(f[3]), int(f[4]), f[5].encode())
    if kind == "S":
        return Sent(int(f[0]), f[1], offsets_of(f[3:]))
    assert kind in "CF", line
    return Outcome(int(f[0]), kind == "C", f[3] if kind == "F" else "")


def commits_of(events: list[Event]) -> list[Commit]:
    out = []
    sent: Sent | None = None
    for e in events:
        if isinstance(e, Sent):
            if sent is not None:
                out.append(Commit(sent.ns, -1, sent.member_id, sent.offsets, False))
            sent = e
        elif isinstance(e, Outcome):
            assert sent is not None, e
            out.append(Commit(sent.ns, e.ns, sent.member_id, sent.offsets, e.acked))
            sent = None
    if sent is not None:
        out.append(Commit(sent.ns, -1, sent.member_id, sent.offsets, False))
    return out


class MemberLog(Protocol):
    """What the checks read of a member process: its events, and when it was killed."""

    label: str
    events: list[Event]
    killed_ns: int | None


@dataclass
class MemberProcess:
    label: str
    out: Path
    stderr_path: Path
    proc: subprocess.Popen[bytes]
    stderr: IO[bytes]
    events: list[Event] = field(default_factory=list)
    read_bytes: int = 0
    killed_ns: int | None = None

    def refresh(self) -> list[Event]:
        """Events appended since the last call (whole lines only)."""
        with self.out.open("rb") as f:
            f.seek(self.read_bytes)
            data = f.read()
        whole = data[: data.rfind(b"\n") + 1]
        self.read_bytes += len(whole)
        new = [parse(line) for line in whole.decode("ascii").splitlines()]
        self.events.extend(new)
        return new

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.killed_ns = time.time_ns()
        self.stderr.close()

    def stderr_tail(self, lines: int = 10) -> str:
        text = self.stderr_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.label} (exit {self.proc.poll()}):\n" + "\n".join(text)


def start_member(address: str, tmp_path: Path, label: str) -> MemberProcess:
    out = tmp_path / f"{label}.events"
    out.touch()
    stderr_path = tmp_path / f"{label}.stderr"
    stderr = stderr_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(MEMBER),
            *("--server", address, "--group", GROUP, "--topic", TOPIC, "--out", str(out)),
            *("--max-records", str(MAX_RECORDS), "--work-us", str(WORK_US)),
            *("--max-seconds", str(MEMBER_MAX_SECONDS)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    return MemberProcess(label, out, stderr_path, proc, stderr)


# ---------------------------------------------------------------------------- the broker's view
class Snapshot(NamedTuple):
    """One DescribeGroup answer: when it was asked, committed offsets, assignments."""

    sent_ns: int
    committed: dict[int, int]
    assignments: dict[str, tuple[int, ...]]


class GroupWatcher:
    """Describes the group every DESCRIBE_PERIOD_S on a thread; calls that fail (the broker
    is down) are skipped."""

    def __init__(self, broker: RestartableBroker) -> None:
        self.broker = broker
        self.snapshots: list[Snapshot] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="group-watcher", daemon=True)

    def __enter__(self) -> GroupWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(RPC_TIMEOUT_S + 5)

    def describe(self) -> Snapshot | None:
        sent_ns = time.time_ns()
        request = groups_pb2.DescribeGroupRequest(group_id=GROUP)
        try:
            with grpc.insecure_channel(self.broker.address) as channel:
                answer = groups_pb2_grpc.GroupsStub(channel).DescribeGroup(request, timeout=1.0)
        except grpc.RpcError:
            self.failed += 1
            return None
        committed = {
            p.partition: p.committed_offset
            for p in answer.partitions
            if p.HasField("committed_offset")
        }
        assignments = {
            m.member_id: tuple(p for tp in m.assignment for p in tp.partitions)
            for m in answer.members
        }
        return Snapshot(sent_ns, committed, assignments)

    def _run(self) -> None:
        while not self._stop.wait(DESCRIBE_PERIOD_S):
            snapshot = self.describe()
            if snapshot is not None:
                self.snapshots.append(snapshot)


# ---------------------------------------------------------------------------- set-up
def prefill(address: str, records: int) -> list[list[bytes]]:
    """`records` unique values into each partition, acks all; the values by partition, offset."""
    values: list[list[bytes]] = []
    with grpc.insecure_channel(address) as channel:
        admin_pb2_grpc.AdminStub(channel).CreateTopic(
            admin_pb2.CreateTopicRequest(name=TOPIC, partitions=PARTITIONS), timeout=RPC_TIMEOUT_S
        )
        stub = broker_pb2_grpc.BrokerStub(channel)
        for partition in range(PARTITIONS):
            mine = [f"v{partition}-{i:07d}".encode() for i in range(records)]
            values.append(mine)
            for start in range(0, records, BATCH_RECORDS):
                chunk = mine[start : start + BATCH_RECORDS]
                batch = encode_batch([NewRecord(None, v, int(time.time() * 1000)) for v in chunk])
                entry = broker_pb2.PartitionProduce(
                    topic=TOPIC, partition=partition, record_batch=batch
                )
                request = broker_pb2.ProduceRequest(acks=broker_pb2.ACKS_ALL, partitions=[entry])
                (result,) = stub.Produce(request, timeout=RPC_TIMEOUT_S).results
                assert result.error.code == 0, result.error.message
                assert result.base_offset == start
    return values


# ---------------------------------------------------------------------------- checks
@dataclass
class Ownership:
    label: str
    member_id: str
    partition: int
    start_ns: int
    end_ns: int


def ownerships(members: Sequence[MemberLog], end_ns: int) -> tuple[list[Ownership], list[str]]:
    """Per process and partition, from on_assign to on_revoke (or its SIGKILL, or `end_ns`);
    and the processed records that fall outside every ownership of their process."""
    found: list[Ownership] = []
    strays: list[str] = []
    for m in members:
        open_: dict[int, Ownership] = {}
        for e in m.events:
            if isinstance(e, Assign):
                for p in e.positions:
                    assert p not in open_, f"{m.label}: partition {p} assigned twice: {e}"
                    open_[p] = Ownership(m.label, e.member_id, p, e.ns, end_ns)
            elif isinstance(e, Revoke):
                for p in e.partitions:
                    own = open_.pop(p, None)
                    if own is not None:
                        own.end_ns = e.ns
                        found.append(own)
            elif isinstance(e, Processed) and e.partition not in open_:
                strays.append(f"{m.label}: {e}")
        for own in open_.values():
            own.end_ns = m.killed_ns or end_ns
            found.append(own)
    return found, strays


def overlaps(owned: list[Ownership], broker_kills_ns: list[int]) -> list[str]:
    """Two processes working one partition at once, with no broker kill between the two
    assignments to excuse it."""
    found = []
    for p in range(PARTITIONS):
        mine = sorted((o for o in owned if o.partition == p), key=lambda o: o.start_ns)
        for i, a in enumerate(mine):
            for b in mine[i + 1 :]:
                if b.start_ns >= a.end_ns:
                    continue
                if a.label == b.label:
                    continue
                if any(a.start_ns < k < b.start_ns for k in broker_kills_ns):
                    continue
                found.append(f"partition {p}: {a} and {b}")
    return found


def commit_order_problems(commits: list[Commit]) -> list[str]:
    """Acknowledged commits, in the order they were sent, going backwards in a partition."""
    problems = []
    last: dict[int, tuple[int, Commit]] = {}
    for c in sorted((c for c in commits if c.acked), key=lambda c: c.sent_ns):
        for p, offset in c.offsets.items():
            before = last.get(p)
            if before is not None and offset < before[0]:
                problems.append(f"partition {p}: {before[1]} then {c}")
            last[p] = (offset, c)
    return problems


def snapshot_problems(snapshots: list[Snapshot], commits: list[Commit]) -> list[str]:
    """The broker's committed offsets going backwards, below an acknowledged commit, or a
    partition in two assignments of one answer."""
    problems = []
    last: dict[int, int] = {}
    acked = sorted((c.done_ns, p, o) for c in commits if c.acked for p, o in c.offsets.items())
    floor: dict[int, int] = {}
    i = 0
    for s in snapshots:
        while i < len(acked) and acked[i][0] < s.sent_ns:
            _, p, o = acked[i]
            floor[p] = max(floor.get(p, 0), o)
            i += 1
        for p, o in s.committed.items():
            if o < last.get(p, 0):
                problems.append(f"partition {p}: committed {last[p]}, then {o}")
            if o < floor.get(p, 0):
                problems.append(f"partition {p}: committed {o} after {floor[p]} was acknowledged")
            last[p] = o
        problems.extend(
            f"partition {p}: no commit after {floor[p]} was acknowledged"
            for p in floor
            if p not in s.committed
        )
        owners = Counter(p for parts in s.assignments.values() for p in parts)
        problems.extend(
            f"partition {p} assigned to {n} members at once: {s.assignments}"
            for p, n in owners.items()
            if n > 1
        )
    return problems


def start_problems(members: Sequence[MemberLog], commits: list[Commit]) -> list[str]:
    """Each assignment starts at or after the last commit acknowledged before it, at or before
    the last one attempted before it; and the member's first record there is at that position."""
    problems = []
    for m in members:
        for i, e in enumerate(m.events):
            if not isinstance(e, Assign):
                continue
            for p, position in e.positions.items():
                low = max(
                    (
                        c.offsets[p]
                        for c in commits
                        if c.acked and p in c.offsets and c.done_ns < e.ns
                    ),
                    default=0,
                )
                high = max(
                    (c.offsets[p] for c in commits if p in c.offsets and c.sent_ns < e.ns),
                    default=0,
                )
                if not low <= position <= high:
                    problems.append(
                        f"{m.label}: {p} assigned at {position}, commits acknowledged up to "
                        f"{low}, attempted up to {high}: {e}"
                    )
                for later in m.events[i + 1 :]:
                    if isinstance(later, Revoke) and p in later.partitions:
                        break
                    if isinstance(later, Processed) and later.partition == p:
                        if later.offset != position:
                            problems.append(f"{m.label}: {p} assigned at {position}, first {later}")
                        break
    return problems


# ---------------------------------------------------------------------------- the test
@dataclass
class Run:
    """The broker, the member processes, and what they logged so far."""

    tmp_path: Path
    broker: RestartableBroker
    total: int
    members: list[MemberProcess] = field(default_factory=list)
    live: list[MemberProcess] = field(default_factory=list)
    processed: Counter[tuple[int, int]] = field(default_factory=Counter)
    lines: int = 0
    # When each acknowledged commit was answered.
    acked_ns: list[int] = field(default_factory=list)
    broker_kills_ns: list[int] = field(default_factory=list)
    member_kills: int = 0

    def refresh(self) -> None:
        for m in self.members:
            for e in m.refresh():
                if isinstance(e, Processed):
                    self.processed[(e.partition, e.offset)] += 1
                    self.lines += 1
                elif isinstance(e, Outcome) and e.acked:
                    self.acked_ns.append(e.ns)

    def wait_for(self, what: str, timeout_s: float, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout_s
        for _ in range(int(timeout_s / POLL_S) + 1):
            self.refresh()
            if done():
                return
            dead = [m.label for m in self.live if m.proc.poll() is not None]
            assert not dead, f"{dead} exited\n{self.diagnostics()}"
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        pytest.fail(
            f"no {what} after {timeout_s} s: {len(self.processed)} of {self.total} records "
            f"processed\n{self.diagnostics()}"
        )

    def progressed(self, fraction: float, since_ns: int) -> Callable[[], bool]:
        """`fraction` of the records processed, and the group committing again since."""

        def check() -> bool:
            recovered = sum(ns > since_ns for ns in self.acked_ns) >= RECOVERED_COMMITS
            return recovered and len(self.processed) >= fraction * self.total

        return check

    def diagnostics(self) -> str:
        return "\n".join([self.broker.stderr_tail(), *(m.stderr_tail() for m in self.members)])

    def spawn(self) -> None:
        member = start_member(self.broker.address, self.tmp_path, f"m{len(self.members)}")
        self.members.append(member)
        self.live.append(member)

    def kill_member(self, rng: random.Random) -> None:
        self.live.pop(rng.randrange(len(self.live))).kill()
        self.member_kills += 1
        self.spawn()

    def kill_broker(self) -> None:
        self.broker_kills_ns.append(time.time_ns())
        self.broker.kill()
        self.broker.start()

    def stop_members(self) -> None:
        for m in self.live:
            m.proc.send_signal(signal.SIGTERM)
        for m in self.live:
            code = m.proc.wait(timeout=MEMBER_EXIT_TIMEOUT_S)
            assert code == 0, m.stderr_tail()
        self.refresh()


def test_group_survives_member_and_broker_kills(tmp_path: Path, seed: int, long_run: bool) -> None:
    rng = random.Random(seed)
    per_partition = RECORDS_PER_PARTITION_LONG if long_run else RECORDS_PER_PARTITION
    kinds = ["member"] * (MEMBER_KILLS_LONG if long_run else MEMBER_KILLS)
    kinds += ["broker"] * (BROKER_KILLS_LONG if long_run else BROKER_KILLS)
    rng.shuffle(kinds)
    at = sorted(rng.uniform(KILL_AT_FRACTION_MIN, KILL_AT_FRACTION_MAX) for _ in kinds)
    run = Run(tmp_path, RestartableBroker(tmp_path / "data"), PARTITIONS * per_partition)
    started = time.monotonic()
    try:
        run.broker.start()
        values = prefill(run.broker.address, per_partition)
        with GroupWatcher(run.broker) as watcher:
            for _ in range(MEMBERS):
                run.spawn()
            for kind, fraction in zip(kinds, at, strict=True):
                wanted = run.progressed(fraction, time.time_ns())
                run.wait_for(
                    f"{fraction:.0%} processed before a {kind} kill", PROGRESS_TIMEOUT_S, wanted
                )
                if kind == "broker":
                    run.kill_broker()
                else:
                    run.kill_member(rng)
            everything = dict.fromkeys(range(PARTITIONS), per_partition)

            def finished() -> bool:
                if len(run.processed) < run.total:
                    return False
                snapshot = watcher.describe()
                return snapshot is not None and snapshot.committed == everything

            run.wait_for("end: everything processed and committed", FINISH_TIMEOUT_S, finished)
        run.stop_members()
        end_ns = time.time_ns()
        ranges = log_ranges(run.broker.address, TOPIC)
        assert run.broker.terminate() == 0, run.broker.stderr_tail()
    finally:
        for m in run.members:
            m.kill()
        run.broker.close()

    history = History()
    for partition, mine in enumerate(values):
        for offset, value in enumerate(mine):
            history.send(value, partition, offset, producer="prefill")
    for partition, (start, end) in enumerate(ranges):
        history.log_range(partition, start, end)
    commits: list[Commit] = []
    for m in run.members:
        for e in m.events:
            if isinstance(e, Assign):
                for p in e.positions:
                    history.seek(m.label, p)
            elif isinstance(e, Revoke):
                for p in e.partitions:
                    history.seek(m.label, p)
            elif isinstance(e, Processed):
                history.read(m.label, e.partition, e.offset, e.value)
        commits.extend(commits_of(m.events))
    found = history.check()
    owned, strays = ownerships(run.members, end_ns)
    restarts = run.broker.start_s[1:]
    print(
        f"\ngroup chaos: seed {seed}, member kills {run.member_kills}, broker kills "
        f"{run.broker.kills}, records {run.total}, processed {run.lines} "
        f"({run.lines - len(run.processed)} redelivered), lost {len(found.lost)}, duplicated "
        f"{len(found.duplicates)}, commits {sum(c.acked for c in commits)} acknowledged / "
        f"{sum(not c.acked for c in commits)} failed, describes {len(watcher.snapshots)} "
        f"(failed {watcher.failed}), restart s median {statistics.median(restarts):.2f} max "
        f"{max(restarts):.2f}, {time.monotonic() - started:.0f} s"
    )
    assert found.ok, found.describe()
    assert set(run.processed) == {(p, o) for p in range(PARTITIONS) for o in range(per_partition)}
    assert not strays, strays[:5]
    problems = (
        commit_order_problems(commits)
        + snapshot_problems(watcher.snapshots, commits)
        + overlaps(owned, run.broker_kills_ns)
        + start_problems(run.members, commits)
    )
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:10])


@dataclass
class CraftedLog:
    label: str
    events: list[Event]
    killed_ns: int | None = None


def test_checks_find_crafted_problems() -> None:
    """The checks above are not vacuous: each finds its fault in a tiny crafted log."""
    first = CraftedLog(
        "m0",
        [
            Assign(100, "x", {0: 0}),
            Processed(110, "x", 0, 0, b"v0-0"),
            Sent(115, "x", {0: 1}),
            Outcome(116, True, ""),
            Revoke(300, "x", (0,)),
        ],
    )
    second = CraftedLog("m1", [Assign(200, "y", {0: 0}), Processed(210, "y", 0, 0, b"v0-0")])
    owned, strays = ownerships([first, second], end_ns=1_000)
    assert strays == []
    assert len(overlaps(owned, broker_kills_ns=[])) == 1  # m1 took partition 0 before m0 let go
    assert overlaps(owned, broker_kills_ns=[150]) == []  # unless the broker died in between
    commits = commits_of(first.events) + commits_of(second.events)
    (started_low,) = start_problems([first, second], commits)
    assert "assigned at 0, commits acknowledged up to 1" in started_low
    backwards = [Commit(1, 2, "x", {0: 5}, True), Commit(3, 4, "y", {0: 4}, True)]
    assert len(commit_order_problems(backwards)) == 1
    snapshots = [Snapshot(10, {0: 5}, {"x": (0,), "y": (0,)}), Snapshot(20, {0: 4}, {})]
    assert snapshot_problems(snapshots, [Commit(1, 15, "x", {0: 6}, True)]) == [
        "partition 0 assigned to 2 members at once: {'x': (0,), 'y': (0,)}",
        "partition 0: committed 5, then 4",
        "partition 0: committed 4 after 6 was acknowledged",
    ]
    assert (ownerships([CraftedLog("m2", [Processed(5, "z", 1, 0, b"v1-0")])], 10)[1]) == [
        "m2: Processed(ns=5, member_id='z', partition=1, offset=0, value=b'v1-0')"
    ]


def test_member_takes_its_partition_after_one_failed_fetch_offsets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a broker kill between a heartbeat answer and FetchOffsets does to a member that
    keeps its membership (any transient FetchOffsets failure): poll reports the error once,
    then the member must still start the partition, call on_assign and deliver its records."""
    from stream import Admin, Consumer, Producer, RiverlogError
    from stream._broker import BrokerConfig
    from stream._group_service import GroupsService
    from stream._serve import RunningBroker, ServeConfig

    original = GroupsService.FetchOffsets
    failures = [1]

    def fails_once(
        self: GroupsService, raw: bytes, context: grpc.ServicerContext
    ) -> groups_pb2.FetchOffsetsResponse:
        if failures[0]:
            failures[0] -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected: FetchOffsets fails once")
        answer: groups_pb2.FetchOffsetsResponse = original(self, raw, context)
        return answer

    monkeypatch.setattr(GroupsService, "FetchOffsets", fails_once)
    running = RunningBroker(
        ServeConfig(broker=BrokerConfig(data_dir=tmp_path / "data"), listen="127.0.0.1:0")
    )
    running.start()
    try:
        with Admin(running.address) as admin:
            admin.create_topic(TOPIC, 1)
        with Producer(running.address, acks="all") as producer:
            producer.send(TOPIC, b"only", partition=0).result()
        assigned: list[list[TopicPartition]] = []
        with Consumer(
            running.address,
            group=GROUP,
            topics=[TOPIC],
            auto_offset_reset="earliest",
            on_assign=assigned.append,
        ) as consumer:
            records = []
            errors = []
            for _ in range(25):  # 5 s
                try:
                    records += consumer.poll(200)
                except RiverlogError as e:
                    errors.append(e)
                if records:
                    break
        assert failures == [0]
        assert [r.value for r in records] == [b"only"], (errors, assigned)
        assert assigned == [[TopicPartition(TOPIC, 0)]]
    finally:
        running.stop()
