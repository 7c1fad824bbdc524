"""4xx and 5xx responses become error envelopes.

From "The contract, response by response":

    4xx, any content
        -> an error envelope; the status and every header kept (`WWW-Authenticate`, `Allow`,
        `Retry-After` when it is seconds or an HTTP-date, CORS, `Set-Cookie`, `Vary`, but also
        `Server` and `X-Backend-*`: a 4xx is addressed to the client) except those describing
        the old body (`Content-*`, `ETag`, `Last-Modified`, digests, `Transfer-Encoding`) and
        the app's own id header; a short printable `text/plain` body becomes the message
    5xx, any content
        -> an error envelope with only the code kept from the body, and only headers that reveal
        nothing (`Retry-After` as seconds or an HTTP-date, caching, `Vary`, `Set-Cookie`, auth
        challenges, `Allow`, security policies, `Access-Control-*`): `Server`, `X-Backend-Host`
        and the like are dropped
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from envelope_middleware import DEFAULT_CATALOGUE, EnvelopeMiddleware, _http
from tests.conftest import (
    JSON,
    assert_error,
    body,
    call,
    drive,
    envelope,
    json_values,
    scripted,
    start,
    zerocopy,
)

pytestmark = pytest.mark.filterwarnings("error")


def test_envelope_turns_4xx_and_5xx_responses_into_error_envelopes() -> None:
    async def missing(request: Request) -> Response:
        headers = {"Vary": "Accept", "X-Backend-Host": "orders-7.internal"}
        return JSONResponse({"detail": "Order 9 not found"}, status_code=404, headers=headers)

    async def too_big(request: Request) -> Response:
        return PlainTextResponse("size must be <= 100", status_code=400)

    async def down(request: Request) -> Response:
        headers = {"Retry-After": "5", "X-Backend-Host": "orders-7.internal"}
        return PlainTextResponse("db-7.internal refused the connection", status_code=503, headers=headers)

    app = Starlette(
        routes=[Route("/orders/9", missing), Route("/orders", too_big), Route("/brands", down)],
        middleware=[Middleware(EnvelopeMiddleware)],
    )
    with TestClient(app) as client:
        not_found, invalid, unavailable = (client.get(path) for path in ("/orders/9", "/orders", "/brands"))

    def error(response: Any) -> Any:
        document = response.json()
        assert document["request_id"] == response.headers["x-request-id"]
        assert response.headers["content-type"] == "application/json"
        return document["error"]

    # A 4xx is addressed to the client: its message, details and headers are kept.
    assert not_found.status_code == 404
    assert error(not_found) == {"code": "resource_not_found", "message": "Order 9 not found", "details": {}}
    assert (not_found.headers["vary"], not_found.headers["x-backend-host"]) == ("Accept", "orders-7.internal")
    assert invalid.status_code == 400
    assert error(invalid) == {"code": "request_invalid", "message": "size must be <= 100", "details": {}}
    # A 5xx keeps its code and the headers that reveal nothing.
    assert unavailable.status_code == 503
    assert error(unavailable) == {
        "code": "service_unavailable",
        "message": DEFAULT_CATALOGUE["service_unavailable"].message,
        "details": {},
    }
    assert unavailable.headers["retry-after"] == "5"
    assert "x-backend-host" not in unavailable.headers
    assert b"db-7" not in unavailable.content


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


async def test_envelope_5xx_keeps_only_headers_that_reveal_nothing() -> None:
    headers = [
        (b"content-type", b"text/plain"),
        (b"server", b"nginx/1.19 orders-7.internal"),
        (b"x-backend-host", b"orders-7.internal"),
        (b"retry-after", b"5"),
        (b"access-control-allow-origin", b"*"),
        (b"cache-control", b"no-store"),
        # A service's own: it is no replay by this gateway, and its id is internal.
        (b"idempotent-replayed", b"true"),
        (b"original-request-id", b"orders-internal-42"),
    ]
    sent = await call(envelope(scripted(start(503, headers), body(b"down"))))
    assert_error(sent, 503, "service_unavailable")
    assert sent.header("server") is None
    assert sent.header("x-backend-host") is None
    assert sent.header("idempotent-replayed") is None
    assert sent.header("original-request-id") is None
    assert sent.header("retry-after") == "5"
    assert sent.header("access-control-allow-origin") == "*"
    assert sent.header("cache-control") == "no-store"


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


async def test_envelope_error_from_zerocopysend_parts_answers_once_at_the_last_part() -> None:
    app = scripted(start(500, [(b"content-type", b"text/plain")]), zerocopy(more=True), zerocopy(more=False))
    sent = await call(envelope(app))
    assert_error(sent, 500, "internal")
    assert [m["type"] for m in sent.messages] == ["http.response.start", "http.response.body"]


async def test_envelope_error_drops_app_trailers() -> None:
    trailers = {"type": "http.response.trailers", "headers": [], "more_trailers": False}
    sent = await call(envelope(scripted(start(400, [], trailers=True), body(b""), trailers)))
    assert_error(sent, 400, "request_invalid")
    assert "trailers" not in sent.start
    assert sent.messages[-1]["type"] == "http.response.body"


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
