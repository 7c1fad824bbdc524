"""Carry the current request id to backend services on outgoing httpx/httpx2 requests.

Nothing here imports httpx or httpx2: the hooks only touch `request.headers`,
which both clients' `Request` objects share.
"""

from __future__ import annotations

from typing import Protocol

from envelope_middleware.request_id import get_request_id

__all__ = ["DEFAULT_HEADER", "async_request_id_hook", "request_id_headers", "request_id_hook"]

DEFAULT_HEADER = "X-Request-ID"


class _MutableHeaders(Protocol):
    def __setitem__(self, key: str, value: str, /) -> None: ...


class _OutgoingRequest(Protocol):
    @property
    def headers(self) -> _MutableHeaders: ...


def request_id_headers(header: str = DEFAULT_HEADER) -> dict[str, str]:
    """`{header: id}` for the current request, or `{}` outside one."""
    request_id = get_request_id()
    return {header: request_id} if request_id is not None else {}


def request_id_hook(request: _OutgoingRequest) -> None:
    """A `request` event hook for `httpx.Client` / `httpx2.Client`."""
    request_id = get_request_id()
    if request_id is not None:
        request.headers[DEFAULT_HEADER] = request_id


async def async_request_id_hook(request: _OutgoingRequest) -> None:
    """A `request` event hook for `httpx.AsyncClient` / `httpx2.AsyncClient`.

    `AsyncClient(event_hooks={"request": [async_request_id_hook]})`
    """
    request_id_hook(request)
