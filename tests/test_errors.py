"""The error policy's edges: configuration checks, caches and serializer fallbacks."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from decimal import Decimal
from typing import Any

import aiohttp
import httpx
import httpx2
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from envelope_middleware import DEFAULT_CATALOGUE, ApiError, Catalogue, EnvelopeMiddleware, ErrorSpec
from envelope_middleware._errors import ErrorPolicy
from tests._server import serve
from tests.conftest import JSON, Sent, body, call, make_scope, scripted, start


def policy(**options: Any) -> ErrorPolicy:
    return ErrorPolicy(
        DEFAULT_CATALOGUE,
        allowed_codes=options.get("allowed_codes", ()),
        exception_codes=options.get("exception_codes", {}),
    )


def test_errors_policy_rejects_allowed_codes_that_are_not_codes() -> None:
    with pytest.raises(ValueError, match="lower_snake_case"):
        policy(allowed_codes=["Not A Code"])


def test_errors_policy_needs_the_codes_the_middleware_answers_with() -> None:
    minimal = Catalogue([ErrorSpec("request_invalid", 400, "m"), ErrorSpec("internal", 500, "m")])
    with pytest.raises(ValueError, match="downstream_invalid_response"):
        ErrorPolicy(minimal, allowed_codes=(), exception_codes={})


def test_errors_exception_lookup_cache_is_bounded() -> None:
    errors = policy()
    kinds = [type(f"Dynamic{i}", (Exception,), {}) for i in range(1100)]
    for kind in kinds:
        assert errors.from_exception(kind(), has_credentials=False).code == "internal"
    assert len(errors._mapped) == 1024


def test_errors_render_of_an_unserialisable_custom_code_keeps_the_code() -> None:
    cyclic: dict[str, Any] = {}
    cyclic["again"] = cyclic
    failure = policy().from_exception(
        ApiError("menu_locked", "m", status=423, details=cyclic), has_credentials=False
    )
    document = orjson.loads(policy().render(b"rid", failure))
    assert document == {
        "request_id": "rid",
        "error": {"code": "menu_locked", "message": "The request failed.", "details": {}},
    }


def test_errors_render_writes_decimals_sets_and_tuples() -> None:
    exc = ApiError(
        "odd_values", "m", status=400, details={"price": Decimal("4.50"), "tags": {"a"}, "pair": (1, 2)}
    )
    document = orjson.loads(policy().render(b"rid", policy().from_exception(exc, has_credentials=False)))
    assert document["error"]["details"] == {"price": "4.50", "tags": ["a"], "pair": [1, 2]}


@settings(max_examples=200, deadline=None)
@given(
    details=st.dictionaries(
        st.text(max_size=5) | st.integers(),
        st.recursive(
            st.none() | st.integers() | st.floats() | st.text() | st.binary(max_size=5) | st.decimals(),
            lambda children: st.lists(children, max_size=3) | st.sets(st.integers(), max_size=3),
            max_leaves=10,
        ),
        max_size=5,
    ),
    message=st.text(max_size=50),
)
def test_errors_property_render_always_gives_valid_json(details: dict[Any, Any], message: str) -> None:
    failure = policy().from_exception(
        ApiError("any_code", message, status=400, details=details), has_credentials=False
    )
    document = orjson.loads(policy().render(b"rid", failure))
    assert document["error"]["code"] == "any_code"
    assert isinstance(document["error"]["details"], dict)


@pytest.mark.parametrize(
    "message",
    ["x" * 2000, "tab\tinside", "   "],
    ids=["too-long", "unprintable", "blank"],
)
async def test_errors_service_messages_that_are_not_messages_are_replaced(message: str) -> None:
    payload = orjson.dumps({"error": {"code": "request_invalid", "message": message}})
    sent = await call(EnvelopeMiddleware(scripted(start(400, [JSON]), body(payload)), access_log=False))
    assert sent.json()["error"]["message"] == DEFAULT_CATALOGUE["request_invalid"].message


async def test_errors_plain_text_that_is_not_utf8_is_not_a_message() -> None:
    app = scripted(start(400, [(b"content-type", b"text/plain")]), body(b"caf\xe9"))
    sent = await call(EnvelopeMiddleware(app, access_log=False))
    assert sent.json()["error"]["message"] == DEFAULT_CATALOGUE["request_invalid"].message


@pytest.mark.parametrize("client_module", [httpx2, httpx], ids=["httpx2", "httpx"])
async def test_errors_connect_failure_to_a_service_is_502_downstream_unavailable(
    client_module: Any, logs: Any
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async with client_module.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/orders")

    sent = await call(EnvelopeMiddleware(app))
    error = sent.json()["error"]
    assert (sent.status, error["code"]) == (502, "downstream_unavailable")
    assert "127.0.0.1" not in sent.body.decode()
    [event] = [e for e in logs.entries if e["event"] == "mapped_exception"]
    assert isinstance(event["exc_info"], client_module.ConnectError)
    assert event["request_id"] == sent.header("x-request-id")


@pytest.mark.parametrize("client_module", [httpx2, httpx], ids=["httpx2", "httpx"])
def test_errors_read_timeout_from_a_service_is_504_downstream_timeout(client_module: Any) -> None:
    async def slow(request: Request) -> Response:
        await asyncio.sleep(2)
        return Response(b"{}", media_type="application/json")

    backend = Starlette(routes=[Route("/slow", slow)])
    with serve(backend) as base:

        async def app(scope: Any, receive: Any, send: Any) -> None:
            async with client_module.AsyncClient(timeout=0.2) as client:
                await client.get(f"{base}/slow")

        sent = asyncio.run(call(EnvelopeMiddleware(app, access_log=False)))
    assert (sent.status, sent.json()["error"]["code"]) == (504, "downstream_timeout")


def test_errors_protocol_error_from_a_service_is_502(logs: Any) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise httpx2.RemoteProtocolError("peer closed connection without sending complete message body")

    sent = asyncio.run(call(EnvelopeMiddleware(app)))
    assert (sent.status, sent.json()["error"]["code"]) == (502, "downstream_unavailable")
    assert b"peer closed" not in sent.body


async def test_errors_a_401_status_default_set_by_the_gateway_wins() -> None:
    catalogue = DEFAULT_CATALOGUE.extend(
        [ErrorSpec("auth_expired", 401, "The session expired.")], status_defaults={401: "auth_expired"}
    )
    mw = EnvelopeMiddleware(scripted(start(401), body(b"")), catalogue=catalogue, access_log=False)
    sent = await call(mw, headers=[("authorization", "Bearer x")])
    assert sent.json()["error"]["code"] == "auth_expired"


@pytest.mark.parametrize(
    ("authorization", "code"), [(None, "auth_missing"), ("Basic eDp5", "auth_invalid_credential")]
)
async def test_errors_a_credential_code_as_401_default_still_follows_the_request(
    authorization: str | None, code: str
) -> None:
    catalogue = DEFAULT_CATALOGUE.extend(status_defaults={401: "auth_invalid_credential"})
    mw = EnvelopeMiddleware(scripted(start(401), body(b"")), catalogue=catalogue, access_log=False)
    sent = await call(mw, headers=[("authorization", authorization)] if authorization else [])
    assert sent.json()["error"]["code"] == code


@pytest.mark.parametrize("client_module", [httpx2, httpx], ids=["httpx2", "httpx"])
@pytest.mark.parametrize(
    ("backend_status", "code"), [(404, "downstream_invalid_response"), (503, "downstream_unavailable")]
)
async def test_errors_raise_for_status_is_retryable_only_for_a_service_5xx(
    client_module: Any, backend_status: int, code: str
) -> None:
    # A service's 4xx answers the same on a retry: not the retryable downstream_unavailable.
    async def backend(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": backend_status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def app(scope: Any, receive: Any, send: Any) -> None:
        transport = client_module.ASGITransport(app=backend)
        async with client_module.AsyncClient(transport=transport, base_url="http://orders") as client:
            (await client.get("/orders/1")).raise_for_status()

    sent = await call(EnvelopeMiddleware(app, access_log=False))
    assert (sent.status, sent.json()["error"]["code"]) == (502, code)
    assert DEFAULT_CATALOGUE[code].retryable is (backend_status >= 500)


async def test_errors_a_client_disconnect_mid_body_is_not_a_server_error(logs: Any) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await Request(scope, receive).body()

    async def gone() -> Any:
        return {"type": "http.disconnect"}

    sent = Sent()

    async def record(message: Any) -> None:
        sent.messages.append(message)

    await EnvelopeMiddleware(app)(make_scope("POST", "/orders"), gone, record)
    # The middleware saw the disconnect go by: there is no one to answer.
    assert sent.messages == []
    [left] = [e for e in logs.entries if e["event"] == "client_disconnected"]
    assert (left["log_level"], type(left["exc_info"])) == ("warning", ClientDisconnect)
    assert [e for e in logs.entries if e["log_level"] == "error"] == []


async def test_errors_a_client_disconnect_the_middleware_did_not_see_is_a_400(logs: Any) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ClientDisconnect  # as an inner layer that read the body itself would

    sent = await call(EnvelopeMiddleware(app), "POST", "/orders")
    assert (sent.status, sent.json()["error"]["code"]) == (400, "request_invalid")
    assert [e["log_level"] for e in logs.entries if e["event"] == "mapped_exception"] == ["warning"]


async def test_errors_a_full_client_pool_is_this_gateway_overloaded_not_a_slow_service() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise httpx2.PoolTimeout("no connection free in the pool")

    sent = await call(EnvelopeMiddleware(app, access_log=False))
    assert (sent.status, sent.json()["error"]["code"]) == (503, "service_unavailable")
    # A catalogue without that code keeps the nearest default: PoolTimeout is a timeout.
    lean = Catalogue(DEFAULT_CATALOGUE[code] for code in DEFAULT_CATALOGUE if code != "service_unavailable")
    sent = await call(EnvelopeMiddleware(app, access_log=False, catalogue=lean))
    assert (sent.status, sent.json()["error"]["code"]) == (504, "downstream_timeout")


# aiohttp's failures, raised for real against loopback peers (issue #11: the gateway calls services with it).
_BROKEN_ANSWERS = {
    "/cut": b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"id":',
    "/garbage": b"SMTP ready\r\n\r\n",
    "/silent": b"",
    "/json": b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 6\r\n\r\n<html>",
    "/loop": b"HTTP/1.1 302 Found\r\nlocation: /loop\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
}


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    writer.write(_BROKEN_ANSWERS[head.split(b" ", 2)[1].decode()])
    await writer.drain()


@pytest.mark.parametrize(
    ("path", "status", "code", "raised"),
    [
        ("/cut", 502, "downstream_unavailable", aiohttp.ClientPayloadError),
        ("/garbage", 502, "downstream_invalid_response", aiohttp.ClientResponseError),
        ("/silent", 502, "downstream_unavailable", aiohttp.ServerDisconnectedError),
        ("/refused", 502, "downstream_unavailable", aiohttp.ClientConnectorError),
        ("/slow", 504, "downstream_timeout", aiohttp.SocketTimeoutError),
        ("/slow-total", 504, "downstream_timeout", TimeoutError),
        ("/json", 502, "downstream_invalid_response", aiohttp.ContentTypeError),
        ("/loop", 502, "downstream_invalid_response", aiohttp.TooManyRedirects),
    ],
)
async def test_errors_aiohttp_failures_are_mapped_without_leaking(
    path: str, status: int, code: str, raised: type[Exception], logs: Any
) -> None:
    answered = asyncio.Event()
    handlers: list[asyncio.Task[Any]] = []

    async def peer_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            if path.startswith("/slow"):
                await answered.wait()  # past the client's 0.2 s timeouts
            else:
                await _answer(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    peer = await asyncio.start_server(peer_side, "127.0.0.1", 0)
    port = peer.sockets[0].getsockname()[1]
    if path == "/refused":
        peer.close()
        await peer.wait_closed()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        # A read timeout raises aiohttp's own class; a total one, the built-in TimeoutError.
        bound = {"total": 0.2} if path == "/slow-total" else {"sock_read": 0.2}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(**bound)) as session,
            session.get(f"http://127.0.0.1:{port}{path}", max_redirects=3) as response,
        ):
            await (response.json() if path == "/json" else response.read())

    try:
        sent = await call(EnvelopeMiddleware(app))
    finally:
        answered.set()
        peer.close()
        await asyncio.gather(*handlers)
    assert (sent.status, sent.json()["error"]["code"]) == (status, code)
    assert "127.0.0.1" not in sent.body.decode()
    [event] = [e for e in logs.entries if e["event"] == "mapped_exception"]
    assert isinstance(event["exc_info"], raised)
    assert event["request_id"] == sent.header("x-request-id")


@pytest.mark.parametrize(
    ("backend_status", "code"), [(404, "downstream_invalid_response"), (503, "downstream_unavailable")]
)
def test_errors_aiohttp_raise_for_status_is_retryable_only_for_a_service_5xx(
    backend_status: int, code: str
) -> None:
    async def backend(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": backend_status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with serve(backend) as base:

        async def app(scope: Any, receive: Any, send: Any) -> None:
            session = aiohttp.ClientSession(raise_for_status=True)
            async with session, session.get(f"{base}/orders/1"):
                pass

        sent = asyncio.run(call(EnvelopeMiddleware(app, access_log=False)))
    assert (sent.status, sent.json()["error"]["code"]) == (502, code)
