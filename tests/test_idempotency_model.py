"""A hypothesis state machine (issue #10): keyed writes from two partners against a simple model.

The model is a dict from (partner, key) to the first recorded request and its
answer; it shares no code with the package. Each step sends a write through
the envelope and the idempotency middleware and checks the answer, and the
count of executed writes, against it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import orjson
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from envelope_middleware import EnvelopeMiddleware, IdempotencyMiddleware, MemoryStore
from envelope_middleware.idempotency import IdempotencyStore
from envelope_middleware.idempotency.redis_store import RedisStore
from tests._redis import RedisServer

PARTNERS = ("acme", "globex")
KEYS = ("k1", "k2", "k3")
# "fail" makes the service answer 500: nothing recorded, the key free again.
BODIES = (b'{"n": 1}', b'{"n": 2}', b"fail")


def _partner(scope: Scope) -> str:
    return str(dict(scope["headers"])[b"x-partner"].decode())


class KeyedWrites(RuleBasedStateMachine):
    make_store: Any = None  # set per store by the test below

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.store: IdempotencyStore = self.loop.run_until_complete(self._store())
        self.executed = 0
        self.expected_executions = 0  # the model's count: first requests, and failed ones again
        self.model: dict[tuple[str, str], tuple[bytes, Any]] = {}

        async def create(request: Request) -> Response:
            body = await request.body()
            self.executed += 1
            if body == b"fail":
                return JSONResponse({"error": {"code": "internal"}}, status_code=500)
            return JSONResponse({"execution": self.executed, "body": orjson.loads(body)}, status_code=201)

        app = Starlette(
            routes=[Route("/writes", create, methods=["POST"])],
            middleware=[
                Middleware(EnvelopeMiddleware),
                Middleware(IdempotencyMiddleware, store=self.store, principal=_partner),
            ],
        )
        self.http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway")

    async def _store(self) -> IdempotencyStore:
        store: IdempotencyStore = self.make_store()
        return store

    @rule(partner=st.sampled_from(PARTNERS), key=st.sampled_from(KEYS), body=st.sampled_from(BODIES))
    def write(self, partner: str, key: str, body: bytes) -> None:
        executed_before = self.executed
        answer = self.loop.run_until_complete(
            self.http.post("/writes", content=body, headers={"Idempotency-Key": key, "X-Partner": partner})
        )
        document = answer.json()
        recorded = self.model.get((partner, key))
        if recorded is None:
            self.expected_executions += 1
            assert self.executed == executed_before + 1
            assert "idempotent-replayed" not in answer.headers
            if body == b"fail":
                assert answer.status_code == 500
            else:
                assert answer.status_code == 201
                self.model[(partner, key)] = (body, document["data"])
        elif recorded[0] == body:
            assert self.executed == executed_before
            assert answer.status_code == 201
            assert answer.headers["idempotent-replayed"] == "true"
            assert document["data"] == recorded[1]
        else:
            assert self.executed == executed_before
            assert answer.status_code == 409
            assert document["error"]["details"] == {"reason": "request_mismatch", "differs": ["body"]}

    @invariant()
    def the_service_ran_exactly_what_the_model_expects(self) -> None:
        assert self.executed == self.expected_executions

    def teardown(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        if isinstance(self.store, RedisStore):
            self.loop.run_until_complete(self.store.aclose())
        self.loop.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_idempotency_model_keyed_writes_from_two_partners(kind: str, request: pytest.FixtureRequest) -> None:
    if kind == "memory":
        factory: Any = MemoryStore
    else:
        server: RedisServer = request.getfixturevalue("redis_server")

        def factory() -> RedisStore:
            server.client().flushdb()
            return RedisStore.from_url(server.url)

    machine = type(f"KeyedWrites_{kind}", (KeyedWrites,), {"make_store": staticmethod(factory)})
    run_state_machine_as_test(
        machine, settings=settings(max_examples=30, stateful_step_count=25, deadline=None, derandomize=True)
    )
