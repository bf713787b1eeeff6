"""Producer ids for idempotent produce: who may write with which id and epoch.

InitProducer hands out a producer id and epoch. Anonymous producers get a fresh id at epoch 0
each time; a named producer (Kafka's transactional.id, without transactions) keeps its id,
and every InitProducer with its name bumps the epoch, which fences the previous instance: on
produce, a batch whose epoch is older than its name's current one is refused on every
partition (PRODUCER_FENCED), not only on partitions the new instance has written to yet.

What each partition remembers per id (sequences, the last 5 batches) lives in the storage
engine (storage/_producers.py); this module only decides whether an id and epoch are current.

State on disk, `<data_dir>/producer-ids.json`, replaced whole with atomic_write:

    {"version": 1, "id_bound": 3000, "names": {"name": [producer_id, epoch, last_used_ms]}}

Ids are reserved in blocks of ID_BLOCK: the file records the end of the current block before
any id of it is handed out, so after a crash the next id is past every id ever given, and
one write serves ID_BLOCK anonymous producers. A named InitProducer writes the file at once
(its new epoch must survive a restart, or the zombie it fences would come back).

Limits: NAMES_MAX names; a name unused (no InitProducer, no produce) for `name_expiry_ms` is
forgotten, and the next InitProducer with it starts a new id. An epoch past EPOCH_MAX (the
batch header's i16) moves the name to a new id at epoch 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from storage import LimitExceededError, ProducerFencedError, StorageError, UnknownProducerError
from storage._fs import atomic_write

log = logging.getLogger("riverlog.producers")

FILE_NAME = "producer-ids.json"
FORMAT_VERSION = 1
ID_BLOCK = 1000
EPOCH_MAX = 32767
NAMES_MAX = 100_000
NAME_CHARS_MAX = 249
NAME_PATTERN = re.compile(rf"[A-Za-z0-9._-]{{1,{NAME_CHARS_MAX}}}")
# Kafka's transactional.id.expiration.ms default.
NAME_EXPIRY_MS_DEFAULT = 7 * 24 * 3600 * 1000


class InvalidProducerNameError(StorageError):
    pass


class StaleEpochError(ProducerFencedError):
    """The producer's name was given a newer epoch: another instance started since."""

    def __init__(self, producer_id: int, epoch: int, current_epoch: int) -> None:
        StorageError.__init__(
            self,
            f"producer id {producer_id} epoch {epoch} is fenced: epoch {current_epoch} was "
            "handed out since (another instance of this named producer started)",
        )
        self.producer_id = producer_id
        self.epoch = epoch
        self.current_epoch = current_epoch


class UnissuedProducerError(UnknownProducerError):
    """A producer id (or an epoch of it) this broker never handed out."""

    def __init__(self, producer_id: int, epoch: int, why: str) -> None:
        StorageError.__init__(
            self, f"producer id {producer_id} epoch {epoch}: {why}; call InitProducer for one"
        )
        self.producer_id = producer_id
        self.epoch = epoch
        self.received = -1


class ProducerIds:
    """Hands out producer ids and epochs; checks the ids and epochs of produced batches.

    Thread-safe. `check` runs once per idempotent batch on the produce path: a dict lookup.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        clock_ms: Callable[[], int],
        *,
        name_expiry_ms: int = NAME_EXPIRY_MS_DEFAULT,
    ) -> None:
        self._path = Path(data_dir) / FILE_NAME
        self._clock_ms = clock_ms
        self._name_expiry_ms = name_expiry_ms
        self._lock = threading.Lock()
        # name -> [producer id, epoch, last used ms]; the lists are updated in place.
        self._names: dict[str, list[int]] = {}
        self._by_id: dict[int, list[int]] = {}  # producer id -> the same list
        self._id_bound = 0  # no id at or past this was ever handed out
        self._next_id = 0
        self._load()

    def _load(self) -> None:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return
        try:
            doc = json.loads(raw)
            if doc.get("version") != FORMAT_VERSION:
                raise ValueError(f"version {doc.get('version')!r}, expected {FORMAT_VERSION}")
            bound = int(doc["id_bound"])
            names = {str(k): [int(v[0]), int(v[1]), int(v[2])] for k, v in doc["names"].items()}
        except (ValueError, KeyError, TypeError, IndexError) as e:
            # Written with atomic_write, so only a foreign edit gets here: refuse to guess,
            # since a wrong id bound could hand out an id twice.
            raise StorageError(f"{self._path}: unreadable producer-id state: {e}") from None
        self._id_bound = self._next_id = bound
        # Produce keeps a name alive in memory only: after a restart, count from now.
        now_ms = self._clock_ms()
        for entry in names.values():
            entry[2] = max(entry[2], now_ms)
        self._names = names
        self._by_id = {entry[0]: entry for entry in names.values()}

    def _save_locked(self) -> None:
        doc = {"version": FORMAT_VERSION, "id_bound": self._id_bound, "names": self._names}
        atomic_write(self._path, json.dumps(doc, separators=(",", ":")).encode())

    def _new_id_locked(self) -> int:
        if self._next_id >= self._id_bound:
            self._id_bound = self._next_id + ID_BLOCK
            self._save_locked()
        pid = self._next_id
        self._next_id += 1
        return pid

    def init(self, name: str = "") -> tuple[int, int]:
        """A producer id and epoch: a new id at epoch 0, or the name's id at its next epoch."""
        if name and NAME_PATTERN.fullmatch(name) is None:
            raise InvalidProducerNameError(
                f"invalid producer name {name[:60]!r}: 1 to {NAME_CHARS_MAX} characters from "
                "[A-Za-z0-9._-], or empty for an anonymous producer"
            )
        now_ms = self._clock_ms()
        with self._lock:
            if not name:
                return self._new_id_locked(), 0
            entry = self._names.get(name)
            if entry is None:
                self._expire_locked(now_ms)
                if len(self._names) >= NAMES_MAX:
                    raise LimitExceededError(
                        f"{len(self._names)} named producers; the limit is {NAMES_MAX} "
                        "(names unused for name_expiry_ms are forgotten)"
                    )
                entry = [self._new_id_locked(), 0, now_ms]
                self._names[name] = entry
            elif entry[1] >= EPOCH_MAX:
                del self._by_id[entry[0]]
                entry[0], entry[1] = self._new_id_locked(), 0
            else:
                entry[1] += 1
            entry[2] = now_ms
            self._by_id[entry[0]] = entry
            self._save_locked()
            return entry[0], entry[1]

    def check(self, producer_id: int, epoch: int, now_ms: int) -> None:
        """Raise unless `producer_id` was handed out here and `epoch` is its current one."""
        entry = self._by_id.get(producer_id)
        if entry is not None:
            current = entry[1]
            if epoch == current:
                entry[2] = now_ms
                return
            if epoch < current:
                raise StaleEpochError(producer_id, epoch, current)
            raise UnissuedProducerError(producer_id, epoch, f"its current epoch is {current}")
        if producer_id >= self._id_bound:
            raise UnissuedProducerError(producer_id, epoch, "never handed out by this broker")

    def expire(self, now_ms: int) -> int:
        """Forget names unused for name_expiry_ms; return how many."""
        with self._lock:
            dropped = self._expire_locked(now_ms)
            if dropped:
                self._save_locked()
            return dropped

    def _expire_locked(self, now_ms: int) -> int:
        horizon = now_ms - self._name_expiry_ms
        stale = [name for name, entry in self._names.items() if entry[2] < horizon]
        for name in stale:
            entry = self._names.pop(name)
            self._by_id.pop(entry[0], None)
        if stale:
            log.info("forgot %d producer names unused for %d ms", len(stale), self._name_expiry_ms)
        return len(stale)

    @property
    def name_count(self) -> int:
        return len(self._names)
