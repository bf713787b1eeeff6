"""Live analytics: per-key counts over one-second tumbling windows of a stream.

A consumer starting at the log end follows new events as they arrive; each event falls into
the window of its timestamp, and a window is printed once the stream has moved past it.

    python examples/live_analytics.py
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter

from stream import Admin, AlreadyExistsError, Consumer, Producer

WINDOW_MS = 1000
EVENTS = 600
RATE_PER_S = 300
DEADLINE_S = 30.0


def produce(stop: threading.Event) -> None:
    with Producer(linger_ms=1) as producer:
        for i in range(EVENTS):
            if stop.is_set():
                return
            producer.send("clicks", b"click", key=[b"home", b"search", b"cart"][i % 3])
            time.sleep(1 / RATE_PER_S)


def main() -> None:
    with Admin() as admin, contextlib.suppress(AlreadyExistsError):
        admin.create_topic("clicks", 3)
    windows: dict[int, Counter[bytes]] = {}
    counted = 0
    with Consumer(topics=["clicks"], group="analytics", auto_offset_reset="latest") as consumer:
        consumer.poll(timeout_ms=1000)  # join and take the log end as the start
        stop = threading.Event()
        producer = threading.Thread(target=produce, args=(stop,))
        producer.start()
        deadline = time.monotonic() + DEADLINE_S
        while counted < EVENTS and time.monotonic() < deadline:
            for record in consumer.poll(timeout_ms=200):
                window = record.timestamp_ms // WINDOW_MS * WINDOW_MS
                windows.setdefault(window, Counter())[record.key or b""] += 1
                counted += 1
            newest = max(windows, default=0)
            for window in sorted(w for w in windows if w < newest):
                counts = windows.pop(window)
                print(time.strftime("%H:%M:%S", time.localtime(window / 1000)), dict(counts))
        stop.set()
        producer.join()
    for window, counts in sorted(windows.items()):
        print(time.strftime("%H:%M:%S", time.localtime(window / 1000)), dict(counts))
    print(f"counted {counted} of {EVENTS} events")
    if counted != EVENTS:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
