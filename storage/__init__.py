"""riverlog's log engine: RecordBatch v2 codec, segments, indexes, partition logs, topics.

No network and no clock: callers pass `now_ms`. See DESIGN.md for the byte format.
"""

from ._batch import (
    HEADER_BYTES,
    BatchHeader,
    Compression,
    NewRecord,
    Record,
    check_batch,
    crc32c,
    decode_batch,
    decode_records,
    encode_batch,
    encode_columns,
    iter_batches,
    read_header,
    split_batches,
    with_base_offset,
)
from ._catalog import Catalog, TopicMeta, validate_topic_name
from ._config import FsyncPolicy, LogConfig
from ._errors import (
    CorruptBatchError,
    CorruptLogError,
    DiskFullError,
    InvalidConfigError,
    InvalidNameError,
    InvalidProducerBatchError,
    LimitExceededError,
    LogClosedError,
    OffsetOutOfRangeError,
    OutOfOrderSequenceError,
    ProducerFencedError,
    StorageError,
    TopicExistsError,
    UnknownProducerError,
    UnknownTopicError,
    UnsupportedCodecError,
)
from ._log import AppendResult, PartitionLog
from ._producers import BatchMetadata, ProducerEntry
from ._segment import Truncation

__all__ = [
    "HEADER_BYTES",
    "AppendResult",
    "BatchHeader",
    "BatchMetadata",
    "Catalog",
    "Compression",
    "CorruptBatchError",
    "CorruptLogError",
    "DiskFullError",
    "FsyncPolicy",
    "InvalidConfigError",
    "InvalidNameError",
    "InvalidProducerBatchError",
    "LimitExceededError",
    "LogClosedError",
    "LogConfig",
    "NewRecord",
    "OffsetOutOfRangeError",
    "OutOfOrderSequenceError",
    "PartitionLog",
    "ProducerEntry",
    "ProducerFencedError",
    "Record",
    "StorageError",
    "TopicExistsError",
    "TopicMeta",
    "Truncation",
    "UnknownProducerError",
    "UnknownTopicError",
    "UnsupportedCodecError",
    "check_batch",
    "crc32c",
    "decode_batch",
    "decode_records",
    "encode_batch",
    "encode_columns",
    "iter_batches",
    "read_header",
    "split_batches",
    "validate_topic_name",
    "with_base_offset",
]
