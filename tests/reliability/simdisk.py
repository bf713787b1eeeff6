"""A simulated disk that loses power: what was not fsynced may be gone, or half there.

`SimDisk` is a `storage._disk.Disk` (install it with `storage._disk.install`, or the
`sim_disk` helper below). The live state -- what the running process reads -- is kept in
real files under `root`, so every read, mmap and stat of the storage engine works as usual.
Beside it the simulation keeps what is *durable*:

- per file: its content as of its last successful fsync (or fdatasync; both are treated as
  fsync), and the writes since then, in order (pwrite/pwritev/write as (position, bytes);
  ftruncate, and fallocate past the end, as a new size);
- per directory: its entries as of its last directory fsync, and the entry changes since
  then, in order (create, mkdir, unlink, rmdir, rename).

`crash(rng)` is the power loss. Each directory keeps a random prefix of its pending entry
changes (journalled metadata commits in order; directories independently of each other).
Each surviving file keeps its durable content plus either a random prefix of its pending
writes, the last one torn (a random prefix of its bytes), or (one time in four) a random
subset of them, in any order, as a kernel writing back dirty pages out of order would. Index
files are written through a numpy memmap, which no call of the layer sees: where the live
file differs from what the tracked writes give, each 4 KiB page is kept or lost at random
(see storage/_disk.py). `keep="none"` drops everything pending, `keep="all"` keeps it all
(a process crash: the page cache survives). Then the real files are rewritten to that
state, every descriptor is closed, and the simulation starts again from it, all durable.

A failed fsync can be injected (`fail_fsync`): it raises EIO, and from then on that file's
(or directory's) durable state never advances -- a later fsync reports success and
persists nothing, which is what the kernel's one-shot error reporting allows after dropped
pages. Code that retries an fsync after EIO and trusts it loses data here.

Steps: every call that changes the live or the durable state (a creating or truncating
open, writes, ftruncate, fallocate, fsync, fdatasync, fsync_dir, mkdir, rmdir, unlink,
replace) is one step, numbered from 1. With `crash_after = k` the k-th step is carried out
(or, with `crash_on`, the first step that predicate picks by name and path) and then
SimulatedCrash (a BaseException, so no `except Exception` swallows it) is raised;
every later call raises it too, until `crash` has rewritten the disk. Reads (pread, the
size of a file, listdir, a plain open, close) are not steps.

Before a crash the simulation checks that the real tree under `root` has exactly the names
it tracked: a storage call that bypassed the layer fails the test there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from storage import _disk

PAGE_BYTES = 4096
Keep = Literal["random", "none", "all"]
# A pending file write: ("w", position, bytes) or ("t", new size, b"").
_FileOp = tuple[str, int, bytes]
# A directory tree as a crash leaves it: file name -> content, directory name -> subtree.
_Tree = dict[str, "bytes | _Tree"]


class SimulatedCrash(BaseException):  # not an Exception: nothing may catch the power loss
    """The simulated power loss: raised by the step it follows and every call after it."""


@dataclass(eq=False)
class _File:
    durable: bytes
    path: str | None  # its live path; None once unlinked or replaced away
    pending: list[_FileOp] = field(default_factory=list)
    detached: bytes | None = None  # live content when it lost its last name
    poisoned: bool = False  # an fsync failed: the durable content never advances again


@dataclass(eq=False)
class _Dir:
    durable: dict[str, _File | _Dir]
    live: dict[str, _File | _Dir]
    pending: list[tuple[str, str, str, _File | _Dir | None]] = field(default_factory=list)
    poisoned: bool = False


@dataclass
class CrashReport:
    """What one crash did, for a failing test's message."""

    dir_ops_dropped: int = 0
    file_ops_dropped: int = 0
    torn_writes: int = 0
    pages_lost: int = 0

    def __str__(self) -> str:
        return (
            f"dropped {self.dir_ops_dropped} directory changes and {self.file_ops_dropped} "
            f"writes, tore {self.torn_writes}, lost {self.pages_lost} memmap pages"
        )


def _apply(content: bytes, ops: Sequence[_FileOp]) -> bytes:
    buf = bytearray(content)
    for kind, at, data in ops:
        if kind == "t":
            if at < len(buf):
                del buf[at:]
            else:
                buf.extend(bytes(at - len(buf)))
        else:
            if at > len(buf):
                buf.extend(bytes(at - len(buf)))
            buf[at : at + len(data)] = data
    return bytes(buf)


def _apply_dir(
    entries: dict[str, _File | _Dir], ops: Sequence[tuple[str, str, str, _File | _Dir | None]]
) -> dict[str, _File | _Dir]:
    out = dict(entries)
    for kind, name, other, node in ops:
        if kind == "add":
            assert node is not None
            out[name] = node
        elif kind == "del":
            out.pop(name, None)
        else:  # "move" name -> other
            moved = out.pop(name, None)
            if moved is not None:
                out[other] = moved
    return out


def _read_path(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class SimDisk(_disk.Disk):
    """The simulated disk of the tree under `root` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self._lock = threading.RLock()
        self._fds: dict[int, _File] = {}
        self._top = self._load(self.root)
        self.steps = 0
        self.crash_after: int | None = None
        # Called with each step's name and path after it is carried out: True loses power.
        self.crash_on: Callable[[str, str], bool] | None = None
        self.dead = False
        # Called with a path before each fsync, fdatasync or fsync_dir: True injects EIO.
        self.fail_fsync: Callable[[str], bool] | None = None
        self.fsync_failures: list[str] = []
        # Step names ("pwritev 00000000000000000000.log"), when `tracing`.
        self.tracing = False
        self.trace: list[str] = []

    # ------------------------------------------------------------------ model
    def _load(self, path: str) -> _Dir:
        """The model of the real tree at `path`, all of it durable."""
        entries: dict[str, _File | _Dir] = {}
        for name in sorted(os.listdir(path)):
            child = os.path.join(path, name)
            mode = os.lstat(child).st_mode
            if stat.S_ISDIR(mode):
                entries[name] = self._load(child)
            elif stat.S_ISREG(mode):
                entries[name] = _File(_read_path(child), child)
        return _Dir(dict(entries), entries)

    def _dir_of(self, path: str) -> tuple[_Dir, str] | None:
        """The model directory holding `path` and its last name; None outside `root`."""
        full = os.path.abspath(path)
        if full == self.root or not full.startswith(self.root + os.sep):
            return None
        parent, name = os.path.split(full)
        node: _File | _Dir = self._top
        for part in os.path.relpath(parent, self.root).split(os.sep):
            if part == ".":
                continue
            assert isinstance(node, _Dir), f"{parent}: not a directory in the model"
            child = node.live.get(part)
            assert child is not None, f"{parent}: unknown to the simulated disk"
            node = child
        assert isinstance(node, _Dir), f"{parent}: not a directory in the model"
        return node, name

    def _dir(self, path: str) -> _Dir | None:
        full = os.path.abspath(path)
        if full == self.root:
            return self._top
        found = self._dir_of(full)
        if found is None:
            return None
        node = found[0].live.get(found[1])
        assert isinstance(node, _Dir), f"{full}: not a directory in the model"
        return node

    def _step(self, what: str, path: str = "") -> None:
        """Count one step (after it was carried out); crash if it is the chosen one."""
        self.steps += 1
        if self.tracing:
            self.trace.append(f"{what} {os.path.relpath(path, self.root) if path else ''}")
        if (self.crash_after is not None and self.steps >= self.crash_after) or (
            self.crash_on is not None and self.crash_on(what, path)
        ):
            self.dead = True
            raise SimulatedCrash(f"power lost after step {self.steps} ({what} {path})")

    def _alive(self) -> None:
        if self.dead:
            raise SimulatedCrash("the power is out")

    def _content(self, node: _File) -> bytes:
        """The live content of a file (its real file, or what it held when unlinked)."""
        if node.path is not None:
            return _read_path(node.path)
        if node.detached is not None:
            return node.detached
        return _apply(node.durable, node.pending)

    def _detach(self, node: _File | _Dir | None) -> None:
        if isinstance(node, _File) and node.path is not None:
            node.detached = _read_path(node.path)
            node.path = None

    # ------------------------------------------------------------------ names
    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        with self._lock:
            self._alive()
            found = self._dir_of(path)
            if found is None:
                return os.open(path, flags, mode)
            directory, name = found
            existing = directory.live.get(name)
            fd = os.open(path, flags, mode)
            if existing is None:
                assert flags & os.O_CREAT
                node = _File(b"", os.path.abspath(path))
                directory.live[name] = node
                directory.pending.append(("add", name, "", node))
                self._fds[fd] = node
                self._step("create", path)
                return fd
            assert isinstance(existing, _File), f"{path}: a directory"
            self._fds[fd] = existing
            if flags & os.O_TRUNC:
                existing.pending.append(("t", 0, b""))
                self._step("truncate", path)
            return fd

    def close(self, fd: int) -> None:
        with self._lock:
            self._alive()
            self._fds.pop(fd, None)
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        with self._lock:
            self._alive()
            return os.listdir(path)

    def mkdir(self, path: str) -> None:
        with self._lock:
            self._alive()
            os.mkdir(path)
            found = self._dir_of(path)
            if found is None:
                return
            directory, name = found
            node = _Dir({}, {})
            directory.live[name] = node
            directory.pending.append(("add", name, "", node))
            self._step("mkdir", path)

    def rmdir(self, path: str) -> None:
        with self._lock:
            self._alive()
            os.rmdir(path)
            found = self._dir_of(path)
            if found is None:
                return
            directory, name = found
            directory.live.pop(name)
            directory.pending.append(("del", name, "", None))
            self._step("rmdir", path)

    def unlink(self, path: str) -> None:
        with self._lock:
            self._alive()
            found = self._dir_of(path)
            if found is None:
                os.unlink(path)
                return
            directory, name = found
            node = directory.live.get(name)
            if node is not None:
                self._detach(node)
            os.unlink(path)  # FileNotFoundError leaves the model as it was
            directory.live.pop(name)
            directory.pending.append(("del", name, "", None))
            self._step("unlink", path)

    def replace(self, source: str, target: str) -> None:
        with self._lock:
            self._alive()
            found, found_target = self._dir_of(source), self._dir_of(target)
            if found is None:
                os.replace(source, target)
                return
            directory, name = found
            assert found_target is not None
            assert found_target[0] is directory, "the simulated disk renames within one dir"

            new_name = found_target[1]
            node = directory.live[name]
            overwritten = directory.live.get(new_name)
            self._detach(overwritten)
            os.replace(source, target)
            del directory.live[name]
            directory.live[new_name] = node
            if isinstance(node, _File):
                node.path = os.path.abspath(target)
            directory.pending.append(("move", name, new_name, None))
            self._step("rename", target)

    def fsync_dir(self, path: str) -> None:
        with self._lock:
            self._alive()
            directory = self._dir(path)
            if directory is None:
                super().fsync_dir(path)
                return
            if self.fail_fsync is not None and self.fail_fsync(os.path.abspath(path)):
                directory.poisoned = True
                self.fsync_failures.append(path)
                self._step("fsync_dir EIO", path)
                raise OSError(errno.EIO, os.strerror(errno.EIO), path)
            if not directory.poisoned:
                directory.durable = dict(directory.live)
                directory.pending.clear()
            self._step("fsync_dir", path)

    # ------------------------------------------------------------------ content
    def size(self, fd: int) -> int:
        with self._lock:
            self._alive()
            return os.fstat(fd).st_size

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        with self._lock:
            self._alive()
            return os.pread(fd, size, offset)

    def _written(self, fd: int, position: int, data: bytes, what: str) -> None:
        node = self._fds.get(fd)
        if node is None:
            return
        node.pending.append(("w", position, data))
        self._step(what, node.path or "")

    def pwrite(self, fd: int, data: _disk.Buffer, offset: int) -> int:
        with self._lock:
            self._alive()
            written = os.pwrite(fd, data, offset)
            self._written(fd, offset, bytes(data[:written]), "pwrite")
            return written

    def pwritev(self, fd: int, buffers: Sequence[_disk.Buffer], offset: int) -> int:
        with self._lock:
            self._alive()
            written = os.pwritev(fd, buffers, offset)
            data = b"".join(bytes(b) for b in buffers)[:written]
            self._written(fd, offset, data, "pwritev")
            return written

    def write(self, fd: int, data: _disk.Buffer) -> int:
        with self._lock:
            self._alive()
            position = os.lseek(fd, 0, os.SEEK_CUR)
            written = os.write(fd, data)
            self._written(fd, position, bytes(data[:written]), "write")
            return written

    def ftruncate(self, fd: int, length: int) -> None:
        with self._lock:
            self._alive()
            os.ftruncate(fd, length)
            node = self._fds.get(fd)
            if node is not None:
                node.pending.append(("t", length, b""))
                self._step("ftruncate", node.path or "")

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        with self._lock:
            self._alive()
            before = os.fstat(fd).st_size
            os.posix_fallocate(fd, offset, length)
            node = self._fds.get(fd)
            if node is not None:
                if offset + length > before:
                    node.pending.append(("t", offset + length, b""))
                self._step("fallocate", node.path or "")

    def fsync(self, fd: int) -> None:
        self._sync(fd, "fsync")

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, "fdatasync")

    def _sync(self, fd: int, what: str) -> None:
        with self._lock:
            self._alive()
            node = self._fds.get(fd)
            if node is None:
                os.fsync(fd)
                return
            path = node.path or ""
            if self.fail_fsync is not None and self.fail_fsync(path):
                node.poisoned = True
                self.fsync_failures.append(path)
                self._step(f"{what} EIO", path)
                raise OSError(errno.EIO, os.strerror(errno.EIO), path)
            if not node.poisoned:
                node.durable = self._content(node)
                node.pending.clear()
            self._step(what, path)

    # ------------------------------------------------------------------ the power loss
    def power_cycle(self, rng: random.Random, keep: Keep = "random") -> CrashReport:
        """`crash`, wait for the dead process's storage threads to stop, `restart`."""
        report = self.crash(rng, keep)
        wait_for_storage_threads()
        self.restart()
        return report

    def restart(self) -> None:
        """Power back on: calls work again, on the disk as the crash left it."""
        with self._lock:
            self.dead = False

    def crash(self, rng: random.Random, keep: Keep = "random") -> CrashReport:
        """Lose power now (if no step did already): rebuild the real tree under `root` as
        the disk holds it after the loss, close every descriptor, and stay dead.

        Threads still running storage code of the dead process get SimulatedCrash from
        their next call; wait for them to stop (`wait_for_storage_threads`) before `restart`,
        so none of them touches the new state with a descriptor number reused since.
        """
        with self._lock:
            self.dead = True
            self._check_tracked(self.root, self._top)
            report = CrashReport()
            tree = self._survivor(self._top, rng, keep, report)
            for fd in list(self._fds):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()
            for name in os.listdir(self.root):
                child = os.path.join(self.root, name)
                if os.path.isdir(child) and not os.path.islink(child):
                    shutil.rmtree(child)
                else:
                    os.unlink(child)
            self._write_tree(self.root, tree)
            self._top = self._load(self.root)
            self.crash_after = None
            self.crash_on = None
            self.fail_fsync = None
            return report

    def _check_tracked(self, path: str, node: _Dir) -> None:
        real = sorted(os.listdir(path))
        tracked = sorted(node.live)
        assert real == tracked, (
            f"{path}: the real directory has {real}, the simulated disk saw {tracked}: "
            "a storage call bypassed storage/_disk.py"
        )
        for name, child in node.live.items():
            if isinstance(child, _Dir):
                self._check_tracked(os.path.join(path, name), child)

    def _survivor(self, node: _Dir, rng: random.Random, keep: Keep, report: CrashReport) -> _Tree:
        ops = node.pending
        kept = {"none": 0, "all": len(ops)}.get(keep, rng.randint(0, len(ops)))
        report.dir_ops_dropped += len(ops) - kept
        entries = _apply_dir(node.durable, ops[:kept])
        out: _Tree = {}
        for name, child in sorted(entries.items()):
            if isinstance(child, _Dir):
                out[name] = self._survivor(child, rng, keep, report)
            else:
                out[name] = self._file_survivor(child, rng, keep, report)
        return out

    def _file_survivor(
        self, node: _File, rng: random.Random, keep: Keep, report: CrashReport
    ) -> bytes:
        live = self._content(node)
        if keep == "all":
            return live
        ops = node.pending
        if keep == "none":
            report.file_ops_dropped += len(ops)
            return node.durable
        if ops and rng.random() < 0.25:  # out of order: any subset of the writes
            chosen = [op for op in ops if rng.random() < 0.5]
            report.file_ops_dropped += len(ops) - len(chosen)
        else:
            count = rng.randint(0, len(ops))
            chosen = list(ops[:count])
            report.file_ops_dropped += len(ops) - count
            if chosen and chosen[-1][0] == "w" and rng.random() < 0.5:
                kind, at, data = chosen[-1]
                chosen[-1] = (kind, at, data[: rng.randrange(len(data))] if data else data)
                report.torn_writes += 1
        content = bytearray(_apply(node.durable, chosen))
        if node.poisoned:
            return bytes(content)
        # Memmap stores no call saw: pages where the live file differs from its writes.
        expected = _apply(node.durable, ops)
        common = min(len(live), len(expected), len(content))
        for page in range(0, common, PAGE_BYTES):
            end = min(page + PAGE_BYTES, common)
            if live[page:end] != expected[page:end]:
                if rng.random() < 0.5:
                    content[page:end] = live[page:end]
                else:
                    report.pages_lost += 1
        return bytes(content)

    def _write_tree(self, path: str, tree: _Tree) -> None:
        for name, child in tree.items():
            target = os.path.join(path, name)
            if isinstance(child, bytes):
                with open(target, "wb") as f:
                    f.write(child)
            else:
                os.mkdir(target)
                self._write_tree(target, child)


@contextlib.contextmanager
def installed(sim: SimDisk) -> Iterator[SimDisk]:
    """Make `sim` the storage engine's disk for the block."""
    old = _disk.install(sim)
    try:
        yield sim
    finally:
        _disk.install(old)


def wait_for_storage_threads(timeout_s: float = 10.0) -> None:
    """Wait for the storage helper threads (sealed-segment flushes) of a crashed process to
    end: after a crash each gets SimulatedCrash from its next call and stops."""
    for thread in threading.enumerate():
        if thread.name == "riverlog-seal-flush":
            thread.join(timeout_s)
            assert not thread.is_alive(), "a sealed-segment flush thread did not stop"
