"""The committed offsets of consumer groups, kept durable in the internal log `__consumer_offsets`.

An `OffsetStore` is a `ReplayedLog` (stream/_internal_log.py: the log replayed into memory,
the snapshot interval's steps, the checks on open, the lock). State changes only by replaying
records: `commit`, `delete_group` and `delete_topic` turn a request into records, append them
to the log, and apply them to memory with `_apply`, the same function that rebuilds the map on
open. So what a reopened store holds is exactly what the live store held.

On disk (one PartitionLog, not a topic of the catalog):

    <data_dir>/__consumer_offsets-0/          the log (segments, indexes, recovery point)
    <data_dir>/__consumer_offsets-0/snapshot.json

The catalog reserves the name (INTERNAL_TOPIC_NAMES): no user topic takes it, and
`Catalog.open` leaves the directory alone.

Record format, one record per (group, topic, partition):

    key    version i16 = 1 | group length u16 | group UTF-8 | topic length u16 | topic UTF-8 |
           partition i32                     (big-endian: Kafka's OffsetCommitKey layout)
    value  UTF-8 JSON {"offset": int, "metadata": str, "commit_time_ms": int}
           or null (a tombstone: the offset of that partition is deleted)

A commit is ONE RecordBatch holding a record per partition, so after a crash it is present
whole or not at all (recovery cuts a torn batch). Deletes write tombstones in batches of up to
PARTITIONS_PER_COMMIT_MAX records; a crash part-way through a delete leaves a prefix deleted.

What is durable when: `commit` and the deletes return only after the appended batches are
fsynced (`PartitionLog.flush`; OFFSETS_LOG_CONFIG fsyncs every append anyway), so an acknowledged
commit survives power loss. Memory mirrors the log: each batch is replayed into the map right
after it is appended.

Snapshots keep the log bounded: once the records appended since the last snapshot reach
max(SNAPSHOT_EVERY_RECORDS, live offsets), the whole map is written to `snapshot.json` with
`log_offset`, the log end offset it covers, and the segments below it are dropped (the steps,
and why a crash between any two of them is harmless: stream/_internal_log.py). The log thus
holds at most max(SNAPSHOT_EVERY_RECORDS, OFFSETS_MAX) records plus one request's (a snapshot
that fails, say on a full disk, is logged and tried again an interval later), and snapshot
writing costs O(1) amortized per appended record (it runs only after as many records as it
writes). Measured here: replaying 49k records on open takes ~0.24 s; a snapshot of 110k
offsets ~0.1 s (2.6 MB), done under the store's lock by the commit that crosses the interval.

    {"format": 1, "log_offset": 1234,
     "groups": {"<group>": [["<topic>", partition, offset, "<metadata>", commit_time_ms]]}}

A snapshot that cannot be read, or a log that does not line up with it, refuses to open
(StorageError naming the file): committed offsets are never dropped silently.

Thread safety: one lock around every public method; the server calls from many threads.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import (
    HEADER_BYTES,
    FsyncPolicy,
    InvalidConfigError,
    InvalidNameError,
    LimitExceededError,
    LogConfig,
    NewRecord,
    PartitionLog,
    encode_batch,
    validate_topic_name,
)
from storage._catalog import INTERNAL_TOPIC_NAMES, TOPIC_NAME_CHARS_MAX
from storage._config import MiB
from storage._fs import atomic_write

from .._internal_log import ReplayedLog, open_replayed

log = logging.getLogger("riverlog.groups")

# Partition 0 of the internal topic, named as a topic's partition directory; the catalog
# reserves the topic name and keeps the directory (storage._catalog.INTERNAL_TOPIC_NAMES).
OFFSETS_LOG_DIR_NAME = "__consumer_offsets-0"
assert OFFSETS_LOG_DIR_NAME.rsplit("-", 1)[0] in INTERNAL_TOPIC_NAMES
SNAPSHOT_FILE_NAME = "snapshot.json"
SNAPSHOT_FORMAT = 1

# Kafka's offset.metadata.max.bytes default.
METADATA_BYTES_MAX = 4096
# As many groups as the coordinator keeps (its GROUPS_MAX): bounds memory and the snapshot.
GROUPS_MAX = 10_000
# Bounds one request's batch, its memory and the time the store's lock is held.
PARTITIONS_PER_COMMIT_MAX = 10_000
# Committed offsets over all groups. Each costs a few hundred bytes of memory and about 50
# bytes of snapshot, so this bounds memory (~300 MiB) and the time a snapshot takes.
OFFSETS_MAX = 1_000_000
# Group ids as the coordinator allows them ([A-Za-z0-9._-]{1,249}) fit this many bytes;
# bounds the key of a record.
GROUP_ID_BYTES_MAX = 249
PARTITION_MAX = 2**31 - 1  # an i32 in the key
OFFSET_MAX = 2**63 - 1  # Kafka offsets are i64
# Records appended between snapshots (at least as many as the live offsets, see above).
# A larger value makes fewer snapshots and a longer replay on open: 50k records of ~100
# bytes replay in well under a second.
SNAPSHOT_EVERY_RECORDS = 50_000

# The internal log's segments: a snapshot rolls the log anyway, so a segment holds at most
# about one snapshot interval (~5 MiB at 100 bytes a record). 16 MiB (not the 1 GiB of a
# topic) keeps what a crash recovery scans small.
SEGMENT_BYTES = 16 * MiB
# The largest batch the internal log takes: one commit. Larger than any request the gRPC
# server is likely to pass through, and it fits a batch of PARTITIONS_PER_COMMIT_MAX
# tombstones (asserted below).
COMMIT_BYTES_MAX = 16 * MiB
# Each index is preallocated to this; a 16 MiB segment with an entry every 4096 bytes needs
# 4096 entries of at most 12 bytes (48 KiB).
INDEX_BYTES_MAX = 1 * MiB

OFFSETS_LOG_CONFIG = LogConfig(
    segment_bytes=SEGMENT_BYTES,
    segment_ms=None,  # roll by size and by snapshot only
    retention_bytes=None,  # only snapshots delete segments: retention would lose offsets
    retention_ms=None,
    index_bytes_max=INDEX_BYTES_MAX,
    fsync=FsyncPolicy.ALWAYS,  # every commit is fsynced before it is acknowledged anyway
    batch_bytes_max=COMMIT_BYTES_MAX,
)

# The key has the bytes of Kafka's OffsetCommitKey (versions 0 and 1; lengths there are i16).
KEY_VERSION = 1
_KEY_HEAD = struct.Struct(">hH")  # version, group length
_STR_LENGTH = struct.Struct(">H")  # topic length
_PARTITION = struct.Struct(">i")
KEY_BYTES_MAX = (
    _KEY_HEAD.size + GROUP_ID_BYTES_MAX + _STR_LENGTH.size + TOPIC_NAME_CHARS_MAX + _PARTITION.size
)
# Per-record framing of RecordBatch v2 at its widest for a tombstone: length varint (5),
# attributes (1), timestamp delta (10), offset delta (5), key length (5), null value (1),
# header count (1).
RECORD_FRAMING_BYTES_MAX = 28
TOMBSTONE_BATCH_BYTES_MAX = HEADER_BYTES + PARTITIONS_PER_COMMIT_MAX * (
    KEY_BYTES_MAX + RECORD_FRAMING_BYTES_MAX
)
assert TOMBSTONE_BATCH_BYTES_MAX <= COMMIT_BYTES_MAX
# Group and topic lengths are u16 in the key.
assert GROUP_ID_BYTES_MAX < 2**16
assert TOPIC_NAME_CHARS_MAX < 2**16

TopicPartition = tuple[str, int]


class InvalidCommitError(InvalidConfigError):
    """A commit the store refuses as malformed: an offset or partition out of range, or
    metadata that is not a str of valid UTF-8. (Metadata too long: LimitExceededError.)

    An InvalidConfigError, as the group layer's other bad-argument errors, so the gRPC edge
    answers INVALID_ARGUMENT without knowing this class."""


@dataclass(frozen=True, slots=True)
class CommittedOffset:
    offset: int
    metadata: str
    commit_time_ms: int


# ---------------------------------------------------------------------------- records
def _encode_key(group: bytes, topic: str, partition: int) -> bytes:
    topic_bytes = topic.encode()
    return b"".join(
        (
            _KEY_HEAD.pack(KEY_VERSION, len(group)),
            group,
            _STR_LENGTH.pack(len(topic_bytes)),
            topic_bytes,
            _PARTITION.pack(partition),
        )
    )


def _decode_key(key: bytes) -> tuple[str, str, int]:
    """(group, topic, partition); ValueError (or struct.error) for bytes that are not a key."""
    version, group_len = _KEY_HEAD.unpack_from(key, 0)
    if version != KEY_VERSION:
        raise ValueError(f"key version {version}, expected {KEY_VERSION}")
    pos = _KEY_HEAD.size
    group = key[pos : pos + group_len].decode()
    pos += group_len
    (topic_len,) = _STR_LENGTH.unpack_from(key, pos)
    pos += _STR_LENGTH.size
    topic = key[pos : pos + topic_len].decode()
    pos += topic_len
    (partition,) = _PARTITION.unpack_from(key, pos)
    pos += _PARTITION.size
    if pos != len(key):
        raise ValueError(f"key of {len(key)} bytes has {len(key) - pos} bytes left over")
    return group, topic, partition


def _encode_value(offset: int, metadata: str, commit_time_ms: int) -> bytes:
    value = {"offset": offset, "metadata": metadata, "commit_time_ms": commit_time_ms}
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _decode_value(value: bytes) -> CommittedOffset:
    doc = json.loads(value)
    if not isinstance(doc, dict):
        raise ValueError(f"value is a {type(doc).__name__}, not an object")
    return CommittedOffset(
        _int(doc.get("offset"), "offset"),
        _str(doc.get("metadata"), "metadata"),
        _int(doc.get("commit_time_ms"), "commit_time_ms"),
    )


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} is {value!r}, not an integer")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is {value!r}, not a string")
    return value


def _group_bytes(group: str) -> bytes:
    if not isinstance(group, str):
        raise InvalidNameError(f"a group id must be a str, got {type(group).__name__}")
    try:
        encoded = group.encode()
    except UnicodeEncodeError:
        raise InvalidNameError(f"group id {group[:64]!r} is not valid UTF-8") from None
    if not 0 < len(encoded) <= GROUP_ID_BYTES_MAX:
        raise InvalidNameError(
            f"group id {group[:64]!r} is {len(encoded)} bytes of UTF-8; a group id is 1 to "
            f"{GROUP_ID_BYTES_MAX}"
        )
    return encoded


# ---------------------------------------------------------------------------- the store
class OffsetStore(ReplayedLog):
    """Committed offsets per group and partition, durable in the `__consumer_offsets` log."""

    CONTENTS = "committed offsets"
    RECORD_NOUN = "a committed offset"
    STORE_NOUN = "offsets store"
    LOGGER = log

    def __init__(self, plog: PartitionLog) -> None:
        """Use `OffsetStore.open`."""
        # This module's `atomic_write`, looked up now: a test patches it to count snapshots.
        super().__init__(plog, SNAPSHOT_FILE_NAME, atomic_write)
        self._groups: dict[str, dict[TopicPartition, CommittedOffset]] = {}
        self._offsets_count = 0

    @classmethod
    def open(cls, data_dir: Path, now_ms: int, log_config: LogConfig | None = None) -> OffsetStore:
        """Open (or create) the store in `data_dir`: load the snapshot, replay the log.

        `now_ms` is the caller's clock at open; nothing in the store depends on it yet (it is
        where offset expiry, Kafka's offsets.retention.minutes, would start).
        Raises StorageError when the snapshot or the log cannot be read whole.
        """
        config = OFFSETS_LOG_CONFIG if log_config is None else log_config
        if config.batch_bytes_max < TOMBSTONE_BATCH_BYTES_MAX:
            raise InvalidConfigError(
                f"the offsets log needs batch_bytes_max >= {TOMBSTONE_BATCH_BYTES_MAX} "
                f"(a batch of {PARTITIONS_PER_COMMIT_MAX} tombstones), got "
                f"{config.batch_bytes_max}"
            )
        del now_ms
        return open_replayed(cls, Path(data_dir) / OFFSETS_LOG_DIR_NAME, config)

    # ------------------------------------------------------------------ reads
    def fetch(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, CommittedOffset]:
        """The group's committed offsets: of `partitions` (those that have one), or all."""
        with self._lock:
            self._check_open()
            offsets = self._groups.get(group)
            if offsets is None:
                return {}
            if partitions is None:
                return dict(offsets)
            return {tp: offsets[tp] for tp in partitions if tp in offsets}

    def groups(self) -> list[str]:
        """The groups with at least one committed offset, sorted."""
        with self._lock:
            self._check_open()
            return sorted(self._groups)

    # ------------------------------------------------------------------ writes
    def commit(
        self,
        group: str,
        offsets: Mapping[TopicPartition, tuple[int, str]],
        now_ms: int,
    ) -> None:
        """Commit (offset, metadata) per partition for `group`, all or nothing; returns once
        the commit is on stable storage.

        Raises InvalidNameError (group id, topic), InvalidCommitError (offset or partition out
        of range, metadata not UTF-8), LimitExceededError (metadata bytes, partitions per
        commit, groups, offsets, the encoded batch's bytes).
        """
        group_bytes = _group_bytes(group)
        if len(offsets) > PARTITIONS_PER_COMMIT_MAX:
            raise LimitExceededError(
                f"{len(offsets)} partitions in one commit; the limit is {PARTITIONS_PER_COMMIT_MAX}"
            )
        records: list[NewRecord] = []
        for (topic, partition), (offset, metadata) in offsets.items():
            validate_topic_name(topic)
            if isinstance(partition, bool) or not isinstance(partition, int):
                raise InvalidCommitError(f"partition {partition!r} of {topic} is not an integer")
            if not 0 <= partition <= PARTITION_MAX:
                raise InvalidCommitError(
                    f"partition {partition} of {topic} is outside [0, {PARTITION_MAX}]"
                )
            if isinstance(offset, bool) or not isinstance(offset, int):
                raise InvalidCommitError(f"offset {offset!r} for {topic}-{partition} is not an int")
            if not 0 <= offset <= OFFSET_MAX:
                raise InvalidCommitError(
                    f"offset {offset} for {topic}-{partition} is outside [0, {OFFSET_MAX}]"
                )
            try:
                metadata_bytes = len(metadata.encode())
            except (UnicodeEncodeError, AttributeError):
                raise InvalidCommitError(
                    f"metadata for {topic}-{partition} is not a str of valid UTF-8"
                ) from None
            if metadata_bytes > METADATA_BYTES_MAX:
                raise LimitExceededError(
                    f"metadata for {topic}-{partition} is {metadata_bytes} bytes of UTF-8; "
                    f"the limit is {METADATA_BYTES_MAX}"
                )
            key = _encode_key(group_bytes, topic, partition)
            records.append(NewRecord(key, _encode_value(offset, metadata, now_ms), now_ms))
        if not records:
            return
        batch = encode_batch(records)
        with self._lock:
            self._check_open()
            current = self._groups.get(group)
            if current is None and len(self._groups) >= GROUPS_MAX:
                raise LimitExceededError(
                    f"{len(self._groups)} groups have committed offsets; the limit is "
                    f"{GROUPS_MAX}: commit for group {group!r} refused"
                )
            new = len(offsets) if current is None else sum(tp not in current for tp in offsets)
            if self._offsets_count + new > OFFSETS_MAX:
                raise LimitExceededError(
                    f"{self._offsets_count} committed offsets are stored and this commit adds "
                    f"{new}; the limit is {OFFSETS_MAX}"
                )
            if len(batch) > self._log.config.batch_bytes_max:
                raise LimitExceededError(
                    f"commit of {len(records)} partitions encodes to {len(batch)} bytes; the "
                    f"offsets log takes batches up to {self._log.config.batch_bytes_max} bytes"
                )
            self._append_locked([(batch, records)], now_ms, durable=True)

    def delete_group(self, group: str, now_ms: int) -> None:
        """Delete every committed offset of `group` (tombstones); durable on return."""
        with self._lock:
            self._check_open()
            offsets = self._groups.get(group)
            if offsets:
                self._delete_locked([(group, tp) for tp in offsets], now_ms)

    def delete_topic(self, topic: str, now_ms: int) -> None:
        """Delete every group's committed offsets on `topic` (call when the topic is deleted);
        durable on return."""
        with self._lock:
            self._check_open()
            doomed = [
                (group, tp)
                for group, offsets in self._groups.items()
                for tp in offsets
                if tp[0] == topic
            ]
            if doomed:
                self._delete_locked(doomed, now_ms)

    def _delete_locked(self, doomed: Sequence[tuple[str, TopicPartition]], now_ms: int) -> None:
        tombstones = [
            NewRecord(_encode_key(group.encode(), topic, partition), None, now_ms)
            for group, (topic, partition) in doomed
        ]
        self._append_locked(
            self._batches(tombstones, PARTITIONS_PER_COMMIT_MAX), now_ms, durable=True
        )

    # ------------------------------------------------------------------ replay
    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        """Apply one record to the map: the one way the map changes."""
        if key is None:
            raise ValueError("record has no key")
        group, topic, partition = _decode_key(key)
        committed = None if value is None else _decode_value(value)
        tp = (topic, partition)
        groups = self._groups
        offsets = groups.get(group)
        if committed is not None:
            if offsets is None:
                offsets = groups[group] = {}
            if tp not in offsets:
                self._offsets_count += 1
            offsets[tp] = committed
        elif offsets is not None and offsets.pop(tp, None) is not None:
            self._offsets_count -= 1
            if not offsets:
                del groups[group]

    def _snapshot_due(self) -> bool:
        return self._records_since_snapshot >= max(SNAPSHOT_EVERY_RECORDS, self._offsets_count)

    def _describe(self) -> str:
        return f"{self._offsets_count} offsets of {len(self._groups)} groups"

    # ------------------------------------------------------------------ snapshot
    def _decode_snapshot(self, raw: bytes) -> int:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError(f"a {type(doc).__name__}, not an object")
        if doc.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {SNAPSHOT_FORMAT}")
        covered = _int(doc.get("log_offset"), "log_offset")
        groups = doc.get("groups")
        if not isinstance(groups, dict):
            raise ValueError("groups is not an object")
        for group, entries in groups.items():
            if not isinstance(entries, list) or not entries:
                raise ValueError(f"group {group!r} has no list of offsets")
            offsets: dict[TopicPartition, CommittedOffset] = {}
            for entry in entries:
                if not isinstance(entry, list) or len(entry) != 5:
                    raise ValueError(f"group {group!r}: entry {entry!r} is not 5 fields")
                topic, partition, offset, metadata, commit_time_ms = entry
                tp = (_str(topic, "topic"), _int(partition, "partition"))
                offsets[tp] = CommittedOffset(
                    _int(offset, "offset"),
                    _str(metadata, "metadata"),
                    _int(commit_time_ms, "commit_time_ms"),
                )
            self._groups[group] = offsets
            self._offsets_count += len(offsets)
        return covered

    def _encode_snapshot(self, log_offset: int) -> bytes:
        doc = {
            "format": SNAPSHOT_FORMAT,
            "log_offset": log_offset,
            "groups": {
                group: [
                    [t, p, c.offset, c.metadata, c.commit_time_ms] for (t, p), c in offs.items()
                ]
                for group, offs in self._groups.items()
            },
        }
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


__all__ = [
    "GROUPS_MAX",
    "METADATA_BYTES_MAX",
    "OFFSETS_LOG_CONFIG",
    "PARTITIONS_PER_COMMIT_MAX",
    "SNAPSHOT_EVERY_RECORDS",
    "CommittedOffset",
    "InvalidCommitError",
    "OffsetStore",
]
