"""One request's exchange: its state, and every write to the server.

The per-request object is one class (`envelope_middleware._exchange.Exchange`)
built in one line of inheritance, a module per concern: this state and
sending, wrapping 2xx JSON (`_wrapping`), answering errors (`_answering`), and
the dispatch that decides between them (`_exchange`). One line rather than
mixins side by side: mypyc compiles single inheritance only, and
`benchmarks/floor.py` compiles these modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from starlette.types import Message, Receive, Scope, Send

from envelope_middleware._errors import Failure
from envelope_middleware._http import RawHeaders, encode_header, header_value

if TYPE_CHECKING:
    from envelope_middleware.middleware import EnvelopeMiddleware

# Up to this size, prefix, body and suffix are joined into one message: each extra
# message is an extra write on the socket, and under uvicorn and wrk three writes
# for a 100 KB body served 0.61 of the bare app's requests/s and one write 0.99 on
# one machine (0.81 and 0.84 on another), 0.80 and 0.93 at 512 KB. Above it the
# body goes out as it is: joining 1 MB served 0.66 with a p99 of 864 ms, against
# 0.89 and 41 ms for three writes (benchmarks/results/join_ab.md).
JOIN_LIMIT: Final = 512 * 1024

# What the middleware does with a response, decided at its start. Plain ints,
# imported by name: they are compared on every message, and enum member lookups
# cost ~0.1 us each.
NOT_STARTED: Final = 0
PASS: Final = 1  # forwarded as it is, apart from the id header
BODYLESS: Final = 2  # 204/205/304: forwarded without body bytes
WRAP_STREAM: Final = 3  # 2xx JSON, trusted: bytes streamed inside the envelope
WRAP_BUFFER: Final = 4  # 2xx JSON, validated: held whole, checked, then wrapped
ERROR: Final = 5  # >= 400: read, then replaced by an error envelope


async def start_held() -> None:
    """What `send` returns for a start it holds: nothing goes to the server yet.

    A coroutine, like everything `send` returns when the server's `send`
    returns coroutines: apps may hand it to `asyncio.create_task` or anyio's
    `start_soon`, which accept nothing else. (In the compiled build it is
    mypyc's coroutine object: `asyncio.iscoroutine` accepts it, `inspect`'s does not.)
    """


class ExchangeState:
    """One request's response, as it passes from the app through the middleware."""

    # Defaults live on the class: most requests never touch most of these, and
    # four assignments per request instead of fifteen are measurable (issue #2).
    mode = NOT_STARTED
    held_start: Message | None = None  # the app's start, while held
    status: int | None = None  # what the client was sent
    error_code: str | None = None
    body_size = 0
    bytes_sent = 0
    start_sent = False
    ended = False  # the app has sent its last body message (taken or not)
    streamed = False  # the app has sent a body message that was not its last
    complete = False  # the server has taken the response's last message
    trailers = False  # a passed-through start announced trailers: they end the response
    disconnected = False  # the app was told the client left
    send_failed = False  # the server's send raised OSError: the client is gone (ASGI 2.4)
    skipped = 0  # bytes held back from the start of a streamed body: a BOM, whitespace
    awaiting_document = False  # a streamed body has shown only whitespace so far
    excluded = False
    answered: Exception | None = None  # an exception a handler handed over, answered for
    wrapped_headers: RawHeaders  # the app's headers a wrapped body keeps, set with the mode
    # Set with the mode that uses them, so that other responses allocate neither.
    held_body: list[bytes]  # WRAP_BUFFER: the body so far, until it can be checked whole
    error_body: list[bytes]  # ERROR: the start of the app's error body, to read its code from
    bom_prefix = b""  # WRAP_STREAM: a BOM's first bytes, perhaps, held for the next message

    def __init__(
        self, middleware: EnvelopeMiddleware, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        self.middleware = middleware
        self.scope = scope
        self.server_receive = receive
        self.server_send = send
        self.request_id_str = request_id
        self.request_id = request_id.encode("ascii")

    # -- sending -------------------------------------------------------------

    async def _pass_on(self, message: Message, *, ends: bool) -> None:
        """Send a message the app made, as it is; `ends`: whether it completes the response.

        Awaited here rather than handed back: an `OSError` from the server is a
        client that left (ASGI 2.4) for these messages as for the middleware's own,
        and the response is complete once the server took the last of them.
        """
        body = message.get("body", b"")
        # The bytes, not the items, of a memoryview of a typed array.
        size = len(body) if type(body) is bytes else memoryview(body).nbytes
        try:
            await self.server_send(message)
        except OSError:
            self.send_failed = True
            raise
        self.bytes_sent += size
        if ends:
            self.complete = True

    async def _send_start(self, message: Message) -> None:
        # A coroutine: the start counts as sent when it is, not when `send` is
        # called (an app may cancel or drop what `send` returns).
        self.held_start = None
        self.start_sent = True
        try:
            await self.server_send(message)
        except OSError:
            self.send_failed = True
            raise
        self.status = message["status"]  # the access event's: what the client was sent

    async def _write(self, parts: tuple[bytes, ...], *, more: bool) -> None:
        size = sum(map(len, parts))
        send = self.server_send
        try:
            if size <= JOIN_LIMIT or len(parts) == 1:
                await send({"type": "http.response.body", "body": b"".join(parts), "more_body": more})
            else:
                # Large: the parts go out as they are rather than copied into one buffer.
                last = len(parts) - 1
                for index, part in enumerate(parts):
                    await send(
                        {"type": "http.response.body", "body": part, "more_body": more or index < last}
                    )
        except OSError:
            self.send_failed = True
            raise
        if not more:
            self.complete = True
        self.bytes_sent += size

    async def _send_error(self, failure: Failure, headers: RawHeaders) -> None:
        body = self.middleware.errors.render(self.request_id, failure)
        if failure.headers:
            drop = self.middleware.error_drop
            own = [
                encoded
                for name, value in failure.headers.items()
                if (encoded := encode_header(name, value)) is not None and encoded[0] not in drop
            ]
            # The exception's own headers replace a response's of the same name (a
            # handed-over RateLimited and its stand-in both give a Retry-After).
            names = {name for name, _ in own}
            headers = [pair for pair in headers if pair[0].lower() not in names] + own
        headers.append((b"content-type", b"application/json"))
        headers.append((b"content-length", b"%d" % len(body)))
        headers.append((self.middleware.id_header, self.request_id))
        await self._send_start({"type": "http.response.start", "status": failure.status, "headers": headers})
        self.error_code = failure.code  # with the status: what the client was sent
        if self.scope["method"] == "HEAD":
            body = b""  # RFC 9110 §9.3.2: the headers say what a GET would have sent
        await self._write((body,), more=False)

    def _has_credentials(self) -> bool:
        return header_value(self.scope["headers"], b"authorization") is not None
