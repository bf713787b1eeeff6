"""The consumer: AsyncConsumer (the asyncio core) and Consumer (its thin sync facade).

Shape
-----
An AsyncConsumer owns one grpc.aio channel and, once the first call needs the network, two
background tasks:

- The fetch task keeps one long-poll Fetch in flight for every partition it may read
  (assigned, not paused, position known, and in a group: in the latest assignment), with
  `fetch_max_bytes` over the request and `max_partition_fetch_bytes` per partition (group
  members set FetchRequest.member). When an answer arrives it reads where each partition
  continues from the batch headers, sends the next fetch, and only then decodes the answer
  (._decode.decode_fetch, once per partition; records below the wanted offset are left out,
  since a fetch starts with the batch that holds it) into one chunk of Records per partition
  in the buffer: the broker and the network work while this process decodes. The buffer is
  counted in fetched batch bytes (the decoded Python objects cost about 2-3x that); the task
  asks for no more than the space left and stops fetching while none is left, so the buffer
  never holds more than `buffer_bytes_max` plus one answer's overshoot (one batch), whatever
  the backlog. A change of what to fetch (assign, seek, resume, new partitions) cancels the
  long-poll in flight and asks again; answers made stale by it are dropped.
- The heartbeat task (with a group and topics or a pattern) joins the group, heartbeats at the
  interval the answers ask for, and at once when a fetch answer carries heartbeat_now or after
  a partition is given back. It only records what each answer says; the hand-over itself
  happens in poll.

poll() is where the user's flow of control meets the group, as in Kafka: it reconciles the
assignment, auto-commits, then hands out buffered records. So rebalance callbacks never run
while the user is still processing records an earlier poll returned.

Delivery: at least once
-----------------------
`commit()` without arguments commits, per partition, the offset after the last record poll
returned (or iteration yielded): call it once those are processed. Auto-commit runs inside
poll, every `auto_commit_interval_ms`, and so commits what the *earlier* polls returned:
calling poll again is how the user says the records it returned before are processed
(process-then-commit). The records of the last poll are therefore committed at the next poll
or at close(); a crash in between replays them. Nothing is ever committed before poll returned
it.

Rebalance
---------
When a heartbeat answer leaves a partition out, the fetch task stops reading it at once. At
the next poll the consumer drops its buffered records, commits its position (auto-commit),
calls on_revoke, and reports `owned` without it right away, so the new owner starts from that
commit. Partitions given to it start at the group's committed offset (FetchOffsets), else
where `auto_offset_reset` says; then on_assign is called. A member the broker no longer knows
(UNKNOWN_MEMBER, or a heartbeat refused FENCED_MEMBER) loses its partitions without
committing (on_revoke is called for them at the next poll) and rejoins. A commit refused
FENCED_MEMBER is retried with the epoch of the next heartbeat answer.

Liveness is the heartbeat task, not the handler: a slow handler never expires the session.
But a consumer whose user does not call poll for `max_poll_interval_ms` leaves the group on
purpose (its partitions go to members that make progress) and rejoins at its next poll.

Pause drops the partition's buffered records (fetched again after resume), so a paused
partition never holds buffer space the others need.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import grpc
import grpc.aio

from storage import (
    HEADER_BYTES,
    CorruptBatchError,
    StorageError,
    read_header,
)

from .._pattern import PatternError, compile_pattern
from .._pb import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    groups_pb2,
    groups_pb2_grpc,
    types_pb2,
)
from ._base import (
    EventLoopThread,
    GroupError,
    InvalidArgumentError,
    NotFoundError,
    OffsetOutOfRangeError,
    Record,
    RiverlogError,
    TlsOptions,
    TopicPartition,
    check_token,
    default_server,
    from_partition_error,
    from_rpc_error,
    open_channel,
    throttle_s,
)
from ._decode import decode_fetch

log = logging.getLogger("riverlog.consumer")

T = TypeVar("T")
Callback = Callable[[list[TopicPartition]], None]

MiB = 1024 * 1024
AUTO_OFFSET_RESETS = ("earliest", "latest", "error")
# The broker's limits (stream/_broker.py): bytes of one fetch, its longest wait, and the
# partitions one request may name (larger assignments are fetched in turns).
FETCH_BYTES_MAX = 64 * MiB
FETCH_WAIT_MS_MAX = 30_000
REQUEST_PARTITIONS_MAX = 4096
# Deadline of every call but Fetch, whose deadline is its long-poll wait plus the margin.
RPC_TIMEOUT_S = 10.0
FETCH_TIMEOUT_MARGIN_S = 10.0
# Pause after a failed fetch or heartbeat; doubled per failure in a row, up to the max.
RETRY_BACKOFF_S_MIN = 0.05
RETRY_BACKOFF_S_MAX = 1.0
# Heartbeats asked for "now" are at least this far apart: heartbeat_now stays set on every
# fetch answer until a hand-over completes, and answers can arrive every few milliseconds.
HEARTBEAT_GAP_S_MIN = 0.02
# How long close() lets grpc finish a fetch it cancelled before the channel and loop go.
CANCEL_SETTLE_S = 0.01
# Loop turns the fetch task yields after starting the next fetch, before decoding, so that the
# request is on the wire meanwhile: one for a plain call; an intercepted one (a bearer token,
# stream/client/_base.py) runs its interceptor in one turn and starts the real call in the
# next. With one turn only, a token cost consume 12% (bench/client_bench.py --quick).
FETCH_START_TURNS = 2
# A commit refused FENCED_MEMBER is retried this many times, each after a heartbeat answer.
COMMIT_ATTEMPTS_MAX = 20
# What iteration waits per poll before it checks whether the consumer was closed.
ITERATION_POLL_MS = 500
# Group-protocol errors after which this member must rejoin (proto/riverlog/v1/groups.proto).
MEMBERSHIP_GONE = frozenset({"UNKNOWN_MEMBER", "UNKNOWN_GROUP"})

# A batch starts with baseOffset (i64) and batchLength (i32): the bytes after these two.
_FRAME = struct.Struct(">qi")


class _Partition:
    """What the consumer knows of one assigned partition."""

    __slots__ = ("error", "fetch_offset", "paused", "position", "version")

    def __init__(self) -> None:
        # The offset after the last record poll handed out; None until known.
        self.position: int | None = None
        # The next offset to fetch: `position` plus what is buffered.
        self.fetch_offset: int | None = None
        self.paused = False
        # Raised by poll until the user seeks (or pauses): no valid position, topic gone.
        self.error: RiverlogError | None = None
        # Grows whenever fetched records in flight become stale (seek, rewind).
        self.version = 0

    def place(self, offset: int) -> None:
        self.position = self.fetch_offset = offset
        self.error = None
        self.version += 1


class _Chunk:
    """Decoded records of one partition from one fetch answer, not all handed out yet."""

    __slots__ = ("nbytes", "records", "start", "tp")

    def __init__(self, tp: TopicPartition, records: list[Record], nbytes: int) -> None:
        self.tp = tp
        self.records = records
        self.start = 0  # the first record not handed out
        self.nbytes = nbytes  # fetched batch bytes: what the buffer bound counts


class _Claim(NamedTuple):
    """Part of a fetch answer taken for the buffer, to be decoded."""

    tp: TopicPartition
    st: _Partition
    version: int  # st.version when claimed: stale if it changed
    offset: int  # the offset asked for
    last: int  # the offset of the last record sent
    data: bytes


# A fetch in flight: its call, the offsets it asked for, the membership generation it was sent in.
_Fetch = tuple[Any, dict[TopicPartition, int], int]

# (partition, start, end): records[start:end] of a handout are that partition's, in order.
_Segment = tuple[TopicPartition, int, int]


class _Handout:
    """Records poll returned to an iterator that has not yielded them all yet.

    The iterator steps `next` itself (the sync facade does so on the user's thread, without a
    call into the loop per record); everything else reads or changes a handout only from
    calls the user makes, so the two never interleave.
    """

    __slots__ = ("next", "records", "segments")

    def __init__(self, records: list[Record], segments: list[_Segment]) -> None:
        self.records = records
        self.segments = segments
        self.next = 0

    def first_unyielded(self) -> dict[TopicPartition, int]:
        """Per partition with records left: the offset of the first one not yielded."""
        out: dict[TopicPartition, int] = {}
        for tp, start, end in self.segments:
            if end > self.next and tp not in out:
                out[tp] = self.records[max(start, self.next)].offset
        return out

    def take(self, limit: int) -> tuple[list[Record], list[_Segment]]:
        """Up to `limit` records not yielded yet; they count as yielded from now on."""
        begin, stop = self.next, min(len(self.records), self.next + limit)
        segments = [
            (tp, max(start, begin) - begin, min(end, stop) - begin)
            for tp, start, end in self.segments
            if end > begin and start < stop
        ]
        self.next = stop
        return self.records[begin:stop], segments

    def discard(self, tps: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Forget the records of `tps` not yielded yet; their first offsets."""
        dropped = {tp: o for tp, o in self.first_unyielded().items() if tp in tps}
        if not dropped:
            return dropped
        kept = self.records[: self.next]
        segments: list[_Segment] = []
        for tp, start, end in self.segments:
            begin = max(start, self.next)
            if end > begin and tp not in tps:
                segments.append((tp, len(kept), len(kept) + end - begin))
                kept.extend(self.records[begin:end])
        self.records, self.segments = kept, segments
        return dropped


def _last_offset(data: bytes) -> int:
    """The offset of the last record in back-to-back batches, from their headers alone
    (the records are decoded, and every CRC checked, by decode_fetch later)."""
    pos, last_pos, end = 0, 0, len(data)
    while pos < end:
        if end - pos < HEADER_BYTES:
            raise CorruptBatchError(f"{end - pos} bytes at byte {pos}: not a batch header")
        _base_offset, length = _FRAME.unpack_from(data, pos)
        if length < HEADER_BYTES - _FRAME.size:
            raise CorruptBatchError(f"batch length {length} at byte {pos} is below a header's")
        last_pos = pos
        pos += _FRAME.size + length
    if pos != end:
        raise CorruptBatchError(f"the last batch runs past the end ({pos} > {end} bytes)")
    return read_header(data, last_pos).last_offset


def _grouped(tps: Iterable[TopicPartition]) -> list[types_pb2.TopicPartitions]:
    by_topic: dict[str, list[int]] = {}
    for topic, partition in sorted(tps):
        by_topic.setdefault(topic, []).append(partition)
    return [types_pb2.TopicPartitions(topic=t, partitions=ps) for t, ps in by_topic.items()]


def _name(tp: TopicPartition) -> str:
    return f"{tp.topic}-{tp.partition}"


def _check_int(name: str, value: int, low: int, high: int = sys.maxsize) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        bound = f"at least {low}" if high == sys.maxsize else f"in [{low}, {high}]"
        raise InvalidArgumentError(f"{name} must be an integer {bound}, got {value!r}")


def _partitions(tps: Iterable[TopicPartition | tuple[str, int]]) -> list[TopicPartition]:
    out = [TopicPartition(*tp) for tp in tps]
    for tp in out:
        if not isinstance(tp.topic, str) or isinstance(tp.partition, bool):
            raise InvalidArgumentError(f"not a (topic, partition) pair: {tp!r}")
        _check_int(f"partition of {tp.topic!r}", tp.partition, 0)
    return out


# ---------------------------------------------------------------------------- the core
class AsyncConsumer:
    """Reads records of assigned partitions, alone or as a member of a consumer group.

    - `group` with `topics` or `pattern`: the group's coordinator assigns partitions
      (heartbeats, rebalances, committed offsets).
    - `topics` or `pattern` without a group: every partition of those topics (as they are at
      the first poll), no commits.
    - neither: `assign()` partitions by hand; with a `group`, commits go to that group as
      member "" at epoch -1 (allowed while the group has no members).

    Where a partition starts: its committed offset (with a group), else `auto_offset_reset`:
    "earliest" (the log start), "latest" (the log end), or "error" (poll raises
    OffsetOutOfRangeError until the partition is seek()'d). The same policy applies when a
    position falls outside the log (retention deleted it).

    Options (Kafka's names and meanings where Kafka has them):

    - session_timeout_ms / rebalance_timeout_ms / instance_id: sent with the heartbeats
      (proto/riverlog/v1/groups.proto). Liveness is the heartbeat task, not the handler.
    - max_poll_interval_ms: a consumer whose user has not called poll (or asked iteration
      for the next record) for this long leaves the group on purpose, and rejoins at its next
      poll; what it was given meanwhile is lost uncommitted (on_revoke reports it).
    - fetch_max_bytes over one fetch, max_partition_fetch_bytes per partition of it,
      fetch_max_wait_ms of long-poll; buffer_bytes_max bounds what is fetched and not yet
      polled (in batch bytes).
    - on_assign / on_revoke(partitions): run inside poll (and close), on the consumer's event
      loop, never while records an earlier poll returned may still be in process.
    - token (a bearer token) and tls (TlsOptions): the connection's credentials
      (stream/client/_base.py).

    Quotas: a fetch answer with throttle_time_ms > 0 delays the next fetch that long (at most
    THROTTLE_MS_MAX); heartbeats and commits go on meanwhile.
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        group: str | None = None,
        topics: Sequence[str] = (),
        pattern: str | None = None,
        auto_offset_reset: str = "latest",
        enable_auto_commit: bool = True,
        auto_commit_interval_ms: int = 1000,
        session_timeout_ms: int = 45_000,
        rebalance_timeout_ms: int = 60_000,
        max_poll_interval_ms: int = 300_000,
        instance_id: str | None = None,
        fetch_max_bytes: int = 4 * MiB,
        max_partition_fetch_bytes: int = 1 * MiB,
        fetch_max_wait_ms: int = 500,
        buffer_bytes_max: int = 8 * MiB,
        on_assign: Callback | None = None,
        on_revoke: Callback | None = None,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        if isinstance(topics, str):
            raise InvalidArgumentError(f"topics is a list of names, got the string {topics!r}")
        if topics and pattern is not None:
            raise InvalidArgumentError("subscribe to topics or to a pattern, not both")
        if pattern is not None:
            try:
                compile_pattern(pattern)  # the broker's engine: RE2
            except PatternError as e:
                raise InvalidArgumentError(str(e)) from None
        if auto_offset_reset not in AUTO_OFFSET_RESETS:
            raise InvalidArgumentError(
                f"auto_offset_reset must be one of {', '.join(AUTO_OFFSET_RESETS)}, "
                f"got {auto_offset_reset!r}"
            )
        if group is not None and not group:
            raise InvalidArgumentError('group must be a non-empty name or None, got ""')
        if instance_id is not None and not (group and (topics or pattern)):
            raise InvalidArgumentError("instance_id needs a group and topics or a pattern")
        _check_int("auto_commit_interval_ms", auto_commit_interval_ms, 0)
        _check_int("session_timeout_ms", session_timeout_ms, 1)
        _check_int("rebalance_timeout_ms", rebalance_timeout_ms, 1)
        _check_int("max_poll_interval_ms", max_poll_interval_ms, 1)
        _check_int("fetch_max_bytes", fetch_max_bytes, 1, FETCH_BYTES_MAX)
        _check_int("max_partition_fetch_bytes", max_partition_fetch_bytes, 1, FETCH_BYTES_MAX)
        _check_int("fetch_max_wait_ms", fetch_max_wait_ms, 0, FETCH_WAIT_MS_MAX)
        _check_int("buffer_bytes_max", buffer_bytes_max, 1)
        self._server = default_server(server)
        self._token = None if token is None else check_token(token)
        self._tls = tls
        self._group = group
        self._group_id = group or ""  # for requests: only sent when there is a group
        self._topics = tuple(topics)
        self._pattern = pattern
        # Partitions come from the group's coordinator (else from assign() or the topics).
        self._subscribed = group is not None and bool(topics or pattern is not None)
        self._reset = auto_offset_reset
        self._auto_commit = enable_auto_commit and group is not None
        self._auto_commit_s = auto_commit_interval_ms / 1000
        self._session_timeout_ms = session_timeout_ms
        self._rebalance_timeout_ms = rebalance_timeout_ms
        self._max_poll_interval_s = max_poll_interval_ms / 1000
        self._instance_id = instance_id
        self._fetch_max_bytes = fetch_max_bytes
        self._partition_fetch_bytes = max_partition_fetch_bytes
        self._fetch_wait_ms = fetch_max_wait_ms
        self._buffer_bytes_max = buffer_bytes_max
        self._on_assign = on_assign
        self._on_revoke = on_revoke

        self._channel: grpc.aio.Channel | None = None
        self._broker: broker_pb2_grpc.BrokerAsyncStub | None = None
        self._groups: groups_pb2_grpc.GroupsAsyncStub | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fetch_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False

        # Partitions worked, the buffer, and what poll handed to an iterator.
        self._parts: dict[TopicPartition, _Partition] = {}
        self._buffer: deque[_Chunk] = deque()
        self._buffered_bytes = 0
        # Bytes of a fetch answer claimed but not decoded yet (they count against the bound).
        self._reserved_bytes = 0
        self._handout: _Handout | None = None
        self._committed: dict[TopicPartition, int] = {}
        self._next_auto_commit_s = 0.0
        # Raised by the next poll: a failure of a background task.
        self._error: RiverlogError | None = None
        # Topics (or a pattern) without a group: resolved to partitions at the first poll.
        self._discover = not self._subscribed and bool(topics or pattern is not None)

        # Fetch task.
        self._fetch_wake = asyncio.Event()
        self._fetch_call: Any = None  # the Fetch in flight, to cancel it
        self._fetch_round = 0

        # Group membership (heartbeat task); `_generation` grows whenever it is lost.
        self._member_id = ""
        self._epoch = 0
        self._generation = 0
        self._interval_s = 0.0
        self._target: frozenset[TopicPartition] = frozenset()  # the last answer's assignment
        self._held: set[TopicPartition] = set()  # given to us, not given back: `owned`
        self._lost: set[TopicPartition] = set()  # taken away uncommitted; on_revoke pending
        self._hb_wake = asyncio.Event()
        self._answered = asyncio.Event()

        # poll.
        self._reconcile_needed = bool(self._discover)
        self._reconcile_lock = asyncio.Lock()
        self._poll_wake = asyncio.Event()
        self._polling = 0
        self._last_poll_s = time.monotonic()
        self._progress: tuple[_Handout | None, int] = (None, -1)  # see _idle_s
        self._polled = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle
    @property
    def closed(self) -> bool:
        return self._closed or self._closing

    @property
    def buffered_bytes(self) -> int:
        """Fetched batch bytes decoded and waiting for poll (bounded by buffer_bytes_max
        plus one fetch answer's overshoot)."""
        return self._buffered_bytes

    def _start(self) -> None:
        if self.closed:
            raise RiverlogError("the consumer is closed")
        if self._channel is not None:
            return
        self._channel = open_channel(self._server, token=self._token, tls=self._tls)
        self._broker = broker_pb2_grpc.BrokerStub(self._channel)
        self._groups = groups_pb2_grpc.GroupsStub(self._channel)
        self._last_poll_s = time.monotonic()
        self._next_auto_commit_s = time.monotonic() + self._auto_commit_s
        self._fetch_task = self._spawn(self._fetch_loop(), "fetch")
        if self._subscribed:
            self._heartbeat_task = self._spawn(self._heartbeat_loop(), "heartbeat")

    def _spawn(self, coro: Coroutine[Any, Any, T], what: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=f"riverlog-consumer-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, RiverlogError):
            log.error("consumer task %s failed", task.get_name(), exc_info=error)

    async def close(self) -> None:
        """Commit (with auto-commit), call on_revoke, leave the group, close the channel."""
        if self.closed:
            return
        if self._channel is None:
            self._closed = True
            return
        try:
            if self._auto_commit and self._member_ok():
                try:
                    await self.commit()
                except RiverlogError as e:
                    log.warning("commit on close failed: %s", e)
            self._closing = True
            self._poll_wake.set()  # a poll waiting in another task returns
            if self._subscribed:
                try:
                    self._call_back(self._on_revoke, sorted(set(self._parts) | self._lost))
                except Exception:
                    log.exception("on_revoke raised during close")
            await self._stop_heartbeats()
            await self._leave()
        finally:
            self._closing = self._closed = True
            self._poll_wake.set()
            in_flight = self._fetch_call
            for task in (self._fetch_task, self._heartbeat_task):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)  # commits: bounded
            if in_flight is not None:
                # grpc core reports the cancelled call's end a moment later, from its poller
                # thread; a loop closed before then makes grpc.aio raise in another loop.
                await asyncio.sleep(CANCEL_SETTLE_S)
            # Polls of other tasks (or of the sync facade's thread) finish before the loop
            # may stop; they are woken and at most in a bounded call.
            deadline = time.monotonic() + RPC_TIMEOUT_S
            while self._polling and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            await self._channel.close()

    async def __aenter__(self) -> AsyncConsumer:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ partitions
    def assign(self, tps: Iterable[TopicPartition | tuple[str, int]]) -> None:
        """Work exactly these partitions (no group coordination); [] unassigns all.

        A partition already assigned keeps its position; a new one starts at the group's
        committed offset (with a group) or per auto_offset_reset, at the next poll.
        """
        if self._subscribed or self._topics or self._pattern is not None:
            raise InvalidArgumentError(
                "assign() is for a consumer made without topics or a pattern (this one "
                "subscribes to topics: its partitions come from those)"
            )
        self._check_open()
        self._set_partitions(_partitions(tps))
        self._reconcile_needed = True  # the next poll gives the new ones their positions

    def _set_partitions(self, tps: list[TopicPartition]) -> None:
        wanted = set(tps)
        gone = set(self._parts) - wanted
        self._rewind(gone)
        for tp in gone:
            del self._parts[tp]
        for tp in tps:
            if tp not in self._parts:
                self._parts[tp] = _Partition()

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this consumer works now."""
        return frozenset(self._parts)

    def position(self, tp: TopicPartition | tuple[str, int]) -> int | None:
        """The offset of the next record poll (or iteration) gives from `tp`; None until
        known (the first poll after it was assigned sets it)."""
        tp = self._assigned(tp)
        if self._handout is not None:
            offset = self._handout.first_unyielded().get(tp)
            if offset is not None:
                return offset
        return self._parts[tp].position

    def pause(self, tps: Iterable[TopicPartition | tuple[str, int]]) -> None:
        """Stop fetching and returning records of `tps`; their buffered records are dropped."""
        chosen = [self._assigned(tp) for tp in tps]
        for tp in chosen:
            self._parts[tp].paused = True
        self._rewind(set(chosen))

    def resume(self, tps: Iterable[TopicPartition | tuple[str, int]]) -> None:
        for tp in [self._assigned(tp) for tp in tps]:
            self._parts[tp].paused = False
        self._refetch()

    def paused(self) -> frozenset[TopicPartition]:
        return frozenset(tp for tp, st in self._parts.items() if st.paused)

    def _assigned(self, tp: TopicPartition | tuple[str, int]) -> TopicPartition:
        (tp,) = _partitions([tp])  # a plain (topic, partition) pair becomes a TopicPartition
        if tp not in self._parts:
            raise InvalidArgumentError(
                f"{_name(tp)} is not assigned to this consumer "
                f"(assigned: {', '.join(map(_name, sorted(self._parts))) or 'none'})"
            )
        return tp

    def _check_open(self) -> None:
        if self.closed:
            raise RiverlogError("the consumer is closed")

    # ------------------------------------------------------------------ seek
    async def seek(self, tp: TopicPartition | tuple[str, int], offset: int) -> None:
        """Read `tp` from `offset` on (checked by the broker at the next fetch: out of the
        log, auto_offset_reset applies)."""
        self._seek_now(tp, offset)

    def _seek_now(self, tp: TopicPartition | tuple[str, int], offset: int) -> None:
        tp = self._assigned(tp)
        _check_int(f"offset for {_name(tp)}", offset, 0)
        self._rewind({tp})
        self._parts[tp].place(offset)
        self._refetch()

    async def seek_to_beginning(self, tps: Iterable[TopicPartition] | None = None) -> None:
        """Read `tps` (default: all assigned) from their log start offsets."""
        await self._seek_to("earliest", tps)

    async def seek_to_end(self, tps: Iterable[TopicPartition] | None = None) -> None:
        """Read only records appended from now on to `tps` (default: all assigned)."""
        await self._seek_to("latest", tps)

    async def seek_to_timestamp(
        self, timestamp_ms: int, tps: Iterable[TopicPartition] | None = None
    ) -> None:
        """Read `tps` from the first record with a timestamp at or after `timestamp_ms`
        (the log end where there is none)."""
        _check_int("timestamp_ms", timestamp_ms, -sys.maxsize)
        await self._seek_to(timestamp_ms, tps)

    async def _seek_to(self, spec: str | int, tps: Iterable[TopicPartition] | None) -> None:
        self._start()
        chosen = sorted(self._parts) if tps is None else [self._assigned(tp) for tp in tps]
        results = await self._list_offsets(chosen, spec)
        for tp in chosen:
            r = results[tp]
            if r.error.code:
                raise from_partition_error(r.error.code, r.error.message)
            if tp in self._parts:
                self._seek_now(tp, r.offset if r.HasField("offset") else r.log_end_offset)

    # ------------------------------------------------------------------ poll
    async def poll(self, timeout_ms: int = 1000, max_records: int | None = None) -> list[Record]:
        """Records of the assigned partitions, in offset order per partition: at once when
        some are buffered, else as soon as some arrive, else [] after `timeout_ms`.

        Also where the group's hand-overs, the callbacks and auto-commit happen. Raises the
        errors of the background work (OffsetOutOfRangeError under auto_offset_reset
        "error", NotFoundError for a deleted topic, group refusals...).
        """
        records, _segments = await self._poll(timeout_ms, max_records)
        return records

    async def _poll(
        self, timeout_ms: int, max_records: int | None
    ) -> tuple[list[Record], list[_Segment]]:
        _check_int("timeout_ms", timeout_ms, 0)
        if max_records is not None:
            _check_int("max_records", max_records, 1)
        self._start()
        self._polling += 1
        self._polled.set()
        try:
            deadline = time.monotonic() + timeout_ms / 1000
            while True:
                if self._reconcile_needed:
                    await self._reconcile()
                if self._auto_commit and time.monotonic() >= self._next_auto_commit_s:
                    await self._commit_quietly()
                self._raise_errors()
                records, segments = self._take(max_records or sys.maxsize)
                remaining = deadline - time.monotonic()
                if records or remaining <= 0 or self.closed:
                    return records, segments
                self._poll_wake.clear()
                if self._reconcile_needed or self._buffer or self._error is not None:
                    continue
                if self._auto_commit:
                    remaining = min(remaining, self._next_auto_commit_s - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poll_wake.wait(), max(remaining, 0))
        finally:
            self._polling -= 1
            self._last_poll_s = time.monotonic()

    def _take(self, limit: int) -> tuple[list[Record], list[_Segment]]:
        """Hand out up to `limit` records: those an iterator left, then buffered ones."""
        out: list[Record] = []
        segments: list[_Segment] = []
        handout = self._handout
        if handout is not None:
            out, segments = handout.take(limit)
            if handout.next >= len(handout.records):
                self._handout = None
        buffer = self._buffer
        freed = False
        while buffer and len(out) < limit:
            chunk = buffer[0]
            records, start = chunk.records, chunk.start
            end = min(len(records), start + limit - len(out))
            if start == 0 and end == len(records) and not out:
                out = records  # the whole chunk: no copy (it leaves the buffer)
            else:
                out.extend(itertools.islice(records, start, end))
            segments.append((chunk.tp, len(out) - (end - start), len(out)))
            self._parts[chunk.tp].position = records[end - 1].offset + 1
            if end == len(records):
                buffer.popleft()
                self._buffered_bytes -= chunk.nbytes
                freed = True
            else:
                chunk.start = end
        if freed:
            self._fetch_wake.set()
        return out, segments

    def _raise_errors(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error
        for st in self._parts.values():
            if st.error is not None and not st.paused:
                raise st.error

    # ------------------------------------------------------------------ iteration
    def __aiter__(self) -> AsyncConsumer:
        return self

    async def __anext__(self) -> Record:
        """The next record; stops when the consumer is closed. Breaking out of the loop
        loses nothing: records not yielded yet come from the next poll or iteration."""
        handout = self._handout
        while handout is None or handout.next >= len(handout.records):
            handout = await self._next_handout(ITERATION_POLL_MS)
            if handout is None and self.closed:
                raise StopAsyncIteration
        record = handout.records[handout.next]
        handout.next += 1
        return record

    async def _next_handout(self, timeout_ms: int) -> _Handout | None:
        """Poll for the iterators (the caller has yielded everything handed out before)."""
        if self.closed:
            return None
        records, segments = await self._poll(timeout_ms, None)
        self._handout = _Handout(records, segments) if records else None
        return self._handout

    # ------------------------------------------------------------------ commit
    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        """Commit `offsets` (the next offset to process, per partition) for the group, or by
        default the position of every partition poll returned records of. Durable (fsynced
        by the broker) when it returns."""
        await self._commit(self._offsets_to_commit(offsets))

    def commit_async(
        self, offsets: Mapping[TopicPartition, int] | None = None
    ) -> asyncio.Future[None]:
        """Schedule commit(offsets), the default positions taken now; await the result or
        not (a failure is logged either way)."""
        self._check_open()
        return self._spawn(self._commit_logged(self._offsets_to_commit(offsets)), "commit")

    async def _commit_tracked(self, offsets: dict[TopicPartition, int]) -> None:
        """commit_async of the sync facade: a task close() waits for."""
        self._check_open()
        await self._spawn(self._commit_logged(offsets), "commit")

    async def _commit_logged(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            await self._commit(offsets)
        except RiverlogError as e:
            log.warning("commit_async failed: %s", e)
            raise

    def _offsets_to_commit(
        self, offsets: Mapping[TopicPartition, int] | None
    ) -> dict[TopicPartition, int]:
        if self._group is None:
            raise InvalidArgumentError(
                "commit needs a group: this consumer was made without group=..., so it has "
                "nowhere to store offsets"
            )
        if offsets is not None:
            out = {}
            for tp, offset in offsets.items():
                (key,) = _partitions([tp])
                _check_int(f"offset for {_name(key)}", offset, 0)
                out[key] = offset
            return out
        positions = {tp: st.position for tp, st in self._parts.items()}
        if self._handout is not None:
            for tp, offset in self._handout.first_unyielded().items():
                if tp in positions:
                    positions[tp] = offset
        return {
            tp: o for tp, o in positions.items() if o is not None and self._committed.get(tp) != o
        }

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        if self._groups is None:
            self._start()
        assert self._groups is not None
        request = groups_pb2.CommitOffsetsRequest(
            offsets=[
                groups_pb2.OffsetToCommit(topic=tp.topic, partition=tp.partition, offset=o)
                for tp, o in sorted(offsets.items())
            ]
        )
        for _attempt in range(COMMIT_ATTEMPTS_MAX):
            generation, epoch = self._generation, self._epoch
            if self._subscribed and not self._member_id:
                raise GroupError(
                    f"cannot commit for group {self._group!r}: this consumer is not a member "
                    "right now (joining, or rejoining after losing its partitions)",
                    name="UNKNOWN_MEMBER",
                )
            request.member.CopyFrom(self._as_member())
            try:
                await self._groups.CommitOffsets(request, timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                if self._subscribed and error.name == "FENCED_MEMBER":
                    await self._next_answer(epoch)
                    continue
                if self._subscribed and error.name in MEMBERSHIP_GONE:
                    self._lose_membership(f"commit refused {error.name}", generation)
                raise error from None
            self._committed.update(offsets)
            return
        raise GroupError(
            f"commit for group {self._group!r} refused FENCED_MEMBER {COMMIT_ATTEMPTS_MAX} "
            "times in a row",
            name="FENCED_MEMBER",
        )

    async def _commit_quietly(self) -> None:
        """Auto-commit: a failure is logged, not raised (the next one retries)."""
        self._next_auto_commit_s = time.monotonic() + self._auto_commit_s
        if not self._member_ok():
            return
        try:
            await self.commit()
        except RiverlogError as e:
            log.warning("auto-commit failed: %s", e)

    def _member_ok(self) -> bool:
        return not self._subscribed or bool(self._member_id)

    def _as_member(self) -> types_pb2.GroupMember:
        if self._subscribed:
            return types_pb2.GroupMember(
                group_id=self._group_id, member_id=self._member_id, member_epoch=self._epoch
            )
        # A group without members accepts commits from member "" at epoch -1.
        return types_pb2.GroupMember(group_id=self._group_id, member_id="", member_epoch=-1)

    # ------------------------------------------------------------------ lag
    async def lag(self) -> dict[TopicPartition, int]:
        """Per assigned partition: log end offset - position (partitions that have no
        position, under auto_offset_reset "error", are left out)."""
        self._start()
        await self._set_positions(dict(self._parts))
        positions = {tp: self.position(tp) for tp in self._parts}
        known = sorted(tp for tp, o in positions.items() if o is not None)
        results = await self._list_offsets(known, "latest")
        out: dict[TopicPartition, int] = {}
        for tp in known:
            r, position = results[tp], positions[tp]
            if not r.error.code and position is not None:
                out[tp] = max(0, r.log_end_offset - position)
        return out

    # ------------------------------------------------------------------ reconcile
    async def _reconcile(self) -> None:
        """Bring the partitions worked in line with the group's answer (or assign()):
        give back, take over, set positions, call the callbacks. Runs inside poll."""
        async with self._reconcile_lock:
            while self._reconcile_needed:
                self._reconcile_needed = False
                try:
                    await self._reconcile_once()
                except BaseException:
                    self._reconcile_needed = True  # the next poll tries again
                    raise

    async def _reconcile_once(self) -> None:
        if self._lost:
            lost, self._lost = sorted(self._lost), set()
            if self._handout is not None:
                self._handout.discard(set(lost))
            self._call_back(self._on_revoke, lost)
        if self._discover:
            await self._discover_partitions()
            self._discover = False
        if not self._subscribed:
            await self._set_positions(dict(self._parts))
            return
        revoked = sorted(tp for tp in self._parts if tp not in self._target)
        if revoked:
            await self._give_back(revoked)
        added = sorted(tp for tp in self._target if tp in self._held and tp not in self._parts)
        if added:
            generation = self._generation
            fresh = {tp: _Partition() for tp in added}
            self._parts.update(fresh)
            try:
                await self._set_positions(fresh)
            except BaseException:
                # Not taken yet: the next reconcile must see them as new again, or they would
                # stay without a position (never fetched, no on_assign) while owned.
                for tp, part in fresh.items():
                    if self._parts.get(tp) is part:
                        del self._parts[tp]
                raise
            if generation == self._generation:
                taken = [tp for tp in added if self._parts.get(tp) is fresh[tp]]
                self._call_back(self._on_assign, taken)

    async def _give_back(self, revoked: list[TopicPartition]) -> None:
        generation = self._generation
        self._rewind(set(revoked))
        if self._auto_commit:
            positions = {tp: self._parts[tp].position for tp in revoked}
            try:
                await self._commit(
                    {
                        tp: o
                        for tp, o in positions.items()
                        if o is not None and self._committed.get(tp) != o
                    }
                )
            except RiverlogError as e:
                log.warning("commit before giving back %s failed: %s", revoked, e)
        if generation != self._generation:
            return  # the membership was lost meanwhile: these were lost with it
        try:
            self._call_back(self._on_revoke, revoked)
        finally:
            self._drop_chunks(set(revoked))  # in case the target took them back meanwhile
            for tp in revoked:
                self._parts.pop(tp, None)
                self._held.discard(tp)
            self._heartbeat_soon()

    def _call_back(self, callback: Callback | None, tps: list[TopicPartition]) -> None:
        if callback is not None and tps:
            callback(tps)

    async def _discover_partitions(self) -> None:
        """Topics or a pattern without a group: every partition of them, as they are now."""
        assert self._channel is not None
        admin: admin_pb2_grpc.AdminAsyncStub = admin_pb2_grpc.AdminStub(self._channel)
        try:
            answer = await admin.ListTopics(admin_pb2.ListTopicsRequest(), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        counts = {t.name: t.partitions for t in answer.topics}
        if self._pattern is not None:
            compiled = compile_pattern(self._pattern)
            names = sorted(n for n in counts if compiled.fullmatch(n))
        else:
            missing = [t for t in self._topics if t not in counts]
            if missing:
                raise NotFoundError(f"no such topic: {', '.join(missing)}")
            names = list(self._topics)
        self._set_partitions([TopicPartition(n, p) for n in names for p in range(counts[n])])

    async def _set_positions(self, parts: dict[TopicPartition, _Partition]) -> None:
        """Give partitions without a position one (the group's committed offset, else
        auto_offset_reset) and have them fetched."""
        todo = {tp: st for tp, st in parts.items() if st.position is None and st.error is None}
        if not todo:
            return
        try:
            await self._place(todo)
        finally:
            self._refetch()

    async def _place(self, todo: dict[TopicPartition, _Partition]) -> None:
        if self._group is not None:
            committed = await self._fetch_committed(sorted(todo))
            for tp, offset in committed.items():
                st = todo.get(tp)
                if offset is not None and st is not None and st.position is None:
                    st.place(offset)
                    self._committed[tp] = offset
        todo = {tp: st for tp, st in todo.items() if st.position is None}
        if not todo:
            return
        if self._reset == "error":
            for tp, st in todo.items():
                st.error = OffsetOutOfRangeError(
                    f"{_name(tp)} has no committed offset"
                    + (f" in group {self._group!r}" if self._group else "")
                    + " and auto_offset_reset is 'error': seek() it first"
                )
            return
        results = await self._list_offsets(sorted(todo), self._reset)
        for tp, st in todo.items():
            r = results[tp]
            if r.error.code:
                st.error = from_partition_error(r.error.code, f"{_name(tp)}: {r.error.message}")
            elif st.position is None:
                st.place(r.offset)

    # ------------------------------------------------------------------ buffer
    def _rewind(self, tps: set[TopicPartition]) -> None:
        """Forget the buffered and not yet yielded records of `tps`: their position is the
        first offset the user has not seen, and fetching resumes there."""
        if not tps:
            return
        if self._handout is not None:
            for tp, offset in self._handout.discard(tps).items():
                st = self._parts.get(tp)
                if st is not None:
                    st.position = offset
        self._drop_chunks(tps)

    def _drop_chunks(self, tps: set[TopicPartition]) -> None:
        if any(chunk.tp in tps for chunk in self._buffer):
            kept = deque(chunk for chunk in self._buffer if chunk.tp not in tps)
            self._buffered_bytes = sum(chunk.nbytes for chunk in kept)
            self._buffer = kept
            self._fetch_wake.set()
        for tp in tps:
            st = self._parts.get(tp)
            if st is not None:
                st.fetch_offset = st.position
                st.version += 1

    def _refetch(self) -> None:
        """What to fetch changed: end the long-poll in flight and ask again."""
        self._fetch_wake.set()
        if self._fetch_call is not None:
            self._fetch_call.cancel()

    # ------------------------------------------------------------------ fetch task
    def _fetchable(self, tp: TopicPartition, st: _Partition) -> bool:
        return (
            st.fetch_offset is not None
            and not st.paused
            and st.error is None
            and (not self._subscribed or tp in self._target)
        )

    def _fetch_request(self) -> tuple[broker_pb2.FetchRequest, dict[TopicPartition, int]] | None:
        space = self._buffer_bytes_max - self._buffered_bytes - self._reserved_bytes
        if space <= 0:
            return None
        wanted = [
            (tp, st.fetch_offset)
            for tp, st in self._parts.items()
            if st.fetch_offset is not None and self._fetchable(tp, st)
        ]
        if not wanted:
            return None
        # Start each request at another partition: the budget goes to the first ones.
        self._fetch_round += 1
        turn = self._fetch_round % len(wanted)
        wanted = (wanted[turn:] + wanted[:turn])[:REQUEST_PARTITIONS_MAX]
        max_bytes = min(self._fetch_max_bytes, space)
        per_partition = min(self._partition_fetch_bytes, max_bytes)
        request = broker_pb2.FetchRequest(
            partitions=[
                broker_pb2.FetchPartition(
                    topic=tp.topic, partition=tp.partition, offset=o, max_bytes=per_partition
                )
                for tp, o in wanted
            ],
            max_wait_ms=self._fetch_wait_ms,
            min_bytes=1,
            max_bytes=max_bytes,
        )
        if self._subscribed:
            request.member.CopyFrom(self._as_member())
        return request, dict(wanted)

    def _send_fetch(self) -> _Fetch | None:
        """Start a fetch for what is wanted now (None: nothing to fetch, or no space)."""
        assert self._broker is not None
        built = self._fetch_request()
        if built is None:
            return None
        request, wanted = built
        timeout_s = self._fetch_wait_ms / 1000 + FETCH_TIMEOUT_MARGIN_S
        call = self._broker.Fetch(request, timeout=timeout_s)
        self._fetch_call = call
        return call, wanted, self._generation

    async def _fetch_loop(self) -> None:
        """One fetch in flight at a time; the next one is sent before the answer to the last
        one is decoded, so the broker and the network work while this process decodes."""
        task = asyncio.current_task()
        backoff_s = RETRY_BACKOFF_S_MIN
        sent: _Fetch | None = None
        while not self.closed:
            if sent is None:
                self._fetch_wake.clear()
                sent = self._send_fetch()
                if sent is None:
                    await self._fetch_wake.wait()
                    continue
            call, wanted, generation = sent
            sent = None
            try:
                answer = await call
            except asyncio.CancelledError:
                if self.closed or (task is not None and task.cancelling()):
                    raise
                continue  # _refetch ended it: ask again for what is wanted now
            except grpc.RpcError as e:
                await self._fetch_failed(from_rpc_error(e), wanted, generation)
                await asyncio.sleep(backoff_s)
                backoff_s = min(2 * backoff_s, RETRY_BACKOFF_S_MAX)
                continue
            finally:
                if self._fetch_call is call:
                    self._fetch_call = None
            backoff_s = RETRY_BACKOFF_S_MIN
            if answer.heartbeat_now:
                self._heartbeat_soon()
            # Over a fetch quota: no fetch (not even the pipelined one) for this long.
            pause_s = throttle_s(answer.throttle_time_ms) if answer.throttle_time_ms > 0 else 0.0
            claims, out_of_range = self._claim(answer, wanted)
            if claims and not out_of_range and not pause_s:
                self._fetch_wake.clear()
                sent = self._send_fetch()
                if sent is not None:
                    for _ in range(FETCH_START_TURNS):  # lets grpc put the request on the wire
                        await asyncio.sleep(0)
            self._decode(claims)
            if out_of_range:
                await self._check_offsets(out_of_range)
            if pause_s:
                await asyncio.sleep(pause_s)

    def _claim(
        self, answer: broker_pb2.FetchResponse, wanted: dict[TopicPartition, int]
    ) -> tuple[list[_Claim], list[TopicPartition]]:
        """The parts of a fetch answer still wanted, their fetch offsets moved past them and
        their bytes reserved in the buffer; and the partitions whose offset turned out to be
        outside the log. Records are decoded later (_decode)."""
        claims: list[_Claim] = []
        out_of_range: list[TopicPartition] = []
        for r in answer.results:
            tp = TopicPartition(r.topic, r.partition)
            offset, st = wanted.get(tp), self._parts.get(tp)
            if offset is None or st is None or st.fetch_offset != offset:
                continue  # seeked, rewound or unassigned while the fetch was out
            if not self._fetchable(tp, st):
                continue  # paused or revoked meanwhile
            if r.error.code:
                error = from_partition_error(r.error.code, f"{_name(tp)}: {r.error.message}")
                if isinstance(error, OffsetOutOfRangeError):
                    out_of_range.append(tp)
                elif isinstance(error, NotFoundError):
                    st.error = error
                else:
                    log.info("fetch of %s failed (retrying): %s", _name(tp), error)
                continue
            data = r.record_batches
            if not data:
                continue
            try:
                last = _last_offset(data)
            except StorageError as e:
                st.error = RiverlogError(f"{_name(tp)}: corrupt fetch answer at {offset}: {e}")
                continue
            if last < offset:
                st.error = RiverlogError(
                    f"{_name(tp)}: asked for offset {offset}, the broker sent records up to {last}"
                )
                continue
            st.fetch_offset = last + 1
            claims.append(_Claim(tp, st, st.version, offset, last, data))
            self._reserved_bytes += len(data)
        return claims, out_of_range

    def _decode(self, claims: list[_Claim]) -> None:
        """Decode claimed answers into the buffer, unless a seek, pause or revocation made
        them stale meanwhile."""
        arrived = False
        try:
            for tp, st, version, offset, last, data in claims:
                if self._parts.get(tp) is not st or st.version != version:
                    continue
                try:
                    # Without the records below `offset`: the batch holding it may start before.
                    records, decoded_last = decode_fetch(data, tp.topic, tp.partition, offset)
                except StorageError as e:
                    st.error = RiverlogError(f"{_name(tp)}: corrupt fetch answer at {offset}: {e}")
                    continue
                if decoded_last != last:
                    st.error = RiverlogError(
                        f"{_name(tp)}: batch headers end at offset {last}, records at "
                        f"{decoded_last}"
                    )
                    continue
                self._buffer.append(_Chunk(tp, records, len(data)))
                self._buffered_bytes += len(data)
                arrived = True
        finally:
            self._reserved_bytes = 0
        if arrived:
            self._poll_wake.set()

    async def _fetch_failed(
        self, error: RiverlogError, wanted: dict[TopicPartition, int], generation: int
    ) -> None:
        """A whole fetch call failed (every partition did, or the group refused it)."""
        if isinstance(error, GroupError):
            if error.name in MEMBERSHIP_GONE:
                self._lose_membership(f"fetch refused {error.name}", generation)
            else:  # FENCED_MEMBER, NOT_OWNED: our view is behind; the next answer brings it
                self._heartbeat_soon()
        elif isinstance(error, OffsetOutOfRangeError | NotFoundError):
            await self._check_offsets(sorted(wanted))
        elif error.retriable:
            log.info("fetch failed (retrying): %s", error)
        else:
            self._error = error
            self._poll_wake.set()

    async def _check_offsets(self, tps: list[TopicPartition]) -> None:
        """Partitions a fetch could not read: missing ones get an error, positions outside
        the log move per auto_offset_reset."""
        try:
            results = await self._list_offsets(tps, "earliest")
        except NotFoundError as e:
            results = {}
            for tp in tps:
                if tp in self._parts:
                    self._parts[tp].error = e
        except RiverlogError as e:
            log.info("cannot check offsets of %s (retrying): %s", tps, e)
            return
        for tp, r in results.items():
            st = self._parts.get(tp)
            if st is None or st.fetch_offset is None:
                continue
            if r.error.code:
                st.error = from_partition_error(r.error.code, f"{_name(tp)}: {r.error.message}")
                continue
            start, end = r.log_start_offset, r.log_end_offset
            if start <= st.fetch_offset <= end:
                continue
            if self._reset == "error":
                st.error = OffsetOutOfRangeError(
                    f"{_name(tp)}: offset {st.fetch_offset} is outside the log "
                    f"[{start}, {end}] and auto_offset_reset is 'error': seek() it"
                )
                continue
            new = start if self._reset == "earliest" else end
            log.warning(
                "%s: offset %d is outside the log [%d, %d]; resetting to %s offset %d",
                _name(tp),
                st.fetch_offset,
                start,
                end,
                self._reset,
                new,
            )
            if st.position == st.fetch_offset:
                st.position = new
            st.fetch_offset = new
        self._poll_wake.set()

    # ------------------------------------------------------------------ broker calls
    async def _list_offsets(
        self, tps: Sequence[TopicPartition], spec: str | int
    ) -> dict[TopicPartition, broker_pb2.ListOffsetsResponse.Result]:
        assert self._broker is not None
        out: dict[TopicPartition, broker_pb2.ListOffsetsResponse.Result] = {}
        query = broker_pb2.ListOffsetsRequest.Query
        for i in range(0, len(tps), REQUEST_PARTITIONS_MAX):
            queries = []
            for tp in tps[i : i + REQUEST_PARTITIONS_MAX]:
                q = query(topic=tp.topic, partition=tp.partition)
                if spec == "earliest":
                    q.earliest = True
                elif spec == "latest":
                    q.latest = True
                else:
                    q.timestamp_ms = int(spec)
                queries.append(q)
            request = broker_pb2.ListOffsetsRequest(queries=queries)
            try:
                answer = await self._broker.ListOffsets(request, timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
            for r in answer.results:
                out[TopicPartition(r.topic, r.partition)] = r
        return out

    async def _fetch_committed(
        self, tps: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int | None]:
        assert self._groups is not None
        out: dict[TopicPartition, int | None] = {}
        for i in range(0, len(tps), REQUEST_PARTITIONS_MAX):
            request = groups_pb2.FetchOffsetsRequest(
                group_id=self._group_id, partitions=_grouped(tps[i : i + REQUEST_PARTITIONS_MAX])
            )
            try:
                answer = await self._groups.FetchOffsets(request, timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
            for c in answer.offsets:
                out[TopicPartition(c.topic, c.partition)] = (
                    c.offset if c.HasField("offset") else None
                )
        return out

    # ------------------------------------------------------------------ heartbeat task
    def _heartbeat_soon(self) -> None:
        self._hb_wake.set()

    async def _heartbeat_loop(self) -> None:
        while not self.closed:
            if self._idle_s() > self._max_poll_interval_s:
                await self._leave_idle()
                continue
            self._hb_wake.clear()
            sent_s = time.monotonic()
            delay_s = await self._heartbeat_once()
            delay_s = min(delay_s, self._max_poll_interval_s - self._idle_s())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hb_wake.wait(), max(delay_s, 0))
            gap_s = HEARTBEAT_GAP_S_MIN - (time.monotonic() - sent_s)
            if gap_s > 0:
                await asyncio.sleep(gap_s)

    def _idle_s(self) -> float:
        """How long the user has made no progress: no poll running, no record taken from
        an iteration's batch since the last look (iterators step without calling in)."""
        if self._polling:
            return 0.0
        handout = self._handout
        progress = (handout, -1 if handout is None else handout.next)
        if progress[0] is not self._progress[0] or progress[1] != self._progress[1]:
            self._progress = progress
            self._last_poll_s = time.monotonic()
        return time.monotonic() - self._last_poll_s

    async def _heartbeat_once(self) -> float:
        """One heartbeat (a join without a member id); the delay until the next one."""
        assert self._groups is not None
        generation, joining = self._generation, not self._member_id
        request = groups_pb2.HeartbeatRequest(
            group_id=self._group_id,
            member_id=self._member_id,
            member_epoch=self._epoch,
            session_timeout_ms=self._session_timeout_ms,
            rebalance_timeout_ms=self._rebalance_timeout_ms,
        )
        if self._instance_id is not None:
            request.instance_id = self._instance_id
        if joining:
            request.subscription.topics.extend(self._topics)
            if self._pattern is not None:
                request.subscription.pattern = self._pattern
        else:
            request.owned.SetInParent()
            request.owned.topics.extend(_grouped(self._held))
        try:
            answer = await self._groups.Heartbeat(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            self._answered.set()
            error = from_rpc_error(e)
            if not joining and error.name in MEMBERSHIP_GONE | {"FENCED_MEMBER"}:
                self._lose_membership(f"heartbeat refused {error.name}", generation)
                return 0.0  # rejoin at once
            if error.retriable:
                log.info("heartbeat failed (retrying): %s", error)
            else:
                log.warning("heartbeat refused: %s", error)
                self._error = error
                self._poll_wake.set()
            return RETRY_BACKOFF_S_MAX
        self._answered.set()  # no await until the answer is applied below
        if generation != self._generation:
            return 0.0  # the membership was lost while this heartbeat was out
        if joining:
            log.info("joined group %s as member %s", self._group, answer.member_id)
        self._member_id, self._epoch = answer.member_id, answer.member_epoch
        self._interval_s = answer.heartbeat_interval_ms / 1000
        target = frozenset(
            TopicPartition(t.topic, p) for t in answer.assignment for p in t.partitions
        )
        self._held |= target
        if target != self._target or not target <= self._parts.keys():
            self._target = target
            self._reconcile_needed = True
            self._poll_wake.set()
        return self._interval_s

    async def _next_answer(self, epoch: int) -> None:
        """Wait (bounded) for a heartbeat answer, after a commit was refused at `epoch`."""
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while self._epoch == epoch and self._member_id and time.monotonic() < deadline:
            self._answered.clear()
            self._heartbeat_soon()
            try:
                await asyncio.wait_for(self._answered.wait(), deadline - time.monotonic())
            except TimeoutError:
                return
            if self._epoch == epoch:
                return  # answered at the same epoch: try again anyway

    def _lose_membership(self, reason: str, generation: int) -> None:
        """The broker no longer counts us as the member we were: drop every partition
        uncommitted (on_revoke at the next poll) and rejoin."""
        if generation != self._generation or not self._member_id:
            return
        log.warning(
            "member %s of group %s lost its membership (%s); rejoining",
            self._member_id,
            self._group,
            reason,
        )
        self._generation += 1
        self._member_id, self._epoch = "", 0
        lost = set(self._parts)
        self._drop_chunks(lost)
        self._parts.clear()
        self._held.clear()
        self._target = frozenset()
        self._lost |= lost
        self._reconcile_needed = True
        self._poll_wake.set()
        self._heartbeat_soon()

    async def _leave_idle(self) -> None:
        log.warning(
            "no poll for %.0f ms (max_poll_interval_ms): leaving group %s so its partitions "
            "go to members that make progress; the next poll rejoins",
            self._max_poll_interval_s * 1000,
            self._group,
        )
        await self._leave()
        self._lose_membership("max_poll_interval_ms passed without a poll", self._generation)
        self._polled.clear()
        await self._polled.wait()

    async def _leave(self) -> None:
        if not self._member_id:
            return
        assert self._groups is not None
        request = groups_pb2.LeaveGroupRequest(
            group_id=self._group_id, member_id=self._member_id, member_epoch=self._epoch
        )
        try:
            await self._groups.LeaveGroup(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            log.info("leaving group %s failed: %s", self._group, from_rpc_error(e))

    async def _stop_heartbeats(self) -> None:
        """Let the heartbeat in flight finish (so the epoch we leave with is current)."""
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is None:
            return
        self._hb_wake.set()
        self._polled.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), RPC_TIMEOUT_S + 1)
        except TimeoutError:
            task.cancel()
        except Exception:
            log.debug("heartbeat task ended with an error", exc_info=True)


# ---------------------------------------------------------------------------- sync facade
async def _thread_ident() -> int:
    return threading.get_ident()


class Consumer:
    """AsyncConsumer for synchronous code: the same constructor and methods, run on a
    private event-loop thread. `for record in consumer` yields until the consumer is closed.

    on_assign / on_revoke run on that loop thread while poll waits. From them, only the
    non-blocking methods (assignment, position, pause, resume, seek) may be called.
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        group: str | None = None,
        topics: Sequence[str] = (),
        pattern: str | None = None,
        auto_offset_reset: str = "latest",
        enable_auto_commit: bool = True,
        auto_commit_interval_ms: int = 1000,
        session_timeout_ms: int = 45_000,
        rebalance_timeout_ms: int = 60_000,
        max_poll_interval_ms: int = 300_000,
        instance_id: str | None = None,
        fetch_max_bytes: int = 4 * MiB,
        max_partition_fetch_bytes: int = 1 * MiB,
        fetch_max_wait_ms: int = 500,
        buffer_bytes_max: int = 8 * MiB,
        on_assign: Callback | None = None,
        on_revoke: Callback | None = None,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        self._core = AsyncConsumer(
            server,
            group=group,
            topics=topics,
            pattern=pattern,
            auto_offset_reset=auto_offset_reset,
            enable_auto_commit=enable_auto_commit,
            auto_commit_interval_ms=auto_commit_interval_ms,
            session_timeout_ms=session_timeout_ms,
            rebalance_timeout_ms=rebalance_timeout_ms,
            max_poll_interval_ms=max_poll_interval_ms,
            instance_id=instance_id,
            fetch_max_bytes=fetch_max_bytes,
            max_partition_fetch_bytes=max_partition_fetch_bytes,
            fetch_max_wait_ms=fetch_max_wait_ms,
            buffer_bytes_max=buffer_bytes_max,
            on_assign=on_assign,
            on_revoke=on_revoke,
            token=token,
            tls=tls,
        )
        self._thread = EventLoopThread("riverlog-consumer")
        self._loop_ident = self._thread.run(_thread_ident())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.get_ident() == self._loop_ident:
            coro.close()
            raise RuntimeError(
                "this Consumer method waits for the consumer's event loop and was called on "
                "that loop's thread (from on_assign/on_revoke?): only assignment, position, "
                "pause, resume and seek may be called there"
            )
        return self._thread.run(coro)

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a non-blocking core method on the loop (directly when already there)."""
        if threading.get_ident() == self._loop_ident:
            return fn(*args)

        async def call() -> T:
            return fn(*args)

        return self._thread.run(call())

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def buffered_bytes(self) -> int:
        return self._core.buffered_bytes

    def poll(self, timeout_ms: int = 1000, max_records: int | None = None) -> list[Record]:
        return self._run(self._core.poll(timeout_ms, max_records))

    def __iter__(self) -> Iterator[Record]:
        """Records until the consumer is closed. Breaking out loses nothing: records not
        yielded yet come from the next poll or iteration."""
        core = self._core
        while not core.closed:
            handout = self._run(core._next_handout(ITERATION_POLL_MS))
            while handout is not None and handout.next < len(handout.records):
                record = handout.records[handout.next]
                handout.next += 1
                yield record

    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        self._run(self._core.commit(offsets))

    def commit_async(
        self, offsets: Mapping[TopicPartition, int] | None = None
    ) -> concurrent.futures.Future[None]:
        chosen = self._call(self._core._offsets_to_commit, offsets)
        return self._thread.submit(self._core._commit_tracked(chosen))

    def seek(self, tp: TopicPartition | tuple[str, int], offset: int) -> None:
        self._call(self._core._seek_now, tp, offset)

    def seek_to_beginning(self, tps: Iterable[TopicPartition] | None = None) -> None:
        self._run(self._core.seek_to_beginning(tps))

    def seek_to_end(self, tps: Iterable[TopicPartition] | None = None) -> None:
        self._run(self._core.seek_to_end(tps))

    def seek_to_timestamp(
        self, timestamp_ms: int, tps: Iterable[TopicPartition] | None = None
    ) -> None:
        self._run(self._core.seek_to_timestamp(timestamp_ms, tps))

    def assign(self, tps: Iterable[TopicPartition | tuple[str, int]]) -> None:
        self._call(self._core.assign, list(tps))

    def pause(self, tps: Iterable[TopicPartition | tuple[str, int]]) -> None:
        self._call(self._core.pause, list(tps))

    def resume(self, tps: Iterable[TopicPartition | tuple[str, int]]) -> None:
        self._call(self._core.resume, list(tps))

    def paused(self) -> frozenset[TopicPartition]:
        return self._call(self._core.paused)

    def assignment(self) -> frozenset[TopicPartition]:
        return self._call(self._core.assignment)

    def position(self, tp: TopicPartition | tuple[str, int]) -> int | None:
        return self._call(self._core.position, tp)

    def lag(self) -> dict[TopicPartition, int]:
        return self._run(self._core.lag())

    def close(self) -> None:
        """Commit (with auto-commit), leave the group, stop the loop thread."""
        if self._thread.loop.is_closed():
            return
        try:
            self._run(self._core.close())
        finally:
            self._thread.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


__all__ = ["AsyncConsumer", "Consumer"]
