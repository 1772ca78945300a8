"""A private CA for a Tandem deployment (`tandem hub init`): TLS is one flag away.

`init_pki(dir, hosts)` writes, readable by the owner only:

    ca.pem / ca.key        the deployment's CA (10 years); ca.pem is what agents and SDK clients trust
    hub.pem / hub.key      the hub's certificate for the given host names and IP addresses (2 years)

The hub serves TLS with `--tls-dir`; agents and clients pass `--tls-ca ca.pem` (SDK: `tls_ca=`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tandem"), x509.NameAttribute(NameOID.COMMON_NAME, common)]
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def init_pki(directory: Path, hosts: list[str]) -> dict[str, Path]:
    """Create the CA and the hub certificate for `hosts`; refuses to overwrite an existing CA."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (directory / "ca.pem").exists():
        raise FileExistsError(f"{directory / 'ca.pem'} exists: this deployment already has a CA")
    if not hosts:
        raise ValueError("the hub certificate needs at least one host name or IP address")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Tandem CA"))
        .issuer_name(_name("Tandem CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    hub_key = ec.generate_private_key(ec.SECP256R1())
    hub = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(hub_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=730))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_format = (serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    paths = {name: directory / name for name in ("ca.pem", "ca.key", "hub.pem", "hub.key")}
    paths["ca.pem"].write_bytes(ca.public_bytes(pem))
    paths["hub.pem"].write_bytes(hub.public_bytes(pem))
    _write_private(paths["ca.key"], ca_key.private_bytes(pem, *key_format))
    _write_private(paths["hub.key"], hub_key.private_bytes(pem, *key_format))
    return paths
