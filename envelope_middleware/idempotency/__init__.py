"""Idempotent writes: a retried request under the same Idempotency-Key runs once (issue #10).

`IdempotencyMiddleware` claims each keyed write in a store, runs it once and
replays its recorded answer to retries. `MemoryStore` keeps the state in one
process; `envelope_middleware.idempotency.redis_store.RedisStore` (the `redis`
extra) shares it across workers and hosts.
"""

from envelope_middleware.idempotency.middleware import IdempotencyMiddleware, Principal
from envelope_middleware.idempotency.store import Held, IdempotencyStore, MemoryStore, StoreUnavailable

__all__ = [
    "Held",
    "IdempotencyMiddleware",
    "IdempotencyStore",
    "MemoryStore",
    "Principal",
    "StoreUnavailable",
]
