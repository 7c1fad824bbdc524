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
    bytes once it completed. `expires_in` is the lease's or record's remaining
    life in seconds.
    """

    fingerprint: bytes
    response: bytes | None
    expires_in: float


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
class _Entry:
    token: str
    fingerprint: bytes
    response: bytes | None
    expires: float

    @property
    def size(self) -> int:
        return len(self.fingerprint) + (len(self.response) if self.response is not None else 0)


class MemoryStore:
    """The embedded store: one process, nothing to install, bounded and expiring.

    Entries are kept in the order they were last written. Past `max_entries`
    or `max_bytes`, the oldest completed (or expired) records are evicted
    first; a claim in flight is never evicted, since a retry would then run
    twice. An evicted record's key runs again if it is retried.
    """

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
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
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """The bytes of fingerprints and recorded responses held now."""
        return self._bytes

    async def claim(self, key: str, token: str, fingerprint: bytes, lease: float) -> Held | None:
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None:
            if entry.expires > now:
                return Held(entry.fingerprint, entry.response, entry.expires - now)
            self._drop(key, entry)
        self._put(key, _Entry(token, fingerprint, None, now + lease))
        return None

    async def complete(self, key: str, token: str, response: bytes, ttl: float) -> bool:
        entry = self._entries.get(key)
        if entry is None or entry.token != token or entry.response is not None:
            return False
        self._drop(key, entry)
        self._put(key, _Entry(token, entry.fingerprint, response, self._clock() + ttl))
        return True

    async def release(self, key: str, token: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.token == token and entry.response is None:
            self._drop(key, entry)

    def _put(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        self._bytes += entry.size
        if len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._evict()

    def _drop(self, key: str, entry: _Entry) -> None:
        del self._entries[key]
        self._bytes -= entry.size

    def _evict(self) -> None:
        now = self._clock()
        skipped = 0
        # Oldest first. A claim in flight is moved behind the others instead (they
        # are few: one per write running now), so this ends within one pass.
        while (len(self._entries) > self.max_entries or self._bytes > self.max_bytes) and skipped < len(
            self._entries
        ):
            key, entry = next(iter(self._entries.items()))
            if entry.response is None and entry.expires > now:
                self._entries.move_to_end(key)
                skipped += 1
            else:
                self._drop(key, entry)
