"""The security core without a server: bearer tokens (hashes on disk, constant-time check),
Kafka-model ACLs (deny wins, default deny, implied DESCRIBE, persistence) and quotas (a
producer that waits out its throttle times, on a fake clock, is held to its quota)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import threading
import types
from pathlib import Path
from typing import Any

import pytest

from storage import InvalidConfigError, InvalidNameError, LimitExceededError
from storage._fs import atomic_write, tmp_name
from stream.security import _quota, _tokens
from stream.security._acl import (
    Acl,
    AclFilter,
    Authorizer,
    InvalidAclError,
    Operation,
    PatternType,
    Permission,
    ResourceType,
    describe_denied,
)
from stream.security._quota import (
    THROTTLE_MS_MAX,
    InvalidQuotaError,
    Quota,
    QuotaKind,
    QuotaManager,
)
from stream.security._tokens import (
    InvalidPrincipalError,
    SecurityFileError,
    TokenStore,
    new_token,
    redact,
)

NOW_MS = 1_700_000_000_000
TOPIC, GROUP, CLUSTER = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.CLUSTER
READ, WRITE, DESCRIBE = Operation.READ, Operation.WRITE, Operation.DESCRIBE
LITERAL, PREFIXED = PatternType.LITERAL, PatternType.PREFIXED
ALLOW, DENY = Permission.ALLOW, Permission.DENY


class FakeClock:
    def __init__(self, now_ms: int = NOW_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


# ---------------------------------------------------------------------------------- tokens


def _store(path: Path) -> TokenStore:
    return TokenStore.load(path, FakeClock())


def test_new_token_is_prefixed_urlsafe_and_fresh() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert token.startswith("rl_")
        assert len(token) == 3 + 43  # token_urlsafe(32)
        assert set(token[3:]) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )


def test_add_authenticate_replace_remove(tmp_path: Path) -> None:
    store = _store(tmp_path / "tokens.json")
    alice = store.add("alice")
    bob = store.add("CN=bob,O=acme")
    assert store.principals() == ["CN=bob,O=acme", "alice"]
    assert store.authenticate(alice) == "alice"
    assert store.authenticate(bob) == "CN=bob,O=acme"
    assert store.authenticate(new_token()) is None
    assert store.authenticate(alice[:-1]) is None
    assert store.created_ms("alice") == NOW_MS

    alice_again = store.add("alice")  # replaces: the old token stops working
    assert alice_again != alice
    assert store.authenticate(alice) is None
    assert store.authenticate(alice_again) == "alice"

    assert store.remove("alice") is True
    assert store.remove("alice") is False
    assert store.authenticate(alice_again) is None
    assert store.principals() == ["CN=bob,O=acme"]


def test_file_holds_only_hashes_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    token = _store(path).add("alice")
    raw = path.read_bytes()
    assert token.encode() not in raw
    assert token[3:].encode() not in raw
    assert token[3:20].encode() not in raw
    doc = json.loads(raw)
    assert doc["format"] == 1
    assert set(doc["principals"]) == {"alice"}
    assert doc["principals"]["alice"]["created_ms"] == NOW_MS
    assert doc["principals"]["alice"]["sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _store(path).file_mode_problem() is None


def test_file_is_private_from_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A permissive umask, an old world-readable file and a leftover world-readable temp file
    # (a crash of an earlier write): the new file is still 0600.
    path = tmp_path / "tokens.json"
    path.write_text('{"format": 1, "principals": {}}')
    path.chmod(0o644)
    leftover = tmp_path / tmp_name(path.name)
    leftover.write_text("partial")
    leftover.chmod(0o666)
    modes_at_rename: list[int] = []

    def checking_atomic_write(target: str, data: bytes) -> None:
        atomic_write(target, data)
        modes_at_rename.append(stat.S_IMODE(os.stat(target).st_mode))  # before any chmod

    monkeypatch.setattr(_tokens, "atomic_write", checking_atomic_write)
    old_umask = os.umask(0)
    try:
        _store(path).add("alice")
    finally:
        os.umask(old_umask)
    assert modes_at_rename == [0o600]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not leftover.exists()


def test_world_readable_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = _store(path)
    store.add("alice")
    path.chmod(0o644)
    problem = store.file_mode_problem()
    assert problem is not None
    assert "0644" in problem
    assert str(path) in problem


def test_missing_file_is_no_principals(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = _store(path)
    assert store.principals() == []
    assert store.authenticate(new_token()) is None
    assert not path.exists()  # loading does not create it
    store.reload()
    assert store.principals() == []


def test_reload_sees_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    broker = _store(path)
    cli = _store(path)
    token = cli.add("alice")
    assert broker.authenticate(token) is None
    broker.reload()
    assert broker.authenticate(token) == "alice"
    cli.remove("alice")
    broker.reload()
    assert broker.authenticate(token) is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not UTF-8 JSON"),
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"format": 2, "principals": {}}', "format 2"),
        (b'{"format": 1}', '"principals" must be an object'),
        (b'{"format": 1, "principals": {"a b": {"sha256": "00", "created_ms": 1}}}', "a b"),
        (b'{"format": 1, "principals": {"al": {"sha256": "XYZ", "created_ms": 1}}}', "sha256"),
        (
            b'{"format": 1, "principals": {"al": {"sha256": "' + b"0" * 64 + b'"}}}',
            "created_ms",
        ),
    ],
)
def test_reload_of_a_bad_file_keeps_the_old_table(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "tokens.json"
    store = _store(path)
    token = store.add("alice")
    path.write_bytes(content)
    with pytest.raises(SecurityFileError) as info:
        store.reload()
    assert str(path) in str(info.value)
    assert reason in str(info.value)
    assert isinstance(info.value, InvalidConfigError)
    assert store.authenticate(token) == "alice"
    with pytest.raises(SecurityFileError):
        _store(path)  # and a fresh load refuses to start on it


@pytest.mark.parametrize(
    "name", ["", "a b", "x" * 256, "ünïcode", "*", "a/b", "a\nb", "tab\t", "semi;colon"]
)
def test_bad_principal_names_are_refused(tmp_path: Path, name: str) -> None:
    store = _store(tmp_path / "tokens.json")
    with pytest.raises(InvalidPrincipalError, match="invalid principal name") as info:
        store.add(name)
    assert isinstance(info.value, InvalidNameError)
    assert store.principals() == []


@pytest.mark.parametrize(
    "name", ["alice", "CN=alice,O=acme", "svc:orders-1", "bob@example.com", "a.b_c", "x" * 255]
)
def test_good_principal_names(tmp_path: Path, name: str) -> None:
    store = _store(tmp_path / "tokens.json")
    assert store.authenticate(store.add(name)) == name
    assert _store(tmp_path / "tokens.json").principals() == [name]


@pytest.mark.parametrize("presented", ["", "rl_", "\ud800", "x" * 100_000, "rl_" + "A" * 43])
def test_authenticate_refuses_odd_tokens(tmp_path: Path, presented: str) -> None:
    store = _store(tmp_path / "tokens.json")
    store.add("alice")
    assert store.authenticate(presented) is None


def test_authenticate_compares_every_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path / "tokens.json")
    tokens = [store.add(f"user{i}") for i in range(10)]
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return real(a, b)

    monkeypatch.setattr(_tokens, "hmac", types.SimpleNamespace(compare_digest=counting))
    for i in (0, 9):  # a match at the front does not stop the scan
        calls.clear()
        assert store.authenticate(tokens[i]) == f"user{i}"
        assert len(calls) == 10
    calls.clear()
    assert store.authenticate(new_token()) is None
    assert len(calls) == 10


def test_concurrent_adds_and_authenticates(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = _store(path)
    first = store.add("first")
    wrong: list[str | None] = []

    def adder(n: int) -> None:
        for i in range(10):
            store.add(f"t{n}-{i}")

    def reader() -> None:
        for _ in range(500):
            who = store.authenticate(first)
            if who != "first":
                wrong.append(who)

    threads = [threading.Thread(target=adder, args=(n,)) for n in range(4)]
    threads.append(threading.Thread(target=reader))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    assert len(store.principals()) == 41
    assert len(_store(path).principals()) == 41


def test_redact() -> None:
    token = new_token()
    assert redact(f"Authorization: Bearer {token}") == "Authorization: Bearer rl_***"
    assert redact(f"token={token}, again {token}.") == "token=rl_***, again rl_***."
    assert redact("rl_abc-_X1 (partial)") == "rl_*** (partial)"
    assert redact(redact(token)) == "rl_***"
    for text in ("curl_fetch", "url_path", "no token", "rl_", "world_rl_x"):
        assert redact(text) == text
    assert token not in redact(f"{token}{token}")


# ------------------------------------------------------------------------------------- ACLs


def acl(
    principal: str = "alice",
    operation: Operation = WRITE,
    name: str = "orders",
    *,
    resource_type: ResourceType = TOPIC,
    pattern_type: PatternType = LITERAL,
    permission: Permission = ALLOW,
) -> Acl:
    return Acl(principal, resource_type, pattern_type, name, operation, permission)


def _authorizer(*acls: Acl, super_users: frozenset[str] = frozenset()) -> Authorizer:
    authorizer = Authorizer(None, super_users, enabled=True)
    authorizer.add(acls)
    return authorizer


def test_default_deny_and_disabled_allows_all() -> None:
    assert not _authorizer().authorize("alice", WRITE, TOPIC, "orders")
    off = Authorizer(None, frozenset(), enabled=False)
    assert not off.enabled
    assert off.authorize("anyone", Operation.DELETE, CLUSTER, "cluster")


def test_allow_is_specific_to_principal_operation_resource_type_and_name() -> None:
    authorizer = _authorizer(acl())
    assert authorizer.enabled
    assert authorizer.authorize("alice", WRITE, TOPIC, "orders")
    assert not authorizer.authorize("bob", WRITE, TOPIC, "orders")
    assert not authorizer.authorize("alice", READ, TOPIC, "orders")
    assert not authorizer.authorize("alice", WRITE, GROUP, "orders")
    assert not authorizer.authorize("alice", WRITE, TOPIC, "orders2")
    assert not authorizer.authorize("alice", WRITE, TOPIC, "order")


def test_deny_wins() -> None:
    authorizer = _authorizer(
        acl(),
        acl(pattern_type=PREFIXED, name="ord", permission=DENY),
        acl("*", READ, "payments"),
        acl("bob", READ, "payments", permission=DENY),
        acl("*", WRITE, "*", permission=DENY),
        acl("carol", WRITE, "*"),
    )
    assert not authorizer.authorize("alice", WRITE, TOPIC, "orders")
    assert authorizer.authorize("alice", READ, TOPIC, "payments")
    assert not authorizer.authorize("bob", READ, TOPIC, "payments")  # own DENY beats "*" ALLOW
    assert not authorizer.authorize("carol", WRITE, TOPIC, "x")  # "*" DENY beats own ALLOW


def test_super_users_may_do_everything() -> None:
    authorizer = _authorizer(
        acl("root", WRITE, "*", permission=DENY), super_users=frozenset({"root"})
    )
    assert authorizer.super_users == frozenset({"root"})
    assert authorizer.authorize("root", WRITE, TOPIC, "orders")
    assert authorizer.authorize("root", Operation.ALTER, CLUSTER, "cluster")
    assert not authorizer.authorize("alice", WRITE, TOPIC, "orders")
    with pytest.raises(InvalidPrincipalError):
        Authorizer(None, frozenset({"bad name"}), enabled=True)


@pytest.mark.parametrize(
    ("pattern_type", "pattern", "name", "matches"),
    [
        (LITERAL, "orders", "orders", True),
        (LITERAL, "orders", "orders-eu", False),
        (LITERAL, "*", "anything", True),
        (LITERAL, "*", "*", True),
        (PREFIXED, "orders", "orders", True),
        (PREFIXED, "orders", "orders-eu", True),
        (PREFIXED, "orders.", "orders", False),
        (PREFIXED, "orders", "order", False),
        (PREFIXED, "o", "x-orders", False),
        (PREFIXED, "O", "orders", False),
    ],
)
def test_name_matching(pattern_type: PatternType, pattern: str, name: str, matches: bool) -> None:
    authorizer = _authorizer(acl(name=pattern, pattern_type=pattern_type))
    assert authorizer.authorize("alice", WRITE, TOPIC, name) is matches


def test_several_prefix_lengths() -> None:
    authorizer = _authorizer(
        *(acl(name=p, pattern_type=PREFIXED) for p in ("a.", "bb.", "ccc.long.prefix."))
    )
    for name, matches in [
        ("a.x", True),
        ("bb.", True),
        ("bb", False),
        ("ccc.long.prefix.topic", True),
        ("ccc.long", False),
        ("b", False),
    ]:
        assert authorizer.authorize("alice", WRITE, TOPIC, name) is matches, name


def test_wildcard_principal() -> None:
    authorizer = _authorizer(acl("*", READ, "public.", pattern_type=PREFIXED))
    assert authorizer.authorize("anyone", READ, TOPIC, "public.news")
    assert authorizer.authorize("CN=x,O=y", READ, TOPIC, "public.news")
    assert not authorizer.authorize("anyone", READ, TOPIC, "private")


@pytest.mark.parametrize("implying", [READ, WRITE, Operation.DELETE, Operation.ALTER])
def test_describe_is_implied_by_allow(implying: Operation) -> None:
    authorizer = _authorizer(acl(operation=implying, name="ord", pattern_type=PREFIXED))
    assert authorizer.authorize("alice", DESCRIBE, TOPIC, "orders")
    assert not authorizer.authorize("alice", DESCRIBE, TOPIC, "payments")
    assert not authorizer.authorize("alice", DESCRIBE, GROUP, "orders")


def test_describe_implication_limits() -> None:
    # CREATE implies nothing; a DENY of READ does not deny DESCRIBE; a DENY of DESCRIBE beats
    # the DESCRIBE a READ implies.
    assert not _authorizer(acl(operation=Operation.CREATE)).authorize(
        "alice", DESCRIBE, TOPIC, "orders"
    )
    authorizer = _authorizer(acl(operation=WRITE), acl(operation=READ, permission=DENY))
    assert authorizer.authorize("alice", DESCRIBE, TOPIC, "orders")
    authorizer = _authorizer(acl(operation=READ), acl(operation=DESCRIBE, permission=DENY))
    assert not authorizer.authorize("alice", DESCRIBE, TOPIC, "orders")
    assert authorizer.authorize("alice", READ, TOPIC, "orders")


def test_cluster_and_group_resources() -> None:
    authorizer = _authorizer(
        acl(operation=Operation.CREATE, name="cluster", resource_type=CLUSTER),
        acl(operation=READ, name="billing", resource_type=GROUP),
        acl(operation=READ, name="work", resource_type=ResourceType.SHARE_GROUP),
    )
    assert authorizer.authorize("alice", Operation.CREATE, CLUSTER, "cluster")
    assert authorizer.authorize("alice", READ, GROUP, "billing")
    assert not authorizer.authorize("alice", READ, GROUP, "work")
    assert authorizer.authorize("alice", READ, ResourceType.SHARE_GROUP, "work")


def test_add_is_idempotent_and_list_filters() -> None:
    authorizer = _authorizer()
    first = [acl(), acl("bob", READ), acl("bob", READ, permission=DENY)]
    assert authorizer.add(first) == 3
    assert authorizer.add(first) == 0
    assert authorizer.add([acl(), acl("carol")]) == 1
    assert authorizer.list() == [*first, acl("carol")]
    assert authorizer.list(AclFilter(principal="bob")) == first[1:]
    assert authorizer.list(AclFilter(principal="bob", permission=DENY)) == [first[2]]
    assert authorizer.list(AclFilter(resource_type=GROUP)) == []


def test_remove_with_filters() -> None:
    authorizer = _authorizer(
        acl(),
        acl("alice", READ, "a.", pattern_type=PREFIXED),
        acl("bob", READ),
        acl("bob", READ, name="g", resource_type=GROUP),
        acl("bob", WRITE, permission=DENY),
    )
    assert authorizer.authorize("alice", READ, TOPIC, "a.b")
    removed = authorizer.remove(AclFilter(principal="alice", pattern_type=PREFIXED))
    assert removed == [acl("alice", READ, "a.", pattern_type=PREFIXED)]
    assert not authorizer.authorize("alice", READ, TOPIC, "a.b")  # the index follows
    assert authorizer.remove(AclFilter(principal="nobody")) == []
    assert len(authorizer.remove(AclFilter(principal="bob", resource_type=TOPIC))) == 2
    assert authorizer.list() == [acl(), acl("bob", READ, name="g", resource_type=GROUP)]
    assert len(authorizer.remove(AclFilter())) == 2
    assert authorizer.list() == []
    assert not authorizer.authorize("alice", WRITE, TOPIC, "orders")


def test_acls_persist_across_reload(tmp_path: Path) -> None:
    path = tmp_path / "acls.json"
    authorizer = Authorizer(path, frozenset(), enabled=True)
    assert not path.exists()
    authorizer.add([acl(), acl("*", READ, "pub.", pattern_type=PREFIXED)])
    authorizer.add([acl("bob", WRITE, permission=DENY)])
    authorizer.remove(AclFilter(principal="bob"))
    again = Authorizer(path, frozenset(), enabled=True)
    assert again.list() == authorizer.list()
    assert again.authorize("alice", WRITE, TOPIC, "orders")
    assert again.authorize("zed", READ, TOPIC, "pub.x")
    doc = json.loads(path.read_text("utf-8"))
    assert doc["format"] == 1
    assert doc["acls"][0] == {
        "principal": "alice",
        "resource_type": "TOPIC",
        "pattern_type": "LITERAL",
        "name": "orders",
        "operation": "WRITE",
        "permission": "ALLOW",
    }


def test_bootstrap_file(tmp_path: Path) -> None:
    bootstrap = tmp_path / "bootstrap.json"
    entries: list[dict[str, Any]] = [
        acl("svc-ingest", WRITE, "events.", pattern_type=PREFIXED).to_json(),
        acl("*", DESCRIBE, "cluster", resource_type=CLUSTER).to_json(),
    ]
    bootstrap.write_text(json.dumps({"format": 1, "acls": entries}), "utf-8")
    stored = tmp_path / "acls.json"
    authorizer = Authorizer(stored, frozenset(), enabled=True)
    assert authorizer.load_file(bootstrap) == 2
    assert authorizer.load_file(bootstrap) == 0
    assert authorizer.authorize("svc-ingest", WRITE, TOPIC, "events.click")
    assert authorizer.authorize("anyone", DESCRIBE, CLUSTER, "cluster")
    assert Authorizer(stored, frozenset(), enabled=True).list() == authorizer.list()
    with pytest.raises(SecurityFileError, match="no such ACL file"):
        authorizer.load_file(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"principal": "a"}, "missing fields"),
        ({**acl().to_json(), "permision": "ALLOW"}, "unknown fields"),
        ({**acl().to_json(), "operation": "EAT"}, "unknown value"),
        ({**acl().to_json(), "resource_type": "CLUSTER"}, "CLUSTER ACL"),
        ({**acl().to_json(), "principal": "a b"}, "invalid principal name"),
        ({**acl().to_json(), "name": ""}, "1 to 255 characters"),
        ({**acl().to_json(), "name": 7}, "1 to 255 characters"),
        ("not an object", "must be an object"),
    ],
)
def test_bad_bootstrap_entries_are_refused(tmp_path: Path, entry: object, reason: str) -> None:
    bootstrap = tmp_path / "bootstrap.json"
    bootstrap.write_text(json.dumps({"format": 1, "acls": [acl().to_json(), entry]}), "utf-8")
    authorizer = _authorizer()
    with pytest.raises(SecurityFileError, match="ACL entry 1") as info:
        authorizer.load_file(bootstrap)
    assert reason in str(info.value)
    assert authorizer.list() == []  # nothing of a bad file is added


def test_bad_stored_acl_file_refuses_to_load(tmp_path: Path) -> None:
    path = tmp_path / "acls.json"
    path.write_text('{"format": 1, "acls": {}}', "utf-8")
    with pytest.raises(SecurityFileError, match='"acls" must be a list'):
        Authorizer(path, frozenset(), enabled=True)


def test_invalid_acls() -> None:
    with pytest.raises(InvalidAclError, match="CLUSTER"):
        acl(name="kafka-cluster", resource_type=CLUSTER)
    with pytest.raises(InvalidAclError, match="CLUSTER"):
        acl(name="cluster", resource_type=CLUSTER, pattern_type=PREFIXED)
    with pytest.raises(InvalidAclError, match="LITERAL only"):
        acl(name="*", pattern_type=PREFIXED)
    with pytest.raises(InvalidAclError, match="255"):
        acl(name="x" * 256)
    with pytest.raises(InvalidPrincipalError):
        acl("a b")
    with pytest.raises(InvalidAclError, match="is not a Operation"):
        Acl("alice", TOPIC, LITERAL, "orders", "WRITE", ALLOW)  # type: ignore[arg-type]


def test_acl_count_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream.security import _acl

    monkeypatch.setattr(_acl, "ACLS_MAX", 3)
    authorizer = _authorizer(acl("a"), acl("b"), acl("c"))
    with pytest.raises(LimitExceededError, match="limit of 3"):
        authorizer.add([acl("d")])
    assert len(authorizer.list()) == 3


def test_describe_denied() -> None:
    assert describe_denied(WRITE, TOPIC, "orders") == "not authorized to WRITE topic 'orders'"
    assert describe_denied(READ, ResourceType.SHARE_GROUP, "w") == (
        "not authorized to READ share group 'w'"
    )
    assert describe_denied(Operation.CREATE, CLUSTER, "cluster") == (
        "not authorized to CREATE on the cluster"
    )


# ----------------------------------------------------------------------------------- quotas

MiB = 1024 * 1024


def _produce_as_fast_as_allowed(
    quotas: QuotaManager,
    clock: FakeClock,
    principal: str,
    request_bytes: int,
    duration_ms: int,
    kind: QuotaKind = "produce",
) -> float:
    """Send back to back, waiting out each throttle; returns the bytes/s achieved."""
    start_ms = clock.now_ms
    sent = 0
    while clock.now_ms < start_ms + duration_ms:  # each pass sends, so it ends
        sent += request_bytes
        clock.now_ms += quotas.record(principal, kind, request_bytes)
    return sent * 1000 / (clock.now_ms - start_ms)


@pytest.mark.parametrize(
    ("quota", "request_bytes"),
    [(MiB, 16 * 1024), (MiB, 1000), (MiB, MiB), (MiB, 3 * MiB), (10_000, 100), (50 * MiB, MiB)],
)
def test_producer_is_held_to_its_quota(quota: int, request_bytes: int) -> None:
    clock = FakeClock()
    quotas = QuotaManager(clock)
    quotas.set("alice", Quota(produce_bytes_per_s=quota))
    rate = _produce_as_fast_as_allowed(quotas, clock, "alice", request_bytes, 10_000)
    assert rate == pytest.approx(quota, rel=0.10)
    # and it stays there (the window slides over old samples without letting a burst through)
    rate = _produce_as_fast_as_allowed(quotas, clock, "alice", request_bytes, 30_000)
    assert rate == pytest.approx(quota, rel=0.02)


def test_producer_with_request_time_is_held_to_its_quota() -> None:
    # Each request also takes 3 ms to serve; the throttle makes up the rest.
    clock = FakeClock()
    quotas = QuotaManager(clock)
    quotas.set("alice", Quota(produce_bytes_per_s=MiB))
    start_ms, sent = clock.now_ms, 0
    while clock.now_ms < start_ms + 10_000:
        clock.now_ms += 3
        sent += 64 * 1024
        clock.now_ms += quotas.record("alice", "produce", 64 * 1024)
    assert sent * 1000 / (clock.now_ms - start_ms) == pytest.approx(MiB, rel=0.10)


def test_new_principal_gets_at_most_one_second_of_burst() -> None:
    clock = FakeClock()
    quotas = QuotaManager(clock)
    quotas.set("alice", Quota(produce_bytes_per_s=MiB))
    burst = 0
    while quotas.record("alice", "produce", 1024) == 0:  # bounded: the quota stops it
        burst += 1024
    assert MiB - 1024 <= burst <= MiB


def test_other_principals_and_kinds_are_unaffected() -> None:
    clock = FakeClock()
    quotas = QuotaManager(clock)
    quotas.set("alice", Quota(produce_bytes_per_s=MiB, fetch_bytes_per_s=MiB))
    quotas.set("bob", Quota(produce_bytes_per_s=MiB))
    assert quotas.record("alice", "produce", 5 * MiB) == 4000
    assert quotas.record("alice", "produce", 1) > 4000
    assert quotas.record("bob", "produce", 512 * 1024) == 0  # bob's own window
    assert quotas.record("alice", "fetch", 512 * 1024) == 0  # alice's fetch window
    assert quotas.record("carol", "produce", 100 * MiB) == 0  # no quota at all
    assert quotas.record("bob", "fetch", 100 * MiB) == 0  # bob's fetch is unlimited


def test_default_quota_applies_to_principals_without_their_own() -> None:
    clock = FakeClock()
    quotas = QuotaManager(clock)
    quotas.set_default(Quota(fetch_bytes_per_s=MiB))
    quotas.set("vip", Quota(fetch_bytes_per_s=4 * MiB))
    assert quotas.default == Quota(fetch_bytes_per_s=MiB)
    assert quotas.get("anyone") == quotas.default
    assert quotas.get("vip") == Quota(fetch_bytes_per_s=4 * MiB)
    rate = _produce_as_fast_as_allowed(quotas, clock, "anyone", 32 * 1024, 10_000, "fetch")
    assert rate == pytest.approx(MiB, rel=0.10)
    rate = _produce_as_fast_as_allowed(quotas, clock, "vip", 32 * 1024, 10_000, "fetch")
    assert rate == pytest.approx(4 * MiB, rel=0.10)
    assert quotas.record("anyone", "produce", 100 * MiB) == 0  # produce has no default


def test_quota_changes_take_effect_at_runtime() -> None:
    clock = FakeClock()
    quotas = QuotaManager(clock)
    quotas.set("alice", Quota(produce_bytes_per_s=4 * MiB))
    rate = _produce_as_fast_as_allowed(quotas, clock, "alice", 64 * 1024, 10_000)
    assert rate == pytest.approx(4 * MiB, rel=0.10)

    quotas.set("alice", Quota(produce_bytes_per_s=MiB))
    # The window still holds 4 MiB/s of history, so the first throttle is long; over the
    # next window and after, the new quota holds.
    rate = _produce_as_fast_as_allowed(quotas, clock, "alice", 64 * 1024, 20_000)
    assert rate < 1.5 * MiB
    rate = _produce_as_fast_as_allowed(quotas, clock, "alice", 64 * 1024, 10_000)
    assert rate == pytest.approx(MiB, rel=0.10)

    quotas.set("alice", Quota(produce_bytes_per_s=2 * MiB))
    _produce_as_fast_as_allowed(quotas, clock, "alice", 64 * 1024, 11_000)
    rate = _produce_as_fast_as_allowed(quotas, clock, "alice", 64 * 1024, 10_000)
    assert rate == pytest.approx(2 * MiB, rel=0.10)

    assert quotas.remove("alice") is True
    assert quotas.remove("alice") is False
    assert quotas.record("alice", "produce", 100 * MiB) == 0


def test_throttle_is_capped() -> None:
    clock = FakeClock()
    quotas = QuotaManager(clock)
    quotas.set("alice", Quota(produce_bytes_per_s=1000))
    assert quotas.record("alice", "produce", 10**9) == THROTTLE_MS_MAX


def test_clock_stepping_back_does_not_break_the_window() -> None:
    clock = FakeClock()
    quotas = QuotaManager(clock)
    quotas.set("alice", Quota(produce_bytes_per_s=MiB))
    assert quotas.record("alice", "produce", 2 * MiB) == 1000
    clock.now_ms -= 60_000
    assert quotas.record("alice", "produce", 0) == 1000


def test_quotas_persist(tmp_path: Path) -> None:
    path = tmp_path / "quotas.json"
    quotas = QuotaManager(FakeClock(), path)
    assert not path.exists()
    quotas.set_default(Quota(produce_bytes_per_s=MiB))
    quotas.set("alice", Quota(fetch_bytes_per_s=2 * MiB))
    quotas.set("bob", Quota(produce_bytes_per_s=5))
    quotas.remove("bob")
    again = QuotaManager(FakeClock(), path)
    assert again.default == Quota(produce_bytes_per_s=MiB)
    assert again.list() == {"alice": Quota(fetch_bytes_per_s=2 * MiB)}
    assert json.loads(path.read_text("utf-8")) == {
        "format": 1,
        "default": {"produce_bytes_per_s": MiB, "fetch_bytes_per_s": None},
        "principals": {"alice": {"produce_bytes_per_s": None, "fetch_bytes_per_s": 2 * MiB}},
    }


@pytest.mark.parametrize(
    "content",
    [
        '{"format": 1, "principals": {"a": {"produce_bytes_per_s": 0}}}',
        '{"format": 1, "principals": {"a": {"produce_rate": 5}}}',
        '{"format": 1, "principals": {"a b": {}}}',
        '{"format": 1, "default": {"fetch_bytes_per_s": "fast"}}',
        '{"format": 1, "principals": []}',
    ],
)
def test_bad_quota_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "quotas.json"
    path.write_text(content, "utf-8")
    with pytest.raises(SecurityFileError, match=str(path)):
        QuotaManager(FakeClock(), path)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "5"])
def test_invalid_quota_values(value: Any) -> None:
    with pytest.raises(InvalidQuotaError, match="must be None or an integer >= 1"):
        Quota(produce_bytes_per_s=value)
    with pytest.raises(InvalidPrincipalError):
        QuotaManager(FakeClock()).set("a b", Quota())


def test_rate_windows_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_quota, "SENSORS_MAX", 4)
    clock = FakeClock()
    quotas = QuotaManager(clock)
    quotas.set_default(Quota(produce_bytes_per_s=MiB))
    for i in range(4):
        quotas.record(f"p{i}", "produce", 1)
    clock.now_ms += 20_000  # all idle for longer than the window
    for i in range(4, 10):  # new ones evict idle ones first, then the longest-known
        quotas.record(f"p{i}", "produce", 1)
        assert len(quotas._sensors) <= 4
    assert quotas.record("p9", "produce", 2 * MiB) > 0  # its window survived
