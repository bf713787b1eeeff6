"""The topic catalog of a data directory: which topics exist, their partition counts, configs.

On-disk layout (the data directory belongs to the broker; nothing else should write in it):

    <data_dir>/
    ├── topics/                      one metadata file per topic
    │   ├── orders.json              {"version": 1, "name": "orders", "partitions": 3,
    │   │                             "config": {"retention_ms": 3600000},
    │   │                             "topic_id": "<uuid4 hex, fixed at creation>"}
    │   └── .orders.json.tmp         only after a crash during a metadata write
    ├── orders-0/                    partition data, owned by that partition's log
    ├── orders-1/
    └── orders-2/

`config` holds the topic's overrides exactly as the user gave them (keys of `LogConfig`,
values str, int or None); the broker's defaults are applied on top when a log is opened.

What is crash-atomic, and why:

- A topic exists if and only if its metadata file exists, and it has exactly the number of
  partitions that file says. Each metadata file is written with `atomic_write` (temp file,
  fsync, rename, fsync of `topics/`), so it is always the old version or the new one.
- That write (or, for a delete, the unlink of the file) is the commit point of every change.
  Partition directories are created *before* it (create_topic, add_partitions) and removed
  *after* it (delete_topic). `Catalog.open` then reconciles the directories with the
  metadata: a partition directory that no metadata covers is removed (an interrupted delete,
  or a create/grow that crashed before its commit), a missing directory of a known partition
  is created, and leftover `*.tmp` files in `topics/` are removed.
- So after a crash and `Catalog.open`, each create_topic, add_partitions and delete_topic has
  either happened completely or not at all.

Every file-system call goes through the disk layer (`_disk.py`, `_fs.py`); only stat calls
(`exists`, `is_dir`, `is_file`) read the live files directly.

Names cannot collide on disk: a partition directory is `<name>-<partition>`, the partition
is decimal digits and a name's last "-" separates them, so the split is unique; the longest
name (249) plus "-1023" fits one path component (255 bytes). On a case-insensitive file
system "Orders" and "orders" would share files; riverlog expects a case-sensitive one.
"""

from __future__ import annotations

import builtins
import json
import os
import pathlib
import re
import types
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import _disk
from ._config import LogConfig
from ._errors import (
    InvalidConfigError,
    InvalidNameError,
    LimitExceededError,
    StorageError,
    TopicExistsError,
    UnknownTopicError,
)
from ._fs import (
    NAME_BYTES_MAX,
    TMP_SUFFIX,
    StrPath,
    atomic_write,
    fsync_dir,
    make_dirs,
    read_file,
    remove_tree_no_fsync,
)

# Kafka's rule for topic names, matched with fullmatch. The characters are safe in file names
# on every file system we run on; 249 leaves room for "-<partition>" in a 255-byte file name.
TOPIC_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,249}")
TOPIC_NAME_CHARS_MAX = 249
# "." and ".." match the pattern but are path components, and a name is never a path.
TOPIC_NAMES_REFUSED = frozenset({".", ".."})
# Logs the broker keeps for itself beside the topics (consumer groups' committed offsets,
# share groups' state): no user topic may take these names, and the catalog never removes
# their directories.
INTERNAL_TOPIC_NAMES = frozenset({"__consumer_offsets", "__share_group_state"})
# Each partition holds open files: one log and two memory-mapped indexes (offset, time) for
# its active segment, so partitions per topic are bounded to keep file descriptors bounded.
PARTITIONS_MAX = 1024
# Bounds the catalog in memory, the metadata files read on open and the directories per disk.
TOPICS_MAX = 10_000
# A metadata file is a few hundred bytes; a larger one is not ours and is not read into memory.
METADATA_BYTES_MAX = 64 * 1024
METADATA_VERSION = 1
METADATA_DIR_NAME = "topics"
METADATA_SUFFIX = ".json"

# A name shown in an error message is cut to this many characters.
_NAME_SHOWN_CHARS_MAX = 64
_PARTITION_DIR_PATTERN = re.compile(r"(?P<topic>.+)-(?P<partition>0|[1-9][0-9]*)")
_TOPIC_ID_PATTERN = re.compile(r"[0-9a-f]{32}")

assert TOPIC_NAME_PATTERN.pattern.endswith(f"{{1,{TOPIC_NAME_CHARS_MAX}}}")
# Every file and directory name the catalog makes must fit one path component.
assert TOPIC_NAME_CHARS_MAX + len(f"-{PARTITIONS_MAX - 1}") <= NAME_BYTES_MAX
assert TOPIC_NAME_CHARS_MAX + len(METADATA_SUFFIX) <= NAME_BYTES_MAX

ConfigValue = str | int | None


def _show_name(name: str) -> str:
    if len(name) <= _NAME_SHOWN_CHARS_MAX:
        return repr(name)
    return f"{name[:_NAME_SHOWN_CHARS_MAX]!r}... ({len(name)} characters)"


def validate_topic_name(name: str) -> str:
    """Return `name` if it is a valid topic name, else raise InvalidNameError saying why."""
    if not isinstance(name, str):
        raise InvalidNameError(f"a topic name must be a str, got {type(name).__name__}")
    if name in TOPIC_NAMES_REFUSED:
        raise InvalidNameError(f"invalid topic name {name!r}: '.' and '..' are not topic names")
    if TOPIC_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidNameError(
            f"invalid topic name {_show_name(name)}: a topic name is 1 to "
            f"{TOPIC_NAME_CHARS_MAX} characters from [A-Za-z0-9._-]"
        )
    if name in INTERNAL_TOPIC_NAMES:
        raise InvalidNameError(f"topic name {name!r} is reserved for the broker's own use")
    return name


@dataclass(frozen=True, slots=True)
class TopicMeta:
    """One topic's metadata, as stored in `topics/<name>.json`.

    `config` is the topic's overrides as the user gave them, read-only; `topic_id` is made
    once at creation and tells a topic apart from an earlier one with the same name.
    """

    name: str
    partitions: int
    config: Mapping[str, ConfigValue] = field(hash=False)
    topic_id: str

    def __post_init__(self) -> None:
        # A private read-only copy: neither the caller's dict nor a reader can change it.
        object.__setattr__(self, "config", types.MappingProxyType(dict(self.config)))


def _validate_partitions(partitions: object) -> int:
    if isinstance(partitions, bool) or not isinstance(partitions, int):
        raise InvalidConfigError(f"partitions must be an integer, got {partitions!r}")
    if partitions < 1:
        raise InvalidConfigError(f"partitions must be at least 1, got {partitions}")
    if partitions > PARTITIONS_MAX:
        raise LimitExceededError(
            f"partitions {partitions} exceeds the limit of {PARTITIONS_MAX} per topic"
        )
    return partitions


def _validate_config(config: Mapping[str, ConfigValue] | None) -> dict[str, ConfigValue]:
    """Check overrides by applying them to the default LogConfig; return a plain copy."""
    if config is None:
        return {}
    out: dict[str, ConfigValue] = {}
    for key, value in config.items():
        if not isinstance(key, str):
            raise InvalidConfigError(f"a config key must be a str, got {key!r}")
        if value is None:
            out[key] = None
        elif isinstance(value, str):
            out[key] = str(value)  # a StrEnum (FsyncPolicy) is stored as its plain value
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = int(value)
        else:
            raise InvalidConfigError(f"config {key!r} must be a str, int or None, got {value!r}")
    LogConfig().with_overrides(out)
    return out


def _encode(meta: TopicMeta) -> bytes:
    document = {
        "version": METADATA_VERSION,
        "name": meta.name,
        "partitions": meta.partitions,
        "config": dict(meta.config),
        "topic_id": meta.topic_id,
    }
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def _decode(path: pathlib.Path, data: bytes) -> TopicMeta:
    """Parse one metadata file; anything unexpected raises StorageError naming the file."""

    def bad(reason: str) -> StorageError:
        return StorageError(f"{path}: invalid topic metadata: {reason}")

    try:
        document: Any = json.loads(data.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad(f"not UTF-8 JSON: {exc}") from None
    if not isinstance(document, dict):
        raise bad(f"expected a JSON object, got {type(document).__name__}")
    version = document.get("version")
    if version != METADATA_VERSION or isinstance(version, bool):
        raise bad(f"version {version!r} is not {METADATA_VERSION}")
    name = document.get("name")
    expected_name = path.name.removesuffix(METADATA_SUFFIX)
    if name != expected_name:
        raise bad(f"name {name!r} does not match the file name {expected_name!r}")
    try:
        validate_topic_name(expected_name)
        partitions = _validate_partitions(document.get("partitions"))
        config = document.get("config")
        if not isinstance(config, dict):
            raise bad(f"config must be a JSON object, got {config!r}")
        config = _validate_config(config)
    except (InvalidNameError, InvalidConfigError, LimitExceededError) as exc:
        raise bad(str(exc)) from None
    topic_id = document.get("topic_id")
    if not isinstance(topic_id, str) or _TOPIC_ID_PATTERN.fullmatch(topic_id) is None:
        raise bad(f"topic_id {topic_id!r} is not 32 lowercase hex digits")
    return TopicMeta(name=name, partitions=partitions, config=config, topic_id=topic_id)


def _read_bounded(path: pathlib.Path) -> bytes:
    data = read_file(path, METADATA_BYTES_MAX)
    if len(data) > METADATA_BYTES_MAX:
        raise StorageError(
            f"{path}: invalid topic metadata: larger than {METADATA_BYTES_MAX} bytes"
        )
    return data


class Catalog:
    """The topics of one data directory, kept in memory and in `topics/*.json`.

    Not thread-safe: the broker holds a lock around every call. Open logs are not the
    catalog's business: the broker closes a topic's logs before `delete_topic`.
    """

    def __init__(self, data_dir: pathlib.Path, topics: dict[str, TopicMeta]) -> None:
        """Use `Catalog.open`."""
        self._data_dir = data_dir
        self._topics_dir = data_dir / METADATA_DIR_NAME
        self._topics = topics

    @classmethod
    def open(cls, data_dir: StrPath) -> Catalog:
        """Load the catalog of `data_dir` (created if missing) and repair what a crash left.

        Leftover temp files are removed, partition directories no topic covers are removed,
        and missing directories of known partitions are created. A metadata file that cannot
        be parsed raises StorageError naming the file: it is never skipped, since skipping it
        would delete that topic's data.
        """
        root = pathlib.Path(os.path.abspath(os.fspath(data_dir)))
        make_dirs(root)
        topics_dir = root / METADATA_DIR_NAME
        make_dirs(topics_dir)

        topics: dict[str, TopicMeta] = {}
        removed_tmp = False
        for entry in (topics_dir / n for n in sorted(_disk.disk.listdir(str(topics_dir)))):
            if entry.name.endswith(TMP_SUFFIX) and entry.is_file():
                _disk.disk.unlink(str(entry))
                removed_tmp = True
            elif entry.name.endswith(METADATA_SUFFIX) and entry.is_file():
                if len(topics) == TOPICS_MAX:
                    raise LimitExceededError(
                        f"{topics_dir}: more than {TOPICS_MAX} topic metadata files"
                    )
                meta = _decode(entry, _read_bounded(entry))
                topics[meta.name] = meta
        if removed_tmp:
            fsync_dir(topics_dir)

        catalog = cls(root, topics)
        catalog._reconcile_partition_dirs()
        return catalog

    @property
    def data_dir(self) -> pathlib.Path:
        return self._data_dir

    def create_topic(
        self, name: str, partitions: int, config: Mapping[str, ConfigValue] | None = None
    ) -> TopicMeta:
        """Create a topic with `partitions` empty partition directories and its overrides."""
        validate_topic_name(name)
        if name in self._topics:
            raise TopicExistsError(f"topic {name!r} already exists")
        _validate_partitions(partitions)
        overrides = _validate_config(config)
        if len(self._topics) >= TOPICS_MAX:
            raise LimitExceededError(
                f"cannot create topic {name!r}: {len(self._topics)} topics exist, "
                f"the limit is {TOPICS_MAX}"
            )
        meta = TopicMeta(
            name=name, partitions=partitions, config=overrides, topic_id=uuid.uuid4().hex
        )
        self._commit(meta, new_partitions=range(partitions))
        return meta

    def add_partitions(self, name: str, new_total: int) -> TopicMeta:
        """Grow topic `name` to `new_total` partitions; partitions are never removed."""
        current = self.get(name)
        if isinstance(new_total, int) and new_total <= current.partitions:
            raise InvalidConfigError(
                f"topic {name!r} has {current.partitions} partitions; requested {new_total}: "
                "the partition count can only grow"
            )
        _validate_partitions(new_total)
        meta = TopicMeta(
            name=name, partitions=new_total, config=current.config, topic_id=current.topic_id
        )
        self._commit(meta, new_partitions=range(current.partitions, new_total))
        return meta

    def delete_topic(self, name: str) -> None:
        """Delete topic `name` and all its partition data.

        Removing the metadata file commits the delete; the partition directories go after.
        If removing them fails, the topic is already deleted and the directories left are
        removed by the next `Catalog.open`.
        """
        meta = self.get(name)
        _disk.disk.unlink(str(self._metadata_path(name)))
        fsync_dir(self._topics_dir)
        del self._topics[name]
        for partition in range(meta.partitions):
            path = self._partition_path(name, partition)
            if path.is_dir():
                remove_tree_no_fsync(path)
        fsync_dir(self._data_dir)

    def get(self, name: str) -> TopicMeta:
        try:
            return self._topics[name]
        except KeyError:
            raise UnknownTopicError(f"unknown topic {_show_name(name)}") from None

    def list(self) -> builtins.list[TopicMeta]:
        """Every topic, sorted by name."""
        return [self._topics[name] for name in sorted(self._topics)]

    def partition_dir(self, name: str, partition: int) -> pathlib.Path:
        """The directory of one partition's log; UnknownTopicError if there is no such one."""
        meta = self.get(name)
        if isinstance(partition, bool) or not 0 <= partition < meta.partitions:
            raise UnknownTopicError(
                f"topic {name!r} has {meta.partitions} partitions: "
                f"partition {partition!r} does not exist"
            )
        return self._partition_path(name, partition)

    def log_config(self, name: str, broker_default: LogConfig) -> LogConfig:
        """The LogConfig of topic `name`: its overrides applied to the broker's defaults.

        Overrides were checked against `LogConfig()` at creation; against other broker
        defaults a combination can still be refused here with InvalidConfigError.
        """
        return broker_default.with_overrides(self.get(name).config)

    def _metadata_path(self, name: str) -> pathlib.Path:
        return self._topics_dir / f"{name}{METADATA_SUFFIX}"

    def _partition_path(self, name: str, partition: int) -> pathlib.Path:
        return self._data_dir / f"{name}-{partition}"

    def _commit(self, meta: TopicMeta, new_partitions: range) -> None:
        """Create the new partition directories, then write the metadata (the commit point).

        On failure the new directories are removed again and the catalog is unchanged.
        """
        created: builtins.list[pathlib.Path] = []
        try:
            for partition in new_partitions:
                path = self._partition_path(meta.name, partition)
                if path.exists():
                    # Covered by no metadata, so left by a failed create or grow: not data.
                    remove_tree_no_fsync(path)
                _disk.disk.mkdir(str(path))
                created.append(path)
            fsync_dir(self._data_dir)
            atomic_write(self._metadata_path(meta.name), _encode(meta))
        except BaseException:
            for path in created:
                try:
                    remove_tree_no_fsync(path)
                except OSError:
                    break  # the next Catalog.open removes what is left
            raise
        self._topics[meta.name] = meta

    def _reconcile_partition_dirs(self) -> None:
        """Remove partition directories no metadata covers; create missing ones."""
        changed = False
        for entry in (self._data_dir / n for n in sorted(_disk.disk.listdir(str(self._data_dir)))):
            match = _PARTITION_DIR_PATTERN.fullmatch(entry.name)
            if match is None or not entry.is_dir() or entry.is_symlink():
                continue
            topic, partition = match["topic"], int(match["partition"])
            if (
                topic in TOPIC_NAMES_REFUSED
                or topic in INTERNAL_TOPIC_NAMES
                or TOPIC_NAME_PATTERN.fullmatch(topic) is None
            ):
                continue  # not a name the catalog could have made: not ours to remove
            meta = self._topics.get(topic)
            if meta is None or partition >= meta.partitions:
                remove_tree_no_fsync(entry)
                changed = True
        for meta in self._topics.values():
            for partition in range(meta.partitions):
                path = self._partition_path(meta.name, partition)
                if not path.is_dir():
                    _disk.disk.mkdir(str(path))
                    changed = True
        if changed:
            fsync_dir(self._data_dir)
