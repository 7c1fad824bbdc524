"""Exceptions before any byte is out, and apps that never answer, become error envelopes.

From "The contract, response by response":

    an exception before any byte is out
        -> an error envelope (see Errors), anything held is discarded
    no response at all
        -> `500 internal`

Errors tells where the code comes from (an `ApiError`, a Starlette `HTTPException`, the
`exception_codes` option, or `500 internal` for any other exception) and which catalogue speaks;
the error body is always written, whatever the details hold.
"""

from __future__ import annotations

import asyncio
import sys
from types import MappingProxyType, ModuleType
from typing import Any

import aiohttp
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from envelope_middleware import (
    DEFAULT_CATALOGUE,
    ApiError,
    Catalogue,
    EnvelopeMiddleware,
    ErrorSpec,
    RateLimited,
    ResourceNotFound,
)
from tests.conftest import JSON, assert_error, body, call, drive, envelope, raising, scripted, start

pytestmark = pytest.mark.filterwarnings("error")


def test_envelope_answers_what_a_route_raises_and_a_route_that_never_answers(logs: Any) -> None:
    async def missing(request: Request) -> Response:
        raise ResourceNotFound("Order 9 not found", details={"order_id": 9})

    async def broken(request: Request) -> Response:
        raise RuntimeError("password=hunter2 at db-1.internal")

    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        """An ASGI app that returns without responding."""

    app = Starlette(
        routes=[Route("/orders/9", missing), Route("/orders", broken), Mount("/silent", app=silent)],
        middleware=[Middleware(EnvelopeMiddleware)],
    )
    with TestClient(app) as client:
        not_found, failed, nothing = (client.get(path) for path in ("/orders/9", "/orders", "/silent"))
    assert not_found.status_code == 404
    assert not_found.json() == {
        "request_id": not_found.headers["x-request-id"],
        "error": {"code": "resource_not_found", "message": "Order 9 not found", "details": {"order_id": 9}},
    }
    internal = {"code": "internal", "message": DEFAULT_CATALOGUE["internal"].message, "details": {}}
    for response in (failed, nothing):
        assert response.status_code == 500
        assert response.json() == {"request_id": response.headers["x-request-id"], "error": internal}
    assert b"hunter2" not in failed.content
    errors = [(e["event"], e["request_id"]) for e in logs.entries if e["log_level"] == "error"]
    assert errors == [
        ("unhandled_exception", failed.headers["x-request-id"]),
        ("app_returned_without_response", nothing.headers["x-request-id"]),
    ]


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


async def test_envelope_sends_the_headers_of_an_api_error_given_as_pairs() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ApiError("rate_limited", "slow down", status=429, headers=[("Retry-After", "5")])

    sent = await call(envelope(app))
    assert_error(sent, 429, "rate_limited")
    assert sent.header("retry-after") == "5"


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


async def test_envelope_writes_numeric_exception_headers_and_drops_unusable_ones() -> None:
    headers: dict[str, Any] = {"Retry-After": 30, "X-Ratio": 0.5, "X-Flag": True, "X-None": None}
    sent = await call(envelope(raising(ApiError("slow_down", "m", status=429, headers=headers))))
    assert_error(sent, 429, "slow_down")
    assert (sent.header("retry-after"), sent.header("x-ratio")) == ("30", "0.5")
    assert sent.header("x-flag") is None
    assert sent.header("x-none") is None


@pytest.mark.parametrize(
    "headers",
    [{b"retry-after": b"5"}, [(b"retry-after", "5")], {1: "5"}],
    ids=["bytes-mapping", "bytes-name-pairs", "int-name"],
)
async def test_envelope_drops_exception_headers_whose_names_are_not_text(headers: Any) -> None:
    # HTTPException keeps whatever headers it is given; names that are no str are dropped.
    sent = await call(envelope(raising(HTTPException(429, headers=headers))))
    assert_error(sent, 429, "rate_limited")
    assert sent.header("retry-after") is None


@pytest.mark.parametrize("value", ['Basic realm="a\x0bb"', "a\x7fb", "tab\tok"])
async def test_envelope_refuses_control_characters_in_exception_headers(value: str) -> None:
    sent = await call(
        envelope(raising(ApiError("x_y", "m", status=401, headers={"WWW-Authenticate": value})))
    )
    assert sent.header("www-authenticate") == (value if value == "tab\tok" else None)


async def test_envelope_drops_exception_headers_that_are_not_latin1() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ApiError("x_y", "m", status=400, headers={"X-Euro": "€", "X-Fine": "ok"})

    sent = await call(EnvelopeMiddleware(app, access_log=False))
    assert sent.header("x-euro") is None
    assert sent.header("x-fine") == "ok"


async def test_envelope_error_details_from_any_mapping_stay_an_object() -> None:
    details = MappingProxyType({"field": "page"})
    sent = await call(envelope(raising(ApiError("bad_page", "m", status=400, details=details))))
    assert assert_error(sent, 400, "bad_page")["details"] == {"field": "page"}


async def test_envelope_renders_starlette_http_exceptions_by_status() -> None:
    sent = await call(envelope(raising(HTTPException(404, "Order 12 not found"))))
    assert assert_error(sent, 404, "resource_not_found")["message"] == "Order 12 not found"
    sent = await call(envelope(raising(HTTPException(405, headers={"Allow": "GET"}))))
    assert_error(sent, 405, "method_not_allowed")
    assert sent.header("allow") == "GET"
    sent = await call(envelope(raising(HTTPException(503, "db-1 is down"))))
    assert "db-1" not in assert_error(sent, 503, "service_unavailable")["message"]


async def test_envelope_http_exception_detail_that_is_not_text_is_not_the_message() -> None:
    sent = await call(envelope(raising(HTTPException(403, {"reason": "x"}))))  # type: ignore[arg-type]
    assert assert_error(sent, 403, "auth_forbidden")["message"] == DEFAULT_CATALOGUE["auth_forbidden"].message


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
    by_name = envelope(
        raising(ConnectionRefusedError()), exception_codes={"builtins.OSError": "service_unavailable"}
    )
    assert_error(await call(by_name), 503, "service_unavailable")


async def test_envelope_maps_a_builtin_by_its_bare_name() -> None:
    app = envelope(raising(KeyError("k")), exception_codes={"KeyError": "resource_not_found"})
    assert_error(await call(app), 404, "resource_not_found")


class LedgerDown(Exception):
    """Defined in one module, re-exported by a package, as aiohttp's exceptions are."""


async def test_envelope_maps_a_class_by_the_name_its_package_re_exports_it_under(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    package = ModuleType("ledger_client")
    package.LedgerDown = LedgerDown  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ledger_client", package)
    codes = {
        "ledger_client.LedgerDown": "service_unavailable",
        "aiohttp.ClientConnectorError": "rate_limited",
    }
    app = envelope(raising(LedgerDown()), exception_codes=codes)
    assert_error(await call(app), 503, "service_unavailable")
    # A real one: aiohttp defines it in aiohttp.client_exceptions.
    refused = aiohttp.ClientConnectorError(None, OSError(111, "refused"))  # type: ignore[arg-type]
    assert_error(await call(envelope(raising(refused), exception_codes=codes)), 429, "rate_limited")


async def test_envelope_takes_exception_codes_typed_as_the_user_builds_them() -> None:
    # mypy --strict runs on this file: a dict of one exception type must type-check.
    codes: dict[type[LookupError], str] = {LookupError: "resource_not_found"}
    app = EnvelopeMiddleware(raising(KeyError("k")), access_log=False, exception_codes=codes)
    assert_error(await call(app), 404, "resource_not_found")


@pytest.mark.parametrize("exc", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1)])
async def test_envelope_never_turns_base_exceptions_into_responses(exc: BaseException) -> None:
    with pytest.raises(type(exc)):
        await call(envelope(raising(exc)))


@pytest.mark.parametrize("status", [200, 404])
async def test_envelope_discards_a_held_response_when_the_app_raises(status: int) -> None:
    app = scripted(
        start(status, [JSON, (b"x-partial", b"1")]), body(b'{"a":', more=True), raise_after=ResourceNotFound()
    )
    sent = await call(envelope(app))
    assert_error(sent, 404, "resource_not_found")
    assert sent.header("x-partial") is None


async def test_envelope_counts_a_start_as_sent_only_once_it_is(logs: Any) -> None:
    # The app cancels what `send` returned for its start, then fails: nothing
    # went out, so the client still gets the error envelope.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.ensure_future(send(start(200, [(b"content-type", b"text/plain")])))
        task.cancel()
        raise ValueError("boom")

    assert_error(await call(envelope(app)), 500, "internal")


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
