"""Slow and stalled readers beside a producer that runs flat out, against a real broker
process (`riverlog serve`, data in /dev/shm where there is room): its resident memory is
what is measured. The producer is a process of its own; the readers are other clients.

Readers, attached for the "with readers" runs only:
- a Subscribe that reads one message a second (max_bytes 1: one 1,000-record batch each);
- a Subscribe that never reads (default max_bytes, 1 MiB);
- 50 idle streams on a topic no one writes: 25 Subscribes at the log end and 25 long-poll
  Fetches (max_wait_ms 30,000), issued again whenever they return.

The memory budget asserted, from README "Limits" (subscriber read-ahead: one response per
stream; bytes per response, max_bytes, 1 MiB by default): the broker reads a subscriber's
next chunk only when gRPC has sent the last, so a stream holds at most the chunk it read
plus the message in gRPC's send path, 2 x max_bytes. An idle stream holds no data, only its
call and the worker thread it occupies: 256 KiB each. Plus 16 MiB of slack for the
allocator on a busy process. Two reading streams and 50 idle ones: 2 x 2 MiB + 50 x 256 KiB
+ 16 MiB = 32.5 MiB over the broker's VmRSS just before the readers attach, while the
stalled reader falls behind by all the producer writes (hundreds of MiB: what an unbounded
buffer would hold).

Throughput: runs without and with the readers alternate (A B B A ..., RUNS_SHORT pairs, more
with --long) after a warm-up; the ratio of the medians must be >= 0.9, and while it is not,
up to EXTENSIONS_MAX more rounds are run (a burst of other work on a shared machine can hit
one kind of run; a real cost stays). Records per broker CPU-second are reported beside it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from stream._pb import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
KiB = 1024
MiB = 1024 * KiB
# The producer: pre-encoded batches of 1,000 records of 100 bytes, pipelined on one
# ProduceStream with at most PRODUCE_WINDOW requests unanswered.
RECORDS_PER_BATCH = 1000
VALUE_BYTES = 100
PRODUCE_WINDOW = 8
RUN_S = 1.5
WARM_UP_S = 1.5
# Pairs of runs (one without readers, one with), in the order A B B A A B ... so that a
# drift of the machine's speed during the test falls on both kinds alike.
RUNS_SHORT = 6
RUNS_LONG = 20
# While the ratio is below its bound, up to this many more rounds of RUNS pairs are run.
EXTENSIONS_MAX = 2
READERS_SETTLE_S = 0.3
THROUGHPUT_RATIO_MIN = 0.9
# Readers.
IDLE_SUBSCRIBES = 25
IDLE_FETCHES = 25
SLOW_READ_EVERY_S = 1.0
MAX_BYTES_DEFAULT = 1 * MiB  # README Limits: fetch / subscribe bytes per response
READING_STREAMS = 2
IDLE_STREAM_BYTES = 256 * KiB
ALLOCATOR_SLACK_BYTES = 16 * MiB
BUDGET_BYTES = (
    READING_STREAMS * 2 * MAX_BYTES_DEFAULT
    + (IDLE_SUBSCRIBES + IDLE_FETCHES) * IDLE_STREAM_BYTES
    + ALLOCATOR_SLACK_BYTES
)
RSS_SAMPLE_S = 0.05
# The broker's settings: 64 MiB segments keep the files few; default workers (64) and
# subscribers_max (48) hold the 27 subscribes and 25 long polls with room to spare.
CONFIG_TOML = """
[log]
segment_bytes = 67108864
"""
# A run writes at most ~1 GiB (deleted after it); /dev/shm is used if it has this free.
SHM_FREE_BYTES_MIN = 4 * 1024 * MiB
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
RPC_TIMEOUT_S = 20.0


# ---------------------------------------------------------------------------- the broker
class Broker:
    """A `riverlog serve` child on a port of its choosing; stderr drained by a thread."""

    def __init__(self, data_dir: Path, config: Path) -> None:
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stream.cli",
                "serve",
                "--data-dir",
                str(data_dir),
                "--listen",
                "127.0.0.1:0",
                "--config",
                str(config),
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._drain, name="broker-stderr", daemon=True)
        self._reader.start()
        self.address = ""

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            found = re.search(r"listening on (127\.0\.0\.1:\d+) ", line)
            if found and not self.address:
                self.address = found.group(1)
                self._listening.set()

    def wait_listening(self) -> None:
        if not self._listening.wait(START_TIMEOUT_S):
            self.kill()
            pytest.fail("broker did not start:\n" + "\n".join(self.lines[-30:]))

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
        assert found is not None, status
        return int(found.group(1)) * KiB

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@contextmanager
def serving(tmp_path: Path) -> Iterator[Broker]:
    """A broker with its data in memory (/dev/shm) where there is room: the runs write
    hundreds of MiB each, and the disk's writeback would add its noise to the timings."""
    config = tmp_path / "riverlog.toml"
    config.write_text(CONFIG_TOML)
    shm = Path("/dev/shm")
    in_memory = shm.is_dir() and shutil.disk_usage(shm).free > SHM_FREE_BYTES_MIN
    data_dir = Path(tempfile.mkdtemp(dir=shm)) if in_memory else tmp_path
    broker = Broker(data_dir / "data", config)
    try:
        broker.wait_listening()
        yield broker
    finally:
        broker.kill()
        if in_memory:
            shutil.rmtree(data_dir)


class RssSampler:
    """The broker's peak VmRSS, sampled by a thread while `running` is set."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.peak = 0
        self.running = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            if self.running.is_set():
                self.peak = max(self.peak, self.broker.rss_bytes())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------- the producer
# The producer is a process of its own (as a real one would be): the readers' client side
# then takes no GIL from it. It reads "topic seconds" lines and answers each with the
# acknowledged records per second of one run: pre-encoded batches of RECORDS_PER_BATCH
# records of VALUE_BYTES, pipelined on one ProduceStream with PRODUCE_WINDOW unanswered.
PRODUCER = """
import sys, threading, time
import grpc
from storage import NewRecord, encode_batch
from stream._pb import broker_pb2, broker_pb2_grpc

address, records, value_bytes, window_size = sys.argv[1], *map(int, sys.argv[2:5])
batch = encode_batch(
    [NewRecord(None, str(i).encode().rjust(value_bytes, b"0"), 0) for i in range(records)]
)
with grpc.insecure_channel(address) as channel:
    stub = broker_pb2_grpc.BrokerStub(channel)
    print("ready", flush=True)
    for line in sys.stdin:
        topic, seconds = line.split()[0], float(line.split()[1])
        entry = broker_pb2.PartitionProduce(topic=topic, partition=0, record_batch=batch)
        request = broker_pb2.ProduceRequest(partitions=[entry])
        window = threading.Semaphore(window_size)
        started = time.monotonic()
        deadline = started + seconds

        def requests():
            while time.monotonic() < deadline and window.acquire(timeout=20):
                yield request

        acked = 0
        for answer in stub.ProduceStream(requests(), timeout=seconds + 20):
            assert answer.results[0].error.code == 0, answer.results[0].error.message
            acked += records
            window.release()
        print(acked / (time.monotonic() - started), flush=True)
"""


class Producer:
    def __init__(self, address: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                PRODUCER,
                address,
                str(RECORDS_PER_BATCH),
                str(VALUE_BYTES),
                str(PRODUCE_WINDOW),
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line, f"the producer exited ({self.proc.poll()})"
        return line

    def run(self, topic: str, seconds: float) -> float:
        """One run flat out; the acknowledged records per second."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{topic} {seconds}\n")
        self.proc.stdin.flush()
        return float(self._line())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()


# ---------------------------------------------------------------------------- the readers
@dataclass
class Readers:
    """The slow, the stalled and the idle streams of one loaded run, on a channel of their
    own (other clients than the producer). One thread: the slow reader's."""

    address: str
    topic: str
    calls: list[Any] = field(default_factory=list)
    slow_messages: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    _channel: grpc.Channel | None = None

    def start(self) -> None:
        self._channel = grpc.insecure_channel(self.address)
        stub = broker_pb2_grpc.BrokerStub(self._channel)
        earliest = broker_pb2.StartPosition(earliest=broker_pb2.StartPosition.Earliest())
        latest = broker_pb2.StartPosition(latest=broker_pb2.StartPosition.Latest())
        slow = stub.Subscribe(
            broker_pb2.SubscribeRequest(topic=self.topic, start=earliest, max_bytes=1)
        )
        stalled = stub.Subscribe(broker_pb2.SubscribeRequest(topic=self.topic, start=earliest))
        self.calls += [slow, stalled]
        self.calls += [
            stub.Subscribe(broker_pb2.SubscribeRequest(topic="idle", start=latest))
            for _ in range(IDLE_SUBSCRIBES)
        ]
        for _ in range(IDLE_FETCHES):
            self._long_poll(stub)
        self._thread = threading.Thread(target=self._read_slowly, args=(slow,), name="slow")
        self._thread.start()

    def _read_slowly(self, call: Any) -> None:
        try:
            for _message in call:
                self.slow_messages += 1
                if self._stop.wait(SLOW_READ_EVERY_S):
                    return
        except grpc.RpcError as e:
            if not self._stop.is_set():
                self.errors.append(f"slow reader: {e}")

    def _long_poll(self, stub: broker_pb2_grpc.BrokerStub) -> None:
        """A long poll at the idle topic's end, issued again whenever it returns."""
        request = broker_pb2.FetchRequest(
            partitions=[broker_pb2.FetchPartition(topic="idle", partition=0, offset=1)],
            max_wait_ms=30_000,
        )

        def again(done: Any) -> None:
            if self._stop.is_set():
                return
            if done.exception() is not None:
                self.errors.append(f"idle fetch: {done.exception()}")
                return
            self._long_poll(stub)

        with self._lock:
            if self._stop.is_set():
                return
            future = stub.Fetch.future(request, timeout=60)
            self.calls.append(future)
        future.add_done_callback(again)

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            calls = list(self.calls)
        for call in calls:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._channel is not None:
            self._channel.close()


# ---------------------------------------------------------------------------- the test
@dataclass
class Tally:
    """What the runs measured."""

    rates: dict[str, list[float]] = field(default_factory=lambda: {"alone": [], "with readers": []})
    # Acknowledged records per second of broker CPU (user + system), per run kind.
    per_cpu: dict[str, list[float]] = field(
        default_factory=lambda: {"alone": [], "with readers": []}
    )
    # The most a loaded run's peak VmRSS rose over the VmRSS just before its readers
    # attached. Measured per run: glibc keeps freed memory (the broker raises its trim
    # threshold), so the process's high-water mark also drifts up from run to run.
    growth: int = 0
    rss_first: int = 0
    rss_last: int = 0
    backlog_bytes: int = 0
    slow_messages: int = 0
    runs: int = 0

    def ratio(self, of: dict[str, list[float]]) -> float:
        return statistics.median(of["with readers"]) / statistics.median(of["alone"])


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _one_run(
    broker: Broker,
    channel: grpc.Channel,
    producer: Producer,
    sampler: RssSampler,
    kind: str,
    tally: Tally,
) -> None:
    admin = admin_pb2_grpc.AdminStub(channel)
    topic = f"hot-{tally.runs}"
    tally.runs += 1
    admin.CreateTopic(admin_pb2.CreateTopicRequest(name=topic, partitions=1), timeout=RPC_TIMEOUT_S)
    readers = Readers(broker.address, topic) if kind == "with readers" else None
    rss_before = broker.rss_bytes()
    tally.rss_first = tally.rss_first or rss_before
    if readers is not None:
        readers.start()
        time.sleep(READERS_SETTLE_S)  # every stream reaches the broker
    sampler.peak = 0
    sampler.running.set()
    cpu_before = _cpu_s(broker.proc.pid)
    rate = producer.run(topic, WARM_UP_S if kind == "warm-up" else RUN_S)
    cpu_s = _cpu_s(broker.proc.pid) - cpu_before
    sampler.running.clear()
    described = admin.DescribeTopic(
        admin_pb2.DescribeTopicRequest(name=topic), timeout=RPC_TIMEOUT_S
    )
    if readers is not None:
        assert readers.errors == []
        tally.slow_messages += readers.slow_messages
        tally.backlog_bytes = max(tally.backlog_bytes, described.partitions[0].size_bytes)
        readers.close()
    admin.DeleteTopic(admin_pb2.DeleteTopicRequest(name=topic), timeout=RPC_TIMEOUT_S)
    records = described.partitions[0].log_end_offset
    print(
        f"run {tally.runs} {kind}: {rate / 1e6:.2f} M records/s, "
        f"{records / max(cpu_s, 1e-3) / 1e6:.2f} M per broker CPU-second, "
        f"peak VmRSS {sampler.peak / MiB:.1f} MiB"
    )
    if readers is not None:
        tally.growth = max(tally.growth, sampler.peak - rss_before)
    tally.rss_last = broker.rss_bytes()
    if kind != "warm-up":
        tally.rates[kind].append(rate)
        tally.per_cpu[kind].append(records / max(cpu_s, 1e-3))


def test_slow_stalled_and_idle_readers_cost_no_memory_and_no_throughput(
    tmp_path: Path, long_run: bool
) -> None:
    pairs = RUNS_LONG if long_run else RUNS_SHORT
    tally = Tally()
    with serving(tmp_path) as broker, grpc.insecure_channel(broker.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=START_TIMEOUT_S)
        admin = admin_pb2_grpc.AdminStub(channel)
        admin.CreateTopic(
            admin_pb2.CreateTopicRequest(name="idle", partitions=1), timeout=RPC_TIMEOUT_S
        )
        one = broker_pb2.PartitionProduce(topic="idle", partition=0)
        one.records.add(value=b"the only record")
        broker_pb2_grpc.BrokerStub(channel).Produce(
            broker_pb2.ProduceRequest(partitions=[one]), timeout=RPC_TIMEOUT_S
        )
        sampler = RssSampler(broker)
        producer = Producer(broker.address)
        abba = ["alone", "with readers", "with readers", "alone"]
        try:
            _one_run(broker, channel, producer, sampler, "warm-up", tally)
            # More pairs only while the ratio is below the bound: on a shared machine a
            # burst of other work can fall on one kind of run; a real cost stays.
            for _ in range(1 + EXTENSIONS_MAX):
                for i in range(2 * pairs):
                    _one_run(broker, channel, producer, sampler, abba[i % 4], tally)
                if tally.ratio(tally.rates) >= THROUGHPUT_RATIO_MIN:
                    break
        finally:
            sampler.close()
            producer.close()
        assert broker.stop() == 0

    ratio = tally.ratio(tally.rates)
    alone = statistics.median(tally.rates["alone"])
    loaded = statistics.median(tally.rates["with readers"])
    print(
        f"producer, median of {len(tally.rates['alone'])} runs each: {alone / 1e6:.2f} M "
        f"records/s alone, {loaded / 1e6:.2f} M with readers, ratio {ratio:.3f} (bound "
        f"{THROUGHPUT_RATIO_MIN}); per broker CPU-second, ratio {tally.ratio(tally.per_cpu):.3f}"
    )
    print(
        f"broker VmRSS: a loaded run's peak rose at most {tally.growth / MiB:.1f} MiB over its "
        f"start (budget {BUDGET_BYTES / MiB:.1f} MiB); {tally.rss_first / MiB:.1f} MiB at the "
        f"first run, {tally.rss_last / MiB:.1f} MiB after the last; the stalled reader fell "
        f"{tally.backlog_bytes / MiB:.0f} MiB behind; the slow reader read "
        f"{tally.slow_messages} messages"
    )
    assert tally.slow_messages >= pairs * int(RUN_S / SLOW_READ_EVERY_S)  # it read, slowly
    assert tally.backlog_bytes > 4 * BUDGET_BYTES, "the stall was too short to show a bound"
    assert tally.growth <= BUDGET_BYTES
    assert ratio >= THROUGHPUT_RATIO_MIN
