"""A client that left is no server error.

From Errors, "Where the code comes from":

    A client that left is no server error. Once the app has been told (`http.disconnect` from
    `receive`, which the middleware watches), an app that stops mid-response as Starlette's
    `StreamingResponse` does, or a `ClientDisconnect`, is logged as a warning
    (`client_disconnected`, with the exception) and nothing more is sent; the access event's
    `status` is what was sent before, `null` if nothing was. So is an `OSError` from the
    server's `send` (ASGI 2.4 servers raise it instead of reporting the disconnect), and the
    `ClientDisconnect` Starlette makes of it, for every message: every start, every enveloped
    body, the emptied body of a 204, 205 or 304, and a body passed through unchanged (HTML, a
    file, an event stream). [...] Any other exception, even after a disconnect (a background
    task's bug, the app's own `OSError`), is the app's error.

No test client leaves mid-response, so these tests drive the app as a server would.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from envelope_middleware import EnvelopeMiddleware, ResourceNotFound
from tests.conftest import (
    JSON,
    Sent,
    _request,
    assert_error,
    body,
    envelope,
    make_scope,
    raising,
    scripted,
    start,
)

pytestmark = pytest.mark.filterwarnings("error")


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


async def test_envelope_access_event_has_no_status_when_the_server_refused_the_start(logs: Any) -> None:
    # docs/options.md: `status` is what was sent, null if nothing was.
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


async def test_envelope_the_apps_own_os_error_after_the_client_left_is_still_its_error(logs: Any) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        raise FileNotFoundError("/srv/exports/orders.json")

    assert_error(await leave_during(envelope(app)), 500, "internal")
    assert [e["event"] for e in logs.entries if e["log_level"] == "error"] == ["unhandled_exception"]
    assert not any(e["event"] == "client_disconnected" for e in logs.entries)
