"""Topic, consumer-group and share-group administration: `AsyncAdmin` on grpc.aio, `Admin` its
sync facade.

Every method is one RPC of riverlog.v1.Admin, riverlog.v1.Groups, riverlog.v1.Share,
riverlog.v1.Security or Broker.ListOffsets: build the request, await it under the call's
deadline, turn the answer into the plain dataclasses below (never protobuf messages), and a
failed call into a `RiverlogError` subclass (`from_rpc_error`). `Admin` runs the same
coroutines on its own `EventLoopThread`.

Security calls (riverlog.v1.Security; what each needs is in proto/riverlog/v1/security.proto):
`whoami`, `list_acls` / `create_acls` / `delete_acls` with `AclEntry` (plain strings: the
resource type "topic", "group", "share-group" or "cluster"; the pattern type "literal" or
"prefixed"; the operation "read", "write", "create", "delete", "describe" or "alter"; the
permission "allow" or "deny"), and `list_quotas` / `set_quota` / `remove_quota` (bytes per
second; None is unlimited; the principal "" is the default quota).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from stream._pb import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    groups_pb2,
    groups_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
    share_pb2,
    share_pb2_grpc,
    types_pb2,
)

from ._base import (
    EventLoopThread,
    InvalidArgumentError,
    TlsOptions,
    TopicPartition,
    default_server,
    from_partition_error,
    from_rpc_error,
    open_channel,
)

# Deadline of one admin call. Creating or deleting a topic touches the disk (directories,
# fsync of the catalog); seconds at worst, so 30 s only ends calls to a broker that hangs.
CALL_TIMEOUT_S = 30.0

Request = TypeVar("Request", bound=Message)
Response = TypeVar("Response", bound=Message)
# Where ListOffsets looks: the log start, the log end, or (an int) the first record whose
# timestamp is at or after this many ms since the Unix epoch.
OffsetSpec = Literal["earliest", "latest"] | int


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class PartitionInfo:
    partition: int
    log_start_offset: int
    log_end_offset: int
    size_bytes: int
    segment_count: int


@dataclass(frozen=True)
class TopicInfo:
    name: str
    topic_id: str
    partitions: list[PartitionInfo]
    # The per-topic overrides given at creation.
    config: dict[str, str]


@dataclass(frozen=True)
class GroupListing:
    group_id: str
    # empty | reconciling | stable
    state: str
    members: int


@dataclass(frozen=True)
class MemberDescription:
    member_id: str
    instance_id: str | None
    member_epoch: int
    # The subscription: topic names, or a pattern matched against whole names.
    topics: list[str]
    pattern: str | None
    # Partitions the member works now, and those coming to it once their owner lets go.
    assignment: list[TopicPartition]
    pending: list[TopicPartition]
    last_heartbeat_ms: int


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    # None: the group has no commit for this partition.
    committed_offset: int | None
    log_start_offset: int
    log_end_offset: int
    # log_end_offset - committed offset (- log start offset without a commit).
    lag: int
    # The member working the partition; "" when nobody does.
    member_id: str


@dataclass(frozen=True)
class GroupDescription:
    group_id: str
    state: str
    group_epoch: int
    members: list[MemberDescription]
    partitions: list[PartitionLag]
    total_lag: int


@dataclass(frozen=True)
class OffsetChange:
    partition: int
    # None: the group had no commit for this partition.
    previous: int | None
    new: int


@dataclass(frozen=True)
class OffsetInfo:
    """One ListOffsets answer; `offset` is None when no record is at or after the timestamp."""

    offset: int | None
    log_start_offset: int
    log_end_offset: int


@dataclass(frozen=True)
class ShareGroupConfig:
    """A share group's settings (see proto/riverlog/v1/share.proto for ranges and defaults)."""

    # How long a member holds an acquired record.
    lock_ms: int
    # Deliveries before a record is archived.
    max_delivery_attempts: int
    # Where archived records are produced; "" for nowhere.
    dead_letter_topic: str
    # Where the group starts in each partition: "earliest" or "latest".
    start: str
    # Redelivery backoff: base and cap.
    retry_backoff_ms: int
    retry_backoff_max_ms: int


@dataclass(frozen=True)
class ShareGroupListing:
    group_id: str
    members: int


@dataclass(frozen=True)
class ShareMemberDescription:
    member_id: str
    topics: list[str]
    # Records the member holds now.
    acquired: int
    last_heartbeat_ms: int


@dataclass(frozen=True)
class SharePartitionState:
    """One share-partition: its window [start_offset, end_offset) and what is in it."""

    topic: str
    partition: int
    # Every record below it is acknowledged or archived.
    start_offset: int
    # The first offset not yet in the window.
    end_offset: int
    log_end_offset: int
    # Records in the window: available now, acquired, waiting (deliver-at or retry backoff),
    # acknowledged or archived but not yet passed by the start.
    available: int
    acquired: int
    delayed: int
    done: int
    # Records not yet acknowledged or archived: log_end_offset - start_offset - done.
    lag: int
    # Records archived since the share-partition was created (or reset).
    archived_total: int


@dataclass(frozen=True)
class ShareGroupDescription:
    group_id: str
    config: ShareGroupConfig
    members: list[ShareMemberDescription]
    partitions: list[SharePartitionState]
    total_lag: int


# ---------------------------------------------------------------------------- security
# The words of AclEntry's fields, and the proto enum values they stand for.
RESOURCE_TYPES: dict[str, security_pb2.ResourceType.ValueType] = {
    "topic": security_pb2.TOPIC,
    "group": security_pb2.GROUP,
    "share-group": security_pb2.SHARE_GROUP,
    "cluster": security_pb2.CLUSTER,
}
PATTERN_TYPES: dict[str, security_pb2.PatternType.ValueType] = {
    "literal": security_pb2.LITERAL,
    "prefixed": security_pb2.PREFIXED,
}
OPERATIONS: dict[str, security_pb2.Operation.ValueType] = {
    "read": security_pb2.READ,
    "write": security_pb2.WRITE,
    "create": security_pb2.CREATE,
    "delete": security_pb2.DELETE,
    "describe": security_pb2.DESCRIBE,
    "alter": security_pb2.ALTER,
}
PERMISSIONS: dict[str, security_pb2.Permission.ValueType] = {
    "allow": security_pb2.ALLOW,
    "deny": security_pb2.DENY,
}
_ACL_WORDS: dict[str, dict[str, Any]] = {
    "resource_type": RESOURCE_TYPES,
    "pattern_type": PATTERN_TYPES,
    "operation": OPERATIONS,
    "permission": PERMISSIONS,
}


@dataclass(frozen=True)
class WhoAmI:
    """Who the broker takes the caller to be."""

    principal: str
    super_user: bool
    # Whether the broker enforces ACLs.
    acls_enabled: bool


@dataclass(frozen=True, kw_only=True)
class AclEntry:
    """One ACL: `principal` ("*": everyone) is ALLOWed or DENYed `operation` on the resources
    of `resource_type` named `name` (pattern "literal": that name, "*" for all; "prefixed":
    every name starting with it). The cluster resource is named "cluster".

    Checked when sent (create_acls: InvalidArgumentError naming the field); an entry of the
    broker's answer with a value this client does not know reads "unknown(N)"."""

    principal: str
    resource_type: str
    pattern_type: str = "literal"
    name: str
    operation: str
    permission: str = "allow"

    def to_pb(self) -> security_pb2.Acl:
        for name in ("principal", "name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidArgumentError(f"AclEntry.{name} must be a non-empty str")
        for name, words in _ACL_WORDS.items():
            _acl_word(name, getattr(self, name), words)
        return security_pb2.Acl(
            principal=self.principal,
            resource_type=RESOURCE_TYPES[self.resource_type],
            pattern_type=PATTERN_TYPES[self.pattern_type],
            name=self.name,
            operation=OPERATIONS[self.operation],
            permission=PERMISSIONS[self.permission],
        )


@dataclass(frozen=True)
class Quota:
    """Bytes per second a principal may produce and fetch; None: unlimited."""

    produce_bytes_per_s: int | None = None
    fetch_bytes_per_s: int | None = None


@dataclass(frozen=True)
class QuotaListing:
    """The default quota (for principals without their own) and every principal's own."""

    default_quota: Quota
    quotas: dict[str, Quota] = field(default_factory=dict)


def _acl_word(name: str, value: object, words: Mapping[str, object]) -> None:
    if value not in words:
        raise InvalidArgumentError(
            f"{name} must be one of {', '.join(map(repr, words))}, got {value!r}"
        )


def acl_filter(
    *,
    principal: str | None = None,
    resource_type: str | None = None,
    pattern_type: str | None = None,
    name: str | None = None,
    operation: str | None = None,
    permission: str | None = None,
) -> security_pb2.AclFilter:
    """The AclFilter of the fields given (None matches anything)."""
    request = security_pb2.AclFilter(principal=principal or "", name=name or "")
    for field_name, value in (
        ("resource_type", resource_type),
        ("pattern_type", pattern_type),
        ("operation", operation),
        ("permission", permission),
    ):
        if value is not None:
            words = _ACL_WORDS[field_name]
            _acl_word(field_name, value, words)
            setattr(request, field_name, words[value])
    return request


def _word_of(words: Mapping[str, int], value: int) -> str:
    for word, number in words.items():
        if number == value:
            return word
    return f"unknown({value})"


def _acl_entry(acl: security_pb2.Acl) -> AclEntry:
    return AclEntry(
        principal=acl.principal,
        resource_type=_word_of(RESOURCE_TYPES, acl.resource_type),
        pattern_type=_word_of(PATTERN_TYPES, acl.pattern_type),
        name=acl.name,
        operation=_word_of(OPERATIONS, acl.operation),
        permission=_word_of(PERMISSIONS, acl.permission),
    )


def _quota(q: security_pb2.Quota) -> Quota:
    return Quota(
        q.produce_bytes_per_s if q.HasField("produce_bytes_per_s") else None,
        q.fetch_bytes_per_s if q.HasField("fetch_bytes_per_s") else None,
    )


# ---------------------------------------------------------------------------- async core
class AsyncAdmin:
    """Administration on grpc.aio; create it on the event loop that will use it.

    `token`: a bearer token every call carries; `tls`: TLS (and mutual TLS) settings (see
    stream/client/_base.py, `open_channel`)."""

    def __init__(
        self,
        server: str | None = None,
        *,
        timeout_s: float = CALL_TIMEOUT_S,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        self.server = default_server(server)
        self._timeout_s = timeout_s
        self._channel = open_channel(self.server, token=token, tls=tls)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._groups = groups_pb2_grpc.GroupsStub(self._channel)
        self._broker = broker_pb2_grpc.BrokerStub(self._channel)
        self._share = share_pb2_grpc.ShareStub(self._channel)
        self._security = security_pb2_grpc.SecurityStub(self._channel)

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Request, Response], request: Request
    ) -> Response:
        try:
            return await method(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e

    # -------------------------------------------------------------------- topics
    async def create_topic(
        self, name: str, partitions: int = 1, config: Mapping[str, str] | None = None
    ) -> TopicInfo:
        request = admin_pb2.CreateTopicRequest(
            name=name, partitions=partitions, config=dict(config or {})
        )
        return _topic_info(await self._call(self._admin.CreateTopic, request))

    async def delete_topic(self, name: str) -> None:
        await self._call(self._admin.DeleteTopic, admin_pb2.DeleteTopicRequest(name=name))

    async def list_topics(self) -> list[tuple[str, int]]:
        """(name, partition count) of every topic."""
        answer = await self._call(self._admin.ListTopics, admin_pb2.ListTopicsRequest())
        return [(t.name, t.partitions) for t in answer.topics]

    async def describe_topic(self, name: str) -> TopicInfo:
        request = admin_pb2.DescribeTopicRequest(name=name)
        return _topic_info(await self._call(self._admin.DescribeTopic, request))

    async def add_partitions(self, name: str, total: int) -> TopicInfo:
        """Grow topic `name` to `total` partitions (never fewer)."""
        request = admin_pb2.AddPartitionsRequest(name=name, partitions=total)
        return _topic_info(await self._call(self._admin.AddPartitions, request))

    async def list_offsets(self, topic: str, partition: int, spec: OffsetSpec) -> OffsetInfo:
        """The offset at `spec`: "earliest", "latest", or an int timestamp in ms (the first
        record at or after it; `offset` None when there is none)."""
        query = broker_pb2.ListOffsetsRequest.Query(topic=topic, partition=partition)
        if spec == "earliest":
            query.earliest = True
        elif spec == "latest":
            query.latest = True
        elif isinstance(spec, int) and not isinstance(spec, bool):
            query.timestamp_ms = spec
        else:
            raise InvalidArgumentError(
                f"spec must be 'earliest', 'latest' or a timestamp in ms, got {spec!r}"
            )
        request = broker_pb2.ListOffsetsRequest(queries=[query])
        (result,) = (await self._call(self._broker.ListOffsets, request)).results
        if result.error.code != 0:
            raise from_partition_error(result.error.code, result.error.message)
        return OffsetInfo(
            result.offset if result.HasField("offset") else None,
            result.log_start_offset,
            result.log_end_offset,
        )

    # -------------------------------------------------------------------- groups
    async def list_groups(self) -> list[GroupListing]:
        answer = await self._call(self._groups.ListGroups, groups_pb2.ListGroupsRequest())
        return [GroupListing(g.group_id, g.state, g.members) for g in answer.groups]

    async def describe_group(self, group_id: str) -> GroupDescription:
        request = groups_pb2.DescribeGroupRequest(group_id=group_id)
        return _group_description(await self._call(self._groups.DescribeGroup, request))

    async def delete_group(self, group_id: str) -> None:
        """Forget the committed offsets of a group without members."""
        request = groups_pb2.DeleteGroupRequest(group_id=group_id)
        await self._call(self._groups.DeleteGroup, request)

    async def reset_offsets(
        self,
        group_id: str,
        topic: str,
        *,
        to_earliest: bool = False,
        to_latest: bool = False,
        to_timestamp_ms: int | None = None,
        to_offset: int | None = None,
        shift_by: int | None = None,
        partitions: Iterable[int] | None = None,
        dry_run: bool = False,
    ) -> list[OffsetChange]:
        """Move the committed offsets of a group without members to exactly one target, in
        `partitions` (None: all of the topic's). `dry_run` computes the changes only."""
        with _request_fields("reset_offsets"):
            request = groups_pb2.ResetOffsetsRequest(
                group_id=group_id, topic=topic, partitions=list(partitions or ()), dry_run=dry_run
            )
            _set_reset_target(
                request,
                "reset_offsets",
                {
                    "to_earliest": to_earliest,
                    "to_latest": to_latest,
                    "to_timestamp_ms": to_timestamp_ms,
                    "to_offset": to_offset,
                    "shift_by": shift_by,
                },
            )
        answer = await self._call(self._groups.ResetOffsets, request)
        return _offset_changes(answer)

    # -------------------------------------------------------------------- share groups
    async def list_share_groups(self) -> list[ShareGroupListing]:
        request = share_pb2.ListShareGroupsRequest()
        answer = await self._call(self._share.ListShareGroups, request)
        return [ShareGroupListing(g.group_id, g.members) for g in answer.groups]

    async def describe_share_group(self, group_id: str) -> ShareGroupDescription:
        request = share_pb2.DescribeShareGroupRequest(group_id=group_id)
        return _share_group_description(await self._call(self._share.DescribeShareGroup, request))

    async def alter_share_group(
        self,
        group_id: str,
        *,
        lock_ms: int | None = None,
        max_delivery_attempts: int | None = None,
        dead_letter_topic: str | None = None,
        start: str | None = None,
        retry_backoff_ms: int | None = None,
        retry_backoff_max_ms: int | None = None,
    ) -> ShareGroupConfig:
        """Change the settings given (None: keep; `dead_letter_topic=""` names none); the
        answer is every setting of the group after the change."""
        settings = {
            "lock_ms": lock_ms,
            "max_delivery_attempts": max_delivery_attempts,
            "dead_letter_topic": dead_letter_topic,
            "start": start,
            "retry_backoff_ms": retry_backoff_ms,
            "retry_backoff_max_ms": retry_backoff_max_ms,
        }
        with _request_fields("alter_share_group"):
            config = share_pb2.ShareGroupConfig()
            for name, value in settings.items():
                if value is not None:
                    setattr(config, name, value)
        request = share_pb2.AlterShareGroupRequest(group_id=group_id, config=config)
        return _share_group_config(await self._call(self._share.AlterShareGroup, request))

    async def reset_share_offsets(
        self,
        group_id: str,
        topic: str,
        *,
        to_earliest: bool = False,
        to_latest: bool = False,
        to_timestamp_ms: int | None = None,
        to_offset: int | None = None,
        partitions: Iterable[int] = (),
        dry_run: bool = False,
    ) -> list[OffsetChange]:
        """Move the start of a share group's share-partitions of `topic` to exactly one target
        (as `reset_offsets`, without `shift_by`), clearing their windows; in `partitions`
        (empty: all of the topic's), for a group without members. `dry_run` computes only."""
        with _request_fields("reset_share_offsets"):
            request = share_pb2.ResetShareGroupOffsetsRequest(
                group_id=group_id, topic=topic, partitions=list(partitions), dry_run=dry_run
            )
            _set_reset_target(
                request,
                "reset_share_offsets",
                {
                    "to_earliest": to_earliest,
                    "to_latest": to_latest,
                    "to_timestamp_ms": to_timestamp_ms,
                    "to_offset": to_offset,
                },
            )
        answer = await self._call(self._share.ResetShareGroupOffsets, request)
        return _offset_changes(answer)

    async def delete_share_group(self, group_id: str) -> None:
        """Forget a share group without members and its state."""
        request = share_pb2.DeleteShareGroupRequest(group_id=group_id)
        await self._call(self._share.DeleteShareGroup, request)

    # -------------------------------------------------------------------- security
    async def whoami(self) -> WhoAmI:
        """The principal the broker sees for this client, and what it may do."""
        answer = await self._call(self._security.WhoAmI, security_pb2.WhoAmIRequest())
        return WhoAmI(answer.principal, answer.super_user, answer.acls_enabled)

    async def list_acls(
        self,
        *,
        principal: str | None = None,
        resource_type: str | None = None,
        pattern_type: str | None = None,
        name: str | None = None,
        operation: str | None = None,
        permission: str | None = None,
    ) -> list[AclEntry]:
        """The ACLs matching every field given (none given: all of them)."""
        request = acl_filter(
            principal=principal,
            resource_type=resource_type,
            pattern_type=pattern_type,
            name=name,
            operation=operation,
            permission=permission,
        )
        answer = await self._call(self._security.ListAcls, request)
        return [_acl_entry(acl) for acl in answer.acls]

    async def create_acls(self, entries: Iterable[AclEntry]) -> int:
        """Add `entries` (durable on return); how many were new (present ones are kept once)."""
        acls = []
        for entry in entries:
            if not isinstance(entry, AclEntry):
                raise InvalidArgumentError(f"create_acls takes AclEntry, got {entry!r}")
            with _request_fields("create_acls"):
                acls.append(entry.to_pb())
        request = security_pb2.CreateAclsRequest(acls=acls)
        return (await self._call(self._security.CreateAcls, request)).created

    async def delete_acls(
        self,
        *,
        principal: str | None = None,
        resource_type: str | None = None,
        pattern_type: str | None = None,
        name: str | None = None,
        operation: str | None = None,
        permission: str | None = None,
        everything: bool = False,
    ) -> list[AclEntry]:
        """Remove every ACL matching all the fields given (durable on return); the ACLs
        removed. Without any field it refuses, unless `everything=True` (every ACL goes)."""
        given = [principal, resource_type, pattern_type, name, operation, permission]
        if all(value is None for value in given) and not everything:
            raise InvalidArgumentError(
                "delete_acls without a filter would remove every ACL: give at least one "
                "field, or everything=True"
            )
        request = acl_filter(
            principal=principal,
            resource_type=resource_type,
            pattern_type=pattern_type,
            name=name,
            operation=operation,
            permission=permission,
        )
        answer = await self._call(self._security.DeleteAcls, request)
        return [_acl_entry(acl) for acl in answer.deleted]

    async def list_quotas(self) -> QuotaListing:
        answer = await self._call(self._security.ListQuotas, security_pb2.ListQuotasRequest())
        return QuotaListing(
            _quota(answer.default_quota),
            {principal: _quota(q) for principal, q in sorted(answer.quotas.items())},
        )

    async def set_quota(
        self,
        principal: str,
        *,
        produce_bytes_per_s: int | None = None,
        fetch_bytes_per_s: int | None = None,
    ) -> None:
        """Set `principal`'s quota ("": the default quota) in bytes per second; None is
        unlimited (so a principal's own quota without limits exempts it from the default)."""
        with _request_fields("set_quota"):
            quota = security_pb2.Quota()
            if produce_bytes_per_s is not None:
                quota.produce_bytes_per_s = produce_bytes_per_s
            if fetch_bytes_per_s is not None:
                quota.fetch_bytes_per_s = fetch_bytes_per_s
            request = security_pb2.SetQuotaRequest(principal=principal, quota=quota)
        await self._call(self._security.SetQuota, request)

    async def remove_quota(self, principal: str) -> None:
        """Remove `principal`'s own quota: the default one applies to it again ("": remove the
        default quota)."""
        with _request_fields("remove_quota"):
            request = security_pb2.SetQuotaRequest(principal=principal, remove=True)
        await self._call(self._security.SetQuota, request)

    # -------------------------------------------------------------------- lifetime
    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# The request field (of the `to` oneof) each reset target keyword sets; Groups.ResetOffsets and
# Share.ResetShareGroupOffsets name them alike.
_RESET_FIELDS = {
    "to_earliest": "earliest",
    "to_latest": "latest",
    "to_timestamp_ms": "timestamp_ms",
    "to_offset": "offset",
    "shift_by": "shift_by",
}


def _set_reset_target(
    request: Message, method: str, targets: Mapping[str, bool | int | None]
) -> None:
    """Set on `request` the one target of `targets` given (False and None: not given)."""
    given = [
        (name, value) for name, value in targets.items() if value is not None and value is not False
    ]
    if len(given) != 1:
        raise InvalidArgumentError(
            f"{method} needs exactly one of {', '.join(targets)}; "
            f"got {len(given)}: {', '.join(name for name, _ in given) or 'none'}"
        )
    ((name, value),) = given
    setattr(request, _RESET_FIELDS[name], value)


@contextmanager
def _request_fields(method: str) -> Iterator[None]:
    """Protobuf's refusal of a field value (an int beyond int32, a str for an int) as ours."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise InvalidArgumentError(f"{method}: {e}") from None


def _offset_changes(
    answer: groups_pb2.ResetOffsetsResponse | share_pb2.ResetShareGroupOffsetsResponse,
) -> list[OffsetChange]:
    return [
        OffsetChange(
            c.partition,
            c.previous_offset if c.HasField("previous_offset") else None,
            c.new_offset,
        )
        for c in answer.changes
    ]


def _topic_info(d: admin_pb2.TopicDescription) -> TopicInfo:
    return TopicInfo(
        d.name,
        d.topic_id,
        [
            PartitionInfo(
                p.partition, p.log_start_offset, p.log_end_offset, p.size_bytes, p.segment_count
            )
            for p in d.partitions
        ],
        dict(d.config),
    )


def _partitions(items: Iterable[types_pb2.TopicPartitions]) -> list[TopicPartition]:
    return [TopicPartition(tp.topic, p) for tp in items for p in tp.partitions]


def _group_description(d: groups_pb2.DescribeGroupResponse) -> GroupDescription:
    return GroupDescription(
        d.group_id,
        d.state,
        d.group_epoch,
        [
            MemberDescription(
                m.member_id,
                m.instance_id if m.HasField("instance_id") else None,
                m.member_epoch,
                list(m.subscription.topics),
                m.subscription.pattern if m.subscription.HasField("pattern") else None,
                _partitions(m.assignment),
                _partitions(m.pending),
                m.last_heartbeat_ms,
            )
            for m in d.members
        ],
        [
            PartitionLag(
                p.topic,
                p.partition,
                p.committed_offset if p.HasField("committed_offset") else None,
                p.log_start_offset,
                p.log_end_offset,
                p.lag,
                p.member_id,
            )
            for p in d.partitions
        ],
        d.total_lag,
    )


def _share_group_config(c: share_pb2.ShareGroupConfig) -> ShareGroupConfig:
    return ShareGroupConfig(
        c.lock_ms,
        c.max_delivery_attempts,
        c.dead_letter_topic,
        c.start,
        c.retry_backoff_ms,
        c.retry_backoff_max_ms,
    )


def _share_group_description(d: share_pb2.DescribeShareGroupResponse) -> ShareGroupDescription:
    return ShareGroupDescription(
        d.group_id,
        _share_group_config(d.config),
        [
            ShareMemberDescription(m.member_id, list(m.topics), m.acquired, m.last_heartbeat_ms)
            for m in d.members
        ],
        [
            SharePartitionState(
                p.topic,
                p.partition,
                p.start_offset,
                p.end_offset,
                p.log_end_offset,
                p.available,
                p.acquired,
                p.delayed,
                p.done,
                p.lag,
                p.archived_total,
            )
            for p in d.partitions
        ],
        d.total_lag,
    )


# ---------------------------------------------------------------------------- sync facade
class Admin:
    """The blocking `AsyncAdmin`: each method runs the async one on this object's loop thread."""

    def __init__(
        self,
        server: str | None = None,
        *,
        timeout_s: float = CALL_TIMEOUT_S,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        self._thread = EventLoopThread("riverlog-admin")
        self._closed = False

        async def open_core() -> AsyncAdmin:
            return AsyncAdmin(server, timeout_s=timeout_s, token=token, tls=tls)

        try:
            self._core = self._thread.run(open_core())
        except BaseException:
            self._thread.close()
            raise
        self.server = self._core.server

    def create_topic(
        self, name: str, partitions: int = 1, config: Mapping[str, str] | None = None
    ) -> TopicInfo:
        return self._thread.run(self._core.create_topic(name, partitions, config))

    def delete_topic(self, name: str) -> None:
        self._thread.run(self._core.delete_topic(name))

    def list_topics(self) -> list[tuple[str, int]]:
        return self._thread.run(self._core.list_topics())

    def describe_topic(self, name: str) -> TopicInfo:
        return self._thread.run(self._core.describe_topic(name))

    def add_partitions(self, name: str, total: int) -> TopicInfo:
        return self._thread.run(self._core.add_partitions(name, total))

    def list_offsets(self, topic: str, partition: int, spec: OffsetSpec) -> OffsetInfo:
        return self._thread.run(self._core.list_offsets(topic, partition, spec))

    def list_groups(self) -> list[GroupListing]:
        return self._thread.run(self._core.list_groups())

    def describe_group(self, group_id: str) -> GroupDescription:
        return self._thread.run(self._core.describe_group(group_id))

    def delete_group(self, group_id: str) -> None:
        self._thread.run(self._core.delete_group(group_id))

    def reset_offsets(
        self,
        group_id: str,
        topic: str,
        *,
        to_earliest: bool = False,
        to_latest: bool = False,
        to_timestamp_ms: int | None = None,
        to_offset: int | None = None,
        shift_by: int | None = None,
        partitions: Iterable[int] | None = None,
        dry_run: bool = False,
    ) -> list[OffsetChange]:
        return self._thread.run(
            self._core.reset_offsets(
                group_id,
                topic,
                to_earliest=to_earliest,
                to_latest=to_latest,
                to_timestamp_ms=to_timestamp_ms,
                to_offset=to_offset,
                shift_by=shift_by,
                partitions=partitions,
                dry_run=dry_run,
            )
        )

    def list_share_groups(self) -> list[ShareGroupListing]:
        return self._thread.run(self._core.list_share_groups())

    def describe_share_group(self, group_id: str) -> ShareGroupDescription:
        return self._thread.run(self._core.describe_share_group(group_id))

    def alter_share_group(
        self,
        group_id: str,
        *,
        lock_ms: int | None = None,
        max_delivery_attempts: int | None = None,
        dead_letter_topic: str | None = None,
        start: str | None = None,
        retry_backoff_ms: int | None = None,
        retry_backoff_max_ms: int | None = None,
    ) -> ShareGroupConfig:
        return self._thread.run(
            self._core.alter_share_group(
                group_id,
                lock_ms=lock_ms,
                max_delivery_attempts=max_delivery_attempts,
                dead_letter_topic=dead_letter_topic,
                start=start,
                retry_backoff_ms=retry_backoff_ms,
                retry_backoff_max_ms=retry_backoff_max_ms,
            )
        )

    def reset_share_offsets(
        self,
        group_id: str,
        topic: str,
        *,
        to_earliest: bool = False,
        to_latest: bool = False,
        to_timestamp_ms: int | None = None,
        to_offset: int | None = None,
        partitions: Iterable[int] = (),
        dry_run: bool = False,
    ) -> list[OffsetChange]:
        return self._thread.run(
            self._core.reset_share_offsets(
                group_id,
                topic,
                to_earliest=to_earliest,
                to_latest=to_latest,
                to_timestamp_ms=to_timestamp_ms,
                to_offset=to_offset,
                partitions=partitions,
                dry_run=dry_run,
            )
        )

    def delete_share_group(self, group_id: str) -> None:
        self._thread.run(self._core.delete_share_group(group_id))

    def whoami(self) -> WhoAmI:
        return self._thread.run(self._core.whoami())

    def list_acls(
        self,
        *,
        principal: str | None = None,
        resource_type: str | None = None,
        pattern_type: str | None = None,
        name: str | None = None,
        operation: str | None = None,
        permission: str | None = None,
    ) -> list[AclEntry]:
        return self._thread.run(
            self._core.list_acls(
                principal=principal,
                resource_type=resource_type,
                pattern_type=pattern_type,
                name=name,
                operation=operation,
                permission=permission,
            )
        )

    def create_acls(self, entries: Iterable[AclEntry]) -> int:
        return self._thread.run(self._core.create_acls(list(entries)))

    def delete_acls(
        self,
        *,
        principal: str | None = None,
        resource_type: str | None = None,
        pattern_type: str | None = None,
        name: str | None = None,
        operation: str | None = None,
        permission: str | None = None,
        everything: bool = False,
    ) -> list[AclEntry]:
        return self._thread.run(
            self._core.delete_acls(
                principal=principal,
                resource_type=resource_type,
                pattern_type=pattern_type,
                name=name,
                operation=operation,
                permission=permission,
                everything=everything,
            )
        )

    def list_quotas(self) -> QuotaListing:
        return self._thread.run(self._core.list_quotas())

    def set_quota(
        self,
        principal: str,
        *,
        produce_bytes_per_s: int | None = None,
        fetch_bytes_per_s: int | None = None,
    ) -> None:
        self._thread.run(
            self._core.set_quota(
                principal,
                produce_bytes_per_s=produce_bytes_per_s,
                fetch_bytes_per_s=fetch_bytes_per_s,
            )
        )

    def remove_quota(self, principal: str) -> None:
        self._thread.run(self._core.remove_quota(principal))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._thread.run(self._core.close())
        finally:
            self._thread.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
