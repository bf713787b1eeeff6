"""PartitionLog: one partition's ordered, segmented, append-only log.

    <dir>/00000000000000000000.log        segments, named by base offset
    <dir>/00000000000000000000.index      sparse offset index   (see _index.py)
    <dir>/00000000000000000000.timeindex  sparse time index
    <dir>/00000000000000000000.indexsum   checksums of the two final indexes (see _index.py)
    <dir>/00000000000000000000.snapshot   idempotent-producer state below that offset
                                          (see _producers.py; the newest SNAPSHOTS_KEPT)
    <dir>/recovery-point                  offset below which every segment is whole on disk
    <dir>/log-start-offset                the log start offset retention last committed to
    <dir>/.clean-shutdown                 present only while the log is closed cleanly (open
                                          removes it once every segment has opened)

Offsets are assigned here: `append` patches each batch's baseOffset (outside the CRC) and
writes the batches with one positional write. Reads return whole batches as stored, each one
checked (CRC32C) at least once since open: by the open's scan, by `check` before it was
appended, or by the first read that returns it (see "Open, and what is trusted" below).

Idempotent producers: a batch with producerId >= 0 must come alone; it is checked against
the partition's producer state (`ProducerStates`) under the lock before it is written, and
a resend of one of the id's last five batches appends nothing and answers with the
original offsets (`AppendResult.duplicate`). The state is derived from the log: a snapshot
of it is taken at every roll (written behind, after the sealed segment's fsync) and on a
clean close; open loads the newest usable snapshot and replays only batch headers from its
offset to the log end, after recovery has made its cuts. Retention does not touch the
state; `expire_producers` drops ids idle for `producer_expiry_ms`.

What survives a crash, per `LogConfig.fsync`:
  always    every acknowledged append (fsync before `append` returns);
  interval  a process crash loses nothing; a power loss loses at most the appends of the last
            `fsync_interval_ms`;
  never     a process crash loses nothing; a power loss can lose what the OS had not written
            back. A sealed segment is fsynced by a helper thread right behind its roll (see
            `_flush_behind`); the recovery point passes it only once that is done.

Crash-atomic operations: segment roll (old segment's indexes trimmed and fsynced, then its
.indexsum written and fsynced, before the new file exists; directory fsynced after; its data
fsynced behind), segment deletion, and the recovery-point, log-start-offset and
clean-shutdown files (temp, fsync, rename, directory fsync). Deleting segments (retention,
`delete_before`) first commits the new log start offset to `log-start-offset`, then unlinks
(.log first) and fsyncs the directory; open deletes again every segment wholly below the
committed start, so after a crash the delete has happened whole or not at all, and the log
start offset never moves back. An append is not atomic on disk, which is why recovery cuts
a torn tail; a sealed segment past the recovery point may be torn too after a power loss,
and is cut the same way (with the segments after it).

Open, and what is trusted. After a clean shutdown every segment, and after a crash every
segment wholly below the recovery point, is "known to be on disk": it is opened without
reading its batches (`Segment.open_trusted`), so a start costs a checksum of each segment's
indexes, not a scan of its data. Its indexes are used only if the segment's `.indexsum`
sidecar (written, fsynced, when they became final: at the seal, before the recovery point can
pass the segment, or at a clean close) matches them and the .log's size; otherwise the log is
scanned, changing nothing, and either the indexes are rebuilt (the log is whole: a damaged,
missing or pre-sidecar index) or the partition refuses to open with CorruptLogError naming the
file and byte position (a bad batch, or a log that lost whole batches): a segment known to be
on disk holds acknowledged records and is never cut. Its batches are checked lazily instead,
by the reads (see _segment.py): a read never serves a bad batch; it stops before one, or
raises CorruptLogError when the batch it must start with is bad. The other segments (past the
recovery point, or all of them without a readable one) are scanned at open, as above.

A failed fsync (`FsyncError`: EIO, or any error of fsync/fdatasync/msync of the log's files
or directory) takes the log offline, as Kafka takes a log directory offline: Linux may have
dropped the pages it could not write and reports the error once, so an fsync is never retried
and nothing is acknowledged after it. The call that met it raises LogOfflineError (so does a
failure of the helper thread, to the next caller); from then on appends, rolls, flushes and
retention raise LogOfflineError, reads are served only below `flushed_offset` (what the last
successful fsync covered; `log_end_offset` reports that offset too), and `close` writes no
clean-shutdown marker, so the next open scans and cuts what did not reach the disk.

Thread safety: every public method takes the log's lock; batch validation (the CRC) runs
before it, so concurrent producers overlap their CPU work.

All file-system calls go through the disk layer (`_disk.py`, via `_fs.py` for the durable
steps), which tests replace by a simulated disk that loses un-fsynced data.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import logging
import mmap
import os
import threading
from typing import NamedTuple

from . import _disk
from ._batch import LOG_OVERHEAD, BatchHeader, split_batches
from ._config import BATCH_BYTES_MAX_LIMIT, SEGMENT_BYTES_LIMIT, FsyncPolicy, LogConfig
from ._errors import (
    CorruptBatchError,
    CorruptLogError,
    DiskFullError,
    FsyncError,
    InvalidProducerBatchError,
    LimitExceededError,
    LogClosedError,
    LogOfflineError,
    OffsetOutOfRangeError,
    StorageError,
)
from ._fs import TMP_SUFFIX, atomic_write, fsync_dir, make_dirs, read_file
from ._producers import (
    ProducerEntry,
    ProducerStates,
    SnapshotError,
    encode_snapshot,
    read_snapshot,
    snapshot_name,
    snapshot_offset,
)
from ._segment import (
    IOVECS_MAX,
    LOG_SUFFIX,
    SEGMENT_SUFFIXES,
    Segment,
    Truncation,
    file_stem,
)

log = logging.getLogger("riverlog.storage")

CLEAN_SHUTDOWN_FILE = ".clean-shutdown"
RECOVERY_POINT_FILE = "recovery-point"
LOG_START_FILE = "log-start-offset"
# A checkpoint file holds one decimal offset and a newline; anything larger is not ours.
CHECKPOINT_BYTES_MAX = 64
# One append may carry several back-to-back batches (one pwritev of 2 iovecs each).
BATCHES_PER_APPEND_MAX = IOVECS_MAX // 2
# Bytes in one append. An append into an empty segment may pass segment_bytes (one large
# batch gets a segment of its own), so this also bounds index positions there: below 2**32.
APPEND_BYTES_MAX = BATCH_BYTES_MAX_LIMIT
# Sealed segments whose fsync may lag behind the roll (fsync `never` / `interval`).
SEALED_FLUSHES_PENDING_MAX = 4
# Producer-state snapshots kept: the newest, and one to fall back on if it is damaged.
SNAPSHOTS_KEPT = 2
assert max(SEGMENT_BYTES_LIMIT, APPEND_BYTES_MAX) < 2**32
# For the per-append policy test: module constants, not enum attribute lookups.
_FSYNC_ALWAYS = FsyncPolicy.ALWAYS
_FSYNC_NEVER = FsyncPolicy.NEVER
_new_tuple = tuple.__new__


class AppendResult(NamedTuple):
    """Made once per append: a tuple costs a third of a frozen dataclass.

    `duplicate`: the batch was a resend of one already in the log; nothing was appended,
    and the offsets and append time are the original batch's."""

    base_offset: int
    last_offset: int
    log_append_time_ms: int
    duplicate: bool = False


class PartitionLog:
    def __init__(self, directory: str, config: LogConfig) -> None:
        self.directory = directory
        self.config = config
        self._segments: list[Segment] = []
        self._bases: list[int] = []
        self._lock = threading.Lock()
        self._closed = False
        self._last_flush_ms: int | None = None
        self._dirty = False
        # What recovery cut on open, for callers and tests; also logged.
        self.truncations: list[Truncation] = []
        self._recovery_point = 0
        # Sealed segments waiting for their background fsync (see _flush_behind), each with
        # the producer state as of its end, to snapshot once it is on disk.
        self._pending: collections.deque[tuple[Segment, int, dict[int, ProducerEntry]]] = (
            collections.deque()
        )
        self._producers = ProducerStates()
        self._flush_cv = threading.Condition()
        self._flusher: threading.Thread | None = None
        # Every offset below it is on stable storage (see `flushed_offset`).
        self._flushed_offset = 0
        # Why the log went offline (a failed fsync), None while it is online.
        self._offline: str | None = None
        self.recovered = False

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, directory: str | os.PathLike[str], config: LogConfig) -> PartitionLog:
        """Open (or create) the log in `directory`, recovering it if it was not closed cleanly."""
        plog = cls(os.fspath(directory), config)
        plog._open()
        return plog

    def _open(self) -> None:
        d = self.directory
        disk = _disk.disk
        make_dirs(d)
        names = disk.listdir(d)
        bases = sorted(int(n[: -len(LOG_SUFFIX)]) for n in names if _is_segment_file(n, LOG_SUFFIX))
        bases = self._finish_deletes(bases)
        for n in names:  # temp files of an atomic write that a crash interrupted
            if n.startswith(".") and n.endswith(TMP_SUFFIX):
                disk.unlink(os.path.join(d, n))
        for n in names:  # indexes and sidecars whose .log was deleted (a crash in retention)
            for suffix in SEGMENT_SUFFIXES[1:]:
                if _is_segment_file(n, suffix) and int(n[: -len(suffix)]) not in bases:
                    with contextlib.suppress(FileNotFoundError):
                        disk.unlink(os.path.join(d, n))
        clean = CLEAN_SHUTDOWN_FILE in names
        if not bases:
            self._append_segment(Segment.create(d, 0, self.config))
            self._write_recovery_point(0)
        else:
            self._open_segments(bases, clean)
        self._flushed_offset = self._segments[-1].next_offset
        try:
            self._load_producers()
            if clean:
                # Only now: an open that refuses (CorruptLogError) leaves the marker, so the
                # next attempt trusts the same segments and refuses again, rather than treat
                # the newest one as torn and cut it.
                disk.unlink(os.path.join(d, CLEAN_SHUTDOWN_FILE))
                fsync_dir(d)
        except BaseException:
            for seg in self._segments:
                seg.close()
            raise

    def _finish_deletes(self, bases: list[int]) -> list[int]:
        """Delete the segments wholly below the committed log start offset (a crash cut a
        delete short); return the bases left. Never the newest segment."""
        start = self._read_checkpoint(LOG_START_FILE)
        if start is None:
            return bases
        doomed = 0
        while doomed < len(bases) - 1 and bases[doomed + 1] <= start:
            doomed += 1
        if doomed:
            for base in bases[:doomed]:
                _unlink_new_segment(self.directory, base)
            fsync_dir(self.directory)
            log.warning(
                "finished deleting %d segment(s) of %s below the log start offset %d",
                doomed,
                self.directory,
                start,
            )
        return bases[doomed:]

    def _open_segments(self, bases: list[int], clean: bool) -> None:
        """Open the segments at `bases`, scanning and cutting what a crash may have torn."""
        d = self.directory
        checkpoint = None if clean else self._read_checkpoint(RECOVERY_POINT_FILE)
        # Without a readable checkpoint nothing is known durable: scan all, cut nothing sealed.
        strict = not clean and checkpoint is None
        recovery_point = checkpoint or 0
        self._recovery_point = recovery_point
        # Segments wholly below the recovery point are trusted; the rest are scanned.
        first_scanned = (
            len(bases) if clean else max(0, bisect.bisect_right(bases, recovery_point) - 1)
        )
        try:
            for i, base in enumerate(bases):
                newest = i == len(bases) - 1
                if i < first_scanned:
                    nxt = None if newest else bases[i + 1]
                    seg = Segment.open_trusted(d, base, self.config, nxt)
                else:
                    # Past the recovery point a sealed segment may not have reached the disk
                    # (its flush runs behind the roll), so a bad batch there is a torn tail.
                    seg, cut = Segment.open_recover(d, base, self.config, newest or not strict)
                    self.recovered = True
                    if cut is None and not newest and not strict:
                        cut = self._gap_after(seg, bases[i + 1])
                        if cut is None:
                            seg.seal()  # whole: its indexes are trimmed and trusted next time
                    if cut is not None:
                        cut = self._drop_after(cut, bases[i + 1 :])
                        self.truncations.append(cut)
                        log.warning(
                            "recovery cut %s at byte %d: dropped %d bytes, offsets from %d (%s)",
                            cut.path,
                            cut.position,
                            cut.bytes_dropped,
                            cut.first_offset_dropped,
                            cut.reason,
                        )
                        self._append_segment(seg)
                        break
                if self._segments and seg.base_offset != self._segments[-1].next_offset:
                    raise StorageError(
                        f"{seg.log_path}: starts at offset {seg.base_offset} but the previous "
                        f"segment ends at {self._segments[-1].next_offset}"
                    )
                self._append_segment(seg)
        except BaseException:
            for seg in self._segments:
                seg.close()
            raise
        if self.recovered:
            # What recovery read may have come from the page cache only (a process crash):
            # make the scanned segments durable before the checkpoint moves past them, and
            # the active one too: everything the log holds after open is on disk
            # (`flushed_offset`).
            for seg in self._segments[first_scanned:]:
                seg.flush()
            self._write_recovery_point(self._segments[-1].base_offset)
            log.info(
                "recovered %s: offsets [%d, %d) in %d segments",
                d,
                self.log_start_offset,
                self.log_end_offset,
                len(self._segments),
            )

    def _load_producers(self) -> None:
        """Producer state after recovery: the newest usable snapshot at or below the log end
        offset, then the idempotent batches from there (or the log start) to the log end,
        from their headers. Snapshots past the log end (recovery cut below them) and damaged
        ones are deleted."""
        d = self.directory
        offsets = sorted(
            (o for o in map(snapshot_offset, _disk.disk.listdir(d)) if o is not None),
            reverse=True,
        )
        end = self.log_end_offset
        loaded: int | None = None
        removed = False
        for offset in offsets:
            if offset > end:
                log.warning(
                    "deleting producer snapshot %s: offset %d is past the log end offset %d",
                    snapshot_name(offset),
                    offset,
                    end,
                )
            else:
                try:
                    entries = read_snapshot(d, offset)
                except (OSError, SnapshotError) as e:
                    log.warning(
                        "deleting damaged producer snapshot %s: %s", snapshot_name(offset), e
                    )
                else:
                    self._producers = ProducerStates(entries)
                    loaded = offset
                    break
            _disk.disk.unlink(os.path.join(d, snapshot_name(offset)))
            removed = True
        if removed:  # an old snapshot must not come back after a power loss
            fsync_dir(d)
        start = self.log_start_offset if loaded is None else max(loaded, self.log_start_offset)
        scanned = self._replay_producers(start)
        if scanned:
            log.info(
                "producer state of %s: snapshot at %s, %d batch headers replayed from offset %d; "
                "%d producer ids",
                d,
                loaded,
                scanned,
                start,
                len(self._producers),
            )

    def _replay_producers(self, from_offset: int) -> int:
        """Apply the idempotent batches from `from_offset` to the log end; headers only."""
        if from_offset >= self.log_end_offset:
            return 0
        scanned = 0
        first = bisect.bisect_right(self._bases, from_offset) - 1
        for seg in self._segments[first:]:
            if seg.size == 0:
                continue
            pos = 0
            if from_offset > seg.base_offset:
                pos = seg.offset_index.lookup(from_offset - seg.base_offset)[1]
            with mmap.mmap(seg.fd, seg.size, access=mmap.ACCESS_READ) as mm:
                try:
                    scanned += self._producers.replay(mm, pos, seg.size, from_offset)
                except CorruptBatchError as e:
                    raise CorruptLogError(seg.log_path, pos, str(e)) from None
        return scanned

    def _write_snapshot(self, offset: int, entries: dict[int, ProducerEntry]) -> None:
        """Write the producer state at `offset`, then delete all but the newest
        SNAPSHOTS_KEPT. A failure is logged, not raised: the state can be rebuilt from the
        log, a missing snapshot only makes the next open replay more of it. Except a failed
        fsync (FsyncError), which takes the log offline as any other does."""
        d = self.directory
        try:
            atomic_write(
                os.path.join(d, snapshot_name(offset)), encode_snapshot(offset, entries.values())
            )
            names = _disk.disk.listdir(d)
            offsets = sorted(o for o in map(snapshot_offset, names) if o is not None)
            # No directory fsync: an old snapshot that comes back is still true of the log.
            for old in offsets[:-SNAPSHOTS_KEPT]:
                _disk.disk.unlink(os.path.join(d, snapshot_name(old)))
        except FsyncError:
            raise
        except (OSError, StorageError) as e:
            log.error("producer snapshot of %s at offset %d failed: %s", d, offset, e)

    @staticmethod
    def _gap_after(seg: Segment, next_base: int) -> Truncation | None:
        """A sealed segment past the recovery point whose batches end before the next
        segment starts lost whole batches at its tail (they never reached the disk; nothing
        torn is left to cut): the log ends there, as after a cut. None if it is whole."""
        if seg.next_offset >= next_base:
            return None
        return Truncation(
            seg.log_path,
            seg.size,
            0,
            seg.next_offset,
            f"batches end at offset {seg.next_offset} but the next segment starts at "
            f"{next_base}: the tail of this segment never reached the disk",
        )

    def _drop_after(self, cut: Truncation, later: list[int]) -> Truncation:
        """A cut in a sealed segment ends the log there: delete the segments after it."""
        if not later:
            return cut
        dropped = 0
        for base in later:
            path = os.path.join(self.directory, file_stem(base) + LOG_SUFFIX)
            dropped += os.path.getsize(path)
            _unlink_new_segment(self.directory, base)
        fsync_dir(self.directory)
        return Truncation(
            cut.path,
            cut.position,
            cut.bytes_dropped + dropped,
            cut.first_offset_dropped,
            f"{cut.reason}; also deleted {len(later)} later segment(s) from offset {later[0]}",
        )

    def _read_checkpoint(self, name: str) -> int | None:
        """The offset in checkpoint file `name`; None if there is none or it is damaged."""
        try:
            raw = read_file(os.path.join(self.directory, name), CHECKPOINT_BYTES_MAX)
            value = int(raw.decode().strip())
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None
        return value if value >= 0 else None

    def _write_recovery_point(self, offset: int) -> None:
        atomic_write(os.path.join(self.directory, RECOVERY_POINT_FILE), f"{offset}\n".encode())
        self._recovery_point = offset

    def _flush_behind(self, seg: Segment, upto: int, producers: dict[int, ProducerEntry]) -> None:
        """Queue a sealed segment's fsync for a helper thread; it then moves the recovery
        point to `upto` and writes the snapshot of `producers` (the state at `upto`).

        The append that rolled does not wait for the disk (Kafka also flushes on roll in the
        background). At most SEALED_FLUSHES_PENDING_MAX segments wait to be flushed, which
        bounds what a power loss can tear; a roll beyond that waits. Flushes, retention and
        close drain the queue first.
        """
        with self._flush_cv:
            while len(self._pending) >= SEALED_FLUSHES_PENDING_MAX and self._offline is None:
                self._flush_cv.wait()
            self._pending.append((seg, upto, producers))
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_worker, name="riverlog-seal-flush", daemon=True
                )
                self._flusher.start()

    def _flush_worker(self) -> None:
        """The helper thread: flush queued sealed segments in order until none is left.

        A failed fsync takes the log offline and drops the queue (the next caller gets
        LogOfflineError); so does anything unexpected, since the queued segments' durability
        is then unknown. A full disk while writing the recovery point only leaves the
        checkpoint behind (the segment itself is on disk); it is logged.
        """
        while True:
            with self._flush_cv:
                if not self._pending or self._offline is not None:
                    self._pending.clear()
                    self._flusher = None
                    self._flush_cv.notify_all()
                    return
                # stays queued (and counted) while in flight
                seg, upto, producers = self._pending[0]
            try:
                seg.flush()
                with self._flush_cv:
                    self._flushed_offset = max(self._flushed_offset, upto)
                self._write_recovery_point(upto)
                self._write_snapshot(upto, producers)
            except FsyncError as e:
                self._take_offline(e)
                continue
            except StorageError as e:
                log.error("recovery point of %s not moved to %d: %s", self.directory, upto, e)
            except BaseException as e:  # not ours to swallow, but this thread must not die
                log.error("background fsync of %s failed: %r", seg.log_path, e)
                self._take_offline(e)
                continue
            with self._flush_cv:
                self._pending.popleft()
                self._flush_cv.notify_all()

    def _join_flusher(self) -> None:
        """Wait until every queued sealed-segment fsync is done; LogOfflineError if the log
        is offline (one of them failed)."""
        with self._flush_cv:
            while self._flusher is not None:
                self._flush_cv.wait()
        if self._offline is not None:
            raise self._offline_error()

    def _take_offline(self, error: BaseException) -> LogOfflineError:
        """Mark the log offline because of `error` (the first reason is kept); return the
        error its callers get."""
        with self._flush_cv:
            first = self._offline is None
            if first:
                self._offline = str(error) or repr(error)
            self._flush_cv.notify_all()  # wakes a roll waiting for room in the queue
        if first:
            log.error(
                "log %s is offline: %s; appends are refused and reads are served below "
                "offset %d until the broker restarts and recovers it from the disk",
                self.directory,
                self._offline,
                self._flushed_offset,
            )
        return self._offline_error()

    def _offline_error(self) -> LogOfflineError:
        return LogOfflineError(
            f"log {self.directory} is offline after a failed fsync ({self._offline}): it takes "
            f"no more writes and serves reads below offset {self._flushed_offset} only; a "
            "restart recovers it from what is on disk"
        )

    def _append_segment(self, seg: Segment) -> None:
        self._segments.append(seg)
        self._bases.append(seg.base_offset)

    # ------------------------------------------------------------------ properties
    @property
    def log_start_offset(self) -> int:
        return self._segments[0].base_offset

    @property
    def log_end_offset(self) -> int:
        """The offset the next append gets; for an offline log, `flushed_offset`."""
        if self._offline is not None:
            return self._flushed_offset
        return self._segments[-1].next_offset

    @property
    def flushed_offset(self) -> int:
        """Every offset below this is on stable storage (covered by a successful fsync):
        the log end offset after open, after `flush` and after every append under fsync
        `always`; the end of the last sealed segment flushed behind its roll otherwise."""
        return self._flushed_offset

    @property
    def offline(self) -> bool:
        """Whether a failed fsync took the log offline (see the module docstring)."""
        return self._offline is not None

    @property
    def size_bytes(self) -> int:
        return sum(seg.size for seg in self._segments)

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def producer_count(self) -> int:
        """Producer ids with idempotence state in this partition."""
        return len(self._producers)

    def producer_state(self, producer_id: int) -> ProducerEntry | None:
        """A read-only snapshot of one producer id's state; None if it has none here."""
        with self._lock:
            self._check_open()
            return self._producers.get(producer_id)

    def expire_producers(self, now_ms: int) -> int:
        """Drop the state of producer ids without an append for `producer_expiry_ms`;
        returns how many. Ids rebuilt from the log on open count as seen at the first call."""
        with self._lock:
            self._check_open()
            expired = self._producers.expire(now_ms, self.config.producer_expiry_ms)
        if expired:
            log.info("expired %d producer id(s) of %s", expired, self.directory)
        return expired

    # ------------------------------------------------------------------ append
    def append(
        self,
        payload: bytes | bytearray | memoryview,
        now_ms: int,
        headers: list[BatchHeader] | None = None,
    ) -> AppendResult:
        """Validate and append one or more back-to-back batches; offsets are assigned here.

        `headers`: what `check(payload)` returned for these very bytes, if the caller has
        already checked them (they are then not split and checked again).

        Raises CorruptBatchError (nothing appended) for bytes that are not valid batches
        (InvalidProducerBatchError for an idempotent batch that is not alone),
        LimitExceededError for a batch over `batch_bytes_max` or a new producer id past
        `producers_max`, DiskFullError when the disk is full (nothing appended), and for an
        idempotent batch ProducerFencedError, OutOfOrderSequenceError or
        UnknownProducerError (nothing appended). A resend of a batch already appended
        returns the original's offsets with `duplicate` set. With fsync `always` the
        batches are on stable storage when this returns. LogOfflineError when an fsync
        failed, in this call (the batches may or may not be on disk: not acknowledged) or
        before it (nothing appended).
        """
        view = memoryview(payload)
        if headers is None:
            headers = self.check(view)
        with self._lock:
            if self._closed or self._offline is not None:  # `_check_writable`, one test here
                self._check_writable()
            # Runs once per append, so shaped for speed (one frame, no `_append_locked`):
            # header fields by index (6 lastOffsetDelta, 8 maxTimestamp, 9 producerId), the
            # result built with tuple.__new__ (AppendResult's own __new__ is a Python call).
            # `check` saw to it that an idempotent batch comes alone.
            try:
                active = self._segments[-1]
                base = active.next_offset
                config = self.config
                if len(headers) == 1:
                    header = headers[0]
                    last = base + header[6]
                    newest_ms = header[8]
                    producer_id = header[9]
                    if producer_id >= 0:
                        original = self._producers.check(header, config.producers_max)
                        if original is not None:
                            return _new_tuple(
                                AppendResult, (original[2], original[3], original[4], True)
                            )
                else:
                    last = base + sum(h[6] + 1 for h in headers) - 1
                    newest_ms = max(h[8] for h in headers)
                    producer_id = -1
                if not active.takes(len(view), last, newest_ms, config.segment_ms):
                    active = self._roll_locked()
                active.append(view, headers)
                if producer_id >= 0:  # in the log now, even if an fsync below fails
                    self._producers.update(headers[0], base, now_ms)
                self._dirty = True
                policy = config.fsync
                if policy is not _FSYNC_NEVER:
                    if policy is _FSYNC_ALWAYS:
                        self._flush_locked(now_ms)
                    else:
                        self._flush_if_due_locked(now_ms)
                return _new_tuple(AppendResult, (base, last, now_ms, False))
            except FsyncError as e:
                raise self._take_offline(e) from e

    def check(self, payload: bytes | bytearray | memoryview) -> list[BatchHeader]:
        """Validate `payload` exactly as `append` does, appending nothing; return its batch
        headers. Lets a caller refuse a request of several appends before making any."""
        if len(payload) > APPEND_BYTES_MAX:
            raise LimitExceededError(
                f"{len(payload)} bytes in one append; the limit is {APPEND_BYTES_MAX}"
            )
        headers = split_batches(payload)
        if len(headers) > BATCHES_PER_APPEND_MAX:
            raise LimitExceededError(
                f"{len(headers)} batches in one append; the limit is {BATCHES_PER_APPEND_MAX}"
            )
        limit = self.config.batch_bytes_max
        for header in headers:
            # 1 batchLength, 9 producerId: by index, as `header.size` is a Python-level call.
            if header[1] + LOG_OVERHEAD > limit:
                raise LimitExceededError(
                    f"batch of {header.size} bytes exceeds batch_bytes_max {limit}"
                )
            if header[9] >= 0:  # an idempotent batch
                _check_producer_fields(header, len(headers))
        return headers

    # ------------------------------------------------------------------ roll
    def roll(self) -> None:
        """Seal the active segment and start a new one at the log end offset (if non-empty)."""
        with self._lock:
            self._check_writable()
            if self._segments[-1].size > 0:
                try:
                    self._roll_locked()
                except FsyncError as e:
                    raise self._take_offline(e) from e

    def _roll_locked(self) -> Segment:
        """Seal the active segment and create the next. Safe to call again after it failed
        half-way (say, disk full): a sealed newest segment is simply rolled past."""
        old = self._segments[-1]
        try:
            if not old.sealed:
                old.seal()
            new = Segment.create(self.directory, old.next_offset, self.config)
        except FsyncError:
            raise
        except OSError as e:
            with contextlib.suppress(OSError):
                _unlink_new_segment(self.directory, old.next_offset)
            if e.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"no space left on device rolling {self.directory} at offset {old.next_offset}"
                ) from e
            raise StorageError(f"rolling {self.directory} failed: {e}") from e
        self._append_segment(new)
        fsync_dir(self.directory)
        producers = self._producers.copy()  # the state at new.base_offset
        if self.config.fsync == FsyncPolicy.ALWAYS:
            self._write_recovery_point(new.base_offset)  # every append was fsynced already
            self._write_snapshot(new.base_offset, producers)
        else:
            self._flush_behind(old, new.base_offset, producers)
        return new

    # ------------------------------------------------------------------ read
    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches from the one holding `offset`, up to `max_bytes`; at least one batch
        even when it is larger, so a reader never stalls. Empty at the log end offset.

        Raises OffsetOutOfRangeError outside [log start offset, log end offset].
        """
        return bytes(self.read_batches(offset, max_bytes)[0])

    def read_batches(
        self, offset: int, max_bytes: int, stop_offset: int | None = None
    ) -> tuple[bytes | memoryview, int]:
        """`read`, plus the offset after the last returned batch (`offset` when empty).

        Batches that start at or after `stop_offset` are left out, except the first.
        One read never crosses a segment boundary: call again from the returned offset.
        The bytes may come as a read-only view of a buffer no one else holds (no copy).
        An offline log serves only the batches below `flushed_offset`, and raises
        LogOfflineError for an offset from there to the end of what it had appended.
        A batch that fails its check (damage in a segment opened without a scan) is never
        returned: the read ends before it, or raises CorruptLogError (file, byte position)
        when it is the batch holding `offset`.
        """
        if max_bytes < 1:
            raise LimitExceededError(f"max_bytes must be at least 1, got {max_bytes}")
        with self._lock:
            self._check_open()
            end = self._segments[-1].next_offset
            if self._offline is not None:
                durable = self._flushed_offset
                if durable <= offset <= end:
                    raise self._offline_error()
                # A batch boundary: whole batches below it are whole on disk.
                stop_offset = durable if stop_offset is None else min(stop_offset, durable)
            if offset == end:
                return b"", offset
            if offset < self.log_start_offset or offset > end:
                raise OffsetOutOfRangeError(offset, self.log_start_offset, self.log_end_offset)
            seg = self._segments[bisect.bisect_right(self._bases, offset) - 1]
            return seg.read(offset, max_bytes, stop_offset)

    def offset_for_timestamp(self, timestamp_ms: int) -> int | None:
        """The first offset whose record timestamp is >= `timestamp_ms`; None if there is none.
        CorruptLogError (file, byte position) if a batch it must read is damaged."""
        with self._lock:
            self._check_open()
            for seg in self._segments:
                if seg.max_timestamp is not None and seg.max_timestamp >= timestamp_ms:
                    return seg.offset_for_timestamp(timestamp_ms)
            return None

    # ------------------------------------------------------------------ retention
    def apply_retention(self, now_ms: int) -> int:
        """Delete whole sealed segments, oldest first, past `retention_bytes` or older than
        `retention_ms` (by their newest record). Never the active one. Returns how many."""
        with self._lock:
            self._check_writable()
            cfg = self.config
            try:
                self._join_flusher()  # never delete a segment whose fsync is in flight
                deleted = 0
                total = sum(seg.size for seg in self._segments)
                while len(self._segments) - deleted > 1:
                    oldest = self._segments[deleted]
                    over_size = (
                        cfg.retention_bytes is not None
                        and total - oldest.size >= cfg.retention_bytes
                    )
                    expired = (
                        cfg.retention_ms is not None
                        and oldest.max_timestamp is not None
                        and now_ms - oldest.max_timestamp > cfg.retention_ms
                    )
                    if not (over_size or expired):
                        break
                    total -= oldest.size
                    deleted += 1
                self._drop_oldest_locked(deleted, "retention")
            except FsyncError as e:
                raise self._take_offline(e) from e
            return deleted

    def delete_before(self, offset: int) -> int:
        """Delete whole sealed segments, oldest first, whose every offset is below `offset`
        (the next segment starts at or before it). Never the active one, so the log start
        offset only moves forward and never past the log end offset. Returns how many.

        For an owner that has made those records redundant (a snapshot covering them)."""
        with self._lock:
            self._check_writable()
            try:
                self._join_flusher()  # never delete a segment whose fsync is in flight
                deleted = 0
                while (
                    len(self._segments) - deleted > 1
                    and self._segments[deleted + 1].base_offset <= offset
                ):
                    deleted += 1
                self._drop_oldest_locked(deleted, f"below offset {offset}")
            except FsyncError as e:
                raise self._take_offline(e) from e
            return deleted

    def _drop_oldest_locked(self, count: int, why: str) -> None:
        """Delete the `count` oldest segments (never the active one).

        The new log start offset is committed first (`LOG_START_FILE`, written whole): after
        a crash from there on, open deletes the rest. Then the files are unlinked and the
        directory fsynced. If the disk is too full for that small file, the segments are
        deleted anyway (retention is what frees the disk): a crash part-way then leaves the
        oldest of them deleted and the log start offset between the old and the new.
        """
        assert count < len(self._segments)
        if count == 0:
            return
        start = self._segments[count].base_offset
        try:
            atomic_write(os.path.join(self.directory, LOG_START_FILE), f"{start}\n".encode())
        except DiskFullError as e:
            log.warning(
                "deleting segments of %s without committing the start: %s", self.directory, e
            )
        for _ in range(count):
            self._bases.pop(0)
            self._segments.pop(0).delete()
        fsync_dir(self.directory)
        log.info(
            "deleted %d segment(s) of %s (%s); log start offset now %d",
            count,
            self.directory,
            why,
            self.log_start_offset,
        )

    # ------------------------------------------------------------------ durability
    def flush(self, now_ms: int | None = None) -> None:
        """fsync the active segment's appended bytes (after any sealed segment still waiting
        for its fsync). LogOfflineError if an fsync fails."""
        with self._lock:
            self._check_writable()
            try:
                self._flush_locked(now_ms)
            except FsyncError as e:
                raise self._take_offline(e) from e

    def flush_if_due(self, now_ms: int) -> bool:
        """For fsync `interval`: fsync if the interval has passed since the last one."""
        with self._lock:
            self._check_writable()
            try:
                return self._flush_if_due_locked(now_ms)
            except FsyncError as e:
                raise self._take_offline(e) from e

    def _flush_if_due_locked(self, now_ms: int) -> bool:
        if not self._dirty or self.config.fsync != FsyncPolicy.INTERVAL:
            return False
        if self._last_flush_ms is None:
            self._last_flush_ms = now_ms
        if now_ms - self._last_flush_ms >= self.config.fsync_interval_ms:
            self._flush_locked(now_ms)
            return True
        return False

    def _flush_locked(self, now_ms: int | None) -> None:
        self._join_flusher()  # a sealed segment still on its way to disk comes first
        active = self._segments[-1]
        if self._dirty:  # else every append is on disk already (fsync `always`, or flushed)
            active.flush()
        self._flushed_offset = active.next_offset
        self._dirty = False
        if now_ms is not None:
            self._last_flush_ms = now_ms

    def close(self) -> None:
        """Flush everything, trim indexes, write the clean-shutdown marker; idempotent.

        An offline log (or one whose fsync fails here) is only released: no flush, no
        marker, so the next open recovers it from the disk. That is logged, not raised, so
        a broker closing many logs closes them all."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._join_flusher()
                for seg in self._segments:
                    seg.close(clean=True)
                self._write_recovery_point(self._segments[-1].next_offset)
                self._write_snapshot(self._segments[-1].next_offset, self._producers.copy())
                atomic_write(os.path.join(self.directory, CLEAN_SHUTDOWN_FILE), b"")
            except (FsyncError, LogOfflineError) as e:
                if isinstance(e, FsyncError):
                    self._take_offline(e)
                log.warning("log %s closed without a clean-shutdown marker: %s", self.directory, e)
            finally:
                for seg in self._segments:
                    seg.close()

    def abandon(self) -> None:
        """Release files without flushing or marking clean (as a crash would leave them)."""
        with self._lock:
            self._closed = True
            with contextlib.suppress(StorageError):
                self._join_flusher()  # its file must stay open until it is done
            for seg in self._segments:
                seg.close()

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError(f"log {self.directory} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._offline is not None:
            raise self._offline_error()

    def __enter__(self) -> PartitionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"PartitionLog({self.directory!r}, offsets [{self.log_start_offset}, "
            f"{self.log_end_offset}), {len(self._segments)} segments)"
        )


def _check_producer_fields(header: BatchHeader, batches: int) -> None:
    """An idempotent batch must be the only one of its append (Kafka's rule for magic 2)
    and carry a non-negative epoch and base sequence."""
    producer_id, epoch, base_sequence = header[9], header[10], header[11]
    if batches != 1:
        raise InvalidProducerBatchError(
            f"a batch of producer id {producer_id} is one of {batches} batches in one append; "
            "an idempotent batch must be appended alone"
        )
    if epoch < 0:
        raise InvalidProducerBatchError(
            f"producer id {producer_id} sent epoch {epoch}; an idempotent batch needs an epoch >= 0"
        )
    if base_sequence < 0:
        raise InvalidProducerBatchError(
            f"producer id {producer_id} epoch {epoch} sent base sequence {base_sequence}; "
            "an idempotent batch needs a base sequence >= 0"
        )


def _unlink_new_segment(directory: str, base_offset: int) -> None:
    stem = os.path.join(directory, file_stem(base_offset))
    for suffix in SEGMENT_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            _disk.disk.unlink(stem + suffix)


def _is_segment_file(name: str, suffix: str) -> bool:
    stem = name[: -len(suffix)]
    return name.endswith(suffix) and len(stem) == 20 and stem.isdigit()


__all__ = ["AppendResult", "CorruptBatchError", "PartitionLog"]
