"""Disk full, for real: a broker whose data directory is a small tmpfs is produced to until
the file system has no space left.

What the README promises ("Statuses", RESOURCE_EXHAUSTED): a disk-full append is refused
with RESOURCE_EXHAUSTED and "no space left on device", nothing partial is appended, and the
broker keeps serving. Then: once space is freed (a topic deleted), writes resume; a stop is
clean (every log marked clean) and the restart needs no recovery and has every acknowledged
record, nothing else.

And a refused roll leaves no file open: Segment.create used to leak the new .log's
descriptor when preallocating an index failed (ENOSPC), one per refused roll, still open after
the broker stopped; it now closes what it opened and removes what it created.

Mounting needs root and CAP_SYS_ADMIN; without them the test is skipped with the reason
(in a container even root may be refused the mount: the reason is mount's own message).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from storage import LogConfig, NewRecord, check_batch, decode_records, encode_batch
from stream._broker import BrokerConfig
from stream._pb import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc
from stream._serve import RunningBroker, ServeConfig

pytestmark = pytest.mark.slow

KiB = 1024
MiB = 1024 * KiB
TMPFS_BYTES = 8 * MiB
# Per-topic log settings that fit an 8 MiB disk: every segment preallocates its two index
# files (index_bytes_max each), so the default 10 MiB would fill the disk at once.
LOG = LogConfig(
    segment_bytes=512 * KiB,
    segment_ms=None,
    retention_ms=None,
    index_bytes_max=64 * KiB,
)
# One produce: 8 records of 4 KiB, about 33 KiB on disk.
RECORDS_PER_BATCH = 8
VALUE_BYTES = 4 * KiB
# Bounds the fill loop: the disk holds far fewer batches than this.
BATCHES_MAX = 2 * TMPFS_BYTES // (RECORDS_PER_BATCH * VALUE_BYTES)
# A second topic filled first, then deleted to free the space.
BALLAST_BATCHES = 48
# Then ever smaller single-record batches, until the disk is full to its last page.
SMALLER_VALUE_BYTES = (16 * KiB, 4 * KiB, 1 * KiB, 100, 1)
# A batch that does not fit the active segment: the append must roll first.
ROLL_VALUE_BYTES = 600 * KiB
AFTER_FREE_BATCHES = 16
RPC_TIMEOUT_S = 10.0
NOW_MS = 1_700_000_000_000


def _mount_tmpfs(where: pathlib.Path) -> None:
    """Mount a TMPFS_BYTES tmpfs at `where`, or skip the test saying why not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (and CAP_SYS_ADMIN)")
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {(done.stderr or done.stdout).strip()}")


@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    mount_point = tmp_path / "small-disk"
    _mount_tmpfs(mount_point)
    try:
        yield mount_point
    finally:
        done = subprocess.run(["umount", str(mount_point)], check=False, timeout=30)
        if done.returncode != 0:  # a file still open there (see the fd test below)
            subprocess.run(["umount", "-l", str(mount_point)], check=True, timeout=30)


def _files_open_under(directory: pathlib.Path) -> list[str]:
    """Files under `directory` this process holds open (the broker runs in it)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (listdir's own descriptor, for one)
            continue
        if target.startswith(f"{directory}/"):
            found.append(target)
    return sorted(found)


def _refused(call: object) -> str:
    """The details of a RESOURCE_EXHAUSTED "no space left on device" refusal."""
    assert isinstance(call, grpc.Call)
    details = call.details() or ""
    assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "no space left on device" in details, details
    return details


def _fill_disk(stub: broker_pb2_grpc.BrokerStub, acked: dict[int, bytes | None]) -> None:
    """Produce to "events" until the disk is full to its last page; `acked` gets every
    acknowledged record. Batches of 8 x 4 KiB until one is refused, then ever smaller
    single-record ones, each size until refused (a write, a roll, an index or a checkpoint
    may be what fails at the end). Every other produce asks for an fsync (ACKS_ALL)."""
    for value_bytes in (0, *SMALLER_VALUE_BYTES):
        for i in range(BATCHES_MAX):
            if value_bytes == 0:
                values = _values(i)
            else:
                values = [f"small {value_bytes} {i} ".encode().ljust(value_bytes, b".")]
            acks = broker_pb2.ACKS_ALL if i % 2 else broker_pb2.ACKS_LEADER
            try:
                answer = stub.Produce(_request("events", values, acks), timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as e:
                details = _refused(e)
                if value_bytes == 0:
                    print(f"disk full after {i} batches of 32 KiB: {details}")
                break
            base = answer.results[0].base_offset
            acked.update((base + j, v) for j, v in enumerate(values))
        else:
            raise AssertionError(f"{BATCHES_MAX} batches of {value_bytes or 32 * KiB} bytes fit")


def _start(data_dir: pathlib.Path, started: list[RunningBroker]) -> RunningBroker:
    running = RunningBroker(
        ServeConfig(
            broker=BrokerConfig(data_dir=data_dir, log=LOG),
            listen="127.0.0.1:0",
            workers=16,
            shutdown_grace_s=1.0,
        )
    )
    started.append(running)
    running.start()
    return running


def _values(batch: int) -> list[bytes]:
    return [
        f"batch {batch} record {j} ".encode().ljust(VALUE_BYTES, b".")
        for j in range(RECORDS_PER_BATCH)
    ]


def _request(
    topic: str, values: list[bytes], acks: broker_pb2.Acks.ValueType
) -> broker_pb2.ProduceRequest:
    payload = encode_batch([NewRecord(None, v, NOW_MS) for v in values])
    return broker_pb2.ProduceRequest(
        acks=acks,
        partitions=[broker_pb2.PartitionProduce(topic=topic, partition=0, record_batch=payload)],
    )


def _fetch_all(stub: broker_pb2_grpc.BrokerStub, topic: str) -> dict[int, bytes | None]:
    out: dict[int, bytes | None] = {}
    offset = 0
    for _ in range(BATCHES_MAX * RECORDS_PER_BATCH):
        request = broker_pb2.FetchRequest(
            partitions=[broker_pb2.FetchPartition(topic=topic, partition=0, offset=offset)]
        )
        (result,) = stub.Fetch(request, timeout=RPC_TIMEOUT_S).results
        records = [r for r in decode_records(result.record_batches) if r.offset >= offset]
        if not records:
            break
        out.update((r.offset, r.value) for r in records)
        offset = records[-1].offset + 1
    return out


def _whole_batches_on_disk(partition_dir: pathlib.Path) -> int:
    """Bytes of the partition's .log files, each checked to be whole, valid batches."""
    total = 0
    for path in sorted(partition_dir.glob("*.log")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            pos += check_batch(data, pos).size  # raises on a partial or bad batch
        total += len(data)
    return total


def _offsets(admin: admin_pb2_grpc.AdminStub, topic: str) -> tuple[int, int, int]:
    (p,) = admin.DescribeTopic(
        admin_pb2.DescribeTopicRequest(name=topic), timeout=RPC_TIMEOUT_S
    ).partitions
    return p.log_start_offset, p.log_end_offset, p.size_bytes


def _serving(channel: grpc.Channel) -> bool:
    health: Any = health_pb2_grpc.HealthStub(channel)  # its stub types omit Check
    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT_S)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def test_disk_full_is_resource_exhausted_nothing_partial_and_writes_resume(
    small_disk: pathlib.Path,
) -> None:
    data_dir = small_disk / "data"
    acked: dict[int, bytes | None] = {}
    started: list[RunningBroker] = []  # stopped in `finally` (stop is idempotent)
    running = _start(data_dir, started)
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = broker_pb2_grpc.BrokerStub(channel)
            admin = admin_pb2_grpc.AdminStub(channel)
            for name in ("ballast", "events"):
                admin.CreateTopic(
                    admin_pb2.CreateTopicRequest(name=name, partitions=1), timeout=RPC_TIMEOUT_S
                )
            for i in range(BALLAST_BATCHES):
                stub.Produce(
                    _request("ballast", _values(i), broker_pb2.ACKS_LEADER), timeout=RPC_TIMEOUT_S
                )

            _fill_disk(stub, acked)

            # A batch larger than the segment's room needs a new segment: the roll fails (its
            # index files cannot be allocated); the appends after it must roll first too.
            for values in ([b"r" * ROLL_VALUE_BYTES], [b"small"]):
                with pytest.raises(grpc.RpcError) as rolled:
                    stub.Produce(
                        _request("events", values, broker_pb2.ACKS_LEADER), timeout=RPC_TIMEOUT_S
                    )
                _refused(rolled.value)

            # Nothing partial: the log end, what a fetch returns and what is on disk agree.
            partition_dir = data_dir / "events-0"
            start, end, size_bytes = _offsets(admin, "events")
            assert (start, end) == (0, len(acked))
            assert _fetch_all(stub, "events") == acked
            assert _whole_batches_on_disk(partition_dir) == size_bytes

            # Still full: refused the same way, on the unary and the streaming path; the
            # broker answers everything else.
            for i in range(3):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Produce(
                        _request("events", _values(1000 + i), broker_pb2.ACKS_ALL),
                        timeout=RPC_TIMEOUT_S,
                    )
                _refused(refused.value)
            stream_request = _request("events", _values(2000), broker_pb2.ACKS_LEADER)
            stream_request.correlation_id = 7
            (streamed,) = list(stub.ProduceStream(iter([stream_request]), timeout=RPC_TIMEOUT_S))
            assert streamed.correlation_id == 7
            assert streamed.results[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "no space left on device" in streamed.results[0].error.message
            assert _serving(channel)
            names = admin.ListTopics(admin_pb2.ListTopicsRequest(), timeout=RPC_TIMEOUT_S)
            assert sorted(t.name for t in names.topics) == ["ballast", "events"]
            assert _offsets(admin, "events")[:2] == (0, len(acked))
            assert _fetch_all(stub, "events") == acked
            assert _whole_batches_on_disk(partition_dir) == _offsets(admin, "events")[2]

            # Free space: delete the ballast topic. Writes resume where they stopped.
            admin.DeleteTopic(admin_pb2.DeleteTopicRequest(name="ballast"), timeout=RPC_TIMEOUT_S)
            for i in range(AFTER_FREE_BATCHES):
                values = _values(3000 + i)
                acks = broker_pb2.ACKS_ALL if i % 2 else broker_pb2.ACKS_LEADER
                answer = stub.Produce(_request("events", values, acks), timeout=RPC_TIMEOUT_S)
                base = answer.results[0].base_offset
                assert base == max(acked) + 1
                acked.update((base + j, v) for j, v in enumerate(values))
            assert _fetch_all(stub, "events") == acked

        # A clean stop, then a restart with no recovery scan and every acknowledged record.
        running.stop()
        assert (data_dir / "events-0" / ".clean-shutdown").exists()
        running = _start(data_dir, started)
        plog = running.broker._partition("events", 0).log
        assert (plog.recovered, plog.truncations) == (False, [])
        with grpc.insecure_channel(running.address) as channel:
            stub = broker_pb2_grpc.BrokerStub(channel)
            assert _fetch_all(stub, "events") == acked
            values = _values(4000)
            answer = stub.Produce(
                _request("events", values, broker_pb2.ACKS_ALL), timeout=RPC_TIMEOUT_S
            )
            assert answer.results[0].base_offset == len(acked)
        running.stop()
    finally:
        for each in started:
            each.stop()


def test_refused_rolls_on_a_full_disk_leave_no_file_open(small_disk: pathlib.Path) -> None:
    data_dir = small_disk / "data"
    started: list[RunningBroker] = []  # stopped in `finally` (stop is idempotent)
    running = _start(data_dir, started)
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = broker_pb2_grpc.BrokerStub(channel)
            admin = admin_pb2_grpc.AdminStub(channel)
            admin.CreateTopic(
                admin_pb2.CreateTopicRequest(name="events", partitions=1), timeout=RPC_TIMEOUT_S
            )
            _fill_disk(stub, {})
            refused = 0
            for _ in range(3):  # larger than the room left in the segment: each must roll
                with pytest.raises(grpc.RpcError) as rolled:
                    stub.Produce(
                        _request("events", [b"r" * ROLL_VALUE_BYTES], broker_pb2.ACKS_LEADER),
                        timeout=RPC_TIMEOUT_S,
                    )
                assert "rolling" in _refused(rolled.value)
                refused += 1
            assert refused == 3
        running.stop()
        assert _files_open_under(small_disk) == []
    finally:
        for each in started:
            each.stop()
