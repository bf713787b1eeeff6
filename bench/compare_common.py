"""What bench/compare.py and its worker processes share: the record values, the latency
stamp, the pacing of the latency producer, server children that do not speak gRPC, and
the shape every system's module follows.

Not a benchmark itself. Each system under test has one module, `compare_<system>.py`,
holding everything that touches that system: how its server is started and stopped, and
each workload written with that system's usual Python client. The orchestrating process
drives a `Peer`; the consumer processes (bench/compare_worker.py) build a `GroupMember`
or run `receive_latency` of the same module.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from _common import LOOPBACK, free_port

# Records per client call where a client batches by count: Redis pipelines of XADD, XREAD
# and XREADGROUP COUNT, XACK of one batch, NATS pull fetch size (the issue's "batches of
# 1000"). riverlog batches by bytes (Producer batch_bytes, Consumer fetch_max_bytes).
BATCH_RECORDS = 1000
# Distinct values cycled through by the producers: random bytes, so nothing compresses or
# deduplicates by accident, without allocating one object per record up front.
VALUE_VARIANTS = 1024
# The latency stamp at the front of every latency-run value: the sequence number and the
# send time (time.monotonic_ns: one clock for every process of the machine on Linux).
STAMP = struct.Struct(">qq")
# A server child that is not up by then has failed to start.
SERVER_START_TIMEOUT_S = 30.0
SERVER_POLL_S = 0.05
# SIGTERM, then SIGKILL after this long: a peer server gets a clean stop when it can.
SERVER_STOP_WAIT_S = 10.0
# A free port may be taken between choosing and binding it: try another, this many times.
SERVER_START_ATTEMPTS_MAX = 5
LOG_TAIL_CHARS = 2000

assert STAMP.size <= 100, "the smallest value must hold the latency stamp"


def make_values(value_bytes: int, seed: int) -> list[bytes]:
    """VALUE_VARIANTS random values of `value_bytes` each; producers cycle through them."""
    rng = random.Random(seed)
    return [rng.randbytes(value_bytes) for _ in range(VALUE_VARIANTS)]


def stamp(seq: int, value_bytes: int) -> bytes:
    """A latency-run value: the sequence number and the send time, padded to value_bytes."""
    head = STAMP.pack(seq, time.monotonic_ns())
    return head + b"\0" * (value_bytes - len(head))


def read_stamp(value: bytes) -> tuple[int, int]:
    """(sequence number, send time in monotonic ns) of a latency-run value."""
    seq, sent_ns = STAMP.unpack_from(value)
    return seq, sent_ns


@dataclass(frozen=True, slots=True)
class LatencyPlan:
    """The latency workload: `warmup` records, then `records` measured ones, `rate_per_s`."""

    records: int
    warmup: int
    rate_per_s: int
    value_bytes: int

    @property
    def total(self) -> int:
        return self.warmup + self.records

    def due_ns(self, start_ns: int, seq: int) -> int:
        """When record `seq` is to be sent: an even schedule, never a burst to catch up
        (a late record is sent at once, the next ones keep their own times)."""
        return start_ns + seq * 1_000_000_000 // self.rate_per_s


def send_paced(plan: LatencyPlan, send: Callable[[bytes], None], deadline_s: float) -> int:
    """Call send(stamp) plan.total times on the plan's schedule; stop at `deadline_s`
    (time.monotonic). Returns how many were sent."""
    start_ns = time.monotonic_ns()
    for seq in range(plan.total):
        wait_ns = plan.due_ns(start_ns, seq) - time.monotonic_ns()
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)
        if time.monotonic() > deadline_s:
            return seq
        send(stamp(seq, plan.value_bytes))
    return plan.total


class LatencyLog:
    """What a latency consumer saw: the latency of every measured record (µs), and how many
    records arrived (warm-up included), so it knows when the plan is complete."""

    def __init__(self, plan: LatencyPlan) -> None:
        self.plan = plan
        self.seen = 0
        self.latencies_us: list[int] = []

    def add(self, value: bytes, received_ns: int) -> None:
        seq, sent_ns = read_stamp(value)
        self.seen += 1
        if seq >= self.plan.warmup:
            self.latencies_us.append((received_ns - sent_ns) // 1000)

    @property
    def done(self) -> bool:
        return self.seen >= self.plan.total


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in [0, 1])."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, min(len(sorted_values), round(q * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


# ---------------------------------------------------------------------------- peers
class Peer(Protocol):
    """One system under test, driven from the orchestrating process.

    A stream is Redis's stream key, NATS's stream (subject `<name>.v`), riverlog's topic.
    The caller checks every count: a run that lost or duplicated records fails."""

    name: str  # short: "riverlog", "redis", "nats"
    label: str  # for tables: "riverlog", "Redis Streams", "NATS JetStream"
    # The group workloads fill the stream after the members joined (riverlog: a group forms
    # on an empty topic), else before they start.
    fills_after_join: bool

    def describe(self) -> dict[str, str]:
        """Versions and the settings that matter (persistence, client options)."""
        ...

    def start(self, work_dir: str) -> None: ...

    def stop(self) -> None: ...

    @property
    def address(self) -> str: ...

    @property
    def server_pid(self) -> int:
        """The server's process id (its CPU time is read from /proc)."""
        ...

    def create(self, stream: str) -> None: ...

    def delete(self, stream: str) -> None: ...

    def length(self, stream: str) -> int:
        """Records in the stream (to check a produce)."""
        ...

    def produce(
        self, stream: str, values: Sequence[bytes], records: int, spread: bool = False
    ) -> float:
        """Append `records` records (values cycled); the seconds from the first call to the
        last acknowledgement (client set-up and tear-down are not timed). `spread`: the same
        number of records to every partition (riverlog; a stream of the others has one)."""
        ...

    def consume(self, stream: str, records: int, deadline_s: float) -> tuple[int, float]:
        """Read the stream from its beginning until `records` were read: the count read and
        the seconds from the first call to the last record."""
        ...

    def group_create(self, stream: str, group: str, members: int) -> None:
        """Whatever must exist before members of `group` start (a Redis consumer group, a
        NATS durable consumer; nothing for riverlog, whose groups form by joining)."""
        ...

    def group_end(self, stream: str) -> dict[str, int]:
        """What a member needs to know it has drained the stream, for its `drain`."""
        ...

    def send_latency(self, stream: str, plan: LatencyPlan, deadline_s: float) -> int:
        """Send the latency records on the plan's schedule; how many were sent."""
        ...


class GroupMember(Protocol):
    """One member of a consumer group, in the orchestrator or in a worker process."""

    def join(self, members: int, deadline_s: float) -> None:
        """Become a member and wait until the group of `members` is formed, taking no
        records (riverlog: joined, assignment balanced, partitions paused)."""
        ...

    def drain(self, end: Mapping[str, int], deadline_s: float) -> tuple[int, int]:
        """Read, process nothing, and commit or acknowledge in batches until the stream
        is drained; (records read, time.monotonic_ns of the last commit or ack)."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------- servers
class ServerProcess:
    """A server child that is not riverlog's (redis-server, nats-server) on a free loopback
    port: started by `start`, probed until it answers, stopped with SIGTERM (SIGKILL after
    SERVER_STOP_WAIT_S). Its output goes to a log file in the work directory."""

    def __init__(
        self,
        name: str,
        command: Callable[[int], list[str]],
        ready: Callable[[int], bool],
        log_dir: str,
    ) -> None:
        self.name = name
        self._command = command
        self._ready = ready
        self._log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = ""

    def start(self) -> None:
        for attempt in range(SERVER_START_ATTEMPTS_MAX):
            self.port = free_port()
            self.log_path = os.path.join(self._log_dir, f"{self.name}-{attempt}.log")
            with open(self.log_path, "wb") as log_file:
                self.proc = subprocess.Popen(
                    self._command(self.port),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C of the bench reaches it via stop() only
                )
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(
            f"{self.name} did not start after {SERVER_START_ATTEMPTS_MAX} attempts:\n"
            f"{self.log_tail()}"
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if port_open(self.port) and self._ready(self.port):
                return True
            time.sleep(SERVER_POLL_S)
        return False

    def log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=SERVER_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=SERVER_STOP_WAIT_S)


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on the loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(SERVER_POLL_S)
        return s.connect_ex((LOOPBACK, port)) == 0
