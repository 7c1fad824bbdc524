"""The exchange's dispatch: each message of the app's response, by the mode its start decided."""

from __future__ import annotations

from collections.abc import Awaitable

from starlette.types import Message

from envelope_middleware._answering import Answering
from envelope_middleware._errors import ERROR_BODY_LIMIT
from envelope_middleware._exchange_state import (
    BODYLESS,
    ERROR,
    NOT_STARTED,
    PASS,
    WRAP_BUFFER,
    WRAP_STREAM,
    start_held,
)
from envelope_middleware._http import RawHeaders, as_bytes, is_blank, is_int_status

_SENDFILE_MESSAGES = frozenset({"http.response.pathsend", "http.response.zerocopysend"})


class Exchange(Answering):
    """One request's response: `receive` and `send` are what the app is given."""

    async def receive(self) -> Message:
        """The `receive` the app is given: it notes a client that left."""
        message = await self.server_receive()
        # Servers also say so once a response is complete: only a client that left
        # before the end is one (an exception from a background task is still the app's).
        if message["type"] == "http.disconnect" and not self.complete:
            self.disconnected = True
        return message

    def send(self, message: Message) -> Awaitable[None]:
        """The `send` the app is given; returns what to await for `message`.

        A plain function, not a coroutine: each kind of message is answered with
        the one coroutine that handles it, which saves a coroutine layer per
        message (issue #2: each costs about as much as a header scan).
        """
        kind = message["type"]
        if kind == "http.response.body":
            # Decided when `send` is called, not when the server has taken the message:
            # an app may call `send` again before awaiting the last body.
            if self.ended:
                raise RuntimeError("the app sent a body after the response was complete")
            mode = self.mode
            if mode == NOT_STARTED:
                return self._on_body(message)  # refused there, and nothing has ended
            if message.get("more_body", False):
                self.streamed = True
                return self._pass_on(message, ends=False) if mode == PASS else self._on_body(message)
            self.ended = True
            if mode == PASS:
                return self._pass_on(message, ends=not self.trailers)
            if (
                mode in (WRAP_BUFFER, WRAP_STREAM)
                and not self.streamed
                and (held := self.held_start) is not None
            ):
                # A body in one message, the common case in both modes: one coroutine
                # sends it whole, with no streaming bookkeeping. Not after an earlier
                # body message, even one not awaited yet: it goes first, through _on_body.
                return self._send_wrapped(held, message.get("body", b""))
            return self._on_body(message)
        if kind == "http.response.start":
            forward = self._on_start(message)
            return start_held() if forward is None else self._send_start(forward)
        return self._on_other(message)

    def _on_start(self, message: Message) -> Message | None:
        """Decide what to do with the response; the start to send now, if any."""
        if self.mode != NOT_STARTED:
            raise RuntimeError("the app sent http.response.start twice")
        # Read untyped: ASGI allows any iterable, and the compiled build checks what a
        # typed name holds (docs/performance.md).
        given = message.get("headers") or []
        headers: RawHeaders
        if type(given) is list:
            headers = given
        else:
            # It is read more than once here.
            headers = as_bytes(given)
            message = {**message, "headers": headers}
        try:
            return self._decide(message, headers)
        except (TypeError, AttributeError):
            # bytearray or memoryview names and values, which servers accept,
            # cannot be hashed or lowered as the scan needs: as bytes, once more.
            headers = as_bytes(headers)
            return self._decide({**message, "headers": headers}, headers)

    def _decide(self, message: Message, headers: RawHeaders) -> Message | None:
        """Decide the response's mode; return the start to send now, or None to hold it.

        Nothing is recorded on the exchange until every step that may raise has run:
        `_on_start` calls this again, with the headers as bytes, after a TypeError or
        an AttributeError.
        """
        status = message["status"]
        # A final response's status (RFC 9110 §15), an int as ASGI says (HTTPStatus is
        # one): 200.0 and True equal 200 and 1 but are no status line. The app's bug answers 500.
        if not (type(status) is int or is_int_status(status)) or not 200 <= status <= 599:
            raise RuntimeError(f"the app sent an invalid status: {status!r}")
        # HEAD goes the way of GET: RFC 9110 §9.3.2 asks for the headers a GET would
        # get, and §8.6 forbids a Content-Length other than the GET's. Starlette's
        # responses but FileResponse send the body on HEAD (servers drop it), so the
        # envelope's length is known; without a body, _length_of_nothing decides.
        if self.excluded:
            mode = PASS
        elif status in (204, 205, 304):
            mode = BODYLESS
        elif status >= 400:
            mode = ERROR
        elif status >= 300 or status == 206 or message.get("trailers", False):
            mode = PASS
        else:
            mode = self._wrap_mode(headers)
        if mode in (PASS, BODYLESS):
            id_name = self.middleware.id_header
            if mode == PASS or status == 304:
                kept = [pair for pair in headers if pair[0].lower() != id_name]
            else:
                # RFC 9110 §8.6 and §15.3.6: no Content-Length on a 204, and a 205
                # says "no content" with Content-Length: 0; the body is dropped below.
                kept = [pair for pair in headers if pair[0].lower() not in (id_name, b"content-length")]
                if status == 205:
                    kept.append((b"content-length", b"0"))
            kept.append((id_name, self.request_id))
            forward = {**message, "headers": kept}
            if mode == BODYLESS:
                # No content, so no trailer section either (RFC 9110 §6.5): the start does
                # not announce one, and the app's trailers are dropped as its body is.
                forward.pop("trailers", None)
            self.trailers = mode == PASS and bool(message.get("trailers", False))
            self.mode = mode
            return forward
        if mode == WRAP_BUFFER:
            self.held_body = []
        elif mode == ERROR:
            self.error_body = []
        self.mode = mode
        self.held_start = message
        return None

    async def _on_body(self, message: Message) -> None:
        mode = self.mode
        given = message.get("body", b"")
        # A bytearray or memoryview, which servers accept: as bytes, so that sizes
        # count bytes (a typed memoryview's len counts its items) and joins work.
        body: bytes = given if type(given) is bytes else bytes(given)
        # Any truthy value, as the pure build reads it (the compiled one checks a bool).
        more = bool(message.get("more_body", False))
        held = self.held_start
        if held is None:
            if mode == WRAP_STREAM:
                end = b"}"
                if self.awaiting_document:
                    if not is_blank(body):
                        self.awaiting_document = False
                    else:
                        end = b"null}"  # whitespace alone: an empty body, `null`
                await self._write((body, end) if not more else (body,), more=more)
            elif mode == BODYLESS:
                # The middleware's own empty message, in place of the app's body.
                await self._write((b"",), more=more)
            else:
                raise RuntimeError("the app sent a body before http.response.start")
        elif mode == WRAP_BUFFER:
            self.held_body.append(body)
            self.body_size += len(body)
            if not more:
                parts, self.held_body = self.held_body, []
                await self._send_wrapped(held, b"".join(parts))
            elif (limit := self.middleware.held_limit) is not None and self.body_size > limit:
                # Memory stays bounded; the check is given up for this body, and said so.
                self.middleware.logger.warning(
                    "json_not_validated", request_id=self.request_id_str, held_bytes=self.body_size
                )
                parts, self.held_body = self.held_body, []
                self.mode = WRAP_STREAM
                await self._open_wrapped_stream(held, b"".join(parts), more=True)
        elif mode == WRAP_STREAM:
            await self._open_wrapped_stream(held, body, more=more)
        else:  # ERROR
            room = ERROR_BODY_LIMIT - self.body_size
            if room > 0:
                self.error_body.append(body[:room] if len(body) > room else body)
            self.body_size += len(body)
            if not more:
                await self._send_error_from_response(held)

    async def _on_other(self, message: Message) -> None:
        kind = message["type"]
        if kind in _SENDFILE_MESSAGES:
            if self.ended:
                raise RuntimeError(f"the app sent {kind} after the response was complete")
            # pathsend always ends the body; zerocopysend may come in several parts.
            last = kind == "http.response.pathsend" or not message.get("more_body", False)
            self.ended = last
            held = self.held_start
            if self.mode == ERROR:
                # An error page sent as a file: its bytes are not read, the status decides.
                if last and held is not None:
                    await self._send_error_from_response(held)
                return
            if held is not None:
                # A JSON file sent by path cannot be wrapped without reading it: it passes.
                self.mode = PASS
                id_name = self.middleware.id_header
                kept = [pair for pair in held["headers"] if pair[0].lower() != id_name]
                kept.append((id_name, self.request_id))
                await self._send_start({**held, "headers": kept})
            await self._pass_on(message, ends=last and not self.trailers)
        elif kind == "http.response.trailers":
            # An error or bodyless response's are dropped: it is sent without them. A
            # passed-through response's last trailers are its last message (ASGI's
            # HTTP trailers extension).
            if self.mode not in (ERROR, BODYLESS):
                await self._pass_on(message, ends=self.trailers and not message.get("more_trailers", False))
        else:
            await self._pass_on(message, ends=False)
