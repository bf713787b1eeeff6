"""One share-partition: the window of in-flight records a share group keeps on one partition.

A share group hands each RECORD to one member at a time (KIP-932, see
proto/riverlog/v1/share.proto). Per partition the group keeps a window of in-flight records,
[start_offset, end_offset), with a state, a delivery count and (while acquired) a holder and a
lock deadline per record. This module is that window as a pure state machine: no I/O, no
threads, no clock of its own; every call that needs the time takes `now_ms`.

States and transitions:

    from        event                                        to            notes
    AVAILABLE   acquire (due, lowest offsets first)          ACQUIRED      count + 1, lock
    ACQUIRED    ACCEPT by the holder, lock live              ACKNOWLEDGED  final
    ACQUIRED    REJECT by the holder, lock live              ARCHIVED      "rejected", final
    ACQUIRED    RELEASE by the holder, lock live; expire()   AVAILABLE     due after the
                once the lock deadline passed;                             retry backoff
                release_member() (leave, session timeout)
      ...       the same, count >= max_delivery_attempts     ARCHIVED      "max-delivery-
                                                                           attempts", final

The retry backoff after the n-th delivery is min(retry_backoff_ms * 2^(n-1),
retry_backoff_max_ms). An acknowledgement the window cannot apply is refused per offset:
LOCK_EXPIRED when the member held the record but its lock deadline passed (whether or not
expire() ran since, as long as nobody acknowledged the record after that expiry: only the
last expiry of a record is remembered), NOT_ACQUIRED otherwise. ARCHIVED records are
reported (`Archived`) so the manager can dead-letter them; each record's last error (a
member's RELEASE/REJECT error, "lock expired", "member left") goes with it: a REJECT without
an error reports the record's earlier error, if any.

The window is bounded: end_offset - start_offset never exceeds `max_in_flight` (extend()
refuses more). Records past end_offset wait: a window full of unacknowledged or delayed
records stops newer ones from being handed out. That head-of-line blocking is by design; it
bounds memory at 24 bytes per window slot (state u8, delivery count u16, holder i32, expired
holder i32, deadline or due time i64, dirty flag, error id i32), at most max_in_flight
slots allocated (more only when apply() restores a larger window), plus each distinct error
text once. The start only moves forward
(except reset()): every record below it is done (ACKNOWLEDGED or ARCHIVED).

Per-record state lives in numpy arrays indexed by offset - base; acquire and acknowledge are
vector operations (Python work per call and per run of offsets, never per record). The
arrays double on demand up to max_in_flight; when the start advances, the live slots are
shifted down only once the start has moved a quarter of the capacity (amortized O(1) per
record).

Persistence. take_delta() and snapshot() encode what must survive a restart; the manager
appends those bytes to its durable log and on start replays them with apply(): the last
snapshot, then the deltas after it. What is recorded: the start offset, archived_total, and
per offset the state and delivery count (ACQUIRED written as AVAILABLE: locks are not
durable, an acquired record is available again after a restart). What is not: holders and
lock deadlines, retry backoff times (a restored record is due at once), errors, and
deliver-at times (the manager re-reads the records' headers from the log and calls
set_deliver_at()). The first take_delta() after creation or reset() returns a snapshot (kind
0): a reset may move the start back, which a delta cannot express.

Encoding (big-endian; no checksum: the log that stores these bytes has its own CRC):

    header   struct ">BBqqI", 22 bytes
      version         u8    FORMAT_VERSION (1)
      kind            u8    KIND_SNAPSHOT (0): replaces the window
                            KIND_DELTA (1): moves the start forward, sets the runs' states
      start_offset    i64
      archived_total  i64
      run count       u32
    runs     run count x 19 bytes, numpy dtype RUN_DTYPE (packed), ascending, disjoint
      first           i64   first offset of the run, >= start_offset
      last            i64   last offset (inclusive), < start_offset + IN_FLIGHT_MAX
      state           u8    AVAILABLE, ACKNOWLEDGED or ARCHIVED
      delivery count  u16   clamped to DELIVERY_COUNT_MAX

A snapshot lists every offset in [start, end) that is not AVAILABLE with count 0; a delta
lists the offsets whose state or count changed since the last take_delta()/snapshot().
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

# Delivery counts are u16 in the encoding; a count stops growing here.
DELIVERY_COUNT_MAX = 2**16 - 1
# Holders are stored as i32 (the manager numbers its members).
MEMBER_MAX = 2**31 - 1
# The largest max_in_flight: at 24 bytes a slot one window stays under 25 MiB, and a corrupt
# encoding cannot make apply() allocate more.
IN_FLIGHT_MAX = 1 << 20
# Lock durations and retry backoffs (~35 years), and the clock's range: now_ms + a duration
# never overflows the i64 times.
DURATION_MS_MAX = 1 << 40
NOW_MS_ABS_MAX = 1 << 62
assert NOW_MS_ABS_MAX + 2 * DURATION_MS_MAX < 2**63

FORMAT_VERSION = 1
KIND_SNAPSHOT = 0
KIND_DELTA = 1
# version, kind, start_offset, archived_total, run count (see the module docstring).
_HEADER = struct.Struct(">BBqqI")
RUN_DTYPE = np.dtype([("first", ">i8"), ("last", ">i8"), ("state", "u1"), ("count", ">u2")])
assert _HEADER.size == 22
assert RUN_DTYPE.itemsize == 19

REFUSED_NOT_ACQUIRED = "NOT_ACQUIRED"
REFUSED_LOCK_EXPIRED = "LOCK_EXPIRED"
REASON_REJECTED = "rejected"
REASON_MAX_DELIVERY_ATTEMPTS = "max-delivery-attempts"
ERROR_LOCK_EXPIRED = "lock expired"
ERROR_MEMBER_LEFT = "member left"

_NO_MEMBER = -1
# The time of an AVAILABLE record that is due at once (before any now_ms).
_DUE_NOW = -(2**63)
# Slots allocated by a new window (fewer when max_in_flight is smaller).
_CAPACITY_MIN = 64
# acquire() scans the window this many slots at a time and stops once it has enough.
_SCAN_CHUNK = 4096
# The error-text table is compacted once it holds more texts than this or twice the window.
_ERROR_TEXTS_MIN = 64

_Array = npt.NDArray[Any]


class State(enum.IntEnum):
    AVAILABLE = 0
    ACQUIRED = 1
    ACKNOWLEDGED = 2
    ARCHIVED = 3


class AckType(enum.IntEnum):
    """The numbers of the proto enum riverlog.v1.AckType."""

    ACCEPT = 1
    RELEASE = 2
    REJECT = 3


_AVAILABLE = int(State.AVAILABLE)
_ACQUIRED = int(State.ACQUIRED)
_ACKNOWLEDGED = int(State.ACKNOWLEDGED)
_ARCHIVED = int(State.ARCHIVED)
_DONE_MIN = _ACKNOWLEDGED  # states >= this are done
assert _ARCHIVED > _ACKNOWLEDGED > _ACQUIRED > _AVAILABLE


@dataclass(frozen=True, slots=True)
class WindowSettings:
    lock_ms: int  # lock duration of an acquisition
    max_delivery_attempts: int  # >= 1
    retry_backoff_ms: int  # >= 0; 0 = no backoff
    retry_backoff_max_ms: int  # >= retry_backoff_ms
    max_in_flight: int  # >= 1: end_offset - start_offset never exceeds it

    def __post_init__(self) -> None:
        if not 1 <= self.lock_ms <= DURATION_MS_MAX:
            raise ValueError(f"lock_ms {self.lock_ms} is not in [1, {DURATION_MS_MAX}]")
        if not 1 <= self.max_delivery_attempts <= DELIVERY_COUNT_MAX:
            raise ValueError(
                f"max_delivery_attempts {self.max_delivery_attempts} is not in "
                f"[1, {DELIVERY_COUNT_MAX}]"
            )
        if not 0 <= self.retry_backoff_ms <= DURATION_MS_MAX:
            raise ValueError(
                f"retry_backoff_ms {self.retry_backoff_ms} is not in [0, {DURATION_MS_MAX}]"
            )
        if not self.retry_backoff_ms <= self.retry_backoff_max_ms <= DURATION_MS_MAX:
            raise ValueError(
                f"retry_backoff_max_ms {self.retry_backoff_max_ms} is not in "
                f"[retry_backoff_ms {self.retry_backoff_ms}, {DURATION_MS_MAX}]"
            )
        if not 1 <= self.max_in_flight <= IN_FLIGHT_MAX:
            raise ValueError(f"max_in_flight {self.max_in_flight} is not in [1, {IN_FLIGHT_MAX}]")


class Acquired(NamedTuple):
    """An inclusive run of offsets handed out in one acquire, all with the same delivery count."""

    first: int
    last: int
    delivery_count: int


class Refused(NamedTuple):
    """An inclusive run of offsets whose acknowledgement was refused."""

    first: int
    last: int
    name: str  # REFUSED_NOT_ACQUIRED or REFUSED_LOCK_EXPIRED


class Archived(NamedTuple):
    """A record that just became ARCHIVED (the manager dead-letters it)."""

    offset: int
    delivery_count: int
    reason: str  # REASON_REJECTED or REASON_MAX_DELIVERY_ATTEMPTS
    error: str


class AckOutcome(NamedTuple):
    applied: int  # records whose state changed
    refused: list[Refused]
    archived: list[Archived]


class WindowCounts(NamedTuple):
    available: int  # AVAILABLE and due (available_at <= now)
    acquired: int
    delayed: int  # AVAILABLE but not yet due
    done: int  # ACKNOWLEDGED or ARCHIVED still inside the window


class _Decoded(NamedTuple):
    kind: int
    start_offset: int
    archived_total: int
    first: npt.NDArray[np.int64]
    last: npt.NDArray[np.int64]
    state: npt.NDArray[np.uint8]
    delivery_count: npt.NDArray[np.uint16]


class ShareWindow:
    """The in-flight records of one share-partition (see the module docstring)."""

    def __init__(self, start_offset: int, settings: WindowSettings) -> None:
        _check_offset(start_offset)
        self.settings = settings  # the manager may replace it; applies to later operations
        self.archived_total = 0  # records archived since creation or reset (persisted)
        self._allocate(max(1, min(_CAPACITY_MIN, settings.max_in_flight)))
        # The window is slots [_lo, _hi) of the arrays; slot i holds offset _base + i.
        self._base = start_offset
        self._lo = 0
        self._hi = 0
        # The latest now_ms seen: next_due_ms() reports due times after it.
        self._seen_ms = _DUE_NOW
        # Error texts by id (0 = none), and ids by text.
        self._error_texts: list[str] = [""]
        self._error_ids: dict[str, int] = {"": 0}
        # What the last take_delta()/snapshot() wrote, and whether the next must be a snapshot.
        self._written_start = start_offset
        self._written_archived = 0
        self._snapshot_pending = True

    # --- the window

    @property
    def start_offset(self) -> int:
        """Every record below is ACKNOWLEDGED or ARCHIVED; only moves forward (but reset())."""
        return self._base + self._lo

    @property
    def end_offset(self) -> int:
        """The first offset not in the window."""
        return self._base + self._hi

    def room(self) -> int:
        """How many records extend() may still add."""
        return max(0, self.settings.max_in_flight - (self._hi - self._lo))

    def extend(self, end_offset: int, deliver_at: Mapping[int, int] | None = None) -> None:
        """Add the offsets [self.end_offset, end_offset) as AVAILABLE with delivery count 0,
        due at once except those in `deliver_at` (offset -> ms), not due before that time
        (offsets of `deliver_at` outside the added range are ignored)."""
        old_end = self.end_offset
        if end_offset < old_end:
            raise ValueError(f"end offset {end_offset} is below the window's end {old_end}")
        limit = self.start_offset + self.settings.max_in_flight
        if end_offset > limit:
            raise ValueError(
                f"end offset {end_offset} exceeds the window's limit {limit} (start "
                f"{self.start_offset} + max_in_flight {self.settings.max_in_flight})"
            )
        if end_offset == old_end:
            return
        self._reserve(end_offset)
        self._init_slots(self._hi, end_offset - self._base)
        self._hi = end_offset - self._base
        if deliver_at:
            offsets, times = _mapping_arrays(deliver_at)
            keep = (offsets >= old_end) & (offsets < end_offset)
            self._time[offsets[keep] - self._base] = times[keep]

    def set_deliver_at(self, deliver_at: Mapping[int, int]) -> None:
        """After a restore: AVAILABLE records among these offsets are not due before the time."""
        if not deliver_at:
            return
        offsets, times = _mapping_arrays(deliver_at)
        keep = (offsets >= self.start_offset) & (offsets < self.end_offset)
        slots = offsets[keep] - self._base
        times = times[keep]
        keep = self._state[slots] == _AVAILABLE
        slots = slots[keep]
        self._time[slots] = np.maximum(self._time[slots], times[keep])

    def reset(self, start_offset: int) -> None:
        """Empty the window at `start_offset` (may move back: an admin reset)."""
        _check_offset(start_offset)
        self._clear(start_offset)
        self.archived_total = 0
        self._snapshot_pending = True

    # --- acquire and acknowledge

    def acquire(self, member: int, max_records: int, now_ms: int) -> list[Acquired]:
        """Hand the lowest-offset due AVAILABLE records, up to `max_records`, to `member`."""
        _check_member(member)
        if max_records < 0:
            raise ValueError(f"max_records {max_records} is negative")
        self._see(now_ms)
        if max_records == 0:
            return []
        slots = self._find_due(now_ms, max_records)
        if not slots.size:
            return []
        self._state[slots] = _ACQUIRED
        self._holder[slots] = member
        self._time[slots] = now_ms + self.settings.lock_ms
        counts = self._count[slots]
        counts += counts < DELIVERY_COUNT_MAX
        self._count[slots] = counts
        self._dirty[slots] = True
        starts, ends = _runs(slots, counts)
        firsts = (slots[starts] + self._base).tolist()
        lasts = (slots[ends] + self._base).tolist()
        return [
            Acquired(f, last, c)
            for f, last, c in zip(firsts, lasts, counts[starts].tolist(), strict=True)
        ]

    def acknowledge(
        self, member: int, first: int, last: int, kind: AckType, now_ms: int, error: str = ""
    ) -> AckOutcome:
        """Apply `kind` to the records of [first, last] that `member` holds (see the table)."""
        _check_member(member)
        if first > last:
            raise ValueError(f"acknowledged range [{first}, {last}] is empty")
        kind = AckType(kind)
        self._see(now_ms)
        start, end = self.start_offset, self.end_offset
        refused: list[Refused] = []
        archived: list[Archived] = []
        applied = 0
        if first < start:
            _add_refused(refused, first, min(last, start - 1), REFUSED_NOT_ACQUIRED)
        low, high = max(first, start), min(last, end - 1)
        if low <= high:
            i0, i1 = low - self._base, high + 1 - self._base
            held = (self._state[i0:i1] == _ACQUIRED) & (self._holder[i0:i1] == member)
            live = held & (self._time[i0:i1] > now_ms)
            if not live.all():
                expired = (held & ~live) | (~held & (self._expired_from[i0:i1] == member))
                code = np.where(live, 0, np.where(expired, 1, 2))
                starts, ends = _runs(np.arange(code.size), code)
                for s, e, c in zip(
                    starts.tolist(), ends.tolist(), code[starts].tolist(), strict=True
                ):
                    if c:
                        name = REFUSED_LOCK_EXPIRED if c == 1 else REFUSED_NOT_ACQUIRED
                        _add_refused(refused, low + s, low + e, name)
            slots = np.flatnonzero(live) + i0
            applied = slots.size
            if applied:
                self._expired_from[slots] = _NO_MEMBER
                if kind is AckType.ACCEPT:
                    self._holder[slots] = _NO_MEMBER
                    self._state[slots] = _ACKNOWLEDGED
                    self._error[slots] = 0
                    self._dirty[slots] = True
                elif kind is AckType.REJECT:
                    if error:
                        self._error[slots] = self._intern(error)
                    archived = self._archive(slots, REASON_REJECTED)
                else:
                    archived = self._give_back(slots, now_ms, error)
        if last >= end:
            _add_refused(refused, max(first, end), last, REFUSED_NOT_ACQUIRED)
        self._advance()
        return AckOutcome(applied, refused, archived)

    def expire(self, now_ms: int) -> list[Archived]:
        """Give back every ACQUIRED record whose lock deadline is <= now_ms."""
        self._see(now_ms)
        lo, hi = self._lo, self._hi
        slots = (
            np.flatnonzero((self._state[lo:hi] == _ACQUIRED) & (self._time[lo:hi] <= now_ms)) + lo
        )
        if not slots.size:
            return []
        self._expired_from[slots] = self._holder[slots]
        archived = self._give_back(slots, now_ms, ERROR_LOCK_EXPIRED)
        self._advance()
        return archived

    def release_member(self, member: int, now_ms: int) -> list[Archived]:
        """Give back every record `member` holds (it left or timed out)."""
        _check_member(member)
        self._see(now_ms)
        slots = self._held_slots(member)
        if not slots.size:
            return []
        archived = self._give_back(slots, now_ms, ERROR_MEMBER_LEFT)
        self._advance()
        return archived

    # --- queries

    def next_due_ms(self) -> int | None:
        """The earliest lock deadline of an ACQUIRED record (it may have passed: expire() is
        due), or the earliest due time of an AVAILABLE record after the latest now_ms this
        window was given; None when there is neither."""
        lo, hi = self._lo, self._hi
        state, time = self._state[lo:hi], self._time[lo:hi]
        pending = time[(state == _ACQUIRED) | ((state == _AVAILABLE) & (time > self._seen_ms))]
        return int(pending.min()) if pending.size else None

    def has_available(self, now_ms: int) -> bool:
        """Whether any AVAILABLE record is due at now_ms."""
        self._see(now_ms)
        lo, hi = self._lo, self._hi
        return bool(((self._state[lo:hi] == _AVAILABLE) & (self._time[lo:hi] <= now_ms)).any())

    def counts(self, now_ms: int) -> WindowCounts:
        self._see(now_ms)
        lo, hi = self._lo, self._hi
        state = self._state[lo:hi]
        available = state == _AVAILABLE
        due = int(np.count_nonzero(available & (self._time[lo:hi] <= now_ms)))
        available_total = int(np.count_nonzero(available))
        acquired = int(np.count_nonzero(state == _ACQUIRED))
        return WindowCounts(
            available=due,
            acquired=acquired,
            delayed=available_total - due,
            done=(hi - lo) - available_total - acquired,
        )

    def held_by(self, member: int) -> int:
        """How many records `member` holds (ACQUIRED)."""
        return int(self._held_slots(member).size)

    # --- persistence

    def take_delta(self) -> bytes | None:
        """The changes since the last take_delta()/snapshot(), or None when there are none
        (a snapshot after creation or reset())."""
        if self._snapshot_pending:
            return self.snapshot()
        lo, hi = self._lo, self._hi
        slots = np.flatnonzero(self._dirty[lo:hi]) + lo
        if (
            not slots.size
            and self.start_offset == self._written_start
            and self.archived_total == self._written_archived
        ):
            return None
        return self._write(KIND_DELTA, slots)

    def snapshot(self) -> bytes:
        """The whole window; clears the pending delta."""
        lo, hi = self._lo, self._hi
        plain = (self._state[lo:hi] == _AVAILABLE) & (self._count[lo:hi] == 0)
        data = self._write(KIND_SNAPSHOT, np.flatnonzero(~plain) + lo)
        self._snapshot_pending = False
        return data

    def apply(self, data: bytes) -> None:
        """Replay a snapshot or a delta (ValueError for bytes that are not a valid encoding).

        A snapshot replaces the window; a delta moves the start forward and sets the states of
        its runs (parts below the start are ignored). Offsets at or past end_offset extend the
        window (gaps AVAILABLE with count 0). Restored AVAILABLE records are due at once.
        """
        decoded = _decode(data)
        if decoded.kind == KIND_SNAPSHOT or decoded.start_offset >= self.end_offset:
            self._clear(decoded.start_offset)
        elif decoded.start_offset > self.start_offset:
            self._lo = decoded.start_offset - self._base
            self._maybe_compact()
        self.archived_total = decoded.archived_total
        start = self.start_offset
        keep = decoded.last >= start
        firsts = np.maximum(decoded.first[keep], start)
        lasts = decoded.last[keep]
        if firsts.size:
            end = int(lasts[-1]) + 1
            if end > self.end_offset:
                self._reserve(end)
                self._init_slots(self._hi, end - self._base)
                self._hi = end - self._base
            lengths = lasts - firsts + 1
            run_slots = np.repeat(firsts - self._base, lengths)
            run_starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
            slots = run_slots + (np.arange(run_slots.size) - run_starts)
            self._init_slots_at(slots)
            self._state[slots] = np.repeat(decoded.state[keep], lengths)
            self._count[slots] = np.repeat(decoded.delivery_count[keep], lengths)
        self._advance()
        if decoded.kind == KIND_SNAPSHOT:
            self._snapshot_pending = False
        self._written_start = self.start_offset
        self._written_archived = self.archived_total

    # --- private

    def _allocate(self, capacity: int) -> None:
        self._state: npt.NDArray[np.uint8] = np.zeros(capacity, np.uint8)
        self._count: npt.NDArray[np.uint16] = np.zeros(capacity, np.uint16)
        self._holder: npt.NDArray[np.int32] = np.zeros(capacity, np.int32)
        # The member whose lock of the record expired last (LOCK_EXPIRED), until an
        # acknowledgement of the record is applied.
        self._expired_from: npt.NDArray[np.int32] = np.zeros(capacity, np.int32)
        # ACQUIRED: the lock deadline; AVAILABLE: the due time (_DUE_NOW: at once).
        self._time: npt.NDArray[np.int64] = np.zeros(capacity, np.int64)
        # The durable (state, count) changed since the last take_delta()/snapshot().
        self._dirty: npt.NDArray[np.bool_] = np.zeros(capacity, np.bool_)
        # The record's last error, an index into _error_texts (0: none).
        self._error: npt.NDArray[np.int32] = np.zeros(capacity, np.int32)

    def _arrays(self) -> tuple[_Array, ...]:
        return (
            self._state,
            self._count,
            self._holder,
            self._expired_from,
            self._time,
            self._dirty,
            self._error,
        )

    def _init_slots(self, i0: int, i1: int) -> None:
        self._init_slots_at(slice(i0, i1))

    def _init_slots_at(self, slots: slice | _Array) -> None:
        self._state[slots] = _AVAILABLE
        self._count[slots] = 0
        self._holder[slots] = _NO_MEMBER
        self._expired_from[slots] = _NO_MEMBER
        self._time[slots] = _DUE_NOW
        self._dirty[slots] = False
        self._error[slots] = 0

    def _reserve(self, end_offset: int) -> None:
        """Make room for slots up to `end_offset`: shift the window down, then grow."""
        capacity = self._state.size
        if end_offset - self._base <= capacity:
            return
        if self._lo:
            self._compact()
        needed = end_offset - self._base
        if needed <= capacity:
            return
        new_capacity = max(needed, min(2 * capacity, self.settings.max_in_flight))
        old = self._arrays()
        self._allocate(new_capacity)
        for new_array, old_array in zip(self._arrays(), old, strict=True):
            new_array[: self._hi] = old_array[: self._hi]

    def _compact(self) -> None:
        """Shift the window to slot 0."""
        lo, hi = self._lo, self._hi
        if hi > lo:
            for array in self._arrays():
                array[: hi - lo] = array[lo:hi]
        self._base += lo
        self._lo, self._hi = 0, hi - lo

    def _maybe_compact(self) -> None:
        # Shifting costs the window's length; doing it only after the start moved a quarter of
        # the capacity makes it O(1) per record.
        if self._lo == self._hi or self._lo >= max(1, self._state.size // 4):
            self._compact()

    def _clear(self, start_offset: int) -> None:
        self._base = start_offset
        self._lo = self._hi = 0
        self._error_texts = [""]
        self._error_ids = {"": 0}

    def _advance(self) -> None:
        """Move the start past the leading done records."""
        lo, hi = self._lo, self._hi
        if lo == hi or self._state[lo] < _DONE_MIN:
            return
        pending = self._state[lo:hi] < _DONE_MIN
        first_pending = int(pending.argmax())
        self._lo = lo + first_pending if pending[first_pending] else hi
        self._maybe_compact()

    def _see(self, now_ms: int) -> None:
        if not -NOW_MS_ABS_MAX <= now_ms <= NOW_MS_ABS_MAX:
            raise ValueError(f"now_ms {now_ms} is outside [-2^62, 2^62]")
        self._seen_ms = max(self._seen_ms, now_ms)

    def _held_slots(self, member: int) -> npt.NDArray[np.intp]:
        lo, hi = self._lo, self._hi
        held = (self._state[lo:hi] == _ACQUIRED) & (self._holder[lo:hi] == member)
        return np.flatnonzero(held) + lo

    def _find_due(self, now_ms: int, max_records: int) -> npt.NDArray[np.intp]:
        """The slots of the first `max_records` due AVAILABLE records, ascending."""
        found: list[npt.NDArray[np.intp]] = []
        wanted = max_records
        i = self._lo
        while i < self._hi and wanted > 0:
            j = min(self._hi, i + _SCAN_CHUNK)
            due = (self._state[i:j] == _AVAILABLE) & (self._time[i:j] <= now_ms)
            slots = np.flatnonzero(due)[:wanted] + i
            found.append(slots)
            wanted -= slots.size
            i = j
        if len(found) == 1:
            return found[0]
        return np.concatenate(found) if found else np.zeros(0, np.intp)

    def _give_back(self, slots: _Array, now_ms: int, error: str) -> list[Archived]:
        """Released, expired or left: AVAILABLE after the retry backoff, or ARCHIVED once
        delivered max_delivery_attempts times. The durable (state, count) does not change
        for records made AVAILABLE (an ACQUIRED record is written as AVAILABLE)."""
        if error:
            self._error[slots] = self._intern(error)
        self._holder[slots] = _NO_MEMBER
        counts = self._count[slots]
        last_attempt = counts >= self.settings.max_delivery_attempts
        back = slots[~last_attempt]
        self._state[back] = _AVAILABLE
        self._time[back] = now_ms + self._backoff_ms(counts[~last_attempt])
        return self._archive(slots[last_attempt], REASON_MAX_DELIVERY_ATTEMPTS)

    def _backoff_ms(self, counts: npt.NDArray[np.uint16]) -> npt.NDArray[np.int64]:
        """min(retry_backoff_ms * 2^(count-1), retry_backoff_max_ms) per delivery count."""
        backoff, backoff_max = self.settings.retry_backoff_ms, self.settings.retry_backoff_max_ms
        if backoff == 0:
            return np.zeros(counts.size, np.int64)
        # The fewest doublings that reach the cap: shifting by at most this cannot overflow
        # (backoff << doublings < 2 * backoff_max <= 2 * DURATION_MS_MAX).
        doublings = (-(-backoff_max // backoff) - 1).bit_length()
        exponents = np.clip(counts.astype(np.int64) - 1, 0, doublings)
        return np.minimum(np.left_shift(np.int64(backoff), exponents), backoff_max)

    def _archive(self, slots: _Array, reason: str) -> list[Archived]:
        if not slots.size:
            return []
        self._state[slots] = _ARCHIVED
        self._holder[slots] = _NO_MEMBER
        self._dirty[slots] = True
        self.archived_total += int(slots.size)
        texts = self._error_texts
        archived = [
            Archived(offset, count, reason, texts[error_id])
            for offset, count, error_id in zip(
                (slots + self._base).tolist(),
                self._count[slots].tolist(),
                self._error[slots].tolist(),
                strict=True,
            )
        ]
        self._error[slots] = 0
        return archived

    def _intern(self, text: str) -> int:
        error_id = self._error_ids.get(text)
        if error_id is not None:
            return error_id
        if len(self._error_texts) >= max(_ERROR_TEXTS_MIN, 2 * (self._hi - self._lo)):
            self._compact_errors()
        error_id = len(self._error_texts)
        self._error_texts.append(text)
        self._error_ids[text] = error_id
        return error_id

    def _compact_errors(self) -> None:
        """Keep only the texts records of the window still refer to."""
        lo, hi = self._lo, self._hi
        used = np.unique(self._error[lo:hi])
        used = used[used != 0]
        remap = np.zeros(len(self._error_texts), np.int32)
        remap[used] = np.arange(1, used.size + 1, dtype=np.int32)
        self._error[lo:hi] = remap[self._error[lo:hi]]
        self._error_texts = [""] + [self._error_texts[i] for i in used.tolist()]
        self._error_ids = {text: i for i, text in enumerate(self._error_texts)}

    def _write(self, kind: int, slots: npt.NDArray[np.intp]) -> bytes:
        state = self._state[slots]
        state[state == _ACQUIRED] = _AVAILABLE  # locks are not durable
        count = self._count[slots]
        starts, ends = _runs(slots, state, count)
        runs = np.empty(starts.size, RUN_DTYPE)
        runs["first"] = slots[starts] + self._base
        runs["last"] = slots[ends] + self._base
        runs["state"] = state[starts]
        runs["count"] = count[starts]
        header = _HEADER.pack(
            FORMAT_VERSION, kind, self.start_offset, self.archived_total, starts.size
        )
        self._dirty[self._lo : self._hi] = False
        self._written_start = self.start_offset
        self._written_archived = self.archived_total
        return header + runs.tobytes()

    def _records(self) -> list[tuple[int, State, int, int, int | None]]:
        """(offset, state, delivery count, holder or -1, deadline or due time or None) per
        record of the window: for tests."""
        lo, hi = self._lo, self._hi
        return [
            (self._base + i, State(s), c, h, None if t == _DUE_NOW or s >= _DONE_MIN else t)
            for i, s, c, h, t in zip(
                range(lo, hi),
                self._state[lo:hi].tolist(),
                self._count[lo:hi].tolist(),
                self._holder[lo:hi].tolist(),
                self._time[lo:hi].tolist(),
                strict=True,
            )
        ]


def _runs(positions: _Array, *values: _Array) -> tuple[_Array, _Array]:
    """The (start, end) indices, inclusive, of the maximal runs of consecutive `positions`
    with equal `values`."""
    n = positions.size
    if not n:
        empty = np.zeros(0, np.intp)
        return empty, empty
    breaks = np.diff(positions) != 1
    for value in values:
        breaks |= value[1:] != value[:-1]
    cuts = np.flatnonzero(breaks) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts - 1, [n - 1]))
    return starts, ends


def _add_refused(refused: list[Refused], first: int, last: int, name: str) -> None:
    """Append, merging with the previous run when adjacent with the same name."""
    if refused and refused[-1].name == name and refused[-1].last + 1 == first:
        refused[-1] = Refused(refused[-1].first, last, name)
    else:
        refused.append(Refused(first, last, name))


def _mapping_arrays(mapping: Mapping[int, int]) -> tuple[npt.NDArray[np.int64], _Array]:
    offsets = np.fromiter(mapping.keys(), np.int64, len(mapping))
    times = np.fromiter(mapping.values(), np.int64, len(mapping))
    return offsets, times


def _check_offset(offset: int) -> None:
    if offset < 0:
        raise ValueError(f"offset {offset} is negative")


def _check_member(member: int) -> None:
    if not 0 <= member <= MEMBER_MAX:
        raise ValueError(f"member {member} is not in [0, {MEMBER_MAX}]")


def _decode(data: bytes) -> _Decoded:
    """Parse and check an encoding (ValueError naming what is wrong)."""
    size = len(data)
    if size < _HEADER.size:
        raise ValueError(f"share window state of {size} bytes is shorter than its header")
    version, kind, start, archived_total, run_count = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise ValueError(f"share window state version {version} is not {FORMAT_VERSION}")
    if kind not in (KIND_SNAPSHOT, KIND_DELTA):
        raise ValueError(f"share window state kind {kind} is neither snapshot nor delta")
    if start < 0 or archived_total < 0:
        raise ValueError(
            f"share window state has a negative start {start} or archived total {archived_total}"
        )
    expected = _HEADER.size + run_count * RUN_DTYPE.itemsize
    if size != expected:
        raise ValueError(
            f"share window state of {size} bytes does not hold {run_count} runs ({expected} bytes)"
        )
    runs = np.frombuffer(data, RUN_DTYPE, count=run_count, offset=_HEADER.size)
    first = runs["first"].astype(np.int64)
    last = runs["last"].astype(np.int64)
    state = runs["state"].astype(np.uint8)
    count = runs["count"].astype(np.uint16)
    if run_count:
        if (first > last).any():
            raise ValueError("share window state has a run whose first offset is past its last")
        if (first[1:] <= last[:-1]).any():
            raise ValueError("share window state has runs out of order or overlapping")
        if int(first[0]) < start:
            raise ValueError(f"share window state has a run below its start offset {start}")
        if int(last[-1]) - start >= IN_FLIGHT_MAX:
            raise ValueError(
                f"share window state reaches offset {int(last[-1])}, past start {start} + "
                f"{IN_FLIGHT_MAX}"
            )
        if ((state != _AVAILABLE) & (state != _ACKNOWLEDGED) & (state != _ARCHIVED)).any():
            raise ValueError("share window state has a run with an invalid state")
    return _Decoded(kind, start, archived_total, first, last, state, count)
