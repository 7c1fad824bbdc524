"""envelope_openapi (issue #12): the document partners read is what the envelope sends."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from openapi_spec_validator import validate
from pydantic import BaseModel

from envelope_middleware import DEFAULT_CATALOGUE, EnvelopeMiddleware, RateLimited
from envelope_middleware.fastapi import install_fastapi_handlers, install_fastapi_openapi
from envelope_middleware.openapi import envelope_openapi


class Order(BaseModel):
    id: str
    total: int


def orders_app() -> FastAPI:
    app = FastAPI(title="orders")

    @app.get("/orders/{order_id}", operation_id="get_order")
    async def get_order(order_id: str, page: int = 1) -> Order:
        if order_id == "missing":
            raise HTTPException(404, "No such order.")
        if order_id == "busy":
            raise RateLimited(retry_after=3)
        return Order(id=order_id, total=page)

    @app.delete("/orders/{order_id}", status_code=204, operation_id="delete_order")
    async def delete_order(order_id: str) -> None:
        return None

    @app.get("/health", operation_id="health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    install_fastapi_handlers(app)
    app.add_middleware(EnvelopeMiddleware, exclude_paths=["/health"])
    return app


def schema_of(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema for `schema` whose `#/components/...` references resolve in `document`."""
    return {**schema, "components": document["components"]}


def test_openapi_describes_what_partners_receive_from_the_running_app() -> None:
    app = orders_app()
    document = envelope_openapi(app.openapi(), exclude_paths=["/health"], validation_errors=True)
    validate(document)
    operation = document["paths"]["/orders/{order_id}"]["get"]
    with TestClient(app) as client:
        answers = {
            "200": client.get("/orders/ord_1?page=2"),
            "404": client.get("/orders/missing"),
            "429": client.get("/orders/busy"),
            "400": client.get("/orders/ord_1?page=two"),
        }
    for status, answer in answers.items():
        assert str(answer.status_code) == status
        response = operation["responses"][status if status in operation["responses"] else "4XX"]
        schema = response["content"]["application/json"]["schema"]
        jsonschema.validate(answer.json(), schema_of(document, schema))
        id_schema = document["components"]["schemas"]["RequestId"]
        jsonschema.validate(answer.headers["x-request-id"], id_schema)
        assert "X-Request-ID" in response["headers"]
    assert answers["429"].headers["retry-after"] == "3"


def test_openapi_wraps_2xx_json_around_the_original_schema() -> None:
    original = orders_app().openapi()
    document = envelope_openapi(original)
    ok = document["paths"]["/orders/{order_id}"]["get"]["responses"]["200"]["content"]["application/json"]
    before = original["paths"]["/orders/{order_id}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"] == {
        "type": "object",
        "required": ["request_id", "data"],
        "additionalProperties": False,
        "properties": {"request_id": {"$ref": "#/components/schemas/RequestId"}, "data": before["schema"]},
    }
    jsonschema.validate(
        {"request_id": "a" * 32, "data": {"id": "x", "total": 1}}, schema_of(document, ok["schema"])
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"id": "x", "total": 1}, schema_of(document, ok["schema"]))


def test_openapi_leaves_a_204_bodiless_and_excluded_paths_as_they_are() -> None:
    original = orders_app().openapi()
    document = envelope_openapi(original, exclude_paths=["/health"])
    deleted = document["paths"]["/orders/{order_id}"]["delete"]["responses"]["204"]
    assert "content" not in deleted
    assert "X-Request-ID" in deleted["headers"]
    assert document["paths"]["/health"] == original["paths"]["/health"]


def test_openapi_declares_every_error_through_one_envelope_per_class() -> None:
    document = envelope_openapi(orders_app().openapi(), allowed_codes=["resource_unmapped"])
    validate(document)
    responses = document["paths"]["/orders/{order_id}"]["get"]["responses"]
    schemas = document["components"]["schemas"]
    assert responses["4XX"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorEnvelope4XX"
    }
    assert responses["5XX"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorEnvelope5XX"
    }
    client_codes = schemas["ErrorEnvelope4XX"]["properties"]["error"]["properties"]["code"]["enum"]
    server_codes = schemas["ErrorEnvelope5XX"]["properties"]["error"]["properties"]["code"]["enum"]
    assert set(client_codes) == {spec.code for spec in DEFAULT_CATALOGUE.values() if spec.status < 500} | {
        "resource_unmapped"
    }
    assert "internal" in server_codes
    assert "internal" not in client_codes
    every = schemas["ErrorEnvelope"]["properties"]["error"]["properties"]["code"]["enum"]
    assert set(every) == set(client_codes) | set(server_codes)


def test_openapi_fastapi_validation_error_becomes_400_request_invalid_with_the_handlers() -> None:
    original = orders_app().openapi()
    assert "422" in original["paths"]["/orders/{order_id}"]["get"]["responses"]
    document = envelope_openapi(original, validation_errors=True)
    responses = document["paths"]["/orders/{order_id}"]["get"]["responses"]
    assert "422" not in responses
    schema = responses["400"]["content"]["application/json"]["schema"]
    assert schema == {
        "anyOf": [
            {"$ref": "#/components/schemas/ValidationErrorEnvelope"},
            {"$ref": "#/components/schemas/ErrorEnvelope4XX"},
        ]
    }
    answer: dict[str, Any] = {
        "request_id": "0" * 32,
        "error": {
            "code": "request_invalid",
            "message": "The request did not validate.",
            "details": {
                "errors": [{"field": None, "location": "body", "message": "bad", "type": "json_invalid"}]
            },
        },
    }
    jsonschema.validate(answer, schema_of(document, schema))
    # Any other 400 the app gives is declared too: its own details, or another code.
    answer["error"]["details"] = {"errors": [{"field": "page"}]}
    jsonschema.validate(answer, schema_of(document, schema))
    validation_only = {"$ref": "#/components/schemas/ValidationErrorEnvelope"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(answer, schema_of(document, validation_only))
    answer["error"]["code"] = "internal"  # a server error's code is no 400's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(answer, schema_of(document, schema))
    kept = envelope_openapi(original)
    assert "422" in kept["paths"]["/orders/{order_id}"]["get"]["responses"]


def test_openapi_operation_codes_add_their_statuses_with_their_headers() -> None:
    document = envelope_openapi(
        orders_app().openapi(),
        operation_codes={"get_order": ["rate_limited", "auth_missing", "service_unavailable"]},
    )
    validate(document)
    responses = document["paths"]["/orders/{order_id}"]["get"]["responses"]
    assert "Retry-After" in responses["429"]["headers"]
    assert "Retry-After" in responses["503"]["headers"]
    assert "WWW-Authenticate" in responses["401"]["headers"]
    assert "429" not in document["paths"]["/orders/{order_id}"]["delete"]["responses"]


@pytest.mark.parametrize(
    ("request_id_format", "good", "bad"),
    [
        ("hex", "0123456789abcdef0123456789abcdef", "req_0"),
        ("prefixed_uuid", "req_e9f2b838-38e9-43ba-9e30-9b747da67d9f", "0123456789abcdef0123456789abcdef"),
        (lambda: "custom-1", "custom-1", "two words"),
    ],
    ids=["hex", "prefixed_uuid", "callable"],
)
def test_openapi_request_id_pattern_follows_the_configured_format(
    request_id_format: Any, good: str, bad: str
) -> None:
    document = envelope_openapi(orders_app().openapi(), request_id_format=request_id_format)
    schema = document["components"]["schemas"]["RequestId"]
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_openapi_does_not_change_its_input() -> None:
    original = orders_app().openapi()
    before = copy.deepcopy(original)
    envelope_openapi(original, validation_errors=True, operation_codes={"get_order": ["rate_limited"]})
    assert original == before


def test_openapi_envelopes_shared_responses_and_leaves_others_but_for_the_header() -> None:
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "hand-written", "version": "1"},
        "paths": {
            "/items": {
                "get": {
                    "responses": {
                        "200": {"$ref": "#/components/responses/Items"},
                        "404": {"$ref": "#/components/responses/Missing"},
                        "302": {"description": "Moved."},
                        "default": {"description": "Anything else."},
                    }
                }
            },
            "/page": {
                "get": {
                    "responses": {
                        "200": {
                            "description": "A page.",
                            "content": {
                                "text/html": {"schema": {"type": "string"}},
                                "application/problem+json": {"schema": {"type": "object"}},
                            },
                        }
                    }
                }
            },
        },
        "components": {
            "responses": {
                "Items": {
                    "description": "Items.",
                    "content": {"application/json": {"schema": {"type": "array"}, "example": []}},
                },
                "Missing": {"description": "Not found."},
            }
        },
    }
    result = envelope_openapi(document)
    validate(result)
    responses = result["paths"]["/items"]["get"]["responses"]
    items = responses["200"]["content"]["application/json"]
    assert items["schema"]["properties"]["data"] == {"type": "array"}
    assert "example" not in items  # an example of the bare body is no longer what is sent
    assert responses["404"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorEnvelope4XX")
    assert "content" not in responses["302"]
    assert "X-Request-ID" in responses["302"]["headers"]
    assert "content" not in responses["default"]
    assert result["components"]["responses"] == document["components"]["responses"]
    page = result["paths"]["/page"]["get"]["responses"]["200"]["content"]
    assert page["text/html"] == {"schema": {"type": "string"}}
    assert page["application/problem+json"]["schema"]["required"] == ["request_id", "data"]


def test_openapi_leaves_a_reference_it_cannot_resolve_as_it_was() -> None:
    responses = {"410": {"$ref": "#/components/responses/Nowhere"}, "418": "not a response"}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {"/x": {"get": {"responses": responses}}},
    }
    result = envelope_openapi(document)["paths"]["/x"]["get"]["responses"]
    assert result["410"] == {"$ref": "#/components/responses/Nowhere"}
    assert result["418"] == "not a response"


def test_openapi_one_call_makes_a_fastapi_app_publish_the_enveloped_document() -> None:
    app = orders_app()
    excluded = ["/health", "/openapi.json", "/docs"]
    # The middleware's own options are the document's: here, its excluded paths.
    app.user_middleware.clear()
    app.add_middleware(EnvelopeMiddleware, exclude_paths=excluded)
    install_fastapi_openapi(app, exclude_paths=excluded)
    with TestClient(app) as client:
        published = client.get("/openapi.json").json()
        page = client.get("/docs")
    validate(published)
    assert published == app.openapi()
    responses = published["paths"]["/orders/{order_id}"]["get"]["responses"]
    assert "422" not in responses  # the handlers are installed: it is the 400 request_invalid
    assert responses["200"]["content"]["application/json"]["schema"]["required"] == ["request_id", "data"]
    assert page.status_code == 200
    assert "swagger" in page.text.lower()


def test_openapi_refuses_operation_codes_the_catalogue_lacks() -> None:
    with pytest.raises(ValueError, match="resource_unmapped"):
        envelope_openapi(orders_app().openapi(), operation_codes={"get_order": ["resource_unmapped"]})


def test_openapi_keeps_a_routes_own_422_and_reads_int_status_keys() -> None:
    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "t", "version": "1"},
        "paths": {
            "/orders/{id}/cancel": {
                "post": {
                    "parameters": [
                        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        200: {
                            "description": "Cancelled.",
                            "content": {"text/json": {"schema": {"type": "object"}}},
                        },
                        206: {
                            "description": "Part.",
                            "content": {"application/json": {"schema": {"type": "string"}}},
                        },
                        "422": {"description": "The order cannot be cancelled any more."},
                    },
                }
            }
        },
    }
    result = envelope_openapi(document, validation_errors=True)
    responses = result["paths"]["/orders/{id}/cancel"]["post"]["responses"]
    assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorEnvelope4XX")
    assert "400" not in responses  # no validation answer was declared, so none is replaced
    # text/json is JSON to the middleware, which wraps it; a 206 passes untouched.
    assert responses[200]["content"]["text/json"]["schema"]["required"] == ["request_id", "data"]
    assert responses[206]["content"]["application/json"]["schema"] == {"type": "string"}


def test_openapi_a_trusted_request_id_is_any_id_the_middleware_lets_through() -> None:
    schema = envelope_openapi(orders_app().openapi(), trust_request_id=True)["components"]["schemas"][
        "RequestId"
    ]
    jsonschema.validate("trace-abc.123", schema)


def test_openapi_installing_twice_envelopes_once_and_reads_the_handlers_when_built() -> None:
    app = FastAPI()

    @app.get("/order", operation_id="order")
    async def order(page: int = 1) -> Order:
        return Order(id="o", total=page)

    install_fastapi_openapi(app)
    install_fastapi_openapi(app)
    install_fastapi_handlers(app)  # after: still seen, since the document is built on first use
    ok = app.openapi()["paths"]["/order"]["get"]["responses"]
    assert ok["200"]["content"]["application/json"]["schema"]["properties"]["data"] == {
        "$ref": "#/components/schemas/Order"
    }
    assert "422" not in ok
