"""Share groups in the broker: members, settings, and one window per share-partition, together.

The window (share/_window.py) is the state machine of one share-partition and knows no
logs, clocks or threads; the store (share/_state.py) keeps window states and settings
durable in the internal log __share_group_state; this module reads the topics' logs to fill
windows and serve records, keeps members alive, dead-letters archived records, and
serialises everything with one lock. No grpc here: the servicer (_share_service.py) only
translates. The protocol and its guarantees are written down in proto/riverlog/v1/share.proto.

Work per request, not per record in Python: acquiring and acknowledging are numpy work on
the window; records are served as the stored batches (the client keeps the acquired
offsets). Per-record Python work happens only for batches that carry a deliver-at header (or
are compressed: their records section must be opened to look), and for dead letters.

Durability, step by step:
  - acknowledgements: applied to the window under the lock, written to the state log, then
    fsynced (outside the lock, so concurrent requests share one fsync) before the answer;
  - acquisitions: written to the state log without an fsync (delivery counts), made durable
    by the next fsync;
  - dead letters: produced (fsynced) to the dead-letter topic BEFORE the state that archives
    them is written, so an archived record is never missing from the dead-letter topic (a
    crash between the two may produce it twice: at-least-once);
  - each share-partition's state is a snapshot followed by deltas; a snapshot is written
    every DELTAS_PER_SNAPSHOT deltas, so replay on start stays short.

Where a new share-partition starts: the group's `start` ("latest" by default, Kafka's
share.auto.offset.reset) when the group first sees the topic; partitions added to a topic
the group already reads start at the log start offset (everything in them is new). When
retention deletes records the window has not finished, the window jumps to the log start.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from storage import (
    Compression,
    InvalidConfigError,
    LimitExceededError,
    NewRecord,
    StorageError,
    TopicExistsError,
    decode_batch,
    read_header,
    validate_topic_name,
)

from ._broker import Broker, FetchQuery, InvalidRequestError, OffsetQuery, UnknownPartitionError
from ._groups import ResetSpec
from ._headers import DELIVER_AT_HEADER, DLQ_HEADERS
from .groups._coordinator import (
    GroupNotEmptyError,
    UnknownGroupError,
    UnknownMemberError,
    check_group_id,
)
from .share._state import ShareStateStore, StateEntry, StateKind
from .share._window import (
    AckType,
    Acquired,
    Archived,
    Refused,
    ShareWindow,
    WindowCounts,
    WindowSettings,
)

log = logging.getLogger("riverlog.share")

# ---------------------------------------------------------------------------- limits
LOCK_MS_DEFAULT = 30_000
LOCK_MS_MIN = 1_000
LOCK_MS_MAX = 3_600_000
MAX_DELIVERY_ATTEMPTS_DEFAULT = 5
MAX_DELIVERY_ATTEMPTS_MAX = 100
RETRY_BACKOFF_MS_DEFAULT = 1_000
RETRY_BACKOFF_MAX_MS_DEFAULT = 60_000
RETRY_BACKOFF_MS_MAX = 3_600_000
# Records in flight per share-partition (Kafka's group.share.partition.max.record.locks is
# 2,000 too). Each costs ~25 bytes of window.
MAX_IN_FLIGHT_DEFAULT = 2_000
MAX_IN_FLIGHT_MAX = 100_000
MEMBERS_PER_GROUP_MAX = 1_000
TOPICS_PER_MEMBER_MAX = 1_000
ACKS_PER_REQUEST_MAX = 10_000
ACK_RANGE_MAX = 10_000
ERROR_BYTES_MAX = 1_024
MAX_RECORDS_DEFAULT = 500
MAX_RECORDS_MAX = 10_000
FETCH_WAIT_MS_MAX = 30_000
FETCH_BYTES_DEFAULT = 1024 * 1024
FETCH_BYTES_MAX = 64 * 1024 * 1024
SESSION_TIMEOUT_MS_DEFAULT = 45_000
SESSION_TIMEOUT_MS_MIN = 1_000
SESSION_TIMEOUT_MS_MAX = 300_000
HEARTBEAT_INTERVAL_MS_MAX = 5_000
# A share-partition's deltas between snapshots (the store keeps them until the next one).
DELTAS_PER_SNAPSHOT = 32
# State entries queued before a request that only acquires waits for the writer.
PENDING_MAX = 10_000
# One store write (one batch, crash-atomic) holds at most this much.
WRITE_CHUNK_BYTES = 4 * 1024 * 1024
WRITE_CHUNK_ENTRIES = 1_000
# Bytes read per step while looking for deliver-at headers.
SCAN_READ_BYTES = 1024 * 1024
# A waiting fetch re-checks its member and the clock at least this often.
WAIT_CHECK_S = 0.5

_DELIVER_AT_NEEDLE = DELIVER_AT_HEADER.encode()

Start = Literal["earliest", "latest"]
TP = tuple[str, int]


# ---------------------------------------------------------------------------- settings
@dataclass(frozen=True, slots=True)
class ShareSettings:
    lock_ms: int = LOCK_MS_DEFAULT
    max_delivery_attempts: int = MAX_DELIVERY_ATTEMPTS_DEFAULT
    dead_letter_topic: str = ""
    start: Start = "latest"
    retry_backoff_ms: int = RETRY_BACKOFF_MS_DEFAULT
    retry_backoff_max_ms: int = RETRY_BACKOFF_MAX_MS_DEFAULT

    def changed(self, changes: dict[str, Any]) -> ShareSettings:
        """These settings with `changes` (field -> value) applied and checked."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidConfigError(f"unknown share group settings: {sorted(unknown)}")
        new = dataclasses.replace(self, **changes)
        new.check()
        return new

    def check(self) -> None:
        _bounded("lock_ms", self.lock_ms, LOCK_MS_MIN, LOCK_MS_MAX)
        _bounded("max_delivery_attempts", self.max_delivery_attempts, 1, MAX_DELIVERY_ATTEMPTS_MAX)
        _bounded("retry_backoff_ms", self.retry_backoff_ms, 0, RETRY_BACKOFF_MS_MAX)
        _bounded("retry_backoff_max_ms", self.retry_backoff_max_ms, 0, RETRY_BACKOFF_MS_MAX)
        if self.retry_backoff_max_ms < self.retry_backoff_ms:
            raise InvalidConfigError(
                f"retry_backoff_max_ms ({self.retry_backoff_max_ms}) is below retry_backoff_ms "
                f"({self.retry_backoff_ms})"
            )
        if self.start not in ("earliest", "latest"):
            raise InvalidConfigError(f"start must be 'earliest' or 'latest', got {self.start!r}")
        if self.dead_letter_topic:
            validate_topic_name(self.dead_letter_topic)

    def window(self, max_in_flight: int) -> WindowSettings:
        return WindowSettings(
            lock_ms=self.lock_ms,
            max_delivery_attempts=self.max_delivery_attempts,
            retry_backoff_ms=self.retry_backoff_ms,
            retry_backoff_max_ms=self.retry_backoff_max_ms,
            max_in_flight=max_in_flight,
        )

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ShareSettings:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("share group settings are not a JSON object")
        return cls().changed(doc)


def _bounded(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


# ---------------------------------------------------------------------------- results
class Ack(NamedTuple):
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    kind: AckType
    error: str = ""


class AckRefusal(NamedTuple):
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    name: str
    message: str


class FetchedPartition(NamedTuple):
    topic: str
    partition: int
    data: bytes
    acquired: list[Acquired]


class ShareFetchResult(NamedTuple):
    partitions: list[FetchedPartition]
    refused: list[AckRefusal]
    lock_deadline_ms: int


@dataclass(frozen=True, slots=True)
class ShareMemberInfo:
    member_id: str
    topics: list[str]
    acquired: int
    last_heartbeat_ms: int


@dataclass(frozen=True, slots=True)
class SharePartitionInfo:
    topic: str
    partition: int
    start_offset: int
    end_offset: int
    log_end_offset: int
    counts: WindowCounts
    lag: int
    archived_total: int


@dataclass(frozen=True, slots=True)
class ShareGroupInfo:
    group_id: str
    settings: ShareSettings
    members: list[ShareMemberInfo]
    partitions: list[SharePartitionInfo]

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions)


@dataclass(frozen=True, slots=True)
class ShareOffsetChange:
    partition: int
    previous: int | None
    new: int


# ---------------------------------------------------------------------------- state
class _Member:
    __slots__ = ("handle", "last_seen_ms", "member_id", "session_timeout_ms", "topics")

    def __init__(
        self, member_id: str, handle: int, topics: frozenset[str], session_ms: int, now_ms: int
    ) -> None:
        self.member_id = member_id
        self.handle = handle
        self.topics = topics
        self.session_timeout_ms = session_ms
        self.last_seen_ms = now_ms


class _Group:
    def __init__(self, group_id: str, settings: ShareSettings) -> None:
        self.group_id = group_id
        self.settings = settings
        self.members: dict[str, _Member] = {}
        self.windows: dict[TP, ShareWindow] = {}
        # Topics whose partitions the group has initialised (new partitions: earliest).
        self.topics: set[str] = set()
        self.next_handle = 0
        self.cursor = 0  # round-robin start over share-partitions, per fetch
        # Fetches waiting for records, oldest first, and a count of the signals that records
        # may be available (a fetch about to wait checks it has seen the latest). Their own
        # lock: appends signal from the producer's thread without the manager's lock.
        self.waiters: collections.deque[threading.Event] = collections.deque()
        self.waiters_lock = threading.Lock()
        self.signals = 0
        # One relay per share-partition: the broker wakes it at each append.
        self.relays: dict[TP, _Relay] = {}

    def wake_one(self) -> None:
        """Records may be available: wake the longest-waiting fetch, only it. It passes the
        signal on when it leaves records behind (baton passing), so N waiting members cost
        one wake-up per append, not N (measured: 4 members, 1,000 tasks/s, p50 from 40-50 ms
        down; see bench/share_bench.py)."""
        with self.waiters_lock:
            self.signals += 1
            while self.waiters:
                event = self.waiters.popleft()
                if not event.is_set():
                    event.set()
                    return

    def wake(self) -> None:
        """Wake every waiting fetch (topics or settings changed)."""
        with self.waiters_lock:
            self.signals += 1
            waiters, self.waiters = self.waiters, collections.deque()
        for event in waiters:
            event.set()


class _Relay(threading.Event):
    """Watches one partition for one group: the broker's append sets it (Broker.watch is
    one-shot), and it registers itself again and wakes one waiting fetch of the group."""

    def __init__(self, broker: Broker, group: _Group, tp: TP) -> None:
        super().__init__()
        self._broker = broker
        self._group = group
        self._tp = tp
        self.closed = False
        broker.watch([tp], self)

    def set(self) -> None:
        if self.closed:
            return
        self._broker.watch([self._tp], self)  # notify took it off: back on before waking
        self._group.wake_one()


class ShareGroupManager:
    """Every share group of the broker; thread-safe (one lock)."""

    def __init__(
        self,
        broker: Broker,
        store: ShareStateStore,
        clock_ms: Callable[[], int],
        *,
        max_in_flight: int = MAX_IN_FLIGHT_DEFAULT,
    ) -> None:
        if max_in_flight < 1:
            raise InvalidConfigError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._broker = broker
        self._store = store
        self._clock_ms = clock_ms
        self._max_in_flight = max_in_flight
        # Reentrant: a topic created while it is held (dead-letter topic) calls back into
        # _on_topic_change on the same thread.
        self._lock = threading.RLock()
        # State entries taken under _lock, in order, waiting to be written by _sync; _seq
        # counts entries ever queued, _durable_seq those on stable storage. Lock order:
        # _write_lock, then _lock, then the store's own lock; _sync never runs under _lock.
        self._write_lock = threading.Lock()
        self._pending: list[StateEntry] = []
        self._seq = 0
        self._written_seq = 0
        self._durable_seq = 0
        # Deltas written per share-partition since its last snapshot.
        self._deltas: dict[tuple[str, str, int], int] = {}
        self._groups: dict[str, _Group] = {}
        self._member_ids = 0
        self._load()
        broker.add_topic_listener(self._on_topic_change)

    # ------------------------------------------------------------------ load
    def _load(self) -> None:
        now_ms = self._clock_ms()
        counts = dict(self._broker.list_topics())
        gone: dict[str, list[TP]] = {}
        for group_id, state in self._store.load().items():
            try:
                settings = (
                    ShareSettings()
                    if state.config is None
                    else ShareSettings.from_json(state.config)
                )
            except (ValueError, InvalidConfigError) as e:
                raise StorageError(
                    f"share group {group_id!r}: stored settings cannot be read ({e})"
                ) from None
            group = _Group(group_id, settings)
            for (topic, partition), records in state.partitions.items():
                if partition >= counts.get(topic, 0):
                    gone.setdefault(group_id, []).append((topic, partition))
                    continue
                window = ShareWindow(0, settings.window(self._max_in_flight))
                try:
                    if records.snapshot is not None:
                        window.apply(records.snapshot)
                    for delta in records.deltas:
                        window.apply(delta)
                except ValueError as e:
                    raise StorageError(
                        f"share group {group_id!r}, {topic}-{partition}: stored state cannot "
                        f"be read ({e})"
                    ) from None
                group.windows[(topic, partition)] = window
                self._relay(group, (topic, partition))
                self._deltas[(group_id, topic, partition)] = len(records.deltas)
                group.topics.add(topic)
                self._follow_log_start(topic, partition, window)
                window.set_deliver_at(
                    self._deliver_at(topic, partition, window.start_offset, window.end_offset)
                )
            self._groups[group_id] = group
        for group_id, tps in gone.items():
            self._store.delete_partitions(group_id, tps, now_ms)
        log.info(
            "share groups: %d loaded, %d share-partitions",
            len(self._groups),
            sum(len(g.windows) for g in self._groups.values()),
        )

    # ------------------------------------------------------------------ members
    def heartbeat(
        self,
        group_id: str,
        member_id: str,
        topics: Sequence[str] | None,
        config: dict[str, Any] | None,
        session_timeout_ms: int,
    ) -> tuple[str, int, ShareSettings]:
        """Join (member_id "") or stay alive; returns (member id, heartbeat interval, settings)."""
        check_group_id(group_id)
        session_ms = session_timeout_ms or SESSION_TIMEOUT_MS_DEFAULT
        _bounded("session_timeout_ms", session_ms, SESSION_TIMEOUT_MS_MIN, SESSION_TIMEOUT_MS_MAX)
        wanted = None if topics is None else self._check_topics(topics)
        settings_new = ShareSettings().changed(config or {})
        if member_id == "" and group_id not in self._groups:
            # Outside the lock: creating a topic takes the broker's lock, whose topic
            # listeners take this one.
            self._create_dead_letter_topic(settings_new)
        now_ms = self._clock_ms()
        with self._lock:
            group = self._groups.get(group_id)
            if wanted is not None:
                _check_not_dead_letter(settings_new if group is None else group.settings, wanted)
            if member_id == "":
                if wanted is None:
                    raise InvalidConfigError("joining a share group names at least one topic")
                if group is None:
                    group = _Group(group_id, settings_new)
                    self._store.write_config(group_id, settings_new.to_json(), now_ms)
                    self._groups[group_id] = group
                if len(group.members) >= MEMBERS_PER_GROUP_MAX:
                    raise LimitExceededError(
                        f"share group {group_id!r} has {len(group.members)} members; the limit "
                        f"is {MEMBERS_PER_GROUP_MAX}"
                    )
                self._member_ids += 1
                member_id = f"share-{self._member_ids}-{time.monotonic_ns() % 10**9:09d}"
                member = _Member(member_id, group.next_handle, wanted, session_ms, now_ms)
                group.next_handle += 1
                group.members[member_id] = member
                log.info(
                    "share group %s: member %s joined (%s)", group_id, member_id, sorted(wanted)
                )
            else:
                member = self._member(group_id, member_id)
                member.last_seen_ms = now_ms
                member.session_timeout_ms = session_ms
                if wanted is not None:
                    member.topics = wanted
            assert group is not None
            _check_not_dead_letter(group.settings, member.topics)
            self._init_partitions(group, member.topics)
            interval = min(HEARTBEAT_INTERVAL_MS_MAX, session_ms // 3)
            settings, seq = group.settings, self._seq
        self._sync(durable=True, upto=seq)  # new share-partitions: their start is durable
        return member_id, interval, settings

    def leave(self, group_id: str, member_id: str) -> None:
        """The member leaves; the records it holds are given back (each counts as a delivery)."""
        now_ms = self._clock_ms()
        with self._lock:
            group = self._groups.get(group_id)
            member = None if group is None else group.members.get(member_id)
            if group is None or member is None:
                raise UnknownMemberError(f"member {member_id!r} is not in share group {group_id!r}")
            self._remove_member(group, member, now_ms)
            seq = self._seq
        self._sync(durable=True, upto=seq)

    def _remove_member(self, group: _Group, member: _Member, now_ms: int) -> None:
        del group.members[member.member_id]
        for tp, window in group.windows.items():
            if window.held_by(member.handle):
                self._settle(group, tp, window.release_member(member.handle, now_ms), now_ms)
        self._persist(group, group.windows.keys())
        group.wake_one()

    def expire(self) -> list[tuple[str, str]]:
        """Remove members silent past their session timeout and give back expired locks;
        returns the (group, member) removed. Called by the broker's background worker."""
        now_ms = self._clock_ms()
        removed: list[tuple[str, str]] = []
        with self._lock:
            for group in self._groups.values():
                for member in list(group.members.values()):
                    if now_ms - member.last_seen_ms > member.session_timeout_ms:
                        log.info(
                            "share group %s: member %s timed out", group.group_id, member.member_id
                        )
                        self._remove_member(group, member, now_ms)
                        removed.append((group.group_id, member.member_id))
                self._expire_locks(group, group.windows.keys(), now_ms)
            seq = self._seq
        self._sync(durable=bool(removed), upto=seq)
        return removed

    def _expire_locks(self, group: _Group, tps: Iterable[TP], now_ms: int) -> None:
        changed = False
        for tp in tps:
            window = group.windows[tp]
            due = window.next_due_ms()
            if due is not None and due <= now_ms:
                archived = window.expire(now_ms)
                self._settle(group, tp, archived, now_ms)
                changed = True
        if changed:
            self._persist(group, tps)
            group.wake_one()

    # ------------------------------------------------------------------ fetch
    def fetch(
        self,
        group_id: str,
        member_id: str,
        acks: Sequence[Ack],
        *,
        max_records: int,
        max_wait_ms: int,
        max_bytes: int,
        is_active: Callable[[], bool] = lambda: True,
    ) -> ShareFetchResult:
        """Apply `acks` (durable before return), then acquire up to `max_records` records of
        the member's topics, waiting up to `max_wait_ms` for some."""
        max_records = max_records or MAX_RECORDS_DEFAULT
        _bounded("max_records", max_records, 1, MAX_RECORDS_MAX)
        _bounded("max_wait_ms", max_wait_ms, 0, FETCH_WAIT_MS_MAX)
        budget = max_bytes or FETCH_BYTES_DEFAULT
        _bounded("max_bytes", budget, 1, FETCH_BYTES_MAX)
        refused = self.acknowledge(group_id, member_id, acks) if acks else []
        deadline = time.monotonic() + max_wait_ms / 1000
        taken: list[tuple[TP, list[Acquired]]] = []
        lock_deadline = 0
        signaled = False
        while True:
            event = threading.Event()
            now_ms = self._clock_ms()
            with self._lock:
                group = self._groups.get(group_id)
                member = self._member(group_id, member_id)
                assert group is not None
                member.last_seen_ms = now_ms
                with group.waiters_lock:
                    seen = group.signals  # a signal after this one is news for the wait
                taken = self._acquire(group, member, max_records, now_ms)
                tps = [tp for tp in group.windows if tp[0] in member.topics]
                left = any(group.windows[tp].has_available(now_ms) for tp in tps)
                due = [d for d in (group.windows[tp].next_due_ms() for tp in tps) if d is not None]
            if taken:
                if left:
                    group.wake_one()  # more than this fetch took: pass the signal on
                self._sync(durable=False, block=False)  # delivery counts: written behind
                lock_deadline = now_ms + group.settings.lock_ms
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not is_active():
                if signaled:
                    group.wake_one()  # this fetch was woken but leaves: the next one
                return ShareFetchResult([], refused, 0)
            wait_s = min(remaining, WAIT_CHECK_S)
            if due:
                wait_s = max(0.0, min(wait_s, (min(due) - now_ms) / 1000))
            with group.waiters_lock:
                if group.signals != seen:
                    signaled = True
                    continue  # something happened while this fetch looked: look again
                group.waiters.append(event)
            event.wait(wait_s)
            with group.waiters_lock:
                try:  # still queued: timed out; taken off the queue: woken
                    group.waiters.remove(event)
                    signaled = False
                except ValueError:
                    signaled = True
        parts = [self._read(tp, ranges, budget) for tp, ranges in taken]
        return ShareFetchResult(parts, refused, lock_deadline)

    def _acquire(
        self, group: _Group, member: _Member, max_records: int, now_ms: int
    ) -> list[tuple[TP, list[Acquired]]]:
        """Acquire up to `max_records` from the member's share-partitions, round-robin."""
        tps = sorted(tp for tp in group.windows if tp[0] in member.topics)
        if not tps:
            return []
        self._expire_locks(group, tps, now_ms)
        start = group.cursor % len(tps)
        group.cursor += 1
        taken: list[tuple[TP, list[Acquired]]] = []
        left = max_records
        for tp in tps[start:] + tps[:start]:
            window = group.windows[tp]
            self._fill(tp, window)
            if not window.has_available(now_ms):
                continue
            ranges = window.acquire(member.handle, left, now_ms)
            if ranges:
                taken.append((tp, ranges))
                left -= sum(r.last - r.first + 1 for r in ranges)
                if left <= 0:
                    break
        if taken:
            self._persist(group, [tp for tp, _r in taken])
        return taken

    def _fill(self, tp: TP, window: ShareWindow) -> None:
        """Extend the window over records appended since, as far as it has room."""
        try:
            end = self._follow_log_start(*tp, window)
        except StorageError:
            return  # the topic is going away; the listener drops the window
        up_to = min(end, window.end_offset + window.room())
        if up_to > window.end_offset:
            window.extend(up_to, self._deliver_at(tp[0], tp[1], window.end_offset, up_to))

    def _follow_log_start(self, topic: str, partition: int, window: ShareWindow) -> int:
        """Records below the log start are gone (retention): the window moves past them.
        Returns the log end offset."""
        log_start, log_end = self._broker.log_offsets(topic, partition)
        if window.start_offset < log_start:
            archived = window.archived_total
            log.warning(
                "share-partition %s-%d: records %d..%d were deleted by retention before the "
                "group finished them",
                topic,
                partition,
                window.start_offset,
                log_start - 1,
            )
            window.reset(log_start)
            window.archived_total = archived
        if window.end_offset > log_end:  # the log was truncated (a recovery cut it)
            window.reset(min(window.start_offset, log_end))
        return log_end

    def _deliver_at(self, topic: str, partition: int, start: int, end: int) -> dict[int, int]:
        """Offsets in [start, end) whose record carries a valid deliver-at header, with it.

        Per batch: a substring search of the stored bytes; only batches that hold the header
        name, and compressed batches, are decoded."""
        out: dict[int, int] = {}
        pos = start
        while pos < end:
            result = self._broker.read(FetchQuery(topic, partition, pos), SCAN_READ_BYTES, end)
            if result.error is not None or not result.data or result.next_offset <= pos:
                break
            data = bytes(result.data)
            at = 0
            while at < len(data):
                header = read_header(data, at)
                size = header.size
                if (
                    header.compression != Compression.NONE
                    or data.find(_DELIVER_AT_NEEDLE, at, at + size) >= 0
                ):
                    _h, records = decode_batch(data, at, at + size)
                    for r in records:
                        if start <= r.offset < end:
                            when = _header_ms(r.headers)
                            if when is not None:
                                out[r.offset] = when
                at += size
            pos = result.next_offset
        return out

    def _read(self, tp: TP, ranges: list[Acquired], budget: int) -> FetchedPartition:
        """The stored batches holding the acquired offsets (each batch once)."""
        pieces: list[bytes] = []
        pos = -1
        for r in ranges:
            at = max(r.first, pos)
            while at <= r.last:
                result = self._broker.read(FetchQuery(tp[0], tp[1], at), budget, r.last + 1)
                if result.error is not None or result.next_offset <= at:
                    break  # the topic went away: the locks expire
                pieces.append(bytes(result.data))
                at = pos = result.next_offset
        return FetchedPartition(tp[0], tp[1], b"".join(pieces), ranges)

    # ------------------------------------------------------------------ acknowledge
    def acknowledge(self, group_id: str, member_id: str, acks: Sequence[Ack]) -> list[AckRefusal]:
        """Apply acknowledgements; durable on return. Returns the refused ranges."""
        if len(acks) > ACKS_PER_REQUEST_MAX:
            raise LimitExceededError(
                f"{len(acks)} acknowledgements in one request; the limit is {ACKS_PER_REQUEST_MAX}"
            )
        for a in acks:
            if a.kind not in (AckType.ACCEPT, AckType.RELEASE, AckType.REJECT):
                raise InvalidRequestError(
                    f"acknowledgement of {a.topic}-{a.partition} has no type (ACCEPT, RELEASE "
                    "or REJECT)"
                )
            if not 0 <= a.first_offset <= a.last_offset:
                raise InvalidRequestError(
                    f"acknowledgement range {a.first_offset}..{a.last_offset} of "
                    f"{a.topic}-{a.partition} is empty or negative"
                )
            if a.last_offset - a.first_offset + 1 > ACK_RANGE_MAX:
                raise LimitExceededError(
                    f"acknowledgement range {a.first_offset}..{a.last_offset} holds more than "
                    f"{ACK_RANGE_MAX} offsets"
                )
            if len(a.error.encode()) > ERROR_BYTES_MAX:
                raise LimitExceededError(
                    f"acknowledgement error text is over {ERROR_BYTES_MAX} bytes of UTF-8"
                )
        now_ms = self._clock_ms()
        refused: list[AckRefusal] = []
        with self._lock:
            group = self._groups.get(group_id)
            member = self._member(group_id, member_id)
            assert group is not None
            member.last_seen_ms = now_ms
            touched: list[TP] = []
            for a in acks:
                tp = (a.topic, a.partition)
                window = group.windows.get(tp)
                if window is None:
                    refused.append(
                        AckRefusal(
                            *tp,
                            a.first_offset,
                            a.last_offset,
                            "NOT_ACQUIRED",
                            f"share group {group_id!r} holds no records of {a.topic}-{a.partition}",
                        )
                    )
                    continue
                outcome = window.acknowledge(
                    member.handle, a.first_offset, a.last_offset, a.kind, now_ms, a.error
                )
                refused += [_refusal(tp, r) for r in outcome.refused]
                self._settle(group, tp, outcome.archived, now_ms)
                touched.append(tp)
            self._persist(group, touched)
            if touched:
                group.wake_one()  # released records, or room in a window that moved on
            seq = self._seq
        self._sync(durable=True, upto=seq)
        return refused

    def _settle(self, group: _Group, tp: TP, archived: list[Archived], now_ms: int) -> None:
        """Produce newly archived records to the group's dead-letter topic (before their
        state is written: see the module docstring)."""
        topic = group.settings.dead_letter_topic
        if not archived or not topic:
            return
        try:
            self._broker.partition_count(topic)  # never auto-created here (lock order)
            records = self._dead_letters(tp, archived)
            if records:
                for r in self._broker.produce_records(topic, None, records, durable=True):
                    if r.error is not None:
                        raise r.error
        except StorageError as e:
            log.error(
                "share group %s: %d archived record(s) of %s-%d could not be dead-lettered to "
                "%r: %s",
                group.group_id,
                len(archived),
                tp[0],
                tp[1],
                topic,
                e,
            )

    def _dead_letters(self, tp: TP, archived: list[Archived]) -> list[NewRecord]:
        by_offset = {a.offset: a for a in archived}
        out: list[NewRecord] = []
        first, last = min(by_offset), max(by_offset)
        pos = first
        while pos <= last:
            result = self._broker.read(FetchQuery(tp[0], tp[1], pos), SCAN_READ_BYTES, last + 1)
            if result.error is not None or result.next_offset <= pos:
                break
            data = bytes(result.data)
            at = 0
            while at < len(data):
                header, records = decode_batch(data, at)
                for r in records:
                    a = by_offset.get(r.offset)
                    if a is None:
                        continue
                    values = (
                        tp[0],
                        str(tp[1]),
                        str(r.offset),
                        str(a.delivery_count),
                        a.reason,
                        a.error,
                    )
                    headers = tuple(r.headers) + tuple(
                        (k, v.encode()) for k, v in zip(DLQ_HEADERS, values, strict=True)
                    )
                    out.append(NewRecord(r.key, r.value, r.timestamp_ms, headers))
                at += header.size
            pos = result.next_offset
        return out

    # ------------------------------------------------------------------ persistence
    def _persist(self, group: _Group, tps: Iterable[TP]) -> None:
        """Queue the windows' changes for the state log (under _lock; _sync writes them)."""
        for tp in tps:
            window = group.windows.get(tp)
            if window is None:
                continue
            key = (group.group_id, *tp)
            if self._deltas.get(key, 0) >= DELTAS_PER_SNAPSHOT:
                self._queue_snapshot(group.group_id, tp, window)
                continue
            delta = window.take_delta()
            if delta is not None:
                self._pending.append(StateEntry(*key, StateKind.DELTA, delta))
                self._deltas[key] = self._deltas.get(key, 0) + 1
                self._seq += 1

    def _queue_snapshot(self, group_id: str, tp: TP, window: ShareWindow) -> None:
        self._pending.append(StateEntry(group_id, *tp, StateKind.SNAPSHOT, window.snapshot()))
        self._deltas[(group_id, *tp)] = 0
        self._seq += 1

    def _sync(self, *, durable: bool, upto: int | None = None, block: bool = True) -> None:
        """Write the queued entries in order (one store batch per WRITE_CHUNK_BYTES), then
        fsync if `durable`, unless entries up to `upto` are already as far.

        Never called under _lock: a request waiting here for another's fsync holds no lock
        the others need, and whoever writes next takes every entry queued meanwhile, so
        concurrent requests share one fsync (group commit). `block` False: give up at once
        when another request is writing (it, or the next one, takes these entries too),
        unless the queue is long (PENDING_MAX)."""
        if not self._write_lock.acquire(blocking=block or len(self._pending) >= PENDING_MAX):
            return
        try:
            with self._lock:
                target = self._seq if upto is None else upto
                if self._written_seq >= target and (not durable or self._durable_seq >= target):
                    return
                batch, self._pending = self._pending, []
                queued = self._seq
            now_ms = self._clock_ms()
            chunk: list[StateEntry] = []
            size = 0
            for entry in batch:
                chunk.append(entry)
                size += len(entry.value) + 64
                if size >= WRITE_CHUNK_BYTES or len(chunk) >= WRITE_CHUNK_ENTRIES:
                    self._store.write(chunk, durable=False, now_ms=now_ms)
                    chunk, size = [], 0
            if chunk:
                self._store.write(chunk, durable=False, now_ms=now_ms)
            self._written_seq = queued
            if durable:
                self._store.flush(now_ms)
                self._durable_seq = queued
        finally:
            self._write_lock.release()

    # ------------------------------------------------------------------ partitions
    def _init_partitions(self, group: _Group, topics: Iterable[str]) -> None:
        """Create the share-partitions of `topics` the group does not have yet."""
        counts = dict(self._broker.list_topics())
        for topic in sorted(topics):
            count = counts.get(topic, 0)
            if count == 0:
                continue
            known = topic in group.topics
            for p in range(count):
                if (topic, p) in group.windows:
                    continue
                log_start, log_end = self._broker.log_offsets(topic, p)
                start = log_end if group.settings.start == "latest" and not known else log_start
                window = ShareWindow(start, group.settings.window(self._max_in_flight))
                group.windows[(topic, p)] = window
                self._relay(group, (topic, p))
                self._queue_snapshot(group.group_id, (topic, p), window)
            group.topics.add(topic)

    def _on_topic_change(self, event: str, topic: str) -> None:
        now_ms = self._clock_ms()
        if event == "deleted":
            # Queued entries first, then the tombstones: nothing queued before the delete
            # may bring the state back.
            self._sync(durable=False)
            with self._write_lock, self._lock:
                self._drop_pending(lambda e: e.topic == topic)
                for group in self._groups.values():
                    for tp in [tp for tp in group.windows if tp[0] == topic]:
                        del group.windows[tp]
                        self._unrelay(group, tp)
                        self._deltas.pop((group.group_id, *tp), None)
                    group.topics.discard(topic)
                    group.wake()
                self._store.delete_topic(topic, now_ms)
            return
        with self._lock:
            for group in self._groups.values():
                if any(topic in m.topics for m in group.members.values()):
                    self._init_partitions(group, [topic])
                group.wake()
        self._sync(durable=True)

    def _relay(self, group: _Group, tp: TP) -> None:
        """Appends to `tp` wake one waiting fetch of `group` from now on."""
        if tp not in group.relays:
            group.relays[tp] = _Relay(self._broker, group, tp)

    @staticmethod
    def _unrelay(group: _Group, tp: TP) -> None:
        relay = group.relays.pop(tp, None)
        if relay is not None:
            relay.closed = True  # the broker drops it at the next append

    def _drop_pending(self, doomed: Callable[[StateEntry], bool]) -> None:
        """Forget queued entries of state about to be deleted (under _write_lock and _lock)."""
        self._pending = [e for e in self._pending if not doomed(e)]

    def _check_topics(self, topics: Sequence[str]) -> frozenset[str]:
        if not topics:
            raise InvalidConfigError("a share group member names at least one topic")
        if len(topics) > TOPICS_PER_MEMBER_MAX:
            raise LimitExceededError(
                f"{len(topics)} topics; a member reads at most {TOPICS_PER_MEMBER_MAX}"
            )
        for topic in topics:
            validate_topic_name(topic)
        return frozenset(topics)

    def _create_dead_letter_topic(self, settings: ShareSettings) -> None:
        name = settings.dead_letter_topic
        if name and name not in dict(self._broker.list_topics()):
            try:
                self._broker.create_topic(name, self._broker.config.auto_create_partitions)
                log.info("created dead-letter topic %r", name)
            except TopicExistsError:
                pass  # created meanwhile

    def _member(self, group_id: str, member_id: str) -> _Member:
        group = self._groups.get(group_id)
        member = None if group is None else group.members.get(member_id)
        if member is None:
            raise UnknownMemberError(
                f"member {member_id!r} is not in share group {group_id!r} (it left or timed "
                'out): rejoin with member_id ""'
            )
        return member

    def _group(self, group_id: str) -> _Group:
        group = self._groups.get(group_id)
        if group is None:
            raise UnknownGroupError(f"unknown share group {group_id!r}")
        return group

    # ------------------------------------------------------------------ admin
    def list_groups(self) -> list[tuple[str, int]]:
        with self._lock:
            return sorted((g.group_id, len(g.members)) for g in self._groups.values())

    def describe(self, group_id: str) -> ShareGroupInfo:
        now_ms = self._clock_ms()
        with self._lock:
            group = self._group(group_id)
            members = [
                ShareMemberInfo(
                    m.member_id,
                    sorted(m.topics),
                    sum(w.held_by(m.handle) for w in group.windows.values()),
                    m.last_seen_ms,
                )
                for m in group.members.values()
            ]
            parts: list[SharePartitionInfo] = []
            for (topic, p), window in sorted(group.windows.items()):
                try:
                    _start, log_end = self._broker.log_offsets(topic, p)
                except StorageError:
                    continue
                counts = window.counts(now_ms)
                lag = max(0, log_end - window.start_offset - counts.done)
                parts.append(
                    SharePartitionInfo(
                        topic,
                        p,
                        window.start_offset,
                        window.end_offset,
                        log_end,
                        counts,
                        lag,
                        window.archived_total,
                    )
                )
            return ShareGroupInfo(group_id, group.settings, members, parts)

    def alter(self, group_id: str, changes: dict[str, Any]) -> ShareSettings:
        with self._lock:
            settings = self._group(group_id).settings.changed(changes)
        self._create_dead_letter_topic(settings)  # outside the lock, as in heartbeat
        now_ms = self._clock_ms()
        with self._lock:
            group = self._group(group_id)
            settings = group.settings.changed(changes)
            _check_not_dead_letter(
                settings, group.topics.union(*(m.topics for m in group.members.values()))
            )
            self._store.write_config(group_id, settings.to_json(), now_ms)
            group.settings = settings
            for window in group.windows.values():
                window.settings = settings.window(self._max_in_flight)
            group.wake()
            return settings

    def reset_offsets(
        self,
        group_id: str,
        topic: str,
        partitions: Sequence[int],
        to: ResetSpec,
        *,
        dry_run: bool,
    ) -> list[ShareOffsetChange]:
        count = self._broker.partition_count(topic)
        chosen = list(partitions) or list(range(count))
        for p in chosen:
            if not 0 <= p < count:
                raise UnknownPartitionError(topic, p, count)
        kind, value = to
        with self._lock:
            group = self._group(group_id)
            if group.members:
                raise GroupNotEmptyError(
                    f"share group {group_id!r} has members: offsets can only be reset while it "
                    "has none"
                )
            changes: list[ShareOffsetChange] = []
            for p in chosen:
                log_start, log_end = self._broker.log_offsets(topic, p)
                if kind == "earliest":
                    new = log_start
                elif kind == "latest":
                    new = log_end
                elif kind == "timestamp":
                    (r,) = self._broker.list_offsets([OffsetQuery(topic, p, "timestamp", value)])
                    new = log_end if r.offset is None else r.offset
                elif kind == "offset":
                    new = value
                else:
                    raise InvalidRequestError("a share group's start cannot be shifted")
                window = group.windows.get((topic, p))
                previous = None if window is None else window.start_offset
                changes.append(ShareOffsetChange(p, previous, min(max(new, log_start), log_end)))
            if not dry_run:
                for c in changes:
                    window = group.windows.get((topic, c.partition))
                    if window is None:
                        window = ShareWindow(c.new, group.settings.window(self._max_in_flight))
                        group.windows[(topic, c.partition)] = window
                        self._relay(group, (topic, c.partition))
                    else:
                        window.reset(c.new)
                    self._queue_snapshot(group_id, (topic, c.partition), window)
                group.topics.add(topic)
            seq = self._seq
        if not dry_run:
            self._sync(durable=True, upto=seq)
        return changes

    def delete_group(self, group_id: str) -> None:
        now_ms = self._clock_ms()
        self._sync(durable=False)  # queued entries first, then the tombstone
        with self._write_lock, self._lock:
            group = self._group(group_id)
            if group.members:
                raise GroupNotEmptyError(
                    f"share group {group_id!r} has members; stop them (or wait for their "
                    "sessions to expire) first"
                )
            self._drop_pending(lambda e: e.group == group_id)
            self._store.delete_group(group_id, now_ms)
            del self._groups[group_id]
            for tp in list(group.relays):
                self._unrelay(group, tp)
            for key in [k for k in self._deltas if k[0] == group_id]:
                del self._deltas[key]


def _check_not_dead_letter(settings: ShareSettings, topics: Iterable[str]) -> None:
    """A group never reads its own dead-letter topic: archived records would come back."""
    if settings.dead_letter_topic and settings.dead_letter_topic in set(topics):
        raise InvalidConfigError(
            f"topic {settings.dead_letter_topic!r} is the group's dead-letter topic; the group "
            "cannot also consume it (consume it in another group)"
        )


def _refusal(tp: TP, r: Refused) -> AckRefusal:
    if r.name == "LOCK_EXPIRED":
        why = "the lock expired: the record may already be with another member"
    else:
        why = "the record is not held by this member"
    return AckRefusal(tp[0], tp[1], r.first, r.last, r.name, f"offsets {r.first}..{r.last}: {why}")


def _header_ms(headers: Iterable[tuple[str, bytes | None]]) -> int | None:
    for key, value in headers:
        if key == DELIVER_AT_HEADER and value is not None:
            try:
                when = int(value.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                return None  # not a time: delivered at once (documented)
            return when if when >= 0 else None
    return None


__all__ = [
    "DELIVER_AT_HEADER",
    "DLQ_HEADERS",
    "Ack",
    "AckRefusal",
    "ShareFetchResult",
    "ShareGroupInfo",
    "ShareGroupManager",
    "ShareSettings",
]
