"""The error catalogue as data, and the table in docs/errors.md rendered from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from envelope_middleware import DEFAULT_CATALOGUE, Catalogue, ErrorSpec
from envelope_middleware.catalogue import render_markdown_table

ISSUE_TABLE = {
    "request_invalid": 400,
    "request_missing_idempotency_key": 400,
    "auth_missing": 401,
    "auth_invalid_credential": 401,
    "auth_forbidden": 403,
    "resource_not_found": 404,
    "method_not_allowed": 405,
    "idempotency_key_conflict": 409,
    "state_invalid_transition": 422,
    "rate_limited": 429,
    "internal": 500,
    "downstream_unavailable": 502,
    "downstream_invalid_response": 502,
    "service_unavailable": 503,
    "downstream_timeout": 504,
}


def test_catalogue_holds_the_contract_codes_and_statuses() -> None:
    assert {code: spec.status for code, spec in DEFAULT_CATALOGUE.items()} == ISSUE_TABLE


def test_catalogue_marks_the_documented_retryable_codes() -> None:
    retryable = {code for code, spec in DEFAULT_CATALOGUE.items() if spec.retryable}
    assert retryable == {
        "rate_limited",
        "internal",
        "downstream_unavailable",
        "service_unavailable",
        "downstream_timeout",
    }


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "request_invalid"),
        (404, "resource_not_found"),
        (418, "request_invalid"),
        (502, "downstream_unavailable"),
        (507, "internal"),
    ],
)
def test_catalogue_for_status_falls_back_by_class(status: int, code: str) -> None:
    assert DEFAULT_CATALOGUE.for_status(status).code == code


def test_catalogue_extend_adds_codes_and_overrides_status_defaults() -> None:
    extended = DEFAULT_CATALOGUE.extend(
        [ErrorSpec("resource_unmapped", 404, "Unknown SKU.")], status_defaults={404: "resource_unmapped"}
    )
    assert extended["resource_unmapped"].status == 404
    assert extended.for_status(404).code == "resource_unmapped"
    assert DEFAULT_CATALOGUE.for_status(404).code == "resource_not_found"  # the default is untouched
    assert len(extended) == len(DEFAULT_CATALOGUE) + 1


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ErrorSpec("Not-Snake", 400, "m"), "lower_snake_case"),
        (lambda: ErrorSpec("fine", 200, "m"), "400 to 599"),
        (lambda: ErrorSpec("fine", 404.0, "m"), "400 to 599"),  # type: ignore[arg-type]
        (lambda: ErrorSpec("fine", status=True, message="m"), "400 to 599"),
        (lambda: ErrorSpec("fine", 404, None), "non-empty str"),  # type: ignore[arg-type]
        (lambda: ErrorSpec("fine", 404, ""), "non-empty str"),
        (lambda: DEFAULT_CATALOGUE.extend(status_defaults={409: "internal"}), "another class"),
        (lambda: DEFAULT_CATALOGUE.extend(status_defaults={503: "request_invalid"}), "another class"),
        (lambda: DEFAULT_CATALOGUE.extend(status_defaults={"409": "request_invalid"}), "int status"),  # type: ignore[dict-item]
        (lambda: DEFAULT_CATALOGUE.extend(status_defaults={200: "request_invalid"}), "int status"),
        (lambda: Catalogue([ErrorSpec("internal", 500, "m")]), "request_invalid"),
        (lambda: DEFAULT_CATALOGUE.extend([ErrorSpec("internal", 500, "again")]), "twice"),
        (lambda: DEFAULT_CATALOGUE.extend(status_defaults={409: "nope"}), "unknown code"),
    ],
)
def test_catalogue_rejects_invalid_definitions(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


def test_catalogue_docs_table_is_rendered_from_the_data() -> None:
    table = render_markdown_table(DEFAULT_CATALOGUE)
    assert table.splitlines()[0] == "| code | status | retryable | default message |"
    assert len(table.splitlines()) == 2 + len(DEFAULT_CATALOGUE)
    page = (Path(__file__).parent.parent / "docs" / "errors.md").read_text()
    # The whole table, on lines of its own, once: not a fragment of a longer or second table.
    assert f"\n\n{table}\n\n" in page, f"docs/errors.md's error table is stale; it should read:\n{table}"
    assert page.count("| code | status | retryable | default message |") == 1


def test_catalogue_repr_lists_its_codes() -> None:
    assert repr(Catalogue([ErrorSpec("request_invalid", 400, "m"), ErrorSpec("internal", 500, "m")])) == (
        "Catalogue(['request_invalid', 'internal'])"
    )
