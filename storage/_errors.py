"""The storage engine's exceptions: one hierarchy, every message carries its numbers.

    StorageError                     anything the log engine refuses or cannot do
    ├── CorruptBatchError            bytes that are not a valid RecordBatch v2 (length, magic,
    │   │                            CRC32C, counts); raised for bad input and by the decoder
    │   ├── UnsupportedCodecError    a valid batch compressed with a codec we cannot decode
    │   └── InvalidProducerBatchError  an idempotent batch (producerId >= 0) that is not alone
    │                                in its append, or has a negative epoch or base sequence
    ├── CorruptLogError              a segment known to be on disk holds a bad batch: the
    │                                partition refuses to open (or the read of that batch is
    │                                refused) rather than cut or serve it (names file, byte)
    ├── LimitExceededError           a named limit was crossed (batch bytes, partitions, ...)
    ├── OutOfOrderSequenceError      an idempotent batch whose base sequence is not the next
    │                                one its producer id owes this partition (a gap, a stale
    │                                resend, a new epoch not starting at 0); nothing appended
    ├── ProducerFencedError          a batch from an epoch older than the partition has seen
    ├── UnknownProducerError         a producer id with no state here (expired or never seen)
    │                                sending a sequence other than 0: it must re-initialise
    ├── OffsetOutOfRangeError        an offset outside [log start offset, log end offset]
    ├── InvalidNameError             a topic name that is not [A-Za-z0-9._-]{1,249}
    ├── InvalidConfigError           a config key or value that is not allowed
    ├── TopicExistsError / UnknownTopicError
    ├── DiskFullError                no space left on device; nothing partial was appended
    ├── FsyncError                   an fsync failed (EIO...): what it covered is in an
    │                                unknown state on disk (also an OSError, with its errno)
    └── LogClosedError               the log was closed (or failed) and takes no more calls
        └── LogOfflineError          an fsync of the log failed: it takes no more writes and
                                     serves reads only below the offset last known durable

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
    """A segment that must not be truncated holds a bad batch (found at open or by a read)."""

    def __init__(self, path: str, position: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt batch at byte {position}: {reason}")
        self.path = path
        self.position = position
        self.reason = reason


class InvalidProducerBatchError(CorruptBatchError):
    """An idempotent batch that breaks the format's rules for producer fields (Kafka's
    INVALID_RECORD for magic v2): not the only batch of its append, or a negative epoch or
    base sequence."""


class LimitExceededError(StorageError):
    """A named limit was crossed; the message names the limit and both numbers."""


class OutOfOrderSequenceError(StorageError):
    """The batch's base sequence is not the one expected from its producer id and epoch."""

    def __init__(
        self, producer_id: int, epoch: int, expected: int, received: int, why: str = ""
    ) -> None:
        super().__init__(
            f"producer id {producer_id} epoch {epoch}: out of order sequence, expected "
            f"{expected}, received {received}" + (f" ({why})" if why else "")
        )
        self.producer_id = producer_id
        self.epoch = epoch
        self.expected = expected
        self.received = received


class ProducerFencedError(StorageError):
    """A batch from an older epoch than the newest this partition has seen for the id."""

    def __init__(self, producer_id: int, epoch: int, current_epoch: int) -> None:
        super().__init__(
            f"producer id {producer_id} epoch {epoch} is fenced: this partition has seen "
            f"epoch {current_epoch}"
        )
        self.producer_id = producer_id
        self.epoch = epoch
        self.current_epoch = current_epoch


class UnknownProducerError(StorageError):
    """A producer id this partition holds no state for, with a sequence other than 0."""

    def __init__(self, producer_id: int, epoch: int, received: int) -> None:
        super().__init__(
            f"producer id {producer_id} epoch {epoch} is unknown to this partition (its state "
            f"expired or was never written) and sent sequence {received}, not 0: the producer "
            "must re-initialise"
        )
        self.producer_id = producer_id
        self.epoch = epoch
        self.received = received


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


class FsyncError(StorageError, OSError):
    """An fsync or fdatasync failed. Linux reports a write-back error once and may already
    have dropped the dirty pages, so a retry that succeeds proves nothing: the caller must
    treat what the fsync covered as possibly lost (a partition log goes offline)."""


class LogOfflineError(LogClosedError):
    """A partition log whose fsync failed: appends, rolls, flushes and retention refuse,
    reads are served below `flushed_offset` only; a restart recovers it from the disk."""
