"""NATS JetStream's side of bench/compare.py: a nats-server child on loopback with
JetStream on (`-js`, file storage in the work directory, the server's default sync
policy), and every workload with nats-py (asyncio; each object runs its own event loop):

- produce: js.publish_async of each record (at most the client's default 4,000 awaiting
  their acks), then publish_async_completed.
- consume from the beginning: an ordered push consumer (js.subscribe(ordered_consumer=True),
  flow control, no acks) with a callback counting messages.
- group consume: a durable pull consumer (explicit acks), fetch(BATCH_RECORDS) and ack()
  of every message, the acks flushed before the clock stops. Its max_ack_pending is
  raised from the server's default (1,000) to PULL_ACK_PENDING_MAX, so that several
  members each hold a whole batch.
- latency: js.publish_async of one record at a time; an ordered push consumer receives.

One stream per benchmark stream, subject `<stream>.v`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from _common import LOOPBACK
from compare_common import BATCH_RECORDS, LatencyLog, LatencyPlan, ServerProcess, stamp
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType

T = TypeVar("T")
# A fetch that gets nothing for this long finds the stream drained (the next batch, when
# there is one, answers within a millisecond).
FETCH_TIMEOUT_S = 1.0
# Unacknowledged messages a durable pull consumer lets out: 4 members x 1 batch each, twice.
PULL_ACK_PENDING_MAX = 8 * BATCH_RECORDS
# Seconds for a JetStream API call (create a stream, a consumer...).
API_TIMEOUT_S = 10.0
# The latency consumer checks its deadline this often.
WAIT_STEP_S = 0.2


def _subject(stream: str) -> str:
    return f"{stream}.v"


def _url(address: str) -> str:
    return f"nats://{address}"


async def _connect(address: str) -> NatsClient:
    return await nats.connect(
        _url(address), connect_timeout=API_TIMEOUT_S, max_reconnect_attempts=0
    )


class _Loop:
    """A private event loop to run this module's coroutines from synchronous code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.close()


class NatsJetStream:
    name = "nats"
    label = "NATS JetStream"
    fills_after_join = False

    def __init__(self) -> None:
        self._server: ServerProcess | None = None
        self._loop: _Loop | None = None
        self._nc: NatsClient | None = None
        self._version = "?"

    def describe(self) -> dict[str, str]:
        return {
            "server": f"nats-server {self._version} -js",
            "persistence": "JetStream file storage (server default sync), 1 replica",
            "client": f"nats-py {importlib.metadata.version('nats-py')}",
            "calls": (
                f"publish_async; ordered push consumer; durable pull consumer fetch("
                f"{BATCH_RECORDS}) + ack, max_ack_pending {PULL_ACK_PENDING_MAX}"
            ),
        }

    def start(self, work_dir: str) -> None:
        def command(port: int) -> list[str]:
            return [
                "nats-server",
                *("-js", "-sd", f"{work_dir}/nats", "-a", LOOPBACK, "-p", str(port)),
            ]

        def ready(port: int) -> bool:
            async def probe() -> bool:
                try:
                    nc = await _connect(f"{LOOPBACK}:{port}")
                except (OSError, nats.errors.Error, TimeoutError):
                    return False
                try:
                    await nc.jetstream().account_info()
                    return True
                except nats.errors.Error:
                    return False
                finally:
                    await nc.close()

            return asyncio.run(probe())

        self._server = ServerProcess("nats-server", command, ready, work_dir)
        self._server.start()
        self._loop = _Loop()
        self._nc = self._loop.run(_connect(self.address))
        v = self._nc.connected_server_version
        self._version = f"{v.major}.{v.minor}.{v.patch}"

    def stop(self) -> None:
        nc, self._nc = self._nc, None
        loop, self._loop = self._loop, None
        if loop is not None:
            if nc is not None:
                loop.run(nc.close())
            loop.close()
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

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None, "start() first"
        return self._loop.run(coro)

    def _js(self) -> Any:
        assert self._nc is not None, "start() first"
        return self._nc.jetstream(timeout=API_TIMEOUT_S)

    def create(self, stream: str) -> None:
        self._run(
            self._js().add_stream(
                name=stream, subjects=[_subject(stream)], storage=StorageType.FILE
            )
        )

    def delete(self, stream: str) -> None:
        self._run(self._js().delete_stream(stream))

    def length(self, stream: str) -> int:
        info = self._run(self._js().stream_info(stream))
        return int(info.state.messages)

    def group_end(self, stream: str) -> dict[str, int]:
        return {}  # a member stops when a message says none is pending, or a fetch times out

    def produce(
        self, stream: str, values: Sequence[bytes], records: int, spread: bool = False
    ) -> float:
        js = self._js()
        subject = _subject(stream)
        mask = len(values) - 1

        async def run() -> float:
            publish = js.publish_async
            started = time.perf_counter()
            for i in range(records):
                await publish(subject, values[i & mask])
            await js.publish_async_completed()
            return time.perf_counter() - started

        return self._run(run())

    def consume(self, stream: str, records: int, deadline_s: float) -> tuple[int, float]:
        js = self._js()
        seen = 0

        async def run() -> float:
            done = asyncio.Event()

            async def on_message(_msg: Msg) -> None:
                nonlocal seen
                seen += 1
                if seen >= records:
                    done.set()

            started = time.perf_counter()
            sub = await js.subscribe(
                _subject(stream),
                cb=on_message,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
            )
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), max(0.0, deadline_s - time.monotonic()))
                return time.perf_counter() - started
            finally:
                await sub.unsubscribe()

        seconds = self._run(run())
        return seen, seconds

    def group_create(self, stream: str, group: str, members: int) -> None:
        config = ConsumerConfig(
            durable_name=group,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=PULL_ACK_PENDING_MAX,
            filter_subject=_subject(stream),
        )
        self._run(self._js().add_consumer(stream, config=config))

    def send_latency(self, stream: str, plan: LatencyPlan, deadline_s: float) -> int:
        js = self._js()
        subject = _subject(stream)

        async def run() -> int:
            start_ns = time.monotonic_ns()
            sent = plan.total
            for seq in range(plan.total):
                wait_ns = plan.due_ns(start_ns, seq) - time.monotonic_ns()
                if wait_ns > 0:
                    await asyncio.sleep(wait_ns / 1e9)
                if time.monotonic() > deadline_s:
                    sent = seq
                    break
                await js.publish_async(subject, stamp(seq, plan.value_bytes))
            await js.publish_async_completed()
            return sent

        return self._run(run())


class Member:
    """A subscriber bound to the group's durable pull consumer."""

    def __init__(self, address: str, stream: str, group: str, name: str) -> None:
        self._address = address
        self._stream = stream
        self._group = group
        self._loop = _Loop()
        self._nc: NatsClient | None = None
        self._sub: Any = None

    def join(self, members: int, deadline_s: float) -> None:
        """Connect and bind to the durable consumer (which group_create made)."""

        async def run() -> None:
            self._nc = await _connect(self._address)
            js = self._nc.jetstream(timeout=API_TIMEOUT_S)
            self._sub = await js.pull_subscribe_bind(durable=self._group, stream=self._stream)

        self._loop.run(run())

    def drain(self, end: Mapping[str, int], deadline_s: float) -> tuple[int, int]:
        if self._sub is None:
            self.join(1, deadline_s)
        sub, nc = self._sub, self._nc
        assert nc is not None

        async def run() -> tuple[int, int]:
            seen, last_ns = 0, time.monotonic_ns()
            while time.monotonic() < deadline_s:
                try:
                    msgs = await sub.fetch(BATCH_RECORDS, timeout=FETCH_TIMEOUT_S)
                except TimeoutError:
                    break
                for msg in msgs:
                    await msg.ack()
                await nc.flush()  # the acks are on the server: the batch is "committed"
                last_ns = time.monotonic_ns()
                seen += len(msgs)
                if msgs[-1].metadata.num_pending == 0:
                    break
            return seen, last_ns

        return self._loop.run(run())

    def close(self) -> None:
        if self._nc is not None:
            self._loop.run(self._nc.close())
        self._loop.close()


def receive_latency(
    address: str, stream: str, plan: LatencyPlan, ready: Callable[[], None], deadline_s: float
) -> LatencyLog:
    """An ordered push consumer of the (empty) stream, until every planned record arrived."""
    log = LatencyLog(plan)

    async def run() -> None:
        nc = await _connect(address)
        done = asyncio.Event()

        async def on_message(msg: Msg) -> None:
            log.add(msg.data, time.monotonic_ns())
            if log.done:
                done.set()

        try:
            js = nc.jetstream(timeout=API_TIMEOUT_S)
            sub = await js.subscribe(
                _subject(stream),
                cb=on_message,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
            )
            ready()
            while not done.is_set() and time.monotonic() < deadline_s:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), WAIT_STEP_S)
            await sub.unsubscribe()
        finally:
            await nc.close()

    loop = _Loop()
    try:
        loop.run(run())
    finally:
        loop.close()
    return log
