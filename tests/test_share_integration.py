"""Share groups end to end: a real broker on loopback, ShareConsumers in worker processes
(tests/share_worker.py) and in the test, the broker killed and restarted for real.

What only this shows: many processes share two partitions record by record, each task
accepted exactly once and every worker busy; a worker killed with SIGKILL while it holds
records loses them to the others when their locks expire (delivery count 2); a broker killed
with SIGKILL and restarted on its data directory never hands out a record whose
acknowledgement it confirmed and loses none; a record that always fails goes to the
dead-letter topic after exactly max_delivery_attempts deliveries; delayed records come neither
early nor much late.

The workers journal what they see (share_worker.py's docstring: J joined, D delivered, A accept
confirmed, F accept refused or unknown, H held); the checks read those journals and the
broker's own view (DescribeShareGroup). Every child is killed in a `finally`; every wait is
bounded in time and in iterations. The figures are printed (run with -s).
"""

from __future__ import annotations

import collections
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

import pytest
from test_process import START_TIMEOUT_S, BrokerProcess, _free_port, running_broker

from stream import Admin, Consumer, Producer, Record, ShareConsumer
from stream._serve import RunningBroker

WORKER = Path(__file__).resolve().with_name("share_worker.py")
TOPIC = "tasks"
GROUP = "workers"
PARTITIONS = 2
# Bounds of the waits (each test takes well under them).
JOIN_TIMEOUT_S = 30.0
DONE_TIMEOUT_S = 60.0
HOLD_TIMEOUT_S = 20.0
WORKER_EXIT_TIMEOUT_S = 15.0
WORKER_MAX_SECONDS = 150.0
FLUSH_TIMEOUT_S = 30.0
POLL_S = 0.05
# The shortest lock the broker allows (stream/_share.py LOCK_MS_MIN).
LOCK_MS_MIN = 1_000


# ---------------------------------------------------------------------------- workers
@dataclass
class Worker:
    index: int
    out: Path
    stderr_path: Path
    proc: subprocess.Popen[bytes]
    stderr: IO[bytes]

    def kill(self) -> None:
        """SIGKILL (if still running) and reap."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WORKER_EXIT_TIMEOUT_S)
        self.stderr.close()

    def stop(self) -> int:
        """SIGTERM; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=WORKER_EXIT_TIMEOUT_S)
        self.stderr.close()
        return code

    def stderr_tail(self, lines: int = 15) -> str:
        text = self.stderr_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def start_worker(
    tmp_path: Path,
    index: int,
    server: str,
    *,
    mode: str = "work",
    lock_ms: int = 30_000,
    retry_backoff_ms: int = 1_000,
    max_records: int = 500,
) -> Worker:
    out = tmp_path / f"worker-{index}.journal"
    out.touch()
    stderr_path = tmp_path / f"worker-{index}.stderr"
    stderr = stderr_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            "--server",
            server,
            "--group",
            GROUP,
            "--topic",
            TOPIC,
            "--out",
            str(out),
            "--mode",
            mode,
            "--lock-ms",
            str(lock_ms),
            "--retry-backoff-ms",
            str(retry_backoff_ms),
            "--max-records",
            str(max_records),
            "--max-seconds",
            str(WORKER_MAX_SECONDS),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    return Worker(index, out, stderr_path, proc, stderr)


@contextmanager
def workers_running(
    tmp_path: Path,
    server: str,
    count: int,
    *,
    holding: int = 0,
    lock_ms: int = 30_000,
    retry_backoff_ms: int = 1_000,
    max_records: int = 500,
) -> Iterator[list[Worker]]:
    """`count` workers, the first `holding` of them in mode "hold"; each is killed on exit
    whatever happened."""
    started: list[Worker] = []
    try:
        for i in range(count):
            worker = start_worker(
                tmp_path,
                i,
                server,
                mode="hold" if i < holding else "work",
                lock_ms=lock_ms,
                retry_backoff_ms=retry_backoff_ms,
                max_records=max_records,
            )
            started.append(worker)
        yield started
    finally:
        for w in started:
            w.kill()


# ---------------------------------------------------------------------------- journals
class Delivery(NamedTuple):
    worker: int
    partition: int
    offset: int
    task: int
    delivery_count: int
    t_ns: int
    # When the poll that returned it started: the broker acquired it in between.
    polled_ns: int


class Event(NamedTuple):
    """A, H (name "") or F line."""

    worker: int
    partition: int
    offset: int
    task: int
    name: str
    t_ns: int


@dataclass
class Journals:
    """The workers' journals, read incrementally (whole lines only: a worker killed mid-write
    may leave a partial last line)."""

    workers: list[Worker]
    # Per worker, when it joined under a new member id (time.time_ns()), in order.
    joined: dict[int, list[int]] = field(default_factory=dict)
    delivered: list[Delivery] = field(default_factory=list)
    accepted: list[Event] = field(default_factory=list)
    failed: list[Event] = field(default_factory=list)
    held: list[Event] = field(default_factory=list)
    accepted_tasks: set[int] = field(default_factory=set)
    _read: dict[int, int] = field(default_factory=dict)

    def refresh(self) -> None:
        for w in self.workers:
            with w.out.open("rb") as f:
                f.seek(self._read.get(w.index, 0))
                data = f.read()
            whole = data[: data.rfind(b"\n") + 1]
            self._read[w.index] = self._read.get(w.index, 0) + len(whole)
            for line in whole.decode("ascii").splitlines():
                self._parse(w.index, line.split())

    def _parse(self, worker: int, f: list[str]) -> None:
        kind = f[0]
        if kind == "J":
            self.joined.setdefault(worker, []).append(int(f[2]))
        elif kind == "D":
            self.delivered.append(Delivery(worker, *map(int, f[1:])))
        elif kind == "A":
            p, o, task, t = map(int, f[1:])
            self.accepted.append(Event(worker, p, o, task, "", t))
            self.accepted_tasks.add(task)
        elif kind == "H":
            p, o, task, t = map(int, f[1:])
            self.held.append(Event(worker, p, o, task, "", t))
        elif kind == "F":
            self.failed.append(Event(worker, int(f[1]), int(f[2]), int(f[3]), f[4], int(f[5])))
        else:
            raise AssertionError(f"worker {worker}: unknown journal line {' '.join(f)!r}")

    def tails(self) -> str:
        return "\n".join(f"--- worker {w.index}:\n{w.stderr_tail()}" for w in self.workers)


def wait_until(
    what: str, done: Callable[[], bool], timeout_s: float, why: Callable[[], str]
) -> float:
    """Poll `done` until true; the seconds that took. Fails the test after `timeout_s`."""
    started = time.monotonic()
    for _ in range(int(timeout_s / POLL_S) + 2):
        if done():
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            break
        time.sleep(POLL_S)
    pytest.fail(f"{what}: not within {timeout_s} s\n{why()}")


def value_of(task: int, kind: str = "w") -> bytes:
    return f"{task}:{kind}".encode()


def produce_tasks(
    server: str, count: int, marker_every: int = 0, partitions: int = PARTITIONS
) -> float:
    """Tasks 0..count-1 round-robin over the partitions (every `marker_every`-th a hold
    marker); the seconds until the broker acknowledged them all."""
    started = time.monotonic()
    producer = Producer(server, acks="all", linger_ms=5)
    try:
        for task in range(count):
            marker = marker_every and task % marker_every == marker_every - 1
            producer.send(
                TOPIC, value_of(task, "h" if marker else "w"), partition=task % partitions
            )
        producer.flush(FLUSH_TIMEOUT_S)
    finally:
        producer.close()
    return time.monotonic() - started


def group_state(server: str) -> tuple[int, int]:
    """(total lag, records archived) of GROUP by the broker."""
    with Admin(server) as admin:
        description = admin.describe_share_group(GROUP)
    return description.total_lag, sum(p.archived_total for p in description.partitions)


def check_accepted_once(journals: Journals, tasks: int) -> None:
    """Every task 0..tasks-1 accepted exactly once (confirmed by the broker)."""
    counts = collections.Counter(e.task for e in journals.accepted)
    twice = sorted(t for t, n in counts.items() if n > 1)
    assert not twice, f"{len(twice)} tasks accepted more than once, e.g. {twice[:10]}"
    missing = sorted(set(range(tasks)) - set(counts))
    assert not missing, f"{len(missing)} tasks never accepted, e.g. {missing[:10]}"


def stop_all(workers: list[Worker], journals: Journals) -> None:
    codes = {w.index: w.stop() for w in workers}
    assert all(c == 0 for c in codes.values()), f"exit codes {codes}\n{journals.tails()}"
    journals.refresh()


# ---------------------------------------------------------------------------- 1: many workers
WORKERS = 8
TASKS = 50_000
WORKERS_MAX_RECORDS = 250
# Each worker does at least this fraction of the tasks (an even share is 12.5 %).
SHARE_MIN = 0.05


@pytest.mark.slow
def test_workers_share_the_tasks(tmp_path: Path) -> None:
    """8 worker processes over a 2-partition topic: 50,000 tasks, each accepted exactly once
    (and handed out once: nothing failed), every worker doing at least 5 %."""
    with running_broker(tmp_path / "data") as broker:
        server = broker.address
        with Admin(server) as admin:
            admin.create_topic(TOPIC, PARTITIONS)
        with workers_running(tmp_path, server, WORKERS, max_records=WORKERS_MAX_RECORDS) as workers:
            journals = Journals(workers)

            def joined() -> bool:
                journals.refresh()
                return len(journals.joined) == WORKERS

            join_s = wait_until("all workers joined", joined, JOIN_TIMEOUT_S, journals.tails)
            started = time.monotonic()
            produce_s = produce_tasks(server, TASKS)

            def all_accepted() -> bool:
                journals.refresh()
                return len(journals.accepted_tasks) == TASKS

            wait_until("all tasks accepted", all_accepted, DONE_TIMEOUT_S, journals.tails)
            elapsed_s = time.monotonic() - started
            stop_all(workers, journals)
        lag, archived = group_state(server)

    check_accepted_once(journals, TASKS)
    assert not journals.failed, f"refused acknowledgements: {journals.failed[:10]}"
    assert len(journals.delivered) == TASKS, "a task was handed out twice in a fault-free run"
    assert (lag, archived) == (0, 0)
    per_worker = collections.Counter(e.worker for e in journals.accepted)
    shares = {w: per_worker[w] / TASKS for w in range(WORKERS)}
    print(
        f"\nshare workers: {WORKERS} processes, {TASKS} tasks over {PARTITIONS} partitions, "
        f"max_records {WORKERS_MAX_RECORDS}: joined in {join_s:.1f} s, produced in "
        f"{produce_s:.1f} s, all accepted {elapsed_s:.1f} s after the first send: "
        f"{TASKS / elapsed_s:,.0f} tasks/s"
    )
    print(
        "per-worker shares: "
        + ", ".join(f"w{w} {shares[w]:.1%} ({per_worker[w]})" for w in range(WORKERS))
    )
    low = {w: s for w, s in shares.items() if s < SHARE_MIN}
    assert not low, f"workers below {SHARE_MIN:.0%} of the tasks: {low}"


# ---------------------------------------------------------------------------- 2: kill -9 workers
KILL_WORKERS = 6
VICTIMS = 2  # workers 0 and 1 run --mode hold
KILL_TASKS = 5_000
KILL_MAX_RECORDS = 50
MARKER_EVERY = 10
# No retry backoff: a record whose lock expired is available again at once (the default,
# 1 s, would come on top of the lock).
KILL_RETRY_BACKOFF_MS = 0
# The broker's clock is in whole milliseconds (floor): a lock may end up to this much before
# lock_ms of the nanosecond clock have passed.
CLOCK_GRAIN_MS = 1


@pytest.mark.slow
def test_killed_workers_tasks_come_back(tmp_path: Path) -> None:
    """Two workers killed with SIGKILL while they hold records unacknowledged: those records
    come back after the 1 s lock with delivery count 2 and the others finish them."""
    with running_broker(tmp_path / "data") as broker:
        server = broker.address
        with Admin(server) as admin:
            admin.create_topic(TOPIC, PARTITIONS)
        with workers_running(
            tmp_path,
            server,
            KILL_WORKERS,
            holding=VICTIMS,
            lock_ms=LOCK_MS_MIN,
            retry_backoff_ms=KILL_RETRY_BACKOFF_MS,
            max_records=KILL_MAX_RECORDS,
        ) as workers:
            journals = Journals(workers)

            def joined() -> bool:
                journals.refresh()
                return len(journals.joined) == KILL_WORKERS

            wait_until("all workers joined", joined, JOIN_TIMEOUT_S, journals.tails)
            produce_tasks(server, KILL_TASKS, marker_every=MARKER_EVERY)

            def victims_hold() -> bool:
                journals.refresh()
                return {e.worker for e in journals.held} == set(range(VICTIMS))

            wait_until("both victims hold records", victims_hold, HOLD_TIMEOUT_S, journals.tails)
            killed_ns = time.time_ns()
            for victim in workers[:VICTIMS]:
                victim.kill()

            def all_accepted() -> bool:
                journals.refresh()
                return len(journals.accepted_tasks) == KILL_TASKS

            wait_until("all tasks accepted", all_accepted, DONE_TIMEOUT_S, journals.tails)
            stop_all(workers[VICTIMS:], journals)
        lag, archived = group_state(server)

    check_accepted_once(journals, KILL_TASKS)
    assert (lag, archived) == (0, 0)
    held_tasks = {e.task for e in journals.held}
    victim_accepts = {e.task for e in journals.accepted if e.worker < VICTIMS}
    assert not held_tasks & victim_accepts, "a held record was accepted by its holder"
    first_delivery = {
        d.task: d for d in journals.delivered if d.worker < VICTIMS and d.task in held_tasks
    }
    redelivered: dict[int, Delivery] = {}
    for d in sorted(journals.delivered, key=lambda d: d.t_ns):
        if d.task in held_tasks and d.worker >= VICTIMS:
            redelivered.setdefault(d.task, d)
    assert set(redelivered) == held_tasks, "a held record did not come back"
    counts = collections.Counter(d.delivery_count for d in redelivered.values())
    assert counts == {2: len(held_tasks)}, f"delivery counts of the comebacks: {dict(counts)}"
    # The victim's poll started before the broker acquired the record, and the comeback was
    # journaled after the broker acquired it again: a lower bound of how long the lock held.
    lock_held_ms = {
        task: (d.t_ns - first_delivery[task].polled_ns) / 1e6 for task, d in redelivered.items()
    }
    early = sorted(
        (ms, task) for task, ms in lock_held_ms.items() if ms < LOCK_MS_MIN - CLOCK_GRAIN_MS
    )
    assert not early, f"handed out again before the lock expired (ms, task): {early[:10]}"
    after_kill_ms = [(d.t_ns - killed_ns) / 1e6 for d in redelivered.values()]
    print(
        f"\nkill -9: {VICTIMS} of {KILL_WORKERS} workers killed holding {len(held_tasks)} "
        f"records (lock {LOCK_MS_MIN} ms, retry backoff {KILL_RETRY_BACKOFF_MS} ms); all came "
        f"back with delivery count 2, {min(lock_held_ms.values()):.0f}.."
        f"{max(lock_held_ms.values()):.0f} ms after the poll that first took them, "
        f"{min(after_kill_ms):.0f}..{max(after_kill_ms):.0f} ms after the kill; "
        f"{len(journals.failed)} refused acknowledgements"
    )


# ---------------------------------------------------------------------------- 3: broker restart
RESTART_WORKERS = 4
RESTART_TASKS = 20_000
RESTART_MAX_RECORDS = 100
# The broker is killed once this many tasks are confirmed.
KILL_AFTER_ACCEPTED = 6_000
# How long the broker stays down.
DOWN_S = 1.0


def start_broker(data_dir: Path, port: int) -> BrokerProcess:
    broker = BrokerProcess(data_dir, port)
    if broker.wait_for_line("listening on", START_TIMEOUT_S) is None:
        broker.kill()
        pytest.fail(f"broker did not start on port {port}:\n{broker.stderr_text()}")
    return broker


@pytest.mark.slow
def test_broker_restart_keeps_acknowledgements(tmp_path: Path) -> None:
    """The broker killed with SIGKILL mid-work and restarted on the same data directory and
    port: the workers carry on (retries, rejoin), no task whose acceptance the broker confirmed
    is handed out again, and none is lost."""
    data_dir = tmp_path / "data"
    port = _free_port()
    server = f"127.0.0.1:{port}"
    broker = start_broker(data_dir, port)
    try:
        with Admin(server) as admin:
            admin.create_topic(TOPIC, PARTITIONS)
        with workers_running(
            tmp_path, server, RESTART_WORKERS, lock_ms=10_000, max_records=RESTART_MAX_RECORDS
        ) as workers:
            journals = Journals(workers)

            def joined() -> bool:
                journals.refresh()
                return len(journals.joined) == RESTART_WORKERS

            wait_until("all workers joined", joined, JOIN_TIMEOUT_S, journals.tails)
            produce_tasks(server, RESTART_TASKS)

            def enough_accepted() -> bool:
                journals.refresh()
                return len(journals.accepted_tasks) >= KILL_AFTER_ACCEPTED

            wait_until("tasks accepted", enough_accepted, DONE_TIMEOUT_S, journals.tails)
            broker.proc.send_signal(signal.SIGKILL)
            broker.proc.wait(timeout=WORKER_EXIT_TIMEOUT_S)
            killed_ns = time.time_ns()
            broker.kill()
            journals.refresh()
            accepted_at_kill = len(journals.accepted_tasks)
            time.sleep(DOWN_S)
            restarted = time.monotonic()
            broker = start_broker(data_dir, port)
            restart_s = time.monotonic() - restarted

            def finished() -> bool:
                journals.refresh()
                unsure = {e.task for e in journals.failed}
                if len(journals.accepted_tasks | unsure) < RESTART_TASKS:
                    return False
                return group_state(server)[0] == 0

            wait_until("all tasks done", finished, DONE_TIMEOUT_S, journals.tails)
            done_s = time.monotonic() - restarted

            # The restarted broker knows no member: every worker must have noticed and
            # rejoined (one that was retrying a commit may not have done any work since).
            def rejoined() -> bool:
                journals.refresh()
                return all(
                    any(t > killed_ns for t in journals.joined.get(w.index, [])) for w in workers
                )

            wait_until("every worker rejoined", rejoined, JOIN_TIMEOUT_S, journals.tails)
            assert all(w.proc.poll() is None for w in workers), journals.tails()
            stop_all(workers, journals)
        lag, archived = group_state(server)
    finally:
        broker.kill()

    # No confirmed acceptance twice, and after it no delivery of the task at all.
    counts = collections.Counter(e.task for e in journals.accepted)
    twice = sorted(t for t, n in counts.items() if n > 1)
    assert not twice, f"{len(twice)} tasks accepted twice, e.g. {twice[:10]}"
    last_delivery: dict[int, Delivery] = {}
    for d in sorted(journals.delivered, key=lambda d: d.t_ns):
        last_delivery[d.task] = d
    redelivered = [
        (e, last_delivery[e.task]) for e in journals.accepted if last_delivery[e.task].t_ns > e.t_ns
    ]
    assert not redelivered, f"handed out after a confirmed accept: {redelivered[:5]}"
    # Nothing lost: the broker says every record is acknowledged (none archived), and every
    # task was confirmed, or acknowledged with an outcome the client could not learn (the
    # broker died between applying and answering) and never handed out again.
    assert (lag, archived) == (0, 0)
    unsure = {e.task for e in journals.failed} - journals.accepted_tasks
    assert journals.accepted_tasks | unsure == set(range(RESTART_TASKS))
    # Those were acknowledged before the kill (by a call whose answer the kill lost).
    late = sorted(t for t in unsure if last_delivery[t].t_ns > killed_ns)
    assert not late, f"never confirmed, delivered after the kill, yet done: {late[:10]}"
    deliveries = collections.Counter(d.task for d in journals.delivered)
    again = sum(1 for n in deliveries.values() if n > 1)
    after = collections.Counter(e.worker for e in journals.accepted if e.t_ns > killed_ns)
    names = collections.Counter(e.name for e in journals.failed)
    print(
        f"\nbroker restart: {RESTART_WORKERS} workers, {RESTART_TASKS} tasks; killed after "
        f"{accepted_at_kill} confirmed, down {DOWN_S:.1f} s, restart took {restart_s:.1f} s, "
        f"all done {done_s:.1f} s after it; {again} tasks handed out more than once, "
        f"{len(journals.failed)} acknowledgements refused or unknown {dict(names)} "
        f"({len(unsure)} tasks never confirmed but acknowledged per the broker); accepted "
        "after the kill per worker: "
        + ", ".join(f"w{w} {after[w]}" for w in range(RESTART_WORKERS))
    )


# ---------------------------------------------------------------------------- 4: dead letters
DLQ_TOPIC = "tasks.dlq"
DLQ_RECORDS = 5
DLQ_ATTEMPTS = 3
# The smallest backoff the broker allows is 0 (stream/_share.py); 10 ms keeps it a real wait.
DLQ_BACKOFF_MS = 10
# After the last delivery, the source is polled this long more: it must not come again
# (the 4th delivery would be due after 40 ms of backoff).
DLQ_QUIET_S = 1.0
WAIT_S = 10.0


def read_topic(server: str, topic: str, count: int) -> list[Record]:
    """At least `count` records of `topic`'s partitions from their start (bounded wait)."""
    with Admin(server) as admin:
        partitions = len(admin.describe_topic(topic).partitions)
    consumer = Consumer(server, auto_offset_reset="earliest")
    out: list[Record] = []
    try:
        consumer.assign([(topic, p) for p in range(partitions)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + WAIT_S
        for _ in range(int(WAIT_S / 0.1) + 1):
            if len(out) >= count or time.monotonic() > deadline:
                break
            out += consumer.poll(timeout_ms=100)
    finally:
        consumer.close()
    return out


def test_always_failing_record_goes_to_the_dead_letter_topic(
    running_broker: RunningBroker,
) -> None:
    """A handler that always releases with an error: after exactly 3 deliveries each record is
    in the dead-letter topic with the riverlog-dlq-* headers (count 3, the last error), and is
    never delivered a 4th time."""
    server = running_broker.address
    with Admin(server) as admin:
        admin.create_topic(TOPIC, 1)
    producer = Producer(server, acks="all")
    try:
        for i in range(DLQ_RECORDS):
            producer.send(TOPIC, value_of(i), key=str(i).encode(), headers=[("origin", b"test")])
        producer.flush(FLUSH_TIMEOUT_S)
    finally:
        producer.close()
    deliveries: dict[int, list[int]] = collections.defaultdict(list)
    with ShareConsumer(
        server,
        group=GROUP,
        topics=[TOPIC],
        dead_letter_topic=DLQ_TOPIC,
        max_delivery_attempts=DLQ_ATTEMPTS,
        retry_backoff_ms=DLQ_BACKOFF_MS,
        start="earliest",
        max_wait_ms=100,
    ) as consumer:
        deadline = time.monotonic() + WAIT_S
        quiet_until: float | None = None
        for _ in range(int(WAIT_S / 0.1) + 1):
            now = time.monotonic()
            if now > deadline or (quiet_until is not None and now > quiet_until):
                break
            for r in consumer.poll(timeout_ms=100):
                deliveries[r.offset].append(r.delivery_count)
                consumer.release(r, f"failed at delivery {r.delivery_count}")
            assert consumer.commit() == []
            done = len(deliveries) == DLQ_RECORDS and all(
                len(c) >= DLQ_ATTEMPTS for c in deliveries.values()
            )
            if done and quiet_until is None:
                quiet_until = time.monotonic() + DLQ_QUIET_S
        assert consumer.take_ack_failures() == []
    assert dict(deliveries) == {o: [1, 2, 3] for o in range(DLQ_RECORDS)}

    dead = read_topic(server, DLQ_TOPIC, DLQ_RECORDS)
    assert len(dead) == DLQ_RECORDS
    by_offset: dict[int, tuple[Record, dict[str, bytes | None]]] = {}
    for dead_record in dead:
        headers = dict(dead_record.headers)
        by_offset[int(headers["riverlog-dlq-offset"] or b"")] = (dead_record, headers)
    assert sorted(by_offset) == list(range(DLQ_RECORDS))
    for offset, (dead_record, headers) in by_offset.items():
        assert dead_record.value == value_of(offset)
        assert dead_record.key == str(offset).encode()
        assert headers["origin"] == b"test"
        assert headers["riverlog-dlq-topic"] == TOPIC.encode()
        assert headers["riverlog-dlq-partition"] == b"0"
        assert headers["riverlog-dlq-delivery-count"] == str(DLQ_ATTEMPTS).encode()
        assert headers["riverlog-dlq-reason"] == b"max-delivery-attempts"
        assert headers["riverlog-dlq-error"] == f"failed at delivery {DLQ_ATTEMPTS}".encode()
    lag, archived = group_state(server)
    assert (lag, archived) == (0, DLQ_RECORDS)
    example = by_offset[0][1]
    print(
        f"\ndead letters: {DLQ_RECORDS} records released at every delivery, delivered "
        f"{sorted({tuple(c) for c in deliveries.values()})} times, then dead-lettered with "
        + ", ".join(f"{k}={v!r}" for k, v in sorted(example.items()) if k.startswith("riverlog"))
    )


# ---------------------------------------------------------------------------- 5: delayed
DELAYED = 50
IMMEDIATE = 50
DELAY_MIN_MS = 300
DELAY_MAX_MS = 1_500
# A waiting fetch wakes at the next due time (stream/_share.py); what is left is the fetch
# answer, the client and a loaded machine.
LATENESS_MAX_MS = 500
DELIVER_AT = "riverlog-deliver-at"


def test_delayed_records_are_delivered_on_time(running_broker: RunningBroker) -> None:
    """50 records due now+300..1500 ms mixed with 50 immediate ones: none is handed out before
    its time, each within 500 ms after it; the immediate ones come at once."""
    server = running_broker.address
    with Admin(server) as admin:
        admin.create_topic(TOPIC, 1)
    received_ms: dict[int, int] = {}
    due_ms: dict[int, int] = {}
    with ShareConsumer(
        server, group=GROUP, topics=[TOPIC], start="earliest", auto_ack=True, max_wait_ms=1_000
    ) as consumer:
        assert consumer.poll(timeout_ms=200) == []  # joined: the group exists
        producer = Producer(server, acks="all")
        try:
            sent_ms = time.time_ns() // 1_000_000
            step_ms = (DELAY_MAX_MS - DELAY_MIN_MS) // (DELAYED - 1)
            for i in range(DELAYED + IMMEDIATE):
                headers = []
                if i % 2 == 0:
                    due_ms[i] = sent_ms + DELAY_MIN_MS + (i // 2) * step_ms
                    headers = [(DELIVER_AT, str(due_ms[i]).encode())]
                producer.send(TOPIC, value_of(i), headers=headers)
            producer.flush(FLUSH_TIMEOUT_S)
        finally:
            producer.close()
        deadline = time.monotonic() + WAIT_S
        for _ in range(int(WAIT_S / 0.1) + 1):
            if len(received_ms) == DELAYED + IMMEDIATE or time.monotonic() > deadline:
                break
            records = consumer.poll(timeout_ms=100)
            now_ms = time.time_ns() // 1_000_000
            for r in records:
                task = int((r.value or b"").split(b":")[0])
                assert task not in received_ms, f"task {task} handed out twice"
                received_ms[task] = now_ms
    assert len(received_ms) == DELAYED + IMMEDIATE
    # The broker hands a record out once its clock (ms, floor) reaches the due time; the test
    # reads the same clock after the answer arrived: lateness is never negative.
    lateness = sorted(received_ms[i] - due for i, due in due_ms.items())
    immediate = sorted(received_ms[i] - sent_ms for i in received_ms if i not in due_ms)
    print(
        f"\ndelayed delivery: {DELAYED} records due +{DELAY_MIN_MS}..{DELAY_MAX_MS} ms, "
        f"lateness p50 {statistics.median(lateness):.0f} ms, max {lateness[-1]} ms "
        f"(min {lateness[0]} ms); {IMMEDIATE} immediate ones within {immediate[-1]} ms of the "
        "first send"
    )
    assert lateness[0] >= 0, f"delivered {-lateness[0]} ms early"
    assert lateness[-1] < LATENESS_MAX_MS
    assert immediate[-1] < DELAY_MIN_MS, "an immediate record waited for a delayed one"
