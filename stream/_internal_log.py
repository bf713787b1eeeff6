"""An internal log replayed into memory, with periodic snapshot files of the whole state.

The machinery under the broker's own durable stores: the committed offsets of consumer
groups (stream/groups/_offsets.py, `__consumer_offsets`) and the state of share groups
(stream/share/_state.py, `__share_group_state`). Each store is a subclass of `ReplayedLog`
and owns its record and snapshot formats; this module owns the steps around them.

On disk (one PartitionLog, not a topic of the catalog):

    <data_dir>/<internal topic>-0/                  the log (segments, indexes, recovery point)
    <data_dir>/<internal topic>-0/<snapshot file>   the store's whole state at a log offset

The catalog reserves the internal topic names (storage._catalog.INTERNAL_TOPIC_NAMES): no
user topic takes them, and `Catalog.open` leaves their directories alone. PartitionLog only
looks at segment, index and temp files in its directory, so the snapshot lives beside the
segments (its temp file, left by a crash in `atomic_write`, is one PartitionLog removes).

State changes only by replaying records (Kafka's coordinator shape, STYLE.md): a store turns
a request into records, `_append_locked` appends them and applies each to memory with the
store's `_apply`, the same function that rebuilds memory on open. So what a reopened store
holds is exactly what the live store held. A record `_apply` cannot read refuses the open
(StorageError naming the log directory and the offset).

Durability: `_append_locked(..., durable=True)` returns only after `PartitionLog.flush`, so
what it appended (and everything appended before) survives power loss; with durable=False it
is in the log and in memory, durable at the next flush (under fsync `always` it is at once).

Snapshots keep the log bounded. When the store's `_snapshot_due` says so (after at least as
many appended records, or bytes, as the snapshot writes: O(1) amortized per appended record)
the whole state goes to the snapshot file (`atomic_write`: temp file, fsync, rename, directory
fsync) covering `log_offset`, the log end offset; the log is flushed first, so the snapshot
never covers records a power loss could still take from the log. Then the log rolls and
`delete_before(log_offset)` drops every sealed segment. Open loads the snapshot and replays
records from max(log_offset, log start offset) to the log end. A crash between any two of
those steps is harmless: the snapshot covers what it names, and the log is replayed from
there. A snapshot that fails (say, on a full disk) is logged and tried again after another
interval: the request that triggered it is durable already.

A snapshot that cannot be read, or a log that does not line up with it (it starts after the
offset the snapshot covers, or ends before it), refuses to open with StorageError naming the
file: a store never drops acknowledged state silently.

Thread safety: the store holds `_lock` around every public method; the helpers here expect
it held (the `_locked` suffix).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import ClassVar, Self, TypeVar

from storage import (
    LogClosedError,
    LogConfig,
    NewRecord,
    PartitionLog,
    StorageError,
    encode_batch,
    iter_batches,
)
from storage._config import MiB
from storage._fs import atomic_write, read_file

# Bytes per read while replaying the log on open (a read returns at least one batch).
REPLAY_READ_BYTES = 1 * MiB

# A batch to append, with its records (their keys and values are applied to memory).
Batch = tuple[bytes, Sequence[NewRecord]]
# Writes a snapshot file whole: temp file, fsync, rename, directory fsync.
FileWriter = Callable[[Path, bytes], None]

S = TypeVar("S", bound="ReplayedLog")


class ReplayedLog:
    """Base of a store whose state is an internal log replayed into memory.

    A subclass sets the class attributes below and implements the five methods that raise
    NotImplementedError here: `_apply` (one record into memory), `_encode_snapshot` and
    `_decode_snapshot` (its snapshot format), `_snapshot_due` (its interval) and `_describe`.
    """

    # What the store keeps, in messages: "committed offsets".
    CONTENTS: ClassVar[str]
    # One record, in messages: "a committed offset".
    RECORD_NOUN: ClassVar[str]
    # The store, in messages: "offsets store".
    STORE_NOUN: ClassVar[str]
    LOGGER: ClassVar[logging.Logger]

    def __init__(
        self, plog: PartitionLog, snapshot_file_name: str, write_file: FileWriter = atomic_write
    ) -> None:
        """`write_file` writes the snapshot file (tests pass one that counts or fails)."""
        self._log = plog
        self._snapshot_path = Path(plog.directory) / snapshot_file_name
        self._write_file = write_file
        self._lock = threading.Lock()
        self._closed = False
        # Appended since the last snapshot (or, after open, since the one loaded).
        self._records_since_snapshot = 0
        self._bytes_since_snapshot = 0

    # ------------------------------------------------------------------ the subclass's part
    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        """Apply one record to memory: the one way memory changes. ValueError (or
        struct.error) for a record that is not one of the store's, before changing anything."""
        raise NotImplementedError

    def _encode_snapshot(self, log_offset: int) -> bytes:
        """The whole state as the snapshot file's bytes, covering offsets below `log_offset`."""
        raise NotImplementedError

    def _decode_snapshot(self, raw: bytes) -> int:
        """Load the snapshot file's bytes into (empty) memory; return the log offset it covers.
        ValueError (or struct.error, RecursionError) for bytes that are not a snapshot."""
        raise NotImplementedError

    def _snapshot_due(self) -> bool:
        """Whether to snapshot now (`_records_since_snapshot`, `_bytes_since_snapshot`)."""
        raise NotImplementedError

    def _describe(self) -> str:
        """What memory holds, for log lines and repr: "12 offsets of 3 groups"."""
        raise NotImplementedError

    # ------------------------------------------------------------------ append
    def _append_locked(self, batches: Sequence[Batch], now_ms: int, *, durable: bool) -> None:
        """Append each batch and apply its records; if `durable`, fsync before returning;
        then snapshot if one is due. Each batch is crash-atomic on its own."""
        for batch, records in batches:
            result = self._log.append(batch, now_ms)
            self._replay(
                (result.base_offset + i, record.key, record.value)
                for i, record in enumerate(records)
            )
            self._records_since_snapshot += len(records)
            self._bytes_since_snapshot += len(batch)
        if durable:
            self._log.flush(now_ms)
        if self._snapshot_due():
            self._snapshot_locked()

    @staticmethod
    def _batches(records: Sequence[NewRecord], records_per_batch_max: int) -> list[Batch]:
        """`records` cut into batches of at most `records_per_batch_max` records (deletes
        that may be larger than one batch: a crash part-way leaves a prefix applied)."""
        assert records_per_batch_max > 0
        out: list[Batch] = []
        for i in range(0, len(records), records_per_batch_max):
            chunk = records[i : i + records_per_batch_max]
            out.append((encode_batch(chunk), chunk))
        return out

    # ------------------------------------------------------------------ replay
    def _replay(self, records: Iterable[tuple[int, bytes | None, bytes | None]]) -> None:
        """Apply records (offset, key, value) in order; StorageError for one that is not ours."""
        for offset, key, value in records:
            try:
                self._apply(key, value)
            except (ValueError, struct.error) as e:
                raise StorageError(
                    f"{self._log.directory}: record at offset {offset} is not "
                    f"{self.RECORD_NOUN}: {e}"
                ) from None

    def _load(self) -> None:
        """Load the snapshot, check that the log lines up with it, replay the rest."""
        covered = self._load_snapshot()
        start, end = self._log.log_start_offset, self._log.log_end_offset
        if covered < start:
            raise StorageError(
                f"{self._log.directory}: the log starts at offset {start} but "
                + (
                    f"{self._snapshot_path} covers only offsets below {covered}"
                    if self._snapshot_path.exists()
                    else f"there is no snapshot ({self._snapshot_path}) of the offsets below it"
                )
                + f"; refusing to open without those {self.CONTENTS}"
            )
        if covered > end:
            raise StorageError(
                f"{self._snapshot_path} covers offsets below {covered} but the log "
                f"{self._log.directory} ends at {end}"
            )
        pos = covered
        replayed_bytes = 0
        while pos < end:
            data, after = self._log.read_batches(pos, REPLAY_READ_BYTES)
            if after <= pos:
                raise StorageError(f"{self._log.directory}: replay made no progress at {pos}")
            for header, records in iter_batches(data):
                self._replay((r.offset, r.key, r.value) for r in records if r.offset >= covered)
                replayed_bytes += header.size
            pos = after
        self._records_since_snapshot = end - covered
        self._bytes_since_snapshot = replayed_bytes
        self.LOGGER.info(
            "%s %s: %s (snapshot to offset %d, replayed %d)",
            self.STORE_NOUN,
            self._log.directory,
            self._describe(),
            covered,
            end - covered,
        )

    # ------------------------------------------------------------------ snapshot
    def _load_snapshot(self) -> int:
        """Load the snapshot into memory; return the log offset it covers (0 if none)."""
        path = self._snapshot_path
        try:
            raw = read_file(path)  # through the storage engine's disk layer, as every write
        except FileNotFoundError:
            return 0
        try:
            covered = self._decode_snapshot(raw)
            if covered < 0:
                raise ValueError(f"log_offset {covered} is negative")
        except (ValueError, struct.error, RecursionError) as e:  # JSONDecodeError: ValueError
            raise StorageError(
                f"{path}: cannot read the snapshot of {self.CONTENTS} ({e}); refusing to open "
                f"rather than lose {self.CONTENTS}"
            ) from None
        return covered

    def _snapshot_locked(self) -> None:
        """Write the whole state covering the log end offset, then drop the segments below it.

        A failure here does not fail the request that triggered it (that is in the log
        already): it is logged, and tried again after another interval.
        """
        self._records_since_snapshot = 0
        self._bytes_since_snapshot = 0
        try:
            # Under fsync `never` the log may end past its last fsync; a snapshot covering
            # records a power loss can take would leave a log that ends before it.
            self._log.flush()
            covered = self._log.log_end_offset
            data = self._encode_snapshot(covered)
            self._write_file(self._snapshot_path, data)
            self._log.roll()
            deleted = self._log.delete_before(covered)
        except (OSError, StorageError) as e:
            self.LOGGER.warning("snapshot of %s failed, will retry: %s", self._snapshot_path, e)
            return
        self.LOGGER.info(
            "snapshot %s of %s at log offset %d (%d bytes); deleted %d segment(s)",
            self._snapshot_path,
            self._describe(),
            covered,
            len(data),
            deleted,
        )

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the log cleanly; idempotent. Every later call raises LogClosedError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._log.close()

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError(f"{self.STORE_NOUN} {self._log.directory} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._log.directory!r}, {self._describe()})"


def open_replayed(factory: Callable[[PartitionLog], S], directory: Path, config: LogConfig) -> S:
    """Open the log in `directory`, make the store on it, load it. On a failure the log is
    closed again and the error raised (StorageError when the snapshot or the log cannot be
    read whole)."""
    plog = PartitionLog.open(directory, config)
    try:
        store = factory(plog)
        store._load()
    except BaseException:
        with contextlib.suppress(StorageError, OSError):
            plog.close()
        raise
    return store


__all__ = ["REPLAY_READ_BYTES", "Batch", "FileWriter", "ReplayedLog", "open_replayed"]
