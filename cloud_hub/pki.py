"""A private CA for a Tandem deployment (`tandem hub init`): TLS is one flag away.

`init_pki(dir, hosts)` writes, readable by the owner only:

    ca.pem / ca.key        the deployment's CA (10 years); ca.pem is what agents and SDK clients trust
    hub.pem / hub.key      the hub's certificate for the given host names and IP addresses (2 years)

The hub serves TLS with `--tls-dir`; agents and clients pass `--tls-ca ca.pem` (SDK: `tls_ca=`).

Devices get their own certificates (mutual TLS): an agent makes its key, sends a CSR at enrollment,
and the hub signs it with ca.key (`sign_device_csr`: CN = the device id, client auth only, 2 years).
The hub then checks that certificate on its device port and its broker's TLS listener
(`load_device_ca`; see docs/architecture.md, "Transport security").
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud_hub.errors import InvalidRequest, PermissionDenied
from tandem.files import write_private


def _name(common: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tandem"), x509.NameAttribute(NameOID.COMMON_NAME, common)]
    )


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
    write_private(paths["ca.key"], ca_key.private_bytes(pem, *key_format))
    write_private(paths["hub.key"], hub_key.private_bytes(pem, *key_format))
    return paths


# -- device certificates (mutual TLS) -------------------------------------------------------------

DEVICE_CERT_DAYS = 730
"""How long a device certificate is valid; a device re-enrolls to get a new one."""


@dataclass(frozen=True)
class DeviceCA:
    """The deployment's CA as the hub uses it for devices: verifying their certificates, and signing
    new ones at enrollment when its key is on this machine."""

    certificate: bytes = field(repr=False)
    """ca.pem: what device certificates must chain to (the gRPC device port and the broker's TLS
    listener trust only this)."""
    key: ec.EllipticCurvePrivateKey | None = field(repr=False, default=None)
    """ca.key; None when the operator keeps it off the hub: devices enrolled before still connect,
    enrollment is refused (it could not sign)."""


def load_device_ca(directory: Path) -> DeviceCA | None:
    """The CA in a `tandem hub init` directory; None when it has no ca.pem (a hub certificate from
    elsewhere: the hub then serves server-side TLS only, devices authenticate by credential alone)."""
    ca_pem = directory / "ca.pem"
    if not ca_pem.is_file():
        return None
    key = None
    if (directory / "ca.key").is_file():
        loaded = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / 'ca.key'} is not an EC key (tandem hub init makes one)")
        key = loaded
    return DeviceCA(ca_pem.read_bytes(), key)


def check_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """The parsed request; ValueError (saying what is wrong) when it is not PEM, its signature does not
    verify (whoever sent it does not hold the key) or its key is not EC P-256/P-384."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise ValueError(f"csr: not a PEM certificate signing request ({exc})") from None
    if not csr.is_signature_valid:
        raise ValueError("csr: its signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1"):
        raise ValueError("csr: the key must be EC P-256 or P-384")
    return csr


def sign_device_csr(ca: DeviceCA, csr_pem: bytes, device_id: str, days: int = DEVICE_CERT_DAYS) -> bytes:
    """A client certificate (PEM) for the CSR's key, CN = device_id, usable for TLS client auth only.

    The CSR's own subject is ignored: the hub names the device. ValueError for a bad CSR (check_csr)
    or a CA without its key."""
    if ca.key is None:
        raise ValueError("the CA key (ca.key) is not on this hub, so it cannot sign device certificates")
    csr = check_csr(csr_pem)
    issuer = x509.load_pem_x509_certificate(ca.certificate)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(device_id))
        .issuer_name(issuer.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def admit_csr(ca: DeviceCA | None, csr_pem: bytes) -> None:
    """Whether an enrollment may go on, judged before its token is spent: with a device CA the request
    must carry a good CSR (InvalidRequest) and the hub must hold ca.key (PermissionDenied). Without a
    device CA (plaintext, or a hub certificate from elsewhere) any CSR is ignored."""
    if ca is None:
        return
    if ca.key is None:
        raise PermissionDenied(
            "enrollment is closed on this hub: its TLS directory has the deployment's CA certificate but "
            "not its key (ca.key), so it cannot sign device certificates; put ca.key back and restart the hub"
        )
    if not csr_pem:
        raise InvalidRequest(
            "csr: this hub requires mutual TLS and the request has no certificate signing request; "
            "run an agent that sends one, dialling the hub with --tls-ca"
        )
    try:
        check_csr(csr_pem)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
