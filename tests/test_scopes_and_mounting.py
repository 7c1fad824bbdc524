"""Other scopes, the middleware mounted twice, and the middleware in a Starlette app.

From "The contract, response by response":

    `lifespan`, `websocket` scopes
        -> passed through untouched
    the middleware mounted twice
        -> the inner one steps aside: one envelope, one id, and the outer one's options (the
        inner one's `exclude_paths`, header name and modes do not apply)
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from envelope_middleware import EnvelopeMiddleware, get_request_id
from envelope_middleware.middleware import SCOPE_KEY
from tests.conftest import JSON, body, call, envelope, make_scope, scripted, start

pytestmark = pytest.mark.filterwarnings("error")


def test_envelope_lets_websockets_work_in_a_starlette_app() -> None:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", echo)], middleware=[Middleware(EnvelopeMiddleware)])
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        ws.send_text("hi")
        assert ws.receive_text() == "hi"


async def test_envelope_passes_lifespan_and_websocket_scopes_untouched() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    mw = envelope(app)
    for scope_type in ("lifespan", "websocket"):
        scope: Scope = {"type": scope_type, "headers": [], "path": "/"}
        await mw(scope, _never, _nowhere)
        assert seen[-1] is scope
        assert SCOPE_KEY not in scope


async def _never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError  # pragma: no cover


async def _nowhere(message: Message) -> None:
    raise AssertionError(f"nothing should be sent: {message}")  # pragma: no cover


async def test_envelope_mounted_twice_gives_one_envelope_and_one_id() -> None:
    inner_ids: list[str | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        inner_ids.append(get_request_id())
        await JSONResponse({"a": 1})(scope, receive, send)

    sent = await call(envelope(envelope(app)))
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": {"a": 1}}
    assert inner_ids == [sent.header("x-request-id")]


async def test_envelope_puts_the_id_in_scope_state_for_handlers() -> None:
    async def route(request: Request) -> Response:
        return JSONResponse({"state": request.state.request_id, "var": get_request_id()})

    app = Starlette(routes=[Route("/", route)], middleware=[Middleware(EnvelopeMiddleware, access_log=False)])
    with TestClient(app) as client:
        response = client.get("/")
    request_id = response.headers["x-request-id"]
    assert response.json() == {"request_id": request_id, "data": {"state": request_id, "var": request_id}}
    assert get_request_id() is None


async def test_envelope_creates_scope_state_when_the_server_gave_none() -> None:
    scope = make_scope()
    del scope["state"]
    sent = await call(
        EnvelopeMiddleware(scripted(start(200, [JSON]), body(b"{}")), access_log=False), scope=scope
    )
    assert scope["state"] == {"request_id": sent.header("x-request-id")}


def test_envelope_in_starlette_covers_router_404_405_and_exceptions() -> None:
    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def boom(request: Request) -> Response:
        raise ValueError("db password leaked?")

    app = Starlette(
        routes=[Route("/ok", ok), Route("/boom", boom)],
        middleware=[Middleware(EnvelopeMiddleware, access_log=False)],
    )
    with TestClient(app) as client:
        assert client.get("/ok").json()["data"] == {"ok": True}
        missing = client.get("/missing")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "resource_not_found"
        wrong = client.delete("/ok")
        assert wrong.status_code == 405
        assert wrong.json()["error"]["code"] == "method_not_allowed"
        assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD"}
        failed = client.get("/boom")
        assert failed.status_code == 500
        assert b"password" not in failed.content
        assert failed.json()["request_id"] == failed.headers["x-request-id"]
        head = client.head("/ok")
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["x-request-id"]


def test_envelope_inside_gzip_wraps_before_compressing() -> None:
    async def route(request: Request) -> Response:
        return JSONResponse({"items": list(range(300))})

    app = Starlette(
        routes=[Route("/", route)],
        middleware=[
            Middleware(GZipMiddleware, minimum_size=10),
            Middleware(EnvelopeMiddleware, access_log=False),
        ],
    )
    with TestClient(app) as client:
        response = client.get("/", headers={"accept-encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"
    assert response.json()["data"] == {"items": list(range(300))}


async def test_envelope_wraps_starlette_streaming_and_redirect_responses() -> None:
    async def numbers() -> Any:
        for chunk in (b"[", b"1", b",2", b"]"):
            yield chunk

    async def stream(request: Request) -> Response:
        return StreamingResponse(numbers(), media_type="application/json")

    async def html(request: Request) -> Response:
        return HTMLResponse("<p>hi</p>")

    async def moved(request: Request) -> Response:
        return RedirectResponse("/stream")

    async def text_error(request: Request) -> Response:
        return PlainTextResponse("bad size", status_code=400)

    app = Starlette(
        routes=[
            Route("/stream", stream),
            Route("/html", html),
            Route("/moved", moved),
            Route("/text", text_error),
        ],
        middleware=[Middleware(EnvelopeMiddleware, access_log=False)],
    )
    with TestClient(app, follow_redirects=False) as client:
        assert client.get("/stream").json()["data"] == [1, 2]
        assert client.get("/html").text == "<p>hi</p>"
        assert client.get("/moved").status_code == 307
        assert client.get("/text").json()["error"] == {
            "code": "request_invalid",
            "message": "bad size",
            "details": {},
        }
