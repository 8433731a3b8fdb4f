"""`llamadist certs --out DIR`: a development CA and certificates for TLS between llamadist
services, made with the `cryptography` package. For development and tests, not production PKI.

Files written (keys readable by the owner only):
  ca.pem, ca-key.pem            the CA (its key signs the others; keep it away from the services)
  server.pem, server-key.pem    for every service (stages and orchestrator): server and client
                                authentication, SANs localhost, 127.0.0.1, ::1 and --hosts
  client.pem, client-key.pem    an optional client certificate (client authentication only),
                                e.g. for `llamadist health --stage` against a TLS stage
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
FILES = ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llamadist development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _leaf(
    common_name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    usages: list[x509.ObjectIdentifier],
    hosts: Sequence[str],
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def split_hosts(values: Iterable[str]) -> list[str]:
    """--hosts a,b --hosts c -> [a, b, c]."""
    return [h.strip() for v in values for h in v.split(",") if h.strip()]


def make_certs(
    out: str | Path, hosts: Sequence[str] = (), days: int = 365, force: bool = False
) -> dict[str, Path]:
    """Writes the files above into `out` (created); refuses to overwrite unless `force`.
    Returns {file name: path}."""
    out = Path(out)
    paths = {name: out / name for name in FILES}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise ValueError(f"{', '.join(existing)} already exist (--force replaces them)")
    if days <= 0:
        raise ValueError("--days must be positive")
    out.mkdir(parents=True, exist_ok=True)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_name = _name(f"llamadist development CA {secrets.token_hex(4)}")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    all_hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    server_cert, server_key = _leaf(
        "llamadist server",
        ca_cert,
        ca_key,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        all_hosts,
        days,
    )
    client_cert, client_key = _leaf(
        "llamadist client", ca_cert, ca_key, [ExtendedKeyUsageOID.CLIENT_AUTH], (), days
    )
    _write_key(paths["ca-key.pem"], ca_key)
    _write_cert(paths["ca.pem"], ca_cert)
    _write_key(paths["server-key.pem"], server_key)
    _write_cert(paths["server.pem"], server_cert)
    _write_key(paths["client-key.pem"], client_key)
    _write_cert(paths["client.pem"], client_cert)
    return paths


def make_api_keys(path: str | Path) -> dict[str, str]:
    """A fresh API keys file (owner-only) with one client and one admin key; returns
    {role: key}. Each key also goes to `<path>.<role>` so that scripts can read it."""
    path = Path(path)
    # hex: a key never starts with '-', which a command line would take for an option
    keys = {role: secrets.token_hex(32) for role in ("client", "admin")}
    lines = ["# llamadist API keys: <key> <role> (client | admin)"]
    lines += [f"{key} {role}" for role, key in keys.items()]
    for target, text in [(path, "\n".join(lines))] + [
        (path.with_name(f"{path.name}.{role}"), key) for role, key in keys.items()
    ]:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
    return keys
