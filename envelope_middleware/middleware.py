"""EnvelopeMiddleware: one response contract for every HTTP response of an ASGI app."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

import structlog
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.contextvars import bind_contextvars as structlog_bind
from structlog.contextvars import reset_contextvars

from envelope_middleware._context import structlog_context_vars
from envelope_middleware._errors import ERROR_BODY_LIMIT, ErrorPolicy, Failure
from envelope_middleware._http import (
    BODY_HEADERS,
    BOM,
    JSON_WHITESPACE,
    SERVER_ERROR_HEADERS,
    TOKEN,
    WRAPPED_BODY_HEADERS,
    RawHeaders,
    header_value,
    is_blank,
    is_json_media_type,
    is_retry_after,
    json_error,
)
from envelope_middleware.catalogue import DEFAULT_CATALOGUE, Catalogue
from envelope_middleware.request_id import (
    RequestIdFormat,
    _request_id,
    hex_request_id,
    is_safe_request_id,
    resolve_generator,
)

__all__ = ["HANDED_OVER_KEY", "SCOPE_KEY", "EnvelopeMiddleware"]

# Set on the scope of every request the middleware handles; a second instance
# further in sees it and steps aside, so a double mount gives one envelope.
SCOPE_KEY = "envelope_middleware.request_id"
# Where `envelope_middleware.handlers` leaves an exception, in the request's state,
# for the middleware to answer for when the app's stand-in error response arrives.
HANDED_OVER_KEY = "envelope_middleware.exception"

# Up to this size, prefix, body and suffix are joined into one message: each extra
# message is an extra write on the socket, and under uvicorn and wrk three writes
# for a 100 KB body served 0.61 of the bare app's requests/s and one write 0.99 on
# one machine (0.81 and 0.84 on another), 0.80 and 0.93 at 512 KB. Above it the
# body goes out as it is: joining 1 MB served 0.66 with a p99 of 864 ms, against
# 0.89 and 41 ms for three writes (benchmarks/results/join_ab.md).
_JOIN_LIMIT = 512 * 1024
_FIELD_VALUE_INVALID = re.compile(rb"[^\t\x20-\x7e\x80-\xff]")  # RFC 9110 §5.5: no CTLs but HTAB
_LOGGED_BODY_LIMIT = 2048  # of a replaced 5xx body, in the log
_MAX_LENGTH_DIGITS = 18  # past this a Content-Length is nonsense, and int() has a digit limit
_SENDFILE_MESSAGES = frozenset({"http.response.pathsend", "http.response.zerocopysend"})

# What the middleware does with a response, decided at its start. Plain ints:
# they are compared on every message, and enum member lookups cost ~0.1 us each.
_NOT_STARTED = 0
_PASS = 1  # forwarded as it is, apart from the id header
_BODYLESS = 2  # 204/205/304: forwarded without body bytes
_WRAP_STREAM = 3  # 2xx JSON, trusted: bytes streamed inside the envelope
_WRAP_BUFFER = 4  # 2xx JSON, validated: held whole, checked, then wrapped
_ERROR = 5  # >= 400: read, then replaced by an error envelope


async def _held() -> None:
    """What `send` returns for a start it holds: nothing goes downstream yet.

    A coroutine, like everything `send` returns when the server's `send`
    returns coroutines: apps may hand it to `asyncio.create_task` or anyio's
    `start_soon`, which accept nothing else.
    """


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
        logger: Any = None,
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
        if max_validated_size is not None and (type(max_validated_size) is not int or max_validated_size < 0):
            raise ValueError(f"max_validated_size is a number of bytes or None: {max_validated_size!r}")
        # At least the three bytes that tell whether there is a BOM to drop.
        self.held_limit = None if max_validated_size is None else max(max_validated_size, len(BOM))
        exact: set[str] = set()
        subtrees: list[str] = []
        for path in exclude_paths:
            if not path.startswith("/"):
                raise ValueError(f"excluded paths start with '/': {path!r}")
            # As in Go's ServeMux: "/docs/" names a subtree, /docs included, and
            # "/health" one path, so /health/deep stays in the contract. "/" is
            # the root alone: a subtree of everything would exclude the app.
            base = path.rstrip("/")
            if base and path.endswith("/"):
                subtrees.append(base + "/")
            exact.add(base or "/")
        self.excluded_paths = frozenset(exact)
        self.excluded_prefixes = tuple(subtrees)
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
                "structlog with structlog.stdlib.LoggerFactory() (see the README's logging recipe)"
            )
        self.logger = logger if logger is not None else structlog.get_logger("envelope_middleware")

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

        exchange = _Exchange(self, scope, receive, send, request_id)
        if self.excluded_paths and self.is_excluded(scope):
            # Decided now: a router further in (Starlette's Mount) rewrites
            # scope["root_path"] before the app responds.
            exchange.excluded = True
        id_token = _request_id.set(request_id)
        context_vars = self.context_vars
        if context_vars is not None:
            id_var, method_var, path_var = context_vars
            tokens = (id_var.set(request_id), method_var.set(scope["method"]), path_var.set(scope["path"]))
        elif self.context_fallback:
            fallback_tokens = structlog_bind(
                request_id=request_id, method=scope["method"], path=scope["path"]
            )
        started = time.perf_counter() if self.access_log else 0.0
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
                    self.logger.info(
                        "http_request",
                        request_id=request_id,
                        method=scope["method"],
                        path=scope["path"],
                        status=exchange.status,
                        error_code=exchange.error_code,
                        duration_ms=round((time.perf_counter() - started) * 1000, 3),
                        bytes_sent=exchange.bytes_sent,
                    )
            finally:
                # Even a failing log call must not leave this request's context behind.
                if context_vars is not None:
                    path_var.reset(tokens[2])
                    method_var.reset(tokens[1])
                    id_var.reset(tokens[0])
                elif self.context_fallback:
                    reset_contextvars(**fallback_tokens)
                _request_id.reset(id_token)

    def _make_request_id(self, scope: Scope) -> str:
        if self.trust_request_id:
            incoming = self._incoming_request_id(scope)
            if incoming is not None:
                return incoming
        if not self.check_generated:
            return self.generate_id()
        try:
            request_id: object = self.generate_id()
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
        found: bytes | None = None
        for name, value in scope["headers"]:
            if name.lower() == self.id_header:
                if found is not None:
                    return None  # two ids: neither can be trusted
                found = value
        if found is None:
            return None
        try:
            candidate = found.decode("ascii").strip(" \t")  # RFC 9110 §5.5: OWS around values
        except UnicodeDecodeError:
            return None
        return candidate if is_safe_request_id(candidate) else None

    def is_excluded(self, scope: Scope) -> bool:
        # Paths are the app's own: a mount point or a proxy's root_path in front
        # of them (which servers and Starlette put into scope["path"]) is not.
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        # Only a whole leading segment is the root: with root_path "/h", "/health" is
        # the app's own path, as Starlette's router reads it.
        if root_path and (path == root_path or path.startswith(root_path + "/")):
            path = path[len(root_path) :] or "/"
        return path in self.excluded_paths or (
            bool(self.excluded_prefixes) and path.startswith(self.excluded_prefixes)
        )


class _Exchange:
    """One request's response, as it passes from the app through the middleware."""

    # Defaults live on the class: most requests never touch most of these, and
    # four assignments per request instead of fifteen are measurable (issue #2).
    mode = _NOT_STARTED
    start: Message | None = None  # the app's start, while held
    status: int | None = None  # what the client was sent
    error_code: str | None = None
    body_size = 0
    bytes_sent = 0
    downstream_started = False
    ended = False  # the app has sent its last body message (taken or not)
    streamed = False  # the app has sent a body message that was not its last
    complete = False  # the server has taken the response's last message
    trailers = False  # a passed-through start announced trailers: they end the response
    disconnected = False  # the app was told the client left
    send_failed = False  # the server's send raised OSError: the client is gone (ASGI 2.4)
    skipped = 0  # bytes held back from the start of a streamed body: a BOM, whitespace
    awaiting_document = False  # a streamed body has shown only whitespace so far
    excluded = False
    answered: Exception | None = None  # an exception a handler handed over, answered for
    wrapped_headers: RawHeaders  # the app's headers a wrapped body keeps, set with the mode

    def __init__(
        self, mw: EnvelopeMiddleware, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        self.mw = mw
        self.scope = scope
        self.receive_upstream = receive
        self.send_downstream = send
        self.request_id_str = request_id
        self.request_id = request_id.encode("ascii")
        self.chunks: list[bytes] = []

    # -- messages to and from the app ----------------------------------------

    async def receive(self) -> Message:
        """The `receive` the app is given: it notes a client that left."""
        message = await self.receive_upstream()
        # Servers also say so once a response is complete: only a client that left
        # before the end is one (an exception from a background task is still the app's).
        if message["type"] == "http.disconnect" and not self.complete:
            self.disconnected = True
        return message

    def send(self, message: Message) -> Awaitable[None]:
        """The `send` the app is given; returns what to await for `message`.

        A plain function, not a coroutine: each kind of message is answered with
        the one coroutine that handles it, which saves a coroutine layer per
        message (issue #2: each costs about as much as a header scan).
        """
        kind = message["type"]
        if kind == "http.response.body":
            # Decided when `send` is called, not when the server has taken the message:
            # an app may call `send` again before awaiting the last body.
            if self.ended:
                raise RuntimeError("the app sent a body after the response was complete")
            mode = self.mode
            if mode == _NOT_STARTED:
                return self._on_body(message)  # refused there, and nothing has ended
            if message.get("more_body", False):
                self.streamed = True
                return self._pass_on(message, ends=False) if mode == _PASS else self._on_body(message)
            self.ended = True
            if mode == _PASS:
                return self._pass_on(message, ends=not self.trailers)
            if (
                mode in (_WRAP_BUFFER, _WRAP_STREAM)
                and not self.streamed
                and (held := self.start) is not None
            ):
                # A body in one message, the common case in both modes: one coroutine
                # sends it whole, with no streaming bookkeeping. Not after an earlier
                # body message, even one not awaited yet: it goes first, through _on_body.
                return self._send_wrapped(held, message.get("body", b""))
            return self._on_body(message)
        if kind == "http.response.start":
            forward = self._on_start(message)
            return _held() if forward is None else self._send_start(forward)
        return self._on_other(message)

    def _on_start(self, message: Message) -> Message | None:
        """Decide what to do with the response; the start to send now, if any."""
        if self.mode != _NOT_STARTED:
            raise RuntimeError("the app sent http.response.start twice")
        headers: RawHeaders = message.get("headers") or []
        if type(headers) is not list:
            # ASGI allows any iterable; it is read more than once here.
            headers = _as_bytes(headers)
            message = {**message, "headers": headers}
        try:
            return self._decide(message, headers)
        except (TypeError, AttributeError):
            # bytearray or memoryview names and values, which servers accept,
            # cannot be hashed or lowered as the scan needs: as bytes, once more.
            headers = _as_bytes(headers)
            return self._decide({**message, "headers": headers}, headers)

    def _decide(self, message: Message, headers: RawHeaders) -> Message | None:
        status = message["status"]
        # A final response's status (RFC 9110 §15), an int as ASGI says (HTTPStatus is
        # one): 200.0 and True equal 200 and 1 but are no status line. The app's bug answers 500.
        if (type(status) is not int and (type(status) is bool or not isinstance(status, int))) or not (
            200 <= status <= 599
        ):
            raise RuntimeError(f"the app sent an invalid status: {status!r}")
        # HEAD goes the way of GET: RFC 9110 §9.3.2 asks for the headers a GET would
        # get, and §8.6 forbids a Content-Length other than the GET's. Starlette's
        # responses but FileResponse send the body on HEAD (servers drop it), so the
        # envelope's length is known; without a body, _length_of_nothing decides.
        if self.excluded:
            mode = _PASS
        elif status in (204, 205, 304):
            mode = _BODYLESS
        elif status >= 400:
            mode = _ERROR
        elif status >= 300 or status == 206 or message.get("trailers", False):
            mode = _PASS
        else:
            mode = self._wrap_mode(headers)
        self.mode = mode
        if mode in (_PASS, _BODYLESS):
            self.trailers = mode == _PASS and bool(message.get("trailers", False))
            id_name = self.mw.id_header
            if mode == _PASS or status == 304:
                kept = [pair for pair in headers if pair[0].lower() != id_name]
            else:
                # RFC 9110 §8.6 and §15.3.6: no Content-Length on a 204, and a 205
                # says "no content" with Content-Length: 0; the body is dropped below.
                kept = [pair for pair in headers if pair[0].lower() not in (id_name, b"content-length")]
                if status == 205:
                    kept.append((b"content-length", b"0"))
            kept.append((id_name, self.request_id))
            forward = {**message, "headers": kept}
            if mode == _BODYLESS:
                # No content, so no trailer section either (RFC 9110 §6.5): the start does
                # not announce one, and the app's trailers are dropped as its body is.
                forward.pop("trailers", None)
            return forward
        self.start = message
        return None

    def _wrap_mode(self, headers: RawHeaders) -> int:
        # One pass decides whether to wrap and keeps the headers a wrapped body
        # can carry, so the start is not scanned twice (issue #2, per-request cost).
        drop = self.mw.wrap_drop
        kept: RawHeaders = []
        content_type: bytes | None = None
        for pair in headers:
            lowered = pair[0].lower()
            if lowered in drop:
                if lowered == b"content-type" and content_type is None:
                    content_type = pair[1]  # the first, as the error path reads it
                elif lowered == b"etag" and pair[1].startswith(b"W/"):
                    # A weak validator still holds for the same data in an envelope (RFC 9110 §8.8.1).
                    kept.append(pair)
            elif lowered == b"content-encoding":
                if pair[1].strip().lower() not in (b"", b"identity"):
                    return _PASS  # coded bytes cannot be spliced
                # No coding at all: nothing the envelope's bytes need said of them.
            else:
                kept.append(pair)
        if content_type is None or not is_json_media_type(content_type):
            return _PASS
        self.wrapped_headers = kept
        return _WRAP_BUFFER if self.mw.validate_json else _WRAP_STREAM

    async def _on_body(self, message: Message) -> None:
        mode = self.mode
        body: bytes = message.get("body", b"")
        if type(body) is not bytes:
            # A bytearray or memoryview, which servers accept: as bytes, so that sizes
            # count bytes (a typed memoryview's len counts its items) and joins work.
            body = bytes(body)
        more: bool = message.get("more_body", False)
        held = self.start
        if held is None:
            if mode == _WRAP_STREAM:
                end = b"}"
                if self.awaiting_document:
                    if not is_blank(body):
                        self.awaiting_document = False
                    else:
                        end = b"null}"  # whitespace alone: an empty body, `null`
                await self._write((body, end) if not more else (body,), more=more)
            elif mode == _BODYLESS:
                # The middleware's own empty message, in place of the app's body.
                await self._write((b"",), more=more)
            else:
                raise RuntimeError("the app sent a body before http.response.start")
        elif mode == _WRAP_BUFFER:
            self.chunks.append(body)
            self.body_size += len(body)
            if not more:
                chunks, self.chunks = self.chunks, []
                await self._send_wrapped(held, b"".join(chunks))
            elif (limit := self.mw.held_limit) is not None and self.body_size > limit:
                # Memory stays bounded; the check is given up for this body, and said so.
                self.mw.logger.warning(
                    "json_not_validated", request_id=self.request_id_str, held_bytes=self.body_size
                )
                chunks, self.chunks = self.chunks, []
                self.mode = _WRAP_STREAM
                await self._open_wrapped_stream(held, b"".join(chunks), more=True)
        elif mode == _WRAP_STREAM:
            await self._open_wrapped_stream(held, body, more=more)
        else:  # _ERROR
            room = ERROR_BODY_LIMIT - self.body_size
            if room > 0:
                self.chunks.append(body[:room] if len(body) > room else body)
            self.body_size += len(body)
            if not more:
                await self._send_error_from_response(held)

    async def _on_other(self, message: Message) -> None:
        kind = message["type"]
        if kind in _SENDFILE_MESSAGES:
            if self.ended:
                raise RuntimeError(f"the app sent {kind} after the response was complete")
            # pathsend always ends the body; zerocopysend may come in several parts.
            last = kind == "http.response.pathsend" or not message.get("more_body", False)
            self.ended = last
            held = self.start
            if self.mode == _ERROR:
                # An error page sent as a file: its bytes are not read, the status decides.
                if last and held is not None:
                    await self._send_error_from_response(held)
                return
            if held is not None:
                # A JSON file sent by path cannot be wrapped without reading it: it passes.
                self.mode = _PASS
                id_name = self.mw.id_header
                kept = [pair for pair in held["headers"] if pair[0].lower() != id_name]
                kept.append((id_name, self.request_id))
                await self._send_start({**held, "headers": kept})
            await self._pass_on(message, ends=last and not self.trailers)
        elif kind == "http.response.trailers":
            # An error or bodyless response's are dropped: it is sent without them. A
            # passed-through response's last trailers are its last message (ASGI's
            # HTTP trailers extension).
            if self.mode not in (_ERROR, _BODYLESS):
                await self._pass_on(message, ends=self.trailers and not message.get("more_trailers", False))
        else:
            await self._pass_on(message, ends=False)

    async def _pass_on(self, message: Message, *, ends: bool) -> None:
        """Send a message the app made, as it is; `ends`: whether it completes the response.

        Awaited here rather than handed back: an `OSError` from the server is a
        client that left (ASGI 2.4) for these messages as for the middleware's own,
        and the response is complete once the server took the last of them.
        """
        body = message.get("body", b"")
        # The bytes, not the items, of a memoryview of a typed array.
        size = len(body) if type(body) is bytes else memoryview(body).nbytes
        try:
            await self.send_downstream(message)
        except OSError:
            self.send_failed = True
            raise
        self.bytes_sent += size
        self.complete = self.complete or ends

    # -- wrapping 2xx JSON ---------------------------------------------------

    async def _send_wrapped(self, held: Message, body: bytes) -> None:
        """The whole body is here and the start held: check it (validating mode), send it wrapped."""
        if type(body) is not bytes:
            body = bytes(body)  # a bytearray or memoryview, which servers accept
        received = len(body)
        if body.startswith(BOM):
            # RFC 8259 §8.1: a parser may ignore a BOM; inside an envelope it would be invalid.
            body = body[3:]
        # is_blank, inline: this runs for every wrapped body, and the first byte decides.
        if not body or (body[0] in JSON_WHITESPACE and is_blank(body)):
            body = b"null"  # nothing, or whitespace alone: no document
        elif self.mode == _WRAP_BUFFER and (problem := json_error(body)) is not None:
            # The body may hold anything: its size and the parser's reason are logged, not it.
            self.mw.logger.warning(
                "downstream_invalid_json",
                request_id=self.request_id_str,
                body_bytes=len(body),
                reason=problem,
            )
            await self._send_error(self.mw.errors.for_code("downstream_invalid_response"), [])
            return
        prefix = b'{"request_id":"' + self.request_id + b'","data":'
        size = len(prefix) + len(body) + 1
        self.start = None
        self.downstream_started = True
        send = self.send_downstream
        try:
            await send(self._wrapped_start(held, size if received else self._length_of_nothing(held, size)))
            self.status = held["status"]
            if size <= _JOIN_LIMIT:
                await send({"type": "http.response.body", "body": b"".join((prefix, body, b"}"))})
            else:
                # Large: the body goes out as it is rather than copied into one buffer.
                await send({"type": "http.response.body", "body": prefix, "more_body": True})
                await send({"type": "http.response.body", "body": body, "more_body": True})
                await send({"type": "http.response.body", "body": b"}"})
        except OSError:
            self.send_failed = True
            raise
        # Complete, and counted, once the server took it: a server that refused the
        # last message has not sent a whole response.
        self.complete = True
        self.bytes_sent = size

    async def _open_wrapped_stream(self, held: Message, body: bytes, *, more: bool) -> None:
        if self.chunks:
            self.chunks.append(body)
            body = b"".join(self.chunks)
            self.chunks = []
        # A BOM (RFC 8259 §8.1) inside the envelope would make it invalid: dropped,
        # however the messages split it.
        if body.startswith(BOM):
            body = body[3:]
            self.skipped += len(BOM)
        elif more and len(body) < len(BOM) and BOM.startswith(body):
            self.chunks.append(body)  # a BOM's first bytes, perhaps
            return
        prefix = b'{"request_id":"' + self.request_id + b'","data":'
        if more:
            length = self._streamed_length(held, len(prefix) + 1)
            if is_blank(body):
                if length is not None or not body:
                    # Nothing to show yet; if the body stays empty it becomes `null`,
                    # which a declared length has no room for.
                    self.skipped += len(body)
                    return
                # Whitespace on an unframed stream goes out now (it may be a keep-alive
                # of a long poll); a `null` can still follow it.
                self.awaiting_document = True
            await self._send_start(self._wrapped_start(held, length))
            await self._write((prefix, body), more=True)
            return
        received = self.skipped + len(body)
        if is_blank(body):
            body = b"null"
        size = len(prefix) + len(body) + 1
        length = size if received else self._length_of_nothing(held, size)
        await self._send_start(self._wrapped_start(held, length))
        await self._write((prefix, body, b"}"), more=False)

    def _length_of_nothing(self, held: Message, size: int) -> int | None:
        """The Content-Length for an app that sent no body: `size`, that of `"data":null`."""
        if self.scope["method"] != "HEAD":
            return size
        # A HEAD answered without the body (RFC 9110 §9.3.2 allows it): unless the app
        # says the GET's body is empty too (Content-Length: 0), the envelope's length
        # is unknown, so none is sent, which §8.6 allows.
        declared = header_value(held.get("headers") or [], b"content-length")
        return size if declared is not None and bytes(declared).strip(b" \t0") == b"" else None

    def _streamed_length(self, held: Message, overhead: int) -> int | None:
        # The app's Content-Length, if it gave one, plus the envelope around it;
        # otherwise none, and the server frames the body (chunked, RFC 9112 §7.1).
        declared = header_value(held.get("headers") or [], b"content-length")
        if declared is None:
            return None
        declared = bytes(declared)  # a bytearray or memoryview, which servers accept
        if not declared.isdigit() or len(declared) > _MAX_LENGTH_DIGITS:
            return None
        # What was dropped from the start was counted in the app's length.
        return int(declared) + overhead - self.skipped

    def _wrapped_start(self, held: Message, content_length: int | None) -> Message:
        headers = self.wrapped_headers
        headers.append((b"content-type", b"application/json"))
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        headers.append((self.mw.id_header, self.request_id))
        return {"type": "http.response.start", "status": held["status"], "headers": headers}

    # -- errors --------------------------------------------------------------

    async def _send_error_from_response(self, held: Message) -> None:
        headers = _as_bytes(held.get("headers") or [])
        kept_body = b"".join(self.chunks)
        self.chunks = []
        state = self.scope.get("state")
        handed_over = state.pop(HANDED_OVER_KEY, None) if isinstance(state, dict) else None
        if isinstance(handed_over, Exception):
            # A handler's stand-in (envelope_middleware.handlers): the exception says what
            # the error is, and the stand-in's headers (CORS or cookies from a layer further
            # in) are kept as any error response's are.
            if self._client_left(handed_over):
                return  # no one to answer; the exception's end (fail or finish) logs it
            failure = self._exception_failure(handed_over)
        else:
            # A body cut at the limit is not parsed: half a document describes nothing.
            body = kept_body if self.body_size <= ERROR_BODY_LIMIT else b""
            failure = self.mw.errors.from_response(
                held["status"],
                header_value(headers, b"content-type"),
                body,
                has_credentials=self._has_credentials(),
            )
        if failure.status >= 500 and kept_body and handed_over is None:
            # What the client will not see is kept for whoever reads the log.
            self.mw.logger.warning(
                "error_body_replaced",
                request_id=self.request_id_str,
                status=failure.status,
                body_bytes=self.body_size,
                body_excerpt=kept_body[:_LOGGED_BODY_LIMIT].decode("utf-8", "replace"),
            )
        if failure.status >= 500:
            kept = [
                pair
                for pair in headers
                if (name := pair[0].lower()) in SERVER_ERROR_HEADERS or name.startswith(b"access-control-")
            ]
        else:
            drop = self.mw.error_drop
            kept = [pair for pair in headers if pair[0].lower() not in drop]
        # Kept for the client to act on, so only in a form it can act on.
        kept = [pair for pair in kept if pair[0].lower() != b"retry-after" or is_retry_after(pair[1])]
        await self._send_error(failure, kept)

    async def fail(self, exc: Exception) -> bool:
        """Answer for an exception from the app; False when it is too late to answer."""
        mw = self.mw
        request_id = self.request_id_str
        if self.answered is not None and _unwrap(exc) is self.answered:
            # Handed over, answered for and logged; re-raised by the sub-app's
            # ServerErrorMiddleware, as it re-raises whatever it handled.
            return True
        if self._client_left(exc):
            # No one to answer, and no server error in anyone's metrics.
            mw.logger.warning("client_disconnected", request_id=request_id, exc_info=exc)
            return True
        if self.downstream_started:
            # A response cut short must not pass for whole: the server aborts it.
            # A complete one stands; aborting it would only close the connection.
            mw.logger.error(
                "exception_after_response_started",
                request_id=request_id,
                response_complete=self.complete,
                exc_info=exc,
            )
            return self.complete
        # Nothing has gone out: whatever the app had begun is discarded.
        self.start = None
        self.chunks = []
        await self._send_answer(self._exception_failure(exc))
        return True

    def _exception_failure(self, exc: Exception) -> Failure:
        """What to answer for `exc`, logged: the client gets a generic message, the log the exception."""
        mw = self.mw
        request_id = self.request_id_str
        self.answered = raised = _unwrap(exc)
        failure = mw.errors.from_exception(raised, has_credentials=self._has_credentials())
        if failure.log == "error":
            mw.logger.error(
                "unhandled_exception", request_id=request_id, error_code=failure.code, exc_info=exc
            )
        elif failure.log == "warning":
            mw.logger.warning(
                "mapped_exception", request_id=request_id, error_code=failure.code, exc_info=exc
            )
        return failure

    def _client_left(self, exc: Exception) -> bool:
        # The app failing to read from or write to a client that left: ASGI 2.4
        # servers raise OSError from a `send` (which Starlette's StreamingResponse
        # turns into ClientDisconnect), and Starlette raises ClientDisconnect from a
        # `receive` that said so. Anything else, even after a disconnect (a background
        # task's bug, the app's own OSError), is still the app's error.
        exc = _unwrap(exc)
        if self.send_failed:
            return isinstance(exc, OSError | ClientDisconnect)
        return self.disconnected and isinstance(exc, ClientDisconnect)

    async def finish(self) -> None:
        """The app returned without completing its response."""
        request_id = self.request_id_str
        if self.disconnected or self.send_failed:
            # Starlette's StreamingResponse stops this way when the client leaves.
            self.mw.logger.warning("client_disconnected", request_id=request_id)
            return
        if self.downstream_started:
            # The server sees an unfinished response and closes the connection.
            self.mw.logger.error("app_returned_mid_response", request_id=request_id)
            return
        self.mw.logger.error("app_returned_without_response", request_id=request_id)
        self.start = None
        await self._send_answer(self.mw.errors.for_code("internal"))

    async def _send_answer(self, failure: Failure) -> None:
        """Send the middleware's answer for an app that failed, if the client is still there."""
        try:
            await self._send_error(failure, [])
        except OSError as exc:
            # ASGI 2.4: the server's send raised, the client left (see _client_left).
            # No app is left to see it, and the server is not to be told of an error.
            self.mw.logger.warning("client_disconnected", request_id=self.request_id_str, exc_info=exc)

    async def _send_error(self, failure: Failure, headers: RawHeaders) -> None:
        body = self.mw.errors.render(self.request_id, failure)
        if failure.headers:
            drop = self.mw.error_drop
            own = [
                encoded
                for name, value in failure.headers.items()
                if (encoded := _encode_header(name, value)) is not None and encoded[0] not in drop
            ]
            # The exception's own headers replace a response's of the same name (a
            # handed-over RateLimited and its stand-in both give a Retry-After).
            names = {name for name, _ in own}
            headers = [pair for pair in headers if pair[0].lower() not in names] + own
        headers.append((b"content-type", b"application/json"))
        headers.append((b"content-length", b"%d" % len(body)))
        headers.append((self.mw.id_header, self.request_id))
        await self._send_start({"type": "http.response.start", "status": failure.status, "headers": headers})
        self.error_code = failure.code  # with the status: what the client was sent
        if self.scope["method"] == "HEAD":
            body = b""  # RFC 9110 §9.3.2: the headers say what a GET would have sent
        await self._write((body,), more=False)

    # -- sending -------------------------------------------------------------

    async def _send_start(self, message: Message) -> None:
        # A coroutine: the start counts as sent when it is, not when `send` is
        # called (an app may cancel or drop what `send` returns).
        self.start = None
        self.downstream_started = True
        try:
            await self.send_downstream(message)
        except OSError:
            self.send_failed = True
            raise
        self.status = message["status"]  # the access event's: what the client was sent

    async def _write(self, parts: tuple[bytes, ...], *, more: bool) -> None:
        size = sum(map(len, parts))
        send = self.send_downstream
        try:
            if size <= _JOIN_LIMIT or len(parts) == 1:
                await send({"type": "http.response.body", "body": b"".join(parts), "more_body": more})
            else:
                # Large: the parts go out as they are rather than copied into one buffer.
                last = len(parts) - 1
                for index, part in enumerate(parts):
                    await send(
                        {"type": "http.response.body", "body": part, "more_body": more or index < last}
                    )
        except OSError:
            self.send_failed = True
            raise
        self.complete = not more
        self.bytes_sent += size

    def _has_credentials(self) -> bool:
        return header_value(self.scope["headers"], b"authorization") is not None


def _as_bytes(headers: Iterable[tuple[Any, Any]]) -> RawHeaders:
    # bytes-like names and values as bytes; anything else (str, int) is the app's
    # bug and raises here rather than becoming zero bytes.
    return [(bytes(memoryview(name)), bytes(memoryview(value))) for name, value in headers]


# What Starlette's ExceptionMiddleware raises, from the exception, when a handler
# exists for an exception raised after the app's start: too late for the handler,
# not for the middleware while it still holds that start.
_HANDLED_TOO_LATE = ("Caught handled exception, but response already started.",)


def _unwrap(exc: Exception) -> Exception:
    """The exception the app meant: through exception groups of one (anyio's task
    groups raise them) and Starlette's handled-too-late RuntimeError."""
    while True:
        if isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        elif (
            type(exc) is RuntimeError
            and exc.args == _HANDLED_TOO_LATE
            and isinstance(exc.__cause__, Exception)
        ):
            exc = exc.__cause__
        else:
            return exc


def _encode_header(name: object, value: object) -> tuple[bytes, bytes] | None:
    # Headers from exceptions are app data: numbers are written out, anything
    # that is not a token name and a field value (RFC 9110 §5.5) is refused,
    # since a server rejects it only after the response has started.
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(name, str) or not isinstance(value, str) or not TOKEN.fullmatch(name):
        return None
    try:
        encoded = value.encode("latin-1")
    except UnicodeEncodeError:
        return None
    if _FIELD_VALUE_INVALID.search(encoded):
        return None
    return name.lower().encode("ascii"), encoded
