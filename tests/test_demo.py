"""The reference gateway (issue #3): every route and error path, in process and over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any
from urllib.parse import quote

import httpx2
import orjson
import pytest
import uvicorn
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from envelope_middleware.demo import CREDENTIALS, create_backends, create_gateway
from envelope_middleware.demo import __main__ as demo_main
from envelope_middleware.demo import backends as backends_module
from envelope_middleware.demo.__main__ import Options, app_from_environment, banner, build, parse_args
from envelope_middleware.demo.data import ARCHIVED_ITEM_EVERY, generate
from tests._server import serve
from tests.conftest import call

FULL = (CREDENTIALS[0].partner_key, CREDENTIALS[0].secret)
READ_ONLY = (CREDENTIALS[1].partner_key, CREDENTIALS[1].secret)
HEX = re.compile(r"[0-9a-f]{32}")
JSON_TYPE = (b"content-type", b"application/json")


class Recorder:
    """Wraps a backend to record the X-Request-ID each call carried."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[str | None] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            ids = [v.decode() for k, v in scope["headers"] if k == b"x-request-id"]
            self.seen.append(ids[0] if len(ids) == 1 else None)
        await self.app(scope, receive, send)


@pytest.fixture(scope="module", params=["in-process", "real-http"])
def gateway_server(request: pytest.FixtureRequest) -> Iterator[tuple[httpx2.Client, dict[str, Recorder]]]:
    """One gateway per mode for the module: starting four uvicorn servers per test is slow."""
    recorders = {name: Recorder(app) for name, app in create_backends().items()}
    with ExitStack() as stack, pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends_module, "SLOW_SECONDS", 0.8)
        if request.param == "in-process":
            app = create_gateway(recorders, timeout=0.3, access_log=False)
            client: httpx2.Client = stack.enter_context(TestClient(app))
        else:
            urls = {name: stack.enter_context(serve(app)) for name, app in recorders.items()}
            gateway_app = create_gateway(urls, timeout=0.3, access_log=False)
            base = stack.enter_context(serve(gateway_app, lifespan="on"))
            client = stack.enter_context(httpx2.Client(base_url=base))
        yield client, recorders


@pytest.fixture
def gateway(
    gateway_server: tuple[httpx2.Client, dict[str, Recorder]],
) -> tuple[httpx2.Client, dict[str, Recorder]]:
    for recorder in gateway_server[1].values():
        recorder.seen.clear()
    return gateway_server


def fresh_key() -> dict[str, str]:
    """A new Idempotency-Key: the gateway's writes require one (issue #10)."""
    return {"Idempotency-Key": uuid.uuid4().hex}


def check_envelope(response: httpx2.Response) -> dict[str, Any]:
    document: dict[str, Any] = response.json()
    assert HEX.fullmatch(response.headers["x-request-id"])
    assert document["request_id"] == response.headers["x-request-id"]
    if response.is_success:
        assert set(document) == {"request_id", "data"}
    else:
        assert set(document) == {"request_id", "error"}
        assert set(document["error"]) == {"code", "message", "details"}
    return document


def error_of(response: httpx2.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = check_envelope(response)["error"]
    assert error["code"] == code
    return error


# -- success routes keep each service's shape ---------------------------------


def test_demo_orders_page_lives_under_data_orders(gateway: Any) -> None:
    client, recorders = gateway
    response = client.get("/orders", params={"page": 2, "size": 3}, auth=FULL)
    data = check_envelope(response)["data"]
    assert (data["page"], data["size"], data["total"]) == (2, 3, 600)
    expected = generate().orders[3:6]
    assert data["orders"] == expected
    assert all(order["items"] and order["total"] > 0 for order in data["orders"])
    assert recorders["orders"].seen == [response.headers["x-request-id"]]


def test_demo_orders_are_byte_for_byte_what_the_service_sent(gateway: Any) -> None:
    client, _ = gateway
    response = client.get("/orders", params={"size": 5}, auth=FULL)
    with TestClient(create_backends()["orders"]) as backend:
        direct = backend.get("/orders", params={"page": 1, "size": 5})
    prefix = b'{"request_id":"' + response.headers["x-request-id"].encode() + b'","data":'
    assert response.content == prefix + direct.content + b"}"


def test_demo_orders_filter_by_brand_and_branch_together(gateway: Any) -> None:
    client, _ = gateway
    order = generate().orders[0]
    params = {"brand_id": order["brand_id"], "branch_id": order["branch_id"], "size": 100}
    data = check_envelope(client.get("/orders", params=params, auth=FULL))["data"]
    assert data["orders"]
    assert {(o["brand_id"], o["branch_id"]) for o in data["orders"]} == {
        (order["brand_id"], order["branch_id"])
    }


def test_demo_order_by_id(gateway: Any) -> None:
    client, _ = gateway
    assert check_envelope(client.get("/orders/ord_00042", auth=FULL))["data"]["id"] == "ord_00042"


def test_demo_branches_page_lives_under_data_results(gateway: Any) -> None:
    client, recorders = gateway
    response = client.get("/branches", params={"size": 4}, auth=FULL)
    data = check_envelope(response)["data"]
    assert set(data) == {"page", "size", "total", "results"}
    assert len(data["results"]) == 4
    assert recorders["branches"].seen == [response.headers["x-request-id"]]


def test_demo_brands_page_lives_under_data_0_brands(gateway: Any) -> None:
    client, _ = gateway
    data = check_envelope(client.get("/brands", params={"page": 2, "size": 10}, auth=FULL))["data"]
    assert isinstance(data, list)
    assert len(data) == 1
    assert (data[0]["page"], data[0]["size"], data[0]["total"]) == (2, 10, 24)
    assert [b["id"] for b in data[0]["brands"]] == list(range(11, 21))


def test_demo_item_availability_changes(gateway: Any) -> None:
    client, recorders = gateway
    response = client.patch(
        "/items/1/availability", json={"available": False}, headers=fresh_key(), auth=FULL
    )
    assert check_envelope(response)["data"]["status"] == "out_of_stock"
    assert recorders["brands"].seen == [response.headers["x-request-id"]]


def test_demo_health_is_excluded_from_the_envelope(gateway: Any) -> None:
    client, _ = gateway
    response = client.get("/health")
    assert response.json() == {"status": "ok"}
    assert HEX.fullmatch(response.headers["x-request-id"])


@pytest.mark.parametrize("path", ["/health/deep", "/orders/", "/brands/"])
def test_demo_unknown_paths_near_known_ones_are_enveloped_404s(gateway: Any, path: str) -> None:
    client, _ = gateway
    # No redirect to a Location built from the client's Host header.
    response = client.get(path, auth=FULL, headers={"host": "evil.example"})
    error_of(response, 404, "resource_not_found")
    assert "location" not in response.headers


def test_demo_head_is_answered_from_the_backend_document_a_get_reads(gateway: Any) -> None:
    client, _ = gateway
    head = client.head("/orders", params={"size": 2}, auth=FULL)
    get = client.get("/orders", params={"size": 2}, auth=FULL)
    assert head.status_code == 200
    assert head.content == b""
    # The length of the envelope a GET gets (RFC 9110 §8.6).
    assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))


def test_demo_head_of_a_malformed_backend_document_is_502_like_get(gateway: Any) -> None:
    client, _ = gateway
    head = client.head("/orders/ord_garbled", auth=FULL)
    assert head.status_code == 502
    assert head.content == b""


# -- gateway-side errors --------------------------------------------------------


def test_demo_missing_credentials_are_auth_missing(gateway: Any) -> None:
    client, recorders = gateway
    response = client.get("/orders")
    error_of(response, 401, "auth_missing")
    assert response.headers["www-authenticate"] == 'Basic realm="partner-api"'
    assert recorders["orders"].seen == []


@pytest.mark.parametrize(
    "header",
    ["Bearer abc", "Basic not-base64!", "Basic " + base64.b64encode(b"no-colon").decode(), "Basic"],
)
def test_demo_malformed_credentials_are_auth_missing(gateway: Any, header: str) -> None:
    client, _ = gateway
    error_of(client.get("/orders", headers={"Authorization": header}), 401, "auth_missing")


@pytest.mark.parametrize("auth", [("demo_partner", "wrong"), ("nobody", "demo_secret")])
def test_demo_wrong_credentials_are_auth_invalid_credential(gateway: Any, auth: tuple[str, str]) -> None:
    client, _ = gateway
    error_of(client.get("/orders", auth=auth), 401, "auth_invalid_credential")


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/brands", "brands:read"),
        ("GET", "/branches", "brands:read"),
        ("PATCH", "/items/1/availability", "menus:oos"),
    ],
)
def test_demo_missing_scope_is_auth_forbidden(gateway: Any, method: str, path: str, scope: str) -> None:
    client, _ = gateway
    response = client.request(method, path, json={"available": True}, headers=fresh_key(), auth=READ_ONLY)
    error = error_of(response, 403, "auth_forbidden")
    assert error["details"]["required_scope"] == scope


@pytest.mark.parametrize(
    ("params", "fields"),
    [
        ({"page": "0"}, {"page"}),
        ({"size": "101"}, {"size"}),
        ({"size": "ten", "page": "-1"}, {"size", "page"}),
        ({"brand_id": "x", "branch_id": "2"}, {"brand_id"}),
    ],
)
def test_demo_invalid_query_is_request_invalid_with_fields(
    gateway: Any, params: dict[str, str], fields: set[str]
) -> None:
    client, recorders = gateway
    error = error_of(client.get("/orders", params=params, auth=FULL), 400, "request_invalid")
    assert {e["field"] for e in error["details"]["errors"]} == fields
    assert recorders["orders"].seen == []


@pytest.mark.parametrize("given", ["brand_id", "branch_id"])
def test_demo_brand_and_branch_must_come_together(gateway: Any, given: str) -> None:
    client, _ = gateway
    error = error_of(client.get("/orders", params={given: 1}, auth=FULL), 400, "request_invalid")
    assert error["message"] == "brand_id and branch_id must be passed together or omitted together"


@pytest.mark.parametrize("content", [b"not json", b'{"available": "yes"}', b"[]"])
def test_demo_invalid_patch_body_is_request_invalid(gateway: Any, content: bytes) -> None:
    client, _ = gateway
    error_of(
        client.patch("/items/1/availability", content=content, headers=fresh_key(), auth=FULL),
        400,
        "request_invalid",
    )


def test_demo_unknown_routes_and_methods(gateway: Any) -> None:
    client, _ = gateway
    error_of(client.get("/menus", auth=FULL), 404, "resource_not_found")
    response = client.delete("/orders", auth=FULL)
    error_of(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]


# -- backend errors, each in its service's own style -----------------------------


def test_demo_order_not_found_keeps_the_service_message(gateway: Any) -> None:
    client, _ = gateway
    error = error_of(client.get("/orders/ord_99999", auth=FULL), 404, "resource_not_found")
    assert error["message"] == "Order ord_99999 not found"


def test_demo_archived_item_is_state_invalid_transition(gateway: Any) -> None:
    client, _ = gateway
    response = client.patch(
        f"/items/{ARCHIVED_ITEM_EVERY}/availability", json={"available": True}, headers=fresh_key(), auth=FULL
    )
    error = error_of(response, 422, "state_invalid_transition")
    assert error["details"] == {"item_id": ARCHIVED_ITEM_EVERY, "from": "archived"}


@pytest.mark.parametrize("item_id", ["9999", "0"])
def test_demo_unknown_item_is_resource_unmapped(gateway: Any, item_id: str) -> None:
    # The brands service answers problem+json for 9999; the others never reach it.
    client, _ = gateway
    error = error_of(
        client.patch(
            f"/items/{item_id}/availability", json={"available": True}, headers=fresh_key(), auth=FULL
        ),
        404,
        "resource_unmapped",
    )
    assert error["details"] == {"item_id": item_id}


@pytest.mark.parametrize("item_id", ["abc", "1" * 13, "9" * 5000, "1e3"])
def test_demo_a_path_that_is_no_item_id_is_not_echoed(gateway: Any, item_id: str) -> None:
    client, _ = gateway
    response = client.patch(
        f"/items/{item_id}/availability", json={"available": True}, headers=fresh_key(), auth=FULL
    )
    error = error_of(response, 404, "resource_unmapped")
    assert error["details"] == {}
    # Not the whole body: a random request id may hold "abc" or "1e3" by chance.
    assert item_id not in error["message"]


def test_demo_two_authorization_headers_are_auth_missing(gateway: Any) -> None:
    client, recorders = gateway
    good = "Basic " + base64.b64encode(b"%s:%s" % (FULL[0].encode(), FULL[1].encode())).decode()
    bad = "Basic " + base64.b64encode(b"foo:bar").decode()
    for pair in ([good, bad], [bad, good], [good, good]):
        response = client.get("/orders", headers=[("authorization", value) for value in pair])
        error_of(response, 401, "auth_missing")
    assert recorders["orders"].seen == []


@pytest.mark.parametrize("mode", ["in-process", "real-http"])
def test_demo_backend_cookies_do_not_follow_other_partners(mode: str) -> None:
    cookies_seen: list[str | None] = []

    async def orders(scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        cookies_seen.append(headers[b"cookie"].decode() if b"cookie" in headers else None)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [JSON_TYPE, (b"set-cookie", b"affinity=node-3; Path=/")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"orders": []}'})

    with ExitStack() as stack:
        target: Any = orders if mode == "in-process" else stack.enter_context(serve(orders))
        app = create_gateway({**create_backends(), "orders": target}, access_log=False)
        client = stack.enter_context(TestClient(app))
        for auth in (FULL, READ_ONLY):
            check_envelope(client.get("/orders", auth=auth))
    assert cookies_seen == [None, None]


def test_demo_plain_text_500_leaks_nothing(gateway: Any) -> None:
    client, _ = gateway
    response = client.get("/orders/ord_crash", auth=FULL)
    error_of(response, 500, "internal")
    for leak in ("Traceback", "orders-db-2", "psycopg", "5432"):
        assert leak not in response.text


def test_demo_slow_backend_is_downstream_timeout(gateway: Any) -> None:
    client, _ = gateway
    error_of(client.get("/orders/ord_slow", auth=FULL), 504, "downstream_timeout")


def test_demo_malformed_backend_json_is_downstream_invalid_response(gateway: Any) -> None:
    client, _ = gateway
    response = client.get("/orders/ord_garbled", auth=FULL)
    error_of(response, 502, "downstream_invalid_response")
    assert "ord_garbled" not in response.text


def test_demo_branches_filter_by_brand(gateway: Any) -> None:
    client, _ = gateway
    data = check_envelope(client.get("/branches", params={"brand_id": 3, "size": 100}, auth=FULL))["data"]
    assert data["results"]
    assert {b["brand_id"] for b in data["results"]} == {3}


def test_demo_branch_errors_in_error_object_style_keep_their_message(gateway: Any) -> None:
    client, _ = gateway
    error = error_of(client.get("/branches", params={"brand_id": 999}, auth=FULL), 404, "resource_not_found")
    assert error["message"] == "No branches for this brand"


def test_demo_unreachable_backend_is_downstream_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backends: dict[str, Any] = dict(create_backends())
    backends["orders"] = f"http://127.0.0.1:{port}"
    with TestClient(create_gateway(backends, access_log=False)) as client:
        response = client.get("/orders", auth=FULL)
    error = error_of(response, 502, "downstream_unavailable")
    assert str(port) not in error["message"]


def test_demo_backend_calls_ignore_the_environments_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    # A proxy setting meant for something else on the host: backends are reached directly.
    monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with serve(create_backends()["orders"]) as url:
        backends: dict[str, Any] = {**create_backends(), "orders": url}
        with TestClient(create_gateway(backends, access_log=False)) as client:
            response = client.get("/orders", params={"size": 1}, auth=FULL)
    assert len(check_envelope(response)["data"]["orders"]) == 1


def test_demo_gateway_requires_all_three_backends() -> None:
    with pytest.raises(ValueError, match="brands"):
        create_gateway({"orders": "http://a", "branches": "http://b"})


def test_demo_default_gateway_embeds_the_demo_backends() -> None:
    with TestClient(create_gateway(access_log=False)) as client:
        assert client.get("/brands", auth=FULL).json()["data"][0]["total"] == 24


# -- the command line ---------------------------------------------------------------


def test_demo_cli_parses_backends_and_rejects_bad_combinations(capsys: pytest.CaptureFixture[str]) -> None:
    options = parse_args(
        ["--backend", "orders=http://127.0.0.1:9001", "--port", "8100", "--trusted", "--timeout", "0.5"]
    )
    assert options.backends == {"orders": "http://127.0.0.1:9001"}
    assert (options.port, options.trusted, options.timeout) == (8100, True, 0.5)
    for argv in (
        ["--backend", "payments=http://x"],
        ["--backend", "orders"],
        ["--backend", "orders=http://"],
        ["--backend", "orders=http://127.0.0.1:1,branches=http://x"],
        ["--backend", "orders=http://h/?"],
        ["--backend", "orders=http://h/#top"],
        ["--backend", "orders=http://127.0.0.1:99999"],
        ["--backend", "orders=http://h:0"],
        ["--backend", "orders=http://ho st"],
        ["--serve-backends", "--backend", "orders=http://x"],
        ["--serve-backends", "--workers", "2"],
        ["--serve-backends", "--port", "9002"],
        ["--serve-backends", "--backend-port", "65534"],
        ["--port", "70000"],
        ["--port", "-5"],
        ["--workers", "0"],
        ["--timeout", "-1"],
        ["--timeout", "nan"],
        ["--workers", "2"],  # the embedded store would let another worker run a retry again
        ["--redis-url", "http://127.0.0.1:6379"],
        ["--idempotency-lease", "1", "--timeout", "1"],
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
    errors = capsys.readouterr().err
    assert "--backend" in errors
    assert "--workers needs --redis-url" in errors
    assert parse_args(["--idempotency-max-entries", "50"]).idempotency_max_entries == 50
    options = parse_args(
        ["--workers", "2", "--redis-url", "redis://127.0.0.1:6390/1", "--idempotency-lease", "5"]
    )
    assert (options.workers, options.redis_url, options.idempotency_lease) == (
        2,
        "redis://127.0.0.1:6390/1",
        5.0,
    )


def test_demo_cli_banner_names_credentials_and_curl_lines() -> None:
    text = banner(Options(port=8100))
    assert "demo_partner:demo_secret" in text
    assert "demo_writer:writer_secret (orders:read, menus:oos)" in text
    assert "idempotency store: embedded (this process)" in text
    assert "Idempotency-Key: k1" in text
    assert "idempotency store: Redis at redis://h:1/0" in banner(Options(redis_url="redis://h:1/0"))
    secret = banner(Options(redis_url="redis://user:s3cret@h:1/0"))
    assert "s3cret" not in secret
    assert "redis://user:***@h:1/0" in secret
    assert text.count("curl ") >= 8
    assert "orders=in-process" in text
    assert "ord_garbled   # 502 downstream_invalid_response" in text
    assert "ord_garbled   # 200 with the broken body" in banner(Options(trusted=True))


def test_demo_cli_builds_a_gateway_from_options_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(build(Options(request_id_format="prefixed_uuid", access_log=False))) as client:
        assert client.get("/health").headers["x-request-id"].startswith("req_")
    recorder = Recorder(create_backends()["orders"])
    with serve(recorder) as orders_url:
        monkeypatch.setenv("ENVELOPE_DEMO_BACKENDS", f"orders={orders_url}")
        monkeypatch.setenv("ENVELOPE_DEMO_BACKENDS_ACCESS_LOG", "0")
        with TestClient(app_from_environment()) as client:
            response = client.get("/orders", auth=FULL)
    assert response.status_code == 200
    assert recorder.seen == [response.headers["x-request-id"]]  # reached over HTTP


def _orders_backend_page(size: int) -> bytes:
    """What the orders service itself answers for the first page of `size` orders."""
    with TestClient(create_backends()["orders"]) as backend:
        response = backend.get("/orders", params={"page": 1, "size": size})
    assert response.status_code == 200
    return response.content


@pytest.mark.parametrize("enveloped", [True, False], ids=["envelope", "no-envelope"])
def test_demo_cli_no_envelope_serves_the_backends_own_json(enveloped: bool) -> None:
    options = parse_args(["--no-access-log"] if enveloped else ["--no-access-log", "--no-envelope"])
    assert options.envelope is enveloped
    with TestClient(build(options)) as client:
        response = client.get("/orders", params={"size": 2}, auth=FULL)
    assert response.status_code == 200
    own = _orders_backend_page(2)
    if enveloped:
        assert check_envelope(response)["data"] == orjson.loads(own)
    else:
        assert response.content == own  # byte for byte: no request_id, no data wrapping
        assert "x-request-id" not in response.headers


def test_demo_cli_hands_no_envelope_to_each_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    # main() writes the hand-over into os.environ; setting each key first makes
    # monkeypatch remove them again after the test.
    for suffix in (
        "",
        "_TIMEOUT",
        "_TRUSTED",
        "_ACCESS_LOG",
        "_ENVELOPE",
        "_HTTP_CLIENT",
        "_REQUEST_ID_FORMAT",
        "_REDIS_URL",
        "_IDEMPOTENCY_LEASE",
    ):
        monkeypatch.setenv(f"ENVELOPE_DEMO_BACKENDS{suffix}", "")
    started: list[str] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: started.append(app))
    argv = [
        "--workers",
        "2",
        "--redis-url",
        "redis://127.0.0.1:6390/0",
        "--no-envelope",
        "--http-client",
        "httpx2",
    ]
    assert demo_main.main(argv) == 0
    assert started == ["envelope_middleware.demo.__main__:app_from_environment"]
    assert os.environ["ENVELOPE_DEMO_BACKENDS_ENVELOPE"] == "0"
    assert os.environ["ENVELOPE_DEMO_BACKENDS_HTTP_CLIENT"] == "httpx2"
    # What a worker builds from that environment, on the embedded store (no Redis here).
    monkeypatch.setenv("ENVELOPE_DEMO_BACKENDS_REDIS_URL", "")
    with TestClient(app_from_environment()) as client:
        response = client.get("/orders", params={"size": 2}, auth=FULL)
    assert response.status_code == 200
    assert response.content == _orders_backend_page(2)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _free_port_run(count: int) -> int:
    """The first of `count` consecutive loopback ports free now (--serve-backends takes three)."""
    while True:
        first = _free_port()
        with ExitStack() as held:
            try:
                for port in range(first, first + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except (OSError, OverflowError):  # taken, or past the last port
                continue
        return first


@pytest.mark.server
@pytest.mark.parametrize(
    "extra",
    [[], ["--serve-backends"], ["--workers", "2", "--redis-url"]],
    ids=["embedded", "own-ports", "workers"],
)
def test_demo_cli_serves_the_gateway_over_real_http(extra: list[str], request: pytest.FixtureRequest) -> None:
    if extra and extra[-1] == "--redis-url":
        extra = [*extra, request.getfixturevalue("redis_server").url]
    backend_port = _free_port_run(3)
    port = _free_port()
    while backend_port <= port < backend_port + 3:
        port = _free_port()
    argv = [
        sys.executable,
        "-m",
        "envelope_middleware.demo",
        "--port",
        str(port),
        "--backend-port",
        str(backend_port),
    ]
    process = subprocess.Popen(
        [*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ}
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx2.get(f"http://127.0.0.1:{port}/orders?size=1", auth=FULL)
                break
            except httpx2.TransportError:
                assert process.poll() is None, "the demo exited early"
                assert time.monotonic() < deadline, "the demo did not start"
                time.sleep(0.2)
        assert response.json()["data"]["orders"][0]["id"] == "ord_00001"
        # The gateway has no WebSocket routes: a request asking to upgrade is
        # answered as plain HTTP, under the contract, not refused with a bare 403.
        upgrade = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        }
        refused = httpx2.get(f"http://127.0.0.1:{port}/orders", headers=upgrade)
        error = error_of(refused, 401, "auth_missing")
        assert error["message"]
        answered = httpx2.get(f"http://127.0.0.1:{port}/orders?size=1", headers=upgrade, auth=FULL)
        assert check_envelope(answered)["data"]["orders"][0]["id"] == "ord_00001"
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert b"Traceback" not in output
    lines = output.decode().splitlines()
    assert any("curl" in line for line in lines)
    access = [orjson.loads(line) for line in lines if '"event":"http_request"' in line]
    assert access
    assert access[0]["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("value", ["²", "①", "1.5", "-3"])
def test_demo_non_ascii_or_non_integer_paging_is_request_invalid(gateway: Any, value: str) -> None:
    client, _ = gateway
    error_of(client.get("/orders", params={"page": value}, auth=FULL), 400, "request_invalid")


@pytest.mark.parametrize("order_id", ["a.b", "x?size=100000", "ord 1", "a" * 65])
def test_demo_order_ids_cannot_reshape_the_backend_url(gateway: Any, order_id: str) -> None:
    client, recorders = gateway
    response = client.get(f"/orders/{quote(order_id, safe='')}", auth=FULL)
    error_of(response, 404, "resource_not_found")
    assert recorders["orders"].seen == []


def test_demo_non_ascii_authorization_is_auth_missing(gateway: Any) -> None:
    client, _ = gateway
    error_of(client.get("/orders", headers={"Authorization": b"Basic \xe9"}), 401, "auth_missing")


def test_demo_huge_numbers_are_client_errors_not_crashes(gateway: Any) -> None:
    client, recorders = gateway
    error_of(client.get("/orders", params={"page": "1" * 5000}, auth=FULL), 400, "request_invalid")
    response = client.patch(
        "/items/" + "1" * 5000 + "/availability", json={"available": True}, headers=fresh_key(), auth=FULL
    )
    error_of(response, 404, "resource_unmapped")
    assert recorders["brands"].seen == []


def test_demo_workers_keep_the_request_id_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVELOPE_DEMO_BACKENDS_REQUEST_ID_FORMAT", "prefixed_uuid")
    monkeypatch.setenv("ENVELOPE_DEMO_BACKENDS_ACCESS_LOG", "0")
    with TestClient(app_from_environment()) as client:
        assert client.get("/health").headers["x-request-id"].startswith("req_")


# -- backends that answer what the partner API does not relay ---------------------


def test_demo_backend_answers_outside_the_api_are_not_relayed(logs: Any) -> None:
    async def odd_orders(scope: Scope, receive: Receive, send: Send) -> None:
        status, content_type, payload = {
            "/orders/page": (200, b"text/html", b"<html>orders-7.internal maintenance</html>"),
            "/orders/untyped": (200, None, b'{"id": "x"}'),
            "/orders/moved": (302, b"text/html", b"<a href=http://orders-7.internal/>moved</a>"),
            "/orders/partial": (206, b"application/json", b'{"id": "x"}'),
            "/orders/refused": (401, b"application/json", b'{"detail": "token expired for svc-gateway"}'),
            "/orders/forbidden": (403, b"application/json", b'{"detail": "svc-gateway lacks orders:write"}'),
        }[scope["path"]]
        headers = [(b"location", b"http://orders-7.internal/")] if status == 302 else []
        if content_type is not None:
            headers.append((b"content-type", content_type))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    backends: dict[str, Any] = {**create_backends(), "orders": odd_orders}
    with TestClient(create_gateway(backends, access_log=False)) as client:
        for order_id, status, code in [
            ("page", 502, "downstream_invalid_response"),
            ("untyped", 502, "downstream_invalid_response"),
            ("moved", 502, "downstream_invalid_response"),
            ("partial", 502, "downstream_invalid_response"),
            ("refused", 502, "downstream_unavailable"),
            ("forbidden", 502, "downstream_unavailable"),
        ]:
            response = client.get(f"/orders/{order_id}", auth=FULL)
            error_of(response, status, code)
            assert "internal" not in response.text
            assert "svc-gateway" not in response.text
            assert "location" not in response.headers
    events = [e["event"] for e in logs.entries]
    assert events.count("downstream_unexpected_response") == 4
    assert events.count("downstream_refused_gateway") == 2


def test_demo_availability_body_is_bounded_and_only_its_field_is_forwarded() -> None:
    seen: list[bytes] = []

    async def brands(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        seen.append(message.get("body", b""))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    backends: dict[str, Any] = {**create_backends(), "brands": brands}
    with TestClient(create_gateway(backends, access_log=False)) as client:
        change = {"available": False, "business_id": "someone-else", "note": "x"}
        response = client.patch("/items/3/availability", json=change, headers=fresh_key(), auth=FULL)
        assert check_envelope(response)["data"] == {"ok": True}
        assert [orjson.loads(body) for body in seen] == [{"available": False}]
        big = b'{"available": true, "pad": "' + b"x" * 20_000 + b'"}'
        for extra in ({}, {"transfer-encoding": "chunked"}):
            response = client.patch(
                "/items/3/availability", content=iter([big]) if extra else big, headers=fresh_key(), auth=FULL
            )
            error = error_of(response, 413, "request_invalid")
            assert error["details"] == {"max_bytes": 16 * 1024}
        assert len(seen) == 1
    # A Content-Length too long for int() is too large, not a crash.
    credentials = base64.b64encode(b"demo_partner:demo_secret")
    headers = [
        (b"authorization", b"Basic " + credentials),
        (b"content-length", b"9" * 5000),
        (b"idempotency-key", b"k"),
    ]
    sent = asyncio.run(call(create_gateway(backends), "PATCH", "/items/3/availability", headers))
    assert (sent.status, sent.json()["error"]["code"]) == (413, "request_invalid")


def test_demo_a_content_length_with_leading_zeros_is_its_number(gateway: Any) -> None:
    # RFC 9110 §8.6: 1*DIGIT, leading zeros included; the count is what decides.
    client, _ = gateway
    change = b'{"available": true}'
    declared = "0" * 12 + str(len(change))  # h11, the client here, sends at most 20 digits
    response = client.patch(
        "/items/3/availability",
        content=change,
        headers={"content-length": declared, **fresh_key()},
        auth=FULL,
    )
    assert check_envelope(response)["data"]["status"] == "available"
    big = b" " * 16_385
    declared = "0" * 12 + str(len(big))
    response = client.patch(
        "/items/3/availability", content=big, headers={"content-length": declared, **fresh_key()}, auth=FULL
    )
    error_of(response, 413, "request_invalid")


def test_demo_paging_numbers_may_have_leading_zeros(gateway: Any) -> None:
    client, _ = gateway
    response = client.get("/orders", params={"page": "0" * 30 + "2", "size": "005"}, auth=FULL)
    document = check_envelope(response)
    assert (document["data"]["page"], document["data"]["size"]) == (2, 5)


def test_demo_keeps_the_partner_api_range_code_a_backend_sends() -> None:
    async def orders(scope: Scope, receive: Receive, send: Send) -> None:
        error = {"error": {"code": "request_invalid_range", "message": "At most 90 days."}}
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": orjson.dumps(error)})

    backends: dict[str, Any] = {**create_backends(), "orders": orders}
    with TestClient(create_gateway(backends, access_log=False)) as client:
        error = error_of(client.get("/orders", auth=FULL), 400, "request_invalid_range")
        assert error["message"] == "At most 90 days."
