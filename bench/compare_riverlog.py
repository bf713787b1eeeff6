"""riverlog's side of bench/compare.py: its broker as a child process (bench/_common.py's
broker_command: default settings, fsync "never", acks "leader"), and every workload with
the public client, stream.Producer and stream.Consumer, at their defaults but where a
setting is named here.

- produce: Producer.send of each record (keyless: the sticky partitioner fills one
  partition's batch at a time), then flush.
- consume from the beginning: a Consumer of the topic without a group,
  auto_offset_reset "earliest", poll until every record was returned.
- group consume: a Consumer in a group, auto-commit off, commit() after every poll (poll
  returns what is buffered: up to fetch_max_bytes, 4 MiB, at a time), so every record is
  committed durably (the broker fsyncs commits) before the next poll.
- latency: Producer with linger_ms=0 (the setting a user picks for latency: the default
  waits up to 5 ms for a batch to fill), one record per send; a Consumer (no group, default
  long-poll: the broker answers a waiting fetch as soon as a record is appended) polls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from _common import Child, broker_command, grpc_versions, start_child, stop_child
from compare_common import LatencyLog, LatencyPlan, send_paced

from stream import Admin, Consumer, Producer

# Partitions of every topic: the 4 consumer processes of the largest group each get one.
PARTITIONS = 4
# How long one poll waits when nothing is buffered.
POLL_TIMEOUT_MS = 200
# Polls of a worker waiting for its balanced assignment (bounded by its deadline too).
JOIN_POLL_MS = 50
# Latency: the producer sends each record at once (the default linger is 5 ms).
LATENCY_LINGER_MS = 0


class Riverlog:
    name = "riverlog"
    label = "riverlog"
    fills_after_join = True

    def __init__(self) -> None:
        self._child: Child | None = None
        self._admin: Admin | None = None

    def describe(self) -> dict[str, str]:
        return {
            **grpc_versions(),
            "server": "riverlog broker (python -m stream.cli serve), default settings",
            "persistence": "segment files, fsync never (the default: page cache, as Kafka)",
            "client": f"stream.Producer / stream.Consumer (sync), {PARTITIONS} partitions",
            "latency producer": f"linger_ms={LATENCY_LINGER_MS}",
            "group": "Consumer(group=..., enable_auto_commit=False), commit() after each poll",
        }

    def start(self, work_dir: str) -> None:
        self._child = start_child("broker", broker_command(f"{work_dir}/riverlog"), work_dir)
        self._admin = Admin(self.address)

    def stop(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            admin.close()
        child, self._child = self._child, None
        if child is not None:
            stop_child(child)

    @property
    def address(self) -> str:
        assert self._child is not None, "start() first"
        return self._child.address

    @property
    def server_pid(self) -> int:
        assert self._child is not None, "start() first"
        return self._child.proc.pid

    def _admin_client(self) -> Admin:
        assert self._admin is not None, "start() first"
        return self._admin

    def create(self, stream: str) -> None:
        self._admin_client().create_topic(stream, PARTITIONS)

    def delete(self, stream: str) -> None:
        self._admin_client().delete_topic(stream)

    def group_end(self, stream: str) -> dict[str, int]:
        admin = self._admin_client()
        return {
            str(p): admin.list_offsets(stream, p, "latest").log_end_offset
            for p in range(PARTITIONS)
        }

    def length(self, stream: str) -> int:
        return sum(self.group_end(stream).values())

    def produce(
        self, stream: str, values: Sequence[bytes], records: int, spread: bool = False
    ) -> float:
        mask = len(values) - 1
        with Producer(self.address) as producer:
            send = producer.send
            started = time.perf_counter()
            if spread:  # round-robin by hand: every partition gets records / PARTITIONS
                for i in range(records):
                    send(stream, values[i & mask], partition=i % PARTITIONS)
            else:
                for i in range(records):
                    send(stream, values[i & mask])
            producer.flush()
            return time.perf_counter() - started

    def consume(self, stream: str, records: int, deadline_s: float) -> tuple[int, float]:
        seen = 0
        with Consumer(self.address, topics=[stream], auto_offset_reset="earliest") as consumer:
            started = time.perf_counter()
            while seen < records and time.monotonic() < deadline_s:
                seen += len(consumer.poll(timeout_ms=POLL_TIMEOUT_MS))
            return seen, time.perf_counter() - started

    def group_create(self, stream: str, group: str, members: int) -> None:
        """Nothing: a riverlog group forms when its members join."""

    def send_latency(self, stream: str, plan: LatencyPlan, deadline_s: float) -> int:
        with Producer(self.address, linger_ms=LATENCY_LINGER_MS) as producer:

            def send(value: bytes) -> None:
                producer.send(stream, value)

            return send_paced(plan, send, deadline_s)


class Member:
    """A Consumer in a group that commits after every poll."""

    def __init__(self, address: str, stream: str, group: str, name: str) -> None:
        del name  # riverlog names members itself (the broker's member id)
        self._consumer = Consumer(
            address,
            group=group,
            topics=[stream],
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )

    def join(self, members: int, deadline_s: float) -> None:
        """Poll until this member owns its share of a group of `members`, then pause the
        partitions, so the topic can be filled and the clock started with the group formed.
        The topic is empty meanwhile: no record is taken."""
        share = PARTITIONS // members
        consumer = self._consumer
        while time.monotonic() < deadline_s:
            if consumer.poll(timeout_ms=JOIN_POLL_MS):
                raise RuntimeError("the topic must be empty while the group forms")
            if len(consumer.assignment()) == share:
                consumer.pause(consumer.assignment())
                return
        raise RuntimeError(f"no balanced assignment ({share} partitions) before the deadline")

    def drain(self, end: Mapping[str, int], deadline_s: float) -> tuple[int, int]:
        consumer = self._consumer
        paused = consumer.paused()
        if paused:
            consumer.resume(paused)
        seen, last_ns = 0, time.monotonic_ns()
        while time.monotonic() < deadline_s:
            records = consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
            if records:
                consumer.commit()
                last_ns = time.monotonic_ns()
                seen += len(records)
            owned = consumer.assignment()
            if owned and all(
                (consumer.position(tp) or 0) >= end[str(tp.partition)] for tp in owned
            ):
                break
        return seen, last_ns

    def close(self) -> None:
        self._consumer.close()


def receive_latency(
    address: str, stream: str, plan: LatencyPlan, ready: Callable[[], None], deadline_s: float
) -> LatencyLog:
    """Read the latency records as they arrive (from the empty topic's start); call
    `ready` once the consumer is fetching."""
    log = LatencyLog(plan)
    with Consumer(address, topics=[stream], auto_offset_reset="earliest") as consumer:
        consumer.poll(timeout_ms=JOIN_POLL_MS)  # connects and starts the long-polls
        ready()
        while not log.done and time.monotonic() < deadline_s:
            records = consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
            now = time.monotonic_ns()
            for r in records:
                assert r.value is not None
                log.add(r.value, now)
    return log
