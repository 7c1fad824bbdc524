"""FastAPI support: request validation errors as `400 request_invalid`.

FastAPI answers a request that fails validation with `422 {"detail": [...]}`;
the partner contract calls that `400 request_invalid` with the invalid fields
in `details`. FastAPI stays optional: this module is the only one importing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from envelope_middleware.catalogue import DEFAULT_CATALOGUE

__all__ = ["install_fastapi_handlers", "validation_error_details"]

_SPEC = DEFAULT_CATALOGUE["request_invalid"]


def validation_error_details(errors: Sequence[Any]) -> dict[str, Any]:
    """`{"errors": [{"field", "location", "message", "type"}]}` from pydantic's error list.

    The rejected input is left out on purpose: echoing it would reflect
    whatever the client sent, secrets included, into responses and logs.
    """
    fields = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ())]
        fields.append(
            {
                "field": ".".join(location[1:]) or None,
                "location": location[0] if location else None,
                "message": str(error.get("msg", "")),
                "type": str(error.get("type", "")),
            }
        )
    return {"errors": fields}


async def _request_validation_handler(_request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    # The contract's own error shape: the envelope middleware keeps its code,
    # message and details as they are, and adds the request id.
    content = {
        "error": {
            "code": _SPEC.code,
            "message": "The request did not validate.",
            "details": validation_error_details(errors),
        }
    }
    return JSONResponse(content, status_code=_SPEC.status)


def install_fastapi_handlers(app: FastAPI) -> None:
    """Make `app` answer request validation errors the contract's way."""
    app.add_exception_handler(RequestValidationError, _request_validation_handler)
