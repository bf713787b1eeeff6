"""The fast record decoders of storage._batch against a reference decoder written from the spec.

`_decode_columns` (numpy, for batches of _COLUMNS_MIN_RECORDS records or more) and
`_decode_loop` (one record at a time, with inline varints) must both give exactly what the
reference gives, and must fail exactly where it fails: the loop decoder with CorruptBatchError,
the columns decoder by answering None (the loop decoder then raises). Records are generated
field by field, including what the encoder never writes (over-long varints, negative lengths
other than -1, offset deltas out of order), and then damaged.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import lz4.frame
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
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
    Header,
    NewRecord,
    Record,
    crc32c,
    decode_batch,
    decode_records,
    encode_batch,
    iter_batches,
)
from storage._errors import CorruptBatchError

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
LOG_APPEND_TIME = 0x08


# ---------------------------------------------------------------------------- reference
class InvalidSectionError(Exception):
    """The reference decoder's only error."""


def ref_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A zig-zag varint of at most 10 bytes at `pos`: (value, position after it)."""
    raw = 0
    for i in range(10):
        if pos + i >= len(buf):
            raise InvalidSectionError("varint runs past the end")
        byte = buf[pos + i]
        raw |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return (raw >> 1) ^ -(raw & 1), pos + i + 1
    raise InvalidSectionError("varint longer than 10 bytes")


def ref_record(body: bytes, base_offset: int, base_ts: int) -> Record:
    """One record from its bytes after the length; every field must lie inside them."""
    if not body:
        raise InvalidSectionError("no attributes byte")
    pos = 1  # attributes: unused in v2
    ts_delta, pos = ref_varint(body, pos)
    offset_delta, pos = ref_varint(body, pos)
    fields: list[bytes | None] = []
    for _ in ("key", "value"):
        length, pos = ref_varint(body, pos)
        if length < 0:  # -1 in the spec; the decoder reads any negative length as null
            fields.append(None)
        elif pos + length > len(body):
            raise InvalidSectionError("key or value runs past its record")
        else:
            fields.append(body[pos : pos + length])
            pos += length
    count, pos = ref_varint(body, pos)
    if count < 0:
        raise InvalidSectionError("negative header count")
    headers: list[Header] = []
    for _ in range(count):
        key_length, pos = ref_varint(body, pos)
        if key_length < 0 or pos + key_length > len(body):
            raise InvalidSectionError("bad header key length")
        try:
            name = body[pos : pos + key_length].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidSectionError("header key is not UTF-8") from None
        pos += key_length
        value_length, pos = ref_varint(body, pos)
        if value_length < 0:
            headers.append((name, None))
        elif pos + value_length > len(body):
            raise InvalidSectionError("header value runs past its record")
        else:
            headers.append((name, body[pos : pos + value_length]))
            pos += value_length
    if pos != len(body):
        raise InvalidSectionError("the fields do not fill the record")
    key, value = fields
    return Record(base_offset + offset_delta, base_ts + ts_delta, key, value, tuple(headers))


def ref_records(header: BatchHeader, section: bytes) -> list[Record]:
    """The records of a records section, or InvalidSectionError."""
    out: list[Record] = []
    pos = 0
    for _ in range(header.record_count):
        length, pos = ref_varint(section, pos)
        if length < 0 or pos + length > len(section):
            raise InvalidSectionError("record length runs past the section")
        out.append(
            ref_record(section[pos : pos + length], header.base_offset, header.base_timestamp)
        )
        pos += length
    if pos != len(section):
        raise InvalidSectionError("bytes after the last record")
    if header.attributes & LOG_APPEND_TIME:
        out = [r._replace(timestamp_ms=header.max_timestamp) for r in out]
    return out


def ref_or_none(header: BatchHeader, section: bytes) -> list[Record] | None:
    try:
        return ref_records(header, section)
    except InvalidSectionError:
        return None


# ---------------------------------------------------------------------------- raw records
def varint(value: int, extra: int = 0) -> bytes:
    """Zig-zag varint of `value`, padded with up to `extra` redundant continuation bytes
    (over-long encodings of up to 10 bytes are valid to the decoders)."""
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    for _ in range(min(extra, 10 - len(out))):
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


class RawRecord(NamedTuple):
    """A record's fields as written, including what the encoder never writes."""

    ts_delta: int
    offset_delta: int
    key: bytes | int  # an int is a negative length: a null key
    value: bytes | int
    headers: tuple[tuple[bytes, bytes | int], ...]
    pad: int  # redundant bytes on every varint of this record
    spare: bool = False  # a byte after the fields, inside the record's length: invalid

    def body(self) -> bytes:
        def field(data: bytes | int) -> bytes:
            if isinstance(data, int):
                return varint(data, self.pad)
            return varint(len(data), self.pad) + data

        parts = [b"\x00", varint(self.ts_delta, self.pad), varint(self.offset_delta, self.pad)]
        parts += [field(self.key), field(self.value), varint(len(self.headers), self.pad)]
        for hkey, hvalue in self.headers:
            parts += [field(hkey), field(hvalue)]
        return b"".join(parts)

    def encoded(self) -> bytes:
        body = self.body() + (b"\x00" if self.spare else b"")
        return varint(len(body), self.pad) + body


def section_of(records: list[RawRecord]) -> bytes:
    return b"".join(r.encoded() for r in records)


def header_for(
    count: int, *, base_offset: int = 0, base_ts: int = 0, max_ts: int = 0, attributes: int = 0
) -> BatchHeader:
    return BatchHeader(
        base_offset=base_offset,
        batch_length=0,  # not read by the record decoders
        partition_leader_epoch=-1,
        magic=2,
        crc=0,
        attributes=attributes,
        last_offset_delta=count - 1,
        base_timestamp=base_ts,
        max_timestamp=max_ts,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        record_count=count,
    )


def batch_of(section: bytes, header: BatchHeader) -> bytes:
    """A batch with a valid CRC around an arbitrary records section."""
    out = bytearray(
        HEADER.pack(
            header.base_offset,
            HEADER_BYTES - LOG_OVERHEAD + len(section),
            -1,
            2,
            0,
            header.attributes,
            header.record_count - 1,
            header.base_timestamp,
            header.max_timestamp,
            -1,
            -1,
            -1,
            header.record_count,
        )
    )
    out += section
    struct.pack_into(">I", out, CRC_AT, crc32c(bytes(out[ATTRIBUTES_AT:])))
    return bytes(out)


# ---------------------------------------------------------------------------- strategies
# Varints of one and two bytes (both signs), of a few bytes, and as long as they get.
short_deltas = st.integers(-70, 70) | st.integers(-(1 << 20), 1 << 20)
wide_deltas = short_deltas | st.integers(-(1 << 62), (1 << 62) - 1)
payloads = st.binary(max_size=20) | st.integers(-3, -1) | st.binary(min_size=60, max_size=200)
# Now and then a header key that is not UTF-8: the whole section is then invalid.
header_keys = st.builds(
    lambda text, dice: (b"\xff", b"a\xc3")[dice] if dice < 2 else text.encode(),
    st.text(max_size=6),
    st.integers(0, 400),
)


def raw_records(*, wide: bool) -> st.SearchStrategy[RawRecord]:
    """Records with varints of up to 8 bytes (the columns decoder's reach) or, when `wide`,
    of up to 10 (one of 9 or 10 bytes sends the section to the loop decoder)."""
    return st.builds(
        RawRecord,
        ts_delta=wide_deltas if wide else short_deltas,
        offset_delta=wide_deltas if wide else short_deltas,
        key=payloads,
        value=payloads,
        headers=st.lists(st.tuples(header_keys, payloads), max_size=3).map(tuple),
        pad=st.sampled_from([0, 0, 0, 0, 1, 3, 8] if wide else [0, 0, 0, 0, 1, 3]),
        spare=st.integers(0, 40).map(lambda dice: dice == 0),
    )


raw_sections = st.booleans().flatmap(
    lambda wide: st.tuples(st.just(wide), st.lists(raw_records(wide=wide), min_size=1, max_size=40))
)
bases = st.integers(I64_MIN, I64_MAX) | st.integers(-5, 5) | st.just(1_700_000_000_000)


class Damage(NamedTuple):
    at: int
    patch: bytes
    cut: int


damages = st.none() | st.builds(
    Damage, at=st.integers(0, 10_000), patch=st.binary(max_size=3), cut=st.integers(0, 2)
)


def damaged(section: bytes, damage: Damage | None) -> bytes:
    if damage is None or not section:
        return section
    at = damage.at % len(section)
    out = section[:at] + damage.patch + section[at + len(damage.patch) :]
    return out[: len(out) - damage.cut]


# ---------------------------------------------------------------------------- helpers
def columns(header: BatchHeader, section: bytes) -> list[Record] | None:
    """The columns decoder alone: its records, or None where it leaves the section alone."""
    count = header.record_count
    return _batch._decode_columns(header, section, 0, len(section), count)


def loop(header: BatchHeader, section: bytes) -> list[Record] | None:
    """The public decoder of one section, forced through the loop decoder."""
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_batch, "_COLUMNS_MIN_RECORDS", 1 << 40)
            return _batch._decode_records(header, section, 0, len(section))
    except CorruptBatchError:
        return None


def decoded(header: BatchHeader, section: bytes) -> list[Record] | None:
    """The public decoder of one section, taking the columns whenever it can."""
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_batch, "_COLUMNS_MIN_RECORDS", 1)
            return _batch._decode_records(header, section, 0, len(section))
    except CorruptBatchError:
        return None


def assert_records(got: list[Record]) -> None:
    for r in got:
        assert type(r) is Record
        assert r.key is None or type(r.key) is bytes
        assert r.value is None or type(r.value) is bytes
        assert type(r.headers) is tuple
        for hkey, hvalue in r.headers:
            assert type(hkey) is str
            assert hvalue is None or type(hvalue) is bytes


def check_all_agree(header: BatchHeader, section: bytes) -> list[Record] | None:
    expected = ref_or_none(header, section)
    fast = columns(header, section)
    if fast is not None:
        assert fast == expected
        assert_records(fast)
    assert loop(header, section) == expected
    got = decoded(header, section)
    assert got == expected
    if got is not None:
        assert_records(got)
    return expected


# ---------------------------------------------------------------------------- equivalence
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    wide_records=raw_sections,
    base_offset=bases,
    base_ts=bases,
    max_ts=bases,
    log_append_time=st.booleans(),
    damage=damages,
)
def test_raw_sections_decode_as_the_reference_does(
    wide_records: tuple[bool, list[RawRecord]],
    base_offset: int,
    base_ts: int,
    max_ts: int,
    log_append_time: bool,
    damage: Damage | None,
) -> None:
    wide, records = wide_records
    section = damaged(section_of(records), damage)
    header = header_for(
        len(records),
        base_offset=base_offset,
        base_ts=base_ts,
        max_ts=max_ts,
        attributes=LOG_APPEND_TIME if log_append_time else 0,
    )
    expected = check_all_agree(header, section)
    if damage is None:
        assert expected is not None or any(
            r.spare or any(b"\xff" in k or b"a\xc3" in k for k, _v in r.headers) for r in records
        )
    if expected is not None and not wide and damage is None:
        assert columns(header, section) is not None  # within the columns decoder's reach
    batch = batch_of(section, header)
    try:
        got: list[Record] | None = decode_batch(batch)[1]
    except CorruptBatchError:
        got = None
    assert got == expected


timestamps = st.integers(-1, 1 << 45) | st.integers(-(1 << 53), 1 << 53)
nullable_bytes = st.none() | st.binary(max_size=12) | st.binary(min_size=90, max_size=130)
new_records = st.builds(
    NewRecord,
    key=nullable_bytes,
    value=nullable_bytes,
    timestamp_ms=timestamps,
    headers=st.lists(
        st.tuples(st.text(max_size=8), st.none() | st.binary(max_size=16)), max_size=3
    ).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(
    records=st.lists(new_records, min_size=1, max_size=80),
    base_offset=st.integers(0, 1 << 62),
    codec=st.sampled_from([Compression.NONE, Compression.LZ4, Compression.ZSTD]),
)
def test_encoded_batches_take_the_columns(
    records: list[NewRecord], base_offset: int, codec: Compression
) -> None:
    """What the encoder writes (timestamp deltas within +-2**54 here, at most 16 headers a
    record) is always within the columns decoder's reach, and decodes to what was encoded."""
    batch = encode_batch(records, base_offset=base_offset, compression=codec)
    header = _batch.read_header(batch)
    section = batch[HEADER_BYTES:]
    if codec != Compression.NONE:
        section = _batch._decompress(codec, memoryview(section))
    expected = [
        Record(base_offset + i, r.timestamp_ms, r.key, r.value, tuple(r.headers))
        for i, r in enumerate(records)
    ]
    fast = columns(header, section)
    assert fast == expected
    assert fast is not None
    assert_records(fast)
    assert ref_records(header, section) == expected
    assert decode_batch(batch)[1] == expected


@pytest.mark.parametrize(
    ("delta", "in_reach"),
    [(-(1 << 55), True), ((1 << 55) - 1, True), (1 << 55, False), (-(1 << 55) - 1, False)],
)
def test_the_columns_take_varints_of_up_to_8_bytes(delta: int, in_reach: bool) -> None:
    """8 bytes hold deltas in [-2**55, 2**55); a longer varint goes to the loop decoder."""
    records = [NewRecord(None, b"v", 1_000), NewRecord(None, b"v", 1_000 + delta)]
    batch = encode_batch(records)
    header = _batch.read_header(batch)
    expected = [Record(0, 1_000, None, b"v"), Record(1, 1_000 + delta, None, b"v")]
    assert columns(header, batch[HEADER_BYTES:]) == (expected if in_reach else None)
    assert decode_batch(batch)[1] == expected


@pytest.mark.parametrize("count", [1, 2, 31, 32, 33, 10_000])
@pytest.mark.parametrize(
    "shape", ["null-key", "short-key", "empty", "headers", "some-headers", "mixed", "big"]
)
def test_counts_and_shapes(count: int, shape: str) -> None:
    """Each decoder on its own and the public one, for the shapes producers send."""

    def record(i: int) -> NewRecord:
        ts = 1_700_000_000_000 + (i * 7919) % 1000 - 500  # deltas of both signs
        if shape == "null-key":
            return NewRecord(None, b"v" * 100, ts)
        if shape == "short-key":
            return NewRecord(b"key-%d" % i, bytes(100), ts)
        if shape == "empty":
            return NewRecord(b"", b"", ts)
        if shape == "headers":
            return NewRecord(b"k", b"v" * 100, ts, (("trace", b"abc"), ("empty", None)))
        if shape == "some-headers":
            headers = tuple(("n", b"%d" % j) for j in range(i % 4))
            return NewRecord(None if i % 3 else b"k", b"v" * (i % 150), ts, headers)
        if shape == "mixed":
            return NewRecord(
                None if i % 2 else b"k" * (i % 70), None if i % 5 == 0 else b"x" * (i % 300), ts
            )
        return NewRecord(b"k", bytes(9_000 + i % 3), ts)  # 3-byte record lengths

    if shape == "big":
        count = min(count, 300)  # 10,000 would be 90 MB
    records = [record(i) for i in range(count)]
    batch = encode_batch(records, base_offset=1000)
    expected = [
        Record(1000 + i, r.timestamp_ms, r.key, r.value, tuple(r.headers))
        for i, r in enumerate(records)
    ]
    header, got = decode_batch(batch)
    assert got == expected
    assert_records(got)
    section = batch[HEADER_BYTES:]
    assert ref_records(header, section) == expected
    assert columns(header, section) == expected
    assert loop(header, section) == expected


def test_large_batches_are_decoded_by_the_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The public decoder takes the columns for a typical batch, the loop decoder unused."""
    records = [NewRecord(b"key-%d" % i, bytes(100), 1_700_000_000_000 + i) for i in range(10_000)]
    batch = encode_batch(records, compression=Compression.ZSTD)

    def no_loop(*_args: object) -> list[Record]:
        raise AssertionError("the loop decoder was used")

    monkeypatch.setattr(_batch, "_decode_loop", no_loop)
    got = decode_records(batch + batch)
    assert [r.offset for r in got] == list(range(10_000)) * 2
    assert got[:10_000] == [
        Record(i, r.timestamp_ms, r.key, r.value) for i, r in enumerate(records)
    ]


# ---------------------------------------------------------------------------- corrupt input
def one_record_section(**fields: Any) -> bytes:
    return RawRecord(0, 0, b"k", b"v", (), 0)._replace(**fields).encoded()


VALID = one_record_section()
BODY = VALID[1:]  # attributes, ts delta, offset delta, key length, b"k", value length, ...
LONG = one_record_section(value=b"v" * 100)  # a 2-byte record length
assert LONG[0] >= 0x80 > LONG[1]


def with_length(body: bytes) -> bytes:
    return varint(len(body)) + body


@pytest.mark.parametrize(
    "section",
    [
        pytest.param(VALID[:-1], id="truncated"),
        pytest.param(VALID + b"\x00", id="trailing-byte"),
        pytest.param(b"\x01" + VALID[1:], id="negative-length"),
        # A length whose zig-zag sign bit is set: read as unsigned, it would fit the record.
        pytest.param(bytes([VALID[0] | 1]) + VALID[1:], id="negative-length-that-fits"),
        pytest.param(bytes([LONG[0] | 1]) + LONG[1:], id="negative-2-byte-length-that-fits"),
        pytest.param(b"\x0a" + VALID[1:], id="length-too-short"),
        pytest.param(b"\x7e" + VALID[1:], id="length-too-long"),
        pytest.param(VALID[:2] + b"\x80" * 10 + b"\x00" + VALID[3:], id="11-byte-varint"),
        pytest.param(VALID[:-1] + b"\x01", id="negative-header-count"),
        pytest.param(VALID[:-1] + b"\x7e", id="header-count-too-big"),
        pytest.param(one_record_section(headers=((b"\xff", b"v"),)), id="header-key-not-utf8"),
        pytest.param(one_record_section(headers=((-1, b"v"),)), id="null-header-key"),
        # A header key length of -1 and nothing after it: read as a one-byte header it would
        # fill the record exactly, but it is invalid.
        pytest.param(with_length(BODY[:-1] + b"\x02\x01"), id="null-header-key-at-end"),
        pytest.param(one_record_section(spare=True), id="spare-byte-in-record"),
        pytest.param(varint(len(BODY) - 1) + BODY, id="fields-overrun-record"),
        pytest.param(one_record_section(key=b"k" * 70, spare=True), id="spare-byte-2-byte-length"),
        pytest.param(with_length(BODY[:3] + varint(1 << 61) + BODY[4:]), id="key-length-2**61"),
        pytest.param(with_length(BODY[:5] + varint(1 << 61) + BODY[6:]), id="value-length-2**61"),
        pytest.param(b"\xff" * 7, id="all-ff"),
        pytest.param(bytes(7), id="zeros"),
        pytest.param(b"\x80" * 7, id="endless-varint"),
    ],
)
@pytest.mark.parametrize("copies", [1, 2, 40])
def test_corrupt_sections_raise_corrupt_batch_error(section: bytes, copies: int) -> None:
    """The bad record is the last of `copies`: the columns decoder sees many good ones first."""
    full = VALID * (copies - 1) + section
    header = header_for(copies)
    assert ref_or_none(header, full) is None
    assert columns(header, full) is None
    assert loop(header, full) is None
    with pytest.raises(CorruptBatchError):
        _batch._decode_records(header, full, 0, len(full))
    with pytest.raises(CorruptBatchError):
        decode_batch(batch_of(full, header))


@pytest.mark.parametrize("copies", [1, 40])
def test_valid_oddities_decode(copies: int) -> None:
    """Accepted by the decoder as it always was: over-long varints, negative lengths other
    than -1, offset deltas out of order, 10-byte varints (longer than the columns take)."""
    oddities = [
        one_record_section(pad=3),
        one_record_section(key=-2, value=-70),
        one_record_section(offset_delta=-5, ts_delta=-(1 << 40)),
        one_record_section(ts_delta=1 << 60, pad=0),
        one_record_section(ts_delta=1, pad=9),  # 10 bytes: beyond the columns, still valid
        one_record_section(headers=((b"", -1), (b"h", b""))),
        # 10-byte varints with bits above the 64th: Python ints, as they always were.
        with_length(BODY[:1] + b"\xff" * 9 + b"\x7f" + BODY[2:]),
        with_length(BODY[:2] + b"\xfe" * 9 + b"\x7f" + BODY[3:]),
    ]
    for odd in oddities:
        section = VALID * (copies - 1) + odd
        header = header_for(copies, base_offset=7, base_ts=1_000)
        expected = ref_records(header, section)
        assert check_all_agree(header, section) == expected
        assert decode_batch(batch_of(section, header))[1] == expected


@pytest.mark.parametrize("base_ts", [I64_MIN, I64_MIN + 3, -(1 << 62) - 1, (1 << 62), I64_MAX])
@pytest.mark.parametrize("count", [1, 100])
def test_timestamps_beyond_int64_stay_exact(base_ts: int, count: int) -> None:
    """Base timestamp plus delta can leave the int64 range: Python ints, never wrapped."""
    records = [RawRecord(d, i, b"k", b"v", (), 0) for i, d in enumerate([-5, 5] * count)]
    section = section_of(records)
    header = header_for(len(records), base_ts=base_ts)
    expected = check_all_agree(header, section)
    assert expected is not None
    assert [r.timestamp_ms for r in expected] == [base_ts - 5, base_ts + 5] * count


@settings(max_examples=300, deadline=None)
@given(section=st.binary(max_size=400), count=st.integers(1, 60))
@example(section=VALID * 40, count=40)
def test_arbitrary_sections(section: bytes, count: int) -> None:
    """Any bytes at all, for any record count."""
    check_all_agree(header_for(count), section)


# ---------------------------------------------------------------------------- runs
def ref_starts(section: bytes, count: int) -> list[int]:
    """Where each record starts, and the section's end, for a valid section."""
    starts, pos = [], 0
    for _ in range(count):
        starts.append(pos)
        length, pos = ref_varint(section, pos)
        pos += length
    return [*starts, pos]


def record_starts(section: bytes, count: int) -> list[int] | None:
    words = np.ndarray((len(section) - 1,), "<u2", section, strides=(1,))
    return _batch._record_starts(section, words, 0, len(section), count)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    templates=st.lists(raw_records(wide=False), min_size=1, max_size=4),
    runs=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 300)), min_size=1, max_size=6),
    damage=damages,
)
def test_runs_of_same_size_records(
    templates: list[RawRecord], runs: list[tuple[int, int]], damage: Damage | None
) -> None:
    """Long runs of same-size records, where the record boundaries are found a run at a time
    (see _record_starts), with a record that differs or is damaged anywhere."""
    records = [templates[t % len(templates)] for t, n in runs for _ in range(n)]
    section = damaged(section_of(records), damage)
    header = header_for(len(records), base_ts=1_700_000_000_000)
    expected = check_all_agree(header, section)
    if expected is not None:
        assert record_starts(section, len(records)) == ref_starts(section, len(records))
        if damage is None:
            assert columns(header, section) == expected


@pytest.mark.parametrize("count", [192, 1000, 10_000])
@pytest.mark.parametrize("odd_one", [None, 0, 63, 64, 65, 191, 500, -1])
def test_one_different_record_in_a_run(count: int, odd_one: int | None) -> None:
    """All records the same size but one, which is longer; then also invalid (a header count
    of 1 and no header), without changing any record's size."""
    same = RawRecord(5, 0, -1, b"v" * 100, (), 0)
    records = [same] * count
    if odd_one is not None:
        odd_one %= count
        records[odd_one] = same._replace(value=b"v" * 101)
    section = section_of(records)
    header = header_for(count)
    assert record_starts(section, count) == ref_starts(section, count)
    expected = check_all_agree(header, section)
    assert expected is not None
    assert [r.value for r in expected] == [r.value for r in records]
    if odd_one is not None:
        # The same bytes but a header count of 1 in the odd record: now invalid.
        at = ref_starts(section, count)[odd_one + 1] - 1
        broken = section[:at] + b"\x02" + section[at + 1 :]
        assert check_all_agree(header, broken) is None


# ---------------------------------------------------------------------------- buffers and codecs
def test_batches_are_decoded_in_place_from_any_buffer() -> None:
    """Keys and values are sliced out of a bytes buffer where the batch lies (they are
    still bytes); other buffers are copied first. Same records either way."""
    batches = [
        encode_batch([NewRecord(b"k%d" % i, b"v" * i, i) for i in range(n)], base_offset=off)
        for n, off in ((50, 0), (1, 50), (200, 51))
    ]
    joined = b"".join(batches)
    expected = [r for b in batches for r in decode_batch(bytes(b))[1]]
    for buf in (joined, bytearray(joined), memoryview(joined)):
        got = decode_records(buf)
        assert got == expected
        assert_records(got)
    # A batch in the middle of a larger buffer, garbage around it.
    padded = b"\xff" * 13 + batches[2] + b"\x80" * 9
    _header, records = decode_batch(padded, 13, 13 + len(batches[2]))
    assert records == decode_batch(batches[2])[1]
    assert_records(records)
    assert [h.base_offset for h, _ in iter_batches(joined)] == [0, 50, 51]


class CountingReader:
    """A zstd stream reader that counts the bytes it hands out."""

    def __init__(self, reader: Any, counted: list[int]) -> None:
        self.reader, self.counted = reader, counted

    def read(self, size: int) -> bytes:
        out: bytes = self.reader.read(size)
        self.counted.append(len(out))
        return out


@pytest.mark.parametrize("codec", [Compression.LZ4, Compression.ZSTD])
@pytest.mark.parametrize("step", [7, 1 << 20])
def test_decompression_stops_past_the_limit(
    codec: Compression, step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bomb is decompressed no further than the limit, one step at a time."""
    bomb = encode_batch([NewRecord(None, bytes(4 << 20), 0)], compression=codec)
    assert len(bomb) < 40_000
    counted: list[int] = []
    zstd_decompressor = zstandard.ZstdDecompressor

    class Zstd:
        def stream_reader(self, data: bytes, **kw: Any) -> CountingReader:
            return CountingReader(zstd_decompressor().stream_reader(data, **kw), counted)

    class Lz4(lz4.frame.LZ4FrameDecompressor):  # type: ignore[misc]
        def decompress(self, data: bytes, max_length: int = -1) -> bytes:
            out: bytes = super().decompress(data, max_length=max_length)
            counted.append(len(out))
            return out

    monkeypatch.setattr(zstandard, "ZstdDecompressor", Zstd)
    monkeypatch.setattr(lz4.frame, "LZ4FrameDecompressor", Lz4)
    monkeypatch.setattr(_batch, "_DECOMPRESS_STEP_BYTES", step)
    monkeypatch.setattr(_batch, "DECOMPRESSED_BYTES_MAX", 1000)
    with pytest.raises(CorruptBatchError, match="expand past 1000 bytes"):
        decode_batch(bomb)
    assert 1000 < sum(counted) <= 1001


@pytest.mark.parametrize("codec", [Compression.GZIP, Compression.LZ4, Compression.ZSTD])
@pytest.mark.parametrize("step", [1, 7, 4096, 1 << 20])
def test_decompression_in_steps(
    codec: Compression, step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the decompressed section a step at a time changes nothing: same records,
    same inclusive limit, truncation still caught."""
    records = [NewRecord(b"k", bytes(range(256)) * 4 + b"%d" % i, i) for i in range(300)]
    batch = encode_batch(records, compression=codec)
    expected = decode_batch(encode_batch(records))[1]
    section_bytes = len(encode_batch(records)) - HEADER_BYTES
    monkeypatch.setattr(_batch, "_DECOMPRESS_STEP_BYTES", step)
    assert decode_batch(batch)[1] == expected
    # The limit is inclusive, whatever the step.
    monkeypatch.setattr(_batch, "DECOMPRESSED_BYTES_MAX", section_bytes)
    assert decode_batch(batch)[1] == expected
    monkeypatch.setattr(_batch, "DECOMPRESSED_BYTES_MAX", section_bytes - 1)
    with pytest.raises(CorruptBatchError, match=f"expand past {section_bytes - 1} bytes"):
        decode_batch(batch)
    # A truncated compressed section is caught, whatever the step.
    truncated = batch_of(batch[HEADER_BYTES:-5], _batch.read_header(batch))
    monkeypatch.setattr(_batch, "DECOMPRESSED_BYTES_MAX", 1 << 26)
    with pytest.raises(CorruptBatchError):
        decode_batch(truncated)
