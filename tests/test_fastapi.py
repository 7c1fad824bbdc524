"""FastAPI, an optional extra: validation errors, HTTPException and the envelope together."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any
from unittest.mock import ANY

import pytest
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from envelope_middleware import EnvelopeMiddleware, StateInvalidTransition
from envelope_middleware.fastapi import install_fastapi_handlers


class Availability(BaseModel):
    available: bool


def make_app(*, install: bool = True) -> FastAPI:
    app = FastAPI()
    app.add_middleware(EnvelopeMiddleware, access_log=False, exclude_paths=["/docs", "/openapi.json"])
    if install:
        install_fastapi_handlers(app)

    @app.get("/orders")
    async def orders(
        page: Annotated[int, Query(ge=1)] = 1, size: Annotated[int, Query(ge=1, le=100)] = 20
    ) -> dict[str, object]:
        return {"page": page, "size": size, "total": 0, "orders": []}

    @app.patch("/items/{item_id}/availability")
    async def availability(item_id: int, change: Availability) -> dict[str, object]:
        if item_id == 13:
            raise StateInvalidTransition("Item 13 is archived", details={"item_id": item_id})
        return {"id": item_id, "available": change.available}

    @app.get("/teapot")
    async def teapot() -> None:
        raise HTTPException(status_code=404, detail="No teapot here", headers={"X-Hint": "kettle"})

    return app


def test_fastapi_validation_error_is_400_request_invalid_with_fields() -> None:
    with TestClient(make_app()) as client:
        response = client.get("/orders", params={"page": 0, "size": "many"})
    assert response.status_code == 400
    document = response.json()
    assert document["request_id"] == response.headers["x-request-id"]
    error = document["error"]
    assert error["code"] == "request_invalid"
    fields = {(e["location"], e["field"]) for e in error["details"]["errors"]}
    assert fields == {("query", "page"), ("query", "size")}
    assert all(e["message"] and e["type"] for e in error["details"]["errors"])


def test_fastapi_validation_error_does_not_echo_the_input() -> None:
    with TestClient(make_app()) as client:
        response = client.patch("/items/1/availability", json={"available": "sup3r-s3cret"})
    assert response.status_code == 400
    assert "sup3r-s3cret" not in response.text
    assert response.json()["error"]["details"]["errors"][0]["field"] == "available"


def test_fastapi_body_is_enveloped_and_api_errors_pass_through() -> None:
    with TestClient(make_app()) as client:
        ok = client.patch("/items/7/availability", json={"available": False})
        locked = client.patch("/items/13/availability", json={"available": True})
    assert ok.json() == {"request_id": ok.headers["x-request-id"], "data": {"id": 7, "available": False}}
    assert locked.status_code == 422
    assert locked.json()["error"] == {
        "code": "state_invalid_transition",
        "message": "Item 13 is archived",
        "details": {"item_id": 13},
    }


def test_fastapi_lists_at_most_a_hundred_invalid_fields_and_counts_the_rest() -> None:
    app = make_app()

    @app.post("/bulk")
    async def bulk(items: list[Availability]) -> int:
        return len(items)  # pragma: no cover - never valid here

    with TestClient(app) as client:
        response = client.post("/bulk", json=[{"available": "maybe"}] * 600)
    error = response.json()["error"]
    # Listed in full, not cut at what the middleware reads of an error body.
    assert (response.status_code, error["code"]) == (400, "request_invalid")
    assert len(error["details"]["errors"]) == 100
    assert error["details"]["omitted_errors"] == 500
    assert error["details"]["errors"][99]["field"] == "99.available"


def test_fastapi_keeps_the_fields_of_a_validation_error_larger_than_an_error_body_is_read() -> None:
    app = make_app()

    @app.post("/counts")
    async def counts(counts: dict[str, int]) -> int:
        return len(counts)  # pragma: no cover - never valid here

    # Keys of 1000 characters: the listed field paths alone pass the 64 KiB an
    # error response's body is read up to; the error is handed over, not read.
    invalid = {f"{index:04d}" + "k" * 996: "many" for index in range(100)}
    with TestClient(app) as client:
        response = client.post("/counts", json=invalid)
    error = response.json()["error"]
    assert (response.status_code, error["code"]) == (400, "request_invalid")
    assert len(response.content) > 64 * 1024
    assert len(error["details"]["errors"]) == 100


def test_fastapi_a_body_that_is_not_json_names_no_field() -> None:
    with TestClient(make_app()) as client:
        response = client.patch(
            "/items/1/availability",
            content=b'{"available": tru',
            headers={"content-type": "application/json"},
        )
    [error] = response.json()["error"]["details"]["errors"]
    assert (error["location"], error["field"], error["type"]) == ("body", None, "json_invalid")


def test_fastapi_http_exception_keeps_message_and_headers() -> None:
    with TestClient(make_app()) as client:
        response = client.get("/teapot")
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "resource_not_found",
        "message": "No teapot here",
        "details": {},
    }
    assert response.headers["x-hint"] == "kettle"


def test_fastapi_excluded_docs_paths_serve_the_raw_openapi_spec() -> None:
    with TestClient(make_app()) as client:
        spec = client.get("/openapi.json")
    assert spec.status_code == 200
    assert "/orders" in spec.json()["paths"]  # not wrapped in data
    assert len(spec.headers["x-request-id"]) == 32


def test_fastapi_without_the_handlers_still_gives_a_contract_error() -> None:
    with TestClient(make_app(install=False)) as client:
        response = client.get("/orders", params={"page": 0})
    # FastAPI's own 422 is read as a validation error: the status stays, the code is
    # request_invalid (not 422's default), and the fields go to details without the input.
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "request_invalid"
    assert error["details"]["errors"] == [
        {"field": "page", "location": "query", "message": ANY, "type": "greater_than_equal"}
    ]
    assert "input" not in response.text


def test_fastapi_handlers_keep_the_body_limit_inside_the_envelope(logs: Any) -> None:
    # FastAPI(max_body_size=...) sits outside every add_middleware layer: a body
    # declared too large got a plain-text 413 with no request id (issue #12).
    app = FastAPI(max_body_size=10)

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    app.add_middleware(EnvelopeMiddleware)
    install_fastapi_handlers(app)

    def chunks() -> Iterator[bytes]:
        yield b"x" * 6
        yield b"x" * 6

    with TestClient(app) as client:
        declared = client.post("/upload", content=b"x" * 100)
        streamed = client.post("/upload", content=chunks())
        small = client.post("/upload", content=b"x" * 10)
    for answer in (declared, streamed):
        assert answer.status_code == 413
        document = answer.json()
        assert document["request_id"] == answer.headers["x-request-id"]
        assert document["error"]["code"] == "request_invalid"
    assert small.json()["data"] == {"size": 10}
    assert "exception_after_response_started" not in [entry["event"] for entry in logs.entries]


def test_fastapi_handlers_refuse_to_move_the_body_limit_once_the_app_serves() -> None:
    app = FastAPI(max_body_size=10)
    with TestClient(app) as client:
        client.get("/nowhere")  # the middleware stack is built
        with pytest.raises(RuntimeError, match="before the app serves"):
            install_fastapi_handlers(app)
