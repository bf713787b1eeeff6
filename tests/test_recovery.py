"""Crash recovery of a PartitionLog: torn tails, bit flips, damaged or missing indexes,
orphan files, and a real `kill -9` of a process that is appending.

The promise under test: after any crash, reopening the log keeps every whole batch that
was written before the damage, cuts only the newest segment's bad tail (and says what it
cut), refuses to open -- touching nothing -- when a sealed segment is corrupt, and rebuilds
indexes (derived data) from the log, with reads unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from storage import (
    CorruptLogError,
    FsyncPolicy,
    LogConfig,
    NewRecord,
    PartitionLog,
    Record,
    Truncation,
    check_batch,
    decode_records,
    encode_batch,
    read_header,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLEAN_SHUTDOWN_FILE = ".clean-shutdown"
RECOVERY_POINT_FILE = "recovery-point"
# Small segments and a dense index so a few dozen batches make several segments, each with
# several index entries; small preallocated index files keep the directories tiny.
SEGMENT_BYTES = 2048
CONFIG = LogConfig(
    segment_bytes=SEGMENT_BYTES,
    segment_ms=None,
    retention_ms=None,
    index_interval_bytes=256,
    index_bytes_max=4096,
)
# Batches written by `_fill`: four sealed segments and an active one of 11 batches.
BATCHES = 64
NOW_MS = 1_700_000_000_000
# Offsets of batch fields, from the RecordBatch v2 header layout in storage/_batch.py.
BASE_OFFSET_AT = 0
BATCH_LENGTH_AT = 8
MAGIC_AT = 16
CRC_AT = 17
RECORDS_AT = 61  # first byte of the records section (HEADER_BYTES)


# ---------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class Expected:
    """What a test wrote: value and timestamp of every acknowledged offset."""

    values: dict[int, tuple[bytes, int]]

    def check(self, log: PartitionLog, end_offset: int) -> None:
        """Every offset below `end_offset` reads back, alone, with what was written."""
        assert log.log_end_offset == end_offset
        for offset in range(log.log_start_offset, end_offset):
            records = [r for r in decode_records(log.read(offset, 1)) if r.offset == offset]
            assert len(records) == 1, f"offset {offset} not in the batch read for it"
            assert (records[0].value, records[0].timestamp_ms) == self.values[offset]
        assert log.read(end_offset, 1 << 20) == b""


def _records(batch_index: int) -> list[NewRecord]:
    """Batch i: 1-3 records of varying size; timestamps rise with a little disorder."""
    count = 1 + batch_index % 3
    return [
        NewRecord(
            f"k{batch_index}".encode(),
            f"value-{batch_index}-{j}|".encode() * (1 + (batch_index * 7 + j) % 5),
            NOW_MS + 10 * batch_index + (3 * j) % 7,
            (("h", f"{batch_index}".encode()),) if j == 0 else (),
        )
        for j in range(count)
    ]


def _fill(log: PartitionLog, batches: int, first: int = 0) -> Expected:
    values: dict[int, tuple[bytes, int]] = {}
    for i in range(first, first + batches):
        records = _records(i)
        result = log.append(encode_batch(records), NOW_MS + i)
        assert result.last_offset - result.base_offset == len(records) - 1
        for j, record in enumerate(records):
            assert record.value is not None
            values[result.base_offset + j] = (record.value, record.timestamp_ms)
    return Expected(values)


def _logs(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(directory.glob("*.log"))


@dataclass(frozen=True)
class BatchAt:
    position: int
    base_offset: int
    size: int
    record_count: int

    @property
    def end(self) -> int:
        return self.position + self.size

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.record_count


def _batches(path: pathlib.Path) -> list[BatchAt]:
    """The batches of a whole .log file, by walking their headers."""
    data = path.read_bytes()
    out: list[BatchAt] = []
    pos = 0
    while pos < len(data):
        header = read_header(data, pos)
        out.append(BatchAt(pos, header.base_offset, header.size, header.record_count))
        pos += header.size
    assert pos == len(data)
    return out


def _snapshot(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _flip_bit(path: pathlib.Path, position: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))


def _read_all(log: PartitionLog) -> dict[int, Record]:
    """Every record of the log, by offset, read front to back as a consumer would."""
    out: dict[int, Record] = {}
    offset = log.log_start_offset
    for _ in range(log.log_end_offset - offset):  # each read moves at least one offset on
        if offset == log.log_end_offset:
            break
        for record in decode_records(log.read(offset, 1 << 20)):
            out[record.offset] = record
        offset = max(out) + 1
    return out


def _storage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "riverlog.storage" and r.levelno == logging.WARNING
    ]


@pytest.fixture
def crashed(tmp_path: pathlib.Path) -> tuple[pathlib.Path, Expected]:
    """A log of several segments left as a crash leaves it (no flush, no clean marker)."""
    directory = tmp_path / "crashed"
    log = PartitionLog.open(directory, CONFIG)
    expected = _fill(log, BATCHES)
    assert log.segment_count >= 4
    log.abandon()
    return directory, expected


@pytest.fixture
def closed(tmp_path: pathlib.Path) -> tuple[pathlib.Path, Expected]:
    """A log of several segments closed cleanly."""
    directory = tmp_path / "closed"
    log = PartitionLog.open(directory, CONFIG)
    expected = _fill(log, BATCHES)
    assert log.segment_count >= 4
    log.close()
    return directory, expected


# ---------------------------------------------------------------------------- torn tails
def _intact_prefix(batches: list[BatchAt], original: bytes, damaged: bytes) -> list[BatchAt]:
    """The leading batches whose bytes are all as written (a zero that lands on a zero
    byte changes nothing)."""
    whole: list[BatchAt] = []
    for batch in batches:
        if damaged[batch.position : batch.end] != original[batch.position : batch.end]:
            break
        whole.append(batch)
    return whole


def _cut_points(batches: list[BatchAt], file_bytes: int) -> list[tuple[int, int]]:
    """(cut position, zero bytes appended after it): every batch boundary, points inside
    each header field and inside the records, each also with a zero-filled tail as a file
    system that extended the file but never wrote the data leaves it."""
    cuts: set[int] = {0, file_bytes}
    for batch in batches:
        cuts.add(batch.position)
        for inside in (1, BATCH_LENGTH_AT + 2, MAGIC_AT, CRC_AT + 2, RECORDS_AT - 1):
            cuts.add(batch.position + inside)
        cuts.add(batch.position + RECORDS_AT + (batch.size - RECORDS_AT) // 2)
        cuts.add(batch.end - 1)
    rng = random.Random(20240601)
    points = [(cut, 0) for cut in sorted(cuts)]
    boundaries = [b.position for b in batches] + [file_bytes]
    zero_cuts = sorted(rng.sample(sorted(cuts), 12)) + boundaries[-2:]
    points += [(cut, rng.choice([1, 8, 61, 4096 - cut % 4096])) for cut in zero_cuts]
    return points


def test_torn_tail_keeps_exactly_the_whole_batches_before_the_cut(
    crashed: tuple[pathlib.Path, Expected],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    template, expected = crashed
    newest = _logs(template)[-1]
    batches = _batches(newest)
    assert len(batches) >= 8
    original = newest.read_bytes()
    file_bytes = len(original)
    points = _cut_points(batches, file_bytes)
    assert len(points) >= 50
    caplog.set_level(logging.WARNING, logger="riverlog.storage")
    for case, (cut, zeros) in enumerate(points):
        directory = tmp_path / f"cut-{case}"
        shutil.copytree(template, directory)
        path = directory / newest.name
        with open(path, "r+b") as f:
            f.truncate(cut)
            f.seek(cut)
            f.write(b"\x00" * zeros)
        damaged = original[:cut] + b"\x00" * zeros
        whole = _intact_prefix(batches, original, damaged)
        kept_bytes = whole[-1].end if whole else 0
        end_offset = whole[-1].next_offset if whole else batches[0].base_offset
        where = f"cut at byte {cut} + {zeros} zero bytes"
        caplog.clear()

        log = PartitionLog.open(directory, CONFIG)
        assert log.recovered, where
        if kept_bytes == cut + zeros:
            assert log.truncations == [], where
            assert _storage_warnings(caplog) == [], where
        else:
            [cut_report] = log.truncations
            assert cut_report == Truncation(
                str(path), kept_bytes, cut + zeros - kept_bytes, end_offset, cut_report.reason
            ), where
            assert cut_report.reason, where
            [warning] = _storage_warnings(caplog)
            assert str(path) in warning, where
            assert f"byte {kept_bytes}" in warning, where
            assert f"offsets from {end_offset}" in warning, where
        assert path.stat().st_size == kept_bytes, where
        expected.check(log, end_offset)
        result = log.append(encode_batch(_records(999)), NOW_MS)
        assert result.base_offset == end_offset, where
        assert decode_records(log.read(end_offset, 1))[0].offset == end_offset, where
        log.close()


# ---------------------------------------------------------------------------- bit flips
# Where in a batch a flipped bit lands, and how recovery notices: the CRC covers bytes from
# the attributes on; baseOffset is outside it but must continue the previous batch's offsets.
FLIP_SITES = {
    "records": RECORDS_AT + 5,
    "crc": CRC_AT + 1,
    "magic": MAGIC_AT,
    "batch-length": BATCH_LENGTH_AT + 3,
    "base-offset": BASE_OFFSET_AT + 7,
}


@pytest.mark.parametrize("site", FLIP_SITES)
def test_bit_flip_in_the_last_batch_of_the_active_segment_cuts_that_batch(
    crashed: tuple[pathlib.Path, Expected], site: str
) -> None:
    directory, expected = crashed
    newest = _logs(directory)[-1]
    batches = _batches(newest)
    last = batches[-1]
    _flip_bit(newest, last.position + FLIP_SITES[site])

    log = PartitionLog.open(directory, CONFIG)
    [cut] = log.truncations
    assert (cut.path, cut.position, cut.first_offset_dropped) == (
        str(newest),
        last.position,
        last.base_offset,
    )
    assert cut.bytes_dropped == last.size
    expected.check(log, last.base_offset)
    log.close()


@pytest.mark.parametrize("site", FLIP_SITES)
def test_bit_flip_mid_active_segment_cuts_from_that_batch_on_kafkas_rule(
    crashed: tuple[pathlib.Path, Expected], site: str
) -> None:
    """Kafka's rule for the newest segment: recovery cannot tell mid-file damage from a torn
    write, and offsets must stay contiguous, so everything from the first bad batch is cut,
    the valid batches after it included. Only the newest segment is treated this way."""
    directory, expected = crashed
    newest = _logs(directory)[-1]
    batches = _batches(newest)
    bad = batches[len(batches) // 2]
    assert bad is not batches[-1]
    _flip_bit(newest, bad.position + FLIP_SITES[site])

    log = PartitionLog.open(directory, CONFIG)
    assert log.truncations == [
        Truncation(
            str(newest),
            bad.position,
            batches[-1].end - bad.position,
            bad.base_offset,
            log.truncations[0].reason,
        )
    ]
    expected.check(log, bad.base_offset)
    assert newest.stat().st_size == bad.position
    log.close()


@pytest.mark.parametrize("checkpoint", ["deleted", "garbage", "past-it"])
@pytest.mark.parametrize("segment", [0, 1])
def test_bit_flip_in_a_sealed_segment_refuses_to_open_and_touches_nothing(
    crashed: tuple[pathlib.Path, Expected], segment: int, checkpoint: str
) -> None:
    """A sealed segment known to be on disk (below the recovery point), or with no readable
    checkpoint to say otherwise, holds no torn write: a bad batch there is damage, and
    cutting it would drop acknowledged records and everything after, so the log refuses to
    open and says where."""
    directory, _expected = crashed
    sealed = _logs(directory)[segment]
    if checkpoint == "deleted":
        (directory / RECOVERY_POINT_FILE).unlink()
    elif checkpoint == "garbage":
        (directory / RECOVERY_POINT_FILE).write_bytes(b"\x00\xffnot an offset")
    else:  # the checkpoint says this segment is durable; a damaged index forces its scan
        (directory / RECOVERY_POINT_FILE).write_text(f"{int(_logs(directory)[-1].stem)}\n")
        sealed.with_suffix(".index").unlink()
    bad = _batches(sealed)[2]
    _flip_bit(sealed, bad.position + RECORDS_AT + 3, bit=6)
    before = _snapshot(directory)

    for _attempt in range(2):  # refusing is repeatable: nothing was cut the first time
        with pytest.raises(CorruptLogError) as raised:
            PartitionLog.open(directory, CONFIG)
        assert raised.value.path == str(sealed)
        assert raised.value.position == bad.position
        assert f"{sealed}: corrupt batch at byte {bad.position}: " in str(raised.value)
        assert "CRC32C" in raised.value.reason
        assert _snapshot(directory) == before


@pytest.mark.parametrize("segment", [0, 1])
def test_bad_batch_in_a_sealed_segment_past_the_recovery_point_is_a_torn_tail(
    crashed: tuple[pathlib.Path, Expected], segment: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A sealed segment at or past the recovery point may not have reached the disk (its
    fsync runs behind the roll), so after a power loss a bad batch there is a torn write, as
    in Kafka: the log is cut at that batch, later segments are deleted, and the cut is logged
    with the file, byte position, bytes and first offset dropped."""
    directory, expected = crashed
    logs = _logs(directory)
    sealed = logs[segment]
    (directory / RECOVERY_POINT_FILE).write_text(f"{int(sealed.stem)}\n")
    bad = _batches(sealed)[2]
    _flip_bit(sealed, bad.position + RECORDS_AT + 3, bit=6)
    later_bytes = sum(p.stat().st_size for p in logs[segment + 1 :])
    size_before = sealed.stat().st_size
    caplog.set_level(logging.WARNING, logger="riverlog.storage")

    log = PartitionLog.open(directory, CONFIG)
    assert len(log.truncations) == 1
    cut = log.truncations[0]
    assert (cut.path, cut.position, cut.first_offset_dropped) == (
        str(sealed),
        bad.position,
        bad.base_offset,
    )
    assert cut.bytes_dropped == size_before - bad.position + later_bytes
    assert sealed.stat().st_size == bad.position
    assert f"deleted {len(logs) - segment - 1} later segment(s)" in cut.reason
    assert _logs(directory) == logs[: segment + 1]
    assert any(str(sealed) in r.getMessage() for r in caplog.records)
    Expected({o: v for o, v in expected.values.items() if o < bad.base_offset}).check(
        log, bad.base_offset
    )
    assert log.append(encode_batch(_records(1)), NOW_MS).base_offset == bad.base_offset
    log.close()


# ---------------------------------------------------------------------------- indexes
def _rewrite_entries(
    path: pathlib.Path, entry: str, change: Callable[[tuple[int, int]], tuple[int, int]]
) -> None:
    layout = struct.Struct(entry)
    data = path.read_bytes()
    assert data
    assert len(data) % layout.size == 0
    entries = [layout.unpack_from(data, at) for at in range(0, len(data), layout.size)]
    path.write_bytes(b"".join(layout.pack(*change(e)) for e in entries))


def _damage(path: pathlib.Path, how: str, log_bytes: int, relative_end: int) -> None:
    timeindex = path.suffix == ".timeindex"
    if how == "deleted":
        path.unlink()
    elif how == "garbage":
        size = path.stat().st_size
        path.write_bytes(random.Random(7).randbytes(size))
    elif how == "torn":  # a partial last entry
        os.truncate(path, path.stat().st_size - 5)
    elif how == "past-the-log" and timeindex:
        _rewrite_entries(path, ">qI", lambda e: (e[0], e[1] + relative_end + 1))
    elif how == "past-the-log":
        _rewrite_entries(path, ">II", lambda e: (e[0], e[1] + log_bytes))
    elif how == "mid-batch":  # in bounds and increasing, but not at a batch start
        _rewrite_entries(path, ">II", lambda e: (e[0], e[1] + 1))
    else:
        raise AssertionError(how)


def _observe(log: PartitionLog) -> tuple[list[bytes], list[int | None]]:
    """What a reader sees: each offset's read, and offset_for_timestamp across the range."""
    reads = [log.read(o, 1) for o in range(log.log_start_offset, log.log_end_offset)]
    reads += [log.read(log.log_start_offset, 3000)]
    first_ts = NOW_MS - 5
    last_ts = NOW_MS + 10 * BATCHES + 10
    return reads, [log.offset_for_timestamp(ts) for ts in range(first_ts, last_ts, 3)]


INDEX_DAMAGE = [
    (".index", "deleted"),
    (".index", "garbage"),
    (".index", "torn"),
    (".index", "past-the-log"),
    (".index", "mid-batch"),
    (".timeindex", "deleted"),
    (".timeindex", "garbage"),
    (".timeindex", "torn"),
    (".timeindex", "past-the-log"),
]


@pytest.mark.parametrize(("suffix", "how"), INDEX_DAMAGE)
def test_damaged_index_of_a_sealed_segment_is_rebuilt_on_clean_open(
    tmp_path: pathlib.Path, suffix: str, how: str
) -> None:
    directory = tmp_path / "log"
    log = PartitionLog.open(directory, CONFIG)
    _fill(log, BATCHES)
    seen = _observe(log)
    log.close()
    before = _snapshot(directory)
    sealed = _logs(directory)[1]
    next_base = int(_logs(directory)[2].stem)
    index = sealed.with_suffix(suffix)
    assert index.stat().st_size > 0
    _damage(index, how, sealed.stat().st_size, next_base - int(sealed.stem))

    log = PartitionLog.open(directory, CONFIG)
    assert (log.recovered, log.truncations) == (False, [])
    assert _observe(log) == seen
    # Rebuilt, not just worked around: the file is what the appends had written.
    assert index.read_bytes() == before[index.name]
    log.close()
    assert _snapshot(directory) == before


@pytest.mark.parametrize("suffix", [".index", ".timeindex"])
def test_deleted_index_of_the_active_segment_is_rebuilt_on_clean_open(
    tmp_path: pathlib.Path, suffix: str
) -> None:
    directory = tmp_path / "log"
    log = PartitionLog.open(directory, CONFIG)
    expected = _fill(log, BATCHES)
    seen = _observe(log)
    end_offset = log.log_end_offset
    log.close()
    before = _snapshot(directory)
    index = _logs(directory)[-1].with_suffix(suffix)
    assert index.stat().st_size > 0
    index.unlink()

    log = PartitionLog.open(directory, CONFIG)
    assert _observe(log) == seen
    log.close()
    assert _snapshot(directory) == before
    log = PartitionLog.open(directory, CONFIG)
    expected.check(log, end_offset)
    log.close()


# ---------------------------------------------------------------------------- clean and crash
def test_clean_close_skips_recovery_and_a_later_crash_loses_nothing(
    closed: tuple[pathlib.Path, Expected],
) -> None:
    """fsync `never`: a process crash loses nothing, the bytes are in the OS page cache."""
    directory, expected = closed
    assert (directory / CLEAN_SHUTDOWN_FILE).exists()
    end_offset = max(expected.values) + 1

    log = PartitionLog.open(directory, CONFIG)
    assert (log.recovered, log.truncations) == (False, [])
    assert not (directory / CLEAN_SHUTDOWN_FILE).exists()  # a crash from here is not clean
    expected.check(log, end_offset)
    more = _fill(log, 20, first=BATCHES)
    assert min(more.values) == end_offset
    end_offset = max(more.values) + 1
    log.abandon()

    log = PartitionLog.open(directory, CONFIG)
    assert (log.recovered, log.truncations) == (True, [])
    Expected(expected.values | more.values).check(log, end_offset)
    log.close()


@pytest.mark.parametrize("checkpoint", ["kept", "deleted", "garbage"])
def test_recovery_of_an_undamaged_log_cuts_nothing(
    crashed: tuple[pathlib.Path, Expected],
    checkpoint: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory, expected = crashed
    end_offset = max(expected.values) + 1
    if checkpoint == "deleted":  # every segment is scanned
        (directory / RECOVERY_POINT_FILE).unlink()
    elif checkpoint == "garbage":
        (directory / RECOVERY_POINT_FILE).write_bytes(b"\x00\xffnot an offset")
    logs_before = {p.name: p.read_bytes() for p in _logs(directory)}
    caplog.set_level(logging.WARNING, logger="riverlog.storage")

    log = PartitionLog.open(directory, CONFIG)
    assert (log.recovered, log.truncations) == (True, [])
    assert _storage_warnings(caplog) == []
    expected.check(log, end_offset)
    assert {p.name: p.read_bytes() for p in _logs(directory)} == logs_before
    result = log.append(encode_batch(_records(BATCHES)), NOW_MS)
    assert result.base_offset == end_offset
    log.close()


@pytest.mark.parametrize("shutdown", ["clean", "crash"])
def test_orphan_indexes_of_a_deleted_segment_are_removed_on_open(
    tmp_path: pathlib.Path, shutdown: str
) -> None:
    """Retention unlinks a segment's .log first; a crash right after leaves its indexes."""
    directory = tmp_path / "log"
    log = PartitionLog.open(directory, CONFIG)
    expected = _fill(log, BATCHES)
    end_offset = log.log_end_offset
    if shutdown == "clean":
        log.close()
    else:
        log.abandon()
    oldest, second = _logs(directory)[:2]
    assert oldest.with_suffix(".indexsum").exists()
    oldest.unlink()

    log = PartitionLog.open(directory, CONFIG)
    assert not oldest.with_suffix(".index").exists()
    assert not oldest.with_suffix(".timeindex").exists()
    assert not oldest.with_suffix(".indexsum").exists()
    assert log.log_start_offset == int(second.stem)
    expected.check(log, end_offset)
    log.close()


# ---------------------------------------------------------------------------- known on disk
# Segments known to be on disk (after a clean close, or below the recovery point) are opened
# without a scan. Their batches are checked by the reads that return them; their indexes are
# vouched for by the .indexsum sidecar; their size too.
@pytest.mark.parametrize("shutdown", ["clean", "below-recovery-point"])
def test_bad_batch_in_a_segment_opened_without_a_scan_is_never_served(
    tmp_path: pathlib.Path, shutdown: str
) -> None:
    directory = tmp_path / "log"
    log = PartitionLog.open(directory, CONFIG)
    expected = _fill(log, BATCHES)
    end_offset = log.log_end_offset
    if shutdown == "clean":
        log.close()
    else:
        log.abandon()
    sealed = _logs(directory)[1]
    batches = _batches(sealed)
    bad = batches[2]  # before the last index entry: the open reads no byte of it
    _flip_bit(sealed, bad.position + RECORDS_AT + 3, bit=6)
    before = _snapshot(directory)

    log = PartitionLog.open(directory, CONFIG)
    assert log.truncations == []
    assert log.log_end_offset == end_offset
    # A read from before the damage makes progress: the good batches before it.
    data = log.read(batches[0].base_offset, 1 << 20)
    assert [r.offset for r in decode_records(data)] == list(
        range(batches[0].base_offset, bad.base_offset)
    )
    # The bad batch itself is refused, naming the file and byte, every time.
    for offset in (bad.base_offset, bad.next_offset - 1, bad.base_offset):
        with pytest.raises(CorruptLogError) as raised:
            log.read(offset, 1)
        assert (raised.value.path, raised.value.position) == (str(sealed), bad.position)
        assert "CRC32C" in raised.value.reason
    timestamp = expected.values[bad.base_offset][1]
    with pytest.raises(CorruptLogError) as raised:
        log.offset_for_timestamp(timestamp)
    assert (raised.value.path, raised.value.position) == (str(sealed), bad.position)
    # Everything else reads back as written.
    for offset in range(log.log_start_offset, end_offset):
        if bad.base_offset <= offset < bad.next_offset:
            continue
        [record] = [r for r in decode_records(log.read(offset, 1)) if r.offset == offset]
        assert (record.value, record.timestamp_ms) == expected.values[offset]
    log.abandon()
    assert {p.name: p.read_bytes() for p in _logs(directory)} == {
        name: data for name, data in before.items() if name.endswith(".log")
    }


def test_reads_check_each_batch_once_and_never_what_this_process_appended(
    closed: tuple[pathlib.Path, Expected], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, expected = closed
    checked: list[int] = []

    def counting(buf: bytes, pos: int = 0, end: int | None = None) -> object:
        checked.append(pos)
        return check_batch(buf, pos, end)

    monkeypatch.setattr("storage._segment.check_batch", counting)
    batch_count = sum(len(_batches(p)) for p in _logs(directory))
    log = PartitionLog.open(directory, CONFIG)
    assert (log.recovered, checked) == (False, [])  # the open read no batch
    assert _read_all(log) == _read_all(log)  # front to back, twice
    assert len(checked) == batch_count  # each batch once, on the first pass
    checked.clear()
    more = _fill(log, 20, first=BATCHES)
    assert (_read_all(log).keys() - expected.values.keys()) == more.values.keys()
    assert checked == []  # appended here: PartitionLog.check validated it already
    log.close()


@pytest.mark.parametrize("how", ["boundary", "mid-batch", "zero-tail"])
@pytest.mark.parametrize("segment", ["newest", "sealed"])
def test_cut_short_segment_after_a_clean_close_refuses_to_open_naming_the_file(
    closed: tuple[pathlib.Path, Expected], how: str, segment: str
) -> None:
    """A clean close vouches for every segment's size (its .indexsum): a .log that lost whole
    batches since cannot be told from a whole one by any batch check, and is refused; so is
    one with a bad tail. Never cut silently, never cut at all: acknowledged records."""
    directory, _expected = closed
    path = _logs(directory)[-1 if segment == "newest" else 1]
    batches = _batches(path)
    last = batches[-1]
    if how == "boundary":  # the last batch is gone, whole
        os.truncate(path, last.position)
        position = last.position
    elif how == "mid-batch":
        os.truncate(path, last.position + RECORDS_AT + 2)
        position = last.position
    else:
        with open(path, "ab") as f:
            f.write(b"\x00" * 100)
        position = last.end
    before = _snapshot(directory)

    for _attempt in range(2):
        with pytest.raises(CorruptLogError) as raised:
            PartitionLog.open(directory, CONFIG)
        assert (raised.value.path, raised.value.position) == (str(path), position)
        assert f"{path}: corrupt batch at byte {position}" in str(raised.value)
        assert _snapshot(directory) == before


def _flip_plausibly(path: pathlib.Path) -> None:
    """Flip the lowest bit of entry 1's last field (an .index position, a .timeindex
    relative offset): the index stays in order and in bounds, so only its checksum tells."""
    entry = 8 if path.suffix == ".index" else 12
    _flip_bit(path, 2 * entry - 1, bit=0)


@pytest.mark.parametrize("suffix", [".index", ".timeindex"])
@pytest.mark.parametrize("segment", [0, -1])
def test_plausible_index_damage_is_caught_by_the_checksum_and_rebuilt(
    tmp_path: pathlib.Path, suffix: str, segment: int, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "log"
    log = PartitionLog.open(directory, CONFIG)
    _fill(log, BATCHES)
    seen = _observe(log)
    log.close()
    before = _snapshot(directory)
    index = _logs(directory)[segment].with_suffix(suffix)
    assert index.stat().st_size >= 24
    _flip_plausibly(index)
    caplog.set_level(logging.WARNING, logger="riverlog.storage")

    log = PartitionLog.open(directory, CONFIG)
    assert (log.recovered, log.truncations) == (False, [])
    [warning] = _storage_warnings(caplog)
    assert f"rebuilding the indexes of {index.with_suffix('.log')}" in warning
    assert _observe(log) == seen
    log.close()
    assert _snapshot(directory) == before  # rebuilt byte for byte, sidecar included


@pytest.mark.parametrize("damage", ["deleted", "flipped", "torn"])
def test_missing_or_damaged_index_checksums_rebuild_once_and_lose_nothing(
    closed: tuple[pathlib.Path, Expected], damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A data directory written before the sidecars existed opens (its indexes are rebuilt
    once, with a scan); so does one whose sidecars are damaged: they vouch for the indexes,
    they are not the data."""
    directory, expected = closed
    end_offset = max(expected.values) + 1
    before = _snapshot(directory)
    sums = sorted(directory.glob("*.indexsum"))
    assert [p.stem for p in sums] == [p.stem for p in _logs(directory)]
    for path in sums:
        if damage == "deleted":
            path.unlink()
        elif damage == "flipped":
            _flip_bit(path, 10)
        else:
            os.truncate(path, 20)

    caplog.set_level(logging.INFO, logger="riverlog.storage")
    log = PartitionLog.open(directory, CONFIG)
    rebuilt = [r for r in caplog.records if "rebuilding the indexes" in r.getMessage()]
    assert len(rebuilt) == len(sums)
    assert {r.levelno for r in rebuilt} == {
        logging.INFO if damage == "deleted" else logging.WARNING
    }
    expected.check(log, end_offset)
    log.close()
    assert _snapshot(directory) == before
    caplog.clear()
    log = PartitionLog.open(directory, CONFIG)  # once: the sidecars are back
    assert not [r for r in caplog.records if "rebuilding the indexes" in r.getMessage()]
    log.close()


def test_retention_and_recovery_cuts_remove_index_checksums_with_their_segment(
    crashed: tuple[pathlib.Path, Expected],
) -> None:
    directory, _expected = crashed
    logs = _logs(directory)
    # A cut in segment 1 (past the recovery point) deletes the segments after it, whole.
    (directory / RECOVERY_POINT_FILE).write_text(f"{int(logs[1].stem)}\n")
    _flip_bit(logs[1], _batches(logs[1])[1].position + RECORDS_AT)
    log = PartitionLog.open(directory, CONFIG)
    assert len(log.truncations) == 1
    stems = {p.stem for p in _logs(directory)}
    assert stems == {logs[0].stem, logs[1].stem}
    assert {p.stem for p in directory.glob("*.indexsum")} <= stems
    _fill(log, BATCHES)
    log.roll()
    assert log.delete_before(log.log_end_offset) >= 3
    log.close()
    assert {p.stem for p in directory.glob("*.indexsum")} == {p.stem for p in _logs(directory)}


# ---------------------------------------------------------------------------- kill -9
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from storage import LogConfig, NewRecord, PartitionLog, encode_batch

    directory, config = sys.argv[1], LogConfig().with_overrides(json.loads(sys.argv[2]))
    log = PartitionLog.open(directory, config)
    deadline = time.monotonic() + {seconds}
    for i in range({batches}):
        if time.monotonic() > deadline:
            break
        tag = f"v{{i}}"
        records = [NewRecord(None, f"{{tag}}-{{j}}".encode() * (1 + i % 4), i, ())
                   for j in range(1 + i % 3)]
        result = log.append(encode_batch(records), i)
        sys.stdout.write(f"{{result.base_offset}} {{result.last_offset}} {{tag}}\\n")
        sys.stdout.flush()
    """
)
# The child's log: small segments, so the kill can land in a roll as well as an append.
KILL_CONFIG = LogConfig(
    segment_bytes=4096,
    segment_ms=None,
    retention_ms=None,
    index_interval_bytes=512,
    index_bytes_max=4096,
)
CHILD_BATCHES_MAX = 20_000
CHILD_SECONDS_MAX = 10
ACKS_BEFORE_KILL = 300
ACK_WAIT_SECONDS_MAX = 15


def _parse_acks(data: bytes) -> list[tuple[int, int, str]]:
    """Complete "base last tag" lines; a line cut short by the kill is not an ack."""
    lines = data.split(b"\n")[:-1]
    out = []
    for line in lines:
        base, last, tag = line.decode().split()
        out.append((int(base), int(last), tag))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("policy", [FsyncPolicy.ALWAYS, FsyncPolicy.NEVER])
def test_kill_9_while_appending_loses_no_acknowledged_record(
    tmp_path: pathlib.Path, policy: FsyncPolicy
) -> None:
    directory = tmp_path / "log"
    config = dataclasses.replace(KILL_CONFIG, fsync=policy)
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(seconds=CHILD_SECONDS_MAX, batches=CHILD_BATCHES_MAX))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(directory), json.dumps(config.to_dict())],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    output = b""
    try:
        deadline = time.monotonic() + ACK_WAIT_SECONDS_MAX
        while output.count(b"\n") < ACKS_BEFORE_KILL and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break  # the child exited
                output += chunk
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL, proc.stderr.read().decode()
        output += proc.stdout.read()  # acks written before the kill, still in the pipe
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    acks = _parse_acks(output)
    assert len(acks) >= ACKS_BEFORE_KILL

    log = PartitionLog.open(directory, config)
    assert log.recovered
    assert log.log_end_offset > acks[-1][1]
    records = _read_all(log)
    for base, last, tag in acks:
        i = int(tag[1:])
        for j, offset in enumerate(range(base, last + 1)):
            value = records[offset].value
            assert value == f"{tag}-{j}".encode() * (1 + i % 4), f"offset {offset} ({tag})"
    log.close()
