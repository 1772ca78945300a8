"""Secrets: generation, hashing and constant-time checks.

Device credentials, enrollment tokens and API keys are random 32-byte URL-safe strings. Only a
hash is stored. They carry 256 bits of entropy, so a fast keyed hash is enough (no password
stretching needed); a per-secret salt still keeps equal secrets from hashing alike.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIXES = {"credential": "tdc_", "token": "tdt_", "api_key": "tdk_"}


def new_secret(kind: str) -> str:
    """A fresh secret of `kind` (credential, token, api_key); the prefix makes leaks greppable."""
    return PREFIXES[kind] + secrets.token_urlsafe(32)


def hash_secret(secret: str, salt: str | None = None) -> str:
    """'salt$hexdigest' of the secret."""
    salt = salt or secrets.token_hex(8)
    digest = hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()
    return f"{salt}${digest}"


def check_secret(secret: str, stored: str) -> bool:
    salt, _, _ = stored.partition("$")
    return hmac.compare_digest(hash_secret(secret, salt), stored)


def lookup_key(secret: str) -> str:
    """Unsalted digest used as the database key for tokens and API keys (they are looked up by value)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def redact(secret: str) -> str:
    """What may appear in logs: the prefix and 4 characters."""
    return secret[:8] + "…" if secret else ""
