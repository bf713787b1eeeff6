"""Access control lists, Kafka's model: who may do which operation on which resources.

An ACL says: `principal` (a name, or "*" for every principal) is ALLOWed or DENYed
`operation` on the resources of `resource_type` whose name matches `name` under
`pattern_type` (LITERAL: equal, or "*" for every name; PREFIXED: starts with `name`). The one
CLUSTER resource is named "cluster" (LITERAL).

`Authorizer.authorize` decides, as Kafka's AclAuthorizer does:
1. a super user may do everything; with the authorizer not enabled, so may everyone;
2. any matching DENY refuses (deny wins over any ALLOW);
3. else any matching ALLOW permits; an ALLOW of READ, WRITE, DELETE or ALTER also permits
   DESCRIBE of the same resources (what you may use, you may see);
4. else refused (default deny).

ACL file (UTF-8 JSON, replaced whole with atomic_write; the bootstrap file of `load_file` has
the same format; enum values are their names):

    {"format": 1,
     "acls": [{"principal": "alice", "resource_type": "TOPIC", "pattern_type": "PREFIXED",
               "name": "orders.", "operation": "WRITE", "permission": "ALLOW"}]}

`authorize` runs on every produce and fetch: it takes no lock and does at most four dict
lookups (the principal and "*", each for DENY then ALLOW) plus one slice-and-lookup per
distinct prefix length among the matching PREFIXED ACLs, whatever the number of ACLs.
"""

from __future__ import annotations

import builtins
import enum
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import InvalidConfigError, LimitExceededError

from ._tokens import (
    FILE_FORMAT,
    InvalidPrincipalError,
    SecurityFileError,
    check_principal,
    read_json_file,
    write_json_file,
)

WILDCARD = "*"
CLUSTER_NAME = "cluster"
# Longest resource name or prefix in an ACL: topic and group names are at most 249.
RESOURCE_NAME_CHARS_MAX = 255
# Bounds the file and the index rebuilt on each change (about 1 µs per ACL).
ACLS_MAX = 100_000
_FIELDS = ("principal", "resource_type", "pattern_type", "name", "operation", "permission")


class ResourceType(enum.Enum):
    TOPIC = "TOPIC"
    GROUP = "GROUP"
    SHARE_GROUP = "SHARE_GROUP"
    CLUSTER = "CLUSTER"


class Operation(enum.Enum):
    READ = "READ"
    WRITE = "WRITE"
    CREATE = "CREATE"
    DELETE = "DELETE"
    DESCRIBE = "DESCRIBE"
    ALTER = "ALTER"


class PatternType(enum.Enum):
    LITERAL = "LITERAL"
    PREFIXED = "PREFIXED"


class Permission(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


# Kafka: READ, WRITE, DELETE and ALTER imply DESCRIBE (for ALLOW only; a DENY of READ does not
# deny DESCRIBE).
IMPLIES_DESCRIBE = frozenset({Operation.READ, Operation.WRITE, Operation.DELETE, Operation.ALTER})

_RESOURCE_WORDS = {
    ResourceType.TOPIC: "topic",
    ResourceType.GROUP: "group",
    ResourceType.SHARE_GROUP: "share group",
    ResourceType.CLUSTER: "cluster",
}


class InvalidAclError(InvalidConfigError):
    """An ACL that breaks a rule of the model (cluster naming, "*" only LITERAL, ...)."""


@dataclass(frozen=True)
class Acl:
    """One ACL entry; checked when made (InvalidAclError, InvalidPrincipalError)."""

    principal: str  # a principal or "*"
    resource_type: ResourceType
    pattern_type: PatternType
    name: str  # "*" with LITERAL matches every name; cluster resources are named "cluster"
    operation: Operation
    permission: Permission

    def __post_init__(self) -> None:
        if self.principal != WILDCARD:
            check_principal(self.principal)
        for field, kind in (
            ("resource_type", ResourceType),
            ("pattern_type", PatternType),
            ("operation", Operation),
            ("permission", Permission),
        ):
            if not isinstance(getattr(self, field), kind):
                raise InvalidAclError(
                    f"ACL {field} {getattr(self, field)!r} is not a {kind.__name__}"
                )
        name = self.name
        if not isinstance(name, str) or not 1 <= len(name) <= RESOURCE_NAME_CHARS_MAX:
            raise InvalidAclError(
                f"ACL resource name {name!r} must be 1 to {RESOURCE_NAME_CHARS_MAX} characters"
            )
        if self.resource_type is ResourceType.CLUSTER and (
            name != CLUSTER_NAME or self.pattern_type is not PatternType.LITERAL
        ):
            raise InvalidAclError(
                f"a CLUSTER ACL names the resource {CLUSTER_NAME!r} LITERAL, not "
                f"{name!r} {self.pattern_type.name}"
            )
        if name == WILDCARD and self.pattern_type is not PatternType.LITERAL:
            raise InvalidAclError(f"the name {WILDCARD!r} (every resource) is LITERAL only")

    def to_json(self) -> dict[str, str]:
        return {
            "principal": self.principal,
            "resource_type": self.resource_type.name,
            "pattern_type": self.pattern_type.name,
            "name": self.name,
            "operation": self.operation.name,
            "permission": self.permission.name,
        }

    @classmethod
    def from_json(cls, entry: Any) -> Acl:
        """The ACL in a file entry (see the module docstring); InvalidAclError if it is not."""
        if not isinstance(entry, dict):
            raise InvalidAclError(f"an ACL entry must be an object, not {entry!r:.80}")
        if set(entry) != set(_FIELDS):
            missing = sorted(set(_FIELDS) - set(entry))
            unknown = sorted(set(entry) - set(_FIELDS))
            raise InvalidAclError(f"ACL entry: missing fields {missing}, unknown fields {unknown}")
        try:
            return cls(
                principal=entry["principal"],
                resource_type=ResourceType[entry["resource_type"]],
                pattern_type=PatternType[entry["pattern_type"]],
                name=entry["name"],
                operation=Operation[entry["operation"]],
                permission=Permission[entry["permission"]],
            )
        except (KeyError, TypeError) as exc:
            raise InvalidAclError(f"ACL entry {entry!r:.200}: unknown value {exc}") from None


@dataclass(frozen=True)
class AclFilter:
    """Selects ACLs for `list` and `remove`: each field left None matches any value; the
    others must be equal (`name` is compared as written, it is not matched as a pattern)."""

    principal: str | None = None
    resource_type: ResourceType | None = None
    pattern_type: PatternType | None = None
    name: str | None = None
    operation: Operation | None = None
    permission: Permission | None = None

    def matches(self, acl: Acl) -> bool:
        return all(
            want is None or want == getattr(acl, field)
            for field, want in (
                ("principal", self.principal),
                ("resource_type", self.resource_type),
                ("pattern_type", self.pattern_type),
                ("name", self.name),
                ("operation", self.operation),
                ("permission", self.permission),
            )
        )


class _NameSet:
    """The resource names a group of ACL patterns matches; `matches` costs a set lookup plus
    one per distinct prefix length."""

    __slots__ = ("every", "literal", "prefixes")

    def __init__(self, patterns: Iterable[tuple[PatternType, str]]) -> None:
        literal: set[str] = set()
        by_length: dict[int, set[str]] = {}
        for pattern_type, name in patterns:
            if pattern_type is PatternType.LITERAL:
                literal.add(name)
            else:
                by_length.setdefault(len(name), set()).add(name)
        self.every = WILDCARD in literal
        self.literal = frozenset(literal)
        # Shortest first, so `matches` stops at the first length longer than the name.
        self.prefixes = tuple((n, frozenset(by_length[n])) for n in sorted(by_length))

    def matches(self, name: str) -> bool:
        if self.every or name in self.literal:
            return True
        for length, prefixes in self.prefixes:
            if length > len(name):
                return False
            if name[:length] in prefixes:
                return True
        return False


# (resource type, operation, principal or "*") -> (names DENYed, names ALLOWed)
_Index = dict[tuple[ResourceType, Operation, str], tuple[_NameSet | None, _NameSet | None]]


def _build_index(acls: Iterable[Acl]) -> _Index:
    groups: dict[tuple[ResourceType, Operation, str], tuple[list[Acl], list[Acl]]] = {}

    def put(operation: Operation, acl: Acl) -> None:
        key = (acl.resource_type, operation, acl.principal)
        deny, allow = groups.setdefault(key, ([], []))
        (deny if acl.permission is Permission.DENY else allow).append(acl)

    for acl in acls:
        put(acl.operation, acl)
        if acl.permission is Permission.ALLOW and acl.operation in IMPLIES_DESCRIBE:
            put(Operation.DESCRIBE, acl)

    def names(group: list[Acl]) -> _NameSet | None:
        return _NameSet((a.pattern_type, a.name) for a in group) if group else None

    return {key: (names(deny), names(allow)) for key, (deny, allow) in groups.items()}


def describe_denied(operation: Operation, resource_type: ResourceType, name: str) -> str:
    """The PERMISSION_DENIED message: the operation and the resource, nothing about the ACLs
    ("not authorized to WRITE topic 'orders'")."""
    if resource_type is ResourceType.CLUSTER:
        return f"not authorized to {operation.name} on the cluster"
    return f"not authorized to {operation.name} {_RESOURCE_WORDS[resource_type]} {name!r}"


class Authorizer:
    """The ACLs, kept in the JSON file at `path` (None: in memory only), and `authorize`.

    Thread-safe. Changes take a lock, write the file first, then swap in a new index, so a
    failed write changes nothing; `authorize` takes no lock and reads the current index.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        super_users: frozenset[str] = frozenset(),
        *,
        enabled: bool,
    ) -> None:
        """`enabled` False: `authorize` permits everything (ACLs can still be managed)."""
        for user in super_users:
            check_principal(user)
        self._path = None if path is None else Path(path)
        self._super_users = frozenset(super_users)
        self._enabled = enabled
        self._lock = threading.Lock()
        self._acls: dict[Acl, None] = {}  # insertion-ordered set; replaced, never changed
        self._index: _Index = {}
        if self._path is not None:
            doc = read_json_file(self._path)
            if doc is not None:
                self._install_locked(dict.fromkeys(_parse_acls(self._path, doc)))

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def super_users(self) -> frozenset[str]:
        return self._super_users

    def authorize(
        self, principal: str, operation: Operation, resource_type: ResourceType, name: str
    ) -> bool:
        """Whether `principal` may do `operation` on the resource (see the module docstring)."""
        if not self._enabled or principal in self._super_users:
            return True
        index = self._index
        allowed = False
        for who in (principal, WILDCARD):
            rule = index.get((resource_type, operation, who))
            if rule is None:
                continue
            deny, allow = rule
            if deny is not None and deny.matches(name):
                return False
            if not allowed and allow is not None and allow.matches(name):
                allowed = True
        return allowed

    def add(self, acls: Iterable[Acl]) -> int:
        """Add the ACLs (those already present are skipped); returns how many were new."""
        with self._lock:
            merged = dict(self._acls)
            before = len(merged)
            merged.update(dict.fromkeys(acls))
            added = len(merged) - before
            if added:
                self._commit_locked(merged)
        return added

    def remove(self, acl_filter: AclFilter) -> builtins.list[Acl]:
        """Remove the ACLs `acl_filter` selects (AclFilter() selects all); returns them."""
        with self._lock:
            removed = [acl for acl in self._acls if acl_filter.matches(acl)]
            if removed:
                gone = set(removed)
                self._commit_locked({acl: None for acl in self._acls if acl not in gone})
        return removed

    def list(self, acl_filter: AclFilter | None = None) -> builtins.list[Acl]:
        """The ACLs `acl_filter` selects (None: all), in the order they were added."""
        acls = self._acls
        if acl_filter is None:
            return list(acls)
        return [acl for acl in acls if acl_filter.matches(acl)]

    def load_file(self, path: str | os.PathLike[str]) -> int:
        """Add the ACLs of the bootstrap file at `path` (the format of the ACL file); returns
        how many were new. SecurityFileError if it is missing or not in the format."""
        source = Path(path)
        doc = read_json_file(source)
        if doc is None:
            raise SecurityFileError(source, "no such ACL file")
        return self.add(_parse_acls(source, doc))

    def _commit_locked(self, acls: dict[Acl, None]) -> None:
        if len(acls) > ACLS_MAX:
            raise LimitExceededError(f"{len(acls)} ACLs would pass the limit of {ACLS_MAX}")
        if self._path is not None:
            entries = [acl.to_json() for acl in acls]
            write_json_file(self._path, {"format": FILE_FORMAT, "acls": entries})
        self._install_locked(acls)

    def _install_locked(self, acls: dict[Acl, None]) -> None:
        index = _build_index(acls)
        self._acls = acls
        self._index = index


def _parse_acls(path: Path, doc: dict[str, Any]) -> list[Acl]:
    entries = doc.get("acls")
    if not isinstance(entries, list):
        raise SecurityFileError(path, '"acls" must be a list of ACL entries')
    if len(entries) > ACLS_MAX:
        raise SecurityFileError(path, f"{len(entries)} ACLs, more than the limit {ACLS_MAX}")
    acls = []
    for position, entry in enumerate(entries):
        try:
            acls.append(Acl.from_json(entry))
        except (InvalidAclError, InvalidPrincipalError) as exc:
            raise SecurityFileError(path, f"ACL entry {position}: {exc}") from None
    return acls
