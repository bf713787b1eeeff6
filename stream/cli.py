"""The `riverlog` command.

    riverlog serve [--data-dir DIR] [--listen HOST:PORT] [--config FILE.toml] [log flags]
    riverlog demo [--data-dir DIR] [--records N]   append to a partition log and read it back

Exit codes: 0 ok, 1 error, 2 usage.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from storage import (
    Compression,
    LogConfig,
    NewRecord,
    PartitionLog,
    StorageError,
    decode_records,
    encode_batch,
)

from ._serve import RunningBroker, load_config, tune_allocator

DEFAULT_DATA_DIR = "riverlog-data"
# Flags that set broker-wide log defaults (LogConfig fields), as (flag, field).
_LOG_FLAGS = [
    ("--fsync", "fsync"),
    ("--fsync-interval-ms", "fsync_interval_ms"),
    ("--segment-bytes", "segment_bytes"),
    ("--segment-ms", "segment_ms"),
    ("--retention-bytes", "retention_bytes"),
    ("--retention-ms", "retention_ms"),
    ("--index-interval-bytes", "index_interval_bytes"),
    ("--batch-bytes-max", "batch_bytes_max"),
]
# The demo writes in batches of this many records, as a producer would.
DEMO_BATCH_RECORDS = 1000
DEMO_RECORDS_MAX = 10_000_000


def _demo(args: argparse.Namespace) -> int:
    records = args.records
    if not 1 <= records <= DEMO_RECORDS_MAX:
        print(f"riverlog demo: --records must be in [1, {DEMO_RECORDS_MAX}]", file=sys.stderr)
        return 2
    path = Path(args.data_dir) / "demo-0"
    log = PartitionLog.open(path, LogConfig())
    try:
        first = log.log_end_offset
        now_ms = time.time_ns() // 1_000_000
        started = time.perf_counter()
        written = 0
        while written < records:
            n = min(DEMO_BATCH_RECORDS, records - written)
            batch = [
                NewRecord(f"key-{i % 16}".encode(), f"event {written + i}".encode(), now_ms)
                for i in range(n)
            ]
            log.append(encode_batch(batch, compression=Compression.LZ4), now_ms)
            written += n
        append_s = time.perf_counter() - started
        started = time.perf_counter()
        offset, seen, last_value = first, 0, b""
        while offset < log.log_end_offset:
            for record in decode_records(log.read(offset, 1024 * 1024)):
                if record.offset >= offset:
                    seen += 1
                    last_value = record.value or b""
                    offset = record.offset + 1
        read_s = time.perf_counter() - started
        print(f"log {path}: offsets [{log.log_start_offset}, {log.log_end_offset})")
        print(
            f"appended {written} records at offsets [{first}, {first + written}) "
            f"in {append_s:.3f} s"
        )
        print(f"read back {seen} records in {read_s:.3f} s; last value {last_value.decode()!r}")
        return 0 if seen == written else 1
    finally:
        log.close()


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = load_config(
        args.config,
        {
            "data_dir": args.data_dir,
            "listen": args.listen,
            "auto_create_topics": True if args.auto_create_topics else None,
            "workers": args.workers,
        },
        {field: getattr(args, field) for _flag, field in _LOG_FLAGS},
    )
    tune_allocator()
    running = RunningBroker(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("riverlog.serve").info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    running.start()
    while not stop.wait(1.0):
        pass
    running.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="riverlog", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the broker (gRPC)")
    serve.add_argument("--data-dir", help=f"default: ./{DEFAULT_DATA_DIR}")
    serve.add_argument("--listen", help="HOST:PORT, default 127.0.0.1:7171 (port 0: any free)")
    serve.add_argument("--config", help="a TOML file with [broker] and [log] tables")
    serve.add_argument("--auto-create-topics", action="store_true", help="create on first produce")
    serve.add_argument("--workers", type=int, help="gRPC worker threads (default 64)")
    for flag, field in _LOG_FLAGS:
        serve.add_argument(flag, dest=field, help=f"broker-wide default for {field}")
    serve.set_defaults(run=_serve)
    demo = commands.add_parser("demo", help="append to a partition log and read it back")
    demo.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="default: ./riverlog-data")
    demo.add_argument("--records", type=int, default=100_000)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except StorageError as e:
        print(f"riverlog: {e}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
