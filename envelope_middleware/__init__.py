"""One response contract for an ASGI API gateway: request ids, envelopes, log correlation."""

from importlib.machinery import EXTENSION_SUFFIXES

from envelope_middleware import _exchange
from envelope_middleware.catalogue import DEFAULT_CATALOGUE, Catalogue, ErrorSpec
from envelope_middleware.exceptions import (
    ApiError,
    AuthForbidden,
    AuthInvalidCredential,
    AuthMissing,
    DownstreamInvalidResponse,
    DownstreamTimeout,
    DownstreamUnavailable,
    IdempotencyKeyConflict,
    Internal,
    MethodNotAllowed,
    RateLimited,
    RequestInvalid,
    RequestMissingIdempotencyKey,
    ResourceNotFound,
    ServiceUnavailable,
    StateInvalidTransition,
)
from envelope_middleware.idempotency import IdempotencyMiddleware, IdempotencyStore, MemoryStore
from envelope_middleware.logging import EventLogger, RequestIdFilter, configure_logging
from envelope_middleware.middleware import EnvelopeMiddleware
from envelope_middleware.openapi import envelope_openapi
from envelope_middleware.propagation import (
    async_request_id_hook,
    request_id_headers,
    request_id_hook,
)
from envelope_middleware.request_id import (
    get_request_id,
    hex_request_id,
    is_safe_request_id,
    prefixed_uuid_request_id,
)

__version__ = "0.1.0"

#: True where the middleware's per-request modules run compiled by mypyc (the platform wheel
#: ``scripts/build-wheels`` makes), False where they run as Python (docs/performance.md).
COMPILED: bool = _exchange.__file__.endswith(tuple(EXTENSION_SUFFIXES))

__all__ = [
    "COMPILED",
    "DEFAULT_CATALOGUE",
    "ApiError",
    "AuthForbidden",
    "AuthInvalidCredential",
    "AuthMissing",
    "Catalogue",
    "DownstreamInvalidResponse",
    "DownstreamTimeout",
    "DownstreamUnavailable",
    "EnvelopeMiddleware",
    "ErrorSpec",
    "EventLogger",
    "IdempotencyKeyConflict",
    "IdempotencyMiddleware",
    "IdempotencyStore",
    "Internal",
    "MemoryStore",
    "MethodNotAllowed",
    "RateLimited",
    "RequestIdFilter",
    "RequestInvalid",
    "RequestMissingIdempotencyKey",
    "ResourceNotFound",
    "ServiceUnavailable",
    "StateInvalidTransition",
    "async_request_id_hook",
    "configure_logging",
    "envelope_openapi",
    "get_request_id",
    "hex_request_id",
    "is_safe_request_id",
    "prefixed_uuid_request_id",
    "request_id_headers",
    "request_id_hook",
]
