"""Drivers shared by the tests: a raw ASGI caller, scripted apps and a structlog capture."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import structlog
from hypothesis import strategies as st
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.contextvars import merge_contextvars
from structlog.testing import LogCapture

from envelope_middleware import EnvelopeMiddleware

HEX_ID = r"[0-9a-f]{32}"


@dataclass
class Sent:
    """What an ASGI app sent for one request, message by message."""

    messages: list[Message] = field(default_factory=list)

    @property
    def start(self) -> Message:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"expected one http.response.start, got {len(starts)}"
        return starts[0]

    @property
    def status(self) -> int:
        status: int = self.start["status"]
        return status

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [(bytes(k), bytes(v)) for k, v in self.start.get("headers", [])]

    def header_values(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.raw_headers if k.lower() == key]

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None

    @property
    def body_messages(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.body_messages)

    @property
    def complete(self) -> bool:
        bodies = self.body_messages
        return bool(bodies) and not bodies[-1].get("more_body", False)

    def json(self) -> Any:
        return orjson.loads(self.body)


def make_scope(
    method: str = "GET",
    path: str = "/",
    headers: Sequence[tuple[str | bytes, str | bytes]] = (),
    scope_type: str = "http",
    extensions: dict[str, Any] | None = None,
) -> Scope:
    def raw(value: str | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.encode("latin-1")

    return {
        "type": scope_type,
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(raw(k).lower(), raw(v)) for k, v in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
        "extensions": extensions or {},
    }


async def call(
    app: ASGIApp,
    method: str = "GET",
    path: str = "/",
    headers: Sequence[tuple[str | bytes, str | bytes]] = (),
    *,
    body: bytes = b"",
    scope: Scope | None = None,
    extensions: dict[str, Any] | None = None,
) -> Sent:
    """Call `app` once as a server would and record what it sends."""
    sent = Sent()
    done = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    if scope is None:
        scope = make_scope(method, path, headers, extensions=extensions)
    await app(scope, receive, send)
    return sent


def drive(app: ASGIApp, method: str = "GET", path: str = "/", **kwargs: Any) -> Sent:
    """`call` from synchronous code (hypothesis examples run synchronously)."""
    return asyncio.run(call(app, method, path, **kwargs))


def scripted(
    *messages: Message,
    raise_after: BaseException | None = None,
    before: Callable[[], Awaitable[None]] | None = None,
) -> ASGIApp:
    """An ASGI app that sends exactly `messages`, then optionally raises."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if before is not None:
            await before()
        for message in messages:
            await send(dict(message))
        if raise_after is not None:
            raise raise_after

    return app


def start(status: int = 200, headers: Sequence[tuple[bytes, bytes]] = (), **extra: Any) -> Message:
    return {"type": "http.response.start", "status": status, "headers": list(headers), **extra}


def body(data: bytes = b"", *, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


JSON = (b"content-type", b"application/json")


# -- shared by the EnvelopeMiddleware test files (tests/test_success_envelope.py and the rest)


def envelope(app: Any, **options: Any) -> EnvelopeMiddleware:
    return EnvelopeMiddleware(app, access_log=False, **options)


def assert_error(sent: Sent, status: int, code: str) -> dict[str, Any]:
    assert sent.status == status
    assert sent.header("content-type") == "application/json"
    assert sent.header("content-length") == str(len(sent.body))
    document = sent.json()
    assert set(document) == {"request_id", "error"}
    assert document["request_id"] == sent.header("x-request-id")
    assert set(document["error"]) == {"code", "message", "details"}
    assert document["error"]["code"] == code
    assert isinstance(document["error"]["message"], str)
    assert document["error"]["message"]
    assert isinstance(document["error"]["details"], dict)
    error: dict[str, Any] = document["error"]
    return error


def raising(exc: BaseException) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise exc

    return app


def zerocopy(*, more: bool) -> Message:
    return {"type": "http.response.zerocopysend", "file": 3, "count": 10, "more_body": more}


async def _request() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


_TRAILERS = {"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")], "more_trailers": False}


def _scope(method: str = "GET", path: str = "/") -> Scope:
    return make_scope(method, path)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def plain_structlog() -> None:
    """structlog's defaults, but tracebacks drawn plainly.

    With rich installed (schemathesis brings it), the development renderer draws
    every logged traceback with it, at up to a second each: the suite's time,
    not the middleware's.
    """
    structlog.reset_defaults()
    *processors, _ = structlog.get_config()["processors"]
    renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    structlog.configure(processors=[*processors, renderer])


def pytest_configure(config: pytest.Config) -> None:
    plain_structlog()


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Every structlog event, with the contextvars merged in as in a real configuration."""
    capture = LogCapture()
    structlog.configure(processors=[merge_contextvars, capture])
    try:
        yield capture
    finally:
        plain_structlog()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Each idempotency store in turn: the embedded one, and Redis on a real server, emptied."""
    from envelope_middleware.idempotency import MemoryStore  # noqa: PLC0415
    from envelope_middleware.idempotency.redis_store import RedisStore  # noqa: PLC0415

    if request.param == "memory":
        yield MemoryStore()
        return
    server = request.getfixturevalue("redis_server")
    server.client().flushdb()
    redis_store = RedisStore.from_url(server.url)
    try:
        yield redis_store
    finally:
        await redis_store.aclose()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """One real redis-server for the session; tests that stop it start their own."""
    from tests._redis import redis_server as serve_redis  # noqa: PLC0415 - only tests that need Redis start it

    with serve_redis() as server:
        yield server


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test fails the run: a test that did not run proved nothing (issue #10)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = reporter.stats.get("skipped", [])
    if os.environ.get("CI") and skipped and exitstatus == 0:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; every test must run here", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
