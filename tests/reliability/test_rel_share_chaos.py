"""Share chaos: the broker killed with SIGKILL, again and again, while a share group works
through a queue of tasks.

A `riverlog serve` child (rel_broker.RestartableBroker: one loopback port and data directory
across restarts) holds a topic of two partitions with TASKS unique tasks, produced before the
members start (an idempotent stream.Producer, acks "all"). MEMBERS ShareConsumers, one per
thread of the test, poll, "work" on each record, acknowledge it (ACCEPT) and commit() after
every poll. They record every delivery (task, delivery count, member) and the outcome of every
acknowledgement. The broker is killed KILLS times (--long: KILLS_LONG), each once a seeded
fraction of the tasks is confirmed and the group confirmed some since the last restart, after
a seeded delay, or (one kill in three, seeded which) as soon as the restarted broker handed out
a record, while its acquisitions are not yet fsynced; it is restarted at once. The members
ride through: the client retries UNAVAILABLE and rejoins when the restarted broker no longer
knows it.

An acknowledgement is CONFIRMED when a commit() returned (no exception) after it was queued
and no refusal covers it (the commit's own answer, or take_ack_failures() for those a poll
carried or a lost membership dropped); CONFIRMED-at is when that commit returned. Its outcome
is UNKNOWN when the broker was killed after it was sent and before it was answered: the
client then reports it UNKNOWN_MEMBER (the restarted broker forgot the member), although the
old broker may have applied and fsynced it. Such a task is never handed out again when it was
applied, so nobody can confirm it; the broker's own lag says it is done.

Locks (LOCK_MS) outlast the run and nobody releases, so a record comes back only after a
broker kill (locks are not durable), and max_delivery_attempts is the highest allowed, far
above the deliveries a crash-only run can reach, so nothing is archived. The checks (each
finds its fault in a crafted history, test_checks_find_crafted_problems):

1. nothing lost: every task confirmed, or its last delivery acknowledged with an UNKNOWN
   outcome across a kill (and the broker's lag 0, check 4, says it was applied);
2. acknowledgements durable: no task confirmed twice, and none handed out by a poll that
   started after its confirmation, nor with a higher delivery count than the confirmed one;
3. delivery counts of a task never decrease (deliveries ordered by time: the later poll
   started after the earlier returned), and a task is handed out at most once per broker
   incarnation (no lock expires: only a kill frees a record);
4. the broker's DescribeShareGroup: lag 0, nothing archived, nothing acquired, each window's
   start at its log end offset.

What is asserted is deterministic; the seed (--seed) moves only the kill moments. The figures
end in one line (run with -s).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest
from rel_broker import RestartableBroker, log_ranges, read_partition

from stream import (
    AckFailure,
    Admin,
    InvalidArgumentError,
    Producer,
    RecordMetadata,
    RiverlogError,
    ShareConsumer,
)

pytestmark = pytest.mark.slow

TOPIC = "share-chaos"
GROUP = "share-chaos-workers"
PARTITIONS = 2
TASKS = 2_000
TASKS_LONG = 10_000
MEMBERS = 3
MEMBERS_LONG = 4
KILLS = 3
KILLS_LONG = 12
# Group settings. Locks longer than any run: only a broker kill frees an acquired record.
LOCK_MS = 300_000
# The most the broker allows; a record gets at most KILLS_LONG + 1 deliveries here.
MAX_DELIVERY_ATTEMPTS = 100
RETRY_BACKOFF_MS = 10
RETRY_BACKOFF_MAX_MS = 100
SESSION_TIMEOUT_MS = 30_000
# Per member: records per poll (one commit each), the poll's wait, work per record.
MAX_RECORDS = 20
POLL_TIMEOUT_MS = 200
WORK_S = 0.0005
# After a poll that raised (not a retriable failure: the client retries those itself).
POLL_ERROR_PAUSE_S = 0.1
# Commits tried when stopping (each is ~1.5 s of client retries while the broker is away).
FINAL_COMMIT_ATTEMPTS_MAX = 5
# Kills happen once this fraction of the tasks is confirmed (seeded, uniform) ...
KILL_AT_FRACTION_MIN = 0.05
KILL_AT_FRACTION_MAX = 0.85
# ... and the group confirmed this many tasks since the last restart (it recovered) ...
RECOVERED_CONFIRMED = 20
# ... after a seeded delay up to this, so a kill does not always follow a commit. One kill in
# QUICK_KILL_EVERY (seeded which) is quick instead: as soon as the restarted broker handed out
# a record (its acquisitions not yet fsynced, its members' first acknowledgements in flight).
KILL_JITTER_S = 0.05
QUICK_KILL_EVERY = 3
# Every kill must find tasks left to confirm.
assert KILL_AT_FRACTION_MAX * TASKS + KILLS * RECOVERED_CONFIRMED < TASKS
assert KILL_AT_FRACTION_MAX * TASKS_LONG + KILLS_LONG * RECOVERED_CONFIRMED < TASKS_LONG
assert KILLS_LONG + 1 < MAX_DELIVERY_ATTEMPTS
# Bounds of the waits and loops.
PRODUCE_TIMEOUT_S = 60.0
PROGRESS_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 60.0
MEMBER_MAX_S = 600.0
MEMBER_ROUNDS_MAX = 1_000_000
JOIN_TIMEOUT_S = 30.0
WAIT_S = 0.05

CONFIRMED = "CONFIRMED"
# ack() refused locally: the membership that handed the record out was already lost.
DROPPED = "DROPPED"
# Still queued when the member stopped.
UNRESOLVED = "UNRESOLVED"
# Refusals after which the broker may have applied the acknowledgement all the same: the
# membership was lost across a kill, or a retried call found it applied (share.proto).
UNKNOWN_OUTCOMES = frozenset({"UNKNOWN_MEMBER", "NOT_ACQUIRED"})


def value_of(task: int) -> bytes:
    return f"task-{task:07d}".encode()


def task_of(value: bytes | None) -> int:
    assert value is not None
    assert value.startswith(b"task-"), value
    return int(value[5:])


# ---------------------------------------------------------------------------- the record
class Delivery(NamedTuple):
    task: int
    partition: int
    offset: int
    delivery_count: int
    member: str
    # time.time_ns() before the poll that returned it, and when that poll returned: the
    # broker acquired the record in between.
    polled_ns: int
    returned_ns: int


class Outcome(NamedTuple):
    """What became of the acknowledgement of one delivery (index into the deliveries)."""

    delivery: int
    # CONFIRMED, DROPPED, UNRESOLVED, or the refusal's name.
    name: str
    ns: int


class Kill(NamedTuple):
    """time.time_ns() just before the SIGKILL, and once the process was reaped."""

    sent_ns: int
    dead_ns: int


@dataclass
class Ledger:
    """Every delivery and acknowledgement outcome of every member, in the order recorded."""

    deliveries: list[Delivery] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    confirmed_ns: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def delivered(self, d: Delivery) -> int:
        with self._lock:
            self.deliveries.append(d)
            return len(self.deliveries) - 1

    def resolved(self, outcomes: Iterable[Outcome]) -> None:
        with self._lock:
            for o in outcomes:
                self.outcomes.append(o)
                if o.name == CONFIRMED:
                    self.confirmed_ns.append(o.ns)

    def delivered_since(self, ns: int) -> int:
        with self._lock:
            return sum(d.returned_ns > ns for d in self.deliveries[-MAX_RECORDS * 10 :])

    def confirmed_since(self, ns: int) -> int:
        with self._lock:
            return sum(t > ns for t in self.confirmed_ns)

    def confirmed(self) -> int:
        with self._lock:
            return len(self.confirmed_ns)


# ---------------------------------------------------------------------------- members
@dataclass
class Member:
    """One ShareConsumer on its own thread: poll, work, ack each record, commit."""

    label: str
    address: str
    ledger: Ledger
    stop: threading.Event
    # Acknowledged, outcome not known yet: (partition, offset) -> delivery index.
    pending: dict[tuple[int, int], int] = field(default_factory=dict)
    poll_errors: int = 0
    commit_errors: int = 0
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=self.label, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._work()
        except BaseException as e:
            self.error = e

    def _work(self) -> None:
        consumer = ShareConsumer(
            self.address,
            group=GROUP,
            topics=[TOPIC],
            lock_ms=LOCK_MS,
            max_delivery_attempts=MAX_DELIVERY_ATTEMPTS,
            start="earliest",
            retry_backoff_ms=RETRY_BACKOFF_MS,
            retry_backoff_max_ms=RETRY_BACKOFF_MAX_MS,
            max_records=MAX_RECORDS,
            max_wait_ms=POLL_TIMEOUT_MS,
            session_timeout_ms=SESSION_TIMEOUT_MS,
        )
        deadline = time.monotonic() + MEMBER_MAX_S
        try:
            for _ in range(MEMBER_ROUNDS_MAX):
                if self.stop.is_set() or time.monotonic() > deadline:
                    break
                self._round(consumer)
            for _ in range(FINAL_COMMIT_ATTEMPTS_MAX):
                if not self.pending or self._commit(consumer):
                    break
            now_ns = time.time_ns()
            self.ledger.resolved(Outcome(i, UNRESOLVED, now_ns) for i in self.pending.values())
            self.pending.clear()
        finally:
            consumer.close()

    def _round(self, consumer: ShareConsumer) -> None:
        polled_ns = time.time_ns()
        try:
            records = consumer.poll(POLL_TIMEOUT_MS)
        except RiverlogError:
            self.poll_errors += 1
            self.stop.wait(POLL_ERROR_PAUSE_S)
            return
        returned_ns = time.time_ns()
        # Refusals of what this poll carried, or of what a lost membership dropped.
        self._failed(consumer.take_ack_failures())
        for r in records:
            key = (r.partition, r.offset)
            index = self.ledger.delivered(
                Delivery(
                    task_of(r.value),
                    r.partition,
                    r.offset,
                    r.delivery_count,
                    self.label,
                    polled_ns,
                    returned_ns,
                )
            )
            time.sleep(WORK_S)
            try:
                consumer.ack(r)
            except InvalidArgumentError:  # handed out by a membership lost meanwhile
                self.ledger.resolved([Outcome(index, DROPPED, time.time_ns())])
                continue
            assert key not in self.pending, f"{self.label}: {key} handed out twice unresolved"
            self.pending[key] = index
        if self.pending:
            self._commit(consumer)

    def _commit(self, consumer: ShareConsumer) -> bool:
        """commit(); resolve what is pending when it returns. False when it raised (the
        acknowledgements stay queued in the client and pending here)."""
        try:
            refused = consumer.commit()
        except RiverlogError:
            self.commit_errors += 1
            return False
        done_ns = time.time_ns()
        self._failed(refused + consumer.take_ack_failures(), done_ns)
        self.ledger.resolved(Outcome(i, CONFIRMED, done_ns) for i in self.pending.values())
        self.pending.clear()
        return True

    def _failed(self, failures: list[AckFailure], ns: int | None = None) -> None:
        ns = time.time_ns() if ns is None else ns
        out = []
        for f in failures:
            for offset in range(f.first_offset, f.last_offset + 1):
                index = self.pending.pop((f.partition, offset), None)
                if index is not None:
                    out.append(Outcome(index, f.name, ns))
        self.ledger.resolved(out)


# ---------------------------------------------------------------------------- checks
def _by_task(deliveries: list[Delivery]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(deliveries):
        out[d.task].append(i)
    return out


def lost_tasks(
    tasks: int, deliveries: list[Delivery], outcomes: list[Outcome], kills: list[Kill]
) -> list[str]:
    """(1) Tasks neither confirmed nor last acknowledged with an outcome a kill made unknown
    (delivered before a broker died, refused UNKNOWN_MEMBER or NOT_ACQUIRED after)."""
    outcome_of = {o.delivery: o for o in outcomes}
    confirmed = {deliveries[o.delivery].task for o in outcomes if o.name == CONFIRMED}
    by_task = _by_task(deliveries)
    problems = []
    for task in range(tasks):
        if task in confirmed:
            continue
        if task not in by_task:
            problems.append(f"task {task}: never delivered")
            continue
        last = max(by_task[task], key=lambda i: (deliveries[i].returned_ns, i))
        d, o = deliveries[last], outcome_of.get(last)
        unknown = (
            o is not None
            and o.name in UNKNOWN_OUTCOMES
            and any(d.returned_ns < k.dead_ns and k.sent_ns < o.ns for k in kills)
        )
        if not unknown:
            problems.append(f"task {task}: never confirmed; last {d}, its acknowledgement {o}")
    return problems


def redelivered_after_confirmation(
    deliveries: list[Delivery], outcomes: list[Outcome]
) -> list[str]:
    """(2) Tasks confirmed twice, or handed out after (by time, or by delivery count) their
    acknowledgement was confirmed."""
    confirmations: dict[int, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        if o.name == CONFIRMED:
            confirmations[deliveries[o.delivery].task].append(o)
    by_task = _by_task(deliveries)
    problems = []
    for task, confirmed in sorted(confirmations.items()):
        if len(confirmed) > 1:
            shown = [(deliveries[o.delivery], o.ns) for o in confirmed]
            problems.append(f"task {task}: confirmed {len(confirmed)} times: {shown}")
        first = min(confirmed, key=lambda o: o.ns)
        count = deliveries[first.delivery].delivery_count
        for i in by_task[task]:
            d = deliveries[i]
            if d.polled_ns > first.ns or d.delivery_count > count:
                problems.append(
                    f"task {task}: confirmed at {first.ns} (delivery {count}), then {d}"
                )
    return problems


def count_problems(deliveries: list[Delivery], kills: list[Kill]) -> list[str]:
    """(3) A task's delivery count going down from one delivery to a later one (the later
    poll started after the earlier returned), or below 1; a task handed out twice in one
    broker incarnation (both polls within it: between two kills' deaths and sends)."""
    problems: list[str] = []
    bounds = [0, *(k.dead_ns for k in kills)]
    ends = [*(k.sent_ns for k in kills), 2**63]
    for task, indices in sorted(_by_task(deliveries).items()):
        mine = sorted((deliveries[i] for i in indices), key=lambda d: d.returned_ns)
        problems.extend(
            f"task {task}: delivery count below 1: {a}" for a in mine if a.delivery_count < 1
        )
        problems.extend(
            f"task {task}: delivery count went down: {a} then {b}"
            for i, a in enumerate(mine)
            for b in mine[i + 1 :]
            if b.polled_ns > a.returned_ns and b.delivery_count < a.delivery_count
        )
        per_incarnation = Counter(
            n
            for d in mine
            for n, (low, high) in enumerate(zip(bounds, ends, strict=True))
            if low < d.polled_ns and d.returned_ns < high
        )
        problems.extend(
            f"task {task}: handed out {times} times by broker incarnation {n}: {mine}"
            for n, times in per_incarnation.items()
            if times > 1
        )
    return problems


# ---------------------------------------------------------------------------- the test
def produce(address: str, tasks: int) -> dict[tuple[int, int], int]:
    """Tasks 0..tasks-1, task t to partition t % PARTITIONS; (partition, offset) -> task."""
    with Admin(address) as admin:
        admin.create_topic(TOPIC, PARTITIONS)
    with Producer(address, acks="all", idempotent=True, linger_ms=5) as producer:
        futures: list[tuple[int, Future[RecordMetadata]]] = [
            (task, producer.send(TOPIC, value_of(task), partition=task % PARTITIONS))
            for task in range(tasks)
        ]
        producer.flush(PRODUCE_TIMEOUT_S)
    placed = {}
    for task, future in futures:
        meta = future.result(timeout=0)
        placed[(meta.partition, meta.offset)] = task
    return placed


def describe(address: str) -> tuple[int, int, int, list[tuple[int, int]]] | None:
    """(total lag, archived, acquired, [(start offset, log end offset)] per partition) by the
    broker; None when it does not answer."""
    try:
        with Admin(address) as admin:
            d = admin.describe_share_group(GROUP)
    except RiverlogError:
        return None
    parts = sorted(d.partitions, key=lambda p: p.partition)
    return (
        d.total_lag,
        sum(p.archived_total for p in parts),
        sum(p.acquired for p in parts),
        [(p.start_offset, p.log_end_offset) for p in parts],
    )


def wait_for(
    what: str, timeout_s: float, done: Callable[[], bool], diag: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / WAIT_S) + 1):
        if done():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(WAIT_S)
    pytest.fail(f"no {what} after {timeout_s} s\n{diag()}")


def test_share_group_survives_broker_kills(tmp_path: Path, seed: int, long_run: bool) -> None:
    rng = random.Random(seed)
    tasks = TASKS_LONG if long_run else TASKS
    kills = KILLS_LONG if long_run else KILLS
    fractions = sorted(
        rng.uniform(KILL_AT_FRACTION_MIN, KILL_AT_FRACTION_MAX) for _ in range(kills)
    )
    quick = [i < max(1, kills // QUICK_KILL_EVERY) for i in range(kills)]
    rng.shuffle(quick)
    jitters_s = [rng.uniform(0, KILL_JITTER_S) for _ in range(kills)]
    broker = RestartableBroker(tmp_path / "data")
    ledger = Ledger()
    stop = threading.Event()
    members = [
        Member(f"m{i}", broker.address, ledger, stop)
        for i in range(MEMBERS_LONG if long_run else MEMBERS)
    ]
    killed: list[Kill] = []
    started = time.monotonic()

    def diag() -> str:
        errors = [f"{m.label}: {m.error!r}" for m in members if m.error is not None]
        return (
            f"{ledger.confirmed()} of {tasks} confirmed, kills {len(killed)}, member errors "
            f"{errors}, state {describe(broker.address) if broker.process else None}\n"
            f"{broker.stderr_tail()}"
        )

    def members_alive() -> None:
        dead = [m.label for m in members if m.thread is None or not m.thread.is_alive()]
        assert not dead, f"members {dead} ended\n{diag()}"

    try:
        broker.start()
        placed = produce(broker.address, tasks)
        assert sorted(placed.values()) == list(range(tasks))
        for m in members:
            m.start()
        for fraction, jitter_s, is_quick in zip(fractions, jitters_s, quick, strict=True):
            since_ns = killed[-1].dead_ns if killed else 0

            def progressed(fraction: float = fraction, since_ns: int = since_ns) -> bool:
                members_alive()
                return (
                    ledger.confirmed() >= fraction * tasks
                    and ledger.confirmed_since(since_ns) >= RECOVERED_CONFIRMED
                )

            def handed_out(since_ns: int = since_ns) -> bool:
                members_alive()
                return ledger.delivered_since(since_ns) > 0

            if is_quick:
                wait_for("a delivery after the restart", PROGRESS_TIMEOUT_S, handed_out, diag)
            else:
                wait_for(f"{fraction:.0%} confirmed", PROGRESS_TIMEOUT_S, progressed, diag)
                time.sleep(jitter_s)
            sent_ns = time.time_ns()
            broker.kill()
            killed.append(Kill(sent_ns, time.time_ns()))
            broker.start()

        def finished() -> bool:
            members_alive()
            state = describe(broker.address)
            return state is not None and state[0] == 0 and not any(m.pending for m in members)

        wait_for("end: lag 0, every acknowledgement resolved", FINISH_TIMEOUT_S, finished, diag)
        stop.set()
        for m in members:
            assert m.thread is not None
            m.thread.join(JOIN_TIMEOUT_S)
            assert not m.thread.is_alive(), f"{m.label} did not stop\n{diag()}"
            assert m.error is None, f"{m.label}: {m.error!r}"
        state = describe(broker.address)
        ranges = log_ranges(broker.address, TOPIC)
        in_log = {
            (partition, offset): task_of(value)
            for partition, (start, end) in enumerate(ranges)
            for offset, value in read_partition(broker.address, TOPIC, partition, start, end)
        }
        assert broker.terminate() == 0, broker.stderr_tail()
    finally:
        stop.set()
        broker.close()
    elapsed_s = time.monotonic() - started

    deliveries, outcomes = ledger.deliveries, ledger.outcomes
    names = Counter(o.name for o in outcomes)
    delivered = {d.task for d in deliveries}
    confirmed = {deliveries[o.delivery].task for o in outcomes if o.name == CONFIRMED}
    restarts = broker.start_s[1:]
    print(
        f"\nshare chaos: seed {seed}, tasks {tasks}, members {len(members)}, kills "
        f"{broker.kills} ({sum(quick)} quick), deliveries {len(deliveries)} (redeliveries of "
        f"unconfirmed tasks "
        f"{len(deliveries) - len(delivered)}, max delivery count "
        f"{max(d.delivery_count for d in deliveries)}), confirmed {len(confirmed)}, unknown "
        f"outcome {tasks - len(confirmed)}, acknowledgement outcomes "
        f"{dict(sorted(names.items()))}, "
        f"failed polls {sum(m.poll_errors for m in members)} commits "
        f"{sum(m.commit_errors for m in members)}, restart s median "
        f"{statistics.median(restarts):.2f} max {max(restarts):.2f}, {elapsed_s:.1f} s"
    )
    # Each task in the log once, where the producer was told; each delivery says so too.
    assert in_log == placed
    wrong = [d for d in deliveries if in_log.get((d.partition, d.offset)) != d.task]
    assert not wrong, f"{len(wrong)} deliveries of a task not at that offset: {wrong[:5]}"
    assert names[UNRESOLVED] == 0, names
    problems = (
        lost_tasks(tasks, deliveries, outcomes, killed)
        + redelivered_after_confirmation(deliveries, outcomes)
        + count_problems(deliveries, killed)
    )
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:10])
    # (4) The broker: everything acknowledged, nothing archived or held, windows at the end.
    assert state is not None
    lag, archived, acquired, windows = state
    assert (lag, archived, acquired) == (0, 0, 0), state
    assert windows == [(end, end) for _start, end in ranges], (windows, ranges)


def test_checks_find_crafted_problems() -> None:
    """The checks above are not vacuous: each finds its fault in a tiny crafted history."""
    kill = Kill(100, 110)

    def d(task: int, count: int, polled_ns: int, returned_ns: int) -> Delivery:
        return Delivery(task, 0, task, count, "m0", polled_ns, returned_ns)

    # Task 0 confirmed; task 1 acknowledged before the kill, outcome unknown; task 2
    # refused UNKNOWN_MEMBER without a kill between; task 3 never delivered.
    deliveries = [d(0, 1, 10, 20), d(1, 1, 30, 40), d(2, 1, 120, 130)]
    outcomes = [
        Outcome(0, CONFIRMED, 25),
        Outcome(1, "UNKNOWN_MEMBER", 150),
        Outcome(2, "UNKNOWN_MEMBER", 140),
    ]
    lost = lost_tasks(4, deliveries, outcomes, [kill])
    assert [p.split(":")[0] for p in lost] == ["task 2", "task 3"], lost
    # Handed out after its confirmation: by time, and by delivery count.
    again = [d(0, 1, 10, 20), d(0, 2, 30, 40)]
    assert len(redelivered_after_confirmation(again, [Outcome(0, CONFIRMED, 25)])) == 1
    overlapping = [d(0, 1, 10, 20), d(0, 2, 15, 40)]
    assert len(redelivered_after_confirmation(overlapping, [Outcome(0, CONFIRMED, 25)])) == 1
    twice = [Outcome(0, CONFIRMED, 25), Outcome(1, CONFIRMED, 45)]
    assert len(redelivered_after_confirmation([d(0, 2, 10, 20), d(0, 2, 30, 40)], twice)) == 2
    # Counts going down across a kill; two deliveries in one incarnation.
    assert len(count_problems([d(0, 2, 10, 20), d(0, 1, 120, 130)], [kill])) == 1
    assert len(count_problems([d(0, 1, 10, 20), d(0, 2, 30, 40)], [kill])) == 1
    assert count_problems([d(0, 1, 10, 20), d(0, 2, 120, 130)], [kill]) == []
