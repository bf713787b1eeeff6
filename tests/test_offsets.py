"""The committed-offset store of consumer groups, and PartitionLog.delete_before under it.

What a user relies on: a commit that returned is there after a reopen and after a crash, the
log under the store stays bounded, a damaged snapshot refuses to open instead of losing
offsets, and limits are refused with their numbers. A state machine checks the store
against a plain dict across commits, deletes, reopens and crashes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from storage import (
    Catalog,
    InvalidNameError,
    LimitExceededError,
    LogClosedError,
    LogConfig,
    NewRecord,
    OffsetOutOfRangeError,
    PartitionLog,
    StorageError,
    _fs,
    decode_records,
    encode_batch,
)
from stream.groups import _offsets
from stream.groups._offsets import (
    OFFSETS_LOG_CONFIG,
    OFFSETS_LOG_DIR_NAME,
    SNAPSHOT_FILE_NAME,
    CommittedOffset,
    InvalidCommitError,
    OffsetStore,
)

NOW_MS = 1_700_000_000_000
# Tiny segments, so that a few dozen commits cross several segment rolls.
SMALL = dataclasses.replace(OFFSETS_LOG_CONFIG, segment_bytes=1024)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[OffsetStore]:
    s = OffsetStore.open(tmp_path, NOW_MS)
    yield s
    s.close()


def _reopen(store: OffsetStore, data_dir: Path, config: LogConfig | None = None) -> OffsetStore:
    store.close()
    return OffsetStore.open(data_dir, NOW_MS, config)


def _crash_reopen(
    store: OffsetStore, data_dir: Path, config: LogConfig | None = None
) -> OffsetStore:
    """Drop the store as a killed process would: no flush, no clean-shutdown marker."""
    store._log.abandon()
    return OffsetStore.open(data_dir, NOW_MS, config)


def _everything(store: OffsetStore) -> dict[str, dict[tuple[str, int], CommittedOffset]]:
    return {group: store.fetch(group) for group in store.groups()}


# ---------------------------------------------------------------------------- commit, fetch
def test_commit_then_fetch(store: OffsetStore) -> None:
    store.commit("g", {("orders", 0): (10, "meta"), ("orders", 1): (20, "")}, NOW_MS)
    assert store.fetch("g") == {
        ("orders", 0): CommittedOffset(10, "meta", NOW_MS),
        ("orders", 1): CommittedOffset(20, "", NOW_MS),
    }
    assert store.fetch("g", [("orders", 1), ("orders", 7)]) == {
        ("orders", 1): CommittedOffset(20, "", NOW_MS)
    }
    assert store.fetch("other") == {}
    assert store.groups() == ["g"]


def test_commit_overwrites_only_its_partitions(store: OffsetStore) -> None:
    store.commit("g", {("t", 0): (1, "a"), ("t", 1): (1, "a")}, NOW_MS)
    store.commit("g", {("t", 0): (5, "b")}, NOW_MS + 1)
    assert store.fetch("g") == {
        ("t", 0): CommittedOffset(5, "b", NOW_MS + 1),
        ("t", 1): CommittedOffset(1, "a", NOW_MS),
    }


def test_an_offset_may_move_backwards(store: OffsetStore) -> None:
    """A reset to an earlier offset is a commit like any other (Kafka allows it too)."""
    store.commit("g", {("t", 0): (100, "")}, NOW_MS)
    store.commit("g", {("t", 0): (3, "")}, NOW_MS)
    assert store.fetch("g")[("t", 0)].offset == 3


def test_metadata_limit_counts_utf8_bytes(store: OffsetStore) -> None:
    fits = "é" * (_offsets.METADATA_BYTES_MAX // 2)  # 2 bytes each
    store.commit("g", {("t", 0): (1, fits)}, NOW_MS)
    with pytest.raises(LimitExceededError, match=r"4098 bytes of UTF-8; the limit is 4096"):
        store.commit("g", {("t", 0): (2, fits + "é")}, NOW_MS)
    assert store.fetch("g")[("t", 0)] == CommittedOffset(1, fits, NOW_MS)


def test_a_bad_partition_refuses_the_whole_commit(store: OffsetStore) -> None:
    with pytest.raises(InvalidCommitError, match=r"offset -1 for t-1 is outside \[0, "):
        store.commit("g", {("t", 0): (5, ""), ("t", 1): (-1, "")}, NOW_MS)
    with pytest.raises(InvalidCommitError, match=r"partition -2 of t"):
        store.commit("g", {("t", -2): (5, "")}, NOW_MS)
    with pytest.raises(InvalidNameError):
        store.commit("g", {("no/slash", 0): (5, "")}, NOW_MS)
    with pytest.raises(InvalidNameError, match="reserved"):
        store.commit("g", {("__consumer_offsets", 0): (5, "")}, NOW_MS)
    with pytest.raises(InvalidNameError, match="1 to 249"):
        store.commit("", {("t", 0): (5, "")}, NOW_MS)
    with pytest.raises(InvalidCommitError, match="not a str of valid UTF-8"):
        store.commit("g", {("t", 0): (5, "\ud800")}, NOW_MS)
    assert store.groups() == []
    assert store._log.log_end_offset == 0  # nothing was appended


def test_partitions_per_commit_limit(store: OffsetStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_offsets, "PARTITIONS_PER_COMMIT_MAX", 3)
    store.commit("g", {("t", p): (p, "") for p in range(3)}, NOW_MS)
    with pytest.raises(LimitExceededError, match="4 partitions in one commit; the limit is 3"):
        store.commit("g", {("t", p): (p, "") for p in range(4)}, NOW_MS)


def test_groups_limit(store: OffsetStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_offsets, "GROUPS_MAX", 2)
    store.commit("a", {("t", 0): (1, "")}, NOW_MS)
    store.commit("b", {("t", 0): (1, "")}, NOW_MS)
    with pytest.raises(LimitExceededError, match="2 groups have committed offsets; the limit is 2"):
        store.commit("c", {("t", 0): (1, "")}, NOW_MS)
    store.commit("a", {("t", 1): (1, "")}, NOW_MS)  # an existing group still commits
    store.delete_group("b", NOW_MS)
    store.commit("c", {("t", 0): (1, "")}, NOW_MS)  # a deleted group frees its place
    assert store.groups() == ["a", "c"]


def test_offsets_limit(store: OffsetStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_offsets, "OFFSETS_MAX", 3)
    store.commit("a", {("t", 0): (1, ""), ("t", 1): (1, "")}, NOW_MS)
    with pytest.raises(LimitExceededError, match="2 committed offsets are stored and this"):
        store.commit("b", {("t", 0): (1, ""), ("t", 1): (1, "")}, NOW_MS)
    store.commit("a", {("t", 0): (2, ""), ("t", 1): (2, ""), ("t", 2): (2, "")}, NOW_MS)


def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    s = OffsetStore.open(tmp_path, NOW_MS)
    s.close()
    s.close()  # idempotent
    with pytest.raises(LogClosedError):
        s.commit("g", {("t", 0): (1, "")}, NOW_MS)
    with pytest.raises(LogClosedError):
        s.fetch("g")


# ---------------------------------------------------------------------------- the record format
def test_record_format_is_pinned(store: OffsetStore) -> None:
    """The documented key (Kafka's OffsetCommitKey layout) and JSON value, byte for byte."""
    store.commit("g1", {("orders", 3): (42, "m")}, NOW_MS)
    [record] = decode_records(store._log.read(0, 1 << 20))
    assert record.key == b"\x00\x01\x00\x02g1\x00\x06orders\x00\x00\x00\x03"
    assert record.value == b'{"offset":42,"metadata":"m","commit_time_ms":1700000000000}'
    store.delete_group("g1", NOW_MS)
    tombstone = decode_records(store._log.read(1, 1 << 20))[0]
    assert (tombstone.key, tombstone.value) == (record.key, None)


def test_a_commit_is_one_batch(store: OffsetStore) -> None:
    """One batch per commit: recovery keeps or cuts it whole, never half a commit."""
    store.commit("g", {("t", p): (p, "") for p in range(50)}, NOW_MS)
    assert store._log.read_batches(0, 1)[1] == 50  # the first batch ends after 50 records


# ---------------------------------------------------------------------------- durability
def test_reopen_keeps_everything(store: OffsetStore, tmp_path: Path) -> None:
    store.commit("g", {("t", 0): (1, "x"), ("u", 2): (9, "")}, NOW_MS)
    store.commit("h", {("t", 0): (3, "")}, NOW_MS + 5)
    store.commit("g", {("t", 0): (2, "y")}, NOW_MS + 6)
    before = _everything(store)
    reopened = _reopen(store, tmp_path)
    try:
        assert _everything(reopened) == before
    finally:
        reopened.close()


def test_crash_keeps_every_acknowledged_commit(tmp_path: Path) -> None:
    s = OffsetStore.open(tmp_path, NOW_MS, SMALL)
    for i in range(40):
        s.commit(f"g{i % 3}", {("t", i % 5): (i, "m" * i)}, NOW_MS + i)
    before = _everything(s)
    s = _crash_reopen(s, tmp_path, SMALL)
    try:
        assert s._log.recovered  # the crash path was taken
        assert _everything(s) == before
    finally:
        s.close()


def test_torn_unacknowledged_commit_is_dropped_whole(tmp_path: Path) -> None:
    """A commit whose batch reached the disk only in part is gone whole after recovery."""
    s = OffsetStore.open(tmp_path, NOW_MS)
    s.commit("g", {("t", 0): (1, "")}, NOW_MS)
    active = s._log._segments[-1].log_path
    s._log.abandon()
    torn = encode_batch([NewRecord(b"k", b"v", NOW_MS)] * 10)
    with open(active, "ab") as f:
        f.write(torn[: len(torn) // 2])
    s = OffsetStore.open(tmp_path, NOW_MS)
    try:
        assert s.fetch("g") == {("t", 0): CommittedOffset(1, "", NOW_MS)}
        assert len(s._log.truncations) == 1
    finally:
        s.close()


def test_commits_from_many_threads(store: OffsetStore, tmp_path: Path) -> None:
    def work(n: int) -> None:
        for i in range(25):
            store.commit(f"g{n}", {("t", i % 4): (i, "")}, NOW_MS + i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last = {p: max(i for i in range(25) if i % 4 == p) for p in range(4)}
    expected = {
        f"g{n}": {("t", p): CommittedOffset(i, "", NOW_MS + i) for p, i in last.items()}
        for n in range(4)
    }
    assert _everything(store) == expected
    reopened = _reopen(store, tmp_path)
    try:
        assert _everything(reopened) == expected
    finally:
        reopened.close()


def test_catalog_open_leaves_the_offsets_log(store: OffsetStore, tmp_path: Path) -> None:
    """The broker opens the topic catalog on the same data directory; it removes partition
    directories no topic covers, but not the offsets log (a reserved internal name)."""
    store.commit("g", {("t", 0): (7, "")}, NOW_MS)
    store.close()
    Catalog.open(tmp_path)
    reopened = OffsetStore.open(tmp_path, NOW_MS)
    try:
        assert reopened.fetch("g") == {("t", 0): CommittedOffset(7, "", NOW_MS)}
    finally:
        reopened.close()


# ---------------------------------------------------------------------------- snapshots
def test_snapshots_keep_the_log_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_offsets, "SNAPSHOT_EVERY_RECORDS", 10)
    s = OffsetStore.open(tmp_path, NOW_MS, SMALL)
    segments_seen = []
    for i in range(300):
        s.commit(f"g{i % 3}", {("t", i % 2): (i, "meta")}, NOW_MS + i)
        segments_seen.append(s._log.segment_count)
    assert (tmp_path / OFFSETS_LOG_DIR_NAME / SNAPSHOT_FILE_NAME).exists()
    assert s._log.log_start_offset > 250  # compacted up to a recent snapshot
    assert s._log.log_end_offset - s._log.log_start_offset <= 10
    # 10 records of ~60 bytes fill 1 KiB segments: never more than a few at a time.
    assert max(segments_seen) <= 3
    before = _everything(s)
    s = _reopen(s, tmp_path, SMALL)
    try:
        assert _everything(s) == before
        s.commit("g0", {("t", 0): (1000, "")}, NOW_MS)  # and it keeps going after the reopen
    finally:
        s.close()


def test_snapshot_interval_grows_with_the_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot writes every offset, so it waits for at least as many new records: the
    cost per appended record stays constant however large the map."""
    monkeypatch.setattr(_offsets, "SNAPSHOT_EVERY_RECORDS", 5)
    writes = []
    real = _fs.atomic_write

    def counting(path: Path, data: bytes) -> None:
        writes.append(path)
        real(path, data)

    monkeypatch.setattr(_offsets, "atomic_write", counting)
    s = OffsetStore.open(tmp_path, NOW_MS)
    try:
        s.commit("g", {("t", p): (0, "") for p in range(100)}, NOW_MS)  # 100 offsets
        assert len(writes) == 1
        for i in range(99):
            s.commit("g", {("t", 0): (i, "")}, NOW_MS)
        assert len(writes) == 1  # 99 records < 100 live offsets
        s.commit("g", {("t", 0): (1, "")}, NOW_MS)
        assert len(writes) == 2
    finally:
        s.close()


def test_crash_between_snapshot_and_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot is written but the old segments are still there: the reopen replays
    from the snapshot's offset and gives the same map."""
    monkeypatch.setattr(_offsets, "SNAPSHOT_EVERY_RECORDS", 10)

    def crash(self: PartitionLog, offset: int) -> int:
        raise OSError("simulated crash before the old segments are deleted")

    monkeypatch.setattr(PartitionLog, "delete_before", crash)
    s = OffsetStore.open(tmp_path, NOW_MS, SMALL)
    for i in range(25):
        s.commit("g", {("t", i % 4): (i, "")}, NOW_MS + i)  # the snapshot failure is logged
    assert s._log.log_start_offset == 0
    before = _everything(s)
    monkeypatch.undo()
    s = _crash_reopen(s, tmp_path, SMALL)
    try:
        assert _everything(s) == before
    finally:
        s.close()


def test_corrupt_snapshot_refuses_to_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_offsets, "SNAPSHOT_EVERY_RECORDS", 2)
    s = OffsetStore.open(tmp_path, NOW_MS, SMALL)
    for i in range(5):
        s.commit("g", {("t", 0): (i, "")}, NOW_MS)
    s.close()
    snapshot = tmp_path / OFFSETS_LOG_DIR_NAME / SNAPSHOT_FILE_NAME
    good = snapshot.read_bytes()
    for bad in (good[: len(good) // 2], b"[]", b'{"format": 1, "log_offset": "x", "groups": {}}'):
        snapshot.write_bytes(bad)
        with pytest.raises(StorageError, match=r"snapshot\.json: cannot read"):
            OffsetStore.open(tmp_path, NOW_MS, SMALL)
    snapshot.write_bytes(good)
    OffsetStore.open(tmp_path, NOW_MS, SMALL).close()  # the refusals changed nothing


def test_missing_snapshot_of_a_compacted_log_refuses_to_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_offsets, "SNAPSHOT_EVERY_RECORDS", 2)
    s = OffsetStore.open(tmp_path, NOW_MS, SMALL)
    for i in range(5):
        s.commit("g", {("t", 0): (i, "")}, NOW_MS)
    s.close()
    (tmp_path / OFFSETS_LOG_DIR_NAME / SNAPSHOT_FILE_NAME).unlink()
    with pytest.raises(StorageError, match="there is no snapshot"):
        OffsetStore.open(tmp_path, NOW_MS, SMALL)


# ---------------------------------------------------------------------------- deletes
def test_delete_group_survives_reopen(store: OffsetStore, tmp_path: Path) -> None:
    store.commit("a", {("t", 0): (1, ""), ("u", 0): (2, "")}, NOW_MS)
    store.commit("b", {("t", 0): (3, "")}, NOW_MS)
    store.delete_group("a", NOW_MS)
    store.delete_group("nobody", NOW_MS)  # nothing to delete: nothing appended
    assert store.groups() == ["b"]
    store = _crash_reopen(store, tmp_path)
    try:
        assert store.groups() == ["b"]
        assert store.fetch("a") == {}
        store.commit("a", {("t", 0): (9, "")}, NOW_MS)  # the group can come back
        assert store.fetch("a") == {("t", 0): CommittedOffset(9, "", NOW_MS)}
    finally:
        store.close()


def test_delete_topic_survives_reopen(store: OffsetStore, tmp_path: Path) -> None:
    store.commit("a", {("t", 0): (1, ""), ("t", 1): (1, ""), ("u", 0): (2, "")}, NOW_MS)
    store.commit("b", {("t", 0): (3, "")}, NOW_MS)
    store.delete_topic("t", NOW_MS)
    expected = {"a": {("u", 0): CommittedOffset(2, "", NOW_MS)}}
    assert _everything(store) == expected  # b had only t: it is gone
    store = _reopen(store, tmp_path)
    try:
        assert _everything(store) == expected
    finally:
        store.close()


def test_large_delete_is_split_into_batches(
    store: OffsetStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_offsets, "PARTITIONS_PER_COMMIT_MAX", 4)
    for g in range(5):
        store.commit(f"g{g}", {("t", p): (p, "") for p in range(2)}, NOW_MS)
    end = store._log.log_end_offset
    store.delete_topic("t", NOW_MS)
    assert store._log.log_end_offset == end + 10
    assert store._log.read_batches(end, 1)[1] == end + 4  # batches of at most 4 tombstones
    store = _reopen(store, tmp_path)
    try:
        assert store.groups() == []
    finally:
        store.close()


# ---------------------------------------------------------------------------- the model
class OffsetStoreMachine(RuleBasedStateMachine):
    """The store against a dict, across commits, deletes, snapshots, reopens and crashes."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = pytest.MonkeyPatch()
        self.patch.setattr(_offsets, "SNAPSHOT_EVERY_RECORDS", 7)
        self.dir = Path(tempfile.mkdtemp(prefix="offsets-"))
        self.store = OffsetStore.open(self.dir, NOW_MS, SMALL)
        self.model: dict[str, dict[tuple[str, int], CommittedOffset]] = {}
        self.now_ms = NOW_MS

    groups = st.sampled_from(["g0", "g1", "g2"])
    topics = st.sampled_from(["t", "u"])

    @rule(
        group=groups,
        offsets=st.dictionaries(
            st.tuples(topics, st.integers(0, 3)),
            st.tuples(st.integers(0, 2**63 - 1), st.text(max_size=5)),
            max_size=4,
        ),
    )
    def commit(self, group: str, offsets: dict[tuple[str, int], tuple[int, str]]) -> None:
        self.now_ms += 1
        self.store.commit(group, offsets, self.now_ms)
        for tp, (offset, metadata) in offsets.items():
            self.model.setdefault(group, {})[tp] = CommittedOffset(offset, metadata, self.now_ms)

    @rule(group=groups)
    def delete_group(self, group: str) -> None:
        self.store.delete_group(group, self.now_ms)
        self.model.pop(group, None)

    @rule(topic=topics)
    def delete_topic(self, topic: str) -> None:
        self.store.delete_topic(topic, self.now_ms)
        for group in list(self.model):
            self.model[group] = {tp: c for tp, c in self.model[group].items() if tp[0] != topic}
            if not self.model[group]:
                del self.model[group]

    @rule()
    def reopen(self) -> None:
        self.store = _reopen(self.store, self.dir, SMALL)

    @rule()
    def crash(self) -> None:
        self.store = _crash_reopen(self.store, self.dir, SMALL)

    @invariant()
    def same_as_model(self) -> None:
        assert _everything(self.store) == self.model

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir)
        self.patch.undo()


TestOffsetStoreMachine = OffsetStoreMachine.TestCase
TestOffsetStoreMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


# ---------------------------------------------------------------------------- delete_before
def _log_with_segments(path: Path) -> PartitionLog:
    """A log of 4 sealed segments of 3 one-record batches each, then an active one."""
    plog = PartitionLog.open(path, LogConfig(segment_bytes=4096, segment_ms=None))
    for i in range(12):
        plog.append(encode_batch([NewRecord(None, b"x" * 8, NOW_MS)]), NOW_MS)
        if i % 3 == 2:
            plog.roll()
    plog.append(encode_batch([NewRecord(None, b"x", NOW_MS)]), NOW_MS)
    assert plog._bases == [0, 3, 6, 9, 12]
    return plog


def test_delete_before_deletes_only_whole_segments_below(tmp_path: Path) -> None:
    plog = _log_with_segments(tmp_path)
    try:
        assert plog.delete_before(0) == 0
        assert plog.delete_before(5) == 1  # [3, 6) holds offset 5: kept
        assert plog.log_start_offset == 3
        assert plog.delete_before(2) == 0  # the start offset only moves forward
        assert plog.delete_before(9) == 2
        assert plog.log_start_offset == 9
        with pytest.raises(OffsetOutOfRangeError, match="log start offset 9"):
            plog.read(8, 1 << 20)
        assert decode_records(plog.read(9, 1 << 20))[0].offset == 9
    finally:
        plog.close()


def test_delete_before_never_deletes_the_active_segment(tmp_path: Path) -> None:
    plog = _log_with_segments(tmp_path)
    assert plog.delete_before(10**9) == 4
    assert plog.segment_count == 1
    assert (plog.log_start_offset, plog.log_end_offset) == (12, 13)
    plog.close()
    files = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".log")
    assert files == ["00000000000000000012.log"]
    plog = PartitionLog.open(tmp_path, LogConfig(segment_bytes=4096, segment_ms=None))
    try:
        assert plog.log_start_offset == 12  # durable: the reopened log starts there
        assert decode_records(plog.read(12, 1 << 20))[0].value == b"x"
    finally:
        plog.close()


def test_delete_before_refuses_a_closed_log(tmp_path: Path) -> None:
    plog = _log_with_segments(tmp_path)
    plog.close()
    with pytest.raises(LogClosedError):
        plog.delete_before(5)


def test_snapshot_json_is_the_documented_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_offsets, "SNAPSHOT_EVERY_RECORDS", 1)
    with OffsetStore.open(tmp_path, NOW_MS) as s:
        s.commit("g", {("t", 2): (5, "m")}, NOW_MS)
    doc = json.loads((tmp_path / OFFSETS_LOG_DIR_NAME / SNAPSHOT_FILE_NAME).read_bytes())
    assert doc == {"format": 1, "log_offset": 1, "groups": {"g": [["t", 2, 5, "m", NOW_MS]]}}
