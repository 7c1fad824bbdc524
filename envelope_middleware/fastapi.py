"""FastAPI support: request validation errors as `400 request_invalid`.

FastAPI answers a request that fails validation with `422 {"detail": [...]}`;
the partner contract calls that `400 request_invalid` with the invalid fields
in `details`. FastAPI stays optional: this module is the only one importing it.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from envelope_middleware._validation import VALIDATION_MESSAGE, validation_error_details
from envelope_middleware.catalogue import DEFAULT_CATALOGUE

__all__ = ["install_fastapi_handlers", "validation_error_details"]

_SPEC = DEFAULT_CATALOGUE["request_invalid"]


async def _request_validation_handler(_request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    # The contract's own error shape: the envelope middleware keeps its code,
    # message and details as they are, and adds the request id.
    content = {
        "error": {
            "code": _SPEC.code,
            "message": VALIDATION_MESSAGE,
            "details": validation_error_details(errors),
        }
    }
    return JSONResponse(content, status_code=_SPEC.status)


def install_fastapi_handlers(app: FastAPI) -> None:
    """Make `app` answer request validation errors the contract's way."""
    app.add_exception_handler(RequestValidationError, _request_validation_handler)
