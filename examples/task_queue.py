"""A task queue: three workers in one consumer group share the tasks; failures are retried.

Each task is a record; a worker that fails a task sends it back with an `attempt` header one
higher, and after three attempts to a dead-letter topic. Workers commit after they process,
so a worker that dies mid-task leaves it to the others (at-least-once).

    python examples/task_queue.py          (a broker on $RIVERLOG_SERVER or 127.0.0.1:7171)
"""

from __future__ import annotations

import contextlib
import threading
import zlib

from stream import Admin, AlreadyExistsError, Consumer, Producer

TASKS = 60
ATTEMPTS_MAX = 3
DEADLINE_S = 60.0


def ensure_topic(admin: Admin, name: str, partitions: int) -> None:
    with contextlib.suppress(AlreadyExistsError):
        admin.create_topic(name, partitions)


def fails(task: bytes, attempt: int) -> bool:
    """A deterministic flaky task: some fail once or twice, a few always."""
    return zlib.crc32(task) % (attempt + 2) == 0


def worker(name: str, done: dict[str, str], lock: threading.Lock, stop: threading.Event) -> None:
    with (
        Consumer(group="task-workers", topics=["tasks"], auto_offset_reset="earliest") as tasks,
        Producer() as retries,
    ):
        while not stop.is_set():
            for record in tasks.poll(timeout_ms=200):
                attempt = int(dict(record.headers).get("attempt") or b"0")
                assert record.value is not None
                if not fails(record.value, attempt):
                    with lock:
                        done[record.value.decode()] = f"{name} (attempt {attempt + 1})"
                elif attempt + 1 < ATTEMPTS_MAX:
                    retries.send(
                        "tasks", record.value, headers=[("attempt", b"%d" % (attempt + 1))]
                    )
                else:
                    retries.send("tasks.dead", record.value)
                    with lock:
                        done[record.value.decode()] = "dead-lettered"
            retries.flush()
            tasks.commit()


def main() -> None:
    with Admin() as admin:
        ensure_topic(admin, "tasks", 6)
        ensure_topic(admin, "tasks.dead", 1)
    names = [f"task-{i}" for i in range(TASKS)]
    with Producer() as producer:
        for name in names:
            producer.send("tasks", name.encode(), key=name.encode())
    done: dict[str, str] = {}
    lock = threading.Lock()
    stop = threading.Event()
    workers = [
        threading.Thread(target=worker, args=(f"worker-{i}", done, lock, stop)) for i in range(3)
    ]
    for w in workers:
        w.start()
    finished = threading.Event()

    def watch() -> None:
        while not stop.wait(0.1):
            with lock:
                if all(n in done for n in names):
                    finished.set()
                    stop.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    finished.wait(DEADLINE_S)
    stop.set()
    for t in [*workers, watcher]:
        t.join()
    by_outcome: dict[str, int] = {}
    for outcome in done.values():
        key = outcome.split(" ", 1)[1] if outcome.startswith("worker") else outcome
        by_outcome[key] = by_outcome.get(key, 0) + 1
    print(f"{len(done)} of {TASKS} tasks settled: {dict(sorted(by_outcome.items()))}")
    if len(done) != TASKS:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
