"""The gRPC edge for riverlog.v1.Share: protobuf in, ShareGroupManager call, protobuf out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import grpc

from ._broker import InvalidRequestError
from ._group_service import reset_spec
from ._pb import share_pb2
from ._rpc import encode_with_bytes, guarded, method_handlers, nest, parse
from ._share import Ack, AckRefusal, ShareGroupInfo, ShareGroupManager, ShareSettings
from .security._acl import Operation, ResourceType
from .security._guard import Guard
from .share._window import AckType

SHARE_SERVICE = "riverlog.v1.Share"
PARTITIONS_FIELD = share_pb2.ShareFetchResponse.PARTITIONS_FIELD_NUMBER
BATCHES_FIELD = share_pb2.ShareFetchPartition.RECORD_BATCHES_FIELD_NUMBER
ConfigField = Literal[
    "lock_ms",
    "max_delivery_attempts",
    "dead_letter_topic",
    "start",
    "retry_backoff_ms",
    "retry_backoff_max_ms",
]
_CONFIG_FIELDS: tuple[ConfigField, ...] = (
    "lock_ms",
    "max_delivery_attempts",
    "dead_letter_topic",
    "start",
    "retry_backoff_ms",
    "retry_backoff_max_ms",
)


def _changes(config: share_pb2.ShareGroupConfig) -> dict[str, Any]:
    """The fields set in `config`, by name."""
    return {name: getattr(config, name) for name in _CONFIG_FIELDS if config.HasField(name)}


def config_pb(settings: ShareSettings) -> share_pb2.ShareGroupConfig:
    return share_pb2.ShareGroupConfig(
        lock_ms=settings.lock_ms,
        max_delivery_attempts=settings.max_delivery_attempts,
        dead_letter_topic=settings.dead_letter_topic,
        start=settings.start,
        retry_backoff_ms=settings.retry_backoff_ms,
        retry_backoff_max_ms=settings.retry_backoff_max_ms,
    )


def _acks(items: Iterable[share_pb2.Acknowledgement]) -> list[Ack]:
    out: list[Ack] = []
    for a in items:
        try:
            kind = AckType(a.type)
        except ValueError:
            raise InvalidRequestError(
                f"acknowledgement of {a.topic}-{a.partition}: type {a.type} is not ACCEPT (1), "
                "RELEASE (2) or REJECT (3)"
            ) from None
        out.append(Ack(a.topic, a.partition, a.first_offset, a.last_offset, kind, a.error))
    return out


def _refusals(refused: Iterable[AckRefusal]) -> list[share_pb2.AckRefusal]:
    return [
        share_pb2.AckRefusal(
            topic=r.topic,
            partition=r.partition,
            first_offset=r.first_offset,
            last_offset=r.last_offset,
            name=r.name,
            message=r.message,
        )
        for r in refused
    ]


class ShareService:
    def __init__(self, share: ShareGroupManager, guard: Guard) -> None:
        self.share = share
        self.guard = guard

    def _group(self, operation: Operation, group_id: str) -> None:
        self.guard.check(operation, ResourceType.SHARE_GROUP, group_id)

    def _dead_letter(self, changes: dict[str, Any]) -> None:
        """The broker writes dead letters for the group: the caller must be allowed to."""
        topic = changes.get("dead_letter_topic")
        if topic:
            self.guard.check(Operation.WRITE, ResourceType.TOPIC, topic)

    @guarded
    def ShareHeartbeat(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> share_pb2.ShareHeartbeatResponse:
        r = parse(share_pb2.ShareHeartbeatRequest, raw, context)
        self._group(Operation.READ, r.group_id)
        for topic in set(r.topics):
            self.guard.check(Operation.READ, ResourceType.TOPIC, topic)
        if r.HasField("config") and not r.member_id:
            self._dead_letter(_changes(r.config))
        member_id, interval, settings = self.share.heartbeat(
            r.group_id,
            r.member_id,
            list(r.topics) if r.topics else None,
            _changes(r.config) if r.HasField("config") else None,
            r.session_timeout_ms,
        )
        return share_pb2.ShareHeartbeatResponse(
            member_id=member_id, heartbeat_interval_ms=interval, config=config_pb(settings)
        )

    @guarded
    def ShareLeave(self, raw: bytes, context: grpc.ServicerContext) -> share_pb2.ShareLeaveResponse:
        r = parse(share_pb2.ShareLeaveRequest, raw, context)
        self._group(Operation.READ, r.group_id)
        self.share.leave(r.group_id, r.member_id)
        return share_pb2.ShareLeaveResponse()

    @guarded
    def ShareFetch(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        r = parse(share_pb2.ShareFetchRequest, raw, context)
        self._group(Operation.READ, r.group_id)
        result = self.share.fetch(
            r.group_id,
            r.member_id,
            _acks(r.acks),
            max_records=r.max_records,
            max_wait_ms=r.max_wait_ms,
            max_bytes=r.max_bytes,
            is_active=context.is_active,
        )
        # Encoded by hand around the batches, as Fetch: one copy of them in all.
        pieces: list[bytes | memoryview] = []
        for p in result.partitions:
            meta = share_pb2.ShareFetchPartition(
                topic=p.topic,
                partition=p.partition,
                acquired=[
                    share_pb2.AcquiredRange(
                        first_offset=a.first, last_offset=a.last, delivery_count=a.delivery_count
                    )
                    for a in p.acquired
                ],
            )
            pieces += nest(PARTITIONS_FIELD, encode_with_bytes(meta, BATCHES_FIELD, p.data))
        throttle = self.guard.throttle("fetch", sum(len(p.data) for p in result.partitions))
        tail = share_pb2.ShareFetchResponse(
            refused=_refusals(result.refused),
            lock_deadline_ms=result.lock_deadline_ms,
            throttle_time_ms=throttle,
        )
        pieces.append(tail.SerializeToString())
        return b"".join(pieces)

    @guarded
    def ShareAcknowledge(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> share_pb2.ShareAcknowledgeResponse:
        r = parse(share_pb2.ShareAcknowledgeRequest, raw, context)
        self._group(Operation.READ, r.group_id)
        refused = self.share.acknowledge(r.group_id, r.member_id, _acks(r.acks))
        return share_pb2.ShareAcknowledgeResponse(refused=_refusals(refused))

    @guarded
    def ListShareGroups(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> share_pb2.ListShareGroupsResponse:
        parse(share_pb2.ListShareGroupsRequest, raw, context)
        return share_pb2.ListShareGroupsResponse(
            groups=[
                share_pb2.ListShareGroupsResponse.Group(group_id=g, members=n)
                for g, n in self.share.list_groups()
                if self.guard.allowed(Operation.DESCRIBE, ResourceType.SHARE_GROUP, g)
            ]
        )

    @guarded
    def DescribeShareGroup(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> share_pb2.DescribeShareGroupResponse:
        r = parse(share_pb2.DescribeShareGroupRequest, raw, context)
        self._group(Operation.DESCRIBE, r.group_id)
        return _describe(self.share.describe(r.group_id))

    @guarded
    def AlterShareGroup(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> share_pb2.ShareGroupConfig:
        r = parse(share_pb2.AlterShareGroupRequest, raw, context)
        self._group(Operation.ALTER, r.group_id)
        changes = _changes(r.config)
        self._dead_letter(changes)
        return config_pb(self.share.alter(r.group_id, changes))

    @guarded
    def ResetShareGroupOffsets(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> share_pb2.ResetShareGroupOffsetsResponse:
        r = parse(share_pb2.ResetShareGroupOffsetsRequest, raw, context)
        self._group(Operation.READ, r.group_id)
        self.guard.check(Operation.READ, ResourceType.TOPIC, r.topic)
        spec = reset_spec(r)
        changes = self.share.reset_offsets(
            r.group_id, r.topic, list(r.partitions), spec, dry_run=r.dry_run
        )
        out = share_pb2.ResetShareGroupOffsetsResponse(applied=not r.dry_run)
        for c in changes:
            item = out.changes.add(partition=c.partition, new_offset=c.new)
            if c.previous is not None:
                item.previous_offset = c.previous
        return out

    @guarded
    def DeleteShareGroup(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> share_pb2.DeleteShareGroupResponse:
        r = parse(share_pb2.DeleteShareGroupRequest, raw, context)
        self._group(Operation.DELETE, r.group_id)
        self.share.delete_group(r.group_id)
        return share_pb2.DeleteShareGroupResponse()


def _describe(info: ShareGroupInfo) -> share_pb2.DescribeShareGroupResponse:
    out = share_pb2.DescribeShareGroupResponse(
        group_id=info.group_id, config=config_pb(info.settings), total_lag=info.total_lag
    )
    for m in info.members:
        out.members.add(
            member_id=m.member_id,
            topics=m.topics,
            acquired=m.acquired,
            last_heartbeat_ms=m.last_heartbeat_ms,
        )
    for p in info.partitions:
        out.partitions.add(
            topic=p.topic,
            partition=p.partition,
            start_offset=p.start_offset,
            end_offset=p.end_offset,
            log_end_offset=p.log_end_offset,
            available=p.counts.available,
            acquired=p.counts.acquired,
            delayed=p.counts.delayed,
            done=p.counts.done,
            lag=p.lag,
            archived_total=p.archived_total,
        )
    return out


def share_handlers(share: ShareGroupManager, guard: Guard) -> grpc.GenericRpcHandler:
    kinds: dict[str, tuple[str, Any]] = {
        "ShareHeartbeat": ("unary", share_pb2.ShareHeartbeatResponse),
        "ShareLeave": ("unary", share_pb2.ShareLeaveResponse),
        "ShareFetch": ("unary", None),  # encoded by the handler
        "ShareAcknowledge": ("unary", share_pb2.ShareAcknowledgeResponse),
        "ListShareGroups": ("unary", share_pb2.ListShareGroupsResponse),
        "DescribeShareGroup": ("unary", share_pb2.DescribeShareGroupResponse),
        "AlterShareGroup": ("unary", share_pb2.ShareGroupConfig),
        "ResetShareGroupOffsets": ("unary", share_pb2.ResetShareGroupOffsetsResponse),
        "DeleteShareGroup": ("unary", share_pb2.DeleteShareGroupResponse),
    }
    return method_handlers(SHARE_SERVICE, ShareService(share, guard), kinds)
