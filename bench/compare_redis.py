"""Redis Streams' side of bench/compare.py: a redis-server child on loopback with the
append-only file on (`appendonly yes`, `appendfsync everysec`; RDB snapshots off, so the
only persistence is the AOF), and every workload with redis-py over hiredis, in the
fastest usual calls:

- produce: XADD of one field per record, pipelined (no transaction) BATCH_RECORDS at a time.
- consume from the beginning: XREAD COUNT BATCH_RECORDS from the last id read.
- group consume: XREADGROUP COUNT BATCH_RECORDS ">", and the XACK of the batch just read
  pipelined with the next XREADGROUP (one round trip per batch).
- latency: one XADD per record; the consumer blocks in XREAD BLOCK from the last id read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis
import redis.utils
from _common import LOOPBACK
from compare_common import BATCH_RECORDS, LatencyLog, LatencyPlan, ServerProcess, send_paced

FIELD = b"v"
# XREAD BLOCK of the latency consumer: it loops (and checks its deadline) this often.
BLOCK_MS = 200
SERVER_SETTINGS = ("--appendonly", "yes", "--appendfsync", "everysec", "--save", "")


def _client(address: str) -> redis.Redis:
    host, port = address.rsplit(":", 1)
    return redis.Redis(host=host, port=int(port), protocol=2)


def _entries(reply: Any) -> list[Any]:
    """The entries of the one stream an XREAD / XREADGROUP reply names ([] when none)."""
    if not reply:
        return []
    entries: list[Any] = reply[0][1]
    return entries


class RedisStreams:
    name = "redis"
    label = "Redis Streams"
    fills_after_join = False

    def __init__(self) -> None:
        self._server: ServerProcess | None = None
        self._r: redis.Redis | None = None
        self._version = "?"

    def describe(self) -> dict[str, str]:
        return {
            "server": f"redis-server {self._version}",
            "persistence": "appendonly yes, appendfsync everysec, save '' (AOF only)",
            "client": f"redis-py {redis.__version__}, hiredis "
            + ("yes" if redis.utils.HIREDIS_AVAILABLE else "NOT INSTALLED (pure-Python parser)"),
            "calls": f"pipelined XADD, XREAD, XREADGROUP + XACK, {BATCH_RECORDS} per batch",
        }

    def start(self, work_dir: str) -> None:
        def command(port: int) -> list[str]:
            return [
                "redis-server",
                *("--port", str(port), "--bind", LOOPBACK, "--dir", work_dir),
                *("--daemonize", "no", "--protected-mode", "yes"),
                *SERVER_SETTINGS,
            ]

        def ready(port: int) -> bool:
            try:
                return bool(_client(f"{LOOPBACK}:{port}").ping())
            except redis.exceptions.RedisError:
                return False

        self._server = ServerProcess("redis-server", command, ready, work_dir)
        self._server.start()
        self._r = _client(self.address)
        self._version = str(self._r.info("server").get("redis_version", "?"))

    def stop(self) -> None:
        r, self._r = self._r, None
        if r is not None:
            r.close()
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    @property
    def address(self) -> str:
        assert self._server is not None, "start() first"
        return f"{LOOPBACK}:{self._server.port}"

    @property
    def server_pid(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.pid

    def _redis(self) -> redis.Redis:
        assert self._r is not None, "start() first"
        return self._r

    def create(self, stream: str) -> None:
        """Nothing: XADD creates the stream."""

    def delete(self, stream: str) -> None:
        self._redis().delete(stream)

    def length(self, stream: str) -> int:
        return int(self._redis().xlen(stream))

    def group_end(self, stream: str) -> dict[str, int]:
        return {}  # a member stops at the first empty XREADGROUP: the stream is full by then

    def produce(
        self, stream: str, values: Sequence[bytes], records: int, spread: bool = False
    ) -> float:
        mask = len(values) - 1
        pipe = self._redis().pipeline(transaction=False)
        started = time.perf_counter()
        for start in range(0, records, BATCH_RECORDS):
            for i in range(start, min(start + BATCH_RECORDS, records)):
                pipe.xadd(stream, {FIELD: values[i & mask]})
            pipe.execute()
        return time.perf_counter() - started

    def consume(self, stream: str, records: int, deadline_s: float) -> tuple[int, float]:
        r = self._redis()
        seen, last = 0, b"0-0"
        started = time.perf_counter()
        while seen < records and time.monotonic() < deadline_s:
            entries = _entries(r.xread({stream: last}, count=BATCH_RECORDS))
            if not entries:
                break
            seen += len(entries)
            last = entries[-1][0]
        return seen, time.perf_counter() - started

    def group_create(self, stream: str, group: str, members: int) -> None:
        self._redis().xgroup_create(stream, group, id="0")

    def send_latency(self, stream: str, plan: LatencyPlan, deadline_s: float) -> int:
        r = self._redis()

        def send(value: bytes) -> None:
            r.xadd(stream, {FIELD: value})

        return send_paced(plan, send, deadline_s)


class Member:
    """A consumer of a Redis consumer group: XREADGROUP, then XACK with the next read."""

    def __init__(self, address: str, stream: str, group: str, name: str) -> None:
        self._r = _client(address)
        self._stream = stream
        self._group = group
        self._name = name

    def join(self, members: int, deadline_s: float) -> None:
        """Connect; a Redis consumer joins its group with its first XREADGROUP."""
        self._r.ping()

    def drain(self, end: Mapping[str, int], deadline_s: float) -> tuple[int, int]:
        pipe = self._r.pipeline(transaction=False)
        stream, group = self._stream, self._group
        seen, last_ns = 0, time.monotonic_ns()
        ids: list[Any] = []
        while time.monotonic() < deadline_s:
            if ids:
                pipe.xack(stream, group, *ids)
            pipe.xreadgroup(group, self._name, {stream: ">"}, count=BATCH_RECORDS)
            answers = pipe.execute()
            if ids:
                last_ns = time.monotonic_ns()
            entries = _entries(answers[-1])
            if not entries:
                break
            ids = [entry[0] for entry in entries]
            seen += len(ids)
        return seen, last_ns

    def close(self) -> None:
        self._r.close()


def receive_latency(
    address: str, stream: str, plan: LatencyPlan, ready: Callable[[], None], deadline_s: float
) -> LatencyLog:
    """XREAD BLOCK from the (empty) stream's start until every planned record arrived."""
    r = _client(address)
    log = LatencyLog(plan)
    last = b"0-0"
    r.ping()
    ready()
    while not log.done and time.monotonic() < deadline_s:
        entries = _entries(r.xread({stream: last}, count=BATCH_RECORDS, block=BLOCK_MS))
        now = time.monotonic_ns()
        for _id, fields in entries:
            log.add(fields[FIELD], now)
        if entries:
            last = entries[-1][0]
    r.close()
    return log
