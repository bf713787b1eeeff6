"""The group coordinator against in-memory clients and a fake clock (no sockets, no sleeps).

`Client` plays the consumer side of one member, paired with the coordinator in memory (as
h11's ConnectionPair pairs two connections): it reports what it works, then works what the
answer assigns and drops what was taken away. After every call `Cluster.check` asserts the
safety properties: no partition in two members' assignments; a client works only what the
coordinator has it own, at the epoch the coordinator holds for it; a client the coordinator
no longer knows (a zombie) can commit nothing. A RuleBasedStateMachine drives joins,
heartbeats, crashes, leaves, static restarts, stalled handlers, subscription changes, new
partitions and time, and checks liveness: left alone for a few heartbeat rounds, the group
covers every subscribed partition exactly once, balanced, and is stable.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from storage import InvalidConfigError, LimitExceededError
from stream.groups import _coordinator
from stream.groups._coordinator import (
    HEARTBEAT_INTERVAL_MS_MAX,
    RECONCILE_HEARTBEAT_INTERVAL_MS,
    FencedMemberError,
    Group,
    GroupCoordinator,
    GroupNotEmptyError,
    HeartbeatResult,
    NotOwnedError,
    Subscription,
    TopicPartition,
    UnknownMemberError,
)

GROUP = "g"
SESSION_MS = 6_000
REBALANCE_MS = 10_000
# A round of heartbeats this far apart keeps every session and hand-over alive.
ROUND_MS = 100


def _tps(topic: str, count: int) -> frozenset[TopicPartition]:
    return frozenset(TopicPartition(topic, p) for p in range(count))


def _topics(*names: str) -> Subscription:
    return Subscription(topics=frozenset(names))


class Cluster:
    """The coordinator, the topics' partition counts and a fake clock, with the clients."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts
        ids = itertools.count()
        self.coordinator = GroupCoordinator(
            lambda: self.counts, new_member_id=lambda: f"member-{next(ids)}"
        )
        self.now_ms = 0
        self.clients: list[Client] = []

    def client(
        self,
        subscription: Subscription,
        *,
        instance_id: str | None = None,
        session_timeout_ms: int = SESSION_MS,
        rebalance_timeout_ms: int = REBALANCE_MS,
        group_id: str = GROUP,
    ) -> Client:
        client = Client(
            self, subscription, instance_id, session_timeout_ms, rebalance_timeout_ms, group_id
        )
        self.clients.append(client)
        return client

    def group(self, group_id: str = GROUP) -> Group | None:
        return self.coordinator.describe(group_id)

    def assigned(self, client: Client) -> frozenset[TopicPartition]:
        group = self.group(client.group_id)
        member = None if group is None else group.members.get(client.member_id)
        return frozenset() if member is None else member.assigned

    def target(self, client: Client) -> frozenset[TopicPartition]:
        group = self.group(client.group_id)
        return frozenset() if group is None else group.target.get(client.member_id, frozenset())

    def expire(self) -> list[tuple[str, str]]:
        gone = self.coordinator.expire(self.now_ms)
        self.check()
        return gone

    def round(self, step_ms: int = ROUND_MS) -> None:
        """Every client heartbeats once (one that is no longer a member rejoins next time)."""
        self.now_ms += step_ms
        for client in list(self.clients):
            with contextlib.suppress(UnknownMemberError):
                client.heartbeat()

    def check(self) -> None:
        """The safety properties, after every call."""
        for each in self.coordinator.groups.values():
            owners = Counter(tp for m in each.members.values() for tp in m.assigned)
            assert all(n == 1 for n in owners.values()), owners
            for instance_id, member_id in each.static.items():
                assert each.members[member_id].instance_id == instance_id
        working: dict[tuple[str, TopicPartition], Client] = {}
        for client in self.clients:
            group = self.group(client.group_id)
            member = None if group is None else group.members.get(client.member_id)
            if member is None:
                # A zombie (expired, or replaced by a restart): it cannot commit what it works.
                if client.owned:
                    with pytest.raises(UnknownMemberError):
                        self.coordinator.check_owner(
                            client.group_id, client.member_id, client.epoch, client.owned
                        )
                continue
            assert client.epoch == member.epoch
            assert client.owned <= member.assigned, (client.owned, member.assigned)
            self.coordinator.check_owner(
                client.group_id, client.member_id, client.epoch, client.owned
            )
            for tp in client.owned:
                key = (client.group_id, tp)
                assert key not in working, (tp, working[key].member_id, client.member_id)
                working[key] = client


@dataclass
class Client:
    """The consumer side of one member."""

    cluster: Cluster
    subscription: Subscription
    instance_id: str | None
    session_timeout_ms: int
    rebalance_timeout_ms: int
    group_id: str
    member_id: str = ""
    epoch: int = 0
    owned: frozenset[TopicPartition] = frozenset()
    # A client that keeps working revoked partitions (a stuck handler, a buggy client).
    stubborn: bool = False
    last: HeartbeatResult | None = None

    def heartbeat(self, subscription: Subscription | None = None) -> HeartbeatResult:
        """Report what it works; then work what the answer assigns, drop what it took away.
        UnknownMemberError: the client drops everything and rejoins at its next heartbeat."""
        joining = not self.member_id
        if subscription is not None:
            self.subscription = subscription
        try:
            result = self.cluster.coordinator.heartbeat(
                self.group_id,
                self.member_id,
                self.epoch,
                self.cluster.now_ms,
                subscription=self.subscription if joining or subscription is not None else None,
                owned=self.owned,
                instance_id=self.instance_id,
                session_timeout_ms=self.session_timeout_ms,
                rebalance_timeout_ms=self.rebalance_timeout_ms,
            )
        except UnknownMemberError:
            self.reset()
            self.cluster.check()
            raise
        self.member_id, self.epoch, self.last = result.member_id, result.member_epoch, result
        self.owned = (self.owned | result.assignment) if self.stubborn else result.assignment
        assert not result.assignment & result.pending
        assert result.pending == self.cluster.target(self) - self.cluster.assigned(self)
        expected_ms = min(HEARTBEAT_INTERVAL_MS_MAX, self.session_timeout_ms // 3)
        if self.cluster.assigned(self) != self.cluster.target(self):
            expected_ms = min(expected_ms, RECONCILE_HEARTBEAT_INTERVAL_MS)
        assert result.heartbeat_interval_ms == expected_ms
        self.cluster.check()
        return result

    def leave(self) -> None:
        try:
            self.cluster.coordinator.leave(self.group_id, self.member_id, self.epoch)
        finally:
            self.reset()
            self.cluster.check()

    def reset(self) -> None:
        """Out of the group: work nothing, rejoin as a new member."""
        self.member_id, self.epoch, self.owned, self.last = "", 0, frozenset(), None


def _until_stable(cluster: Cluster, rounds_max: int = 5) -> int:
    """Heartbeat rounds until the group is stable; how many it took."""
    for n in range(1, rounds_max + 1):
        cluster.round()
        group = cluster.group()
        if group is not None and group.state == "stable":
            return n
    raise AssertionError(f"not stable after {rounds_max} rounds")


# ---------------------------------------------------------------------------- membership


def test_sole_member_gets_every_partition() -> None:
    cluster = Cluster({"t": 4, "u": 2})
    a = cluster.client(_topics("t", "u"))
    result = a.heartbeat()
    assert result.member_id == "member-0"
    assert result.assignment == _tps("t", 4) | _tps("u", 2) == a.owned
    assert result.pending == frozenset()
    assert result.member_epoch > 0
    assert result.heartbeat_interval_ms == SESSION_MS // 3
    group = cluster.group()
    assert group is not None
    assert group.state == "stable"


def test_second_member_gets_its_share_by_incremental_hand_over() -> None:
    cluster = Cluster({"t": 4})
    a, b = cluster.client(_topics("t")), cluster.client(_topics("t"))
    a.heartbeat()
    epoch_before = a.epoch
    joined = b.heartbeat()
    # b's share is still a's: nothing yet, all of it pending, and a hurry to heartbeat.
    assert joined.assignment == frozenset()
    assert len(joined.pending) == 2
    assert joined.heartbeat_interval_ms == RECONCILE_HEARTBEAT_INTERVAL_MS
    moving = joined.pending
    # a is told to give them back; until it says it did, they stay a's alone.
    cluster.now_ms += ROUND_MS
    told = a.heartbeat()
    assert told.assignment == _tps("t", 4) - moving
    assert told.heartbeat_interval_ms == RECONCILE_HEARTBEAT_INTERVAL_MS
    assert a.epoch == epoch_before  # its assignment did not change yet
    assert cluster.assigned(a) == _tps("t", 4)
    assert b.heartbeat().assignment == frozenset()
    cluster.now_ms += ROUND_MS
    a.heartbeat()  # reports it no longer works them: released
    assert cluster.assigned(a) == _tps("t", 4) - moving
    assert a.epoch > epoch_before
    assert b.heartbeat().assignment == moving
    group = cluster.group()
    assert group is not None
    assert group.state == "stable"
    assert b.last is not None
    assert b.last.heartbeat_interval_ms == SESSION_MS // 3


@pytest.mark.parametrize("members", [2, 3, 5])
def test_hand_over_converges_within_a_few_rounds(members: int) -> None:
    cluster = Cluster({"t": 7, "u": 5})
    first = cluster.client(_topics("t", "u"))
    first.heartbeat()
    for _ in range(members - 1):
        cluster.client(_topics("t", "u")).heartbeat()
    assert _until_stable(cluster) <= 3
    loads = sorted(len(c.owned) for c in cluster.clients)
    assert loads[-1] - loads[0] <= 1
    assert sum(loads) == 12


def test_silent_member_is_removed_after_its_session_timeout() -> None:
    cluster = Cluster({"t": 4})
    a, b = cluster.client(_topics("t")), cluster.client(_topics("t"))
    a.heartbeat()
    b.heartbeat()
    _until_stable(cluster)
    silent_since = cluster.now_ms
    cluster.clients.remove(b)  # b's process dies: no more heartbeats
    while cluster.now_ms + 1_000 <= silent_since + SESSION_MS:
        cluster.now_ms += 1_000
        a.heartbeat()
    assert cluster.now_ms == silent_since + SESSION_MS
    assert cluster.expire() == []  # exactly the session timeout: not yet
    assert len(a.owned) == 2
    cluster.now_ms += 1
    assert cluster.expire() == [(GROUP, b.member_id)]
    a.heartbeat()
    assert a.owned == _tps("t", 4)
    with pytest.raises(UnknownMemberError):
        b.heartbeat()


def test_member_keeping_revoked_partitions_is_removed_after_rebalance_timeout() -> None:
    cluster = Cluster({"t": 4})
    a = cluster.client(_topics("t"), session_timeout_ms=30_000, rebalance_timeout_ms=5_000)
    b = cluster.client(_topics("t"))
    a.heartbeat()
    a.stubborn = True
    b.heartbeat()
    asked_at = cluster.now_ms = 1_000
    a.heartbeat()  # told to give two back; it keeps working them
    assert len(cluster.target(a)) == 2
    while cluster.now_ms < asked_at + 5_000:
        cluster.now_ms += 1_000
        a.heartbeat()  # its session stays alive, the hand-over does not move
        b.heartbeat()
        assert a.owned == _tps("t", 4) == cluster.assigned(a)
        assert b.owned == frozenset()
    cluster.now_ms += 1
    assert cluster.expire() == [(GROUP, a.member_id)]
    b.heartbeat()
    assert b.owned == _tps("t", 4)
    with pytest.raises(UnknownMemberError):  # a zombie until it hears so
        a.heartbeat()
    assert a.owned == frozenset()


def test_member_giving_back_under_churn_is_not_removed() -> None:
    """The rebalance timeout is for a member that gives nothing back. One that gives back
    what each answer asks, while joins keep shrinking its share, stays."""
    cluster = Cluster({"t": 12})
    a = cluster.client(_topics("t"), session_timeout_ms=30_000, rebalance_timeout_ms=2_000)
    a.heartbeat()
    cluster.client(_topics("t")).heartbeat()
    asked_ms = []
    for second in range(1, 6):
        cluster.now_ms = second * 1_000
        a.heartbeat()  # gives back what the last answer left out; is asked for more
        if cluster.assigned(a) - cluster.target(a):
            asked_ms.append(cluster.now_ms)
        cluster.now_ms += 500
        if second <= 3:
            cluster.client(_topics("t")).heartbeat()  # the target shrinks again
    # Something to give back from 1 s until its heartbeat at 4 s: longer than its rebalance
    # timeout, though it gave back all it was asked each time.
    assert asked_ms == [1_000, 2_000, 3_000]
    assert cluster.expire() == []
    assert _until_stable(cluster) <= 3
    assert len(a.owned) in {12 // 5, 12 // 5 + 1}


def test_leave_moves_partitions_at_once() -> None:
    cluster = Cluster({"t": 4})
    a, b = cluster.client(_topics("t")), cluster.client(_topics("t"))
    a.heartbeat()
    b.heartbeat()
    _until_stable(cluster)
    group = cluster.group()
    assert group is not None
    epoch = group.epoch
    b.leave()
    assert group.epoch == epoch + 1
    assert cluster.target(a) == _tps("t", 4)
    result = a.heartbeat()
    assert result.assignment == _tps("t", 4)
    assert result.pending == frozenset()
    a.leave()
    assert cluster.group() is None  # a group without members is forgotten


def test_stale_epoch_is_fenced() -> None:
    cluster = Cluster({"t": 2})
    a = cluster.client(_topics("t"))
    a.heartbeat()
    co = cluster.coordinator
    stale = co.groups[GROUP].members[a.member_id].previous_epoch - 1  # older than both kept
    with pytest.raises(FencedMemberError, match=f"its epoch is {a.epoch}"):
        co.heartbeat(GROUP, a.member_id, stale, 0, owned=a.owned)
    with pytest.raises(FencedMemberError):
        co.heartbeat(GROUP, a.member_id, a.epoch + 1, 0)
    with pytest.raises(FencedMemberError):
        co.leave(GROUP, a.member_id, a.epoch - 1)
    a.heartbeat()  # the right epoch still works, and nothing changed
    assert a.owned == _tps("t", 2)


def test_unknown_member() -> None:
    cluster = Cluster({"t": 2})
    cluster.client(_topics("t")).heartbeat()
    co = cluster.coordinator
    with pytest.raises(UnknownMemberError):
        co.heartbeat(GROUP, "nobody", 1, 0)
    with pytest.raises(UnknownMemberError):
        co.heartbeat("other", "nobody", 1, 0)
    with pytest.raises(UnknownMemberError):
        co.heartbeat(GROUP, "", 3, 0)  # no id, but not a join
    with pytest.raises(UnknownMemberError):
        co.leave(GROUP, "nobody")
    with pytest.raises(UnknownMemberError):
        co.leave("other", "nobody")


# ---------------------------------------------------------------------------- fencing


def test_check_owner() -> None:
    cluster = Cluster({"t": 4})
    a, b = cluster.client(_topics("t")), cluster.client(_topics("t"))
    a.heartbeat()
    b.heartbeat()
    _until_stable(cluster)
    co = cluster.coordinator
    mine, theirs = sorted(a.owned)[0], sorted(b.owned)[0]
    co.check_owner(GROUP, a.member_id, a.epoch, a.owned)
    co.check_owner(GROUP, a.member_id, a.epoch, [])
    with pytest.raises(FencedMemberError):
        co.check_owner(GROUP, a.member_id, a.epoch - 1, [mine])
    with pytest.raises(NotOwnedError, match=f"owner: {b.member_id}"):
        co.check_owner(GROUP, a.member_id, a.epoch, [mine, theirs])
    with pytest.raises(NotOwnedError, match="owner: none"):
        co.check_owner(GROUP, a.member_id, a.epoch, [TopicPartition("t", 9)])
    with pytest.raises(UnknownMemberError):
        co.check_owner(GROUP, "nobody", 1, [mine])
    with pytest.raises(GroupNotEmptyError):
        co.check_owner(GROUP, "", -1, [mine])


def test_check_owner_without_members() -> None:
    co = Cluster({"t": 2}).coordinator
    co.check_owner("idle", "", -1, [TopicPartition("t", 0)])  # tools commit by hand
    with pytest.raises(UnknownMemberError):
        co.check_owner("idle", "someone", 1, [TopicPartition("t", 0)])
    with pytest.raises(UnknownMemberError):
        co.check_owner("idle", "", 0, [TopicPartition("t", 0)])


def test_check_owner_during_hand_over() -> None:
    """The old owner may commit a revoked partition until it reports it released (its last
    commit before giving it up); the new owner may not until it gets it."""
    cluster = Cluster({"t": 2})
    a, b = cluster.client(_topics("t")), cluster.client(_topics("t"))
    a.heartbeat()
    (moving,) = b.heartbeat().pending
    a.heartbeat()
    assert moving not in a.owned
    co = cluster.coordinator
    old_epoch = a.epoch
    co.check_owner(GROUP, a.member_id, a.epoch, [moving])
    with pytest.raises(NotOwnedError):
        co.check_owner(GROUP, b.member_id, b.epoch, [moving])
    a.heartbeat()
    with pytest.raises(FencedMemberError):
        co.check_owner(GROUP, a.member_id, old_epoch, [moving])
    with pytest.raises(NotOwnedError):
        co.check_owner(GROUP, a.member_id, a.epoch, [moving])
    b.heartbeat()
    co.check_owner(GROUP, b.member_id, b.epoch, [moving])


# ---------------------------------------------------------------------------- static members


def _restart(cluster: Cluster, old: Client) -> Client:
    """The process of `old` restarts: a new client with the same instance id, owning nothing."""
    if old in cluster.clients:
        cluster.clients.remove(old)
    assert old.instance_id is not None
    return cluster.client(
        old.subscription,
        instance_id=old.instance_id,
        session_timeout_ms=old.session_timeout_ms,
        rebalance_timeout_ms=old.rebalance_timeout_ms,
    )


def test_static_member_restart_keeps_its_partitions_without_a_rebalance() -> None:
    cluster = Cluster({"t": 6})
    a = cluster.client(_topics("t"), instance_id="host-a")
    b = cluster.client(_topics("t"), instance_id="host-b")
    c = cluster.client(_topics("t"))
    for client in (a, b, c):
        client.heartbeat()
    _until_stable(cluster)
    group = cluster.group()
    assert group is not None
    epoch, before = group.epoch, {m.member_id: m.assigned for m in group.members.values()}
    cluster.now_ms += SESSION_MS - 1_000  # down for a while, back within its session
    a2 = _restart(cluster, a)
    result = a2.heartbeat()
    assert result.member_id != a.member_id
    assert result.assignment == before[a.member_id]
    assert result.pending == frozenset()
    assert group.epoch == epoch  # no rebalance
    assert a.member_id not in group.members
    assert group.static == {"host-a": a2.member_id, "host-b": b.member_id}
    for other in (b, c):
        assert group.members[other.member_id].assigned == before[other.member_id]
        assert cluster.target(other) == before[other.member_id]
    with pytest.raises(UnknownMemberError):  # the old incarnation is fenced
        cluster.coordinator.check_owner(GROUP, a.member_id, a.epoch, a.owned)
    with pytest.raises(UnknownMemberError):
        cluster.coordinator.heartbeat(GROUP, a.member_id, a.epoch, cluster.now_ms)
    _until_stable(cluster)
    assert group.epoch == epoch


def test_static_member_back_after_its_session_is_a_new_member() -> None:
    cluster = Cluster({"t": 4})
    a = cluster.client(_topics("t"), instance_id="host-a")
    b = cluster.client(_topics("t"))
    a.heartbeat()
    b.heartbeat()
    _until_stable(cluster)
    cluster.clients.remove(a)
    for _ in range(SESSION_MS // 1_000 + 1):
        cluster.round(1_000)
    assert b.owned == _tps("t", 4)
    group = cluster.group()
    assert group is not None
    assert group.static == {}
    a2 = _restart(cluster, a)
    assert a2.heartbeat().assignment == frozenset()  # b has to hand two over first
    assert _until_stable(cluster) <= 3
    assert len(a2.owned) == len(b.owned) == 2


def test_static_member_restart_with_another_subscription_rebalances() -> None:
    cluster = Cluster({"t": 2, "u": 2})
    a = cluster.client(_topics("t"), instance_id="host-a")
    a.heartbeat()
    group = cluster.group()
    assert group is not None
    epoch = group.epoch
    a2 = _restart(cluster, a)
    a2.subscription = _topics("u")
    assert a2.heartbeat().assignment == _tps("u", 2)
    assert group.epoch > epoch
    assert list(group.members) == [a2.member_id]


# ---------------------------------------------------------------------------- topics


def test_pattern_subscription_picks_up_topics() -> None:
    cluster = Cluster({"t1": 2, "t2": 1, "u": 3})
    a = cluster.client(Subscription(pattern="t.*"))
    assert a.heartbeat().assignment == _tps("t1", 2) | _tps("t2", 1)
    cluster.counts["t3"] = 2
    cluster.coordinator.topics_changed()
    assert a.heartbeat().assignment == _tps("t1", 2) | _tps("t2", 1) | _tps("t3", 2)
    b = cluster.client(_topics("u"))
    b.heartbeat()
    b.heartbeat(Subscription(pattern="u|t1"))  # from topics to a pattern
    assert _until_stable(cluster) <= 3
    assert b.owned | a.owned == _tps("t1", 2) | _tps("t2", 1) | _tps("t3", 2) | _tps("u", 3)
    assert {tp.topic for tp in b.owned} <= {"u", "t1"}


def test_subscription_change_moves_partitions() -> None:
    cluster = Cluster({"t": 2, "u": 2})
    a = cluster.client(_topics("t"))
    a.heartbeat()
    group = cluster.group()
    assert group is not None
    epoch = group.epoch
    a.heartbeat(_topics("t"))  # unchanged: no new target
    assert group.epoch == epoch
    result = a.heartbeat(_topics("u"))
    assert group.epoch == epoch + 1
    assert result.assignment == _tps("u", 2)  # u is free: taken at once; t is to go
    assert result.heartbeat_interval_ms == RECONCILE_HEARTBEAT_INTERVAL_MS
    assert cluster.assigned(a) == _tps("t", 2) | _tps("u", 2)
    a.heartbeat()
    assert cluster.assigned(a) == _tps("u", 2)
    assert group.state == "stable"


def test_new_partitions_are_assigned_at_the_next_heartbeats() -> None:
    cluster = Cluster({"t": 2})
    a, b = cluster.client(_topics("t")), cluster.client(_topics("t"))
    a.heartbeat()
    b.heartbeat()
    _until_stable(cluster)
    before = {c.member_id: c.owned for c in cluster.clients}
    cluster.counts["t"] = 6
    cluster.coordinator.topics_changed()
    assert _until_stable(cluster) <= 2
    assert a.owned | b.owned == _tps("t", 6)
    assert len(a.owned) == len(b.owned) == 3
    for client in (a, b):  # sticky: each keeps what it had
        assert before[client.member_id] <= client.owned


def test_unchanged_topics_move_nothing_with_mixed_subscriptions() -> None:
    cluster = Cluster({"c": 2, "d": 5})
    clients = [
        cluster.client(_topics("c", "d")),
        cluster.client(_topics("c")),
        cluster.client(_topics("d", "missing")),
        cluster.client(_topics("missing")),
    ]
    for client in clients:
        client.heartbeat()
    _until_stable(cluster)
    group = cluster.group()
    assert group is not None
    target = dict(group.target)
    cluster.coordinator.topics_changed()  # e.g. an unrelated topic was created
    assert group.target == target
    assert group.state == "stable"


# ---------------------------------------------------------------------------- limits and config


def test_members_per_group_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_coordinator, "MEMBERS_PER_GROUP_MAX", 2)
    cluster = Cluster({"t": 2})
    a = cluster.client(_topics("t"), instance_id="host-a")
    a.heartbeat()
    cluster.client(_topics("t")).heartbeat()
    with pytest.raises(LimitExceededError, match="the limit is 2"):
        cluster.client(_topics("t")).heartbeat()
    _restart(cluster, a).heartbeat()  # a static member's restart takes no new place
    cluster.clients[0].leave()
    cluster.client(_topics("t")).heartbeat()


def test_groups_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_coordinator, "GROUPS_MAX", 2)
    cluster = Cluster({"t": 2})
    a = cluster.client(_topics("t"), group_id="g1")
    a.heartbeat()
    cluster.client(_topics("t"), group_id="g2").heartbeat()
    cluster.client(_topics("t"), group_id="g2").heartbeat()  # a known group: fine
    with pytest.raises(LimitExceededError, match="the limit is 2"):
        cluster.client(_topics("t"), group_id="g3").heartbeat()
    a.leave()  # g1 has no members left: it no longer counts
    cluster.client(_topics("t"), group_id="g3").heartbeat()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"session_timeout_ms": 999}, "session_timeout_ms"),
        ({"session_timeout_ms": 300_001}, "session_timeout_ms"),
        ({"rebalance_timeout_ms": 0}, "rebalance_timeout_ms"),
        ({"rebalance_timeout_ms": 600_001}, "rebalance_timeout_ms"),
        ({"subscription": Subscription(pattern="t(")}, "bad pattern"),
        ({"subscription": Subscription(pattern="x" * 1_001)}, "the limit is 1000"),
        ({"subscription": Subscription()}, "at least one topic"),
        ({"subscription": Subscription(frozenset({"t"}), "t")}, "not both"),
        ({"subscription": None}, "needs a subscription"),
        ({"instance_id": ""}, "instance_id"),
        ({"instance_id": "i" * 250}, "instance_id"),
    ],
)
def test_invalid_join(kwargs: dict[str, object], message: str) -> None:
    co = Cluster({"t": 2}).coordinator
    args: dict[str, object] = {"subscription": _topics("t"), **kwargs}
    with pytest.raises(InvalidConfigError, match=message):
        co.heartbeat(GROUP, "", 0, 0, **args)  # type: ignore[arg-type]
    assert co.groups == {}  # nothing left behind


@pytest.mark.parametrize("group_id", ["", "a b", "x" * 250, "é"])
def test_invalid_group_id(group_id: str) -> None:
    co = Cluster({"t": 2}).coordinator
    with pytest.raises(InvalidConfigError, match="group id"):
        co.heartbeat(group_id, "", 0, 0, subscription=_topics("t"))


def test_invalid_subscription_change_keeps_the_old_one() -> None:
    cluster = Cluster({"t": 2})
    a = cluster.client(_topics("t"))
    a.heartbeat()
    for bad in (Subscription(pattern="("), Subscription()):
        with pytest.raises(InvalidConfigError):
            cluster.coordinator.heartbeat(GROUP, a.member_id, a.epoch, 0, subscription=bad)
    group = cluster.group()
    assert group is not None
    assert group.members[a.member_id].subscription == _topics("t")


@pytest.mark.parametrize(
    ("session_timeout_ms", "interval_ms"),
    [(1_000, 333), (6_000, 2_000), (15_000, 5_000), (45_000, 5_000), (300_000, 5_000)],
)
def test_heartbeat_interval(session_timeout_ms: int, interval_ms: int) -> None:
    cluster = Cluster({"t": 2})
    a = cluster.client(_topics("t"), session_timeout_ms=session_timeout_ms)
    assert a.heartbeat().heartbeat_interval_ms == interval_ms
    b = cluster.client(_topics("t"), session_timeout_ms=session_timeout_ms)
    assert b.heartbeat().heartbeat_interval_ms == RECONCILE_HEARTBEAT_INTERVAL_MS  # pending
    assert a.heartbeat().heartbeat_interval_ms == RECONCILE_HEARTBEAT_INTERVAL_MS  # revoking
    _until_stable(cluster)
    for client in (a, b):
        assert client.last is not None
        assert client.last.heartbeat_interval_ms == interval_ms


# ---------------------------------------------------------------------------- state machine

TOPICS = ("t0", "t1", "t2")
SUBSCRIPTIONS = st.one_of(
    st.sampled_from(TOPICS).map(_topics),
    st.frozensets(st.sampled_from(TOPICS), min_size=2, max_size=3).map(
        lambda topics: Subscription(topics=topics)
    ),
    st.sampled_from(["t.*", "t[01]", "t[12]", "t0|t2"]).map(
        lambda pattern: Subscription(pattern=pattern)
    ),
)
SESSION_TIMEOUTS_MS = st.sampled_from([3_000, 6_000, 10_000])
REBALANCE_TIMEOUTS_MS = st.sampled_from([2_000, 5_000, 60_000])
CLIENTS_MAX = 6
# Rounds of heartbeats, ROUND_MS apart, after which a group left alone must have settled.
SETTLE_ROUNDS = 6
# Heartbeat rounds while a crashed member's session runs out: shorter than any session.
KEEPALIVE_MS = 1_000


class CoordinatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cluster = Cluster({})
        self.instance_ids = itertools.count()

    @initialize(counts=st.lists(st.integers(0, 4), min_size=len(TOPICS), max_size=len(TOPICS)))
    def topics(self, counts: list[int]) -> None:
        self.cluster.counts.update((t, n) for t, n in zip(TOPICS, counts, strict=True) if n)

    def _pick(self, index: int) -> Client:
        return self.cluster.clients[index % len(self.cluster.clients)]

    @precondition(lambda self: len(self.cluster.clients) < CLIENTS_MAX)
    @rule(
        subscription=SUBSCRIPTIONS,
        static=st.booleans(),
        session_timeout_ms=SESSION_TIMEOUTS_MS,
        rebalance_timeout_ms=REBALANCE_TIMEOUTS_MS,
    )
    def join(
        self,
        subscription: Subscription,
        static: bool,
        session_timeout_ms: int,
        rebalance_timeout_ms: int,
    ) -> None:
        client = self.cluster.client(
            subscription,
            instance_id=f"host-{next(self.instance_ids)}" if static else None,
            session_timeout_ms=session_timeout_ms,
            rebalance_timeout_ms=rebalance_timeout_ms,
        )
        client.heartbeat()

    @precondition(lambda self: self.cluster.clients)
    @rule(index=st.integers(0, CLIENTS_MAX - 1))
    def heartbeat(self, index: int) -> None:
        # A zombie learns it is one (UnknownMemberError); it rejoins at its next heartbeat.
        with contextlib.suppress(UnknownMemberError):
            self._pick(index).heartbeat()

    @precondition(lambda self: self.cluster.clients)
    @rule(index=st.integers(0, CLIENTS_MAX - 1))
    def crash(self, index: int) -> None:
        """A process dies; the others heartbeat on until its session has expired."""
        crashed = self._pick(index)
        self.cluster.clients.remove(crashed)
        group = self.cluster.group()
        member = None if group is None else group.members.get(crashed.member_id)
        if member is not None:
            deadline_ms = member.last_heartbeat_ms + member.session_timeout_ms
            while self.cluster.now_ms <= deadline_ms:
                self.cluster.round(KEEPALIVE_MS)
            self.cluster.expire()
        group = self.cluster.group()
        assert group is None or crashed.member_id not in group.members

    @precondition(lambda self: self.cluster.clients)
    @rule(index=st.integers(0, CLIENTS_MAX - 1))
    def leave(self, index: int) -> None:
        client = self._pick(index)
        member_id = client.member_id
        try:
            client.leave()
        except UnknownMemberError:
            return
        group = self.cluster.group()
        assert group is None or member_id not in group.members

    @precondition(lambda self: any(c.instance_id for c in self.cluster.clients))
    @rule(index=st.integers(0, CLIENTS_MAX - 1))
    def restart_static(self, index: int) -> None:
        """A static member's process restarts: it rejoins with its instance id, owning
        nothing, and takes its predecessor's place without a rebalance."""
        statics = [c for c in self.cluster.clients if c.instance_id]
        old = statics[index % len(statics)]
        self.cluster.expire()  # so the join below changes nothing else
        group = self.cluster.group()
        before = None if group is None else group.members.get(old.member_id)
        others: dict[str, tuple[frozenset[TopicPartition], frozenset[TopicPartition]]] = {}
        epoch = 0
        if group is not None:
            epoch = group.epoch
            others = {
                m.member_id: (m.assigned, group.target.get(m.member_id, frozenset()))
                for m in group.members.values()
                if m is not before
            }
        new = _restart(self.cluster, old)
        result = new.heartbeat()
        group = self.cluster.group()
        assert group is not None
        assert old.member_id not in group.members
        assert group.static[new.instance_id or ""] == new.member_id
        if before is not None:
            old_target = group.target[new.member_id]
            assert before.assigned & old_target <= result.assignment <= old_target
            assert group.epoch == epoch
            for member_id, (assigned, target) in others.items():
                assert group.members[member_id].assigned == assigned
                assert group.target[member_id] == target

    @precondition(lambda self: self.cluster.clients)
    @rule(index=st.integers(0, CLIENTS_MAX - 1))
    def stall(self, index: int) -> None:
        """A client's handler hangs on its partitions: it heartbeats on but gives nothing back.
        Within its rebalance timeout (and a round) it has nothing left to give back, or it
        is out of the group and the others have what it kept."""
        stalled = self._pick(index)
        self.cluster.round()  # members silent too long hear so, and rejoin at the next
        self.cluster.round()
        stalled.stubborn = True
        deadline_ms = self.cluster.now_ms + stalled.rebalance_timeout_ms + 2 * KEEPALIVE_MS
        try:
            while self.cluster.now_ms <= deadline_ms:
                group = self.cluster.group()
                if group is not None and group.state == "stable":
                    break
                self.cluster.round(KEEPALIVE_MS)
                if not stalled.member_id:
                    break  # removed: it heard so at its heartbeat, and rejoins at the next
        finally:
            stalled.stubborn = False
        assert self.cluster.assigned(stalled) <= self.cluster.target(stalled)

    @precondition(lambda self: self.cluster.clients)
    @rule(index=st.integers(0, CLIENTS_MAX - 1), subscription=SUBSCRIPTIONS)
    def change_subscription(self, index: int, subscription: Subscription) -> None:
        with contextlib.suppress(UnknownMemberError):
            self._pick(index).heartbeat(subscription)

    @rule(topic=st.sampled_from(TOPICS), more=st.integers(1, 3))
    def add_partitions(self, topic: str, more: int) -> None:
        self.cluster.counts[topic] = self.cluster.counts.get(topic, 0) + more
        self.cluster.coordinator.topics_changed()
        self.cluster.check()

    @rule(ms=st.integers(0, 12_000), expire=st.booleans())
    def advance_clock(self, ms: int, expire: bool) -> None:
        self.cluster.now_ms += ms
        if expire:
            self.cluster.expire()

    @rule()
    def settle(self) -> None:
        """With nothing else happening, a few rounds of heartbeats settle the group."""
        cluster = self.cluster
        # Members silent too long are found out at the first heartbeat and rejoin next round.
        cluster.round()
        for _ in range(SETTLE_ROUNDS):
            cluster.round()
        group = cluster.group()
        if not cluster.clients:
            assert group is None or not group.members
            return
        assert group is not None
        assert set(group.members) == {c.member_id for c in cluster.clients}
        assert group.state == "stable"
        subscribed = {
            m.member_id: m.subscription.resolve(cluster.counts) for m in group.members.values()
        }
        topics = set().union(*subscribed.values())
        expected = set().union(*(_tps(t, cluster.counts.get(t, 0)) for t in topics))
        owners = Counter(tp for c in cluster.clients for tp in c.owned)
        assert set(owners) == expected
        assert all(n == 1 for n in owners.values())
        for client in cluster.clients:
            assert client.owned == cluster.assigned(client) == cluster.target(client)
            assert client.last is not None
            assert client.last.pending == frozenset()
        if len(set(subscribed.values())) == 1:
            loads = [len(c.owned) for c in cluster.clients]
            assert max(loads) - min(loads) <= 1, loads
        # Settled means settled: computing the target again moves nothing.
        target = dict(group.target)
        cluster.coordinator.topics_changed()
        assert group.target == target
        assert group.state == "stable"

    @invariant()
    def safe(self) -> None:
        self.cluster.check()

    def teardown(self) -> None:
        self.settle()


def test_coordinator_state_machine() -> None:
    run_state_machine_as_test(
        CoordinatorMachine,
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None),
    )


def test_a_lost_answer_does_not_strand_the_member() -> None:
    """A heartbeat answer that raised the epoch may be lost: the member's retry with the
    epoch before it is accepted (it claims no more than it was given), so it keeps its
    membership and partitions instead of waiting out its session as a new member."""
    counts = {"t": 4}
    coordinator = GroupCoordinator(lambda: counts)
    sub = Subscription(frozenset({"t"}))
    first = coordinator.heartbeat("g", "", 0, 0, subscription=sub)
    # A second member joins: the first is asked to give back half (its epoch moves on).
    coordinator.heartbeat("g", "", 0, 10, subscription=sub)
    answer = coordinator.heartbeat(
        "g", first.member_id, first.member_epoch, 20, owned=first.assignment
    )
    kept = answer.assignment
    # That answer is lost; the member retries with its old epoch, reporting what it kept.
    retry = coordinator.heartbeat("g", first.member_id, first.member_epoch, 30, owned=kept)
    assert retry.member_id == first.member_id
    assert retry.assignment == kept
    # Claiming more than it was given with the old epoch is still fenced.
    with pytest.raises(FencedMemberError):
        coordinator.heartbeat(
            "g",
            first.member_id,
            first.member_epoch,
            40,
            owned=[*kept, TopicPartition("t", 99)],
        )


def test_a_fenced_member_rejoins_under_its_own_id() -> None:
    """Epoch 0 with a known member id: the member holds nothing now (it was fenced); what it
    had is free again and it gets an assignment like a new member, keeping its id."""
    counts = {"t": 4}
    coordinator = GroupCoordinator(lambda: counts)
    sub = Subscription(frozenset({"t"}))
    a = coordinator.heartbeat("g", "", 0, 0, subscription=sub)
    b = coordinator.heartbeat("g", "", 0, 10, subscription=sub)
    a = coordinator.heartbeat("g", a.member_id, a.member_epoch, 20, owned=a.assignment)
    kept = a.assignment
    again = coordinator.heartbeat("g", a.member_id, 0, 30)
    assert again.member_id == a.member_id
    assert again.member_epoch not in (0, a.member_epoch)
    group = coordinator.groups["g"]
    owners = [tp for m in group.members.values() for tp in m.assigned]
    assert len(owners) == len(set(owners))  # never two owners
    assert again.assignment | again.pending == group.target[a.member_id]
    assert kept  # it held partitions before, and rejoining gave them up
    b = coordinator.heartbeat("g", b.member_id, b.member_epoch, 40, owned=b.assignment)
    assert again.assignment.isdisjoint(b.assignment)
