"""The share-group state store (`__share_group_state`).

What the share manager relies on: what it wrote is there after a reopen, a snapshot replaces
a share-partition's deltas, deletes survive reopens and crashes, a durable write survives a
power loss (and a non-durable one once flushed), the log under the store stays bounded, a
damaged snapshot or record refuses to open instead of losing state, and limits and bad names
are refused with their numbers. A state machine checks the store against a plain dict across
writes, deletes, reopens and crashes.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from storage import (
    Catalog,
    InvalidConfigError,
    InvalidNameError,
    LimitExceededError,
    LogClosedError,
    LogConfig,
    NewRecord,
    PartitionLog,
    StorageError,
    crc32c,
    decode_records,
    encode_batch,
    validate_topic_name,
)
from stream.share import _state
from stream.share._state import (
    SHARE_STATE_LOG_CONFIG,
    SHARE_STATE_LOG_DIR_NAME,
    SNAPSHOT_FILE_NAME,
    ShareGroupState,
    SharePartitionRecords,
    ShareStateStore,
    StateEntry,
    StateKind,
)

NOW_MS = 1_700_000_000_000
# Tiny segments, so that a few dozen writes cross several segment rolls.
SMALL = dataclasses.replace(SHARE_STATE_LOG_CONFIG, segment_bytes=1024)
SNAP, DELTA = StateKind.SNAPSHOT, StateKind.DELTA

Everything = dict[str, ShareGroupState]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ShareStateStore]:
    s = ShareStateStore.open(tmp_path, NOW_MS)
    yield s
    s.close()


def _reopen(
    store: ShareStateStore, data_dir: Path, config: LogConfig | None = None
) -> ShareStateStore:
    store.close()
    return ShareStateStore.open(data_dir, NOW_MS, config)


def _crash_reopen(
    store: ShareStateStore, data_dir: Path, config: LogConfig | None = None
) -> ShareStateStore:
    """Drop the store as a killed process would: no flush, no clean-shutdown marker (the OS
    page cache survives, so non-durable writes do too)."""
    store._log.abandon()
    return ShareStateStore.open(data_dir, NOW_MS, config)


def _e(group: str, tp: tuple[str, int], kind: StateKind, value: bytes) -> StateEntry:
    return StateEntry(group, tp[0], tp[1], kind, value)


def _state_of(
    config: bytes | None, **partitions: tuple[bytes | None, list[bytes]]
) -> ShareGroupState:
    """ShareGroupState with share-partitions named "topic_partition"."""
    out = ShareGroupState(config, {})
    for name, (snapshot, deltas) in partitions.items():
        topic, partition = name.rsplit("_", 1)
        out.partitions[(topic, int(partition))] = SharePartitionRecords(snapshot, deltas)
    return out


# ---------------------------------------------------------------------------- round trips
def test_write_then_load(store: ShareStateStore) -> None:
    store.write_config("g", b'{"lock_ms":1000}', NOW_MS)
    store.write(
        [
            _e("g", ("t", 0), SNAP, b"s0"),
            _e("g", ("t", 0), DELTA, b"d1"),
            _e("h", ("u", 3), DELTA, b"x"),
        ],
        durable=True,
        now_ms=NOW_MS,
    )
    assert store.load() == {
        "g": _state_of(b'{"lock_ms":1000}', t_0=(b"s0", [b"d1"])),
        "h": _state_of(None, u_3=(None, [b"x"])),
    }
    assert store.groups() == ["g", "h"]
    assert store.deltas_count("g", "t", 0) == 1
    assert store.deltas_count("g", "t", 1) == 0
    assert store.deltas_count("nobody", "t", 0) == 0


def test_load_is_a_copy(store: ShareStateStore) -> None:
    store.write([_e("g", ("t", 0), DELTA, b"a")], durable=False, now_ms=NOW_MS)
    copy = store.load()
    copy["g"].partitions[("t", 0)].deltas.append(b"not written")
    copy["g"].config = b"nor this"
    assert store.load() == {"g": _state_of(None, t_0=(None, [b"a"]))}


def test_reopen_keeps_everything(store: ShareStateStore, tmp_path: Path) -> None:
    store.write_config("g", b"cfg", NOW_MS)
    store.write_config("g", b"cfg2", NOW_MS)  # replaces
    store.write([_e("g", ("t", 1), SNAP, b"")], durable=False, now_ms=NOW_MS)  # empty is a value
    for i in range(5):
        store.write([_e("g", ("t", 1), DELTA, bytes([i]) * i)], durable=i % 2 == 0, now_ms=NOW_MS)
    before = store.load()
    assert before == {"g": _state_of(b"cfg2", t_1=(b"", [bytes([i]) * i for i in range(5)]))}
    store = _reopen(store, tmp_path)
    try:
        assert store.load() == before
    finally:
        store.close()


def test_a_snapshot_replaces_the_deltas(store: ShareStateStore, tmp_path: Path) -> None:
    for i in range(3):
        store.write([_e("g", ("t", 0), DELTA, b"d%d" % i)], durable=False, now_ms=NOW_MS)
    assert store.deltas_count("g", "t", 0) == 3
    store.write([_e("g", ("t", 0), SNAP, b"whole")], durable=True, now_ms=NOW_MS)
    assert store.deltas_count("g", "t", 0) == 0
    store.write([_e("g", ("t", 0), DELTA, b"after")], durable=True, now_ms=NOW_MS)
    expected = {"g": _state_of(None, t_0=(b"whole", [b"after"]))}
    assert store.load() == expected
    store = _reopen(store, tmp_path)
    try:
        assert store.load() == expected
        assert store.deltas_count("g", "t", 0) == 1
    finally:
        store.close()


def test_entries_of_one_write_apply_in_order(store: ShareStateStore) -> None:
    store.write(
        [
            _e("g", ("t", 0), DELTA, b"lost"),
            _e("g", ("t", 0), SNAP, b"s"),
            _e("g", ("t", 0), DELTA, b"kept"),
        ],
        durable=True,
        now_ms=NOW_MS,
    )
    assert store.load() == {"g": _state_of(None, t_0=(b"s", [b"kept"]))}


# ---------------------------------------------------------------------------- the record format
def test_record_format_is_pinned(store: ShareStateStore) -> None:
    """The documented keys and values, byte for byte."""
    store.write_config("g1", b"{}", NOW_MS)
    store.write([_e("g1", ("orders", 3), DELTA, b"ack")], durable=True, now_ms=NOW_MS)
    store.delete_partitions("g1", [("orders", 3)], NOW_MS)
    store.delete_group("g1", NOW_MS)
    config, state, tombstone, group_tombstone = decode_records(store._log.read(0, 1 << 20))
    config_key = b"\x00\x01\x00\x00\x02g1\x00\x00\xff\xff\xff\xff"
    partition_key = b"\x00\x01\x01\x00\x02g1\x00\x06orders\x00\x00\x00\x03"
    assert (config.key, config.value) == (config_key, b"{}")
    assert (state.key, state.value) == (partition_key, b"\x01ack")
    assert (tombstone.key, tombstone.value) == (partition_key, None)
    assert (group_tombstone.key, group_tombstone.value) == (config_key, None)


def test_a_write_is_one_batch(store: ShareStateStore) -> None:
    """One batch per write: recovery keeps or cuts it whole, never half a write."""
    store.write([_e("g", ("t", p), SNAP, b"s") for p in range(50)], durable=True, now_ms=NOW_MS)
    assert store._log.read_batches(0, 1)[1] == 50  # the first batch ends after 50 records


def test_torn_write_is_dropped_whole(tmp_path: Path) -> None:
    s = ShareStateStore.open(tmp_path, NOW_MS)
    s.write([_e("g", ("t", 0), SNAP, b"s")], durable=True, now_ms=NOW_MS)
    active = s._log._segments[-1].log_path
    s._log.abandon()
    torn = encode_batch([NewRecord(b"k", b"v", NOW_MS)] * 10)
    with open(active, "ab") as f:
        f.write(torn[: len(torn) // 2])
    s = ShareStateStore.open(tmp_path, NOW_MS)
    try:
        assert s.load() == {"g": _state_of(None, t_0=(b"s", []))}
        assert len(s._log.truncations) == 1
    finally:
        s.close()


# ---------------------------------------------------------------------------- deletes
def test_delete_group_is_one_tombstone_and_survives_a_crash(
    store: ShareStateStore, tmp_path: Path
) -> None:
    store.write_config("a", b"ca", NOW_MS)
    store.write(
        [_e("a", ("t", p), SNAP, b"s") for p in range(3)] + [_e("b", ("t", 0), SNAP, b"s")],
        durable=True,
        now_ms=NOW_MS,
    )
    end = store._log.log_end_offset
    store.delete_group("a", NOW_MS)
    assert store._log.log_end_offset == end + 1  # config and share-partitions in one record
    store.delete_group("nobody", NOW_MS)  # nothing to delete: nothing appended
    assert store._log.log_end_offset == end + 1
    assert store.groups() == ["b"]
    store = _crash_reopen(store, tmp_path)
    try:
        assert store.groups() == ["b"]
        store.write([_e("a", ("t", 0), DELTA, b"d")], durable=True, now_ms=NOW_MS)  # comes back
        assert store.load()["a"] == _state_of(None, t_0=(None, [b"d"]))
    finally:
        store.close()


def test_delete_partitions_keeps_the_config(store: ShareStateStore, tmp_path: Path) -> None:
    store.write_config("a", b"ca", NOW_MS)
    store.write(
        [
            _e("a", ("t", 0), SNAP, b"0"),
            _e("a", ("t", 1), SNAP, b"1"),
            _e("b", ("t", 0), SNAP, b""),
        ],
        durable=True,
        now_ms=NOW_MS,
    )
    store.delete_partitions("a", [("t", 0), ("t", 0), ("t", 7)], NOW_MS)  # repeats, absent: fine
    store.delete_partitions("b", [("t", 0)], NOW_MS)  # b had no config: it is gone
    store.delete_partitions("nobody", [("t", 0)], NOW_MS)
    expected = {"a": _state_of(b"ca", t_1=(b"1", []))}
    assert store.load() == expected
    store.delete_partitions("a", [("t", 1)], NOW_MS)
    assert store.load() == {"a": _state_of(b"ca")}  # a group with a config and nothing else
    store = _crash_reopen(store, tmp_path)
    try:
        assert store.load() == {"a": _state_of(b"ca")}
    finally:
        store.close()


def test_delete_topic_survives_reopen(store: ShareStateStore, tmp_path: Path) -> None:
    store.write(
        [
            _e("a", ("t", 0), SNAP, b"a0"),
            _e("a", ("t", 1), DELTA, b"a1"),
            _e("a", ("u", 0), SNAP, b"u"),
            _e("b", ("t", 0), SNAP, b"b0"),
            _e("c", ("tt", 0), SNAP, b"c"),  # not a prefix match
        ],
        durable=True,
        now_ms=NOW_MS,
    )
    store.delete_topic("t", NOW_MS)
    expected = {"a": _state_of(None, u_0=(b"u", [])), "c": _state_of(None, tt_0=(b"c", []))}
    assert store.load() == expected  # b had only t: it is gone
    store = _reopen(store, tmp_path)
    try:
        assert store.load() == expected
    finally:
        store.close()


def test_large_delete_is_split_into_batches(
    store: ShareStateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_state, "TOMBSTONES_PER_BATCH_MAX", 4)
    for g in range(5):
        store.write(
            [_e(f"g{g}", ("t", p), SNAP, b"s") for p in range(2)], durable=True, now_ms=NOW_MS
        )
    end = store._log.log_end_offset
    store.delete_topic("t", NOW_MS)
    assert store._log.log_end_offset == end + 10
    assert store._log.read_batches(end, 1)[1] == end + 4  # batches of at most 4 tombstones
    store = _reopen(store, tmp_path)
    try:
        assert store.groups() == []
    finally:
        store.close()


# ---------------------------------------------------------------------------- durability
def test_durable_write_survives_a_crash(tmp_path: Path) -> None:
    s = ShareStateStore.open(tmp_path, NOW_MS, SMALL)
    for i in range(40):
        s.write([_e(f"g{i % 3}", ("t", i % 5), DELTA, b"d" * i)], durable=True, now_ms=NOW_MS + i)
    before = s.load()
    s = _crash_reopen(s, tmp_path, SMALL)
    try:
        assert s._log.recovered  # the crash path was taken
        assert s.load() == before
    finally:
        s.close()


def test_durability_is_the_callers_choice(store: ShareStateStore) -> None:
    """Under the log's fsync `never`, a non-durable write is not fsynced, a durable one is,
    with every write before it; `flush` fsyncs too."""
    plog = store._log
    store.write([_e("g", ("t", 0), DELTA, b"1")], durable=False, now_ms=NOW_MS)
    assert plog.flushed_offset < plog.log_end_offset == 1
    store.write([_e("g", ("t", 0), DELTA, b"2")], durable=True, now_ms=NOW_MS)
    assert plog.flushed_offset == plog.log_end_offset == 2
    store.write([_e("g", ("t", 0), DELTA, b"3")], durable=False, now_ms=NOW_MS)
    assert plog.flushed_offset == 2
    store.flush(NOW_MS)
    assert plog.flushed_offset == 3
    store.write([_e("g", ("t", 0), DELTA, b"4")], durable=False, now_ms=NOW_MS)
    store.write([], durable=True, now_ms=NOW_MS)  # an empty durable write is a flush
    assert plog.flushed_offset == 4
    durable_calls: list[Callable[[], None]] = [
        lambda: store.write_config("g", b"c", NOW_MS),
        lambda: store.delete_partitions("g", [("t", 0)], NOW_MS),
        lambda: store.delete_group("g", NOW_MS),
    ]
    for call in durable_calls:
        store.write([_e("g", ("t", 1), DELTA, b"x")], durable=False, now_ms=NOW_MS)
        call()
        assert plog.flushed_offset == plog.log_end_offset


def test_non_durable_writes_survive_a_process_crash(tmp_path: Path) -> None:
    s = ShareStateStore.open(tmp_path, NOW_MS)
    s.write([_e("g", ("t", 0), DELTA, b"in the page cache")], durable=False, now_ms=NOW_MS)
    s = _crash_reopen(s, tmp_path)
    try:
        assert s.load() == {"g": _state_of(None, t_0=(None, [b"in the page cache"]))}
    finally:
        s.close()


def test_power_loss_keeps_what_was_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a simulated disk that keeps only what was fsynced: durable writes and flushed ones
    are there; a non-durable write after the last fsync is gone, and nothing else is."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "reliability"))
    from simdisk import SimDisk, installed  # type: ignore[import-not-found, unused-ignore]

    sim = SimDisk(tmp_path)
    with installed(sim):
        s = ShareStateStore.open(tmp_path, NOW_MS, SMALL)
        s.write_config("g", b"cfg", NOW_MS)
        s.write([_e("g", ("t", 0), SNAP, b"s")], durable=False, now_ms=NOW_MS)
        s.write([_e("g", ("t", 0), DELTA, b"acked")], durable=True, now_ms=NOW_MS)
        s.write([_e("g", ("t", 0), DELTA, b"counted")], durable=False, now_ms=NOW_MS)
        s.flush(NOW_MS)
        s.write([_e("g", ("t", 0), DELTA, b"not yet")], durable=False, now_ms=NOW_MS)
        sim.power_cycle(random.Random(1), "none")
        s = ShareStateStore.open(tmp_path, NOW_MS, SMALL)
        try:
            assert s.load() == {"g": _state_of(b"cfg", t_0=(b"s", [b"acked", b"counted"]))}
        finally:
            s.close()


def test_power_loss_right_after_a_snapshot_of_non_durable_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot taken by a non-durable write covers only what the log has fsynced (it
    flushes first): after a power loss right after the snapshot file is durable (before the
    roll that would fsync the segment), the log still reaches the snapshot's offset."""
    monkeypatch.setattr(_state, "SNAPSHOT_EVERY_RECORDS", 3)
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "reliability"))
    from simdisk import (  # type: ignore[import-not-found, unused-ignore]
        SimDisk,
        SimulatedCrash,
        installed,
    )

    snapshot = tmp_path / SHARE_STATE_LOG_DIR_NAME / SNAPSHOT_FILE_NAME
    sim = SimDisk(tmp_path)
    with installed(sim):
        s = ShareStateStore.open(tmp_path, NOW_MS, SMALL)
        s.write([_e("g", ("t", 0), DELTA, b"0")], durable=False, now_ms=NOW_MS)
        s.write([_e("g", ("t", 0), DELTA, b"1")], durable=False, now_ms=NOW_MS)
        # The directory fsync that makes the snapshot's rename durable.
        sim.crash_on = lambda what, path: what == "fsync_dir" and snapshot.exists()
        with pytest.raises(SimulatedCrash):
            s.write([_e("g", ("t", 0), DELTA, b"2")], durable=False, now_ms=NOW_MS)
        sim.power_cycle(random.Random(2), "none")
        s = ShareStateStore.open(tmp_path, NOW_MS, SMALL)
        try:
            assert snapshot.exists()
            assert s.load() == {"g": _state_of(None, t_0=(None, [b"0", b"1", b"2"]))}
        finally:
            s.close()


# ---------------------------------------------------------------------------- snapshots
def test_snapshots_keep_the_log_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_state, "SNAPSHOT_EVERY_RECORDS", 10)
    s = ShareStateStore.open(tmp_path, NOW_MS, SMALL)
    segments_seen = []
    for i in range(300):
        tp = ("t", i % 2)
        kind = SNAP if i % 7 == 0 else DELTA
        s.write([_e(f"g{i % 3}", tp, kind, b"v%d" % i)], durable=i % 4 == 0, now_ms=NOW_MS + i)
        segments_seen.append(s._log.segment_count)
    assert (tmp_path / SHARE_STATE_LOG_DIR_NAME / SNAPSHOT_FILE_NAME).exists()
    assert s._log.log_start_offset > 250  # compacted up to a recent snapshot
    # The interval: at least as many records as the snapshot holds values (26 here).
    assert s._log.log_end_offset - s._log.log_start_offset <= max(10, s._values_count)
    assert max(segments_seen) <= 3
    before = s.load()
    s = _reopen(s, tmp_path, SMALL)
    try:
        assert s.load() == before
        s.write([_e("g0", ("t", 0), DELTA, b"more")], durable=True, now_ms=NOW_MS)
        before["g0"].partitions[("t", 0)].deltas.append(b"more")
        assert s.load() == before  # and it keeps going after the reopen
    finally:
        s.close()


def test_large_values_snapshot_by_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Few records of many bytes: the byte interval keeps the log bounded."""
    monkeypatch.setattr(_state, "SNAPSHOT_EVERY_BYTES", 20_000)
    s = ShareStateStore.open(tmp_path, NOW_MS)
    try:
        for i in range(20):
            s.write([_e("g", ("t", 0), SNAP, bytes([i]) * 5000)], durable=True, now_ms=NOW_MS)
        assert s._log.size_bytes < 30_000
        assert s._log.log_start_offset > 10
        assert s.load()["g"].partitions[("t", 0)].snapshot == bytes([19]) * 5000
    finally:
        s.close()


def test_snapshot_file_is_the_documented_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_state, "SNAPSHOT_EVERY_RECORDS", 2)
    with ShareStateStore.open(tmp_path, NOW_MS) as s:
        s.write_config("g", b"c", NOW_MS)
        s.write(
            [_e("g", ("t", 1), SNAP, b"S"), _e("g", ("t", 1), DELTA, b"d")],
            durable=True,
            now_ms=NOW_MS,
        )
    body = b"".join(
        (
            b"RLSS\x00\x01" + struct.pack(">q", 3) + b"\x00\x00\x00\x01",  # log_offset 3, 1 group
            b"\x00\x01g" + b"\x00\x00\x00\x01c",  # group "g", config "c"
            b"\x00\x00\x00\x01",  # one share-partition
            b"\x00\x01t" + b"\x00\x00\x00\x01",  # t-1
            b"\x00\x00\x00\x01S",  # snapshot "S"
            b"\x00\x00\x00\x01" + b"\x00\x00\x00\x01d",  # one delta "d"
        )
    )
    raw = (tmp_path / SHARE_STATE_LOG_DIR_NAME / SNAPSHOT_FILE_NAME).read_bytes()
    assert raw == body + struct.pack(">I", crc32c(body))


def test_crash_between_snapshot_and_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_state, "SNAPSHOT_EVERY_RECORDS", 10)

    def crash(self: PartitionLog, offset: int) -> int:
        raise OSError("simulated crash before the old segments are deleted")

    monkeypatch.setattr(PartitionLog, "delete_before", crash)
    s = ShareStateStore.open(tmp_path, NOW_MS, SMALL)
    for i in range(25):
        s.write([_e("g", ("t", i % 4), DELTA, b"%d" % i)], durable=True, now_ms=NOW_MS)
    assert s._log.log_start_offset == 0
    before = s.load()
    monkeypatch.undo()
    s = _crash_reopen(s, tmp_path, SMALL)
    try:
        assert s.load() == before
    finally:
        s.close()


def _store_with_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(_state, "SNAPSHOT_EVERY_RECORDS", 2)
    s = ShareStateStore.open(tmp_path, NOW_MS, SMALL)
    for i in range(5):
        s.write([_e("g", ("t", 0), DELTA, b"%d" % i)], durable=True, now_ms=NOW_MS)
    s.close()
    return tmp_path / SHARE_STATE_LOG_DIR_NAME / SNAPSHOT_FILE_NAME


def test_corrupt_snapshot_refuses_to_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = _store_with_snapshot(tmp_path, monkeypatch)
    good = snapshot.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    body = b"XXXX" + good[4:-4]
    for bad in (
        good[: len(good) // 2],
        b"",
        bytes(flipped),
        body + struct.pack(">I", crc32c(body)),
    ):
        snapshot.write_bytes(bad)
        with pytest.raises(StorageError, match=r"snapshot\.bin: cannot read the snapshot"):
            ShareStateStore.open(tmp_path, NOW_MS, SMALL)
    snapshot.write_bytes(good)
    ShareStateStore.open(tmp_path, NOW_MS, SMALL).close()  # the refusals changed nothing


def test_missing_snapshot_of_a_compacted_log_refuses_to_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _store_with_snapshot(tmp_path, monkeypatch).unlink()
    with pytest.raises(StorageError, match="there is no snapshot"):
        ShareStateStore.open(tmp_path, NOW_MS, SMALL)


def test_a_record_that_is_not_ours_refuses_to_open(tmp_path: Path) -> None:
    ShareStateStore.open(tmp_path, NOW_MS).close()
    directory = tmp_path / SHARE_STATE_LOG_DIR_NAME
    with PartitionLog.open(directory, SHARE_STATE_LOG_CONFIG) as plog:
        key = b"\x00\x01\x01\x00\x01g\x00\x01t\x00\x00\x00\x00"
        plog.append(encode_batch([NewRecord(key, b"\x00s", NOW_MS)]), NOW_MS)  # a good one
        plog.append(encode_batch([NewRecord(key, b"\x07?", NOW_MS)]), NOW_MS)  # kind 7
    with pytest.raises(StorageError, match=r"__share_group_state-0: record at offset 1 is not"):
        ShareStateStore.open(tmp_path, NOW_MS)


# ---------------------------------------------------------------------------- limits
def test_groups_limit(store: ShareStateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_state, "SHARE_GROUPS_MAX", 2)
    store.write_config("a", b"", NOW_MS)
    store.write([_e("b", ("t", 0), SNAP, b"")], durable=True, now_ms=NOW_MS)
    with pytest.raises(LimitExceededError, match="2 share groups have state and this write adds 1"):
        store.write([_e("c", ("t", 0), SNAP, b"")], durable=True, now_ms=NOW_MS)
    with pytest.raises(LimitExceededError, match="the limit is 2"):
        store.write_config("c", b"", NOW_MS)
    store.write([_e("a", ("t", 1), SNAP, b"")], durable=True, now_ms=NOW_MS)  # existing: fine
    store.delete_group("b", NOW_MS)
    store.write_config("c", b"", NOW_MS)  # a deleted group frees its place
    assert store.groups() == ["a", "c"]


def test_partitions_limit(store: ShareStateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_state, "SHARE_PARTITIONS_MAX", 3)
    store.write([_e("a", ("t", p), SNAP, b"") for p in range(2)], durable=True, now_ms=NOW_MS)
    with pytest.raises(
        LimitExceededError,
        match="2 share-partitions have state and this write adds 2; the limit is 3",
    ):
        store.write(
            [_e("b", ("t", 0), SNAP, b""), _e("b", ("t", 1), DELTA, b"")],
            durable=True,
            now_ms=NOW_MS,
        )
    assert store.groups() == ["a"]  # the refused write changed nothing
    store.write([_e("a", ("t", p), DELTA, b"") for p in range(3)], durable=True, now_ms=NOW_MS)


def test_deltas_limit(store: ShareStateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_state, "DELTAS_MAX_PER_PARTITION", 3)
    store.write([_e("g", ("t", 0), DELTA, b"d")] * 2, durable=False, now_ms=NOW_MS)
    with pytest.raises(
        LimitExceededError, match="t-0 of share group 'g' keeps 3 deltas; the limit is 3"
    ):
        store.write([_e("g", ("t", 0), DELTA, b"d")] * 2, durable=False, now_ms=NOW_MS)
    assert store.deltas_count("g", "t", 0) == 2
    # A snapshot in the same write resets the count before the deltas after it.
    store.write(
        [_e("g", ("t", 0), DELTA, b"d"), _e("g", ("t", 0), SNAP, b"s")]
        + [_e("g", ("t", 0), DELTA, b"d")] * 3,
        durable=True,
        now_ms=NOW_MS,
    )
    assert store.deltas_count("g", "t", 0) == 3


def test_value_and_write_limits(store: ShareStateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    big = b"x" * (_state.VALUE_BYTES_MAX + 1)
    with pytest.raises(LimitExceededError, match=f"{len(big)} bytes; the limit is {len(big) - 1}"):
        store.write([_e("g", ("t", 0), SNAP, big)], durable=True, now_ms=NOW_MS)
    with pytest.raises(LimitExceededError, match="the limit is 1048576 per value"):
        store.write_config("g", big, NOW_MS)
    store.write([_e("g", ("t", 0), SNAP, big[:-1])], durable=True, now_ms=NOW_MS)  # at the limit
    with monkeypatch.context() as m:
        m.setattr(_state, "ENTRIES_PER_WRITE_MAX", 3)
        with pytest.raises(LimitExceededError, match="4 entries in one write; the limit is 3"):
            store.write([_e("g", ("t", 0), DELTA, b"")] * 4, durable=True, now_ms=NOW_MS)
    limit = store._log.config.batch_bytes_max
    with pytest.raises(LimitExceededError, match=f"batches up to {limit} bytes"):
        store.write(
            [_e("g", ("t", p), SNAP, big[:-1]) for p in range(3)] * 6, durable=True, now_ms=NOW_MS
        )
    assert store.load()["g"].partitions.keys() == {("t", 0)}


def test_state_bytes_limit(store: ShareStateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_state, "STATE_BYTES_MAX", 1000)
    overhead = _state.VALUE_OVERHEAD_BYTES
    store.write([_e("g", ("t", 0), SNAP, b"x" * (900 - overhead))], durable=True, now_ms=NOW_MS)
    with pytest.raises(LimitExceededError, match="would take 1001 bytes of memory"):
        store.write(
            [_e("g", ("t", 0), DELTA, b"x" * (101 - overhead))], durable=True, now_ms=NOW_MS
        )
    with pytest.raises(LimitExceededError, match="the limit is 1000"):
        store.write_config("g", b"x" * (101 - overhead), NOW_MS)
    # A snapshot replaces what it is charged against: the same size again fits.
    store.write([_e("g", ("t", 0), SNAP, b"y" * (900 - overhead))], durable=True, now_ms=NOW_MS)
    assert store._kept_bytes == 900


def test_bad_names_and_arguments_are_refused(store: ShareStateStore) -> None:
    bad_writes: list[tuple[StateEntry, type[Exception], str]] = [
        (StateEntry("", "t", 0, SNAP, b""), InvalidNameError, "must match"),
        (StateEntry("g/h", "t", 0, SNAP, b""), InvalidNameError, "must match"),
        (StateEntry("g" * 250, "t", 0, SNAP, b""), InvalidNameError, "must match"),
        (StateEntry("g", "", 0, SNAP, b""), InvalidNameError, "invalid topic name"),
        (StateEntry("g", "a/b", 0, SNAP, b""), InvalidNameError, "invalid topic name"),
        (StateEntry("g", "__share_group_state", 0, SNAP, b""), InvalidNameError, "reserved"),
        (StateEntry("g", "t", -1, SNAP, b""), InvalidConfigError, r"outside \[0, 2147483647\]"),
        (StateEntry("g", "t", 2**31, SNAP, b""), InvalidConfigError, "outside"),
        (StateEntry("g", "t", True, SNAP, b""), InvalidConfigError, "not an integer"),
        (StateEntry("g", "t", 0, 2, b""), InvalidConfigError, "not a StateKind"),  # type: ignore[arg-type]
        (StateEntry("g", "t", 0, SNAP, "text"), InvalidConfigError, "not bytes"),  # type: ignore[arg-type]
    ]
    for entry, error, message in bad_writes:
        with pytest.raises(error, match=message):
            store.write([StateEntry("g", "t", 9, DELTA, b"ok"), entry], durable=True, now_ms=NOW_MS)
    with pytest.raises(InvalidNameError):
        store.write_config("no spaces", b"", NOW_MS)
    with pytest.raises(InvalidConfigError, match="not bytes"):
        store.write_config("g", bytearray(b"c"), NOW_MS)  # type: ignore[arg-type]
    with pytest.raises(InvalidNameError):
        store.delete_group("", NOW_MS)
    with pytest.raises(InvalidConfigError):
        store.delete_partitions("g", [("t", -1)], NOW_MS)
    with pytest.raises(InvalidNameError):
        store.delete_topic("..", NOW_MS)
    assert store.groups() == []  # nothing was written
    assert store._log.log_end_offset == 0
    # An int kind is taken as the StateKind it names.
    store.write([StateEntry("g", "t", 0, 1, b"d")], durable=True, now_ms=NOW_MS)  # type: ignore[arg-type]
    assert store.deltas_count("g", "t", 0) == 1


def test_open_refuses_a_log_config_with_small_batches(tmp_path: Path) -> None:
    config = dataclasses.replace(SHARE_STATE_LOG_CONFIG, batch_bytes_max=1 << 20)
    with pytest.raises(InvalidConfigError, match="needs batch_bytes_max >="):
        ShareStateStore.open(tmp_path, NOW_MS, config)


# ---------------------------------------------------------------------------- the internal topic
def test_the_internal_topic_is_reserved(store: ShareStateStore, tmp_path: Path) -> None:
    """The broker opens the topic catalog on the same data directory: no topic takes the
    name, and the catalog leaves the state log's directory alone."""
    store.write([_e("g", ("t", 0), SNAP, b"s")], durable=True, now_ms=NOW_MS)
    store.close()
    with pytest.raises(InvalidNameError, match="reserved"):
        validate_topic_name("__share_group_state")
    catalog = Catalog.open(tmp_path)
    with pytest.raises(InvalidNameError, match="reserved"):
        catalog.create_topic("__share_group_state", 1)
    Catalog.open(tmp_path)
    reopened = ShareStateStore.open(tmp_path, NOW_MS)
    try:
        assert reopened.load() == {"g": _state_of(None, t_0=(b"s", []))}
    finally:
        reopened.close()


def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    with ShareStateStore.open(tmp_path, NOW_MS) as s:
        pass
    s.close()  # idempotent
    with pytest.raises(LogClosedError, match=r"share state store .* is closed"):
        s.write([_e("g", ("t", 0), SNAP, b"")], durable=False, now_ms=NOW_MS)
    for call in (
        s.load,
        s.groups,
        lambda: s.flush(NOW_MS),
        lambda: s.write_config("g", b"", NOW_MS),
    ):
        with pytest.raises(LogClosedError):
            call()


# ---------------------------------------------------------------------------- the model
class ShareStateMachine(RuleBasedStateMachine):
    """The store against a dict, across writes, deletes, snapshots, reopens and crashes."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = pytest.MonkeyPatch()
        self.patch.setattr(_state, "SNAPSHOT_EVERY_RECORDS", 7)
        self.dir = Path(tempfile.mkdtemp(prefix="share-state-"))
        self.store = ShareStateStore.open(self.dir, NOW_MS, SMALL)
        self.model: Everything = {}
        self.now_ms = NOW_MS

    groups = st.sampled_from(["g0", "g1", "g2"])
    topics = st.sampled_from(["t", "u"])
    tps = st.tuples(topics, st.integers(0, 2))
    values = st.binary(max_size=6)

    @rule(
        entries=st.lists(
            st.builds(
                StateEntry, groups, topics, st.integers(0, 2), st.sampled_from(StateKind), values
            ),
            max_size=4,
        ),
        durable=st.booleans(),
    )
    def write(self, entries: list[StateEntry], durable: bool) -> None:
        self.now_ms += 1
        self.store.write(entries, durable=durable, now_ms=self.now_ms)
        for e in entries:
            state = self.model.setdefault(e.group, ShareGroupState(None, {}))
            tp = (e.topic, e.partition)
            if e.kind == SNAP:
                state.partitions[tp] = SharePartitionRecords(e.value, [])
            else:
                state.partitions.setdefault(tp, SharePartitionRecords(None, [])).deltas.append(
                    e.value
                )

    @rule(group=groups, config=values)
    def write_config(self, group: str, config: bytes) -> None:
        self.store.write_config(group, config, self.now_ms)
        self.model.setdefault(group, ShareGroupState(None, {})).config = config

    @rule(group=groups)
    def delete_group(self, group: str) -> None:
        self.store.delete_group(group, self.now_ms)
        self.model.pop(group, None)

    @rule(group=groups, tps=st.lists(tps, max_size=3))
    def delete_partitions(self, group: str, tps: list[tuple[str, int]]) -> None:
        self.store.delete_partitions(group, tps, self.now_ms)
        state = self.model.get(group)
        if state is not None:
            for tp in tps:
                state.partitions.pop(tp, None)
            if state.config is None and not state.partitions:
                del self.model[group]

    @rule(topic=topics)
    def delete_topic(self, topic: str) -> None:
        self.store.delete_topic(topic, self.now_ms)
        for group in list(self.model):
            state = self.model[group]
            state.partitions = {tp: r for tp, r in state.partitions.items() if tp[0] != topic}
            if state.config is None and not state.partitions:
                del self.model[group]

    @rule()
    def flush(self) -> None:
        self.store.flush(self.now_ms)

    @rule()
    def reopen(self) -> None:
        self.store = _reopen(self.store, self.dir, SMALL)

    @rule()
    def crash(self) -> None:
        self.store = _crash_reopen(self.store, self.dir, SMALL)

    @invariant()
    def same_as_model(self) -> None:
        assert self.store.load() == self.model
        assert self.store.groups() == sorted(self.model)
        for group, state in self.model.items():
            for (topic, partition), records in state.partitions.items():
                assert self.store.deltas_count(group, topic, partition) == len(records.deltas)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir)
        self.patch.undo()


TestShareStateMachine = ShareStateMachine.TestCase
TestShareStateMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
