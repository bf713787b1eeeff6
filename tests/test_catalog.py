"""The topic catalog and the file-system helpers under it: names, limits, persistence, crashes."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage import _catalog
from storage._catalog import (
    PARTITIONS_MAX,
    TOPIC_NAME_PATTERN,
    Catalog,
    TopicMeta,
    validate_topic_name,
)
from storage._config import FsyncPolicy, LogConfig
from storage._errors import (
    DiskFullError,
    InvalidConfigError,
    InvalidNameError,
    LimitExceededError,
    StorageError,
    TopicExistsError,
    UnknownTopicError,
)
from storage._fs import atomic_write, fsync_dir, remove_tree, tmp_name

# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["ok.name_-1", "a", "A" * 249, "__consumer_offsetz", "...", "-", "topic-0"]
)
def test_valid_names_are_accepted(name: str) -> None:
    assert validate_topic_name(name) == name


@pytest.mark.parametrize(
    "name",
    [".", "..", "a/b", "/etc", "a\\b", "", "a" * 250, "tópico", "名前", "a b", "a\n", "a\x00"],
)
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_topic_name(name)


def test_name_error_names_the_rule_and_the_name() -> None:
    with pytest.raises(InvalidNameError, match=r"'a/b'.*\[A-Za-z0-9\._-\]"):
        validate_topic_name("a/b")
    with pytest.raises(InvalidNameError, match=r"'\.\.'"):
        validate_topic_name("..")


def test_name_error_truncates_a_long_name() -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_topic_name("x" * 10_000)
    message = str(info.value)
    assert "10000 characters" in message
    assert len(message) < 300


@given(
    st.one_of(
        st.text(),
        st.from_regex(TOPIC_NAME_PATTERN, fullmatch=True),
        st.sampled_from([".", "..", "a" * 249, "a" * 250]),
    )
)
def test_a_name_validates_exactly_when_it_fits_the_rule(name: str) -> None:
    fits = TOPIC_NAME_PATTERN.fullmatch(name) is not None and name not in {".", ".."}
    try:
        returned = validate_topic_name(name)
    except InvalidNameError:
        assert not fits
    else:
        assert fits
        assert returned == name


# --- create, list, get, delete -------------------------------------------------------------


def test_create_get_list_delete(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    orders = catalog.create_topic("orders", 3)
    audit = catalog.create_topic("audit", 1)

    assert orders.name == "orders"
    assert orders.partitions == 3
    assert dict(orders.config) == {}
    assert len(orders.topic_id) == 32
    assert orders.topic_id != audit.topic_id
    assert catalog.get("orders") == orders
    assert [meta.name for meta in catalog.list()] == ["audit", "orders"]
    for partition in range(3):
        assert catalog.partition_dir("orders", partition) == tmp_path / f"orders-{partition}"
        assert (tmp_path / f"orders-{partition}").is_dir()

    (tmp_path / "orders-1" / "00000000000000000000.log").write_bytes(b"records")
    catalog.delete_topic("orders")

    with pytest.raises(UnknownTopicError, match="orders"):
        catalog.get("orders")
    assert [meta.name for meta in catalog.list()] == ["audit"]
    assert not any(tmp_path.glob("orders-*"))
    assert not (tmp_path / "topics" / "orders.json").exists()
    assert (tmp_path / "audit-0").is_dir()


def test_metadata_file_has_the_documented_format(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    meta = catalog.create_topic("orders", 2, {"retention_ms": 3_600_000})

    document = json.loads((tmp_path / "topics" / "orders.json").read_text("utf-8"))

    assert document == {
        "version": 1,
        "name": "orders",
        "partitions": 2,
        "config": {"retention_ms": 3_600_000},
        "topic_id": meta.topic_id,
    }


def test_reopen_keeps_topics(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    created = [
        catalog.create_topic("orders", 3, {"retention_ms": "3600000", "fsync": "always"}),
        catalog.create_topic("audit", 1),
    ]
    (tmp_path / "orders-2" / "data").write_bytes(b"kept")

    reopened = Catalog.open(tmp_path)

    assert reopened.list() == sorted(created, key=lambda meta: meta.name)
    assert (tmp_path / "orders-2" / "data").read_bytes() == b"kept"


def test_longest_name_round_trips_on_disk(tmp_path: pathlib.Path) -> None:
    name = "n" * 249
    catalog = Catalog.open(tmp_path)
    meta = catalog.create_topic(name, PARTITIONS_MAX)

    assert Catalog.open(tmp_path).get(name) == meta
    assert catalog.partition_dir(name, PARTITIONS_MAX - 1).is_dir()


def test_open_creates_a_missing_data_dir(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "a" / "b"

    catalog = Catalog.open(data_dir)

    assert catalog.list() == []
    assert (data_dir / "topics").is_dir()


def test_duplicate_create_is_refused_and_keeps_the_original(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    original = catalog.create_topic("orders", 2)

    with pytest.raises(TopicExistsError, match="orders"):
        catalog.create_topic("orders", 5)

    assert catalog.get("orders") == original
    assert Catalog.open(tmp_path).get("orders") == original


def test_delete_then_recreate_starts_empty_with_a_new_id(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    old = catalog.create_topic("orders", 1)
    (tmp_path / "orders-0" / "data").write_bytes(b"old records")
    catalog.delete_topic("orders")

    new = catalog.create_topic("orders", 1)

    assert new.topic_id != old.topic_id
    assert list((tmp_path / "orders-0").iterdir()) == []


def test_unknown_topic_is_refused(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    with pytest.raises(UnknownTopicError, match="nope"):
        catalog.delete_topic("nope")
    with pytest.raises(UnknownTopicError, match="nope"):
        catalog.add_partitions("nope", 2)
    with pytest.raises(UnknownTopicError, match="nope"):
        catalog.log_config("nope", LogConfig())


def test_partition_dir_refuses_a_partition_outside_the_topic(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    catalog.create_topic("orders", 2)
    for partition in (-1, 2):
        with pytest.raises(UnknownTopicError, match=rf"2 partitions.*partition {partition}"):
            catalog.partition_dir("orders", partition)


def test_create_refuses_an_invalid_name_and_writes_nothing(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    with pytest.raises(InvalidNameError):
        catalog.create_topic("../escape", 1)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["topics"]
    assert list((tmp_path / "topics").iterdir()) == []


# --- limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("partitions", [0, -1])
def test_partition_count_below_one_is_refused(tmp_path: pathlib.Path, partitions: int) -> None:
    catalog = Catalog.open(tmp_path)
    with pytest.raises(InvalidConfigError, match=rf"at least 1, got {partitions}"):
        catalog.create_topic("orders", partitions)
    assert catalog.list() == []


def test_partition_count_above_the_limit_is_refused(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    with pytest.raises(LimitExceededError, match=rf"{PARTITIONS_MAX + 1}.*{PARTITIONS_MAX}"):
        catalog.create_topic("orders", PARTITIONS_MAX + 1)
    assert catalog.list() == []
    assert not any(tmp_path.glob("orders-*"))


def test_partition_count_at_the_limit_is_allowed(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    catalog.create_topic("wide", PARTITIONS_MAX)
    assert (tmp_path / f"wide-{PARTITIONS_MAX - 1}").is_dir()


def test_partition_count_must_be_an_integer(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    with pytest.raises(InvalidConfigError, match="integer"):
        catalog.create_topic("orders", True)


def test_topic_count_limit(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_catalog, "TOPICS_MAX", 2)
    catalog = Catalog.open(tmp_path)
    catalog.create_topic("a", 1)
    catalog.create_topic("b", 1)

    with pytest.raises(LimitExceededError, match=r"2 topics exist, the limit is 2"):
        catalog.create_topic("c", 1)

    catalog.delete_topic("a")
    catalog.create_topic("c", 1)


# --- add_partitions ------------------------------------------------------------------------


def test_add_partitions_grows_and_persists(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    before = catalog.create_topic("orders", 2, {"retention_ms": 1000})
    (tmp_path / "orders-0" / "data").write_bytes(b"kept")

    after = catalog.add_partitions("orders", 5)

    assert after.partitions == 5
    assert after.topic_id == before.topic_id
    assert after.config == before.config
    assert catalog.get("orders") == after
    assert Catalog.open(tmp_path).get("orders") == after
    assert sorted(path.name for path in tmp_path.glob("orders-*")) == [
        f"orders-{partition}" for partition in range(5)
    ]
    assert (tmp_path / "orders-0" / "data").read_bytes() == b"kept"


@pytest.mark.parametrize("new_total", [3, 2, 0])
def test_add_partitions_refuses_to_shrink_or_stay(tmp_path: pathlib.Path, new_total: int) -> None:
    catalog = Catalog.open(tmp_path)
    catalog.create_topic("orders", 3)

    with pytest.raises(InvalidConfigError, match=rf"has 3 partitions; requested {new_total}"):
        catalog.add_partitions("orders", new_total)

    assert catalog.get("orders").partitions == 3
    assert (tmp_path / "orders-2").is_dir()


def test_add_partitions_above_the_limit_is_refused(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    catalog.create_topic("orders", 3)
    with pytest.raises(LimitExceededError, match=str(PARTITIONS_MAX)):
        catalog.add_partitions("orders", PARTITIONS_MAX + 1)
    assert catalog.get("orders").partitions == 3
    assert not (tmp_path / "orders-3").exists()


# --- config overrides ----------------------------------------------------------------------


def test_overrides_are_kept_as_given_and_applied_to_the_broker_default(
    tmp_path: pathlib.Path,
) -> None:
    catalog = Catalog.open(tmp_path)
    overrides: dict[str, str | int | None] = {
        "retention_ms": "3600000",
        "retention_bytes": None,
        "fsync": FsyncPolicy.ALWAYS,
    }
    meta = catalog.create_topic("orders", 1, overrides)
    broker_default = LogConfig(retention_bytes=10**9, segment_bytes=64 * 1024 * 1024)

    config = catalog.log_config("orders", broker_default)

    assert dict(meta.config) == {
        "retention_ms": "3600000",
        "retention_bytes": None,
        "fsync": "always",
    }
    assert config.retention_ms == 3_600_000
    assert config.retention_bytes is None
    assert config.fsync is FsyncPolicy.ALWAYS
    assert config.segment_bytes == 64 * 1024 * 1024  # not overridden: the broker's value
    assert Catalog.open(tmp_path).log_config("orders", broker_default) == config


def test_changing_the_callers_dict_does_not_change_the_topic(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    overrides: dict[str, str | int | None] = {"retention_ms": 1000}
    meta = catalog.create_topic("orders", 1, overrides)

    overrides["retention_ms"] = 5

    assert catalog.get("orders").config["retention_ms"] == 1000
    with pytest.raises(TypeError):
        meta.config["retention_ms"] = 5  # type: ignore[index]


def test_unknown_config_key_is_refused_by_name(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    with pytest.raises(InvalidConfigError, match=re.escape("'retention.hours'")):
        catalog.create_topic("orders", 1, {"retention.hours": 1})
    assert catalog.list() == []
    assert not any(tmp_path.glob("orders-*"))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("retention_ms", "soon"),
        ("segment_bytes", 1),
        ("segment_bytes", None),
        ("fsync", "sometimes"),
        ("batch_bytes_max", True),
    ],
)
def test_bad_config_value_is_refused(
    tmp_path: pathlib.Path, key: str, value: str | int | None
) -> None:
    catalog = Catalog.open(tmp_path)
    with pytest.raises(InvalidConfigError, match=key):
        catalog.create_topic("orders", 1, {key: value})
    assert catalog.list() == []


def test_config_value_of_another_type_is_refused(tmp_path: pathlib.Path) -> None:
    catalog = Catalog.open(tmp_path)
    with pytest.raises(InvalidConfigError, match="retention_ms"):
        catalog.create_topic("orders", 1, {"retention_ms": 1.5})  # type: ignore[dict-item]


# --- files on disk and crashes -------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"version": 2, "name": "orders", "partitions": 1, "config": {}, "topic_id": "'
        + b"0" * 32
        + b'"}',
        b'{"version": 1, "name": "other", "partitions": 1, "config": {}, "topic_id": "'
        + b"0" * 32
        + b'"}',
        b'{"version": 1, "name": "orders", "partitions": 0, "config": {}, "topic_id": "'
        + b"0" * 32
        + b'"}',
        b'{"version": 1, "name": "orders", "partitions": 1, "config": {"x": 1}, "topic_id": "'
        + b"0" * 32
        + b'"}',
        b'{"version": 1, "name": "orders", "partitions": 1, "config": {}, "topic_id": 7}',
        b" " * (_catalog.METADATA_BYTES_MAX + 1),
    ],
)
def test_unreadable_metadata_file_is_an_error_naming_the_file(
    tmp_path: pathlib.Path, content: bytes
) -> None:
    Catalog.open(tmp_path).create_topic("orders", 1)
    path = tmp_path / "topics" / "orders.json"
    path.write_bytes(content)

    with pytest.raises(StorageError, match=str(path)):
        Catalog.open(tmp_path)
    assert (tmp_path / "orders-0").is_dir()  # the topic's data is not touched


def test_interrupted_delete_is_finished_on_open(tmp_path: pathlib.Path) -> None:
    Catalog.open(tmp_path).create_topic("orders", 2)
    Catalog.open(tmp_path).create_topic("audit", 1)
    (tmp_path / "orders-1" / "data").write_bytes(b"deleted records")
    (tmp_path / "topics" / "orders.json").unlink()  # crash after the commit point

    catalog = Catalog.open(tmp_path)

    assert [meta.name for meta in catalog.list()] == ["audit"]
    assert not any(tmp_path.glob("orders-*"))
    assert (tmp_path / "audit-0").is_dir()


def test_interrupted_add_partitions_is_undone_on_open(tmp_path: pathlib.Path) -> None:
    Catalog.open(tmp_path).create_topic("orders", 2)
    (tmp_path / "orders-2").mkdir()  # crash after the new directory, before the metadata

    catalog = Catalog.open(tmp_path)

    assert catalog.get("orders").partitions == 2
    assert not (tmp_path / "orders-2").exists()


def test_missing_partition_dir_is_created_on_open(tmp_path: pathlib.Path) -> None:
    Catalog.open(tmp_path).create_topic("orders", 2)
    (tmp_path / "orders-1").rmdir()  # crash after the metadata, before the directory

    Catalog.open(tmp_path)

    assert (tmp_path / "orders-1").is_dir()


def test_open_leaves_what_the_catalog_did_not_name_alone(tmp_path: pathlib.Path) -> None:
    Catalog.open(tmp_path).create_topic("orders", 1)
    for name in ("notes", "orders-01", "..-0", "lost+found"):
        (tmp_path / name).mkdir()
    (tmp_path / "orders-7").write_bytes(b"a file, not a partition directory")
    (tmp_path / "topics" / "README").write_bytes(b"not metadata")

    Catalog.open(tmp_path)

    for name in ("notes", "orders-01", "..-0", "lost+found", "orders-7", "topics/README"):
        assert (tmp_path / name).exists()


def test_leftover_tmp_files_are_removed_on_open(tmp_path: pathlib.Path) -> None:
    Catalog.open(tmp_path).create_topic("orders", 1)
    tmp = tmp_path / "topics" / ".orders.json.tmp"
    tmp.write_bytes(b'{"half a write')

    catalog = Catalog.open(tmp_path)

    assert not tmp.exists()
    assert catalog.get("orders").partitions == 1


def test_failed_metadata_write_leaves_no_topic(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = Catalog.open(tmp_path)
    real_fsync = os.fsync

    def disk_full_on_files(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the metadata temp file, not a directory
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_on_files)
    with pytest.raises(DiskFullError):
        catalog.create_topic("orders", 2)
    monkeypatch.undo()

    assert catalog.list() == []
    assert not any(tmp_path.glob("orders-*"))
    assert list((tmp_path / "topics").iterdir()) == []
    assert Catalog.open(tmp_path).list() == []


def test_topic_meta_is_equal_by_value() -> None:
    one = TopicMeta(name="t", partitions=1, config={"retention_ms": 1}, topic_id="0" * 32)
    two = TopicMeta(name="t", partitions=1, config={"retention_ms": 1}, topic_id="0" * 32)
    assert one == two
    assert hash(one) == hash(two)


# --- file-system helpers -------------------------------------------------------------------


def test_atomic_write_replaces_content_and_leaves_no_tmp_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"old")
    atomic_write(path, b"new")

    assert path.read_bytes() == b"new"
    assert [entry.name for entry in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_of_the_longest_name(tmp_path: pathlib.Path) -> None:
    path = tmp_path / ("n" * 255)
    assert len(tmp_name(path.name)) <= 255

    atomic_write(path, b"data")

    assert path.read_bytes() == b"data"
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]


def test_failed_atomic_write_keeps_the_old_content(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"old")

    def io_error(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", io_error)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write(path, b"new")
    monkeypatch.undo()

    assert path.read_bytes() == b"old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["state.json"]


def test_remove_tree_and_fsync_dir(tmp_path: pathlib.Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_bytes(b"x")
    fsync_dir(tmp_path)

    remove_tree(tree)

    assert list(tmp_path.iterdir()) == []


def test_internal_names_are_reserved_and_their_directories_kept(tmp_path: pathlib.Path) -> None:
    """`__consumer_offsets` holds the groups' committed offsets beside the topics."""
    with pytest.raises(InvalidNameError, match="reserved"):
        validate_topic_name("__consumer_offsets")
    internal = tmp_path / "__consumer_offsets-0"
    internal.mkdir()
    (internal / "00000000000000000000.log").write_bytes(b"")
    Catalog.open(tmp_path)
    assert (internal / "00000000000000000000.log").exists()
