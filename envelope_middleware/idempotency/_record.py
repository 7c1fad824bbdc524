"""What the idempotency middleware keeps of a request and its answer, as bytes for a store."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, TypeGuard

import msgspec
import orjson

from envelope_middleware._errors import as_headers
from envelope_middleware._http import encode_header, is_int_status
from envelope_middleware.exceptions import ApiError

# Headers that belong to one exchange, not to the answer: a replay goes without
# them (RFC 9110 §7.6.1's connection options, §6.6.1 Date, §10.2.4 Server; a
# session cookie set for the first request is not handed out again). The
# body's length is set anew for the replayed body.
EXCHANGE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"date",
        b"server",
        b"set-cookie",
        b"content-length",
    }
)
# Answers that say nothing was executed, or that a retry may be answered otherwise
# (issue #10): never recorded, so the key is free again. Every 5xx likewise.
NOT_RECORDED = frozenset({401, 403, 407, 408, 425, 429})


def is_recorded(status: object) -> TypeGuard[int]:
    """Whether an answer with this status is kept for replay (an `HTTPStatus` is one, as for the envelope)."""
    return is_int_status(status) and 200 <= status <= 499 and status not in NOT_RECORDED


class Fingerprint(msgspec.Struct, array_like=True, frozen=True):
    """What makes two requests under one key the same request."""

    method: str
    path: bytes
    query: bytes
    body: bytes  # SHA-256 of the body's bytes

    def differences(self, other: Fingerprint) -> list[str]:
        """The parts that differ, by name; never their values."""
        parts = ("method", "path", "query", "body")
        return [part for part in parts if getattr(self, part) != getattr(other, part)]


class RaisedError(msgspec.Struct, array_like=True):
    """An `ApiError` the app raised instead of responding."""

    code: str
    message: str
    details: bytes  # JSON
    default_message: bool = False


class Record(msgspec.Struct, array_like=True):
    """A completed request's answer: a response, an error raised, or a marker.

    `body` is None when the response could not be kept (too large, a file,
    trailers): its key stays used, and a retry is told so instead of running.
    """

    request_id: str | None
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes | None = None
    error: RaisedError | None = None

    def replay_marks(self) -> list[tuple[bytes, bytes]]:
        """The headers that tell a replay from a first answer."""
        marks = [(b"idempotent-replayed", b"true")]
        if self.request_id is not None:
            marks.append((b"original-request-id", self.request_id.encode("ascii")))
        return marks

    def raise_error(self) -> None:
        """Raise the recorded error again, with the replay's headers; the envelope answers it."""
        error = self.error
        if error is None:
            return
        pairs = [*self.headers, *self.replay_marks()]
        headers = [(name.decode("utf-8"), value.decode("utf-8")) for name, value in pairs]
        details = orjson.loads(error.details)
        raised = ApiError(error.code, error.message, status=self.status, details=details, headers=headers)
        raised.default_message = error.default_message
        raise raised


_encoder = msgspec.msgpack.Encoder()
_fingerprint_decoder = msgspec.msgpack.Decoder(Fingerprint)
_record_decoder = msgspec.msgpack.Decoder(Record)


def fingerprint(method: str, path: bytes, query: bytes, body: bytes) -> bytes:
    """The encoded `Fingerprint` of a request, as a store keeps it."""
    return _encoder.encode((method, path, query, hashlib.sha256(body).digest()))


def encode(value: Record) -> bytes:
    return _encoder.encode(value)


def decode_fingerprint(data: bytes) -> Fingerprint:
    return _fingerprint_decoder.decode(data)


def decode_record(data: bytes) -> Record:
    return _record_decoder.decode(data)


def operation_key(principal: str, key: str) -> str:
    """The store's key for one caller's Idempotency-Key: a digest, so neither is kept raw."""
    material = f"{len(principal)}:{principal}:{key}".encode()
    return hashlib.sha256(material).hexdigest()


def error_record(exc: BaseException, request_id: str | None) -> Record | None:
    """The record of an exception the app raised before responding; None if not kept.

    Only an `ApiError` is kept: Starlette renders its `HTTPException` inside the
    route, so what reaches the middleware of one is already a response.
    """
    if isinstance(exc, ApiError) and is_recorded(exc.status):
        details = _json(exc.details)
        error = RaisedError(exc.code, exc.message, details, default_message=exc.default_message)
        return Record(request_id, exc.status, _header_pairs(as_headers(exc.headers)), error=error)
    return None


def first_request_id(value: object) -> str | None:
    # The envelope sets only ids that are safe in a header (it checks a custom
    # generator's), so one found there is repeated in Original-Request-ID as it is.
    return value if isinstance(value, str) else None


def _header_pairs(headers: Mapping[Any, Any]) -> list[tuple[bytes, bytes]]:
    # What the envelope sends of them: numbers written out, anything that is no
    # header dropped (recording the app's values as they were failed the request
    # on a number, a 500 that freed the key). Stored as UTF-8 text, as records
    # always were: the envelope encodes the replayed text as it did the first time.
    return [
        (encoded[0], encoded[1].decode("latin-1").encode("utf-8"))
        for name, value in headers.items()
        if (encoded := encode_header(name, value)) is not None
    ]


def _json(details: Any) -> bytes:
    try:
        return orjson.dumps(details, default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        # The envelope degrades such details too; the replay keeps the code and message.
        return b"{}"
