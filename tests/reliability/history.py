"""A history checker for produce/consume runs: Jepsen's queue anomalies, counted.

A test feeds it what the producers were told and what the consumers saw, then asks for the
anomalies (the names are those of Jepsen's Kafka workload, jepsen.tests.kafka):

    history = History()
    history.send(value, partition, offset, producer="p1")   # acknowledged at (partition, offset)
    history.send(value, partition, None, producer="p1")     # failed or no answer: maybe written
    history.read("c1", partition, offset, value)            # one record a consumer processed
    history.seek("c1", partition)                           # c1's next read there may jump
    history.log_range(partition, start, end)                 # optional: offsets that must exist
    anomalies = history.check()

Sends are fed per producer in the order they were sent; reads per consumer in the order they
were processed. Values identify records: every send carries a value no other send carries.

What `check` counts:

- lost: an acknowledged value never read, although a read of its partition reached its
  acknowledged offset or beyond (so the reads had every chance to see it).
- unseen: an acknowledged value never read, and no read of its partition reached its offset
  (no evidence either way; a test that drains every partition wants none of these either).
- duplicates: one value at two or more (partition, offset) positions, by acknowledgements and
  reads together (an acknowledged value read at another offset is one).
- inconsistent offsets: one (partition, offset) holding two or more values, by
  acknowledgements and reads together.
- poll skips: two consecutive reads of a partition by one consumer, with no seek between,
  jump from offset a to b > a + 1 although some offset strictly between them is known to
  exist (acknowledged or read by anyone).
- non-monotonic polls: two consecutive reads of a partition by one consumer, with no seek
  between, go from offset a to b <= a.
- non-monotonic sends: two consecutive acknowledged sends of one producer to one partition
  got offsets a, then b <= a (an idempotent producer keeps send order per partition).
- unsent: a value read that no send carried (corruption, or a writer the test forgot).
- holes: an offset in a `log_range` that no consumer read (offsets must be dense).

A failed send (offset None) may or may not be in the log; it must never be there twice, which
`duplicates` covers. `failed_present` says how many of them were read.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass

__all__ = ["Anomalies", "History"]

# Examples of each anomaly shown by Anomalies.describe(); the counts are always complete.
EXAMPLES_SHOWN = 3

Position = tuple[int, int]  # (partition, offset)


@dataclass(frozen=True)
class Anomalies:
    """What `History.check` found; every list is complete, sorted, and empty when all is well."""

    acknowledged: int
    failed: int
    failed_present: int
    reads: int
    # (value, partition, acknowledged offset)
    lost: list[tuple[bytes, int, int]]
    unseen: list[tuple[bytes, int, int]]
    # (value, every position it was at)
    duplicates: list[tuple[bytes, tuple[Position, ...]]]
    # (partition, offset, every value seen there)
    inconsistent_offsets: list[tuple[int, int, tuple[bytes, ...]]]
    # (consumer, partition, offset a, offset b) of the two consecutive reads
    poll_skips: list[tuple[str, int, int, int]]
    nonmonotonic_polls: list[tuple[str, int, int, int]]
    # (producer, partition, offset a, offset b) of the two consecutive acknowledged sends
    nonmonotonic_sends: list[tuple[str, int, int, int]]
    # (partition, offset, value)
    unsent: list[tuple[int, int, bytes]]
    # (partition, offset)
    holes: list[Position]

    def counts(self) -> dict[str, int]:
        """The number of each anomaly, by name (zero when all is well)."""
        return {
            "lost": len(self.lost),
            "unseen": len(self.unseen),
            "duplicates": len(self.duplicates),
            "inconsistent_offsets": len(self.inconsistent_offsets),
            "poll_skips": len(self.poll_skips),
            "nonmonotonic_polls": len(self.nonmonotonic_polls),
            "nonmonotonic_sends": len(self.nonmonotonic_sends),
            "unsent": len(self.unsent),
            "holes": len(self.holes),
        }

    @property
    def ok(self) -> bool:
        return not any(self.counts().values())

    def describe(self) -> str:
        """One line of figures, then a few examples of each anomaly found."""
        figures = (
            f"acknowledged {self.acknowledged}, failed {self.failed} "
            f"({self.failed_present} present), reads {self.reads}; "
            + ", ".join(f"{name} {n}" for name, n in self.counts().items())
        )
        lines = [figures]
        for name in self.counts():
            found: list[object] = getattr(self, name)
            if found:
                lines.append(f"  {name}: {found[:EXAMPLES_SHOWN]}")
        return "\n".join(lines)


class History:
    """Sends and reads, fed as they happen (or afterwards, in order); see the module docstring."""

    def __init__(self) -> None:
        # value -> its acknowledged position
        self._acked: dict[bytes, Position] = {}
        self._failed: set[bytes] = set()
        # (producer, partition) -> its last acknowledged offset there
        self._last_sent: dict[tuple[str, int], int] = {}
        self._nonmonotonic_sends: list[tuple[str, int, int, int]] = []
        # Every value at every position, from acknowledgements and reads: the first one seen,
        # and the others only when there are others (most positions hold one value).
        self._value_at: dict[Position, bytes] = {}
        self._more_values_at: dict[Position, set[bytes]] = {}
        self._position_of: dict[bytes, Position] = {}
        self._more_positions_of: dict[bytes, set[Position]] = {}
        # What consumers read.
        self._reads = 0
        self._read_values: set[bytes] = set()
        self._read_positions: set[Position] = set()
        self._read_max: dict[int, int] = {}  # partition -> highest offset read
        # (consumer, partition) -> offset of its last read there since its last seek
        self._last_read: dict[tuple[str, int], int] = {}
        # (consumer, partition, a, b): forward jumps, judged at check() once every offset
        # that exists is known.
        self._jumps: list[tuple[str, int, int, int]] = []
        self._nonmonotonic_polls: list[tuple[str, int, int, int]] = []
        self._ranges: dict[int, tuple[int, int]] = {}

    # ------------------------------------------------------------------ input
    def send(
        self, value: bytes, partition: int | None, offset: int | None, producer: str = ""
    ) -> None:
        """One send of `producer`, in its send order: acknowledged at (partition, offset), or
        failed / unanswered (offset None: it may or may not be in the log)."""
        if offset is None:
            self._failed.add(value)
            return
        assert partition is not None, "an acknowledged send has a partition"
        self._acked[value] = (partition, offset)
        self._place(value, (partition, offset))
        key = (producer, partition)
        last = self._last_sent.get(key)
        if last is not None and offset <= last:
            self._nonmonotonic_sends.append((producer, partition, last, offset))
        self._last_sent[key] = offset

    def read(self, consumer: str, partition: int, offset: int, value: bytes) -> None:
        """One record `consumer` read (polled and processed), in its read order."""
        self._reads += 1
        position = (partition, offset)
        self._place(value, position)
        self._read_values.add(value)
        self._read_positions.add(position)
        if offset > self._read_max.get(partition, -1):
            self._read_max[partition] = offset
        last = self._last_read.get((consumer, partition))
        self._last_read[(consumer, partition)] = offset
        if last is None:
            return
        if offset <= last:
            self._nonmonotonic_polls.append((consumer, partition, last, offset))
        elif offset > last + 1:
            self._jumps.append((consumer, partition, last, offset))

    def seek(self, consumer: str, partition: int | None = None) -> None:
        """`consumer` moved its position in `partition` (None: in every partition) on purpose
        (a seek, a new assignment, a restart): its next read there may be anywhere."""
        if partition is None:
            for key in [k for k in self._last_read if k[0] == consumer]:
                del self._last_read[key]
        else:
            self._last_read.pop((consumer, partition), None)

    def log_range(self, partition: int, start: int, end: int) -> None:
        """Offsets [start, end) of `partition` exist (its log start and log end offsets): each
        must have been read by some consumer."""
        self._ranges[partition] = (start, end)

    def _place(self, value: bytes, position: Position) -> None:
        first = self._value_at.setdefault(position, value)
        if first != value:
            self._more_values_at.setdefault(position, set()).add(value)
        known = self._position_of.setdefault(value, position)
        if known != position:
            self._more_positions_of.setdefault(value, set()).add(position)

    # ------------------------------------------------------------------ output
    def check(self) -> Anomalies:
        lost: list[tuple[bytes, int, int]] = []
        unseen: list[tuple[bytes, int, int]] = []
        for value, (partition, offset) in self._acked.items():
            if value in self._read_values:
                continue
            if self._read_max.get(partition, -1) >= offset:
                lost.append((value, partition, offset))
            else:
                unseen.append((value, partition, offset))
        duplicates = [
            (value, tuple(sorted(more | {self._position_of[value]})))
            for value, more in self._more_positions_of.items()
        ]
        inconsistent = [
            (position[0], position[1], tuple(sorted(more | {self._value_at[position]})))
            for position, more in self._more_values_at.items()
        ]
        known: dict[int, list[int]] = defaultdict(list)
        for partition, offset in self._value_at:
            known[partition].append(offset)
        for offsets in known.values():
            offsets.sort()
        skips = []
        for consumer, partition, a, b in self._jumps:
            offsets = known[partition]
            i = bisect.bisect_right(offsets, a)
            if i < len(offsets) and offsets[i] < b:
                skips.append((consumer, partition, a, b))
        sent = self._acked.keys() | self._failed
        unsent = [
            (partition, offset, value)
            for (partition, offset), value in self._value_at.items()
            if value not in sent
        ]
        unsent.extend(
            (partition, offset, value)
            for (partition, offset), values in self._more_values_at.items()
            for value in values
            if value not in sent
        )
        holes = [
            (partition, offset)
            for partition, (start, end) in sorted(self._ranges.items())
            for offset in range(start, end)
            if (partition, offset) not in self._read_positions
        ]
        return Anomalies(
            acknowledged=len(self._acked),
            failed=len(self._failed),
            failed_present=len(self._failed & self._read_values),
            reads=self._reads,
            lost=sorted(lost),
            unseen=sorted(unseen),
            duplicates=sorted(duplicates),
            inconsistent_offsets=sorted(inconsistent),
            poll_skips=sorted(skips),
            nonmonotonic_polls=sorted(self._nonmonotonic_polls),
            nonmonotonic_sends=sorted(self._nonmonotonic_sends),
            unsent=sorted(unsent),
            holes=holes,
        )
