"""EnvelopeMiddleware, response by response: the contract of issue #2."""

from __future__ import annotations

import array
import asyncio
import gzip
import json
import logging
import re
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from envelope_middleware import (
    DEFAULT_CATALOGUE,
    ApiError,
    Catalogue,
    EnvelopeMiddleware,
    ErrorSpec,
    RateLimited,
    ResourceNotFound,
    _http,
    get_request_id,
)
from envelope_middleware.middleware import SCOPE_KEY
from tests.conftest import HEX_ID, JSON, Sent, body, call, drive, make_scope, scripted, start

pytestmark = pytest.mark.filterwarnings("error")


def envelope(app: Any, **options: Any) -> EnvelopeMiddleware:
    return EnvelopeMiddleware(app, access_log=False, **options)


def assert_error(sent: Sent, status: int, code: str) -> dict[str, Any]:
    assert sent.status == status
    assert sent.header("content-type") == "application/json"
    assert sent.header("content-length") == str(len(sent.body))
    document = sent.json()
    assert set(document) == {"request_id", "error"}
    assert document["request_id"] == sent.header("x-request-id")
    assert set(document["error"]) == {"code", "message", "details"}
    assert document["error"]["code"] == code
    assert isinstance(document["error"]["message"], str)
    assert document["error"]["message"]
    assert isinstance(document["error"]["details"], dict)
    error: dict[str, Any] = document["error"]
    return error


# -- success envelopes --------------------------------------------------------


async def test_envelope_wraps_json_body_in_data_with_request_id() -> None:
    app = envelope(scripted(start(200, [JSON]), body(b'{"a": 1}')))
    sent = await call(app)
    request_id = sent.header("x-request-id")
    assert request_id is not None
    assert re.fullmatch(HEX_ID, request_id)
    assert sent.body == b'{"request_id":"' + request_id.encode() + b'","data":{"a": 1}}'
    assert sent.header("content-length") == str(len(sent.body))
    assert sent.header("content-type") == "application/json"


@pytest.mark.parametrize("validate_json", [True, False])
async def test_envelope_keeps_body_bytes_exact_that_a_decode_would_change(validate_json: bool) -> None:
    # Big integers, duplicate keys, number spellings and escapes survive only if never re-encoded.
    data = b'{"id": 123456789012345678901234567890, "a": 1, "a": 2, "x": 1.0e+2, "s": "\\u00e9", "f": -0.0}'
    app = envelope(scripted(start(200, [JSON]), body(data)), validate_json=validate_json)
    sent = await call(app)
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": orjson.loads(data)}
    assert sent.body.endswith(b'"data":' + data + b"}")


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/json",
        b"Application/JSON",
        b"application/json; charset=utf-8",
        b"application/vnd.partner+json",
        b"application/problem+json",
        b" application/json ;charset=UTF-8",
        b"text/json",
        b"application/x-json",
        b"Text/X-JSON; charset=utf-8",
    ],
)
async def test_envelope_recognises_json_content_types(content_type: bytes) -> None:
    app = envelope(scripted(start(200, [(b"content-type", content_type)]), body(b"[1]")))
    sent = await call(app)
    assert sent.json()["data"] == [1]
    assert sent.header("content-type") == "application/json"


@pytest.mark.parametrize("validate_json", [True, False])
async def test_envelope_turns_empty_2xx_body_into_null_data(validate_json: bool) -> None:
    app = envelope(scripted(start(201, [JSON]), body(b"", more=True), body(b"")), validate_json=validate_json)
    sent = await call(app)
    assert sent.status == 201
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": None}
    assert sent.header("content-length") == str(len(sent.body))


@pytest.mark.parametrize("validate_json", [True, False])
async def test_envelope_strips_a_utf8_bom_that_would_break_the_envelope(validate_json: bool) -> None:
    data = b'\xef\xbb\xbf{"a": "\xc3\xa9"}'
    headers = [JSON, (b"content-length", str(len(data)).encode())]
    app = envelope(
        scripted(start(200, headers), body(data[:5], more=True), body(data[5:])), validate_json=validate_json
    )
    sent = await call(app)
    assert sent.json()["data"] == {"a": "é"}
    declared = sent.header("content-length")
    assert declared is None or declared == str(len(sent.body))


async def test_envelope_trusted_mode_ends_a_stream_of_whitespace_alone_with_null() -> None:
    app = scripted(start(200, [JSON]), body(b" ", more=True), body(b"\t", more=True), body(b"\r\n"))
    sent = await call(envelope(app, validate_json=False))
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": None}


async def test_envelope_validating_mode_joins_chunks_and_sends_one_content_length() -> None:
    chunks = [b'{"orders": [', b'{"id": 1},', b'{"id": 2}', b"]}"]
    app = envelope(scripted(start(200, [JSON]), *(body(c, more=True) for c in chunks), body(b"")))
    sent = await call(app)
    assert sent.json()["data"] == {"orders": [{"id": 1}, {"id": 2}]}
    assert sent.header_values("content-length") == [str(len(sent.body))]


@pytest.mark.parametrize(
    ("first", "rest", "data"),
    [
        (b'{"results": [1', b", 2]}", {"results": [1, 2]}),
        # A long poll's keep-alive space reaches the client while the document is awaited.
        (b" ", b'{"done": true}', {"done": True}),
    ],
    ids=["document", "keep-alive"],
)
async def test_envelope_trusted_mode_streams_chunks_without_holding_them(
    first: bytes, rest: bytes, data: Any
) -> None:
    seen_by_client: list[bytes] = []
    second_chunk_sent = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start(200, [JSON]))
        await send(body(first, more=True))
        # The client has the first chunk before the app produces the second.
        assert seen_by_client[-1].endswith(first)
        second_chunk_sent.set()
        await send(body(rest, more=False))

    async def receive() -> Message:
        await asyncio.Event().wait()
        raise AssertionError  # pragma: no cover

    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(message)
        if message["type"] == "http.response.body":
            seen_by_client.append(message["body"])

    await envelope(app, validate_json=False)(_scope(), receive, send)
    sent = Sent(messages)
    assert second_chunk_sent.is_set()
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": data}
    assert sent.header("content-length") is None  # unknown length: the server frames it


async def test_envelope_trusted_mode_adjusts_a_declared_content_length() -> None:
    data = b'{"page": 1, "size": 2, "total": 2, "orders": [1, 2]}'
    headers = [JSON, (b"content-length", str(len(data)).encode())]
    app = envelope(
        scripted(start(200, headers), body(data[:10], more=True), body(data[10:])), validate_json=False
    )
    sent = await call(app)
    assert sent.header_values("content-length") == [str(len(sent.body))]
    assert sent.json()["data"]["orders"] == [1, 2]


async def test_envelope_very_large_body_is_sent_without_copying_it_into_the_prefix() -> None:
    data = b"[" + b"1," * 1_100_000 + b"1]"
    app = envelope(scripted(start(200, [JSON]), body(data)))
    sent = await call(app)
    assert any(m["body"] is data for m in sent.body_messages)
    assert sent.json()["data"] == [1] * 1_100_001
    assert sent.header("content-length") == str(len(sent.body))


async def test_envelope_trusted_mode_streams_a_large_first_chunk_without_copying_it() -> None:
    first = b"[" + b"7," * 1_100_000
    app = envelope(scripted(start(200, [JSON]), body(first, more=True), body(b"7]")), validate_json=False)
    sent = await call(app)
    assert any(m["body"] is first for m in sent.body_messages)
    assert sent.json()["data"] == [7] * 1_100_001


@pytest.mark.parametrize("coding", [b"identity", b"Identity ", b""])
async def test_envelope_wraps_json_whose_content_encoding_names_no_coding(coding: bytes) -> None:
    headers = [(b"content-encoding", coding), JSON]
    sent = await call(envelope(scripted(start(200, headers), body(b"[1]"))))
    assert sent.json()["data"] == [1]
    assert sent.header("content-encoding") is None  # RFC 9110 §8.4.1: identity is not sent


@pytest.mark.parametrize("validate_json", [True, False])
@pytest.mark.parametrize(("items", "messages"), [(200_000, 1), (300_000, 3)], ids=["400KB", "600KB"])
async def test_envelope_body_up_to_512_kib_goes_out_in_one_message(
    validate_json: bool, items: int, messages: int
) -> None:
    # One socket write where the copy is cheap; the body as it is where the copy is not.
    data = b"[" + b"1," * items + b"1]"
    sent = await call(envelope(scripted(start(200, [JSON]), body(data)), validate_json=validate_json))
    assert len(sent.body_messages) == messages
    assert sent.header("content-length") == str(len(sent.body))
    assert sent.json()["data"] == orjson.loads(data)


async def test_envelope_replaces_content_length_case_insensitively() -> None:
    app = envelope(scripted(start(200, [JSON, (b"Content-Length", b"2")]), body(b"{}")))
    sent = await call(app)
    assert sent.header_values("content-length") == [str(len(sent.body))]


async def test_envelope_drops_strong_etag_and_digests_but_keeps_weak_etag_and_other_headers() -> None:
    headers = [
        JSON,
        (b"etag", b'"abc"'),
        (b"content-digest", b"sha-256=:x:"),
        (b"digest", b"sha-256=x"),
        (b"cache-control", b"no-store"),
        (b"set-cookie", b"a=1"),
    ]
    sent = await call(envelope(scripted(start(200, headers), body(b"{}"))))
    assert sent.header("etag") is None
    assert sent.header("content-digest") is None
    assert sent.header("digest") is None
    assert sent.header("cache-control") == "no-store"
    assert sent.header("set-cookie") == "a=1"
    weak = await call(envelope(scripted(start(200, [JSON, (b"etag", b'W/"abc"')]), body(b"{}"))))
    assert weak.header("etag") == 'W/"abc"'


# -- pagination shapes arrive untouched ------------------------------------------

ORDERS = orjson.dumps(
    {
        "page": 2,
        "size": 2,
        "total": 7,
        "orders": [
            {"id": "ord_3", "status": "delivered", "items": [{"sku": "A1", "qty": 2, "price": "4.50"}]},
            {"id": "ord_4", "status": "cancelled", "items": []},
        ],
    }
)
BRANCHES = orjson.dumps(
    {"page": 1, "size": 1, "total": 1, "results": [{"id": 11, "name": "Kemang", "open": True}]}
)
BRANDS = orjson.dumps([{"page": 1, "size": 2, "total": 2, "brands": [{"id": 1}, {"id": 2}]}])


@pytest.mark.parametrize(
    ("payload", "items"),
    [(ORDERS, ("orders",)), (BRANCHES, ("results",)), (BRANDS, (0, "brands"))],
    ids=["orders", "branches", "brands"],
)
@pytest.mark.parametrize("validate_json", [True, False])
async def test_envelope_keeps_each_pagination_shape_byte_for_byte(
    payload: bytes, items: tuple[Any, ...], validate_json: bool
) -> None:
    async def route(request: Request) -> Response:
        return Response(payload, media_type="application/json")

    app = Starlette(
        routes=[Route("/list", route)],
        middleware=[Middleware(EnvelopeMiddleware, validate_json=validate_json)],
    )
    with TestClient(app) as client:
        response = client.get("/list")
    prefix = b'{"request_id":"' + response.headers["x-request-id"].encode() + b'","data":'
    assert response.content == prefix + payload + b"}"
    data = response.json()["data"]
    for key in items:
        data = data[key]
    assert isinstance(data, list)


# -- what passes through -----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "data"),
    [
        (200, [(b"content-type", b"text/html; charset=utf-8")], b"<h1>hi</h1>"),
        (200, [(b"content-type", b"text/event-stream")], b"data: {}\n\n"),
        (200, [(b"content-type", b"application/x-ndjson")], b'{"a":1}\n{"a":2}\n'),
        (200, [(b"content-type", b"application/octet-stream")], b"\x00\x01"),
        (200, [], b"no content type"),
        (200, [JSON, (b"content-encoding", b"gzip")], gzip.compress(b'{"a":1}')),
        (206, [JSON, (b"content-range", b"bytes 0-1/4")], b'{"'),
        (301, [(b"location", b"/elsewhere"), JSON], b'{"moved": true}'),
        (302, [(b"location", b"/elsewhere")], b""),
    ],
    ids=["html", "sse", "ndjson", "binary", "untyped", "gzip", "partial", "301-json", "302"],
)
async def test_envelope_passes_through_what_it_must_not_wrap(
    status: int, headers: list[tuple[bytes, bytes]], data: bytes
) -> None:
    sent = await call(envelope(scripted(start(status, headers), body(data))))
    assert sent.status == status
    assert sent.body == data
    assert sent.raw_headers[:-1] == headers
    assert re.fullmatch(HEX_ID, sent.header("x-request-id") or "")


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


@pytest.mark.parametrize("status", [204, 205, 304])
async def test_envelope_keeps_bodiless_statuses_bodiless(status: int) -> None:
    sent = await call(envelope(scripted(start(status, [JSON, (b"content-length", b"2")]), body(b"{}"))))
    assert sent.status == status
    assert sent.body == b""
    assert sent.complete
    assert sent.header("x-request-id")
    if status == 204:
        assert sent.header("content-length") is None  # RFC 9110 §8.6


async def test_envelope_replaces_an_app_request_id_header_with_exactly_one() -> None:
    headers = [(b"content-type", b"text/plain"), (b"X-Request-ID", b"from-app"), (b"x-request-id", b"again")]
    sent = await call(envelope(scripted(start(200, headers), body(b"ok"))))
    values = sent.header_values("x-request-id")
    assert len(values) == 1
    assert values[0] != "from-app"


@pytest.mark.parametrize(
    ("content_type", "validate_json"),
    [(b"application/json", True), (b"application/json", False), (b"text/plain", True)],
)
@pytest.mark.parametrize("chunks", [[b'{"a": 1}'], [b'{"a": ', b"1}"]])
async def test_envelope_send_returns_coroutines_that_task_starters_accept(
    content_type: bytes, validate_json: bool, chunks: list[bytes]
) -> None:
    # anyio's start_soon and asyncio.create_task take coroutines only; the
    # middleware's `send` is a plain function, so what it returns is checked.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(send, start(200, [(b"content-type", content_type)]))  # type: ignore[arg-type]
        for index, chunk in enumerate(chunks, 1):
            # Typed as Awaitable by ASGI; a coroutine when the server's `send` returns one.
            await asyncio.create_task(send(body(chunk, more=index < len(chunks))))  # type: ignore[arg-type]

    sent = await call(envelope(app, validate_json=validate_json))
    assert sent.status == 200
    if content_type == b"text/plain":
        assert sent.body == b'{"a": 1}'
    else:
        assert sent.json() == {"request_id": sent.header("x-request-id"), "data": {"a": 1}}


async def test_envelope_passes_pathsend_of_a_json_file_unwrapped() -> None:
    app = envelope(
        scripted(start(200, [JSON]), {"type": "http.response.pathsend", "path": "/srv/files/x.json"})
    )
    sent = await call(app)
    assert sent.messages[-1] == {"type": "http.response.pathsend", "path": "/srv/files/x.json"}
    assert sent.header("content-type") == "application/json"
    assert sent.header("x-request-id")


async def test_envelope_passes_trailers_and_early_hints_through() -> None:
    hint = {"type": "http.response.early_hint", "links": ["</style.css>; rel=preload"]}
    trailers = {"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")], "more_trailers": False}
    app = envelope(scripted(hint, start(200, [JSON], trailers=True), body(b"{}"), trailers))
    sent = await call(app)
    assert sent.messages[0] == hint
    assert sent.messages[-1] == trailers
    assert sent.body == b"{}"
    assert sent.start["trailers"] is True


@pytest.mark.parametrize("path", ["/health", "/metrics", "/metrics/", "/metrics/cpu/load"])
async def test_envelope_leaves_excluded_paths_unwrapped_but_sets_the_header(path: str) -> None:
    app = envelope(scripted(start(200, [JSON]), body(b'{"ok":true}')), exclude_paths=["/health", "/metrics/"])
    sent = await call(app, path=path)
    assert sent.body == b'{"ok":true}'
    assert sent.header("x-request-id")


@pytest.mark.parametrize("path", ["/healthz", "/health/deep", "/health/", "/metricsx", "/other"])
async def test_envelope_excludes_a_path_alone_and_a_slash_ended_path_with_its_subtree(path: str) -> None:
    app = envelope(scripted(start(200, [JSON]), body(b"{}")), exclude_paths=["/health", "/metrics/", "/"])
    sent = await call(app, path=path)
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": {}}


def test_envelope_excluded_paths_are_matched_before_a_mount_rewrites_root_path() -> None:
    # The middleware outside, routes inside Mounts: Starlette's router moves
    # the mount prefix into scope["root_path"] before the endpoint responds.
    async def echo(request: Request) -> Response:
        return JSONResponse({"path": request.url.path})

    app = Starlette(
        routes=[
            Route("/", echo),
            Mount("/orders", routes=[Route("/", echo), Route("/health", echo)]),
            Mount("/api", routes=[Route("/docs", echo)]),
        ],
        middleware=[Middleware(EnvelopeMiddleware, exclude_paths=["/", "/api/docs"], access_log=False)],
    )
    with TestClient(app) as client:
        assert client.get("/").json() == {"path": "/"}
        assert client.get("/api/docs").json() == {"path": "/api/docs"}
        for path in ("/orders/", "/orders/health"):
            response = client.get(path)
            assert response.json() == {"request_id": response.headers["x-request-id"], "data": {"path": path}}


def test_envelope_rejects_relative_excluded_paths() -> None:
    with pytest.raises(ValueError, match="start with '/'"):
        EnvelopeMiddleware(scripted(), exclude_paths=["health"])


def test_envelope_rejects_an_invalid_header_name() -> None:
    with pytest.raises(ValueError, match="header name"):
        EnvelopeMiddleware(scripted(), request_id_header="X Request\r\nID")


# -- malformed downstream JSON ----------------------------------------------------


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


# -- error envelopes from responses --------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "request_invalid"),
        (403, "auth_forbidden"),
        (404, "resource_not_found"),
        (405, "method_not_allowed"),
        (409, "idempotency_key_conflict"),
        (410, "request_invalid"),
        (413, "request_invalid"),
        (422, "state_invalid_transition"),
        (429, "rate_limited"),
        (500, "internal"),
        (501, "internal"),
        (502, "downstream_unavailable"),
        (503, "service_unavailable"),
        (504, "downstream_timeout"),
        (599, "internal"),
    ],
)
async def test_envelope_maps_a_bare_error_status_to_its_catalogue_code(status: int, code: str) -> None:
    sent = await call(envelope(scripted(start(status), body(b""))))
    error = assert_error(sent, status, code)
    assert error["message"] == DEFAULT_CATALOGUE[code].message


@pytest.mark.parametrize(
    ("authorization", "code"), [(None, "auth_missing"), ("Basic eDp5", "auth_invalid_credential")]
)
async def test_envelope_tells_missing_from_invalid_credentials_on_a_bare_401(
    authorization: str | None, code: str
) -> None:
    headers = [("authorization", authorization)] if authorization else []
    sent = await call(
        envelope(scripted(start(401, [(b"www-authenticate", b'Basic realm="api"')]), body(b""))),
        headers=headers,
    )
    assert_error(sent, 401, code)
    assert sent.header("www-authenticate") == 'Basic realm="api"'


@pytest.mark.parametrize(
    ("status", "payload", "code", "message", "details"),
    [
        (
            422,
            {
                "error": {
                    "code": "state_invalid_transition",
                    "message": "delivered -> pending",
                    "details": {"from": "delivered"},
                }
            },
            "state_invalid_transition",
            "delivered -> pending",
            {"from": "delivered"},
        ),
        (404, {"detail": "Order ord_9 not found"}, "resource_not_found", "Order ord_9 not found", {}),
        (400, {"code": "REQUEST_INVALID", "message": "size too big"}, "request_invalid", "size too big", {}),
        (400, {"code": "bespoke_code", "message": "odd"}, "request_invalid", "odd", {}),
        (
            400,
            {
                "type": "https://example.com/probs/range",
                "title": "Bad range",
                "detail": "90 days max",
                "limit": 90,
            },
            "request_invalid",
            "90 days max",
            {"limit": 90},
        ),
        (
            422,
            {"detail": [{"loc": ["query", "size"], "msg": "too big", "input": "secret-ish"}]},
            "request_invalid",
            "The request did not validate.",
            {"errors": [{"field": "size", "location": "query", "message": "too big", "type": ""}]},
        ),
        (
            422,
            {"detail": [{"loc": None, "msg": "x"}]},
            "state_invalid_transition",
            DEFAULT_CATALOGUE["state_invalid_transition"].message,
            {"errors": [{"loc": None, "msg": "x"}]},
        ),
        (
            503,
            {"detail": [{"loc": ["body"], "msg": "x"}]},
            "service_unavailable",
            DEFAULT_CATALOGUE["service_unavailable"].message,
            {},
        ),
        (
            400,
            {"detail": [{"field": "size", "problem": "too big"}]},
            "request_invalid",
            DEFAULT_CATALOGUE["request_invalid"].message,
            {"errors": [{"field": "size", "problem": "too big"}]},
        ),
        (
            422,
            {"type": "about:blank", "title": "Item archived", "code": "state_invalid_transition"},
            "state_invalid_transition",
            "Item archived",
            {},
        ),
        (
            404,
            {"type": "https://example.com/probs/gone", "title": "Gone", "instance": "/orders/9", "sku": 9},
            "resource_not_found",
            "Gone",
            {"sku": 9},
        ),
        (401, {"error": "invalid_token", "error_description": "expired"}, "auth_missing", "expired", {}),
        (
            409,
            {"error": {"code": "idempotency_key_conflict", "message": "reused"}},
            "idempotency_key_conflict",
            "reused",
            {},
        ),
        (
            400,
            {"error": {"code": "x", "message": 5, "details": "text"}},
            "request_invalid",
            DEFAULT_CATALOGUE["request_invalid"].message,
            {},
        ),
        (400, ["not", "an", "object"], "request_invalid", DEFAULT_CATALOGUE["request_invalid"].message, {}),
    ],
    ids=[
        "error-object",
        "detail-str",
        "flat-upper",
        "flat-unknown",
        "problem",
        "fastapi-validation",
        "loc-not-a-list",
        "validation-shape-at-503",
        "detail-list",
        "problem-code-title",
        "problem-instance",
        "oauth",
        "conflict",
        "junk",
        "array",
    ],
)
async def test_envelope_reads_the_common_service_error_shapes(
    status: int, payload: Any, code: str, message: str, details: dict[str, Any]
) -> None:
    content_type = (
        b"application/problem+json"
        if isinstance(payload, dict) and "title" in payload
        else b"application/json"
    )
    app = envelope(scripted(start(status, [(b"content-type", content_type)]), body(orjson.dumps(payload))))
    error = assert_error(await call(app), status, code)
    assert error["message"] == message
    assert error["details"] == details


@pytest.mark.parametrize("bom", [b"", _http.BOM])
async def test_envelope_keeps_an_allowlisted_service_code(bom: bytes) -> None:
    payload = bom + orjson.dumps({"error": {"code": "resource_unmapped", "message": "SKU 9 unknown"}})
    app = envelope(scripted(start(404, [JSON]), body(payload)), allowed_codes=["resource_unmapped"])
    error = assert_error(await call(app), 404, "resource_unmapped")
    assert error["message"] == "SKU 9 unknown"


@pytest.mark.parametrize("content_type", [b"text/json", b"application/x-json"])
async def test_envelope_reads_error_bodies_labelled_with_json_aliases(content_type: bytes) -> None:
    payload = orjson.dumps({"error": {"code": "resource_unmapped", "message": "SKU 9 unknown"}})
    app = envelope(
        scripted(start(404, [(b"content-type", content_type)]), body(payload)),
        allowed_codes=["resource_unmapped"],
    )
    assert assert_error(await call(app), 404, "resource_unmapped")["message"] == "SKU 9 unknown"


async def test_envelope_reads_a_plain_text_message_without_its_bom() -> None:
    app = envelope(
        scripted(start(400, [(b"content-type", b"text/plain")]), body(_http.BOM + b"size too big"))
    )
    assert assert_error(await call(app), 400, "request_invalid")["message"] == "size too big"


@pytest.mark.parametrize(
    ("content_type", "data"),
    [
        (b"text/plain", b"Traceback (most recent call last): db-7.internal:5432 refused"),
        (
            b"application/json",
            b'{"error": {"code": "internal", "message": "db-7.internal down", "details": {"host": "db-7"}}}',
        ),
        (b"text/html", b"<pre>stack at 10.0.0.7</pre>"),
    ],
)
async def test_envelope_never_passes_a_5xx_body_text_to_the_client(content_type: bytes, data: bytes) -> None:
    sent = await call(envelope(scripted(start(500, [(b"content-type", content_type)]), body(data))))
    error = assert_error(sent, 500, "internal")
    assert error["message"] == DEFAULT_CATALOGUE["internal"].message
    assert error["details"] == {}
    for leak in (b"db-7", b"10.0.0.7", b"Traceback"):
        assert leak not in sent.body


async def test_envelope_keeps_a_known_code_from_a_5xx_body_but_not_its_message() -> None:
    data = b'{"error": {"code": "service_unavailable", "message": "node-3 draining"}}'
    error = assert_error(
        await call(envelope(scripted(start(503, [JSON]), body(data)))), 503, "service_unavailable"
    )
    assert "node-3" not in error["message"]


@pytest.mark.parametrize(
    ("status", "service_code", "code"),
    [
        (500, "rate_limited", "internal"),
        (503, "request_invalid", "service_unavailable"),
        (404, "downstream_timeout", "resource_not_found"),
        (400, "internal", "request_invalid"),
        # Within its class a service's catalogue code stands: it knows more than the status.
        (409, "state_invalid_transition", "state_invalid_transition"),
        (502, "downstream_timeout", "downstream_timeout"),
    ],
)
async def test_envelope_keeps_a_service_code_only_in_the_class_of_its_status(
    status: int, service_code: str, code: str
) -> None:
    data = orjson.dumps({"error": {"code": service_code, "message": "m"}})
    assert_error(await call(envelope(scripted(start(status, [JSON]), body(data)))), status, code)


async def test_envelope_uses_short_plain_text_of_a_4xx_as_message() -> None:
    sent = await call(
        envelope(scripted(start(400, [(b"content-type", b"text/plain")]), body(b"size must be <= 100")))
    )
    assert assert_error(sent, 400, "request_invalid")["message"] == "size must be <= 100"


async def test_envelope_ignores_html_error_bodies() -> None:
    html = await call(
        envelope(scripted(start(404, [(b"content-type", b"text/html")]), body(b"<h1>Not here</h1>")))
    )
    assert (
        assert_error(html, 404, "resource_not_found")["message"]
        == DEFAULT_CATALOGUE["resource_not_found"].message
    )


@pytest.mark.parametrize("chunked", [False, True])
async def test_envelope_does_not_parse_an_error_body_past_64_kib(chunked: bool) -> None:
    document = {"error": {"code": "resource_not_found", "message": "Order 9 not found"}, "pad": "x" * 70_000}
    data = orjson.dumps(document)
    parts = [body(data[i : i + 10_000], more=True) for i in range(0, len(data), 10_000)] if chunked else []
    app = scripted(start(404, [JSON]), *parts, body(b"" if chunked else data))
    error = assert_error(await call(envelope(app)), 404, "resource_not_found")
    assert error["message"] == DEFAULT_CATALOGUE["resource_not_found"].message
    small = orjson.dumps({**document, "pad": "x"})
    kept = assert_error(
        await call(envelope(scripted(start(404, [JSON]), body(small)))), 404, "resource_not_found"
    )
    assert kept["message"] == "Order 9 not found"


async def test_envelope_error_keeps_headers_that_matter_and_drops_body_headers() -> None:
    headers = [
        (b"content-type", b"text/plain"),
        (b"content-length", b"9"),
        (b"content-encoding", b"gzip"),
        (b"etag", b'"v1"'),
        (b"allow", b"GET"),
        (b"retry-after", b"30"),
        (b"access-control-allow-origin", b"*"),
    ]
    sent = await call(envelope(scripted(start(405, headers), body(gzip.compress(b"nope")))))
    assert_error(sent, 405, "method_not_allowed")
    assert sent.header("allow") == "GET"
    assert sent.header("retry-after") == "30"
    assert sent.header("access-control-allow-origin") == "*"
    assert sent.header("content-encoding") is None
    assert sent.header("etag") is None


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (b"120", "120"),
        (b" 0 ", " 0 "),
        (b"Fri, 27 Nov 2026 11:00:00 GMT", "Fri, 27 Nov 2026 11:00:00 GMT"),
        (b"soon; host=db-1.internal", None),
        (b"-5", None),
        (b"1.5", None),
        (b"Friday, 27-Nov-26 11:00:00 GMT", None),  # RFC 850: recipients parse it, senders don't write it
        (b"Fri, 27 Nov 2026 11:00:00 GMT; db-1", None),
        (b"", None),
    ],
)
async def test_envelope_error_keeps_only_a_retry_after_a_client_can_act_on(
    status: int, value: bytes, kept: str | None
) -> None:
    app = envelope(scripted(start(status, [JSON, (b"retry-after", value)]), body(b'{"detail": "busy"}')))
    sent = await call(app)
    assert sent.status == status
    assert sent.header("retry-after") == kept


async def test_envelope_error_from_a_file_response_ignores_the_file() -> None:
    app = envelope(
        scripted(
            start(404, [(b"content-type", b"text/html")]),
            {"type": "http.response.pathsend", "path": "/srv/404.html"},
        )
    )
    sent = await call(app)
    assert_error(sent, 404, "resource_not_found")
    assert all(m["type"] != "http.response.pathsend" for m in sent.messages)


async def test_envelope_error_drops_app_trailers() -> None:
    trailers = {"type": "http.response.trailers", "headers": [], "more_trailers": False}
    sent = await call(envelope(scripted(start(400, [], trailers=True), body(b""), trailers)))
    assert_error(sent, 400, "request_invalid")
    assert "trailers" not in sent.start
    assert sent.messages[-1]["type"] == "http.response.body"


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


# -- error envelopes from exceptions ------------------------------------------------


def raising(exc: BaseException) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise exc

    return app


async def test_envelope_renders_an_api_error_with_its_code_details_and_headers() -> None:
    exc = ApiError(
        "menu_locked", "Menu is being edited", status=423, details={"menu_id": 7}, headers={"X-Lock": "1"}
    )
    sent = await call(envelope(raising(exc)))
    error = assert_error(sent, 423, "menu_locked")
    assert error == {"code": "menu_locked", "message": "Menu is being edited", "details": {"menu_id": 7}}
    assert sent.header("x-lock") == "1"


async def test_envelope_sets_retry_after_for_rate_limited() -> None:
    sent = await call(envelope(raising(RateLimited(retry_after=1.2))))
    error = assert_error(sent, 429, "rate_limited")
    assert sent.header("retry-after") == "2"
    assert error["details"] == {"retry_after": 2}


async def test_envelope_refuses_exception_headers_that_could_split_the_response() -> None:
    exc = ApiError(
        "x_y",
        "m",
        status=400,
        headers={"X-Evil": "a\r\nSet-Cookie: s=1", "Bad Name": "v", "X-Ok": "1", "X-Ué": "ü€"},
    )
    sent = await call(envelope(raising(exc)))
    assert sent.header("x-evil") is None
    assert sent.header("set-cookie") is None
    assert sent.header("x-ok") == "1"
    assert [k for k, _ in sent.raw_headers if k.startswith(b"x-u")] == []


async def test_envelope_renders_starlette_http_exceptions_by_status() -> None:
    sent = await call(envelope(raising(HTTPException(404, "Order 12 not found"))))
    assert assert_error(sent, 404, "resource_not_found")["message"] == "Order 12 not found"
    sent = await call(envelope(raising(HTTPException(405, headers={"Allow": "GET"}))))
    assert_error(sent, 405, "method_not_allowed")
    assert sent.header("allow") == "GET"
    sent = await call(envelope(raising(HTTPException(503, "db-1 is down"))))
    assert "db-1" not in assert_error(sent, 503, "service_unavailable")["message"]


async def test_envelope_turns_any_other_exception_into_a_generic_500(logs: Any) -> None:
    sent = await call(EnvelopeMiddleware(raising(RuntimeError("password=hunter2 at db-1.internal"))))
    error = assert_error(sent, 500, "internal")
    assert b"hunter2" not in sent.body
    assert b"db-1" not in sent.body
    assert error["message"] == DEFAULT_CATALOGUE["internal"].message
    [event] = [e for e in logs.entries if e["event"] == "unhandled_exception"]
    assert event["request_id"] == sent.header("x-request-id")
    assert isinstance(event["exc_info"], RuntimeError)


async def test_envelope_unwraps_an_exception_group_of_one() -> None:
    sent = await call(envelope(raising(ExceptionGroup("tg", [ResourceNotFound("gone")]))))
    assert assert_error(sent, 404, "resource_not_found")["message"] == "gone"


async def test_envelope_maps_exceptions_by_type_and_name_along_the_mro() -> None:
    class QuotaError(Exception):
        pass

    class DailyQuotaError(QuotaError):
        pass

    app = envelope(raising(DailyQuotaError()), exception_codes={QuotaError: "rate_limited"})
    assert_error(await call(app), 429, "rate_limited")
    by_name = envelope(raising(TimeoutError()), exception_codes={"builtins.OSError": "service_unavailable"})
    assert_error(await call(by_name), 503, "service_unavailable")


async def test_envelope_takes_exception_codes_typed_as_the_user_builds_them() -> None:
    # mypy --strict runs on this file: a dict of one exception type must type-check.
    codes: dict[type[LookupError], str] = {LookupError: "resource_not_found"}
    app = EnvelopeMiddleware(raising(KeyError("k")), access_log=False, exception_codes=codes)
    assert_error(await call(app), 404, "resource_not_found")


@pytest.mark.parametrize("key", [42, None, ValueError()])
def test_envelope_refuses_exception_codes_keyed_by_what_is_no_exception_type(key: object) -> None:
    with pytest.raises(TypeError, match="exception types"):
        EnvelopeMiddleware(scripted(), exception_codes={key: "internal"})


def test_envelope_rejects_exception_codes_outside_the_catalogue() -> None:
    with pytest.raises(ValueError, match="not in the catalogue"):
        EnvelopeMiddleware(scripted(), exception_codes={ValueError: "no_such_code"})


@pytest.mark.parametrize("exc", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1)])
async def test_envelope_never_turns_base_exceptions_into_responses(exc: BaseException) -> None:
    with pytest.raises(type(exc)):
        await call(envelope(raising(exc)))


@pytest.mark.parametrize("failing_app", ["raises", "returns"])
async def test_envelope_its_own_answer_to_a_client_that_left_is_a_warning(
    logs: Any, failing_app: str
) -> None:
    # ASGI 2.4 servers raise OSError from send once the client has gone: the
    # middleware's own 500 meets it, and there is no app left to raise it to.
    app = raising(RuntimeError("backend down")) if failing_app == "raises" else scripted()
    attempts: list[Message] = []

    async def send(message: Message) -> None:
        attempts.append(message)
        raise OSError("connection reset by peer")

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    await envelope(app)(make_scope(), receive, send)  # not raised to the server
    assert [m["type"] for m in attempts] == ["http.response.start"]
    [left] = [e for e in logs.entries if e["event"] == "client_disconnected"]
    assert isinstance(left["exc_info"], OSError)
    assert left["request_id"] == Sent([attempts[0]]).header("x-request-id")


@pytest.mark.parametrize("status", [204, 205, 304])
async def test_envelope_a_client_gone_before_a_bodiless_statuss_empty_body_is_a_warning(
    logs: Any, status: int
) -> None:
    # The middleware sends that empty body itself, in place of the app's: a failed
    # write of it is a client that left (ASGI 2.4), as for its start.
    app = scripted(start(status, [JSON]), body(b""))

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise OSError("connection reset by peer")

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    await envelope(app)(make_scope(), receive, send)  # not raised to the server
    assert [e["event"] for e in logs.entries if e["log_level"] in ("warning", "error")] == [
        "client_disconnected"
    ]


async def test_envelope_answers_500_when_the_app_returns_without_responding(logs: Any) -> None:
    sent = await call(EnvelopeMiddleware(scripted()))
    assert_error(sent, 500, "internal")
    assert [e["request_id"] for e in logs.entries if e["event"] == "app_returned_without_response"] == [
        sent.header("x-request-id")
    ]


@pytest.mark.parametrize("status", [200, 404])
async def test_envelope_answers_500_when_the_app_stops_while_the_start_is_held(status: int) -> None:
    sent = await call(envelope(scripted(start(status, [JSON]), body(b"{", more=True))))
    assert_error(sent, 500, "internal")


@pytest.mark.parametrize("status", [200, 404])
async def test_envelope_discards_a_held_response_when_the_app_raises(status: int) -> None:
    app = scripted(
        start(status, [JSON, (b"x-partial", b"1")]), body(b'{"a":', more=True), raise_after=ResourceNotFound()
    )
    sent = await call(envelope(app))
    assert_error(sent, 404, "resource_not_found")
    assert sent.header("x-partial") is None


async def test_envelope_never_starts_twice_once_bytes_are_out(logs: Any) -> None:
    app = scripted(
        start(200, [(b"content-type", b"text/plain")]),
        body(b"partial", more=True),
        raise_after=RuntimeError("late"),
    )
    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    with pytest.raises(RuntimeError, match="late"):
        await EnvelopeMiddleware(app)(_scope(), receive, send)
    assert [m["type"] for m in messages] == ["http.response.start", "http.response.body"]
    [event] = [e for e in logs.entries if e["event"] == "exception_after_response_started"]
    assert event["request_id"] == Sent(messages).header("x-request-id")
    assert event["response_complete"] is False


async def test_envelope_trusted_stream_that_fails_midway_is_not_completed() -> None:
    app = scripted(start(200, [JSON]), body(b'{"a": [1', more=True), raise_after=RuntimeError("backend died"))
    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    with pytest.raises(RuntimeError):
        await envelope(app, validate_json=False)(_scope(), receive, send)
    assert not Sent(messages).complete


async def test_envelope_logs_when_the_app_returns_mid_response(logs: Any) -> None:
    sent = await call(
        EnvelopeMiddleware(scripted(start(200, [(b"content-type", b"text/plain")]), body(b"a", more=True)))
    )
    assert not sent.complete
    assert any(e["event"] == "app_returned_mid_response" for e in logs.entries)


async def leave_during(app: Any) -> Sent:
    """Call `app` as uvicorn does (ASGI spec 2.3) for a client that leaves after 50 ms."""
    scope = make_scope()
    scope["asgi"]["spec_version"] = "2.3"  # Starlette's StreamingResponse then listens for the disconnect
    delivered = False
    sent = Sent()

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.messages.append(message)

    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize(
    ("media_type", "validate_json", "status"),
    [("application/json", True, None), ("application/json", False, 200), ("text/event-stream", True, 200)],
    ids=["validating", "trusted", "passing"],
)
async def test_envelope_a_client_leaving_a_stream_is_not_a_server_error(
    logs: Any, media_type: str, validate_json: bool, status: int | None
) -> None:
    async def slow(request: Request) -> Response:
        async def chunks() -> Any:
            for index in range(100):
                yield b"[%d," % index
                await asyncio.sleep(0.01)

        return StreamingResponse(chunks(), media_type=media_type)

    app = Starlette(
        routes=[Route("/", slow)], middleware=[Middleware(EnvelopeMiddleware, validate_json=validate_json)]
    )
    sent = await leave_during(app)
    assert not sent.complete
    assert [m["status"] for m in sent.messages if m["type"] == "http.response.start"] == (
        [] if status is None else [status]
    )
    assert [e for e in logs.entries if e["log_level"] == "error"] == []
    [left] = [e for e in logs.entries if e["event"] == "client_disconnected"]
    [access] = [e for e in logs.entries if e["event"] == "http_request"]
    assert left["log_level"] == "warning"
    assert left["request_id"] == access["request_id"]
    assert (access["status"], access["error_code"]) == (status, None)


async def test_envelope_a_bug_after_the_client_left_is_still_an_error(logs: Any) -> None:
    # Starlette runs a response's background task even after the client left.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(start(200, [(b"content-type", b"text/plain")]))
        await send(body(b"part", more=True))
        assert (await receive())["type"] == "http.disconnect"
        raise KeyError("audit")

    with pytest.raises(KeyError):
        await leave_during(envelope(app))
    assert [e["event"] for e in logs.entries if e["log_level"] == "error"] == [
        "exception_after_response_started"
    ]


@pytest.mark.parametrize(
    ("media_type", "validate_json", "failing"),
    [
        ("application/json", True, "http.response.body"),
        ("application/json", False, "http.response.body"),
        ("text/plain", True, "http.response.start"),
        ("text/plain", True, "http.response.body"),
    ],
    ids=["validating", "trusted", "passing-start", "passing-body"],
)
async def test_envelope_a_send_that_fails_for_a_client_that_left_is_a_warning(
    logs: Any, media_type: str, validate_json: bool, failing: str
) -> None:
    # ASGI 2.4 servers raise OSError from send instead of reporting a disconnect;
    # Starlette's StreamingResponse turns it into ClientDisconnect.
    async def stream(request: Request) -> Response:
        async def chunks() -> Any:
            yield b"[1,"
            yield b"2]"

        return StreamingResponse(chunks(), media_type=media_type)

    app = Starlette(
        routes=[Route("/", stream)],
        middleware=[Middleware(EnvelopeMiddleware, validate_json=validate_json, access_log=False)],
    )

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == failing:
            raise OSError("connection reset by peer")

    await app(make_scope(), receive, send)  # not raised: no one is there to be told
    [left] = [e for e in logs.entries if e["event"] == "client_disconnected"]
    assert isinstance(left["exc_info"], ClientDisconnect)
    assert [e for e in logs.entries if e["log_level"] == "error"] == []


async def test_envelope_a_disconnect_after_the_response_hides_no_later_exception(logs: Any) -> None:
    # Servers answer `receive` with http.disconnect once a response is complete;
    # a background task failing after that is the app's error, not a client leaving.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(start(200, [JSON]))
        await send(body(b"{}"))
        assert (await receive())["type"] == "http.disconnect"
        raise RuntimeError("background task failed")

    sent = await call(envelope(app))  # the response was whole: it stands, and is not aborted
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": {}}
    [event] = [e for e in logs.entries if e["log_level"] == "error"]
    assert (event["event"], event["response_complete"]) == ("exception_after_response_started", True)
    assert str(event["exc_info"]) == "background task failed"
    assert event["request_id"] == sent.header("x-request-id")
    assert not any(e["event"] == "client_disconnected" for e in logs.entries)


async def test_envelope_a_client_disconnect_after_the_client_left_answers_nobody(logs: Any) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        raise ClientDisconnect  # as Starlette raises it from a read that met the disconnect

    sent = await leave_during(envelope(app))
    assert sent.messages == []
    [left] = [e for e in logs.entries if e["event"] == "client_disconnected"]
    assert left["log_level"] == "warning"
    assert isinstance(left["exc_info"], ClientDisconnect)


async def test_envelope_the_apps_own_os_error_after_the_client_left_is_still_its_error(logs: Any) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        raise FileNotFoundError("/srv/exports/orders.json")

    assert_error(await leave_during(envelope(app)), 500, "internal")
    assert [e["event"] for e in logs.entries if e["log_level"] == "error"] == ["unhandled_exception"]
    assert not any(e["event"] == "client_disconnected" for e in logs.entries)


@pytest.mark.parametrize("validate_json", [True, False])
async def test_envelope_a_memoryview_after_a_keep_alive_space_streams_on(validate_json: bool) -> None:
    # Starlette's StreamingResponse passes memoryview chunks on as they are.
    app = scripted(start(200, [JSON]), body(b" ", more=True), {**body(b""), "body": memoryview(b" 1")})
    sent = await call(envelope(app, validate_json=validate_json))
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": 1}


async def test_envelope_answers_500_when_the_app_starts_twice_before_any_byte_is_out() -> None:
    sent = await call(envelope(scripted(start(200, [JSON]), start(200, [JSON]))))
    assert_error(sent, 500, "internal")


async def test_envelope_answers_500_when_the_app_sends_a_body_before_the_start() -> None:
    assert_error(await call(envelope(scripted(body(b"x")))), 500, "internal")


async def test_envelope_refuses_a_body_after_the_response_is_complete(logs: Any) -> None:
    app = scripted(start(200, [(b"content-type", b"text/plain")]), body(b"x"), body(b"y"))
    sent = await call(envelope(app))
    assert sent.body == b"x"  # the complete response stands; the app's bug is logged
    [event] = [e for e in logs.entries if e["log_level"] == "error"]
    assert "after the response was complete" in str(event["exc_info"])


@pytest.mark.parametrize("content_type", [b"text/plain", b"application/json"], ids=["passed", "wrapped"])
@pytest.mark.parametrize("validate_json", [True, False])
async def test_envelope_refuses_a_second_last_body_sent_before_the_first_is_awaited(
    logs: Any, content_type: bytes, validate_json: bool
) -> None:
    # The end of the body is decided when `send` is called: two last bodies handed
    # over at once must not give the server two bodies, or two starts and envelopes.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start(200, [(b"content-type", content_type)]))
        first = send(body(b"[1]"))
        try:
            send(body(b"[2]"))
        finally:
            await first

    sent = await call(envelope(app, validate_json=validate_json))
    assert [m["type"] for m in sent.messages] == ["http.response.start", "http.response.body"]
    assert b"[2]" not in sent.body
    [event] = [e for e in logs.entries if e["log_level"] == "error"]
    assert "after the response was complete" in str(event["exc_info"])


async def _request() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


_TRAILERS = {"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")], "more_trailers": False}


async def test_envelope_trailers_the_server_refuses_leave_the_response_incomplete(logs: Any) -> None:
    # With trailers announced, they are the response's last message, not the last body.
    app = scripted(start(200, [JSON], trailers=True), body(b"{}"), _TRAILERS)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.trailers":
            raise RuntimeError("the server cannot send trailers")

    with pytest.raises(RuntimeError, match="cannot send trailers"):
        await envelope(app)(make_scope(), _request, send)
    [event] = [e for e in logs.entries if e["event"] == "exception_after_response_started"]
    assert event["response_complete"] is False


async def test_envelope_an_app_that_announces_trailers_and_sends_none_is_mid_response(logs: Any) -> None:
    sent = await call(envelope(scripted(start(200, [JSON], trailers=True), body(b"{}"))))
    assert not sent.messages[-1].get("more_body", False)  # what the app sent, passed on
    assert [e["event"] for e in logs.entries if e["log_level"] == "error"] == ["app_returned_mid_response"]


async def test_envelope_trailers_complete_a_response_once_taken(logs: Any) -> None:
    sent = await call(envelope(scripted(start(200, [JSON], trailers=True), body(b"{}"), _TRAILERS)))
    assert sent.messages[-1] == _TRAILERS
    assert [e for e in logs.entries if e["log_level"] in ("warning", "error")] == []


async def test_envelope_access_event_has_no_status_when_the_server_refused_the_start(logs: Any) -> None:
    # README: `status` is what was sent, null if nothing was.
    async def send(message: Message) -> None:
        raise OSError("connection reset by peer")

    app = scripted(start(200, [(b"content-type", b"text/plain")]), body(b"x"))
    await EnvelopeMiddleware(app)(make_scope(), _request, send)
    [access] = [e for e in logs.entries if e["event"] == "http_request"]
    assert (access["status"], access["bytes_sent"]) == (None, 0)


async def test_envelope_access_event_has_no_error_code_when_the_server_refused_the_error(logs: Any) -> None:
    async def send(message: Message) -> None:
        raise OSError("connection reset by peer")

    await EnvelopeMiddleware(raising(ResourceNotFound()))(make_scope(), _request, send)
    [access] = [e for e in logs.entries if e["event"] == "http_request"]
    assert (access["status"], access["error_code"]) == (None, None)


@pytest.mark.parametrize("content_type", [b"text/plain", b"application/json"], ids=["passed", "wrapped"])
async def test_envelope_a_refused_body_before_the_start_ends_nothing(content_type: bytes) -> None:
    # The app's bug is refused; an app that catches it and responds is answered as usual.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        with pytest.raises(RuntimeError, match=r"before http\.response\.start"):
            await send(body(b"[1]"))
        await send(start(200, [(b"content-type", content_type)]))
        await send(body(b"[2]"))

    sent = await call(envelope(app))
    assert sent.status == 200
    if content_type == b"text/plain":
        assert sent.body == b"[2]"
    else:
        assert sent.json()["data"] == [2]


@pytest.mark.parametrize("validate_json", [True, False])
async def test_envelope_body_messages_sent_before_any_is_awaited_keep_their_order(
    validate_json: bool,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start(200, [JSON]))
        first, last = send(body(b"[1,", more=True)), send(body(b"2]"))
        await first
        await last

    sent = await call(envelope(app, validate_json=validate_json))
    assert [m["type"] for m in sent.messages].count("http.response.start") == 1
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": [1, 2]}
    assert sent.header("content-length") in (None, str(len(sent.body)))


@pytest.mark.parametrize("status", [204, 304])
async def test_envelope_a_bodyless_status_announces_and_sends_no_trailers(logs: Any, status: int) -> None:
    # RFC 9110 §6.5: no content, no trailer section; the response ends with its empty body.
    app = scripted(start(status, [JSON], trailers=True), body(b""), _TRAILERS)
    sent = await call(EnvelopeMiddleware(app))
    assert "trailers" not in sent.start
    assert [m["type"] for m in sent.messages] == ["http.response.start", "http.response.body"]
    assert [e for e in logs.entries if e["log_level"] in ("warning", "error")] == []


async def test_envelope_access_event_counts_bytes_of_a_typed_memoryview_in_a_stream(logs: Any) -> None:
    typed = memoryview(array.array("i", [0x79797979] * 4))  # 4 items, 16 bytes: b"yyyy" * 4
    messages = [
        body(b'"', more=True),
        {"type": "http.response.body", "body": typed, "more_body": True},
        body(b'"'),
    ]
    sent = await call(EnvelopeMiddleware(scripted(start(200, [JSON]), *messages), validate_json=False))
    assert sent.json()["data"] == "y" * 16
    [access] = [e for e in logs.entries if e["event"] == "http_request"]
    assert access["bytes_sent"] == len(sent.body)


async def test_envelope_access_event_counts_bytes_of_a_typed_memoryview(logs: Any) -> None:
    data = memoryview(array.array("i", [1, 2, 3, 4]))  # 4 items, 16 bytes
    # A bytes-like body, which servers accept.
    message = {"type": "http.response.body", "body": data}
    sent = await call(EnvelopeMiddleware(scripted(start(200, [(b"content-type", b"text/plain")]), message)))
    [access] = [e for e in logs.entries if e["event"] == "http_request"]
    assert access["bytes_sent"] == len(sent.body) == data.nbytes


# -- the error serializer cannot fail ---------------------------------------------


class Odd:
    def __str__(self) -> str:
        raise RuntimeError("cannot print me")


@pytest.mark.parametrize(
    "details",
    [
        {"n": 10**40},
        {1: "int key", (1, 2): "tuple key"},
        {"odd": Odd(), "set": {1}},
        {"text": "\ud800 lone surrogate"},
        {"nan": float("nan")},
    ],
    ids=["huge-int", "non-str-keys", "odd-object", "surrogate", "nan"],
)
async def test_envelope_error_serializer_never_fails(details: dict[Any, Any]) -> None:
    sent = await call(
        envelope(raising(ApiError("odd_details", "still answered", status=400, details=details)))
    )
    error = assert_error(sent, 400, "odd_details")
    assert error["message"] == "still answered"


async def test_envelope_error_serializer_falls_back_to_a_prebuilt_body() -> None:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    sent = await call(envelope(raising(ResourceNotFound("\ud800", details=cyclic))))
    error = assert_error(sent, 404, "resource_not_found")
    assert error == {
        "code": "resource_not_found",
        "message": DEFAULT_CATALOGUE["resource_not_found"].message,
        "details": {},
    }


# -- scope handling ----------------------------------------------------------------


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


def test_envelope_lets_websockets_work_in_a_starlette_app() -> None:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", echo)], middleware=[Middleware(EnvelopeMiddleware)])
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        ws.send_text("hi")
        assert ws.receive_text() == "hi"


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


# -- in a Starlette app, as users mount it ---------------------------------------------


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


# -- properties ------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    value=json_values,
    indent=st.sampled_from([None, 1, 2]),
    ascii_only=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=3),
    validate_json=st.booleans(),
)
def test_envelope_property_any_json_body_round_trips_byte_exact(
    value: Any, indent: int | None, ascii_only: bool, cuts: list[int], validate_json: bool
) -> None:
    data = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    messages = [body(p, more=True) for p in pieces[:-1]] + [body(pieces[-1])]
    sent = drive(envelope(scripted(start(200, [JSON]), *messages), validate_json=validate_json))
    request_id = sent.header("x-request-id") or ""
    assert sent.body == b'{"request_id":"' + request_id.encode() + b'","data":' + data + b"}"
    declared = sent.header("content-length")
    assert declared is None or int(declared) == len(sent.body)


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


json_whitespace = st.text(alphabet=" \t\r\n", max_size=4).map(str.encode)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    value=st.none() | json_values,
    bom=st.booleans(),
    lead=json_whitespace,
    trail=json_whitespace,
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=4),
    declare_length=st.booleans(),
    validate_json=st.booleans(),
)
def test_envelope_property_bom_and_whitespace_in_any_chunks_give_a_valid_envelope(
    *,
    value: Any,
    bom: bool,
    lead: bytes,
    trail: bytes,
    cuts: list[int],
    declare_length: bool,
    validate_json: bool,
) -> None:
    # None stands for no document at all: whitespace alone, which reads as an empty body.
    document = b"" if value is None else json.dumps(value).encode()
    data = (_http.BOM if bom else b"") + lead + document + trail
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    messages = [body(p, more=True) for p in pieces[:-1]] + [body(pieces[-1])]
    headers = [JSON, (b"content-length", str(len(data)).encode())] if declare_length else [JSON]
    sent = drive(envelope(scripted(start(200, headers), *messages), validate_json=validate_json))
    # json, not orjson: integers past 64 bits are among the values.
    assert json.loads(sent.body) == {"request_id": sent.header("x-request-id"), "data": value}
    declared = sent.header("content-length")
    assert declared is None or int(declared) == len(sent.body)
    if declare_length or len(pieces) == 1:
        assert declared is not None


@settings(max_examples=150, deadline=None)
@given(
    status=st.integers(min_value=400, max_value=599),
    content_type=st.sampled_from(
        [b"application/json", b"text/plain", b"text/html", b"application/problem+json"]
    ),
    data=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_envelope_property_any_error_status_gives_a_valid_error_envelope(
    status: int, content_type: bytes, data: bytes
) -> None:
    sent = drive(envelope(scripted(start(status, [(b"content-type", content_type)]), body(data))))
    error = assert_error(sent, status, sent.json()["error"]["code"])
    code = error["code"]
    assert code in DEFAULT_CATALOGUE
    if status >= 500:
        assert error["message"] == DEFAULT_CATALOGUE[code].message
        assert error["details"] == {}


@pytest.mark.parametrize(("message", "expected"), [(None, "Nothing here."), ("No order 9", "No order 9")])
async def test_envelope_catalogue_classes_speak_the_middlewares_catalogue(
    message: str | None, expected: str
) -> None:
    reworded = {"resource_not_found": "Nothing here."}
    catalogue = Catalogue(
        ErrorSpec(s.code, s.status, reworded.get(s.code, s.message), s.retryable)
        for s in DEFAULT_CATALOGUE.values()
    )
    sent = await call(envelope(raising(ResourceNotFound(message)), catalogue=catalogue))
    assert assert_error(sent, 404, "resource_not_found")["message"] == expected


def test_envelope_catalogue_extension_gives_a_gateway_its_own_codes() -> None:
    catalogue = DEFAULT_CATALOGUE.extend(
        [
            ErrorSpec("resource_unmapped", 404, "Unknown SKU."),
            ErrorSpec("resource_conflict", 409, "Conflict."),
        ],
        status_defaults={409: "resource_conflict"},
    )
    sent = drive(envelope(scripted(start(409), body(b"")), catalogue=catalogue))
    assert_error(sent, 409, "resource_conflict")
    kept = drive(
        envelope(
            scripted(start(404, [JSON]), body(b'{"code": "resource_unmapped", "message": "SKU 4"}')),
            catalogue=catalogue,
        )
    )
    assert assert_error(kept, 404, "resource_unmapped")["message"] == "SKU 4"


def _scope(method: str = "GET", path: str = "/") -> Scope:
    return make_scope(method, path)


async def _never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError  # pragma: no cover


async def _nowhere(message: Message) -> None:
    raise AssertionError(f"nothing should be sent: {message}")  # pragma: no cover


def test_envelope_content_type_cache_stays_bounded() -> None:
    for i in range(400):
        assert _http.is_json_media_type(b"application/x%d+json" % i)
    assert len(_http._json_media) <= 256


# -- edges found in review ------------------------------------------------------------


async def test_envelope_answers_502_for_json_nested_deeper_than_the_parser_allows() -> None:
    sent = await call(envelope(scripted(start(200, [JSON]), body(b"[" * 5000 + b"]" * 5000))))
    assert_error(sent, 502, "downstream_invalid_response")


async def test_envelope_205_says_content_length_zero_and_sends_no_body() -> None:
    sent = await call(envelope(JSONResponse(None, status_code=205)))
    assert sent.status == 205
    assert sent.header("content-length") == "0"
    assert sent.body == b""


async def test_envelope_304_keeps_its_content_length() -> None:
    sent = await call(envelope(scripted(start(304, [(b"content-length", b"1234")]), body(b""))))
    assert sent.header("content-length") == "1234"


async def test_envelope_writes_numeric_exception_headers_and_drops_unusable_ones() -> None:
    headers: dict[str, Any] = {"Retry-After": 30, "X-Ratio": 0.5, "X-Flag": True, "X-None": None}
    sent = await call(envelope(raising(ApiError("slow_down", "m", status=429, headers=headers))))
    assert_error(sent, 429, "slow_down")
    assert (sent.header("retry-after"), sent.header("x-ratio")) == ("30", "0.5")
    assert sent.header("x-flag") is None
    assert sent.header("x-none") is None


@pytest.mark.parametrize("value", ['Basic realm="a\x0bb"', "a\x7fb", "tab\tok"])
async def test_envelope_refuses_control_characters_in_exception_headers(value: str) -> None:
    sent = await call(
        envelope(raising(ApiError("x_y", "m", status=401, headers={"WWW-Authenticate": value})))
    )
    assert sent.header("www-authenticate") == (value if value == "tab\tok" else None)


def zerocopy(*, more: bool) -> Message:
    return {"type": "http.response.zerocopysend", "file": 3, "count": 10, "more_body": more}


async def test_envelope_error_from_zerocopysend_parts_answers_once_at_the_last_part() -> None:
    app = scripted(start(500, [(b"content-type", b"text/plain")]), zerocopy(more=True), zerocopy(more=False))
    sent = await call(envelope(app))
    assert_error(sent, 500, "internal")
    assert [m["type"] for m in sent.messages] == ["http.response.start", "http.response.body"]


async def test_envelope_passes_zerocopysend_followed_by_body() -> None:
    app = scripted(start(200, [(b"content-type", b"text/plain")]), zerocopy(more=True), body(b"tail"))
    sent = await call(envelope(app))
    assert [m["type"] for m in sent.messages][1:] == ["http.response.zerocopysend", "http.response.body"]
    assert sent.complete


async def test_envelope_refuses_a_file_after_the_response_is_complete(logs: Any) -> None:
    app = scripted(start(200, [(b"content-type", b"text/plain")]), body(b"x"), zerocopy(more=False))
    sent = await call(envelope(app))
    assert [m["type"] for m in sent.messages] == ["http.response.start", "http.response.body"]
    [event] = [e for e in logs.entries if e["log_level"] == "error"]
    assert "after the response was complete" in str(event["exc_info"])


async def test_envelope_wrapped_response_drops_transfer_encoding_and_accept_ranges() -> None:
    headers = [JSON, (b"transfer-encoding", b"chunked"), (b"accept-ranges", b"bytes")]
    sent = await call(envelope(scripted(start(200, headers), body(b'{"a":1}'))))
    assert sent.header("transfer-encoding") is None
    assert sent.header("accept-ranges") is None
    assert sent.header("content-length") == str(len(sent.body))


async def test_envelope_error_details_from_any_mapping_stay_an_object() -> None:
    details = MappingProxyType({"field": "page"})
    sent = await call(envelope(raising(ApiError("bad_page", "m", status=400, details=details))))
    assert assert_error(sent, 400, "bad_page")["details"] == {"field": "page"}


async def test_envelope_http_exception_detail_that_is_not_text_is_not_the_message() -> None:
    sent = await call(envelope(raising(HTTPException(403, {"reason": "x"}))))  # type: ignore[arg-type]
    assert assert_error(sent, 403, "auth_forbidden")["message"] == DEFAULT_CATALOGUE["auth_forbidden"].message


def test_envelope_excluded_paths_are_relative_to_a_mount() -> None:
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    inner = Starlette(
        routes=[Route("/health", health)],
        middleware=[Middleware(EnvelopeMiddleware, exclude_paths=["/health"], access_log=False)],
    )
    outer = Starlette(routes=[Mount("/api", app=inner)])
    with TestClient(outer) as client:
        response = client.get("/api/health")
    assert response.json() == {"status": "ok"}
    assert response.headers["x-request-id"]


async def test_envelope_reads_headers_given_as_a_one_shot_iterable() -> None:
    pairs = [JSON, (b"cache-control", b"no-store"), (b"set-cookie", b"a=1")]
    app = scripted({"type": "http.response.start", "status": 200, "headers": (p for p in pairs)}, body(b"{}"))
    sent = await call(envelope(app))
    assert sent.header("cache-control") == "no-store"
    assert sent.header("set-cookie") == "a=1"
    assert sent.json()["data"] == {}


async def test_envelope_5xx_keeps_only_headers_that_reveal_nothing() -> None:
    headers = [
        (b"content-type", b"text/plain"),
        (b"server", b"nginx/1.19 orders-7.internal"),
        (b"x-backend-host", b"orders-7.internal"),
        (b"retry-after", b"5"),
        (b"access-control-allow-origin", b"*"),
    ]
    sent = await call(envelope(scripted(start(503, headers), body(b"down"))))
    assert_error(sent, 503, "service_unavailable")
    assert sent.header("server") is None
    assert sent.header("x-backend-host") is None
    assert sent.header("retry-after") == "5"
    assert sent.header("access-control-allow-origin") == "*"


@pytest.mark.parametrize("name", ["ETag", "content-length"])
def test_envelope_rejects_a_body_header_as_the_id_header(name: str) -> None:
    with pytest.raises(ValueError, match="body header"):
        EnvelopeMiddleware(scripted(), request_id_header=name)


async def test_envelope_drops_exception_headers_that_are_not_latin1() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ApiError("x_y", "m", status=400, headers={"X-Euro": "€", "X-Fine": "ok"})

    sent = await call(EnvelopeMiddleware(app, access_log=False))
    assert sent.header("x-euro") is None
    assert sent.header("x-fine") == "ok"


async def test_envelope_creates_scope_state_when_the_server_gave_none() -> None:
    scope = make_scope()
    del scope["state"]
    sent = await call(
        EnvelopeMiddleware(scripted(start(200, [JSON]), body(b"{}")), access_log=False), scope=scope
    )
    assert scope["state"] == {"request_id": sent.header("x-request-id")}


# -- bytes-like messages and invalid starts -------------------------------------


@pytest.mark.parametrize("kind", [bytearray, memoryview])
@pytest.mark.parametrize("validate_json", [True, False])
async def test_envelope_reads_bytes_like_header_values_and_bodies_as_servers_do(
    kind: type, validate_json: bool
) -> None:
    headers = [(kind(b"content-type"), kind(b"application/json")), (kind(b"x-trace"), kind(b"t1"))]
    app = scripted(start(200, headers), {"type": "http.response.body", "body": kind(b'{"a":1}')})
    sent = await call(envelope(app, validate_json=validate_json))
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": {"a": 1}}
    assert sent.header("x-trace") == "t1"
    assert sent.header("content-length") == str(len(sent.body))


@pytest.mark.parametrize("kind", [bytearray, memoryview])
async def test_envelope_passes_and_replaces_responses_with_bytes_like_headers(kind: type) -> None:
    page = scripted(start(200, [(kind(b"content-type"), kind(b"text/html"))]), body(b"<p>hi</p>"))
    sent = await call(envelope(page))
    assert sent.body == b"<p>hi</p>"
    assert sent.header("x-request-id")
    missing = scripted(start(404, [(kind(b"content-type"), kind(b"text/plain"))]), body(b"Not Found"))
    assert_error(await call(envelope(missing)), 404, "resource_not_found")


@pytest.mark.parametrize("status", [0, 100, 199, 600, 999, 200.0, 404.0, True, "200"])
async def test_envelope_answers_500_for_a_status_that_is_not_a_final_response(status: object) -> None:
    not_final = {"type": "http.response.start", "status": status, "headers": [JSON]}
    sent = await call(envelope(scripted(not_final, body(b"{}"))))
    assert_error(sent, 500, "internal")


async def test_envelope_an_int_subclass_status_is_a_status() -> None:
    # HTTPStatus members are ints, which ASGI asks for and servers accept.
    async def created(_request: Request) -> Response:
        return JSONResponse({"id": 1}, status_code=HTTPStatus.CREATED)

    async def missing(_request: Request) -> Response:
        raise HTTPException(status_code=HTTPStatus.NOT_FOUND, detail="No order 9")

    app = Starlette(
        routes=[Route("/created", created), Route("/missing", missing)],
        middleware=[Middleware(EnvelopeMiddleware, access_log=False)],
    )
    sent = await call(app, path="/created")
    assert (sent.status, sent.json()["data"]) == (201, {"id": 1})
    sent = await call(app, path="/missing")
    assert assert_error(sent, 404, "resource_not_found")["message"] == "No order 9"


@pytest.mark.parametrize("validate_json", [True, False])
async def test_envelope_a_last_message_the_server_refuses_is_no_complete_response(
    logs: Any, validate_json: bool
) -> None:
    # A server refuses a message it cannot write (uvicorn: an invalid header value)
    # by raising; the response is not whole, so the error goes on to the server.
    app = scripted(start(200, [JSON, (b"x-note", b"bad\nvalue")]), body(b"{}"))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            raise RuntimeError("Invalid HTTP header value.")

    with pytest.raises(RuntimeError, match="Invalid HTTP header"):
        await envelope(app, validate_json=validate_json)(make_scope(), receive, send)
    [event] = [e for e in logs.entries if e["event"] == "exception_after_response_started"]
    assert event["response_complete"] is False


@pytest.mark.parametrize(
    ("headers", "excluded"),
    [([(b"content-type", b"text/html")], False), ([JSON], True)],
    ids=["not-json", "excluded-path"],
)
async def test_envelope_a_passed_through_last_message_the_server_refuses_is_no_complete_response(
    logs: Any, headers: list[tuple[bytes, bytes]], excluded: bool
) -> None:
    # A body passed through as it is counts as complete only once the server took
    # its last message, as an enveloped one does.
    app = scripted(start(200, headers), body(b"<p>1</p>", more=True), body(b"<p>2</p>"))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            raise RuntimeError("Response content longer than Content-Length")
        sent.append(message)

    middleware = EnvelopeMiddleware(app, exclude_paths=["/"] if excluded else ())
    with pytest.raises(RuntimeError, match="longer than Content-Length"):
        await middleware(make_scope(), receive, send)
    [event] = [e for e in logs.entries if e["event"] == "exception_after_response_started"]
    assert event["response_complete"] is False
    [access] = [e for e in logs.entries if e["event"] == "http_request"]
    assert access["bytes_sent"] == len(b"<p>1</p>")  # what the server took


async def test_envelope_a_client_gone_before_a_passed_through_file_is_a_warning(logs: Any) -> None:
    # pathsend is passed through as it is; an OSError from the server is still a client that left.
    app = scripted(
        start(200, [(b"content-type", b"text/html")]), {"type": "http.response.pathsend", "path": "/x"}
    )

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.pathsend":
            raise OSError("connection reset by peer")

    await envelope(app)(make_scope(), receive, send)  # a client that left: not raised
    assert [e["event"] for e in logs.entries if e["log_level"] in ("warning", "error")] == [
        "client_disconnected"
    ]


async def test_envelope_reads_the_first_of_duplicate_content_types_on_every_path() -> None:
    headers = [(b"content-type", b"text/html"), (b"content-type", b"application/json")]
    sent = await call(envelope(scripted(start(200, headers), body(b"<p>not json</p>"))))
    assert sent.status == 200
    assert sent.body == b"<p>not json</p>"
    # An error body under the same headers is read as plain text, not as its JSON.
    text = [(b"content-type", b"text/plain"), (b"content-type", b"application/json")]
    payload = b'{"error": {"code": "resource_not_found", "message": "m"}}'
    error = assert_error(
        await call(envelope(scripted(start(404, text), body(payload)))), 404, "resource_not_found"
    )
    assert error["message"] == payload.decode()


async def test_envelope_counts_a_start_as_sent_only_once_it_is(logs: Any) -> None:
    # The app cancels what `send` returned for its start, then fails: nothing
    # went out, so the client still gets the error envelope.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.ensure_future(send(start(200, [(b"content-type", b"text/plain")])))
        task.cancel()
        raise ValueError("boom")

    assert_error(await call(envelope(app)), 500, "internal")


async def test_envelope_reads_a_bytes_like_content_length_of_a_streamed_body() -> None:
    length: Any = memoryview(b"7")  # servers accept any bytes-like value
    app = scripted(start(200, [JSON, (b"content-length", length)]), body(b'{"a":', more=True), body(b"1}"))
    for options in ({"validate_json": False}, {"max_validated_size": 0}):
        sent = await call(envelope(app, **options))
        assert sent.json() == {"request_id": sent.header("x-request-id"), "data": {"a": 1}}
        assert sent.header("content-length") == str(len(sent.body))


async def test_envelope_strips_a_root_path_only_as_a_whole_segment() -> None:
    app = envelope(scripted(start(200, [JSON]), body(b"{}")), exclude_paths=["/health"])
    scope = {**make_scope("GET", "/health"), "root_path": "/h"}
    assert (await call(app, scope=scope)).body == b"{}"
    mounted = {**make_scope("GET", "/h/health"), "root_path": "/h"}
    assert (await call(app, scope=mounted)).body == b"{}"


@pytest.mark.parametrize(
    ("headers", "retry_after"), [([("Retry-After", "5")], "5"), (5, None), (["x"], None)]
)
async def test_envelope_reads_http_exception_headers_given_as_pairs_and_drops_others(
    headers: Any, retry_after: str | None
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise HTTPException(429, headers=headers)

    sent = await call(envelope(app))
    assert_error(sent, 429, "rate_limited")
    assert sent.header("retry-after") == retry_after


async def test_envelope_sends_the_headers_of_an_api_error_given_as_pairs() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ApiError("rate_limited", "slow down", status=429, headers=[("Retry-After", "5")])

    sent = await call(envelope(app))
    assert_error(sent, 429, "rate_limited")
    assert sent.header("retry-after") == "5"


def test_envelope_refuses_a_stdlib_logger_it_could_not_call() -> None:
    stdlib = logging.getLogger("gateway")
    for logger in (stdlib, logging.LoggerAdapter(stdlib)):
        with pytest.raises(TypeError, match="structlog logger"):
            EnvelopeMiddleware(scripted(), logger=logger)


# -- max_validated_size ---------------------------------------------------------


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


@pytest.mark.parametrize("size", [-1, True, 1.5, float("nan")])
def test_envelope_refuses_a_max_validated_size_that_is_not_a_size(size: int) -> None:
    with pytest.raises(ValueError, match="max_validated_size"):
        EnvelopeMiddleware(scripted(), max_validated_size=size)


@pytest.mark.parametrize("declared", [b"abc", b"9" * 5000])
async def test_envelope_leaves_framing_to_the_server_for_a_nonsense_content_length(declared: bytes) -> None:
    app = scripted(start(200, [JSON, (b"content-length", declared)]), body(b'{"a":', more=True), body(b"1}"))
    sent = await call(envelope(app, validate_json=False))
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": {"a": 1}}
    assert sent.header("content-length") is None
