"""pydantic's validation errors as the contract's `details`, without importing FastAPI."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

VALIDATION_MESSAGE = "The request did not validate."


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
