"""Per-principal byte-rate quotas for produce and fetch, enforced Kafka's way: by delay.

The broker serves a request in full, calls `record` with its bytes, and delays the response by
the throttle time returned; a client that waits for its responses is thereby held to its quota
without any request being refused.

Rate: a sliding window, as Kafka's (quota.window.num=11, quota.window.size.seconds=1). Bytes
are summed in SAMPLES samples of SAMPLE_MS each, aligned to the clock (the current one and the
10 before it). The observed rate is the bytes in those samples over the time since the start
of the oldest sample that holds bytes, at least one SAMPLE_MS; when it is above the quota,

    throttle_ms = (observed - quota) / quota * window_ms  =  (bytes - quota * window_s) / quota

that is, the time after which the same bytes would be within the quota (rounded up, capped at
THROTTLE_MS_MAX). A client that waits out each throttle is therefore held at its quota exactly
on average; the unit tests check a producer within 10% over 10 s.

Why this and not a token bucket: it is what Kafka users know (the same settings and formula),
and it averages over ~10 s, so a single large request or a short burst within the window's
allowance is not delayed. One deliberate difference from Kafka: Kafka's rate divides by at
least 10 full samples even for a principal it has just started measuring, which lets a new
client send 10 seconds' worth of quota at once; here the window starts at the principal's
oldest recorded bytes (at least 1 s), so a new or long-idle principal gets at most 1 s worth
before it is throttled. The cost of the window: 2 x 11 ints per (principal, kind) and an
11-sample scan per `record`.

Quota file (UTF-8 JSON, replaced whole with atomic_write; null = unlimited):

    {"format": 1,
     "default": {"produce_bytes_per_s": null, "fetch_bytes_per_s": null},
     "principals": {"alice": {"produce_bytes_per_s": 1048576, "fetch_bytes_per_s": null}}}
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from storage import InvalidConfigError, LimitExceededError

from ._tokens import (
    FILE_FORMAT,
    InvalidPrincipalError,
    SecurityFileError,
    check_principal,
    read_json_file,
    write_json_file,
)

QuotaKind = Literal["produce", "fetch"]
KINDS: tuple[QuotaKind, ...] = ("produce", "fetch")

# Kafka's quota.window.size.seconds and quota.window.num.
SAMPLE_MS = 1000
SAMPLES = 11
WINDOW_MS_MAX = SAMPLES * SAMPLE_MS
# Kafka's default max throttle is 30 s too (a longer delay would time clients out first).
THROTTLE_MS_MAX = 30_000
# Principals with their own quota (bounds the file).
QUOTAS_MAX = 100_000
# Rate windows kept (one per principal and kind recently seen); idle ones are dropped first.
SENSORS_MAX = 100_000
_FIELDS = ("produce_bytes_per_s", "fetch_bytes_per_s")


class InvalidQuotaError(InvalidConfigError):
    """A quota that is not None (unlimited) or an integer >= 1 byte/s."""


@dataclass(frozen=True)
class Quota:
    """Byte-rate limits of one principal (or the default); None is unlimited."""

    produce_bytes_per_s: int | None = None
    fetch_bytes_per_s: int | None = None

    def __post_init__(self) -> None:
        for field in _FIELDS:
            value = getattr(self, field)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise InvalidQuotaError(f"{field} {value!r}: must be None or an integer >= 1")

    def limit(self, kind: QuotaKind) -> int | None:
        return self.produce_bytes_per_s if kind == "produce" else self.fetch_bytes_per_s

    def to_json(self) -> dict[str, int | None]:
        return {field: getattr(self, field) for field in _FIELDS}

    @classmethod
    def from_json(cls, entry: Any) -> Quota:
        if not isinstance(entry, dict) or set(entry) - set(_FIELDS):
            raise InvalidQuotaError(f"a quota is an object with the fields {_FIELDS}")
        return cls(**entry)


UNLIMITED = Quota()


class _Rate:
    """Bytes per clock-aligned sample, in a ring of SAMPLES slots."""

    __slots__ = ("last_ms", "sample_bytes", "sample_index")

    def __init__(self) -> None:
        self.sample_index = [-1] * SAMPLES  # which sample (now_ms // SAMPLE_MS) a slot holds
        self.sample_bytes = [0] * SAMPLES
        self.last_ms = 0

    def record(self, now_ms: int, nbytes: int) -> tuple[int, int]:
        """Add `nbytes` at `now_ms`; returns (bytes in the window, window length in ms)."""
        now_ms = max(now_ms, self.last_ms)  # a clock that steps back does not rewind samples
        self.last_ms = now_ms
        current = now_ms // SAMPLE_MS
        slot = current % SAMPLES
        if self.sample_index[slot] != current:
            self.sample_index[slot] = current
            self.sample_bytes[slot] = 0
        self.sample_bytes[slot] += nbytes
        total = 0
        oldest = current
        for index, nbytes_sample in zip(self.sample_index, self.sample_bytes, strict=True):
            if index > current - SAMPLES and nbytes_sample:
                total += nbytes_sample
                oldest = min(oldest, index)
        return total, max(now_ms - oldest * SAMPLE_MS, SAMPLE_MS)


def throttle_ms(window_bytes: int, window_ms: int, quota_bytes_per_s: int) -> int:
    """The delay after which `window_bytes` over the window is within the quota (0 if it is
    already), rounded up to whole ms and capped at THROTTLE_MS_MAX."""
    excess = window_bytes * 1000 - quota_bytes_per_s * window_ms  # bytes x ms/s
    if excess <= 0:
        return 0
    return min(-(-excess // quota_bytes_per_s), THROTTLE_MS_MAX)


class QuotaManager:
    """The quotas (kept in the JSON file at `path`; None: in memory only) and the rates.

    Thread-safe: one lock, held for a dict lookup and an 11-sample scan per `record`.
    """

    def __init__(
        self, clock_ms: Callable[[], int], path: str | os.PathLike[str] | None = None
    ) -> None:
        self._clock_ms = clock_ms
        self._path = None if path is None else Path(path)
        self._lock = threading.Lock()
        self._default = UNLIMITED
        self._quotas: dict[str, Quota] = {}
        self._sensors: dict[tuple[str, QuotaKind], _Rate] = {}
        self._purge_after_ms = 0
        if self._path is not None:
            doc = read_json_file(self._path)
            if doc is not None:
                self._default, self._quotas = _parse_quotas(self._path, doc)

    @property
    def default(self) -> Quota:
        """The quota of every principal without its own."""
        return self._default

    def set_default(self, quota: Quota) -> None:
        with self._lock:
            self._save_locked(quota, self._quotas)
            self._default = quota

    def set(self, principal: str, quota: Quota) -> None:
        """Give `principal` its own quota (in effect from its next `record`)."""
        check_principal(principal)
        with self._lock:
            if principal not in self._quotas and len(self._quotas) >= QUOTAS_MAX:
                raise LimitExceededError(
                    f"cannot set a quota for {principal!r}: {len(self._quotas)} principals "
                    "already have their own, the limit"
                )
            quotas = {**self._quotas, principal: quota}
            self._save_locked(self._default, quotas)
            self._quotas = quotas

    def remove(self, principal: str) -> bool:
        """Drop `principal`'s own quota (the default applies again); False if it had none."""
        with self._lock:
            if principal not in self._quotas:
                return False
            quotas = {p: q for p, q in self._quotas.items() if p != principal}
            self._save_locked(self._default, quotas)
            self._quotas = quotas
        return True

    def get(self, principal: str) -> Quota:
        """The quota in effect for `principal`: its own, else the default."""
        return self._quotas.get(principal, self._default)

    def list(self) -> dict[str, Quota]:
        """The principals with their own quota, and those quotas."""
        return dict(self._quotas)

    def record(self, principal: str, kind: QuotaKind, nbytes: int) -> int:
        """Account `nbytes` of `kind` served to `principal`; returns how many ms to delay the
        response so that its rate stays within its quota (0: under quota or unlimited)."""
        assert nbytes >= 0, nbytes
        assert kind in KINDS, kind
        with self._lock:
            limit = self._quotas.get(principal, self._default).limit(kind)
            if limit is None:
                return 0
            now_ms = self._clock_ms()
            key = (principal, kind)
            sensor = self._sensors.get(key)
            if sensor is None:
                self._make_room_locked(now_ms)
                sensor = self._sensors[key] = _Rate()
            window_bytes, window_ms = sensor.record(now_ms, nbytes)
        return throttle_ms(window_bytes, window_ms, limit)

    def _make_room_locked(self, now_ms: int) -> None:
        if len(self._sensors) < SENSORS_MAX:
            return
        if now_ms >= self._purge_after_ms:  # an O(n) sweep at most once per sample
            self._purge_after_ms = now_ms + SAMPLE_MS
            idle_before_ms = now_ms - WINDOW_MS_MAX  # nothing of theirs is in a window now
            for key in [k for k, s in self._sensors.items() if s.last_ms < idle_before_ms]:
                del self._sensors[key]
        while len(self._sensors) >= SENSORS_MAX:  # all recent: forget the longest-known
            del self._sensors[next(iter(self._sensors))]

    def _save_locked(self, default: Quota, quotas: dict[str, Quota]) -> None:
        if self._path is None:
            return
        doc = {
            "format": FILE_FORMAT,
            "default": default.to_json(),
            "principals": {p: q.to_json() for p, q in sorted(quotas.items())},
        }
        write_json_file(self._path, doc)


def _parse_quotas(path: Path, doc: dict[str, Any]) -> tuple[Quota, dict[str, Quota]]:
    principals = doc.get("principals", {})
    if not isinstance(principals, dict):
        raise SecurityFileError(path, '"principals" must be an object of principal -> quota')
    if len(principals) > QUOTAS_MAX:
        raise SecurityFileError(path, f"{len(principals)} quotas, more than the limit {QUOTAS_MAX}")
    try:
        default = Quota.from_json(doc.get("default", {}))
        quotas = {check_principal(p): Quota.from_json(q) for p, q in principals.items()}
    except (InvalidQuotaError, InvalidPrincipalError) as exc:
        raise SecurityFileError(path, str(exc)) from None
    return default, quotas
