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
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import crc32c as _crc32c
import lz4.frame
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

# A record needs at least 7 bytes: length, attributes, timestamp delta, offset delta, key
# length, value length and header count, one byte each. Bounds decode loops on bad input.
RECORD_BYTES_MIN = 7
# Decompressing is bounded so that a small malicious batch cannot expand without limit.
DECOMPRESSED_BYTES_MAX = 64 * 1024 * 1024


class Compression(enum.IntEnum):
    """Kafka's codec ids for the records section."""

    NONE = 0
    GZIP = 1
    SNAPPY = 2  # recognised and stored as-is by the broker; not encoded or decoded here
    LZ4 = 3
    ZSTD = 4


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
    if length < HEADER_BYTES - LOG_OVERHEAD:
        raise CorruptBatchError(
            f"batch length {length} at byte {pos} is below the minimum "
            f"{HEADER_BYTES - LOG_OVERHEAD}"
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
    if fields[5] & _ATTR_CODEC_MASK > Compression.ZSTD:
        raise CorruptBatchError(
            f"unknown compression codec {fields[5] & _ATTR_CODEC_MASK} at byte {pos}"
        )
    actual = _crc32c.crc32c(memoryview(buf)[pos + ATTRIBUTES_AT : pos + size])
    if actual != fields[4]:
        raise CorruptBatchError(
            f"CRC32C mismatch at byte {pos}: header says {fields[4]:#010x}, "
            f"bytes give {actual:#010x}"
        )
    return BatchHeader._make(fields)


def split_batches(buf: Buffer) -> list[BatchHeader]:
    """Validate one or more back-to-back batches filling `buf` exactly; return their headers."""
    headers: list[BatchHeader] = []
    pos, end = 0, len(buf)
    if end == 0:
        raise CorruptBatchError("empty payload: expected at least one record batch")
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
            out = d.decompress(bytes(data), max_length=limit + 1)
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
            out = reader.read(limit + 1)
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
    base_ts = records[0][2]
    max_ts = base_ts
    parts: list[bytes] = []
    append = parts.append
    varint = _varint
    null = _NULL
    for delta, (key, value, ts, headers) in enumerate(records):
        max_ts = max(max_ts, ts)
        body = [b"\x00", varint(ts - base_ts), varint(delta)]
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
    section = b"".join(parts)
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
def _decode_records(header: BatchHeader, section: bytes) -> list[Record]:
    count = header.record_count
    if count * RECORD_BYTES_MIN > len(section):
        raise CorruptBatchError(
            f"record count {count} cannot fit in a {len(section)}-byte records section"
        )
    base_offset = header.base_offset
    base_ts = header.base_timestamp
    read = _read_varint
    out: list[Record] = []
    append = out.append
    pos = 0
    end = len(section)
    for _ in range(count):
        length, pos = read(section, pos)
        record_end = pos + length
        if length < RECORD_BYTES_MIN - 1 or record_end > end:
            raise CorruptBatchError(f"record length {length} at byte {pos} runs past the batch")
        pos += 1  # attributes: unused in v2
        ts_delta, pos = read(section, pos)
        offset_delta, pos = read(section, pos)
        klen, pos = read(section, pos)
        if klen < 0:
            key = None
        else:
            key = section[pos : pos + klen]
            pos += klen
        vlen, pos = read(section, pos)
        if vlen < 0:
            value = None
        else:
            value = section[pos : pos + vlen]
            pos += vlen
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
        append(Record(base_offset + offset_delta, base_ts + ts_delta, key, value, headers))
    if pos != end:
        raise CorruptBatchError(f"{end - pos} bytes left after the last of {count} records")
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
    view = memoryview(buf)[pos + HEADER_BYTES : pos + header.size]
    codec = header.compression
    section = bytes(view) if codec == Compression.NONE else _decompress(codec, view)
    return header, _decode_records(header, section)


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
