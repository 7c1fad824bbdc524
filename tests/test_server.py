"""The middleware under a real uvicorn server, over real HTTP."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from envelope_middleware import EnvelopeMiddleware, ResourceNotFound
from tests._server import serve

pytestmark = pytest.mark.server


async def ok(request: Request) -> Response:
    return JSONResponse({"orders": [{"id": i} for i in range(50)]})


async def missing(request: Request) -> Response:
    raise ResourceNotFound("Order 9 not found")


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"results": ['
        for i in range(100):
            yield b"%d," % i
            await asyncio.sleep(0)
        yield b"100]}"

    return StreamingResponse(chunks(), media_type="application/json")


async def breaks_midway(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"partial line\n"
        raise RuntimeError("backend went away")

    return StreamingResponse(chunks(), media_type="text/plain")


async def slow(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(200):
            yield b"[%d," % i
            await asyncio.sleep(0.01)

    return StreamingResponse(chunks(), media_type="application/json")


def make_app(*, validate_json: bool, access_log: bool = False) -> Starlette:
    return Starlette(
        routes=[
            Route("/ok", ok),
            Route("/missing", missing),
            Route("/stream", stream),
            Route("/breaks", breaks_midway),
            Route("/slow", slow),
        ],
        middleware=[Middleware(EnvelopeMiddleware, validate_json=validate_json, access_log=access_log)],
    )


@pytest.mark.parametrize("validate_json", [True, False])
def test_server_serves_envelopes_over_real_http(validate_json: bool) -> None:
    with serve(make_app(validate_json=validate_json)) as base, httpx2.Client(base_url=base) as client:
        ok_response = client.get("/ok")
        assert ok_response.json()["data"]["orders"][49] == {"id": 49}
        assert ok_response.json()["request_id"] == ok_response.headers["x-request-id"]
        assert int(ok_response.headers["content-length"]) == len(ok_response.content)

        streamed = client.get("/stream")
        assert streamed.json()["data"]["results"] == list(range(101))
        assert streamed.headers.get_list("x-request-id") == [streamed.json()["request_id"]]

        missing_response = client.get("/missing")
        assert missing_response.status_code == 404
        assert missing_response.json()["error"]["message"] == "Order 9 not found"

        head = client.head("/ok")
        assert head.status_code == 200
        assert len(head.headers["x-request-id"]) == 32
        assert head.headers["content-length"] == ok_response.headers["content-length"]
        head_missing = client.head("/missing")
        assert head_missing.status_code == 404
        assert head_missing.headers["content-type"] == "application/json"


def test_server_aborts_a_response_that_fails_after_bytes_are_out() -> None:
    with serve(make_app(validate_json=True)) as base, httpx2.Client(base_url=base) as client:
        with pytest.raises(httpx2.RemoteProtocolError):
            client.get("/breaks")
        # The server is still healthy for the next request.
        assert client.get("/ok").status_code == 200


@pytest.mark.parametrize("validate_json", [True, False])
def test_server_a_client_that_leaves_is_no_server_error(logs: Any, validate_json: bool) -> None:
    with serve(make_app(validate_json=validate_json, access_log=True)) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
            time.sleep(0.2)  # the partner's client gives up mid-stream
        deadline = time.monotonic() + 5
        while not any(e["event"] == "http_request" for e in logs.entries) and time.monotonic() < deadline:
            time.sleep(0.02)
    [left] = [e for e in logs.entries if e["event"] == "client_disconnected"]
    [access] = [e for e in logs.entries if e["event"] == "http_request"]
    assert left["request_id"] == access["request_id"]
    assert access["status"] == (None if validate_json else 200)
    assert [e for e in logs.entries if e["log_level"] == "error"] == []
