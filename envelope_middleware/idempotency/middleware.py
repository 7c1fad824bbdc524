"""IdempotencyMiddleware: a write retried under the same Idempotency-Key runs once."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Awaitable, Callable, Iterable

import structlog
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from envelope_middleware._http import TOKEN
from envelope_middleware.exceptions import (
    ApiError,
    IdempotencyKeyConflict,
    RequestInvalid,
    RequestMissingIdempotencyKey,
    ServiceUnavailable,
)
from envelope_middleware.idempotency import _record, _run
from envelope_middleware.idempotency._run import FirstRun
from envelope_middleware.idempotency.store import Held, IdempotencyStore, MemoryStore, StoreUnavailable
from envelope_middleware.logging import EventLogger

__all__ = ["IdempotencyMiddleware", "Principal"]

Principal = Callable[[Scope], str | Awaitable[str | None] | None]
"""Who is calling: the id the gateway authenticated, or None to leave the request alone."""

_KEY = re.compile(rb"[\x21-\x7e]{1,64}")  # the contract's key: 1 to 64 visible ASCII characters
_WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
_DAY = 24 * 60 * 60.0
# A retry after this many seconds usually finds the first request done: writes at
# the gateway take milliseconds, and the contract's own backoff starts at 500 ms.
_IN_PROGRESS_RETRY_AFTER = "1"


class IdempotencyMiddleware:
    """Run each keyed write once; answer its retries from the recorded response.

    Mount it inside `EnvelopeMiddleware` (its errors and replays then get the
    envelope and a fresh request id) and where the caller is known.

    Options:
        principal: scope -> the authenticated caller's id (sync or async). Keys
            are scoped to it: two callers never share a record. It may raise
            (an `ApiError` answers as itself) and the store is never touched;
            None passes the request to the app untouched.
        store: where state lives; a `MemoryStore()` (one process) by default,
            `RedisStore` for many workers and hosts.
        methods: the methods that are writes; other requests ignore the header.
        require_key: whether a write without the header is refused with
            `400 request_missing_idempotency_key` (a bool, or scope -> bool).
        header: the request header carrying the key.
        ttl: seconds a completed answer is kept for replay (24 hours).
        lease: seconds a claim in flight holds its key; after that a retry runs
            again. Keep it above the longest a write can take (its backend timeout).
        max_body_size: the largest request body read for the fingerprint; larger
            is `413 request_invalid`.
        max_response_size: the largest response body recorded; a larger answer
            keeps its key used, and a retry gets `409` with reason `response_not_recorded`.
        logger: the structlog logger to write to (default: `envelope_middleware.idempotency`).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        principal: Principal,
        store: IdempotencyStore | None = None,
        methods: Iterable[str] = _WRITE_METHODS,
        require_key: bool | Callable[[Scope], bool] = False,
        header: str = "Idempotency-Key",
        ttl: float = _DAY,
        lease: float = 30.0,
        max_body_size: int = 1024 * 1024,
        max_response_size: int = 1024 * 1024,
        logger: EventLogger | None = None,
    ) -> None:
        if not callable(principal):
            raise TypeError("principal is a callable from the request's scope to the caller's id")
        if not isinstance(header, str) or not TOKEN.fullmatch(header):
            raise ValueError(f"header is not a valid header name: {header!r}")
        for name, seconds in (("ttl", ttl), ("lease", lease)):
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not 0 < seconds < math.inf
            ):
                raise ValueError(f"{name} is a positive number of seconds, not {seconds!r}")
        for name, size in (("max_body_size", max_body_size), ("max_response_size", max_response_size)):
            if type(size) is not int or size < 0:
                raise ValueError(f"{name} is a number of bytes, not {size!r}")
        self.app = app
        self.principal = principal
        self.store: IdempotencyStore = store if store is not None else MemoryStore()
        self.methods = frozenset(method.upper() for method in methods)
        self.require_key = require_key
        self.header = header
        self.header_name = header.lower().encode("latin-1")
        self.ttl = float(ttl)
        self.lease = float(lease)
        self.max_body_size = max_body_size
        self.max_response_size = max_response_size
        self.logger = (
            logger if logger is not None else structlog.get_logger("envelope_middleware.idempotency")
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            await self.app(scope, receive, send)
            return
        # Who is asking comes first: a request that fails authentication is
        # answered as such and never touches the store.
        principal = self.principal(scope)
        if type(principal) is not str and inspect.isawaitable(principal):
            principal = await principal
        if principal is None:
            await self.app(scope, receive, send)
            return
        if not isinstance(principal, str):
            raise TypeError(f"principal returned {type(principal).__name__}, not a str or None")
        key, declared = self._headers(scope)
        if key is None:
            required = self.require_key(scope) if callable(self.require_key) else self.require_key
            if required:
                raise RequestMissingIdempotencyKey(details={"header": self.header})
            await self.app(scope, receive, send)
            return

        body = await self._read_body(declared, receive)
        fingerprint = _record.fingerprint(
            scope["method"], scope.get("raw_path") or scope["path"].encode(), scope["query_string"], body
        )
        operation = _record.operation_key(principal, key)
        token = _run.token()
        try:
            held = await self.store.claim(operation, token, fingerprint, self.lease)
        except StoreUnavailable:
            self.logger.exception("idempotency_store_unavailable", operation="claim")
            # A claim that timed out here may still land in a stalled store: freed
            # (by its own token) so that retries run, not wait out the lease.
            _run.release_later(self.store, operation, token, self.lease)
            raise ServiceUnavailable(
                "Writes are unavailable for a moment; retry later.",
                details={"reason": "idempotency_store_unavailable"},
                headers={"Retry-After": "1"},
            ) from None
        if held is not None:
            await self._answer_held(held, fingerprint, send)
            return
        await FirstRun(self, scope, operation, token).run(receive, send, body)

    def _headers(self, scope: Scope) -> tuple[str | None, int | None]:
        """The request's key (None without one) and declared body length, in one pass."""
        found: bytes | None = None
        declared: int | None = None
        header_name = self.header_name
        for raw_name, value in scope["headers"]:
            name = raw_name.lower()
            if name == header_name:
                if found is not None:
                    raise self._invalid_key("must be sent once")
                found = value
            elif name == b"content-length":
                declared = _length(value)
        if found is None:
            return None, declared
        key = bytes(found).strip(b" \t")  # RFC 9110 §5.5: whitespace around a value is not part of it
        if not _KEY.fullmatch(key):
            # The value itself is neither repeated back nor logged: it may be anything.
            raise self._invalid_key("must be 1 to 64 visible ASCII characters")
        return key.decode("ascii"), declared

    def _invalid_key(self, message: str) -> RequestInvalid:
        field = {"field": self.header, "location": "header", "message": message, "type": "idempotency_key"}
        return RequestInvalid(f"The {self.header} header is invalid.", details={"errors": [field]})

    async def _read_body(self, declared: int | None, receive: Receive) -> bytes:
        if declared is not None and declared > self.max_body_size:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_size:
                raise self._too_large()
            if not message.get("more_body", False):
                # Most bodies come in one message: that one is kept as it is, uncopied.
                return bytes(chunk) if not chunks else b"".join([*chunks, chunk])
            chunks.append(chunk)

    @staticmethod
    def _differences(stored: bytes, fingerprint: bytes) -> list[str]:
        return _record.decode_fingerprint(fingerprint).differences(_record.decode_fingerprint(stored))

    def _too_large(self) -> ApiError:
        return ApiError(
            "request_invalid",
            f"The request body is larger than {self.max_body_size} bytes.",
            status=413,
            details={"max_bytes": self.max_body_size},
        )

    async def _answer_held(self, held: Held, fingerprint: bytes, send: Send) -> None:
        differs = [] if held.fingerprint == fingerprint else self._differences(held.fingerprint, fingerprint)
        if differs:
            self.logger.info("idempotency_key_conflict", reason="request_mismatch", differs=differs)
            raise IdempotencyKeyConflict(
                "This Idempotency-Key was used with a different request.",
                details={"reason": "request_mismatch", "differs": differs},
            )
        if held.response is None:
            self.logger.info("idempotency_key_conflict", reason="in_progress")
            raise IdempotencyKeyConflict(
                "A request with this Idempotency-Key is still in progress; retry later.",
                details={"reason": "in_progress"},
                headers={"Retry-After": _IN_PROGRESS_RETRY_AFTER},
            )
        record = _record.decode_record(held.response)
        self.logger.info("idempotent_replay", original_request_id=record.request_id, status=record.status)
        record.raise_error()
        marks = record.replay_marks()
        if record.body is None:
            raise IdempotencyKeyConflict(
                "This Idempotency-Key's request ran, but its response was not recorded; read the resource.",
                details={"reason": "response_not_recorded"},
                headers=[(name.decode("ascii"), value.decode("ascii")) for name, value in marks],
            )
        headers = [*record.headers, *marks]
        headers.append((b"content-length", str(len(record.body)).encode("ascii")))
        await send({"type": "http.response.start", "status": record.status, "headers": headers})
        await send({"type": "http.response.body", "body": record.body, "more_body": False})


def _length(value: bytes) -> int | None:
    """A Content-Length's number; None if it is none (the body's real size is bounded anyway)."""
    text = bytes(value).strip(b" \t")
    if not text.isdigit():
        return None
    # RFC 9110 §8.6 allows leading zeros; past 18 digits it is above any bound,
    # and int() refuses strings of over 4300 digits.
    significant = text.lstrip(b"0")
    return int(significant or b"0") if len(significant) <= 18 else 10**18
