"""One Python producer and one Python consumer against a broker process, 100-byte records.

    python bench/client_bench.py [--quick]

In one run: the pure-encoder ceiling (the producer's encoder, storage.encode_columns, encoding
the same records into RecordBatch v2 batches without sending them), then `Producer.send` of
every record (acks leader, default linger and batch size) until `flush` returns -- once with
idempotence off (the baseline of its cost) and once with the default, idempotent, producer --
then a `Consumer` assigned every partition reading the idempotent run's records back from the
beginning. Two more idempotent runs time the garbage-collector thresholds the README suggests
for such a producer, and the collector off (as a second consume does): what the collector
costs, by difference. The broker runs as a separate process (its own GIL), on loopback.
Targets (the client issue): produce >= 500,000 records/s, consume >= 1,000,000 records/s.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from _common import (
    RECORD_KEY_BYTES,
    RECORD_VALUE_BYTES,
    broker_command,
    grpc_versions,
    load_average,
    machine,
    start_child,
    stop_child,
)

import storage
from stream import Admin, Consumer, Producer, TopicPartition

PARTITIONS = 4
PRODUCE_TARGET = 500_000
CONSUME_TARGET = 1_000_000
# Records per encode_batch call in the ceiling measurement: what a full 1 MiB batch holds.
CEILING_BATCH_RECORDS = 9_000
# No phase may run longer than this, whatever the machine does.
PHASE_SECONDS_MAX = 120.0
# The garbage-collector thresholds the README suggests to a process sending millions of
# records (Python's defaults are 700, 10, 10): one more produce run is timed with them.
GC_THRESHOLD = (100_000, 50, 100)


@dataclass(frozen=True, slots=True)
class Settings:
    records: int
    partitions: int = PARTITIONS
    key_bytes: int = RECORD_KEY_BYTES
    value_bytes: int = RECORD_VALUE_BYTES


FULL = Settings(records=1_000_000)
QUICK = Settings(records=200_000)


@contextmanager
def collector_off() -> Iterator[None]:
    """The garbage collector off for a run (what the default-gc runs pay it, by difference)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def make_records(s: Settings) -> list[tuple[bytes, bytes]]:
    value = b"v" * s.value_bytes
    return [(b"%0*d" % (s.key_bytes, i), value) for i in range(s.records)]


def encode_ceiling(records: list[tuple[bytes, bytes]]) -> float:
    """Records/s of the producer's own encoder (storage.encode_columns: keys, values and
    timestamps as columns), batch by batch, idempotent fields set, nothing sent."""
    now_ms = int(time.time() * 1000)
    started = time.perf_counter()
    for i in range(0, len(records), CEILING_BATCH_RECORDS):
        chunk = records[i : i + CEILING_BATCH_RECORDS]
        storage.encode_columns(
            [k for k, _ in chunk],
            [v for _, v in chunk],
            [now_ms] * len(chunk),
            producer_id=1,
            producer_epoch=0,
            base_sequence=i,
        )
    return len(records) / (time.perf_counter() - started)


def encode_tuples(records: list[tuple[bytes, bytes]]) -> float:
    """Records/s of storage.encode_batch given one NewRecord tuple per record (for context:
    what a producer that kept a tuple per record would pay)."""
    now_ms = int(time.time() * 1000)
    started = time.perf_counter()
    for i in range(0, len(records), CEILING_BATCH_RECORDS):
        chunk = records[i : i + CEILING_BATCH_RECORDS]
        storage.encode_batch([storage.NewRecord(k, v, now_ms) for k, v in chunk])
    return len(records) / (time.perf_counter() - started)


def produce(
    address: str, topic: str, records: list[tuple[bytes, bytes]], *, idempotent: bool = True
) -> float:
    deadline = time.monotonic() + PHASE_SECONDS_MAX
    with Producer(address, idempotent=idempotent) as producer:
        started = time.perf_counter()
        futures = []
        for i, (key, value) in enumerate(records):
            futures.append(producer.send(topic, value, key=key))
            if i % 10_000 == 0 and time.monotonic() > deadline:
                raise RuntimeError("produce phase ran past its time cap")
        producer.flush()
        elapsed = time.perf_counter() - started
    failed = sum(1 for f in futures if f.exception() is not None)
    if failed:
        raise RuntimeError(f"{failed} sends failed")
    return len(records) / elapsed


def consume(address: str, topic: str, expected: int) -> float:
    deadline = time.monotonic() + PHASE_SECONDS_MAX
    seen = 0
    with Consumer(address) as consumer:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        consumer.seek_to_beginning()
        started = time.perf_counter()
        while seen < expected and time.monotonic() < deadline:
            seen += len(consumer.poll(timeout_ms=1000))
        elapsed = time.perf_counter() - started
    if seen < expected:
        raise RuntimeError(f"consumed {seen} of {expected} records before the time cap")
    return seen / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="200,000 records instead of 1M")
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    info = machine(grpc_versions())
    print("settings:", json.dumps(asdict(s)))
    print("machine:", json.dumps(info))
    print(f"load average at start: {load_average()}")
    print("estimates before running: encode ~2,000,000/s, produce ~600,000/s, consume ~1,000,000/s")
    records = make_records(s)
    ceiling = encode_ceiling(records)
    tuples = encode_tuples(records)
    print(f"encode ceiling (encode_columns, the producer's encoder): {ceiling:,.0f} records/s")
    print(f"encode_batch with a NewRecord per record, for context: {tuples:,.0f} records/s")
    work = tempfile.mkdtemp(prefix="riverlog-client-bench-")
    broker = start_child("broker", broker_command(f"{work}/data"), work)
    try:
        with Admin(broker.address) as admin:
            admin.create_topic("bench", PARTITIONS)
            admin.create_topic("bench-plain", PARTITIONS)
        plain = produce(broker.address, "bench-plain", records, idempotent=False)
        print(f"produce, idempotence off: {plain:,.0f} records/s")
        produced = produce(broker.address, "bench", records)
        print(
            f"produce: {produced:,.0f} records/s ({produced / ceiling:.2f} of the encoder), "
            f"target {PRODUCE_TARGET:,}: {'PASS' if produced >= PRODUCE_TARGET else 'MISS'}; "
            f"{produced / plain:.2f} of the non-idempotent run"
        )
        default_threshold = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLD)
        try:
            with Admin(broker.address) as admin:
                admin.create_topic("bench-gc", PARTITIONS)
            tuned = produce(broker.address, "bench-gc", records)
        finally:
            gc.set_threshold(*default_threshold)
        print(
            f"produce with gc.set_threshold{GC_THRESHOLD}: {tuned:,.0f} records/s "
            f"({tuned / produced:.2f} of the default-gc run)"
        )
        with collector_off():
            with Admin(broker.address) as admin:
                admin.create_topic("bench-nogc", PARTITIONS)
            unswept = produce(broker.address, "bench-nogc", records)
        print(
            f"produce with the collector off: {unswept:,.0f} records/s "
            f"({unswept / produced:.2f} of the default-gc run)"
        )
        consumed = consume(broker.address, "bench", s.records)
        print(
            f"consume: {consumed:,.0f} records/s, target {CONSUME_TARGET:,}: "
            f"{'PASS' if consumed >= CONSUME_TARGET else 'MISS'}"
        )
        with collector_off():
            consumed_unswept = consume(broker.address, "bench", s.records)
        print(
            f"consume with the collector off: {consumed_unswept:,.0f} records/s "
            f"({consumed_unswept / consumed:.2f} of the default-gc run)"
        )
    finally:
        stop_child(broker)
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average at end: {load_average()}")
    print(
        json.dumps(
            {
                "produce_records_per_s": round(produced),
                "consume_records_per_s": round(consumed),
                "encode_ceiling_records_per_s": round(ceiling),
                "produce_vs_encode_ceiling": round(produced / ceiling, 3),
                "encode_batch_tuples_records_per_s": round(tuples),
                "produce_non_idempotent_records_per_s": round(plain),
                "idempotent_vs_non_idempotent": round(produced / plain, 3),
                "produce_gc_threshold_records_per_s": round(tuned),
                "gc_threshold": list(GC_THRESHOLD),
                "produce_gc_off_records_per_s": round(unswept),
                "consume_gc_off_records_per_s": round(consumed_unswept),
                "quick": args.quick,
                "machine": info,
                "settings": asdict(s),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
