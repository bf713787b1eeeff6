"""Security against real brokers on 127.0.0.1: authentication, ACLs, TLS and mTLS, quotas.

Every call here is raw gRPC (the generated stubs, the bearer token in the metadata key
"authorization", grpc.ssl_channel_credentials), so these tests check the broker alone.
Certificates come from a small CA made in a fixture with `cryptography` (EC P-256).

Each case asserts the status security.proto documents (UNAUTHENTICATED for no or a refused
token, PERMISSION_DENIED for an ACL refusal, UNAVAILABLE when the TLS handshake fails), that
a refusal's message names the operation and the resource and nothing else, and that nothing
was written (the log end offsets, read by a super user, do not move). Over the whole module,
every log record (a handler on the root logger at DEBUG) and the stderr of the broker
process are searched for tokens, and so is every error message a client receives.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import logging
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from storage import LogConfig, NewRecord, encode_batch
from stream._broker import BrokerConfig, wall_clock_ms
from stream._pb import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    groups_pb2,
    groups_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
    share_pb2,
    share_pb2_grpc,
    types_pb2,
)
from stream._serve import RunningBroker, SecurityConfig, ServeConfig
from stream.security._tokens import TokenStore

REPO_ROOT = Path(__file__).resolve().parents[1]
# Each RPC gets a deadline, so no call can hang the suite.
RPC_TIMEOUT_S = 10.0
# Bounds every stop(): an in-flight call that ignores shutdown cannot stall the suite.
SHUTDOWN_GRACE_S = 1.0
# What a token looks like (stream/security/_tokens.py: "rl_" + 43 URL-safe characters); the
# redacted form "rl_***" does not match.
TOKEN_LIKE = re.compile(r"(?<![A-Za-z0-9_-])rl_[A-Za-z0-9_-]{8,}")
SUPER_USER = "admin"
# The principal of the mTLS client certificate below (grpc gives the subject in RFC 2253
# order: the last RDN first).
CERT_PRINCIPAL = "CN=alice,O=acme"
CERT_SUPER_USER = "CN=admin,O=acme"
# The topic, group and share-group names alice may use: every operation on each, PREFIXED.
ALICE_PREFIX = "a."
ALL_OPERATIONS = ("READ", "WRITE", "CREATE", "DELETE", "DESCRIBE", "ALTER")
OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
# Every token this module made or sent: none may appear in a log line or an error message.
ISSUED: set[str] = set()

Req = TypeVar("Req")
Resp = TypeVar("Resp")


# ---------------------------------------------------------------------------- log capture
class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.names: set[str] = set()
        self._lock_lines = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        with self._lock_lines:
            self.names.add(record.name)
            self.lines.append(f"{record.name}: {text}")


@dataclass
class Captured:
    """Everything logged during this module, and the stderr of the broker processes."""

    handler: _Collector
    process_stderr: list[str] = field(default_factory=list)


def find_tokens(text: str) -> list[str]:
    """Tokens in `text`: every issued one, and anything that looks like one."""
    found = [t for t in ISSUED if t in text]
    return found + TOKEN_LIKE.findall(text)


@pytest.fixture(scope="module", autouse=True)
def captured_logs() -> Iterator[Captured]:
    """Captures every log record of the module; at the end, no token may be in any of them."""
    handler = _Collector()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    captured = Captured(handler)
    try:
        yield captured
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    in_process = any(name.startswith("riverlog") for name in handler.names)
    assert in_process or captured.process_stderr, "no riverlog log record was captured"
    text = "\n".join([*handler.lines, *captured.process_stderr])
    leaks = find_tokens(text)
    # The count and positions only: the failure message itself must not spread a token.
    assert not leaks, f"{len(leaks)} token(s) in the logs, first at {text.find(leaks[0])}"


# ---------------------------------------------------------------------------- certificates
@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, the broker's certificate for 127.0.0.1 from it, client certificates
    from it, and a client certificate from another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    alice: tuple[Path, Path]  # (certificate, key): CERT_PRINCIPAL
    admin: tuple[Path, Path]  # CERT_SUPER_USER
    stranger: tuple[Path, Path]  # signed by another CA
    other_ca: Path


def _name(*parts: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in parts])


def _certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    hosts: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    curve = ec.SECP256R1()
    ca_key, other_key = ec.generate_private_key(curve), ec.generate_private_key(curve)
    ca_name = _name((NameOID.COMMON_NAME, "riverlog test CA"))
    other_name = _name((NameOID.COMMON_NAME, "another CA"))
    ca, _ = _write(directory, "ca", _certificate(ca_name, ca_key, ca_name, ca_key, ca=True), ca_key)
    other, _ = _write(
        directory,
        "other-ca",
        _certificate(other_name, other_key, other_name, other_key, ca=True),
        other_key,
    )

    def issue(
        stem: str,
        subject: x509.Name,
        by: tuple[x509.Name, ec.EllipticCurvePrivateKey],
        *,
        hosts: bool = False,
    ) -> tuple[Path, Path]:
        key = ec.generate_private_key(curve)
        return _write(directory, stem, _certificate(subject, key, by[0], by[1], hosts=hosts), key)

    server_cert, server_key = issue(
        "broker", _name((NameOID.COMMON_NAME, "broker")), (ca_name, ca_key), hosts=True
    )
    org = (NameOID.ORGANIZATION_NAME, "acme")
    return Pki(
        ca=ca,
        server_cert=server_cert,
        server_key=server_key,
        alice=issue("alice", _name(org, (NameOID.COMMON_NAME, "alice")), (ca_name, ca_key)),
        admin=issue("admin", _name(org, (NameOID.COMMON_NAME, "admin")), (ca_name, ca_key)),
        stranger=issue(
            "stranger", _name(org, (NameOID.COMMON_NAME, "alice")), (other_name, other_key)
        ),
        other_ca=other,
    )


def tls_credentials(ca: Path, client: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=None if client is None else client[1].read_bytes(),
        certificate_chain=None if client is None else client[0].read_bytes(),
    )


# ---------------------------------------------------------------------------- clients
class RefusedError(Exception):
    """A call that did not succeed: its status and message (from an RpcError, or from the
    in-band PartitionError of a ProduceStream answer)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def _status(number: int) -> grpc.StatusCode:
    return next(code for code in grpc.StatusCode if code.value[0] == number)


class Client:
    """Raw stubs over one channel; every call carries the bearer token (if any) and a
    deadline."""

    def __init__(self, channel: grpc.Channel, token: str | None) -> None:
        self.channel = channel
        self.metadata: tuple[tuple[str, str], ...] = (
            () if token is None else (("authorization", f"Bearer {token}"),)
        )
        self.broker = broker_pb2_grpc.BrokerStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)
        self.groups = groups_pb2_grpc.GroupsStub(channel)
        self.share = share_pb2_grpc.ShareStub(channel)
        self.security = security_pb2_grpc.SecurityStub(channel)
        # The health stub's types omit its methods (see tests/test_server.py).
        self.health: Any = health_pb2_grpc.HealthStub(channel)

    def unary(self, method: grpc.UnaryUnaryMultiCallable[Req, Resp], request: Req) -> Resp:
        return method(request, metadata=self.metadata, timeout=RPC_TIMEOUT_S)

    def produce_stream(
        self, requests: list[broker_pb2.ProduceRequest]
    ) -> list[broker_pb2.ProduceResponse]:
        return list(
            self.broker.ProduceStream(iter(requests), metadata=self.metadata, timeout=RPC_TIMEOUT_S)
        )

    def subscribe(self, request: broker_pb2.SubscribeRequest) -> list[broker_pb2.SubscribeResponse]:
        return list(self.broker.Subscribe(request, metadata=self.metadata, timeout=RPC_TIMEOUT_S))

    def whoami(self) -> security_pb2.WhoAmIResponse:
        return self.unary(self.security.WhoAmI, security_pb2.WhoAmIRequest())


def health_status(c: Client, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    answer = c.health.Check(request, metadata=c.metadata, timeout=RPC_TIMEOUT_S)
    return int(answer.status)


def attempt(action: Callable[[], object]) -> RefusedError | None:
    """None if `action` succeeded, else how it was refused. Checks that no error message a
    client receives carries a token."""
    try:
        action()
    except grpc.RpcError as e:
        assert isinstance(e, grpc.Call)  # noqa: PT017 (grpcio's errors are Calls)
        refused = RefusedError(e.code(), e.details() or "")
    except RefusedError as e:
        refused = e
    else:
        return None
    assert not find_tokens(refused.details), "an error message carries a token"
    return refused


def expect(code: grpc.StatusCode, action: Callable[[], object]) -> str:
    """Runs `action`, which must fail with `code` (OK: must succeed); returns the message."""
    refused = attempt(action)
    if code == OK:
        assert refused is None, f"expected success, got {refused}"
        return ""
    assert refused is not None, f"expected {code.name}, but the call succeeded"
    assert refused.code == code, f"expected {code.name}, got {refused}"
    return refused.details


def denied(operation: str, resource: str, name: str) -> str:
    """The documented PERMISSION_DENIED message: the operation and the resource only."""
    return f"not authorized to {operation} {resource} {name!r}"


def check_stream_results(responses: list[broker_pb2.ProduceResponse]) -> None:
    """ProduceStream answers refusals in-band: raise the first as a RefusedError."""
    for response in responses:
        for result in response.results:
            if result.error.code:
                raise RefusedError(_status(result.error.code), result.error.message)


# ---------------------------------------------------------------------------- brokers
@dataclass
class Env:
    """A started broker, the tokens of its principals, and how to reach it."""

    running: RunningBroker
    tokens: dict[str, str]
    tokens_file: Path
    stack: ExitStack
    credentials: grpc.ChannelCredentials | None = None  # None: plaintext

    @property
    def address(self) -> str:
        return self.running.address

    def client(
        self,
        principal: str | None = None,
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        plaintext: bool = False,
    ) -> Client:
        """A client as `principal` (its token), or with `token` as given; over the broker's
        TLS unless `plaintext` or other `credentials`."""
        creds = credentials if credentials is not None else self.credentials
        if plaintext or creds is None:
            channel = grpc.insecure_channel(self.address)
        else:
            channel = grpc.secure_channel(self.address, creds)
        self.stack.enter_context(channel)
        return Client(channel, self.tokens[principal] if principal is not None else token)

    def super_user(self) -> Client:
        return self.client(SUPER_USER)


def issue_tokens(path: Path, principals: tuple[str, ...]) -> dict[str, str]:
    store = TokenStore.load(path, wall_clock_ms)
    tokens = {p: store.add(p) for p in principals}
    ISSUED.update(tokens.values())
    return tokens


def acl_entry(
    principal: str,
    resource_type: str,
    name: str,
    operation: str,
    *,
    pattern: str = "LITERAL",
    permission: str = "ALLOW",
) -> dict[str, str]:
    return {
        "principal": principal,
        "resource_type": resource_type,
        "pattern_type": pattern,
        "name": name,
        "operation": operation,
        "permission": permission,
    }


def alice_acls() -> list[dict[str, str]]:
    """alice: every operation on topics, groups and share groups named "a.*"."""
    return [
        acl_entry("alice", kind, ALICE_PREFIX, operation, pattern="PREFIXED")
        for kind in ("TOPIC", "GROUP", "SHARE_GROUP")
        for operation in ALL_OPERATIONS
    ]


def start_env(
    directory: Path,
    stack: ExitStack,
    *,
    principals: tuple[str, ...] = (SUPER_USER, "alice", "bob"),
    acls: list[dict[str, str]] | None = None,
    pki: Pki | None = None,
    mtls: bool = False,
    super_users: tuple[str, ...] = (SUPER_USER,),
) -> Env:
    """A broker in `directory` (stopped by `stack`): tokens for `principals`, ACLs enforced
    when `acls` is given (the bootstrap file holds them), TLS with `pki`, mTLS with `mtls`."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens_file = directory / "tokens.json"
    issued = issue_tokens(tokens_file, principals)
    bootstrap = None
    if acls is not None:
        bootstrap = directory / "acls-bootstrap.json"
        bootstrap.write_text(json.dumps({"format": 1, "acls": acls}))
    security = SecurityConfig(
        tls_cert_file=None if pki is None else str(pki.server_cert),
        tls_key_file=None if pki is None else str(pki.server_key),
        tls_client_ca_file=str(pki.ca) if pki is not None and mtls else None,
        tokens_file=str(tokens_file),
        super_users=super_users,
        acls_enabled=acls is not None,
        acls_bootstrap_file=None if bootstrap is None else str(bootstrap),
    )
    config = ServeConfig(
        broker=BrokerConfig(
            data_dir=directory / "data",
            log=LogConfig(segment_bytes=1024 * 1024, index_interval_bytes=4096),
        ),
        listen="127.0.0.1:0",
        workers=32,
        shutdown_grace_s=SHUTDOWN_GRACE_S,
        security=security,
    )
    running = RunningBroker(config)
    running.start()
    stack.callback(running.stop)
    credentials = None if pki is None else tls_credentials(pki.ca, pki.admin if mtls else None)
    return Env(running, issued, tokens_file, stack, credentials)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


# ---------------------------------------------------------------------------- small calls
def create_topic(c: Client, name: str, partitions: int = 1) -> None:
    c.unary(c.admin.CreateTopic, admin_pb2.CreateTopicRequest(name=name, partitions=partitions))


def produce_request(
    topic: str, partition: int = 0, value: bytes = b"x"
) -> broker_pb2.ProduceRequest:
    entry = broker_pb2.PartitionProduce(
        topic=topic, partition=partition, records=[types_pb2.Record(value=value)]
    )
    return broker_pb2.ProduceRequest(acks=broker_pb2.ACKS_LEADER, partitions=[entry])


def produce(c: Client, topic: str) -> broker_pb2.ProduceResponse:
    return c.unary(c.broker.Produce, produce_request(topic))


def fetch_request(
    topic: str, member: types_pb2.GroupMember | None = None
) -> broker_pb2.FetchRequest:
    return broker_pb2.FetchRequest(
        partitions=[broker_pb2.FetchPartition(topic=topic, partition=0, offset=0)], member=member
    )


def subscribe_request(topic: str) -> broker_pb2.SubscribeRequest:
    earliest = broker_pb2.StartPosition(earliest=broker_pb2.StartPosition.Earliest())
    return broker_pb2.SubscribeRequest(topic=topic, start=earliest, stop_at_end=True)


def list_offsets_request(topic: str) -> broker_pb2.ListOffsetsRequest:
    query = broker_pb2.ListOffsetsRequest.Query(topic=topic, partition=0, latest=True)
    return broker_pb2.ListOffsetsRequest(queries=[query])


def end_offsets(admin: Client) -> dict[tuple[str, int], int]:
    """Every partition's log end offset, read by a super user."""
    topics = admin.unary(admin.admin.ListTopics, admin_pb2.ListTopicsRequest()).topics
    queries = [
        broker_pb2.ListOffsetsRequest.Query(topic=t.name, partition=p, latest=True)
        for t in topics
        for p in range(t.partitions)
    ]
    if not queries:
        return {}
    answer = admin.unary(admin.broker.ListOffsets, broker_pb2.ListOffsetsRequest(queries=queries))
    return {(r.topic, r.partition): r.log_end_offset for r in answer.results}


def join_group(c: Client, group: str, topic: str) -> groups_pb2.HeartbeatResponse:
    """A new member of consumer group `group` subscribed to `topic`, once it owns its
    partitions (a lone member gets them within a few heartbeats)."""
    request = groups_pb2.HeartbeatRequest(
        group_id=group,
        member_id="",
        member_epoch=0,
        subscription=groups_pb2.Subscription(topics=[topic]),
    )
    answer = c.unary(c.groups.Heartbeat, request)
    for _ in range(10):
        if answer.assignment:
            return answer
        answer = c.unary(
            c.groups.Heartbeat,
            groups_pb2.HeartbeatRequest(
                group_id=group, member_id=answer.member_id, member_epoch=answer.member_epoch
            ),
        )
    raise AssertionError(f"no assignment for the lone member of {group} after 10 heartbeats")


def commit(c: Client, group: str, topic: str, offset: int = 0) -> None:
    """Commits for a group without members (member "" at epoch -1)."""
    c.unary(
        c.groups.CommitOffsets,
        groups_pb2.CommitOffsetsRequest(
            member=types_pb2.GroupMember(group_id=group, member_id="", member_epoch=-1),
            offsets=[groups_pb2.OffsetToCommit(topic=topic, partition=0, offset=offset)],
        ),
    )


def join_share(c: Client, group: str, topic: str) -> str:
    answer = c.unary(
        c.share.ShareHeartbeat, share_pb2.ShareHeartbeatRequest(group_id=group, topics=[topic])
    )
    return answer.member_id


def leave_share(c: Client, group: str, member: str) -> None:
    c.unary(c.share.ShareLeave, share_pb2.ShareLeaveRequest(group_id=group, member_id=member))


# ---------------------------------------------------------------------------- the matrix
@dataclass(frozen=True)
class Names:
    """The resources of one case on one side: prefix "a." (alice may) or "b." (she may not)."""

    prefix: str
    case: str

    def _name(self, kind: str) -> str:
        return f"{self.prefix}.{self.case}.{kind}"

    @property
    def topic(self) -> str:
        return self._name("t")

    @property
    def group(self) -> str:
        return self._name("g")

    @property
    def share(self) -> str:
        return self._name("s")

    @property
    def new_topic(self) -> str:
        return self._name("new")

    @property
    def allowed(self) -> Names:
        """The same case's names on alice's side."""
        return Names("a", self.case)


Ctx = dict[str, str]


@dataclass(frozen=True)
class Case:
    """One call: `prepare` (as a super user) sets up what it needs on one side, `act` makes
    it. On the "b." side alice is refused `refused` = (operation, resource, Names attribute
    naming it)."""

    name: str
    refused: tuple[str, str, str]
    act: Callable[[Client, Names, Ctx], object]
    prepare: Callable[[Client, Names], Ctx] = lambda admin, n: {}

    def message(self, n: Names) -> str:
        operation, resource, attribute = self.refused
        return denied(operation, resource, getattr(n, attribute))


def _prepare_committed(admin: Client, n: Names) -> Ctx:
    commit(admin, n.group, n.topic)
    return {}


def _prepare_group_member(admin: Client, n: Names) -> Ctx:
    answer = join_group(admin, n.group, n.topic)
    return {"member": answer.member_id, "epoch": str(answer.member_epoch)}


def _prepare_fetching_member(admin: Client, n: Names) -> Ctx:
    # The member of this side's group reads alice's topic: the refusal is the group's.
    answer = join_group(admin, n.group, n.allowed.topic)
    return {"member": answer.member_id, "epoch": str(answer.member_epoch)}


def _prepare_share_member(admin: Client, n: Names) -> Ctx:
    return {"member": join_share(admin, n.share, n.topic)}


def _prepare_empty_share_group(admin: Client, n: Names) -> Ctx:
    leave_share(admin, n.share, join_share(admin, n.share, n.topic))
    return {}


def _group_fetch(c: Client, n: Names, x: Ctx) -> object:
    member = types_pb2.GroupMember(
        group_id=n.group, member_id=x["member"], member_epoch=int(x["epoch"])
    )
    return c.unary(c.broker.Fetch, fetch_request(n.allowed.topic, member))


def _leave_group(c: Client, n: Names, x: Ctx) -> object:
    request = groups_pb2.LeaveGroupRequest(
        group_id=n.group, member_id=x["member"], member_epoch=int(x["epoch"])
    )
    return c.unary(c.groups.LeaveGroup, request)


def _alter_share(
    group: str, config: share_pb2.ShareGroupConfig
) -> share_pb2.AlterShareGroupRequest:
    return share_pb2.AlterShareGroupRequest(group_id=group, config=config)


def _join_share_with_dead_letters(c: Client, n: Names, x: Ctx) -> object:
    # A new share group of alice's (one per side), dead letters into this side's topic.
    request = share_pb2.ShareHeartbeatRequest(
        group_id=f"{n.allowed.share}.{n.prefix}",
        topics=[n.allowed.topic],
        config=share_pb2.ShareGroupConfig(dead_letter_topic=n.new_topic),
    )
    return c.unary(c.share.ShareHeartbeat, request)


TOPIC_WRITE = ("WRITE", "topic", "topic")
TOPIC_READ = ("READ", "topic", "topic")
TOPIC_DESCRIBE = ("DESCRIBE", "topic", "topic")
GROUP_READ = ("READ", "group", "group")
GROUP_DESCRIBE = ("DESCRIBE", "group", "group")
SHARE_READ = ("READ", "share group", "share")
SHARE_DESCRIBE = ("DESCRIBE", "share group", "share")
NEW_TOPIC_WRITE = ("WRITE", "topic", "new_topic")
# Names as the matrix's cases use them: `n` the side's names, `x` what `prepare` returned.
CASES = [
    Case("produce", TOPIC_WRITE, lambda c, n, x: produce(c, n.topic)),
    Case(
        "produce-stream",
        TOPIC_WRITE,
        lambda c, n, x: check_stream_results(c.produce_stream([produce_request(n.topic)])),
    ),
    Case("fetch", TOPIC_READ, lambda c, n, x: c.unary(c.broker.Fetch, fetch_request(n.topic))),
    Case("group-fetch", GROUP_READ, _group_fetch, _prepare_fetching_member),
    Case("subscribe", TOPIC_READ, lambda c, n, x: c.subscribe(subscribe_request(n.topic))),
    Case(
        "list-offsets",
        TOPIC_DESCRIBE,
        lambda c, n, x: c.unary(c.broker.ListOffsets, list_offsets_request(n.topic)),
    ),
    Case(
        "describe-topic",
        TOPIC_DESCRIBE,
        lambda c, n, x: c.unary(
            c.admin.DescribeTopic, admin_pb2.DescribeTopicRequest(name=n.topic)
        ),
    ),
    Case(
        "delete-topic",
        ("DELETE", "topic", "topic"),
        lambda c, n, x: c.unary(c.admin.DeleteTopic, admin_pb2.DeleteTopicRequest(name=n.topic)),
    ),
    Case(
        "create-topic",
        ("CREATE", "topic", "new_topic"),
        lambda c, n, x: create_topic(c, n.new_topic),
    ),
    Case(
        "add-partitions",
        ("ALTER", "topic", "topic"),
        lambda c, n, x: c.unary(
            c.admin.AddPartitions, admin_pb2.AddPartitionsRequest(name=n.topic, partitions=2)
        ),
    ),
    Case("group-heartbeat", GROUP_READ, lambda c, n, x: join_group(c, n.group, n.allowed.topic)),
    # alice's group (one per side), subscribing to this side's topic.
    Case(
        "group-heartbeat-topic",
        TOPIC_READ,
        lambda c, n, x: join_group(c, f"{n.allowed.group}.{n.prefix}", n.topic),
    ),
    Case("group-leave", GROUP_READ, _leave_group, _prepare_group_member),
    Case("group-commit", GROUP_READ, lambda c, n, x: commit(c, n.group, n.allowed.topic)),
    # alice's group, committing for this side's topic.
    Case("group-commit-topic", TOPIC_READ, lambda c, n, x: commit(c, n.allowed.group, n.topic)),
    Case(
        "group-fetch-offsets",
        GROUP_DESCRIBE,
        lambda c, n, x: c.unary(
            c.groups.FetchOffsets, groups_pb2.FetchOffsetsRequest(group_id=n.group)
        ),
        _prepare_committed,
    ),
    Case(
        "group-describe",
        GROUP_DESCRIBE,
        lambda c, n, x: c.unary(
            c.groups.DescribeGroup, groups_pb2.DescribeGroupRequest(group_id=n.group)
        ),
        _prepare_committed,
    ),
    Case(
        "group-delete",
        ("DELETE", "group", "group"),
        lambda c, n, x: c.unary(
            c.groups.DeleteGroup, groups_pb2.DeleteGroupRequest(group_id=n.group)
        ),
        _prepare_committed,
    ),
    Case(
        "group-reset-offsets",
        GROUP_READ,
        lambda c, n, x: c.unary(
            c.groups.ResetOffsets,
            groups_pb2.ResetOffsetsRequest(group_id=n.group, topic=n.topic, earliest=True),
        ),
        _prepare_committed,
    ),
    Case("share-heartbeat", SHARE_READ, lambda c, n, x: join_share(c, n.share, n.allowed.topic)),
    # alice's share group, joining for this side's topic.
    Case(
        "share-heartbeat-topic", TOPIC_READ, lambda c, n, x: join_share(c, n.allowed.share, n.topic)
    ),
    Case("share-heartbeat-dead-letter", NEW_TOPIC_WRITE, _join_share_with_dead_letters),
    Case(
        "share-fetch",
        SHARE_READ,
        lambda c, n, x: c.unary(
            c.share.ShareFetch,
            share_pb2.ShareFetchRequest(group_id=n.share, member_id=x["member"], max_wait_ms=0),
        ),
        _prepare_share_member,
    ),
    Case(
        "share-acknowledge",
        SHARE_READ,
        lambda c, n, x: c.unary(
            c.share.ShareAcknowledge,
            share_pb2.ShareAcknowledgeRequest(group_id=n.share, member_id=x["member"]),
        ),
        _prepare_share_member,
    ),
    Case(
        "share-leave",
        SHARE_READ,
        lambda c, n, x: leave_share(c, n.share, x["member"]),
        _prepare_share_member,
    ),
    Case(
        "share-describe",
        SHARE_DESCRIBE,
        lambda c, n, x: c.unary(
            c.share.DescribeShareGroup, share_pb2.DescribeShareGroupRequest(group_id=n.share)
        ),
        _prepare_share_member,
    ),
    Case(
        "share-alter",
        ("ALTER", "share group", "share"),
        lambda c, n, x: c.unary(
            c.share.AlterShareGroup,
            _alter_share(n.share, share_pb2.ShareGroupConfig(lock_ms=60_000)),
        ),
        _prepare_share_member,
    ),
    # alice's share group, dead letters into a new topic on this side.
    Case(
        "share-alter-dead-letter",
        NEW_TOPIC_WRITE,
        lambda c, n, x: c.unary(
            c.share.AlterShareGroup,
            _alter_share(
                n.allowed.share, share_pb2.ShareGroupConfig(dead_letter_topic=n.new_topic)
            ),
        ),
        _prepare_share_member,
    ),
    Case(
        "share-reset-offsets",
        SHARE_READ,
        lambda c, n, x: c.unary(
            c.share.ResetShareGroupOffsets,
            share_pb2.ResetShareGroupOffsetsRequest(group_id=n.share, topic=n.topic, earliest=True),
        ),
        _prepare_empty_share_group,
    ),
    Case(
        "share-delete",
        ("DELETE", "share group", "share"),
        lambda c, n, x: c.unary(
            c.share.DeleteShareGroup, share_pb2.DeleteShareGroupRequest(group_id=n.share)
        ),
        _prepare_empty_share_group,
    ),
]


@pytest.fixture(scope="module")
def acl_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One broker for the matrix: tokens, ACLs on, alice allowed everything on "a.*"; each
    case works on names of its own."""
    with ExitStack() as s:
        yield start_env(tmp_path_factory.mktemp("acl-broker"), s, acls=alice_acls())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_token_for_topic_a_used_on_topic_b(acl_env: Env, case: Case) -> None:
    admin, alice = acl_env.super_user(), acl_env.client("alice")
    mine, theirs = Names("a", case.name), Names("b", case.name)
    for names in (mine, theirs):
        create_topic(admin, names.topic)
    ctx_mine, ctx_theirs = case.prepare(admin, mine), case.prepare(admin, theirs)
    before = end_offsets(admin)

    message = expect(PERMISSION_DENIED, lambda: case.act(alice, theirs, ctx_theirs))
    assert message == case.message(theirs)
    assert end_offsets(admin) == before  # nothing written, created or deleted
    # The refusal is the ACL's: a super user may make the same call, alice may on her side.
    expect(OK, lambda: case.act(admin, theirs, ctx_theirs))
    expect(OK, lambda: case.act(alice, mine, ctx_mine))


# ---------------------------------------------------------------------------- authentication
AUTH_CALLS: list[tuple[str, Callable[[Client], object]]] = [
    ("Produce", lambda c: produce(c, "a.t")),
    ("ProduceStream", lambda c: c.produce_stream([produce_request("a.t")])),
    ("Fetch", lambda c: c.unary(c.broker.Fetch, fetch_request("a.t"))),
    ("Subscribe", lambda c: c.subscribe(subscribe_request("a.t"))),
    ("ListOffsets", lambda c: c.unary(c.broker.ListOffsets, list_offsets_request("a.t"))),
    ("ListTopics", lambda c: c.unary(c.admin.ListTopics, admin_pb2.ListTopicsRequest())),
    ("CreateTopic", lambda c: create_topic(c, "a.created")),
    ("Heartbeat", lambda c: join_group(c, "a.g", "a.t")),
    ("ShareHeartbeat", lambda c: join_share(c, "a.s", "a.t")),
    ("WhoAmI", lambda c: c.whoami()),
    ("ListAcls", lambda c: c.unary(c.security.ListAcls, security_pb2.AclFilter())),
]


@pytest.fixture(scope="module")
def auth_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with ExitStack() as s:
        env = start_env(tmp_path_factory.mktemp("auth-broker"), s, acls=alice_acls())
        create_topic(env.super_user(), "a.t")
        yield env


def _wrong_token() -> str:
    token = "rl_" + secrets.token_urlsafe(32)
    ISSUED.add(token)
    return token


CREDENTIALS: list[tuple[str, Callable[[], tuple[tuple[str, str], ...]]]] = [
    ("no-metadata", lambda: ()),
    ("wrong-token", lambda: (("authorization", f"Bearer {_wrong_token()}"),)),
    ("not-bearer", lambda: (("authorization", f"Basic {_wrong_token()}"),)),
    ("empty-bearer", lambda: (("authorization", "Bearer "),)),
]


@pytest.mark.parametrize(
    "credential", [c for _, c in CREDENTIALS], ids=[name for name, _ in CREDENTIALS]
)
def test_calls_without_an_accepted_token_are_unauthenticated(
    auth_env: Env, credential: Callable[[], tuple[tuple[str, str], ...]]
) -> None:
    admin = auth_env.super_user()
    before = end_offsets(admin)
    topics_before = set(before)
    for name, call in AUTH_CALLS:
        client = auth_env.client()
        client.metadata = credential()
        assert expect(UNAUTHENTICATED, functools.partial(call, client)), name
    assert end_offsets(admin) == before
    assert set(end_offsets(admin)) == topics_before


def test_health_check_needs_no_credentials(auth_env: Env) -> None:
    client = auth_env.client()
    assert health_status(client) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(client, "riverlog.v1.Broker") == health_pb2.HealthCheckResponse.SERVING


def test_whoami_names_the_token_principal(auth_env: Env) -> None:
    alice = auth_env.client("alice").whoami()
    assert (alice.principal, alice.super_user, alice.acls_enabled) == ("alice", False, True)
    admin = auth_env.super_user().whoami()
    assert (admin.principal, admin.super_user) == (SUPER_USER, True)


def test_removed_token_is_refused_after_reload(tmp_path: Path, stack: ExitStack) -> None:
    env = start_env(tmp_path, stack)
    admin, bob = env.super_user(), env.client("bob")
    create_topic(admin, "t")
    expect(OK, lambda: produce(bob, "t"))
    # `riverlog tokens remove bob` writes the file; the broker reads it at reload (SIGHUP).
    TokenStore.load(env.tokens_file, wall_clock_ms).remove("bob")
    carol = issue_tokens(env.tokens_file, ("carol",))["carol"]
    expect(OK, bob.whoami)  # removal takes effect at the reload
    expect(UNAUTHENTICATED, lambda: env.client(token=carol).whoami())
    before = end_offsets(admin)

    env.running.reload()

    assert expect(UNAUTHENTICATED, lambda: produce(bob, "t")) == "unknown or revoked token"
    expect(
        UNAUTHENTICATED, lambda: check_stream_results(bob.produce_stream([produce_request("t")]))
    )
    assert end_offsets(admin) == before
    assert env.client(token=carol).whoami().principal == "carol"
    assert env.client("alice").whoami().principal == "alice"


def test_removed_token_stops_an_open_produce_stream(tmp_path: Path, stack: ExitStack) -> None:
    """A stream authenticated when it opened is checked again after a reload: the next
    request of a revoked principal is refused before it is appended."""
    env = start_env(tmp_path, stack)
    admin, bob = env.super_user(), env.client("bob")
    create_topic(admin, "t")
    outbox: queue.Queue[broker_pb2.ProduceRequest | None] = queue.Queue()

    def requests() -> Iterator[broker_pb2.ProduceRequest]:
        for _ in range(10):  # bounded: the test sends two
            item = outbox.get(timeout=RPC_TIMEOUT_S)
            if item is None:
                return
            yield item

    answers = bob.broker.ProduceStream(requests(), metadata=bob.metadata, timeout=RPC_TIMEOUT_S)
    outbox.put(produce_request("t"))
    first = next(answers)
    assert not first.results[0].HasField("error")
    before = end_offsets(admin)
    TokenStore.load(env.tokens_file, wall_clock_ms).remove("bob")
    env.running.reload()
    outbox.put(produce_request("t"))
    with pytest.raises(grpc.RpcError) as info:
        next(answers)
    outbox.put(None)
    error = info.value
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert end_offsets(admin) == before


# ---------------------------------------------------------------------------- listing
def test_listings_show_only_what_the_caller_may_describe(tmp_path: Path, stack: ExitStack) -> None:
    acls = [
        *alice_acls(),
        acl_entry("alice", "TOPIC", "b.readable", "READ"),  # READ implies DESCRIBE
        acl_entry("alice", "GROUP", "b.described", "DESCRIBE"),
    ]
    env = start_env(tmp_path, stack, acls=acls)
    admin, alice, bob = env.super_user(), env.client("alice"), env.client("bob")
    for topic in ("a.one", "a.two", "b.one", "b.readable", "c.one"):
        create_topic(admin, topic)
    for group in ("a.g", "b.g", "b.described"):
        commit(admin, group, "a.one")
    for share in ("a.s", "b.s"):
        join_share(admin, share, "a.one")

    def listing(c: Client) -> tuple[set[str], set[str], set[str]]:
        topics = c.unary(c.admin.ListTopics, admin_pb2.ListTopicsRequest()).topics
        groups = c.unary(c.groups.ListGroups, groups_pb2.ListGroupsRequest()).groups
        shares = c.unary(c.share.ListShareGroups, share_pb2.ListShareGroupsRequest()).groups
        return {t.name for t in topics}, {g.group_id for g in groups}, {s.group_id for s in shares}

    assert listing(alice) == ({"a.one", "a.two", "b.readable"}, {"a.g", "b.described"}, {"a.s"})
    assert listing(bob) == (set(), set(), set())
    assert listing(admin) == (
        {"a.one", "a.two", "b.one", "b.readable", "c.one"},
        {"a.g", "b.g", "b.described"},
        {"a.s", "b.s"},
    )


def test_pattern_subscription_matches_only_readable_topics(auth_env: Env) -> None:
    admin, alice = auth_env.super_user(), auth_env.client("alice")
    for topic in ("a.pattern", "b.pattern-secret"):
        create_topic(admin, topic)
    join = groups_pb2.HeartbeatRequest(
        group_id="a.pattern-group",
        member_id="",
        member_epoch=0,
        subscription=groups_pb2.Subscription(pattern=r"[ab]\.pattern.*"),
    )
    answer = alice.unary(alice.groups.Heartbeat, join)
    described = alice.unary(
        alice.groups.DescribeGroup, groups_pb2.DescribeGroupRequest(group_id="a.pattern-group")
    )
    assert {tp.topic for tp in answer.assignment} | {tp.topic for tp in answer.pending} == {
        "a.pattern"
    }
    assert {p.topic for p in described.partitions} == {"a.pattern"}


# ---------------------------------------------------------------------------- super users
def _acl_pb(
    principal: str,
    topic: str,
    operation: security_pb2.Operation.ValueType,
    permission: security_pb2.Permission.ValueType,
) -> security_pb2.Acl:
    return security_pb2.Acl(
        principal=principal,
        resource_type=security_pb2.TOPIC,
        pattern_type=security_pb2.LITERAL,
        name=topic,
        operation=operation,
        permission=permission,
    )


def test_super_user_grants_acls_and_others_may_not(tmp_path: Path, stack: ExitStack) -> None:
    env = start_env(tmp_path, stack, acls=alice_acls())
    admin, alice = env.super_user(), env.client("alice")
    create_topic(admin, "b.granted")
    grant = security_pb2.CreateAclsRequest(
        acls=[_acl_pb("alice", "b.granted", security_pb2.WRITE, security_pb2.ALLOW)]
    )
    cluster_alter = "not authorized to ALTER on the cluster"
    cluster_describe = "not authorized to DESCRIBE on the cluster"
    assert (
        expect(PERMISSION_DENIED, lambda: alice.unary(alice.security.CreateAcls, grant))
        == cluster_alter
    )
    assert (
        expect(
            PERMISSION_DENIED,
            lambda: alice.unary(alice.security.DeleteAcls, security_pb2.AclFilter()),
        )
        == cluster_alter
    )
    set_quota = security_pb2.SetQuotaRequest(principal="alice", quota=security_pb2.Quota())
    assert (
        expect(PERMISSION_DENIED, lambda: alice.unary(alice.security.SetQuota, set_quota))
        == cluster_alter
    )
    list_acls = functools.partial(alice.unary, alice.security.ListAcls, security_pb2.AclFilter())
    assert expect(PERMISSION_DENIED, list_acls) == cluster_describe
    list_quotas = security_pb2.ListQuotasRequest()
    assert (
        expect(PERMISSION_DENIED, lambda: alice.unary(alice.security.ListQuotas, list_quotas))
        == cluster_describe
    )
    expect(PERMISSION_DENIED, lambda: produce(alice, "b.granted"))
    assert end_offsets(admin) == {("b.granted", 0): 0}

    assert admin.unary(admin.security.CreateAcls, grant).created == 1
    assert admin.unary(admin.security.CreateAcls, grant).created == 0  # kept once

    expect(OK, lambda: produce(alice, "b.granted"))
    assert end_offsets(admin) == {("b.granted", 0): 1}
    listed = admin.unary(admin.security.ListAcls, security_pb2.AclFilter(name="b.granted")).acls
    assert list(listed) == list(grant.acls)
    # A super user needs no ACL for anything, the cluster's calls included.
    assert admin.whoami().super_user
    admin.unary(admin.security.SetQuota, set_quota)
    admin.unary(admin.broker.InitProducer, broker_pb2.InitProducerRequest(producer_name="p"))
    create_topic(admin, "c.anything")
    expect(OK, lambda: produce(admin, "c.anything"))


def test_named_producer_needs_write_on_the_cluster(auth_env: Env) -> None:
    alice = auth_env.client("alice")
    expect(OK, lambda: alice.unary(alice.broker.InitProducer, broker_pb2.InitProducerRequest()))
    message = expect(
        PERMISSION_DENIED,
        lambda: alice.unary(
            alice.broker.InitProducer, broker_pb2.InitProducerRequest(producer_name="fencer")
        ),
    )
    assert message == "not authorized to WRITE on the cluster"


def test_deny_wins_over_allow(tmp_path: Path, stack: ExitStack) -> None:
    env = start_env(tmp_path, stack, acls=alice_acls())
    admin, alice = env.super_user(), env.client("alice")
    for topic in ("a.secret", "a.everyone-denied", "a.open"):
        create_topic(admin, topic)
    deny = security_pb2.CreateAclsRequest(
        acls=[
            _acl_pb("alice", "a.secret", security_pb2.WRITE, security_pb2.DENY),
            _acl_pb("*", "a.everyone-denied", security_pb2.WRITE, security_pb2.DENY),
        ]
    )
    assert admin.unary(admin.security.CreateAcls, deny).created == 2
    before = end_offsets(admin)
    for topic in ("a.secret", "a.everyone-denied"):
        message = expect(PERMISSION_DENIED, functools.partial(produce, alice, topic))
        assert message == denied("WRITE", "topic", topic)
    assert end_offsets(admin) == before
    expect(OK, lambda: produce(alice, "a.open"))
    # A DENY of WRITE leaves the ALLOWed READ alone, and a super user is never denied.
    expect(
        OK,
        lambda: alice.unary(
            alice.admin.DescribeTopic, admin_pb2.DescribeTopicRequest(name="a.secret")
        ),
    )
    expect(OK, lambda: produce(admin, "a.everyone-denied"))


# ---------------------------------------------------------------------------- TLS
def test_plaintext_client_against_the_tls_port(pki: Pki, tmp_path: Path, stack: ExitStack) -> None:
    env = start_env(tmp_path, stack, pki=pki)
    admin = env.super_user()
    create_topic(admin, "t")
    plain = env.client("alice", plaintext=True)
    expect(UNAVAILABLE, plain.whoami)
    expect(UNAVAILABLE, lambda: produce(plain, "t"))
    assert end_offsets(admin) == {("t", 0): 0}
    # Over TLS the same token works, and the broker's certificate is checked.
    assert env.client("alice").whoami().principal == "alice"
    untrusting = env.client("alice", credentials=tls_credentials(pki.other_ca))
    expect(UNAVAILABLE, untrusting.whoami)
    # Health needs TLS here (the port speaks nothing else) but no token.
    health = env.client()
    assert health_status(health) == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def mtls_env(pki: Pki, tmp_path: Path, stack: ExitStack) -> Env:
    acls = [acl_entry(CERT_PRINCIPAL, "TOPIC", ALICE_PREFIX, "WRITE", pattern="PREFIXED")]
    env = start_env(
        tmp_path, stack, pki=pki, mtls=True, acls=acls, super_users=(SUPER_USER, CERT_SUPER_USER)
    )
    for topic in ("a.t", "b.t"):
        create_topic(env.client(), topic)  # as CERT_SUPER_USER, the env's certificate
    return env


def test_mtls_refuses_a_client_without_a_certificate(pki: Pki, mtls_env: Env) -> None:
    no_cert = mtls_env.client("alice", credentials=tls_credentials(pki.ca))
    expect(UNAVAILABLE, no_cert.whoami)
    expect(UNAVAILABLE, lambda: produce(no_cert, "a.t"))
    assert end_offsets(mtls_env.client()) == {("a.t", 0): 0, ("b.t", 0): 0}


def test_mtls_refuses_a_certificate_from_another_ca(pki: Pki, mtls_env: Env) -> None:
    stranger = mtls_env.client(credentials=tls_credentials(pki.ca, pki.stranger))
    expect(UNAVAILABLE, stranger.whoami)
    expect(UNAVAILABLE, lambda: produce(stranger, "a.t"))
    assert end_offsets(mtls_env.client()) == {("a.t", 0): 0, ("b.t", 0): 0}


def test_mtls_certificate_subject_is_the_principal(pki: Pki, mtls_env: Env) -> None:
    alice = mtls_env.client(credentials=tls_credentials(pki.ca, pki.alice))
    me = alice.whoami()
    assert (me.principal, me.super_user, me.acls_enabled) == (CERT_PRINCIPAL, False, True)
    expect(OK, lambda: produce(alice, "a.t"))
    assert expect(PERMISSION_DENIED, lambda: produce(alice, "b.t")) == denied(
        "WRITE", "topic", "b.t"
    )
    assert end_offsets(mtls_env.client()) == {("a.t", 0): 1, ("b.t", 0): 0}
    # A token wins over the certificate: its principal is the one the token names...
    with_token = mtls_env.client("bob", credentials=tls_credentials(pki.ca, pki.alice))
    assert with_token.whoami().principal == "bob"
    # ...and a wrong token is refused, not ignored in favour of the certificate.
    wrong = mtls_env.client(token=_wrong_token(), credentials=tls_credentials(pki.ca, pki.alice))
    expect(UNAUTHENTICATED, wrong.whoami)


# ---------------------------------------------------------------------------- SIGHUP
START_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 15.0
POLL_S = 0.05


class BrokerProcess:
    """`python -m stream.cli serve --config FILE` with its stderr drained into `lines`."""

    def __init__(self, config: Path, data_dir: Path, address: str) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *("-m", "stream.cli", "serve", "--config", str(config)),
                *("--data-dir", str(data_dir), "--listen", address),
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._drain, name="broker-stderr", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        try:
            for raw in self.proc.stderr:
                with self._cond:
                    self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def wait_for_line(self, needle: str, timeout_s: float) -> str | None:
        """The first stderr line containing `needle`; None at EOF or after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            for _ in range(int(timeout_s / POLL_S) + 2):
                for line in self.lines:
                    if needle in line:
                        return line
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return None
                self._cond.wait(min(remaining, POLL_S))
        return None

    def stop(self) -> str:
        """SIGTERM (SIGKILL if it does not go), then everything it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=EXIT_TIMEOUT_S)
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        with self._cond:
            return "\n".join(self.lines)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
def test_sighup_reloads_the_tokens_file_of_riverlog_serve(
    tmp_path: Path, stack: ExitStack, captured_logs: Captured
) -> None:
    tokens_file = tmp_path / "tokens.json"
    tokens = issue_tokens(tokens_file, (SUPER_USER, "alice", "bob"))
    config = tmp_path / "riverlog.toml"
    config.write_text(
        "[broker]\n"
        f"tokens_file = {json.dumps(str(tokens_file))}\n"
        f"super_users = [{json.dumps(SUPER_USER)}]\n"
        "acls_enabled = true\n"
    )
    address = f"127.0.0.1:{_free_port()}"
    broker = BrokerProcess(config, tmp_path / "data", address)
    stderr = ""
    try:
        assert broker.wait_for_line("riverlog listening on", START_TIMEOUT_S), (
            f"the broker did not start: {broker.proc.poll()}\n" + "\n".join(broker.lines)
        )
        channel = stack.enter_context(grpc.insecure_channel(address))
        grpc.channel_ready_future(channel).result(timeout=START_TIMEOUT_S)
        admin, bob = Client(channel, tokens[SUPER_USER]), Client(channel, tokens["bob"])
        create_topic(admin, "t")
        assert bob.whoami().principal == "bob"
        TokenStore.load(tokens_file, wall_clock_ms).remove("bob")  # riverlog tokens remove bob

        os.kill(broker.proc.pid, signal.SIGHUP)

        reloaded = broker.wait_for_line("reloaded", START_TIMEOUT_S)
        assert reloaded is not None, (
            f"no reload after SIGHUP (exit code {broker.proc.poll()}):\n" + "\n".join(broker.lines)
        )
        assert expect(UNAUTHENTICATED, bob.whoami) == "unknown or revoked token"
        expect(UNAUTHENTICATED, lambda: produce(bob, "t"))
        assert end_offsets(admin) == {("t", 0): 0}
        assert Client(channel, tokens["alice"]).whoami().principal == "alice"
    finally:
        stderr = broker.stop()
        captured_logs.process_stderr.append(stderr)
    assert "riverlog listening on" in stderr


# ---------------------------------------------------------------------------- quotas
QUOTA_BYTES_PER_S = 200 * 1024
QUOTA_RUN_S = 10.0
QUOTA_TOLERANCE = 0.10
# Each request: one batch of 16 records of 1 KiB (about 16.5 KiB).
QUOTA_BATCH_RECORDS = 16
QUOTA_VALUE_BYTES = 1024
# The quota window counts from the start of the wall-clock second of a principal's first
# bytes (stream/security/_quota.py), so a principal gets up to 1 s worth at once when it
# starts. The run starts this soon after a second boundary, so that allowance is at most
# this much of the 10 s: 0.5 % of the quota.
QUOTA_ALIGN_MS = 50
# A sleep that overshoots (a loaded machine) is tried again at the next second.
QUOTA_ALIGN_ATTEMPTS = 3


@dataclass
class ProduceLoop:
    """A raw Produce loop flat out until `deadline`: acknowledged bytes and throttle times."""

    client: Client
    request: broker_pb2.ProduceRequest
    acked_bytes: int = 0
    throttles_ms: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0
    error: BaseException | None = None

    def run(self, start: float, deadline: float) -> None:
        size = self.request.ByteSize()  # what the broker accounts: the request's bytes
        try:
            while time.monotonic() < deadline:
                answer = self.client.unary(self.client.broker.Produce, self.request)
                assert not answer.results[0].HasField("error"), answer
                self.acked_bytes += size
                self.throttles_ms.append(answer.throttle_time_ms)
        except BaseException as e:
            self.error = e
        self.elapsed_s = time.monotonic() - start

    @property
    def rate(self) -> float:
        return self.acked_bytes / self.elapsed_s


@pytest.mark.slow
def test_produce_quota_holds_its_principal_and_no_other(tmp_path: Path, stack: ExitStack) -> None:
    env = start_env(tmp_path, stack, principals=(SUPER_USER, "limited", "free"))
    admin = env.super_user()
    create_topic(admin, "quota", partitions=2)
    admin.unary(
        admin.security.SetQuota,
        security_pb2.SetQuotaRequest(
            principal="limited", quota=security_pb2.Quota(produce_bytes_per_s=QUOTA_BYTES_PER_S)
        ),
    )
    quotas = admin.unary(admin.security.ListQuotas, security_pb2.ListQuotasRequest())
    assert quotas.quotas["limited"].produce_bytes_per_s == QUOTA_BYTES_PER_S
    value = b"v" * QUOTA_VALUE_BYTES
    batch = encode_batch([NewRecord(None, value, 0)] * QUOTA_BATCH_RECORDS)

    def request(partition: int) -> broker_pb2.ProduceRequest:
        entry = broker_pb2.PartitionProduce(topic="quota", partition=partition, record_batch=batch)
        return broker_pb2.ProduceRequest(acks=broker_pb2.ACKS_LEADER, partitions=[entry])

    limited = ProduceLoop(env.client("limited"), request(0))
    free = ProduceLoop(env.client("free"), request(1))
    for _ in range(QUOTA_ALIGN_ATTEMPTS):  # to just after a wall-clock second (see above)
        time.sleep((1000 - wall_clock_ms() % 1000) / 1000)
        if wall_clock_ms() % 1000 < QUOTA_ALIGN_MS:
            break
    else:
        raise AssertionError(f"{QUOTA_ALIGN_ATTEMPTS} sleeps overshot a second by too much")
    start = time.monotonic()
    threads = [
        threading.Thread(target=loop.run, args=(start, start + QUOTA_RUN_S), name=f"produce-{i}")
        for i, loop in enumerate((limited, free))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=QUOTA_RUN_S + RPC_TIMEOUT_S + 5)
    assert limited.error is None, limited.error
    assert free.error is None, free.error

    low, high = QUOTA_BYTES_PER_S * (1 - QUOTA_TOLERANCE), QUOTA_BYTES_PER_S * (1 + QUOTA_TOLERANCE)
    summary = (
        f"limited {limited.rate / 1024:,.1f} KiB/s over {limited.elapsed_s:.2f} s "
        f"({len(limited.throttles_ms)} requests), free {free.rate / 1024:,.1f} KiB/s "
        f"({len(free.throttles_ms)} requests), quota {QUOTA_BYTES_PER_S / 1024:,.0f} KiB/s"
    )
    print(summary)
    assert low <= limited.rate <= high, summary
    assert any(ms > 0 for ms in limited.throttles_ms), summary
    # The other principal is not throttled at all, and goes far faster than the quota.
    assert set(free.throttles_ms) == {0}, summary
    assert free.rate > 5 * QUOTA_BYTES_PER_S, summary
    offsets = end_offsets(admin)
    assert offsets[("quota", 0)] == len(limited.throttles_ms) * QUOTA_BATCH_RECORDS
    assert offsets[("quota", 1)] == len(free.throttles_ms) * QUOTA_BATCH_RECORDS
