"""An exception after bytes are out never starts a second response.

From "The contract, response by response":

    an exception after bytes are out
        -> never a second start: the log gets it with the id
        (`exception_after_response_started`). If the response was still going, it is re-raised
        so the server aborts the connection (a clean end would pass a truncated body off as
        whole); if it was complete (a background task failed), it stands and the connection
        stays open

And from Errors: a response counts as complete once the server has taken its last message; a
server refusing that message another way (uvicorn's `RuntimeError` for a body longer than its
`Content-Length`) is an aborted response, logged and re-raised.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from envelope_middleware import EnvelopeMiddleware, RateLimited
from tests.conftest import (
    _TRAILERS,
    JSON,
    Sent,
    _request,
    _scope,
    body,
    call,
    envelope,
    make_scope,
    scripted,
    start,
)

pytestmark = pytest.mark.filterwarnings("error")


def test_envelope_after_bytes_are_out_aborts_a_response_still_going_and_keeps_a_whole_one(
    logs: Any,
) -> None:
    async def export(request: Request) -> Response:
        async def lines() -> AsyncIterator[bytes]:
            yield b"ord_1,delivered\n"
            raise RuntimeError("backend went away")

        return StreamingResponse(lines(), media_type="text/csv")

    def audit() -> None:
        raise KeyError("audit log unavailable")

    async def create(request: Request) -> Response:
        return JSONResponse({"id": "ord_2"}, status_code=201, background=BackgroundTask(audit))

    app = Starlette(
        routes=[Route("/export", export), Route("/orders", create, methods=["POST"])],
        middleware=[Middleware(EnvelopeMiddleware)],
    )
    with TestClient(app) as client:
        # Re-raised, so that the server aborts the connection rather than end a truncated body.
        with pytest.raises(RuntimeError, match="backend went away"):
            client.get("/export")
        created = client.post("/orders")
    # The response was whole when the background task failed: it stands.
    assert created.status_code == 201
    assert created.json() == {"request_id": created.headers["x-request-id"], "data": {"id": "ord_2"}}
    events = [e for e in logs.entries if e["log_level"] == "error"]
    assert [(e["event"], e["response_complete"]) for e in events] == [
        ("exception_after_response_started", False),
        ("exception_after_response_started", True),
    ]
    assert events[1]["request_id"] == created.headers["x-request-id"]


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

    with pytest.raises(RuntimeError, match="late") as raised:
        await EnvelopeMiddleware(app)(_scope(), receive, send)
    assert [m["type"] for m in messages] == ["http.response.start", "http.response.body"]
    [event] = [e for e in logs.entries if e["event"] == "exception_after_response_started"]
    request_id = Sent(messages).header("x-request-id")
    assert event["request_id"] == request_id
    # What the server logs of it, outside the request's context, carries the id too.
    assert raised.value.__notes__ == [f"request_id: {request_id} (envelope_middleware)"]
    assert event["response_complete"] is False


async def test_envelope_leaves_an_exception_whose_notes_are_no_list_as_it_is() -> None:
    odd = RuntimeError("late")
    odd.__notes__ = ("a tuple",)  # type: ignore[assignment]  # add_note() would refuse it
    plain = start(200, [(b"content-type", b"text/plain")])
    with pytest.raises(RuntimeError, match="late") as raised:
        await call(EnvelopeMiddleware(scripted(plain, body(b"partial", more=True), raise_after=odd)))
    assert raised.value is odd
    assert odd.__notes__ == ("a tuple",)  # type: ignore[comparison-overlap]


async def test_envelope_notes_only_the_last_request_on_an_exception_raised_by_several() -> None:
    shared = RuntimeError("the ledger connection died")  # one object, as a shared future's
    plain = start(200, [(b"content-type", b"text/plain")])
    app = EnvelopeMiddleware(scripted(plain, body(b"partial", more=True), raise_after=shared))
    shared.add_note("request_id: 7f3a of the ledger service")  # the app's own, kept
    ids = []
    for _ in range(3):
        messages: list[Message] = []

        async def send(message: Message, messages: list[Message] = messages) -> None:
            messages.append(message)

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        with pytest.raises(RuntimeError):
            await app(_scope(), receive, send)
        ids.append(Sent(messages).header("x-request-id"))
    assert shared.__notes__ == [
        "request_id: 7f3a of the ledger service",
        f"request_id: {ids[-1]} (envelope_middleware)",
    ]


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
    assert not hasattr(event["exc_info"], "__notes__")  # it stands: not re-raised, no note
    assert event["request_id"] == sent.header("x-request-id")
    assert not any(e["event"] == "client_disconnected" for e in logs.entries)


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


def test_envelope_a_handled_exception_raised_after_a_held_start_keeps_its_code_in_starlette() -> None:
    # Starlette re-raises an exception that has a handler but comes after the app's
    # start as RuntimeError("Caught handled exception, but response already started.")
    # from it. The envelope still holds that start, so it answers for the exception
    # it came from; this runs the installed Starlette, so a reworded message shows here.
    async def rows() -> AsyncIterator[bytes]:
        yield b'{"rows": ['
        raise RateLimited(retry_after=7)

    async def stream(request: Request) -> Response:
        return StreamingResponse(rows(), media_type="application/json")

    async def handler(request: Request, exc: Exception) -> Response:
        return JSONResponse({"detail": "handled"}, status_code=418)  # too late to be used

    app = Starlette(
        routes=[Route("/rows", stream)],
        middleware=[Middleware(EnvelopeMiddleware)],
        exception_handlers={RateLimited: handler},
    )
    with TestClient(app) as client:
        response = client.get("/rows")
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limited"
    assert response.headers["retry-after"] == "7"
