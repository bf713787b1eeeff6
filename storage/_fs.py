"""File-system helpers the whole storage engine uses to make changes durable.

Every call goes through the disk layer (`_disk.disk`), so a test can put a simulated disk
under all of them. POSIX only (Linux, macOS). Creating, renaming or removing a file changes
its *directory*, so that change survives power loss only once the directory itself has been
fsynced; these helpers always do that step. On macOS `fsync` does not flush the drive's
cache (that needs F_FULLFSYNC); we accept that.

A failed fsync raises `FsyncError` (an OSError too, with the errno): the kernel may have
dropped the pages it could not write, and a second fsync would report success without
them, so no helper here ever retries one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat

from . import _disk
from ._errors import DiskFullError, FsyncError

StrPath = str | os.PathLike[str]

# The longest file name (one path component, in bytes) Linux file systems accept
# (ext4, xfs, btrfs; NAME_MAX). A temp name longer than this is replaced by a hashed one.
NAME_BYTES_MAX = 255
TMP_SUFFIX = ".tmp"
# Bytes per read while reading a whole small file (metadata, checkpoints, snapshots).
READ_CHUNK_BYTES = 1 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _fsync_failed(exc: OSError, what: str) -> FsyncError:
    return FsyncError(exc.errno or errno.EIO, f"{exc.strerror or exc}: fsync of {what} failed")


def fsync_dir(path: StrPath) -> None:
    """Force the directory's entries (creates, renames, removals) to stable storage."""
    target = os.fspath(path)
    try:
        _disk.disk.fsync_dir(target)
    except OSError as exc:
        raise _fsync_failed(exc, f"directory {target}") from exc


def fsync_file(fd: int, path: str, data_only: bool = False) -> None:
    """fsync (or fdatasync, with `data_only`) the open file `fd`; FsyncError if it fails."""
    try:
        if data_only:
            _disk.disk.fdatasync(fd)
        else:
            _disk.disk.fsync(fd)
    except OSError as exc:
        raise _fsync_failed(exc, path) from exc


def tmp_name(name: str) -> str:
    """The temp-file name `atomic_write` uses for the file `name`: `.<name>.tmp`.

    When that would pass NAME_BYTES_MAX, a fixed-length name derived from a hash of `name`
    is used instead, still starting with "." and ending with TMP_SUFFIX.
    """
    candidate = f".{name}{TMP_SUFFIX}"
    if len(os.fsencode(candidate)) <= NAME_BYTES_MAX:
        return candidate
    digest = hashlib.blake2b(os.fsencode(name), digest_size=16).hexdigest()
    return f".{digest}{TMP_SUFFIX}"


def write_all(fd: int, data: bytes | memoryview, position: int) -> None:
    """pwrite all of `data` at `position`, continuing after short writes."""
    view = memoryview(data)
    done = 0
    while done < len(view):  # each pass writes at least one byte or raises
        done += _disk.disk.pwrite(fd, view[done:], position + done)


def atomic_write(path: StrPath, data: bytes) -> None:
    """Replace the file at `path` with `data`, crash-atomically and durably.

    The bytes go to a temp file in the same directory (`tmp_name`), which is fsynced,
    renamed onto `path` (atomic on POSIX within one file system), and then the directory
    is fsynced. After a crash at any point a reader sees either the old content or the new,
    never a mix; once this returns, the new content survives power loss. A crash can leave
    the temp file behind; its owner removes such files on open.

    No space left on the device (ENOSPC, EDQUOT) raises DiskFullError; the old content is
    unchanged and the temp file is removed. A failed fsync raises FsyncError.
    """
    disk = _disk.disk
    target = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(target)
    tmp = os.path.join(parent, tmp_name(name))
    try:
        try:
            fd = disk.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                write_all(fd, data, 0)
                fsync_file(fd, tmp)
            finally:
                disk.close(fd)
            disk.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                disk.unlink(tmp)
            raise
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise DiskFullError(
                f"{target}: no space left on device writing {len(data)} bytes; "
                "the old content is unchanged"
            ) from exc
        raise
    fsync_dir(parent)


def read_file(path: StrPath, bytes_max: int | None = None) -> bytes:
    """The whole content of the file at `path` (at most `bytes_max` + 1 bytes, so a caller
    can tell a file over its limit). FileNotFoundError if there is none."""
    disk = _disk.disk
    fd = disk.open(os.fspath(path), os.O_RDONLY)
    try:
        parts: list[bytes] = []
        position = 0
        want = None if bytes_max is None else bytes_max + 1
        while want is None or position < want:  # each pass reads >= 1 byte or stops
            step = READ_CHUNK_BYTES if want is None else min(READ_CHUNK_BYTES, want - position)
            chunk = disk.pread(fd, step, position)
            if not chunk:
                break
            parts.append(chunk)
            position += len(chunk)
        return b"".join(parts)
    finally:
        disk.close(fd)


def make_dirs(path: StrPath) -> bool:
    """Create the directory `path` and any missing parents, fsyncing the parent of each new
    one (a new directory whose entry is not durable vanishes with everything in it at a
    power loss). Returns whether anything was created."""
    target = os.path.abspath(os.fspath(path))
    missing: list[str] = []
    ancestor = target
    while not os.path.isdir(ancestor):  # bounded by the path's depth: "/" is a directory
        missing.append(ancestor)
        ancestor = os.path.dirname(ancestor)
    for directory in reversed(missing):
        _disk.disk.mkdir(directory)
        fsync_dir(os.path.dirname(directory))
    return bool(missing)


def remove_tree_no_fsync(path: StrPath) -> None:
    """Delete the directory tree at `path` (files first, then each emptied directory);
    the caller fsyncs the parent, once after removing several trees."""
    disk = _disk.disk
    top = os.fspath(path)
    stack = [(top, False)]
    while stack:  # bounded: each directory is pushed once unexpanded and once expanded
        directory, expanded = stack.pop()
        if expanded:
            disk.rmdir(directory)
            continue
        stack.append((directory, True))
        for name in disk.listdir(directory):
            child = os.path.join(directory, name)
            if stat.S_ISDIR(os.lstat(child).st_mode):
                stack.append((child, False))
            else:
                disk.unlink(child)


def remove_tree(path: StrPath) -> None:
    """Delete the directory tree at `path`, then fsync its parent so the removal is durable.

    Not atomic: a crash part-way leaves some of the tree. Callers make the tree unreachable
    first (for a topic: remove its metadata file) so that a partial tree is recognised as
    garbage and removed again on the next open.
    """
    target = os.path.abspath(os.fspath(path))
    remove_tree_no_fsync(target)
    fsync_dir(os.path.dirname(target))
