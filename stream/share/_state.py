"""The state of share groups, kept durable in the internal log `__share_group_state`.

The store keeps, per share group, its settings (`config`) and per share-partition the records
the share manager wrote for it: the last SNAPSHOT (the share-partition's whole window) and the
DELTAs after it (changes to the window). It does not interpret them: values are opaque bytes
of the manager (stream/share/_window.py, stream/_share.py), which rebuilds a window on start
by applying the snapshot, then the deltas in order, and writes a new snapshot once a
share-partition has ~32 deltas.

A `ShareStateStore` is a `ReplayedLog` (stream/_internal_log.py): a write turns entries into
records, appends them as one batch and applies them to memory with `_apply`, the function
that also rebuilds memory on open, so a reopened store holds what the live one held.

On disk (one PartitionLog, not a topic of the catalog, which reserves the name:
storage._catalog.INTERNAL_TOPIC_NAMES):

    <data_dir>/__share_group_state-0/              the log (segments, indexes, recovery point)
    <data_dir>/__share_group_state-0/snapshot.bin  the whole store at a log offset (below)

Records (big-endian, one per group config or per share-partition change):

    key    version i16 = 1 | kind i8 | group length u16 | group UTF-8 | topic length u16 |
           topic UTF-8 | partition i32
           kind 0: the group's config (topic "" and partition -1)
           kind 1: a share-partition's state
    value  kind 0: the config bytes; null (a tombstone) deletes the whole group: its config
                   and every share-partition, in one record
           kind 1: StateKind u8 (0 SNAPSHOT: replaces what is kept for the share-partition;
                   1 DELTA: appended to it) | the opaque bytes;
                   null (a tombstone) deletes the share-partition's state

What is durable when. The log's fsync policy is `never`: appending does not fsync, and the
store fsyncs (`PartitionLog.flush`) exactly when a caller asks for durability. A durable call
(`write(durable=True)`, `write_config`, the deletes, `flush`) returns only after the fsync,
which covers it and every write before it. A non-durable write is in memory and in the OS
page cache when it returns: it survives a crash of the process, and a power loss only once
a later fsync covers it (a durable call, a snapshot, a clean close; or the OS writing back).
`never` rather than `interval`: the manager marks what must be durable (acknowledgements)
and what may be lost (delivery counts, proto/riverlog/v1/share.proto); `interval` would add
an fsync to whichever non-durable write crosses the interval, a latency spike on the acquire
path, for a bound it only keeps while writes keep coming.

Crash atomicity: a `write` is ONE RecordBatch with a record per entry, so after a crash it is
there whole or not at all (recovery cuts a torn batch); its entries apply in order (two for
one share-partition: the second applies after the first). `write_config` and `delete_group`
are one record. `delete_partitions` and `delete_topic` write tombstones in batches of up to
TOMBSTONES_PER_BATCH_MAX: a crash part-way leaves a prefix deleted (the manager deletes again
what it finds of a topic that is gone).

Snapshot file (written whole by `atomic_write`; the CRC catches damage, not torn writes):

    magic "RLSS" | format u16 = 1 | log_offset i64 (the log end offset it covers) |
    group count u32 | groups | CRC32C u32 of every byte before it
    group      = group length u16 | group UTF-8 | config length i32 (-1: none) | config |
                 share-partition count u32 | share-partitions
    share-partition = topic length u16 | topic UTF-8 | partition i32 |
                 snapshot length i32 (-1: none) | snapshot | delta count u32 |
                 (delta length u32 | delta) per delta

It is written once the records appended since the last one reach max(SNAPSHOT_EVERY_RECORDS,
kept values) or their bytes reach max(SNAPSHOT_EVERY_BYTES, kept bytes), so snapshot writing
costs O(1) amortized per appended byte and the log stays bounded (the steps, and why a crash
between them is harmless: stream/_internal_log.py). A snapshot or a record that cannot be read
refuses to open (StorageError naming the file): acknowledged state is never dropped silently.
Measured here near the limits (100,000 share-partitions, each a 300-byte snapshot and 16
deltas of 40 bytes: 1.7M values, ~200 MB charged): a snapshot encodes in ~0.5 s (100 MB,
written under the store's lock by the write that crosses the interval) and decodes in ~1.2 s;
replaying the 1.65M records the interval then allows takes ~4 s on open.

Limits (LimitExceededError with the numbers; the manager stays below them in normal use):
SHARE_GROUPS_MAX groups, SHARE_PARTITIONS_MAX share-partitions over all groups,
DELTAS_MAX_PER_PARTITION deltas kept per share-partition, VALUE_BYTES_MAX per value,
ENTRIES_PER_WRITE_MAX entries and the log's batch_bytes_max (WRITE_BYTES_MAX) per write,
and STATE_BYTES_MAX of kept values in memory overall. Names: group ids as consumer groups'
([A-Za-z0-9._-]{1,249}, InvalidNameError), topics as `validate_topic_name`; partitions
0..2**31-1 (InvalidConfigError).

Thread safety: one lock around every public method.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from storage import (
    HEADER_BYTES,
    FsyncPolicy,
    InvalidConfigError,
    InvalidNameError,
    LimitExceededError,
    LogConfig,
    NewRecord,
    PartitionLog,
    crc32c,
    encode_batch,
    validate_topic_name,
)
from storage._catalog import INTERNAL_TOPIC_NAMES, TOPIC_NAME_CHARS_MAX
from storage._config import MiB

from .._internal_log import ReplayedLog, open_replayed
from ..groups._coordinator import GROUP_ID_PATTERN

log = logging.getLogger("riverlog.share")

# Partition 0 of the internal topic, named as a topic's partition directory; the catalog
# reserves the topic name and keeps the directory.
SHARE_STATE_LOG_DIR_NAME = "__share_group_state-0"
assert SHARE_STATE_LOG_DIR_NAME.rsplit("-", 1)[0] in INTERNAL_TOPIC_NAMES
SNAPSHOT_FILE_NAME = "snapshot.bin"
SNAPSHOT_FORMAT = 1
SNAPSHOT_MAGIC = b"RLSS"

# ---------------------------------------------------------------------------- limits
# Share groups with state. Bounds memory and the snapshot, with the two below.
SHARE_GROUPS_MAX = 1_000
# Share-partitions with state over all groups (each costs a few hundred bytes of memory
# besides its values).
SHARE_PARTITIONS_MAX = 100_000
# Deltas kept per share-partition after its snapshot; the manager writes a snapshot after
# ~32, so this is only reached by a bug.
DELTAS_MAX_PER_PARTITION = 1_000
# One value (a config, a snapshot, a delta): a window of 2,000 in-flight records encodes to
# a few tens of KiB at most.
VALUE_BYTES_MAX = 1 * MiB
# What a kept value costs in memory besides its bytes (the bytes object's header, its slot
# in a list, allocator rounding): charged so that many tiny deltas are bounded too.
VALUE_OVERHEAD_BYTES = 64
# Kept values in memory overall, each charged its length + VALUE_OVERHEAD_BYTES. A
# share-partition with a snapshot of a few hundred bytes and 16 deltas (half the manager's
# interval) of a few dozen is charged ~2.5 KiB: this holds ~100,000 of them, about
# SHARE_PARTITIONS_MAX; larger windows reach this limit first.
STATE_BYTES_MAX = 256 * MiB
# Entries in one write: bounds the work done under the store's lock.
ENTRIES_PER_WRITE_MAX = 10_000
# Tombstones per batch of a delete (a delete larger than this is several batches).
TOMBSTONES_PER_BATCH_MAX = 10_000
# Records appended between snapshots (at least as many as the kept values): 50k records
# replay in well under a second on open.
SNAPSHOT_EVERY_RECORDS = 50_000
# Bytes appended between snapshots (at least as many as the kept bytes): bounds the log when
# values are large, and the bytes replayed on open.
SNAPSHOT_EVERY_BYTES = 64 * MiB

# The internal log's segments: a snapshot rolls the log anyway; 16 MiB keeps what a crash
# recovery scans small.
SEGMENT_BYTES = 16 * MiB
# The largest batch, so the largest write: room for 15 values of VALUE_BYTES_MAX.
WRITE_BYTES_MAX = 16 * MiB
# Each index is preallocated to this; a 16 MiB segment with an entry every 4096 bytes needs
# 4096 entries of at most 12 bytes (48 KiB).
INDEX_BYTES_MAX = 1 * MiB

SHARE_STATE_LOG_CONFIG = LogConfig(
    segment_bytes=SEGMENT_BYTES,
    segment_ms=None,  # roll by size and by snapshot only
    retention_bytes=None,  # only snapshots delete segments: retention would lose state
    retention_ms=None,
    index_bytes_max=INDEX_BYTES_MAX,
    fsync=FsyncPolicy.NEVER,  # the store fsyncs when a caller asks (module docstring)
    batch_bytes_max=WRITE_BYTES_MAX,
)

GROUP_ID_BYTES_MAX = 249  # GROUP_ID_PATTERN's length, in ASCII bytes
PARTITION_MAX = 2**31 - 1  # an i32 in the key
KEY_VERSION = 1
_KEY_CONFIG = 0  # the key's kind: a group's config
_KEY_PARTITION = 1  # the key's kind: a share-partition's state
_KEY_HEAD = struct.Struct(">hbH")  # version, kind, group length
_STR_LENGTH = struct.Struct(">H")  # topic length
_PARTITION = struct.Struct(">i")
KEY_BYTES_MAX = (
    _KEY_HEAD.size + GROUP_ID_BYTES_MAX + _STR_LENGTH.size + TOPIC_NAME_CHARS_MAX + _PARTITION.size
)
# Per-record framing of RecordBatch v2 at its widest: length varint (5), attributes (1),
# timestamp delta (10), offset delta (5), key length (5), value length (5; 1 for a null
# value), header count (1).
RECORD_FRAMING_BYTES_MAX = 32
TOMBSTONE_FRAMING_BYTES_MAX = 28
TOMBSTONE_BATCH_BYTES_MAX = HEADER_BYTES + TOMBSTONES_PER_BATCH_MAX * (
    KEY_BYTES_MAX + TOMBSTONE_FRAMING_BYTES_MAX
)
# A write of one value of the largest size (StateKind byte included) always fits a batch.
ONE_VALUE_BATCH_BYTES_MAX = (
    HEADER_BYTES + RECORD_FRAMING_BYTES_MAX + KEY_BYTES_MAX + 1 + (VALUE_BYTES_MAX)
)
BATCH_BYTES_NEEDED = max(TOMBSTONE_BATCH_BYTES_MAX, ONE_VALUE_BATCH_BYTES_MAX)
assert BATCH_BYTES_NEEDED <= WRITE_BYTES_MAX
assert GROUP_ID_BYTES_MAX < 2**16
assert TOPIC_NAME_CHARS_MAX < 2**16
assert GROUP_ID_PATTERN.pattern.endswith(f"{{1,{GROUP_ID_BYTES_MAX}}}")
# A value's length is an i32 (config, snapshot) or u32 (delta) in the snapshot file.
assert VALUE_BYTES_MAX < 2**31

# The snapshot file's fields (big-endian).
_SNAP_HEAD = struct.Struct(">4sHqI")  # magic, format, log_offset, group count
_U16 = struct.Struct(">H")  # a name's length
_I32 = struct.Struct(">i")  # a partition; an optional value's length (-1: none)
_U32 = struct.Struct(">I")  # a count; a delta's length; the CRC32C


class StateKind(enum.IntEnum):
    """What a share-partition's value is."""

    SNAPSHOT = 0  # a share-partition's whole state: replaces what was kept for it
    DELTA = 1  # a change after the snapshot: appended to what is kept


class StateEntry(NamedTuple):
    group: str
    topic: str
    partition: int
    kind: StateKind
    value: bytes  # opaque


@dataclass
class SharePartitionRecords:
    snapshot: bytes | None  # the last SNAPSHOT value (None if only deltas so far)
    deltas: list[bytes] = field(default_factory=list)  # DELTA values after it, in order


@dataclass
class ShareGroupState:
    config: bytes | None  # opaque group settings (the manager writes JSON)
    partitions: dict[tuple[str, int], SharePartitionRecords] = field(default_factory=dict)


# ---------------------------------------------------------------------------- records
def _encode_key(kind: int, group: str, topic: str, partition: int) -> bytes:
    group_bytes = group.encode()
    topic_bytes = topic.encode()
    return b"".join(
        (
            _KEY_HEAD.pack(KEY_VERSION, kind, len(group_bytes)),
            group_bytes,
            _STR_LENGTH.pack(len(topic_bytes)),
            topic_bytes,
            _PARTITION.pack(partition),
        )
    )


def _config_key(group: str) -> bytes:
    return _encode_key(_KEY_CONFIG, group, "", -1)


def _partition_key(group: str, topic: str, partition: int) -> bytes:
    return _encode_key(_KEY_PARTITION, group, topic, partition)


def _decode_key(key: bytes) -> tuple[int, str, str, int]:
    """(kind, group, topic, partition); ValueError (or struct.error) for bytes that are not
    a key of this store."""
    version, kind, group_len = _KEY_HEAD.unpack_from(key, 0)
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
    if not group:
        raise ValueError("key has an empty group id")
    if kind == _KEY_CONFIG:
        if (topic, partition) != ("", -1):
            raise ValueError(f"config key names {topic!r} partition {partition}")
    elif kind == _KEY_PARTITION:
        if not topic or partition < 0:
            raise ValueError(f"share-partition key names {topic!r} partition {partition}")
    else:
        raise ValueError(f"key kind {kind}, expected {_KEY_CONFIG} or {_KEY_PARTITION}")
    return kind, group, topic, partition


def _cost(value: bytes | None) -> int:
    """What a kept value is charged against STATE_BYTES_MAX."""
    return 0 if value is None else len(value) + VALUE_OVERHEAD_BYTES


def _records_cost(records: SharePartitionRecords) -> int:
    return _cost(records.snapshot) + sum(_cost(d) for d in records.deltas)


def _check_group(group: str) -> None:
    if not isinstance(group, str):
        raise InvalidNameError(f"a share group id must be a str, got {type(group).__name__}")
    if GROUP_ID_PATTERN.fullmatch(group) is None:
        raise InvalidNameError(
            f"share group id {group[:64]!r} must match [A-Za-z0-9._-]{{1,{GROUP_ID_BYTES_MAX}}}"
        )


def _check_partition(topic: str, partition: int) -> None:
    validate_topic_name(topic)
    if isinstance(partition, bool) or not isinstance(partition, int):
        raise InvalidConfigError(f"partition {partition!r} of {topic} is not an integer")
    if not 0 <= partition <= PARTITION_MAX:
        raise InvalidConfigError(
            f"partition {partition} of {topic} is outside [0, {PARTITION_MAX}]"
        )


def _check_value(value: bytes, what: str) -> None:
    if not isinstance(value, bytes):
        raise InvalidConfigError(f"{what} is a {type(value).__name__}, not bytes")
    if len(value) > VALUE_BYTES_MAX:
        raise LimitExceededError(
            f"{what} is {len(value)} bytes; the limit is {VALUE_BYTES_MAX} per value"
        )


# ---------------------------------------------------------------------------- snapshot file
class _Reader:
    """A cursor over the snapshot file's bytes: ValueError when a field runs past the end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise ValueError(f"a field of {size} bytes at byte {self.pos} runs past the end")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size))

    def name(self) -> str:
        (length,) = self.unpack(_U16)
        return self.take(length).decode()

    def optional(self) -> bytes | None:
        (length,) = self.unpack(_I32)
        return None if length == -1 else self.take(length)


def _encode_snapshot_file(groups: dict[str, ShareGroupState], log_offset: int) -> bytes:
    parts = [_SNAP_HEAD.pack(SNAPSHOT_MAGIC, SNAPSHOT_FORMAT, log_offset, len(groups))]
    add = parts.append
    for group, state in groups.items():
        name = group.encode()
        add(_U16.pack(len(name)))
        add(name)
        if state.config is None:
            add(_I32.pack(-1))
        else:
            add(_I32.pack(len(state.config)))
            add(state.config)
        add(_U32.pack(len(state.partitions)))
        for (topic, partition), records in state.partitions.items():
            topic_bytes = topic.encode()
            add(_U16.pack(len(topic_bytes)))
            add(topic_bytes)
            add(_I32.pack(partition))
            if records.snapshot is None:
                add(_I32.pack(-1))
            else:
                add(_I32.pack(len(records.snapshot)))
                add(records.snapshot)
            add(_U32.pack(len(records.deltas)))
            for delta in records.deltas:
                add(_U32.pack(len(delta)))
                add(delta)
    body = b"".join(parts)
    return body + _U32.pack(crc32c(body))


def _decode_snapshot_file(raw: bytes) -> tuple[int, dict[str, ShareGroupState]]:
    """(log_offset, groups); ValueError for bytes that are not a whole snapshot file."""
    if len(raw) < _SNAP_HEAD.size + _U32.size:
        raise ValueError(f"{len(raw)} bytes, shorter than a header and a CRC")
    body = raw[: -_U32.size]
    (stored,) = _U32.unpack(raw[-_U32.size :])
    if crc32c(body) != stored:
        raise ValueError(f"CRC32C {crc32c(body):#010x}, the file says {stored:#010x}")
    reader = _Reader(body)
    magic, version, log_offset, group_count = reader.unpack(_SNAP_HEAD)
    if magic != SNAPSHOT_MAGIC:
        raise ValueError(f"magic {magic!r}, expected {SNAPSHOT_MAGIC!r}")
    if version != SNAPSHOT_FORMAT:
        raise ValueError(f"format {version}, expected {SNAPSHOT_FORMAT}")
    groups: dict[str, ShareGroupState] = {}
    for _ in range(group_count):
        group = reader.name()
        if not group or group in groups:
            raise ValueError(f"group id {group!r} is empty or repeated")
        state = ShareGroupState(reader.optional(), {})
        (partition_count,) = reader.unpack(_U32)
        for _ in range(partition_count):
            topic = reader.name()
            (partition,) = reader.unpack(_I32)
            if not topic or partition < 0 or (topic, partition) in state.partitions:
                raise ValueError(f"group {group!r}: share-partition {topic!r} {partition} is bad")
            snapshot = reader.optional()
            (delta_count,) = reader.unpack(_U32)
            deltas = []
            for _ in range(delta_count):
                (length,) = reader.unpack(_U32)
                deltas.append(reader.take(length))
            if snapshot is None and not deltas:
                raise ValueError(f"group {group!r}: {topic}-{partition} holds nothing")
            state.partitions[(topic, partition)] = SharePartitionRecords(snapshot, deltas)
        if state.config is None and not state.partitions:
            raise ValueError(f"group {group!r} holds nothing")
        groups[group] = state
    if reader.pos != len(body):
        raise ValueError(f"{len(body) - reader.pos} bytes left over after {group_count} groups")
    return log_offset, groups


# ---------------------------------------------------------------------------- the store
class ShareStateStore(ReplayedLog):
    """Share groups' configs and share-partition states, durable in `__share_group_state`."""

    CONTENTS = "share-group state"
    RECORD_NOUN = "a share-group state record"
    STORE_NOUN = "share state store"
    LOGGER = log

    def __init__(self, plog: PartitionLog) -> None:
        """Use `ShareStateStore.open`."""
        super().__init__(plog, SNAPSHOT_FILE_NAME)
        self._groups: dict[str, ShareGroupState] = {}
        self._partitions_count = 0
        self._values_count = 0  # configs, snapshots and deltas kept
        self._kept_bytes = 0  # their _cost

    @classmethod
    def open(
        cls, data_dir: Path, now_ms: int, log_config: LogConfig | None = None
    ) -> ShareStateStore:
        """Open (or create) the store in `data_dir`: load the snapshot, replay the log.

        `now_ms` is the caller's clock at open; nothing in the store depends on it.
        Raises StorageError (the file named) when the snapshot or the log cannot be read
        whole; InvalidConfigError for a `log_config` whose batches cannot hold a delete's
        batch or a value of VALUE_BYTES_MAX.
        """
        config = SHARE_STATE_LOG_CONFIG if log_config is None else log_config
        if config.batch_bytes_max < BATCH_BYTES_NEEDED:
            raise InvalidConfigError(
                f"the share state log needs batch_bytes_max >= {BATCH_BYTES_NEEDED} (a batch "
                f"of {TOMBSTONES_PER_BATCH_MAX} tombstones, or of one value of "
                f"{VALUE_BYTES_MAX} bytes), got {config.batch_bytes_max}"
            )
        del now_ms
        return open_replayed(cls, Path(data_dir) / SHARE_STATE_LOG_DIR_NAME, config)

    # ------------------------------------------------------------------ reads
    def load(self) -> dict[str, ShareGroupState]:
        """A copy of everything kept, by group (the broker reads it once at start)."""
        with self._lock:
            self._check_open()
            return {
                group: ShareGroupState(
                    state.config,
                    {
                        tp: SharePartitionRecords(records.snapshot, list(records.deltas))
                        for tp, records in state.partitions.items()
                    },
                )
                for group, state in self._groups.items()
            }

    def deltas_count(self, group: str, topic: str, partition: int) -> int:
        """Deltas kept for the share-partition since its snapshot (0 when none is kept)."""
        with self._lock:
            self._check_open()
            state = self._groups.get(group)
            records = None if state is None else state.partitions.get((topic, partition))
            return 0 if records is None else len(records.deltas)

    def groups(self) -> list[str]:
        """The groups with a config or a share-partition's state, sorted."""
        with self._lock:
            self._check_open()
            return sorted(self._groups)

    # ------------------------------------------------------------------ writes
    def write(self, entries: Sequence[StateEntry], *, durable: bool, now_ms: int) -> None:
        """Write share-partition states, all or nothing: ONE batch, applied in order.

        With `durable` it returns once the write (and every one before it) is on stable
        storage; without, a crash of the process keeps it and a power loss may lose it until
        the next durable call (module docstring). An empty `durable` write is a `flush`.
        Raises InvalidNameError (group id, topic), InvalidConfigError (partition, kind, a
        value that is not bytes), LimitExceededError (value bytes, entries or bytes per
        write, groups, share-partitions, deltas per share-partition, kept bytes).
        """
        if len(entries) > ENTRIES_PER_WRITE_MAX:
            raise LimitExceededError(
                f"{len(entries)} entries in one write; the limit is {ENTRIES_PER_WRITE_MAX}"
            )
        batch_bytes_max = self._log.config.batch_bytes_max
        records: list[NewRecord] = []
        payload_bytes = 0
        for entry in entries:
            group, topic, partition, kind, value = entry
            _check_group(group)
            _check_partition(topic, partition)
            try:
                kind = StateKind(kind)
            except ValueError:
                raise InvalidConfigError(
                    f"kind {kind!r} for {topic}-{partition} is not a StateKind"
                ) from None
            _check_value(value, f"the {kind.name} value for {topic}-{partition}")
            key = _partition_key(group, topic, partition)
            payload_bytes += len(key) + 1 + len(value)
            if payload_bytes > batch_bytes_max:  # before building more than a batch holds
                raise LimitExceededError(
                    f"a write of {len(entries)} entries holds more than {batch_bytes_max} "
                    f"bytes; the share state log takes batches up to {batch_bytes_max} bytes"
                )
            records.append(NewRecord(key, bytes((kind,)) + value, now_ms))
        batch = encode_batch(records) if records else b""
        if len(batch) > batch_bytes_max:
            raise LimitExceededError(
                f"a write of {len(entries)} entries encodes to {len(batch)} bytes; the share "
                f"state log takes batches up to {batch_bytes_max} bytes"
            )
        with self._lock:
            self._check_open()
            if not records:
                if durable:
                    self._log.flush(now_ms)
                return
            self._check_limits_locked(entries)
            self._append_locked([(batch, records)], now_ms, durable=durable)

    def flush(self, now_ms: int) -> None:
        """Make every write so far durable (fsync the log)."""
        with self._lock:
            self._check_open()
            self._log.flush(now_ms)

    def write_config(self, group: str, config: bytes, now_ms: int) -> None:
        """Set the group's config (creating the group); durable on return."""
        _check_group(group)
        _check_value(config, f"the config of share group {group!r}")
        record = NewRecord(_config_key(group), config, now_ms)
        with self._lock:
            self._check_open()
            state = self._groups.get(group)
            if state is None:
                self._check_groups_locked(1, group)
            old = None if state is None else state.config
            self._check_bytes_locked(self._kept_bytes + _cost(config) - _cost(old))
            self._append_locked([(encode_batch([record]), [record])], now_ms, durable=True)

    def delete_group(self, group: str, now_ms: int) -> None:
        """Forget the group: its config and every share-partition's state, in one record (a
        tombstone of its config key); durable on return. Nothing is written for a group the
        store does not keep."""
        _check_group(group)
        with self._lock:
            self._check_open()
            if group in self._groups:
                record = NewRecord(_config_key(group), None, now_ms)
                self._append_locked([(encode_batch([record]), [record])], now_ms, durable=True)

    def delete_partitions(
        self, group: str, partitions: Iterable[tuple[str, int]], now_ms: int
    ) -> None:
        """Forget the state of the group's `partitions` (those it has); its config stays.
        Durable on return."""
        _check_group(group)
        wanted = list(partitions)
        for topic, partition in wanted:
            _check_partition(topic, partition)
        with self._lock:
            self._check_open()
            state = self._groups.get(group)
            if state is None:
                return
            doomed = [(group, tp) for tp in dict.fromkeys(wanted) if tp in state.partitions]
            self._delete_locked(doomed, now_ms)

    def delete_topic(self, topic: str, now_ms: int) -> None:
        """Forget every group's share-partitions of `topic` (call when the topic is deleted);
        durable on return."""
        validate_topic_name(topic)
        with self._lock:
            self._check_open()
            doomed = [
                (group, tp)
                for group, state in self._groups.items()
                for tp in state.partitions
                if tp[0] == topic
            ]
            self._delete_locked(doomed, now_ms)

    def _delete_locked(self, doomed: Sequence[tuple[str, tuple[str, int]]], now_ms: int) -> None:
        if not doomed:
            return
        tombstones = [
            NewRecord(_partition_key(group, topic, partition), None, now_ms)
            for group, (topic, partition) in doomed
        ]
        self._append_locked(
            self._batches(tombstones, TOMBSTONES_PER_BATCH_MAX), now_ms, durable=True
        )

    # ------------------------------------------------------------------ limits
    def _check_limits_locked(self, entries: Sequence[StateEntry]) -> None:
        """Refuse a write that would pass a limit, by applying it to counters in order."""
        new_groups: set[str] = set()
        # (group, topic, partition) -> (deltas kept, their cost and the snapshot's)
        touched: dict[tuple[str, str, int], tuple[int, int]] = {}
        new_partitions = 0
        kept_bytes = self._kept_bytes
        for entry in entries:
            state = self._groups.get(entry.group)
            if state is None:
                new_groups.add(entry.group)
            key = (entry.group, entry.topic, entry.partition)
            before = touched.get(key)
            if before is None:
                records = (
                    None if state is None else state.partitions.get((entry.topic, entry.partition))
                )
                if records is None:
                    new_partitions += 1
                    before = (0, 0)
                else:
                    before = (len(records.deltas), _records_cost(records))
            deltas, cost = before
            if entry.kind == StateKind.SNAPSHOT:
                after = (0, _cost(entry.value))
            else:
                if deltas >= DELTAS_MAX_PER_PARTITION:
                    raise LimitExceededError(
                        f"{entry.topic}-{entry.partition} of share group {entry.group!r} keeps "
                        f"{deltas} deltas; the limit is {DELTAS_MAX_PER_PARTITION} (write a "
                        "snapshot)"
                    )
                after = (deltas + 1, cost + _cost(entry.value))
            kept_bytes += after[1] - cost
            touched[key] = after
        if new_groups:
            self._check_groups_locked(len(new_groups), min(new_groups))
        if self._partitions_count + new_partitions > SHARE_PARTITIONS_MAX:
            raise LimitExceededError(
                f"{self._partitions_count} share-partitions have state and this write adds "
                f"{new_partitions}; the limit is {SHARE_PARTITIONS_MAX}"
            )
        self._check_bytes_locked(kept_bytes)

    def _check_groups_locked(self, new: int, example: str) -> None:
        if len(self._groups) + new > SHARE_GROUPS_MAX:
            raise LimitExceededError(
                f"{len(self._groups)} share groups have state and this write adds {new} "
                f"(such as {example!r}); the limit is {SHARE_GROUPS_MAX}"
            )

    def _check_bytes_locked(self, kept_bytes: int) -> None:
        if kept_bytes > STATE_BYTES_MAX:
            raise LimitExceededError(
                f"share-group state would take {kept_bytes} bytes of memory (values and "
                f"{VALUE_OVERHEAD_BYTES} bytes each); the limit is {STATE_BYTES_MAX}"
            )

    # ------------------------------------------------------------------ replay
    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        """Apply one record to memory: the one way memory changes (checks before changes)."""
        if key is None:
            raise ValueError("record has no key")
        kind, group, topic, partition = _decode_key(key)
        state = self._groups.get(group)
        if kind == _KEY_CONFIG:
            if value is None:
                if state is not None:
                    self._forget_group(group, state)
                return
            if state is None:
                state = self._groups[group] = ShareGroupState(None, {})
            self._values_count += state.config is None
            self._kept_bytes += _cost(value) - _cost(state.config)
            state.config = value
            return
        tp = (topic, partition)
        if value is None:
            records = None if state is None else state.partitions.pop(tp, None)
            if state is None or records is None:
                return
            self._partitions_count -= 1
            self._values_count -= (records.snapshot is not None) + len(records.deltas)
            self._kept_bytes -= _records_cost(records)
            if state.config is None and not state.partitions:
                del self._groups[group]
            return
        if not value:
            raise ValueError("share-partition value has no StateKind byte")
        state_kind = StateKind(value[0])  # ValueError for an unknown kind
        body = value[1:]
        if state is None:
            state = self._groups[group] = ShareGroupState(None, {})
        records = state.partitions.get(tp)
        if records is None:
            records = state.partitions[tp] = SharePartitionRecords(None, [])
            self._partitions_count += 1
        if state_kind == StateKind.SNAPSHOT:
            self._values_count += 1 - (records.snapshot is not None) - len(records.deltas)
            self._kept_bytes += _cost(body) - _records_cost(records)
            records.snapshot = body
            records.deltas = []
        else:
            self._values_count += 1
            self._kept_bytes += _cost(body)
            records.deltas.append(body)

    def _forget_group(self, group: str, state: ShareGroupState) -> None:
        del self._groups[group]
        self._partitions_count -= len(state.partitions)
        self._values_count -= (state.config is not None) + sum(
            (r.snapshot is not None) + len(r.deltas) for r in state.partitions.values()
        )
        self._kept_bytes -= _cost(state.config) + sum(
            _records_cost(r) for r in state.partitions.values()
        )

    def _snapshot_due(self) -> bool:
        return self._records_since_snapshot >= max(
            SNAPSHOT_EVERY_RECORDS, self._values_count
        ) or self._bytes_since_snapshot >= max(SNAPSHOT_EVERY_BYTES, self._kept_bytes)

    def _describe(self) -> str:
        return (
            f"{len(self._groups)} groups, {self._partitions_count} share-partitions, "
            f"{self._values_count} values ({self._kept_bytes} bytes kept)"
        )

    # ------------------------------------------------------------------ snapshot
    def _encode_snapshot(self, log_offset: int) -> bytes:
        return _encode_snapshot_file(self._groups, log_offset)

    def _decode_snapshot(self, raw: bytes) -> int:
        log_offset, groups = _decode_snapshot_file(raw)
        for group, state in groups.items():
            self._groups[group] = state
            self._partitions_count += len(state.partitions)
            self._values_count += (state.config is not None) + sum(
                (r.snapshot is not None) + len(r.deltas) for r in state.partitions.values()
            )
            self._kept_bytes += _cost(state.config) + sum(
                _records_cost(r) for r in state.partitions.values()
            )
        return log_offset


__all__ = [
    "DELTAS_MAX_PER_PARTITION",
    "SHARE_GROUPS_MAX",
    "SHARE_PARTITIONS_MAX",
    "SHARE_STATE_LOG_CONFIG",
    "SNAPSHOT_EVERY_RECORDS",
    "STATE_BYTES_MAX",
    "VALUE_BYTES_MAX",
    "ShareGroupState",
    "SharePartitionRecords",
    "ShareStateStore",
    "StateEntry",
    "StateKind",
]
