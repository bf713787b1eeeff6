"""The producer: `AsyncProducer` on grpc.aio, `Producer` its sync facade.

Design. `send` does as little per record as it can: pick the partition, append a
(key, value, timestamp_ms, headers) tuple and its future to the open batch of that
partition, add an estimated size to two counters. Everything else happens per batch, on the
event loop, in one sender task:

    send ──> open batch per partition ──(batch_bytes reached, or linger_ms passed)──> sealed
         sealed batches ──encode_batch (one RecordBatch v2, compressed)──> ProduceRequest
         ProduceRequest ──one ProduceStream, at most max_in_flight unanswered──> broker
         answers (in order, matched by correlation id) ──> each record's future

A batch is sealed when the next record would take it past `batch_bytes` (sizes are estimated:
key + value + header bytes + RECORD_OVERHEAD_BYTES; a record larger than `batch_bytes` gets a
batch, and a request, of its own), or when the oldest open batch has waited `linger_ms`; then
every open batch is sealed, so that one request carries the batches of many partitions
(a Python gRPC stream carries only a few thousand messages a second: records per message
decide throughput, DESIGN.md). While `max_in_flight` requests await answers, batches keep
filling: under load they grow towards `batch_bytes` by themselves.

Partitions: the one given; else, for a keyed record, Kafka's murmur2 of the key modulo the
topic's partition count (the same partition as Kafka's Java client); else the topic's
"sticky" partition, which moves on to the next partition each time its batch is sealed
(Kafka's sticky partitioner: keyless records fill one batch at a time). Keyed records are
not hashed in `send` (murmur2 costs ~1.5 us a key in Python): they share one open batch per
topic, which is split per partition in bulk, with numpy, when it is sent; records of one key
keep their order (a keyed record sent with an explicit partition may pass keyed ones). The
partition count comes from riverlog.v1.Admin/DescribeTopic on the first send to a topic, and
is fetched again after a NOT_FOUND answer or a send to a partition beyond the known count.

acks (README "Durability"): "leader" (default) resolves a future once the broker has
appended the batch (OS page cache, plus the topic's fsync policy); "all" once the batch is
fsynced; "none" once the request is written to the stream: the broker sends no answer, the
offsets are -1 and a failed append is never seen by this producer.

Bounds. `buffer_bytes_max` bounds the records held (open, sealed, and in flight until their
answer); `send` waits up to `send_timeout_ms` for room, then raises BufferFullError. At most
`max_in_flight` requests await answers; one request carries at most REQUEST_BYTES_MAX bytes
of batches. A request without an answer after `request_timeout_ms` counts as a broken
stream.

Failures surface on the futures, never dropped: a per-partition error in an answer fails
that batch's futures only (the broker refuses a request with a bad entry whole, so such a
request is sent again one batch per request, to find the bad one). Retriable failures (a
broken or timed-out stream, UNAVAILABLE) are retried with exponential backoff from
`retry_backoff_ms`: every unanswered request is written again, in order, on a new stream, up
to `retries` times; after `retries` consecutive stream failures everything waiting fails with
the last error. Retries are queued by the order of the batches' first request, so a
partition's batches are resent in their order. Cancelling a record's future does not
withdraw it.

Idempotence (the default unless acks is "none"). Before its first batch the producer asks the
broker for a producer id and epoch (InitProducer; with `producer_name`, the name's id at a
new epoch, which fences an older instance). Every batch carries them and a base sequence
number that counts the partition's records from 0 (wrapping after 2**31 - 1). The bytes of a
batch are encoded once, so every retry carries the same numbers: the broker appends a batch
once and answers a resent one with its original offsets (`duplicate`). The broker remembers
5 batches per producer and partition, so at most IN_FLIGHT_PER_PARTITION_MAX (5) batches of
a partition await answers; more wait in the ready queue. Refusals:
  - OUT_OF_ORDER_SEQUENCE while an earlier batch of the partition is being retried: retried
    behind it;
  - a batch refused for good (too large, say): it fails, and the partition's later batches,
    refused as out of sequence, are numbered again from its sequence and resent;
  - UNKNOWN_PRODUCER (the broker expired this producer's state in the partition): the batch
    and its followers are numbered again from 0 and resent (refused at 0 too: the broker does
    not know the id at all, so a new one is taken first);
  - OUT_OF_ORDER_SEQUENCE at the partition's oldest batch (the broker lost acknowledged
    batches: fsync "never" and a power loss): the batch fails, and once nothing is in flight
    the producer takes a new id (or epoch) and every partition starts again at 0;
  - PRODUCER_FENCED: everything waiting fails with ProducerFencedError, and so does every
    later send: close this producer.
So a record whose future succeeded was appended exactly once, in send order within its
partition; a future that failed after its batch was sent (retries exhausted, close time-out)
means "maybe appended": exactly-once holds per producer session, not across a producer that
gives up and a new one that sends the same record again.
Without idempotence (acks "none", or idempotent=False) a retry after a lost answer may
append a batch twice: delivery is at-least-once.

Cost per 100-byte keyed record (2 cores, Python 3.11, thread CPU; 400,000 records into 4
partitions, A/B against the previous send in one process): ~0.7 us in a sync `send` with
the garbage collector off, ~1.3-1.4 us with its default thresholds (was ~0.9 and ~1.6-1.7
us); ~1.25 us on the loop thread (encode ~0.45 us, storage.encode_columns: records are kept
as columns, no tuple each; routing a keyed record ~0.17 us, murmur2 in bulk ~0.06 of it;
settling its future under 0.1 us, one pass per batch, `_settle`, no RecordMetadata made
until asked; gRPC and the rest). End to end: ~400,000 records/s with default gc (was
~350,000), ~525,000 with gc off (was ~475,000). The sync `send` takes the common record
(no headers, partition or timestamp, room in its open batch and in the buffer) inline,
between the lock's acquire and release (a `with` costs twice as much); anything else goes
through `_append`.
A record's future is one object for the garbage collector (its lists are made on first use,
its fields are inline values, not a dict); still, the collector walks every future held (by
the buffer and by the caller) in each full collection, about one per 70,000-85,000 records
sent, ~0.6 us a record of the default-gc figure: a process that sends millions of records
gains from a larger first threshold, `gc.set_threshold(100_000, 50, 100)`.
Callbacks of a Producer's futures run on its loop thread: there, a call that would wait (a
send that must wait, flush, close) raises RiverlogError instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import random
import threading
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import grpc.aio
import numpy as np
import numpy.typing as npt

from storage import encode_batch, encode_columns
from stream._pb import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc

from ._base import (
    BufferFullError,
    DeadlineExceededError,
    EventLoopThread,
    InvalidArgumentError,
    NotFoundError,
    OutOfOrderSequenceError,
    ProducerFencedError,
    RecordMetadata,
    ResourceExhaustedError,
    RiverlogError,
    TlsOptions,
    UnavailableError,
    UnknownProducerError,
    check_token,
    compression_of,
    default_server,
    from_partition_error,
    from_rpc_error,
    open_channel,
    throttle_s,
)

__all__ = ["AsyncProducer", "Producer"]

KiB = 1024
MiB = 1024 * KiB
# Per-record bytes added to key + value + headers when sizing batches and the buffer: the
# record's varints and attributes (7-12 bytes for small records), rounded up.
RECORD_OVERHEAD_BYTES = 12
# Per header: its two length varints.
HEADER_OVERHEAD_BYTES = 4
# The broker's hard limit on one batch (storage's BATCH_BYTES_MAX_LIMIT): a larger record can
# never be appended, and would not fit a gRPC message (MESSAGE_BYTES_MAX), so it fails here.
RECORD_BYTES_MAX = 64 * MiB
# Batch bytes in one ProduceRequest: big enough to amortise a gRPC message (a few thousand a
# second at most), small enough that one answer does not wait behind a huge append.
REQUEST_BYTES_MAX = 4 * MiB
# Entries in one ProduceRequest (the broker's REQUEST_PARTITIONS_MAX).
REQUEST_ENTRIES_MAX = 4096
# Exponential retry backoff stops growing here (Kafka's retry.backoff.max.ms).
RETRY_BACKOFF_MS_MAX = 1000
# How long close() waits for the broker to end the stream after the last request.
CLOSE_TIMEOUT_S = 5.0
# Idempotent produce: batches of one partition awaiting answers. The broker remembers the last
# 5 batches per producer and partition; a resent batch older than that could not be told apart
# from a new one.
IN_FLIGHT_PER_PARTITION_MAX = 5
_SEQUENCE_MOD = 2**31  # sequence numbers wrap past 2**31 - 1 to 0, as Kafka's
# Ready batches looked at (and passed over) per request while their partitions are held.
_SKIPPED_MAX = 1024

ACKS = {
    "none": broker_pb2.ACKS_NONE,
    "leader": broker_pb2.ACKS_LEADER,
    "all": broker_pb2.ACKS_ALL,
}
# Stream-level statuses that mean "the stream broke", not "this request is wrong": the
# unanswered requests are sent again on a new stream.
_STREAM_FATAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

Header = tuple[str, bytes | None]
AnyFuture = asyncio.Future[RecordMetadata] | concurrent.futures.Future[RecordMetadata]
_Call = grpc.aio.StreamStreamCall[broker_pb2.ProduceRequest, broker_pb2.ProduceResponse]
_INVALID_STATE = (asyncio.InvalidStateError, concurrent.futures.InvalidStateError)

# What `_append` did (plain ints: it runs once per record).
_OK = 0
_OK_SEALED = 1  # appended, and a batch was sealed: an async caller yields to the sender
_NEED_METADATA = 2
_NO_PARTITION = 3
_NEED_SPACE = 4
_TOO_LARGE = 5  # for the buffer, or for any broker
_BAD_TIMESTAMP = 6
_CLOSED = 7

# What `_refused` decided for an idempotent batch the broker refused.
_HANDLED = 0  # kept to be sent again (or the producer was fenced)
_RETRY = 1
_FAIL = 2

T = TypeVar("T")

_time_ns = time.time_ns
_PENDING = "PENDING"  # concurrent.futures._base.PENDING
_FINISHED = "FINISHED"  # concurrent.futures._base.FINISHED
_new_tuple = tuple.__new__

# An open batch of keyed records whose partitions are not chosen yet (see `_route`).
_UNROUTED = -1


# ---------------------------------------------------------------------------- state
@dataclass(eq=False, slots=True)
class _Batch:
    """Records for one partition, in send order, as columns (no tuple per record: one object
    less per send for the garbage collector); `data` once encoded."""

    seq: int  # creation order, for flush(); the batches routed from one share its seq
    topic: str
    partition: int  # _UNROUTED: keyed records, partitioned in bulk when sent
    created_s: float
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    stamps: list[int] = field(default_factory=list)
    # Each record's headers, once one record of the batch has any (then () for the others).
    headers: list[Sequence[Header]] | None = None
    futures: list[AnyFuture] = field(default_factory=list)
    size: int = 0  # estimated bytes (key + value + headers + overhead per record)
    solo: bool = False  # larger than batch_bytes: sent in a request of its own
    data: bytes = b""
    finished: bool = False
    base_seq: int = -1  # idempotent: the sequence number of the first record, once encoded


@dataclass(eq=False, slots=True)
class _Sequence:
    """Idempotent-produce state of one partition (loop only)."""

    next_seq: int = 0
    # Encoded batches without an outcome, in sequence order: at most
    # IN_FLIGHT_PER_PARTITION_MAX.
    pending: list[_Batch] = field(default_factory=list)
    # Set while refusals are collected after a batch of this partition was not appended: the
    # later ones are refused too (their sequence does not follow), kept in `resend`, and
    # encoded again from this sequence once none is awaiting an answer.
    rewind_to: int | None = None
    resend: list[_Batch] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Topic:
    partitions: int
    sticky: int
    stale: bool = False  # a NOT_FOUND answer: describe again before the next send
    open: list[_Batch | None] = field(default_factory=list)  # by partition
    keyed: _Batch | None = None  # keyed records without a partition yet


@dataclass(eq=False, slots=True)
class _Request:
    correlation_id: int
    batches: list[_Batch]
    message: broker_pb2.ProduceRequest
    attempts: int = 0  # times written to a stream that then failed
    not_before_s: float = 0.0
    sent_s: float = 0.0
    origin: int = 0  # correlation id of the first request of these batches: retries keep order


def _error_of(error: BaseException) -> RiverlogError:
    if isinstance(error, RiverlogError):
        return error
    if isinstance(error, grpc.RpcError):
        return from_rpc_error(error)
    return UnavailableError(f"produce stream failed: {error!r}")


def _retriable_on_stream(error: RiverlogError) -> bool:
    return error.code is None or error.code not in _STREAM_FATAL


def _headers_size(headers: tuple[Header, ...]) -> int:
    size = 0
    for hkey, hvalue in headers:
        if not isinstance(hkey, str) or not (hvalue is None or isinstance(hvalue, bytes)):
            raise TypeError(
                f"a header is (str, bytes | None), got ({type(hkey).__name__}, "
                f"{type(hvalue).__name__})"
            )
        size += len(hkey) + HEADER_OVERHEAD_BYTES + (0 if hvalue is None else len(hvalue))
    return size


# ---------------------------------------------------------------------------- async core
class AsyncProducer:
    """Sends records to a riverlog broker, batched per partition over one ProduceStream.

    `send` returns a future per record, resolved with its RecordMetadata (offset -1 with
    acks "none") or failed with a RiverlogError. See the module docstring for batching,
    partitioning, retries and bounds. Use on one event loop; `async with` closes it.

    Settings: `acks` "none" / "leader" / "all"; `linger_ms` how long a batch waits for more
    records; `batch_bytes` a batch's size (estimated; keep it at most the broker's
    batch_bytes_max, 1 MiB by default); `buffer_bytes_max` records held, unsent or
    unanswered; `compression` None, "gzip", "lz4" or "zstd"; `max_in_flight` requests
    awaiting answers; `retries` and `retry_backoff_ms` (doubling, up to 1 s) for retriable
    failures; `send_timeout_ms` the longest `send` waits (for buffer space, or for the first
    description of a topic); `request_timeout_ms` the longest wait for one answer.
    `idempotent` (default: on unless acks is "none") numbers every batch so that a retry is
    never appended twice and order is kept (see the module docstring); `producer_name` gives
    an idempotent producer a stable identity: starting another producer with the same name
    fences this one (ProducerFencedError). `token` (a bearer token) and `tls` (TlsOptions):
    the connection's credentials (stream/client/_base.py).

    Quotas: an answer with throttle_time_ms > 0 pauses the sending of requests for that long
    (at most THROTTLE_MS_MAX); batches keep filling meanwhile.
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        acks: str = "leader",
        linger_ms: int = 5,
        batch_bytes: int = 1 * MiB,
        buffer_bytes_max: int = 32 * MiB,
        compression: str | None = None,
        max_in_flight: int = 8,
        retries: int = 5,
        retry_backoff_ms: int = 100,
        send_timeout_ms: int = 10_000,
        request_timeout_ms: int = 30_000,
        idempotent: bool | None = None,
        producer_name: str | None = None,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        if acks not in ACKS:
            raise InvalidArgumentError(f"acks must be 'none', 'leader' or 'all', got {acks!r}")
        if idempotent is None:
            idempotent = acks != "none"
        elif idempotent and acks == "none":
            raise InvalidArgumentError(
                "an idempotent producer needs answers: use acks 'leader' or 'all', or "
                "idempotent=False"
            )
        if producer_name is not None and not idempotent:
            raise InvalidArgumentError("producer_name needs an idempotent producer")
        checks = [
            ("linger_ms", linger_ms, 0, 60_000),
            ("batch_bytes", batch_bytes, 1, RECORD_BYTES_MAX),
            ("buffer_bytes_max", buffer_bytes_max, 1, 1 << 40),
            ("max_in_flight", max_in_flight, 1, 1024),
            ("retries", retries, 0, 1000),
            ("retry_backoff_ms", retry_backoff_ms, 0, 60_000),
            ("send_timeout_ms", send_timeout_ms, 0, 3_600_000),
            ("request_timeout_ms", request_timeout_ms, 1, 3_600_000),
        ]
        for name, value, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidArgumentError(
                    f"{name} must be an int in [{low}, {high}], got {value!r}"
                )
        self.server = default_server(server)
        self._token = None if token is None else check_token(token)
        self._tls = tls
        self._acks = ACKS[acks]
        self._acks_none = acks == "none"
        self._linger_s = linger_ms / 1000
        self._batch_bytes = batch_bytes
        self._buffer_bytes_max = buffer_bytes_max
        self._record_bytes_max = min(buffer_bytes_max, RECORD_BYTES_MAX)
        self._compression = compression_of(compression)
        self._max_in_flight = max_in_flight
        self._retries = retries
        self._retry_backoff_ms = retry_backoff_ms
        self._send_timeout_s = send_timeout_ms / 1000
        self._request_timeout_s = request_timeout_ms / 1000
        self._idempotent = bool(idempotent)
        self._producer_name = producer_name or ""

        # Shared with the threads of a sync facade: guarded by _lock.
        self._lock = threading.Lock()  # held around _append by threads of a sync facade
        self._topics: dict[str, _Topic] = {}
        self._open: dict[int, _Batch] = {}  # open batches by seq: the first is the oldest
        self._ready: deque[_Batch] = deque()  # sealed, not yet in a request
        # Batches without an outcome: seq -> how many (one, or those routed from it).
        self._unfinished: dict[int, int] = {}
        self._next_seq = 0
        self._buffered_bytes = 0
        self._closing = False
        self._wake_pending = False

        # Loop-only state.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: grpc.aio.Channel | None = None
        self._broker: broker_pb2_grpc.BrokerAsyncStub | None = None
        self._admin: admin_pb2_grpc.AdminAsyncStub | None = None
        self._sender: asyncio.Task[None] | None = None
        self._call: _Call | None = None
        self._reader: asyncio.Task[None] | None = None
        self._describing: dict[str, asyncio.Task[None]] = {}
        self._retry: deque[_Request] = deque()  # to write again, in order, before new ones
        self._in_flight: deque[_Request] = deque()  # written, awaiting answers, in order
        self._next_correlation_id = 0
        self._stream_failures = 0  # consecutive, reset by an answer
        self._reopen_s = 0.0
        self._throttled_until_s = 0.0  # no request is written before (a quota's answer)
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()  # replaced each time batches finish
        self._space_waiters = 0
        self._flush_waiters = 0
        self._closed = False
        # Idempotent produce (loop only): (producer id, epoch) once InitProducer answered.
        self._producer: tuple[int, int] | None = None
        self._sequences: dict[tuple[str, int], _Sequence] = {}
        self._reinit_wanted = False  # a sequence went astray: new id / epoch once idle
        self._fatal: RiverlogError | None = None  # fenced: every later send fails with it

    # ------------------------------------------------------------------ public
    async def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[Header] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> asyncio.Future[RecordMetadata]:
        """Queue one record; the future resolves when its batch is acknowledged.

        Awaits only for the topic's partition count (first send to a topic) or for buffer
        space (up to send_timeout_ms, then BufferFullError). Errors of the record (unknown
        topic or partition, too large, retries exhausted) fail the future.
        """
        loop = self._loop or self._start()
        future: asyncio.Future[RecordMetadata] = loop.create_future()
        code = self._append(topic, value, key, headers, partition, timestamp_ms, future, True)
        if code == _OK:
            return future
        if code == _OK_SEALED:
            await asyncio.sleep(0)  # let the sender take the sealed batch
            return future
        await self._send_slow(topic, value, key, headers, partition, timestamp_ms, future)
        return future

    async def flush(self) -> None:
        """Send every record queued so far at once and wait for all their outcomes."""
        if self._loop is None:
            return
        with self._lock:
            target = self._next_seq
        self._flush_waiters += 1
        self._wake(True)
        try:
            while True:
                with self._lock:
                    oldest = next(iter(self._unfinished), target)
                if oldest >= target:
                    return
                await self._progress.wait()
        finally:
            self._flush_waiters -= 1

    async def close(self, timeout_s: float | None = None) -> None:
        """Flush, then end the stream and the channel; later sends raise RiverlogError.

        Records still without an outcome after `timeout_s` fail with DeadlineExceededError.
        """
        with self._lock:
            self._closing = True
        if self._closed:
            return
        self._closed = True
        if self._loop is None:
            return
        aborted = False
        deadline_s = time.monotonic() + (timeout_s or 0.0)
        try:
            await asyncio.wait_for(self.flush(), timeout_s)
        except TimeoutError:
            aborted = True
            self._abort(
                DeadlineExceededError(f"the producer was closed after {timeout_s} s, unanswered")
            )
        if self._sender is not None:
            self._wake(True)
            if aborted:  # the sender may be waiting in a write
                self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        call, self._call = self._call, None
        if call is not None:
            if not aborted:
                wait_s = CLOSE_TIMEOUT_S
                if timeout_s is not None:
                    wait_s = min(wait_s, max(0.0, deadline_s - time.monotonic()))
                try:
                    await call.done_writing()
                    # The broker ends the stream once it has handled every request: what
                    # acks "none" needs before the channel closes.
                    await asyncio.wait_for(call.code(), wait_s)
                except (grpc.RpcError, asyncio.InvalidStateError, TimeoutError):
                    pass
            call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for task in self._describing.values():
            task.cancel()
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ the send path
    def _append(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[Header] | None,
        partition: int | None,
        timestamp_ms: int | None,
        future: AnyFuture,
        on_loop: bool,
        queued: bool = False,
    ) -> int:
        """Add one record to its partition's open batch, or say why the caller must take the
        slow path (`_send_slow`). Runs once per record (but for the records a sync
        Producer.send takes inline: keep the two in step): keep it short.

        The caller holds `_lock` when other threads may append (a sync facade); a bare
        AsyncProducer appends from its loop only and skips the lock.
        """
        state = self._topics.get(topic)
        if state is None or state.stale:
            return _NEED_METADATA
        if value is None:
            size = RECORD_OVERHEAD_BYTES
        elif isinstance(value, bytes):
            size = len(value) + RECORD_OVERHEAD_BYTES
        else:
            raise TypeError(f"value must be bytes or None, got {type(value).__name__}")
        if key is not None:
            if not isinstance(key, bytes):
                raise TypeError(f"key must be bytes or None, got {type(key).__name__}")
            size += len(key)
        if headers:
            headers = tuple(headers)
            size += _headers_size(headers)
        else:
            headers = ()
        if timestamp_ms is None:
            timestamp_ms = _time_ns() // 1_000_000
        elif isinstance(timestamp_ms, bool) or not isinstance(timestamp_ms, int):
            raise TypeError(f"timestamp_ms must be an int, got {type(timestamp_ms).__name__}")
        elif timestamp_ms < 0:
            return _BAD_TIMESTAMP
        if size > self._record_bytes_max:
            return _TOO_LARGE
        if self._closing:
            return _CLOSED
        buffered = self._buffered_bytes + size
        if buffered > self._buffer_bytes_max or (self._space_waiters and not queued):
            return _NEED_SPACE
        sticky = False
        if partition is not None:
            if not 0 <= partition < state.partitions:
                return _NO_PARTITION
            slot = partition
            batch = state.open[slot]
        elif key is None:
            sticky = True
            slot = state.sticky
            batch = state.open[slot]
        elif state.partitions > 1:
            # Chosen per batch, not here: murmur2 costs ~1.5 us a key in Python, ~0.05 us
            # in bulk (`_route`).
            slot = _UNROUTED
            batch = state.keyed
        else:
            slot = 0
            batch = state.open[0]
        code = _OK
        if batch is None or batch.size + size > self._batch_bytes:
            batch = self._open_batch(state, topic, slot, size, sticky)
            code = _OK_SEALED
        batch.keys.append(key)
        batch.values.append(value)
        batch.stamps.append(timestamp_ms)
        if headers:
            if batch.headers is None:
                batch.headers = [()] * (len(batch.keys) - 1)
            batch.headers.append(headers)
        elif batch.headers is not None:
            batch.headers.append(headers)
        batch.futures.append(future)
        batch.size += size
        self._buffered_bytes = buffered
        if batch.size >= self._batch_bytes:
            self._seal(batch)
            code = _OK_SEALED
        if code == _OK_SEALED:
            self._wake(on_loop)
        return code

    def _open_batch(
        self, state: _Topic, topic: str, partition: int, size: int, sticky: bool
    ) -> _Batch:
        """The batch a record of `size` bytes goes to, when the open one (if any) is full."""
        while True:
            batch = state.keyed if partition == _UNROUTED else state.open[partition]
            if batch is None:
                batch = _Batch(self._next_seq, topic, partition, time.monotonic())
                self._next_seq += 1
                if partition == _UNROUTED:
                    state.keyed = batch
                else:
                    state.open[partition] = batch
                self._open[batch.seq] = batch
                self._unfinished[batch.seq] = 1
                return batch
            if batch.size + size <= self._batch_bytes:
                return batch
            self._seal(batch)
            if sticky:
                partition = state.sticky

    async def _send_slow(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[Header] | None,
        partition: int | None,
        timestamp_ms: int | None,
        future: AnyFuture,
    ) -> None:
        """`send` when `_append` cannot go ahead: learn the topic, or wait for buffer space,
        or fail the future. Runs on the loop (a sync facade submits it there)."""
        self._start()
        deadline_s = time.monotonic() + self._send_timeout_s
        refreshed = False
        queued = False
        try:
            while True:
                with self._lock:
                    code = self._append(
                        topic, value, key, headers, partition, timestamp_ms, future, True, queued
                    )
                if code in (_OK, _OK_SEALED):
                    return
                if code == _CLOSED:
                    raise self._fatal or RiverlogError("the producer is closed")
                if code == _BAD_TIMESTAMP:
                    future.set_exception(
                        InvalidArgumentError(
                            f"timestamp_ms {timestamp_ms} is negative: timestamps are ms since "
                            "the Unix epoch"
                        )
                    )
                    return
                if code == _TOO_LARGE:
                    size = len(value or b"") + len(key or b"")
                    if self._buffer_bytes_max <= RECORD_BYTES_MAX:
                        raise BufferFullError(
                            f"a record of about {size} bytes can never fit buffer_bytes_max "
                            f"{self._buffer_bytes_max}"
                        )
                    future.set_exception(
                        ResourceExhaustedError(
                            f"a record of about {size} bytes exceeds the largest batch a "
                            f"broker accepts ({RECORD_BYTES_MAX} bytes)"
                        )
                    )
                    return
                if code == _NEED_METADATA or (code == _NO_PARTITION and not refreshed):
                    refreshed = code == _NO_PARTITION
                    try:
                        await self._describe(topic, deadline_s)
                    except RiverlogError as e:
                        future.set_exception(e)
                        return
                    continue
                if code == _NO_PARTITION:
                    count = self._topics[topic].partitions
                    future.set_exception(
                        NotFoundError(
                            f"topic {topic!r} has no partition {partition}; "
                            f"it has partitions 0..{count - 1}"
                        )
                    )
                    return
                assert code == _NEED_SPACE, code
                if not queued:
                    queued = True
                    self._space_waiters += 1
                    self._wake(True)  # a waiting sender seals open batches at once
                remaining_s = deadline_s - time.monotonic()
                if remaining_s <= 0:
                    raise BufferFullError(
                        f"no buffer space after send_timeout_ms "
                        f"{self._send_timeout_s * 1000:.0f}: {self._buffered_bytes} of "
                        f"buffer_bytes_max {self._buffer_bytes_max} bytes are unsent or "
                        "unacknowledged"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), remaining_s)
        finally:
            if queued:
                self._space_waiters -= 1

    async def _describe(self, topic: str, deadline_s: float) -> None:
        """Learn the topic's partition count (one DescribeTopic call shared by all waiters)."""
        task = self._describing.get(topic)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._describe_call(topic))
            self._describing[topic] = task
            task.add_done_callback(functools.partial(self._described, topic))
        remaining_s = max(0.0, deadline_s - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(task), remaining_s)
        except TimeoutError:
            raise DeadlineExceededError(
                f"no description of topic {topic!r} within send_timeout_ms "
                f"{self._send_timeout_s * 1000:.0f}"
            ) from None

    def _described(self, topic: str, task: asyncio.Task[None]) -> None:
        self._describing.pop(topic, None)
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have timed out

    async def _describe_call(self, topic: str) -> None:
        assert self._admin is not None
        request = admin_pb2.DescribeTopicRequest(name=topic)
        attempt = 0
        while True:
            try:
                answer = await self._admin.DescribeTopic(request, timeout=self._request_timeout_s)
                break
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                attempt += 1
                if not error.retriable or attempt > self._retries:
                    raise error from None
                await asyncio.sleep(self._backoff_s(attempt))
        count = len(answer.partitions)
        if count < 1:
            raise NotFoundError(f"topic {topic!r} has no partitions")
        with self._lock:
            state = self._topics.get(topic)
            if state is None:
                state = _Topic(count, random.randrange(count))
                self._topics[topic] = state
            state.partitions = count
            state.sticky %= count
            if len(state.open) < count:
                state.open.extend([None] * (count - len(state.open)))
            state.stale = False

    # ------------------------------------------------------------------ the sender
    def _start(self) -> asyncio.AbstractEventLoop:
        """Bind to the running loop: the channel, the stubs and the sender task."""
        if self._loop is not None:
            return self._loop
        if self._closed:
            raise RiverlogError("the producer is closed")
        loop = asyncio.get_running_loop()
        self._channel = open_channel(self.server, token=self._token, tls=self._tls)
        self._broker = broker_pb2_grpc.BrokerStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._sender = loop.create_task(self._run_sender(), name="riverlog-producer-sender")
        self._sender.add_done_callback(self._sender_done)
        self._loop = loop
        return loop

    def _wake(self, on_loop: bool) -> None:
        if on_loop:
            self._wakeup.set()
        elif not self._wake_pending:
            self._wake_pending = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._woken)

    def _woken(self) -> None:
        self._wake_pending = False
        self._wakeup.set()

    def _seal(self, batch: _Batch) -> None:
        """Close `batch` to new records (lock held); the sticky partition moves on."""
        state = self._topics[batch.topic]
        if batch.partition == _UNROUTED:
            if state.keyed is batch:
                state.keyed = None
        elif state.open[batch.partition] is batch:
            state.open[batch.partition] = None
        if state.sticky == batch.partition:
            state.sticky = (batch.partition + 1) % state.partitions
        del self._open[batch.seq]
        batch.solo = batch.size > self._batch_bytes
        self._ready.append(batch)

    def _has_work(self) -> bool:
        return bool(self._open or self._ready or self._retry or self._in_flight)

    def _backoff_s(self, attempt: int) -> float:
        ms = min(self._retry_backoff_ms << min(attempt - 1, 30), RETRY_BACKOFF_MS_MAX)
        return max(ms, self._retry_backoff_ms) / 1000

    async def _run_sender(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        while True:
            self._wakeup.clear()
            if (
                self._idempotent
                and self._producer is None
                and not self._in_flight
                and (self._open or self._ready)
            ):
                await self._init_producer()
                continue
            now_s = time.monotonic()
            wait_s: float | None = None
            if self._in_flight:
                due_s = self._in_flight[0].sent_s + self._request_timeout_s
                if due_s <= now_s:
                    self._stream_failed(
                        self._call,
                        DeadlineExceededError(
                            f"no answer to a produce request within request_timeout_ms "
                            f"{self._request_timeout_s * 1000:.0f}"
                        ),
                    )
                    continue
                wait_s = due_s - now_s
            request: _Request | None = None
            if self._call is None and self._has_work() and now_s < self._reopen_s:
                wait_s = _earliest(wait_s, self._reopen_s - now_s)
            elif now_s < self._throttled_until_s and (self._open or self._ready or self._retry):
                wait_s = _earliest(wait_s, self._throttled_until_s - now_s)
            elif self._acks_none or len(self._in_flight) < self._max_in_flight:
                request, next_s = self._take_request(now_s)
                if next_s is not None:
                    wait_s = _earliest(wait_s, next_s - now_s)
            if request is None:
                if self._closing and not self._has_work():
                    return
                if wait_s is None:
                    await self._wakeup.wait()
                else:
                    timer = asyncio.get_running_loop().call_later(wait_s, self._wakeup.set)
                    await self._wakeup.wait()
                    timer.cancel()
                continue
            await self._write(request, task)

    def _take_request(self, now_s: float) -> tuple[_Request | None, float | None]:
        """The next request to write, and when to look again if there is none yet."""
        if self._retry:
            head = self._retry[0]
            if head.not_before_s > now_s:
                return None, head.not_before_s  # nothing may overtake a retry
            return self._retry.popleft(), None
        if self._reinit_wanted:
            if not self._in_flight:
                self._reinit()
            return None, None
        idempotent = self._idempotent
        candidates: list[_Batch] = []
        held: list[_Batch] = []
        next_s: float | None = None
        # Under the lock (which every send takes): seal, and pop what goes into the request.
        # Keyed batches are split per partition after the lock is released: murmur2 of every
        # key is the largest piece of per-record work here, and senders must not wait on it.
        with self._lock:
            if self._open:
                oldest = next(iter(self._open.values()))
                due_s = oldest.created_s + self._linger_s
                if due_s <= now_s or self._flush_waiters or self._space_waiters or self._closing:
                    for batch in list(self._open.values()):
                        self._seal(batch)
                else:
                    next_s = due_s
            total = 0
            ready = self._ready
            while ready and len(candidates) < REQUEST_ENTRIES_MAX:
                batch = ready[0]
                if candidates and (batch.solo or total + batch.size > REQUEST_BYTES_MAX):
                    break
                ready.popleft()
                if idempotent and batch.partition != _UNROUTED and self._partition_full(batch):
                    held.append(batch)  # its partition is full or rewinding: wait
                    if len(held) >= _SKIPPED_MAX:
                        break
                    continue
                candidates.append(batch)
                total += batch.size
                if batch.solo:
                    break
            if held:
                ready.extendleft(reversed(held))
        batches: list[_Batch] = []
        back: list[_Batch] = []  # routed here but not sent now: to the ready queue's head
        for candidate in candidates:
            parts = [candidate] if candidate.partition != _UNROUTED else self._route(candidate)
            for batch in parts:
                if len(batches) >= REQUEST_ENTRIES_MAX or (
                    idempotent and self._partition_full(batch, batches)
                ):
                    back.append(batch)
                else:
                    batches.append(batch)
        if back:
            with self._lock:
                self._ready.extendleft(reversed(back))
        encoded: list[_Batch] = []
        for batch in batches:
            try:
                if idempotent:
                    self._encode_idempotent(batch)
                else:
                    batch.data = self._encode(batch)
            except (TypeError, ValueError, OverflowError) as e:
                self._fail(batch, InvalidArgumentError(f"cannot encode a record batch: {e}"))
                continue
            encoded.append(batch)
        if not encoded:
            return None, next_s
        return self._request(encoded), next_s

    def _partition_full(self, batch: _Batch, taking: Sequence[_Batch] = ()) -> bool:
        """Whether an idempotent batch must wait: its partition has
        IN_FLIGHT_PER_PARTITION_MAX batches awaiting answers (counting those of `taking`), or
        is rewinding."""
        st = self._sequences.get((batch.topic, batch.partition))
        count = 0 if st is None else len(st.pending)
        if count + len(taking) >= IN_FLIGHT_PER_PARTITION_MAX:
            count += sum(
                1 for b in taking if b.partition == batch.partition and b.topic == batch.topic
            )
            if count >= IN_FLIGHT_PER_PARTITION_MAX:
                return True
        return st is not None and st.rewind_to is not None

    def _encode_idempotent(self, batch: _Batch) -> None:
        """Encode with the producer id, epoch and the partition's next sequence number."""
        assert self._producer is not None
        producer_id, epoch = self._producer
        key = (batch.topic, batch.partition)
        st = self._sequences.get(key)
        if st is None:
            st = self._sequences[key] = _Sequence()
        base = st.next_seq
        batch.data = self._encode(batch, producer_id, epoch, base)
        batch.base_seq = base
        st.next_seq = (base + len(batch.keys)) % _SEQUENCE_MOD
        st.pending.append(batch)

    def _encode(
        self, batch: _Batch, producer_id: int = -1, epoch: int = -1, base_sequence: int = -1
    ) -> bytes:
        if batch.headers is None:
            return encode_columns(
                batch.keys,
                batch.values,
                batch.stamps,
                compression=self._compression,
                producer_id=producer_id,
                producer_epoch=epoch,
                base_sequence=base_sequence,
            )
        return encode_batch(
            list(zip(batch.keys, batch.values, batch.stamps, batch.headers, strict=True)),
            compression=self._compression,
            producer_id=producer_id,
            producer_epoch=epoch,
            base_sequence=base_sequence,
        )

    async def _init_producer(self) -> None:
        """Get a producer id and epoch (InitProducer), retrying retriable failures; when
        that fails for good, every batch waiting fails with the error."""
        assert self._broker is not None
        request = broker_pb2.InitProducerRequest(producer_name=self._producer_name)
        attempt = 0
        while True:
            try:
                answer = await self._broker.InitProducer(request, timeout=self._request_timeout_s)
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                attempt += 1
                if error.retriable and attempt <= self._retries:
                    await asyncio.sleep(self._backoff_s(attempt))
                    continue
                self._fail_pending(error)
                return
            self._producer = (answer.producer_id, answer.producer_epoch)
            return

    def _reinit(self) -> None:
        """Nothing in flight: drop the producer id and every sequence; the sender asks for a
        new id (anonymous) or epoch (named), and every partition starts again at 0."""
        self._reinit_wanted = False
        resend: list[_Batch] = []
        for st in self._sequences.values():
            resend.extend(st.resend)
        self._sequences.clear()
        self._producer = None
        self._requeue(resend)
        self._wakeup.set()  # the sender asks for the new id next

    def _requeue(self, batches: list[_Batch]) -> None:
        """Put refused batches back at the head of the ready queue, to be encoded again."""
        if not batches:
            return
        for batch in batches:
            batch.data = b""
            batch.base_seq = -1
        with self._lock:
            self._ready.extendleft(reversed(batches))
        self._wakeup.set()

    def _route(self, batch: _Batch) -> list[_Batch]:
        """Split a batch of keyed records into one batch per partition (Kafka's murmur2 of
        each key, in bulk), keeping send order within each. Runs without the lock: the batch
        is sealed, no sender can reach it."""
        count = self._topics[batch.topic].partitions
        total = len(batch.keys)
        chosen = _partitions_for_keys(batch.keys, count)  # type: ignore[arg-type]  # all keyed
        order = np.argsort(chosen, kind="stable")
        ends = np.cumsum(np.bincount(chosen, minlength=count)).tolist()
        routed: list[_Batch] = []
        start = 0
        for partition, end in enumerate(ends):
            if end == start:
                continue
            picks = order[start:end].tolist()
            if len(picks) == 1:
                i = picks[0]
                keys, values, stamps = [batch.keys[i]], [batch.values[i]], [batch.stamps[i]]
                futures = [batch.futures[i]]
                headers = None if batch.headers is None else [batch.headers[i]]
            else:
                get = itemgetter(*picks)
                keys, values, stamps = get(batch.keys), get(batch.values), get(batch.stamps)
                futures = get(batch.futures)
                headers = None if batch.headers is None else list(get(batch.headers))
            # Sizes are estimates: shared out by record count, summing to the batch's.
            size = batch.size * end // total - batch.size * start // total
            part = _Batch(
                batch.seq,
                batch.topic,
                partition,
                batch.created_s,
                list(keys),
                list(values),
                list(stamps),
                headers,
                list(futures),
                size,
            )
            part.solo = batch.solo
            routed.append(part)
            start = end
        with self._lock:
            self._unfinished[batch.seq] += len(routed) - 1
        return routed

    def _request(self, batches: list[_Batch], attempts: int = 0, origin: int = 0) -> _Request:
        self._next_correlation_id += 1
        message = broker_pb2.ProduceRequest(
            acks=self._acks,
            correlation_id=self._next_correlation_id,
            partitions=[
                broker_pb2.PartitionProduce(
                    topic=b.topic, partition=b.partition, record_batch=b.data
                )
                for b in batches
            ],
        )
        return _Request(
            self._next_correlation_id,
            batches,
            message,
            attempts,
            origin=origin or self._next_correlation_id,
        )

    async def _write(self, request: _Request, task: asyncio.Task[None]) -> None:
        call = self._call
        if call is None:
            assert self._broker is not None
            call = self._call = self._broker.ProduceStream()
            self._reader = asyncio.get_running_loop().create_task(self._read(call))
        request.sent_s = time.monotonic()
        # In flight from now on, with any acks: if the stream fails during the write, the
        # request is resent with the others (once: the failure is handled once per stream).
        self._in_flight.append(request)
        error: RiverlogError
        try:
            # A broker that stops reading stalls the write: the request time-out covers it.
            await asyncio.wait_for(call.write(request.message), self._request_timeout_s)
        except TimeoutError:
            error = DeadlineExceededError(
                f"a produce request was not taken within request_timeout_ms "
                f"{self._request_timeout_s * 1000:.0f}"
            )
        except asyncio.CancelledError:
            if task.cancelling():
                raise
            error = UnavailableError("the produce stream was cancelled")
        except Exception as e:
            error = _error_of(e)
        else:
            if self._acks_none and self._in_flight and self._in_flight[-1] is request:
                # Written is all that acks "none" waits for.
                self._in_flight.pop()
                self._stream_failures = 0
                for batch in request.batches:
                    self._resolve(batch, -1)
            return
        self._stream_failed(call, error)

    async def _read(self, call: _Call) -> None:
        try:
            while True:
                answer = await call.read()
                if call is not self._call:
                    return
                if answer is grpc.aio.EOF:
                    raise UnavailableError("the broker ended the produce stream")
                assert isinstance(answer, broker_pb2.ProduceResponse)
                self._answered(call, answer)
        except asyncio.CancelledError:
            if call is self._call:
                self._stream_failed(call, UnavailableError("the produce stream was cancelled"))
            raise
        except Exception as e:
            self._stream_failed(call, _error_of(e))

    def _stream_failed(self, call: _Call | None, error: RiverlogError) -> None:
        """The stream is gone: resend every unanswered request, in order, on a new one."""
        if call is None or call is not self._call:
            return  # already handled
        self._call = None
        call.cancel()
        self._stream_failures += 1
        self._reopen_s = time.monotonic() + self._backoff_s(self._stream_failures)
        retriable = _retriable_on_stream(error)
        again: list[_Request] = []
        for request in self._in_flight:
            request.attempts += 1
            if retriable and request.attempts <= self._retries:
                again.append(request)
            else:
                self._fail_request(request, error)
        self._in_flight.clear()
        for request in again:
            self._retry_later(request)
        if self._stream_failures > self._retries:
            # The broker stayed out of reach: fail everything waiting rather than hold it.
            self._stream_failures = 0
            self._fail_pending(error)
        self._wakeup.set()

    def _answered(self, call: _Call, answer: broker_pb2.ProduceResponse) -> None:
        if not self._in_flight or answer.correlation_id != self._in_flight[0].correlation_id:
            expected = self._in_flight[0].correlation_id if self._in_flight else None
            self._stream_failed(
                call,
                UnavailableError(
                    f"answer with correlation id {answer.correlation_id}, expected {expected}"
                ),
            )
            return
        request = self._in_flight.popleft()
        self._stream_failures = 0
        self._wakeup.set()  # a slot is free
        if answer.throttle_time_ms > 0:
            self._throttled_until_s = time.monotonic() + throttle_s(answer.throttle_time_ms)
        results = answer.results
        batches = request.batches
        if len(results) != len(batches):
            self._fail_request(
                request,
                RiverlogError(f"answer carries {len(results)} results for {len(batches)} batches"),
            )
            return
        if len(batches) > 1 and all(r.error.code for r in results):
            first = results[0].error
            error = from_partition_error(first.code, first.message, first.name)
            if not error.retriable and all(
                r.error.code == first.code and r.error.message == first.message for r in results
            ):
                # The broker refused the request whole for one entry and appended nothing:
                # send each batch alone to learn which one is wrong.
                for batch in batches:
                    self._retry_later(self._request([batch], origin=request.origin))
                return
        again: list[_Batch] = []
        for batch, result in zip(batches, results, strict=True):
            code = result.error.code
            if not code:
                self._resolve(batch, result.base_offset)
                continue
            error = from_partition_error(code, result.error.message, result.error.name)
            if batch.base_seq >= 0:
                verdict = self._refused(batch, error)
                if verdict == _HANDLED:
                    continue
                if verdict == _RETRY and request.attempts < self._retries:
                    again.append(batch)
                    continue
            if error.retriable and request.attempts < self._retries:
                again.append(batch)
            else:
                self._fail(batch, error)
        if again:
            retry = self._request(again, request.attempts + 1, request.origin)
            retry.not_before_s = time.monotonic() + self._backoff_s(retry.attempts)
            self._retry_later(retry)

    def _retry_later(self, retry: _Request) -> None:
        """Queue a retry before every queued request that came after its batches' first
        request, so a partition's batches are sent again in their order."""
        queue = self._retry
        index = len(queue)
        while index and queue[index - 1].origin > retry.origin:
            index -= 1
        queue.insert(index, retry)

    def _refused(self, batch: _Batch, error: RiverlogError) -> int:
        """An idempotent batch was refused: what to do with it (_HANDLED, _RETRY, _FAIL)."""
        st = self._sequences[(batch.topic, batch.partition)]
        if isinstance(error, ProducerFencedError):
            self._fence(error)
            return _FAIL
        sequence_error = isinstance(error, OutOfOrderSequenceError | UnknownProducerError)
        if not sequence_error:
            if not error.retriable:
                # Never appended: the batches after it are refused as out of sequence and
                # sent again from its sequence number.
                self._rewind(st, batch.base_seq)
            return _FAIL
        if st.rewind_to is not None:
            self._hold(st, batch)  # refused because an earlier batch was not appended
            return _HANDLED
        if st.pending and st.pending[0] is not batch:
            return _RETRY  # an earlier batch of the partition is being retried: follow it
        if isinstance(error, UnknownProducerError):
            # The broker forgot this producer here (idle past producer_expiry_ms): nothing of
            # the partition from this batch on was appended; start again at sequence 0. At
            # sequence 0 already, the broker does not know the id at all (its data was
            # replaced): take a new one, then resend.
            if batch.base_seq == 0:
                self._reinit_wanted = True
            self._rewind(st, 0)
            self._hold(st, batch)
            return _HANDLED
        # The broker expects a sequence this producer did not send (it lost acknowledged
        # batches, e.g. fsync "never" and a power loss): fail the batch, start a new id or
        # epoch once nothing is in flight.
        self._reinit_wanted = True
        return _FAIL

    def _rewind(self, st: _Sequence, sequence: int) -> None:
        if st.rewind_to is None or _seq_before(sequence, st.rewind_to):
            st.rewind_to = sequence

    def _hold(self, st: _Sequence, batch: _Batch) -> None:
        st.pending.remove(batch)
        st.resend.append(batch)
        self._resend_if_idle(st)

    def _resend_if_idle(self, st: _Sequence) -> None:
        """Once no batch of the rewinding partition awaits an answer, queue the refused ones
        again, numbered from the rewind point."""
        if st.rewind_to is None or st.pending:
            return
        st.next_seq = st.rewind_to
        st.rewind_to = None
        resend, st.resend = st.resend, []
        resend.sort(key=lambda b: b.seq)
        self._requeue(resend)

    def _fence(self, error: RiverlogError) -> None:
        """A newer instance of this named producer exists: fail everything, refuse sends."""
        if self._fatal is None:
            self._fatal = error
            with self._lock:
                self._closing = True
            self._abort(error)

    # ------------------------------------------------------------------ outcomes
    def _resolve(self, batch: _Batch, base_offset: int) -> None:
        topic, partition = batch.topic, batch.partition
        futures = batch.futures
        if futures and type(futures[0]) is _RecordFuture:
            # A Producer's futures make their RecordMetadata when asked (see _RecordFuture).
            _settle(futures, (topic, partition, base_offset, batch.stamps))  # type: ignore[arg-type]
            self._finished(batch)
            return
        # Per record: tuple.__new__ skips the NamedTuple's Python-level __new__ (half the
        # cost), and a try costs nothing in 3.11 (contextlib.suppress would be a call).
        new, metadata = _new_tuple, RecordMetadata
        step = 0 if base_offset < 0 else 1
        offset = base_offset
        for future, stamp in zip(futures, batch.stamps, strict=True):
            try:  # noqa: SIM105
                future.set_result(new(metadata, (topic, partition, offset, stamp)))
            except _INVALID_STATE:
                pass  # cancelled by its owner
            offset += step
        self._finished(batch)

    def _fail(self, batch: _Batch, error: RiverlogError) -> None:
        if isinstance(error, NotFoundError):
            with self._lock:
                state = self._topics.get(batch.topic)
                if state is not None:
                    state.stale = True
        for future in batch.futures:
            try:  # noqa: SIM105
                future.set_exception(error)
            except _INVALID_STATE:
                pass
        self._finished(batch)

    def _fail_request(self, request: _Request, error: RiverlogError) -> None:
        for batch in request.batches:
            self._fail(batch, error)

    def _fail_pending(self, error: RiverlogError) -> None:
        """Fail every batch not yet answered or written (loop only)."""
        for request in self._retry:
            self._fail_request(request, error)
        self._retry.clear()
        held: list[_Batch] = []
        for st in self._sequences.values():
            held.extend(st.resend)
            st.resend.clear()
            st.rewind_to = None
        for batch in held:
            self._fail(batch, error)
        with self._lock:
            for batch in list(self._open.values()):
                self._seal(batch)
            ready = list(self._ready)
            self._ready.clear()
        for batch in ready:
            self._fail(batch, error)

    def _finished(self, batch: _Batch) -> None:
        if batch.finished:
            return  # a request both resent and written
        batch.finished = True
        if batch.base_seq >= 0:
            st = self._sequences.get((batch.topic, batch.partition))
            if st is not None and batch in st.pending:
                st.pending.remove(batch)
                self._resend_if_idle(st)
        batch.keys = batch.values = []
        batch.stamps = []
        batch.headers = None
        batch.futures = []
        batch.data = b""
        with self._lock:
            left = self._unfinished[batch.seq] - 1
            if left:
                self._unfinished[batch.seq] = left
            else:
                del self._unfinished[batch.seq]
            self._buffered_bytes -= batch.size
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

    def _abort(self, error: RiverlogError) -> None:
        """Fail every record without an outcome (loop only)."""
        for request in self._in_flight:
            self._fail_request(request, error)
        self._in_flight.clear()
        self._fail_pending(error)

    def _sender_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug in the sender: fail everything rather than leave futures pending forever.
        with self._lock:
            self._closing = True
        self._abort(RiverlogError(f"the producer's sender failed: {task.exception()!r}"))


def _seq_before(a: int, b: int) -> bool:
    """Whether sequence `a` comes before `b` (they wrap at 2**31; a window is 5 batches)."""
    return a != b and (b - a) % _SEQUENCE_MOD < _SEQUENCE_MOD // 2


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


# ---------------------------------------------------------------------------- murmur2 in bulk
_MURMUR2_SEED = 0x9747B28C
_MURMUR2_M = np.uint32(0x5BD1E995)


def _partitions_for_keys(keys: Sequence[bytes], partitions: int) -> npt.NDArray[np.int64]:
    """`stream._partitioner.partition_for_key` of every key, in numpy: Kafka's murmur2 on
    uint32 columns (multiplication wraps), one pass per key length. ~0.05 us a key for keys
    of one length, against ~1.5 us a key in Python."""
    count = len(keys)
    out = np.empty(count, dtype=np.int64)
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=count)
    for length in np.unique(lengths).tolist():
        if len(lengths) and lengths[0] == length and (lengths == length).all():
            rows, joined, where = count, b"".join(keys), None
        else:
            where = np.flatnonzero(lengths == length)
            rows, joined = len(where), b"".join([keys[i] for i in where.tolist()])
        data = np.frombuffer(joined, dtype=np.uint8).reshape(rows, length)
        h = np.full(rows, (_MURMUR2_SEED ^ length) & 0xFFFFFFFF, dtype=np.uint32)
        whole = length - length % 4
        if whole:
            words = np.ascontiguousarray(data[:, :whole]).view("<u4")
            for j in range(whole // 4):
                k = words[:, j] * _MURMUR2_M
                k ^= k >> np.uint32(24)
                k *= _MURMUR2_M
                h *= _MURMUR2_M
                h ^= k
        tail = length % 4
        if tail == 3:
            h ^= data[:, whole + 2].astype(np.uint32) << np.uint32(16)
        if tail >= 2:
            h ^= data[:, whole + 1].astype(np.uint32) << np.uint32(8)
        if tail >= 1:
            h ^= data[:, whole].astype(np.uint32)
            h *= _MURMUR2_M
        h ^= h >> np.uint32(13)
        h *= _MURMUR2_M
        h ^= h >> np.uint32(15)
        chosen = (h & np.uint32(0x7FFFFFFF)).astype(np.int64) % partitions
        if where is None:
            out[:] = chosen
        else:
            out[where] = chosen
    return out


# ---------------------------------------------------------------------------- sync facade
class _RecordFuture(concurrent.futures.Future[RecordMetadata]):
    """A concurrent.futures.Future that shares its producer's Condition.

    `Future.__init__` makes a threading.Condition per future: about five objects for the
    garbage collector, and most of the cost of a sync send (measured: over a third of the
    sending thread's time). These futures share one Condition per producer instead, which is
    sound because nothing waits on it: `result` and `exception` are overridden to wait on an
    Event set by a done-callback, so a notification for one future never wakes the waiter
    of another. Everything else is the base class, unchanged (tests/test_client_producer.py
    checks the fields below against the base class's).
    """

    # The fields of Future.__init__ (unchanged since Python 3.2): a shared Condition, and the
    # rest as class defaults until first set. The two lists are made on first use: a record's
    # future is then one object for the garbage collector, not three (its collections were
    # most of a sync send's cost while a producer held many futures).
    _exception: BaseException | None = None
    _lazy_waiters: list[Any] | None = None
    _lazy_callbacks: list[Any] | None = None
    # The result: given (set_result), or, for a record settled with its batch, made when
    # asked from the batch's (topic, partition, base offset, timestamps) and the record's
    # index. A RecordMetadata made per record at settle time is a tuple subclass, which the
    # garbage collector never untracks: it doubled the objects every full collection walks
    # while the caller holds its futures (bench/client_bench.py).
    _given: RecordMetadata | None = None

    _batch: tuple[str, int, int, list[int]] | None
    _index: int

    def __init__(self, condition: threading.Condition) -> None:
        # Every field settling writes is set here: CPython sizes an instance's inline
        # attribute values by the fields __init__ sets, and a field beyond them turns the
        # values into a dict, a second object per future for the collector.
        self._condition = condition
        self._state = _PENDING
        self._batch = None
        self._index = 0

    @property
    def _result(self) -> RecordMetadata | None:
        batch = self._batch
        if batch is None:
            return self._given
        topic, partition, base_offset, stamps = batch
        i = self._index
        offset = base_offset + i if base_offset >= 0 else -1
        return _new_tuple(RecordMetadata, (topic, partition, offset, stamps[i]))

    @_result.setter
    def _result(self, value: RecordMetadata | None) -> None:
        self._given = value
        self._batch = None

    @property
    def _waiters(self) -> list[Any]:
        if self._lazy_waiters is None:
            self._lazy_waiters = []
        return self._lazy_waiters

    @_waiters.setter
    def _waiters(self, value: list[Any]) -> None:
        self._lazy_waiters = value

    @property
    def _done_callbacks(self) -> list[Any]:
        if self._lazy_callbacks is None:
            self._lazy_callbacks = []
        return self._lazy_callbacks

    @_done_callbacks.setter
    def _done_callbacks(self, value: list[Any]) -> None:
        self._lazy_callbacks = value

    def _wait(self, timeout: float | None) -> None:
        if self.done():
            return
        done = threading.Event()
        self.add_done_callback(lambda _f: done.set())
        done.wait(timeout)

    def result(self, timeout: float | None = None) -> RecordMetadata:
        self._wait(timeout)
        return super().result(0)  # the base class raises what it should, never waits

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return super().exception(0)


_SETTLEABLE = frozenset({_PENDING, "RUNNING"})


def _settle(futures: list[_RecordFuture], batch: tuple[str, int, int, list[int]]) -> None:
    """Resolve a batch's futures at once: what Future.set_result does for each, with their
    shared condition taken once, waiters and callbacks visited only where there are any, and
    no RecordMetadata made until asked for (1.25 us a record one by one, under 0.1 us here).
    `batch`: topic, partition, base offset (-1 when unknown: acks "none") and the records'
    timestamps in order. Cancelled futures stay cancelled."""
    condition = futures[0]._condition
    watched: list[_RecordFuture] = []
    with condition:
        for index, future in enumerate(futures):
            if future._state in _SETTLEABLE:
                future._batch = batch
                future._index = index
                future._state = _FINISHED
                if future._lazy_waiters or future._lazy_callbacks:
                    watched.append(future)
        for future in watched:
            for waiter in future._waiters:
                waiter.add_result(future)
        condition.notify_all()
    for future in watched:
        future._invoke_callbacks()  # type: ignore[attr-defined]  # CPython's, since 3.2


class Producer:
    """The blocking producer: an AsyncProducer on its own event-loop thread.

    Same settings as AsyncProducer. `send` returns a concurrent.futures.Future; it blocks the
    calling thread only for the first send to a topic and when the buffer is full (then
    BufferFullError after send_timeout_ms). Any number of threads may send at once.
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        acks: str = "leader",
        linger_ms: int = 5,
        batch_bytes: int = 1 * MiB,
        buffer_bytes_max: int = 32 * MiB,
        compression: str | None = None,
        max_in_flight: int = 8,
        retries: int = 5,
        retry_backoff_ms: int = 100,
        send_timeout_ms: int = 10_000,
        request_timeout_ms: int = 30_000,
        idempotent: bool | None = None,
        producer_name: str | None = None,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        core = AsyncProducer(
            server,
            acks=acks,
            linger_ms=linger_ms,
            batch_bytes=batch_bytes,
            buffer_bytes_max=buffer_bytes_max,
            compression=compression,
            max_in_flight=max_in_flight,
            retries=retries,
            retry_backoff_ms=retry_backoff_ms,
            send_timeout_ms=send_timeout_ms,
            request_timeout_ms=request_timeout_ms,
            idempotent=idempotent,
            producer_name=producer_name,
            token=token,
            tls=tls,
        )
        self._thread = EventLoopThread("riverlog-producer")
        self._core = core
        self._futures_condition = threading.Condition()

        async def start() -> None:
            core._start()

        try:
            self._thread.run(start())
        except BaseException:
            self._thread.close()
            raise

    @property
    def server(self) -> str:
        return self._core.server

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[Header] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> concurrent.futures.Future[RecordMetadata]:
        """Queue one record; see AsyncProducer.send."""
        future = _RecordFuture(self._futures_condition)
        core = self._core
        lock = core._lock
        lock.acquire()  # not `with`: its __enter__ / __exit__ cost twice acquire / release
        try:
            # The common case inline, the rest in _append: a record without headers,
            # partition or timestamp that fits its open batch without filling it (nothing to
            # seal, no sender to wake), with buffer space and no thread waiting for space.
            # Every condition of _append's _OK outcome is checked; what is left is implied:
            # size <= buffered <= buffer_bytes_max and size < batch_bytes <= RECORD_BYTES_MAX.
            state = core._topics.get(topic)
            if (
                state is not None
                and headers is None
                and partition is None
                and timestamp_ms is None
                and type(value) is bytes
            ):
                if type(key) is bytes:
                    size = len(value) + len(key) + RECORD_OVERHEAD_BYTES
                    batch = state.keyed if state.partitions > 1 else state.open[0]
                elif key is None:
                    size = len(value) + RECORD_OVERHEAD_BYTES
                    batch = state.open[state.sticky]
                else:
                    batch = None
                if (
                    batch is not None
                    and batch.size + size < core._batch_bytes
                    and batch.headers is None
                    and not state.stale
                ):
                    buffered = core._buffered_bytes + size
                    if (
                        buffered <= core._buffer_bytes_max
                        and not core._space_waiters
                        and not core._closing
                    ):
                        batch.keys.append(key)
                        batch.values.append(value)
                        batch.stamps.append(_time_ns() // 1_000_000)
                        batch.futures.append(future)
                        batch.size += size
                        core._buffered_bytes = buffered
                        return future
            code = core._append(topic, value, key, headers, partition, timestamp_ms, future, False)
        finally:
            lock.release()
        if code > _OK_SEALED:
            if code == _CLOSED:
                raise core._fatal or RiverlogError("the producer is closed")
            slow = core._send_slow(topic, value, key, headers, partition, timestamp_ms, future)
            self._submit(slow).result()
        return future

    def flush(self, timeout_s: float | None = None) -> None:
        """Send everything queued and wait for every outcome (DeadlineExceededError after
        `timeout_s`; the records stay queued)."""
        if self._thread.loop.is_closed():
            return  # closed: everything has its outcome
        pending = self._submit(self._core.flush())
        try:
            pending.result(timeout_s)
        except concurrent.futures.TimeoutError:
            pending.cancel()
            raise DeadlineExceededError(f"flush did not finish within {timeout_s} s") from None

    def close(self, timeout_s: float | None = None) -> None:
        """Flush, end the stream, stop the loop thread; see AsyncProducer.close. Idempotent."""
        if self._thread.loop.is_closed():
            return
        try:
            self._submit(self._core.close(timeout_s)).result()
        finally:
            self._thread.close()

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `coro` on the producer's loop, refusing what would deadlock or never run."""
        on_loop = False
        with contextlib.suppress(RuntimeError):
            on_loop = asyncio.get_running_loop() is self._thread.loop
        if on_loop or self._thread.loop.is_closed():
            coro.close()
            if on_loop:
                raise RiverlogError(
                    "a Producer cannot wait from its own loop thread (a future's callback): "
                    "the wait would never end"
                )
            raise RiverlogError("the producer is closed")
        return self._thread.submit(coro)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
