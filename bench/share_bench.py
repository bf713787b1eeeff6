"""Share groups (queue semantics) against Redis Streams consumer groups, in one run.

    python bench/share_bench.py [--quick] [--tasks N] [--max-records N] [--repetitions N]

Throughput: N tasks of 100-byte values (--quick: 20,000) wait in a 2-partition topic
(riverlog) or one stream key (Redis); W worker processes (1, 2, 4, 8) drain them.

- riverlog: each worker is a `ShareConsumer` of one share group; it acknowledges every
  record it gets (`ack`), and the acknowledgements go with its next `poll` (one ShareFetch:
  acknowledge, fsync, acquire up to `max_records`).
- Redis: each worker is a consumer of one consumer group: XREADGROUP COUNT `max_records`,
  and one XACK of the ids it read, pipelined with its next XREADGROUP.

The workers start as separate processes, join (riverlog: on the empty topic; the topic is
filled while they wait) and connect, and are told to go at one moment. Throughput is
tasks / (time from the go signal to the last acknowledgement, of any worker). Every count is
checked: a run that loses a task, hands one out twice or leaves one unacknowledged fails.

Latency: a producer in this process sends 2,000 tasks/s (--quick: 2 s, full: 5 s, after
0.5 s of warm-up) with its send time in the value into a live group of 4 workers; a task's
latency is the time its worker acknowledges it (`ack`, or the XACK queued for the next read)
minus its send time: p50, p99 and max.

Servers: riverlog's broker as bench/_common.py starts it (defaults); redis-server on
loopback with `appendonly yes`, `appendfsync everysec`, `save ""` (as bench/compare.py runs
it). Both are stopped at the end, also after an error or Ctrl-C. Without redis-server or
redis-py, Redis is skipped with a message and riverlog's figures are still printed. Every
process sets the garbage collector's first threshold to 100,000 (bench/compare.py's choice).

The last line of stdout is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import multiprocessing
import multiprocessing.context
import multiprocessing.queues
import multiprocessing.synchronize
import os
import queue
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeAlias

from _common import (
    Child,
    broker_command,
    grpc_versions,
    load_average,
    machine,
    print_estimates,
    print_fields,
    print_load_average_at_start,
    start_child,
    stop_child,
)
from compare_common import LatencyPlan, make_values, percentile, read_stamp, send_paced

from stream import Admin, Producer, ShareConsumer

SYSTEMS = ("riverlog", "redis")
LABELS = {"riverlog": "riverlog", "redis": "Redis Streams"}
PARTITIONS = 2
VALUE_BYTES = 100
WORKER_COUNTS = (1, 2, 4, 8)
# Records per ShareFetch (riverlog) and per XREADGROUP COUNT (Redis): the ShareConsumer
# default, and the largest count at which 8 workers' batches fit in the broker's in-flight
# window (MAX_IN_FLIGHT_DEFAULT, 2,000 records per share-partition: 4,000 on 2 partitions).
# Tried with 50,000 tasks (riverlog tasks/s at 1 / 8 workers): 250: 30,000 / 45,000 (one
# ShareFetch, so one fsync, per 250 tasks); 1,000: 113,000 / 167,000 and 2,000: 172,000 /
# 147,000, but with 4-8 workers some get nothing while the window is full and wait out
# their poll (an ACCEPT does not wake a waiting ShareFetch). Redis: 200,000-350,000 at all.
MAX_RECORDS = 500
MAX_RECORDS_LIMIT = 10_000  # the broker's limit per ShareFetch
# How long one poll (riverlog) waits when nothing is available; Redis's XREADGROUP BLOCK
# of the latency workers. A worker checks whether every task was handed out this often.
POLL_TIMEOUT_MS = 200
# Polls of a joining riverlog worker (on the empty topic) until the broker knows it.
JOIN_POLL_MS = 50
LATENCY_WORKERS = 4
LATENCY_RATE_PER_S = 2_000
LATENCY_RATE_MAX = 20_000
# As bench/compare.py: a first GC threshold of 100,000 in every process, both systems alike.
GC_THRESHOLD = (100_000, 50, 100)
SEED = 20240601
# Bounds: no run may last longer, whatever the machine does.
PHASE_SECONDS_MAX = 120.0
WORKER_READY_S = 60.0
WORKER_EXIT_S = 10.0
MESSAGE_POLL_S = 0.25
TASKS_MAX = 5_000_000
REPETITIONS_MAX = 9
# The one field of every stream entry (bench/compare_redis.py's FIELD).
REDIS_FIELD = b"v"
LABEL_WIDTH = 30
FIGURE_NAME_WIDTH = 28
FIGURE_VALUE_WIDTH = 10

# Written before the first run. riverlog: one ShareFetch per 500 tasks carries the previous
# 500 acknowledgements, which the broker fsyncs (~1-3 ms here) before it answers, plus
# decoding ~0.5 us a record in the worker: ~100,000 tasks/s for one worker, ~150,000/s at
# two, flat beyond on two cores (one broker process, one lock). Redis: bench/compare.py's
# group of 1 consumer at COUNT 1,000 read ~330,000/s, ~480,000/s at 2 and 4 processes.
# Latency: compare.py's riverlog long-poll p50 ~2 ms / p99 ~4 ms, plus the share fetch's
# wake-up of 4 waiting fetches; Redis ~0.2 / ~0.5 ms.
ESTIMATES: dict[str, tuple[float, str]] = {
    "riverlog_1_worker_per_s": (100_000, "fsync of 500 acks per ShareFetch + decoding"),
    "riverlog_8_workers_per_s": (150_000, "broker-bound on 2 cores"),
    "redis_1_worker_per_s": (300_000, "compare.py group of 1, COUNT 1,000"),
    "redis_8_workers_per_s": (400_000, "compare.py group of 4"),
    "riverlog_latency_p50_ms": (3.0, "compare.py long-poll p50 + share wake-up"),
    "riverlog_latency_p99_ms": (8.0, ""),
    "redis_latency_p50_ms": (0.3, "XREADGROUP BLOCK"),
    "redis_latency_p99_ms": (1.0, ""),
}
# Afterwards (full run, load 2.6-7.7 from other work on the machine): riverlog 61,000-77,000
# tasks/s, flat from 1 to 8 workers: ~200 ShareFetch calls a second whatever the worker count,
# because every ShareFetch that carries acks waits for its own fsync, one after another (the
# state store's lock is held through the fsync, and the manager's lock waits on it), and a
# worker decodes the whole ~2,500-record stored batch to get its 500. Redis 217,000-255,000.
# Latency p50 14 ms / p99 90 ms, against p50 ~2.3 ms at 250 tasks/s: at 2,000 tasks/s the
# fsync-per-fetch limit is reached and tasks queue (6.7 tasks per poll); Redis 0.2 / 0.9 ms.


@dataclass(frozen=True, slots=True)
class Settings:
    tasks: int
    latency_seconds: float
    repetitions: int
    latency_warmup_seconds: float = 0.5
    workers: tuple[int, ...] = WORKER_COUNTS
    max_records: int = MAX_RECORDS
    partitions: int = PARTITIONS
    value_bytes: int = VALUE_BYTES
    latency_workers: int = LATENCY_WORKERS
    latency_rate_per_s: int = LATENCY_RATE_PER_S
    poll_timeout_ms: int = POLL_TIMEOUT_MS
    gc_threshold: tuple[int, int, int] = GC_THRESHOLD
    quick: bool = False


FULL = Settings(tasks=100_000, latency_seconds=5.0, repetitions=3)
QUICK = Settings(tasks=20_000, latency_seconds=2.0, repetitions=1, quick=True)


# ---------------------------------------------------------------------------- workers
@dataclass(frozen=True, slots=True)
class Job:
    """What one worker process does: drain `tasks` (role "drain"), or take the latency
    tasks as they come (role "latency", the first `warmup` not measured)."""

    system: str
    role: str
    address: str
    stream: str
    group: str
    name: str
    tasks: int
    warmup: int
    max_records: int
    poll_timeout_ms: int
    gc_threshold: tuple[int, int, int]


@dataclass
class Tally:
    """A worker's result, sent back to the orchestrator."""

    records: int = 0
    # time.monotonic_ns when the last acknowledgement was known to be applied (riverlog:
    # the answer of the call that carried it; for a poll that then waited for records in
    # vain, the time it was sent: see _riverlog_worker).
    last_ack_ns: int = 0
    polls: int = 0
    empty_polls: int = 0
    # Seconds spent in polls that returned nothing while tasks were still to be handed out.
    empty_poll_s: float = 0.0
    redelivered: int = 0
    ack_failures: int = 0
    latencies_us: list[int] = field(default_factory=list)


# Not subscriptable at run time: a string the type checker reads.
Messages: TypeAlias = "multiprocessing.queues.Queue[tuple[str, int, Any]]"
Counter = Any  # multiprocessing.sharedctypes.Synchronized[int]: typeshed spells it privately


def worker_main(
    index: int,
    job: Job,
    messages: Messages,
    go: multiprocessing.synchronize.Event,
    taken: Counter,
) -> None:
    """A worker process: connect or join, say ("ready", index), wait for `go`, work, then
    say ("done", index, Tally); ("error", index, text) instead on any failure."""
    gc.set_threshold(*job.gc_threshold)
    deadline_s = time.monotonic() + WORKER_READY_S + PHASE_SECONDS_MAX
    try:
        if job.system == "riverlog":
            tally = _riverlog_worker(index, job, messages, go, taken, deadline_s)
        else:
            tally = _redis_worker(index, job, messages, go, taken, deadline_s)
    except BaseException:
        messages.put(("error", index, traceback.format_exc()))
        raise
    messages.put(("done", index, tally))


def _add(taken: Counter, count: int) -> int:
    with taken.get_lock():
        taken.value += count
        total: int = taken.value
        return total


def _riverlog_worker(
    index: int,
    job: Job,
    messages: Messages,
    go: multiprocessing.synchronize.Event,
    taken: Counter,
    deadline_s: float,
) -> Tally:
    tally = Tally()
    with ShareConsumer(
        job.address,
        group=job.group,
        topics=[job.stream],
        start="earliest",
        max_records=job.max_records,
    ) as consumer:
        # Join on the empty topic; one fetch after joining opens the channel for real.
        while not consumer.member_id and time.monotonic() < deadline_s:
            if consumer.poll(timeout_ms=JOIN_POLL_MS):
                raise RuntimeError("the topic must be empty while the workers join")
        if not consumer.member_id or consumer.poll(timeout_ms=0):
            raise RuntimeError("no membership before the deadline, or the topic was not empty")
        messages.put(("ready", index, None))
        if not go.wait(PHASE_SECONDS_MAX):
            raise RuntimeError("no go signal")
        poll, ack = consumer.poll, consumer.ack
        acks_pending = False
        while time.monotonic() < deadline_s:
            if taken.value >= job.tasks:  # every task handed out: send the last acks now
                failures = consumer.commit()
                tally.ack_failures += len(failures)
                if acks_pending:
                    tally.last_ack_ns = time.monotonic_ns()
                break
            sent_ns = time.monotonic_ns()
            records = poll(timeout_ms=job.poll_timeout_ms)
            now_ns = time.monotonic_ns()
            tally.polls += 1
            if acks_pending:
                # The acks this poll carried were fsynced before it acquired anything; when it
                # then waited in vain, the client knows only when it was sent.
                tally.last_ack_ns = now_ns if records else sent_ns
                acks_pending = False
            if not records:
                tally.empty_polls += 1
                if taken.value < job.tasks:
                    tally.empty_poll_s += (now_ns - sent_ns) / 1e9
                continue
            _add(taken, len(records))
            for r in records:
                ack(r)
                if r.delivery_count > 1:
                    tally.redelivered += 1
                if job.role == "latency":
                    seq, produced_ns = read_stamp(r.value or b"")
                    if seq >= job.warmup:
                        tally.latencies_us.append((time.monotonic_ns() - produced_ns) // 1000)
            tally.records += len(records)
            acks_pending = True
        tally.ack_failures += len(consumer.take_ack_failures())
    return tally


def _redis_worker(
    index: int,
    job: Job,
    messages: Messages,
    go: multiprocessing.synchronize.Event,
    taken: Counter,
    deadline_s: float,
) -> Tally:
    redis = importlib.import_module("redis")
    host, port = job.address.rsplit(":", 1)
    r = redis.Redis(host=host, port=int(port), protocol=2)
    tally = Tally()
    try:
        r.ping()
        messages.put(("ready", index, None))
        if not go.wait(PHASE_SECONDS_MAX):
            raise RuntimeError("no go signal")
        pipe = r.pipeline(transaction=False)
        stream, group, name = job.stream, job.group, job.name
        block = job.poll_timeout_ms if job.role == "latency" else None
        ids: list[Any] = []
        while time.monotonic() < deadline_s:
            if ids:
                pipe.xack(stream, group, *ids)
            if job.role == "latency" and taken.value >= job.tasks:
                if ids:
                    pipe.execute()
                    tally.last_ack_ns = time.monotonic_ns()
                break
            sent_ns = time.monotonic_ns()
            pipe.xreadgroup(group, name, {stream: ">"}, count=job.max_records, block=block)
            answers = pipe.execute()
            now_ns = time.monotonic_ns()
            tally.polls += 1
            if ids:
                tally.last_ack_ns = now_ns
            reply = answers[-1]
            entries: list[Any] = reply[0][1] if reply else []
            ids = [entry[0] for entry in entries]
            if not entries:
                tally.empty_polls += 1
                if job.role == "drain":
                    break  # the stream was full before go: everything is handed out
                if taken.value < job.tasks:
                    tally.empty_poll_s += (now_ns - sent_ns) / 1e9
                continue
            _add(taken, len(entries))
            if job.role == "latency":
                for entry in entries:
                    seq, produced_ns = read_stamp(entry[1][REDIS_FIELD])
                    if seq >= job.warmup:
                        tally.latencies_us.append((time.monotonic_ns() - produced_ns) // 1000)
            tally.records += len(entries)
    finally:
        r.close()
    return tally


class WorkerSet:
    """W worker processes (spawned: a fresh interpreter each, no fork of grpc's threads),
    the queue they report on, the go signal and the shared count of tasks handed out."""

    def __init__(self, jobs: list[Job]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.messages: Messages = ctx.Queue()
        self.go = ctx.Event()
        self.taken: Counter = ctx.Value("q", 0)
        self.procs = [
            ctx.Process(
                target=worker_main,
                args=(i, job, self.messages, self.go, self.taken),
                name=f"share-bench-{job.name}",
                daemon=True,
            )
            for i, job in enumerate(jobs)
        ]

    def start(self) -> None:
        for p in self.procs:
            p.start()

    def expect(self, kind: str, timeout_s: float) -> list[Any]:
        """One `kind` message from every worker (their payloads by index); raises on an
        error message, a worker that exited without one, or the timeout."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < len(self.procs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(self.procs) - len(got)} worker(s) silent ({kind})")
            try:
                what, index, payload = self.messages.get(timeout=MESSAGE_POLL_S)
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"worker {dead[0].name} exited {dead[0].exitcode}") from None
                continue
            if what == "error":
                raise RuntimeError(f"worker {index} failed:\n{payload}")
            if what != kind:
                raise RuntimeError(f"worker {index} said {what!r}, expected {kind!r}")
            got[index] = payload
        return [got[i] for i in range(len(self.procs))]

    def stop(self, wait_s: float) -> None:
        """Let the workers exit for up to `wait_s` each, then kill the ones left."""
        for p in self.procs:
            if p.pid is None:
                continue  # never started
            p.join(wait_s)
            if p.is_alive():
                p.kill()
                p.join(WORKER_EXIT_S)


@contextlib.contextmanager
def worker_set(jobs: list[Job]) -> Iterator[WorkerSet]:
    """Start the workers; afterwards let them exit, or kill them at once after an error."""
    workers = WorkerSet(jobs)
    wait_s = 0.0
    try:
        workers.start()
        yield workers
        wait_s = WORKER_EXIT_S
    finally:
        workers.stop(wait_s)


# ---------------------------------------------------------------------------- systems
class RiverlogSide:
    """The broker child and what the orchestrator does with it: topics, the fill, the
    latency producer, the checks after a run."""

    name = "riverlog"

    def __init__(self, work_dir: str) -> None:
        self._child: Child | None = start_child(
            "broker", broker_command(os.path.join(work_dir, "riverlog")), work_dir
        )
        self.address = self._child.address
        self._admin = Admin(self.address)

    def describe(self, max_records: int) -> str:
        return (
            "broker defaults (log fsync never; share acknowledgements fsynced before each "
            f"answer); ShareConsumer(max_records={max_records}), ack of each record, sent "
            f"with the next poll; a {PARTITIONS}-partition topic"
        )

    def create(self, stream: str, group: str) -> None:
        del group  # a share group forms when its first member joins
        self._admin.create_topic(stream, PARTITIONS)

    def fill(self, stream: str, values: list[bytes], tasks: int) -> None:
        mask = len(values) - 1
        with Producer(self.address) as producer:
            for i in range(tasks):
                producer.send(stream, values[i & mask], partition=i % PARTITIONS)
            producer.flush()
        length = sum(
            self._admin.list_offsets(stream, p, "latest").log_end_offset for p in range(PARTITIONS)
        )
        if length != tasks:
            raise RuntimeError(f"riverlog fill: {length:,} records, expected {tasks:,}")

    def sender(self, stream: str) -> tuple[Callable[[bytes], None], Callable[[], None]]:
        producer = Producer(self.address, linger_ms=0)
        sent = 0

        def send(value: bytes) -> None:
            nonlocal sent
            producer.send(stream, value, partition=sent % PARTITIONS)
            sent += 1

        return send, producer.close

    def check_drained(self, stream: str, group: str) -> None:
        lag = self._admin.describe_share_group(group).total_lag
        if lag != 0:
            raise RuntimeError(f"riverlog share group {group}: {lag:,} tasks not acknowledged")

    def delete(self, stream: str, group: str) -> None:
        self._admin.delete_topic(stream)
        self._admin.delete_share_group(group)

    def stop(self) -> None:
        self._admin.close()
        child, self._child = self._child, None
        if child is not None:
            stop_child(child)


class RedisSide:
    """redis-server (bench/compare_redis.py's RedisStreams starts and stops it)."""

    name = "redis"

    def __init__(self, work_dir: str) -> None:
        self._peer: Any = importlib.import_module("compare_redis").RedisStreams()
        self._peer.start(work_dir)
        self.address: str = self._peer.address
        redis = importlib.import_module("redis")
        host, port = self.address.rsplit(":", 1)
        self._r: Any = redis.Redis(host=host, port=int(port), protocol=2)
        self._described: dict[str, str] = self._peer.describe()

    def describe(self, max_records: int) -> str:
        d = self._described
        return (
            f"{d['server']}, {d['persistence']}; {d['client']}; XREADGROUP COUNT "
            f"{max_records}, one XACK per batch pipelined with the next XREADGROUP; one "
            "stream key"
        )

    def create(self, stream: str, group: str) -> None:
        self._r.xgroup_create(stream, group, id="0", mkstream=True)

    def fill(self, stream: str, values: list[bytes], tasks: int) -> None:
        self._peer.produce(stream, values, tasks)
        length = int(self._r.xlen(stream))
        if length != tasks:
            raise RuntimeError(f"redis fill: {length:,} entries, expected {tasks:,}")

    def sender(self, stream: str) -> tuple[Callable[[bytes], None], Callable[[], None]]:
        r = self._r

        def send(value: bytes) -> None:
            r.xadd(stream, {REDIS_FIELD: value})

        return send, lambda: None

    def check_drained(self, stream: str, group: str) -> None:
        pending = int(self._r.xpending(stream, group)["pending"])
        if pending != 0:
            raise RuntimeError(f"redis group {group}: {pending:,} entries not acknowledged")

    def delete(self, stream: str, group: str) -> None:
        del group  # goes with the stream
        self._r.delete(stream)

    def stop(self) -> None:
        self._r.close()
        self._peer.stop()


Side = RiverlogSide | RedisSide


def redis_missing() -> str | None:
    """Why Redis cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "`redis-server` is not on PATH (apt-get install -y redis-server)"
    lacking = [m for m in ("redis", "hiredis") if importlib.util.find_spec(m) is None]
    if lacking:
        return f"Python package(s) {', '.join(lacking)} not installed (pip install -e '.[bench]')"
    return None


# ---------------------------------------------------------------------------- runs
def log(message: str) -> None:
    print(message, flush=True)


def jobs_for(
    s: Settings,
    side: Side,
    role: str,
    stream: str,
    group: str,
    workers: int,
    tasks: int,
    warmup: int,
) -> list[Job]:
    return [
        Job(
            system=side.name,
            role=role,
            address=side.address,
            stream=stream,
            group=group,
            name=f"w{i}",
            tasks=tasks,
            warmup=warmup,
            max_records=s.max_records,
            poll_timeout_ms=s.poll_timeout_ms,
            gc_threshold=s.gc_threshold,
        )
        for i in range(workers)
    ]


def check_tallies(side: Side, what: str, tallies: list[Tally], tasks: int) -> None:
    got = sum(t.records for t in tallies)
    redelivered = sum(t.redelivered for t in tallies)
    failures = sum(t.ack_failures for t in tallies)
    if got != tasks or redelivered or failures:
        raise RuntimeError(
            f"{side.name} {what}: {got:,} tasks handed out of {tasks:,}, {redelivered:,} "
            f"redelivered, {failures:,} acknowledgements refused"
        )


def drain(s: Settings, side: Side, values: list[bytes], workers: int, rep: int) -> dict[str, Any]:
    """One throughput run: `workers` processes drain s.tasks tasks; tasks/s and details."""
    stream, group = f"tasks-w{workers}-r{rep}", f"g-w{workers}-r{rep}"
    side.create(stream, group)
    jobs = jobs_for(s, side, "drain", stream, group, workers, s.tasks, 0)
    with worker_set(jobs) as ws:
        ws.expect("ready", WORKER_READY_S)
        side.fill(stream, values, s.tasks)
        gc.collect()
        go_ns = time.monotonic_ns()
        ws.go.set()
        tallies: list[Tally] = ws.expect("done", PHASE_SECONDS_MAX)
    check_tallies(side, f"{workers} workers", tallies, s.tasks)
    side.check_drained(stream, group)
    side.delete(stream, group)
    seconds = (max(t.last_ack_ns for t in tallies) - go_ns) / 1e9
    run = {
        "records_per_s": s.tasks / seconds,
        "seconds": seconds,
        "per_worker": [t.records for t in tallies],
        "polls": sum(t.polls for t in tallies),
        "empty_polls": sum(t.empty_polls for t in tallies),
        "empty_poll_s": sum(t.empty_poll_s for t in tallies),
    }
    log(
        f"  {LABELS[side.name]:14s} {workers} worker(s) rep {rep}: {run['records_per_s']:>10,.0f}"
        f" tasks/s  {seconds:6.3f} s  per worker {run['per_worker']}  polls {run['polls']:,}"
        f" (empty {run['empty_polls']:,}, {run['empty_poll_s']:.2f} s waiting in them)"
    )
    return run


def latency(s: Settings, side: Side) -> dict[str, Any]:
    """Tasks at s.latency_rate_per_s into a live group of s.latency_workers workers."""
    plan = LatencyPlan(
        records=round(s.latency_seconds * s.latency_rate_per_s),
        warmup=round(s.latency_warmup_seconds * s.latency_rate_per_s),
        rate_per_s=s.latency_rate_per_s,
        value_bytes=s.value_bytes,
    )
    stream, group = "latency", "g-latency"
    side.create(stream, group)
    jobs = jobs_for(s, side, "latency", stream, group, s.latency_workers, plan.total, plan.warmup)
    send, close = side.sender(stream)
    try:
        with worker_set(jobs) as ws:
            ws.expect("ready", WORKER_READY_S)
            ws.go.set()
            sent = send_paced(plan, send, time.monotonic() + PHASE_SECONDS_MAX)
            tallies: list[Tally] = ws.expect("done", PHASE_SECONDS_MAX)
    finally:
        close()
    if sent != plan.total:
        raise RuntimeError(f"{side.name} latency: sent {sent:,} of {plan.total:,}")
    check_tallies(side, "latency", tallies, plan.total)
    side.check_drained(stream, group)
    side.delete(stream, group)
    latencies = sorted(us for t in tallies for us in t.latencies_us)
    polls = sum(t.polls - t.empty_polls for t in tallies)
    out = {
        "p50_ms": percentile(latencies, 0.5) / 1000,
        "p99_ms": percentile(latencies, 0.99) / 1000,
        "max_ms": percentile(latencies, 1.0) / 1000,
        "measured": len(latencies),
        "per_worker": [t.records for t in tallies],
        "tasks_per_poll": plan.total / max(1, polls),
    }
    log(
        f"  {LABELS[side.name]:14s} p50 {out['p50_ms']:.3f} ms  p99 {out['p99_ms']:.3f} ms  "
        f"max {out['max_ms']:.3f} ms  ({len(latencies):,} tasks measured; per worker "
        f"{out['per_worker']}; {out['tasks_per_poll']:.1f} tasks per poll that got any)"
    )
    return out


# ---------------------------------------------------------------------------- report
def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(
    s: Settings,
    rates: dict[str, dict[int, float]],
    lat: dict[str, dict[str, Any]],
    systems: list[str],
) -> list[str]:
    lines = [
        f"throughput: {s.tasks:,} tasks of {s.value_bytes} bytes, max_records / COUNT "
        f"{s.max_records}, median of {s.repetitions} run(s), tasks/s",
        "",
        "| workers | riverlog | Redis Streams | riverlog / Redis |",
        "|---|---|---|---|",
    ]
    for w in s.workers:
        mine, theirs = rates["riverlog"].get(w), rates.get("redis", {}).get(w)
        ratio = None if mine is None or not theirs else mine / theirs
        redis_cell = "SKIPPED" if "redis" not in systems else fmt(theirs, ",.0f")
        ratio_cell = "-" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"| {w} | {fmt(mine, ',.0f')} | {redis_cell} | {ratio_cell} |")
    lines += [
        "",
        f"task latency (ack time - produce time), {s.latency_rate_per_s:,} tasks/s for "
        f"{s.latency_seconds:g} s into {s.latency_workers} workers, ms",
        "",
        "| system | p50 | p99 | max |",
        "|---|---|---|---|",
    ]
    for system in systems:
        got = lat.get(system, {})
        lines.append(
            f"| {LABELS[system]} | {fmt(got.get('p50_ms'), '.2f')} | "
            f"{fmt(got.get('p99_ms'), '.2f')} | {fmt(got.get('max_ms'), '.2f')} |"
        )
    return lines


def summary(
    s: Settings,
    rates: dict[str, dict[int, float]],
    lat: dict[str, dict[str, Any]],
    skipped: str | None,
    loads: list[float | None],
    seconds: float,
) -> dict[str, Any]:
    throughput: dict[str, dict[str, float | None]] = {}
    for w in s.workers:
        mine, theirs = rates["riverlog"].get(w), rates.get("redis", {}).get(w)
        throughput[str(w)] = {
            "riverlog_records_per_s": None if mine is None else round(mine),
            "redis_records_per_s": None if theirs is None else round(theirs),
            "ratio": None if mine is None or not theirs else round(mine / theirs, 3),
        }
    latency_ms = {
        system: {k: round(got[k], 3) for k in ("p50_ms", "p99_ms", "max_ms")}
        for system, got in lat.items()
    }
    return {
        "throughput": throughput,
        "latency_ms": latency_ms,
        "tasks": s.tasks,
        "max_records": s.max_records,
        "quick": s.quick,
        "redis_skipped": skipped,
        "seconds": round(seconds),
        "load_average_1m": loads,
    }


# ---------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="20,000 tasks, 2 s of latency")
    parser.add_argument("--tasks", type=int, help="tasks per throughput run")
    parser.add_argument("--max-records", type=int, help=f"per fetch / COUNT ({MAX_RECORDS})")
    parser.add_argument("--repetitions", type=int, help="throughput runs per figure")
    parser.add_argument(
        "--latency-rate", type=int, help=f"tasks/s of the latency run ({LATENCY_RATE_PER_S:,})"
    )
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    if args.tasks is not None:
        s = replace(s, tasks=max(1, min(args.tasks, TASKS_MAX)))
    if args.max_records is not None:
        s = replace(s, max_records=max(1, min(args.max_records, MAX_RECORDS_LIMIT)))
    if args.repetitions is not None:
        s = replace(s, repetitions=max(1, min(args.repetitions, REPETITIONS_MAX)))
    if args.latency_rate is not None:
        s = replace(s, latency_rate_per_s=max(1, min(args.latency_rate, LATENCY_RATE_MAX)))

    gc.set_threshold(*s.gc_threshold)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops servers
    skipped = redis_missing()
    systems = ["riverlog"] if skipped else ["riverlog", "redis"]
    versions = grpc_versions()
    if not skipped:
        versions["redis-py"] = importlib.import_module("redis").__version__
    log("# share groups vs Redis Streams consumer groups" + (" (quick)" if s.quick else ""))
    log("settings:")
    print_fields(machine(versions), LABEL_WIDTH)
    print_fields(asdict(s), LABEL_WIDTH)
    load_start = print_load_average_at_start(LABEL_WIDTH)
    print_estimates(ESTIMATES, FIGURE_NAME_WIDTH, FIGURE_VALUE_WIDTH)
    if skipped:
        log(f"SKIPPED Redis Streams: {skipped}; riverlog runs alone")
    sys.stdout.flush()

    work = tempfile.mkdtemp(prefix="share-bench-")
    sides: list[Side] = []
    rates: dict[str, dict[int, float]] = {system: {} for system in systems}
    lat: dict[str, dict[str, Any]] = {}
    began = time.monotonic()
    try:
        sides.append(RiverlogSide(work))
        if not skipped:
            sides.append(RedisSide(work))
        for side in sides:
            log(f"  {LABELS[side.name]:14s} {side.describe(s.max_records)}")
        values = make_values(s.value_bytes, SEED)
        log(f"throughput, {s.tasks:,} tasks:")
        samples: dict[str, dict[int, list[float]]] = {x: {} for x in systems}
        for w in s.workers:
            for rep in range(s.repetitions):
                for side in sides:  # the systems take turns: a change of load reaches both
                    run = drain(s, side, values, w, rep)
                    samples[side.name].setdefault(w, []).append(run["records_per_s"])
            for system in systems:
                rates[system][w] = statistics.median(samples[system][w])
        log(
            f"latency, {s.latency_rate_per_s:,} tasks/s for {s.latency_seconds:g} s after "
            f"{s.latency_warmup_seconds:g} s of warm-up, {s.latency_workers} workers:"
        )
        for side in sides:
            lat[side.name] = latency(s, side)
    finally:
        for side in reversed(sides):
            try:
                side.stop()
            except Exception as e:  # the others must still be stopped
                log(f"stopping {side.name} failed: {e!r}")
        shutil.rmtree(work, ignore_errors=True)
    load_end = load_average()
    seconds = time.monotonic() - began
    log("")
    for line in table(s, rates, lat, systems):
        log(line)
    log("")
    log(f"load average (1 min): {load_start} at start, {load_end} at end; {seconds:.0f} s")
    print(json.dumps(summary(s, rates, lat, skipped, [load_start, load_end], seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
