"""The server-side assignor: valid, balanced within one, sticky, and even across mixed
subscriptions as far as they allow (checked against the optimality condition below)."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.groups._assignor import TopicPartition, assign

Assignment = Mapping[str, frozenset[TopicPartition]]


def _partitions(topic: str, count: int) -> set[TopicPartition]:
    return {TopicPartition(topic, p) for p in range(count)}


def _check_valid(
    result: Assignment, subscriptions: Mapping[str, frozenset[str]], counts: Mapping[str, int]
) -> None:
    """Every partition of a subscribed topic exactly once, each to a subscribed member."""
    assert set(result) == set(subscriptions)
    subscribed = {t for topics in subscriptions.values() for t in topics}
    expected = set().union(*(_partitions(t, counts.get(t, 0)) for t in subscribed))
    seen = Counter(tp for parts in result.values() for tp in parts)
    assert set(seen) == expected
    assert all(n == 1 for n in seen.values()), [tp for tp, n in seen.items() if n > 1]
    for member, parts in result.items():
        assert all(tp.topic in subscriptions[member] for tp in parts), member


def _check_balanced(result: Assignment) -> None:
    loads = [len(parts) for parts in result.values()]
    assert max(loads) - min(loads) <= 1, sorted(loads)


def _shift_path_exists(result: Assignment, subscriptions: Mapping[str, frozenset[str]]) -> bool:
    """Whether some member could give up a partition to one holding two or more fewer, along a
    chain rich -> w1 -> ... -> poor where each takes a partition of a topic it subscribes to
    from the one before. No such chain is the optimality condition of a load-balanced
    assignment (Harvey et al., "Semi-matchings for bipartite graphs and load balancing"):
    then no reassignment lowers the largest load or raises the smallest."""
    load = {m: len(parts) for m, parts in result.items()}
    for rich in result:
        seen = {rich}
        queue = deque([rich])
        while queue:
            giver = queue.popleft()
            if load[giver] <= load[rich] - 2 and giver != rich:
                return True
            held = {tp.topic for tp in result[giver]}
            for taker, topics in subscriptions.items():
                if taker not in seen and held & topics:
                    seen.add(taker)
                    queue.append(taker)
    return False


def _moved(before: Assignment, after: Assignment) -> int:
    """Partitions whose owner changed (partitions that had none are not counted)."""
    owner = {tp: m for m, parts in before.items() for tp in parts}
    return sum(1 for m, parts in after.items() for tp in parts if owner.get(tp, m) != m)


def _minimum_moves(old_counts: list[int], partitions: int) -> int:
    """Fewest partitions that must change owner to balance `old_counts` (every partition
    owned) over len(old_counts) members: the members owning most get the ceil quotas."""
    low, extra = divmod(partitions, len(old_counts))
    quotas = [low + 1] * extra + [low] * (len(old_counts) - extra)
    return sum(max(0, c - q) for c, q in zip(sorted(old_counts, reverse=True), quotas, strict=True))


# ---------------------------------------------------------------------------- examples


@pytest.mark.parametrize(
    ("members", "counts"),
    [
        (1, {"t": 5}),
        (3, {"t": 10}),
        (4, {"t": 3}),  # fewer partitions than members: some members get none
        (5, {"a": 7, "b": 3, "c": 1}),
        (7, {"a": 100}),
        (3, {"a": 0}),
    ],
)
def test_identical_subscriptions_are_balanced_within_one(
    members: int, counts: dict[str, int]
) -> None:
    subscriptions = {f"m{i}": frozenset(counts) for i in range(members)}
    result = assign(subscriptions, counts, {})
    _check_valid(result, subscriptions, counts)
    n = sum(counts.values())
    assert sorted(len(p) for p in result.values()) == sorted(
        [n // members + 1] * (n % members) + [n // members] * (members - n % members)
    )


def test_no_members_no_assignment() -> None:
    assert assign({}, {"t": 3}, {}) == {}


def test_zero_partition_and_unknown_topics_are_ignored() -> None:
    subscriptions = {
        "a": frozenset({"t", "empty", "missing"}),
        "b": frozenset({"t"}),
        "c": frozenset({"empty", "missing"}),  # nothing it could get
    }
    counts = {"t": 4, "empty": 0}
    result = assign(subscriptions, counts, {})
    _check_valid(result, subscriptions, counts)
    assert result["c"] == frozenset()
    assert len(result["a"]) == len(result["b"]) == 2


def test_assign_is_deterministic() -> None:
    subscriptions = {f"m{i}": frozenset({"a", "b"}) for i in range(4)}
    counts = {"a": 5, "b": 6}
    backwards = dict(reversed(subscriptions.items()))
    assert assign(subscriptions, counts, {}) == assign(backwards, counts, {})


@pytest.mark.parametrize(("partitions", "members"), [(10, 3), (12, 4), (3, 3), (7, 1), (2, 5)])
def test_adding_a_member_moves_the_minimum(partitions: int, members: int) -> None:
    counts = {"t": partitions}
    subscriptions = {f"m{i}": frozenset({"t"}) for i in range(members)}
    before = assign(subscriptions, counts, {})
    grown = {**subscriptions, "new": frozenset({"t"})}
    after = assign(grown, counts, before)
    _check_valid(after, grown, counts)
    _check_balanced(after)
    old_counts = [len(before[m]) for m in sorted(subscriptions)] + [0]
    assert _moved(before, after) == _minimum_moves(old_counts, partitions)
    for member, parts in after.items():  # an old member only loses, the new one only gains
        assert parts <= before.get(member, parts)


@pytest.mark.parametrize(("partitions", "members"), [(10, 3), (12, 4), (3, 3), (7, 2), (2, 5)])
def test_removing_a_member_moves_only_its_partitions(partitions: int, members: int) -> None:
    counts = {"t": partitions}
    subscriptions = {f"m{i}": frozenset({"t"}) for i in range(members)}
    before = assign(subscriptions, counts, {})
    for gone in subscriptions:
        rest = {m: s for m, s in subscriptions.items() if m != gone}
        after = assign(rest, counts, before)
        _check_valid(after, rest, counts)
        _check_balanced(after)
        for member in rest:
            assert before[member] <= after[member]


def test_mixed_subscriptions_only_go_to_subscribers() -> None:
    subscriptions = {
        "a": frozenset({"x"}),
        "b": frozenset({"x", "y"}),
        "c": frozenset({"y"}),
        "d": frozenset({"z"}),
    }
    counts = {"x": 6, "y": 3, "z": 1}
    result = assign(subscriptions, counts, {})
    _check_valid(result, subscriptions, counts)
    assert result["d"] == _partitions("z", 1)
    assert sorted(len(result[m]) for m in "abc") == [3, 3, 3]


def test_mixed_subscriptions_even_out_along_a_chain() -> None:
    # a can only take x, c only y; b both. a holding three and c one is evened out by
    # a -> b (an x) and b -> c (a y): no direct a -> c move exists.
    subscriptions = {"a": frozenset({"x"}), "b": frozenset({"x", "y"}), "c": frozenset({"y"})}
    counts = {"x": 4, "y": 2}
    x, y = sorted(_partitions("x", 4)), sorted(_partitions("y", 2))
    current = {"a": frozenset(x[:3]), "b": frozenset([x[3], *y])}
    result = assign(subscriptions, counts, current)
    _check_valid(result, subscriptions, counts)
    assert sorted(len(p) for p in result.values()) == [2, 2, 2]
    assert not _shift_path_exists(result, subscriptions)


def test_mixed_subscriptions_keep_a_balanced_assignment() -> None:
    # "d" subscribes to nothing that exists, so no member is held to ceil(7 / 4) = 2: the
    # evened-out answer is kept as it is when computed again (nothing moves for nothing).
    subscriptions = {
        "a": frozenset({"c", "d"}),
        "b": frozenset({"c"}),
        "c": frozenset({"d", "x"}),
        "d": frozenset({"missing"}),
    }
    counts = {"c": 2, "d": 5, "x": 0}
    result = assign(subscriptions, counts, {})
    _check_valid(result, subscriptions, counts)
    assert sorted(len(p) for p in result.values()) == [0, 2, 2, 3]
    assert assign(subscriptions, counts, result) == result


def test_mixed_subscriptions_cannot_always_be_balanced() -> None:
    # Only "a" takes x: it ends with all of x however uneven that is.
    subscriptions = {"a": frozenset({"x"}), "b": frozenset({"y"})}
    counts = {"x": 6, "y": 1}
    result = assign(subscriptions, counts, {})
    _check_valid(result, subscriptions, counts)
    assert (len(result["a"]), len(result["b"])) == (6, 1)


def test_current_keeps_valid_entries_and_drops_invalid_ones() -> None:
    subscriptions = {"a": frozenset({"t"}), "b": frozenset({"t"})}
    counts = {"t": 4, "u": 2}
    current = {
        "a": frozenset({TopicPartition("t", 0), TopicPartition("t", 1), TopicPartition("u", 0)}),
        "b": frozenset({TopicPartition("t", 1), TopicPartition("t", 9)}),  # dup, past count
        "gone": frozenset({TopicPartition("t", 3)}),  # not a member any more
    }
    result = assign(subscriptions, counts, current)
    _check_valid(result, subscriptions, counts)
    _check_balanced(result)
    assert {TopicPartition("t", 0), TopicPartition("t", 1)} <= result["a"]


# ---------------------------------------------------------------------------- properties

TOPICS = ["a", "b", "c", "d"]


@st.composite
def _groups(
    draw: st.DrawFn, *, identical: bool
) -> tuple[dict[str, frozenset[str]], dict[str, int], dict[str, frozenset[TopicPartition]]]:
    """Members, subscriptions, partition counts and an arbitrary current assignment, with
    entries for unsubscribed and unknown topics, partitions past the count and duplicates."""
    counts = draw(st.dictionaries(st.sampled_from(TOPICS), st.integers(0, 8), max_size=4))
    members = [f"m{i}" for i in range(draw(st.integers(1, 6)))]
    names = st.sampled_from([*TOPICS, "unknown"])
    topic_sets = st.frozensets(names, min_size=1, max_size=4)
    if identical:
        shared = draw(topic_sets)
        subscriptions = dict.fromkeys(members, shared)
    else:
        subscriptions = {m: draw(topic_sets) for m in members}
    tps = st.builds(TopicPartition, names, st.integers(0, 10))
    holders = st.sampled_from([*members, "former"])
    current = draw(st.dictionaries(holders, st.frozensets(tps, max_size=12), max_size=7))
    return subscriptions, counts, current


@settings(max_examples=300, deadline=None)
@given(_groups(identical=True))
def test_identical_subscriptions_property(
    group: tuple[dict[str, frozenset[str]], dict[str, int], dict[str, frozenset[TopicPartition]]],
) -> None:
    subscriptions, counts, current = group
    result = assign(subscriptions, counts, current)
    _check_valid(result, subscriptions, counts)
    _check_balanced(result)
    assert assign(subscriptions, counts, result) == result  # a fixed point: no churn


@settings(max_examples=300, deadline=None)
@given(_groups(identical=False))
def test_mixed_subscriptions_property(
    group: tuple[dict[str, frozenset[str]], dict[str, int], dict[str, frozenset[TopicPartition]]],
) -> None:
    subscriptions, counts, current = group
    result = assign(subscriptions, counts, current)
    _check_valid(result, subscriptions, counts)
    assert not _shift_path_exists(result, subscriptions), result
    assert assign(subscriptions, counts, result) == result  # a fixed point: no churn


@settings(max_examples=200, deadline=None)
@given(
    partitions=st.integers(0, 40),
    old_counts=st.lists(st.integers(0, 40), min_size=1, max_size=6),
)
def test_adding_a_member_moves_the_minimum_from_any_full_assignment(
    partitions: int, old_counts: list[int]
) -> None:
    """From any assignment that owns every partition (balanced or not), a new member's
    arrival moves exactly the partitions that balance requires."""
    total = sum(old_counts)
    if total == 0:
        old_counts = [partitions, *old_counts[1:]]
    else:  # scale the drawn shares to `partitions`, the rest to the first member
        old_counts = [c * partitions // total for c in old_counts]
        old_counts[0] += partitions - sum(old_counts)
    ordered = sorted(_partitions("t", partitions))
    before: dict[str, frozenset[TopicPartition]] = {}
    start = 0
    for i, c in enumerate(old_counts):
        before[f"m{i}"] = frozenset(ordered[start : start + c])
        start += c
    subscriptions = {m: frozenset({"t"}) for m in [*before, "new"]}
    after = assign(subscriptions, {"t": partitions}, before)
    _check_valid(after, subscriptions, {"t": partitions})
    _check_balanced(after)
    assert _moved(before, after) == _minimum_moves([*old_counts, 0], partitions)


@settings(max_examples=200, deadline=None)
@given(partitions=st.integers(0, 40), members=st.integers(2, 7), gone=st.integers(0, 6))
def test_removing_a_member_moves_only_its_partitions_property(
    partitions: int, members: int, gone: int
) -> None:
    counts = {"t": partitions}
    subscriptions = {f"m{i}": frozenset({"t"}) for i in range(members)}
    before = assign(subscriptions, counts, {})
    rest = {m: s for m, s in subscriptions.items() if m != f"m{gone % members}"}
    after = assign(rest, counts, before)
    _check_valid(after, rest, counts)
    _check_balanced(after)
    assert all(before[m] <= after[m] for m in rest)
