"""Bearer tokens: who a client is, from the token it presents (authentication only).

A token is "rl_" + `secrets.token_urlsafe(32)` (256 random bits); the prefix makes a leaked
token easy to grep for, and `redact` hides tokens in text bound for logs and errors. The
broker stores only the SHA-256 of each token: the token is shown once, by `TokenStore.add`.
A plain hash (no salt, no slow KDF) is enough here because the tokens are random, not chosen
by people: nobody can guess a 256-bit preimage, so the hash file reveals no token.

Token file (UTF-8 JSON, replaced whole with atomic_write, mode 0600):

    {"format": 1,
     "principals": {"alice": {"sha256": "<64 lowercase hex digits>", "created_ms": 1700000000000}}}

One writer at a time: the broker (or the CLI with the broker told to `reload`), never both.

Principal names are 1 to PRINCIPAL_CHARS_MAX characters from [A-Za-z0-9._@:=,-], which also
covers a certificate subject ("CN=alice,O=acme"); "*" is not a principal (in an ACL it means
every principal).

The security package's exceptions (one hierarchy under the storage engine's, so the gRPC edge
maps them with the rest: both parents are INVALID_ARGUMENT):

    StorageError
    ├── InvalidNameError
    │   └── InvalidPrincipalError   a principal name outside [A-Za-z0-9._@:=,-]{1,255}
    └── InvalidConfigError
        ├── SecurityFileError       a token, ACL or quota file that cannot be read or is not
        │                           in its format (names the file and what is wrong)
        ├── InvalidAclError         (_acl) an ACL that breaks a rule of the model
        └── InvalidQuotaError       (_quota) a quota that is not None or >= 1 byte/s

This module also holds what the three security modules share: the principal-name check and
the JSON file helpers (`read_json_file`, `write_json_file`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import InvalidConfigError, InvalidNameError, LimitExceededError
from storage._fs import atomic_write, read_file, tmp_name

PRINCIPAL_CHARS_MAX = 255
PRINCIPAL_PATTERN = re.compile(rf"[A-Za-z0-9._@:=,-]{{1,{PRINCIPAL_CHARS_MAX}}}")
TOKEN_PREFIX = "rl_"
# secrets.token_urlsafe(32): 256 bits, 43 characters after the prefix.
TOKEN_RANDOM_BYTES = 32
# A presented token longer than this is refused unhashed (ours are 46 characters): a client
# cannot make the broker hash megabytes per call.
TOKEN_CHARS_MAX = 512
# `authenticate` compares the token's hash with every stored hash (constant time), so its cost
# grows with the table: measured about 0.045 µs per principal, 0.18 ms at this bound.
PRINCIPALS_MAX = 4096
FILE_FORMAT = 1
# The largest security file read (tokens, ACLs, quotas): a few MiB covers every bound here.
FILE_BYTES_MAX = 64 * 1024 * 1024
PRIVATE_FILE_MODE = 0o600
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# "rl_" then URL-safe base64 characters, not preceded by one (so "curl_x" is left alone).
_TOKEN_LIKE = re.compile(rf"(?<![A-Za-z0-9_-]){TOKEN_PREFIX}[A-Za-z0-9_-]+")
REDACTED = f"{TOKEN_PREFIX}***"


class InvalidPrincipalError(InvalidNameError):
    """A principal name that is not 1 to 255 characters from [A-Za-z0-9._@:=,-]."""


class SecurityFileError(InvalidConfigError):
    """A token, ACL or quota file that cannot be read or is not in its documented format."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


def check_principal(principal: str) -> str:
    """`principal`, if it is a valid principal name; InvalidPrincipalError if not."""
    if not isinstance(principal, str) or PRINCIPAL_PATTERN.fullmatch(principal) is None:
        shown = principal[:60] if isinstance(principal, str) else principal
        raise InvalidPrincipalError(
            f"invalid principal name {shown!r}: 1 to {PRINCIPAL_CHARS_MAX} characters from "
            "A-Z a-z 0-9 . _ @ : = , -"
        )
    return principal


def read_json_file(path: Path) -> dict[str, Any] | None:
    """The JSON object in the security file at `path`, checked to be of FILE_FORMAT; None if
    there is no file. SecurityFileError for anything else that is wrong with it."""
    try:
        raw = read_file(path, FILE_BYTES_MAX)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SecurityFileError(path, f"cannot read: {exc.strerror or exc}") from exc
    if len(raw) > FILE_BYTES_MAX:
        raise SecurityFileError(path, f"larger than {FILE_BYTES_MAX} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SecurityFileError(path, f"not UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SecurityFileError(path, f"expected a JSON object, found {type(doc).__name__}")
    if doc.get("format") != FILE_FORMAT or isinstance(doc.get("format"), bool):
        raise SecurityFileError(path, f"format {doc.get('format')!r}, expected {FILE_FORMAT}")
    return doc


def write_json_file(path: Path, doc: Mapping[str, Any], *, private: bool = False) -> None:
    """Replace the file at `path` with `doc` as indented JSON, with atomic_write.

    `private`: the file is mode 0600 from its first byte on. atomic_write opens its temp file
    (`tmp_name`) with O_TRUNC, which keeps the mode of an existing file, so the temp file is
    created here first with mode 0600; the chmod after the rename is a second line of defence.
    """
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")
    target = os.path.abspath(path)
    if private:
        parent, name = os.path.split(target)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        fd = os.open(os.path.join(parent, tmp_name(name)), flags, PRIVATE_FILE_MODE)
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)  # a leftover temp file keeps its old mode
        finally:
            os.close(fd)
    atomic_write(target, data)
    if private:
        os.chmod(target, PRIVATE_FILE_MODE)


def new_token() -> str:
    """A fresh bearer token: "rl_" + 43 URL-safe characters (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_RANDOM_BYTES)


def redact(text: str) -> str:
    """`text` with everything that looks like a token ("rl_" + URL-safe characters) replaced
    by "rl_***"; for anything bound for a log or an error message."""
    return _TOKEN_LIKE.sub(REDACTED, text)


def _digest(token: str) -> bytes:
    # surrogatepass: any str a client can send hashes (and fails to match) instead of raising.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class _Entry:
    sha256: bytes
    created_ms: int


def _parse_tokens(path: Path, doc: dict[str, Any]) -> dict[str, _Entry]:
    principals = doc.get("principals")
    if not isinstance(principals, dict):
        raise SecurityFileError(path, '"principals" must be an object of principal -> entry')
    if len(principals) > PRINCIPALS_MAX:
        raise SecurityFileError(
            path, f"{len(principals)} principals, more than the limit {PRINCIPALS_MAX}"
        )
    table: dict[str, _Entry] = {}
    for principal, entry in principals.items():
        try:
            check_principal(principal)
        except InvalidPrincipalError as exc:
            raise SecurityFileError(path, str(exc)) from None
        if not isinstance(entry, dict):
            raise SecurityFileError(path, f"principal {principal!r}: entry must be an object")
        sha256 = entry.get("sha256")
        created_ms = entry.get("created_ms")
        if not isinstance(sha256, str) or _SHA256_HEX.fullmatch(sha256) is None:
            raise SecurityFileError(
                path, f'principal {principal!r}: "sha256" must be 64 lowercase hex digits'
            )
        if not isinstance(created_ms, int) or isinstance(created_ms, bool) or created_ms < 0:
            raise SecurityFileError(
                path, f'principal {principal!r}: "created_ms" must be an integer >= 0'
            )
        table[principal] = _Entry(bytes.fromhex(sha256), created_ms)
    return table


class TokenStore:
    """The principals and their token hashes, kept in the token file at `path`.

    Thread-safe. Changes (`add`, `remove`, `reload`) take a lock, write the file first and
    then swap in a new immutable table, so a failed write changes nothing. `authenticate`
    runs on every call and takes no lock: it reads whichever table is current.
    """

    def __init__(self, path: str | os.PathLike[str], clock_ms: Callable[[], int]) -> None:
        """The store of the token file at `path` (no file: no principals yet)."""
        self._path = Path(path)
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}  # replaced, never changed in place
        # The snapshot `authenticate` scans: (hash, principal) for every principal.
        self._table: tuple[tuple[bytes, str], ...] = ()
        self.reload()

    @classmethod
    def load(cls, path: str | os.PathLike[str], clock_ms: Callable[[], int]) -> TokenStore:
        """The store of the token file at `path` (no file: no principals yet)."""
        return cls(path, clock_ms)

    @property
    def path(self) -> Path:
        return self._path

    def principals(self) -> list[str]:
        """The principals with a token, sorted."""
        return sorted(self._entries)

    def created_ms(self, principal: str) -> int | None:
        """When `principal`'s current token was made; None for an unknown principal."""
        entry = self._entries.get(principal)
        return None if entry is None else entry.created_ms

    def add(self, principal: str) -> str:
        """Give `principal` a new token (replacing any old one, which stops working), write
        the file and return the token: the only time it is ever shown."""
        check_principal(principal)
        token = new_token()
        with self._lock:
            entries = dict(self._entries)
            if principal not in entries and len(entries) >= PRINCIPALS_MAX:
                raise LimitExceededError(
                    f"cannot add principal {principal!r}: the token file already holds "
                    f"{len(entries)} principals, the limit"
                )
            entries[principal] = _Entry(_digest(token), self._clock_ms())
            self._commit_locked(entries)
        return token

    def remove(self, principal: str) -> bool:
        """Remove `principal`'s token (it stops working at once); False if it had none."""
        with self._lock:
            if principal not in self._entries:
                return False
            entries = dict(self._entries)
            del entries[principal]
            self._commit_locked(entries)
        return True

    def reload(self) -> None:
        """Read the token file again (after another process changed it). A file that cannot
        be read or parsed raises SecurityFileError and leaves the current table in use."""
        with self._lock:
            doc = read_json_file(self._path)
            entries = {} if doc is None else _parse_tokens(self._path, doc)
            self._install_locked(entries)

    def file_mode_problem(self) -> str | None:
        """A warning to log when the token file can be read by group or others, else None."""
        try:
            mode = stat.S_IMODE(os.stat(self._path).st_mode)
        except FileNotFoundError:
            return None
        if mode & 0o077:
            return f"{self._path}: mode {mode:04o} lets other users read token hashes; use 0600"
        return None

    def authenticate(self, token: str) -> str | None:
        """The principal whose token `token` is, or None.

        The token's SHA-256 is compared with every stored hash by `hmac.compare_digest`, with
        no early exit on a match, so the time taken depends on the table's size only.
        """
        table = self._table
        if len(token) > TOKEN_CHARS_MAX:
            return None
        presented = _digest(token)
        found: str | None = None
        for sha256, principal in table:
            if hmac.compare_digest(sha256, presented):
                found = principal
        return found

    def _commit_locked(self, entries: dict[str, _Entry]) -> None:
        doc = {
            "format": FILE_FORMAT,
            "principals": {
                name: {"sha256": entry.sha256.hex(), "created_ms": entry.created_ms}
                for name, entry in sorted(entries.items())
            },
        }
        write_json_file(self._path, doc, private=True)
        self._install_locked(entries)

    def _install_locked(self, entries: dict[str, _Entry]) -> None:
        self._entries = entries
        self._table = tuple((entry.sha256, name) for name, entry in entries.items())
        # Changes with every new table: long-lived calls authenticated earlier check again.
        self.version = getattr(self, "version", 0) + 1
