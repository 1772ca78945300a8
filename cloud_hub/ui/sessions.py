"""Logins to the fleet page: one session per login with an API key, each with its own CSRF token.

The browser holds only a random session id, in an HttpOnly, SameSite=Strict cookie; the API key
never leaves the login form's POST and is never stored (its lookup digest is, to re-check it). The
CSRF token is a second random value, rendered into the page's forms and sent back with every
state-changing request; it is compared in constant time. Sessions live in the hub's memory: a
restarted hub logs everyone out, and replicas behind a balancer need sticky sessions.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

SESSION_COOKIE = "tandem_session"
LOGIN_COOKIE = "tandem_login"
"""The login form's own CSRF value (double-submit: the cookie and the form field must match)."""


@dataclass(frozen=True)
class UiSession:
    sid: str
    csrf: str
    key_lookup: str
    """auth.lookup_key of the API key it logged in with (re-checked on every use)."""
    expires: float


class Sessions:
    def __init__(self, ttl_s: float = 12 * 3600, limit: int = 1000, clock: Callable[[], float] = time.time) -> None:
        if ttl_s <= 0 or limit < 1:
            raise ValueError(f"Sessions needs ttl_s > 0 and limit >= 1, got {ttl_s} and {limit}")
        self.ttl_s, self.limit, self.clock = ttl_s, limit, clock
        self._by_sid: dict[str, UiSession] = {}

    def create(self, key_lookup: str) -> UiSession:
        """A new session; past `limit` live ones, the oldest is ended (dicts keep insertion order)."""
        self._expire()
        while len(self._by_sid) >= self.limit:
            del self._by_sid[next(iter(self._by_sid))]
        s = UiSession(secrets.token_urlsafe(32), secrets.token_urlsafe(32), key_lookup, self.clock() + self.ttl_s)
        self._by_sid[s.sid] = s
        return s

    def get(self, sid: str | None) -> UiSession | None:
        """The live session with this id, or None (unknown, ended or expired)."""
        s = self._by_sid.get(sid or "")
        if s is not None and s.expires <= self.clock():
            del self._by_sid[s.sid]
            return None
        return s

    def end(self, sid: str) -> None:
        self._by_sid.pop(sid, None)

    def _expire(self) -> None:
        now = self.clock()
        for sid in [sid for sid, s in self._by_sid.items() if s.expires <= now]:
            del self._by_sid[sid]


def same_secret(expected: str, given: str | None) -> bool:
    """Constant-time equality of two secrets; a missing or empty one never matches."""
    return bool(expected) and bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())
