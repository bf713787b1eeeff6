"""One segment: `<base offset>.log` with its `.index` and `.timeindex`.

The .log is a run of whole RecordBatch v2 batches with contiguous offsets, starting at the
base offset in the file name (`%020d`, so names sort as offsets do). Only the log's owner
(`PartitionLog`) calls a segment, under its lock; a segment keeps no lock of its own.

Crash atomicity: `append` is one positional write of whole batches at the end of the file;
a crash can leave a torn tail, which `recover` cuts. Index entries are written to the memmap
after the log bytes; indexes are rebuilt by `recover`, so their order on disk does not matter.
`seal` makes the segment read-only (final time-index entry, indexes trimmed and fsynced);
its log bytes are fsynced by the owner (PartitionLog), at once or right behind the roll.

Every file-system call goes through the disk layer (`_disk.py`); a failed fdatasync raises
`FsyncError` (see `_fs.py`), which the owner turns into taking the log offline.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
from dataclasses import dataclass

from . import _disk
from ._batch import (
    HEADER_BYTES,
    LOG_OVERHEAD,
    BatchHeader,
    check_batch,
    decode_batch,
)
from ._config import RELATIVE_OFFSET_LIMIT, LogConfig
from ._errors import CorruptBatchError, CorruptLogError, DiskFullError, StorageError
from ._fs import fsync_file
from ._index import OffsetIndex, TimeIndex

LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
TIMEINDEX_SUFFIX = ".timeindex"
# What a read pulls in beyond `max_bytes`: enough to step from an index entry to the batch
# it wants without another read in the common case.
READ_AHEAD_BYTES = 64 * 1024
# baseOffset, batchLength, partitionLeaderEpoch, magic, crc, attributes, lastOffsetDelta,
# baseTimestamp, maxTimestamp: what walking the log needs from each header.
_PREFIX = struct.Struct(">qiibIhiqq")
_PREFIX_BYTES = _PREFIX.size
_BASE_OFFSET = struct.Struct(">q")
# Iovec count per pwritev, well under Linux's IOV_MAX of 1024.
IOVECS_MAX = 512


def file_stem(base_offset: int) -> str:
    return f"{base_offset:020d}"


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
        self.fd = -1
        self.size = 0
        self.next_offset = base_offset
        # Largest record timestamp in the segment, None while it is empty.
        self.max_timestamp: int | None = None
        # Max timestamp of the first batch: segment age for `segment_ms` counts from it.
        self.first_timestamp: int | None = None
        self.bytes_since_index = 0
        self.sealed = False
        self.offset_index: OffsetIndex
        self.time_index: TimeIndex

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, directory: str, base_offset: int, config: LogConfig) -> Segment:
        seg = cls(directory, base_offset, config)
        seg.fd = _disk.disk.open(seg.log_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        seg.offset_index = OffsetIndex.create(seg.index_path, config.index_bytes_max)
        seg.time_index = TimeIndex.create(seg.timeindex_path, config.index_bytes_max)
        return seg

    @classmethod
    def open_trusted(
        cls, directory: str, base_offset: int, config: LogConfig, next_offset: int | None
    ) -> Segment:
        """Open a segment known to be whole (clean shutdown, or before the recovery point).

        `next_offset` is the next segment's base offset; None for the newest segment, whose
        end is found by walking the batch headers after its last index entry. Indexes that
        fail their sanity check are rebuilt by a full recovery scan of this segment.
        """
        seg = cls(directory, base_offset, config)
        seg.fd = _disk.disk.open(seg.log_path, os.O_RDWR)
        seg.size = _disk.disk.size(seg.fd)
        active = next_offset is None
        rel_end = None if active else next_offset - base_offset  # type: ignore[operator]
        try:
            seg.offset_index = OffsetIndex.open(seg.index_path, config.index_bytes_max, active)
            seg.time_index = TimeIndex.open(seg.timeindex_path, config.index_bytes_max, active)
            problem = seg.offset_index.check(seg.size, rel_end) or seg.time_index.check(rel_end)
            if problem is None and seg.size > 0 and seg.time_index.last() is None:
                problem = "time index has no entry for a non-empty segment"
        except (OSError, ValueError) as e:
            problem = f"cannot open index: {e}"
        if problem is None:
            try:
                seg._load_trusted(next_offset)
            except CorruptBatchError as e:
                problem = f"index does not match the log: {e}"
        if problem is not None:
            seg._close_indexes()
            seg.recover(truncate=active)
        elif not active:
            seg.sealed = True
        return seg

    def _load_trusted(self, next_offset: int | None) -> None:
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
            if base != offset or length < HEADER_BYTES - LOG_OVERHEAD:
                raise CorruptBatchError(f"batch at byte {pos} has base offset {base}")
            offset = base + last_delta + 1
            pos += length + LOG_OVERHEAD
            if self.max_timestamp is None or max_ts > self.max_timestamp:
                self.max_timestamp = max_ts
        if pos != self.size:
            raise CorruptBatchError(f"last batch runs past the end of the file ({self.size})")
        if next_offset is not None and offset != next_offset:
            raise CorruptBatchError(
                f"batches end at offset {offset}, the next segment starts at {next_offset}"
            )
        self.next_offset = offset
        self.bytes_since_index = self.size - self.offset_index.last()[1]

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
            # as it was, for an operator to inspect. (Sealed segments are scanned only when
            # a crash beat the recovery-point checkpoint, or their index was damaged.)
            pos, reason = self._scan(self.size, account=False)
            if reason is not None:
                self.close()
                raise CorruptLogError(self.log_path, pos, reason)
        self.offset_index = OffsetIndex.create(self.index_path, self.config.index_bytes_max)
        self.time_index = TimeIndex.create(self.timeindex_path, self.config.index_bytes_max)
        self.max_timestamp = None
        self.first_timestamp = None
        self.bytes_since_index = 0
        self.next_offset = self.base_offset
        file_bytes = self.size
        pos, reason = self._scan(file_bytes)
        cut: Truncation | None = None
        if reason is not None:
            if not truncate:
                self.close()
                raise CorruptLogError(self.log_path, pos, reason)
            _disk.disk.ftruncate(self.fd, pos)
            fsync_file(self.fd, self.log_path)
            cut = Truncation(self.log_path, pos, file_bytes - pos, self.next_offset, reason)
        self.size = pos
        if not truncate:
            self.seal()
        return cut

    def _scan(self, file_bytes: int, account: bool = True) -> tuple[int, str | None]:
        """Check batches from byte 0; return (bytes that are valid, why the rest is not).

        With `account`, each valid batch also goes into the indexes and offsets.
        """
        if file_bytes == 0:
            return 0, None
        with mmap.mmap(self.fd, file_bytes, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                pos = 0
                expected = self.base_offset
                while pos < file_bytes:
                    try:
                        header = check_batch(view, pos, file_bytes)
                    except CorruptBatchError as e:
                        return pos, str(e)
                    if header.base_offset != expected:
                        return pos, (
                            f"batch base offset {header.base_offset}, expected "
                            f"{expected} (offsets must be contiguous)"
                        )
                    if header.last_offset - self.base_offset > RELATIVE_OFFSET_LIMIT:
                        return pos, "relative offset past u32"
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
                return pos, None
            finally:
                view.release()

    # ------------------------------------------------------------------ appending
    def room_for(self, payload_bytes: int, last_offset: int) -> bool:
        """Whether a payload fits without rolling (size, index space, u32 offsets)."""
        if last_offset - self.base_offset > RELATIVE_OFFSET_LIMIT:
            return False
        if self.size == 0:
            return True
        # `full` inlined: entries >= capacity - 1 (one slot kept for the seal entry).
        offsets, times = self.offset_index, self.time_index
        return (
            self.size + payload_bytes <= self.config.segment_bytes
            and offsets.entries < offsets.capacity - 1
            and times.entries < times.capacity - 1
        )

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
        pack = _BASE_OFFSET.pack
        for header in headers:
            size = header[1] + LOG_OVERHEAD
            iov.append(pack(offset))
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
        # `room_for` rolls on a full index only between appends; the batches of one append
        # (or a scan under a smaller index_bytes_max) can fill it, and then the rest of the
        # segment goes unindexed: lookups walk further, and the time index keeps the slot
        # its seal needs.
        if (
            self.bytes_since_index >= self.config.index_interval_bytes
            and not self.offset_index.full
        ):
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
        out (the first batch is always returned)."""
        _rel, pos = self.offset_index.lookup(offset - self.base_offset)
        end = self.size
        chunk_at = pos
        pread = _disk.disk.pread
        chunk = pread(self.fd, min(end - pos, max_bytes + READ_AHEAD_BYTES), pos)
        # Find the batch holding `offset`.
        while True:
            head = self._prefix_in(chunk, chunk_at, pos)
            if head is None:
                chunk_at = pos
                chunk = pread(self.fd, min(end - pos, max_bytes + READ_AHEAD_BYTES), pos)
                head = self._prefix_in(chunk, chunk_at, pos)
                if head is None:
                    raise StorageError(f"{self.log_path}: short batch header at byte {pos}")
            base, length, last_delta = head[0], head[1], head[6]
            if base + last_delta >= offset:
                break
            pos += length + LOG_OVERHEAD
            if pos >= end:
                raise StorageError(f"{self.log_path}: offset {offset} not found before byte {end}")
        start = pos
        next_offset = base + last_delta + 1
        # Take whole batches while they fit.
        pos += length + LOG_OVERHEAD
        while pos < end:
            head = self._prefix_in(chunk, chunk_at, pos)
            if head is None:
                break
            size = head[1] + LOG_OVERHEAD
            if pos + size - start > max_bytes or (
                stop_offset is not None and head[0] >= stop_offset
            ):
                break
            pos += size
            next_offset = head[0] + head[6] + 1
        stop = pos
        if chunk_at <= start and stop - chunk_at <= len(chunk):
            if start == chunk_at and stop - start == len(chunk):
                return chunk, next_offset
            # A view, not a slice: a 1 MiB fetch would otherwise copy its bytes once more.
            return memoryview(chunk)[start - chunk_at : stop - chunk_at], next_offset
        return pread(self.fd, stop - start, start), next_offset

    @staticmethod
    def _prefix_in(chunk: bytes, chunk_at: int, pos: int) -> tuple[int, ...] | None:
        at = pos - chunk_at
        if at < 0 or at + _PREFIX_BYTES > len(chunk):
            return None
        return _PREFIX.unpack_from(chunk, at)

    def offset_for_timestamp(self, timestamp_ms: int) -> int | None:
        """The first offset in this segment whose record timestamp is >= `timestamp_ms`."""
        if self.max_timestamp is None or self.max_timestamp < timestamp_ms:
            return None
        rel = self.time_index.lookup(timestamp_ms)
        _rel, pos = self.offset_index.lookup(rel)
        while pos < self.size:
            head = self._prefix_at(pos)
            length, max_ts = head[1], head[8]
            if max_ts >= timestamp_ms:
                batch = _disk.disk.pread(self.fd, length + LOG_OVERHEAD, pos)
                _header, records = decode_batch(batch)
                for record in records:
                    if record.timestamp_ms >= timestamp_ms:
                        return record.offset
            pos += length + LOG_OVERHEAD
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

    def _final_time_entry(self) -> None:
        if self.max_timestamp is None:
            return
        last = self.time_index.last()
        if last is None or self.max_timestamp > last[0]:
            self.time_index.append(self.max_timestamp, self.next_offset - self.base_offset)

    def close(self, clean: bool = False) -> None:
        """Release files; `clean` first makes the segment whole on disk as `seal` does."""
        if clean and self.fd >= 0 and not self.sealed:
            self.flush()
            self._final_time_entry()
            self.offset_index.trim()
            self.time_index.trim()
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
        """Close and unlink: the .log first, so a crash midway leaves only orphan indexes."""
        self.close()
        for path in (self.log_path, self.index_path, self.timeindex_path):
            with contextlib.suppress(FileNotFoundError):
                _disk.disk.unlink(path)
