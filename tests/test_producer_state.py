"""Idempotent producers in PartitionLog: sequence checks, duplicates, epochs, limits, expiry,
snapshots and the rebuild from batch headers after a clean close, a crash, or neither.

The state machine at the end is the main check of the sequence rules: it compares every
verdict and every returned offset with a model that keeps the whole history of accepted
batches per producer id and derives what the log must answer, across rolls, clean reopens
and crashes (with and without snapshots on disk).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import crc32c
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from storage import (
    AppendResult,
    BatchMetadata,
    CorruptBatchError,
    FsyncPolicy,
    InvalidConfigError,
    InvalidProducerBatchError,
    LimitExceededError,
    LogConfig,
    NewRecord,
    OutOfOrderSequenceError,
    PartitionLog,
    ProducerEntry,
    ProducerFencedError,
    StorageError,
    UnknownProducerError,
    decode_records,
    encode_batch,
    read_header,
)
from storage._producers import (
    SEQUENCE_MAX,
    ProducerStates,
    decode_snapshot,
    encode_snapshot,
)

NOW_MS = 1_700_000_000_000
# Segments of about ten small batches, so a few dozen appends roll (and snapshot) often.
SMALL = LogConfig(segment_bytes=1024, segment_ms=None, retention_ms=None)
# Never rolls on its own.
QUIET = LogConfig(segment_bytes=1 << 20, segment_ms=None, retention_ms=None)
STORAGE_LOGGER = "riverlog.storage"


# ---------------------------------------------------------------------------- helpers
def _config(base: LogConfig = QUIET, **changes: Any) -> LogConfig:
    return dataclasses.replace(base, **changes)


def _batch(
    producer_id: int, epoch: int, seq: int, count: int = 1, ts: int = NOW_MS, tag: bytes = b""
) -> bytes:
    records = [NewRecord(b"k", tag + b"v%d" % i, ts, ()) for i in range(count)]
    return encode_batch(records, producer_id=producer_id, producer_epoch=epoch, base_sequence=seq)


def _plain(count: int = 1) -> bytes:
    return encode_batch([NewRecord(None, b"plain", NOW_MS, ()) for _ in range(count)])


def _send(
    plog: PartitionLog, producer_id: int, epoch: int, seq: int, count: int = 1, now: int = NOW_MS
) -> AppendResult:
    """Append a batch whose record times equal the broker time: a batch rebuilt from the log
    then has the same append time as the original (its max timestamp)."""
    return plog.append(_batch(producer_id, epoch, seq, count, ts=now), now)


def _values(plog: PartitionLog) -> list[bytes | None]:
    out: list[bytes | None] = []
    offset = plog.log_start_offset
    while offset < plog.log_end_offset:
        records = [r for r in decode_records(plog.read(offset, 1 << 20)) if r.offset >= offset]
        out.extend(r.value for r in records)
        offset = records[-1].offset + 1
    return out


def _snapshots(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.snapshot"))


def _replayed(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == STORAGE_LOGGER and "batch headers replayed" in r.getMessage()
    ]


def _fill_three_producers(plog: PartitionLog, batches: int = 30) -> None:
    """Ids 1, 2 and 3 in turn, 1-3 records a batch, with time moving on."""
    seqs = {1: 0, 2: 0, 3: 0}
    for i in range(batches):
        pid = 1 + i % 3
        count = 1 + i % 3
        _send(plog, pid, 0, seqs[pid], count, now=NOW_MS + i)
        seqs[pid] += count


def _entry(plog: PartitionLog, producer_id: int) -> ProducerEntry:
    state = plog.producer_state(producer_id)
    assert state is not None, f"no state for producer id {producer_id}"
    return state


def _states(plog: PartitionLog, ids: range = range(1, 4)) -> dict[int, ProducerEntry | None]:
    return {pid: plog.producer_state(pid) for pid in ids}


def _without_last_seen(states: dict[int, ProducerEntry | None]) -> dict[int, Any]:
    return {pid: None if e is None else e._replace(last_seen_ms=None) for pid, e in states.items()}


# ---------------------------------------------------------------------------- sequence rules
def test_a_duplicate_returns_the_original_offsets_and_appends_nothing(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, QUIET) as plog:
        first = _send(plog, 7, 0, 0, count=3, now=NOW_MS)
        second = _send(plog, 7, 0, 3, count=2, now=NOW_MS + 5)
        assert (first, second) == ((0, 2, NOW_MS, False), (3, 4, NOW_MS + 5, False))
        end, size = plog.log_end_offset, plog.size_bytes

        again = plog.append(_batch(7, 0, 0, count=3), NOW_MS + 99)
        assert again == AppendResult(0, 2, NOW_MS, True)
        assert again.duplicate
        assert _send(plog, 7, 0, 3, count=2, now=NOW_MS + 100) == (3, 4, NOW_MS + 5, True)
        assert (plog.log_end_offset, plog.size_bytes) == (end, size)
        assert len(_values(plog)) == 5


def test_only_the_last_five_batches_are_recognised_as_duplicates(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, QUIET) as plog:
        results = [_send(plog, 7, 0, seq) for seq in range(7)]
        end = plog.log_end_offset
        for seq in range(2, 7):  # the cached five
            assert _send(plog, 7, 0, seq) == results[seq]._replace(duplicate=True)
        for seq in (0, 1):  # older than the cache: out of order, never appended again
            with pytest.raises(OutOfOrderSequenceError) as info:
                _send(plog, 7, 0, seq)
            assert (info.value.expected, info.value.received) == (7, seq)
        assert plog.log_end_offset == end
        state = plog.producer_state(7)
        assert state is not None
        assert [b.first_seq for b in state.batches] == [2, 3, 4, 5, 6]


def test_a_gap_in_sequences_is_refused(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, QUIET) as plog:
        _send(plog, 7, 3, 0, count=2)
        with pytest.raises(OutOfOrderSequenceError) as info:
            _send(plog, 7, 3, 3)
        error = info.value
        assert (error.producer_id, error.epoch, error.expected, error.received) == (7, 3, 2, 3)
        for words in ("producer id 7", "epoch 3", "expected 2", "received 3"):
            assert words in str(error)
        assert plog.log_end_offset == 2
        # A batch that overlaps a cached one without matching it is not a duplicate either.
        with pytest.raises(OutOfOrderSequenceError):
            _send(plog, 7, 3, 0, count=1)
        assert _send(plog, 7, 3, 2) == (2, 2, NOW_MS, False)


def test_an_older_epoch_is_fenced(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, QUIET) as plog:
        _send(plog, 7, 0, 0)
        _send(plog, 7, 1, 0)
        with pytest.raises(ProducerFencedError) as info:
            _send(plog, 7, 0, 1)
        assert (info.value.producer_id, info.value.epoch, info.value.current_epoch) == (7, 0, 1)
        assert "epoch 0" in str(info.value)
        assert "epoch 1" in str(info.value)
        with pytest.raises(ProducerFencedError):  # even a duplicate of the old epoch
            _send(plog, 7, 0, 0)
        assert plog.log_end_offset == 2


def test_a_newer_epoch_must_start_at_sequence_zero(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, QUIET) as plog:
        _send(plog, 7, 0, 0, count=5)
        with pytest.raises(OutOfOrderSequenceError) as info:
            _send(plog, 7, 1, 5)
        assert (info.value.epoch, info.value.expected, info.value.received) == (1, 0, 5)
        assert plog.log_end_offset == 5
        assert _send(plog, 7, 1, 0, count=2) == (5, 6, NOW_MS, False)
        state = plog.producer_state(7)
        assert state is not None
        assert state.epoch == 1
        assert state.batches == (BatchMetadata(0, 1, 5, 6, NOW_MS),)


def test_an_unknown_producer_must_start_at_sequence_zero(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, QUIET) as plog:
        with pytest.raises(UnknownProducerError) as info:
            _send(plog, 9, 2, 4)
        assert (info.value.producer_id, info.value.epoch, info.value.received) == (9, 2, 4)
        assert "producer id 9" in str(info.value)
        assert plog.log_end_offset == 0
        assert plog.producer_count == 0
        assert _send(plog, 9, 2, 0) == (0, 0, NOW_MS, False)
        assert plog.producer_count == 1


def test_new_producer_ids_are_bounded_by_producers_max(tmp_path: Path) -> None:
    config = _config(producers_max=2, producer_expiry_ms=1000)
    with PartitionLog.open(tmp_path, config) as plog:
        _send(plog, 1, 0, 0, now=NOW_MS)
        _send(plog, 2, 0, 0, now=NOW_MS + 500)
        with pytest.raises(LimitExceededError, match="producers_max 2"):
            _send(plog, 3, 0, 0)
        assert plog.log_end_offset == 2
        assert _send(plog, 1, 0, 1, now=NOW_MS + 600).base_offset == 2  # known ids go on
        assert plog.expire_producers(NOW_MS + 1500) == 1  # id 2 was idle for 1000 ms
        assert _send(plog, 3, 0, 0).base_offset == 3
        assert plog.producer_count == 2


def test_an_idempotent_batch_must_be_alone_in_its_append(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, QUIET) as plog:
        for payload in (_plain() + _batch(7, 0, 0), _batch(7, 0, 0) + _batch(7, 0, 1)):
            with pytest.raises(InvalidProducerBatchError, match="alone") as info:
                plog.append(payload, NOW_MS)
            assert isinstance(info.value, CorruptBatchError)  # INVALID_ARGUMENT
            with pytest.raises(InvalidProducerBatchError):
                plog.check(payload)
        with pytest.raises(InvalidProducerBatchError, match="epoch -1"):
            plog.append(_batch(7, -1, 0), NOW_MS)
        with pytest.raises(InvalidProducerBatchError, match="base sequence -3"):
            plog.append(_batch(7, 0, -3), NOW_MS)
        assert plog.log_end_offset == 0
        assert plog.producer_count == 0


def test_non_idempotent_batches_are_appended_as_before(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, QUIET) as plog:
        assert plog.append(_plain(2) + _plain(3), NOW_MS) == (0, 4, NOW_MS, False)
        assert plog.append(_plain(2), NOW_MS) == (5, 6, NOW_MS, False)
        assert plog.append(_plain(2), NOW_MS) == (7, 8, NOW_MS, False)  # no deduplication
        # A producer id below -1 is "none" too, as in Kafka.
        odd = encode_batch([NewRecord(None, b"x", NOW_MS, ())], producer_id=-5)
        assert plog.append(odd, NOW_MS) == (9, 9, NOW_MS, False)
        assert plog.producer_count == 0
        assert AppendResult(1, 2, 3) == (1, 2, 3, False)


def test_append_takes_the_headers_check_returned(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, QUIET) as plog:
        payload = _batch(7, 0, 0, count=2)
        headers = plog.check(payload)
        assert plog.append(payload, NOW_MS, headers) == (0, 1, NOW_MS, False)
        assert plog.append(payload, NOW_MS + 1, plog.check(payload)).duplicate


def test_sequences_wrap_past_int32_max_to_zero() -> None:
    def header(seq: int, count: int, epoch: int = 0) -> Any:
        return read_header(_batch(5, epoch, seq, count))

    states = ProducerStates()
    states.update(header(SEQUENCE_MAX - 2, 3), base_offset=100, now_ms=1)
    entry = states.get(5)
    assert entry is not None
    assert entry.batches[-1].last_seq == SEQUENCE_MAX
    assert states.check(header(0, 2), producers_max=10) is None  # after 2**31 - 1 comes 0
    with pytest.raises(OutOfOrderSequenceError, match="expected 0, received 1"):
        states.check(header(1, 1), producers_max=10)

    states.update(header(SEQUENCE_MAX - 1, 4), base_offset=200, now_ms=2)  # spans the wrap
    entry = states.get(5)
    assert entry is not None
    assert entry.batches[-1] == BatchMetadata(SEQUENCE_MAX - 1, 1, 200, 203, 2)
    assert states.check(header(2, 1), producers_max=10) is None
    assert states.check(header(SEQUENCE_MAX - 1, 4), producers_max=10) == entry.batches[-1]


def test_a_producer_near_the_wrap_goes_on_through_the_log(tmp_path: Path) -> None:
    # The state of an id whose last batch ended at 2**31 - 2, as a snapshot at offset 0.
    near = ProducerEntry(
        5, 0, NOW_MS, (BatchMetadata(SEQUENCE_MAX - 9, SEQUENCE_MAX - 1, 0, 8, 1),)
    )
    (tmp_path / f"{0:020d}.snapshot").write_bytes(encode_snapshot(0, [near]))
    with PartitionLog.open(tmp_path, QUIET) as plog:
        assert plog.producer_state(5) == near
        assert _send(plog, 5, 0, SEQUENCE_MAX, count=3) == (0, 2, NOW_MS, False)
        assert _send(plog, 5, 0, 2) == (3, 3, NOW_MS, False)
        assert _send(plog, 5, 0, SEQUENCE_MAX, count=3).duplicate
        with pytest.raises(OutOfOrderSequenceError, match="expected 3, received 4"):
            _send(plog, 5, 0, 4)


# ---------------------------------------------------------------------------- expiry
def test_idle_producers_expire_by_the_injected_clock(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, _config(producer_expiry_ms=10_000)) as plog:
        _send(plog, 1, 0, 0, now=1_000)
        _send(plog, 2, 0, 0, now=5_000)
        assert plog.expire_producers(10_999) == 0
        assert plog.expire_producers(11_000) == 1
        assert plog.producer_state(1) is None
        state = plog.producer_state(2)
        assert state is not None
        assert state.last_seen_ms == 5_000
        with pytest.raises(UnknownProducerError):
            _send(plog, 1, 0, 1, now=11_001)
        assert _send(plog, 1, 0, 0, now=11_002).base_offset == 2
        assert plog.expire_producers(15_000) == 1  # id 2
        assert plog.producer_count == 1


def test_ids_rebuilt_from_the_log_are_not_expired_early(tmp_path: Path) -> None:
    config = _config(producer_expiry_ms=10_000)
    plog = PartitionLog.open(tmp_path, config)
    _send(plog, 1, 0, 0, now=1_000)
    plog.abandon()  # a crash: no snapshot holds id 1, the replay finds it in the log
    with PartitionLog.open(tmp_path, config) as plog:
        state = plog.producer_state(1)
        assert state is not None
        assert state.last_seen_ms is None
        assert plog.expire_producers(1_000_000) == 0  # seen "now", at the first call
        state = plog.producer_state(1)
        assert state is not None
        assert state.last_seen_ms == 1_000_000
        assert plog.expire_producers(1_009_999) == 0
        assert plog.expire_producers(1_010_000) == 1


def test_last_seen_time_survives_a_clean_close(tmp_path: Path) -> None:
    config = _config(producer_expiry_ms=10_000)
    with PartitionLog.open(tmp_path, config) as plog:
        _send(plog, 1, 0, 0, now=1_000)
    with PartitionLog.open(tmp_path, config) as plog:
        state = plog.producer_state(1)
        assert state is not None
        assert state.last_seen_ms == 1_000
        assert plog.expire_producers(11_000) == 1


# ---------------------------------------------------------------------------- config
def test_producer_settings_parse_and_are_bounded() -> None:
    config = LogConfig().with_overrides({"producer_expiry_ms": "60_000", "producers_max": 7})
    assert (config.producer_expiry_ms, config.producers_max) == (60_000, 7)
    assert LogConfig().producer_expiry_ms == 86_400_000
    assert LogConfig().producers_max == 10_000
    for key, value in (
        ("producers_max", 0),
        ("producers_max", 10**9),
        ("producer_expiry_ms", 0),
        ("producers_max", "none"),
    ):
        with pytest.raises(InvalidConfigError, match=key):
            LogConfig().with_overrides({key: value})


# ---------------------------------------------------------------------------- snapshots
def test_snapshot_bytes_follow_the_documented_layout() -> None:
    entries = [
        ProducerEntry(
            7, 1, 1_000, (BatchMetadata(0, 2, 40, 42, 999), BatchMetadata(3, 3, 43, 43, 1_001))
        ),
        ProducerEntry(9, 0, None, ()),
    ]
    body = struct.pack(">qi", 44, 2)
    body += struct.pack(">qhqb", 7, 1, 1_000, 2)
    body += struct.pack(">iiqqq", 0, 2, 40, 42, 999) + struct.pack(">iiqqq", 3, 3, 43, 43, 1_001)
    body += struct.pack(">qhqb", 9, 0, -1, 0)
    expected = struct.pack(">hI", 1, crc32c.crc32c(body)) + body
    assert encode_snapshot(44, entries) == expected
    assert decode_snapshot(expected, 44) == {e.producer_id: e for e in entries}


def test_a_damaged_snapshot_is_refused_by_the_decoder() -> None:
    from storage._producers import SnapshotError

    good = encode_snapshot(10, [ProducerEntry(1, 0, 5, (BatchMetadata(0, 0, 9, 9, 5),))])
    flipped = bytearray(good)
    flipped[-3] ^= 0x10
    for bad, why in (
        (good[:-1], "CRC32C"),
        (bytes(flipped), "CRC32C"),
        (good[:5], "shorter"),
        (b"\x00\x02" + good[2:], "version"),
    ):
        with pytest.raises(SnapshotError, match=why):
            decode_snapshot(bad, 10)
    with pytest.raises(SnapshotError, match="name says 11"):
        decode_snapshot(good, 11)


def test_rolls_and_close_keep_the_two_newest_snapshots(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, SMALL) as plog:
        _fill_three_producers(plog, 60)
        assert plog.segment_count >= 4
        end = plog.log_end_offset
        active_base = int(sorted(tmp_path.glob("*.log"))[-1].stem)
    assert [int(p.stem) for p in _snapshots(tmp_path)] == [active_base, end]


def test_fsync_always_writes_the_roll_snapshot_before_the_append_returns(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path, _config(SMALL, fsync=FsyncPolicy.ALWAYS))
    try:
        _fill_three_producers(plog, 20)
        active_base = int(sorted(tmp_path.glob("*.log"))[-1].stem)
        assert active_base > 0
        assert int(_snapshots(tmp_path)[-1].stem) == active_base
    finally:
        plog.close()


# ---------------------------------------------------------------------------- recovery
def test_state_survives_a_clean_close_without_a_scan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with PartitionLog.open(tmp_path, SMALL) as plog:
        _fill_three_producers(plog)
        before = _states(plog)
        end = plog.log_end_offset
    caplog.set_level(logging.INFO, logger=STORAGE_LOGGER)
    with PartitionLog.open(tmp_path, SMALL) as plog:
        assert _replayed(caplog) == [], "a snapshot at the log end: nothing to replay"
        assert _states(plog) == before
        newest = _entry(plog, 2).batches[-1]
        resend = _send(plog, 2, 0, newest.first_seq, count=2)
        assert resend == (newest.base_offset, newest.last_offset, newest.log_append_time_ms, True)
        assert plog.log_end_offset == end


def test_state_survives_a_crash_from_the_newest_snapshot_and_a_header_scan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plog = PartitionLog.open(tmp_path, SMALL)
    _fill_three_producers(plog)
    last = _send(plog, 1, 0, _entry(plog, 1).batches[-1].last_seq + 1, count=2)
    before = _states(plog)
    plog.abandon()
    newest = int(_snapshots(tmp_path)[-1].stem)
    assert 0 < newest <= last.base_offset
    caplog.set_level(logging.INFO, logger=STORAGE_LOGGER)
    with PartitionLog.open(tmp_path, SMALL) as plog:
        assert plog.recovered
        (message,) = _replayed(caplog)
        assert f"snapshot at {newest}" in message
        assert _without_last_seen(_states(plog)) == _without_last_seen(before)
        resend = plog.append(_batch(1, 0, _entry(plog, 1).batches[-1].first_seq, 2), NOW_MS + 9)
        assert resend == last._replace(duplicate=True)
        assert plog.log_end_offset == last.last_offset + 1


def test_state_is_rebuilt_from_the_whole_log_without_any_snapshot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plog = PartitionLog.open(tmp_path, SMALL)
    _fill_three_producers(plog)
    before = _states(plog)
    plog.abandon()
    for path in _snapshots(tmp_path):
        path.unlink()
    caplog.set_level(logging.INFO, logger=STORAGE_LOGGER)
    with PartitionLog.open(tmp_path, SMALL) as plog:
        (message,) = _replayed(caplog)
        assert "snapshot at None, 30 batch headers replayed from offset 0" in message
        assert _without_last_seen(_states(plog)) == _without_last_seen(before)
        assert all(e is not None and e.last_seen_ms is None for e in _states(plog).values())


def test_a_replay_from_a_snapshot_inside_a_segment_skips_the_batches_below_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An index entry every few batches: the replay starts at one below the snapshot offset
    # and must not apply those batches a second time.
    config = _config(index_interval_bytes=200)
    with PartitionLog.open(tmp_path, config) as plog:
        for seq in range(7):
            _send(plog, 1, 0, seq)
    plog = PartitionLog.open(tmp_path, config)  # the clean close left a snapshot at 7
    _send(plog, 1, 0, 7)
    before = _states(plog, range(1, 2))
    plog.abandon()
    caplog.set_level(logging.INFO, logger=STORAGE_LOGGER)
    with PartitionLog.open(tmp_path, config) as plog:
        (message,) = _replayed(caplog)
        assert "snapshot at 7," in message
        assert "from offset 7" in message
        assert "1 batch headers" not in message, "the index entry is below the snapshot"
        assert _without_last_seen(_states(plog, range(1, 2))) == _without_last_seen(before)
        assert [b.first_seq for b in _entry(plog, 1).batches] == [3, 4, 5, 6, 7]


def test_an_id_that_expired_and_started_again_is_replayed_from_its_restart(
    tmp_path: Path,
) -> None:
    config = _config(producer_expiry_ms=1000)
    plog = PartitionLog.open(tmp_path, config)
    for seq in range(3):
        _send(plog, 1, 0, seq, now=seq)
    assert plog.expire_producers(5_000) == 1
    _send(plog, 1, 0, 0, count=2, now=5_001)  # back at sequence 0 in the same epoch
    plog.abandon()
    for path in _snapshots(tmp_path):
        path.unlink()
    with PartitionLog.open(tmp_path, config) as plog:
        assert [(b.first_seq, b.base_offset) for b in _entry(plog, 1).batches] == [(0, 3)]
        assert _send(plog, 1, 0, 2).base_offset == 5


@pytest.mark.parametrize("damage", ["bit flip", "short", "empty"])
def test_a_damaged_snapshot_is_deleted_and_an_older_one_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    with PartitionLog.open(tmp_path, SMALL) as plog:
        _fill_three_producers(plog)
        before = _states(plog)
    older, newest = _snapshots(tmp_path)
    data = bytearray(newest.read_bytes())
    if damage == "bit flip":
        data[len(data) // 2] ^= 0x04
    elif damage == "short":
        del data[-7:]
    else:
        data.clear()
    newest.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, logger=STORAGE_LOGGER)
    with PartitionLog.open(tmp_path, SMALL) as plog:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("deleting damaged producer snapshot" in w for w in warnings)
        assert not newest.exists()
        (message,) = _replayed(caplog)
        assert f"snapshot at {int(older.stem)}" in message
        assert _without_last_seen(_states(plog)) == _without_last_seen(before)


def test_with_every_snapshot_damaged_the_whole_log_is_replayed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with PartitionLog.open(tmp_path, SMALL) as plog:
        _fill_three_producers(plog)
        before = _states(plog)
    for path in _snapshots(tmp_path):
        path.write_bytes(path.read_bytes()[:-1])
    caplog.set_level(logging.INFO, logger=STORAGE_LOGGER)
    with PartitionLog.open(tmp_path, SMALL) as plog:
        assert _snapshots(tmp_path) == []
        (message,) = _replayed(caplog)
        assert "snapshot at None" in message
        assert _without_last_seen(_states(plog)) == _without_last_seen(before)


def test_a_recovery_cut_drops_the_cut_batches_from_the_state(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path, QUIET)
    _send(plog, 1, 0, 0, count=2)
    plog.close()  # a snapshot at offset 2
    plog = PartitionLog.open(tmp_path, QUIET)
    torn = _send(plog, 1, 0, 2, count=3)
    plog.close()  # a snapshot at offset 5, then a torn tail below it after a power loss
    (tmp_path / ".clean-shutdown").unlink()
    segment = sorted(tmp_path.glob("*.log"))[-1]
    with segment.open("r+b") as f:
        f.truncate(segment.stat().st_size - 10)
    with PartitionLog.open(tmp_path, QUIET) as plog:
        assert [t.first_offset_dropped for t in plog.truncations] == [torn.base_offset]
        assert [int(p.stem) for p in _snapshots(tmp_path)] == [2], "the one past the end goes"
        state = plog.producer_state(1)
        assert state is not None
        assert [b.first_seq for b in state.batches] == [0]
        again = _send(plog, 1, 0, 2, count=3)  # the cut batch is new again, not a duplicate
        assert again == torn


def test_retention_keeps_producer_state(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "log"
    plog = PartitionLog.open(directory, SMALL)
    _fill_three_producers(plog)
    before = _states(plog)
    assert plog.delete_before(plog.log_end_offset) > 0
    start, end = plog.log_start_offset, plog.log_end_offset
    assert start > 0
    assert _states(plog) == before
    older, newest = sorted(int(p.stem) for p in _snapshots(directory))
    assert older < start == newest
    plog.abandon()
    # Only the snapshot older than the log start: loaded, then replayed from the log start.
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    (copy / f"{newest:020d}.snapshot").unlink()
    caplog.set_level(logging.INFO, logger=STORAGE_LOGGER)
    with PartitionLog.open(copy, SMALL) as plog:
        (message,) = _replayed(caplog)
        assert f"snapshot at {older}, 6 batch headers replayed from offset {start}" in message
        assert (plog.log_end_offset, plog.producer_count) == (end, 3)
    with PartitionLog.open(directory, SMALL) as plog:  # a crash: the snapshot at the start
        assert _without_last_seen(_states(plog)) == _without_last_seen(before)
    with PartitionLog.open(directory, SMALL) as plog:  # a clean close
        assert _without_last_seen(_states(plog)) == _without_last_seen(before)


# ---------------------------------------------------------------------------- state machine
class Sent(NamedTuple):
    epoch: int
    first_seq: int
    last_seq: int
    base_offset: int
    last_offset: int
    time_ms: int


PRODUCER_IDS = (0, 1, 2)
KINDS = ("next", "next", "duplicate", "gap", "stale epoch", "new epoch", "any")


class ProducerMachine(RuleBasedStateMachine):
    """Random sends against a model that keeps every accepted batch of every producer id."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="producers-"))
        self.config = SMALL
        self.plog = PartitionLog.open(self.directory, self.config)
        self.history: dict[int, list[Sent]] = {pid: [] for pid in PRODUCER_IDS}
        self.end = 0
        self.now = NOW_MS

    def teardown(self) -> None:
        self.plog.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _window(self, pid: int) -> list[Sent]:
        hist = self.history[pid]
        return [b for b in hist if b.epoch == hist[-1].epoch][-5:] if hist else []

    def _verdict(self, pid: int, epoch: int, seq: int, count: int) -> str | Sent | None:
        """None: appended; a Sent: the duplicate of it; else the error's class name."""
        hist = self.history[pid]
        if not hist:
            return None if seq == 0 else "UnknownProducerError"
        current = hist[-1].epoch
        if epoch < current:
            return "ProducerFencedError"
        if epoch > current:
            return None if seq == 0 else "OutOfOrderSequenceError"
        last_seq = (seq + count - 1) % 2**31
        window = self._window(pid)
        for sent in window:
            if (sent.first_seq, sent.last_seq) == (seq, last_seq):
                return sent
        return None if seq == (window[-1].last_seq + 1) % 2**31 else "OutOfOrderSequenceError"

    @rule(
        pid=st.sampled_from(PRODUCER_IDS),
        kind=st.sampled_from(KINDS),
        count=st.integers(1, 3),
        data=st.data(),
    )
    def send(self, pid: int, kind: str, count: int, data: st.DataObject) -> None:
        hist = self.history[pid]
        current = hist[-1].epoch if hist else 0
        expected = (self._window(pid)[-1].last_seq + 1) % 2**31 if hist else 0
        epoch, seq = current, expected
        if kind == "duplicate" and hist:
            old = data.draw(st.sampled_from(hist), label="resend")  # maybe older than the cache
            epoch, seq, count = old.epoch, old.first_seq, old.last_seq - old.first_seq + 1
        elif kind == "gap":
            seq = expected + data.draw(st.integers(1, 4), label="gap")
        elif kind == "stale epoch":
            epoch = max(0, current - 1)
        elif kind == "new epoch":
            epoch, seq = current + 1, data.draw(st.sampled_from([0, 0, 1, 7]), label="seq")
        elif kind == "any":
            epoch = data.draw(st.integers(0, 3), label="epoch")
            seq = data.draw(st.integers(0, 12), label="seq")
        self.now += data.draw(st.integers(0, 50), label="ms")
        verdict = self._verdict(pid, epoch, seq, count)
        event("duplicate" if isinstance(verdict, Sent) else str(verdict or "appended"))
        refused: StorageError | None = None
        try:
            result = _send(self.plog, pid, epoch, seq, count, now=self.now)
        except StorageError as e:
            refused = e
        if refused is not None:
            assert type(refused).__name__ == verdict, f"{refused!r}, expected {verdict}"
            assert self.plog.log_end_offset == self.end
            return
        if isinstance(verdict, Sent):
            assert result == (verdict.base_offset, verdict.last_offset, verdict.time_ms, True)
            assert self.plog.log_end_offset == self.end
            return
        assert verdict is None, f"appended {result}, expected {verdict}"
        assert result == (self.end, self.end + count - 1, self.now, False)
        last_seq = (seq + count - 1) % 2**31
        hist.append(Sent(epoch, seq, last_seq, result[0], result[1], self.now))
        self.end += count

    @rule()
    def roll(self) -> None:
        self.plog.roll()

    @rule()
    def close_and_reopen(self) -> None:
        self.plog.close()
        self.plog = PartitionLog.open(self.directory, self.config)
        assert not self.plog.recovered

    @rule(drop_snapshots=st.booleans())
    def crash_and_reopen(self, drop_snapshots: bool) -> None:
        self.plog.abandon()
        if drop_snapshots:
            for path in _snapshots(self.directory):
                path.unlink()
        self.plog = PartitionLog.open(self.directory, self.config)
        assert self.plog.recovered
        assert self.plog.truncations == []

    @invariant()
    def state_matches_the_model(self) -> None:
        assert self.plog.log_end_offset == self.end
        for pid in PRODUCER_IDS:
            state = self.plog.producer_state(pid)
            window = self._window(pid)
            if not window:
                assert state is None
                continue
            assert state is not None
            assert state.epoch == window[-1].epoch
            assert state.batches == tuple(
                BatchMetadata(s.first_seq, s.last_seq, s.base_offset, s.last_offset, s.time_ms)
                for s in window
            )
        assert self.plog.producer_count == sum(1 for h in self.history.values() if h)


ProducerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestProducersAgainstModel = ProducerMachine.TestCase
