"""The device's own key and certificate, for mutual TLS with the hub and its broker.

At enrollment over TLS the agent makes an EC P-256 key that never leaves the device and sends only
a certificate signing request (`new_key_request`). A hub with its CA answers with the certificate
(CN = the device id) and the CA; `save_identity` writes them to the state directory:

    device.key    the private key (0600)
    device.pem    its certificate, signed by the deployment's CA
    ca.pem        the deployment's CA, which the agent trusts for the hub and the broker

From then on the agent dials the hub's device port and the broker's TLS listener with them
(`DeviceIdentity.channel_credentials`, edge_agent.telemetry). A device without them (one enrolled
before the hub required mutual TLS) must re-enroll; the hub's refusal says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tandem.files import private_dir, write_private

KEY_FILE, CERT_FILE, CA_FILE = "device.key", "device.pem", "ca.pem"


@dataclass(frozen=True)
class DeviceIdentity:
    """Where this device's key, certificate and trusted CA are (files in the state directory)."""

    key_file: Path
    cert_file: Path
    ca_file: Path

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS that trusts only the deployment's CA and presents this device's certificate."""
        return grpc.ssl_channel_credentials(
            self.ca_file.read_bytes(), self.key_file.read_bytes(), self.cert_file.read_bytes()
        )


def new_key_request(name: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh key and a PEM CSR for it. The key stays in memory until save_identity writes it; the
    CSR's subject is a hint only (the hub names the certificate after the device id)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "edge-device")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM)


def save_identity(
    state_dir: Path, key: ec.EllipticCurvePrivateKey, certificate: bytes, ca_certificate: bytes
) -> DeviceIdentity:
    """Write the key (0600), the certificate and the CA into state_dir; ValueError when the certificate
    is not for this key (a hub that answered for another request)."""
    cert = x509.load_pem_x509_certificate(certificate)
    if cert.public_key() != key.public_key():
        raise ValueError("the hub's certificate is not for the key this device sent")
    private_dir(state_dir)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    identity = identity_paths(state_dir)
    write_private(identity.key_file, pem)
    write_private(identity.cert_file, certificate)
    write_private(identity.ca_file, ca_certificate)
    return identity


def identity_paths(state_dir: Path) -> DeviceIdentity:
    return DeviceIdentity(state_dir / KEY_FILE, state_dir / CERT_FILE, state_dir / CA_FILE)


def load_identity(state_dir: Path) -> DeviceIdentity | None:
    """The saved identity, or None when any of its three files is missing."""
    identity = identity_paths(state_dir)
    if all(p.is_file() for p in (identity.key_file, identity.cert_file, identity.ca_file)):
        return identity
    return None


def hub_host(hub: str) -> str:
    """The host of a host:port hub address: where this agent reaches the hub's machine. The device port
    and the broker's TLS listener are dialled there too, under the name the hub's certificate carries
    (the hub cannot know under which name or address devices reach it)."""
    return hub.rsplit(":", 1)[0] if ":" in hub else hub


def device_address(hub: str, port: int) -> str:
    """host:port of the hub's device port, at the host this agent dials the hub at."""
    return f"{hub_host(hub)}:{port}"
