"""Per-log settings, their bounds, and the reasons for the bounds.

A `LogConfig` is immutable; a topic's overrides are applied with `LogConfig.with_overrides`,
which validates names and values and says which one is wrong.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from ._errors import InvalidConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# File positions in the offset index are u32, so a segment can never reach 4 GiB.
SEGMENT_BYTES_LIMIT = 4 * GiB - 1
assert SEGMENT_BYTES_LIMIT < 2**32, "index positions are u32"
# Tiny segments are allowed (tests roll often); a batch larger than a segment gets a segment
# of its own, so batch starts -- what the index stores -- stay below segment_bytes < 4 GiB.
SEGMENT_BYTES_MIN = 1 * KiB
# The largest batch a producer may send. Kafka's default message.max.bytes is about 1 MiB;
# a batch is read into memory whole on the produce path, so this bounds per-request memory.
BATCH_BYTES_MAX_DEFAULT = 1 * MiB
# No configuration may raise the batch limit past this: the broker holds a batch in memory.
BATCH_BYTES_MAX_LIMIT = 64 * MiB
# Index files are preallocated to this size and trimmed when their segment seals.
INDEX_BYTES_MAX_DEFAULT = 10 * MiB
# Relative offsets in both indexes are u32.
RELATIVE_OFFSET_LIMIT = 2**32 - 1
# Kafka's producer.id.expiration.ms default: a producer id idle this long loses its
# idempotence state in a partition (and must start again at sequence 0).
PRODUCER_EXPIRY_MS_DEFAULT = 24 * 3600 * 1000
# Producer ids one partition keeps state for. Each costs about 1.2 KiB of memory with its
# five cached batches (measured) and 179 bytes in every snapshot, so the limit holds one
# partition to about 120 MiB of memory and 18 MB per snapshot.
PRODUCERS_MAX_DEFAULT = 10_000
PRODUCERS_MAX_LIMIT = 100_000


class FsyncPolicy(enum.StrEnum):
    """When appended bytes are forced to stable storage.

    always    fsync before `append` returns: an acknowledged batch survives power loss.
    interval  fsync when `fsync_interval_ms` has passed since the last one (checked on append
              and by the owner's periodic `flush_if_due`): a power loss loses at most that
              window; a process crash loses nothing (the bytes are in the OS page cache).
    never     the OS writes back when it likes: a process crash loses nothing, a power loss
              can lose anything not yet written back (Linux: typically up to ~30 s).
    """

    ALWAYS = "always"
    INTERVAL = "interval"
    NEVER = "never"


@dataclasses.dataclass(frozen=True, slots=True)
class LogConfig:
    # Roll to a new segment when the active one would pass this size.
    segment_bytes: int = 1 * GiB
    # Roll when an appended batch's max timestamp is this much later than the active
    # segment's first batch's (record time, as Kafka; None: never roll by age).
    segment_ms: int | None = 7 * 24 * 3600 * 1000
    # Delete the oldest sealed segments while the log is larger than this (None: no limit).
    retention_bytes: int | None = None
    # Delete sealed segments whose newest record is older than this (None: keep forever).
    retention_ms: int | None = 7 * 24 * 3600 * 1000
    # One offset-index and time-index entry per this many appended bytes.
    index_interval_bytes: int = 4096
    # Preallocated size of each index file; a full index rolls the segment.
    index_bytes_max: int = INDEX_BYTES_MAX_DEFAULT
    fsync: FsyncPolicy = FsyncPolicy.NEVER
    fsync_interval_ms: int = 1000
    # The largest batch (whole RecordBatch v2, header included) one append accepts.
    batch_bytes_max: int = BATCH_BYTES_MAX_DEFAULT
    # Drop a producer id's idempotence state after this long without an append (broker ms).
    producer_expiry_ms: int = PRODUCER_EXPIRY_MS_DEFAULT
    # Producer ids with idempotence state per partition; a new id beyond it is refused.
    producers_max: int = PRODUCERS_MAX_DEFAULT

    def __post_init__(self) -> None:
        def bound(name: str, value: int | None, low: int, high: int) -> None:
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidConfigError(f"{name} must be an integer, got {value!r}")
            if not low <= value <= high:
                raise InvalidConfigError(f"{name} must be in [{low}, {high}], got {value}")

        bound("segment_bytes", self.segment_bytes, SEGMENT_BYTES_MIN, SEGMENT_BYTES_LIMIT)
        bound("segment_ms", self.segment_ms, 1, 2**62)
        bound("retention_bytes", self.retention_bytes, 0, 2**62)
        bound("retention_ms", self.retention_ms, 0, 2**62)
        bound("index_interval_bytes", self.index_interval_bytes, 1, 64 * MiB)
        bound("index_bytes_max", self.index_bytes_max, 24, 1 * GiB)
        bound("fsync_interval_ms", self.fsync_interval_ms, 1, 24 * 3600 * 1000)
        bound("batch_bytes_max", self.batch_bytes_max, 61, BATCH_BYTES_MAX_LIMIT)
        # From 1 ms (tests) to a year: a producer idle longer than that is gone.
        bound("producer_expiry_ms", self.producer_expiry_ms, 1, 365 * 24 * 3600 * 1000)
        bound("producers_max", self.producers_max, 1, PRODUCERS_MAX_LIMIT)
        if not isinstance(self.fsync, FsyncPolicy):
            raise InvalidConfigError(f"fsync must be a FsyncPolicy, got {self.fsync!r}")

    def with_overrides(self, overrides: Mapping[str, Any]) -> LogConfig:
        """A copy with `overrides` applied; strings are parsed, unknown keys refused."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for key, raw in overrides.items():
            if key not in fields:
                known = ", ".join(sorted(fields))
                raise InvalidConfigError(f"unknown config {key!r}; known: {known}")
            changes[key] = _parse(key, raw)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fsync"] = self.fsync.value
        return out


_OPTIONAL = {"segment_ms", "retention_bytes", "retention_ms"}


def _parse(key: str, raw: Any) -> Any:
    if key == "fsync":
        try:
            return FsyncPolicy(str(raw))
        except ValueError:
            choices = ", ".join(p.value for p in FsyncPolicy)
            raise InvalidConfigError(f"fsync must be one of {choices}, got {raw!r}") from None
    if raw is None or (key in _OPTIONAL and isinstance(raw, str) and raw.lower() == "none"):
        if key in _OPTIONAL:
            return None
        raise InvalidConfigError(f"{key} cannot be unset")
    if isinstance(raw, bool):
        raise InvalidConfigError(f"{key} must be an integer, got {raw!r}")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw.replace("_", ""), 10)
        except ValueError:
            raise InvalidConfigError(f"{key} must be an integer, got {raw!r}") from None
    raise InvalidConfigError(f"{key} must be an integer, got {raw!r}")
