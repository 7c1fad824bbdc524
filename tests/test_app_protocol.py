"""What an ASGI app may send, in every form servers accept, and what it must not.

No row of "The contract, response by response" names these. Bytes-like bodies and header
values, an `int` subclass as status, headers as a one-shot iterable and `send` awaited late or
as a task are read as servers read them. An app's misuse (a body before the start, a second
start, a status that is not a final one) is answered as the row it amounts to:

    an exception before any byte is out
        -> an error envelope (see Errors), anything held is discarded

and anything sent after the last body is refused, the complete response standing.
"""

from __future__ import annotations

import array
import asyncio
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from envelope_middleware import EnvelopeMiddleware
from tests.conftest import JSON, assert_error, body, call, envelope, make_scope, scripted, start, zerocopy

pytestmark = pytest.mark.filterwarnings("error")


@pytest.mark.parametrize("validate_json", [True, False])
def test_envelope_wraps_a_starlette_stream_of_memoryviews(validate_json: bool) -> None:
    # Starlette's StreamingResponse passes memoryview chunks on as they are, and servers take them.
    async def export(request: Request) -> Response:
        async def chunks() -> AsyncIterator[memoryview]:
            for chunk in (b'{"orders": [', b'"ord_1", ', b'"ord_2"]}'):
                yield memoryview(chunk)

        return StreamingResponse(chunks(), status_code=HTTPStatus.OK, media_type="application/json")

    app = Starlette(
        routes=[Route("/export", export)],
        middleware=[Middleware(EnvelopeMiddleware, validate_json=validate_json)],
    )
    with TestClient(app) as client:
        response = client.get("/export")
    assert response.status_code == 200
    assert response.json() == {
        "request_id": response.headers["x-request-id"],
        "data": {"orders": ["ord_1", "ord_2"]},
    }


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


async def test_envelope_answers_500_when_the_app_starts_twice_before_any_byte_is_out() -> None:
    sent = await call(envelope(scripted(start(200, [JSON]), start(200, [JSON]))))
    assert_error(sent, 500, "internal")


async def test_envelope_answers_500_when_the_app_sends_a_body_before_the_start() -> None:
    assert_error(await call(envelope(scripted(body(b"x")))), 500, "internal")


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


async def test_envelope_refuses_a_body_after_the_response_is_complete(logs: Any) -> None:
    app = scripted(start(200, [(b"content-type", b"text/plain")]), body(b"x"), body(b"y"))
    sent = await call(envelope(app))
    assert sent.body == b"x"  # the complete response stands; the app's bug is logged
    [event] = [e for e in logs.entries if e["log_level"] == "error"]
    assert "after the response was complete" in str(event["exc_info"])


async def test_envelope_refuses_a_file_after_the_response_is_complete(logs: Any) -> None:
    app = scripted(start(200, [(b"content-type", b"text/plain")]), body(b"x"), zerocopy(more=False))
    sent = await call(envelope(app))
    assert [m["type"] for m in sent.messages] == ["http.response.start", "http.response.body"]
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


async def test_envelope_reads_headers_given_as_a_one_shot_iterable() -> None:
    pairs = [JSON, (b"cache-control", b"no-store"), (b"set-cookie", b"a=1")]
    app = scripted({"type": "http.response.start", "status": 200, "headers": (p for p in pairs)}, body(b"{}"))
    sent = await call(envelope(app))
    assert sent.header("cache-control") == "no-store"
    assert sent.header("set-cookie") == "a=1"
    assert sent.json()["data"] == {}


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


@pytest.mark.parametrize("validate_json", [True, False])
async def test_envelope_a_memoryview_after_a_keep_alive_space_streams_on(validate_json: bool) -> None:
    # Starlette's StreamingResponse passes memoryview chunks on as they are.
    app = scripted(start(200, [JSON]), body(b" ", more=True), {**body(b""), "body": memoryview(b" 1")})
    sent = await call(envelope(app, validate_json=validate_json))
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": 1}


async def test_envelope_reads_a_bytes_like_content_length_of_a_streamed_body() -> None:
    length: Any = memoryview(b"7")  # servers accept any bytes-like value
    app = scripted(start(200, [JSON, (b"content-length", length)]), body(b'{"a":', more=True), body(b"1}"))
    for options in ({"validate_json": False}, {"max_validated_size": 0}):
        sent = await call(envelope(app, **options))
        assert sent.json() == {"request_id": sent.header("x-request-id"), "data": {"a": 1}}
        assert sent.header("content-length") == str(len(sent.body))


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


async def test_envelope_a_start_refused_for_its_headers_can_be_sent_again() -> None:
    # Header names that cannot be read even as bytes: the start is refused with
    # TypeError, and an app that catches it may still answer (issue #13 review:
    # the refused start had already set the mode, so the retry became a 500).
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        with pytest.raises(TypeError):
            await send({"type": "http.response.start", "status": 302, "headers": [(1, b"x")]})
        await send(start(302, [(b"location", b"/x")]))
        await send(body())

    sent = await call(EnvelopeMiddleware(app))
    assert sent.status == 302
    assert sent.header("location") == "/x"


async def test_envelope_a_body_after_a_refused_start_is_refused_too() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        with pytest.raises(TypeError):
            await send({"type": "http.response.start", "status": 302, "headers": [(1, b"x")]})
        await send(body(b"hello"))

    sent = await call(EnvelopeMiddleware(app))
    assert sent.status == 500  # the body without a start is the app's bug, answered, not passed on
    assert b"hello" not in sent.body


# What ASGI allows and servers or apps send, beyond what the annotations say. The compiled
# build checks annotations at run time (tests/test_build.py), so each of these once failed
# there alone.


@pytest.mark.parametrize("status", [200, 302, 404])
async def test_envelope_reads_response_header_pairs_given_as_lists(status: int) -> None:
    # ASGI's headers are an iterable of two-item iterables: lists are pairs too.
    headers = [[b"content-type", b"application/json"], [b"x-trace", b"t1"]]
    app = scripted({"type": "http.response.start", "status": status, "headers": headers}, body(b"{}"))
    sent = await call(envelope(app))
    assert sent.status == status
    assert sent.header("x-trace") == "t1"  # kept by every mode
    if status == 200:
        assert sent.json()["data"] == {}
    if status == 404:
        assert_error(sent, 404, "resource_not_found")


@pytest.mark.parametrize("status", [401, 500])
async def test_envelope_reads_request_header_pairs_given_as_lists(status: int) -> None:
    # Mangum (API Gateway, Lambda) gives the scope's headers as lists.
    scope = make_scope(headers=[("authorization", "Bearer t")])
    scope["headers"] = [[name, bytearray(value)] for name, value in scope["headers"]]
    app = scripted(start(status, [(b"content-type", b"text/plain")]), body(b"no"))
    sent = await call(envelope(app), scope=scope)
    assert_error(sent, status, "auth_invalid_credential" if status == 401 else "internal")


async def test_envelope_trusts_an_incoming_id_given_as_a_bytearray() -> None:
    scope = make_scope(headers=[("x-request-id", "abc-123")])
    scope["headers"] = [(name, bytearray(value)) for name, value in scope["headers"]]
    sent = await call(envelope(scripted(start(200, [JSON]), body(b"{}")), trust_request_id=True), scope=scope)
    assert sent.header("x-request-id") == "abc-123"


@pytest.mark.parametrize("validate_json", [True, False])
async def test_envelope_reads_a_more_body_that_is_any_truthy_value(validate_json: bool) -> None:
    app = scripted(
        start(200, [JSON]),
        {"type": "http.response.body", "body": b'{"a":', "more_body": 1},
        {"type": "http.response.body", "body": b"1}", "more_body": 0},
    )
    sent = await call(envelope(app, validate_json=validate_json))
    assert sent.json() == {"request_id": sent.header("x-request-id"), "data": {"a": 1}}


async def test_envelope_excluded_paths_read_a_root_path_of_none() -> None:
    scope = make_scope(path="/health")
    scope["root_path"] = None
    app = envelope(scripted(start(200, [JSON]), body(b"{}")), exclude_paths=["/health"])
    sent = await call(app, scope=scope)
    assert sent.body == b"{}"
