"""What every client class shares: types, errors, the connection, the event-loop thread.

One asyncio core, thin sync facades: each async class (AsyncProducer, AsyncConsumer,
AsyncAdmin) does the work on grpc.aio; each sync class (Producer, Consumer, Admin) owns an
`EventLoopThread` and runs the async object's coroutines there. No logic is written twice.

Connections (`open_channel`): plaintext by default; with `tls=TlsOptions(...)` TLS, verifying
the broker's certificate against `ca_file` (None: the system's root CAs) and, with
`cert_file` and `key_file`, presenting a client certificate (mutual TLS; the broker then
knows the caller as the certificate's subject, "CN=alice"). With `token=`, every call of the
channel carries the metadata ("authorization", "Bearer <token>"), added by grpc.aio client
interceptors (all four call kinds), over plaintext and TLS alike. The library takes the
token from the `token=` argument only, never from the environment: a credential goes where
the code says, not wherever $RIVERLOG_SERVER points (the `riverlog` command does read
$RIVERLOG_TOKEN). A token sent without TLS to a host that is not loopback is readable on the
network: open_channel logs a warning for it once per channel.

Secrets: a token lives only in the interceptor (whose repr hides it) and in the metadata of
calls; `TlsOptions` holds paths, never key material; no error message, repr or log line
carries a token (a malformed one is refused by length and position of the bad character,
never echoed).

Quotas: a produce, fetch or share-fetch answer with throttle_time_ms > 0 says the broker held
it back for the caller's quota; the client then waits as long (at most THROTTLE_MS_MAX)
before its next request of that kind (`throttle_s`).

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
    ├── GroupError               FAILED_PRECONDITION / ABORTED / NOT_OWNED of groups
    ├── AuthenticationError      UNAUTHENTICATED: no token or certificate, or one refused
    ├── AuthorizationError       PERMISSION_DENIED by an ACL (names operation and resource)
    ├── UnavailableError         broker down or shutting down (retriable)
    ├── DeadlineExceededError    the call's own time-out
    └── BufferFullError          Producer.send waited its time-out for buffer space
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import threading
from collections.abc import AsyncIterable, Callable, Coroutine, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
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
# The metadata key and scheme of a bearer token (proto/riverlog/v1/security.proto).
AUTH_METADATA_KEY = "authorization"
AUTH_SCHEME = "Bearer"
# The longest token open_channel takes (the broker's are 46 characters; it refuses more than
# 512 unhashed): gRPC would carry far more, and a header of megabytes is a mistake.
TOKEN_CHARS_MAX = 4096
# The longest wait a throttle_time_ms answer imposes on the client, as on the broker (its
# Guard.THROTTLE_MS_MAX): a broker's bad answer cannot stall a client for hours.
THROTTLE_MS_MAX = 30_000

log = logging.getLogger("riverlog.client")

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


class AuthenticationError(RiverlogError):
    """The broker does not know who is calling (UNAUTHENTICATED): no token or client
    certificate where one is required, or a token it does not know (revoked, mistyped)."""


class AuthorizationError(RiverlogError):
    """An ACL refused the call (PERMISSION_DENIED); the message names the operation and the
    resource."""


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
    grpc.StatusCode.PERMISSION_DENIED: AuthorizationError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


# Group-protocol refusals whose status other errors share: NOT_FOUND of a group (not a topic),
# PERMISSION_DENIED of a partition the member does not own (not an ACL).
_GROUP_REFUSALS = frozenset(
    {
        (grpc.StatusCode.NOT_FOUND, "UNKNOWN_GROUP"),
        (grpc.StatusCode.PERMISSION_DENIED, "NOT_OWNED"),
    }
)


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
    if (code, name) in _GROUP_REFUSALS:
        return GroupError(details, code=code, name=name)
    kind = _BY_NAME.get(name) or _BY_CODE.get(code, RiverlogError)
    return kind(details, code=code, name=name)


def from_partition_error(code: int, message: str, name: str = "") -> RiverlogError:
    """The client error for a per-partition error in an answer (PartitionError)."""
    for status in grpc.StatusCode:
        if status.value[0] == code:
            if (status, name) in _GROUP_REFUSALS:
                return GroupError(message, code=status, name=name)
            kind = _BY_NAME.get(name) or _BY_CODE.get(status, RiverlogError)
            return kind(message, code=status, name=name)
    return RiverlogError(message, name=name)


# ---------------------------------------------------------------------------- connections
@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS for a client's connection: where the PEM files are (paths only; they are read when
    a channel opens, and what they hold is never kept or shown).

    - ca_file: the CA certificate(s) the broker's certificate must chain to (None: the
      system's root CAs);
    - cert_file, key_file: this client's certificate (chain) and private key, for a broker
      that requires client certificates (mutual TLS). Both or neither.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidArgumentError(f"TlsOptions.{name} must be a path or None")
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgumentError(
                "TlsOptions: a client certificate needs both cert_file and key_file, got "
                + ("cert_file only" if self.key_file is None else "key_file only")
            )

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials: the files read now (InvalidArgumentError naming the file
        when one cannot be read)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca_file, "CA certificate"),
            private_key=_read_pem(self.key_file, "client key"),
            certificate_chain=_read_pem(self.cert_file, "client certificate"),
        )


def _read_pem(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InvalidArgumentError(f"cannot read the TLS {what} {path}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise InvalidArgumentError(f"the TLS {what} {path} is not in PEM format")
    return data


def check_token(token: str) -> str:
    """`token` if it can travel as a bearer token (1 to TOKEN_CHARS_MAX printable ASCII
    characters without spaces); InvalidArgumentError, which never shows the token, if not."""
    if not isinstance(token, str):
        raise InvalidArgumentError(f"token must be a str, got {type(token).__name__}")
    if not 1 <= len(token) <= TOKEN_CHARS_MAX:
        raise InvalidArgumentError(
            f"token must be 1 to {TOKEN_CHARS_MAX} characters, got {len(token)}"
        )
    for i, char in enumerate(token):
        if not "!" <= char <= "~":
            raise InvalidArgumentError(
                f"token character {i + 1} of {len(token)} is not printable ASCII without spaces "
                "(a stray newline or space from the token file?)"
            )
    return token


class _BearerToken:
    """What the four interceptors share: the call's details with the token added."""

    __slots__ = ("_pair",)

    def __init__(self, token: str) -> None:
        self._pair = (AUTH_METADATA_KEY, f"{AUTH_SCHEME} {token}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(token=<hidden>)"

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._pair)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio sorts interceptors by their first matching base class: one class per call kind.
class _UnaryUnaryToken(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    __slots__ = ()

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamToken(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    __slots__ = ()

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnaryToken(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    __slots__ = ()

    async def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Iterable[Any] | AsyncIterable[Any],
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStreamToken(_BearerToken, grpc.aio.StreamStreamClientInterceptor):
    __slots__ = ()

    async def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Iterable[Any] | AsyncIterable[Any],
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add ("authorization", "Bearer <token>") to every call."""
    check_token(token)
    return [
        _UnaryUnaryToken(token),
        _UnaryStreamToken(token),
        _StreamUnaryToken(token),
        _StreamStreamToken(token),
    ]


def _is_loopback(server: str) -> bool:
    """Whether `server` ("host:port", "[v6]:port", "unix:path", "dns:///host:port") is this
    machine; an unknown shape counts as not."""
    if server.startswith(("unix:", "unix-abstract:")):
        return True
    target = server.removeprefix("dns:").lstrip("/").removeprefix("ipv4:").removeprefix("ipv6:")
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or "]" in target else target
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_channel(
    server: str, *, token: str | None = None, tls: TlsOptions | None = None
) -> grpc.aio.Channel:
    """An aio channel to `server` (plaintext, or TLS with `tls`; every call carrying `token`
    as a bearer token when given); create it on the loop that will use it."""
    options = [
        ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
        ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
    ]
    interceptors = None if token is None else token_interceptors(token)
    if tls is None:
        if token is not None and not _is_loopback(server):
            log.warning(
                "sending a bearer token to %s without TLS: anyone on the network path can "
                "read it (pass tls=TlsOptions(...))",
                server,
            )
        return grpc.aio.insecure_channel(server, options=options, interceptors=interceptors)
    if not isinstance(tls, TlsOptions):
        raise InvalidArgumentError(f"tls must be a TlsOptions or None, got {type(tls).__name__}")
    return grpc.aio.secure_channel(
        server, tls.credentials(), options=options, interceptors=interceptors
    )


def throttle_s(throttle_time_ms: int) -> float:
    """How long to wait before the next request of a kind after an answer carrying
    `throttle_time_ms` (0 for none; at most THROTTLE_MS_MAX)."""
    return min(max(throttle_time_ms, 0), THROTTLE_MS_MAX) / 1000


# ---------------------------------------------------------------------------- plumbing


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
