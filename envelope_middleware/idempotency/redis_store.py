"""The Redis store: idempotency state shared by every worker on every host.

Needs the `redis` extra (redis-py's asyncio client). Each operation is one Lua
script on one key, so it is atomic and costs one round trip: a first write
takes two (claim, complete), a replay one (the claim that finds the record).
Keys are `<prefix>{<digest>}`: the braces are a Redis Cluster hash tag, so
whatever keys one operation ever uses land in one slot.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import redis.asyncio
from redis.exceptions import RedisError

from envelope_middleware.idempotency.store import Held, StoreUnavailable

__all__ = ["RedisStore"]

# A hash per operation: `fingerprint` and `token` from the claim, `response`
# once complete. The key's expiry is the lease, then the record's time to live.
_CLAIM = """
local held = redis.call('HMGET', KEYS[1], 'fingerprint', 'response')
if held[1] then
  return {held[1], held[2]}
end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'fingerprint', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return false
"""
# Only the claim's own holder completes or releases it: after a lease expired and
# another request claimed the key, the first one's late answer must change nothing.
_COMPLETE = """
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'response') == 0 then
  redis.call('HSET', KEYS[1], 'response', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'response') == 0 then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisStore:
    """Idempotency state in Redis (or Redis Cluster), for gateways of many processes.

    `client` is a `redis.asyncio.Redis` (or `RedisCluster`) created with
    `decode_responses=False`. Every call is bounded by `timeout` seconds; a
    Redis that is down, slow or refusing raises `StoreUnavailable`, and the
    middleware answers 503 without running the write.
    """

    def __init__(self, client: Any, *, prefix: str = "idempotency:", timeout: float = 0.5) -> None:
        if client.get_encoder().decode_responses:
            raise ValueError(
                "the Redis client must be created with decode_responses=False: records are bytes"
            )
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            # A brace in the prefix would become the hash tag instead of the key's own.
            raise ValueError(f"prefix is a str without braces, not {prefix!r}")
        if not (isinstance(timeout, int | float) and 0 < timeout < math.inf):
            raise ValueError(f"timeout is a positive number of seconds, not {timeout!r}")
        self.client = client
        self.prefix = prefix
        self.timeout = float(timeout)
        self._claim = client.register_script(_CLAIM)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "idempotency:", timeout: float = 0.5) -> RedisStore:
        """A store on a new client for `url` (`redis://host:port/db`), its sockets bounded by `timeout`."""
        client = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=False
        )
        return cls(client, prefix=prefix, timeout=timeout)

    def redis_key(self, key: str) -> str:
        """The Redis key an operation key is kept under."""
        return f"{self.prefix}{{{key}}}"

    async def claim(self, key: str, token: str, fingerprint: bytes, lease: float) -> Held | None:
        found = await self._run(self._claim, key, token, fingerprint, _milliseconds(lease))
        if found is None:
            return None
        stored, response = found
        return Held(stored, response)

    async def complete(self, key: str, token: str, response: bytes, ttl: float) -> bool:
        return bool(await self._run(self._complete, key, token, response, _milliseconds(ttl)))

    async def release(self, key: str, token: str) -> None:
        await self._run(self._release, key, token)

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()

    async def _run(self, script: Any, key: str, *args: object) -> Any:
        try:
            # The client's own socket timeouts do not bound its retries and reconnects.
            async with asyncio.timeout(self.timeout):
                return await script(keys=[self.redis_key(key)], args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"Redis did not answer: {type(exc).__name__}") from exc


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
