"""The consumer's decoder (stream.client._decode.decode_fetch) against storage's.

For any bytes, decode_fetch must give what the consumer made of them before it had its own
decoder: storage.decode_records, the records below the offset asked for cut off (by bisection:
they are in offset order), topic and partition added to each -- or raise the same error with
the same message. Fetches are generated from records through storage's encoder (every codec,
LogAppendTime, control and transactional batches, gaps between batches, a start offset before,
inside and after them), and records sections are written by hand, with what the encoder never
writes (over-long varints, odd null lengths, offset deltas out of order) and then damaged.

The columns only take answers of COLUMNS_RECORDS_MIN records or more, and slice and gallop
over runs of 16 to 64 records or more; most tests lower those thresholds (`small_thresholds`)
so that hypothesis' small examples go through the columns, and check that they did.
"""

from __future__ import annotations

import itertools
import struct
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from storage import (
    HEADER_BYTES,
    Compression,
    CorruptBatchError,
    NewRecord,
    UnsupportedCodecError,
    crc32c,
    decode_records,
    encode_batch,
    split_batches,
)
from storage._batch import ATTRIBUTES_AT, CRC_AT, HEADER, LOG_OVERHEAD, MAX_TIMESTAMP_AT
from stream.client import _decode
from stream.client._base import Record
from stream.client._decode import decode_fetch

TOPIC, PARTITION = "events", 3
LOG_APPEND_TIME = 0x08
CONTROL = 0x20
CODECS = [Compression.NONE, Compression.GZIP, Compression.LZ4, Compression.ZSTD]
NOW_MS = 1_700_000_000_000

Outcome = tuple[list[Record], int] | tuple[type[Exception], str]


def by_storage(data: bytes, offset: int) -> Outcome:
    """What the consumer made of a fetch answer before decode_fetch: the reference."""
    try:
        records = decode_records(data)
    except CorruptBatchError as e:
        return type(e), str(e)
    first = 0
    if records[0].offset < offset:
        first = bisect_left([r.offset for r in records], offset)
    return [Record(TOPIC, PARTITION, *r) for r in records[first:]], records[-1].offset


def by_decode_fetch(data: bytes, offset: int) -> Outcome:
    try:
        return decode_fetch(data, TOPIC, PARTITION, offset)
    except CorruptBatchError as e:
        return type(e), str(e)


def columns_answer(data: bytes, offset: int) -> bool:
    """Whether the columns decoded `data` (rather than leaving it to storage)."""
    try:
        return _decode._decode_columns(data, TOPIC, PARTITION, offset) is not None
    except CorruptBatchError:
        return False


@contextmanager
def small_thresholds() -> Iterator[None]:
    """The columns take answers of any size, galloping and slicing runs of two or more."""
    with mock.patch.multiple(
        _decode,
        COLUMNS_RECORDS_MIN=1,
        STEP_RECORDS=2,
        GALLOP_RECORDS_MIN=2,
        SLICE_RUN_MIN=2,
    ):
        yield


def restamped(batch: bytes, *, attributes: int = 0, max_timestamp: int | None = None) -> bytes:
    """`batch` with attribute bits set and maxTimestamp replaced, its CRC made valid again."""
    out = bytearray(batch)
    (old,) = struct.unpack_from(">h", out, ATTRIBUTES_AT)
    struct.pack_into(">h", out, ATTRIBUTES_AT, old | attributes)
    if max_timestamp is not None:
        struct.pack_into(">q", out, MAX_TIMESTAMP_AT, max_timestamp)
    struct.pack_into(">I", out, CRC_AT, crc32c(bytes(out[ATTRIBUTES_AT:])))
    return bytes(out)


def fixed_size_fetch(batches: int, per_batch: int, codec: Compression = Compression.NONE) -> bytes:
    """Back-to-back batches of 100-byte records (10-byte keys), offsets from 0, as a producer
    under load writes them."""
    value = b"v" * 90
    return b"".join(
        encode_batch(
            [
                NewRecord(b"%010d" % (b * per_batch + i), value, NOW_MS + i)
                for i in range(per_batch)
            ],
            base_offset=b * per_batch,
            compression=codec,
        )
        for b in range(batches)
    )


# ---------------------------------------------------------------------------- encoded batches
# Keys and values: null, empty, varied, and of a few fixed sizes (runs of one layout).
payloads = st.one_of(
    st.none(),
    st.binary(max_size=24),
    st.sampled_from([b"", b"k" * 10, b"\x00" * 7, b"v" * 90]),
)
no_headers: st.SearchStrategy[tuple[tuple[str, bytes | None], ...]] = st.just(())
some_headers = st.lists(
    st.tuples(st.text(max_size=6), st.none() | st.binary(max_size=6)), max_size=3
).map(tuple)


@st.composite
def batch_records(
    draw: st.DrawFn, headers: st.SearchStrategy[tuple[tuple[str, bytes | None], ...]]
) -> list[NewRecord]:
    base_ts = draw(st.sampled_from([0, NOW_MS, -5, (1 << 62) + 7]))
    count = draw(st.integers(1, 40))
    deltas = st.integers(0, 50) | st.integers(-(1 << 20), 1 << 20)
    return [
        NewRecord(draw(payloads), draw(payloads), base_ts + draw(deltas), draw(headers))
        for _ in range(count)
    ]


class Fetch(NamedTuple):
    data: bytes
    offset: int  # the offset asked for
    headers_free: bool  # no record has headers


@st.composite
def fetches(draw: st.DrawFn, with_headers: bool = False) -> Fetch:
    """One to four batches of one partition, offsets rising, and the offset asked for."""
    headers = st.one_of(no_headers, some_headers) if with_headers else no_headers
    batches: list[bytes] = []
    base_offset = draw(st.integers(0, 1 << 40))
    first_offset = base_offset
    headers_free = True
    for _ in range(draw(st.integers(1, 4))):
        records = draw(batch_records(headers))
        headers_free &= not any(r.headers for r in records)
        batch = encode_batch(
            records,
            base_offset=base_offset,
            compression=draw(st.sampled_from(CODECS)),
            is_transactional=draw(st.booleans()),
        )
        flags = draw(st.sampled_from([0, LOG_APPEND_TIME, CONTROL, LOG_APPEND_TIME | CONTROL]))
        if flags:
            batch = restamped(batch, attributes=flags, max_timestamp=draw(st.integers(0, NOW_MS)))
        batches.append(batch)
        base_offset += len(records) + draw(st.sampled_from([0, 0, 1, 1000]))  # gaps, at times
    offset = draw(st.integers(first_offset - 2, base_offset + 2))
    return Fetch(b"".join(batches), offset, headers_free)


@settings(max_examples=300, deadline=None)
@given(fetches())
def test_columns_give_what_storage_gives(fetch: Fetch) -> None:
    with small_thresholds():
        assert by_decode_fetch(fetch.data, fetch.offset) == by_storage(fetch.data, fetch.offset)
        # Base timestamps too large for int64 sums are left to storage (unless LogAppendTime
        # replaces them); everything else is the columns'.
        if all(
            h.attributes & LOG_APPEND_TIME or abs(h.base_timestamp) < 1 << 62
            for h in split_batches(fetch.data)
        ):
            assert columns_answer(fetch.data, fetch.offset)


@settings(max_examples=300, deadline=None)
@given(fetches(), st.integers(-2, 3000))
def test_stop_leaves_out_the_records_from_it_on(fetch: Fetch, stop_shift: int) -> None:
    """A share fetch decodes only up to its last acquired offset: what storage gives, cut."""
    stop = fetch.offset + stop_shift
    with small_thresholds():
        got = decode_fetch_or_error(fetch.data, fetch.offset, stop)
        want = by_storage(fetch.data, fetch.offset)
        if isinstance(want[0], list):
            records, last = want
            want = ([r for r in records if r.offset < stop], last)
        assert got == want


def decode_fetch_or_error(data: bytes, offset: int, stop: int) -> Outcome:
    try:
        return decode_fetch(data, TOPIC, PARTITION, offset, stop)
    except CorruptBatchError as e:
        return type(e), str(e)


@settings(max_examples=100, deadline=None)
@given(fetches(with_headers=True))
def test_records_with_headers_are_decoded_by_storage(fetch: Fetch) -> None:
    with small_thresholds():
        assert by_decode_fetch(fetch.data, fetch.offset) == by_storage(fetch.data, fetch.offset)
        if not fetch.headers_free:
            assert not columns_answer(fetch.data, fetch.offset)


# ---------------------------------------------------------------------------- written by hand
def zigzag(value: int, pad: int = 0) -> bytes:
    """The zig-zag varint of `value`, with `pad` redundant continuation bytes (up to 10)."""
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while True:
        out.append(n & 0x7F)
        n >>= 7
        if not n:
            break
        out[-1] |= 0x80
    for _ in range(min(pad, 10 - len(out))):
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


class Written(NamedTuple):
    """A record as bytes go: a key or value of type int is written as that (negative) length.

    `quirk` makes it invalid in a way only a field-by-field check finds: "spare", a byte after
    the fields inside the record's length; "negative", the length written as -length - 1 (its
    varint is the length's with the lowest bit set); "count", one header counted, none there.
    """

    ts_delta: int
    offset_delta: int
    key: bytes | int
    value: bytes | int
    headers: tuple[tuple[bytes, bytes | int], ...]
    pad: int
    quirk: str = ""

    def encoded(self) -> bytes:
        def field(data: bytes | int) -> bytes:
            if isinstance(data, int):
                return zigzag(data, self.pad)
            return zigzag(len(data), self.pad) + data

        header_count = len(self.headers) + (self.quirk == "count")
        body = b"\x00" + zigzag(self.ts_delta, self.pad) + zigzag(self.offset_delta, self.pad)
        body += field(self.key) + field(self.value) + zigzag(header_count, self.pad)
        for name, value in self.headers:
            body += field(name) + field(value)
        if self.quirk == "spare":
            body += b"\x00"
        length = -len(body) - 1 if self.quirk == "negative" else len(body)
        return zigzag(length, self.pad) + body


def batch_around(
    section: bytes, count: int, *, base_offset: int, attributes: int = 0, base_ts: int = 0
) -> bytes:
    """A batch with a valid CRC around any records section."""
    out = bytearray(
        HEADER.pack(
            base_offset,
            HEADER_BYTES - LOG_OVERHEAD + len(section),
            -1,  # partitionLeaderEpoch
            2,  # magic
            0,  # crc, set below
            attributes,
            count - 1,
            base_ts,
            base_ts,  # maxTimestamp
            -1,
            -1,
            -1,
            count,
        )
    )
    out += section
    struct.pack_into(">I", out, CRC_AT, crc32c(bytes(out[ATTRIBUTES_AT:])))
    return bytes(out)


written_payloads = st.one_of(
    st.binary(max_size=12), st.just(b"x" * 20), st.integers(-3, -1), st.just(-(1 << 30))
)
written_headers = st.lists(st.tuples(st.binary(max_size=3), written_payloads), max_size=2)
short_deltas = st.integers(-70, 70) | st.integers(-(1 << 40), 1 << 40)
long_deltas = short_deltas | st.just(-(1 << 62))  # a 9-byte varint


# What a batch of written records gets wrong, if anything: each of these makes the columns
# leave it to storage (which decodes it or raises), so a batch has one at most.
FLAWS = [
    "",
    "",
    "",
    "",
    "offset deltas",  # out of order
    "headers",
    "long deltas",  # timestamp deltas of up to 9 bytes
    "spare",  # the quirks of Written
    "negative",
    "count",
    "flip",  # damage to the records section, under a valid CRC
    "cut",
    "grow",
    "record count",
]


@st.composite
def written_batches(draw: st.DrawFn, base_offset: int) -> tuple[bytes, int]:
    """A batch of hand-written records with at most one flaw, under a valid CRC; and the
    offset after its last record."""
    count = draw(st.integers(1, 12))
    flaw = draw(st.sampled_from(FLAWS))
    headers = written_headers if flaw == "headers" else st.just([])
    deltas = long_deltas if flaw == "long deltas" else short_deltas
    records = [
        Written(
            ts_delta=draw(deltas),
            offset_delta=draw(st.integers(-2, count + 2)) if flaw == "offset deltas" else i,
            key=draw(written_payloads),
            value=draw(written_payloads),
            headers=tuple(draw(headers)),
            pad=draw(st.sampled_from([0, 0, 0, 1, 9])),
        )
        for i in range(count)
    ]
    if flaw in {"spare", "negative", "count"}:
        at = draw(st.integers(0, count - 1))
        records[at] = records[at]._replace(quirk=flaw)
    section = bytearray(b"".join(r.encoded() for r in records))
    if flaw == "flip":
        at = draw(st.integers(0, len(section) - 1))
        section[at] ^= 1 << draw(st.integers(0, 7))
    elif flaw == "cut":
        del section[draw(st.integers(0, len(section) - 1)) :]
    elif flaw == "grow":
        section += draw(st.binary(min_size=1, max_size=3))
    elif flaw == "record count":
        count += draw(st.sampled_from([-1, 1])) if count > 1 else 1
    attributes = draw(st.sampled_from([0, LOG_APPEND_TIME]))
    # The extremes: a base timestamp plus a delta can leave int64.
    base_ts = draw(st.sampled_from([0, NOW_MS, (1 << 63) - 5, -(1 << 63)]))
    batch = batch_around(
        bytes(section), count, base_offset=base_offset, attributes=attributes, base_ts=base_ts
    )
    return batch, base_offset + count


@st.composite
def written_fetches(draw: st.DrawFn) -> tuple[bytes, int]:
    base_offset = draw(st.integers(0, 1000))
    first = base_offset
    batches = []
    for _ in range(draw(st.integers(1, 3))):
        batch, base_offset = draw(written_batches(base_offset))
        batches.append(batch)
    data = b"".join(batches)
    if draw(st.integers(0, 3)) == 0:  # damage outside the records sections: CRC, lengths...
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]
    return data, draw(st.integers(first - 1, base_offset + 1))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(written_fetches())
@example(  # a record's length varint that runs past the end of the answer
    (batch_around(b"\x00" * 40 + b"\xff", 6, base_offset=0), 0)
)
def test_hand_written_and_damaged_answers_give_what_storage_gives(
    fetch: tuple[bytes, int],
) -> None:
    data, offset = fetch
    with small_thresholds():
        assert by_decode_fetch(data, offset) == by_storage(data, offset)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_a_cut_answer_raises_what_storage_raises(data: st.DataObject) -> None:
    answer = fixed_size_fetch(3, 70)
    cut = answer[: data.draw(st.integers(1, len(answer) - 1))]
    with small_thresholds():
        assert by_decode_fetch(cut, 0) == by_storage(cut, 0)
    outcome = by_decode_fetch(cut, 0)
    assert outcome[0] is CorruptBatchError


# ---------------------------------------------------------------------------- examples
@pytest.mark.parametrize(
    ("offset", "first", "count"),
    [
        (0, 0, 3000),  # from the start
        (-5, 0, 3000),  # below the first batch
        (437, 437, 2563),  # inside the first batch
        (1000, 1000, 2000),  # the second batch's first record: the first batch left out
        (2500, 2500, 500),  # inside the last batch, two before it left out
        (2999, 2999, 1),  # the last record
        (3000, None, 0),  # past the last record: nothing, but the answer is still checked
    ],
)
def test_start_offset_cuts_off_whole_batches_and_part_of_one(
    offset: int, first: int | None, count: int
) -> None:
    data = fixed_size_fetch(3, 1000)
    assert columns_answer(data, offset)  # real thresholds: large answers take the columns
    records, last = decode_fetch(data, TOPIC, PARTITION, offset)
    assert last == 2999
    assert len(records) == count
    assert [r.offset for r in records] == list(range(3000 - count, 3000))
    if first is not None:
        assert records[0] == Record(
            TOPIC, PARTITION, first, NOW_MS + first % 1000, b"%010d" % first, b"v" * 90
        )
    assert (records, last) == by_storage(data, offset)


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec(codec: Compression) -> None:
    data = fixed_size_fetch(2, 800, codec)
    assert columns_answer(data, 300)
    assert by_decode_fetch(data, 300) == by_storage(data, 300)


def test_log_append_time_control_and_transactional_batches() -> None:
    value = b"\x00" * 40
    plain = [NewRecord(None, value, NOW_MS + i) for i in range(250)]
    data = b"".join(
        [
            restamped(
                encode_batch(plain, base_offset=0), attributes=LOG_APPEND_TIME, max_timestamp=5
            ),
            restamped(
                encode_batch(plain, base_offset=250, is_transactional=True), attributes=CONTROL
            ),
            encode_batch(plain, base_offset=600, compression=Compression.ZSTD),  # after a gap
        ]
    )
    assert columns_answer(data, 100)
    records, last = decode_fetch(data, TOPIC, PARTITION, 100)
    assert (records, last) == by_storage(data, 100)
    assert last == 849
    assert {r.timestamp_ms for r in records[:150]} == {5}  # LogAppendTime: maxTimestamp
    assert records[150].offset == 250
    assert records[400].offset == 600
    assert all(r.key is None and r.value == value for r in records)


def test_headers_and_long_varints_are_left_to_storage() -> None:
    with_headers = [NewRecord(b"k", b"v", NOW_MS, (("trace", b"1"), ("none", None)))] * 300
    far_timestamps = [NewRecord(b"k", b"v", NOW_MS + (i << 50)) for i in range(300)]
    for records in (with_headers, far_timestamps):
        data = encode_batch(records, base_offset=7)
        assert not columns_answer(data, 0)
        assert by_decode_fetch(data, 0) == by_storage(data, 0)


def test_offsets_out_of_order_are_left_to_storage() -> None:
    written = [Written(0, 299 - i, b"k", b"v", (), 0) for i in range(300)]
    data = batch_around(b"".join(r.encoded() for r in written), 300, base_offset=10)
    assert not columns_answer(data, 50)
    assert by_decode_fetch(data, 50) == by_storage(data, 50)


def test_a_snappy_batch_raises_what_storage_raises() -> None:
    data = fixed_size_fetch(1, 300)
    snappy = restamped(data, attributes=int(Compression.SNAPPY))
    with pytest.raises(UnsupportedCodecError) as raised:
        decode_fetch(snappy, TOPIC, PARTITION, 0)
    with pytest.raises(UnsupportedCodecError) as expected:
        decode_records(snappy)
    assert str(raised.value) == str(expected.value)


def test_a_bad_crc_in_a_later_batch_raises_what_storage_raises() -> None:
    data = bytearray(fixed_size_fetch(3, 300))
    data[-1] ^= 0xFF
    assert by_decode_fetch(bytes(data), 0) == by_storage(bytes(data), 0)


def test_small_answers_are_decoded_by_storage() -> None:
    few = fixed_size_fetch(2, 10)  # 20 records: the columns look, and decline
    assert not columns_answer(few, 3)
    assert by_decode_fetch(few, 3) == by_storage(few, 3)
    one = fixed_size_fetch(1, 1)  # too short to hold enough records: not even a look
    with mock.patch.object(_decode, "_decode_columns", side_effect=AssertionError):
        assert by_decode_fetch(one, 0) == by_storage(one, 0)


def test_an_empty_answer_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="at least one batch"):
        decode_fetch(b"", TOPIC, PARTITION, 0)


def test_runs_of_one_layout_and_varied_records_slice_alike() -> None:
    """Fixed-size records sliced by run, varied ones one by one: the same bytes either way."""
    varied = [
        NewRecord(b"k" * (i % 7), bytes([i % 256]) * (i % 300), NOW_MS + i * 1000)
        for i in range(400)
    ]
    fixed = [NewRecord(b"key", b"\x00" * 64, NOW_MS) for _ in range(400)]
    mixed = list(itertools.chain.from_iterable(zip(varied[:200], fixed[:200], strict=True)))
    for records in (varied, fixed, mixed, fixed[:100] + varied[:100] + fixed[:100]):
        data = encode_batch(records, base_offset=0)
        assert columns_answer(data, 0)
        assert by_decode_fetch(data, 0) == by_storage(data, 0)


@pytest.mark.parametrize("quirk", ["spare", "negative", "count"])
def test_records_that_only_a_field_by_field_check_rejects(quirk: str) -> None:
    written = [Written(1, i, b"k", b"v", (), 0) for i in range(300)]
    written[123] = written[123]._replace(quirk=quirk)
    data = batch_around(b"".join(r.encoded() for r in written), 300, base_offset=0)
    assert by_decode_fetch(data, 0) == by_storage(data, 0)
    assert by_storage(data, 0)[0] is CorruptBatchError


def test_timestamps_past_int64_are_left_to_storage() -> None:
    written = [Written(i, i, b"k", b"v", (), 0) for i in range(300)]
    data = batch_around(
        b"".join(r.encoded() for r in written), 300, base_offset=0, base_ts=(1 << 63) - 5
    )
    assert not columns_answer(data, 0)
    records, _last = decode_fetch(data, TOPIC, PARTITION, 0)
    assert records[-1].timestamp_ms == (1 << 63) - 5 + 299
    assert (records, _last) == by_storage(data, 0)


def test_batches_whose_offsets_do_not_rise_are_left_to_storage() -> None:
    first = encode_batch([NewRecord(b"k", b"v", NOW_MS)] * 250, base_offset=500)
    for second_base in (0, 400, 749):  # before, overlapping, sharing the last offset
        second = encode_batch([NewRecord(b"k", b"w", NOW_MS)] * 250, base_offset=second_base)
        data = first + second
        assert not columns_answer(data, 600)
        assert by_decode_fetch(data, 600) == by_storage(data, 600)
        assert by_decode_fetch(data, 100) == by_storage(data, 100)


def test_same_first_byte_of_length_is_not_the_same_length() -> None:
    """Records of 100 and 164 bytes start with the same byte (0xc8): galloping over a run of
    one size compares both bytes of a two-byte length varint."""
    short = [NewRecord(None, b"s" * 95, NOW_MS)] * 100
    long = [NewRecord(None, b"l" * 159, NOW_MS)] * 100
    data = encode_batch(short + long + short, base_offset=0)
    assert columns_answer(data, 0)
    assert by_decode_fetch(data, 0) == by_storage(data, 0)
