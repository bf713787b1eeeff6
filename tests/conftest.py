"""Shared fixtures: a real broker on loopback (ephemeral port, tmp data dir) and a channel to it."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from storage import LogConfig
from stream import _broker
from stream._broker import BrokerConfig
from stream._serve import RunningBroker, ServeConfig

# Small segments so that integration tests cross segment rolls with little data.
TEST_SEGMENT_BYTES = 64 * 1024
# Bounds every stop(): an in-flight stream that ignores shutdown cannot stall the suite.
TEST_SHUTDOWN_GRACE_S = 1.0


@pytest.fixture
def running_broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A started RunningBroker on 127.0.0.1:<ephemeral> with its data in `tmp_path`."""
    config = ServeConfig(
        broker=BrokerConfig(
            data_dir=tmp_path / "data",
            log=LogConfig(segment_bytes=TEST_SEGMENT_BYTES, index_interval_bytes=1024),
        ),
        listen="127.0.0.1:0",
        workers=16,
        shutdown_grace_s=TEST_SHUTDOWN_GRACE_S,
    )
    running = RunningBroker(config)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def channel(running_broker: RunningBroker) -> Iterator[grpc.Channel]:
    """An insecure channel to `running_broker`, ready before the test starts."""
    with grpc.insecure_channel(running_broker.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


@pytest.fixture
def reader_waiting(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event set when a reader (long-poll fetch, subscribe) registers to be woken by an
    append: a test appends after it, so the reader provably waited for that append."""
    watching = threading.Event()
    original = _broker._Partition.watch

    def watch(self: _broker._Partition, event: threading.Event) -> None:
        original(self, event)
        watching.set()

    monkeypatch.setattr(_broker._Partition, "watch", watch)
    return watching


# ---------------------------------------------------------------------------- reliability
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the long forms of tests/reliability (more kills, seeds, requests); local only",
    )
    parser.addoption(
        "--seed",
        type=int,
        default=None,
        help="seed of the randomized reliability tests (default: a fixed one per test)",
    )


@pytest.fixture
def long_run(request: pytest.FixtureRequest) -> bool:
    """True under --long: reliability tests scale their counts up."""
    return bool(request.config.getoption("--long"))


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The seed of a randomized test: --seed, else a fixed one derived from the test's name.
    Printed, so a failing run can be replayed with --seed."""
    given = request.config.getoption("--seed")
    value = int(given) if given is not None else zlib.crc32(request.node.name.encode())
    print(f"\n{request.node.nodeid}: seed {value} (replay with --seed {value})")
    return value
