"""Request ids: generation, trust of incoming ids, and where handlers read them."""

from __future__ import annotations

import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from envelope_middleware import (
    EnvelopeMiddleware,
    get_request_id,
    hex_request_id,
    is_safe_request_id,
    prefixed_uuid_request_id,
)
from envelope_middleware import request_id as request_id_module
from tests.conftest import HEX_ID, JSON, body, call, drive, scripted, start

SAFE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def app_with(**options: Any) -> EnvelopeMiddleware:
    return EnvelopeMiddleware(scripted(start(200, [JSON]), body(b"{}")), access_log=False, **options)


def test_hex_request_id_is_32_lowercase_hex_and_unique() -> None:
    ids = {hex_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(HEX_ID, i) for i in ids)


def test_prefixed_uuid_request_id_is_req_and_a_uuid4() -> None:
    value = prefixed_uuid_request_id()
    assert value.startswith("req_")
    assert uuid.UUID(value[4:]).version == 4
    assert is_safe_request_id(value)


async def test_request_id_format_prefixed_uuid_is_used_in_body_and_header() -> None:
    sent = await call(app_with(request_id_format="prefixed_uuid"))
    request_id = sent.header("x-request-id")
    assert request_id is not None
    assert re.fullmatch(
        r"req_[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", request_id
    )
    assert sent.json()["request_id"] == request_id


async def test_request_id_format_accepts_a_callable() -> None:
    counter = iter(range(100))
    sent = await call(app_with(request_id_format=lambda: f"gw-{next(counter)}"))
    assert sent.header("x-request-id") == "gw-0"
    assert sent.json()["request_id"] == "gw-0"


@pytest.mark.parametrize("bad", ['a"b', "line\r\nbreak", "", "x" * 129, 42])
async def test_request_id_from_an_unsafe_generator_is_replaced(bad: Any, logs: Any) -> None:
    sent = await call(
        EnvelopeMiddleware(scripted(start(200, [JSON]), body(b"{}")), request_id_format=lambda: bad)
    )
    assert re.fullmatch(HEX_ID, sent.header("x-request-id") or "")
    assert sent.json()["request_id"] == sent.header("x-request-id")
    assert any(e["event"] == "request_id_generator_unsafe" for e in logs.entries)


def test_request_id_format_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="request_id_format"):
        EnvelopeMiddleware(scripted(), request_id_format="uuid7")  # type: ignore[arg-type]


async def test_request_id_incoming_is_ignored_unless_trusted() -> None:
    sent = await call(app_with(), headers=[("x-request-id", "partner-chosen-id")])
    assert sent.header("x-request-id") != "partner-chosen-id"


@pytest.mark.parametrize(
    "value", ["abc123", "req_e9f2b838-38e9-43ba-9e30-9b747da67d9f", "  padded.id:1  ", "A" * 128]
)
async def test_request_id_incoming_is_reused_when_trusted_and_valid(value: str) -> None:
    headers = [("accept", "application/json"), ("X-Request-ID", value), ("user-agent", "partner/1.0")]
    sent = await call(app_with(trust_request_id=True), headers=headers)
    assert sent.header("x-request-id") == value.strip()
    assert sent.json()["request_id"] == value.strip()


@pytest.mark.parametrize(
    "value",
    [
        b"a\r\nSet-Cookie: x=1",
        b"ctl\x01",
        b'quo"te',
        b"x" * 129,
        b"",
        b"   ",
        b"caf\xc3\xa9",
        b"sp ace",
        b"<script>",
    ],
)
async def test_request_id_incoming_invalid_is_replaced_by_a_fresh_one(value: bytes) -> None:
    sent = await call(app_with(trust_request_id=True), headers=[(b"x-request-id", value)])
    request_id = sent.header("x-request-id")
    assert request_id is not None
    assert re.fullmatch(HEX_ID, request_id)


async def test_request_id_incoming_duplicates_are_not_trusted() -> None:
    sent = await call(
        app_with(trust_request_id=True), headers=[("x-request-id", "one"), ("x-request-id", "two")]
    )
    assert re.fullmatch(HEX_ID, sent.header("x-request-id") or "")


async def test_request_id_header_name_is_configurable() -> None:
    sent = await call(
        app_with(request_id_header="X-Correlation-ID", trust_request_id=True),
        headers=[("x-correlation-id", "corr-1")],
    )
    assert sent.header("x-correlation-id") == "corr-1"
    assert sent.header("x-request-id") is None


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=200))
def test_request_id_property_any_header_value_gives_a_safe_id(value: bytes) -> None:
    sent = drive(app_with(trust_request_id=True), headers=[(b"x-request-id", value)])
    request_id = sent.header("x-request-id")
    assert request_id is not None
    assert SAFE.fullmatch(request_id)
    assert sent.json()["request_id"] == request_id
    stripped = value.strip(b" \t")
    if request_id.encode() != stripped:
        assert re.fullmatch(HEX_ID, request_id)  # not reflected: freshly made


async def test_get_request_id_is_none_outside_and_reset_after_a_request() -> None:
    seen: list[str | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(get_request_id())
        await scripted(start(204), body())(scope, receive, send)

    assert get_request_id() is None
    first = await call(EnvelopeMiddleware(app, access_log=False))
    second = await call(EnvelopeMiddleware(app, access_log=False))
    assert seen == [first.header("x-request-id"), second.header("x-request-id")]
    assert seen[0] != seen[1]
    assert get_request_id() is None


async def test_get_request_id_is_reset_even_when_the_app_raises_a_base_exception() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await call(EnvelopeMiddleware(app, access_log=False))
    assert get_request_id() is None


def test_hex_request_id_is_unique_across_threads_and_refills() -> None:
    def draw() -> list[str]:
        return [hex_request_id() for _ in range(3000)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        batches = list(pool.map(lambda _: draw(), range(4)))
    ids = [i for batch in batches for i in batch]
    assert len(set(ids)) == len(ids) == 12_000
    assert all(re.fullmatch(HEX_ID, i) for i in ids)


async def test_request_id_from_a_failing_generator_is_replaced(logs: Any) -> None:
    def broken() -> str:
        raise RuntimeError("id service down")

    sent = await call(EnvelopeMiddleware(scripted(start(200, [JSON]), body(b"{}")), request_id_format=broken))
    assert re.fullmatch(HEX_ID, sent.header("x-request-id") or "")
    assert any(e["event"] == "request_id_generator_failed" for e in logs.entries)


def test_hex_request_id_batch_is_not_shared_with_a_forked_child() -> None:
    hex_request_id()  # the parent holds a partly drawn batch
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, hex_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert re.fullmatch(HEX_ID, child_id)
    assert child_id != hex_request_id()


def test_hex_request_id_draws_from_the_os_in_batches_of_256() -> None:
    request_id_module._hex_pool.clear()  # what the fork hook does in a child
    first = hex_request_id()
    assert len(request_id_module._hex_pool) == 255
    assert first not in request_id_module._hex_pool


async def test_request_id_trusted_mode_without_an_incoming_id_generates_one() -> None:
    mw = EnvelopeMiddleware(
        scripted(start(200, [JSON]), body(b"{}")), access_log=False, trust_request_id=True
    )
    sent = await call(mw)
    assert len(sent.header("x-request-id") or "") == 32
