"""The reference partner-API gateway: auth, validation and forwarding, behind the envelope."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
import swagger_ui_bundle
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Scope

from envelope_middleware import (
    DEFAULT_CATALOGUE,
    ApiError,
    DownstreamInvalidResponse,
    DownstreamTimeout,
    DownstreamUnavailable,
    EnvelopeMiddleware,
    ErrorSpec,
    IdempotencyMiddleware,
    MemoryStore,
    RequestInvalid,
    ResourceNotFound,
)
from envelope_middleware._http import is_json_media_type
from envelope_middleware.demo.auth import CREDENTIALS, Credential, authorize
from envelope_middleware.demo.forwarding import Backend, HttpClient, open_backend
from envelope_middleware.demo.openapi import EXCLUDED_PATHS, gateway_openapi
from envelope_middleware.idempotency import IdempotencyStore
from envelope_middleware.request_id import RequestIdFormat

__all__ = ["CREDENTIALS", "Credential", "create_gateway"]

MAX_PAGE_SIZE = 100
MAX_BODY_BYTES = 16 * 1024  # a write body here is a few fields; more is refused, not read
# The backend refused the gateway's own access: nothing the partner sent or can fix.
_REFUSED_GATEWAY = frozenset({401, 403, 407})
_logger = structlog.get_logger("envelope_middleware.demo")
# The partner API's codes beyond the library's defaults (partner-api-facts.md):
# the gateway answers resource_unmapped itself, and keeps request_invalid_range
# when a backend sends it. (A backend's 401 is the gateway's own credential
# failing, answered 502: its auth codes never reach a partner.)
CATALOGUE = DEFAULT_CATALOGUE.extend(
    [
        ErrorSpec("resource_unmapped", 404, "No menu item has this id."),
        ErrorSpec("request_invalid_range", 400, "A range in the request is too long."),
    ]
)
_ORDER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Partner API (reference gateway)</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body>
</html>
"""
_ITEM_ID_DIGITS = 12  # the brands service's ids are far shorter; longer is no id of theirs
_AUTHORIZED = "envelope_middleware.demo.credential"  # a write's credential, checked once


@dataclass(frozen=True)
class _Api:
    """One gateway route: which backend serves it and which scope it needs."""

    backend: str
    scope: str


def _positive_int(
    request: Request, name: str, errors: list[dict[str, str]], *, default: int | None, maximum: int
) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = _decimal(raw)
    if value is None or not 1 <= value <= maximum:
        errors.append({"field": name, "message": f"must be an integer from 1 to {maximum}"})
        return None
    return value


def _decimal(raw: str) -> int | None:
    """`raw` as a number if it is decimal digits, leading zeros allowed; None if not.

    isascii: str.isdigit accepts "²" and "①", which int() refuses. Past 18
    significant digits the number is read as 10**18, above every bound here:
    int() refuses strings of over 4300 digits.
    """
    if not (raw.isascii() and raw.isdigit()):
        return None
    significant = raw.lstrip("0")
    return int(significant or "0") if len(significant) <= 18 else 10**18


def _validated_query(request: Request, *, filters: tuple[str, ...] = ()) -> dict[str, int]:
    """page and size, plus the named id filters; ("brand_id", "branch_id") go together."""
    errors: list[dict[str, str]] = []
    query: dict[str, int | None] = {
        "page": _positive_int(request, "page", errors, default=1, maximum=100_000),
        "size": _positive_int(request, "size", errors, default=20, maximum=MAX_PAGE_SIZE),
    }
    given = [name for name in filters if name in request.query_params]
    if len(filters) == 2 and len(given) == 1:
        raise RequestInvalid(
            "brand_id and branch_id must be passed together or omitted together",
            details={"errors": [{"field": given[0], "message": "needs its pair"}]},
        )
    for name in given:
        query[name] = _positive_int(request, name, errors, default=None, maximum=10**9)
    if errors:
        raise RequestInvalid("The query parameters are invalid.", details={"errors": errors})
    return {name: value for name, value in query.items() if value is not None}


async def _forward(request: Request, api: _Api, path: str, **kwargs: Any) -> Response:
    backend: Backend = request.app.state.backends[api.backend]
    # A HEAD is asked of the backend as a GET, so the gateway answers it from the
    # document a GET would get (RFC 9110 §9.3.2), and the middleware checks it.
    method = "GET" if request.method == "HEAD" else request.method
    try:
        # The bound covers in-process backends too, which no socket timeout reaches.
        async with asyncio.timeout(request.app.state.timeout):
            upstream = await backend.request(method, path, **kwargs)
    except TimeoutError:
        raise DownstreamTimeout(f"The {api.backend} service did not answer in time.") from None
    status, content_type = upstream.status, upstream.content_type
    # The partner API answers JSON documents and errors, nothing else: a backend
    # redirect, page or file is not something to relay (issue #3 review).
    if 300 <= status < 400 or (
        200 <= status < 300
        and status != 204
        # The gateway asks for no ranges: a 206 would pass the envelope unwrapped.
        and (status == 206 or not is_json_media_type(content_type.encode("latin-1")))
    ):
        _logger.warning(
            "downstream_unexpected_response", backend=api.backend, status=status, content_type=content_type
        )
        raise DownstreamInvalidResponse(f"The {api.backend} service sent an unexpected response.")
    if status in _REFUSED_GATEWAY:
        # The partner's own credential was checked above; this one is the gateway's.
        _logger.error("downstream_refused_gateway", backend=api.backend, status=status)
        raise DownstreamUnavailable(f"The {api.backend} service is unavailable.")
    headers = dict(upstream.headers)
    if content_type:
        headers["content-type"] = content_type
    return Response(upstream.body, status_code=status, headers=headers)


async def _availability(request: Request) -> bool:
    try:
        # The idempotency middleware in front has read it, and bounded it at MAX_BODY_BYTES.
        change = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        change = None
    if not isinstance(change, dict) or not isinstance(change.get("available"), bool):
        raise RequestInvalid(
            'The body must be a JSON object {"available": true|false}.',
            details={"errors": [{"field": "available", "message": "must be a boolean"}]},
        )
    available: bool = change["available"]
    return available


def _is_item_id(item_id: str) -> bool:
    # Checked here, not by a route converter: Starlette's int converter
    # fails with a 500 on numbers past int()'s digit limit.
    return item_id.isascii() and item_id.isdigit() and len(item_id) <= _ITEM_ID_DIGITS


def _unmapped(item_id: str) -> ApiError:
    # The id is repeated back only in an id's shape: whatever else a partner put in
    # the path (thousands of digits, markup) is not echoed into the body and logs.
    details = {"item_id": item_id} if _is_item_id(item_id) else {}
    return ApiError("resource_unmapped", "No menu item has this id.", status=404, details=details)


def create_gateway(
    backends: Mapping[str, ASGIApp | str] | None = None,
    *,
    timeout: float = 1.0,
    credentials: Iterable[Credential] = CREDENTIALS,
    request_id_format: RequestIdFormat = "hex",
    validate_json: bool = True,
    access_log: bool = True,
    idempotency_store: IdempotencyStore | None = None,
    idempotency_lease: float | None = None,
    idempotent_writes: bool = True,
    envelope: bool = True,
    http_client: HttpClient = "aiohttp",
) -> Starlette:
    """The partner gateway: each backend is an in-process ASGI app or a base URL.

    Writes require an Idempotency-Key, kept in `idempotency_store` (an embedded
    `MemoryStore` by default: one process only). A claim's lease defaults to
    the larger of 10 s and four backend timeouts, so a write still waiting on
    its backend never loses its key. `idempotent_writes=False` mounts no
    idempotency at all (writes run each time): the baseline of its benchmark.
    `envelope=False` mounts no `EnvelopeMiddleware` (answers and errors then
    plain, nothing logged): the baseline of the gateway's load benchmark.
    Backends given as URLs are called with aiohttp, or with httpx2 (`http_client`).
    """
    if backends is None:
        from envelope_middleware.demo.backends import create_backends  # noqa: PLC0415 - demo data on demand

        backends = create_backends()
    missing = {"orders", "branches", "brands"} - set(backends)
    if missing:
        raise ValueError(f"the gateway needs backends for {sorted(missing)}")
    by_key = {credential.partner_key: credential for credential in credentials}
    orders, branches, brands, items = (
        _Api("orders", "orders:read"),
        _Api("branches", "brands:read"),
        _Api("brands", "brands:read"),
        _Api("brands", "menus:oos"),
    )

    async def list_orders(request: Request) -> Response:
        authorize(request, by_key, orders.scope)
        return await _forward(
            request, orders, "/orders", params=_validated_query(request, filters=("brand_id", "branch_id"))
        )

    async def get_order(request: Request) -> Response:
        authorize(request, by_key, orders.scope)
        order_id = request.path_params["order_id"]
        # The id becomes part of the backend's URL: only an id's characters may.
        if not _ORDER_ID.fullmatch(order_id):
            raise ResourceNotFound("No order has this id.")
        return await _forward(request, orders, f"/orders/{order_id}")

    async def list_branches(request: Request) -> Response:
        authorize(request, by_key, branches.scope)
        query = _validated_query(request, filters=("brand_id",))
        return await _forward(request, branches, "/branches", params=query)

    async def list_brands(request: Request) -> Response:
        authorize(request, by_key, brands.scope)
        return await _forward(request, brands, "/brands", params=_validated_query(request))

    async def item_availability(request: Request) -> Response:
        # Authorised already, by the idempotency middleware's principal (`writer`).
        if request.scope.get(_AUTHORIZED) is None:
            authorize(request, by_key, items.scope)
        item_id = request.path_params["item_id"]
        if not _is_item_id(item_id):
            raise _unmapped(item_id)
        # Only the field this route changes goes on: whatever else a partner
        # sends (a business_id above all) is not theirs to set.
        available = await _availability(request)
        response = await _forward(
            request, items, f"/items/{item_id}/availability", json={"available": available}
        )
        if response.status_code == 404:
            raise _unmapped(item_id)  # the brands service's 404 here: no such item
        return response

    def writer(scope: Scope) -> str:
        # The idempotency key belongs to the partner; a request failing auth or
        # lacking the scope is answered here and never reaches the store.
        credential = authorize(scope, by_key, items.scope)
        scope[_AUTHORIZED] = credential  # the handler need not check it again
        return credential.partner_key

    store = idempotency_store if idempotency_store is not None else MemoryStore()
    idempotent = Middleware(
        IdempotencyMiddleware,
        store=store,
        principal=writer,
        require_key=True,
        lease=idempotency_lease if idempotency_lease is not None else max(10.0, 4 * timeout),
        max_body_size=MAX_BODY_BYTES,
    )

    document = gateway_openapi(CATALOGUE, request_id_format)

    async def openapi(_request: Request) -> Response:
        return JSONResponse(document)

    async def docs(_request: Request) -> Response:
        return HTMLResponse(_DOCS_PAGE)

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    gateway = Starlette(
        routes=[
            Route("/orders", list_orders),
            Route("/orders/{order_id}", get_order),
            Route("/branches", list_branches),
            Route("/brands", list_brands),
            Route(
                "/items/{item_id}/availability",
                item_availability,
                methods=["PATCH"],
                middleware=[idempotent] if idempotent_writes else None,
            ),
            Route("/health", health),
            Route("/openapi.json", openapi),
            Route("/docs", docs),
            # Swagger UI's assets from an installed package: the page works with no network.
            Mount("/docs/static", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs"),
        ],
        middleware=[
            Middleware(
                EnvelopeMiddleware,
                request_id_format=request_id_format,
                catalogue=CATALOGUE,
                exclude_paths=EXCLUDED_PATHS,
                validate_json=validate_json,
                access_log=access_log,
            )
        ]
        if envelope
        else None,
        lifespan=_lifespan(backends, timeout, store, http_client),
    )
    # A trailing slash is an unknown route (404), not a redirect whose
    # Location is built from the client's Host header.
    gateway.router.redirect_slashes = False
    return gateway


def _lifespan(
    backends: Mapping[str, ASGIApp | str], timeout: float, store: IdempotencyStore, http_client: HttpClient
) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]:
    """The gateway's start and stop: one client per backend, and the store closed at the end."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # One client serves every partner: it keeps no cookie a backend sets
        # (issue #3 review), nor takes the environment's proxies or .netrc.
        opened = {name: open_backend(name, target, timeout, http_client) for name, target in backends.items()}
        app.state.backends = opened
        app.state.timeout = timeout
        try:
            yield
        finally:
            for backend in opened.values():
                await backend.aclose()
            close_store = getattr(store, "aclose", None)
            if close_store is not None:
                await close_store()

    return lifespan
