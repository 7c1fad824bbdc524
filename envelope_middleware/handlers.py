"""Exception handlers that hand an app's exceptions to the envelope middleware.

A Starlette or FastAPI app mounted inside the app the middleware wraps
(`app.mount("/v2", sub_app)`) has its own `ServerErrorMiddleware`. That
answers every exception it sees with a plain 500 and then re-raises it, so
the exception reaches the middleware only after a response is complete: an
`ApiError`'s code and headers, and the codes of `exception_codes`, are lost.

These handlers answer nothing themselves. Each puts the exception in the
request's state and returns a stand-in response; the middleware finds the
exception there when the stand-in arrives and answers for it as if it had
been raised to it: same code, message, details, headers and log line.
Without the middleware around the app, the stand-in is what the client gets.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from envelope_middleware._keys import HANDED_OVER_KEY
from envelope_middleware.exceptions import ApiError

__all__ = ["hand_over", "install_exception_handlers"]


def hand_over(request: Request, exc: Exception) -> None:
    """Leave `exc` for the envelope middleware to answer for this request."""
    request.scope.setdefault("state", {})[HANDED_OVER_KEY] = exc


async def _handed_over(request: Request, exc: Exception) -> Response:
    if request.scope["type"] != "http":
        # Starlette runs exception handlers for websocket scopes too; the contract,
        # and the middleware, cover HTTP responses only.
        raise exc
    hand_over(request, exc)
    if isinstance(exc, ApiError):
        return PlainTextResponse(exc.message, status_code=exc.status)
    return PlainTextResponse("Internal Server Error", status_code=500)


def install_exception_handlers(app: Starlette) -> None:
    """Make the exceptions of `app`, a mounted sub-app, reach the middleware around it.

    Handles `ApiError` (and so every catalogue class) and, through the app's
    `ServerErrorMiddleware`, any other exception. Handlers the app registers
    later for the same classes replace these.
    """
    app.add_exception_handler(ApiError, _handed_over)
    app.add_exception_handler(Exception, _handed_over)
