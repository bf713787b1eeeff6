"""Request/reply over topics: Requester / AsyncRequester and Responder / AsyncResponder.

A requester produces each request to `topic` with two headers, and waits for the record on
`reply_topic` that carries the same correlation id:

    riverlog-reply-to        (REPLY_TO_HEADER)        the topic to reply to, UTF-8
    riverlog-correlation-id  (CORRELATION_ID_HEADER)  a uuid4 in 32 hex digits, ASCII

A responder is a share-group member on `topic` (a share group, so any number of responders
split the requests record by record): for each request it calls `handler(record) -> bytes`,
produces the reply to the request's reply-to topic with key and header = the correlation id
(so the key picks the partition), and once the reply is appended acknowledges the request.
A handler that raises releases the request with the error (it comes back, to this or another
responder, after the group's retry backoff; after max_delivery_attempts it is archived, and
dead-lettered when the group names a topic). A request without the two headers is rejected.

Delivery: a request is answered at least once. A responder that dies between the reply and
the acknowledgement answers it again after its lock expires; the requester keeps the first
reply and drops replies for ids it is not waiting for (answered, timed out, or another
requester's: many requesters may share a reply topic, each reads all of it).

The requester follows every partition of reply_topic (created with one partition when it does
not exist) from its end as of the first request, with a Consumer that reads, never commits;
partitions added to the reply topic later are not followed.

Every class takes `token` (a bearer token) and `tls` (TlsOptions) and gives them to the
producer, consumers and admin client it builds (stream/client/_base.py).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Self, TypeVar

from .._headers import CORRELATION_ID_HEADER, REPLY_TO_HEADER
from ._admin import AsyncAdmin
from ._base import (
    AlreadyExistsError,
    DeadlineExceededError,
    EventLoopThread,
    InvalidArgumentError,
    NotFoundError,
    Record,
    ResourceExhaustedError,
    RiverlogError,
    TlsOptions,
    TopicPartition,
    check_token,
    default_server,
)
from ._consumer import AsyncConsumer
from ._producer import AsyncProducer
from ._share import AckFailure, AsyncShareConsumer, ShareRecord

log = logging.getLogger("riverlog.reqreply")

T = TypeVar("T")
Header = tuple[str, bytes | None]

# Requests of one requester awaiting replies: beyond, request() raises ResourceExhaustedError.
OUTSTANDING_MAX = 10_000
# The longest wait of the reply consumer's poll and fetch (close() wakes it earlier).
REPLY_POLL_MS = 500
# The longest wait of a responder's poll: serve() looks at its bounds and close() this often.
SERVE_POLL_MS = 500
# close() of a responder waits this long for serve() to finish the request in hand.
SERVE_STOP_S = 30.0
# A release reason is cut to the broker's limit (ERROR_BYTES_MAX UTF-8 bytes).
ERROR_BYTES_MAX = 1_024

Handler = Callable[[ShareRecord], bytes | Awaitable[bytes]]


def header(record: Record | ShareRecord, name: str) -> bytes | None:
    """The value of the last header `name` of `record` (None when absent)."""
    for key, value in reversed(record.headers):
        if key == name:
            return value
    return None


def _cut(text: str, limit: int = ERROR_BYTES_MAX) -> str:
    return text.encode()[:limit].decode(errors="ignore")


def _check_timeout(timeout_s: float) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
        raise InvalidArgumentError(f"timeout_s must be a positive number, got {timeout_s!r}")
    return float(timeout_s)


# ---------------------------------------------------------------------------- requester
class AsyncRequester:
    """Sends requests to `topic` and awaits their replies on `reply_topic` (see the module
    docstring). Use on one event loop; `async with` closes it."""

    def __init__(
        self,
        server: str | None = None,
        *,
        topic: str,
        reply_topic: str,
        timeout_s: float = 10.0,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        for name, value in (("topic", topic), ("reply_topic", reply_topic)):
            if not isinstance(value, str) or not value:
                raise InvalidArgumentError(f"{name} must be a non-empty str, got {value!r}")
        self._server = default_server(server)
        self._token = None if token is None else check_token(token)
        self._tls = tls
        self._topic = topic
        self._reply_topic = reply_topic
        self._timeout_s = _check_timeout(timeout_s)
        self._outstanding: dict[str, asyncio.Future[Record]] = {}
        self._start_lock = asyncio.Lock()
        self._producer: AsyncProducer | None = None
        self._consumer: AsyncConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        # Why the reply reader stopped: raised by every later request.
        self._error: RiverlogError | None = None
        self._closed = False

    @property
    def outstanding(self) -> int:
        """Requests awaiting replies."""
        return len(self._outstanding)

    async def request(
        self,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[Header] | None = None,
        timeout_s: float | None = None,
    ) -> Record:
        """Produce a request and return its reply record; DeadlineExceededError when none
        arrives within `timeout_s` (default: the requester's) of the call."""
        wait_s = self._timeout_s if timeout_s is None else _check_timeout(timeout_s)
        given = list(headers or ())
        if any(h[0] in (REPLY_TO_HEADER, CORRELATION_ID_HEADER) for h in given):
            raise InvalidArgumentError(
                f"headers must not hold {REPLY_TO_HEADER} or {CORRELATION_ID_HEADER}: the "
                "requester sets them"
            )
        deadline_s = time.monotonic() + wait_s
        await self._start()
        if self._error is not None:
            raise self._error
        if len(self._outstanding) >= OUTSTANDING_MAX:
            raise ResourceExhaustedError(
                f"{len(self._outstanding)} requests await replies on {self._reply_topic!r}, "
                f"the most one requester allows ({OUTSTANDING_MAX})"
            )
        assert self._producer is not None
        correlation_id = uuid.uuid4().hex
        reply: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._outstanding[correlation_id] = reply
        given += [
            (REPLY_TO_HEADER, self._reply_topic.encode()),
            (CORRELATION_ID_HEADER, correlation_id.encode()),
        ]
        try:
            async with asyncio.timeout(max(0.0, deadline_s - time.monotonic())):
                sent = await self._producer.send(self._topic, value, key=key, headers=given)
                await sent
                return await reply
        except TimeoutError:
            raise DeadlineExceededError(
                f"no reply to request {correlation_id} (topic {self._topic!r}) on "
                f"{self._reply_topic!r} within {wait_s} s"
            ) from None
        finally:
            self._outstanding.pop(correlation_id, None)
            if reply.done() and not reply.cancelled():
                reply.exception()  # failed by close() while the request was being sent: seen

    async def _start(self) -> None:
        if self._closed:
            raise RiverlogError("the requester is closed")
        if self._reader is not None:
            return
        async with self._start_lock:
            if self._reader is not None:
                return
            partitions = await self._reply_partitions()
            consumer = AsyncConsumer(
                self._server, fetch_max_wait_ms=REPLY_POLL_MS, token=self._token, tls=self._tls
            )
            try:
                consumer.assign([TopicPartition(self._reply_topic, p) for p in range(partitions)])
                await consumer.seek_to_end()
            except BaseException:
                await consumer.close()
                raise
            self._consumer = consumer
            self._producer = AsyncProducer(
                self._server, linger_ms=0, token=self._token, tls=self._tls
            )
            self._reader = asyncio.get_running_loop().create_task(
                self._read_replies(consumer), name="riverlog-requester-replies"
            )

    async def _reply_partitions(self) -> int:
        """The reply topic's partition count (creating it with one when it does not exist)."""
        admin = AsyncAdmin(self._server, token=self._token, tls=self._tls)
        try:
            try:
                return len((await admin.describe_topic(self._reply_topic)).partitions)
            except NotFoundError:
                pass
            try:
                return len((await admin.create_topic(self._reply_topic, 1)).partitions)
            except AlreadyExistsError:  # another requester created it meanwhile
                return len((await admin.describe_topic(self._reply_topic)).partitions)
        finally:
            await admin.close()

    async def _read_replies(self, consumer: AsyncConsumer) -> None:
        """Hand each reply to the request awaiting it; drop the others."""
        while not consumer.closed:
            try:
                records = await consumer.poll(REPLY_POLL_MS)
            except RiverlogError as e:
                log.error("reading replies on %s failed: %s", self._reply_topic, e)
                self._error = e
                self._fail_outstanding(e)
                return
            for record in records:
                raw = header(record, CORRELATION_ID_HEADER)
                reply = None if raw is None else self._outstanding.get(raw.decode(errors="replace"))
                if reply is None or reply.done():
                    log.debug("reply %r on %s: nobody waits for it", raw, self._reply_topic)
                    continue
                reply.set_result(record)

    def _fail_outstanding(self, error: RiverlogError) -> None:
        for reply in self._outstanding.values():
            if not reply.done():
                reply.set_exception(error)

    async def close(self) -> None:
        """Stop reading replies (requests still waiting fail) and close the connections."""
        if self._closed:
            return
        self._closed = True
        async with self._start_lock:  # a start in progress finishes first
            self._fail_outstanding(RiverlogError("the requester was closed"))
            if self._consumer is not None:
                await self._consumer.close()  # the reader's poll returns, and the reader ends
            if self._reader is not None:
                await asyncio.gather(self._reader, return_exceptions=True)
            if self._producer is not None:
                await self._producer.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


class Requester:
    """AsyncRequester for synchronous code, on a private event-loop thread; any number of
    threads may call request() at once."""

    def __init__(
        self,
        server: str | None = None,
        *,
        topic: str,
        reply_topic: str,
        timeout_s: float = 10.0,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        self._core = AsyncRequester(
            server,
            topic=topic,
            reply_topic=reply_topic,
            timeout_s=timeout_s,
            token=token,
            tls=tls,
        )
        self._thread = EventLoopThread("riverlog-requester")

    @property
    def outstanding(self) -> int:
        return self._core.outstanding

    def request(
        self,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[Header] | None = None,
        timeout_s: float | None = None,
    ) -> Record:
        return _run(self._thread, self._core.request(value, key, headers, timeout_s), "requester")

    def close(self) -> None:
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


def _run(thread: EventLoopThread, coro: Coroutine[Any, Any, T], what: str) -> T:
    if thread.loop.is_closed():
        coro.close()
        raise RiverlogError(f"the {what} is closed")
    return thread.run(coro)


# ---------------------------------------------------------------------------- responder
class AsyncResponder:
    """Answers the requests on `topic` as a member of share group `group` (see the module
    docstring). `handler(record)` returns the reply's value, or an awaitable of it; it runs
    on the event loop, so a blocking handler should be run in a thread (Responder does).

    `lock_ms`: how long a request is held (set when this responder creates the group): keep
    `max_records` handler calls well inside it, or requests are handed out twice.
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        topic: str,
        group: str,
        handler: Handler,
        lock_ms: int = 30_000,
        max_records: int = 100,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        if not callable(handler):
            raise InvalidArgumentError(f"handler must be callable, got {handler!r}")
        self._server = default_server(server)
        self._handler = handler
        self._consumer = AsyncShareConsumer(
            self._server,
            group=group,
            topics=[topic],
            lock_ms=lock_ms,
            max_records=max_records,
            max_wait_ms=SERVE_POLL_MS,
            token=token,
            tls=tls,
        )
        self._producer = AsyncProducer(self._server, linger_ms=0, token=token, tls=tls)
        self._serving = 0
        self._idle = asyncio.Event()
        self._closing = False
        self._closed = False

    def take_ack_failures(self) -> list[AckFailure]:
        """Acknowledgements of requests the broker refused (ShareConsumer.take_ack_failures):
        a request whose lock expired before its reply was appended may be answered twice."""
        return self._consumer.take_ack_failures()

    async def serve(self, max_requests: int | None = None, timeout_s: float | None = None) -> int:
        """Answer requests until `max_requests` were handled (answered, released or rejected)
        or `timeout_s` passed, or close() is called; how many were handled. The
        acknowledgements are committed (durable) before it returns."""
        if max_requests is not None and (
            isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1
        ):
            raise InvalidArgumentError(f"max_requests must be at least 1, got {max_requests!r}")
        deadline_s = None if timeout_s is None else time.monotonic() + _check_timeout(timeout_s)
        if self._closing:
            raise RiverlogError("the responder is closed")
        self._serving += 1
        self._idle.clear()
        handled = 0
        try:
            while not self._closing and (max_requests is None or handled < max_requests):
                wait_ms = SERVE_POLL_MS
                if deadline_s is not None:
                    left_ms = int((deadline_s - time.monotonic()) * 1000)
                    if left_ms <= 0:
                        break
                    wait_ms = min(wait_ms, left_ms)
                limit = None if max_requests is None else max_requests - handled
                records = await self._consumer.poll(wait_ms, limit)
                handled += await self._answer(records)
            if not self._consumer.closed:
                await self._consumer.commit()
        finally:
            self._serving -= 1
            if not self._serving:
                self._idle.set()
        return handled

    async def _answer(self, records: list[ShareRecord]) -> int:
        """Handle a poll's requests: call the handler, produce the replies, then ack each
        request whose reply was appended. How many were handled."""
        sent: list[tuple[ShareRecord, asyncio.Future[Any]]] = []
        for record in records:
            reply_to, correlation_id = (
                header(record, REPLY_TO_HEADER),
                header(record, CORRELATION_ID_HEADER),
            )
            if not reply_to or not correlation_id:
                self._settle(
                    self._consumer.reject,
                    record,
                    f"no {REPLY_TO_HEADER} or {CORRELATION_ID_HEADER} header",
                )
                continue
            try:
                value = self._handler(record)
                if inspect.isawaitable(value):
                    value = await value
                if not isinstance(value, bytes):
                    raise TypeError(f"the handler returned {type(value).__name__}, not bytes")
            except Exception as e:
                log.warning(
                    "handler failed on %s-%d offset %d: %r",
                    record.topic,
                    record.partition,
                    record.offset,
                    e,
                )
                self._settle(self._consumer.release, record, f"{type(e).__name__}: {e}")
                continue
            try:
                future = await self._producer.send(
                    reply_to.decode(errors="replace"),
                    value,
                    key=correlation_id,
                    headers=[(CORRELATION_ID_HEADER, correlation_id)],
                )
            except RiverlogError as e:
                self._settle(self._consumer.release, record, f"reply not sent: {e}")
                continue
            sent.append((record, future))
        for record, future in sent:
            try:
                await future
            except RiverlogError as e:
                self._settle(self._consumer.release, record, f"reply not sent: {e}")
                continue
            self._settle(lambda r, _error: self._consumer.ack(r), record, "")
        return len(records)

    @staticmethod
    def _settle(how: Callable[[ShareRecord, str], None], record: ShareRecord, error: str) -> None:
        """Acknowledge a request; one no longer held (the membership ended while it was
        handled: the broker released it) is only logged."""
        try:
            how(record, _cut(error))
        except InvalidArgumentError as e:
            log.warning(
                "request %s-%d offset %d: %s", record.topic, record.partition, record.offset, e
            )

    async def close(self) -> None:
        """Stop serving (the request in hand is finished first, up to SERVE_STOP_S), send the
        acknowledgements, leave the group and close the connections."""
        if self._closed:
            return
        self._closing = True
        if self._serving:
            try:
                await asyncio.wait_for(self._idle.wait(), SERVE_STOP_S)
            except TimeoutError:
                log.warning("responder: serve() still busy after %.0f s; closing", SERVE_STOP_S)
        self._closed = True
        try:
            await self._consumer.close()
        finally:
            await self._producer.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


class Responder:
    """AsyncResponder for synchronous code: serve() blocks; `handler` (a plain function)
    runs on a worker thread of the responder's event loop, so heartbeats go on meanwhile."""

    def __init__(
        self,
        server: str | None = None,
        *,
        topic: str,
        group: str,
        handler: Callable[[ShareRecord], bytes],
        lock_ms: int = 30_000,
        max_records: int = 100,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        if not callable(handler):
            raise InvalidArgumentError(f"handler must be callable, got {handler!r}")

        def in_thread(record: ShareRecord) -> Awaitable[bytes]:
            return asyncio.to_thread(handler, record)

        self._core = AsyncResponder(
            server,
            topic=topic,
            group=group,
            handler=in_thread,
            lock_ms=lock_ms,
            max_records=max_records,
            token=token,
            tls=tls,
        )
        self._thread = EventLoopThread("riverlog-responder")

    def take_ack_failures(self) -> list[AckFailure]:
        return self._core.take_ack_failures()

    def serve(self, max_requests: int | None = None, timeout_s: float | None = None) -> int:
        return _run(self._thread, self._core.serve(max_requests, timeout_s), "responder")

    def close(self) -> None:
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


__all__ = [
    "CORRELATION_ID_HEADER",
    "REPLY_TO_HEADER",
    "AsyncRequester",
    "AsyncResponder",
    "Requester",
    "Responder",
]
