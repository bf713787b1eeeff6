"""Idempotent produce over a real server: InitProducer, duplicates answered with their
original offsets, sequence gaps and stale epochs refused with their own names, the producer
id registry across restarts, and the Python producer's use of all of it (fencing by name).

The sequence logic itself is tested without a server in test_producer_state.py; lossy
networks and kill -9 in test_idempotence_faults.py.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from storage import NewRecord, decode_records, encode_batch, read_header
from stream import Producer, ProducerFencedError
from stream._broker import BrokerConfig
from stream._pb import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc
from stream._rpc import ERROR_METADATA_KEY
from stream._serve import RunningBroker, ServeConfig

RPC_TIMEOUT_S = 10.0
TS = 1_700_000_000_000


def _batch(pid: int, epoch: int, seq: int, values: list[bytes]) -> bytes:
    return encode_batch(
        [NewRecord(None, v, TS) for v in values],
        producer_id=pid,
        producer_epoch=epoch,
        base_sequence=seq,
    )


def _entry(topic: str, partition: int, batch: bytes) -> broker_pb2.PartitionProduce:
    return broker_pb2.PartitionProduce(topic=topic, partition=partition, record_batch=batch)


def _create(channel: grpc.Channel, name: str, partitions: int = 1) -> None:
    admin_pb2_grpc.AdminStub(channel).CreateTopic(
        admin_pb2.CreateTopicRequest(name=name, partitions=partitions), timeout=RPC_TIMEOUT_S
    )


def _init(channel: grpc.Channel, name: str = "") -> tuple[int, int]:
    answer = broker_pb2_grpc.BrokerStub(channel).InitProducer(
        broker_pb2.InitProducerRequest(producer_name=name), timeout=RPC_TIMEOUT_S
    )
    return answer.producer_id, answer.producer_epoch


def _produce(
    channel: grpc.Channel, *entries: broker_pb2.PartitionProduce
) -> broker_pb2.ProduceResponse:
    request = broker_pb2.ProduceRequest(partitions=list(entries), acks=broker_pb2.ACKS_LEADER)
    return broker_pb2_grpc.BrokerStub(channel).Produce(request, timeout=RPC_TIMEOUT_S)


def _refusal(channel: grpc.Channel, entry: broker_pb2.PartitionProduce) -> tuple[str, str]:
    """The status name and the riverlog error name of a produce refused whole."""
    with pytest.raises(grpc.RpcError) as info:
        _produce(channel, entry)
    error = info.value
    assert isinstance(error, grpc.Call)  # grpcio's errors are Calls; its stubs do not say so
    name = ""
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_METADATA_KEY:
            name = value if isinstance(value, str) else value.decode()
    return error.code().name, name


def _values(channel: grpc.Channel, topic: str, partition: int = 0) -> list[bytes | None]:
    request = broker_pb2.FetchRequest(
        partitions=[broker_pb2.FetchPartition(topic=topic, partition=partition, offset=0)],
        max_bytes=8 * 1024 * 1024,
    )
    (result,) = broker_pb2_grpc.BrokerStub(channel).Fetch(request, timeout=RPC_TIMEOUT_S).results
    return [r.value for r in decode_records(result.record_batches)]


def test_init_producer_hands_out_new_ids_and_bumps_named_epochs(channel: grpc.Channel) -> None:
    a, b = _init(channel), _init(channel)
    assert a[1] == b[1] == 0
    assert a[0] != b[0]
    first = _init(channel, "orders-writer")
    second = _init(channel, "orders-writer")
    assert second == (first[0], first[1] + 1)
    with pytest.raises(grpc.RpcError) as info:
        _init(channel, "no spaces/please")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "producer name" in (info.value.details() or "")


def test_resent_batch_is_answered_with_its_offsets_and_not_appended(channel: grpc.Channel) -> None:
    _create(channel, "t")
    pid, epoch = _init(channel)
    first = _batch(pid, epoch, 0, [b"a", b"b"])
    second = _batch(pid, epoch, 2, [b"c"])
    (r1,) = _produce(channel, _entry("t", 0, first)).results
    (r2,) = _produce(channel, _entry("t", 0, second)).results
    assert (r1.base_offset, r1.last_offset, r1.duplicate) == (0, 1, False)
    (again,) = _produce(channel, _entry("t", 0, first)).results  # a retry of the first
    assert (again.base_offset, again.last_offset, again.duplicate) == (0, 1, True)
    assert again.log_append_time_ms == r1.log_append_time_ms
    (again2,) = _produce(channel, _entry("t", 0, second)).results
    assert (again2.base_offset, again2.duplicate) == (r2.base_offset, True)
    assert _values(channel, "t") == [b"a", b"b", b"c"]


def test_sequence_gap_is_refused_by_name_and_nothing_appended(channel: grpc.Channel) -> None:
    _create(channel, "t")
    pid, epoch = _init(channel)
    _produce(channel, _entry("t", 0, _batch(pid, epoch, 0, [b"a"])))
    code, name = _refusal(channel, _entry("t", 0, _batch(pid, epoch, 5, [b"gap"])))
    assert (code, name) == ("FAILED_PRECONDITION", "OUT_OF_ORDER_SEQUENCE")
    assert _values(channel, "t") == [b"a"]


def test_unknown_producer_id_is_refused(channel: grpc.Channel) -> None:
    _create(channel, "t")
    code, name = _refusal(channel, _entry("t", 0, _batch(10**12, 0, 0, [b"a"])))
    assert (code, name) == ("FAILED_PRECONDITION", "UNKNOWN_PRODUCER")


def test_stale_epoch_is_fenced_on_every_partition(channel: grpc.Channel) -> None:
    _create(channel, "t", partitions=2)
    old = _init(channel, "worker-1")
    _produce(channel, _entry("t", 0, _batch(*old, 0, [b"old"])))
    new = _init(channel, "worker-1")
    _produce(channel, _entry("t", 0, _batch(*new, 0, [b"new"])))
    # Partition 0 has seen the new epoch; partition 1 never has: both refuse the old one.
    for partition in (0, 1):
        code, name = _refusal(channel, _entry("t", partition, _batch(*old, 1, [b"zombie"])))
        assert (code, name) == ("ABORTED", "PRODUCER_FENCED")
    assert _values(channel, "t", 0) == [b"old", b"new"]
    assert _values(channel, "t", 1) == []


def test_stream_answers_each_entry_with_its_own_error(channel: grpc.Channel) -> None:
    _create(channel, "t", partitions=2)
    pid, epoch = _init(channel)
    request = broker_pb2.ProduceRequest(
        acks=broker_pb2.ACKS_LEADER,
        correlation_id=1,
        partitions=[
            _entry("t", 0, _batch(pid, epoch, 3, [b"gap"])),
            _entry("t", 1, _batch(pid, epoch, 0, [b"ok"])),
        ],
    )
    (answer,) = broker_pb2_grpc.BrokerStub(channel).ProduceStream(
        iter([request]), timeout=RPC_TIMEOUT_S
    )
    gap, ok = answer.results
    assert (gap.error.name, gap.base_offset) == ("UNKNOWN_PRODUCER", -1)  # new here, not at 0
    assert (ok.error.code, ok.base_offset) == (0, 0)


def test_producer_ids_and_epochs_survive_a_restart(tmp_path: Path) -> None:
    def serve() -> RunningBroker:
        config = ServeConfig(
            broker=BrokerConfig(data_dir=tmp_path / "data"),
            listen="127.0.0.1:0",
            shutdown_grace_s=1.0,
        )
        running = RunningBroker(config)
        running.start()
        return running

    running = serve()
    try:
        with grpc.insecure_channel(running.address) as ch:
            _create(ch, "t")
            anonymous = _init(ch)
            named = _init(ch, "svc")
            _produce(ch, _entry("t", 0, _batch(*named, 0, [b"a"])))
    finally:
        running.stop()
    running = serve()
    try:
        with grpc.insecure_channel(running.address) as ch:
            assert _init(ch)[0] > anonymous[0]  # never the same id twice
            (dup,) = _produce(ch, _entry("t", 0, _batch(*named, 0, [b"a"]))).results
            assert (dup.duplicate, dup.base_offset) == (True, 0)
            bumped = _init(ch, "svc")
            assert bumped == (named[0], named[1] + 1)
            refusal = _refusal(ch, _entry("t", 0, _batch(*named, 1, [b"b"])))
            assert refusal == ("ABORTED", "PRODUCER_FENCED")
    finally:
        running.stop()


def test_producer_is_idempotent_by_default_and_a_named_one_is_fenced(
    running_broker: RunningBroker, channel: grpc.Channel
) -> None:
    _create(channel, "t")
    with Producer(running_broker.address, producer_name="mailer", linger_ms=0) as first:
        assert first.send("t", b"one").result(10).offset == 0
        with Producer(running_broker.address, producer_name="mailer", linger_ms=0) as second:
            assert second.send("t", b"two").result(10).offset == 1
            stale = first.send("t", b"zombie")
            with pytest.raises(ProducerFencedError):
                stale.result(10)
            with pytest.raises(ProducerFencedError):
                first.send("t", b"after")
    assert _values(channel, "t") == [b"one", b"two"]
    # The batches carried the producer's id and sequence numbers.
    request = broker_pb2.FetchRequest(
        partitions=[broker_pb2.FetchPartition(topic="t", partition=0, offset=0)]
    )
    (result,) = broker_pb2_grpc.BrokerStub(channel).Fetch(request, timeout=RPC_TIMEOUT_S).results
    header = read_header(result.record_batches)
    assert header.producer_id >= 0
    assert header.base_sequence == 0


def test_idempotence_needs_acks(running_broker: RunningBroker) -> None:
    from stream import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="idempotent"):
        Producer(running_broker.address, acks="none", idempotent=True)
    with pytest.raises(InvalidArgumentError, match="producer_name"):
        Producer(running_broker.address, idempotent=False, producer_name="x")


def test_producer_starts_again_at_zero_when_the_broker_forgot_it(
    running_broker: RunningBroker, channel: grpc.Channel
) -> None:
    _create(channel, "t")
    plog = running_broker.broker._partition("t", 0).log
    with Producer(running_broker.address, linger_ms=0) as producer:
        producer.send("t", b"a").result(10)
        producer.send("t", b"b").result(10)
        # A day idle, as far as the partition is concerned: its producer state expires.
        assert plog.expire_producers(running_broker.broker.now_ms() + 10 * 86_400_000) == 1
        assert producer.send("t", b"c").result(10).offset == 2  # UNKNOWN_PRODUCER, resent at 0
        assert producer.send("t", b"d").result(10).offset == 3
    assert _values(channel, "t") == [b"a", b"b", b"c", b"d"]


def test_a_refused_batch_does_not_strand_the_batches_behind_it(
    running_broker: RunningBroker, channel: grpc.Channel
) -> None:
    from stream import ResourceExhaustedError

    _create(channel, "t")
    too_big = b"x" * (2 * 1024 * 1024)  # over the broker's batch_bytes_max (1 MiB)
    with Producer(running_broker.address, linger_ms=50) as producer:
        first = producer.send("t", b"a")
        refused = producer.send("t", too_big)
        after = [producer.send("t", b"%d" % i) for i in range(3)]
        producer.flush(10)
        with pytest.raises(ResourceExhaustedError):
            refused.result(0)
        # The batches after it were numbered past its sequence; they are renumbered and
        # resent, not failed.
        assert [f.result(0).offset for f in [first, *after]] == [0, 1, 2, 3]
    assert _values(channel, "t") == [b"a", b"0", b"1", b"2"]
