"""A share-group member as a program, for tests/test_share_integration.py.

    python tests/share_worker.py --server ADDR --group G --topic T --out FILE
        [--mode work|hold] [--lock-ms MS] [--retry-backoff-ms MS] [--max-records N]
        [--session-timeout-ms MS] [--max-seconds S]

It consumes topic T in share group G with a ShareConsumer (stream/client/_share.py): the group
starts at "earliest" with the given lock time and retry backoff. A record's value is a task, ASCII
"<task id>:<kind>" (kind "w" work, "h" a hold marker). Each batch a poll returns is
acknowledged (ACCEPT) record by record, then commit() sends the acknowledgements; the worker
writes what happened to FILE, one line per event, flushed per batch:

    J member_id t_ns                                  joined (each new member id seen)
    D partition offset task delivery_count t_ns polled_ns
                                                      handed out by a poll that started at
                                                      polled_ns (the broker acquired the
                                                      record between polled_ns and t_ns)
    A partition offset task t_ns                      ACCEPT confirmed by the broker
    F partition offset task name t_ns                 ACCEPT not applied, or not known to be
    H partition offset task t_ns                      held on purpose (--mode hold)

t_ns is time.time_ns() when the event was seen (the broker runs on the same machine clock).

"Confirmed" means: a commit() returned without raising, and no refusal (its own answer, or
take_ack_failures() for acknowledgements that an earlier poll carried or that a lost membership
dropped) covers the record. While commit() raises (broker away: UNAVAILABLE after the client's
retries) the acknowledgements stay queued in the client and go with the next poll or commit;
they stay unresolved here until a commit succeeds. F with name UNKNOWN_MEMBER after a broker
restart is ambiguous: an acknowledgement the old broker applied and fsynced before it died
without answering is reported so too.

--mode hold: the first batch that holds a marker is written as H lines and neither
acknowledged nor given back; the worker then sleeps (heartbeats go on) until it is killed: its
records come back only when their locks expire.

SIGTERM, or the --max-seconds cap (every loop is bounded by it): commit what is queued, close
the consumer (leave the group), exit 0 (3 for the cap). Diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterable
from types import FrameType
from typing import TextIO

from stream import (
    AckFailure,
    InvalidArgumentError,
    RiverlogError,
    ShareConsumer,
    ShareRecord,
)

# The longest one poll waits: also how long SIGTERM may wait for the loop.
POLL_TIMEOUT_MS = 200
# Commits tried when stopping, while the broker is away (each is ~1 s of client retries).
FINAL_COMMIT_ATTEMPTS_MAX = 5
# A stalled "hold" worker re-checks the stop flag this often.
HOLD_CHECK_S = 0.1
EXIT_STOPPED = 0
EXIT_CAP_REACHED = 3
MARKER_KIND = b"h"

_Key = tuple[int, int]  # (partition, offset)


def log(message: str) -> None:
    print(f"share_worker {time.time():.3f}: {message}", file=sys.stderr, flush=True)


def task_of(record: ShareRecord) -> tuple[int, bytes]:
    """(task id, kind) of a record's value "<task id>:<kind>"."""
    task, _, kind = (record.value or b"").partition(b":")
    return int(task), kind


class Journal:
    """The FILE of the module docstring, and the acknowledgements not yet resolved."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lines: list[str] = []
        # Acknowledged by this worker, outcome not known yet: key -> task.
        self.pending: dict[_Key, int] = {}

    def write(self, line: str) -> None:
        self.lines.append(line + "\n")

    def flush(self) -> None:
        if self.lines:
            self.out.write("".join(self.lines))
            self.out.flush()
            self.lines.clear()

    def failed(self, failures: Iterable[AckFailure]) -> None:
        """Pending acknowledgements covered by `failures` are resolved as F."""
        now_ns = time.time_ns()
        for f in failures:
            for offset in range(f.first_offset, f.last_offset + 1):
                task = self.pending.pop((f.partition, offset), None)
                if task is not None:
                    self.write(f"F {f.partition} {offset} {task} {f.name} {now_ns}")

    def confirmed(self) -> None:
        """A commit succeeded: every acknowledgement still pending was applied."""
        now_ns = time.time_ns()
        for (partition, offset), task in sorted(self.pending.items()):
            self.write(f"A {partition} {offset} {task} {now_ns}")
        self.pending.clear()


def commit(consumer: ShareConsumer, journal: Journal) -> bool:
    """commit(); resolve the pending acknowledgements when it succeeds. False when it raised
    (they stay queued in the client and pending here)."""
    try:
        refused = consumer.commit()
    except RiverlogError as e:
        log(f"commit failed ({len(journal.pending)} acknowledgements pending): {e}")
        return False
    journal.failed(refused + consumer.take_ack_failures())
    journal.confirmed()
    return True


def hold(journal: Journal, records: list[ShareRecord], stop: threading.Event) -> None:
    """Keep `records` without acknowledging them until stopped (or killed)."""
    now_ns = time.time_ns()
    for r in records:
        journal.write(f"H {r.partition} {r.offset} {task_of(r)[0]} {now_ns}")
    journal.flush()
    log(f"holding {len(records)} records")
    while not stop.wait(HOLD_CHECK_S):
        pass


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    cap = threading.Timer(args.max_seconds, stop.set)
    cap.daemon = True
    cap.start()
    started = time.monotonic()
    consumer = ShareConsumer(
        args.server,
        group=args.group,
        topics=[args.topic],
        lock_ms=args.lock_ms,
        retry_backoff_ms=args.retry_backoff_ms,
        start="earliest",
        max_records=args.max_records,
        max_wait_ms=POLL_TIMEOUT_MS,
        session_timeout_ms=args.session_timeout_ms,
    )
    with open(args.out, "a", encoding="ascii") as out:
        journal = Journal(out)
        member_id = ""
        try:
            while not stop.is_set():
                polled_ns = time.time_ns()
                try:
                    records = consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
                except RiverlogError as e:
                    log(f"poll failed: {e}")
                    stop.wait(POLL_TIMEOUT_MS / 1000)
                    continue
                now_ns = time.time_ns()
                # Refusals of acknowledgements this poll carried, or dropped with a lost
                # membership (before anything of the new one was handed out).
                journal.failed(consumer.take_ack_failures())
                if consumer.member_id not in ("", member_id):
                    member_id = consumer.member_id
                    journal.write(f"J {member_id} {now_ns}")
                for r in records:
                    task, _kind = task_of(r)
                    journal.write(
                        f"D {r.partition} {r.offset} {task} {r.delivery_count} {now_ns} {polled_ns}"
                    )
                if args.mode == "hold" and any(task_of(r)[1] == MARKER_KIND for r in records):
                    hold(journal, records, stop)
                    break
                for r in records:
                    key = (r.partition, r.offset)
                    try:
                        consumer.ack(r)
                    except InvalidArgumentError as e:  # forgotten with a lost membership
                        journal.write(f"F {key[0]} {key[1]} {task_of(r)[0]} FORGOTTEN {now_ns}")
                        log(f"ack refused locally: {e}")
                        continue
                    journal.pending[key] = task_of(r)[0]
                if journal.pending:
                    commit(consumer, journal)
                journal.flush()
            if args.mode != "hold":
                for _ in range(FINAL_COMMIT_ATTEMPTS_MAX):
                    if not journal.pending or commit(consumer, journal):
                        break
                journal.failed(
                    AckFailure("", p, o, o, "UNCONFIRMED", "") for p, o in list(journal.pending)
                )
        finally:
            journal.flush()
            consumer.close()
    capped = time.monotonic() - started >= args.max_seconds
    return EXIT_CAP_REACHED if capped else EXIT_STOPPED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A share-group member for the tests.")
    parser.add_argument("--server", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True, help="file the events go to")
    parser.add_argument("--mode", choices=["work", "hold"], default="work")
    parser.add_argument("--lock-ms", type=int, default=30_000)
    parser.add_argument("--retry-backoff-ms", type=int, default=1_000)
    parser.add_argument("--max-records", type=int, default=500)
    parser.add_argument("--session-timeout-ms", type=int, default=10_000)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="wall-clock cap")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
