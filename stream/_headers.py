"""Record header names with a meaning to riverlog, in one leaf module (the broker and the
client both import it; it imports nothing).

    riverlog-deliver-at        ASCII decimal ms since the Unix epoch: share groups do not hand
                               the record out before then (proto/riverlog/v1/share.proto)
    riverlog-dlq-topic         on a dead letter: where it came from (topic, partition,
    riverlog-dlq-partition     offset), how often it was delivered, why it was archived
    riverlog-dlq-offset        ("rejected" or "max-delivery-attempts") and the last error a
    riverlog-dlq-delivery-count  member gave; values ASCII / UTF-8
    riverlog-dlq-reason
    riverlog-dlq-error
    riverlog-reply-to          request/reply: the topic to answer on
    riverlog-correlation-id    request/reply: matches an answer to its request
"""

DELIVER_AT_HEADER = "riverlog-deliver-at"
DLQ_TOPIC_HEADER = "riverlog-dlq-topic"
DLQ_PARTITION_HEADER = "riverlog-dlq-partition"
DLQ_OFFSET_HEADER = "riverlog-dlq-offset"
DLQ_DELIVERY_COUNT_HEADER = "riverlog-dlq-delivery-count"
DLQ_REASON_HEADER = "riverlog-dlq-reason"
DLQ_ERROR_HEADER = "riverlog-dlq-error"
DLQ_HEADERS = (
    DLQ_TOPIC_HEADER,
    DLQ_PARTITION_HEADER,
    DLQ_OFFSET_HEADER,
    DLQ_DELIVERY_COUNT_HEADER,
    DLQ_REASON_HEADER,
    DLQ_ERROR_HEADER,
)
REPLY_TO_HEADER = "riverlog-reply-to"
CORRELATION_ID_HEADER = "riverlog-correlation-id"
