"""The gRPC edge for the Broker and Admin services: protobuf in, broker call, protobuf out.

Errors map to statuses in one place (_rpc.py, with the table); `build_server` wires every
service, health and reflection.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from storage import (
    BatchHeader,
    LimitExceededError,
    NewRecord,
    StorageError,
)

from ._broker import (
    REQUEST_PARTITIONS_MAX,
    Broker,
    FetchQuery,
    InvalidRequestError,
    OffsetQuery,
    ProduceResult,
    StartSpec,
)
from ._group_service import GROUPS_SERVICE, groups_handlers
from ._groups import GroupManager
from ._pb import admin_pb2, broker_pb2, types_pb2
from ._rpc import (
    encode_with_bytes,
    guarded,
    guarded_stream,
    method_handlers,
    nest,
    parse,
    partition_error,
    status_for,
)
from ._security_service import SECURITY_SERVICE, security_handlers
from ._share import ShareGroupManager
from ._share_service import SHARE_SERVICE, share_handlers
from .groups._coordinator import TopicPartition
from .security._acl import Operation, ResourceType
from .security._guard import Guard, open_guard

log = logging.getLogger("riverlog.server")

BROKER_SERVICE = "riverlog.v1.Broker"
ADMIN_SERVICE = "riverlog.v1.Admin"
MiB = 1024 * 1024
# Largest request or response message: the largest batch (64 MiB) plus framing.
MESSAGE_BYTES_MAX = 65 * MiB
# Field numbers of the hand-encoded answers (proto/riverlog/v1/broker.proto).
FETCH_RESULTS_FIELD = broker_pb2.FetchResponse.RESULTS_FIELD_NUMBER
BATCHES_FIELD = broker_pb2.FetchPartitionResult.RECORD_BATCHES_FIELD_NUMBER
SUBSCRIBE_BATCHES_FIELD = broker_pb2.SubscribeResponse.RECORD_BATCHES_FIELD_NUMBER
# Worker threads: each long-poll fetch and each subscribe stream holds one while it waits.
WORKERS_DEFAULT = 64
# RPCs in progress beyond which grpcio answers RESOURCE_EXHAUSTED rather than queueing.
CONCURRENT_RPCS_MAX = 256


# ---------------------------------------------------------------------------- Broker
class BrokerService:
    def __init__(
        self, broker: Broker, groups: GroupManager | None = None, guard: Guard | None = None
    ) -> None:
        self.broker = broker
        self.groups = groups
        self.guard = guard if guard is not None else open_guard(broker.now_ms)

    def _check_write(self, topics: Iterable[str]) -> None:
        """WRITE on each topic; CREATE too for one that produce would auto-create."""
        known = None
        for topic in set(topics):
            self.guard.check(Operation.WRITE, ResourceType.TOPIC, topic)
            if self.broker.config.auto_create_topics:
                known = known if known is not None else dict(self.broker.list_topics())
                if topic not in known:
                    self.guard.check_create_topic(topic)

    def _check_read(self, topics: Iterable[str]) -> None:
        for topic in set(topics):
            self.guard.check(Operation.READ, ResourceType.TOPIC, topic)

    def _produce(self, request: broker_pb2.ProduceRequest) -> list[ProduceResult]:
        """Append every entry; one result per appended (topic, partition), in request order.

        A malformed request, or (with several entries) an entry that fails validation,
        raises and appends nothing; failures of single appends (sequence, fencing) are
        per-entry results.
        """
        if not request.partitions:
            raise InvalidRequestError("produce request names no partitions")
        if len(request.partitions) > REQUEST_PARTITIONS_MAX:
            raise LimitExceededError(
                f"{len(request.partitions)} entries in one produce request; the limit is "
                f"{REQUEST_PARTITIONS_MAX}"
            )
        durable = request.acks == broker_pb2.ACKS_ALL
        # Each access to a protobuf bytes field copies it (34 us per MiB): read batches once.
        entries = [
            (e.topic, e.partition if e.HasField("partition") else None, e.record_batch, e)
            for e in request.partitions
        ]
        # Check every entry before appending any: a bad entry fails the call, nothing appended.
        for topic, partition, batch, entry in entries:
            if batch and entry.records:
                raise InvalidRequestError(
                    f"entry for topic {topic!r} sets both record_batch and records"
                )
            if batch and partition is None:
                raise InvalidRequestError(
                    "record_batch needs a partition: the broker does not read keys on the fast path"
                )
            if not batch and not entry.records:
                raise InvalidRequestError(f"entry for topic {topic!r} carries no records")
        self._check_write(topic for topic, _p, _b, _e in entries)
        checked: list[list[BatchHeader] | None] = [None] * len(entries)
        if len(entries) > 1:
            # One entry is validated by its append before anything is written; with several,
            # validate every one first (the contract: a bad entry appends nothing at all),
            # and hand each append its checked headers.
            checked = [self.broker.check_produce(t, p, b) for t, p, b, _e in entries]
        results: list[ProduceResult] = []
        for (topic, partition, batch, entry), headers in zip(entries, checked, strict=True):
            try:
                if batch:
                    assert partition is not None
                    result = self.broker.produce(
                        topic, partition, batch, durable=durable, headers=headers
                    )
                    results.append(ProduceResult(topic, partition, result))
                else:
                    now_ms = self.broker.now_ms()
                    records = [_new_record(r, now_ms) for r in entry.records]
                    results.extend(
                        self.broker.produce_records(topic, partition, records, durable=durable)
                    )
            except StorageError as e:
                results.append(ProduceResult(topic, partition or 0, error=e))
        return results

    @staticmethod
    def _answer(
        request: broker_pb2.ProduceRequest, results: list[ProduceResult]
    ) -> broker_pb2.ProduceResponse:
        no_offsets = request.acks == broker_pb2.ACKS_NONE
        return broker_pb2.ProduceResponse(
            correlation_id=request.correlation_id,
            results=[
                broker_pb2.PartitionProduceResult(
                    topic=r.topic,
                    partition=r.partition,
                    base_offset=-1 if r.result is None or no_offsets else r.result.base_offset,
                    last_offset=-1 if r.result is None or no_offsets else r.result.last_offset,
                    log_append_time_ms=0 if r.result is None else r.result.log_append_time_ms,
                    error=partition_error(r.error),
                    duplicate=r.result is not None and r.result.duplicate,
                )
                for r in results
            ],
        )

    @guarded
    def Produce(self, raw: bytes, context: grpc.ServicerContext) -> broker_pb2.ProduceResponse:
        request = parse(broker_pb2.ProduceRequest, raw, context)
        results = self._produce(request)
        errors = [r.error for r in results if r.error is not None]
        if results and len(errors) == len(results):
            raise errors[0]  # every entry failed: the call fails with the first one's status
        response = self._answer(request, results)
        response.throttle_time_ms = self.guard.throttle("produce", len(raw))
        return response

    @guarded_stream
    def ProduceStream(
        self, raws: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[broker_pb2.ProduceResponse]:
        for raw in raws:
            request = parse(broker_pb2.ProduceRequest, raw, context)
            try:
                response = self._answer(request, self._produce(request))
            except StorageError as e:
                # Refused whole: answer this request with its error; the stream stays open.
                response = broker_pb2.ProduceResponse(
                    correlation_id=request.correlation_id,
                    results=[
                        broker_pb2.PartitionProduceResult(
                            topic=entry.topic,
                            partition=entry.partition,
                            base_offset=-1,
                            last_offset=-1,
                            error=partition_error(e),
                        )
                        for entry in request.partitions
                    ]
                    or [broker_pb2.PartitionProduceResult(error=partition_error(e))],
                )
            response.throttle_time_ms = self.guard.throttle("produce", len(raw))
            if request.acks != broker_pb2.ACKS_NONE:
                yield response

    @guarded
    def InitProducer(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> broker_pb2.InitProducerResponse:
        request = parse(broker_pb2.InitProducerRequest, raw, context)
        if request.producer_name:  # a name can fence other producers
            self.guard.check_cluster(Operation.WRITE)
        producer_id, epoch = self.broker.init_producer(request.producer_name)
        return broker_pb2.InitProducerResponse(producer_id=producer_id, producer_epoch=epoch)

    @guarded
    def Fetch(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = parse(broker_pb2.FetchRequest, raw, context)
        if not request.partitions:
            raise InvalidRequestError("fetch request names no partitions")
        self._check_read(p.topic for p in request.partitions)
        heartbeat_now = False
        if request.HasField("member"):
            self.guard.check(Operation.READ, ResourceType.GROUP, request.member.group_id)
            if self.groups is None:
                raise InvalidRequestError("this server has no consumer groups")
            m = request.member
            self.groups.check_fetch(
                m.group_id,
                m.member_id,
                m.member_epoch,
                [TopicPartition(p.topic, p.partition) for p in request.partitions],
            )
        results = self.broker.fetch(
            [FetchQuery(p.topic, p.partition, p.offset, p.max_bytes) for p in request.partitions],
            max_wait_ms=request.max_wait_ms,
            min_bytes=request.min_bytes,
            max_bytes=request.max_bytes,
            is_active=context.is_active,
        )
        if self.groups is not None and request.HasField("member"):
            # Asked after the long-poll: a join during the wait is news for this answer.
            m = request.member
            heartbeat_now = self.groups.needs_heartbeat(m.group_id, m.member_id)
        errors = [r.error for r in results if r.error is not None]
        if len(errors) == len(results):
            raise errors[0]
        # A FetchResponse, encoded by hand around the batches: one copy of them in all.
        pieces: list[bytes | memoryview] = []
        for r in results:
            meta = broker_pb2.FetchPartitionResult(
                topic=r.topic,
                partition=r.partition,
                high_watermark=r.high_watermark,
                log_start_offset=r.log_start_offset,
                error=partition_error(r.error),
            )
            pieces += nest(FETCH_RESULTS_FIELD, encode_with_bytes(meta, BATCHES_FIELD, r.data))
        throttle = self.guard.throttle("fetch", sum(len(r.data) for r in results))
        if heartbeat_now or throttle:
            tail = broker_pb2.FetchResponse(heartbeat_now=heartbeat_now, throttle_time_ms=throttle)
            pieces.append(tail.SerializeToString())
        return b"".join(pieces)

    @guarded_stream
    def Subscribe(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        request = parse(broker_pb2.SubscribeRequest, raw, context)
        self._check_read([request.topic])
        start = _start_spec(request.start)
        stop = request.WhichOneof("stop")
        chunks = self.broker.subscribe(
            request.topic,
            list(request.partitions),
            start,
            stop_offset=request.stop_offset if stop == "stop_offset" else None,
            stop_at_end=stop == "stop_at_end" and request.stop_at_end,
            max_bytes=request.max_bytes,
            is_active=context.is_active,
        )
        for chunk in chunks:
            meta = broker_pb2.SubscribeResponse(
                topic=chunk.topic,
                partition=chunk.partition,
                next_offset=chunk.next_offset,
                high_watermark=chunk.high_watermark,
                log_start_offset=chunk.log_start_offset,
            )
            yield b"".join(encode_with_bytes(meta, SUBSCRIBE_BATCHES_FIELD, chunk.data))
            self.guard.throttle("fetch", len(chunk.data))  # holds the next chunk back

    @guarded
    def ListOffsets(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> broker_pb2.ListOffsetsResponse:
        request = parse(broker_pb2.ListOffsetsRequest, raw, context)
        for topic in {q.topic for q in request.queries}:
            self.guard.check(Operation.DESCRIBE, ResourceType.TOPIC, topic)
        queries: list[OffsetQuery] = []
        for q in request.queries:
            spec = q.WhichOneof("spec")
            if spec == "earliest":
                queries.append(OffsetQuery(q.topic, q.partition, "earliest"))
            elif spec == "latest":
                queries.append(OffsetQuery(q.topic, q.partition, "latest"))
            elif spec == "timestamp_ms":
                queries.append(OffsetQuery(q.topic, q.partition, "timestamp", q.timestamp_ms))
            else:
                raise InvalidRequestError(
                    f"query for {q.topic}/{q.partition} sets none of earliest, latest, timestamp_ms"
                )
        results = self.broker.list_offsets(queries)
        errors = [r.error for r in results if r.error is not None]
        if results and len(errors) == len(results):
            raise errors[0]
        out = broker_pb2.ListOffsetsResponse()
        for r in results:
            item = out.results.add(
                topic=r.topic,
                partition=r.partition,
                log_start_offset=r.log_start_offset,
                log_end_offset=r.log_end_offset,
            )
            if r.offset is not None:
                item.offset = r.offset
            if r.error is not None:
                item.error.code = status_for(r.error).value[0]
                item.error.message = str(r.error)
        return out


def _new_record(r: types_pb2.Record, now_ms: int) -> NewRecord:
    return NewRecord(
        r.key if r.HasField("key") else None,
        r.value if r.HasField("value") else None,
        r.timestamp_ms if r.HasField("timestamp_ms") else now_ms,
        [(h.key, h.value if h.HasField("value") else None) for h in r.headers],
    )


def _start_spec(start: broker_pb2.StartPosition) -> StartSpec:
    kind = start.WhichOneof("position")
    if kind == "earliest":
        return ("earliest", 0)
    if kind == "latest":
        return ("latest", 0)
    if kind == "offset":
        return ("offset", start.offset)
    if kind == "timestamp_ms":
        return ("timestamp", start.timestamp_ms)
    raise InvalidRequestError(
        "start is required: one of earliest, latest, offset, timestamp_ms (no silent default)"
    )


# ---------------------------------------------------------------------------- Admin
class AdminService:
    def __init__(self, broker: Broker, guard: Guard | None = None) -> None:
        self.broker = broker
        self.guard = guard if guard is not None else open_guard(broker.now_ms)

    @guarded
    def CreateTopic(self, raw: bytes, context: grpc.ServicerContext) -> admin_pb2.TopicDescription:
        request = parse(admin_pb2.CreateTopicRequest, raw, context)
        self.guard.check_create_topic(request.name)
        info = self.broker.create_topic(request.name, request.partitions, dict(request.config))
        return _describe(info)

    @guarded
    def DeleteTopic(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> admin_pb2.DeleteTopicResponse:
        request = parse(admin_pb2.DeleteTopicRequest, raw, context)
        self.guard.check(Operation.DELETE, ResourceType.TOPIC, request.name)
        self.broker.delete_topic(request.name)
        return admin_pb2.DeleteTopicResponse()

    @guarded
    def ListTopics(self, raw: bytes, context: grpc.ServicerContext) -> admin_pb2.ListTopicsResponse:
        parse(admin_pb2.ListTopicsRequest, raw, context)
        return admin_pb2.ListTopicsResponse(
            topics=[
                admin_pb2.ListTopicsResponse.Topic(name=name, partitions=count)
                for name, count in self.broker.list_topics()
                if self.guard.allowed(Operation.DESCRIBE, ResourceType.TOPIC, name)
            ]
        )

    @guarded
    def DescribeTopic(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> admin_pb2.TopicDescription:
        request = parse(admin_pb2.DescribeTopicRequest, raw, context)
        self.guard.check(Operation.DESCRIBE, ResourceType.TOPIC, request.name)
        return _describe(self.broker.describe_topic(request.name))

    @guarded
    def AddPartitions(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> admin_pb2.TopicDescription:
        request = parse(admin_pb2.AddPartitionsRequest, raw, context)
        self.guard.check(Operation.ALTER, ResourceType.TOPIC, request.name)
        return _describe(self.broker.add_partitions(request.name, request.partitions))


def _describe(info: Any) -> admin_pb2.TopicDescription:
    return admin_pb2.TopicDescription(
        name=info.name,
        topic_id=info.topic_id,
        config=info.config,
        partitions=[
            admin_pb2.PartitionDescription(
                partition=p.partition,
                log_start_offset=p.log_start_offset,
                log_end_offset=p.log_end_offset,
                size_bytes=p.size_bytes,
                segment_count=p.segment_count,
            )
            for p in info.partitions
        ],
    )


# ---------------------------------------------------------------------------- wiring
def build_server(
    broker: Broker,
    groups: GroupManager | None = None,
    share: ShareGroupManager | None = None,
    *,
    guard: Guard | None = None,
    workers: int = WORKERS_DEFAULT,
    concurrent_rpcs: int = CONCURRENT_RPCS_MAX,
) -> grpc.Server:
    """A grpc server with the Broker, Admin, Security, (given their managers) Groups and
    Share services, health and reflection (not started). Without a `guard` everyone may do
    everything; a guard that authenticates puts its interceptor in front of every call."""
    guard = guard if guard is not None else open_guard(broker.now_ms)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="riverlog-rpc"),
        maximum_concurrent_rpcs=concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
            ("grpc.so_reuseport", 0),
        ],
        interceptors=[guard.interceptor()] if guard.authenticating else None,
    )
    b = BrokerService(broker, groups, guard)
    server.add_generic_rpc_handlers(
        (
            method_handlers(
                BROKER_SERVICE,
                b,
                {
                    "Produce": ("unary", broker_pb2.ProduceResponse),
                    "ProduceStream": ("stream", broker_pb2.ProduceResponse),
                    "Fetch": ("unary", None),  # encoded by the handler
                    "Subscribe": ("server_stream", None),  # encoded by the handler
                    "ListOffsets": ("unary", broker_pb2.ListOffsetsResponse),
                    "InitProducer": ("unary", broker_pb2.InitProducerResponse),
                },
            ),
            method_handlers(
                ADMIN_SERVICE,
                AdminService(broker, guard),
                {
                    "CreateTopic": ("unary", admin_pb2.TopicDescription),
                    "DeleteTopic": ("unary", admin_pb2.DeleteTopicResponse),
                    "ListTopics": ("unary", admin_pb2.ListTopicsResponse),
                    "DescribeTopic": ("unary", admin_pb2.TopicDescription),
                    "AddPartitions": ("unary", admin_pb2.TopicDescription),
                },
            ),
        )
    )
    server.add_generic_rpc_handlers((security_handlers(guard),))
    services = [BROKER_SERVICE, ADMIN_SERVICE, SECURITY_SERVICE]
    if groups is not None:
        server.add_generic_rpc_handlers((groups_handlers(groups, guard),))
        services.append(GROUPS_SERVICE)
    if share is not None:
        server.add_generic_rpc_handlers((share_handlers(share, guard),))
        services.append(SHARE_SERVICE)
    health_servicer = health.HealthServicer()
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            *services,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server
