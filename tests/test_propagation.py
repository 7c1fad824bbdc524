"""The request id travels to backend services on outgoing httpx and httpx2 requests."""

from __future__ import annotations

from typing import Any

import httpx
import httpx2
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from envelope_middleware import (
    EnvelopeMiddleware,
    async_request_id_hook,
    request_id_headers,
    request_id_hook,
)


async def backend_echo(request: Request) -> Response:
    return JSONResponse({"seen": request.headers.get("x-request-id")})


backend = Starlette(routes=[Route("/echo", backend_echo)])


@pytest.mark.parametrize("client_module", [httpx2, httpx], ids=["httpx2", "httpx"])
def test_propagation_async_hook_sends_the_current_id_to_the_backend(client_module: Any) -> None:
    async def gateway_route(request: Request) -> Response:
        transport = client_module.ASGITransport(app=backend)
        async with client_module.AsyncClient(
            transport=transport, base_url="http://orders", event_hooks={"request": [async_request_id_hook]}
        ) as client:
            upstream = await client.get("/echo")
        return Response(upstream.content, media_type="application/json")

    app = Starlette(
        routes=[Route("/", gateway_route)], middleware=[Middleware(EnvelopeMiddleware, access_log=False)]
    )
    with TestClient(app) as client:
        response = client.get("/")
    assert response.json()["data"] == {"seen": response.headers["x-request-id"]}


def test_propagation_sync_hook_sets_the_header_and_is_silent_outside_a_request() -> None:
    request = httpx2.Request("GET", "http://orders/echo")
    request_id_hook(request)
    assert "x-request-id" not in request.headers

    seen: list[str | None] = []

    async def route(request: Request) -> Response:
        outgoing = httpx2.Request("GET", "http://orders/echo", headers={"X-Request-ID": "stale"})
        request_id_hook(outgoing)
        seen.append(outgoing.headers["x-request-id"])
        return Response(status_code=204)

    app = Starlette(routes=[Route("/", route)], middleware=[Middleware(EnvelopeMiddleware, access_log=False)])
    with TestClient(app) as client:
        response = client.get("/")
    assert seen == [response.headers["x-request-id"]]


def test_propagation_headers_helper_for_manual_calls() -> None:
    assert request_id_headers() == {}
    captured: list[dict[str, str]] = []

    async def route(request: Request) -> Response:
        captured.append(request_id_headers("X-Correlation-ID"))
        return Response(status_code=204)

    app = Starlette(routes=[Route("/", route)], middleware=[Middleware(EnvelopeMiddleware, access_log=False)])
    with TestClient(app) as client:
        response = client.get("/")
    assert captured == [{"X-Correlation-ID": response.headers["x-request-id"]}]
