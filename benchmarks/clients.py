"""HTTP clients for the gateway's backend call, side by side over real HTTP (issue #11).

The demo orders service runs under uvicorn (httptools, uvloop) in a process of its own
on a loopback port (core 0); this process (core 1) calls it as the gateway's `_forward`
does: `GET /orders?page=1&size=2`, a fresh 32-hex `x-request-id`, status, content-type and
the whole body read. Each round opens a new client per candidate and measures them all
in five turns, in a fresh random order each: sequential latency (median µs per call),
then 32 concurrent tasks (requests/s, and this process's CPU time per request), for
`--duration` s in all. Ratios are to `httpx2_today` in the same round, medians over
rounds. Every run ends with what each client raises or answers for a timeout, a refused
connection, and a small asyncio server on loopback that cuts a body off, sends a bad
status line, closes unanswered, redirects, sends two content-types, gzips, and echoes
the request's header names.

    python benchmarks/clients.py --duration 5 --rounds 5 --markdown benchmarks/results/clients.md
    python benchmarks/clients.py --duration 2 --rounds 1     # a look
    python benchmarks/clients.py --check-errors              # only the check

Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import httpcore2
import httpx2
import uvloop
from inprocess import code_version
from load import free_port, pinned, stop_server
from pyreqwest.client import ClientBuilder
from starlette.types import ASGIApp
from writes import serve_app

from envelope_middleware import async_request_id_hook
from envelope_middleware.demo.backends import create_backends
from envelope_middleware.demo.forwarding import _refusing_jar
from envelope_middleware.request_id import _request_id, hex_request_id

Answer = tuple[int, str, bytes]  # status, content-type, body
Fetch = Callable[[str, Mapping[str, int], str], Awaitable[Answer]]  # (path, query, request id)
Candidate = Callable[[str, float], AbstractAsyncContextManager[Fetch]]  # (base URL, timeout in s)
QUERY = {"page": 1, "size": 2}
CONCURRENCY = 32
SLICES = 5  # turns per round, each of --duration / SLICES s and --calls / SLICES calls
POOL = 64  # connections each tuned pool keeps: above CONCURRENCY, so none is closed and reopened


def orders() -> ASGIApp:
    """uvicorn's factory for the demo orders service on its own."""
    return create_backends()["orders"]


@asynccontextmanager
async def httpx2_today(base_url: str, bound: float) -> AsyncIterator[Fetch]:
    """As the gateway's `_lifespan` builds it; the hook reads the id the middleware bound."""
    hooks = {"request": [async_request_id_hook]}
    async with httpx2.AsyncClient(
        base_url=base_url, timeout=bound, event_hooks=hooks, cookies=_refusing_jar(), trust_env=False
    ) as client:

        async def fetch(path: str, query: Mapping[str, int], request_id: str) -> Answer:
            response = await client.request("GET", path, params=query or None)
            return response.status_code, response.headers.get("content-type", ""), response.content

        yield fetch


@asynccontextmanager
async def httpx2_tuned(base_url: str, bound: float) -> AsyncIterator[Fetch]:
    """No hook (the id passed per call); a pool that keeps a connection for each concurrent call."""
    limits = httpx2.Limits(max_connections=POOL, max_keepalive_connections=POOL)
    async with httpx2.AsyncClient(
        base_url=base_url, timeout=bound, limits=limits, cookies=_refusing_jar(), trust_env=False
    ) as client:

        async def fetch(path: str, query: Mapping[str, int], request_id: str) -> Answer:
            response = await client.request("GET", path, params=query, headers={"x-request-id": request_id})
            return response.status_code, response.headers.get("content-type", ""), response.content

        yield fetch


@asynccontextmanager
async def httpcore2_pool(base_url: str, bound: float) -> AsyncIterator[Fetch]:
    """httpx2's transport alone: no URL model, cookies or default headers; Host is set by hand."""
    host = httpx2.URL(base_url).netloc
    extensions = {"timeout": dict.fromkeys(("connect", "read", "write", "pool"), bound)}
    async with httpcore2.AsyncConnectionPool(max_connections=POOL, max_keepalive_connections=POOL) as pool:

        async def fetch(path: str, query: Mapping[str, int], request_id: str) -> Answer:
            url = f"{base_url}{path}?{urlencode(query)}" if query else f"{base_url}{path}"
            headers = [(b"host", host), (b"x-request-id", request_id.encode())]
            response = await pool.request("GET", url, headers=headers, extensions=extensions)
            # Header names come as the server spelled them; the last content-type is not looked at.
            content_type = next((v for k, v in response.headers if k.lower() == b"content-type"), b"")
            return response.status, content_type.decode("latin-1"), response.content

        yield fetch


@asynccontextmanager
async def aiohttp_session(base_url: str, bound: float) -> AsyncIterator[Fetch]:
    """One session, a keep-alive pool of POOL, no cookies kept, no proxies from the environment."""
    connector = aiohttp.TCPConnector(limit=POOL)
    async with aiohttp.ClientSession(
        base_url=base_url,
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=bound),
    ) as session:

        async def fetch(path: str, query: Mapping[str, int], request_id: str) -> Answer:
            # aiohttp follows redirects unless told, per request.
            async with session.get(
                path, params=query, headers={"x-request-id": request_id}, allow_redirects=False
            ) as response:
                body = await response.read()
                return response.status, response.headers.get("content-type", ""), body

        yield fetch


@asynccontextmanager
async def pyreqwest_client(base_url: str, bound: float) -> AsyncIterator[Fetch]:
    """Rust's reqwest (hyper) on its own Tokio thread; redirects and proxies off, as the gateway needs."""
    builder = ClientBuilder().base_url(base_url).timeout(timedelta(seconds=bound))
    client = builder.follow_redirects(enable=False).no_proxy().pool_max_idle_per_host(POOL).build()
    async with client:

        async def fetch(path: str, query: Mapping[str, int], request_id: str) -> Answer:
            request = client.get(path).query(dict(query)).header("x-request-id", request_id).build()
            response = await request.send()
            body = bytes(await response.bytes())
            return response.status, response.headers.get("content-type", ""), body

        yield fetch


CANDIDATES: dict[str, Candidate] = {
    "httpx2_today": httpx2_today,
    "httpx2_tuned": httpx2_tuned,
    "httpcore2_pool": httpcore2_pool,
    "aiohttp": aiohttp_session,
    "pyreqwest": pyreqwest_client,
}


async def call(fetch: Fetch, path: str = "/orders", query: Mapping[str, int] = QUERY) -> Answer:
    """One forwarded call: the id bound as the envelope middleware binds it, for the hook to read."""
    request_id = hex_request_id()
    token = _request_id.set(request_id)
    try:
        return await fetch(path, query, request_id)
    finally:
        _request_id.reset(token)


async def timed(fetch: Fetch) -> float | None:
    """Seconds one call took; None if it failed or was answered other than 200."""
    started = time.perf_counter()
    try:
        status = (await call(fetch))[0]
    except Exception:
        return None
    return time.perf_counter() - started if status == 200 else None


async def concurrent(fetch: Fetch, duration: float) -> list[float]:
    """[answered 200, failed, seconds, CPU seconds] of CONCURRENCY tasks calling for `duration`."""
    # One call per task first: whatever connection the server closed meanwhile is opened again.
    await asyncio.gather(*(timed(fetch) for _ in range(CONCURRENCY)))
    outcomes: list[bool] = []

    async def worker(deadline: float) -> None:
        while time.perf_counter() < deadline:
            outcomes.append(await timed(fetch) is not None)

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(started + duration) for _ in range(CONCURRENCY)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return [sum(outcomes), len(outcomes) - sum(outcomes), elapsed, cpu]


async def one_round(base_url: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Every candidate's client open at once, measured in SLICES short turns in a fresh random order
    each: the other load on this machine then weighs on all of them alike."""
    names = args.candidates
    latencies: dict[str, list[float | None]] = {name: [] for name in names}
    totals = {name: [0.0, 0.0, 0.0, 0.0] for name in names}
    async with AsyncExitStack() as stack:
        fetches = {name: await stack.enter_async_context(CANDIDATES[name](base_url, 10.0)) for name in names}
        for name, fetch in fetches.items():
            status, content_type, body = await call(fetch)
            if status != 200 or not content_type.startswith("application/json") or b'"orders"' not in body:
                raise RuntimeError(f"{name}: unexpected answer {status} {content_type} {body[:80]!r}")
            for _ in range(200):  # warm-up
                await call(fetch)
        for _ in range(SLICES):
            for name in random.sample(names, len(names)):
                latencies[name] += [await timed(fetches[name]) for _ in range(args.calls // SLICES)]
            for name in random.sample(names, len(names)):
                turn = await concurrent(fetches[name], args.duration / SLICES)
                totals[name] = [total + part for total, part in zip(totals[name], turn, strict=True)]
    results = {}
    for name, (done, errors, elapsed, cpu) in totals.items():
        ok = [latency for latency in latencies[name] if latency is not None]
        results[name] = {
            "us": statistics.median(ok) * 1e6,
            "rps": done / elapsed,
            "cpu_us": cpu / max(done, 1) * 1e6,
            "errors": errors + len(latencies[name]) - len(ok),
        }
    return results


async def compare(base_url: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    rounds = []
    for number in range(args.rounds):
        rounds.append(await one_round(base_url, args))
        print(f"round {number + 1}: {rounds[-1]}", file=sys.stderr)
    summary: dict[str, dict[str, float]] = {}
    for name in args.candidates:
        row = summary[name] = {"errors": sum(r[name]["errors"] for r in rounds)}
        for key in ("us", "rps", "cpu_us"):
            row[key] = statistics.median(r[name][key] for r in rounds)
            row[f"{key}_x"] = statistics.median(r[name][key] / r["httpx2_today"][key] for r in rounds)
    return summary


# -- what each client raises or answers for a bad backend ---------------------------

_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
_GZIPPED = gzip.compress(b'{"zipped": true}')
BAD_ANSWERS = {
    "/cut": _HEAD + b"content-length: 100\r\n\r\n" + b'{"orders": [',
    "/malformed": b"HTTP/1.1 2x0 WHAT\r\nno colon here\r\n\r\n",
    "/closed": b"",
    "/redirect": b"HTTP/1.1 302 Found\r\nlocation: /orders\r\ncontent-length: 0\r\n\r\n",
    "/two-types": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCONTENT-TYPE: text/html\r\n"
    b"content-length: 2\r\n\r\n{}",
    "/gzip": _HEAD + b"content-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(_GZIPPED) + _GZIPPED,
}


async def bad_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each connection's first request by its path, then closes; /echo sends back the head."""
    head = await reader.readuntil(b"\r\n\r\n")
    path = head.split(b" ", 2)[1].split(b"?")[0].decode()
    if path == "/echo":
        names = b", ".join(line.split(b":")[0] for line in head.split(b"\r\n")[1:] if line)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(names), names))
    else:
        writer.write(BAD_ANSWERS[path])
    await writer.drain()
    writer.close()


def described(error: BaseException) -> str:
    def name(kind: type) -> str:
        module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
        return module + kind.__qualname__

    bases = [name(kind) for kind in type(error).__mro__[1:-3]]  # not Exception, BaseException, object
    return f"`{name(type(error))}` ({', '.join(bases) or 'no other base'}): {str(error)[:70]!r}"


async def check_errors(orders_url: str, candidates: list[str]) -> list[str]:
    server = await asyncio.start_server(bad_backend, "127.0.0.1", 0)
    bad_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    cases = [
        ("timeout (backend sleeps 3 s, client bound 0.5 s)", orders_url, "/orders/ord_slow"),
        ("connection refused (closed port)", f"http://127.0.0.1:{free_port()}", "/orders"),
        *((f"`{path}`", bad_url, path) for path in [*BAD_ANSWERS, "/echo"]),
    ]
    lines = ["| client | case | raises, or answers (status, content-type, body) |", "|---|---|---|"]
    for name in candidates:
        for label, base_url, path in cases:
            async with CANDIDATES[name](base_url, 0.5) as fetch:
                try:
                    outcome = f"answers `{await call(fetch, path, {})!r}`"
                except Exception as error:
                    outcome = "raises " + described(error)
            lines.append(f"| {name} | {label} | {outcome.replace('|', '/')} |")
    server.close()
    return lines


def report(summary: dict[str, dict[str, float]], args: argparse.Namespace) -> list[str]:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    pinning = "backend on core 0, clients on core 1" if pinned([], 1) else "not pinned (no taskset)"
    versions = ", ".join(f"{name} {version(name)}" for name in ("uvloop", "httpx2", "aiohttp", "pyreqwest"))
    method = (
        f"`GET /orders?page=1&size=2` (about 500 B) from the demo orders service under uvicorn; "
        f"{args.rounds} rounds of {SLICES} interleaved turns; sequential: median of {args.calls} calls; "
        f"concurrent: {CONCURRENCY} tasks for {args.duration} s. Figures are medians over rounds; x is "
        "the median of each round's ratio to httpx2_today (for µs lower is better, for requests/s higher). "
        f"Client CPU: this process's CPU time (all its threads) per request at {CONCURRENCY} concurrent."
    )
    return [
        f"# HTTP clients for the gateway's backend call ({code_version()})",
        "",
        f"Machine: {machine}; {pinning}; {versions}.",
        f"Command: `python {shlex.join(['benchmarks/clients.py', *args.argv])}`",
        "",
        method,
        "",
        (
            f"| candidate | µs per request, sequential | x | requests/s, {CONCURRENCY} concurrent | x "
            "| client CPU µs per request | x | errors |"
        ),
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {row['us']:.0f} | {row['us_x']:.2f} | {row['rps']:.0f} | {row['rps_x']:.2f} "
            f"| {row['cpu_us']:.0f} | {row['cpu_us_x']:.2f} | {row['errors']:.0f} |"
            for name, row in summary.items()
        ),
    ]


async def run(args: argparse.Namespace, orders_url: str) -> list[str]:
    speed = [] if args.check_errors else report(await compare(orders_url, args), args)
    checks = await check_errors(orders_url, args.candidates)
    return [*speed, "", "## What each client raises or answers for a bad backend", "", *checks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of 32 concurrent tasks")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls timed per round")
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--check-errors", action="store_true", help="only what each client raises")
    parser.add_argument("--markdown", help="write the report here too")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if "httpx2_today" not in args.candidates:
        args.candidates.insert(0, "httpx2_today")  # every ratio is to it
    port = free_port()
    backend = serve_app("clients:orders", port, {}, health=f"http://127.0.0.1:{port}/orders?size=1")
    if pinned([], 1):  # the same test as load.py's: taskset there, two cores or more
        os.sched_setaffinity(0, {1})
    try:
        lines = uvloop.run(run(args, f"http://127.0.0.1:{port}"))
    finally:
        stop_server(backend)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
