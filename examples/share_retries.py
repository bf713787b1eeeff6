"""Retries, backoff and a dead-letter topic with a share group.

A worker that cannot finish a task now RELEASEs it with the error: the broker hands it out
again (delivery_count + 1) once the group's retry backoff has passed, doubling per delivery
(retry_backoff_ms * 2^(n-1), at most retry_backoff_max_ms). A task released on its
max_delivery_attempts-th delivery is archived and produced to the group's dead-letter topic;
a task the worker REJECTs (it can never succeed) goes there at once. The broker adds the
riverlog-dlq-* headers that say where the record came from and why it gave up.

    python examples/share_retries.py       (a broker on $RIVERLOG_SERVER or 127.0.0.1:7171)
"""

from __future__ import annotations

import contextlib
import time

from stream import (
    DLQ_HEADERS,
    Admin,
    AlreadyExistsError,
    Consumer,
    Producer,
    ShareConsumer,
    TopicPartition,
)

TOPIC = "share-jobs"
DEAD_LETTERS = "share-jobs.dlq"
GROUP = "share-job-workers"
MAX_DELIVERY_ATTEMPTS = 4
RETRY_BACKOFF_MS = 100  # after delivery n: 100, 200, 400 ms (the cap below)
RETRY_BACKOFF_MAX_MS = 400
DEADLINE_S = 20.0


class RetriableError(Exception):
    """A failure that may pass: release the task, try again later."""


class PermanentError(Exception):
    """A failure that never passes: reject the task."""


def handle(job: str, delivery_count: int) -> None:
    """The work: "flaky" fails its first two deliveries, "poison" always fails, "malformed"
    can never be processed, the others succeed."""
    if job == "flaky" and delivery_count <= 2:
        raise RetriableError("upstream timed out")
    if job == "poison":
        raise RetriableError("upstream answered 500")
    if job == "malformed":
        raise PermanentError("not valid JSON")


def backoff_ms(delivery_count: int) -> int:
    """How long the broker keeps a task released after its `delivery_count`-th delivery."""
    return min(RETRY_BACKOFF_MS << (delivery_count - 1), RETRY_BACKOFF_MAX_MS)  # base * 2^(n-1)


def work(jobs: int) -> tuple[int, int]:
    """Work the jobs until each is done or dead-lettered: (jobs settled, redeliveries that
    came before their backoff had passed)."""
    print(
        f"max_delivery_attempts {MAX_DELIVERY_ATTEMPTS}, retry backoff {RETRY_BACKOFF_MS} ms "
        f"doubling up to {RETRY_BACKOFF_MAX_MS} ms"
    )
    settled: set[str] = set()
    early = 0
    last_seen_s: dict[str, float] = {}
    started = time.monotonic()
    with ShareConsumer(
        group=GROUP,
        topics=[TOPIC],
        start="earliest",
        max_delivery_attempts=MAX_DELIVERY_ATTEMPTS,
        retry_backoff_ms=RETRY_BACKOFF_MS,
        retry_backoff_max_ms=RETRY_BACKOFF_MAX_MS,
        dead_letter_topic=DEAD_LETTERS,
    ) as worker:
        print("    time  job        delivery  since last (backoff)  outcome")
        while len(settled) < jobs and time.monotonic() < started + DEADLINE_S:
            # Each poll also sends the acks, releases and rejects queued since the last one.
            for record in worker.poll(timeout_ms=500):
                now_s = time.monotonic()
                job = (record.value or b"").decode()
                since = ""
                if job in last_seen_s:
                    since_ms = (now_s - last_seen_s[job]) * 1000
                    wanted_ms = backoff_ms(record.delivery_count - 1)
                    since = f"{since_ms:.0f} ms ({wanted_ms} ms)"
                    early += since_ms < wanted_ms
                last_seen_s[job] = now_s
                try:
                    handle(job, record.delivery_count)
                except RetriableError as e:
                    worker.release(record, error=f"retriable: {e}")
                    outcome = f"released ({e})"
                    if record.delivery_count >= MAX_DELIVERY_ATTEMPTS:
                        outcome += ": the last attempt, dead-lettered"
                        settled.add(job)
                except PermanentError as e:
                    worker.reject(record, error=f"permanent: {e}")
                    outcome = f"rejected ({e}): dead-lettered"
                    settled.add(job)
                else:
                    worker.ack(record)
                    outcome = "done"
                    settled.add(job)
                at = f"{(now_s - started) * 1000:.0f} ms"
                print(f"{at:>8}  {job:<10} {record.delivery_count:>8}  {since:>20}  {outcome}")
        worker.commit()  # send what the loop queued last; durable when it returns
    return len(settled), early


def read_dead_letters(dlq: Consumer, expected: int) -> list[str]:
    """The values of the next `expected` dead letters; prints their riverlog-dlq-* headers."""
    print(f"dead-letter topic {DEAD_LETTERS}:")
    dead: list[str] = []
    deadline = time.monotonic() + DEADLINE_S
    while len(dead) < expected and time.monotonic() < deadline:
        for record in dlq.poll(timeout_ms=500):
            dead.append((record.value or b"").decode())
            print(f"  {dead[-1]}")
            for key, value in record.headers:
                if key in DLQ_HEADERS:
                    print(f"    {key}: {(value or b'').decode()}")
    return dead


def main() -> None:
    with Admin() as admin:
        for name in (TOPIC, DEAD_LETTERS):
            with contextlib.suppress(AlreadyExistsError):
                admin.create_topic(name, 1)
    with Consumer() as dlq:  # no group: reads the dead-letter topic from its current end
        dlq.assign([TopicPartition(DEAD_LETTERS, 0)])
        dlq.seek_to_end()
        jobs = ["ok", "flaky", "poison", "malformed"]
        with Producer() as producer:
            for job in jobs:
                producer.send(TOPIC, job.encode())
        settled, early = work(len(jobs))
        dead = read_dead_letters(dlq, 2)
    if settled != len(jobs) or early or sorted(dead) != ["malformed", "poison"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
