"""Log correlation: structlog contextvars, the access event, stdlib logging."""

from __future__ import annotations

import asyncio
import logging
import random
import types
from typing import Any

import pytest
import structlog
from starlette.types import Message, Receive, Scope, Send
from structlog.contextvars import bind_contextvars, get_contextvars
from structlog.testing import LogCapture

from envelope_middleware import EnvelopeMiddleware, RequestIdFilter, ResourceNotFound, get_request_id
from envelope_middleware import _context as context_module
from envelope_middleware._context import context_merger, structlog_context_vars
from tests.conftest import JSON, body, call, make_scope, plain_structlog, scripted, start

log = structlog.get_logger("app")


async def chatty_app(scope: Scope, receive: Receive, send: Send) -> None:
    log.info("handler_started")
    await asyncio.sleep(random.random() / 100)  # interleave concurrent requests
    log.info("handler_finished", echo=get_request_id())
    await send(start(200, [JSON]))
    await send(body(b"{}"))


async def test_logging_binds_request_id_method_and_path_for_app_log_lines(logs: LogCapture) -> None:
    sent = await call(EnvelopeMiddleware(chatty_app), "POST", "/orders")
    request_id = sent.header("x-request-id")
    app_lines = [e for e in logs.entries if e["event"].startswith("handler_")]
    assert len(app_lines) == 2
    for entry in app_lines:
        assert entry["request_id"] == request_id
        assert entry["method"] == "POST"
        assert entry["path"] == "/orders"


async def test_logging_keeps_ids_apart_across_hundreds_of_concurrent_requests(logs: LogCapture) -> None:
    mw = EnvelopeMiddleware(chatty_app)
    results = await asyncio.gather(*(call(mw, path=f"/r/{i}") for i in range(300)))
    ids = {r.header("x-request-id") for r in results}
    assert len(ids) == 300
    by_path: dict[str, set[str]] = {}
    for entry in logs.entries:
        by_path.setdefault(entry["path"], set()).add(entry["request_id"])
        if entry["event"] == "handler_finished":
            assert entry["echo"] == entry["request_id"]
    assert len(by_path) == 300
    for sent, path in zip(results, (f"/r/{i}" for i in range(300)), strict=True):
        assert by_path[path] == {sent.header("x-request-id")}
    assert len(logs.entries) == 300 * 3  # two app lines and one access line each


async def test_logging_restores_the_context_and_keeps_what_the_app_bound_before(logs: LogCapture) -> None:
    bind_contextvars(request_id="outer", tenant="acme")
    try:
        await call(EnvelopeMiddleware(chatty_app))
        await call(EnvelopeMiddleware(chatty_app))  # sequential requests in one task
        assert get_contextvars() == {"request_id": "outer", "tenant": "acme"}
    finally:
        structlog.contextvars.clear_contextvars()
    inner = {e["request_id"] for e in logs.entries}
    assert "outer" not in inner
    assert len(inner) == 2
    assert all(e["tenant"] == "acme" for e in logs.entries)


async def test_logging_does_not_clear_keys_the_app_binds_during_the_request(logs: LogCapture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        bind_contextvars(user="u1")
        log.info("bound")
        await scripted(start(204), body())(scope, receive, send)

    await call(EnvelopeMiddleware(app))
    [access] = [e for e in logs.entries if e["event"] == "http_request"]
    assert access["user"] == "u1"
    structlog.contextvars.clear_contextvars()


async def test_logging_access_event_has_method_path_status_code_duration_and_bytes(logs: LogCapture) -> None:
    sent = await call(EnvelopeMiddleware(scripted(start(404), body(b""))), "DELETE", "/orders/7")
    [access] = [e for e in logs.entries if e["event"] == "http_request"]
    assert access["request_id"] == sent.header("x-request-id")
    assert access["method"] == "DELETE"
    assert access["path"] == "/orders/7"
    assert access["status"] == 404
    assert access["error_code"] == "resource_not_found"
    assert access["bytes_sent"] == len(sent.body)
    assert isinstance(access["duration_ms"], float)
    assert access["duration_ms"] >= 0
    assert access["log_level"] == "info"


async def test_logging_access_event_for_a_success_has_no_error_code(logs: LogCapture) -> None:
    sent = await call(EnvelopeMiddleware(scripted(start(200, [JSON]), body(b"[1]"))))
    [access] = [e for e in logs.entries if e["event"] == "http_request"]
    assert access["status"] == 200
    assert access["error_code"] is None
    assert access["bytes_sent"] == len(sent.body)


async def receive_request() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def test_logging_access_event_counts_only_bytes_the_server_took(logs: LogCapture) -> None:
    async def gone(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise OSError("client went away")

    app = EnvelopeMiddleware(scripted(start(200, [JSON]), body(b"[1]")))
    await app(make_scope(), receive_request, gone)  # a client that left is no server error
    [access] = [e for e in logs.entries if e["event"] == "http_request"]
    assert (access["status"], access["bytes_sent"]) == (200, 0)
    [left] = [e for e in logs.entries if e["event"] == "client_disconnected"]
    assert str(left["exc_info"]) == "client went away"


async def test_logging_access_event_can_be_turned_off(logs: LogCapture) -> None:
    await call(EnvelopeMiddleware(scripted(start(204), body()), access_log=False))
    assert [e for e in logs.entries if e["event"] == "http_request"] == []


async def test_logging_context_binding_can_be_turned_off(logs: LogCapture) -> None:
    sent = await call(EnvelopeMiddleware(chatty_app, bind_contextvars=False))
    app_lines = [e for e in logs.entries if e["event"].startswith("handler_")]
    assert all("request_id" not in e for e in app_lines)
    [access] = [e for e in logs.entries if e["event"] == "http_request"]
    assert access["request_id"] == sent.header("x-request-id")  # passed explicitly


async def test_logging_uses_the_logger_it_is_given() -> None:
    capture = LogCapture()
    logger = structlog.wrap_logger(None, processors=[capture])
    sent = await call(EnvelopeMiddleware(scripted(start(204), body()), logger=logger))
    assert [e["request_id"] for e in capture.entries] == [sent.header("x-request-id")]


async def test_logging_default_logger_follows_a_reconfiguration_when_structlog_does_not_cache() -> None:
    first, second = LogCapture(), LogCapture()
    structlog.configure(processors=[first], cache_logger_on_first_use=False)
    try:
        middleware = EnvelopeMiddleware(scripted(start(204), body()))
        await call(middleware)
        structlog.configure(processors=[second])
        sent = await call(middleware)
    finally:
        plain_structlog()
    assert len(first.entries) == 1
    assert [e["request_id"] for e in second.entries] == [sent.header("x-request-id")]


async def test_logging_default_logger_is_not_bound_again_once_structlog_caches_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    capture = LogCapture()
    structlog.configure(processors=[capture], cache_logger_on_first_use=True)
    proxy = CountedBinds(structlog.get_logger("envelope_middleware"))
    monkeypatch.setattr(structlog, "get_logger", lambda *_args: proxy)
    try:
        middleware = EnvelopeMiddleware(scripted(start(204), body()))
        sent = [await call(middleware) for _ in range(5)]
        # As the proxy itself would: a later configuration does not reach a cached logger.
        structlog.configure(processors=[LogCapture()])
        sent.append(await call(middleware))
    finally:
        plain_structlog()
    assert [e["request_id"] for e in capture.entries] == [s.header("x-request-id") for s in sent]
    assert proxy.binds == 2  # the first event's, and the one asking whether it is cached


class CountedBinds:
    """A structlog lazy proxy that counts the calls of its `bind`."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self.binds = 0

    def bind(self, **values: Any) -> Any:
        self.binds += 1
        return self.proxy.bind(**values)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.proxy, name)


async def test_logging_works_with_structlog_default_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    structlog.reset_defaults()
    sent = await call(EnvelopeMiddleware(chatty_app))
    out = capsys.readouterr().out
    request_id = sent.header("x-request-id") or ""
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 3
    assert all(request_id in line for line in lines)


async def test_logging_stdlib_records_get_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    stdlib = logging.getLogger("legacy.module")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        stdlib.warning("from stdlib")
        raise ResourceNotFound

    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO):
        sent = await call(EnvelopeMiddleware(app, access_log=False))
        stdlib.warning("after the request")
    records = {r.getMessage(): r for r in caplog.records}
    assert records["from stdlib"].request_id == sent.header("x-request-id")  # type: ignore[attr-defined]
    assert records["after the request"].request_id is None  # type: ignore[attr-defined]


def test_logging_request_id_filter_keeps_an_id_given_with_the_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO):
        logging.getLogger("worker").warning("job done", extra={"request_id": "job-42"})
    assert caplog.records[0].request_id == "job-42"  # type: ignore[attr-defined]


async def test_logging_through_structlog_stdlib_integration(caplog: pytest.LogCaptureFixture) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    try:
        with caplog.at_level(logging.INFO):
            sent = await call(EnvelopeMiddleware(chatty_app))
    finally:
        plain_structlog()
    request_id = sent.header("x-request-id") or ""
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert all(f'"request_id": "{request_id}"' in m for m in messages)
    assert {r.name for r in caplog.records} == {"app", "envelope_middleware"}


async def test_logging_falls_back_to_structlog_public_api_when_its_registry_is_out_of_reach(
    logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A structlog whose registry has moved: only the public API is there.
    public_only = types.SimpleNamespace(
        bind_contextvars=structlog.contextvars.bind_contextvars,
        reset_contextvars=structlog.contextvars.reset_contextvars,
    )
    monkeypatch.setattr(context_module, "structlog_contextvars", public_only)
    mw = EnvelopeMiddleware(chatty_app)
    assert mw.context_vars is None
    bind_contextvars(tenant="acme")
    try:
        sent = await call(mw, "GET", "/branches")
        assert get_contextvars() == {"tenant": "acme"}
    finally:
        structlog.contextvars.clear_contextvars()
    assert {e["request_id"] for e in logs.entries} == {sent.header("x-request-id")}
    assert {e["path"] for e in logs.entries} == {"/branches"}


def test_logging_context_vars_are_structlogs_own(monkeypatch: pytest.MonkeyPatch) -> None:
    found = structlog_context_vars()
    assert found is not None
    token = found[0].set("abc")
    try:
        assert get_contextvars()["request_id"] == "abc"
    finally:
        found[0].reset(token)
    # A structlog whose registry has moved: only the public API is there.
    public_only = types.SimpleNamespace(
        bind_contextvars=structlog.contextvars.bind_contextvars,
        reset_contextvars=structlog.contextvars.reset_contextvars,
    )
    monkeypatch.setattr(context_module, "structlog_contextvars", public_only)
    assert structlog_context_vars() is None
    # A registry that holds something else under those names.
    public_only._CONTEXT_VARS = {"structlog_request_id": "not a ContextVar"}
    public_only.STRUCTLOG_KEY_PREFIX = "structlog_"
    assert structlog_context_vars() is None


async def test_logging_keeps_a_replaced_5xx_body_in_the_log_only(logs: LogCapture) -> None:
    trace = b"Traceback: connection to orders-db-2.internal refused"
    sent = await call(
        EnvelopeMiddleware(scripted(start(500, [(b"content-type", b"text/plain")]), body(trace)))
    )
    assert b"orders-db-2" not in sent.body
    [event] = [e for e in logs.entries if e["event"] == "error_body_replaced"]
    assert event["request_id"] == sent.header("x-request-id")
    assert event["status"] == 500
    assert "orders-db-2.internal" in event["body_excerpt"]


async def test_logging_keeps_the_start_of_an_oversized_5xx_body(logs: LogCapture) -> None:
    data = b"Traceback: db-9.internal " + b"x" * 100_000
    app = scripted(start(500, [(b"content-type", b"text/plain")]), body(data))
    await call(EnvelopeMiddleware(app))
    [event] = [e for e in logs.entries if e["event"] == "error_body_replaced"]
    assert event["body_bytes"] == len(data)
    assert event["body_excerpt"].startswith("Traceback: db-9.internal")
    assert len(event["body_excerpt"]) == 2048


async def test_logging_deliberate_api_errors_add_no_traceback(logs: LogCapture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ResourceNotFound

    await call(EnvelopeMiddleware(app))
    assert [e["event"] for e in logs.entries] == ["http_request"]


async def test_logging_context_is_reset_even_when_the_access_log_fails() -> None:
    class BrokenLogger:
        def info(self, *_args: Any, **_kwargs: Any) -> None:
            raise RuntimeError("log sink is gone")

    # Only `info` is called on this path; a logger with only that is enough here.
    mw = EnvelopeMiddleware(scripted(start(204), body()), logger=BrokenLogger())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="log sink"):
        await call(mw)
    assert get_request_id() is None
    assert get_contextvars() == {}


def test_logging_context_merger_is_structlogs_own_when_its_registry_is_out_of_reach(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert context_merger() is not structlog.contextvars.merge_contextvars
    public_only = types.SimpleNamespace(merge_contextvars=structlog.contextvars.merge_contextvars)
    monkeypatch.setattr(context_module, "structlog_contextvars", public_only)
    assert context_merger() is structlog.contextvars.merge_contextvars


def test_logging_context_merger_reads_keys_first_bound_after_it_was_made() -> None:
    merge = context_merger()
    key = f"key_{random.getrandbits(64):x}"  # never bound before: new to structlog's registry
    assert key not in merge(None, "info", {})
    with structlog.contextvars.bound_contextvars(**{key: "late"}):
        assert merge(None, "info", {})[key] == "late"
        assert merge(None, "info", {key: "own"})[key] == "own"
    assert key not in merge(None, "info", {})
