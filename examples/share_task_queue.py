"""A task queue on a share group: 8 worker processes share a topic of only 2 partitions.

A consumer group gives each partition to one member, so at most 2 of 8 workers would have
work here. A share group hands out records, not partitions: every worker takes the next
available task from either partition, acknowledges it when done, and a slow task holds up
no other. Each worker asks for one task at a time (max_records=1), so it holds only what it
is working on and the tasks spread evenly.

    python examples/share_task_queue.py    (a broker on $RIVERLOG_SERVER or 127.0.0.1:7171)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import time
from collections import Counter
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event

from stream import Admin, AlreadyExistsError, Producer, ShareConsumer, ShareRecord

TOPIC = "share-tasks"
PARTITIONS = 2
GROUP = "share-task-workers"
WORKERS = 8
TASKS = 64
TASK_S = 0.05  # each task "calls a slow service" for 50 ms
DEADLINE_S = 30.0


def worker(name: str, ready: Barrier, stop: Event, done: Queue[tuple[str, str, int]]) -> None:
    """One member of the share group: take a task, do it, acknowledge it; until told to stop."""

    def work(records: list[ShareRecord]) -> None:
        for record in records:
            time.sleep(TASK_S)
            consumer.ack(record)  # sent with the next poll (or by close)
            done.put((name, (record.value or b"").decode(), record.partition))

    with ShareConsumer(group=GROUP, topics=[TOPIC], start="earliest", max_records=1) as consumer:
        while not consumer.member_id:  # join before the tasks exist, so that all start together
            work(consumer.poll(timeout_ms=100))
        ready.wait(DEADLINE_S)
        while not stop.is_set():
            work(consumer.poll(timeout_ms=100))
    # close() sent the last acknowledgement and left the group.


def main() -> None:
    with Admin() as admin, contextlib.suppress(AlreadyExistsError):
        admin.create_topic(TOPIC, PARTITIONS)
    # Separate processes that share nothing but the broker. They fork from a server process
    # that imported the client once, so each starts in milliseconds, and none inherits a gRPC
    # channel (this process has some: gRPC does not survive a fork of a process using it).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["stream"])
    ready = context.Barrier(WORKERS + 1)
    stop = context.Event()
    done: Queue[tuple[str, str, int]] = context.Queue()
    workers = [
        context.Process(target=worker, args=(f"worker-{i}", ready, stop, done))
        for i in range(WORKERS)
    ]
    for w in workers:
        w.start()
    try:
        ready.wait(DEADLINE_S)  # every worker has joined the group
        started = time.monotonic()
        tasks = {f"task-{i}" for i in range(TASKS)}
        with Producer() as producer:
            for task in sorted(tasks):
                producer.send(TOPIC, task.encode(), key=task.encode())
        by_worker: Counter[str] = Counter()
        partitions: dict[str, set[int]] = {}  # the partitions each worker took tasks from
        finished: set[str] = set()
        while not tasks <= finished and time.monotonic() < started + DEADLINE_S:
            with contextlib.suppress(queue.Empty):
                name, task, partition = done.get(timeout=0.1)
                by_worker[name] += 1
                partitions.setdefault(name, set()).add(partition)
                finished.add(task)
        elapsed_s = time.monotonic() - started
    finally:
        stop.set()
        stop_by = time.monotonic() + DEADLINE_S
        for w in workers:
            w.join(max(0.0, stop_by - time.monotonic()))
            if w.is_alive():
                w.terminate()
    print(
        f"{len(tasks & finished)} of {TASKS} tasks done in {elapsed_s:.2f} s "
        f"(one worker alone: {TASKS * TASK_S:.1f} s)"
    )
    print(f"tasks done per worker ({WORKERS} workers, {PARTITIONS} partitions):")
    for name in (f"worker-{i}" for i in range(WORKERS)):
        taken = ", ".join(str(p) for p in sorted(partitions.get(name, ())))
        print(f"  {name}: {by_worker[name]} tasks (from partitions {taken})")
    busy = sum(1 for count in by_worker.values() if count)
    print(f"{busy} of {WORKERS} workers were busy")
    if not tasks <= finished or busy != WORKERS:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
