"""What every client class shares: types, errors, the connection, the event-loop thread.

One asyncio core, thin sync facades: each async class (AsyncProducer, AsyncConsumer,
AsyncAdmin) does the work on grpc.aio; each sync class (Producer, Consumer, Admin) owns an
`EventLoopThread` and runs the async object's coroutines there. No logic is written twice.

The client imports only the batch codec from storage, the generated stubs, and the
partitioner (a leaf module), never the broker.

Errors: every failure a caller sees is a `RiverlogError` subclass named after its gRPC status,
carrying the broker's message (and, for the group protocol, the `riverlog-error` name):

    RiverlogError
    ├── InvalidArgumentError     bad input (names, configs, corrupt batches)
    ├── NotFoundError            unknown topic, partition or group
    ├── AlreadyExistsError       creating a topic that exists
    ├── OffsetOutOfRangeError    an offset outside [log start, log end]
    ├── ResourceExhaustedError   a limit was crossed; disk full
    ├── GroupError               FAILED_PRECONDITION / ABORTED / PERMISSION_DENIED of groups
    ├── UnavailableError         broker down or shutting down (retriable)
    ├── DeadlineExceededError    the call's own time-out
    └── BufferFullError          Producer.send waited its time-out for buffer space
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, NamedTuple, TypeVar

import grpc
import grpc.aio

from storage import Compression

SERVER_DEFAULT = "127.0.0.1:7171"
SERVER_ENV = "RIVERLOG_SERVER"
# The largest message the client sends or accepts (the broker's own limit).
MESSAGE_BYTES_MAX = 65 * 1024 * 1024
# How long a sync facade waits for its loop thread to start or stop.
LOOP_START_TIMEOUT_S = 10.0
ERROR_METADATA_KEY = "riverlog-error"

T = TypeVar("T")


def default_server(server: str | None = None) -> str:
    """The server to use: the argument, else $RIVERLOG_SERVER, else 127.0.0.1:7171."""
    return server or os.environ.get(SERVER_ENV) or SERVER_DEFAULT


# ---------------------------------------------------------------------------- types
class TopicPartition(NamedTuple):
    topic: str
    partition: int


class Record(NamedTuple):
    """One consumed record."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()


class RecordMetadata(NamedTuple):
    """Where a produced record landed."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


COMPRESSION = {
    None: Compression.NONE,
    "none": Compression.NONE,
    "gzip": Compression.GZIP,
    "lz4": Compression.LZ4,
    "zstd": Compression.ZSTD,
}


def compression_of(name: str | None) -> Compression:
    try:
        return COMPRESSION[name]
    except KeyError:
        raise InvalidArgumentError(
            f"compression must be None, 'gzip', 'lz4' or 'zstd', got {name!r}"
        ) from None


# ---------------------------------------------------------------------------- errors
class RiverlogError(Exception):
    """Base of every error the client raises."""

    retriable = False

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, name: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        # The broker's error name for group-protocol errors ("FENCED_MEMBER", ...), else "".
        self.name = name


class InvalidArgumentError(RiverlogError):
    pass


class NotFoundError(RiverlogError):
    pass


class AlreadyExistsError(RiverlogError):
    pass


class OffsetOutOfRangeError(RiverlogError):
    pass


class ResourceExhaustedError(RiverlogError):
    pass


class GroupError(RiverlogError):
    """A group-protocol refusal; `name` says which (UNKNOWN_MEMBER, FENCED_MEMBER, ...)."""


class UnavailableError(RiverlogError):
    retriable = True


class DeadlineExceededError(RiverlogError):
    retriable = True


class BufferFullError(RiverlogError):
    pass


class ProducerError(RiverlogError):
    """An idempotent-produce refusal; `name` says which (the classes below)."""


class OutOfOrderSequenceError(ProducerError):
    """The broker expected another sequence number: a batch before this one was lost."""


class UnknownProducerError(ProducerError):
    """The broker has no state for the producer id (it expired, or was never handed out)."""


class ProducerFencedError(ProducerError):
    """A newer instance of this named producer started: this one may no longer write."""


_BY_NAME: dict[str, type[RiverlogError]] = {
    "OUT_OF_ORDER_SEQUENCE": OutOfOrderSequenceError,
    "UNKNOWN_PRODUCER": UnknownProducerError,
    "PRODUCER_FENCED": ProducerFencedError,
}


_BY_CODE: dict[grpc.StatusCode, type[RiverlogError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.OUT_OF_RANGE: OffsetOutOfRangeError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: GroupError,
    grpc.StatusCode.ABORTED: GroupError,
    grpc.StatusCode.PERMISSION_DENIED: GroupError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def from_rpc_error(error: grpc.RpcError) -> RiverlogError:
    """The client error for a failed call (works for sync and aio call errors)."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or code.name
    name = ""
    # Sync calls give _Metadatum(key, value) named tuples, aio calls plain (key, value) pairs.
    pairs: Any = error.trailing_metadata() or ()
    for key, value in pairs:
        if key == ERROR_METADATA_KEY:
            name = str(value)
    if code == grpc.StatusCode.NOT_FOUND and name == "UNKNOWN_GROUP":
        return GroupError(details, code=code, name=name)
    kind = _BY_NAME.get(name) or _BY_CODE.get(code, RiverlogError)
    return kind(details, code=code, name=name)


def from_partition_error(code: int, message: str, name: str = "") -> RiverlogError:
    """The client error for a per-partition error in an answer (PartitionError)."""
    for status in grpc.StatusCode:
        if status.value[0] == code:
            kind = _BY_NAME.get(name) or _BY_CODE.get(status, RiverlogError)
            return kind(message, code=status, name=name)
    return RiverlogError(message, name=name)


# ---------------------------------------------------------------------------- plumbing
def open_channel(server: str) -> grpc.aio.Channel:
    """An aio channel to `server`; create it on the loop that will use it."""
    return grpc.aio.insecure_channel(
        server,
        options=[
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
        ],
    )


class EventLoopThread:
    """An asyncio loop on a daemon thread, for a sync facade to run its async core on."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(started.set)
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()
        if not started.wait(LOOP_START_TIMEOUT_S):
            raise RuntimeError(f"{name}: event loop thread did not start")

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result (its exception is raised here)."""
        return self.submit(coro).result(timeout_s)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(LOOP_START_TIMEOUT_S)
        if not self._thread.is_alive():
            self.loop.close()
