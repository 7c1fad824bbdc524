"""2xx JSON gets the success envelope, its bytes untouched.

From "The contract, response by response":

    2xx, `application/json`, `+json`, or the old `text/json` and `x-json` aliases (any case,
    with parameters)
        -> `{"request_id", "data": <bytes>}`, one correct `Content-Length` (in trusted mode, when
        the app gave one or the body came in one message; otherwise the server frames the
        stream), `Content-Type: application/json`; strong `ETag`, `Digest`, `Content-Digest`,
        `Repr-Digest`, `Content-MD5` and `Accept-Ranges` dropped, weak `ETag` and
        `Last-Modified` kept
    2xx JSON with an empty body, or only whitespace
        -> `"data": null`
    2xx JSON with a UTF-8 BOM
        -> the BOM is dropped (RFC 8259 §8.1), the rest wrapped, in both modes and however the
        body is split into messages
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from envelope_middleware import EnvelopeMiddleware, _http
from tests.conftest import (
    HEX_ID,
    JSON,
    Sent,
    _scope,
    body,
    call,
    drive,
    envelope,
    json_values,
    scripted,
    start,
)

pytestmark = pytest.mark.filterwarnings("error")


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


def test_envelope_content_type_cache_stays_bounded() -> None:
    for i in range(400):
        assert _http.is_json_media_type(b"application/x%d+json" % i)
    assert len(_http._json_media) <= 256


@pytest.mark.parametrize("validate_json", [True, False])
async def test_envelope_turns_empty_2xx_body_into_null_data(validate_json: bool) -> None:
    app = envelope(scripted(start(201, [JSON]), body(b"", more=True), body(b"")), validate_json=validate_json)
    sent = await call(app)
    assert sent.status == 201
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": None}
    assert sent.header("content-length") == str(len(sent.body))


async def test_envelope_trusted_mode_ends_a_stream_of_whitespace_alone_with_null() -> None:
    app = scripted(start(200, [JSON]), body(b" ", more=True), body(b"\t", more=True), body(b"\r\n"))
    sent = await call(envelope(app, validate_json=False))
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": None}


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


@pytest.mark.parametrize("declared", [b"abc", b"9" * 5000])
async def test_envelope_leaves_framing_to_the_server_for_a_nonsense_content_length(declared: bytes) -> None:
    app = scripted(start(200, [JSON, (b"content-length", declared)]), body(b'{"a":', more=True), body(b"1}"))
    sent = await call(envelope(app, validate_json=False))
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": {"a": 1}}
    assert sent.header("content-length") is None


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


async def test_envelope_wrapped_response_drops_transfer_encoding_and_accept_ranges() -> None:
    headers = [JSON, (b"transfer-encoding", b"chunked"), (b"accept-ranges", b"bytes")]
    sent = await call(envelope(scripted(start(200, headers), body(b'{"a":1}'))))
    assert sent.header("transfer-encoding") is None
    assert sent.header("accept-ranges") is None
    assert sent.header("content-length") == str(len(sent.body))


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
