"""The group coordinator: membership, target assignment, incremental hand-over, fencing.

A state machine with no I/O and no clock of its own: every call takes `now_ms` and plain
values and returns plain values (the sans-I/O shape). The protocol has the shape of Kafka's
KIP-848 consumer groups:

- A member joins by heartbeating with member id "" and epoch 0; the coordinator answers with
  its member id, its member epoch and the partitions it may work now. It then heartbeats
  every `heartbeat_interval_ms`, reporting the partitions it currently works (`owned`).
- The coordinator computes the target assignment on the broker (see _assignor.py) whenever
  membership, subscriptions or partition counts change (the group epoch grows).
- Hand-over is incremental: a partition moving from A to B is first left out of A's answer;
  once A reports it no longer owns it (or A's session or rebalance timeout expires), it is
  given to B. Partitions that do not move keep flowing. No partition is ever in two
  members' assignments at once.
- Every change of a member's assignment gives it a new member epoch. Commits and
  group-scoped fetches must carry the member's current epoch and name partitions it owns;
  anything else is refused (FencedMemberError / NotOwnedError), so a member that lost its
  partitions cannot commit over the new owner.
- Liveness is heartbeats only: a member whose heartbeats stop for `session_timeout_ms` is
  removed; one asked to give partitions back that gives none back for `rebalance_timeout_ms`
  is removed too (giving any back restarts that deadline: a member whose share keeps
  shrinking as others join is slow to finish, not stuck). How long a member's handler takes
  is not the coordinator's business (the client enforces its own max poll interval by
  leaving the group).
- Static membership: a member with an `instance_id` that rejoins (a restarted process)
  takes the place of its previous incarnation, keeping its partitions, with no rebalance,
  as long as it comes back within the session timeout.

Group membership lives in memory only: after a broker restart members rejoin (their next
heartbeat is refused as UnknownMember) and get a fresh assignment. Committed offsets are
durable (see _offsets.py).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from storage import InvalidConfigError, LimitExceededError, StorageError

from .._pattern import PatternError, compile_pattern
from ._assignor import TopicPartition, assign

# Members in one group: each costs the assignor and every heartbeat some work.
MEMBERS_PER_GROUP_MAX = 1000
# Groups with live members on one broker.
GROUPS_MAX = 10_000
SESSION_TIMEOUT_MS_DEFAULT = 45_000
SESSION_TIMEOUT_MS_MIN = 1_000
SESSION_TIMEOUT_MS_MAX = 300_000
REBALANCE_TIMEOUT_MS_DEFAULT = 60_000
REBALANCE_TIMEOUT_MS_MAX = 600_000
# Heartbeat often enough that three can be missed before the session expires.
HEARTBEAT_FRACTION = 3
HEARTBEAT_INTERVAL_MS_MAX = 5_000
# While a member's assignment differs from its target (a hand-over in progress), it is asked
# to heartbeat this often. A member hears of a change at its next regular heartbeat (up to
# HEARTBEAT_INTERVAL_MS_MAX later, as in Kafka), then the hand-over takes a few of these:
# measured (bench/groups_bench.py) join p50 3.0 s / p99 4.9 s with 45 s sessions, 0.41 s /
# 0.51 s with 1 s sessions, of which ~150 ms is the hand-over itself.
RECONCILE_HEARTBEAT_INTERVAL_MS = 100
# A subscription names at most this many topics, or one pattern (PATTERN_CHARS_MAX, RE2).
SUBSCRIBED_TOPICS_MAX = 10_000
GROUP_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,249}")
INSTANCE_ID_CHARS_MAX = 249


class GroupError(StorageError):
    """Errors of the group protocol (a branch of the broker's error hierarchy)."""


class UnknownGroupError(GroupError):
    pass


class UnknownMemberError(GroupError):
    """The member id is not (or no longer) in the group: rejoin with member id "" and 0."""


class FencedMemberError(GroupError):
    """A stale member epoch: the member's assignment changed since; heartbeat and retry."""


class NotOwnedError(GroupError):
    """A commit or fetch for a partition the member does not own."""


class GroupNotEmptyError(GroupError):
    """An operation that needs a group without members (delete, reset offsets)."""


@dataclass(frozen=True, slots=True)
class Subscription:
    topics: frozenset[str] = frozenset()
    pattern: str | None = None
    # With ACLs: which topics the member's principal may READ. A pattern matches only those
    # (it must not reveal, or assign, a topic the member may not see). Not part of equality:
    # the same subscription from the same member is not a change.
    readable: Callable[[str], bool] | None = field(default=None, compare=False)

    def resolve(self, topics: Iterable[str]) -> frozenset[str]:
        if self.pattern is None:
            return self.topics
        compiled = compile_pattern(self.pattern)  # RE2: linear in each name, cached
        readable = self.readable
        return frozenset(
            t for t in topics if compiled.fullmatch(t) and (readable is None or readable(t))
        )


@dataclass(slots=True)
class Member:
    member_id: str
    instance_id: str | None
    subscription: Subscription
    session_timeout_ms: int
    rebalance_timeout_ms: int
    last_heartbeat_ms: int
    epoch: int = 0
    # The epoch before the last change, accepted once more on a heartbeat (lost answers).
    previous_epoch: int = -1
    # What the member may work now (its reconciled assignment); never shared.
    assigned: frozenset[TopicPartition] = frozenset()
    # Since when it has been asked to give partitions back without giving any (None: nothing
    # pending).
    revoking_since_ms: int | None = None


@dataclass(slots=True)
class Group:
    group_id: str
    epoch: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    target: dict[str, frozenset[TopicPartition]] = field(default_factory=dict)
    static: dict[str, str] = field(default_factory=dict)  # instance id -> member id
    epoch_counter: int = 0

    @property
    def state(self) -> str:
        if not self.members:
            return "empty"
        for m in self.members.values():
            if m.assigned != self.target.get(m.member_id, frozenset()):
                return "reconciling"
        return "stable"

    def owner_of(self, tp: TopicPartition) -> str | None:
        for m in self.members.values():
            if tp in m.assigned:
                return m.member_id
        return None


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    member_id: str
    member_epoch: int
    heartbeat_interval_ms: int
    # What the member should work now; anything it owns outside this, it must give back.
    assignment: frozenset[TopicPartition]
    # Partitions the target gives this member that another member still has to release.
    pending: frozenset[TopicPartition]


class GroupCoordinator:
    """All groups of one broker. Not thread-safe: the owner serialises calls (one lock)."""

    def __init__(
        self,
        partition_counts: Callable[[], Mapping[str, int]],
        new_member_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        # Topic -> partition count, asked whenever an assignment is computed.
        self._partition_counts = partition_counts
        self._new_member_id = new_member_id
        self.groups: dict[str, Group] = {}

    # ------------------------------------------------------------------ heartbeat
    def heartbeat(
        self,
        group_id: str,
        member_id: str,
        member_epoch: int,
        now_ms: int,
        *,
        subscription: Subscription | None = None,
        owned: Iterable[TopicPartition] | None = None,
        instance_id: str | None = None,
        session_timeout_ms: int = SESSION_TIMEOUT_MS_DEFAULT,
        rebalance_timeout_ms: int = REBALANCE_TIMEOUT_MS_DEFAULT,
    ) -> HeartbeatResult:
        """Join (member id "" and epoch 0), or keep a membership alive and reconcile it.

        `subscription` is required to join and may change later (None: unchanged). `owned`
        is what the member works right now (None: not reported, nothing is released).
        """
        check_group_id(group_id)
        existing = self.groups.get(group_id)
        if existing is not None:
            self._expire_group(existing, now_ms)
        if member_epoch == 0 and not member_id:
            member = self._join(
                group_id,
                subscription,
                instance_id,
                session_timeout_ms,
                rebalance_timeout_ms,
                now_ms,
            )
            group = self.groups[group_id]
        elif member_epoch == 0:
            # A member that was fenced rejoins under its own id, holding nothing (KIP-848):
            # what it had is free again, and it gets an assignment as if it had just joined.
            group = self._group(group_id)
            member = self._member(group, member_id)
            member.last_heartbeat_ms = now_ms
            member.assigned = frozenset()
            member.revoking_since_ms = None
            if subscription is not None and subscription != member.subscription:
                _check_subscription(subscription)
                member.subscription = subscription
            self._retarget(group)
            owned = None
        else:
            group = self._group(group_id)
            member = self._member(group, member_id)
            # The epoch before the last answer is accepted too, when the member claims no
            # more than it was given: that answer may have been lost on the way.
            lost_answer = (
                member_epoch == member.previous_epoch
                and owned is not None
                and frozenset(owned) <= member.assigned
            )
            if member_epoch != member.epoch and not lost_answer:
                raise FencedMemberError(
                    f"member {member_id} sent epoch {member_epoch}, its epoch is {member.epoch}"
                )
            member.last_heartbeat_ms = now_ms
            if subscription is not None and subscription != member.subscription:
                _check_subscription(subscription)
                member.subscription = subscription
                self._retarget(group)
        epoch_before = member.epoch
        if owned is not None:
            self._release(group, member, frozenset(owned))
        self._reconcile(group, member, now_ms)
        if member.epoch != epoch_before:
            member.previous_epoch = epoch_before
        target = group.target.get(member.member_id, frozenset())
        interval_ms = min(
            HEARTBEAT_INTERVAL_MS_MAX, member.session_timeout_ms // HEARTBEAT_FRACTION
        )
        if member.assigned != target:
            interval_ms = min(interval_ms, RECONCILE_HEARTBEAT_INTERVAL_MS)
        return HeartbeatResult(
            member.member_id,
            member.epoch,
            interval_ms,
            member.assigned & target,
            target - member.assigned,
        )

    def _join(
        self,
        group_id: str,
        subscription: Subscription | None,
        instance_id: str | None,
        session_timeout_ms: int,
        rebalance_timeout_ms: int,
        now_ms: int,
    ) -> Member:
        if subscription is None:
            raise InvalidConfigError("joining a group needs a subscription (topics or pattern)")
        _check_subscription(subscription)
        if not SESSION_TIMEOUT_MS_MIN <= session_timeout_ms <= SESSION_TIMEOUT_MS_MAX:
            raise InvalidConfigError(
                f"session_timeout_ms must be in [{SESSION_TIMEOUT_MS_MIN}, "
                f"{SESSION_TIMEOUT_MS_MAX}], got {session_timeout_ms}"
            )
        if not 0 < rebalance_timeout_ms <= REBALANCE_TIMEOUT_MS_MAX:
            raise InvalidConfigError(
                f"rebalance_timeout_ms must be in [1, {REBALANCE_TIMEOUT_MS_MAX}], "
                f"got {rebalance_timeout_ms}"
            )
        if instance_id is not None and not 0 < len(instance_id) <= INSTANCE_ID_CHARS_MAX:
            raise InvalidConfigError(f"instance_id must be 1..{INSTANCE_ID_CHARS_MAX} characters")
        group = self.groups.get(group_id)
        if group is None:
            if len(self.groups) >= GROUPS_MAX:
                raise LimitExceededError(
                    f"{len(self.groups)} groups have members; the limit is {GROUPS_MAX}"
                )
            group = self.groups[group_id] = Group(group_id)
        previous = group.members.get(group.static.get(instance_id, "")) if instance_id else None
        if previous is None and len(group.members) >= MEMBERS_PER_GROUP_MAX:
            raise LimitExceededError(
                f"group {group_id!r} has {len(group.members)} members; the limit is "
                f"{MEMBERS_PER_GROUP_MAX}"
            )
        member = Member(
            self._new_member_id(),
            instance_id,
            subscription,
            session_timeout_ms,
            rebalance_timeout_ms,
            now_ms,
        )
        if previous is not None and previous.subscription == subscription:
            # A static member's new incarnation: same partitions, no rebalance.
            del group.members[previous.member_id]
            member.assigned = previous.assigned
            member.revoking_since_ms = previous.revoking_since_ms
            group.members[member.member_id] = member
            group.target[member.member_id] = group.target.pop(previous.member_id, frozenset())
            member.epoch = self._next_epoch(group)
        else:
            if previous is not None:
                self._remove(group, previous.member_id)
            group.members[member.member_id] = member
            self._retarget(group)
        if instance_id is not None:
            group.static[instance_id] = member.member_id
        return member

    # ------------------------------------------------------------------ leave / expire
    def leave(self, group_id: str, member_id: str, member_epoch: int | None = None) -> None:
        """Leave the group now: the member's partitions go to the others at once."""
        group = self._group(group_id)
        member = self._member(group, member_id)
        if member_epoch is not None and member_epoch != member.epoch:
            raise FencedMemberError(
                f"member {member_id} sent epoch {member_epoch}, its epoch is {member.epoch}"
            )
        self._remove(group, member_id)
        self._retarget(group)
        if not group.members:
            # As after an expiry: a group without members is forgotten at once, so describe
            # and list show only its committed offsets (and nothing once those are deleted).
            del self.groups[group_id]

    def expire(self, now_ms: int) -> list[tuple[str, str]]:
        """Remove members whose session or revocation deadline passed; (group, member) each."""
        gone: list[tuple[str, str]] = []
        for group in list(self.groups.values()):
            gone.extend((group.group_id, m) for m in self._expire_group(group, now_ms))
        return gone

    def _expire_group(self, group: Group, now_ms: int) -> list[str]:
        gone: list[str] = []
        for member in list(group.members.values()):
            silent = now_ms - member.last_heartbeat_ms > member.session_timeout_ms
            stuck = (
                member.revoking_since_ms is not None
                and now_ms - member.revoking_since_ms > member.rebalance_timeout_ms
            )
            if silent or stuck:
                self._remove(group, member.member_id)
                gone.append(member.member_id)
        if gone:
            self._retarget(group)
        if not group.members:
            del self.groups[group.group_id]
        return gone

    def _remove(self, group: Group, member_id: str) -> None:
        member = group.members.pop(member_id)
        group.target.pop(member_id, None)
        if member.instance_id is not None and group.static.get(member.instance_id) == member_id:
            del group.static[member.instance_id]

    # ------------------------------------------------------------------ assignment
    def topics_changed(self) -> None:
        """Partition counts or topics changed: recompute every group's target (members pick
        up the change at their next heartbeat)."""
        for group in self.groups.values():
            self._retarget(group)

    def _retarget(self, group: Group) -> None:
        counts = self._partition_counts()
        subscriptions = {
            m.member_id: m.subscription.resolve(counts) for m in group.members.values()
        }
        current = {m.member_id: m.assigned for m in group.members.values()}
        group.target = assign(subscriptions, counts, current)
        group.epoch += 1

    def _release(self, group: Group, member: Member, owned: frozenset[TopicPartition]) -> None:
        """The member reported what it works: partitions it no longer owns are free."""
        released = member.assigned - owned
        if released:
            member.assigned = member.assigned - released
            member.epoch = self._next_epoch(group)
            # Progress: the rebalance deadline restarts for what it still has to give back.
            member.revoking_since_ms = None

    def _reconcile(self, group: Group, member: Member, now_ms: int) -> None:
        """Move the heartbeating member towards its target as far as hand-over order allows.

        Only a member's own heartbeat changes its assignment (and epoch), so the epoch a
        member holds is always the one its last answer carried.
        """
        target = group.target.get(member.member_id, frozenset())
        counts = self._partition_counts()
        # Partitions of topics that vanished (or shrank: never, but be safe) are dropped.
        vanished = frozenset(
            tp for tp in member.assigned if tp.partition >= counts.get(tp.topic, 0)
        )
        taken = {tp for m in group.members.values() if m is not member for tp in m.assigned}
        gaining = frozenset(tp for tp in target - member.assigned if tp not in taken)
        if vanished or gaining:
            member.assigned = (member.assigned - vanished) | gaining
            member.epoch = self._next_epoch(group)
        if member.assigned - target:
            if member.revoking_since_ms is None:
                member.revoking_since_ms = now_ms
        else:
            member.revoking_since_ms = None

    def _next_epoch(self, group: Group) -> int:
        group.epoch_counter += 1
        return group.epoch_counter

    # ------------------------------------------------------------------ fencing
    def check_owner(
        self,
        group_id: str,
        member_id: str,
        member_epoch: int,
        partitions: Iterable[TopicPartition],
    ) -> None:
        """Refuse a commit or group-scoped fetch that is not from the partitions' owner.

        A group without members accepts commits from member id "" with epoch -1 (tools and
        consumers that assign partitions by hand), as Kafka does.
        """
        group = self.groups.get(group_id)
        if group is None or not group.members:
            if member_id == "" and member_epoch == -1:
                return
            if group is None:
                raise UnknownMemberError(
                    f"group {group_id!r} has no member {member_id!r} (it has no members)"
                )
        assert group is not None
        if member_id == "" and member_epoch == -1:
            raise GroupNotEmptyError(
                f"group {group_id!r} has {len(group.members)} members: commit as one of them"
            )
        member = self._member(group, member_id)
        if member_epoch != member.epoch:
            raise FencedMemberError(
                f"member {member_id} sent epoch {member_epoch}, its epoch is {member.epoch}"
            )
        for tp in partitions:
            if tp not in member.assigned:
                raise NotOwnedError(
                    f"member {member_id} does not own {tp.topic}-{tp.partition} "
                    f"(owner: {group.owner_of(tp) or 'none'})"
                )

    def needs_heartbeat(self, group_id: str, member_id: str) -> bool:
        """Whether the member's assignment differs from its target: it should heartbeat now."""
        group = self.groups.get(group_id)
        member = None if group is None else group.members.get(member_id)
        if group is None or member is None:
            return False
        return member.assigned != group.target.get(member_id, frozenset())

    # ------------------------------------------------------------------ lookup
    def _group(self, group_id: str) -> Group:
        group = self.groups.get(group_id)
        if group is None:
            raise UnknownMemberError(f"group {group_id!r} has no members; join first")
        return group

    def _member(self, group: Group, member_id: str) -> Member:
        member = group.members.get(member_id)
        if member is None:
            raise UnknownMemberError(
                f"member {member_id!r} is not in group {group.group_id!r} (expired, left or "
                'fenced): rejoin with member id "" and epoch 0'
            )
        return member

    def describe(self, group_id: str) -> Group | None:
        return self.groups.get(group_id)

    def has_members(self, group_id: str) -> bool:
        group = self.groups.get(group_id)
        return group is not None and bool(group.members)


def check_group_id(group_id: str) -> None:
    if not GROUP_ID_PATTERN.fullmatch(group_id):
        raise InvalidConfigError(f"group id {group_id[:60]!r} must match [A-Za-z0-9._-]{{1,249}}")


def _check_subscription(subscription: Subscription) -> None:
    if subscription.pattern is not None:
        if subscription.topics:
            raise InvalidConfigError("subscribe to topics or to a pattern, not both")
        try:
            compile_pattern(subscription.pattern)
        except PatternError as e:
            raise InvalidConfigError(str(e)) from None
    elif not subscription.topics:
        raise InvalidConfigError("a subscription names at least one topic or a pattern")
    if len(subscription.topics) > SUBSCRIBED_TOPICS_MAX:
        raise InvalidConfigError(
            f"{len(subscription.topics)} subscribed topics; the limit is {SUBSCRIBED_TOPICS_MAX}"
        )


__all__ = [
    "FencedMemberError",
    "GroupCoordinator",
    "GroupError",
    "GroupNotEmptyError",
    "HeartbeatResult",
    "NotOwnedError",
    "Subscription",
    "TopicPartition",
    "UnknownGroupError",
    "UnknownMemberError",
    "check_group_id",
]
