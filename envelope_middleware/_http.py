"""HTTP facts the middleware needs: which bodies are JSON, which headers describe a body."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, TypeGuard

import msgspec

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 §8 representation metadata and §8.8 validators, plus the digest
# fields of RFC 9530: they describe the bytes of a body, so they are wrong
# once the middleware has replaced or wrapped those bytes.
BODY_HEADERS = frozenset(
    {
        b"content-length",
        b"content-type",
        b"content-encoding",
        b"content-language",
        b"content-location",
        b"content-range",
        b"content-disposition",
        b"content-md5",
        b"digest",
        b"content-digest",
        b"repr-digest",
        b"etag",
        b"last-modified",
        b"transfer-encoding",
    }
)

# Wrapping a body leaves it semantically the same data, so weak validators and
# Last-Modified stay true; a strong ETag (RFC 9110 §8.8.3) and digests promise
# these exact bytes and must go.
WRAPPED_BODY_HEADERS = frozenset(
    {
        b"content-length",
        b"content-type",
        b"transfer-encoding",
        # Byte ranges of the service's document do not address the envelope.
        b"accept-ranges",
        b"content-md5",
        b"digest",
        b"content-digest",
        b"repr-digest",
    }
)

# A 5xx from an app or service keeps only these (and CORS's Access-Control-*):
# its other headers, like its body, may name hosts and versions (Server,
# X-Backend-Host, X-Debug-*), and the contract keeps those from partners.
SERVER_ERROR_HEADERS = frozenset(
    {
        b"retry-after",
        b"cache-control",
        b"expires",
        b"pragma",
        b"vary",
        b"set-cookie",
        b"www-authenticate",
        b"proxy-authenticate",
        b"allow",
        b"strict-transport-security",
        b"content-security-policy",
        b"x-content-type-options",
        b"x-frame-options",
        b"referrer-policy",
    }
)

# What the 502 for a 2xx body that is not JSON keeps of the 2xx's headers: what a
# 5xx keeps, but the caching of the data it was meant to be (a cache would keep the
# error as long), and with the idempotency middleware's replay marks (it replays a
# recorded 2xx, and so this 502; never a service's own 5xx).
INVALID_BODY_HEADERS = (SERVER_ERROR_HEADERS - {b"cache-control", b"expires", b"pragma"}) | {
    b"idempotent-replayed",
    b"original-request-id",
}

# RFC 9110 §10.2.3: Retry-After is delay-seconds or an HTTP-date, which senders
# write as IMF-fixdate (§5.6.7). Anything else a service sends there is not a
# hint a client can act on, and may name hosts ("soon; host=db-1.internal").
_RETRY_AFTER = re.compile(
    rb"[ \t]*(?:[0-9]+|(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} "
    rb"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT)[ \t]*"
)


def is_retry_after(value: bytes) -> bool:
    """Whether `value` is a Retry-After a client can act on: seconds, or an IMF-fixdate."""
    return _RETRY_AFTER.fullmatch(value) is not None


def kept_on_error(
    headers: RawHeaders, status: int, drop: frozenset[bytes], allowed: frozenset[bytes] = SERVER_ERROR_HEADERS
) -> RawHeaders:
    """What an error answer with `status` keeps of the headers of the response it replaces.

    A 5xx keeps `allowed` and CORS's; a 4xx all but `drop`. A Retry-After is
    kept for the client to act on, so only in a form it can.
    """
    kept: RawHeaders = []
    for pair in headers:
        name = pair[0].lower()
        if status >= 500:
            if name not in allowed and not name.startswith(b"access-control-"):
                continue
        elif name in drop:
            continue
        if name != b"retry-after" or is_retry_after(pair[1]):
            kept.append(pair)
    return kept


_FIELD_VALUE_INVALID = re.compile(rb"[^\t\x20-\x7e\x80-\xff]")  # RFC 9110 §5.5: no CTLs but HTAB
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)  # RFC 9110 §5.6.2: a header name
BOM = b"\xef\xbb\xbf"
JSON_WHITESPACE = b" \t\n\r"  # RFC 8259 §2


def is_blank(body: bytes) -> bool:
    """Whether `body` holds no JSON at all: nothing, or whitespace alone."""
    # The first byte decides for almost every body, without copying it.
    return not body or (body[0] in JSON_WHITESPACE and not body.lstrip(JSON_WHITESPACE))


_json_media: dict[bytes, bool] = {}
_JSON_MEDIA_CACHE_SIZE = 256


# RFC 8259's media type, and the unregistered ones services still label JSON with.
_JSON_MEDIA = frozenset({b"application/json", b"text/json", b"application/x-json", b"text/x-json"})


def is_json_media_type(content_type: bytes) -> bool:
    """JSON's media type, its old aliases (`text/json`, `x-json`) or any `+json`
    suffix (RFC 6839), any case, parameters ignored."""
    cached = _json_media.get(content_type)
    if cached is not None:
        return cached
    media = content_type.partition(b";")[0].strip().lower()
    result = media in _JSON_MEDIA or (media.startswith(b"application/") and media.endswith(b"+json"))
    # A bounded cache: content types come from the app, not from clients, so
    # there are few; the bound only guards against an app that varies them.
    if len(_json_media) < _JSON_MEDIA_CACHE_SIZE:
        _json_media[content_type] = result
    return result


def header_value(headers: Iterable[Any], name: bytes) -> bytes | None:
    """The first value of `name` (lowercase) in raw ASGI headers, or None.

    Read as a server gives them: pairs may be lists (Mangum's are), values bytes-like.
    """
    for key, value in headers:
        if key.lower() == name:
            return bytes(value)
    return None


_raw_decoder = msgspec.json.Decoder(type=msgspec.Raw)


def json_error(body: bytes) -> str | None:
    """Return why `body` is not a JSON text (RFC 8259), or None when it is.

    Decoding into `msgspec.Raw` checks the syntax, numbers of any size
    included, without building objects; it does not check the UTF-8 of
    string contents, so a non-ASCII body is also decoded once.
    """
    try:
        _raw_decoder.decode(body)
    except msgspec.DecodeError as exc:
        return str(exc)
    except RecursionError:
        # Nesting deeper than the C stack allows: refused like any invalid body,
        # not mistaken for a crash of the app.
        return "nested too deeply"
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"invalid UTF-8 at byte {exc.start}"
    return None


def is_int_status(status: object) -> TypeGuard[int]:
    """Whether `status` is an int other than a bool (an `HTTPStatus` is one; 200.0 is not)."""
    return isinstance(status, int) and type(status) is not bool


def as_bytes(headers: Iterable[Any]) -> RawHeaders:
    # bytes-like names and values as bytes; anything else (str, int) is the app's
    # bug and raises here rather than becoming zero bytes. Pairs are untyped: ASGI's
    # are any two-item iterables (lists, from some servers and apps), and the compiled
    # build would refuse what a tuple annotation does not admit.
    return [(bytes(memoryview(name)), bytes(memoryview(value))) for name, value in headers]


def encode_header(name: object, value: object) -> tuple[bytes, bytes] | None:
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
