"""The `riverlog` command.

    riverlog demo [--data-dir DIR] [--records N]   append to a partition log and read it back

Exit codes: 0 ok, 1 error, 2 usage.
"""

from __future__ import annotations

import argparse
import sys
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

DEFAULT_DATA_DIR = "riverlog-data"
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="riverlog", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
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
