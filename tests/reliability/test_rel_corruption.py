"""Corruption, seeded: truncation points, bit flips, zeroed runs and garbage in every file a
partition keeps (the newest segment's tail, sealed segments, indexes, the recovery point,
producer snapshots) and in the topic metadata, each applied to a fresh copy of a small
prepared data directory and opened with PartitionLog.open (or Catalog.open).

The rules under test are storage/_log.py's and the README's ("Durability"):

- after an unclean stop the newest segment is scanned; its bad tail is cut from the first
  bad batch on and reported in `PartitionLog.truncations`;
- a sealed segment at or past the recovery point may be torn (its fsync runs behind the
  roll): it is cut the same way, every later segment with it, and the cut is reported;
- with no readable recovery point nothing sealed is known to be torn: a bad sealed segment
  refuses to open (CorruptLogError naming the file and byte) and no .log file changes;
- a segment known to be on disk (below the recovery point, or any segment after a clean
  shutdown) holds acknowledged records: a bad batch there is never cut silently and never
  served -- the partition refuses, at open or at the read, naming the file (such a segment
  is opened without a scan; its reads check what no one has checked yet, and a missing or
  mismatching index checksum sidecar makes the open scan it);
- indexes are derived data: damage is rebuilt from the log, and reads and timestamp look-ups
  answer exactly as before the damage (damage that keeps an index in order and in bounds is
  caught by the segment's .indexsum sidecar, not by the sanity checks);
- a damaged recovery point only makes recovery scan more; a damaged producer snapshot is
  dropped and the state rebuilt from the log (a resend is still a duplicate); damaged topic
  metadata is refused naming the file, and the topic's data is never removed.

And in every case: a read never returns corrupt data -- each batch it returns passes
`check_batch`, holds the offset asked for, and its records are the ones written.

Where in a batch damage can hide: partitionLeaderEpoch (header bytes 12..15) is outside the
CRC32C, as in Kafka, so a batch whose only change is there is whole; every other byte is
covered by the CRC, the magic and length checks, or the rule that base offsets are
contiguous.

Cases come from the `seed` fixture (printed; replay with --seed): 1,000 in the short form,
10,000 with --long. The "durable" and "index-plausible" groups found storage bugs (bad batches
served from segments opened without a scan; a damaged newest segment cut silently on a clean
open; index damage the sanity checks passed); they pass since the lazy read verification and
the .indexsum sidecar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import random
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from storage import (
    BatchHeader,
    Catalog,
    CorruptBatchError,
    CorruptLogError,
    LogConfig,
    NewRecord,
    PartitionLog,
    ProducerEntry,
    Record,
    StorageError,
    Truncation,
    check_batch,
    decode_batch,
    encode_batch,
    read_header,
)

TOPIC = "t"
# Small segments and a dense index: 72 batches make six segments of about 14 batches, each
# with several index entries; small preallocated index files keep a copy of the directory
# small (a case copies and opens it in a few milliseconds).
CONFIG = LogConfig(
    segment_bytes=2048,
    segment_ms=None,
    retention_ms=None,
    index_interval_bytes=256,
    index_bytes_max=4096,
)
BATCHES = 72
NOW_MS = 1_700_000_000_000
# Two idempotent producer ids write every third batch between them, so the partition keeps
# producer state and snapshots it at every roll and on close.
PRODUCER_IDS = (7, 8)
# Header bytes of a batch that no check covers (partitionLeaderEpoch, as in Kafka).
UNCHECKED_AT = range(12, 16)
# Cases per test in the short form (1,000 in all); --long runs LONG_FACTOR times as many.
CASES = {
    "active": 250,
    "torn-sealed": 100,
    "torn-sealed-boundary": 25,
    "no-checkpoint": 125,
    "durable": 150,
    "index": 75,
    "index-plausible": 75,
    "metadata": 200,
}
assert sum(CASES.values()) == 1000
LONG_FACTOR = 10
# A failing test lists at most this many of its failed cases.
FAILURES_SHOWN = 12
# Timestamps whose offset_for_timestamp answer must not change (every 7 ms over the log).
TIMESTAMPS_PROBED = range(NOW_MS - 5, NOW_MS + 10 * BATCHES + 10, 7)
# Index layouts (storage/_index.py): .index entries are (u32 relative offset, u32 position),
# .timeindex entries (i64 timestamp, u32 relative offset).
OFFSET_ENTRY = struct.Struct(">II")
TIME_ENTRY = struct.Struct(">qI")

LOG_SUFFIX, INDEX_SUFFIX, TIMEINDEX_SUFFIX = ".log", ".index", ".timeindex"
RECOVERY_POINT_FILE = "recovery-point"


# ---------------------------------------------------------------------------- the prepared log
def _records(i: int) -> list[NewRecord]:
    """Batch i: 1-3 records of varying size; timestamps rise, a little out of order within."""
    return [
        NewRecord(
            f"k{i}".encode(),
            f"value-{i}-{j}|".encode() * (1 + (i * 7 + j) % 5),
            NOW_MS + 10 * i + (3 * j) % 7,
            (("h", str(i).encode()),) if j == 0 else (),
        )
        for j in range(1 + i % 3)
    ]


@dataclass(frozen=True)
class Written:
    """What the prepared log holds, from its writer's side."""

    records: dict[int, Record]
    producers: dict[int, ProducerEntry]
    # The last idempotent batch of each producer id as sent, with its offsets.
    last_sent: dict[int, tuple[bytes, int, int]]


def _write(directory: pathlib.Path) -> tuple[PartitionLog, Written]:
    log = PartitionLog.open(directory, CONFIG)
    records: dict[int, Record] = {}
    sequences = dict.fromkeys(PRODUCER_IDS, 0)
    last_sent: dict[int, tuple[bytes, int, int]] = {}
    for i in range(BATCHES):
        new = _records(i)
        producer_id = PRODUCER_IDS[i % 2] if i % 3 == 0 else -1
        if producer_id >= 0:
            payload = encode_batch(
                new,
                producer_id=producer_id,
                producer_epoch=0,
                base_sequence=sequences[producer_id],
            )
            sequences[producer_id] += len(new)
        else:
            payload = encode_batch(new)
        # Append time = the batch's max timestamp, which is what a rebuild from the log
        # takes: producer state from a snapshot and from a replay then compare equal.
        result = log.append(payload, max(r.timestamp_ms for r in new))
        if producer_id >= 0:
            last_sent[producer_id] = (payload, result.base_offset, result.last_offset)
        for j, r in enumerate(new):
            offset = result.base_offset + j
            records[offset] = Record(offset, r.timestamp_ms, r.key, r.value, tuple(r.headers))
    producers = {}
    for pid in PRODUCER_IDS:
        entry = log.producer_state(pid)
        assert entry is not None
        producers[pid] = entry
    return log, Written(records, producers, last_sent)


def _walk(data: bytes) -> list[tuple[int, BatchHeader]]:
    """(byte position, header) of every batch of a whole .log file's bytes."""
    out, pos = [], 0
    while pos < len(data):
        header = read_header(data, pos)
        out.append((pos, header))
        pos += header.size
    assert pos == len(data)
    return out


@dataclass(frozen=True)
class Template:
    """One prepared data directory, as a crash or a clean shutdown left it."""

    data_dir: pathlib.Path
    partition_dir: pathlib.Path
    written: Written
    # Per segment file name (sorted = by base offset): its bytes and batches as written.
    segments: dict[str, bytes]
    batches: dict[str, list[tuple[int, BatchHeader]]]
    # offset_for_timestamp answers of the undamaged log.
    timestamps: dict[int, int | None]

    @property
    def log_names(self) -> list[str]:
        return sorted(self.segments)

    @property
    def end_offset(self) -> int:
        return max(self.written.records) + 1


def _make_template(root: pathlib.Path, clean: bool) -> Template:
    data_dir = root / ("clean" if clean else "crash")
    catalog = Catalog.open(data_dir)
    catalog.create_topic(TOPIC, 1, {"segment_bytes": CONFIG.segment_bytes})
    partition_dir = catalog.partition_dir(TOPIC, 0)
    log, written = _write(partition_dir)
    assert log.segment_count >= 5
    if clean:
        log.close()
    else:
        log.abandon()  # as a crash leaves it: no clean-shutdown marker
    names = sorted(p.name for p in partition_dir.glob("*" + LOG_SUFFIX))
    segments = {n: (partition_dir / n).read_bytes() for n in names}
    probe = root / f"probe-{data_dir.name}"
    shutil.copytree(partition_dir, probe)
    with PartitionLog.open(probe, CONFIG) as plog:
        assert plog.truncations == []
        timestamps = {t: plog.offset_for_timestamp(t) for t in TIMESTAMPS_PROBED}
    shutil.rmtree(probe)
    batches = {n: _walk(data) for n, data in segments.items()}
    return Template(data_dir, partition_dir, written, segments, batches, timestamps)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Template]:
    root = tmp_path_factory.mktemp("corruption-templates")
    return {"crash": _make_template(root, clean=False), "clean": _make_template(root, clean=True)}


# ---------------------------------------------------------------------------- damage
@dataclass(frozen=True)
class Damage:
    """One seeded change to one file; its str is what a failure report shows."""

    kind: str  # flip | truncate | torn | zeros | garbage | delete
    at: int = 0
    length: int = 0
    bit: int = 0

    def apply(self, data: bytes) -> bytes | None:
        """The damaged content; None: the file is deleted."""
        if self.kind == "delete":
            return None
        if self.kind == "flip":
            out = bytearray(data)
            out[self.at] ^= 1 << self.bit
            return bytes(out)
        if self.kind == "truncate":
            return data[: self.at]
        if self.kind == "torn":  # cut, then a zero-filled tail (extended, never written)
            return data[: self.at] + b"\x00" * self.length
        if self.kind == "zeros":  # a run of zeros (a block that never reached the disk)
            return data[: self.at] + b"\x00" * self.length + data[self.at + self.length :]
        if self.kind == "garbage":  # random bytes of the same size, seeded by `bit`
            return random.Random(self.bit).randbytes(self.length)
        raise AssertionError(self.kind)

    def __str__(self) -> str:
        if self.kind == "delete":
            return "deleted"
        if self.kind == "garbage":
            return f"replaced by {self.length} random bytes (seed {self.bit})"
        extra = {
            "flip": f" bit {self.bit}",
            "torn": f" + {self.length} zero bytes",
            "zeros": f" x {self.length}",
        }.get(self.kind, "")
        return f"{self.kind} at byte {self.at}{extra}"


def _draw_damage(
    rng: random.Random, data: bytes, kinds: tuple[str, ...], entry_bytes: int = 1
) -> Damage:
    """One damage of a kind from `kinds`. Beyond Damage's own kinds: "boundary" (a .log cut
    exactly between two batches), "partial" (an index cut inside an entry) and "entry" (an
    index cut between two entries)."""
    size = len(data)
    kind = rng.choice(kinds)
    if kind == "delete":
        return Damage("delete")
    if kind == "garbage":
        return Damage("garbage", 0, size, bit=rng.randrange(2**16))
    if kind == "boundary":
        return Damage("truncate", rng.choice([pos for pos, _ in _walk(data)]))
    if kind in ("partial", "entry"):
        at = rng.randrange(max(1, size // entry_bytes)) * entry_bytes
        inside = rng.randint(1, entry_bytes - 1) if kind == "partial" else 0
        return Damage("truncate", min(size, at + inside))
    if size == 0:
        return Damage("torn", 0, rng.randint(1, 64))
    if kind == "flip":
        return Damage("flip", rng.randrange(size), bit=rng.randrange(8))
    if kind == "truncate":
        return Damage("truncate", rng.randrange(size))
    if kind == "torn":
        at = rng.randrange(size + 1)
        return Damage("torn", at, rng.randint(1, 4096 - at % 4096))
    assert kind == "zeros", kind
    at = rng.randrange(size)
    return Damage("zeros", at, rng.randint(1, min(512, size - at)))


@dataclass(frozen=True)
class Case:
    number: int
    template: str  # crash | clean
    # crash only: "kept" (as the crash left it), "none" (the recovery-point file is gone:
    # nothing sealed is known torn) or "lagging" (the recovery point is segment 1's base
    # offset, so segments 1.. may be torn); a clean log's is always "kept".
    checkpoint: str
    file: str  # relative to the data directory
    damage: Damage

    def __str__(self) -> str:
        return (
            f"case {self.number}: {self.template} log, checkpoint {self.checkpoint}, "
            f"{self.file}: {self.damage}"
        )


def _prepare(case: Case, template: Template, root: pathlib.Path) -> pathlib.Path:
    """A damaged copy of the template's data directory; returns its partition directory."""
    target = root / f"case-{case.number}"
    shutil.copytree(template.data_dir, target)
    partition = target / template.partition_dir.relative_to(template.data_dir)
    if case.checkpoint == "none":
        (partition / RECOVERY_POINT_FILE).unlink()
    elif case.checkpoint == "lagging":
        (partition / RECOVERY_POINT_FILE).write_text(f"{int(template.log_names[1][:20])}\n")
    path = target / case.file
    damaged = case.damage.apply(path.read_bytes())
    if damaged is None:
        path.unlink()
    else:
        path.write_bytes(damaged)
    return partition


# ---------------------------------------------------------------------------- checking
class Problems:
    """What went wrong in one case; empty when the case passed."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.items.append(what)


def _check_read(
    data: bytes, offset: int, written: dict[int, Record], problems: Problems, where: str
) -> int | None:
    """A read's bytes: whole valid batches, the first holding `offset`, records as written.
    Returns the last offset read; None when there was a problem or no data."""
    pos = 0
    last: int | None = None
    while pos < len(data):
        try:
            header = check_batch(data, pos)
            _, records = decode_batch(data, pos, pos + header.size)
        except CorruptBatchError as e:
            problems.expect(False, f"{where} read of offset {offset} returned a corrupt batch: {e}")
            return None
        if last is None and not header.base_offset <= offset <= header.last_offset:
            problems.expect(
                False,
                f"{where} read of offset {offset} starts with the batch of offsets "
                f"[{header.base_offset}, {header.last_offset}]",
            )
            return None
        for r in records:
            if written.get(r.offset) != r:
                problems.expect(
                    False,
                    f"{where} read of offset {offset} returned offset {r.offset} as {r!r}, "
                    f"written as {written.get(r.offset)!r}",
                )
                return None
        last = header.last_offset
        pos += header.size
    return last


def _check_reads(
    log: PartitionLog,
    written: dict[int, Record],
    problems: Problems,
    refusable_from: int | None = None,
) -> None:
    """Every offset alone, then front to back as a consumer reads. A read at or past
    `refusable_from` may refuse with a StorageError (damage it must not serve)."""
    start, end = log.log_start_offset, log.log_end_offset

    def refused(offset: int, e: StorageError) -> None:
        problems.expect(
            refusable_from is not None and offset >= refusable_from,
            f"read of offset {offset} raised {type(e).__name__}: {e}",
        )

    for offset in range(start, end):
        try:
            data = log.read(offset, 1)
        except StorageError as e:
            refused(offset, e)
            continue
        problems.expect(bool(data), f"read of offset {offset} returned nothing")
        _check_read(data, offset, written, problems, "single")
    offset = start
    for _ in range(end - start):  # each read moves at least one offset on
        if offset >= end:
            break
        try:
            data = log.read(offset, 1 << 20)
        except StorageError as e:
            refused(offset, e)
            break
        last = _check_read(data, offset, written, problems, "sequential")
        if last is None:
            problems.expect(bool(data), f"sequential read of offset {offset} returned nothing")
            break
        offset = last + 1
    with contextlib.suppress(StorageError):
        problems.expect(log.read(end, 1 << 20) == b"", f"read at the log end {end} is not empty")


def _check_timestamps(log: PartitionLog, template: Template, problems: Problems) -> None:
    wrong: list[tuple[int, int | str | None, int | None]] = []
    for t, want in template.timestamps.items():
        try:
            got: int | str | None = log.offset_for_timestamp(t)
        except StorageError as e:
            got = f"{type(e).__name__}: {e}"
        if got != want:
            wrong.append((t, got, want))
    problems.expect(
        not wrong,
        f"offset_for_timestamp (t, got, expected): {wrong[:2]} and {len(wrong) - 2} more",
    )


@dataclass(frozen=True)
class FirstBad:
    """The first batch of a damaged .log that recovery must not keep: its byte position and
    base offset. `position` is the original size when only bytes after the last batch were
    added (a zero-filled tail)."""

    position: int
    base_offset: int


def _first_bad(
    original: bytes, damaged: bytes, batches: list[tuple[int, BatchHeader]]
) -> FirstBad | None:
    """Our own oracle: the first batch with a changed byte outside partitionLeaderEpoch, or
    cut short."""
    for pos, header in batches:
        end = pos + header.size
        before, after = pos + UNCHECKED_AT.start, pos + UNCHECKED_AT.stop
        if (
            len(damaged) < end
            or damaged[pos:before] != original[pos:before]
            or damaged[after:end] != original[after:end]
        ):
            return FirstBad(pos, header.base_offset)
    if len(damaged) > len(original):
        return FirstBad(len(original), batches[-1][1].last_offset + 1)
    return None


def _open(directory: pathlib.Path) -> PartitionLog | StorageError:
    try:
        return PartitionLog.open(directory, CONFIG)
    except StorageError as e:
        return e


def _logs(partition: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(partition.glob("*" + LOG_SUFFIX))}


def _rule(case: Case, index: int, newest: bool) -> str:
    """Which rule covers a damaged .log: "scanned" (may be torn: cut and report), "strict"
    (refuse to open) or "durable" (known on disk: refuse, never serve, never cut silently)."""
    if case.template == "clean":
        return "durable"
    if newest:
        return "scanned"
    if case.checkpoint == "none":
        return "strict"
    if case.checkpoint == "lagging" and index >= 1:
        return "scanned"
    return "durable"


def _check_log_case(case: Case, template: Template, root: pathlib.Path) -> list[str]:
    """A damaged .log, by the rule that covers it."""
    problems = Problems()
    partition = _prepare(case, template, root)
    name = pathlib.Path(case.file).name
    path = partition / name
    names = template.log_names
    index = names.index(name)
    later = names[index + 1 :]
    original = template.segments[name]
    damaged = case.damage.apply(original) or b""
    bad = _first_bad(original, damaged, template.batches[name])
    written = template.written.records
    before = _logs(partition)
    rule = _rule(case, index, not later)
    opened = _open(partition)

    if bad is None:  # no check can see what changed: everything reads back
        if isinstance(opened, StorageError):
            return [f"open raised {type(opened).__name__}: {opened}"]
        with opened as log:
            problems.expect(log.truncations == [], f"cut an intact log: {log.truncations}")
            problems.expect(log.log_end_offset == template.end_offset, "the log end moved")
            _check_reads(log, written, problems)
        return problems.items

    if rule == "strict":
        if len(damaged) == bad.position:  # whole batches, the last ones missing: an offset gap
            problems.expect(
                isinstance(opened, StorageError)
                and any(str(partition / n) in str(opened) for n in names[index:]),
                f"expected a refusal naming {path} or the segment after it, got {opened!r}",
            )
        else:
            problems.expect(
                isinstance(opened, CorruptLogError)
                and (opened.path, opened.position) == (str(path), bad.position),
                f"expected CorruptLogError at {path} byte {bad.position}, got {opened!r}",
            )
        problems.expect(_logs(partition) == before, "a refused open changed .log files")
        if isinstance(opened, PartitionLog):
            opened.close()
        return problems.items

    if rule == "scanned":
        if isinstance(opened, StorageError):
            return [f"open raised {type(opened).__name__}: {opened}"]
        with opened as log:
            dropped = len(damaged) - bad.position + sum(len(template.segments[n]) for n in later)
            if dropped == 0:
                problems.expect(log.truncations == [], f"nothing to cut, cut {log.truncations}")
            else:
                want = Truncation(str(path), bad.position, dropped, bad.base_offset, "")
                problems.expect(
                    [dataclasses.replace(t, reason="") for t in log.truncations] == [want],
                    f"expected {want}, got {log.truncations}",
                )
            problems.expect(
                log.log_end_offset == bad.base_offset,
                f"log end {log.log_end_offset}, expected {bad.base_offset}",
            )
            problems.expect(path.stat().st_size == bad.position, "not cut at the bad batch")
            problems.expect(
                not any((partition / n).exists() for n in later), "later segments were kept"
            )
            _check_reads(log, written, problems)
            appended = log.append(encode_batch(_records(0)), NOW_MS)
            problems.expect(appended.base_offset == bad.base_offset, "append after the cut")
        return problems.items

    # durable: refusing (at open, or at the read of what is bad) is right; a cut only when
    # reported; serving a bad batch or losing records silently never.
    if isinstance(opened, StorageError):
        problems.expect(
            any(str(partition / n) in str(opened) for n in names[index:]),
            f"refused without naming {path}: {opened}",
        )
        if isinstance(opened, CorruptLogError) and opened.path == str(path):
            problems.expect(
                opened.position == bad.position,
                f"refused at byte {opened.position}; the first bad batch is at {bad.position}",
            )
        problems.expect(_logs(partition) == before, "a refused open changed .log files")
        return problems.items
    with opened as log:
        if log.truncations:
            problems.expect(
                log.log_end_offset == bad.base_offset
                and log.truncations[0].first_offset_dropped == bad.base_offset,
                f"cut {log.truncations}; the first bad batch holds offset {bad.base_offset}",
            )
        else:
            problems.expect(
                log.log_end_offset == template.end_offset,
                f"log end {log.log_end_offset} of {template.end_offset} written, no cut "
                "reported: acknowledged records dropped silently",
            )
        _check_reads(log, written, problems, refusable_from=bad.base_offset)
    return problems.items


def _check_index_case(case: Case, template: Template, root: pathlib.Path) -> list[str]:
    """A damaged index: nothing cut, reads and timestamp look-ups exactly as before."""
    problems = Problems()
    opened = _open(_prepare(case, template, root))
    if isinstance(opened, StorageError):
        return [f"open raised {type(opened).__name__}: {opened}"]
    with opened as log:
        problems.expect(log.truncations == [], f"an index fault cut the log: {log.truncations}")
        problems.expect(log.log_end_offset == template.end_offset, "the log end moved")
        _check_reads(log, template.written.records, problems)
        _check_timestamps(log, template, problems)
    return problems.items


def _check_partition_metadata_case(case: Case, template: Template, root: pathlib.Path) -> list[str]:
    """A damaged recovery point or producer snapshot: nothing lost, producer state whole."""
    problems = Problems()
    opened = _open(_prepare(case, template, root))
    if isinstance(opened, StorageError):
        return [f"open raised {type(opened).__name__}: {opened}"]
    with opened as log:
        problems.expect(log.truncations == [], f"cut an intact log: {log.truncations}")
        problems.expect(log.log_end_offset == template.end_offset, "the log end moved")
        _check_reads(log, template.written.records, problems)
        for pid, want in template.written.producers.items():
            got = log.producer_state(pid)
            problems.expect(
                got is not None and (got.epoch, got.batches) == (want.epoch, want.batches),
                f"producer {pid}: state {got}, expected {want}",
            )
            payload, base, last = template.written.last_sent[pid]
            again = log.append(payload, NOW_MS)
            problems.expect(
                (again.duplicate, again.base_offset, again.last_offset) == (True, base, last),
                f"producer {pid}: a resend of its last batch gave {again}",
            )
    return problems.items


def _check_topic_metadata_case(case: Case, template: Template, root: pathlib.Path) -> list[str]:
    """Damaged topic metadata: refused naming the file, or read; the data always stays."""
    problems = Problems()
    partition = _prepare(case, template, root)
    data_dir = root / f"case-{case.number}"
    before = {p.name: p.read_bytes() for p in partition.iterdir()}
    try:
        catalog = Catalog.open(data_dir)
    except StorageError as e:
        problems.expect(case.file in str(e), f"refused without naming {case.file}: {e}")
    else:
        names = [m.name for m in catalog.list()]
        problems.expect(names == [TOPIC], f"the catalog lists {names}, not [{TOPIC!r}]")
    after = {p.name: p.read_bytes() for p in partition.iterdir()} if partition.is_dir() else {}
    problems.expect(after == before, "opening the catalog changed or removed partition data")
    return problems.items


def _check_metadata_case(case: Case, template: Template, root: pathlib.Path) -> list[str]:
    if case.file.startswith("topics/"):
        return _check_topic_metadata_case(case, template, root)
    return _check_partition_metadata_case(case, template, root)


# ---------------------------------------------------------------------------- drawing cases
LOG_KINDS = ("flip", "flip", "truncate", "torn", "zeros", "boundary")
TORN_KINDS = ("flip", "flip", "truncate", "torn", "zeros")
INDEX_REBUILT_KINDS = ("delete", "partial")
INDEX_PLAUSIBLE_KINDS = ("flip", "flip", "zeros", "entry", "garbage")
FILE_KINDS = ("flip", "flip", "truncate", "zeros", "garbage")
# The first case of "index-plausible", whatever the seed: the lowest bit of the position of
# entry 1 of segment 0's offset index (bytes 8..15), after a clean shutdown. The index stays
# strictly increasing and in bounds, so the sanity check passes it.
PLAUSIBLE_FIRST = Damage("flip", OFFSET_ENTRY.size + 7, bit=0)


def _draw(group: str, number: int, rng: random.Random, templates: dict[str, Template]) -> Case:
    """One case of `group` (see CASES)."""
    template_name, checkpoint = rng.choice(("crash", "clean")), "kept"
    if group == "durable":
        template_name, checkpoint = rng.choice(
            [("clean", "kept")] * 10 + [("crash", "kept")] * 7 + [("crash", "lagging")] * 3
        )
    elif group in ("active", "torn-sealed", "torn-sealed-boundary", "no-checkpoint"):
        template_name = "crash"
        checkpoint = {"no-checkpoint": "none"}.get(group, "lagging" if "torn" in group else "")
        checkpoint = checkpoint or rng.choice(("kept", "none", "lagging"))
    elif group == "index":
        checkpoint = rng.choice(("kept", "none", "lagging")) if template_name == "crash" else "kept"
    template = templates[template_name]
    partition = template.partition_dir.relative_to(template.data_dir)
    names = template.log_names
    entry_bytes = 1
    kinds: tuple[str, ...]
    if group == "active":
        name, kinds = names[-1], LOG_KINDS
    elif group == "torn-sealed":
        name, kinds = rng.choice(names[1:-1]), TORN_KINDS
    elif group == "torn-sealed-boundary":
        name, kinds = rng.choice(names[1:-1]), ("boundary",)
    elif group == "no-checkpoint":
        name, kinds = rng.choice(names[:-1]), LOG_KINDS
    elif group == "durable":
        if template_name == "clean":
            name = rng.choice(names)
        else:
            name = names[0] if checkpoint == "lagging" else rng.choice(names[:-1])
        kinds = LOG_KINDS
    elif group in ("index", "index-plausible"):
        suffix = rng.choice((INDEX_SUFFIX, TIMEINDEX_SUFFIX))
        entry_bytes = (OFFSET_ENTRY if suffix == INDEX_SUFFIX else TIME_ENTRY).size
        # the plausible kind matters where the index is trusted: sealed ones, or after a
        # clean shutdown (a crashed log's newest segment is always rebuilt by its scan)
        pool = names if template_name == "clean" or group == "index" else names[:-1]
        name = rng.choice(pool)[:20] + suffix
        kinds = INDEX_REBUILT_KINDS if group == "index" else INDEX_PLAUSIBLE_KINDS
        if group == "index-plausible" and number == 0:
            clean = templates["clean"]
            folder = clean.partition_dir.relative_to(clean.data_dir)
            file = f"{folder}/{clean.log_names[0][:20]}{INDEX_SUFFIX}"
            return Case(0, "clean", "kept", file, PLAUSIBLE_FIRST)
    else:
        assert group == "metadata", group
        which = rng.choice(("recovery-point", "snapshot", "topic"))
        kinds = FILE_KINDS
        if which == "recovery-point":
            name, kinds = RECOVERY_POINT_FILE, (*FILE_KINDS, "delete")
        elif which == "snapshot":
            name = rng.choice(sorted(p.name for p in template.partition_dir.glob("*.snapshot")))
            kinds = (*FILE_KINDS, "delete")
        else:
            file = f"topics/{TOPIC}.json"
            data = (template.data_dir / file).read_bytes()
            return Case(number, template_name, "kept", file, _draw_damage(rng, data, kinds))
    file = f"{partition}/{name}"
    data = (template.data_dir / file).read_bytes()
    damage = _draw_damage(rng, data, kinds, entry_bytes)
    return Case(number, template_name, checkpoint, file, damage)


def _cases(group: str, count: int, seed: int, templates: dict[str, Template]) -> Iterator[Case]:
    rng = random.Random(f"{group}:{seed}")
    for number in range(count):
        yield _draw(group, number, rng, templates)


def _run(
    group: str,
    check: Callable[[Case, Template, pathlib.Path], list[str]],
    templates: dict[str, Template],
    tmp_path: pathlib.Path,
    seed: int,
    long_run: bool,
) -> None:
    count = CASES[group] * (LONG_FACTOR if long_run else 1)
    failures: list[str] = []
    for case in _cases(group, count, seed, templates):
        problems = check(case, templates[case.template], tmp_path)
        if problems:
            failures.append(f"{case}: {'; '.join(problems[:2])}")
        shutil.rmtree(tmp_path / f"case-{case.number}")
    print(f"{group}: {count} cases, {len(failures)} failed")
    shown = "\n".join(failures[:FAILURES_SHOWN])
    assert not failures, f"{len(failures)} of {count} cases failed (seed {seed}):\n{shown}"


# ---------------------------------------------------------------------------- tests
def test_damaged_newest_segment_is_cut_at_the_first_bad_batch_and_reported(
    templates: dict[str, Template], tmp_path: pathlib.Path, seed: int, long_run: bool
) -> None:
    _run("active", _check_log_case, templates, tmp_path, seed, long_run)


def test_torn_sealed_segment_past_the_recovery_point_is_cut_with_later_segments(
    templates: dict[str, Template], tmp_path: pathlib.Path, seed: int, long_run: bool
) -> None:
    _run("torn-sealed", _check_log_case, templates, tmp_path, seed, long_run)


def test_sealed_segment_past_the_recovery_point_torn_between_batches_is_cut_there(
    templates: dict[str, Template], tmp_path: pathlib.Path, seed: int, long_run: bool
) -> None:
    _run("torn-sealed-boundary", _check_log_case, templates, tmp_path, seed, long_run)


def test_bad_sealed_segment_without_a_recovery_point_refuses_to_open(
    templates: dict[str, Template], tmp_path: pathlib.Path, seed: int, long_run: bool
) -> None:
    _run("no-checkpoint", _check_log_case, templates, tmp_path, seed, long_run)


def test_bad_batch_in_a_segment_known_on_disk_is_refused_never_served(
    templates: dict[str, Template], tmp_path: pathlib.Path, seed: int, long_run: bool
) -> None:
    _run("durable", _check_log_case, templates, tmp_path, seed, long_run)


def test_missing_or_torn_index_is_rebuilt_and_answers_are_unchanged(
    templates: dict[str, Template], tmp_path: pathlib.Path, seed: int, long_run: bool
) -> None:
    _run("index", _check_index_case, templates, tmp_path, seed, long_run)


def test_plausible_index_damage_never_changes_an_answer(
    templates: dict[str, Template], tmp_path: pathlib.Path, seed: int, long_run: bool
) -> None:
    _run("index-plausible", _check_index_case, templates, tmp_path, seed, long_run)


def test_damaged_recovery_point_snapshot_or_topic_metadata_loses_nothing(
    templates: dict[str, Template], tmp_path: pathlib.Path, seed: int, long_run: bool
) -> None:
    _run("metadata", _check_metadata_case, templates, tmp_path, seed, long_run)
