"""Where the reference gateway's time goes, per `GET /orders?size=2` (issue #11).

The gateway runs in this process on uvloop, called as a server calls it (no
network in front), and forwards over real HTTP to the demo orders service,
a uvicorn process of its own on loopback. What each piece costs is CPU time of
this process per request, the median over interleaved rounds:

    gateway            the gateway as it ships (envelope, access log, aiohttp)
    no access log      the same with access_log=False
    no envelope        the same without EnvelopeMiddleware
    httpx2 client      the gateway as it ships, calling the service with httpx2

and, called alone in the same rounds, the pieces a request runs through: the
partner's Basic credential checked (`authorize`), the query validated, and the
backend call itself (aiohttp, and httpx2). What the pieces leave of the
gateway without the envelope is Starlette's routing, request and response
objects, and the event loop.

    python benchmarks/gateway_profile.py                 # about two minutes
    python benchmarks/gateway_profile.py --markdown benchmarks/results/gateway_profile.md
    python benchmarks/gateway_profile.py --instructions 300   # also callgrind's count (valgrind)

Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
from floor import LoggedLayer, callgrind_count, compiled_wheel_package
from inprocess import code_version
from load import free_port, launch, stop_server, uvicorn_command
from starlette.requests import Request

from envelope_middleware import configure_logging
from envelope_middleware.demo import CREDENTIALS, create_gateway
from envelope_middleware.demo.auth import authorize
from envelope_middleware.demo.forwarding import HttpClient, open_backend
from envelope_middleware.demo.gateway import _validated_query

AUTH = b"Basic " + base64.b64encode(f"{CREDENTIALS[0].partner_key}:{CREDENTIALS[0].secret}".encode())
QUERY = {"page": 1, "size": 2}
Step = Callable[[], Awaitable[None]]


def orders() -> Any:
    """uvicorn's factory for the demo orders service on its own."""
    from envelope_middleware.demo.backends import create_backends  # noqa: PLC0415 - the server's import

    return create_backends()["orders"]


def scope(app: Any, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": "/orders",
        "raw_path": b"/orders",
        "root_path": "",
        "query_string": b"size=2",
        "headers": [(b"authorization", AUTH), (b"host", b"gateway")],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "app": app,
        "state": dict(state),
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _discard(message: dict[str, Any]) -> None:
    return None


async def steps(url: str, stack: contextlib.AsyncExitStack) -> dict[str, Step]:
    """Each measured thing as one request's worth of work."""
    backends = {"orders": url, "branches": url, "brands": url}
    measured: dict[str, Step] = {}
    variants: dict[str, dict[str, Any]] = {
        "gateway": {},
        "no access log": {"access_log": False},
        "no envelope": {"envelope": False},
        "httpx2 client": {"http_client": "httpx2"},
    }
    for name, options in variants.items():
        app = create_gateway(backends, **options)
        state: Any = await stack.enter_async_context(app.router.lifespan_context(app)) or {}

        async def request(app: Any = app, state: Any = state) -> None:
            await app(scope(app, state), _receive, _discard)

        measured[name] = request
    by_key = {credential.partner_key: credential for credential in CREDENTIALS}
    plain = scope(None, {})

    async def auth() -> None:
        authorize(Request(plain), by_key, "orders:read")

    async def validation() -> None:
        _validated_query(Request(plain), filters=("brand_id", "branch_id"))

    async def request_object() -> None:
        Request(plain)

    measured |= {"auth": auth, "validation": validation, "Request object": request_object}
    clients: tuple[HttpClient, ...] = ("aiohttp", "httpx2")
    for client in clients:
        backend = open_backend("orders", url, 5.0, client)
        stack.push_async_callback(backend.aclose)

        async def call(backend: Any = backend) -> None:
            await backend.request("GET", "/orders", params=QUERY)

        measured[f"backend call, {client}"] = call
    return measured


async def cpu_per_call(step: Step, count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        await step()
    return (time.process_time() - started) / count * 1e6


async def measure(url: str, rounds: int, count: int) -> dict[str, list[float]]:
    """Each thing's CPU µs per call, one figure per round, rounds in the same order for all."""
    async with contextlib.AsyncExitStack() as stack:
        measured = await steps(url, stack)
        for step in measured.values():
            await cpu_per_call(step, count // 4)  # warm-up: connections, caches
        samples: dict[str, list[float]] = {name: [] for name in measured}
        for _ in range(rounds):
            for name in random.sample(list(measured), len(measured)):
                samples[name].append(await cpu_per_call(measured[name], count))
    return samples


def paired(samples: dict[str, list[float]], minuend: str, subtrahend: str) -> float:
    """The median of each round's difference: the drift between rounds cancels."""
    return statistics.median(a - b for a, b in zip(samples[minuend], samples[subtrahend], strict=True))


def report(samples: dict[str, list[float]], args: argparse.Namespace, version: str) -> str:
    cpu = {name: statistics.median(values) for name, values in samples.items()}
    auth = paired(samples, "auth", "Request object")
    validation = paired(samples, "validation", "Request object")
    plain, client = cpu["no envelope"], cpu["backend call, aiohttp"]
    rest = plain - auth - validation - client
    envelope = paired(samples, "no access log", "no envelope")
    access_log = paired(samples, "gateway", "no access log")
    whole = cpu["gateway"]
    rows = [
        ("the backend call (aiohttp, alone)", client),
        ("Starlette: routing, request and response objects, the loop (the rest)", rest),
        ("EnvelopeMiddleware, without its access log", envelope),
        ("the access log (configure_logging)", access_log),
        ("auth: the Basic credential checked", auth),
        ("validation: page, size and the filters", validation),
    ]
    lines = [
        f"# Where the reference gateway's time goes ({version})",
        "",
        (
            f"Command: `python benchmarks/gateway_profile.py --rounds {args.rounds} --count {args.count}"
            f"{f' --instructions {args.instructions}' if args.instructions else ''}`. "
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
            "`GET /orders?size=2` through the gateway in this process (uvloop, no server in front; "
            "core 1), forwarded over HTTP to the orders service under uvicorn (core 0). CPU time of "
            f"this process per request, median of {args.rounds} interleaved rounds of {args.count} "
            "requests or calls each; the envelope, the access log, auth and validation are medians "
            "of each round's difference (with and without them), which cancels the drift between rounds."
        ),
        "",
        "| piece | µs CPU per request | share of the gateway |",
        "|---|---|---|",
        *(f"| {label} | {value:.1f} | {value / whole:.1%} |" for label, value in rows),
        f"| **the gateway as it ships** | **{whole:.1f}** | 100% |",
        "",
        (
            f"With httpx2 as its client the same gateway takes {cpu['httpx2 client']:.1f} µs per request; "
            f"an httpx2 call alone {cpu['backend call, httpx2']:.1f} µs against aiohttp's {client:.1f}. "
            "The envelope with its access log is "
            f"{(envelope + access_log) / whole:.1%} of the gateway with aiohttp, and "
            f"{(envelope + access_log) / cpu['httpx2 client']:.1%} of it with httpx2: the faster the "
            "gateway, the larger the envelope's share."
        ),
    ]
    return "\n".join(lines)


FLOOR = "floor"
WHEEL = "gateway, compiled wheel"
INSTRUCTION_VARIANTS: dict[str, dict[str, Any]] = {
    "no envelope": {"envelope": False},
    # The gateway without the envelope, behind floor.py's `checked + log line` layer: the
    # contract's required work in Python with one access line, the least the envelope's
    # place in the gateway can cost (it sends no request id on to the backend).
    FLOOR: {"envelope": False},
    "no access log": {"access_log": False},
    "gateway": {},
    # The gateway as it ships, its process importing the compiled wheel ($WHEEL_DIR).
    WHEEL: {},
}


def serve_requests(url: str, variant: str, count: int) -> None:
    """`count` requests (after 100 to warm up) through one gateway: what callgrind counts."""

    async def requests() -> None:
        app = create_gateway({"orders": url, "branches": url, "brands": url}, **INSTRUCTION_VARIANTS[variant])
        async with app.router.lifespan_context(app) as state:
            started: Any = state or {}
            # Called as the server calls it, with this file's receive and send.
            request: Any = LoggedLayer(app) if variant == FLOOR else app
            for _ in range(100 + count):
                await request(scope(app, started), _receive, _discard)

    uvloop.run(requests())


def instructions(url: str, count: int) -> dict[str, float]:
    """Instructions per request of each variant: callgrind, N requests against 0, hash seed fixed.

    Steady where CPU time is not: the gateway's own instructions, whatever else
    the machine does (the kernel's share of a request is not counted).
    """
    per_request: dict[str, float] = {}
    for variant in INSTRUCTION_VARIANTS:
        counts = [
            callgrind_count(__file__, "--one", url, variant, str(n), wheel=variant == WHEEL)
            for n in (0, count)
        ]
        per_request[variant] = (counts[1] - counts[0]) / count
    return per_request


def instruction_lines(per_request: dict[str, float], count: int) -> list[str]:
    names = ("no envelope", FLOOR, "no access log", "gateway", WHEEL)
    plain, floor, unlogged, whole, wheel = (per_request[name] for name in names)
    return [
        "",
        (
            f"Instructions per request (`--instructions`: callgrind, {count} requests against 0, "
            "PYTHONHASHSEED=0), the gateway's own, steady from run to run:"
        ),
        "",
        "| gateway | instructions per request | share of the gateway |",
        "|---|---|---|",
        f"| no envelope | {plain / 1000:.1f}k | {plain / whole:.1%} |",
        (
            f"| EnvelopeMiddleware, without its access log | +{(unlogged - plain) / 1000:.1f}k | "
            f"{(unlogged - plain) / whole:.1%} |"
        ),
        f"| the access log | +{(whole - unlogged) / 1000:.1f}k | {(whole - unlogged) / whole:.1%} |",
        f"| **the gateway as it ships** | **{whole / 1000:.1f}k** | 100% |",
        "",
        "The envelope with its access log against the least it could cost, as a share of each gateway:",
        "",
        "| in place of the envelope | instructions per request | added | share of that gateway |",
        "|---|---|---|---|",
        *(
            f"| {label} | {total / 1000:.1f}k | +{(total - plain) / 1000:.1f}k | "
            f"{(total - plain) / total:.1%} |"
            for label, total in (
                ("floor.py's `checked + log line` (Python)", floor),
                ("EnvelopeMiddleware + access log, Python", whole),
                ("EnvelopeMiddleware + access log, compiled wheel", wheel),
            )
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--count", type=int, default=400, help="requests or calls per round and piece")
    parser.add_argument("--markdown", help="also write the report to this file")
    parser.add_argument(
        "--instructions",
        type=int,
        metavar="N",
        help="also count instructions over N requests (needs valgrind)",
    )
    parser.add_argument("--one", nargs=3, metavar=("URL", "VARIANT", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        configure_logging(stream=open(os.devnull, "wb"))  # noqa: SIM115, PTH123 - the process's log
        serve_requests(args.one[0], args.one[1], int(args.one[2]))
        return 0
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})  # the service is pinned to core 0
    configure_logging(stream=open(os.devnull, "wb"))  # noqa: SIM115, PTH123 - the process's log
    version = code_version()
    port = free_port()
    server = launch(
        uvicorn_command("gateway_profile:orders", port), f"http://127.0.0.1:{port}/orders", core=0
    )
    try:
        samples = uvloop.run(measure(f"http://127.0.0.1:{port}", args.rounds, args.count))
        if args.instructions:
            os.environ["WHEEL_DIR"] = compiled_wheel_package()
        counted = instructions(f"http://127.0.0.1:{port}", args.instructions) if args.instructions else None
    finally:
        stop_server(server)
    text = report(samples, args, version)
    if counted is not None:
        text += "\n" + "\n".join(instruction_lines(counted, args.instructions))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
