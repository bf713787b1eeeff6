"""What security costs: the Python client against a plaintext broker and against a broker with
TLS, bearer tokens and ACLs, in the same run, 100-byte records.

    python bench/security_bench.py [--quick]

Two broker processes on loopback, started together: one with the defaults (plaintext, no
authentication), one with TLS (an EC P-256 certificate from a CA made for the run), a tokens
file (every call authenticated by its bearer token) and ACLs enforced, the bench principal
holding one ALLOW per operation it uses (WRITE and READ on the topics "bench*", PREFIXED).
Each repetition, on a new topic of each broker: one `Producer` (acks leader, idempotent, the
defaults) sends every record until `flush` returns, then one `Consumer` assigned every
partition reads them back from the beginning. The two brokers take turns, the order swapped
each repetition, so a change of load on the machine reaches both; the median is reported.
Target (the security issue): TLS + tokens + ACLs within 20% of plaintext for produce, that
is secure / plaintext >= 0.8. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from _common import (
    LOOPBACK,
    RECORD_KEY_BYTES,
    RECORD_VALUE_BYTES,
    Child,
    broker_command,
    grpc_versions,
    load_average,
    machine,
    start_child,
    stop_child,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stream import Admin, Consumer, Producer, TlsOptions, TopicPartition
from stream._broker import wall_clock_ms
from stream._pb import security_pb2, security_pb2_grpc
from stream.security._tokens import TokenStore

PARTITIONS = 4
TARGET_RATIO = 0.8
# No phase may run longer than this, whatever the machine does.
PHASE_SECONDS_MAX = 120.0
BENCH_PRINCIPAL = "bench"
ADMIN_PRINCIPAL = "admin"
TOPIC_PREFIX = "bench"
SECURE = "tls+token+acls"
PLAIN = "plaintext"


@dataclass(frozen=True, slots=True)
class Settings:
    records: int
    repetitions: int
    partitions: int = PARTITIONS
    key_bytes: int = RECORD_KEY_BYTES
    value_bytes: int = RECORD_VALUE_BYTES


FULL = Settings(records=500_000, repetitions=3)
QUICK = Settings(records=100_000, repetitions=3)


@dataclass(frozen=True)
class Access:
    """How a client reaches one of the brokers."""

    address: str
    token: str | None = None
    tls: TlsOptions | None = None


# ---------------------------------------------------------------------------- set-up
def write_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a broker certificate for 127.0.0.1 from it: (CA, certificate, key) PEM."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "security bench CA")])

    def certificate(
        subject: x509.Name, public: ec.EllipticCurvePublicKey, *, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")])
    paths = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    paths[0].write_bytes(
        certificate(ca_name, ca_key.public_key(), ca=True).public_bytes(serialization.Encoding.PEM)
    )
    paths[1].write_bytes(
        certificate(server_name, key.public_key(), ca=False).public_bytes(
            serialization.Encoding.PEM
        )
    )
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].chmod(0o600)
    return paths


def write_secure_config(directory: Path) -> tuple[Path, Path, dict[str, str]]:
    """Certificates, tokens, the ACL bootstrap file and the broker's TOML: (config, CA,
    tokens by principal)."""
    ca, cert, key = write_certificates(directory)
    store = TokenStore.load(directory / "tokens.json", wall_clock_ms)
    tokens = {p: store.add(p) for p in (ADMIN_PRINCIPAL, BENCH_PRINCIPAL)}
    acls = [
        {
            "principal": BENCH_PRINCIPAL,
            "resource_type": "TOPIC",
            "pattern_type": "PREFIXED",
            "name": TOPIC_PREFIX,
            "operation": operation,
            "permission": "ALLOW",
        }
        for operation in ("WRITE", "READ")
    ]
    (directory / "acls-bootstrap.json").write_text(json.dumps({"format": 1, "acls": acls}))
    config = directory / "secure.toml"
    settings = {
        "tls_cert_file": str(cert),
        "tls_key_file": str(key),
        "tokens_file": str(directory / "tokens.json"),
        "super_users": [ADMIN_PRINCIPAL],
        "acls_enabled": True,
        "acls_bootstrap_file": str(directory / "acls-bootstrap.json"),
    }
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    config.write_text("[broker]\n" + "\n".join(lines) + "\n")  # JSON values are TOML too
    return config, ca, tokens


def check_secure(access: Access, ca: Path) -> None:
    """The secure broker is what it claims: the token's principal, ACLs on, and a call
    without a token refused."""
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    with grpc.secure_channel(access.address, credentials) as channel:
        stub = security_pb2_grpc.SecurityStub(channel)
        me = stub.WhoAmI(
            security_pb2.WhoAmIRequest(),
            metadata=(("authorization", f"Bearer {access.token}"),),
            timeout=10,
        )
        if (me.principal, me.super_user, me.acls_enabled) != (BENCH_PRINCIPAL, False, True):
            raise RuntimeError(f"the secure broker is not set up as intended: {me}")
        try:
            stub.WhoAmI(security_pb2.WhoAmIRequest(), timeout=10)
        except grpc.RpcError as e:
            if not (isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.UNAUTHENTICATED):
                raise
        else:
            raise RuntimeError("the secure broker answered a call without a token")


# ---------------------------------------------------------------------------- workloads
def make_records(s: Settings) -> list[tuple[bytes, bytes]]:
    value = b"v" * s.value_bytes
    return [(b"%0*d" % (s.key_bytes, i), value) for i in range(s.records)]


def produce(access: Access, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    deadline = time.monotonic() + PHASE_SECONDS_MAX
    with Producer(access.address, token=access.token, tls=access.tls) as producer:
        started = time.perf_counter()
        futures = []
        for i, (key, value) in enumerate(records):
            futures.append(producer.send(topic, value, key=key))
            if i % 10_000 == 0 and time.monotonic() > deadline:
                raise RuntimeError("produce phase ran past its time cap")
        producer.flush()
        elapsed = time.perf_counter() - started
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} sends failed, the first: {failed[0]}")
    return len(records) / elapsed


def consume(access: Access, topic: str, expected: int) -> float:
    deadline = time.monotonic() + PHASE_SECONDS_MAX
    seen = 0
    with Consumer(access.address, token=access.token, tls=access.tls) as consumer:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        consumer.seek_to_beginning()
        started = time.perf_counter()
        while seen < expected and time.monotonic() < deadline:
            seen += len(consumer.poll(timeout_ms=1000))
        elapsed = time.perf_counter() - started
    if seen != expected:
        raise RuntimeError(f"consumed {seen} of {expected} records")
    return seen / elapsed


def run_side(
    access: Access, admin: Access, topic: str, records: list[tuple[bytes, bytes]]
) -> tuple[float, float]:
    with Admin(admin.address, token=admin.token, tls=admin.tls) as a:
        a.create_topic(topic, PARTITIONS)
    return produce(access, topic, records), consume(access, topic, len(records))


# ---------------------------------------------------------------------------- report
def print_table(results: dict[str, dict[str, float]]) -> None:
    print(f"| workload (records/s) | {PLAIN} | {SECURE} | {SECURE} / {PLAIN} |")
    print("|---|---|---|---|")
    for workload in ("produce", "consume"):
        plain, secure = results[PLAIN][workload], results[SECURE][workload]
        print(f"| {workload} | {plain:,.0f} | {secure:,.0f} | {secure / plain:.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="100,000 records a run (else 500,000), 3 repetitions"
    )
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    info = machine(grpc_versions())
    load_start = load_average()
    print("settings:", json.dumps(asdict(s)))
    print(f"secure broker: TLS (EC P-256 certificate), bearer token, ACLs enabled, {SECURE}")
    print("machine:", json.dumps(info))
    print(f"load average at start: {load_start} (other processes share the CPUs)")
    print(
        "estimates before running: produce ~350,000 records/s plaintext and ~320,000 with "
        "security (ratio ~0.9: AES-GCM on loopback costs ~1 ns/byte, a token check per call "
        "and an ACL lookup per request of ~9,000 records); consume ~1,000,000 and ~850,000 "
        "records/s"
    )
    records = make_records(s)
    work = Path(tempfile.mkdtemp(prefix="riverlog-security-bench-"))
    samples: dict[str, dict[str, list[float]]] = {
        side: {"produce": [], "consume": []} for side in (PLAIN, SECURE)
    }
    children: list[Child] = []
    try:
        config, ca, tokens = write_secure_config(work)
        plain_child = start_child("plain", broker_command(str(work / "plain-data")), str(work))
        children.append(plain_child)
        base = broker_command(str(work / "secure-data"))
        secure_child = start_child(
            "secure",
            lambda address: [*base(address), "--config", str(config)],
            str(work),
            grpc.ssl_channel_credentials(root_certificates=ca.read_bytes()),
        )
        children.append(secure_child)
        tls = TlsOptions(ca_file=str(ca))
        plain = Access(plain_child.address)
        secure = Access(secure_child.address, tokens[BENCH_PRINCIPAL], tls)
        secure_admin = Access(secure_child.address, tokens[ADMIN_PRINCIPAL], tls)
        check_secure(secure, ca)
        sides = {PLAIN: (plain, plain), SECURE: (secure, secure_admin)}
        for repetition in range(s.repetitions):
            order = [PLAIN, SECURE] if repetition % 2 == 0 else [SECURE, PLAIN]
            for side in order:
                access, admin = sides[side]
                produced, consumed = run_side(
                    access, admin, f"{TOPIC_PREFIX}-{repetition}", records
                )
                samples[side]["produce"].append(produced)
                samples[side]["consume"].append(consumed)
                print(
                    f"repetition {repetition + 1}/{s.repetitions} {side:>15}: "
                    f"produce {produced:,.0f} records/s, consume {consumed:,.0f} records/s"
                )
    finally:
        for child in children:
            stop_child(child)
        shutil.rmtree(work, ignore_errors=True)
    load_end = load_average()
    results = {
        side: {w: statistics.median(v) for w, v in by_workload.items()}
        for side, by_workload in samples.items()
    }
    ratios = {w: results[SECURE][w] / results[PLAIN][w] for w in ("produce", "consume")}
    verdict = "PASS" if ratios["produce"] >= TARGET_RATIO else "MISS"
    print(f"median of {s.repetitions} repetition(s):")
    print_table(results)
    print(
        f"target: produce {SECURE} / {PLAIN} >= {TARGET_RATIO}: {ratios['produce']:.3f} {verdict}"
    )
    print(f"load average at end: {load_end}")
    print(
        json.dumps(
            {
                "plaintext_produce_records_per_s": round(results[PLAIN]["produce"]),
                "secure_produce_records_per_s": round(results[SECURE]["produce"]),
                "produce_ratio": round(ratios["produce"], 3),
                "plaintext_consume_records_per_s": round(results[PLAIN]["consume"]),
                "secure_consume_records_per_s": round(results[SECURE]["consume"]),
                "consume_ratio": round(ratios["consume"], 3),
                "target_produce_ratio": TARGET_RATIO,
                "result": verdict,
                "samples": {
                    side: {w: [round(v) for v in values] for w, values in by_workload.items()}
                    for side, by_workload in samples.items()
                },
                "load_average": {"start": load_start, "end": load_end},
                "secure": SECURE,
                "quick": args.quick,
                "machine": info,
                "settings": asdict(s),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
