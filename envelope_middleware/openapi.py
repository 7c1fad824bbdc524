"""The published contract: an OpenAPI document as partners receive it (issue #12).

`envelope_openapi` takes an app's OpenAPI 3.x document (a dict, as FastAPI's
`app.openapi()` returns it) and returns the document the envelope makes true:
2xx JSON bodies inside `{"request_id", "data"}`, every error as one
`ErrorEnvelope`, and the request-id header on every response. It is a pure
function: the input is not changed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from envelope_middleware._http import is_json_media_type
from envelope_middleware._paths import ExcludedPaths
from envelope_middleware.catalogue import DEFAULT_CATALOGUE, Catalogue
from envelope_middleware.request_id import RequestIdFormat

__all__ = ["envelope_openapi"]

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_ID_PATTERNS = {
    "hex": "^[0-9a-f]{32}$",
    "prefixed_uuid": "^req_[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
}
_ANY_ID = "^[A-Za-z0-9._:-]{1,128}$"  # what the middleware lets a custom generator send
_SCHEMAS = "#/components/schemas/"
_RETRY_AFTER = {
    "description": "When to retry: seconds, or an HTTP-date (RFC 9110 §10.2.3).",
    "schema": {"type": "string"},
}
_WWW_AUTHENTICATE = {"description": "The authentication scheme to use.", "schema": {"type": "string"}}


def envelope_openapi(
    document: Mapping[str, Any],
    *,
    catalogue: Catalogue = DEFAULT_CATALOGUE,
    allowed_codes: Iterable[str] = (),
    request_id_header: str = "X-Request-ID",
    request_id_format: RequestIdFormat = "hex",
    trust_request_id: bool = False,
    exclude_paths: Iterable[str] = (),
    operation_codes: Mapping[str, Iterable[str]] | None = None,
    validation_errors: bool = False,
) -> dict[str, Any]:
    """Return `document` as partners receive it behind `EnvelopeMiddleware`.

    Pass the middleware's own options (catalogue, allowed codes, header, id
    format, excluded paths) so the document says what it does.
    `operation_codes` maps an operationId to the codes it can answer beyond
    the defaults (each gets its status's response). With `validation_errors`
    (FastAPI's handlers installed), a 422 `HTTPValidationError` is declared as
    the `400 request_invalid` the handlers answer instead.
    """
    result: dict[str, Any] = copy.deepcopy(dict(document))
    extra = set(allowed_codes)
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    # A trusted incoming id, or a custom generator's, is any id the middleware lets through.
    known = isinstance(request_id_format, str) and not trust_request_id
    pattern = _ID_PATTERNS.get(str(request_id_format), _ANY_ID) if known else _ANY_ID
    schemas["RequestId"] = {
        "type": "string",
        "pattern": pattern,
        "description": "This exchange's id, also in the response's request-id header: quote it to support.",
    }
    schemas["ErrorEnvelope"] = _error_envelope([*catalogue, *sorted(extra)])
    if validation_errors:
        schemas["ValidationErrorEnvelope"] = _validation_envelope()
    # A service's code is kept within its status's class (docs/limits.md), so a
    # status's possible codes are its class's, and the allowed codes.
    for kind in ("4", "5"):
        codes = [spec.code for spec in catalogue.values() if str(spec.status)[0] == kind]
        schemas[f"ErrorEnvelope{kind}XX"] = _error_envelope([*codes, *sorted(extra)])
    excluded = ExcludedPaths(exclude_paths)
    # Shared responses are copied into each operation before they change: one
    # declared for both a 2xx and an error status must become two things.
    shared_responses = dict(result["components"].get("responses", {}))
    id_header = {"description": "This exchange's request id.", "schema": {"$ref": _SCHEMAS + "RequestId"}}
    codes_for = {key: list(codes) for key, codes in (operation_codes or {}).items()}
    unknown = sorted({code for codes in codes_for.values() for code in codes} - set(catalogue))
    if unknown:
        # A code's status comes from the catalogue: one it lacks has no response to declare.
        raise ValueError(f"operation_codes names codes the catalogue lacks: {unknown}")
    for path, item in result.get("paths", {}).items():
        if excluded.exact and excluded.matches({"path": path}):
            continue
        for method in _METHODS:
            operation = item.get(method)
            if isinstance(operation, dict):
                _envelope_operation(
                    operation,
                    catalogue,
                    shared_responses,
                    headers={request_id_header: id_header},
                    codes=codes_for.get(operation.get("operationId", ""), ()),
                    validation_errors=validation_errors,
                )
    return result


def _envelope_operation(
    operation: dict[str, Any],
    catalogue: Catalogue,
    shared: Mapping[str, Any],
    *,
    headers: Mapping[str, Any],
    codes: Iterable[str],
    validation_errors: bool,
) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    validation = validation_errors and _is_fastapi_validation(responses.get("422"))
    if validation:
        # FastAPI's own 422: the handlers answer it as 400 request_invalid, with the
        # invalid fields in details.errors (envelope_middleware.fastapi).
        del responses["422"]
        responses.setdefault("400", {"description": "The request did not validate."})
    for code in codes:
        status = str(catalogue[code].status)
        responses.setdefault(status, {"description": catalogue[code].message})
    # Any 4xx and 5xx the app or the middleware may answer: an unknown route's 404,
    # a method's 405, an exception's 500, a malformed backend document's 502.
    responses.setdefault("4XX", {"description": "A client error."})
    responses.setdefault("5XX", {"description": "A server error; retry with backoff where retryable."})
    for key, found in list(responses.items()):
        response = _resolved(found, shared)
        if response is None:
            continue
        responses[key] = response
        response.setdefault("headers", {}).update(headers)
        status = str(key)  # a document loaded from YAML may have int keys
        kind = status[0]
        if kind == "2" and status != "206":  # a 206 passes the middleware untouched
            _wrap_content(response)
        elif kind in "45":
            schema: dict[str, Any] = {"$ref": f"{_SCHEMAS}ErrorEnvelope{kind}XX"}
            if validation and status == "400":
                # The handlers' validation answer, or any other 400 the app gives.
                schema = {"anyOf": [{"$ref": _SCHEMAS + "ValidationErrorEnvelope"}, schema]}
            response["content"] = {"application/json": {"schema": schema}}
            if status in ("429", "503"):
                response["headers"]["Retry-After"] = _RETRY_AFTER
            if status == "401":
                response["headers"]["WWW-Authenticate"] = _WWW_AUTHENTICATE


def _is_fastapi_validation(response: object) -> bool:
    """Whether a 422 is FastAPI's request validation answer, not a route's own 422."""
    return isinstance(response, dict) and "HTTPValidationError" in str(response.get("content", ""))


def _resolved(response: object, shared: Mapping[str, Any]) -> dict[str, Any] | None:
    """The response itself, a copy of the shared one it references, or None if it is neither."""
    if not isinstance(response, dict):
        return None
    ref = response.get("$ref")
    if ref is None:
        return response
    name = ref.removeprefix("#/components/responses/") if isinstance(ref, str) else None
    target = shared.get(name) if name else None
    return copy.deepcopy(target) if isinstance(target, dict) else None


def _wrap_content(response: dict[str, Any]) -> None:
    for media_type, content in (response.get("content") or {}).items():
        # The middleware's own reading of a JSON media type, so the two agree.
        if not is_json_media_type(media_type.encode("latin-1")) or not isinstance(content, dict):
            continue
        data = content.get("schema", {})
        content.pop("example", None)
        content.pop("examples", None)  # an example of the bare body, no longer what is sent
        content["schema"] = {
            "type": "object",
            "required": ["request_id", "data"],
            "additionalProperties": False,
            "properties": {"request_id": {"$ref": _SCHEMAS + "RequestId"}, "data": data},
        }


def _validation_envelope() -> dict[str, Any]:
    """The handlers' answer to FastAPI's validation error: request_invalid with the fields
    they list (`validation_error_details`)."""
    envelope = _error_envelope(["request_invalid"])
    field = {
        "type": "object",
        "required": ["field", "location", "message", "type"],
        "properties": {
            # A string, or null (a body that is not JSON has no field): untyped, so that
            # one schema reads the same in OpenAPI 3.0 and 3.1.
            "field": {"description": "The field's dotted path, or null."},
            "location": {"description": "body, query, path, header or cookie; or null."},
            "message": {"type": "string"},
            "type": {"type": "string"},
        },
    }
    envelope["properties"]["error"]["properties"]["details"] = {
        "type": "object",
        "properties": {
            "errors": {"type": "array", "items": field},
            "omitted_errors": {"type": "integer", "minimum": 1},
        },
    }
    return envelope


def _error_envelope(codes: Iterable[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["request_id", "error"],
        "additionalProperties": False,
        "properties": {
            "request_id": {"$ref": _SCHEMAS + "RequestId"},
            "error": {
                "type": "object",
                "required": ["code", "message", "details"],
                "additionalProperties": False,
                "properties": {
                    "code": {"type": "string", "enum": list(dict.fromkeys(codes))},
                    "message": {"type": "string"},
                    "details": {"type": "object"},
                },
            },
        },
    }
