"""FastAPI support: request validation errors as `400 request_invalid`.

FastAPI answers a request that fails validation with `422 {"detail": [...]}`;
the partner contract calls that `400 request_invalid` with the invalid fields
in `details`. FastAPI stays optional: this module is the only one importing it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.middleware import Middleware

from envelope_middleware._validation import VALIDATION_MESSAGE, validation_error_details
from envelope_middleware.exceptions import RequestInvalid
from envelope_middleware.handlers import hand_over, install_exception_handlers
from envelope_middleware.openapi import envelope_openapi

__all__ = ["install_fastapi_handlers", "install_fastapi_openapi", "validation_error_details"]


async def _request_validation_handler(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    error = RequestInvalid(VALIDATION_MESSAGE, details=validation_error_details(errors))
    # Handed to the envelope middleware as an exception: its details reach the
    # client whatever their size (a response body is read up to 64 KiB).
    hand_over(request, error)
    # What the client gets without the middleware: the contract's own error shape.
    content = {"error": {"code": error.code, "message": error.message, "details": error.details}}
    return JSONResponse(content, status_code=error.status)


def install_fastapi_handlers(app: FastAPI) -> None:
    """Make `app` answer request validation errors the contract's way.

    Also installs `install_exception_handlers`, so that a FastAPI app mounted
    as a sub-app keeps the codes of its exceptions, and moves the app's request
    body limit (`FastAPI(max_body_size=...)`) inside the envelope.
    """
    install_exception_handlers(app)
    app.add_exception_handler(RequestValidationError, _request_validation_handler)
    limit = getattr(app, "max_body_size", None)
    if limit is not None:
        if app.middleware_stack is not None:
            raise RuntimeError(
                "install_fastapi_handlers must be called before the app serves its first request"
            )
        # FastAPI puts its limit outside every add_middleware layer: a body declared
        # too large got a plain 413 with no request id (issue #12). The same limit,
        # innermost, answers through the envelope; the outer one is turned off.
        from starlette.middleware.body_limit import RequestBodyLimitMiddleware  # noqa: PLC0415 - Starlette 1.x

        app.max_body_size = None
        app.user_middleware.append(Middleware(RequestBodyLimitMiddleware, max_body_size=limit))


def install_fastapi_openapi(app: FastAPI, **options: Any) -> None:
    """Make `app.openapi()`, and so `/openapi.json` and `/docs`, return the enveloped document.

    `options` are `envelope_openapi`'s: pass the middleware's own (its
    `exclude_paths`, `catalogue`, `request_id_format`, ...). A separate call from
    `install_fastapi_handlers`, which knows none of them. Exclude the document's
    own paths (`/openapi.json`, `/docs`) from the envelope, as every docs page.
    """
    cache: list[dict[str, Any]] = []  # built once, on first use, as FastAPI builds its own

    def openapi() -> dict[str, Any]:
        if not cache:
            # FastAPI's own method, not whatever app.openapi is now: a second call of
            # this function must not envelope the document twice. Whether the
            # handlers are installed is read here, when the document is built.
            handled = app.exception_handlers.get(RequestValidationError) is _request_validation_handler
            options.setdefault("validation_errors", handled)
            cache.append(envelope_openapi(FastAPI.openapi(app), **options))
        return cache[0]

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to change the document
