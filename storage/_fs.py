"""File-system helpers the whole storage engine uses to make changes durable.

POSIX only (Linux, macOS): a directory is fsynced by opening it read-only. Creating,
renaming or removing a file changes its *directory*, so that change survives power loss
only once the directory itself has been fsynced; these helpers always do that step.
On macOS `fsync` does not flush the drive's cache (that needs F_FULLFSYNC); we accept that.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil

from ._errors import DiskFullError

StrPath = str | os.PathLike[str]

# The longest file name (one path component, in bytes) Linux file systems accept
# (ext4, xfs, btrfs; NAME_MAX). A temp name longer than this is replaced by a hashed one.
NAME_BYTES_MAX = 255
TMP_SUFFIX = ".tmp"


def fsync_dir(path: StrPath) -> None:
    """Force the directory's entries (creates, renames, removals) to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def atomic_write(path: StrPath, data: bytes) -> None:
    """Replace the file at `path` with `data`, crash-atomically and durably.

    The bytes go to a temp file in the same directory (`tmp_name`), which is flushed and
    fsynced, renamed onto `path` with `os.replace` (atomic on POSIX within one file system),
    and then the directory is fsynced. After a crash at any point a reader sees either the
    old content or the new, never a mix; once this returns, the new content survives power
    loss. A crash can leave the temp file behind; its owner removes such files on open.

    No space left on the device (ENOSPC, EDQUOT) raises DiskFullError; the old content is
    unchanged and the temp file is removed.
    """
    target = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(target)
    tmp = os.path.join(parent, tmp_name(name))
    try:
        try:
            with open(tmp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"{target}: no space left on device writing {len(data)} bytes; "
                "the old content is unchanged"
            ) from exc
        raise
    fsync_dir(parent)


def remove_tree(path: StrPath) -> None:
    """Delete the directory tree at `path`, then fsync its parent so the removal is durable.

    Not atomic: a crash part-way leaves some of the tree. Callers make the tree unreachable
    first (for a topic: remove its metadata file) so that a partial tree is recognised as
    garbage and removed again on the next open.
    """
    target = os.path.abspath(os.fspath(path))
    shutil.rmtree(target)
    fsync_dir(os.path.dirname(target))
