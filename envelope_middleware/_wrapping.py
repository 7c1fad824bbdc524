"""Wrapping a 2xx JSON body: `{"request_id", "data": <the body's bytes>}`, held or streamed."""

from __future__ import annotations

from typing import Any

from starlette.types import Message

from envelope_middleware._exchange_state import JOIN_LIMIT, PASS, WRAP_BUFFER, WRAP_STREAM, ExchangeState
from envelope_middleware._http import (
    BOM,
    INVALID_BODY_HEADERS,
    JSON_WHITESPACE,
    RawHeaders,
    as_bytes,
    header_value,
    is_blank,
    is_json_media_type,
    json_error,
    kept_on_error,
)

_MAX_LENGTH_DIGITS = 18  # past this a Content-Length is nonsense, and int() has a digit limit


class Wrapping(ExchangeState):
    """The exchange's wrapping of 2xx JSON bodies."""

    def _wrap_mode(self, headers: RawHeaders) -> int:
        # One pass decides whether to wrap and keeps the headers a wrapped body
        # can carry, so the start is not scanned twice (issue #2, per-request cost).
        drop = self.middleware.wrap_drop
        kept: RawHeaders = []
        content_type: bytes | None = None
        for pair in headers:
            lowered = pair[0].lower()
            if lowered in drop:
                if lowered == b"content-type" and content_type is None:
                    content_type = pair[1]  # the first, as the error path reads it
                elif lowered == b"etag" and pair[1].startswith(b"W/"):
                    # A weak validator still holds for the same data in an envelope (RFC 9110 §8.8.1).
                    kept.append(pair)
            elif lowered == b"content-encoding":
                if pair[1].strip().lower() not in (b"", b"identity"):
                    return PASS  # coded bytes cannot be spliced
                # No coding at all: nothing the envelope's bytes need said of them.
            else:
                kept.append(pair)
        if content_type is None or not is_json_media_type(content_type):
            return PASS
        self.wrapped_headers = kept
        return WRAP_BUFFER if self.middleware.validate_json else WRAP_STREAM

    async def _send_wrapped(self, held: Message, given: Any) -> None:
        """The whole body is here and the start held: check it (validating mode), send it wrapped.

        `given` is the app's body as it came: a bytearray or memoryview, which servers accept,
        becomes bytes here (Any, not bytes: the compiled build checks a typed parameter).
        """
        body: bytes = given if type(given) is bytes else bytes(given)
        received = len(body)
        if body.startswith(BOM):
            # RFC 8259 §8.1: a parser may ignore a BOM; inside an envelope it would be invalid.
            body = body[3:]
        # is_blank, inline: this runs for every wrapped body, and the first byte decides.
        if not body or (body[0] in JSON_WHITESPACE and is_blank(body)):
            body = b"null"  # nothing, or whitespace alone: no document
        elif self.mode == WRAP_BUFFER and (problem := json_error(body)) is not None:
            # The body may hold anything: its size and the parser's reason are logged, not it.
            self.middleware.logger.warning(
                "downstream_invalid_json",
                request_id=self.request_id_str,
                body_bytes=len(body),
                reason=problem,
            )
            failure = self.middleware.errors.for_code("downstream_invalid_response")
            given = as_bytes(held.get("headers") or [])
            headers = kept_on_error(given, failure.status, self.middleware.error_drop, INVALID_BODY_HEADERS)
            await self._send_error(failure, headers)
            return
        prefix = b'{"request_id":"' + self.request_id + b'","data":'
        size = len(prefix) + len(body) + 1
        self.held_start = None
        self.start_sent = True
        send = self.server_send
        try:
            await send(self._wrapped_start(held, size if received else self._length_of_nothing(held, size)))
            self.status = held["status"]
            if size <= JOIN_LIMIT:
                await send({"type": "http.response.body", "body": b"".join((prefix, body, b"}"))})
            else:
                # Large: the body goes out as it is rather than copied into one buffer.
                await send({"type": "http.response.body", "body": prefix, "more_body": True})
                await send({"type": "http.response.body", "body": body, "more_body": True})
                await send({"type": "http.response.body", "body": b"}"})
        except OSError:
            self.send_failed = True
            raise
        # Complete, and counted, once the server took it: a server that refused the
        # last message has not sent a whole response.
        self.complete = True
        self.bytes_sent = size

    async def _open_wrapped_stream(self, held: Message, body: bytes, *, more: bool) -> None:
        if self.bom_prefix:
            body = self.bom_prefix + body
            self.bom_prefix = b""
        # A BOM (RFC 8259 §8.1) inside the envelope would make it invalid: dropped,
        # however the messages split it.
        if body.startswith(BOM):
            body = body[3:]
            self.skipped += len(BOM)
        elif more and len(body) < len(BOM) and BOM.startswith(body):
            self.bom_prefix = body  # a BOM's first bytes, perhaps
            return
        prefix = b'{"request_id":"' + self.request_id + b'","data":'
        if more:
            length = self._streamed_length(held, len(prefix) + 1)
            if is_blank(body):
                if length is not None or not body:
                    # Nothing to show yet; if the body stays empty it becomes `null`,
                    # which a declared length has no room for.
                    self.skipped += len(body)
                    return
                # Whitespace on an unframed stream goes out now (it may be a keep-alive
                # of a long poll); a `null` can still follow it.
                self.awaiting_document = True
            await self._send_start(self._wrapped_start(held, length))
            await self._write((prefix, body), more=True)
            return
        received = self.skipped + len(body)
        if is_blank(body):
            body = b"null"
        size = len(prefix) + len(body) + 1
        length = size if received else self._length_of_nothing(held, size)
        await self._send_start(self._wrapped_start(held, length))
        await self._write((prefix, body, b"}"), more=False)

    def _length_of_nothing(self, held: Message, size: int) -> int | None:
        """The Content-Length for an app that sent no body: `size`, that of `"data":null`."""
        if self.scope["method"] != "HEAD":
            return size
        # A HEAD answered without the body (RFC 9110 §9.3.2 allows it): unless the app
        # says the GET's body is empty too (Content-Length: 0), the envelope's length
        # is unknown, so none is sent, which §8.6 allows.
        declared = header_value(held.get("headers") or [], b"content-length")
        return size if declared is not None and bytes(declared).strip(b" \t0") == b"" else None

    def _streamed_length(self, held: Message, overhead: int) -> int | None:
        # The app's Content-Length, if it gave one, plus the envelope around it;
        # otherwise none, and the server frames the body (chunked, RFC 9112 §7.1).
        declared = header_value(held.get("headers") or [], b"content-length")
        if declared is None:
            return None
        declared = bytes(declared)  # a bytearray or memoryview, which servers accept
        if not declared.isdigit() or len(declared) > _MAX_LENGTH_DIGITS:
            return None
        # What was dropped from the start was counted in the app's length.
        return int(declared) + overhead - self.skipped

    def _wrapped_start(self, held: Message, content_length: int | None) -> Message:
        headers = self.wrapped_headers
        headers.append((b"content-type", b"application/json"))
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        headers.append((self.middleware.id_header, self.request_id))
        return {"type": "http.response.start", "status": held["status"], "headers": headers}
