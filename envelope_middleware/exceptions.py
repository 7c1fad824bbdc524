"""Errors a handler raises to answer with a coded error envelope.

Hierarchy:

* ApiError(code, message, *, status, details=None, headers=None)
  + RequestInvalid                     400 request_invalid
  + RequestMissingIdempotencyKey       400 request_missing_idempotency_key
  + AuthMissing                        401 auth_missing
  + AuthInvalidCredential              401 auth_invalid_credential
  + AuthForbidden                      403 auth_forbidden
  + ResourceNotFound                   404 resource_not_found
  + MethodNotAllowed                   405 method_not_allowed
  + IdempotencyKeyConflict             409 idempotency_key_conflict
  + StateInvalidTransition             422 state_invalid_transition
  + RateLimited(retry_after=...)       429 rate_limited
  + Internal                           500 internal
  + DownstreamUnavailable              502 downstream_unavailable
  + DownstreamInvalidResponse          502 downstream_invalid_response
  + ServiceUnavailable                 503 service_unavailable
  + DownstreamTimeout                  504 downstream_timeout

Every catalogue class takes `(message=None, *, details=None, headers=None)`;
its code, status and default message come from `DEFAULT_CATALOGUE`. Raised
without a message, it answers with the message of the middleware's catalogue.
A gateway's own codes are plain `ApiError`s, or subclasses it writes the same way.

`ApiError` deliberately does not subclass Starlette's `HTTPException`: the
framework's exception middleware would render it as plain text before the
envelope middleware could see the code and details.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, ClassVar, TypeAlias

from envelope_middleware.catalogue import DEFAULT_CATALOGUE, ErrorSpec, is_valid_code

__all__ = [
    "ApiError",
    "AuthForbidden",
    "AuthInvalidCredential",
    "AuthMissing",
    "DownstreamInvalidResponse",
    "DownstreamTimeout",
    "DownstreamUnavailable",
    "IdempotencyKeyConflict",
    "Internal",
    "MethodNotAllowed",
    "RateLimited",
    "RequestInvalid",
    "RequestMissingIdempotencyKey",
    "ResourceNotFound",
    "ServiceUnavailable",
    "StateInvalidTransition",
]


Headers: TypeAlias = Mapping[str, str] | Iterable[tuple[str, str]]


class ApiError(Exception):
    """An error with a stable code, answered as `{"request_id", "error": {...}}`.

    `message` is shown to the partner as it is, so it must not hold secrets;
    `details` is a JSON object of per-error facts; `headers` are added to the
    response (for example `Retry-After` or `WWW-Authenticate`).
    """

    default_message = False  # raised without a message: the catalogue's is used

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int,
        details: Mapping[str, Any] | None = None,
        headers: Headers | None = None,
    ) -> None:
        if not is_valid_code(code):
            raise ValueError(f"error code must be lower_snake_case, at most 64 chars: {code!r}")
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(f"an ApiError's status must be 4xx or 5xx, not {status!r}")
        # Checked here, where the mistake is made, not when the response is built.
        if not isinstance(message, str):
            raise TypeError(f"an ApiError's message is a str, not {type(message).__name__}")
        if details is not None and not isinstance(details, Mapping):
            raise TypeError(
                f"an ApiError's details are a mapping (a JSON object), not {type(details).__name__}"
            )
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.details: Mapping[str, Any] = details if details is not None else {}
        # A list of (name, value) pairs is read as the mapping it spells.
        self.headers: Mapping[str, str] = dict(headers) if headers is not None else {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, status={self.status})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own calls type(self)(*self.args), which this signature refuses:
        # rebuilt from its attributes instead, so errors cross process pools and queues.
        return (_rebuild, (type(self), self.args), self.__dict__)


def _rebuild(cls: type[ApiError], args: tuple[Any, ...]) -> ApiError:
    error = cls.__new__(cls)
    error.args = args
    return error


class _CatalogueError(ApiError):
    spec: ClassVar[ErrorSpec]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("__doc__") is None:
            # help() tells the code a class answers with, not ApiError's signature.
            spec = cls.spec
            cls.__doc__ = f"{spec.status} `{spec.code}`: {spec.message}"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Mapping[str, Any] | None = None,
        headers: Headers | None = None,
    ) -> None:
        spec = self.spec
        super().__init__(
            spec.code,
            spec.message if message is None else message,
            status=spec.status,
            details=details,
            headers=headers,
        )
        # The middleware's catalogue may word this code differently from the default one.
        self.default_message = message is None


class RequestInvalid(_CatalogueError):
    spec = DEFAULT_CATALOGUE["request_invalid"]


class RequestMissingIdempotencyKey(_CatalogueError):
    spec = DEFAULT_CATALOGUE["request_missing_idempotency_key"]


class AuthMissing(_CatalogueError):
    spec = DEFAULT_CATALOGUE["auth_missing"]


class AuthInvalidCredential(_CatalogueError):
    spec = DEFAULT_CATALOGUE["auth_invalid_credential"]


class AuthForbidden(_CatalogueError):
    spec = DEFAULT_CATALOGUE["auth_forbidden"]


class ResourceNotFound(_CatalogueError):
    spec = DEFAULT_CATALOGUE["resource_not_found"]


class MethodNotAllowed(_CatalogueError):
    spec = DEFAULT_CATALOGUE["method_not_allowed"]


class IdempotencyKeyConflict(_CatalogueError):
    spec = DEFAULT_CATALOGUE["idempotency_key_conflict"]


class StateInvalidTransition(_CatalogueError):
    spec = DEFAULT_CATALOGUE["state_invalid_transition"]


class RateLimited(_CatalogueError):
    """429 `rate_limited`; `retry_after` (seconds or a date) becomes the `Retry-After` header."""

    spec = DEFAULT_CATALOGUE["rate_limited"]

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after: float | datetime | None = None,
        details: Mapping[str, Any] | None = None,
        headers: Headers | None = None,
    ) -> None:
        merged_headers = dict(headers or {})
        merged_details = dict(details or {})
        if retry_after is not None:
            # retry_after wins over a Retry-After among the headers, whatever its case.
            merged_headers = {k: v for k, v in merged_headers.items() if k.lower() != "retry-after"}
        if isinstance(retry_after, datetime):
            # RFC 9110 §10.2.3: Retry-After is an HTTP-date or delay-seconds.
            if retry_after.tzinfo is None:
                raise ValueError("retry_after must be an aware datetime (HTTP-dates are in GMT)")
            merged_headers["Retry-After"] = format_datetime(retry_after.astimezone(UTC), usegmt=True)
        elif retry_after is not None:
            if not math.isfinite(retry_after) or retry_after < 0:
                raise ValueError(f"retry_after must be a finite number >= 0, not {retry_after!r}")
            # delay-seconds is a non-negative integer; round up so clients never retry early.
            seconds = math.ceil(retry_after)
            merged_headers["Retry-After"] = str(seconds)
            merged_details.setdefault("retry_after", seconds)
        super().__init__(message, details=merged_details, headers=merged_headers)


class Internal(_CatalogueError):
    spec = DEFAULT_CATALOGUE["internal"]


class DownstreamUnavailable(_CatalogueError):
    spec = DEFAULT_CATALOGUE["downstream_unavailable"]


class DownstreamInvalidResponse(_CatalogueError):
    spec = DEFAULT_CATALOGUE["downstream_invalid_response"]


class ServiceUnavailable(_CatalogueError):
    spec = DEFAULT_CATALOGUE["service_unavailable"]


class DownstreamTimeout(_CatalogueError):
    spec = DEFAULT_CATALOGUE["downstream_timeout"]
