"""Sparse offset and time indexes of one segment, as numpy memmaps.

Both are derived data: the .log is the truth, and an index that is missing or fails its
sanity check is rebuilt from the log (see `Segment`). Both files are preallocated to
`index_bytes_max` while their segment is active, and trimmed to their entries when it seals
or the log closes cleanly, so a trimmed file's size tells its entry count.

    .index      8-byte entries, big-endian       .timeindex   12-byte entries, big-endian
      0  u32  relative offset                      0  i64  timestamp (ms)
      4  u32  file position in the .log            8  u32  relative offset

Relative offset = offset - segment base offset. An offset-index entry (r, p) says the batch
with base offset base+r starts at byte p. Entries are added every `index_interval_bytes`
of appended batches, so a lookup lands at most that many bytes (plus one batch) before the
batch it wants.

A time-index entry (t, r) says every record before offset base+r has a timestamp <= t; t is
the largest timestamp seen before that batch, and an entry is added only when t grows, so
both columns strictly increase. The batch at base+r is always also in the offset index. The
last entry of a sealed segment is (largest timestamp in the segment, next offset - base):
the segment's max timestamp is known without reading the log.

Files are created, sized, trimmed and fsynced through the disk layer (`_disk.py`); the
entries themselves are stores into the memmap, which no system call sees. That is why an
index is never trusted past a crash unless it was fsynced whole (trimmed, when its segment
sealed or the log closed cleanly) -- see `_disk.py` on how a simulated disk models it.

numpy cannot binary-search a big-endian column without converting all of it (measured here:
~120 us for 262k entries, against 0.4 us on native integers). So each index keeps its key
column also as a native array -- filled as entries are appended, or loaded once from the
file on the first lookup of a sealed segment -- and `searchsorted` runs on that.

An index in bounds and in order can still be wrong (one flipped bit in a middle entry), so
a segment's final indexes are vouched for by a checksum sidecar, `<stem>.indexsum`, written
when they become final (seal, clean close) and checked before the segment is opened without
a scan; one that is missing or does not match means "rebuild from the log". 44 bytes,
big-endian:

      0  4s   magic b"RLIX"
      4  u16  format version (1)
      6  u16  reserved, 0
      8  i64  log bytes: the .log's size when the indexes were made final
     16  i64  next offset: the offset after the segment's last batch
     24  u32  .index bytes         28  u32  CRC32C of them
     32  u32  .timeindex bytes     36  u32  CRC32C of them
     40  u32  CRC32C of bytes [0, 40): a torn or damaged sidecar is told from a stale one

The log size and next offset let a segment known to be on disk notice that its .log lost
(or gained) whole batches, which no batch check can see. The sidecar is written in place
(no rename): a torn one fails its own CRC and only costs a rebuild.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt

from . import _disk
from ._batch import crc32c
from ._config import RELATIVE_OFFSET_LIMIT
from ._errors import FsyncError
from ._fs import fsync_file, read_file, write_all

OFFSET_ENTRY = np.dtype([("relative_offset", ">u4"), ("position", ">u4")])
TIME_ENTRY = np.dtype([("timestamp", ">i8"), ("relative_offset", ">u4")])
assert OFFSET_ENTRY.itemsize == struct.calcsize(">II") == 8
assert TIME_ENTRY.itemsize == struct.calcsize(">qI") == 12

# The .indexsum sidecar (layout in the module docstring): the body, then its own CRC32C.
INDEXSUM_MAGIC = b"RLIX"
INDEXSUM_VERSION = 1
_INDEXSUM_BODY = struct.Struct(">4sHHqqIIII")
_INDEXSUM_CRC = struct.Struct(">I")
INDEXSUM_BYTES = _INDEXSUM_BODY.size + _INDEXSUM_CRC.size
assert _INDEXSUM_BODY.size == 40
assert INDEXSUM_BYTES == 44
# Index byte counts are stored as u32: index_bytes_max is at most 1 GiB (LogConfig).
INDEX_BYTES_LIMIT = 2**32 - 1
# madvise advice for a writable index's map (None where the platform has no madvise).
_MADV_RANDOM: int | None = getattr(mmap, "MADV_RANDOM", None)


@dataclass(frozen=True, slots=True)
class IndexSum:
    """What a segment's `.indexsum` sidecar vouches for (see the module docstring)."""

    log_bytes: int
    next_offset: int
    index_bytes: int
    index_crc: int
    timeindex_bytes: int
    timeindex_crc: int

    def encode(self) -> bytes:
        body = _INDEXSUM_BODY.pack(
            INDEXSUM_MAGIC,
            INDEXSUM_VERSION,
            0,
            self.log_bytes,
            self.next_offset,
            self.index_bytes,
            self.index_crc,
            self.timeindex_bytes,
            self.timeindex_crc,
        )
        return body + _INDEXSUM_CRC.pack(crc32c(body))

    @classmethod
    def decode(cls, data: bytes) -> IndexSum:
        """The sidecar in `data`; ValueError saying why it is not one we wrote whole."""
        if len(data) != INDEXSUM_BYTES:
            raise ValueError(f"{len(data)} bytes, a sidecar has {INDEXSUM_BYTES}")
        body = data[: _INDEXSUM_BODY.size]
        (stored,) = _INDEXSUM_CRC.unpack_from(data, _INDEXSUM_BODY.size)
        if crc32c(body) != stored:
            raise ValueError(
                f"CRC32C mismatch: stored {stored:#010x}, bytes give {crc32c(body):#010x}"
            )
        magic, version, _reserved, *fields = _INDEXSUM_BODY.unpack(body)
        if magic != INDEXSUM_MAGIC:
            raise ValueError(f"magic {magic!r}, expected {INDEXSUM_MAGIC!r}")
        if version != INDEXSUM_VERSION:
            raise ValueError(f"format version {version}, this build reads {INDEXSUM_VERSION}")
        return cls(*fields)


def write_indexsum(path: str, summary: IndexSum) -> None:
    """Write (in place) and fsync the sidecar at `path`; the caller fsyncs the directory
    before anything relies on the file's name (see `Segment.seal`). FsyncError if the fsync
    fails; other OSErrors (ENOSPC) as they come."""
    disk = _disk.disk
    fd = disk.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        write_all(fd, summary.encode(), 0)
        fsync_file(fd, path)
    finally:
        disk.close(fd)


def read_indexsum(path: str) -> IndexSum:
    """The sidecar at `path`: FileNotFoundError if there is none, ValueError if damaged."""
    return IndexSum.decode(read_file(path, INDEXSUM_BYTES))


class _Index:
    """Shared machinery: a file of fixed-size entries, a memmap while writable."""

    dtype: np.dtype[Any]
    _entry: struct.Struct
    key_field: str
    key_native: type[np.integer[Any]]

    def __init__(self, path: str, entries: int, capacity: int, writable: bool) -> None:
        self.path = path
        self.entries = entries
        self.capacity = capacity
        self.writable = writable
        self._mm: np.memmap[Any, np.dtype[Any]] | None = None
        self._keys: npt.NDArray[Any] | None = None
        self._map()

    @classmethod
    def open(cls, path: str, bytes_max: int, writable: bool) -> Self:
        """Open a trimmed (or new, empty) index file; a writable one is grown to `bytes_max`.

        A missing file (FileNotFoundError) or a partial last entry (ValueError) is damage:
        the caller rebuilds the index from the log.
        """
        size = os.path.getsize(path)
        item = cls.dtype.itemsize
        if size % item:
            raise ValueError(f"{path}: {size} bytes is not a whole number of {item}-byte entries")
        entries = size // item
        capacity = max(entries, bytes_max // item) if writable else entries
        return cls(path, entries, capacity, writable)

    @classmethod
    def create(cls, path: str, bytes_max: int) -> Self:
        """A new empty writable index (any old file at `path` is replaced)."""
        disk = _disk.disk
        disk.close(disk.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
        return cls(path, 0, bytes_max // cls.dtype.itemsize, True)

    def _map(self) -> None:
        item = self.dtype.itemsize
        want = self.capacity * item
        if self.writable:
            disk = _disk.disk
            fd = disk.open(self.path, os.O_RDWR | os.O_CREAT)
            try:
                if disk.size(fd) != want:
                    disk.ftruncate(fd, want)
                # Reserve the blocks now: a store into a memmap page the disk has no room
                # for is SIGBUS, not an exception; here it is ENOSPC, when the segment opens.
                if want:
                    disk.fallocate(fd, 0, want)
            finally:
                disk.close(fd)
        if self.capacity > 0:
            mode: Literal["r+", "r"] = "r+" if self.writable else "r"
            self._mm = np.memmap(self.path, dtype=self.dtype, mode=mode, shape=(self.capacity,))
        if self.writable:
            keys = np.empty(self.capacity, dtype=self.key_native)
            if self._mm is not None and self.entries:
                keys[: self.entries] = self._mm[self.key_field][: self.entries]
            self._keys = keys
            if self._mm is not None and _MADV_RANDOM is not None:
                # Appends store one entry at a time, so no read-around: without this advice
                # the first store into a new segment's index read around it, in the first
                # append (measured here: 1.3-30 ms for a fresh 10 MiB index, ~10 us with it).
                self._mm._mmap.madvise(_MADV_RANDOM)  # type: ignore[attr-defined]

    @property
    def full(self) -> bool:
        # One slot stays free for the entry a time index writes when its segment seals.
        return self.entries >= self.capacity - 1

    def _key_column(self) -> npt.NDArray[Any]:
        if self._keys is None:
            if self._mm is None:  # a read-only index with no entries maps nothing
                self._keys = np.empty(0, dtype=self.key_native)
            else:
                keys = self._mm[self.key_field][: self.entries]
                self._keys = np.array(keys, dtype=self.key_native)
        return self._keys[: self.entries]

    def digest(self) -> tuple[int, int]:
        """(bytes, CRC32C) of the valid entries: what the trimmed file holds."""
        if self._mm is None or self.entries == 0:
            return 0, crc32c(b"")
        entries = np.ascontiguousarray(self._mm[: self.entries]).view(np.uint8)
        size = self.entries * self.dtype.itemsize
        assert size <= INDEX_BYTES_LIMIT
        with entries.data as view:  # released at once: the map is closed on trim and close
            return size, crc32c(view)

    def column(self, name: str) -> npt.NDArray[Any]:
        """A native copy of one column's valid entries (for checks and tests)."""
        if self._mm is None or self.entries == 0:
            return np.empty(0, dtype=self.dtype[name].newbyteorder("="))
        return np.array(self._mm[name][: self.entries], dtype=self.dtype[name].newbyteorder("="))

    def _put(self, key: int, value: int) -> None:
        # struct into the memmap's own buffer: a numpy structured-element store costs ~1.7 us,
        # this ~0.3 us, and it runs for most appended batches.
        entries = self.entries
        assert self.writable
        assert self._mm is not None
        assert self._keys is not None
        assert entries < self.capacity, f"{self.path}: index full"
        entry = self._entry
        entry.pack_into(self._mm._mmap, entries * entry.size, key, value)  # type: ignore[attr-defined]
        self._keys[entries] = key
        self.entries = entries + 1

    def trim(self) -> None:
        """Cut the file to its entries, flush it to disk and make the index read-only."""
        if self._mm is not None:
            try:
                self._mm.flush()  # msync: a write-back error here is an fsync failure
            except OSError as e:
                raise FsyncError(e.errno or errno.EIO, f"msync of {self.path} failed: {e}") from e
        self._release()
        disk = _disk.disk
        fd = disk.open(self.path, os.O_RDWR)
        try:
            disk.ftruncate(fd, self.entries * self.dtype.itemsize)
            fsync_file(fd, self.path)
        finally:
            disk.close(fd)
        keys = self._keys
        self.capacity = self.entries
        self.writable = False
        self._map()
        if keys is not None:
            self._keys = keys[: self.entries].copy()

    def _release(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            mm._mmap.close()  # type: ignore[attr-defined]  # deterministic unmap before truncate

    def close(self) -> None:
        self._release()
        self._keys = None


_OFFSET_ENTRY = struct.Struct(">II")
assert _OFFSET_ENTRY.size == 8


class OffsetIndex(_Index):
    dtype = OFFSET_ENTRY
    _entry = _OFFSET_ENTRY
    key_field = "relative_offset"
    key_native = np.uint32

    def append(self, relative_offset: int, position: int) -> None:
        assert 0 <= relative_offset <= RELATIVE_OFFSET_LIMIT
        assert 0 <= position < 2**32
        self._put(relative_offset, position)

    def lookup(self, relative_offset: int) -> tuple[int, int]:
        """The last entry at or before `relative_offset`, or (0, 0) (the segment's start)."""
        rel, pos, _next = self.span(relative_offset)
        return rel, pos

    def span(self, relative_offset: int) -> tuple[int, int, int | None]:
        """`lookup`, and the position of the entry after it (None if it is the last): the
        batch holding `relative_offset` ends at or before that position.

        Entries are read with struct from the map's buffer: a numpy element of a memmap
        costs ~1.5 us (memmap.__getitem__ is Python), this ~0.2; it runs once per read."""
        keys = self._key_column()
        i = int(keys.searchsorted(np.uint32(relative_offset), side="right")) - 1
        if i < 0:
            if self._mm is None or self.entries == 0:  # unmapped: a trim that failed half-way
                return 0, 0, None
            return 0, 0, _OFFSET_ENTRY.unpack_from(self._mm._mmap, 0)[1]  # type: ignore[attr-defined]
        assert self._mm is not None
        buffer = self._mm._mmap  # type: ignore[attr-defined]
        rel, pos = _OFFSET_ENTRY.unpack_from(buffer, i * 8)
        if i + 1 < self.entries:
            return rel, pos, _OFFSET_ENTRY.unpack_from(buffer, i * 8 + 8)[1]
        return rel, pos, None

    def last(self) -> tuple[int, int]:
        if self.entries == 0:
            return 0, 0
        assert self._mm is not None
        entry = self._mm[self.entries - 1]
        return int(entry["relative_offset"]), int(entry["position"])

    def check(self, log_bytes: int, relative_offset_end: int | None) -> str | None:
        """Why this index cannot be trusted for a log of `log_bytes`, or None if it can."""
        if self.entries == 0:
            return None
        rel = self.column("relative_offset").astype(np.int64)
        pos = self.column("position").astype(np.int64)
        if np.any(np.diff(rel) <= 0) or np.any(np.diff(pos) <= 0):
            return "entries are not strictly increasing"
        if int(pos[-1]) >= log_bytes:
            return f"last entry points at byte {int(pos[-1])}, the log has {log_bytes} bytes"
        if relative_offset_end is not None and int(rel[-1]) >= relative_offset_end:
            return f"last entry names relative offset {int(rel[-1])}, past the segment"
        return None


class TimeIndex(_Index):
    dtype = TIME_ENTRY
    _entry = struct.Struct(">qI")

    def __init__(self, path: str, entries: int, capacity: int, writable: bool) -> None:
        super().__init__(path, entries, capacity, writable)
        # The newest entry's timestamp (None while empty): read per appended batch.
        last = self.last()
        self.last_timestamp: int | None = None if last is None else last[0]

    key_field = "timestamp"
    key_native = np.int64

    def append(self, timestamp_ms: int, relative_offset: int) -> None:
        assert 0 <= relative_offset <= RELATIVE_OFFSET_LIMIT
        self._put(timestamp_ms, relative_offset)
        self.last_timestamp = timestamp_ms

    def lookup(self, timestamp_ms: int) -> int:
        """A relative offset before which every record is older than `timestamp_ms` (or 0)."""
        keys = self._key_column()
        i = int(keys.searchsorted(np.int64(timestamp_ms), side="left")) - 1
        if i < 0:
            return 0
        assert self._mm is not None
        return int(self._mm[i]["relative_offset"])

    def last(self) -> tuple[int, int] | None:
        if self.entries == 0:
            return None
        assert self._mm is not None
        entry = self._mm[self.entries - 1]
        return int(entry["timestamp"]), int(entry["relative_offset"])

    def check(self, relative_offset_end: int | None) -> str | None:
        if self.entries == 0:
            return None
        ts = self.column("timestamp")
        rel = self.column("relative_offset").astype(np.int64)
        if np.any(np.diff(ts) <= 0) or np.any(np.diff(rel) <= 0):
            return "entries are not strictly increasing"
        if relative_offset_end is not None and int(rel[-1]) > relative_offset_end:
            return f"last entry names relative offset {int(rel[-1])}, past the segment"
        return None
