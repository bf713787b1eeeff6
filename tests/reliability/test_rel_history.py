"""The history checker (tests/reliability/history.py) on tiny crafted histories: a clean one
has no anomaly, and each anomaly is found, counted once, and named with its evidence."""

from __future__ import annotations

from history import Anomalies, History


def clean() -> History:
    """Two producers, two partitions, two consumers; one failed send that was never written,
    one that was; one consumer seeks back and reads again."""
    h = History()
    h.send(b"a0", 0, 0, producer="p1")
    h.send(b"a1", 0, 1, producer="p1")
    h.send(b"b0", 1, 0, producer="p2")
    h.send(b"x", None, None, producer="p2")  # failed, not in the log
    h.send(b"y", 1, None, producer="p2")  # failed, but written after all
    h.send(b"a2", 0, 2, producer="p2")
    for offset, value in enumerate([b"a0", b"a1", b"a2"]):
        h.read("c1", 0, offset, value)
    h.read("c2", 1, 0, b"b0")
    h.read("c2", 1, 1, b"y")
    h.seek("c1", 0)
    h.read("c1", 0, 1, b"a1")  # re-read after a seek: not non-monotonic
    h.seek("c2")
    h.read("c2", 1, 0, b"b0")  # likewise, after a seek of every partition
    h.log_range(0, 0, 3)
    h.log_range(1, 0, 2)
    return h


def only(found: Anomalies, name: str) -> None:
    """`name` is the one anomaly found."""
    counts = found.counts()
    assert counts[name] > 0, found.describe()
    assert {k: v for k, v in counts.items() if v} == {name: counts[name]}, found.describe()
    assert not found.ok


def test_clean_history_has_no_anomaly() -> None:
    found = clean().check()
    assert found.ok, found.describe()
    assert (found.acknowledged, found.failed, found.failed_present, found.reads) == (4, 2, 1, 7)
    assert "lost 0, unseen 0, duplicates 0" in found.describe()


def test_empty_history_has_no_anomaly() -> None:
    found = History().check()
    assert found.ok
    assert found.acknowledged == found.reads == 0


def test_lost_write_is_acknowledged_and_missing_below_what_was_read() -> None:
    h = History()
    h.send(b"a0", 0, 0)
    h.send(b"a1", 0, 1)
    h.read("c", 0, 1, b"a1")
    found = h.check()
    only(found, "lost")
    assert found.lost == [(b"a0", 0, 0)]


def test_unseen_write_is_acknowledged_beyond_every_read() -> None:
    h = History()
    h.send(b"a0", 0, 0)
    h.send(b"a1", 0, 1)
    h.read("c", 0, 0, b"a0")
    found = h.check()
    only(found, "unseen")
    assert found.unseen == [(b"a1", 0, 1)]


def test_duplicate_is_one_value_at_two_offsets() -> None:
    h = History()
    h.send(b"a0", 0, 0)
    h.send(b"b", 0, None)  # failed, then written twice: a retry that was not idempotent
    h.read("c", 0, 0, b"a0")
    h.read("c", 0, 1, b"b")
    h.read("c", 0, 2, b"b")
    found = h.check()
    only(found, "duplicates")
    assert found.duplicates == [(b"b", ((0, 1), (0, 2)))]
    assert found.failed_present == 1


def test_reading_one_record_twice_is_not_a_duplicate() -> None:
    h = History()
    h.send(b"a0", 0, 0)
    h.read("c1", 0, 0, b"a0")
    h.read("c2", 0, 0, b"a0")  # redelivered to another consumer
    assert h.check().ok


def test_acknowledged_offset_holding_another_value_is_inconsistent() -> None:
    h = History()
    h.send(b"a0", 0, 0)
    h.send(b"a1", 0, 1)
    h.read("c", 0, 0, b"a1")  # a1 sits where a0 was acknowledged
    h.read("c", 0, 1, b"a1")
    found = h.check()
    assert found.inconsistent_offsets == [(0, 0, (b"a0", b"a1"))]
    # a1 is also at two offsets, and a0 was overwritten: Jepsen counts all three too.
    assert found.duplicates == [(b"a1", ((0, 0), (0, 1)))]
    assert found.lost == [(b"a0", 0, 0)]


def test_two_reads_disagreeing_about_one_offset_are_inconsistent() -> None:
    h = History()
    h.send(b"a", 0, None)
    h.send(b"b", 0, None)
    h.read("c1", 0, 0, b"a")
    h.read("c2", 0, 0, b"b")
    found = h.check()
    only(found, "inconsistent_offsets")
    assert found.inconsistent_offsets == [(0, 0, (b"a", b"b"))]


def test_poll_skip_jumps_over_an_offset_that_exists() -> None:
    h = History()
    for offset, value in enumerate([b"a0", b"a1", b"a2"]):
        h.send(value, 0, offset)
    h.read("c1", 0, 0, b"a0")
    h.read("c1", 0, 2, b"a2")  # a1 exists (acknowledged) and c1 never read it
    h.read("c2", 0, 1, b"a1")
    found = h.check()
    only(found, "poll_skips")
    assert found.poll_skips == [("c1", 0, 0, 2)]


def test_jump_over_offsets_nobody_knows_of_is_no_poll_skip() -> None:
    h = History()
    h.send(b"a0", 0, 0)
    h.send(b"a5", 0, 5)  # offsets 1-4: no evidence they exist (compacted, say)
    h.read("c", 0, 0, b"a0")
    h.read("c", 0, 5, b"a5")
    assert h.check().ok


def test_jump_after_a_seek_is_no_poll_skip() -> None:
    h = History()
    for offset, value in enumerate([b"a0", b"a1", b"a2"]):
        h.send(value, 0, offset)
    h.read("c", 0, 1, b"a1")
    h.read("c", 0, 0, b"a0")  # backwards without a seek
    h.seek("c", 0)
    h.read("c", 0, 2, b"a2")  # forward over a1 after a seek: fine
    found = h.check()
    only(found, "nonmonotonic_polls")
    assert found.nonmonotonic_polls == [("c", 0, 1, 0)]


def test_nonmonotonic_poll_includes_reading_the_same_offset_again() -> None:
    h = History()
    h.send(b"a0", 0, 0)
    h.send(b"b0", 1, 0)
    h.read("c", 0, 0, b"a0")
    h.read("c", 1, 0, b"b0")  # another partition: its own sequence
    h.read("c", 0, 0, b"a0")
    found = h.check()
    only(found, "nonmonotonic_polls")
    assert found.nonmonotonic_polls == [("c", 0, 0, 0)]


def test_seek_of_one_partition_keeps_the_others_checked() -> None:
    h = History()
    h.send(b"a0", 0, 0)
    h.send(b"b0", 1, 0)
    h.read("c", 0, 0, b"a0")
    h.read("c", 1, 0, b"b0")
    h.seek("c", 0)
    h.read("c", 0, 0, b"a0")
    h.read("c", 1, 0, b"b0")
    found = h.check()
    only(found, "nonmonotonic_polls")
    assert found.nonmonotonic_polls == [("c", 1, 0, 0)]


def test_nonmonotonic_send_is_a_producer_going_backwards_in_a_partition() -> None:
    h = History()
    h.send(b"a1", 0, 1, producer="p")
    h.send(b"b0", 1, 0, producer="p")
    h.send(b"a0", 0, 0, producer="p")  # sent after a1, written before it
    h.send(b"q2", 0, 2, producer="q")  # another producer: its own sequence
    for offset, value in enumerate([b"a0", b"a1", b"q2"]):
        h.read("c", 0, offset, value)
    h.read("c", 1, 0, b"b0")
    found = h.check()
    only(found, "nonmonotonic_sends")
    assert found.nonmonotonic_sends == [("p", 0, 1, 0)]


def test_unsent_is_a_value_nobody_sent() -> None:
    h = History()
    h.send(b"a0", 0, 0)
    h.read("c", 0, 0, b"a0")
    h.read("c", 0, 1, b"garbage")
    found = h.check()
    only(found, "unsent")
    assert found.unsent == [(0, 1, b"garbage")]


def test_hole_is_an_offset_in_the_log_range_nobody_read() -> None:
    h = History()
    h.send(b"a0", 0, None)
    h.send(b"a2", 0, None)
    h.read("c", 0, 0, b"a0")
    h.read("c", 0, 2, b"a2")  # no evidence offset 1 exists: no poll skip...
    h.log_range(0, 0, 3)  # ...but the log says [0, 3) exists: 1 is a hole
    found = h.check()
    only(found, "holes")
    assert found.holes == [(0, 1)]


def test_describe_names_each_anomaly_with_examples() -> None:
    h = History()
    h.send(b"a0", 0, 0)
    h.send(b"a1", 0, 1)
    h.read("c", 0, 1, b"a1")
    h.read("c", 0, 1, b"a1")
    text = h.check().describe()
    assert "lost 1" in text
    assert "nonmonotonic_polls 1" in text
    assert "lost: [(b'a0', 0, 0)]" in text
