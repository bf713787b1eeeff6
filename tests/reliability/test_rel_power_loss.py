"""Power loss, simulated: no acknowledged record is lost under fsync `always`, and recovery
cuts only what was never acknowledged.

Every file-system call of the storage engine goes through storage/_disk.py; these tests put
`SimDisk` there (tests/reliability/simdisk.py), which keeps what was fsynced apart from
what was only written, and at a "power loss" keeps a random part of the rest (a prefix with
a torn last write, or any subset; directory changes not followed by a directory fsync may
be undone; memmap index pages kept or lost page by page).

A case (one seed) creates topics through the Catalog and appends batches of random sizes to
their partitions, with tiny segments so that rolls happen every few appends; the power goes
out after a random step (during an append, a roll, a topic creation, or the recovery of the
previous crash), or right after the n-th write of an append (a torn append), or at a step of
the next topic creation; and everything is reopened. Three such crashes per case, then a
clean close and open. After each reopen:

- every topic whose creation returned exists with all its partitions; one whose creation
  was cut short exists whole or not at all;
- each partition holds exactly its acknowledged batches, at the offsets they were given,
  record for record, then possibly the one append the crash interrupted, whole -- and nothing
  else (recovery cut only bytes that were never acknowledged);
- no leftover temp file or index without its segment.

The weaker policies are shown to behave as the README ("Durability") says: with `never` and
`interval` a power loss keeps a prefix of what was appended (never a hole, never a changed
record), at least up to `flushed_offset` (the last fsync); with `interval` nothing appended
more than `fsync_interval_ms` before the last append is lost.

Seeds: `seed` fixture (printed; `--seed N` replays, and a failing case names its own seed).
Short form: 40 cases for `always`, 15 per weaker policy; `--long`: 1000 and 200.
"""

from __future__ import annotations

import collections
import os
import pathlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from simdisk import SimDisk, SimulatedCrash, installed

from storage import (
    Catalog,
    FsyncPolicy,
    LogConfig,
    LogOfflineError,
    NewRecord,
    PartitionLog,
    Record,
    decode_records,
    encode_batch,
)

# Tiny segments (SEGMENT_BYTES_MIN is 1 KiB) so that a roll comes every few appends, and
# small preallocated indexes so that the simulated disk has little to compare at a crash.
CONFIG = LogConfig(
    segment_bytes=1024,
    segment_ms=None,
    retention_ms=None,
    index_interval_bytes=128,
    index_bytes_max=512,
    fsync=FsyncPolicy.ALWAYS,
)
CRASHES_PER_CASE = 3
APPENDS_PER_CYCLE_MAX = 60
# About 6 steps per append under `always` (write, fdatasync, and a roll every few appends
# is ~25 more): crash points drawn from this range land anywhere in a cycle.
STEPS_PER_CYCLE = 400
TOPICS_MAX = 4
NOW_MS = 1_700_000_000_000
# Files a partition directory may hold besides its segments' .log/.index/.timeindex/.indexsum.
PARTITION_FILES = {"recovery-point", "log-start-offset", ".clean-shutdown"}


def _case_seeds(seed: int, cases: int) -> Iterator[int]:
    for case in range(cases):
        case_seed = seed + case
        print(f"case {case}: seed {case_seed}")
        yield case_seed


def _batch(rng: random.Random, tag: str) -> list[NewRecord]:
    return [
        NewRecord(
            f"{tag}-{j}".encode(),
            rng.randbytes(rng.choice((0, 1, 20, 90, 300))),
            NOW_MS + rng.randrange(1_000_000),
        )
        for j in range(rng.randint(1, 4))
    ]


def _read_all(plog: PartitionLog) -> list[Record]:
    out: list[Record] = []
    offset = plog.log_start_offset
    while offset < plog.log_end_offset:  # each read moves on by at least one batch
        data, offset = plog.read_batches(offset, 1 << 20)
        out.extend(decode_records(data))
    return out


def _same(records: list[Record], batches: list[list[NewRecord]]) -> bool:
    expected = [(r.key, r.value, r.timestamp_ms) for batch in batches for r in batch]
    return [(r.key, r.value, r.timestamp_ms) for r in records] == expected


def _debris(directory: pathlib.Path) -> list[str]:
    """Files recovery should have removed: temp files, indexes without their .log."""
    names = set(os.listdir(directory))
    stems = {n[: -len(".log")] for n in names if n.endswith(".log")}
    bad = []
    for name in sorted(names):
        stem, _, suffix = name.partition(".")
        if name in PARTITION_FILES or name.endswith(".snapshot"):
            continue
        if suffix in ("log", "index", "timeindex", "indexsum") and stem in stems:
            continue
        bad.append(name)
    return bad


@dataclass
class Model:
    """What the test was told: topics created, batches acknowledged per partition."""

    partitions: dict[str, int] = field(default_factory=dict)
    acked: dict[tuple[str, int], list[list[NewRecord]]] = field(default_factory=dict)
    # The one operation a crash may have cut short.
    creating: tuple[str, int] | None = None
    appending: tuple[tuple[str, int], list[NewRecord]] | None = None
    # What the crashes hit, printed at the end: a test that never tears anything proves little.
    stats: collections.Counter[str] = field(default_factory=collections.Counter)


def _reopen_and_check(
    root: pathlib.Path, model: Model, what: str
) -> dict[tuple[str, int], PartitionLog]:
    """Open the catalog and every log; check them against `model`; settle the interrupted
    operation in the model (it happened or not). Returns the open logs."""
    catalog = Catalog.open(root)
    topics = {meta.name: meta.partitions for meta in catalog.list()}
    if model.creating is not None:
        name, count = model.creating
        if name in topics:
            assert topics[name] == count, f"{what}: topic {name} half created"
            model.partitions[name] = count
            for p in range(count):
                model.acked[(name, p)] = []
        model.stats["interrupted topic creation " + ("kept" if name in topics else "gone")] += 1
        model.creating = None
    assert topics == model.partitions, f"{what}: topics {topics}, acknowledged {model.partitions}"
    for name, count in topics.items():
        dirs = sorted(d.name for d in root.iterdir() if d.name.startswith(f"{name}-"))
        assert dirs == sorted(f"{name}-{p}" for p in range(count)), f"{what}: {dirs}"
    logs: dict[tuple[str, int], PartitionLog] = {}
    for tp in sorted(model.acked):
        plog = PartitionLog.open(catalog.partition_dir(*tp), CONFIG)
        logs[tp] = plog
        records = _read_all(plog)
        acked = model.acked[tp]
        acked_end = sum(len(b) for b in acked)
        for cut in plog.truncations:
            assert cut.first_offset_dropped >= acked_end, f"{what}: {tp} cut acknowledged {cut}"
            model.stats["recovery cuts"] += 1
        if model.appending is not None and model.appending[0] == tp:
            batch = model.appending[1]
            kept = _same(records, [*acked, batch])
            model.stats["interrupted append " + ("kept" if kept else "gone")] += 1
            if kept:
                acked.append(batch)  # it reached the disk whole: acknowledged from now on
        assert _same(records, acked), (
            f"{what}: {tp} holds {len(records)} records, {acked_end} were acknowledged; "
            f"truncations {plog.truncations}"
        )
        assert plog.log_end_offset == sum(len(b) for b in acked)
        assert _debris(root / f"{tp[0]}-{tp[1]}") == [], what
    model.appending = None
    return logs


def _cycle(
    rng: random.Random, root: pathlib.Path, model: Model, logs: dict[tuple[str, int], PartitionLog]
) -> None:
    """Appends and topic creations until the simulated power loss stops them (or a cap)."""
    catalog = Catalog.open(root)
    for n in range(APPENDS_PER_CYCLE_MAX):
        if len(model.partitions) < TOPICS_MAX and (not logs or rng.random() < 0.08):
            name, count = f"t{len(model.partitions)}", rng.randint(1, 3)
            model.creating = (name, count)
            catalog.create_topic(name, count)
            model.creating = None
            model.partitions[name] = count
            for p in range(count):
                model.acked[(name, p)] = []
                logs[(name, p)] = PartitionLog.open(catalog.partition_dir(name, p), CONFIG)
            continue
        tp = rng.choice(sorted(logs))
        batch = _batch(rng, f"{tp}-{n}")
        model.appending = (tp, batch)
        result = logs[tp].append(encode_batch(batch), NOW_MS + n)
        model.appending = None
        assert result.base_offset == sum(len(b) for b in model.acked[tp])
        model.acked[tp].append(batch)


def _segment_write(what: str, path: str) -> bool:
    return what == "pwritev" and path.endswith(".log")


def _catalog_step(what: str, path: str) -> bool:
    return what == "mkdir" or f"{os.sep}topics{os.sep}" in path or path.endswith("data")


def _nth_step(n: int, kind: Callable[[str, str], bool]) -> Callable[[str, str], bool]:
    """A `crash_on` predicate: the n-th step of `kind`."""
    seen = [0]

    def crash_on(what: str, path: str) -> bool:
        seen[0] += kind(what, path)
        return seen[0] >= n

    return crash_on


def _run_case(case_seed: int, root: pathlib.Path, stats: collections.Counter[str]) -> None:
    rng = random.Random(case_seed)
    root.mkdir()
    sim = SimDisk(root)
    model = Model(stats=stats)
    data = root / "data"
    with installed(sim):
        logs: dict[tuple[str, int], PartitionLog] = {}
        for crash in range(CRASHES_PER_CASE + 1):
            what = f"seed {case_seed}, after crash {crash}"
            last = crash == CRASHES_PER_CASE
            mode = rng.random()
            if last:
                pass
            elif mode < 0.45:
                sim.crash_after = sim.steps + rng.randint(1, STEPS_PER_CYCLE)
            elif mode < 0.85:  # right after the n-th write of a segment: a torn append
                sim.crash_on = _nth_step(rng.randint(1, APPENDS_PER_CYCLE_MAX // 2), _segment_write)
            else:  # at one of the steps of a topic creation, if the cycle creates one
                sim.crash_on = _nth_step(rng.randint(1, 9), _catalog_step)
            try:
                if crash:
                    logs = _reopen_and_check(data, model, what)
                _cycle(rng, data, model, logs)
            except SimulatedCrash:
                pass
            if last:
                for plog in logs.values():
                    plog.close()
            report = sim.power_cycle(rng, "none" if last else "random")
            stats["torn writes"] += report.torn_writes
            stats["writes lost"] += report.file_ops_dropped
            stats["directory changes undone"] += report.dir_ops_dropped
            stats["memmap pages lost"] += report.pages_lost
        for plog in _reopen_and_check(data, model, f"seed {case_seed}, clean").values():
            assert not plog.recovered
            plog.close()


def test_power_loss_loses_no_acknowledged_record_under_fsync_always(
    tmp_path: pathlib.Path, seed: int, long_run: bool
) -> None:
    stats: collections.Counter[str] = collections.Counter()
    for case_seed in _case_seeds(seed, 1000 if long_run else 40):
        _run_case(case_seed, tmp_path / f"case-{case_seed}", stats)
    print(dict(sorted(stats.items())))


# ---------------------------------------------------------------------------- weaker policies
@pytest.mark.parametrize("policy", [FsyncPolicy.NEVER, FsyncPolicy.INTERVAL])
def test_power_loss_under_weaker_fsync_keeps_a_prefix_down_to_the_last_fsync(
    tmp_path: pathlib.Path, seed: int, long_run: bool, policy: FsyncPolicy
) -> None:
    """`never`/`interval`: what survives is a prefix of what was appended (no hole, no
    changed byte), at least up to `flushed_offset`; with `interval`, nothing appended
    `fsync_interval_ms` or more before the last append is lost. (The helper thread that
    flushes sealed segments makes these cases depend on thread timing: a failing seed
    replays the same workload and crash point, not always the same interleaving.)"""
    interval_ms = 50
    config = CONFIG.with_overrides({"fsync": policy, "fsync_interval_ms": interval_ms})
    for case_seed in _case_seeds(seed, 200 if long_run else 15):
        rng = random.Random(case_seed)
        root = tmp_path / f"case-{case_seed}"
        root.mkdir()
        sim = SimDisk(root)
        appended: list[tuple[int, list[NewRecord]]] = []  # (append time, batch)
        in_flight: list[tuple[int, list[NewRecord]]] = []  # the append the crash cut short
        with installed(sim):
            plog = PartitionLog.open(root / "p", config)
            sim.crash_after = sim.steps + rng.randint(1, 150)
            flushed = 0
            now_ms = NOW_MS
            try:
                for n in range(400):
                    now_ms += rng.randint(0, 20)
                    batch = _batch(rng, f"{n}")
                    in_flight = [(now_ms, batch)]
                    plog.append(encode_batch(batch), now_ms)
                    in_flight = []
                    appended.append((now_ms, batch))
                    flushed = plog.flushed_offset
                    if rng.random() < 0.05:
                        plog.flush(now_ms)  # acks=all
                        flushed = plog.flushed_offset
            except (SimulatedCrash, LogOfflineError):
                # The power went out in this thread or in the sealed-segment flusher, which
                # then took the log offline: either way nothing more was acknowledged.
                assert sim.dead
            sim.power_cycle(rng)
            plog = PartitionLog.open(root / "p", config)
            records = _read_all(plog)
            plog.close()
        kept = 0
        for _at, batch in appended + in_flight:  # the longest prefix of whole batches found
            if not _same(records[kept : kept + len(batch)], [batch]):
                break
            kept += len(batch)
        assert kept == len(records), f"seed {case_seed}: records past a hole or changed"
        assert kept >= flushed, f"seed {case_seed}: {kept} records kept, {flushed} were fsynced"
        if policy == FsyncPolicy.INTERVAL and appended:
            last_ms = appended[-1][0]
            offset = 0
            for at, batch in appended:
                if offset >= kept:
                    assert last_ms - at < interval_ms, f"seed {case_seed}: lost an old append"
                offset += len(batch)
