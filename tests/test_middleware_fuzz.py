"""EnvelopeMiddleware under generated apps and servers: the documented contract, whatever they do.

A raw ASGI app sends a generated sequence of messages (a start with any status and headers,
body chunks as bytes, bytearray or memoryview split anywhere, protocol violations), may raise
at any point and may read `receive`, which may report a disconnect; the server's `send` may
raise OSError, as ASGI 2.4 servers do for a client that left, or refuse a message, as uvicorn
does a body shorter than its Content-Length. Every run is checked, as the server and the log
saw it, against docs/contract.md's table, docs/errors.md's rules and docs/limits.md
(and the CHANGELOG where the docs are silent), by an oracle that shares no code with the
package. Where the contract allows either answer, the oracle takes either, and says why.

CI runs a fixed set of examples (derandomized, no example database), so a run never fails at
random. To hunt locally, raise the count and let hypothesis draw at random:

    FUZZ_RANDOM=1 FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_middleware_fuzz.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson
import structlog
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send
from structlog.testing import LogCapture
from structlog.typing import EventDict

from envelope_middleware import DEFAULT_CATALOGUE, ApiError, EnvelopeMiddleware, RateLimited, ResourceNotFound
from tests.conftest import HEX_ID, Sent, make_scope

# From the docs, not imported: the oracle must not share the code under test.
# 5xx: "only headers that reveal nothing (Retry-After as seconds or an HTTP-date, caching, Vary,
# Set-Cookie, auth challenges, Allow, security policies, Access-Control-*)"
SERVER_ERROR_HEADERS = {
    b"retry-after", b"cache-control", b"expires", b"pragma", b"vary", b"set-cookie",
    b"www-authenticate", b"proxy-authenticate", b"allow", b"strict-transport-security",
    b"content-security-policy", b"x-content-type-options", b"x-frame-options", b"referrer-policy",
}  # fmt: skip
# 4xx: "every header kept ... except those describing the old body (Content-*, ETag,
# Last-Modified, digests, Transfer-Encoding) and the app's own id header"
BODY_HEADERS = {
    b"content-length", b"content-type", b"content-encoding", b"content-language",
    b"content-location", b"content-range", b"content-disposition", b"content-md5", b"digest",
    b"content-digest", b"repr-digest", b"etag", b"last-modified", b"transfer-encoding",
}  # fmt: skip
# 2xx JSON: "strong ETag, Digest, Content-Digest, Repr-Digest, Content-MD5 and Accept-Ranges
# dropped, weak ETag and Last-Modified kept"; an identity coding "is none, and is dropped";
# one Content-Type and one Content-Length of the envelope's own replace the app's.
WRAPPED_DROPPED = {
    b"digest", b"content-digest", b"repr-digest", b"content-md5", b"accept-ranges",
    b"content-encoding", b"content-type", b"content-length", b"transfer-encoding",
}  # fmt: skip
# "2xx, application/json, +json, or the old text/json and x-json aliases"
JSON_MEDIA = {b"application/json", b"text/json", b"application/x-json", b"text/x-json"}
# RFC 9110 §5.6.7, the IMF-fixdate a Retry-After "HTTP-date" is written as.
DAY_NAMES = {b"Mon,", b"Tue,", b"Wed,", b"Thu,", b"Fri,", b"Sat,", b"Sun,"}
MONTHS = {b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"}

# CI must not fail at random: a fixed set of examples (derandomize implies no example
# database), about 25 s with coverage on a 2-core machine. FUZZ_EXAMPLES sets the broad
# property's count (the others take a share); FUZZ_RANDOM=1 draws new examples each run
# and keeps failures in .hypothesis/ to replay.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "500"))
RANDOM = os.environ.get("FUZZ_RANDOM") == "1"


def fuzz(share: float = 1.0) -> settings:
    return settings(
        max_examples=max(1, int(EXAMPLES * share)),
        derandomize=not RANDOM,
        deadline=None,
        # Scenarios are large on purpose (whole responses), and some bodies nest thousands deep.
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
        print_blob=True,
    )


BOM = b"\xef\xbb\xbf"
WS = b" \t\r\n"  # RFC 8259 §2
SECRET = "SECRET-7f3a"  # planted in app bodies, headers and exception text: never in a 5xx
UUID_ID = re.compile(r"req_[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CUSTOM_ID = "custom.id-1:x"

BytesLike = bytes | bytearray | memoryview
RawHeaders = list[tuple[bytes, bytes]]


def is_blank(data: bytes) -> bool:
    return not data.strip(WS)


def header_values(headers: RawHeaders, name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


def retry_after_usable(value: bytes) -> bool:
    """RFC 9110 §10.2.3: delay-seconds or an IMF-fixdate, optional whitespace around it."""
    value = value.strip(b" \t")
    if value.isdigit():
        return True
    parts = value.split(b" ")
    return (
        len(parts) == 6
        and parts[0] in DAY_NAMES
        and len(parts[1]) == 2
        and parts[1].isdigit()
        and parts[2] in MONTHS
        and len(parts[3]) == 4
        and parts[3].isdigit()
        and re.fullmatch(rb"[0-9]{2}:[0-9]{2}:[0-9]{2}", parts[4]) is not None
        and parts[5] == b"GMT"
    )


# -- an independent JSON oracle ------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


def _loads(text: str) -> Any:
    # Integers are not built: their values do not matter here, and past 4300 digits
    # Python's guard against slow conversions would call valid JSON invalid.
    return json.loads(text, parse_int=len, parse_constant=_refuse_constant)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _depth(value: Any) -> int:
    depth = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            depth = max(depth, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return depth


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if any(_has_surrogate(key) for key in item):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and _has_surrogate(item):
            return True
    return False


def _nesting(data: bytes) -> int:
    """How deep brackets nest, strings aside: for a text too deep for Python's parser."""
    depth = top = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                in_string = False
        elif byte == ord('"'):
            in_string = True
        elif byte in b"[{":
            depth += 1
            top = max(top, depth)
        elif byte in b"]}":
            depth -= 1
    return top


def json_valid(data: bytes) -> bool | None:
    """RFC 8259 with docs/limits.md's two strict choices; None where it allows either answer."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    # "nesting deeper than the parser's stack allows (somewhat under 1000 levels, depending
    # on how deep the app's stack is)": refused from 1000 on, either answer short of it.
    try:
        value = _loads(text)
    except RecursionError:
        return False if _nesting(data) >= 1000 else None
    except ValueError:
        return False
    if _has_lone_surrogate(value):
        return False  # "a lone surrogate escape is refused, as I-JSON requires"
    return True if _depth(value) <= 400 else None


# -- strategies ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=15,
)


@st.composite
def valid_json(draw: st.DrawFn) -> bytes:
    value = draw(json_values)
    indent = draw(st.sampled_from([None, 0, 2]))
    return json.dumps(value, indent=indent, ensure_ascii=draw(st.booleans())).encode()


def deep(levels: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * levels + b"]" * levels
    return b'{"a":' * levels + b"1" + b"}" * levels


# At JSON's edges: mostly not JSON, but for 1e999 and -1e-999 (docs/limits.md refuses only lone
# surrogates and deep nesting, not a number's range).
edge_json = st.sampled_from(
    [
        b"{",
        b"[1,]",
        b"{'a':1}",
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"[NaN]",
        b'"\\ud800"',
        b'{"\\udfff":1}',
        b'"\xff"',
        b'"\xc0\xaf"',
        b'"\xed\xa0\x80"',
        b'"a\x01b"',
        b"1 2",
        b"{}{}",
        b"<html>" + SECRET.encode() + b"</html>",
        b"nul",
        b"tru",
        b"01",
        b"1.",
        b".5",
        b"+1",
        BOM,  # a second BOM: only the first may be dropped
        b"\x00",
        b'{"a":1}\x00',
        b"[" + b"1," * 10 + b"]",
        b"1e999",
        b"-1e-999",
    ]
) | st.binary(max_size=40)

huge_ints = st.integers(min_value=1, max_value=5000).map(lambda n: b"-" * (n % 2) + b"9" * n)
deep_json = st.builds(deep, st.integers(min_value=1, max_value=3000), st.sampled_from(["list", "obj"]))


@st.composite
def error_json(draw: st.DrawFn) -> bytes:
    code = draw(
        st.sampled_from(sorted(DEFAULT_CATALOGUE))
        | st.sampled_from(["RATE_LIMITED", "Internal", "resource_unmapped", "x", "", "9bad"])
    )
    message = draw(
        st.sampled_from([SECRET, f"boom at {SECRET}", f"{SECRET} on db-1", "short", "", "\x00" + SECRET])
    )
    shapes: list[Any] = [
        {"error": {"code": code, "message": message, "details": {"x": SECRET, "n": 10**30}}},
        {"code": code, "message": message},
        {"error": code, "error_description": message},
        {"type": "about:blank", "title": message, "detail": message, "code": code, "host": SECRET},
        {"detail": message},
        {"detail": [{"loc": ["body", "x"], "msg": message, "type": "missing", "input": SECRET}]},
    ]
    return json.dumps(draw(st.sampled_from(shapes))).encode()


payloads: st.SearchStrategy[bytes] = st.one_of(
    st.sampled_from([b"", b" ", b"\n", b"{}", b"[]", b"1"]),
    valid_json(),
    edge_json,
    huge_ints,
    deep_json,
    error_json(),
    st.sampled_from([b"", b" ", b"\n\t \r", SECRET.encode(), b"null", b"0", b'""', b"[]", b"{}"]),
)


@st.composite
def payload(draw: st.DrawFn, *, error: bool) -> bytes:
    # Error statuses get error documents half the time: what a 5xx may not reveal is in them.
    core = draw(error_json() if error and draw(st.booleans()) else payloads)
    lead = draw(st.sampled_from([b"", b"", b" ", b"\n  "]))
    trail = draw(st.sampled_from([b"", b"", b"\n", b" \t"]))
    bom = draw(st.sampled_from([b"", b"", BOM]))
    return bom + lead + core + trail


@st.composite
def stream_payload(draw: st.DrawFn) -> bytes:
    """A JSON body whose first bytes the middleware may hold back: a BOM, whitespace, nothing."""
    bom = draw(st.sampled_from([b"", BOM]))
    lead = draw(st.text(alphabet=" \t\r\n", max_size=4)).encode()
    # Nothing at all a third of the time: whitespace alone must still fit a declared length.
    nothing = st.just(b"")
    core = draw(
        nothing | st.sampled_from([b"{}", b"[1,2]", b"null", BOM, BOM + b"{}", b" " + BOM]) | valid_json()
    )
    trail = draw(st.text(alphabet=" \t\r\n", max_size=2)).encode()
    return bom + lead + core + trail


content_types = st.sampled_from(
    [b"application/json"] * 6 + [b"application/json; charset=utf-8"] * 2
) | st.sampled_from(
    [
        b"application/json",
        b"application/json; charset=utf-8",
        b"Application/JSON;charset=UTF-8",
        b" application/json ",
        b"application/problem+json",
        b"application/vnd.api+json",
        b"text/json",
        b"application/x-json",
        b"text/html; charset=utf-8",
        b"text/plain",
        b"text/event-stream",
        b"application/octet-stream",
        b"application/jsonx",
        b"",
    ]
)

# Orderly runs: 2xx to wrap or pass, bodiless ones, client and server errors.
ORDERLY_STATUSES = [200, 200, 200, 201, 202, 203, 204, 205, 206, 299, 301, 304]
ORDERLY_STATUSES += [400, 401, 404, 409, 418, 422, 429, 500, 500, 502, 503, 504]
# Not statuses: out of range, or not an int (ASGI's status is one; 200.0 is no status line).
NOT_STATUSES: list[object] = [0, -1, 1000, 200.0, 404.0, True, "200"]
INT_ENUM_STATUSES = [HTTPStatus.OK, HTTPStatus.NOT_FOUND, HTTPStatus.SERVICE_UNAVAILABLE]
statuses: st.SearchStrategy[object] = st.one_of(
    st.sampled_from([200, 201, 202, 203, 204, 205, 206, 299, 301, 304, 400, 401, 404, 409, 418, 422, 429])
    | st.sampled_from([500, 501, 502, 503, 504, 599]),
    st.integers(min_value=100, max_value=650),
    st.sampled_from(NOT_STATUSES),
    st.sampled_from(INT_ENUM_STATUSES),
)

# Excluded or not, by the options drawn: ("/health",) or ("/docs/", "/health").
PATHS = ["/orders", "/orders", "/health", "/health/deep", "/healthz", "/docs", "/docs/x", "/docsx", "/"]

EXTRA_HEADERS = [
    (b"content-encoding", b"gzip"),
    (b"content-encoding", b"identity"),
    (b"content-encoding", b""),
    (b"content-encoding", b" Identity "),
    (b"etag", b'"strong"'),
    (b"etag", b'W/"weak"'),
    (b"last-modified", b"Wed, 21 Oct 2015 07:28:00 GMT"),
    (b"content-md5", b"Q2hlY2sgSW50ZWdyaXR5IQ=="),
    (b"digest", b"sha-256=abc"),
    (b"accept-ranges", b"bytes"),
    (b"transfer-encoding", b"chunked"),
    (b"server", SECRET.encode()),
    (b"x-backend-host", SECRET.encode()),
    (b"retry-after", b"5"),
    (b"retry-after", b" 120\t"),
    (b"retry-after", b"Wed, 21 Oct 2015 07:28:00 GMT"),
    (b"retry-after", b"soon; host=" + SECRET.encode()),
    (b"retry-after", b"1.5"),
    (b"retry-after", b"Wednesday, 21-Oct-15 07:28:00 GMT"),
    (b"retry-after", b""),
    (b"set-cookie", b"a=b"),
    (b"www-authenticate", b"Basic"),
    (b"access-control-allow-origin", b"*"),
    (b"vary", b"Accept"),
    (b"x-request-id", b"app-chosen-id-2"),
    (b"x-other", b"1"),
]


def bytes_like(data: bytes, kind: str) -> BytesLike:
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    return data


byte_kinds = st.sampled_from(["bytes", "bytes", "bytes", "bytearray", "memoryview"])


LENGTHS = ["none", "right", "right", "wrong", "twice", "twice_diff", "spaces", "junk"]


@st.composite
def header_list(
    draw: st.DrawFn, body_len: int, id_header: bytes, *, json_only: bool = False
) -> list[tuple[BytesLike, BytesLike]]:
    headers: RawHeaders = []
    content_type = "json" if json_only else draw(st.sampled_from(["one", "one", "one", "none", "two"]))
    if content_type == "json":
        headers.append((b"content-type", b"application/json"))
    elif content_type != "none":
        headers.append((b"content-type", draw(content_types)))
    if content_type == "two":
        headers.append((b"content-type", draw(content_types)))
    # A right Content-Length is what trusted mode streams inside (the rest it drops).
    lengths = ["right", "right", "none", "wrong", "twice"] if json_only else LENGTHS
    length = draw(st.sampled_from(lengths))
    if length == "right":
        headers.append((b"content-length", b"%d" % body_len))
    elif length == "wrong":
        headers.append((b"content-length", b"%d" % (body_len + draw(st.sampled_from([-1, 1, 7])))))
    elif length == "twice":
        headers += [(b"content-length", b"%d" % body_len)] * 2
    elif length == "twice_diff":
        headers += [(b"content-length", b"%d" % body_len), (b"content-length", b"%d" % (body_len + 1))]
    elif length == "spaces":
        headers.append((b"content-length", b" %d " % body_len))
    elif length == "junk":
        headers.append((b"content-length", draw(st.sampled_from([b"", b"abc", b"1" * 30, b"-1"]))))
    headers += draw(st.lists(st.sampled_from([*EXTRA_HEADERS, (id_header, b"app-chosen-id")]), max_size=5))
    draw(st.randoms()).shuffle(headers)
    case = draw(st.sampled_from(["lower", "lower", "title", "upper"]))
    spelled = [
        (name.title() if case == "title" else name.upper() if case == "upper" else name, value)
        for name, value in headers
    ]
    return [
        (bytes_like(name, draw(byte_kinds)), bytes_like(value, draw(byte_kinds))) for name, value in spelled
    ]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(min(c, len(data)) for c in cuts)
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


class AppBug(Exception):
    pass


HANDLED_TOO_LATE = "Caught handled exception, but response already started."


def handled_too_late(exc: Exception) -> Exception:
    """What Starlette's ExceptionMiddleware raises for an exception it has a handler for,
    once the app's start is out (as far as it knows): the middleware may still hold it."""
    wrapper = RuntimeError(HANDLED_TOO_LATE)
    wrapper.__cause__ = exc
    return wrapper


EXCEPTIONS: dict[str, Callable[[], Exception]] = {
    "value": lambda: AppBug(f"app failed: {SECRET}"),
    "oserror": lambda: OSError(f"app os error {SECRET}"),
    "not_found": lambda: ResourceNotFound("Order ord_2 not found"),
    "rate": lambda: RateLimited(retry_after=7),
    "api_5xx": lambda: ApiError("service_unavailable", "down for maintenance", status=503),
    "http_418": lambda: HTTPException(418, detail="teapot"),
    "http_503": lambda: HTTPException(503, detail=SECRET),
    "disconnect": ClientDisconnect,
    "group": lambda: ExceptionGroup("g", [AppBug(SECRET)]),
    "handled_too_late": lambda: handled_too_late(RateLimited(retry_after=7)),
}


def unwrap(exc: BaseException) -> BaseException:
    # A group of one (anyio's task groups) stands for its exception, and so does Starlette's
    # handled-too-late error for its cause (CHANGELOG).
    while True:
        if isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        elif type(exc) is RuntimeError and exc.args == (HANDLED_TOO_LATE,) and exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            return exc


def expected_for_exception(exc: BaseException) -> tuple[int, str]:
    exc = unwrap(exc)
    if isinstance(exc, ApiError):
        return exc.status, exc.code
    if isinstance(exc, HTTPException):
        return exc.status_code, DEFAULT_CATALOGUE.for_status(exc.status_code).code
    if isinstance(exc, ClientDisconnect):
        return 400, "request_invalid"  # one the middleware did not see coming
    return 500, "internal"


def _custom_id() -> str:
    return CUSTOM_ID


def _unsafe_id() -> str:
    return 'bad"id\r\n'


def _failing_id() -> str:
    raise RuntimeError("generator")


ID_FORMATS: dict[str, str | Callable[[], str]] = {
    "hex": "hex",
    "prefixed_uuid": "prefixed_uuid",
    "custom": _custom_id,
    "unsafe": _unsafe_id,
    "raises": _failing_id,
}


@dataclass(frozen=True)
class Scenario:
    method: str
    path: str
    options: dict[str, Any]
    id_format: str
    incoming_ids: list[bytes]
    start: Message | None
    chunks: list[tuple[BytesLike, bool, str]]  # (body, more_body, which keys the message has)
    payload: bytes
    finish: bool  # the last chunk says more_body False
    violation: str | None = None  # "start_again" | "body_after"
    raise_at: int | None = None  # before the message of this index, or after the last
    exc_kind: str = "value"
    receive_at: frozenset[int] = frozenset()
    on_disconnect: str = "continue"  # | "return" | "raise"
    requests_before_disconnect: int = 0
    send_fail_at: int | None = None
    send_failure: str = "reset"  # | "refused": the client left, or the server refuses the message
    app_swallows_send_error: bool = False

    def exception(self) -> Exception:
        return EXCEPTIONS[self.exc_kind]()

    @property
    def id_header(self) -> bytes:
        name: str = self.options["request_id_header"]
        return name.lower().encode()

    def messages(self) -> list[Message]:
        messages: list[Message] = []
        if self.start is not None:
            messages.append(dict(self.start))
        for data, more, keys in self.chunks:
            message: Message = {"type": "http.response.body"}
            if keys != "no_body" or len(data):
                message["body"] = data
            if keys != "no_more" or more:
                message["more_body"] = more
            messages.append(message)
        if self.violation == "start_again" and self.start is not None:
            messages.append(dict(self.start))
        elif self.violation == "body_after":
            messages.append({"type": "http.response.body", "body": b"x", "more_body": False})
        return messages


@st.composite
def scenarios(
    draw: st.DrawFn, method: str | None = None, id_format: str | None = None, *, json_stream: bool = False
) -> Scenario:
    """Any app and server; with `json_stream`, orderly 2xx JSON bodies in several messages."""
    id_header_name = draw(st.sampled_from(["X-Request-ID", "X-Request-ID", "X-Correlation-Id"]))
    id_format = id_format or draw(
        st.sampled_from(["hex", "hex", "prefixed_uuid", "custom", "unsafe", "raises"])
    )
    options: dict[str, Any] = {
        "validate_json": draw(st.booleans()),
        "max_validated_size": draw(st.sampled_from([None, None, 0, 2, 5, 64])),
        "exclude_paths": draw(st.sampled_from([(), (), ("/health",), ("/docs/", "/health")])),
        "request_id_header": id_header_name,
        "trust_request_id": draw(st.booleans()),
        "request_id_format": ID_FORMATS[id_format],
    }
    incoming = draw(
        st.lists(
            st.sampled_from(
                [b"abc-123", b"  trace.id:1\t", b"bad id", b"a\r\nb", b'q"', b"x" * 129, b"\xc3\xa9", b""]
            ),
            max_size=2,
        )
    )
    # Half the runs are orderly (a valid status, the body finished, no exception, no
    # disconnect, no failing server): those get the full check of the response.
    chaos = not json_stream and draw(st.booleans())
    if json_stream:
        status: object = draw(st.sampled_from([200, 201, 203]))
        data = draw(stream_payload())
    else:
        status = draw(statuses if chaos else st.sampled_from(ORDERLY_STATUSES))
        data = draw(payload(error=isinstance(status, int) and status >= 400))
    # Cuts fall in the first bytes as often as anywhere: a BOM or whitespace split
    # across messages is what the middleware holds back.
    cuts = st.integers(0, len(data)) | st.integers(0, min(len(data), 6))
    pieces = split(data, draw(st.lists(cuts, min_size=int(json_stream), max_size=4)))
    for _ in range(draw(st.integers(0, 2))):
        pieces.insert(draw(st.integers(0, len(pieces))), b"")
    if not json_stream and draw(st.booleans()) and data:
        pieces = [data]
    finish = not chaos or draw(st.integers(0, 9)) > 0
    chunks = [
        (
            bytes_like(piece, draw(byte_kinds)),
            i < len(pieces) - 1 or not finish,
            draw(st.sampled_from(["all", "all", "all", "no_body", "no_more"])),
        )
        for i, piece in enumerate(pieces)
    ]
    start: Message | None = None
    if not chaos or draw(st.integers(0, 30)) > 0:
        headers: Sequence[tuple[BytesLike, BytesLike]] = draw(
            header_list(len(data), id_header_name.lower().encode(), json_only=json_stream)
        )
        if draw(st.integers(0, 9)) == 0:
            headers = tuple(headers)  # ASGI allows any iterable
        start = {"type": "http.response.start", "status": status}
        if json_stream or draw(st.integers(0, 19)) > 0:
            start["headers"] = headers
    scenario = Scenario(
        method=method or draw(st.sampled_from(["GET", "GET", "POST", "HEAD"])),
        path="/orders" if json_stream else draw(st.sampled_from(PATHS)),
        options=options,
        id_format=id_format,
        incoming_ids=incoming,
        start=start,
        chunks=chunks,
        payload=data,
        finish=finish,
    )
    if not chaos:
        return scenario
    n_messages = (start is not None) + len(chunks)
    return dataclasses.replace(
        scenario,
        violation=draw(st.sampled_from([None] * 12 + ["start_again", "body_after"])),
        raise_at=draw(st.none() | st.integers(0, n_messages + 1)),
        exc_kind=draw(st.sampled_from(sorted(EXCEPTIONS))),
        receive_at=frozenset(draw(st.lists(st.integers(0, n_messages + 1), max_size=2))),
        on_disconnect=draw(st.sampled_from(["continue", "return", "raise"])),
        requests_before_disconnect=draw(st.integers(0, 3)),
        send_fail_at=draw(st.none() | st.integers(0, 4)),
        send_failure=draw(st.sampled_from(["reset", "reset", "refused"])),
        app_swallows_send_error=draw(st.integers(0, 9)) == 0,
    )


# -- driving -------------------------------------------------------------------------------


@dataclass
class Run:
    server: Sent = field(default_factory=Sent)  # what the server took
    attempted: list[Message] = field(default_factory=list)  # and what it was given, failed sends too
    send_failed: bool = False
    server_exc: Exception | None = None
    sends_after_failure: int = 0
    disconnect_seen: bool = False  # the app read a disconnect before the response was complete
    app_exc: BaseException | None = None
    started_at_exc: bool = False  # a start had gone to the server when the app raised
    complete_at_exc: bool = False  # ... and the server had taken the whole response
    app_returned_early: bool = False
    refused_at: int | None = None  # the app's message the middleware's `send` raised on
    mw_exc: BaseException | None = None
    logs: list[EventDict] = field(default_factory=list)

    @property
    def starts(self) -> list[Message]:
        return [m for m in self.server.messages if m["type"] == "http.response.start"]

    @property
    def client_gone(self) -> bool:
        """docs/errors.md's client that left: an OSError from the server's `send`, on any message."""
        return isinstance(self.server_exc, OSError)

    def events(self, name: str) -> list[EventDict]:
        return [e for e in self.logs if e["event"] == name]


def snapshot(message: Message) -> Message:
    copy = dict(message)
    if copy["type"] == "http.response.start":
        copy["headers"] = [(bytes(k), bytes(v)) for k, v in copy.get("headers", [])]
    elif copy["type"] == "http.response.body":
        data = copy.get("body", b"")
        assert isinstance(data, BytesLike), type(data)
        copy["body"] = bytes(data)
        copy["more_body"] = bool(copy.get("more_body", False))
    return copy


class Harness:
    """A server and an app for one scenario, recording what each saw into a `Run`."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.run = Run()
        self.messages = sc.messages()
        self.requests_left = sc.requests_before_disconnect

    async def receive(self) -> Message:
        if self.requests_left > 0:
            self.requests_left -= 1
            return {"type": "http.request", "body": b"", "more_body": False}
        run = self.run
        run.disconnect_seen = run.disconnect_seen or not run.server.complete
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        run = self.run
        if run.send_failed:
            run.sends_after_failure += 1
        copy = snapshot(message)
        run.attempted.append(copy)
        if len(run.attempted) - 1 != self.sc.send_fail_at:
            run.server.messages.append(copy)
            return
        run.send_failed = True
        if self.sc.send_failure == "reset":
            run.server_exc = OSError("connection reset by peer")  # ASGI 2.4: the client left
        else:
            run.server_exc = RuntimeError("Response content shorter than Content-Length")  # uvicorn's
        raise run.server_exc

    async def app(self, _scope: Scope, receive: Receive, send: Send) -> None:
        run = self.run
        try:
            await self.script(receive, send)
        except BaseException as exc:
            run.app_exc = exc
            run.started_at_exc = any(m["type"] == "http.response.start" for m in run.attempted)
            run.complete_at_exc = run.server.complete
            raise

    async def script(self, receive: Receive, send: Send) -> None:
        sc, last = self.sc, len(self.messages)
        # One step past the last message: a background task that reads, or raises, late.
        for i in range(last + 1):
            if i in sc.receive_at and (await receive())["type"] == "http.disconnect":
                if sc.on_disconnect == "return":
                    self.run.app_returned_early = i < last
                    return
                if sc.on_disconnect == "raise":
                    raise ClientDisconnect
            if sc.raise_at is not None and min(sc.raise_at, last) == i:
                raise sc.exception()
            if i == last:
                return
            try:
                await send(self.messages[i])
            except Exception as exc:
                if exc is not self.run.server_exc:
                    self.run.refused_at = i  # the middleware's own refusal
                elif isinstance(exc, OSError) and sc.app_swallows_send_error:
                    self.run.app_returned_early = True
                    return
                raise


def execute(sc: Scenario) -> Run:
    harness = Harness(sc)
    run = harness.run
    capture = LogCapture()
    middleware = EnvelopeMiddleware(
        harness.app, logger=structlog.wrap_logger(None, processors=[capture]), **sc.options
    )
    headers = [(sc.id_header, value) for value in sc.incoming_ids] + [(b"host", b"testserver")]
    scope = make_scope(sc.method, sc.path, headers)

    async def serve() -> None:
        try:
            await middleware(scope, harness.receive, harness.send)
        except BaseException as exc:
            run.mw_exc = exc

    asyncio.run(serve())
    run.logs = capture.entries
    return run


# -- the oracle ----------------------------------------------------------------------------


def is_int_status(status: object) -> bool:
    # ASGI's status is an int, an HTTPStatus included; 200.0 and True equal 200 and 1 but are none.
    return isinstance(status, int) and not isinstance(status, bool)


def app_headers(sc: Scenario) -> RawHeaders:
    assert sc.start is not None
    return [(bytes(k), bytes(v)) for k, v in sc.start.get("headers", [])]


def is_excluded(sc: Scenario) -> bool:
    for path in sc.options["exclude_paths"]:
        if path.endswith("/") and path != "/":
            if sc.path == path.rstrip("/") or sc.path.startswith(path):
                return True
        elif sc.path == path:
            return True
    return False


def app_mode(sc: Scenario) -> str:
    """What the contract does with the app's start: pass, bodyless, error, wrap, invalid, none."""
    if sc.start is None:
        return "none"
    status = sc.start["status"]
    if not is_int_status(status) or not 200 <= status <= 599:
        return "invalid"
    if is_excluded(sc):
        return "pass"
    if status in (204, 205, 304):
        return "bodyless"
    if status >= 400:
        return "error"
    if status >= 300 or status == 206:
        return "pass"
    headers = [(k.lower(), v) for k, v in app_headers(sc)]
    content_types = header_values(headers, b"content-type")
    if not content_types:
        return "pass"
    media = content_types[0].partition(b";")[0].strip().lower()
    if not (media in JSON_MEDIA or (media.startswith(b"application/") and media.endswith(b"+json"))):
        return "pass"
    if any(v.strip().lower() not in (b"", b"identity") for v in header_values(headers, b"content-encoding")):
        return "pass"
    return "wrap"


def app_length_correct(sc: Scenario) -> bool:
    return all(v == b"%d" % len(sc.payload) for v in header_values(app_headers(sc), b"content-length"))


def app_length_wrong(sc: Scenario) -> bool:
    lengths = header_values(app_headers(sc), b"content-length")
    return any(v.isdigit() and v != b"%d" % len(sc.payload) for v in lengths)


def over_limit(sc: Scenario) -> bool:
    """Whether a validating middleware gives the check up for this body."""
    limit = sc.options["max_validated_size"]
    if limit is None:
        return False
    total = 0
    for data, more, _ in sc.chunks:
        total += len(data)
        if more and total > max(limit, 3):  # "below 3 it acts as 3"
            return True
    return False


def client_left(run: Run, exc: BaseException) -> bool:
    """docs/errors.md's "client that left": no server error, a warning, nothing raised."""
    exc = unwrap(exc)
    if run.client_gone and isinstance(exc, OSError | ClientDisconnect):
        return True
    return run.disconnect_seen and isinstance(exc, ClientDisconnect)


def expected_id(sc: Scenario, value: bytes) -> None:
    text = value.decode("latin-1")
    if sc.options["trust_request_id"] and len(sc.incoming_ids) == 1:
        try:
            candidate = sc.incoming_ids[0].decode("ascii").strip(" \t")
        except UnicodeDecodeError:
            candidate = ""
        if SAFE_ID.fullmatch(candidate):
            assert text == candidate, (text, candidate)
            return
    if sc.id_format == "prefixed_uuid":
        assert UUID_ID.fullmatch(text), text
    elif sc.id_format == "custom":
        assert text == CUSTOM_ID, text
    else:  # hex, and what replaces an unsafe or failing generator's id
        assert re.fullmatch(HEX_ID, text), text


def check_error_envelope(sc: Scenario, run: Run, status: int) -> dict[str, Any]:
    """The error envelope's framing and the 5xx rules; the error object (empty on HEAD)."""
    start = run.starts[0]
    assert start["status"] == status, (start["status"], status)
    headers = start["headers"]
    assert header_values(headers, b"content-type") == [b"application/json"], headers
    lengths = header_values(headers, b"content-length")
    assert len(lengths) == 1, headers
    assert all(retry_after_usable(v) for v in header_values(headers, b"retry-after")), headers
    for name, _ in headers:
        assert name.lower() not in BODY_HEADERS - {b"content-type", b"content-length"}, headers
    if status >= 500:
        for name, value in headers:
            assert SECRET.encode() not in value, headers
            assert (
                name.lower() in SERVER_ERROR_HEADERS
                or name.lower().startswith(b"access-control-")
                or name in (b"content-type", b"content-length", sc.id_header)
            ), headers
    if sc.method == "HEAD":
        assert run.server.body == b""
        return {}
    assert int(lengths[0]) == len(run.server.body), (lengths, len(run.server.body))
    document = orjson.loads(run.server.body)
    assert set(document) == {"request_id", "error"}, document
    assert document["request_id"].encode() == header_values(headers, sc.id_header)[0]
    error: dict[str, Any] = document["error"]
    assert set(error) == {"code", "message", "details"}, error
    code = error["code"]
    assert code in DEFAULT_CATALOGUE, code
    assert DEFAULT_CATALOGUE[code].status // 100 == status // 100, (code, status)
    if status >= 500:
        assert SECRET not in run.server.body.decode(), run.server.body
        # A 5xx keeps only the code; an ApiError's message is the app's own words.
        answered = unwrap(run.app_exc) if run.app_exc is not None and not run.started_at_exc else None
        assert error["message"] == DEFAULT_CATALOGUE[code].message or isinstance(answered, ApiError), error
    return error


def check_protocol(sc: Scenario, run: Run) -> None:
    """What reaches the server is a response a server can send, and stops when the client left."""
    kinds = [m["type"] for m in run.attempted]
    assert kinds.count("http.response.start") <= 1, kinds
    assert not kinds or kinds[0] == "http.response.start", kinds
    bodies = run.server.body_messages
    assert all(m["more_body"] for m in bodies[:-1]), "a body after the final body"
    assert run.sends_after_failure == 0, run.attempted
    if run.refused_at is not None:
        # Only what ASGI forbids is refused: an invalid status, a second start, a body
        # before the start or after the last one.
        index, messages = run.refused_at, sc.messages()
        if sc.start is None:
            assert index == 0, (index, messages)
        elif index == 0:
            assert app_mode(sc) == "invalid", messages[0]
        else:
            assert index == len(messages) - 1, (index, messages)
            assert sc.violation == "start_again" or (sc.violation == "body_after" and sc.finish), messages
    assert len(run.events("http_request")) == 1, run.logs


def check_exception_outcome(sc: Scenario, run: Run) -> None:
    """docs/errors.md: what is raised to the server, and what is logged, for an app that failed."""
    exc = run.app_exc
    if exc is None or not run.started_at_exc:
        # Nothing was out: the middleware answered (for the exception, or for no response).
        # A client gone meanwhile is a warning; a server refusing the answer gets its error back.
        if run.send_failed and not isinstance(run.server_exc, OSError):
            assert run.mw_exc is run.server_exc, (run.mw_exc, run.server_exc)
        else:
            assert run.mw_exc is None, (run.mw_exc, run.server_exc)
        if run.client_gone:
            assert run.events("client_disconnected"), run.logs
        return
    if client_left(run, exc):
        assert run.mw_exc is None, run.mw_exc
        assert run.events("client_disconnected"), run.logs
        return
    # Bytes were out: a response cut short is aborted (re-raised), a complete one stands.
    # Complete is the server having taken the last message (CHANGELOG): one it refused is not.
    logged = run.events("exception_after_response_started")
    assert len(logged) == 1, run.logs
    complete = logged[0]["response_complete"]
    assert complete is run.complete_at_exc, logged
    assert run.mw_exc is (None if complete else exc), (run.mw_exc, exc, logged)


def check_start(sc: Scenario, run: Run, mode: str) -> bytes:
    """Every response: an int status, one id header, the access log, framing; the id."""
    start = run.starts[0]
    status = start["status"]
    assert is_int_status(status), status
    assert 200 <= status <= 599, status
    headers = start["headers"]
    ids = header_values(headers, sc.id_header)
    assert len(ids) == 1, headers
    expected_id(sc, ids[0])
    access = run.events("http_request")[0]
    assert access["request_id"].encode() == ids[0]
    assert access["status"] == status, (access, status)
    if run.server.complete and not run.send_failed:
        assert access["bytes_sent"] == len(run.server.body), (access, len(run.server.body))
    bodiless = status in (204, 205, 304) and not is_excluded(sc)
    if bodiless:
        assert run.server.body == b""
        if status == 204:
            assert not header_values(headers, b"content-length"), headers
        if status == 205:
            assert header_values(headers, b"content-length") == [b"0"], headers
    if status >= 400 and not is_excluded(sc) and run.server.complete:
        check_error_envelope(sc, run, status)
    lengths = header_values(headers, b"content-length")
    if mode != "pass" and status != 304:
        assert len(lengths) <= 1, headers
    # A length the middleware wrote is right; one the app wrote (passed, or streamed
    # around in trusted mode) is as right as the app made it.
    ours = mode not in ("pass", "wrap") or (mode == "wrap" and status >= 400)
    measurable = lengths and run.server.complete and sc.method != "HEAD" and not bodiless
    if measurable and (ours or (app_length_correct(sc) and len(lengths) == 1)):
        assert int(lengths[0]) == len(run.server.body), (lengths, len(run.server.body), sc.payload)
    return ids[0]


def check_answer(sc: Scenario, run: Run, status: int, code: str) -> None:
    if run.server.complete and not run.send_failed:
        error = check_error_envelope(sc, run, status)
        assert not error or error["code"] == code, (error, code)


def check(sc: Scenario, run: Run) -> None:
    check_protocol(sc, run)
    check_exception_outcome(sc, run)
    if not run.starts:
        # No response only when the client is gone, or the server failed on the start.
        assert run.send_failed or run.disconnect_seen, run
        return
    mode = app_mode(sc)
    rid = check_start(sc, run, mode)
    exc = run.app_exc
    if exc is not None and not run.started_at_exc and not client_left(run, exc):
        # An exception before any byte is out (an invalid status or a body before the
        # start included): an error envelope, whatever the app had begun to send.
        check_answer(sc, run, *expected_for_exception(exc))
        return
    if mode in ("invalid", "none"):
        # No response at all, and no exception: docs/contract.md's 500 internal.
        check_answer(sc, run, 500, "internal")
        return
    orderly = exc is None and sc.finish and not run.app_returned_early
    if not orderly or run.send_failed or run.disconnect_seen:
        return
    assert run.server.complete, "an orderly response left open"
    event(f"full check: {mode}, validate_json={sc.options['validate_json']}")
    CHECKS[mode](sc, run, rid)


def check_passed(sc: Scenario, run: Run, rid: bytes) -> None:
    # "untouched, apart from the id header"
    assert sc.start is not None
    assert run.starts[0]["status"] == sc.start["status"]
    assert run.server.body == sc.payload
    expected = [p for p in app_headers(sc) if p[0].lower() != sc.id_header] + [(sc.id_header, rid)]
    assert run.starts[0]["headers"] == expected, (run.starts[0]["headers"], expected)


def check_bodiless(sc: Scenario, run: Run, rid: bytes) -> None:
    start = run.starts[0]
    assert sc.start is not None
    assert start["status"] == sc.start["status"]
    drop = {sc.id_header} if sc.start["status"] == 304 else {sc.id_header, b"content-length"}
    expected = [p for p in app_headers(sc) if p[0].lower() not in drop] + [(sc.id_header, rid)]
    if sc.start["status"] == 205:
        expected.append((b"content-length", b"0"))
    assert Counter(start["headers"]) == Counter(expected), (start["headers"], expected)


def check_error(sc: Scenario, run: Run, rid: bytes) -> None:
    start = run.starts[0]
    assert sc.start is not None
    status = sc.start["status"]
    assert start["status"] == status
    check_error_envelope(sc, run, status)
    if status < 500:
        kept = [p for p in app_headers(sc) if p[0].lower() not in BODY_HEADERS | {sc.id_header}]
    else:
        kept = [
            p
            for p in app_headers(sc)
            if p[0].lower() in SERVER_ERROR_HEADERS or p[0].lower().startswith(b"access-control-")
        ]
    # "Retry-After when it is seconds or an HTTP-date", on 4xx and 5xx alike.
    kept = [p for p in kept if p[0].lower() != b"retry-after" or retry_after_usable(p[1])]
    own = [(b"content-type", b"application/json"), (sc.id_header, rid)]
    own += [(b"content-length", v) for v in header_values(start["headers"], b"content-length")]
    assert Counter(start["headers"]) == Counter(kept + own), (start["headers"], kept)


def check_wrapped(sc: Scenario, run: Run, rid: bytes) -> None:
    start = run.starts[0]
    assert sc.start is not None
    document = sc.payload.removeprefix(BOM)
    validate = sc.options["validate_json"]
    validating = validate and not over_limit(sc)
    assert bool(run.events("json_not_validated")) == (validate and not validating), run.logs
    verdict = json_valid(document)
    if (
        validating
        and not is_blank(document)
        and (verdict is False or (verdict is None and start["status"] == 502))
    ):
        check_answer(sc, run, 502, "downstream_invalid_response")
        event("wrap: 502")
        return
    assert start["status"] == sc.start["status"], (start["status"], document[:80])
    headers = start["headers"]
    kept = [
        p
        for p in app_headers(sc)
        if p[0].lower() not in WRAPPED_DROPPED | {sc.id_header}
        and not (p[0].lower() == b"etag" and not p[1].startswith(b"W/"))
    ]
    lengths = header_values(headers, b"content-length")
    own = [(b"content-type", b"application/json"), (sc.id_header, rid)] + [
        (b"content-length", v) for v in lengths
    ]
    assert Counter(headers) == Counter(kept + own), (headers, kept)
    if sc.method == "HEAD":
        return
    body = run.server.body
    prefix = b'{"request_id":"' + rid + b'","data":'
    assert body.startswith(prefix), body[:100]
    assert body.endswith(b"}"), body[-100:]
    # "one correct Content-Length (in trusted mode, when the app gave one or the body came
    # in one message; otherwise the server frames the stream)"; a wrong one given is the app's.
    if validating or len(sc.chunks) == 1:
        assert len(lengths) == 1, headers
    if lengths and (validating or not app_length_wrong(sc)):
        assert int(lengths[0]) == len(body), (lengths, len(body))
    if not validating and verdict is False:
        # Trusted mode checks nothing: a malformed body (a second BOM, a BOM after held
        # whitespace) may come out in any form, inside the envelope's framing.
        event("wrap: trusted, malformed")
        return
    data = body[len(prefix) : -1]
    if is_blank(document):
        assert data.endswith(b"null"), data  # "an empty body, or only whitespace: data null"
        assert is_blank(data[:-4]), data
    elif validating:
        assert data == document, (data[:80], document[:80])
    else:
        # Leading whitespace may be held back (trusted mode, with a Content-Length).
        assert document.endswith(data), (data[:80], document[:80])
        assert is_blank(document[: len(document) - len(data)]), (data[:80], document[:80])
    if verdict is True:
        assert _loads(body.decode())["request_id"] == rid.decode()
    event(f"wrap: body checked, validating={validating}")


CHECKS: dict[str, Callable[[Scenario, Run, bytes], None]] = {
    "pass": check_passed,
    "bodyless": check_bodiless,
    "error": check_error,
    "wrap": check_wrapped,
}


# -- the properties ------------------------------------------------------------------------


@fuzz()
@given(sc=scenarios())
def test_envelope_fuzz_any_app_and_server_get_the_contract(sc: Scenario) -> None:
    note(repr(sc))
    run = execute(sc)
    note(repr(run))
    check(sc, run)


@fuzz(0.6)
@given(sc=scenarios(json_stream=True))
def test_envelope_fuzz_json_in_several_messages_keeps_its_framing(sc: Scenario) -> None:
    # Where the middleware holds bytes back (a BOM split across messages, leading
    # whitespace before a declared length) the broad scenarios above rarely reach.
    note(repr(sc))
    run = execute(sc)
    note(repr(run))
    check(sc, run)


@fuzz(0.5)
@given(sc=scenarios(method="GET", id_format="custom"))
def test_envelope_fuzz_head_gets_the_headers_of_get(sc: Scenario) -> None:
    # A fixed id, so that the two responses' headers can be compared whole.
    head = dataclasses.replace(sc, method="HEAD")
    get_run, head_run = execute(sc), execute(head)
    note(repr(sc))
    note(repr(get_run))
    note(repr(head_run))
    check(head, head_run)
    if not (get_run.starts and head_run.starts):
        return
    get_start, head_start = get_run.starts[0], head_run.starts[0]
    assert get_start["status"] == head_start["status"]
    assert [p for p in get_start["headers"] if p[0] != b"content-length"] == [
        p for p in head_start["headers"] if p[0] != b"content-length"
    ]
    get_length = header_values(get_start["headers"], b"content-length")
    head_length = header_values(head_start["headers"], b"content-length")
    if get_length != head_length:
        # "An app that answers HEAD without the body gets no Content-Length on a wrapped
        # response": an empty body on HEAD cannot be told from none.
        assert not head_length, (get_length, head_length)
        assert not sc.payload, (get_length, head_length)


@fuzz()
@given(scope_type=st.sampled_from(["lifespan", "websocket"]), validate_json=st.booleans())
def test_envelope_fuzz_non_http_scopes_pass_untouched(scope_type: str, validate_json: bool) -> None:
    seen: dict[str, Any] = {}
    sent: list[Message] = []
    # Shaped like an error start, which the middleware would replace in an HTTP scope.
    odd = {"type": "x", "headers": [(b"content-type", b"application/json")], "status": 500}

    async def receive() -> Message:
        return {"type": f"{scope_type}.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Scope, receive_: Receive, send_: Send) -> None:
        seen.update(scope=scope, receive=receive_, send=send_)
        await send_(dict(odd))

    scope = make_scope(scope_type=scope_type)
    before = dict(scope)
    asyncio.run(EnvelopeMiddleware(app, validate_json=validate_json, access_log=False)(scope, receive, send))
    assert seen["scope"] is scope
    assert scope == before
    assert seen["receive"] is receive
    assert seen["send"] is send
    assert sent == [odd]
