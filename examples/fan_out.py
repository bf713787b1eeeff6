"""Fan-out (publish/subscribe): two independent groups each receive every record of a topic.

A group's members share the partitions; different groups do not share anything, each keeps
its own committed offsets. Here "billing" and "audit" both read all the orders.

    python examples/fan_out.py
"""

from __future__ import annotations

import contextlib
import time

from stream import Admin, AlreadyExistsError, Consumer, Producer

ORDERS = 100
DEADLINE_S = 30.0


def read_all(group: str, expected: int) -> list[bytes]:
    seen: list[bytes] = []
    deadline = time.monotonic() + DEADLINE_S
    with Consumer(group=group, topics=["orders"], auto_offset_reset="earliest") as consumer:
        while len(seen) < expected and time.monotonic() < deadline:
            seen += [r.value or b"" for r in consumer.poll(timeout_ms=200)]
        consumer.commit()
    return seen


def main() -> None:
    with Admin() as admin, contextlib.suppress(AlreadyExistsError):
        admin.create_topic("orders", 3)
    with Producer() as producer:
        for i in range(ORDERS):
            producer.send("orders", b"order %d" % i, key=b"customer-%d" % (i % 7))
    billing = read_all("billing", ORDERS)
    audit = read_all("audit", ORDERS)
    print(f"billing saw {len(billing)} orders, audit saw {len(audit)}")
    if sorted(billing) != sorted(audit) or len(billing) < ORDERS:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
