"""Replay history from a point in time: seek every partition to the first record at or after
a timestamp, then read forward. Records keep the timestamps their producer gave them.

    python examples/replay.py
"""

from __future__ import annotations

import contextlib
import time

from stream import Admin, AlreadyExistsError, Consumer, Producer, TopicPartition

HOUR_MS = 3_600_000
DEADLINE_S = 30.0


def main() -> None:
    with Admin() as admin, contextlib.suppress(AlreadyExistsError):
        admin.create_topic("readings", 2)
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - 24 * HOUR_MS
    with Producer() as producer:  # one reading per hour over the last day
        for hour in range(24):
            producer.send(
                "readings",
                b"reading %d" % hour,
                key=b"sensor-1",
                timestamp_ms=start_ms + hour * HOUR_MS,
            )
    since_ms = now_ms - 6 * HOUR_MS
    partitions = [TopicPartition("readings", p) for p in range(2)]
    with Consumer() as consumer:  # no group: partitions assigned by hand
        consumer.assign(partitions)
        consumer.seek_to_timestamp(since_ms)
        replayed = []
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            if not batch:
                break
            replayed += batch
    recent = [r for r in replayed if r.timestamp_ms >= since_ms]
    print(f"replayed {len(replayed)} readings from the last 6 hours")
    if len(recent) < 6 or len(recent) != len(replayed):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
