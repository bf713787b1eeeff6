"""The `riverlog` command: the broker, and a client for topics, consumer and share groups,
produce and consume.

    riverlog serve [--data-dir DIR] [--listen HOST:PORT] [--config FILE.toml] [log flags]
    riverlog demo [--data-dir DIR] [--records N]   append to a partition log and read it back

    riverlog topics create NAME [--partitions N] [--config KEY=VALUE ...]
    riverlog topics list | describe NAME | delete NAME | add-partitions NAME TOTAL
    riverlog groups list | describe GROUP | delete GROUP
    riverlog groups reset-offsets GROUP --topic T (--to-earliest | --to-latest
        | --to-timestamp TIME | --to-offset N | --shift-by N) [--partition P ...] [--dry-run]
    riverlog share-groups list | describe GROUP | delete GROUP
    riverlog share-groups alter GROUP [--lock-ms N] [--max-delivery-attempts N]
        [--dead-letter-topic T] [--start earliest|latest] [--retry-backoff-ms N]
        [--retry-backoff-max-ms N]
    riverlog share-groups reset-offsets GROUP --topic T (--to-earliest | --to-latest
        | --to-timestamp TIME | --to-offset N) [--partition P ...] [--dry-run]
    riverlog produce TOPIC [--key-separator SEP] [--header KEY=VALUE ...] [--partition P]
        [--acks none|leader|all] [--compression gzip|lz4|zstd]     one record per stdin line
    riverlog consume TOPIC [--from-beginning | --offset N | --timestamp TIME] [--partition P]
        [--group G] [--max-messages N] [--timeout-ms MS] [--format text|json|raw]

    riverlog certs DIR [--days N] [--host NAME ...] [--client NAME ...] [--force]
    riverlog tokens add PRINCIPAL | remove PRINCIPAL | list    --tokens-file FILE
    riverlog whoami
    riverlog acls add --principal P --resource-type T [--name N] [--prefixed]
        --operation O [--operation O ...] [--deny]
    riverlog acls list [FILTERS] | remove (FILTERS | --all)
        FILTERS: [--principal P] [--resource-type T] [--pattern-type literal|prefixed]
                 [--name N] [--operation O] [--permission allow|deny]
    riverlog quotas list
    riverlog quotas set (PRINCIPAL | --default) ([--produce-bytes-per-s N]
        [--fetch-bytes-per-s N] | --unlimited)
    riverlog quotas remove (PRINCIPAL | --default)

Every client command takes `--server HOST:PORT` (default: $RIVERLOG_SERVER, else
127.0.0.1:7171) and the connection's credentials: `--token-file FILE` (its first line is a
bearer token; default: the token in $RIVERLOG_TOKEN), `--tls-ca FILE` (the CA that signed the
broker's certificate), `--tls-cert FILE` and `--tls-key FILE` (a client certificate, for
mutual TLS), or `--tls` alone (TLS verified by the system's root CAs); the TLS options default
to $RIVERLOG_TLS_CA, $RIVERLOG_TLS_CERT and $RIVERLOG_TLS_KEY. A token is never printed, nor
put in an error message. topics, groups, share-groups, produce, whoami, acls and quotas take
`--json` for machine-readable output (one JSON document on stdout) instead of aligned tables.
TIME is an integer (ms since the Unix epoch) or ISO 8601 (`2024-05-01T12:00:00Z`; without a
UTC offset it is local time).

`tokens` edits a token file directly, without a broker; a running broker reads it again on
SIGHUP. `certs` makes a throwaway development CA and certificates (stream/_certs.py).

`consume` follows the topic until it has printed --max-messages records, until --timeout-ms
passed without a new record, or until Ctrl-C, like `tail -f` (there is no idle time-out by
default). Ending on --timeout-ms before --max-messages were printed is an error (exit 1).
Without --group it reads every partition (or --partition) from the start position, by
default the log end (only new records); with --group the group assigns the partitions,
starts at the committed offsets (--from-beginning: the log start where there is none) and
the offsets of the printed records are committed on exit.
--format json prints one object per line: topic, partition, offset, timestamp_ms, key, value,
headers ([{"key", "value"}]); a key or value is null, a string when it is UTF-8, else
{"base64": "..."}. --format text prints `partition<TAB>offset<TAB>key<TAB>value` (bytes that
are not UTF-8 as \\xNN, newline, tab and CR as \\n \\t \\r, (null) for null); --format raw
prints each value and a newline.

On a terminal, long produce and consume runs show records/s and bytes on stderr (consume only
while its records go to a file or a pipe); elsewhere they print nothing extra.

Exit codes: 0 ok, 1 error (the broker's message on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields, is_dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from storage import (
    Compression,
    LogConfig,
    NewRecord,
    PartitionLog,
    StorageError,
    decode_records,
    encode_batch,
)

from .client._admin import (
    OPERATIONS,
    RESOURCE_TYPES,
    AclEntry,
    Admin,
    GroupDescription,
    OffsetChange,
    Quota,
    ShareGroupConfig,
    ShareGroupDescription,
    TopicInfo,
)
from .client._base import (
    SERVER_DEFAULT,
    SERVER_ENV,
    Record,
    RecordMetadata,
    RiverlogError,
    TlsOptions,
    TopicPartition,
    default_server,
)
from .security._tokens import redact

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

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
    ("--producer-expiry-ms", "producer_expiry_ms"),
    ("--producers-max", "producers_max"),
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


def _serve_security_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The [broker] settings of the serve flags of the "security" group (None: not given)."""
    return {
        "tls_cert_file": args.tls_cert,
        "tls_key_file": args.tls_key,
        "tls_client_ca_file": args.tls_client_ca,
        "tokens_file": args.tokens_file,
        "super_users": args.super_users,
        "acls_enabled": True if args.acls else None,
        "acls_bootstrap_file": args.acls_file,
        "insecure": True if args.insecure else None,
    }


def _serve(args: argparse.Namespace) -> int:
    from ._serve import RunningBroker, load_config, tune_allocator  # the broker: serve only

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
            **_serve_security_overrides(args),
        },
        {field: getattr(args, field) for _flag, field in _LOG_FLAGS},
    )
    tune_allocator()
    running = RunningBroker(config)
    log = logging.getLogger("riverlog.serve")
    stop = threading.Event()
    reload_wanted = threading.Event()
    wake = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()
        wake.set()

    def on_hangup(_signum: int, _frame: object) -> None:
        reload_wanted.set()  # the reload runs below, not in the handler
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGHUP"):  # POSIX
        signal.signal(signal.SIGHUP, on_hangup)
    running.start()
    while not stop.is_set():
        wake.wait(1.0)
        wake.clear()
        if reload_wanted.is_set() and not stop.is_set():
            reload_wanted.clear()
            try:
                running.reload()  # the tokens file (`riverlog tokens` changed it)
            except StorageError as e:
                log.error("SIGHUP: reload failed; the previous settings stay in use: %s", e)
    running.stop()
    return 0


# ---------------------------------------------------------------------------- client: helpers
# A produce or consume run shows its progress once it has lasted this long (short runs stay
# quiet), and refreshes the figures at most this often.
PROGRESS_DELAY_S = 1.0
PROGRESS_REFRESH_S = 0.1
# Failed records `produce` reports one by one before it only counts them.
FAILURES_SHOWN_MAX = 10
# `produce` sweeps acknowledged sends out of its pending list every this many sends, so the
# list holds about what the producer's buffer holds, not the whole input.
PRODUCE_SWEEP_EVERY = 10_000
# Longest single poll of `consume`: how late it notices --timeout-ms or Ctrl-C at worst.
CONSUME_POLL_MS_MAX = 200
# Most records one poll of `consume` asks for: bounds the time between progress updates and
# the memory of a poll's answer (a poll without a bound hands out the consumer's whole
# buffer: 865,000 small records, 3.4 s, measured).
CONSUME_POLL_RECORDS_MAX = 10_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def parse_time_ms(text: str) -> int:
    """ms since the Unix epoch of `text`: an integer (ms) or ISO 8601 (local time when it
    carries no UTC offset)."""
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither ms since the Unix epoch nor an ISO 8601 time "
            "(like 2024-05-01T12:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # a naive time is the local wall clock
    return (when - _EPOCH) // _MILLISECOND


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _header(text: str) -> tuple[str, bytes | None]:
    """KEY=VALUE, or KEY alone for a header with a null value."""
    key, sep, value = text.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or KEY, got {text!r}")
    return key, value.encode() if sep else None


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        return n

    return parse


_positive = _int_at_least(1)
_not_negative = _int_at_least(0)


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """An aligned text table: columns of numbers right-aligned, None shown as "-"."""
    values = [list(row) for row in rows]
    right = [
        any(isinstance(row[i], int) for row in values)
        and all(isinstance(row[i], int) or row[i] is None for row in values)
        for i in range(len(headers))
    ]
    cells = [list(headers)] + [["-" if c is None else str(c) for c in row] for row in values]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if right[i] else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    )


def _to_json(value: object) -> Any:
    """Dataclasses and named tuples as objects, recursively, for json.dumps."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {k: _to_json(v) for k, v in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


def _print_json(value: object) -> None:
    print(json.dumps(_to_json(value), indent=2))


class _Progress:
    """Records, records/s and bytes on stderr with `rich`, once a run has lasted
    PROGRESS_DELAY_S; nothing at all when disabled (rich is not even imported then)."""

    def __init__(self, verb: str, *, enabled: bool) -> None:
        self._verb = verb
        self._enabled = enabled
        self._started = time.monotonic()
        self._shown_at = 0.0
        self.records = 0
        self.bytes = 0
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def advance(self, records: int, nbytes: int) -> None:
        self.records += records
        self.bytes += nbytes
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._shown_at < PROGRESS_REFRESH_S:
            return
        if self._progress is None:
            if now - self._started < PROGRESS_DELAY_S:
                return
            self._start()
        self._shown_at = now
        self._show(now)

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            console=Console(stderr=True),
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._progress.add_task(self._verb, total=None)
        self._show(time.monotonic())  # the figures before the first frame is drawn
        self._progress.start()

    def _show(self, now: float) -> None:
        from rich.filesize import decimal

        assert self._progress is not None
        assert self._task is not None
        elapsed_s = max(now - self._started, 1e-9)
        records_per_s = self.records / elapsed_s
        self._progress.update(
            self._task,
            description=(
                f"{self._verb} {self.records:,} records  {records_per_s:,.0f} records/s  "
                f"{decimal(self.bytes)}  {decimal(int(self.bytes / elapsed_s))}/s  "
                f"{elapsed_s:.1f} s"
            ),
        )

    def close(self) -> None:
        if self._progress is not None:
            self._show(time.monotonic())
            self._progress.stop()
            self._progress = None


# ---------------------------------------------------------------------------- client: connection
TOKEN_ENV = "RIVERLOG_TOKEN"
# The environment variables the TLS options default to, by option destination.
TLS_ENV = {
    "tls_ca": "RIVERLOG_TLS_CA",
    "tls_cert": "RIVERLOG_TLS_CERT",
    "tls_key": "RIVERLOG_TLS_KEY",
}
# A token file is one short line; more than this is not a token file.
TOKEN_FILE_BYTES_MAX = 64 * 1024


class UsageError(Exception):
    """Options that do not go together (exit 2), found after argparse."""


class _Connection(NamedTuple):
    server: str
    token: str | None
    tls: TlsOptions | None


def _read_token_file(path: str) -> str:
    """The first line of the token file at `path`, without surrounding white space."""
    try:
        with open(path, "rb") as f:
            data = f.read(TOKEN_FILE_BYTES_MAX + 1)
    except OSError as e:
        raise RiverlogError(f"cannot read the token file {path}: {e.strerror}") from None
    if len(data) > TOKEN_FILE_BYTES_MAX:
        raise RiverlogError(f"the token file {path} is larger than {TOKEN_FILE_BYTES_MAX} bytes")
    first = data.split(b"\n", 1)[0].strip()
    if not first:
        raise RiverlogError(f"the token file {path} holds no token on its first line")
    try:
        return first.decode("ascii")
    except UnicodeDecodeError:
        raise RiverlogError(f"the token file {path}: the token is not ASCII") from None


def _connection(args: argparse.Namespace) -> _Connection:
    """The server, token and TLS settings of a client command: its options, else the
    environment ($RIVERLOG_SERVER, $RIVERLOG_TOKEN, $RIVERLOG_TLS_*)."""
    if args.token_file is not None:
        token: str | None = _read_token_file(args.token_file)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
    paths = {
        dest: getattr(args, dest) or os.environ.get(env) or None for dest, env in TLS_ENV.items()
    }
    tls = None
    if args.tls or any(paths.values()):
        if paths["tls_cert"] is not None and paths["tls_key"] is None:
            raise UsageError(f"--tls-cert needs --tls-key too (or ${TLS_ENV['tls_key']})")
        if paths["tls_key"] is not None and paths["tls_cert"] is None:
            raise UsageError(f"--tls-key needs --tls-cert too (or ${TLS_ENV['tls_cert']})")
        tls = TlsOptions(paths["tls_ca"], paths["tls_cert"], paths["tls_key"])
    return _Connection(default_server(args.server), token, tls)


def _admin(connection: _Connection) -> Admin:
    return Admin(connection.server, token=connection.token, tls=connection.tls)


# ---------------------------------------------------------------------------- client: topics
def _print_topic(info: TopicInfo) -> None:
    config = ", ".join(f"{k}={v}" for k, v in sorted(info.config.items())) or "(broker defaults)"
    print(f"topic       {info.name}")
    print(f"id          {info.topic_id}")
    print(f"partitions  {len(info.partitions)}")
    print(f"config      {config}")
    print()
    print(
        _table(
            ["PARTITION", "LOG_START", "LOG_END", "SIZE_BYTES", "SEGMENTS"],
            [
                [p.partition, p.log_start_offset, p.log_end_offset, p.size_bytes, p.segment_count]
                for p in info.partitions
            ],
        )
    )


def _topics(args: argparse.Namespace) -> int:
    with _admin(_connection(args)) as admin:
        command = args.topics_command
        if command == "create":
            info = admin.create_topic(args.name, args.partitions, dict(args.config))
            if args.json:
                _print_json(info)
            else:
                print(f"created topic {info.name!r} with {len(info.partitions)} partition(s)")
        elif command == "list":
            topics = admin.list_topics()
            if args.json:
                _print_json([{"name": name, "partitions": count} for name, count in topics])
            else:
                print(_table(["TOPIC", "PARTITIONS"], topics))
        elif command == "describe":
            info = admin.describe_topic(args.name)
            if args.json:
                _print_json(info)
            else:
                _print_topic(info)
        elif command == "delete":
            admin.delete_topic(args.name)
            if args.json:
                _print_json({"deleted": args.name})
            else:
                print(f"deleted topic {args.name!r}")
        elif command == "add-partitions":
            info = admin.add_partitions(args.name, args.total)
            if args.json:
                _print_json(info)
            else:
                print(f"topic {info.name!r} now has {len(info.partitions)} partitions")
        else:  # pragma: no cover - argparse allows only the commands above
            raise AssertionError(command)
    return 0


# ---------------------------------------------------------------------------- client: groups
def _partition_list(parts: Iterable[TopicPartition]) -> str:
    """t:0,1 u:3 -- partitions grouped by topic."""
    by_topic: dict[str, list[int]] = {}
    for tp in sorted(parts):
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return " ".join(f"{t}:{','.join(map(str, ps))}" for t, ps in by_topic.items()) or "-"


def _print_group(d: GroupDescription) -> None:
    print(f"group        {d.group_id}")
    print(f"state        {d.state}")
    print(f"epoch        {d.group_epoch}")
    print(f"members      {len(d.members)}")
    print(f"total lag    {d.total_lag}")
    if d.partitions:
        print()
        print(
            _table(
                ["TOPIC", "PARTITION", "COMMITTED", "LOG_START", "LOG_END", "LAG", "MEMBER"],
                [
                    [
                        p.topic,
                        p.partition,
                        p.committed_offset,
                        p.log_start_offset,
                        p.log_end_offset,
                        p.lag,
                        p.member_id or None,
                    ]
                    for p in d.partitions
                ],
            )
        )
    if d.members:
        print()
        print(
            _table(
                ["MEMBER", "INSTANCE", "EPOCH", "ASSIGNED", "PENDING"],
                [
                    [
                        m.member_id,
                        m.instance_id,
                        m.member_epoch,
                        _partition_list(m.assignment),
                        _partition_list(m.pending),
                    ]
                    for m in d.members
                ],
            )
        )


def _groups(args: argparse.Namespace) -> int:
    with _admin(_connection(args)) as admin:
        command = args.groups_command
        if command == "list":
            groups = admin.list_groups()
            if args.json:
                _print_json(groups)
            else:
                print(
                    _table(
                        ["GROUP", "STATE", "MEMBERS"],
                        [[g.group_id, g.state, g.members] for g in groups],
                    )
                )
        elif command == "describe":
            description = admin.describe_group(args.group)
            if args.json:
                _print_json(description)
            else:
                _print_group(description)
        elif command == "delete":
            admin.delete_group(args.group)
            if args.json:
                _print_json({"deleted": args.group})
            else:
                print(f"deleted group {args.group!r}")
        elif command == "reset-offsets":
            changes = admin.reset_offsets(
                args.group,
                args.topic,
                to_earliest=args.to_earliest,
                to_latest=args.to_latest,
                to_timestamp_ms=args.to_timestamp,
                to_offset=args.to_offset,
                shift_by=args.shift_by,
                partitions=args.partition,
                dry_run=args.dry_run,
            )
            _print_offset_changes(args, changes)
        else:  # pragma: no cover - argparse allows only the commands above
            raise AssertionError(command)
    return 0


def _print_offset_changes(args: argparse.Namespace, changes: list[OffsetChange]) -> None:
    """The answer of `groups reset-offsets` and `share-groups reset-offsets`."""
    if args.json:
        _print_json(
            {
                "group_id": args.group,
                "topic": args.topic,
                "applied": not args.dry_run,
                "changes": changes,
            }
        )
        return
    print(
        _table(
            ["PARTITION", "PREVIOUS", "NEW"],
            [[c.partition, c.previous, c.new] for c in changes],
        )
    )
    if args.dry_run:
        print("dry run: nothing changed (run without --dry-run to apply)")
    else:
        print(f"reset {len(changes)} partition(s) of topic {args.topic!r}")


# ---------------------------------------------------------------------------- client: share groups
# The settings `share-groups alter` takes, as (flag, alter_share_group keyword).
_SHARE_SETTINGS = [
    ("--lock-ms", "lock_ms"),
    ("--max-delivery-attempts", "max_delivery_attempts"),
    ("--dead-letter-topic", "dead_letter_topic"),
    ("--start", "start"),
    ("--retry-backoff-ms", "retry_backoff_ms"),
    ("--retry-backoff-max-ms", "retry_backoff_max_ms"),
]


def _time_text(ms: int) -> str:
    """ms since the Unix epoch as ISO 8601 in UTC, to the millisecond."""
    return (_EPOCH + ms * _MILLISECOND).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _print_share_settings(config: ShareGroupConfig) -> None:
    print(f"lock ms                  {config.lock_ms}")
    print(f"max delivery attempts    {config.max_delivery_attempts}")
    print(f"dead-letter topic        {config.dead_letter_topic or '-'}")
    print(f"start                    {config.start}")
    print(f"retry backoff ms         {config.retry_backoff_ms}")
    print(f"retry backoff max ms     {config.retry_backoff_max_ms}")


def _print_share_group(d: ShareGroupDescription) -> None:
    print(f"share group              {d.group_id}")
    _print_share_settings(d.config)
    print(f"members                  {len(d.members)}")
    print(f"total lag                {d.total_lag}")
    if d.partitions:
        print()
        print(
            _table(
                [
                    "TOPIC",
                    "PARTITION",
                    "START",
                    "END",
                    "LOG_END",
                    "AVAILABLE",
                    "ACQUIRED",
                    "DELAYED",
                    "DONE",
                    "LAG",
                    "ARCHIVED",
                ],
                [
                    [
                        p.topic,
                        p.partition,
                        p.start_offset,
                        p.end_offset,
                        p.log_end_offset,
                        p.available,
                        p.acquired,
                        p.delayed,
                        p.done,
                        p.lag,
                        p.archived_total,
                    ]
                    for p in d.partitions
                ],
            )
        )
    if d.members:
        print()
        print(
            _table(
                ["MEMBER", "TOPICS", "ACQUIRED", "LAST_HEARTBEAT"],
                [
                    [
                        m.member_id,
                        ",".join(m.topics) or None,
                        m.acquired,
                        _time_text(m.last_heartbeat_ms),
                    ]
                    for m in d.members
                ],
            )
        )


def _share_groups(args: argparse.Namespace) -> int:
    command = args.share_groups_command
    settings: dict[str, Any] = {}
    if command == "alter":
        settings = {key: getattr(args, key) for _flag, key in _SHARE_SETTINGS}
        if all(value is None for value in settings.values()):
            parser: argparse.ArgumentParser = args.parser
            parser.error(
                "nothing to alter: give at least one of "
                + ", ".join(flag for flag, _key in _SHARE_SETTINGS)
            )
    with _admin(_connection(args)) as admin:
        if command == "list":
            groups = admin.list_share_groups()
            if args.json:
                _print_json(groups)
            else:
                print(_table(["GROUP", "MEMBERS"], [[g.group_id, g.members] for g in groups]))
        elif command == "describe":
            description = admin.describe_share_group(args.group)
            if args.json:
                _print_json(description)
            else:
                _print_share_group(description)
        elif command == "alter":
            config = admin.alter_share_group(args.group, **settings)
            if args.json:
                _print_json(config)
            else:
                print(f"altered share group {args.group!r}")
                _print_share_settings(config)
        elif command == "reset-offsets":
            changes = admin.reset_share_offsets(
                args.group,
                args.topic,
                to_earliest=args.to_earliest,
                to_latest=args.to_latest,
                to_timestamp_ms=args.to_timestamp,
                to_offset=args.to_offset,
                partitions=args.partition or (),
                dry_run=args.dry_run,
            )
            _print_offset_changes(args, changes)
        elif command == "delete":
            admin.delete_share_group(args.group)
            if args.json:
                _print_json({"deleted": args.group})
            else:
                print(f"deleted share group {args.group!r}")
        else:  # pragma: no cover - argparse allows only the commands above
            raise AssertionError(command)
    return 0


# ---------------------------------------------------------------------------- client: produce
def _produce(args: argparse.Namespace) -> int:
    from stream.client._producer import Producer

    separator = None if args.key_separator is None else args.key_separator.encode()
    headers: list[tuple[str, bytes | None]] | None = list(args.header) or None
    progress = _Progress("sent", enabled=sys.stderr.isatty() and not sys.stdin.isatty())
    acknowledged = failed = 0
    pending: list[tuple[int, concurrent.futures.Future[RecordMetadata]]] = []

    def fail(line: int, error: BaseException) -> None:
        nonlocal failed
        failed += 1
        if failed <= FAILURES_SHOWN_MAX:
            print(f"riverlog: line {line}: {error}", file=sys.stderr)

    def settle(wait: bool) -> None:
        """Count the finished sends (all of them with `wait`) and keep the others."""
        nonlocal acknowledged, pending
        if wait:
            concurrent.futures.wait([f for _line, f in pending])
        still: list[tuple[int, concurrent.futures.Future[RecordMetadata]]] = []
        for line, future in pending:
            if not future.done():
                still.append((line, future))
            elif (error := future.exception()) is not None:
                fail(line, error)
            else:
                acknowledged += 1
        pending = still

    compression = None if args.compression == "none" else args.compression
    connection = _connection(args)
    with Producer(
        connection.server,
        acks=args.acks,
        compression=compression,
        token=connection.token,
        tls=connection.tls,
    ) as producer:
        try:
            for number, raw in enumerate(sys.stdin.buffer, start=1):
                line = raw[:-1] if raw.endswith(b"\n") else raw
                key: bytes | None = None
                if separator is not None:
                    key, found, value = line.partition(separator)
                    if not found:
                        fail(number, RiverlogError(f"no key separator {args.key_separator!r}"))
                        continue
                else:
                    value = line
                try:
                    future = producer.send(
                        args.topic, value, key=key, headers=headers, partition=args.partition
                    )
                except RiverlogError as e:
                    fail(number, e)
                    continue
                pending.append((number, future))
                progress.advance(1, len(line))
                if number % PRODUCE_SWEEP_EVERY == 0:
                    settle(wait=False)
            producer.flush()
            settle(wait=True)
        finally:
            progress.close()
    if failed > FAILURES_SHOWN_MAX:
        print(f"riverlog: ... {failed - FAILURES_SHOWN_MAX} more failed", file=sys.stderr)
    if args.json:
        _print_json({"acknowledged": acknowledged, "failed": failed})
    else:
        done = "sent (--acks none: unconfirmed)" if args.acks == "none" else "acknowledged"
        print(f"{acknowledged} record(s) {done}" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


# ---------------------------------------------------------------------------- client: consume
def _text(data: bytes | None) -> str:
    if data is None:
        return "(null)"
    text = data.decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _json_bytes(data: bytes | None) -> str | dict[str, str] | None:
    """null, the UTF-8 text, or {"base64": ...} for bytes that are not UTF-8."""
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def format_record(record: Record, kind: str) -> bytes:
    """One output line of `consume --format kind`, newline included."""
    if kind == "raw":
        return (record.value or b"") + b"\n"
    if kind == "json":
        line = json.dumps(
            {
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "timestamp_ms": record.timestamp_ms,
                "key": _json_bytes(record.key),
                "value": _json_bytes(record.value),
                "headers": [{"key": k, "value": _json_bytes(v)} for k, v in record.headers],
            }
        )
    else:
        line = f"{record.partition}\t{record.offset}\t{_text(record.key)}\t{_text(record.value)}"
    return line.encode() + b"\n"


def _consume(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if args.group is not None and (
        args.offset is not None or args.timestamp is not None or args.partition is not None
    ):
        parser.error(
            "with --group the group assigns partitions and they start at its committed "
            "offsets: --offset, --timestamp and --partition need no --group"
        )
    from stream.client._consumer import Consumer

    connection = _connection(args)
    chosen: list[TopicPartition] = []
    if args.group is None:
        with _admin(connection) as admin:
            count = len(admin.describe_topic(args.topic).partitions)
        if args.partition is not None and not 0 <= args.partition < count:
            print(
                f"riverlog: topic {args.topic!r} has {count} partition(s), "
                f"no partition {args.partition}",
                file=sys.stderr,
            )
            return 1
        wanted = range(count) if args.partition is None else [args.partition]
        chosen = [TopicPartition(args.topic, p) for p in wanted]
    consumer = Consumer(
        connection.server,
        token=connection.token,
        tls=connection.tls,
        group=args.group,
        topics=(args.topic,) if args.group is not None else (),
        auto_offset_reset="earliest" if args.from_beginning else "latest",
        enable_auto_commit=True,
    )
    try:
        if args.group is None:
            consumer.assign(chosen)
            if args.from_beginning:
                consumer.seek_to_beginning(chosen)
            elif args.offset is not None:
                for tp in chosen:
                    consumer.seek(tp, args.offset)
            elif args.timestamp is not None:
                consumer.seek_to_timestamp(args.timestamp, chosen)
            else:
                consumer.seek_to_end(chosen)
        run = _ConsumeRun(args.format, args.max_messages, args.timeout_ms)
        run.follow(consumer.poll)
        if args.group is not None:
            consumer.commit()  # the records printed (poll handed out no more than those)
    finally:
        consumer.close()
    if run.timed_out and args.max_messages is not None:
        print(
            f"riverlog: no record for {args.timeout_ms} ms; printed {run.printed} of "
            f"{args.max_messages}",
            file=sys.stderr,
        )
        return 1
    return 0


class _ConsumeRun:
    """The print loop of `consume`: poll, print, stop on --max-messages, --timeout-ms of
    silence, Ctrl-C, or a closed stdout."""

    def __init__(self, kind: str, max_messages: int | None, timeout_ms: int | None) -> None:
        self.kind = kind
        self.max_messages = max_messages
        self.timeout_ms = timeout_ms
        self.printed = 0
        self.timed_out = False

    def follow(self, poll: Callable[[int, int | None], list[Record]]) -> None:
        """Print what `poll(timeout_ms, max_records)` returns until the run ends; it never
        asks for more records than are left to print, so a group commits what was printed."""
        out: IO[bytes] = sys.stdout.buffer
        progress = _Progress("consumed", enabled=sys.stderr.isatty() and not sys.stdout.isatty())
        last_record = time.monotonic()
        try:
            while True:
                left = None if self.max_messages is None else self.max_messages - self.printed
                if left == 0:
                    return
                wait_ms = CONSUME_POLL_MS_MAX
                if self.timeout_ms is not None:
                    silent_ms = (time.monotonic() - last_record) * 1000
                    if silent_ms >= self.timeout_ms:
                        self.timed_out = True
                        return
                    wait_ms = max(1, min(wait_ms, int(self.timeout_ms - silent_ms)))
                limit = (
                    CONSUME_POLL_RECORDS_MAX
                    if left is None
                    else min(left, CONSUME_POLL_RECORDS_MAX)
                )
                records = poll(wait_ms, limit)
                if not records:
                    continue
                lines = [format_record(record, self.kind) for record in records]
                out.write(b"".join(lines))
                out.flush()
                self.printed += len(records)
                progress.advance(len(records), sum(map(len, lines)))
                # Silence is time spent waiting for records, not printing them.
                last_record = time.monotonic()
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a follow ends: commit and close as usual
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly; silence the exit-time flush too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        finally:
            progress.close()


# ---------------------------------------------------------------------------- security: files
def _certs(args: argparse.Namespace) -> int:
    from ._certs import CLIENT_DEFAULT, write_dev_certs

    clients = tuple(args.client or (CLIENT_DEFAULT,))
    written = write_dev_certs(
        args.dir,
        datetime.now(UTC),
        days=args.days,
        hosts=tuple(args.host or ()),
        clients=clients,
        force=args.force,
    )
    for path in written:
        kind = "key, mode 0600" if path.name.endswith("-key.pem") else "certificate"
        print(f"wrote {path} ({kind})")
    d = Path(args.dir)
    client = clients[0]
    print()
    print("a development CA: keep ca-key.pem private, and use these for testing only")
    print("broker, TLS with client certificates required (mutual TLS):")
    print(
        f"  riverlog serve --tls-cert {d / 'server.pem'} --tls-key {d / 'server-key.pem'} "
        f"--tls-client-ca {d / 'ca.pem'}"
    )
    print("  (without --tls-client-ca: TLS only; clients then need a token or nothing)")
    print(f"client {client!r} (the broker sees the principal 'CN={client}'):")
    print(
        f"  riverlog whoami --tls-ca {d / 'ca.pem'} --tls-cert {d / f'{client}.pem'} "
        f"--tls-key {d / f'{client}-key.pem'}"
    )
    return 0


def _tokens(args: argparse.Namespace) -> int:
    try:
        return _edit_tokens(args)
    except OSError as e:  # reading errors are SecurityFileError; these come from writing
        print(
            f"riverlog: cannot write the token file {args.tokens_file}: {e.strerror}",
            file=sys.stderr,
        )
        return 1


def _edit_tokens(args: argparse.Namespace) -> int:
    from .security._tokens import TokenStore

    store = TokenStore(args.tokens_file, lambda: time.time_ns() // 1_000_000)
    problem = store.file_mode_problem()
    if problem is not None:
        print(f"riverlog: warning: {problem}", file=sys.stderr)
    command = args.tokens_command
    if command == "add":
        replaced = args.principal in store.principals()
        token = store.add(args.principal)
        if args.json:
            _print_json({"principal": args.principal, "token": token})
        else:
            print(token)
        print(
            f"riverlog: {'replaced the' if replaced else 'added a'} token of "
            f"{args.principal!r} in {args.tokens_file}; it is shown only this once. A running "
            "broker uses it after SIGHUP (kill -HUP <pid>).",
            file=sys.stderr,
        )
    elif command == "remove":
        if not store.remove(args.principal):
            print(
                f"riverlog: principal {args.principal!r} has no token in {args.tokens_file}",
                file=sys.stderr,
            )
            return 1
        if args.json:
            _print_json({"removed": args.principal})
        else:
            print(
                f"removed the token of {args.principal!r}; a running broker refuses it after SIGHUP"
            )
    elif command == "list":
        rows = [(p, store.created_ms(p)) for p in store.principals()]
        if args.json:
            _print_json([{"principal": p, "created_ms": ms} for p, ms in rows])
        else:
            print(
                _table(
                    ["PRINCIPAL", "CREATED"],
                    [[p, None if ms is None else _time_text(ms)] for p, ms in rows],
                )
            )
    else:  # pragma: no cover - argparse allows only the commands above
        raise AssertionError(command)
    return 0


# ---------------------------------------------------------------------------- security: broker
# The filter options of `acls list` and `acls remove`, as list_acls / delete_acls keywords.
_ACL_FILTERS = ("principal", "resource_type", "pattern_type", "name", "operation", "permission")
_ACL_HEADERS = ["PRINCIPAL", "RESOURCE_TYPE", "PATTERN", "NAME", "OPERATION", "PERMISSION"]


def _acl_rows(entries: Iterable[AclEntry]) -> list[list[str]]:
    return [
        [e.principal, e.resource_type, e.pattern_type, e.name, e.operation, e.permission]
        for e in entries
    ]


def _whoami(args: argparse.Namespace) -> int:
    with _admin(_connection(args)) as admin:
        me = admin.whoami()
    if args.json:
        _print_json(me)
    else:
        print(f"principal   {me.principal}")
        print(f"super user  {'yes' if me.super_user else 'no'}")
        print(f"ACLs        {'enforced' if me.acls_enabled else 'not enforced'}")
    return 0


def _acls(args: argparse.Namespace) -> int:
    command = args.acls_command
    if command == "add":
        name = args.name
        if name is None:
            if args.resource_type != "cluster":
                raise UsageError(f"--name is required for resource type {args.resource_type!r}")
            name = "cluster"
        entries = [
            AclEntry(
                principal=args.principal,
                resource_type=args.resource_type,
                pattern_type="prefixed" if args.prefixed else "literal",
                name=name,
                operation=operation,
                permission="deny" if args.deny else "allow",
            )
            for operation in dict.fromkeys(args.operation)
        ]
        with _admin(_connection(args)) as admin:
            created = admin.create_acls(entries)
        if args.json:
            _print_json({"created": created, "acls": entries})
        else:
            print(
                f"created {created} ACL(s)"
                + (f"; {len(entries) - created} existed already" if created < len(entries) else "")
            )
        return 0
    filters = {key: getattr(args, key) for key in _ACL_FILTERS}
    with _admin(_connection(args)) as admin:
        if command == "list":
            entries = admin.list_acls(**filters)
            if args.json:
                _print_json(entries)
            else:
                print(_table(_ACL_HEADERS, _acl_rows(entries)))
        elif command == "remove":
            if all(value is None for value in filters.values()) and not args.all:
                raise UsageError(
                    "acls remove without a filter would remove every ACL: give a filter "
                    "(--principal, --resource-type, --name, ...) or --all"
                )
            deleted = admin.delete_acls(**filters, everything=args.all)
            if args.json:
                _print_json({"deleted": deleted})
            else:
                if deleted:
                    print(_table(_ACL_HEADERS, _acl_rows(deleted)))
                print(f"removed {len(deleted)} ACL(s)")
        else:  # pragma: no cover - argparse allows only the commands above
            raise AssertionError(command)
    return 0


def _quota_principal(args: argparse.Namespace) -> str:
    """PRINCIPAL, or "" for --default (exactly one of them)."""
    if args.default and args.principal:
        raise UsageError("give a PRINCIPAL or --default, not both")
    if not args.default and args.principal is None:
        raise UsageError('give a PRINCIPAL, or --default (or "") for the default quota')
    return "" if args.default else args.principal


def _quotas(args: argparse.Namespace) -> int:
    command = args.quotas_command
    with _admin(_connection(args)) as admin:
        if command == "list":
            listing = admin.list_quotas()
            if args.json:
                _print_json(listing)
            else:
                rows: list[tuple[str, Quota]] = [("(default)", listing.default_quota)]
                rows += sorted(listing.quotas.items())
                print(
                    _table(
                        ["PRINCIPAL", "PRODUCE_BYTES_PER_S", "FETCH_BYTES_PER_S"],
                        [[p, q.produce_bytes_per_s, q.fetch_bytes_per_s] for p, q in rows],
                    )
                )
                print("(- : unlimited; a principal's own quota replaces the default one)")
        elif command == "set":
            principal = _quota_principal(args)
            rates_given = args.produce_bytes_per_s is not None or args.fetch_bytes_per_s is not None
            if rates_given == args.unlimited:  # rates, or --unlimited: exactly one of the two
                raise UsageError(
                    "quotas set needs --produce-bytes-per-s and/or --fetch-bytes-per-s, or "
                    "--unlimited alone"
                )
            admin.set_quota(
                principal,
                produce_bytes_per_s=args.produce_bytes_per_s,
                fetch_bytes_per_s=args.fetch_bytes_per_s,
            )
            quota = Quota(args.produce_bytes_per_s, args.fetch_bytes_per_s)
            if args.json:
                _print_json({"principal": principal, "quota": quota})
            else:
                print(
                    f"set the {'default quota' if not principal else f'quota of {principal!r}'}: "
                    f"produce {_rate_text(quota.produce_bytes_per_s)}, "
                    f"fetch {_rate_text(quota.fetch_bytes_per_s)}"
                )
        elif command == "remove":
            principal = _quota_principal(args)
            admin.remove_quota(principal)
            if args.json:
                _print_json({"removed": principal})
            elif principal:
                print(f"removed the quota of {principal!r}: the default quota applies to it")
            else:
                print("removed the default quota: principals without their own are unlimited")
        else:  # pragma: no cover - argparse allows only the commands above
            raise AssertionError(command)
    return 0


def _rate_text(bytes_per_s: int | None) -> str:
    return "unlimited" if bytes_per_s is None else f"{bytes_per_s} bytes/s"


# ---------------------------------------------------------------------------- parser
def _client_parent(*, with_json: bool) -> argparse.ArgumentParser:
    """Options every client command takes."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--server",
        metavar="HOST:PORT",
        help=f"the broker (default: ${SERVER_ENV}, else {SERVER_DEFAULT})",
    )
    credentials = parent.add_argument_group("connection security")
    credentials.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"send the bearer token on FILE's first line (default: ${TOKEN_ENV}, if set)",
    )
    credentials.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS (implied by the --tls-* options); without --tls-ca the "
        "system's root CAs verify the broker",
    )
    credentials.add_argument(
        "--tls-ca",
        metavar="FILE",
        help=f"TLS, trusting the CA certificate(s) in FILE (PEM) (default: ${TLS_ENV['tls_ca']})",
    )
    credentials.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="present this client certificate (PEM), for a broker that requires one (mutual "
        f"TLS) (default: ${TLS_ENV['tls_cert']})",
    )
    credentials.add_argument(
        "--tls-key",
        metavar="FILE",
        help=f"the private key of --tls-cert (PEM) (default: ${TLS_ENV['tls_key']})",
    )
    if with_json:
        parent.add_argument("--json", action="store_true", help="print JSON, not tables")
    return parent


def _add_reset_arguments(reset: argparse.ArgumentParser, *, shift_by: bool) -> None:
    """GROUP --topic T, one target, --partition, --dry-run: `groups reset-offsets` and (without
    --shift-by) `share-groups reset-offsets`."""
    reset.add_argument("group")
    reset.add_argument("--topic", required=True)
    target = reset.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-earliest", action="store_true", help="the log start offset")
    target.add_argument("--to-latest", action="store_true", help="the log end offset")
    target.add_argument(
        "--to-timestamp",
        type=parse_time_ms,
        metavar="TIME",
        help="the first record at or after TIME (ms or ISO 8601)",
    )
    target.add_argument("--to-offset", type=_not_negative, metavar="N")
    if shift_by:
        target.add_argument(
            "--shift-by", type=int, metavar="N", help="move by N (negative: back), within the log"
        )
    reset.add_argument(
        "--partition",
        type=_not_negative,
        action="append",
        metavar="P",
        help="only this partition; repeatable (default: all)",
    )
    reset.add_argument("--dry-run", action="store_true", help="show the changes, apply none")


def _add_client_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    client = _client_parent(with_json=True)

    topics = commands.add_parser("topics", help="create, list, describe, delete, grow topics")
    topics.set_defaults(run=_topics)
    topic_commands = topics.add_subparsers(dest="topics_command", metavar="COMMAND", required=True)
    create = topic_commands.add_parser("create", parents=[client], help="create a topic")
    create.add_argument("name")
    create.add_argument("--partitions", type=_positive, default=1, metavar="N", help="default: 1")
    create.add_argument(
        "--config",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a per-topic setting (segment_bytes, retention_ms, fsync, ...); repeatable",
    )
    topic_commands.add_parser("list", parents=[client], help="topics and partition counts")
    describe = topic_commands.add_parser(
        "describe", parents=[client], help="offsets, sizes and segments per partition"
    )
    describe.add_argument("name")
    delete = topic_commands.add_parser("delete", parents=[client], help="delete a topic")
    delete.add_argument("name")
    grow = topic_commands.add_parser(
        "add-partitions", parents=[client], help="grow a topic to TOTAL partitions"
    )
    grow.add_argument("name")
    grow.add_argument("total", type=_positive, metavar="TOTAL")

    groups = commands.add_parser("groups", help="list, describe, delete consumer groups")
    groups.set_defaults(run=_groups)
    group_commands = groups.add_subparsers(dest="groups_command", metavar="COMMAND", required=True)
    group_commands.add_parser("list", parents=[client], help="groups, states, member counts")
    describe = group_commands.add_parser(
        "describe", parents=[client], help="members, committed offsets and lag"
    )
    describe.add_argument("group")
    delete = group_commands.add_parser(
        "delete", parents=[client], help="forget a group's offsets (no members)"
    )
    delete.add_argument("group")
    reset = group_commands.add_parser(
        "reset-offsets", parents=[client], help="move a group's committed offsets (no members)"
    )
    _add_reset_arguments(reset, shift_by=True)

    share_groups = commands.add_parser(
        "share-groups", help="list, describe, alter, reset, delete share groups"
    )
    share_groups.set_defaults(run=_share_groups)
    share_commands = share_groups.add_subparsers(
        dest="share_groups_command", metavar="COMMAND", required=True
    )
    share_commands.add_parser("list", parents=[client], help="share groups and member counts")
    describe = share_commands.add_parser(
        "describe",
        parents=[client],
        help="settings, members, and per partition the in-flight window and lag",
    )
    describe.add_argument("group")
    alter = share_commands.add_parser(
        "alter", parents=[client], help="change a share group's settings (others keep theirs)"
    )
    alter.add_argument("group")
    alter.add_argument("--lock-ms", type=_not_negative, metavar="N", help="1000..3600000")
    alter.add_argument("--max-delivery-attempts", type=_not_negative, metavar="N", help="1..100")
    alter.add_argument(
        "--dead-letter-topic", metavar="T", help='where archived records go ("": nowhere)'
    )
    alter.add_argument(
        "--start",
        choices=["earliest", "latest"],
        help="where the group starts in partitions it has no state for",
    )
    alter.add_argument("--retry-backoff-ms", type=_not_negative, metavar="N", help="0..3600000")
    alter.add_argument("--retry-backoff-max-ms", type=_not_negative, metavar="N", help="0..3600000")
    alter.set_defaults(parser=alter)
    reset = share_commands.add_parser(
        "reset-offsets",
        parents=[client],
        help="move a share group's start offsets, clearing its windows (no members)",
    )
    _add_reset_arguments(reset, shift_by=False)
    delete = share_commands.add_parser(
        "delete", parents=[client], help="forget a share group and its state (no members)"
    )
    delete.add_argument("group")

    produce = commands.add_parser(
        "produce", parents=[client], help="send stdin to a topic, one record per line"
    )
    produce.add_argument("topic")
    produce.add_argument(
        "--key-separator",
        metavar="SEP",
        help="each line is KEY SEP VALUE, split at the first SEP (default: no key)",
    )
    produce.add_argument(
        "--header",
        type=_header,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a header on every record (KEY alone: null value); repeatable",
    )
    produce.add_argument(
        "--partition", type=_not_negative, metavar="P", help="default: by key (round-robin)"
    )
    produce.add_argument("--acks", choices=["none", "leader", "all"], default="leader")
    produce.add_argument("--compression", choices=["none", "gzip", "lz4", "zstd"], default="none")
    produce.set_defaults(run=_produce)

    consume = commands.add_parser(
        "consume", parents=[_client_parent(with_json=False)], help="print a topic's records"
    )
    consume.add_argument("topic")
    start = consume.add_mutually_exclusive_group()
    start.add_argument(
        "--from-beginning", action="store_true", help="start at the log start offset"
    )
    start.add_argument("--offset", type=_not_negative, metavar="N", help="start at offset N")
    start.add_argument(
        "--timestamp",
        type=parse_time_ms,
        metavar="TIME",
        help="start at the first record at or after TIME (ms or ISO 8601)",
    )
    consume.add_argument(
        "--partition", type=_not_negative, metavar="P", help="only this partition (default: all)"
    )
    consume.add_argument("--group", metavar="G", help="consume as a member of group G")
    consume.add_argument("--max-messages", type=_positive, metavar="N", help="stop after N records")
    consume.add_argument(
        "--timeout-ms",
        type=_not_negative,
        metavar="MS",
        help="stop after MS without a new record (default: follow until Ctrl-C)",
    )
    consume.add_argument("--format", choices=["text", "json", "raw"], default="text")
    consume.set_defaults(run=_consume, parser=consume)
    _add_security_commands(commands, client)


def _add_acl_filters(parser: argparse.ArgumentParser) -> None:
    """The filter options of `acls list` and `acls remove` (none given: every ACL)."""
    parser.add_argument("--principal", metavar="P", help='a principal, or "*" (the wildcard)')
    parser.add_argument("--resource-type", choices=list(RESOURCE_TYPES))
    parser.add_argument("--pattern-type", choices=["literal", "prefixed"])
    parser.add_argument("--name", metavar="N", help="the ACL's resource name or prefix")
    parser.add_argument("--operation", choices=list(OPERATIONS))
    parser.add_argument("--permission", choices=["allow", "deny"])


def _add_security_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    client: argparse.ArgumentParser,
) -> None:
    certs = commands.add_parser(
        "certs",
        help="make a development CA and TLS certificates (testing only)",
        description="Write a throwaway CA (ca.pem, ca-key.pem), a broker certificate for "
        "localhost, 127.0.0.1, ::1 and every --host (server.pem, server-key.pem) and a client "
        "certificate per --client NAME with subject CN=NAME (NAME.pem, NAME-key.pem) into DIR; "
        "keys are mode 0600. Then prints the `riverlog serve` and client options to use them.",
    )
    certs.add_argument("dir", metavar="DIR")
    certs.add_argument("--days", type=_positive, default=365, metavar="N", help="default: 365")
    certs.add_argument(
        "--host",
        action="append",
        metavar="NAME",
        help="another DNS name or IP address of the broker; repeatable",
    )
    certs.add_argument(
        "--client",
        action="append",
        metavar="NAME",
        help="a client certificate for CN=NAME; repeatable (default: one named 'client')",
    )
    certs.add_argument("--force", action="store_true", help="replace existing files in DIR")
    certs.set_defaults(run=_certs)

    tokens = commands.add_parser(
        "tokens",
        help="add, remove, list bearer tokens in a token file (no broker needed)",
        description="Edit the token file of `riverlog serve --tokens-file FILE` directly. The "
        "file keeps only each token's SHA-256: a token is printed once, by `add`. A running "
        "broker picks up the changes on SIGHUP (kill -HUP <pid>).",
    )
    tokens.set_defaults(run=_tokens)
    token_commands = tokens.add_subparsers(dest="tokens_command", metavar="COMMAND", required=True)
    file_parent = argparse.ArgumentParser(add_help=False)
    file_parent.add_argument("--tokens-file", required=True, metavar="FILE", help="the token file")
    file_parent.add_argument("--json", action="store_true", help="print JSON, not text")
    add = token_commands.add_parser(
        "add",
        parents=[file_parent],
        help="give PRINCIPAL a new token (replacing its old one) and print it, once",
    )
    add.add_argument("principal", metavar="PRINCIPAL")
    remove = token_commands.add_parser(
        "remove", parents=[file_parent], help="remove PRINCIPAL's token (it stops working)"
    )
    remove.add_argument("principal", metavar="PRINCIPAL")
    token_commands.add_parser(
        "list", parents=[file_parent], help="the principals with a token (never the tokens)"
    )

    whoami = commands.add_parser(
        "whoami", parents=[client], help="the principal the broker sees for these credentials"
    )
    whoami.set_defaults(run=_whoami)

    acls = commands.add_parser(
        "acls",
        help="add, list, remove access-control lists",
        description="ACLs (enforced by `riverlog serve --acls`): PRINCIPAL may (or, with "
        "--deny, may not) do OPERATION on the resources of RESOURCE_TYPE named NAME (with "
        "--prefixed: every name starting with NAME; '*' is every name). DENY wins over ALLOW; "
        "read, write, delete and alter imply describe. Needs ALTER (list: DESCRIBE) on the "
        "cluster, or a super user.",
    )
    acls.set_defaults(run=_acls)
    acl_commands = acls.add_subparsers(dest="acls_command", metavar="COMMAND", required=True)
    add = acl_commands.add_parser("add", parents=[client], help="add ACLs (one per --operation)")
    add.add_argument(
        "--principal",
        required=True,
        metavar="P",
        help='a principal ("CN=alice" for a certificate) or "*" for every one',
    )
    add.add_argument("--resource-type", required=True, choices=list(RESOURCE_TYPES))
    add.add_argument(
        "--name", metavar="N", help='the resource name, "*" for all (cluster: "cluster")'
    )
    add.add_argument("--prefixed", action="store_true", help="NAME is a prefix")
    add.add_argument(
        "--operation",
        required=True,
        action="append",
        choices=list(OPERATIONS),
        help="repeatable",
    )
    add.add_argument("--deny", action="store_true", help="a DENY ACL (default: ALLOW)")
    listing = acl_commands.add_parser(
        "list", parents=[client], help="the ACLs matching the filters (none: all)"
    )
    _add_acl_filters(listing)
    remove = acl_commands.add_parser(
        "remove", parents=[client], help="remove the ACLs matching the filters"
    )
    _add_acl_filters(remove)
    remove.add_argument("--all", action="store_true", help="remove every ACL (no filter)")

    quotas = commands.add_parser(
        "quotas",
        help="list, set, remove produce and fetch quotas (bytes per second)",
        description="A principal over its quota gets its answers late, and the client waits "
        "as long again (throttle_time_ms). A principal's own quota replaces the default one; a "
        "rate not given is unlimited.",
    )
    quotas.set_defaults(run=_quotas)
    quota_commands = quotas.add_subparsers(dest="quotas_command", metavar="COMMAND", required=True)
    quota_commands.add_parser("list", parents=[client], help="the default and every own quota")
    for verb, text in (("set", "set a quota"), ("remove", "remove a principal's own quota")):
        command = quota_commands.add_parser(verb, parents=[client], help=text)
        command.add_argument(
            "principal", nargs="?", metavar="PRINCIPAL", help='"" or --default: the default'
        )
        command.add_argument("--default", action="store_true", help="the default quota")
        if verb == "set":
            command.add_argument(
                "--produce-bytes-per-s", type=_positive, metavar="N", help="default: unlimited"
            )
            command.add_argument(
                "--fetch-bytes-per-s", type=_positive, metavar="N", help="default: unlimited"
            )
            command.add_argument(
                "--unlimited",
                action="store_true",
                help="no limits: exempts a principal from the default quota",
            )


def _super_users(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected principals separated by commas, got {text!r}")
    return names


def _add_serve_security(serve: argparse.ArgumentParser) -> None:
    security = serve.add_argument_group(
        "security",
        "Off by default: a broker listens on loopback only and anyone who connects may do "
        "everything. TLS: --tls-cert and --tls-key; mutual TLS: add --tls-client-ca; "
        "authentication: --tokens-file and/or --tls-client-ca; authorization: --acls "
        "(with --super-users); quotas: `riverlog quotas set` on the running broker. "
        "`riverlog certs DIR` makes development certificates.",
    )
    security.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="serve TLS with this certificate (chain, PEM); needs --tls-key",
    )
    security.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    security.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="require every client to present a certificate signed by a CA in FILE (mutual "
        'TLS); its subject ("CN=alice") is the caller\'s principal. Needs --tls-cert',
    )
    security.add_argument(
        "--tokens-file",
        metavar="FILE",
        help="authenticate callers by bearer token (`riverlog tokens add`); a call with no "
        "token (and no client certificate) is refused UNAUTHENTICATED. Re-read on SIGHUP",
    )
    security.add_argument(
        "--super-users",
        type=_super_users,
        metavar="P1,P2",
        help="principals that may do everything, whatever the ACLs",
    )
    security.add_argument(
        "--acls",
        action="store_true",
        help="enforce ACLs: a principal may do only what an ACL allows (`riverlog acls add`; "
        "kept in DATA_DIR/acls.json)",
    )
    security.add_argument(
        "--acls-file",
        metavar="FILE",
        help="add the ACLs in FILE at start (JSON, the format of DATA_DIR/acls.json)",
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on an address other than loopback without TLS (tokens and "
        "records then cross the network in the clear)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="riverlog",
        description=__doc__.splitlines()[0],
        epilog="Exit codes: 0 ok, 1 error, 2 usage.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the broker (gRPC)")
    serve.add_argument("--data-dir", help=f"default: ./{DEFAULT_DATA_DIR}")
    serve.add_argument("--listen", help="HOST:PORT, default 127.0.0.1:7171 (port 0: any free)")
    serve.add_argument("--config", help="a TOML file with [broker] and [log] tables")
    serve.add_argument("--auto-create-topics", action="store_true", help="create on first produce")
    serve.add_argument("--workers", type=int, help="gRPC worker threads (default 64)")
    for flag, field in _LOG_FLAGS:
        serve.add_argument(flag, dest=field, help=f"broker-wide default for {field}")
    _add_serve_security(serve)
    serve.set_defaults(run=_serve)
    demo = commands.add_parser("demo", help="append to a partition log and read it back")
    demo.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="default: ./riverlog-data")
    demo.add_argument("--records", type=int, default=100_000)
    demo.set_defaults(run=_demo)
    _add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UsageError as e:
        print(f"riverlog: {redact(str(e))}", file=sys.stderr)
        return 2
    except (StorageError, RiverlogError) as e:
        # redact: no message shows a token, even one a broker echoed.
        print(f"riverlog: {redact(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
