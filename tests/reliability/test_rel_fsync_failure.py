"""fsync failure (EIO): nothing is acknowledged after a failed fsync, the log goes offline
with a clear error, and reads of what was durable before continue.

Linux reports a write-back error to one fsync and may drop the pages it could not write; a
second fsync then succeeds without them (PostgreSQL's "fsyncgate"). So after EIO the log must
never retry and trust the result: it goes offline (Kafka takes the log directory offline),
every later write refuses with LogOfflineError, reads are served below `flushed_offset`, and
a restart recovers from what is on disk. The simulated disk (tests/reliability/simdisk.py)
makes this honest: after an injected EIO that file's durable content never advances again,
so an acknowledgement that relied on a retried fsync would show up as a lost record after
the power loss that ends each case.

- one failed fdatasync of the active segment under fsync `always`: the append raises, the
  log is offline, no call touches the disk any more, reads below the failure work;
- every fsync of a workload with rolls, checkpoints and snapshots fails in turn (fdatasync,
  index fsync at seal, directory fsync, the recovery point's and snapshot's fsyncs): no
  append is acknowledged after the failure and all acknowledged ones survive a power loss;
- a failed fsync of a sealed segment behind its roll (fsync `never`) reaches the next caller;
- over gRPC the failure is UNAVAILABLE with the message, and fetches of durable data work;
- an offset commit whose fsync fails is refused and not served.
"""

from __future__ import annotations

import errno
import os
import pathlib
import random
from collections.abc import Callable

import grpc
import pytest
from simdisk import SimDisk, SimulatedCrash, installed

from storage import (
    FsyncPolicy,
    LogConfig,
    LogOfflineError,
    NewRecord,
    PartitionLog,
    decode_records,
    encode_batch,
)
from stream._pb import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc
from stream._rpc import status_for
from stream._serve import RunningBroker
from stream.groups._offsets import OFFSETS_LOG_CONFIG, OffsetStore

NOW_MS = 1_700_000_000_000
CONFIG = LogConfig(
    segment_bytes=1024,
    segment_ms=None,
    retention_ms=None,
    retention_bytes=2000,
    index_interval_bytes=128,
    index_bytes_max=512,
    fsync=FsyncPolicy.ALWAYS,
)
WAIT_S = 10.0
ACKED = 24


def _batch(i: int) -> bytes:
    return encode_batch([NewRecord(f"k{i}".encode(), b"v" * (50 + 13 * (i % 7)), NOW_MS + i)])


def _values(plog: PartitionLog, end: int) -> list[bytes | None]:
    out: list[bytes | None] = []
    offset = plog.log_start_offset
    while offset < end:
        data, offset = plog.read_batches(offset, 1 << 20)
        out.extend(r.value for r in decode_records(data))
    return out


def _expected(count: int) -> list[bytes | None]:
    return [b"v" * (50 + 13 * (i % 7)) for i in range(count)]


def _nth_sync(n: int, calls: list[str]) -> Callable[[str], bool]:
    """A `fail_fsync` predicate failing the n-th fsync, fdatasync or fsync_dir (from 1)."""

    def fail(path: str) -> bool:
        calls.append(path)
        return len(calls) == n

    return fail


def _power_loss_keeps(root: pathlib.Path, sim: SimDisk, acked: int, seed: int) -> None:
    """Lose power, reopen: every acknowledged record is there, in order; at most the append
    that failed follows them; the log takes appends again."""
    sim.power_cycle(random.Random(seed))
    plog = PartitionLog.open(root / "p", CONFIG)
    try:
        end = plog.log_end_offset
        assert acked <= end <= acked + 1, f"{acked} acknowledged, {end} after the power loss"
        assert _values(plog, end) == _expected(end)
        assert plog.append(_batch(end), NOW_MS).base_offset == end
    finally:
        plog.close()


def test_an_append_whose_fsync_fails_is_refused_and_the_log_goes_offline(
    tmp_path: pathlib.Path, seed: int
) -> None:
    sim = SimDisk(tmp_path)
    with installed(sim):
        plog = PartitionLog.open(tmp_path / "p", CONFIG)
        for i in range(ACKED):  # a few segments
            plog.append(_batch(i), NOW_MS)
        assert plog.segment_count > 2
        sim.fail_fsync = lambda path: path.endswith(".log")
        with pytest.raises(LogOfflineError, match=r"offline after a failed fsync .*Errno 5"):
            plog.append(_batch(ACKED), NOW_MS)
        assert sim.fsync_failures == [plog._segments[-1].log_path]
        assert plog.offline
        assert plog.flushed_offset == plog.log_end_offset == ACKED

        steps = sim.steps
        writes: list[Callable[[], object]] = [
            lambda: plog.append(_batch(ACKED + 1), NOW_MS),
            plog.roll,
            plog.flush,
            lambda: plog.flush_if_due(NOW_MS),
            lambda: plog.apply_retention(NOW_MS),
            lambda: plog.delete_before(ACKED),
        ]
        for call in writes:
            with pytest.raises(LogOfflineError, match="takes no more writes"):
                call()
        assert sim.steps == steps, "an offline log touched the disk (an fsync retried?)"

        assert _values(plog, ACKED) == _expected(ACKED)  # durable data is still served
        with pytest.raises(LogOfflineError, match=f"serves reads below offset {ACKED} only"):
            plog.read(ACKED, 1000)
        plog.close()  # no error, and no clean-shutdown marker: the next open recovers
        assert ".clean-shutdown" not in os.listdir(tmp_path / "p")
        _power_loss_keeps(tmp_path, sim, ACKED, seed)


def test_every_fsync_of_a_workload_failing_in_turn_loses_nothing_acknowledged(
    tmp_path: pathlib.Path, seed: int, long_run: bool
) -> None:
    """Appends under fsync `always` with rolls (index fsyncs, directory fsyncs, recovery
    point and producer snapshot writes) and a retention delete; the n-th fsync-like call
    fails, for every n of the workload."""
    appends = 60 if long_run else 30

    def workload(plog: PartitionLog, acked: list[int]) -> None:
        for i in range(appends):
            plog.append(_batch(i), NOW_MS)
            acked.append(i)
            if i == appends // 2:
                plog.apply_retention(NOW_MS)

    (tmp_path / "count").mkdir()
    sim = SimDisk(tmp_path / "count")
    calls: list[str] = []
    with installed(sim):
        plog = PartitionLog.open(tmp_path / "count" / "p", CONFIG)
        sim.fail_fsync = _nth_sync(0, calls)
        workload(plog, [])
        total = len(calls)
        # Where the workload's retention moves the log start when nothing fails.
        retention_start = plog.log_start_offset
        plog.close()
    print(f"{total} fsync calls: {sorted({os.path.basename(c) for c in calls})}")
    for n in range(1, total + 1):
        root = tmp_path / f"n{n}"
        root.mkdir()
        sim = SimDisk(root)
        with installed(sim):
            plog = PartitionLog.open(root / "p", CONFIG)
            start = plog.log_start_offset
            failing: list[str] = []
            sim.fail_fsync = _nth_sync(n, failing)
            acked: list[int] = []
            with pytest.raises(LogOfflineError):
                workload(plog, acked)
            where = f"fsync {n} of {total} ({failing[-1]} failed)"
            assert plog.offline, where
            for i in range(len(acked), appends):  # never acknowledged after the failure
                with pytest.raises(LogOfflineError):
                    plog.append(_batch(i), NOW_MS)
            durable = plog.flushed_offset
            assert durable == len(acked), where
            start = plog.log_start_offset
            assert _values(plog, durable) == _expected(durable)[start:], where
            plog.close()
            sim.power_cycle(random.Random(seed + n))
            reopened = PartitionLog.open(root / "p", CONFIG)
            end = reopened.log_end_offset
            assert len(acked) <= end <= len(acked) + 1, where
            # The log start moves back never, and forward at most to where the retention
            # delete that was under way wanted it: a failed directory fsync after the
            # log-start-offset rename leaves that delete decided, or not, by the power cut.
            assert reopened.log_start_offset <= max(start, retention_start) or end == 0, where
            assert _values(reopened, end) == _expected(end)[reopened.log_start_offset :], where
            reopened.close()


def test_a_failed_fsync_behind_a_roll_reaches_the_next_caller(tmp_path: pathlib.Path) -> None:
    config = CONFIG.with_overrides({"fsync": FsyncPolicy.NEVER, "retention_bytes": None})
    sim = SimDisk(tmp_path)
    with installed(sim):
        plog = PartitionLog.open(tmp_path / "p", config)
        plog.append(_batch(0), NOW_MS)
        plog.flush()  # offset 0 is durable
        sealed = plog._segments[-1].log_path
        sim.fail_fsync = lambda path: path == sealed
        i = 1
        while plog.segment_count == 1:  # until a roll queues the fsync of `sealed`
            plog.append(_batch(i), NOW_MS)
            i += 1
        with pytest.raises(LogOfflineError, match=r"offline after a failed fsync"):
            plog.flush()  # acks=all: waits for the sealed segment first
        assert sim.fsync_failures == [sealed]
        with pytest.raises(LogOfflineError):
            plog.append(_batch(i), NOW_MS)
        assert plog.flushed_offset == 1
        assert _values(plog, 1) == _expected(1)
        plog.close()


def test_an_offset_commit_whose_fsync_fails_is_refused_and_not_served(
    tmp_path: pathlib.Path,
) -> None:
    sim = SimDisk(tmp_path)
    config = OFFSETS_LOG_CONFIG.with_overrides({"segment_bytes": 4096, "index_bytes_max": 512})
    with installed(sim):
        store = OffsetStore.open(tmp_path, NOW_MS, config)
        store.commit("g", {("t", 0): (1, "")}, NOW_MS)
        sim.fail_fsync = lambda path: path.endswith(".log")
        with pytest.raises(LogOfflineError):
            store.commit("g", {("t", 0): (2, "")}, NOW_MS)
        assert store.fetch("g")[("t", 0)].offset == 1
        store.close()
        sim.power_cycle(random.Random(1))
        store = OffsetStore.open(tmp_path, NOW_MS, config)
        assert store.fetch("g")[("t", 0)].offset in (1, 2)
        store.close()


# ---------------------------------------------------------------------------- over gRPC
def test_the_broker_answers_unavailable_and_keeps_serving_durable_data(
    running_broker: RunningBroker, channel: grpc.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert status_for(LogOfflineError("x")) == grpc.StatusCode.UNAVAILABLE
    admin = admin_pb2_grpc.AdminStub(channel)
    stub = broker_pb2_grpc.BrokerStub(channel)
    admin.CreateTopic(admin_pb2.CreateTopicRequest(name="t", partitions=2), timeout=WAIT_S)

    def produce(partition: int, value: bytes, acks: broker_pb2.Acks.ValueType) -> int:
        entry = broker_pb2.PartitionProduce(
            topic="t", partition=partition, record_batch=_value_batch(value)
        )
        request = broker_pb2.ProduceRequest(partitions=[entry], acks=acks)
        return stub.Produce(request, timeout=WAIT_S).results[0].base_offset

    def fetch(partition: int, offset: int) -> broker_pb2.FetchResponse:
        request = broker_pb2.FetchRequest(
            partitions=[broker_pb2.FetchPartition(topic="t", partition=partition, offset=offset)]
        )
        return stub.Fetch(request, timeout=WAIT_S)

    assert produce(0, b"durable", broker_pb2.ACKS_ALL) == 0
    assert produce(0, b"in the page cache", broker_pb2.ACKS_LEADER) == 1
    real = os.fdatasync

    def failing(fd: int) -> None:
        if "/t-0/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", failing)
    for acks in (broker_pb2.ACKS_ALL, broker_pb2.ACKS_LEADER):
        with pytest.raises(grpc.RpcError) as info:
            produce(0, b"lost", acks)
        assert isinstance(info.value, grpc.Call)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "offline after a failed fsync" in (info.value.details() or "")
    [durable] = fetch(0, 0).results
    assert [r.value for r in decode_records(durable.record_batches)] == [b"durable"]
    with pytest.raises(grpc.RpcError) as info:
        fetch(0, 1)  # appended, never fsynced: not served
    assert isinstance(info.value, grpc.Call)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert produce(1, b"another partition", broker_pb2.ACKS_ALL) == 0  # only t-0 is offline
    monkeypatch.undo()
    running_broker.stop()  # closing an offline log does not fail the shutdown


def _value_batch(value: bytes) -> bytes:
    return encode_batch([NewRecord(None, value, NOW_MS)])


def test_simulated_crash_is_not_an_exception() -> None:
    """SimulatedCrash passes every `except Exception` of the code under test."""
    assert not issubclass(SimulatedCrash, Exception)
