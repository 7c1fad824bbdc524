"""The exception classes: one per catalogue code, plus ApiError for a gateway's own."""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta, timezone

import pytest

import envelope_middleware
from envelope_middleware import DEFAULT_CATALOGUE, ApiError, RateLimited, ResourceNotFound
from envelope_middleware.exceptions import _CatalogueError


def catalogue_classes() -> list[type[_CatalogueError]]:
    return [
        obj
        for name in envelope_middleware.__all__
        if isinstance(obj := getattr(envelope_middleware, name), type) and issubclass(obj, _CatalogueError)
    ]


def test_exceptions_export_one_class_per_catalogue_code() -> None:
    assert sorted(cls.spec.code for cls in catalogue_classes()) == sorted(DEFAULT_CATALOGUE)


@pytest.mark.parametrize("cls", catalogue_classes(), ids=lambda c: c.__name__)
def test_exceptions_take_code_status_and_default_message_from_the_catalogue(
    cls: type[_CatalogueError],
) -> None:
    exc = cls()
    spec = DEFAULT_CATALOGUE[exc.code]
    assert (exc.status, exc.message) == (spec.status, spec.message)
    assert isinstance(exc, ApiError)
    custom = cls("Order 9 is gone", details={"order_id": 9}, headers={"X-A": "1"})
    assert (custom.message, dict(custom.details), dict(custom.headers)) == (
        "Order 9 is gone",
        {"order_id": 9},
        {"X-A": "1"},
    )


def test_exceptions_api_error_keeps_its_fields_and_repr() -> None:
    exc = ApiError("menu_locked", "Menu is locked", status=423, details={"menu": 1})
    assert (exc.code, exc.message, exc.status, dict(exc.details), dict(exc.headers)) == (
        "menu_locked",
        "Menu is locked",
        423,
        {"menu": 1},
        {},
    )
    assert repr(exc) == "ApiError(code='menu_locked', message='Menu is locked', status=423)"
    assert str(ResourceNotFound("x")) == "x"


@pytest.mark.parametrize(
    ("code", "status", "match"),
    [("Bad Code", 400, "lower_snake_case"), ("ok_code", 200, "4xx or 5xx"), ("ok_code", 600, "4xx or 5xx")],
)
def test_exceptions_api_error_validates_code_and_status(code: str, status: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ApiError(code, "m", status=status)


@pytest.mark.parametrize(("retry_after", "header", "detail"), [(0, "0", 0), (1.01, "2", 2), (30, "30", 30)])
def test_exceptions_rate_limited_rounds_retry_after_up(retry_after: float, header: str, detail: int) -> None:
    exc = RateLimited(retry_after=retry_after)
    assert exc.headers["Retry-After"] == header
    assert exc.details["retry_after"] == detail


def test_exceptions_rate_limited_accepts_an_http_date() -> None:
    when = datetime(2026, 11, 27, 18, 0, 0, tzinfo=timezone(timedelta(hours=7)))
    exc = RateLimited(retry_after=when)
    assert exc.headers["Retry-After"] == "Fri, 27 Nov 2026 11:00:00 GMT"  # RFC 9110 §5.6.7 IMF-fixdate
    assert "retry_after" not in exc.details


@pytest.mark.parametrize("bad", [-1, float("inf"), float("nan"), datetime(2026, 1, 1)])  # noqa: DTZ001
def test_exceptions_rate_limited_rejects_unusable_retry_after(bad: float | datetime) -> None:
    with pytest.raises(ValueError, match="retry_after"):
        RateLimited(retry_after=bad)


def test_exceptions_rate_limited_without_retry_after_sends_no_header() -> None:
    exc = RateLimited(headers={"X-RateLimit-Limit": "100"})
    assert dict(exc.headers) == {"X-RateLimit-Limit": "100"}
    assert dict(exc.details) == {}


@pytest.mark.parametrize(
    ("message", "details", "match"),
    [(123, None, "message is a str"), ("m", [1, 2], "details are a mapping"), ("m", "text", "not str")],
)
def test_exceptions_api_error_refuses_a_message_or_details_the_envelope_cannot_carry(
    message: object, details: object, match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        ApiError("bad_input", message, status=400, details=details)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "error",
    [
        ApiError("teapot", "short and stout", status=418, details={"pot": 1}, headers=[("X-Tea", "1")]),
        ResourceNotFound("No order 9", details={"order_id": 9}),
        RateLimited(retry_after=5),
    ],
    ids=repr,
)
def test_exceptions_survive_a_pickle_round_trip(error: ApiError) -> None:
    # Process pools and task queues pickle exceptions; Exception's own way calls
    # type(error)(*error.args), which an ApiError's signature refuses.
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert type(copy) is type(error)
    assert (copy.code, copy.message, copy.status, copy.details, copy.headers) == (
        error.code,
        error.message,
        error.status,
        error.details,
        error.headers,
    )
    assert str(copy) == str(error)


def test_exceptions_rate_limited_retry_after_replaces_a_header_of_any_case() -> None:
    error = RateLimited(retry_after=5, headers=[("retry-after", "60"), ("X-RateLimit-Limit", "100")])
    assert dict(error.headers) == {"Retry-After": "5", "X-RateLimit-Limit": "100"}


@pytest.mark.parametrize("cls", catalogue_classes(), ids=lambda cls: cls.__name__)
def test_exceptions_catalogue_classes_say_their_code_in_help(cls: type[_CatalogueError]) -> None:
    assert cls.__doc__ is not None
    assert f"`{cls.spec.code}`" in cls.__doc__


def test_exceptions_api_error_reads_headers_given_as_pairs() -> None:
    error = ApiError("rate_limited", "slow down", status=429, headers=[("Retry-After", "5")])
    assert error.headers == {"Retry-After": "5"}
