"""A loopback gRPC proxy that loses produce traffic on purpose.

Every call is forwarded to the upstream broker as raw bytes. On ProduceStream a share of
the requests is not forwarded and a share of the answers is not passed back, chosen by a
seeded random generator: the client sees what a flaky network shows it (answers that never
come, a request the broker never saw), and must retry without duplicating or reordering.
Counts of what was dropped and of the `duplicate` answers passed back are kept for the test
to report.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from stream._pb import broker_pb2

PRODUCE_STREAM = "/riverlog.v1.Broker/ProduceStream"
UPSTREAM_OPTIONS = [
    ("grpc.max_receive_message_length", 65 * 1024 * 1024),
    ("grpc.max_send_message_length", 65 * 1024 * 1024),
    # A restarted broker is found again within half a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
# Each forwarded unary call and each produce stream gets a deadline.
CALL_TIMEOUT_S = 30.0


@dataclass
class DropCounts:
    requests: int = 0
    requests_dropped: int = 0
    answers: int = 0
    answers_dropped: int = 0
    duplicates_answered: int = 0  # entries answered with `duplicate` (passed back)
    streams: int = 0


def _identity(raw: bytes) -> bytes:
    return raw


class DropProxy:
    """Listens on 127.0.0.1:<ephemeral>; forwards to `upstream`, dropping ProduceStream
    requests and answers with the given probabilities."""

    def __init__(
        self, upstream: str, *, drop_requests: float, drop_answers: float, seed: int = 7
    ) -> None:
        self.counts = DropCounts()
        self._drop_requests = drop_requests
        self._drop_answers = drop_answers
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(upstream, options=UPSTREAM_OPTIONS)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="drop-proxy"),
            options=UPSTREAM_OPTIONS[:2],
        )
        self._server.add_generic_rpc_handlers((_Handler(self),))
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self._server.start()

    def _drop(self, share: float) -> bool:
        with self._lock:
            return self._random.random() < share

    def produce_stream(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        with self._lock:
            self.counts.streams += 1

        def forwarded() -> Iterator[bytes]:
            for raw in requests:
                with self._lock:
                    self.counts.requests += 1
                if self._drop(self._drop_requests):
                    with self._lock:
                        self.counts.requests_dropped += 1
                    continue
                yield raw

        call: Any = self._channel.stream_stream(
            PRODUCE_STREAM, request_serializer=_identity, response_deserializer=_identity
        )(forwarded(), timeout=CALL_TIMEOUT_S)
        context.add_callback(call.cancel)
        try:
            for raw in call:
                with self._lock:
                    self.counts.answers += 1
                if self._drop(self._drop_answers):
                    with self._lock:
                        self.counts.answers_dropped += 1
                    continue
                answer = broker_pb2.ProduceResponse.FromString(raw)
                duplicates = sum(1 for r in answer.results if r.duplicate)
                if duplicates:
                    with self._lock:
                        self.counts.duplicates_answered += duplicates
                yield raw
        except grpc.RpcError as e:
            context.abort(e.code(), e.details() or "upstream failed")

    def unary(self, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        forward = self._channel.unary_unary(
            method, request_serializer=_identity, response_deserializer=_identity
        )

        def handle(raw: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                answer: bytes = forward(raw, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as e:
                context.abort(e.code(), e.details() or "upstream failed")
            return answer

        return handle

    def close(self) -> None:
        self._server.stop(grace=None).wait(5)
        self._channel.close()


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: DropProxy) -> None:
        self._proxy = proxy

    def service(
        self, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method: str = details.method
        if method == PRODUCE_STREAM:
            return grpc.stream_stream_rpc_method_handler(self._proxy.produce_stream)
        # Every other call this test makes is unary (DescribeTopic, InitProducer).
        return grpc.unary_unary_rpc_method_handler(self._proxy.unary(method))
