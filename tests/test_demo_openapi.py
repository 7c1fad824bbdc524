"""The reference gateway's published document (issue #12), proven by schemathesis against it running.

Schemathesis generates requests from the gateway's own `/openapi.json` and
checks every answer against the document: status code, content type, headers
and body schema. Each case is sent with full credentials, with none, and with
a credential lacking the scope. A check of this project's own adds that the
body's `request_id` is the header's. Seeded and bounded for CI.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from envelope_middleware.demo import CREDENTIALS, create_gateway
from tests._server import serve

FULL = (CREDENTIALS[0].partner_key, CREDENTIALS[0].secret)
READ_ONLY = (CREDENTIALS[1].partner_key, CREDENTIALS[1].secret)
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    with serve(create_gateway(timeout=0.5, access_log=False), lifespan="on") as url:
        yield url


def request_id_matches(response: Any) -> None:
    """Every answer carries one id, and an enveloped body carries the same."""
    ids = response.headers.get("x-request-id", [])  # schemathesis: lowercase names, lists of values
    header = ids[0] if ids else None
    assert header, "no X-Request-ID header"
    if response.headers.get("content-type", [""])[0].startswith("application/json"):
        body = response.json()
        assert body["request_id"] == header, (body.get("request_id"), header)


@pytest.mark.server
def test_demo_openapi_every_answer_is_what_the_document_says(gateway_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")
    results = list(schema.get_all_operations())
    # Every operation of the document loads: a broken one would be an Err here.
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results)
    assert len(operations) == 5

    # Valid requests, and requests the document says are invalid (bad bounds, missing
    # headers, wrong types): both must be answered as the document says.
    for operation, mode in itertools.product(operations, GenerationMode):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=15,
            derandomize=True,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        def answers_match(case: Any) -> None:
            for auth in (FULL, None, READ_ONLY):
                response = case.call(auth=auth) if auth else case.call()
                case.validate_response(response, checks=CHECKS)
                request_id_matches(response)

        answers_match()


@pytest.mark.server
def test_demo_openapi_is_served_outside_the_envelope_and_valid(gateway_url: str) -> None:
    response = httpx2.get(f"{gateway_url}/openapi.json")
    document = response.json()
    validate(document)
    assert "request_id" not in document  # the document itself is not enveloped
    assert set(document["paths"]) == {
        "/orders",
        "/orders/{order_id}",
        "/branches",
        "/brands",
        "/items/{item_id}/availability",
    }
    patch = document["paths"]["/items/{item_id}/availability"]["patch"]
    assert "Idempotency-Key" in [parameter["name"] for parameter in patch["parameters"]]
    assert {"409", "422", "4XX", "5XX"} <= set(patch["responses"])
    brands = document["paths"]["/brands"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert brands["properties"]["data"]["type"] == "array"  # the legacy outer array, kept


@pytest.mark.server
def test_demo_openapi_docs_page_lists_the_operations_with_no_network(
    gateway_url: str, tmp_path: Path
) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail(
            "chromium is needed: apt-get install chromium (scripts/test installs it when run as root)"
        )
    page = httpx2.get(f"{gateway_url}/docs")
    assert page.status_code == 200
    assert "x-request-id" in page.headers  # outside the envelope, not outside the contract's header
    assert "https://" not in page.text  # nothing from a CDN: the assets come from the package
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=15000",
    ]
    # The screenshot is kept with the test's temporary files, for a person to look at.
    shot = tmp_path / "docs.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1280,2000", f"{gateway_url}/docs"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 10_000
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", f"{gateway_url}/docs"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for path in ("/orders", "/orders/{order_id}", "/branches", "/brands", "/items/{item_id}/availability"):
        assert f'data-path="{path}"' in dom, path
    assert "Partner API (reference gateway)" in dom
