"""The storage engine's exceptions: one hierarchy, every message carries its numbers.

    StorageError                     anything the log engine refuses or cannot do
    ├── CorruptBatchError            bytes that are not a valid RecordBatch v2 (length, magic,
    │   │                            CRC32C, counts); raised for bad input and by the decoder
    │   └── UnsupportedCodecError    a valid batch compressed with a codec we cannot decode
    ├── CorruptLogError              a sealed segment holds a bad batch: the partition refuses
    │                                to open rather than cut acknowledged data (names file, byte)
    ├── LimitExceededError           a named limit was crossed (batch bytes, partitions, ...)
    ├── OffsetOutOfRangeError        an offset outside [log start offset, log end offset]
    ├── InvalidNameError             a topic name that is not [A-Za-z0-9._-]{1,249}
    ├── InvalidConfigError           a config key or value that is not allowed
    ├── TopicExistsError / UnknownTopicError
    ├── DiskFullError                no space left on device; nothing partial was appended
    └── LogClosedError               the log was closed (or failed) and takes no more calls

`assert` is kept for our own bugs; everything a caller or a file on disk can cause is one of
these.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error the storage engine raises on purpose."""


class CorruptBatchError(StorageError):
    """Bytes that are not a valid RecordBatch v2."""


class UnsupportedCodecError(CorruptBatchError):
    """A batch whose compression codec this build cannot decompress (snappy, unknown ids)."""


class CorruptLogError(StorageError):
    """A segment that must not be truncated holds a bad batch."""

    def __init__(self, path: str, position: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt batch at byte {position}: {reason}")
        self.path = path
        self.position = position
        self.reason = reason


class LimitExceededError(StorageError):
    """A named limit was crossed; the message names the limit and both numbers."""


class OffsetOutOfRangeError(StorageError):
    def __init__(self, offset: int, log_start_offset: int, log_end_offset: int) -> None:
        super().__init__(
            f"offset {offset} is outside the log: log start offset {log_start_offset}, "
            f"log end offset {log_end_offset}"
        )
        self.offset = offset
        self.log_start_offset = log_start_offset
        self.log_end_offset = log_end_offset


class InvalidNameError(StorageError):
    pass


class InvalidConfigError(StorageError):
    pass


class TopicExistsError(StorageError):
    pass


class UnknownTopicError(StorageError):
    pass


class DiskFullError(StorageError):
    pass


class LogClosedError(StorageError):
    pass
