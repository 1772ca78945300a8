"""Per-key token buckets: each API key may start `rate_per_s` requests a second, `burst` at once.

A key's bucket holds up to `burst` tokens and refills at `rate_per_s`; a request takes one token, or
is refused with the seconds until one is due (its Retry-After). A key never seen starts with a full
bucket. Buckets are kept in a dict bounded by `max_keys`: past it, the oldest half (by first request)
is dropped. A dropped bucket starts full again, so the bound can loosen a key's limit for a moment but
never refuses a request wrongly; it keeps a flood of made-up keys (the limit applies before the key is
checked, so that such a flood never reaches the registry) from growing the hub's memory.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Raises ValueError unless rate_per_s > 0 and burst >= 1 (a smaller bucket never admits)."""
        if not rate_per_s > 0 or not burst >= 1:
            raise ValueError(f"a rate limit needs rate_per_s > 0 and burst >= 1, got {rate_per_s} and {burst}")
        self.rate_per_s, self.burst, self.max_keys, self.clock = rate_per_s, burst, max_keys, clock
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, when they were counted]

    def take(self, key: str) -> float:
        """Take a token for `key`: 0.0 when it may start a request now, else the seconds until it may."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                for old in list(itertools.islice(self._buckets, self.max_keys // 2 or 1)):
                    del self._buckets[old]
            self._buckets[key] = [self.burst - 1.0, now]
            return 0.0
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate_per_s)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate_per_s
