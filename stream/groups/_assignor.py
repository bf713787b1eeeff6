"""Server-side partition assignment: balanced and sticky.

`assign` is a pure function of the members' subscriptions, the partition counts and the
current ownership. With identical subscriptions every member ends with floor(n/m) or
ceil(n/m) of the n partitions (balanced within one), and a partition moves only when that
balance requires it (sticky): a member joining takes partitions only from members over the
new quota, a member leaving hands its own partitions to the least loaded. With different
subscriptions a partition only goes to a member subscribed to its topic, and members are
evened out as far as their subscriptions allow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple


class TopicPartition(NamedTuple):
    topic: str
    partition: int


# Bound on the evening-out passes for mixed subscriptions (each pass moves one partition).
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

    # Quotas for the common case (all members subscribed alike); members with narrower
    # subscriptions simply end lower and the evening-out below handles the rest.
    n, m = len(every), len(members)
    low, extra = divmod(n, m)

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
        if ceil_left > 0 and len(keep) > low:
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

    # 3. Even out (mixed subscriptions): move one partition at a time from a member with
    #    two or more above another eligible member.
    for _ in range(_BALANCE_MOVES_MAX):
        moved = False
        by_load = sorted(members, key=lambda x: (len(result[x]), x))
        for poor in by_load:
            for rich in reversed(by_load):
                if len(result[rich]) - len(result[poor]) < 2:
                    break
                movable = sorted(tp for tp in result[rich] if tp.topic in subscriptions[poor])
                if movable:
                    tp = movable[-1]
                    result[rich].discard(tp)
                    result[poor].add(tp)
                    moved = True
                    break
            if moved:
                break
        if not moved:
            break
    return {member: frozenset(parts) for member, parts in result.items()}
