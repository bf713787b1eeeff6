"""The broker as a real separate process: `python -m stream.cli serve` on a loopback port.

What only a process shows: the start-up log line, SIGTERM (clean shutdown, no recovery scan
on the next start, in-flight long polls and streams released within the grace period),
`kill -9` (nothing acknowledged is lost), the broker's resident memory under a stalled
subscriber, and a bad request over a real socket. Every child is killed in a `finally`;
every wait is bounded in iterations and in time.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from storage import NewRecord, decode_records, encode_batch
from stream._pb import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
KiB = 1024
MiB = 1024 * KiB
# Start-up: the interpreter imports grpc and numpy, opens the logs, binds the port.
START_TIMEOUT_S = 15.0
READY_TIMEOUT_S = 10.0
# Free ports are picked by binding port 0 and closing it; another process may take the port
# before the broker binds it, so a start that fails to listen is retried on a new port.
START_ATTEMPTS_MAX = 5
# stream/_serve.py SHUTDOWN_GRACE_S_DEFAULT, plus the signal loop's 1 s tick and interpreter
# exit: a SIGTERMed broker is gone within this.
SHUTDOWN_GRACE_S = 5.0
EXIT_TIMEOUT_S = SHUTDOWN_GRACE_S + 5.0
# Each RPC gets a deadline, so no client call can hang the test.
RPC_TIMEOUT_S = 10.0
# Polling step of the bounded waits below.
POLL_S = 0.05
CLIENT_OPTIONS = [("grpc.max_receive_message_length", 65 * MiB)]
RECOVERED_LINE = "INFO riverlog.storage: recovered "


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class BrokerProcess:
    """One `riverlog serve` child; its stderr is drained by a thread into `lines`."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.address = f"127.0.0.1:{port}"
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stream.cli",
                "serve",
                "--data-dir",
                str(data_dir),
                "--listen",
                self.address,
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._drain, name="broker-stderr", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        try:
            for raw in self.proc.stderr:  # ends at EOF, when the child exits
                with self._cond:
                    self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def wait_for_line(self, needle: str, timeout_s: float) -> str | None:
        """The first stderr line containing `needle`; None at EOF or after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            for _ in range(int(timeout_s / POLL_S) + 2):
                for line in self.lines:
                    if needle in line:
                        return line
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return None
                self._cond.wait(min(remaining, POLL_S))
        return None

    def stderr_text(self) -> str:
        self._reader.join(timeout=5)  # after exit: everything the child wrote
        with self._cond:
            return "\n".join(self.lines)

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=EXIT_TIMEOUT_S)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self._reader.join(timeout=5)
            self.proc.stderr.close()

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
        assert match is not None, status
        return int(match.group(1)) * KiB


@contextmanager
def running_broker(data_dir: Path) -> Iterator[BrokerProcess]:
    """A started, ready broker on a free loopback port; killed on exit whatever happened."""
    broker: BrokerProcess | None = None
    try:
        for _ in range(START_ATTEMPTS_MAX):
            broker = BrokerProcess(data_dir, _free_port())
            if broker.wait_for_line("listening on", START_TIMEOUT_S) is not None:
                break
            text = broker.stderr_text() if broker.proc.poll() is not None else ""
            broker.kill()
            if "cannot listen" not in text:
                pytest.fail(f"broker did not start:\n{text}")
        else:
            pytest.fail(f"no free port after {START_ATTEMPTS_MAX} attempts")
        with grpc.insecure_channel(broker.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT_S)
        yield broker
    finally:
        if broker is not None:
            broker.kill()


@contextmanager
def stubs(
    broker: BrokerProcess,
) -> Iterator[tuple[broker_pb2_grpc.BrokerStub, admin_pb2_grpc.AdminStub]]:
    with grpc.insecure_channel(broker.address, options=CLIENT_OPTIONS) as channel:
        yield broker_pb2_grpc.BrokerStub(channel), admin_pb2_grpc.AdminStub(channel)


def _create_topic(
    admin: admin_pb2_grpc.AdminStub, name: str, partitions: int = 1
) -> admin_pb2.TopicDescription:
    request = admin_pb2.CreateTopicRequest(name=name, partitions=partitions)
    return admin.CreateTopic(request, timeout=RPC_TIMEOUT_S)


def _produce(
    stub: broker_pb2_grpc.BrokerStub,
    topic: str,
    partition: int,
    values: list[bytes],
    acks: broker_pb2.Acks.ValueType = broker_pb2.ACKS_LEADER,
) -> int:
    """One batch of `values`; its base offset."""
    batch = encode_batch([NewRecord(None, v, 1_700_000_000_000) for v in values])
    request = broker_pb2.ProduceRequest(
        acks=acks,
        partitions=[
            broker_pb2.PartitionProduce(topic=topic, partition=partition, record_batch=batch)
        ],
    )
    response = stub.Produce(request, timeout=RPC_TIMEOUT_S)
    (result,) = response.results
    assert result.error.code == 0, result.error.message
    return result.base_offset


def _fetch_all(
    stub: broker_pb2_grpc.BrokerStub, topic: str, partition: int, start: int, end: int
) -> dict[int, bytes | None]:
    """Every record in [start, end) of one partition, by offset."""
    out: dict[int, bytes | None] = {}
    offset = start
    for _ in range(end - start + 1):
        if offset >= end:
            break
        request = broker_pb2.FetchRequest(
            partitions=[broker_pb2.FetchPartition(topic=topic, partition=partition, offset=offset)],
            max_bytes=8 * MiB,
        )
        (result,) = stub.Fetch(request, timeout=RPC_TIMEOUT_S).results
        assert result.error.code == 0, result.error.message
        records = [r for r in decode_records(result.record_batches) if r.offset >= offset]
        assert records, f"no progress at offset {offset} of [{start}, {end})"
        out.update((r.offset, r.value) for r in records)
        offset = records[-1].offset + 1
    assert offset == end
    return out


def _offsets(admin: admin_pb2_grpc.AdminStub, topic: str) -> list[tuple[int, int]]:
    description = admin.DescribeTopic(
        admin_pb2.DescribeTopicRequest(name=topic), timeout=RPC_TIMEOUT_S
    )
    return [(p.log_start_offset, p.log_end_offset) for p in description.partitions]


# ---------------------------------------------------------------------------- tests
def test_serve_logs_one_line_per_listener(tmp_path: Path) -> None:
    with running_broker(tmp_path) as broker:
        line = broker.wait_for_line("listening on", 1.0)
        assert line is not None
        assert f"listening on {broker.address} " in line
        assert "riverlog.v1.Broker" in line
        assert str(tmp_path) in line
        code, _ = broker.terminate()
        assert code == 0
        listening = [x for x in broker.stderr_text().splitlines() if "listening on" in x]
        assert listening == [line]


def test_sigterm_then_restart_keeps_everything_without_recovery(tmp_path: Path) -> None:
    partitions, batches = 2, 40
    sent: dict[int, dict[int, bytes]] = {0: {}, 1: {}}
    with running_broker(tmp_path) as broker, stubs(broker) as (stub, admin):
        _create_topic(admin, "orders", partitions)
        for i in range(batches):
            p = i % partitions
            values = [f"order {i}.{j}".encode() for j in range(5)]
            base = _produce(stub, "orders", p, values)
            sent[p].update((base + j, v) for j, v in enumerate(values))
        before = _offsets(admin, "orders")
        # Records stamped in the past (2023) append to the one segment; they roll no new one.
        segments = admin.DescribeTopic(
            admin_pb2.DescribeTopicRequest(name="orders"), timeout=RPC_TIMEOUT_S
        ).partitions
        assert [p.segment_count for p in segments] == [1] * partitions
        code, elapsed_s = broker.terminate()
        assert code == 0, broker.stderr_text()
        assert elapsed_s < EXIT_TIMEOUT_S
        assert "broker closed cleanly" in broker.stderr_text()
    assert before == [(0, len(sent[p])) for p in range(partitions)]
    for p in range(partitions):
        assert (tmp_path / f"orders-{p}" / ".clean-shutdown").exists()

    with running_broker(tmp_path) as broker, stubs(broker) as (stub, admin):
        assert _offsets(admin, "orders") == before
        for p in range(partitions):
            assert _fetch_all(stub, "orders", p, 0, before[p][1]) == sent[p]
        code, _ = broker.terminate()
        assert code == 0
        stderr = broker.stderr_text()
    assert RECOVERED_LINE not in stderr, stderr


def test_sigterm_releases_long_poll_fetch_and_subscribe(tmp_path: Path) -> None:
    with running_broker(tmp_path) as broker, stubs(broker) as (stub, admin):
        _create_topic(admin, "idle")
        _produce(stub, "idle", 0, [b"only"])
        subscription = stub.Subscribe(
            broker_pb2.SubscribeRequest(
                topic="idle",
                start=broker_pb2.StartPosition(earliest=broker_pb2.StartPosition.Earliest()),
            ),
            timeout=30,
        )
        first = next(subscription)
        assert first.next_offset == 1
        outcome: list[grpc.StatusCode] = []

        def drain() -> None:
            try:
                for _ in subscription:
                    pass
                outcome.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                outcome.append(e.code())

        reader = threading.Thread(target=drain, name="subscribe-drain", daemon=True)
        reader.start()
        fetch = stub.Fetch.future(
            broker_pb2.FetchRequest(
                partitions=[broker_pb2.FetchPartition(topic="idle", partition=0, offset=1)],
                max_wait_ms=20_000,
            ),
            timeout=30,
        )
        time.sleep(0.5)  # let the fetch reach the broker and start waiting
        assert not fetch.done()

        code, elapsed_s = broker.terminate()
        assert code == 0, broker.stderr_text()
        assert elapsed_s < EXIT_TIMEOUT_S

        fetch_status = grpc.StatusCode.OK
        try:
            response = fetch.result(timeout=5)
        except grpc.RpcError as e:
            fetch_status = e.code()
        else:
            assert response.results[0].record_batches == b""
        assert fetch_status in {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        reader.join(timeout=5)
        assert not reader.is_alive(), "the subscribe stream did not end"
        assert outcome[0] in {
            grpc.StatusCode.OK,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
        }
    assert (tmp_path / "idle-0" / ".clean-shutdown").exists()


@pytest.mark.parametrize("acks", [broker_pb2.ACKS_ALL, broker_pb2.ACKS_LEADER])
def test_kill_9_loses_nothing_acknowledged(tmp_path: Path, acks: broker_pb2.Acks.ValueType) -> None:
    acks_before_kill, produce_max = 200, 20_000
    acked: list[tuple[int, bytes]] = []
    with running_broker(tmp_path) as broker, stubs(broker) as (stub, admin):
        # Default config: fsync never. ACKS_ALL must fsync regardless.
        description = _create_topic(admin, "events")
        assert "fsync" not in description.config

        def produce_until_error() -> None:
            for i in range(produce_max):
                value = f"event {i}".encode()
                try:
                    base = _produce(stub, "events", 0, [value], acks)
                except grpc.RpcError:
                    return  # the broker is gone
                acked.append((base, value))

        producer = threading.Thread(target=produce_until_error, name="producer", daemon=True)
        producer.start()
        try:
            deadline = time.monotonic() + 30
            for _ in range(int(30 / POLL_S)):
                if len(acked) >= acks_before_kill or time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
            assert len(acked) >= acks_before_kill
            broker.proc.send_signal(signal.SIGKILL)  # mid-stream: the producer is still going
            assert broker.proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            broker.kill()
            producer.join(timeout=RPC_TIMEOUT_S + 5)
        assert not producer.is_alive()
    assert len(acked) < produce_max, "the kill came after the producer had finished"
    assert not (tmp_path / "events-0" / ".clean-shutdown").exists()

    with running_broker(tmp_path) as broker, stubs(broker) as (stub, admin):
        ((start, end),) = _offsets(admin, "events")
        assert start == 0
        assert end >= acked[-1][0] + 1
        stored = _fetch_all(stub, "events", 0, 0, end)
        for offset, value in acked:
            assert stored.get(offset) == value, f"acknowledged offset {offset} lost"
        broker.terminate()
        stderr = broker.stderr_text()
    assert RECOVERED_LINE in stderr, stderr  # the unclean stop was noticed and scanned


def test_stalled_subscriber_keeps_broker_memory_bounded(tmp_path: Path) -> None:
    backlog_batches, growth_max = 64, 24 * MiB
    value = os.urandom(MiB - 256)  # one batch just under batch_bytes_max (1 MiB)
    batch_bytes = len(encode_batch([NewRecord(None, value, 0)]))
    assert batch_bytes <= MiB
    with running_broker(tmp_path) as broker, stubs(broker) as (stub, admin):
        _create_topic(admin, "big")
        for _ in range(backlog_batches):
            _produce(stub, "big", 0, [value])
        code, _ = broker.terminate()
        assert code == 0
    # A fresh process for the baseline: the freed produce buffers that malloc keeps would
    # otherwise absorb read-ahead and hide it.
    with running_broker(tmp_path) as broker, stubs(broker) as (stub, admin):
        rss_before = broker.rss_bytes()

        subscription = stub.Subscribe(
            broker_pb2.SubscribeRequest(
                topic="big",
                start=broker_pb2.StartPosition(earliest=broker_pb2.StartPosition.Earliest()),
                max_bytes=MiB,
            ),
            timeout=60,
        )
        try:
            first = next(subscription)
            assert first.next_offset == 1
            rss_peak = rss_before
            for _ in range(int(2.0 / 0.1)):  # stall ~2 s, sampling the broker's memory
                time.sleep(0.1)
                rss_peak = max(rss_peak, broker.rss_bytes())
            growth = rss_peak - rss_before
            print(
                f"broker VmRSS before {rss_before / MiB:.1f} MiB, peak while stalled "
                f"{rss_peak / MiB:.1f} MiB, growth {growth / MiB:.1f} MiB; backlog "
                f"{backlog_batches * batch_bytes / MiB:.1f} MiB"
            )
            assert growth < growth_max, f"broker grew {growth / MiB:.1f} MiB behind a stall"

            # The stream still works after the stall.
            for expected_next in range(2, 6):
                message = next(subscription)
                assert message.next_offset == expected_next
                (record,) = decode_records(message.record_batches)
                assert record.value == value
        finally:
            subscription.cancel()
        code, _ = broker.terminate()
        assert code == 0


def test_garbage_request_gets_invalid_argument_and_broker_keeps_serving(tmp_path: Path) -> None:
    with running_broker(tmp_path) as broker, stubs(broker) as (stub, admin):
        _create_topic(admin, "t")
        with grpc.insecure_channel(broker.address) as channel:
            raw_produce: grpc.UnaryUnaryMultiCallable[Any, Any] = channel.unary_unary(
                "/riverlog.v1.Broker/Produce"
            )
            with pytest.raises(grpc.RpcError) as excinfo:
                raw_produce(b"\xff\xff\xff\xff garbage", timeout=RPC_TIMEOUT_S)
            error: Any = excinfo.value
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "undecodable ProduceRequest" in error.details()
        assert _produce(stub, "t", 0, [b"after garbage"]) == 0
        assert _fetch_all(stub, "t", 0, 0, 1) == {0: b"after garbage"}
        assert broker.proc.poll() is None
