"""The share-partition window (stream/share/_window.py): transitions, refusals, the window
bound, persistence, and a stateful comparison with a plain-Python model."""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from stream.share._window import (
    DELIVERY_COUNT_MAX,
    DURATION_MS_MAX,
    ERROR_LOCK_EXPIRED,
    ERROR_MEMBER_LEFT,
    IN_FLIGHT_MAX,
    KIND_DELTA,
    KIND_SNAPSHOT,
    REASON_MAX_DELIVERY_ATTEMPTS,
    REASON_REJECTED,
    REFUSED_LOCK_EXPIRED,
    REFUSED_NOT_ACQUIRED,
    RUN_DTYPE,
    AckOutcome,
    AckType,
    Acquired,
    Archived,
    Refused,
    ShareWindow,
    State,
    WindowCounts,
    WindowSettings,
)

T0 = 1_000_000  # the fake clock's start, ms
LOCK_MS = 1_000
SETTINGS = WindowSettings(
    lock_ms=LOCK_MS,
    max_delivery_attempts=3,
    retry_backoff_ms=100,
    retry_backoff_max_ms=350,
    max_in_flight=10,
)
HEADER = struct.Struct(">BBqqI")

Record = tuple[int, State, int, int, int | None]


def window(start: int = 0, end: int = 10, **changes: int) -> ShareWindow:
    w = ShareWindow(start, replace(SETTINGS, **changes))
    w.extend(end)
    return w


def states(w: ShareWindow) -> dict[int, State]:
    return {offset: state for offset, state, *_ in w._records()}


def durable(w: ShareWindow, end: int) -> tuple[int, int, list[tuple[State, int]]]:
    """What persistence keeps: start, archived total, (state, count) of [start, end)."""
    kept = {
        offset: (State.AVAILABLE if state is State.ACQUIRED else state, count)
        for offset, state, count, _, _ in w._records()
    }
    return (
        w.start_offset,
        w.archived_total,
        [kept.get(offset, (State.AVAILABLE, 0)) for offset in range(w.start_offset, end)],
    )


def restore(log: list[bytes]) -> ShareWindow:
    w = ShareWindow(0, SETTINGS)
    for data in log:
        w.apply(data)
    return w


def encoding(kind: int, start: int, archived: int, runs: list[tuple[int, int, int, int]]) -> bytes:
    array = np.array(runs, RUN_DTYPE)
    return HEADER.pack(1, kind, start, archived, len(runs)) + array.tobytes()


# --- settings and arguments


@pytest.mark.parametrize(
    "changes",
    [
        {"lock_ms": 0},
        {"max_delivery_attempts": 0},
        {"max_delivery_attempts": DELIVERY_COUNT_MAX + 1},
        {"retry_backoff_ms": -1},
        {"retry_backoff_max_ms": 99},
        {"retry_backoff_max_ms": DURATION_MS_MAX + 1},
        {"max_in_flight": 0},
        {"max_in_flight": IN_FLIGHT_MAX + 1},
    ],
)
def test_settings_out_of_range_raise(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(changes))):
        replace(SETTINGS, **changes)


def test_bad_arguments_raise() -> None:
    w = window()
    with pytest.raises(ValueError, match="member -1"):
        w.acquire(-1, 1, T0)
    with pytest.raises(ValueError, match="max_records -1"):
        w.acquire(0, -1, T0)
    with pytest.raises(ValueError, match=r"\[5, 4\] is empty"):
        w.acknowledge(0, 5, 4, AckType.ACCEPT, T0)
    with pytest.raises(ValueError, match="is not a valid AckType"):
        w.acknowledge(0, 0, 0, 0, T0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        ShareWindow(-1, SETTINGS)
    assert w.acquire(0, 0, T0) == []


# --- acquire


def test_acquire_hands_out_lowest_offsets_in_runs_of_equal_count() -> None:
    w = window(start=100, end=110)
    assert w.acquire(1, 3, T0) == [Acquired(100, 102, 1)]
    w.acknowledge(1, 101, 101, AckType.RELEASE, T0)  # count 1, due at T0 + 100
    assert w.acquire(2, 3, T0) == [Acquired(103, 105, 1)]
    assert w.acquire(2, 10, T0 + 100) == [Acquired(101, 101, 2), Acquired(106, 109, 1)]
    assert w.acquire(3, 10, T0 + 100) == []
    assert [holder for _, _, _, holder, _ in w._records()] == [1, 2, 1] + [2] * 7
    assert w.held_by(1) == 2
    assert w.held_by(2) == 8
    assert w.held_by(3) == 0


def test_acquire_sets_lock_deadline() -> None:
    w = window(end=2)
    w.acquire(0, 1, T0)
    assert w._records()[0] == (0, State.ACQUIRED, 1, 0, T0 + LOCK_MS)


# --- acknowledge: transitions


def test_accept_acknowledges_and_start_advances() -> None:
    w = window()
    w.acquire(0, 4, T0)
    outcome = w.acknowledge(0, 1, 3, AckType.ACCEPT, T0 + 1)
    assert outcome == AckOutcome(3, [], [])
    assert w.start_offset == 0  # offset 0 is still acquired
    assert w.acknowledge(0, 0, 0, AckType.ACCEPT, T0 + 1).applied == 1
    assert w.start_offset == 4
    assert w.end_offset == 10
    assert w.counts(T0) == WindowCounts(available=6, acquired=0, delayed=0, done=0)


def test_reject_archives_with_error() -> None:
    w = window()
    w.acquire(0, 3, T0)
    outcome = w.acknowledge(0, 0, 1, AckType.REJECT, T0, "bad payload")
    assert outcome.applied == 2
    assert outcome.archived == [
        Archived(0, 1, REASON_REJECTED, "bad payload"),
        Archived(1, 1, REASON_REJECTED, "bad payload"),
    ]
    assert w.archived_total == 2
    assert w.start_offset == 2


def test_reject_without_error_reports_the_earlier_error() -> None:
    w = window()
    w.acquire(0, 1, T0)
    w.acknowledge(0, 0, 0, AckType.RELEASE, T0, "timeout talking to db")
    w.acquire(0, 1, T0 + 1_000)
    outcome = w.acknowledge(0, 0, 0, AckType.REJECT, T0 + 1_000)
    assert outcome.archived == [Archived(0, 2, REASON_REJECTED, "timeout talking to db")]


def test_release_backoff_grows_and_is_capped() -> None:
    w = window(end=1, max_delivery_attempts=10)  # backoff 100, cap 350
    now = T0
    due_times = []
    for _ in range(5):
        assert w.acquire(0, 1, now) != []
        w.acknowledge(0, 0, 0, AckType.RELEASE, now)
        (_, state, _, _, due) = w._records()[0]
        assert state is State.AVAILABLE
        assert due is not None
        assert not w.has_available(due - 1)
        assert w.acquire(0, 1, due - 1) == []
        due_times.append(due - now)
        now = due
    assert due_times == [100, 200, 350, 350, 350]


def test_no_backoff_makes_a_released_record_due_at_once() -> None:
    w = window(end=1, retry_backoff_ms=0, retry_backoff_max_ms=0)
    w.acquire(0, 1, T0)
    w.acknowledge(0, 0, 0, AckType.RELEASE, T0)
    assert w.acquire(1, 1, T0) == [Acquired(0, 0, 2)]


def test_backoff_does_not_overflow_for_large_counts() -> None:
    w = window(end=0, max_delivery_attempts=DELIVERY_COUNT_MAX, retry_backoff_ms=1)
    w.settings = replace(w.settings, retry_backoff_max_ms=DURATION_MS_MAX)
    w.apply(encoding(KIND_SNAPSHOT, 0, 0, [(0, 0, 0, 60_000)]))
    assert w.acquire(0, 1, T0) == [Acquired(0, 0, 60_001)]
    w.acknowledge(0, 0, 0, AckType.RELEASE, T0)
    assert w._records()[0][4] == T0 + DURATION_MS_MAX


def test_delivery_count_is_clamped_and_archives_at_the_maximum() -> None:
    w = window(end=0, max_delivery_attempts=DELIVERY_COUNT_MAX)
    w.apply(encoding(KIND_SNAPSHOT, 0, 0, [(0, 0, 0, DELIVERY_COUNT_MAX)]))
    assert w.acquire(0, 1, T0) == [Acquired(0, 0, DELIVERY_COUNT_MAX)]
    archived = w.acknowledge(0, 0, 0, AckType.RELEASE, T0).archived
    assert archived == [Archived(0, DELIVERY_COUNT_MAX, REASON_MAX_DELIVERY_ATTEMPTS, "")]


def test_release_archives_after_max_delivery_attempts() -> None:
    w = window(end=2)  # 3 attempts
    now = T0
    for attempt in (1, 2):
        assert w.acquire(0, 2, now) == [Acquired(0, 1, attempt)]
        outcome = w.acknowledge(0, 0, 1, AckType.RELEASE, now, f"try {attempt}")
        assert outcome == AckOutcome(2, [], [])
        now += 1_000
    assert w.acquire(0, 2, now) == [Acquired(0, 1, 3)]
    outcome = w.acknowledge(0, 0, 0, AckType.RELEASE, now)
    assert outcome.archived == [Archived(0, 3, REASON_MAX_DELIVERY_ATTEMPTS, "try 2")]
    assert w.start_offset == 1
    assert w.archived_total == 1


def test_expire_gives_back_and_archives_at_max_delivery_attempts() -> None:
    w = window(end=3, max_delivery_attempts=2)
    w.acquire(0, 2, T0)  # offsets 0, 1: deadline T0 + 1000
    assert w.expire(T0 + LOCK_MS - 1) == []
    assert w.expire(T0 + LOCK_MS) == []  # count 1 < 2: given back
    assert w.counts(T0 + LOCK_MS) == WindowCounts(available=1, acquired=0, delayed=2, done=0)
    now = T0 + LOCK_MS + 100
    assert w.acquire(1, 5, now) == [Acquired(0, 1, 2), Acquired(2, 2, 1)]
    archived = w.expire(now + LOCK_MS)
    assert archived == [
        Archived(0, 2, REASON_MAX_DELIVERY_ATTEMPTS, ERROR_LOCK_EXPIRED),
        Archived(1, 2, REASON_MAX_DELIVERY_ATTEMPTS, ERROR_LOCK_EXPIRED),
    ]
    assert w.start_offset == 2
    assert states(w) == {2: State.AVAILABLE}


def test_release_member_gives_back_its_records_only() -> None:
    w = window(end=6, max_delivery_attempts=1)
    w.acquire(0, 2, T0)
    w.acquire(1, 2, T0)
    archived = w.release_member(1, T0 + 5)
    assert archived == [
        Archived(2, 1, REASON_MAX_DELIVERY_ATTEMPTS, ERROR_MEMBER_LEFT),
        Archived(3, 1, REASON_MAX_DELIVERY_ATTEMPTS, ERROR_MEMBER_LEFT),
    ]
    assert w.held_by(0) == 2
    assert w.release_member(1, T0 + 5) == []
    w.settings = replace(w.settings, max_delivery_attempts=2)
    assert w.release_member(0, T0 + 5) == []
    assert states(w) == dict.fromkeys(range(6), State.AVAILABLE) | {
        2: State.ARCHIVED,
        3: State.ARCHIVED,
    }


# --- acknowledge: refusals


def test_refusals_not_acquired() -> None:
    w = window(start=10, end=20)
    w.acquire(0, 2, T0)  # 10, 11
    w.acquire(1, 2, T0)  # 12, 13
    w.acknowledge(0, 10, 10, AckType.ACCEPT, T0)  # start stays: 11 is held
    w.acquire(0, 1, T0)  # 14
    w.acknowledge(0, 14, 14, AckType.RELEASE, T0)
    outcome = w.acknowledge(0, 5, 25, AckType.ACCEPT, T0)
    assert outcome.applied == 1  # 11
    assert outcome.refused == [
        Refused(5, 10, REFUSED_NOT_ACQUIRED),  # below start, then done
        Refused(12, 25, REFUSED_NOT_ACQUIRED),  # other member, released, never held, past end
    ]
    assert w.start_offset == 12


def test_refusal_lock_expired_before_and_after_expire() -> None:
    w = window()
    w.acquire(0, 3, T0)
    late = T0 + LOCK_MS
    outcome = w.acknowledge(0, 0, 0, AckType.ACCEPT, late)  # deadline passed, no expire yet
    assert outcome == AckOutcome(0, [Refused(0, 0, REFUSED_LOCK_EXPIRED)], [])
    assert w.held_by(0) == 3
    w.expire(late)
    assert w.acknowledge(0, 0, 2, AckType.ACCEPT, late).refused == [
        Refused(0, 2, REFUSED_LOCK_EXPIRED)
    ]
    # Another member takes two of them: still LOCK_EXPIRED for member 0 ...
    w.acquire(1, 2, late + 100)
    assert w.acknowledge(0, 0, 3, AckType.ACCEPT, late + 100).refused == [
        Refused(0, 2, REFUSED_LOCK_EXPIRED),
        Refused(3, 3, REFUSED_NOT_ACQUIRED),
    ]
    # ... until member 1 acknowledges them.
    w.acknowledge(1, 1, 1, AckType.RELEASE, late + 100)
    assert w.acknowledge(0, 0, 2, AckType.ACCEPT, late + 100).refused == [
        Refused(0, 0, REFUSED_LOCK_EXPIRED),
        Refused(1, 1, REFUSED_NOT_ACQUIRED),
        Refused(2, 2, REFUSED_LOCK_EXPIRED),
    ]


def test_refused_acknowledgement_changes_nothing() -> None:
    w = window()
    w.acquire(0, 5, T0)
    before = w._records()
    for member, kind in [(1, AckType.ACCEPT), (1, AckType.REJECT), (2, AckType.RELEASE)]:
        outcome = w.acknowledge(member, 0, 9, kind, T0)
        assert outcome == AckOutcome(0, [Refused(0, 9, REFUSED_NOT_ACQUIRED)], [])
    assert w._records() == before
    assert w.take_delta() is not None  # the first is a snapshot
    w.acknowledge(1, 0, 9, AckType.ACCEPT, T0)
    assert w.take_delta() is None


def test_refusal_runs_alternate() -> None:
    w = window()
    w.acquire(0, 10, T0)
    w.acknowledge(0, 0, 0, AckType.RELEASE, T0)
    w.acknowledge(0, 2, 2, AckType.RELEASE, T0)
    outcome = w.acknowledge(0, 0, 4, AckType.ACCEPT, T0)
    assert outcome.applied == 3
    assert outcome.refused == [
        Refused(0, 0, REFUSED_NOT_ACQUIRED),
        Refused(2, 2, REFUSED_NOT_ACQUIRED),
    ]


# --- delays, bound, start, reset, queries


def test_deliver_at_delays_acquisition_until_due() -> None:
    w = ShareWindow(0, SETTINGS)
    w.extend(4, {1: T0 + 500, 2: T0 - 1, 7: T0 + 900})  # 7 is outside the range: ignored
    assert w.counts(T0) == WindowCounts(available=3, acquired=0, delayed=1, done=0)
    assert w.next_due_ms() == T0 + 500
    assert w.acquire(0, 10, T0) == [Acquired(0, 0, 1), Acquired(2, 3, 1)]
    assert not w.has_available(T0 + 499)
    assert w.acquire(0, 10, T0 + 499) == []
    assert w.has_available(T0 + 500)
    assert w.acquire(1, 10, T0 + 500) == [Acquired(1, 1, 1)]


def test_set_deliver_at_only_delays_available_records() -> None:
    w = window(end=4)
    w.acquire(0, 2, T0)  # 0, 1: deadline T0 + 1000
    w.acknowledge(0, 1, 1, AckType.RELEASE, T0)  # due at T0 + 100
    w.set_deliver_at({0: T0 + 5_000, 1: T0 + 50, 2: T0 + 70, 3: T0 - 10, 99: T0})
    assert [due for *_, due in w._records()] == [T0 + LOCK_MS, T0 + 100, T0 + 70, T0 - 10]
    assert w.acquire(1, 4, T0 + 69) == [Acquired(3, 3, 1)]


def test_window_bound_and_room() -> None:
    w = ShareWindow(5, SETTINGS)
    assert w.room() == 10
    w.extend(11)
    assert w.room() == 4
    with pytest.raises(ValueError, match="exceeds the window's limit 15"):
        w.extend(16)
    with pytest.raises(ValueError, match="below the window's end 11"):
        w.extend(10)
    w.extend(15)
    assert w.room() == 0
    w.extend(15)  # no-op
    w.acquire(0, 2, T0)
    w.acknowledge(0, 5, 6, AckType.ACCEPT, T0)
    assert (w.start_offset, w.end_offset, w.room()) == (7, 15, 2)
    w.settings = replace(w.settings, max_in_flight=5)
    assert w.room() == 0


def test_start_advances_only_past_leading_done_records() -> None:
    w = window()
    w.acquire(0, 10, T0)
    w.acknowledge(0, 1, 9, AckType.ACCEPT, T0)
    assert w.start_offset == 0
    assert w.counts(T0).done == 9
    w.acknowledge(0, 0, 0, AckType.REJECT, T0)
    assert (w.start_offset, w.end_offset) == (10, 10)
    assert w.counts(T0) == WindowCounts(0, 0, 0, 0)
    w.extend(20)
    assert w.acquire(0, 100, T0) == [Acquired(10, 19, 1)]


def test_long_run_through_growth_and_compaction() -> None:
    w = ShareWindow(0, replace(SETTINGS, max_in_flight=1_000, max_delivery_attempts=10))
    now = T0
    for step in range(60):
        w.extend(w.start_offset + w.settings.max_in_flight)
        runs = w.acquire(step % 4, 150, now)
        assert sum(r.last - r.first + 1 for r in runs) == 150
        # accept all but the last of each batch, which is released and redelivered later
        w.acknowledge(step % 4, runs[0].first, runs[-1].last - 1, AckType.ACCEPT, now)
        w.acknowledge(step % 4, runs[-1].last, runs[-1].last, AckType.RELEASE, now)
        now += 400  # past the backoff: the released record comes first in the next batch
    assert w.start_offset > 60 * 140
    assert w.end_offset - w.start_offset <= 1_000
    assert w.archived_total == 0
    records = w._records()
    assert [r[0] for r in records] == list(range(w.start_offset, w.end_offset))
    counts = w.counts(now)
    assert counts.acquired == 0
    assert counts.done == sum(1 for r in records if r[1] is State.ACKNOWLEDGED)


def test_reset_empties_the_window_and_may_move_back() -> None:
    w = window(start=50, end=60)
    w.acquire(0, 10, T0)
    w.acknowledge(0, 50, 54, AckType.REJECT, T0)
    assert (w.start_offset, w.archived_total) == (55, 5)
    w.take_delta()
    w.reset(20)
    assert (w.start_offset, w.end_offset, w.archived_total) == (20, 20, 0)
    assert w.held_by(0) == 0
    assert w.next_due_ms() is None
    data = w.take_delta()
    assert data is not None
    assert data[1] == KIND_SNAPSHOT  # a delta cannot move the start back
    assert restore([data]).start_offset == 20
    with pytest.raises(ValueError, match="negative"):
        w.reset(-1)


def test_next_due_ms() -> None:
    w = ShareWindow(0, SETTINGS)
    assert w.next_due_ms() is None
    w.extend(3, {2: T0 + 5_000})
    assert w.next_due_ms() == T0 + 5_000
    w.acquire(0, 1, T0)
    assert w.next_due_ms() == T0 + LOCK_MS
    w.acknowledge(0, 0, 0, AckType.RELEASE, T0 + 10)
    assert w.next_due_ms() == T0 + 110  # its backoff
    assert w.has_available(T0 + 110)  # the clock has passed it: no longer pending
    assert w.next_due_ms() == T0 + 5_000
    w.acquire(1, 1, T0 + 6_000)  # offset 0, deadline T0 + 7000; offset 2 is due now
    assert w.next_due_ms() == T0 + 7_000
    assert w.counts(T0 + 8_000) == WindowCounts(available=2, acquired=1, delayed=0, done=0)
    assert w.next_due_ms() == T0 + 7_000  # a passed deadline: expire() is due


# --- persistence


def test_persistence_round_trip_of_snapshot_and_deltas() -> None:
    w = window(start=100, end=110)
    log = [w.snapshot()]
    assert w.take_delta() is None
    w.acquire(0, 6, T0)
    log.append(w.take_delta() or b"")
    w.acknowledge(0, 100, 101, AckType.ACCEPT, T0)
    w.acknowledge(0, 103, 103, AckType.REJECT, T0)
    w.acknowledge(0, 104, 104, AckType.RELEASE, T0)
    log.append(w.take_delta() or b"")
    assert w.take_delta() is None
    copy = restore(log)
    assert durable(copy, w.end_offset) == durable(w, w.end_offset)
    assert copy.start_offset == 102
    assert copy.archived_total == 1
    # ACQUIRED comes back AVAILABLE with its count, due at once; the log's tail (AVAILABLE,
    # count 0) is for the manager to extend again.
    assert copy._records() == [
        (102, State.AVAILABLE, 1, -1, None),
        (103, State.ARCHIVED, 1, -1, None),
        (104, State.AVAILABLE, 1, -1, None),
        (105, State.AVAILABLE, 1, -1, None),
    ]
    assert copy.take_delta() is None  # apply creates no pending delta
    copy.extend(110)
    copy.set_deliver_at({104: T0 + 50, 103: T0 + 50, 109: T0 + 50})
    assert copy.acquire(5, 10, T0) == [
        Acquired(102, 102, 2),
        Acquired(105, 105, 2),
        Acquired(106, 108, 1),
    ]
    # a snapshot replaces the window and clears the pending delta
    w.acknowledge(0, 102, 102, AckType.ACCEPT, T0)
    snap = w.snapshot()
    assert w.take_delta() is None
    other = window(start=0, end=5)
    other.apply(snap)
    assert durable(other, w.end_offset) == durable(w, w.end_offset)


def test_delta_moves_start_and_extends_with_gaps() -> None:
    w = ShareWindow(0, SETTINGS)
    w.apply(encoding(KIND_SNAPSHOT, 10, 0, []))
    assert (w.start_offset, w.end_offset) == (10, 10)
    w.apply(encoding(KIND_DELTA, 12, 4, [(15, 16, 2, 1), (18, 18, 0, 3)]))
    assert (w.start_offset, w.end_offset, w.archived_total) == (12, 19, 4)
    assert [(o, s, c) for o, s, c, _, _ in w._records()] == [
        (12, State.AVAILABLE, 0),
        (13, State.AVAILABLE, 0),
        (14, State.AVAILABLE, 0),
        (15, State.ACKNOWLEDGED, 1),
        (16, State.ACKNOWLEDGED, 1),
        (17, State.AVAILABLE, 0),
        (18, State.AVAILABLE, 3),
    ]
    # An old delta (start below ours) does not move the start back; its runs below are ignored.
    w.apply(encoding(KIND_DELTA, 5, 5, [(5, 8, 3, 1), (13, 13, 3, 1)]))
    assert (w.start_offset, w.archived_total) == (12, 5)
    assert w._records()[1][:3] == (13, State.ARCHIVED, 1)
    # A start past the end empties the window there; leading done records are passed.
    w.apply(encoding(KIND_DELTA, 30, 4, [(30, 31, 2, 1), (32, 32, 0, 1)]))
    assert (w.start_offset, w.end_offset) == (32, 33)


def test_snapshot_golden_bytes() -> None:
    w = window(start=7, end=10)
    w.acquire(3, 2, T0)
    w.acknowledge(3, 8, 8, AckType.ACCEPT, T0)
    assert w.snapshot().hex() == (
        "01" "00" "0000000000000007" "0000000000000000" "00000002"
        "0000000000000007" "0000000000000007" "00" "0001"
        "0000000000000008" "0000000000000008" "02" "0001"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than its header"),
        (HEADER.pack(1, 0, 0, 0, 0)[:-1], "shorter than its header"),
        (HEADER.pack(2, 0, 0, 0, 0), "version 2"),
        (HEADER.pack(1, 2, 0, 0, 0), "kind 2"),
        (HEADER.pack(1, 0, -1, 0, 0), "negative start"),
        (HEADER.pack(1, 0, 0, -1, 0), "negative"),
        (HEADER.pack(1, 0, 0, 0, 1), "does not hold 1 runs"),
        (encoding(KIND_DELTA, 0, 0, [(1, 1, 2, 1)]) + b"\0", "does not hold 1 runs"),
        (encoding(KIND_DELTA, 0, 0, [(3, 2, 2, 1)]), "first offset is past its last"),
        (encoding(KIND_DELTA, 0, 0, [(1, 3, 2, 1), (3, 4, 2, 1)]), "overlapping"),
        (encoding(KIND_DELTA, 0, 0, [(3, 4, 2, 1), (1, 2, 2, 1)]), "out of order"),
        (encoding(KIND_DELTA, 5, 0, [(4, 6, 2, 1)]), "below its start offset"),
        (encoding(KIND_DELTA, 0, 0, [(0, IN_FLIGHT_MAX, 2, 1)]), "past start"),
        (encoding(KIND_DELTA, 0, 0, [(0, 0, 1, 1)]), "invalid state"),
        (encoding(KIND_DELTA, 0, 0, [(0, 0, 4, 1)]), "invalid state"),
    ],
)
def test_bad_encodings_raise(data: bytes, message: str) -> None:
    w = window(start=3, end=6)
    before = w._records()
    with pytest.raises(ValueError, match=message):
        w.apply(data)
    assert w._records() == before


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_apply_or_raise_value_error(data: bytes) -> None:
    w = window()
    try:
        w.apply(data)
    except ValueError:
        return
    assert w.end_offset - w.start_offset <= IN_FLIGHT_MAX


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=60), st.integers(0, 80))
def test_valid_header_with_arbitrary_runs_apply_or_raise(tail: bytes, start: int) -> None:
    run_count = len(tail) // RUN_DTYPE.itemsize
    data = HEADER.pack(1, KIND_DELTA, start, 0, run_count) + tail[: run_count * 19]
    w = window()
    try:
        w.apply(data)
    except ValueError:
        return
    assert w.start_offset >= start


def test_error_texts_are_compacted() -> None:
    w = window(end=3, max_delivery_attempts=300, retry_backoff_ms=0, retry_backoff_max_ms=0)
    w.acquire(0, 3, T0)
    w.acknowledge(0, 0, 0, AckType.RELEASE, T0, "replaced")
    w.acknowledge(0, 2, 2, AckType.RELEASE, T0, "set before the compactions")
    for attempt in range(200):
        w.acquire(0, 2, T0)
        w.acknowledge(0, 0, 0, AckType.RELEASE, T0, f"error {attempt}")
        w.acknowledge(0, 1, 1, AckType.RELEASE, T0, "same")
    assert len(w._error_texts) <= 64 + 1
    w.acquire(0, 3, T0)
    outcome = w.acknowledge(0, 0, 2, AckType.REJECT, T0)
    assert [a.error for a in outcome.archived] == [
        "error 199",
        "same",
        "set before the compactions",
    ]


# --- a stateful comparison with a plain-Python model


@dataclass
class ModelRecord:
    state: State = State.AVAILABLE
    count: int = 0
    holder: int = -1
    time: int | None = None  # lock deadline (ACQUIRED) or due time (AVAILABLE); None: at once
    expired_from: int = -1
    error: str = ""


class Model:
    """The window as a dict of records, one Python step per record."""

    def __init__(self, start: int, config: WindowSettings) -> None:
        self.settings = config
        self.start = self.end = start
        self.records: dict[int, ModelRecord] = {}
        self.archived_total = 0
        self.seen: int | None = None

    def see(self, now: int) -> None:
        self.seen = now if self.seen is None else max(self.seen, now)

    def extend(self, end: int, deliver_at: Mapping[int, int]) -> None:
        for offset in range(self.end, end):
            self.records[offset] = ModelRecord(time=deliver_at.get(offset))
        self.end = end

    def due(self, record: ModelRecord, now: int) -> bool:
        return record.state is State.AVAILABLE and (record.time is None or record.time <= now)

    def acquire(self, member: int, max_records: int, now: int) -> list[Acquired]:
        self.see(now)
        picked = [o for o in range(self.start, self.end) if self.due(self.records[o], now)]
        runs: list[Acquired] = []
        for offset in picked[:max_records]:
            record = self.records[offset]
            record.state = State.ACQUIRED
            record.holder = member
            record.time = now + self.settings.lock_ms
            record.count = min(record.count + 1, DELIVERY_COUNT_MAX)
            if runs and runs[-1].last + 1 == offset and runs[-1].delivery_count == record.count:
                runs[-1] = runs[-1]._replace(last=offset)
            else:
                runs.append(Acquired(offset, offset, record.count))
        return runs

    def archive(self, offset: int, reason: str) -> Archived:
        record = self.records[offset]
        record.state = State.ARCHIVED
        record.holder = -1
        record.time = None
        self.archived_total += 1
        archived = Archived(offset, record.count, reason, record.error)
        record.error = ""
        return archived

    def give_back(self, offset: int, now: int, error: str) -> list[Archived]:
        record = self.records[offset]
        record.holder = -1
        if error:
            record.error = error
        if record.count >= self.settings.max_delivery_attempts:
            return [self.archive(offset, REASON_MAX_DELIVERY_ATTEMPTS)]
        record.state = State.AVAILABLE
        backoff = self.settings.retry_backoff_ms * 2 ** (record.count - 1)
        record.time = now + min(backoff, self.settings.retry_backoff_max_ms)
        return []

    def acknowledge(
        self, member: int, first: int, last: int, kind: AckType, now: int, error: str
    ) -> AckOutcome:
        self.see(now)
        applied = 0
        refused: list[Refused] = []
        archived: list[Archived] = []
        for offset in range(first, last + 1):
            record = self.records.get(offset) if self.start <= offset < self.end else None
            name = REFUSED_NOT_ACQUIRED
            if record is not None:
                held = record.state is State.ACQUIRED and record.holder == member
                if held and record.time is not None and record.time > now:
                    name = ""
                elif held or record.expired_from == member:
                    name = REFUSED_LOCK_EXPIRED
            if name:
                if refused and refused[-1].name == name and refused[-1].last + 1 == offset:
                    refused[-1] = refused[-1]._replace(last=offset)
                else:
                    refused.append(Refused(offset, offset, name))
                continue
            assert record is not None
            applied += 1
            record.expired_from = -1
            if kind is AckType.ACCEPT:
                record.state = State.ACKNOWLEDGED
                record.holder = -1
                record.time = None
                record.error = ""
            elif kind is AckType.REJECT:
                if error:
                    record.error = error
                archived.append(self.archive(offset, REASON_REJECTED))
            else:
                archived += self.give_back(offset, now, error)
        self.advance()
        return AckOutcome(applied, refused, archived)

    def expire(self, now: int) -> list[Archived]:
        self.see(now)
        archived: list[Archived] = []
        for offset in range(self.start, self.end):
            record = self.records[offset]
            if record.state is State.ACQUIRED and record.time is not None and record.time <= now:
                record.expired_from = record.holder
                archived += self.give_back(offset, now, ERROR_LOCK_EXPIRED)
        self.advance()
        return archived

    def release_member(self, member: int, now: int) -> list[Archived]:
        self.see(now)
        archived: list[Archived] = []
        for offset in range(self.start, self.end):
            record = self.records[offset]
            if record.state is State.ACQUIRED and record.holder == member:
                archived += self.give_back(offset, now, ERROR_MEMBER_LEFT)
        self.advance()
        return archived

    def advance(self) -> None:
        while self.start < self.end and self.records[self.start].state >= State.ACKNOWLEDGED:
            del self.records[self.start]
            self.start += 1

    def crash(self, deliver_at: Mapping[int, int]) -> None:
        """What a restart keeps: no locks, errors, expiries or backoffs; deliver-at times are
        read again."""
        for offset, record in self.records.items():
            if record.state <= State.ACQUIRED:
                record.state = State.AVAILABLE
                record.time = deliver_at.get(offset)
            record.holder = record.expired_from = -1
            record.error = ""
        self.seen = None

    def view(self) -> list[Record]:
        return [
            (o, r.state, r.count, r.holder, None if r.state >= State.ACKNOWLEDGED else r.time)
            for o, r in sorted(self.records.items())
        ]

    def next_due_ms(self) -> int | None:
        times = [
            r.time
            for r in self.records.values()
            if r.time is not None
            and (
                r.state is State.ACQUIRED
                or (r.state is State.AVAILABLE and (self.seen is None or r.time > self.seen))
            )
        ]
        return min(times) if times else None

    def counts(self, now: int) -> WindowCounts:
        self.see(now)
        records = list(self.records.values())
        available = sum(1 for r in records if self.due(r, now))
        delayed = sum(1 for r in records if r.state is State.AVAILABLE) - available
        acquired = sum(1 for r in records if r.state is State.ACQUIRED)
        return WindowCounts(
            available, acquired, delayed, len(records) - available - delayed - acquired
        )


MEMBERS = st.integers(0, 3)


@st.composite
def window_settings(draw: st.DrawFn, max_in_flight_max: int = 40) -> WindowSettings:
    backoff = draw(st.integers(0, 500))
    return WindowSettings(
        lock_ms=draw(st.sampled_from([100, 1_000, 3_000, 1])),
        max_delivery_attempts=draw(st.sampled_from([3, 2, 4, 1])),
        retry_backoff_ms=backoff,
        retry_backoff_max_ms=backoff + draw(st.integers(0, 2_000)),
        max_in_flight=draw(st.sampled_from([8, 40, max_in_flight_max, 3, 1])),
    )


class WindowMachine(RuleBasedStateMachine):
    """ShareWindow against Model, with persistence to a log and restarts from it."""

    @initialize(config=window_settings(), start=st.integers(0, 1_000), n=st.integers(1, 40))
    def init(self, config: WindowSettings, start: int, n: int) -> None:
        self.now = T0
        self.sut = ShareWindow(start, config)
        self.model = Model(start, config)
        self.log: list[bytes] = []
        self.deliver_at: dict[int, int] = {}
        self.first_offset = start
        self.entered_done: Counter[int] = Counter()
        self.done: set[int] = set()
        self.max_count: dict[int, int] = {}
        self.expiries: set[tuple[int, int]] = set()  # (offset, member) whose lock expired
        self.persist()
        self.extend(n, {})

    def persist(self) -> None:
        data = self.sut.take_delta()
        if data is not None:
            self.log.append(data)

    @rule(n=st.integers(1, 12), delays=st.dictionaries(st.integers(0, 11), st.integers(-50, 5_000)))
    def extend(self, n: int, delays: dict[int, int]) -> None:
        end = self.sut.end_offset
        limit = self.sut.start_offset + self.sut.settings.max_in_flight
        if end + n > limit:
            with pytest.raises(ValueError, match="exceeds the window's limit"):
                self.sut.extend(end + n)
        new_end = min(end + n, limit)
        deliver_at = {end + k: self.now + d for k, d in delays.items()}
        self.sut.extend(new_end, deliver_at)
        self.model.extend(new_end, deliver_at)
        self.deliver_at.update((o, t) for o, t in deliver_at.items() if o < new_end)
        self.persist()

    @rule(member=MEMBERS, max_records=st.integers(1, 8))
    def acquire(self, member: int, max_records: int) -> None:
        held = {o for o, r in self.model.records.items() if r.state is State.ACQUIRED}
        runs = self.sut.acquire(member, max_records, self.now)
        assert runs == self.model.acquire(member, max_records, self.now)
        for run in runs:
            assert held.isdisjoint(range(run.first, run.last + 1)), "acquired a held record"
        self.persist()

    def ack(self, member: int, first: int, last: int, kind: AckType, error: str) -> None:
        outcome = self.sut.acknowledge(member, first, last, kind, self.now, error)
        assert outcome == self.model.acknowledge(member, first, last, kind, self.now, error)
        self.persist()

    @rule(
        data=st.data(),
        aim=st.sampled_from(["held", "expired", "expired before"]),
        length=st.integers(1, 4),
        kind=st.sampled_from(AckType),
        error=st.sampled_from(["", "boom", "bad record"]),
    )
    def acknowledge_aimed(
        self, data: st.DataObject, aim: str, length: int, kind: AckType, error: str
    ) -> None:
        """Acknowledge by a member that holds, or held, a record (random ones rarely do)."""
        # Make something to aim at: acquire some records; let their locks expire.
        if not any(r.holder >= 0 or r.expired_from >= 0 for r in self.model.records.values()):
            self.acquire(data.draw(MEMBERS, label="member"), 4)
        if aim == "expired" and not any(r.expired_from >= 0 for r in self.model.records.values()):
            deadlines = [r.time for r in self.model.records.values() if r.holder >= 0]
            if deadlines:
                self.now = max(self.now, min(t for t in deadlines if t is not None))
                self.expire()
        records = sorted(self.model.records.items())
        if aim == "held":
            targets = [(offset, r.holder) for offset, r in records if r.holder >= 0]
        elif aim == "expired":
            targets = [(offset, r.expired_from) for offset, r in records if r.expired_from >= 0]
        else:  # an expiry since overtaken by someone's acknowledgement
            targets = sorted(self.expiries)
        if targets:
            offset, member = data.draw(st.sampled_from(targets), label="target")
            first = max(0, offset - data.draw(st.integers(0, 2), label="before"))
            self.ack(member, first, first + length - 1, kind, error)

    @rule(
        member=MEMBERS,
        first=st.integers(-4, 44),
        length=st.integers(1, 12),
        kind=st.sampled_from(AckType),
        error=st.sampled_from(["", "boom"]),
    )
    def acknowledge_anywhere(
        self, member: int, first: int, length: int, kind: AckType, error: str
    ) -> None:
        first = max(0, self.sut.start_offset + first)
        self.ack(member, first, first + length - 1, kind, error)

    @rule(dt=st.sampled_from([0, 1, 50, 99, 100, 400, 999, 1_000, 3_000, "due", "due - 1"]))
    def tick(self, dt: int | str) -> None:
        """Move the clock, or to just before or at the next deadline or due time."""
        due = self.sut.next_due_ms()
        if isinstance(dt, int):
            self.now += dt
        elif due is not None:
            self.now = max(self.now, due - (dt == "due - 1"))

    @rule()
    def expire(self) -> None:
        assert self.sut.expire(self.now) == self.model.expire(self.now)
        self.expiries.update(
            (offset, r.expired_from)
            for offset, r in self.model.records.items()
            if r.expired_from >= 0
        )
        self.persist()

    @rule(member=MEMBERS)
    def release_member(self, member: int) -> None:
        assert self.sut.release_member(member, self.now) == self.model.release_member(
            member, self.now
        )
        self.persist()

    @rule(config=window_settings(max_in_flight_max=100))
    def alter(self, config: WindowSettings) -> None:
        # max_in_flight only grows here (the window bound is checked as an invariant)
        config = replace(
            config, max_in_flight=max(config.max_in_flight, self.sut.settings.max_in_flight)
        )
        self.sut.settings = self.model.settings = config

    @rule(action=st.sampled_from(["checkpoint", "check", "restart"]))
    def persistence(self, action: str) -> None:
        """Write a snapshot, compare a window restored from the log, or restart from it."""
        if action == "checkpoint":
            self.log = [self.sut.snapshot()]
            assert self.sut.take_delta() is None
            return
        copy = restore(self.log)
        copy.settings = self.sut.settings
        end = self.sut.end_offset
        assert copy.end_offset <= end
        assert durable(copy, end) == durable(self.sut, end)
        if action == "restart":
            # the manager reads the log again: the window's records and their deliver-at times
            copy.extend(end)
            copy.set_deliver_at(self.deliver_at)
            self.sut = copy
            self.model.crash(self.deliver_at)

    @invariant()
    def matches_model(self) -> None:
        sut, model = self.sut, self.model
        assert (sut.start_offset, sut.end_offset) == (model.start, model.end)
        assert sut.archived_total == model.archived_total
        assert sut._records() == model.view()
        assert sut.next_due_ms() == model.next_due_ms()
        assert sut.counts(self.now) == model.counts(self.now)
        assert sut.has_available(self.now) == (sut.counts(self.now).available > 0)
        for member in range(4):
            expected = sum(
                1
                for r in model.records.values()
                if r.state is State.ACQUIRED and r.holder == member
            )
            assert sut.held_by(member) == expected
        assert 0 <= sut.end_offset - sut.start_offset <= sut.settings.max_in_flight
        assert sut.room() == sut.settings.max_in_flight - (sut.end_offset - sut.start_offset)

    @invariant()
    def done_once_and_counts_never_decrease(self) -> None:
        sut = self.sut
        done_now = set(range(self.first_offset, sut.start_offset))
        for offset, state, count, _, _ in sut._records():
            if state >= State.ACKNOWLEDGED:
                done_now.add(offset)
            assert count >= self.max_count.get(offset, 0), "delivery count decreased"
            self.max_count[offset] = count
        assert self.done <= done_now, "a done record came back"
        for offset in done_now - self.done:
            self.entered_done[offset] += 1
            assert self.entered_done[offset] == 1
        self.done = done_now

    def teardown(self) -> None:
        if not hasattr(self, "sut"):
            return
        # Drain: every record of the window ends ACKNOWLEDGED or ARCHIVED.
        for _ in range(3):
            self.now += 10_000_000
            assert self.sut.expire(self.now) == self.model.expire(self.now)
            runs = self.sut.acquire(0, IN_FLIGHT_MAX, self.now)
            assert runs == self.model.acquire(0, IN_FLIGHT_MAX, self.now)
            for run in runs:
                outcome = self.sut.acknowledge(0, run.first, run.last, AckType.ACCEPT, self.now)
                assert outcome.applied == run.last - run.first + 1
                self.model.acknowledge(0, run.first, run.last, AckType.ACCEPT, self.now, "")
            if self.sut.start_offset == self.sut.end_offset:
                break
        assert self.sut.start_offset == self.sut.end_offset
        self.matches_model()
        self.done_once_and_counts_never_decrease()
        every = range(self.first_offset, self.sut.end_offset)
        assert all(self.entered_done[offset] == 1 for offset in every)
        assert set(self.entered_done) == set(every)


WindowMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestWindowMachine = WindowMachine.TestCase
