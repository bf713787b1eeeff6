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
from .security._acl import Authorizer
from .security._guard import Guard
from .security._quota import QuotaManager
from .security._tokens import TokenStore
from .share._state import ShareStateStore

ACLS_FILE_NAME = "acls.json"
QUOTAS_FILE_NAME = "quotas.json"

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
class SecurityConfig:
    """TLS, authentication and ACLs (README "Security"); everything off by default."""

    # TLS on the listener: certificate chain and key (PEM).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # With it, clients must present a certificate signed by this CA (mutual TLS); its
    # subject is their principal.
    tls_client_ca_file: str | None = None
    # Principals and token hashes (riverlog tokens add); with it, every call needs a token
    # (or a client certificate). Reloaded on SIGHUP.
    tokens_file: str | None = None
    # Principals allowed everything (Kafka's super.users).
    super_users: tuple[str, ...] = ()
    # Enforce ACLs (default deny); ACLs live in <data_dir>/acls.json.
    acls_enabled: bool = False
    # ACLs added at start (the same JSON format as acls.json).
    acls_bootstrap_file: str | None = None
    # Allow plaintext on a non-loopback address.
    insecure: bool = False

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


@dataclasses.dataclass(frozen=True, slots=True)
class ServeConfig:
    broker: BrokerConfig
    listen: str = LISTEN_DEFAULT
    workers: int = WORKERS_DEFAULT
    shutdown_grace_s: float = SHUTDOWN_GRACE_S_DEFAULT
    # Records in flight per share-partition (see stream/_share.py).
    share_max_in_flight: int = SHARE_MAX_IN_FLIGHT_DEFAULT
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)


SECURITY_KEYS = (
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "tokens_file",
    "super_users",
    "acls_enabled",
    "acls_bootstrap_file",
    "insecure",
)

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
    *SECURITY_KEYS,
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
    security = _security_config(broker_table)
    listen = str(broker_table.get("listen", LISTEN_DEFAULT))
    _check_listener(listen, security)
    return ServeConfig(
        broker=broker,
        listen=listen,
        workers=workers,
        shutdown_grace_s=float(broker_table.get("shutdown_grace_s", SHUTDOWN_GRACE_S_DEFAULT)),
        share_max_in_flight=in_flight,
        security=security,
    )


def _security_config(table: Mapping[str, Any]) -> SecurityConfig:
    def path(key: str) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise InvalidConfigError(f"{key} must be a file path")
        return value

    users = table.get("super_users", ())
    if isinstance(users, str):
        users = [u for u in (part.strip() for part in users.split(",")) if u]
    if not isinstance(users, list | tuple) or not all(isinstance(u, str) for u in users):
        raise InvalidConfigError("super_users must be a list of principal names")
    config = SecurityConfig(
        tls_cert_file=path("tls_cert_file"),
        tls_key_file=path("tls_key_file"),
        tls_client_ca_file=path("tls_client_ca_file"),
        tokens_file=path("tokens_file"),
        super_users=tuple(users),
        acls_enabled=bool(table.get("acls_enabled", False)),
        acls_bootstrap_file=path("acls_bootstrap_file"),
        insecure=bool(table.get("insecure", False)),
    )
    if (config.tls_cert_file is None) != (config.tls_key_file is None):
        raise InvalidConfigError("TLS needs both tls_cert_file and tls_key_file")
    if config.tls_client_ca_file is not None and not config.tls:
        raise InvalidConfigError("tls_client_ca_file (mutual TLS) needs TLS: set tls_cert_file")
    for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "tokens_file"):
        value = getattr(config, key)
        if value is not None and key != "tokens_file" and not Path(value).is_file():
            raise InvalidConfigError(f"{key}: no such file {value}")
    if config.acls_bootstrap_file is not None and not Path(config.acls_bootstrap_file).is_file():
        raise InvalidConfigError(f"acls_bootstrap_file: no such file {config.acls_bootstrap_file}")
    return config


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0]
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _check_listener(listen: str, security: SecurityConfig) -> None:
    """Plaintext only on loopback, unless the operator says --insecure (and is warned)."""
    if security.tls or is_loopback(listen):
        return
    if not security.insecure:
        raise InvalidConfigError(
            f"listening on {listen} without TLS would let anyone on the network read and "
            "write: give a certificate (--tls-cert, --tls-key) or say --insecure"
        )
    log.warning("listening on %s WITHOUT TLS (--insecure): traffic is plaintext", listen)


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
        try:
            self.guard = _guard(config)
        except BaseException:
            self._close_stores()
            raise
        self.server = build_server(
            self.broker, self.groups, self.share, guard=self.guard, workers=config.workers
        )
        try:
            credentials = _server_credentials(config.security)
            if credentials is None:
                self.port = self.server.add_insecure_port(config.listen)
            else:
                self.port = self.server.add_secure_port(config.listen, credentials)
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

    def reload(self) -> None:
        """Re-read what may change while running (SIGHUP): the tokens file."""
        if self.guard.tokens is not None:
            self.guard.tokens.reload()
            log.info(
                "reloaded %d principal(s) from the tokens file", len(self.guard.tokens.principals())
            )

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        return bool(self.server.wait_for_termination(timeout_s))


def _guard(config: ServeConfig) -> Guard:
    sec = config.security
    data_dir = config.broker.data_dir
    tokens = None if sec.tokens_file is None else TokenStore.load(sec.tokens_file, wall_clock_ms)
    authorizer = Authorizer(
        data_dir / ACLS_FILE_NAME, frozenset(sec.super_users), enabled=sec.acls_enabled
    )
    if sec.acls_bootstrap_file is not None:
        added = authorizer.load_file(sec.acls_bootstrap_file)
        log.info("added %d ACL(s) from %s", added, sec.acls_bootstrap_file)
    quotas = QuotaManager(wall_clock_ms, data_dir / QUOTAS_FILE_NAME)
    return Guard(
        tokens=tokens,
        authorizer=authorizer,
        quotas=quotas,
        require_client_cert=sec.tls_client_ca_file is not None,
    )


def _server_credentials(sec: SecurityConfig) -> grpc.ServerCredentials | None:
    if not sec.tls:
        return None
    assert sec.tls_cert_file is not None
    assert sec.tls_key_file is not None
    try:
        chain = Path(sec.tls_cert_file).read_bytes()
        key = Path(sec.tls_key_file).read_bytes()
        ca = None if sec.tls_client_ca_file is None else Path(sec.tls_client_ca_file).read_bytes()
    except OSError as e:
        raise InvalidConfigError(f"cannot read a TLS file: {e}") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_ready(address: str, timeout_s: float = 5.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            return False
    return True
