"""Share groups in the broker (ShareGroupManager) with a fake clock: no gRPC, no sleeping.

What a user of a share group relies on: a record is handed to one member at a time and
comes back when released, when its lock expires or when its member goes; acknowledgements
survive a restart and acknowledged records are never handed out again; a record delivered
max_delivery_attempts times (or rejected) lands in the dead-letter topic with headers saying
where it came from; a deliver-at header holds a record back until its time; settings and
limits are checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import InvalidConfigError, LimitExceededError, NewRecord, decode_records
from stream._broker import Broker, BrokerConfig, FetchQuery
from stream._share import (
    DELIVER_AT_HEADER,
    LOCK_MS_MIN,
    Ack,
    ShareFetchResult,
    ShareGroupManager,
)
from stream.groups._coordinator import GroupNotEmptyError, UnknownGroupError, UnknownMemberError
from stream.share._state import ShareStateStore
from stream.share._window import AckType

T0 = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class Node:
    """A broker, a share-state store and a manager over one data directory."""

    def __init__(self, data_dir: Path, clock: Clock, *, max_in_flight: int = 2_000) -> None:
        self.broker = Broker(BrokerConfig(data_dir=data_dir), clock)
        self.store = ShareStateStore.open(data_dir, clock())
        self.share = ShareGroupManager(self.broker, self.store, clock, max_in_flight=max_in_flight)

    def close(self) -> None:
        self.store.close()
        self.broker.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def node(tmp_path: Path, clock: Clock) -> Iterator[Node]:
    n = Node(tmp_path / "data", clock)
    n.broker.create_topic("tasks", 2)
    try:
        yield n
    finally:
        n.close()


def produce(
    n: Node,
    topic: str,
    values: list[bytes],
    partition: int = 0,
    headers: tuple[tuple[str, bytes | None], ...] = (),
) -> None:
    hdrs = headers
    n.broker.produce_records(
        topic, partition, [NewRecord(None, v, T0, hdrs) for v in values], durable=False
    )


def join(n: Node, group: str = "g", topics: tuple[str, ...] = ("tasks",), **config: object) -> str:
    member, _interval, _settings = n.share.heartbeat(
        group, "", list(topics), dict(config) or None, 0
    )
    return member


def fetch(
    n: Node, member: str, max_records: int = 100, acks: list[Ack] | None = None, group: str = "g"
) -> ShareFetchResult:
    return n.share.fetch(
        group, member, acks or [], max_records=max_records, max_wait_ms=0, max_bytes=0
    )


def offsets(result: ShareFetchResult) -> list[tuple[str, int, int]]:
    return sorted(
        (p.topic, p.partition, o)
        for p in result.partitions
        for a in p.acquired
        for o in range(a.first, a.last + 1)
    )


def values(result: ShareFetchResult) -> dict[tuple[int, int], bytes | None]:
    """(partition, offset) -> value of the acquired records only."""
    out: dict[tuple[int, int], bytes | None] = {}
    for p in result.partitions:
        wanted = {o for a in p.acquired for o in range(a.first, a.last + 1)}
        for r in decode_records(p.data):
            if r.offset in wanted:
                out[(p.partition, r.offset)] = r.value
    return out


def ack(tp_offset: tuple[str, int, int], kind: AckType = AckType.ACCEPT, error: str = "") -> Ack:
    t, p, o = tp_offset
    return Ack(t, p, o, o, kind, error)


def read_all(n: Node, topic: str) -> list[NewRecord]:
    out = []
    for p in range(n.broker.partition_count(topic)):
        result = n.broker.read(FetchQuery(topic, p, 0), 1 << 20)
        out += [
            NewRecord(r.key, r.value, r.timestamp_ms, r.headers)
            for r in decode_records(result.data)
        ]
    return out


# ---------------------------------------------------------------------------- delivery
def test_latest_by_default_then_each_record_to_one_member(node: Node) -> None:
    produce(node, "tasks", [b"old"])
    a = join(node)
    b = join(node)
    produce(node, "tasks", [b"t0", b"t1", b"t2"], partition=0)
    produce(node, "tasks", [b"t3"], partition=1)
    first = fetch(node, a, max_records=2)
    second = fetch(node, b, max_records=10)
    got_a, got_b = offsets(first), offsets(second)
    assert len(got_a) == 2
    assert len(got_b) == 2
    assert not set(got_a) & set(got_b)
    every = [*values(first).values(), *values(second).values()]
    assert sorted(v for v in every if v is not None) == [b"t0", b"t1", b"t2", b"t3"]
    assert fetch(node, a).partitions == []  # everything is held


def test_earliest_start_reads_history(node: Node) -> None:
    produce(node, "tasks", [b"old0", b"old1"])
    m = join(node, start="earliest")
    assert sorted(v for v in values(fetch(node, m)).values() if v) == [b"old0", b"old1"]


def test_accepted_records_never_come_back_released_ones_do(node: Node, clock: Clock) -> None:
    m = join(node, retry_backoff_ms=0)
    produce(node, "tasks", [b"a", b"b"])
    got = offsets(fetch(node, m))
    refused = node.share.acknowledge(
        "g", m, [ack(got[0], AckType.ACCEPT), ack(got[1], AckType.RELEASE)]
    )
    assert refused == []
    again = fetch(node, m)
    assert offsets(again) == [got[1]]
    assert again.partitions[0].acquired[0].delivery_count == 2


def test_retry_backoff_holds_a_released_record(node: Node, clock: Clock) -> None:
    m = join(node, retry_backoff_ms=1_000, retry_backoff_max_ms=5_000)
    produce(node, "tasks", [b"a"])
    (rec,) = offsets(fetch(node, m))
    node.share.acknowledge("g", m, [ack(rec, AckType.RELEASE)])
    clock.now += 999
    assert fetch(node, m).partitions == []
    clock.now += 1
    assert offsets(fetch(node, m)) == [rec]
    node.share.acknowledge("g", m, [ack(rec, AckType.RELEASE)])
    clock.now += 1_999  # second release: 2 s
    assert fetch(node, m).partitions == []
    clock.now += 1
    assert offsets(fetch(node, m)) == [rec]


def test_lock_expiry_hands_the_record_to_another_member(node: Node, clock: Clock) -> None:
    a = join(node, lock_ms=LOCK_MS_MIN, retry_backoff_ms=0)
    b = join(node)
    produce(node, "tasks", [b"slow"])
    (rec,) = offsets(fetch(node, a))
    assert fetch(node, b).partitions == []
    clock.now += LOCK_MS_MIN
    got = fetch(node, b)
    assert offsets(got) == [rec]
    assert got.partitions[0].acquired[0].delivery_count == 2
    # The slow member's late acknowledgement is refused, and names why.
    (refusal,) = node.share.acknowledge("g", a, [ack(rec)])
    assert refusal.name == "LOCK_EXPIRED"
    # The new holder's acknowledgement counts.
    assert node.share.acknowledge("g", b, [ack(rec)]) == []


def test_ack_of_a_record_not_held_is_refused(node: Node) -> None:
    a = join(node)
    b = join(node)
    produce(node, "tasks", [b"x"])
    (rec,) = offsets(fetch(node, a))
    (refusal,) = node.share.acknowledge("g", b, [ack(rec)])
    assert refusal.name == "NOT_ACQUIRED"
    (refusal,) = node.share.acknowledge("g", a, [Ack("tasks", 0, 50, 60, AckType.ACCEPT)])
    assert (refusal.name, refusal.first_offset, refusal.last_offset) == ("NOT_ACQUIRED", 50, 60)
    assert node.share.acknowledge("g", a, [ack(rec)]) == []
    (refusal,) = node.share.acknowledge("g", a, [ack(rec)])  # twice
    assert refusal.name == "NOT_ACQUIRED"


def test_leaving_member_gives_its_records_back(node: Node) -> None:
    a = join(node, retry_backoff_ms=0)
    b = join(node)
    produce(node, "tasks", [b"x", b"y"])
    held = offsets(fetch(node, a))
    node.share.leave("g", a)
    assert offsets(fetch(node, b)) == held
    with pytest.raises(UnknownMemberError):
        fetch(node, a)


def test_silent_member_times_out(node: Node, clock: Clock) -> None:
    a, _i, _s = node.share.heartbeat("g", "", ["tasks"], {"retry_backoff_ms": 0}, 1_000)
    b = join(node)
    produce(node, "tasks", [b"x"])
    held = offsets(fetch(node, a))
    clock.now += 1_001
    node.share.heartbeat("g", b, None, None, 0)
    assert node.share.expire() == [("g", a)]
    assert offsets(fetch(node, b)) == held


# ---------------------------------------------------------------------------- dead letters
def test_max_delivery_attempts_then_dead_letter(node: Node, clock: Clock) -> None:
    m = join(node, max_delivery_attempts=3, retry_backoff_ms=0, dead_letter_topic="tasks.dlq")
    node.broker.produce_records(
        "tasks", 1, [NewRecord(b"k", b"poison", T0, (("trace", b"1"),))], durable=False
    )
    deliveries = 0
    for attempt in range(1, 6):
        got = fetch(node, m)
        if not got.partitions:
            break
        deliveries += 1
        assert got.partitions[0].acquired[0].delivery_count == attempt
        (rec,) = offsets(got)
        node.share.acknowledge("g", m, [ack(rec, AckType.RELEASE, f"boom {attempt}")])
    assert deliveries == 3
    (dead,) = read_all(node, "tasks.dlq")
    assert (dead.key, dead.value) == (b"k", b"poison")
    headers = dict(dead.headers)
    assert headers["trace"] == b"1"
    assert headers["riverlog-dlq-topic"] == b"tasks"
    assert headers["riverlog-dlq-partition"] == b"1"
    assert headers["riverlog-dlq-offset"] == b"0"
    assert headers["riverlog-dlq-delivery-count"] == b"3"
    assert headers["riverlog-dlq-reason"] == b"max-delivery-attempts"
    assert headers["riverlog-dlq-error"] == b"boom 3"
    info = node.share.describe("g")
    assert [p.archived_total for p in info.partitions if p.partition == 1] == [1]


def test_reject_archives_at_once_and_dead_letters(node: Node) -> None:
    m = join(node, dead_letter_topic="dlq")
    produce(node, "tasks", [b"bad"])
    (rec,) = offsets(fetch(node, m))
    node.share.acknowledge("g", m, [ack(rec, AckType.REJECT, "malformed")])
    assert fetch(node, m).partitions == []
    (dead,) = read_all(node, "dlq")
    assert dict(dead.headers)["riverlog-dlq-reason"] == b"rejected"
    assert dict(dead.headers)["riverlog-dlq-error"] == b"malformed"


def test_lock_expiry_counts_towards_max_deliveries(node: Node, clock: Clock) -> None:
    m = join(
        node,
        max_delivery_attempts=2,
        retry_backoff_ms=0,
        lock_ms=LOCK_MS_MIN,
        dead_letter_topic="dlq",
    )
    produce(node, "tasks", [b"hangs"])
    for _ in range(2):
        assert len(offsets(fetch(node, m))) == 1
        clock.now += LOCK_MS_MIN
    assert fetch(node, m).partitions == []
    (dead,) = read_all(node, "dlq")
    assert dict(dead.headers)["riverlog-dlq-error"] == b"lock expired"


# ---------------------------------------------------------------------------- delays
def test_deliver_at_header_holds_a_record_until_its_time(node: Node, clock: Clock) -> None:
    m = join(node)
    due = T0 + 60_000
    produce(node, "tasks", [b"later"], headers=((DELIVER_AT_HEADER, str(due).encode()),))
    produce(node, "tasks", [b"now"])
    assert sorted(v for v in values(fetch(node, m)).values() if v) == [b"now"]
    clock.now = due - 1
    assert fetch(node, m).partitions == []
    clock.now = due
    assert sorted(v for v in values(fetch(node, m)).values() if v) == [b"later"]


def test_delays_survive_a_restart(tmp_path: Path, clock: Clock) -> None:
    n = Node(tmp_path / "d", clock)
    n.broker.create_topic("tasks", 1)
    m = join(n)
    due = T0 + 60_000
    produce(n, "tasks", [b"later"], headers=((DELIVER_AT_HEADER, str(due).encode()),))
    produce(n, "tasks", [b"now"])
    fetch(n, m)  # the window now holds both
    n.close()
    n = Node(tmp_path / "d", clock)
    try:
        m = join(n)
        clock.now += 1_000  # past the retry backoff of "now", whose lock did not survive
        assert sorted(v for v in values(fetch(n, m)).values() if v) == [b"now"]
        clock.now = due
        assert b"later" in values(fetch(n, m)).values()
    finally:
        n.close()


# ---------------------------------------------------------------------------- durability
def test_acknowledged_records_stay_acknowledged_after_restart(tmp_path: Path, clock: Clock) -> None:
    n = Node(tmp_path / "d", clock)
    n.broker.create_topic("tasks", 1)
    m = join(n, retry_backoff_ms=0)
    produce(n, "tasks", [f"t{i}".encode() for i in range(10)])
    got = offsets(fetch(n, m, max_records=10))
    n.share.acknowledge("g", m, [ack(r) for r in got[::2]])
    n.close()
    n = Node(tmp_path / "d", clock)
    try:
        m = join(n)
        again = offsets(fetch(n, m, max_records=10))
        assert again == got[1::2]
    finally:
        n.close()


def test_window_bound_holds_newer_records_back(tmp_path: Path, clock: Clock) -> None:
    n = Node(tmp_path / "d", clock, max_in_flight=3)
    n.broker.create_topic("tasks", 1)
    try:
        m = join(n)
        produce(n, "tasks", [b"0", b"1", b"2", b"3", b"4"])
        got = offsets(fetch(n, m, max_records=10))
        assert [o for _t, _p, o in got] == [0, 1, 2]
        n.share.acknowledge("g", m, [ack(got[0])])
        assert [o for _t, _p, o in offsets(fetch(n, m))] == [3]
    finally:
        n.close()


# ---------------------------------------------------------------------------- admin
def test_describe_counts_and_lag(node: Node) -> None:
    m = join(node)
    produce(node, "tasks", [b"a", b"b", b"c"])
    got = offsets(fetch(node, m, max_records=2))
    node.share.acknowledge("g", m, [ack(got[0])])
    info = node.share.describe("g")
    (p0,) = [p for p in info.partitions if p.partition == 0]
    assert (p0.start_offset, p0.log_end_offset, p0.lag) == (1, 3, 2)
    assert (p0.counts.acquired, p0.counts.available) == (1, 1)
    assert [x.acquired for x in info.members] == [1]


def test_reset_and_delete_need_an_empty_group(node: Node) -> None:
    produce(node, "tasks", [b"a", b"b"])
    m = join(node)
    with pytest.raises(GroupNotEmptyError):
        node.share.reset_offsets("g", "tasks", [0], ("earliest", 0), dry_run=False)
    with pytest.raises(GroupNotEmptyError):
        node.share.delete_group("g")
    node.share.leave("g", m)
    (change,) = node.share.reset_offsets("g", "tasks", [0], ("earliest", 0), dry_run=False)
    assert (change.previous, change.new) == (2, 0)
    m = join(node)
    assert len(offsets(fetch(node, m))) == 2
    node.share.leave("g", m)
    node.share.delete_group("g")
    with pytest.raises(UnknownGroupError):
        node.share.describe("g")


def test_alter_changes_settings_and_first_member_sets_them(node: Node) -> None:
    join(node, lock_ms=5_000)
    _m, _i, settings = node.share.heartbeat("g", "", ["tasks"], {"lock_ms": 9_000}, 0)
    assert settings.lock_ms == 5_000  # the group's, not the late member's
    assert node.share.alter("g", {"max_delivery_attempts": 7}).max_delivery_attempts == 7
    with pytest.raises(InvalidConfigError, match="lock_ms"):
        node.share.alter("g", {"lock_ms": 10})
    with pytest.raises(InvalidConfigError, match="start"):
        node.share.alter("g", {"start": "middle"})


def test_bad_input_is_refused(node: Node) -> None:
    with pytest.raises(InvalidConfigError):
        node.share.heartbeat("bad group!", "", ["tasks"], None, 0)
    with pytest.raises(InvalidConfigError):
        node.share.heartbeat("g", "", [], None, 0)
    m = join(node)
    with pytest.raises(InvalidConfigError):
        fetch(node, m, max_records=10_001)
    with pytest.raises(LimitExceededError):
        node.share.acknowledge("g", m, [Ack("tasks", 0, 0, 10_000, AckType.ACCEPT)])
    with pytest.raises(UnknownMemberError):
        fetch(node, "nobody")


def test_a_group_never_consumes_its_own_dead_letter_topic(node: Node) -> None:
    with pytest.raises(InvalidConfigError, match="dead-letter"):
        join(node, dead_letter_topic="tasks")
    join(node, dead_letter_topic="dlq")
    with pytest.raises(InvalidConfigError, match="dead-letter"):
        node.share.alter("g", {"dead_letter_topic": "tasks"})
    with pytest.raises(InvalidConfigError, match="dead-letter"):
        join(node, topics=("tasks", "dlq"))
