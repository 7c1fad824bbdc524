"""The error side of the contract: what an error response says, and how it is written."""

from __future__ import annotations

import builtins
import json
import pkgutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

import orjson
from starlette.exceptions import HTTPException

from envelope_middleware._http import BOM, is_json_media_type
from envelope_middleware._validation import (
    VALIDATION_MESSAGE,
    is_validation_error_list,
    validation_error_details,
)
from envelope_middleware.catalogue import Catalogue, ErrorSpec, is_valid_code
from envelope_middleware.exceptions import ApiError

# Exceptions of optional libraries are named, not imported: the core must not
# import httpx, httpx2 or aiohttp, and a name matches whichever the app uses.
# httpx and httpx2 set `__module__` of their public classes to the package
# name; aiohttp's stay in `aiohttp.client_exceptions`.
DEFAULT_EXCEPTION_CODES: Mapping[type[BaseException] | str, str] = {
    **{
        f"{package}.{name}": code
        for package in ("httpx", "httpx2")
        for name, code in (
            ("HTTPError", "downstream_unavailable"),
            ("TransportError", "downstream_unavailable"),
            ("TimeoutException", "downstream_timeout"),
            # No connection free in the client's own pool: this gateway is
            # overloaded, no service was slow.
            ("PoolTimeout", "service_unavailable"),
            ("DecodingError", "downstream_invalid_response"),
        )
    },
    # aiohttp's, as a gateway calling its services with it raises them (issue #11).
    **{
        f"aiohttp.client_exceptions.{name}": code
        for name, code in (
            # Its ClientResponseError is also raise_for_status()'s: a 4xx among them
            # is a downstream_invalid_response, as for httpx (`_answered_4xx`), and so
            # is an answer that is no HTTP (aiohttp's parser reports it as a 400).
            # A body cut short (ClientPayloadError) is a service that went away, as
            # httpx's RemoteProtocolError: retryable.
            ("ClientError", "downstream_unavailable"),
            ("ServerTimeoutError", "downstream_timeout"),
            ("ContentTypeError", "downstream_invalid_response"),  # .json() of no JSON
            ("TooManyRedirects", "downstream_invalid_response"),
        )
    },
    # Something the gateway waited on did not answer in time (RFC 9110 §15.6.5):
    # asyncio.timeout's, and aiohttp's total timeout, which raises the built-in.
    "builtins.TimeoutError": "downstream_timeout",
    # The client went away mid-body: its request is incomplete, not the server
    # broken (a 500 would count a disconnect as a server error in metrics).
    "starlette.requests.ClientDisconnect": "request_invalid",
}

# A service's error body is read to find its code and message; anything past
# this many bytes is not an error description worth parsing.
ERROR_BODY_LIMIT = 64 * 1024
_MESSAGE_LIMIT = 1024
_TEXT_MEDIA = (b"text/plain",)
_MAPPED_CACHE_SIZE = 1024
# Answers the middleware itself gives: unhandled exceptions, invalid 2xx JSON.
_REQUIRED_CODES = frozenset({"internal", "request_invalid", "downstream_invalid_response"})
_CREDENTIAL_CODES = frozenset({"auth_missing", "auth_invalid_credential"})
_PROBLEM_MEMBERS = frozenset({"type", "title", "status", "detail", "instance", "code"})  # RFC 9457 §3.1


@dataclass(slots=True)
class Failure:
    """What an error response says: status, code, message, details and extra headers."""

    status: int
    code: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)
    # As the exception gave them (an HTTPException keeps what it is given): number values
    # are written out, unusable names and values dropped when the answer is written.
    headers: Mapping[Any, Any] = field(default_factory=dict)
    # How the log tells of it: "quiet" (the access line is enough), "warning" for
    # a mapped exception such as a backend timeout, "error" for an unhandled one.
    log: Literal["quiet", "warning", "error"] = "quiet"


class ErrorPolicy:
    """Built once per middleware: the catalogue, the codes kept from services, the exception map."""

    __slots__ = ("_allowed", "_by_name", "_by_type", "_catalogue", "_mapped", "_prebuilt")

    def __init__(
        self,
        catalogue: Catalogue,
        *,
        allowed_codes: Iterable[str],
        exception_codes: Mapping[Any, str],
    ) -> None:
        missing = _REQUIRED_CODES - set(catalogue)
        if missing:
            raise ValueError(f"the catalogue lacks codes the middleware answers with: {sorted(missing)}")
        self._catalogue = catalogue
        allowed = set(catalogue)
        for code in allowed_codes:
            if not is_valid_code(code):
                raise ValueError(f"allowed code must be lower_snake_case: {code!r}")
            allowed.add(code)
        self._allowed = frozenset(allowed)
        by_type: dict[type[BaseException], ErrorSpec] = {}
        by_name: dict[str, ErrorSpec] = {}
        resolved: dict[type[BaseException], ErrorSpec] = {}
        defaults = {key: code for key, code in DEFAULT_EXCEPTION_CODES.items() if code in catalogue}
        for key, code in {**defaults, **exception_codes}.items():
            if code not in catalogue:
                raise ValueError(f"exception {key!r} maps to {code!r}, which is not in the catalogue")
            if isinstance(key, str) and "." not in key and ":" not in key:
                # A bare name can only mean a builtin; anything else matches nothing.
                builtin = getattr(builtins, key, None)
                if not (isinstance(builtin, type) and issubclass(builtin, BaseException)):
                    raise ValueError(f"exception_codes key {key!r} names no module: write 'module.QualName'")
                by_type[builtin] = catalogue[code]
            elif isinstance(key, str):
                by_name[key] = catalogue[code]
                # The app's own names are found now, as it names them: one may name a
                # class where its package re-exports it ("aiohttp.ClientConnectorError",
                # of aiohttp.client_exceptions), which the lookup's comparison of module
                # and qualname would never match. (The defaults are those own names.)
                if key in exception_codes and (found := _resolve(key)) is not None:
                    resolved[found] = catalogue[code]
            elif isinstance(key, type) and issubclass(key, BaseException):
                by_type[key] = catalogue[code]
            else:
                raise TypeError(f"exception_codes keys are exception types or 'module.QualName', not {key!r}")
        self._by_type = {**resolved, **by_type}  # a type key given for the class wins
        self._by_name = by_name
        self._mapped: dict[type[BaseException], ErrorSpec | None] = {}
        # The last resort of the serializer: bodies that cannot fail to build.
        self._prebuilt = {
            spec.code: orjson.dumps({"code": spec.code, "message": spec.message, "details": {}})
            for spec in catalogue.values()
        }

    # -- from a response ---------------------------------------------------

    def from_response(
        self, status: int, content_type: bytes | None, body: bytes, *, has_credentials: bool
    ) -> Failure:
        """Describe an error response the app or a service sent, keeping only what is safe."""
        code, message, details = _read_error_body(content_type, body, status)
        if code is not None:
            code = code.lower()
            spec = self._catalogue.get(code)
            if code not in self._allowed or (spec is not None and spec.status // 100 != status // 100):
                # A client error's code on a server error, or the reverse, tells the
                # partner the wrong thing about retrying (a 500 `rate_limited` with no
                # Retry-After): the status decides, as for an unknown code.
                code = None
        if code is None:
            code = self.fallback_code(status, has_credentials=has_credentials)
        if status >= 500:
            # A 5xx body may hold stack traces or host names: only the code survives.
            return Failure(status, code, self._default_message(code))
        return Failure(status, code, message or self._default_message(code), details or {})

    def for_code(self, code: str) -> Failure:
        """The catalogue's own status and message for `code`."""
        spec = self._catalogue[code]
        return Failure(spec.status, spec.code, spec.message)

    def fallback_code(self, status: int, *, has_credentials: bool) -> str:
        code = self._catalogue.for_status(status).code
        if code in _CREDENTIAL_CODES and self._allowed >= _CREDENTIAL_CODES:
            # The contract separates "no credentials" from "wrong credentials";
            # the request itself tells which one a bare 401 meant.
            return "auth_invalid_credential" if has_credentials else "auth_missing"
        return code

    def _default_message(self, code: str) -> str:
        spec = self._catalogue.get(code)
        return spec.message if spec is not None else "The request failed."

    # -- from an exception -------------------------------------------------

    def from_exception(self, exc: Exception, *, has_credentials: bool) -> Failure:
        """Describe the error response for an exception raised by the app."""
        if isinstance(exc, ApiError):
            message = exc.message
            if exc.default_message and (spec := self._catalogue.get(exc.code)) is not None:
                # A catalogue class raised without a message says what this catalogue says.
                message = spec.message
            return Failure(exc.status, exc.code, message, exc.details, as_headers(exc.headers))
        if isinstance(exc, HTTPException) and 400 <= exc.status_code <= 599:
            code = self.fallback_code(exc.status_code, has_credentials=has_credentials)
            detail = _clean_message(exc.detail) if exc.status_code < 500 else None
            message = detail or self._default_message(code)
            return Failure(exc.status_code, code, message, {}, as_headers(exc.headers))
        spec = self._lookup(type(exc))
        if spec is None:
            return Failure(500, "internal", self._default_message("internal"), log="error")
        if spec.code == "downstream_unavailable" and _answered_4xx(exc):
            # raise_for_status() on a service's 4xx: the service is up and a retry
            # gets the same answer, so not the retryable downstream_unavailable.
            spec = self._catalogue["downstream_invalid_response"]
        return Failure(spec.status, spec.code, spec.message, log="warning")

    def _lookup(self, exc_type: type[BaseException]) -> ErrorSpec | None:
        try:
            return self._mapped[exc_type]
        except KeyError:
            pass
        found: ErrorSpec | None = None
        for cls in exc_type.__mro__:
            found = self._by_type.get(cls) or self._by_name.get(f"{cls.__module__}.{cls.__qualname__}")
            if found is not None:
                break
        if len(self._mapped) < _MAPPED_CACHE_SIZE:
            self._mapped[exc_type] = found
        return found

    # -- writing -----------------------------------------------------------

    def render(self, request_id: bytes, failure: Failure) -> bytes:
        """The error envelope's bytes. Never raises: odd details degrade, the code stays."""
        error = self._dump(failure.code, failure.message, failure.details)
        return b'{"request_id":"' + request_id + b'","error":' + error + b"}"

    def _dump(self, code: str, message: str, details: Mapping[str, Any]) -> bytes:
        error = {"code": code, "message": message, "details": details}
        try:
            return orjson.dumps(error)
        except TypeError:
            pass
        try:
            # Non-str keys, Decimals, sets and other objects orjson refuses.
            return orjson.dumps(error, default=_jsonable, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:
            pass
        try:
            # The stdlib writes integers of any size; lone surrogates, which no
            # strict parser accepts even escaped, become "?" on encoding.
            return json.dumps(
                error,
                default=_jsonable,
                skipkeys=True,
                allow_nan=False,
                ensure_ascii=False,
                separators=(",", ":"),
            ).encode("utf-8", "replace")
        except Exception:  # noqa: S110 - a serializer that cannot fail falls through to prebuilt bytes
            pass
        prebuilt = self._prebuilt.get(code)
        if prebuilt is not None:
            return prebuilt
        # `code` is validated lower_snake_case, so this cannot fail.
        return orjson.dumps({"code": code, "message": "The request failed.", "details": {}})


def _resolve(name: str) -> type[BaseException] | None:
    """The exception class an exception_codes name names, its module imported as the app asked.

    None when the name's top-level package is not installed: the app cannot
    raise its exceptions, and the name matches nothing. Any other name that
    finds no exception class is a ValueError, when the middleware is built.
    """
    try:
        found = pkgutil.resolve_name(name)
    except ModuleNotFoundError as exc:
        if exc.name == name.partition(".")[0]:
            return None
        raise ValueError(f"exception_codes key {name!r} cannot be imported: {exc}") from exc
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"exception_codes key {name!r} names nothing that can be found: {exc}") from exc
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise TypeError(f"exception_codes key {name!r} names {found!r}, not an exception class")
    return found


def as_headers(value: object) -> Mapping[Any, Any]:
    """An exception's headers as a mapping, however it holds them."""
    # Where exception headers become a Failure's or a record's: a mapping as it is,
    # (name, value) pairs as the mapping they spell (HTTPException keeps what it
    # was given; a subclass may replace an ApiError's), anything else dropped.
    if value is None or isinstance(value, Mapping):
        return value or {}
    try:
        pairs: dict[Any, Any] = dict(value)  # type: ignore[call-overload]  # checked at run time
    except (TypeError, ValueError):
        return {}
    return pairs


def _answered_4xx(exc: Exception) -> bool:
    # httpx's HTTPStatusError carries the response it was raised for; aiohttp's
    # ClientResponseError the status itself.
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is None:
        status = getattr(exc, "status", None)
    return isinstance(status, int) and 400 <= status <= 499


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, Decimal):
        return str(value)
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__}>"


def _read_error_body(
    content_type: bytes | None, body: bytes, status: int
) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """Find (code, message, details) in the error shapes services commonly send."""
    # A BOM is no part of a document (RFC 8259 §8.1) or of a message; orjson refuses it.
    body = body.removeprefix(BOM)
    if not body or content_type is None:
        return None, None, None
    if is_json_media_type(content_type):
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None, None, None
        if isinstance(document, dict):
            return _read_error_object(document, status)
        return None, None, None
    if content_type.partition(b";")[0].strip().lower() in _TEXT_MEDIA:
        return None, _clean_message(body), None
    return None, None, None


def _read_error_object(
    document: dict[str, Any], status: int
) -> tuple[str | None, str | None, dict[str, Any] | None]:
    error = document.get("error")
    if isinstance(error, dict):
        # {"error": {"code", "message", "details"}}: this contract's own shape.
        return (
            _as_code(error.get("code")),
            _clean_message(error.get("message")),
            _as_details(error.get("details")),
        )
    if isinstance(error, str):
        # RFC 6749 §5.2 style: {"error": "invalid_token", "error_description": "..."}.
        message = document.get("error_description", document.get("message"))
        return _as_code(error), _clean_message(message), None
    if "code" in document and ("message" in document or "detail" not in document):
        # A flat object with a top-level code and message (a problem document
        # with a code extension and only a title reads the same way).
        return (
            _as_code(document.get("code")),
            _clean_message(document.get("message")) or _clean_message(document.get("title")),
            _as_details(document.get("details")),
        )
    if "title" in document or "type" in document:
        # RFC 9457 problem details: detail/title are the message, extension members the details.
        extensions = {k: v for k, v in document.items() if k not in _PROBLEM_MEMBERS}
        message = _clean_message(document.get("detail")) or _clean_message(document.get("title"))
        return _as_code(document.get("code")), message, extensions or None
    if "detail" in document:
        # {"detail": "..."} (Starlette, FastAPI, DRF) or {"detail": [...]} (FastAPI validation).
        detail = document["detail"]
        if isinstance(detail, str):
            return None, _clean_message(detail), None
        if status in (400, 422) and is_validation_error_list(detail):
            # A FastAPI service's 422 (or 400): a validation error, whatever the
            # status's default code; the fields without the input they rejected.
            return "request_invalid", VALIDATION_MESSAGE, validation_error_details(detail)
        return None, None, _as_details(detail)
    return None, None, None


def _as_code(value: object) -> str | None:
    if isinstance(value, str) and is_valid_code(value.lower()):
        return value
    return None


def _as_details(value: object) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        return {"errors": value}
    return None


def _clean_message(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    value = value.strip()
    # Plain text that is long or not printable is a page or a dump, not a message.
    if not value or len(value) > _MESSAGE_LIMIT or not value.isprintable():
        return None
    return value
