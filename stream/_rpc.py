"""Shared pieces of the gRPC edge: the error-to-status map, request parsing, handler guards.

Requests arrive as raw bytes and are parsed inside the handler, so undecodable bytes get
INVALID_ARGUMENT (grpcio's own deserializer would answer INTERNAL). Every broker error is a
StorageError subclass; `status_for` maps them, and nothing else reaches the client as UNKNOWN.

    status               when
    INVALID_ARGUMENT     undecodable request, bad name / count / config, corrupt batch
    NOT_FOUND            unknown topic, partition or group
    ALREADY_EXISTS       creating a topic that exists
    OUT_OF_RANGE         an offset outside [log start offset, log end offset]
    RESOURCE_EXHAUSTED   batch or request over a limit, disk full, too many streams
    FAILED_PRECONDITION  unknown group member (rejoin); group not empty (delete, reset);
                         idempotent batch out of sequence or from an unknown producer id
    ABORTED              stale member epoch (heartbeat, then retry); fenced producer epoch
    UNAUTHENTICATED      no token or certificate where one is required; an unknown token
    PERMISSION_DENIED    an ACL does not allow the call (names the operation and resource);
                         commit or fetch for a partition the member does not own
    UNAVAILABLE          the broker is shutting down; a partition log offline after a failed
                         fsync (LOG_OFFLINE)
    INTERNAL             a corrupt log or an unexpected failure (logged with its traceback)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from storage import (
    CorruptBatchError,
    DiskFullError,
    InvalidConfigError,
    InvalidNameError,
    LimitExceededError,
    LogClosedError,
    LogOfflineError,
    OffsetOutOfRangeError,
    OutOfOrderSequenceError,
    ProducerFencedError,
    StorageError,
    TopicExistsError,
    UnknownProducerError,
    UnknownTopicError,
)

from ._broker import InvalidRequestError, ShuttingDownError
from ._pb import types_pb2
from ._producer_ids import InvalidProducerNameError
from .groups._coordinator import (
    FencedMemberError,
    GroupNotEmptyError,
    NotOwnedError,
    UnknownGroupError,
    UnknownMemberError,
)
from .security._guard import NotAuthenticatedError, NotAuthorizedError

log = logging.getLogger("riverlog.server")

_STATUS: list[tuple[type[StorageError], grpc.StatusCode]] = [
    (NotAuthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (NotAuthorizedError, grpc.StatusCode.PERMISSION_DENIED),
    (UnknownGroupError, grpc.StatusCode.NOT_FOUND),
    (UnknownMemberError, grpc.StatusCode.FAILED_PRECONDITION),
    (FencedMemberError, grpc.StatusCode.ABORTED),
    (NotOwnedError, grpc.StatusCode.PERMISSION_DENIED),
    (GroupNotEmptyError, grpc.StatusCode.FAILED_PRECONDITION),
    (OutOfOrderSequenceError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownProducerError, grpc.StatusCode.FAILED_PRECONDITION),
    (ProducerFencedError, grpc.StatusCode.ABORTED),
    (InvalidProducerNameError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownTopicError, grpc.StatusCode.NOT_FOUND),
    (TopicExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (OffsetOutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
    (CorruptBatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidNameError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DiskFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
    (LogOfflineError, grpc.StatusCode.UNAVAILABLE),
    (LogClosedError, grpc.StatusCode.UNAVAILABLE),
]


def status_for(error: StorageError) -> grpc.StatusCode:
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def partition_error(error: StorageError | None) -> types_pb2.PartitionError | None:
    if error is None:
        return None
    return types_pb2.PartitionError(
        code=status_for(error).value[0], message=str(error), name=error_name(error)
    )


# Errors that share a status also name themselves: in the trailing metadata of a failed call,
# and in PartitionError.name (see proto/riverlog/v1/groups.proto and broker.proto).
ERROR_METADATA_KEY = "riverlog-error"
_ERROR_NAMES: list[tuple[type[StorageError], str]] = [
    (UnknownGroupError, "UNKNOWN_GROUP"),
    (UnknownMemberError, "UNKNOWN_MEMBER"),
    (FencedMemberError, "FENCED_MEMBER"),
    (NotOwnedError, "NOT_OWNED"),
    (GroupNotEmptyError, "GROUP_NOT_EMPTY"),
    (OutOfOrderSequenceError, "OUT_OF_ORDER_SEQUENCE"),
    (UnknownProducerError, "UNKNOWN_PRODUCER"),
    (ProducerFencedError, "PRODUCER_FENCED"),
    (LogOfflineError, "LOG_OFFLINE"),
]


def error_name(error: StorageError) -> str:
    for kind, name in _ERROR_NAMES:
        if isinstance(error, kind):
            return name
    return ""


def abort_with(context: grpc.ServicerContext, error: StorageError) -> NoReturn:
    name = error_name(error)
    if name:
        context.set_trailing_metadata(((ERROR_METADATA_KEY, name),))
    code = status_for(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error: %s", error, exc_info=error)
    context.abort(code, str(error))


M = TypeVar("M", bound=Message)


def parse(kind: type[M], raw: bytes, context: grpc.ServicerContext) -> M:
    try:
        return kind.FromString(raw)
    except DecodeError as e:
        raise InvalidRequestError(f"undecodable {kind.__name__}: {e}") from None


Handler = Callable[[Any, Any, grpc.ServicerContext], Any]


def guarded(fn: Handler) -> Handler:
    """Map broker errors to statuses; anything unexpected is INTERNAL, never UNKNOWN."""

    @functools.wraps(fn)
    def wrapper(self: Any, raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, raw, context)
        except StorageError as e:
            abort_with(context, e)
        except Exception as e:
            log.exception("unexpected failure in %s", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    return wrapper


def guarded_stream(fn: Handler) -> Handler:
    @functools.wraps(fn)
    def wrapper(self: Any, raw: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, raw, context)
        except StorageError as e:
            abort_with(context, e)
        except Exception as e:
            log.exception("unexpected failure in %s", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    return wrapper


def method_handlers(
    service: str, impl: Any, kinds: dict[str, tuple[str, Any]]
) -> grpc.GenericRpcHandler:
    table: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for name, (kind, response) in kinds.items():
        fn = getattr(impl, name)
        # None: the handler returns its answer already encoded (see encode_with_bytes).
        serialize = None if response is None else response.SerializeToString
        if kind == "unary":
            table[name] = grpc.unary_unary_rpc_method_handler(fn, response_serializer=serialize)
        elif kind == "server_stream":
            table[name] = grpc.unary_stream_rpc_method_handler(fn, response_serializer=serialize)
        else:
            table[name] = grpc.stream_stream_rpc_method_handler(fn, response_serializer=serialize)
    return grpc.method_handlers_generic_handler(service, table)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_with_bytes(
    fields: Message, field_number: int, data: bytes | memoryview
) -> list[bytes | memoryview]:
    """Protobuf wire pieces of `fields` plus a bytes field `field_number` holding `data`.

    The record batches of a fetch or subscribe answer are spliced in by reference: building
    the message with them and serializing it would copy each batch twice more. Protobuf
    accepts fields in any order, so the result parses as the whole message.
    """
    pieces: list[bytes | memoryview] = [fields.SerializeToString()]
    if len(data):
        pieces += [_varint(field_number << 3 | 2), _varint(len(data)), data]
    return pieces


def nest(field_number: int, pieces: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """`pieces` (one encoded message) as a length-delimited field of an outer message."""
    size = sum(len(p) for p in pieces)
    return [_varint(field_number << 3 | 2), _varint(size), *pieces]
