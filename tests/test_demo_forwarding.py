"""The gateway's backend call over real HTTP, either client: what a backend's answer may and may not do."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from envelope_middleware.demo import CREDENTIALS, create_backends, create_gateway
from tests._server import serve

FULL = (CREDENTIALS[0].partner_key, CREDENTIALS[0].secret)


@pytest.fixture(params=["aiohttp", "httpx2"])
def http_client(request: pytest.FixtureRequest) -> str:
    """Each test runs with both of the gateway's HTTP clients: what one refuses, the other must too."""
    return str(request.param)


def gateway_with_orders(orders: Any, http_client: Any, *, prefix: str = "") -> Any:
    """A TestClient on a gateway whose orders service is `orders`, served over HTTP."""
    stack = ExitStack()
    url = stack.enter_context(serve(orders)) + prefix
    gateway = create_gateway({**create_backends(), "orders": url}, http_client=http_client)
    client = stack.enter_context(TestClient(gateway))
    stack.callback(client.close)
    return stack, client


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (200, [(b"content-type", b"application/json"), (b"content-type", b"text/html")]),
        (302, [(b"location", b"http://orders-7.internal/"), (b"content-type", b"application/json")]),
    ],
    ids=["two-content-types", "redirect"],
)
def test_forwarding_refuses_answers_a_client_would_read_as_json_or_follow(
    status: int, headers: list[tuple[bytes, bytes]], http_client: str
) -> None:
    requested: list[str] = []

    async def orders(scope: Scope, receive: Receive, send: Send) -> None:
        requested.append(scope["path"])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"orders": []}'})

    stack, client = gateway_with_orders(orders, http_client)
    with stack:
        response = client.get("/orders", auth=FULL)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "downstream_invalid_response"
    assert "location" not in response.headers
    assert requested == ["/orders"]  # the redirect was not followed


def test_forwarding_keeps_a_base_urls_path_prefix(http_client: str) -> None:
    seen: list[tuple[str, bytes]] = []

    async def orders(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope["path"], scope["query_string"]))
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"7")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"detail": "draining"}'})

    stack, client = gateway_with_orders(orders, http_client, prefix="/svc/v2")
    with stack:
        response = client.get("/orders", params={"page": 2, "size": 3}, auth=FULL)
    assert seen == [("/svc/v2/orders", b"page=2&size=3")]
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"]["code"] == "service_unavailable"


def test_forwarding_sends_a_writes_body_as_json_with_the_request_id(http_client: Any) -> None:
    received: list[tuple[dict[bytes, bytes], bytes]] = []

    async def brands(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        received.append((dict(scope["headers"]), message.get("body", b"")))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"id": 3}'})

    with ExitStack() as stack:
        url = stack.enter_context(serve(brands))
        gateway = create_gateway({**create_backends(), "brands": url}, http_client=http_client)
        client = stack.enter_context(TestClient(gateway))
        response = client.patch(
            "/items/3/availability", json={"available": True}, headers={"Idempotency-Key": "k1"}, auth=FULL
        )
    assert response.json()["data"] == {"id": 3}
    [(headers, payload)] = received
    assert orjson.loads(payload) == {"available": True}
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"x-request-id"].decode() == response.headers["x-request-id"]
    assert b"cookie" not in headers


def test_forwarding_relays_an_untyped_error_as_its_status(http_client: str) -> None:
    async def orders(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    stack, client = gateway_with_orders(orders, http_client)
    with stack:
        response = client.get("/orders/ord_00001", auth=FULL)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "resource_not_found"
