"""Share groups from the client side: AsyncShareConsumer (the asyncio core) and ShareConsumer
(its thin sync facade). The protocol is riverlog.v1.Share (proto/riverlog/v1/share.proto).

Shape
-----
A share group hands each *record* to one member at a time (queue semantics); every record is
acknowledged on its own. An AsyncShareConsumer owns one grpc.aio channel and one background
task, the heartbeat task: it joins (ShareHeartbeat with member id ""), heartbeats every
`heartbeat_interval_ms` the answers ask for, and rejoins when the broker no longer knows the
member (UNKNOWN_MEMBER). Everything else happens in the user's calls:

    poll()   one ShareFetch at a time: it carries the acknowledgements queued so far and
             acquires up to `max_records` records, which poll returns. Nothing is fetched
             ahead: an acquired record's lock is ticking, so the consumer never holds a
             record the user has not asked for.
    ack() / release() / reject()
             local: queued, and sent with the next poll (or by commit()). Consecutive offsets
             of one partition with the same type and error go as one range.
    commit() sends the queued acknowledgements now (ShareAcknowledge); durable on return.
    close()  commit(), then ShareLeave: the records still held are released at once.

Delivery is at-least-once. A record comes back (delivery_count + 1) when it is released, when
its lock (`lock_ms`) expires before it is acknowledged, or when its member leaves or times out.

Refusals
--------
The broker refuses an acknowledgement per range (NOT_ACQUIRED: not held by this member;
LOCK_EXPIRED: the lock ran out first, the record may be with another member). commit()
returns the refusals of the acknowledgements it sent; refusals of those sent with poll (and of
those lost with a membership, below) are kept for `take_ack_failures()` (the last
ACK_FAILURES_MAX of them). A member the broker forgot (session timed out) rejoins under a new
member id: the records handed out under the old one are gone (the broker released them), their
queued acknowledgements become AckFailures named UNKNOWN_MEMBER, and acknowledging one of them
afterwards raises InvalidArgumentError, as for any record not handed out in the current
membership (or handed out again since: acknowledge the later delivery). Acknowledging a
record twice raises InvalidArgumentError too. A call that failed retriably (UNAVAILABLE, or
its deadline) is sent again with the same acknowledgements: if the first one was applied
after all, the second is refused NOT_ACQUIRED although the records were acknowledged.

Group settings (lock_ms, max_delivery_attempts, dead_letter_topic, start, retry_backoff_ms,
retry_backoff_max_ms) are sent with the joining heartbeat and used only by the member that
creates the group; `config` is what the group really uses (from the heartbeat answer).

Quotas: a ShareFetch answer with throttle_time_ms > 0 holds the next ShareFetch back that long
(at most THROTTLE_MS_MAX; a poll whose timeout ends first returns []); acknowledgements by
commit() and heartbeats go on meanwhile.

Bounds: one ShareFetch in flight, at most MAX_RECORDS_MAX records an answer; the records held
(handed out, not acknowledged) are forgotten HELD_GRACE_S after their lock expired; at most
ACKS_PER_REQUEST_MAX ranges per request (more go in several requests); retriable failures
(UNAVAILABLE) are retried with doubling backoff within the call's own deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Self, TypeVar

import grpc
import grpc.aio

from storage import StorageError

from .._pb import share_pb2, share_pb2_grpc
from ._admin import ShareGroupConfig, _share_group_config
from ._base import (
    EventLoopThread,
    InvalidArgumentError,
    Record,
    RiverlogError,
    TlsOptions,
    check_token,
    default_server,
    from_rpc_error,
    open_channel,
    throttle_s,
)
from ._decode import decode_fetch

log = logging.getLogger("riverlog.share")

T = TypeVar("T")

# The broker's limits (proto/riverlog/v1/share.proto).
LOCK_MS_MIN = 1_000
LOCK_MS_MAX = 3_600_000
MAX_DELIVERY_ATTEMPTS_MAX = 100
RETRY_BACKOFF_MS_MAX = 3_600_000
SESSION_TIMEOUT_MS_MIN = 1_000
SESSION_TIMEOUT_MS_MAX = 300_000
TOPICS_MAX = 1_000
MAX_RECORDS_MAX = 10_000
FETCH_WAIT_MS_MAX = 30_000
# Offsets in one acknowledged range, and ranges in one request.
ACK_RANGE_OFFSETS_MAX = 10_000
ACKS_PER_REQUEST_MAX = 10_000
# UTF-8 bytes of a release / reject reason.
ERROR_BYTES_MAX = 1_024
STARTS = ("earliest", "latest")

# Deadline of every call but ShareFetch, whose deadline is its wait plus the margin.
RPC_TIMEOUT_S = 10.0
FETCH_TIMEOUT_MARGIN_S = 10.0
# Pause after a retriable failure; doubled per failure in a row, up to the max.
RETRY_BACKOFF_S_MIN = 0.05
RETRY_BACKOFF_S_MAX = 1.0
# ShareAcknowledge calls of one batch of ranges before commit() gives up (UNAVAILABLE).
ACK_ATTEMPTS_MAX = 5
# Heartbeats at least this far apart, whatever interval an answer asks for.
HEARTBEAT_INTERVAL_S_MIN = 0.05
# Refusals kept for take_ack_failures(); older ones are dropped (and counted in the log).
ACK_FAILURES_MAX = 10_000
# A handed-out record is forgotten this long after its lock expired (by the local clock,
# from when the fetch was sent): acknowledging it until then gets the broker's LOCK_EXPIRED
# refusal, afterwards InvalidArgumentError. Bounds what an unacknowledging user makes us keep.
HELD_GRACE_S = 30.0
# How long close() lets grpc finish a fetch it cancelled before the channel goes.
CANCEL_SETTLE_S = 0.01
# Errors after which the member must rejoin.
MEMBERSHIP_GONE = frozenset({"UNKNOWN_MEMBER", "UNKNOWN_GROUP"})

ACCEPT = share_pb2.ACCEPT
RELEASE = share_pb2.RELEASE
REJECT = share_pb2.REJECT
_TYPE_NAMES: dict[int, str] = {ACCEPT: "accepted", RELEASE: "released", REJECT: "rejected"}

# A record as the broker knows it: (topic, partition, offset).
_Key = tuple[str, int, int]


class ShareRecord(NamedTuple):
    """One record handed out by a share group: Record's fields plus this delivery's number."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    # 1 for the first delivery; more when the record was released or its lock expired.
    delivery_count: int = 1


class AckFailure(NamedTuple):
    """Acknowledgements of [first_offset, last_offset] the broker did not apply.

    `name`: NOT_ACQUIRED, LOCK_EXPIRED (share.proto), UNKNOWN_MEMBER (the membership they
    were handed out in ended first), or the name of the error that failed the call."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    name: str
    message: str


class _Ack(NamedTuple):
    """One range of acknowledgements to send (share_pb2.Acknowledgement's fields)."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    type: int
    error: str


def coalesce(pending: Mapping[_Key, tuple[int, str]]) -> list[_Ack]:
    """Acknowledgements (per record: type, error) as ranges: consecutive offsets of one
    partition with the same type and error, at most ACK_RANGE_OFFSETS_MAX offsets each."""
    out: list[_Ack] = []
    run: list[Any] | None = None  # [topic, partition, first, last, type, error]
    for key in sorted(pending):
        topic, partition, offset = key
        kind, error = pending[key]
        if (
            run is not None
            and run[0] == topic
            and run[1] == partition
            and run[3] + 1 == offset
            and run[4] == kind
            and run[5] == error
            and offset - run[2] < ACK_RANGE_OFFSETS_MAX
        ):
            run[3] = offset
            continue
        if run is not None:
            out.append(_Ack(*run))
        run = [topic, partition, offset, offset, kind, error]
    if run is not None:
        out.append(_Ack(*run))
    return out


def _chunks(acks: list[_Ack]) -> list[list[_Ack]]:
    return [acks[i : i + ACKS_PER_REQUEST_MAX] for i in range(0, len(acks), ACKS_PER_REQUEST_MAX)]


def _to_pb(acks: Iterable[_Ack]) -> list[share_pb2.Acknowledgement]:
    return [
        share_pb2.Acknowledgement(
            topic=a.topic,
            partition=a.partition,
            first_offset=a.first_offset,
            last_offset=a.last_offset,
            type=a.type,  # type: ignore[arg-type]  # one of ACCEPT, RELEASE, REJECT
            error=a.error,
        )
        for a in acks
    ]


def _failures(acks: Iterable[_Ack], name: str, message: str) -> list[AckFailure]:
    return [
        AckFailure(a.topic, a.partition, a.first_offset, a.last_offset, name, message) for a in acks
    ]


def _refusals(refused: Iterable[share_pb2.AckRefusal]) -> list[AckFailure]:
    return [
        AckFailure(r.topic, r.partition, r.first_offset, r.last_offset, r.name, r.message)
        for r in refused
    ]


def select_acquired(
    records: Sequence[Record], acquired: Iterable[tuple[int, int, int]]
) -> list[ShareRecord]:
    """The records (in offset order) whose offsets lie in an acquired range
    (first_offset, last_offset, delivery_count), as ShareRecords of that delivery."""
    ranges = sorted(acquired)
    out: list[ShareRecord] = []
    i = 0
    for record in records:
        while i < len(ranges) and ranges[i][1] < record.offset:
            i += 1
        if i == len(ranges):
            break
        first, _last, count = ranges[i]
        if record.offset >= first:
            out.append(ShareRecord(*record, count))
    return out


def _check_int(name: str, value: int, low: int, high: int = sys.maxsize) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        bound = f"at least {low}" if high == sys.maxsize else f"in [{low}, {high}]"
        raise InvalidArgumentError(f"{name} must be an integer {bound}, got {value!r}")


def _check_error(error: str) -> None:
    if not isinstance(error, str):
        raise InvalidArgumentError(f"error must be a str, got {type(error).__name__}")
    size = len(error.encode())
    if size > ERROR_BYTES_MAX:
        raise InvalidArgumentError(
            f"error is {size} UTF-8 bytes; the broker keeps at most {ERROR_BYTES_MAX}"
        )


def _name(key: _Key) -> str:
    return f"{key[0]}-{key[1]} offset {key[2]}"


# ---------------------------------------------------------------------------- the core
class AsyncShareConsumer:
    """A member of share group `group`, consuming `topics` (see the module docstring).

    Group settings, sent when joining and used only if this member creates the group (the
    group's own settings win otherwise; read them from `config` after the first poll):
    lock_ms, max_delivery_attempts, dead_letter_topic (None: no dead-letter topic), start
    ("earliest" or "latest": where a new group begins), retry_backoff_ms, retry_backoff_max_ms.

    Member settings: session_timeout_ms (silence after which the broker ends the membership
    and releases its records; the heartbeat task keeps it alive, not poll), max_records
    (per poll, unless poll says), max_wait_ms (the longest one ShareFetch waits for records;
    poll sends more while its timeout lasts), auto_ack: each poll (and commit, and close)
    first accepts every record the previous poll returned that was not acked, released or
    rejected, as Kafka's implicit acknowledgement.

    Connection: token (a bearer token) and tls (TlsOptions), see stream/client/_base.py.
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        group: str,
        topics: Sequence[str],
        dead_letter_topic: str | None = None,
        max_delivery_attempts: int = 5,
        lock_ms: int = 30_000,
        start: str = "latest",
        retry_backoff_ms: int = 1_000,
        retry_backoff_max_ms: int = 60_000,
        auto_ack: bool = False,
        max_records: int = 500,
        session_timeout_ms: int = 45_000,
        max_wait_ms: int = 5_000,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        if not isinstance(group, str) or not group:
            raise InvalidArgumentError(f"group must be a non-empty str, got {group!r}")
        if isinstance(topics, str):
            raise InvalidArgumentError(f"topics must be a list of names, not the str {topics!r}")
        topics = tuple(topics)
        if not 1 <= len(topics) <= TOPICS_MAX or not all(isinstance(t, str) and t for t in topics):
            raise InvalidArgumentError(
                f"topics must be 1 to {TOPICS_MAX} non-empty names, got {list(topics)!r}"
            )
        if dead_letter_topic is not None and not isinstance(dead_letter_topic, str):
            raise InvalidArgumentError(
                f"dead_letter_topic must be a str or None, got {dead_letter_topic!r}"
            )
        if start not in STARTS:
            raise InvalidArgumentError(f"start must be 'earliest' or 'latest', got {start!r}")
        _check_int("lock_ms", lock_ms, LOCK_MS_MIN, LOCK_MS_MAX)
        _check_int("max_delivery_attempts", max_delivery_attempts, 1, MAX_DELIVERY_ATTEMPTS_MAX)
        _check_int("retry_backoff_ms", retry_backoff_ms, 0, RETRY_BACKOFF_MS_MAX)
        _check_int("retry_backoff_max_ms", retry_backoff_max_ms, 0, RETRY_BACKOFF_MS_MAX)
        _check_int("max_records", max_records, 1, MAX_RECORDS_MAX)
        _check_int(
            "session_timeout_ms", session_timeout_ms, SESSION_TIMEOUT_MS_MIN, SESSION_TIMEOUT_MS_MAX
        )
        _check_int("max_wait_ms", max_wait_ms, 0, FETCH_WAIT_MS_MAX)
        self._server = default_server(server)
        self._token = None if token is None else check_token(token)
        self._tls = tls
        self._group = group
        self._topics = topics
        self._wanted = share_pb2.ShareGroupConfig(
            lock_ms=lock_ms,
            max_delivery_attempts=max_delivery_attempts,
            dead_letter_topic=dead_letter_topic or "",
            start=start,
            retry_backoff_ms=retry_backoff_ms,
            retry_backoff_max_ms=retry_backoff_max_ms,
        )
        self._auto_ack = bool(auto_ack)
        self._max_records = max_records
        self._session_timeout_ms = session_timeout_ms
        self._max_wait_ms = max_wait_ms

        self._channel: grpc.aio.Channel | None = None
        self._stub: share_pb2_grpc.ShareAsyncStub | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._fetch_lock = asyncio.Lock()  # one ShareFetch in flight
        self._fetch_call: Any = None  # the ShareFetch in flight, for close() to cancel
        self._polling = 0
        self._throttled_until_s = 0.0  # no ShareFetch before (a fetch quota's answer)
        self._closing = False
        self._closed = False
        # A failure of the heartbeat task, raised by the next poll.
        self._error: RiverlogError | None = None

        # Membership (heartbeat task); `_generation` grows whenever it is lost.
        self._member_id = ""
        self._generation = 0
        self._config: ShareGroupConfig | None = None
        self._hb_wake = asyncio.Event()
        self._member_changed = asyncio.Event()  # joined, or the join failed for good

        # Acknowledgement state; ack() / release() / reject() may run on a user's thread (the
        # sync facade calls them directly), so it is guarded by _lock.
        self._lock = threading.Lock()
        # Handed out in this membership, not acknowledged yet: key -> (handout number,
        # delivery count).
        self._held: dict[_Key, tuple[int, int]] = {}
        # Per handout, in order: (when its locks expire, local monotonic s; number; keys).
        self._handouts: deque[tuple[float, int, list[_Key]]] = deque()
        self._handout_seq = 0
        # Acknowledged by the user, not sent yet: key -> (type, error).
        self._pending: dict[_Key, tuple[int, str]] = {}
        # Sent in a call that failed retriably: sent again first.
        self._unsent: list[_Ack] = []
        # What the last poll returned (auto_ack accepts what is still held of it).
        self._last_polled: list[_Key] = []
        self._failures: deque[AckFailure] = deque()
        self._failures_dropped = 0

    # ------------------------------------------------------------------ properties
    @property
    def closed(self) -> bool:
        return self._closed or self._closing

    @property
    def member_id(self) -> str:
        """The member id the broker gave this consumer; "" while (re)joining."""
        return self._member_id

    @property
    def config(self) -> ShareGroupConfig | None:
        """The group's settings from the last heartbeat answer (None before joining)."""
        return self._config

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        self._check_open()
        if self._channel is not None:
            return
        self._channel = open_channel(self._server, token=self._token, tls=self._tls)
        self._stub = share_pb2_grpc.ShareStub(self._channel)
        self._heartbeat_task = asyncio.get_running_loop().create_task(
            self._heartbeat_loop(), name="riverlog-share-heartbeat"
        )

    def _check_open(self) -> None:
        if self.closed:
            raise RiverlogError(f"the share consumer of group {self._group!r} is closed")

    async def close(self) -> None:
        """Send the queued acknowledgements (commit; with auto_ack, the last poll's records
        are accepted first), leave the group (the records still held are released at once),
        close the channel. Refusals of that last commit go to take_ack_failures()."""
        if self.closed:
            return
        if self._channel is None:
            self._closed = True
            return
        self._closing = True
        try:
            # A poll of another task returns at once (its acknowledgements are put back).
            if self._fetch_call is not None:
                self._fetch_call.cancel()
            self._member_changed.set()
            deadline = time.monotonic() + RPC_TIMEOUT_S
            while self._polling and time.monotonic() < deadline:
                await asyncio.sleep(CANCEL_SETTLE_S)
            if self._member_id:
                try:
                    self._record_failures(await self._commit())
                except RiverlogError as e:
                    log.warning("commit on close of group %s failed: %s", self._group, e)
            await self._stop_heartbeats()
            await self._leave()
        finally:
            self._closed = True
            await self._stop_heartbeats()
            await asyncio.sleep(CANCEL_SETTLE_S)  # grpc reports a cancelled call's end late
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ acknowledging
    def ack(self, record: ShareRecord) -> None:
        """Accept `record`: processed, never delivered again (sent with the next poll)."""
        self._queue(record, ACCEPT, "")

    def release(self, record: ShareRecord, error: str = "") -> None:
        """Give `record` back: delivered again after the group's retry backoff (this
        delivery counts; after max_delivery_attempts it is archived). `error` (at most 1,024
        UTF-8 bytes) is kept for the dead-letter headers."""
        self._queue(record, RELEASE, error)

    def reject(self, record: ShareRecord, error: str = "") -> None:
        """Never deliver `record` again: archived, and produced to the dead-letter topic when
        the group names one."""
        self._queue(record, REJECT, error)

    def _queue(self, record: ShareRecord, kind: int, error: str) -> None:
        _check_error(error)
        self._check_open()
        key = (record.topic, record.partition, record.offset)
        with self._lock:
            held = self._held.get(key)
            if held is not None and held[1] == record.delivery_count:
                del self._held[key]
                self._pending[key] = (kind, error)
                return
            queued = self._pending.get(key)
        if held is not None:
            raise InvalidArgumentError(
                f"{_name(key)} was handed out again since (delivery {held[1]}, this record is "
                f"delivery {record.delivery_count}): acknowledge the record of the later poll"
            )
        if queued is not None:
            raise InvalidArgumentError(
                f"{_name(key)} was already {_TYPE_NAMES[queued[0]]} (not sent yet)"
            )
        raise InvalidArgumentError(
            f"{_name(key)} is not held by this consumer: not handed out to member "
            f"{self._member_id or '(rejoining)'} of group {self._group!r} by a poll, or "
            "already acknowledged, or forgotten with an earlier membership or "
            f"{HELD_GRACE_S:.0f} s after its lock expired"
        )

    def take_ack_failures(self) -> list[AckFailure]:
        """The refusals of acknowledgements sent with poll (or close), and of those lost with
        a membership, since the last call; oldest first."""
        with self._lock:
            out = list(self._failures)
            self._failures.clear()
        return out

    def _record_failures(self, failures: list[AckFailure]) -> None:
        if not failures:
            return
        for f in failures:
            log.warning(
                "group %s: acknowledgement of %s-%d [%d, %d] refused %s: %s",
                self._group,
                f.topic,
                f.partition,
                f.first_offset,
                f.last_offset,
                f.name,
                f.message,
            )
        with self._lock:
            self._failures.extend(failures)
            while len(self._failures) > ACK_FAILURES_MAX:
                self._failures.popleft()
                self._failures_dropped += 1
        if self._failures_dropped:
            log.warning(
                "group %s: %d acknowledgement failures dropped (nobody took them)",
                self._group,
                self._failures_dropped,
            )
            self._failures_dropped = 0

    def _accept_last(self) -> None:
        """auto_ack: accept what the last poll returned and the user left alone."""
        with self._lock:
            for key in self._last_polled:
                if key in self._held:
                    del self._held[key]
                    self._pending[key] = (ACCEPT, "")
            self._last_polled = []

    def _take_acks(self) -> list[_Ack]:
        with self._lock:
            pending, self._pending = self._pending, {}
            acks, self._unsent = self._unsent + coalesce(pending), []
        return acks

    def _put_back(self, acks: list[_Ack], generation: int) -> None:
        """Acknowledgements of a call that failed retriably: first in the next one, unless
        the membership they were taken in has ended meanwhile (then they are failures)."""
        if generation != self._generation:
            self._record_failures(
                _failures(acks, "UNKNOWN_MEMBER", "the membership ended before they were sent")
            )
            return
        with self._lock:
            self._unsent = acks + self._unsent

    # ------------------------------------------------------------------ commit
    async def commit(self) -> list[AckFailure]:
        """Send the queued acknowledgements now (with auto_ack, the last poll's records are
        accepted first); durable when it returns. Returns the broker's refusals of them."""
        self._check_open()
        return await self._commit()

    async def _commit(self) -> list[AckFailure]:
        if self._auto_ack:
            self._accept_last()
        generation = self._generation
        return await self._send_acks(_chunks(self._take_acks()), generation)

    async def _send_acks(self, chunks: list[list[_Ack]], generation: int) -> list[AckFailure]:
        """ShareAcknowledge per chunk; the refusals. On a failure, the chunks not answered
        are put back (retriable) or reported (not retriable: the broker refused them)."""
        failures: list[AckFailure] = []
        for i, chunk in enumerate(chunks):
            try:
                failures += await self._acknowledge(chunk, generation)
            except RiverlogError as error:
                self._call_failed(chunk, error, generation)
                self._put_back([a for c in chunks[i + 1 :] for a in c], generation)
                raise
            except BaseException:  # cancelled
                self._put_back([a for c in chunks[i:] for a in c], generation)
                raise
        return failures

    def _call_failed(self, acks: list[_Ack], error: RiverlogError, generation: int) -> None:
        """The call carrying `acks` failed: send them again later when it may succeed."""
        if error.retriable:
            self._put_back(acks, generation)
        else:
            name = error.name or (error.code.name if error.code is not None else "ERROR")
            self._record_failures(_failures(acks, name, str(error)))

    async def _acknowledge(self, acks: list[_Ack], generation: int) -> list[AckFailure]:
        """One ShareAcknowledge, retried while UNAVAILABLE (ACK_ATTEMPTS_MAX calls), always
        under the member id of `generation`, the membership the records were handed out in:
        after a rejoin they would name another member's deliveries."""
        assert self._stub is not None, "acknowledgements exist only after a poll"
        backoff_s = RETRY_BACKOFF_S_MIN
        for attempt in range(1, ACK_ATTEMPTS_MAX + 1):
            member_id = self._member_id
            if generation != self._generation or not member_id:
                return _failures(acks, "UNKNOWN_MEMBER", "the membership ended before the send")
            request = share_pb2.ShareAcknowledgeRequest(
                group_id=self._group, member_id=member_id, acks=_to_pb(acks)
            )
            try:
                answer = await self._stub.ShareAcknowledge(request, timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                if error.name in MEMBERSHIP_GONE:
                    self._lose_membership(generation, f"acknowledge refused {error.name}")
                    return _failures(acks, error.name, str(error))
                if not error.retriable or attempt == ACK_ATTEMPTS_MAX:
                    raise error from None
                log.info("acknowledge failed (attempt %d, retrying): %s", attempt, error)
                await asyncio.sleep(backoff_s)
                backoff_s = min(2 * backoff_s, RETRY_BACKOFF_S_MAX)
                continue
            return _refusals(answer.refused)
        raise AssertionError("unreachable: the last attempt returns or raises")

    # ------------------------------------------------------------------ poll
    async def poll(
        self, timeout_ms: int = 1000, max_records: int | None = None
    ) -> list[ShareRecord]:
        """Acquire and return up to `max_records` records of the group's topics (in offset
        order per partition): as soon as some are available, else [] after `timeout_ms`.

        Each ShareFetch carries the acknowledgements queued so far (with auto_ack, first an
        ACCEPT of what the previous poll returned and the user left alone); their refusals go
        to take_ack_failures(). The records returned are locked for this member until
        `config.lock_ms` after the fetch: ack, release or reject each before then.
        """
        _check_int("timeout_ms", timeout_ms, 0)
        if max_records is not None:
            _check_int("max_records", max_records, 1, MAX_RECORDS_MAX)
        self._start()
        self._polling += 1
        try:
            async with self._fetch_lock:
                return await self._poll(timeout_ms, max_records or self._max_records)
        finally:
            self._polling -= 1

    async def _poll(self, timeout_ms: int, max_records: int) -> list[ShareRecord]:
        if self._auto_ack:
            self._accept_last()
        deadline = time.monotonic() + timeout_ms / 1000
        backoff_s = RETRY_BACKOFF_S_MIN
        while not self.closed:
            self._raise_error()
            remaining_s = deadline - time.monotonic()
            if not self._member_id:
                if remaining_s <= 0:
                    return []
                self._member_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._member_changed.wait(), remaining_s)
                continue
            self._forget_expired()
            throttled_s = self._throttled_until_s - time.monotonic()
            if throttled_s > 0:  # over the fetch quota: no ShareFetch before then
                if remaining_s <= 0:
                    return []
                self._member_changed.clear()  # close() sets it: wakes this wait too
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._member_changed.wait(), min(throttled_s, remaining_s)
                    )
                continue
            try:
                records = await self._fetch(max_records, max(0, int(remaining_s * 1000)))
            except RiverlogError as error:
                if not error.retriable:
                    raise
                log.info("share fetch failed (retrying): %s", error)
                if deadline - time.monotonic() <= 0:
                    return []
                await asyncio.sleep(min(backoff_s, max(0.0, deadline - time.monotonic())))
                backoff_s = min(2 * backoff_s, RETRY_BACKOFF_S_MAX)
                continue
            if records is None:
                continue  # the membership ended meanwhile: wait for the rejoin
            backoff_s = RETRY_BACKOFF_S_MIN
            if records or time.monotonic() >= deadline or not self._max_wait_ms:
                return records  # (max_wait_ms 0: one fetch per poll, no busy loop)
        return []

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    async def _fetch(self, max_records: int, wait_ms: int) -> list[ShareRecord] | None:
        """One ShareFetch with the queued acknowledgements: the records acquired, or None when
        the membership ended (the broker refused the member, or it was lost meanwhile)."""
        assert self._stub is not None
        generation = self._generation
        chunks = _chunks(self._take_acks())
        if len(chunks) > 1:  # more ranges than one request takes: the others go first
            self._record_failures(await self._send_acks(chunks[1:], generation))
        acks = chunks[0] if chunks else []
        member_id = self._member_id
        if generation != self._generation or not member_id:  # lost meanwhile
            self._put_back(acks, generation)  # reported as failures
            return None
        wait_ms = min(wait_ms, self._max_wait_ms)
        request = share_pb2.ShareFetchRequest(
            group_id=self._group,
            member_id=member_id,
            acks=_to_pb(acks),
            max_records=max_records,
            max_wait_ms=wait_ms,
        )
        lock_s = (self._config.lock_ms if self._config else self._wanted.lock_ms) / 1000
        sent_s = time.monotonic()
        call = self._stub.ShareFetch(request, timeout=wait_ms / 1000 + FETCH_TIMEOUT_MARGIN_S)
        self._fetch_call = call
        try:
            answer = await call
        except asyncio.CancelledError:
            self._put_back(acks, generation)
            if self._closing:
                return []  # close() ended it; it sends what was put back
            raise
        except grpc.RpcError as e:
            error = from_rpc_error(e)
            if error.name in MEMBERSHIP_GONE:
                self._record_failures(_failures(acks, error.name, str(error)))
                self._lose_membership(generation, f"fetch refused {error.name}")
                return None
            self._call_failed(acks, error, generation)
            raise error from None
        finally:
            self._fetch_call = None
        if answer.throttle_time_ms > 0:
            self._throttled_until_s = time.monotonic() + throttle_s(answer.throttle_time_ms)
        self._record_failures(_refusals(answer.refused))
        if generation != self._generation:
            return None  # acquired by the old member id: the broker released them
        records: list[ShareRecord] = []
        for part in answer.partitions:
            records += self._decode(part)
        keys = [(r.topic, r.partition, r.offset) for r in records]
        with self._lock:
            self._handout_seq += 1
            for key, r in zip(keys, records, strict=True):
                self._held[key] = (self._handout_seq, r.delivery_count)
            self._handouts.append((sent_s + lock_s, self._handout_seq, keys))
            self._last_polled = keys
        return records

    def _decode(self, part: share_pb2.ShareFetchPartition) -> list[ShareRecord]:
        ranges = [(a.first_offset, a.last_offset, a.delivery_count) for a in part.acquired]
        if not ranges:
            return []
        wanted = sum(last - first + 1 for first, last, _count in ranges)
        first = min(r[0] for r in ranges)
        records: list[Record] = []
        if part.record_batches:
            try:
                stop = max(r[1] for r in ranges) + 1  # the batches may go on: not decoded
                records, _last = decode_fetch(
                    part.record_batches, part.topic, part.partition, first, stop
                )
            except StorageError as e:
                raise RiverlogError(
                    f"{part.topic}-{part.partition}: corrupt share fetch answer at offset "
                    f"{first}: {e}"
                ) from None
        out = select_acquired(records, ranges)
        if len(out) != wanted:
            # Not a record to hand out: it stays acquired until its lock expires.
            log.warning(
                "%s-%d: the broker acquired %d offsets from %d but sent %d of their records",
                part.topic,
                part.partition,
                wanted,
                first,
                len(out),
            )
        return out

    def _forget_expired(self) -> None:
        """Forget handed-out records HELD_GRACE_S after their locks expired (bounds _held)."""
        now_s = time.monotonic()
        with self._lock:
            while self._handouts and self._handouts[0][0] + HELD_GRACE_S < now_s:
                _expires_s, seq, keys = self._handouts.popleft()
                for key in keys:
                    held = self._held.get(key)
                    if held is not None and held[0] == seq:
                        del self._held[key]

    # ------------------------------------------------------------------ membership
    def _lose_membership(self, generation: int, reason: str) -> None:
        """The broker no longer knows this member: what it held is gone; rejoin."""
        if generation != self._generation or not self._member_id:
            return
        old = self._member_id
        self._generation += 1
        self._member_id = ""
        with self._lock:
            held = len(self._held)
            self._held.clear()
            self._handouts.clear()
            self._last_polled = []
        lost = self._take_acks()
        log.warning(
            "member %s of share group %s is gone (%s): %d records it held and %d queued "
            "acknowledgement ranges are lost; rejoining",
            old,
            self._group,
            reason,
            held,
            len(lost),
        )
        self._record_failures(
            _failures(lost, "UNKNOWN_MEMBER", f"member {old} ended before it was sent ({reason})")
        )
        self._hb_wake.set()

    async def _heartbeat_loop(self) -> None:
        backoff_s = RETRY_BACKOFF_S_MIN
        while not self.closed:
            self._hb_wake.clear()
            delay_s = await self._heartbeat_once()
            if delay_s is None:  # failed: retry after a doubling pause
                delay_s, backoff_s = backoff_s, min(2 * backoff_s, RETRY_BACKOFF_S_MAX)
            else:
                backoff_s = RETRY_BACKOFF_S_MIN
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hb_wake.wait(), delay_s)

    async def _heartbeat_once(self) -> float | None:
        """One heartbeat (a join without a member id); the delay until the next one, None
        after a failure."""
        assert self._stub is not None
        generation, joining = self._generation, not self._member_id
        request = share_pb2.ShareHeartbeatRequest(
            group_id=self._group,
            member_id=self._member_id,
            session_timeout_ms=self._session_timeout_ms,
        )
        if joining:
            request.topics.extend(self._topics)
            request.config.CopyFrom(self._wanted)
        try:
            answer = await self._stub.ShareHeartbeat(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            error = from_rpc_error(e)
            if not joining and error.name in MEMBERSHIP_GONE:
                self._lose_membership(generation, f"heartbeat refused {error.name}")
                return 0.0
            if error.retriable:
                log.info("share heartbeat failed (retrying): %s", error)
            else:
                log.warning("share heartbeat refused: %s", error)
                self._error = error
                self._member_changed.set()
            return None
        if generation != self._generation:
            return 0.0
        self._config = _share_group_config(answer.config)
        if joining:
            self._member_id = answer.member_id
            log.info("joined share group %s as member %s", self._group, answer.member_id)
            self._member_changed.set()
        return max(answer.heartbeat_interval_ms / 1000, HEARTBEAT_INTERVAL_S_MIN)

    async def _stop_heartbeats(self) -> None:
        """End the heartbeat task (a heartbeat in flight is cancelled: leaving follows)."""
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _leave(self) -> None:
        if not self._member_id or self._stub is None:
            return
        request = share_pb2.ShareLeaveRequest(group_id=self._group, member_id=self._member_id)
        try:
            await self._stub.ShareLeave(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            log.info("leaving share group %s failed: %s", self._group, from_rpc_error(e))
        self._member_id = ""


# ---------------------------------------------------------------------------- sync facade
class ShareConsumer:
    """AsyncShareConsumer for synchronous code: the same constructor and methods, run on a
    private event-loop thread. ack / release / reject are local and run on the caller's
    thread; any thread may call them."""

    def __init__(
        self,
        server: str | None = None,
        *,
        group: str,
        topics: Sequence[str],
        dead_letter_topic: str | None = None,
        max_delivery_attempts: int = 5,
        lock_ms: int = 30_000,
        start: str = "latest",
        retry_backoff_ms: int = 1_000,
        retry_backoff_max_ms: int = 60_000,
        auto_ack: bool = False,
        max_records: int = 500,
        session_timeout_ms: int = 45_000,
        max_wait_ms: int = 5_000,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        self._core = AsyncShareConsumer(
            server,
            group=group,
            topics=topics,
            dead_letter_topic=dead_letter_topic,
            max_delivery_attempts=max_delivery_attempts,
            lock_ms=lock_ms,
            start=start,
            retry_backoff_ms=retry_backoff_ms,
            retry_backoff_max_ms=retry_backoff_max_ms,
            auto_ack=auto_ack,
            max_records=max_records,
            session_timeout_ms=session_timeout_ms,
            max_wait_ms=max_wait_ms,
            token=token,
            tls=tls,
        )
        self._thread = EventLoopThread("riverlog-share-consumer")

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._thread.loop.is_closed():
            coro.close()
            self._core._check_open()
            raise RiverlogError("the share consumer is closed")
        return self._thread.run(coro)

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def member_id(self) -> str:
        return self._core.member_id

    @property
    def config(self) -> ShareGroupConfig | None:
        return self._core.config

    def poll(self, timeout_ms: int = 1000, max_records: int | None = None) -> list[ShareRecord]:
        return self._run(self._core.poll(timeout_ms, max_records))

    def ack(self, record: ShareRecord) -> None:
        self._core.ack(record)

    def release(self, record: ShareRecord, error: str = "") -> None:
        self._core.release(record, error)

    def reject(self, record: ShareRecord, error: str = "") -> None:
        self._core.reject(record, error)

    def commit(self) -> list[AckFailure]:
        return self._run(self._core.commit())

    def take_ack_failures(self) -> list[AckFailure]:
        return self._core.take_ack_failures()

    def close(self) -> None:
        """Commit, leave the group, stop the loop thread. Idempotent."""
        if self._thread.loop.is_closed():
            return
        try:
            self._thread.run(self._core.close())
        finally:
            self._thread.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


__all__ = ["AckFailure", "AsyncShareConsumer", "ShareConsumer", "ShareRecord"]
