"""Crash at every step: segment roll, topic creation, topic metadata rewrite and delete, offset
commit (with and without the snapshot that compacts the offsets log), retention delete.

Each operation runs once on a simulated disk (tests/reliability/simdisk.py) to count its
steps -- the calls through storage/_disk.py that change the live or the durable state --
and then once per step k = 1..N from the same starting state, with the power lost right after
step k. Each crash is taken three ways: nothing un-fsynced survives, everything does (a
process crash), and a random part of it (prefixes of writes and of directory changes, torn
last writes, memmap pages). Then everything is reopened from the disk and observed:

- the state is the one before the operation or the one after it, never a mix (for an
  offset commit: the committed offsets; the log start offset of the offsets log may stop
  between its old and new value, since the snapshot that covers it came first);
- after the last step (k = N) it is the state after: the operation was durable on return;
- the power is lost once more, with nothing un-fsynced surviving, and the reopened state is
  the same again: what recovery decided was durable, so a deleted segment never comes back
  and the log start offset never moves back.

Short form: every step, each of the three ways once (random with the `seed` fixture; printed,
`--seed N` replays). `--long`: eight random crashes per step.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from simdisk import Keep, SimDisk, SimulatedCrash, installed

from storage import (
    Catalog,
    FsyncPolicy,
    LogConfig,
    NewRecord,
    PartitionLog,
    StorageError,
    decode_records,
    encode_batch,
)
from stream.groups import _offsets
from stream.groups._offsets import OFFSETS_LOG_CONFIG, OffsetStore

NOW_MS = 1_700_000_000_000
PRODUCER_ID = 7
LOG_CONFIG = LogConfig(
    segment_bytes=1024,
    segment_ms=None,
    retention_ms=None,
    index_interval_bytes=128,
    index_bytes_max=512,
    fsync=FsyncPolicy.ALWAYS,
)
# The offsets log, small: a few commits fill a segment, indexes stay tiny.
OFFSETS_CONFIG = dataclasses.replace(
    OFFSETS_LOG_CONFIG, segment_bytes=4096, index_bytes_max=512, index_interval_bytes=128
)
PARTITION_FILES = {"recovery-point", "log-start-offset", "snapshot.json"}

# What `observe` sees: compared with ==, printed when a check fails.
State = tuple[Any, ...]


@dataclass(frozen=True)
class Scenario:
    """An operation to crash at every step: `setup` builds the starting state (durable when
    it returns) and returns what `operation` needs; `observe` opens everything from the disk
    and returns a comparable state (releasing what it opened without a clean shutdown)."""

    name: str
    setup: Callable[[pathlib.Path], Any]
    operation: Callable[[Any], object]
    observe: Callable[[pathlib.Path], State]
    # Whether `state` is acceptable given the states before and after (default: one of them).
    allowed: Callable[[State, State, State], bool] = lambda state, before, after: (
        state
        in (
            before,
            after,
        )
    )


# ---------------------------------------------------------------------------- partition logs
def _batch(i: int, idempotent: bool = False) -> bytes:
    records = [NewRecord(f"k{i}".encode(), b"v" * (40 + 17 * (i % 5)), NOW_MS + i)]
    if not idempotent:
        return encode_batch(records)
    return encode_batch(records, producer_id=PRODUCER_ID, producer_epoch=0, base_sequence=i // 2)


def _fill(plog: PartitionLog, batches: int) -> None:
    for i in range(batches):
        # Every other batch is idempotent, so producer snapshots have an entry to keep.
        plog.append(_batch(i, idempotent=i % 2 == 1), NOW_MS + i)
    plog.flush()


def _debris(directory: pathlib.Path) -> list[str]:
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


def _log_state(directory: pathlib.Path, config: LogConfig) -> State:
    """Segments, offsets, every record, and whether the producer's last batch is still
    recognised as a duplicate (the producer state survived)."""
    plog = PartitionLog.open(directory, config)
    try:
        assert _debris(directory) == []
        records: list[tuple[int, bytes | None, bytes | None]] = []
        offset = plog.log_start_offset
        while offset < plog.log_end_offset:
            data, offset = plog.read_batches(offset, 1 << 20)
            records.extend((r.offset, r.key, r.value) for r in decode_records(data))
        entry = plog.producer_state(PRODUCER_ID)
        last = None if entry is None or not entry.batches else entry.batches[-1][:4]
        segments = tuple(sorted(n for n in os.listdir(directory) if n.endswith(".log")))
        return (segments, plog.log_start_offset, plog.log_end_offset, tuple(records), last)
    finally:
        plog.abandon()


def _roll_scenario(policy: FsyncPolicy) -> Scenario:
    config = dataclasses.replace(LOG_CONFIG, fsync=policy)

    def setup(root: pathlib.Path) -> PartitionLog:
        plog = PartitionLog.open(root / "p", config)
        _fill(plog, 5)  # below one segment: the roll seals it
        return plog

    def operation(plog: PartitionLog) -> None:
        plog.roll()
        plog.flush()  # waits for the sealed segment's fsync that runs behind the roll

    return Scenario(
        f"segment roll, fsync {policy}", setup, operation, lambda r: _log_state(r / "p", config)
    )


def _retention_scenario() -> Scenario:
    config = dataclasses.replace(LOG_CONFIG, retention_bytes=1500)

    def setup(root: pathlib.Path) -> PartitionLog:
        plog = PartitionLog.open(root / "p", config)
        _fill(plog, 40)
        assert plog.segment_count >= 5
        return plog

    def operation(plog: PartitionLog) -> None:
        assert plog.apply_retention(NOW_MS) >= 3

    return Scenario("retention delete", setup, operation, lambda r: _log_state(r / "p", config))


# ---------------------------------------------------------------------------- the catalog
def _catalog_state(root: pathlib.Path) -> State:
    """Topics, and the files of every directory of the data directory (partition data
    included: a delete must not leave a topic with part of its files)."""
    data = root / "data"
    catalog = Catalog.open(data)
    topics = tuple((m.name, m.partitions, tuple(sorted(m.config.items()))) for m in catalog.list())
    files = tuple(
        (name, tuple(sorted(os.listdir(data / name)))) for name in sorted(os.listdir(data))
    )
    return topics, files


def _catalog_scenario(name: str, operation: Callable[[Catalog], object]) -> Scenario:
    def setup(root: pathlib.Path) -> Catalog:
        catalog = Catalog.open(root / "data")
        catalog.create_topic("keep", 1)
        catalog.create_topic("grow", 2, {"retention_ms": 1000})
        for partition in range(2):  # data in the partitions a delete removes
            plog = PartitionLog.open(catalog.partition_dir("grow", partition), LOG_CONFIG)
            _fill(plog, 3)
            plog.close()
        return catalog

    return Scenario(name, setup, operation, _catalog_state)


# ---------------------------------------------------------------------------- offset commits
def _offsets_state(root: pathlib.Path) -> State:
    store = OffsetStore.open(root, NOW_MS, OFFSETS_CONFIG)
    try:
        offsets = tuple(
            (
                group,
                tuple(sorted((tp, c.offset, c.metadata) for tp, c in store.fetch(group).items())),
            )
            for group in store.groups()
        )
        return offsets, store._log.log_start_offset
    finally:
        store._log.abandon()


def _offsets_allowed(state: State, before: State, after: State) -> bool:
    offsets, start = state
    return offsets in (before[0], after[0]) and bool(before[1] <= start <= after[1])


def _commit_scenario(snapshot: bool) -> Scenario:
    def setup(root: pathlib.Path) -> OffsetStore:
        store = OffsetStore.open(root, NOW_MS, OFFSETS_CONFIG)
        for i in range(12):
            store.commit("g", {("t", i % 3): (i, f"m{i}")}, NOW_MS + i)
        store.commit("h", {("t", 0): (5, "")}, NOW_MS)
        return store

    def operation(store: OffsetStore) -> None:
        # One commit of three partitions; with `snapshot` it crosses the snapshot interval,
        # so the store also writes snapshot.json, rolls its log and deletes the old segments.
        store.commit("g", {("t", 0): (100, "a"), ("t", 1): (101, "b"), ("u", 0): (1, "")}, NOW_MS)

    name = "offset commit" + (" with snapshot and compaction" if snapshot else "")
    return Scenario(name, setup, operation, _offsets_state, _offsets_allowed)


SCENARIOS = {
    "roll-always": lambda: _roll_scenario(FsyncPolicy.ALWAYS),
    "roll-never": lambda: _roll_scenario(FsyncPolicy.NEVER),
    "create-topic": lambda: _catalog_scenario(
        "topic creation", lambda c: c.create_topic("t", 3, {"retention_ms": 5})
    ),
    "add-partitions": lambda: _catalog_scenario(
        "metadata rewrite (add partitions)", lambda c: c.add_partitions("grow", 4)
    ),
    "delete-topic": lambda: _catalog_scenario("topic delete", lambda c: c.delete_topic("grow")),
    "commit": lambda: _commit_scenario(snapshot=False),
    "commit-snapshot": lambda: _commit_scenario(snapshot=True),
    "retention": _retention_scenario,
}


# ---------------------------------------------------------------------------- the harness
def _run(
    scenario: Scenario, root: pathlib.Path, crash_after: int | None, rng: random.Random, keep: Keep
) -> tuple[State, State, SimDisk]:
    """Set up, run the operation with the power lost after step `crash_after` of it (0: do
    not run it; None: after the whole of it), reopen and observe twice (the second time after
    one more power loss that keeps nothing un-fsynced)."""
    root.mkdir()
    sim = SimDisk(root)
    with installed(sim):
        handle = scenario.setup(root)
        start = sim.steps
        sim.trace.clear()
        sim.tracing = True
        if crash_after is not None:
            sim.crash_after = start + crash_after
        try:
            if crash_after != 0:
                scenario.operation(handle)
        except (SimulatedCrash, StorageError):
            assert sim.dead, "the operation failed without a crash"
        if crash_after:
            assert sim.dead, f"the operation has fewer than {crash_after} steps now"
        sim.tracing = False  # the trace holds the operation's steps
        sim.power_cycle(rng, keep)
        first = scenario.observe(root)
        sim.power_cycle(rng, "none")
        second = scenario.observe(root)
    return first, second, sim


@pytest.mark.parametrize("key", list(SCENARIOS))
def test_a_crash_at_any_step_leaves_the_state_before_or_after(
    key: str,
    tmp_path: pathlib.Path,
    seed: int,
    long_run: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scenario = SCENARIOS[key]()
    if key == "commit-snapshot":
        monkeypatch.setattr(_offsets, "SNAPSHOT_EVERY_RECORDS", 16)  # the 16th record
    rng = random.Random(seed)
    before, again, _ = _run(scenario, tmp_path / "before", 0, rng, "none")
    assert before == again
    after, again, counted = _run(scenario, tmp_path / "after", None, rng, "none")
    assert after == again
    assert before != after, "the operation changed nothing one can observe"
    steps = len(counted.trace)
    print(f"{scenario.name}: {steps} steps: {counted.trace}")
    randomly: list[Keep] = ["random"] * (8 if long_run else 1)
    ways: list[Keep] = ["none", "all", *randomly]
    for k in range(1, steps + 1):
        for n, keep in enumerate(ways):
            where = (
                f"{scenario.name}: crash after step {k} of {steps} ({counted.trace[k - 1]}), {keep}"
            )
            first, second, _ = _run(scenario, tmp_path / f"k{k}-{n}", k, rng, keep)
            assert scenario.allowed(first, before, after), f"{where}: a mix: {first}"
            if k == steps:
                assert first == after, f"{where}: not durable on return: {first}"
            assert second == first, f"{where}: a second crash changed the state: {second}"
