"""Per-request cost of the envelope, in process, against a bare Starlette app.

Every stack is the same Starlette app serving a pre-encoded JSON body, with
one middleware in front of it (or none: the baseline). The stacks are driven
in interleaved rounds, each round in a fresh random order, and each stack's
cost is reported as the median over rounds of (stack - bare) measured in the
same round: this machine's speed drifts within seconds, and pairing cancels
the drift that a plain median would keep.

    python benchmarks/inprocess.py                 # all sizes, ~2 minutes
    python benchmarks/inprocess.py --quick         # fewer rounds, for a look
    python benchmarks/inprocess.py --markdown out.md
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import orjson
from asgi_correlation_id import CorrelationIdMiddleware
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from envelope_middleware import EnvelopeMiddleware, configure_logging, hex_request_id

SIZES = {"200B": 200, "100KB": 100_000, "1MB": 1_000_000}


def payload(size: int) -> bytes:
    """A realistic paginated orders body of about `size` bytes."""
    rng = random.Random(size)
    orders: list[dict[str, Any]] = []
    body = b""
    while len(body) < size:
        orders.append(
            {
                "id": f"ord_{len(orders):06d}",
                "status": rng.choice(["pending", "accepted", "delivered"]),
                "total": round(rng.uniform(1, 300), 2),
                "items": [{"sku": f"SKU-{rng.randint(1, 999)}", "qty": rng.randint(1, 4)}],
            }
        )
        body = orjson.dumps({"page": 1, "size": len(orders), "total": 10_000, "orders": orders})
    if size < 1000:
        body = orjson.dumps(
            {"page": 1, "size": 1, "total": 1, "orders": [{"id": "ord_1", "note": "x" * (size - 60)}]}
        )
    return body


# -- comparison stacks -----------------------------------------------------------


class EmptyLayer:
    """A pass-through ASGI layer: the floor of what any middleware costs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class _BufferedEnvelope:
    """Hold the start and the body, then send the body `wrap` returns: how envelopes are often written."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @staticmethod
    def wrap(request_id: bytes, body: bytes) -> bytes:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = hex_request_id().encode()
        held: Message = {}
        chunks: list[bytes] = []

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                held.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = self.wrap(request_id, b"".join(chunks))
            headers = [(k, v) for k, v in held["headers"] if k != b"content-length"]
            headers += [(b"content-length", b"%d" % len(body)), (b"x-request-id", request_id)]
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, wrapped)


class BufferedOrjsonEnvelope(_BufferedEnvelope):
    """The common hand-written envelope: orjson.loads the body, orjson.dumps the envelope."""

    @staticmethod
    def wrap(request_id: bytes, body: bytes) -> bytes:
        return orjson.dumps({"request_id": request_id.decode(), "data": orjson.loads(body)})


class BufferedSplice(_BufferedEnvelope):
    """Splice bytes around the body, with no JSON check."""

    @staticmethod
    def wrap(request_id: bytes, body: bytes) -> bytes:
        return b'{"request_id":"' + request_id + b'","data":' + body + b"}"


class NaiveBaseHTTPEnvelope(BaseHTTPMiddleware):
    """The envelope as it is often first written: BaseHTTPMiddleware + json.loads/dumps."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        chunks = [chunk async for chunk in response.body_iterator]  # type: ignore[attr-defined]
        request_id = hex_request_id()
        data = json.loads(b"".join(chunks))
        headers = {k: v for k, v in response.headers.items() if k != "content-length"}
        headers["x-request-id"] = request_id
        return Response(
            json.dumps({"request_id": request_id, "data": data}),
            status_code=response.status_code,
            headers=headers,
            media_type="application/json",
        )


def quiet_structlog() -> None:
    """Logging as the README recommends for production (`configure_logging()`), to /dev/null."""
    sink = open(os.devnull, "wb")  # noqa: SIM115, PTH123 - kept open for the process's logging
    atexit.register(sink.close)
    configure_logging(stream=sink)


def stacks(body: bytes) -> dict[str, ASGIApp]:
    async def endpoint(request: Request) -> Response:
        return Response(body, media_type="application/json")

    def app(*middleware: Middleware) -> ASGIApp:
        return Starlette(routes=[Route("/orders", endpoint)], middleware=list(middleware))

    env = EnvelopeMiddleware
    return {
        "bare": app(),
        "empty ASGI layer": app(Middleware(EmptyLayer)),
        "asgi-correlation-id": app(Middleware(CorrelationIdMiddleware)),
        "naive BaseHTTP + json": app(Middleware(NaiveBaseHTTPEnvelope)),
        "buffered orjson envelope": app(Middleware(BufferedOrjsonEnvelope)),
        "buffered byte splice": app(Middleware(BufferedSplice)),
        "ours: validating, no context, no log": app(
            Middleware(env, access_log=False, bind_contextvars=False)
        ),
        "ours: trusted, no context, no log": app(
            Middleware(env, validate_json=False, access_log=False, bind_contextvars=False)
        ),
        "ours: validating + context": app(Middleware(env, access_log=False)),
        "ours: trusted + context": app(Middleware(env, validate_json=False, access_log=False)),
        "ours: validating + context + access log": app(Middleware(env)),
    }


# -- driver ------------------------------------------------------------------------

SCOPE: Scope = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/orders",
    "raw_path": b"/orders",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"gateway"), (b"accept", b"application/json"), (b"user-agent", b"bench")],
    "client": ("127.0.0.1", 5000),
    "server": ("127.0.0.1", 8000),
}


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Message) -> None:
    return None


async def batch(app: ASGIApp, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        await app({**SCOPE, "state": {}}, receive, send)
    return (time.perf_counter() - start) / count


@dataclass
class Result:
    stack: str
    size: str
    median_us: float
    added_us: float
    added_iqr: tuple[float, float]
    round_deltas: list[float]  # each round's (stack - bare), in round order


def measure(size_name: str, body: bytes, rounds: int, loop: asyncio.AbstractEventLoop) -> list[Result]:
    apps = stacks(body)
    # 2000 requests per batch for small bodies (a microsecond's difference needs
    # them: issue #11's access-log goal is 3 us), fewer as bodies grow.
    count = max(20, min(2000, 400_000_000 // (len(body) * 20 + 200_000)))
    for app in apps.values():  # warm up: imports, caches, first-use logger setup
        loop.run_until_complete(batch(app, max(5, count // 10)))
    samples: dict[str, list[float]] = {name: [] for name in apps}
    deltas: dict[str, list[float]] = {name: [] for name in apps}
    names = list(apps)
    for _ in range(rounds):
        random.shuffle(names)
        gc.collect()
        this_round = {name: loop.run_until_complete(batch(apps[name], count)) for name in names}
        for name, seconds in this_round.items():
            samples[name].append(seconds)
            deltas[name].append(seconds - this_round["bare"])
    results = []
    for name in apps:
        q = statistics.quantiles(deltas[name], n=4) if rounds >= 4 else [deltas[name][0]] * 3
        results.append(
            Result(
                name,
                size_name,
                statistics.median(samples[name]) * 1e6,
                statistics.median(deltas[name]) * 1e6,
                (q[0] * 1e6, q[2] * 1e6),
                deltas[name],
            )
        )
    return results


def validators(body: bytes, repeat: int) -> dict[str, float]:
    """Cost of the JSON check alone, next to the decoders it replaces."""
    from envelope_middleware._http import json_error  # noqa: PLC0415 - the private function under test

    raw = msgspec.json.Decoder(type=msgspec.Raw)
    candidates: dict[str, Callable[[], object]] = {
        "orjson.loads": lambda: orjson.loads(body),
        "json.loads": lambda: json.loads(body),
        "msgspec Raw": lambda: raw.decode(body),
        "json_error (msgspec Raw + UTF-8)": lambda: json_error(body),
    }
    number = max(3, min(5000, 50_000_000 // (len(body) * 10 + 1000)))
    out = {}
    for name, fn in candidates.items():
        best = min(timeit_once(fn, number) for _ in range(5))
        out[name] = best * 1e6
    return out


def timeit_once(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def code_version() -> str:
    """The commit the figures are for, marked when the measured code has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "envelope_middleware", "benchmarks/*.py"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "code of unknown commit"
    return f"code at commit {commit}" + (" with uncommitted changes" if changed else "")


def report(results: list[Result], checks: dict[str, dict[str, float]], rounds: int) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [
        f"Machine: {machine}; {code_version()}; {rounds} interleaved rounds per size.",
        "",
        "Added cost per request in microseconds: median of the paired (stack - bare)",
        "differences, interquartile range in brackets.",
        "",
        "| stack | " + " | ".join(SIZES) + " |",
        "|---|" + "---|" * len(SIZES),
    ]
    by_stack: dict[str, dict[str, Result]] = {}
    for r in results:
        by_stack.setdefault(r.stack, {})[r.size] = r
    for stack, per_size in by_stack.items():
        cells = []
        for size in SIZES:
            r = per_size[size]
            if stack == "bare":
                cells.append(f"{r.median_us:.1f} (baseline)")
            else:
                cells.append(f"+{r.added_us:.1f} [{r.added_iqr[0]:.1f}, {r.added_iqr[1]:.1f}]")
        lines.append(f"| {stack} | " + " | ".join(cells) + " |")
    lines += ["", "JSON check alone, best of 5, microseconds per body:", ""]
    lines += ["| check | " + " | ".join(SIZES) + " |", "|---|" + "---|" * len(SIZES)]
    for name in next(iter(checks.values())):
        lines.append(f"| {name} | " + " | ".join(f"{checks[s][name]:.1f}" for s in SIZES) + " |")
    lines += ["", *goals(by_stack, checks)]
    return "\n".join(lines)


def goals(by_stack: dict[str, dict[str, Result]], checks: dict[str, dict[str, float]]) -> list[str]:
    def added(stack: str, size: str = "200B") -> float:
        return by_stack[stack][size].added_us

    cid = added("asgi-correlation-id")
    full = added("ours: validating + context")
    bare_envelope = added("ours: validating, no context, no log")
    logged = added("ours: validating + context + access log")
    # The access event alone: logged minus unlogged within each round, then the median.
    access = statistics.median(
        (on - off) * 1e6
        for on, off in zip(
            by_stack["ours: validating + context + access log"]["200B"].round_deltas,
            by_stack["ours: validating + context"]["200B"].round_deltas,
            strict=True,
        )
    )
    trusted_small, trusted_big = added("ours: trusted + context"), added("ours: trusted + context", "1MB")
    check_big = checks["1MB"]["json_error (msgspec Raw + UTF-8)"]
    loads_big = checks["1MB"]["orjson.loads"]
    return [
        "Goals (issue #2), read from this run:",
        "",
        (
            f"- full contract (id, envelope, context), 200 B: +{full:.1f} us, "
            f"{full / cid:.2f} of asgi-correlation-id's +{cid:.1f} us (goal: at most 0.33)"
        ),
        f"- trusted mode: +{trusted_big:.1f} us at 1 MB against +{trusted_small:.1f} us at 200 B",
        (
            f"- the JSON check at 1 MB: {check_big:.0f} us, {check_big / loads_big:.2f} "
            f"of an orjson.loads ({loads_big:.0f} us)"
        ),
        f"- context binding alone: +{full - bare_envelope:.1f} us; access log alone: +{logged - full:.1f} us",
        (
            f"- the access event (issue #11), under `configure_logging()` to /dev/null: +{access:.1f} us "
            "per request, the median of each round's difference with the log on and off (goal: at most 3)"
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    parser.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args(argv)
    rounds = 5 if args.quick else args.rounds
    quiet_structlog()
    loop = asyncio.new_event_loop()
    results: list[Result] = []
    checks: dict[str, dict[str, float]] = {}
    for size_name, size in SIZES.items():
        body = payload(size)
        print(f"measuring {size_name} ({len(body)} bytes)...", file=sys.stderr)
        results += measure(size_name, body, rounds, loop)
        checks[size_name] = validators(body, rounds)
    loop.close()
    text = report(results, checks, rounds)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as out:  # noqa: PTH123
            out.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
