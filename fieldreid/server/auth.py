"""Device tokens and rate limits.

Tokens are 256-bit random strings shown once when a device is registered; the server stores only their
SHA-256. A slow password hash (bcrypt, argon2) protects *low-entropy* secrets against offline guessing;
a random 256-bit token cannot be guessed, so a single SHA-256 is enough and keeps every request cheap.
The token names the device (``frd_<device>_<secret>``) only to make logs and support easier; the
server identifies the device by the hash, never by the readable prefix.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time

TOKEN_PREFIX = "frd_"
DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
PROJECT_ID_RE = DEVICE_ID_RE


def new_token(device_id: str) -> str:
    return f"{TOKEN_PREFIX}{device_id}_{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class RateLimiter:
    """Token buckets keyed by device (or client address for failed logins), in this process's memory.

    ``rate`` requests per second are refilled up to ``burst``. One uvicorn worker holds one limiter; behind
    several workers each limits on its own (the reverse proxy can add a global limit).
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 10000) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, cost: float = 1.0) -> float:
        """0.0 if allowed (and charged), else the seconds to wait before retrying."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= cost:
                self._buckets[key] = (tokens - cost, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > self.max_keys:  # forget the fullest buckets first: they are idle
                for k in [k for k, (t, _) in self._buckets.items() if t >= self.burst][: self.max_keys // 2]:
                    del self._buckets[k]
            return (cost - tokens) / self.rate if self.rate > 0 else 60.0
