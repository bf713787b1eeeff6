"""riverlog's talking half: the Python client (this package's public surface), and the broker,
consumer groups, gRPC server and `riverlog` command behind it.

    from stream import Producer, Consumer, Admin        # sync
    from stream.aio import AsyncProducer, AsyncConsumer, AsyncAdmin
"""

from ._headers import (
    CORRELATION_ID_HEADER,
    DELIVER_AT_HEADER,
    DLQ_HEADERS,
    REPLY_TO_HEADER,
)
from .client._admin import (
    Admin,
    GroupDescription,
    GroupListing,
    MemberDescription,
    OffsetChange,
    OffsetInfo,
    OffsetSpec,
    PartitionInfo,
    PartitionLag,
    ShareGroupConfig,
    ShareGroupDescription,
    ShareGroupListing,
    ShareMemberDescription,
    SharePartitionState,
    TopicInfo,
)
from .client._base import (
    AlreadyExistsError,
    BufferFullError,
    DeadlineExceededError,
    GroupError,
    InvalidArgumentError,
    NotFoundError,
    OffsetOutOfRangeError,
    OutOfOrderSequenceError,
    ProducerError,
    ProducerFencedError,
    Record,
    RecordMetadata,
    ResourceExhaustedError,
    RiverlogError,
    TopicPartition,
    UnavailableError,
    UnknownProducerError,
)
from .client._consumer import Consumer
from .client._producer import Producer
from .client._reqreply import Requester, Responder
from .client._share import AckFailure, ShareConsumer, ShareRecord

__all__ = [
    "CORRELATION_ID_HEADER",
    "DELIVER_AT_HEADER",
    "DLQ_HEADERS",
    "REPLY_TO_HEADER",
    "AckFailure",
    "Admin",
    "AlreadyExistsError",
    "BufferFullError",
    "Consumer",
    "DeadlineExceededError",
    "GroupDescription",
    "GroupError",
    "GroupListing",
    "InvalidArgumentError",
    "MemberDescription",
    "NotFoundError",
    "OffsetChange",
    "OffsetInfo",
    "OffsetOutOfRangeError",
    "OffsetSpec",
    "OutOfOrderSequenceError",
    "PartitionInfo",
    "PartitionLag",
    "Producer",
    "ProducerError",
    "ProducerFencedError",
    "Record",
    "RecordMetadata",
    "Requester",
    "ResourceExhaustedError",
    "Responder",
    "RiverlogError",
    "ShareConsumer",
    "ShareGroupConfig",
    "ShareGroupDescription",
    "ShareGroupListing",
    "ShareMemberDescription",
    "SharePartitionState",
    "ShareRecord",
    "TopicInfo",
    "TopicPartition",
    "UnavailableError",
    "UnknownProducerError",
]
