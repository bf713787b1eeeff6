"""The disk: every file-system call the storage engine makes goes through one object here.

    from . import _disk
    fd = _disk.disk.open(path, os.O_RDWR | os.O_CREAT)
    _disk.disk.pwritev(fd, buffers, position)

`disk` is a module-level `Disk`; `install` swaps it (tests put a simulated disk there that
forgets what was not fsynced when it "loses power": tests/reliability/simdisk.py). The
production `Disk` is one method per system call, each a single `os` call looked up when it
runs (so a test's `monkeypatch.setattr(os, "fsync", ...)` still reaches it). On the append
path that is one extra Python call in front of `os.pwritev` (~0.1 us against the ~25 us a
64 KiB write takes here), and nothing else.

What goes through it: opening and closing files; every write (pwrite, pwritev, write);
ftruncate and fallocate; fsync and fdatasync of files and of directories; creating, renaming
and removing directory entries (mkdir, rmdir, unlink, replace); and the reads that open
needs (pread, listdir, a file's size). `replace` is POSIX rename(2): atomic, and it
overwrites the target; riverlog never renames across directories.

What does not, and why it is still honest:

- The sparse indexes (`_index.py`) are numpy memmaps: their entries are stores into
  shared memory, which no system call sees. The index files themselves are created,
  sized, preallocated, trimmed and fsynced through this layer, so a simulated disk knows
  their durable content as of each fsync (a file's whole content at that moment, memmap
  stores included: fsync writes back every dirty page of the file). At a simulated power
  loss the memmap stores since then are kept or lost page by page, at random, which is
  what a kernel writing back dirty pages in any order does. Indexes are derived data:
  the log rebuilds any index that is missing or inconsistent on open, so this is enough.
- Whole-file reads through mmap (the recovery scan, the producer-state replay) and stat
  calls (exists, is_dir) read the live files directly: a simulated disk keeps the live
  state in real files and rewrites them to the durable state only when it crashes.

Errors are the `OSError`s of the calls. What a failed fsync means is decided above this
layer (`_fs.py` turns it into `FsyncError`, and a partition log then goes offline).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

# What the write calls take (os accepts any buffer; these are the ones we pass).
Buffer = bytes | bytearray | memoryview
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY


class Disk:
    """The real disk: each method is the one `os` call of the same name."""

    # ------------------------------------------------------------------ names
    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def replace(self, source: str, target: str) -> None:
        os.replace(source, target)

    def fsync_dir(self, path: str) -> None:
        """Make the directory's entries (creates, renames, removals) durable."""
        fd = os.open(path, DIR_FLAGS)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ content
    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def pwritev(self, fd: int, buffers: Sequence[Buffer], offset: int) -> int:
        return os.pwritev(fd, buffers, offset)

    def write(self, fd: int, data: Buffer) -> int:
        return os.write(fd, data)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        os.posix_fallocate(fd, offset, length)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)


disk: Disk = Disk()


def install(new: Disk) -> Disk:
    """Make `new` the disk of the storage engine; return the one it replaces.

    For tests: files opened before the swap keep working (a descriptor is a descriptor),
    but a simulated disk knows only what happened through it.
    """
    global disk  # the one swappable object, by design (see above)
    old, disk = disk, new
    return old
