"""Server-side partition assignment: balanced and sticky.

`assign` is a pure function of the members' subscriptions, the partition counts and the
current ownership. With identical subscriptions every member ends with floor(n/m) or
ceil(n/m) of the n partitions (balanced within one), and a partition moves only when that
balance requires it (sticky): a member joining takes partitions only from members over the
new quota, a member leaving hands its own partitions to the least loaded. With different
subscriptions a partition only goes to a member subscribed to its topic, and members are
evened out as far as their subscriptions allow. Either way `assign` returns its own answer
unchanged when given it as the current ownership: recomputing moves nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import NamedTuple


class TopicPartition(NamedTuple):
    topic: str
    partition: int


# Bound on the evening-out shifts for mixed subscriptions (each hands one partition along a
# chain of members; the chain's ends change load by one).
_BALANCE_MOVES_MAX = 100_000


def assign(
    subscriptions: Mapping[str, frozenset[str]],
    partition_counts: Mapping[str, int],
    current: Mapping[str, frozenset[TopicPartition]],
) -> dict[str, frozenset[TopicPartition]]:
    """The target assignment: member id -> partitions.

    `subscriptions`: member id -> topic names (already resolved from patterns; topics that
    do not exist are ignored). `current`: what members own now (their reconciled
    assignment); used for stickiness only.
    """
    members = sorted(subscriptions)
    if not members:
        return {}
    eligible: dict[str, list[str]] = {}
    for member in members:
        for topic in subscriptions[member]:
            if partition_counts.get(topic, 0) > 0:
                eligible.setdefault(topic, []).append(member)
    every = [
        TopicPartition(topic, p)
        for topic in sorted(eligible)
        for p in range(partition_counts[topic])
    ]
    result: dict[str, set[TopicPartition]] = {m: set() for m in members}
    if not every:
        return {m: frozenset() for m in members}

    # Quotas for the common case (all members can take the same partitions): keeping up to
    # them moves the fewest partitions. Otherwise a member may rightly hold more than the
    # ceil (it alone takes some topic) or less than the floor, so quotas would move
    # partitions that balance does not require (and churn on every recomputation): all
    # that is valid is kept and the evening-out below moves only what balance requires.
    n, m = len(every), len(members)
    low, extra = divmod(n, m)
    alike = len({subscriptions[x].intersection(eligible) for x in members}) == 1

    # 1. Keep what members own, if still valid, up to the quota (ceil for the first `extra`).
    taken: set[TopicPartition] = set()
    ceil_left = extra
    for member in sorted(members, key=lambda x: (-len(current.get(x, ())), x)):
        keep = sorted(
            tp
            for tp in current.get(member, ())
            if tp not in taken
            and tp.topic in subscriptions[member]
            and tp.topic in eligible
            and tp.partition < partition_counts[tp.topic]
        )
        quota = low
        if not alike:
            quota = len(keep)
        elif ceil_left > 0 and len(keep) > low:
            quota = low + 1
            ceil_left -= 1
        for tp in keep[:quota]:
            result[member].add(tp)
            taken.add(tp)

    # 2. Hand out the rest, each to the least-loaded eligible member.
    for tp in every:
        if tp in taken:
            continue
        candidates = eligible[tp.topic]
        owner = min(candidates, key=lambda x: (len(result[x]), x))
        result[owner].add(tp)
        taken.add(tp)

    # 3. Even out (mixed subscriptions): while a member holds two or more partitions more
    #    than one it can reach, shift a partition along the chain between them (each member
    #    on it takes, from the one before, a partition of a topic it subscribes to; only the
    #    two ends change load). Direct moves are not enough: a{x} 3, b{x,y} 2, c{y} 1 evens
    #    out to 2, 2, 2 only by a -> b (an x) and b -> c (a y). With no such chain left, no
    #    reassignment lowers the largest load or raises the smallest (the optimality
    #    condition in Harvey et al., "Semi-matchings for bipartite graphs and load
    #    balancing"). Each shift lowers the sum of squared loads, so this ends.
    for _ in range(_BALANCE_MOVES_MAX):
        chain = _shift_chain(members, subscriptions, result)
        if chain is None:
            break
        for giver, taker, topic in chain:
            tp = max(tp for tp in result[giver] if tp.topic == topic)
            result[giver].discard(tp)
            result[taker].add(tp)
    return {member: frozenset(parts) for member, parts in result.items()}


def _shift_chain(
    members: list[str],
    subscriptions: Mapping[str, frozenset[str]],
    result: Mapping[str, set[TopicPartition]],
) -> list[tuple[str, str, str]] | None:
    """A chain along which a partition can shift to a member from one holding two or more
    partitions more: (giver, taker, topic) steps, poorest end first; None if there is none."""
    load = {m: len(result[m]) for m in members}
    most = max(load.values())
    holders: dict[str, list[str]] = {}
    for m in members:
        for topic in sorted({tp.topic for tp in result[m]}):
            holders.setdefault(topic, []).append(m)
    for poor in sorted(members, key=lambda x: (load[x], x)):
        if most - load[poor] < 2:
            return None
        # Breadth first from `poor` towards members that could give it (or its givers) one.
        taker_of: dict[str, tuple[str, str]] = {}  # giver -> (taker, topic)
        expanded: set[str] = set()
        queue = deque([poor])
        while queue:
            taker = queue.popleft()
            for topic in sorted(subscriptions[taker] - expanded):
                expanded.add(topic)
                for giver in holders.get(topic, ()):
                    if giver == poor or giver in taker_of:
                        continue
                    taker_of[giver] = (taker, topic)
                    if load[giver] - load[poor] >= 2:
                        chain = []
                        node = giver
                        while node != poor:
                            next_node, via = taker_of[node]
                            chain.append((node, next_node, via))
                            node = next_node
                        return chain[::-1]
                    queue.append(giver)
    return None
