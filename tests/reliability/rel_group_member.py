"""A consumer-group member for tests/reliability/test_rel_group_chaos.py: one stream.Consumer
in a process of its own, so the test can SIGKILL it.

It polls (at most --max-records a time), "processes" each record (a sleep of --work-us),
appends a line per record to --out, flushes, then commits the offsets after the records it
processed (manual commit: process, then commit). It logs, one event a line, with wall-clock
nanoseconds (time.time_ns: one clock for every process on the machine):

    A <ns> <member_id> <epoch> <partition>:<position> ...   on_assign (position: where it starts)
    V <ns> <member_id> <epoch> <partition> ...              on_revoke (given back, or lost)
    R <ns> <member_id> <epoch> <partition> <offset> <value> a record processed
    S <ns> <member_id> <epoch> <partition>:<offset> ...       a commit about to be sent
    C <ns> <member_id> <epoch>                              ... acknowledged
    F <ns> <member_id> <epoch> <error name>                 ... failed

The records and the S line are flushed before the commit is sent, so the file holds every
record a commit covers and every commit the broker may have applied; a SIGKILL may leave a
partial last line, which the reader drops. SIGTERM: close (leave the group) and exit 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from types import FrameType
from typing import TextIO

from stream import Consumer, RiverlogError, TopicPartition

# Poll wait: also how soon SIGTERM is noticed.
POLL_TIMEOUT_MS = 200
# After a failed poll (the broker is down, say).
RETRY_PAUSE_S = 0.1
# Member session and hand-over bounds, short so that kills are noticed quickly.
SESSION_TIMEOUT_MS = 2_000
REBALANCE_TIMEOUT_MS = 10_000
FETCH_MAX_WAIT_MS = 200
BUFFER_BYTES_MAX = 256 * 1024


class Member:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.consumer: Consumer | None = None

    def identity(self) -> str:
        """`<member_id> <epoch>` as the consumer knows them now ("-" before it joined)."""
        assert self.consumer is not None
        core = self.consumer._core
        return f"{core._member_id or '-'} {core._epoch}"

    def on_assign(self, tps: list[TopicPartition]) -> None:
        assert self.consumer is not None
        positions = " ".join(f"{tp.partition}:{self.consumer.position(tp)}" for tp in tps)
        self.out.write(f"A {time.time_ns()} {self.identity()} {positions}\n")
        self.out.flush()

    def on_revoke(self, tps: list[TopicPartition]) -> None:
        partitions = " ".join(str(tp.partition) for tp in tps)
        self.out.write(f"V {time.time_ns()} {self.identity()} {partitions}\n")
        self.out.flush()

    def work(self, consumer: Consumer, max_records: int, work_s: float) -> None:
        records = consumer.poll(POLL_TIMEOUT_MS, max_records)
        if not records:
            return
        identity = self.identity()
        offsets: dict[TopicPartition, int] = {}
        lines = []
        for r in records:
            time.sleep(work_s)
            value = (r.value or b"").decode("ascii")
            lines.append(f"R {time.time_ns()} {identity} {r.partition} {r.offset} {value}\n")
            offsets[TopicPartition(r.topic, r.partition)] = r.offset + 1
        wanted = " ".join(f"{tp.partition}:{o}" for tp, o in sorted(offsets.items()))
        lines.append(f"S {time.time_ns()} {identity} {wanted}\n")
        self.out.write("".join(lines))
        self.out.flush()  # before the commit covers them
        try:
            consumer.commit(offsets)
        except RiverlogError as e:
            self.out.write(f"F {time.time_ns()} {identity} {e.name or type(e).__name__}\n")
        else:
            self.out.write(f"C {time.time_ns()} {identity}\n")
        self.out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-records", type=int, default=50)
    parser.add_argument("--work-us", type=int, default=1000)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="wall-clock cap")
    args = parser.parse_args(argv)
    stopping = False

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_sigterm)
    deadline = time.monotonic() + args.max_seconds
    with open(args.out, "a", encoding="ascii") as out:
        member = Member(out)
        consumer = Consumer(
            args.server,
            group=args.group,
            topics=[args.topic],
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            rebalance_timeout_ms=REBALANCE_TIMEOUT_MS,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            buffer_bytes_max=BUFFER_BYTES_MAX,
            on_assign=member.on_assign,
            on_revoke=member.on_revoke,
        )
        member.consumer = consumer
        try:
            while not stopping and time.monotonic() < deadline:
                try:
                    member.work(consumer, args.max_records, args.work_us / 1e6)
                except RiverlogError as e:
                    print(f"rel_group_member: poll failed: {e!r}", file=sys.stderr, flush=True)
                    time.sleep(RETRY_PAUSE_S)
        finally:
            consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
