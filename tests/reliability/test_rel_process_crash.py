"""Process crash: the broker killed with SIGKILL at random moments while producers write.

Four idempotent producers (stream.Producer, acks="all", retries without end) send unique
values into a topic of eight partitions with small segments (so kills land across segment
rolls and producer-state snapshots). The broker child is killed 20 times (--long: 200), each
time once a seeded random number of records was acknowledged since the last start, plus a
seeded random delay; it is restarted on the same port and data directory at once. After every
restart:

- no partition's log end offset is below an offset acknowledged before the kill;
- the records added since the last look are read back (one continuing reader, "drain").

At the end the producers flush, every partition is read again from offset 0 ("final"), and the
history checker (history.py) must find nothing: every acknowledged record present exactly once
at its acknowledged offset, offsets dense, each producer's records in send order per partition,
no value read that nobody sent, no two values at one offset, no value at two offsets (a failed
send may be present or not, never twice). The figures end in one line (run with -s).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from history import History
from rel_broker import RestartableBroker, log_ranges, read_partition

from stream import Admin, Producer, RecordMetadata

pytestmark = pytest.mark.slow

TOPIC = "crash"
PARTITIONS = 8
PRODUCERS = 4
KILLS = 20
KILLS_LONG = 200
# Small segments: about ten rolls per partition in the short run.
SEGMENT_BYTES = 128 * 1024
# Records acknowledged between a start and the next kill: seeded, uniform in this range.
ACKED_PER_KILL_MIN = 500
ACKED_PER_KILL_MAX = 4_000
# Then a seeded delay up to this, so the kill does not always follow an answer.
KILL_JITTER_S = 0.05
# 100-byte values: "<producer>-<sequence>-" and padding.
VALUE_BYTES = 100
# Records a producer has sent and not yet seen answered: bounds its buffer, so `send` never
# waits for space while the broker is down.
OUTSTANDING_MAX = 2_000
# Bounds of the waits.
ACKED_WAIT_TIMEOUT_S = 60.0
FLUSH_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = FLUSH_TIMEOUT_S + CLOSE_TIMEOUT_S + 10.0
POLL_S = 0.005


def value_of(producer: str, sequence: int) -> bytes:
    head = f"{producer}-{sequence:09d}-".encode()
    return head + b"x" * (VALUE_BYTES - len(head))


@dataclass
class ProducerThread:
    """One Producer on its own thread, sending until told to stop; every send is recorded in
    send order, with its future."""

    name: str
    address: str
    rng: random.Random
    stop: threading.Event
    sends: list[tuple[bytes, int, Future[RecordMetadata]]] = field(default_factory=list)
    # Written only by the producer's loop thread (future callbacks), read by the test.
    acked: int = 0
    max_acked: dict[int, int] = field(default_factory=dict)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._produce()
        except BaseException as e:
            self.error = e

    def _answered(self, future: Future[RecordMetadata], room: threading.Semaphore) -> None:
        room.release()
        if future.exception() is None:
            meta = future.result()
            self.acked += 1
            if meta.offset > self.max_acked.get(meta.partition, -1):
                self.max_acked[meta.partition] = meta.offset

    def _produce(self) -> None:
        room = threading.Semaphore(OUTSTANDING_MAX)
        producer = Producer(
            self.address,
            acks="all",
            linger_ms=2,
            retries=1000,  # the most allowed: a restart takes a few backoffs at most
            retry_backoff_ms=10,
            request_timeout_ms=10_000,
            send_timeout_ms=30_000,
        )
        try:
            sequence = 0
            while not self.stop.is_set():
                if not room.acquire(timeout=0.1):
                    continue
                value = value_of(self.name, sequence)
                partition = self.rng.randrange(PARTITIONS)
                future = producer.send(TOPIC, value, partition=partition)
                self.sends.append((value, partition, future))
                future.add_done_callback(lambda f: self._answered(f, room))
                sequence += 1
            producer.flush(FLUSH_TIMEOUT_S)
        finally:
            producer.close(CLOSE_TIMEOUT_S)


def test_kill_9_during_acks_all_produce_loses_and_duplicates_nothing(
    tmp_path: Path, seed: int, long_run: bool
) -> None:
    kills = KILLS_LONG if long_run else KILLS
    rng = random.Random(seed)
    broker = RestartableBroker(tmp_path / "data")
    stop = threading.Event()
    producers = [
        ProducerThread(f"p{i}", broker.address, random.Random(rng.random()), stop)
        for i in range(PRODUCERS)
    ]
    history = History()
    drained = [0] * PARTITIONS
    started = time.monotonic()

    def acked() -> int:
        return sum(p.acked for p in producers)

    def drain(reader: str, since: list[int]) -> list[int]:
        """Read every partition from `since` to its log end; the log ends."""
        ranges = log_ranges(broker.address, TOPIC)
        for partition, (_, end) in enumerate(ranges):
            for offset, value in read_partition(
                broker.address, TOPIC, partition, since[partition], end
            ):
                history.read(reader, partition, offset, value)
        return [end for _, end in ranges]

    try:
        broker.start()
        with Admin(broker.address) as admin:
            admin.create_topic(TOPIC, PARTITIONS, config={"segment_bytes": str(SEGMENT_BYTES)})
        for p in producers:
            p.start()
        for kill in range(kills):
            wanted = acked() + rng.randint(ACKED_PER_KILL_MIN, ACKED_PER_KILL_MAX)
            jitter_s = rng.uniform(0, KILL_JITTER_S)
            deadline = time.monotonic() + ACKED_WAIT_TIMEOUT_S
            while acked() < wanted:
                errors = [p.error for p in producers if p.error is not None]
                assert not errors, errors[0]
                assert time.monotonic() < deadline, (
                    f"kill {kill}: {acked()} of {wanted} records acknowledged after "
                    f"{ACKED_WAIT_TIMEOUT_S} s\n{broker.stderr_tail()}"
                )
                time.sleep(POLL_S)
            time.sleep(jitter_s)
            broker.kill()
            # Every answer now recorded came from the dead broker.
            acked_before = [
                max((p.max_acked.get(partition, -1) for p in producers), default=-1)
                for partition in range(PARTITIONS)
            ]
            broker.start()
            for partition, (start, end) in enumerate(log_ranges(broker.address, TOPIC)):
                assert start == 0, (partition, start)
                assert end > acked_before[partition], (
                    f"kill {kill}: partition {partition} ends at {end} after the restart, "
                    f"offset {acked_before[partition]} was acknowledged before the kill\n"
                    f"{broker.stderr_tail()}"
                )
                assert end >= drained[partition], (
                    f"kill {kill}: partition {partition} ends at {end}, below the "
                    f"{drained[partition]} records read before"
                )
            drained = drain("drain", drained)
        stop.set()
        for p in producers:
            assert p.thread is not None
            p.thread.join(JOIN_TIMEOUT_S)
            assert not p.thread.is_alive(), f"{p.name} did not finish"
            assert p.error is None, p.error
        ends = drain("final", [0] * PARTITIONS)
        for partition, end in enumerate(ends):
            history.log_range(partition, 0, end)
        assert broker.terminate() == 0, broker.stderr_tail()
    finally:
        stop.set()
        broker.close()

    for p in producers:
        for value, partition, future in p.sends:
            assert future.done(), f"{p.name}: a send without an outcome after flush"
            error = future.exception()
            offset = None if error is not None else future.result().offset
            history.send(value, partition, offset, producer=p.name)
    found = history.check()
    restarts = broker.start_s[1:]
    print(
        f"\nprocess crash: seed {seed}, kills {broker.kills}, acknowledged {found.acknowledged}, "
        f"failed {found.failed} ({found.failed_present} present), lost {len(found.lost)}, "
        f"duplicated {len(found.duplicates)}, restart s median "
        f"{statistics.median(restarts):.2f} max {max(restarts):.2f}, torn tails cut "
        f"{broker.recovery_cuts()}, records in the log {sum(ends)}, "
        f"{time.monotonic() - started:.0f} s"
    )
    assert found.ok, found.describe()
    assert found.unseen == []
    assert found.acknowledged + found.failed == sum(len(p.sends) for p in producers)
    assert sum(ends) == found.acknowledged + found.failed_present
