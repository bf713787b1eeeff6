"""A fetch answer's bytes straight into the consumer's Records: `decode_fetch`.

storage.decode_records turns back-to-back RecordBatch v2 bytes into storage Records (offset,
timestamp, key, value, headers); the consumer then had to add topic and partition to each and
cut off the records below the offset it asked for one by one. Here every batch of the answer
is decoded at once, one field of all its records at a time, and each of the consumer's Records
is built once, from columns, in one C-level loop:

    check_batch on every batch (header fields and CRC32C), decompress where the codec says
    -> where each record starts (its length varints, one record per Python step, or a whole
       run of same-size records per numpy comparison)
    -> one numpy pass per field over all the records: lengths, timestamp and offset deltas,
       key and value lengths, header counts; every field checked to lie inside its record
    -> the records below `offset` dropped as a prefix of the columns, before anything is built
    -> Record(topic, partition, offset, timestamp_ms, key, value, headers) from: topic and
       partition repeated, offsets as ranges from the batches' base offsets, timestamps as one
       array sum, keys and values sliced from the bytes, no headers.

That fast path answers only when it has checked that storage.decode_records would give the
same records for the same bytes. On anything else -- an answer of fewer than
COLUMNS_RECORDS_MIN records, a record with headers, an offset delta out of sequence, a varint
longer than VARINT_COLUMN_BYTES_MAX bytes, a corrupt batch -- the answer is decoded as it
always was (`_decode_by_storage`), so results and errors are storage's own.
"""

from __future__ import annotations

import functools
import itertools
from bisect import bisect_left
from collections.abc import Callable, Iterable
from operator import itemgetter
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from storage import (
    HEADER_BYTES,
    BatchHeader,
    Compression,
    StorageError,
    check_batch,
    decode_records,
)

# Private names the client takes from storage: its bounded decompression, so a compressed
# batch expands exactly as storage.decode_batch expands it, limits included; and its
# per-record slicer of keys and values, for the runs this module does not copy in bulk.
from storage._batch import _decompress
from storage._batch import _slices as _slices_one_by_one

from ._base import Record

_I64 = npt.NDArray[np.int64]
_U8 = npt.NDArray[np.uint8]

# Below this many records in an answer, storage's way wins: the columns cost some forty numpy
# calls (~0.5-1.5 us each here), ~100 us an answer. Measured with 100-byte records, one batch:
# 150 records 146 us by storage, 171 by columns; 250 records 203 and 191; 400 records 322 and
# 228. Answers of 5-record batches cost ~1.7 us a record either way (per-batch work).
COLUMNS_RECORDS_MIN = 200
# A record takes at least 7 bytes (length, attributes, timestamp delta, offset delta, key
# length, value length and header count, one byte each): a shorter answer has fewer records
# than COLUMNS_RECORDS_MIN, and goes to storage without a first look at its batches.
RECORD_BYTES_MIN = 7
# Records are stepped through one at a time in blocks of this many; after a block of records
# of one size, one numpy comparison looks for more of that size (at least GALLOP_RECORDS_MIN
# left: a comparison costs about as much as stepping through a few dozen records).
STEP_RECORDS = 32
GALLOP_RECORDS_MIN = 64
# Varints in the columns are read up to this many bytes (56 bits): every value is then within
# +-2**55 and no sum of a position and a few of them overflows an int64. Longer ones (only
# timestamp deltas of a thousand years reach 9 bytes) are left to storage.
VARINT_COLUMN_BYTES_MAX = 8
# Batch timestamps within +-2**62: adding a delta (within +-2**55) cannot overflow an int64.
TIMESTAMP_ABS_MAX = 1 << 62
# Keys or values in a run of at least this many records of one layout are sliced with one
# numpy call (see _slices): ~20 ns a record instead of ~90, after a few microseconds a run.
SLICE_RUN_MIN = 16
assert SLICE_RUN_MIN >= 2, "a run's stride is the step from its first slice to its second"
# Attributes bit 3: LogAppendTime, every record's timestamp is the batch's maxTimestamp.
_ATTR_LOG_APPEND_TIME = 0x08

# The zig-zag value of every one-byte varint (the byte is below 0x80).
_ZIGZAG_BYTE: _I64 = (np.arange(128, dtype=np.int64) >> 1) ^ -(np.arange(128, dtype=np.int64) & 1)

_new_tuple = tuple.__new__
# Builds a Record from (topic, partition) + a storage Record in one C call (storage path).
_record_from = cast("Callable[[tuple[Any, ...]], Record]", functools.partial(_new_tuple, Record))
_offset_of = itemgetter(0)


def decode_fetch(
    data: bytes, topic: str, partition: int, offset: int, stop: int | None = None
) -> tuple[list[Record], int]:
    """The records in `data` (back-to-back batches of one partition) from `offset` on (and
    below `stop`, if given), and the offset of the last record in `data`.

    Records below `offset` are left out: a fetch starts with the batch that holds it. Records
    from `stop` on are not built either (a share fetch answer holds whole batches, of which a
    member was given a part): the columns are read for the whole batch, but the per-record
    work is only done for the records kept. Raises
    what storage.decode_records raises for the same bytes (CorruptBatchError, or its subclass
    UnsupportedCodecError), and ValueError when `data` is empty.
    """
    if not data:
        raise ValueError("a fetch answer to decode needs at least one batch")
    if len(data) >= COLUMNS_RECORDS_MIN * RECORD_BYTES_MIN:
        try:
            decoded = _decode_columns(data, topic, partition, offset, stop)
        except StorageError:  # storage names the first problem, in batch order
            decoded = None
        if decoded is not None:
            return decoded
    return _decode_by_storage(data, topic, partition, offset, stop)


def _decode_by_storage(
    data: bytes, topic: str, partition: int, offset: int, stop: int | None = None
) -> tuple[list[Record], int]:
    """decode_fetch through storage Records: what the consumer did before the columns."""
    decoded = decode_records(data)
    skip = 0
    if decoded[0].offset < offset:
        skip = bisect_left(decoded, offset, key=_offset_of)
    end = len(decoded) if stop is None else bisect_left(decoded, stop, key=_offset_of)
    prefix = (topic, partition)
    rows = decoded if skip == 0 and end == len(decoded) else itertools.islice(decoded, skip, end)
    return list(map(_record_from, map(prefix.__add__, rows))), decoded[-1].offset


# ---------------------------------------------------------------------------- columns
def _decode_columns(
    data: bytes, topic: str, partition: int, offset: int, stop: int | None = None
) -> tuple[list[Record], int] | None:
    """decode_fetch by columns; None when storage must decide (see the module docstring).
    A StorageError from check_batch or decompression also means that."""
    batches: list[BatchHeader] = []
    pos, end = 0, len(data)
    while pos < end:
        header = check_batch(data, pos, end)
        # Offsets must rise from batch to batch for `offset` to cut off a prefix.
        if batches and header.base_offset <= batches[-1].last_offset:
            return None
        batches.append(header)
        pos += header.size
    counts = [header.record_count for header in batches]
    total = sum(counts)
    if total < COLUMNS_RECORDS_MIN:
        return None
    buf, sections = _sections(data, batches)
    u8: _U8 = np.frombuffer(buf, np.uint8)

    # Where every record starts and ends, from the length varints alone.
    starts: list[_I64] = []
    for (section_start, section_stop), count in zip(sections, counts, strict=True):
        found = _record_starts(buf, u8, section_start, section_stop, count)
        if found is None:
            return None
        starts.append(found)
    if len(starts) == 1:
        record_start, record_end = starts[0][:-1], starts[0][1:]
    else:
        record_start = np.concatenate([s[:-1] for s in starts])
        record_end = np.concatenate([s[1:] for s in starts])

    # The fields, one column at a time; each must end where the next begins, the last where
    # the record ends.
    column = _varint_column(u8, record_start)
    if column is None:
        return None
    length, p = column
    if not np.array_equal(p + length, record_end):
        return None
    column = _varint_column(u8, p + 1)  # after attributes (unused in v2)
    if column is None:
        return None
    timestamp_delta, p = column
    column = _varint_column(u8, p)
    if column is None:
        return None
    offset_delta, p = column
    column = _varint_column(u8, p)
    if column is None:
        return None
    key_length, key_start = column
    keys_null = bool(key_length.min() < 0)  # any negative length is a null key
    p = key_start + np.maximum(key_length, 0) if keys_null else key_start + key_length
    column = _varint_column(u8, p)
    if column is None:
        return None
    value_length, value_start = column
    values_null = bool(value_length.min() < 0)
    p = value_start + np.maximum(value_length, 0) if values_null else value_start + value_length
    column = _varint_column(u8, p)
    if column is None:
        return None
    header_count, p = column
    if header_count.any() or not np.array_equal(p, record_end):
        return None
    if len(batches) == 1:
        sequence = np.arange(total, dtype=np.int64)
    else:  # each batch counts its offset deltas from 0
        first_index = np.cumsum([0, *counts[:-1]])
        sequence = np.arange(total, dtype=np.int64) - np.repeat(first_index, counts)
    if not np.array_equal(offset_delta, sequence):
        return None
    timestamps = _timestamps(batches, counts, timestamp_delta)
    if timestamps is None:
        return None

    # The records below `offset` are a prefix: offsets rise by one within a batch, and from
    # batch to batch.
    skip = sum(min(max(offset - h.base_offset, 0), h.record_count) for h in batches)
    # ... and those from `stop` on a suffix.
    last = batches[-1].last_offset
    limit = last + 1 if stop is None else max(stop, offset)
    tail = sum(min(max(h.last_offset + 1 - limit, 0), h.record_count) for h in batches)
    kept = max(0, total - skip - tail)
    cut = slice(skip, skip + kept)
    offsets: Iterable[int]
    if all(b.base_offset == a.last_offset + 1 for a, b in itertools.pairwise(batches)):
        offsets = range(last + 1 - tail - kept, last + 1 - tail)
    else:
        offsets = itertools.chain.from_iterable(
            range(max(offset, h.base_offset), min(h.last_offset + 1, limit))
            for h in batches
            if h.last_offset >= offset and h.base_offset < limit
        )
    keys: Iterable[bytes | None]
    if keys_null and key_length.max() < 0:
        keys = itertools.repeat(None, kept)
    else:
        keys = _slices(buf, key_start[cut], key_length[cut], keys_null)
    values = _slices(buf, value_start[cut], value_length[cut], values_null)
    records = list(
        map(
            _new_tuple,
            itertools.repeat(Record, kept),
            zip(
                itertools.repeat(topic, kept),
                itertools.repeat(partition, kept),
                offsets,
                timestamps[cut].tolist(),
                keys,
                values,
                itertools.repeat((), kept),
                strict=True,
            ),
        )
    )
    return records, batches[-1].last_offset


def _sections(data: bytes, batches: list[BatchHeader]) -> tuple[bytes, list[tuple[int, int]]]:
    """The bytes the records sections lie in and where each starts and stops: `data` itself
    when no batch is compressed, else every section, decompressed where it was, one after
    the other in new bytes."""
    sections: list[tuple[int, int]] = []
    pos = 0
    for header in batches:
        sections.append((pos + HEADER_BYTES, pos + header.size))
        pos += header.size
    if all(header.compression == Compression.NONE for header in batches):
        return data, sections
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    for header, (start, stop) in zip(batches, sections, strict=True):
        codec = header.compression
        parts.append(
            view[start:stop] if codec == Compression.NONE else _decompress(codec, view[start:stop])
        )
    joined_sections: list[tuple[int, int]] = []
    pos = 0
    for part in parts:
        joined_sections.append((pos, pos + len(part)))
        pos += len(part)
    return b"".join(parts), joined_sections


def _record_starts(buf: bytes, u8: _U8, start: int, stop: int, count: int) -> _I64 | None:
    """Where each of the `count` records of buf[start:stop] starts, then `stop`; None when
    their length varints do not lead from `start` to `stop` in `count` steps. `u8` is `buf`
    as a numpy array.

    The lengths are not checked here (a negative one reads as positive): the length column
    is, and every field after it. A block of STEP_RECORDS records is stepped through one at a
    time; when its records look all of one size, a run of the next ones is taken whole for as
    long as each starts with the same length varint (so has the same size): one strided
    numpy comparison for a run of fixed-size records.
    """
    parts: list[_I64] = []
    pos = start
    left = count
    try:
        while left:
            block: list[int] = []
            append = block.append
            for _ in range(min(left, STEP_RECORDS)):
                append(pos)
                b = buf[pos]
                if b < 0x80:
                    pos += 1 + (b >> 1)
                elif (c := buf[pos + 1]) < 0x80:
                    pos += 2 + (((b & 0x7F) | (c << 7)) >> 1)
                else:
                    pos = _past_long_varint(buf, pos)
            parts.append(np.array(block, np.int64))
            left -= len(block)
            last = block[-1]
            size = pos - last
            if (
                left >= GALLOP_RECORDS_MIN
                and pos - block[0] == len(block) * size
                and (buf[last] < 0x80 or buf[last + 1] < 0x80)
            ):
                run = min(left, (stop - pos) // size)
                if run > 0:
                    same = u8[pos : pos + run * size : size] == buf[last]
                    if buf[last] >= 0x80:
                        same &= u8[pos + 1 : pos + 1 + run * size : size] == buf[last + 1]
                    if not same.all():
                        run = int(same.argmin())
                    parts.append(np.arange(pos, pos + run * size, size, dtype=np.int64))
                    pos += run * size
                    left -= run
    except IndexError:  # a length varint runs past the end of `buf`, or is too long
        return None
    if pos != stop:
        return None
    parts.append(np.array([stop], np.int64))
    return np.concatenate(parts)


def _past_long_varint(buf: bytes, pos: int) -> int:
    """The position after the record whose length varint (of three bytes or more) is at `pos`;
    `pos` itself for a negative length, which the length column then rejects. Raises
    IndexError past the end of `buf`, and for a varint longer than the columns read: either
    way, storage decides."""
    raw = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        raw |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 7 * VARINT_COLUMN_BYTES_MAX:
            raise IndexError("longer than the length column reads")
    length = (raw >> 1) ^ -(raw & 1)
    return pos + length if length >= 0 else pos


def _varint_column(u8: _U8, pos: _I64) -> tuple[_I64, _I64] | None:
    """The zig-zag varints that start at each of `pos` in `u8`: their values and the
    positions after them; None when one is longer than VARINT_COLUMN_BYTES_MAX bytes.

    A read past the end of `u8` reads its last byte again (numpy's clip): the varint then
    ends past the end, and so past its record, which the caller's checks reject.
    """
    first = u8.take(pos, mode="clip")
    if first.tobytes().isascii():  # every one of them is one byte long
        return _ZIGZAG_BYTE.take(first), pos + 1
    raw = (first & 0x7F).astype(np.int64)
    more = first >= 0x80
    after = pos + 1
    for shift in range(7, 7 * VARINT_COLUMN_BYTES_MAX, 7):
        byte = u8.take(after, mode="clip")
        raw |= (byte & 0x7F).astype(np.int64) * more << shift
        after += more
        more &= byte >= 0x80
        if not more.any():
            return (raw >> 1) ^ -(raw & 1), after
    return None


def _timestamps(batches: list[BatchHeader], counts: list[int], delta: _I64) -> _I64 | None:
    """Every record's timestamp: its batch's base timestamp plus its delta, or the batch's
    maxTimestamp for a LogAppendTime batch (the broker stamps it without rewriting records).
    None when a base timestamp is too large for int64 sums."""
    base: list[int] = []
    log_append_time = False
    for h in batches:
        if h.attributes & _ATTR_LOG_APPEND_TIME:
            log_append_time = True
            base.append(h.max_timestamp)
        elif abs(h.base_timestamp) < TIMESTAMP_ABS_MAX:
            base.append(h.base_timestamp)
        else:
            return None
    if log_append_time:  # the deltas of LogAppendTime batches are ignored
        use_delta = [0 if h.attributes & _ATTR_LOG_APPEND_TIME else 1 for h in batches]
        delta = delta * np.repeat(np.array(use_delta, np.int64), counts)
    if len(batches) == 1:
        return delta + base[0]
    return delta + np.repeat(np.array(base, np.int64), counts)


def _slices(buf: bytes, start: _I64, length: _I64, has_null: bool) -> list[bytes | None]:
    """buf[start:start + length] for each pair, None where the length is negative.

    A run of at least SLICE_RUN_MIN of them with one length, each the same number of bytes
    after the last, is sliced in one numpy call (fixed-size records: keys of one length, or
    values): a strided view of fixed-size byte strings, whose tolist() makes the bytes.
    """
    count = len(start)
    if count < SLICE_RUN_MIN:
        return _slices_one_by_one(buf, start, length, has_null)
    # continues[i]: slice i + 1 has the length of slice i, and (from i = 1) lies as far
    # after it as slice i lies after slice i - 1.
    continues = length[1:] == length[:-1]
    step = np.diff(start)
    continues[1:] &= step[1:] == step[:-1]
    run_starts = np.flatnonzero(~continues) + 1
    if len(run_starts) * SLICE_RUN_MIN > count:  # mostly short runs: no gain
        return _slices_one_by_one(buf, start, length, has_null)
    out: list[bytes | None] = []
    bounds = [0, *run_starts.tolist(), count]
    for first, end in itertools.pairwise(bounds):
        size = int(length[first])
        if end - first < SLICE_RUN_MIN:
            out += _slices_one_by_one(buf, start[first:end], length[first:end], has_null)
        elif size <= 0:  # null, or empty
            out += itertools.repeat(None if size < 0 else b"", end - first)
        else:
            stride = int(step[first])
            run = np.ndarray((end - first,), f"V{size}", buf, int(start[first]), (stride,))
            out += run.tolist()
    return out
