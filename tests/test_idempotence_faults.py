"""Exactly-once produce under faults: a proxy that loses requests and answers, and a broker
killed with SIGKILL in the middle of a run.

100,000 records go through DropProxy (tests/drop_proxy.py) into three partitions; the
producer retries what it lost, and every partition must then hold exactly its records, in
send order: no duplicate, no gap. The counts of what was dropped and of the duplicates the
broker recognised are printed (run with -s to see them).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from drop_proxy import DropProxy
from test_process import START_TIMEOUT_S, BrokerProcess, _free_port

from storage import LogConfig, decode_records
from stream import Producer, RecordMetadata
from stream._broker import BrokerConfig
from stream._pb import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc
from stream._serve import RunningBroker, ServeConfig

pytestmark = pytest.mark.slow

RECORDS = 100_000
PARTITIONS = 3
PAD = b"x" * 92  # 100-byte values
RPC_TIMEOUT_S = 10.0
FLUSH_TIMEOUT_S = 180.0


def _value(i: int) -> bytes:
    return b"%08d" % i + PAD


def _send_all(producer: Producer, topic: str) -> list[Future[RecordMetadata]]:
    return [producer.send(topic, _value(i), partition=i % PARTITIONS) for i in range(RECORDS)]


def _producer(address: str) -> Producer:
    """Lossy-network settings: a lost answer is noticed after request_timeout_ms at worst."""
    return Producer(
        address,
        linger_ms=2,
        # Small batches and a small buffer: many requests (about 1,400), so many get lost.
        batch_bytes=8 * 1024,
        buffer_bytes_max=128 * 1024,
        retries=100,
        retry_backoff_ms=10,
        request_timeout_ms=300,
    )


def _check_partitions(address: str, topic: str) -> None:
    """Every partition holds exactly its records, in send order."""
    with grpc.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 65 * 1024 * 1024)]
    ) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        for partition in range(PARTITIONS):
            values: list[bytes | None] = []
            offset = 0
            for _ in range(RECORDS):
                request = broker_pb2.FetchPartition(topic=topic, partition=partition, offset=offset)
                (result,) = stub.Fetch(
                    broker_pb2.FetchRequest(partitions=[request], max_bytes=8 * 1024 * 1024),
                    timeout=RPC_TIMEOUT_S,
                ).results
                records = [r for r in decode_records(result.record_batches) if r.offset >= offset]
                if not records:
                    break
                values.extend(r.value for r in records)
                offset = records[-1].offset + 1
            expected = [_value(i) for i in range(partition, RECORDS, PARTITIONS)]
            assert len(values) == len(expected), (partition, len(values), len(expected))
            assert values == expected, f"partition {partition}: records out of order"


def _create_topic(address: str, topic: str) -> None:
    with grpc.insecure_channel(address) as channel:
        admin_pb2_grpc.AdminStub(channel).CreateTopic(
            admin_pb2.CreateTopicRequest(name=topic, partitions=PARTITIONS), timeout=RPC_TIMEOUT_S
        )


@contextmanager
def _proxy(upstream: str, *, drop_requests: float, drop_answers: float) -> Iterator[DropProxy]:
    proxy = DropProxy(upstream, drop_requests=drop_requests, drop_answers=drop_answers)
    try:
        yield proxy
    finally:
        proxy.close()


def test_lossy_network_gives_exactly_once_in_order(tmp_path: Path) -> None:
    config = ServeConfig(
        broker=BrokerConfig(data_dir=tmp_path / "data", log=LogConfig(segment_bytes=1 << 20)),
        listen="127.0.0.1:0",
        shutdown_grace_s=1.0,
    )
    running = RunningBroker(config)
    running.start()
    try:
        _create_topic(running.address, "events")
        with _proxy(running.address, drop_requests=0.03, drop_answers=0.05) as proxy:
            started = time.monotonic()
            with _producer(proxy.address) as producer:
                futures = _send_all(producer, "events")
                producer.flush(FLUSH_TIMEOUT_S)
            elapsed = time.monotonic() - started
            failed = [f.exception() for f in futures if f.exception() is not None]
            assert not failed, failed[0]
            counts = proxy.counts
        _check_partitions(running.address, "events")
    finally:
        running.stop()
    print(
        f"\ndrop proxy: {RECORDS} records in {elapsed:.1f} s; {counts.requests} requests "
        f"({counts.requests_dropped} dropped), {counts.answers} answers "
        f"({counts.answers_dropped} dropped), {counts.duplicates_answered} duplicates "
        f"answered, {counts.streams} streams"
    )
    assert counts.requests_dropped > 0
    assert counts.answers_dropped > 0
    assert counts.duplicates_answered > 0  # retries of appended batches were recognised


def test_broker_killed_mid_run_gives_exactly_once_in_order(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = _free_port()
    brokers: list[BrokerProcess] = []

    def start() -> BrokerProcess:
        broker = BrokerProcess(data_dir, port)
        brokers.append(broker)
        if broker.wait_for_line("listening on", START_TIMEOUT_S) is None:
            pytest.fail(f"broker did not start:\n{broker.stderr_text()}")
        return broker

    try:
        first = start()
        _create_topic(first.address, "events")
        with _proxy(first.address, drop_requests=0.02, drop_answers=0.02) as proxy:
            with _producer(proxy.address) as producer:
                futures = _send_all(producer, "events")
                # Kill once a third is acknowledged: batches are in flight, some appended but
                # unanswered, and the restarted broker must recognise them from its log.
                deadline = time.monotonic() + 60
                while not futures[RECORDS // 3].done() and time.monotonic() < deadline:
                    time.sleep(0.01)
                first.kill()
                start()
                producer.flush(FLUSH_TIMEOUT_S)
            failed = [f.exception() for f in futures if f.exception() is not None]
            assert not failed, failed[0]
            counts = proxy.counts
        second = brokers[-1]
        # It was killed: the restart scanned the log (and rebuilt the producer state).
        assert second.wait_for_line("recovered", 1.0) is not None
        _check_partitions(second.address, "events")
    finally:
        for broker in brokers:
            broker.kill()
    print(
        f"\nkill -9 run: {counts.requests_dropped} requests and {counts.answers_dropped} "
        f"answers dropped, {counts.duplicates_answered} duplicates answered, "
        f"{counts.streams} streams"
    )
