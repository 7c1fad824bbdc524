"""A keyed write's first run, and the claim tokens and late releases around it."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import TYPE_CHECKING

import anyio
from starlette.types import Message, Receive, Scope, Send

from envelope_middleware._keys import HANDED_OVER_KEY, SCOPE_KEY
from envelope_middleware.idempotency import _record
from envelope_middleware.idempotency._record import Record, is_recorded
from envelope_middleware.idempotency.store import IdempotencyStore, StoreUnavailable

if TYPE_CHECKING:
    from envelope_middleware.idempotency.middleware import IdempotencyMiddleware


class FirstRun:
    """One first request: the app runs, its answer is recorded (or the key released)."""

    status: object = None
    headers: list[tuple[bytes, bytes]]
    keep_body = True  # false once the body outgrew the limit, or came as a file or trailers
    # What to record: the whole answer once kept (again, if its recording was cut
    # off), or an ApiError raised before any answer.
    answer: Record | None = None
    size = 0
    settled = False

    def __init__(self, middleware: IdempotencyMiddleware, scope: Scope, operation: str, token: str) -> None:
        self.middleware = middleware
        self.scope = scope
        self.operation = operation
        self.token = token
        self.request_id = _record.first_request_id(scope.get(SCOPE_KEY))
        self.chunks: list[bytes] = []

    async def run(self, receive: Receive, send: Send, body: bytes) -> None:
        delivered = False

        async def replay_receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def recording_send(message: Message) -> None:
            # Recorded before the last message goes out: a client that has its
            # answer and retries at once finds the record, not the claim.
            if not self.settled and self._observe(message):
                self.answer = self._response()
                await self._settle(self.answer)
            await send(message)

        try:
            await self.middleware.app(self.scope, replay_receive, recording_send)
        except Exception as exc:
            if self.status is None and self.answer is None:
                self.answer = _record.error_record(exc, self.request_id)
            raise
        finally:
            if not self.settled:
                # No whole answer kept (a file, trailers, a body past the limit, a
                # stream cut short, a client that left, an exception, a cancellation):
                # the key stays used if the app had answered, and is freed if it had not.
                await self._settle(self.answer or self._marker(), shield=True)

    def _observe(self, message: Message) -> bool:
        """Note what `message` adds to the answer; True once the whole of it is kept."""
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message.get("status")
            exchange = _record.EXCHANGE_HEADERS
            self.headers = [
                (name, value)
                for name, value in message.get("headers", ())
                # ASGI allows any bytes-like name; a memoryview has no lower().
                if (name if type(name) is bytes else bytes(name)).lower() not in exchange
            ]
            if message.get("trailers", False):
                self.keep_body = False
            return False
        if kind == "http.response.body" and self.status is not None:
            last = not message.get("more_body", False)
            if self.keep_body:
                chunk = message.get("body", b"")
                self.size += len(chunk)
                if self.size > self.middleware.max_response_size:
                    self.keep_body = False
                    self.chunks.clear()
                elif chunk:
                    self.chunks.append(bytes(chunk))
            return last and self.keep_body
        # A file (pathsend, zerocopysend) or trailers: not kept; the key stays used
        # without a body once the app returns (_marker).
        self.keep_body = False
        return False

    def _response(self) -> Record | None:
        handed_over = (self.scope.get("state") or {}).get(HANDED_OVER_KEY)
        if handed_over is not None:
            # A handler's stand-in for an exception the envelope answers for.
            return _record.error_record(handed_over, self.request_id)
        if not is_recorded(self.status):
            return None
        return Record(self.request_id, int(self.status), self.headers, b"".join(self.chunks))

    def _marker(self) -> Record | None:
        # Once the app has started a recordable answer the write has run, whether
        # or not the client got it all: a retry must not run it again (issue #10
        # review). Without a start, or with a 5xx, nothing is known to have run.
        if not is_recorded(self.status):
            return None
        return Record(self.request_id, int(self.status), self.headers)

    async def _settle(self, record: Record | None, *, shield: bool = False) -> None:
        if shield:
            # A request cut off by a deadline (an anyio cancel scope around the app)
            # still frees or records its key, within the store's own timeout. Only
            # here: a shield costs several microseconds, and the usual end needs none.
            with anyio.CancelScope(shield=True):
                await self._store(record)
        else:
            await self._store(record)
        self.settled = True

    async def _store(self, record: Record | None) -> None:
        store, logger = self.middleware.store, self.middleware.logger
        try:
            if record is None:
                await store.release(self.operation, self.token)
            elif not await store.complete(
                self.operation, self.token, _record.encode(record), self.middleware.ttl
            ):
                logger.warning("idempotency_claim_lost", status=record.status)
        except StoreUnavailable:
            # The write ran and its answer goes out; only its replay is lost. Once
            # the claim's lease ends, a retry runs the write again.
            logger.exception("idempotency_store_unavailable", operation="settle")


def _new_token_prefix() -> None:
    global _token_prefix  # noqa: PLW0603 - one per process, renewed in a forked child
    _token_prefix = f"{os.urandom(8).hex()}-{os.getpid()}-"


_token_prefix = ""
_new_token_prefix()
os.register_at_fork(after_in_child=_new_token_prefix)
_token_count = itertools.count()


def token() -> str:
    """A claim's token, unique across processes: random per process, counted within one.

    Cheaper than 16 random bytes per request, a system call each; a forked worker
    gets a prefix of its own, so no two processes ever hand out the same token.
    """
    return f"{_token_prefix}{next(_token_count)}"


_pending: set[asyncio.Task[None]] = set()  # releases under way: a task nothing holds may be collected


def release_later(store: IdempotencyStore, operation: str, token: str, lease: float) -> None:
    """Free a claim that failed on our side but may yet land in a stalled store.

    It first waits as long as a store call may take, so that a stalled claim has
    landed or failed, then releases it by its token, trying again while the
    store stays unreachable, for at most the lease (after which it ends anyway).
    """

    async def release() -> None:
        delay = getattr(store, "timeout", 0.1)
        deadline = time.monotonic() + lease
        while True:
            await asyncio.sleep(delay)
            try:
                await store.release(operation, token)
            except StoreUnavailable:
                if time.monotonic() + 2 * delay > deadline:
                    return
                delay *= 2
            else:
                return

    task = asyncio.ensure_future(release())
    _pending.add(task)
    task.add_done_callback(_pending.discard)
