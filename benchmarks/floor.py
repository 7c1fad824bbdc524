"""What the contract's required work costs at the least, in instructions per request.

Issue #2 asks the full contract (id, envelope, context) to add at most a third
of what asgi-correlation-id adds. This script measures a staircase of minimal
layers, each adding one piece the contract requires and nothing else (no
edge cases, no error handling), so the floor under that goal is read from
counts rather than guessed:

    empty       an ASGI layer that only awaits the app
    id          + a pooled hex id, set in scope state and a ContextVar (token, reset)
    forward     + an async `send` closure the app's messages pass through
    splice      + the start held, the body spliced into the envelope, headers rebuilt
    context     + structlog's three ContextVars (request_id, method, path)
    checked     + the header scan and the msgspec JSON check
    checked + log line   + one access line: orjson.dumps of the access event's
                fields, written to a buffered file (issue #11's floor for the access log)
    compiled    what `checked` does, written in C (cfloor.c)
    compiled, no context   the same without structlog's three ContextVars

against asgi-correlation-id and EnvelopeMiddleware (validating, context, no
access log), the latter also with its access log under `configure_logging()`
(the recommended set-up) writing to /dev/null, and both of these again as the
compiled wheel ships them (`scripts/build-wheels`: the per-request modules
compiled by mypyc). The
compiled layer is a measuring prototype that serves this one response shape;
it shows what the goal asks of compiled code, and is built with the system C
compiler when this script starts. Each stack wraps a raw
ASGI app sending a 200 B JSON body, and is run under `valgrind
--tool=callgrind` for 0 and N requests with a fixed PYTHONHASHSEED: the
difference divided by N is repeatable to a few hundred instructions, whatever
else the machine is doing.

    python benchmarks/floor.py               # needs valgrind and a C compiler; about 3 minutes
    python benchmarks/floor.py --markdown benchmarks/results/floor.md
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path

import msgspec
import orjson
from asgi_correlation_id import CorrelationIdMiddleware
from inprocess import SCOPE, EmptyLayer, code_version, payload, quiet_structlog, receive
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from envelope_middleware import EnvelopeMiddleware, hex_request_id
from envelope_middleware._context import structlog_context_vars

BODY = payload(200)
LENGTH = b"%d" % len(BODY)
_request_id: ContextVar[str] = ContextVar("floor.request_id")
_check = msgspec.json.Decoder(type=msgspec.Raw).decode
_DROP = frozenset({b"content-length", b"content-type", b"x-request-id", b"etag", b"digest"})


async def service(scope: Scope, receive: Receive, send: Send) -> None:
    # Fresh messages per response, as a framework builds them: some layers
    # (asgi-correlation-id among them) replace the start's header list.
    headers = [(b"content-length", LENGTH), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


def envelope_start(held: Message, request_id: bytes, size: int) -> Message:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % size),
        (b"x-request-id", request_id),
    ]
    return {"type": "http.response.start", "status": held["status"], "headers": headers}


class IdLayer:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = hex_request_id()
        scope["state"]["request_id"] = request_id
        token = _request_id.set(request_id)
        try:
            await self.app(scope, receive, send)
        finally:
            _request_id.reset(token)


class ForwardLayer(IdLayer):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = hex_request_id()
        scope["state"]["request_id"] = request_id
        token = _request_id.set(request_id)

        async def forward(message: Message) -> None:
            await send(message)

        try:
            await self.app(scope, receive, forward)
        finally:
            _request_id.reset(token)


class SpliceLayer(IdLayer):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = hex_request_id()
        scope["state"]["request_id"] = request_id
        token = _request_id.set(request_id)
        encoded = request_id.encode()
        held: Message = {}

        async def splice(message: Message) -> None:
            if message["type"] == "http.response.start":
                held.update(message)
                return
            body = b'{"request_id":"' + encoded + b'","data":' + message["body"] + b"}"
            await send(envelope_start(held, encoded, len(body)))
            await send({"type": "http.response.body", "body": body})

        try:
            await self.app(scope, receive, splice)
        finally:
            _request_id.reset(token)


class ContextLayer(IdLayer):
    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)
        found = structlog_context_vars()
        if found is None:  # pragma: no cover - structlog moved its registry
            raise RuntimeError("structlog's ContextVars are not reachable")
        self.context_vars = found
        self.check = False
        self.log = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = hex_request_id()
        scope["state"]["request_id"] = request_id
        token = _request_id.set(request_id)
        id_var, method_var, path_var = self.context_vars
        tokens = (id_var.set(request_id), method_var.set(scope["method"]), path_var.set(scope["path"]))
        encoded = request_id.encode()
        held: Message = {}
        check = self.check
        started = time.perf_counter_ns() if self.log else 0

        async def splice(message: Message) -> None:
            if message["type"] == "http.response.start":
                if check:
                    kept = [pair for pair in message["headers"] if pair[0].lower() not in _DROP]
                    held.update(message, headers=kept)
                else:
                    held.update(message)
                return
            data: bytes = message["body"]
            if check:
                _check(data)
            body = b'{"request_id":"' + encoded + b'","data":' + data + b"}"
            await send(envelope_start(held, encoded, len(body)))
            await send({"type": "http.response.body", "body": body})

        try:
            await self.app(scope, receive, splice)
        finally:
            if self.log:
                event = {
                    "event": "http_request",
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": held.get("status"),
                    "duration_ms": (time.perf_counter_ns() - started) // 1000 / 1000,
                    "timestamp": time.time(),
                }
                _LOG.write(orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE))
            path_var.reset(tokens[2])
            method_var.reset(tokens[1])
            id_var.reset(tokens[0])
            _request_id.reset(token)


class CheckedLayer(ContextLayer):
    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)
        self.check = True


_LOG = open(os.devnull, "wb")  # noqa: SIM115, PTH123 - buffered, open for the process


class LoggedLayer(CheckedLayer):
    """`checked`, then one JSON line per request: the least an access log can cost."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)
        self.log = True


def compiled_layer(app: ASGIApp, *, context: bool = True) -> ASGIApp:
    """`checked` in C: cfloor.c, built by `build_compiled_layer` into $CFLOOR_DIR."""
    sys.path.insert(0, os.environ["CFLOOR_DIR"])
    cfloor = importlib.import_module("cfloor")
    found = structlog_context_vars()
    if found is None:  # pragma: no cover - structlog moved its registry
        raise RuntimeError("structlog's ContextVars are not reachable")
    context_vars = found if context else (None, None, None)
    layer: ASGIApp = cfloor.Layer(app, (_request_id, *context_vars), _check)
    return layer


WHEEL_STACK = "EnvelopeMiddleware, compiled wheel"
WHEEL_LOGGED_STACK = "EnvelopeMiddleware + access log, compiled wheel"


def compiled_wheel_package() -> str:
    """The compiled wheel as `scripts/build-wheels` makes it, unpacked; the folder holding it.

    Whoever puts this folder first on sys.path imports the package as that wheel
    ships it, with the checkout's demo beside it (no wheel carries the demo).
    """
    root = Path(__file__).resolve().parent.parent
    folder = Path(tempfile.mkdtemp(prefix="envelope-wheel-"))
    build = [str(root / "scripts" / "build-wheels"), str(folder / "wheels")]
    subprocess.run(build, check=True, stdout=subprocess.DEVNULL)
    [wheel] = (folder / "wheels").glob("envelope_middleware-*-cp*.whl")
    package = folder / "package"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(package)
    shutil.copytree(root / "envelope_middleware" / "demo", package / "envelope_middleware" / "demo")
    return str(package)


def build_compiled_layer() -> str:
    """Compile cfloor.c with the system C compiler; the folder holding the module."""
    folder = tempfile.mkdtemp(prefix="cfloor-")
    target = Path(folder) / f"cfloor{sysconfig.get_config_var('EXT_SUFFIX')}"
    source = Path(__file__).with_name("cfloor.c")
    include = sysconfig.get_paths()["include"]
    compiler = os.environ.get("CC", "cc")
    subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", f"-I{include}", str(source), "-o", str(target)], check=True
    )
    return folder


STACKS: dict[str, Callable[[ASGIApp], ASGIApp]] = {
    "service alone": lambda app: app,
    "empty": EmptyLayer,
    "id": IdLayer,
    "forward": ForwardLayer,
    "splice": SpliceLayer,
    "context": ContextLayer,
    "checked": CheckedLayer,
    "checked + log line": LoggedLayer,
    "compiled": compiled_layer,
    "compiled, no context": lambda app: compiled_layer(app, context=False),
    "asgi-correlation-id": CorrelationIdMiddleware,
    "EnvelopeMiddleware": lambda app: EnvelopeMiddleware(app, access_log=False),
    "EnvelopeMiddleware + access log": EnvelopeMiddleware,
    # The same two; their processes import the package from $WHEEL_DIR (see `instructions`).
    WHEEL_STACK: lambda app: EnvelopeMiddleware(app, access_log=False),
    WHEEL_LOGGED_STACK: EnvelopeMiddleware,
}


async def _discard(message: Message) -> None:
    return None


def run_requests(stack: str, count: int) -> None:
    """Serve `count` requests (after 50 to warm up) through `stack`: what valgrind counts."""
    quiet_structlog()
    app = STACKS[stack](service)

    async def requests() -> None:
        for _ in range(50 + count):
            await app({**SCOPE, "state": {}}, receive, _discard)

    asyncio.run(requests())


# A command run under this counts its instructions, and prints the total as it exits.
CALLGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")


def collected(stderr: str) -> int:
    """The instruction count callgrind printed on exit."""
    found = re.search(r"Collected : (\d+)", stderr)
    if found is None:  # pragma: no cover - valgrind changed its report
        raise RuntimeError(f"no instruction count in valgrind's output:\n{stderr}")
    return int(found.group(1))


def callgrind_count(script: str, *arguments: str, wheel: bool = False) -> int:
    """Instructions `python script arguments...` runs under callgrind, with a fixed hash seed.

    With `wheel`, the process imports the package from the compiled wheel in $WHEEL_DIR.
    """
    result = subprocess.run(
        [*CALLGRIND, sys.executable, script, *arguments],
        capture_output=True,
        text=True,
        check=True,
        env={
            **os.environ,
            "PYTHONHASHSEED": "0",
            **({"PYTHONPATH": os.environ["WHEEL_DIR"]} if wheel else {}),
        },
    )
    return collected(result.stderr)


def instructions(stack: str, count: int) -> int:
    return callgrind_count(
        __file__, "--one", stack, str(count), wheel=stack in (WHEEL_STACK, WHEEL_LOGGED_STACK)
    )


def per_request(stack: str, count: int) -> float:
    return (instructions(stack, count) - instructions(stack, 0)) / count


def report(costs: dict[str, float], count: int) -> str:
    base = costs["service alone"]
    cid = costs["asgi-correlation-id"] - base
    lines = [
        f"Python {platform.python_version()}, {code_version()}.",
        "",
        f"Instructions per request (callgrind, PYTHONHASHSEED=0, {count} requests against 0),",
        (
            f"added to a raw ASGI service sending a {len(BODY)} B JSON body "
            f"({base / 1000:.1f}k instructions on its own)."
        ),
        "",
        "| stack | added | of asgi-correlation-id |",
        "|---|---|---|",
    ]
    for stack, cost in costs.items():
        if stack != "service alone":
            added = cost - base
            lines.append(f"| {stack} | +{added / 1000:.1f}k | {added / cid:.2f} |")
    return "\n".join(lines)


def publish(text: str, markdown: str | Path | None) -> None:
    """Print a report, and write it to the `--markdown` file when one is named."""
    print(text)
    if markdown:
        Path(markdown).write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000, help="requests per measured run")
    parser.add_argument("--markdown", help="also write the report to this file")
    parser.add_argument("--one", nargs=2, metavar=("STACK", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        run_requests(args.one[0], int(args.one[1]))
        return 0
    os.environ["CFLOOR_DIR"] = build_compiled_layer()
    os.environ["WHEEL_DIR"] = compiled_wheel_package()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = list(pool.map(lambda stack: per_request(stack, args.count), STACKS))
    text = report(dict(zip(STACKS, counts, strict=True)), args.count)
    publish(text, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
