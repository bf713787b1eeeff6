"""A broker child process that a reliability test kills and restarts on one port and data
directory, and plain-gRPC reads of what the log holds (no client library between the test and
the truth).

Every start is timed from the spawn until the broker answers a call; every wait is bounded.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
from test_process import START_TIMEOUT_S, BrokerProcess, _free_port

from storage import decode_records
from stream._pb import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc

__all__ = ["RestartableBroker", "log_ranges", "read_partition"]

MiB = 1024 * 1024
RPC_TIMEOUT_S = 10.0
# Bytes of one fetch while reading a partition back.
READ_FETCH_BYTES = 8 * MiB
CLIENT_OPTIONS = [("grpc.max_receive_message_length", 65 * MiB)]
# A restart waits this long for the first answer once the broker logged that it listens.
ANSWER_TIMEOUT_S = 10.0
# What storage logs when recovery cuts a torn tail (storage/_log.py).
RECOVERY_CUT = "recovery cut "


class RestartableBroker:
    """`riverlog serve` on one loopback port and data directory, across kills and restarts."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process: BrokerProcess | None = None
        # Seconds from spawn to the first answered call, per start.
        self.start_s: list[float] = []
        self.kills = 0
        # Stderr of the incarnations that ended, for diagnostics and counting recoveries.
        self.old_lines: list[str] = []

    def start(self) -> float:
        """Spawn the broker and wait until it answers a call; the seconds that took."""
        assert self.process is None, "the broker is running"
        started = time.monotonic()
        process = BrokerProcess(self.data_dir, self.port)
        self.process = process
        if process.wait_for_line("listening on", START_TIMEOUT_S) is None:
            process.kill()
            pytest.fail(f"broker did not start on {self.address}:\n{process.stderr_text()}")
        with grpc.insecure_channel(self.address) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            admin.ListTopics(
                admin_pb2.ListTopicsRequest(), timeout=ANSWER_TIMEOUT_S, wait_for_ready=True
            )
        elapsed = time.monotonic() - started
        self.start_s.append(elapsed)
        return elapsed

    def kill(self) -> None:
        """SIGKILL the running broker and wait until it is gone."""
        process = self.process
        assert process is not None, "the broker is not running"
        assert process.proc.poll() is None, "the broker exited before the kill"
        process.proc.send_signal(signal.SIGKILL)
        code = process.proc.wait(timeout=10)
        assert code == -signal.SIGKILL, f"broker exited {code} before the kill"
        self.kills += 1
        self._retire(process)

    def terminate(self) -> int:
        """SIGTERM (clean shutdown); the exit code."""
        process = self.process
        assert process is not None
        code, _ = process.terminate()
        self._retire(process)
        return int(code)

    def close(self) -> None:
        """Kill whatever still runs (for a `finally`)."""
        if self.process is not None:
            self.process.kill()

    def _retire(self, process: BrokerProcess) -> None:
        process.kill()  # reaps it and joins its stderr reader
        self.old_lines.extend(process.lines)
        self.process = None

    def all_lines(self) -> list[str]:
        current = self.process.lines if self.process is not None else []
        return self.old_lines + current

    def recovery_cuts(self) -> int:
        """Torn tails recovery cut, over every start so far."""
        return sum(RECOVERY_CUT in line for line in self.all_lines())

    def stderr_tail(self, lines: int = 30) -> str:
        return "\n".join(self.all_lines()[-lines:])


def log_ranges(address: str, topic: str) -> list[tuple[int, int]]:
    """(log start offset, log end offset) of every partition of `topic`."""
    with grpc.insecure_channel(address) as channel:
        description = admin_pb2_grpc.AdminStub(channel).DescribeTopic(
            admin_pb2.DescribeTopicRequest(name=topic), timeout=RPC_TIMEOUT_S
        )
    return [(p.log_start_offset, p.log_end_offset) for p in description.partitions]


def read_partition(
    address: str, topic: str, partition: int, start: int, end: int
) -> list[tuple[int, bytes]]:
    """(offset, value) of every record in [start, end) of one partition, in log order (a
    record without a value reads as b"")."""
    out: list[tuple[int, bytes]] = []
    offset = start
    with grpc.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        for _ in range(end - start + 1):  # every round moves on by at least one record
            if offset >= end:
                break
            request = broker_pb2.FetchRequest(
                partitions=[
                    broker_pb2.FetchPartition(topic=topic, partition=partition, offset=offset)
                ],
                max_bytes=READ_FETCH_BYTES,
            )
            (result,) = stub.Fetch(request, timeout=RPC_TIMEOUT_S).results
            assert result.error.code == 0, (partition, offset, result.error.message)
            records = [r for r in decode_records(result.record_batches) if r.offset >= offset]
            assert records, f"{topic}-{partition}: no record at offset {offset} of [{start}, {end})"
            out.extend((r.offset, r.value or b"") for r in records if r.offset < end)
            offset = records[-1].offset + 1
    return out
