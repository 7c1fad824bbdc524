"""A 2xx body labelled JSON that is not JSON, and how much of a stream is held to tell.

From "The contract, response by response":

    2xx JSON that is not JSON (validating mode)
        -> `502 downstream_invalid_response`; the log gets the parser's reason and the size, not
        the body

And the option `max_validated_size` (default `None`): in validating mode, how much of a body
arriving in several messages (a `StreamingResponse`) is held for the check: once more than this
many bytes are held (the message that crosses the limit included), the body streams on
unchecked, with a `json_not_validated` warning. An `int` of at least 0 (below 3 it acts as 3:
the first three bytes tell whether there is a BOM to drop), or `None`, which holds any body
whole. A body sent in one message is checked at any size, being in memory already.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from envelope_middleware import DEFAULT_CATALOGUE, EnvelopeMiddleware
from tests.conftest import JSON, assert_error, body, call, envelope, scripted, start

pytestmark = pytest.mark.filterwarnings("error")


def test_envelope_answers_502_when_a_route_sends_json_that_is_not_json(logs: Any) -> None:
    async def order(request: Request) -> Response:
        return Response(b'{"id": "ord_1", "token": "s3cr3t", ', media_type="application/json")

    app = Starlette(routes=[Route("/orders/1", order)], middleware=[Middleware(EnvelopeMiddleware)])
    with TestClient(app) as client:
        response = client.get("/orders/1")
    request_id = response.headers["x-request-id"]
    assert response.status_code == 502
    assert response.json() == {
        "request_id": request_id,
        "error": {
            "code": "downstream_invalid_response",
            "message": DEFAULT_CATALOGUE["downstream_invalid_response"].message,
            "details": {},
        },
    }
    [event] = [e for e in logs.entries if e["event"] == "downstream_invalid_json"]
    assert event["request_id"] == request_id
    assert event["body_bytes"] == len(b'{"id": "ord_1", "token": "s3cr3t", ')
    assert event["reason"]
    assert "s3cr3t" not in response.text
    assert "s3cr3t" not in repr(logs.entries)


@pytest.mark.parametrize(
    "data",
    [b'{"a": ', b"{'a': 1}", b"NaN", b'{"a": 1} trailing', b'"\xff"', b'["\\ud800"]', b"[1,]", b" \x0b "],
    ids=[
        "truncated",
        "single-quotes",
        "nan",
        "trailing",
        "bad-utf8",
        "lone-surrogate",
        "comma",
        "not-json-space",
    ],
)
async def test_envelope_answers_502_for_a_2xx_json_body_that_is_not_json(data: bytes) -> None:
    sent = await call(envelope(scripted(start(200, [JSON]), body(data))))
    assert_error(sent, 502, "downstream_invalid_response")
    assert data not in sent.body


async def test_envelope_502_for_json_that_is_not_keeps_the_headers_a_server_error_keeps() -> None:
    headers = [
        JSON,
        (b"set-cookie", b"session=1"),
        (b"access-control-allow-origin", b"https://partner.example"),
        (b"idempotent-replayed", b"true"),
        (b"original-request-id", b"9f8ffaa5b363078ddb350784c44bf9e9"),
        (b"pragma", b"cache"),
        (b"server", b"orders-7.internal"),
        (b"retry-after", b"soon; host=db-1.internal"),
        (b"cache-control", b"public, max-age=3600"),
        (b"expires", b"Thu, 01 Jan 2099 00:00:00 GMT"),
    ]
    sent = await call(envelope(scripted(start(200, headers), body(b'{"a": '))))
    assert_error(sent, 502, "downstream_invalid_response")
    assert sent.header("set-cookie") == "session=1"
    assert sent.header("access-control-allow-origin") == "https://partner.example"
    assert sent.header("idempotent-replayed") == "true"
    assert sent.header("original-request-id") == "9f8ffaa5b363078ddb350784c44bf9e9"
    # Not the host, nor the caching of the data the error stands in for.
    dropped = ("server", "retry-after", "cache-control", "expires", "pragma")
    assert [sent.header(name) for name in dropped] == [None] * 5


async def test_envelope_answers_502_for_json_nested_deeper_than_the_parser_allows() -> None:
    sent = await call(envelope(scripted(start(200, [JSON]), body(b"[" * 5000 + b"]" * 5000))))
    assert_error(sent, 502, "downstream_invalid_response")


async def test_envelope_logs_invalid_json_with_reason_but_not_the_body(logs: Any) -> None:
    secret = b'{"token": "s3cr3t", '
    sent = await call(EnvelopeMiddleware(scripted(start(200, [JSON]), body(secret))))
    events = [e for e in logs.entries if e["event"] == "downstream_invalid_json"]
    assert len(events) == 1
    assert events[0]["request_id"] == sent.header("x-request-id")
    assert events[0]["body_bytes"] == len(secret)
    assert "s3cr3t" not in repr(logs.entries)


async def test_envelope_trusted_mode_does_not_check_json() -> None:
    sent = await call(envelope(scripted(start(200, [JSON]), body(b"[1,")), validate_json=False))
    assert sent.status == 200
    assert sent.body.endswith(b'"data":[1,}')


async def test_envelope_streams_a_body_past_max_validated_size_unchecked(logs: Any) -> None:
    chunks = [b'{"items": [', b"1, 2, 3", b'], "note": "', b"x" * 50, b'"}']
    declared = (b"content-length", str(sum(map(len, chunks))).encode())
    messages = [body(chunk, more=index < len(chunks) - 1) for index, chunk in enumerate(chunks)]
    sent = await call(envelope(scripted(start(200, [JSON, declared]), *messages), max_validated_size=16))
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": orjson.loads(b"".join(chunks))}
    assert sent.header("content-length") == str(len(sent.body))
    # Held only until the limit: the rest went on message by message.
    assert len(sent.body_messages) == 4
    [event] = [e for e in logs.entries if e["event"] == "json_not_validated"]
    assert event["held_bytes"] == len(chunks[0]) + len(chunks[1])
    assert event["request_id"] == sent.header("x-request-id")


async def test_envelope_checks_bodies_within_max_validated_size() -> None:
    app = scripted(start(200, [JSON]), body(b'{"a": ', more=True), body(b"}"))
    assert_error(await call(envelope(app, max_validated_size=1024)), 502, "downstream_invalid_response")


async def test_envelope_max_validated_size_waits_for_the_bytes_that_tell_a_bom() -> None:
    app = scripted(start(200, [JSON]), body(b"\xef", more=True), body(b"\xbb\xbf{}", more=True), body(b""))
    sent = await call(envelope(app, max_validated_size=0))
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": {}}
