"""One segment: `<base offset>.log` with its `.index`, `.timeindex` and `.indexsum`.

The .log is a run of whole RecordBatch v2 batches with contiguous offsets, starting at the
base offset in the file name (`%020d`, so names sort as offsets do). Only the log's owner
(`PartitionLog`) calls a segment, under its lock; a segment keeps no lock of its own.

Crash atomicity: `append` is one positional write of whole batches at the end of the file;
a crash can leave a torn tail, which `recover` cuts. Index entries are written to the memmap
after the log bytes; indexes are rebuilt by `recover`, so their order on disk does not matter.
`seal` makes the segment read-only (final time-index entry, indexes trimmed and fsynced, then
the `.indexsum` checksum sidecar written and fsynced, see _index.py); its log bytes are
fsynced by the owner (PartitionLog), at once or right behind the roll. A clean close does the
same for the active segment. The sidecar's directory entry becomes durable with the owner's
next directory fsync (the roll's, or the recovery point's), before the recovery point passes
the segment.

Opening. After a crash, `open_recover` scans every batch (CRC32C) and rebuilds the indexes.
A segment known to be on disk (below the recovery point, or any after a clean shutdown) is
opened by `open_trusted` without reading its batches, for a fast start: its indexes are used
only if the sidecar is whole and matches them and the .log's size; otherwise the log is
scanned without changing any file, and a bad batch -- or a log that ends elsewhere than the
sidecar or the next segment says -- raises CorruptLogError naming the file and byte position
(acknowledged records are never cut); a whole log just gets new indexes and a new sidecar.

Reads verify lazily what no scan has checked. A segment knows two byte positions:
`verified_prefix` (bytes [0, P) have passed `check_batch`) and `unverified_end` (the size at
open: every byte from there on was appended by this process, after PartitionLog.check, or was
scanned). A read whose batches overlap [P, unverified_end) checks those batches (one C CRC32C
call each, and contiguous base offsets); a bad one ends the read before it if a good batch
precedes it, else raises CorruptLogError (file, byte position, reason). A read starting at or
below P moves P past what it checked, so a reader going front to back checks each byte once;
readers of freshly appended data pay nothing. `offset_for_timestamp` checks the batches it
walks the same way.

Every file-system call goes through the disk layer (`_disk.py`); a failed fdatasync raises
`FsyncError` (see `_fs.py`), which the owner turns into taking the log offline.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import struct
from dataclasses import dataclass

from . import _disk
from ._batch import (
    HEADER_BYTES,
    LOG_OVERHEAD,
    BatchHeader,
    Record,
    check_batch,
    decode_batch,
)
from ._config import RELATIVE_OFFSET_LIMIT, LogConfig
from ._errors import (
    CorruptBatchError,
    CorruptLogError,
    DiskFullError,
    FsyncError,
    StorageError,
    UnsupportedCodecError,
)
from ._fs import fsync_file
from ._index import IndexSum, OffsetIndex, TimeIndex, read_indexsum, write_indexsum

log = logging.getLogger("riverlog.storage")

LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
TIMEINDEX_SUFFIX = ".timeindex"
INDEXSUM_SUFFIX = ".indexsum"
# Every file a segment owns, the .log first (deleted first: see `Segment.delete`).
SEGMENT_SUFFIXES = (LOG_SUFFIX, INDEX_SUFFIX, TIMEINDEX_SUFFIX, INDEXSUM_SUFFIX)
# What a read pulls in beyond `max_bytes`: enough to step from an index entry to the batch
# it wants without another read in the common case.
READ_AHEAD_BYTES = 64 * 1024
# baseOffset, batchLength, partitionLeaderEpoch, magic, crc, attributes, lastOffsetDelta,
# baseTimestamp, maxTimestamp: what walking the log needs from each header.
_PREFIX = struct.Struct(">qiibIhiqq")
_PREFIX_BYTES = _PREFIX.size
_pack_base_offset = struct.Struct(">q").pack
# The smallest batchLength a header can hold (a header and no records): anything less in a
# header walked over is damage, and would move a walk backwards.
_BATCH_LENGTH_MIN = HEADER_BYTES - LOG_OVERHEAD
_NO_INDEXSUM = "it has no index checksum file"
# Iovec count per pwritev, well under Linux's IOV_MAX of 1024.
IOVECS_MAX = 512


def file_stem(base_offset: int) -> str:
    return f"{base_offset:020d}"


def _at_file_position(error: CorruptBatchError, at: int, pos: int) -> str:
    """`check_batch`'s reason for a batch found at `at` in a buffer, with the batch's byte
    position in the file instead (its messages name it as "at byte N")."""
    return str(error).replace(f"at byte {at}", f"at byte {pos}")


@dataclass(frozen=True, slots=True)
class Truncation:
    """What recovery cut from the tail of a segment after a crash."""

    path: str
    position: int
    bytes_dropped: int
    first_offset_dropped: int
    reason: str


class Segment:
    def __init__(self, directory: str, base_offset: int, config: LogConfig) -> None:
        self.base_offset = base_offset
        self.config = config
        stem = os.path.join(directory, file_stem(base_offset))
        self.log_path = stem + LOG_SUFFIX
        self.index_path = stem + INDEX_SUFFIX
        self.timeindex_path = stem + TIMEINDEX_SUFFIX
        self.indexsum_path = stem + INDEXSUM_SUFFIX
        self.fd = -1
        self.size = 0
        self.next_offset = base_offset
        # Largest record timestamp in the segment, None while it is empty.
        self.max_timestamp: int | None = None
        # Max timestamp of the first batch: segment age for `segment_ms` counts from it.
        self.first_timestamp: int | None = None
        self.bytes_since_index = 0
        # Read per append (a segment's config never changes).
        self.segment_bytes = config.segment_bytes
        self.index_interval_bytes = config.index_interval_bytes
        self.sealed = False
        # Bytes [verified_prefix, unverified_end) have not been checked by anyone yet: what
        # `open_trusted` took on trust. Reads check them (see the module docstring).
        self.verified_prefix = 0
        self.unverified_end = 0
        self.offset_index: OffsetIndex
        self.time_index: TimeIndex

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, directory: str, base_offset: int, config: LogConfig) -> Segment:
        """A new empty segment. If any step fails (ENOSPC preallocating an index, say), what
        was opened is closed and the files created are removed before the error is raised."""
        seg = cls(directory, base_offset, config)
        disk = _disk.disk
        seg.fd = disk.open(seg.log_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            seg.offset_index = OffsetIndex.create(seg.index_path, config.index_bytes_max)
            seg.time_index = TimeIndex.create(seg.timeindex_path, config.index_bytes_max)
        except BaseException:
            with contextlib.suppress(OSError):
                seg.close()
            for path in (seg.log_path, seg.index_path, seg.timeindex_path):
                with contextlib.suppress(OSError):
                    disk.unlink(path)
            raise
        return seg

    @classmethod
    def open_trusted(
        cls, directory: str, base_offset: int, config: LogConfig, next_offset: int | None
    ) -> Segment:
        """Open a segment known to be whole on disk (clean shutdown, or below the recovery
        point) without reading its batches; reads verify them lazily.

        `next_offset` is the next segment's base offset; None for the newest segment, which
        is opened for appends. The indexes are trusted only if the `.indexsum` sidecar is
        whole and matches them, the .log's size and the next segment; else `_rebuild_trusted`
        scans the log: CorruptLogError (file, byte) if it is damaged, new indexes if not.
        """
        seg = cls(directory, base_offset, config)
        seg.fd = _disk.disk.open(seg.log_path, os.O_RDWR)
        try:
            seg.size = _disk.disk.size(seg.fd)
            summary: IndexSum | None = None
            try:
                summary = read_indexsum(seg.indexsum_path)
            except FileNotFoundError:
                problem: str | None = _NO_INDEXSUM
            except (OSError, ValueError) as e:
                problem = f"its index checksum file is damaged: {e}"
            else:
                problem = seg._load_trusted(summary, next_offset)
            if problem is not None:
                seg._rebuild_trusted(summary, next_offset, problem)
        except BaseException:
            seg.close()
            raise
        return seg

    def _load_trusted(self, summary: IndexSum, next_offset: int | None) -> str | None:
        """Open the indexes `summary` vouches for and take the segment's state from them;
        the reason if they (or the log's size) do not match it. Nothing is written."""
        if summary.log_bytes != self.size:
            return (
                f"the log has {self.size} bytes; it had {summary.log_bytes} when its indexes "
                "were written"
            )
        if next_offset is not None and summary.next_offset != next_offset:
            return (
                f"its indexes end at offset {summary.next_offset}, the next segment starts at "
                f"{next_offset}"
            )
        bytes_max = self.config.index_bytes_max
        try:
            # Read-only first: nothing changes on disk until the checks have passed.
            self.offset_index = OffsetIndex.open(self.index_path, bytes_max, False)
            self.time_index = TimeIndex.open(self.timeindex_path, bytes_max, False)
        except (OSError, ValueError) as e:
            return f"cannot open its index: {e}"
        got = (*self.offset_index.digest(), *self.time_index.digest())
        want = (
            summary.index_bytes,
            summary.index_crc,
            summary.timeindex_bytes,
            summary.timeindex_crc,
        )
        if got != want:
            return f"its indexes (bytes, CRC32C) are {got}, the checksum file says {want}"
        # Cheap bounds checks too: a sidecar we wrote vouches only for what we wrote.
        rel_end = summary.next_offset - self.base_offset
        problem = self.offset_index.check(self.size, rel_end) or self.time_index.check(rel_end)
        if problem is None and self.size > 0 and self.time_index.last() is None:
            problem = "time index has no entry for a non-empty segment"
        if problem is not None:
            return problem
        try:
            self._walk_tail(summary.next_offset)
        except CorruptBatchError as e:
            return f"index does not match the log: {e}"
        if next_offset is None:  # the newest segment: appends go on
            self._close_indexes()
            self.offset_index = OffsetIndex.open(self.index_path, bytes_max, True)
            self.time_index = TimeIndex.open(self.timeindex_path, bytes_max, True)
        else:
            self.sealed = True
        self.verified_prefix = 0
        self.unverified_end = self.size
        return None

    def _walk_tail(self, end_offset: int) -> None:
        """The state the indexes do not hold, from the headers after the last index entry:
        the end offset (must be `end_offset`), the max timestamp, bytes since the last entry.
        CorruptBatchError if the headers do not fit the index."""
        last_ts = self.time_index.last()
        self.max_timestamp = None if last_ts is None else last_ts[0]
        if self.size > 0:
            first = self._prefix_at(0)
            if first[0] != self.base_offset:
                raise CorruptBatchError(
                    f"first batch has base offset {first[0]}, file name says {self.base_offset}"
                )
            self.first_timestamp = first[8]
        rel, pos = self.offset_index.last()
        # Walk the headers from the last index entry to the end of the file: the entry must
        # point at a real batch (a sealed segment's too), and the walk finds the newest
        # segment's end. At most index_interval_bytes plus one batch.
        offset = self.base_offset + rel
        while pos < self.size:
            base, length, *_rest, last_delta, _bts, max_ts = self._prefix_at(pos)
            if base != offset or length < _BATCH_LENGTH_MIN:
                raise CorruptBatchError(f"batch at byte {pos} has base offset {base}")
            offset = base + last_delta + 1
            pos += length + LOG_OVERHEAD
            if self.max_timestamp is None or max_ts > self.max_timestamp:
                self.max_timestamp = max_ts
        if pos != self.size:
            raise CorruptBatchError(f"last batch runs past the end of the file ({self.size})")
        if offset != end_offset:
            raise CorruptBatchError(f"batches end at offset {offset}, expected {end_offset}")
        self.next_offset = offset
        self.bytes_since_index = self.size - self.offset_index.last()[1]

    def _rebuild_trusted(
        self, summary: IndexSum | None, next_offset: int | None, problem: str
    ) -> None:
        """The indexes of a segment known to be on disk cannot be used (`problem`): scan the
        log first, changing nothing. A bad batch, or whole batches that end elsewhere than
        the sidecar (`summary`, if whole) or the next segment says, raise CorruptLogError:
        the segment holds acknowledged records, so it is never cut. Otherwise the indexes
        are rebuilt and (sealed segment) a new sidecar written; the scan verified every byte.
        """
        self._close_indexes()
        pos, end_offset, reason = self._scan(self.size, account=False)
        if reason is not None:
            raise CorruptLogError(self.log_path, pos, reason)
        if summary is not None and (summary.log_bytes, summary.next_offset) != (
            self.size,
            end_offset,
        ):
            raise CorruptLogError(
                self.log_path,
                min(self.size, summary.log_bytes),
                f"whole batches end at byte {self.size}, offset {end_offset}; when the segment "
                f"was sealed or closed cleanly they ended at byte {summary.log_bytes}, offset "
                f"{summary.next_offset}",
            )
        if next_offset is not None and end_offset != next_offset:
            raise CorruptLogError(
                self.log_path,
                self.size,
                f"batches end at offset {end_offset}, the next segment starts at {next_offset}",
            )
        # A missing sidecar is expected once, in a data directory written before they were.
        level = logging.INFO if problem == _NO_INDEXSUM else logging.WARNING
        log.log(level, "rebuilding the indexes of %s from the log: %s", self.log_path, problem)
        pos, reason = self._rebuild_indexes()
        assert reason is None, reason  # the scan above passed: nothing to cut
        assert pos == self.size
        self.verified_prefix = self.unverified_end = self.size
        if next_offset is not None:
            self.seal()

    def _prefix_at(self, pos: int) -> tuple[int, ...]:
        raw = _disk.disk.pread(self.fd, _PREFIX_BYTES, pos)
        if len(raw) < _PREFIX_BYTES:
            raise CorruptBatchError(f"short header at byte {pos}")
        return _PREFIX.unpack(raw)

    @classmethod
    def open_recover(
        cls, directory: str, base_offset: int, config: LogConfig, newest: bool
    ) -> tuple[Segment, Truncation | None]:
        """Open after a crash: scan every batch and rebuild both indexes from the log.

        The newest segment's bad tail is cut (a torn write); a bad batch in any other segment
        raises CorruptLogError naming the file and byte position.
        """
        seg = cls(directory, base_offset, config)
        seg.fd = _disk.disk.open(seg.log_path, os.O_RDWR)
        seg.size = _disk.disk.size(seg.fd)
        cut = seg.recover(truncate=newest)
        return seg, cut

    def recover(self, truncate: bool) -> Truncation | None:
        """Scan the log, rebuild the indexes; cut a bad tail if `truncate`, else raise."""
        if not truncate:
            # Check before the index files are replaced: a refusal to open leaves every file
            # as it was, for an operator to inspect.
            pos, _end, reason = self._scan(self.size, account=False)
            if reason is not None:
                self.close()
                raise CorruptLogError(self.log_path, pos, reason)
        file_bytes = self.size
        pos, reason = self._rebuild_indexes()
        cut: Truncation | None = None
        if reason is not None:
            if not truncate:
                self.close()
                raise CorruptLogError(self.log_path, pos, reason)
            _disk.disk.ftruncate(self.fd, pos)
            fsync_file(self.fd, self.log_path)
            cut = Truncation(self.log_path, pos, file_bytes - pos, self.next_offset, reason)
        self.size = pos
        self.verified_prefix = self.unverified_end = pos  # every byte left was scanned
        if not truncate:
            self.seal()
        return cut

    def _rebuild_indexes(self) -> tuple[int, str | None]:
        """New empty indexes, filled by a scan of the log from byte 0 (offsets, timestamps
        and the segment's end with them); the scan's (valid bytes, why the rest is not)."""
        self.offset_index = OffsetIndex.create(self.index_path, self.config.index_bytes_max)
        self.time_index = TimeIndex.create(self.timeindex_path, self.config.index_bytes_max)
        self.max_timestamp = None
        self.first_timestamp = None
        self.bytes_since_index = 0
        self.next_offset = self.base_offset
        pos, _end, reason = self._scan(self.size)
        return pos, reason

    def _scan(self, file_bytes: int, account: bool = True) -> tuple[int, int, str | None]:
        """Check batches from byte 0; return (bytes that are valid, the offset after them,
        why the rest is not). With `account`, each valid batch also goes into the indexes
        and offsets."""
        expected = self.base_offset
        if file_bytes == 0:
            return 0, expected, None
        with mmap.mmap(self.fd, file_bytes, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                pos = 0
                while pos < file_bytes:
                    try:
                        header = check_batch(view, pos, file_bytes)
                    except CorruptBatchError as e:
                        return pos, expected, str(e)
                    if header.base_offset != expected:
                        return (
                            pos,
                            expected,
                            (
                                f"batch base offset {header.base_offset}, expected "
                                f"{expected} (offsets must be contiguous)"
                            ),
                        )
                    if header.last_offset - self.base_offset > RELATIVE_OFFSET_LIMIT:
                        return pos, expected, "relative offset past u32"
                    if account:
                        self._account(
                            header.base_offset,
                            header.last_offset_delta,
                            header.size,
                            header.max_timestamp,
                            pos,
                        )
                    expected = header.last_offset + 1
                    pos += header.size
                return pos, expected, None
            finally:
                view.release()

    # ------------------------------------------------------------------ appending
    def takes(
        self, payload_bytes: int, last_offset: int, newest_ms: int, segment_ms: int | None
    ) -> bool:
        """Whether an append (its batches' last offset and newest record timestamp) goes into
        this segment rather than a new one: the segment is not sealed, the payload fits
        (size, index space, u32 offsets), and it is not aged: the newest record is less than
        `segment_ms` later than the segment's first batch (None: no age limit).

        Age is record time against record time, as Kafka's `LogSegment.shouldRoll` does,
        never the broker's clock against a record's time: records stamped in the past (a
        replay, a mirror) would otherwise roll a new segment on every append.

        Every roll condition in one call, as it runs once per append."""
        if self.sealed or last_offset - self.base_offset > RELATIVE_OFFSET_LIMIT:
            return False
        size = self.size
        if size == 0:  # anything goes into an empty segment, and it has no age yet
            return True
        # `full` inlined: entries >= capacity - 1 (one slot kept for the seal entry).
        offsets, times = self.offset_index, self.time_index
        if (
            size + payload_bytes > self.segment_bytes
            or offsets.entries >= offsets.capacity - 1
            or times.entries >= times.capacity - 1
        ):
            return False
        first = self.first_timestamp
        return segment_ms is None or first is None or newest_ms - first < segment_ms

    def append(self, payload: memoryview, headers: list[BatchHeader]) -> None:
        """Write `headers`' batches (back to back in `payload`) with offsets from next_offset.

        One pwritev: the 8-byte baseOffset of each batch comes from a small buffer, the rest
        straight from `payload`. On any write error the file is cut back, nothing is appended.
        """
        assert not self.sealed
        if len(headers) * 2 > IOVECS_MAX:
            raise StorageError(f"{len(headers)} batches in one append; at most {IOVECS_MAX // 2}")
        # Header fields by index on this per-batch path: 1 batchLength, 6 lastOffsetDelta,
        # 8 maxTimestamp.
        iov: list[bytes | memoryview] = []
        offset = self.next_offset
        pos = 0
        for header in headers:
            size = header[1] + LOG_OVERHEAD
            iov.append(_pack_base_offset(offset))
            iov.append(payload[pos + 8 : pos + size])
            offset += header[6] + 1
            pos += size
        total = pos
        start = self.size
        disk = _disk.disk
        try:
            written = disk.pwritev(self.fd, iov, start)
            while written < total:  # rare: a short write; finish it from where it stopped
                rest = b"".join(bytes(v) for v in iov)[written:]
                written += disk.pwrite(self.fd, rest, start + written)
        except OSError as e:
            with contextlib.suppress(OSError):
                disk.ftruncate(self.fd, start)
            if e.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"no space left on device writing {total} bytes to {self.log_path}"
                ) from e
            raise StorageError(f"write to {self.log_path} failed: {e}") from e
        pos = start
        offset = self.next_offset
        for header in headers:
            size = header[1] + LOG_OVERHEAD
            self._account(offset, header[6], size, header[8], pos)
            offset += header[6] + 1
            pos += size
        self.size = start + total

    def _account(
        self, base_offset: int, last_offset_delta: int, size: int, max_timestamp: int, pos: int
    ) -> None:
        """Index bookkeeping for one batch written at `pos` (also the recovery scan's)."""
        # `takes` refuses a full index only between appends; the batches of one append
        # (or a scan under a smaller index_bytes_max) can fill it, and then the rest of the
        # segment goes unindexed: lookups walk further, and the time index keeps the slot
        # its seal needs.
        if self.bytes_since_index >= self.index_interval_bytes and not self.offset_index.full:
            rel = base_offset - self.base_offset
            self.offset_index.append(rel, pos)
            newest = self.max_timestamp
            times = self.time_index
            if (
                newest is not None
                and not times.full
                and (times.last_timestamp is None or newest > times.last_timestamp)
            ):
                times.append(newest, rel)
            self.bytes_since_index = 0
        self.bytes_since_index += size
        if self.first_timestamp is None:
            self.first_timestamp = max_timestamp
        if self.max_timestamp is None or max_timestamp > self.max_timestamp:
            self.max_timestamp = max_timestamp
        self.next_offset = base_offset + last_offset_delta + 1

    # ------------------------------------------------------------------ reading
    def read(
        self, offset: int, max_bytes: int, stop_offset: int | None = None
    ) -> tuple[bytes | memoryview, int]:
        """Whole batches from the one holding `offset`, up to `max_bytes` (at least one), and
        the offset after the last of them. Batches starting at or after `stop_offset` are left
        out (the first batch is always returned).

        Batches no one has checked yet are checked first (see the module docstring): the read
        ends before a bad one, or raises CorruptLogError if the first batch is bad."""
        rel, pos, bound = self.offset_index.span(offset - self.base_offset)
        expected = self.base_offset + rel  # the base offset of the batch at `pos`
        end = self.size
        chunk_at = pos
        pread = _disk.disk.pread
        want = min(end - pos, max_bytes + READ_AHEAD_BYTES)
        if bound is not None and bound > pos:
            # The batch holding `offset` ends at or before the next index entry (`bound`),
            # and a batch after it joins only within max_bytes of its start (which is at
            # least HEADER_BYTES before `bound`): no need to read further. A one-batch read
            # then gets exactly its batch, returned without a copy. (A wrong index only
            # costs the second pread below.)
            want = min(want, bound - pos + max(0, max_bytes - HEADER_BYTES))
        chunk = pread(self.fd, want, pos)
        # Find the batch holding `offset`.
        while True:
            head = self._prefix_in(chunk, chunk_at, pos)
            if head is None:
                chunk_at = pos
                chunk = pread(self.fd, min(end - pos, max_bytes + READ_AHEAD_BYTES), pos)
                head = self._prefix_in(chunk, chunk_at, pos)
                if head is None:
                    raise CorruptLogError(self.log_path, pos, "short batch header")
            base, length, last_delta = head[0], head[1], head[6]
            if base != expected or length < _BATCH_LENGTH_MIN:
                raise CorruptLogError(
                    self.log_path,
                    pos,
                    f"batch header says base offset {base}, batch length {length}; expected "
                    f"base offset {expected} (walking from the index entry for offset "
                    f"{self.base_offset + rel})",
                )
            if base + last_delta >= offset:
                break
            expected = base + last_delta + 1
            pos += length + LOG_OVERHEAD
            if pos >= end:
                raise CorruptLogError(self.log_path, pos, f"offset {offset} not found")
        start = pos
        next_offset = base + last_delta + 1
        # Take whole batches while they fit.
        pos += length + LOG_OVERHEAD
        while pos < end:
            head = self._prefix_in(chunk, chunk_at, pos)
            if head is None:
                break
            size = head[1] + LOG_OVERHEAD
            if (
                size < HEADER_BYTES  # damage (checked below when it is unverified)
                or pos + size - start > max_bytes
                or (stop_offset is not None and head[0] >= stop_offset)
            ):
                break
            pos += size
            next_offset = head[0] + head[6] + 1
        stop = pos
        if not (chunk_at <= start and stop - chunk_at <= len(chunk)):
            chunk_at = start
            chunk = pread(self.fd, stop - start, start)
        if start < self.unverified_end and stop > self.verified_prefix:
            stop, next_offset = self._verify(chunk, chunk_at, start, stop, expected)
        if start == chunk_at and stop - start == len(chunk):
            return chunk, next_offset
        # A view, not a slice: a 1 MiB fetch would otherwise copy its bytes once more.
        return memoryview(chunk)[start - chunk_at : stop - chunk_at], next_offset

    def _verify(
        self, chunk: bytes, chunk_at: int, start: int, stop: int, base_offset: int
    ) -> tuple[int, int]:
        """Check the batches in bytes [start, stop) of the log (held in `chunk`, which starts
        at byte `chunk_at`) that lie in the unverified range; the first has `base_offset`.
        Returns (stop, next offset) of the batches that may be served: all of them, or those
        before the first bad one. CorruptLogError if the first one is bad."""
        pos = start
        expected = base_offset
        end = min(stop, chunk_at + len(chunk)) - chunk_at  # `check_batch` bound, in `chunk`
        prefix, unverified_end = self.verified_prefix, self.unverified_end
        while pos < stop:  # each pass moves pos on by a whole batch, or leaves the loop
            at = pos - chunk_at
            if prefix <= pos < unverified_end:
                try:
                    header = check_batch(chunk, at, end)
                except CorruptBatchError as e:
                    reason: str | None = _at_file_position(e, at, pos)
                else:
                    reason = None
                    if header[0] != expected:
                        reason = f"batch base offset {header[0]}, expected {expected}"
                if reason is not None:
                    if pos == start:
                        raise CorruptLogError(self.log_path, pos, reason)
                    break  # serve the good batches before it; the next read refuses
                size, last_offset = header[1] + LOG_OVERHEAD, header[0] + header[6]
            else:  # checked before: scanned, verified by a read, or appended here
                head = _PREFIX.unpack_from(chunk, at)
                size, last_offset = head[1] + LOG_OVERHEAD, head[0] + head[6]
            expected = last_offset + 1
            pos += size
        if start <= prefix < pos:
            self.verified_prefix = pos
        return pos, expected

    @staticmethod
    def _prefix_in(chunk: bytes, chunk_at: int, pos: int) -> tuple[int, ...] | None:
        at = pos - chunk_at
        if at < 0 or at + _PREFIX_BYTES > len(chunk):
            return None
        return _PREFIX.unpack_from(chunk, at)

    def offset_for_timestamp(self, timestamp_ms: int) -> int | None:
        """The first offset in this segment whose record timestamp is >= `timestamp_ms`.

        The batches walked to find it are checked as a read checks them; a bad one raises
        CorruptLogError (file, byte) rather than steer the answer."""
        if self.max_timestamp is None or self.max_timestamp < timestamp_ms:
            return None
        rel, pos = self.offset_index.lookup(self.time_index.lookup(timestamp_ms))
        expected = self.base_offset + rel
        while pos < self.size:  # each pass moves pos on by a whole batch
            try:
                head = self._prefix_at(pos)
            except CorruptBatchError as e:
                raise CorruptLogError(self.log_path, pos, str(e)) from None
            base, length, max_ts = head[0], head[1], head[8]
            if base != expected or length < _BATCH_LENGTH_MIN:
                raise CorruptLogError(
                    self.log_path,
                    pos,
                    f"batch header says base offset {base}, batch length {length}; "
                    f"expected base offset {expected}",
                )
            size = length + LOG_OVERHEAD
            unverified = self.verified_prefix <= pos < self.unverified_end
            if max_ts >= timestamp_ms or unverified:
                batch = _disk.disk.pread(self.fd, size, pos)
                records: list[Record] = []
                try:
                    if max_ts < timestamp_ms:
                        check_batch(batch)
                    else:
                        _header, records = decode_batch(batch)
                except UnsupportedCodecError:
                    raise  # a whole batch in a codec this build cannot decode
                except CorruptBatchError as e:
                    reason = _at_file_position(e, 0, pos)
                    raise CorruptLogError(self.log_path, pos, reason) from None
                if unverified and pos == self.verified_prefix:
                    self.verified_prefix = pos + size
                for record in records:
                    if record.timestamp_ms >= timestamp_ms:
                        return record.offset
            expected = base + head[6] + 1
            pos += size
        return None

    # ------------------------------------------------------------------ lifecycle
    def flush(self) -> None:
        """fdatasync the .log; FsyncError if it fails (the caller must not retry)."""
        fsync_file(self.fd, self.log_path, data_only=True)

    def seal(self) -> None:
        """Make the segment read-only: final time-index entry, indexes trimmed and fsynced.

        The log's bytes are fsynced by the owner: at once with fsync `always` (they already
        are), behind the roll otherwise (see PartitionLog._flush_behind)."""
        self._final_time_entry()
        self.offset_index.trim()
        self.time_index.trim()
        self.sealed = True
        self._write_indexsum()

    def _write_indexsum(self) -> None:
        """Write the `.indexsum` sidecar of the final (trimmed) indexes and fsync it.

        FsyncError propagates (the owner goes offline). Any other failure (ENOSPC) is
        logged and the old sidecar removed: the next open that trusts this segment then
        rebuilds its indexes with a scan, which costs time, never correctness."""
        summary = IndexSum(
            self.size,
            self.next_offset,
            *self.offset_index.digest(),
            *self.time_index.digest(),
        )
        try:
            write_indexsum(self.indexsum_path, summary)
        except FsyncError:
            raise
        except OSError as e:
            log.warning(
                "index checksum of %s not written (the next open rebuilds its indexes): %s",
                self.log_path,
                e,
            )
            with contextlib.suppress(FileNotFoundError):
                _disk.disk.unlink(self.indexsum_path)

    def _final_time_entry(self) -> None:
        if self.max_timestamp is None:
            return
        last = self.time_index.last()
        if last is None or self.max_timestamp > last[0]:
            self.time_index.append(self.max_timestamp, self.next_offset - self.base_offset)

    def close(self, clean: bool = False) -> None:
        """Release files; `clean` first makes the segment whole on disk as `seal` does
        (the owner's directory fsync that follows makes the sidecar's name durable)."""
        if clean and self.fd >= 0 and not self.sealed:
            self.flush()
            self._final_time_entry()
            self.offset_index.trim()
            self.time_index.trim()
            self._write_indexsum()
        self._close_indexes()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            _disk.disk.close(fd)

    def _close_indexes(self) -> None:
        for name in ("offset_index", "time_index"):
            index = getattr(self, name, None)
            if index is not None:
                index.close()

    def delete(self) -> None:
        """Close and unlink: the .log first, so a crash midway leaves only orphan indexes
        (and sidecar), which the next open removes."""
        self.close()
        for path in (self.log_path, self.index_path, self.timeindex_path, self.indexsum_path):
            with contextlib.suppress(FileNotFoundError):
                _disk.disk.unlink(path)
