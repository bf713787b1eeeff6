"""The broker's door: who is calling (authentication), what they may do (ACLs), how fast
(quotas). One object, `Guard`, used by one server interceptor and by every servicer.

Authentication runs in the interceptor, once per call, before the method: a bearer token in
the metadata key "authorization" ("Bearer <token>") names the principal the token file gives
it; otherwise the subject of a verified TLS client certificate ("CN=alice,O=acme") is the
principal; otherwise, when tokens or client certificates are required, the call ends
UNAUTHENTICATED; otherwise the principal is ANONYMOUS. A presented token that is not known
is UNAUTHENTICATED even when a certificate would do: a wrong secret is never ignored. The
health service (grpc.health.v1.Health) is open to all, so load balancers can probe.

The principal lives in a context variable for the call; servicers ask `check(operation,
resource type, name)` (raises NotAuthorizedError: PERMISSION_DENIED naming the operation and
the resource) or `allowed(...)` (listing filters). With ACLs disabled both allow everything.
The table of what each call needs is at the top of proto/riverlog/v1/security.proto.

Quotas: `throttle(kind, nbytes)` accounts a call's bytes to the principal and returns the ms
to hold its answer back (Kafka's shape: the broker delays, the answer says by how much, the
client waits as long before its next request). The servicer sleeps that long, bounded by
THROTTLE_MS_MAX, in the call's own thread.

Secrets: a token is read from the metadata, hashed and compared (stream/security/_tokens.py);
it is never logged, never put into an error message, never kept.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from storage import StorageError

from ._acl import Authorizer, Operation, ResourceType, describe_denied
from ._quota import QuotaKind, QuotaManager
from ._tokens import TokenStore

log = logging.getLogger("riverlog.security")

ANONYMOUS = "ANONYMOUS"
CLUSTER_NAME = "cluster"
AUTH_METADATA_KEY = "authorization"
BEARER = "bearer "
# Paths open without authentication.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# The longest a single answer is held back for a quota.
THROTTLE_MS_MAX = 30_000

_PRINCIPAL: contextvars.ContextVar[str] = contextvars.ContextVar(
    "riverlog_principal", default=ANONYMOUS
)


class NotAuthenticatedError(StorageError):
    """No credentials, or credentials the broker does not accept (UNAUTHENTICATED)."""


class NotAuthorizedError(StorageError):
    """The principal may not do this (PERMISSION_DENIED)."""


class Guard:
    """Authentication, authorization and quotas of one broker. Thread-safe."""

    def __init__(
        self,
        *,
        tokens: TokenStore | None,
        authorizer: Authorizer,
        quotas: QuotaManager,
        require_client_cert: bool = False,
    ) -> None:
        self.tokens = tokens
        self.authorizer = authorizer
        self.quotas = quotas
        self.require_client_cert = require_client_cert

    @property
    def authenticating(self) -> bool:
        """Whether callers must prove who they are (tokens or client certificates)."""
        return self.tokens is not None or self.require_client_cert

    # ------------------------------------------------------------------ who
    def authenticate(self, context: grpc.ServicerContext) -> str:
        """The caller's principal; NotAuthenticatedError when it has none acceptable."""
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == AUTH_METADATA_KEY:
                text = value if isinstance(value, str) else value.decode("utf-8", "replace")
                if not text.lower().startswith(BEARER):
                    raise NotAuthenticatedError(
                        "the authorization metadata is not a bearer token ('Bearer <token>')"
                    )
                token = text[len(BEARER) :].strip()
        if token is not None:
            if self.tokens is None:
                raise NotAuthenticatedError("this broker does not take tokens")
            principal = self.tokens.authenticate(token)
            if principal is None:
                raise NotAuthenticatedError("unknown or revoked token")
            return principal
        subject = _certificate_subject(context)
        if subject is not None:
            return subject
        if self.authenticating:
            raise NotAuthenticatedError(
                "this broker requires authentication: a bearer token"
                + (" or a client certificate" if self.require_client_cert else "")
            )
        return ANONYMOUS

    @staticmethod
    def principal() -> str:
        """The principal of the call being served."""
        return _PRINCIPAL.get()

    def is_super_user(self) -> bool:
        return self.principal() in self.authorizer.super_users

    # ------------------------------------------------------------------ what
    def allowed(self, operation: Operation, resource_type: ResourceType, name: str) -> bool:
        return self.authorizer.authorize(self.principal(), operation, resource_type, name)

    def check(self, operation: Operation, resource_type: ResourceType, name: str) -> None:
        if not self.authorizer.authorize(self.principal(), operation, resource_type, name):
            raise NotAuthorizedError(describe_denied(operation, resource_type, name))

    def check_cluster(self, operation: Operation) -> None:
        self.check(operation, ResourceType.CLUSTER, CLUSTER_NAME)

    def check_create_topic(self, name: str) -> None:
        """CREATE on the topic, or on the cluster (Kafka accepts either)."""
        if not (
            self.allowed(Operation.CREATE, ResourceType.TOPIC, name)
            or self.allowed(Operation.CREATE, ResourceType.CLUSTER, CLUSTER_NAME)
        ):
            raise NotAuthorizedError(describe_denied(Operation.CREATE, ResourceType.TOPIC, name))

    # ------------------------------------------------------------------ how fast
    def throttle(self, kind: QuotaKind, nbytes: int) -> int:
        """Account `nbytes` of `kind` ("produce" | "fetch") and hold the caller back as long
        as its quota says (sleeping here); returns the ms held."""
        ms = self.quotas.record(self.principal(), kind, nbytes)
        if ms <= 0:
            return 0
        ms = min(ms, THROTTLE_MS_MAX)
        time.sleep(ms / 1000)
        return ms

    # ------------------------------------------------------------------ the interceptor
    def interceptor(self) -> grpc.ServerInterceptor:
        return _AuthInterceptor(self)


def _certificate_subject(context: grpc.ServicerContext) -> str | None:
    """The subject of the caller's verified client certificate, if it presented one."""
    auth = context.auth_context() or {}
    for key in ("x509_subject", "x509_common_name"):
        values = auth.get(key)
        if values:
            raw = values[0]
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            return text if key == "x509_subject" else f"CN={text}"
    return None


Behaviour = Callable[[Any, grpc.ServicerContext], Any]


class _AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        method: str = getattr(handler_call_details, "method", "") or ""
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        guard = self._guard
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(guard, handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(guard, handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _streaming(guard, handler.stream_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _unary(guard, handler.stream_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler


def _enter(guard: Guard, context: grpc.ServicerContext) -> contextvars.Token[str]:
    try:
        principal = guard.authenticate(context)
    except NotAuthenticatedError as e:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        raise  # abort raises; this keeps the type checker informed
    return _PRINCIPAL.set(principal)


def _unary(guard: Guard, behaviour: Behaviour) -> Behaviour:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        token = _enter(guard, context)
        try:
            return behaviour(request, context)
        finally:
            _PRINCIPAL.reset(token)

    return call


def _streaming(guard: Guard, behaviour: Behaviour) -> Behaviour:
    """A stream is authenticated when it opens, and again whenever the token table changed
    (a token removed and reloaded): before each request it reads (ProduceStream) and before
    each answer it sends (Subscribe), so a revoked token stops a stream that is open."""

    def still_valid(version: list[int], context: grpc.ServicerContext) -> None:
        """NotAuthenticatedError if the caller's credentials went since the last check."""
        tokens = guard.tokens
        if tokens is not None and tokens.version != version[0]:
            version[0] = tokens.version
            guard.authenticate(context)

    def checked(requests: Iterator[Any], version: list[int], context: Any) -> Iterator[Any]:
        # Read inside the servicer: its error handling turns the error into UNAUTHENTICATED.
        for request in requests:
            still_valid(version, context)
            yield request

    def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        version = [0 if guard.tokens is None else guard.tokens.version]
        token = _enter(guard, context)
        try:
            if isinstance(request, Iterator):
                request = checked(request, version, context)
            for answer in behaviour(request, context):
                try:
                    still_valid(version, context)
                except NotAuthenticatedError as e:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
                yield answer
        finally:
            _PRINCIPAL.reset(token)

    return call


def open_guard(quotas_clock: Callable[[], int]) -> Guard:
    """A guard that lets everyone do everything (no tokens, ACLs off, no quotas): the
    default of a broker started without security settings."""
    return Guard(
        tokens=None,
        authorizer=Authorizer(None, frozenset(), enabled=False),
        quotas=QuotaManager(quotas_clock),
    )


__all__ = [
    "ANONYMOUS",
    "CLUSTER_NAME",
    "Guard",
    "NotAuthenticatedError",
    "NotAuthorizedError",
    "open_guard",
]
