"""Where EnvelopeMiddleware's work per request goes beyond floor.py's `checked` layer (issue #11).

floor.py counts the machine instructions each stack adds; this says which of
the middleware's functions they run in. One warmed-up request of 200 B is traced
with `sys.settrace`, counting the bytecodes each Python function executes and
the Python calls it makes, for the `checked` floor and for EnvelopeMiddleware
(validating, context, no access log), both around floor.py's raw service.
Bytecodes are deterministic, and each function is named with the cases it
handles that the floor skips, so the table answers "which case costs how much"
in the interpreter's own unit: C work (the JSON check, ContextVars) is the same
for both and shows as one bytecode per call.

    python benchmarks/floor_gap.py
    python benchmarks/floor_gap.py --markdown benchmarks/results/floor_gap.md
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from floor import STACKS, publish, service
from inprocess import SCOPE, code_version, receive
from starlette.types import Message

# What each of the middleware's per-request functions does that the floor does not.
ROLES = {
    "EnvelopeMiddleware.__call__": "the id, the context and the reset, as the floor; also the nested-"
    "envelope check, the excluded paths, the access event's clock, an exception or an unfinished "
    "response answered",
    "ExchangeState.__init__": "the exchange object: per-request state for exceptions, disconnects and "
    "the access event",
    "Exchange.send": "dispatch by message kind, mode and whether the body ended (HEAD, streams, "
    "bodies after the end, a start after the body)",
    "Exchange._on_start": "a second start refused; header pairs as a list or any sequence",
    "Exchange._decide": "the status checked as a final int status; excluded paths; bodiless "
    "statuses, errors, 3xx, 206 and trailers each sent their own way",
    "Wrapping._wrap_mode": "the header scan: Content-Encoding and weak ETags, and the JSON media "
    "type read from Content-Type",
    "is_json_media_type": "the media type's parameters (cached by value)",
    "start_held": "the held start answered by a coroutine: apps may hand what `send` returns to "
    "`create_task`",
    "Wrapping._send_wrapped": "the splice, as the floor; also bytes-like bodies, a BOM, blank bodies, "
    "HEAD's length, and a body of 512 KiB or more sent as three messages",
    "json_error": "the JSON check, as the floor; also the position of the first error",
    "Wrapping._wrapped_start": "the start's headers: Content-Type, Content-Length and the id",
    "hex_request_id": "the id, as the floor",
}


def trace(stack: str) -> tuple[Counter[str], Counter[str]]:
    """Bytecodes executed and Python calls made, by function, in one request through `stack`."""
    app = STACKS[stack](service)
    bytecodes: Counter[str] = Counter()
    calls: Counter[str] = Counter()

    def tracer(frame: FrameType, event: str, _arg: Any) -> Any:
        frame.f_trace_opcodes = True
        name = frame.f_code.co_qualname
        if event == "opcode":
            bytecodes[name] += 1
        elif event == "call":
            calls[name] += 1
        return tracer

    async def discard(message: Message) -> None:
        return None

    async def requests() -> None:
        for _ in range(3):  # caches warmed, as on a server
            await app({**SCOPE, "state": {}}, receive, discard)
        sys.settrace(tracer)
        try:
            await app({**SCOPE, "state": {}}, receive, discard)
        finally:
            sys.settrace(None)

    asyncio.run(requests())
    for name in ("service", "trace.<locals>.discard"):  # the service and the server's send: not the layer's
        bytecodes.pop(name, None)
        calls.pop(name, None)
    return bytecodes, calls


def report() -> str:
    floor_ops, floor_calls = trace("checked")
    ops, calls = trace("EnvelopeMiddleware")
    lines = [
        f"Python {platform.python_version()}, {code_version()}.",
        "",
        (
            "One warmed-up `GET` of a 205 B JSON body, traced with `sys.settrace`: the bytecodes each "
            "function runs and the Python calls made."
        ),
        "",
        (
            f"floor.py's `checked` layer: {sum(floor_ops.values())} bytecodes, "
            f"{sum(floor_calls.values())} Python calls "
            f"({', '.join(f'{n} {c}' for n, c in floor_ops.most_common())})."
        ),
        "",
        "| EnvelopeMiddleware's function | calls | bytecodes | what it does beyond the floor |",
        "|---|---|---|---|",
    ]
    unknown = ops.keys() - ROLES.keys()
    if unknown:
        # A table that names a function without saying what it is for answers nothing.
        raise SystemExit(f"say in ROLES what these functions do beyond the floor: {sorted(unknown)}")
    lines.extend(
        f"| `{name}` | {calls[name]} | {count} | {ROLES[name]} |" for name, count in ops.most_common()
    )
    lines.append(
        f"| **EnvelopeMiddleware** | **{sum(calls.values())}** | **{sum(ops.values())}** "
        f"| {sum(ops.values()) / sum(floor_ops.values()):.2f} of the floor's bytecodes |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--markdown", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    text = report()
    publish(text, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
