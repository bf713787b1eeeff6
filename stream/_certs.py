"""Throwaway development certificates for `riverlog certs`: a CA, a broker certificate and
client certificates, made with `cryptography` (EC P-256 keys, ECDSA with SHA-256).

For trying TLS and mutual TLS on one machine or a test network, not for production: the CA
key lies next to the certificates, unencrypted, and anyone holding it can mint certificates
the broker accepts. Files written into the directory (PEM; keys PKCS#8, mode 0600):

    ca.pem, ca-key.pem            the CA: self-signed, subject CN=riverlog development CA
    server.pem, server-key.pem    the broker's: subject CN=riverlog broker, SANs localhost,
                                  127.0.0.1, ::1 and every --host (DNS name or IP address)
    <name>.pem, <name>-key.pem    one per client name: subject CN=<name>; the broker knows a
                                  caller presenting it as the principal "CN=<name>"

Certificates are valid from CLOCK_SKEW_S before now for `days` days. Existing files are never
replaced unless `force` is given (a new CA would silently orphan every certificate the old one
signed).

The building functions take `now` and return values; only `write_dev_certs` touches the disk.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from storage import InvalidConfigError

DAYS_DEFAULT = 365
# Ten years: a development certificate that outlives that is forgotten, not used.
DAYS_MAX = 3650
# Certificates start this long before `now`, so a peer whose clock is a little behind
# accepts them at once.
CLOCK_SKEW_S = 300
CA_NAME = "riverlog development CA"
SERVER_NAME = "riverlog broker"
CLIENT_DEFAULT = "client"
# Always in the broker certificate: what a client on the same machine connects to.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# A client name is its file name too: no path separators, no leading dot.
CLIENT_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}")
# A DNS name of the broker (a "*." wildcard first label allowed).
HOST_NAME_PATTERN = re.compile(
    r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
HOSTS_MAX = 100
CLIENTS_MAX = 100
_RESERVED_NAMES = frozenset({"ca", "server"})
KEY_FILE_MODE = 0o600
CERT_FILE_MODE = 0o644


class CertsError(InvalidConfigError):
    """A host or client name that cannot go into a certificate, files that exist, or a
    directory that cannot be written (the message names the file)."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM bytes."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class DevCerts:
    """What `make_dev_certs` made: the CA, the broker's certificate, one per client name."""

    ca: Issued
    server: Issued
    clients: dict[str, Issued]


def check_host(host: str) -> x509.GeneralName:
    """The subject alternative name for `host`: an IP address or a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or HOST_NAME_PATTERN.fullmatch(host) is None:
        raise CertsError(
            f"host {host!r} is neither an IP address nor a DNS name (letters, digits, hyphens, "
            "dots; at most 253 characters)"
        )
    return x509.DNSName(host.lower())


def check_client_name(name: str) -> str:
    if CLIENT_NAME_PATTERN.fullmatch(name) is None or name in _RESERVED_NAMES:
        raise CertsError(
            f"client name {name!r}: 1 to 64 characters from A-Z a-z 0-9 . _ @ - (not starting "
            "with . - or @), and not 'ca' or 'server' (their files are taken)"
        )
    return name


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, now: datetime, days: int
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(seconds=CLOCK_SKEW_S))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def make_dev_certs(
    now: datetime,
    *,
    days: int = DAYS_DEFAULT,
    hosts: tuple[str, ...] = (),
    clients: tuple[str, ...] = (CLIENT_DEFAULT,),
) -> DevCerts:
    """A new CA, a broker certificate for LOCAL_HOSTS + `hosts`, and a client certificate per
    name in `clients`, valid for `days` from `now` (an aware datetime)."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= DAYS_MAX:
        raise CertsError(f"days must be in [1, {DAYS_MAX}], got {days!r}")
    if len(hosts) > HOSTS_MAX or len(clients) > CLIENTS_MAX:
        raise CertsError(
            f"at most {HOSTS_MAX} hosts and {CLIENTS_MAX} clients, got {len(hosts)} and "
            f"{len(clients)}"
        )
    sans: list[x509.GeneralName] = []
    for host in (*LOCAL_HOSTS, *hosts):
        san = check_host(host)
        if san not in sans:
            sans.append(san)
    names = list(dict.fromkeys(check_client_name(name) for name in clients))

    ca_key = _new_key()
    ca_name = _name(CA_NAME)
    ca_cert = (
        _builder(ca_name, ca_name, ca_key, now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())

    def leaf(
        common_name: str, usage: x509.ObjectIdentifier, alt: list[x509.GeneralName] | None
    ) -> Issued:
        key = _new_key()
        builder = (
            _builder(_name(common_name), ca_name, key, now, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(authority, critical=False)
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    return DevCerts(
        ca=Issued(ca_cert.public_bytes(serialization.Encoding.PEM), _key_pem(ca_key)),
        server=leaf(SERVER_NAME, ExtendedKeyUsageOID.SERVER_AUTH, sans),
        clients={name: leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, None) for name in names},
    )


def planned_files(directory: Path, clients: tuple[str, ...]) -> list[Path]:
    """Every file `write_dev_certs` writes for `clients`, in its order."""
    stems = ["ca", "server", *dict.fromkeys(clients)]
    return [directory / f"{stem}{suffix}" for stem in stems for suffix in (".pem", "-key.pem")]


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write `data` to `path` with `mode` from its first byte (an existing file, with
    `force`, is truncated and given `mode` before anything is written)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)


def write_dev_certs(
    directory: str | os.PathLike[str],
    now: datetime,
    *,
    days: int = DAYS_DEFAULT,
    hosts: tuple[str, ...] = (),
    clients: tuple[str, ...] = (CLIENT_DEFAULT,),
    force: bool = False,
) -> list[Path]:
    """Make the certificates (`make_dev_certs`) and write them into `directory` (created if
    missing); the paths written. CertsError, before anything is written, when a
    file exists and `force` is not given."""
    target = Path(directory)
    clients = clients or (CLIENT_DEFAULT,)
    certs = make_dev_certs(now, days=days, hosts=hosts, clients=clients)
    paths = planned_files(target, clients)
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not force:
        raise CertsError(
            f"{len(existing)} file(s) exist: {', '.join(existing)}; pass --force to replace "
            "them (certificates signed by the old CA stop being trusted)"
        )
    issued = [certs.ca, certs.server, *(certs.clients[name] for name in dict.fromkeys(clients))]
    path = target
    try:
        target.mkdir(parents=True, exist_ok=True)
        for i, item in enumerate(issued):
            path = paths[2 * i]
            _write(path, item.cert_pem, CERT_FILE_MODE, force)
            path = paths[2 * i + 1]
            _write(path, item.key_pem, KEY_FILE_MODE, force)
    except OSError as e:
        raise CertsError(f"cannot write {path}: {e.strerror}") from None
    return paths
