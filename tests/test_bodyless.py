"""204, 205 and 304 stay bodiless.

From "The contract, response by response":

    204, 205, 304
        -> bodiless, as HTTP requires: no `Content-Length` on a 204, `Content-Length: 0` on a
        205, a 304's kept; no trailers (RFC 9110 §6.5)
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from envelope_middleware import EnvelopeMiddleware
from tests.conftest import _TRAILERS, HEX_ID, JSON, body, call, envelope, scripted, start

pytestmark = pytest.mark.filterwarnings("error")


def test_envelope_sends_204_205_and_304_without_a_body() -> None:
    async def deleted(request: Request) -> Response:
        return JSONResponse(None, status_code=204)

    async def reset(request: Request) -> Response:
        return JSONResponse({"saved": True}, status_code=205)

    async def unchanged(request: Request) -> Response:
        return Response(status_code=304, headers={"ETag": 'W/"v1"', "Content-Length": "1234"})

    app = Starlette(
        routes=[Route("/deleted", deleted), Route("/reset", reset), Route("/unchanged", unchanged)],
        middleware=[Middleware(EnvelopeMiddleware)],
    )
    with TestClient(app) as client:
        no_content, reset_content, not_modified = (
            client.get(path) for path in ("/deleted", "/reset", "/unchanged")
        )
    assert (no_content.status_code, no_content.content) == (204, b"")
    assert "content-length" not in no_content.headers
    assert (reset_content.status_code, reset_content.content) == (205, b"")
    assert reset_content.headers["content-length"] == "0"
    assert (not_modified.status_code, not_modified.content) == (304, b"")
    assert not_modified.headers["content-length"] == "1234"
    assert not_modified.headers["etag"] == 'W/"v1"'
    for response in (no_content, reset_content, not_modified):
        assert re.fullmatch(HEX_ID, response.headers["x-request-id"])


@pytest.mark.parametrize("status", [204, 205, 304])
async def test_envelope_keeps_bodiless_statuses_bodiless(status: int) -> None:
    sent = await call(envelope(scripted(start(status, [JSON, (b"content-length", b"2")]), body(b"{}"))))
    assert sent.status == status
    assert sent.body == b""
    assert sent.complete
    assert sent.header("x-request-id")
    if status == 204:
        assert sent.header("content-length") is None  # RFC 9110 §8.6


async def test_envelope_205_says_content_length_zero_and_sends_no_body() -> None:
    sent = await call(envelope(JSONResponse(None, status_code=205)))
    assert sent.status == 205
    assert sent.header("content-length") == "0"
    assert sent.body == b""


async def test_envelope_304_keeps_its_content_length() -> None:
    sent = await call(envelope(scripted(start(304, [(b"content-length", b"1234")]), body(b""))))
    assert sent.header("content-length") == "1234"


@pytest.mark.parametrize("status", [204, 304])
async def test_envelope_a_bodyless_status_announces_and_sends_no_trailers(logs: Any, status: int) -> None:
    # RFC 9110 §6.5: no content, no trailer section; the response ends with its empty body.
    app = scripted(start(status, [JSON], trailers=True), body(b""), _TRAILERS)
    sent = await call(EnvelopeMiddleware(app))
    assert "trailers" not in sent.start
    assert [m["type"] for m in sent.messages] == ["http.response.start", "http.response.body"]
    assert [e for e in logs.entries if e["log_level"] in ("warning", "error")] == []
