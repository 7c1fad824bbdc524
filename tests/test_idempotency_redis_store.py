"""RedisStore against a real redis-server (issue #10): round trips, keys, timeouts, outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import pytest
import redis
import redis.asyncio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from structlog.testing import LogCapture

from envelope_middleware import EnvelopeMiddleware, IdempotencyMiddleware
from envelope_middleware.idempotency import StoreUnavailable
from envelope_middleware.idempotency.redis_store import RedisStore
from tests._redis import RedisServer, free_port, redis_server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may stop and start."""
    with redis_server() as server:
        yield server


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    redis_server.client().flushdb()
    redis_store = RedisStore.from_url(redis_server.url, prefix="gw:")
    try:
        yield redis_store
    finally:
        await redis_store.aclose()


def gateway(store: RedisStore, executed: list[bytes], **options: Any) -> Starlette:
    async def create(request: Request) -> Response:
        executed.append(await request.body())
        return JSONResponse({"write": len(executed)}, status_code=201)

    return Starlette(
        routes=[Route("/orders", create, methods=["POST"])],
        middleware=[
            Middleware(EnvelopeMiddleware),
            Middleware(IdempotencyMiddleware, store=store, principal=lambda _scope: "acme", **options),
        ],
    )


def client_for(app: Starlette) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway")


def script_calls(server: RedisServer) -> int:
    stats = server.client().info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))


async def test_redis_store_first_write_takes_two_round_trips_and_a_replay_one(
    store: RedisStore, redis_server: RedisServer
) -> None:
    executed: list[bytes] = []
    async with client_for(gateway(store, executed)) as http:
        await http.post("/orders", content=b"{}", headers={"Idempotency-Key": "warm"})  # loads the scripts
        redis_server.client().config_resetstat()
        await http.post("/orders", content=b"{}", headers={"Idempotency-Key": "k"})
        first = script_calls(redis_server)
        redis_server.client().config_resetstat()
        replay = await http.post("/orders", content=b"{}", headers={"Idempotency-Key": "k"})
        again = script_calls(redis_server)
        commands = redis_server.client().info("commandstats")
    assert replay.headers["idempotent-replayed"] == "true"
    assert (first, again) == (2, 1)
    # Nothing but the scripts was sent: the other commands counted ran inside them,
    # or are the test's own (HELLO, INFO, CONFIG).
    inside = {"hmget", "pttl", "hset", "pexpire", "hget", "hexists"}
    own = {"hello", "info", "config|resetstat"}
    assert {name.removeprefix("cmdstat_") for name in commands} - inside - own == {"evalsha"}


async def test_redis_store_keys_carry_the_prefix_a_hash_tag_and_the_ttl(
    store: RedisStore, redis_server: RedisServer
) -> None:
    async with client_for(gateway(store, [])) as http:
        await http.post("/orders", content=b"{}", headers={"Idempotency-Key": "k"})
    sync = redis_server.client()
    [key] = sync.keys("*")
    assert isinstance(key, bytes)
    assert key.startswith(b"gw:{")
    assert key.endswith(b"}")
    assert len(key) == len("gw:{}") + 64  # a digest: neither the partner nor the key is kept raw
    assert b"acme" not in key
    assert 86_000 < sync.ttl(key) <= 86_400
    assert set(sync.hkeys(key)) == {b"token", b"fingerprint", b"response"}


async def test_redis_store_down_answers_503_and_runs_nothing(logs: LogCapture) -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3)
    executed: list[bytes] = []
    started = time.monotonic()
    async with client_for(gateway(store, executed)) as http:
        answer = await http.post("/orders", content=b"{}", headers={"Idempotency-Key": "k"})
    assert time.monotonic() - started < 2
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "service_unavailable"
    assert error["details"] == {"reason": "idempotency_store_unavailable"}
    assert answer.headers["retry-after"] == "1"
    assert b"127.0.0.1" not in answer.content
    assert executed == []
    [logged] = [entry for entry in logs.entries if entry["event"] == "idempotency_store_unavailable"]
    assert logged["request_id"] == answer.json()["request_id"]
    assert logged["exc_info"] is True
    await store.aclose()


async def test_redis_store_a_slow_redis_is_cut_off_by_the_timeout(
    own_redis: RedisServer, logs: LogCapture
) -> None:
    # `logs` captures the logged traceback: structlog's development renderer would
    # spend a second drawing it (with rich installed), which is not the store's time.
    store = RedisStore.from_url(own_redis.url, timeout=0.2)
    executed: list[bytes] = []
    async with client_for(gateway(store, executed)) as http:
        # Redis holds every client's commands for 1.5 s: a stall, not an outage.
        own_redis.client().client_pause(1500)
        started = time.monotonic()
        answer = await http.post("/orders", content=b"{}", headers={"Idempotency-Key": "k"})
        took = time.monotonic() - started
    assert answer.status_code == 503
    assert took < 1.0
    assert executed == []
    await store.aclose()


async def test_redis_store_outage_mid_run_then_recovery_runs_each_key_once(own_redis: RedisServer) -> None:
    store = RedisStore.from_url(own_redis.url, timeout=0.3)
    executed: list[bytes] = []
    answers: dict[str, list[int]] = {}
    async with client_for(gateway(store, executed)) as http:

        async def write(key: str) -> int:
            answer = await http.post("/orders", content=key.encode(), headers={"Idempotency-Key": key})
            answers.setdefault(key, []).append(answer.status_code)
            return answer.status_code

        for index in range(5):
            assert await write(f"before-{index}") == 201
        own_redis.stop()
        for index in range(5):
            assert await write(f"during-{index}") == 503
            assert await write(f"before-{index}") == 503
        own_redis.start()  # same port, empty: the records of before the outage are gone
        deadline = time.monotonic() + 5
        while await write("probe") == 503:
            assert time.monotonic() < deadline, "the store did not recover"
            await asyncio.sleep(0.05)
        for index in range(5):
            assert await write(f"during-{index}") == 201
            assert await write(f"during-{index}") == 201  # a replay
    # No write ran twice, and none ran while the store was down.
    assert len(executed) == len(set(executed))
    expected = {f"{phase}-{index}".encode() for phase in ("before", "during") for index in range(5)}
    assert set(executed) == expected | {b"probe"}
    await store.aclose()


def test_redis_store_refuses_a_client_that_decodes_responses(redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses=False"):
        RedisStore(client)


@pytest.mark.parametrize("prefix", ["a{b", "x}"])
def test_redis_store_refuses_a_prefix_with_braces(redis_server: RedisServer, prefix: str) -> None:
    with pytest.raises(ValueError, match="braces"):
        RedisStore(redis.asyncio.Redis.from_url(redis_server.url), prefix=prefix)


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), "1"])
def test_redis_store_refuses_a_timeout_that_is_no_positive_number(
    redis_server: RedisServer, timeout: object
) -> None:
    with pytest.raises(ValueError, match="timeout"):
        RedisStore(redis.asyncio.Redis.from_url(redis_server.url), timeout=timeout)  # type: ignore[arg-type]


async def test_redis_store_errors_are_store_unavailable(store: RedisStore, redis_server: RedisServer) -> None:
    # A key of another type under the operation's name: Redis answers WRONGTYPE.
    redis_server.client().set(store.redis_key("op"), b"not a hash")
    with pytest.raises(StoreUnavailable, match="ResponseError"):
        await store.claim("op", "t", b"fp", 10)


async def test_redis_store_lost_after_the_write_ran_still_answers_and_logs(
    own_redis: RedisServer, logs: LogCapture
) -> None:
    store = RedisStore.from_url(own_redis.url, timeout=0.3)

    async def create(request: Request) -> Response:
        await request.body()
        await asyncio.to_thread(own_redis.stop)  # Redis goes away while the write runs
        return JSONResponse({"write": 1}, status_code=201)

    app = Starlette(
        routes=[Route("/orders", create, methods=["POST"])],
        middleware=[
            Middleware(EnvelopeMiddleware),
            Middleware(IdempotencyMiddleware, store=store, principal=lambda _scope: "acme"),
        ],
    )
    async with client_for(app) as http:
        answer = await http.post("/orders", content=b"{}", headers={"Idempotency-Key": "k"})
    # The write ran: its answer goes out, and only its replay is lost.
    assert answer.status_code == 201
    assert answer.json()["data"] == {"write": 1}
    [logged] = [entry for entry in logs.entries if entry["event"] == "idempotency_store_unavailable"]
    assert logged["operation"] == "settle"
    assert logged["request_id"] == answer.json()["request_id"]
    await store.aclose()


async def test_redis_store_a_claim_that_lands_after_its_timeout_is_freed(own_redis: RedisServer) -> None:
    store = RedisStore.from_url(own_redis.url, timeout=0.2)
    executed: list[bytes] = []
    async with client_for(gateway(store, executed)) as http:
        # A connection and the scripts, ready before the stall.
        await http.post("/orders", content=b"{}", headers={"Idempotency-Key": "warm"})
        # A stall: the server is busy for 0.6 s, then runs the claim the gateway gave up on.
        busy = own_redis.client()
        stall = asyncio.create_task(asyncio.to_thread(busy.execute_command, "DEBUG", "SLEEP", "0.6"))
        await asyncio.sleep(0.05)
        first = await http.post("/orders", content=b"{}", headers={"Idempotency-Key": "k"})
        await stall
        await asyncio.sleep(0.5)  # the late claim has landed, and been released by its token
        retry = await http.post("/orders", content=b"{}", headers={"Idempotency-Key": "k"})
    assert first.status_code == 503
    assert retry.status_code == 201, retry.json()
    assert executed == [b"{}", b"{}"]  # "warm", then the retry: the stalled attempt never ran
    await store.aclose()


async def test_redis_store_down_the_late_release_gives_up_with_the_lease() -> None:
    from envelope_middleware.idempotency import _run  # noqa: PLC0415

    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.1)
    async with client_for(gateway(store, [], lease=0.5)) as http:
        answer = await http.post("/orders", content=b"{}", headers={"Idempotency-Key": "k"})
    assert answer.status_code == 503
    assert len(_run._pending) == 1  # the release of the claim that may yet land
    deadline = time.monotonic() + 3
    while _run._pending:
        assert time.monotonic() < deadline, "the release outlived the lease"
        await asyncio.sleep(0.05)
    await store.aclose()
