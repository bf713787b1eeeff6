"""Idempotent-producer state of one partition (the idea of Kafka's ProducerStateManager).

A batch whose producerId is >= 0 comes from an idempotent producer. Its producerEpoch and
baseSequence let the partition refuse a batch that arrives out of order and recognise the
resend of a batch it already holds, so a retry never writes a record twice. The state
is derived from the log (the log is the truth): snapshots only shorten the replay on open.

Per producer id the partition keeps a `ProducerEntry`:

    epoch          the newest epoch seen for the id; batches from an older one are fenced
    last_seen_ms   broker time of the id's last append; None when the entry was rebuilt from
                   the log (the broker's append time is not stored there): `expire` then
                   counts it as seen at its first call, so an id is never expired early
    batches        the id's last BATCHES_CACHED batches of that epoch, oldest first, as
                   `BatchMetadata` (first_seq, last_seq, base_offset, last_offset,
                   log_append_time_ms; for a batch rebuilt from the log that time is its
                   max timestamp, as Kafka takes it)

Sequences are i32 counted per record and wrap as Kafka's do: after 2**31 - 1 comes 0, and a
batch's last sequence is (baseSequence + lastOffsetDelta) modulo 2**31.

The verdict for a batch of producer id P, epoch E, first sequence F and last sequence L:

    P has no entry          F == 0: accepted (a new id; refused past `producers_max`)
                            else UnknownProducerError (expired or never seen)
    E < entry's epoch       ProducerFencedError
    E > entry's epoch       F == 0: accepted, the entry starts afresh in epoch E
                            else OutOfOrderSequenceError (a new epoch starts at 0)
    E == entry's epoch      F == last cached L + 1: accepted (the common case, checked first)
                            (F, L) is a cached batch: a duplicate, answered with its offsets
                            else OutOfOrderSequenceError (a gap, or a resend older than the
                            cache holds)

Checking "next in order" before "duplicate" gives the same verdicts: a cached batch never
starts at the expected sequence, since the cached batches together hold fewer than 2**31
records (each holds at most batch_bytes_max / 7 of them).

Snapshot `<dir>/<offset %020d>.snapshot` holds the state after every batch below `offset`
has been applied. Big-endian; the CRC lets open tell a torn or damaged file from a good one:

    offset  size  field
         0     2  version         i16   SNAPSHOT_VERSION
         2     4  crc             u32   CRC32C (Castagnoli) of bytes [6, end)
         6     8  offset          i64   the offset in the file name
        14     4  entry count     i32
        18        entries, each:
                     producerId      i64
                     epoch           i16
                     lastSeenMs      i64   -1: unknown (rebuilt from the log)
                     batchCount      i8    0 .. BATCHES_CACHED
                     batchCount x
                       firstSeq          i32
                       lastSeq           i32
                       baseOffset        i64
                       lastOffset        i64
                       logAppendTimeMs   i64

Nothing here does I/O except `read_snapshot` (through the disk layer, `_fs.read_file`);
`ProducerStates` takes values and `now_ms`.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable
from typing import NamedTuple

import crc32c as _crc32c

from ._batch import HEADER, HEADER_BYTES, LOG_OVERHEAD, BatchHeader
from ._errors import (
    CorruptBatchError,
    LimitExceededError,
    OutOfOrderSequenceError,
    ProducerFencedError,
    UnknownProducerError,
)
from ._fs import read_file

# Batches remembered per producer id for duplicate detection: Kafka's value, matched by its
# clients' max.in.flight.requests.per.connection <= 5 for idempotent producers.
BATCHES_CACHED = 5
# Sequences are non-negative i32; the one after SEQUENCE_MAX is 0.
SEQUENCE_MAX = 2**31 - 1
SEQUENCE_MODULUS = 2**31
NO_TIMESTAMP = -1

SNAPSHOT_SUFFIX = ".snapshot"
SNAPSHOT_VERSION = 1
_FILE_HEADER = struct.Struct(
    ">"
    "h"  # version
    "I"  # crc: CRC32C of everything after this field
)
_BODY_HEADER = struct.Struct(
    ">"
    "q"  # offset: the state holds every batch below it
    "i"  # entry count
)
_ENTRY = struct.Struct(
    ">"
    "q"  # producerId
    "h"  # epoch
    "q"  # lastSeenMs, -1 when unknown
    "b"  # batchCount
)
_BATCH = struct.Struct(
    ">"
    "i"  # firstSeq
    "i"  # lastSeq
    "q"  # baseOffset
    "q"  # lastOffset
    "q"  # logAppendTimeMs
)
CRC_END = _FILE_HEADER.size  # the CRC covers [CRC_END, end)
assert CRC_END == 6

# BatchHeader fields are read by index on the per-append path: 0 baseOffset, 1 batchLength,
# 6 lastOffsetDelta, 8 maxTimestamp, 9 producerId, 10 producerEpoch, 11 baseSequence.
# The smallest batchLength a whole header allows (replay walks lengths it did not check).
_BATCH_LENGTH_MIN = HEADER_BYTES - LOG_OVERHEAD


class BatchMetadata(NamedTuple):
    """One appended batch of a producer id, as its duplicate is answered."""

    first_seq: int
    last_seq: int
    base_offset: int
    last_offset: int
    log_append_time_ms: int


class ProducerEntry(NamedTuple):
    """A read-only snapshot of one producer id's state (replaced whole on every append)."""

    producer_id: int
    epoch: int
    last_seen_ms: int | None
    batches: tuple[BatchMetadata, ...]


_new = tuple.__new__


class SnapshotError(Exception):
    """A snapshot file that cannot be used (short, bad CRC, unknown version, bad fields)."""


def last_sequence(base_sequence: int, last_offset_delta: int) -> int:
    """The sequence of a batch's last record: wraps past SEQUENCE_MAX to 0."""
    return (base_sequence + last_offset_delta) % SEQUENCE_MODULUS


class ProducerStates:
    """Producer id -> ProducerEntry for one partition. The owner (PartitionLog) calls it
    under its lock: `check` before writing a batch, `update` once the write succeeded."""

    def __init__(self, entries: dict[int, ProducerEntry] | None = None) -> None:
        self._entries: dict[int, ProducerEntry] = {} if entries is None else entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, producer_id: int) -> ProducerEntry | None:
        return self._entries.get(producer_id)

    def copy(self) -> dict[int, ProducerEntry]:
        """The state as of now; entries are immutable, so a shallow copy is a snapshot."""
        return self._entries.copy()

    # ------------------------------------------------------------------ live appends
    def check(self, header: BatchHeader, producers_max: int) -> BatchMetadata | None:
        """The verdict for an idempotent batch (see the module docstring): None to append
        it, the original batch's metadata for a duplicate; raises if it is refused."""
        producer_id, epoch, first_seq = header[9], header[10], header[11]
        entry = self._entries.get(producer_id)
        if entry is None:
            if first_seq != 0:
                raise UnknownProducerError(producer_id, epoch, first_seq)
            if len(self._entries) >= producers_max:
                raise LimitExceededError(
                    f"producer id {producer_id} would be producer {len(self._entries) + 1} "
                    f"with state in this partition; the limit is producers_max "
                    f"{producers_max} (idle ids expire after producer_expiry_ms)"
                )
            return None
        current = entry[1]
        if epoch != current:
            if epoch < current:
                raise ProducerFencedError(producer_id, epoch, current)
            if first_seq != 0:
                raise OutOfOrderSequenceError(
                    producer_id, epoch, 0, first_seq, f"a new epoch (after {current}) starts at 0"
                )
            return None
        batches = entry[3]
        expected = (batches[-1][1] + 1) % SEQUENCE_MODULUS if batches else 0
        if first_seq == expected:
            return None
        last_seq = (first_seq + header[6]) % SEQUENCE_MODULUS
        for batch in batches:
            if batch[0] == first_seq and batch[1] == last_seq:
                return batch
        raise OutOfOrderSequenceError(producer_id, epoch, expected, first_seq)

    def update(self, header: BatchHeader, base_offset: int, now_ms: int) -> None:
        """Record an accepted batch, written at `base_offset` at broker time `now_ms`."""
        producer_id, epoch, first_seq, delta = header[9], header[10], header[11], header[6]
        # tuple.__new__ builds the NamedTuples at half the cost of their constructors.
        batch = _new(
            BatchMetadata,
            (
                first_seq,
                (first_seq + delta) % SEQUENCE_MODULUS,
                base_offset,
                base_offset + delta,
                now_ms,
            ),
        )
        entry = self._entries.get(producer_id)
        if entry is None or entry[1] != epoch:
            batches: tuple[BatchMetadata, ...] = (batch,)
        else:
            old = entry[3]
            batches = (*old[1:], batch) if len(old) >= BATCHES_CACHED else (*old, batch)
        self._entries[producer_id] = _new(ProducerEntry, (producer_id, epoch, now_ms, batches))

    def expire(self, now_ms: int, expiry_ms: int) -> int:
        """Drop ids without an append for `expiry_ms`; an entry of unknown age (rebuilt from
        the log) is stamped `now_ms` instead. Returns how many were dropped."""
        expired: list[int] = []
        stamped: list[ProducerEntry] = []
        for producer_id, entry in self._entries.items():
            seen = entry[2]
            if seen is None:
                stamped.append(entry._replace(last_seen_ms=now_ms))
            elif now_ms - seen >= expiry_ms:
                expired.append(producer_id)
        for entry in stamped:
            self._entries[entry.producer_id] = entry
        for producer_id in expired:
            del self._entries[producer_id]
        return len(expired)

    # ------------------------------------------------------------------ replay from the log
    def replay(
        self, buf: bytes | memoryview | mmap.mmap, pos: int, end: int, from_offset: int
    ) -> int:
        """Apply the idempotent batches of the whole batches in buf[pos:end] whose base
        offset is at least `from_offset`, reading only their 61-byte headers (no CRC: the log
        checked them when it opened). Returns how many headers were read.

        Replay checks nothing and refuses nothing: the log holds what was accepted. A batch
        that does not follow its id's last one in the same epoch starts the entry afresh
        (the id expired and came back at sequence 0). Its append time is the batch's max
        timestamp, as Kafka takes it; last_seen_ms becomes unknown (None).
        """
        unpack = HEADER.unpack_from
        entries = self._entries
        scanned = 0
        while pos < end:
            if end - pos < HEADER_BYTES:
                raise CorruptBatchError(f"short batch header at byte {pos}")
            h = unpack(buf, pos)
            length = h[1]
            if length < _BATCH_LENGTH_MIN or pos + length + LOG_OVERHEAD > end:
                raise CorruptBatchError(f"batch length {length} at byte {pos} runs past {end}")
            pos += length + LOG_OVERHEAD
            scanned += 1
            producer_id = h[9]
            if producer_id < 0 or h[0] < from_offset:
                continue
            epoch, first_seq, delta, base = h[10], h[11], h[6], h[0]
            batch = _new(
                BatchMetadata,
                (first_seq, (first_seq + delta) % SEQUENCE_MODULUS, base, base + delta, h[8]),
            )
            entry = entries.get(producer_id)
            if entry is None or entry[1] != epoch or not entry[3]:
                batches: tuple[BatchMetadata, ...] = (batch,)
            else:
                old = entry[3]
                if first_seq != (old[-1][1] + 1) % SEQUENCE_MODULUS:
                    batches = (batch,)
                elif len(old) >= BATCHES_CACHED:
                    batches = (*old[1:], batch)
                else:
                    batches = (*old, batch)
            entries[producer_id] = _new(ProducerEntry, (producer_id, epoch, None, batches))
        return scanned


# ---------------------------------------------------------------------------- snapshots
def snapshot_name(offset: int) -> str:
    return f"{offset:020d}{SNAPSHOT_SUFFIX}"


def snapshot_offset(name: str) -> int | None:
    """The offset of a snapshot file name, None if `name` is not one."""
    stem = name[: -len(SNAPSHOT_SUFFIX)]
    if name.endswith(SNAPSHOT_SUFFIX) and len(stem) == 20 and stem.isdigit():
        return int(stem)
    return None


def encode_snapshot(offset: int, entries: Iterable[ProducerEntry]) -> bytes:
    """The snapshot file's bytes for the state `entries` at `offset` (see the docstring)."""
    parts: list[bytes] = []
    append = parts.append
    pack_entry, pack_batch = _ENTRY.pack, _BATCH.pack
    count = 0
    for producer_id, epoch, last_seen_ms, batches in entries:
        append(
            pack_entry(
                producer_id,
                epoch,
                NO_TIMESTAMP if last_seen_ms is None else last_seen_ms,
                len(batches),
            )
        )
        for batch in batches:
            append(pack_batch(*batch))
        count += 1
    body = _BODY_HEADER.pack(offset, count) + b"".join(parts)
    return _FILE_HEADER.pack(SNAPSHOT_VERSION, _crc32c.crc32c(body)) + body


def decode_snapshot(data: bytes, offset: int) -> dict[int, ProducerEntry]:
    """The state a snapshot file holds; raises SnapshotError unless it is whole and is the
    snapshot at `offset` (its file name)."""
    if len(data) < CRC_END + _BODY_HEADER.size:
        raise SnapshotError(f"{len(data)} bytes, shorter than a snapshot header")
    version, crc = _FILE_HEADER.unpack_from(data, 0)
    if version != SNAPSHOT_VERSION:
        raise SnapshotError(f"version {version}, expected {SNAPSHOT_VERSION}")
    actual = _crc32c.crc32c(memoryview(data)[CRC_END:])
    if actual != crc:
        raise SnapshotError(f"CRC32C mismatch: header says {crc:#010x}, bytes give {actual:#010x}")
    stored_offset, count = _BODY_HEADER.unpack_from(data, CRC_END)
    if stored_offset != offset:
        raise SnapshotError(f"holds offset {stored_offset}, its name says {offset}")
    pos = CRC_END + _BODY_HEADER.size
    entries: dict[int, ProducerEntry] = {}
    try:
        for _ in range(count):  # bounded: each entry takes bytes, a short file stops it
            producer_id, epoch, seen, batch_count = _ENTRY.unpack_from(data, pos)
            pos += _ENTRY.size
            if producer_id < 0 or epoch < 0 or not 0 <= batch_count <= BATCHES_CACHED:
                raise SnapshotError(
                    f"entry at byte {pos - _ENTRY.size}: producer id {producer_id}, epoch "
                    f"{epoch}, {batch_count} batches"
                )
            batches = tuple(
                BatchMetadata._make(_BATCH.unpack_from(data, pos + i * _BATCH.size))
                for i in range(batch_count)
            )
            pos += batch_count * _BATCH.size
            if producer_id in entries:
                raise SnapshotError(f"producer id {producer_id} appears twice")
            entries[producer_id] = ProducerEntry(
                producer_id, epoch, None if seen == NO_TIMESTAMP else seen, batches
            )
    except struct.error:
        raise SnapshotError(f"entries run past the end of the file ({len(data)} bytes)") from None
    if pos != len(data):
        raise SnapshotError(f"{len(data) - pos} bytes after the last of {count} entries")
    return entries


def read_snapshot(directory: str, offset: int) -> dict[int, ProducerEntry]:
    """Read and decode the snapshot at `offset`; SnapshotError (or OSError) if unusable."""
    data = read_file(os.path.join(directory, snapshot_name(offset)))
    return decode_snapshot(data, offset)
