"""Where idempotency state lives: the store protocol and the embedded store.

A store keeps, per operation key, either a claim in flight (with a lease) or a
completed response (with a time to live). It holds opaque bytes: the
middleware encodes what it records, so a store has no schema to keep in step.
Every operation is atomic with respect to the others on the same key; that is
what makes a retried write run once (issue #10).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Held", "IdempotencyStore", "MemoryStore", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The store could not be reached in time; the write must not run (fail closed)."""


@dataclass(frozen=True, slots=True)
class Held:
    """What a claim found instead of claiming: another request's state for the key.

    `response` is None while that request is in flight, and its recorded
    bytes once it completed.
    """

    fingerprint: bytes
    response: bytes | None


class IdempotencyStore(Protocol):
    """Atomic per-key operations a store provides.

    Each raises `StoreUnavailable` when the store cannot answer: the middleware
    then answers 503 and runs nothing.
    """

    async def claim(self, key: str, token: str, fingerprint: bytes, lease: float) -> Held | None:
        """Claim `key` for `lease` seconds under `token`; return None if claimed, else what holds it."""
        ...

    async def complete(self, key: str, token: str, response: bytes, ttl: float) -> bool:
        """Record `response` for `ttl` seconds if `token` still holds the claim; return whether it did."""
        ...

    async def release(self, key: str, token: str) -> None:
        """Drop the claim if `token` still holds it, so that a retry runs again."""
        ...


@dataclass(slots=True)
class _Claim:
    token: str
    fingerprint: bytes
    expires: float


# A record is a tuple of (fingerprint, response, expires): of bytes and a float
# only, so the garbage collector stops tracking it, however many a store holds.
_Record = tuple[bytes, bytes, float]


class MemoryStore:
    """The embedded store: one process, nothing to install, bounded and expiring.

    Completed records are kept oldest first: past `max_entries` or `max_bytes`
    the oldest are evicted, and an evicted record's key runs again if it is
    retried, so size the bounds for a day of writes (or use Redis). Claims in
    flight are kept apart and never evicted (a retry would then run twice);
    there is one per write running now.
    """

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if type(max_entries) is not int or max_entries < 1:
            raise ValueError(f"max_entries is a positive int, not {max_entries!r}")
        if type(max_bytes) is not int or max_bytes < 1:
            raise ValueError(f"max_bytes is a positive int, not {max_bytes!r}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._claims: dict[str, _Claim] = {}
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._claims) + len(self._records)

    @property
    def size_bytes(self) -> int:
        """The bytes of the recorded requests' fingerprints and responses held now."""
        return self._bytes

    async def claim(self, key: str, token: str, fingerprint: bytes, lease: float) -> Held | None:
        now = self._clock()
        record = self._records.get(key)
        if record is not None:
            if record[2] > now:
                return Held(record[0], record[1])
            self._drop(key, record)
        claim = self._claims.get(key)
        if claim is not None and claim.expires > now:
            return Held(claim.fingerprint, None)
        self._claims[key] = _Claim(token, fingerprint, now + lease)
        return None

    async def complete(self, key: str, token: str, response: bytes, ttl: float) -> bool:
        now = self._clock()
        claim = self._claims.get(key)
        if claim is None or claim.token != token:
            return False
        del self._claims[key]
        if claim.expires <= now:
            return False  # the lease ended first: as in Redis, the claim is gone
        self._records[key] = (claim.fingerprint, response, now + ttl)
        self._bytes += len(claim.fingerprint) + len(response)
        while len(self._records) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(*next(iter(self._records.items())))
        return True

    async def release(self, key: str, token: str) -> None:
        claim = self._claims.get(key)
        if claim is not None and claim.token == token:
            del self._claims[key]

    def _drop(self, key: str, record: _Record) -> None:
        del self._records[key]
        self._bytes -= len(record[0]) + len(record[1])
