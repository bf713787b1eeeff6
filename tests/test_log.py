"""PartitionLog against a plain list of records: append, read, roll, retention, crash, limits.

The state machine is the main check: every step is compared with an in-memory model that
knows each record and each batch's size, so a crash that cuts the newest segment at any byte
has exactly one right answer. The example tests below pin the behaviours a user relies on
one at a time (roll triggers, retention, limits, disk full, fsync policy, threads, close).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import itertools
import os
import random
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from storage import (
    HEADER_BYTES,
    AppendResult,
    Compression,
    CorruptBatchError,
    DiskFullError,
    FsyncPolicy,
    LimitExceededError,
    LogClosedError,
    LogConfig,
    NewRecord,
    OffsetOutOfRangeError,
    PartitionLog,
    Record,
    decode_records,
    encode_batch,
    read_header,
)

# A config that never rolls or deletes on its own: each test turns on what it exercises.
QUIET = LogConfig(segment_bytes=1 << 20, segment_ms=None, retention_ms=None)


# ---------------------------------------------------------------------------- helpers
def file_stem(base_offset: int) -> str:
    """A segment's file name without its suffix (storage/_segment.py)."""
    return f"{base_offset:020d}"


def _config(**changes: Any) -> LogConfig:
    return dataclasses.replace(QUIET, **changes)


def _records(
    count: int, *, value_bytes: int = 50, ts: int = 1000, tag: bytes = b""
) -> list[NewRecord]:
    return [
        NewRecord(tag + b"k%d" % i, tag + bytes([i % 251]) * value_bytes, ts + i, ())
        for i in range(count)
    ]


def _batch(count: int = 1, **kwargs: Any) -> bytes:
    return encode_batch(_records(count, **kwargs))


def _log_files(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).glob("*.log"))


def _batches_in(buf: bytes) -> Iterator[tuple[int, int, int]]:
    """(base offset, last offset, size) of each back-to-back batch in `buf`, headers only."""
    pos = 0
    while pos < len(buf):
        header = read_header(buf, pos)
        yield header.base_offset, header.last_offset, header.size
        pos += header.size


def _expect_out_of_range(plog: PartitionLog, offset: int) -> None:
    start, end = plog.log_start_offset, plog.log_end_offset
    with pytest.raises(OffsetOutOfRangeError) as info:
        plog.read(offset, 1024)
    message = str(info.value)
    assert f"offset {offset}" in message
    assert f"log start offset {start}" in message
    assert f"log end offset {end}" in message


def _all_records(plog: PartitionLog) -> list[Record]:
    out: list[Record] = []
    offset = plog.log_start_offset
    while offset < plog.log_end_offset:
        chunk = decode_records(plog.read(offset, 1 << 20))
        out.extend(r for r in chunk if r.offset >= offset)
        offset = chunk[-1].offset + 1
    return out


def _expected_records(appended: Sequence[NewRecord], base_offset: int) -> list[Record]:
    return [
        Record(base_offset + i, r.timestamp_ms, r.key, r.value, tuple(r.headers))
        for i, r in enumerate(appended)
    ]


# ---------------------------------------------------------------------------- state machine
class ModelBatch(NamedTuple):
    base_offset: int
    last_offset: int
    size: int


_keys = st.none() | st.binary(max_size=16)
_values = st.none() | st.binary(max_size=64) | st.binary(min_size=200, max_size=900)
_headers = st.lists(st.tuples(st.text(max_size=4), st.none() | st.binary(max_size=8)), max_size=2)
_new_records = st.builds(NewRecord, _keys, _values, st.integers(0, 1000), _headers)
_codecs = st.sampled_from(
    [Compression.NONE] * 4 + [Compression.GZIP, Compression.LZ4, Compression.ZSTD]
)
# One append: n = 1-6 batches of at most 20 // n records each.
_payloads = st.integers(1, 6).flatmap(
    lambda n: st.lists(
        st.tuples(st.lists(_new_records, min_size=1, max_size=20 // n), _codecs),
        min_size=n,
        max_size=n,
    )
)


class LogMachine(RuleBasedStateMachine):
    """The log checked step by step against `records` (every record ever appended, by
    offset) and `batches` (each batch's offsets and size), both cut where the log is."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="riverlog-log-")
        self.directory = self.tmp.name
        self.config = QUIET
        self.plog: PartitionLog | None = None
        self.records: list[Record] = []
        self.batches: list[ModelBatch] = []
        self.start = 0
        self.now_ms = 0

    @property
    def log(self) -> PartitionLog:
        assert self.plog is not None
        return self.plog

    @property
    def end(self) -> int:
        return len(self.records)

    @initialize(
        segment_bytes=st.sampled_from([1024, 1500, 2048, 4096]),
        # Tiny indexes fill up, often in the middle of a multi-batch append.
        index_interval_bytes=st.sampled_from([1, 1, 64, 300, 1000]),
        index_bytes_max=st.sampled_from([24, 24, 40, 64, 4096]),
    )
    def open_log(self, segment_bytes: int, index_interval_bytes: int, index_bytes_max: int) -> None:
        self.config = _config(
            segment_bytes=segment_bytes,
            index_interval_bytes=index_interval_bytes,
            index_bytes_max=index_bytes_max,
        )
        self.plog = PartitionLog.open(self.directory, self.config)

    def teardown(self) -> None:
        try:
            if self.plog is not None:
                self.plog.close()
        finally:
            self.tmp.cleanup()

    # ------------------------------------------------------------------ rules
    @rule(payload=_payloads, elapsed_ms=st.integers(0, 100))
    def append(self, payload: list[tuple[list[NewRecord], Compression]], elapsed_ms: int) -> None:
        self.now_ms += elapsed_ms
        encoded = [encode_batch(records, compression=codec) for records, codec in payload]
        result = self.log.append(b"".join(encoded), self.now_ms)
        count = sum(len(records) for records, _codec in payload)
        assert result == AppendResult(self.end, self.end + count - 1, self.now_ms)
        for (records, _codec), batch in zip(payload, encoded, strict=True):
            self.batches.append(ModelBatch(self.end, self.end + len(records) - 1, len(batch)))
            self.records.extend(_expected_records(records, self.end))

    @precondition(lambda self: self.end > self.start)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(self.start, self.end - 1), label="offset")
        max_bytes = data.draw(st.integers(1, 6000), label="max_bytes")
        got = self.log.read(offset, max_bytes)
        found = list(_batches_in(got))
        assert found, "a read inside the log returns at least one batch"
        assert found[0][0] <= offset <= found[0][1], "the first batch holds the offset"
        if len(found) > 1:
            assert len(got) <= max_bytes
        # The batches are the stored ones, back to back, with their sizes.
        first = bisect.bisect_right([b.base_offset for b in self.batches], offset) - 1
        assert found == [tuple(b) for b in self.batches[first : first + len(found)]]
        records = decode_records(got)
        assert records == self.records[records[0].offset : records[-1].offset + 1]

    @rule(timestamp_ms=st.integers(-5, 1005))
    def read_by_timestamp(self, timestamp_ms: int) -> None:
        expected = next(
            (r.offset for r in self.records[self.start :] if r.timestamp_ms >= timestamp_ms),
            None,
        )
        assert self.log.offset_for_timestamp(timestamp_ms) == expected

    @rule()
    def roll(self) -> None:
        before = self.log.segment_count
        active_bytes = os.path.getsize(_log_files(self.directory)[-1])
        self.log.roll()
        if active_bytes:
            assert self.log.segment_count == before + 1
            assert _log_files(self.directory)[-1].name == f"{self.end:020d}.log"
        else:
            assert self.log.segment_count == before, "an empty active segment is not rolled"

    @rule(data=st.data())
    def apply_retention(self, data: st.DataObject) -> None:
        files = _log_files(self.directory)
        sizes = [f.stat().st_size for f in files]
        retention_bytes = data.draw(st.integers(0, sum(sizes) + 100), label="retention_bytes")
        # Kafka's rule: drop the oldest sealed segment while the rest is still >= the limit.
        keep_from, total = 0, sum(sizes)
        while keep_from < len(files) - 1 and total - sizes[keep_from] >= retention_bytes:
            total -= sizes[keep_from]
            keep_from += 1
        self.log.config = dataclasses.replace(self.config, retention_bytes=retention_bytes)
        try:
            deleted = self.log.apply_retention(self.now_ms)
        finally:
            self.log.config = self.config
        assert deleted == keep_from
        assert _log_files(self.directory) == files[keep_from:], "the active segment stays"
        assert self.log.size_bytes == total
        new_start = int(files[keep_from].stem)
        assert new_start >= self.start, "the log start offset never moves backwards"
        assert self.log.log_start_offset == new_start
        self.start = new_start

    @rule()
    def close_and_reopen(self) -> None:
        self.log.close()
        self.plog = PartitionLog.open(self.directory, self.config)
        assert not self.log.recovered
        assert self.log.truncations == []

    @rule()
    def crash_and_reopen(self) -> None:
        self.log.abandon()
        self.plog = PartitionLog.open(self.directory, self.config)
        assert self.log.recovered
        assert self.log.truncations == [], "a process crash loses nothing"

    @rule(data=st.data())
    def crash_torn_tail_and_reopen(self, data: st.DataObject) -> None:
        self.log.abandon()
        newest = _log_files(self.directory)[-1]
        newest_base = int(newest.stem)
        in_newest = [b for b in self.batches if b.base_offset >= newest_base]
        assert newest.stat().st_size == sum(b.size for b in in_newest)
        cut = data.draw(st.integers(0, newest.stat().st_size), label="cut")
        os.truncate(newest, cut)
        # Whole batches before the cut survive; the torn one and everything after go.
        survivors, boundary = 0, 0
        while survivors < len(in_newest) and boundary + in_newest[survivors].size <= cut:
            boundary += in_newest[survivors].size
            survivors += 1
        new_end = in_newest[survivors - 1].last_offset + 1 if survivors else newest_base
        self.plog = PartitionLog.open(self.directory, self.config)
        assert self.log.recovered
        assert [t.position for t in self.log.truncations] == ([] if cut == boundary else [boundary])
        del self.records[new_end:]
        del self.batches[len(self.batches) - len(in_newest) + survivors :]
        assert newest.stat().st_size == boundary

    # ------------------------------------------------------------------ invariants
    @invariant()
    def offsets_match_the_model(self) -> None:
        if self.plog is None:
            return
        assert self.log.log_end_offset == self.end
        assert self.log.log_start_offset == self.start
        assert self.log.size_bytes == sum(
            b.size for b in self.batches if b.base_offset >= self.start
        )

    @invariant()
    def reads_at_the_edges(self) -> None:
        if self.plog is None:
            return
        got = self.log.read(self.start, 1)
        if self.start == self.end:
            assert got == b""
        else:
            ((base, _last, _size),) = _batches_in(got)
            assert base == self.start
        assert self.log.read(self.end, 1) == b""
        _expect_out_of_range(self.log, self.end + 1)
        if self.start > 0:
            _expect_out_of_range(self.log, self.start - 1)


LogMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestLogAgainstModel = LogMachine.TestCase


# ---------------------------------------------------------------------------- random reads
def test_100k_random_reads_match_a_brute_force_scan(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    config = _config(segment_bytes=256 * 1024, index_interval_bytes=1024)
    appended: list[NewRecord] = []
    with PartitionLog.open(tmp_path, config) as plog:
        for i in range(3000):
            count = rng.choice([1, 1, 2, 5, 12])
            batch = [
                NewRecord(b"%d" % i, rng.randbytes(rng.choice([0, 10, 100, 700])), i, ())
                for _ in range(count)
            ]
            plog.append(encode_batch(batch), now_ms=i)
            appended.extend(batch)
        assert plog.segment_count >= 5

        # The truth: every .log decoded once, straight from the files.
        truth: list[tuple[int, int, bytes]] = []  # (base offset, last offset, stored bytes)
        segment_of: list[int] = []  # index into `files` of each batch's segment
        files = _log_files(tmp_path)
        for n, path in enumerate(files):
            data = path.read_bytes()
            pos = 0
            for base, last, size in _batches_in(data):
                truth.append((base, last, data[pos : pos + size]))
                segment_of.append(n)
                pos += size
        records = decode_records(b"".join(stored for _b, _l, stored in truth))
        assert records == _expected_records(appended, 0)
        bases = [base for base, _last, _stored in truth]
        end = plog.log_end_offset
        assert end == len(appended)

        mismatches: list[tuple[int, int]] = []  # (offset, max_bytes)
        for n in range(100_000):
            offset = rng.randrange(end)
            max_bytes = rng.choice([1, rng.randrange(1, 2000), rng.randrange(1, 40_000)])
            got = plog.read(offset, max_bytes)
            # Expected: the batch holding `offset`, then whole batches of its segment while the
            # total stays within max_bytes (the index step is far below the read-ahead here).
            i = bisect.bisect_right(bases, offset) - 1
            j, total = i + 1, len(truth[i][2])
            while (
                j < len(truth)
                and segment_of[j] == segment_of[i]
                and total + len(truth[j][2]) <= max_bytes
            ):
                total += len(truth[j][2])
                j += 1
            expected = b"".join(stored for _b, _l, stored in truth[i:j])
            if got != expected:
                mismatches.append((offset, max_bytes))
            elif n % 100 == 0:
                assert decode_records(got) == records[truth[i][0] : truth[j - 1][1] + 1]
        assert len(mismatches) == 0, f"first of {len(mismatches)}: {mismatches[:1]}"


# ---------------------------------------------------------------------------- roll
def _assert_segment_files_named_by_base_offset(directory: Path, end: int) -> None:
    files = _log_files(directory)
    expected_base = int(files[0].stem)
    for path in files:
        assert path.name == f"{expected_base:020d}.log"
        assert path.with_suffix(".index").exists()
        assert path.with_suffix(".timeindex").exists()
        data = path.read_bytes()
        found = list(_batches_in(data))
        if found:
            assert found[0][0] == expected_base
            expected_base = found[-1][1] + 1
    assert expected_base == end


def test_roll_by_segment_bytes(tmp_path: Path) -> None:
    config = _config(segment_bytes=1024, index_interval_bytes=100)
    with PartitionLog.open(tmp_path, config) as plog:
        counts: list[int] = []
        for i in range(30):
            plog.append(_batch(2, value_bytes=60 + 10 * i, ts=i), now_ms=i)
            counts.append(plog.segment_count)
        big = plog.append(_batch(1, value_bytes=3000), now_ms=99)  # larger than a segment
        plog.append(_batch(1), now_ms=100)
        assert counts == sorted(counts)
        assert counts[-1] >= 8
        for path in _log_files(tmp_path):
            data = path.read_bytes()
            assert len(data) <= 1024 or len(list(_batches_in(data))) == 1, path.name
        # The oversized batch starts a segment of its own, and the next append rolls past it.
        assert (tmp_path / f"{big.base_offset:020d}.log").stat().st_size > 3000
        assert _log_files(tmp_path)[-1].name == f"{big.last_offset + 1:020d}.log"
        _assert_segment_files_named_by_base_offset(tmp_path, plog.log_end_offset)
        assert len(_all_records(plog)) == plog.log_end_offset


def test_roll_by_segment_ms(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, _config(segment_ms=1000)) as plog:
        plog.append(_batch(1, ts=10_000), now_ms=10_000)
        plog.append(_batch(1, ts=10_500), now_ms=10_500)
        plog.append(_batch(1, ts=10_999), now_ms=10_999)
        assert plog.segment_count == 1
        # The age counts from the first batch's timestamp: 1000 ms later the segment rolls.
        rolled = plog.append(_batch(1, ts=11_000), now_ms=11_000)
        assert plog.segment_count == 2
        assert rolled.base_offset == 3
        assert _log_files(tmp_path)[-1].name == f"{3:020d}.log"
        plog.append(_batch(1, ts=11_500), now_ms=11_999)
        assert plog.segment_count == 2
        _assert_segment_files_named_by_base_offset(tmp_path, 5)


def test_roll_by_full_index(tmp_path: Path) -> None:
    # 24 bytes: 3 offset-index entries, 2 time-index entries, an entry per batch.
    config = _config(index_bytes_max=24, index_interval_bytes=1)
    with PartitionLog.open(tmp_path, config) as plog:
        for i in range(20):
            plog.append(_batch(1, ts=i), now_ms=i)
        assert plog.segment_count >= 5
        for path in _log_files(tmp_path):
            assert path.with_suffix(".index").stat().st_size <= 24
            assert path.with_suffix(".timeindex").stat().st_size <= 24
        _assert_segment_files_named_by_base_offset(tmp_path, 20)
        assert [r.timestamp_ms for r in _all_records(plog)] == list(range(20))
        assert plog.offset_for_timestamp(13) == 13


def test_multi_batch_append_into_a_nearly_full_index(tmp_path: Path) -> None:
    # Each batch of one append would add index entries: more than the index has room for.
    config = _config(index_bytes_max=24, index_interval_bytes=1)
    batches = [_batch(1, ts=100 * i) for i in range(8)]
    with PartitionLog.open(tmp_path, config) as plog:
        result = plog.append(b"".join(batches), now_ms=0)
        assert (result.base_offset, result.last_offset) == (0, 7)
        plog.append(b"".join(batches), now_ms=0)
        assert [r.timestamp_ms for r in _all_records(plog)] == [100 * i for i in range(8)] * 2
        assert plog.offset_for_timestamp(650) == 7
        for n in range(16):
            assert decode_records(plog.read(n, 1))[0].offset == n
    for path in _log_files(tmp_path):
        assert path.with_suffix(".index").stat().st_size <= 24
        assert path.with_suffix(".timeindex").stat().st_size <= 24
    with PartitionLog.open(tmp_path, config) as plog:
        assert not plog.recovered
        assert plog.log_end_offset == 16
        assert plog.offset_for_timestamp(650) == 7
        plog.abandon()
    with PartitionLog.open(tmp_path, config) as plog:
        assert plog.recovered
        assert plog.truncations == []
        assert len(_all_records(plog)) == 16


# ---------------------------------------------------------------------------- retention
def _log_of_segments(directory: Path, config: LogConfig, segments: int) -> PartitionLog:
    """A log with `segments` sealed segments of 4 batches, timestamps 1000*segment + i."""
    plog = PartitionLog.open(directory, config)
    for s in range(segments):
        for i in range(4):
            plog.append(_batch(1, ts=1000 * s + i), now_ms=1000 * s + i)
        plog.roll()
    plog.append(_batch(1, ts=1000 * segments), now_ms=1000 * segments)
    assert plog.segment_count == segments + 1
    return plog


def test_retention_by_bytes_deletes_oldest_sealed_segments(tmp_path: Path) -> None:
    _log_of_segments(tmp_path, QUIET, 6).close()
    sizes = [p.stat().st_size for p in _log_files(tmp_path)]
    # Keep the newest two sealed segments and the active one.
    limit = sum(sizes[-3:])
    with PartitionLog.open(tmp_path, _config(retention_bytes=limit)) as plog:
        assert plog.apply_retention(now_ms=10_000) == 4
        assert plog.size_bytes == limit
        assert plog.log_start_offset == 16
        assert [p.name for p in _log_files(tmp_path)] == [f"{b:020d}.log" for b in (16, 20, 24)]
        assert not (tmp_path / f"{0:020d}.index").exists()
        for offset in (0, 15):
            _expect_out_of_range(plog, offset)
        assert decode_records(plog.read(16, 1))[0].offset == 16
        assert plog.offset_for_timestamp(0) == 16
        assert plog.offset_for_timestamp(5002) == 22
        assert plog.offset_for_timestamp(6000) == 24
        assert plog.offset_for_timestamp(6001) is None
        assert plog.apply_retention(now_ms=10_000) == 0, "nothing more to delete"
    with PartitionLog.open(tmp_path, QUIET) as reopened:
        assert (reopened.log_start_offset, reopened.log_end_offset) == (16, 25)


def test_retention_never_deletes_the_active_segment(tmp_path: Path) -> None:
    with _log_of_segments(tmp_path, _config(retention_bytes=0), 3) as plog:
        assert plog.apply_retention(now_ms=0) == 3
        assert plog.segment_count == 1
        assert (plog.log_start_offset, plog.log_end_offset) == (12, 13)
        assert decode_records(plog.read(12, 1))[0].timestamp_ms == 3000
        plog.roll()
        assert plog.apply_retention(now_ms=0) == 1
        assert (plog.log_start_offset, plog.log_end_offset) == (13, 13)
        assert plog.read(13, 100) == b""
        _expect_out_of_range(plog, 12)
        assert plog.apply_retention(now_ms=0) == 0


def test_retention_by_age_uses_each_segments_newest_record(tmp_path: Path) -> None:
    # Segment s holds timestamps 1000*s + i (i < 4), so its newest record is 1000*s + 3.
    with _log_of_segments(tmp_path, _config(retention_ms=5000), 6) as plog:
        assert plog.apply_retention(now_ms=5000 + 3) == 0, "exactly at the limit: kept"
        assert plog.apply_retention(now_ms=5000 + 1004) == 2
        assert plog.log_start_offset == 8
        _expect_out_of_range(plog, 7)
        assert plog.offset_for_timestamp(0) == 8
        assert plog.offset_for_timestamp(4002) == 18
        assert plog.apply_retention(now_ms=10**9) == 4, "every sealed segment, not the active"
        assert (plog.log_start_offset, plog.log_end_offset, plog.segment_count) == (24, 25, 1)
        assert plog.offset_for_timestamp(0) == 24


# ---------------------------------------------------------------------------- limits
def test_batch_over_batch_bytes_max_is_refused_whole(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, _config(batch_bytes_max=1000)) as plog:
        plog.append(_batch(1), now_ms=0)
        big = _batch(1, value_bytes=2000)
        for payload in (big, _batch(1) + big):
            with pytest.raises(LimitExceededError) as info:
                plog.append(payload, now_ms=1)
            assert str(len(big)) in str(info.value)
            assert "1000" in str(info.value)
            assert (plog.log_end_offset, plog.size_bytes) == (1, len(_batch(1)))
        assert plog.append(_batch(1), now_ms=2).base_offset == 1


def test_corrupt_payload_is_refused_whole(tmp_path: Path) -> None:
    good = _batch(3)
    bad = bytearray(good)
    bad[HEADER_BYTES + 5] ^= 0x40
    with PartitionLog.open(tmp_path, QUIET) as plog:
        with pytest.raises(CorruptBatchError, match="CRC32C mismatch"):
            plog.append(bytes(bad), now_ms=0)
        for payload in (bytes(bad), good + bytes(bad), good + good[:-1], b""):
            with pytest.raises(CorruptBatchError):
                plog.append(payload, now_ms=0)
            assert (plog.log_end_offset, plog.size_bytes) == (0, 0)
        assert plog.append(good, now_ms=0) == AppendResult(0, 2, 0)


def test_read_refuses_max_bytes_below_one(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, QUIET) as plog:
        plog.append(_batch(1), now_ms=0)
        for max_bytes in (0, -1):
            with pytest.raises(LimitExceededError, match=f"got {max_bytes}"):
                plog.read(0, max_bytes)


# ---------------------------------------------------------------------------- disk full
def test_disk_full_appends_nothing_and_the_next_append_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*_args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with PartitionLog.open(tmp_path, QUIET) as plog:
        plog.append(_batch(2), now_ms=0)
        segment = _log_files(tmp_path)[-1]
        size = segment.stat().st_size
        with monkeypatch.context() as patch:
            patch.setattr(os, "pwritev", no_space)
            with pytest.raises(DiskFullError, match="no space left on device"):
                plog.append(_batch(3), now_ms=1)
        assert plog.log_end_offset == 2
        assert segment.stat().st_size == size
        assert plog.append(_batch(3, tag=b"x"), now_ms=2) == AppendResult(2, 4, 2)
        assert _all_records(plog) == (
            _expected_records(_records(2), 0) + _expected_records(_records(3, tag=b"x"), 2)
        )


def _fds_under(directory: Path) -> list[str]:
    """Files under `directory` this process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # listdir's own descriptor is gone by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(f"{directory}/"):
                found.append(target)
    return sorted(found)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("failing_index", [".index", ".timeindex"])
def test_a_refused_roll_leaves_no_file_open_and_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_index: str
) -> None:
    """Segment.create opens the new .log, then preallocates its two indexes; when that fails
    (ENOSPC), what it opened is closed and what it created removed, on every attempt."""
    real_fallocate = os.posix_fallocate

    def no_space_for(path_suffix: str) -> Callable[[int, int, int], None]:
        def fallocate(fd: int, offset: int, length: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").endswith(path_suffix):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fallocate(fd, offset, length)

        return fallocate

    with PartitionLog.open(tmp_path, QUIET) as plog:
        plog.append(_batch(2), now_ms=0)
        with monkeypatch.context() as patch:
            patch.setattr(os, "posix_fallocate", no_space_for(failing_index))
            open_after: list[list[str]] = []
            files_after: list[list[str]] = []
            for _attempt in range(3):  # the first seals segment 0, then each fails the same
                with pytest.raises(DiskFullError, match="no space left on device rolling"):
                    plog.roll()
                open_after.append(_fds_under(tmp_path))
                files_after.append(sorted(p.name for p in tmp_path.iterdir()))
        assert open_after[0] == open_after[1] == open_after[2]
        assert not any(file_stem(2) in path for path in open_after[0])  # the new segment's
        assert files_after[0] == files_after[1] == files_after[2]
        assert not any(name.startswith(file_stem(2)) for name in files_after[0])
        plog.roll()  # space again: the sealed segment is rolled past
        assert plog.append(_batch(1), now_ms=1).base_offset == 2
        assert plog.segment_count == 2
    assert _fds_under(tmp_path) == []


def test_disk_full_after_a_short_write_cuts_the_partial_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwritev = os.pwritev

    def half(fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> int:
        data = b"".join(bytes(b) for b in buffers)
        return real_pwritev(fd, [data[: len(data) // 2]], offset)

    def no_space(*_args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with PartitionLog.open(tmp_path, QUIET) as plog:
        plog.append(_batch(2), now_ms=0)
        size = plog.size_bytes
        with monkeypatch.context() as patch:
            patch.setattr(os, "pwritev", half)
            patch.setattr(os, "pwrite", no_space)
            with pytest.raises(DiskFullError, match="no space left on device"):
                plog.append(_batch(3), now_ms=1)
        assert (plog.log_end_offset, plog.size_bytes) == (2, size)
        assert _log_files(tmp_path)[-1].stat().st_size == size
        assert plog.append(_batch(1), now_ms=2).base_offset == 2
        plog.abandon()
    with PartitionLog.open(tmp_path, QUIET) as plog:
        assert plog.truncations == []
        assert plog.log_end_offset == 3


def test_a_short_write_is_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwritev = os.pwritev
    short_writes: list[int] = []

    def short(fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> int:
        data = b"".join(bytes(b) for b in buffers)
        short_writes.append(len(data))
        return real_pwritev(fd, [data[: len(data) // 3]], offset)

    payload = _batch(2) + _batch(3, tag=b"y")
    with PartitionLog.open(tmp_path, QUIET) as plog:
        plog.append(_batch(1), now_ms=0)
        monkeypatch.setattr(os, "pwritev", short)
        assert plog.append(payload, now_ms=1) == AppendResult(1, 5, 1)
        monkeypatch.undo()
        assert short_writes == [len(payload)]
        expected = (
            _expected_records(_records(1), 0)
            + _expected_records(_records(2), 1)
            + _expected_records(_records(3, tag=b"y"), 3)
        )
        assert _all_records(plog) == expected
        plog.abandon()
    with PartitionLog.open(tmp_path, QUIET) as plog:
        assert plog.truncations == []
        assert _all_records(plog) == expected


# ---------------------------------------------------------------------------- fsync policy
@pytest.fixture
def fdatasync_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return calls


def test_fsync_always_syncs_every_append(tmp_path: Path, fdatasync_calls: list[int]) -> None:
    with PartitionLog.open(tmp_path, _config(fsync=FsyncPolicy.ALWAYS)) as plog:
        for i in range(5):
            plog.append(_batch(1), now_ms=i)
            assert len(fdatasync_calls) == i + 1


def test_fsync_interval_syncs_once_the_interval_has_passed(
    tmp_path: Path, fdatasync_calls: list[int]
) -> None:
    config = _config(fsync=FsyncPolicy.INTERVAL, fsync_interval_ms=100)
    with PartitionLog.open(tmp_path, config) as plog:
        synced: list[int] = []
        for now_ms in (0, 50, 99, 100, 150, 199):
            plog.append(_batch(1), now_ms=now_ms)
            synced.append(len(fdatasync_calls))
        assert synced == [0, 0, 0, 1, 1, 1]
        assert not plog.flush_if_due(now_ms=199)
        assert plog.flush_if_due(now_ms=200)
        assert len(fdatasync_calls) == 2
        assert not plog.flush_if_due(now_ms=10_000), "nothing appended since the last fsync"
        plog.append(_batch(1), now_ms=10_000)  # long after the last fsync: due at once
        plog.append(_batch(1), now_ms=10_050)
        assert len(fdatasync_calls) == 3
        assert not plog.flush_if_due(now_ms=10_099)
        assert plog.flush_if_due(now_ms=10_100)
        assert len(fdatasync_calls) == 4


def test_fsync_never_leaves_appends_to_the_os(tmp_path: Path, fdatasync_calls: list[int]) -> None:
    with PartitionLog.open(tmp_path, _config(fsync=FsyncPolicy.NEVER)) as plog:
        for i in range(10):
            plog.append(_batch(1), now_ms=i * 10_000)
        assert fdatasync_calls == []
        plog.flush()
        assert len(fdatasync_calls) == 1


# ---------------------------------------------------------------------------- threads
def test_concurrent_appends_get_unique_contiguous_offsets(tmp_path: Path) -> None:
    threads, batches_each = 4, 200
    config = _config(segment_bytes=4096, index_interval_bytes=256)
    barrier = threading.Barrier(threads)

    def producer(plog: PartitionLog, t: int) -> list[tuple[AppendResult, bytes]]:
        barrier.wait()
        out: list[tuple[AppendResult, bytes]] = []
        for n in range(batches_each):
            tag = b"t%d-%d:" % (t, n)
            result = plog.append(_batch(1 + n % 3, value_bytes=n % 50, tag=tag), now_ms=n)
            out.append((result, tag))
        return out

    with PartitionLog.open(tmp_path, config) as plog, ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(producer, plog, t) for t in range(threads)]
        results = [f.result() for f in futures]
        ranges = sorted((r.base_offset, r.last_offset) for rs in results for r, _tag in rs)
        assert ranges[0][0] == 0
        for (_b1, last), (base, _l2) in itertools.pairwise(ranges):
            assert base == last + 1
        assert plog.log_end_offset == ranges[-1][1] + 1
        assert plog.segment_count > 1
        for rs in results:
            offsets = [r.base_offset for r, _tag in rs]
            assert offsets == sorted(offsets), "one producer's appends stay in its order"
            for r, tag in rs:
                got = decode_records(plog.read(r.base_offset, 1))
                assert [x.offset for x in got] == list(range(r.base_offset, r.last_offset + 1))
                assert all(x.key is not None and x.key.startswith(tag) for x in got)


# ---------------------------------------------------------------------------- lifecycle
def test_a_closed_log_refuses_calls_and_close_is_idempotent(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path, QUIET)
    plog.append(_batch(1), now_ms=0)
    plog.close()
    plog.close()
    calls: list[Callable[[], object]] = [
        lambda: plog.append(_batch(1), now_ms=1),
        lambda: plog.read(0, 100),
        lambda: plog.offset_for_timestamp(0),
        plog.roll,
        lambda: plog.apply_retention(now_ms=1),
        plog.flush,
        lambda: plog.flush_if_due(now_ms=1),
    ]
    for call in calls:
        with pytest.raises(LogClosedError, match=re.escape(str(tmp_path))):
            call()


def test_recovered_is_set_only_after_an_unclean_shutdown(tmp_path: Path) -> None:
    with PartitionLog.open(tmp_path, QUIET) as plog:
        assert not plog.recovered
        plog.append(_batch(2), now_ms=0)
    plog = PartitionLog.open(tmp_path, QUIET)
    assert not plog.recovered
    plog.append(_batch(1), now_ms=1)
    plog.abandon()
    with pytest.raises(LogClosedError):
        plog.read(0, 100)
    plog = PartitionLog.open(tmp_path, QUIET)
    assert plog.recovered
    assert plog.log_end_offset == 3
    plog.close()
    with PartitionLog.open(tmp_path, QUIET) as plog:
        assert not plog.recovered
        assert plog.log_end_offset == 3


def test_one_append_is_bounded_in_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many batches in one append cannot push index positions past u32: the total is capped."""
    from storage import _log

    monkeypatch.setattr(_log, "APPEND_BYTES_MAX", 1000)
    plog = PartitionLog.open(tmp_path / "p", LogConfig())
    one = encode_batch([NewRecord(None, b"x" * 400, 1)])
    plog.append(one + one, 1)
    with pytest.raises(LimitExceededError, match=r"bytes in one append; the limit is 1000"):
        plog.append(one + one + one, 1)
    assert plog.log_end_offset == 2
    plog.close()
