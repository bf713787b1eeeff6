"""The producer against a real broker on loopback (and, for stalls and broken streams, a fake
gRPC server that answers the way a test needs): offsets, partitioning, codecs, acks, bounds,
errors on the futures, retries, and the sync facade's threads."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures as cf
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage import Compression, Record, decode_records, iter_batches
from stream._partitioner import partition_for_key
from stream._pb import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc, types_pb2
from stream._serve import RunningBroker
from stream.client._base import (
    BufferFullError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    RecordMetadata,
    ResourceExhaustedError,
    RiverlogError,
    UnavailableError,
)
from stream.client._producer import (
    AsyncProducer,
    Producer,
    _Batch,
    _partitions_for_keys,
    _RecordFuture,
    _settle,
    _Topic,
)

# Upper bound on any wait in this file.
WAIT_S = 10.0
VALUE = b"v" * 100


# ---------------------------------------------------------------------------- helpers
@pytest.fixture
def admin(channel: grpc.Channel) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(channel)


@pytest.fixture
def broker(channel: grpc.Channel) -> broker_pb2_grpc.BrokerStub:
    return broker_pb2_grpc.BrokerStub(channel)


def create(admin: admin_pb2_grpc.AdminStub, name: str, partitions: int = 1, **config: str) -> None:
    admin.CreateTopic(
        admin_pb2.CreateTopicRequest(name=name, partitions=partitions, config=config),
        timeout=WAIT_S,
    )


def fetch_bytes(broker: broker_pb2_grpc.BrokerStub, topic: str, partition: int) -> bytes:
    """Every stored batch of the partition, back to back."""
    out: list[bytes] = []
    offset = 0
    for _ in range(1000):
        request = broker_pb2.FetchRequest(
            partitions=[broker_pb2.FetchPartition(topic=topic, partition=partition, offset=offset)]
        )
        [result] = broker.Fetch(request, timeout=WAIT_S).results
        if not result.record_batches:
            return b"".join(out)
        out.append(result.record_batches)
        offset = decode_records(result.record_batches)[-1].offset + 1
    raise AssertionError("fetch loop did not reach the log end")


def fetch(broker: broker_pb2_grpc.BrokerStub, topic: str, partition: int = 0) -> list[Record]:
    return decode_records(fetch_bytes(broker, topic, partition))


def results(pending: list[cf.Future[RecordMetadata]]) -> list[RecordMetadata]:
    return [f.result(WAIT_S) for f in pending]


# ---------------------------------------------------------------------------- offsets
def test_send_offsets_match_what_fetch_returns(
    running_broker: RunningBroker,
    admin: admin_pb2_grpc.AdminStub,
    broker: broker_pb2_grpc.BrokerStub,
) -> None:
    create(admin, "events")
    headers = [("trace", b"t1"), ("empty", None)]
    with Producer(running_broker.address, linger_ms=1) as producer:
        pending = [
            producer.send("events", b"value-%d" % i, key=b"k%d" % (i % 3), headers=headers)
            for i in range(50)
        ]
        pending.append(producer.send("events", None, timestamp_ms=1_700_000_000_000))
        landed = results(pending)
    assert [m.offset for m in landed] == list(range(51))
    assert {(m.topic, m.partition) for m in landed} == {("events", 0)}
    stored = fetch(broker, "events")
    assert [r.offset for r in stored] == [m.offset for m in landed]
    assert [r.timestamp_ms for r in stored] == [m.timestamp_ms for m in landed]
    assert [r.value for r in stored[:50]] == [b"value-%d" % i for i in range(50)]
    assert stored[7].key == b"k1"
    assert stored[7].headers == (("trace", b"t1"), ("empty", None))
    assert (stored[50].key, stored[50].value, stored[50].timestamp_ms) == (
        None,
        None,
        1_700_000_000_000,
    )


def test_keyed_records_land_on_partition_for_key(
    running_broker: RunningBroker,
    admin: admin_pb2_grpc.AdminStub,
    broker: broker_pb2_grpc.BrokerStub,
) -> None:
    create(admin, "keyed", partitions=5)
    keys = [b"user-%d" % i for i in range(40)]
    with Producer(running_broker.address) as producer:
        landed = results([producer.send("keyed", VALUE, key=key) for key in keys])
    for key, meta in zip(keys, landed, strict=True):
        assert meta.partition == partition_for_key(key, 5)
    for partition in range(5):
        stored = fetch(broker, "keyed", partition)
        expected = [k for k in keys if partition_for_key(k, 5) == partition]
        assert [r.key for r in stored] == expected


@given(
    keys=st.lists(st.binary(max_size=24), max_size=60)
    | st.lists(st.binary(min_size=10, max_size=10), max_size=60),
    partitions=st.integers(1, 1000),
)
def test_murmur2_in_bulk_is_partition_for_key(keys: list[bytes], partitions: int) -> None:
    bulk = _partitions_for_keys(keys, partitions).tolist()
    assert bulk == [partition_for_key(k, partitions) for k in keys]


def test_mixed_records_keep_their_order_per_key(
    running_broker: RunningBroker,
    admin: admin_pb2_grpc.AdminStub,
    broker: broker_pb2_grpc.BrokerStub,
) -> None:
    create(admin, "mixed", partitions=3)
    create(admin, "single")
    sent: list[tuple[bytes | None, bytes, int | None]] = []
    for i in range(600):
        key = None if i % 3 == 0 else b"key-%d" % (i % 7)
        partition = 2 if i % 10 == 0 else None
        sent.append((key, b"%d" % i, partition))
    with Producer(running_broker.address, batch_bytes=2_000) as producer:
        pending = [producer.send("mixed", v, key=k, partition=p) for k, v, p in sent]
        single = [producer.send("single", b"%d" % i, key=b"k%d" % i) for i in range(50)]
        landed = results(pending)
        assert [m.offset for m in results(single)] == list(range(50))
    for (key, _value, partition), meta in zip(sent, landed, strict=True):
        if partition is not None:
            assert meta.partition == partition
        elif key is not None:
            assert meta.partition == partition_for_key(key, 3)
    stored = {p: fetch(broker, "mixed", p) for p in range(3)}
    assert sum(len(records) for records in stored.values()) == 600
    for meta, (_key, value, _p) in zip(landed, sent, strict=True):
        assert stored[meta.partition][meta.offset].value == value
    for key in {k for k, _v, p in sent if k is not None and p is None}:
        partition = partition_for_key(key, 3)
        values = [r.value for r in stored[partition] if r.key == key]
        expected = [v for k, v, p in sent if k == key and p is None]
        assert [v for v in values if v in expected] == expected  # send order, per key


def test_keyless_records_stick_to_a_partition_per_batch(
    running_broker: RunningBroker,
    admin: admin_pb2_grpc.AdminStub,
    broker: broker_pb2_grpc.BrokerStub,
) -> None:
    create(admin, "spread", partitions=4)
    # batch_bytes fits ten 100-byte records (plus 12 bytes of estimated overhead each).
    with Producer(running_broker.address, batch_bytes=1120, linger_ms=10_000) as producer:
        landed = results([producer.send("spread", VALUE) for _ in range(80)])
    runs: list[tuple[int, int]] = []  # (partition, records in a row)
    for meta in landed:
        if runs and runs[-1][0] == meta.partition:
            runs[-1] = (meta.partition, runs[-1][1] + 1)
        else:
            runs.append((meta.partition, 1))
    assert [count for _p, count in runs] == [10] * 8  # one partition per batch, then the next
    assert {p for p, _count in runs} == {0, 1, 2, 3}
    for partition in range(4):
        batches = list(iter_batches(fetch_bytes(broker, "spread", partition)))
        assert [len(records) for _header, records in batches] == [10, 10]


@pytest.mark.parametrize("codec", [None, "gzip", "lz4", "zstd"])
def test_every_codec_round_trips(
    codec: str | None,
    running_broker: RunningBroker,
    admin: admin_pb2_grpc.AdminStub,
    broker: broker_pb2_grpc.BrokerStub,
) -> None:
    create(admin, "codecs")
    values = [b"%d " % i * 20 for i in range(30)]
    with Producer(running_broker.address, compression=codec, linger_ms=10_000) as producer:
        pending = [producer.send("codecs", v, key=b"k") for v in values]
        producer.flush(WAIT_S)
        assert all(f.done() for f in pending)
    batches = list(iter_batches(fetch_bytes(broker, "codecs", 0)))
    assert len(batches) == 1
    header, records = batches[0]
    expected = Compression.NONE if codec is None else Compression[codec.upper()]
    assert header.compression == expected
    assert [r.value for r in records] == values


# ---------------------------------------------------------------------------- acks, flush, close
def test_flush_waits_for_every_answer(
    running_broker: RunningBroker, admin: admin_pb2_grpc.AdminStub
) -> None:
    create(admin, "flushed", partitions=3)
    with Producer(running_broker.address, linger_ms=60_000) as producer:
        pending = [producer.send("flushed", VALUE, key=b"%d" % i) for i in range(300)]
        time.sleep(0.05)
        assert not any(f.done() for f in pending)  # lingering: nothing sent yet
        refused: list[BaseException] = []

        def flush_from_callback(_f: cf.Future[RecordMetadata]) -> None:
            try:
                producer.flush()
            except RiverlogError as e:
                refused.append(e)

        pending[0].add_done_callback(flush_from_callback)
        producer.flush(WAIT_S)
        assert all(f.done() and f.exception() is None for f in pending)
        producer.flush()  # nothing queued: returns at once
        assert "own loop thread" in str(refused[0])  # would have deadlocked


def test_close_flushes(running_broker: RunningBroker, admin: admin_pb2_grpc.AdminStub) -> None:
    create(admin, "closed")
    producer = Producer(running_broker.address, linger_ms=60_000)
    pending = [producer.send("closed", VALUE) for _ in range(20)]
    producer.close()
    assert [f.result(0).offset for f in pending] == list(range(20))
    producer.close()  # idempotent
    with pytest.raises(RiverlogError, match="closed"):
        producer.send("closed", VALUE)


@pytest.mark.parametrize("acks", ["all", "none"])
def test_acks(
    acks: str,
    running_broker: RunningBroker,
    admin: admin_pb2_grpc.AdminStub,
    broker: broker_pb2_grpc.BrokerStub,
) -> None:
    create(admin, "acked")
    with Producer(running_broker.address, acks=acks) as producer:
        landed = results([producer.send("acked", b"%d" % i) for i in range(100)])
    expected = list(range(100)) if acks == "all" else [-1] * 100
    assert [m.offset for m in landed] == expected
    # close() waited for the broker to end the stream: every request was handled.
    assert [r.value for r in fetch(broker, "acked")] == [b"%d" % i for i in range(100)]


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="acks"):
        AsyncProducer("127.0.0.1:1", acks="some")
    with pytest.raises(InvalidArgumentError, match="max_in_flight"):
        AsyncProducer("127.0.0.1:1", max_in_flight=0)
    with pytest.raises(InvalidArgumentError, match="compression"):
        AsyncProducer("127.0.0.1:1", compression="snappy")


# ---------------------------------------------------------------------------- errors
def test_unknown_topic_and_partition_fail_the_future(
    running_broker: RunningBroker, admin: admin_pb2_grpc.AdminStub
) -> None:
    create(admin, "known", partitions=2)
    with Producer(running_broker.address) as producer:
        with pytest.raises(NotFoundError, match="nope"):
            producer.send("nope", VALUE).result(WAIT_S)
        with pytest.raises(NotFoundError, match="no partition 2"):
            producer.send("known", VALUE, partition=2).result(WAIT_S)
        with pytest.raises(InvalidArgumentError, match="negative"):
            producer.send("known", VALUE, timestamp_ms=-1).result(WAIT_S)
        with pytest.raises(TypeError, match="value must be bytes"):
            producer.send("known", "text")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="key must be bytes"):
            producer.send("known", VALUE, key="text")  # type: ignore[arg-type]
        assert producer.send("known", VALUE, partition=1).result(WAIT_S).partition == 1


def test_oversized_record_fails_alone(
    running_broker: RunningBroker, admin: admin_pb2_grpc.AdminStub
) -> None:
    create(admin, "big")
    with Producer(running_broker.address, linger_ms=50) as producer:
        before = [producer.send("big", VALUE) for _ in range(5)]
        huge = producer.send("big", b"x" * (1024 * 1024 + 1))
        after = [producer.send("big", VALUE) for _ in range(5)]
        with pytest.raises(ResourceExhaustedError, match="batch_bytes_max"):
            huge.result(WAIT_S)
        assert [m.offset for m in results(before + after)] == list(range(10))


def test_request_refused_whole_is_split_to_find_the_bad_batch(
    running_broker: RunningBroker, admin: admin_pb2_grpc.AdminStub
) -> None:
    # Both topics' batches travel in one request; the broker refuses it whole because one
    # batch is over its topic's limit. Only that batch's records fail.
    create(admin, "strict", batch_bytes_max="1024")
    create(admin, "lenient")
    with Producer(running_broker.address, linger_ms=60_000) as producer:
        learned = [producer.send("strict", VALUE), producer.send("lenient", VALUE)]
        producer.flush(WAIT_S)  # both topics known, one record each
        assert [m.offset for m in results(learned)] == [0, 0]
        strict = [producer.send("strict", VALUE) for _ in range(20)]
        lenient = [producer.send("lenient", VALUE) for _ in range(20)]
        producer.flush(WAIT_S)
    for future in strict:
        with pytest.raises(ResourceExhaustedError, match="batch_bytes_max 1024"):
            future.result(0)
    assert [m.offset for m in results(lenient)] == list(range(1, 21))


# ---------------------------------------------------------------------------- fake servers
class FakeBroker:
    """A gRPC server with DescribeTopic (one partition), InitProducer (producer id 1) and a
    ProduceStream that does what the test's `answer` says: return a response, None for no
    answer, or raise to end the stream."""

    def __init__(
        self,
        answer: Callable[[int, broker_pb2.ProduceRequest, grpc.ServicerContext], Any],
    ) -> None:
        self.requests: list[broker_pb2.ProduceRequest] = []
        self.streams = 0
        self.release = threading.Event()  # ends stalled handlers at shutdown
        self._answer = answer
        self.server = grpc.server(cf.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "riverlog.v1.Admin",
                    {
                        "DescribeTopic": grpc.unary_unary_rpc_method_handler(
                            self._describe,
                            request_deserializer=admin_pb2.DescribeTopicRequest.FromString,
                            response_serializer=admin_pb2.TopicDescription.SerializeToString,
                        )
                    },
                ),
                grpc.method_handlers_generic_handler(
                    "riverlog.v1.Broker",
                    {
                        "ProduceStream": grpc.stream_stream_rpc_method_handler(
                            self._produce_stream,
                            request_deserializer=broker_pb2.ProduceRequest.FromString,
                            response_serializer=broker_pb2.ProduceResponse.SerializeToString,
                        ),
                        "InitProducer": grpc.unary_unary_rpc_method_handler(
                            lambda request, context: broker_pb2.InitProducerResponse(
                                producer_id=1, producer_epoch=0
                            ),
                            request_deserializer=broker_pb2.InitProducerRequest.FromString,
                            response_serializer=broker_pb2.InitProducerResponse.SerializeToString,
                        ),
                    },
                ),
            )
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def _describe(
        self, request: admin_pb2.DescribeTopicRequest, context: grpc.ServicerContext
    ) -> admin_pb2.TopicDescription:
        return admin_pb2.TopicDescription(
            name=request.name, partitions=[admin_pb2.PartitionDescription(partition=0)]
        )

    def _produce_stream(
        self, requests: Iterator[broker_pb2.ProduceRequest], context: grpc.ServicerContext
    ) -> Iterator[broker_pb2.ProduceResponse]:
        self.streams += 1
        stream = self.streams
        for request in requests:
            self.requests.append(request)
            response = self._answer(stream, request, context)
            if response is not None:
                yield response

    def stop(self) -> None:
        self.release.set()
        self.server.stop(0)


def ok(request: broker_pb2.ProduceRequest, base_offset: int) -> broker_pb2.ProduceResponse:
    return broker_pb2.ProduceResponse(
        correlation_id=request.correlation_id,
        results=[
            broker_pb2.PartitionProduceResult(
                topic=e.topic, partition=e.partition, base_offset=base_offset
            )
            for e in request.partitions
        ],
    )


def test_full_buffer_blocks_then_raises(running_broker: RunningBroker) -> None:
    def stall(
        stream: int, request: broker_pb2.ProduceRequest, context: grpc.ServicerContext
    ) -> None:
        fake.release.wait(WAIT_S)  # never answers while the test runs

    fake = FakeBroker(stall)
    try:
        producer = Producer(
            fake.address,
            buffer_bytes_max=5_000,
            send_timeout_ms=300,
            request_timeout_ms=1_000,
            retries=0,
            linger_ms=0,
        )
        # 5,000 bytes hold 44 records of 112 (estimated) bytes: all sent, none answered.
        pending = [producer.send("t", VALUE) for _ in range(44)]
        started = time.monotonic()
        with pytest.raises(BufferFullError, match="buffer_bytes_max 5000"):
            producer.send("t", VALUE)
        assert time.monotonic() - started >= 0.3  # it waited send_timeout_ms for room
        with pytest.raises(BufferFullError, match="can never fit"):
            producer.send("t", b"x" * 6_000)
        # No answer within request_timeout_ms: every record fails (retries=0).
        producer.close()
        for future in pending:
            assert isinstance(future.exception(0), DeadlineExceededError)
    finally:
        fake.stop()


def test_close_with_a_timeout_fails_what_is_unanswered() -> None:
    def stall(
        stream: int, request: broker_pb2.ProduceRequest, context: grpc.ServicerContext
    ) -> None:
        fake.release.wait(WAIT_S)

    fake = FakeBroker(stall)
    try:
        producer = Producer(fake.address, linger_ms=0)
        pending = [producer.send("t", VALUE) for _ in range(10)]
        started = time.monotonic()
        producer.close(timeout_s=0.2)
        assert time.monotonic() - started < 2
        for future in pending:
            assert isinstance(future.exception(0), DeadlineExceededError)
    finally:
        fake.stop()


def test_broken_stream_resends_unanswered_requests_in_order() -> None:
    def answer(
        stream: int, request: broker_pb2.ProduceRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ProduceResponse:
        if stream == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        return ok(request, base_offset=100)

    fake = FakeBroker(answer)
    try:
        with Producer(fake.address, retry_backoff_ms=10) as producer:
            landed = producer.send("t", VALUE).result(WAIT_S)
        assert landed.offset == 100
        assert fake.streams == 2
        first, again = fake.requests
        assert first == again  # the same bytes, correlation id included
    finally:
        fake.stop()


def test_retriable_partition_error_is_retried_then_surfaces() -> None:
    def answer(
        stream: int, request: broker_pb2.ProduceRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ProduceResponse:
        unavailable = types_pb2.PartitionError(
            code=grpc.StatusCode.UNAVAILABLE.value[0], message="shutting down"
        )
        response = ok(request, base_offset=-1)
        for result in response.results:
            result.error.CopyFrom(unavailable)
        return response

    fake = FakeBroker(answer)
    try:
        with (
            Producer(fake.address, retries=2, retry_backoff_ms=1) as producer,
            pytest.raises(UnavailableError, match="shutting down"),
        ):
            producer.send("t", VALUE).result(WAIT_S)
        assert len(fake.requests) == 3  # the first attempt and two retries
    finally:
        fake.stop()


def test_unreachable_broker_fails_the_future() -> None:
    with (
        Producer("127.0.0.1:1", retries=1, retry_backoff_ms=1) as producer,
        pytest.raises(UnavailableError),
    ):
        producer.send("t", VALUE).result(WAIT_S)


# ---------------------------------------------------------------------------- async, threads
def test_async_producer(
    running_broker: RunningBroker,
    admin: admin_pb2_grpc.AdminStub,
    broker: broker_pb2_grpc.BrokerStub,
) -> None:
    create(admin, "aio", partitions=2)

    async def main() -> list[RecordMetadata]:
        async with AsyncProducer(running_broker.address, compression="lz4") as producer:
            pending = [await producer.send("aio", b"%d" % i, partition=i % 2) for i in range(500)]
            await producer.flush()
            assert all(f.done() for f in pending)
            missing = await producer.send("missing", VALUE)
            with pytest.raises(NotFoundError):
                await missing
            return [await f for f in pending]

    landed = asyncio.run(main())
    assert [m.offset for m in landed[:4]] == [0, 0, 1, 1]
    assert [r.value for r in fetch(broker, "aio", 1)] == [b"%d" % i for i in range(1, 500, 2)]


def test_concurrent_sends_from_threads(
    running_broker: RunningBroker,
    admin: admin_pb2_grpc.AdminStub,
    broker: broker_pb2_grpc.BrokerStub,
) -> None:
    create(admin, "threads", partitions=3)
    per_thread = 2_000
    with Producer(running_broker.address, batch_bytes=16 * 1024) as producer:

        def work(thread: int) -> list[RecordMetadata]:
            pending = [
                producer.send("threads", b"%d-%d" % (thread, i), key=b"%d" % i)
                for i in range(per_thread)
            ]
            return results(pending)

        with cf.ThreadPoolExecutor(4) as pool:
            landed = [m for ms in pool.map(work, range(4)) for m in ms]
    assert len({(m.partition, m.offset) for m in landed}) == 4 * per_thread
    stored = [r for p in range(3) for r in fetch(broker, "threads", p)]
    assert len(stored) == 4 * per_thread


def test_record_future_is_a_concurrent_future() -> None:
    # _RecordFuture sets the base class's fields itself (to share one Condition): a Python
    # that adds a field to concurrent.futures.Future must fail here, not in production.
    condition = threading.Condition()
    future = _RecordFuture(condition)
    base_fields = set(vars(cf.Future()))
    # Every field of the base class is there: set in __init__, or a class default / property.
    assert base_fields <= set(vars(future)) | set(dir(_RecordFuture))
    assert base_fields == {
        "_condition",
        "_state",
        "_result",
        "_exception",
        "_waiters",
        "_done_callbacks",
    }
    other = _RecordFuture(condition)
    with pytest.raises(cf.TimeoutError):
        future.result(0.01)
    seen: list[RecordMetadata] = []
    future.add_done_callback(lambda f: seen.append(f.result()))
    threading.Timer(0.05, other.set_result, [RecordMetadata("t", 0, 1, 0)]).start()
    threading.Timer(0.1, future.set_result, [RecordMetadata("t", 0, 2, 0)]).start()
    # A notification for `other` does not end the wait for `future`.
    assert future.result(WAIT_S).offset == 2
    assert seen == [RecordMetadata("t", 0, 2, 0)]
    done, _ = cf.wait([other, future], timeout=WAIT_S)
    assert done == {other, future}
    failed = _RecordFuture(condition)
    failed.set_exception(UnavailableError("down"))
    assert isinstance(failed.exception(WAIT_S), UnavailableError)
    cancelled = _RecordFuture(condition)
    assert cancelled.cancel()
    with pytest.raises(cf.CancelledError):
        cancelled.result(WAIT_S)


def test_a_settled_batch_gives_each_future_its_own_metadata() -> None:
    # _settle makes no RecordMetadata; each future makes its own from the batch when asked.
    condition = threading.Condition()
    futures = [_RecordFuture(condition) for _ in range(4)]
    assert futures[2].cancel()
    seen: list[RecordMetadata] = []
    futures[1].add_done_callback(lambda f: seen.append(f.result()))
    waiting = threading.Thread(target=lambda: seen.append(futures[3].result(WAIT_S)))
    waiting.start()
    _settle(futures, ("t", 3, 100, [7, 8, 9, 10]))
    waiting.join(WAIT_S)
    assert futures[0].result(0) == RecordMetadata("t", 3, 100, 7)
    assert futures[1].result(0) == RecordMetadata("t", 3, 101, 8)
    assert futures[2].cancelled()  # a cancelled future stays cancelled
    assert futures[3].result(0) == RecordMetadata("t", 3, 103, 10)
    assert sorted(m.offset for m in seen) == [101, 103]
    assert not cf.wait([futures[0], futures[1], futures[3]], timeout=0).not_done
    unknown = [_RecordFuture(condition) for _ in range(2)]  # acks "none": offsets unknown
    _settle(unknown, ("t", 0, -1, [5, 6]))
    assert [f.result(0) for f in unknown] == [
        RecordMetadata("t", 0, -1, 5),
        RecordMetadata("t", 0, -1, 6),
    ]
    given = _RecordFuture(condition)  # set_result still works
    given.set_result(RecordMetadata("u", 1, 2, 3))
    assert given.result(0) == RecordMetadata("u", 1, 2, 3)


def test_a_settled_future_is_one_object_for_the_garbage_collector() -> None:
    # A caller holding millions of futures pays a full collection's walk for each object a
    # future holds: settled, a future holds no object of its own (no dict, no metadata).
    condition = threading.Condition()
    futures = [_RecordFuture(condition) for _ in range(1000)]
    _settle(futures, ("t", 0, 0, list(range(1000))))

    def held(future: _RecordFuture) -> set[int]:
        return {id(r) for r in gc.get_referents(future) if gc.is_tracked(r)}

    # Whatever a settled future holds for the collector, its neighbours hold the same.
    assert held(futures[500]) == held(futures[501]) == held(futures[0])
    assert futures[500].result(0) == RecordMetadata("t", 0, 500, 500)


class _NoLoop:
    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        pass


def _unstarted(topic: str, partitions: int, **settings: Any) -> Producer:
    """A Producer without a loop thread or a broker whose core knows `topic`: its batches
    fill and seal, and nothing sends them."""
    core = AsyncProducer("127.0.0.1:1", **settings)
    core._loop = _NoLoop()  # type: ignore[assignment]
    core._topics[topic] = _Topic(partitions, 0, open=[None] * partitions)
    producer = Producer.__new__(Producer)
    producer._core = core
    producer._futures_condition = threading.Condition()
    return producer


def _batches(producer: Producer) -> list[tuple[Any, ...]]:
    core = producer._core
    every: list[_Batch] = [*core._ready, *core._open.values()]
    return sorted(
        (b.seq, b.partition, b.keys, b.values, b.headers, b.size, b.solo, len(b.futures))
        for b in every
    )


def test_the_inline_send_path_fills_batches_as_append_does() -> None:
    # Producer.send handles the common record inline and leaves the rest to _append: the two
    # must leave the same batches (records, sizes, sealing) and buffer accounting.
    for partitions in (1, 3):
        records: list[tuple[bytes | None, bytes | None, dict[str, Any]]] = []
        for i in range(3000):
            key = None if i % 7 == 0 else b"k%d" % (i % 11)
            value = None if i % 97 == 0 else b"v" * (i % 300)
            extra: dict[str, Any] = {}
            if i % 41 == 0:
                extra["headers"] = [("h", b"x")]
            elif i % 53 == 0:
                extra["partition"] = i % partitions
            elif i % 59 == 0:
                extra["timestamp_ms"] = 5
            records.append((key, value, extra))
        inline = _unstarted("t", partitions, batch_bytes=4_000, buffer_bytes_max=1 << 30)
        general = _unstarted("t", partitions, batch_bytes=4_000, buffer_bytes_max=1 << 30)
        for key, value, extra in records:
            inline.send("t", value, key=key, **extra)
            code = general._core._append(
                "t",
                value,
                key,
                extra.get("headers"),
                extra.get("partition"),
                extra.get("timestamp_ms"),
                _RecordFuture(general._futures_condition),
                False,
            )
            assert code in (0, 1)
        assert _batches(inline) == _batches(general)
        assert inline._core._buffered_bytes == general._core._buffered_bytes
        assert inline._core._unfinished == general._core._unfinished


def test_the_inline_send_path_keeps_the_bounds() -> None:
    producer = _unstarted("t", 2, batch_bytes=1_000, buffer_bytes_max=1_000, send_timeout_ms=0)
    core = producer._core
    producer.send("t", b"v" * 400, key=b"k")  # opens the keyed batch
    producer.send("t", b"v" * 400, key=b"k")  # inline: 826 of 1,000 bytes
    assert core._buffered_bytes == 826
    with pytest.raises(TypeError, match="key must be bytes"):
        producer.send("t", b"v", key=bytearray(b"k"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="value must be bytes"):
        producer.send("t", memoryview(b"v"), key=b"k")  # type: ignore[arg-type]
    # No room: the slow path (a loop thread, here none) would wait for space; the inline path
    # must not take the record.
    core._space_waiters = 1
    assert (
        core._append(
            "t", b"v", b"k", None, None, None, _RecordFuture(producer._futures_condition), False
        )
        == 4
    )
    core._space_waiters = 0
    core._topics["t"].stale = True  # a NOT_FOUND answer: the topic is described again
    assert (
        core._append(
            "t", b"v", b"k", None, None, None, _RecordFuture(producer._futures_condition), False
        )
        == 2
    )
    core._topics["t"].stale = False
    core._closing = True
    with pytest.raises(RiverlogError, match="closed"):
        producer.send("t", b"v", key=b"k")
    assert core._buffered_bytes == 826
