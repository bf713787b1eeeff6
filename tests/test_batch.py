"""RecordBatch v2 codec: pinned CRC32C values and golden bytes, round trips, fuzzing, limits,
and interop with kafka-python, an independent implementation of the same format."""

from __future__ import annotations

import contextlib
import gzip
import struct
import warnings
from typing import Any

import lz4.frame
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import _batch
from storage._batch import (
    ATTRIBUTES_AT,
    CRC_AT,
    HEADER,
    HEADER_BYTES,
    LOG_OVERHEAD,
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
from storage._errors import CorruptBatchError, UnsupportedCodecError

# The codecs we encode and decode; SNAPPY is only stored as-is.
CODECS = [Compression.NONE, Compression.GZIP, Compression.LZ4, Compression.ZSTD]
COMPRESSED_CODECS = [Compression.GZIP, Compression.LZ4, Compression.ZSTD]
# Bytes the CRC does not cover: baseOffset [0, 8) and partitionLeaderEpoch [12, 16).
OUTSIDE_CRC = frozenset(range(8)) | frozenset(range(12, 16))
BATCH_LENGTH_AT = 8
MAGIC_AT = 16
MAX_TIMESTAMP_AT = struct.calcsize(">qiibIhiq")  # after baseTimestamp
RECORD_COUNT_AT = HEADER_BYTES - 4


# ---------------------------------------------------------------------------- helpers
def _crc32c_bitwise(data: bytes) -> int:
    """CRC32C straight from its definition (reflected polynomial 0x82F63B78), one bit a step."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _with_crc(batch: bytes | bytearray) -> bytes:
    """`batch` with its CRC recomputed, as a (possibly malicious) producer would send it."""
    out = bytearray(batch)
    struct.pack_into(">I", out, CRC_AT, _crc32c_bitwise(bytes(out[ATTRIBUTES_AT:])))
    return bytes(out)


def _patched(batch: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(batch)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def _wrap(section: bytes, *, record_count: int, codec: int) -> bytes:
    """A batch around an arbitrary records section, with a correct header and CRC."""
    header = HEADER.pack(
        0, HEADER_BYTES - LOG_OVERHEAD + len(section), -1, 2, 0, codec,
        record_count - 1, 0, 0, -1, -1, -1, record_count,
    )  # fmt: skip
    return _with_crc(header + section)


def _expected(records: list[NewRecord], base_offset: int) -> list[Record]:
    return [
        Record(base_offset + i, r.timestamp_ms, r.key, r.value, tuple(r.headers))
        for i, r in enumerate(records)
    ]


def _kafka_python() -> Any:
    """kafka-python's RecordBatch v2 module, a declared test dependency (never skipped)."""
    # Importing kafka reads its protocol schemas with a deprecated importlib.resources call;
    # the warning is theirs, so it is silenced here rather than in the project's config.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from kafka.record import default_records
    return default_records


def _kafka_python_build(records: list[NewRecord], codec: Compression) -> tuple[bytes, int]:
    """kafka-python's encoding of `records` and the codec it actually used (it falls back to
    none when compressing does not make the records smaller)."""
    kafka = _kafka_python()
    builder = kafka.DefaultRecordBatchBuilder(
        magic=2,
        compression_type=int(codec),
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 30,
    )
    for i, r in enumerate(records):
        assert builder.append(i, r.timestamp_ms, r.key, r.value, list(r.headers)) is not None
    built = bytes(builder.build())
    used = kafka.DefaultRecordBatch(bytearray(built)).compression_type
    return built, int(used)


def _kafka_python_decode(batch: bytes) -> tuple[Any, list[Record]]:
    """kafka-python's view of `batch`: the batch object (after checking its CRC) and records."""
    theirs = _kafka_python().DefaultRecordBatch(bytearray(batch))
    assert theirs.validate_crc()
    records = [Record(r.offset, r.timestamp, r.key, r.value, tuple(r.headers)) for r in theirs]
    return theirs, records


# ---------------------------------------------------------------------------- strategies
timestamps = st.integers(-1, 1 << 45) | st.integers(-(1 << 61), 1 << 61)  # deltas fit an i64
nullable_bytes = st.none() | st.binary(max_size=32)
headers = st.lists(
    st.tuples(st.text(max_size=8), st.none() | st.binary(max_size=16)), max_size=3
).map(tuple)
new_records = st.builds(
    NewRecord, key=nullable_bytes, value=nullable_bytes, timestamp_ms=timestamps, headers=headers
)
record_lists = st.lists(new_records, min_size=1, max_size=50)
# Kafka's own limits on these fields; -1 means "none".
producer_ids = st.integers(-1, (1 << 63) - 1)
producer_epochs = st.integers(-1, (1 << 15) - 1)
sequences = st.integers(-1, (1 << 31) - 1)
base_offsets = st.integers(0, 1 << 62)


# ---------------------------------------------------------------------------- CRC32C
def test_crc32c_known_values() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4, 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4, 32 bytes of ones
    assert crc32c(memoryview(b"123456789")) == crc32c(bytearray(b"123456789"))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64))
def test_crc32c_matches_its_definition(data: bytes) -> None:
    assert crc32c(data) == _crc32c_bitwise(data)


# ---------------------------------------------------------------------------- golden bytes
GOLDEN_RECORDS = [
    NewRecord(b"k", b"v", 1_700_000_000_000, (("h", b"x"),)),
    NewRecord(None, b"", 1_700_000_000_005),
]
GOLDEN_CRC = 0xC41F1730
# Written out by hand from the v2 layout; a change of the encoder's bytes must fail here.
GOLDEN = bytes.fromhex(
    "0000000000000000"  # baseOffset 0
    "00000045"  # batchLength 69 = 81 bytes - LOG_OVERHEAD
    "ffffffff"  # partitionLeaderEpoch -1
    "02"  # magic
    "c41f1730"  # crc: CRC32C of bytes [21, 81)
    "0000"  # attributes: no codec, create time, not transactional, not control
    "00000001"  # lastOffsetDelta
    "0000018bcfe56800"  # baseTimestamp 1_700_000_000_000
    "0000018bcfe56805"  # maxTimestamp 1_700_000_000_005
    "ffffffffffffffff"  # producerId -1
    "ffff"  # producerEpoch -1
    "ffffffff"  # baseSequence -1
    "00000002"  # recordCount
    # Varints are zig-zag: n >= 0 is written as 2n, -1 as 1.
    # record 0: length 12 | attributes | timestampDelta 0 | offsetDelta 0 | key "k" |
    # value "v" | 1 header | key "h" | value "x"
    "18" "00" "00" "00" "02" "6b" "02" "76" "02" "02" "68" "02" "78"
    # record 1: length 6 | attributes | timestampDelta 5 | offsetDelta 1 | key null |
    # value empty | 0 headers
    "0c" "00" "0a" "02" "01" "00" "00"
)  # fmt: skip


def test_golden_batch_bytes() -> None:
    assert encode_batch(GOLDEN_RECORDS) == GOLDEN


def test_golden_batch_crc() -> None:
    assert len(GOLDEN) == 81
    assert read_header(GOLDEN).crc == GOLDEN_CRC
    assert _crc32c_bitwise(GOLDEN[ATTRIBUTES_AT:]) == GOLDEN_CRC
    assert check_batch(GOLDEN).crc == GOLDEN_CRC


def test_golden_batch_decodes() -> None:
    header, records = decode_batch(GOLDEN)
    assert header == BatchHeader(
        base_offset=0,
        batch_length=69,
        partition_leader_epoch=-1,
        magic=2,
        crc=GOLDEN_CRC,
        attributes=0,
        last_offset_delta=1,
        base_timestamp=1_700_000_000_000,
        max_timestamp=1_700_000_000_005,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        record_count=2,
    )
    assert header.size == len(GOLDEN)
    assert header.last_offset == 1
    assert records == [
        Record(0, 1_700_000_000_000, b"k", b"v", (("h", b"x"),)),
        Record(1, 1_700_000_000_005, None, b"", ()),
    ]


def test_golden_batch_matches_kafka_python() -> None:
    theirs, codec = _kafka_python_build(GOLDEN_RECORDS, Compression.NONE)
    assert codec == Compression.NONE
    # kafka-python writes partitionLeaderEpoch 0 where the Java producer writes -1; the CRC
    # does not cover it, so everything else must be identical.
    assert theirs[12:16] == bytes(4)
    assert _patched(theirs, 12, ">i", -1) == GOLDEN


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@settings(max_examples=100, deadline=None)
@given(
    records=record_lists,
    base_offset=base_offsets,
    producer_id=producer_ids,
    producer_epoch=producer_epochs,
    base_sequence=sequences,
    partition_leader_epoch=sequences,
    is_transactional=st.booleans(),
)
def test_round_trip(
    codec: Compression,
    *,
    records: list[NewRecord],
    base_offset: int,
    producer_id: int,
    producer_epoch: int,
    base_sequence: int,
    partition_leader_epoch: int,
    is_transactional: bool,
) -> None:
    batch = encode_batch(
        records,
        base_offset=base_offset,
        compression=codec,
        producer_id=producer_id,
        producer_epoch=producer_epoch,
        base_sequence=base_sequence,
        partition_leader_epoch=partition_leader_epoch,
        is_transactional=is_transactional,
    )
    checked = check_batch(batch)
    header, decoded = decode_batch(batch)
    assert header == checked
    assert decoded == _expected(records, base_offset)
    assert header.size == len(batch)
    assert header.magic == 2
    assert header.compression == codec
    assert header.is_transactional == is_transactional
    assert not header.is_control
    assert header.base_offset == base_offset
    assert header.record_count == len(records)
    assert header.last_offset_delta == len(records) - 1
    assert header.last_offset == base_offset + len(records) - 1
    assert header.base_timestamp == records[0].timestamp_ms
    assert header.max_timestamp == max(r.timestamp_ms for r in records)
    assert header.producer_id == producer_id
    assert header.producer_epoch == producer_epoch
    assert header.base_sequence == base_sequence
    assert header.partition_leader_epoch == partition_leader_epoch


def test_round_trip_accepts_plain_tuples_and_any_buffer() -> None:
    batch = encode_batch([(b"k", b"v", 7, [("h", None)])], base_offset=3)
    expected = [Record(3, 7, b"k", b"v", (("h", None),))]
    for buf in (batch, bytearray(batch), memoryview(batch)):
        assert decode_batch(buf)[1] == expected


@given(
    records=st.lists(
        st.builds(
            NewRecord,
            key=nullable_bytes,
            value=nullable_bytes,
            timestamp_ms=timestamps,
            headers=st.just(()),
        ),
        min_size=1,
        max_size=50,
    ),
    producer_id=producer_ids,
    base_sequence=sequences,
)
def test_column_encoder_gives_the_same_bytes(
    records: list[NewRecord], producer_id: int, base_sequence: int
) -> None:
    keys, values, stamps = ([r[i] for r in records] for i in range(3))
    expected = encode_batch(records, producer_id=producer_id, base_sequence=base_sequence)
    got = encode_columns(
        keys,  # type: ignore[arg-type]  # the generator's element type is lost
        values,  # type: ignore[arg-type]
        stamps,  # type: ignore[arg-type]
        producer_id=producer_id,
        base_sequence=base_sequence,
    )
    assert got == expected


def test_column_encoder_refuses_ragged_columns() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        encode_columns([b"k"], [b"v", b"w"], [1])
    with pytest.raises(ValueError, match="at least one record"):
        encode_columns([], [], [])


def test_encode_rejects_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="at least one record"):
        encode_batch([])


def test_encode_rejects_snappy() -> None:
    with pytest.raises(UnsupportedCodecError, match="snappy"):
        encode_batch(GOLDEN_RECORDS, compression=Compression.SNAPPY)


# ---------------------------------------------------------------------------- fuzzing
def _decodes_or_corrupt(buf: bytes) -> list[Record] | None:
    """Records of the batch in `buf`, or None when it raised CorruptBatchError."""
    try:
        header, records = decode_batch(buf)
    except CorruptBatchError:
        return None
    assert len(records) == header.record_count
    return records


@settings(max_examples=300, deadline=None)
@given(buf=st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_corrupt(buf: bytes) -> None:
    _decodes_or_corrupt(buf)
    with contextlib.suppress(CorruptBatchError):
        decode_records(buf)


@settings(max_examples=300, deadline=None)
@given(
    section=st.binary(max_size=200),
    record_count=st.integers(-2, 12),
    codec=st.integers(0, 7),
)
def test_arbitrary_records_section_with_valid_crc_decodes_or_raises_corrupt(
    section: bytes, record_count: int, codec: int
) -> None:
    """A producer can send any records section with a correct CRC; the decoder must cope."""
    _decodes_or_corrupt(_wrap(section, record_count=record_count, codec=codec))


def _compress(codec: Compression, data: bytes) -> bytes:
    """The codec's standard framing, written by the codec library (not by our module)."""
    if codec == Compression.GZIP:
        return gzip.compress(data)
    if codec == Compression.LZ4:
        return bytes(lz4.frame.compress(data))
    assert codec == Compression.ZSTD
    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("codec", COMPRESSED_CODECS, ids=lambda c: c.name)
@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200), record_count=st.integers(1, 12), cut=st.integers(0, 64))
def test_arbitrary_compressed_section_decodes_or_raises_corrupt(
    codec: Compression, data: bytes, record_count: int, cut: int
) -> None:
    compressed = _compress(codec, data)
    for section in (compressed, compressed[: len(compressed) - cut], compressed + b"\x00"):
        _decodes_or_corrupt(_wrap(section, record_count=record_count, codec=codec))


def _valid_batch(codec: Compression) -> bytes:
    records = [
        *GOLDEN_RECORDS,
        NewRecord(b"key" * 5, b"value" * 20, 1_699_999_999_990, (("a", None), ("b", b""))),
    ]
    return encode_batch(records, base_offset=100, compression=codec, partition_leader_epoch=4)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_every_single_bit_flip_is_caught_outside_base_offset_and_leader_epoch(
    codec: Compression,
) -> None:
    batch = _valid_batch(codec)
    _, expected = decode_batch(batch)
    for at in range(len(batch)):
        for bit in range(8):
            flipped = bytearray(batch)
            flipped[at] ^= 1 << bit
            if at in OUTSIDE_CRC:
                header, records = decode_batch(flipped)
                shift = header.base_offset - 100
                assert records == [r._replace(offset=r.offset + shift) for r in expected]
            elif at >= HEADER_BYTES:
                with pytest.raises(CorruptBatchError, match="CRC32C mismatch"):
                    decode_batch(flipped)
            else:
                with pytest.raises(CorruptBatchError):
                    decode_batch(flipped)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_every_truncation_is_caught(codec: Compression) -> None:
    batch = _valid_batch(codec)
    for size in range(len(batch)):
        with pytest.raises(CorruptBatchError, match="truncated batch"):
            decode_batch(batch[:size])


@settings(max_examples=300, deadline=None)
@given(
    codec=st.sampled_from(CODECS),
    start=st.integers(0, 200),
    patch=st.binary(min_size=1, max_size=24),
)
def test_overwritten_bytes_are_caught_unless_outside_the_crc(
    codec: Compression, start: int, patch: bytes
) -> None:
    batch = _valid_batch(codec)
    start %= len(batch)
    mutated = bytearray(batch)
    mutated[start : start + len(patch)] = patch[: len(batch) - start]
    assert len(mutated) == len(batch)
    changed = {i for i in range(len(batch)) if mutated[i] != batch[i]}
    records = _decodes_or_corrupt(bytes(mutated))
    if changed <= OUTSIDE_CRC:
        assert records is not None
        assert [r[1:] for r in records] == [r[1:] for r in decode_batch(batch)[1]]
    else:
        assert records is None, f"bytes {sorted(changed)} changed and the batch still decodes"


@settings(max_examples=300, deadline=None)
@given(
    codec=st.sampled_from(CODECS),
    start=st.integers(0, 200),
    patch=st.binary(min_size=1, max_size=8),
)
def test_overwritten_records_with_valid_crc_decode_or_raise_corrupt(
    codec: Compression, start: int, patch: bytes
) -> None:
    """Bytes changed before the CRC was computed: only the record decoder stands guard."""
    batch = _valid_batch(codec)
    start = HEADER_BYTES + start % (len(batch) - HEADER_BYTES)
    mutated = bytearray(batch)
    mutated[start : start + len(patch)] = patch[: len(batch) - start]
    _decodes_or_corrupt(_with_crc(mutated))


# ---------------------------------------------------------------------------- base offset
@settings(max_examples=100, deadline=None)
@given(codec=st.sampled_from(CODECS), base_offset=base_offsets)
def test_with_base_offset_keeps_the_crc_and_shifts_offsets(
    codec: Compression, base_offset: int
) -> None:
    batch = _valid_batch(codec)
    patched = with_base_offset(batch, base_offset)
    assert patched[8:] == batch[8:]
    header = check_batch(patched)
    assert header.base_offset == base_offset
    assert header.crc == read_header(batch).crc
    _, before = decode_batch(batch)
    _, after = decode_batch(patched)
    assert [r.offset for r in after] == [base_offset + i for i in range(len(before))]
    assert [r[1:] for r in after] == [r[1:] for r in before]


def test_with_base_offset_accepts_any_buffer() -> None:
    for buf in (bytearray(GOLDEN), memoryview(GOLDEN)):
        assert read_header(with_base_offset(buf, 42)).base_offset == 42


# ---------------------------------------------------------------------------- several batches
def _three_batches() -> list[bytes]:
    return [
        encode_batch(GOLDEN_RECORDS, base_offset=0),
        encode_batch(GOLDEN_RECORDS * 3, base_offset=2, compression=Compression.GZIP),
        encode_batch(GOLDEN_RECORDS[:1], base_offset=8, compression=Compression.ZSTD),
    ]


def test_split_batches_returns_each_header() -> None:
    batches = _three_batches()
    headers = split_batches(b"".join(batches))
    assert headers == [read_header(b) for b in batches]
    assert [h.base_offset for h in headers] == [0, 2, 8]
    assert [h.size for h in headers] == [len(b) for b in batches]


def test_iter_batches_and_decode_records_read_back_to_back_batches() -> None:
    batches = _three_batches()
    joined = b"".join(batches)
    assert [h for h, _ in iter_batches(joined)] == split_batches(joined)
    offsets = [r.offset for r in decode_records(joined)]
    assert offsets == list(range(9))


@pytest.mark.parametrize(
    ("trailer", "message"),
    [
        (b"\x00" * 5, "truncated batch: 5 bytes at byte {at}"),
        (GOLDEN[:70], "truncated batch: length says 81 bytes at byte {at}, only 70 present"),
        (bytes(HEADER_BYTES), "batch length 0 at byte {at} is below the minimum 49"),
    ],
    ids=["short", "cut-batch", "zeros"],
)
def test_split_batches_rejects_trailing_garbage(trailer: bytes, message: str) -> None:
    valid = b"".join(_three_batches())
    # The message names the byte where the garbage starts.
    message = message.format(at=len(valid))
    with pytest.raises(CorruptBatchError, match=message):
        split_batches(valid + trailer)
    with pytest.raises(CorruptBatchError, match=message):
        decode_records(valid + trailer)


def test_split_batches_rejects_an_empty_payload() -> None:
    with pytest.raises(CorruptBatchError, match="empty payload"):
        split_batches(b"")


# ---------------------------------------------------------------------------- limits and codecs
@pytest.mark.parametrize("codec", COMPRESSED_CODECS, ids=lambda c: c.name)
def test_decompression_bomb_is_refused(codec: Compression, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [NewRecord(None, bytes(5000), 0)]
    section_bytes = len(encode_batch(records)) - HEADER_BYTES
    bomb = encode_batch(records, compression=codec)
    assert len(bomb) < 200  # a small batch that expands 25 times
    monkeypatch.setattr(_batch, "DECOMPRESSED_BYTES_MAX", 1000)
    with pytest.raises(CorruptBatchError, match="expand past 1000 bytes"):
        decode_batch(bomb)
    # The limit is inclusive: a records section of exactly the limit still decodes.
    monkeypatch.setattr(_batch, "DECOMPRESSED_BYTES_MAX", section_bytes)
    assert decode_batch(bomb)[1] == _expected(records, 0)
    monkeypatch.setattr(_batch, "DECOMPRESSED_BYTES_MAX", section_bytes - 1)
    with pytest.raises(CorruptBatchError, match=f"expand past {section_bytes - 1} bytes"):
        decode_batch(bomb)


def test_snappy_batch_is_stored_but_not_decoded() -> None:
    snappy = _with_crc(_patched(GOLDEN, ATTRIBUTES_AT, ">h", Compression.SNAPPY))
    header = check_batch(snappy)
    assert header.compression == Compression.SNAPPY
    assert split_batches(snappy) == [header]
    with pytest.raises(UnsupportedCodecError, match="snappy"):
        decode_batch(snappy)


@pytest.mark.parametrize("codec", [5, 6, 7])
def test_unknown_codec_is_corrupt(codec: int) -> None:
    batch = _with_crc(_patched(GOLDEN, ATTRIBUTES_AT, ">h", codec))
    with pytest.raises(CorruptBatchError, match=f"unknown compression codec {codec} at byte 0"):
        check_batch(batch)


def test_log_append_time_batch_gives_every_record_the_max_timestamp() -> None:
    """Attribute bit 3: the broker stamped maxTimestamp on the batch, the records keep their
    producer deltas; Kafka's consumers (and kafka-python) report maxTimestamp for each."""
    append_time_ms = 1_800_000_000_000
    batch = _patched(GOLDEN, ATTRIBUTES_AT, ">h", 0x08)
    batch = _with_crc(_patched(batch, MAX_TIMESTAMP_AT, ">q", append_time_ms))
    header, records = decode_batch(batch)
    assert header.base_timestamp == 1_700_000_000_000
    assert [r.timestamp_ms for r in records] == [append_time_ms] * 2
    assert [r[2:] for r in records] == [r[2:] for r in decode_batch(GOLDEN)[1]]
    assert _kafka_python_decode(batch)[1] == records


# ---------------------------------------------------------------------------- check_batch errors
@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (_patched(GOLDEN, MAGIC_AT, ">b", 1), "magic 1 at byte 0, expected 2"),
        (
            _patched(GOLDEN, BATCH_LENGTH_AT, ">i", 10),
            "batch length 10 at byte 0 is below the minimum 49",
        ),
        (GOLDEN[:60], "truncated batch: 60 bytes at byte 0, a header needs 61"),
        (GOLDEN[:80], "truncated batch: length says 81 bytes at byte 0, only 80 present"),
        (
            _patched(GOLDEN, RECORD_COUNT_AT, ">i", 3),
            "record count 3 does not match last offset delta 1 at byte 0",
        ),
        (
            _patched(GOLDEN, RECORD_COUNT_AT, ">i", 0),
            "record count 0 does not match last offset delta 1",
        ),
        (
            GOLDEN[:-1] + b"\x01",
            "CRC32C mismatch at byte 0: header says 0xc41f1730, bytes give 0x",
        ),
    ],
    ids=["magic", "length", "short-header", "truncated", "count", "zero-count", "crc"],
)
def test_check_batch_names_the_problem(batch: bytes, message: str) -> None:
    with pytest.raises(CorruptBatchError, match=message):
        check_batch(batch)


def test_check_batch_errors_name_the_position() -> None:
    bad = GOLDEN + GOLDEN[:-1] + b"\x01"
    assert check_batch(bad, 0, len(GOLDEN)) == read_header(GOLDEN)
    with pytest.raises(CorruptBatchError, match="CRC32C mismatch at byte 81"):
        check_batch(bad, len(GOLDEN))
    with pytest.raises(CorruptBatchError, match="length says 81 bytes at byte 0, only 80"):
        check_batch(GOLDEN, 0, 80)


# ---------------------------------------------------------------------------- kafka-python interop
# kafka-python only compresses when that makes the records smaller: these records do.
COMPRESSIBLE = [
    NewRecord(b"user-%d" % (i % 3), b"event payload " * 20, 1_700_000_000_000 + i * 7 - 3 * (i % 2),
              (("trace", b"abc"), ("empty", None)) if i % 2 else ())
    for i in range(20)
]  # fmt: skip


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_kafka_python_reads_ours(codec: Compression) -> None:
    batch = encode_batch(COMPRESSIBLE, base_offset=500, compression=codec)
    theirs, records = _kafka_python_decode(batch)
    assert theirs.compression_type == codec
    assert theirs.base_offset == 500
    assert theirs.last_offset_delta == len(COMPRESSIBLE) - 1
    assert theirs.max_timestamp == max(r.timestamp_ms for r in COMPRESSIBLE)
    assert records == _expected(COMPRESSIBLE, 500)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_ours_reads_kafka_python(codec: Compression) -> None:
    batch, used = _kafka_python_build(COMPRESSIBLE, codec)
    assert used == codec
    header, records = decode_batch(with_base_offset(batch, 500))
    assert header.compression == codec
    assert header.max_timestamp == max(r.timestamp_ms for r in COMPRESSIBLE)
    assert records == _expected(COMPRESSIBLE, 500)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@settings(max_examples=50, deadline=None)
@given(records=record_lists)
def test_kafka_python_interop_both_ways(codec: Compression, records: list[NewRecord]) -> None:
    ours = encode_batch(records, compression=codec)
    assert _kafka_python_decode(ours)[1] == _expected(records, 0)
    theirs, used = _kafka_python_build(records, codec)
    header, decoded = decode_batch(theirs)
    assert header.compression == used
    assert header.max_timestamp == max(r.timestamp_ms for r in records)
    assert decoded == _expected(records, 0)
