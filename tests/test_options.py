"""The constructor's checks.

From Options: all keyword-only, validated once when the middleware is built.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from envelope_middleware import EnvelopeMiddleware
from tests.conftest import scripted

pytestmark = pytest.mark.filterwarnings("error")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"exclude_paths": ["health"]}, "start with '/'"),
        ({"request_id_header": "Content-Length"}, "body header"),
        ({"max_validated_size": -1}, "max_validated_size"),
    ],
    ids=["relative-path", "body-header", "negative-size"],
)
def test_envelope_refuses_an_invalid_option_before_it_answers_a_request(
    options: dict[str, Any], message: str
) -> None:
    async def order(request: Request) -> Response:
        return JSONResponse({"id": "ord_1"})

    app = Starlette(routes=[Route("/", order)], middleware=[Middleware(EnvelopeMiddleware, **options)])
    client = TestClient(app)
    # Starlette builds its middleware when the first request (or the lifespan) comes.
    with pytest.raises(ValueError, match=message):
        client.get("/")


def test_envelope_rejects_relative_excluded_paths() -> None:
    with pytest.raises(ValueError, match="start with '/'"):
        EnvelopeMiddleware(scripted(), exclude_paths=["health"])


def test_envelope_rejects_an_invalid_header_name() -> None:
    with pytest.raises(ValueError, match="header name"):
        EnvelopeMiddleware(scripted(), request_id_header="X Request\r\nID")


@pytest.mark.parametrize("name", ["ETag", "content-length"])
def test_envelope_rejects_a_body_header_as_the_id_header(name: str) -> None:
    with pytest.raises(ValueError, match="body header"):
        EnvelopeMiddleware(scripted(), request_id_header=name)


@pytest.mark.parametrize("key", [42, None, ValueError()])
def test_envelope_refuses_exception_codes_keyed_by_what_is_no_exception_type(key: object) -> None:
    with pytest.raises(TypeError, match="exception types"):
        EnvelopeMiddleware(scripted(), exception_codes={key: "internal"})


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ("LedgerDown", "names no module"),
        ("json.NoSuchError", "names nothing that can be found"),
        ("json..JSONDecodeError", "names nothing that can be found"),
        ("email.no_such_module.Error", "names nothing that can be found"),
    ],
)
def test_envelope_refuses_exception_codes_names_that_can_match_nothing(key: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        EnvelopeMiddleware(scripted(), exception_codes={key: "internal"})


def test_envelope_refuses_exception_codes_names_of_what_is_no_exception_class() -> None:
    with pytest.raises(TypeError, match="not an exception class"):
        EnvelopeMiddleware(scripted(), exception_codes={"json.loads": "internal"})


def test_envelope_refuses_exception_codes_names_in_modules_that_cannot_be_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ledger_errors.py").write_text("import not_installed_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="cannot be imported"):
        EnvelopeMiddleware(scripted(), exception_codes={"ledger_errors.LedgerDown": "internal"})


def test_envelope_takes_exception_codes_names_of_packages_not_installed() -> None:
    # A shared mapping may name a client library this gateway does not use.
    EnvelopeMiddleware(scripted(), exception_codes={"not_installed_here.LedgerDown": "internal"})


def test_envelope_rejects_exception_codes_outside_the_catalogue() -> None:
    with pytest.raises(ValueError, match="not in the catalogue"):
        EnvelopeMiddleware(scripted(), exception_codes={ValueError: "no_such_code"})


def test_envelope_refuses_a_negative_max_validated_size() -> None:
    with pytest.raises(ValueError, match="max_validated_size"):
        EnvelopeMiddleware(scripted(), max_validated_size=-1)


@pytest.mark.parametrize("size", [1.5, float("nan"), "1024"])
def test_envelope_refuses_a_max_validated_size_that_is_not_an_int(size: Any) -> None:
    # The compiled build refuses it by its annotation, in mypyc's words.
    with pytest.raises(TypeError, match=r"max_validated_size|int or None object expected"):
        EnvelopeMiddleware(scripted(), max_validated_size=size)


@pytest.mark.parametrize("option", ["trust_request_id", "validate_json", "access_log", "bind_contextvars"])
@pytest.mark.parametrize("value", [0, 1, None, "yes"])
def test_envelope_refuses_a_flag_that_is_not_a_bool(option: str, value: Any) -> None:
    # The compiled build refuses it by its annotation, in mypyc's words.
    with pytest.raises(TypeError, match=rf"{option} is True or False|bool object expected"):
        EnvelopeMiddleware(scripted(), **{option: value})


def test_envelope_refuses_a_stdlib_logger_it_could_not_call() -> None:
    stdlib = logging.getLogger("gateway")
    for logger in (stdlib, logging.LoggerAdapter(stdlib)):
        with pytest.raises(TypeError, match="structlog logger"):
            # The type the option refuses at run time, which mypy refuses too.
            EnvelopeMiddleware(scripted(), logger=logger)  # type: ignore[arg-type]
