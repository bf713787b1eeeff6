"""The gRPC edge for riverlog.v1.Groups: protobuf in, GroupManager call, protobuf out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Literal

import grpc

from ._broker import InvalidRequestError
from ._groups import GroupInfo, GroupManager, ResetSpec
from ._pb import groups_pb2, types_pb2
from ._rpc import guarded, method_handlers, parse
from .groups._coordinator import Subscription, TopicPartition
from .security._acl import Operation, ResourceType
from .security._guard import Guard

GROUPS_SERVICE = "riverlog.v1.Groups"


def _partitions(items: Iterable[types_pb2.TopicPartitions]) -> list[TopicPartition]:
    return [TopicPartition(tp.topic, p) for tp in items for p in tp.partitions]


def _grouped(parts: Iterable[TopicPartition]) -> list[types_pb2.TopicPartitions]:
    by_topic: dict[str, list[int]] = {}
    for tp in sorted(parts):
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return [types_pb2.TopicPartitions(topic=t, partitions=ps) for t, ps in by_topic.items()]


def _subscription(sub: groups_pb2.Subscription) -> Subscription:
    return Subscription(frozenset(sub.topics), sub.pattern if sub.HasField("pattern") else None)


def _subscription_pb(sub: Subscription) -> groups_pb2.Subscription:
    out = groups_pb2.Subscription(topics=sorted(sub.topics))
    if sub.pattern is not None:
        out.pattern = sub.pattern
    return out


class GroupsService:
    def __init__(self, groups: GroupManager, guard: Guard) -> None:
        self.groups = groups
        self.guard = guard

    def _group(self, operation: Operation, group_id: str) -> None:
        self.guard.check(operation, ResourceType.GROUP, group_id)

    def _reader(self, principal: str) -> Callable[[str], bool]:
        authorizer = self.guard.authorizer

        def readable(topic: str) -> bool:
            return authorizer.authorize(principal, Operation.READ, ResourceType.TOPIC, topic)

        return readable

    def _read_topics(self, topics: Iterable[str]) -> None:
        for topic in set(topics):
            self.guard.check(Operation.READ, ResourceType.TOPIC, topic)

    @guarded
    def Heartbeat(self, raw: bytes, context: grpc.ServicerContext) -> groups_pb2.HeartbeatResponse:
        r = parse(groups_pb2.HeartbeatRequest, raw, context)
        self._group(Operation.READ, r.group_id)
        subscription = None
        if r.HasField("subscription"):
            self._read_topics(r.subscription.topics)
            subscription = _subscription(r.subscription)
            if subscription.pattern is not None and self.guard.authorizer.enabled:
                # A pattern matches only topics this principal may READ (as Kafka's).
                subscription = dataclasses.replace(
                    subscription, readable=self._reader(self.guard.principal())
                )
        result = self.groups.heartbeat(
            r.group_id,
            r.member_id,
            r.member_epoch,
            subscription=subscription,
            owned=_partitions(r.owned.topics) if r.HasField("owned") else None,
            instance_id=r.instance_id if r.HasField("instance_id") else None,
            session_timeout_ms=r.session_timeout_ms or 45_000,
            rebalance_timeout_ms=r.rebalance_timeout_ms or 60_000,
        )
        return groups_pb2.HeartbeatResponse(
            member_id=result.member_id,
            member_epoch=result.member_epoch,
            heartbeat_interval_ms=result.heartbeat_interval_ms,
            assignment=_grouped(result.assignment),
            pending=_grouped(result.pending),
        )

    @guarded
    def LeaveGroup(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> groups_pb2.LeaveGroupResponse:
        r = parse(groups_pb2.LeaveGroupRequest, raw, context)
        self._group(Operation.READ, r.group_id)
        self.groups.leave(r.group_id, r.member_id, r.member_epoch)
        return groups_pb2.LeaveGroupResponse()

    @guarded
    def CommitOffsets(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> groups_pb2.CommitOffsetsResponse:
        r = parse(groups_pb2.CommitOffsetsRequest, raw, context)
        m = r.member
        self._group(Operation.READ, m.group_id)
        self._read_topics(o.topic for o in r.offsets)
        self.groups.commit(
            m.group_id,
            m.member_id,
            m.member_epoch,
            [(o.topic, o.partition, o.offset, o.metadata) for o in r.offsets],
        )
        return groups_pb2.CommitOffsetsResponse()

    @guarded
    def FetchOffsets(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> groups_pb2.FetchOffsetsResponse:
        r = parse(groups_pb2.FetchOffsetsRequest, raw, context)
        self._group(Operation.DESCRIBE, r.group_id)
        wanted = _partitions(r.partitions) if r.partitions else None
        out = groups_pb2.FetchOffsetsResponse()
        for tp, committed in self.groups.fetch_offsets(r.group_id, wanted):
            item = out.offsets.add(topic=tp.topic, partition=tp.partition)
            if committed is not None:
                item.offset = committed.offset
                item.metadata = committed.metadata
                item.commit_time_ms = committed.commit_time_ms
        return out

    @guarded
    def ListGroups(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> groups_pb2.ListGroupsResponse:
        parse(groups_pb2.ListGroupsRequest, raw, context)
        return groups_pb2.ListGroupsResponse(
            groups=[
                groups_pb2.ListGroupsResponse.Group(group_id=g, state=state, members=n)
                for g, state, n in self.groups.list_groups()
                if self.guard.allowed(Operation.DESCRIBE, ResourceType.GROUP, g)
            ]
        )

    @guarded
    def DescribeGroup(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> groups_pb2.DescribeGroupResponse:
        r = parse(groups_pb2.DescribeGroupRequest, raw, context)
        self._group(Operation.DESCRIBE, r.group_id)
        return _describe(self.groups.describe(r.group_id))

    @guarded
    def DeleteGroup(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> groups_pb2.DeleteGroupResponse:
        r = parse(groups_pb2.DeleteGroupRequest, raw, context)
        self._group(Operation.DELETE, r.group_id)
        self.groups.delete_group(r.group_id)
        return groups_pb2.DeleteGroupResponse()

    @guarded
    def ResetOffsets(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> groups_pb2.ResetOffsetsResponse:
        r = parse(groups_pb2.ResetOffsetsRequest, raw, context)
        self._group(Operation.READ, r.group_id)
        self._read_topics([r.topic])
        spec = reset_spec(r)
        changes = self.groups.reset_offsets(
            r.group_id, r.topic, list(r.partitions), spec, dry_run=r.dry_run
        )
        out = groups_pb2.ResetOffsetsResponse(applied=not r.dry_run)
        for c in changes:
            item = out.changes.add(partition=c.partition, new_offset=c.new)
            if c.previous is not None:
                item.previous_offset = c.previous
        return out


_RESET_KINDS: dict[str, Literal["earliest", "latest", "timestamp", "offset", "shift"]] = {
    "earliest": "earliest",
    "latest": "latest",
    "timestamp_ms": "timestamp",
    "offset": "offset",
    "shift_by": "shift",
}


def reset_spec(request: Any) -> ResetSpec:
    """The target of a reset request's `to` oneof (groups' and share groups' requests name
    their fields alike; a share-group reset has no shift_by)."""
    field = request.WhichOneof("to")
    if field is None:
        names = [f.name for f in request.DESCRIPTOR.oneofs_by_name["to"].fields]
        raise InvalidRequestError(f"reset to one of {', '.join(names)}")
    value = getattr(request, field)
    return _RESET_KINDS[field], 0 if isinstance(value, bool) else value


def _describe(info: GroupInfo) -> groups_pb2.DescribeGroupResponse:
    out = groups_pb2.DescribeGroupResponse(
        group_id=info.group_id,
        state=info.state,
        group_epoch=info.group_epoch,
        total_lag=info.total_lag,
    )
    for m in info.members:
        member = out.members.add(
            member_id=m.member_id,
            member_epoch=m.member_epoch,
            subscription=_subscription_pb(m.subscription),
            assignment=_grouped(m.assignment),
            pending=_grouped(m.pending),
            last_heartbeat_ms=m.last_heartbeat_ms,
        )
        if m.instance_id is not None:
            member.instance_id = m.instance_id
    for p in info.partitions:
        item = out.partitions.add(
            topic=p.topic,
            partition=p.partition,
            log_start_offset=p.log_start_offset,
            log_end_offset=p.log_end_offset,
            lag=p.lag,
            member_id=p.member_id,
        )
        if p.committed is not None:
            item.committed_offset = p.committed.offset
    return out


def groups_handlers(groups: GroupManager, guard: Guard) -> grpc.GenericRpcHandler:
    kinds: dict[str, tuple[str, Any]] = {
        "Heartbeat": ("unary", groups_pb2.HeartbeatResponse),
        "LeaveGroup": ("unary", groups_pb2.LeaveGroupResponse),
        "CommitOffsets": ("unary", groups_pb2.CommitOffsetsResponse),
        "FetchOffsets": ("unary", groups_pb2.FetchOffsetsResponse),
        "ListGroups": ("unary", groups_pb2.ListGroupsResponse),
        "DescribeGroup": ("unary", groups_pb2.DescribeGroupResponse),
        "DeleteGroup": ("unary", groups_pb2.DeleteGroupResponse),
        "ResetOffsets": ("unary", groups_pb2.ResetOffsetsResponse),
    }
    return method_handlers(GROUPS_SERVICE, GroupsService(groups, guard), kinds)
