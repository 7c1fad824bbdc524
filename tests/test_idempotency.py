"""IdempotencyMiddleware (issue #10): one behaviour suite, run against both stores.

Every test drives a Starlette app the way a gateway mounts it: the envelope
outside, idempotency inside, and handlers that count the writes they execute.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any

import anyio
import httpx2
import orjson
import pytest
import redis.asyncio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Scope
from structlog.testing import LogCapture

from envelope_middleware import (
    ApiError,
    AuthMissing,
    EnvelopeMiddleware,
    IdempotencyKeyConflict,
    IdempotencyMiddleware,
    MemoryStore,
    RateLimited,
    ResourceNotFound,
    StateInvalidTransition,
)
from envelope_middleware.handlers import install_exception_handlers
from envelope_middleware.idempotency import IdempotencyStore
from envelope_middleware.idempotency.redis_store import RedisStore
from tests.conftest import call, make_scope

HEX = re.compile(r"[0-9a-f]{32}")


class Writes:
    """What the app's handlers executed, in order."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Event()  # a handler is held at the gate

    def __len__(self) -> int:
        return len(self.bodies)


def partner_of(scope: Scope) -> str:
    """The demo's principal: an `X-Partner` header; none is a 401 before any store call."""
    for name, value in scope["headers"]:
        if name == b"x-partner":
            return str(value.decode())
    raise AuthMissing


def build_app(store: IdempotencyStore, writes: Writes, **options: Any) -> Starlette:
    async def create(request: Request) -> Response:
        body = await request.body()
        if writes.gate is not None:
            writes.arrived.set()
            await writes.gate.wait()
        writes.bodies.append(body)
        document = orjson.loads(body) if body else {}
        status = int(request.query_params.get("status", "201"))
        if request.query_params.get("raise") == "api":
            raise {422: StateInvalidTransition, 404: ResourceNotFound, 429: RateLimited}[status]
        if request.query_params.get("raise") == "http":
            raise HTTPException(status, detail="not here")
        if request.query_params.get("raise") == "crash":
            raise RuntimeError("db-7.internal refused")
        if request.query_params.get("size"):
            return Response(
                b'"' + b"x" * int(request.query_params["size"]) + b'"', media_type="application/json"
            )
        return JSONResponse(
            {"write": len(writes), "order": document.get("order")},
            status_code=status,
            headers={"Location": f"/orders/{len(writes)}", "Set-Cookie": "s=1"},
        )

    async def stream(request: Request) -> Response:
        writes.bodies.append(await request.body())

        async def chunks() -> AsyncIterator[bytes]:
            for part in (b'{"write": ', str(len(writes)).encode(), b"}"):
                yield part

        return StreamingResponse(chunks(), media_type="application/json")

    async def read(request: Request) -> Response:
        writes.bodies.append(b"")
        return JSONResponse({"read": len(writes)})

    options.setdefault("principal", partner_of)
    return Starlette(
        routes=[
            Route("/orders", create, methods=["POST", "PUT", "DELETE"]),
            Route("/orders/{order_id}", create, methods=["PATCH"]),
            Route("/stream", stream, methods=["POST"]),
            Route("/read", read, methods=["GET", "POST"]),
        ],
        middleware=[
            Middleware(EnvelopeMiddleware),
            Middleware(IdempotencyMiddleware, store=store, **options),
        ],
    )


def enveloped(write: Any, store: IdempotencyStore, **options: Any) -> Starlette:
    """`POST /orders` answered by `write`, mounted as a gateway would mount it."""
    return Starlette(
        routes=[Route("/orders", write, methods=["POST"])],
        middleware=[
            Middleware(EnvelopeMiddleware),
            Middleware(IdempotencyMiddleware, store=store, principal=partner_of, **options),
        ],
    )


@pytest.fixture
def writes() -> Writes:
    return Writes()


Client = Callable[..., Any]


@pytest.fixture
def client(store: IdempotencyStore, writes: Writes) -> Callable[..., httpx2.AsyncClient]:
    def make(**options: Any) -> httpx2.AsyncClient:
        app = build_app(store, writes, **options)
        return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway")

    return make


def keyed(key: str = "key-1", partner: str = "acme", **extra: str) -> dict[str, str]:
    return {"Idempotency-Key": key, "X-Partner": partner, "Content-Type": "application/json", **extra}


async def stored_count(store: IdempotencyStore) -> int:
    if isinstance(store, MemoryStore):
        return len(store)
    assert isinstance(store, RedisStore)
    client: redis.asyncio.Redis = store.client
    return len(await client.keys("*"))


# -- the exchange a partner sees ---------------------------------------------


async def test_idempotency_retry_replays_the_first_answer_without_running_again(
    client: Any, writes: Writes
) -> None:
    async with client() as http:
        first = await http.post("/orders", content=b'{"order": 7}', headers=keyed())
        retry = await http.post("/orders", content=b'{"order": 7}', headers=keyed())
    assert len(writes) == 1
    assert first.status_code == retry.status_code == 201
    first_doc, retry_doc = first.json(), retry.json()
    # data byte-identical: the same bytes after the same envelope prefix
    assert first.content.split(b'"data":', 1)[1] == retry.content.split(b'"data":', 1)[1]
    assert first_doc["data"] == {"write": 1, "order": 7}
    assert HEX.fullmatch(retry_doc["request_id"])
    assert retry_doc["request_id"] != first_doc["request_id"]
    assert retry.headers["x-request-id"] == retry_doc["request_id"]
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.headers["original-request-id"] == first_doc["request_id"]
    assert "idempotent-replayed" not in first.headers
    # The headers that describe the answer come back; the exchange's own do not.
    assert retry.headers["location"] == first.headers["location"] == "/orders/1"
    assert "set-cookie" in first.headers
    assert "set-cookie" not in retry.headers


async def test_idempotency_replay_of_a_body_that_is_not_json_is_a_502_marked_as_a_replay(
    store: IdempotencyStore, writes: Writes
) -> None:
    async def write(request: Request) -> Response:
        writes.bodies.append(await request.body())
        return Response(b'{"order": ', media_type="application/json")  # cut short by the service

    app = enveloped(write, store)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway") as http:
        first = await http.post("/orders", content=b"{}", headers=keyed())
        retry = await http.post("/orders", content=b"{}", headers=keyed())
    assert len(writes) == 1
    assert first.status_code == retry.status_code == 502
    assert retry.json()["error"]["code"] == "downstream_invalid_response"
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.headers["original-request-id"] == first.json()["request_id"]


async def test_idempotency_replay_log_line_carries_both_ids(client: Any, logs: LogCapture) -> None:
    async with client() as http:
        first = await http.post("/orders", content=b"{}", headers=keyed())
        retry = await http.post("/orders", content=b"{}", headers=keyed())
    [replay] = [entry for entry in logs.entries if entry["event"] == "idempotent_replay"]
    assert replay["request_id"] == retry.json()["request_id"]
    assert replay["original_request_id"] == first.json()["request_id"]


async def test_idempotency_same_key_different_body_is_a_conflict_naming_the_part(
    client: Any, writes: Writes
) -> None:
    async with client() as http:
        await http.post("/orders", content=b'{"order": 1}', headers=keyed())
        other = await http.post("/orders", content=b'{"order": 2}', headers=keyed())
    assert len(writes) == 1
    assert other.status_code == 409
    error = other.json()["error"]
    assert error["code"] == "idempotency_key_conflict"
    assert error["details"] == {"reason": "request_mismatch", "differs": ["body"]}
    assert b"order" not in other.content  # nothing stored is shown


@pytest.mark.parametrize(
    ("method", "path", "differs"),
    [
        ("PUT", "/orders", ["method"]),
        ("POST", "/orders?dry=1", ["query"]),
        ("PATCH", "/orders/9", ["method", "path"]),
    ],
)
async def test_idempotency_same_key_other_method_path_or_query_is_a_conflict(
    client: Any, writes: Writes, method: str, path: str, differs: list[str]
) -> None:
    async with client() as http:
        await http.post("/orders", content=b"{}", headers=keyed())
        other = await http.request(method, path, content=b"{}", headers=keyed())
    assert len(writes) == 1
    assert other.status_code == 409
    assert other.json()["error"]["details"] == {"reason": "request_mismatch", "differs": differs}


async def test_idempotency_json_bodies_are_compared_as_bytes(client: Any, writes: Writes) -> None:
    async with client() as http:
        await http.post("/orders", content=b'{"a": 1, "b": 2}', headers=keyed())
        reordered = await http.post("/orders", content=b'{"b": 2, "a": 1}', headers=keyed())
    assert reordered.status_code == 409
    assert len(writes) == 1


async def test_idempotency_in_flight_key_is_409_in_progress_with_retry_after(
    client: Any, writes: Writes
) -> None:
    writes.gate = asyncio.Event()
    async with client() as http:
        first = asyncio.create_task(http.post("/orders", content=b"{}", headers=keyed()))
        await _held_at_gate(writes)
        during = await http.post("/orders", content=b"{}", headers=keyed())
        writes.gate.set()
        done = await first
        after = await http.post("/orders", content=b"{}", headers=keyed())
    assert during.status_code == 409
    assert during.json()["error"]["details"] == {"reason": "in_progress"}
    assert during.headers["retry-after"] == "1"
    assert done.status_code == 201
    assert after.headers["idempotent-replayed"] == "true"
    assert len(writes) == 1


async def _held_at_gate(writes: Writes) -> None:
    await writes.arrived.wait()


async def test_idempotency_concurrent_identical_writes_run_once(client: Any, writes: Writes) -> None:
    async with client() as http:
        answers = await asyncio.gather(
            *(http.post("/orders", content=b'{"order": 1}', headers=keyed()) for _ in range(20))
        )
    assert len(writes) == 1
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses.count(201) >= 1
    assert set(statuses) <= {201, 409}
    for answer in answers:
        if answer.status_code == 409:
            assert answer.json()["error"]["details"] == {"reason": "in_progress"}


async def test_idempotency_missing_key_on_a_required_write_is_400(client: Any, writes: Writes) -> None:
    async with client(require_key=True) as http:
        missing = await http.post("/orders", content=b"{}", headers={"X-Partner": "acme"})
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "request_missing_idempotency_key"
    assert missing.json()["error"]["details"] == {"header": "Idempotency-Key"}
    assert len(writes) == 0


async def test_idempotency_require_key_may_be_decided_per_request(client: Any, writes: Writes) -> None:
    def only_orders(scope: Scope) -> bool:
        return bool(scope["path"].startswith("/orders"))

    async with client(require_key=only_orders) as http:
        refused = await http.post("/orders", content=b"{}", headers={"X-Partner": "acme"})
        allowed = await http.post("/read", content=b"{}", headers={"X-Partner": "acme"})
    assert refused.status_code == 400
    assert allowed.status_code == 200


async def test_idempotency_writes_without_a_key_run_each_time_unless_required(
    client: Any, writes: Writes
) -> None:
    async with client() as http:
        for _ in range(2):
            answer = await http.post("/orders", content=b"{}", headers={"X-Partner": "acme"})
            assert answer.status_code == 201
    assert len(writes) == 2


@pytest.mark.parametrize(
    "value",
    [b"", b" ", b"k" * 65, b"key\x01", "ключ".encode(), b"two words"],
    ids=["empty", "blank", "65-chars", "control", "non-ascii", "space-inside"],
)
async def test_idempotency_malformed_key_is_request_invalid_naming_the_header(
    client: Any, writes: Writes, store: IdempotencyStore, logs: LogCapture, value: bytes
) -> None:
    async with client() as http:
        answer = await http.post(
            "/orders", content=b"{}", headers=[(b"idempotency-key", value), (b"x-partner", b"acme")]
        )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "request_invalid"
    assert error["details"]["errors"][0]["field"] == "Idempotency-Key"
    assert error["details"]["errors"][0]["location"] == "header"
    if value.strip():
        assert value not in answer.content
        assert all(value.decode("latin-1") not in repr(entry) for entry in logs.entries)
    assert len(writes) == 0
    assert await stored_count(store) == 0


async def test_idempotency_two_key_headers_are_request_invalid(client: Any, writes: Writes) -> None:
    async with client() as http:
        answer = await http.post(
            "/orders",
            content=b"{}",
            headers=[(b"idempotency-key", b"a"), (b"idempotency-key", b"a"), (b"x-partner", b"acme")],
        )
    assert answer.status_code == 400
    assert answer.json()["error"]["details"]["errors"][0]["message"] == "must be sent once"
    assert len(writes) == 0


async def test_idempotency_a_64_character_key_with_padding_is_accepted(client: Any, writes: Writes) -> None:
    key = "k" * 64
    async with client() as http:
        first = await http.post("/orders", content=b"{}", headers=keyed(f" {key}\t"))
        retry = await http.post("/orders", content=b"{}", headers=keyed(key))
    assert first.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert len(writes) == 1


async def test_idempotency_reads_ignore_the_header(client: Any, writes: Writes) -> None:
    async with client() as http:
        for _ in range(2):
            answer = await http.get("/read", headers=keyed())
            assert "idempotent-replayed" not in answer.headers
    assert len(writes) == 2


async def test_idempotency_methods_are_configurable(client: Any, writes: Writes) -> None:
    async with client(methods=["put"]) as http:
        for _ in range(2):
            await http.post("/orders", content=b"{}", headers=keyed())
        for _ in range(2):
            await http.put("/orders", content=b"{}", headers=keyed())
    assert len(writes) == 3  # two POSTs, one PUT


# -- scoped to the caller ----------------------------------------------------


async def test_idempotency_two_partners_with_one_key_never_see_each_other(
    client: Any, writes: Writes
) -> None:
    async with client() as http:
        acme = await http.post("/orders", content=b'{"order": 1}', headers=keyed(partner="acme"))
        globex = await http.post("/orders", content=b'{"order": 2}', headers=keyed(partner="globex"))
        acme_again = await http.post("/orders", content=b'{"order": 1}', headers=keyed(partner="acme"))
        globex_again = await http.post("/orders", content=b'{"order": 2}', headers=keyed(partner="globex"))
    assert len(writes) == 2
    assert acme.json()["data"] == acme_again.json()["data"] == {"write": 1, "order": 1}
    assert globex.json()["data"] == globex_again.json()["data"] == {"write": 2, "order": 2}
    assert globex.status_code == 201
    assert "idempotent-replayed" not in globex.headers


async def test_idempotency_failed_authentication_never_touches_the_store(
    client: Any, writes: Writes, store: IdempotencyStore
) -> None:
    async with client(require_key=True) as http:
        answer = await http.post("/orders", content=b"{}", headers={"Idempotency-Key": "k"})
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "auth_missing"
    assert await stored_count(store) == 0
    assert len(writes) == 0


async def test_idempotency_no_principal_passes_the_request_on_untouched(
    client: Any, writes: Writes, store: IdempotencyStore
) -> None:
    async with client(principal=lambda _scope: None, require_key=True) as http:
        for _ in range(2):
            assert (await http.post("/orders", content=b"{}", headers=keyed())).status_code == 201
    assert len(writes) == 2
    assert await stored_count(store) == 0


async def test_idempotency_principal_may_be_async(client: Any, writes: Writes) -> None:
    async def principal(scope: Scope) -> str:
        await asyncio.sleep(0)
        return partner_of(scope)

    async with client(principal=principal) as http:
        await http.post("/orders", content=b"{}", headers=keyed())
        retry = await http.post("/orders", content=b"{}", headers=keyed())
    assert retry.headers["idempotent-replayed"] == "true"
    assert len(writes) == 1


async def test_idempotency_principal_that_is_no_str_is_a_500(client: Any, writes: Writes) -> None:
    async with client(principal=lambda _scope: 42) as http:
        answer = await http.post("/orders", content=b"{}", headers=keyed())
    assert answer.status_code == 500
    assert len(writes) == 0


# -- what is recorded ----------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("status=200", 200),
        ("status=201", 201),
        ("status=400", 400),
        ("status=404", 404),
        ("status=422", 422),
        ("raise=api&status=422", 422),
        ("raise=api&status=404", 404),
        ("raise=http&status=404", 404),
    ],
)
async def test_idempotency_answers_that_depend_on_the_request_are_recorded(
    client: Any, writes: Writes, query: str, status: int
) -> None:
    async with client() as http:
        first = await http.post(f"/orders?{query}", content=b"{}", headers=keyed())
        retry = await http.post(f"/orders?{query}", content=b"{}", headers=keyed())
    assert len(writes) == 1
    assert first.status_code == retry.status_code == status
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.headers["original-request-id"] == first.headers["x-request-id"]
    first_doc, retry_doc = first.json(), retry.json()
    assert first_doc.keys() == retry_doc.keys()
    if "error" in first_doc:
        assert first_doc["error"] == retry_doc["error"]


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("status=401", 401),
        ("status=403", 403),
        ("status=429", 429),
        ("raise=api&status=429", 429),
        ("status=500", 500),
        ("status=502", 502),
        ("status=503", 503),
        ("raise=crash", 500),
    ],
)
async def test_idempotency_answers_that_ran_nothing_or_failed_free_the_key(
    client: Any, writes: Writes, store: IdempotencyStore, query: str, status: int
) -> None:
    async with client() as http:
        first = await http.post(f"/orders?{query}", content=b"{}", headers=keyed())
        retry = await http.post(f"/orders?{query}", content=b"{}", headers=keyed())
    assert first.status_code == retry.status_code == status
    assert "idempotent-replayed" not in retry.headers
    assert len(writes) == 2
    assert await stored_count(store) == 0
    assert b"db-7" not in first.content


async def test_idempotency_an_answer_with_an_http_status_member_is_recorded(
    store: IdempotencyStore, writes: Writes
) -> None:
    # ASGI says int; HTTPStatus is one, and the envelope takes it: so does the record.
    async def create(request: Request) -> Response:
        writes.bodies.append(await request.body())
        return JSONResponse({"write": len(writes)}, status_code=HTTPStatus.CREATED)

    transport = httpx2.ASGITransport(app=enveloped(create, store))
    async with httpx2.AsyncClient(transport=transport, base_url="http://gateway") as http:
        first = await http.post("/orders", content=b"{}", headers=keyed())
        retry = await http.post("/orders", content=b"{}", headers=keyed())
    assert len(writes) == 1
    assert first.status_code == retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["data"] == first.json()["data"] == {"write": 1}


async def test_idempotency_a_failed_first_attempt_lets_the_retry_run(client: Any, writes: Writes) -> None:
    async with client() as http:
        failed = await http.post("/orders?raise=crash", content=b"{}", headers=keyed())
        # The same key, the same request: the partner retries a 500 as told.
        writes_before = len(writes)
        retried = await http.post("/orders?raise=crash", content=b"{}", headers=keyed())
    assert failed.status_code == retried.status_code == 500
    assert len(writes) == writes_before + 1


async def test_idempotency_streamed_answers_are_recorded_whole(client: Any, writes: Writes) -> None:
    async with client() as http:
        first = await http.post("/stream", content=b"{}", headers=keyed())
        retry = await http.post("/stream", content=b"{}", headers=keyed())
    assert first.json()["data"] == retry.json()["data"] == {"write": 1}
    assert len(writes) == 1


async def test_idempotency_answer_over_the_record_limit_keeps_its_key_used(
    client: Any, writes: Writes
) -> None:
    async with client(max_response_size=100) as http:
        first = await http.post("/orders?size=200", content=b"{}", headers=keyed())
        retry = await http.post("/orders?size=200", content=b"{}", headers=keyed())
        small = await http.post("/orders?size=50", content=b"{}", headers=keyed("key-2"))
        small_retry = await http.post("/orders?size=50", content=b"{}", headers=keyed("key-2"))
    assert first.status_code == 200
    assert len(first.json()["data"]) == 200
    assert retry.status_code == 409
    assert retry.json()["error"]["details"] == {"reason": "response_not_recorded"}
    assert retry.headers["original-request-id"] == first.headers["x-request-id"]
    assert small_retry.json()["data"] == small.json()["data"]
    assert len(writes) == 2


async def test_idempotency_request_body_is_bounded(
    client: Any, writes: Writes, store: IdempotencyStore
) -> None:
    async with client(max_body_size=10) as http:
        declared = await http.post("/orders", content=b"x" * 11, headers=keyed())

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"xxxxx"

        streamed = await http.post("/orders", content=chunks(), headers=keyed())
    for answer in (declared, streamed):
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "request_invalid"
        assert answer.json()["error"]["details"] == {"max_bytes": 10}
    assert len(writes) == 0
    assert await stored_count(store) == 0


async def test_idempotency_app_reads_the_body_it_was_fingerprinted_by(client: Any, writes: Writes) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"order"'
        yield b": 5}"

    async with client() as http:
        answer = await http.post("/orders", content=chunks(), headers=keyed())
    assert writes.bodies == [b'{"order": 5}']
    assert answer.json()["data"]["order"] == 5


async def test_idempotency_records_expire_after_their_ttl(client: Any, writes: Writes) -> None:
    async with client(ttl=0.2) as http:
        await http.post("/orders", content=b"{}", headers=keyed())
        await asyncio.sleep(0.3)
        again = await http.post("/orders", content=b"{}", headers=keyed())
    assert again.status_code == 201
    assert "idempotent-replayed" not in again.headers
    assert len(writes) == 2


async def test_idempotency_a_claim_whose_holder_died_expires_with_its_lease(
    client: Any, writes: Writes, store: IdempotencyStore
) -> None:
    async with client(lease=0.3) as http:
        # A worker that claimed the key and was killed: its claim, and nothing more.
        writes.gate = asyncio.Event()
        first = asyncio.create_task(http.post("/orders", content=b"{}", headers=keyed()))
        await _held_at_gate(writes)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        writes.gate = None
        # A cancelled request frees its key at once; a killed one cannot, so
        # claim again under another token, as the dead worker left it.
        await store.claim(_operation("acme", "key-1"), "dead-worker", _fingerprint(b"{}"), 0.3)
        during = await http.post("/orders", content=b"{}", headers=keyed())
        await asyncio.sleep(0.35)
        after = await http.post("/orders", content=b"{}", headers=keyed())
    assert during.status_code == 409
    assert during.json()["error"]["details"]["reason"] == "in_progress"
    assert after.status_code == 201
    assert len(writes) == 1


def _operation(partner: str, key: str) -> str:
    from envelope_middleware.idempotency._record import operation_key  # noqa: PLC0415

    return operation_key(partner, key)


def _fingerprint(body: bytes, method: str = "POST", path: bytes = b"/orders") -> bytes:
    from envelope_middleware.idempotency._record import fingerprint  # noqa: PLC0415

    return fingerprint(method, path, b"", body)


async def test_idempotency_handed_over_exceptions_replay_with_their_code(
    store: IdempotencyStore, writes: Writes
) -> None:
    async def create(request: Request) -> Response:
        writes.bodies.append(await request.body())
        raise StateInvalidTransition("Archived.", details={"from": "archived"})

    inner = Starlette(routes=[Route("/orders", create, methods=["POST"])])
    install_exception_handlers(inner)
    app = Starlette(
        routes=[],
        middleware=[
            Middleware(EnvelopeMiddleware),
            Middleware(IdempotencyMiddleware, store=store, principal=partner_of),
        ],
    )
    app.mount("/v2", inner)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway") as http:
        first = await http.post("/v2/orders", content=b"{}", headers=keyed())
        retry = await http.post("/v2/orders", content=b"{}", headers=keyed())
    assert first.status_code == retry.status_code == 422
    assert first.json()["error"] == retry.json()["error"]
    assert retry.json()["error"] == {
        "code": "state_invalid_transition",
        "message": "Archived.",
        "details": {"from": "archived"},
    }
    assert len(writes) == 1


async def test_idempotency_a_client_that_left_before_the_answer_gets_it_on_retry(
    store: IdempotencyStore, writes: Writes
) -> None:
    app = build_app(store, writes)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def gone(message: dict[str, Any]) -> None:
        raise OSError("connection reset")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/orders",
        "raw_path": b"/orders",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"idempotency-key", b"key-1"), (b"x-partner", b"acme")],
        "client": ("127.0.0.1", 5000),
        "server": ("gateway", 80),
    }
    await app(scope, receive, gone)  # type: ignore[arg-type]
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway") as http:
        retry = await http.post("/orders", content=b"{}", headers=keyed())
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert len(writes) == 1


# -- the protocol's edges, driven as a server would ---------------------------------


def raw_app(*messages: dict[str, Any], writes: Writes) -> Any:
    """An ASGI app that records its execution and sends exactly `messages`."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        writes.bodies.append(b"")
        for message in messages:
            await send(dict(message))

    return app


def standalone(app: Any, store: IdempotencyStore, **options: Any) -> IdempotencyMiddleware:
    """The middleware with no envelope around it: its errors are raised to the caller."""
    return IdempotencyMiddleware(app, store=store, principal=lambda _scope: "acme", **options)


KEYED = [("idempotency-key", "k"), ("content-type", "application/json")]
START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}


async def test_idempotency_standalone_replays_without_an_original_request_id(
    store: IdempotencyStore, writes: Writes
) -> None:
    app = standalone(raw_app(START, {"type": "http.response.body", "body": b"{}"}, writes=writes), store)
    first = await call(app, "POST", "/w", KEYED)
    replay = await call(app, "POST", "/w", KEYED)
    assert replay.status == first.status == 200
    assert replay.body == b"{}"
    assert replay.header("idempotent-replayed") == "true"
    assert replay.header("original-request-id") is None  # no envelope: no request id to name
    assert replay.header("content-length") == "2"
    assert len(writes) == 1


@pytest.mark.parametrize(
    "messages",
    [
        [
            {**START, "trailers": True},
            {"type": "http.response.body", "body": b"{}", "more_body": True},
            {"type": "http.response.body", "body": b"", "more_body": False},
            {"type": "http.response.trailers", "headers": [], "more_trailers": False},
        ],
        [START, {"type": "http.response.pathsend", "path": "/srv/answer.json"}],
        [START, {"type": "http.response.zerocopysend", "file": 3, "more_body": False}],
    ],
    ids=["trailers", "pathsend", "zerocopysend"],
)
async def test_idempotency_answers_that_cannot_be_kept_still_use_their_key(
    store: IdempotencyStore, writes: Writes, messages: list[dict[str, Any]]
) -> None:
    app = standalone(raw_app(*messages, writes=writes), store)
    first = await call(app, "POST", "/w", KEYED)
    assert first.messages[-1]["type"] == messages[-1]["type"]
    with pytest.raises(IdempotencyKeyConflict) as retry:
        await call(app, "POST", "/w", KEYED)
    assert retry.value.details == {"reason": "response_not_recorded"}
    assert len(writes) == 1


async def test_idempotency_an_answer_cut_short_keeps_its_key_used(
    store: IdempotencyStore, writes: Writes
) -> None:
    # The app answered, so the write ran: a retry is told so rather than run again.
    app = standalone(
        raw_app(START, {"type": "http.response.body", "body": b"{", "more_body": True}, writes=writes), store
    )
    await call(app, "POST", "/w", KEYED)
    with pytest.raises(IdempotencyKeyConflict) as retry:
        await call(app, "POST", "/w", KEYED)
    assert retry.value.details == {"reason": "response_not_recorded"}
    assert len(writes) == 1


@pytest.mark.parametrize("status", [204, 303])
async def test_idempotency_a_client_gone_before_a_passed_through_answer_keeps_the_key_used(
    store: IdempotencyStore, writes: Writes, status: int
) -> None:
    async def write(request: Request) -> Response:
        writes.bodies.append(await request.body())
        return Response(status_code=status, headers={"Location": "/orders/1"} if status == 303 else None)

    app = enveloped(write, store)
    scope = make_scope("POST", "/orders", [("idempotency-key", "k"), ("x-partner", "acme")])

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def gone(message: Message) -> None:
        raise OSError("connection reset")  # an ASGI 2.4 server whose client left

    await app(scope, receive, gone)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway") as http:
        retry = await http.post("/orders", content=b"{}", headers=keyed("k"))
    assert retry.status_code == 409
    assert retry.json()["error"]["details"] == {"reason": "response_not_recorded"}
    assert len(writes) == 1


async def test_idempotency_a_stream_the_client_left_keeps_the_key_used(
    store: IdempotencyStore, writes: Writes
) -> None:
    async def write(request: Request) -> Response:
        writes.bodies.append(await request.body())

        async def slow() -> AsyncIterator[bytes]:
            yield b'{"rows": ['
            await asyncio.sleep(10)  # Starlette stops the stream when the client leaves
            yield b"]}"

        return StreamingResponse(slow(), media_type="application/json")

    app = enveloped(write, store)
    scope = make_scope("POST", "/orders", [("idempotency-key", "k"), ("x-partner", "acme")])
    scope["asgi"]["spec_version"] = "2.3"  # uvicorn's: Starlette listens for the disconnect
    messages: list[Message] = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    await app(scope, receive, send)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway") as http:
        retry = await http.post("/orders", content=b"{}", headers=keyed("k"))
    assert retry.status_code == 409
    assert retry.json()["error"]["details"] == {"reason": "response_not_recorded"}
    assert len(writes) == 1


async def test_idempotency_a_failing_background_task_keeps_an_unrecorded_answers_key(
    store: IdempotencyStore, writes: Writes
) -> None:
    async def fail() -> None:
        raise RuntimeError("audit log down")

    async def write(request: Request) -> Response:
        writes.bodies.append(await request.body())
        return JSONResponse(["x" * 200], background=BackgroundTask(fail))

    app = enveloped(write, store, max_response_size=100)
    async with httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://gateway"
    ) as http:
        first = await http.post("/orders", content=b"{}", headers=keyed("k"))
        retry = await http.post("/orders", content=b"{}", headers=keyed("k"))
    assert first.status_code == 200
    assert retry.status_code == 409
    assert retry.json()["error"]["details"] == {"reason": "response_not_recorded"}
    assert len(writes) == 1


async def test_idempotency_a_write_cut_off_by_a_deadline_frees_its_key(
    store: IdempotencyStore, writes: Writes, request: pytest.FixtureRequest
) -> None:
    writes.gate = asyncio.Event()  # never opened: the write is slow
    inner = build_app(store, writes)

    async def deadline(scope: Scope, receive: Any, send: Any) -> None:
        # A request-timeout middleware written with anyio, around the app.
        with anyio.move_on_after(0.05):
            await inner(scope, receive, send)

    for attempt in range(5):
        if isinstance(store, RedisStore):
            # As after a Redis restart: the release script must be loaded first,
            # one more await for a cancellation to land on.
            request.getfixturevalue("redis_server").client().script_flush()
        await call(deadline, "POST", "/orders", [("idempotency-key", f"k{attempt}"), ("x-partner", "acme")])
    assert await stored_count(store) == 0


async def test_idempotency_memoryview_header_names_are_recorded(
    store: IdempotencyStore, writes: Writes
) -> None:
    start = {
        **START,
        "headers": [(memoryview(b"content-type"), b"application/json"), (memoryview(b"date"), b"x")],
    }
    app = standalone(raw_app(start, {"type": "http.response.body", "body": b"{}"}, writes=writes), store)
    await call(app, "POST", "/w", KEYED)
    replay = await call(app, "POST", "/w", KEYED)
    assert replay.header("content-type") == "application/json"
    assert replay.header("date") is None
    assert len(writes) == 1


async def test_idempotency_only_the_first_last_body_is_recorded(
    store: IdempotencyStore, writes: Writes
) -> None:
    # An app that sends a second last body breaks ASGI; the record keeps the first.
    app = standalone(
        raw_app(
            START,
            {"type": "http.response.body", "body": b'"first"'},
            {"type": "http.response.body", "body": b'"second"'},
            writes=writes,
        ),
        store,
    )
    await call(app, "POST", "/w", KEYED)
    replay = await call(app, "POST", "/w", KEYED)
    assert replay.body == b'"first"'


async def test_idempotency_a_body_without_a_start_is_passed_on_unrecorded(
    store: IdempotencyStore, writes: Writes
) -> None:
    app = standalone(raw_app({"type": "http.response.body", "body": b"x"}, writes=writes), store)
    await call(app, "POST", "/w", KEYED)
    await call(app, "POST", "/w", KEYED)
    assert len(writes) == 2  # no answer was started: nothing is known to have run, the key was freed


async def test_idempotency_a_client_that_leaves_while_sending_the_body_runs_nothing(
    store: IdempotencyStore, writes: Writes, logs: LogCapture
) -> None:
    app = build_app(store, writes)
    scope = make_scope("POST", "/orders", [("idempotency-key", "k"), ("x-partner", "acme")])
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent == []
    assert [entry["event"] for entry in logs.entries if entry["log_level"] == "warning"] == [
        "client_disconnected"
    ]
    assert len(writes) == 0
    assert await stored_count(store) == 0


@pytest.mark.parametrize("declared", [b"12x", b""])
async def test_idempotency_a_content_length_that_is_no_number_is_bounded_by_the_body(
    store: IdempotencyStore, writes: Writes, declared: bytes
) -> None:
    app = standalone(
        raw_app(START, {"type": "http.response.body", "body": b"{}"}, writes=writes), store, max_body_size=4
    )
    small = await call(app, "POST", "/w", [*KEYED, ("content-length", declared)], body=b"{}")
    assert small.status == 200
    with pytest.raises(ApiError) as large:
        await call(app, "POST", "/w", [("idempotency-key", "j"), ("content-length", declared)], body=b"12345")
    assert large.value.status == 413


async def test_idempotency_a_claim_lost_to_an_expired_lease_is_logged_and_answered(
    store: IdempotencyStore, logs: LogCapture
) -> None:
    runs = 0

    async def slow_first(scope: Scope, receive: Any, send: Any) -> None:
        nonlocal runs
        await receive()
        runs += 1
        run = runs
        if run == 1:
            await asyncio.sleep(0.3)  # past its lease: another request took the key meanwhile
        await send(START)
        await send({"type": "http.response.body", "body": str(run).encode()})

    app = standalone(slow_first, store, lease=0.1)
    first = asyncio.create_task(call(app, "POST", "/w", KEYED))
    await asyncio.sleep(0.15)
    second = await call(app, "POST", "/w", KEYED)
    late = await first
    replay = await call(app, "POST", "/w", KEYED)
    assert (late.body, second.body, replay.body) == (b"1", b"2", b"2")
    assert "idempotency_claim_lost" in [entry["event"] for entry in logs.entries]


async def test_idempotency_recorded_exceptions_keep_their_headers_and_odd_details(
    store: IdempotencyStore, writes: Writes
) -> None:
    async def create(request: Request) -> Response:
        writes.bodies.append(await request.body())
        kind = request.query_params["kind"]
        if kind == "http":
            raise HTTPException(404, detail="No such order.", headers={"X-Hint": "check the id"})
        if kind == "http-500":
            raise HTTPException(500)
        if kind == "pairs":
            error = StateInvalidTransition()
            error.headers = [("X-Hint", "as pairs")]  # type: ignore[assignment]  # as a subclass may hold them
            raise error
        # Numbers are written out and what is no header dropped, as without a key.
        odd: dict[str, Any] = {"X-Retry-Hint": 5, "X-Ratio": 0.5, "X-None": None, "X-Latin": "café"}
        raise StateInvalidTransition(details={"big": 2**70}, headers={"X-Hint": "archived", **odd})

    # Inside the route, as the reference gateway mounts it: an HTTPException
    # passes through the middleware before Starlette's own handler renders it.
    route = Route(
        "/orders",
        create,
        methods=["POST"],
        middleware=[Middleware(IdempotencyMiddleware, store=store, principal=partner_of)],
    )
    app = Starlette(routes=[route], middleware=[Middleware(EnvelopeMiddleware)])
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway") as http:
        answers = {
            kind: [
                await http.post(f"/orders?kind={kind}", content=b"{}", headers=keyed(kind)) for _ in range(2)
            ]
            for kind in ("http", "api", "http-500", "pairs")
        }
    first, replay = answers["http"]
    assert first.status_code == replay.status_code == 404
    assert first.json()["error"] == replay.json()["error"]
    assert replay.json()["error"]["message"] == "No such order."
    assert replay.headers["x-hint"] == "check the id"
    assert replay.headers["idempotent-replayed"] == "true"
    first, replay = answers["api"]
    assert first.status_code == replay.status_code == 422
    assert replay.headers["x-hint"] == "archived"
    for answer in (first, replay):
        assert (answer.headers["x-retry-hint"], answer.headers["x-ratio"]) == ("5", "0.5")
        assert "x-none" not in answer.headers
        assert dict(answer.headers.raw)[b"x-latin"] == "café".encode("latin-1")
    assert replay.json()["error"]["code"] == "state_invalid_transition"
    assert replay.json()["error"]["details"] == {}  # a number JSON cannot carry is not kept
    assert [answer.status_code for answer in answers["http-500"]] == [500, 500]
    first, replay = answers["pairs"]
    assert first.status_code == replay.status_code == 422
    assert first.headers["x-hint"] == replay.headers["x-hint"] == "as pairs"
    assert replay.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in answers["http-500"][1].headers
    assert len(writes) == 5  # http once, api once, http-500 twice, pairs once


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"principal": "acme"}, TypeError),
        ({"ttl": 0}, ValueError),
        ({"lease": float("inf")}, ValueError),
        ({"lease": True}, ValueError),
        ({"ttl": "60"}, ValueError),
        ({"max_body_size": -1}, ValueError),
        ({"max_response_size": 1.5}, ValueError),
        ({"header": "Idempotency Key"}, ValueError),
        ({"header": ""}, ValueError),
    ],
)
def test_idempotency_options_are_checked_when_built(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        IdempotencyMiddleware(lambda *_: None, **{"principal": partner_of, **options})  # type: ignore[arg-type]
