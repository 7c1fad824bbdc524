"""EnvelopeMiddleware: one response contract for every HTTP response of an ASGI app."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send
from structlog.contextvars import bind_contextvars as structlog_bind
from structlog.contextvars import reset_contextvars

from envelope_middleware._context import structlog_context_vars
from envelope_middleware._errors import ErrorPolicy
from envelope_middleware._exchange import Exchange
from envelope_middleware._http import (
    BODY_HEADERS,
    BOM,
    TOKEN,
    WRAPPED_BODY_HEADERS,
)
from envelope_middleware._keys import HANDED_OVER_KEY, SCOPE_KEY
from envelope_middleware._lines import JSON_LINES_LOGGERS, NOT_WRITTEN
from envelope_middleware._paths import ExcludedPaths
from envelope_middleware.catalogue import DEFAULT_CATALOGUE, Catalogue
from envelope_middleware.logging import EventLogger
from envelope_middleware.request_id import (
    RequestIdFormat,
    _request_id,
    hex_request_id,
    is_safe_request_id,
    resolve_generator,
)

__all__ = ["HANDED_OVER_KEY", "SCOPE_KEY", "EnvelopeMiddleware"]


class EnvelopeMiddleware:
    """Give every HTTP response of `app` the envelope contract.

    * Every response gets one request-id header; enveloped bodies also carry
      the id as `request_id`.
    * A 2xx JSON body becomes `{"request_id", "data": <the body's bytes>}`.
    * Every response with status >= 400, and every exception, becomes
      `{"request_id", "error": {"code", "message", "details"}}`.

    Options:
        request_id_format: "hex" (32 lowercase hex, the default), "prefixed_uuid"
            (`req_<uuid4>`) or a callable returning a new id.
        request_id_header: the header carrying the id, on responses and, when
            trusted, on requests.
        trust_request_id: reuse a valid incoming id instead of making one.
        validate_json: check that a 2xx JSON body is JSON before wrapping it
            (the default); an invalid one becomes 502 `downstream_invalid_response`.
            With False, bodies stream through without being held (apart from a BOM's
            bytes, and leading whitespace when the app gave a Content-Length).
        max_validated_size: in validating mode, how much of a body sent in several
            messages is held for the check: once more than this many bytes are
            held (the message that crosses the limit included), the body streams on
            unchecked, with a warning in the log. None (the default) holds any body
            whole. A body sent in one message is checked at any size: it is in
            memory already.
        exclude_paths: paths whose responses keep their bodies; they still get
            the id header and the access log. "/health" is that path alone,
            "/docs/" is /docs and every path below it.
        catalogue: the error codes; `DEFAULT_CATALOGUE.extend(...)` adds a gateway's own.
        allowed_codes: codes outside the catalogue that a service's error body may keep.
        exception_codes: exception type (or "module.QualName") -> catalogue code, for
            exceptions that are not `ApiError`s; added to the httpx/httpx2 defaults.
        access_log: emit one `http_request` log event per request.
        bind_contextvars: bind request_id, method and path in structlog's contextvars
            for every log line of the request.
        logger: the structlog logger to write to (default: `envelope_middleware`).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        request_id_format: RequestIdFormat = "hex",
        request_id_header: str = "X-Request-ID",
        trust_request_id: bool = False,
        validate_json: bool = True,
        max_validated_size: int | None = None,
        exclude_paths: Iterable[str] = (),
        catalogue: Catalogue = DEFAULT_CATALOGUE,
        allowed_codes: Iterable[str] = (),
        # Any: Mapping's keys are invariant, so a dict[type[MyError], str] would not
        # type-check as Mapping[type[BaseException] | str, str]; keys are checked at start.
        exception_codes: Mapping[Any, str] | None = None,
        access_log: bool = True,
        bind_contextvars: bool = True,
        logger: EventLogger | None = None,
    ) -> None:
        if not TOKEN.fullmatch(request_id_header):
            raise ValueError(f"request_id_header is not a valid header name: {request_id_header!r}")
        if request_id_header.lower().encode() in BODY_HEADERS:
            raise ValueError(f"request_id_header names a body header: {request_id_header!r}")
        self.app = app
        self.generate_id = resolve_generator(request_id_format)
        self.check_generated = request_id_format not in ("hex", "prefixed_uuid")
        self.id_header = request_id_header.lower().encode("ascii")
        # Headers a wrapped body invalidates, and the app's own id header.
        self.wrap_drop = WRAPPED_BODY_HEADERS | {self.id_header, b"etag"}
        self.error_drop = BODY_HEADERS | {self.id_header}
        self.trust_request_id = trust_request_id
        self.validate_json = validate_json
        for name, flag in (
            ("trust_request_id", trust_request_id),
            ("validate_json", validate_json),
            ("access_log", access_log),
            ("bind_contextvars", bind_contextvars),
        ):
            # Refused in both builds, as the compiled one refuses it by the annotation:
            # a 0 or 1 from a settings file is more likely a mistake than a choice.
            if type(flag) is not bool:
                raise TypeError(f"{name} is True or False, not {flag!r}")
        if max_validated_size is not None:
            # A TypeError as the compiled build's own check of the annotation gives
            # (True passes that check as 1, and so passes here).
            if not isinstance(max_validated_size, int):
                raise TypeError(f"max_validated_size is a number of bytes or None: {max_validated_size!r}")
            if max_validated_size < 0:
                raise ValueError(f"max_validated_size is a number of bytes or None: {max_validated_size!r}")
        # At least the three bytes that tell whether there is a BOM to drop.
        self.held_limit = None if max_validated_size is None else max(max_validated_size, len(BOM))
        excluded = ExcludedPaths(exclude_paths)
        # None without paths: the common case then costs one identity check per request.
        self.excluded_paths = excluded if excluded.exact else None
        self.errors = ErrorPolicy(
            catalogue, allowed_codes=allowed_codes, exception_codes=exception_codes or {}
        )
        self.access_log = access_log
        self.context_vars = structlog_context_vars() if bind_contextvars else None
        # Only if structlog's registry cannot be reached: its public API, slower.
        self.context_fallback = bind_contextvars and self.context_vars is None
        # The common case needs no check of the generated id and no look at the request.
        self.plain_id = not trust_request_id and not self.check_generated
        if isinstance(logger, logging.Logger | logging.LoggerAdapter):
            # Its methods take no event fields: every call would raise, mid-request.
            raise TypeError(
                "logger takes a structlog logger; to write to stdlib logging, configure "
                "structlog with structlog.stdlib.LoggerFactory() (see docs/logging.md)"
            )
        self.logger = logger if logger is not None else structlog.get_logger("envelope_middleware")
        # structlog's lazy proxy reaches its logger through __getattr__ on every
        # call; `bind()` is the public way to the same logger, 0.6 us cheaper
        # per access event (issue #11). The default logger is such a proxy.
        # Without caching, `bind()` builds the logger from the configuration of
        # the moment, so it is called per access event. The first event asks
        # whether structlog caches it (then `bind()` hands out one logger, the
        # same every time): if so, the middleware keeps that logger and calls
        # `bind()` no more, about 1k instructions less per event.
        self.lazy_logger: Any = self.logger if logger is None else None
        self.ask_cached = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or SCOPE_KEY in scope:
            await self.app(scope, receive, send)
            return

        request_id = self.generate_id() if self.plain_id else self._make_request_id(scope)
        scope[SCOPE_KEY] = request_id
        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state["request_id"] = request_id

        exchange = Exchange(self, scope, receive, send, request_id)
        excluded = self.excluded_paths
        if excluded is not None and excluded.matches(scope):
            # Decided now: a router further in (Starlette's Mount) rewrites
            # scope["root_path"] before the app responds.
            exchange.excluded = True
        id_token = _request_id.set(request_id)
        # Set here and reset in the `finally` below under the same two conditions,
        # which do not change in between: `tokens` with `context_vars`, and
        # `fallback_tokens` with `context_fallback` (kept as locals: no per-request
        # container or helper call, issue #2).
        context_vars = self.context_vars
        if context_vars is not None:
            id_var, method_var, path_var = context_vars
            tokens = (id_var.set(request_id), method_var.set(scope["method"]), path_var.set(scope["path"]))
        elif self.context_fallback:
            fallback_tokens = structlog_bind(
                request_id=request_id, method=scope["method"], path=scope["path"]
            )
        started = time.perf_counter_ns() if self.access_log else 0
        try:
            try:
                await self.app(scope, exchange.receive, exchange.send)
            except Exception as exc:
                if not await exchange.fail(exc):
                    raise
            else:
                if not exchange.complete:
                    await exchange.finish()
        finally:
            try:
                if self.access_log:
                    lazy_logger = self.lazy_logger
                    logger = self.logger if lazy_logger is None else self._bound(lazy_logger)
                    fields = {
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": exchange.status,
                        "error_code": exchange.error_code,
                        # Whole microseconds as milliseconds: round() costs more than the rest of this call.
                        "duration_ms": (time.perf_counter_ns() - started) // 1000 / 1000,
                        "bytes_sent": exchange.bytes_sent,
                    }
                    # configure_logging()'s loggers take the fields as they are: the
                    # keyword call costs a fifth of the event (issue #11).
                    lines = JSON_LINES_LOGGERS.get(type(logger))
                    if lines is None or lines.write(logger, "http_request", fields) is NOT_WRITTEN:
                        logger.info("http_request", **fields)
            finally:
                # Even a failing log call must not leave this request's context behind.
                if context_vars is not None:
                    path_var.reset(tokens[2])
                    method_var.reset(tokens[1])
                    id_var.reset(tokens[0])
                elif self.context_fallback:
                    reset_contextvars(**fallback_tokens)
                _request_id.reset(id_token)

    def _bound(self, lazy_logger: Any) -> Any:
        """The lazy proxy's logger for this event; kept if structlog caches it (see __init__)."""
        logger = lazy_logger.bind()
        if self.ask_cached:
            self.ask_cached = False
            if lazy_logger.bind() is logger:
                self.logger = logger
                self.lazy_logger = None
        return logger

    def _make_request_id(self, scope: Scope) -> str:
        if self.trust_request_id:
            incoming = self._incoming_request_id(scope)
            if incoming is not None:
                return incoming
        if not self.check_generated:
            return self.generate_id()
        # Typed as what it may be: a callable from outside can return anything, and the
        # compiled build would check a result typed str before the check below.
        generate: Callable[[], object] = self.generate_id
        try:
            request_id = generate()
        except Exception as exc:
            self.logger.exception("request_id_generator_failed", exc_info=exc)
            return hex_request_id()
        if not (isinstance(request_id, str) and is_safe_request_id(request_id)):
            # A custom generator's id goes unescaped into headers and JSON; an
            # unsafe one is replaced rather than failing the request.
            self.logger.error("request_id_generator_unsafe", generated_type=type(request_id).__name__)
            return hex_request_id()
        return request_id

    def _incoming_request_id(self, scope: Scope) -> str | None:
        found: Any = None  # bytes-like, as a server gives it
        for name, value in scope["headers"]:
            if name.lower() == self.id_header:
                if found is not None:
                    return None  # two ids: neither can be trusted
                found = value
        if found is None:
            return None
        try:
            candidate = bytes(found).decode("ascii").strip(" \t")  # RFC 9110 §5.5: OWS around values
        except UnicodeDecodeError:
            return None
        return candidate if is_safe_request_id(candidate) else None
