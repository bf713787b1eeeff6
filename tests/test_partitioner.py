"""Kafka's murmur2 partitioner: pinned values from Kafka's own tests, and kafka-python as a peer."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from stream._partitioner import murmur2, partition_for_key

# org.apache.kafka.common.utils.UtilsTest.testMurmur2 (signed 32-bit, as Java returns it).
KAFKA_MURMUR2 = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]

# kafka-python's test_murmur2_java_compatibility: the Java client's partition among 1000.
JAVA_PARTITION_OF_1000 = [
    (b"", 681),
    (b"a", 524),
    (b"ab", 434),
    (b"abc", 107),
    (b"123456789", 566),
    (b"\x00 ", 742),
]


def _kafka_python() -> tuple[Callable[[bytes], int], Any]:
    """kafka-python's murmur2 and DefaultPartitioner (some versions warn on import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from kafka.partitioner.default import DefaultPartitioner
        from kafka.partitioner.default import murmur2 as peer_murmur2
    return peer_murmur2, DefaultPartitioner()


class _FakeCluster:
    """The three methods of kafka-python's ClusterMetadata that its partitioner calls."""

    def __init__(self, topic: str, partitions: int) -> None:
        self._topic = topic
        self._partitions = set(range(partitions))

    def topics(self) -> set[str]:
        return {self._topic}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self._partitions

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self._partitions


@pytest.mark.parametrize(("key", "expected"), KAFKA_MURMUR2)
def test_murmur2_matches_kafka_utils_test(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected


@pytest.mark.parametrize(("key", "expected"), JAVA_PARTITION_OF_1000)
def test_partition_matches_the_java_client(key: bytes, expected: int) -> None:
    assert partition_for_key(key, 1000) == expected


def test_murmur2_is_signed_32_bit() -> None:
    rng = random.Random(7)
    for _ in range(500):
        h = murmur2(rng.randbytes(rng.randrange(0, 41)))
        assert -(2**31) <= h < 2**31


def test_murmur2_agrees_with_kafka_python_on_random_keys() -> None:
    peer_murmur2, _ = _kafka_python()
    rng = random.Random(20240601)
    for length in range(41):  # every tail length (0..3) many times over
        for _ in range(25):
            key = rng.randbytes(length)
            # kafka-python returns the same 32 bits unsigned.
            assert murmur2(key) & 0xFFFFFFFF == peer_murmur2(key), key


@pytest.mark.parametrize("partitions", [1, 2, 3, 7, 16, 100, 1024])
def test_partition_for_key_agrees_with_kafka_python_default_partitioner(partitions: int) -> None:
    peer_murmur2, partitioner = _kafka_python()
    cluster = _FakeCluster("t", partitions)
    rng = random.Random(partitions)
    for length in range(41):
        for _ in range(5):
            key = rng.randbytes(length)
            peer = partitioner.partition("t", key, key, b"v", b"v", cluster)
            assert partition_for_key(key, partitions) == peer, key
            assert peer == (peer_murmur2(key) & 0x7FFFFFFF) % partitions


def test_partition_for_key_is_in_range_and_stable() -> None:
    rng = random.Random(3)
    for _ in range(200):
        key = rng.randbytes(rng.randrange(0, 20))
        n = rng.randrange(1, 50)
        p = partition_for_key(key, n)
        assert 0 <= p < n
        assert partition_for_key(key, n) == p
