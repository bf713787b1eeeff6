"""Consumer groups in the broker: the coordinator, the offset store and the topics, together.

The coordinator (groups/_coordinator.py) decides membership and assignment and knows no
topics; the store (groups/_offsets.py) keeps committed offsets durably; this module checks
names against the broker's topics, serialises calls with one lock, and computes what admin
calls show (lag, resets). No grpc here either: the servicer only translates.

One lock covers the coordinator and each commit's fsync, so an ownership check and the
commit it allows cannot interleave with a hand-over. That serialises commits across the
broker at the disk's fsync rate (measured in the bench), which bounds commit throughput, not
record throughput: consumers commit every few hundred milliseconds, not per record.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from storage import InvalidConfigError, LimitExceededError

from ._broker import Broker, OffsetQuery, UnknownPartitionError
from .groups._coordinator import (
    GroupCoordinator,
    GroupNotEmptyError,
    HeartbeatResult,
    Subscription,
    TopicPartition,
    UnknownGroupError,
    check_group_id,
)
from .groups._offsets import CommittedOffset, OffsetStore

# Offsets in one commit request.
OFFSETS_PER_COMMIT_MAX = 10_000


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    committed: CommittedOffset | None
    log_start_offset: int
    log_end_offset: int
    lag: int
    member_id: str


@dataclass(frozen=True, slots=True)
class MemberInfo:
    member_id: str
    instance_id: str | None
    member_epoch: int
    subscription: Subscription
    assignment: frozenset[TopicPartition]
    pending: frozenset[TopicPartition]
    last_heartbeat_ms: int


@dataclass(frozen=True, slots=True)
class GroupInfo:
    group_id: str
    state: str
    group_epoch: int
    members: list[MemberInfo]
    partitions: list[PartitionLag]

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions)


ResetSpec = tuple[Literal["earliest", "latest", "timestamp", "offset", "shift"], int]


@dataclass(frozen=True, slots=True)
class OffsetChange:
    partition: int
    previous: int | None
    new: int


class GroupManager:
    def __init__(self, broker: Broker, store: OffsetStore, clock_ms: Callable[[], int]) -> None:
        self._broker = broker
        self._store = store
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self.coordinator = GroupCoordinator(self._partition_counts)
        broker.add_topic_listener(self._on_topic_change)

    def _partition_counts(self) -> dict[str, int]:
        return dict(self._broker.list_topics())

    def _on_topic_change(self, event: str, topic: str) -> None:
        with self._lock:
            if event == "deleted":
                self._store.delete_topic(topic, self._clock_ms())
            self.coordinator.topics_changed()

    # ------------------------------------------------------------------ members
    def heartbeat(
        self,
        group_id: str,
        member_id: str,
        member_epoch: int,
        *,
        subscription: Subscription | None,
        owned: Iterable[TopicPartition] | None,
        instance_id: str | None,
        session_timeout_ms: int,
        rebalance_timeout_ms: int,
    ) -> HeartbeatResult:
        with self._lock:
            return self.coordinator.heartbeat(
                group_id,
                member_id,
                member_epoch,
                self._clock_ms(),
                subscription=subscription,
                owned=owned,
                instance_id=instance_id,
                session_timeout_ms=session_timeout_ms,
                rebalance_timeout_ms=rebalance_timeout_ms,
            )

    def leave(self, group_id: str, member_id: str, member_epoch: int) -> None:
        with self._lock:
            self.coordinator.leave(group_id, member_id, member_epoch)

    def expire(self) -> list[tuple[str, str]]:
        with self._lock:
            return self.coordinator.expire(self._clock_ms())

    def check_fetch(
        self, group_id: str, member_id: str, member_epoch: int, partitions: Iterable[TopicPartition]
    ) -> None:
        """A group-scoped fetch: refused unless this member, at this epoch, owns them all."""
        with self._lock:
            self.coordinator.check_owner(group_id, member_id, member_epoch, partitions)

    def needs_heartbeat(self, group_id: str, member_id: str) -> bool:
        """Whether the member should heartbeat now (its assignment is about to change)."""
        with self._lock:
            return self.coordinator.needs_heartbeat(group_id, member_id)

    # ------------------------------------------------------------------ offsets
    def commit(
        self,
        group_id: str,
        member_id: str,
        member_epoch: int,
        offsets: Sequence[tuple[str, int, int, str]],
    ) -> None:
        """Store (topic, partition, next offset, metadata) durably for the group."""
        check_group_id(group_id)  # as for joining: no offsets for a group nobody can join
        if not offsets:
            raise InvalidConfigError("a commit names at least one partition")
        if len(offsets) > OFFSETS_PER_COMMIT_MAX:
            raise LimitExceededError(
                f"{len(offsets)} offsets in one commit; the limit is {OFFSETS_PER_COMMIT_MAX}"
            )
        tps = [TopicPartition(t, p) for t, p, _o, _m in offsets]
        for tp in tps:
            self._check_partition(tp)
        with self._lock:
            self.coordinator.check_owner(group_id, member_id, member_epoch, tps)
            self._store.commit(
                group_id, {(t, p): (o, m) for t, p, o, m in offsets}, self._clock_ms()
            )

    def fetch_offsets(
        self, group_id: str, partitions: Iterable[TopicPartition] | None
    ) -> list[tuple[TopicPartition, CommittedOffset | None]]:
        wanted = None if partitions is None else [TopicPartition(*tp) for tp in partitions]
        with self._lock:
            known = self._store.fetch(group_id, wanted)
            if wanted is None:
                if not known and not self.coordinator.has_members(group_id):
                    raise UnknownGroupError(f"unknown group {group_id!r}")
                return [(TopicPartition(*k), v) for k, v in sorted(known.items())]
            return [(tp, known.get((tp.topic, tp.partition))) for tp in wanted]

    def _check_partition(self, tp: TopicPartition) -> None:
        count = self._broker.partition_count(tp.topic)  # UnknownTopicError
        if not 0 <= tp.partition < count:
            raise UnknownPartitionError(tp.topic, tp.partition, count)

    # ------------------------------------------------------------------ admin
    def list_groups(self) -> list[tuple[str, str, int]]:
        """(group id, state, member count) of every group with members or offsets."""
        with self._lock:
            names = set(self._store.groups()) | set(self.coordinator.groups)
            out = []
            for name in sorted(names):
                group = self.coordinator.describe(name)
                state = "empty" if group is None else group.state
                out.append((name, state, 0 if group is None else len(group.members)))
            return out

    def describe(self, group_id: str) -> GroupInfo:
        with self._lock:
            group = self.coordinator.describe(group_id)
            committed = self._store.fetch(group_id, None)
            if group is None and not committed:
                raise UnknownGroupError(f"unknown group {group_id!r}")
            members: list[MemberInfo] = []
            owners: dict[TopicPartition, str] = {}
            topics: set[str] = {t for t, _p in committed}
            counts = self._partition_counts()
            if group is not None:
                for m in group.members.values():
                    target = group.target.get(m.member_id, frozenset())
                    members.append(
                        MemberInfo(
                            m.member_id,
                            m.instance_id,
                            m.epoch,
                            m.subscription,
                            m.assigned & target,
                            target - m.assigned,
                            m.last_heartbeat_ms,
                        )
                    )
                    for tp in m.assigned:
                        owners[tp] = m.member_id
                    topics |= m.subscription.resolve(counts)
            state = "empty" if group is None else group.state
            epoch = 0 if group is None else group.epoch
        lags: list[PartitionLag] = []
        for topic in sorted(t for t in topics if t in counts):
            queries = [OffsetQuery(topic, p, "latest") for p in range(counts[topic])]
            for r in self._broker.list_offsets(queries):
                if r.error is not None:
                    continue
                c = committed.get((topic, r.partition))
                base = c.offset if c is not None else r.log_start_offset
                lags.append(
                    PartitionLag(
                        topic,
                        r.partition,
                        c,
                        r.log_start_offset,
                        r.log_end_offset,
                        max(0, r.log_end_offset - base),
                        owners.get(TopicPartition(topic, r.partition), ""),
                    )
                )
        return GroupInfo(group_id, state, epoch, members, lags)

    def delete_group(self, group_id: str) -> None:
        with self._lock:
            if self.coordinator.has_members(group_id):
                raise GroupNotEmptyError(
                    f"group {group_id!r} has members; stop them (or wait for their sessions "
                    "to expire) first"
                )
            if group_id not in self._store.groups():
                raise UnknownGroupError(f"unknown group {group_id!r}")
            self._store.delete_group(group_id, self._clock_ms())

    def reset_offsets(
        self,
        group_id: str,
        topic: str,
        partitions: Sequence[int],
        to: ResetSpec,
        *,
        dry_run: bool,
    ) -> list[OffsetChange]:
        check_group_id(group_id)
        count = self._broker.partition_count(topic)
        chosen = list(partitions) or list(range(count))
        for p in chosen:
            if not 0 <= p < count:
                raise UnknownPartitionError(topic, p, count)
        kind, value = to
        with self._lock:
            if self.coordinator.has_members(group_id):
                raise GroupNotEmptyError(
                    f"group {group_id!r} has members: offsets can only be reset while it has none"
                )
            committed = self._store.fetch(group_id, [(topic, p) for p in chosen])
            spec: Literal["earliest", "latest", "timestamp"] = (
                "timestamp" if kind == "timestamp" else "earliest"
            )
            bounds = self._broker.list_offsets([OffsetQuery(topic, p, spec, value) for p in chosen])
            ends = self._broker.list_offsets([OffsetQuery(topic, p, "latest") for p in chosen])
            changes: list[OffsetChange] = []
            for p, b, e in zip(chosen, bounds, ends, strict=True):
                if b.error is not None:
                    raise b.error
                start, end = b.log_start_offset, e.log_end_offset
                previous = committed.get((topic, p))
                prev = None if previous is None else previous.offset
                if kind == "earliest":
                    new = start
                elif kind == "latest":
                    new = end
                elif kind == "timestamp":
                    new = end if b.offset is None else b.offset
                elif kind == "offset":
                    new = value
                else:
                    new = (start if prev is None else prev) + value
                changes.append(OffsetChange(p, prev, min(max(new, start), end)))
            if not dry_run:
                self._store.commit(
                    group_id,
                    {(topic, c.partition): (c.new, "") for c in changes},
                    self._clock_ms(),
                )
            return changes


__all__ = ["GroupInfo", "GroupManager", "MemberInfo", "OffsetChange", "PartitionLag"]
