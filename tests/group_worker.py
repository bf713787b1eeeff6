"""A consumer-group member as a program, for tests/test_groups_process.py.

    python tests/group_worker.py --server ADDR --group G --topic T --out FILE
        --session-timeout-ms MS [--commit-every N] [--work-us US] [--max-seconds S]

It joins group G (riverlog.v1.Groups.Heartbeat), heartbeats on its own thread at the interval
the answers ask for, and works its assignment of topic T: each partition from the group's
committed offset (0, the earliest, without one), by group-scoped Fetch. Processing a record
appends one line to FILE:

    member_id partition offset start_ns end_ns

(time.time_ns() before and after the work: a CRC of the value and a sleep of US
microseconds). Lines are flushed per batch, before any offset that covers them is committed,
so a committed record is always in FILE. It commits the next offset of a partition every N
records, when the partition is caught up, and before it lets go of it.

Hand-over (proto/riverlog/v1/groups.proto): the heartbeat thread reports `held`, the
partitions given to this member and not yet given back. When an answer leaves one out, the
work loop stops working it, commits, and only then drops it from `held`, so the next
heartbeat gives it back; a partition is never worked here once another member may have it.
The member also stops working (without giving anything back) when its last acknowledged
heartbeat is older than half its session timeout, so a stalled process cannot work on after
the broker has expired it. UNKNOWN_MEMBER, and FENCED_MEMBER on a heartbeat, mean the
membership is gone: everything is dropped uncommitted and the member rejoins. FENCED_MEMBER on
a commit or fetch means an answer with a new epoch is on its way: retry with it.

SIGTERM: commit, leave the group, exit 0. The --max-seconds cap (every loop is bounded by it)
does the same and exits 3. Diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from types import FrameType
from typing import TextIO

import grpc

from storage import decode_records
from stream._pb import broker_pb2, broker_pb2_grpc, groups_pb2, groups_pb2_grpc, types_pb2

ERROR_KEY = "riverlog-error"
# Long-poll of one fetch: also how long SIGTERM or a revocation may wait for the work loop.
FETCH_MAX_WAIT_MS = 200
# Per partition per fetch: small, so one fetch brings a little of every owned partition.
FETCH_PARTITION_BYTES = 32 * 1024
# Deadline of every RPC, so no call outlives the wall-clock cap by much.
RPC_TIMEOUT_S = 5.0
# Retries of a commit refused FENCED_MEMBER while the answer with the new epoch arrives.
COMMIT_ATTEMPTS_MAX = 50
RETRY_PAUSE_S = 0.02
# Work only while the last acknowledged heartbeat was sent less than this fraction of the
# session timeout ago: the broker expires the member only after the whole session timeout.
LEASE_FRACTION = 0.5
EXIT_TERMINATED = 0
EXIT_CAP_REACHED = 3


def log(message: str) -> None:
    print(f"group_worker {time.time():.3f}: {message}", file=sys.stderr, flush=True)


def error_name(error: grpc.RpcError) -> str:
    if not isinstance(error, grpc.Call):
        return ""
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_KEY:
            return value if isinstance(value, str) else value.decode()
    return ""


class MembershipLostError(Exception):
    """The broker no longer knows this member (or its epoch): rejoin."""


@dataclass
class Membership:
    """What the two threads share, under `lock`."""

    group_id: str
    topic: str
    session_timeout_ms: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    member_id: str = ""
    epoch: int = 0
    # Bumped on every rejoin: work started under an older one is dropped, not committed.
    generation: int = 0
    # What the last answer said to work.
    assignment: frozenset[int] = frozenset()
    # Given to this member and not yet given back: reported as `owned`.
    held: set[int] = field(default_factory=set)
    # time.monotonic() when the last acknowledged heartbeat was sent (0: none).
    acked_sent_s: float = 0.0
    interval_s: float = 1.0
    # Wakes the heartbeat thread early (a partition was given back, or stop).
    wake: threading.Event = field(default_factory=threading.Event)

    def reset(self, reason: str, generation: int) -> None:
        """The membership of `generation` is gone; a newer one (both threads may notice the
        same loss) is left alone."""
        with self.lock:
            if generation != self.generation:
                return
            log(f"member {self.member_id or '-'} lost its membership ({reason}); rejoining")
            self.member_id, self.epoch = "", 0
            self.generation += 1
            self.assignment = frozenset()
            self.held.clear()
            self.acked_sent_s = 0.0
        self.wake.set()

    def _lease_ok(self) -> bool:
        lease_s = LEASE_FRACTION * self.session_timeout_ms / 1000
        return time.monotonic() - self.acked_sent_s < lease_s

    def lease_ok(self) -> bool:
        with self.lock:
            return self._lease_ok()

    def may_work(self, partition: int, generation: int) -> bool:
        with self.lock:
            return (
                generation == self.generation
                and partition in self.assignment
                and partition in self.held
                and self._lease_ok()
            )

    def as_member(self, generation: int) -> types_pb2.GroupMember:
        """Who commits and fetches for work started under `generation`."""
        with self.lock:
            if generation != self.generation:
                raise MembershipLostError("the membership changed under the work loop")
            return types_pb2.GroupMember(
                group_id=self.group_id, member_id=self.member_id, member_epoch=self.epoch
            )


def heartbeat_once(groups: groups_pb2_grpc.GroupsStub, state: Membership) -> None:
    with state.lock:
        request = groups_pb2.HeartbeatRequest(
            group_id=state.group_id,
            member_id=state.member_id,
            member_epoch=state.epoch,
            session_timeout_ms=state.session_timeout_ms,
        )
        if state.member_id:
            owned = types_pb2.TopicPartitions(topic=state.topic, partitions=sorted(state.held))
            request.owned.topics.append(owned)
        else:
            request.subscription.topics.append(state.topic)
        generation = state.generation
    sent_s = time.monotonic()
    try:
        answer = groups.Heartbeat(request, timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as e:
        if error_name(e) in {"UNKNOWN_MEMBER", "FENCED_MEMBER"}:
            state.reset(f"heartbeat: {error_name(e)}", generation)
        else:
            log(f"heartbeat failed: {e}")
            state.interval_s = min(state.interval_s, 0.2)
        return
    assignment = frozenset(p for tp in answer.assignment for p in tp.partitions)
    with state.lock:
        if generation != state.generation:
            return  # a reset raced with this heartbeat: its answer is for a dropped membership
        if not state.member_id:
            log(f"joined as {answer.member_id}")
        state.member_id, state.epoch = answer.member_id, answer.member_epoch
        state.assignment = assignment
        state.held |= assignment
        state.acked_sent_s = sent_s
        state.interval_s = answer.heartbeat_interval_ms / 1000


def heartbeat_loop(
    groups: groups_pb2_grpc.GroupsStub, state: Membership, stop: threading.Event, deadline: float
) -> None:
    while not stop.is_set() and time.monotonic() < deadline:
        heartbeat_once(groups, state)
        state.wake.wait(state.interval_s)
        state.wake.clear()


@dataclass
class Worker:
    groups: groups_pb2_grpc.GroupsStub
    broker: broker_pb2_grpc.BrokerStub
    state: Membership
    out: TextIO
    commit_every: int
    work_s: float
    # Partition -> next offset to process, and the last committed one; for the partitions
    # this loop works, started under `generation`.
    position: dict[int, int] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)
    since_commit: dict[int, int] = field(default_factory=dict)
    generation: int = 0

    # ------------------------------------------------------------------ partitions
    def sync(self) -> None:
        """Drop work of a lost membership, give back revoked partitions, start new ones."""
        with self.state.lock:
            generation, assignment = self.state.generation, self.state.assignment
            held = set(self.state.held)
        if generation != self.generation:
            self.position.clear()
            self.committed.clear()
            self.since_commit.clear()
            self.generation = generation
        for p in sorted(set(self.position) - assignment):
            self.commit([p])  # MembershipLostError: nothing to give back then
            self.position.pop(p)
            self.committed.pop(p, None)
            with self.state.lock:
                if generation == self.state.generation:
                    self.state.held.discard(p)
            self.state.wake.set()
            log(f"gave back partition {p}")
        for p in sorted(set(assignment) & held - set(self.position)):
            self.start(p)

    def start(self, partition: int) -> None:
        request = groups_pb2.FetchOffsetsRequest(
            group_id=self.state.group_id,
            partitions=[types_pb2.TopicPartitions(topic=self.state.topic, partitions=[partition])],
        )
        (committed,) = self.groups.FetchOffsets(request, timeout=RPC_TIMEOUT_S).offsets
        offset = committed.offset if committed.HasField("offset") else 0
        self.position[partition] = self.committed[partition] = offset
        self.since_commit[partition] = 0
        log(f"working partition {partition} from offset {offset}")

    def commit(self, partitions: list[int]) -> None:
        """Commit the position of `partitions` where it moved; retried across new epochs."""
        todo = [p for p in partitions if self.position[p] != self.committed.get(p)]
        if not todo:
            return
        offsets = [
            groups_pb2.OffsetToCommit(topic=self.state.topic, partition=p, offset=self.position[p])
            for p in todo
        ]
        for _ in range(COMMIT_ATTEMPTS_MAX):
            request = groups_pb2.CommitOffsetsRequest(
                member=self.state.as_member(self.generation), offsets=offsets
            )
            try:
                self.groups.CommitOffsets(request, timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as e:
                if error_name(e) == "FENCED_MEMBER":
                    time.sleep(RETRY_PAUSE_S)  # the heartbeat with the new epoch is under way
                    continue
                if error_name(e) in {"UNKNOWN_MEMBER", "NOT_OWNED"}:
                    raise MembershipLostError(f"commit: {error_name(e)}") from None
                raise
            for p in todo:
                self.committed[p] = self.position[p]
                self.since_commit[p] = 0
            return
        raise MembershipLostError(f"commit fenced {COMMIT_ATTEMPTS_MAX} times")

    # ------------------------------------------------------------------ records
    def poll(self) -> None:
        """One group-scoped fetch over the partitions worked, and their records processed."""
        working = sorted(self.position)
        if not working or not self.state.lease_ok():
            time.sleep(FETCH_MAX_WAIT_MS / 1000)  # nothing to work, or no recent heartbeat
            return
        request = broker_pb2.FetchRequest(
            partitions=[
                broker_pb2.FetchPartition(
                    topic=self.state.topic,
                    partition=p,
                    offset=self.position[p],
                    max_bytes=FETCH_PARTITION_BYTES,
                )
                for p in working
            ],
            max_wait_ms=FETCH_MAX_WAIT_MS,
            member=self.state.as_member(self.generation),
        )
        try:
            answer = self.broker.Fetch(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            if error_name(e) == "FENCED_MEMBER":
                time.sleep(RETRY_PAUSE_S)
                return
            if error_name(e) in {"UNKNOWN_MEMBER", "NOT_OWNED"}:
                raise MembershipLostError(f"fetch: {error_name(e)}") from None
            raise
        caught_up: list[int] = []
        for result in answer.results:
            p = result.partition
            if result.error.code:
                log(f"fetch of partition {p} failed: {result.error.message}")
                continue
            self.process(p, result.record_batches)
            if self.position[p] >= result.high_watermark:
                caught_up.append(p)
        due = [p for p in working if self.since_commit[p] >= self.commit_every]
        self.commit(sorted(set(due) | set(caught_up)))

    def process(self, partition: int, batches: bytes) -> None:
        wanted = self.position[partition]
        lines: list[str] = []
        member_id = self.state.member_id
        for record in decode_records(batches):
            if record.offset < wanted:
                continue  # the batch holding the wanted offset starts before it
            if not self.state.may_work(partition, self.generation):
                break  # revoked, membership lost, or no recent heartbeat: stop here
            start_ns = time.time_ns()
            zlib.crc32(record.value or b"")
            if self.work_s:
                time.sleep(self.work_s)
            end_ns = time.time_ns()
            lines.append(f"{member_id} {partition} {record.offset} {start_ns} {end_ns}\n")
            wanted = record.offset + 1
        if lines:
            self.out.write("".join(lines))
            self.out.flush()  # before any commit covers these records
            self.since_commit[partition] += len(lines)
            self.position[partition] = wanted

    def finish(self) -> None:
        """Commit what was processed (the member is leaving)."""
        if self.generation == self.state.generation and self.position:
            self.commit(sorted(self.position))


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    deadline = time.monotonic() + args.max_seconds
    state = Membership(args.group, args.topic, args.session_timeout_ms)
    with (
        grpc.insecure_channel(args.server) as channel,
        open(args.out, "a", encoding="ascii") as out,
    ):
        groups = groups_pb2_grpc.GroupsStub(channel)
        worker = Worker(
            groups,
            broker_pb2_grpc.BrokerStub(channel),
            state,
            out,
            args.commit_every,
            args.work_us / 1e6,
        )
        beats = threading.Thread(
            target=heartbeat_loop, args=(groups, state, stop, deadline), name="heartbeat"
        )
        beats.start()
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    worker.sync()
                    worker.poll()
                except MembershipLostError as e:
                    state.reset(str(e), worker.generation)
                except grpc.RpcError as e:
                    log(f"call failed: {e}")
                    time.sleep(RETRY_PAUSE_S)
            try:
                worker.finish()
            except (MembershipLostError, grpc.RpcError) as e:
                log(f"final commit failed: {e}")
        finally:
            stop.set()
            state.wake.set()
            beats.join(timeout=RPC_TIMEOUT_S + 1)
        with state.lock:
            leave = groups_pb2.LeaveGroupRequest(
                group_id=state.group_id, member_id=state.member_id, member_epoch=state.epoch
            )
        if leave.member_id:
            try:
                groups.LeaveGroup(leave, timeout=RPC_TIMEOUT_S)
                log(f"member {leave.member_id} left")
            except grpc.RpcError as e:
                log(f"leave failed: {e}")
    return EXIT_CAP_REACHED if time.monotonic() >= deadline else EXIT_TERMINATED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A consumer-group member for the tests.")
    parser.add_argument("--server", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True, help="file the processed records go to")
    parser.add_argument("--session-timeout-ms", type=int, required=True)
    parser.add_argument("--commit-every", type=int, default=500, help="records per commit")
    parser.add_argument("--work-us", type=int, default=0, help="sleep per record")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="wall-clock cap")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
