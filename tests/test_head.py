"""HEAD gets the status and headers of its GET.

From "The contract, response by response":

    HEAD
        -> the status and headers its GET gets (RFC 9110 §9.3.2), `Content-Length` included
        (§8.6): the app's body, which Starlette's `Response`, `JSONResponse` and
        `StreamingResponse` send on HEAD and servers drop, is checked and measured as a GET's
        would be. An app that answers HEAD without the body (Starlette's `FileResponse` does)
        gets no `Content-Length` on a wrapped response (unless it declared 0), as the envelope's
        length is then unknown; its body is not checked, so a malformed JSON file is HEAD 200
        where GET says 502, and where the server offers `pathsend` the file's GET passes
        unwrapped while its HEAD has the envelope's headers
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from envelope_middleware import EnvelopeMiddleware, ResourceNotFound
from tests.conftest import HEX_ID, JSON, body, call, drive, envelope, json_values, scripted, start

pytestmark = pytest.mark.filterwarnings("error")


def test_envelope_head_gets_the_status_and_headers_its_get_gets() -> None:
    async def order(request: Request) -> Response:
        return JSONResponse({"id": "ord_1", "status": "delivered"})

    async def broken(request: Request) -> Response:
        return Response(b'{"id": ', media_type="application/json")

    app = Starlette(
        routes=[Route("/orders/1", order), Route("/orders/2", broken)],
        middleware=[Middleware(EnvelopeMiddleware)],
    )
    with TestClient(app) as client:
        for path, status in (("/orders/1", 200), ("/orders/2", 502), ("/orders/3", 404)):
            get, head = client.get(path), client.head(path)
            assert (get.status_code, head.status_code) == (status, status)
            assert head.content == b""
            assert head.headers["content-length"] == str(len(get.content))
            assert head.headers["content-type"] == "application/json"
            # Every id has the same length, so every header but the id's is the same.
            assert [p for p in head.headers.multi_items() if p[0] != "x-request-id"] == [
                p for p in get.headers.multi_items() if p[0] != "x-request-id"
            ]


@pytest.mark.parametrize("validate_json", [True, False])
async def test_envelope_head_gets_the_headers_of_the_get_envelope(validate_json: bool) -> None:
    # As Starlette answers HEAD: the GET's response, body included, which the server drops.
    data = b'{"orders": [1, 2]}'
    headers = [JSON, (b"content-length", b"%d" % len(data)), (b"etag", b'"v1"')]
    app = envelope(scripted(start(200, headers), body(data)), validate_json=validate_json)
    get, head = await call(app, "GET"), await call(app, "HEAD")
    request_id = head.header("x-request-id") or ""
    assert head.status == 200
    assert head.header("content-length") == str(
        len(b'{"request_id":"' + request_id.encode() + b'","data":' + data + b"}")
    )
    assert head.header("content-length") == get.header("content-length")
    assert head.header("etag") is None  # a strong validator of the service's bytes (RFC 9110 §8.8.3)
    assert [name for name, _ in head.raw_headers] == [name for name, _ in get.raw_headers]


@pytest.mark.parametrize("validate_json", [True, False])
@pytest.mark.parametrize("declared", [[(b"content-length", b"7")], []], ids=["its-get-length", "no-length"])
async def test_envelope_head_without_its_body_gets_no_content_length(
    validate_json: bool, declared: list[tuple[bytes, bytes]]
) -> None:
    # The app answered HEAD bodiless: the envelope's length is unknown.
    app = envelope(scripted(start(200, [JSON, *declared]), body(b"")), validate_json=validate_json)
    sent = await call(app, "HEAD")
    assert sent.status == 200
    assert sent.header("content-length") is None
    assert sent.header("content-type") == "application/json"
    assert re.fullmatch(HEX_ID, sent.header("x-request-id") or "")


async def test_envelope_head_of_an_empty_json_body_has_the_length_of_null_data() -> None:
    app = envelope(scripted(start(200, [JSON, (b"content-length", b"0")]), body(b"")))
    get, head = await call(app, "GET"), await call(app, "HEAD")
    assert get.json()["data"] is None
    assert head.header("content-length") == get.header("content-length") == str(len(get.body))


async def test_envelope_head_of_malformed_json_answers_502_like_its_get() -> None:
    sent = await call(envelope(scripted(start(200, [JSON]), body(b'{"a": '))), "HEAD")
    assert sent.status == 502
    assert sent.body == b""
    assert int(sent.header("content-length") or 0) > 0


async def test_envelope_head_error_gets_the_error_headers_without_a_body() -> None:
    headers = [
        (b"content-type", b"text/plain"),
        (b"content-length", b"23"),
        (b"server", b"orders-7.internal"),
    ]
    sent = await call(envelope(scripted(start(500, headers), body(b"Traceback: orders-7.internal"))), "HEAD")
    assert sent.status == 500
    assert sent.body == b""
    assert sent.header("server") is None
    assert sent.header("content-type") == "application/json"
    assert int(sent.header("content-length") or 0) > 23  # the length of the envelope a GET gets


async def test_envelope_head_error_sends_headers_only() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ResourceNotFound

    sent = await call(envelope(app), "HEAD")
    assert sent.status == 404
    assert sent.body == b""
    assert int(sent.header("content-length") or 0) > 0


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    status=st.sampled_from([200, 201, 203, 204, 206, 301, 304, 400, 404, 409, 422, 429, 500, 503]),
    content_type=st.sampled_from(
        [b"application/json", b"application/problem+json", b"text/plain", b"text/html"]
    ),
    data=st.binary(max_size=100) | json_values.map(lambda v: json.dumps(v).encode()),
    validate_json=st.booleans(),
)
def test_envelope_property_head_answers_the_headers_a_get_would(
    status: int, content_type: bytes, data: bytes, validate_json: bool
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(data))]
    app = envelope(scripted(start(status, headers), body(data)), validate_json=validate_json)
    get, head = drive(app, "GET"), drive(app, "HEAD")
    assert head.status == get.status
    # Every id has the same length, so every header but the id's is the same.
    assert [p for p in head.raw_headers if p[0] != b"x-request-id"] == [
        p for p in get.raw_headers if p[0] != b"x-request-id"
    ]
