"""Answering errors: error responses and exceptions become `{"request_id", "error"}`."""

from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.types import Message

from envelope_middleware._errors import ERROR_BODY_LIMIT, Failure
from envelope_middleware._http import as_bytes, header_value, kept_on_error
from envelope_middleware._keys import HANDED_OVER_KEY
from envelope_middleware._wrapping import Wrapping

_LOGGED_BODY_LIMIT = 2048  # of a replaced 5xx body, in the log
# The note on an exception re-raised after the start: marked as the middleware's,
# so that it replaces only its own (an app may note an upstream's request id).
_NOTE = "request_id: {} (envelope_middleware)"
# What Starlette's ExceptionMiddleware raises, from the exception, when a handler
# exists for an exception raised after the app's start: too late for the handler,
# not for the middleware while it still holds that start. Starlette's own words:
# tests/test_after_start.py runs the installed Starlette, so a rewording fails there.
_HANDLED_TOO_LATE = ("Caught handled exception, but response already started.",)


class Answering(Wrapping):
    """The exchange's error answers, from the app's error responses and its exceptions."""

    async def _send_error_from_response(self, held: Message) -> None:
        headers = as_bytes(held.get("headers") or [])
        kept_body = b"".join(self.error_body)
        self.error_body = []
        state = self.scope.get("state")
        handed_over = state.pop(HANDED_OVER_KEY, None) if isinstance(state, dict) else None
        if isinstance(handed_over, Exception):
            # A handler's stand-in (envelope_middleware.handlers): the exception says what
            # the error is, and the stand-in's headers (CORS or cookies from a layer further
            # in) are kept as any error response's are.
            if self._client_left(handed_over):
                return  # no one to answer; the exception's end (fail or finish) logs it
            failure = self._exception_failure(handed_over)
        else:
            # A body cut at the limit is not parsed: half a document describes nothing.
            body = kept_body if self.body_size <= ERROR_BODY_LIMIT else b""
            failure = self.middleware.errors.from_response(
                held["status"],
                header_value(headers, b"content-type"),
                body,
                has_credentials=self._has_credentials(),
            )
        if failure.status >= 500 and kept_body and handed_over is None:
            # What the client will not see is kept for whoever reads the log.
            self.middleware.logger.warning(
                "error_body_replaced",
                request_id=self.request_id_str,
                status=failure.status,
                body_bytes=self.body_size,
                body_excerpt=kept_body[:_LOGGED_BODY_LIMIT].decode("utf-8", "replace"),
            )
        await self._send_error(failure, kept_on_error(headers, failure.status, self.middleware.error_drop))

    async def fail(self, exc: Exception) -> bool:
        """Answer for an exception from the app; False when it is too late to answer."""
        middleware = self.middleware
        request_id = self.request_id_str
        if self.answered is not None and _unwrap(exc) is self.answered:
            # Handed over, answered for and logged; re-raised by the sub-app's
            # ServerErrorMiddleware, as it re-raises whatever it handled.
            return True
        if self._client_left(exc):
            # No one to answer, and no server error in anyone's metrics.
            middleware.logger.warning("client_disconnected", request_id=request_id, exc_info=exc)
            return True
        if self.start_sent:
            # A response cut short must not pass for whole: the server aborts it.
            # A complete one stands; aborting it would only close the connection.
            middleware.logger.error(
                "exception_after_response_started",
                request_id=request_id,
                response_complete=self.complete,
                exc_info=exc,
            )
            if not self.complete:
                # Re-raised, the server logs it too, after the request's context is
                # reset: a note (PEP 678) puts the id in that line's traceback. One
                # exception object may be raised by many requests: this one's only.
                notes = getattr(exc, "__notes__", [])
                if isinstance(notes, list):  # add_note() refuses anything else
                    notes[:] = [note for note in notes if not _is_own_note(note)]
                    exc.add_note(_NOTE.format(request_id))
            return self.complete
        # Nothing has gone out: whatever the app had begun is discarded.
        self.held_start = None
        await self._send_answer(self._exception_failure(exc))
        return True

    def _exception_failure(self, exc: Exception) -> Failure:
        """What to answer for `exc`, logged: the client gets a generic message, the log the exception."""
        middleware = self.middleware
        request_id = self.request_id_str
        self.answered = raised = _unwrap(exc)
        failure = middleware.errors.from_exception(raised, has_credentials=self._has_credentials())
        if failure.log == "error":
            middleware.logger.error(
                "unhandled_exception", request_id=request_id, error_code=failure.code, exc_info=exc
            )
        elif failure.log == "warning":
            middleware.logger.warning(
                "mapped_exception", request_id=request_id, error_code=failure.code, exc_info=exc
            )
        return failure

    def _client_left(self, exc: Exception) -> bool:
        # The app failing to read from or write to a client that left: ASGI 2.4
        # servers raise OSError from a `send` (which Starlette's StreamingResponse
        # turns into ClientDisconnect), and Starlette raises ClientDisconnect from a
        # `receive` that said so. Anything else, even after a disconnect (a background
        # task's bug, the app's own OSError), is still the app's error.
        exc = _unwrap(exc)
        if self.send_failed:
            return isinstance(exc, OSError | ClientDisconnect)
        return self.disconnected and isinstance(exc, ClientDisconnect)

    async def finish(self) -> None:
        """The app returned without completing its response."""
        request_id = self.request_id_str
        if self.disconnected or self.send_failed:
            # Starlette's StreamingResponse stops this way when the client leaves.
            self.middleware.logger.warning("client_disconnected", request_id=request_id)
            return
        if self.start_sent:
            # The server sees an unfinished response and closes the connection.
            self.middleware.logger.error("app_returned_mid_response", request_id=request_id)
            return
        self.middleware.logger.error("app_returned_without_response", request_id=request_id)
        self.held_start = None
        await self._send_answer(self.middleware.errors.for_code("internal"))

    async def _send_answer(self, failure: Failure) -> None:
        """Send the middleware's answer for an app that failed, if the client is still there."""
        try:
            await self._send_error(failure, [])
        except OSError as exc:
            # ASGI 2.4: the server's send raised, the client left (see _client_left).
            # No app is left to see it, and the server is not to be told of an error.
            self.middleware.logger.warning(
                "client_disconnected", request_id=self.request_id_str, exc_info=exc
            )


def _is_own_note(note: object) -> bool:
    return (
        isinstance(note, str) and note.startswith("request_id: ") and note.endswith(" (envelope_middleware)")
    )


def _unwrap(exc: Exception) -> Exception:
    """The exception the app meant: through exception groups of one (anyio's task
    groups raise them) and Starlette's handled-too-late RuntimeError."""
    while True:
        if isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        elif (
            type(exc) is RuntimeError
            and exc.args == _HANDLED_TOO_LATE
            and isinstance(exc.__cause__, Exception)
        ):
            exc = exc.__cause__
        else:
            return exc
