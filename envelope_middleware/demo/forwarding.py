"""The gateway's backend call: aiohttp to services over HTTP, httpx2 to in-process ones.

The backend call is where the gateway spends most of its time (issue #11).
Over HTTP, aiohttp takes about a seventh of the CPU httpx2 takes per call and
serves about seven times the requests per second at 32 concurrent calls
(`benchmarks/results/clients.md`). It has
no in-process transport, so backends given as ASGI apps (the demo's default,
and the tests') are still called through httpx2's.
"""

from __future__ import annotations

import http.cookiejar
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
import httpx2
import orjson
from starlette.types import ASGIApp

from envelope_middleware.propagation import request_id_headers

__all__ = ["Backend", "HttpClient", "Upstream", "open_backend"]

HttpClient = Literal["aiohttp", "httpx2"]

# What the gateway relays of a backend's answer besides its body and status.
_RELAYED = ("retry-after",)
_JSON = {"content-type": "application/json"}


@dataclass(frozen=True, slots=True)
class Upstream:
    """A backend's answer: status, content type (every value, joined) and the relayed headers."""

    status: int
    content_type: str
    headers: dict[str, str]
    body: bytes


class Backend(Protocol):
    async def request(
        self, method: str, path: str, *, params: dict[str, int] | None = None, json: Any = None
    ) -> Upstream: ...

    async def aclose(self) -> None: ...


class AiohttpBackend:
    """A service over HTTP, through one aiohttp session and its keep-alive pool.

    Redirects are not followed (aiohttp follows them unless told, per call),
    no cookie is kept between partners, and the environment's proxies are
    not the backends' concern. Its exceptions are left to the middleware:
    a timeout is a 504, a connection or protocol failure a 502.
    """

    def __init__(self, base_url: str, timeout: float) -> None:
        self.session = aiohttp.ClientSession(
            base_url=base_url if base_url.endswith("/") else base_url + "/",
            connector=aiohttp.TCPConnector(limit=100),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    async def request(
        self, method: str, path: str, *, params: dict[str, int] | None = None, json: Any = None
    ) -> Upstream:
        headers = request_id_headers()
        if json is not None:
            headers.update(_JSON)
        async with self.session.request(
            method,
            # Relative to the base URL, so a base with a path prefix keeps it.
            path.lstrip("/"),
            params={name: str(value) for name, value in params.items()} if params else None,
            data=orjson.dumps(json) if json is not None else None,
            headers=headers,
            allow_redirects=False,
        ) as response:
            body = await response.read()
            found = response.headers
            return Upstream(
                response.status,
                # Two Content-Type headers are read as both, as httpx2 joins them: never JSON.
                ", ".join(found.getall("content-type", ())),
                {name: found[name] for name in _RELAYED if name in found},
                body,
            )

    async def aclose(self) -> None:
        await self.session.close()


class HttpxBackend:
    """A service called through an httpx2 client: its ASGI transport in process, or over HTTP."""

    def __init__(self, client: httpx2.AsyncClient) -> None:
        self.client = client

    async def request(
        self, method: str, path: str, *, params: dict[str, int] | None = None, json: Any = None
    ) -> Upstream:
        response = await self.client.request(
            method, path, params=params, json=json, headers=request_id_headers()
        )
        found = response.headers
        return Upstream(
            response.status_code,
            found.get("content-type", ""),  # httpx2 joins several values
            {name: found[name] for name in _RELAYED if name in found},
            response.content,
        )

    async def aclose(self) -> None:
        await self.client.aclose()


def _refusing_jar() -> http.cookiejar.CookieJar:
    # No domain is allowed, so no cookie is ever stored or sent.
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def open_backend(
    name: str, target: ASGIApp | str, timeout: float, http_client: HttpClient = "aiohttp"
) -> Backend:
    """The backend `name`: over HTTP for a base URL, in process for an ASGI app.

    `http_client="httpx2"` calls HTTP backends with httpx2, as the gateway did
    before issue #11: the baseline `benchmarks/gateway_load.py` measures against.
    """
    if isinstance(target, str) and http_client == "aiohttp":
        return AiohttpBackend(target, timeout)
    # The same isolation as aiohttp's: nothing from the environment, no cookies kept.
    isolated: dict[str, Any] = {"trust_env": False, "cookies": _refusing_jar()}
    if isinstance(target, str):
        return HttpxBackend(httpx2.AsyncClient(base_url=target, timeout=timeout, **isolated))
    transport = httpx2.ASGITransport(app=target)
    return HttpxBackend(httpx2.AsyncClient(transport=transport, base_url=f"http://{name}", **isolated))
