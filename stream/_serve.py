"""Running a broker: settings from flags and TOML, the listener, background work, shutdown.

Shutdown (SIGTERM or SIGINT, or `RunningBroker.stop`): the broker refuses new work and wakes
waiting fetchers and subscribers; grpc stops accepting calls and gives in-flight ones up to
`shutdown_grace_s`; every log is flushed, its indexes trimmed and its clean-shutdown marker
written; the process exits 0. The next start skips the recovery scan.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import threading
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from storage import InvalidConfigError, LogConfig

from ._broker import SUBSCRIBERS_MAX, Broker, BrokerConfig, wall_clock_ms
from ._groups import GroupManager
from ._producer_ids import NAME_EXPIRY_MS_DEFAULT
from ._server import WORKERS_DEFAULT, build_server
from ._share import MAX_IN_FLIGHT_DEFAULT as SHARE_MAX_IN_FLIGHT_DEFAULT
from ._share import MAX_IN_FLIGHT_MAX as SHARE_MAX_IN_FLIGHT_MAX
from ._share import ShareGroupManager
from .groups._offsets import OffsetStore
from .share._state import ShareStateStore

log = logging.getLogger("riverlog.serve")

LISTEN_DEFAULT = "127.0.0.1:7171"
DATA_DIR_DEFAULT = "riverlog-data"
# In-flight calls get this long to finish once shutdown starts.
SHUTDOWN_GRACE_S_DEFAULT = 5.0
# The background worker wakes at least this often (fsync `interval`, retention checks).
BACKGROUND_PERIOD_MS_MAX = 1000
# Worker threads always left for unary calls, whatever the subscribe streams hold.
UNARY_WORKERS_MIN = 16


@dataclasses.dataclass(frozen=True, slots=True)
class ServeConfig:
    broker: BrokerConfig
    listen: str = LISTEN_DEFAULT
    workers: int = WORKERS_DEFAULT
    shutdown_grace_s: float = SHUTDOWN_GRACE_S_DEFAULT
    # Records in flight per share-partition (see stream/_share.py).
    share_max_in_flight: int = SHARE_MAX_IN_FLIGHT_DEFAULT


_BROKER_KEYS = {
    "data_dir",
    "listen",
    "auto_create_topics",
    "auto_create_partitions",
    "retention_check_interval_ms",
    "workers",
    "shutdown_grace_s",
    "subscribers_max",
    "producer_name_expiry_ms",
    "share_max_in_flight",
}


def load_config(
    toml_path: str | None, overrides: Mapping[str, Any], log_overrides: Mapping[str, Any]
) -> ServeConfig:
    """Settings: built-in defaults, then the TOML file's [broker] and [log] tables, then flags.

    [broker]: data_dir, listen, auto_create_topics, auto_create_partitions,
              retention_check_interval_ms, workers, shutdown_grace_s, subscribers_max,
              producer_name_expiry_ms, share_max_in_flight
    [log]:    any LogConfig field, as broker-wide defaults for every topic
    """
    broker_table: dict[str, Any] = {}
    log_table: dict[str, Any] = {}
    if toml_path is not None:
        try:
            with open(toml_path, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InvalidConfigError(f"cannot read config {toml_path}: {e}") from None
        unknown = set(doc) - {"broker", "log"}
        if unknown:
            raise InvalidConfigError(
                f"{toml_path}: unknown tables {sorted(unknown)}; known: broker, log"
            )
        broker_table = dict(doc.get("broker", {}))
        log_table = dict(doc.get("log", {}))
    broker_table.update({k: v for k, v in overrides.items() if v is not None})
    log_table.update({k: v for k, v in log_overrides.items() if v is not None})
    unknown_keys = set(broker_table) - _BROKER_KEYS
    if unknown_keys:
        raise InvalidConfigError(
            f"unknown broker settings {sorted(unknown_keys)}; known: {sorted(_BROKER_KEYS)}"
        )
    log_config = LogConfig().with_overrides(log_table)
    broker = BrokerConfig(
        data_dir=Path(broker_table.get("data_dir", DATA_DIR_DEFAULT)),
        log=log_config,
        auto_create_topics=bool(broker_table.get("auto_create_topics", False)),
        auto_create_partitions=int(broker_table.get("auto_create_partitions", 1)),
        retention_check_interval_ms=int(broker_table.get("retention_check_interval_ms", 60_000)),
        subscribers_max=int(broker_table.get("subscribers_max", SUBSCRIBERS_MAX)),
        producer_name_expiry_ms=int(
            broker_table.get("producer_name_expiry_ms", NAME_EXPIRY_MS_DEFAULT)
        ),
    )
    workers = int(broker_table.get("workers", WORKERS_DEFAULT))
    if not 4 <= workers <= 1024:
        raise InvalidConfigError(f"workers must be in [4, 1024], got {workers}")
    if broker.subscribers_max > workers - UNARY_WORKERS_MIN:
        raise InvalidConfigError(
            f"subscribers_max {broker.subscribers_max} leaves fewer than {UNARY_WORKERS_MIN} "
            f"of {workers} workers for other calls; raise workers or lower subscribers_max"
        )
    in_flight = int(broker_table.get("share_max_in_flight", SHARE_MAX_IN_FLIGHT_DEFAULT))
    if not 1 <= in_flight <= SHARE_MAX_IN_FLIGHT_MAX:
        raise InvalidConfigError(
            f"share_max_in_flight must be in [1, {SHARE_MAX_IN_FLIGHT_MAX}], got {in_flight}"
        )
    return ServeConfig(
        broker=broker,
        listen=str(broker_table.get("listen", LISTEN_DEFAULT)),
        workers=workers,
        shutdown_grace_s=float(broker_table.get("shutdown_grace_s", SHUTDOWN_GRACE_S_DEFAULT)),
        share_max_in_flight=in_flight,
    )


# glibc's malloc serves blocks over its mmap threshold with fresh mmaps and raises that
# threshold adaptively; across 64 worker threads it can settle low, and then every 1 MiB
# fetch answer costs ~1,200 page faults (measured: fetch fell to 235-270 MB/s). Fixed
# thresholds keep answer buffers in the heap and reused. Costs a higher high-water mark.
MALLOC_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
MALLOC_TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Fix glibc malloc's thresholds for the broker process; False where it does not apply."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES) == 1
    return bool(ok and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES) == 1)


class RunningBroker:
    """A started broker: its gRPC server, bound port, and background worker."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.broker = Broker(config.broker)
        try:
            self.offsets = OffsetStore.open(config.broker.data_dir, wall_clock_ms())
        except BaseException:
            self.broker.close()
            raise
        self.groups = GroupManager(self.broker, self.offsets, wall_clock_ms)
        try:
            self.share_state = ShareStateStore.open(config.broker.data_dir, wall_clock_ms())
        except BaseException:
            self.offsets.close()
            self.broker.close()
            raise
        try:
            self.share = ShareGroupManager(
                self.broker,
                self.share_state,
                wall_clock_ms,
                max_in_flight=config.share_max_in_flight,
            )
        except BaseException:
            self._close_stores()
            raise
        self.server = build_server(self.broker, self.groups, self.share, workers=config.workers)
        try:
            self.port = self.server.add_insecure_port(config.listen)
        except RuntimeError as e:
            self._close_stores()
            raise InvalidConfigError(f"cannot listen on {config.listen}: {e}") from None
        if self.port == 0:
            self._close_stores()
            raise InvalidConfigError(f"cannot listen on {config.listen}")
        self._stopped = threading.Event()
        self._worker = threading.Thread(target=self._background, name="riverlog-bg", daemon=True)

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def start(self) -> None:
        self.server.start()
        self._worker.start()
        log.info(
            "riverlog listening on %s (gRPC: riverlog.v1.Broker, riverlog.v1.Admin, "
            "riverlog.v1.Groups, riverlog.v1.Share, grpc.health.v1.Health, reflection); "
            "data in %s",
            self.address,
            self.config.broker.data_dir,
        )

    def _background(self) -> None:
        cfg = self.config.broker
        period_ms = min(BACKGROUND_PERIOD_MS_MAX, cfg.log.fsync_interval_ms)
        since_retention_ms = 0
        while not self._stopped.wait(period_ms / 1000):
            try:
                self.broker.flush_due()
                self.groups.expire()
                self.share.expire()
                since_retention_ms += period_ms
                if since_retention_ms >= cfg.retention_check_interval_ms:
                    since_retention_ms = 0
                    self.broker.tick()
            except Exception:
                log.exception("background work failed; retrying next period")

    def stop(self) -> None:
        """Graceful stop: refuse new work, let in-flight calls finish, close logs cleanly."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.broker.begin_shutdown()
        done: threading.Event = self.server.stop(self.config.shutdown_grace_s)
        done.wait(self.config.shutdown_grace_s + 1)
        if self._worker.is_alive():
            self._worker.join(timeout=5)
        self._close_stores()

    def _close_stores(self) -> None:
        try:
            self.share_state.close()
        finally:
            try:
                self.offsets.close()
            finally:
                self.broker.close()

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        return bool(self.server.wait_for_termination(timeout_s))


def channel_ready(address: str, timeout_s: float = 5.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            return False
    return True
