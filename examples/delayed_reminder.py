"""Delayed delivery: a reminder that a share group hands out no earlier than it is due.

A record with the header "riverlog-deliver-at" (ASCII decimal milliseconds since the Unix
epoch) is appended at once, like any other, but a share group does not hand it out before
that time. It does not hold up the records behind it: a reminder due now, produced after the
delayed one, is delivered first. (Plain consumers and consumer groups ignore the header.)

    python examples/delayed_reminder.py    (a broker on $RIVERLOG_SERVER or 127.0.0.1:7171)
"""

from __future__ import annotations

import contextlib
import time

from stream import DELIVER_AT_HEADER, Admin, AlreadyExistsError, Producer, ShareConsumer

TOPIC = "reminders"
GROUP = "reminder-senders"
DELAY_MS = 600  # short, so that the example (and its test) stays quick
DEADLINE_S = 20.0
# (text, due this long after it is sent); the delayed one is produced first.
REMINDERS = [("stand-up in 10 minutes", DELAY_MS), ("coffee is ready", 0)]


def clock(ms: int) -> str:
    """Wall-clock time of day with milliseconds."""
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


def main() -> None:
    with Admin() as admin, contextlib.suppress(AlreadyExistsError):
        admin.create_topic(TOPIC, 1)
    sent_ms = int(time.time() * 1000)
    due_ms = {text: sent_ms + delay_ms for text, delay_ms in REMINDERS}
    with Producer() as producer:
        for text, delay_ms in REMINDERS:
            # No header: due at once.
            headers = [(DELIVER_AT_HEADER, str(due_ms[text]).encode())] if delay_ms else []
            producer.send(TOPIC, text.encode(), headers=headers)
    print(f"sent at {clock(sent_ms)}")

    delivered: list[tuple[str, int]] = []
    with ShareConsumer(group=GROUP, topics=[TOPIC], start="earliest") as consumer:
        deadline = time.monotonic() + DEADLINE_S
        while len(delivered) < len(due_ms) and time.monotonic() < deadline:
            for record in consumer.poll(timeout_ms=500):
                now_ms = int(time.time() * 1000)
                text = (record.value or b"").decode()
                consumer.ack(record)
                delivered.append((text, now_ms))
                late_ms = now_ms - due_ms[text]
                print(
                    f"{text!r}: due {clock(due_ms[text])}, delivered {clock(now_ms)} "
                    f"({late_ms} ms after due)"
                )
        consumer.commit()
    order = [text for text, _ms in delivered]
    early = [text for text, ms in delivered if ms < due_ms[text]]
    if order != [text for text, _delay in reversed(REMINDERS)] or early:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
