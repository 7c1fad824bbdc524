"""Drivers shared by the tests: a raw ASGI caller, scripted apps and a structlog capture."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.contextvars import merge_contextvars
from structlog.testing import LogCapture

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


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Every structlog event, with the contextvars merged in as in a real configuration."""
    capture = LogCapture()
    structlog.configure(processors=[merge_contextvars, capture])
    try:
        yield capture
    finally:
        structlog.reset_defaults()
