"""Mounted sub-apps hand their exceptions to the middleware around them."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import Message
from starlette.websockets import WebSocket

from envelope_middleware import EnvelopeMiddleware, RateLimited, ResourceNotFound
from envelope_middleware.fastapi import install_fastapi_handlers
from envelope_middleware.handlers import hand_over, install_exception_handlers
from tests._server import serve
from tests.conftest import call, make_scope


class LedgerLocked(Exception):
    """An app's own exception, mapped to a code with exception_codes."""


async def not_found(_request: Request) -> Response:
    raise ResourceNotFound("Order 9 not found", details={"order_id": 9})


async def rate_limited(_request: Request) -> Response:
    raise RateLimited(retry_after=30)


async def timed_out(_request: Request) -> Response:
    raise httpx2.ConnectTimeout("connect to orders-7.internal:9001 timed out")


async def locked(_request: Request) -> Response:
    raise LedgerLocked("ledger db-1.internal locked by pid 4242")


async def crashed(_request: Request) -> Response:
    raise RuntimeError("password=hunter2 at db-1.internal")


async def fine(_request: Request) -> Response:
    return JSONResponse({"ok": True})


SUB_ROUTES = [
    Route("/not-found", not_found),
    Route("/rate-limited", rate_limited),
    Route("/timed-out", timed_out),
    Route("/locked", locked),
    Route("/crashed", crashed),
    Route("/fine", fine),
]


def gateway(sub: Starlette, **options: Any) -> Starlette:
    options.setdefault("access_log", False)
    options.setdefault("exception_codes", {LedgerLocked: "service_unavailable"})
    return Starlette(routes=[Mount("/v2", sub)], middleware=[Middleware(EnvelopeMiddleware, **options)])


def installed_sub_app() -> Starlette:
    sub = Starlette(routes=SUB_ROUTES)
    install_exception_handlers(sub)
    return sub


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/not-found", 404, "resource_not_found"),
        ("/v2/rate-limited", 429, "rate_limited"),
        ("/v2/timed-out", 504, "downstream_timeout"),
        ("/v2/locked", 503, "service_unavailable"),
        ("/v2/crashed", 500, "internal"),
    ],
)
async def test_handlers_a_sub_app_exception_is_answered_as_if_raised_to_the_middleware(
    logs: Any, path: str, status: int, code: str
) -> None:
    # The same exception raised by a route of the app the middleware wraps.
    direct = Starlette(
        routes=[Route(path, route.endpoint) for route in SUB_ROUTES if path.endswith(route.path)],
        middleware=[
            Middleware(
                EnvelopeMiddleware, access_log=False, exception_codes={LedgerLocked: "service_unavailable"}
            )
        ],
    )
    expected = await call(direct, path=path)
    logs.entries.clear()

    sent = await call(gateway(installed_sub_app()), path=path)  # raises nothing: answered
    assert sent.status == expected.status == status
    document = sent.json()
    assert document["error"] == expected.json()["error"]
    assert document["error"]["code"] == code
    assert sent.header("retry-after") == expected.header("retry-after")
    assert b"internal:" not in sent.body
    assert b"hunter2" not in sent.body
    # One log line for the exception, as for a direct raise; none saying the response was cut.
    events = [e["event"] for e in logs.entries]
    assert "exception_after_response_started" not in events
    assert "error_body_replaced" not in events
    if status >= 500 and code != "rate_limited":
        [logged] = [e for e in logs.entries if e["event"] in ("unhandled_exception", "mapped_exception")]
        assert logged["request_id"] == sent.header("x-request-id")
        assert logged["error_code"] == code


async def test_handlers_without_them_a_sub_app_exception_is_a_500_that_is_not_aborted(logs: Any) -> None:
    # The sub-app's ServerErrorMiddleware answers first: the code is lost (why the
    # handlers exist), but the complete 500 stands and the log says what happened.
    sent = await call(gateway(Starlette(routes=SUB_ROUTES)), path="/v2/not-found")
    assert (sent.status, sent.json()["error"]["code"]) == (500, "internal")
    [late] = [e for e in logs.entries if e["event"] == "exception_after_response_started"]
    assert late["response_complete"] is True
    assert isinstance(late["exc_info"], ResourceNotFound)


async def test_handlers_leave_other_responses_alone() -> None:
    sent = await call(gateway(installed_sub_app()), path="/v2/fine")
    assert sent.status == 200
    assert sent.json()["data"] == {"ok": True}


async def test_handlers_without_the_middleware_answer_with_a_plain_stand_in() -> None:
    sub = installed_sub_app()
    sent = await call(sub, path="/not-found")
    assert (sent.status, sent.body) == (404, b"Order 9 not found")
    with pytest.raises(RuntimeError):  # re-raised by Starlette's ServerErrorMiddleware, for the server
        await call(sub, path="/crashed")


async def test_handlers_an_excluded_path_keeps_the_stand_in() -> None:
    sent = await call(gateway(installed_sub_app(), exclude_paths=["/v2/"]), path="/v2/not-found")
    assert (sent.status, sent.body) == (404, b"Order 9 not found")
    assert sent.header("x-request-id")


async def test_handlers_hand_over_serves_an_apps_own_handler() -> None:
    async def ledger_handler(request: Request, exc: Exception) -> Response:
        hand_over(request, exc)
        return Response(status_code=503)

    sub = Starlette(routes=SUB_ROUTES, exception_handlers={LedgerLocked: ledger_handler})
    sent = await call(gateway(sub), path="/v2/locked")
    assert (sent.status, sent.json()["error"]["code"]) == (503, "service_unavailable")


async def test_handlers_installed_with_fastapi_handlers_on_a_fastapi_sub_app() -> None:
    sub = FastAPI()
    install_fastapi_handlers(sub)

    @sub.get("/orders/{order_id}")
    async def order(order_id: int) -> dict[str, int]:
        raise ResourceNotFound(f"Order {order_id} not found")

    sent = await call(gateway(sub), path="/v2/orders/9")
    assert (sent.status, sent.json()["error"]["message"]) == (404, "Order 9 not found")
    sent = await call(gateway(sub), path="/v2/orders/nine")
    error = sent.json()["error"]
    assert (sent.status, error["code"]) == (400, "request_invalid")
    assert error["details"]["errors"][0]["field"] == "order_id"


@pytest.mark.server
@pytest.mark.parametrize("installed", [True, False], ids=["handlers", "no-handlers"])
def test_handlers_keep_the_connection_of_a_sub_app_error_open(installed: bool) -> None:
    # Over real HTTP: uvicorn closes a connection whose app raised, even after a
    # complete response, and the partner's next request on it fails. The
    # middleware raises nothing once a response is complete, handlers or not.
    sub = installed_sub_app() if installed else Starlette(routes=SUB_ROUTES)
    ports = []
    with serve(gateway(sub)) as base, httpx2.Client(base_url=base) as client:
        for path, status in [
            ("/v2/not-found", 404 if installed else 500),
            ("/v2/crashed", 500),
            ("/v2/fine", 200),
        ]:
            response = client.get(path)
            assert response.status_code == status
            ports.append(response.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert len(set(ports)) == 1  # one connection served them all


async def test_handlers_let_a_wrapped_app_keep_its_codes() -> None:
    # EnvelopeMiddleware(app) puts the app's ServerErrorMiddleware inside the
    # envelope, as a mount does: the same hand-over serves it.
    wrapped = EnvelopeMiddleware(installed_sub_app(), access_log=False)
    sent = await call(wrapped, path="/not-found")
    assert (sent.status, sent.json()["error"]["code"]) == (404, "resource_not_found")
    sent = await call(wrapped, path="/crashed")
    assert (sent.status, sent.json()["error"]["code"]) == (500, "internal")


async def test_handlers_an_api_error_raised_while_the_start_is_held_keeps_its_code() -> None:
    # Starlette's ExceptionMiddleware, having a handler, turns an exception raised
    # after the app's start into a RuntimeError; the middleware still holds the
    # start (validating mode), so the ApiError it came from is answered.
    async def export(_request: Request) -> Response:
        async def rows() -> Any:
            yield b'{"rows": ['
            raise ResourceNotFound("Export 7 not found")

        return StreamingResponse(rows(), media_type="application/json")

    sub = Starlette(routes=[Route("/export", export)])
    install_exception_handlers(sub)
    sent = await call(gateway(sub), path="/v2/export")
    assert (sent.status, sent.json()["error"]["message"]) == (404, "Export 7 not found")


async def test_handlers_keep_the_stand_ins_headers_and_the_exceptions_own_win(logs: Any) -> None:
    async def limited(request: Request, exc: Exception) -> Response:
        hand_over(request, exc)
        # What a layer further in would add (CORS), and a header the exception also gives.
        headers = {"Access-Control-Allow-Origin": "https://partner.example", "Retry-After": "5"}
        return Response(status_code=429, headers=headers)

    sub = Starlette(routes=SUB_ROUTES, exception_handlers={RateLimited: limited})
    sent = await call(gateway(sub), path="/v2/rate-limited")
    assert (sent.status, sent.json()["error"]["code"]) == (429, "rate_limited")
    assert sent.header("access-control-allow-origin") == "https://partner.example"
    assert sent.header("retry-after") == "30"  # one header, the exception's


async def test_handlers_a_handed_over_disconnect_answers_no_one(logs: Any) -> None:
    async def upload(request: Request) -> Response:
        await request.body()  # raises ClientDisconnect: the client has gone
        return Response()  # pragma: no cover - never reached

    sub = Starlette(routes=[Route("/upload", upload, methods=["POST"])])
    install_exception_handlers(sub)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await gateway(sub, access_log=True)(make_scope("POST", "/v2/upload"), receive, send)
    assert sent == []
    assert [e["event"] for e in logs.entries if e["log_level"] in ("warning", "error")] == [
        "client_disconnected"
    ]
    [access] = [e for e in logs.entries if e["event"] == "http_request"]
    assert access["status"] is None


def test_handlers_leave_websocket_exceptions_to_the_server() -> None:
    async def feed(websocket: WebSocket) -> None:
        await websocket.accept()
        raise ResourceNotFound("Feed 3 not found")

    app = Starlette(routes=[WebSocketRoute("/feed", feed)])
    install_exception_handlers(app)
    with TestClient(app) as client, pytest.raises(ResourceNotFound), client.websocket_connect("/feed") as ws:
        ws.receive_text()
