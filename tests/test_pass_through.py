"""What the middleware must not wrap passes through, and so do excluded paths.

From "The contract, response by response":

    206, 3xx, non-JSON (HTML, files, `text/event-stream`, NDJSON), `Content-Encoding`d bodies
    (an empty or `identity` coding is none, and is dropped), trailers, early hints, `pathsend`
        -> untouched, apart from the id header (an error response drops the app's trailers)

And the option `exclude_paths` (default `()`): paths whose bodies pass untouched (health
checks, metrics, docs). They still get the id header, context and access log. As in Go's
`ServeMux`, `"/health"` excludes that path alone (not `/health/deep`, not `/healthz`), and a
path ending in a slash names a subtree: `"/docs/"` excludes `/docs` and everything below it.
`"/"` excludes only the root. Paths are the app's own, read when the request arrives: a proxy's
`root_path`, or the `Mount` the middleware itself sits in, is not part of them; a `Mount`
further in is.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from envelope_middleware import EnvelopeMiddleware
from tests.conftest import (
    _TRAILERS,
    HEX_ID,
    JSON,
    body,
    call,
    envelope,
    make_scope,
    scripted,
    start,
    zerocopy,
)

pytestmark = pytest.mark.filterwarnings("error")


def test_envelope_passes_pages_event_streams_ranges_and_redirects_through_untouched() -> None:
    async def page(request: Request) -> Response:
        return HTMLResponse("<h1>Orders</h1>")

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            yield b'data: {"id": 1}\n\n'

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def part(request: Request) -> Response:
        return Response(
            b'{"id"',
            status_code=206,
            media_type="application/json",
            headers={"Content-Range": "bytes 0-4/12"},
        )

    async def moved(request: Request) -> Response:
        return RedirectResponse("/orders", status_code=301)

    app = Starlette(
        routes=[Route("/page", page), Route("/events", events), Route("/part", part), Route("/old", moved)],
        middleware=[Middleware(EnvelopeMiddleware)],
    )
    with TestClient(app, follow_redirects=False) as client:
        responses = {path: client.get(path) for path in ("/page", "/events", "/part", "/old")}
    assert (responses["/page"].status_code, responses["/page"].text) == (200, "<h1>Orders</h1>")
    assert responses["/page"].headers["content-type"] == "text/html; charset=utf-8"
    assert responses["/events"].text == 'data: {"id": 1}\n\n'
    assert responses["/events"].headers["content-type"] == "text/event-stream; charset=utf-8"
    assert (responses["/part"].status_code, responses["/part"].content) == (206, b'{"id"')
    assert responses["/part"].headers["content-range"] == "bytes 0-4/12"
    assert (responses["/old"].status_code, responses["/old"].headers["location"]) == (301, "/orders")
    for response in responses.values():
        assert re.fullmatch(HEX_ID, response.headers["x-request-id"])


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


async def test_envelope_replaces_an_app_request_id_header_with_exactly_one() -> None:
    headers = [(b"content-type", b"text/plain"), (b"X-Request-ID", b"from-app"), (b"x-request-id", b"again")]
    sent = await call(envelope(scripted(start(200, headers), body(b"ok"))))
    values = sent.header_values("x-request-id")
    assert len(values) == 1
    assert values[0] != "from-app"


async def test_envelope_passes_pathsend_of_a_json_file_unwrapped() -> None:
    app = envelope(
        scripted(start(200, [JSON]), {"type": "http.response.pathsend", "path": "/srv/files/x.json"})
    )
    sent = await call(app)
    assert sent.messages[-1] == {"type": "http.response.pathsend", "path": "/srv/files/x.json"}
    assert sent.header("content-type") == "application/json"
    assert sent.header("x-request-id")


async def test_envelope_passes_zerocopysend_followed_by_body() -> None:
    app = scripted(start(200, [(b"content-type", b"text/plain")]), zerocopy(more=True), body(b"tail"))
    sent = await call(envelope(app))
    assert [m["type"] for m in sent.messages][1:] == ["http.response.zerocopysend", "http.response.body"]
    assert sent.complete


async def test_envelope_passes_trailers_and_early_hints_through() -> None:
    hint = {"type": "http.response.early_hint", "links": ["</style.css>; rel=preload"]}
    trailers = {"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")], "more_trailers": False}
    app = envelope(scripted(hint, start(200, [JSON], trailers=True), body(b"{}"), trailers))
    sent = await call(app)
    assert sent.messages[0] == hint
    assert sent.messages[-1] == trailers
    assert sent.body == b"{}"
    assert sent.start["trailers"] is True


async def test_envelope_trailers_complete_a_response_once_taken(logs: Any) -> None:
    sent = await call(envelope(scripted(start(200, [JSON], trailers=True), body(b"{}"), _TRAILERS)))
    assert sent.messages[-1] == _TRAILERS
    assert [e for e in logs.entries if e["log_level"] in ("warning", "error")] == []


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


async def test_envelope_strips_a_root_path_only_as_a_whole_segment() -> None:
    app = envelope(scripted(start(200, [JSON]), body(b"{}")), exclude_paths=["/health"])
    scope = {**make_scope("GET", "/health"), "root_path": "/h"}
    assert (await call(app, scope=scope)).body == b"{}"
    mounted = {**make_scope("GET", "/h/health"), "root_path": "/h"}
    assert (await call(app, scope=mounted)).body == b"{}"
