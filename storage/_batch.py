"""Kafka RecordBatch v2 (magic 2): the only byte format, on disk and on the wire.

A batch is a 61-byte header followed by the records section:

    offset  size  field                  notes
         0     8  baseOffset    i64      written by the log on append (outside the CRC)
         8     4  batchLength   i32      bytes after this field: total size - LOG_OVERHEAD
        12     4  partitionLeaderEpoch   outside the CRC, like baseOffset
        16     1  magic         i8       always 2
        17     4  crc           u32      CRC32C (Castagnoli) of bytes [21, end)
        21     2  attributes    i16      bits 0-2 codec, 3 timestamp type, 4 transactional,
                                         5 control
        23     4  lastOffsetDelta i32    offset of the last record minus baseOffset
        27     8  baseTimestamp i64      timestamp of the first record (ms)
        35     8  maxTimestamp  i64      largest record timestamp (ms)
        43     8  producerId    i64      -1 without an idempotent producer
        51     2  producerEpoch i16
        53     4  baseSequence  i32
        57     4  recordCount   i32
        61        records                compressed as a whole when the codec is not 0

All header integers are big-endian. Each record is

    length varint | attributes i8 | timestampDelta varlong | offsetDelta varint |
    keyLength varint | key | valueLength varint | value | headerCount varint |
    (headerKeyLength varint | headerKey utf-8 | headerValueLength varint | headerValue)*

with zig-zag varints; a length of -1 is a null key, value or header value.

The CRC starts at `attributes`, after baseOffset and partitionLeaderEpoch, so the broker can
assign offsets by patching baseOffset in place without recomputing it. The broker checks only
the header and the CRC (one C call over the batch); records are encoded and decoded by
clients, and by the broker only on its convenience path.
"""

from __future__ import annotations

import enum
import gzip
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from typing import Any, NamedTuple

import crc32c as _crc32c
import lz4.frame
import numpy as np
import numpy.typing as npt
import zstandard

from ._errors import CorruptBatchError, UnsupportedCodecError

HEADER = struct.Struct(
    ">"
    "q"  # baseOffset
    "i"  # batchLength
    "i"  # partitionLeaderEpoch
    "b"  # magic
    "I"  # crc
    "h"  # attributes
    "i"  # lastOffsetDelta
    "q"  # baseTimestamp
    "q"  # maxTimestamp
    "q"  # producerId
    "h"  # producerEpoch
    "i"  # baseSequence
    "i"  # recordCount
)
HEADER_BYTES = HEADER.size
# baseOffset and batchLength come before what batchLength counts.
LOG_OVERHEAD = struct.calcsize(">qi")
MAGIC_AT = struct.calcsize(">qii")
CRC_AT = struct.calcsize(">qiib")
ATTRIBUTES_AT = struct.calcsize(">qiibI")
LAST_OFFSET_DELTA_AT = ATTRIBUTES_AT + 2
MAX_TIMESTAMP_AT = struct.calcsize(">qiibIhiq")
assert HEADER_BYTES == 61
# The smallest batchLength: a header and no records.
_BATCH_LENGTH_MIN = HEADER_BYTES - LOG_OVERHEAD
assert CRC_AT == 17
assert ATTRIBUTES_AT == 21

MAGIC = 2
_BASE_OFFSET = struct.Struct(">q")
_CRC = struct.Struct(">I")
_LENGTH = struct.Struct(">i")
_ATTR_CODEC_MASK = 0x07
_ATTR_TIMESTAMP_TYPE = 0x08
_ATTR_TRANSACTIONAL = 0x10
_ATTR_CONTROL = 0x20
# The highest codec id (Compression.ZSTD) as a plain int: `check_batch` runs once per batch.
_CODEC_MAX = 4

# A record needs at least 7 bytes: length, attributes, timestamp delta, offset delta, key
# length, value length and header count, one byte each. Bounds decode loops on bad input.
RECORD_BYTES_MIN = 7
# Decompressing is bounded so that a small malicious batch cannot expand without limit.
DECOMPRESSED_BYTES_MAX = 64 * 1024 * 1024
_DECOMPRESS_STEP_BYTES = 1 << 20


class Compression(enum.IntEnum):
    """Kafka's codec ids for the records section."""

    NONE = 0
    GZIP = 1
    SNAPPY = 2  # recognised and stored as-is by the broker; not encoded or decoded here
    LZ4 = 3
    ZSTD = 4


assert max(Compression) == _CODEC_MAX


class BatchHeader(NamedTuple):
    base_offset: int
    batch_length: int
    partition_leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    record_count: int

    @property
    def size(self) -> int:
        """Bytes of the whole batch, header included."""
        return self.batch_length + LOG_OVERHEAD

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def compression(self) -> int:
        return self.attributes & _ATTR_CODEC_MASK

    @property
    def is_transactional(self) -> bool:
        return bool(self.attributes & _ATTR_TRANSACTIONAL)

    @property
    def is_control(self) -> bool:
        return bool(self.attributes & _ATTR_CONTROL)


Header = tuple[str, bytes | None]


class Record(NamedTuple):
    """One decoded record. A tuple, because decoding makes millions of them."""

    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...] = ()


class NewRecord(NamedTuple):
    """One record to encode; its offset is its place in the batch."""

    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: Sequence[Header] = ()


Buffer = bytes | bytearray | memoryview


_crc32c_of = _crc32c.crc32c  # bound once: `check_batch` calls it per batch


def crc32c(data: Buffer) -> int:
    """CRC32C (Castagnoli) of `data`, as stored in the batch header."""
    return int(_crc32c.crc32c(data))


def read_header(buf: Buffer, pos: int = 0) -> BatchHeader:
    """Unpack the header at `pos` without checking it; needs HEADER_BYTES bytes."""
    if len(buf) - pos < HEADER_BYTES:
        raise CorruptBatchError(
            f"batch header needs {HEADER_BYTES} bytes, only {len(buf) - pos} at byte {pos}"
        )
    return BatchHeader._make(HEADER.unpack_from(buf, pos))


def check_batch(buf: Buffer, pos: int = 0, end: int | None = None) -> BatchHeader:
    """Validate the batch that starts at `pos` and ends at or before `end`; return its header.

    Checks the length, magic, record count against lastOffsetDelta, codec id and the CRC32C.
    The records themselves are not parsed. Raises CorruptBatchError naming the problem.
    """
    if end is None:
        end = len(buf)
    available = end - pos
    if available < HEADER_BYTES:
        raise CorruptBatchError(
            f"truncated batch: {available} bytes at byte {pos}, a header needs {HEADER_BYTES}"
        )
    fields = HEADER.unpack_from(buf, pos)
    # Plain tuple indexes on this path (it runs once per produced batch): 1 batchLength,
    # 3 magic, 4 crc, 5 attributes, 6 lastOffsetDelta, 12 recordCount.
    length = fields[1]
    size = length + LOG_OVERHEAD
    if length < _BATCH_LENGTH_MIN:
        raise CorruptBatchError(
            f"batch length {length} at byte {pos} is below the minimum {_BATCH_LENGTH_MIN}"
        )
    if size > available:
        raise CorruptBatchError(
            f"truncated batch: length says {size} bytes at byte {pos}, only {available} present"
        )
    if fields[3] != MAGIC:
        raise CorruptBatchError(f"magic {fields[3]} at byte {pos}, expected {MAGIC}")
    count = fields[12]
    if count < 1 or fields[6] != count - 1:
        raise CorruptBatchError(
            f"record count {count} does not match last offset delta {fields[6]} at byte {pos}"
        )
    if fields[5] & _ATTR_CODEC_MASK > _CODEC_MAX:
        raise CorruptBatchError(
            f"unknown compression codec {fields[5] & _ATTR_CODEC_MASK} at byte {pos}"
        )
    actual = _crc32c_of(memoryview(buf)[pos + ATTRIBUTES_AT : pos + size])
    if actual != fields[4]:
        raise CorruptBatchError(
            f"CRC32C mismatch at byte {pos}: header says {fields[4]:#010x}, "
            f"bytes give {actual:#010x}"
        )
    return _new_tuple(BatchHeader, fields)  # as BatchHeader._make, without its Python call


def split_batches(buf: Buffer) -> list[BatchHeader]:
    """Validate one or more back-to-back batches filling `buf` exactly; return their headers."""
    end = len(buf)
    if end == 0:
        raise CorruptBatchError("empty payload: expected at least one record batch")
    header = check_batch(buf, 0, end)
    headers = [header]  # most payloads are one batch: no loop for them
    pos = header[1] + LOG_OVERHEAD
    while pos < end:
        header = check_batch(buf, pos, end)
        headers.append(header)
        pos += header[1] + LOG_OVERHEAD
    return headers


def with_base_offset(batch: Buffer, base_offset: int) -> bytes:
    """A copy of `batch` with baseOffset set; the CRC stays valid (it does not cover it)."""
    return _BASE_OFFSET.pack(base_offset) + bytes(memoryview(batch)[8:])


# ---------------------------------------------------------------------------- varints
def _zigzag_bytes(value: int) -> bytes:
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Lengths, deltas and counts are almost always small: one lookup instead of a loop.
_VARINT_TABLE_LIMIT = 1 << 14
_VARINT_TABLE = [_zigzag_bytes(v) for v in range(_VARINT_TABLE_LIMIT)]
_NULL = _zigzag_bytes(-1)


def _varint(value: int) -> bytes:
    if 0 <= value < _VARINT_TABLE_LIMIT:
        return _VARINT_TABLE[value]
    return _zigzag_bytes(value)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode one zig-zag varint (up to 64 bits) at `pos`; return (value, next position)."""
    try:
        b = buf[pos]
        if b < 0x80:
            return (b >> 1) ^ -(b & 1), pos + 1
        result = b & 0x7F
        shift = 7
        pos += 1
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift > 63:
                raise CorruptBatchError(f"varint longer than 10 bytes at byte {pos}")
    except IndexError:
        raise CorruptBatchError(f"varint runs past the end at byte {pos}") from None
    return (result >> 1) ^ -(result & 1), pos


# ---------------------------------------------------------------------------- codecs
def _compress(codec: Compression, data: bytes) -> bytes:
    if codec == Compression.GZIP:
        return gzip.compress(data, compresslevel=6, mtime=0)
    if codec == Compression.LZ4:
        return bytes(lz4.frame.compress(data))
    if codec == Compression.ZSTD:
        return zstandard.ZstdCompressor(level=3).compress(data)
    raise UnsupportedCodecError(f"cannot compress with codec {codec} ({codec.name.lower()})")


def _decompress(codec: int, data: memoryview) -> bytes:
    limit = DECOMPRESSED_BYTES_MAX
    # lz4 and zstd are read _DECOMPRESS_STEP_BYTES at a time: asked for limit + 1 bytes at
    # once, they allocate that much first, which cost 25-35 us a batch.
    step = _DECOMPRESS_STEP_BYTES
    try:
        if codec == Compression.GZIP:
            z = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            out = z.decompress(data, limit + 1)
            if not z.eof:
                if len(out) > limit:
                    raise CorruptBatchError(
                        f"gzip records expand past {limit} bytes (DECOMPRESSED_BYTES_MAX)"
                    )
                raise CorruptBatchError("gzip records section is truncated")
        elif codec == Compression.LZ4:
            d = lz4.frame.LZ4FrameDecompressor()
            part = d.decompress(bytes(data), max_length=min(limit + 1, step))
            parts = [part]
            size = len(part)
            while part and not d.eof and not d.needs_input and size <= limit:
                part = d.decompress(b"", max_length=min(limit + 1 - size, step))
                parts.append(part)
                size += len(part)
            out = b"".join(parts)
            if not d.eof:
                if len(out) > limit:
                    raise CorruptBatchError(
                        f"lz4 records expand past {limit} bytes (DECOMPRESSED_BYTES_MAX)"
                    )
                raise CorruptBatchError("lz4 records section is truncated")
        elif codec == Compression.ZSTD:
            reader = zstandard.ZstdDecompressor().stream_reader(
                bytes(data), read_across_frames=True
            )
            parts = []
            size = 0
            while size <= limit and (part := reader.read(min(limit + 1 - size, step))):
                parts.append(part)
                size += len(part)
            out = b"".join(parts)
        else:
            raise UnsupportedCodecError(
                f"cannot decompress codec {codec}"
                + (" (snappy)" if codec == Compression.SNAPPY else "")
            )
    except (zlib.error, RuntimeError, zstandard.ZstdError, EOFError, OSError) as e:
        raise CorruptBatchError(f"cannot decompress records (codec {codec}): {e}") from None
    if len(out) > limit:
        raise CorruptBatchError(f"records expand past {limit} bytes (DECOMPRESSED_BYTES_MAX)")
    return bytes(out)


# ---------------------------------------------------------------------------- encode
def encode_batch(
    records: Sequence[NewRecord]
    | Sequence[tuple[bytes | None, bytes | None, int, Sequence[Header]]],
    *,
    base_offset: int = 0,
    compression: Compression = Compression.NONE,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
    partition_leader_epoch: int = -1,
    is_transactional: bool = False,
) -> bytes:
    """Encode `records` (key, value, timestamp_ms, headers) as one RecordBatch v2.

    Record i gets offset delta i; the first record's timestamp is the base timestamp.
    """
    count = len(records)
    if count == 0:
        raise ValueError("a record batch needs at least one record")
    keys, values, stamps, all_headers = zip(*records, strict=True)
    if not any(all_headers):
        # No headers anywhere: the column encoder, which builds no bytes per record.
        return encode_columns(
            keys,
            values,
            stamps,
            base_offset=base_offset,
            compression=compression,
            producer_id=producer_id,
            producer_epoch=producer_epoch,
            base_sequence=base_sequence,
            partition_leader_epoch=partition_leader_epoch,
            is_transactional=is_transactional,
        )
    base_ts = records[0][2]
    max_ts = base_ts
    parts: list[bytes] = []
    append = parts.append
    varint = _varint
    null = _NULL
    zero = b"\x00"  # attributes
    for delta, (key, value, ts, headers) in enumerate(records):
        if ts > max_ts:  # noqa: PLR1730  # per record: a compare is cheaper than a call
            max_ts = ts
        body = [zero, varint(ts - base_ts), varint(delta)]
        if key is None:
            body.append(null)
        else:
            body.append(varint(len(key)))
            body.append(key)
        if value is None:
            body.append(null)
        else:
            body.append(varint(len(value)))
            body.append(value)
        body.append(varint(len(headers)))
        for hkey, hvalue in headers:
            hk = hkey.encode()
            body.append(varint(len(hk)))
            body.append(hk)
            if hvalue is None:
                body.append(null)
            else:
                body.append(varint(len(hvalue)))
                body.append(hvalue)
        encoded = b"".join(body)
        append(varint(len(encoded)))
        append(encoded)
    return _seal(
        b"".join(parts),
        count,
        base_ts,
        max_ts,
        base_offset=base_offset,
        compression=compression,
        producer_id=producer_id,
        producer_epoch=producer_epoch,
        base_sequence=base_sequence,
        partition_leader_epoch=partition_leader_epoch,
        is_transactional=is_transactional,
    )


def encode_columns(
    keys: Sequence[bytes | None],
    values: Sequence[bytes | None],
    timestamps: Sequence[int],
    *,
    base_offset: int = 0,
    compression: Compression = Compression.NONE,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
    partition_leader_epoch: int = -1,
    is_transactional: bool = False,
) -> bytes:
    """`encode_batch` for records without headers, given as three columns (a producer that
    keeps its records so allocates no tuple per record). Same bytes as encode_batch."""
    count = len(keys)
    if count == 0:
        raise ValueError("a record batch needs at least one record")
    if len(values) != count or len(timestamps) != count:
        raise ValueError(
            f"columns of different lengths: {count} keys, {len(values)} values, "
            f"{len(timestamps)} timestamps"
        )
    base_ts = timestamps[0]
    max_ts = max(timestamps)
    parts: list[bytes] = []
    extend = parts.extend
    varint = _varint
    table = _VARINT_TABLE
    limit = _VARINT_TABLE_LIMIT
    null = _NULL
    zero = b"\x00"
    for delta, (key, value, ts) in enumerate(zip(keys, values, timestamps, strict=True)):
        ts_delta = table[ts - base_ts] if 0 <= ts - base_ts < limit else varint(ts - base_ts)
        offset_delta = table[delta] if delta < limit else varint(delta)
        if key is None:
            key_prefix, key_bytes, key_len = null, b"", 0
        else:
            key_bytes, key_len = key, len(key)
            key_prefix = table[key_len] if key_len < limit else varint(key_len)
        if value is None:
            value_prefix, value_bytes, value_len = null, b"", 0
        else:
            value_bytes, value_len = value, len(value)
            value_prefix = table[value_len] if value_len < limit else varint(value_len)
        size = (
            2
            + len(ts_delta)
            + len(offset_delta)
            + len(key_prefix)
            + key_len
            + len(value_prefix)
            + value_len
        )
        extend(
            (
                table[size] if size < limit else varint(size),
                zero,
                ts_delta,
                offset_delta,
                key_prefix,
                key_bytes,
                value_prefix,
                value_bytes,
                zero,
            )
        )
    return _seal(
        b"".join(parts),
        count,
        base_ts,
        max_ts,
        base_offset=base_offset,
        compression=compression,
        producer_id=producer_id,
        producer_epoch=producer_epoch,
        base_sequence=base_sequence,
        partition_leader_epoch=partition_leader_epoch,
        is_transactional=is_transactional,
    )


def _seal(
    section: bytes,
    count: int,
    base_ts: int,
    max_ts: int,
    *,
    base_offset: int,
    compression: Compression,
    producer_id: int,
    producer_epoch: int,
    base_sequence: int,
    partition_leader_epoch: int = -1,
    is_transactional: bool = False,
) -> bytes:
    """The batch around a records section: compression, header, CRC32C."""
    attributes = int(compression) & _ATTR_CODEC_MASK
    if compression != Compression.NONE:
        section = _compress(compression, section)
    if is_transactional:
        attributes |= _ATTR_TRANSACTIONAL
    header = bytearray(
        HEADER.pack(
            base_offset,
            HEADER_BYTES - LOG_OVERHEAD + len(section),
            partition_leader_epoch,
            MAGIC,
            0,
            attributes,
            count - 1,
            base_ts,
            max_ts,
            producer_id,
            producer_epoch,
            base_sequence,
            count,
        )
    )
    crc = _crc32c.crc32c(section, _crc32c.crc32c(memoryview(header)[ATTRIBUTES_AT:]))
    _CRC.pack_into(header, CRC_AT, crc)
    return bytes(header) + section


# ---------------------------------------------------------------------------- decode
#
# Two decoders, one result. `_decode_loop` walks the records one field at a time and is the
# reference: it accepts exactly the valid records sections and names the problem in every
# other one. `_decode_columns` takes sections of _COLUMNS_MIN_RECORDS records or more (below
# that, its fixed cost of about 20 us loses): `_record_starts` finds where each record starts,
# numpy decodes one field of all the records at a time (`_varint_column`), and C-level loops
# (comprehensions over plain ints, `map`) slice the keys and values and build the Records. It
# returns a result only when it has checked that the loop decoder would return the same, and
# None on anything else (a corrupt section, a varint longer than 8 bytes, a record with more
# than _COLUMNS_MAX_HEADERS headers): the loop decoder then decides, so every error is the
# loop decoder's. tests/test_batch_fast.py holds both to a reference decoder.
# Measured here (2 cores, Python 3.11), 1000-record batches of 100-byte values, per record:
# the decoder before these two ~1.25-1.4 us, the loop decoder ~0.85-0.9, the columns ~0.35
# with null keys and ~0.5 with short keys of varying length (record starts 25-90 ns, numpy
# ~60, slicing keys and values ~55 each, building the Records ~100). Keeping the Records adds
# the garbage collector's share, about 0.2 us more (a tuple subclass is never untracked).
_COLUMNS_MIN_RECORDS = 48
_COLUMNS_MAX_HEADERS = 16
_CHASE_BLOCK = 64
_GALLOP_MIN_RECORDS = 128

_I64 = npt.NDArray[np.int64]
_U8 = npt.NDArray[np.uint8]
_U16 = npt.NDArray[np.uint16]
_new_tuple = tuple.__new__


def _decode_loop(header: BatchHeader, section: bytes, count: int) -> list[Record]:
    """Decode `section` one record and field at a time; any bad byte raises."""
    base_offset = header[0]
    base_ts = header[7]
    read = _read_varint
    new = _new_tuple
    record = Record
    out: list[Record] = []
    append = out.append
    pos = 0
    end = len(section)
    # The varints of one and two bytes (nearly all of them) are read inline, the others by
    # `_read_varint`. An inline read past the end raises IndexError with `pos` still at the
    # start of the varint: `_read_varint` reads it again to raise its own error.
    try:
        for _ in range(count):
            b = section[pos]
            if b < 0x80:
                length = (b >> 1) ^ -(b & 1)
                pos += 1
            elif (c := section[pos + 1]) < 0x80:
                b = (b & 0x7F) | (c << 7)
                length = (b >> 1) ^ -(b & 1)
                pos += 2
            else:
                length, pos = read(section, pos)
            record_end = pos + length
            if length < RECORD_BYTES_MIN - 1 or record_end > end:
                raise CorruptBatchError(f"record length {length} at byte {pos} runs past the batch")
            pos += 1  # attributes: unused in v2
            b = section[pos]
            if b < 0x80:
                ts_delta = (b >> 1) ^ -(b & 1)
                pos += 1
            elif (c := section[pos + 1]) < 0x80:
                b = (b & 0x7F) | (c << 7)
                ts_delta = (b >> 1) ^ -(b & 1)
                pos += 2
            else:
                ts_delta, pos = read(section, pos)
            b = section[pos]
            if b < 0x80:
                offset_delta = (b >> 1) ^ -(b & 1)
                pos += 1
            elif (c := section[pos + 1]) < 0x80:
                b = (b & 0x7F) | (c << 7)
                offset_delta = (b >> 1) ^ -(b & 1)
                pos += 2
            else:
                offset_delta, pos = read(section, pos)
            b = section[pos]
            if b < 0x80:
                klen = (b >> 1) ^ -(b & 1)
                pos += 1
            elif (c := section[pos + 1]) < 0x80:
                b = (b & 0x7F) | (c << 7)
                klen = (b >> 1) ^ -(b & 1)
                pos += 2
            else:
                klen, pos = read(section, pos)
            if klen < 0:
                key = None
            else:
                key = section[pos : pos + klen]
                pos += klen
            b = section[pos]
            if b < 0x80:
                vlen = (b >> 1) ^ -(b & 1)
                pos += 1
            elif (c := section[pos + 1]) < 0x80:
                b = (b & 0x7F) | (c << 7)
                vlen = (b >> 1) ^ -(b & 1)
                pos += 2
            else:
                vlen, pos = read(section, pos)
            if vlen < 0:
                value = None
            else:
                value = section[pos : pos + vlen]
                pos += vlen
            b = section[pos]
            if b < 0x80:
                hcount = (b >> 1) ^ -(b & 1)
                pos += 1
            else:
                hcount, pos = read(section, pos)
            headers: tuple[Header, ...] = ()
            if hcount:
                if hcount < 0 or hcount > record_end - pos:
                    raise CorruptBatchError(f"header count {hcount} does not fit its record")
                items: list[Header] = []
                for _h in range(hcount):
                    hklen, pos = read(section, pos)
                    if hklen < 0 or pos + hklen > record_end:
                        raise CorruptBatchError(f"header key length {hklen} runs past its record")
                    try:
                        hkey = section[pos : pos + hklen].decode()
                    except UnicodeDecodeError:
                        raise CorruptBatchError("header key is not valid UTF-8") from None
                    pos += hklen
                    hvlen, pos = read(section, pos)
                    if hvlen < 0:
                        hvalue = None
                    else:
                        hvalue = section[pos : pos + hvlen]
                        pos += hvlen
                    items.append((hkey, hvalue))
                headers = tuple(items)
            if pos != record_end:
                raise CorruptBatchError(
                    f"record at offset delta {offset_delta} is {length} bytes long but its "
                    f"fields take {length + pos - record_end}"
                )
            append(
                new(record, (base_offset + offset_delta, base_ts + ts_delta, key, value, headers))
            )
    except IndexError:
        read(section, pos)  # raises CorruptBatchError
        raise AssertionError("unreachable: _read_varint raises past the end") from None
    if pos != end:
        raise CorruptBatchError(f"{end - pos} bytes left after the last of {count} records")
    return out


def _varint_tables() -> tuple[_I64, npt.NDArray[np.uint8]]:
    word = np.arange(1 << 16, dtype=np.int64)
    first, second = word & 0xFF, word >> 8
    raw = np.where(first < 0x80, first, (first & 0x7F) | (second << 7))
    width = np.where(first < 0x80, 1, np.where(second < 0x80, 2, 0)).astype(np.uint8)
    return np.where(width == 0, _NOT_SHORT, (raw >> 1) ^ -(raw & 1)), width


# Indexed by the two bytes a varint starts with, little-endian (first | second << 8):
# _ZIGZAG holds its value and _VARINT_WIDTH its width when it is one byte long (first < 0x80,
# second ignored) or two (first >= 0x80 > second); for a longer one, a width of 0 and a
# value of _NOT_SHORT, which no length plus width can equal.
_NOT_SHORT = -(1 << 40)
_ZIGZAG, _VARINT_WIDTH = _varint_tables()
# Longer varints, which numpy decodes a byte at a time, are limited to 8 bytes (56 bits): every
# value is then within +-2**55, and no sum of a position and a few such values can overflow an
# int64. The loop decoder takes the rare section with a longer one.
_VARINT_COLUMN_BYTES_MAX = 8


def _varint_column(data: _U8, words: _U16, pos: _I64) -> tuple[_I64, _I64] | None:
    """The zig-zag varints that start at each of `pos`: their values and the positions after
    them; None when one is longer than _VARINT_COLUMN_BYTES_MAX bytes.

    `data` holds the bytes the records lie in and `words` the little-endian 16-bit word that
    starts at each of them but the last. Raises IndexError for a read past the end of `data`.
    """
    first = data[pos]
    if first.tobytes().isascii():  # all one byte long
        return _ZIGZAG.take(first), pos + 1
    word: npt.NDArray[np.integer[Any]]
    try:
        word = words[pos]
    except IndexError:  # one starts at the last byte: its second byte reads as itself
        word = (data.take(pos + 1, mode="clip").astype(np.uint16) << 8) | first
    width = _VARINT_WIDTH.take(word)
    if 0 not in width.tobytes():  # none longer than two bytes
        return _ZIGZAG.take(word), pos + width
    more = first >= 0x80
    raw = (first & 0x7F).astype(np.int64)
    after = pos + 1
    for shift in range(7, 7 * _VARINT_COLUMN_BYTES_MAX, 7):
        # Clipped: a read past the end repeats the last byte, which continues the varint.
        byte = data.take(after, mode="clip")
        raw |= ((byte & 0x7F) * more).astype(np.int64) << shift
        after += more
        more &= byte >= 0x80
        if not more.any():
            return (raw >> 1) ^ -(raw & 1), after
    return None


def _slices(buf: bytes, start: _I64, length: _I64, has_null: bool) -> list[bytes | None]:
    """buf[start:start + length] for each pair, None where the length is negative."""
    starts = start.tolist()
    ends = (start + length).tolist()
    if has_null:
        return [buf[i:j] if j >= i else None for i, j in zip(starts, ends, strict=True)]
    return [buf[i:j] for i, j in zip(starts, ends, strict=True)]


def _header_columns(
    data: _U8, words: _U16, buf: bytes, pos: _I64, record_end: _I64, header_count: _I64
) -> list[tuple[Header, ...]] | None:
    """The headers of every record, one header slot at a time; `pos` (where each record's
    headers start) is advanced past them. None on anything the loop decoder must judge."""
    has = np.flatnonzero(header_count)
    counts = header_count[has]
    hpos = pos[has]
    hend = record_end[has]
    if counts.min() < 0 or (counts > hend - hpos).any():
        return None
    slots = int(counts.max())
    if slots > _COLUMNS_MAX_HEADERS:
        return None
    slot_items: list[list[Header]] = []  # per slot: the header of each record that has it
    for slot in range(slots):
        in_slot = counts > slot  # the records with a header in this slot
        col = _varint_column(data, words, hpos[in_slot])
        if col is None:
            return None
        key_length, key_start = col
        if key_length.min() < 0:
            return None
        key_end = key_start + key_length
        col = _varint_column(data, words, key_end)
        if col is None:
            return None
        value_length, value_start = col
        hpos[in_slot] = value_start + np.maximum(value_length, 0)
        try:
            keys = [
                buf[i:j].decode() for i, j in zip(key_start.tolist(), key_end.tolist(), strict=True)
            ]
        except UnicodeDecodeError:
            return None
        values = _slices(buf, value_start, value_length, bool(value_length.min() < 0))
        slot_items.append(list(zip(keys, values, strict=True)))
    pos[has] = hpos
    if counts.min() == slots:  # every record with headers has the same number
        tuples = list(zip(*slot_items, strict=True))
    else:
        items: list[list[Header]] = [[] for _ in range(len(has))]
        for slot, headers_in_slot in enumerate(slot_items):
            holders = np.flatnonzero(counts > slot).tolist()
            for i, item in zip(holders, headers_in_slot, strict=True):
                items[i].append(item)
        tuples = [tuple(record_items) for record_items in items]
    if len(has) == len(header_count):
        return tuples
    headers: list[tuple[Header, ...]] = [()] * len(header_count)
    for i, record_headers in zip(has.tolist(), tuples, strict=True):
        headers[i] = record_headers
    return headers


def _record_starts(buf: bytes, words: _U16, start: int, stop: int, count: int) -> list[int] | None:
    """Where each record of the section buf[start:stop] starts, and `stop`: read from the
    length varints alone. Nothing else is checked here (the columns check it all); None when
    the lengths do not add up to the section.

    One Python step a record (the 1- and 2-byte length varints inline), _CHASE_BLOCK records
    at a time. After a block of records that all had the same size, or a run found that way,
    one numpy pass finds how many of the next records have the same size: batches of
    same-size records (fixed-size values, no or same-length keys) then cost little more than
    that pass. Measured, 100-byte values: 90 ns a record stepped, 25-40 galloped.
    """
    starts = [0] * count
    pos = start
    i = 0
    gallop = False
    try:
        while i < count:
            if gallop and count - i >= _GALLOP_MIN_RECORDS:
                b = buf[pos]
                size = 1 + (b >> 1) if b < 0x80 else 2 + (((b & 0x7F) | (buf[pos + 1] << 7)) >> 1)
                run = min(count - i, (stop - pos) // size)
                if run > 1:
                    guess = np.arange(pos, pos + run * size, size)
                    word = words[guess]
                    same = _ZIGZAG.take(word) + _VARINT_WIDTH.take(word) == size
                    if not same.all():
                        run = int(same.argmin())
                    if run > 1:
                        starts[i : i + run] = range(pos, pos + run * size, size)
                        i += run
                        pos += run * size
                        gallop = run >= _CHASE_BLOCK
                        continue
            first, i = i, min(count, i + _CHASE_BLOCK)
            for j in range(first, i):
                starts[j] = pos
                b = buf[pos]
                if b < 0x80:
                    pos += 1 + (b >> 1)
                elif (c := buf[pos + 1]) < 0x80:
                    pos += 2 + (((b & 0x7F) | (c << 7)) >> 1)
                else:
                    skip, pos = _read_varint(buf, pos)
                    if skip < 0:
                        return None
                    pos += skip
            # Were the records of this block all the same size (as far as a guess goes)?
            gallop = i - first == _CHASE_BLOCK and pos - starts[first] == _CHASE_BLOCK * (
                pos - starts[i - 1]
            )
    except (IndexError, CorruptBatchError):
        return None
    if pos != stop:
        return None
    starts.append(stop)
    return starts


def _decode_columns(
    header: BatchHeader, buf: bytes, start: int, stop: int, count: int
) -> list[Record] | None:
    """Decode the section buf[start:stop] column by column; None when the loop decoder must
    decide. Positions are in `buf`: an uncompressed section is decoded where it lies."""
    if stop - start < count * RECORD_BYTES_MIN:
        return None
    data: _U8 = np.frombuffer(buf, np.uint8)
    # An overlapping view, not a copy: words[i] is buf[i] | buf[i + 1] << 8.
    words: _U16 = np.ndarray((len(buf) - 1,), "<u2", buf, strides=(1,))
    starts = _record_starts(buf, words, start, stop, count)
    if starts is None:
        return None
    try:
        return _columns(header, buf, data, words, starts)
    except IndexError:  # a field runs past the end of `buf`
        return None


def _columns(
    header: BatchHeader, buf: bytes, data: _U8, words: _U16, starts: list[int]
) -> list[Record] | None:
    """The records whose boundaries in `buf` are `starts` (see _record_starts)."""
    count = len(starts) - 1
    bounds: _I64 = np.array(starts, np.int64)
    record_end = bounds[1:]
    # Each record's length varint, decoded in full, must lead to the next record's start.
    # (A length below RECORD_BYTES_MIN - 1 fails the check that the fields fill the record.)
    col = _varint_column(data, words, bounds[:-1])
    if col is None:
        return None
    length, p = col
    if (p + length).tobytes() != record_end.tobytes():
        return None
    p += 1  # attributes: unused in v2
    col = _varint_column(data, words, p)
    if col is None:
        return None
    ts_delta, p = col
    col = _varint_column(data, words, p)
    if col is None:
        return None
    offset_delta, p = col
    col = _varint_column(data, words, p)
    if col is None:
        return None
    key_length, key_start = col
    has_null_key = bool(key_length.min() < 0)
    p = key_start + (np.maximum(key_length, 0) if has_null_key else key_length)
    col = _varint_column(data, words, p)
    if col is None:
        return None
    value_length, value_start = col
    has_null_value = bool(value_length.min() < 0)
    p = value_start + (np.maximum(value_length, 0) if has_null_value else value_length)
    col = _varint_column(data, words, p)
    if col is None:
        return None
    header_count, p = col
    headers: Iterable[tuple[Header, ...]]
    if np.count_nonzero(header_count):
        with_headers = _header_columns(data, words, buf, p, record_end, header_count)
        if with_headers is None:
            return None
        headers = with_headers
    else:
        headers = repeat((), count)
    # Every field of every record lies inside it: each record ends where its length says.
    if p.tobytes() != record_end.tobytes():
        return None

    base_offset = header[0]
    offsets: Iterable[int]
    if offset_delta.tobytes() == np.arange(count, dtype=np.int64).tobytes():
        offsets = range(base_offset, base_offset + count)
    else:
        offsets = [base_offset + delta for delta in offset_delta.tolist()]
    base_ts = header[7]
    timestamps: Iterable[int]
    if header[5] & _ATTR_TIMESTAMP_TYPE:
        # LogAppendTime: see _decode_records.
        timestamps = repeat(header[8], count)
    elif -(1 << 62) <= base_ts < 1 << 62:  # deltas are within +-2**55: no int64 overflow
        timestamps = (ts_delta + base_ts).tolist()
    else:
        timestamps = [base_ts + delta for delta in ts_delta.tolist()]
    keys: Iterable[bytes | None]
    if has_null_key and key_length.max() < 0:
        keys = repeat(None, count)
    else:
        keys = _slices(buf, key_start, key_length, has_null_key)
    values = _slices(buf, value_start, value_length, has_null_value)
    return list(
        map(
            _new_tuple,
            repeat(Record, count),
            zip(offsets, timestamps, keys, values, headers, strict=True),
        )
    )


def _decode_records(header: BatchHeader, buf: bytes, start: int, stop: int) -> list[Record]:
    """The records of the section buf[start:stop]."""
    count = header.record_count
    if count * RECORD_BYTES_MIN > stop - start:
        raise CorruptBatchError(
            f"record count {count} cannot fit in a {stop - start}-byte records section"
        )
    if count >= _COLUMNS_MIN_RECORDS:
        records = _decode_columns(header, buf, start, stop, count)
        if records is not None:
            return records
    section = buf if start == 0 and stop == len(buf) else buf[start:stop]
    out = _decode_loop(header, section, count)
    if header.attributes & _ATTR_TIMESTAMP_TYPE:
        # LogAppendTime: the broker stamped maxTimestamp on the batch without rewriting the
        # records, so every record's timestamp is maxTimestamp and the deltas are ignored.
        max_ts = header.max_timestamp
        return [record._replace(timestamp_ms=max_ts) for record in out]
    return out


def decode_batch(
    buf: Buffer, pos: int = 0, end: int | None = None
) -> tuple[BatchHeader, list[Record]]:
    """Check and decode the batch at `pos`: its header and its records, in offset order.

    Any bytes that are not a valid batch raise CorruptBatchError (or UnsupportedCodecError,
    a subclass, for a snappy batch), never another exception.
    """
    header = check_batch(buf, pos, end)
    start = pos + HEADER_BYTES
    stop = pos + header.size
    codec = header.compression
    if codec != Compression.NONE:
        section = _decompress(codec, memoryview(buf)[start:stop])
        return header, _decode_records(header, section, 0, len(section))
    if isinstance(buf, bytes):  # decoded in place: keys and values are sliced from `buf`
        return header, _decode_records(header, buf, start, stop)
    section = bytes(memoryview(buf)[start:stop])
    return header, _decode_records(header, section, 0, len(section))


def iter_batches(buf: Buffer) -> Iterator[tuple[BatchHeader, list[Record]]]:
    """Decode back-to-back batches, as a fetch returns them."""
    pos, end = 0, len(buf)
    while pos < end:
        header, records = decode_batch(buf, pos, end)
        yield header, records
        pos += header.size


def decode_records(buf: Buffer) -> list[Record]:
    """All records of back-to-back batches, flattened."""
    out: list[Record] = []
    for _header, records in iter_batches(buf):
        out.extend(records)
    return out
