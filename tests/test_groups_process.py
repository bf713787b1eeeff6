"""Consumer groups across processes: a broker process and three tests/group_worker.py members.

What only processes show: members that join one after another share a topic by incremental
hand-over with every record processed at least once and no partition worked by two members
at the same time (each processed record is a line `member partition offset start_ns end_ns`;
per partition the intervals of different members never overlap); a member killed with
SIGKILL while it works has its partitions resumed by the others from its last commit within
its session timeout plus a rebalance; a member stopped (SIGSTOP) past its session is expired
and, continued, rejoins; the group's committed offsets reach the log end offsets; and they
survive a SIGTERM restart of the broker. Every child is killed in a
`finally`; every wait is bounded in time and iterations.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

import grpc
import pytest
from test_process import RPC_TIMEOUT_S, BrokerProcess, running_broker

from storage import NewRecord, encode_batch
from stream._pb import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    groups_pb2,
    groups_pb2_grpc,
    types_pb2,
)

pytestmark = pytest.mark.slow

WORKER = Path(__file__).resolve().with_name("group_worker.py")
TOPIC = "events"
GROUP = "workers"
PARTITIONS = 8
WORKERS = 3
RECORDS_FIRST = 100_000
RECORDS_SECOND = 20_000
BATCH_RECORDS = 400
# The shortest session that still leaves a loaded 2-core machine room for heartbeats every
# third of it; the kill -9 resume is measured against it.
SESSION_TIMEOUT_MS = 2_000
# Expiry is noticed by the background worker (every <= 1 s) or another member's heartbeat;
# then the hand-over (100 ms heartbeats), FetchOffsets and the first fetch. Generous for load.
RESUME_SLACK_S = 5.0
COMMIT_EVERY = 500
# Work per record (a sleep): keeps the workers busy long enough for the kill to land mid-work
# without burning the CPU that the broker and the other workers need.
WORK_US = 50
# The victim is killed once it has processed this many of the second round's records.
KILL_AFTER_RECORDS = 1_000
# Bounds of the waits (the whole file should take well under these).
COVER_TIMEOUT_S = 90.0
STABLE_TIMEOUT_S = 30.0
KILL_WAIT_TIMEOUT_S = 30.0
WORKER_EXIT_TIMEOUT_S = 15.0
WORKER_MAX_SECONDS = 240
POLL_S = 0.1


class Line(NamedTuple):
    worker: int
    member_id: str
    partition: int
    offset: int
    start_ns: int
    end_ns: int


@dataclass
class WorkerProcess:
    index: int
    out: Path
    stderr_path: Path
    proc: subprocess.Popen[bytes]
    stderr: IO[bytes]

    def member_id(self) -> str | None:
        """The member id of its latest join, from its log."""
        joins = re.findall(r"joined as (\w+)", self.stderr_path.read_text(errors="replace"))
        return joins[-1] if joins else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.stderr.close()


def start_worker(broker: BrokerProcess, tmp_path: Path, index: int) -> WorkerProcess:
    out = tmp_path / f"worker-{index}.lines"
    out.touch()
    stderr_path = tmp_path / f"worker-{index}.stderr"
    stderr = stderr_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            "--server",
            broker.address,
            "--group",
            GROUP,
            "--topic",
            TOPIC,
            "--out",
            str(out),
            "--session-timeout-ms",
            str(SESSION_TIMEOUT_MS),
            "--commit-every",
            str(COMMIT_EVERY),
            "--work-us",
            str(WORK_US),
            "--max-seconds",
            str(WORKER_MAX_SECONDS),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    return WorkerProcess(index, out, stderr_path, proc, stderr)


@dataclass
class Processed:
    """The lines the workers wrote, read incrementally (whole lines only: a worker killed
    mid-write may leave a partial last line, which is not a processed record)."""

    workers: list[WorkerProcess]
    lines: list[Line] = field(default_factory=list)
    offsets: dict[int, set[int]] = field(default_factory=dict)
    _read: dict[int, int] = field(default_factory=dict)

    def refresh(self) -> None:
        for w in self.workers:
            with w.out.open("rb") as f:
                f.seek(self._read.get(w.index, 0))
                data = f.read()
            whole = data[: data.rfind(b"\n") + 1]
            self._read[w.index] = self._read.get(w.index, 0) + len(whole)
            for raw in whole.decode().splitlines():
                member_id, partition, offset, start_ns, end_ns = raw.split()
                line = Line(
                    w.index, member_id, int(partition), int(offset), int(start_ns), int(end_ns)
                )
                self.lines.append(line)
                self.offsets.setdefault(line.partition, set()).add(line.offset)

    def first_after(self, partition: int, start_ns: int, other_than: str) -> Line | None:
        """The first line of `partition` started after `start_ns` by a member other than
        `other_than`."""
        later = (
            x
            for x in self.lines
            if x.partition == partition and x.member_id != other_than and x.start_ns > start_ns
        )
        return min(later, key=lambda x: x.start_ns, default=None)

    def next_offset(self, worker: int, partition: int) -> int:
        """The offset after the last one `worker` processed in `partition` (0: none)."""
        mine = (x.offset + 1 for x in self.lines if x.worker == worker and x.partition == partition)
        return max(mine, default=0)

    def missing(self, ends: list[int]) -> int:
        """Records not processed yet, of partitions whose log ends are `ends` (and no further:
        the caller waits for coverage before it produces more)."""
        return sum(max(0, end - len(self.offsets.get(p, ()))) for p, end in enumerate(ends))


def diagnostics(workers: list[WorkerProcess]) -> str:
    return "\n".join(
        f"--- worker {w.index} (exit {w.proc.poll()}):\n"
        + "\n".join(w.stderr_path.read_text(errors="replace").splitlines()[-15:])
        for w in workers
    )


def wait_for(
    condition: Callable[[], bool], timeout_s: float, workers: list[WorkerProcess], what: str
) -> float:
    """Poll `condition` until it holds (seconds taken); fail naming `what` after `timeout_s`,
    or at once if a worker exited."""
    started = time.monotonic()
    for _ in range(int(timeout_s / POLL_S) + 1):
        if condition():
            return time.monotonic() - started
        dead = [w.index for w in workers if w.proc.poll() is not None]
        assert not dead, f"worker {dead} exited while waiting for {what}\n{diagnostics(workers)}"
        if time.monotonic() - started > timeout_s:
            break
        time.sleep(POLL_S)
    pytest.fail(f"no {what} after {timeout_s} s\n{diagnostics(workers)}")


def produce(stub: broker_pb2_grpc.BrokerStub, first_id: int, count: int) -> None:
    """Records with unique ids first_id.. as values, in batches round-robin over partitions."""
    for n, start in enumerate(range(first_id, first_id + count, BATCH_RECORDS)):
        ids = range(start, min(start + BATCH_RECORDS, first_id + count))
        now_ms = int(time.time() * 1000)
        batch = encode_batch([NewRecord(None, f"id-{i:09d}".encode(), now_ms) for i in ids])
        entry = broker_pb2.PartitionProduce(
            topic=TOPIC, partition=n % PARTITIONS, record_batch=batch
        )
        (result,) = stub.Produce(
            broker_pb2.ProduceRequest(partitions=[entry]), timeout=RPC_TIMEOUT_S
        ).results
        assert result.error.code == 0, result.error.message


def log_ends(admin: admin_pb2_grpc.AdminStub) -> list[int]:
    request = admin_pb2.DescribeTopicRequest(name=TOPIC)
    return [
        p.log_end_offset for p in admin.DescribeTopic(request, timeout=RPC_TIMEOUT_S).partitions
    ]


def overlaps(lines: list[Line]) -> list[str]:
    """Pairs of lines of one partition by different members whose intervals overlap."""
    by_partition: dict[int, list[Line]] = {}
    for line in lines:
        by_partition.setdefault(line.partition, []).append(line)
    found: list[str] = []
    for items in by_partition.values():
        items.sort(key=lambda x: x.start_ns)
        latest: dict[str, Line] = {}  # member -> its line that ends last so far
        for line in items:
            found.extend(
                f"{other} overlaps {line}"
                for member, other in latest.items()
                if member != line.member_id and other.end_ns >= line.start_ns
            )
            previous = latest.get(line.member_id)
            if previous is None or line.end_ns > previous.end_ns:
                latest[line.member_id] = line
    return found


@contextmanager
def group_stubs(
    broker: BrokerProcess,
) -> Iterator[
    tuple[broker_pb2_grpc.BrokerStub, admin_pb2_grpc.AdminStub, groups_pb2_grpc.GroupsStub]
]:
    with grpc.insecure_channel(broker.address) as channel:
        yield (
            broker_pb2_grpc.BrokerStub(channel),
            admin_pb2_grpc.AdminStub(channel),
            groups_pb2_grpc.GroupsStub(channel),
        )


def test_members_share_work_resume_after_kill_9_and_keep_offsets(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    workers: list[WorkerProcess] = []
    processed = Processed(workers)
    timings: dict[str, float] = {}
    try:
        with running_broker(data_dir) as broker, group_stubs(broker) as (stub, admin, groups):

            def describe() -> groups_pb2.DescribeGroupResponse:
                request = groups_pb2.DescribeGroupRequest(group_id=GROUP)
                return groups.DescribeGroup(request, timeout=RPC_TIMEOUT_S)

            def covered(ends: list[int]) -> Callable[[], bool]:
                def check() -> bool:
                    processed.refresh()
                    return processed.missing(ends) == 0

                return check

            admin.CreateTopic(
                admin_pb2.CreateTopicRequest(name=TOPIC, partitions=PARTITIONS),
                timeout=RPC_TIMEOUT_S,
            )
            started = time.monotonic()
            produce(stub, 0, RECORDS_FIRST)
            timings["produce 100k"] = time.monotonic() - started
            first_ends = log_ends(admin)
            assert sum(first_ends) == RECORDS_FIRST

            # ---- three members, joining one after another, share the topic
            started = time.monotonic()
            workers.extend(start_worker(broker, tmp_path, i) for i in range(WORKERS))
            wait_for(covered(first_ends), COVER_TIMEOUT_S, workers, "100k records processed")
            timings["process 100k"] = time.monotonic() - started

            def stable(members: list[WorkerProcess]) -> Callable[[], bool]:
                def check() -> bool:
                    info = describe()
                    return (
                        info.state == "stable"
                        and {m.member_id for m in info.members} == {w.member_id() for w in members}
                        and all(m.assignment for m in info.members)
                    )

                return check

            wait_for(stable(workers), STABLE_TIMEOUT_S, workers, "a stable group of three")
            info = describe()
            assignment = {
                m.member_id: {p for tp in m.assignment for p in tp.partitions} for m in info.members
            }
            by_worker = {w.index: w.member_id() for w in workers}
            assert set(by_worker.values()) == set(assignment), (by_worker, assignment)

            # ---- kill -9 one member while it works the second round of records
            victim = max(workers, key=lambda w: len(assignment[by_worker[w.index] or ""]))
            victim_id = by_worker[victim.index]
            assert victim_id is not None
            victim_partitions = sorted(assignment[victim_id])
            produce(stub, RECORDS_FIRST, RECORDS_SECOND)
            ends = log_ends(admin)
            assert sum(ends) == RECORDS_FIRST + RECORDS_SECOND

            def victim_working() -> bool:
                processed.refresh()
                new = sum(
                    max(0, processed.next_offset(victim.index, p) - first_ends[p])
                    for p in victim_partitions
                )
                return new >= KILL_AFTER_RECORDS

            wait_for(victim_working, KILL_WAIT_TIMEOUT_S, workers, "the victim at work")
            kill_ns = time.time_ns()
            victim.proc.send_signal(signal.SIGKILL)
            assert victim.proc.wait(timeout=10) == -signal.SIGKILL
            survivors = [w for w in workers if w is not victim]
            # Nobody else may commit its partitions before its session expires: these are
            # the offsets the others must resume from.
            wanted = groups_pb2.FetchOffsetsRequest(
                group_id=GROUP,
                partitions=[types_pb2.TopicPartitions(topic=TOPIC, partitions=victim_partitions)],
            )
            last_commit = {
                o.partition: o.offset
                for o in groups.FetchOffsets(wanted, timeout=RPC_TIMEOUT_S).offsets
            }
            resumable = [p for p in victim_partitions if last_commit[p] < ends[p]]
            assert resumable, f"the victim had finished {victim_partitions} before the kill"

            def resumed() -> bool:
                processed.refresh()
                return all(processed.first_after(p, kill_ns, victim_id) for p in resumable)

            resume_bound_s = SESSION_TIMEOUT_MS / 1000 + RESUME_SLACK_S
            wait_for(resumed, resume_bound_s + 10, survivors, "the victim's partitions resumed")
            gaps_s: dict[int, float] = {}
            for p in resumable:
                first = processed.first_after(p, kill_ns, victim_id)
                assert first is not None
                assert first.offset == last_commit[p], (p, first, last_commit[p])
                gaps_s[p] = (first.start_ns - kill_ns) / 1e9
            beyond = {
                p: processed.next_offset(victim.index, p) - last_commit[p]
                for p in victim_partitions
            }
            print(f"victim's records processed after its last commit, by partition: {beyond}")
            print(f"resume gaps after kill -9 (partition: s): {gaps_s}")
            assert max(gaps_s.values()) < resume_bound_s, gaps_s

            # ---- everything processed, committed to the log end, no overlap
            wait_for(covered(ends), COVER_TIMEOUT_S, survivors, "120k records processed")

            def committed_to_end() -> bool:
                info = describe()
                return len(info.partitions) == PARTITIONS and all(
                    p.HasField("committed_offset") and p.committed_offset == p.log_end_offset
                    for p in info.partitions
                )

            wait_for(committed_to_end, STABLE_TIMEOUT_S, survivors, "offsets committed to the end")
            assert describe().total_lag == 0
            for p, end in enumerate(ends):
                assert processed.offsets[p] == set(range(end)), f"partition {p}"
            problems = overlaps(processed.lines)
            assert not problems, f"{len(problems)} overlaps, e.g. {problems[:3]}"
            again = len(processed.lines) - (RECORDS_FIRST + RECORDS_SECOND)
            print(f"records processed more than once: {again}")

            # ---- a member stalled past its session (SIGSTOP) is expired, and then rejoins
            stalled, other = survivors
            stalled_id = stalled.member_id()
            started = time.monotonic()
            stalled.proc.send_signal(signal.SIGSTOP)
            try:
                wait_for(stable([other]), resume_bound_s + 10, survivors, "the stalled one expired")
            finally:
                stalled.proc.send_signal(signal.SIGCONT)
            timings["stalled member expired"] = time.monotonic() - started
            wait_for(stable(survivors), STABLE_TIMEOUT_S, survivors, "the stalled one back")
            assert stalled.member_id() != stalled_id
            timings["stall to rejoined"] = time.monotonic() - started

            for w in survivors:
                w.proc.send_signal(signal.SIGTERM)
            for w in survivors:
                assert w.proc.wait(timeout=WORKER_EXIT_TIMEOUT_S) == 0, diagnostics(workers)
            info = describe()
            assert (info.state, len(info.members)) == ("empty", 0)
            assert [p.committed_offset for p in info.partitions] == ends
            before = groups.FetchOffsets(
                groups_pb2.FetchOffsetsRequest(group_id=GROUP), timeout=RPC_TIMEOUT_S
            )
            code, _ = broker.terminate()
            assert code == 0, broker.stderr_text()

        # ---- the committed offsets survive a restart of the broker
        with running_broker(data_dir) as broker, group_stubs(broker) as (_, _, groups):
            after = groups.FetchOffsets(
                groups_pb2.FetchOffsetsRequest(group_id=GROUP), timeout=RPC_TIMEOUT_S
            )
            assert after == before
            assert [o.offset for o in after.offsets] == ends
            broker.terminate()
        print(f"timings (s): { {k: round(v, 2) for k, v in timings.items()} }")
    finally:
        for w in workers:
            w.kill()
