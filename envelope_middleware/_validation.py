"""pydantic's validation errors as the contract's `details`, without importing FastAPI."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

VALIDATION_MESSAGE = "The request did not validate."
# Enough to fix a request by; a body of thousands of invalid items would otherwise
# make an error body past what the middleware reads of one (ERROR_BODY_LIMIT).
MAX_LISTED_ERRORS = 100


def validation_error_details(errors: Sequence[Any]) -> dict[str, Any]:
    """`{"errors": [{"field", "location", "message", "type"}]}` from pydantic's error list.

    The rejected input is left out on purpose: echoing it would reflect
    whatever the client sent, secrets included, into responses and logs.
    At most `MAX_LISTED_ERRORS` are listed; `omitted_errors` counts the rest.
    """
    fields = []
    for error in errors[:MAX_LISTED_ERRORS]:
        location = [str(part) for part in error.get("loc", ())]
        kind = str(error.get("type", ""))
        fields.append(
            {
                # A body that is not JSON has no field: pydantic puts the byte offset there.
                "field": None if kind == "json_invalid" else ".".join(location[1:]) or None,
                "location": location[0] if location else None,
                "message": str(error.get("msg", "")),
                "type": kind,
            }
        )
    details: dict[str, Any] = {"errors": fields}
    if len(errors) > MAX_LISTED_ERRORS:
        details["omitted_errors"] = len(errors) - MAX_LISTED_ERRORS
    return details


def is_validation_error_list(value: object) -> bool:
    """Whether `value` is FastAPI's `detail` list of pydantic errors."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(error, dict)
            and isinstance(error.get("loc"), list | tuple)
            and isinstance(error.get("msg"), str)
            for error in value
        )
    )
